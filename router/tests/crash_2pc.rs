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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_all_or_nothing_across_router_and_shard_crashes() {
    let mut shards = vec![PgServer::start().unwrap(), PgServer::start().unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.csv");
    let log = dir.path().join("router.log");
    write_config(&config, &shards);
    for s in &shards {
        let (c, conn) = tokio_postgres::connect(&s.url("postgres"), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.batch_execute(
            "CREATE TABLE ledger (user_id bigint NOT NULL, txn bigint NOT NULL, PRIMARY KEY (user_id, txn))",
        )
        .await
        .unwrap();
    }
    let port = free_port();
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2");
    let mut router = start_router(&config, port, &log);

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeSet::<i64>::new()));
    let mut writers = Vec::new();
    for w in 0..4i64 {
        let (stop, acked, url) = (stop.clone(), acked.clone(), url.clone());
        writers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Some(c) = connect(&url).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && n < 100_000 {
                    n += 1;
                    let txn = w * 1_000_000 + n;
                    match transfer(&c, txn, w % 2 == 0).await {
                        Ok(()) => {
                            acked.lock().unwrap().insert(txn);
                        }
                        Err(_) if c.is_closed() => break,
                        Err(_) => {
                            let _ = c.batch_execute("ROLLBACK").await;
                        }
                    }
                }
            }
        }));
    }

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
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    // No prepared transaction left within 15 s of the restart.
    let mut clients = Vec::new();
    for s in &shards {
        let (c, conn) = tokio_postgres::connect(&s.url("postgres"), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        clients.push(c);
    }
    let mut left = i64::MAX;
    while restarted.elapsed() < Duration::from_secs(15) {
        left = 0;
        for c in &clients {
            left += c.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).await.unwrap().get::<_, i64>(0);
        }
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let router_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(left, 0, "prepared transactions left 15 s after the restart\n{router_log}");

    // All or nothing; every acknowledged COMMIT is there.
    let on = |user: i64| {
        let c = &clients[(user % 2) as usize];
        async move {
            c.query("SELECT txn FROM ledger WHERE user_id = $1", &[&user])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, i64>(0))
                .collect::<BTreeSet<i64>>()
        }
    };
    let (one, two) = (on(1).await, on(2).await);
    let acked = acked.lock().unwrap().clone();
    let half: Vec<&i64> = one.symmetric_difference(&two).collect();
    assert!(half.is_empty(), "transactions on one shard only: {half:?}\n{router_log}");
    let lost: Vec<&i64> = acked.difference(&one).collect();
    assert!(lost.is_empty(), "acknowledged commits lost: {lost:?}\n{router_log}");
    assert!(acked.len() > 20, "only {} transactions committed", acked.len());
    let recovered = router_log.lines().filter(|l| l.contains("2PC recovery: committed")).count();
    let rolled_back = router_log.lines().filter(|l| l.contains("2PC recovery: rolled back")).count();
    eprintln!(
        "{} transactions acknowledged, {} committed; recovery committed {recovered} and rolled back {rolled_back} prepared transactions",
        acked.len(),
        one.len()
    );
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
    let mut clients = Vec::new();
    for s in &shards {
        let (c, conn) = tokio_postgres::connect(&s.url("postgres"), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.batch_execute(
            "CREATE TABLE ledger (user_id bigint NOT NULL, txn bigint NOT NULL, PRIMARY KEY (user_id, txn))",
        )
        .await
        .unwrap();
        clients.push(c);
    }
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = start_router(&config, port_a, &log);
    let mut b = start_router(&config, port_b, &log);
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeSet::<i64>::new()));
    let errors_on_b = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..4i64 {
        let port = if w < 2 { port_a } else { port_b };
        let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2");
        let (stop, acked, errors_on_b) = (stop.clone(), acked.clone(), errors_on_b.clone());
        writers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Some(c) = connect(&url).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && n < 100_000 {
                    n += 1;
                    let txn = w * 1_000_000 + n;
                    match transfer(&c, txn, w % 2 == 0).await {
                        Ok(()) => {
                            acked.lock().unwrap().insert(txn);
                        }
                        Err(e) => {
                            if w >= 2 {
                                errors_on_b.lock().unwrap().push(e.to_string());
                            }
                            if c.is_closed() {
                                break;
                            }
                            let _ = c.batch_execute("ROLLBACK").await;
                        }
                    }
                }
            }
        }));
    }
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(800 + 300 * round)).await;
        a.kill().unwrap();
        a.wait().unwrap();
        a = start_router(&config, port_a, &log);
    }
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let mut left = i64::MAX;
    while restarted.elapsed() < Duration::from_secs(15) {
        left = 0;
        for c in &clients {
            left += c.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).await.unwrap().get::<_, i64>(0);
        }
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let router_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(left, 0, "prepared transactions left 15 s after the restart\n{router_log}");
    let errors = errors_on_b.lock().unwrap().clone();
    assert!(errors.is_empty(), "the router that was not killed failed transactions: {errors:?}\n{router_log}");
    let on = |user: i64| {
        let c = &clients[(user % 2) as usize];
        async move {
            c.query("SELECT txn FROM ledger WHERE user_id = $1", &[&user])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, i64>(0))
                .collect::<BTreeSet<i64>>()
        }
    };
    let (one, two) = (on(1).await, on(2).await);
    let acked = acked.lock().unwrap().clone();
    let half: Vec<&i64> = one.symmetric_difference(&two).collect();
    assert!(half.is_empty(), "transactions on one shard only: {half:?}\n{router_log}");
    let lost: Vec<&i64> = acked.difference(&one).collect();
    assert!(lost.is_empty(), "acknowledged commits lost: {lost:?}\n{router_log}");
    let through_b = acked.iter().filter(|t| **t >= 2_000_000).count();
    assert!(through_b > 20, "only {through_b} transactions through the router that was not killed");
    eprintln!(
        "{} transactions acknowledged ({through_b} through the router not killed), {} committed",
        acked.len(),
        one.len()
    );
    for mut r in [a, b] {
        r.kill().unwrap();
        r.wait().unwrap();
    }
}
