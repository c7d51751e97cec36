//! Two-phase commit survives crashes: writers run transactions that insert one row on each of two shards
//! while the router is killed with SIGKILL several times (once together with a shard's PostgreSQL, stopped
//! immediately and started again). Afterwards every transaction is on both shards or on neither, every
//! COMMIT a client was told about is there, and no prepared transaction is left on any shard within 15 s of
//! the last restart.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use localpg::{free_port, PgServer};

fn write_config(path: &std::path::Path, shards: &[PgServer]) {
    let mut c = String::from(
        "shard-strategy,hash\nshard-count,2\nshard-key,user_id\nrouter-auth,trust\npool-timeout-ms,2000\n",
    );
    for (i, s) in shards.iter().enumerate() {
        c.push_str(&format!("shard-node-{i},{}\n", s.url("postgres")));
    }
    std::fs::write(path, c).unwrap();
}

fn start_router(config: &std::path::Path, port: u16, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_shard-router"))
        .args(["serve", "--config", config.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn connect(url: &str) -> Option<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(conn);
    Some(c)
}

/// One transaction on both shards (users 1 and 2): `simple` through simple Queries, else with parameters.
async fn transfer(c: &tokio_postgres::Client, txn: i64, simple: bool) -> Result<(), tokio_postgres::Error> {
    if simple {
        c.simple_query("BEGIN").await?;
        c.simple_query(&format!("INSERT INTO ledger (user_id, txn) VALUES (1, {txn})")).await?;
        c.simple_query(&format!("INSERT INTO ledger (user_id, txn) VALUES (2, {txn})")).await?;
        c.simple_query("COMMIT").await?;
    } else {
        c.batch_execute("BEGIN").await?;
        c.execute("INSERT INTO ledger (user_id, txn) VALUES ($1, $2)", &[&1i64, &txn]).await?;
        c.execute("INSERT INTO ledger (user_id, txn) VALUES ($1, $2)", &[&2i64, &txn]).await?;
        let rows = c.simple_query("COMMIT").await?;
        // (A COMMIT answered ROLLBACK would be a lie here: none is expected without an error first.)
        drop(rows);
    }
    Ok(())
}

/// What the writers share: when to stop, the transactions acknowledged, the errors (of those that count them).
#[derive(Clone, Default)]
struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeSet<i64>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Writers {
    /// Writer `w` through the router at `port`: transactions until stopped (at most 90 s, 100,000), reconnecting
    /// while the router is down; `count_errors`: its errors are recorded.
    fn spawn(&self, w: i64, port: u16, count_errors: bool) -> tokio::task::JoinHandle<()> {
        let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2");
        let me = self.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut n = 0i64;
            while !me.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Some(c) = connect(&url).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                while !me.stop.load(Ordering::Relaxed) && Instant::now() < deadline && n < 100_000 {
                    n += 1;
                    let txn = w * 1_000_000 + n;
                    match transfer(&c, txn, w % 2 == 0).await {
                        Ok(()) => {
                            me.acked.lock().unwrap().insert(txn);
                        }
                        Err(e) => {
                            if count_errors {
                                // (The server's or the router's own words: code and message, not "db error".)
                                let said = match e.as_db_error() {
                                    Some(d) => format!("{} {}", d.code().code(), d.message()),
                                    None => format!("{e:?}"),
                                };
                                me.errors.lock().unwrap().push(said);
                            }
                            if c.is_closed() {
                                break;
                            }
                            let _ = c.batch_execute("ROLLBACK").await;
                        }
                    }
                }
            }
        })
    }
}

/// Direct connections to the shards, with the ledger table made on each.
async fn ledgers(shards: &[PgServer]) -> Vec<tokio_postgres::Client> {
    let mut clients = Vec::new();
    for s in shards {
        let c = connect(&s.url("postgres")).await.expect("a shard");
        c.batch_execute(
            "CREATE TABLE ledger (user_id bigint NOT NULL, txn bigint NOT NULL, PRIMARY KEY (user_id, txn))",
        )
        .await
        .unwrap();
        clients.push(c);
    }
    clients
}

