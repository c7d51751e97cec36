//! tokio-postgres through the router: the extended protocol, prepared statements (kept working under
//! transaction pooling), parameters in binary format as shard keys, every type passing through as bytes,
//! transactions, session settings that follow the client and no one else.

use integration::Cluster;
use tokio_postgres::types::{FromSql, ToSql, Type};

/// A value as the server sent it, whatever its type: to compare bytes through the router and direct.
#[derive(Debug, PartialEq)]
struct Raw(Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

const SCHEMA: &str = "CREATE TABLE messages (user_id bigint, id int, body text, sid uuid, at timestamptz, meta jsonb, amount numeric, tags text[], PRIMARY KEY (user_id, id))";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_binary_keys_and_types() -> anyhow::Result<()> {
    let c = Cluster::hash(4, "pool-size,1\n")?;
    let db = c.client().await?;
    db.batch_execute(SCHEMA).await?;

    // Prepared once, executed with binary int8 keys on every shard through one-connection pools.
    let insert = db
        .prepare(
            "INSERT INTO messages (user_id, id, body, sid, at, meta, amount, tags) \
             VALUES ($1, $2, $3, $4::text::uuid, now(), '{\"k\": [1, 2]}', 12345.678, ARRAY['a', 'b'])",
        )
        .await?;
    for k in 0..40i64 {
        let sid = format!("00000000-0000-0000-0000-{k:012}");
        let params: [&(dyn ToSql + Sync); 4] = [&k, &(k as i32), &format!("m{k}"), &sid];
        assert_eq!(db.execute(&insert, &params).await?, 1);
    }
    for (shard, s) in c.shards.iter().enumerate() {
        let direct = s.client("postgres").await?;
        let rows = direct.query("SELECT user_id FROM messages", &[]).await?;
        assert_eq!(rows.len(), 10);
        assert!(rows.iter().all(|r| r.get::<_, i64>(0) % 4 == shard as i64));
    }

    // The same statement read through the router and directly: every column's bytes are identical.
    let select =
        db.prepare("SELECT user_id, id, body, sid, at, meta, amount, tags FROM messages WHERE user_id = $1").await?;
    for k in [0i64, 1, 2, 3, 17, 39] {
        let via = db.query_one(&select, &[&k]).await?;
        let direct = c.shards[(k % 4) as usize].client("postgres").await?;
        let d = direct.query_one(&direct.prepare(select_text()).await?, &[&k]).await?;
        for col in 0..8 {
            assert_eq!(via.get::<_, Raw>(col), d.get::<_, Raw>(col), "column {col} of key {k}");
        }
    }

    // A second client shares the one-connection pools: statements of both keep working, interleaved.
    let db2 = c.client().await?;
    let count2 = db2.prepare("SELECT count(*) FROM messages WHERE user_id = $1 AND id >= $2").await?;
    for k in 0..8i64 {
        let a: String = db.query_one(&select, &[&k]).await?.get(2);
        assert_eq!(a, format!("m{k}"));
        let n: i64 = db2.query_one(&count2, &[&k, &0i32]).await?.get(0);
        assert_eq!(n, 1);
    }

    // No key: the same prepared statement on every shard, rows concatenated.
    let all = db.query("SELECT id FROM messages WHERE body LIKE $1", &[&"m1%"]).await?;
    assert_eq!(all.len(), 11);

    // Transactions through tokio-postgres' own BEGIN/COMMIT: one on two shards rolls back on both when
    // dropped, and commits on both (two-phase commit).
    let mut db = db;
    let tx = db.transaction().await?;
    tx.execute("UPDATE messages SET body = 'changed' WHERE user_id = $1", &[&6i64]).await?;
    tx.execute("UPDATE messages SET body = 'changed' WHERE user_id = $1", &[&7i64]).await?;
    drop(tx); // rolls back
    let body: String = db.query_one("SELECT body FROM messages WHERE user_id = $1", &[&6i64]).await?.get(0);
    assert_eq!(body, "m6");
    let tx = db.transaction().await?;
    tx.execute("UPDATE messages SET body = 'changed' WHERE user_id = $1", &[&6i64]).await?;
    tx.execute("UPDATE messages SET body = 'changed' WHERE user_id = $1", &[&7i64]).await?;
    tx.commit().await?;
    let rows =
        db.query("SELECT body FROM messages WHERE user_id = ANY($1) ORDER BY user_id", &[&vec![6i64, 7]]).await?;
    let bodies: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(bodies, ["changed", "changed"]);
    Ok(())
}

fn select_text() -> &'static str {
    "SELECT user_id, id, body, sid, at, meta, amount, tags FROM messages WHERE user_id = $1"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_follow_their_client_only() -> anyhow::Result<()> {
    // One shard with one connection: every statement of both clients uses the same server connection.
    let c = Cluster::hash(1, "pool-size,1\n")?;
    let a = c.client().await?;
    let b = c.client().await?;
    a.batch_execute("SET statement_timeout = 4321").await?;
    let tb: String = b.query_one("SHOW statement_timeout", &[]).await?.get(0);
    assert_eq!(tb, "0", "right after a's SET, b does not see it");
    a.execute("SET application_name = 'client-a'", &[]).await?;
    let nb: String = b.query_one("SHOW application_name", &[]).await?.get(0);
    assert_ne!(nb, "client-a", "a SET in the extended protocol stays with its client too");
    let na: String = a.query_one("SHOW application_name", &[]).await?.get(0);
    assert_eq!(na, "client-a");
    for _ in 0..3 {
        let ta: String = a.query_one("SHOW statement_timeout", &[]).await?.get(0);
        let tb: String = b.query_one("SHOW statement_timeout", &[]).await?.get(0);
        assert_eq!(ta, "4321ms");
        assert_eq!(tb, "0");
    }
    a.batch_execute("RESET statement_timeout").await?;
    let ta: String = a.query_one("SHOW statement_timeout", &[]).await?.get(0);
    assert_eq!(ta, "0");
    for sql in ["SELECT pg_advisory_lock(42)", "SELECT pg_try_advisory_lock(1, 2)"] {
        let e = a.batch_execute(sql).await.unwrap_err();
        let e = e.as_db_error().expect("an error from the router");
        assert!(e.message().contains("pg_advisory_xact_lock"), "{e}");
        let e = a.query(sql, &[]).await.unwrap_err();
        assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("0A000"));
    }
    let mut a = a;
    let tx = a.transaction().await?;
    tx.query("SELECT pg_advisory_xact_lock(42)", &[]).await?;
    tx.commit().await?;
    let e = a.batch_execute("LISTEN events").await.unwrap_err();
    let e = e.as_db_error().expect("an error from the router");
    assert!(e.message().contains("pool-mode,session"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_reaches_the_running_query() -> anyhow::Result<()> {
    let c = Cluster::hash(2, "")?;
    let db = c.client().await?;
    db.batch_execute("CREATE TABLE users (user_id bigint PRIMARY KEY)").await?;
    db.execute("INSERT INTO users (user_id) VALUES (1)", &[]).await?;
    let token = db.cancel_token();
    let started = std::time::Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let e = db.query("SELECT pg_sleep(30) FROM users WHERE user_id = 1", &[]).await.unwrap_err();
    canceller.await??;
    let e = e.as_db_error().expect("the server's error");
    assert_eq!(e.code().code(), "57014", "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    // The connection and the session go on.
    let n: i64 = db.query_one("SELECT count(*) FROM users WHERE user_id = $1", &[&1i64]).await?.get(0);
    assert_eq!(n, 1);
    Ok(())
}

/// A client keeps its server connection between transactions, registered for its cancels; when another
/// client takes that connection (one connection in the pool), the first client's cancel must not reach the
/// second one's query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_never_reaches_the_query_of_the_client_that_took_the_connection() -> anyhow::Result<()> {
    let c = Cluster::hash(1, "pool-size,1\npool-timeout-ms,10000\n")?;
    let a = c.client().await?;
    let b = c.client().await?;
    // A's statement leaves A keeping the pool's one connection.
    a.query_one("SELECT 1", &[]).await?;
    let token = a.cancel_token();
    let sleeper = tokio::spawn(async move { b.query_one("SELECT pg_sleep(1.5)::text", &[]).await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await?;
    let row = sleeper.await?;
    assert!(row.is_ok(), "B's query was cancelled by A's cancel: {row:?}");
    // A's own statements, and its cancels, still work once the connection is free again.
    a.query_one("SELECT 1", &[]).await?;
    let token = a.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let e = a.query("SELECT pg_sleep(30)", &[]).await.unwrap_err();
    canceller.await??;
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("57014"), "{e}");
    Ok(())
}

/// tokio-postgres' `copy_in` sends COPY FROM STDIN through Parse/Bind/Execute and a Sync before the data
/// (which the server ignores during COPY): rows are split by key across the shards, outside a transaction
/// and inside one (where they commit with it). It used to hang, then to be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_through_the_extended_protocol() -> anyhow::Result<()> {
    let cluster = Cluster::hash(2, "")?;
    let mut c = cluster.client().await?;
    c.batch_execute("CREATE TABLE events (user_id bigint, n int)").await?;
    const COPY: &str = "COPY events (user_id, n) FROM STDIN";
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        send_rows(c.copy_in(COPY).await?, 0..10).await
    })
    .await
    .expect("copy_in answered within 10 s")?;
    assert_eq!(n, 10);
    // Inside a transaction: committed with it, or not at all.
    let tx = c.transaction().await?;
    assert_eq!(send_rows(tx.copy_in(COPY).await?, 10..20).await?, 10);
    tx.rollback().await?;
    let tx = c.transaction().await?;
    assert_eq!(send_rows(tx.copy_in(COPY).await?, 20..30).await?, 10);
    tx.commit().await?;
    for (shard, s) in cluster.shards.iter().enumerate() {
        let db = s.client("postgres").await?;
        let rows = db.query("SELECT user_id FROM events ORDER BY user_id", &[]).await?;
        let keys: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let want: Vec<i64> = (0..10).chain(20..30).filter(|k| k % 2 == shard as i64).collect();
        assert_eq!(keys, want, "shard {shard}");
    }
    // The session goes on.
    c.execute("INSERT INTO events (user_id, n) VALUES ($1, 1)", &[&5i64]).await?;
    let n: i64 = c.query_one("SELECT count(*) FROM events WHERE user_id = 5", &[]).await?.get(0);
    assert_eq!(n, 2);
    Ok(())
}

/// Sends rows `user_id\tuser_id` for `keys` through a COPY sink and finishes it.
async fn send_rows(
    sink: tokio_postgres::CopyInSink<bytes::Bytes>,
    keys: std::ops::Range<i64>,
) -> Result<u64, tokio_postgres::Error> {
    use futures_util::SinkExt;
    let data: String = keys.map(|k| format!("{k}\t{k}\n")).collect();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data)).await?;
    sink.finish().await
}

