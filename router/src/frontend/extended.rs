//! The extended query protocol: Parse/Bind/Describe/Execute/Close up to a Sync (or Flush) form a batch that
//! goes to one place. The route comes from each Bind's statement and parameters.
//!
//! Named prepared statements keep working under transaction pooling, as PgBouncer 1.21+ does: the router
//! keeps each client's statements, names them on servers by a hash of their text and parameter types
//! (`sr_<hash>`), and prepares them on whatever connection the client gets, leaving out a Parse the server
//! already has (and answering ParseComplete itself) or adding one before a Bind that needs it (and
//! swallowing its ParseComplete). Closing a client statement does not close the server's copy.

use std::collections::VecDeque;

use foldhash::HashSet;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use shardmap::sql::Kind;
use shardmap::{Decision, Target};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::backend::conn::ServerConn;
use crate::backend::pool::Pooled;
use crate::frontend::session::{statement_hash, BindParams, Client, ClientStmt, Fatal, Reported, Txn};
use crate::net::proto;
use crate::net::wire::Msg;

/// What the client expects back for each message sent (or not sent) to the server.
#[derive(Debug)]
enum Exp {
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
}

/// How a connection's answers reach the client when a batch goes to several shards.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Only,
    First,
    Rest,
    /// Nothing reaches the client; errors are kept in `Merge::error`.
    Silent,
}

#[derive(Default)]
struct Merge {
    rows: u64,
    verb: String,
    error: Option<Bytes>,
    /// Whether any ErrorResponse came back.
    failed: bool,
    /// Keep ReadyForQuery from the client (a pipeline segment: the client gets one at the end).
    hold_ready: bool,
}

fn reported(code: &str, message: impl Into<String>) -> Reported {
    Reported { code: code.to_string(), message: message.into() }
}

/// Runs one batch; errors the router raises are reported the way a server would report them.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Client<S>, batch: &[Msg]) -> Result<(), Fatal> {
    let sync = batch.last().is_some_and(|m| m.tag == b'S');
    match run_inner(c, batch).await {
        Ok(()) => Ok(()),
        Err(e) => {
            proto::error(&mut c.io.wbuf, "ERROR", &e.code, &e.message);
            if !matches!(c.txn, Txn::Idle) {
                c.failed = true;
            }
            if sync {
                let status = c.status();
                proto::ready(&mut c.io.wbuf, status);
            }
            c.io.flush().await?;
            Ok(())
        }
    }
}

/// Registers the batch's Parse messages as client statements.
fn register<S>(c: &mut Client<S>, batch: &[Msg]) -> Result<(), Reported> {
    for m in batch.iter().filter(|m| m.tag == b'P') {
        let p = proto::read_parse(m.body()).ok_or_else(|| reported("08P01", "malformed Parse message"))?;
        if c.statements.get(p.name).is_some_and(|st| *st.text == *p.query && st.types == p.types) {
            // The same statement again (drivers re-send the unnamed one with every execution).
            continue;
        }
        let analysis = c.shared.routing.planner.analyze(p.query);
        let server_name =
            if p.name.is_empty() { String::new() } else { format!("sr_{:016x}", statement_hash(p.query, &p.types)) };
        c.statements
            .insert(p.name.to_string(), ClientStmt { text: Arc::from(p.query), types: p.types, analysis, server_name });
    }
    Ok(())
}

/// The batch's route: every Bind must agree; a batch without Bind (Parse/Describe only) goes anywhere.
/// Also says whether the Binds disagree (a pipeline for several shards).
fn decide<S>(c: &Client<S>, batch: &[Msg]) -> Result<(Option<Decision>, Option<Kind>, bool), Reported> {
    let mut decision: Option<Decision> = None;
    let mut kind = None;
    for m in batch.iter().filter(|m| m.tag == b'B') {
        let bind = proto::read_bind(m.body()).ok_or_else(|| reported("08P01", "malformed Bind message"))?;
        let stmt = c
            .statements
            .get(bind.statement)
            .ok_or_else(|| reported("26000", format!("prepared statement \"{}\" does not exist", bind.statement)))?;
        if !c.shared.routing.session_mode {
            crate::frontend::session::refuse_session_locks(&stmt.analysis)?;
        }
        let d = c.shared.routing.planner.decide_analyzed(
            &stmt.analysis,
            &BindParams { bind: &bind, types: &stmt.types },
            &c.session,
        )?;
        kind = kind.or(stmt.analysis.statements.first().map(|s| s.kind));
        decision = Some(match decision {
            None => d,
            Some(prev) if prev.target == d.target || d.target == Target::Session || d.target == Target::Any => prev,
            Some(prev) if prev.target == Target::Session || prev.target == Target::Any => d,
            Some(_) => return Ok((None, Some(Kind::Write), true)),
        });
    }
    Ok((decision, kind, false))
}

