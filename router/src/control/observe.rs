//! Observability over HTTP on `router-http`: the health endpoint of the design document (`health-endpoint`,
//! default `/api/health`) and `/metrics` in Prometheus' text format.
//!
//! The counters are atomics bumped on the hot path (one `fetch_add` per statement and one for its latency
//! bucket); everything else (pools, primaries, circuits) is read when a scrape asks.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;

use crate::backend::stats::BOUNDS_US;
use crate::backend::Backends;

/// Each shard's check for the health endpoint: `ok`, or why not.
fn checks(backends: &Backends) -> Vec<(String, String)> {
    let config = backends.config.load();
    let retries = config.health.retries.max(1) as u64;
    backends
        .map
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let shard = shardmap::ShardId(i as u16);
            let state = if !backends.topology.has_primary(shard) {
                if config.degraded_reads
                    && !backends.topology.fresh_replicas(shard, config.max_replica_lag_bytes).is_empty()
                {
                    DEGRADED.to_string()
                } else {
                    "no primary".to_string()
                }
            } else if backends.breaker.state(i) == "open" {
                "circuit open".to_string()
            } else if config.health.enabled && backends.stats.health_failures[i].load(Ordering::Relaxed) >= retries {
                format!("unreachable ({retries} checks failed)")
            } else {
                "ok".to_string()
            };
            (n.name.clone(), state)
        })
        .collect()
}

/// A shard without a primary whose reads go to a standby (`shard-degraded-reads`).
const DEGRADED: &str = "degraded";

/// The health document and its HTTP status: 200 when every shard is `ok` (`healthy`) or some are degraded
/// (`degraded`), 503 otherwise (`unhealthy`).
pub fn health(backends: &Backends) -> (StatusCode, serde_json::Value) {
    let checks = checks(backends);
    let healthy = checks.iter().all(|(_, s)| s == "ok" || s == DEGRADED);
    let degraded = checks.iter().any(|(_, s)| s == DEGRADED);
    let pools = backends.pools.stats();
    let body = serde_json::json!({
        "status": match (healthy, degraded) {
            (false, _) => "unhealthy",
            (true, true) => "degraded",
            (true, false) => "healthy",
        },
        "version": env!("CARGO_PKG_VERSION"),
        "uptime": backends.stats.uptime().as_secs(),
        "checks": checks.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect::<serde_json::Map<_, _>>(),
        "metrics": {
            "connections": backends.stats.clients.load(Ordering::Relaxed),
            "server_connections": pools.iter().map(|p| p.active + p.idle).sum::<usize>(),
            "waiting": pools.iter().map(|p| p.waiting).sum::<usize>(),
        },
    });
    (if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, body)
}

