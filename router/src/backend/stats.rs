//! Per-shard counters for `/metrics` and the health endpoint: atomics bumped on the hot path (one `fetch_add`
//! per statement and one for its latency bucket).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds of the latency histogram's buckets, in microseconds (and `+Inf`).
pub const BOUNDS_US: [u64; 12] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000, 5_000_000, 30_000_000];

#[derive(Default)]
pub struct ShardStats {
    pub queries: AtomicU64,
    pub errors: AtomicU64,
    /// Per bucket (not cumulative); the last is `+Inf`.
    pub buckets: [AtomicU64; BOUNDS_US.len() + 1],
    pub sum_us: AtomicU64,
}

pub struct Stats {
    pub shards: Vec<ShardStats>,
    /// Client connections open now.
    pub clients: AtomicI64,
    /// Health checks: consecutive failures per shard (`health-enabled`).
    pub health_failures: Vec<AtomicU64>,
    /// Statements refused by `router-rate-limit-*`: a user's bucket was empty, a tenant's.
    pub rate_limited: [AtomicU64; 2],
    started: Instant,
}

impl Stats {
    pub fn new(shards: usize) -> Stats {
        Stats {
            shards: (0..shards).map(|_| ShardStats::default()).collect(),
            clients: AtomicI64::new(0),
            health_failures: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            rate_limited: Default::default(),
            started: Instant::now(),
        }
    }

    /// A statement answered by shard `i` in `elapsed`; `error` if the server answered with an error.
    pub fn record(&self, i: usize, elapsed: Duration, error: bool) {
        let Some(s) = self.shards.get(i) else { return };
        s.queries.fetch_add(1, Ordering::Relaxed);
        if error {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
        let us = elapsed.as_micros().min(u64::MAX as u128) as u64;
        let b = BOUNDS_US.iter().position(|&le| us <= le).unwrap_or(BOUNDS_US.len());
        s.buckets[b].fetch_add(1, Ordering::Relaxed);
        s.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Shard `i`'s statements, errors and summed latency.
    pub fn shard(&self, i: usize) -> (u64, u64, Duration) {
        self.shards.get(i).map_or((0, 0, Duration::ZERO), |s| {
            (
                s.queries.load(Ordering::Relaxed),
                s.errors.load(Ordering::Relaxed),
                Duration::from_micros(s.sum_us.load(Ordering::Relaxed)),
            )
        })
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}
