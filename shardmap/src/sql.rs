//! SQL analysis: the only module that knows sqlparser's AST. It turns a statement text into an [`Analysis`]
//! that no longer depends on parameters or the session, so that it can be cached by text and applied to each
//! execution's Bind parameters cheaply.
//!
//! What counts as the shard key: a column whose last name part equals the configured key (`user_id`,
//! `u.user_id`, `"user_id"`), compared with `=` to a literal or a parameter, `IN (...)`, or `= ANY($n)` /
//! `= ANY(ARRAY[...])`. Conditions combine: `AND` keeps the side that names the key, `OR` needs both sides to.
//!
//! Sharded tables are assumed co-located on the key (Citus' "co-location"): every row that belongs to key K
//! lives on K's shard in every sharded table. So a block of a query constrained to K also decides its
//! subqueries and CTEs, while a block that reads a sharded table with no constraint needs every shard.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;

use sqlparser::ast::{
    self, BinaryOperator, CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Expr, FromTable,
    ObjectName, Query, SetExpr, Statement, TableFactor, TableObject, TableWithJoins, UnaryOperator, Value, Visit,
    Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::value::{KeyType, KeyValue};

mod combine;
mod cross;
mod global;
mod split;
pub use combine::{array_literal, array_oid, plan as combine_plan, Column, CombinePlan, Source, StreamPlan};
pub use cross::{is_aggregate, Cross, COMBINABLE};
pub use global::{global_insert, global_write, GlobalInsert, GlobalWrite};
pub use split::{split_insert, InsertPart};

/// Deepest expression or query nesting the parser accepts; deeper input is refused with a clear error.
pub const RECURSION_LIMIT: usize = 64;

/// Where the value of one shard-key occurrence comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyExpr {
    Value(KeyValue),
    /// `$n`, zero-based.
    Param(usize),
    /// `= ANY($n)`: every element of the array parameter.
    ArrayParam(usize),
    /// A literal that cannot be a key of the configured type: refused (22023) when the statement is placed by
    /// it — as a literal the simple protocol takes out of the text is read only then, so that both protocols
    /// decide alike.
    Bad {
        value: String,
        why: String,
    },
}

/// What a statement does, as far as routing cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    /// Schema changes and utility statements: every shard.
    Ddl,
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT...: follow the session.
    Transaction,
    /// SET, RESET, SHOW, LISTEN, DISCARD...: session state, follow the session.
    Session,
    /// FETCH, MOVE, CLOSE: the cursor is where the session's transaction is (a DECLARE is a read, routed by
    /// its query, with [`StatementAnalysis::cursor`] set).
    Cursor,
    /// COPY ... FROM STDIN: rows are split by key (see [`CopyIn`]).
    CopyIn,
}

/// Which tables a statement touches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tables {
    /// No table, or only system catalogs (`SELECT 1`, `pg_catalog.*`): any shard answers the same.
    None,
    /// Only `shard-global-tables` (reference tables, copied on every shard).
    Global,
    /// At least one sharded table; the first one, for messages.
    Sharded(String),
}

/// The key conditions found in a statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Keys {
    /// The statement is constrained to these key values (their union).
    Some(Vec<KeyExpr>),
    /// No constraint: a read needs every shard, a write is refused.
    None,
}

/// A session setting the statement makes that routing cares about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionChange {
    ShardKey(Option<String>),
    Tenant(Option<String>),
}

/// What a transaction-control statement does (the router's transaction state machine reads it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnVerb {
    /// BEGIN, START TRANSACTION.
    Begin,
    /// COMMIT, END.
    Commit,
    /// ROLLBACK, ABORT.
    Rollback,
    Savepoint,
    /// RELEASE [SAVEPOINT].
    Release,
    /// ROLLBACK TO [SAVEPOINT].
    RollbackTo,
    /// PREPARE TRANSACTION 'gid'.
    Prepare(String),
    /// COMMIT PREPARED 'gid'.
    CommitPrepared(String),
    /// ROLLBACK PREPARED 'gid'.
    RollbackPrepared(String),
}

/// What a SET or RESET does to the session's settings (SET LOCAL and SET TRANSACTION do nothing lasting).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Setting {
    /// These parameters (lower case) get new values.
    Set(Vec<String>),
    /// These parameters get new values, some named by the statement's parameters (`set_config($1, ...)`:
    /// a Bind parameter, or a simple query's literal, which its shape made a parameter); the router reads
    /// those names where the statement was bound (`planner::named_setting`).
    SetBound(Vec<SettingName>),
    /// Parameters whose names the statement computes (`set_config(lower('X'), ...)`) get new values.
    SetSome,
    /// This parameter goes back to its session default.
    Reset(String),
    ResetAll,
}

/// The name of a setting a statement changes: written in it, or the value of one of its parameters (0-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettingName {
    Named(String),
    Param(usize),
}

/// DECLARE of a cursor (`hold`: WITH HOLD, it outlives its transaction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Declare {
    pub hold: bool,
}

/// A routing hint from a comment: `/* shard_key: 42 */`, `/* shard: name */`, `/* tenant: acme */` or
/// `/* shards: all */`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hint {
    ShardKey(String),
    Shard(String),
    Tenant(String),
    /// `/* shards: all */`: every shard, as a write (a function that writes global tables).
    AllShards,
}

/// `COPY table [(columns)] FROM STDIN`: what the router needs to split rows by key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyIn {
    pub table: String,
    /// Zero-based position of the key among the copied columns, when it is there.
    pub key_column: Option<usize>,
    /// Whether the column list was given (without one, positions are the table's and unknown here).
    pub columns_given: bool,
    pub format: CopyFormat,
    pub delimiter: u8,
    pub header: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Csv,
    Binary,
}

/// One statement, analysed.
#[derive(Clone, Debug)]
pub struct StatementAnalysis {
    pub kind: Kind,
    pub tables: Tables,
    pub keys: Keys,
    /// A reason this statement can't be routed, whatever the parameters (e.g. it changes the key).
    pub refusal: Option<String>,
    pub session: Option<SessionChange>,
    pub copy: Option<CopyIn>,
    /// What decided the route, for `explain` and errors: `user_id = $1` (shared by every decision made from
    /// this analysis, so a decision does not copy it).
    pub reason: std::sync::Arc<str>,
    /// Whether it takes or releases a session-level advisory lock (`pg_advisory_lock` and friends), which
    /// belongs to a server connection rather than to a transaction.
    pub session_lock: bool,
    /// Whether it creates a temporary table, view or sequence that outlives its transaction (all but
    /// `CREATE TEMP TABLE ... ON COMMIT DROP`): it stays on the server connection, which transaction pooling
    /// hands to other clients.
    pub temp_object: bool,
    /// The first function it calls whose effect belongs to the database rather than to rows or to the
    /// connection: `nextval`/`setval` (a sequence's next value), an advisory lock, `pg_notify` (or `NOTIFY`
    /// itself, named so here). Every shard has its own copy of that state, so a statement naming no sharded
    /// table that calls one goes to the first shard, where every client's calls meet as they would on one
    /// PostgreSQL (and where a global table's sequences advance, and session mode's LISTEN goes).
    pub shared_call: Option<&'static str>,
    /// Transaction control: what it does.
    pub txn: Option<TxnVerb>,
    /// The savepoint a SAVEPOINT, RELEASE or ROLLBACK TO names, folded as PostgreSQL folds it (lower case
    /// unless quoted).
    pub savepoint: Option<String>,
    /// COMMIT AND CHAIN, ROLLBACK AND CHAIN: a new transaction starts as this one ends.
    pub chain: bool,
    /// BEGIN or START TRANSACTION ISOLATION LEVEL REPEATABLE READ or SERIALIZABLE: every read of the
    /// transaction sees one snapshot.
    pub snapshot_isolation: bool,
    /// It makes a setting that ends with its transaction: SET LOCAL, SET TRANSACTION, or
    /// `set_config(..., true)`.
    pub local_setting: bool,
    /// DECLARE ... CURSOR: a read routed by its query, whose cursor lives in the transaction.
    pub declare: Option<Declare>,
    /// SET/RESET: the session settings it changes.
    pub setting: Option<Setting>,
    /// A read: how its shards' answers become the client's when it spans shards.
    pub cross: Cross,
    /// `INSERT INTO table VALUES (...)` with no column list: each row's values (a literal or parameter, or
    /// `None` for anything else), to be read at the key's position in the table once that is known.
    pub positional: Option<Vec<Vec<Option<KeyExpr>>>>,
    /// An INSERT into a global table: it runs on one shard first, and the rows it wrote go to the others
    /// (see `sql::global`).
    pub global_insert: bool,
    /// An UPDATE or DELETE of a global table: the transaction's clock read once, row counts compared.
    pub global_write: bool,
    /// A write to a global table that cannot leave every copy identical (see `global_write`).
    pub global_refusal: Option<String>,
    /// `INSERT ... VALUES`: `keys` (or `positional`) has one key per row, in order, so that rows for several
    /// shards can be split into one INSERT per shard.
    pub insert_rows: bool,
    /// An INSERT (of any source).
    pub insert: bool,
    /// CREATE TABLE or ALTER TABLE of a sharded table (its name as written): sequences it makes for
    /// `serial`/identity columns are interleaved across shards once it ran (see the router's `sequences.rs`).
    pub sequences_of: Option<String>,
    /// A read of sharded tables: every relation it names that is taken for a sharded table, as written
    /// (`v`, `s.v`, `"My View"`), each once. A name may be a view, a sequence or a foreign table on the
    /// servers, which the text does not tell: when the read spans shards, the router asks a shard what each
    /// is (see [`crate::planner::Relation`]).
    pub relations: Vec<String>,
    /// A write that runs whole on one shard or not at all: `EXPLAIN ANALYZE` of a write, whose answer (a
    /// plan) the router can neither split by shard nor total.
    pub whole: bool,
}

