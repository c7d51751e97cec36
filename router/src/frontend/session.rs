//! One client's session: the state machine that reads its messages, asks the planner where each statement
//! goes, holds BEGIN until a statement names a shard, binds the transaction to that shard's server
//! connection, and relays the server's answers as bytes.
//!
//! Transaction pooling: outside a transaction a statement borrows a connection for the length of one
//! exchange (up to ReadyForQuery) and gives it back when the server reports idle.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::Bytes;
use shardmap::sql::{Analysis, Kind, SessionChange};
use shardmap::{Decision, Param, Params, Session, ShardId, Target};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::backend::conn::{BackendError, Target as ServerTarget};
use crate::backend::pool::{PoolKey, Pooled};
use crate::frontend::extended;
use crate::frontend::settings::Settings;
use crate::net::proto;
use crate::net::wire::{Framed, Msg, RelayError};
pub use crate::net::{Fatal, Reported};
use crate::server::Router;

/// A client statement prepared with Parse.
pub struct ClientStmt {
    pub text: Arc<str>,
    pub types: Vec<u32>,
    pub analysis: Arc<Analysis>,
    /// The name it has on server connections (`sr_<hash>`; empty for the unnamed statement).
    pub server_name: String,
}

/// After a statement was sent on `conn`: `Ok(Some(error))` when the server's first answer says it did not
/// run (`topology::not_run`: shutting down, read-only, connection failure), `Ok(None)` when it is running,
/// `Err(())` when no answer came. Nothing is consumed: the answer is relayed as usual afterwards.
pub async fn refused(conn: &mut crate::backend::conn::ServerConn) -> Result<Option<Reported>, ()> {
    match conn.io.front().await {
        Ok(Some((b'E', body))) => {
            let (code, message) = proto::error_fields(body);
            Ok(crate::backend::topology::not_run(&code).then(|| reported(&code, message)))
        }
        Ok(Some(_)) => Ok(None),
        _ => Err(()),
    }
}

/// The SQLSTATE of a failed connection attempt: nothing was sent, so another shard may be tried.
pub const CONNECT_FAILED: &str = "08001";

fn reported(code: &str, message: impl Into<String>) -> Reported {
    Reported { code: code.to_string(), message: message.into() }
}

/// Where the client's transaction is.
#[derive(Default)]
pub enum Txn {
    /// No transaction.
    #[default]
    Idle,
    /// BEGIN (and SETs after it) held until a statement names a shard.
    Held(Vec<Bytes>),
    /// Running on the bound connection.
    Bound,
    /// Running on a connection to every shard (`bound_all`): a transaction that began with a statement for
    /// every shard, as migrations do (DDL, then the migration tool's bookkeeping). See `alltx.rs`.
    BoundAll,
}

pub struct Client<S> {
    pub io: Framed<S>,
    pub shared: Arc<Router>,
    pub user: String,
    pub database: String,
    pub session: Session,
    pub settings: Settings,
    pub txn: Txn,
    pub bound: Option<Pooled>,
    /// The connections of a `Txn::BoundAll` transaction, in shard order.
    pub bound_all: Vec<Pooled>,
    /// An error the router raised inside a transaction: the client must roll back.
    pub failed: bool,
    /// Whether the last answer relayed by `relay_until_ready` held an ErrorResponse (for metrics).
    pub answer_error: bool,
    pub statements: foldhash::HashMap<String, ClientStmt>,
    pub batch: Vec<Msg>,
    /// Where a CancelRequest for this client finds its server connections.
    pub cancel: Arc<crate::backend::cancel::Slot>,
    /// `pool-mode,session`: the server connections this client keeps for its whole session.
    pub sticky: Vec<Pooled>,
    /// Whether the client ran LISTEN (session mode): notifications are relayed as they arrive.
    pub listening: bool,
    /// The pools of the shards' default databases, by shard, so that a checkout does not look them up.
    /// Per shard: the pool last used and the generation of the shard's primary it was made for.
    pub pools: Vec<Option<(u64, Arc<crate::backend::pool::Pool>)>>,
}

/// The shard that carries LISTEN, UNLISTEN and NOTIFY, so that listeners and notifiers meet.
pub const NOTIFY_SHARD: ShardId = ShardId(0);

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

