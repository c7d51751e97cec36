//! The planner: SQL text (parsed once, then cached by text) plus Bind parameters plus session state gives a
//! [`Decision`]. The cache is bounded in entries and in statement size, so hostile input costs a bounded
//! amount of memory; a cached decision costs a hash lookup plus reading the parameters.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::config::Strategy;
use crate::decision::{Decision, RouteError, Target};
use crate::map::{ShardId, ShardMap};
use crate::shape::{Literal, LITERAL_BASE};
use crate::sql::{self, Analysis, Cross, Hint, KeyExpr, Keys, Kind, SessionChange, StatementAnalysis, Tables};
use crate::value::{KeyType, KeyValue, ParamError};

/// Entries kept in the parse cache.
pub const CACHE_ENTRIES: usize = 4096;
/// Statements longer than this are analysed every time rather than cached (they are rarely repeated, and
/// caching them would let a client pin a lot of memory).
pub const CACHE_MAX_TEXT: usize = 8192;

/// What routing needs of a client's session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Session {
    /// The database named at startup.
    pub database: Option<String>,
    /// `SET gb.shard_key = ...`.
    pub shard_key: Option<KeyValue>,
    /// `SET gb.tenant = ...`.
    pub tenant: Option<String>,
    /// The zero-based position of each table's key among its columns (`None`: it has none), as the router
    /// read it from the server, for `INSERT INTO table VALUES (...)` without a column list.
    pub key_positions: std::collections::HashMap<String, Option<usize>>,
    /// What the relations that reads spanning shards name are on the servers (by the name as written), as
    /// the router learnt them from a shard; `None`: every name is taken for a sharded table (`explain`).
    pub relations: Option<std::collections::HashMap<String, Relation>>,
}

/// What a name that a read takes for a sharded table is on the servers. The statement's text does not tell a
/// table from a view, a sequence or a foreign table, and only a sharded table's rows (or those of a view
/// that reads them row by row) are on each shard that shard's part of the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Relation {
    /// A table (or a name the server does not know: its own error answers), or a view whose rows on each
    /// shard are that shard's part of its rows: scans, filters, joins on the key, GROUP BY the key (what a
    /// read across shards concatenates).
    Sharded,
    /// A view that reads no sharded table: every shard has the same rows, as for a global table.
    Global,
    /// A sequence: the first shard's is the one `nextval()` advances.
    Sequence,
    /// A relation whose rows on each shard are not a part of one answer, and what it is, for the refusal:
    /// a view whose rows each shard computes from its own part (aggregates, LIMIT, ...), a foreign table.
    Opaque(String),
}

impl Session {
    /// Applies a statement's session change (`SET gb.shard_key`, `SET gb.tenant`, their RESET).
    pub fn apply(&mut self, change: &SessionChange, map: &ShardMap) -> Result<(), RouteError> {
        match change {
            SessionChange::ShardKey(None) => self.shard_key = None,
            SessionChange::ShardKey(Some(v)) => {
                let kv =
                    KeyValue::from_text(v, map.key_type).map_err(|why| RouteError::BadKey { value: v.clone(), why })?;
                self.shard_key = Some(kv);
            }
            SessionChange::Tenant(t) => self.tenant = t.clone(),
        }
        Ok(())
    }
}

/// One Bind parameter: its bytes (`None` for NULL), whether it is in binary format, and its type OID from
/// Parse (0 when the client left it to the server).
#[derive(Clone, Copy, Debug)]
pub struct Param<'a> {
    pub value: Option<&'a [u8]>,
    pub binary: bool,
    pub oid: u32,
}

/// Bind parameters, as the router holds them (slices of the Bind message, no copy).
pub trait Params {
    fn param(&self, index: usize) -> Option<Param<'_>>;

    /// A literal taken out of the statement's text by [`crate::shape::normalize`] (index from
    /// [`LITERAL_BASE`]).
    fn literal(&self, _index: usize) -> Option<&Literal<'_>> {
        None
    }
}

