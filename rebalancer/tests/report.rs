//! `rebalance report` through the real binary, on real shards filled through the router.

use std::process::Command;

use anyhow::Result;
use integration::Cluster;

fn rebalance(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rebalance")).args(args).output().expect("the rebalance binary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_shows_rows_bytes_units_and_skew() -> Result<()> {
    let http = integration::free_port();
    let cluster = Cluster::hash(
        2,
        &format!(
            "shard-algorithm,hash-buckets\nshard-buckets,16\nshard-global-tables,bots\nrouter-http,127.0.0.1:{http}\n"
        ),
    )?;
    let c = cluster.client().await?;
    c.batch_execute("CREATE TABLE messages (user_id bigint, body text); CREATE TABLE bots (id int)").await?;
    for k in 0..20i64 {
        c.execute("INSERT INTO messages (user_id, body) VALUES ($1, 'x')", &[&k]).await?;
    }
    // A hot key: 80 more rows for user 7.
    for _ in 0..80 {
        c.execute("INSERT INTO messages (user_id, body) VALUES ($1, 'hot')", &[&7i64]).await?;
    }
    c.batch_execute("INSERT INTO bots (id) VALUES (1)").await?;
    let config = cluster.config_path.display().to_string();

    let out = rebalance(&["--config", &config, "report", "--format", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let nodes = r["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2);
    let total: i64 = nodes.iter().map(|n| n["rows"].as_i64().unwrap()).sum();
    assert_eq!(total, 100, "rows of sharded tables: {r}");
    let tables = r["tables"].as_array().expect("tables");
    let bots: Vec<&serde_json::Value> = tables.iter().filter(|t| t["table"] == "bots").collect();
    assert_eq!(bots.len(), 2, "a global table is on every node");
    assert!(bots.iter().all(|t| t["sharded"] == false && t["rows"] == 1));
    assert!(tables.iter().all(|t| t["bytes"].as_i64() > Some(0)));
    // The hot key's bucket is the largest unit.
    let shard0 = cluster.shards[0].client("postgres").await?;
    let slot = shardmap::hash::sql_slot_expr("7", shardmap::KeyType::Int, 16);
    let bucket: i64 = shard0.query_one(&format!("SELECT ({slot})::int8"), &[]).await?.get(0);
    assert_eq!(r["top_units"][0]["unit"], format!("bucket:{bucket}"), "{r}");
    assert!(r["top_units"][0]["rows"].as_i64() >= Some(81));
    let skew = r["skew"].as_array().expect("skew");
    let messages = skew.iter().find(|s| s["table"] == "messages").expect("messages' skew");
    assert!(messages["max_over_mean"].as_f64() > Some(1.3), "{messages}");
    assert!(skew.iter().any(|s| s["table"] == "(all sharded tables)"));

    let out = rebalance(&["--config", &config, "report"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("skew of rows") && text.contains("bucket:"), "{text}");
    let out = rebalance(&["--config", &config, "report", "--format", "csv"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("kind,node,name,rows,bytes,statements_per_s,p99_ms\n") && text.contains("table,0,messages,"),
        "{text}"
    );
    let html = tempfile_path("balance.html");
    let out = rebalance(&["--config", &config, "report", "--format", "html", "--out", &html]);
    assert!(out.status.success());
    let page = std::fs::read_to_string(&html)?;
    assert!(page.contains("<svg") && page.contains("Shard balance"), "{page}");
    std::fs::remove_file(&html)?;

    // With the router's metrics: statements per second and p99 per node, sampled while a client reads.
    let reader = cluster.client().await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut k = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && k < 100_000 {
                reader.query("SELECT body FROM messages WHERE user_id = $1", &[&(k % 20)]).await?;
                k += 1;
            }
            anyhow::Ok(k)
        })
    };
    let metrics = format!("http://127.0.0.1:{http}/metrics");
    let args = ["--config", &config, "report", "--format", "json", "--metrics", &metrics, "--sample-ms", "1000"];
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || Command::new(env!("CARGO_BIN_EXE_rebalance")).args(&args).output())
        .await??;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = load.await??;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    for n in r["nodes"].as_array().expect("nodes") {
        assert!(n["statements_per_s"].as_f64() > Some(1.0), "{n} ({sent} statements sent)");
        assert!(n["p99_ms"].as_f64() > Some(0.0), "{n}");
    }

    // A config that does not load: exit status 2 and the reason.
    let out = rebalance(&["--config", "/nonexistent/config.csv", "report"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/config.csv"));
    Ok(())
}

fn tempfile_path(name: &str) -> String {
    std::env::temp_dir().join(format!("rebalance-test-{}-{name}", std::process::id())).display().to_string()
}
