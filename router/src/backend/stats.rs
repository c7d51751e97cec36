//! Per-shard counters for `/metrics` and the health endpoint: atomics bumped on the hot path (one `fetch_add`
//! per statement, one for its latency bucket and one for the latency sum), striped so that threads answering
//! statements at once do not share them (see [`ShardStats`]).

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds of the latency histogram's buckets, in microseconds (and `+Inf`).
pub const BOUNDS_US: [u64; 12] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000, 5_000_000, 30_000_000];

/// Stripes per shard (threads beyond this many share them in turn).
const STRIPES: usize = 16;

/// One stripe of a shard's counters: a cache line (two, on CPUs that fetch lines in pairs) of its own.
#[derive(Default)]
#[repr(align(128))]
struct Stripe {
    queries: AtomicU64,
    errors: AtomicU64,
    /// Per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

/// A shard's statements, errors and latency histogram. Each thread bumps the counters of its own stripe:
/// one set of counters bumped by every thread for every statement would pass its cache line from core to
/// core (each `fetch_add` waiting for the line), which on a many-core router costs more than the statement's
/// own work. Readers add the stripes up.
#[derive(Default)]
pub struct ShardStats {
    stripes: [Stripe; STRIPES],
}

impl ShardStats {
    fn sum(&self, f: impl Fn(&Stripe) -> &AtomicU64) -> u64 {
        self.stripes.iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
    }

    pub fn queries(&self) -> u64 {
        self.sum(|s| &s.queries)
    }

    pub fn errors(&self) -> u64 {
        self.sum(|s| &s.errors)
    }

    pub fn sum_us(&self) -> u64 {
        self.sum(|s| &s.sum_us)
    }

    /// Statements per latency bucket (not cumulative; the last is `+Inf`).
    pub fn buckets(&self) -> [u64; BOUNDS_US.len() + 1] {
        std::array::from_fn(|b| self.sum(|s| &s.buckets[b]))
    }
}

/// This thread's stripe (given out in turn, on the thread's first statement).
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES);
        }
        s.get()
    })
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
        let s = &s.stripes[stripe()];
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
        self.shards
            .get(i)
            .map_or((0, 0, Duration::ZERO), |s| (s.queries(), s.errors(), Duration::from_micros(s.sum_us())))
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}
