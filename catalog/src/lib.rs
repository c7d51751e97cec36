//! The live shard map's catalog, kept in PostgreSQL (`shard-catalog`; see `shardmap::catalog` for its tables),
//! shared by the router and the rebalancer: [`ensure`] creates it when it is missing (seeded from config.csv),
//! [`load`] applies it to a [`ShardMap`], and [`follow`] is a router's task that LISTENs for changes
//! (re-reading every few seconds as well, in case a notification is lost), applies each version to the shard
//! map — bucket owners, frozen units — and acknowledges it with a heartbeat row, so that a move knows when
//! every live router holds a frozen unit's statements.
//!
//! Statements for a frozen unit wait in [`Catalog::wait_thawed`] until a new version thaws it; the other units
//! flow on. Without a catalog connection the router serves with the map it has.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use std::time::Duration;

use anyhow::{bail, Context, Result};
use shardmap::catalog::{Unit, CHANNEL, SCHEMA, SEED_LOCK};
use shardmap::config::NodeAddr;
use shardmap::{BucketId, ShardMap};
use tokio::sync::watch;

pub mod decisions;
pub mod tls;
pub use decisions::{Decisions, RecordError};

/// The statements between their routing decision and their answer, so that a router acknowledges a freeze
/// only once the statements it routed with the previous map have finished: a statement for the frozen unit
/// is then either done on the old owner (and replicated) or held, never still on its way there. Two counters
/// by the parity of an epoch that each applied catalog version raises.
#[derive(Default)]
pub struct Gate {
    epoch: AtomicU64,
    inflight: [AtomicUsize; 2],
}

/// A statement's place in the [`Gate`], given back when dropped.
pub struct Pass {
    gate: Arc<Gate>,
    slot: usize,
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.gate.inflight[self.slot].fetch_sub(1, Ordering::Release);
    }
}