/// `/metrics` in Prometheus' text exposition format.
pub fn metrics(backends: &Backends) -> String {
    let mut out = String::new();
    let names: Vec<&str> = backends.map.nodes.iter().map(|n| n.name.as_str()).collect();
    let help = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP shard_router_{name} {help}\n# TYPE shard_router_{name} {kind}");
    };
    help(&mut out, "queries_total", "counter", "Statements answered by one shard.");
    for (i, s) in backends.stats.shards.iter().enumerate() {
        let _ = writeln!(out, "shard_router_queries_total{{shard=\"{}\"}} {}", names[i], s.queries());
    }
    help(&mut out, "errors_total", "counter", "Statements a shard answered with an error.");
    for (i, s) in backends.stats.shards.iter().enumerate() {
        let _ = writeln!(out, "shard_router_errors_total{{shard=\"{}\"}} {}", names[i], s.errors());
    }
    help(&mut out, "query_duration_seconds", "histogram", "Time from sending a statement to its ReadyForQuery.");
    for (i, s) in backends.stats.shards.iter().enumerate() {
        let labels = format!("shard=\"{}\"", names[i]);
        histogram(&mut out, "query_duration_seconds", &labels, &s.buckets(), s.sum_us());
    }
    let pools = backends.pools.stats();
    for (metric, what) in [
        ("pool_active", "Server connections checked out."),
        ("pool_idle", "Idle server connections in the pool."),
        ("pool_waiting", "Clients waiting for a server connection."),
    ] {
        help(&mut out, metric, "gauge", what);
        for p in &pools {
            let v = match metric {
                "pool_active" => p.active,
                "pool_idle" => p.idle,
                _ => p.waiting,
            };
            let _ = writeln!(
                out,
                "shard_router_{metric}{{shard=\"{}\",server=\"{}:{}\",database=\"{}\",user=\"{}\"}} {v}",
                names.get(p.shard.0 as usize).unwrap_or(&"?"),
                p.host,
                p.port,
                escape(&p.database),
                escape(&p.user)
            );
        }
    }
    help(&mut out, "failovers_total", "counter", "Changes of a shard's primary seen by the router.");
    for (i, name) in names.iter().enumerate() {
        let _ = writeln!(
            out,
            "shard_router_failovers_total{{shard=\"{name}\"}} {}",
            backends.topology.failovers(shardmap::ShardId(i as u16))
        );
    }
    help(&mut out, "has_primary", "gauge", "1 when the router knows the shard's primary.");
    for (i, name) in names.iter().enumerate() {
        let _ = writeln!(
            out,
            "shard_router_has_primary{{shard=\"{name}\"}} {}",
            backends.topology.has_primary(shardmap::ShardId(i as u16)) as u8
        );
    }
    help(&mut out, "circuit_state", "gauge", "The circuit breaker's state per shard (1 for the current one).");
    for (i, name) in names.iter().enumerate() {
        let now = backends.breaker.state(i);
        for state in ["closed", "open", "half-open"] {
            let _ = writeln!(
                out,
                "shard_router_circuit_state{{shard=\"{name}\",state=\"{state}\"}} {}",
                (now == state) as u8
            );
        }
    }
    replica_lag(&mut out, backends, &names);
    let c = &backends.two_phase.counters;
    help(
        &mut out,
        "two_phase_commits_total",
        "counter",
        "Transactions on several shards committed with two-phase commit.",
    );
    let _ = writeln!(out, "shard_router_two_phase_commits_total {}", c.committed.load(Ordering::Relaxed));
    help(
        &mut out,
        "one_phase_multi_shard_commits_total",
        "counter",
        "Transactions on several shards that wrote to at most one, committed without two-phase commit.",
    );
    let _ = writeln!(out, "shard_router_one_phase_multi_shard_commits_total {}", c.one_phase.load(Ordering::Relaxed));
    help(&mut out, "two_phase_rollbacks_total", "counter", "Transactions on several shards rolled back at COMMIT (a PREPARE failed, or the decision could not be recorded).");
    let _ = writeln!(out, "shard_router_two_phase_rollbacks_total {}", c.rolled_back.load(Ordering::Relaxed));
    help(
        &mut out,
        "two_phase_recovered_total",
        "counter",
        "Prepared transactions in doubt that recovery finished, by outcome.",
    );
    let _ = writeln!(
        out,
        "shard_router_two_phase_recovered_total{{outcome=\"commit\"}} {}",
        c.recovered_commit.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "shard_router_two_phase_recovered_total{{outcome=\"rollback\"}} {}",
        c.recovered_abort.load(Ordering::Relaxed)
    );
    help(
        &mut out,
        "two_phase_in_doubt",
        "gauge",
        &format!(
            "Prepared transactions of routers the last recovery round left prepared: not in flight in this router, \
             older than {} s.",
            crate::backend::twophase::DECIDE_WITHIN.as_secs()
        ),
    );
    let _ = writeln!(out, "shard_router_two_phase_in_doubt {}", c.in_doubt.load(Ordering::Relaxed));
    help(
        &mut out,
        "two_phase_commit_duration_seconds",
        "histogram",
        "Two-phase commit: from the first PREPARE TRANSACTION to the last COMMIT PREPARED.",
    );
    let buckets: Vec<u64> = c.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
    histogram(&mut out, "two_phase_commit_duration_seconds", "", &buckets, c.sum_us.load(Ordering::Relaxed));
    help(
        &mut out,
        "rate_limited_total",
        "counter",
        "Statements refused by router-rate-limit-* (SQLSTATE 53400), by the bucket that was empty.",
    );
    for (i, kind) in ["user", "tenant"].iter().enumerate() {
        let _ = writeln!(
            out,
            "shard_router_rate_limited_total{{bucket=\"{kind}\"}} {}",
            backends.stats.rate_limited[i].load(Ordering::Relaxed)
        );
    }
    help(&mut out, "client_connections", "gauge", "Client connections open now.");
    let _ = writeln!(out, "shard_router_client_connections {}", backends.stats.clients.load(Ordering::Relaxed));
    help(&mut out, "uptime_seconds", "gauge", "Seconds since the router started.");
    let _ = writeln!(out, "shard_router_uptime_seconds {}", backends.stats.uptime().as_secs());
    out
}

