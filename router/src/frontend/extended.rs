//! The extended query protocol: Parse/Bind/Describe/Execute/Close up to a Sync (or Flush) form a batch, cut
//! into segments at each Execute; each segment with a Bind is one statement for the transaction state
//! machine, exactly as a Query is. A sync group (the messages up to a Sync) may span several connections:
//! each gets its own Sync only when the client's comes, so that the statements of one group commit together
//! or, after an error anywhere, not at all (the other connections of the group are closed, which rolls them
//! back, as the server would roll back its implicit transaction); then one ReadyForQuery reaches the client.
//!
//! Named prepared statements keep working under transaction pooling, as PgBouncer 1.21+ does: the router
//! keeps each client's statements, names them on servers by a hash of their text and parameter types
//! (`sr_<hash>`), and prepares them on whatever connection the client gets, leaving out a Parse the server
//! already has (and answering ParseComplete itself) or adding one before a Bind that needs it (and
//! swallowing its ParseComplete). Closing a client statement does not close the server's copy.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use foldhash::HashSet;
use shardmap::sql::{Setting, TxnVerb};
use shardmap::{Decision, Target};

use super::session::{
    refuse_connection_state, settings_of, statement_hash, BindParams, ClientStmt, Failure, Linked, Session, Statements,
};
use super::txn::{Dest, Local, Plan, Run, State, Stmt, To};
use crate::backend::conn::{BackendError, ServerConn};
use crate::net::proto::{self, READY_IDLE};
use crate::net::wire::{Framed, Msg, RelayError, Stream, FLUSH_AT};
use crate::net::{Fatal, Reported};

/// What the client expects back for each message sent (or not sent) to the server.
#[derive(Debug)]
pub enum Exp {
    /// A Parse sent; with the server-side name to record once it succeeds.
    Parse(Option<String>),
    /// A Parse the router added; its ParseComplete is not for the client.
    SwallowParse(Option<String>),
    /// A Parse left out (the server has the statement): the router answers ParseComplete.
    InjectParse,
    /// A Close of a client statement, answered by the router.
    InjectClose,
    Bind,
    DescribeStmt,
    DescribePortal,
    Execute,
    Close,
    Sync,
    /// A message of a replayed statement (the held transaction's queue), answered to nobody: ParseComplete,
    /// BindComplete, then CommandComplete.
    Quiet(u8),
    /// A simple Query: every statement's answers up to ReadyForQuery.
    UntilReady,
}

impl Exp {
    /// An expectation of a message the client sent as it is, whose answer goes back as the server sends it.
    fn relayed_as_is(&self) -> bool {
        matches!(
            self,
            Exp::Parse(None)
                | Exp::Bind
                | Exp::DescribeStmt
                | Exp::DescribePortal
                | Exp::Execute
                | Exp::Close
                | Exp::Sync
        )
    }
}

/// How a connection's answers reach the client when a statement goes to several connections.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    Only,
    /// A read on several shards: everything but CommandComplete (merged) from the first...
    First,
    /// ...and only the rows from the others.
    Rest,
    /// Nothing reaches the client (the others of a statement sent everywhere); errors are kept.
    Silent,
}

#[derive(Default)]
pub struct Merge {
    rows: u64,
    verb: String,
    error: Option<bytes::Bytes>,
    /// Whether any ErrorResponse came back.
    pub failed: bool,
    /// Whether the `Only` connection's ErrorResponse reached the client: the others' are the same news, not
    /// a second error for one statement.
    relayed_error: bool,
    /// Whether the statement was executed (an Execute was in it): the merged CommandComplete is owed.
    executes: bool,
    /// COPY ... FROM STDIN: stop at the CopyInResponse (the data comes next)...
    pub stop_at_copy: bool,
    /// ...which came.
    pub copy_in: bool,
    /// COPY TO STDOUT: a CopyOutResponse came (the merged answer ends with one CopyDone).
    pub copy_out: bool,
    /// Keep ReadyForQuery from the client (several connections answer: the caller sends one).
    pub hold_ready: bool,
}

impl Merge {
    /// A merge whose connections' ReadyForQuery the caller answers with one of its own.
    pub fn holding_ready() -> Merge {
        Merge { hold_ready: true, ..Merge::default() }
    }

    /// A merge that stops at a CopyInResponse (see `stop_at_copy`).
    pub fn until_copy() -> Merge {
        Merge { stop_at_copy: true, ..Merge::default() }
    }

    /// The first error of the others (roles other than `Only`), as its frame.
    pub fn take_error(&mut self) -> Option<bytes::Bytes> {
        self.error.take()
    }

    /// The rows counted in the others' CommandComplete.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The merged CommandComplete of a read on several connections (`SELECT n`, `COPY n`).
    pub fn tag(&self) -> String {
        match self.verb.as_str() {
            "" => format!("SELECT {}", self.rows),
            // (An INSERT's tag keeps PostgreSQL's OID field, always 0.)
            "INSERT" => format!("INSERT 0 {}", self.rows),
            verb => format!("{verb} {}", self.rows),
        }
    }
}

/// A segment sent and waiting for its answers.
struct Entry {
    dest: Dest,
    exps: VecDeque<Exp>,
    role: Role,
    /// The merge of a statement sent to several connections (index in `Pending::merges`).
    fan: Option<usize>,
    /// The last entry of its fan-out: the merged CommandComplete follows it.
    closes_fan: bool,
}

/// Segments sent and not yet answered, in the client's order.
#[derive(Default)]
pub struct Pending {
    entries: Vec<Entry>,
    merges: Vec<Merge>,
    /// The segment being run is the batch's last (its Sync or Flush follows).
    last: bool,
    /// ... and a Sync follows it.
    sync_next: bool,
}

/// What a statement of the current sync group does when its connection's Sync comes back.
pub struct Effect {
    pub dest: Dest,
    pub stmt: Stmt,
    pub sets: Vec<Setting>,
    pub text: Arc<str>,
    /// It ran outside a transaction, in the sync group's implicit one, not yet ended by a COMMIT or ROLLBACK.
    pub implicit: bool,
    /// The other connections a write sent to several shards outside a transaction ran on (`dest` is the first).
    pub others: Vec<Dest>,
}

/// How a segment ended.
enum Seg {
    /// Sent (or answered); the batch goes on.
    Next,
    /// Sent with the batch's Sync and answered up to ReadyForQuery (one connection, nothing else pending).
    Synced,
    /// A COPY took over the client's stream: the rest of the batch was put back in the inbox.
    Copied,
}

/// Cuts a batch into segments: each ends after an Execute; what follows the last Execute (Parse/Describe/
/// Close only) is a segment too. The final Sync or Flush is not in any. (An iterator: no vector allocated
/// for every batch.)
fn segments(batch: &[Msg]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let end = match batch.last().map(|m| m.tag) {
        Some(b'S' | b'H') => batch.len() - 1,
        _ => batch.len(),
    };
    let mut start = 0;
    std::iter::from_fn(move || {
        (start < end).then(|| {
            let stop = batch[start..end].iter().position(|m| m.tag == b'E').map_or(end, |e| start + e + 1);
            let segment = start..stop;
            start = stop;
            segment
        })
    })
}

impl<S: Stream> Session<S> {
    /// Runs one batch; errors the router raises are reported the way a server would report them.
    pub async fn batch(&mut self, batch: &[Msg]) -> Result<(), Fatal> {
        let end = batch.last().map(|m| m.tag);
        let mut pending = Pending::default();
        let mut synced = false;
        for range in segments(batch) {
            if self.group_failed {
                // After an error the server skips everything up to Sync; so does the router.
                continue;
            }
            // (The last segment before the Sync: it ends where the Sync starts.)
            let fast = end == Some(b'S') && range.end == batch.len() - 1 && !self.links.iter().any(|l| l.pending);
            pending.last = matches!(end, Some(b'S' | b'H')) && range.end == batch.len() - 1;
            pending.sync_next = pending.last && end == Some(b'S');
            match self.segment(&batch[range.clone()], fast, &mut pending).await {
                Ok(Seg::Next) => {}
                Ok(Seg::Synced) => synced = true,
                Ok(Seg::Copied) => {
                    // The COPY read the client's stream itself; what followed it in this batch went back to
                    // the inbox (ahead of anything the COPY did not consume).
                    for m in batch[range.end..].iter().rev() {
                        self.inbox.push_front(m.clone());
                    }
                    return Ok(());
                }
                Err(Failure::Reported(e)) => self.fail_group(e, &mut pending).await?,
                Err(Failure::Fatal(f)) => return Err(f),
            }
        }
        match end {
            Some(b'S') if !synced => self.sync(&mut pending).await,
            Some(b'S') => Ok(()),
            Some(b'H') => {
                self.drain(&mut pending).await?;
                self.settle_committed().await;
                self.io.flush().await?;
                Ok(())
            }
            _ => self.drain(&mut pending).await,
        }
    }

