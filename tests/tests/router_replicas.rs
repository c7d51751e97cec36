//! `shard-read-replicas`: reads outside a transaction go to a standby whose replay lag is under
//! `shard-max-replica-lag-bytes`, in the simple and the extended protocol; writes, reads in a transaction,
//! reads a standby refuses (`FOR UPDATE`) and reads while the standby lags go to the primary.

use std::time::{Duration, Instant};

use anyhow::Result;
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
