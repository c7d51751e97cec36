//! Bad input and faults: a malformed or oversized message ends that client with FATAL and nothing else; a
//! shard that is down gives a prompt 08xxx error; a client that disconnects mid-transaction has its server
//! connection rolled back, never handed to another client dirty.

use std::time::{Duration, Instant};

use integration::{free_port, Cluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw startup as user postgres (trust) up to the first ReadyForQuery.
async fn raw_session(port: u16) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let params = b"user\0postgres\0database\0postgres\0\0";
    let mut p = Vec::new();
    p.extend_from_slice(&((8 + params.len()) as i32).to_be_bytes());
    p.extend_from_slice(&196608i32.to_be_bytes());
    p.extend_from_slice(params);
    s.write_all(&p).await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await??;
        anyhow::ensure!(n > 0, "closed during startup");
        got.extend_from_slice(&buf[..n]);
    }
    Ok(s)
}

/// Everything the router sends until it closes the connection.
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_end_only_that_client() -> anyhow::Result<()> {
    let c = Cluster::hash(2, "")?;
    let db = c.client().await?;
    db.batch_execute("CREATE TABLE users (user_id bigint PRIMARY KEY)").await?;

    // A length that cannot be.
    let mut s = raw_session(c.port).await?;
    s.write_all(&[b'Q', 0, 0, 0, 2]).await?;
    let got = String::from_utf8_lossy(&until_closed(&mut s).await).into_owned();
    assert!(got.contains("FATAL") && got.contains("malformed message"), "{got:?}");

    // An announced message over the limit: refused before it is read.
    let mut s = raw_session(c.port).await?;
    s.write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).await?;
    let got = String::from_utf8_lossy(&until_closed(&mut s).await).into_owned();
    assert!(got.contains("FATAL") && got.contains("larger than the limit"), "{got:?}");

    // An unknown message type.
    let mut s = raw_session(c.port).await?;
    s.write_all(&[b'!', 0, 0, 0, 4]).await?;
    let got = String::from_utf8_lossy(&until_closed(&mut s).await).into_owned();
    assert!(got.contains("FATAL") && got.contains("unexpected message type"), "{got:?}");

    // A garbage startup packet.
    let mut s = TcpStream::connect(("127.0.0.1", c.port)).await?;
    s.write_all(&[0, 0, 0, 8, 0, 9, 0, 9]).await?;
    let got = String::from_utf8_lossy(&until_closed(&mut s).await).into_owned();
    assert!(got.contains("FATAL") && got.contains("unsupported frontend protocol"), "{got:?}");

    // The other client never noticed.
    db.execute("INSERT INTO users (user_id) VALUES ($1)", &[&1i64]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_is_down_fails_promptly() -> anyhow::Result<()> {
    let dead = free_port();
    let c =
        Cluster::start(2, "shard-strategy,hash\nshard-count,2\nrouter-auth,trust\npool-timeout-ms,2000\n", |i, s| {
            if i == 1 {
                format!("shard-node-1,postgres://postgres@127.0.0.1:{dead}/postgres\n")
            } else {
                format!("shard-node-{i},{}\n", s.url("postgres"))
            }
        })?;
    // Startup needs one live shard, not all of them.
    let db = c.client().await?;
    db.batch_execute("SELECT 1").await?;
    let t = Instant::now();
    let e = db.execute("CREATE TABLE IF NOT EXISTS users (user_id bigint)", &[]).await;
    let e = e.expect_err("shard 1 is down");
    let e = e.as_db_error().expect("a router error");
    assert!(e.code().code().starts_with("08"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_transaction_leaves_nothing_dirty() -> anyhow::Result<()> {
    let c = Cluster::hash(1, "pool-size,1\n")?;
    let db = c.client().await?;
    db.batch_execute("CREATE TABLE users (user_id bigint PRIMARY KEY, n int)").await?;
    db.execute("INSERT INTO users (user_id, n) VALUES (1, 0)", &[]).await?;
    {
        let mut gone = raw_session(c.port).await?;
        let q = b"BEGIN; UPDATE users SET n = 99 WHERE user_id = 1;\0";
        let mut m = vec![b'Q'];
        m.extend_from_slice(&((4 + q.len()) as i32).to_be_bytes());
        m.extend_from_slice(q);
        gone.write_all(&m).await?;
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(5), gone.read(&mut buf)).await;
        // Dropped here: the connection closes with the transaction open.
    }
    // With a pool of one, the next client gets a connection that is not in that transaction.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n: i32 = db.query_one("SELECT n FROM users WHERE user_id = $1", &[&1i64]).await?.get(0);
    assert_eq!(n, 0);
    db.execute("UPDATE users SET n = 1 WHERE user_id = $1", &[&1i64]).await?;
    let n: i32 = db.query_one("SELECT n FROM users WHERE user_id = $1", &[&1i64]).await?.get(0);
    assert_eq!(n, 1, "autocommit: not inside someone else's transaction");
    Ok(())
}

/// A client keeps its last server connection between transactions and gets it back, through every protocol
/// path; a client that needs one when none is idle takes a kept one at once (no wait, no new connection), so
/// the pool opens no more connections than transactions run at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_connections_are_reused_and_handed_over() -> anyhow::Result<()> {
    let c = Cluster::hash(1, "pool-size,2\npool-timeout-ms,2000\n")?;
    let a = c.client().await?;
    let b = c.client().await?;
    let pid = "SELECT pg_backend_pid()";
    let direct = c.shards[0].client("postgres").await?;
    let count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shard-router'";
    let simple_pid = |rows: Vec<tokio_postgres::SimpleQueryMessage>| match &rows[1] {
        tokio_postgres::SimpleQueryMessage::Row(r) => Ok(r.get(0).expect("a pid").parse::<i32>()?),
        m => anyhow::bail!("{m:?}"),
    };
    // One after the other, two clients need one server connection: each takes the one the other keeps, as
    // soon as it was told its statement is over (the router gives the connection back before it sends
    // ReadyForQuery). (The simple protocol: tokio-postgres's query_one returns before ReadyForQuery.)
    let a1 = simple_pid(a.simple_query(pid).await?)?;
    for _ in 0..20 {
        let b1 = simple_pid(b.simple_query(pid).await?)?;
        assert_eq!(a1, b1, "b took the connection a kept rather than open another");
        assert_eq!(simple_pid(a.simple_query(pid).await?)?, a1, "a took it back from b");
    }
    // (A backend still exiting may show for a moment.)
    let mut n = 0;
    for _ in 0..20 {
        n = direct.query_one(count, &[]).await?.get::<_, i64>(0);
        if n <= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let who =
        "SELECT pid::text || ' ' || coalesce(application_name, '') || ' ' || coalesce(state, '') FROM pg_stat_activity";
    let who: Vec<String> = direct.query(who, &[]).await?.iter().map(|r| r.get(0)).collect();
    assert_eq!(n, 1, "{who:?}");
    // At once, they need two: each keeps its own and gets it back on every path.
    a.batch_execute("BEGIN").await?;
    let x: i32 = a.query_one(pid, &[]).await?.get(0);
    let y: i32 = b.query_one(pid, &[]).await?.get(0);
    assert_ne!(x, y, "a's transaction holds its connection");
    a.batch_execute("COMMIT").await?;
    for _ in 0..3 {
        assert_eq!(a.query_one(pid, &[]).await?.get::<_, i32>(0), x, "extended protocol");
        assert_eq!(simple_pid(b.simple_query(pid).await?)?, y, "simple protocol");
        let st = a.prepare(pid).await?;
        assert_eq!(a.query_one(&st, &[]).await?.get::<_, i32>(0), x, "a named prepared statement");
        // A pipeline: tokio-postgres sends both before reading either answer.
        let (p1, p2) = tokio::join!(a.query_one(&st, &[]), a.query_one(pid, &[]));
        assert_eq!((p1?.get::<_, i32>(0), p2?.get::<_, i32>(0)), (x, x), "a pipeline");
    }
    // A third client finds both connections kept (the pool is full): it takes one at once.
    let third = c.client().await?;
    let t = Instant::now();
    let z: i32 = third.query_one(pid, &[]).await?.get(0);
    assert!(t.elapsed() < Duration::from_millis(1500), "no wait for pool-timeout-ms: {:?}", t.elapsed());
    assert!(z == x || z == y, "no third server connection: {z} not in {x}, {y}");
    for _ in 0..3 {
        for cl in [&a, &b, &third] {
            let p: i32 = cl.query_one(pid, &[]).await?.get(0);
            assert!(p == x || p == y, "pool-size 2 holds: {p}");
        }
    }
    assert!(direct.query_one(count, &[]).await?.get::<_, i64>(0) <= 2);
    // A client that leaves gives its kept connection back to the pool: a new client reuses it.
    drop(third);
    drop(b);
    let d = c.client().await?;
    let p: i32 = d.query_one(pid, &[]).await?.get(0);
    assert!(p == x || p == y);
    Ok(())
}

/// More clients than connections: a connection given back while others wait goes to the first of them as it
/// is, and each client still sees its own session settings (replayed on what it is handed), on the simple
/// and the extended protocol, in and out of transactions. Clients that leave while they wait (or just after
/// a connection was handed to them) lose the pool nothing: it still holds at most `pool-size` connections,
/// and a client that comes afterwards gets one at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_clients_are_handed_connections_with_their_own_settings() -> anyhow::Result<()> {
    let c = Cluster::hash(1, "pool-size,2\npool-timeout-ms,20000\n")?;
    c.client().await?.batch_execute("CREATE TABLE users (user_id bigint PRIMARY KEY, n int)").await?;
    let mut workers = Vec::new();
    for k in 0..10i64 {
        let cl = c.client().await?;
        workers.push(tokio::spawn(async move {
            let own = format!("{}ms", 1001 + k);
            cl.batch_execute(&format!("SET statement_timeout = '{own}'")).await?;
            for i in 0..30i64 {
                let shown: String = match i % 3 {
                    0 => match &cl.simple_query("SHOW statement_timeout").await?[1] {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).unwrap_or_default().to_string(),
                        m => anyhow::bail!("{m:?}"),
                    },
                    1 => cl.query_one("SHOW statement_timeout", &[]).await?.get(0),
                    _ => {
                        cl.batch_execute("BEGIN").await?;
                        cl.execute("INSERT INTO users VALUES ($1, $2)", &[&(k * 100 + i), &1i32]).await?;
                        let shown: String = cl.query_one("SHOW statement_timeout", &[]).await?.get(0);
                        cl.batch_execute("COMMIT").await?;
                        shown
                    }
                };
                anyhow::ensure!(shown == own, "client {k}, statement {i}: {shown}, not its own {own}");
            }
            Ok(())
        }));
    }
    // Clients that leave while they wait for a connection (their statement cut short by the client).
    for _ in 0..6 {
        let cl = c.client().await?;
        let _ = tokio::time::timeout(Duration::from_millis(2), cl.query_one("SELECT pg_sleep(0.01)", &[])).await;
        drop(cl);
    }
    for w in workers {
        w.await??;
    }
    let db = c.client().await?;
    let t = Instant::now();
    let rows: i64 =
        tokio::time::timeout(Duration::from_secs(5), db.query_one("SELECT count(*) FROM users", &[])).await??.get(0);
    assert_eq!(rows, 100);
    assert!(t.elapsed() < Duration::from_secs(2), "a connection at once: {:?}", t.elapsed());
    let direct = c.shards[0].client("postgres").await?;
    let count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shard-router'";
    assert!(direct.query_one(count, &[]).await?.get::<_, i64>(0) <= 2, "pool-size 2 holds");
    Ok(())
}

/// Clients waiting on a full pool get the permit of a connection that was closed (its client left in the
/// middle of a transaction) and open a new connection at once — not after `pool-timeout-ms` — on the simple
/// and on the extended protocol, and do not see the rolled-back change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_clients_get_a_new_connection_when_the_one_ahead_is_closed() -> anyhow::Result<()> {
    let c = Cluster::hash(1, "pool-size,1\npool-timeout-ms,20000\n")?;
    let db = c.client().await?;
    db.batch_execute("CREATE TABLE users (user_id bigint PRIMARY KEY, n int)").await?;
    db.execute("INSERT INTO users (user_id, n) VALUES (1, 0)", &[]).await?;
    // (Connected first: a client's startup takes a connection too.)
    let (simple, extended, gone) = (c.client().await?, c.client().await?, c.client().await?);
    gone.batch_execute("BEGIN; UPDATE users SET n = 99 WHERE user_id = 1").await?;
    let t = Instant::now();
    let simple = tokio::spawn(async move {
        match simple.simple_query("SELECT n FROM users WHERE user_id = 1").await?.get(1) {
            Some(tokio_postgres::SimpleQueryMessage::Row(r)) => Ok(r.get(0).unwrap_or_default().to_string()),
            m => anyhow::bail!("{m:?}"),
        }
    });
    let extended = tokio::spawn(async move {
        let n: i32 = extended.query_one("SELECT n FROM users WHERE user_id = $1", &[&1i64]).await?.get(0);
        anyhow::Ok(n.to_string())
    });
    // Both wait for the only connection, which `gone` holds in its transaction; `gone` leaves.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!simple.is_finished() && !extended.is_finished(), "the pool of one is taken");
    drop(gone);
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), simple).await???, "0");
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), extended).await???, "0");
    assert!(t.elapsed() < Duration::from_secs(10), "handed over, not timed out: {:?}", t.elapsed());
    let direct = c.shards[0].client("postgres").await?;
    let count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shard-router'";
    assert!(direct.query_one(count, &[]).await?.get::<_, i64>(0) <= 1, "pool-size 1 holds");
    Ok(())
}

