//! Client side: startup and authentication ([`startup`]), and one client's session ([`session`]) with the
//! simple and extended protocols, COPY and statements for several shards. [`Routing`] is the handle to the
//! routing decision (config, map, planner, catalog); [`Registry`] knows the connected clients.

pub mod combine;
pub mod commit;
pub mod copy;
pub mod extended;
pub mod global;
pub mod links;
pub mod merge;
pub mod rate;
pub mod scram;
pub mod sequences;
pub mod session;
pub mod settings;
pub mod simple;
pub mod split;
pub mod startup;
pub mod stream;
pub mod txn;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use shardmap::{Config, Planner, ShardMap};

use crate::net::Reported;

/// What routing a statement needs: the running config, the shard map, the planner and the catalog that
/// moves units between shards.
pub struct Routing {
    /// The running config; RELOAD replaces it (structural settings keep their values from the start).
    pub config: Arc<ArcSwap<Config>>,
    pub map: Arc<ShardMap>,
    pub planner: Planner,
    /// The catalog this router follows (bucket owners, frozen units).
    pub catalog: Arc<shard_catalog::Catalog>,
    /// `router-rate-limit-*`: the buckets of users and tenants.
    pub rates: rate::RateLimits,
    /// `pool-mode,session`: each client keeps the server connections it uses for its whole session.
    pub session_mode: bool,
}

impl Routing {
    /// Waits while a move holds the unit of `d` frozen (see `shard_catalog`), or with `None` (COPY, pipelines
    /// for several shards, whose units are known row by row) any unit; the error is for the client.
    pub async fn thaw(&self, d: Option<&shardmap::Decision>) -> Result<(), Reported> {
        let limit = Duration::from_millis(self.config.load().rebalance.max_freeze_ms + 2000);
        let frozen = || d.map_or_else(|| self.map.anything_frozen(), |d| self.map.holds(d));
        if self.catalog.wait_thawed(frozen, limit).await {
            return Ok(());
        }
        let unit = match d {
            None => "a unit".to_string(),
            Some(d) => match (d.buckets.iter().find(|b| self.map.any_frozen(&[**b])), &d.database) {
                (Some(b), _) => format!("bucket:{}", b.0),
                (None, Some(db)) => format!("tenant database {db}"),
                (None, None) => "the range piece of this statement's key".to_string(),
            },
        };
        let message = format!(
            "{unit} has been frozen by a move for more than {} ms (is the rebalancer stuck? `rebalance status` tells; `rebalance abort` thaws it)",
            limit.as_millis()
        );
        Err(Reported::new("55006", message))
    }
}

/// A client connection, as the admin console shows it.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    pub user: String,
    pub database: String,
    pub addr: String,
    pub since: std::time::Instant,
}

/// The clients connected now: by cancel key (for SHOW CLIENTS and CancelRequest), and the SCRAM secrets
/// salted for their users.
#[derive(Default)]
pub struct Registry {
    pub clients: Mutex<HashMap<(i32, i32), ClientInfo>>,
    pub cancels: crate::backend::cancel::Registry,
    pub scram: startup::ScramCache,
    /// Client connections past their startup packet (authenticating or in session), in all and per user:
    /// what `router-max-clients` and `router-max-clients-per-user` bound.
    connected: std::sync::atomic::AtomicU64,
    per_key: Mutex<HashMap<String, u64>>,
    /// The router is shutting down: sessions end at their next moment outside a transaction.
    pub draining: tokio::sync::watch::Sender<bool>,
    /// Each session's stop signal, by cancel key: dropped (so resolved) when draining starts.
    stops: Mutex<HashMap<(i32, i32), tokio::sync::oneshot::Sender<()>>>,
}

/// A client's place under the connection limits, given back when dropped.
pub struct Slot<'a> {
    registry: &'a Registry,
    /// Its keys in `per_key`: `user:<name>`, and `tenant:<name>` under the tenant strategy.
    keys: Vec<String>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.registry.connected.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let mut per_key = self.registry.per_key.lock().expect("per_key lock");
        for k in &self.keys {
            if let Some(n) = per_key.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    per_key.remove(k);
                }
            }
        }
    }
}

/// What a session is told when the router shuts down (as PostgreSQL's smart/fast shutdown tells its clients).
pub fn shutting_down() -> Reported {
    Reported::new("57P01", "terminating connection due to administrator command (the router is shutting down)")
}

impl Registry {
    /// The stop signal of the session with cancel key `key`: it resolves when the router starts draining
    /// (at once if it has). [`Registry::forget_stop`] drops it when the session ends.
    pub fn stop_signal(&self, key: (i32, i32)) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut stops = self.stops.lock().expect("stops lock");
        // (Under the lock `begin_drain` takes: a session either is in the map it clears or sees the flag.)
        if !*self.draining.borrow() {
            stops.insert(key, tx);
        }
        rx
    }

    pub fn forget_stop(&self, key: (i32, i32)) {
        self.stops.lock().expect("stops lock").remove(&key);
    }

    /// Shutting down: every session, and the admin console's, is told to end outside its transaction.
    pub fn begin_drain(&self) {
        let mut stops = self.stops.lock().expect("stops lock");
        self.draining.send_replace(true);
        stops.clear();
    }

    /// Takes a place for a client of `user` (connecting to `tenant`'s database, under the tenant strategy)
    /// under `limits`, or says which limit it would pass (53300, as PostgreSQL's `max_connections` and a
    /// role's or database's connection limit say it).
    pub fn admit(
        &self,
        user: &str,
        tenant: Option<&str>,
        limits: &shardmap::config::ClientLimits,
    ) -> Result<Slot<'_>, Reported> {
        let n = self.connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let mut keys = vec![format!("user:{user}")];
        keys.extend(tenant.map(|t| format!("tenant:{t}")));
        let counts: Vec<u64> = {
            let mut per_key = self.per_key.lock().expect("per_key lock");
            keys.iter()
                .map(|k| {
                    let e = per_key.entry(k.clone()).or_insert(0);
                    *e += 1;
                    *e
                })
                .collect()
        };
        let n_user = counts[0];
        let slot = Slot { registry: self, keys };
        if let (Some(t), Some(&n_tenant)) = (tenant, counts.get(1)) {
            if limits.max_clients_per_tenant > 0 && n_tenant > limits.max_clients_per_tenant {
                return Err(Reported::new(
                    "53300",
                    format!(
                        "too many connections for tenant \"{t}\" (router-max-clients-per-tenant is {})",
                        limits.max_clients_per_tenant
                    ),
                ));
            }
        }
        if n > limits.max_clients {
            return Err(Reported::new(
                "53300",
                format!("sorry, too many clients already (router-max-clients is {})", limits.max_clients),
            ));
        }
        if limits.max_clients_per_user > 0 && n_user > limits.max_clients_per_user {
            return Err(Reported::new(
                "53300",
                format!(
                    "too many connections for role \"{user}\" (router-max-clients-per-user is {})",
                    limits.max_clients_per_user
                ),
            ));
        }
        Ok(slot)
    }
}
