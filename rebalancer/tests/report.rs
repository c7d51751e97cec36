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

    // Prometheus text: HELP and TYPE for every family, and the JSON format's figures.
    let out = rebalance(&["--config", &config, "report", "--format", "prom"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let prom = prom_samples(&String::from_utf8(out.stdout)?);
    for n in nodes {
        let node = n["node"].as_str().expect("a node name");
        let labels = format!("node=\"{node}\"");
        assert_eq!(prom[&format!("shard_balance_node_rows{{{labels}}}")], n["rows"].as_f64().unwrap(), "{prom:?}");
        assert_eq!(prom[&format!("shard_balance_node_bytes{{{labels}}}")], n["bytes"].as_f64().unwrap(), "{prom:?}");
    }
    for t in tables {
        let labels = format!(
            "node=\"{}\",table=\"{}\",sharded=\"{}\"",
            t["node"].as_str().unwrap(),
            t["table"].as_str().unwrap(),
            t["sharded"]
        );
        assert_eq!(prom[&format!("shard_balance_table_rows{{{labels}}}")], t["rows"].as_f64().unwrap());
        assert_eq!(prom[&format!("shard_balance_table_bytes{{{labels}}}")], t["bytes"].as_f64().unwrap());
    }
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    for s in skew {
        let (ratio, cv) = (s["max_over_mean"].as_f64().unwrap(), s["cv"].as_f64().unwrap());
        let (r, c) = if s["table"] == "(all sharded tables)" {
            (prom["shard_balance_skew_ratio{by=\"rows\"}"], prom["shard_balance_skew_cv{by=\"rows\"}"])
        } else {
            let t = s["table"].as_str().unwrap();
            (
                prom[&format!("shard_balance_table_skew_ratio{{table=\"{t}\"}}")],
                prom[&format!("shard_balance_table_skew_cv{{table=\"{t}\"}}")],
            )
        };
        assert!(close(r, ratio) && close(c, cv), "{s}: {r} {c}");
    }
    assert!(prom["shard_balance_skew_ratio{by=\"rows\"}"] > 1.3);
    // Bytes' skew: max/mean of the nodes' bytes.
    let bytes: Vec<f64> = nodes.iter().map(|n| n["bytes"].as_f64().unwrap()).collect();
    let mean = bytes.iter().sum::<f64>() / bytes.len() as f64;
    let max = bytes.iter().copied().fold(0.0, f64::max);
    assert!(close(prom["shard_balance_skew_ratio{by=\"bytes\"}"], max / mean), "{prom:?}");
    for u in r["top_units"].as_array().expect("top units") {
        let labels = format!("unit=\"{}\",node=\"{}\"", u["unit"].as_str().unwrap(), u["node"].as_str().unwrap());
        assert_eq!(prom[&format!("shard_balance_unit_rows{{{labels}}}")], u["rows"].as_f64().unwrap());
    }
    assert_eq!(prom["shard_balance_planned_moves"], r["plan"].as_array().expect("plan").len() as f64);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    assert!((now - prom["shard_balance_report_timestamp_seconds"]).abs() < 600.0);

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

/// Prometheus text: `name{labels}` → value; every sample's family has HELP and TYPE lines before it, and
/// each family is a gauge named `shard_balance_*`.
fn prom_samples(text: &str) -> std::collections::HashMap<String, f64> {
    let mut out = std::collections::HashMap::new();
    let (mut helped, mut typed) = (std::collections::HashSet::new(), std::collections::HashSet::new());
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("# HELP name text");
            assert!(!help.trim().is_empty(), "{line}");
            helped.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            assert_eq!(kind, "gauge", "{line}");
            typed.insert(name.to_string());
        } else if !line.is_empty() {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("a sample: {line}"));
            let family = series.split('{').next().expect("a name");
            assert!(family.starts_with("shard_balance_"), "{line}");
            assert!(helped.contains(family) && typed.contains(family), "HELP and TYPE before {line}");
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("a number: {line}"));
            assert!(out.insert(series.to_string(), v).is_none(), "one sample per series: {line}");
        }
    }
    out
}

fn tempfile_path(name: &str) -> String {
    std::env::temp_dir().join(format!("rebalance-test-{}-{name}", std::process::id())).display().to_string()
}
