//! The deployment files against the real router: `deploy/prometheus/alerts.yml` passes `promtool check rules`
//! and its unit tests (`alerts_test.yml`), every `shard_router_*` metric an alert or the Grafana dashboard
//! (`deploy/grafana/shard-router.json`) uses is in a router's `/metrics` (a node with a streaming standby,
//! so that replica lag is there; the lag alert's condition and the in-doubt gauge are driven for real), every
//! `shard_balance_*` one is in `rebalance report --format prom`, and `promtool check metrics` finds nothing
//! wrong with the metrics' names. Needs promtool (Debian: `apt-get install prometheus`; scripts/deps.sh).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use integration::{free_port, Cluster, PgServer};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the repository root").to_path_buf()
}

/// promtool with `args`, `stdin` on its standard input: (success, stdout + stderr).
fn promtool(args: &[&str], stdin: Option<&str>) -> Result<(bool, String)> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool (Debian: apt-get install prometheus; bash scripts/deps.sh does)")?;
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes())?;
    }
    drop(input);
    let out = child.wait_with_output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

/// `GET` with curl: the body of a 200 answer.
fn get(url: &str) -> Result<String> {
    let out = Command::new("curl")
        .args(["-s", "-f", "--max-time", "5", url])
        .output()
        .context("curl (apt-get install curl)")?;
    if !out.status.success() {
        bail!("GET {url}: curl exit status {:?}", out.status.code());
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// The metric names with `prefix` in a PromQL expression (`shard_router_` → `shard_router_has_primary`, ...).
fn metric_names(expr: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().last();
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// Each alert of a rule file with its expression: a line scan of the file's `- alert:` and `expr:` keys
/// (one-line expressions, as alerts.yml writes them).
fn alerts(yaml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut name = None;
    for line in yaml.lines() {
        let line = line.trim();
        if let Some(n) = line.strip_prefix("- alert:") {
            name = Some(n.trim().to_string());
        } else if let Some(e) = line.strip_prefix("expr:") {
            let e = e.trim();
            assert!(!e.is_empty() && !e.starts_with(['|', '>']), "a one-line expr: {line}");
            out.push((name.take().expect("expr: after - alert:"), e.to_string()));
        }
    }
    out
}

/// The sample names in Prometheus text (`x_bucket`, `x_sum`, `x_count` of a histogram each) → their samples.
fn samples(text: &str) -> HashMap<String, Vec<(String, f64)>> {
    let mut out: HashMap<String, Vec<(String, f64)>> = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("a sample: {line}"));
        let name = series.split('{').next().expect("a name").to_string();
        let v = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("a number: {line}")),
        };
        out.entry(name).or_default().push((series.to_string(), v));
    }
    out
}

/// Every `expr` string in a Grafana dashboard (panels' targets, and variables' queries).
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// The `rebalance` binary beside this test's (target/<profile>/rebalance), built first when missing.
fn rebalance_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("target/<profile>")?;
    let bin = profile_dir.join(format!("rebalance{}", std::env::consts::EXE_SUFFIX));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "rebalancer", "--bin", "rebalance"]).current_dir(repo());
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        build.arg("--release");
    }
    // Always asked for: cargo does nothing when the binary is current, and rebuilds a stale one.
    let status = build.status().context("cargo build -p rebalancer")?;
    if !status.success() || !bin.exists() {
        bail!("cargo build -p rebalancer --bin rebalance failed ({status}); {} missing", bin.display());
    }
    Ok(bin)
}

