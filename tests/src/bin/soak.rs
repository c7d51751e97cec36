//! The soak test (`bash scripts/soak.sh`; docs/testing.md, "Soak test"): thousands of clients through the real
//! `shard-router` binary for minutes, on two shards — shard 0 a Patroni cluster (etcd, two PostgreSQL
//! nodes), shard 1 a plain PostgreSQL — while clients disconnect at random in the middle of statements and
//! transactions. The time is cut into rounds; in each, shard 1 is killed (`pg_ctl stop -m immediate`) and
//! started again, and shard 0 is switched over by Patroni. Then it checks what a long-running proxy must get
//! right:
//! - every error a client saw was a clean one (an ErrorResponse with a SQLSTATE), never a connection dropped
//!   without a word;
//! - no server connection leaked: once the clients are gone, no backend is active or idle in a transaction,
//!   every pool's connections are idle (`SHOW POOLS`), no prepared transaction is left;
//! - the router's RSS comes back to its baseline: it is read once the clients are gone after each round; the
//!   first half of the rounds is the warm-up (glibc's malloc keeps fragments of what each peak took, less
//!   with every round: with 2000 clients 76, 84, 87, 91, 93, 96 MiB, and with `MALLOC_ARENA_MAX=2` 107, 132,
//!   138, 141, 143, 144 MiB), the figure after it the baseline, and the last round's figure must be within
//!   an eighth of it (or 8 MiB). A leak grows by about the same amount every round and fails that.
//!
//! Prints its figures and exits non-zero when a check fails.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use integration::patroni::PatroniCluster;
use integration::{free_port, PgServer};
use rand::{Rng, SeedableRng};

const USAGE: &str =
    "usage: soak --router PATH [--clients N (2000)] [--seconds S (300)] [--rounds R (6)] [--keys K (10000)]";

struct Args {
    router: PathBuf,
    clients: usize,
    seconds: u64,
    rounds: u64,
    keys: i64,
}

