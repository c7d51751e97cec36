//! One client's session: reads its messages, asks the planner where each statement goes and the
//! transaction state machine (`txn.rs`) what to do with it, and relays the server's answers as bytes. The
//! simple protocol (`simple.rs`), the extended protocol (`extended.rs`), COPY (`copy.rs`) and statements
//! for several shards (`merge.rs`) are views of this one dispatch: each turns its messages into statements,
//! and every statement goes through [`Session::decide`] and [`super::txn::Txn::plan`].
//!
//! Transaction pooling: outside a transaction a statement borrows a connection for the length of one
//! exchange (up to ReadyForQuery) and gives it back when the server reports idle; session pooling keeps the
//! client's connections for its whole session.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use shardmap::sql::{Analysis, Kind, Setting};
use shardmap::{Decision, Param, Params, RouteError, ShardId};

use super::links::{Link, Links};
use super::settings::{Change, Settings};
use super::txn::{Dest, Local, State, Stmt, Txn};
use super::Routing;
use crate::backend::checkout::{self, Checkout, CONNECT_FAILED, SETTINGS_UNKNOWN};
use crate::backend::pool::Pooled;
use crate::backend::Backends;
use crate::net::proto;
use crate::net::wire::{Framed, Msg, Stream};
pub use crate::net::{Fatal, Reported};

/// A client statement prepared with Parse.
pub struct ClientStmt {
    /// The text as the planner reads it (UTF-8).
    pub text: Arc<str>,
    /// The text as the client sent it (in its `client_encoding`), for Parse messages the router writes.
    pub raw: bytes::Bytes,
    pub types: Vec<u32>,
    pub analysis: Arc<Analysis>,
    /// The name it has on server connections (`sr_<hash>`; empty for the unnamed statement).
    pub server_name: String,
}

/// A client's prepared statements by name. The unnamed statement is kept apart: most drivers parse every
/// statement as the unnamed one, and its three or four lookups per statement (Parse, Bind, Describe, the
/// rewrite for the server) then cost no hash of the name.
#[derive(Default)]
pub struct Statements {
    unnamed: Option<ClientStmt>,
    named: foldhash::HashMap<String, ClientStmt>,
}

impl Statements {
    pub fn get(&self, name: &str) -> Option<&ClientStmt> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn insert(&mut self, name: &str, st: ClientStmt) {
        if name.is_empty() {
            self.unnamed = Some(st);
        } else {
            self.named.insert(name.to_string(), st);
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<ClientStmt> {
        if name.is_empty() {
            self.unnamed.take()
        } else {
            self.named.remove(name)
        }
    }

    /// Forgets every statement, the unnamed one too (`DEALLOCATE ALL`, `DISCARD ALL`).
    pub fn clear(&mut self) {
        self.unnamed = None;
        self.named.clear();
    }
}

/// Why handling a client's message stopped: an error the client is told (its session goes on), or the end
/// of its connection.
pub enum Failure {
    Reported(Reported),
    Fatal(Fatal),
}

impl From<Reported> for Failure {
    fn from(e: Reported) -> Self {
        Failure::Reported(e)
    }
}

impl From<Fatal> for Failure {
    fn from(e: Fatal) -> Self {
        Failure::Fatal(e)
    }
}

/// The shard that carries LISTEN, UNLISTEN and NOTIFY in session mode, so that listeners and notifiers meet.
pub const NOTIFY_SHARD: ShardId = ShardId(0);

/// How the client's text is encoded (`client_encoding`): the router reads statements to route them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Utf8,
    /// LATIN1 (ISO 8859-1): each byte is the character of the same number.
    Latin1,
    /// Any other: read as UTF-8 where it is, replacement characters elsewhere (keys are rarely outside
    /// ASCII; a text key with such characters needs UTF8 or LATIN1).
    Other,
}

impl Encoding {
    /// The encoding PostgreSQL names `name` (case and punctuation ignored, as PostgreSQL does).
    pub fn named(name: &str) -> Encoding {
        let n: String = name.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase();
        match n.as_str() {
            "utf8" | "unicode" => Encoding::Utf8,
            "latin1" | "iso88591" => Encoding::Latin1,
            "sqlascii" => Encoding::Utf8,
            _ => Encoding::Other,
        }
    }

    /// Text back in this encoding (for statements the router replays).
    pub fn encode<'a>(&self, s: &'a str) -> std::borrow::Cow<'a, [u8]> {
        match self {
            Encoding::Latin1 if !s.is_ascii() => {
                std::borrow::Cow::Owned(s.chars().map(|c| u32::from(c).min(255) as u8).collect())
            }
            _ => std::borrow::Cow::Borrowed(s.as_bytes()),
        }
    }

    /// A statement's text for the planner.
    pub fn decode<'a>(&self, b: &'a [u8]) -> std::borrow::Cow<'a, str> {
        match std::str::from_utf8(b) {
            Ok(s) => std::borrow::Cow::Borrowed(s),
            Err(_) if *self == Encoding::Latin1 => std::borrow::Cow::Owned(b.iter().map(|&c| c as char).collect()),
            Err(_) => String::from_utf8_lossy(b),
        }
    }
}

/// Bind parameters read in place from a Bind message.
pub struct BindParams<'a> {
    pub bind: &'a proto::Bind<'a>,
    pub types: &'a [u32],
}

impl Params for BindParams<'_> {
    fn param(&self, i: usize) -> Option<Param<'_>> {
        let value = self.bind.value(i)?;
        Some(Param { value, binary: self.bind.binary(i), oid: self.types.get(i).copied().unwrap_or(0) })
    }
}

impl checkout::Carry for Settings {
    fn hash(&self) -> u64 {
        Settings::hash(self)
    }

    fn replay_sql(&self, reset_first: bool) -> String {
        Settings::replay_sql(self, reset_first)
    }
}

/// What [`Session::link_now`] found.
pub enum Linked {
    Done(Result<usize, Reported>),
    Wait(checkout::Wait),
    Slow,
}

pub struct Session<S> {
    pub io: Framed<S>,
    pub routing: Arc<Routing>,
    /// The client's way to the servers (pools, failover, breaker).
    pub backend: Checkout,
    /// Session settings remembered and replayed on the connections the client gets.
    pub settings: Settings,
    /// What routing needs of the session (database, `gb.shard_key`, `gb.tenant`).
    pub route: shardmap::Session,
    pub txn: Txn,
    /// The server connections held now.
    pub links: Links,
    pub statements: Statements,
    /// Whether the client ran LISTEN (session mode): notifications are relayed as they arrive.
    pub listening: bool,
    /// Messages read from the client but not handled yet (what followed a COPY in the same batch).
    pub inbox: VecDeque<Msg>,
    /// Settings changed by statements of the open transaction: read back from the server when it ends.
    pub txn_settings: Vec<Setting>,
    pub encoding: Encoding,
    /// An extended-protocol sync group failed: messages are skipped up to the next Sync.
    pub group_failed: bool,
    /// What the statements of the open sync group do once their connections' Sync comes back.
    pub group_effects: Vec<super::extended::Effect>,
    /// Connections of the open sync group without the settings a COMMIT committed at a Flush (they were in the
    /// group before it): the group's statements are refused there.
    pub stale_in_group: Vec<Dest>,
    /// Session mode: cursors declared WITH HOLD, which outlive their transaction, and where they are.
    pub held_cursors: std::collections::HashMap<String, Dest>,
    /// A client statement starts with COPY (its Execute may start a COPY before any Sync).
    pub copy_statements: bool,
    /// Where every statement of the session goes, when that is known (see `Planner::fixed`).
    fixed: Option<Dest>,
    /// Session mode: server-side statements the client closed (or `*` for DEALLOCATE ALL), to close on its
    /// connections once they are between exchanges (see `tidy`).
    pub to_close: Vec<String>,
    /// The schema epoch `route.key_positions` and `collations` were read in (a schema change through the
    /// router forgets them).
    positions_epoch: u64,
    /// Table columns' collations other than the database's default, by (table OID, column number), as read
    /// for combined reads (`None`: the default).
    pub collations: std::collections::HashMap<(u32, i16), Option<String>>,
    /// A schema change ran in the current exchange or transaction (the schema epoch moves again once it
    /// ended).
    schema_changed: bool,
    /// Sharded tables created or altered since the last exchange: their new sequences are interleaved
    /// across shards (`sequences.rs`).
    pub new_sequences: Vec<String>,
    /// Resolves when the router shuts down (see [`super::Registry::stop_signal`]): the session ends at its
    /// next moment outside a transaction. A channel of the session's own, so that waiting for the client's
    /// next message next to it touches no lock that other sessions share.
    pub stop: Option<tokio::sync::oneshot::Receiver<()>>,
    /// The list the last simple-protocol statement's literals were taken into, emptied, for the next one's.
    pub spare_literals: Vec<shardmap::shape::Literal<'static>>,
}