impl StatementAnalysis {
    /// A statement of `kind` with no table, no key and nothing else yet.
    pub fn new(kind: Kind, reason: impl Into<std::sync::Arc<str>>) -> StatementAnalysis {
        StatementAnalysis {
            kind,
            tables: Tables::None,
            keys: Keys::None,
            refusal: None,
            session: None,
            copy: None,
            reason: reason.into(),
            session_lock: false,
            temp_object: false,
            shared_call: None,
            txn: None,
            savepoint: None,
            chain: false,
            snapshot_isolation: false,
            local_setting: false,
            declare: None,
            setting: None,
            cross: Cross::Concat,
            positional: None,
            global_insert: false,
            global_write: false,
            global_refusal: None,
            insert_rows: false,
            insert: false,
            sequences_of: None,
            relations: Vec::new(),
            whole: false,
        }
    }

    /// Whether it goes to the first shard for its `shared_call`: it calls one, names no sharded table, and is
    /// neither DDL nor COPY (those go to every shard).
    pub fn on_first_shard(&self) -> bool {
        self.shared_call.is_some()
            && match (self.kind, &self.tables) {
                (Kind::Ddl | Kind::CopyIn, _) => false,
                (Kind::Read, Tables::None | Tables::Global) | (_, Tables::None) => true,
                _ => false,
            }
    }
}

/// A whole query string, analysed: one entry per statement, and the hint that applies to all.
#[derive(Clone, Debug)]
pub struct Analysis {
    pub statements: Vec<StatementAnalysis>,
    pub hint: Option<Hint>,
    /// The parser's error when the text could not be parsed (the statements then come from its first word).
    pub parse_error: Option<String>,
}

impl Analysis {
    /// A copy that shares no reference count with this one (for a thread's own cache: see
    /// [`crate::Planner::analyze`]).
    pub fn copy_for_thread(&self) -> Analysis {
        let mut a = self.clone();
        for st in &mut a.statements {
            st.reason = std::sync::Arc::from(&*st.reason);
        }
        a
    }
}

/// Analyses `sql` for shard key `key` (lower case) with the given key type and global tables.
pub fn analyze(sql: &str, key: &str, key_type: KeyType, global: &HashSet<String>) -> Analysis {
    analyze_keys(sql, key, &HashMap::new(), key_type, global)
}

/// Like [`analyze`], with tables whose key column is not `key` (`shard-table-<table>`).
pub fn analyze_keys(
    sql: &str,
    key: &str,
    table_keys: &HashMap<String, String>,
    key_type: KeyType,
    global: &HashSet<String>,
) -> Analysis {
    let hint = find_hint(sql);
    let ctx = Ctx { key, table_keys, scopes: Default::default(), key_type, global };
    match parse(sql) {
        Ok(stmts) => {
            let statements = stmts
                .iter()
                .map(|s| {
                    let mut a = ctx.statement(s);
                    let calls = calls(s);
                    (a.session_lock, a.shared_call) = (calls.session_lock, calls.shared_call);
                    a.temp_object = temp_object(s);
                    if a.setting.is_none() {
                        a.setting = calls.setting;
                    }
                    a.local_setting |= calls.local_setting;
                    if matches!(s, Statement::NOTIFY { .. }) {
                        a.shared_call = Some("NOTIFY");
                    }
                    ctx.global_write(s, &mut a);
                    if a.kind == Kind::Write && matches!(a.tables, Tables::Sharded(_)) {
                        if let Some(why) = ctx.write_cross(s) {
                            a.cross = Cross::Refuse(why);
                        }
                    }
                    if a.kind == Kind::Read {
                        a.relations = read_relations(s, global);
                        if let (Tables::None | Tables::Global, Some(t)) = (&a.tables, a.relations.first()) {
                            // A sharded table read where the walk for keys does not look (VALUES, ORDER BY,
                            // LIMIT, a function's arguments in FROM): no shard alone has the answer.
                            a.cross = Cross::Refuse(format!(
                                "a subquery reading {t} in VALUES, ORDER BY, LIMIT or a function's arguments"
                            ));
                            a.reason = format!("{t} read in a subquery: every shard").into();
                            a.tables = Tables::Sharded(t.clone());
                            a.keys = Keys::None;
                        } else if !matches!(a.tables, Tables::Sharded(_)) {
                            a.relations.clear();
                        }
                    }
                    a
                })
                .collect();
            Analysis { statements, hint, parse_error: None }
        }
        Err(sqlparser::parser::ParserError::RecursionLimitExceeded) => {
            let msg = format!("the statement is nested deeper than the recursion limit ({RECURSION_LIMIT} levels)");
            let mut st = crate::lexical::analyze(sql, &msg, key, global);
            st.refusal = Some(msg.clone());
            Analysis { statements: vec![st], hint: None, parse_error: Some(msg) }
        }
        Err(e) => {
            let msg = e.to_string();
            Analysis { statements: vec![crate::lexical::analyze(sql, &msg, key, global)], hint, parse_error: Some(msg) }
        }
    }
}

/// The statements of a text, parsed as PostgreSQL's (nesting bounded by [`RECURSION_LIMIT`]).
fn parse(sql: &str) -> Result<Vec<Statement>, sqlparser::parser::ParserError> {
    Parser::new(&PostgreSqlDialect {})
        .with_recursion_limit(RECURSION_LIMIT)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
}

/// The last statement of a text (the router plans a single statement), or the parser's error.
fn parse_last(sql: &str) -> Result<Statement, String> {
    parse(sql).map_err(|e| e.to_string())?.pop().ok_or_else(|| "an empty statement".to_string())
}

/// An SQL identifier, quoted (for statements the router and the rebalancer write).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// An SQL string literal (standard_conforming_strings), quoted.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The first word of a statement, past comments.
pub fn first_word(sql: &str) -> &str {
    let mut s = sql;
    // (Most statements start with their word: no comment or space to skip.)
    while !s.as_bytes().first().is_some_and(u8::is_ascii_alphabetic) {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.split_once('\n').map_or("", |(_, r)| r);
        } else if let Some(rest) = s.strip_prefix("/*") {
            s = rest.split_once("*/").map_or("", |(_, r)| r);
        } else {
            break;
        }
    }
    // (A byte that is not an ASCII letter ends the word on a character boundary. `| 0x20` folds the upper
    // case letters onto the lower case ones, and nothing else onto them: one comparison a byte.)
    let b = s.as_bytes();
    let mut end = 0;
    while end < b.len() && (b[end] | 0x20).wrapping_sub(b'a') < 26 {
        end += 1;
    }
    &s[..end]
}

/// The first `/* name: value */` hint in the text.
fn find_hint(sql: &str) -> Option<Hint> {
    // Only block comments hold hints: string literals, quoted identifiers, dollar quotes and line comments
    // are skipped, so that `'see /* shard: 0 */'` is data, not a hint.
    let b = sql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' => {
                // E'...' takes backslash escapes; '' is a quote either way.
                let escapes = i > 0 && matches!(b[i - 1], b'e' | b'E') && (i < 2 || !ident(b[i - 2]));
                i += 1;
                while i < b.len() {
                    match b[i] {
                        b'\\' if escapes => i += 2,
                        b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
                        b'\'' => break,
                        _ => i += 1,
                    }
                }
                i += 1;
            }
            b'"' => {
                i += 1;
                while i < b.len() {
                    match b[i] {
                        b'"' if b.get(i + 1) == Some(&b'"') => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = sql[i..].find('\n').map_or(b.len(), |n| i + n + 1);
            }
            b'$' if i == 0 || !ident(b[i - 1]) => {
                // $tag$ ... $tag$ (not $1, a parameter).
                let tag_len = b[i + 1..].iter().take_while(|c| ident(**c) && **c < 0x80).count();
                let opens = b.get(i + 1 + tag_len) == Some(&b'$') && !b.get(i + 1).is_some_and(|c| c.is_ascii_digit());
                if opens {
                    let tag = &sql[i..i + tag_len + 2];
                    let body = i + tag.len();
                    i = sql[body..].find(tag).map_or(b.len(), |n| body + n + tag.len());
                } else {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let after = &sql[i + 2..];
                let end = after.find("*/")?;
                let body = after[..end].trim();
                if let Some((name, value)) = body.split_once(':') {
                    let value = value.trim().trim_matches(|c| c == '\'' || c == '"').to_string();
                    match name.trim().to_ascii_lowercase().as_str() {
                        "shard_key" | "shard-key" => return Some(Hint::ShardKey(value)),
                        "shard" => return Some(Hint::Shard(value)),
                        "shards" if value.eq_ignore_ascii_case("all") => return Some(Hint::AllShards),
                        "tenant" => return Some(Hint::Tenant(value)),
                        _ => {}
                    }
                }
                i += 2 + end + 2;
            }
            _ => i += 1,
        }
    }
    None
}

