//! A move of one unit from its node to another, online: a resumable state machine whose state is a row of
//! the catalog's `gb_moves`.
//!
//! 1. `copying`: the unit's tables get a row-filtered publication on the source (the router's own hash,
//!    computed in SQL) and a subscription on the target, which copies the rows and then streams changes.
//! 2. `catching-up`: until the replication lag is under `rebalance-cutover-lag-bytes`.
//! 3. `cutover`: the unit is frozen in the catalog and every live router acknowledges (it holds the unit's
//!    new statements); a guard trigger on the source refuses writes to the unit's rows (creating it waits for
//!    the transactions that wrote those tables); a marker row written on the source after the guard reaches
//!    the target, so everything before it has too; the target's sequences take the source's values; rows
//!    and checksums are compared; the owner flips and the unit thaws. Any failure, or a freeze longer than `rebalance-max-freeze-ms`, rolls back: guard dropped,
//!    unit thawed, the old owner serves as before.
//! 4. `cleanup`: subscription, publication and replication slot dropped, replica identities restored, and
//!    after `rebalance-grace-s` the unit's rows deleted from the source in batches (a tenant's database
//!    dropped). The guard stays: a router that missed the flip cannot write to the old owner.
//!
//! Units: a hash bucket (its rows in every sharded table, selected by the router's hash in SQL) or a
//! tenant (its whole database: created on the target with the source's schema, every table published).
//!
//! `resume` continues a move from its recorded state; `abort` rolls back one that has not flipped.

use crate::{quote_ident, quote_literal_sql};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use shardmap::catalog::{unit_condition, Unit, CHANNEL, REBALANCER_LOCK, ROUTER_LIVE_S};
use shardmap::config::NodeAddr;
use shardmap::{Config, ShardMap};
use tokio_postgres::Client;

/// What a finished move reports (`--json`).
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub id: i64,
    pub unit: String,
    pub source: String,
    pub target: String,
    pub state: String,
    pub rows: i64,
    pub freeze_ms: Option<i64>,
    pub seconds: f64,
    pub error: Option<String>,
}

/// How a move shows its progress: a terminal gets bars; `--json` and pipes get nothing until the end.
pub trait Progress: Send + Sync {
    fn stage(&self, name: &str, total: Option<u64>);
    fn set(&self, done: u64, message: String);
    fn finish(&self);
}

/// No progress output.
pub struct Quiet;

impl Progress for Quiet {
    fn stage(&self, _: &str, _: Option<u64>) {}
    fn set(&self, _: u64, _: String) {}
    fn finish(&self) {}
}

/// Progress bars on standard error (hidden when it is not a terminal).
pub struct Bars(std::sync::Mutex<Option<indicatif::ProgressBar>>);

impl Bars {
    pub fn new() -> Bars {
        Bars(std::sync::Mutex::new(None))
    }
}

impl Default for Bars {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for Bars {
    fn stage(&self, name: &str, total: Option<u64>) {
        let mut slot = self.0.lock().expect("progress lock");
        if let Some(b) = slot.take() {
            b.finish();
        }
        let bar = match total {
            Some(t) => indicatif::ProgressBar::new(t).with_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>12} [{bar:30}] {human_pos}/{human_len} rows {per_sec} eta {eta} {msg}",
                )
                .expect("a template")
                .progress_chars("=> "),
            ),
            None => indicatif::ProgressBar::new_spinner().with_style(
                indicatif::ProgressStyle::with_template("{prefix:>12} {spinner} {msg}").expect("a template"),
            ),
        };
        bar.set_prefix(name.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        *slot = Some(bar);
    }

    fn set(&self, done: u64, message: String) {
        if let Some(b) = self.0.lock().expect("progress lock").as_ref() {
            b.set_position(done);
            b.set_message(message);
        }
    }

    fn finish(&self) {
        if let Some(b) = self.0.lock().expect("progress lock").take() {
            b.finish();
        }
    }
}

/// One sharded table of a move.
#[derive(Clone, Debug)]
struct Table {
    /// `"schema"."name"`, quoted.
    name: String,
    /// Whether the move set `REPLICA IDENTITY FULL` (restored at cleanup).
    identity_full: bool,
    /// Its shard key column (`shard-table-<table>` or `shard-key`), unquoted.
    key: String,
}

/// The rebalancer: the catalog (with the one-rebalancer lock held) and the config.
pub struct Rebalancer {
    config: Config,
    map: Arc<ShardMap>,
    catalog: Client,
    progress: Box<dyn Progress>,
}

/// A move's row in `gb_moves`.
#[derive(Clone, Debug)]
struct Move {
    id: i64,
    unit: Unit,
    source: String,
    target: String,
    state: String,
    started: Instant,
}

/// Errors with their exit status.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// Another rebalancer holds the lock, or a move is already running / none is.
    #[error("{0}")]
    Busy(String),
    /// The request cannot be done as asked (unknown unit or node, already there...).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl From<tokio_postgres::Error> for MoveError {
    fn from(e: tokio_postgres::Error) -> Self {
        MoveError::Failed(e.into())
    }
}

impl MoveError {
    /// The exit status the CLI documents: 1 failed (rolled back, or a node unreachable), 2 invalid request,
    /// 3 busy.
    pub fn exit_code(&self) -> u8 {
        match self {
            MoveError::Failed(_) => 1,
            MoveError::Invalid(_) => 2,
            MoveError::Busy(_) => 3,
        }
    }
}

