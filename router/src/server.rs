//! The proxy's accept loop: `run(listener, config, shutdown)` serves clients until `shutdown` resolves. The
//! binary is only argument parsing plus this call, and tests start it in-process on port 0.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardmap::{Config, Planner, ShardId, ShardMap, Strategy};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::client::{Client, Txn};
use crate::pool::{Pools, Settings as PoolSettings};
use crate::settings::Settings;
use crate::startup::{self, Hello, ScramCache, StartupError};
use crate::wire::Framed;
use crate::{proto, startup::backend_key};

/// A client connection, as the admin console shows it.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    pub user: String,
    pub database: String,
    pub addr: String,
    pub since: std::time::Instant,
}

/// What every client task shares.
pub struct Shared {
    /// The running config; RELOAD replaces it (structural settings keep their values from the start).
    pub config: arc_swap::ArcSwap<Config>,
    pub map: Arc<ShardMap>,
    pub planner: Planner,
    pub pools: Arc<Pools>,
    /// Where each shard's primary is (and the failover buffer).
    pub topology: Arc<crate::topology::Topology>,
    /// Counters for `/metrics` and the health endpoint.
    pub stats: crate::observe::Stats,
    /// Client connections, by cancel key (for the admin console's SHOW CLIENTS).
    pub clients: std::sync::Mutex<std::collections::HashMap<(i32, i32), ClientInfo>>,
    pub breaker: crate::breaker::Breaker,
    /// The catalog this router follows (bucket owners, frozen buckets), when there is one.
    pub catalog: crate::catalog::Catalog,
    pub scram: ScramCache,
    pub cancels: crate::cancel::Registry,
    /// `pool-mode,session`: each client keeps the server connections it uses for its whole session.
    pub session_mode: bool,
    /// TLS for clients, when `router-tls-cert` and `router-tls-key` are set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Serializes this router's tenant database creations (`shard-auto-create`).
    pub creating: tokio::sync::Mutex<()>,
    next: AtomicUsize,
    /// Per shard: until when (ms since `epoch`) it is believed down after a failed connection attempt.
    down_until: Vec<std::sync::atomic::AtomicU64>,
    epoch: std::time::Instant,
}

impl Shared {
    pub fn new(config: Config) -> anyhow::Result<Shared> {
        // Settings the router reads but cannot honour yet: refuse them rather than run differently.
        let tls = match (&config.router.tls_cert, &config.router.tls_key) {
            (Some(cert), Some(key)) => Some(startup::tls_acceptor(cert, key)?),
            _ => None,
        };
        let map = Arc::new(ShardMap::new(&config).map_err(anyhow::Error::msg)?);
        let pools = Arc::new(Pools::new(PoolSettings {
            size: config.pool.size,
            timeout: Duration::from_millis(config.pool.timeout_ms),
            idle_timeout: Duration::from_secs(config.pool.idle_timeout_s),
        }));
        let topology = Arc::new(crate::topology::Topology::new(&map, &config));
        let n = map.nodes.len();
        let catalog = shardmap::catalog::address(&config).map_err(|e| anyhow::anyhow!("shard-catalog: {e}"))?;
        Ok(Shared {
            catalog: crate::catalog::Catalog::new(catalog),
            planner: Planner::new(map.clone()),
            map,
            pools,
            topology,
            stats: crate::observe::Stats::new(n),
            clients: Default::default(),
            breaker: crate::breaker::Breaker::new(&config.circuit_breaker, n),
            scram: ScramCache::default(),
            cancels: Default::default(),
            session_mode: config.pool.mode == shardmap::config::PoolMode::Session,
            tls,
            creating: Default::default(),
            config: arc_swap::ArcSwap::from_pointee(config),
            next: AtomicUsize::new(0),
            down_until: (0..n).map(|_| Default::default()).collect(),
            epoch: std::time::Instant::now(),
        })
    }