async fn run_inner<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Client<S>, batch: &[Msg]) -> Result<(), Reported> {
    if batch.iter().all(|m| m.tag == b'H') {
        // A Flush with nothing before it (libpq's pipeline mode sends one after Sync): only our own output
        // is waiting, and it has been written already; a bound exchange forwards it.
        if let (Txn::Bound, Some(p)) = (&c.txn, c.bound.as_mut()) {
            p.conn().io.push(&batch[0].frame);
            p.conn().flush().await?;
        }
        return Ok(());
    }
    register(c, batch)?;
    // COPY FROM STDIN is split by row on the simple-protocol path only; through Bind/Execute the copy data
    // would never be read (the exchange would hang), so it is refused, as a server refuses what it cannot do.
    for m in batch.iter().filter(|m| m.tag == b'B') {
        let copying = proto::read_bind(m.body())
            .and_then(|b| c.statements.get(b.statement))
            .is_some_and(|st| st.analysis.statements.iter().any(|s| s.kind == Kind::CopyIn));
        if copying {
            return Err(reported(
                "0A000",
                "COPY FROM STDIN through the extended query protocol (Bind/Execute, as tokio-postgres' copy_in sends it) is not supported yet; send it as a simple query (psql's \\copy, psycopg's copy, pgbench -i)",
            ));
        }
    }
    let closes: Vec<String> = batch
        .iter()
        .filter(|m| m.tag == b'C' && m.body().first() == Some(&b'S'))
        .filter_map(|m| proto::read_cstr(&m.body()[1..]).map(|(n, _)| n.to_string()))
        .filter(|n| !n.is_empty())
        .collect();
    if c.failed && !batch_is_rollback(c, batch) {
        // Inside a failed transaction only ROLLBACK is accepted, as on a server.
        return Err(reported(
            "25P02",
            "current transaction is aborted, commands ignored until end of transaction block",
        ));
    }
    // In the catalog's gate from the decision to the answer; a batch for a unit a move is cutting over waits
    // for its new owner, out of the gate (see `route_simple`).
    let ((decision, kind, mixed), _pass) = loop {
        let pass = c.shared.routing.catalog.enter();
        let decided = decide(c, batch)?;
        match decided.0.as_ref() {
            Some(d) if c.shared.routing.map.holds(d) && !matches!(c.txn, Txn::Bound) => {
                drop(pass);
                Box::pin(c.shared.routing.thaw(Some(d))).await?;
            }
            // A pipeline for several shards: its units are known batch by batch; it waits out any freeze.
            None if decided.2 && c.shared.routing.map.anything_frozen() => {
                drop(pass);
                Box::pin(c.shared.routing.thaw(None)).await?;
            }
            _ => break (decided, pass),
        }
    };
    if mixed {
        if !matches!(c.txn, Txn::Idle) {
            return Err(reported(
                "0A000",
                "the statements of this transaction go to different shards; multi-shard transactions are not supported yet",
            ));
        }
        return pipeline(c, batch).await;
    }
    if kind == Some(Kind::Transaction) && !matches!(c.txn, Txn::Bound) {
        return synthesize_transaction(c, batch).await;
    }
    if matches!(c.txn, Txn::BoundAll) {
        let r = on_bound_all(c, batch, decision.as_ref()).await;
        for name in closes {
            c.statements.remove(&name);
        }
        return r;
    }
    let result = match decision {
        None => {
            // Parse/Describe/Close only: any shard answers (schemas are the same everywhere).
            match c.txn {
                Txn::Bound => send_bound(c, batch).await,
                _ if c.shared.backends.topology.follows_any() => Box::pin(send_following(c, batch, None)).await,
                _ => {
                    let p = c.checkout_any(None).await?;
                    send_alone(c, batch, p).await
                }
            }
        }
        Some(d) => match d.target.clone() {
            Target::One(s) => send_to_shard(c, batch, s, &d).await,
            Target::Any | Target::Session => match c.txn {
                Txn::Bound => send_bound(c, batch).await,
                Txn::BoundAll => unreachable!("handled above"),
                Txn::Held(_) if d.target == Target::Session => Err(reported(
                    "0A000",
                    "a session statement before the transaction's first statement is not supported in the extended protocol; send it after a statement that names a shard, or before BEGIN",
                )),
                Txn::Held(_) => {
                    let p = c.checkout_any(d.database.as_deref()).await?;
                    send_alone(c, batch, p).await
                }
                Txn::Idle if d.target == Target::Session => session_statements(c, batch, &d).await,
                Txn::Idle => {
                    let p = c.checkout_any(d.database.as_deref()).await?;
                    send_alone(c, batch, p).await
                }
            },
            Target::All | Target::Set(_) => {
                let read = d.analysis.statements.iter().all(|s| s.kind == Kind::Read);
                let held_read = matches!(c.txn, Txn::Held(_)) && read;
                if matches!(c.txn, Txn::Held(_)) && !read && d.target == Target::All {
                    crate::frontend::alltx::bind_all(c, &d).await?;
                    let r = on_bound_all(c, batch, Some(&d)).await;
                    for name in closes {
                        c.statements.remove(&name);
                    }
                    return r;
                }
                if !matches!(c.txn, Txn::Idle) && !held_read {
                    return Err(reported(
                        "0A000",
                        format!("this statement goes to several shards ({}), but the transaction is bound to one; multi-shard transactions are not supported yet", d.reason),
                    ));
                }
                fan_out(c, batch, &d).await
            }
        },
    };
    for name in closes {
        c.statements.remove(&name);
    }
    result
}

