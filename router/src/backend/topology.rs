//! Where each shard's primary is, and the failover buffer.
//!
//! A node with one host is that host, always. A node whose URL lists several hosts
//! (`postgres://h1:5432,h2:5432/db`) follows its primary: a task per node asks each host
//! `SELECT pg_is_in_recovery()` every `patroni-interval-ms`, and at once when a client's connection to the
//! primary fails; the first host that answers `false` is the primary. Each change of primary bumps the node's
//! generation: clients re-resolve their pools, and the old primary's idle connections are closed.
//!
//! A node with `shard-node-<name>-patroni` follows Patroni instead: the prober asks the members' REST APIs
//! (`GET /cluster`, the first member that answers) for the leader (role `leader`, `master` or `primary`,
//! state `running`), and takes it as the primary only when the server agrees (`pg_is_in_recovery()` is
//! false on it): when Patroni and the server disagree (a stale leader key, split brain), the node has no
//! primary and writes wait rather than go to a server that may not be the primary.
//!
//! While a following node has no primary (the old one is gone, no standby promoted yet), statements wait for
//! one instead of failing: at most `failover-buffer-window-ms` each, at most `failover-buffer-size` at once,
//! and not at all once the failover has lasted `failover-buffer-max-ms`. Past a bound the client gets a clear
//! error (SQLSTATE 08001, nothing was sent).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmap::config::NodeAddr;
use shardmap::{Config, ShardId, ShardMap};
use tokio::sync::{watch, Notify};

/// A node's primary as last found, and the generation of that finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Primary {
    pub host: Option<(String, u16)>,
    /// Bumped on every change of `host`.
    pub generation: u64,
    /// When the node lost its primary (for `failover-buffer-max-ms`).
    pub lost_at: Option<Instant>,
    /// Probes made so far (a waiter learns that the primary was confirmed, unchanged).
    pub probes: u64,
    /// Standbys as last probed, with how far behind the primary they replay (bytes of WAL; `None` unknown).
    pub replicas: Vec<((String, u16), Option<u64>)>,
}

/// What a probe found: the primary (if any) with its timeline, and the standbys with their lag.
#[derive(Default)]
struct Found {
    primary: Option<(String, u16)>,
    timeline: Option<u64>,
    replicas: Vec<((String, u16), Option<u64>)>,
}

struct Node {
    /// Whether this node follows a primary among several hosts or through Patroni (else `host` never changes).
    follows: bool,
    /// `shard-node-<name>-patroni`: the members' REST API URLs.
    patroni: Vec<String>,
    tx: watch::Sender<Primary>,
    generation: AtomicU64,
    recheck: Notify,
    buffered: AtomicUsize,
    /// Changes of primary after the first one found (for metrics).
    failovers: AtomicU64,
    /// The admin console's PAUSE: new transactions wait until RESUME.
    paused: std::sync::atomic::AtomicBool,
    resumed: Notify,
    /// Round-robin over the standbys for reads.
    next_replica: AtomicUsize,
    /// The highest timeline seen on a primary of this node: a primary on an older one is stale (fencing).
    timeline: AtomicU64,
    /// The catalog and the decision log when they live on this node: moved to each new primary.
    homes: std::sync::Mutex<Vec<shard_catalog::Place>>,
}

pub struct Topology {
    nodes: Vec<Node>,
    /// `patroni-interval-ms` and `failover-buffer-*` (replaced by RELOAD).
    settings: arc_swap::ArcSwap<shardmap::config::FailoverSettings>,
}

/// Why a statement could not wait for a primary.
#[derive(Debug)]
pub struct NoPrimary(pub String);

impl Topology {
    pub fn new(map: &ShardMap, config: &Config) -> Topology {
        let nodes = map
            .nodes
            .iter()
            .map(|n| {
                let hosts = n.addr.as_ref().map(|a| a.hosts.clone()).unwrap_or_default();
                let patroni = config.node_patroni.get(&n.name).cloned().unwrap_or_default();
                let follows = hosts.len() > 1 || !patroni.is_empty();
                let host = if follows { None } else { hosts.first().cloned() };
                let lost_at = follows.then(Instant::now);
                Node {
                    follows,
                    patroni,
                    tx: watch::Sender::new(Primary { host, generation: 0, lost_at, probes: 0, replicas: Vec::new() }),
                    generation: AtomicU64::new(0),
                    recheck: Notify::new(),
                    buffered: AtomicUsize::new(0),
                    failovers: AtomicU64::new(0),
                    paused: Default::default(),
                    resumed: Notify::new(),
                    next_replica: AtomicUsize::new(0),
                    timeline: AtomicU64::new(0),
                    homes: Default::default(),
                }
            })
            .collect();
        Topology { nodes, settings: arc_swap::ArcSwap::from_pointee(config.failover.clone()) }
    }