    /// RELOAD: takes the settings of `new` that can change while clients stay connected (users and their
    /// passwords, `router-auth`, `router-admin-users`, pool timeouts, circuit breaker, failover buffer, health
    /// checks, read replicas, auto-create) and returns the keys that changed but need a restart (the shard
    /// map, nodes, listen addresses, threads, TLS, pool mode and size, the health endpoint's path), which
    /// keep their running values.
    pub fn reload(&self, mut new: Config) -> Vec<&'static str> {
        let old = self.config.load_full();
        let mut restart = Vec::new();
        macro_rules! keep {
            ($($field:ident).+, $key:expr) => {
                if format!("{:?}", new.$($field).+) != format!("{:?}", old.$($field).+) {
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
        keep!(tenant_db_prefix, "shard-tenant-db-prefix");
        keep!(catalog, "shard-catalog");
        keep!(router.listen, "router-listen");
        keep!(router.http, "router-http");
        keep!(router.threads, "router-threads");
        keep!(router.tls_cert, "router-tls-cert");
        keep!(router.tls_key, "router-tls-key");
        keep!(pool.mode, "pool-mode");
        keep!(pool.size, "pool-size");
        keep!(health.endpoint, "health-endpoint");
        self.pools.update(Duration::from_millis(new.pool.timeout_ms), Duration::from_secs(new.pool.idle_timeout_s));
        self.breaker.update(&new.circuit_breaker);
        self.topology.update(&new.failover);
        if new.router.users != old.router.users || new.router.auth != old.router.auth {
            // Passwords changed: SCRAM secrets salted for the old ones must not be used.
            self.scram.clear();
        }
        self.config.store(Arc::new(new));
        restart
    }

    /// Waits while a move holds the unit of `d` frozen (see `catalog.rs`), or with `None` (COPY, pipelines
    /// for several shards, whose units are known row by row) any unit; the error is for the client.
    pub async fn thaw(&self, d: Option<&shardmap::Decision>) -> Result<(), crate::client::Reported> {
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
        Err(crate::client::Reported { code: "55006".into(), message })
    }

    /// A shard for statements any shard can answer, in turn, skipping shards that just failed to connect and
    /// shards paused by the admin console.
    pub fn any_shard(&self) -> ShardId {
        let n = self.map.nodes.len().max(1);
        let now = self.epoch.elapsed().as_millis() as u64;
        let mut pick = 0;
        for _ in 0..n {
            pick = self.next.fetch_add(1, Ordering::Relaxed) % n;
            if self.down_until[pick].load(Ordering::Relaxed) <= now && !self.topology.is_paused(ShardId(pick as u16)) {
                break;
            }
        }
        ShardId(pick as u16)
    }

    /// Notes that a shard could not be reached: `any_shard` avoids it for a couple of seconds.
    pub fn mark_down(&self, shard: ShardId) {
        let until = self.epoch.elapsed().as_millis() as u64 + 2000;
        if let Some(d) = self.down_until.get(shard.0 as usize) {
            d.store(until, Ordering::Relaxed);
        }
    }
}

/// Serves clients on `listener` until `shutdown` resolves.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let shared = Arc::new(Shared::new(config)?);
    crate::topology::Topology::start(&shared.topology, &shared.map, shared.pools.clone());
    // Idle server connections past pool-idle-timeout are closed even in pools nobody uses any more.
    let reaper = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(shared.pools.reap_every());
            loop {
                tick.tick().await;
                shared.pools.reap();
            }
        })
    };
    let _stop_reaper = AbortOnDrop(reaper);
    // router-http: the health endpoint and /metrics.
    let http = shared.config.load().router.http.clone();
    let _stop_http = match &http {
        Some(addr) => {
            let listener = TcpListener::bind(addr.as_str())
                .await
                .map_err(|e| anyhow::anyhow!("router-http {addr}: cannot listen: {e}"))?;
            tracing::info!("health and metrics on http://{}", listener.local_addr()?);
            let shared = shared.clone();
            Some(AbortOnDrop(tokio::spawn(async move {
                if let Err(e) = crate::observe::serve_http(listener, shared).await {
                    tracing::error!("router-http: {e}");
                }
            })))
        }
        None => None,
    };
    // health-enabled: background checks (the task idles while disabled: RELOAD may enable it).
    let _stop_health = AbortOnDrop(tokio::spawn(crate::observe::health_checks(Arc::downgrade(&shared))));
    // The catalog: bucket owners and moves' freezes.
    let _stop_catalog = AbortOnDrop(tokio::spawn(crate::catalog::follow(Arc::downgrade(&shared))));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => {
                let (sock, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                sock.set_nodelay(true).ok();
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_client(shared, sock).await {
                        tracing::debug!("client: {e}");
                    }
                });
            }
        }
    }
}

async fn serve_client(shared: Arc<Shared>, sock: TcpStream) -> anyhow::Result<()> {
    let addr = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut io = Framed::new(sock);
    let hello = startup::hello(&mut io, shared.tls.is_some()).await;
    if let Ok(Some(Hello::Tls)) = hello {
        let (mut sock, rest) = io.into_parts();
        if !rest.is_empty() {
            // Bytes after SSLRequest and before the handshake could be injected in plain text: refuse.
            return Ok(());
        }
        sock.write_all(b"S").await?;
        let acceptor = shared.tls.clone().expect("TLS is configured");
        let tls = acceptor.accept(sock).await?;
        let mut io = Framed::new(tls);
        let hello = startup::hello(&mut io, false).await;
        return session(shared, io, hello, addr).await;
    }
    session(shared, io, hello, addr).await
}