struct Ctx<'a> {
    key: &'a str,
    /// `shard-table-<table>` keys (tables whose key column is not `key`).
    table_keys: &'a HashMap<String, String>,
    /// The tables in scope, innermost last: (name or alias as written, table).
    scopes: std::cell::RefCell<Vec<Vec<(String, String)>>>,
    key_type: KeyType,
    global: &'a HashSet<String>,
}

/// A key constraint on a query block: `None` means unconstrained.
type Constraint = Option<Vec<KeyExpr>>;

/// The result of walking queries: the union of keys of constrained blocks, and whether some block reads a
/// sharded table with no constraint (or inherited one).
#[derive(Default)]
struct Outcome {
    keys: Vec<KeyExpr>,
    constrained: bool,
    unconstrained: bool,
    first_sharded: Option<String>,
    global: bool,
}

impl Outcome {
    fn merge(&mut self, o: Outcome) {
        self.keys.extend(o.keys);
        self.constrained |= o.constrained;
        self.unconstrained |= o.unconstrained;
        self.global |= o.global;
        if self.first_sharded.is_none() {
            self.first_sharded = o.first_sharded;
        }
    }

    fn tables(&self) -> Tables {
        match (&self.first_sharded, self.global) {
            (Some(t), _) => Tables::Sharded(t.clone()),
            (None, true) => Tables::Global,
            (None, false) => Tables::None,
        }
    }

    fn keys(&self) -> Keys {
        if self.constrained && !self.unconstrained {
            Keys::Some(self.keys.clone())
        } else {
            Keys::None
        }
    }
}

/// Table name as PostgreSQL folds it: the last part, lower case unless quoted.
fn table_name(name: &ObjectName) -> Option<String> {
    let last = name.0.last()?.as_ident()?;
    Some(fold(last))
}

fn fold(id: &ast::Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_lowercase()
    }
}

fn is_catalog(name: &ObjectName, table: &str) -> bool {
    let schema = name.0.len() >= 2
        && name.0[name.0.len() - 2].as_ident().is_some_and(|s| {
            let s = s.value.to_lowercase();
            s == "pg_catalog" || s == "information_schema"
        });
    schema || table.starts_with("pg_")
}

