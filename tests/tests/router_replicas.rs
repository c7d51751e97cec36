//! `shard-read-replicas`: reads outside a transaction go to a standby whose replay lag is under
//! `shard-max-replica-lag-bytes`, in the simple and the extended protocol; writes, reads in a transaction,
//! reads a standby refuses (`FOR UPDATE`) and reads while the standby lags go to the primary.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use integration::{Cluster, PgServer};

/// Where a keyed read ran, as the router sends it: `true` on a standby.
async fn read_ran_on_standby(c: &tokio_postgres::Client, extended: bool) -> Result<bool> {
    if extended {
        let row = c.query_one("SELECT pg_is_in_recovery() FROM events WHERE user_id = $1", &[&1i64]).await?;
        return Ok(row.get(0));
    }
    let rows = c.simple_query("SELECT pg_is_in_recovery() FROM events WHERE user_id = 1").await?;
    let v = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v == "t"),
        _ => None,
    });
    Ok(v.expect("one row"))
}

async fn until(what: &str, mut ok: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if ok().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("timed out waiting for {what}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_a_fresh_standby() -> Result<()> {
    let primary = PgServer::start()?;
    let p = primary.client("postgres").await?;
    p.batch_execute("CREATE TABLE events (user_id bigint PRIMARY KEY, n int); INSERT INTO events VALUES (1, 1)")
        .await?;
    let standby = primary.standby()?;
    let s = standby.client("postgres").await?;
    let head = format!(
        "shard-strategy,hash\nshard-count,1\nshard-key,user_id\nrouter-auth,trust\npatroni-interval-ms,100\n\
         shard-read-replicas,true\nshard-max-replica-lag-bytes,1000\n\
         shard-node-0,postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres\n",
        primary.port, standby.port
    );
    let cluster = Cluster::with_servers(Vec::new(), &head, |_, _| String::new())?;
    let c = cluster.client().await?;

    // Keyed reads outside a transaction: on the standby, once the router has seen it caught up.
    until("a read on the standby", async || read_ran_on_standby(&c, false).await).await?;
    assert!(read_ran_on_standby(&c, true).await?, "extended protocol reads go to the standby too");

    // Writes, reads in a transaction and FOR UPDATE go to the primary.
    c.execute("INSERT INTO events (user_id, n) VALUES ($1, 2)", &[&2i64]).await?;
    let row = c.query_one("SELECT pg_is_in_recovery() FROM events WHERE user_id = $1 FOR UPDATE", &[&1i64]).await?;
    assert!(!row.get::<_, bool>(0), "FOR UPDATE runs on the primary");
    c.batch_execute("BEGIN").await?;
    let row = c.query_one("SELECT pg_is_in_recovery() FROM events WHERE user_id = $1", &[&1i64]).await?;
    assert!(!row.get::<_, bool>(0), "a read inside a transaction runs on the primary");
    c.batch_execute("COMMIT").await?;
    // So do sequences and advisory locks (a standby refuses nextval, and its locks would meet no one else's),
    // while a read of no table goes to the standby.
    c.batch_execute("CREATE SEQUENCE s").await?;
    until("a read of no table on the standby", async || {
        Ok(c.query_one("SELECT pg_is_in_recovery()", &[]).await?.get::<_, bool>(0))
    })
    .await?;
    for sql in
        ["SELECT nextval('s') > 0, pg_is_in_recovery()", "SELECT pg_try_advisory_xact_lock(1), pg_is_in_recovery()"]
    {
        let row = c.query_one(sql, &[]).await?;
        assert!(row.get::<_, bool>(0) && !row.get::<_, bool>(1), "{sql}: on the primary");
        let rows = c.simple_query(sql).await?;
        let Some(row) = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        }) else {
            panic!("{sql}: {rows:?}")
        };
        assert_eq!((row.get(0), row.get(1)), (Some("t"), Some("f")), "{sql}: on the primary (simple protocol)");
    }

    // The standby falls behind (replay paused, 100 KB written): reads go back to the primary.
    s.batch_execute("SELECT pg_wal_replay_pause()").await?;
    p.batch_execute("INSERT INTO events SELECT g, g FROM generate_series(1000, 3000) g").await?;
    until("reads on the primary while the standby lags", async || Ok(!read_ran_on_standby(&c, false).await?)).await?;
    assert!(!read_ran_on_standby(&c, true).await?);
    // It catches up: reads return to it.
    s.batch_execute("SELECT pg_wal_replay_resume()").await?;
    until("reads on the standby again", async || read_ran_on_standby(&c, true).await).await?;
    let n: i64 = c.query_one("SELECT count(*) FROM events WHERE user_id = $1", &[&2000i64]).await?.get(0);
    assert_eq!(n, 1, "the standby has the rows once it caught up");
    Ok(())
}