/// Checks that no prepared transaction is left on the shards within 15 s of `since`, that every transaction
/// is on both shards or neither, and that every acknowledged one is there. Returns how many committed.
async fn check(
    clients: &[tokio_postgres::Client],
    since: Instant,
    acked: &BTreeSet<i64>,
    log: &std::path::Path,
) -> usize {
    let mut left = i64::MAX;
    while since.elapsed() < Duration::from_secs(15) {
        left = 0;
        for c in clients {
            left += c.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).await.unwrap().get::<_, i64>(0);
        }
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let router_log = std::fs::read_to_string(log).unwrap_or_default();
    assert_eq!(left, 0, "prepared transactions left 15 s after the restart\n{router_log}");
    let mut on = Vec::new();
    for user in [1i64, 2] {
        let rows =
            clients[(user % 2) as usize].query("SELECT txn FROM ledger WHERE user_id = $1", &[&user]).await.unwrap();
        on.push(rows.iter().map(|r| r.get::<_, i64>(0)).collect::<BTreeSet<i64>>());
    }
    let half: Vec<&i64> = on[0].symmetric_difference(&on[1]).collect();
    assert!(half.is_empty(), "transactions on one shard only: {half:?}\n{router_log}");
    let lost: Vec<&i64> = acked.difference(&on[0]).collect();
    assert!(lost.is_empty(), "acknowledged commits lost: {lost:?}\n{router_log}");
    let recovered = router_log.lines().filter(|l| l.contains("2PC recovery: committed")).count();
    let rolled_back = router_log.lines().filter(|l| l.contains("2PC recovery: rolled back")).count();
    eprintln!(
        "{} transactions acknowledged, {} committed; recovery committed {recovered} and rolled back {rolled_back} prepared transactions",
        acked.len(),
        on[0].len()
    );
    on[0].len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_all_or_nothing_across_router_and_shard_crashes() {
    let mut shards = vec![PgServer::start().unwrap(), PgServer::start().unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.csv");
    let log = dir.path().join("router.log");
    write_config(&config, &shards);
    ledgers(&shards).await;
    let port = free_port();
    let mut router = start_router(&config, port, &log);
    let writers = Writers::default();
    let tasks: Vec<_> = (0..4).map(|w| writers.spawn(w, port, false)).collect();
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(900 + 200 * round)).await;
        router.kill().unwrap(); // SIGKILL
        router.wait().unwrap();
        if round == 2 {
            // A shard crashes too (prepared transactions survive it), and comes back on another port.
            shards[0].stop("immediate").unwrap();
            shards[0].restart().unwrap();
            write_config(&config, &shards);
        }
        router = start_router(&config, port, &log);
    }
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    writers.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let clients = ledgers_of(&shards).await;
    let acked = writers.acked.lock().unwrap().clone();
    check(&clients, restarted, &acked, &log).await;
    assert!(acked.len() > 20, "only {} transactions committed", acked.len());
    router.kill().unwrap();
    router.wait().unwrap();
}

/// Two routers share the decision log; one is killed again and again while the other goes on. The other's
/// writers never see an error (its in-flight transactions are never rolled back by the first one's recovery,
/// nor the other way round), and what the killed one left prepared is finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_do_not_fight_over_each_others_transactions() {
    let shards = vec![PgServer::start().unwrap(), PgServer::start().unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.csv");
    let log = dir.path().join("router.log");
    write_config(&config, &shards);
    let clients = ledgers(&shards).await;
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = start_router(&config, port_a, &log);
    let b = start_router(&config, port_b, &log);
    let writers = Writers::default();
    let tasks: Vec<_> = (0..4).map(|w| writers.spawn(w, if w < 2 { port_a } else { port_b }, w >= 2)).collect();
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(800 + 300 * round)).await;
        a.kill().unwrap();
        a.wait().unwrap();
        a = start_router(&config, port_a, &log);
    }
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    writers.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = writers.acked.lock().unwrap().clone();
    check(&clients, restarted, &acked, &log).await;
    let errors = writers.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "the router that was not killed failed transactions: {errors:?}");
    let through_b = acked.iter().filter(|t| **t >= 2_000_000).count();
    assert!(through_b > 20, "only {through_b} transactions through the router that was not killed");
    for mut r in [a, b] {
        r.kill().unwrap();
        r.wait().unwrap();
    }
}

/// Direct connections to the shards (as they are now).
async fn ledgers_of(shards: &[PgServer]) -> Vec<tokio_postgres::Client> {
    let mut clients = Vec::new();
    for s in shards {
        clients.push(connect(&s.url("postgres")).await.expect("a shard"));
    }
    clients
}