impl Ctx<'_> {
    fn statement(&self, s: &Statement) -> StatementAnalysis {
        let mut a = StatementAnalysis::new(Kind::Ddl, String::new());
        match s {
            Statement::Query(q) => {
                a.kind = Kind::Read;
                let o = self.query(q, false, &mut Vec::new());
                self.finish(&mut a, &o);
                a.cross = self.cross(q);
                if modifies(q) {
                    // `WITH d AS (DELETE ... RETURNING *) SELECT ...`: a write, routed by the key of what it
                    // writes, whole on one shard (the statement cannot be split by shard); a global table's
                    // copies cannot be kept identical through it.
                    a.kind = Kind::Write;
                    a.whole = true;
                    if a.tables == Tables::Global {
                        a.global_refusal = Some(
                            "a WITH query that writes a global table is not supported: the router keeps the copies identical only for INSERT, UPDATE and DELETE sent as statements of their own".into(),
                        );
                    }
                }
            }
            Statement::Explain { statement, analyze, options, .. } => {
                let inner = self.statement(statement);
                // (`EXPLAIN (ANALYZE off)` does not run it; PostgreSQL's boolean spellings.)
                let off = |e: &Expr| {
                    let t = e.to_string();
                    ["false", "off", "0", "no", "f", "n"].contains(&t.trim_matches('\'').to_ascii_lowercase().as_str())
                };
                let runs = *analyze
                    || options
                        .iter()
                        .flatten()
                        .any(|o| o.name.value.eq_ignore_ascii_case("analyze") && !o.arg.as_ref().is_some_and(off));
                a = if runs && inner.kind == Kind::Write {
                    // EXPLAIN ANALYZE runs the write: it goes where the write goes, whole, to one shard (its
                    // answer is a plan, which the router cannot split by shard, total or copy).
                    let mut a = StatementAnalysis {
                        insert_rows: false,
                        global_insert: false,
                        global_write: false,
                        whole: true,
                        ..inner
                    };
                    if a.tables == Tables::Global && a.global_refusal.is_none() {
                        a.global_refusal = Some(
                            "EXPLAIN ANALYZE of a write to a global table is not supported: it would write every shard's copy and answer with one plan; run the write itself".into(),
                        );
                    }
                    a
                } else {
                    // (Across shards, each shard's plan: an explanation, not rows of data.)
                    StatementAnalysis { kind: Kind::Read, cross: Cross::Concat, ..inner }
                };
            }
            Statement::Insert(ins) => self.insert(ins, &mut a),
            Statement::Update(u) => {
                a.kind = Kind::Write;
                let target = self.write_target(&u.table.relation);
                if let Tables::Sharded(t) = &target {
                    if self.assigns_key(&u.assignments, self.key_of(t)) {
                        a.refusal = Some(format!(
                            "UPDATE {t} changes the shard key {}: that would move the row to another shard; delete it and insert it again",
                            self.key_of(t)
                        ));
                    }
                }
                // UPDATE ... FROM: the FROM tables join the target in one block.
                let mut tables = vec![&u.table];
                if let Some(ast::UpdateTableFromKind::AfterSet(f) | ast::UpdateTableFromKind::BeforeSet(f)) = &u.from {
                    tables.extend(f.iter());
                }
                let o = self.block(&tables, u.selection.as_ref(), false, &mut Vec::new());
                self.finish_write(&mut a, target, &o);
            }
            Statement::Delete(d) => {
                a.kind = Kind::Write;
                let from = match &d.from {
                    FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t,
                };
                let target = from.first().map_or(Tables::None, |t| self.write_target(&t.relation));
                let tables: Vec<&TableWithJoins> = from.iter().chain(d.using.iter().flatten()).collect();
                let o = self.block(&tables, d.selection.as_ref(), false, &mut Vec::new());
                self.finish_write(&mut a, target, &o);
            }
            Statement::Copy { source, to, target, options, legacy_options, .. } => {
                self.copy(source, *to, target, options, legacy_options, &mut a)
            }
            Statement::StartTransaction { .. }
            | Statement::Commit { .. }
            | Statement::Rollback { .. }
            | Statement::Savepoint { .. }
            | Statement::ReleaseSavepoint { .. } => {
                a.kind = Kind::Transaction;
                a.reason = "transaction control follows the session".into();
                a.txn = Some(match s {
                    Statement::StartTransaction { .. } => TxnVerb::Begin,
                    Statement::Commit { .. } => TxnVerb::Commit,
                    Statement::Rollback { savepoint: Some(_), .. } => TxnVerb::RollbackTo,
                    Statement::Rollback { .. } => TxnVerb::Rollback,
                    Statement::Savepoint { .. } => TxnVerb::Savepoint,
                    _ => TxnVerb::Release,
                });
                a.chain = matches!(s, Statement::Commit { chain: true, .. } | Statement::Rollback { chain: true, .. });
                if let Statement::StartTransaction { modes, .. } = s {
                    a.snapshot_isolation = modes.iter().any(|m| {
                        matches!(
                            m,
                            ast::TransactionMode::IsolationLevel(
                                ast::TransactionIsolationLevel::RepeatableRead
                                    | ast::TransactionIsolationLevel::Serializable
                            )
                        )
                    });
                }
                a.savepoint = match s {
                    Statement::Rollback { savepoint: Some(name), .. }
                    | Statement::Savepoint { name }
                    | Statement::ReleaseSavepoint { name } => Some(match name.quote_style {
                        Some(_) => name.value.clone(),
                        None => name.value.to_lowercase(),
                    }),
                    _ => None,
                };
            }
            Statement::Declare { stmts, .. } => match stmts.as_slice() {
                [d] if d.for_query.is_some() => {
                    a.kind = Kind::Read;
                    let o = self.query(d.for_query.as_ref().expect("checked"), false, &mut Vec::new());
                    self.finish(&mut a, &o);
                    a.declare = Some(Declare { hold: d.hold == Some(true) });
                    a.cross = match self.cross(d.for_query.as_ref().expect("checked")) {
                        Cross::Combine => Cross::Refuse("a cursor over rows combined from several shards".into()),
                        c => c,
                    };
                }
                _ => {
                    a.kind = Kind::Ddl;
                    a.reason = "schema change or utility statement: every shard".into();
                }
            },
            Statement::Fetch { .. } | Statement::Close { .. } => {
                a.kind = Kind::Cursor;
                a.reason = "a cursor is where the session's transaction is".into();
            }
            Statement::Set(set) => {
                a.kind = Kind::Session;
                a.reason = "session setting".into();
                if let ast::Set::SingleAssignment { variable, values, .. } = set {
                    a.session = self.gb_setting(variable, values.first());
                }
                if a.session.is_none() {
                    a.setting = setting_of(set);
                    a.local_setting = matches!(
                        set,
                        ast::Set::SingleAssignment { scope: Some(ast::ContextModifier::Local), .. }
                            | ast::Set::SetTimeZone { local: true, .. }
                            | ast::Set::SetRole { context_modifier: Some(ast::ContextModifier::Local), .. }
                            | ast::Set::SetTransaction { session: false, .. }
                    );
                }
            }
            Statement::Reset(r) => {
                a.kind = Kind::Session;
                a.reason = "session setting".into();
                if let ast::Reset::ConfigurationParameter(name) = &r.reset {
                    a.session = self.gb_setting(name, None);
                }
                if a.session.is_none() {
                    a.setting = Some(match &r.reset {
                        ast::Reset::ALL => Setting::ResetAll,
                        ast::Reset::SessionAuthorization => Setting::Reset("session_authorization".into()),
                        ast::Reset::ConfigurationParameter(n) => Setting::Reset(n.to_string().to_lowercase()),
                    });
                }
            }
            Statement::ShowVariable { .. }
            | Statement::Discard { .. }
            | Statement::LISTEN { .. }
            | Statement::UNLISTEN { .. }
            | Statement::NOTIFY { .. }
            | Statement::Deallocate { .. }
            | Statement::Prepare { .. }
            | Statement::Execute { .. } => {
                a.kind = Kind::Session;
                a.reason = "session statement".into();
            }
            _ => {
                a.kind = Kind::Ddl;
                a.reason = "schema change or utility statement: every shard".into();
                let (name, temporary) = match s {
                    Statement::CreateTable(ct) => (Some(&ct.name), ct.temporary),
                    Statement::AlterTable(at) => (Some(&at.name), false),
                    _ => (None, false),
                };
                if let (Some(name), false) = (name, temporary) {
                    if table_name(name).is_some_and(|t| !self.global.contains(&t) && !is_catalog(name, &t)) {
                        a.sequences_of = Some(name.to_string());
                    }
                }
            }
        }
        a
    }

    /// A write to a global table must leave every copy identical: it may not read sharded tables (each
    /// shard would write from its own part); UPDATE and DELETE may not call functions whose value differs
    /// between copies; an INSERT is marked to run on one shard first (its rows then copied to the others).
    fn global_write(&self, s: &Statement, a: &mut StatementAnalysis) {
        if a.kind != Kind::Write || a.tables != Tables::Global || a.refusal.is_some() || a.global_refusal.is_some() {
            return;
        }
        let verb = match s {
            Statement::Insert(_) => "INSERT into",
            Statement::Update(_) => "UPDATE of",
            Statement::Delete(_) => "DELETE from",
            _ => "a write to",
        };
        struct Sharded<'c, 'a>(&'c Ctx<'a>, Option<String>);
        impl Visitor for Sharded<'_, '_> {
            type Break = ();
            fn pre_visit_relation(&mut self, name: &ObjectName) -> ControlFlow<()> {
                if let Some(t) = table_name(name) {
                    if !is_catalog(name, &t) && !self.0.global.contains(&t) {
                        self.1 = Some(t);
                        return ControlFlow::Break(());
                    }
                }
                ControlFlow::Continue(())
            }
        }
        let mut v = Sharded(self, None);
        let _ = s.visit(&mut v);
        if let Some(t) = v.1 {
            a.global_refusal = Some(format!(
                "{verb} a global table reading the sharded table {t}: each shard would write from its own part of {t}, and the copies would differ; read the rows in the client and write them"
            ));
            return;
        }
        match s {
            Statement::Insert(_) => a.global_insert = true,
            Statement::Update(_) | Statement::Delete(_) if global::unstable_call(s).is_none() => a.global_write = true,
            _ => {
                if let Some(f) = global::volatile_call(s) {
                    a.global_refusal = Some(format!(
                        "{verb} a global table calling {f}(), whose value would differ between the shards' copies; compute the value in the client and pass it as a literal or parameter"
                    ));
                }
            }
        }
    }

    /// Whether assignments (`SET a = ..., (b, c) = ...`) set the shard key.
    fn assigns_key(&self, assignments: &[ast::Assignment], key: &str) -> bool {
        assignments.iter().any(|asg| {
            let names: Vec<&ObjectName> = match &asg.target {
                ast::AssignmentTarget::ColumnName(n) => vec![n],
                ast::AssignmentTarget::Tuple(ns) => ns.iter().collect(),
            };
            names.iter().any(|n| n.0.last().and_then(|p| p.as_ident()).is_some_and(|i| fold(i) == key))
        })
    }

    /// `SET gb.shard_key = ...` / `SET gb.tenant = ...` (and RESET, with `value` None).
    fn gb_setting(&self, variable: &ObjectName, value: Option<&Expr>) -> Option<SessionChange> {
        let name = variable.to_string().to_lowercase();
        let value = match value {
            None => None,
            Some(Expr::Value(v)) => match &v.value {
                Value::SingleQuotedString(s) | Value::Number(s, _) => Some(s.clone()),
                Value::Null => None,
                _ => Some(v.value.to_string()),
            },
            Some(Expr::Identifier(i)) if i.value.eq_ignore_ascii_case("default") => None,
            Some(e) => Some(e.to_string()),
        };
        match name.as_str() {
            "gb.shard_key" => Some(SessionChange::ShardKey(value)),
            "gb.tenant" => Some(SessionChange::Tenant(value)),
            _ => None,
        }
    }

    /// An UPDATE or DELETE: its target decides the class, its block (target, FROM/USING, WHERE) the keys.
    fn finish_write(&self, a: &mut StatementAnalysis, target: Tables, o: &Outcome) {
        match target {
            Tables::Sharded(_) => self.finish(a, o),
            Tables::Global => {
                a.tables = Tables::Global;
                a.reason = "a global table: every shard".into();
            }
            Tables::None => {
                a.tables = Tables::None;
                a.reason = "no sharded table".into();
            }
        }
    }

    fn finish(&self, a: &mut StatementAnalysis, o: &Outcome) {
        a.tables = o.tables();
        a.keys = o.keys();
        if a.reason.is_empty() {
            let key = match &a.tables {
                Tables::Sharded(t) => self.key_of(t),
                _ => self.key,
            };
            a.reason = std::sync::Arc::<str>::from(match (&a.keys, &a.tables) {
                (Keys::Some(k), _) => self.describe(key, k),
                (Keys::None, Tables::Sharded(t)) => format!("no {key} condition on {t}"),
                (Keys::None, Tables::Global) => "global tables only".into(),
                (Keys::None, Tables::None) => "no sharded table".into(),
            });
        }
    }

    fn describe(&self, key: &str, keys: &[KeyExpr]) -> String {
        let show = |k: &KeyExpr| match k {
            KeyExpr::Value(KeyValue::Int(v)) => v.to_string(),
            KeyExpr::Value(v) => format!("'{v}'"),
            KeyExpr::Param(i) => format!("${}", i + 1),
            KeyExpr::ArrayParam(i) => format!("ANY(${})", i + 1),
            KeyExpr::Bad { value, .. } => value.clone(),
        };
        match keys {
            [KeyExpr::ArrayParam(i)] => format!("{key} = ANY(${})", i + 1),
            [one] => format!("{key} = {}", show(one)),
            many if many.len() > 8 => format!("{key} IN ({} values)", many.len()),
            many => format!("{key} IN ({})", many.iter().map(show).collect::<Vec<_>>().join(", ")),
        }
    }

    fn insert(&self, ins: &ast::Insert, a: &mut StatementAnalysis) {
        a.kind = Kind::Write;
        a.insert = true;
        let TableObject::TableName(name) = &ins.table else {
            a.reason = "INSERT into a table function".into();
            return;
        };
        let Some(table) = table_name(name) else { return };
        if is_catalog(name, &table) {
            a.tables = Tables::None;
            a.reason = "system catalog".into();
            return;
        }
        if self.global.contains(&table) {
            a.tables = Tables::Global;
            a.reason = (format!("{table} is a global table: every shard")).into();
            return;
        }
        a.tables = Tables::Sharded(table.clone());
        if let Some(ast::OnInsert::OnConflict(ast::OnConflict { action: ast::OnConflictAction::DoUpdate(u), .. })) =
            &ins.on
        {
            if self.assigns_key(&u.assignments, self.key_of(&table)) {
                a.refusal = Some(format!(
                    "INSERT into {table} ... ON CONFLICT DO UPDATE changes the shard key {}: that would move the row to another shard; delete it and insert it again",
                    self.key_of(&table)
                ));
            }
        }
        let key = self.key_of(&table);
        let pos =
            ins.columns.iter().position(|c| c.0.last().and_then(|p| p.as_ident()).is_some_and(|i| fold(i) == key));
        let Some(source) = &ins.source else {
            a.reason = (format!("INSERT into {table} with no rows")).into();
            return;
        };
        if let SetExpr::Values(values) = source.body.as_ref() {
            a.insert_rows = true;
            if ins.columns.is_empty() {
                // The key's position is the table's: the router looks it up (see `Session::key_positions`).
                let rows = values
                    .rows
                    .iter()
                    .map(|row| row.content.iter().map(|e| self.key_value(e).ok().flatten()).collect())
                    .collect();
                a.positional = Some(rows);
            }
            let Some(pos) = pos else {
                a.reason = std::sync::Arc::<str>::from(if ins.columns.is_empty() {
                    format!("INSERT into {table} names no columns, so the position of {key} is unknown")
                } else {
                    format!("INSERT into {table} has no {key} column")
                });
                return;
            };
            let mut keys = Vec::with_capacity(values.rows.len());
            for (n, row) in values.rows.iter().enumerate() {
                let row = &row.content;
                match row.get(pos).map(|e| self.key_value(e)) {
                    Some(Ok(Some(k))) => keys.push(k),
                    Some(Err(e)) => {
                        a.refusal = Some(e);
                        return;
                    }
                    _ => {
                        let what = row.get(pos).map_or("nothing".to_string(), |e| e.to_string());
                        a.refusal = Some(format!(
                            "INSERT into {table}: row {} gives {key} as {what}, not a value or parameter; compute the key in the client",
                            n + 1,
                        ));
                        return;
                    }
                }
            }
            a.reason = (self.describe(key, &keys)).into();
            a.keys = Keys::Some(keys);
            let mut o = Outcome::default();
            // Subqueries inside VALUES (rare) still count.
            for row in &values.rows {
                for e in &row.content {
                    self.subqueries_expr(e, true, &mut Vec::new(), &mut o);
                }
            }
            if o.unconstrained {
                a.keys = Keys::None;
            }
            return;
        }
        // INSERT ... SELECT: the inserted key decides where the rows go; what the SELECT reads must be there.
        self.insert_select(&table, pos, ins.columns.is_empty(), source, a);
    }

    /// `INSERT INTO table (..., key, ...) SELECT ...`: routed by the key the rows get (a value, a parameter,
    /// or the key column of what the SELECT reads); refused when that cannot be known or when the SELECT reads
    /// another shard than the one the rows go to.
    fn insert_select(
        &self,
        table: &str,
        pos: Option<usize>,
        no_columns: bool,
        source: &Query,
        a: &mut StatementAnalysis,
    ) {
        let key = self.key_of(table);
        let o = self.query(source, false, &mut Vec::new());
        let projection = match source.body.as_ref() {
            SetExpr::Select(s) => Some(&s.projection),
            _ => None,
        };
        let inserted = match (pos, projection) {
            (None, _) if no_columns => {
                a.reason =
                    format!("INSERT into {table} ... SELECT names no columns, so the position of {key} is unknown")
                        .into();
                return;
            }
            (None, _) => {
                a.reason = format!("INSERT into {table} ... SELECT has no {key} column").into();
                return;
            }
            (Some(p), Some(items)) => match items.get(p) {
                Some(ast::SelectItem::UnnamedExpr(e) | ast::SelectItem::ExprWithAlias { expr: e, .. }) => Some(e),
                _ => None,
            },
            (Some(_), None) => None,
        };
        let Some(e) = inserted else {
            a.refusal = Some(format!(
                "INSERT into {table} ... SELECT: the {key} of the rows cannot be read from the SELECT; give it as a value or parameter"
            ));
            return;
        };
        let keys = match self.key_value(e) {
            Err(why) => {
                a.refusal = Some(why);
                return;
            }
            // A value or parameter: the rows go to its shard; a sharded table read must be read there.
            Ok(Some(k)) => {
                let mut keys = vec![k];
                match o.keys() {
                    _ if o.first_sharded.is_none() => {}
                    Keys::Some(read) => keys.extend(read),
                    Keys::None => {
                        a.refusal = Some(format!(
                            "INSERT into {table} ... SELECT reads {} on every shard, and the rows go to one shard; add a {key} condition to the SELECT",
                            o.first_sharded.as_deref().unwrap_or("a sharded table")
                        ));
                        return;
                    }
                }
                keys
            }
            // The key column of what the SELECT reads: the rows stay on the shard of the keys it reads.
            Ok(None) if self.is_key(e) => match o.keys() {
                Keys::Some(read) => read,
                Keys::None => {
                    a.reason = format!("INSERT into {table} ... SELECT with no {key} condition").into();
                    return;
                }
            },
            Ok(None) => {
                a.refusal = Some(format!(
                    "INSERT into {table} ... SELECT computes {key} as {e}; compute the key in the client and give it as a value or parameter"
                ));
                return;
            }
        };
        a.reason = format!("INSERT ... SELECT with {}", self.describe(key, &keys)).into();
        a.keys = Keys::Some(keys);
    }

    fn copy(
        &self,
        source: &CopySource,
        to: bool,
        target: &CopyTarget,
        options: &[CopyOption],
        legacy: &[CopyLegacyOption],
        a: &mut StatementAnalysis,
    ) {
        match source {
            CopySource::Query(q) => {
                a.kind = Kind::Read;
                let o = self.query(q, false, &mut Vec::new());
                self.finish(a, &o);
                a.cross = match self.cross(q) {
                    Cross::Combine => Cross::Refuse("COPY of rows combined from several shards".into()),
                    c => c,
                };
            }
            CopySource::Table { table_name: name, columns } => {
                let table = table_name(name).unwrap_or_default();
                let global = self.global.contains(&table);
                a.tables = if global { Tables::Global } else { Tables::Sharded(table.clone()) };
                if to {
                    a.kind = Kind::Read;
                    a.reason = std::sync::Arc::<str>::from(if global {
                        format!("COPY {table} TO: one shard")
                    } else {
                        format!("COPY {table} TO: every shard")
                    });
                    return;
                }
                if !matches!(target, CopyTarget::Stdin) {
                    a.kind = Kind::Write;
                    a.refusal = Some(
                        "COPY FROM a server file or program is not supported through the router; use FROM STDIN".into(),
                    );
                    return;
                }
                a.kind = Kind::CopyIn;
                let mut copy = CopyIn {
                    table: table.clone(),
                    key_column: columns.iter().position(|c| fold(c) == self.key_of(&table)),
                    columns_given: !columns.is_empty(),
                    format: CopyFormat::Text,
                    delimiter: b'\t',
                    header: false,
                };
                let mut delimiter = None;
                for o in options {
                    match o {
                        CopyOption::Format(f) => {
                            copy.format = match f.value.to_lowercase().as_str() {
                                "csv" => CopyFormat::Csv,
                                "binary" => CopyFormat::Binary,
                                _ => CopyFormat::Text,
                            }
                        }
                        CopyOption::Delimiter(c) => delimiter = Some(*c as u8),
                        CopyOption::Header(h) => copy.header = *h,
                        CopyOption::Quote(c) | CopyOption::Escape(c) if *c != '"' && !global => {
                            a.refusal = Some(format!(
                                "COPY {table} with a quote or escape other than '\"' cannot be split by key"
                            ));
                        }
                        _ => {}
                    }
                }
                for o in legacy {
                    match o {
                        CopyLegacyOption::Binary => copy.format = CopyFormat::Binary,
                        CopyLegacyOption::Delimiter(c) => delimiter = Some(*c as u8),
                        CopyLegacyOption::Csv(opts) => {
                            copy.format = CopyFormat::Csv;
                            copy.header |= opts.iter().any(|o| matches!(o, CopyLegacyCsvOption::Header));
                        }
                        _ => {}
                    }
                }
                copy.delimiter = delimiter.unwrap_or(if copy.format == CopyFormat::Csv { b',' } else { b'\t' });
                let odd = a.refusal.take();
                describe_copy(a, &copy, self.key_of(&table), global);
                a.refusal = a.refusal.take().or(odd);
                a.copy = Some(copy);
            }
        }
    }

    /// Walks a query: its body, then its CTEs, which inherit the body's constraint.
    fn query(&self, q: &Query, inherited: bool, ctes: &mut Vec<String>) -> Outcome {
        let depth = ctes.len();
        if let Some(with) = &q.with {
            ctes.extend(with.cte_tables.iter().map(|c| fold(&c.alias.name)));
        }
        let mut o = self.set_expr(&q.body, inherited, ctes);
        if let Some(with) = &q.with {
            let inh = inherited || o.constrained;
            for cte in &with.cte_tables {
                o.merge(self.query(&cte.query, inh, ctes));
            }
        }
        ctes.truncate(depth);
        o
    }

    /// A SELECT block: its FROM and WHERE, then the subqueries of its select list and HAVING.
    fn select(&self, s: &ast::Select, tables: &[&TableWithJoins], inherited: bool, ctes: &mut Vec<String>) -> Outcome {
        let mut o = self.block(tables, s.selection.as_ref(), inherited, ctes);
        let inh = inherited || o.constrained;
        for item in &s.projection {
            if let ast::SelectItem::UnnamedExpr(e) | ast::SelectItem::ExprWithAlias { expr: e, .. } = item {
                self.subqueries_expr(e, inh, ctes, &mut o);
            }
        }
        if let Some(h) = &s.having {
            self.subqueries_expr(h, inh, ctes, &mut o);
        }
        o
    }

    fn set_expr(&self, body: &SetExpr, inherited: bool, ctes: &mut Vec<String>) -> Outcome {
        match body {
            SetExpr::Select(s) => {
                let tables: Vec<&TableWithJoins> = s.from.iter().collect();
                self.scoped(&tables, || self.select(s, &tables, inherited, ctes))
            }
            SetExpr::Query(q) => self.query(q, inherited, ctes),
            SetExpr::SetOperation { left, right, .. } => {
                let mut o = self.set_expr(left, inherited, ctes);
                o.merge(self.set_expr(right, inherited, ctes));
                o
            }
            SetExpr::Table(t) => {
                let mut o = Outcome::default();
                if let Some(name) = &t.table_name {
                    let name = fold(name);
                    if self.global.contains(&name) {
                        o.global = true;
                    } else if !ctes.contains(&name) {
                        o.first_sharded = Some(name);
                        o.unconstrained = !inherited;
                    }
                }
                o
            }
            SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Delete(s) | SetExpr::Merge(s) => {
                let a = self.statement(s);
                let mut o = Outcome::default();
                match (&a.tables, a.keys) {
                    (Tables::Sharded(t), Keys::Some(k)) => {
                        o.first_sharded = Some(t.clone());
                        o.keys = k;
                        o.constrained = true;
                    }
                    (Tables::Sharded(t), Keys::None) => {
                        o.first_sharded = Some(t.clone());
                        o.unconstrained = !inherited;
                    }
                    (Tables::Global, _) => o.global = true,
                    (Tables::None, _) => {}
                }
                o
            }
            _ => Outcome::default(),
        }
    }

    /// One query block: its FROM tables, its WHERE and JOIN conditions, and the subqueries inside them.
    /// `target` marks an UPDATE/DELETE block, whose tables are written.
    fn block(
        &self,
        from: &[&TableWithJoins],
        selection: Option<&Expr>,
        inherited: bool,
        ctes: &mut Vec<String>,
    ) -> Outcome {
        self.scoped(from, || self.block_in_scope(from, selection, inherited, ctes))
    }

    fn block_in_scope(
        &self,
        from: &[&TableWithJoins],
        selection: Option<&Expr>,
        inherited: bool,
        ctes: &mut Vec<String>,
    ) -> Outcome {
        let mut o = Outcome::default();
        let mut scan = Outcome::default();
        let mut own: Constraint = selection.and_then(|e| self.constraint(e));
        for t in from {
            for j in &t.joins {
                // (Only an inner join's condition filters the block's rows: an outer join keeps its preserved
                // side's rows whatever its ON says.)
                let inner = matches!(j.join_operator, ast::JoinOperator::Join(_) | ast::JoinOperator::Inner(_));
                if own.is_none() && inner {
                    if let Some(on) = join_condition(&j.join_operator) {
                        own = self.constraint(on);
                    }
                }
            }
        }
        self.scan_filtered(from, &mut scan, ctes);
        o.first_sharded = scan.first_sharded.clone();
        o.global = scan.global;
        if let Some(keys) = own {
            o.keys = keys;
            o.constrained = true;
        } else if scan.first_sharded.is_some() && !inherited {
            o.unconstrained = true;
        }
        let inh = inherited || o.constrained;
        // Derived tables and lateral subqueries in FROM, subqueries in WHERE and ON.
        for t in from {
            self.subqueries_factor(&t.relation, inh, ctes, &mut o);
            for j in &t.joins {
                self.subqueries_factor(&j.relation, inh, ctes, &mut o);
                if let Some(on) = join_condition(&j.join_operator) {
                    self.subqueries_expr(on, inh, ctes, &mut o);
                }
            }
        }
        if let Some(sel) = selection {
            self.subqueries_expr(sel, inh, ctes, &mut o);
        }
        o
    }

    /// The plain tables a block reads directly (not those inside subqueries).
    fn scan_filtered(&self, from: &[&TableWithJoins], o: &mut Outcome, ctes: &[String]) {
        fn factor(ctx: &Ctx<'_>, f: &TableFactor, o: &mut Outcome, ctes: &[String]) {
            match f {
                TableFactor::Table { name, args: None, .. } => {
                    let Some(t) = table_name(name) else { return };
                    if is_catalog(name, &t) || (name.0.len() == 1 && ctes.contains(&t)) {
                        return;
                    }
                    if ctx.global.contains(&t) {
                        o.global = true;
                    } else if o.first_sharded.is_none() {
                        o.first_sharded = Some(t);
                    }
                }
                TableFactor::NestedJoin { table_with_joins, .. } => {
                    factor(ctx, &table_with_joins.relation, o, ctes);
                    for j in &table_with_joins.joins {
                        factor(ctx, &j.relation, o, ctes);
                    }
                }
                _ => {}
            }
        }
        for t in from {
            factor(self, &t.relation, o, ctes);
            for j in &t.joins {
                factor(self, &j.relation, o, ctes);
            }
        }
    }

    /// The class of a written table: a write to a global table goes to every shard whatever it reads.
    fn write_target(&self, f: &TableFactor) -> Tables {
        let TableFactor::Table { name, .. } = f else { return Tables::None };
        match table_name(name) {
            Some(t) if self.global.contains(&t) => Tables::Global,
            Some(t) if !is_catalog(name, &t) => Tables::Sharded(t),
            _ => Tables::None,
        }
    }

    fn subqueries_factor(&self, f: &TableFactor, inherited: bool, ctes: &mut Vec<String>, o: &mut Outcome) {
        match f {
            TableFactor::Derived { subquery, .. } => o.merge(self.query(subquery, inherited, ctes)),
            TableFactor::NestedJoin { table_with_joins, .. } => {
                self.subqueries_factor(&table_with_joins.relation, inherited, ctes, o);
                for j in &table_with_joins.joins {
                    self.subqueries_factor(&j.relation, inherited, ctes, o);
                }
            }
            _ => {}
        }
    }

    /// Every subquery directly inside an expression (not nested in another subquery: those are reached by
    /// walking the outer one), found with sqlparser's visitor.
    fn subqueries_expr(&self, e: &Expr, inherited: bool, ctes: &mut Vec<String>, o: &mut Outcome) {
        struct Finder<'c, 'o> {
            ctx: &'c Ctx<'c>,
            inherited: bool,
            ctes: &'o mut Vec<String>,
            out: &'o mut Outcome,
            depth: usize,
        }
        impl Visitor for Finder<'_, '_> {
            type Break = ();
            fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
                if self.depth == 0 {
                    let o = self.ctx.query(q, self.inherited, self.ctes);
                    self.out.merge(o);
                }
                self.depth += 1;
                ControlFlow::Continue(())
            }
            fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
                self.depth -= 1;
                ControlFlow::Continue(())
            }
        }
        let mut f = Finder { ctx: self, inherited, ctes, out: o, depth: 0 };
        let _ = e.visit(&mut f);
    }

    /// The key constraint of a boolean expression, or `None` when it does not pin the key.
    fn constraint(&self, e: &Expr) -> Constraint {
        match e {
            Expr::Nested(inner) => self.constraint(inner),
            Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
                self.constraint(left).or_else(|| self.constraint(right))
            }
            Expr::BinaryOp { left, op: BinaryOperator::Or, right } => {
                let mut l = self.constraint(left)?;
                l.extend(self.constraint(right)?);
                Some(l)
            }
            Expr::BinaryOp { left, op: BinaryOperator::Eq, right } => {
                let val = if self.is_key(left) {
                    right
                } else if self.is_key(right) {
                    left
                } else {
                    return None;
                };
                self.checked(val).map(|k| vec![k])
            }
            Expr::In { expr, target: ast::InTarget::List(list), negated: false, .. } if self.is_key(expr) => {
                list.iter().map(|v| self.checked(v)).collect()
            }
            // `key IN (SELECT key FROM ... WHERE key = K)`: the subquery's keys.
            Expr::In { expr, target: ast::InTarget::Subquery(q), negated: false, .. } if self.is_key(expr) => {
                let SetExpr::Select(s) = q.body.as_ref() else { return None };
                match s.projection.as_slice() {
                    [ast::SelectItem::UnnamedExpr(e) | ast::SelectItem::ExprWithAlias { expr: e, .. }]
                        if self.selects_key(s, e) =>
                    {
                        let o = self.query(q, false, &mut Vec::new());
                        match o.keys() {
                            Keys::Some(k) => Some(k),
                            Keys::None => None,
                        }
                    }
                    _ => None,
                }
            }
            Expr::AnyOp { left, compare_op: BinaryOperator::Eq, right, .. } if self.is_key(left) => {
                match strip_cast(right) {
                    Expr::Value(v) => match &v.value {
                        Value::Placeholder(p) => param_index(p).map(|i| vec![KeyExpr::ArrayParam(i)]),
                        _ => None,
                    },
                    Expr::Array(arr) => arr.elem.iter().map(|v| self.checked(v)).collect(),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// [`Ctx::key_value`], keeping a literal that cannot be a key as [`KeyExpr::Bad`], so that the statement
    /// is refused with the reason (when it is placed by it) rather than sent everywhere.
    fn checked(&self, e: &Expr) -> Option<KeyExpr> {
        match self.key_value(e) {
            Ok(k) => k,
            Err(why) => Some(KeyExpr::Bad { value: e.to_string(), why }),
        }
    }

    fn is_key(&self, e: &Expr) -> bool {
        match strip_cast(e) {
            Expr::Identifier(i) => self.is_key_name(None, &fold(i)),
            Expr::CompoundIdentifier(parts) => parts.last().is_some_and(|i| {
                let qualifier = parts.len().checked_sub(2).map(|q| fold(&parts[q]));
                self.is_key_name(qualifier.as_deref(), &fold(i))
            }),
            _ => false,
        }
    }

    /// Whether `e`, in the select list of `s`, is a key column of the tables `s` reads.
    fn selects_key(&self, s: &ast::Select, e: &Expr) -> bool {
        let from: Vec<&TableWithJoins> = s.from.iter().collect();
        self.scoped(&from, || self.is_key(e))
    }

    /// The key column of `table`.
    fn key_of<'t>(&'t self, table: &str) -> &'t str {
        self.table_keys.get(table).map_or(self.key, |k| k.as_str())
    }

    /// Whether column `col` (of the table or alias `qualifier`) is a shard key: the key of its table, found
    /// through the tables in scope (innermost first); with no `shard-table-*` keys, any column named
    /// `shard-key`.
    fn is_key_name(&self, qualifier: Option<&str>, col: &str) -> bool {
        if self.table_keys.is_empty() {
            return col == self.key;
        }
        let scopes = self.scopes.borrow();
        for scope in scopes.iter().rev() {
            match qualifier {
                Some(q) => {
                    if let Some((_, t)) = scope.iter().find(|(a, _)| a == q) {
                        return self.key_of(t) == col;
                    }
                }
                // Unqualified: a table in scope has it as its key (two tables with that column would make
                // the name ambiguous to PostgreSQL).
                None if scope.iter().any(|(_, t)| self.key_of(t) == col) => return true,
                None => {}
            }
        }
        scopes.is_empty() && col == self.key
    }

    /// Runs `f` with the plain tables of `from` in scope.
    fn scoped<T>(&self, from: &[&TableWithJoins], f: impl FnOnce() -> T) -> T {
        if self.table_keys.is_empty() {
            return f();
        }
        fn factor(f: &TableFactor, out: &mut Vec<(String, String)>) {
            match f {
                TableFactor::Table { name, alias, .. } => {
                    if let Some(t) = table_name(name) {
                        let seen = alias.as_ref().map_or_else(|| t.clone(), |a| fold(&a.name));
                        out.push((seen, t));
                    }
                }
                TableFactor::NestedJoin { table_with_joins, .. } => {
                    factor(&table_with_joins.relation, out);
                    for j in &table_with_joins.joins {
                        factor(&j.relation, out);
                    }
                }
                _ => {}
            }
        }
        let mut scope = Vec::new();
        for t in from {
            factor(&t.relation, &mut scope);
            for j in &t.joins {
                factor(&j.relation, &mut scope);
            }
        }
        self.scopes.borrow_mut().push(scope);
        let r = f();
        self.scopes.borrow_mut().pop();
        r
    }

    /// A literal or parameter as a key value: `Ok(None)` when the expression is something else (a column, a
    /// function call), `Err` when it is a literal that cannot be a key of the configured type.
    fn key_value(&self, e: &Expr) -> Result<Option<KeyExpr>, String> {
        let text = |s: &str| KeyValue::from_text(s, self.key_type).map(|v| Some(KeyExpr::Value(v)));
        match strip_cast(e) {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => match self.key_type {
                    KeyType::Auto | KeyType::Int => n
                        .parse::<i64>()
                        .map(|i| Some(KeyExpr::Value(KeyValue::Int(i))))
                        .map_err(|_| format!("{n} is not an integer key")),
                    _ => text(n),
                },
                Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => text(s),
                Value::DollarQuotedString(d) => text(&d.value),
                Value::Placeholder(p) => Ok(param_index(p).map(KeyExpr::Param)),
                _ => Ok(None),
            },
            Expr::TypedString(ts) => match &ts.value.value {
                Value::SingleQuotedString(s) => text(s),
                _ => Ok(None),
            },
            Expr::UnaryOp { op: UnaryOperator::Minus, expr } => match strip_cast(expr) {
                Expr::Value(v) => match &v.value {
                    Value::Number(n, _) => match self.key_type {
                        KeyType::Auto | KeyType::Int => format!("-{n}")
                            .parse::<i64>()
                            .map(|i| Some(KeyExpr::Value(KeyValue::Int(i))))
                            .map_err(|_| format!("-{n} is not an integer key")),
                        _ => text(&format!("-{n}")),
                    },
                    _ => Ok(None),
                },
                _ => Ok(None),
            },
            _ => Ok(None),
        }
    }
}

