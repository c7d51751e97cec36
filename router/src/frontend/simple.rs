//! The simple query protocol: a Query message is one statement (or a string of several) for the transaction
//! state machine, and its answer is relayed in runs of whole frames, straight from the server connection's
//! read buffer. Also the executors both protocols share: opening a held transaction, sending a statement
//! outside a transaction (read replicas, the failover retry), the statement's ending effects.

use bytes::Bytes;
use shardmap::sql::{Analysis, Setting};
use shardmap::{Decision, LiteralParams, RouteError, ShardId};

use super::links::Link;
use super::session::{refuse_connection_state, settings_of, Failure, Linked, Session, Statements};
use super::settings::Change;
use super::txn::{Dest, Local, Plan, State, Stmt, To};
use crate::backend::conn::{BackendError, ServerConn};
use crate::backend::topology::not_run;
use crate::net::proto::{self, READY_FAILED, READY_IDLE, READY_IN_TX};
use crate::net::wire::{Msg, RelayError, Stream};
use crate::net::{Fatal, Reported};

impl<S: Stream> Session<S> {
    /// A Query message.
    pub async fn query(&mut self, msg: Msg) -> Result<(), Fatal> {
        if self.links.iter().any(|l| l.pending) {
            // An extended-protocol sync group left open by a Flush: a Query ends it, as on a server.
            self.sync_group_quietly().await;
        }
        let body = msg.body();
        let Some(end) = memchr::memchr(0, body) else {
            return Err(Fatal::Protocol("Query message without a terminated string".into()));
        };
        let text = self.encoding.decode(&body[..end]);
        let mut literals = std::mem::take(&mut self.spare_literals);
        let analysis = self.routing.planner.analyze_simple(&text, &mut literals);
        let r = match self.query_inner(&msg, &text, &analysis, &literals).await {
            Ok(()) => Ok(()),
            Err(Failure::Fatal(f)) => Err(f),
            Err(Failure::Reported(mut e)) => {
                // Decisions' reasons keep the shape's placeholders (see `decide_shaped`): shown, they get
                // the statement's values back.
                if !literals.is_empty() {
                    e.message = shardmap::shape::render(&e.message, &literals);
                }
                Box::pin(self.report(e)).await
            }
        };
        self.spare_literals = shardmap::shape::spare(literals);
        r
    }