/// The port of the server that ran a keyed read (simple or extended protocol).
async fn read_port(c: &tokio_postgres::Client, extended: bool) -> Result<u16> {
    if extended {
        let row = c.query_one("SELECT inet_server_port() FROM events WHERE user_id = $1", &[&1i64]).await?;
        return Ok(row.get::<_, i32>(0) as u16);
    }
    let rows = c.simple_query("SELECT inet_server_port() FROM events WHERE user_id = 1").await?;
    let v = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
        _ => None,
    });
    Ok(v.expect("one row"))
}

/// Rewrites the router's config.csv with `policy` and RELOADs it through the admin console.
async fn set_policy(cluster: &Cluster, head: &str, policy: &str) -> Result<()> {
    std::fs::write(&cluster.config_path, format!("{head}shard-replica-policy,{policy}\n"))?;
    let conn = format!("host=127.0.0.1 port={} user=postgres dbname=shard_admin", cluster.port);
    let (admin, conn) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    admin.simple_query("RELOAD").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_policies_choose_among_fresh_standbys() -> Result<()> {
    let primary = PgServer::start()?;
    let p = primary.client("postgres").await?;
    p.batch_execute("CREATE TABLE events (user_id bigint PRIMARY KEY, n int); INSERT INTO events VALUES (1, 1)")
        .await?;
    let (a, b) = (primary.standby()?, primary.standby()?);
    let head = format!(
        "shard-strategy,hash\nshard-count,1\nshard-key,user_id\nrouter-auth,trust\npatroni-interval-ms,100\n\
         router-admin-users,postgres\nshard-read-replicas,true\nshard-max-replica-lag-bytes,100000\n\
         shard-node-0,postgres://postgres@127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}/postgres\n",
        primary.port, a.port, b.port
    );
    let cluster =
        Cluster::with_servers(Vec::new(), &format!("{head}shard-replica-policy,round_robin\n"), |_, _| String::new())?;
    let c = cluster.client().await?;
    until("reads on both standbys", async || {
        let (x, y) = (read_port(&c, false).await?, read_port(&c, false).await?);
        Ok(x != y && [x, y].contains(&a.port) && [x, y].contains(&b.port))
    })
    .await?;

    // round_robin (the default): one after the other, on every protocol path.
    for extended in [false, true] {
        let ports: Vec<u16> = futures_ports(&c, extended, 10).await?;
        for w in ports.windows(2) {
            assert_ne!(w[0], w[1], "round_robin alternates: {ports:?}");
        }
        assert!(ports.iter().all(|p| *p == a.port || *p == b.port), "reads only on standbys: {ports:?}");
    }

    // first: the first standby of the node's URL, every time.
    set_policy(&cluster, &head, "first").await?;
    for extended in [false, true] {
        let ports = futures_ports(&c, extended, 10).await?;
        assert!(ports.iter().all(|p| *p == a.port), "first: {ports:?} (first standby {})", a.port);
    }
    // ... and the next one when the first lags.
    let sa = a.client("postgres").await?;
    sa.batch_execute("SELECT pg_wal_replay_pause()").await?;
    p.batch_execute("INSERT INTO events SELECT g, g FROM generate_series(1000, 5000) g").await?;
    until("reads on the second standby while the first lags", async || Ok(read_port(&c, false).await? == b.port))
        .await?;
    sa.batch_execute("SELECT pg_wal_replay_resume()").await?;
    until("reads back on the first standby", async || Ok(read_port(&c, true).await? == a.port)).await?;

    // random: both standbys over 40 reads (all on one: 2^-39).
    set_policy(&cluster, &head, "random").await?;
    let ports = futures_ports(&c, false, 40).await?;
    assert!(ports.contains(&a.port) && ports.contains(&b.port), "random: {ports:?}");

    // least_conn: while a long read holds a connection to one standby, the others' reads go to the other.
    set_policy(&cluster, &head, "least_conn").await?;
    let slow = cluster.client().await?;
    let busy = tokio::spawn(async move {
        slow.simple_query("SELECT inet_server_port(), pg_sleep(3) FROM events WHERE user_id = 1").await
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let ports = futures_ports(&c, true, 10).await?;
    let rows = busy.await??;
    let held: u16 = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .expect("a row");
    let other = if held == a.port { b.port } else { a.port };
    assert!(ports.iter().all(|p| *p == other), "least_conn: {ports:?} while {held} was busy");
    // Both idle again: ties go round.
    let ports = futures_ports(&c, false, 10).await?;
    assert!(ports.contains(&a.port) && ports.contains(&b.port), "least_conn with ties: {ports:?}");
    Ok(())
}

/// `n` keyed reads in a row; the port of each.
async fn futures_ports(c: &tokio_postgres::Client, extended: bool, n: usize) -> Result<Vec<u16>> {
    let mut ports = Vec::with_capacity(n);
    for _ in 0..n {
        ports.push(read_port(c, extended).await?);
    }
    Ok(ports)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_reads_go_to_a_standby_while_the_shard_has_no_primary() -> Result<()> {
    let primary = PgServer::start()?;
    let p = primary.client("postgres").await?;
    p.batch_execute("CREATE TABLE events (user_id bigint PRIMARY KEY, n int); INSERT INTO events VALUES (1, 1)")
        .await?;
    let standby = primary.standby()?;
    let http = integration::free_port();
    let head = format!(
        "shard-strategy,hash\nshard-count,1\nshard-key,user_id\nrouter-auth,trust\npatroni-interval-ms,100\n\
         router-http,127.0.0.1:{http}\nshard-degraded-reads,true\nshard-max-replica-lag-bytes,1000000\n\
         failover-buffer-window-ms,1500\nfailover-buffer-max-ms,60000\n\
         shard-node-0,postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres\n",
        primary.port, standby.port
    );
    let cluster = Cluster::with_servers(Vec::new(), &head, |_, _| String::new())?;
    let c = cluster.client().await?;
    let health = || async move {
        let out = tokio::process::Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", &format!("http://127.0.0.1:{http}/api/health")])
            .output()
            .await?;
        let text = String::from_utf8(out.stdout)?;
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
        Ok::<_, anyhow::Error>((code.to_string(), serde_json::from_str::<serde_json::Value>(body)?))
    };
    // With a primary, reads go to it (shard-read-replicas is off): degraded reads are for failover only.
    until("the router following the standby too", async || {
        let (code, h) = health().await?;
        Ok(code == "200" && h["status"] == "healthy")
    })
    .await?;
    for extended in [false, true] {
        assert_eq!(read_port(&c, extended).await?, primary.port);
    }

    // The primary goes away: reads answer at once from the standby, on both paths; the shard is degraded.
    primary.stop("immediate")?;
    until("reads on the standby", async || Ok(read_port(&c, false).await.ok() == Some(standby.port))).await?;
    for extended in [false, true] {
        let t = Instant::now();
        let port = read_port(&c, extended).await.with_context(|| format!("a degraded read, extended {extended}"))?;
        assert_eq!(port, standby.port);
        assert!(t.elapsed() < Duration::from_millis(1000), "a degraded read does not wait for a primary");
    }
    let (code, h) = health().await?;
    assert_eq!(
        (code.as_str(), &h["status"], &h["checks"]["0"]),
        ("200", &"degraded".into(), &"degraded".into()),
        "{h}"
    );
    // Writes wait in the failover buffer as before, and fail when no primary comes within its window.
    let t = Instant::now();
    let e = c.execute("INSERT INTO events (user_id, n) VALUES ($1, 2)", &[&2i64]).await.expect_err("no primary");
    assert!(t.elapsed() >= Duration::from_millis(1000), "the write waited in the buffer: {e}");
    // A read inside a transaction is not a degraded read: it waits for the primary too.
    // (With one node BEGIN itself goes to the primary, and waits.)
    let in_txn = async {
        c.batch_execute("BEGIN").await?;
        read_port(&c, true).await
    };
    assert!(in_txn.await.is_err(), "a transaction waits for the primary");
    // The BEGIN that found no primary opened nothing: the session reads on as before. The same through
    // Parse/Bind/Execute.
    assert_eq!(read_port(&c, false).await.context("a read after a failed BEGIN")?, standby.port);
    assert!(c.execute("BEGIN", &[]).await.is_err(), "BEGIN waits for the primary");
    assert_eq!(read_port(&c, true).await.context("a read after a failed extended BEGIN")?, standby.port);

    // The standby is promoted: the shard is healthy, reads and writes go to the new primary.
    standby.promote()?;
    until("a write on the promoted standby", async || {
        Ok(c.execute("INSERT INTO events (user_id, n) VALUES ($1, 3)", &[&3i64]).await.is_ok())
    })
    .await?;
    until("healthy again", async || Ok(health().await?.1["status"] == "healthy")).await?;
    assert_eq!(read_port(&c, false).await.context("a read after the promotion")?, standby.port);
    Ok(())
}