/// SET/RESET/SHOW in the extended protocol outside a transaction: tracked like their simple-protocol
/// twins, so that a setting follows the client to its next connection and no other client.
async fn session_statements<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    batch: &[Msg],
    d: &Decision,
) -> Result<(), Reported> {
    let mut changes = Vec::new();
    for m in batch.iter().filter(|m| m.tag == b'B') {
        let bind = proto::read_bind(m.body()).ok_or_else(|| reported("08P01", "malformed Bind message"))?;
        let text = c.statements.get(bind.statement).map(|s| s.text.clone()).unwrap_or_default();
        match c.settings.classify_in(&text, c.shared.routing.session_mode) {
            crate::frontend::settings::Change::Refused(why) => return Err(reported("0A000", why)),
            change => changes.push(change),
        }
    }
    if let [change @ (crate::frontend::settings::Change::Deallocate(_) | crate::frontend::settings::Change::DiscardAll)] =
        changes.as_slice()
    {
        let change = match change {
            crate::frontend::settings::Change::Deallocate(n) => {
                crate::frontend::settings::Change::Deallocate(n.clone())
            }
            _ => crate::frontend::settings::Change::DiscardAll,
        };
        let tag = c.local_session_change(change);
        return synthesize(c, batch, tag).await;
    }
    let mut p = c.checkout_any(d.database.as_deref()).await?;
    let exps = rewrite(c, batch, p.conn())?;
    p.conn().flush().await?;
    let mut merge = Merge::default();
    let status = relay(c, &mut p, exps, Role::Only, &mut merge).await?;
    if !merge.failed {
        for change in changes {
            c.settings.apply(change);
        }
    }
    // The connection now carries the client's settings (or, after a failure, an unknown mix: close it).
    if merge.failed {
        drop(p);
    } else {
        p.conn().settings = c.settings.hash();
        if let Some(s) = status {
            c.after_exchange(p, s);
        }
    }
    Ok(())
}

