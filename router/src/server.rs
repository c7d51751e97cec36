//! The proxy's accept loop: `run(listener, config, shutdown)` serves clients until `shutdown` resolves. The
//! binary is only argument parsing plus this call, and tests start it in-process on port 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use shardmap::{Config, Planner, ShardId, ShardMap};

use crate::backend::Backends;
use crate::frontend::{ClientInfo, Registry, Routing};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::frontend::session::Session;
use crate::frontend::startup::{self, Hello, StartupError};
use crate::net::proto;
use crate::net::wire::Framed;

/// What every client task shares: typed handles, each with the behaviour of what it owns.
pub struct Router {
    /// Where statements go: config, shard map, planner, catalog.
    pub routing: Arc<Routing>,
    /// The servers: pools, primaries, breakers, counters.
    pub backends: Arc<Backends>,
    /// The clients connected now.
    pub registry: Arc<Registry>,
    /// TLS for clients, when `router-tls-cert` and `router-tls-key` are set, and the hash of the certificate
    /// for SCRAM channel binding.
    pub tls: Option<(tokio_rustls::TlsAcceptor, [u8; 32])>,
}

impl Router {
    /// `homes`: the event loops that serve clients (each with its share of the pools' idle connections).
    pub fn new(config: Config, event_loops: usize) -> anyhow::Result<Router> {
        let tls = match (&config.router.tls_cert, &config.router.tls_key) {
            (Some(cert), Some(key)) => Some(startup::tls_acceptor(cert, key)?),
            _ => None,
        };
        let map = Arc::new(ShardMap::new(&config).map_err(anyhow::Error::msg)?);
        let catalog = shardmap::catalog::address(&config).map_err(|e| anyhow::anyhow!("shard-catalog: {e}"))?;
        let decisions =
            shardmap::catalog::decisions_address(&config).map_err(|e| anyhow::anyhow!("shard-catalog: {e}"))?;
        let (catalog, decisions) = (catalog.map(shard_catalog::Place::new), decisions.map(shard_catalog::Place::new));
        // On a shard's node (no shard-catalog URL), they follow that node's primary.
        let home = shardmap::catalog::home_node(&config)
            .and_then(|name| map.nodes.iter().position(|n| n.name == name))
            .map(|i| ShardId(i as u16));
        let homes: Vec<shard_catalog::Place> = catalog.iter().chain(&decisions).cloned().collect();
        let catalog = Arc::new(shard_catalog::Catalog::new(catalog));
        let two_phase = crate::backend::twophase::TwoPhase::new(
            decisions.filter(|_| config.two_phase_commit).map(shard_catalog::Decisions::new),
            catalog.id.clone(),
        );
        let session_mode = config.pool.mode == shardmap::config::PoolMode::Session;
        let config = Arc::new(arc_swap::ArcSwap::from_pointee(config));
        let backends = Arc::new(Backends::new(config.clone(), map.clone(), two_phase, event_loops));
        if let Some(home) = home {
            for place in homes {
                backends.topology.carry(home, place);
            }
        }
        Ok(Router {
            routing: Arc::new(Routing {
                config,
                map: map.clone(),
                planner: Planner::new(map),
                catalog,
                session_mode,
                rates: Default::default(),
            }),
            backends,
            registry: Default::default(),
            tls,
        })
    }
}

/// How the router stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// At once: sessions are dropped (their servers roll back what was open).
    Now,
    /// Stop accepting; end every session at its next moment outside a transaction, waiting at most this long
    /// for the transactions in progress; then stop.
    Drain(Duration),
}

/// The threads serving clients when `router-threads` is 0: one per two cores (at least one). The router
/// shares the machine with its clients and usually with PostgreSQL; more threads than that measured slower,
/// by the wake-ups across them (see docs/performance.md, "How many threads").
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// Serves clients on `listener` until `shutdown` resolves, then stops at once.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with(
        listener,
        config,
        async {
            shutdown.await;
            Stop::Now
        },
        std::future::pending,
    )
    .await
}

