//! The client's transaction as a state machine: every transition lives here, and the simple protocol, the
//! extended protocol, pipelines and COPY all go through it. A Query of `COMMIT` and a Parse/Bind/Execute of
//! `COMMIT` are the same event.
//!
//! States: `Idle`; `Held` (BEGIN answered by the router, and the statements that need no shard — SAVEPOINT,
//! SET, NOTIFY... — queued, until a statement names a shard: then they are replayed there); `One` (on one
//! shard's connection); `Many` (on several shards' connections: a statement for another shard joins its
//! shard, which gets the transaction's replay log first — BEGIN, what was queued, and the SET, SAVEPOINT,
//! RELEASE and ROLLBACK TO sent since — so that it is where the others are; DDL and writes to global tables
//! join every shard, as migrations need). A transaction on several shards commits with two-phase commit
//! (`commit.rs`); without `shard-two-phase-commit` only DDL and global writes open one, and a statement for a
//! second shard is refused. `failed` is the router's own record that the transaction is aborted
//! (it refused a statement, or one that ran outside the held transaction failed): only ROLLBACK, COMMIT
//! (which rolls back, as PostgreSQL does) and ROLLBACK TO are accepted then. When the destination is known
//! whatever the statement ([`shardmap::Planner::fixed`]: one node, or the tenant's database), BEGIN is not
//! held: it goes to the server, which answers every statement itself.
//!
//! [`Txn::plan`] is pure: from the state, the statement and its route it says what to do ([`Plan`]) and makes
//! the transitions that follow from the statement alone (BEGIN held, COMMIT of a held transaction, and the
//! end of a transaction sent COMMIT or ROLLBACK: predicted, so that the statements after it in the same
//! pipeline see the transaction ended). [`Txn::ready`] reconciles with what a server's ReadyForQuery says.

use shardmap::sql::{Declare, TxnVerb};
use shardmap::{Decision, ShardId, Target};

use crate::net::proto::{READY_FAILED, READY_IDLE, READY_IN_TX};
use crate::net::Reported;

pub use crate::backend::Dest;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum State {
    #[default]
    Idle,
    /// BEGIN and the statements queued after it (their SQL text), replayed where the transaction opens.
    Held(Vec<String>),
    One(Dest),
    /// The shards the transaction has joined, in the order it joined them.
    Many(Vec<Dest>),
}

/// What the transaction state machine needs to know of a statement (a simple Query, or one Bind/Execute).
#[derive(Clone, Debug, Default)]
pub struct Stmt {
    /// A single transaction-control statement.
    pub verb: Option<TxnVerb>,
    /// What the router does with it itself.
    pub local: Local,
    /// Every statement in it reads.
    pub read: bool,
    /// A standby may answer it outside a transaction (`shard-read-replicas`): it reads, and calls no sequence
    /// or advisory lock function (those are the primary's: `StatementAnalysis::shared_call`).
    pub standby: bool,
    /// A session statement (SET, SHOW, LISTEN...: target `Session`) that can be queued in a held
    /// transaction (everything but SHOW, which needs an answer now).
    pub queueable: bool,
    pub declare: Option<Declare>,
    /// COPY ... FROM STDIN.
    pub copy_in: bool,
    /// sqlparser could not parse it.
    pub unparsed: bool,
    /// One statement (not a string of several).
    pub single: bool,
    /// What the router runs itself when the statement goes to several shards.
    pub router: Option<Run>,
    /// The command tag a queued statement is answered with (`SET`, `SAVEPOINT`...).
    pub tag: Box<str>,
    /// The cursor a DECLARE, FETCH, MOVE or CLOSE names.
    pub cursor: Option<Box<str>>,
    /// Its text, when a shard that joins the transaction later must run it too (SET, SAVEPOINT, RELEASE,
    /// ROLLBACK TO: see the module doc).
    pub replay: Option<Box<str>>,
    /// Why transaction pooling cannot serve it (a LISTEN, SET ROLE, SQL-level PREPARE: state that would
    /// stay on a pooled connection), when that is so.
    pub pooling: Option<Box<str>>,
    /// The savepoint a SAVEPOINT, RELEASE or ROLLBACK TO names.
    pub savepoint: Option<Box<str>>,
    /// It changes a session setting (SET, RESET, a `set_config()` call).
    pub setting: bool,
    /// COMMIT AND CHAIN or ROLLBACK AND CHAIN.
    pub chain: bool,
    /// BEGIN ISOLATION LEVEL REPEATABLE READ or SERIALIZABLE.
    pub snapshot_isolation: bool,
}

// (Moved at every statement: up to 128 bytes LLVM moves inline, past that it calls memcpy — hence the rare
// names as `Box<str>`.)
const _: () = assert!(std::mem::size_of::<Stmt>() <= 128, "Stmt");

/// What the router answers itself, whatever the state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Local {
    #[default]
    No,
    /// `SET gb.shard_key`, `SET gb.tenant` and their RESET: the router's own session state.
    Gb,
    /// `DEALLOCATE`: the client's prepared statements live in the router.
    Deallocate,
    /// `DISCARD ALL`: the router's state for the client (statements, settings, gb.*) too.
    DiscardAll,
}

/// What to do with a statement.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// The router answers with this command tag (a warning first, when given); the state changed already.
    Answer {
        tag: String,
        warning: Option<(&'static str, &'static str)>,
    },
    /// The router answers with the tag and queues the statement's text in the held transaction.
    Hold {
        tag: String,
    },
    /// Refused; inside a transaction this fails it.
    Refuse(Reported),
    Run(To),
}

/// Where a statement runs.
#[derive(Debug, PartialEq, Eq)]
pub enum To {
    /// The transaction's connection.
    Bound,
    /// Outside any transaction (or outside the held one): one exchange on this destination.
    Once(Dest),
    /// Outside any transaction (or outside the held one): any shard (no sharded table).
    Any,
    /// Outside any transaction (or outside the held one): several shards at once.
    Fan(Vec<ShardId>),
    /// Opens the held transaction here (replaying what was queued), then runs there.
    Open(Dest),
    /// Opens the held transaction on any shard (nothing named one), then runs there.
    OpenAny,
    /// Opens the held transaction on these shards (none: every shard), then runs on all of them.
    OpenParts(Vec<ShardId>),
    /// In a transaction: on its connection to this shard, which joins it first when it has not (`None`: any
    /// of its connections).
    Part(Option<ShardId>),
    /// In a transaction: on its connections to these shards (none: every shard), joining those it has not.
    Parts(Vec<ShardId>),
    /// In a transaction on several shards: on every connection it has.
    Every,
    /// COMMIT of a transaction on several shards: the router commits it (two-phase commit where more than
    /// one shard wrote).
    Commit,
    /// A statement the router runs itself (see [`Run`]): on these shards outside any transaction (or
    /// outside the held one), or inside the transaction (`every`) on its connections to these shards (none:
    /// every shard), which join it first, as the held transaction opens there first (`open`).
    Router { run: Run, every: bool, open: bool, shards: Vec<ShardId> },
    /// COMMIT of a transaction the router failed: ROLLBACK on its connections, answered "ROLLBACK".
    RollbackInstead,
    /// COMMIT PREPARED / ROLLBACK PREPARED: where that transaction was prepared.
    Prepared(String),
}