/// A client's session after the (optional) TLS handshake.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut io: Framed<S>,
    hello: Result<Option<Hello>, StartupError>,
    addr: String,
) -> anyhow::Result<()> {
    let hello = match hello {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(()),
        Err(e) => return fatal(&mut io, e).await,
    };
    let params = match hello {
        Hello::Tls => return Ok(()),
        Hello::Cancel { pid, secret } => {
            shared.cancels.cancel((pid, secret)).await;
            return Ok(());
        }
        Hello::Startup { params } => params,
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(user) = get("user") else {
        return fatal(
            &mut io,
            StartupError::Refused { code: "28000", message: "no user name in the startup packet".into() },
        )
        .await;
    };
    let database = get("database").unwrap_or_else(|| user.clone());
    let (password, auth) = {
        let config = shared.config.load();
        (config.router.users.get(&user).cloned(), config.router.auth)
    };
    if let Err(e) = startup::authenticate(&mut io, auth, &user, password.as_deref(), &shared.scram).await {
        return fatal(&mut io, e).await;
    }
    let (cancel_key, cancel) = shared.cancels.register();
    shared.stats.clients.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _unregister = Unregister(&shared, cancel_key);
    shared.clients.lock().expect("clients lock").insert(
        cancel_key,
        ClientInfo { user: user.clone(), database: database.clone(), addr, since: std::time::Instant::now() },
    );
    if database == crate::admin::ADMIN_DB {
        return crate::admin::serve(shared.clone(), io, &user, cancel_key).await;
    }
    let mut client = Client {
        io,
        shared: shared.clone(),
        user,
        database: database.clone(),
        session: shardmap::Session { database: Some(database.clone()), ..Default::default() },
        settings: Settings::from_startup(&params),
        txn: Txn::Idle,
        bound: None,
        bound_all: Vec::new(),
        failed: false,
        answer_error: false,
        statements: Default::default(),
        batch: Vec::new(),
        cancel,
        sticky: Vec::new(),
        listening: false,
        pools: Vec::new(),
    };
    // One checkout validates the client's startup settings and gives the server's parameters. Any live
    // shard will do (the tenant's own under the tenant strategy).
    let candidates: Vec<(ShardId, Option<String>)> = match shared.map.strategy {
        Strategy::Tenant => match shared.map.tenant_of_database(&database) {
            Some(t) => vec![(shared.map.tenant_shard(t), Some(database.clone()))],
            None => shared.map.all().map(|s| (s, None)).collect(),
        },
        _ => {
            let first = shared.any_shard().0 as usize;
            let n = shared.map.nodes.len();
            (0..n).map(|i| (ShardId(((first + i) % n) as u16), None)).collect()
        }
    };
    let mut server_params = None;
    let mut last_error = None;
    for (shard, db) in candidates {
        match client.checkout(shard, db.as_deref()).await {
            Ok(mut p) => {
                server_params = Some(p.conn().params.clone());
                client.give_back(p);
                break;
            }
            Err(e) => last_error = Some(e),
        }
    }
    let Some(server_params) = server_params else {
        let e = last_error.expect("at least one shard was tried");
        proto::error(&mut client.io.wbuf, "FATAL", &e.code, &e.message);
        client.io.flush().await.ok();
        return Ok(());
    };
    for (k, v) in &server_params {
        let own = params.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.as_str());
        proto::parameter_status(&mut client.io.wbuf, k, own.unwrap_or(v));
    }
    backend_key(&mut client.io.wbuf, cancel_key.0, cancel_key.1);
    proto::ready(&mut client.io.wbuf, proto::READY_IDLE);
    client.io.flush().await?;
    match client.run().await {
        Ok(()) => Ok(()),
        Err(e) => {
            proto::error(&mut client.io.wbuf, "FATAL", "08P01", &e.to_string());
            client.io.flush().await.ok();
            Ok(())
        }
    }
}

/// Stops a background task when the server stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Removes a client's cancel key when its task ends, however it ends.
struct Unregister<'a>(&'a Shared, (i32, i32));

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.0.cancels.remove(self.1);
        self.0.clients.lock().expect("clients lock").remove(&self.1);
        self.0.stats.clients.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn fatal<S: AsyncRead + AsyncWrite + Unpin>(io: &mut Framed<S>, e: StartupError) -> anyhow::Result<()> {
    let (code, message) = match &e {
        StartupError::Refused { code, message } => (*code, message.clone()),
        StartupError::Wire(w) => ("08P01", w.to_string()),
    };
    proto::error(&mut io.wbuf, "FATAL", code, &message);
    io.flush().await.ok();
    Ok(())
}