/// Serves clients on `listener` until `stop` resolves, then stops as it says; while draining, the future
/// `again` makes (a second signal) stops at once.
pub async fn run_with<G: Future<Output = ()>>(
    listener: TcpListener,
    config: Config,
    stop: impl Future<Output = Stop>,
    again: impl FnOnce() -> G,
) -> anyhow::Result<()> {
    run_homes(listener, Vec::new(), config, stop, again).await
}

/// [`run_with`] on several event loops (thread per core): `listener` is served on the calling task's runtime,
/// which also runs the background tasks; each of `others` (listening on the same address, with SO_REUSEPORT,
/// so that the kernel spreads new connections over them) on a thread of its own with a single-threaded
/// runtime. A client's session and the server connections it uses stay on the thread that accepted it.
pub async fn run_homes<G: Future<Output = ()>>(
    listener: TcpListener,
    others: Vec<std::net::TcpListener>,
    config: Config,
    stop: impl Future<Output = Stop>,
    again: impl FnOnce() -> G,
) -> anyhow::Result<()> {
    let router = Arc::new(Router::new(config, 1 + others.len())?);
    // The other homes: 1 stops their accepting, 2 ends their runtimes (after the drain, or at once).
    let (halt, halted) = tokio::sync::watch::channel(0u8);
    let mut homes = Vec::new();
    for (i, l) in others.into_iter().enumerate() {
        let (router, mut halted) = (router.clone(), halted.clone());
        let home = i + 1;
        let thread = std::thread::Builder::new().name(format!("shard-router-{home}")).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return tracing::error!("event loop {home}: {e}"),
            };
            rt.block_on(async move {
                let listener = match TcpListener::from_std(l) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!("event loop {home}: {e}"),
                };
                let mut stop = halted.clone();
                accept(&router, &listener, home, async move {
                    let _ = stop.wait_for(|h| *h >= 1).await;
                })
                .await;
                drop(listener);
                // Its clients finish their transactions here while the router drains.
                let _ = halted.wait_for(|h| *h >= 2).await;
            });
        })?;
        homes.push(thread);
    }
    struct Halt(tokio::sync::watch::Sender<u8>);
    impl Drop for Halt {
        fn drop(&mut self) {
            self.0.send_replace(2);
        }
    }
    let halt = Halt(halt);
    drop(halted);
    let backends = router.backends.clone();
    crate::backend::topology::Topology::start(&backends.topology, &backends.map, backends.pools.clone());
    // Idle server connections past pool-idle-timeout are closed even in pools nobody uses any more.
    let reaper = {
        let pools = backends.pools.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(pools.reap_every());
            loop {
                tick.tick().await;
                pools.reap();
            }
        })
    };
    let _stop_reaper = AbortOnDrop(reaper);
    // router-http: the health endpoint and /metrics.
    let (http, listen) = {
        let c = router.routing.config.load();
        (c.router.http.clone(), c.router.listen.clone())
    };
    let _stop_http = match &http {
        Some(addr) => {
            let listener = TcpListener::bind(addr.as_str())
                .await
                .map_err(|e| anyhow::anyhow!("router-http {addr}: cannot listen: {e}"))?;
            tracing::info!("health and metrics on http://{}", listener.local_addr()?);
            let backends = backends.clone();
            Some(AbortOnDrop(tokio::spawn(async move {
                if let Err(e) = crate::control::observe::serve_http(listener, backends).await {
                    tracing::error!("router-http: {e}");
                }
            })))
        }
        None => None,
    };
    // health-enabled: background checks (the task idles while disabled: RELOAD may enable it).
    let _stop_health = AbortOnDrop(tokio::spawn(crate::control::observe::health_checks(Arc::downgrade(&backends))));
    // The catalog: bucket owners and moves' freezes.
    let follower = {
        let config = router.routing.config.clone();
        shard_catalog::Follower {
            listen,
            max_freeze: Box::new(move || Duration::from_millis(config.load().rebalance.max_freeze_ms)),
        }
    };
    let _stop_catalog = AbortOnDrop(tokio::spawn(shard_catalog::follow(
        Arc::downgrade(&router.routing.catalog),
        router.routing.map.clone(),
        follower,
    )));
    // SIGHUP: RELOAD.
    let _stop_hup = AbortOnDrop(tokio::spawn(crate::control::reload::on_sighup(Arc::downgrade(&router))));
    // Transactions left prepared by two-phase commit (a router or a shard that stopped mid-commit).
    let _stop_recovery = AbortOnDrop(tokio::spawn(crate::control::recovery::run(Arc::downgrade(&backends))));
    let stop = accept(&router, &listener, 0, stop).await;
    // No new clients (a new router listening on the same port with SO_REUSEPORT takes them).
    drop(listener);
    halt.0.send_replace(1);
    let Stop::Drain(grace) = stop else { return Ok(()) };
    router.registry.begin_drain();
    let clients = || backends.stats.clients.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!("shutting down: {} clients to end, transactions in progress have {grace:?}", clients());
    let deadline = tokio::time::Instant::now() + grace;
    let again = again();
    tokio::pin!(again);
    while clients() > 0 {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!("shutting down: {} clients still in a transaction after {grace:?}; closing them", clients());
                break;
            }
            _ = &mut again => {
                tracing::warn!("shutting down at once: {} clients closed", clients());
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    Ok(())
}