/// A pipeline outside a transaction whose statements go to different shards (psycopg's executemany,
/// libpq pipeline mode): cut into one segment per Bind/Execute, each run on its shard with a Sync of its
/// own; an error skips the rest, as the server would skip to the Sync. Unlike one server's implicit
/// transaction, the segments commit one by one (documented).
async fn pipeline<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Client<S>, batch: &[Msg]) -> Result<(), Reported> {
    let Some(sync) = batch.last().filter(|m| m.tag == b'S').cloned() else {
        return Err(reported("0A000", "statements for different shards must end with Sync, not Flush"));
    };
    let mut segments: Vec<Vec<Msg>> = Vec::new();
    let mut current: Vec<Msg> = Vec::new();
    for m in &batch[..batch.len() - 1] {
        current.push(m.clone());
        if m.tag == b'E' {
            segments.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        segments.push(current);
    }
    for mut seg in segments {
        seg.push(sync.clone());
        let (d, _, _) = decide(c, &seg)?;
        let mut p = match d.as_ref().map(|d| d.target.clone()) {
            Some(Target::One(s)) => c.checkout(s, d.as_ref().and_then(|d| d.database.as_deref())).await?,
            Some(Target::All | Target::Set(_)) => {
                return Err(reported(
                    "0A000",
                    "a pipeline statement for several shards is not supported; send it with its own Sync",
                ));
            }
            _ => c.checkout_any(None).await?,
        };
        let exps = rewrite(c, &seg, p.conn())?;
        p.conn().flush().await?;
        let mut merge = Merge { hold_ready: true, ..Merge::default() };
        let status = relay(c, &mut p, exps, Role::Only, &mut merge).await?;
        if status == Some(proto::READY_IDLE) {
            c.give_back(p);
        }
        if merge.failed {
            break;
        }
    }
    proto::ready(&mut c.io.wbuf, proto::READY_IDLE);
    c.io.flush().await.map_err(|e| reported("08006", e.to_string()))
}

fn batch_is_rollback<S>(c: &Client<S>, batch: &[Msg]) -> bool {
    batch.iter().filter(|m| m.tag == b'B').all(|m| {
        proto::read_bind(m.body())
            .and_then(|b| c.statements.get(b.statement))
            .is_some_and(|s| s.text.trim_start().get(..8).is_some_and(|w| w.eq_ignore_ascii_case("ROLLBACK")))
    })
}

/// BEGIN/COMMIT/ROLLBACK in the extended protocol while no connection is bound: answered by the router
/// (BEGIN is held until a statement names a shard).
async fn synthesize_transaction<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    batch: &[Msg],
) -> Result<(), Reported> {
    let mut tag = String::new();
    for m in batch.iter().filter(|m| m.tag == b'B') {
        let bind = proto::read_bind(m.body()).ok_or_else(|| reported("08P01", "malformed Bind message"))?;
        let text = c.statements.get(bind.statement).map(|s| s.text.clone()).unwrap_or_default();
        let word =
            text.trim_start().split(|ch: char| !ch.is_ascii_alphabetic()).next().unwrap_or("").to_ascii_uppercase();
        match (word.as_str(), &mut c.txn) {
            ("BEGIN" | "START", Txn::Idle) => {
                let mut q = BytesMut::new();
                proto::query(&mut q, &text);
                c.txn = Txn::Held(vec![q.freeze()]);
                tag = "BEGIN".into();
            }
            ("COMMIT" | "END", _) => {
                c.txn = Txn::Idle;
                c.failed = false;
                tag = "COMMIT".into();
            }
            ("ROLLBACK" | "ABORT", _) => {
                c.txn = Txn::Idle;
                c.failed = false;
                tag = "ROLLBACK".into();
            }
            ("SAVEPOINT" | "RELEASE", Txn::Held(held)) => {
                let mut q = BytesMut::new();
                proto::query(&mut q, &text);
                held.push(q.freeze());
                tag = word.clone();
            }
            _ => {
                return Err(reported(
                    "0A000",
                    format!("{word} here is not supported before the transaction's first statement"),
                ))
            }
        }
    }
    synthesize(c, batch, &tag).await
}

/// Answers a batch the router handled itself: ParseComplete, BindComplete, NoData, the command tag,
/// CloseComplete and ReadyForQuery, in the batch's order.
async fn synthesize<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    batch: &[Msg],
    tag: &str,
) -> Result<(), Reported> {
    for m in batch {
        let b = &mut c.io.wbuf;
        match m.tag {
            b'P' => proto::parse_complete(b),
            b'B' => proto::put(b, b'2', |_| {}),
            b'D' if m.body().first() == Some(&b'S') => {
                proto::put(b, b't', |b| b.put_i16(0));
                proto::put(b, b'n', |_| {});
            }
            b'D' => proto::put(b, b'n', |_| {}),
            b'E' => proto::command_complete(b, tag),
            b'C' => proto::close_complete(b),
            b'S' => {
                let status = c.status();
                proto::ready(&mut c.io.wbuf, status);
            }
            _ => {}
        }
    }
    c.io.flush().await.map_err(|e| reported("08006", e.to_string()))
}

/// Rewrites a batch for one server connection: statement names, Parses left out or added.
/// The rewritten batch is queued on the connection's write buffer (nothing is queued on error).
fn rewrite<S>(c: &Client<S>, batch: &[Msg], conn: &mut ServerConn) -> Result<VecDeque<Exp>, Reported> {
    let start = conn.io.wbuf.len();
    let r = rewrite_into(c, batch, &conn.prepared, &mut conn.io.wbuf);
    if r.is_err() {
        conn.io.wbuf.truncate(start);
    }
    r
}

