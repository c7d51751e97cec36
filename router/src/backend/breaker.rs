//! The circuit breaker of the design document, per node: **closed** (normal), **open** after
//! `circuit-breaker-threshold` consecutive connection failures (statements fail at once with a clear error
//! for `circuit-breaker-timeout` seconds, instead of each waiting for a connect timeout), then **half-open**:
//! `circuit-breaker-half-open-requests` trial statements go through; if they all succeed the circuit closes,
//! if one fails it opens again.
//!
//! Only connection failures count (a server that cannot be reached or drops the connection), not SQL errors.
//! A node whose primary changes (failover) starts closed again: the failures were the old server's.
//! When the breaker is disabled (the default) every call returns at once.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardmap::config::CircuitBreakerSettings;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

struct Node {
    phase: AtomicU8,
    failures: AtomicU32,
    /// Transitions (and the fields below) under this lock; the closed fast path reads atomics only.
    detail: Mutex<Detail>,
}

#[derive(Default)]
struct Detail {
    /// When the circuit opened, and the primary generation it opened for.
    opened: Option<(Instant, u64)>,
    trials_left: u32,
    successes: u32,
}

pub struct Breaker {
    enabled: std::sync::atomic::AtomicBool,
    /// The `circuit-breaker-*` settings (replaced by RELOAD).
    settings: arc_swap::ArcSwap<CircuitBreakerSettings>,
    nodes: Vec<Node>,
    /// Times any circuit opened (for metrics).
    pub opened_total: AtomicU64,
}

impl Breaker {
    pub fn new(settings: &CircuitBreakerSettings, nodes: usize) -> Breaker {
        Breaker {
            enabled: settings.enabled.into(),
            settings: arc_swap::ArcSwap::from_pointee(settings.clone()),
            nodes: (0..nodes)
                .map(|_| Node { phase: AtomicU8::new(CLOSED), failures: AtomicU32::new(0), detail: Default::default() })
                .collect(),
            opened_total: AtomicU64::new(0),
        }
    }

    /// RELOAD: new settings (a disabled breaker closes every circuit).
    pub fn update(&self, settings: &CircuitBreakerSettings) {
        self.settings.store(Arc::new(settings.clone()));
        self.enabled.store(settings.enabled, Ordering::Release);
        if !settings.enabled {
            for node in &self.nodes {
                let mut d = node.detail.lock().expect("breaker lock");
                self.close(node, &mut d);
            }
        }
    }