/// A value in a libpq connection string, quoted (backslash escapes, not SQL's).
fn conninfo_value(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A libpq connection string for `addr` (for the target's subscription to reach the source's primary).
pub fn conninfo(addr: &NodeAddr) -> String {
    let hosts: Vec<&str> = addr.hosts.iter().map(|(h, _)| h.as_str()).collect();
    let ports: Vec<String> = addr.hosts.iter().map(|(_, p)| p.to_string()).collect();
    let mut s = format!(
        "host={} port={} user={} dbname={} target_session_attrs=read-write",
        conninfo_value(&hosts.join(",")),
        conninfo_value(&ports.join(",")),
        conninfo_value(addr.user.as_deref().unwrap_or("postgres")),
        conninfo_value(addr.dbname.as_deref().unwrap_or("postgres")),
    );
    if let Some(pw) = &addr.password {
        s.push_str(&format!(" password={}", conninfo_value(pw)));
    }
    // TLS as the node URL asks (the target's server reads sslrootcert's path).
    for (k, v) in &addr.params {
        if k == "sslmode" || k == "sslrootcert" {
            s.push_str(&format!(" {k}={}", conninfo_value(v)));
        }
    }
    s
}

fn resource(id: i64) -> String {
    format!("gb_move_{id}")
}

impl Rebalancer {
    /// Connects to the catalog (creating it if needed) and takes the one-rebalancer lock.
    pub async fn open(config: Config, progress: Box<dyn Progress>) -> Result<Rebalancer, MoveError> {
        Self::connect(config, progress, Lock::Now).await
    }

    /// Like `open`, for `resume` and `abort`, which run after a rebalancer was killed: that one holds the lock
    /// until the catalog's server notices its connection is gone, so the lock is tried for [`LOCK_GRACE`]
    /// before another rebalancer is said to run.
    pub async fn recovering(config: Config, progress: Box<dyn Progress>) -> Result<Rebalancer, MoveError> {
        Self::connect(config, progress, Lock::Within(LOCK_GRACE)).await
    }

    /// Like `open`, without the lock: for reading (`verify`) while a move may run.
    pub async fn reader(config: Config) -> Result<Rebalancer, MoveError> {
        Self::connect(config, Box::new(Quiet), Lock::No).await
    }

    async fn connect(config: Config, progress: Box<dyn Progress>, lock: Lock) -> Result<Rebalancer, MoveError> {
        let map = Arc::new(ShardMap::new(&config).map_err(MoveError::Invalid)?);
        let Some(addr) = shardmap::catalog::address(&config).map_err(MoveError::Invalid)? else {
            return Err(MoveError::Invalid(
                "there is no catalog: moves need shard-algorithm,hash-buckets (or shard-catalog set)".into(),
            ));
        };
        let catalog = shard_catalog::ensure(&addr, &map, "rebalance").await?;
        let (mut locked, grace) = match lock {
            Lock::No => (true, std::time::Instant::now()),
            Lock::Now => (false, std::time::Instant::now()),
            Lock::Within(d) => (false, std::time::Instant::now() + d),
        };
        while !locked {
            locked = catalog
                .query_one("SELECT pg_try_advisory_lock($1)", &[&REBALANCER_LOCK])
                .await
                .context("catalog")?
                .get(0);
            if locked || std::time::Instant::now() >= grace {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        if !locked {
            return Err(MoveError::Busy("another rebalancer is running (it holds the catalog's lock)".into()));
        }
        shard_catalog::load(&catalog, &map).await?;
        Ok(Rebalancer { config, map, catalog, progress })
    }

    fn node_addr(&self, name: &str) -> Result<NodeAddr, MoveError> {
        let id = self.map.shard_by_name(name).ok_or_else(|| MoveError::Invalid(format!("no node {name:?}")))?;
        self.map.node(id).addr.clone().ok_or_else(|| MoveError::Invalid(format!("node {name} has no address")))
    }

    async fn node(&self, name: &str) -> Result<Client, MoveError> {
        self.node_in(name, None).await
    }

    async fn active(&self) -> Result<Option<Move>> {
        let row = self
            .catalog
            .query_opt("SELECT id, unit, source, target, state FROM gb_moves WHERE finished IS NULL", &[])
            .await?;
        Ok(match row {
            None => None,
            Some(r) => Some(Move {
                id: r.get(0),
                unit: r.get::<_, String>(1).parse().map_err(anyhow::Error::msg)?,
                source: r.get(2),
                target: r.get(3),
                state: r.get(4),
                started: Instant::now(),
            }),
        })
    }

    async fn set_state(&self, m: &mut Move, state: &str) -> Result<()> {
        self.catalog.execute("UPDATE gb_moves SET state = $2, updated = now() WHERE id = $1", &[&m.id, &state]).await?;
        m.state = state.to_string();
        Ok(())
    }

    /// `rebalance move UNIT --to NODE`.
    pub async fn start(&mut self, unit: &str, to: &str) -> Result<Outcome, MoveError> {
        let unit: Unit = unit.parse().map_err(MoveError::Invalid)?;
        match &unit {
            Unit::Bucket(b) => {
                let Some(buckets) = self.map.bucket_count() else {
                    return Err(MoveError::Invalid(format!("{unit}: buckets move under shard-algorithm,hash-buckets")));
                };
                if *b >= buckets {
                    return Err(MoveError::Invalid(format!(
                        "{unit}: there are {buckets} buckets (0 to {})",
                        buckets.max(1) - 1
                    )));
                }
            }
            Unit::Tenant(_) if self.map.strategy != shardmap::Strategy::Tenant => {
                return Err(MoveError::Invalid(format!("{unit}: tenants move under shard-strategy,tenant")));
            }
            Unit::Tenant(_) => {}
            Unit::Range { .. } if self.map.strategy != shardmap::Strategy::Range => {
                return Err(MoveError::Invalid(format!("{unit}: ranges move under shard-strategy,range")));
            }
            Unit::Range { node, from } => {
                let inside = self
                    .config
                    .ranges
                    .iter()
                    .any(|r| &r.node == node && *from > r.start && r.end.is_none_or(|e| *from <= e));
                if !inside {
                    return Err(MoveError::Invalid(format!(
                        "{unit}: {from} is not inside the range of shard-ranges that {node} holds (a split point is above the range's start and within it)"
                    )));
                }
            }
        }
        self.node_addr(to)?;
        if let Some(m) = self.active().await? {
            return Err(MoveError::Busy(format!(
                "move {} of {} ({} → {}) is unfinished, at {}: `rebalance resume` or `rebalance abort`",
                m.id, m.unit, m.source, m.target, m.state
            )));
        }
        let source = self.owner(&unit).await?;
        if let Unit::Tenant(t) = &unit {
            let db = format!("{}{t}", self.map.tenant_prefix);
            let src = self.node(&source).await?;
            let exists: bool =
                src.query_one("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", &[&db]).await?.get(0);
            if !exists {
                return Err(MoveError::Invalid(format!("{unit}: there is no database {db} on node {source}")));
            }
        }
        if source == to {
            return Err(MoveError::Invalid(format!("{unit} is on {to} already")));
        }
        let id: i64 = self
            .catalog
            .query_one(
                "INSERT INTO gb_moves (unit, source, target, state) VALUES ($1, $2, $3, 'copying') RETURNING id",
                &[&unit.to_string(), &source, &to],
            )
            .await
            .context("catalog")?
            .get(0);
        let mut m = Move { id, unit, source, target: to.to_string(), state: "copying".into(), started: Instant::now() };
        self.drive(&mut m).await
    }

    /// `rebalance apply PLAN`: the plan's moves one after the other. A move whose unit is already on its
    /// target is skipped (an apply run again after a failure picks up where it stopped); one whose unit is no
    /// longer on the plan's source is skipped with a note (the map changed since the plan). Stops at the first
    /// failed move.
    pub async fn apply(&mut self, plan: &crate::plan::Plan) -> Result<Vec<Outcome>, MoveError> {
        let mut done = Vec::new();
        for (i, pm) in plan.moves.iter().enumerate() {
            let unit: Unit = pm.unit.parse().map_err(MoveError::Invalid)?;
            let owner = self.owner(&unit).await?;
            let skipped = |why: &str| Outcome {
                id: 0,
                unit: pm.unit.clone(),
                source: pm.from.clone(),
                target: pm.to.clone(),
                state: why.to_string(),
                rows: 0,
                freeze_ms: None,
                seconds: 0.0,
                error: None,
            };
            if owner == pm.to {
                done.push(skipped("skipped: already there"));
                continue;
            }
            if owner != pm.from {
                done.push(skipped(&format!("skipped: now on {owner}, not on {}", pm.from)));
                continue;
            }
            self.progress.stage(&format!("move {}/{}", i + 1, plan.moves.len()), None);
            match self.start(&pm.unit, &pm.to).await {
                Ok(o) => done.push(o),
                Err(e) => {
                    return Err(MoveError::Failed(anyhow::anyhow!(
                        "{} of {} moves done; {} -> {} failed: {e:#}",
                        done.len(),
                        plan.moves.len(),
                        pm.unit,
                        pm.to
                    )))
                }
            }
        }
        Ok(done)
    }

    /// `rebalance resume`: carries the unfinished move on from its recorded state.
    pub async fn resume(&mut self) -> Result<Outcome, MoveError> {
        let Some(mut m) = self.active().await? else {
            return Err(MoveError::Busy("no move to resume".into()));
        };
        self.drive(&mut m).await
    }

    /// `rebalance abort`: rolls the unfinished move back (before its flip; after it, the move can only finish).
    pub async fn abort(&mut self) -> Result<Outcome, MoveError> {
        let Some(mut m) = self.active().await? else {
            return Err(MoveError::Busy("no move to abort".into()));
        };
        if self.owner(&m.unit).await? == m.target {
            return Err(MoveError::Invalid(format!(
                "move {} has flipped {} to {} already: `rebalance resume` finishes its cleanup",
                m.id, m.unit, m.target
            )));
        }
        self.roll_back(&mut m, "aborted by `rebalance abort`").await?;
        self.outcome(&m).await
    }

    /// The node that owns `unit` now: the catalog's, else where config.csv places it.
    async fn owner(&self, unit: &Unit) -> Result<String> {
        let row = self.catalog.query_opt("SELECT node FROM gb_units WHERE unit = $1", &[&unit.to_string()]).await?;
        match (row, unit) {
            (Some(r), _) => Ok(r.get(0)),
            (None, Unit::Tenant(t)) => Ok(self.map.node(self.map.tenant_shard(t)).name.clone()),
            (None, Unit::Range { from, .. }) => {
                shard_catalog::load(&self.catalog, &self.map).await?;
                let piece =
                    self.map.range_pieces().into_iter().find(|p| p.start <= *from && p.end.is_none_or(|e| *from <= e));
                Ok(self.map.node(piece.context("outside every range")?.shard).name.clone())
            }
            (None, _) => bail!("{unit} is not in the catalog"),
        }
    }

    /// The database a unit lives in: a tenant's own, or the node's (`None`).
    fn database(&self, unit: &Unit) -> Option<String> {
        match unit {
            Unit::Tenant(t) => Some(format!("{}{t}", self.map.tenant_prefix)),
            _ => None,
        }
    }

    async fn node_in(&self, name: &str, db: Option<&str>) -> Result<Client, MoveError> {
        let addr = self.node_addr(name)?;
        Ok(shard_catalog::connect(&addr, db, "rebalance").await.with_context(|| format!("node {name}"))?)
    }

    /// A tenant's move: its database on the target, created (and its schema copied) when missing.
    async fn prepare_target(&self, m: &Move) -> Result<(), MoveError> {
        let Some(db) = self.database(&m.unit) else { return Ok(()) };
        let admin = self.node(&m.target).await?;
        let exists: bool =
            admin.query_one("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", &[&db]).await?.get(0);
        if !exists {
            admin
                .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&db)))
                .await
                .context("creating the database on the target")?;
            self.catalog.execute("UPDATE gb_moves SET created_target = true WHERE id = $1", &[&m.id]).await?;
        }
        let dst = self.node_in(&m.target, Some(&db)).await?;
        let tables: i64 = dst
            .query_one(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND c.relname <> 'gb_move_marker'",
                &[],
            )
            .await?
            .get(0);
        if tables == 0 {
            let s = NodeAddr { dbname: Some(db.clone()), ..self.node_addr(&m.source)? };
            let t = NodeAddr { dbname: Some(db.clone()), ..self.node_addr(&m.target)? };
            copy_schema(&s, &t, &[]).await.with_context(|| format!("creating the schema of {db} on {}", m.target))?;
        }
        Ok(())
    }

    async fn outcome(&self, m: &Move) -> Result<Outcome, MoveError> {
        let r = self
            .catalog
            .query_one("SELECT state, coalesce(rows_moved, 0), freeze_ms, error FROM gb_moves WHERE id = $1", &[&m.id])
            .await
            .context("catalog")?;
        Ok(Outcome {
            id: m.id,
            unit: m.unit.to_string(),
            source: m.source.clone(),
            target: m.target.clone(),
            state: r.get(0),
            rows: r.get(1),
            freeze_ms: r.get(2),
            seconds: m.started.elapsed().as_secs_f64(),
            error: r.get(3),
        })
    }

    /// Runs the state machine from `m.state` to the end.
    async fn drive(&mut self, m: &mut Move) -> Result<Outcome, MoveError> {
        // The map as the catalog has it now (range pieces: where this unit ends).
        shard_catalog::load(&self.catalog, &self.map).await?;
        let db = self.database(&m.unit);
        if m.state == "copying" {
            self.prepare_target(m).await?;
        }
        let src = self.node_in(&m.source, db.as_deref()).await?;
        let dst = self.node_in(&m.target, db.as_deref()).await?;
        let tables = self.tables(&src, &dst, m).await?;
        loop {
            match m.state.as_str() {
                "copying" | "catching-up" => {
                    // A copy that cannot succeed (keys that collide on the target, an error applying the
                    // changes, the slot gone) rolls back: nothing keeps replicating, the source serves on.
                    let r = async {
                        if m.state == "copying" {
                            self.subscribe(&src, &dst, m, &tables).await?;
                            self.wait_copied(&src, &dst, m, &tables).await?;
                            self.set_state(m, "catching-up").await?;
                        }
                        self.catch_up(&src, &dst, m).await?;
                        self.set_state(m, "cutover").await
                    }
                    .await;
                    if let Err(e) = r {
                        let why = format!("{e:#}");
                        self.roll_back(m, &why).await?;
                        return Err(MoveError::Failed(anyhow::anyhow!("move {} rolled back: {why}", m.id)));
                    }
                }
                "cutover" => {
                    if self.owner(&m.unit).await? == m.target {
                        // Flipped before a crash: only the cleanup is left.
                        self.set_state(m, "cleanup").await?;
                        continue;
                    }
                    match self.cutover(&src, &dst, m, &tables).await {
                        Ok(()) => self.set_state(m, "cleanup").await?,
                        Err(e) => {
                            let why = format!("{e:#}");
                            self.roll_back(m, &why).await?;
                            return Err(MoveError::Failed(anyhow::anyhow!("move {} rolled back: {why}", m.id)));
                        }
                    }
                }
                "cleanup" => {
                    self.clean_up(&src, &dst, m, &tables, true).await?;
                    if let Some(db) = &db {
                        // A tenant's database goes from the source whole, after the grace period.
                        drop(src);
                        let grace = self.config.rebalance.grace_s;
                        if grace > 0 {
                            self.progress
                                .set(0, format!("{db} stays on {} for rebalance-grace-s = {grace} s", m.source));
                            tokio::time::sleep(Duration::from_secs(grace)).await;
                        }
                        let admin = self.node(&m.source).await?;
                        admin
                            .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(db)))
                            .await
                            .with_context(|| format!("dropping {db} from {}", m.source))?;
                    }
                    self.catalog
                        .execute(
                            "UPDATE gb_moves SET state = 'done', finished = now(), updated = now() WHERE id = $1",
                            &[&m.id],
                        )
                        .await
                        .context("catalog")?;
                    self.progress.finish();
                    return self.outcome(m).await;
                }
                other => {
                    return Err(MoveError::Failed(anyhow::anyhow!("move {} is in an unknown state {other:?}", m.id)))
                }
            }
        }
    }

    /// The condition selecting the unit's rows of table `t` (by its own key column).
    fn cond_of(&self, unit: &Unit, t: &Table) -> String {
        self.condition_on(unit, &quote_ident(&t.key))
    }

    /// The `shard-table-<table>` keys as two arrays (tables, columns), for the catalog queries.
    fn table_key_arrays(&self) -> (Vec<String>, Vec<String>) {
        self.map.table_keys.iter().map(|(t, k)| (t.clone(), k.clone())).unzip()
    }

    /// The condition selecting the unit's rows, the key read from `column` (`NEW."user_id"`).
    fn condition_on(&self, unit: &Unit, column: &str) -> String {
        let lower = unit_condition(unit, column, self.map.key_type, self.map.bucket_count().unwrap_or(1));
        match unit {
            // A range piece ends where the piece holding its split point ends (the next split, or the range's
            // end): one move at a time, so this does not change while the move runs.
            Unit::Range { from, .. } => {
                let end = self
                    .map
                    .range_pieces()
                    .into_iter()
                    .find(|p| p.start <= *from && p.end.is_none_or(|e| *from <= e))
                    .and_then(|p| p.end);
                match end {
                    Some(e) => format!("{lower} AND {column} <= {e}"),
                    None => lower,
                }
            }
            _ => lower,
        }
    }

    /// The sharded tables on the source (a column named like the shard key, not in shard-global-tables),
    /// created on the target when missing; each one's replica identity made to cover the key.
    async fn tables(&self, src: &Client, dst: &Client, m: &Move) -> Result<Vec<Table>, MoveError> {
        // A tenant's database moves whole: every table; its replica identity must be a key or FULL.
        let whole = matches!(m.unit, Unit::Tenant(_));
        let (key_tables, key_columns) = self.table_key_arrays();
        let rows = src
            .query(
                "SELECT n.nspname, c.relname, c.relreplident::text, \
                        coalesce((SELECT bool_or(a.attname = k.key) FROM pg_index i \
                                  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                                  WHERE i.indrelid = c.oid AND (i.indisreplident OR (c.relreplident = 'd' AND i.indisprimary))), false), \
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), k.key \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, \
                   LATERAL (SELECT coalesce((SELECT tk.k FROM unnest($3::text[], $4::text[]) AS tk(t, k) WHERE tk.t = c.relname), $1) AS key) k \
                 WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                   AND n.nspname NOT LIKE 'pg_toast%' \
                   AND c.relname <> 'gb_move_marker' \
                   AND ($2 OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = k.key AND NOT a.attisdropped)) \
                 ORDER BY 1, 2",
                &[&self.map.key, &whole, &key_tables, &key_columns],
            )
            .await
            .context("listing the source's tables")?;
        let mut tables = Vec::new();
        for r in rows {
            let (schema, name): (String, String) = (r.get(0), r.get(1));
            if !whole
                && (self.map.global_tables.contains(&name)
                    || self.map.global_tables.contains(&format!("{schema}.{name}")))
            {
                continue;
            }
            let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
            let ident: String = r.get(2);
            let covered: bool = r.get(3);
            // A row filter on the key needs the key in the replica identity, or the application's own UPDATE
            // and DELETE on the source fail; FULL for the move's duration, restored at cleanup. (A resumed
            // move finds FULL already, and its own record of having set it.)
            let has_key: bool = r.get(4);
            let covered = if whole { ident == "i" || (ident == "d" && has_key) } else { covered };
            let identity_full = if !covered && ident != "f" {
                self.mark_full(m, &qualified).await?;
                src.batch_execute(&format!("ALTER TABLE {qualified} REPLICA IDENTITY FULL")).await?;
                true
            } else {
                ident == "f" && self.marked_full(m, &qualified).await?
            };
            let exists: bool =
                dst.query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified]).await.context("the target")?.get(0);
            if !exists && !whole {
                self.copy_schema(&m.source, &m.target, &schema, &name).await?;
            } else if !exists {
                return Err(MoveError::Failed(anyhow::anyhow!("{qualified} is missing on the target {}", m.target)));
            }
            tables.push(Table { name: qualified, identity_full, key: r.get(5) });
        }
        if tables.is_empty() {
            return Err(MoveError::Invalid(format!("the source has no table with a {} column to move", self.map.key)));
        }
        for c in [src, dst] {
            c.batch_execute("CREATE TABLE IF NOT EXISTS gb_move_marker (id bigint PRIMARY KEY, n bigint NOT NULL)")
                .await?;
        }
        src.execute("INSERT INTO gb_move_marker VALUES ($1, 0) ON CONFLICT DO NOTHING", &[&m.id]).await?;
        Ok(tables)
    }

    async fn marked_full(&self, m: &Move, table: &str) -> Result<bool> {
        let r = self
            .catalog
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM gb_move_identity WHERE move = $1 AND table_name = $2)",
                &[&m.id, &table],
            )
            .await?;
        Ok(r.get(0))
    }

    async fn mark_full(&self, m: &Move, table: &str) -> Result<()> {
        self.catalog
            .execute("INSERT INTO gb_move_identity VALUES ($1, $2) ON CONFLICT DO NOTHING", &[&m.id, &table])
            .await?;
        Ok(())
    }

    /// `pg_dump --schema-only` of one table from the source, into the target.
    async fn copy_schema(&self, source: &str, target: &str, schema: &str, name: &str) -> Result<()> {
        let (s, t) = (self.node_addr(source)?, self.node_addr(target)?);
        let table = format!("{}.{}", quote_ident(schema), quote_ident(name));
        copy_schema(&s, &t, &["-t", &table]).await.with_context(|| format!("creating {table} on {target}"))
    }

    /// The publication on the source (after which its slot is made) and the subscription on the target.
    async fn subscribe(&self, src: &Client, dst: &Client, m: &Move, tables: &[Table]) -> Result<()> {
        let name = resource(m.id);
        let exists: bool =
            dst.query_one("SELECT EXISTS (SELECT 1 FROM pg_subscription WHERE subname = $1)", &[&name]).await?.get(0);
        if exists {
            return Ok(()); // resumed
        }
        let level: String = src.query_one("SHOW wal_level", &[]).await?.get(0);
        if level != "logical" {
            bail!(
                "node {} has wal_level={level}; moves use logical replication: set wal_level=logical and restart it",
                m.source
            );
        }
        // Rows of the unit left on the target by an earlier, aborted move would collide with the copy.
        for t in tables {
            dst.batch_execute(&format!("DELETE FROM {} WHERE {}", t.name, self.cond_of(&m.unit, t))).await?;
        }
        self.check_keys(src, dst, m, tables).await?;
        let published: bool =
            src.query_one("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)", &[&name]).await?.get(0);
        if !published {
            let list: Vec<String> = tables
                .iter()
                .map(|t| match self.cond_of(&m.unit, t) {
                    cond if cond == "true" => t.name.clone(),
                    cond => format!("{} WHERE ({cond})", t.name),
                })
                .collect();
            src.batch_execute(&format!("CREATE PUBLICATION {name} FOR TABLE {}, gb_move_marker", list.join(", ")))
                .await
                .context("creating the publication on the source")?;
        }
        let mut source = self.node_addr(&m.source)?;
        if let Some(db) = self.database(&m.unit) {
            source.dbname = Some(db);
        }
        let create_slot = if let Some(mut patroni) = self.patroni(&m.source) {
            // Patroni drops replication slots it does not know: the slot is registered as a permanent slot
            // first (after the publication), made, and kept only once Patroni has seen it.
            let db = source.dbname.clone().unwrap_or_else(|| "postgres".into());
            patroni.register_slot(&name, &db).await?;
            for attempt in 0.. {
                src.execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput') WHERE NOT EXISTS \
                     (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                    &[&name],
                )
                .await
                .context("creating the replication slot")?;
                tokio::time::sleep(patroni.loop_wait + Duration::from_secs(1)).await;
                let kept: bool = src
                    .query_one("SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)", &[&name])
                    .await?
                    .get(0);
                if kept {
                    break;
                }
                if attempt == 3 {
                    bail!("Patroni keeps dropping the move's replication slot {name} (is the slots config applied?)");
                }
            }
            false
        } else {
            // A slot left by a crash between its creation and the subscription's: drop it, the subscription
            // makes its own.
            src.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                &[&name],
            )
            .await?;
            true
        };
        dst.batch_execute(&format!(
            "CREATE SUBSCRIPTION {name} CONNECTION {} PUBLICATION {name} WITH (slot_name = {name}, create_slot = {create_slot})",
            quote_literal_sql(&conninfo(&source))
        ))
        .await
        .context("creating the subscription on the target")?;
        Ok(())
    }

    /// The Patroni cluster of a node (`shard-node-<name>-patroni`), if it has one.
    fn patroni(&self, node: &str) -> Option<Patroni> {
        let urls = self.config.node_patroni.get(node).filter(|u| !u.is_empty())?;
        let ca = self.config.failover.patroni_ca_file.clone();
        Some(Patroni { urls: urls.clone(), ca, loop_wait: Duration::from_secs(10) })
    }

    /// Waits for the subscription's initial copy of every table, showing rows copied against the source's.
    async fn wait_copied(&self, src: &Client, dst: &Client, m: &Move, tables: &[Table]) -> Result<()> {
        let count_sql = tables
            .iter()
            .map(|t| format!("(SELECT count(*) FROM {} WHERE {})", t.name, self.cond_of(&m.unit, t)))
            .collect::<Vec<_>>()
            .join(" + ");
        let count = format!("SELECT ({count_sql})::bigint");
        let total: i64 = src.query_one(&count, &[]).await?.get(0);
        self.progress.stage("copy", Some(total.max(0) as u64));
        let started = Instant::now();
        loop {
            let pending: i64 = dst
                .query_one(
                    "SELECT count(*) FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid \
                     WHERE s.subname = $1 AND r.srsubstate NOT IN ('r', 's')",
                    &[&resource(m.id)],
                )
                .await?
                .get(0);
            let copied: i64 = dst.query_one(&count, &[]).await?.get(0);
            self.progress.set(copied.max(0) as u64, format!("{} tables left", pending));
            replication_errors(dst, m).await?;
            if pending == 0 {
                break;
            }
            if started.elapsed() > Duration::from_secs(3600 * 24) {
                bail!("the initial copy has not finished in a day");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Before the copy: for tables whose primary key is one column other than the shard key (ids from each
    /// node's own sequence, say), no key of the unit may exist on the target already, or the copy would fail
    /// on it for ever. Checked by chunks of 10,000 keys.
    async fn check_keys(&self, src: &Client, dst: &Client, m: &Move, tables: &[Table]) -> Result<()> {
        if matches!(m.unit, Unit::Tenant(_)) {
            return Ok(()); // a new database on the target: nothing to collide with
        }
        for t in tables {
            let cond = self.cond_of(&m.unit, t);
            let pk = src
                .query_opt(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_index i \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                     WHERE i.indrelid = $1::text::regclass AND i.indisprimary AND i.indnatts = 1",
                    &[&t.name],
                )
                .await?;
            let Some(pk) = pk else { continue };
            let (col, ty): (String, String) = (pk.get(0), pk.get(1));
            if col == t.key {
                continue;
            }
            let col = quote_ident(&col);
            let mut after: Option<String> = None;
            loop {
                let keys: Vec<String> = src
                    .query(
                        &format!(
                            "SELECT {col}::text FROM {} WHERE {cond} AND ($1::text IS NULL OR {col} > $1::text::{ty}) ORDER BY {col} LIMIT 10000",
                            t.name
                        ),
                        &[&after],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let Some(last) = keys.last().cloned() else { break };
                let clash = dst
                    .query_one(
                        &format!(
                            "SELECT count(*), min({col}::text) FROM {} WHERE {col} = ANY($1::text[]::{ty}[])",
                            t.name
                        ),
                        &[&keys],
                    )
                    .await?;
                let n: i64 = clash.get(0);
                if n > 0 {
                    let example: Option<String> = clash.get(1);
                    bail!(
                        "{}: keys of {} already exist on {} ({col} = {}, and more): its primary key {col} does not include {} and its values are not unique across nodes (a sequence on each node?); give the table a key that includes {}, or ids unique across nodes (uuid, or per-node sequence ranges)",
                        t.name,
                        m.unit,
                        m.target,
                        example.unwrap_or_default(),
                        t.key,
                        t.key
                    );
                }
                after = Some(last);
            }
        }
        Ok(())
    }

    /// Waits until the source's replication slot for the move is within `rebalance-cutover-lag-bytes`.
    async fn catch_up(&self, src: &Client, dst: &Client, m: &Move) -> Result<()> {
        let limit = self.config.rebalance.cutover_lag_bytes as i64;
        self.progress.stage("catch-up", None);
        loop {
            let row = src
                .query_opt(
                    "SELECT (pg_current_wal_lsn() - coalesce(r.flush_lsn, s.confirmed_flush_lsn))::bigint \
                     FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
                     WHERE s.slot_name = $1",
                    &[&resource(m.id)],
                )
                .await?;
            let Some(row) = row else { bail!("the move's replication slot is gone from the source") };
            replication_errors(dst, m).await?;
            let lag: Option<i64> = row.get(0);
            let lag = lag.unwrap_or(i64::MAX);
            self.progress.set(0, format!("lag {lag} bytes (cutover under {limit})"));
            if lag <= limit {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Freeze, guard, drain, verify, flip. An error leaves the unit frozen and guarded: the caller rolls back.
    async fn cutover(&self, src: &Client, dst: &Client, m: &mut Move, tables: &[Table]) -> Result<()> {
        let budget = Duration::from_millis(self.config.rebalance.max_freeze_ms);
        self.progress.stage("cutover", None);
        let frozen_at = Instant::now();
        let freeze = format!(
            "INSERT INTO gb_units (unit, node, frozen) VALUES ($1, {}, true) ON CONFLICT (unit) DO UPDATE SET frozen = true",
            quote_literal_sql(&m.source)
        );
        let version = self.bump(&freeze, &m.unit).await?;
        // 1. Every live router has applied the freeze: new statements for the unit wait in the routers.
        loop {
            let late: Vec<String> = self
                .catalog
                .query(
                    "SELECT id FROM gb_routers WHERE version < $1 AND seen > now() - make_interval(secs => $2)",
                    &[&(version as i64), &(ROUTER_LIVE_S as f64)],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if late.is_empty() {
                break;
            }
            if frozen_at.elapsed() > budget {
                bail!("routers did not acknowledge the freeze within rebalance-max-freeze-ms: {}", late.join(", "));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.progress.set(0, format!("routers hold {} ({:?})", m.unit, frozen_at.elapsed()));
        // 2. The guard: creating the triggers waits for the transactions that wrote these tables; after it,
        //    no write to the unit can land on the source.
        let left = budget.saturating_sub(frozen_at.elapsed()).max(Duration::from_millis(1));
        self.guard(src, m, tables, left).await?;
        // 3. The marker, written after the guard, reaches the target: so has every write before it.
        let n: i64 =
            src.query_one("UPDATE gb_move_marker SET n = n + 1 WHERE id = $1 RETURNING n", &[&m.id]).await?.get(0);
        loop {
            let seen: Option<i64> =
                dst.query_opt("SELECT n FROM gb_move_marker WHERE id = $1", &[&m.id]).await?.map(|r| r.get(0));
            if seen.is_some_and(|s| s >= n) {
                break;
            }
            if frozen_at.elapsed() > budget {
                let errors = dst
                    .query_opt(
                        "SELECT apply_error_count, sync_error_count FROM pg_stat_subscription_stats WHERE subname = $1",
                        &[&resource(m.id)],
                    )
                    .await?
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
                    .unwrap_or_default();
                bail!(
                    "the target did not catch up within rebalance-max-freeze-ms (the subscription's apply errors: {}, copy errors: {}; the target's server log tells why)",
                    errors.0,
                    errors.1
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // 4. Sequences are not replicated: the target's take the source's values before it gets writes.
        self.raise_sequences(src, dst, tables, matches!(m.unit, Unit::Tenant(_))).await?;
        // 5. The same rows on both sides.
        let rows = self.verify_with(src, dst, &m.unit, tables).await?;
        if frozen_at.elapsed() > budget {
            bail!("the freeze lasted longer than rebalance-max-freeze-ms ({} ms)", budget.as_millis());
        }
        // 6. Flip and thaw.
        let target = m.target.clone();
        let tx_sql =
            format!("UPDATE gb_units SET node = {}, frozen = false WHERE unit = $1", quote_literal_sql(&target));
        self.bump(&tx_sql, &m.unit).await?;
        let freeze_ms = frozen_at.elapsed().as_millis() as i64;
        self.catalog
            .execute("UPDATE gb_moves SET freeze_ms = $2, rows_moved = $3 WHERE id = $1", &[&m.id, &freeze_ms, &rows])
            .await?;
        self.progress.set(0, format!("{} is on {target}; frozen {freeze_ms} ms", m.unit));
        Ok(())
    }

    /// Runs `sql` (with the unit as $1) and raises the catalog's version in one transaction, then NOTIFY;
    /// returns the new version.
    async fn bump(&self, sql: &str, unit: &Unit) -> Result<u64> {
        self.catalog.batch_execute("BEGIN").await?;
        let r = async {
            self.catalog.execute(sql, &[&unit.to_string()]).await?;
            let v: i64 = self
                .catalog
                .query_one("UPDATE gb_catalog SET version = version + 1 RETURNING version", &[])
                .await?
                .get(0);
            self.catalog.batch_execute(&format!("NOTIFY {CHANNEL}, '{v}'")).await?;
            Ok::<_, tokio_postgres::Error>(v)
        }
        .await;
        match r {
            Ok(v) => {
                self.catalog.batch_execute("COMMIT").await?;
                Ok(v as u64)
            }
            Err(e) => {
                self.catalog.batch_execute("ROLLBACK").await.ok();
                Err(e.into())
            }
        }
    }

    /// The guard triggers on the source: writes to the unit's rows are refused there (SQLSTATE 55R01).
    async fn guard(&self, src: &Client, m: &Move, tables: &[Table], lock_timeout: Duration) -> Result<()> {
        let name = format!("gb_guard_{}", m.id);
        let mut sql = format!("BEGIN; SET LOCAL lock_timeout = {}; ", lock_timeout.as_millis());
        // One function per key column (tables keyed by `shard-table-<table>` columns read theirs).
        let mut functions: Vec<&str> = Vec::new();
        for t in tables {
            if functions.contains(&t.key.as_str()) {
                continue;
            }
            functions.push(&t.key);
            let key = quote_ident(&t.key);
            let on = |row: &str| self.condition_on(&m.unit, &format!("{row}.{key}"));
            sql.push_str(&format!(
                "CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS $g$ BEGIN \
                   IF (TG_OP <> 'DELETE' AND {new}) OR (TG_OP <> 'INSERT' AND {old}) THEN \
                     RAISE EXCEPTION '{unit} has moved from this node to {target} (move {id}): this router''s shard map is stale' \
                       USING ERRCODE = '55R01'; \
                   END IF; \
                   IF TG_OP = 'DELETE' THEN RETURN OLD; END IF; RETURN NEW; END $g$; ",
                f = self.guard_function(m, &t.key),
                new = on("NEW"),
                old = on("OLD"),
                unit = m.unit,
                target = m.target.replace('\'', "''"),
                id = m.id
            ));
        }
        for t in tables {
            sql.push_str(&format!(
                "DROP TRIGGER IF EXISTS {name} ON {t}; CREATE TRIGGER {name} BEFORE INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE FUNCTION {f}(); ",
                t = t.name,
                f = self.guard_function(m, &t.key)
            ));
        }
        sql.push_str("COMMIT;");
        if let Err(e) = src.batch_execute(&sql).await {
            src.batch_execute("ROLLBACK").await.ok();
            return Err(e).context("installing the guard on the source");
        }
        Ok(())
    }

    /// The guard's trigger function for tables keyed by `key`: `gb_guard_<move>` for `shard-key`,
    /// `gb_guard_<move>_<column>` for another column.
    fn guard_function(&self, m: &Move, key: &str) -> String {
        if key == self.map.key {
            format!("gb_guard_{}", m.id)
        } else {
            quote_ident(&format!("gb_guard_{}_{key}", m.id))
        }
    }

    async fn unguard(&self, src: &Client, m: &Move, tables: &[Table]) -> Result<()> {
        let name = format!("gb_guard_{}", m.id);
        let mut sql = String::new();
        for t in tables {
            sql.push_str(&format!("DROP TRIGGER IF EXISTS {name} ON {}; ", t.name));
        }
        sql.push_str(&format!("DROP FUNCTION IF EXISTS {name}(); "));
        for t in tables {
            if t.key != self.map.key {
                sql.push_str(&format!("DROP FUNCTION IF EXISTS {}(); ", self.guard_function(m, &t.key)));
            }
        }
        src.batch_execute(&sql).await?;
        Ok(())
    }

    /// Rows and a checksum of the unit in every table, on both sides; the number of rows.
    async fn verify_with(&self, src: &Client, dst: &Client, unit: &Unit, tables: &[Table]) -> Result<i64> {
        let mut rows = 0;
        for t in tables {
            let cond = self.condition_on(unit, &format!("x.{}", quote_ident(&t.key)));
            let sql = format!(
                "SELECT count(*), coalesce(sum(hashtextextended(x::text, 0)::numeric), 0)::text FROM {} x WHERE {cond}",
                t.name
            );
            let a = src.query_one(&sql, &[]).await?;
            let b = dst.query_one(&sql, &[]).await?;
            let (na, ca): (i64, String) = (a.get(0), a.get(1));
            let (nb, cb): (i64, String) = (b.get(0), b.get(1));
            if na != nb || ca != cb {
                bail!("{} differs: {na} rows on the source, {nb} on the target (checksums {ca} / {cb})", t.name);
            }
            rows += na;
        }
        Ok(rows)
    }

    /// `rebalance verify UNIT`: the unit's rows on its owner against any other node that has rows of it.
    pub async fn verify(&self, unit: &str) -> Result<Verified, MoveError> {
        let unit: Unit = unit.parse().map_err(MoveError::Invalid)?;
        shard_catalog::load(&self.catalog, &self.map).await?;
        let owner = self.owner(&unit).await?;
        let db = self.database(&unit);
        let mut nodes = Vec::new();
        for n in &self.map.nodes {
            let admin = self.node(&n.name).await?;
            // A tenant: its database, where there is one.
            let c = match &db {
                Some(db) => {
                    let there: bool = admin
                        .query_one("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", &[db])
                        .await?
                        .get(0);
                    if !there {
                        nodes.push(VerifiedNode { node: n.name.clone(), owner: n.name == owner, rows: None });
                        continue;
                    }
                    self.node_in(&n.name, Some(db)).await?
                }
                None => admin,
            };
            let mut total = 0i64;
            for (t, key) in self.table_names(&c, db.is_some()).await? {
                let cond = self.condition_on(&unit, &quote_ident(&key));
                total += c.query_one(&format!("SELECT count(*) FROM {t} WHERE {cond}"), &[]).await?.get::<_, i64>(0);
            }
            nodes.push(VerifiedNode { node: n.name.clone(), owner: n.name == owner, rows: Some(total) });
        }
        Ok(Verified { unit: unit.to_string(), owner, nodes })
    }

    /// The tables that hold a unit's rows, with their key columns: those with their shard key, or (`whole`,
    /// a tenant's database) all.
    async fn table_names(&self, c: &Client, whole: bool) -> Result<Vec<(String, String)>> {
        let (key_tables, key_columns) = self.table_key_arrays();
        let rows = c
            .query(
                "SELECT format('%I.%I', n.nspname, c.relname), k.key FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, \
                   LATERAL (SELECT coalesce((SELECT tk.k FROM unnest($3::text[], $4::text[]) AS tk(t, k) WHERE tk.t = c.relname), $1) AS key) k \
                 WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND c.relname <> 'gb_move_marker' \
                   AND ($2 OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = k.key AND NOT a.attisdropped))",
                &[&self.map.key, &whole, &key_tables, &key_columns],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Drops what replicated the unit: subscription, slot, publication; restores replica identities; and
    /// with `moved`, deletes the unit's rows from the source after the grace period (a tenant's database is
    /// dropped whole by the caller).
    async fn clean_up(&self, src: &Client, dst: &Client, m: &Move, tables: &[Table], moved: bool) -> Result<()> {
        self.progress.stage("cleanup", None);
        let name = resource(m.id);
        let sub: bool =
            dst.query_one("SELECT EXISTS (SELECT 1 FROM pg_subscription WHERE subname = $1)", &[&name]).await?.get(0);
        if sub {
            dst.batch_execute(&format!("DROP SUBSCRIPTION {name}")).await.context("dropping the subscription")?;
        }
        self.drop_slot(src, m).await?;
        drop_publication(src, &name).await?;
        for t in tables.iter().filter(|t| t.identity_full) {
            src.batch_execute(&format!("ALTER TABLE {} REPLICA IDENTITY DEFAULT", t.name)).await?;
        }
        // One move at a time: the marker table goes with the move.
        for c in [src, dst] {
            c.batch_execute("DROP TABLE IF EXISTS gb_move_marker").await?;
        }
        if moved {
            if matches!(m.unit, Unit::Tenant(_)) {
                return Ok(()); // the database is dropped whole (see `drive`)
            }
            let grace = self.config.rebalance.grace_s;
            if grace > 0 {
                self.progress.set(0, format!("rows stay on {} for rebalance-grace-s = {grace} s", m.source));
                tokio::time::sleep(Duration::from_secs(grace)).await;
            }
            self.delete_from_source(src, m, tables).await?;
        }
        Ok(())
    }

    /// Drops the move's slot on the source. It goes with the subscription; one left behind (the source was
    /// unreachable then) is dropped here, so that no slot holds WAL on the source for ever. Under Patroni
    /// the permanent slot is unregistered first, and dropped again if Patroni made it anew in between.
    async fn drop_slot(&self, src: &Client, m: &Move) -> Result<()> {
        let name = resource(m.id);
        if let Some(mut patroni) = self.patroni(&m.source) {
            patroni.unregister_slot(&name).await?;
            tokio::time::sleep(patroni.loop_wait + Duration::from_secs(1)).await;
        }
        src.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .context("dropping the replication slot")?;
        Ok(())
    }

    /// Rows copied keep their ids; the target's sequences for the same tables are raised to at least the
    /// source's, so that ids it hands out next do not collide with moved rows.
    async fn raise_sequences(&self, src: &Client, dst: &Client, tables: &[Table], whole: bool) -> Result<()> {
        if whole {
            // A tenant's database: every sequence continues on the target where it stood on the source.
            let seqs = src
                .query(
                    "SELECT format('%I.%I', schemaname, sequencename), last_value FROM pg_sequences WHERE last_value IS NOT NULL",
                    &[],
                )
                .await?;
            for r in seqs {
                let (seq, last): (String, i64) = (r.get(0), r.get(1));
                dst.execute("SELECT setval($1::text::regclass, $2)", &[&seq, &last])
                    .await
                    .with_context(|| format!("setting {seq} on the target"))?;
            }
            return Ok(());
        }
        let seq_sql = "SELECT s.oid::regclass::text, (SELECT last_value FROM pg_sequences q WHERE q.schemaname = n.nspname AND q.sequencename = s.relname) \
                       FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' \
                       JOIN pg_namespace n ON n.oid = s.relnamespace \
                       WHERE d.refobjid = $1::text::regclass AND d.deptype IN ('a', 'i')";
        for t in tables {
            for r in src.query(seq_sql, &[&t.name]).await? {
                let (seq, last): (String, Option<i64>) = (r.get(0), r.get(1));
                if let Some(last) = last {
                    dst.execute(
                        "SELECT setval($1::text::regclass, greatest($2, (SELECT coalesce(last_value, 1) FROM pg_sequences WHERE format('%I.%I', schemaname, sequencename)::regclass = $1::text::regclass)))",
                        &[&seq, &last],
                    )
                    .await
                    .with_context(|| format!("raising {seq} on the target"))?;
                }
            }
        }
        Ok(())
    }

    /// Deletes the unit's rows from the source in batches (past the guard: as a replica session would).
    async fn delete_from_source(&self, src: &Client, m: &Move, tables: &[Table]) -> Result<()> {
        src.batch_execute("SET session_replication_role = replica").await?;
        let mut deleted = 0u64;
        for t in tables {
            let cond = self.cond_of(&m.unit, t);
            loop {
                let n = src
                    .execute(
                        &format!(
                            "DELETE FROM {t} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {t} WHERE {cond} LIMIT 10000))",
                            t = t.name
                        ),
                        &[],
                    )
                    .await?;
                deleted += n;
                self.progress.set(0, format!("deleted {deleted} rows of {} from {}", m.unit, m.source));
                if n == 0 {
                    break;
                }
            }
        }
        src.batch_execute("RESET session_replication_role").await?;
        Ok(())
    }

    /// Undoes a move that has not flipped: guard dropped, unit thawed, replication dropped, the target's
    /// copy deleted. Idempotent (a crash in the middle is rolled back by `abort` again).
    async fn roll_back(&self, m: &mut Move, why: &str) -> Result<(), MoveError> {
        let db = self.database(&m.unit);
        let src = self.node_in(&m.source, db.as_deref()).await?;
        let dst = match self.node_in(&m.target, db.as_deref()).await {
            Ok(c) => Some(c),
            Err(_) if db.is_some() => None, // the tenant's database was never made on the target
            Err(e) => return Err(e),
        };
        let tables = match &dst {
            Some(dst) => self.tables(&src, dst, m).await?,
            None => Vec::new(),
        };
        self.unguard(&src, m, &tables).await?;
        self.bump("UPDATE gb_units SET frozen = false WHERE unit = $1", &m.unit).await?;
        if let Some(dst) = dst {
            self.clean_up(&src, &dst, m, &tables, false).await?;
            for t in &tables {
                dst.batch_execute(&format!("DELETE FROM {} WHERE {}", t.name, self.cond_of(&m.unit, t))).await?;
            }
            if let Some(db) = &db {
                let created: bool =
                    self.catalog.query_one("SELECT created_target FROM gb_moves WHERE id = $1", &[&m.id]).await?.get(0);
                drop(dst);
                if created {
                    self.node(&m.target)
                        .await?
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(db)))
                        .await?;
                }
            }
        } else {
            // Nothing on the target: the publication and its slot are all there is to drop.
            self.drop_slot(&src, m).await?;
            drop_publication(&src, &resource(m.id)).await?;
        }
        self.catalog
            .execute(
                "UPDATE gb_moves SET state = 'aborted', finished = now(), updated = now(), error = $2 WHERE id = $1",
                &[&m.id, &why],
            )
            .await
            .context("catalog")?;
        m.state = "aborted".into();
        self.progress.finish();
        Ok(())
    }
}

/// How many errors the move's subscription may meet before the move gives up. Its workers retry every 5 s
/// (`wal_retrieve_retry_interval`) for ever: a passing error (a table's copy slot dropped under it by
/// Patroni while it re-reads its slots, a connection lost) is retried, a lasting one (a duplicate key, a
/// missing column) comes back every time.
const REPLICATION_ERRORS: i64 = 5;

/// How long `resume` and `abort` try the catalog's rebalancer lock before another rebalancer is said to hold
/// it (see [`Rebalancer::recovering`]).
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether and how a rebalancer takes the one-rebalancer lock.
enum Lock {
    /// Not at all (reading).
    No,
    /// At once, or another rebalancer runs.
    Now,
    /// Tried for this long.
    Within(std::time::Duration),
}

/// Fails when the move's subscription has met errors [`REPLICATION_ERRORS`] times: the cause is in the
/// target's server log.
async fn replication_errors(dst: &Client, m: &Move) -> Result<()> {
    let row = dst
        .query_opt(
            "SELECT apply_error_count, sync_error_count FROM pg_stat_subscription_stats WHERE subname = $1",
            &[&resource(m.id)],
        )
        .await?;
    if let Some(r) = row {
        let (apply, sync): (i64, i64) = (r.get(0), r.get(1));
        if apply + sync >= REPLICATION_ERRORS {
            bail!(
                "replication to {} failed ({sync} errors copying tables, {apply} applying changes; the target's server log says why)",
                m.target
            );
        }
    }
    Ok(())
}

/// A node's Patroni REST API: registering a move's slot as a permanent slot (`PATCH /config`), so that
/// Patroni keeps it (and copies it to its replicas) instead of dropping it as unknown.
struct Patroni {
    urls: Vec<String>,
    /// `patroni-ca-file`, for https:// URLs.
    ca: Option<std::path::PathBuf>,
    /// Patroni's `loop_wait` (read from `GET /config`): how long a change of its config takes to apply.
    loop_wait: Duration,
}

impl Patroni {
    async fn patch(&mut self, body: serde_json::Value) -> Result<()> {
        let http = crate::http_client(self.ca.as_deref(), Duration::from_secs(5))?;
        let mut last = String::new();
        for url in &self.urls {
            let url = url.trim_end_matches('/');
            if let Ok(r) = http.get(format!("{url}/config")).send().await {
                if let Ok(v) = r.text().await.map(|t| serde_json::from_str::<serde_json::Value>(&t)) {
                    if let Some(w) = v.ok().and_then(|v| v["loop_wait"].as_u64()) {
                        self.loop_wait = Duration::from_secs(w);
                    }
                }
            }
            match http
                .patch(format!("{url}/config"))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => last = format!("{url}: {} {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        bail!("Patroni's PATCH /config failed: {last}")
    }

    async fn register_slot(&mut self, name: &str, database: &str) -> Result<()> {
        self.patch(
            serde_json::json!({ "slots": { name: { "type": "logical", "database": database, "plugin": "pgoutput" } } }),
        )
        .await
        .with_context(|| format!("registering {name} as a Patroni permanent slot"))
    }

    async fn unregister_slot(&mut self, name: &str) -> Result<()> {
        self.patch(serde_json::json!({ "slots": { name: null } }))
            .await
            .with_context(|| format!("removing {name} from Patroni's permanent slots"))
    }
}

/// `pg_dump --schema-only` from `source` (with `args`), run by `psql` on `target`: pg_dump's output may
/// hold psql meta-commands (`\restrict`), so it is not sent as plain SQL.
async fn copy_schema(source: &NodeAddr, target: &NodeAddr, args: &[&str]) -> Result<()> {
    let dump = tokio::process::Command::new("pg_dump")
        .args(["--schema-only", "--no-owner", "--no-privileges", "--no-publications", "--no-subscriptions"])
        .args(args)
        .arg(conninfo(source))
        .output()
        .await
        .context("pg_dump (apt-get install postgresql-client)")?;
    if !dump.status.success() {
        bail!("pg_dump: {}", String::from_utf8_lossy(&dump.stderr));
    }
    let mut psql = tokio::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(conninfo(target))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("psql (apt-get install postgresql-client)")?;
    let mut stdin = psql.stdin.take().expect("piped");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, &dump.stdout).await?;
    drop(stdin);
    let out = psql.wait_with_output().await?;
    if !out.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// `rebalance verify UNIT`: the unit's rows on every node.
#[derive(Debug, Serialize)]
pub struct Verified {
    pub unit: String,
    pub owner: String,
    pub nodes: Vec<VerifiedNode>,
}

#[derive(Debug, Serialize)]
pub struct VerifiedNode {
    pub node: String,
    pub owner: bool,
    /// `None`: the tenant has no database there.
    pub rows: Option<i64>,
}

impl Verified {
    /// Whether the unit's rows are on its owner only.
    pub fn clean(&self) -> bool {
        self.nodes.iter().all(|n| n.owner || n.rows.unwrap_or(0) == 0)
    }

    pub fn to_text(&self) -> String {
        let mut out = format!("{} (owner: {})\n", self.unit, self.owner);
        for n in &self.nodes {
            let rows = n.rows.map_or("no database".to_string(), |r| format!("{r} rows"));
            out.push_str(&format!("  {}: {rows}{}\n", n.node, if n.owner { " (owner)" } else { "" }));
        }
        if !self.clean() {
            out.push_str("rows of the unit are on a node that does not own it (a move's leftovers?)\n");
        }
        out
    }
}

/// `rebalance status` (read without the rebalancer's lock: it works while a move runs).
#[derive(Debug, Serialize)]
pub struct Status {
    pub version: i64,
    /// Units frozen by a cutover now.
    pub frozen: Vec<String>,
    /// Units placed elsewhere than config.csv places them, with their node.
    pub moved: Vec<(String, String)>,
    pub routers: Vec<RouterRow>,
    /// The unfinished move first, then the last finished ones.
    pub moves: Vec<MoveRow>,
}

#[derive(Debug, Serialize)]
pub struct RouterRow {
    pub id: String,
    pub addr: String,
    pub version: i64,
    pub seen_s_ago: f64,
    pub live: bool,
}

#[derive(Debug, Serialize)]
pub struct MoveRow {
    pub id: i64,
    pub unit: String,
    pub source: String,
    pub target: String,
    pub state: String,
    pub started: String,
    pub finished: Option<String>,
    pub freeze_ms: Option<i64>,
    pub rows: Option<i64>,
    pub error: Option<String>,
}

pub async fn status(config: &Config) -> Result<Status, MoveError> {
    let map = ShardMap::new(config).map_err(MoveError::Invalid)?;
    let Some(addr) = shardmap::catalog::address(config).map_err(MoveError::Invalid)? else {
        return Err(MoveError::Invalid("there is no catalog (moves need shard-algorithm,hash-buckets)".into()));
    };
    let c = shard_catalog::ensure(&addr, &map, "rebalance status").await?;
    let version: i64 = c.query_one("SELECT version FROM gb_catalog", &[]).await?.get(0);
    let frozen = c.query("SELECT unit FROM gb_units WHERE frozen ORDER BY unit", &[]).await?;
    let mut moved = Vec::new();
    if map.bucket_count().is_some() {
        for r in c.query("SELECT unit, node FROM gb_units WHERE unit LIKE 'bucket:%'", &[]).await? {
            let (unit, node): (String, String) = (r.get(0), r.get(1));
            if let Ok(Unit::Bucket(b)) = unit.parse::<Unit>() {
                let configured = map.node(shardmap::ShardId((b % map.nodes.len() as u32) as u16)).name.clone();
                if configured != node {
                    moved.push((unit, node));
                }
            }
        }
    }
    // Tenants and range pieces are in the catalog only once a move placed them.
    for r in c.query("SELECT unit, node FROM gb_units WHERE unit NOT LIKE 'bucket:%'", &[]).await? {
        moved.push((r.get(0), r.get(1)));
    }
    moved.sort();
    let routers = c
        .query(
            "SELECT id, addr, version, extract(epoch FROM now() - seen)::float8, seen > now() - make_interval(secs => $1) \
             FROM gb_routers WHERE seen > now() - interval '1 day' ORDER BY seen DESC",
            &[&(ROUTER_LIVE_S as f64)],
        )
        .await?
        .iter()
        .map(|r| RouterRow { id: r.get(0), addr: r.get(1), version: r.get(2), seen_s_ago: r.get(3), live: r.get(4) })
        .collect();
    let moves = c
        .query(
            "SELECT id, unit, source, target, state, started::text, finished::text, freeze_ms, rows_moved, error \
             FROM gb_moves ORDER BY finished IS NULL DESC, id DESC LIMIT 10",
            &[],
        )
        .await?
        .iter()
        .map(|r| MoveRow {
            id: r.get(0),
            unit: r.get(1),
            source: r.get(2),
            target: r.get(3),
            state: r.get(4),
            started: r.get(5),
            finished: r.get(6),
            freeze_ms: r.get(7),
            rows: r.get(8),
            error: r.get(9),
        })
        .collect();
    Ok(Status { version, frozen: frozen.iter().map(|r| r.get(0)).collect(), moved, routers, moves })
}

/// `status` for a terminal.
pub fn status_text(s: &Status) -> String {
    let mut out = format!("catalog version {}\n", s.version);
    out.push_str(&format!("frozen: {}\n", if s.frozen.is_empty() { "none".to_string() } else { s.frozen.join(", ") }));
    out.push_str(&format!("units moved from their config.csv node: {}\n", s.moved.len()));
    for (u, n) in &s.moved {
        out.push_str(&format!("  {u} on {n}\n"));
    }
    out.push_str("routers:\n");
    for r in &s.routers {
        out.push_str(&format!(
            "  {} {} version {} seen {:.1} s ago{}\n",
            r.id,
            r.addr,
            r.version,
            r.seen_s_ago,
            if r.live { "" } else { " (not live)" }
        ));
    }
    out.push_str("moves:\n");
    for m in &s.moves {
        out.push_str(&format!(
            "  #{} {} {} -> {}: {}{}{}{}\n",
            m.id,
            m.unit,
            m.source,
            m.target,
            m.state,
            m.rows.map(|r| format!(", {r} rows")).unwrap_or_default(),
            m.freeze_ms.map(|f| format!(", frozen {f} ms")).unwrap_or_default(),
            m.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
        ));
    }
    out
}

/// Drops a move's publication. A statement writing a published table reads the table's publications and then
/// looks each up: one dropped in between fails it with XX000 "cache lookup failed for publication" (seen under
/// the move test's writers). So the drop holds the published tables in SHARE mode (writers wait for the few
/// milliseconds of the drop and then see no publication; readers do not wait), taken with a short lock timeout
/// so that a long transaction writing one of them delays the drop, not every writer behind it; after a few
/// tries the publication is dropped without the lock.
async fn drop_publication(src: &Client, name: &str) -> Result<()> {
    let tables: Vec<String> = src
        .query("SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables WHERE pubname = $1", &[&name])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let drop = format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name));
    if !tables.is_empty() {
        for _ in 0..20 {
            let locked = format!(
                "BEGIN; SET LOCAL lock_timeout = '50ms'; LOCK TABLE {} IN SHARE MODE; {drop}; COMMIT",
                tables.join(", ")
            );
            match src.batch_execute(&locked).await {
                Ok(()) => return Ok(()),
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                    src.batch_execute("ROLLBACK").await?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    let _ = src.batch_execute("ROLLBACK").await;
                    return Err(e).context("dropping the publication");
                }
            }
        }
    }
    src.batch_execute(&drop).await.context("dropping the publication")?;
    Ok(())
}
