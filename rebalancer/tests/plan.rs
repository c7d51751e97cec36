//! `rebalance plan` and `apply` through the real binary: one node holds most of the rows; the plan moves
//! buckets to the other, `apply` carries it out, and the report shows the skew gone. The HTML report's charts
//! are read back: one bar per node, sized by its figure.

use std::process::Command;
use std::time::Instant;

use anyhow::Result;
use integration::{Cluster, PgServer};

const BUCKETS: u32 = 16;

fn rebalance(config: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rebalance"))
        .args(["--config", config])
        .args(args)
        .output()
        .expect("the rebalance binary")
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// The bars of the SVG chart under the `<h2>` titled `title`: (label, width).
fn chart(page: &str, title: &str) -> Vec<(String, f64)> {
    let at = page.find(&format!("<h2>{title}</h2>")).unwrap_or_else(|| panic!("no chart {title:?}"));
    let svg = &page[at..];
    let svg = &svg[svg.find("<svg").expect("svg")..svg.find("</svg>").expect("</svg>")];
    let mut bars = Vec::new();
    let mut rest = svg;
    while let Some(t) = rest.find("<text x=\"0\"") {
        rest = &rest[t..];
        let label = &rest[rest.find('>').expect(">") + 1..rest.find("</text>").expect("</text>")];
        let r = rest.find("<rect").expect("a bar after its label");
        let w = &rest[r..];
        let w = &w[w.find("width=\"").expect("width") + 7..];
        let width: f64 = w[..w.find('"').expect("\"")].parse().expect("a width");
        bars.push((label.to_string(), width));
        rest = &rest[r..];
    }
    bars
}

fn bucket_even(k: i64) -> bool {
    shardmap::hash::reduce(shardmap::hash::hash_key(&shardmap::KeyValue::Int(k)), BUCKETS).is_multiple_of(2)
}

fn all_skew(r: &serde_json::Value) -> f64 {
    r["skew"].as_array().expect("skew").iter().find(|s| s["table"] == "(all sharded tables)").expect("all")
        ["max_over_mean"]
        .as_f64()
        .expect("a figure")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_and_apply_even_out_a_hot_node() -> Result<()> {
    let servers = (0..2).map(|_| PgServer::start_with(&["wal_level=logical"])).collect::<Result<Vec<_>>>()?;
    let head = format!(
        "shard-strategy,hash\nshard-count,2\nshard-key,user_id\nshard-algorithm,hash-buckets\nshard-buckets,{BUCKETS}\n\
         router-auth,trust\n"
    );
    let cluster = Cluster::with_servers(servers, &head, |i, s| format!("shard-node-{i},{}\n", s.url("postgres")))?;
    let config = cluster.config_path.display().to_string();
    cluster.client().await?.batch_execute("CREATE TABLE events (user_id bigint PRIMARY KEY, body text)").await?;
    // Node 0 (even buckets) is hot: 40,000 rows over its buckets, unevenly; node 1 has 4,000.
    let slot = shardmap::hash::sql_slot_expr("k", shardmap::KeyType::Int, BUCKETS);
    let shard0 = cluster.shards[0].client("postgres").await?;
    let shard1 = cluster.shards[1].client("postgres").await?;
    shard0
        .batch_execute(&format!(
            "INSERT INTO events SELECT k, 'x' FROM generate_series(1, 64000) k \
             WHERE {slot} % 2 = 0 AND (k <= 32000 OR {slot} IN (0, 2))"
        ))
        .await?;
    shard1
        .batch_execute(&format!(
            "INSERT INTO events SELECT k, 'x' FROM generate_series(100001, 108000) k WHERE {slot} % 2 = 1"
        ))
        .await?;
    // The report: skewed, with the moves plan would make; its HTML charts have one bar per node.
    let table = rebalance(&config, &["report", "--top", "4"]);
    println!("$ rebalance --config config.csv report --top 4\n{}", String::from_utf8_lossy(&table.stdout));
    let before = json(&rebalance(&config, &["report", "--format", "json"]));
    let rows: Vec<i64> = before["nodes"].as_array().unwrap().iter().map(|n| n["rows"].as_i64().unwrap()).collect();
    assert!(rows[0] > 4 * rows[1], "{rows:?}");
    assert!(all_skew(&before) > 1.5, "{before}");
    assert!(!before["plan"].as_array().unwrap().is_empty(), "the report says what plan would move");
    let html = std::env::temp_dir().join(format!("plan-test-{}.html", std::process::id()));
    let out = rebalance(&config, &["report", "--format", "html", "--out", &html.display().to_string()]);
    assert!(out.status.success());
    let page = std::fs::read_to_string(&html)?;
    std::fs::remove_file(&html)?;
    if let Ok(keep) = std::env::var("KEEP_REPORT_HTML") {
        std::fs::write(keep, &page)?; // for the README's screenshot
    }
    for (title, field) in [("Rows of sharded tables per node", "rows"), ("Bytes per node", "bytes")] {
        let bars = chart(&page, title);
        let nodes = before["nodes"].as_array().unwrap();
        assert_eq!(bars.len(), nodes.len(), "{title}: one bar per node");
        let max = nodes.iter().map(|n| n[field].as_f64().unwrap()).fold(0.0, f64::max);
        for (n, (label, width)) in nodes.iter().zip(&bars) {
            assert_eq!(label, n["node"].as_str().unwrap());
            let expected = (n[field].as_f64().unwrap() / max * 400.0).round();
            assert_eq!(*width, expected, "{title}: node {label}");
        }
    }
    assert!(page.contains("would move"));

    // plan: from the hot node to the other; the figures after are within the threshold.
    let plan_file = std::env::temp_dir().join(format!("plan-test-{}.json", std::process::id()));
    let plan_path = plan_file.display().to_string();
    let plan = json(&rebalance(&config, &["plan", "--by", "rows", "--out", &plan_path, "--json"]));
    let moves = plan["moves"].as_array().unwrap();
    assert!(!moves.is_empty() && moves.iter().all(|m| m["from"] == "0" && m["to"] == "1"), "{plan}");
    let after: Vec<f64> = plan["after"].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).collect();
    let mean = after.iter().sum::<f64>() / 2.0;
    assert!(after.iter().all(|f| *f <= mean * 1.1), "{plan}");
    let text = rebalance(&config, &["plan", "--out", &plan_path]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("rebalance apply"), "{text:?}");
    println!("$ rebalance --config config.csv plan --out plan.json\n{}", String::from_utf8_lossy(&text.stdout));

    // apply: every move done (applied again, every move is skipped); the report is even.
    let t = Instant::now();
    let applied = rebalance(&config, &["apply", &plan_path]);
    println!("$ rebalance --config config.csv apply plan.json\n{}", String::from_utf8_lossy(&applied.stdout));
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    let done = json(&rebalance(&config, &["apply", &plan_path, "--json"]));
    let done = done.as_array().unwrap();
    assert_eq!(done.len(), moves.len());
    assert!(done.iter().all(|o| o["state"] == "skipped: already there"), "{done:?}");
    println!("applied {} moves in {:?}", done.len(), t.elapsed());
    let after = json(&rebalance(&config, &["report", "--format", "json"]));
    println!("skew of rows (max/mean): {:.2} before, {:.2} after", all_skew(&before), all_skew(&after));
    assert!(all_skew(&after) <= 1.1, "{after}");
    assert!(after["plan"].as_array().unwrap().is_empty(), "{after}");
    let table = rebalance(&config, &["report", "--top", "4"]);
    println!("$ rebalance --config config.csv report --top 4\n{}", String::from_utf8_lossy(&table.stdout));
    // Reads through the router find every row where the catalog now puts it (a count on every shard: one
    // row per shard).
    let c = cluster.client().await?;
    let n: i64 = c.query("SELECT count(*) FROM events", &[]).await?.iter().map(|r| r.get::<_, i64>(0)).sum();
    assert_eq!(n, rows.iter().sum::<i64>());
    for k in [1i64, 2, 3, 31999, 100001, 107999] {
        let found = c.query("SELECT body FROM events WHERE user_id = $1", &[&k]).await?;
        let expected = usize::from(k <= 32000 && bucket_even(k) || k > 100000 && !bucket_even(k));
        assert_eq!(found.len(), expected, "key {k}");
    }

    // drain: every bucket of node 1 (empty ones too) to node 0; fill is its mirror.
    let drain = json(&rebalance(&config, &["plan", "--drain", "1", "--out", &plan_path, "--json"]));
    let owned_by_1 = drain["moves"].as_array().unwrap();
    assert!(owned_by_1.len() >= (BUCKETS / 2) as usize, "{drain}");
    assert!(owned_by_1.iter().all(|m| m["from"] == "1" && m["to"] == "0"));
    assert_eq!(drain["after"]["1"], 0.0);
    let bad = rebalance(&config, &["plan", "--drain", "7", "--out", &plan_path]);
    assert_eq!(bad.status.code(), Some(1));
    std::fs::remove_file(&plan_file)?;
    Ok(())
}