/// Statements the router runs itself on several shards, rather than relaying them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    /// A read whose rows are combined (aggregates, ORDER BY, LIMIT...).
    Combine,
    /// An INSERT into a global table (run on one shard, its rows copied to the others).
    GlobalInsert,
    /// An UPDATE or DELETE of a global table (the clock read once, row counts compared).
    GlobalWrite,
    /// An INSERT whose rows are for several shards: one INSERT per shard, RETURNING rows in VALUES order.
    SplitInsert,
}

#[derive(Debug, Default)]
pub struct Txn {
    pub state: State,
    /// The router's record that the transaction is aborted (see the module doc).
    pub failed: bool,
    /// A transaction on one shard whose server answered that it is aborted (ReadyForQuery `E`): every
    /// statement but the transaction's own verbs goes to that server, which answers it as PostgreSQL does
    /// (25P02) — none joins another shard, where it would run.
    pub aborted_there: bool,
    /// The savepoints of a held transaction, oldest first: the router answers RELEASE and ROLLBACK TO of
    /// them, and refuses those of a name there is none of (3B001), as PostgreSQL does.
    pub savepoints: Vec<String>,
    /// A held transaction has queued a setting (SET, RESET, `set_config()`...), or began REPEATABLE READ or
    /// SERIALIZABLE: what it runs now runs inside it, after the queue — outside, it would not see the setting,
    /// nor the transaction's snapshot.
    pub held_settings: bool,
    /// The transaction ran a setting the replay log does not hold (a `set_config()` call, which may take Bind
    /// parameters): a shard joining it now would not have the setting, so none joins.
    pub unreplayed_setting: bool,
    /// The transaction just ended by rolling back (ROLLBACK, or COMMIT of one its server had aborted): the
    /// settings it changed are undone.
    pub rolled_back_now: bool,
    /// A ROLLBACK TO ran in the open transaction: which of the settings changed in it stand is the server's
    /// to say when it commits.
    pub rolled_back_to: bool,
    /// The transaction that just ended had a ROLLBACK TO.
    pub went_back_now: bool,
    /// Session settings changed inside the transaction: read back from the server when it ends.
    pub settings_changed: bool,
    /// What a shard that joins the open transaction runs first (see the module doc).
    pub log: Vec<String>,
    /// Where the statement planned last went in `log`, if it did: one that fails on its server comes out
    /// again (`unlog_failed`), or a shard joining later would fail to replay it.
    pub last_logged: Option<usize>,
    /// Shards a write was sent to in this transaction (their parts wrote; the others' are asked at COMMIT).
    pub wrote: Vec<ShardId>,
    /// `shard-two-phase-commit`: a transaction may go on to other shards.
    pub two_phase: bool,
    /// The transaction is the router's own, for a write outside any transaction whose keys are on several
    /// shards (or a write to a global table), or for a pipeline's writes outside a transaction on several
    /// shards' connections (`Session::implicit_to_own`): it ends at the end of the Query, or at the client's
    /// Sync (committed, or rolled back after an error), as PostgreSQL's implicit transaction does. Until then
    /// it answers transaction control as that one does (see `plan_implicit`).
    pub implicit: bool,
}

/// PostgreSQL's error for `what` (SAVEPOINT, LOCK TABLE...) outside a transaction block — in an implicit
/// transaction too.
pub fn block_only(what: &str) -> Reported {
    Reported::new("25P01", format!("{what} can only be used in transaction blocks"))
}

const ABORTED: &str = "current transaction is aborted, commands ignored until end of transaction block";

/// Queued in a held transaction after a read it ran outside: on one PostgreSQL that read took the
/// transaction's snapshot, after which SET TRANSACTION ISOLATION LEVEL is refused (25001). Replayed where the
/// transaction opens or joins, it takes one there too, so that the server answers as one PostgreSQL would.
pub const SNAPSHOT: &str = "SELECT WHERE false";

fn tag_of(verb: &TxnVerb) -> &'static str {
    match verb {
        TxnVerb::Begin => "BEGIN",
        TxnVerb::Commit => "COMMIT",
        TxnVerb::Rollback => "ROLLBACK",
        TxnVerb::Savepoint => "SAVEPOINT",
        TxnVerb::Release => "RELEASE",
        TxnVerb::RollbackTo => "ROLLBACK",
        TxnVerb::Prepare(_) => "PREPARE TRANSACTION",
        TxnVerb::CommitPrepared(_) => "COMMIT PREPARED",
        TxnVerb::RollbackPrepared(_) => "ROLLBACK PREPARED",
    }
}

impl Txn {
    /// Whether the client is inside a transaction block.
    pub fn open(&self) -> bool {
        self.state != State::Idle
    }

    /// The status the client is told in ReadyForQuery; `conns` gives the statuses of the transaction's
    /// connections (one for `One`, each for `All`).
    pub fn status(&self, conns: impl Iterator<Item = u8>) -> u8 {
        match &self.state {
            State::Idle => READY_IDLE,
            _ if self.failed => READY_FAILED,
            State::Held(_) => READY_IN_TX,
            State::One(_) | State::Many(_) => {
                let mut status = READY_IN_TX;
                for s in conns {
                    if s == READY_FAILED {
                        return READY_FAILED;
                    }
                    status = if s == READY_IDLE && status == READY_IN_TX { READY_IN_TX } else { status };
                }
                status
            }
        }
    }

    /// A statement the router refused, or one run outside the held transaction that failed: inside a
    /// transaction, the transaction is aborted.
    pub fn error_inside(&mut self) {
        if self.open() {
            self.failed = true;
        }
    }

    pub fn end(&mut self) {
        self.state = State::Idle;
        self.failed = false;
        self.aborted_there = false;
        self.savepoints.clear();
        self.held_settings = false;
        self.unreplayed_setting = false;
        self.rolled_back_now = false;
        self.rolled_back_to = false;
        self.went_back_now = false;
        self.implicit = false;
        self.log.clear();
        self.wrote.clear();
    }

    /// Records the shards a write goes to (see `wrote`).
    fn note_writes(&mut self, s: &Stmt, plan: &Plan) {
        if s.read || s.verb.is_some() {
            return;
        }
        let shards: Vec<ShardId> = match plan {
            Plan::Run(To::Bound) => self.parts().iter().take(1).map(|d| d.shard).collect(),
            Plan::Run(To::Open(d)) => vec![d.shard],
            Plan::Run(To::Part(Some(s))) => vec![*s],
            Plan::Run(To::Parts(v) | To::OpenParts(v)) if !v.is_empty() => v.clone(),
            Plan::Run(To::Every) => self.parts().iter().map(|d| d.shard).collect(),
            // (Every shard: DDL, global tables, COPY; unknown shards are asked at COMMIT.)
            _ => return,
        };
        for sh in shards {
            self.wrote_on(sh);
        }
    }

