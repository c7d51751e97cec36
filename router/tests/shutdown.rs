//! Graceful shutdown and zero-downtime upgrade, through the real binary: a second router listens on the same
//! port (SO_REUSEPORT) while the first, sent SIGTERM, stops accepting, ends its idle clients (57P01), lets a
//! transaction in progress finish and commit, and exits by itself; new clients are served all along. SIGINT
//! does the same with at most a second for transactions: one left open is rolled back.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use localpg::{free_port, PgServer};

/// A PostgreSQL server and a config.csv for a router in front of it (one hash shard, trust) with `extra`
/// rows; the directory holds the file.
fn one_node(extra: &str) -> (PgServer, tempfile::TempDir, std::path::PathBuf) {
    let pg = PgServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.csv");
    let rows =
        format!("shard-strategy,hash\nshard-count,1\nrouter-auth,trust\n{extra}shard-node-0,{}\n", pg.url("postgres"));
    std::fs::write(&config, rows).unwrap();
    (pg, dir, config)
}

fn start_router(config: &std::path::Path, port: u16) -> Child {
    start_router_with(config, port, &[])
}

fn start_router_with(config: &std::path::Path, port: u16, env: &[(&str, &str)]) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_shard-router"))
        .args(["serve", "--config", config.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
}

async fn connect(port: u16) -> Option<tokio_postgres::Client> {
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2");
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(conn);
    Some(c)
}

/// A client through the router, once it accepts connections.
async fn client(port: u16) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(c) = connect(port).await {
            if c.simple_query("SELECT 1").await.is_ok() {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "the router did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the process to exit (at most `limit`); its exit status.
fn exited(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_while_a_new_router_takes_the_port() {
    let (pg, _dir, config) = one_node("router-shutdown-timeout-s,10\n");
    let direct = pg.client("postgres").await.unwrap();
    direct.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    let port = free_port();
    let mut old = start_router(&config, port);
    let in_txn = client(port).await;
    let idle = client(port).await;
    in_txn.batch_execute("BEGIN").await.unwrap();
    in_txn.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();

    // The new router listens on the same port beside the old one.
    let mut new = start_router(&config, port);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(new.try_wait().unwrap().is_none(), "the second router could not listen on the same port");
    signal(&old, "-TERM");

    // The idle client is ended at once, with 57P01.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !idle.is_closed() {
        assert!(Instant::now() < deadline, "the idle client was not ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New clients are served (by the new router).
    for _ in 0..5 {
        let c = client(port).await;
        c.simple_query("SELECT 1").await.unwrap();
    }
    // The transaction goes on and commits; then its session ends and the old router exits by itself.
    assert!(old.try_wait().unwrap().is_none(), "the old router left before its transaction ended");
    in_txn.execute("INSERT INTO t VALUES (2)", &[]).await.unwrap();
    in_txn.batch_execute("COMMIT").await.unwrap();
    let status = exited(&mut old, Duration::from_secs(8)).expect("the old router exits once its clients are gone");
    assert!(status.success(), "{status:?}");
    let n: i64 = direct.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);

    // SIGINT: a transaction left open gets at most a second, then is rolled back.
    let open = client(port).await;
    open.batch_execute("BEGIN").await.unwrap();
    open.execute("INSERT INTO t VALUES (3)", &[]).await.unwrap();
    let t = Instant::now();
    signal(&new, "-INT");
    let status = exited(&mut new, Duration::from_secs(5)).expect("SIGINT stops within its second");
    assert!(status.success(), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(4));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n: i64 = direct.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
        let open_txns: i64 = direct
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'", &[])
            .await
            .unwrap()
            .get(0);
        if n == 2 && open_txns == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the open transaction was not rolled back: {n} rows, {open_txns} open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGHUP is RELOAD (systemd's `ExecReload`): config.csv is read again, clients stay connected; a file with
/// errors changes nothing and the router goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config() {
    let (_pg, _dir, config) = one_node("");
    let head = std::fs::read_to_string(&config).unwrap();
    let port = free_port();
    let mut router = start_router(&config, port);
    let c = client(port).await;
    for _ in 0..5 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    // A rate limit of 3 statements a minute, reloaded: the 4th is refused on the same connection.
    std::fs::write(&config, format!("{head}router-rate-limit-statements,3\nrouter-rate-limit-window-s,60\n")).unwrap();
    signal(&router, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match c.simple_query("SELECT 1").await {
            Err(e) => break e,
            Ok(_) => {
                assert!(Instant::now() < deadline, "SIGHUP did not reload the config");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(refused.code().map(|c| c.code()), Some("53400"), "{refused}");
    // A broken file: the running config stays (still limited), the router keeps serving.
    std::fs::write(&config, format!("{head}router-rate-limit-statements,lots\n")).unwrap();
    signal(&router, "-HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(router.try_wait().unwrap().is_none(), "the router stopped on a bad reload");
    let e = c.simple_query("SELECT 1").await.expect_err("still limited");
    assert_eq!(e.code().map(|c| c.code()), Some("53400"));
    // The limit removed: served again.
    std::fs::write(&config, &head).unwrap();
    signal(&router, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.simple_query("SELECT 1").await.is_err() {
        assert!(Instant::now() < deadline, "SIGHUP did not lift the limit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&router, "-TERM");
    assert!(exited(&mut router, Duration::from_secs(10)).is_some());
}

/// Four worker threads (`router-threads,4`), in both runtime designs — one work-stealing runtime (the
/// default), and four single-threaded runtimes each with its own listener on the port
/// (`SHARD_ROUTER_RUNTIME=event-loops`), clients spread over them by the kernel: one pool bound
/// (`pool-size,3`) for all, transactions commit, every server connection goes back idle, SIGTERM ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_threads_share_the_pools_in_both_runtime_designs() {
    for env in [&[][..], &[("SHARD_ROUTER_RUNTIME", "event-loops")][..]] {
        threads_share_the_pools(env).await;
    }
}

async fn threads_share_the_pools(env: &[(&str, &str)]) {
    let (pg, _dir, config) = one_node("router-threads,4\npool-size,3\nrouter-admin-users,postgres\n");
    let direct = pg.client("postgres").await.unwrap();
    direct.batch_execute("CREATE TABLE t (id int PRIMARY KEY, client int)").await.unwrap();
    let port = free_port();
    let mut router = start_router_with(&config, port, env);
    let _ = client(port).await;
    let mut tasks = Vec::new();
    for c in 0..24 {
        tasks.push(tokio::spawn(async move {
            let db = client(port).await;
            for k in 0..40 {
                let id = c * 1000 + k;
                db.batch_execute(&format!("BEGIN; INSERT INTO t VALUES ({id}, {c}); COMMIT")).await.unwrap();
                let n: i64 = db.query_one("SELECT count(*) FROM t WHERE client = $1", &[&c]).await.unwrap().get(0);
                assert_eq!(n, k as i64 + 1);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n: i64 = direct.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 24 * 40);
    // At most pool-size server connections, all idle.
    let backends: Vec<String> = direct
        .query(
            "SELECT application_name FROM pg_stat_activity WHERE backend_type = 'client backend' \
             AND pid <> pg_backend_pid() AND application_name NOT LIKE 'shard-router %'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(backends.len() <= 3, "server connections for pool-size 3: {backends:?}");
    let admin = format!("host=127.0.0.1 port={port} user=postgres dbname=shard_admin");
    let (a, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let rows = a.simple_query("SHOW POOLS").await.unwrap();
    for m in rows {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            assert_eq!(r.get("active"), Some("0"));
            assert_eq!(r.get("waiting"), Some("0"));
        }
    }
    signal(&router, "-TERM");
    assert!(exited(&mut router, Duration::from_secs(10)).is_some_and(|s| s.success()));
}