impl<S> Client<S> {
    /// Gives a connection back: to the pool, or in session mode to the client's own.
    pub fn give_back(&mut self, p: Pooled) {
        if self.shared.routing.session_mode && p.conn_status() == proto::READY_IDLE {
            self.sticky.push(p);
        } else {
            p.release();
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Serves the client until it leaves. Server connections it holds are given back or closed.
    pub async fn run(&mut self) -> Result<(), Fatal> {
        let result = self.serve().await;
        // Mid-transaction: closing the server connections rolls them back; they are never reused dirty.
        self.bound.take();
        self.bound_all.clear();
        // Session mode: the client's own connections are reset and go back.
        for mut p in std::mem::take(&mut self.sticky) {
            if p.conn_status() == proto::READY_IDLE && p.conn().run_quiet("DISCARD ALL").await.is_ok() {
                let conn = p.conn();
                conn.prepared.clear();
                conn.settings = 0;
                p.release();
            }
        }
        result
    }

    async fn serve(&mut self) -> Result<(), Fatal> {
        loop {
            let msg = if self.listening {
                match Box::pin(self.read_or_notify()).await? {
                    Some(Some(m)) => m,
                    Some(None) => return Ok(()),
                    None => continue,
                }
            } else {
                match self.io.read().await? {
                    Some(m) => m,
                    None => return Ok(()),
                }
            };
            tracing::trace!(tag = %(msg.tag as char), len = msg.frame.len(), "client message");
            match msg.tag {
                b'Q' => self.simple(msg).await?,
                b'P' | b'B' | b'D' | b'E' | b'C' => {
                    if self.batch.len() >= 10_000 {
                        return Err(Fatal::Protocol(
                            "more than 10000 extended-protocol messages without a Sync".into(),
                        ));
                    }
                    self.batch.push(msg);
                }
                b'H' | b'S' => {
                    self.batch.push(msg);
                    // The batch's vector is reused from one batch to the next.
                    let mut batch = std::mem::take(&mut self.batch);
                    extended::run(self, &batch).await?;
                    batch.clear();
                    self.batch = batch;
                }
                b'X' => return Ok(()),
                // CopyData, CopyDone, CopyFail outside COPY: PostgreSQL ignores them too.
                b'd' | b'c' | b'f' => {}
                other => return Err(Fatal::Protocol(format!("unexpected message type {:?}", other as char))),
            }
        }
    }

    /// Session mode after LISTEN: waits for the client's next message or a notification on the connection
    /// that listens, relaying notifications at once. `None` when a notification was relayed.
    async fn read_or_notify(&mut self) -> Result<Option<Option<Msg>>, Fatal> {
        let Some(i) = self.sticky.iter().position(|p| p.shard() == NOTIFY_SHARD) else {
            self.listening = false;
            return Ok(Some(self.io.read().await?));
        };
        let (io, sticky) = (&mut self.io, &mut self.sticky);
        tokio::select! {
            m = io.read() => Ok(Some(m?)),
            n = sticky[i].conn().read() => {
                match n {
                    Ok(m) => {
                        io.push(&m.frame);
                        io.flush().await?;
                    }
                    Err(_) => {
                        // The listening connection is gone: so are its LISTENs.
                        sticky.swap_remove(i);
                        self.listening = false;
                    }
                }
                Ok(None)
            }
        }
    }

    /// Sends an error and ReadyForQuery; inside a transaction the router's error fails the transaction.
    pub async fn report(&mut self, e: Reported) -> Result<(), Fatal> {
        proto::error(&mut self.io.wbuf, "ERROR", &e.code, &e.message);
        if !matches!(self.txn, Txn::Idle) {
            self.failed = true;
        }
        let status = self.status();
        proto::ready(&mut self.io.wbuf, status);
        self.io.flush().await?;
        Ok(())
    }

    pub fn status(&self) -> u8 {
        match (&self.txn, self.failed) {
            (Txn::Idle, _) => proto::READY_IDLE,
            (_, true) => proto::READY_FAILED,
            _ => proto::READY_IN_TX,
        }
    }

    /// A simple Query message.
    async fn simple(&mut self, msg: Msg) -> Result<(), Fatal> {
        let Some((text, _)) = proto::read_cstr(msg.body()) else {
            return Err(Fatal::Protocol("Query message without a terminated string".into()));
        };
        let (analysis, literals) = self.shared.routing.planner.analyze_simple(text);
        if let [st] = analysis.statements.as_slice() {
            if let (Kind::CopyIn, Some(copy)) = (st.kind, &st.copy) {
                return Box::pin(self.copy_in(&msg, &analysis, copy)).await;
            }
        }
        match self.route_simple(&msg, &analysis, &literals).await {
            Ok(()) => Ok(()),
            Err(mut e) => {
                // Decisions' reasons keep the shape's placeholders (see `decide_shaped`): shown, they get
                // the statement's values back.
                if !literals.is_empty() {
                    e.message = shardmap::shape::render(&e.message, &literals);
                }
                Box::pin(self.report(e)).await
            }
        }
    }

    /// COPY ... FROM STDIN: rows split by key across shards (outside a transaction for now).
    async fn copy_in(
        &mut self,
        msg: &Msg,
        analysis: &Arc<Analysis>,
        copy: &shardmap::sql::CopyIn,
    ) -> Result<(), Fatal> {
        if !matches!(self.txn, Txn::Idle) {
            return self
                .report(reported(
                    "0A000",
                    "COPY FROM STDIN inside a transaction is not supported yet; run it on its own",
                ))
                .await;
        }
        // COPY's units are known row by row: it starts when no unit is frozen, and stays in the gate to its
        // end, so that a move's freeze waits for it (or rolls back) instead of COPY meeting the guard.
        let pass = loop {
            let pass = self.shared.routing.catalog.enter();
            if !self.shared.routing.map.anything_frozen() {
                break pass;
            }
            drop(pass);
            if let Err(e) = self.shared.routing.thaw(None).await {
                return self.report(e).await;
            }
        };
        let d = match self.shared.routing.planner.decide_analyzed(analysis, &shardmap::NoParams, &self.session) {
            Ok(d) => d,
            Err(e) => return self.report(e.into()).await,
        };
        let r = crate::frontend::copy::copy_in(self, &d, copy, msg.frame.clone()).await;
        drop(pass);
        r
    }

    async fn route_simple(
        &mut self,
        msg: &Msg,
        analysis: &Arc<Analysis>,
        literals: &[shardmap::shape::Literal],
    ) -> Result<(), Reported> {
        if !self.shared.routing.session_mode {
            refuse_session_locks(analysis)?;
        }
        let kind = analysis.statements.first().map(|s| s.kind);
        let single = analysis.statements.len() == 1;
        // The router's own settings: SET gb.shard_key / gb.tenant, answered here.
        // (Paths other than a statement for one shard are boxed: their futures are large, and inline they
        // would be copied with every statement's.)
        if single {
            if let Some(change) = analysis.statements[0].session.clone() {
                return Box::pin(self.gb_setting(&change)).await;
            }
        }
        if self.failed {
            if kind == Some(Kind::Transaction) && is_rollback(msg) {
                return Box::pin(self.end_transaction(msg.frame.clone(), "ROLLBACK")).await;
            }
            return Err(reported(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            ));
        }
        // Counted in the catalog's gate from the decision to the answer. A move is cutting over the unit of
        // this statement (a bucket, a tenant, a range piece): wait for its new owner, out of the gate. (Not
        // inside a transaction already running on a shard: the move waits for that transaction instead.)
        let (decision, _pass) = loop {
            let pass = self.shared.routing.catalog.enter();
            let d = self.shared.routing.planner.decide_shaped(analysis, literals, &self.session)?;
            if !self.shared.routing.map.holds(&d) || matches!(self.txn, Txn::Bound) {
                break (d, pass);
            }
            drop(pass);
            Box::pin(self.shared.routing.thaw(Some(&d))).await?;
        };
        if single && kind == Some(Kind::Transaction) {
            return Box::pin(self.transaction_control(msg)).await;
        }
        if single && kind == Some(Kind::Session) && decision.target == Target::Session {
            return Box::pin(self.session_statement(msg)).await;
        }
        let frame = msg.frame.clone();
        if matches!(self.txn, Txn::BoundAll) {
            return Box::pin(crate::frontend::alltx::simple(self, &decision, frame)).await;
        }
        match decision.target.clone() {
            Target::One(s) => self.on_shard(s, &decision, frame).await,
            Target::Any | Target::Session => match self.txn {
                Txn::Bound => self.relay_bound(frame).await,
                _ => Box::pin(self.on_any_shard(&decision, frame)).await,
            },
            Target::All | Target::Set(_) => {
                // A read while BEGIN is still held runs outside the (so far empty) transaction.
                let held_read =
                    matches!(self.txn, Txn::Held(_)) && analysis.statements.iter().all(|s| s.kind == Kind::Read);
                if matches!(self.txn, Txn::Held(_)) && !held_read && decision.target == Target::All {
                    // The transaction's first statement is for every shard (a migration): bind them all.
                    Box::pin(crate::frontend::alltx::bind_all(self, &decision)).await?;
                    return Box::pin(crate::frontend::alltx::simple(self, &decision, frame)).await;
                }
                if !matches!(self.txn, Txn::Idle) && !held_read {
                    return Err(reported(
                        "0A000",
                        format!(
                            "this statement goes to {} ({}), but the transaction is bound to one shard; multi-shard transactions are not supported yet",
                            if decision.target == Target::All { "every shard".to_string() } else { "several shards".to_string() },
                            decision.reason
                        ),
                    ));
                }
                if !single && !analysis.statements.iter().all(|s| s.kind == Kind::Ddl) {
                    return Err(reported("0A000", "a multi-statement query that goes to several shards is not supported; send its statements one by one"));
                }
                let shards = decision.shards(&self.shared.routing.map);
                Box::pin(crate::frontend::fanout::simple(self, &shards, &decision, frame)).await
            }
        }
    }

    /// `SET gb.shard_key`, `SET gb.tenant` and their RESET: the router's session state, not sent to servers.
    async fn gb_setting(&mut self, change: &SessionChange) -> Result<(), Reported> {
        let map = self.shared.routing.map.clone();
        self.session.apply(change, &map)?;
        let tag = match change {
            SessionChange::ShardKey(Some(_)) | SessionChange::Tenant(Some(_)) => "SET",
            _ => "RESET",
        };
        proto::command_complete(&mut self.io.wbuf, tag);
        let status = self.status();
        proto::ready(&mut self.io.wbuf, status);
        self.io.flush().await.map_err(|e| reported("08006", e.to_string()))
    }

    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT... in the simple protocol.
    async fn transaction_control(&mut self, msg: &Msg) -> Result<(), Reported> {
        let word = first_word(msg).to_ascii_uppercase();
        match (&mut self.txn, word.as_str()) {
            (Txn::Idle, "BEGIN" | "START") => {
                self.txn = Txn::Held(vec![msg.frame.clone()]);
                self.reply_synthetic("BEGIN").await
            }
            (Txn::Held(_), "COMMIT" | "END") => self.end_transaction(msg.frame.clone(), "COMMIT").await,
            (Txn::Held(_), "ROLLBACK" | "ABORT") => self.end_transaction(msg.frame.clone(), "ROLLBACK").await,
            (Txn::Held(held), "SAVEPOINT" | "RELEASE") => {
                held.push(msg.frame.clone());
                let tag = if word == "SAVEPOINT" { "SAVEPOINT" } else { "RELEASE" };
                self.reply_synthetic(tag).await
            }
            (Txn::Bound, _) => self.relay_bound(msg.frame.clone()).await,
            (Txn::BoundAll, _) => crate::frontend::alltx::everywhere(self, msg.frame.clone()).await,
            (Txn::Held(_), _) => {
                Err(reported("0A000", format!("{word} before the transaction's first statement is not supported")))
            }
            (Txn::Idle, _) => {
                // COMMIT outside a transaction and the like: the server warns; any shard will do.
                let d = self.shared.routing.planner.decide("SELECT 1", &shardmap::NoParams, &self.session)?;
                self.on_any_shard(&d, msg.frame.clone()).await
            }
        }
    }

    /// COMMIT or ROLLBACK: on the bound connection, or answered here when nothing ran yet.
    async fn end_transaction(&mut self, frame: Bytes, tag: &str) -> Result<(), Reported> {
        self.failed = false;
        match self.txn {
            Txn::Bound => self.relay_bound(frame).await,
            Txn::BoundAll => crate::frontend::alltx::everywhere(self, frame).await,
            _ => {
                self.txn = Txn::Idle;
                self.reply_synthetic(tag).await
            }
        }
    }

    async fn reply_synthetic(&mut self, tag: &str) -> Result<(), Reported> {
        proto::command_complete(&mut self.io.wbuf, tag);
        let status = self.status();
        proto::ready(&mut self.io.wbuf, status);
        self.io.flush().await.map_err(|e| reported("08006", e.to_string()))
    }

    /// SET, RESET, SHOW, DISCARD...: run on the bound connection, or held with BEGIN, or run on any shard and
    /// remembered, so that it is replayed on whatever connection the client gets next.
    async fn session_statement(&mut self, msg: &Msg) -> Result<(), Reported> {
        let text = proto::read_cstr(msg.body()).map(|(t, _)| t).unwrap_or("");
        if let change @ (crate::frontend::settings::Change::Deallocate(_)
        | crate::frontend::settings::Change::DiscardAll) =
            self.settings.classify_in(text, self.shared.routing.session_mode)
        {
            let tag = self.local_session_change(change);
            return self.reply_synthetic(tag).await;
        }
        match &mut self.txn {
            Txn::Bound => self.relay_bound(msg.frame.clone()).await,
            Txn::BoundAll => crate::frontend::alltx::everywhere(self, msg.frame.clone()).await,
            Txn::Held(held) => {
                held.push(msg.frame.clone());
                let tag = first_word(msg).to_ascii_uppercase();
                self.reply_synthetic(&tag).await
            }
            Txn::Idle => {
                let text = proto::read_cstr(msg.body()).map(|(t, _)| t).unwrap_or("");
                let change = self.settings.classify_in(text, self.shared.routing.session_mode);
                match change {
                    crate::frontend::settings::Change::Refused(why) => return Err(reported("0A000", why)),
                    crate::frontend::settings::Change::Deallocate(_)
                    | crate::frontend::settings::Change::DiscardAll => {
                        let tag = self.local_session_change(change);
                        return self.reply_synthetic(tag).await;
                    }
                    _ => {}
                }
                let word = first_word(msg).to_ascii_uppercase();
                let notify = matches!(word.as_str(), "LISTEN" | "UNLISTEN" | "NOTIFY");
                let mut p =
                    if notify { self.checkout(NOTIFY_SHARD, None).await? } else { self.checkout_any(None).await? };
                p.conn().io.push(&msg.frame);
                p.conn().flush().await?;
                let mut ok = true;
                let status = loop {
                    let m = p.conn().read().await?;
                    ok &= m.tag != b'E';
                    self.io.push(&m.frame);
                    if m.tag == b'Z' {
                        break m.body().first().copied().unwrap_or(proto::READY_IDLE);
                    }
                };
                p.conn().status = status;
                self.io.flush().await.map_err(|e| reported("08006", e.to_string()))?;
                if ok && word == "LISTEN" {
                    self.listening = true;
                }
                if ok {
                    self.settings.apply(change);
                    // The connection now carries exactly the client's settings.
                    p.conn().settings = self.settings.hash();
                    self.after_exchange(p, status);
                }
                // After a failure the connection's settings are uncertain: it is closed (dropped).
                Ok(())
            }
        }
    }

    /// DEALLOCATE and DISCARD ALL act on state the router keeps for the client; returns the command tag.
    pub fn local_session_change(&mut self, change: crate::frontend::settings::Change) -> &'static str {
        match change {
            crate::frontend::settings::Change::Deallocate(None) => {
                self.statements.clear();
                "DEALLOCATE ALL"
            }
            crate::frontend::settings::Change::Deallocate(Some(name)) => {
                self.statements.remove(&name);
                "DEALLOCATE"
            }
            change => {
                self.statements.clear();
                self.settings.apply(change);
                self.session.shard_key = None;
                self.session.tenant = None;
                "DISCARD ALL"
            }
        }
    }

    /// The pool of a shard for this client (and, under the tenant strategy, its database).
    /// A shard without a primary right now (failover) makes this wait for one, within the failover buffer.
    pub async fn pool_for(
        &self,
        shard: ShardId,
        database: Option<&str>,
    ) -> Result<(u64, Arc<crate::backend::pool::Pool>), Reported> {
        let node = self.shared.routing.map.node(shard);
        let addr = node.addr.as_ref().ok_or_else(|| {
            reported("08001", format!("shard {} has no address: add shard-node-{} to the config", node.name, node.name))
        })?;
        let ((host, port), generation) = self
            .shared
            .backends
            .topology
            .primary(shard, &node.name)
            .await
            .map_err(|e| reported(CONNECT_FAILED, e.0))?;
        let target = self.target(addr, (host, port), database);
        Ok((generation, self.shared.backends.pools.pool(PoolKey { shard, target }, &node.name)))
    }

    /// Where and as whom to connect on `host` for this client.
    fn target(
        &self,
        addr: &shardmap::config::NodeAddr,
        (host, port): (String, u16),
        database: Option<&str>,
    ) -> ServerTarget {
        let user = addr.user.clone().unwrap_or_else(|| self.user.clone());
        let password = addr.password.clone().or_else(|| {
            (user == self.user)
                .then(|| self.shared.routing.config.load().router.users.get(&self.user).cloned())
                .flatten()
        });
        let database =
            database.map(str::to_string).or_else(|| addr.dbname.clone()).unwrap_or_else(|| self.database.clone());
        ServerTarget { host, port, user, password, database }
    }

    /// `shard-read-replicas` (the caller checked it, and that no transaction is open): a connection to a
    /// standby of `shard` that is fresh enough, if there is one and it can be reached (`None`: read on the
    /// primary).
    pub async fn checkout_replica(&mut self, shard: ShardId, database: Option<&str>) -> Option<Pooled> {
        if self.shared.routing.session_mode {
            return None;
        }
        let max_lag = self.shared.routing.config.load().max_replica_lag_bytes;
        let at = self.shared.backends.topology.replica(shard, max_lag)?;
        let node = self.shared.routing.map.node(shard);
        let target = self.target(node.addr.as_ref()?, at, database);
        let pool = self.shared.backends.pools.pool(PoolKey { shard, target }, &node.name);
        let mut p = pool.get().await.ok()?;
        self.take_up(&mut p).await.ok()?;
        Some(p)
    }

    /// A connection just checked out becomes this client's: registered for its CancelRequests, with its
    /// session settings replayed when the connection carries others.
    async fn take_up(&mut self, p: &mut Pooled) -> Result<(), BackendError> {
        p.register_cancel(&self.cancel);
        let conn = p.conn();
        let want = self.settings.hash();
        if conn.settings != want {
            let sql = self.settings.replay_sql(conn.settings != 0);
            if !sql.is_empty() {
                Box::pin(conn.run_quiet(&sql)).await?;
            }
            conn.settings = want;
        }
        Ok(())
    }

    /// A read on a standby (`shard-read-replicas`): `Ok(false)` when there is none fit for it, or the standby
    /// refused it before running it (a read that writes, `FOR UPDATE`: 25006), so the caller reads on the
    /// primary.
    async fn read_on_replica(&mut self, shard: ShardId, d: &Decision, frame: &Bytes) -> Result<bool, Reported> {
        let Some(mut p) = Box::pin(self.checkout_replica(shard, d.database.as_deref())).await else {
            return Ok(false);
        };
        if p.conn().send(frame).await.is_err() || !matches!(refused(p.conn()).await, Ok(None)) {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        let status = self.relay_until_ready(&mut p).await?;
        self.shared.backends.stats.record(shard.0 as usize, started.elapsed(), self.answer_error);
        self.after_exchange(p, status);
        Ok(true)
    }

    /// Checks out a connection and brings its session settings in line with the client's.
    pub async fn checkout(&mut self, shard: ShardId, database: Option<&str>) -> Result<Pooled, Reported> {
        let generation = self.shared.backends.topology.generation(shard);
        let pool = match (database, self.pools.get(shard.0 as usize).and_then(Option::as_ref)) {
            (None, Some((g, p))) if *g == generation => p.clone(),
            _ => {
                let (g, pool) = Box::pin(self.pool_for(shard, database)).await?;
                if database.is_none() {
                    if self.pools.len() <= shard.0 as usize {
                        self.pools.resize(shard.0 as usize + 1, None);
                    }
                    self.pools[shard.0 as usize] = Some((g, pool.clone()));
                }
                pool
            }
        };
        if let Some(i) = self.sticky.iter().position(|p| p.is_from(&pool)) {
            // Session mode: the client's own connection, as it left it.
            return Ok(self.sticky.swap_remove(i));
        }
        if self.shared.backends.topology.is_paused(shard) {
            // The admin console's PAUSE: a new transaction waits for RESUME.
            Box::pin(self.shared.backends.topology.wait_resumed(shard)).await;
        }
        let breaker = &self.shared.backends.breaker;
        breaker
            .admit(shard.0 as usize, generation, &self.shared.routing.map.node(shard).name)
            .map_err(|m| reported(CONNECT_FAILED, m))?;
        let mut p = match pool.get().await {
            Ok(p) => p,
            Err(e)
                if e.sqlstate() == "3D000" && self.shared.routing.config.load().auto_create && database.is_some() =>
            {
                // shard-auto-create: the tenant's database is made on first use, then the checkout retried.
                let db = database.expect("checked");
                Box::pin(crate::backend::tenant::create(&self.shared.backends, shard, db)).await?;
                pool.get().await?
            }
            Err(e) => {
                if e.sqlstate() == CONNECT_FAILED {
                    self.shared.backends.mark_down(shard);
                }
                if e.sqlstate().starts_with("08") {
                    self.shared.backends.breaker.failure(shard.0 as usize, generation);
                }
                return Err(e.into());
            }
        };
        self.take_up(&mut p).await?;
        Ok(p)
    }

    /// Under the tenant strategy: the session's tenant database and the shard that holds it.
    pub fn home(&self) -> Option<(ShardId, String)> {
        let map = &self.shared.routing.map;
        if map.strategy != shardmap::Strategy::Tenant {
            return None;
        }
        let tenant =
            self.session.tenant.clone().or_else(|| map.tenant_of_database(&self.database).map(str::to_string))?;
        Some((map.tenant_shard(&tenant), format!("{}{tenant}", map.tenant_prefix)))
    }

    /// A connection to any live shard (for statements any shard answers); the tenant's own under the
    /// tenant strategy.
    pub async fn checkout_any(&mut self, database: Option<&str>) -> Result<Pooled, Reported> {
        if let Some((shard, db)) = self.home() {
            return self.checkout(shard, Some(&db)).await;
        }
        if self.shared.routing.session_mode && database.is_none() {
            // Session mode: statements any shard answers go to the first shard (see `on_any_shard`).
            if let Ok(p) = self.checkout(NOTIFY_SHARD, None).await {
                return Ok(p);
            }
        }
        let mut last = None;
        for _ in 0..self.shared.routing.map.nodes.len() {
            let s = self.shared.backends.any_shard();
            match self.checkout(s, database).await {
                Err(e) if e.code == CONNECT_FAILED => last = Some(e),
                r => return r,
            }
        }
        Err(last.unwrap_or_else(|| reported(CONNECT_FAILED, "no shard is configured")))
    }

    /// A statement any shard answers: on the next live shard (nothing was sent if a connection failed).
    async fn on_any_shard(&mut self, d: &Decision, frame: Bytes) -> Result<(), Reported> {
        if let Some((shard, db)) = self.home() {
            let mut d = d.clone();
            d.database = Some(db);
            return if matches!(self.txn, Txn::Idle) {
                self.on_shard(shard, &d, frame).await
            } else {
                self.on_shard_outside_txn(shard, &d, frame).await
            };
        }
        let mut last = None;
        for attempt in 0..self.shared.routing.map.nodes.len() {
            // Session mode: statements any shard answers all go to the first shard, so that every client's
            // advisory locks and notifications meet there.
            let s = if self.shared.routing.session_mode && attempt == 0 {
                NOTIFY_SHARD
            } else {
                self.shared.backends.any_shard()
            };
            let r = if matches!(self.txn, Txn::Idle) {
                self.on_shard(s, d, frame.clone()).await
            } else {
                self.on_shard_outside_txn(s, d, frame.clone()).await
            };
            match r {
                Err(e) if e.code == CONNECT_FAILED => last = Some(e),
                r => return r,
            }
        }
        Err(last.unwrap_or_else(|| reported(CONNECT_FAILED, "no shard is configured")))
    }

    /// A statement for one shard: on the bound connection (same shard), or with the held BEGIN, or alone.
    async fn on_shard(&mut self, shard: ShardId, d: &Decision, frame: Bytes) -> Result<(), Reported> {
        match std::mem::take(&mut self.txn) {
            Txn::BoundAll => {
                self.txn = Txn::BoundAll;
                Box::pin(crate::frontend::alltx::simple(self, d, frame)).await
            }
            Txn::Bound => {
                self.txn = Txn::Bound;
                self.check_bound_shard(shard, d)?;
                self.relay_bound(frame).await
            }
            Txn::Held(held) => {
                Box::pin(self.open_held(shard, d, held)).await?;
                self.relay_bound(frame).await
            }
            Txn::Idle => self.exchange_once(shard, d, frame).await,
        }
    }

    /// The error for a statement that routes away from the transaction's shard.
    pub fn check_bound_shard(&self, shard: ShardId, d: &Decision) -> Result<(), Reported> {
        let bound = self.bound.as_ref().map(|b| b.shard());
        if bound == Some(shard) {
            return Ok(());
        }
        let name = |s: Option<ShardId>| s.map_or("?".into(), |s| self.shared.routing.map.node(s).name.clone());
        Err(reported(
            "0A000",
            format!(
                "the transaction is on shard {}, and this statement goes to shard {} ({}); multi-shard transactions are not supported yet",
                name(bound),
                name(Some(shard)),
                d.reason
            ),
        ))
    }

    /// Opens the held transaction (BEGIN and what came with it) on `shard` and binds it there.
    pub async fn open_held(&mut self, shard: ShardId, d: &Decision, held: Vec<Bytes>) -> Result<(), Reported> {
        let mut p = match self.checkout(shard, d.database.as_deref()).await {
            Ok(p) => p,
            Err(e) => {
                self.txn = Txn::Held(held);
                return Err(e);
            }
        };
        let conn = p.conn();
        for h in &held {
            conn.io.push(h);
        }
        conn.flush().await?;
        for _ in &held {
            if let Err(e) = conn.drain_to_ready().await {
                // The held BEGIN or SET failed: nothing of the transaction ran.
                self.txn = Txn::Held(held);
                return Err(e.into());
            }
        }
        self.bound = Some(p);
        self.txn = Txn::Bound;
        Ok(())
    }

    /// One exchange on a connection checked out for it (kept if it opened a transaction).
    async fn exchange_once(&mut self, shard: ShardId, d: &Decision, frame: Bytes) -> Result<(), Reported> {
        let read_replicas = self.shared.routing.config.load().read_replicas;
        if read_replicas
            && matches!(self.txn, Txn::Idle)
            && d.analysis.statements.iter().all(|s| s.kind == Kind::Read)
            && Box::pin(self.read_on_replica(shard, d, &frame)).await?
        {
            return Ok(());
        }
        if self.shared.backends.topology.follows(shard) {
            return Box::pin(self.exchange_following(shard, d, frame)).await;
        }
        let mut p = self.checkout(shard, d.database.as_deref()).await?;
        let started = std::time::Instant::now();
        let sent = match p.conn().send(&frame).await {
            Ok(()) => self.relay_until_ready(&mut p).await,
            Err(e) => Err(e.into()),
        };
        let status = sent.inspect_err(|e| self.connection_failed(shard, e))?;
        self.answered(shard, started);
        self.after_exchange(p, status);
        Ok(())
    }

    /// A statement on `shard` failed: a lost connection counts for the circuit breaker.
    pub fn connection_failed(&self, shard: ShardId, e: &Reported) {
        if e.code.starts_with("08") {
            self.shared.backends.breaker.failure(shard.0 as usize, self.shared.backends.topology.generation(shard));
        }
    }

    /// A statement got its answer from `shard`: metrics, and the circuit breaker's success.
    pub fn answered(&self, shard: ShardId, started: std::time::Instant) {
        self.shared.backends.stats.record(shard.0 as usize, started.elapsed(), self.answer_error);
        self.shared.backends.breaker.success(shard.0 as usize);
    }

    /// `exchange_once` on a shard that follows its primary: a statement that the old primary did not run
    /// (the connection failed before it was sent, or the server answered that it is shutting down or
    /// read-only) waits for the new primary and runs there, instead of failing.
    async fn exchange_following(&mut self, shard: ShardId, d: &Decision, frame: Bytes) -> Result<(), Reported> {
        let name = self.shared.routing.map.node(shard).name.clone();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let generation = self.shared.backends.topology.generation(shard);
            let mut p = match self.checkout(shard, d.database.as_deref()).await {
                Ok(p) => p,
                Err(e) if crate::backend::topology::not_run(&e.code) && attempts < 10 => {
                    self.wait_new_primary(shard, generation, &name, e).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let not_run = match p.conn().send(&frame).await {
                Err(e) => Some(Reported::from(e)),
                Ok(()) => refused(p.conn()).await.unwrap_or(None),
            };
            if let Some(e) = not_run {
                drop(p);
                if attempts >= 10 {
                    return Err(e);
                }
                self.wait_new_primary(shard, generation, &name, e).await?;
                continue;
            }
            let started = std::time::Instant::now();
            let status = self.relay_until_ready(&mut p).await;
            if status.is_err() {
                self.shared.backends.topology.suspect(shard);
            }
            self.after_exchange(p, status?);
            self.answered(shard, started);
            return Ok(());
        }
    }

    /// After a statement could not run on `shard`'s primary of `generation`: waits for another one (the
    /// failover buffer); `e` is what the client gets if none comes.
    pub async fn wait_new_primary(
        &mut self,
        shard: ShardId,
        generation: u64,
        name: &str,
        e: Reported,
    ) -> Result<(), Reported> {
        tracing::info!(shard = name, code = %e.code, "{}; waiting for a new primary", e.message);
        match self.shared.backends.topology.changed_from(shard, generation, name).await {
            Ok(()) => Ok(()),
            Err(why) => Err(reported(&e.code, format!("{} ({})", e.message, why.0))),
        }
    }

    /// A read of non-sharded data while a transaction is held: answered outside the transaction.
    async fn on_shard_outside_txn(&mut self, shard: ShardId, d: &Decision, frame: Bytes) -> Result<(), Reported> {
        if matches!(self.txn, Txn::Idle) {
            return self.on_shard(shard, d, frame).await;
        }
        self.exchange_once(shard, d, frame).await
    }

    /// Sends a frame on the bound connection and relays the answer.
    async fn relay_bound(&mut self, frame: Bytes) -> Result<(), Reported> {
        let mut p = self.bound.take().ok_or_else(|| reported("XX000", "no bound connection"))?;
        if let Err(e) = p.conn().send(&frame).await {
            self.txn = Txn::Idle;
            return Err(e.into());
        }
        let started = std::time::Instant::now();
        let shard = p.shard();
        match self.relay_until_ready(&mut p).await {
            Ok(status) => {
                self.after_exchange(p, status);
                self.answered(shard, started);
                Ok(())
            }
            Err(e) => {
                // The server went away mid-transaction: the transaction is lost.
                self.txn = Txn::Idle;
                Err(e)
            }
        }
    }

    /// Relays server messages to the client up to and including ReadyForQuery; returns its status.
    pub async fn relay_until_ready(&mut self, p: &mut Pooled) -> Result<u8, Reported> {
        let over = self.status_override();
        self.relay_until_ready_as(p, over).await
    }

    /// Like `relay_until_ready`, sending the client ReadyForQuery with `status` instead of the server's.
    async fn relay_until_ready_as(&mut self, p: &mut Pooled, status_for_client: Option<u8>) -> Result<u8, Reported> {
        let conn = p.conn();
        match conn.io.relay_to_ready(&mut self.io, status_for_client).await {
            Ok((status, error)) => {
                conn.status = status;
                self.answer_error = error;
                Ok(status)
            }
            Err(RelayError::Src(e)) => Err(BackendError::Wire(e, conn.addr.clone()).into()),
            Err(RelayError::Dst(e)) => Err(reported("08006", e.to_string())),
        }
    }

    /// After ReadyForQuery: keep the connection for an open transaction, give it back when idle.
    /// A held transaction stays held: the exchange ran outside it (a Parse, a read of global data).
    pub fn after_exchange(&mut self, p: Pooled, status: u8) {
        match status {
            proto::READY_IDLE => {
                if matches!(self.txn, Txn::Bound) {
                    self.txn = Txn::Idle;
                    self.failed = false;
                }
                self.give_back(p);
            }
            _ => {
                self.txn = Txn::Bound;
                self.bound = Some(p);
            }
        }
    }

    /// The ReadyForQuery status to show the client instead of the server's, when they differ: a held
    /// transaction is in progress for the client while the connection that answered is idle.
    pub fn status_override(&self) -> Option<u8> {
        matches!(self.txn, Txn::Held(_)).then(|| self.status())
    }
}

/// Session-level advisory locks belong to a server connection, which transaction pooling shares.
pub fn refuse_session_locks(analysis: &Analysis) -> Result<(), Reported> {
    if analysis.statements.iter().any(|s| s.session_lock) {
        return Err(reported(
            "0A000",
            "session-level advisory locks (pg_advisory_lock, pg_advisory_unlock...) would stay on a pooled server connection shared with other clients; use pg_advisory_xact_lock inside a transaction",
        ));
    }
    Ok(())
}

fn first_word(msg: &Msg) -> String {
    let text = proto::read_cstr(msg.body()).map(|(t, _)| t).unwrap_or("");
    let t = text.trim_start();
    t.split(|c: char| !c.is_ascii_alphabetic()).next().unwrap_or("").to_string()
}

fn is_rollback(msg: &Msg) -> bool {
    let w = first_word(msg).to_ascii_uppercase();
    w == "ROLLBACK" || w == "ABORT"
}

/// A stable hash of a statement's text and parameter types, for server-side statement names.
pub fn statement_hash(text: &str, types: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    types.hash(&mut h);
    h.finish()
}