    /// `shard`'s part of the transaction wrote (see `wrote`).
    pub fn wrote_on(&mut self, shard: ShardId) {
        if !self.wrote.contains(&shard) {
            self.wrote.push(shard);
        }
    }

    /// Opens the router's own transaction for a statement outside any (see `implicit`).
    pub fn begin_implicit(&mut self) {
        self.state = State::Held(vec!["BEGIN".into()]);
        self.implicit = true;
    }

    /// Whether the connection to `dest` belongs to the open transaction.
    pub fn holds(&self, dest: &Dest) -> bool {
        match &self.state {
            State::One(d) => d == dest,
            State::Many(parts) => parts.contains(dest),
            _ => false,
        }
    }

    /// The transaction's destinations (one for `One`, each part for `Many`).
    pub fn parts(&self) -> &[Dest] {
        match &self.state {
            State::One(d) => std::slice::from_ref(d),
            State::Many(parts) => parts,
            _ => &[],
        }
    }

    /// Whether the transaction is on shards' connections now (`One` or `Many`).
    pub fn on_shards(&self) -> bool {
        matches!(self.state, State::One(_) | State::Many(_))
    }

    /// Decides what to do with a statement (see the module doc). `route` is the planner's decision (errors
    /// already turned into what the client would be told); `fixed` the destination every statement of the
    /// session has, when there is one.
    pub fn plan(
        &mut self,
        s: &Stmt,
        route: Result<&Decision, Reported>,
        fixed: Option<&Dest>,
        name: &dyn Fn(ShardId) -> String,
    ) -> Plan {
        use State::*;
        self.last_logged = None;
        if s.verb == Some(TxnVerb::RollbackTo) && self.open() {
            self.rolled_back_to = true;
            // (It takes its server's transaction out of the aborted state: a statement after it in the same
            // pipeline, planned before the ReadyForQuery that says so, goes where it routes, not to that
            // server to be refused. If it fails, the server skips the rest of the pipeline.)
            self.aborted_there = false;
        }
        if self.failed && self.open() {
            return self.plan_failed(s);
        }
        let answer = |tag: &str| Plan::Answer { tag: tag.to_string(), warning: None };
        if let Some(why) = &s.pooling {
            return Plan::Refuse(Reported::unsupported(why.clone()));
        }
        if let (true, Some(verb), false) = (s.chain, &s.verb, self.state == Idle) {
            // (Outside a transaction the server refuses it, 25P01, as one PostgreSQL would.)
            let what = format!("{} AND CHAIN", tag_of(verb));
            return Plan::Refuse(if self.implicit {
                block_only(&what)
            } else {
                Reported::unsupported(format!(
                    "{what} is not supported (the router would have to start the next transaction where this one ends): send {} and then BEGIN",
                    tag_of(verb)
                ))
            });
        }
        // The router's own session state.
        match (&s.local, &self.state) {
            (Local::Gb, _) => return answer(""),
            (Local::Deallocate, _) => return answer(""),
            (Local::DiscardAll, Idle) => return answer("DISCARD ALL"),
            (Local::DiscardAll, _) => {
                return Plan::Refuse(Reported::new("25001", "DISCARD ALL cannot run inside a transaction block"))
            }
            (Local::No, _) => {}
        }
        if let (Some(verb), true) = (&s.verb, self.implicit) {
            if let Some(plan) = self.plan_implicit(verb) {
                return plan;
            }
        }
        if let Some(verb) = &s.verb {
            let was_idle = self.state == Idle;
            let plan = self.plan_verb(verb, fixed, s.savepoint.as_deref());
            if was_idle && s.snapshot_isolation && matches!(self.state, Held(_)) {
                // (Its reads share the transaction's snapshot: they run inside it, as after a setting, not
                // outside on a fresh one.)
                self.held_settings = true;
            }
            self.logged(s, &plan);
            return plan;
        }
        if self.aborted_there && matches!(self.state, One(_)) {
            // (Its server answers 25P02, as one PostgreSQL would, and runs nothing.)
            return Plan::Run(To::Bound);
        }
        let d = match route {
            Ok(d) => d,
            // What sqlparser cannot read goes where the transaction is: PostgreSQL answers it.
            Err(_) if s.unparsed && matches!(self.state, One(_)) => return Plan::Run(To::Bound),
            Err(e) => return Plan::Refuse(e),
        };
        if s.setting && s.replay.is_none() && matches!(self.state, Many(_)) {
            // (Sent to one of the transaction's shards, the setting would be on that one only.)
            return Plan::Refuse(Reported::unsupported(
                "set_config() in a transaction on several shards is not supported: make the setting with SET (or SET LOCAL)",
            ));
        }
        let two_phase = self.two_phase;
        let several = |what: &str| {
            Plan::Refuse(Reported::unsupported(format!(
                "this statement goes to {what} ({}), but the transaction is bound to one shard; transactions on several shards need shard-two-phase-commit",
                d.reason
            )))
        };
        // (A read the held transaction runs outside it: see `SNAPSHOT`.)
        let mut snapshot = false;
        let plan = match (&self.state, &d.target) {
            // COPY: rows split over the transaction's connections (or every shard's).
            (Idle, Target::One(shard)) if s.copy_in => Plan::Run(To::Once(Dest::of(*shard, d))),
            (Idle, _) if s.copy_in => Plan::Run(To::Fan(d.shards_or_all())),
            (Held(_), _) if s.copy_in => Plan::Run(To::OpenParts(Vec::new())),
            (One(_), _) if s.copy_in && (!two_phase || fixed.is_some()) => Plan::Run(To::Bound),
            (One(_) | Many(_), _) if s.copy_in => Plan::Run(To::Parts(Vec::new())),

            (Idle, Target::One(shard)) => Plan::Run(To::Once(Dest::of(*shard, d))),
            (Idle, Target::Any | Target::Session) => match fixed {
                Some(f) => Plan::Run(To::Once(f.clone())),
                None => Plan::Run(To::Any),
            },
            // Writes on several shards outside a transaction: in one of the router's own, committed at once.
            (Idle, Target::Set(shards)) if !s.read && two_phase => {
                self.begin_implicit();
                Plan::Run(To::OpenParts(shards.clone()))
            }
            (Idle, Target::All) if !s.read && two_phase && s.router.is_some() => {
                self.begin_implicit();
                Plan::Run(To::OpenParts(Vec::new()))
            }
            (Idle, Target::Set(shards)) => Plan::Run(To::Fan(shards.clone())),
            (Idle, Target::All) => Plan::Run(To::Fan(d.shards_or_all())),

            (Held(_), Target::One(shard)) => Plan::Run(To::Open(Dest::of(*shard, d))),
            (Held(_), Target::Session) if s.queueable => {
                self.held_settings |= &*s.tag != "NOTIFY";
                Plan::Hold { tag: s.tag.to_string() }
            }
            // (A setting is made inside the transaction, and seen inside it.)
            (Held(_), Target::Session | Target::Any) if s.declare.is_some() || s.setting || self.held_settings => {
                Plan::Run(To::OpenAny)
            }
            // Reads of no sharded table (and SHOW, FETCH of a cursor that cannot exist yet) run outside the
            // transaction, which has not started anywhere.
            (Held(_), Target::Session | Target::Any) => {
                snapshot |= s.read;
                Plan::Run(To::Any)
            }
            (Held(_), Target::All | Target::Set(_)) if s.declare.is_some() => Plan::Refuse(Reported::unsupported(
                format!("a cursor over several shards is not supported ({}); declare it with a shard key", d.reason),
            )),
            (Held(_), Target::All | Target::Set(_)) if s.read && self.held_settings && two_phase => {
                Plan::Run(To::OpenParts(d.shards_or_all()))
            }
            (Held(_), Target::All | Target::Set(_)) if s.read && self.held_settings => {
                Plan::Refuse(Reported::unsupported(format!(
                    "a read on several shards ({}) after a setting made in the transaction, or in a REPEATABLE READ or SERIALIZABLE one, needs shard-two-phase-commit: outside the transaction it would not see the setting or the transaction's snapshot",
                    d.reason
                )))
            }
            (Held(_), Target::All | Target::Set(_)) if s.read => {
                snapshot = true;
                Plan::Run(To::Fan(d.shards_or_all()))
            }
            (Held(_), Target::All) => Plan::Run(To::OpenParts(Vec::new())),
            (Held(_), Target::Set(shards)) if two_phase => Plan::Run(To::OpenParts(shards.clone())),
            (Held(_), Target::Set(_)) => several("several shards"),

            (One(_), Target::Session | Target::Any) => Plan::Run(To::Bound),
            (One(b), Target::One(shard)) if *b == Dest::of(*shard, d) => Plan::Run(To::Bound),
            (One(_), _) if s.declare.is_some() && !matches!(d.target, Target::One(_)) => {
                Plan::Refuse(Reported::unsupported(format!(
                    "a cursor over several shards is not supported ({}); declare it with a shard key",
                    d.reason
                )))
            }
            (One(_), Target::One(shard)) if two_phase => Plan::Run(To::Part(Some(*shard))),
            (One(b), Target::One(shard)) => Plan::Refuse(Reported::unsupported(format!(
                "the transaction is on shard {}, and this statement goes to shard {} ({}); transactions on several shards need shard-two-phase-commit",
                name(b.shard),
                name(*shard),
                d.reason
            ))),
            (One(_), Target::All) if two_phase => Plan::Run(To::Parts(Vec::new())),
            (One(_), Target::Set(shards)) if two_phase => Plan::Run(To::Parts(shards.clone())),
            (One(_), Target::All) => several("every shard"),
            (One(_), Target::Set(_)) => several("several shards"),

            (Many(_), _) if s.declare.is_some() && !matches!(d.target, Target::One(_) | Target::Any) => {
                Plan::Refuse(Reported::unsupported(format!(
                    "a cursor over several shards is not supported ({}); declare it with a shard key",
                    d.reason
                )))
            }
            (Many(_), Target::One(shard)) => Plan::Run(To::Part(Some(*shard))),
            (Many(_), Target::Any) => Plan::Run(To::Part(None)),
            // (NOTIFY once, where session mode's listeners are.)
            (Many(_), Target::Session) if &*s.tag == "NOTIFY" => Plan::Run(To::Part(Some(ShardId(0)))),
            (Many(_), Target::Session) => Plan::Run(To::Every),
            (Many(_), Target::Set(shards)) => Plan::Run(To::Parts(shards.clone())),
            (Many(_), Target::All) => Plan::Run(To::Parts(Vec::new())),
        };
        if let (true, Held(q)) = (snapshot, &mut self.state) {
            snapshot_taken(q);
        }
        self.logged(s, &plan);
        self.note_writes(s, &plan);
        plan
    }

