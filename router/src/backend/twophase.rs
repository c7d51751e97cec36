//! The router's side of two-phase commit: the names of the transactions it prepares, the decision log
//! (`shard_catalog::Decisions`), the transactions in flight (which this router's recovery leaves to their
//! session), and the counters `/metrics` shows. The commit itself is the session's (`frontend/commit.rs`); the
//! recovery of transactions left prepared is a control task (`control/recovery.rs`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use shardmap::catalog::TWO_PHASE_PREFIX;

use super::stats::BOUNDS_US;

/// A transaction prepared and undecided for longer than this is rolled back by recovery (any router's).
pub const ABORT_AFTER: Duration = Duration::from_secs(10);
/// A session that took longer than this from its first PREPARE TRANSACTION to its decision rolls back
/// instead (well under `ABORT_AFTER`, so that it never races a recovery's abort).
pub const DECIDE_WITHIN: Duration = Duration::from_secs(5);
/// How often recovery looks at every node's prepared transactions.
pub const RECOVER_EVERY: Duration = Duration::from_secs(2);

pub struct TwoPhase {
    /// Where decisions are recorded (`None`: no node to keep them on; transactions on several shards that
    /// wrote to more than one are refused at COMMIT).
    pub decisions: Option<shard_catalog::Decisions>,
    /// This router's id in the decision log.
    pub router: String,
    /// The short tag in the names of the transactions this router prepares.
    pub tag: String,
    seq: AtomicU64,
    inflight: Mutex<HashSet<String>>,
    /// Committed everywhere: their decisions are deleted by the next recovery round.
    done: Mutex<Vec<String>>,
    pub counters: Counters,
}

/// What `/metrics` shows of two-phase commit.
#[derive(Default)]
pub struct Counters {
    /// Transactions committed with two-phase commit.
    pub committed: AtomicU64,
    /// Transactions on several shards committed in one phase (no more than one shard wrote).
    pub one_phase: AtomicU64,
    /// Transactions rolled back at COMMIT (a PREPARE failed, or the decision could not be recorded).
    pub rolled_back: AtomicU64,
    /// Prepared transactions recovery committed / rolled back.
    pub recovered_commit: AtomicU64,
    pub recovered_abort: AtomicU64,
    /// Prepared transactions of routers that the last recovery round found and left prepared, not counting
    /// this router's in flight nor any younger than `DECIDE_WITHIN` (a session may still be deciding them):
    /// in doubt until recovery finishes them (a gauge).
    pub in_doubt: AtomicU64,
    /// Two-phase commit latency (first PREPARE to the last COMMIT PREPARED), per bucket; the last is `+Inf`.
    pub buckets: [AtomicU64; BOUNDS_US.len() + 1],
    pub sum_us: AtomicU64,
}

impl TwoPhase {
    pub fn new(decisions: Option<shard_catalog::Decisions>, router: String) -> TwoPhase {
        // The router id ends with a random part (see `shard_catalog::Catalog::new`): its last 8 characters.
        let tag: String = router.chars().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect();
        let tag = tag.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { 'x' }).collect();
        TwoPhase {
            decisions,
            router,
            tag,
            seq: AtomicU64::new(0),
            inflight: Mutex::default(),
            done: Mutex::default(),
            counters: Counters::default(),
        }
    }

    /// A new transaction id (in flight until [`TwoPhase::finished`]).
    pub fn begin(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let txid = format!("{TWO_PHASE_PREFIX}{}_{n}", self.tag);
        self.inflight.lock().expect("inflight lock").insert(txid.clone());
        txid
    }

    /// The session is done with `txid` (committed, rolled back, or left to recovery); `forget`: committed on
    /// every shard, its decision can go.
    pub fn finished(&self, txid: &str, forget: bool) {
        self.inflight.lock().expect("inflight lock").remove(txid);
        if forget {
            self.done.lock().expect("done lock").push(txid.to_string());
        }
    }

    pub fn in_flight(&self, txid: &str) -> bool {
        self.inflight.lock().expect("inflight lock").contains(txid)
    }

    /// The decisions to delete (taken).
    pub fn take_done(&self) -> Vec<String> {
        std::mem::take(&mut *self.done.lock().expect("done lock"))
    }

    pub fn committed_in(&self, elapsed: Duration) {
        let c = &self.counters;
        c.committed.fetch_add(1, Ordering::Relaxed);
        let us = elapsed.as_micros().min(u64::MAX as u128) as u64;
        let b = BOUNDS_US.iter().position(|&le| us <= le).unwrap_or(BOUNDS_US.len());
        c.buckets[b].fetch_add(1, Ordering::Relaxed);
        c.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// The name of the transaction prepared on `shard` for `txid`.
pub fn gid(txid: &str, shard: shardmap::ShardId) -> String {
    format!("{txid}_{}", shard.0)
}

/// The transaction id of a prepared transaction's name, when it is one of a router's.
pub fn txid_of(gid: &str) -> Option<&str> {
    if !gid.starts_with(TWO_PHASE_PREFIX) {
        return None;
    }
    gid.rsplit_once('_').map(|(t, _)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back() {
        let t = TwoPhase::new(None, "host-42-0a1b2c3d".into());
        let txid = t.begin();
        assert_eq!(txid, "gb_2pc_0a1b2c3d_0");
        assert!(t.in_flight(&txid));
        let g = gid(&txid, shardmap::ShardId(3));
        assert_eq!(g, "gb_2pc_0a1b2c3d_0_3");
        assert_eq!(txid_of(&g), Some(txid.as_str()));
        assert_eq!(txid_of("mine"), None);
        t.finished(&txid, true);
        assert!(!t.in_flight(&txid));
        assert_eq!(t.take_done(), vec![txid]);
    }
}