/// The parameters a SET changes for the session.
fn setting_of(set: &ast::Set) -> Option<Setting> {
    let name = |n: &ObjectName| n.to_string().trim_matches('"').to_lowercase();
    let names = match set {
        ast::Set::SingleAssignment { scope: Some(ast::ContextModifier::Local), .. } => return None,
        ast::Set::SetTimeZone { local: true, .. } => return None,
        ast::Set::SingleAssignment { variable, .. } => vec![name(variable)],
        ast::Set::ParenthesizedAssignments { variables, .. } => variables.iter().map(name).collect(),
        ast::Set::MultipleAssignments { assignments } => assignments.iter().map(|a| name(&a.name)).collect(),
        ast::Set::SetSessionAuthorization(_) => vec!["session_authorization".into()],
        ast::Set::SetSessionParam(_) => return None,
        ast::Set::SetRole { context_modifier: Some(ast::ContextModifier::Local), .. } => return None,
        ast::Set::SetRole { .. } => vec!["role".into()],
        ast::Set::SetTimeZone { .. } => vec!["timezone".into()],
        ast::Set::SetNames { .. } | ast::Set::SetNamesDefault {} => vec!["client_encoding".into()],
        ast::Set::SetTransaction { session: true, .. } => vec![
            "default_transaction_isolation".into(),
            "default_transaction_read_only".into(),
            "default_transaction_deferrable".into(),
        ],
        ast::Set::SetTransaction { .. } => return None,
    };
    Some(Setting::Set(names))
}