fn rewrite_into<S>(
    c: &Client<S>,
    batch: &[Msg],
    prepared: &HashSet<String>,
    out: &mut BytesMut,
) -> Result<VecDeque<Exp>, Reported> {
    let mut exps = VecDeque::with_capacity(batch.len() + 2);
    let mut parsed_here: HashSet<String> = HashSet::default();
    let mut unnamed_parsed = false;
    let stmt = |name: &str| {
        c.statements.get(name).ok_or_else(|| reported("26000", format!("prepared statement \"{name}\" does not exist")))
    };
    // Prepares a statement on this connection before a message that needs it.
    let ensure = |name: &str,
                  out: &mut BytesMut,
                  exps: &mut VecDeque<Exp>,
                  parsed_here: &mut HashSet<String>,
                  unnamed_parsed: &mut bool|
     -> Result<(), Reported> {
        let st = stmt(name)?;
        if name.is_empty() {
            if !*unnamed_parsed {
                proto::write_parse(out, "", &st.text, &st.types);
                exps.push_back(Exp::SwallowParse(None));
                *unnamed_parsed = true;
            }
        } else if !prepared.contains(&st.server_name) && !parsed_here.contains(&st.server_name) {
            proto::write_parse(out, &st.server_name, &st.text, &st.types);
            exps.push_back(Exp::SwallowParse(Some(st.server_name.clone())));
            parsed_here.insert(st.server_name.clone());
        }
        Ok(())
    };
    for m in batch {
        let body = m.body();
        match m.tag {
            b'P' => {
                let p = proto::read_parse(body).ok_or_else(|| reported("08P01", "malformed Parse message"))?;
                if p.name.is_empty() {
                    out.put_slice(&m.frame);
                    exps.push_back(Exp::Parse(None));
                    unnamed_parsed = true;
                } else {
                    let st = stmt(p.name)?;
                    if prepared.contains(&st.server_name) || parsed_here.contains(&st.server_name) {
                        exps.push_back(Exp::InjectParse);
                    } else {
                        proto::write_parse(out, &st.server_name, &st.text, &st.types);
                        exps.push_back(Exp::Parse(Some(st.server_name.clone())));
                        parsed_here.insert(st.server_name.clone());
                    }
                }
            }
            b'B' => {
                let b = proto::read_bind(body).ok_or_else(|| reported("08P01", "malformed Bind message"))?;
                ensure(b.statement, out, &mut exps, &mut parsed_here, &mut unnamed_parsed)?;
                if b.statement.is_empty() {
                    out.put_slice(&m.frame);
                } else {
                    proto::write_bind_renamed(out, &b, &stmt(b.statement)?.server_name);
                }
                exps.push_back(Exp::Bind);
            }
            b'D' => {
                let (&kind, rest) =
                    body.split_first().ok_or_else(|| reported("08P01", "malformed Describe message"))?;
                let (name, _) =
                    proto::read_cstr(rest).ok_or_else(|| reported("08P01", "malformed Describe message"))?;
                if kind == b'S' {
                    ensure(name, out, &mut exps, &mut parsed_here, &mut unnamed_parsed)?;
                    if name.is_empty() {
                        out.put_slice(&m.frame);
                    } else {
                        let sn = &stmt(name)?.server_name;
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
    Ok(exps)
}

async fn send_to_shard<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    batch: &[Msg],
    shard: shardmap::ShardId,
    d: &Decision,
) -> Result<(), Reported> {
    let read_replicas = c.shared.routing.config.load().read_replicas;
    match std::mem::take(&mut c.txn) {
        Txn::BoundAll => {
            c.txn = Txn::BoundAll;
            on_bound_all(c, batch, Some(d)).await
        }
        Txn::Bound => {
            c.txn = Txn::Bound;
            c.check_bound_shard(shard, d)?;
            send_bound(c, batch).await
        }
        Txn::Held(held) => {
            c.open_held(shard, d, held).await?;
            send_bound(c, batch).await
        }
        Txn::Idle
            if read_replicas
                && d.analysis.statements.iter().all(|s| s.kind == Kind::Read)
                && Box::pin(send_replica(c, batch, shard, d)).await? =>
        {
            Ok(())
        }
        Txn::Idle if c.shared.backends.topology.follows(shard) => {
            Box::pin(send_following(c, batch, Some((shard, d.database.as_deref())))).await
        }
        Txn::Idle => {
            let p = c.checkout(shard, d.database.as_deref()).await?;
            send_alone(c, batch, p).await
        }
    }
}

/// Whether the server will answer this batch with a message past the preliminaries that `Framed::front`
/// skips: something was sent, and it ends with Sync or holds an Execute (a Parse or Describe followed only by
/// Flush would leave `front` waiting).
fn awaits_result(batch: &[Msg], exps: &VecDeque<Exp>) -> bool {
    exps.iter().any(|e| !matches!(e, Exp::InjectParse | Exp::InjectClose))
        && batch.iter().any(|m| matches!(m.tag, b'S' | b'E'))
}

/// `shard-read-replicas`: a read batch on a standby that is fresh enough. `Ok(false)`: there is none, or it
/// refused the batch before running it (25006), and the caller sends it to the primary.
async fn send_replica<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    batch: &[Msg],
    shard: shardmap::ShardId,
    d: &Decision,
) -> Result<bool, Reported> {
    let Some(mut p) = c.checkout_replica(shard, d.database.as_deref()).await else {
        return Ok(false);
    };
    let exps = rewrite(c, batch, p.conn())?;
    let answered = awaits_result(batch, &exps);
    if p.conn().flush().await.is_err() {
        return Ok(false);
    }
    if answered && !matches!(crate::frontend::session::refused(p.conn()).await, Ok(None)) {
        return Ok(false);
    }
    relay_alone(c, p, exps).await.map(|()| true)
}

/// `send_alone` outside a transaction on a shard that follows its primary: a batch that the old primary did
/// not run (see `Client::exchange_following`) waits for the new primary and runs there.
/// `to`: the shard (and tenant database), or none for a batch any shard answers (Parse/Describe only).
async fn send_following<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    batch: &[Msg],
    to: Option<(shardmap::ShardId, Option<&str>)>,
) -> Result<(), Reported> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        // Where it goes this time (any shard: the next one; its generation read before the checkout).
        let shard = match to {
            Some((s, _)) => s,
            None => c.home().map_or_else(|| c.shared.backends.any_shard(), |(s, _)| s),
        };
        let name = c.shared.routing.map.node(shard).name.clone();
        let generation = c.shared.backends.topology.generation(shard);
        let checked_out = match to {
            Some((s, db)) => c.checkout(s, db).await,
            None => match c.home() {
                Some((s, db)) => c.checkout(s, Some(&db)).await,
                None => c.checkout(shard, None).await,
            },
        };
        let mut p = match checked_out {
            Ok(p) => p,
            Err(e) if crate::backend::topology::not_run(&e.code) && attempts < 10 => {
                c.wait_new_primary(shard, generation, &name, e).await?;
                continue;
            }
            Err(e) => return Err(e),
        };
        let exps = rewrite(c, batch, p.conn())?;
        // A batch the router answers alone (a Parse the server has, and a Flush) gets nothing back to look at.
        let answered = awaits_result(batch, &exps);
        let not_run = match p.conn().flush().await {
            Err(e) => Some(Reported::from(e)),
            Ok(()) if answered => crate::frontend::session::refused(p.conn()).await.unwrap_or(None),
            Ok(()) => None,
        };
        match not_run {
            Some(e) if attempts < 10 => {
                drop(p);
                c.wait_new_primary(shard, generation, &name, e).await?;
            }
            Some(e) => return Err(e),
            None => {
                let r = relay_alone(c, p, exps).await;
                if r.as_ref().is_err_and(|e| e.code.starts_with("08")) {
                    c.shared.backends.topology.suspect(shard);
                }
                return r;
            }
        }
    }
}