    /// A statement that a shard joining the transaction later must run too goes in the replay log.
    fn logged(&mut self, s: &Stmt, plan: &Plan) {
        if (self.failed || self.aborted_there) && s.verb != Some(TxnVerb::RollbackTo) {
            // (The aborted transaction's server refuses it, 25P02: a shard that joins later must not run it.)
            return;
        }
        if let (Some(text), Plan::Run(_), true) = (&s.replay, plan, self.on_shards()) {
            self.last_logged = Some(self.log.len());
            self.log.push(text.to_string());
        }
        if s.setting && s.replay.is_none() && matches!(plan, Plan::Run(_)) && self.open() {
            self.unreplayed_setting = true;
        }
    }

    /// Transaction control inside the router's own transaction (`implicit`), as PostgreSQL answers it inside
    /// its implicit transaction: BEGIN makes it the client's (no warning: what ran before is part of it), and
    /// savepoints need a transaction block. (COMMIT and ROLLBACK end it as they would the client's, with
    /// PostgreSQL's warning that no transaction is in progress: see `Session::statement`.) `None`: planned as
    /// in a transaction.
    fn plan_implicit(&mut self, verb: &TxnVerb) -> Option<Plan> {
        let block_only = |what: &str| Some(Plan::Refuse(block_only(what)));
        match verb {
            TxnVerb::Begin => {
                self.implicit = false;
                Some(Plan::Answer { tag: "BEGIN".into(), warning: None })
            }
            TxnVerb::Savepoint => block_only("SAVEPOINT"),
            TxnVerb::Release => block_only("RELEASE SAVEPOINT"),
            TxnVerb::RollbackTo => block_only("ROLLBACK TO SAVEPOINT"),
            TxnVerb::Prepare(_) => Some(Plan::Refuse(Reported::unsupported(
                "PREPARE TRANSACTION after writes on several shards outside a transaction is not supported (the router commits them with two-phase commit itself)",
            ))),
            _ => None,
        }
    }