    async fn query_inner(
        &mut self,
        msg: &Msg,
        text: &str,
        analysis: &std::sync::Arc<Analysis>,
        literals: &[shardmap::shape::Literal<'_>],
    ) -> Result<(), Failure> {
        if !self.routing.session_mode {
            refuse_connection_state(analysis)?;
        }
        let stmt = self.stmt(analysis, text);
        // (What was read of the schema before a schema change through the router is forgotten now, not
        // between reading it for this statement and deciding it.)
        self.schema_checked();
        if analysis.statements.iter().any(|s| s.positional.is_some()) {
            self.learn_key_positions(analysis).await?;
        }
        self.rate_limit(analysis)?;
        let (route, _pass) = loop {
            match self.decide(|| self.routing.planner.decide_shaped(analysis, literals, &self.route)).await? {
                (Err(RouteError::Relations { names }), _) => self.learn_relations(names).await?,
                (route, pass) => break (route, pass),
            }
        };
        let plan = self.plan(&stmt, &route);
        let d = route.as_ref().ok();
        match plan {
            Plan::Answer { tag, warning } => {
                let tag = self.local(&stmt, analysis, text).await?.unwrap_or(tag);
                if let Some((code, message)) = warning {
                    proto::notice(&mut self.io.wbuf, "WARNING", code, message);
                }
                self.reply(&tag).await
            }
            Plan::Hold { tag } => {
                self.check_held_setting(&stmt, text).await?;
                self.txn.queue(text.to_string());
                self.reply(&tag).await
            }
            Plan::Refuse(e) => Err(e.into()),
            Plan::Run(to) if stmt.copy_in => {
                let copy = analysis.statements[0].copy.clone().expect("COPY FROM STDIN has its details");
                Box::pin(self.copy_in(to, &copy, d, super::copy::Request::Simple(msg.frame.clone()))).await
            }
            // The common cases inline (a boxed future per statement costs an allocation); the rest boxed.
            Plan::Run(To::Bound) => {
                let i = self.txn_link()?;
                self.txn.sent(stmt.verb.as_ref());
                self.send_on(i, &|_, conn| conn.io.push(&msg.frame)).await?;
                self.relay_simple(i, &settings_of(analysis, &LiteralParams(literals)), text, &stmt).await
            }
            Plan::Run(To::Once(dest)) if !self.needs_care(&dest, stmt.standby) => {
                let linked = match self.link_now(&dest) {
                    Linked::Done(linked) => linked,
                    Linked::Wait(wait) => self.link_waited(&dest, wait).await,
                    Linked::Slow => self.link(&dest).await,
                };
                let i = match linked {
                    Ok(i) => i,
                    Err(e) => {
                        self.unopened(&stmt, &dest);
                        return Err(e.into());
                    }
                };
                self.send_on(i, &|_, conn| conn.io.push(&msg.frame)).await?;
                self.relay_simple(i, &settings_of(analysis, &LiteralParams(literals)), text, &stmt).await
            }
            Plan::Run(to) => {
                let sets = settings_of(analysis, &LiteralParams(literals));
                Box::pin(self.run_simple(to, msg.frame.clone(), d, &stmt, &sets, text)).await?;
                Ok(())
            }
        }
    }

    /// Whether a statement outside a transaction for `dest` needs more than a connection: a standby may take
    /// it (`shard-read-replicas`), or its shard follows a primary that may fail over (see `send_outside`).
    pub fn needs_care(&self, dest: &Dest, read: bool) -> bool {
        if self.links.find(dest).is_some() {
            return false;
        }
        let b = &self.backend.backends;
        b.topology.follows(dest.shard) || self.may_read_standby(dest, read)
    }

    /// A BEGIN sent to a session's fixed destination that reached no server (no primary within the failover
    /// buffer, say) opened no transaction: the session is back outside one, as the client was told.
    pub fn unopened(&mut self, stmt: &Stmt, dest: &Dest) {
        if matches!(stmt.verb, Some(shardmap::sql::TxnVerb::Begin))
            && matches!(&self.txn.state, State::One(d) if d == dest)
            && self.links.find(dest).is_none()
        {
            self.txn.end();
        }
    }

    /// Whether a statement outside a transaction may read on a standby of `dest`'s shard:
    /// `shard-read-replicas`, or `shard-degraded-reads` while the shard has no primary.
    fn may_read_standby(&self, dest: &Dest, read: bool) -> bool {
        if !read || self.txn.state != State::Idle || self.routing.session_mode {
            return false;
        }
        self.backend.config.read_replicas || self.degraded(dest)
    }

    /// `shard-degraded-reads` applies to `dest` now: its shard has no primary, and the session is outside a
    /// transaction.
    pub fn degraded(&self, dest: &Dest) -> bool {
        let b = &self.backend.backends;
        self.txn.state == State::Idle
            && !self.routing.session_mode
            && self.backend.config.degraded_reads
            && !b.topology.has_primary(dest.shard)
    }

    /// CommandComplete with `tag`, then ReadyForQuery.
    async fn reply(&mut self, tag: &str) -> Result<(), Failure> {
        proto::command_complete(&mut self.io.wbuf, tag);
        self.ready_for_query();
        self.io.flush().await.map_err(|e| Failure::Fatal(e.into()))
    }

    /// What the router does itself for a statement it answers (`Local`); returns the command tag.
    pub async fn local(&mut self, stmt: &Stmt, analysis: &Analysis, text: &str) -> Result<Option<String>, Reported> {
        match stmt.local {
            Local::Gb => {
                let change = analysis.statements[0].session.clone().expect("a gb setting");
                let map = self.routing.map.clone();
                self.route.apply(&change, &map)?;
                self.refix();
                let set = matches!(
                    change,
                    shardmap::sql::SessionChange::ShardKey(Some(_)) | shardmap::sql::SessionChange::Tenant(Some(_))
                );
                Ok(Some(if set { "SET" } else { "RESET" }.into()))
            }
            Local::Deallocate => {
                let Change::Deallocate(name) = self.settings.classify_in(text, self.routing.session_mode) else {
                    return Ok(Some("DEALLOCATE".into()));
                };
                let session = self.routing.session_mode;
                Ok(Some(match name {
                    None => {
                        self.statements.clear();
                        if session {
                            self.to_close.push("*".into());
                        }
                        "DEALLOCATE ALL".into()
                    }
                    Some(n) => {
                        if let (Some(st), true) = (self.statements.remove(&n), session) {
                            self.to_close.push(st.server_name);
                        }
                        "DEALLOCATE".into()
                    }
                }))
            }
            Local::DiscardAll => {
                if !self.held_cursors.is_empty() {
                    // Cursors WITH HOLD go too, and their connections are the client's no more.
                    let dests: Vec<Dest> = self.held_cursors.drain().map(|(_, d)| d).collect();
                    for l in self.links.iter_mut().filter(|l| !l.pending && dests.contains(&l.dest)) {
                        let _ = l.conn.conn().run_quiet("CLOSE ALL").await;
                    }
                }
                self.statements.clear();
                self.settings.apply(Change::DiscardAll);
                self.route.shard_key = None;
                self.route.tenant = None;
                self.refix();
                if self.routing.session_mode {
                    // The client's own connections: their temporary tables, cursors and LISTENs go too.
                    for l in self.links.iter_mut() {
                        let conn = l.conn.conn();
                        if conn.run_quiet("DISCARD ALL").await.is_ok() {
                            conn.prepared.clear();
                            conn.settings = 0;
                        }
                    }
                    self.listening = false;
                }
                Ok(Some("DISCARD ALL".into()))
            }
            Local::No => Ok(None),
        }
    }

    /// Runs a simple Query where the plan says.
    async fn run_simple(
        &mut self,
        to: To,
        frame: Bytes,
        d: Option<&Decision>,
        stmt: &Stmt,
        sets: &[Setting],
        text: &str,
    ) -> Result<(), Failure> {
        let write = |_: &Statements, conn: &mut ServerConn| -> Result<(), Reported> {
            conn.io.push(&frame);
            Ok(())
        };
        let push = |_: &Statements, conn: &mut ServerConn| conn.io.push(&frame);
        let i = match to {
            To::Bound => {
                let i = self.txn_link()?;
                self.txn.sent(stmt.verb.as_ref());
                self.send_on(i, &push).await?;
                i
            }
            To::Once(dest) => match self.send_outside(&dest, stmt.standby, &write, true).await {
                Ok((i, _)) => i,
                Err(e) => {
                    self.unopened(stmt, &dest);
                    return Err(e.into());
                }
            },
            To::Prepared(gid) => {
                let dest = self.prepared_dest(&gid).await?;
                self.send_outside(&dest, false, &write, true).await?.0
            }
            To::Any => {
                let i = self.link_any().await?;
                self.send_on(i, &push).await?;
                i
            }
            To::Fan(shards) => return self.fan_simple(shards, frame, d, stmt.read).await,
            To::Router { run, every, open: _, shards } => {
                return self.router_simple(run, every, shards, text, d).await;
            }
            To::Open(dest) => {
                self.open_simple(&dest).await?;
                let i = self.txn_link()?;
                self.txn.sent(stmt.verb.as_ref());
                self.send_on(i, &push).await?;
                i
            }
            To::OpenAny => {
                let dest = self.any_dest(0);
                self.open_simple(&dest).await?;
                let i = self.txn_link()?;
                self.txn.sent(stmt.verb.as_ref());
                self.send_on(i, &push).await?;
                i
            }
            To::OpenParts(shards) | To::Parts(shards) => {
                let links = self.join_simple(&shards, d).await?;
                return self.all_simple(links, frame, stmt, sets, d).await;
            }
            To::Every => {
                let links = self.part_links(&[]);
                self.txn.sent(stmt.verb.as_ref());
                return self.all_simple(links, frame, stmt, sets, d).await;
            }
            To::Part(shard) => {
                let i = self.part_simple(shard, d).await?;
                self.send_on(i, &push).await?;
                i
            }
            To::Commit => return self.commit_simple().await,
            To::RollbackInstead => {
                self.rollback_instead(true).await?;
                proto::command_complete(&mut self.io.wbuf, "ROLLBACK");
                self.ready_for_query();
                return self.io.flush().await.map_err(|e| Failure::Fatal(e.into()));
            }
        };
        self.relay_simple(i, sets, text, stmt).await
    }

    /// Relays link `i`'s answer to a simple Query up to ReadyForQuery, straight from its read buffer.
    async fn relay_simple(&mut self, i: usize, sets: &[Setting], text: &str, stmt: &Stmt) -> Result<(), Failure> {
        let started = std::time::Instant::now();
        let map = self.status_map(i);
        let shard = self.links.get(i).dest.shard;
        let r = self.links.get(i).conn.conn().relay_to_ready(&mut self.io, &map).await;
        match r {
            Ok((status, error)) => {
                self.links.get(i).conn.conn().status = status;
                if !self.links.get(i).replica {
                    self.backend.answered(shard, started, error);
                }
                self.after_statement(i, stmt, status, error);
                if error {
                    self.txn.unlog_failed();
                }
                // (A SET's own text follows the client only when it came alone.)
                self.answered(i, status, error, sets, stmt.single.then_some(text)).await;
                // (The answer's end is sent once the connection is back: see `Framed::relay_to_ready`.)
                self.release();
                if !self.io.flush_now().map_err(|e| Failure::Fatal(e.into()))? {
                    self.io.flush().await.map_err(|e| Failure::Fatal(e.into()))?;
                }
                Ok(())
            }
            Err(RelayError::Src(e)) => {
                // (Named by its server, as on every other path.)
                let e = BackendError::Wire(e, self.links.get(i).conn.conn().addr.clone()).into();
                Err(self.broken(i, e))
            }
            Err(RelayError::Dst(e)) => Err(Failure::Fatal(e.into())),
        }
    }

    /// Link `i` broke mid-exchange: it is closed (`lost`), and the client hears of it — under session
    /// pooling by the end of its own connection, since its session on that server is gone.
    pub fn broken(&mut self, i: usize, e: Reported) -> Failure {
        self.lost(i, &e);
        if self.routing.session_mode {
            return Failure::Fatal(Fatal::ServerGone(e));
        }
        Failure::Reported(e)
    }

    /// What the client is told in place of a server's ReadyForQuery status, given the transaction's state
    /// (a held transaction is in progress for the client while the connection that answered is idle).
    pub fn status_map(&self, i: usize) -> impl Fn(u8, bool) -> u8 {
        let held = matches!(self.txn.state, State::Held(_));
        let failed = self.txn.failed;
        let others_failed = matches!(self.txn.state, State::Many(_))
            && self
                .links
                .iter()
                .enumerate()
                .any(|(j, l)| j != i && !l.replica && self.txn.holds(&l.dest) && l.status() == READY_FAILED);
        move |server, error| {
            if held {
                if failed || error {
                    READY_FAILED
                } else {
                    READY_IN_TX
                }
            } else if others_failed || (failed && server != READY_IDLE) {
                READY_FAILED
            } else {
                server
            }
        }
    }

    /// A statement's own effects once it ran: PREPARE TRANSACTION and COMMIT/ROLLBACK PREPARED keep the
    /// router's record of where prepared transactions are; LISTEN starts relaying notifications.
    pub fn after_statement(&mut self, i: usize, stmt: &Stmt, _status: u8, error: bool) {
        if error || (stmt.verb.is_none() && stmt.tag.is_empty()) {
            if &*stmt.tag == "CLOSE" {
                // (A CLOSE that failed: the cursor is gone all the same.)
                self.forget_cursor(stmt);
            }
            return;
        }
        let dest = self.links.get(i).dest.clone();
        let b = &self.backend.backends;
        match &stmt.verb {
            Some(shardmap::sql::TxnVerb::Prepare(gid)) => {
                b.prepared.lock().expect("prepared lock").insert(gid.clone(), dest.clone());
            }
            Some(shardmap::sql::TxnVerb::CommitPrepared(gid) | shardmap::sql::TxnVerb::RollbackPrepared(gid)) => {
                b.prepared.lock().expect("prepared lock").remove(gid);
            }
            _ => {}
        }
        if &*stmt.tag == "LISTEN" && self.routing.session_mode {
            self.listening = true;
        }
        match (&stmt.cursor, stmt.declare) {
            // A cursor WITH HOLD outlives its transaction: its connection stays the client's until CLOSE.
            (Some(name), Some(d)) if d.hold => {
                self.held_cursors.insert(name.to_string(), dest.clone());
            }
            _ if &*stmt.tag == "CLOSE" => self.forget_cursor(stmt),
            _ => {}
        }
    }

    /// A CLOSE of a cursor WITH HOLD (or CLOSE ALL): its connection is no longer pinned for it.
    fn forget_cursor(&mut self, stmt: &Stmt) {
        match &stmt.cursor {
            Some(name) => {
                self.held_cursors.remove(&**name);
            }
            None => self.held_cursors.clear(),
        }
    }

    /// Where a prepared transaction (`gid`) is: the router's record, else the shard whose
    /// `pg_prepared_xacts` has it (prepared through another router, or before a restart), else any shard
    /// (which answers that it does not exist).
    pub async fn prepared_dest(&mut self, gid: &str) -> Result<Dest, Reported> {
        if let Some(d) = self.backend.backends.prepared.lock().expect("prepared lock").get(gid) {
            return Ok(d.clone());
        }
        let sql = format!("SELECT 1 FROM pg_catalog.pg_prepared_xacts WHERE gid = '{}'", gid.replace('\'', "''"));
        for shard in self.routing.map.all() {
            let dest = Dest { shard, db: self.fixed().and_then(|f| f.db) };
            let i = self.link(&dest).await?;
            if let Ok(row) = self.links.get(i).conn.conn().query_row(&sql).await {
                if !row.is_empty() {
                    return Ok(dest);
                }
            }
        }
        Ok(self.any_dest(0))
    }

    /// Writes a request on link `i` (with `write`) and sends it.
    pub async fn send_on(
        &mut self,
        i: usize,
        write: &(dyn Fn(&Statements, &mut ServerConn) + Sync),
    ) -> Result<(), Reported> {
        write(&self.statements, self.links.get(i).conn.conn());
        if !self.flush_link_now(i)? {
            self.flush_link(i).await?;
        }
        Ok(())
    }

    /// Sends what is written on link `i` as far as the socket takes it now, without a future (`Ok(false)`:
    /// call [`Session::flush_link`] for the rest); a connection lost meanwhile is noted (see [`Session::lost`]).
    #[inline]
    pub fn flush_link_now(&mut self, i: usize) -> Result<bool, Reported> {
        let sent = self.links.get(i).conn.conn().flush_now();
        sent.map_err(|e| self.lost_by(i, e))
    }

    /// Sends what is left on link `i` (after [`Session::flush_link_now`]).
    pub async fn flush_link(&mut self, i: usize) -> Result<(), Reported> {
        let sent = self.links.get(i).conn.conn().flush().await;
        sent.map_err(|e| self.lost_by(i, e))
    }

    /// Link `i`'s connection failed with `e`: noted (see [`Session::lost`]), and what the client is told.
    fn lost_by(&mut self, i: usize, e: BackendError) -> Reported {
        let e: Reported = e.into();
        self.lost(i, &e);
        e
    }

    /// A statement outside any transaction (or outside the held one) for `dest`: on a standby when it is a
    /// read and `shard-read-replicas` allows; on a shard that follows its primary, a statement the old
    /// primary did not run (the connection failed before it was sent, or the server answered that it is
    /// shutting down or read-only) waits for the new primary and is sent again there. `answers`: the server
    /// will answer what `write` writes (else nothing can be looked at before the caller reads). Returns the
    /// link the request was sent on, and what `write` returned.
    pub async fn send_outside<T>(
        &mut self,
        dest: &Dest,
        read: bool,
        write: &(dyn Fn(&Statements, &mut ServerConn) -> Result<T, Reported> + Sync),
        answers: bool,
    ) -> Result<(usize, T), Reported> {
        if self.needs_care(dest, read) {
            return Box::pin(self.send_outside_with_care(dest, read, write, answers)).await;
        }
        self.send_on_dest(dest, write).await
    }

    /// Writes a request (with `write`) on the session's connection to `dest`, or a new one, and sends it.
    async fn send_on_dest<T>(
        &mut self,
        dest: &Dest,
        write: &(dyn Fn(&Statements, &mut ServerConn) -> Result<T, Reported> + Sync),
    ) -> Result<(usize, T), Reported> {
        let i = self.link(dest).await?;
        let conn = self.links.get(i).conn.conn();
        let start = conn.io.wbuf.len();
        let t = match write(&self.statements, conn) {
            Ok(t) => t,
            Err(e) => {
                conn.io.wbuf.truncate(start);
                return Err(e);
            }
        };
        if let Err(e) = conn.flush().await {
            let e: Reported = e.into();
            self.lost(i, &e);
            return Err(e);
        }
        Ok((i, t))
    }

    /// [`Session::send_outside`] with read replicas or the failover retry.
    async fn send_outside_with_care<T>(
        &mut self,
        dest: &Dest,
        read: bool,
        write: &(dyn Fn(&Statements, &mut ServerConn) -> Result<T, Reported> + Sync),
        answers: bool,
    ) -> Result<(usize, T), Reported> {
        let fresh = self.links.find(dest).is_none();
        let b = self.backend.backends.clone();
        if fresh && self.may_read_standby(dest, read) {
            if let Some(mut p) = Box::pin(self.backend.replica(dest.shard, dest.db.as_deref(), &self.settings)).await {
                let t = write(&self.statements, p.conn())?;
                let sent = p.conn().flush().await.is_ok();
                if sent && (!answers || matches!(p.conn().refused().await, Ok(None))) {
                    let mut l = Link::new(dest.clone(), p);
                    l.replica = true;
                    return Ok((self.links.push(l), t));
                }
            }
        }
        if fresh && b.topology.follows(dest.shard) {
            let mut attempts = 0;
            loop {
                attempts += 1;
                let generation = b.topology.generation(dest.shard);
                let mut p = match self.backend.get(dest.shard, dest.db.as_deref(), &self.settings).await {
                    Ok(p) => p,
                    Err(e) if not_run(&e.code) && attempts < 10 => {
                        self.backend.wait_new_primary(dest.shard, generation, e).await?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let t = write(&self.statements, p.conn())?;
                let not_run = match p.conn().flush().await {
                    Err(e) => Some(Reported::from(e)),
                    Ok(()) if answers => p.conn().refused().await.unwrap_or(None),
                    Ok(()) => None,
                };
                match not_run {
                    Some(e) if attempts < 10 => {
                        drop(p);
                        self.backend.wait_new_primary(dest.shard, generation, e).await?;
                    }
                    Some(e) => return Err(e),
                    None => return Ok((self.links.push(Link::new(dest.clone(), p)), t)),
                }
            }
        }
        self.send_on_dest(dest, write).await
    }

    /// Link `i` failed (its server went away, or the exchange broke off): it is closed; a transaction on it
    /// is lost (the server rolled it back).
    pub fn lost(&mut self, i: usize, e: &Reported) {
        let l = self.links.remove(i);
        self.backend.failed(l.dest.shard, e);
        if self.backend.backends.topology.follows(l.dest.shard) && e.code.starts_with("08") {
            self.backend.backends.topology.suspect(l.dest.shard);
        }
        if self.txn.lose(&l.dest) {
            self.txn_settings.clear();
        }
    }

    /// Opens the held transaction on `dest` with a simple Query per queued statement (BEGIN first), before
    /// the statement that named the shard is sent. If one fails, the connection is closed and the error is
    /// the client's (the transaction stays held, and fails).
    pub async fn open_simple(&mut self, dest: &Dest) -> Result<(), Reported> {
        let i = self.link(dest).await?;
        self.replay_simple(i).await?;
        self.txn.opened(dest.clone());
        Ok(())
    }

    async fn replay_simple(&mut self, i: usize) -> Result<(), Reported> {
        let queued = self.txn.queued().to_vec();
        let conn = self.links.get(i).conn.conn();
        for q in &queued {
            proto::query_bytes(&mut conn.io.wbuf, &self.encoding.encode(q));
        }
        let mut err = conn.flush().await.err();
        if err.is_none() {
            for _ in &queued {
                // ParameterStatus of a replayed SET reaches the client now.
                if let Err(e) = conn.drain_to_ready_relaying(Some(&mut self.io.wbuf)).await {
                    let fatal = !matches!(e, BackendError::Server { .. });
                    err.get_or_insert(e);
                    if fatal {
                        break;
                    }
                }
            }
        }
        if let Some(e) = err {
            drop(self.links.remove(i));
            return Err(e.into());
        }
        self.queued_settings(i, &queued);
        Ok(())
    }

    /// The settings queued statements change, replayed on link `i` inside the transaction.
    fn queued_settings(&mut self, i: usize, queued: &[String]) {
        for q in queued {
            let a = self.routing.planner.analyze(q);
            let sets = settings_of(&a, &shardmap::NoParams);
            if !sets.is_empty() {
                self.txn_settings.extend(sets.iter().cloned());
                self.links.get(i).conn.conn().settings = crate::backend::checkout::SETTINGS_UNKNOWN;
            }
        }
    }

    /// Joins the transaction on `shards` (none: every shard), in the decision's database: each shard it has
    /// not joined yet runs its replay log first (the held transaction opens there). Returns the
    /// transaction's links to those shards, in shard order. A shard that fails to join is not part of it
    /// (its error is the client's, and fails the transaction).
    pub async fn join_simple(&mut self, shards: &[ShardId], d: Option<&Decision>) -> Result<Vec<usize>, Reported> {
        let (shards, new) = self.to_join(shards, d);
        self.may_join(&new)?;
        self.hold_all(&new).await?;
        for dest in new {
            let i = self.link(&dest).await?;
            self.replay_simple(i).await?;
            self.txn.joined(dest);
        }
        Ok(self.part_links(&shards))
    }

    /// The shards a statement for `shards` (none: every shard) needs, and the destinations among them the
    /// transaction has not joined yet (in the decision's database).
    pub fn to_join(&self, shards: &[ShardId], d: Option<&Decision>) -> (Vec<ShardId>, Vec<Dest>) {
        let shards: Vec<ShardId> = if shards.is_empty() { self.routing.map.all().collect() } else { shards.to_vec() };
        let db = d.and_then(|d| d.database.clone());
        let new = shards.iter().map(|&shard| Dest { shard, db: db.clone() }).filter(|d| !self.txn.holds(d)).collect();
        (shards, new)
    }

    /// Whether shards may join the open transaction: not after a setting its replay log does not hold.
    pub fn may_join(&self, new: &[Dest]) -> Result<(), Reported> {
        if new.is_empty() || !self.txn.unreplayed_setting {
            return Ok(());
        }
        Err(Reported::unsupported(
            "this statement goes to a shard the transaction has not reached yet, after a set_config() call in the transaction that the shard would not have: make the setting with SET (or SET LOCAL), or reach the shard before the call",
        ))
    }

    /// The transaction's link to `shard`, which joins it first when it has not (`None`: its first link).
    pub async fn part_simple(&mut self, shard: Option<ShardId>, d: Option<&Decision>) -> Result<usize, Reported> {
        match shard {
            Some(s) => self.join_simple(&[s], d).await?.first().copied(),
            None => self.part_links(&[]).first().copied(),
        }
        .ok_or_else(|| Reported::new("XX000", "the transaction's connection is gone"))
    }

    /// The transaction's links to `shards` (none: all of them), in shard order.
    pub fn part_links(&self, shards: &[ShardId]) -> Vec<usize> {
        let mut parts: Vec<&Dest> =
            self.txn.parts().iter().filter(|d| shards.is_empty() || shards.contains(&d.shard)).collect();
        parts.sort_by_key(|d| d.shard);
        parts.iter().filter_map(|d| self.links.find(d)).collect()
    }

    /// COMMIT of a transaction the router failed: ROLLBACK on its connections (the caller tells the client
    /// "ROLLBACK", as PostgreSQL does). `_simple`: which protocol asked (both answer the same).
    pub async fn rollback_instead(&mut self, _simple: bool) -> Result<(), Failure> {
        let mut links = self.part_links(&[]);
        links.sort_unstable();
        for i in links.into_iter().rev() {
            let conn = self.links.get(i).conn.conn();
            if conn.run_quiet("ROLLBACK").await.is_err() {
                drop(self.links.remove(i));
            }
        }
        self.txn.rolled_back();
        self.txn_settings.clear();
        Ok(())
    }

    /// An extended-protocol sync group left open by a Flush when a Query comes: its connections get their
    /// Sync (answers relayed up to it), as a server would close the group.
    pub async fn sync_group_quietly(&mut self) {
        let pending: Vec<usize> = (0..self.links.len()).filter(|&i| self.links.get(i).pending).collect();
        for i in pending.into_iter().rev() {
            let l = self.links.get(i);
            l.pending = false;
            let conn = l.conn.conn();
            proto::put(&mut conn.io.wbuf, b'S', |_| {});
            let ok = conn.flush().await.is_ok() && conn.drain_to_ready().await.is_ok();
            if !ok {
                drop(self.links.remove(i));
            }
        }
        self.group_failed = false;
        self.release();
    }
}

/// The client's status when several connections answered (an all-shards transaction's).
pub fn combined(statuses: &[u8]) -> u8 {
    if statuses.contains(&READY_FAILED) {
        READY_FAILED
    } else if statuses.iter().all(|s| *s == READY_IDLE) {
        READY_IDLE
    } else {
        READY_IN_TX
    }
}