/// `setting` with the names its statement's parameters give read from `params` (see `Setting::SetBound`): a
/// name not bound, or not text, makes it `SetSome`.
pub fn named_setting(setting: &crate::sql::Setting, params: &dyn Params) -> crate::sql::Setting {
    use crate::sql::{Setting, SettingName};
    let Setting::SetBound(names) = setting else { return setting.clone() };
    let name = |n: &SettingName| match n {
        SettingName::Named(n) => Some(n.clone()),
        SettingName::Param(i) if *i >= LITERAL_BASE => {
            params.literal(*i).filter(|l| !l.number).map(|l| l.text.to_lowercase())
        }
        SettingName::Param(i) => {
            params.param(*i)?.value.and_then(|v| std::str::from_utf8(v).ok()).map(str::to_lowercase)
        }
    };
    names.iter().map(name).collect::<Option<Vec<_>>>().map_or(Setting::SetSome, Setting::Set)
}

/// The literals of a simple-protocol statement, as virtual parameters of its shape.
pub struct LiteralParams<'a>(pub &'a [Literal<'a>]);

impl Params for LiteralParams<'_> {
    fn param(&self, _: usize) -> Option<Param<'_>> {
        None
    }

    fn literal(&self, index: usize) -> Option<&Literal<'_>> {
        index.checked_sub(LITERAL_BASE).and_then(|i| self.0.get(i))
    }
}

/// No parameters (simple query protocol).
pub struct NoParams;

impl Params for NoParams {
    fn param(&self, _: usize) -> Option<Param<'_>> {
        None
    }
}

/// Text-format parameters, for `explain --param` and tests.
pub struct TextParams(pub Vec<Option<String>>);

impl Params for TextParams {
    fn param(&self, index: usize) -> Option<Param<'_>> {
        self.0.get(index).map(|v| Param { value: v.as_deref().map(str::as_bytes), binary: false, oid: 0 })
    }
}

/// Entries kept in each thread's own cache, in front of the planner's (see [`Planner::analyze`]).
pub const THREAD_CACHE_ENTRIES: usize = 512;

type Cache = LruCache<Box<str>, Arc<Analysis>, foldhash::fast::RandomState>;

/// Turns statements into decisions.
pub struct Planner {
    map: Arc<ShardMap>,
    /// The cache all threads share...
    cache: Mutex<Cache>,
    /// ...and the name of this planner in each thread's own cache.
    id: u64,
}

/// A thread's own cache of analyses, for one planner at a time: looked up first, with no lock, and holding
/// this thread's own copies (their reference counts are touched by this thread only).
struct ThreadCache {
    planner: u64,
    cache: Cache,
}

thread_local! {
    static THREAD_CACHE: std::cell::RefCell<Option<ThreadCache>> = const { std::cell::RefCell::new(None) };
    /// The reason of every decision on a one-node map, made once per thread (not allocated per statement,
    /// and its reference count not shared between threads).
    static ONLY_NODE: Arc<str> = Arc::from("the only node");
}

static PLANNERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Planner {
    pub fn new(map: Arc<ShardMap>) -> Planner {
        let cap = NonZeroUsize::new(CACHE_ENTRIES).expect("non-zero");
        Planner {
            map,
            cache: Mutex::new(LruCache::with_hasher(cap, foldhash::fast::RandomState::default())),
            id: PLANNERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    pub fn map(&self) -> &Arc<ShardMap> {
        &self.map
    }

    /// The analysis of a statement text, from the caches or parsed now.
    ///
    /// Two levels: this thread's own cache first (no lock, nothing another thread writes: the lookup of
    /// every statement on a many-core router), then the planner's, shared by all threads (a lock), which
    /// saves a thread the parse of a text another thread has seen. What a thread takes from the shared cache
    /// it copies into its own, with reference counts of its own: otherwise every thread would count
    /// references to the same analysis on every statement, and the count's cache line would go from core to
    /// core. (Measured by the `hotpath` bench's two-thread case: see docs/performance.md.)
    pub fn analyze(&self, text: &str) -> Arc<Analysis> {
        if text.len() > CACHE_MAX_TEXT {
            return self.analyze_uncached(text);
        }
        let mine = THREAD_CACHE.with(|c| {
            let mut c = c.try_borrow_mut().ok()?;
            let c = c.as_mut().filter(|c| c.planner == self.id)?;
            c.cache.get(text).cloned()
        });
        if let Some(a) = mine {
            return a;
        }
        let shared = self.cache.lock().expect("cache lock").get(text).cloned();
        let a = match shared {
            Some(a) => Arc::new(a.copy_for_thread()),
            None => {
                let a = self.analyze_uncached(text);
                self.cache.lock().expect("cache lock").put(text.into(), a.clone());
                Arc::new(a.copy_for_thread())
            }
        };
        THREAD_CACHE.with(|c| {
            let Ok(mut c) = c.try_borrow_mut() else { return };
            let c = match &mut *c {
                Some(c) if c.planner == self.id => c,
                other => other.insert(ThreadCache {
                    planner: self.id,
                    cache: LruCache::with_hasher(
                        NonZeroUsize::new(THREAD_CACHE_ENTRIES).expect("non-zero"),
                        foldhash::fast::RandomState::default(),
                    ),
                }),
            };
            c.cache.put(text.into(), a.clone());
        });
        a
    }

    /// Parses and analyses a statement text without looking in or filling the cache.
    pub fn analyze_uncached(&self, text: &str) -> Arc<Analysis> {
        let m = &self.map;
        Arc::new(sql::analyze_keys(text, &m.key, &m.table_keys, m.key_type, &m.global_tables))
    }

    /// The analysis of a simple-protocol statement: by its shape (literals taken out, into `lits`, so that
    /// statements differing only in their values share one parse), or by its text when it has no usable shape
    /// (`lits` left empty). (`lits` is the caller's, emptied first: one it keeps from statement to statement,
    /// see [`crate::shape::spare`], costs no allocation per statement.)
    pub fn analyze_simple<'t>(&self, text: &'t str, lits: &mut Vec<Literal<'t>>) -> Arc<Analysis> {
        thread_local! {
            // The shape is only a key to look the analysis up by: written into a buffer kept per thread, it
            // costs no allocation when the analysis is cached.
            static SHAPE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        lits.clear();
        let shaped = SHAPE.with(|shape| {
            let Ok(mut shape) = shape.try_borrow_mut() else { return None };
            if !crate::shape::normalize_into(text, &mut shape, lits) || lits.is_empty() {
                return None;
            }
            let a = self.analyze(&shape);
            // (A long statement's buffer is not kept.)
            if shape.capacity() > 64 << 10 {
                *shape = String::new();
            }
            a.parse_error.is_none().then_some(a)
        });
        match shaped {
            Some(a) => a,
            None => {
                lits.clear();
                self.analyze(text)
            }
        }
    }

    /// What a view or materialized view defined by `def` (as `pg_get_viewdef` gives it) is to a read across
    /// shards (see [`Relation`]), given what the relations it reads are: `Err` with those not known yet.
    /// Each shard computes the view from its own rows, so a view is a sharded table's like only when its rows
    /// are each shard's part of its rows (what a read across shards would concatenate).
    pub fn view_relation(
        &self,
        def: &str,
        known: &std::collections::HashMap<String, Relation>,
    ) -> Result<Relation, Vec<String>> {
        let opaque = |why: String| Ok(Relation::Opaque(format!("a view {why}")));
        let a = self.analyze(def);
        let [st] = &a.statements[..] else { return opaque("the router cannot read".into()) };
        if a.parse_error.is_some() || st.kind != Kind::Read {
            return opaque("the router cannot read".into());
        }
        if let Some(f) = st.shared_call {
            return opaque(format!("calling {f}()"));
        }
        if !matches!(st.tables, Tables::Sharded(_)) {
            return Ok(Relation::Global);
        }
        let unknown: Vec<String> = st.relations.iter().filter(|n| !known.contains_key(*n)).cloned().collect();
        if !unknown.is_empty() {
            return Err(unknown);
        }
        let mut sharded = false;
        for name in &st.relations {
            match &known[name] {
                Relation::Sharded => sharded = true,
                Relation::Global => {}
                Relation::Sequence => return opaque(format!("reading the sequence {name}")),
                Relation::Opaque(what) => return opaque(format!("reading {name}, {what}")),
            }
        }
        if !sharded {
            return Ok(Relation::Global);
        }
        if let Some(why) = &st.refusal {
            return opaque(format!("that cannot be routed ({why})"));
        }
        match &st.cross {
            Cross::Concat => Ok(Relation::Sharded),
            Cross::Combine => opaque(
                "whose rows each shard computes from its own part (aggregates, GROUP BY, DISTINCT, ORDER BY or LIMIT)"
                    .into(),
            ),
            Cross::Refuse(why) => opaque(format!("with {why}")),
        }
    }

    /// Where every statement of `session` goes when that is known whatever the statement: the only node, or
    /// the tenant's database (named at connection or by `SET gb.tenant`). The router then relays the session
    /// as it is, without holding BEGIN.
    pub fn fixed(&self, session: &Session) -> Option<(ShardId, Option<String>)> {
        let map = &self.map;
        if map.strategy == Strategy::Tenant {
            let tenant = session.tenant.clone().or_else(|| {
                session.database.as_deref().and_then(|db| map.tenant_of_database(db)).map(str::to_string)
            })?;
            return Some((map.tenant_shard(&tenant), Some(format!("{}{tenant}", map.tenant_prefix))));
        }
        (map.nodes.len() == 1).then_some((ShardId(0), None))
    }

    /// Routes a simple-protocol statement (see [`Planner::analyze_simple`]).
    pub fn decide_simple(&self, text: &str, session: &Session) -> Result<Decision, RouteError> {
        let mut lits = Vec::new();
        let a = self.analyze_simple(text, &mut lits);
        self.decide_with_literals(&a, &lits, session)
    }

    /// Routes an analysis made by [`Planner::analyze_simple`] with its literals.
    pub fn decide_with_literals(
        &self,
        a: &Arc<Analysis>,
        lits: &[Literal],
        session: &Session,
    ) -> Result<Decision, RouteError> {
        let mut d = self.decide_shaped(a, lits, session)?;
        if !lits.is_empty() && d.reason.contains('$') {
            d.reason = crate::shape::render(&d.reason, lits).into();
        }
        Ok(d)
    }

    /// Like [`Planner::decide_with_literals`], but the decision's reason keeps the shape's placeholders
    /// (`aid = $100001`): rendering it costs two allocations, which the router's hot path skips and pays only
    /// when it shows the reason ([`crate::shape::render`]). Errors are rendered.
    pub fn decide_shaped(
        &self,
        a: &Arc<Analysis>,
        lits: &[Literal],
        session: &Session,
    ) -> Result<Decision, RouteError> {
        if lits.is_empty() {
            return self.decide_analyzed(a, &NoParams, session);
        }
        self.decide_analyzed(a, &LiteralParams(lits), session).map_err(|e| match e {
            RouteError::SpansShards { what, shards } => {
                RouteError::SpansShards { what: crate::shape::render(&what, lits), shards }
            }
            e => e,
        })
    }

    /// Routes a statement text.
    pub fn decide(&self, text: &str, params: &dyn Params, session: &Session) -> Result<Decision, RouteError> {
        let a = self.analyze(text);
        self.decide_analyzed(&a, params, session)
    }

    /// Routes an analysed statement (a prepared statement's analysis is kept by the router, so each Execute
    /// costs only this).
    pub fn decide_analyzed(
        &self,
        a: &Arc<Analysis>,
        params: &dyn Params,
        session: &Session,
    ) -> Result<Decision, RouteError> {
        let mut statements = a.statements.iter();
        let first = statements.next();
        let mut d = match first {
            Some(st) => self.decide_one(a, st, params, session)?,
            None => return Ok(self.decision(a, Target::Any, "empty query")),
        };
        for st in statements {
            let next = self.decide_one(a, st, params, session)?;
            d = self.combine(d, next)?;
        }
        if d.target == Target::All && self.map.nodes.len() == 1 {
            // With one shard, "every shard" is that shard (a transaction on it may go on).
            d.target = Target::One(ShardId(0));
        }
        Ok(d)
    }

    fn decision(&self, a: &Arc<Analysis>, target: Target, reason: impl Into<Arc<str>>) -> Decision {
        Decision {
            target,
            values: Vec::new(),
            buckets: Vec::new(),
            regions: Vec::new(),
            database: None,
            reason: reason.into(),
            analysis: a.clone(),
        }
    }

    /// Statements of one query string must agree on a place.
    fn combine(&self, a: Decision, b: Decision) -> Result<Decision, RouteError> {
        use Target::*;
        let keep_a = match (&a.target, &b.target) {
            (_, Session) | (_, Any) => true,
            (Session, _) | (Any, _) => false,
            (x, y) if x == y => true,
            _ => {
                let names = |d: &Decision| match &d.target {
                    All => "all".to_string(),
                    _ => {
                        d.shards(&self.map).iter().map(|s| self.map.node(*s).name.clone()).collect::<Vec<_>>().join(",")
                    }
                };
                return Err(RouteError::SpansShards {
                    what: "the multi-statement query".into(),
                    shards: format!("{} and {}", names(&a), names(&b)),
                });
            }
        };
        let (mut keep, other) = if keep_a { (a, b) } else { (b, a) };
        keep.values.extend(other.values);
        keep.buckets.extend(other.buckets);
        keep.regions.extend(other.regions);
        if keep.database.is_none() {
            keep.database = other.database;
        }
        Ok(keep)
    }

    fn decide_one(
        &self,
        a: &Arc<Analysis>,
        st: &StatementAnalysis,
        params: &dyn Params,
        session: &Session,
    ) -> Result<Decision, RouteError> {
        // (NOTIFY is a session statement that goes to the first shard, where listeners are.)
        let follows_session =
            matches!(st.kind, Kind::Transaction | Kind::Session | Kind::Cursor) && !st.on_first_shard();
        if self.map.nodes.len() == 1 && self.map.strategy != Strategy::Tenant {
            // One node: every statement goes there, as the client wrote it (PostgreSQL answers it).
            let target = if follows_session { Target::Session } else { Target::One(ShardId(0)) };
            return Ok(self.decision(a, target, ONLY_NODE.with(Arc::clone)));
        }
        if self.map.strategy == Strategy::Tenant {
            // The tenant's database answers whatever it is sent: only refusals about keys stand.
            if st.refusal.is_some() && a.parse_error.is_none() && st.kind != Kind::CopyIn && a.hint.is_none() {
                return Err(RouteError::Refused(st.refusal.clone().expect("checked")));
            }
            return self.decide_tenant(a, st, params, session);
        }
        if let Some(r) = &st.refusal {
            if a.hint.is_none() || matches!(st.kind, Kind::CopyIn) {
                return Err(RouteError::Refused(r.clone()));
            }
        }
        if follows_session {
            return Ok(self.decision(a, Target::Session, st.reason.clone()));
        }
        if let Some(h) = &a.hint {
            return self.by_hint(a, h);
        }
        match (st.kind, &st.tables) {
            (Kind::Ddl, _) => return Ok(self.decision(a, Target::All, st.reason.clone())),
            (Kind::CopyIn, _) => return Ok(self.decision(a, Target::All, st.reason.clone())),
            _ if st.on_first_shard() => {
                let f = st.shared_call.unwrap_or_default();
                let what = if f == "NOTIFY" { f.to_string() } else { format!("{f}()") };
                let why = format!("{what}: sequences, advisory locks and notifications are the first shard's");
                return Ok(self.decision(a, Target::One(ShardId(0)), why));
            }
            (Kind::Read, Tables::None | Tables::Global) => return Ok(self.decision(a, Target::Any, st.reason.clone())),
            (_, Tables::None) => return Ok(self.decision(a, Target::Any, st.reason.clone())),
            (Kind::Write, Tables::Global) => {
                if let Some(why) = &st.global_refusal {
                    return Err(RouteError::Refused(why.clone()));
                }
                return Ok(self.decision(a, Target::All, st.reason.clone()));
            }
            _ => {}
        }
        let positional;
        let keys = match (&st.keys, &st.positional, &st.tables) {
            (Keys::None, Some(rows), Tables::Sharded(t)) => {
                let key = self.map.key_of(t);
                positional = match session.key_positions.get(t) {
                    None => return Err(RouteError::KeyPosition { table: t.clone() }),
                    Some(None) => {
                        return Err(RouteError::Refused(format!("table {t} has no column {key}, its shard key")))
                    }
                    Some(Some(pos)) => {
                        let mut keys = Vec::with_capacity(rows.len());
                        for (n, row) in rows.iter().enumerate() {
                            match row.get(*pos) {
                                Some(Some(k)) => keys.push(k.clone()),
                                _ => {
                                    return Err(RouteError::Refused(format!(
                                        "INSERT into {t}: row {} gives {key} (column {}) as something other than a value or parameter; compute the key in the client",
                                        n + 1,
                                        pos + 1
                                    )))
                                }
                            }
                        }
                        Keys::Some(keys)
                    }
                };
                &positional
            }
            (keys, _, _) => keys,
        };
        let values = match keys {
            Keys::Some(exprs) => self.values(exprs, params)?,
            Keys::None => match &session.shard_key {
                Some(k) => {
                    let mut d = self.place(a, vec![k.clone()], st)?;
                    d.reason = format!("session gb.shard_key = {k}").into();
                    return Ok(d);
                }
                None if st.kind == Kind::Read => {
                    return self.spanning(
                        a,
                        st,
                        self.decision(a, Target::All, format!("{}: every shard", st.reason)),
                        session,
                    )
                }
                None => {
                    return Err(RouteError::MissingKey {
                        statement: "a write to a sharded table",
                        key: match &st.tables {
                            Tables::Sharded(t) => self.map.key_of(t).to_string(),
                            _ => self.map.key.clone(),
                        },
                        reason: st.reason.to_string(),
                    });
                }
            },
        };
        if values.is_empty() {
            // `key IN ()` or an empty array: no row can match; any shard answers.
            return Ok(self.decision(a, Target::Any, st.reason.clone()));
        }
        let d = self.place(a, values, st)?;
        // With two-phase commit, UPDATE and DELETE with keys on several shards run on each of them, and an
        // INSERT's rows are split by shard (`sql::split_insert`); both commit atomically.
        let spans_ok = self.map.two_phase && a.statements.len() == 1 && (!st.insert || st.insert_rows) && !st.whole;
        if let (Kind::Write, Target::Set(shards)) = (st.kind, &d.target) {
            if !spans_ok {
                let names: Vec<&str> = shards.iter().map(|s| self.map.node(*s).name.as_str()).collect();
                let what = match &st.tables {
                    Tables::Sharded(t) => format!("the write to {t} ({})", st.reason),
                    _ => "the write".into(),
                };
                return Err(RouteError::SpansShards { what, shards: names.join(", ") });
            }
            if let Cross::Refuse(why) = &st.cross {
                return Err(RouteError::Refused(format!(
                    "{why} in a write on several shards is not supported: each shard would write from its own part of what it reads; write each {} in a statement of its own",
                    self.map.key
                )));
            }
        }
        self.spanning(a, st, d, session)
    }

    /// A read spanning shards, by what the relations it names are (see [`Relation`]): views that read no
    /// sharded table are any shard's, a sequence is the first shard's, and a relation whose rows on each
    /// shard are not its part of the answer is refused. Names the session has not learnt yet:
    /// [`RouteError::Relations`], for the router to ask a shard.
    fn by_relations(
        &self,
        a: &Arc<Analysis>,
        st: &StatementAnalysis,
        known: &std::collections::HashMap<String, Relation>,
        d: Decision,
    ) -> Result<Decision, RouteError> {
        let mut unknown = Vec::new();
        let (mut sharded, mut sequence) = (false, None);
        for name in &st.relations {
            match known.get(name) {
                None => unknown.push(name.clone()),
                Some(Relation::Sharded) => sharded = true,
                Some(Relation::Global) => {}
                Some(Relation::Sequence) => {
                    sequence.get_or_insert(name);
                }
                Some(Relation::Opaque(what)) => {
                    return Err(RouteError::Refused(format!(
                        "reading {name} across shards is not supported: it is {what}, so each shard's rows of it are not that shard's part of one PostgreSQL's answer; add a {} condition to read one shard",
                        self.map.key
                    )))
                }
            }
        }
        if !unknown.is_empty() {
            return Err(RouteError::Relations { names: unknown });
        }
        match (sharded, sequence) {
            (true, None) => Ok(d),
            (true, Some(s)) => Err(RouteError::Refused(format!(
                "reading the sequence {s} with sharded tables across shards is not supported: every shard has its own {s}, and the one nextval() advances is the first shard's; read it in a statement of its own"
            ))),
            (false, Some(s)) => Ok(self.decision(
                a,
                Target::One(ShardId(0)),
                format!("the sequence {s}: the first shard's, where nextval() advances it"),
            )),
            (false, None) => Ok(self.decision(a, Target::Any, "views that read no sharded table: any shard")),
        }
    }

    /// A read on several shards: refused when no combination of the shards' answers is the answer one
    /// PostgreSQL would give (see [`Cross`]).
    fn spanning(
        &self,
        a: &Arc<Analysis>,
        st: &StatementAnalysis,
        d: Decision,
        session: &Session,
    ) -> Result<Decision, RouteError> {
        if st.kind != Kind::Read || !matches!(d.target, Target::All | Target::Set(_)) {
            return Ok(d);
        }
        let key = &self.map.key;
        let d = match &session.relations {
            Some(known) if !st.relations.is_empty() => self.by_relations(a, st, known, d)?,
            _ => d,
        };
        if !matches!(d.target, Target::All | Target::Set(_)) {
            return Ok(d);
        }
        if let Some(f) = st.shared_call {
            return Err(RouteError::Refused(format!(
                "{f}() in a read across shards is not supported: every shard has its own sequences and advisory locks, so each shard's calls would not be one PostgreSQL's; call it in a statement of its own, or add a {key} condition to read one shard"
            )));
        }
        match &st.cross {
            Cross::Concat => Ok(d),
            Cross::Refuse(why) => Err(RouteError::Refused(format!(
                "{why} across shards is not supported: the shards' answers cannot be combined into one PostgreSQL's answer; add a {key} condition to read one shard"
            ))),
            Cross::Combine if a.statements.len() > 1 => Err(RouteError::Refused(
                "a statement that combines rows of several shards (aggregates, GROUP BY, DISTINCT, ORDER BY, LIMIT) in a multi-statement query is not supported; send it alone".into(),
            )),
            Cross::Combine => Ok(d),
        }
    }

    /// Reads key values out of literals and parameters.
    fn values(&self, exprs: &[KeyExpr], params: &dyn Params) -> Result<Vec<KeyValue>, RouteError> {
        let mut out = Vec::with_capacity(exprs.len());
        for e in exprs {
            match e {
                KeyExpr::Value(v) => out.push(v.clone()),
                KeyExpr::Param(i) => out.push(self.param(*i, params)?),
                KeyExpr::Bad { value, why } => {
                    return Err(RouteError::BadKey { value: value.clone(), why: why.clone() })
                }
                KeyExpr::ArrayParam(i) if *i >= LITERAL_BASE => {
                    let lit =
                        params.literal(*i).ok_or_else(|| ParamError { index: i + 1, what: "not bound".into() })?;
                    let vs = KeyValue::array_from_param(lit.text.as_bytes(), false, self.map.key_type)
                        .map_err(|why| RouteError::BadKey { value: lit.text.to_string(), why })?;
                    out.extend(vs);
                }
                KeyExpr::ArrayParam(i) => {
                    let p = params.param(*i).ok_or_else(|| ParamError { index: i + 1, what: "not bound".into() })?;
                    let bytes = p
                        .value
                        .ok_or_else(|| ParamError { index: i + 1, what: "NULL is not a list of shard keys".into() })?;
                    let vs = KeyValue::array_from_param(bytes, p.binary, self.map.key_type)
                        .map_err(|what| ParamError { index: i + 1, what })?;
                    out.extend(vs);
                }
            }
        }
        Ok(out)
    }

    fn param(&self, i: usize, params: &dyn Params) -> Result<KeyValue, RouteError> {
        if i >= LITERAL_BASE {
            let lit = params.literal(i).ok_or_else(|| ParamError { index: i + 1, what: "not bound".into() })?;
            // The same rules as for a literal analysed in place (`sql::Ctx::key_value`).
            let bad = |why: String| RouteError::BadKey { value: lit.text.to_string(), why };
            return match (lit.number, self.map.key_type) {
                (true, KeyType::Auto | KeyType::Int) => lit
                    .text
                    .parse::<i64>()
                    .map(KeyValue::Int)
                    .map_err(|_| bad(format!("{} is not an integer key", lit.text))),
                _ => KeyValue::from_text(&lit.text, self.map.key_type).map_err(bad),
            };
        }
        let p = params.param(i).ok_or_else(|| ParamError { index: i + 1, what: "not bound".into() })?;
        let bytes = p.value.ok_or_else(|| ParamError { index: i + 1, what: "NULL is not a shard key".into() })?;
        let v = if p.binary {
            KeyValue::from_binary(bytes, p.oid, self.map.key_type)
        } else {
            std::str::from_utf8(bytes)
                .map_err(|_| "text that is not UTF-8".to_string())
                .and_then(|s| KeyValue::from_text(s, self.map.key_type))
        };
        Ok(v.map_err(|what| ParamError { index: i + 1, what })?)
    }

    /// Places key values on shards.
    fn place(&self, a: &Arc<Analysis>, values: Vec<KeyValue>, st: &StatementAnalysis) -> Result<Decision, RouteError> {
        let mut d = self.decision(a, Target::Any, st.reason.clone());
        // The first value's shard, and every shard once a second one shows up (no list for the usual one).
        let mut first: Option<ShardId> = None;
        let mut shards: Vec<ShardId> = Vec::new();
        for v in &values {
            let loc = self.map.locate(v)?;
            if let Some(b) = loc.bucket {
                d.buckets.push(b);
            }
            if self.map.strategy == Strategy::Geo {
                d.regions.push(loc.region.unwrap_or_else(|| Arc::from("default")));
            }
            match first {
                None => first = Some(loc.shard),
                Some(f) if f == loc.shard => {}
                Some(f) => {
                    if shards.is_empty() {
                        shards.push(f);
                    }
                    if !shards.contains(&loc.shard) {
                        shards.push(loc.shard);
                    }
                }
            }
        }
        d.target = match first {
            Some(one) if shards.is_empty() => Target::One(one),
            _ => {
                shards.sort_unstable();
                Target::Set(shards)
            }
        };
        d.values = values;
        Ok(d)
    }

    fn by_hint(&self, a: &Arc<Analysis>, h: &Hint) -> Result<Decision, RouteError> {
        match h {
            Hint::Shard(name) => {
                let s = self.map.shard_by_name(name).ok_or_else(|| RouteError::UnknownShard(name.clone()))?;
                Ok(self.decision(a, Target::One(s), format!("hint shard: {name}")))
            }
            Hint::AllShards => Ok(self.decision(a, Target::All, "hint shards: all")),
            Hint::ShardKey(v) | Hint::Tenant(v) => {
                let kv = KeyValue::from_text(v, self.map.key_type)
                    .map_err(|why| RouteError::BadKey { value: v.clone(), why })?;
                let st = StatementAnalysis::new(Kind::Read, String::new());
                let mut d = self.place(a, vec![kv], &st)?;
                d.reason = format!("hint shard_key: {v}").into();
                Ok(d)
            }
        }
    }

    /// Tenant strategy: the tenant names a database on one node.
    fn decide_tenant(
        &self,
        a: &Arc<Analysis>,
        st: &StatementAnalysis,
        params: &dyn Params,
        session: &Session,
    ) -> Result<Decision, RouteError> {
        let mut reason = String::new();
        let mut tenant: Option<String> = None;
        if let Some(Hint::Tenant(t) | Hint::ShardKey(t)) = &a.hint {
            tenant = Some(t.clone());
            reason = format!("hint tenant: {t}");
        }
        if tenant.is_none() {
            if let Keys::Some(exprs) = &st.keys {
                let values = self.values(exprs, params)?;
                let mut names: Vec<String> = values.iter().map(|v| v.to_string()).collect();
                names.dedup();
                if names.len() > 1 {
                    return Err(RouteError::SpansShards {
                        what: "the statement".into(),
                        shards: format!("tenants {}", names.join(", ")),
                    });
                }
                if let Some(t) = names.pop() {
                    reason = st.reason.to_string();
                    tenant = Some(t);
                }
            }
        }
        if tenant.is_none() {
            if let Some(t) = &session.tenant {
                tenant = Some(t.clone());
                reason = format!("session gb.tenant = {t}");
            }
        }
        if tenant.is_none() {
            if let Some(t) = session.database.as_deref().and_then(|db| self.map.tenant_of_database(db)) {
                tenant = Some(t.to_string());
                reason = format!("database {}", session.database.as_deref().unwrap_or_default());
            }
        }
        let Some(tenant) = tenant else {
            if matches!(st.kind, Kind::Transaction | Kind::Session | Kind::Cursor) {
                return Ok(self.decision(a, Target::Session, st.reason.clone()));
            }
            return Err(RouteError::NoTenant { prefix: self.map.tenant_prefix.clone(), key: self.map.key.clone() });
        };
        let target = if matches!(st.kind, Kind::Transaction | Kind::Session | Kind::Cursor) {
            Target::Session
        } else {
            Target::One(self.map.tenant_shard(&tenant))
        };
        let mut d = self.decision(a, target, reason);
        d.database = Some(format!("{}{tenant}", self.map.tenant_prefix));
        d.values = vec![KeyValue::Text(tenant.into())];
        Ok(d)
    }
}
