//! Recovery of transactions left prepared by two-phase commit (`frontend/commit.rs`): when the router starts
//! and every `twophase::RECOVER_EVERY`, every node's `pg_prepared_xacts` is read for the transactions routers
//! prepared (`gb_2pc_...`, in the node's database). One whose decision is recorded is committed; one without
//! a decision is left alone while its session is still deciding (this router's in-flight ones, or anyone's
//! younger than `twophase::ABORT_AFTER`), then an abort is recorded for it — unless its router recorded a
//! commit first: the decision log's primary key decides — and it is rolled back. Routers sharing a decision
//! log (a catalog) so never decide differently, whichever of them recovers. Decisions no prepared
//! transaction needs any more are deleted.

use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use shardmap::ShardId;

use crate::backend::twophase::{self, ABORT_AFTER, RECOVER_EVERY};
use crate::backend::Backends;

/// A prepared transaction of a router found on a node.
struct Found {
    shard: ShardId,
    /// The database it was prepared in (COMMIT PREPARED must run there).
    database: String,
    gid: String,
    txid: String,
    age: Duration,
}

/// Connections to the nodes' primaries, by (host, port, database), kept from round to round.
type Clients = std::collections::HashMap<(String, u16, String), tokio_postgres::Client>;

/// The recovery task: runs until the router drops `backends`.
pub async fn run(backends: Weak<Backends>) {
    let mut clients = Clients::new();
    let mut warned = false;
    loop {
        let Some(b) = backends.upgrade() else { return };
        if b.two_phase.decisions.is_none() {
            return;
        }
        if !warned {
            warned = true;
            check_settings(&b, &mut clients).await;
        }
        if let Err(e) = round(&b, &mut clients).await {
            tracing::warn!("2PC recovery: {e:#}");
        }
        drop(b);
        tokio::time::sleep(RECOVER_EVERY).await;
    }
}

/// A connection to shard `shard`'s primary, in `database` (default: the node's), as the node's user (or,
/// for a node URL without one, the first `router-user-<name>`, as clients' connections authenticate).
async fn client<'a>(
    b: &Backends,
    clients: &'a mut Clients,
    shard: ShardId,
    database: Option<&str>,
) -> Option<&'a tokio_postgres::Client> {
    let node = b.map.nodes.get(shard.0 as usize)?;
    let addr = node.addr.as_ref()?;
    let (host, port) = b.topology.current(shard)?;
    let db = database.or(addr.dbname.as_deref()).unwrap_or("postgres").to_string();
    let key = (host.clone(), port, db.clone());
    if clients.get(&key).is_none_or(|c| c.is_closed()) {
        let config = b.config.load();
        let first_user = config.router.users.iter().next();
        let (user, password) = match (&addr.user, first_user) {
            (Some(u), _) => (u.clone(), addr.password.clone()),
            (None, Some((u, p))) => (u.clone(), Some(p.clone())),
            (None, None) => ("postgres".to_string(), None),
        };
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&host)
            .port(port)
            .user(&user)
            .dbname(&db)
            .application_name("shard-router 2pc recovery")
            .connect_timeout(Duration::from_secs(3));
        if let Some(pw) = &password {
            cfg.password(pw);
        }
        let tls = shard_catalog::tls::connector(&mut cfg, &addr.params).ok()?;
        let (c, conn) = cfg.connect(tls).await.ok()?;
        tokio::spawn(conn);
        clients.insert(key.clone(), c);
    }
    clients.get(&key)
}

/// At startup: a shard that cannot prepare transactions makes every commit of a transaction that wrote to
/// several shards fail; the router says so.
async fn check_settings(b: &Backends, clients: &mut Clients) {
    for shard in b.map.all() {
        let Some(c) = client(b, clients, shard, None).await else { continue };
        if let Ok(row) = c.query_one("SELECT current_setting('max_prepared_transactions')::int", &[]).await {
            let n: i32 = row.get(0);
            if n == 0 {
                tracing::warn!(
                    "shard {} has max_prepared_transactions = 0: transactions that write to several shards will fail at COMMIT. \
                     Set max_prepared_transactions (at least max_connections) on every shard and restart it, or set shard-two-phase-commit,false",
                    b.map.node(shard).name
                );
            }
        }
    }
}