/// A client connects while every server connection is taken: its startup takes no connection when a client
/// of the same user, database and startup settings started before (what the server answered that one is
/// remembered), with the same ParameterStatus as a startup that took one; its statements then wait for a
/// connection as any do. A client with other startup settings still takes a connection to start (the server
/// answers for its settings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_connects_while_every_connection_is_taken() -> anyhow::Result<()> {
    use integration::wire::RawClient;
    let c = Cluster::hash(1, "pool-size,1\npool-timeout-ms,20000\n")?;
    let port = c.port;
    const SETTINGS: &[(&str, &str)] =
        &[("application_name", "waiting app"), ("DateStyle", "German"), ("TimeZone", "Asia/Kolkata")];
    let connect = move |settings: &'static [(&'static str, &'static str)]| {
        tokio::task::spawn_blocking(move || RawClient::connect(port, "postgres", "postgres", settings))
    };
    let first = connect(SETTINGS).await??;
    // What a server says to these settings, through the router as a client of its own connection would see it.
    for (k, v) in [("application_name", "waiting app"), ("DateStyle", "German"), ("TimeZone", "Asia/Kolkata")] {
        assert!(first.params.iter().any(|(n, x)| n == k && x.starts_with(v)), "{k} = {v} in {:?}", first.params);
    }
    let holder = c.client().await?;
    holder.batch_execute("BEGIN; SELECT 1").await?;
    let t = Instant::now();
    let mut second = tokio::time::timeout(Duration::from_secs(5), connect(SETTINGS)).await???;
    assert!(t.elapsed() < Duration::from_secs(5), "connected at once: {:?}", t.elapsed());
    assert_eq!(second.params, first.params, "the same ParameterStatus as a startup that took a connection");
    // Its statement waits for the only connection, and runs once the transaction ends.
    let query = tokio::task::spawn_blocking(move || {
        let r = second.query("SELECT current_setting('DateStyle'), current_setting('application_name')");
        (second, r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!query.is_finished(), "the pool of one is taken");
    // Other settings: the server is asked, so this startup waits for the connection too.
    let other = connect(&[("DateStyle", "SQL")]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!other.is_finished(), "a startup with settings not seen before takes a connection");
    holder.batch_execute("COMMIT").await?;
    let (_second, replies) = tokio::time::timeout(Duration::from_secs(10), query).await??;
    let shown = integration::wire::outline(&replies?);
    assert!(shown.iter().any(|l| l.contains("German") && l.contains("waiting app")), "{shown:?}");
    let other = tokio::time::timeout(Duration::from_secs(10), other).await???;
    assert!(other.params.iter().any(|(n, v)| n == "DateStyle" && v.starts_with("SQL")), "{:?}", other.params);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_bounds_wait_and_idle_timeout() -> anyhow::Result<()> {
    let c = Cluster::hash(1, "pool-size,1\npool-timeout-ms,300\npool-idle-timeout,1\n")?;
    let mut a = c.client().await?;
    let b = c.client().await?;
    a.batch_execute("CREATE TABLE users (user_id bigint PRIMARY KEY)").await?;
    // a holds the only connection in a transaction: b waits pool-timeout-ms, then gets a clear error.
    let tx = a.transaction().await?;
    tx.execute("INSERT INTO users (user_id) VALUES ($1)", &[&1i64]).await?;
    let t = Instant::now();
    let e = b.query("SELECT * FROM users WHERE user_id = $1", &[&1i64]).await.unwrap_err();
    let e = e.as_db_error().expect("a router error");
    assert_eq!(e.code().code(), "53300", "{e}");
    assert!(e.message().contains("pool-size") && e.message().contains("pool-timeout-ms"), "{e}");
    assert!(t.elapsed() >= Duration::from_millis(250) && t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    tx.commit().await?;
    // Now it is free again.
    assert_eq!(b.query("SELECT * FROM users WHERE user_id = $1", &[&1i64]).await?.len(), 1);
    // Idle server connections are closed after pool-idle-timeout (1 s here).
    let direct = c.shards[0].client("postgres").await?;
    let count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shard-router'";
    let before: i64 = direct.query_one(count, &[]).await?.get(0);
    assert!(before >= 1);
    let mut after = before;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = direct.query_one(count, &[]).await?.get(0);
        if after == 0 {
            break;
        }
    }
    assert_eq!(after, 0, "idle connections closed");
    Ok(())
}

/// `INSERT INTO t VALUES (...)` without a column list makes the router read the key's position from a server,
/// once per session and table. In a transaction it reads it on the transaction's own connection (inside a
/// savepoint), not on a second one: with `pool-size 1` a second would never come (the transaction holds the
/// only one), and clients each in a transaction on a full pool would wait for each other. An error there (no
/// such table) is the server's, and fails the client's transaction as PostgreSQL would; every protocol path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_reads_key_positions_on_its_own_connection() -> anyhow::Result<()> {
    use integration::wire::{error_codes, RawClient, PATHS};
    let c = users_cluster().await?;
    let port = c.port;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for (k, path) in PATHS.into_iter().enumerate() {
            let run = |cl: &mut RawClient, sql: &str| -> anyhow::Result<Vec<String>> {
                let mut r = cl.send(path, sql)?;
                if cl.piped() {
                    r = cl.sync()?;
                }
                Ok(error_codes(&r))
            };
            // A transaction of `middle` that gives no error.
            let clean = |cl: &mut RawClient, middle: [String; 2]| -> anyhow::Result<()> {
                for sql in ["BEGIN".to_string(), middle[0].clone(), middle[1].clone(), "COMMIT".to_string()] {
                    assert_eq!(run(cl, &sql)?, Vec::<String>::new(), "{path:?}: {sql}");
                }
                Ok(())
            };
            // (A wait for a second connection would end in 53300: the transaction holds the shard's only one.)
            let mut cl = RawClient::connect(port, "postgres", "postgres", &[])?;
            clean(
                &mut cl,
                [
                    format!("INSERT INTO users (user_id, n) VALUES ({k}, 1)"),
                    format!("INSERT INTO users VALUES ({k}, 2)"),
                ],
            )?;
            // No such table: the server's error, and the transaction failed (as on one PostgreSQL).
            let mut cl = RawClient::connect(port, "postgres", "postgres", &[])?;
            assert!(run(&mut cl, "BEGIN")?.is_empty());
            assert!(run(&mut cl, &format!("INSERT INTO users (user_id, n) VALUES ({k}, 3)"))?.is_empty());
            assert_eq!(run(&mut cl, &format!("INSERT INTO no_such_table VALUES ({k})"))?, ["42P01"], "{path:?}");
            assert_eq!(run(&mut cl, &format!("INSERT INTO users VALUES ({k}, 4)"))?, ["25P02"], "{path:?}");
            assert!(run(&mut cl, "ROLLBACK")?.is_empty());
            // A table made in the transaction is seen by the lookup (on every shard the transaction joined).
            clean(
                &mut cl,
                [
                    format!("CREATE TABLE made_{k} (user_id bigint, n int)"),
                    format!("INSERT INTO made_{k} VALUES ({k}, 5)"),
                ],
            )?;
        }
        Ok(())
    })
    .await??;
    let rows = users_rows(&c).await?;
    assert_eq!(rows, (0..4i64).flat_map(|k| [(k, 1), (k, 2)]).collect::<Vec<_>>());
    Ok(())
}