async fn send_bound<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Client<S>, batch: &[Msg]) -> Result<(), Reported> {
    let p = c.bound.take().ok_or_else(|| reported("XX000", "no bound connection"))?;
    send_alone(c, batch, p).await
}

/// Sends a batch on one connection and relays the answers; the connection is kept while a transaction is
/// open (or a Flush left the exchange unfinished) and given back when the server is idle.
async fn send_alone<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    batch: &[Msg],
    mut p: Pooled,
) -> Result<(), Reported> {
    let exps = rewrite(c, batch, p.conn())?;
    if let Err(e) = p.conn().flush().await {
        c.txn = Txn::Idle;
        return Err(e.into());
    }
    relay_alone(c, p, exps).await
}

/// The answers to a batch sent on one connection (see `send_alone`).
async fn relay_alone<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    mut p: Pooled,
    exps: VecDeque<Exp>,
) -> Result<(), Reported> {
    let started = std::time::Instant::now();
    let shard = p.shard();
    // Metrics count statements run (an Execute), not a driver's Parse/Describe round trips.
    let executes = exps.iter().any(|e| matches!(e, Exp::Execute));
    let mut merge = Merge::default();
    let status = match relay(c, &mut p, exps, Role::Only, &mut merge).await {
        Ok(s) => s,
        Err(e) => {
            c.txn = Txn::Idle;
            c.connection_failed(shard, &e);
            return Err(e);
        }
    };
    match status {
        Some(status) => c.after_exchange(p, status),
        None => {
            // Flush without Sync: the exchange goes on; keep the connection until a Sync completes it.
            c.txn = Txn::Bound;
            c.bound = Some(p);
        }
    }
    if executes {
        c.answer_error = merge.failed;
        c.answered(shard, started);
    }
    Ok(())
}