    fn plan_verb(&mut self, verb: &TxnVerb, fixed: Option<&Dest>, savepoint: Option<&str>) -> Plan {
        use State::*;
        let answer = |tag: &str| Plan::Answer { tag: tag.to_string(), warning: None };
        match (&mut self.state, verb) {
            (Idle, TxnVerb::Begin) => match fixed {
                Some(f) => {
                    self.state = One(f.clone());
                    Plan::Run(To::Once(f.clone()))
                }
                None => {
                    self.state = Held(Vec::new());
                    Plan::Hold { tag: "BEGIN".into() }
                }
            },
            (Idle, TxnVerb::CommitPrepared(gid) | TxnVerb::RollbackPrepared(gid)) => {
                Plan::Run(To::Prepared(gid.clone()))
            }
            // COMMIT outside a transaction and the like: the server warns or refuses, any shard will do.
            (Idle, _) => Plan::Run(fixed.map_or(To::Any, |f| To::Once(f.clone()))),

            (Held(_), TxnVerb::Begin) => Plan::Answer {
                tag: "BEGIN".into(),
                warning: Some(("25001", "there is already a transaction in progress")),
            },
            (Held(q), TxnVerb::Commit) if q.iter().skip(1).all(|x| x == SNAPSHOT) => {
                self.end();
                answer("COMMIT")
            }
            // Queued statements (SET, NOTIFY...) that commit: they run on any shard.
            (Held(_), TxnVerb::Commit | TxnVerb::Prepare(_)) => Plan::Run(To::OpenAny),
            (Held(_), TxnVerb::Rollback) => {
                self.end();
                answer("ROLLBACK")
            }
            (Held(_), TxnVerb::Savepoint | TxnVerb::Release | TxnVerb::RollbackTo) => {
                self.held_savepoint(verb, savepoint)
            }
            (Held(_) | One(_) | Many(_), TxnVerb::CommitPrepared(_) | TxnVerb::RollbackPrepared(_)) => {
                Plan::Refuse(Reported::new("25001", format!("{} cannot run inside a transaction block", tag_of(verb))))
            }

            (One(_), _) => Plan::Run(To::Bound),
            (Many(_), TxnVerb::Commit) if self.two_phase => Plan::Run(To::Commit),
            (Many(parts), TxnVerb::Prepare(_)) if parts.len() > 1 => Plan::Refuse(Reported::unsupported(
                "PREPARE TRANSACTION of a transaction on several shards is not supported (the router commits it with two-phase commit itself: send COMMIT)",
            )),
            (Many(_), _) => Plan::Run(To::Every),
        }
    }

    /// SAVEPOINT, RELEASE or ROLLBACK TO `name` in a held transaction: answered by the router, which keeps
    /// the savepoints (the statement is queued for the shard the transaction opens on); one of a name there is
    /// no savepoint of is PostgreSQL's error.
    fn held_savepoint(&mut self, verb: &TxnVerb, name: Option<&str>) -> Plan {
        let hold = Plan::Hold { tag: tag_of(verb).into() };
        let Some(name) = name else { return hold };
        if *verb == TxnVerb::Savepoint {
            self.savepoints.push(name.to_string());
            return hold;
        }
        match self.savepoints.iter().rposition(|s| s == name) {
            // RELEASE lets go of it and the later ones; ROLLBACK TO keeps it.
            Some(at) => {
                self.savepoints.truncate(if *verb == TxnVerb::Release { at } else { at + 1 });
                hold
            }
            None => Plan::Refuse(Reported::new("3B001", format!("savepoint \"{name}\" does not exist"))),
        }
    }

    /// A transaction the router knows is aborted: only its end, or a way back to a savepoint.
    fn plan_failed(&mut self, s: &Stmt) -> Plan {
        use State::*;
        let answer = |tag: &str| Plan::Answer { tag: tag.to_string(), warning: None };
        let plan = match (&self.state, &s.verb) {
            (Held(_), Some(TxnVerb::Rollback | TxnVerb::Commit | TxnVerb::Prepare(_))) => {
                self.end();
                answer("ROLLBACK")
            }
            (Held(_), Some(TxnVerb::RollbackTo)) => {
                let plan = self.held_savepoint(&TxnVerb::RollbackTo, s.savepoint.as_deref());
                if matches!(plan, Plan::Hold { .. }) {
                    self.failed = false;
                }
                plan
            }
            (One(_) | Many(_), Some(TxnVerb::Commit | TxnVerb::Prepare(_))) => Plan::Run(To::RollbackInstead),
            (One(_), Some(TxnVerb::Rollback)) => Plan::Run(To::Bound),
            (Many(_), Some(TxnVerb::Rollback)) => Plan::Run(To::Every),
            // The server's transaction is fine (the router refused a statement): it goes back to the
            // savepoint, and so does the router's record.
            (One(_), Some(TxnVerb::RollbackTo)) => {
                self.failed = false;
                Plan::Run(To::Bound)
            }
            (Many(_), Some(TxnVerb::RollbackTo)) => {
                self.failed = false;
                Plan::Run(To::Every)
            }
            _ if s.local == Local::Gb || s.local == Local::Deallocate => answer(""),
            _ => Plan::Refuse(Reported::new("25P02", ABORTED)),
        };
        self.logged(s, &plan);
        plan
    }

    /// The statement planned last failed on its server (it ran alone, so its error is its own): it leaves the
    /// replay log.
    pub fn unlog_failed(&mut self) {
        if let Some(at) = self.last_logged.take() {
            self.log.truncate(at);
        }
    }

    /// A statement was handed to the transaction's connection(s): COMMIT, ROLLBACK and PREPARE TRANSACTION
    /// end the transaction (predicted, so that the next statement of a pipeline is outside it; the server's
    /// ReadyForQuery confirms it in [`Txn::ready`]).
    pub fn sent(&mut self, verb: Option<&TxnVerb>) {
        let ends = matches!(verb, Some(TxnVerb::Commit | TxnVerb::Rollback | TxnVerb::Prepare(_)));
        if ends && self.on_shards() {
            let back = matches!(verb, Some(TxnVerb::Rollback)) || self.aborted_there || self.failed;
            let went_back = self.rolled_back_to;
            self.end();
            self.rolled_back_now = back;
            self.went_back_now = went_back;
        }
    }

    /// The end of a transaction the router ended itself (COMMIT of a failed one, or of one on several
    /// shards).
    pub fn rolled_back(&mut self) {
        self.end();
    }

    /// The connection to `dest` of the open transaction was lost (the server rolled back its part): a
    /// transaction on one shard is over; one on several is failed (the client's ROLLBACK ends the rest).
    /// Returns whether the transaction ended.
    pub fn lose(&mut self, dest: &Dest) -> bool {
        match &mut self.state {
            State::One(d) if d == dest => {
                self.end();
                true
            }
            State::Many(parts) if parts.contains(dest) => {
                parts.retain(|p| p != dest);
                if parts.is_empty() {
                    self.end();
                    return true;
                }
                self.failed = true;
                false
            }
            _ => false,
        }
    }

    /// The held transaction opened on `dest` (its queue replayed there, and kept to replay on shards that
    /// join later).
    pub fn opened(&mut self, dest: Dest) {
        if let State::Held(q) = &mut self.state {
            self.log = replayable(std::mem::take(q));
        }
        // (Its server has them now, from the replayed queue.)
        self.savepoints.clear();
        self.held_settings = false;
        self.state = State::One(dest);
    }