    /// At a Flush, after the answers: settings a COMMIT of the sync group committed (it was the last statement
    /// before the Flush, see `commits_settings`) are the client's now, not at the Sync — where an error of a
    /// statement sent after the Flush would drop them, though one PostgreSQL keeps what a COMMIT committed
    /// whatever fails after it.
    async fn settle_committed(&mut self) {
        if self.group_failed || (self.txn_settings.is_empty() && self.group_effects.iter().all(|e| e.sets.is_empty())) {
            return;
        }
        let before = self.settings.hash();
        let settled = self.settle_committed_settings().await;
        let now = self.settings.hash();
        if now != before {
            // (The group's other connections are mid-pipeline: they cannot be given the settings before the
            // Sync.)
            for l in self.links.iter_mut().filter(|l| !settled.contains(&l.dest)) {
                if l.conn.conn().settings != now && !self.stale_in_group.contains(&l.dest) {
                    self.stale_in_group.push(l.dest.clone());
                }
            }
        }
    }

    /// See `settle_committed`; returns the connections that have the settings now.
    async fn settle_committed_settings(&mut self) -> Vec<Dest> {
        let mut settled_on = Vec::new();
        // Outside a transaction block: what statements ran in the group's implicit transaction, which a COMMIT
        // ended (`push_effect`).
        let settled: Vec<(Dest, Vec<Setting>, Arc<str>)> = self
            .group_effects
            .iter_mut()
            .filter(|e| !e.implicit && !e.sets.is_empty())
            .map(|e| (e.dest.clone(), std::mem::take(&mut e.sets), e.text.clone()))
            .collect();
        for (dest, sets, text) in settled {
            if let Some(i) = self.links.find(&dest) {
                let text = (sets.len() == 1).then_some(&*text);
                self.settings_changed(i, &sets, text).await;
                settled_on.push(dest);
            }
        }
        // A transaction block the group's COMMIT ended (`Txn::sent`).
        if self.txn.open() || self.txn_settings.is_empty() {
            return settled_on;
        }
        let Some(dest) =
            self.group_effects.iter().rev().find(|e| e.stmt.verb == Some(TxnVerb::Commit)).map(|e| e.dest.clone())
        else {
            return settled_on;
        };
        let Some(i) = self.links.find(&dest).filter(|&i| !self.links.get(i).errored) else { return settled_on };
        let undone = self.txn.rolled_back_now;
        self.settle_txn_settings(i, undone, self.txn.went_back_now).await;
        if !undone {
            settled_on.push(dest);
        }
        settled_on
    }