/// SET inside a transaction (held, or on a shard) takes effect for its client when the transaction commits,
/// not when it rolls back, and never reaches another client through the shared connection; RESET ALL goes
/// back to the startup packet's values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_inside_transactions_follow_their_client_only() -> anyhow::Result<()> {
    for shards in [1, 2] {
        let c = Cluster::hash(shards, "pool-size,1\n")?;
        let conn = format!("{} application_name=first-app", c.conn_str());
        let (a, a_conn) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
        tokio::spawn(a_conn);
        let b = c.client().await?;
        a.batch_execute("CREATE TABLE t (user_id bigint)").await?;
        // Committed: the client keeps it; the other client never sees it on the one shared connection.
        a.batch_execute("BEGIN; SET statement_timeout = 1234; SELECT * FROM t WHERE user_id = 1; COMMIT").await?;
        a.batch_execute("BEGIN").await?;
        a.batch_execute("SET lock_timeout = 4321").await?;
        a.batch_execute("SELECT * FROM t WHERE user_id = 1").await?;
        a.batch_execute("COMMIT").await?;
        assert_eq!(show(&b, "statement_timeout").await?, "0", "{shards} shard(s)");
        assert_eq!(show(&b, "lock_timeout").await?, "0", "{shards} shard(s)");
        assert_eq!(show(&a, "statement_timeout").await?, "1234ms", "{shards} shard(s)");
        assert_eq!(show(&a, "lock_timeout").await?, "4321ms", "{shards} shard(s)");
        // Rolled back: gone, as on a server.
        a.batch_execute("BEGIN; SET statement_timeout = 999; SELECT * FROM t WHERE user_id = 1; ROLLBACK").await?;
        assert_eq!(show(&a, "statement_timeout").await?, "1234ms", "{shards} shard(s)");
        assert_eq!(show(&b, "statement_timeout").await?, "0", "{shards} shard(s)");
        // RESET ALL: back to the startup packet's values.
        a.batch_execute("SET application_name = 'second-app'").await?;
        assert_eq!(show(&a, "application_name").await?, "second-app");
        a.batch_execute("RESET ALL").await?;
        assert_eq!(show(&a, "application_name").await?, "first-app", "{shards} shard(s)");
        assert_eq!(show(&a, "statement_timeout").await?, "0", "{shards} shard(s)");
    }
    Ok(())
}

/// `SHOW name` through the simple protocol.
async fn show(client: &tokio_postgres::Client, name: &str) -> anyhow::Result<String> {
    let rows = client.simple_query(&format!("SHOW {name}")).await?;
    let v = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    Ok(v.unwrap_or_default())
}