fn args() -> Result<Args> {
    let mut a = Args { router: PathBuf::new(), clients: 2000, seconds: 300, rounds: 6, keys: 10_000 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--router" => a.router = value()?.into(),
            "--clients" => a.clients = value()?.parse()?,
            "--seconds" => a.seconds = value()?.parse()?,
            "--rounds" => a.rounds = value()?.parse()?,
            "--keys" => a.keys = value()?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if a.rounds < 2 {
        bail!("--rounds must be at least 2 (the first half is the warm-up)\n{USAGE}");
    }
    if a.router.as_os_str().is_empty() {
        bail!("--router is required\n{USAGE}");
    }
    Ok(a)
}

/// What the clients saw.
#[derive(Default)]
struct Stats {
    statements: AtomicU64,
    connections: AtomicU64,
    cut: AtomicU64,
    /// Errors with a SQLSTATE, by code.
    clean: Mutex<BTreeMap<String, u64>>,
    /// Errors without one (a connection closed or reset with no ErrorResponse), with examples.
    unclean: AtomicU64,
    examples: Mutex<Vec<String>>,
}

impl Stats {
    fn error(&self, what: &str, e: &tokio_postgres::Error) {
        match e.as_db_error() {
            Some(db) => *self.clean.lock().unwrap().entry(db.code().code().to_string()).or_default() += 1,
            None => {
                self.unclean.fetch_add(1, Relaxed);
                let mut ex = self.examples.lock().unwrap();
                if ex.len() < 10 {
                    ex.push(format!("{what}: {e}"));
                }
            }
        }
    }
}

struct Router {
    child: Child,
    port: u16,
}

/// A process's resident memory in KiB (0 when it is gone).
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

impl Router {
    fn rss_kb(&self) -> u64 {
        rss_kb(self.child.id())
    }

    fn url(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=10", self.port)
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(url: &str) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((client, task))
}

/// One client: connections one after another until `until`, each running a random number of random
/// statements, some cut off in the middle.
async fn client(url: String, keys: i64, until: Instant, stats: Arc<Stats>, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Start spread over the first seconds.
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..5000))).await;
    while Instant::now() < until {
        let (c, task) = match connect(&url).await {
            Ok(x) => x,
            Err(e) => {
                stats.error("connect", &e);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        stats.connections.fetch_add(1, Relaxed);
        let statements = rng.random_range(5..60);
        for _ in 0..statements {
            if Instant::now() >= until {
                break;
            }
            let k: i64 = rng.random_range(0..keys);
            let r = match rng.random_range(0..100) {
                0..40 => c.query("SELECT v FROM kv WHERE user_id = $1", &[&k]).await.map(drop),
                40..65 => c.execute("UPDATE kv SET v = v + 1 WHERE user_id = $1", &[&k]).await.map(drop),
                65..75 => c
                    .simple_query(&format!(
                        "BEGIN; UPDATE kv SET v = v + 1 WHERE user_id = {k}; SELECT v FROM kv WHERE user_id = {k}; COMMIT"
                    ))
                    .await
                    .map(drop),
                // Two keys on two shards in one transaction: two-phase commit.
                75..85 => async {
                    c.batch_execute("BEGIN").await?;
                    c.execute("UPDATE kv SET v = v + 1 WHERE user_id = $1", &[&k]).await?;
                    c.execute("UPDATE kv SET v = v - 1 WHERE user_id = $1", &[&((k + 1) % keys)]).await?;
                    c.batch_execute("COMMIT").await
                }
                .await,
                85..90 => c.query("SELECT count(*), sum(v) FROM kv WHERE user_id IN ($1, $2, $3)", &[&k, &(k + 1), &(k + 2)])
                    .await
                    .map(drop),
                90..93 => c.query("SELECT count(*), sum(v) FROM kv", &[]).await.map(drop),
                93..96 => {
                    // Cut off in the middle of a statement.
                    let cut = Duration::from_millis(rng.random_range(0..300));
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&k];
                    let q = c.query("SELECT pg_sleep(0.2), v FROM kv WHERE user_id = $1", &params);
                    match tokio::time::timeout(cut, q).await {
                        Ok(r) => r.map(drop),
                        Err(_) => {
                            stats.cut.fetch_add(1, Relaxed);
                            break;
                        }
                    }
                }
                _ => {
                    // Cut off in the middle of a transaction.
                    let _ = c.batch_execute("BEGIN").await;
                    let _ = c.execute("UPDATE kv SET v = v + 1 WHERE user_id = $1", &[&k]).await;
                    stats.cut.fetch_add(1, Relaxed);
                    break;
                }
            };
            stats.statements.fetch_add(1, Relaxed);
            if let Err(e) = r {
                let closed = c.is_closed();
                stats.error("statement", &e);
                if closed {
                    break;
                }
                // A failed transaction block: end it.
                let _ = c.batch_execute("ROLLBACK").await;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..2000))).await;
        }
        // The connection goes away: cleanly at the end of its statements, abruptly when it was cut.
        task.abort();
        drop(c);
    }
}

/// Backends of client connections on a server, by application name and state (without the one asking and
/// Patroni's own).
async fn backends(url: &str) -> Result<BTreeMap<(String, String), i64>> {
    let (c, _t) = connect(url).await?;
    let rows = c
        .query(
            "SELECT application_name, coalesce(state, '?'), count(*) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
             AND application_name NOT LIKE 'Patroni%' GROUP BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| ((r.get(0), r.get(1)), r.get(2))).collect())
}