/// The reason (and refusal) of a `COPY table FROM STDIN`: rows split by the key's column, or copied to every
/// shard for a global table.
pub(crate) fn describe_copy(a: &mut StatementAnalysis, copy: &CopyIn, key: &str, global: bool) {
    let table = &copy.table;
    if global {
        a.reason = format!("COPY {table}: a global table, the same rows on every shard").into();
        return;
    }
    a.reason = std::sync::Arc::<str>::from(match (copy.key_column, copy.columns_given) {
        (Some(i), _) => format!("COPY {table}: rows split by {key} (column {})", i + 1),
        (None, false) => format!("COPY {table}: rows split by {key} (its position looked up)"),
        (None, true) => format!("COPY {table}: the columns do not include {key}"),
    });
    if copy.key_column.is_none() && copy.columns_given {
        a.refusal = Some(a.reason.to_string());
    }
}

/// Functions whose state is the database's (see `StatementAnalysis::shared_call`), as PostgreSQL names them.
/// Not `currval` or `lastval`: they answer for the connection that called `nextval`, which is the
/// transaction's own.
const SHARED_CALLS: [&str; 14] = [
    "nextval",
    "setval",
    "pg_notify",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
];

/// What a statement's function calls do beyond their rows (one walk over its expressions).
struct Calls {
    /// It calls a session-level advisory lock function.
    session_lock: bool,
    /// The first function it calls whose state is the database's (`nextval`, `setval`, any advisory lock,
    /// `pg_notify`).
    shared_call: Option<&'static str>,
    /// The session settings it changes by calling `set_config(name, value, is_local)` (but for `is_local`
    /// written `true`: such a setting ends with its transaction): their names, lower case, or the parameters
    /// that name them; `SetSome` when one is computed.
    setting: Option<Setting>,
    /// It calls `set_config(name, value, true)`.
    local_setting: bool,
}