/// A read with no key in the extended protocol: the same batch on every shard, rows concatenated.
async fn fan_out<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    batch: &[Msg],
    d: &Decision,
) -> Result<(), Reported> {
    let executes = batch.iter().filter(|m| m.tag == b'E').count();
    if executes > 1 || batch.last().map(|m| m.tag) != Some(b'S') {
        return Err(reported("0A000", "a statement for several shards must be alone before its Sync"));
    }
    if d.analysis.statements.iter().any(|s| s.kind != Kind::Read) {
        if d.target != Target::All {
            return Err(reported("0A000", format!("this statement would write to several shards ({})", d.reason)));
        }
        // DDL and writes to global tables: the same batch on every shard.
        let shards = d.shards(&c.shared.routing.map);
        let mut conns = Vec::with_capacity(shards.len());
        for s in &shards {
            conns.push(c.checkout(*s, d.database.as_deref()).await?);
        }
        let r = everywhere(c, batch, &mut conns).await;
        for p in conns {
            if p.conn_status() == proto::READY_IDLE {
                c.give_back(p);
            }
        }
        return r;
    }
    let shards = d.shards(&c.shared.routing.map);
    let mut conns = Vec::with_capacity(shards.len());
    for s in &shards {
        conns.push(c.checkout(*s, d.database.as_deref()).await?);
    }
    let mut plans = Vec::with_capacity(conns.len());
    for p in conns.iter_mut() {
        let exps = rewrite(c, batch, p.conn())?;
        p.conn().flush().await?;
        plans.push(exps);
    }
    let mut merge = Merge::default();
    for (i, (mut p, exps)) in conns.into_iter().zip(plans).enumerate() {
        let role = if i == 0 { Role::First } else { Role::Rest };
        let status = relay(c, &mut p, exps, role, &mut merge).await?;
        if status == Some(proto::READY_IDLE) {
            c.give_back(p);
        }
    }
    match merge.error.take() {
        Some(e) => c.io.push(&e),
        None if executes == 1 => proto::command_complete(&mut c.io.wbuf, &format!("{} {}", merge.verb, merge.rows)),
        None => {}
    }
    let status = c.status();
    proto::ready(&mut c.io.wbuf, status);
    c.io.flush().await.map_err(|e| reported("08006", e.to_string()))
}

/// A batch inside an all-shards transaction: on the shard it routes to, or on every shard.
async fn on_bound_all<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    batch: &[Msg],
    d: Option<&Decision>,
) -> Result<(), Reported> {
    let mut conns = std::mem::take(&mut c.bound_all);
    let target = d.map(|d| d.target.clone()).unwrap_or(Target::Any);
    let r = match target {
        Target::One(s) => match conns.iter().position(|p| p.shard() == s) {
            Some(i) => one_of(c, batch, &mut conns[i]).await,
            None => Err(reported("XX000", "shard not in the transaction")),
        },
        Target::Any => one_of(c, batch, &mut conns[0]).await,
        _ => everywhere(c, batch, &mut conns).await,
    };
    c.bound_all = conns;
    crate::frontend::alltx::finish(c);
    r
}

/// A batch on one connection the caller keeps.
async fn one_of<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    batch: &[Msg],
    p: &mut Pooled,
) -> Result<(), Reported> {
    let exps = rewrite(c, batch, p.conn())?;
    p.conn().flush().await?;
    let mut merge = Merge::default();
    relay(c, p, exps, Role::Only, &mut merge).await?;
    Ok(())
}

