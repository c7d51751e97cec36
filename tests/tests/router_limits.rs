//! Limits: each a config key with PostgreSQL's SQLSTATE and a message naming the key, and a well-behaved
//! client beside the one past the limit is served all the same: a client that sends nothing (or half a
//! startup packet), an oversized message, too many extended-protocol bytes without a Sync, too many clients
//! (in all and per user), a client idle too long outside and inside a transaction, statements past a user's
//! or a tenant's rate (`router-rate-limit-*`, 53400).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use integration::wire::{error_codes, RawClient, Reply};
use integration::Cluster;

/// Every reply up to the end of the connection (the FATAL a limit sends, then the close).
fn until_closed(cl: &mut RawClient) -> Vec<Reply> {
    let mut out = Vec::new();
    while let Ok(r) = cl.reply() {
        out.push(r);
    }
    out
}

/// The ErrorResponse of a refused startup, as text.
fn refused(port: u16, user: &str, database: &str) -> String {
    match RawClient::connect(port, user, database, &[]) {
        Ok(_) => String::new(),
        Err(e) => format!("{e:#}"),
    }
}

/// A well-behaved client: one statement, answered.
async fn served(c: &Cluster) -> anyhow::Result<()> {
    let db = c.client().await?;
    let row = db.query_one("SELECT 6 * 7", &[]).await?;
    assert_eq!(row.get::<_, i32>(0), 42);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_startups_oversized_messages_and_buffers_are_cut_off() -> anyhow::Result<()> {
    let c = Cluster::hash(
        2,
        "router-startup-timeout-ms,3000\nrouter-max-message-bytes,65536\nrouter-max-client-buffer-bytes,200000\n",
    )?;
    // A client that connects and sends nothing, and one that sends half a startup packet.
    let mut silent = TcpStream::connect(("127.0.0.1", c.port))?;
    let mut half = TcpStream::connect(("127.0.0.1", c.port))?;
    half.write_all(&[0, 0, 0, 40, 0, 3])?;
    let started = Instant::now();
    // Meanwhile another client is served (long before the silent ones are cut off).
    served(&c).await?;
    assert!(started.elapsed() < Duration::from_millis(3000), "the well-behaved client waited");
    for s in [&mut silent, &mut half] {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?; // the router closes it
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("57014") && text.contains("router-startup-timeout-ms"), "{text}");
    }
    assert!(started.elapsed() >= Duration::from_millis(2900), "closed before the timeout");

    // A message over router-max-message-bytes: FATAL 08P01 naming the key; others go on.
    let mut big = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    let mut other = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    let sql = format!("SELECT '{}'", "x".repeat(100_000));
    let r = big.send_raw(&query_bytes(&sql)).map(|_| until_closed(&mut big))?;
    assert_eq!(error_codes(&r), ["08P01"], "{r:?}");
    assert!(format!("{r:?}").contains("router-max-message-bytes"), "{r:?}");
    // Just under it is fine.
    let r = other.query(&format!("SELECT length('{}')", "x".repeat(60_000)))?;
    assert!(r.contains(&Reply::Row(vec![Some("60000".into())])), "{r:?}");

    // Extended-protocol messages without a Sync past router-max-client-buffer-bytes: 54000.
    let mut piling = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    let mut parses = Vec::new();
    for k in 0..10 {
        parses.extend(parse_bytes(&format!("s{k}"), &format!("SELECT '{}'", "y".repeat(30_000))));
    }
    piling.send_raw(&parses)?;
    let r = until_closed(&mut piling);
    assert_eq!(error_codes(&r), ["54000"], "{r:?}");
    assert!(format!("{r:?}").contains("router-max-client-buffer-bytes"), "{r:?}");
    let r = other.query("SELECT 1")?;
    assert!(error_codes(&r).is_empty(), "{r:?}");
    served(&c).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_clients_are_refused_in_all_and_per_user() -> anyhow::Result<()> {
    let c = Cluster::hash(
        2,
        "router-max-clients,4\nrouter-max-clients-per-user,2\nrouter-user-alice,a\nrouter-user-bob,b\nrouter-admin-users,postgres\n",
    )?;
    let a1 = RawClient::connect(c.port, "alice", "postgres", &[])?;
    let _a2 = RawClient::connect(c.port, "alice", "postgres", &[])?;
    let e = refused(c.port, "alice", "postgres");
    assert!(e.contains("53300") && e.contains("router-max-clients-per-user is 2"), "{e}");
    let _b1 = RawClient::connect(c.port, "bob", "postgres", &[])?;
    let _p1 = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    let e = refused(c.port, "bob", "postgres");
    assert!(e.contains("53300") && e.contains("router-max-clients is 4"), "{e}");
    // The admin console stays reachable.
    let mut admin = RawClient::connect(c.port, "postgres", "shard_admin", &[])?;
    let r = admin.query("SHOW CLIENTS")?;
    assert!(error_codes(&r).is_empty(), "{r:?}");
    // A place freed is taken again.
    drop(a1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match RawClient::connect(c.port, "alice", "postgres", &[]) {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline && format!("{e:#}").contains("53300") => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_closed_outside_and_inside_transactions() -> anyhow::Result<()> {
    let c = Cluster::hash(2, "router-client-idle-timeout-s,1\nrouter-idle-transaction-timeout-s,1\n")?;
    let mut setup = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    let r = setup.query("CREATE TABLE notes (user_id bigint, body text)")?;
    assert!(error_codes(&r).is_empty(), "{r:?}");
    drop(setup);

    let mut idle = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    let mut in_txn = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    for sql in ["BEGIN", "INSERT INTO notes VALUES (1, 'never committed')"] {
        let r = in_txn.query(sql)?;
        assert!(error_codes(&r).is_empty(), "{r:?}");
    }
    // A client that keeps talking is not idle.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(400));
        served(&c).await?;
    }
    let r = until_closed(&mut idle);
    assert_eq!(error_codes(&r), ["57P05"], "{r:?}");
    assert!(format!("{r:?}").contains("router-client-idle-timeout-s is 1"), "{r:?}");
    let r = until_closed(&mut in_txn);
    assert_eq!(error_codes(&r), ["25P03"], "{r:?}");
    assert!(format!("{r:?}").contains("router-idle-transaction-timeout-s is 1"), "{r:?}");
    // Its transaction was rolled back.
    let db = c.shards[1].client("postgres").await?;
    let n: i64 = db.query_one("SELECT count(*) FROM notes", &[]).await?.get(0);
    assert_eq!(n, 0);
    Ok(())
}

fn query_bytes(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    let mut out = vec![b'Q'];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn parse_bytes(name: &str, sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(sql.as_bytes());
    body.push(0);
    body.extend_from_slice(&0i16.to_be_bytes());
    let mut out = vec![b'P'];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Fan-outs take their connections all or none: many clients reading and writing several shards at once
/// through pools of one connection per shard all finish, none timing out on another's half-taken set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fan_outs_on_one_connection_pools_finish() -> anyhow::Result<()> {
    let c = Cluster::hash(3, "pool-size,1\npool-timeout-ms,5000\n")?;
    let db = c.client().await?;
    db.batch_execute("CREATE TABLE t (user_id bigint PRIMARY KEY, n int NOT NULL)").await?;
    db.batch_execute("INSERT INTO t VALUES (0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0)").await?;
    let mut tasks = Vec::new();
    for k in 0..6i64 {
        let db = c.client().await?;
        tasks.push(tokio::spawn(async move {
            for i in 0..25i64 {
                let (a, b) = ((k + i) % 6, (k + i + 1) % 6);
                db.query("SELECT count(*), sum(n) FROM t", &[]).await?;
                db.execute("UPDATE t SET n = n + 1 WHERE user_id IN ($1, $2)", &[&a, &b]).await?;
                db.query("SELECT * FROM t WHERE user_id = ANY($1)", &[&vec![a, b]]).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let total: i64 = db.query_one("SELECT sum(n)::bigint FROM t", &[]).await?.get(0);
    assert_eq!(total, 6 * 25 * 2);
    Ok(())
}

/// Under the tenant strategy, `router-max-clients-per-tenant` bounds one tenant's connections; another tenant
/// is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_clients_of_one_tenant_are_refused() -> anyhow::Result<()> {
    let c = Cluster::start(
        2,
        "shard-strategy,tenant\nshard-tenant-db-prefix,gb_tenant_\nshard-auto-create,true\nrouter-auth,trust\n\
         router-max-clients-per-tenant,2\n",
        |i, s| format!("shard-node-n{i},{}\n", s.url("postgres")),
    )?;
    let _a1 = RawClient::connect(c.port, "postgres", "gb_tenant_acme", &[])?;
    let _a2 = RawClient::connect(c.port, "postgres", "gb_tenant_acme", &[])?;
    let e = refused(c.port, "postgres", "gb_tenant_acme");
    assert!(
        e.contains("53300")
            && e.contains("tenant")
            && e.contains("acme")
            && e.contains("router-max-clients-per-tenant is 2"),
        "{e}"
    );
    let mut beta = RawClient::connect(c.port, "postgres", "gb_tenant_beta", &[])?;
    let r = beta.query("SELECT current_database()")?;
    assert!(r.contains(&Reply::Row(vec![Some("gb_tenant_beta".into())])), "{r:?}");
    Ok(())
}

/// A tokio-postgres client through `c`'s router as `user` on `database`.
async fn client_as(c: &Cluster, user: &str, database: &str) -> anyhow::Result<tokio_postgres::Client> {
    let conn = format!("host=127.0.0.1 port={} user={user} dbname={database}", c.port);
    let (client, conn) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// The SQLSTATE of a failed statement.
fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_past_a_users_rate_are_refused_on_every_path() -> anyhow::Result<()> {
    // 10 statements a minute with bursts of 10: the 11th in a row is refused (the bucket refills one
    // statement every 6 s, longer than the test needs).
    let http = integration::free_port();
    let c = Cluster::hash(
        2,
        &format!(
            "router-rate-limit-statements,10\nrouter-rate-limit-window-s,60\nrouter-rate-limit-burst,10\nrouter-http,127.0.0.1:{http}\n"
        ),
    )?;
    let noisy = client_as(&c, "alice", "postgres").await?;
    noisy.batch_execute("CREATE TABLE t (user_id bigint PRIMARY KEY, n int)").await?;
    let insert = noisy.prepare("INSERT INTO t VALUES ($1, 0)").await?; // (Parse/Describe: not a statement run)
                                                                       // Simple protocol, unnamed statements, a named prepared statement: 9 more to the burst's 10.
    for k in 0..3i64 {
        noisy.simple_query(&format!("SELECT * FROM t WHERE user_id = {k}")).await?;
        noisy.query("SELECT * FROM t WHERE user_id = $1", &[&k]).await?;
        noisy.execute(&insert, &[&k]).await?;
    }
    // Past it: refused with 53400 naming the user and the keys, through each path; the session goes on.
    let checks: Vec<Result<u64, tokio_postgres::Error>> = vec![
        noisy.simple_query("SELECT * FROM t WHERE user_id = 1").await.map(|_| 0),
        noisy.query("SELECT * FROM t WHERE user_id = $1", &[&1i64]).await.map(|_| 0),
        noisy.execute(&insert, &[&100i64]).await,
    ];
    for r in checks {
        let e = r.expect_err("past the rate");
        let db = e.as_db_error().expect("an ErrorResponse");
        assert_eq!(db.code().code(), "53400", "{db:?}");
        assert!(
            db.message().contains("user \"alice\"") && db.message().contains("router-rate-limit-statements"),
            "{}",
            db.message()
        );
    }
    // Pipelined (two statements before one Sync each, sent together): both refused.
    let (x, y) =
        tokio::join!(noisy.query("SELECT * FROM t WHERE user_id = $1", &[&1i64]), noisy.execute(&insert, &[&101i64]));
    assert_eq!(
        (code(&x.expect_err("past the rate")), code(&y.expect_err("past the rate"))),
        ("53400".into(), "53400".into())
    );
    // Nothing refused ran.
    let n: i64 = c.client().await?.query_one("SELECT count(*) FROM t WHERE user_id IN (100, 101)", &[]).await?.get(0);
    assert_eq!(n, 0);
    // Another user is served meanwhile.
    let calm = client_as(&c, "bob", "postgres").await?;
    for k in 0..5i64 {
        calm.query("SELECT * FROM t WHERE user_id = $1", &[&k]).await?;
    }
    let e = noisy.batch_execute("BEGIN").await.expect_err("BEGIN is a statement too");
    assert_eq!(code(&e), "53400");
    // What ends a transaction is never refused: an open transaction can always be let go of.
    noisy.batch_execute("ROLLBACK").await?;
    noisy.execute("ROLLBACK", &[]).await?;
    let other = client_as(&c, "alice", "postgres").await?;
    assert_eq!(code(&other.simple_query("SELECT 1").await.expect_err("one bucket per user")), "53400");
    // Counted in /metrics: 3 paths, 2 pipelined, BEGIN, the other connection.
    let metrics =
        tokio::process::Command::new("curl").args(["-s", &format!("http://127.0.0.1:{http}/metrics")]).output().await?;
    let metrics = String::from_utf8(metrics.stdout)?;
    assert!(metrics.contains("shard_router_rate_limited_total{bucket=\"user\"} 7"), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_past_a_tenants_rate_are_refused() -> anyhow::Result<()> {
    let c = integration::Cluster::start(
        2,
        "shard-strategy,tenant\nshard-tenant-db-prefix,gb_tenant_\nshard-auto-create,true\nrouter-auth,trust\n\
         router-rate-limit-statements,6\nrouter-rate-limit-window-s,60\n",
        |i, s| format!("shard-node-{i},{}\n", s.url("postgres")),
    )?;
    // Two users on tenant acme share its bucket (6); each user's own bucket (6) is not the one that runs out.
    let (a, b) = (client_as(&c, "alice", "gb_tenant_acme").await?, client_as(&c, "bob", "gb_tenant_acme").await?);
    for _ in 0..3 {
        a.simple_query("SELECT 1").await?;
        b.query("SELECT 1", &[]).await?;
    }
    for r in [a.simple_query("SELECT 1").await.map(|_| ()), b.query("SELECT 1", &[]).await.map(|_| ())] {
        let e = r.expect_err("past the tenant's rate");
        let db = e.as_db_error().expect("an ErrorResponse");
        assert_eq!(db.code().code(), "53400");
        assert!(db.message().contains("tenant \"acme\""), "{}", db.message());
    }
    // Another tenant, by the same user: served.
    let globex = client_as(&c, "carol", "gb_tenant_globex").await?;
    for _ in 0..5 {
        globex.simple_query("SELECT 1").await?;
    }
    Ok(())
}