    fn threshold(&self) -> u32 {
        self.settings.load().threshold.max(1)
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.settings.load().timeout_s)
    }

    fn half_open(&self) -> u32 {
        self.settings.load().half_open_requests.max(1)
    }

    /// May a statement go to node `i` (whose primary is of `generation`)? `Err` has the client's message.
    pub fn admit(&self, i: usize, generation: u64, name: &str) -> Result<(), String> {
        if !self.enabled.load(Ordering::Relaxed) {
            return Ok(());
        }
        let node = &self.nodes[i];
        if node.phase.load(Ordering::Acquire) == CLOSED {
            return Ok(());
        }
        let mut d = node.detail.lock().expect("breaker lock");
        match node.phase.load(Ordering::Acquire) {
            OPEN => {
                let (at, opened_for) = d.opened.expect("an open circuit has a time");
                if opened_for != generation {
                    // A new primary: the failures were the old server's.
                    self.close(node, &mut d);
                    return Ok(());
                }
                let timeout = self.timeout();
                if at.elapsed() < timeout {
                    return Err(format!(
                        "circuit breaker open for shard {name}: {} connection failures in a row; statements fail at once for {} s more (circuit-breaker-timeout), then {} trial statements go through",
                        self.threshold(),
                        (timeout - at.elapsed()).as_secs() + 1,
                        self.half_open()
                    ));
                }
                node.phase.store(HALF_OPEN, Ordering::Release);
                d.trials_left = self.half_open() - 1;
                d.successes = 0;
                Ok(())
            }
            HALF_OPEN if d.trials_left > 0 => {
                d.trials_left -= 1;
                Ok(())
            }
            HALF_OPEN => Err(format!(
                "circuit breaker half-open for shard {name}: {} trial statements are running; try again shortly",
                self.half_open()
            )),
            _ => Ok(()),
        }
    }

    /// A statement on node `i` reached its server and got an answer.
    pub fn success(&self, i: usize) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let node = &self.nodes[i];
        if node.phase.load(Ordering::Acquire) == CLOSED {
            if node.failures.load(Ordering::Relaxed) != 0 {
                node.failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        let mut d = node.detail.lock().expect("breaker lock");
        if node.phase.load(Ordering::Acquire) == HALF_OPEN {
            d.successes += 1;
            if d.successes >= self.half_open() {
                self.close(node, &mut d);
            }
        }
    }

    /// Node `i` (primary of `generation`) could not be reached, or dropped a connection.
    pub fn failure(&self, i: usize, generation: u64) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let node = &self.nodes[i];
        let phase = node.phase.load(Ordering::Acquire);
        if phase == CLOSED && node.failures.fetch_add(1, Ordering::AcqRel) + 1 < self.threshold() {
            return;
        }
        let mut d = node.detail.lock().expect("breaker lock");
        if node.phase.load(Ordering::Acquire) != OPEN {
            node.phase.store(OPEN, Ordering::Release);
            d.opened = Some((Instant::now(), generation));
            self.opened_total.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(node = i, "circuit breaker open");
        }
    }

    fn close(&self, node: &Node, d: &mut Detail) {
        node.phase.store(CLOSED, Ordering::Release);
        node.failures.store(0, Ordering::Relaxed);
        *d = Detail::default();
    }

    /// `closed`, `open` or `half-open` (for health and metrics).
    pub fn state(&self, i: usize) -> &'static str {
        match self.nodes.get(i).map(|n| n.phase.load(Ordering::Acquire)) {
            Some(OPEN) => "open",
            Some(HALF_OPEN) => "half-open",
            _ => "closed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(timeout_s: u64) -> Breaker {
        Breaker::new(&CircuitBreakerSettings { enabled: true, threshold: 3, timeout_s, half_open_requests: 2 }, 1)
    }

    #[test]
    fn opens_after_threshold_and_fails_fast() {
        let b = breaker(30);
        b.failure(0, 0);
        b.failure(0, 0);
        assert_eq!(b.state(0), "closed");
        assert!(b.admit(0, 0, "0").is_ok());
        b.failure(0, 0);
        assert_eq!(b.state(0), "open");
        let e = b.admit(0, 0, "0").unwrap_err();
        assert!(e.contains("circuit breaker open for shard 0"), "{e}");
        // A new primary closes it.
        assert!(b.admit(0, 1, "0").is_ok());
        assert_eq!(b.state(0), "closed");
    }

    #[test]
    fn success_resets_the_count() {
        let b = breaker(30);
        b.failure(0, 0);
        b.failure(0, 0);
        b.success(0);
        b.failure(0, 0);
        b.failure(0, 0);
        assert_eq!(b.state(0), "closed");
    }

    #[test]
    fn half_open_lets_trials_through_then_closes_or_reopens() {
        let b = breaker(0);
        for _ in 0..3 {
            b.failure(0, 0);
        }
        assert_eq!(b.state(0), "open");
        // Timeout 0: the next statement is the first trial.
        assert!(b.admit(0, 0, "0").is_ok());
        assert_eq!(b.state(0), "half-open");
        assert!(b.admit(0, 0, "0").is_ok());
        assert!(b.admit(0, 0, "0").unwrap_err().contains("half-open"));
        b.success(0);
        b.success(0);
        assert_eq!(b.state(0), "closed");
        // A failed trial opens it again.
        for _ in 0..3 {
            b.failure(0, 0);
        }
        assert!(b.admit(0, 0, "0").is_ok());
        b.failure(0, 0);
        assert_eq!(b.state(0), "open");
    }

    #[test]
    fn disabled_never_opens() {
        let b = Breaker::new(
            &CircuitBreakerSettings { enabled: false, threshold: 1, timeout_s: 30, half_open_requests: 1 },
            1,
        );
        b.failure(0, 0);
        assert!(b.admit(0, 0, "0").is_ok());
        assert_eq!(b.state(0), "closed");
    }
}