/// The startup phase's deadline passed (`router-startup-timeout-ms`): what the client is told.
fn startup_timeout(limits: &shardmap::config::ClientLimits) -> StartupError {
    StartupError::Refused {
        code: "57014",
        message: format!(
            "canceling authentication due to timeout (router-startup-timeout-ms is {})",
            limits.startup_timeout_ms
        ),
    }
}

/// Accepts clients on `listener` for event loop `home`, each served by a task of its own, until `stop`
/// resolves; returns what it resolved to.
async fn accept<T>(router: &Arc<Router>, listener: &TcpListener, home: usize, stop: impl Future<Output = T>) -> T {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            stop = &mut stop => return stop,
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
                let router = router.clone();
                // Boxed before it is spawned: a client's future is several KiB, which tokio's spawn would
                // otherwise move by value through its layers and copy again when the task ends (seven copies
                // per client: most of what a connection cost the router in user space); boxed, it is copied once.
                tokio::spawn(Box::pin(async move {
                    if let Err(e) = serve_client(router, sock, home).await {
                        tracing::debug!("client: {e}");
                    }
                }));
            }
        }
    }
}

async fn serve_client(shared: Arc<Router>, sock: TcpStream, home: usize) -> anyhow::Result<()> {
    let addr = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let limits = shared.routing.config.load().router.limits.clone();
    // From the connection to the end of authentication, at most router-startup-timeout-ms.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(limits.startup_timeout_ms);
    let client_limit = crate::net::wire::Limit { bytes: limits.max_message_bytes as usize, client: true };
    let mut io = Framed::new(sock);
    io.limit = client_limit;
    let hello = match tokio::time::timeout_at(deadline, startup::hello(&mut io, shared.tls.is_some())).await {
        Ok(h) => h,
        Err(_) => return fatal(&mut io, startup_timeout(&limits)).await,
    };
    if let Ok(Some(Hello::Tls)) = hello {
        // Boxed: a TLS session's future is larger than a plain one's, and inline it would size every client's
        // task, TLS or not.
        return Box::pin(serve_tls(shared, io, deadline, client_limit, &limits, addr, home)).await;
    }
    session(shared, io, hello, addr, deadline, None, home).await
}

/// The rest of a client's startup after SSLRequest (see [`serve_client`]).
async fn serve_tls(
    shared: Arc<Router>,
    io: Framed<TcpStream>,
    deadline: tokio::time::Instant,
    client_limit: crate::net::wire::Limit,
    limits: &shardmap::config::ClientLimits,
    addr: String,
    home: usize,
) -> anyhow::Result<()> {
    let (mut sock, rest) = io.into_parts();
    if !rest.is_empty() {
        // Bytes after SSLRequest and before the handshake could be injected in plain text: refuse.
        return Ok(());
    }
    sock.write_all(b"S").await?;
    let (acceptor, endpoint) = shared.tls.clone().expect("TLS is configured");
    let Ok(tls) = tokio::time::timeout_at(deadline, acceptor.accept(sock)).await else { return Ok(()) };
    let mut io = Framed::new(tls?);
    io.limit = client_limit;
    let hello = match tokio::time::timeout_at(deadline, startup::hello(&mut io, false)).await {
        Ok(h) => h,
        Err(_) => return fatal(&mut io, startup_timeout(limits)).await,
    };
    session(shared, io, hello, addr, deadline, Some(endpoint), home).await
}

