//! Failover without Patroni: a node URL with two hosts (a primary and its streaming standby). While a client
//! writes through the router at a steady rate, the primary is stopped and the standby promoted: the router
//! finds the new primary by itself, statements that arrive in between wait for it instead of failing, and
//! every acknowledged row is on the new primary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use integration::{Cluster, PgServer};

/// Writes `INSERT`s through the router until `stop` or the bounds, keys from `first` up, in the simple
/// protocol or (`extended`) with a parameter; returns (acknowledged keys, errors, latencies).
async fn writer(
    client: tokio_postgres::Client,
    stop: Arc<std::sync::atomic::AtomicBool>,
    first: i64,
    extended: bool,
) -> (Vec<i64>, Vec<String>, Vec<Duration>) {
    let (mut acked, mut errors, mut lat) = (Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    for i in first..first + 20_000 {
        if stop.load(std::sync::atomic::Ordering::Relaxed) || start.elapsed() > Duration::from_secs(60) {
            break;
        }
        let t = Instant::now();
        let r = if extended {
            client.execute("INSERT INTO events (user_id, n) VALUES ($1, 1)", &[&i]).await.map(drop)
        } else {
            client.simple_query(&format!("INSERT INTO events (user_id, n) VALUES ({i}, 0)")).await.map(drop)
        };
        match r {
            Ok(()) => acked.push(i),
            Err(e) => errors.push(format!("{i}: {e:?}")),
        }
        lat.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (acked, errors, lat)
}

fn report(what: &str, lat: &mut [Duration]) {
    lat.sort();
    let p = |q: f64| lat.get(((lat.len() as f64 - 1.0) * q) as usize).copied().unwrap_or_default();
    println!(
        "{what}: {} statements, stall p50 {:?} p99 {:?} max {:?}",
        lat.len(),
        p(0.5),
        p(0.99),
        lat.last().copied().unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_node_follows_a_promoted_standby() -> Result<()> {
    let primary = PgServer::start()?;
    primary.client("postgres").await?.batch_execute("CREATE TABLE events (user_id bigint PRIMARY KEY, n int)").await?;
    let standby = primary.standby()?;
    let head = format!(
        "shard-strategy,hash\nshard-count,1\nshard-key,user_id\nrouter-auth,trust\npatroni-interval-ms,200\n\
         shard-node-0,postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres\n",
        primary.port, standby.port
    );
    let cluster = Cluster::with_servers(Vec::new(), &head, |_, _| String::new())?;
    // The first statements find the primary among the two hosts.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let simple = tokio::spawn(writer(cluster.client().await?, stop.clone(), 0, false));
    let extended = tokio::spawn(writer(cluster.client().await?, stop.clone(), 1_000_000, true));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The primary goes away (fast shutdown: its sessions get 57P01); the standby is promoted a second later.
    let failover = tokio::task::spawn_blocking(move || -> Result<(PgServer, Instant)> {
        primary.stop("fast")?;
        let stopped = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        standby.promote()?;
        drop(primary);
        Ok((standby, stopped))
    });
    let (new_primary, stopped) = failover.await??;
    let promoted = stopped.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut acked, mut errors, mut lat) = simple.await?;
    let (acked_x, errors_x, mut lat_x) = extended.await?;
    println!("promoted {promoted:?} after the stop");
    report("multi-host failover, simple protocol", &mut lat);
    report("multi-host failover, extended protocol", &mut lat_x);
    acked.extend(acked_x);
    errors.extend(errors_x);

    assert!(errors.is_empty(), "statements failed during the failover: {errors:?}");
    assert!(acked.len() > 400, "the writer made too little progress: {}", acked.len());
    let db = new_primary.client("postgres").await?;
    let rows = db.query("SELECT user_id FROM events", &[]).await?;
    let on_new: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let lost: Vec<i64> = acked.iter().filter(|k| !on_new.contains(k)).copied().collect();
    assert!(lost.is_empty(), "{} acknowledged rows are missing on the new primary: {lost:?}", lost.len());
    // Writes after the failover went to the new primary through the router.
    let c = cluster.client().await?;
    c.simple_query("INSERT INTO events (user_id, n) VALUES (-1, -1)").await?;
    assert_eq!(db.query_one("SELECT n FROM events WHERE user_id = -1", &[]).await?.get::<_, i32>(0), -1);
    Ok(())
}