    /// RELOAD: new `patroni-interval-ms` and `failover-buffer-*` settings.
    pub fn update(&self, settings: &shardmap::config::FailoverSettings) {
        self.settings.store(Arc::new(settings.clone()));
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.settings.load().patroni_interval_ms)
    }

    fn window(&self) -> Duration {
        Duration::from_millis(self.settings.load().buffer_window_ms)
    }

    /// The HTTP client for Patroni's REST API: rustls with the ring provider, trusting `patroni-ca-file` (and
    /// checking the name) for https:// URLs.
    fn patroni_client(ca: Option<&std::path::Path>) -> Result<reqwest::Client, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        if let Some(path) = ca {
            use rustls_pki_types::pem::PemObject;
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("patroni-ca-file {}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("patroni-ca-file {}: {e}", path.display()))?;
                roots.add(cert).map_err(|e| format!("patroni-ca-file {}: {e}", path.display()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        reqwest::Client::builder().use_preconfigured_tls(tls).build().map_err(|e| e.to_string())
    }

    /// Starts a prober per following node; they stop when `topology` is dropped by everyone else.
    pub fn start(topology: &Arc<Topology>, map: &ShardMap, pools: Arc<crate::backend::pool::Pools>) {
        for (i, node) in topology.nodes.iter().enumerate() {
            if !node.follows {
                continue;
            }
            let Some(addr) = map.nodes[i].addr.clone() else { continue };
            let weak = Arc::downgrade(topology);
            let pools = pools.clone();
            let patroni = node.patroni.clone();
            let ca = topology.settings.load().patroni_ca_file.clone();
            tokio::spawn(async move {
                let shard = ShardId(i as u16);
                let http = match Self::patroni_client(ca.as_deref()) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(shard = i, "Patroni's REST API cannot be reached: {e}");
                        return;
                    }
                };
                loop {
                    let Some(t) = weak.upgrade() else { return };
                    let timeout = t.window().min(Duration::from_secs(2));
                    let found = if patroni.is_empty() {
                        probe(&addr, timeout).await
                    } else {
                        probe_patroni(&http, &patroni, &addr, timeout).await
                    };
                    t.publish(shard, found, &pools);
                    let node = &t.nodes[i];
                    tokio::select! {
                        _ = tokio::time::sleep(t.interval()) => {}
                        _ = node.recheck.notified() => {}
                    }
                }
            });
        }
    }

    fn publish(&self, shard: ShardId, found: Found, pools: &crate::backend::pool::Pools) {
        let node = &self.nodes[shard.0 as usize];
        let Found { primary: mut found, timeline, replicas } = found;
        // Fencing: a primary's timeline never goes backwards; one on an older timeline than a primary already
        // seen is a stale server (an old primary back up), and gets no writes.
        if let (Some(host), Some(tl)) = (&found, timeline) {
            let seen = node.timeline.fetch_max(tl, Ordering::AcqRel);
            if tl < seen {
                tracing::warn!(
                    shard = shard.0,
                    ?host,
                    timeline = tl,
                    seen,
                    "a primary on an older timeline: writes are held"
                );
                found = None;
            }
        }
        let mut changed = false;
        node.tx.send_modify(|p| {
            p.probes += 1;
            let mut replicas = replicas;
            if found.is_none() {
                // No primary to measure against: a standby is as far behind as it was when one was last seen
                // (without a primary, no WAL it lacks is being written).
                for (host, lag) in replicas.iter_mut().filter(|(_, lag)| lag.is_none()) {
                    *lag = p.replicas.iter().find(|(h, _)| h == host).and_then(|(_, l)| *l);
                }
            }
            p.replicas = replicas;
            if p.host == found {
                return;
            }
            tracing::warn!(shard = shard.0, from = ?p.host, to = ?found, "primary changed");
            p.lost_at = if found.is_none() { Some(Instant::now()) } else { None };
            if p.host.is_some() || p.generation > 1 {
                node.failovers.fetch_add(1, Ordering::Relaxed);
            }
            p.host = found.clone();
            p.generation += 1;
            node.generation.store(p.generation, Ordering::Release);
            changed = true;
        });
        if changed {
            // New transactions go to the new primary; idle connections to the old one are closed.
            pools.retire(shard, found.as_ref());
            if let Some(host) = &found {
                for place in node.homes.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    place.set_primary(host);
                }
            }
        }
    }

    /// `place` (the catalog's or the decision log's database) is on `shard`'s server: it follows the
    /// shard's primary from now on.
    pub fn carry(&self, shard: ShardId, place: shard_catalog::Place) {
        let node = &self.nodes[shard.0 as usize];
        if let Some(host) = &node.tx.borrow().host {
            place.set_primary(host);
        }
        node.homes.lock().unwrap_or_else(|e| e.into_inner()).push(place);
    }

    /// Whether `shard` follows a primary among several hosts (and so buffers and retries around failover).
    pub fn follows(&self, shard: ShardId) -> bool {
        self.nodes.get(shard.0 as usize).is_some_and(|n| n.follows)
    }

    /// The standbys of `shard` whose replay is at most `max_lag` bytes behind the primary (while the shard
    /// has no primary: behind the last one seen), in the node's order; empty when there is none (reads then
    /// go to the primary).
    pub fn fresh_replicas(&self, shard: ShardId, max_lag: u64) -> Vec<(String, u16)> {
        let Some(n) = self.nodes.get(shard.0 as usize) else { return Vec::new() };
        let p = n.tx.borrow();
        p.replicas.iter().filter(|(_, lag)| lag.is_some_and(|l| l <= max_lag)).map(|(h, _)| h.clone()).collect()
    }

    /// The next turn of `shard`'s round robin over its standbys.
    pub fn replica_turn(&self, shard: ShardId) -> usize {
        self.nodes.get(shard.0 as usize).map_or(0, |n| n.next_replica.fetch_add(1, Ordering::Relaxed))
    }

    /// `shard`'s standbys and their lag, as last probed.
    pub fn replicas(&self, shard: ShardId) -> Vec<((String, u16), Option<u64>)> {
        self.nodes.get(shard.0 as usize).map(|n| n.tx.borrow().replicas.clone()).unwrap_or_default()
    }

    /// Whether the router knows `shard`'s primary right now.
    pub fn has_primary(&self, shard: ShardId) -> bool {
        self.nodes.get(shard.0 as usize).is_some_and(|n| n.tx.borrow().host.is_some())
    }

    /// `shard`'s primary right now, without waiting.
    pub fn current(&self, shard: ShardId) -> Option<(String, u16)> {
        self.nodes.get(shard.0 as usize).and_then(|n| n.tx.borrow().host.clone())
    }

    /// Changes of `shard`'s primary seen so far.
    pub fn failovers(&self, shard: ShardId) -> u64 {
        self.nodes.get(shard.0 as usize).map_or(0, |n| n.failovers.load(Ordering::Relaxed))
    }

    /// PAUSE (`true`) or RESUME (`false`) a shard.
    pub fn set_paused(&self, shard: ShardId, paused: bool) {
        if let Some(n) = self.nodes.get(shard.0 as usize) {
            n.paused.store(paused, Ordering::Release);
            if !paused {
                n.resumed.notify_waiters();
            }
        }
    }

    pub fn is_paused(&self, shard: ShardId) -> bool {
        self.nodes.get(shard.0 as usize).is_some_and(|n| n.paused.load(Ordering::Acquire))
    }

    /// Waits while `shard` is paused.
    pub async fn wait_resumed(&self, shard: ShardId) {
        let Some(n) = self.nodes.get(shard.0 as usize) else { return };
        loop {
            let resumed = n.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !n.paused.load(Ordering::Acquire) {
                return;
            }
            resumed.await;
        }
    }

    /// Whether any node follows its primary.
    pub fn follows_any(&self) -> bool {
        self.nodes.iter().any(|n| n.follows)
    }

    /// The generation of `shard`'s primary (one atomic load: checked on every checkout).
    pub fn generation(&self, shard: ShardId) -> u64 {
        self.nodes.get(shard.0 as usize).map_or(0, |n| n.generation.load(Ordering::Acquire))
    }

    /// Asks the prober to look again now (a connection to the primary failed).
    pub fn suspect(&self, shard: ShardId) {
        if let Some(n) = self.nodes.get(shard.0 as usize) {
            n.recheck.notify_one();
        }
    }

    /// The primary of `shard`, waiting for one (the failover buffer) when it has none right now.
    pub async fn primary(&self, shard: ShardId, name: &str) -> Result<((String, u16), u64), NoPrimary> {
        let node = &self.nodes[shard.0 as usize];
        {
            let p = node.tx.borrow();
            if let Some(h) = &p.host {
                return Ok((h.clone(), p.generation));
            }
        }
        self.wait(shard, name, |p| p.host.is_some()).await?;
        let p = node.tx.borrow();
        Ok((p.host.clone().expect("waited for a host"), p.generation))
    }

    /// Waits until `shard`'s primary is not the one of generation `seen` any more (after a connection to it
    /// failed), within the failover buffer's bounds.
    /// A probe that finds the same primary again also ends the wait (one connection failed, not the server).
    pub async fn changed_from(&self, shard: ShardId, seen: u64, name: &str) -> Result<(), NoPrimary> {
        let probes = self.nodes[shard.0 as usize].tx.borrow().probes;
        self.suspect(shard);
        self.wait(shard, name, |p| p.host.is_some() && (p.generation != seen || p.probes > probes + 1)).await
    }

    async fn wait(&self, shard: ShardId, name: &str, done: impl Fn(&Primary) -> bool) -> Result<(), NoPrimary> {
        let node = &self.nodes[shard.0 as usize];
        let (window, buffer_size) = (self.window(), self.settings.load().buffer_size as usize);
        let buffer_max = Duration::from_millis(self.settings.load().buffer_max_ms);
        if let Some(lost) = node.tx.borrow().lost_at {
            if lost.elapsed() > buffer_max {
                return Err(NoPrimary(format!(
                    "shard {name} has had no primary for {} ms (failover-buffer-max-ms {}); statements are refused until one is found",
                    lost.elapsed().as_millis(),
                    buffer_max.as_millis()
                )));
            }
        }
        if node.buffered.fetch_add(1, Ordering::AcqRel) >= buffer_size {
            node.buffered.fetch_sub(1, Ordering::AcqRel);
            return Err(NoPrimary(format!(
                "shard {name} has no primary and {} statements already wait for one (failover-buffer-size)",
                buffer_size
            )));
        }
        let mut rx = node.tx.subscribe();
        let r = tokio::time::timeout(window, rx.wait_for(|p| done(p))).await;
        node.buffered.fetch_sub(1, Ordering::AcqRel);
        match r {
            Ok(Ok(_)) => Ok(()),
            _ => Err(NoPrimary(format!(
                "shard {name} found no primary within failover-buffer-window-ms ({} ms)",
                window.as_millis()
            ))),
        }
    }
}