/// Two shards with one server connection each (a wait for a second ends in 53300 after 1.5 s), and a table
/// `users` (user_id bigint, n int).
async fn users_cluster() -> anyhow::Result<Cluster> {
    let c = Cluster::hash(2, "pool-size,1\npool-timeout-ms,1500\n")?;
    c.client().await?.batch_execute("CREATE TABLE users (user_id bigint, n int)").await?;
    Ok(c)
}

/// The rows of `users` (user_id, n) in order, read through the router.
async fn users_rows(c: &Cluster) -> anyhow::Result<Vec<(i64, i32)>> {
    let rows = c.client().await?.query("SELECT user_id, n FROM users ORDER BY user_id, n", &[]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The exception to the test above: a positional INSERT in the same pipeline (before the Sync) as the
/// statements that opened the transaction, whose connection is busy with them until the Sync. The key's
/// position is then read on another connection — of a shard the session holds none of, so that it does not
/// wait for the very connection it holds (with `pool-size 1`, 53300 after `pool-timeout-ms`). Sessions in
/// turn, their transactions on either shard, with BEGIN and COMMIT and without (the pipeline's implicit
/// transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_reads_key_positions_on_a_shard_it_does_not_hold() -> anyhow::Result<()> {
    use integration::wire::{error_codes, outline, Path, RawClient};
    let c = users_cluster().await?;
    let port = c.port;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for k in 0..6 {
            let mut cl = RawClient::connect(port, "postgres", "postgres", &[])?;
            let inserts = [
                format!("INSERT INTO users (user_id, n) VALUES ({k}, 1)"),
                format!("INSERT INTO users VALUES ({k}, 2)"),
            ];
            let statements: Vec<String> = if k % 2 == 0 {
                [vec!["BEGIN".to_string()], inserts.to_vec(), vec!["COMMIT".to_string()]].concat()
            } else {
                inserts.to_vec()
            };
            for sql in &statements {
                assert!(cl.send(Path::Pipelined, sql)?.is_empty());
            }
            // (A wait for the connection the session holds could only end in 53300.)
            let r = cl.sync()?;
            assert_eq!(error_codes(&r), Vec::<String>::new(), "session {k}: {:?}", outline(&r));
        }
        Ok(())
    })
    .await??;
    let rows = users_rows(&c).await?;
    assert_eq!(rows, (0..6i64).flat_map(|k| [(k, 1), (k, 2)]).collect::<Vec<_>>());
    Ok(())
}