    /// Registers a Parse message as a client statement; returns its name.
    fn register<'m>(&mut self, m: &'m Msg) -> Result<&'m str, Reported> {
        let p = proto::read_parse_bytes(m.body()).ok_or_else(|| Reported::new("08P01", "malformed Parse message"))?;
        if self.statements.get(p.name).is_some_and(|st| *st.raw == *p.query && st.types == p.types) {
            // The same statement again (drivers re-send the unnamed one with every execution).
            return Ok(p.name);
        }
        let query = self.encoding.decode(p.query);
        if query.trim_start().get(..4).is_some_and(|w| w.eq_ignore_ascii_case("copy")) {
            self.copy_statements = true;
        }
        let analysis = self.routing.planner.analyze(&query);
        let epoch = self.backend.backends.schema_epoch.load(std::sync::atomic::Ordering::Relaxed);
        let server_name = if p.name.is_empty() {
            String::new()
        } else {
            format!("sr_{:016x}", statement_hash(&query, &p.types) ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        };
        self.statements.insert(
            p.name,
            ClientStmt {
                text: Arc::from(&*query),
                raw: bytes::Bytes::copy_from_slice(p.query),
                types: p.types,
                analysis,
                server_name,
            },
        );
        Ok(p.name)
    }

    async fn segment(&mut self, seg: &[Msg], fast: bool, pending: &mut Pending) -> Result<Seg, Failure> {
        // Parse and Close of client statements in their order; a statement closed last is forgotten once the
        // segment is sent.
        let mut closed: Vec<String> = Vec::new();
        for m in seg {
            match m.tag {
                b'P' => {
                    let name = self.register(m)?;
                    if !closed.is_empty() {
                        closed.retain(|n| *n != name);
                    }
                }
                b'C' if m.body().first() == Some(&b'S') => {
                    if let Some((n, _)) = proto::read_cstr(&m.body()[1..]) {
                        if !n.is_empty() {
                            closed.push(n.to_string());
                            if self.routing.session_mode {
                                // Session mode: the client's own connections lose it too (see `tidy`).
                                if let Some(st) = self.statements.get(n) {
                                    self.to_close.push(st.server_name.clone());
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        let r = match seg.iter().find(|m| m.tag == b'B') {
            Some(bind) => self.statement(seg, bind, fast, pending).await,
            None => self.prep(seg, fast, pending).await,
        };
        for n in closed {
            self.statements.remove(&n);
        }
        r
    }

    /// A segment without Bind (Parse, Describe, Close; or an Execute of a portal bound before): where the
    /// current sync group is, else the transaction's connection, else any shard (schemas are the same
    /// everywhere; alone before its Sync, with the failover retry, as a statement for one shard has it).
    async fn prep(&mut self, seg: &[Msg], fast: bool, pending: &mut Pending) -> Result<Seg, Failure> {
        let i = match &self.txn.state {
            State::One(_) => self.txn_link()?,
            State::Many(_) => self
                .part_links(&[])
                .first()
                .copied()
                .ok_or_else(|| Reported::new("XX000", "the transaction's connection is gone"))?,
            _ => {
                let in_group = self.links.iter().position(|l| l.pending && !l.replica);
                match in_group {
                    Some(i) => i,
                    None if fast => {
                        let effect = Effect {
                            dest: Dest { shard: shardmap::ShardId(0), db: None },
                            stmt: Stmt::default(),
                            sets: Vec::new(),
                            text: Arc::from(""),
                            implicit: false,
                            others: Vec::new(),
                        };
                        return self.prep_alone(seg, effect).await;
                    }
                    None => self.link_any().await?,
                }
            }
        };
        let dest = self.links.get(i).dest.clone();
        let exps = self.write_segment(i, seg, false)?;
        pending.entries.push(Entry { dest, exps, role: Role::Only, fan: None, closes_fan: false });
        Ok(Seg::Next)
    }

    /// A setting changed outside a transaction earlier in the sync group is on the connection that ran it only
    /// (it becomes the client's at the Sync, when the group's implicit transaction commits): a statement after
    /// it on another connection would run without it, where one PostgreSQL would have it. Refused; so is one
    /// on a connection the group used before a COMMIT of settings that a Flush settled (`stale_in_group`).
    fn setting_elsewhere(&self, links: &[usize]) -> Result<(), Reported> {
        if links.iter().any(|&i| self.links.iter().nth(i).is_some_and(|l| self.stale_in_group.contains(&l.dest))) {
            return Err(Reported::unsupported(
                "this statement runs on a connection the pipeline used before a COMMIT that changed settings, which does not have them: send a Sync after the COMMIT",
            ));
        }
        // (SET LOCAL too: outside a transaction block it lasts as long as the group's implicit transaction.)
        let Some(set) = self.group_effects.iter().find(|e| !e.sets.is_empty() || (e.implicit && e.stmt.setting)) else {
            return Ok(());
        };
        if links.iter().all(|&i| self.links.iter().nth(i).is_some_and(|l| l.dest == set.dest)) {
            return Ok(());
        }
        Err(Reported::unsupported(
            "this statement runs on another shard's connection than a setting changed earlier in the same pipeline, which would not have the setting: send a Sync after the setting",
        ))
    }

    /// The one connection the sync group ran statements on outside a transaction, for a BEGIN, COMMIT or
    /// ROLLBACK after them (see `implicit_ends`); `None` when there are several (`implicit_on_several`): one
    /// PostgreSQL runs them in one implicit transaction, which BEGIN makes the transaction's, COMMIT commits —
    /// before what follows it in the group, which may fail — and ROLLBACK undoes.
    fn implicit_link(&self) -> Option<Option<Dest>> {
        // (Reads only, BEGIN and ROLLBACK there change nothing: the transaction stays held, free to open where
        // its first statement goes.)
        let mut dests = self.implicit_dests();
        match dests.len() {
            0 => Some(None),
            1 => dests.pop().map(Some),
            _ => None,
        }
    }

    /// The connections the sync group changed something on outside a transaction (writes, settings), in the
    /// order it first used them: every shard's of a write sent to several.
    fn implicit_dests(&self) -> Vec<Dest> {
        let mut dests: Vec<Dest> = Vec::new();
        for e in self.group_effects.iter().filter(|e| e.implicit && (!e.stmt.read || e.stmt.setting)) {
            for d in std::iter::once(&e.dest).chain(&e.others) {
                if !dests.contains(d) {
                    dests.push(d.clone());
                }
            }
        }
        dests
    }

    /// The sync group's implicit transaction, before `stmt` is planned. Made the router's own where one
    /// PostgreSQL would commit or undo the group's writes together with what `stmt` does (`implicit_to_own`);
    /// inside the router's own, what PostgreSQL's implicit transaction answers and the router's would not: the
    /// warnings of COMMIT, ROLLBACK, SET LOCAL and SET TRANSACTION, the 25P01 of what needs a transaction
    /// block. `false`: the group failed before `stmt` (the server skips it, and so does the router).
    async fn implicit_transaction(
        &mut self,
        stmt: &Stmt,
        analysis: &shardmap::sql::Analysis,
        text: &str,
        route: &Result<Decision, shardmap::RouteError>,
        pending: &mut Pending,
    ) -> Result<bool, Failure> {
        let own = self.implicit_to_own(stmt, route);
        if !own.is_empty() {
            // A write on another shard's connection than the sync group's writes outside a transaction (or
            // writes on several already, and a statement that ends them): one PostgreSQL commits them all at the
            // Sync, or none. The group's implicit transaction becomes the router's own (`Txn::implicit`), open
            // on the connections of those writes — a BEGIN there makes what the group ran on it part of the
            // transaction, as on one server — then joined by this statement's shards, and committed at the Sync
            // with two-phase commit (`end_implicit`).
            self.drain(pending).await?;
            if self.group_failed {
                return Ok(false);
            }
            self.txn.begin_implicit();
            for (n, dest) in own.into_iter().enumerate() {
                let i = self.link(&dest).await?;
                self.replay_extended(i, pending)?;
                self.txn.wrote_on(dest.shard);
                self.implicit_ends(&dest, true);
                if n == 0 {
                    self.txn.opened(dest);
                } else {
                    self.txn.joined(dest);
                }
            }
        }
        if self.txn.implicit {
            if matches!(stmt.verb, Some(TxnVerb::Commit | TxnVerb::Rollback)) && !stmt.chain {
                // (It ends the router's transaction as it would the client's; PostgreSQL warns that none was
                // open. AND CHAIN needs a transaction block: refused, `Txn::plan`.)
                proto::notice(&mut self.io.wbuf, "WARNING", "25P01", "there is no transaction in progress");
            }
            // (The servers run it in the router's transaction; PostgreSQL's implicit one is no transaction
            // block.)
            let word = shardmap::sql::first_word(text);
            let what = match stmt.declare {
                Some(shardmap::sql::Declare { hold: false }) => Some("DECLARE CURSOR"),
                _ if stmt.verb.is_none() && word.eq_ignore_ascii_case("lock") => Some("LOCK TABLE"),
                _ => None,
            };
            if let Some(what) = what {
                return Err(super::txn::block_only(what).into());
            }
            let set_local = stmt.single
                && stmt.verb.is_none()
                && analysis.statements.first().is_some_and(|s| s.local_setting)
                && word.eq_ignore_ascii_case("set");
            if set_local {
                // (Its warning goes after what went before it.)
                self.drain(pending).await?;
                if self.group_failed {
                    return Ok(false);
                }
                // (SET LOCAL or SET TRANSACTION: the word after SET, which `word` is a slice of the text.)
                let after = word.as_ptr() as usize - text.as_ptr() as usize + word.len();
                let message = if shardmap::sql::first_word(&text[after..]).eq_ignore_ascii_case("transaction") {
                    "SET TRANSACTION can only be used in transaction blocks"
                } else {
                    "SET LOCAL can only be used in transaction blocks"
                };
                proto::notice(&mut self.io.wbuf, "WARNING", "25P01", message);
            }
        }
        Ok(true)
    }

    /// The connections of the sync group's writes outside a transaction, when one PostgreSQL would commit (or
    /// undo) them with what `stmt` does and they are not one transaction yet: `stmt` writes on a shard they
    /// are not on, or they are on several shards' connections (a write sent to every shard: DDL) and `stmt`
    /// writes, begins, commits or rolls back. Two-phase commit can then make them one transaction (see
    /// `implicit_transaction`). Not where the group made settings outside a transaction (a statement elsewhere
    /// is refused then: `setting_elsewhere`), nor for COPY or what the router answers itself.
    fn implicit_to_own(&self, stmt: &Stmt, route: &Result<Decision, shardmap::RouteError>) -> Vec<Dest> {
        if self.group_effects.is_empty()
            || self.txn.state != State::Idle
            || !self.txn.two_phase
            || stmt.setting
            || stmt.copy_in
            || stmt.local != Local::No
            || (stmt.read && stmt.verb.is_none())
        {
            return Vec::new();
        }
        let dests = self.implicit_dests();
        if dests.is_empty() || self.group_effects.iter().any(|e| e.implicit && (e.stmt.setting || !e.sets.is_empty())) {
            return Vec::new();
        }
        let several = dests.len() > 1;
        let own = match (&stmt.verb, route) {
            (Some(TxnVerb::Begin | TxnVerb::Commit | TxnVerb::Rollback), _) => several,
            (Some(_), _) | (None, Err(_)) => false,
            (None, Ok(d)) => match &d.target {
                Target::One(shard) => several || Dest::of(*shard, d) != dests[0],
                Target::Set(_) => true,
                Target::All => several || d.shards(&self.routing.map).iter().any(|s| Dest::of(*s, d) != dests[0]),
                Target::Any | Target::Session => false,
            },
        };
        if own {
            dests
        } else {
            Vec::new()
        }
    }

    /// A BEGIN (`begin`) or ROLLBACK after statements of the sync group on `dest` outside a transaction: the
    /// settings they changed are the transaction's now (applied if it commits), or undone. Returns, for BEGIN,
    /// what a shard joining the transaction must replay of them (`None`: a setting it cannot replay).
    fn implicit_ends(&mut self, dest: &Dest, begin: bool) -> Vec<Option<String>> {
        let mut replay = Vec::new();
        for e in self.group_effects.iter_mut().filter(|e| e.dest == *dest && e.implicit && e.stmt.setting) {
            // (SET and RESET replay as they are; a `set_config()` call may take Bind parameters.)
            let word = shardmap::sql::first_word(&e.text);
            let plain = word.eq_ignore_ascii_case("set") || word.eq_ignore_ascii_case("reset");
            replay.push(plain.then(|| e.text.to_string()));
            if begin {
                self.txn_settings.append(&mut e.sets);
            } else {
                e.sets.clear();
            }
        }
        // (They are the transaction's now, or undone: settled either way.)
        self.group_effects.iter_mut().for_each(|e| e.implicit = false);
        if let (false, Some(i)) = (replay.is_empty(), self.links.find(dest)) {
            self.links.get(i).conn.conn().settings = crate::backend::checkout::SETTINGS_UNKNOWN;
        }
        replay
    }

    /// Whether a COMMIT now commits settings: its transaction's (on one shard, or held; on several the
    /// router commits it at once, see `commit_parts`), or, outside a transaction, those the sync group's
    /// implicit transaction made.
    fn commits_settings(&self) -> bool {
        match self.txn.state {
            State::One(_) | State::Held(_) => !self.txn_settings.is_empty() || self.txn.held_settings,
            State::Idle => self.group_effects.iter().any(|e| e.implicit && !e.sets.is_empty()),
            State::Many(_) => false,
        }
    }

    /// Queues a statement's effects for the Sync. A setting changed inside the transaction is the
    /// transaction's — applied when it commits (read back if it went back to a savepoint), undone when it rolls
    /// back, even within the same pipeline —, not the Sync's.
    fn push_effect(&mut self, mut effect: Effect, links: &[usize]) {
        if !effect.sets.is_empty() && self.txn.on_shards() {
            self.txn_settings.append(&mut effect.sets);
            for &i in links {
                self.links.get(i).conn.conn().settings = crate::backend::checkout::SETTINGS_UNKNOWN;
            }
        }
        if !self.txn.open() {
            if matches!(effect.stmt.verb, Some(TxnVerb::Commit | TxnVerb::Rollback)) {
                // (COMMIT or ROLLBACK outside a transaction ends the implicit one: what ran before it is settled.)
                self.group_effects.iter_mut().for_each(|e| e.implicit = false);
            } else {
                effect.implicit = effect.stmt.verb.is_none();
            }
        }
        self.group_effects.push(effect);
    }

    /// A Parse/Describe/Close segment alone before its Sync, outside a transaction: on any shard, the next one
    /// when a shard cannot be reached.
    async fn prep_alone(&mut self, seg: &[Msg], mut effect: Effect) -> Result<Seg, Failure> {
        let write = |stmts: &Statements, conn: &mut ServerConn| rewrite(stmts, seg, true, conn);
        let mut last = None;
        for attempt in 0..self.routing.map.nodes.len().max(1) {
            let dest = self.any_dest(attempt);
            // While the shard fails over (shard-degraded-reads), a standby describes as its primary would.
            let on_standby = self.degraded(&dest);
            match self.send_outside(&dest, on_standby, &write, true).await {
                Ok((i, exps)) => {
                    self.links.get(i).pending = true;
                    effect.dest = dest;
                    return self.answer_synced(i, exps, &effect).await;
                }
                Err(e) if e.code == crate::backend::checkout::CONNECT_FAILED => last = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last
            .unwrap_or_else(|| Reported::new(crate::backend::checkout::CONNECT_FAILED, "no shard is configured"))
            .into())
    }

    /// Rewrites `seg` onto link `i`'s write buffer (plus the batch's Sync when `sync`); the link is in the
    /// sync group from now on.
    fn write_segment(&mut self, i: usize, seg: &[Msg], sync: bool) -> Result<VecDeque<Exp>, Reported> {
        if !self.group_effects.is_empty() && seg.iter().any(|m| m.tag == b'E') {
            self.setting_elsewhere(&[i])?;
        }
        let l = self.links.get(i);
        l.pending = true;
        let conn = l.conn.conn();
        rewrite(&self.statements, seg, sync, conn)
    }

    /// A segment with a Bind: one statement.
    async fn statement(&mut self, seg: &[Msg], bind: &Msg, fast: bool, pending: &mut Pending) -> Result<Seg, Failure> {
        let b = proto::read_bind(bind.body()).ok_or_else(|| Reported::new("08P01", "malformed Bind message"))?;
        let st = self
            .statements
            .get(b.statement)
            .ok_or_else(|| Reported::new("26000", format!("prepared statement \"{}\" does not exist", b.statement)))?;
        let (text, analysis) = (st.text.clone(), st.analysis.clone());
        if !self.routing.session_mode {
            refuse_connection_state(&analysis)?;
        }
        let stmt = self.stmt(&analysis, &text);
        // (What was read of the schema before a schema change through the router is forgotten now, not
        // between reading it for this statement and deciding it.)
        self.schema_checked();
        if analysis.statements.iter().any(|s| s.positional.is_some()) {
            self.learn_key_positions(&analysis).await?;
        }
        self.rate_limit(&analysis)?;
        let (route, _pass) = loop {
            let decided = self
                .decide(|| {
                    let types = bound_types(&self.statements, &b);
                    self.routing.planner.decide_analyzed(&analysis, &BindParams { bind: &b, types }, &self.route)
                })
                .await?;
            match decided {
                (Err(shardmap::RouteError::Relations { names }), _) => self.learn_relations(names).await?,
                (route, pass) => break (route, pass),
            }
        };
        if stmt.verb == Some(TxnVerb::Commit) && !pending.last && self.commits_settings() {
            // Its settings become the client's when it commits — at the Sync, where a later statement's error
            // would drop them, and after statements that ran without them on other connections.
            return Err(Reported::unsupported(
                "COMMIT of settings changed in the pipeline or its transaction must be the last statement before the pipeline's Sync",
            )
            .into());
        }
        if !pending.entries.is_empty()
            && (stmt.verb.is_some() || stmt.local != Local::No || matches!(self.txn.state, State::Held(_)))
        {
            // What the router may answer itself, or hold, follows the answers to what went before it: after an
            // error there the server would skip it, and so does the router, before its plan changes anything.
            self.drain(pending).await?;
            if self.group_failed {
                return Ok(Seg::Next);
            }
        }
        if stmt.verb == Some(TxnVerb::Begin) && !self.txn.open() && !self.txn_settings.is_empty() {
            // A transaction of the group that changed settings ended before this BEGIN; they would be settled
            // at the Sync, where they would pass for this transaction's.
            if !self.txn.rolled_back_now {
                return Err(Reported::unsupported(
                    "BEGIN after the COMMIT of a transaction that changed settings in the same pipeline: send a Sync after the COMMIT",
                )
                .into());
            }
            // (Rolled back: the server undid them.)
            self.txn_settings.clear();
        }
        // (Only where the group ran something outside a transaction, or the router's own transaction is open.)
        if (!self.group_effects.is_empty() || self.txn.implicit)
            && !self.implicit_transaction(&stmt, &analysis, &text, &route, pending).await?
        {
            return Ok(Seg::Next);
        }
        // BEGIN or ROLLBACK after statements of the sync group outside a transaction: PostgreSQL makes those
        // statements part of the transaction BEGIN starts, and ROLLBACK undoes them.
        let implicit = match (&self.txn.state, &stmt.verb) {
            (State::Idle, Some(TxnVerb::Begin | TxnVerb::Rollback)) => {
                self.implicit_link().ok_or_else(|| implicit_on_several(&stmt))?
            }
            // (On several connections, a COMMIT right before the Sync commits nothing the Sync would not.)
            (State::Idle, Some(TxnVerb::Commit)) if pending.sync_next => self.implicit_link().flatten(),
            (State::Idle, Some(TxnVerb::Commit)) => self.implicit_link().ok_or_else(|| implicit_on_several(&stmt))?,
            _ => None,
        };
        let mut plan = self.plan(&stmt, &route);
        let folded = match (&implicit, &stmt.verb) {
            (Some(dest), Some(TxnVerb::Begin | TxnVerb::Rollback)) => {
                self.implicit_ends(dest, stmt.verb == Some(TxnVerb::Begin))
            }
            _ => Vec::new(),
        };
        if let (Some(dest), Plan::Run(to @ To::Any)) = (&implicit, &mut plan) {
            // COMMIT or ROLLBACK ends the group's implicit transaction where it wrote or set something, not on
            // whichever of the group's connections comes first.
            *to = To::Once(dest.clone());
        }
        let d = route.ok();
        match plan {
            Plan::Hold { tag } if implicit.is_some() => {
                // The transaction opens on that connection now (BEGIN sent there, its answer the router's).
                let dest = implicit.expect("a connection");
                self.txn.queue(text.to_string());
                let i = self.link(&dest).await?;
                self.replay_extended(i, pending)?;
                self.txn.opened(dest);
                // (A shard that joins it later replays the settings made before BEGIN too.)
                for replay in folded {
                    match replay {
                        Some(text) => self.txn.log.push(text),
                        None => self.txn.unreplayed_setting = true,
                    }
                }
                synthesize(&mut self.io.wbuf, seg, &tag);
                Ok(Seg::Next)
            }
            Plan::Answer { tag, warning } => {
                self.drain(pending).await?;
                if self.group_failed {
                    return Ok(Seg::Next);
                }
                let tag = self.local(&stmt, &analysis, &text).await?.unwrap_or(tag);
                if let Some((code, message)) = warning {
                    proto::notice(&mut self.io.wbuf, "WARNING", code, message);
                }
                synthesize(&mut self.io.wbuf, seg, &tag);
                Ok(Seg::Next)
            }
            Plan::Hold { tag } => {
                self.drain(pending).await?;
                if self.group_failed {
                    return Ok(Seg::Next);
                }
                self.check_held_setting(&stmt, &text).await?;
                self.txn.queue(text.to_string());
                synthesize(&mut self.io.wbuf, seg, &tag);
                Ok(Seg::Next)
            }
            Plan::Refuse(e) => Err(e.into()),
            Plan::Run(to) if stmt.copy_in => {
                self.drain(pending).await?;
                let copy = analysis.statements[0].copy.clone().expect("COPY FROM STDIN has its details");
                Box::pin(self.copy_in(to, &copy, d.as_ref(), super::copy::Request::Extended(seg.to_vec()))).await?;
                Ok(Seg::Copied)
            }
            Plan::Run(to) => {
                let mut effect = Effect {
                    dest: Dest { shard: shardmap::ShardId(0), db: None },
                    stmt,
                    // (Nothing copied for the usual statement, which changes no setting.)
                    sets: match settings_of(
                        &analysis,
                        &BindParams { bind: &b, types: bound_types(&self.statements, &b) },
                    ) {
                        std::borrow::Cow::Borrowed([]) => Vec::new(),
                        sets => sets.into_owned(),
                    },
                    text,
                    implicit: false,
                    others: Vec::new(),
                };
                // The common cases inline (a boxed future per statement costs an allocation): one statement
                // and its Sync, on the transaction's connection or a plain one; the rest boxed.
                let alone = fast && pending.entries.is_empty() && !self.links.iter().any(|l| l.pending);
                let i = match &to {
                    To::Bound if alone => {
                        let i = self.txn_link()?;
                        self.txn.sent(effect.stmt.verb.as_ref());
                        Some(i)
                    }
                    To::Once(dest) if alone && !self.needs_care(dest, effect.stmt.standby) => {
                        let linked = match self.link_now(dest) {
                            Linked::Done(linked) => linked,
                            Linked::Wait(wait) => self.link_waited(dest, wait).await,
                            Linked::Slow => self.link(dest).await,
                        };
                        match linked {
                            Ok(i) => Some(i),
                            Err(e) => {
                                self.unopened(&effect.stmt, dest);
                                return Err(e.into());
                            }
                        }
                    }
                    _ => None,
                };
                let Some(i) = i else { return Box::pin(self.place(to, seg, d.as_ref(), effect, fast, pending)).await };
                let exps = self.write_segment(i, seg, true)?;
                effect.dest = self.links.get(i).dest.clone();
                if !self.flush_link_now(i)? {
                    self.flush_link(i).await?;
                }
                self.answer_synced(i, exps, &effect).await
            }
        }
    }

    /// Sends a statement's segment where the plan says.
    async fn place(
        &mut self,
        to: To,
        seg: &[Msg],
        d: Option<&Decision>,
        mut effect: Effect,
        fast: bool,
        pending: &mut Pending,
    ) -> Result<Seg, Failure> {
        let verb = effect.stmt.verb.clone();
        let read = effect.stmt.read;
        let one = match to {
            To::Bound => {
                let i = self.txn_link()?;
                self.txn.sent(verb.as_ref());
                Some(i)
            }
            To::Once(dest) => {
                if fast {
                    // The common case: one statement, one connection, its Sync: sent at once, with the failover
                    // retry and read replicas, and answered straight to ReadyForQuery.
                    let write = |stmts: &Statements, conn: &mut ServerConn| rewrite(stmts, seg, true, conn);
                    let (i, exps) = match self.send_outside(&dest, effect.stmt.standby, &write, true).await {
                        Ok(sent) => sent,
                        Err(e) => {
                            self.unopened(&effect.stmt, &dest);
                            return Err(e.into());
                        }
                    };
                    self.links.get(i).pending = true;
                    effect.dest = dest;
                    return self.answer_synced(i, exps, &effect).await;
                }
                match self.link(&dest).await {
                    Ok(i) => Some(i),
                    Err(e) => {
                        self.unopened(&effect.stmt, &dest);
                        return Err(e.into());
                    }
                }
            }
            To::Prepared(gid) => {
                let dest = self.prepared_dest(&gid).await?;
                Some(self.link(&dest).await?)
            }
            To::Any => Some(self.link_any().await?),
            To::Open(dest) => {
                let i = self.link(&dest).await?;
                self.replay_extended(i, pending)?;
                self.txn.opened(dest);
                self.txn.sent(verb.as_ref());
                Some(i)
            }
            To::OpenAny => {
                let dest = self.any_dest(0);
                let i = self.link(&dest).await?;
                self.replay_extended(i, pending)?;
                self.txn.opened(dest);
                self.txn.sent(verb.as_ref());
                Some(i)
            }
            To::Part(Some(shard)) => {
                let links = self.join_extended(&[shard], d, pending).await?;
                Some(
                    links
                        .first()
                        .copied()
                        .ok_or_else(|| Reported::new("XX000", "the transaction's connection is gone"))?,
                )
            }
            To::Part(None) => Some(
                self.part_links(&[])
                    .first()
                    .copied()
                    .ok_or_else(|| Reported::new("XX000", "the transaction's connection is gone"))?,
            ),
            To::Commit => {
                self.drain(pending).await?;
                if self.group_failed {
                    return Ok(Seg::Next);
                }
                match self.commit_parts().await {
                    Ok(tag) => synthesize(&mut self.io.wbuf, seg, tag),
                    Err(e) => {
                        proto::error(&mut self.io.wbuf, "ERROR", &e.code, &e.message);
                        self.fail_group_inner();
                    }
                }
                return Ok(Seg::Next);
            }
            To::RollbackInstead => {
                self.drain(pending).await?;
                self.rollback_instead(false).await?;
                synthesize(&mut self.io.wbuf, seg, "ROLLBACK");
                return Ok(Seg::Next);
            }
            To::Router { run, every, open: _, shards } => {
                let links = if every { Some(self.join_extended(&shards, d, pending).await?) } else { None };
                self.drain(pending).await?;
                if self.group_failed {
                    // A replayed statement failed: the server skips the rest of the group, so does the router.
                    return Ok(Seg::Next);
                }
                return self.router_run(links, shards, seg, d, effect, run).await;
            }
            To::Fan(shards) => {
                let links = self.links_to(shards, d).await?;
                self.fan_out(&links, seg, read && !d.is_some_and(|d| d.target == Target::All && !read), pending)?;
                effect.dest = self.links.get(links[0]).dest.clone();
                if !read {
                    effect.others = links[1..].iter().map(|&i| self.links.get(i).dest.clone()).collect();
                }
                self.push_effect(effect, &links);
                return Ok(Seg::Next);
            }
            To::OpenParts(shards) | To::Parts(shards) => {
                let links = self.join_extended(&shards, d, pending).await?;
                if links.is_empty() {
                    return Err(Reported::new("XX000", "the transaction's connections are gone").into());
                }
                self.fan_out(&links, seg, super::merge::sums(&effect.stmt, d), pending)?;
                effect.dest = self.links.get(links[0]).dest.clone();
                self.push_effect(effect, &links);
                return Ok(Seg::Next);
            }
            To::Every => {
                let links = self.part_links(&[]);
                if links.is_empty() {
                    return Err(Reported::new("XX000", "the transaction's connections are gone").into());
                }
                self.fan_out(&links, seg, super::merge::sums(&effect.stmt, d), pending)?;
                self.txn.sent(verb.as_ref());
                effect.dest = self.links.get(links[0]).dest.clone();
                self.push_effect(effect, &links);
                return Ok(Seg::Next);
            }
        };
        let i = one.expect("one connection");
        let dest = self.links.get(i).dest.clone();
        let alone =
            fast && pending.entries.is_empty() && self.links.iter().enumerate().all(|(j, l)| j == i || !l.pending);
        let exps = self.write_segment(i, seg, alone)?;
        effect.dest = dest.clone();
        if alone {
            let conn = self.links.get(i).conn.conn();
            if let Err(e) = conn.flush().await {
                let e: Reported = e.into();
                self.lost(i, &e);
                return Err(e.into());
            }
            return self.answer_synced(i, exps, &effect).await;
        }
        pending.entries.push(Entry { dest, exps, role: Role::Only, fan: None, closes_fan: false });
        self.push_effect(effect, &[i]);
        Ok(Seg::Next)
    }

    /// The same segment on several links: a read's rows concatenated (first link's description, merged
    /// CommandComplete); anything else answered by the first link, the others silent but for their errors.
    fn fan_out(&mut self, links: &[usize], seg: &[Msg], read: bool, pending: &mut Pending) -> Result<(), Reported> {
        self.setting_elsewhere(links)?;
        let fan = pending.merges.len();
        // A read's CommandComplete is the router's (the rows of all); otherwise the first link's stands.
        pending.merges.push(Merge { executes: read && seg.iter().any(|m| m.tag == b'E'), ..Merge::default() });
        for (n, &i) in links.iter().enumerate() {
            let exps = self.write_segment(i, seg, false)?;
            let role = match (read, n) {
                (true, 0) => Role::First,
                (true, _) => Role::Rest,
                (false, 0) => Role::Only,
                (false, _) => Role::Silent,
            };
            let dest = self.links.get(i).dest.clone();
            pending.entries.push(Entry { dest, exps, role, fan: Some(fan), closes_fan: n + 1 == links.len() });
        }
        Ok(())
    }

    /// A statement the router runs itself (see `client_segment`) on `shards` outside a transaction or on
    /// every connection of the all-shards transaction (`every`); a failure fails the sync group.
    async fn router_run(
        &mut self,
        links: Option<Vec<usize>>,
        shards: Vec<shardmap::ShardId>,
        seg: &[Msg],
        d: Option<&Decision>,
        mut effect: Effect,
        run: Run,
    ) -> Result<Seg, Failure> {
        let links = match links {
            Some(links) => links,
            None => self.links_to(shards, d).await?,
        };
        self.setting_elsewhere(&links)?;
        let ok = self.client_segment(&links, seg, &effect.text, run, d).await?;
        effect.dest = self.links.get(links[0]).dest.clone();
        self.push_effect(effect, &links);
        if !ok {
            self.txn.error_inside();
            self.fail_group_inner();
        }
        Ok(Seg::Next)
    }

    /// A statement's segment run by the router on several `links`: a read whose rows are combined (see
    /// `combine`) or an INSERT into a global table (`global`, see `global`); the client's messages answered in
    /// order, its parameters and formats used.
    async fn client_segment(
        &mut self,
        links: &[usize],
        seg: &[Msg],
        text: &str,
        run: Run,
        d: Option<&Decision>,
    ) -> Result<bool, Failure> {
        let bind = seg.iter().find(|m| m.tag == b'B').expect("a statement's segment has a Bind");
        let b = proto::read_bind(bind.body()).ok_or_else(|| Reported::new("08P01", "malformed Bind message"))?;
        let types = self.statements.get(b.statement).map(|st| st.types.clone()).unwrap_or_default();
        let results = b.result_formats().ok_or_else(|| Reported::new("08P01", "malformed Bind message"))?;
        let mut order = Vec::with_capacity(seg.len());
        for m in seg {
            match m.tag {
                b'D' => order.push((b'D', m.body().first().copied().unwrap_or(b'P'))),
                b'E' => {
                    let limit = proto::read_cstr(m.body()).and_then(|(_, r)| proto::read_i32(r)).map_or(0, |(n, _)| n);
                    if limit > 0 {
                        return Err(Reported::unsupported(
                            "fetching rows combined from several shards in portions (Execute with a row limit) is not supported; fetch them at once or add a shard key condition",
                        )
                        .into());
                    }
                    order.push((b'E', 0));
                }
                tag @ (b'P' | b'B' | b'C') => order.push((tag, 0)),
                _ => {}
            }
        }
        let formats = b.formats();
        let c = super::combine::ClientPart {
            params: b.values(),
            param_formats: &formats,
            param_types: &types,
            result_formats: &results,
            order: &order,
        };
        self.run_on(run, links, text, &c, d).await
    }

    /// The held transaction's queue replayed on link `i` ahead of the statement that opens it: Parse, Bind
    /// and Execute of each queued statement, answered to nobody (an error among them is the client's, and
    /// the server then skips the statement itself).
    fn replay_extended(&mut self, i: usize, pending: &mut Pending) -> Result<(), Reported> {
        let queued = self.txn.queued().to_vec();
        let l = self.links.get(i);
        l.pending = true;
        let conn = l.conn.conn();
        let mut exps = VecDeque::new();
        for q in &queued {
            proto::write_parse_bytes(&mut conn.io.wbuf, "", &self.encoding.encode(q), &[]);
            proto::put(&mut conn.io.wbuf, b'B', |b| {
                b.put_slice(&[0, 0]);
                b.put_i16(0);
                b.put_i16(0);
                b.put_i16(0);
            });
            proto::put(&mut conn.io.wbuf, b'E', |b| {
                b.put_u8(0);
                b.put_i32(0);
            });
            exps.extend([Exp::Quiet(b'1'), Exp::Quiet(b'2'), Exp::Quiet(b'C')]);
        }
        let dest = l.dest.clone();
        pending.entries.push(Entry { dest, exps, role: Role::Only, fan: None, closes_fan: false });
        // The queued settings run inside the transaction now.
        for q in &queued {
            let a = self.routing.planner.analyze(q);
            let sets = settings_of(&a, &shardmap::NoParams);
            if !sets.is_empty() {
                self.txn_settings.extend(sets.iter().cloned());
                self.links.get(i).conn.conn().settings = crate::backend::checkout::SETTINGS_UNKNOWN;
            }
        }
        Ok(())
    }

    /// Joins the transaction on `shards` (none: every shard) in the decision's database: each shard it has not
    /// joined yet gets its replay log in the sync group first (see `replay_extended`). Returns the
    /// transaction's links to those shards, in shard order.
    async fn join_extended(
        &mut self,
        shards: &[shardmap::ShardId],
        d: Option<&Decision>,
        pending: &mut Pending,
    ) -> Result<Vec<usize>, Reported> {
        let (shards, new) = self.to_join(shards, d);
        self.may_join(&new)?;
        self.hold_all(&new).await?;
        for dest in new {
            let i = self.link(&dest).await?;
            self.replay_extended(i, pending)?;
            self.txn.joined(dest);
        }
        Ok(self.part_links(&shards))
    }

    /// The answers to a segment sent with its Sync on link `i` alone, up to ReadyForQuery.
    async fn answer_synced(&mut self, i: usize, exps: VecDeque<Exp>, effect: &Effect) -> Result<Seg, Failure> {
        let started = std::time::Instant::now();
        let mut merge = Merge::default();
        let map = self.status_map(i);
        let executes = exps.iter().any(|e| matches!(e, Exp::Execute));
        let mut exps = exps;
        let relayed = if exps.iter().all(Exp::relayed_as_is) {
            // Nothing to inject or swallow: the server's answers are the client's, relayed in runs as a
            // simple query's are (`relay` reads each message against its expectation).
            let conn = self.links.get(i).conn.conn();
            match conn.relay_to_ready(&mut self.io, &map).await {
                Ok((status, error)) => {
                    conn.status = status;
                    conn.parsing.clear();
                    merge.failed = error;
                    Ok((Some(status), error))
                }
                Err(RelayError::Src(e)) => Err(BackendError::Wire(e, conn.addr.clone()).into()),
                Err(RelayError::Dst(e)) => return Err(Failure::Fatal(e.into())),
            }
        } else {
            self.relay(i, &mut exps, Role::Only, &mut merge, Some(&map)).await
        };
        recycle_exps(exps);
        let status = match relayed {
            Ok((s, _)) => s.unwrap_or(READY_IDLE),
            // (Under session pooling the client's connection ends with its server's, as on the simple path.)
            Err(e) => return Err(self.broken(i, e)),
        };
        let l = self.links.get(i);
        l.pending = false;
        let shard = l.dest.shard;
        let replica = l.replica;
        if executes && !replica {
            self.backend.answered(shard, started, merge.failed);
        }
        self.after_statement(i, &effect.stmt, status, merge.failed);
        if merge.failed {
            self.txn.unlog_failed();
        }
        let text = (effect.sets.len() == 1).then_some(&*effect.text);
        self.answered(i, status, merge.failed, &effect.sets, text).await;
        self.release();
        if !self.io.flush_now().map_err(|e| Failure::Fatal(e.into()))? {
            self.io.flush().await.map_err(|e| Failure::Fatal(e.into()))?;
        }
        Ok(Seg::Synced)
    }

    /// Relays the answers of everything sent so far, in the client's order. Each connection written to is
    /// sent a Flush first, so that its server answers now.
    async fn drain(&mut self, pending: &mut Pending) -> Result<(), Fatal> {
        self.drain_with(pending, b'H').await
    }

    /// [`Session::drain`], ending what is written to each connection of the group with `end`: Flush, or the
    /// group's Sync (sent to every connection of the group, written to or not).
    async fn drain_with(&mut self, pending: &mut Pending, end: u8) -> Result<(), Fatal> {
        if pending.entries.is_empty() && end == b'H' {
            return Ok(());
        }
        for l in self.links.iter_mut() {
            let conn = l.conn.conn();
            if end == b'S' && l.pending {
                proto::put(&mut conn.io.wbuf, b'S', |_| {});
            } else if !conn.io.wbuf.is_empty() {
                proto::put(&mut conn.io.wbuf, b'H', |_| {});
            }
            if !conn.io.wbuf.is_empty() {
                let _ = conn.flush().await;
            }
        }
        let entries = std::mem::take(&mut pending.entries);
        for mut e in entries {
            let Some(i) = self.links.find(&e.dest) else { continue };
            // (A statement after the group's error is one the server would have skipped: it is answered by
            // nothing, its rows and its merged CommandComplete included.)
            let skipped = self.group_failed;
            if self.group_failed {
                if self.links.get(i).errored {
                    // The server skips what came after its error.
                    continue;
                }
                if !self.txn.holds(&e.dest) {
                    // It ran in the failed group's implicit transaction: closing the connection rolls it back.
                    drop(self.links.remove(i));
                    continue;
                }
                e.role = Role::Silent;
            }
            let mut own = Merge::default();
            let merge = match e.fan {
                Some(f) => &mut pending.merges[f],
                None => &mut own,
            };
            let r = self.relay(i, &mut e.exps, e.role, merge, None).await;
            // (A fan's merge fails with any of its connections; a connection is errored — its server skips
            // to the Sync — only by its own error: another connection of the fan ran what it was sent next.)
            let fan_failed = merge.failed;
            let own = match r {
                Ok((_, own)) => own,
                Err(err) => {
                    self.lost(i, &err);
                    proto::error(&mut self.io.wbuf, "ERROR", &err.code, &err.message);
                    self.fail_group_inner();
                    continue;
                }
            };
            if own {
                self.links.get(i).errored = true;
            }
            if (e.fan.is_none() && own) || (e.closes_fan && fan_failed) {
                self.fail_group_inner();
            }
            if e.closes_fan && !skipped {
                let m = &mut pending.merges[e.fan.expect("a fan")];
                if m.copy_out && m.error.is_none() {
                    proto::put(&mut self.io.wbuf, b'c', |_| {});
                }
                match m.error.take() {
                    Some(err) => {
                        self.io.push(&err);
                        self.fail_group_inner();
                    }
                    None if m.executes && !m.verb.is_empty() => proto::command_complete(&mut self.io.wbuf, &m.tag()),
                    None => {}
                }
            }
        }
        self.io.flush_if_full().await?;
        Ok(())
    }

    /// The router refused a statement of the sync group: what was sent before it is answered, then its
    /// error; the rest of the group is skipped.
    async fn fail_group(&mut self, e: Reported, pending: &mut Pending) -> Result<(), Fatal> {
        self.drain(pending).await?;
        if self.group_failed {
            // A statement before it failed on its server: this one is skipped, as the server would skip it.
            return Ok(());
        }
        proto::error(&mut self.io.wbuf, "ERROR", &e.code, &e.message);
        self.txn.error_inside();
        self.fail_group_inner();
        Ok(())
    }

    /// The sync group failed: statements of it on connections outside the client's transaction are rolled
    /// back (their connections closed), as the server rolls back an implicit transaction.
    fn fail_group_inner(&mut self) {
        self.group_failed = true;
        let txn = &self.txn;
        let gone = self.links.drain_unless(|l| !l.pending || l.errored || txn.holds(&l.dest));
        for l in gone {
            drop(l);
        }
    }

    /// The client's Sync: every connection of the group gets its own, their ReadyForQuery statuses settle the
    /// transaction's state, and one ReadyForQuery reaches the client.
    async fn sync(&mut self, pending: &mut Pending) -> Result<(), Fatal> {
        let dests: Vec<Dest> = self.links.iter().filter(|l| l.pending).map(|l| l.dest.clone()).collect();
        if dests.len() <= 1 {
            // One connection: its Sync goes with what was written (after an error the server itself skips
            // to it and rolls back).
            self.drain_with(pending, b'S').await?;
        } else {
            // Several: the answers first, so that after an error anywhere the others are closed (rolled
            // back) before any of them gets a Sync (which would commit it).
            self.drain(pending).await?;
            for l in self.links.iter_mut().filter(|l| l.pending) {
                let conn = l.conn.conn();
                proto::put(&mut conn.io.wbuf, b'S', |_| {});
                let _ = conn.flush().await;
            }
        }
        let effects = std::mem::take(&mut self.group_effects);
        let mut statuses = Vec::new();
        for dest in &dests {
            let Some(i) = self.links.iter().position(|l| l.dest == *dest && l.pending) else { continue };
            let mut error = self.links.get(i).errored;
            let status = loop {
                let m = match self.links.get(i).conn.conn().read().await {
                    Ok(m) => m,
                    Err(e) => break Err(Reported::from(e)),
                };
                match m.tag {
                    b'Z' => {
                        self.links.get(i).conn.conn().parsing.clear();
                        break Ok(m.body().first().copied().unwrap_or(READY_IDLE));
                    }
                    // What a server sends ahead of ReadyForQuery: reported parameters, notices,
                    // notifications (an error here is the Sync's own: a commit that failed).
                    b'S' | b'N' | b'A' => self.io.push(&m.frame),
                    b'E' => {
                        error = true;
                        self.io.push(&m.frame);
                    }
                    _ => {}
                }
            };
            let status = match status {
                Ok(s) => s,
                Err(e) => {
                    self.lost(i, &e);
                    proto::error(&mut self.io.wbuf, "ERROR", &e.code, &e.message);
                    continue;
                }
            };
            let l = self.links.get(i);
            l.pending = false;
            l.errored = false;
            l.conn.conn().status = status;
            statuses.push(status);
            let mine: Vec<&Effect> = effects.iter().filter(|e| e.dest == *dest).collect();
            for e in &mine {
                self.after_statement(i, &e.stmt, status, error);
            }
            if error && effects.len() == 1 {
                // (The group's one statement failed.)
                self.txn.unlog_failed();
            }
            let sets: Vec<Setting> = mine.iter().flat_map(|e| e.sets.iter().cloned()).collect();
            let text = match mine.as_slice() {
                [one] if one.sets.len() == 1 => Some(one.text.clone()),
                _ => None,
            };
            if matches!(self.txn.state, State::Many(_)) {
                self.txn.ready(dest, status, error);
                if !sets.is_empty() {
                    self.links.get(i).conn.conn().settings = crate::backend::checkout::SETTINGS_UNKNOWN;
                    self.txn_settings.extend(sets.iter().cloned());
                }
            } else {
                self.answered(i, status, error, &sets, text.as_deref()).await;
            }
        }
        if matches!(self.txn.state, State::Many(_)) && !statuses.is_empty() {
            let links = self.part_links(&[]);
            let all: Vec<u8> = links.iter().map(|&i| self.links.get(i).status()).collect();
            self.txn.ready_all(&all);
            if self.txn.state == State::Idle && !self.txn_settings.is_empty() {
                match links.first() {
                    Some(&first) => {
                        self.settle_txn_settings(first, self.txn.rolled_back_now, self.txn.went_back_now).await
                    }
                    None => self.txn_settings.clear(),
                }
            }
        }
        if self.group_failed && self.txn.implicit {
            self.txn.error_inside();
        }
        self.end_implicit().await;
        self.group_failed = false;
        self.stale_in_group.clear();
        self.ready_for_query();
        self.io.flush().await?;
        Ok(())
    }

    /// Relays one connection's answers to a rewritten segment, injecting and swallowing what the rewrite
    /// changed. Returns the ReadyForQuery status, or `None` when the segment had no Sync. `status` maps the
    /// server's ReadyForQuery status to the client's.
    pub async fn relay(
        &mut self,
        i: usize,
        exps: &mut VecDeque<Exp>,
        role: Role,
        merge: &mut Merge,
        status: Option<&(dyn Fn(u8, bool) -> u8 + Sync)>,
    ) -> Result<(Option<u8>, bool), Reported> {
        let mut errored = false;
        let mut ready = None;
        let to_client = |role: Role, tag: u8| match role {
            Role::Only => true,
            // (COPY TO on several shards: one CopyOutResponse, every shard's data, one CopyDone at the end.)
            Role::First => !matches!(tag, b'C' | b'Z' | b'E' | b'c'),
            Role::Rest => matches!(tag, b'D' | b'd'),
            Role::Silent => false,
        };
        // The messages looked at and to be relayed as they are: the first `run` bytes of the connection's read
        // buffer, copied to the client together (one copy for a statement's whole answer, however many rows)
        // before anything else is written to the client, before an await, and at the end.
        let mut run = 0;
        let pass = |to: &mut Framed<S>, conn: &mut ServerConn, run: &mut usize| {
            if *run > 0 {
                to.push(conn.io.head(*run));
                conn.io.consume(*run);
                *run = 0;
            }
        };
        let conn = self.links.get(i).conn.conn();
        loop {
            while let Some(Exp::InjectParse | Exp::InjectClose) = exps.front() {
                let e = exps.pop_front().expect("front exists");
                if !errored && matches!(role, Role::Only | Role::First) {
                    pass(&mut self.io, conn, &mut run);
                    match e {
                        Exp::InjectParse => proto::parse_complete(&mut self.io.wbuf),
                        _ => proto::close_complete(&mut self.io.wbuf),
                    }
                }
            }
            if exps.is_empty() {
                pass(&mut self.io, conn, &mut run);
                break;
            }
            // (The message is looked at where it was read; one read already is looked at without an await.)
            let len = match conn.peek_buffered(run) {
                Some(len) => len,
                None => {
                    pass(&mut self.io, conn, &mut run);
                    conn.peek().await?
                }
            };
            let frame = conn.io.bytes_at(run, len);
            let (tag, body) = (frame[0], &frame[5..]);
            let mut relay = to_client(role, tag);
            match tag {
                b'G' if merge.stop_at_copy => {
                    merge.copy_in = true;
                    if matches!(role, Role::Only | Role::First) {
                        run += len;
                        pass(&mut self.io, conn, &mut run);
                    } else {
                        pass(&mut self.io, conn, &mut run);
                        conn.io.consume(len);
                    }
                    return Ok((None, errored));
                }
                b'H' => merge.copy_out = true,
                b'E' => {
                    errored = true;
                    merge.failed = true;
                    if role == Role::Only {
                        merge.relayed_error = true;
                        merge.error = None;
                    } else if merge.error.is_none() && !merge.relayed_error {
                        merge.error = Some(bytes::Bytes::copy_from_slice(frame));
                    }
                    // The server skips everything up to Sync (a simple Query: to its ReadyForQuery).
                    while exps.front().is_some_and(|e| !matches!(e, Exp::Sync | Exp::UntilReady)) {
                        exps.pop_front();
                    }
                }
                b'1' => match exps.pop_front() {
                    Some(Exp::Parse(Some(n))) => {
                        conn.parsing.remove(&n);
                        conn.prepared.insert(n);
                    }
                    Some(Exp::SwallowParse(name)) => {
                        relay = false;
                        if let Some(n) = name {
                            conn.parsing.remove(&n);
                            conn.prepared.insert(n);
                        }
                    }
                    Some(Exp::Quiet(_)) => relay = false,
                    _ => {}
                },
                b'2' => {
                    if let Some(Exp::Quiet(_)) = exps.pop_front() {
                        relay = false;
                    }
                }
                b'3' => {
                    exps.pop_front();
                }
                b'T' | b'n' => {
                    if matches!(exps.front(), Some(Exp::DescribeStmt | Exp::DescribePortal)) {
                        exps.pop_front();
                    }
                }
                b'C' | b'I' | b's' => {
                    let quiet = match exps.front() {
                        Some(Exp::UntilReady) => false,
                        Some(Exp::Quiet(_)) => {
                            exps.pop_front();
                            true
                        }
                        _ => {
                            exps.pop_front();
                            false
                        }
                    };
                    if quiet {
                        relay = false;
                    } else if tag == b'C' && role != Role::Only {
                        if let Some((tag, _)) = proto::read_cstr(body) {
                            let (verb, n) = proto::command_rows(tag).unwrap_or((tag, 0));
                            merge.verb = verb.to_string();
                            merge.rows += n;
                        }
                    }
                }
                b'Z' => {
                    exps.pop_front();
                    let s = body.first().copied().unwrap_or(READY_IDLE);
                    conn.status = s;
                    // A Parse not confirmed by now did not happen (an error skipped it).
                    conn.parsing.clear();
                    ready = Some(s);
                    if merge.hold_ready {
                        relay = false;
                    } else if relay {
                        if let Some(map) = status {
                            // (The client's status written over the server's, where the message was read.)
                            let s = map(s, errored);
                            if len == 6 {
                                conn.io.set_byte(run + 5, s);
                            } else {
                                pass(&mut self.io, conn, &mut run);
                                proto::ready(&mut self.io.wbuf, s);
                                relay = false;
                            }
                        }
                    }
                }
                _ => {} // DataRow, ParameterDescription, notices, ParameterStatus, notifications, COPY out
            }
            if relay {
                run += len;
                if self.io.wbuf.len() + run >= FLUSH_AT {
                    pass(&mut self.io, conn, &mut run);
                    self.io.flush().await.map_err(|e| Reported::new("08006", e.to_string()))?;
                }
            } else {
                pass(&mut self.io, conn, &mut run);
                conn.io.consume(len);
            }
        }
        Ok((ready, errored))
    }
}

/// Answers a segment the router handled itself: ParseComplete, BindComplete, NoData, the command tag,
/// CloseComplete, in the segment's order.
pub fn synthesize(out: &mut BytesMut, seg: &[Msg], tag: &str) {
    for m in seg {
        match m.tag {
            b'P' => proto::parse_complete(out),
            b'B' => proto::put(out, b'2', |_| {}),
            b'D' if m.body().first() == Some(&b'S') => {
                proto::put(out, b't', |b| b.put_i16(0));
                proto::put(out, b'n', |_| {});
            }
            b'D' => proto::put(out, b'n', |_| {}),
            b'E' => proto::command_complete(out, tag),
            b'C' => proto::close_complete(out),
            _ => {}
        }
    }
}

/// Rewrites a segment for one server connection: statement names, Parses left out or added; with `sync`, a
/// Sync after it. Queued on the connection's write buffer (nothing is queued on error).
pub fn rewrite(stmts: &Statements, seg: &[Msg], sync: bool, conn: &mut ServerConn) -> Result<VecDeque<Exp>, Reported> {
    let start = conn.io.wbuf.len();
    let mut exps = spare_exps();
    let r = rewrite_into(stmts, seg, &conn.prepared, &mut conn.parsing, &mut conn.io.wbuf, &mut exps);
    match r {
        Ok(()) => {
            if sync {
                proto::put(&mut conn.io.wbuf, b'S', |_| {});
                exps.push_back(Exp::Sync);
            }
            Ok(exps)
        }
        Err(e) => {
            conn.io.wbuf.truncate(start);
            Err(e)
        }
    }
}

thread_local! {
    /// Queues of expectations answered and emptied, kept for the next segments of this thread: every
    /// extended-protocol statement needs one, and taking it from here costs less than allocating it. A stack,
    /// not one queue: the thread's clients have segments in flight at once, each with its queue.
    static SPARE_EXPS: std::cell::RefCell<Vec<VecDeque<Exp>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Spare queues a thread keeps at most (each at most 64 expectations long).
const SPARE_EXPS_KEPT: usize = 64;

/// The parameter types of the statement `b` binds (none when the client did not give them).
fn bound_types<'s>(stmts: &'s Statements, b: &proto::Bind) -> &'s [u32] {
    stmts.get(b.statement).map_or(&[][..], |st| &st.types)
}

/// An empty queue for a segment's expectations (one of the thread's spare ones when there is one).
fn spare_exps() -> VecDeque<Exp> {
    SPARE_EXPS.with_borrow_mut(Vec::pop).unwrap_or_default()
}

/// Keeps `exps` (answered: empty, or left over after an error) for a next segment of this thread. A queue
/// grown by a long pipeline is dropped rather than kept.
pub fn recycle_exps(mut exps: VecDeque<Exp>) {
    if exps.capacity() <= 64 {
        exps.clear();
        SPARE_EXPS.with_borrow_mut(|spare| {
            if spare.len() < SPARE_EXPS_KEPT {
                spare.push(exps);
            }
        });
    }
}

fn rewrite_into(
    stmts: &Statements,
    batch: &[Msg],
    prepared: &HashSet<String>,
    parsed_here: &mut HashSet<String>,
    out: &mut BytesMut,
    exps: &mut VecDeque<Exp>,
) -> Result<(), Reported> {
    exps.reserve(batch.len() + 2);
    let mut unnamed_parsed = false;
    let stmt = |name: &str| {
        stmts.get(name).ok_or_else(|| Reported::new("26000", format!("prepared statement \"{name}\" does not exist")))
    };
    // Prepares a statement (`st`, the client's `name`) on this connection before a message that needs it.
    let ensure = |name: &str,
                  st: &ClientStmt,
                  out: &mut BytesMut,
                  exps: &mut VecDeque<Exp>,
                  parsed_here: &mut HashSet<String>,
                  unnamed_parsed: &mut bool| {
        if name.is_empty() {
            if !*unnamed_parsed {
                proto::write_parse_bytes(out, "", &st.raw, &st.types);
                exps.push_back(Exp::SwallowParse(None));
                *unnamed_parsed = true;
            }
        } else if !prepared.contains(&st.server_name) && !parsed_here.contains(&st.server_name) {
            proto::write_parse_bytes(out, &st.server_name, &st.raw, &st.types);
            exps.push_back(Exp::SwallowParse(Some(st.server_name.clone())));
            parsed_here.insert(st.server_name.clone());
        }
    };
    for m in batch {
        let body = m.body();
        match m.tag {
            b'P' if body.first() == Some(&0) => {
                // The unnamed statement (most drivers' every statement) goes as the client sent it.
                out.put_slice(&m.frame);
                exps.push_back(Exp::Parse(None));
                unnamed_parsed = true;
            }
            b'P' => {
                let p =
                    proto::read_parse_bytes(body).ok_or_else(|| Reported::new("08P01", "malformed Parse message"))?;
                if p.name.is_empty() {
                    out.put_slice(&m.frame);
                    exps.push_back(Exp::Parse(None));
                    unnamed_parsed = true;
                } else {
                    let st = stmt(p.name)?;
                    if prepared.contains(&st.server_name) || parsed_here.contains(&st.server_name) {
                        exps.push_back(Exp::InjectParse);
                    } else {
                        proto::write_parse_bytes(out, &st.server_name, p.query, &st.types);
                        exps.push_back(Exp::Parse(Some(st.server_name.clone())));
                        parsed_here.insert(st.server_name.clone());
                    }
                }
            }
            b'B' => {
                let b = proto::read_bind_head(body).ok_or_else(|| Reported::new("08P01", "malformed Bind message"))?;
                let st = stmt(b.statement)?;
                ensure(b.statement, st, out, exps, parsed_here, &mut unnamed_parsed);
                if b.statement.is_empty() {
                    out.put_slice(&m.frame);
                } else {
                    proto::write_bind_renamed(out, &b, &st.server_name);
                }
                exps.push_back(Exp::Bind);
            }
            b'D' => {
                let (&kind, rest) =
                    body.split_first().ok_or_else(|| Reported::new("08P01", "malformed Describe message"))?;
                let (name, _) =
                    proto::read_cstr(rest).ok_or_else(|| Reported::new("08P01", "malformed Describe message"))?;
                if kind == b'S' {
                    let st = stmt(name)?;
                    ensure(name, st, out, exps, parsed_here, &mut unnamed_parsed);
                    if name.is_empty() {
                        out.put_slice(&m.frame);
                    } else {
                        let sn = &st.server_name;
                        proto::put(out, b'D', |b| {
                            b.put_u8(b'S');
                            proto::cstr(b, sn);
                        });
                    }
                    exps.push_back(Exp::DescribeStmt);
                } else {
                    out.put_slice(&m.frame);
                    exps.push_back(Exp::DescribePortal);
                }
            }
            b'E' => {
                out.put_slice(&m.frame);
                exps.push_back(Exp::Execute);
            }
            b'C' => {
                let named_statement = body.first() == Some(&b'S') && body.get(1).is_some_and(|&b| b != 0);
                if named_statement {
                    exps.push_back(Exp::InjectClose);
                } else {
                    out.put_slice(&m.frame);
                    exps.push_back(Exp::Close);
                }
            }
            b'S' => {
                out.put_slice(&m.frame);
                exps.push_back(Exp::Sync);
            }
            _ => out.put_slice(&m.frame), // Flush
        }
    }
    Ok(())
}

/// The refusal of a BEGIN, COMMIT or ROLLBACK after writes or settings of the sync group outside a transaction
/// on several shards' connections that are not one transaction already (`implicit_link`; with two-phase commit
/// writes there are: `implicit_to_own`).
fn implicit_on_several(stmt: &Stmt) -> Reported {
    Reported::unsupported(format!(
        "{} after writes or settings on several shards in the same pipeline is not supported (PostgreSQL ends them together): send a Sync before it",
        stmt.tag
    ))
}

#[cfg(test)]
mod tests {
    use super::segments;
    use crate::net::wire::Msg;

    fn batch(tags: &str) -> Vec<Msg> {
        tags.bytes().map(|tag| Msg { tag, frame: bytes::Bytes::from(vec![tag, 0, 0, 0, 4]) }).collect()
    }

    #[test]
    fn a_batch_is_cut_after_each_execute() {
        let cut = |tags: &str| segments(&batch(tags)).collect::<Vec<_>>();
        assert_eq!(cut("PBDES"), vec![0..4]);
        assert_eq!(cut("PBEBES"), vec![0..3, 3..5]);
        assert_eq!(cut("PBEDS"), vec![0..3, 3..4]);
        assert_eq!(cut("PDH"), vec![0..2]);
        assert_eq!(cut("PBE"), vec![0..3]);
        assert_eq!(cut("S"), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(cut(""), Vec::<std::ops::Range<usize>>::new());
    }
}