async fn prepared(url: &str) -> Result<i64> {
    let (c, _t) = connect(url).await?;
    Ok(c.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).await?.get(0))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = args()?;
    println!("soak: {} clients for {} s through {}", args.clients, args.seconds, args.router.display());

    // Shard 0: Patroni (etcd and two PostgreSQL nodes); shard 1: a plain PostgreSQL.
    let patroni = tokio::task::spawn_blocking(|| PatroniCluster::start(2)).await??;
    let leader = patroni.wait_leader(Duration::from_secs(60))?;
    let leader_port = patroni.members[patroni.member_index(&leader)].pg_port;
    let mut plain = PgServer::start_with(&["max_connections=300"])?;
    let shard0 = format!("host=127.0.0.1 port={leader_port} user=postgres dbname=postgres");
    for (i, url) in [shard0.clone(), plain.conn_str("postgres")].iter().enumerate() {
        let (c, _t) = connect(url).await?;
        c.batch_execute(&format!(
            "CREATE TABLE kv (user_id bigint PRIMARY KEY, v bigint NOT NULL DEFAULT 0); \
             INSERT INTO kv (user_id) SELECT g FROM generate_series(0, {}) g WHERE g % 2 = {i}",
            args.keys - 1
        ))
        .await?;
    }

    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.csv");
    std::fs::write(
        &config,
        format!(
            "shard-strategy,hash\nshard-count,2\nshard-key,user_id\nshard-algorithm,modulo\nrouter-auth,trust\n\
             router-admin-users,postgres\npool-size,20\npatroni-interval-ms,200\n\
             shard-node-0,postgres://postgres@127.0.0.1:{leader_port}/postgres\nshard-node-0-patroni,{}\n\
             shard-node-1,{}\n",
            patroni.api_urls().join(","),
            plain.url("postgres")
        ),
    )?;
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("router.log"))?;
    let child = Command::new(&args.router)
        .args(["serve", "--config", config.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", args.router.display()))?;
    let router = Router { child, port };
    let started = Instant::now();
    while connect(&router.url()).await.is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            bail!("the router did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Rounds of the same load, each with shard 1 killed and restarted at 30% of it and a Patroni switchover of
    // shard 0 at 60%; the router's RSS is read after each, once its clients are gone. The figure after the first
    // half of the rounds is the baseline (the allocator keeps some of what each peak took, less with every
    // round): memory that still grows after it is a leak.
    let stats = Arc::new(Stats::default());
    let peak = Arc::new(AtomicU64::new(0));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (peak, watching, pid) = (peak.clone(), watching.clone(), router.child.id());
        tokio::spawn(async move {
            while watching.load(Relaxed) {
                peak.fetch_max(rss_kb(pid), Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let round_s = (args.seconds / args.rounds).max(20);
    let mut leader = leader;
    let mut after_rounds = Vec::new();
    let soak_start = Instant::now();
    for round in 1..=args.rounds {
        let start = Instant::now();
        let say = |what: String| println!("round {round}, {:>3} s: {what}", start.elapsed().as_secs());
        let until = start + Duration::from_secs(round_s);
        let tasks: Vec<_> = (0..args.clients)
            .map(|i| {
                let seed = round << 32 | i as u64;
                tokio::spawn(client(router.url(), args.keys, until, stats.clone(), seed))
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(round_s * 3 / 10)).await;
        say("killing shard 1 (pg_ctl stop -m immediate)".into());
        plain.stop("immediate")?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        tokio::task::block_in_place(|| plain.start_again())?;
        say("shard 1 started again".into());
        tokio::time::sleep(Duration::from_secs(round_s * 6 / 10).saturating_sub(start.elapsed())).await;
        let candidate = patroni.members.iter().find(|m| m.name != leader).expect("two members").name.clone();
        say(format!("Patroni switchover {leader} -> {candidate}"));
        tokio::task::block_in_place(|| patroni.switchover(&leader, &candidate))?;
        let (new_leader, _) =
            tokio::task::block_in_place(|| patroni.wait_new_leader(&leader, Duration::from_secs(60)))?;
        say(format!("{new_leader} leads shard 0"));
        leader = new_leader;
        for t in tasks {
            t.await?;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rss = router.rss_kb();
        say(format!(
            "clients gone; {} statements so far; router RSS {} MiB",
            stats.statements.load(Relaxed),
            rss / 1024
        ));
        after_rounds.push(rss);
    }
    watching.store(false, Relaxed);
    watcher.await?;
    let soak_time = soak_start.elapsed();

    // What is left.
    let warm = after_rounds.len().div_ceil(2);
    let (baseline, after) = (after_rounds[warm - 1], *after_rounds.last().expect("a round"));
    let new_port = patroni.members[patroni.member_index(&leader)].pg_port;
    let shard0 = format!("host=127.0.0.1 port={new_port} user=postgres dbname=postgres");
    let shard1 = plain.conn_str("postgres");
    // Prepared transactions of sessions cut off are decided by recovery within 12 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut left_prepared = (0, 0);
    while Instant::now() < deadline {
        left_prepared = (prepared(&shard0).await?, prepared(&shard1).await?);
        if left_prepared == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let servers = [backends(&shard0).await?, backends(&shard1).await?];
    let (admin, _t) = connect(&format!("host=127.0.0.1 port={port} user=postgres dbname=shard_admin")).await?;
    let pools = admin.simple_query("SHOW POOLS").await?;
    let mut pool_lines = Vec::new();
    let mut busy = 0;
    for m in &pools {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            let cols: Vec<String> = (0..r.len()).map(|i| r.get(i).unwrap_or("").to_string()).collect();
            pool_lines.push(cols.join(" | "));
            // shard, server, database, user, active, idle, waiting
            busy += cols.get(4).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0)
                + cols.get(6).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        }
    }

    let statements = stats.statements.load(Relaxed);
    println!("\n== soak: {} clients, {} rounds, {:.0} s", args.clients, args.rounds, soak_time.as_secs_f64());
    println!("statements: {statements} ({:.0}/s)", statements as f64 / soak_time.as_secs_f64());
    println!(
        "client connections: {}; cut off mid-statement or mid-transaction: {}",
        stats.connections.load(Relaxed),
        stats.cut.load(Relaxed)
    );
    println!("clean errors (SQLSTATE: count): {:?}", stats.clean.lock().unwrap());
    let unclean = stats.unclean.load(Relaxed);
    println!("errors without a SQLSTATE: {unclean}");
    for e in stats.examples.lock().unwrap().iter() {
        println!("  {e}");
    }
    println!(
        "router RSS: after each round {:?} MiB (baseline: after round {warm}), peak {} MiB",
        after_rounds.iter().map(|r| r / 1024).collect::<Vec<_>>(),
        peak.load(Relaxed) / 1024
    );
    println!("server backends after (shard 0, shard 1): {servers:?}");
    println!("prepared transactions left (shard 0, shard 1): {left_prepared:?}");
    println!("SHOW POOLS:\n  {}", pool_lines.join("\n  "));

    let mut failures = Vec::new();
    if unclean > 0 {
        failures.push(format!("{unclean} client errors without a SQLSTATE"));
    }
    for (i, s) in servers.iter().enumerate() {
        let stuck: i64 = s.iter().filter(|((_, state), _)| state.as_str() != "idle").map(|(_, n)| n).sum();
        if stuck > 0 {
            failures.push(format!("shard {i}: {stuck} server connections not idle: {s:?}"));
        }
        // The pool's connections (the control plane's are named `shard-router 2pc`, `... catalog`, ...).
        let pooled: i64 = s.iter().filter(|((app, _), _)| app.as_str() == "shard-router").map(|(_, n)| n).sum();
        if pooled > 20 {
            failures.push(format!("shard {i}: {pooled} pooled server connections, more than pool-size (20)"));
        }
    }
    if busy > 0 {
        failures.push(format!("{busy} pooled connections still active or clients waiting"));
    }
    if left_prepared != (0, 0) {
        failures.push(format!("prepared transactions left: {left_prepared:?}"));
    }
    // Back to the baseline: within an eighth of it or 8 MiB, whichever is larger.
    if after > baseline + (baseline / 8).max(8 * 1024) {
        failures.push(format!("router RSS {} MiB after, baseline {} MiB", after / 1024, baseline / 1024));
    }
    if statements == 0 {
        failures.push("no statement ran".into());
    }
    if failures.is_empty() {
        println!("\nsoak: passed");
        Ok(())
    } else {
        let log = std::fs::read_to_string(dir.path().join("router.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        println!("router log (last lines):\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        bail!("soak failed: {}", failures.join("; "))
    }
}