/// The same batch on several connections the caller keeps: the first one's answers are relayed, the
/// others' are checked for errors, and one ReadyForQuery ends it.
async fn everywhere<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    batch: &[Msg],
    conns: &mut [Pooled],
) -> Result<(), Reported> {
    let mut plans = Vec::with_capacity(conns.len());
    for p in conns.iter_mut() {
        let exps = rewrite(c, batch, p.conn())?;
        p.conn().flush().await?;
        plans.push(exps);
    }
    let mut first = Merge { hold_ready: true, ..Merge::default() };
    let mut others = Merge::default();
    for (i, (p, exps)) in conns.iter_mut().zip(plans).enumerate() {
        if i == 0 {
            relay(c, p, exps, Role::Only, &mut first).await?;
        } else {
            relay(c, p, exps, Role::Silent, &mut others).await?;
        }
    }
    if let (false, Some(e)) = (first.failed, others.error.take()) {
        c.io.push(&e);
    }
    if batch.last().is_some_and(|m| m.tag == b'S') {
        let statuses: Vec<u8> = conns.iter_mut().map(|p| p.conn().status).collect();
        let status = if matches!(c.txn, Txn::BoundAll) {
            if statuses.iter().all(|s| *s == proto::READY_IDLE) {
                proto::READY_IDLE
            } else if statuses.contains(&proto::READY_FAILED) {
                proto::READY_FAILED
            } else {
                proto::READY_IN_TX
            }
        } else {
            c.status()
        };
        proto::ready(&mut c.io.wbuf, status);
    }
    c.io.flush().await.map_err(|e| reported("08006", e.to_string()))
}

/// Relays one connection's answers to a rewritten batch, injecting and swallowing what the rewrite
/// changed. Returns the ReadyForQuery status, or `None` when the batch ended with Flush.
async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    p: &mut Pooled,
    mut exps: VecDeque<Exp>,
    role: Role,
    merge: &mut Merge,
) -> Result<Option<u8>, Reported> {
    let mut errored = false;
    let mut status = None;
    let to_client = |role: Role, tag: u8| match role {
        Role::Only => true,
        Role::First => !matches!(tag, b'C' | b'Z' | b'E'),
        Role::Rest => tag == b'D',
        Role::Silent => false,
    };
    loop {
        while let Some(Exp::InjectParse | Exp::InjectClose) = exps.front() {
            let e = exps.pop_front().expect("front exists");
            if !errored && matches!(role, Role::Only | Role::First) {
                match e {
                    Exp::InjectParse => proto::parse_complete(&mut c.io.wbuf),
                    _ => proto::close_complete(&mut c.io.wbuf),
                }
            }
        }
        if exps.is_empty() {
            break;
        }
        let m = p.conn().read().await?;
        let mut relay = to_client(role, m.tag);
        match m.tag {
            b'E' => {
                errored = true;
                merge.failed = true;
                if role != Role::Only && merge.error.is_none() {
                    merge.error = Some(m.frame.clone());
                }
                // The server skips everything up to Sync.
                while exps.front().is_some_and(|e| !matches!(e, Exp::Sync)) {
                    exps.pop_front();
                }
            }
            b'1' => match exps.pop_front() {
                Some(Exp::Parse(Some(n))) => {
                    p.conn().prepared.insert(n);
                }
                Some(Exp::SwallowParse(name)) => {
                    relay = false;
                    if let Some(n) = name {
                        p.conn().prepared.insert(n);
                    }
                }
                _ => {}
            },
            b'2' | b'3' => {
                exps.pop_front();
            }
            b'T' | b'n' => {
                if matches!(exps.front(), Some(Exp::DescribeStmt | Exp::DescribePortal)) {
                    exps.pop_front();
                }
            }
            b'C' | b'I' | b's' => {
                exps.pop_front();
                if m.tag == b'C' && role != Role::Only {
                    if let Some((tag, _)) = proto::read_cstr(m.body()) {
                        let (verb, n) = proto::command_rows(tag).unwrap_or((tag, 0));
                        merge.verb = verb.to_string();
                        merge.rows += n;
                    }
                }
            }
            b'Z' => {
                exps.pop_front();
                let s = m.body().first().copied().unwrap_or(proto::READY_IDLE);
                p.conn().status = s;
                status = Some(s);
                if merge.hold_ready {
                    relay = false;
                } else if let (true, Some(own)) = (relay, c.status_override()) {
                    proto::ready(&mut c.io.wbuf, own);
                    relay = false;
                }
            }
            _ => {} // DataRow, ParameterDescription, notices, ParameterStatus, notifications
        }
        if relay {
            c.io.push(&m.frame);
            c.io.flush_if_full().await.map_err(|e| reported("08006", e.to_string()))?;
        }
    }
    if role == Role::Only {
        c.io.flush().await.map_err(|e| reported("08006", e.to_string()))?;
    }
    Ok(status)
}