/// A client's session after the (optional) TLS handshake.
async fn session<S: crate::net::wire::Stream>(
    shared: Arc<Router>,
    mut io: Framed<S>,
    hello: Result<Option<Hello>, StartupError>,
    addr: String,
    deadline: tokio::time::Instant,
    endpoint: Option<[u8; 32]>,
    home: usize,
) -> anyhow::Result<()> {
    let hello = match hello {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(()),
        Err(e) => return fatal(&mut io, e).await,
    };
    let params = match hello {
        Hello::Tls => return Ok(()),
        Hello::Cancel { pid, secret } => {
            shared.registry.cancels.cancel((pid, secret)).await;
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
    let (password, auth, limits) = {
        let config = shared.routing.config.load();
        (config.router.users.get(&user).cloned(), config.router.auth, config.router.limits.clone())
    };
    // (The admin console is reachable past the limits, as PostgreSQL keeps slots for superusers.)
    let _slot = if database == crate::control::admin::ADMIN_DB {
        None
    } else {
        let tenant = (shared.routing.map.strategy == shardmap::Strategy::Tenant)
            .then(|| shared.routing.map.tenant_of_database(&database))
            .flatten();
        match shared.registry.admit(&user, tenant, &limits) {
            Ok(slot) => Some(slot),
            Err(e) => return fatal(&mut io, StartupError::Refused { code: "53300", message: e.message }).await,
        }
    };
    let auth =
        startup::authenticate(&mut io, auth, &user, password.as_deref(), &shared.registry.scram, endpoint.as_ref());
    match tokio::time::timeout_at(deadline, auth).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return fatal(&mut io, e).await,
        Err(_) => return fatal(&mut io, startup_timeout(&limits)).await,
    }
    let (cancel_key, cancel) = shared.registry.cancels.register();
    shared.backends.stats.clients.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _unregister = Unregister(&shared, cancel_key);
    shared.registry.clients.lock().expect("clients lock").insert(
        cancel_key,
        ClientInfo { user: user.clone(), database: database.clone(), addr, since: std::time::Instant::now() },
    );
    if database == crate::control::admin::ADMIN_DB {
        return crate::control::admin::serve(shared.clone(), io, &user, cancel_key).await;
    }
    let mut session =
        Session::new(io, shared.routing.clone(), shared.backends.clone(), user, database, &params, cancel);
    session.backend.home = home;
    session.stop = Some(shared.registry.stop_signal(cancel_key));
    if let Err(e) = session.start(cancel_key).await {
        proto::error(&mut session.io.wbuf, "FATAL", &e.code, &e.message);
        session.io.flush().await.ok();
        return Ok(());
    }
    if let Err(e) = session.run().await {
        let code = match &e {
            crate::net::Fatal::ServerGone(r) | crate::net::Fatal::Limit(r) => r.code.clone(),
            _ => "08P01".to_string(),
        };
        proto::error(&mut session.io.wbuf, "FATAL", &code, &e.to_string());
        session.io.flush().await.ok();
    }
    Ok(())
}

/// Stops a background task when the server stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Removes a client's cancel key when its task ends, however it ends.
struct Unregister<'a>(&'a Router, (i32, i32));

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.0.registry.cancels.remove(self.1);
        self.0.registry.forget_stop(self.1);
        self.0.registry.clients.lock().expect("clients lock").remove(&self.1);
        self.0.backends.stats.clients.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn fatal<S: crate::net::wire::Stream>(io: &mut Framed<S>, e: StartupError) -> anyhow::Result<()> {
    let (code, message) = match &e {
        StartupError::Refused { code, message } => (*code, message.clone()),
        StartupError::Wire(w) => ("08P01", w.to_string()),
    };
    proto::error(&mut io.wbuf, "FATAL", code, &message);
    io.flush().await.ok();
    Ok(())
}
