//! RELOAD: config.csv read again while clients stay connected. The settings that can change take effect at
//! once (users and passwords, `router-auth`, admin users, pool timeouts, circuit breaker, failover buffer,
//! health checks, read replicas, auto-create); structural ones (the shard map, nodes, listen addresses,
//! threads, TLS, pool mode and size, the health endpoint's path) keep their running values and are named.

use std::sync::Arc;
use std::time::Duration;

use shardmap::Config;

use crate::server::Router;

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
