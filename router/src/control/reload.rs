//! RELOAD: config.csv read again while clients stay connected. The settings that can change take effect at
//! once (users and passwords, `router-auth`, admin users, pool timeouts, circuit breaker, failover buffer,
//! health checks, read replicas and their policy, degraded reads, rate limits, auto-create); structural ones (the shard map, nodes, listen addresses,
//! threads, TLS, pool mode and size, the health endpoint's path) keep their running values and are named.

use std::sync::Arc;
use std::time::Duration;

use shardmap::Config;

use crate::server::Router;

/// RELOAD (the admin console's, or SIGHUP): reads config.csv again from the file the router started with
/// and applies it; returns the keys that changed but need a restart. A file with errors changes nothing.
pub fn reload_file(router: &Router) -> Result<Vec<&'static str>, shardmap::config::ConfigError> {
    let file = router.routing.config.load().file.clone();
    let new = Config::load(std::path::Path::new(&file))?;
    let restart = reload(router, new);
    tracing::info!(file, ?restart, "config reloaded");
    Ok(restart)
}

/// SIGHUP: RELOAD, as PostgreSQL and PgBouncer read their configuration again on it (systemd's
/// `ExecReload`). Errors are logged; the running config stays.
pub async fn on_sighup(router: std::sync::Weak<Router>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("SIGHUP cannot be caught ({e}): reload through the admin console's RELOAD");
            return;
        }
    };
    while hup.recv().await.is_some() {
        let Some(router) = router.upgrade() else { return };
        match reload_file(&router) {
            Ok(restart) if !restart.is_empty() => {
                tracing::warn!(
                    "SIGHUP: config reloaded; changed but not applied until a restart: {}",
                    restart.join(", ")
                )
            }
            Ok(_) => tracing::info!("SIGHUP: config reloaded"),
            Err(e) => tracing::error!("SIGHUP: reload failed, the running config is kept: {e}"),
        }
    }
}

/// Applies `new` to a running router; returns the keys that changed but need a restart.
pub fn reload(router: &Router, mut new: Config) -> Vec<&'static str> {
    let config = &router.routing.config;
    let old = config.load_full();
    let mut restart = Vec::new();
    macro_rules! keep {
        ($($field:ident).+, $key:expr) => {
            if new.$($field).+ != old.$($field).+ {
                restart.push($key);
                new.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    keep!(strategy, "shard-strategy");
    keep!(shard_key, "shard-key");
    keep!(key_type, "shard-key-type");
    keep!(shard_count, "shard-count");
    keep!(algorithm, "shard-algorithm");
    keep!(buckets, "shard-buckets");
    keep!(ranges, "shard-ranges");
    keep!(geo_regions, "shard-geo-<region>");
    keep!(geo_db, "shard-geo-db");
    keep!(geo_country, "shard-geo-country-<CC>");
    keep!(geo_continent, "shard-geo-continent-<CC>");
    keep!(default, "shard-default");
    keep!(nodes, "shard-node-<name>");
    keep!(node_patroni, "shard-node-<name>-patroni");
    keep!(global_tables, "shard-global-tables");
    keep!(table_keys, "shard-table-<table>");
    keep!(tenant_db_prefix, "shard-tenant-db-prefix");
    keep!(catalog, "shard-catalog");
    keep!(two_phase_commit, "shard-two-phase-commit");
    keep!(router.listen, "router-listen");
    keep!(router.http, "router-http");
    keep!(router.threads, "router-threads");
    keep!(router.tls_cert, "router-tls-cert");
    keep!(router.tls_key, "router-tls-key");
    keep!(pool.mode, "pool-mode");
    keep!(pool.size, "pool-size");
    keep!(health.endpoint, "health-endpoint");
    router
        .backends
        .pools
        .update(Duration::from_millis(new.pool.timeout_ms), Duration::from_secs(new.pool.idle_timeout_s));
    router.backends.breaker.update(&new.circuit_breaker);
    router.backends.topology.update(&new.failover);
    if new.router.users != old.router.users || new.router.auth != old.router.auth {
        // Passwords changed: SCRAM secrets salted for the old ones must not be used.
        router.registry.scram.clear();
    }
    config.store(Arc::new(new));
    restart
}