/// A stable hash of a statement's text and parameter types, for server-side statement names.
pub fn statement_hash(text: &str, types: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    types.hash(&mut h);
    h.finish()
}

/// Session-level advisory locks and temporary objects belong to a server connection, which transaction
/// pooling shares: other clients would meet them there, and they would not follow their own client.
pub fn refuse_connection_state(analysis: &Analysis) -> Result<(), Reported> {
    if analysis.statements.iter().any(|s| s.session_lock) {
        return Err(Reported::unsupported(
            "session-level advisory locks (pg_advisory_lock, pg_advisory_unlock...) would stay on a pooled server connection shared with other clients; use pg_advisory_xact_lock inside a transaction",
        ));
    }
    if analysis.statements.iter().any(|s| s.temp_object) {
        return Err(Reported::unsupported(
            "a temporary table, view or sequence would stay on a pooled server connection shared with other clients, and would not follow this client to its next one; create the table inside a transaction with ON COMMIT DROP, or use pool-mode,session",
        ));
    }
    Ok(())
}

impl<S: Stream> Session<S> {
    pub fn new(
        io: Framed<S>,
        routing: Arc<Routing>,
        backends: Arc<Backends>,
        user: String,
        database: String,
        params: &[(String, String)],
        cancel: Arc<crate::backend::cancel::Slot>,
    ) -> Session<S> {
        let settings = Settings::from_startup(params);
        let encoding = params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("client_encoding"))
            .map_or(Encoding::Utf8, |(_, v)| Encoding::named(v));
        let two_phase = routing.map.two_phase;
        Session {
            io,
            routing,
            backend: Checkout::new(backends, user, database.clone(), cancel),
            settings,
            route: shardmap::Session {
                database: Some(database),
                relations: Some(Default::default()),
                ..Default::default()
            },
            txn: Txn { two_phase, ..Txn::default() },
            links: Links::default(),
            statements: Default::default(),
            listening: false,
            inbox: VecDeque::new(),
            txn_settings: Vec::new(),
            encoding,
            group_failed: false,
            stale_in_group: Vec::new(),
            group_effects: Vec::new(),
            held_cursors: Default::default(),
            copy_statements: false,
            fixed: None,
            to_close: Vec::new(),
            positions_epoch: 0,
            collations: Default::default(),
            new_sequences: Vec::new(),
            schema_changed: false,
            stop: None,
            spare_literals: Vec::new(),
        }
    }

    /// Forgets what was read of the schema (key positions, collations) after a schema change through the
    /// router.
    pub fn schema_checked(&mut self) {
        let epoch = self.backend.backends.schema_epoch.load(std::sync::atomic::Ordering::Relaxed);
        if self.positions_epoch != epoch {
            self.route.key_positions.clear();
            self.route.relations.as_mut().map(std::collections::HashMap::clear);
            self.collations.clear();
            self.positions_epoch = epoch;
        }
    }

    /// `INSERT INTO table VALUES (...)` without a column list: the position of the table's key among its
    /// columns, read from a shard (as the client's search path resolves the name) once per session and
    /// table, and again after a schema change through the router. A table the server does not know gets the
    /// server's error. Not needed where the destination is known whatever the statement (one node, a
    /// tenant's database). Read on a connection the session holds when it has one (its transaction's first),
    /// inside a savepoint when in a transaction: a session that holds connections does not wait for another
    /// (on a full pool, clients each in a transaction waiting for a second connection would wait for each
    /// other until `pool-timeout-ms`) — unless the one it holds is busy with an unsynced pipeline.
    pub async fn learn_key_positions(&mut self, analysis: &Analysis) -> Result<(), Reported> {
        if self.fixed().is_some() {
            return Ok(());
        }
        self.schema_checked();
        for st in &analysis.statements {
            let (Some(_), shardmap::sql::Tables::Sharded(t)) = (&st.positional, &st.tables) else { continue };
            if self.route.key_positions.contains_key(t) {
                continue;
            }
            let sql = format!(
                "SELECT (SELECT count(*) FROM pg_attribute b WHERE b.attrelid = a.attrelid AND b.attnum > 0 \
                   AND NOT b.attisdropped AND b.attnum < a.attnum) \
                 FROM pg_attribute a WHERE a.attrelid = {}::regclass AND a.attname = {} AND NOT a.attisdropped",
                shardmap::sql::quote_literal(&shardmap::sql::quote_ident(t)),
                shardmap::sql::quote_literal(self.routing.map.key_of(t)),
            );
            let row = match self.schema_row(&sql).await {
                // (On one server the string's CREATE TABLE would run before its INSERT.)
                Err(e) if e.code == "42P01" && analysis.statements.iter().any(|s| s.kind == Kind::Ddl) => {
                    return Err(Reported::unsupported(format!(
                        "an INSERT into {t} without a column list after a schema change in the same query string is not supported (the router reads where the shard key is before the string runs): send the INSERT on its own"
                    )))
                }
                row => row?,
            };
            let pos = row.into_iter().next().flatten().and_then(|v| v.parse::<usize>().ok());
            self.route.key_positions.insert(t.clone(), pos);
        }
        Ok(())
    }

    /// A read spanning shards names relations the session does not know yet (`RouteError::Relations`): what
    /// each is on the servers — a table, a view, a sequence, a foreign table — read from a shard as the
    /// client's search path resolves the name (where `learn_key_positions` reads), once per session and name,
    /// and again after a schema change through the router. A view is classed by its definition
    /// (`Planner::view_relation`), after what it reads in turn.
    pub async fn learn_relations(&mut self, names: Vec<String>) -> Result<(), Reported> {
        use shardmap::Relation;
        self.schema_checked();
        let (mut todo, mut views) = (names, Vec::new());
        // (Views are nested at most this deep here; deeper ones are refused as unreadable.)
        for _ in 0..32 {
            while let Some(name) = todo.pop() {
                if self.route.relations.get_or_insert_default().contains_key(&name) {
                    continue;
                }
                let sql = format!(
                    "SELECT c.relkind::text, CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END \
                     FROM (SELECT to_regclass({}) AS oid) r LEFT JOIN pg_class c ON c.oid = r.oid",
                    shardmap::sql::quote_literal(&name)
                );
                let mut row = self.schema_row(&sql).await?.into_iter();
                let (kind, def) = (row.next().flatten(), row.next().flatten());
                let relation = match (kind.as_deref(), def) {
                    (Some("S"), _) => Relation::Sequence,
                    (Some("f"), _) => {
                        Relation::Opaque("a foreign table, which each shard reads from its own server".into())
                    }
                    (Some("v" | "m"), Some(def)) => {
                        views.push((name, def));
                        continue;
                    }
                    _ => Relation::Sharded,
                };
                self.route.relations.get_or_insert_default().insert(name, relation);
            }
            let known = self.route.relations.get_or_insert_default();
            views.retain(|(name, def)| match self.routing.planner.view_relation(def, known) {
                Ok(r) => {
                    known.insert(name.clone(), r);
                    false
                }
                Err(more) => {
                    todo.extend(more);
                    true
                }
            });
            if views.is_empty() {
                return Ok(());
            }
        }
        let known = self.route.relations.get_or_insert_default();
        for (name, _) in views {
            known.insert(name, Relation::Opaque("a view nested too deep for the router to read".into()));
        }
        Ok(())
    }

    /// One row of a query of the router's own about the schema (any shard answers: the schema is the same on
    /// every one), on a connection the session holds when it has one (its transaction's first), inside a
    /// savepoint when in a transaction: a session that holds connections does not wait for another (on a
    /// full pool, clients each in a transaction waiting for a second connection would wait for each other
    /// until `pool-timeout-ms`) — unless the one it holds is busy with an unsynced pipeline. A server error
    /// is the client's.
    async fn schema_row(&mut self, sql: &str) -> Result<Vec<Option<String>>, Reported> {
        let row = match self.quiet_link() {
            Some(i) => Self::query_row_in_place(self.links.get(i).conn.conn(), sql).await,
            None => {
                let dest = self.spare_dest();
                let mut p = self.backend.get(dest.shard, dest.db.as_deref(), &self.settings).await?;
                let row = p.conn().query_row(sql).await;
                if matches!(row, Ok(_) | Err(crate::backend::conn::BackendError::Server { .. })) {
                    // (Otherwise the connection is lost: dropped, which closes it.)
                    p.release();
                }
                row
            }
        };
        match row {
            Ok(row) => Ok(row),
            Err(crate::backend::conn::BackendError::Server { code, message, .. }) => Err(Reported::new(&code, message)),
            Err(e) => Err(e.into()),
        }
    }

    /// A setting a held transaction queues (SET, SET LOCAL, SET TRANSACTION, RESET) is answered by the router:
    /// the server checks it first, as one PostgreSQL would refuse a bad value or an unknown name (22023, 42704), inside a
    /// transaction rolled back at once, on an idle connection the session holds or one free in a pool — never
    /// waiting for one (a pipeline may hold the session's, a shard may be down: then it goes unchecked, and a
    /// bad value fails the statement that opens the transaction). A custom setting (`app.tenant`), which takes
    /// any value, is not checked (no round trip).
    pub async fn check_held_setting(&mut self, stmt: &Stmt, text: &str) -> Result<(), Reported> {
        use crate::backend::conn::{BackendError, ServerConn};
        if !stmt.setting || stmt.verb.is_some() || custom_setting(text) {
            return Ok(());
        }
        // (Inside the held transaction as it stands — its BEGIN, with its isolation level, and what it queued,
        // `txn::SNAPSHOT` included — so that a SET TRANSACTION is answered as it would be there. Lines apart: a
        // comment at the end of a statement ends with its line.)
        let mut sql = String::new();
        for q in self.txn.queued() {
            sql.push_str(q);
            sql.push_str("\n;");
        }
        if sql.is_empty() {
            sql.push_str("BEGIN;");
        }
        sql.push_str(text);
        sql.push_str("\n;ROLLBACK");
        async fn check(conn: &mut ServerConn, sql: &str) -> Result<Result<(), Reported>, BackendError> {
            match conn.run_quiet(sql).await {
                Ok(()) => Ok(Ok(())),
                Err(BackendError::Server { code, message, .. }) => {
                    conn.run_quiet("ROLLBACK").await?;
                    Ok(Err(Reported::new(&code, message)))
                }
                Err(e) => Err(e),
            }
        }
        // (A connection lost or not to be had leaves the setting unchecked, not refused: it is not the SET's.)
        if let Some(i) = self.quiet_link() {
            return match check(self.links.get(i).conn.conn(), &sql).await {
                Ok(checked) => checked,
                Err(_) => {
                    drop(self.links.remove(i));
                    Ok(())
                }
            };
        }
        let dest = self.spare_dest();
        let Ok(Some(mut p)) = self.backend.get_with(dest.shard, dest.db.as_deref(), &self.settings, false).await else {
            return Ok(());
        };
        match check(p.conn(), &sql).await {
            Ok(checked) => {
                p.release();
                checked
            }
            Err(_) => Ok(()),
        }
    }

    /// Where a query of the router's own goes when no connection the session holds can run it now (its
    /// transaction's is busy with an unsynced pipeline): a shard the session holds no connection of, when there
    /// is one — a checkout from the busy connection's pool could wait for that very connection (with
    /// `pool-size 1`, until `pool-timeout-ms`). Any shard answers: the schema is the same on every one.
    fn spare_dest(&self) -> Dest {
        let mut dest = self.any_dest(0);
        for attempt in 1..=self.routing.map.nodes.len() {
            if !self.links.iter().any(|l| l.dest.shard == dest.shard) {
                break;
            }
            dest = self.any_dest(attempt);
        }
        dest
    }

    /// A connection the session holds that can run a query of the router's own now — a primary's, no sync
    /// group open on it, its server not in a failed transaction — the transaction's first.
    fn quiet_link(&self) -> Option<usize> {
        let quiet = |l: &Link| !l.pending && !l.replica && l.status() != proto::READY_FAILED;
        self.links
            .iter()
            .position(|l| quiet(l) && self.txn.holds(&l.dest))
            .or_else(|| self.links.iter().position(quiet))
    }

    /// [`ServerConn::query_row`](crate::backend::conn::ServerConn::query_row) on a connection the session
    /// holds: in a transaction, inside a savepoint, so that an error leaves the client's transaction as it was.
    async fn query_row_in_place(
        conn: &mut crate::backend::conn::ServerConn,
        sql: &str,
    ) -> Result<Vec<Option<String>>, crate::backend::conn::BackendError> {
        if conn.status != proto::READY_IN_TX {
            return conn.query_row(sql).await;
        }
        const SP: &str = "gb_router_key_position";
        let row = conn.query_row(&format!("SAVEPOINT {SP}; {sql}; RELEASE SAVEPOINT {SP}")).await;
        if row.is_err() && conn.status == proto::READY_FAILED {
            conn.run_quiet(&format!("ROLLBACK TO SAVEPOINT {SP}; RELEASE SAVEPOINT {SP}")).await?;
        }
        row
    }

    /// The client's startup: one checkout validates its startup settings and gives the server's parameters
    /// (any live shard will do; the tenant's own under the tenant strategy) — under transaction pooling only
    /// when no client of the same user, database and startup settings started there within the last minute
    /// (then what the server answered that one); then ParameterStatus, BackendKeyData and ReadyForQuery.
    /// `Err` is what the client is told before its connection closes.
    pub async fn start(&mut self, cancel_key: (i32, i32)) -> Result<(), Reported> {
        self.refix();
        let map = self.routing.map.clone();
        // Where every node serves one database, that is the database: another name does not exist, as a
        // server would say (rather than serving the client from a database it did not ask for).
        let names: Vec<Option<&str>> =
            map.nodes.iter().map(|n| n.addr.as_ref().and_then(|a| a.dbname.as_deref())).collect();
        // (Under the tenant strategy a tenant's database is also one: it is looked for at the checkout below.)
        let tenant_db =
            map.strategy == shardmap::Strategy::Tenant && map.tenant_of_database(&self.backend.database).is_some();
        if let (Some(Some(only)), false) = (names.first(), tenant_db) {
            if names.iter().all(|n| n == &Some(*only)) && self.backend.database != *only {
                return Err(Reported::new(
                    "3D000",
                    format!(
                        "database \"{}\" does not exist (this router serves database \"{only}\")",
                        self.backend.database
                    ),
                ));
            }
        }
        let candidates: Vec<Dest> = match self.fixed() {
            Some(f) => vec![f],
            None if map.strategy == shardmap::Strategy::Tenant => {
                map.all().map(|shard| Dest { shard, db: None }).collect()
            }
            None => {
                let first = self.backend.backends.any_shard().0 as usize;
                let n = map.nodes.len();
                (0..n).map(|i| Dest { shard: ShardId(((first + i) % n) as u16), db: None }).collect()
            }
        };
        let mut server_params = None;
        let mut last_error = None;
        for dest in candidates {
            // Transaction pooling: what the server answered a client that started there as this one does
            // (same user, database and startup settings), without a checkout (see `Checkout::welcome`).
            // Session pooling takes the client's connection now.
            let known = (!self.routing.session_mode)
                .then(|| self.backend.welcome(dest.shard, dest.db.as_deref(), &self.settings))
                .flatten();
            if let Some(params) = known {
                server_params = Some(params);
                break;
            }
            match self.backend.get(dest.shard, dest.db.as_deref(), &self.settings).await {
                Ok(mut p) => {
                    let params = &p.conn().params;
                    self.backend.remember_welcome(dest.shard, dest.db.as_deref(), &self.settings, params);
                    server_params = Some(params.as_slice().into());
                    self.give_back(dest, p);
                    break;
                }
                Err(e) => last_error = Some(e),
            }
        }
        let Some(server_params) = server_params else {
            return Err(last_error.unwrap_or_else(|| Reported::new(CONNECT_FAILED, "no shard is configured")));
        };
        for (k, v) in server_params.iter() {
            proto::parameter_status(&mut self.io.wbuf, k, v);
            if k == "client_encoding" {
                self.encoding = Encoding::named(v);
            }
        }
        crate::frontend::startup::backend_key(&mut self.io.wbuf, cancel_key.0, cancel_key.1);
        proto::ready(&mut self.io.wbuf, proto::READY_IDLE);
        self.io.flush().await.map_err(|e| Reported::new("08006", e.to_string()))
    }

    /// Serves the client until it leaves. Server connections it holds are given back or closed.
    pub async fn run(&mut self) -> Result<(), Fatal> {
        let result = self.serve().await;
        // Session mode: the client's idle connections are reset and go back; any other (mid-transaction)
        // is closed, which rolls it back: never reused dirty.
        for mut l in self.links.take_all() {
            if self.routing.session_mode
                && l.status() == proto::READY_IDLE
                && !l.pending
                && l.conn.conn().run_quiet("DISCARD ALL").await.is_ok()
            {
                let conn = l.conn.conn();
                conn.prepared.clear();
                conn.settings = 0;
                l.conn.release();
            }
        }
        if self.schema_changed {
            // (A schema change in the client's last exchange, or in a transaction it left open and the close
            // above rolled back: what other sessions read of the schema meanwhile is forgotten.)
            self.backend.backends.schema_epoch.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }

    async fn serve(&mut self) -> Result<(), Fatal> {
        let mut batch: Vec<Msg> = Vec::new();
        // The bytes of `batch` (router-max-client-buffer-bytes bounds them).
        let mut held = 0usize;
        let max_held = self.routing.config.load().router.limits.max_client_buffer_bytes as usize;
        loop {
            if !self.to_close.is_empty() && batch.is_empty() {
                Box::pin(self.tidy()).await;
            }
            if !self.new_sequences.is_empty() && batch.is_empty() {
                Box::pin(self.interleave_sequences()).await;
            }
            if self.schema_changed && batch.is_empty() && !self.txn.open() {
                // A schema change ran and is committed (or undone): what other sessions read of the schema
                // while it ran is forgotten.
                self.schema_changed = false;
                self.backend.backends.schema_epoch.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if batch.is_empty() && !self.txn.open() && self.stop.as_mut().is_some_and(stopped) {
                return Err(Fatal::Limit(super::shutting_down()));
            }
            // (Between exchanges the idle timeouts apply; in the middle of a batch, not. A message read already
            // — the rest of a batch comes in one read — is taken without an await.)
            let next = match self.next_buffered()? {
                Some(m) => Ok(Some(m)),
                None if batch.is_empty() => self.next_idle().await,
                None => self.next().await,
            };
            let Some(msg) = next? else { return Ok(()) };
            if batch.is_empty() {
                // An exchange starts: the config as of now (a RELOAD while the client was idle applies).
                self.backend.refresh();
            }
            tracing::trace!(tag = %(msg.tag as char), len = msg.frame.len(), "client message");
            match msg.tag {
                b'Q' => {
                    if !batch.is_empty() {
                        // A Query after extended messages without Sync: they are handled first, as a server
                        // would before the Query.
                        batch.push(sync_message());
                        self.batch(&batch).await?;
                        batch.clear();
                        held = 0;
                    }
                    self.query(msg).await?
                }
                b'P' | b'B' | b'D' | b'E' | b'C' => {
                    if batch.len() >= 10_000 {
                        return Err(Fatal::Protocol(
                            "more than 10000 extended-protocol messages without a Sync".into(),
                        ));
                    }
                    held += msg.frame.len();
                    if held > max_held {
                        return Err(Fatal::Limit(Reported::new(
                            "54000",
                            format!(
                                "the extended-protocol messages sent without a Sync hold more than {max_held} bytes (router-max-client-buffer-bytes): send a Sync (or a Flush) more often"
                            ),
                        )));
                    }
                    let copy_starts = msg.tag == b'E' && self.binds_copy_in(&batch);
                    batch.push(msg);
                    if copy_starts {
                        // COPY FROM STDIN: the server answers CopyInResponse without waiting for a Sync, and
                        // some clients wait for it before sending one.
                        self.batch(&batch).await?;
                        batch.clear();
                        held = 0;
                    }
                }
                b'H' | b'S' => {
                    // (The batch's vector is reused from one batch to the next.)
                    batch.push(msg);
                    self.batch(&batch).await?;
                    batch.clear();
                    held = 0;
                }
                b'X' => return Ok(()),
                // CopyData, CopyDone, CopyFail outside COPY: PostgreSQL ignores them too.
                b'd' | b'c' | b'f' => {}
                other => return Err(Fatal::Protocol(format!("unexpected message type {:?}", other as char))),
            }
        }
    }

    /// Session mode: closes on the client's connections the server-side statements it closed (`DEALLOCATE
    /// ALL`: all of them), so that what the server holds is what the client prepared. Between exchanges only.
    async fn tidy(&mut self) {
        let names = std::mem::take(&mut self.to_close);
        for l in self.links.iter_mut().filter(|l| !l.pending) {
            let conn = l.conn.conn();
            if names.iter().any(|n| n == "*") {
                if conn.run_quiet("DEALLOCATE ALL").await.is_ok() {
                    conn.prepared.clear();
                }
                continue;
            }
            for n in &names {
                if conn.prepared.remove(n) {
                    let _ = conn.run_quiet(&format!("DEALLOCATE {}", shardmap::sql::quote_ident(n))).await;
                }
            }
        }
    }

    /// Whether the last Bind of `batch` is of a COPY ... FROM STDIN.
    fn binds_copy_in(&self, batch: &[Msg]) -> bool {
        // (Cheap first: no client statement is a COPY, and no Parse here starts with COPY.)
        // (Only the start of the query text is looked at: after the statement name's NUL.)
        let copy_parse = |m: &Msg| {
            m.tag == b'P'
                && proto::read_cstr(m.body()).is_some_and(|(_, rest)| {
                    let q = rest.trim_ascii_start();
                    q.len() >= 4 && q[..4].eq_ignore_ascii_case(b"copy")
                })
        };
        if !self.copy_statements && !batch.iter().any(copy_parse) {
            return false;
        }
        let Some(bind) = batch.iter().rev().find(|m| m.tag == b'B').and_then(|m| proto::read_bind(m.body())) else {
            return false;
        };
        // The statement's Parse in this batch (not registered yet), else the client's statement.
        let parsed = batch
            .iter()
            .rev()
            .filter(|m| m.tag == b'P')
            .filter_map(|m| proto::read_parse_bytes(m.body()))
            .find(|p| p.name == bind.statement)
            .map(|p| self.routing.planner.analyze(&self.encoding.decode(p.query)));
        let analysis = parsed.or_else(|| self.statements.get(bind.statement).map(|st| st.analysis.clone()));
        analysis.is_some_and(|a| a.statements.iter().any(|s| s.kind == Kind::CopyIn))
    }

    /// The client's next message: what is waiting in the inbox, else from its socket (in session mode after
    /// LISTEN, notifications are relayed while waiting). `None` at the end of its stream.
    pub async fn next(&mut self) -> Result<Option<Msg>, Fatal> {
        if let Some(m) = self.inbox.pop_front() {
            return Ok(Some(m));
        }
        loop {
            if !self.listening {
                return Ok(self.io.read().await?);
            }
            if let Some(m) = Box::pin(self.read_or_notify()).await? {
                return Ok(m);
            }
        }
    }

    /// [`Session::next`] without waiting: the next message when it is in the inbox or read already (`None`:
    /// wait for it with [`Session::next`] or [`Session::next_idle`]).
    #[inline]
    fn next_buffered(&mut self) -> Result<Option<Msg>, Fatal> {
        if let Some(m) = self.inbox.pop_front() {
            return Ok(Some(m));
        }
        if self.listening {
            return Ok(None);
        }
        Ok(self.io.read_buffered()?)
    }

    /// The client's next message between exchanges (see [`Session::next`]), waiting at most `router-idle-transaction-timeout-s` inside a
    /// transaction and `router-client-idle-timeout-s` outside one (0: for ever); past it the connection ends
    /// as PostgreSQL ends it for `idle_in_transaction_session_timeout` (25P03, the transaction rolled back)
    /// and `idle_session_timeout` (57P05).
    async fn next_idle(&mut self) -> Result<Option<Msg>, Fatal> {
        if !self.inbox.is_empty() || self.listening || self.io.buffered() > 0 {
            return self.next().await;
        }
        let limits = &self.backend.config.router.limits;
        let (secs, code, what, key) = if self.txn.open() {
            (
                limits.idle_transaction_timeout_s,
                "25P03",
                "terminating connection due to idle-in-transaction timeout",
                "router-idle-transaction-timeout-s",
            )
        } else {
            (
                limits.client_idle_timeout_s,
                "57P05",
                "terminating connection due to idle-session timeout",
                "router-client-idle-timeout-s",
            )
        };
        let idle = async {
            match secs {
                0 => std::future::pending().await,
                s => tokio::time::sleep(std::time::Duration::from_secs(s)).await,
            }
        };
        // A shutdown ends an idle session at once; inside a transaction it waits for the transaction's end.
        let stop = match self.stop.as_mut() {
            Some(f) if !self.txn.open() => Some(f),
            _ => None,
        };
        let stop = async {
            match stop {
                Some(f) => drop(f.await),
                None => std::future::pending().await,
            }
        };
        // (Biased: the client's message first, without drawing a random branch order each time.)
        tokio::select! {
            biased;
            m = self.io.read() => Ok(m?),
            _ = stop => {
                self.stop = None;
                Err(Fatal::Limit(super::shutting_down()))
            }
            _ = idle => Err(Fatal::Limit(Reported::new(code, format!("{what} ({key} is {secs})")))),
        }
    }

    /// Session mode after LISTEN: waits for the client's next message or a notification on the connection
    /// that listens, relaying notifications at once. `None` when a notification was relayed.
    async fn read_or_notify(&mut self) -> Result<Option<Option<Msg>>, Fatal> {
        let dest = Dest { shard: NOTIFY_SHARD, db: None };
        let Some(i) = self.links.find(&dest) else {
            self.listening = false;
            return Ok(Some(self.io.read().await?));
        };
        let (io, links) = (&mut self.io, &mut self.links);
        tokio::select! {
            m = io.read() => Ok(Some(m?)),
            n = links.get(i).conn.conn().read() => {
                match n {
                    Ok(m) => {
                        io.push(&m.frame);
                        io.flush().await?;
                    }
                    Err(_) => {
                        // The listening connection is gone: so are its LISTENs.
                        links.remove(i);
                        self.listening = false;
                    }
                }
                Ok(None)
            }
        }
    }

    /// Where every statement of the session goes, when that is known (see `Planner::fixed`).
    pub fn fixed(&self) -> Option<Dest> {
        if self.routing.map.strategy == shardmap::Strategy::Tenant {
            // (A tenant's database can move to another node: asked each time.)
            return self.routing.planner.fixed(&self.route).map(|(shard, db)| Dest { shard, db });
        }
        self.fixed.clone()
    }

    /// Computes [`Session::fixed`] again (after `SET gb.tenant`, `DISCARD ALL`).
    pub fn refix(&mut self) {
        self.fixed = self.routing.planner.fixed(&self.route).map(|(shard, db)| Dest { shard, db });
    }

    /// What to do with a statement and its route: the transaction state machine's plan (with the session's
    /// fixed destination and node names for messages), cursors WITH HOLD followed.
    pub fn plan(&mut self, stmt: &Stmt, route: &Result<Decision, RouteError>) -> super::txn::Plan {
        let fixed = self.fixed();
        let map = &self.routing.map;
        let plan = self
            .txn
            .plan(stmt, route.as_ref().map_err(|e| e.clone().into()), fixed.as_ref(), &|s| map.node(s).name.clone());
        use super::txn::{Plan, To};
        // Where the plan sends a statement to several shards, one the router runs itself runs there.
        match (plan, stmt.router) {
            (Plan::Run(To::Fan(shards)), Some(run)) => Plan::Run(To::Router { run, every: false, open: false, shards }),
            (Plan::Run(To::Parts(shards)), Some(run)) => {
                Plan::Run(To::Router { run, every: true, open: false, shards })
            }
            (Plan::Run(To::OpenParts(shards)), Some(run)) => {
                Plan::Run(To::Router { run, every: true, open: true, shards })
            }
            (Plan::Run(to), _) => Plan::Run(self.cursor_home(to, stmt)),
            (other, _) => other,
        }
    }

    /// Session mode, outside a transaction: FETCH, MOVE and CLOSE of a cursor declared WITH HOLD go where
    /// it is.
    pub fn cursor_home(&self, to: super::txn::To, stmt: &Stmt) -> super::txn::To {
        if self.held_cursors.is_empty() {
            return to;
        }
        match (&to, &stmt.cursor, stmt.declare) {
            (super::txn::To::Any, Some(name), None) => {
                self.held_cursors.get(&**name).map_or(to, |d| super::txn::To::Once(d.clone()))
            }
            _ => to,
        }
    }

    /// What the transaction state machine needs of an analysed statement; `text` is its SQL.
    pub fn stmt(&mut self, analysis: &Analysis, text: &str) -> Stmt {
        if self.routing.map.strategy != shardmap::Strategy::Tenant {
            for st in &analysis.statements {
                if let Some(t) = &st.sequences_of {
                    self.new_sequences.push(t.clone());
                }
            }
        }
        let single = analysis.statements.len() == 1;
        let first = analysis.statements.first();
        if analysis.statements.iter().any(|s| s.kind == Kind::Ddl) {
            // (Once now, and again once it ran and its transaction ended: see `serve`.)
            self.backend.backends.schema_epoch.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.schema_changed = true;
        }
        // (`/* shards: all */` sends it everywhere as a write: one answer, in an all-shards transaction.)
        let (mut read, mut standby) = (analysis.hint != Some(shardmap::sql::Hint::AllShards), true);
        for st in &analysis.statements {
            read &= st.kind == Kind::Read;
            standby &= st.shared_call.is_none();
        }
        let mut s = Stmt {
            verb: if single { first.and_then(|s| s.txn.clone()) } else { None },
            read,
            standby: read && standby,
            declare: if single { first.and_then(|s| s.declare) } else { None },
            chain: single && first.is_some_and(|s| s.chain),
            snapshot_isolation: single && first.is_some_and(|s| s.snapshot_isolation),
            savepoint: if single { first.and_then(|s| s.savepoint.as_deref().map(Box::from)) } else { None },
            setting: analysis.statements.iter().any(|s| s.setting.is_some() || s.local_setting),
            copy_in: single && first.is_some_and(|s| s.kind == Kind::CopyIn),
            unparsed: analysis.parse_error.is_some(),
            single,
            router: match first.filter(|_| single) {
                Some(s) if s.global_insert => Some(super::txn::Run::GlobalInsert),
                Some(s) if s.global_write => Some(super::txn::Run::GlobalWrite),
                Some(s)
                    if s.insert_rows
                        && analysis.hint.is_none()
                        && matches!(s.tables, shardmap::sql::Tables::Sharded(_)) =>
                {
                    Some(super::txn::Run::SplitInsert)
                }
                Some(s)
                    if s.cross == shardmap::sql::Cross::Combine
                        && analysis.hint != Some(shardmap::sql::Hint::AllShards) =>
                {
                    Some(super::txn::Run::Combine)
                }
                _ => None,
            },
            ..Stmt::default()
        };
        if s.verb == Some(shardmap::sql::TxnVerb::Begin) && !s.snapshot_isolation {
            // (A plain BEGIN takes the session's default_transaction_isolation, which the client may have set.)
            s.snapshot_isolation = self.settings.get("default_transaction_isolation").is_some_and(|sql| {
                let sql = sql.to_ascii_lowercase();
                sql.contains("repeatable") || sql.contains("serializable")
            });
        }
        if let (true, Some(st), true) = (single, first, self.txn.two_phase && self.txn.on_shards()) {
            // What a shard joining the transaction later must run too (see `txn.rs`).
            let savepoint = matches!(
                s.verb,
                Some(
                    shardmap::sql::TxnVerb::Savepoint
                        | shardmap::sql::TxnVerb::Release
                        | shardmap::sql::TxnVerb::RollbackTo
                )
            );
            // (A SET or SET LOCAL, not a `set_config()` call: that may take Bind parameters, which a replay has
            // not — no shard joins after one, `Txn::unreplayed_setting`.)
            let set = st.setting.is_some() || st.local_setting;
            if savepoint || (st.kind == Kind::Session && set && st.session.is_none()) {
                s.replay = Some(text.into());
            }
        }
        if let (true, Some(st)) = (single, first) {
            if st.declare.is_some() || st.kind == Kind::Cursor {
                s.cursor = cursor_name(text).map(String::into_boxed_str);
                s.tag = shardmap::sql::first_word(text).to_ascii_uppercase().into();
            }

            if st.session.is_some() {
                s.local = Local::Gb;
            } else if st.kind == Kind::Session {
                match self.settings.classify_in(text, self.routing.session_mode) {
                    // Session mode: DEALLOCATE of a statement PREPAREd in SQL is the server's.
                    Change::Deallocate(Some(n)) if self.routing.session_mode && !self.statements.contains_key(&n) => {}
                    Change::Deallocate(_) => s.local = Local::Deallocate,
                    Change::DiscardAll => s.local = Local::DiscardAll,
                    Change::Refused(why) => s.pooling = Some(why.into()),
                    _ => {}
                }
                let word = shardmap::sql::first_word(text).to_ascii_uppercase();
                s.queueable = word != "SHOW";
                s.tag = word.into();
            }
        }
        s
    }

    /// The routing decision for a statement, counted in the catalog's gate from the decision to the answer
    /// (the returned pass). A move cutting over the unit of the statement (a bucket, a tenant, a range
    /// piece) makes it wait for the unit's new owner, out of the gate — not inside a transaction already
    /// running on shards: the move waits for that transaction instead.
    pub async fn decide(
        &self,
        decide: impl Fn() -> Result<Decision, RouteError>,
    ) -> Result<(Result<Decision, RouteError>, Option<shard_catalog::Pass>), Reported> {
        loop {
            let pass = self.routing.catalog.enter();
            let d = decide();
            match &d {
                Ok(d) if self.routing.map.holds(d) && !self.txn.on_shards() => {
                    drop(pass);
                    Box::pin(self.routing.thaw(Some(d))).await?;
                }
                _ => return Ok((d, pass)),
            }
        }
    }

    /// `router-rate-limit-*`: one statement from the user's bucket and the tenant's (the session's
    /// `gb.tenant`, else the tenant whose database the client connected to), or 53400. Statements that end
    /// a transaction are never refused: a client over its limit can always let go of what it holds.
    pub fn rate_limit(&self, analysis: &Analysis) -> Result<(), Reported> {
        let limit = self.backend.config.router.limits.rate;
        if limit.statements == 0 {
            return Ok(());
        }
        use shardmap::sql::TxnVerb;
        let ends = |s: &shardmap::sql::StatementAnalysis| {
            matches!(
                s.txn,
                Some(
                    TxnVerb::Commit
                        | TxnVerb::Rollback
                        | TxnVerb::RollbackTo
                        | TxnVerb::CommitPrepared(_)
                        | TxnVerb::RollbackPrepared(_)
                )
            )
        };
        if !analysis.statements.is_empty() && analysis.statements.iter().all(ends) {
            return Ok(());
        }
        use super::rate::Kind;
        let tenant = self.route.tenant.as_deref().or_else(|| {
            (self.routing.map.strategy == shardmap::Strategy::Tenant)
                .then(|| self.routing.map.tenant_of_database(&self.backend.database))
                .flatten()
        });
        let mut keys = vec![(Kind::User, self.backend.user.as_str())];
        keys.extend(tenant.map(|t| (Kind::Tenant, t)));
        self.routing.rates.take(&keys, &limit).map_err(|(kind, e)| {
            self.backend.backends.stats.rate_limited[kind as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            e
        })
    }

    /// Sends an error and ReadyForQuery; inside a transaction the router's error fails the transaction.
    pub async fn report(&mut self, e: Reported) -> Result<(), Fatal> {
        proto::error(&mut self.io.wbuf, "ERROR", &e.code, &e.message);
        self.txn.error_inside();
        self.end_implicit().await;
        self.ready_for_query();
        self.io.flush().await?;
        Ok(())
    }

    /// The status the client is told now.
    pub fn status(&self) -> u8 {
        self.txn.status(self.links.iter().filter(|l| !l.replica && self.txn.holds(&l.dest)).map(|l| l.status()))
    }

    /// Queues ReadyForQuery with the client's status, and gives back what the session no longer needs.
    pub fn ready_for_query(&mut self) {
        self.release();
        let status = self.status();
        proto::ready(&mut self.io.wbuf, status);
    }

    /// Gives back the connections the session no longer needs: those outside the transaction whose
    /// exchange is over (session mode keeps the idle ones for the client).
    pub fn release(&mut self) {
        if self.links.is_empty() {
            return;
        }
        let txn = &self.txn;
        let session_mode = self.routing.session_mode;
        let cursors = &self.held_cursors;
        self.links.release_unless(|l| {
            l.pending
                || (!l.replica && txn.holds(&l.dest))
                || (session_mode && !l.replica && l.status() == proto::READY_IDLE)
                || (!cursors.is_empty() && !l.replica && cursors.values().any(|d| *d == l.dest))
        });
    }

    /// Gives back a connection the session does not keep (session mode keeps it).
    pub fn give_back(&mut self, dest: Dest, p: Pooled) {
        if self.routing.session_mode && p.conn_status() == proto::READY_IDLE && self.links.find(&dest).is_none() {
            self.links.push(Link::new(dest, p));
        } else {
            p.release();
        }
    }

    /// The connection of the transaction (state `One`).
    pub fn txn_link(&self) -> Result<usize, Reported> {
        let State::One(d) = &self.txn.state else {
            return Err(Reported::new("XX000", "no transaction connection"));
        };
        self.links.find(d).ok_or_else(|| Reported::new("XX000", "the transaction's connection is gone"))
    }

    /// [`Session::link`] without an await, under transaction pooling, when the session holds a connection to
    /// `dest` already or its client kept one (nearly every statement), or the pool has one idle. When every
    /// connection of the pool is taken, [`Linked::Wait`]: [`Session::link_waited`] awaits the one handed
    /// over. [`Linked::Slow`]: call [`Session::link`].
    #[inline]
    pub fn link_now(&mut self, dest: &Dest) -> Linked {
        if self.routing.session_mode {
            return Linked::Slow;
        }
        if let Some(i) = self.links.find(dest) {
            return Linked::Done(Ok(i));
        }
        match self.backend.get_now(dest.shard, dest.db.as_deref(), &self.settings) {
            checkout::Now::Got(p) => Linked::Done(Ok(self.links.push(Link::new(dest.clone(), p)))),
            checkout::Now::Failed(e) => Linked::Done(Err(e)),
            checkout::Now::Wait(w) => Linked::Wait(w),
            checkout::Now::Slow => Linked::Slow,
        }
    }

    /// A connection to `dest` after [`Session::link_now`]'s wait: the one handed over, awaited here (one
    /// layer of `async` between the session and the wait, where [`Session::link`] has four).
    pub async fn link_waited(&mut self, dest: &Dest, wait: checkout::Wait) -> Result<usize, Reported> {
        let got = wait.await;
        let p = match self.backend.handed(got, &self.settings) {
            Ok(p) => p?,
            Err(p) => Box::pin(self.backend.finish(dest.shard, dest.db.as_deref(), p, &self.settings)).await?,
        };
        Ok(self.links.push(Link::new(dest.clone(), p)))
    }

    /// A connection to `dest`: the session's own, or a new checkout.
    pub async fn link(&mut self, dest: &Dest) -> Result<usize, Reported> {
        if let Some(i) = self.links.find(dest) {
            let l = self.links.get(i);
            if l.pending || self.txn.holds(dest) || !self.routing.session_mode {
                return Ok(i);
            }
            // Session mode: a connection to a primary that failed over is not used again; one that carries
            // other settings than the client's now (set through another shard's connection) gets them.
            let current = self.backend.is_current(&self.links.get(i).conn, dest.db.as_deref()).await;
            if current {
                let l = self.links.get(i);
                if l.conn.conn().settings == self.settings.hash()
                    || checkout::sync_settings(&mut l.conn, &self.settings, None).await.is_ok()
                {
                    return Ok(i);
                }
            }
            self.links.remove(i);
        }
        // (A connection without an await is `link_now`'s, which the hot paths try first.)
        let p = self.backend.get(dest.shard, dest.db.as_deref(), &self.settings).await?;
        Ok(self.links.push(Link::new(dest.clone(), p)))
    }

    /// Connections to every one of `dests` (those the session does not hold yet), taken all or none: each is
    /// checked out without waiting while others are held; when one would wait, those this call took are given
    /// back first and that one alone is waited for (bounded by `pool-timeout-ms`), then the rest tried again.
    /// So two fan-outs on small pools never hold one connection each while waiting for the other's.
    pub async fn hold_all(&mut self, dests: &[Dest]) -> Result<(), Reported> {
        let missing: Vec<Dest> = dests.iter().filter(|d| self.links.find(d).is_none()).cloned().collect();
        if missing.len() <= 1 {
            for d in &missing {
                self.link(d).await?;
            }
            return Ok(());
        }
        let timeout = std::time::Duration::from_millis(self.backend.config.pool.timeout_ms);
        let deadline = std::time::Instant::now() + timeout;
        let mut taken: Vec<Dest> = Vec::new();
        loop {
            let mut blocked = None;
            for d in &missing {
                if self.links.find(d).is_some() {
                    continue;
                }
                match self.backend.get_with(d.shard, d.db.as_deref(), &self.settings, false).await {
                    Ok(Some(p)) => {
                        self.links.push(Link::new(d.clone(), p));
                        taken.push(d.clone());
                    }
                    Ok(None) => {
                        blocked = Some(d.clone());
                        break;
                    }
                    Err(e) => {
                        self.give_back_all(&mut taken);
                        return Err(e);
                    }
                }
            }
            let Some(busy) = blocked else { return Ok(()) };
            self.give_back_all(&mut taken);
            if std::time::Instant::now() >= deadline {
                // (The pool's own timeout error, as a plain checkout would give it.)
                self.link(&busy).await?;
                return Ok(());
            }
            let p = self.backend.get(busy.shard, busy.db.as_deref(), &self.settings).await?;
            self.links.push(Link::new(busy.clone(), p));
            taken.push(busy);
        }
    }

    /// Gives back the connections `hold_all` took (idle, outside any transaction).
    fn give_back_all(&mut self, taken: &mut Vec<Dest>) {
        for d in taken.drain(..) {
            if let Some(i) = self.links.find(&d) {
                self.links.remove(i).conn.release();
            }
        }
    }

    /// The destination of a statement any shard answers: the fixed one, else (session mode) the first shard,
    /// so that every client's advisory locks and notifications meet there, else the next live shard.
    pub fn any_dest(&self, attempt: usize) -> Dest {
        if let Some(f) = self.fixed() {
            return f;
        }
        if self.routing.session_mode && attempt == 0 {
            return Dest { shard: NOTIFY_SHARD, db: None };
        }
        Dest { shard: self.backend.backends.any_shard(), db: None }
    }

    /// A connection for a statement any shard answers: one already in the current sync group (or, outside a
    /// transaction, any the session holds), else a checkout; a shard that cannot be reached is skipped.
    pub async fn link_any(&mut self) -> Result<usize, Reported> {
        let in_txn = |l: &Link| self.txn.holds(&l.dest);
        if let Some(i) = self.links.iter().position(|l| l.pending && !l.replica && !in_txn(l)) {
            return Ok(i);
        }
        if self.fixed().is_none() && !self.routing.session_mode {
            if let Some(i) = self.links.iter().position(|l| !l.replica && !in_txn(l)) {
                return Ok(i);
            }
        }
        let mut last = None;
        for attempt in 0..self.routing.map.nodes.len().max(1) {
            let dest = self.any_dest(attempt);
            match self.link(&dest).await {
                Err(e) if e.code == CONNECT_FAILED => last = Some(e),
                r => return r,
            }
        }
        Err(last.unwrap_or_else(|| Reported::new(CONNECT_FAILED, "no shard is configured")))
    }

    /// After a statement that changed session settings ran on link `i` outside a transaction (or a
    /// transaction that changed some ended there): the client's remembered settings follow what the server
    /// now has. A single SET keeps its text; otherwise the values are read back (`current_setting`). After a
    /// RESET the connection is brought back to the client's startup values, and the client hears of them.
    /// Settings whose names a statement computed (`Setting::SetSome`): every one the session set is read
    /// back, and the connection is reset before its next use, since it may carry a custom setting that
    /// `pg_settings` does not show.
    pub async fn settings_changed(&mut self, i: usize, changes: &[Setting], text: Option<&str>) {
        let mut names: Vec<String> = Vec::new();
        let (mut reset, mut unnamed) = (false, false);
        for c in changes {
            match c {
                Setting::Set(ns) => names.extend(ns.iter().cloned()),
                Setting::SetBound(_) | Setting::SetSome => unnamed = true,
                Setting::Reset(n) => {
                    names.retain(|x| x != n);
                    self.settings.apply(Change::Reset(n.clone()));
                    reset = true;
                }
                Setting::ResetAll => {
                    names.clear();
                    unnamed = false;
                    self.settings.apply(Change::ResetAll);
                    reset = true;
                }
            }
        }
        match (text, changes) {
            // One SET outside a transaction: its own text follows the client. (Not a `set_config()` call: its
            // values are read back.)
            (Some(text), [Setting::Set(_)]) if shardmap::sql::first_word(text).eq_ignore_ascii_case("set") => {
                let change = self.settings.classify_in(text, self.routing.session_mode);
                self.settings.apply(change);
                names.clear();
            }
            _ => {}
        }
        let conn = self.links.get(i).conn.conn();
        let mut known = true;
        if unnamed {
            let sql = "SELECT string_agg(name, ',') FROM pg_catalog.pg_settings WHERE source = 'session'";
            match conn.query_row(sql).await {
                Ok(row) => {
                    let set = row.into_iter().next().flatten().unwrap_or_default();
                    // (pg_settings names some in mixed case, `DateStyle`: the client's are lower case.)
                    names.extend(set.split(',').filter(|n| !n.is_empty()).map(str::to_lowercase));
                }
                Err(_) => known = false,
            }
        }
        if !names.is_empty() {
            names.sort();
            names.dedup();
            let sql = format!(
                "SELECT {}",
                names
                    .iter()
                    .map(|n| format!("pg_catalog.current_setting('{}', true)", n.replace('\'', "''")))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            match conn.query_row(&sql).await {
                Ok(values) => {
                    for (n, v) in names.iter().zip(values) {
                        if let Some(v) = v {
                            self.settings.apply(Change::Set(n.clone(), super::settings::set_config(n, &v)));
                        }
                    }
                }
                Err(_) => known = false,
            }
        }
        let conn = self.links.get(i).conn.conn();
        conn.settings = if known && !reset && !unnamed { self.settings.hash() } else { SETTINGS_UNKNOWN };
        if reset || !known {
            let relay = reset.then_some(&mut self.io.wbuf);
            if checkout::sync_settings(&mut self.links.get(i).conn, &self.settings, relay).await.is_err() {
                // The connection is in an unknown state: close it.
                let l = self.links.remove(i);
                drop(l);
                return;
            }
        }
        if let Some((_, v)) = self.links.get(i).conn.conn().params.iter().find(|(k, _)| k == "client_encoding") {
            self.encoding = Encoding::named(v);
        }
    }

    /// What a connection answered after a statement: the transaction's state follows the server's
    /// ReadyForQuery, and settings the statement changed follow the client (inside a transaction the
    /// connection's settings are unknown until it ends: then they are read back).
    pub async fn answered(&mut self, i: usize, status: u8, error: bool, stmt_settings: &[Setting], text: Option<&str>) {
        let in_txn = self.txn.ready(&self.links.get(i).dest, status, error);
        if !stmt_settings.is_empty() || !self.txn_settings.is_empty() {
            let in_txn = in_txn || status != proto::READY_IDLE;
            Box::pin(self.settings_after(i, in_txn, error, stmt_settings, text)).await;
        }
    }

    /// The settings changes of a transaction that committed, for [`Session::settings_changed`]: as they are,
    /// unless it went back to a savepoint (`went_back`), which may have undone some of them — then every
    /// setting the client has or the transaction named is read back from the server, with those its session
    /// set.
    pub fn committed_settings(&self, changes: Vec<Setting>, went_back: bool) -> Vec<Setting> {
        if !went_back {
            return changes;
        }
        let mut names: Vec<String> = self.settings.values().map(|(n, _)| n.clone()).collect();
        for c in &changes {
            match c {
                Setting::Set(ns) => names.extend(ns.iter().cloned()),
                Setting::Reset(n) => names.push(n.clone()),
                _ => {}
            }
        }
        names.sort();
        names.dedup();
        vec![Setting::Set(names), Setting::SetSome]
    }

    /// The transaction whose settings `txn_settings` holds has ended, its end answered on link `i`. Committed:
    /// what the server has now is the client's (all of them again after a ROLLBACK TO inside it, `went_back`:
    /// see `committed_settings`). Rolled back (`undone`): the server undid them, the client's settings are what
    /// they were, and the connection's are unknown until set again.
    pub async fn settle_txn_settings(&mut self, i: usize, undone: bool, went_back: bool) {
        let changes = std::mem::take(&mut self.txn_settings);
        if undone {
            self.links.get(i).conn.conn().settings = SETTINGS_UNKNOWN;
        } else {
            let changes = self.committed_settings(changes, went_back);
            self.settings_changed(i, &changes, None).await;
        }
    }

    /// See [`Session::answered`]; `in_txn`: the connection is in the client's transaction now.
    pub async fn settings_after(
        &mut self,
        i: usize,
        in_txn: bool,
        error: bool,
        stmt_settings: &[Setting],
        text: Option<&str>,
    ) {
        if !stmt_settings.is_empty() {
            if in_txn {
                self.txn_settings.extend(stmt_settings.iter().cloned());
                self.links.get(i).conn.conn().settings = SETTINGS_UNKNOWN;
            } else if !error {
                self.settings_changed(i, stmt_settings, text).await;
            } else {
                self.links.get(i).conn.conn().settings = SETTINGS_UNKNOWN;
            }
        }
        if !self.txn.open() && !self.txn_settings.is_empty() && !in_txn && i < self.links.len() {
            self.settle_txn_settings(i, self.txn.rolled_back_now || error, self.txn.went_back_now).await;
        }
    }
}

/// Whether a SET, SET LOCAL or RESET names a custom setting (`app.tenant`: a dot in the name).
fn custom_setting(text: &str) -> bool {
    let mut words = text.split(|c: char| c.is_whitespace() || c == '=').filter(|w| !w.is_empty()).skip(1);
    let mut name = words.next().unwrap_or("");
    if name.eq_ignore_ascii_case("local") || name.eq_ignore_ascii_case("session") {
        name = words.next().unwrap_or("");
    }
    name.contains('.')
}

/// The cursor a DECLARE (the word after it), FETCH, MOVE or CLOSE (the last word) names, as PostgreSQL
/// folds it; `None` for CLOSE ALL.
pub fn cursor_name(text: &str) -> Option<String> {
    let t = text.trim().trim_end_matches(';').trim();
    let declare = shardmap::sql::first_word(t).eq_ignore_ascii_case("declare");
    let word = if declare {
        let at = t.to_ascii_lowercase().find("declare")? + "declare".len();
        t[at..].split_whitespace().next()?
    } else {
        t.rsplit(|c: char| c.is_whitespace()).next()?
    };
    if word.eq_ignore_ascii_case("all") && !declare {
        return None;
    }
    Some(match word.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => word.to_lowercase(),
    })
}

/// A Sync message.
pub fn sync_message() -> Msg {
    let mut b = bytes::BytesMut::new();
    proto::put(&mut b, b'S', |_| {});
    Msg { tag: b'S', frame: b.freeze() }
}

/// The settings a statement's analysis changes, in order, with the names its parameters give read from
/// `params` (one statement's borrowed when there is nothing to read: nothing copied for the usual statement,
/// which changes none).
pub fn settings_of<'a>(analysis: &'a Analysis, params: &dyn shardmap::Params) -> std::borrow::Cow<'a, [Setting]> {
    if let [one] = analysis.statements.as_slice() {
        if !matches!(one.setting, Some(Setting::SetBound(_))) {
            return std::borrow::Cow::Borrowed(one.setting.as_slice());
        }
    }
    analysis
        .statements
        .iter()
        .filter_map(|s| s.setting.as_ref())
        .map(|s| shardmap::planner::named_setting(s, params))
        .collect()
}

/// Whether a session's stop signal has come (sent, or its sender dropped: both mean the router is draining).
fn stopped(stop: &mut tokio::sync::oneshot::Receiver<()>) -> bool {
    !matches!(stop.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Empty))
}