impl Gate {
    /// Counts a statement in (before its routing decision).
    pub fn enter(self: &Arc<Self>) -> Pass {
        loop {
            let e = self.epoch.load(Ordering::Acquire);
            let slot = (e & 1) as usize;
            self.inflight[slot].fetch_add(1, Ordering::AcqRel);
            // Counted under the epoch it read: a drain that began in between would not wait for it.
            if self.epoch.load(Ordering::Acquire) == e {
                return Pass { gate: self.clone(), slot };
            }
            self.inflight[slot].fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// After a new map is applied: waits (at most `limit`) for the statements counted in before it.
    pub async fn drain(&self, limit: Duration) -> bool {
        let old = self.epoch.fetch_add(1, Ordering::AcqRel);
        let slot = &self.inflight[(old & 1) as usize];
        let deadline = tokio::time::Instant::now() + limit;
        while slot.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        true
    }
}

/// Where the catalog (or the decision log) is, shared by everything that connects to it. When it lives on a
/// shard's node that fails over (Patroni, a multi-host URL), the router's topology moves it to the node's new
/// primary ([`Place::set_primary`]); every new connection reads it afresh.
#[derive(Clone, Debug)]
pub struct Place(Arc<std::sync::RwLock<NodeAddr>>);

impl Place {
    pub fn new(addr: NodeAddr) -> Place {
        Place(Arc::new(std::sync::RwLock::new(addr)))
    }

    /// The address now.
    pub fn get(&self) -> NodeAddr {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The node's primary is now `host`: it is tried first, then the other hosts the address had (a
    /// connection insists on a server that accepts writes, so a stale order costs a try, never a wrong write).
    pub fn set_primary(&self, host: &(String, u16)) {
        let mut a = self.0.write().unwrap_or_else(|e| e.into_inner());
        if a.hosts.first() != Some(host) {
            a.hosts.retain(|h| h != host);
            a.hosts.insert(0, host.clone());
        }
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

/// This router's view of the catalog.
pub struct Catalog {
    /// Where it is; `None`: no catalog (the map is config.csv's for good).
    pub addr: Option<Place>,
    /// This router's id in `gb_routers`.
    pub id: String,
    /// The version applied last (0 before the first load); every change wakes the statements in `thaw`.
    version: watch::Sender<u64>,
    gate: Arc<Gate>,
}

impl Catalog {
    pub fn new(addr: Option<Place>) -> Catalog {
        let id = format!(
            "{}-{}-{:08x}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "router".into()),
            std::process::id(),
            rand::random::<u32>()
        );
        Catalog { addr, id, version: watch::Sender::new(0), gate: Default::default() }
    }

    /// Counts a statement in the gate (none without a catalog: nothing moves).
    pub fn enter(&self) -> Option<Pass> {
        self.addr.as_ref().map(|_| self.gate.enter())
    }

    /// The version applied last.
    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// Waits while `frozen()` holds (a move has frozen a unit), waking at each new catalog version, at most
    /// `limit`; false if it still holds then.
    pub async fn wait_thawed(&self, frozen: impl Fn() -> bool, limit: Duration) -> bool {
        let mut changes = self.version.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        while frozen() {
            if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// A tokio-postgres config for `addr`, database `db` (default: the address's own), and the TLS connector
/// its `sslmode` asks for.
pub fn pg_config(
    addr: &NodeAddr,
    db: Option<&str>,
    application: &str,
) -> Result<(tokio_postgres::Config, tls::Connector)> {
    let mut cfg = tokio_postgres::Config::new();
    for (host, port) in &addr.hosts {
        cfg.host(host).port(*port);
    }
    cfg.user(addr.user.as_deref().unwrap_or("postgres"))
        .dbname(db.or(addr.dbname.as_deref()).unwrap_or("postgres"))
        .application_name(application)
        .target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite)
        .connect_timeout(Duration::from_secs(5));
    if let Some(pw) = &addr.password {
        cfg.password(pw);
    }
    let tls = tls::connector(&mut cfg, &addr.params).map_err(|e| anyhow::anyhow!("{addr}: {e}"))?;
    Ok((cfg, tls))
}

/// Connects, running the connection on its own task.
pub async fn connect(addr: &NodeAddr, db: Option<&str>, application: &str) -> Result<tokio_postgres::Client> {
    let (cfg, tls) = pg_config(addr, db, application)?;
    let (client, conn) = cfg
        .connect(tls)
        .await
        .with_context(|| format!("{addr}{}", db.map(|d| format!(" database {d}")).unwrap_or_default()))?;
    tokio::spawn(conn);
    Ok(client)
}

/// Connects to the catalog's database, creating it first when it is missing (safe from several processes
/// at once).
pub async fn connect_creating(addr: &NodeAddr, application: &str) -> Result<tokio_postgres::Client> {
    let db_name = addr.dbname.clone().unwrap_or_else(|| shardmap::catalog::DEFAULT_DATABASE.into());
    let client = match connect(addr, Some(&db_name), application).await {
        Ok(c) => c,
        Err(e) if missing_database(&e) => {
            let admin = connect(addr, Some("postgres"), application).await?;
            let create = format!("CREATE DATABASE \"{}\"", db_name.replace('"', "\"\""));
            match admin.batch_execute(&create).await {
                Ok(()) => tracing::info!("created the catalog database {db_name}"),
                // Made in between by another router or rebalancer (a race shows as a unique violation).
                Err(e)
                    if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
                        || e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {}
                Err(e) => return Err(e).context(format!("creating the catalog database {db_name}")),
            }
            connect(addr, Some(&db_name), application).await?
        }
        Err(e) => return Err(e),
    };
    Ok(client)
}

/// Creates the catalog's database and tables when missing and seeds them from `map` (each bucket on the node
/// config.csv gives it); checks that an existing catalog fits the map. Safe to run from several routers and
/// rebalancers at once.
pub async fn ensure(addr: &NodeAddr, map: &ShardMap, application: &str) -> Result<tokio_postgres::Client> {
    let mut client = connect_creating(addr, application).await?;
    let buckets = map.bucket_count().map(|b| b as i32);
    let tx = client.transaction().await?;
    tx.query_one("SELECT pg_advisory_xact_lock($1)", &[&SEED_LOCK]).await?;
    tx.batch_execute(SCHEMA).await.context("creating the catalog's tables")?;
    let row = tx.query_opt("SELECT buckets FROM gb_catalog", &[]).await?;
    match row {
        None => {
            let strategy = format!("{:?}", map.strategy).to_lowercase();
            tx.execute(
                "INSERT INTO gb_catalog (version, strategy, buckets) VALUES (1, $1, $2)",
                &[&strategy, &buckets],
            )
            .await?;
            if let Some(n) = map.bucket_count() {
                let (mut units, mut nodes) = (Vec::new(), Vec::new());
                for b in 0..n {
                    let owner = map.bucket_owner(BucketId(b)).expect("a bucket of the map");
                    units.push(Unit::Bucket(b).to_string());
                    nodes.push(map.node(owner).name.clone());
                }
                tx.execute(
                    "INSERT INTO gb_units (unit, node) SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
                    &[&units, &nodes],
                )
                .await?;
            }
            tracing::info!("seeded the catalog from config.csv");
        }
        Some(r) => {
            let theirs: Option<i32> = r.get(0);
            if theirs != buckets {
                bail!(
                    "the catalog was made for {} buckets and config.csv has {} (shard-buckets cannot change once data is placed)",
                    theirs.map_or("no".into(), |b| b.to_string()),
                    buckets.map_or("none".into(), |b| b.to_string())
                );
            }
        }
    }
    tx.commit().await?;
    Ok(client)
}

fn missing_database(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tokio_postgres::Error>()
        .and_then(|e| e.code())
        .is_some_and(|c| *c == tokio_postgres::error::SqlState::INVALID_CATALOG_NAME)
}

/// Reads the catalog (one statement: one snapshot) and applies it to `map`; returns its version.
pub async fn load(client: &tokio_postgres::Client, map: &ShardMap) -> Result<u64> {
    let rows = client
        .query(
            "SELECT (SELECT version FROM gb_catalog), unit, node, frozen FROM gb_units \
             WHERE unit LIKE 'bucket:%' OR unit LIKE 'tenant:%' OR unit LIKE 'range:%'",
            &[],
        )
        .await?;
    let mut version = 0;
    let mut ranges = Vec::new();
    for r in &rows {
        version = r.get::<_, Option<i64>>(0).unwrap_or(0) as u64;
        let unit: &str = r.get(1);
        let node: &str = r.get(2);
        let Some(owner) = map.shard_by_name(node) else {
            tracing::warn!("catalog: {unit} is on node {node:?}, which config.csv does not name; ignored");
            continue;
        };
        match unit.parse::<Unit>() {
            Ok(Unit::Bucket(b)) => map.set_bucket(BucketId(b), owner, r.get(3)),
            Ok(Unit::Tenant(t)) => map.set_tenant(&t, owner, r.get(3)),
            Ok(Unit::Range { node, from }) => ranges.push((node, from, owner, r.get(3))),
            Err(_) => {}
        }
    }
    if map.strategy == shardmap::Strategy::Range {
        for unit in map.set_range_pieces(&ranges) {
            tracing::warn!("catalog: {unit} is inside no range of shard-ranges; ignored");
        }
    }
    if rows.is_empty() {
        version =
            client.query_opt("SELECT version FROM gb_catalog", &[]).await?.map_or(0, |r| r.get::<_, i64>(0)) as u64;
    }
    Ok(version)
}

/// What [`follow`] needs of the router that runs it, read at each step (RELOAD may change it).
pub struct Follower {
    /// The address the router listens on, written in its heartbeat row.
    pub listen: String,
    /// `rebalance-max-freeze-ms`: half of it bounds the wait for statements routed with the previous map.
    pub max_freeze: Box<dyn Fn() -> Duration + Send + Sync>,
}

/// The router's catalog task: follows the catalog into `map` until the router drops `catalog`, reconnecting
/// after failures.
pub async fn follow(catalog: Weak<Catalog>, map: Arc<ShardMap>, follower: Follower) {
    let mut failures = 0u32;
    loop {
        let Some(c) = catalog.upgrade() else { return };
        if c.addr.is_none() {
            return;
        }
        drop(c);
        match follow_once(&catalog, &map, &follower).await {
            Ok(()) => return,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!("catalog: {e:#}; serving with the map as it is, trying again");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn follow_once(catalog: &Weak<Catalog>, map: &Arc<ShardMap>, follower: &Follower) -> Result<()> {
    let (addr, id) = {
        let c = catalog.upgrade().context("stopping")?;
        (c.addr.as_ref().expect("checked").get(), c.id.clone())
    };
    ensure(&addr, map, "shard-router catalog").await?;
    let (cfg, tls) = pg_config(&addr, None, "shard-router catalog")?;
    let (client, mut conn) = cfg.connect(tls).await.context("catalog")?;
    let (tx, mut notified) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                    if tx.send(()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("catalog connection: {e}");
                    return;
                }
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    let beat = "INSERT INTO gb_routers (id, addr, version) VALUES ($1, $2, $3) \
                ON CONFLICT (id) DO UPDATE SET seen = now(), version = EXCLUDED.version";
    let beat = client.prepare(beat).await?;
    let mut heartbeat = tokio::time::interval(Duration::from_millis(500));
    let mut reread = tokio::time::interval(Duration::from_secs(5));
    let mut applied: Option<u64> = None;
    loop {
        let reload = tokio::select! {
            n = notified.recv() => {
                n.context("the catalog connection closed")?;
                true
            }
            _ = reread.tick() => true,
            _ = heartbeat.tick() => false,
        };
        let Some(c) = catalog.upgrade() else { return Ok(()) };
        if reload {
            let v = load(&client, map).await?;
            if applied != Some(v) {
                tracing::info!(version = v, "catalog applied");
                applied = Some(v);
                c.version.send_replace(v);
                // Acknowledge only once the statements routed with the previous map are done (bounded: a
                // long statement leaves the rest to the source's guard).
                let limit = (follower.max_freeze)() / 2;
                if !c.gate.drain(limit).await {
                    tracing::warn!(
                        version = v,
                        "statements routed before catalog version {v} still run after {limit:?}"
                    );
                }
            }
        }
        // The heartbeat carries the version applied: a move's cutover waits for it.
        let v = c.version() as i64;
        client.execute(&beat, &[&id, &follower.listen, &v]).await?;
    }
}