    /// A shard's connection joined the transaction (the held one opens there, a `One` becomes `Many`).
    pub fn joined(&mut self, dest: Dest) {
        match &mut self.state {
            State::Held(q) => {
                self.log = replayable(std::mem::take(q));
                self.state = State::Many(vec![dest]);
            }
            State::One(d) if *d != dest => {
                let first = d.clone();
                self.state = State::Many(vec![first, dest]);
            }
            State::Many(parts) if !parts.contains(&dest) => parts.push(dest),
            _ => {}
        }
    }

    /// The statements a shard runs first where the transaction opens or joins it (BEGIN first).
    pub fn queued(&self) -> &[String] {
        match &self.state {
            State::Held(q) => q,
            _ => &self.log,
        }
    }

    /// Queues a statement of the held transaction.
    pub fn queue(&mut self, sql: String) {
        if let State::Held(q) = &mut self.state {
            q.push(sql);
        }
    }

    /// A connection to `dest` answered ReadyForQuery with `status` (`error`: an ErrorResponse came before it).
    /// Returns whether the connection belongs to the transaction now.
    pub fn ready(&mut self, dest: &Dest, status: u8, error: bool) -> bool {
        if self.state == State::Idle && status == READY_IDLE {
            return false;
        }
        match &self.state {
            State::Idle if status != READY_IDLE => {
                // A transaction began there (BEGIN inside a query string, or sent as is: `fixed`).
                self.state = State::One(dest.clone());
                true
            }
            State::Idle => false,
            State::Held(_) => {
                // The statement ran outside the held transaction.
                if error {
                    self.failed = true;
                }
                if status != READY_IDLE {
                    self.opened(dest.clone());
                    return true;
                }
                false
            }
            State::One(b) if b == dest => {
                if status == READY_IDLE {
                    self.end();
                    return false;
                }
                self.aborted_there = status == READY_FAILED;
                true
            }
            State::One(_) => false,
            State::Many(parts) => {
                let mine = parts.contains(dest);
                // An error on one shard aborts the whole transaction, as on one server.
                if mine && (error || status == READY_FAILED) {
                    self.failed = true;
                }
                mine
            }
        }
    }

    /// Every connection of a transaction on several shards answered: the statuses decide whether it ended.
    pub fn ready_all(&mut self, statuses: &[u8]) {
        if matches!(self.state, State::Many(_)) && statuses.iter().all(|s| *s == READY_IDLE) {
            self.end();
        } else if matches!(self.state, State::Many(_)) && statuses.contains(&READY_FAILED) {
            self.failed = true;
        }
    }
}

/// A read ran outside the held transaction whose queue is `q` (see [`SNAPSHOT`]).
fn snapshot_taken(q: &mut Vec<String>) {
    if !q.iter().any(|x| x == SNAPSHOT) {
        q.push(SNAPSHOT.into());
    }
}

/// What of the held transaction's queue a shard joining later replays: all but NOTIFY, which the first shard
/// sent (listeners hear it once).
fn replayable(mut queue: Vec<String>) -> Vec<String> {
    queue.retain(|q| !shardmap::sql::first_word(q).eq_ignore_ascii_case("notify"));
    queue
}

trait Shards {
    fn shards_or_all(&self) -> Vec<ShardId>;
}

