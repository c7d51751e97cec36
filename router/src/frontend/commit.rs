//! COMMIT of a transaction on several shards (`txn.rs`: state `Many`). A shard the router sent a write to
//! wrote; every other shard's connection is asked whether its part wrote anyway (a function called by a
//! SELECT, `SELECT ... FOR UPDATE`: `txid_current_if_assigned`, as a transaction without a transaction id
//! wrote nothing). Where no more than one wrote, every part just commits. Otherwise two-phase commit:
//!
//! 1. `PREPARE TRANSACTION 'gb_2pc_<router>_<n>_<shard>'` on each shard that wrote;
//! 2. the decision is recorded in the decision log (`shard_catalog::Decisions`, in the catalog database) —
//!    the commit point: a PREPARE that failed, or a decision that could not be recorded, rolls every prepared
//!    part back and the client hears the error;
//! 3. `COMMIT PREPARED` on each; one that fails (its shard went away) is finished by recovery
//!    (`control/recovery.rs`), which commits every prepared transaction whose decision is recorded and rolls
//!    back those that stay undecided past `twophase::ABORT_AFTER`.
//!
//! The client is told COMMIT once the decision is recorded; whatever happens after, each part commits.
//!
//! Advisory locks are the first shard's (`shardmap::sql::StatementAnalysis::shared_call`), and a lock must be
//! let go only once the writes it guarded can be seen, as on one PostgreSQL: so the first shard's part
//! commits after the other writers', and the parts that only read (what they hold: an advisory lock,
//! `LOCK TABLE`) commit last, once the writes are committed or rolled back. That is a round trip more
//! than committing every part at once, on transactions over several shards only.

use std::time::Instant;

use super::session::{Failure, Session};
use super::txn::Dest;
use crate::backend::conn::BackendError;
use crate::backend::twophase::{self, DECIDE_WITHIN};
use crate::net::proto::{self, READY_FAILED};
use crate::net::wire::Stream;
use crate::net::Reported;
use shardmap::ShardId;

/// Whether a transaction has written (it has a transaction id).
const WROTE: &str = "SELECT pg_catalog.txid_current_if_assigned() IS NOT NULL";

type Answer = Result<Vec<Option<String>>, BackendError>;

impl<S: Stream> Session<S> {
    /// COMMIT of a transaction on several shards, as a simple Query.
    pub async fn commit_simple(&mut self) -> Result<(), Failure> {
        match self.commit_parts().await {
            Ok(tag) => proto::command_complete(&mut self.io.wbuf, tag),
            Err(e) => proto::error(&mut self.io.wbuf, "ERROR", &e.code, &e.message),
        }
        self.ready_for_query();
        self.io.flush().await.map_err(|e| Failure::Fatal(e.into()))
    }

