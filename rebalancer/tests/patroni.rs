//! A bucket moves off a node managed by a real Patroni cluster. Patroni drops replication slots it does not
//! know within a loop (shown first with a stray slot), so the move registers its slot as a Patroni permanent
//! slot (`PATCH /config`) and removes it at cleanup; a writer through the router sees no error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use integration::{Cluster, PgServer};
use shardmap::hash::{hash_key, reduce};
use shardmap::KeyValue;

const BUCKETS: u32 = 16;

async fn slots(db: &tokio_postgres::Client) -> Result<Vec<String>> {
    Ok(db
        .query("SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'logical'", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_moves_off_a_patroni_cluster() -> Result<()> {
    let patroni = tokio::task::spawn_blocking(|| integration::patroni::PatroniCluster::start(2)).await??;
    let leader = patroni.wait_leader(Duration::from_secs(30))?;
    let first = &patroni.members[patroni.member_index(&leader)];
    let (db, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={} user=postgres dbname=postgres", first.pg_port),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);

    // The trap: Patroni drops a logical slot it does not know as soon as it re-reads its slots (here,
    // because a permanent slot was added to its config) — while a permanent slot is kept.
    db.batch_execute("SELECT pg_create_logical_replication_slot('stray', 'pgoutput')").await?;
    let patch = |body: &str| {
        std::process::Command::new("curl")
            .args(["-s", "-X", "PATCH", "-H", "content-type: application/json", "-d", body])
            .arg(format!("http://127.0.0.1:{}/config", first.api_port))
            .output()
    };
    patch(r#"{"slots": {"keeper": {"type": "logical", "database": "postgres", "plugin": "pgoutput"}}}"#)?;
    let t = Instant::now();
    loop {
        let s = slots(&db).await?;
        if !s.contains(&"stray".to_string()) && s.contains(&"keeper".to_string()) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "Patroni did not drop the stray slot / make the permanent one: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "Patroni dropped a slot it did not know, and made the permanent one, {:?} after the config change",
        t.elapsed()
    );
    patch(r#"{"slots": {"keeper": null}}"#)?;
    let t = Instant::now();
    while slots(&db).await?.contains(&"keeper".to_string()) {
        assert!(t.elapsed() < Duration::from_secs(20), "Patroni did not drop the unregistered slot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let target = PgServer::start_with(&["wal_level=logical"])?;
    let head = format!(
        "shard-strategy,hash\nshard-count,2\nshard-key,user_id\nshard-algorithm,hash-buckets\nshard-buckets,{BUCKETS}\n\
         router-auth,trust\npatroni-interval-ms,200\n\
         shard-node-0,postgres://postgres@127.0.0.1:{}/postgres\nshard-node-0-patroni,{}\n",
        first.pg_port,
        patroni.api_urls().join(",")
    );
    let cluster = Cluster::with_servers(vec![target], &head, |_, s| format!("shard-node-1,{}\n", s.url("postgres")))?;
    let config = cluster.config_path.display().to_string();
    let c = cluster.client().await?;
    c.batch_execute("CREATE TABLE events (user_id bigint PRIMARY KEY, n int NOT NULL)").await?;
    let b = 4u32; // on node 0
    let bucket_of = |k: i64| reduce(hash_key(&KeyValue::Int(k)), BUCKETS);
    let slot = shardmap::hash::sql_slot_expr("k", shardmap::KeyType::Int, BUCKETS);
    db.batch_execute(&format!(
        "INSERT INTO events SELECT k, 0 FROM generate_series(10000000, 10200000) k WHERE {slot} = {b}"
    ))
    .await?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let client = cluster.client().await?;
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut acked, mut errors) = (Vec::new(), Vec::new());
            let started = Instant::now();
            for k in (1..).filter(|k| bucket_of(*k) == b).take(10_000) {
                if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(90) {
                    break;
                }
                match client.execute("INSERT INTO events (user_id, n) VALUES ($1, 1)", &[&k]).await {
                    Ok(_) => acked.push(k),
                    Err(e) => errors.push(format!("{k}: {e:?}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (acked, errors)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let unit = format!("bucket:{b}");
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        let unit = unit.clone();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_rebalance"))
                .args(["--config", &config, "move", &unit, "--to", "1", "--json"])
                .output()
        }
    })
    .await??;
    assert!(
        out.status.success(),
        "{}\n{}\n--- the target's log\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cluster.shards[0].log(),
        patroni.logs()
    );
    let o: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    println!("move off the Patroni cluster: {o}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, errors) = writer.await?;
    assert!(errors.is_empty(), "the writer saw errors: {errors:?}");
    assert!(acked.len() > 50);

    let target = cluster.shards[0].client("postgres").await?;
    for k in &acked {
        let n: i64 = target.query_one("SELECT count(*) FROM events WHERE user_id = $1", &[k]).await?.get(0);
        assert_eq!(n, 1, "key {k} on the target");
    }
    let cond = shardmap::hash::sql_slot_expr("user_id", shardmap::KeyType::Int, BUCKETS);
    let left: i64 = db.query_one(&format!("SELECT count(*) FROM events WHERE {cond} = {b}"), &[]).await?.get(0);
    assert_eq!(left, 0, "nothing of the bucket is left on the Patroni cluster");
    // No slot left, and none registered in Patroni's config.
    assert!(slots(&db).await?.is_empty(), "{:?}", slots(&db).await?);
    let config_json = std::process::Command::new("curl")
        .args(["-s", &format!("http://127.0.0.1:{}/config", first.api_port)])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&config_json.stdout)?;
    assert!(v["slots"].as_object().is_none_or(|s| s.is_empty()), "Patroni's config still has slots: {v}");
    Ok(())
}
