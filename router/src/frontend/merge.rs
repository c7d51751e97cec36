//! Simple queries on several connections at once: reads with no key outside a transaction (the same
//! statement on each shard, rows concatenated in shard order, one RowDescription, one CommandComplete with
//! the total), DDL and writes to global tables (the same statement on each; the first shard's answer stands
//! for all, and the first error of any is reported), and every statement of an all-shards transaction.
//! Ordered merging and aggregates come later (issue 11).

use std::collections::VecDeque;

use bytes::Bytes;
use shardmap::sql::Setting;
use shardmap::{Decision, ShardId};

use super::extended::{Exp, Merge, Role};
use super::session::{Failure, Session};
use super::simple::combined;
use super::txn::{Dest, State, Stmt};
use crate::backend::checkout::SETTINGS_UNKNOWN;
use crate::net::proto::{self, READY_IDLE};
use crate::net::wire::Stream;
use crate::net::Reported;

impl<S: Stream> Session<S> {
    /// Connections to `shards` (none: every shard), in the decision's database, in shard order.
    pub async fn links_to(&mut self, shards: Vec<ShardId>, d: Option<&Decision>) -> Result<Vec<usize>, Reported> {
        let shards = if shards.is_empty() { self.routing.map.all().collect() } else { shards };
        let db = d.and_then(|d| d.database.clone());
        let dests: Vec<Dest> = shards.into_iter().map(|shard| Dest { shard, db: db.clone() }).collect();
        self.hold_all(&dests).await?;
        for dest in &dests {
            self.link(dest).await?;
        }
        Ok(dests.iter().filter_map(|d| self.links.find(d)).collect())
    }

    /// A simple Query for several shards outside a transaction (or outside the held one).
    pub async fn fan_simple(
        &mut self,
        shards: Vec<ShardId>,
        frame: Bytes,
        d: Option<&Decision>,
        read: bool,
    ) -> Result<(), Failure> {
        let links = self.links_to(shards, d).await?;
        // (Metrics count statements answered by one shard: not these.)
        let answers = self.merge_on(&links, read, frame).await?;
        for (&i, (status, error)) in links.iter().zip(&answers) {
            let dest = self.links.get(i).dest.clone();
            self.txn.ready(&dest, *status, *error);
        }
        self.ready_for_query();
        self.io.flush().await.map_err(|e| Failure::Fatal(e.into()))
    }

    /// A simple Query on connections of the transaction (`links`): answers summed where each shard's is its
    /// part of the answer (see [`sums`]), else the first one's.
    pub async fn all_simple(
        &mut self,
        links: Vec<usize>,
        frame: Bytes,
        stmt: &Stmt,
        sets: &[Setting],
        d: Option<&Decision>,
    ) -> Result<(), Failure> {
        let answers = self.merge_on(&links, sums(stmt, d), frame).await?;
        let statuses: Vec<u8> = answers.iter().map(|(s, _)| *s).collect();
        if !sets.is_empty() {
            for &i in &links {
                self.links.get(i).conn.conn().settings = SETTINGS_UNKNOWN;
            }
            self.txn_settings.extend(sets.iter().cloned());
        }
        self.txn.ready_all(&statuses);
        if self.txn.implicit && answers.iter().any(|(_, error)| *error) {
            self.txn.error_inside();
        }
        self.end_implicit().await;
        if combined(&statuses) == READY_IDLE && self.txn.state == State::Idle && !self.txn_settings.is_empty() {
            match links.first() {
                Some(&first) => self.settle_txn_settings(first, self.txn.rolled_back_now, self.txn.went_back_now).await,
                None => self.txn_settings.clear(),
            }
        }
        self.ready_for_query();
        self.io.flush().await.map_err(|e| Failure::Fatal(e.into()))
    }

    /// Sends a simple Query on each link and merges the answers (see the module doc) with the extended
    /// protocol's relay and roles: for a read, rows concatenated under one RowDescription and one
    /// CommandComplete; otherwise the first link's answer. The first error of any link is reported.
    /// ReadyForQuery is the caller's to send; each link's status and whether it failed are returned. A link
    /// that breaks loses its exchange: every link of it is closed.
    pub async fn merge_on(&mut self, links: &[usize], read: bool, frame: Bytes) -> Result<Vec<(u8, bool)>, Reported> {
        for &i in links {
            let conn = self.links.get(i).conn.conn();
            conn.io.push(&frame);
            if let Err(e) = conn.flush().await {
                return Err(self.merge_broken(links, e.into()));
            }
        }
        let mut merged = Merge::holding_ready();
        let mut first = Merge::holding_ready();
        let mut out = Vec::with_capacity(links.len());
        for (n, &i) in links.iter().enumerate() {
            let (role, merge) = match (read, n) {
                (true, 0) => (Role::First, &mut merged),
                (true, _) => (Role::Rest, &mut merged),
                (false, 0) => (Role::Only, &mut first),
                (false, _) => (Role::Silent, &mut merged),
            };
            let mut exps = VecDeque::from([Exp::UntilReady]);
            match self.relay(i, &mut exps, role, merge, None).await {
                Ok((status, failed)) => out.push((status.unwrap_or(READY_IDLE), failed)),
                Err(e) => return Err(self.merge_broken(links, e)),
            }
        }
        let error = merged.take_error();
        if merged.copy_out && error.is_none() {
            proto::put(&mut self.io.wbuf, b'c', |_| {});
        }
        match error {
            // (After the first link's own error, relayed, the others' are the same news.)
            Some(e) if !first.failed => self.io.push(&e),
            Some(_) => {}
            None if read => proto::command_complete(&mut self.io.wbuf, &merged.tag()),
            None => {}
        }
        Ok(out)
    }

    /// A link of a merged exchange broke: the others are mid-answer, so all of them are closed (an
    /// all-shards transaction on them is lost).
    pub(super) fn merge_broken(&mut self, links: &[usize], e: Reported) -> Reported {
        let mut sorted = links.to_vec();
        sorted.sort_unstable();
        for i in sorted.into_iter().rev() {
            let l = self.links.remove(i);
            self.backend.failed(l.dest.shard, &e);
            if self.txn.lose(&l.dest) {
                self.txn_settings.clear();
            }
        }
        e
    }
}

/// Whether the answers of a statement sent to several connections of a transaction are summed (rows
/// concatenated, counts added: each shard's answer is its part — a read, or a write whose keys are on several
/// shards) rather than the first one's standing for all (DDL, writes to global tables, SET...).
pub fn sums(stmt: &Stmt, d: Option<&Decision>) -> bool {
    d.is_some_and(|d| match d.target {
        shardmap::Target::Set(_) => true,
        shardmap::Target::All => stmt.read,
        _ => false,
    })
}