/// One look at every node.
async fn round(b: &Backends, clients: &mut Clients) -> anyhow::Result<()> {
    let decisions = b.two_phase.decisions.as_ref().expect("checked by the caller");
    let mut found = Vec::new();
    let mut complete = true;
    for shard in b.map.all() {
        let Some(c) = client(b, clients, shard, None).await else {
            complete = false;
            continue;
        };
        // (Every database of the server: clients' connections are in the database they asked for when the
        // node's URL names none.)
        let rows = c
            .query(
                "SELECT gid, database::text, extract(epoch FROM now() - prepared)::float8 \
                 FROM pg_catalog.pg_prepared_xacts WHERE gid LIKE 'gb\\_2pc\\_%'",
                &[],
            )
            .await;
        match rows {
            Ok(rows) => {
                for r in rows {
                    let gid: String = r.get(0);
                    let Some(txid) = twophase::txid_of(&gid).map(str::to_string) else { continue };
                    let age = Duration::from_secs_f64(r.get::<_, f64>(2).max(0.0));
                    found.push(Found { shard, database: r.get(1), gid, txid, age });
                }
            }
            Err(_) => complete = false,
        }
    }
    // In doubt: left by a session that is gone or past its time to decide (`/metrics`); each one this round
    // finishes is taken off below.
    let in_doubt: Vec<bool> =
        found.iter().map(|f| f.age >= twophase::DECIDE_WITHIN && !b.two_phase.in_flight(&f.txid)).collect();
    let doubtful = &b.two_phase.counters.in_doubt;
    doubtful.store(in_doubt.iter().filter(|d| **d).count() as u64, Ordering::Relaxed);
    let mut txids: Vec<String> = found.iter().map(|f| f.txid.clone()).collect();
    txids.sort();
    txids.dedup();
    let mut outcomes = decisions.outcomes(&txids).await?;
    for (f, &counted) in found.iter().zip(&in_doubt) {
        let outcome = match outcomes.get(&f.txid) {
            Some(o) => *o,
            None if b.two_phase.in_flight(&f.txid) || f.age < ABORT_AFTER => continue,
            None => {
                let o = decisions.abort(&f.txid, &b.two_phase.router).await?;
                outcomes.insert(f.txid.clone(), o);
                o
            }
        };
        if b.two_phase.in_flight(&f.txid) {
            // Its session finishes it.
            continue;
        }
        let Some(c) = client(b, clients, f.shard, Some(&f.database)).await else { continue };
        let sql = format!("{} PREPARED '{}'", if outcome { "COMMIT" } else { "ROLLBACK" }, f.gid);
        let finished = || {
            if counted {
                let _ = doubtful.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            }
        };
        match c.batch_execute(&sql).await {
            Ok(()) => {
                finished();
                let counter = if outcome {
                    &b.two_phase.counters.recovered_commit
                } else {
                    &b.two_phase.counters.recovered_abort
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::info!(gid = %f.gid, "2PC recovery: {}", if outcome { "committed" } else { "rolled back" });
            }
            // Finished in between by its session or another router.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) => finished(),
            Err(e) => tracing::warn!(gid = %f.gid, "2PC recovery: {sql}: {e}"),
        }
    }
    let done = b.two_phase.take_done();
    if !done.is_empty() {
        if let Err(e) = decisions.forget(&done).await {
            tracing::debug!("2PC: forgetting decisions: {e:#}");
        }
    }
    if complete {
        decisions.prune(&txids, Duration::from_secs(60), Duration::from_secs(600)).await?;
    }
    Ok(())
}