/// The first host of `addr` that accepts a connection and is not in recovery.
/// Two hosts that both say they are the primary (a split brain: a standby promoted while the old primary
/// still runs) give no primary: writes are held until one of them is gone or demoted.
async fn probe(addr: &NodeAddr, timeout: Duration) -> Found {
    let mut found = Found::default();
    let mut primary_lsn = None;
    let mut standbys = Vec::new();
    let mut primaries = 0;
    for (host, port) in &addr.hosts {
        match position(addr, host, *port, timeout).await {
            Some(Position { in_recovery: false, lsn, timeline }) => {
                primaries += 1;
                found.primary = Some((host.clone(), *port));
                found.timeline = timeline;
                primary_lsn = lsn;
            }
            Some(Position { in_recovery: true, lsn, .. }) => standbys.push(((host.clone(), *port), lsn)),
            None => {}
        }
    }
    if primaries > 1 {
        tracing::warn!(hosts = ?addr.hosts, "more than one host says it is the primary: writes are held");
        found.primary = None;
        found.timeline = None;
    }
    found.replicas =
        standbys.into_iter().map(|(h, lsn)| (h, primary_lsn.zip(lsn).map(|(p, r)| p.saturating_sub(r)))).collect();
    found
}

/// A member of Patroni's `GET /cluster` answer (the fields the router reads).
#[derive(serde::Deserialize, Debug)]
struct Member {
    #[serde(default)]
    role: String,
    #[serde(default)]
    state: String,
    host: Option<String>,
    port: Option<u16>,
    /// Bytes behind the leader (a number, or "unknown").
    #[serde(default)]
    lag: serde_json::Value,
}

