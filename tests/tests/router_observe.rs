//! Observability through the real router: the health endpoint (codes and JSON), `/metrics` (parsed), and the
//! circuit breaker opening when a shard goes down (statements then fail at once, with a clear error).

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use integration::{free_port, Cluster};

/// `GET` with curl: the status code and the body.
fn get(url: &str) -> Result<(u16, String)> {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "-w", "\n%{http_code}", url])
        .output()
        .context("curl (apt-get install curl)")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').context("curl's output")?;
    Ok((code.trim().parse()?, body.to_string()))
}

/// Prometheus text format: `name{labels}` → value (HELP/TYPE lines checked for every family).
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let name = it.next().expect("a family name");
            let kind = it.next().expect("a type");
            assert!(matches!(kind, "counter" | "gauge" | "histogram"), "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("a sample line: {line}"));
        let family = series.split('{').next().expect("a name");
        let base = family.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
        assert!(typed.contains(family) || typed.contains(base), "no # TYPE for {family}");
        out.insert(series.to_string(), value.parse().unwrap_or_else(|_| panic!("a number: {line}")));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_circuit_breaker() -> Result<()> {
    let http = free_port();
    let cluster = Cluster::hash(
        2,
        &format!(
            "router-http,127.0.0.1:{http}\nhealth-enabled,true\nhealth-interval,1\nhealth-timeout,1\nhealth-retries,2\n\
             circuit-breaker-enabled,true\ncircuit-breaker-threshold,3\ncircuit-breaker-timeout,2\n\
             circuit-breaker-half-open-requests,1\npool-timeout-ms,1000\n"
        ),
    )?;
    let c = cluster.client().await?;
    c.batch_execute("CREATE TABLE notes (user_id bigint, body text)").await?;
    for k in 0..10i64 {
        c.execute("INSERT INTO notes (user_id, body) VALUES ($1, 'x')", &[&k]).await?;
        c.simple_query(&format!("SELECT * FROM notes WHERE user_id = {k}")).await?;
    }
    assert!(c.simple_query("SELECT no_such_column FROM notes WHERE user_id = 1").await.is_err());

    // Health: 200 and the design document's shape.
    let base = format!("http://127.0.0.1:{http}");
    let (code, body) = get(&format!("{base}/api/health"))?;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["uptime"].is_u64());
    assert_eq!(v["checks"]["0"], "ok");
    assert_eq!(v["checks"]["1"], "ok");
    assert!(v["metrics"]["connections"].as_i64() >= Some(1), "{body}");
    assert!(v["metrics"]["server_connections"].as_u64() >= Some(1), "{body}");

    // Metrics: counters per shard, a consistent histogram, pools, circuits, clients.
    let (code, text) = get(&format!("{base}/metrics"))?;
    assert_eq!(code, 200);
    let m = parse_metrics(&text);
    let q = |s: &str| m.get(&format!("shard_router_queries_total{{shard=\"{s}\"}}")).copied().unwrap_or(0.0);
    // 10 inserts and 10 selects, split by user_id % 2, plus the failed select on shard 1.
    assert_eq!(q("0") + q("1"), 21.0, "{text}");
    assert_eq!(q("0"), 10.0, "{text}");
    assert_eq!(m["shard_router_errors_total{shard=\"1\"}"], 1.0, "{text}");
    assert_eq!(m["shard_router_errors_total{shard=\"0\"}"], 0.0, "{text}");
    for s in ["0", "1"] {
        let count = m[&format!("shard_router_query_duration_seconds_count{{shard=\"{s}\"}}")];
        assert_eq!(count, q(s));
        assert_eq!(m[&format!("shard_router_query_duration_seconds_bucket{{shard=\"{s}\",le=\"+Inf\"}}")], count);
        assert!(m[&format!("shard_router_query_duration_seconds_sum{{shard=\"{s}\"}}")] > 0.0);
        assert_eq!(m[&format!("shard_router_circuit_state{{shard=\"{s}\",state=\"closed\"}}")], 1.0);
        assert_eq!(m[&format!("shard_router_has_primary{{shard=\"{s}\"}}")], 1.0);
        assert_eq!(m[&format!("shard_router_failovers_total{{shard=\"{s}\"}}")], 0.0);
    }
    assert!(m.keys().any(|k| k.starts_with("shard_router_pool_idle{shard=\"0\"")), "{text}");
    assert!(m.keys().any(|k| k.starts_with("shard_router_pool_waiting{")), "{text}");
    assert!(m["shard_router_client_connections"] >= 1.0);

    // Shard 1 goes down: three failed connections open its circuit; then statements fail at once.
    cluster.shards[1].stop("immediate")?;
    for _ in 0..3 {
        let e = c.simple_query("SELECT * FROM notes WHERE user_id = 1").await.unwrap_err();
        let code = e.as_db_error().map(|d| d.code().code().to_string());
        assert!(code.as_deref().is_some_and(|c| c.starts_with("08")), "{e:?}");
    }
    let t = Instant::now();
    let e = c.simple_query("SELECT * FROM notes WHERE user_id = 1").await.unwrap_err();
    let message = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(message.contains("circuit breaker open for shard 1"), "{e:?}");
    assert!(t.elapsed() < Duration::from_millis(500), "an open circuit fails at once: {:?}", t.elapsed());
    // Shard 0 is not affected.
    c.simple_query("SELECT * FROM notes WHERE user_id = 2").await?;
    let (_, text) = get(&format!("{base}/metrics"))?;
    let m = parse_metrics(&text);
    assert_eq!(m["shard_router_circuit_state{shard=\"1\",state=\"open\"}"], 1.0, "{text}");
    assert_eq!(m["shard_router_circuit_state{shard=\"0\",state=\"closed\"}"], 1.0, "{text}");
    let (code, body) = get(&format!("{base}/api/health"))?;
    assert_eq!(code, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(v["status"], "unhealthy");
    assert_eq!(v["checks"]["0"], "ok");
    assert_ne!(v["checks"]["1"], "ok");

    // After circuit-breaker-timeout: half-open, one trial goes to the server (which is still down: it
    // fails as a connection failure, not as "circuit open"), and the circuit opens again.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let e = c.simple_query("SELECT * FROM notes WHERE user_id = 1").await.unwrap_err();
    let message = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(!message.contains("circuit breaker"), "the trial statement reaches for the server: {message}");
    let e = c.simple_query("SELECT * FROM notes WHERE user_id = 1").await.unwrap_err();
    let message = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(message.contains("circuit breaker open"), "{message}");

    // The health checks (health-enabled) see the shard down too.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (code, body) = get(&format!("{base}/api/health"))?;
    assert_eq!(code, 503);
    assert!(body.contains("unreachable") || body.contains("circuit open"), "{body}");
    Ok(())
}