/// Each standby's replay lag as last probed (standbys whose lag is unknown have no sample), and the limit
/// `shard-max-replica-lag-bytes` over which reads leave it, so that an alert can compare the two.
fn replica_lag(out: &mut String, backends: &Backends, names: &[&str]) {
    let _ = writeln!(
        out,
        "# HELP shard_router_replica_lag_bytes Bytes of WAL a standby's replay is behind its primary, as last probed.\n\
         # TYPE shard_router_replica_lag_bytes gauge"
    );
    for (i, name) in names.iter().enumerate() {
        for ((host, port), lag) in backends.topology.replicas(shardmap::ShardId(i as u16)) {
            if let Some(lag) = lag {
                let _ =
                    writeln!(out, "shard_router_replica_lag_bytes{{shard=\"{name}\",server=\"{host}:{port}\"}} {lag}");
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP shard_router_replica_max_lag_bytes The configured shard-max-replica-lag-bytes: standbys further behind get no reads.\n\
         # TYPE shard_router_replica_max_lag_bytes gauge\n\
         shard_router_replica_max_lag_bytes {}",
        backends.config.load().max_replica_lag_bytes
    );
}

/// A histogram's samples: cumulative buckets (`buckets` holds one count per bound of `BOUNDS_US`, then
/// `+Inf`), sum and count; `labels` (`shard="0"`, or empty) come before `le`.
fn histogram(out: &mut String, name: &str, labels: &str, buckets: &[u64], sum_us: u64) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (b, le) in BOUNDS_US.iter().enumerate() {
        cumulative += buckets[b];
        let _ = writeln!(out, "shard_router_{name}_bucket{{{labels}{sep}le=\"{}\"}} {cumulative}", *le as f64 / 1e6);
    }
    cumulative += buckets[BOUNDS_US.len()];
    let _ = writeln!(out, "shard_router_{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
    let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
    let _ = writeln!(out, "shard_router_{name}_sum{braces} {}", sum_us as f64 / 1e6);
    let _ = writeln!(out, "shard_router_{name}_count{braces} {cumulative}");
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

async fn health_handler(State(backends): State<Arc<Backends>>) -> impl IntoResponse {
    let (code, body) = health(&backends);
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string())
}

async fn metrics_handler(State(backends): State<Arc<Backends>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics(&backends))
}

/// Serves the health endpoint and `/metrics` on `listener` until the task is dropped.
pub async fn serve_http(listener: tokio::net::TcpListener, backends: Arc<Backends>) -> std::io::Result<()> {
    let path = backends.config.load().health.endpoint.clone();
    let app = axum::Router::new()
        .route(&path, axum::routing::get(health_handler))
        .route("/metrics", axum::routing::get(metrics_handler))
        .with_state(backends);
    axum::serve(listener, app).await
}

/// `health-enabled`: checks each shard's primary with `SELECT 1` every `health-interval` seconds (within
/// `health-timeout`); `health-retries` failures in a row make the shard unhealthy until a check passes.
pub async fn health_checks(backends: std::sync::Weak<Backends>) {
    loop {
        let Some(s) = backends.upgrade() else { return };
        let (interval, timeout, enabled) = {
            let c = s.config.load();
            (
                Duration::from_secs(c.health.interval_s.max(1)),
                Duration::from_secs(c.health.timeout_s.max(1)),
                c.health.enabled,
            )
        };
        if !enabled {
            // RELOAD turned the checks off: no shard counts as failing any more.
            s.stats.health_failures.iter().for_each(|f| f.store(0, Ordering::Relaxed));
            drop(s);
            tokio::time::sleep(interval).await;
            continue;
        }
        for (i, node) in s.map.nodes.iter().enumerate() {
            let Some(addr) = &node.addr else { continue };
            let ok = match s.topology.current(shardmap::ShardId(i as u16)) {
                Some((host, port)) => crate::backend::topology::in_recovery(addr, &host, port, timeout).await.is_some(),
                None => false,
            };
            let f = &s.stats.health_failures[i];
            if ok {
                f.store(0, Ordering::Relaxed);
            } else {
                f.fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(s);
        tokio::time::sleep(interval).await;
    }
}