#[derive(serde::Deserialize, Debug)]
struct Cluster {
    #[serde(default)]
    members: Vec<Member>,
}

/// The leader that Patroni names (asking each member's REST API in turn until one answers), if the server at
/// that address agrees that it is a primary.
async fn probe_patroni(http: &reqwest::Client, urls: &[String], addr: &NodeAddr, timeout: Duration) -> Found {
    for url in urls {
        let answer = http.get(format!("{}/cluster", url.trim_end_matches('/'))).timeout(timeout).send().await;
        let Ok(cluster) = (match answer {
            Ok(r) if r.status().is_success() => r.json::<Cluster>().await,
            _ => continue,
        }) else {
            continue;
        };
        let replicas = cluster
            .members
            .iter()
            .filter(|m| {
                matches!(m.role.as_str(), "replica" | "sync_standby" | "standby")
                    && matches!(m.state.as_str(), "running" | "streaming")
            })
            .filter_map(|m| Some(((m.host.clone()?, m.port.unwrap_or(5432)), m.lag.as_u64())))
            .collect();
        let Some(leader) = cluster
            .members
            .iter()
            .find(|m| matches!(m.role.as_str(), "leader" | "master" | "primary") && m.state == "running")
        else {
            return Found { primary: None, timeline: None, replicas };
        };
        let Some(host) = leader.host.clone().map(|h| (h, leader.port.unwrap_or(5432))) else {
            return Found { primary: None, timeline: None, replicas };
        };
        // Fencing: Patroni's word and the server's must agree.
        return match position(addr, &host.0, host.1, timeout).await {
            Some(Position { in_recovery: false, timeline, .. }) => Found { primary: Some(host), timeline, replicas },
            other => {
                let in_recovery = other.map(|p| p.in_recovery);
                tracing::warn!(?host, ?in_recovery, "Patroni names a leader that is not a primary: writes wait");
                Found { primary: None, timeline: None, replicas }
            }
        };
    }
    Found::default()
}