impl Shards for Decision {
    /// The shards a decision names; for `All`, none here: the caller takes every shard.
    fn shards_or_all(&self) -> Vec<ShardId> {
        match &self.target {
            Target::One(s) => vec![*s],
            Target::Set(s) => s.clone(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn decision(target: Target) -> Decision {
        Decision {
            target,
            values: Vec::new(),
            buckets: Vec::new(),
            regions: Vec::new(),
            database: None,
            reason: "test".into(),
            analysis: Arc::new(shardmap::sql::Analysis { statements: Vec::new(), hint: None, parse_error: None }),
        }
    }

    fn verb(v: TxnVerb) -> Stmt {
        Stmt { verb: Some(v), ..Stmt::default() }
    }

    fn names(s: ShardId) -> String {
        s.0.to_string()
    }

    fn one(s: u16) -> Dest {
        Dest { shard: ShardId(s), db: None }
    }

    #[test]
    fn begin_is_held_until_a_statement_names_a_shard() {
        let mut t = Txn::default();
        let session = decision(Target::Session);
        assert_eq!(t.plan(&verb(TxnVerb::Begin), Ok(&session), None, &names), Plan::Hold { tag: "BEGIN".into() });
        t.queue("BEGIN".into());
        let set = Stmt { queueable: true, tag: "SET".into(), ..Stmt::default() };
        assert_eq!(t.plan(&set, Ok(&session), None, &names), Plan::Hold { tag: "SET".into() });
        let keyed = decision(Target::One(ShardId(2)));
        assert_eq!(t.plan(&Stmt::default(), Ok(&keyed), None, &names), Plan::Run(To::Open(one(2))));
        t.opened(one(2));
        assert_eq!(t.plan(&Stmt::default(), Ok(&keyed), None, &names), Plan::Run(To::Bound));
        let other = decision(Target::One(ShardId(3)));
        assert!(matches!(t.plan(&Stmt::default(), Ok(&other), None, &names), Plan::Refuse(_)));
        // COMMIT is predicted to end it once sent: a pipeline's next statement is outside.
        assert_eq!(t.plan(&verb(TxnVerb::Commit), Ok(&session), None, &names), Plan::Run(To::Bound));
        t.sent(Some(&TxnVerb::Commit));
        assert_eq!(t.state, State::Idle);
        assert!(!t.ready(&one(2), READY_IDLE, false));
    }

    #[test]
    fn what_fails_on_the_server_stays_out_of_the_replay_log() {
        let mut t = Txn { two_phase: true, ..Txn::default() };
        let session = decision(Target::Session);
        t.plan(&verb(TxnVerb::Begin), Ok(&session), None, &names);
        t.queue("BEGIN".into());
        assert_eq!(
            t.plan(&Stmt::default(), Ok(&decision(Target::One(ShardId(1)))), None, &names),
            Plan::Run(To::Open(one(1)))
        );
        t.opened(one(1));
        let sp = Stmt { verb: Some(TxnVerb::Savepoint), replay: Some("SAVEPOINT a".into()), ..Stmt::default() };
        t.plan(&sp, Ok(&session), None, &names);
        // A SET its server refuses (a bad value) leaves the log again.
        let bad = Stmt { queueable: true, replay: Some("SET work_mem = 'bogus'".into()), ..Stmt::default() };
        assert_eq!(t.plan(&bad, Ok(&session), None, &names), Plan::Run(To::Bound));
        assert_eq!(t.queued(), ["BEGIN", "SAVEPOINT a", "SET work_mem = 'bogus'"]);
        t.unlog_failed();
        assert_eq!(t.queued(), ["BEGIN", "SAVEPOINT a"]);
        // Aborted on its server: what it refuses there (25P02) stays out, the ROLLBACK TO that mends it goes in.
        t.ready(&one(1), READY_FAILED, true);
        assert_eq!(t.plan(&sp, Ok(&session), None, &names), Plan::Run(To::Bound));
        let back =
            Stmt { verb: Some(TxnVerb::RollbackTo), replay: Some("ROLLBACK TO SAVEPOINT a".into()), ..Stmt::default() };
        assert_eq!(t.plan(&back, Ok(&session), None, &names), Plan::Run(To::Bound));
        assert_eq!(t.queued(), ["BEGIN", "SAVEPOINT a", "ROLLBACK TO SAVEPOINT a"]);
        // (Only the statement planned last can leave it.)
        t.unlog_failed();
        t.unlog_failed();
        assert_eq!(t.queued(), ["BEGIN", "SAVEPOINT a"]);
    }

    #[test]
    fn with_two_phase_commit_a_transaction_joins_the_shards_it_names() {
        let mut t = Txn { two_phase: true, ..Txn::default() };
        let session = decision(Target::Session);
        t.plan(&verb(TxnVerb::Begin), Ok(&session), None, &names);
        t.queue("BEGIN ISOLATION LEVEL REPEATABLE READ".into());
        t.queue("NOTIFY ch".into());
        let keyed = decision(Target::One(ShardId(1)));
        assert_eq!(t.plan(&Stmt::default(), Ok(&keyed), None, &names), Plan::Run(To::Open(one(1))));
        t.opened(one(1));
        // A SAVEPOINT goes where the transaction is, and into the replay log.
        let sp = Stmt { verb: Some(TxnVerb::Savepoint), replay: Some("SAVEPOINT a".into()), ..Stmt::default() };
        assert_eq!(t.plan(&sp, Ok(&session), None, &names), Plan::Run(To::Bound));
        assert_eq!(t.queued(), ["BEGIN ISOLATION LEVEL REPEATABLE READ", "SAVEPOINT a"]);
        // Another shard: joined (after the log), the transaction is on both.
        let other = decision(Target::One(ShardId(2)));
        assert_eq!(t.plan(&Stmt::default(), Ok(&other), None, &names), Plan::Run(To::Part(Some(ShardId(2)))));
        t.joined(one(2));
        assert_eq!(t.parts(), [one(1), one(2)]);
        // Keys on several shards, and DDL (every shard), join those.
        let set = decision(Target::Set(vec![ShardId(0), ShardId(1)]));
        assert_eq!(
            t.plan(&Stmt::default(), Ok(&set), None, &names),
            Plan::Run(To::Parts(vec![ShardId(0), ShardId(1)]))
        );
        assert_eq!(t.plan(&Stmt::default(), Ok(&decision(Target::All)), None, &names), Plan::Run(To::Parts(vec![])));
        // SET goes to every shard it is on; PREPARE TRANSACTION is refused; COMMIT is the router's.
        let set_stmt = Stmt { queueable: true, replay: Some("SET x = 1".into()), ..Stmt::default() };
        assert_eq!(t.plan(&set_stmt, Ok(&session), None, &names), Plan::Run(To::Every));
        assert!(matches!(t.plan(&verb(TxnVerb::Prepare("g".into())), Ok(&session), None, &names), Plan::Refuse(_)));
        // NOTIFY once (not once per shard).
        let notify = Stmt { queueable: true, tag: "NOTIFY".into(), ..Stmt::default() };
        assert_eq!(t.plan(&notify, Ok(&session), None, &names), Plan::Run(To::Part(Some(ShardId(0)))));
        assert_eq!(t.plan(&verb(TxnVerb::Commit), Ok(&session), None, &names), Plan::Run(To::Commit));
        // An error on one shard fails the whole transaction: COMMIT rolls back.
        assert!(t.ready(&one(2), READY_FAILED, true));
        assert!(t.failed);
        assert_eq!(t.plan(&verb(TxnVerb::Commit), Ok(&session), None, &names), Plan::Run(To::RollbackInstead));
        // A lost connection: the rest stays, failed.
        assert!(!t.lose(&one(2)));
        assert_eq!(t.parts(), [one(1)]);
        t.rolled_back();
        assert_eq!(t.state, State::Idle);
        assert!(t.queued().is_empty());
    }

    #[test]
    fn writes_on_several_shards_outside_a_transaction_get_the_routers_own() {
        let mut t = Txn { two_phase: true, ..Txn::default() };
        let set = decision(Target::Set(vec![ShardId(0), ShardId(1)]));
        assert_eq!(
            t.plan(&Stmt::default(), Ok(&set), None, &names),
            Plan::Run(To::OpenParts(vec![ShardId(0), ShardId(1)]))
        );
        assert!(t.implicit);
        assert_eq!(t.queued(), ["BEGIN"]);
        // Reads on several shards are not written: no transaction.
        let mut t = Txn { two_phase: true, ..Txn::default() };
        let read = Stmt { read: true, ..Stmt::default() };
        assert_eq!(t.plan(&read, Ok(&set), None, &names), Plan::Run(To::Fan(vec![ShardId(0), ShardId(1)])));
        assert!(!t.implicit);
    }

    #[test]
    fn the_routers_own_transaction_answers_as_postgresqls_implicit_one() {
        // A pipeline's writes on shards 1 and 2 made one transaction (`Session::implicit_to_own`).
        let open = || {
            let mut t = Txn { two_phase: true, ..Txn::default() };
            t.begin_implicit();
            t.opened(one(1));
            t.plan(&Stmt::default(), Ok(&decision(Target::One(ShardId(2)))), None, &names);
            t.joined(one(2));
            t
        };
        let session = decision(Target::Session);
        let mut t = open();
        assert!(t.implicit && matches!(t.state, State::Many(_)), "{:?}", t.state);
        // Savepoints need a transaction block; PREPARE TRANSACTION is the router's to do.
        for v in [TxnVerb::Savepoint, TxnVerb::Release, TxnVerb::RollbackTo] {
            let Plan::Refuse(e) = t.plan(&verb(v.clone()), Ok(&session), None, &names) else { panic!("{v:?}") };
            assert_eq!(e.code, "25P01", "{v:?}: {e:?}");
        }
        let Plan::Refuse(e) = t.plan(&verb(TxnVerb::Prepare("g".into())), Ok(&session), None, &names) else {
            panic!("PREPARE TRANSACTION")
        };
        assert_eq!(e.code, "0A000");
        // COMMIT ends it as the client's would (with two-phase commit).
        assert_eq!(t.plan(&verb(TxnVerb::Commit), Ok(&session), None, &names), Plan::Run(To::Commit));
        // BEGIN makes it the client's: answered, no warning; then a BEGIN is one inside a transaction.
        let mut t = open();
        assert_eq!(
            t.plan(&verb(TxnVerb::Begin), Ok(&session), None, &names),
            Plan::Answer { tag: "BEGIN".into(), warning: None }
        );
        assert!(!t.implicit && matches!(t.state, State::Many(_)));
        assert_ne!(
            t.plan(&verb(TxnVerb::Begin), Ok(&session), None, &names),
            Plan::Answer { tag: "BEGIN".into(), warning: None }
        );
    }

    #[test]
    fn an_aborted_transaction_on_one_shard_joins_no_other() {
        let mut t = Txn { two_phase: true, ..Txn::default() };
        let session = decision(Target::Session);
        t.plan(&verb(TxnVerb::Begin), Ok(&session), None, &names);
        t.opened(one(1));
        let other = decision(Target::One(ShardId(2)));
        let several = decision(Target::Set(vec![ShardId(2), ShardId(3)]));
        // Its server answered an error: the transaction is aborted there, and a statement for another shard
        // goes to that server, which answers it (25P02) without running it; nothing joins.
        assert!(t.ready(&one(1), READY_FAILED, true));
        assert_eq!(t.plan(&Stmt::default(), Ok(&other), None, &names), Plan::Run(To::Bound));
        assert_eq!(t.plan(&Stmt::default(), Ok(&several), None, &names), Plan::Run(To::Bound));
        assert_eq!(t.plan(&Stmt::default(), Err(Reported::new("42000", "no key")), None, &names), Plan::Run(To::Bound));
        assert_eq!(t.state, State::One(one(1)));
        // Back to a savepoint, the transaction goes on, and on to other shards.
        let back = Stmt { verb: Some(TxnVerb::RollbackTo), ..Stmt::default() };
        assert_eq!(t.plan(&back, Ok(&session), None, &names), Plan::Run(To::Bound));
        assert!(t.ready(&one(1), READY_IN_TX, false));
        assert_eq!(t.plan(&Stmt::default(), Ok(&other), None, &names), Plan::Run(To::Part(Some(ShardId(2)))));
    }

    #[test]
    fn a_held_transaction_keeps_its_savepoints() {
        let mut t = Txn::default();
        let session = decision(Target::Session);
        let sp = |v: TxnVerb, n: &str| Stmt { verb: Some(v), savepoint: Some(n.into()), ..Stmt::default() };
        let refused = |p: Plan| matches!(p, Plan::Refuse(e) if e.code == "3B001" && e.message.contains("\"a\""));
        t.plan(&verb(TxnVerb::Begin), Ok(&session), None, &names);
        // No savepoint of that name: PostgreSQL's error, and the transaction is aborted.
        assert!(refused(t.plan(&sp(TxnVerb::RollbackTo, "a"), Ok(&session), None, &names)));
        t.error_inside();
        assert!(refused(t.plan(&sp(TxnVerb::RollbackTo, "a"), Ok(&session), None, &names)));
        assert!(matches!(t.plan(&verb(TxnVerb::Rollback), Ok(&session), None, &names), Plan::Answer { .. }));
        t.plan(&verb(TxnVerb::Begin), Ok(&session), None, &names);
        let hold = |tag: &str| Plan::Hold { tag: tag.into() };
        assert_eq!(t.plan(&sp(TxnVerb::Savepoint, "a"), Ok(&session), None, &names), hold("SAVEPOINT"));
        assert_eq!(t.plan(&sp(TxnVerb::Savepoint, "b"), Ok(&session), None, &names), hold("SAVEPOINT"));
        assert_eq!(t.plan(&sp(TxnVerb::RollbackTo, "a"), Ok(&session), None, &names), hold("ROLLBACK"));
        // ROLLBACK TO a kept a and let go of b; RELEASE a lets go of a.
        assert!(matches!(t.plan(&sp(TxnVerb::Release, "b"), Ok(&session), None, &names), Plan::Refuse(_)));
        t.error_inside();
        assert_eq!(t.plan(&sp(TxnVerb::RollbackTo, "a"), Ok(&session), None, &names), hold("ROLLBACK"));
        assert!(!t.failed);
        assert_eq!(t.plan(&sp(TxnVerb::Release, "a"), Ok(&session), None, &names), hold("RELEASE"));
        assert!(refused(t.plan(&sp(TxnVerb::Release, "a"), Ok(&session), None, &names)));
    }

    #[test]
    fn a_fixed_destination_sends_begin_as_is() {
        let mut t = Txn::default();
        let session = decision(Target::Session);
        assert_eq!(t.plan(&verb(TxnVerb::Begin), Ok(&session), Some(&one(0)), &names), Plan::Run(To::Once(one(0))));
        assert!(t.ready(&one(0), READY_IN_TX, false));
        assert_eq!(
            t.plan(&Stmt { queueable: true, ..Stmt::default() }, Ok(&session), Some(&one(0)), &names),
            Plan::Run(To::Bound)
        );
    }

    #[test]
    fn commit_of_a_failed_transaction_rolls_back() {
        let mut t = Txn::default();
        let session = decision(Target::Session);
        t.plan(&verb(TxnVerb::Begin), Ok(&session), None, &names);
        t.opened(one(1));
        t.error_inside();
        assert_eq!(t.status(std::iter::once(READY_IN_TX)), READY_FAILED);
        let select = decision(Target::One(ShardId(1)));
        assert!(matches!(t.plan(&Stmt::default(), Ok(&select), None, &names), Plan::Refuse(e) if e.code == "25P02"));
        assert_eq!(t.plan(&verb(TxnVerb::Commit), Ok(&session), None, &names), Plan::Run(To::RollbackInstead));
        // Held and failed: answered here.
        let mut t = Txn::default();
        t.plan(&verb(TxnVerb::Begin), Ok(&session), None, &names);
        t.error_inside();
        assert_eq!(
            t.plan(&verb(TxnVerb::Commit), Ok(&session), None, &names),
            Plan::Answer { tag: "ROLLBACK".into(), warning: None }
        );
        assert_eq!(t.state, State::Idle);
        assert!(!t.failed);
    }

    #[test]
    fn ddl_opens_every_shard_and_unparsed_statements_follow_the_transaction() {
        let mut t = Txn::default();
        let session = decision(Target::Session);
        t.plan(&verb(TxnVerb::Begin), Ok(&session), None, &names);
        let ddl = decision(Target::All);
        assert_eq!(t.plan(&Stmt::default(), Ok(&ddl), None, &names), Plan::Run(To::OpenParts(vec![])));
        t.joined(one(0));
        t.joined(one(1));
        assert_eq!(
            t.plan(&Stmt::default(), Ok(&decision(Target::One(ShardId(1)))), None, &names),
            Plan::Run(To::Part(Some(ShardId(1))))
        );
        let mut t = Txn { state: State::One(one(1)), ..Txn::default() };
        let unparsed = Stmt { unparsed: true, ..Stmt::default() };
        assert_eq!(t.plan(&unparsed, Err(Reported::unsupported("x")), None, &names), Plan::Run(To::Bound));
        assert!(matches!(
            Txn::default().plan(&unparsed, Err(Reported::unsupported("x")), None, &names),
            Plan::Refuse(_)
        ));
    }
}
