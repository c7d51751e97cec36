//! Server side: raw server connections ([`conn`]), pools ([`pool`]), where each shard's primary is
//! ([`topology`]), the circuit breaker ([`breaker`]), tenant databases ([`tenant`]), cancel keys ([`cancel`])
//! and the per-shard counters ([`stats`]). [`Backends`] is the handle every client task holds for all of it.

pub mod breaker;
pub mod cancel;
pub mod checkout;
pub mod conn;
pub mod pool;
pub mod stats;
pub mod tenant;
pub mod tls;
pub mod topology;
pub mod twophase;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use shardmap::{Config, ShardId, ShardMap};

/// Where a statement runs: a shard, and under the tenant strategy the tenant's database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dest {
    pub shard: ShardId,
    pub db: Option<String>,
}

impl Dest {
    pub fn of(shard: ShardId, d: &shardmap::Decision) -> Dest {
        Dest { shard, db: d.database.clone() }
    }
}

/// The servers behind the router: their pools, primaries, breakers and counters.
pub struct Backends {
    /// The running config (shared with the routing handle; RELOAD replaces it).
    pub config: Arc<ArcSwap<Config>>,
    pub map: Arc<ShardMap>,
    pub pools: Arc<pool::Pools>,
    /// Where each shard's primary is (and the failover buffer).
    pub topology: Arc<topology::Topology>,
    pub breaker: breaker::Breaker,
    /// Counters for `/metrics` and the health endpoint.
    pub stats: stats::Stats,
    /// Serializes this router's tenant database creations (`shard-auto-create`).
    pub creating: tokio::sync::Mutex<()>,
    /// Raised by every schema change (DDL) through this router: server-side names of statements prepared
    /// after it differ from those prepared before, so that a statement parsed again after `DROP TYPE`/`CREATE
    /// TYPE` (or `ALTER TABLE`) is parsed anew on the server instead of reusing a plan of the old schema.
    pub schema_epoch: AtomicU64,
    /// Where the transactions prepared through this router (PREPARE TRANSACTION 'gid') are, until COMMIT
    /// PREPARED or ROLLBACK PREPARED.
    pub prepared: std::sync::Mutex<std::collections::HashMap<String, Dest>>,
    /// Two-phase commit of transactions on several shards: names, decision log, counters.
    pub two_phase: twophase::TwoPhase,
    /// Per shard: until when (ms since `epoch`) it is believed down after a failed connection attempt.
    down_until: Vec<AtomicU64>,
    epoch: Instant,
    /// The ParameterStatus a server gave clients' startups, by where and as whom they connected and with
    /// which startup settings (see `Checkout::welcome`).
    welcomes: std::sync::Mutex<std::collections::HashMap<WelcomeKey, Welcome>>,
}

/// Whose startup a [`Welcome`] answers: the shard (and tenant database), the user and database the client
/// connected as, the hash of its startup settings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WelcomeKey {
    pub shard: ShardId,
    pub db: Option<String>,
    pub user: String,
    pub database: String,
    pub settings: u64,
}

/// The ParameterStatus a server sent for a client's startup settings, on the primary of `generation`, at `at`.
struct Welcome {
    generation: u64,
    at: Instant,
    params: Arc<[(String, String)]>,
}

/// How long a [`Welcome`] answers startups: a server's defaults changed since (`ALTER ROLE ... SET`, `ALTER
/// DATABASE ... SET`) show in the next startup after this.
const WELCOME_FOR: Duration = Duration::from_secs(60);

/// The most [`Welcome`]s kept (past it they are forgotten and learned again).
const WELCOMES: usize = 1024;

impl Backends {
    /// `homes`: the event loops whose clients use the pools (see `pool.rs`).
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        map: Arc<ShardMap>,
        two_phase: twophase::TwoPhase,
        homes: usize,
    ) -> Backends {
        let c = config.load();
        let pools = Arc::new(pool::Pools::new(pool::Settings {
            size: c.pool.size,
            timeout: Duration::from_millis(c.pool.timeout_ms),
            idle_timeout: Duration::from_secs(c.pool.idle_timeout_s),
            homes,
        }));
        let topology = Arc::new(topology::Topology::new(&map, &c));
        let n = map.nodes.len();
        Backends {
            breaker: breaker::Breaker::new(&c.circuit_breaker, n),
            stats: stats::Stats::new(n),
            pools,
            topology,
            creating: Default::default(),
            prepared: Default::default(),
            two_phase,
            schema_epoch: AtomicU64::new(0),
            down_until: (0..n).map(|_| Default::default()).collect(),
            epoch: Instant::now(),
            welcomes: Default::default(),
            map,
            config: config.clone(),
        }
    }

    /// A shard for statements any shard can answer, in turn, skipping shards that just failed to connect and
    /// shards paused by the admin console. Each thread takes its own turns (a counter every thread bumped on
    /// every such statement would pass its cache line from core to core).
    pub fn any_shard(&self) -> ShardId {
        thread_local! {
            static TURN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        }
        let n = self.map.nodes.len().max(1);
        let now = self.epoch.elapsed().as_millis() as u64;
        let mut pick = 0;
        for _ in 0..n {
            pick = TURN.with(|t| {
                let turn = t.get();
                t.set(turn.wrapping_add(1));
                turn
            }) % n;
            if self.down_until[pick].load(Ordering::Relaxed) <= now && !self.topology.is_paused(ShardId(pick as u16)) {
                break;
            }
        }
        ShardId(pick as u16)
    }

    /// What the server answered a startup like `key`'s (see [`WelcomeKey`]), on the shard's current primary
    /// within [`WELCOME_FOR`].
    pub fn welcome(&self, key: &WelcomeKey) -> Option<Arc<[(String, String)]>> {
        let generation = self.topology.generation(key.shard);
        let welcomes = self.welcomes.lock().expect("welcomes lock");
        let w = welcomes.get(key)?;
        (w.generation == generation && w.at.elapsed() < WELCOME_FOR).then(|| w.params.clone())
    }

    /// Remembers what a server answered a startup like `key`'s (at most [`WELCOMES`]: past it the stale ones
    /// are forgotten, or all).
    pub fn remember_welcome(&self, key: WelcomeKey, params: &[(String, String)]) {
        let generation = self.topology.generation(key.shard);
        let mut welcomes = self.welcomes.lock().expect("welcomes lock");
        if welcomes.len() >= WELCOMES {
            welcomes.retain(|_, w| w.at.elapsed() < WELCOME_FOR);
            if welcomes.len() >= WELCOMES {
                welcomes.clear();
            }
        }
        welcomes.insert(key, Welcome { generation, at: Instant::now(), params: params.into() });
    }

    /// Notes that a shard could not be reached: `any_shard` avoids it for a couple of seconds.
    pub fn mark_down(&self, shard: ShardId) {
        let until = self.epoch.elapsed().as_millis() as u64 + 2000;
        if let Some(d) = self.down_until.get(shard.0 as usize) {
            d.store(until, Ordering::Relaxed);
        }
    }
}
