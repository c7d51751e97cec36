//! Pools of server connections, one per (shard, database, user). Semaphores bound each pool at `pool-size`;
//! a checkout waits at most `pool-timeout-ms` and then fails with a clear error. Connections go back only
//! when the server reported idle; anything else is closed, never handed to another client dirty.
//!
//! Under `SHARD_ROUTER_RUNTIME=event-loops` each of the router's single-threaded event loops is a *home* (the
//! default work-stealing runtime is one home). `pool-size` is split into one share of permits per home, and
//! a pool keeps its idle connections in one list per home: a checkout takes its own home's permit and idle
//! connection first, so that a client's session and the server connections it uses stay on one thread (no
//! wake-ups across threads); another home's only when its own has none (the connection's I/O stays
//! registered with the thread that opened it, and it goes back to that thread's list); and a checkout that
//! must wait waits on its own home's share, whose permits come back with its own home's connections. A new
//! connection is made only when no list holds an idle one, so the pool never holds more than `pool-size`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardmap::ShardId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::backend::cancel::{CancelKey, Slot};
use crate::backend::conn::{BackendError, ServerConn, Target};
use crate::net::proto;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub shard: ShardId,
    pub target: Target,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection to shard {shard} became free within {ms} ms (pool-size {size}); raise pool-size or pool-timeout-ms")]
    Timeout { shard: String, ms: u64, size: u32 },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl PoolError {
    pub fn sqlstate(&self) -> &str {
        match self {
            PoolError::Timeout { .. } => "53300",
            PoolError::Backend(e) => e.sqlstate(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub size: u32,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    /// The event loops (homes) whose clients use the pools; fixed at start.
    pub homes: usize,
}

pub struct Pool {
    key: PoolKey,
    name: String,
    /// Idle connections, one list per home. Boxed: a connection moves (pool → client → pool) with every
    /// transaction, a pointer is cheaper to move.
    #[allow(clippy::vec_box)]
    idle: Box<[Mutex<Vec<Box<ServerConn>>>]>,
    /// `pool-size` in shares, one per home (one share under the default runtime); a home's clients take
    /// their own share's permits first, another's only when theirs are all taken, and wait on their own.
    permits: Box<[Arc<Semaphore>]>,
    /// Shared by all pools; RELOAD replaces it (the size stays: it is fixed at start).
    settings: Arc<arc_swap::ArcSwap<Settings>>,
    /// Checkouts waiting for a free connection now (for metrics).
    waiting: std::sync::atomic::AtomicUsize,
    /// Set when the shard's primary moved away from this pool's host: connections are not kept any more.
    retired: std::sync::atomic::AtomicBool,
    /// ParameterStatus of the first connection made, for clients' startup.
    pub params: Mutex<Option<Vec<(String, String)>>>,
}

/// A checked-out connection. Give it back with [`Pooled::release`]; dropping it closes the connection.
pub struct Pooled {
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
    /// The home whose idle list the connection goes back to (the thread that opened it).
    home: usize,
    _permit: OwnedSemaphorePermit,
    /// The client's cancel slot this connection is registered in while checked out.
    cancel: Option<(Arc<Slot>, Arc<CancelKey>)>,
}

impl Pool {
    /// Connections checked out of this pool now.
    pub fn in_use(&self) -> usize {
        (self.settings.load().size as usize).saturating_sub(self.available())
    }

    pub async fn get(self: &Arc<Self>, home: usize) -> Result<Pooled, PoolError> {
        Ok(self.get_with(true, home).await?.expect("a checkout that waits gets a connection or an error"))
    }

    /// A checkout for a client of `home`; `wait: false`: `None` at once when every connection is taken (no
    /// waiting).
    pub async fn get_with(self: &Arc<Self>, wait: bool, home: usize) -> Result<Option<Pooled>, PoolError> {
        // A free permit is taken without setting up a timer (the home's own share first); only a wait is
        // bounded by pool-timeout-ms.
        let n = self.permits.len();
        let own = self.share_of(home);
        let free = (0..n).find_map(|k| self.permits[(own + k) % n].clone().try_acquire_owned().ok());
        let permit = match free {
            Some(p) => p,
            None if !wait => return Ok(None),
            None => match self.wait_permit(own).await {
                Ok(p) => p.expect("pool semaphore is never closed"),
                Err(_) => {
                    return Err(PoolError::Timeout {
                        shard: self.name.clone(),
                        ms: self.settings.load().timeout.as_millis() as u64,
                        size: self.settings.load().size,
                    })
                }
            },
        };
        let home = home % self.idle.len();
        let (conn, home) = match self.idle_conn(home) {
            Some(c) => c,
            None => {
                // Boxed: a connect is rare and its future is large; inline it would be copied on every checkout.
                let c = Box::pin(ServerConn::connect(&self.key.target, self.settings.load().timeout)).await?;
                let mut params = self.params.lock().expect("pool lock");
                if params.is_none() {
                    *params = Some(c.params.clone());
                }
                (Box::new(c), home)
            }
        };
        Ok(Some(Pooled { conn: Some(conn), pool: self.clone(), home, _permit: permit, cancel: None }))
    }

    /// The most recently used idle connection of `home`, else of another home (with the home it is from);
    /// the reaper closes old ones, and one that aged since is skipped.
    fn idle_conn(&self, home: usize) -> Option<(Box<ServerConn>, usize)> {
        let n = self.idle.len();
        (0..n).map(|k| (home + k) % n).find_map(|h| loop {
            let c = self.idle[h].lock().expect("pool lock").pop();
            match c {
                Some(c) if c.last_used.elapsed() >= self.settings.load().idle_timeout => drop(c),
                other => break other.map(|c| (c, h)),
            }
        })
    }

    /// The share a client of `home` waits on: its own, or (more homes than `pool-size`: a home without a
    /// share) another's.
    fn share_of(&self, home: usize) -> usize {
        if self.permits.len() == 1 {
            return 0;
        }
        let h = home % self.permits.len();
        // (Home h has a share of its own exactly when h < pool-size: see `shares`.)
        let size = (self.settings.load().size as usize).max(1);
        if h < size {
            h
        } else {
            h % size
        }
    }

    /// Permits free in all shares.
    fn available(&self) -> usize {
        self.permits.iter().map(|p| p.available_permits()).sum()
    }

    fn idle_len(&self) -> usize {
        self.idle.iter().map(|l| l.lock().expect("pool lock").len()).sum()
    }
}

impl Pool {
    /// The slow path of a checkout: every connection is taken; wait (bounded by pool-timeout-ms). Boxed:
    /// a timer's future is large and would be copied on every checkout.
    async fn wait_permit(
        self: &Arc<Self>,
        share: usize,
    ) -> Result<Result<OwnedSemaphorePermit, tokio::sync::AcquireError>, tokio::time::error::Elapsed> {
        use std::sync::atomic::Ordering;
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let permits = self.permits[share].clone();
        let r = Box::pin(tokio::time::timeout(self.settings.load().timeout, permits.acquire_owned())).await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        r
    }
}

/// A pool's figures for metrics and the health endpoint.
pub struct PoolStat {
    pub shard: ShardId,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub active: usize,
    pub idle: usize,
    pub waiting: usize,
}

impl Pooled {
    pub fn conn(&mut self) -> &mut ServerConn {
        self.conn.as_mut().expect("present until released")
    }

    /// Registers the connection in a client's cancel slot until it goes back or is closed.
    pub fn register_cancel(&mut self, slot: &Arc<Slot>) {
        let key = self.conn.as_ref().expect("present until released").cancel_key.clone();
        slot.add(key.clone());
        self.cancel = Some((slot.clone(), key));
    }

    /// Whether the connection belongs to `pool`.
    pub fn is_from(&self, pool: &Arc<Pool>) -> bool {
        Arc::ptr_eq(&self.pool, pool)
    }

    /// The status of the connection's last ReadyForQuery.
    pub fn conn_status(&self) -> u8 {
        self.conn.as_ref().map_or(crate::net::proto::READY_FAILED, |c| c.status)
    }

    pub fn shard(&self) -> ShardId {
        self.pool.key.shard
    }

    /// Returns the connection to its pool if the server said it is idle; otherwise closes it.
    pub fn release(mut self) {
        if let Some((slot, key)) = self.cancel.take() {
            slot.remove(&key);
        }
        if let Some(mut c) = self.conn.take() {
            let retired = self.pool.retired.load(std::sync::atomic::Ordering::Acquire);
            if c.status == proto::READY_IDLE && c.io.buffered() == 0 && !retired {
                c.last_used = Instant::now();
                self.pool.idle[self.home].lock().expect("pool lock").push(c);
            }
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some((slot, key)) = self.cancel.take() {
            slot.remove(&key);
        }
    }
}

/// All pools of a router.
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// Shared by all pools; RELOAD replaces it (the size stays: it is fixed at start).
    settings: Arc<arc_swap::ArcSwap<Settings>>,
}

impl Pools {
    pub fn new(settings: Settings) -> Pools {
        Pools { pools: Mutex::new(HashMap::new()), settings: Arc::new(arc_swap::ArcSwap::from_pointee(settings)) }
    }

    /// Closes idle connections older than `pool-idle-timeout`, in every pool.
    pub fn reap(&self) {
        let pools: Vec<Arc<Pool>> = self.pools.lock().expect("pools lock").values().cloned().collect();
        let cutoff = self.settings.load().idle_timeout;
        for p in pools {
            for list in p.idle.iter() {
                list.lock().expect("pool lock").retain(|c| c.last_used.elapsed() < cutoff);
            }
        }
    }

    /// After a shard's primary changed: its pools for other hosts leave the map and their idle connections
    /// are closed (connections checked out now are closed when given back: their pool is no longer found).
    pub fn retire(&self, shard: ShardId, keep: Option<&(String, u16)>) {
        let mut pools = self.pools.lock().expect("pools lock");
        let gone: Vec<PoolKey> = pools
            .keys()
            .filter(|k| k.shard == shard && keep.is_none_or(|(h, p)| k.target.host != *h || k.target.port != *p))
            .cloned()
            .collect();
        for k in gone {
            if let Some(p) = pools.remove(&k) {
                p.retired.store(true, std::sync::atomic::Ordering::Release);
                for list in p.idle.iter() {
                    list.lock().expect("pool lock").clear();
                }
            }
        }
    }

    /// RELOAD: new `pool-timeout-ms` and `pool-idle-timeout` for every pool.
    pub fn update(&self, timeout: Duration, idle_timeout: Duration) {
        let Settings { size, homes, .. } = **self.settings.load();
        self.settings.store(Arc::new(Settings { size, timeout, idle_timeout, homes }));
    }

    /// How often `reap` should run.
    pub fn reap_every(&self) -> Duration {
        (self.settings.load().idle_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Every pool's figures.
    pub fn stats(&self) -> Vec<PoolStat> {
        let pools: Vec<Arc<Pool>> = self.pools.lock().expect("pools lock").values().cloned().collect();
        pools
            .iter()
            .map(|p| PoolStat {
                shard: p.key.shard,
                host: p.key.target.host.clone(),
                port: p.key.target.port,
                database: p.key.target.database.clone(),
                user: p.key.target.user.clone(),
                active: (self.settings.load().size as usize).saturating_sub(p.available()),
                idle: p.idle_len(),
                waiting: p.waiting.load(std::sync::atomic::Ordering::Relaxed),
            })
            .collect()
    }

    /// Idle connections in all pools (for tests and, later, metrics).
    pub fn idle_count(&self) -> usize {
        let pools: Vec<Arc<Pool>> = self.pools.lock().expect("pools lock").values().cloned().collect();
        pools.iter().map(|p| p.idle_len()).sum()
    }

    pub fn pool(&self, key: PoolKey, name: &str) -> Arc<Pool> {
        let mut pools = self.pools.lock().expect("pools lock");
        pools
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Pool {
                    key,
                    name: name.to_string(),
                    idle: (0..self.settings.load().homes.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
                    permits: {
                        let s = self.settings.load();
                        shares(s.size as usize, s.homes.max(1))
                            .into_iter()
                            .map(|n| Arc::new(Semaphore::new(n)))
                            .collect()
                    },
                    settings: self.settings.clone(),
                    params: Mutex::new(None),
                    retired: Default::default(),
                    waiting: Default::default(),
                })
            })
            .clone()
    }
}

/// `size` split over `homes` shares as evenly as can be (the first ones get the remainder).
fn shares(size: usize, homes: usize) -> Vec<usize> {
    (0..homes).map(|i| size / homes + usize::from(i < size % homes)).collect()
}

impl From<PoolError> for crate::net::Reported {
    fn from(e: PoolError) -> Self {
        crate::net::Reported { code: e.sqlstate().to_string(), message: e.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::shares;

    #[test]
    fn pool_size_is_split_over_homes() {
        assert_eq!(shares(20, 1), vec![20]);
        assert_eq!(shares(20, 2), vec![10, 10]);
        assert_eq!(shares(5, 2), vec![3, 2]);
        // More homes than connections: the first ones get one each, the others none (they borrow).
        assert_eq!(shares(3, 4), vec![1, 1, 1, 0]);
        assert_eq!(shares(3, 4).iter().sum::<usize>(), 3);
    }
}