/// Whether the server at `host:port` is in recovery (a standby); `None` if it cannot be asked.
pub async fn in_recovery(addr: &NodeAddr, host: &str, port: u16, timeout: Duration) -> Option<bool> {
    position(addr, host, port, timeout).await.map(|p| p.in_recovery)
}

/// What a server says of itself.
struct Position {
    in_recovery: bool,
    /// A primary's current LSN, a standby's replayed LSN, as a byte count.
    lsn: Option<u64>,
    /// A primary's current timeline (none for a standby).
    timeline: Option<u64>,
}

/// Asks a server where it stands (`None` if it cannot be asked).
async fn position(addr: &NodeAddr, host: &str, port: u16, timeout: Duration) -> Option<Position> {
    {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(host)
            .port(port)
            .user(addr.user.as_deref().unwrap_or("postgres"))
            .dbname(addr.dbname.as_deref().unwrap_or("postgres"))
            .application_name("shard-router probe")
            .connect_timeout(timeout);
        if let Some(pw) = &addr.password {
            cfg.password(pw);
        }
        let tls = shard_catalog::tls::connector(&mut cfg, &addr.params).ok()?;
        let attempt = async {
            let (client, conn) = cfg.connect(tls).await.ok()?;
            let task = tokio::spawn(conn);
            let row = client
                .query_one(
                    "SELECT pg_is_in_recovery(), (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                     ELSE pg_current_wal_lsn() END)::text, \
                     CASE WHEN NOT pg_is_in_recovery() THEN pg_walfile_name(pg_current_wal_lsn()) END",
                    &[],
                )
                .await
                .ok();
            task.abort();
            row.map(|r| Position {
                in_recovery: r.get(0),
                lsn: r.get::<_, Option<String>>(1).as_deref().and_then(parse_lsn),
                // A primary's WAL file name starts with its current timeline (8 hex digits).
                timeline: r.get::<_, Option<String>>(2).and_then(|f| u64::from_str_radix(f.get(..8)?, 16).ok()),
            })
        };
        tokio::time::timeout(timeout, attempt).await.ok().flatten()
    }
}

/// An LSN as PostgreSQL prints it (`16/B374D848`) as a byte position.
fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Whether an error that a server sent as the first answer to a statement means the statement did not run:
/// the server is shutting down (57P01-57P03), is read-only (25006: a demoted primary), or the connection
/// failed (08xxx).
pub fn not_run(code: &str) -> bool {
    matches!(code, "57P01" | "57P02" | "57P03" | "25006") || code.starts_with("08")
}
