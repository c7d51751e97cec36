//! `rebalance move range:NODE@START` through the real binary: the part of a node's range from a split point
//! up moves to another node while a writer inserts and updates keys on both sides of the split.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use integration::{Cluster, PgServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_top_of_a_range_moves_under_writes() -> Result<()> {
    let servers = (0..2).map(|_| PgServer::start_with(&["wal_level=logical"])).collect::<Result<Vec<_>>>()?;
    let head =
        "shard-strategy,range\nshard-key,user_id\nshard-ranges,0-999999:shard1,1000000-:shard2\nrouter-auth,trust\n";
    let names = ["shard1", "shard2"];
    let cluster =
        Cluster::with_servers(servers, head, |i, s| format!("shard-node-{},{}\n", names[i], s.url("postgres")))?;
    let config = cluster.config_path.display().to_string();
    let c = cluster.client().await?;
    c.batch_execute("CREATE TABLE events (user_id bigint PRIMARY KEY, n int NOT NULL)").await?;
    let shard1 = cluster.shards[0].client("postgres").await?;
    let shard2 = cluster.shards[1].client("postgres").await?;
    shard2.batch_execute("INSERT INTO events SELECT k, 0 FROM generate_series(1000000, 1999999, 20) k").await?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let client = cluster.client().await?;
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut acked, mut bumped, mut errors) = (Vec::new(), std::collections::HashMap::new(), Vec::new());
            let started = Instant::now();
            for i in 0..20_000i64 {
                if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                // New keys above and below the split; updates of preloaded keys on both sides.
                let k = if i % 2 == 0 { 1_500_001 + i * 20 } else { 1_000_001 + i * 20 };
                match client.execute("INSERT INTO events (user_id, n) VALUES ($1, 0)", &[&k]).await {
                    Ok(_) => acked.push(k),
                    Err(e) => errors.push(format!("insert {k}: {e:?}")),
                }
                let u = if i % 2 == 0 { 1_500_000 + (i % 100) * 20 } else { 1_400_000 + (i % 100) * 20 };
                match client.simple_query(&format!("UPDATE events SET n = n + 1 WHERE user_id = {u}")).await {
                    Ok(_) => *bumped.entry(u).or_insert(0) += 1,
                    Err(e) => errors.push(format!("update {u}: {e:?}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (acked, bumped, errors)
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_rebalance"))
                .args(["--config", &config, "move", "range:shard2@1500000", "--to", "shard1", "--json"])
                .output()
        }
    })
    .await??;
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let o: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    println!("move of range:shard2@1500000: {o}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, bumped, errors) = writer.await?;
    assert!(errors.is_empty(), "the writer saw errors: {errors:?}");

    for k in &acked {
        let (in1, in2) = (on(&shard1, *k).await?, on(&shard2, *k).await?);
        let expected = if *k >= 1_500_000 { (1, 0) } else { (0, 1) };
        assert_eq!((in1, in2), expected, "key {k}");
    }
    for (k, n) in &bumped {
        let db = if *k >= 1_500_000 { &shard1 } else { &shard2 };
        let got: i32 = db.query_one("SELECT n FROM events WHERE user_id = $1", &[k]).await?.get(0);
        assert_eq!(got, *n, "key {k}");
    }
    let above: i64 = shard2.query_one("SELECT count(*) FROM events WHERE user_id >= 1500000", &[]).await?.get(0);
    assert_eq!(above, 0, "nothing from the split point up is left on shard2");
    let below: i64 =
        shard1.query_one("SELECT count(*) FROM events WHERE user_id BETWEEN 1000000 AND 1499999", &[]).await?.get(0);
    assert_eq!(below, 0, "the part below the split stayed on shard2");
    assert_eq!(shard2.query_one("SELECT count(*) FROM pg_replication_slots", &[]).await?.get::<_, i64>(0), 0);
    // The router places both sides of the split.
    let c = cluster.client().await?;
    c.execute("INSERT INTO events (user_id, n) VALUES ($1, 9)", &[&2_999_999i64]).await?;
    c.execute("INSERT INTO events (user_id, n) VALUES ($1, 9)", &[&1_499_999i64]).await?;
    assert_eq!(on(&shard1, 2_999_999).await?, 1);
    assert_eq!(on(&shard2, 1_499_999).await?, 1);
    let status = Command::new(env!("CARGO_BIN_EXE_rebalance")).args(["--config", &config, "status"]).output()?;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("range:shard2@1500000 on shard1"), "{text}");
    Ok(())
}

async fn on(db: &tokio_postgres::Client, k: i64) -> Result<i64> {
    Ok(db.query_one("SELECT count(*) FROM events WHERE user_id = $1", &[&k]).await?.get(0))
}