/// Whether a query writes: a WITH query (at any depth) that is an INSERT, UPDATE, DELETE or MERGE.
fn modifies(q: &Query) -> bool {
    struct V;
    impl Visitor for V {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            match q.body.as_ref() {
                SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => {
                    ControlFlow::Break(())
                }
                _ => ControlFlow::Continue(()),
            }
        }
    }
    q.visit(&mut V).is_break()
}

/// The relations a read names, as written, that are taken for sharded tables (neither a system catalog, nor
/// a global table, nor a WITH query's name), each once.
fn read_relations(s: &Statement, global: &HashSet<String>) -> Vec<String> {
    struct Finder<'g> {
        global: &'g HashSet<String>,
        /// (as written, folded last part, whether it is one part)
        names: Vec<(String, String, bool)>,
        ctes: Vec<String>,
    }
    impl Finder<'_> {
        fn push(&mut self, written: String, folded: String, one_part: bool) {
            if !self.global.contains(&folded) && !self.names.iter().any(|(w, ..)| *w == written) {
                self.names.push((written, folded, one_part));
            }
        }
    }
    impl Visitor for Finder<'_> {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            if let Some(w) = &q.with {
                self.ctes.extend(w.cte_tables.iter().map(|c| fold(&c.alias.name)));
            }
            if let SetExpr::Table(t) = &*q.body {
                if let Some(name) = &t.table_name {
                    let folded = fold(name);
                    let schema = t.schema_name.as_ref().map(fold);
                    if !folded.starts_with("pg_") && !matches!(schema.as_deref(), Some("information_schema")) {
                        self.push(t.to_string().trim_start_matches("TABLE ").to_string(), folded, schema.is_none());
                    }
                }
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_table_factor(&mut self, f: &TableFactor) -> ControlFlow<()> {
            if let TableFactor::Table { name, args: None, .. } = f {
                if let Some(t) = table_name(name) {
                    if !is_catalog(name, &t) {
                        self.push(name.to_string(), t, name.0.len() == 1);
                    }
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut f = Finder { global, names: Vec::new(), ctes: Vec::new() };
    let _ = s.visit(&mut f);
    let ctes = f.ctes;
    f.names.into_iter().filter(|(_, t, one)| !(*one && ctes.contains(t))).map(|(w, ..)| w).collect()
}

fn calls(s: &Statement) -> Calls {
    #[derive(Default)]
    struct Finder {
        session_lock: bool,
        shared_call: Option<&'static str>,
        settings: Vec<SettingName>,
        computed_setting: bool,
        local_setting: bool,
    }
    impl Finder {
        /// A call of `set_config` with these arguments (`None`: not a plain expression).
        fn set_config(&mut self, args: &[Option<&Expr>]) {
            let local = matches!(args.get(2), Some(Some(Expr::Value(v))) if v.value == Value::Boolean(true));
            if local {
                self.local_setting = true;
                return;
            }
            match args.first() {
                Some(Some(Expr::Value(v))) => match &v.value {
                    Value::SingleQuotedString(n) => self.settings.push(SettingName::Named(n.to_lowercase())),
                    Value::Placeholder(p) => match param_index(p) {
                        Some(i) => self.settings.push(SettingName::Param(i)),
                        None => self.computed_setting = true,
                    },
                    _ => self.computed_setting = true,
                },
                _ => self.computed_setting = true,
            }
        }
    }
    impl Visitor for Finder {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            let Expr::Function(f) = e else { return ControlFlow::Continue(()) };
            let name = f.name.0.last().and_then(|p| p.as_ident()).map(|i| i.value.to_lowercase()).unwrap_or_default();
            if let Some(known) = SHARED_CALLS.iter().find(|k| **k == name) {
                self.shared_call.get_or_insert(known);
                self.session_lock |= known.contains("advisory") && !known.contains("xact");
            } else if name == "set_config" {
                let args: Vec<Option<&Expr>> = match &f.args {
                    ast::FunctionArguments::List(l) => l
                        .args
                        .iter()
                        .map(|a| match a {
                            ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(e)) => Some(strip_cast(e)),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                self.set_config(&args);
            }
            ControlFlow::Continue(())
        }
    }
    let mut f = Finder::default();
    let _ = s.visit(&mut f);
    f.settings.dedup();
    let setting = if f.computed_setting {
        Some(Setting::SetSome)
    } else if f.settings.is_empty() {
        None
    } else {
        let written: Option<Vec<String>> = f
            .settings
            .iter()
            .map(|n| match n {
                SettingName::Named(n) => Some(n.clone()),
                SettingName::Param(_) => None,
            })
            .collect();
        Some(written.map_or(Setting::SetBound(f.settings), Setting::Set))
    };
    Calls { session_lock: f.session_lock, shared_call: f.shared_call, setting, local_setting: f.local_setting }
}

/// Whether `s` creates a temporary object that outlives its transaction: `CREATE TEMP TABLE` (but for `ON
/// COMMIT DROP`), `CREATE TEMP VIEW`, `CREATE TEMP SEQUENCE`, `SELECT ... INTO TEMP`, or any of them named in
/// `pg_temp`.
fn temp_object(s: &Statement) -> bool {
    let in_pg_temp = |name: &ObjectName| {
        name.0.len() > 1 && name.0[0].as_ident().is_some_and(|i| i.value.eq_ignore_ascii_case("pg_temp"))
    };
    match s {
        Statement::CreateTable(ct) => {
            (ct.temporary || in_pg_temp(&ct.name)) && ct.on_commit != Some(ast::OnCommit::Drop)
        }
        Statement::CreateView(cv) => cv.temporary || in_pg_temp(&cv.name),
        Statement::CreateSequence { temporary, name, .. } => *temporary || in_pg_temp(name),
        Statement::Query(q) => match &*q.body {
            SetExpr::Select(select) => select.into.as_ref().is_some_and(|into| {
                into.temporary
                    || into.targets.iter().any(|t| {
                        matches!(t, Expr::CompoundIdentifier(parts)
                                if parts.len() > 1 && parts[0].value.eq_ignore_ascii_case("pg_temp"))
                    })
            }),
            _ => false,
        },
        _ => false,
    }
}

fn strip_cast(e: &Expr) -> &Expr {
    match e {
        Expr::Cast { expr, .. } | Expr::Nested(expr) => strip_cast(expr),
        e => e,
    }
}

fn param_index(p: &str) -> Option<usize> {
    p.strip_prefix('$')?.parse::<usize>().ok().filter(|&n| n >= 1).map(|n| n - 1)
}

fn join_condition(op: &ast::JoinOperator) -> Option<&Expr> {
    use ast::JoinOperator as J;
    let c = match op {
        J::Join(c) | J::Inner(c) | J::Left(c) | J::LeftOuter(c) | J::Right(c) | J::RightOuter(c) | J::FullOuter(c) => c,
        _ => return None,
    };
    match c {
        ast::JoinConstraint::On(e) => Some(e),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(sql: &str) -> Keys {
        let a = analyze(sql, "user_id", KeyType::Auto, &HashSet::from(["bots".to_string()]));
        assert!(a.parse_error.is_none(), "{sql}: {:?}", a.parse_error);
        a.statements[0].keys.clone()
    }

    #[test]
    fn basic_forms() {
        let v = |i| KeyExpr::Value(KeyValue::Int(i));
        assert_eq!(keys("SELECT * FROM users WHERE user_id = 5"), Keys::Some(vec![v(5)]));
        assert_eq!(keys("SELECT * FROM users u WHERE u.user_id = $2 AND x = 1"), Keys::Some(vec![KeyExpr::Param(1)]));
        assert_eq!(keys("SELECT * FROM users WHERE user_id IN (1, 2)"), Keys::Some(vec![v(1), v(2)]));
        assert_eq!(keys("SELECT * FROM users WHERE user_id = 1 OR name = 'x'"), Keys::None);
        assert_eq!(keys("SELECT * FROM users WHERE NOT (user_id = 1)"), Keys::None);
        assert_eq!(keys("SELECT * FROM users WHERE user_id = ANY($1)"), Keys::Some(vec![KeyExpr::ArrayParam(0)]));
        assert_eq!(keys("SELECT * FROM users WHERE user_id = 1 UNION SELECT * FROM users"), Keys::None);
    }

    #[test]
    fn settings_changed_by_set_config() {
        let changes = |sql: &str| {
            let a = analyze(sql, "user_id", KeyType::Auto, &HashSet::new());
            assert!(a.parse_error.is_none(), "{sql}: {:?}", a.parse_error);
            a.statements[0].setting.clone()
        };
        let set = |names: &[&str]| Some(Setting::Set(names.iter().map(|n| n.to_string()).collect()));
        assert_eq!(changes("SELECT set_config('Work_Mem', '9MB', false)"), set(&["work_mem"]));
        assert_eq!(changes("SELECT pg_catalog.set_config('app.tenant', $1, $2)"), set(&["app.tenant"]));
        assert_eq!(
            changes("SELECT set_config('a.b', '1', false), set_config('c.d'::text, '2', false)"),
            set(&["a.b", "c.d"])
        );
        // A local setting ends with its transaction: nothing to follow.
        assert_eq!(changes("SELECT set_config('work_mem', '9MB', true)"), None);
        assert_eq!(changes("SELECT set_config($1, $2, true)"), None);
        assert_eq!(
            changes("SELECT set_config('a.b', '1', false), set_config($2, '9MB', false)"),
            Some(Setting::SetBound(vec![SettingName::Named("a.b".into()), SettingName::Param(1)]))
        );
        assert_eq!(changes("SELECT set_config(lower('X.Y'), '1', false)"), Some(Setting::SetSome));
        assert_eq!(changes("SELECT current_setting('work_mem')"), None);
    }

    #[test]
    fn temporary_objects_that_outlive_their_transaction() {
        let temp = |sql: &str| {
            let a = analyze(sql, "user_id", KeyType::Auto, &HashSet::new());
            assert!(a.parse_error.is_none(), "{sql}: {:?}", a.parse_error);
            a.statements[0].temp_object
        };
        for sql in [
            "CREATE TEMP TABLE t (x int)",
            "CREATE TEMPORARY TABLE IF NOT EXISTS t (x int) ON COMMIT DELETE ROWS",
            "CREATE LOCAL TEMP TABLE t AS SELECT 1 AS x",
            "CREATE TABLE pg_temp.t (x int)",
            "CREATE TEMP VIEW v AS SELECT 1",
            "CREATE TEMP SEQUENCE s",
            "SELECT 1 AS x INTO TEMP t",
            "SELECT 1 AS x INTO pg_temp.t",
        ] {
            assert!(temp(sql), "{sql}");
        }
        for sql in [
            "CREATE TEMP TABLE t (x int) ON COMMIT DROP",
            "CREATE TABLE t (x int)",
            "CREATE VIEW v AS SELECT 1",
            "CREATE SEQUENCE s",
            "SELECT 1 AS x INTO t",
            "SELECT * FROM pg_temp.t",
        ] {
            assert!(!temp(sql), "{sql}");
        }
    }

    #[test]
    fn hints() {
        assert_eq!(find_hint("/* shard_key: 42 */ SELECT 1"), Some(Hint::ShardKey("42".into())));
        assert_eq!(find_hint("SELECT 1 /* x */ /* shard: eu */"), Some(Hint::Shard("eu".into())));
        assert_eq!(find_hint("/* shards: all */ SELECT refresh_bots()"), Some(Hint::AllShards));
        assert_eq!(first_word("  -- c\n /* x */ select"), "select");
    }

    proptest::proptest! {
        /// A statement that starts with a letter: its word is the longest run of ASCII letters there.
        #[test]
        fn first_word_is_the_leading_letters(word in "[a-zA-Z]{1,8}", rest in "[ -~\u{80}-\u{10ff}]{0,8}") {
            let sql = format!("{word}{rest}");
            let letters = sql.bytes().take_while(u8::is_ascii_alphabetic).count();
            proptest::prop_assert_eq!(first_word(&sql), &sql[..letters]);
        }
    }
}