async fn until<T>(what: &str, secs: u64, mut probe: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let t = Instant::now();
    loop {
        if let Some(v) = probe()? {
            return Ok(v);
        }
        if t.elapsed() > Duration::from_secs(secs) {
            bail!("timed out after {secs} s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the one sample of `series` (exact text, labels included) in `/metrics`.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_dashboard_and_metrics_agree() -> Result<()> {
    // (a) The rule file is valid and its alerts fire as its unit tests say.
    let (ok, text) = promtool(&["check", "rules", "deploy/prometheus/alerts.yml"], None)?;
    assert!(ok, "promtool check rules:\n{text}");
    let (ok, text) = promtool(&["test", "rules", "deploy/prometheus/alerts_test.yml"], None)?;
    assert!(ok, "promtool test rules:\n{text}");
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml"))?;
    let alerts = alerts(&rules);
    let names: BTreeSet<&str> = alerts.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "ShardRouterDown",
        "ShardNoPrimary",
        "ShardCircuitOpen",
        "ShardPoolSaturated",
        "ShardReplicaLagging",
        "ShardTwoPhaseInDoubt",
        "ShardSkewHigh",
    ] {
        assert!(names.contains(expected), "alert {expected} in alerts.yml: {names:?}");
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/grafana/shard-router.json"))?)
            .context("deploy/grafana/shard-router.json is JSON")?;
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() > 10), "panels");
    let vars = dashboard["templating"]["list"].as_array().context("templating")?;
    assert!(vars.iter().any(|v| v["type"] == "datasource" && v["query"] == "prometheus"), "a datasource variable");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);

    // (b) A router in front of a node with a streaming standby.
    let primary = PgServer::start()?;
    let standby = primary.standby()?;
    let http = free_port();
    let head = format!(
        "shard-strategy,hash\nshard-count,1\nshard-key,user_id\nrouter-auth,trust\npatroni-interval-ms,100\n\
         shard-read-replicas,true\nshard-max-replica-lag-bytes,1000\nrouter-http,127.0.0.1:{http}\n\
         shard-node-0,postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres\n",
        primary.port, standby.port
    );
    let cluster = Cluster::with_servers(Vec::new(), &head, |_, _| String::new())?;
    let c = cluster.client().await?;
    c.batch_execute("CREATE TABLE events (user_id bigint PRIMARY KEY, body text)").await?;
    for k in 0..20i64 {
        c.execute("INSERT INTO events (user_id, body) VALUES ($1, 'x')", &[&k]).await?;
    }
    let url = format!("http://127.0.0.1:{http}/metrics");
    let lag = format!("shard_router_replica_lag_bytes{{shard=\"0\",server=\"127.0.0.1:{}\"}}", standby.port);
    until("the standby's lag in /metrics", 20, || Ok(value(&get(&url)?, &lag))).await?;
    let text = get(&url)?;
    assert_eq!(value(&text, "shard_router_replica_max_lag_bytes"), Some(1000.0), "{text}");
    assert_eq!(value(&text, "shard_router_two_phase_in_doubt"), Some(0.0), "{text}");

    // The lag alert's condition, for real: replay paused, 100 KB written.
    let s = standby.client("postgres").await?;
    s.batch_execute("SELECT pg_wal_replay_pause()").await?;
    let p = primary.client("postgres").await?;
    p.batch_execute("INSERT INTO events SELECT g, repeat('y', 50) FROM generate_series(1000, 3000) g").await?;
    let behind =
        until("the lag over shard-max-replica-lag-bytes", 20, || Ok(value(&get(&url)?, &lag).filter(|l| *l > 1000.0)))
            .await?;
    s.batch_execute("SELECT pg_wal_replay_resume()").await?;
    until("the standby caught up", 20, || Ok(value(&get(&url)?, &lag).filter(|l| *l <= 1000.0))).await?;

    // A prepared transaction of a router that is gone: in doubt once older than 5 s, until recovery rolls
    // it back (no decision recorded) once older than 10 s.
    p.batch_execute("BEGIN; INSERT INTO events VALUES (9999, 'in doubt'); PREPARE TRANSACTION 'gb_2pc_deploytt_0_0'")
        .await?;
    until("shard_router_two_phase_in_doubt 1", 20, || {
        Ok(value(&get(&url)?, "shard_router_two_phase_in_doubt").filter(|v| *v == 1.0))
    })
    .await?;
    until("recovery's rollback and shard_router_two_phase_in_doubt 0", 30, || {
        let text = get(&url)?;
        let done = value(&text, "shard_router_two_phase_recovered_total{outcome=\"rollback\"}") >= Some(1.0);
        Ok((done && value(&text, "shard_router_two_phase_in_doubt") == Some(0.0)).then_some(()))
    })
    .await?;
    let n: i64 = p.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).await?.get(0);
    assert_eq!(n, 0, "recovery rolled the prepared transaction back");

    // Every metric an alert or the dashboard names is in /metrics (or `rebalance report --format prom`).
    let text = get(&url)?;
    let router = samples(&text);
    let config = cluster.config_path.display().to_string();
    let bin = rebalance_binary()?;
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin).args(["--config", &config, "report", "--format", "prom"]).output()
    })
    .await??;
    assert!(out.status.success(), "rebalance report --format prom: {}", String::from_utf8_lossy(&out.stderr));
    let balance_text = String::from_utf8(out.stdout)?;
    let balance = samples(&balance_text);
    assert_eq!(balance["shard_balance_node_rows"][0].1, 2021.0, "{balance_text}");
    let mut checked = BTreeSet::new();
    let uses = alerts.iter().map(|(n, e)| (format!("alert {n}"), e.clone()));
    let uses = uses.chain(exprs.iter().map(|e| ("the dashboard".to_string(), e.clone())));
    for (what, expr) in uses {
        let mentioned: Vec<String> =
            metric_names(&expr, "shard_router_").into_iter().chain(metric_names(&expr, "shard_balance_")).collect();
        for name in mentioned {
            let (found, from) = if name.starts_with("shard_balance_") {
                (balance.contains_key(&name), "rebalance report --format prom")
            } else {
                (router.contains_key(&name), "the router's /metrics")
            };
            assert!(found, "{what} uses {name}, which is not in {from}: {expr}");
            checked.insert(name);
        }
        let others = expr.contains("up{") && !expr.contains("job=\"shard-router\"");
        assert!(!others, "{what}: up is the routers' job: {expr}");
    }
    for must in [
        "shard_router_has_primary",
        "shard_router_circuit_state",
        "shard_router_pool_waiting",
        "shard_router_replica_lag_bytes",
        "shard_router_replica_max_lag_bytes",
        "shard_router_two_phase_in_doubt",
        "shard_balance_skew_ratio",
    ] {
        assert!(checked.contains(must), "{must} is used by an alert or the dashboard: {checked:?}");
    }

    // (c) promtool's lint of the exposition: the new metrics are clean; what it says of the others is shown.
    for (what, text) in [("router", &text), ("rebalance report --format prom", &balance_text)] {
        let (_, lint) = promtool(&["check", "metrics"], Some(text))?;
        let new = ["replica_lag", "replica_max_lag", "two_phase_in_doubt", "shard_balance_"];
        let bad: Vec<&str> = lint.lines().filter(|l| new.iter().any(|n| l.contains(n))).collect();
        assert!(bad.is_empty(), "promtool check metrics on the {what}'s metrics: {bad:?}\n{lint}");
        if !lint.trim().is_empty() {
            eprintln!("promtool check metrics ({what}), about existing metrics:\n{lint}");
        }
    }
    eprintln!("lag seen: {behind} bytes; metrics checked: {checked:?}");
    Ok(())
}