    /// Commits the transaction on every shard it is on (see the module doc); it is over afterwards, whatever
    /// the outcome. Returns the command tag (`COMMIT`, or `ROLLBACK` when a shard had failed it), or the
    /// error the client is told.
    pub async fn commit_parts(&mut self) -> Result<&'static str, Reported> {
        let mut dests: Vec<Dest> = self.txn.parts().to_vec();
        dests.sort_by_key(|d| d.shard);
        let wrote = std::mem::take(&mut self.txn.wrote);
        let r = self.commit_dests(&dests, &wrote).await;
        let went_back = self.txn.rolled_back_to;
        self.txn.rolled_back();
        if r == Ok("COMMIT") && !self.txn_settings.is_empty() {
            if let Some(i) = dests.iter().find_map(|d| self.links.find(d)) {
                self.settle_txn_settings(i, false, went_back).await;
            }
        }
        self.txn_settings.clear();
        r
    }

    /// Ends the router's own transaction (`Txn::implicit`) before the client's ReadyForQuery: committed, or
    /// rolled back when anything in it failed; a failed commit's error goes to the client.
    pub async fn end_implicit(&mut self) {
        if !self.txn.implicit {
            return;
        }
        if !self.txn.on_shards() {
            // (It never opened anywhere: a join failed.)
            self.txn.rolled_back();
            return;
        }
        if self.txn.failed {
            let dests = self.txn.parts().to_vec();
            self.run_each(dests.into_iter().map(|d| (d, "ROLLBACK".to_string())).collect()).await;
            self.txn.rolled_back();
            self.txn_settings.clear();
            return;
        }
        if let Err(e) = self.commit_parts().await {
            proto::error(&mut self.io.wbuf, "ERROR", &e.code, &e.message);
        }
    }

    /// Commits the transactions open on `dests`' connections as one (see the module doc): the tag, or the
    /// error the client is told. The router's transaction state is the caller's.
    /// `wrote`: shards known to have written (not asked).
    pub(super) async fn commit_dests(&mut self, dests: &[Dest], wrote: &[ShardId]) -> Result<&'static str, Reported> {
        // A part the server failed (an error inside it): COMMIT rolls back, as PostgreSQL's does.
        let failed =
            dests.iter().any(|d| self.links.find(d).is_none_or(|i| self.links.get(i).status() == READY_FAILED));
        if failed {
            self.run_each(dests.iter().map(|d| (d.clone(), "ROLLBACK".to_string())).collect()).await;
            return Ok("ROLLBACK");
        }
        let (mut writers, mut readers) = (Vec::new(), Vec::new());
        let (known, ask): (Vec<&Dest>, Vec<&Dest>) = dests.iter().partition(|d| wrote.contains(&d.shard));
        writers.extend(known.into_iter().cloned());
        let answers = self.run_each(ask.iter().map(|d| ((*d).clone(), WROTE.to_string())).collect()).await;
        for (d, a) in ask.into_iter().zip(answers) {
            match a {
                Ok(row) if row.first() == Some(&Some("t".to_string())) => writers.push(d.clone()),
                Ok(_) => readers.push(d.clone()),
                Err(e) => {
                    self.run_each(dests.iter().map(|d| (d.clone(), "ROLLBACK".to_string())).collect()).await;
                    return Err(e.into());
                }
            }
        }
        let backends = self.backend.backends.clone();
        let tp = &backends.two_phase;
        let commit = |ds: &[Dest]| ds.iter().map(|d| (d.clone(), "COMMIT".to_string())).collect::<Vec<_>>();
        if writers.len() <= 1 {
            tp.counters.one_phase.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let answers = self.run_each(commit(&writers)).await;
            // (The shards that only read have nothing to lose.)
            self.run_each(commit(&readers)).await;
            if let Some(Err(e)) = answers.into_iter().next() {
                return Err(e.into());
            }
            return Ok("COMMIT");
        }
        let Some(decisions) = &tp.decisions else {
            self.run_each(dests.iter().map(|d| (d.clone(), "ROLLBACK".to_string())).collect()).await;
            return Err(Reported::unsupported(
                "this transaction wrote to several shards and there is no node to keep two-phase commit decisions on; it was rolled back",
            ));
        };
        let txid = tp.begin();
        let router = tp.router.clone();
        let started = Instant::now();
        let gids: Vec<String> = writers.iter().map(|d| twophase::gid(&txid, d.shard)).collect();
        let phase1: Vec<(Dest, String)> =
            writers.iter().zip(&gids).map(|(d, g)| (d.clone(), format!("PREPARE TRANSACTION '{g}'"))).collect();
        let answers = self.run_each(phase1).await;
        let mut failure: Option<Reported> = None;
        let mut prepared = Vec::new();
        for ((d, g), a) in writers.iter().zip(&gids).zip(answers) {
            match a {
                Ok(_) => prepared.push((d.clone(), g.clone())),
                Err(e) => {
                    failure.get_or_insert(e.into());
                }
            }
        }
        if failure.is_none() && started.elapsed() > DECIDE_WITHIN {
            failure = Some(Reported::new(
                "40001",
                format!(
                    "the transaction was rolled back: preparing it on its shards took longer than {DECIDE_WITHIN:?}"
                ),
            ));
        }
        let decided = match failure {
            Some(e) => Err(e),
            None => {
                let decisions_addr = decisions.addr.to_string();
                match decisions.commit(&txid, &router, &gids).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(Reported::new(
                        "40001",
                        "the transaction was rolled back: it stayed prepared and undecided long enough for recovery to roll it back",
                    )),
                    Err(shard_catalog::RecordError::NotRecorded(e)) => Err(Reported::new(
                        "08006",
                        format!(
                            "the transaction was rolled back: its commit decision could not be recorded in the decision log at {decisions_addr}: {e:#}"
                        ),
                    )),
                    Err(shard_catalog::RecordError::Unknown(e)) => {
                        tp.finished(&txid, false);
                        return Err(Reported::new(
                            "08007",
                            format!(
                                "the commit of transaction {txid} on several shards is in doubt: the decision log at {decisions_addr} did not answer ({e:#}); the router's recovery commits it or rolls it back on every shard within {}s",
                                (twophase::ABORT_AFTER + twophase::RECOVER_EVERY).as_secs()
                            ),
                        ));
                    }
                }
            }
        };
        if let Err(e) = decided {
            tp.counters.rolled_back.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let undo = prepared.into_iter().map(|(d, g)| (d, format!("ROLLBACK PREPARED '{g}'"))).collect();
            let answers = self.run_each(undo).await;
            // Any left prepared (a shard went away) has no decision: recovery rolls it back.
            let left = answers.iter().any(|a| a.is_err());
            if left {
                tracing::warn!(txid = %txid, "2PC: a rolled-back transaction stays prepared on a shard; recovery rolls it back");
            }
            self.run_each(commit(&readers)).await;
            tp.finished(&txid, false);
            return Err(e);
        }
        // (The first shard, where advisory locks are, commits after the other writers.)
        let (last, others): (Vec<_>, Vec<_>) = prepared.into_iter().partition(|(d, _)| d.shard == ShardId(0));
        let finish =
            |p: Vec<(Dest, String)>| p.into_iter().map(|(d, g)| (d, format!("COMMIT PREPARED '{g}'"))).collect();
        let mut answers = self.run_each(finish(others)).await;
        answers.extend(self.run_each(finish(last)).await);
        self.run_each(commit(&readers)).await;
        let all = answers.iter().all(|a| a.is_ok());
        if !all {
            tracing::warn!(txid = %txid, "2PC: COMMIT PREPARED failed on a shard; recovery commits it there");
        }
        tp.finished(&txid, all);
        tp.committed_in(started.elapsed());
        Ok("COMMIT")
    }

    /// Runs one simple query on each destination's connection at once (all sent, then each answer read),
    /// returning each one's first row or error. A connection that breaks is closed.
    async fn run_each(&mut self, work: Vec<(Dest, String)>) -> Vec<Answer> {
        let mut out: Vec<Option<Answer>> = Vec::with_capacity(work.len());
        for (d, sql) in &work {
            let Some(i) = self.links.find(d) else {
                out.push(Some(Err(BackendError::Connect {
                    addr: format!("shard {}", d.shard.0),
                    why: "the transaction's connection is gone".into(),
                })));
                continue;
            };
            let conn = self.links.get(i).conn.conn();
            proto::query(&mut conn.io.wbuf, sql);
            out.push(conn.flush().await.err().map(Err));
        }
        let mut gone = Vec::new();
        let mut answers = Vec::with_capacity(work.len());
        for ((d, _), sent) in work.iter().zip(out) {
            let a = match sent {
                Some(err) => err,
                None => {
                    let i = self.links.find(d).expect("found above");
                    self.links.get(i).conn.conn().answer_row().await
                }
            };
            if matches!(a, Err(BackendError::Wire(..) | BackendError::Connect { .. })) {
                gone.push(d.clone());
            }
            answers.push(a);
        }
        for d in gone {
            if let Some(i) = self.links.find(&d) {
                drop(self.links.remove(i));
            }
        }
        answers
    }
}
