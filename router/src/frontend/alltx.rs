//! Transactions on every shard. A transaction whose first statement goes to every shard (a migration: DDL,
//! then the migration tool's bookkeeping row in a global table) binds a connection to each shard; later
//! statements go where they route (one shard's connection, or all of them) and COMMIT or ROLLBACK goes to
//! all. There is no two-phase commit yet: if one shard's COMMIT fails after another's succeeded, the
//! shards disagree (documented; migrations are the intended use).

use bytes::Bytes;
use shardmap::{Decision, ShardId, Target};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::backend::pool::Pooled;
use crate::frontend::session::{Client, Reported, Txn};
use crate::net::proto;

fn reported(code: &str, message: impl Into<String>) -> Reported {
    Reported { code: code.to_string(), message: message.into() }
}

/// Opens the held transaction on every shard.
pub async fn bind_all<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Client<S>, d: &Decision) -> Result<(), Reported> {
    let Txn::Held(held) = std::mem::take(&mut c.txn) else {
        return Err(reported("XX000", "no held transaction to bind"));
    };
    let shards: Vec<ShardId> = c.shared.routing.map.all().collect();
    let mut conns = Vec::with_capacity(shards.len());
    for s in shards {
        let p = match c.checkout(s, d.database.as_deref()).await {
            Ok(p) => p,
            Err(e) => {
                c.txn = Txn::Held(held);
                return Err(e);
            }
        };
        conns.push(p);
    }
    for p in conns.iter_mut() {
        for h in &held {
            p.conn().io.push(h);
        }
        p.conn().flush().await?;
    }
    for p in conns.iter_mut() {
        for _ in &held {
            if let Err(e) = p.conn().drain_to_ready().await {
                c.txn = Txn::Held(held);
                return Err(e.into());
            }
        }
    }
    c.bound_all = conns;
    c.txn = Txn::BoundAll;
    Ok(())
}

/// The client's status from its connections' statuses; ends the transaction when all are idle.
pub fn finish<S>(c: &mut Client<S>) -> u8 {
    let statuses: Vec<u8> = c.bound_all.iter_mut().map(|p| p.conn().status).collect();
    if statuses.iter().all(|s| *s == proto::READY_IDLE) {
        for p in std::mem::take(&mut c.bound_all) {
            c.give_back(p);
        }
        c.txn = Txn::Idle;
        c.failed = false;
        proto::READY_IDLE
    } else if statuses.contains(&proto::READY_FAILED) || c.failed {
        proto::READY_FAILED
    } else {
        proto::READY_IN_TX
    }
}

fn index_of<S>(c: &Client<S>, shard: ShardId) -> Result<usize, Reported> {
    c.bound_all.iter().position(|p| p.shard() == shard).ok_or_else(|| reported("XX000", "shard not in the transaction"))
}

/// A simple Query inside an all-shards transaction.
pub async fn simple<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    d: &Decision,
    frame: Bytes,
) -> Result<(), Reported> {
    match &d.target {
        Target::One(s) => {
            let i = index_of(c, *s)?;
            one(c, i, frame).await
        }
        Target::Any => one(c, 0, frame).await,
        Target::Set(_) | Target::All => {
            let read = d.analysis.statements.iter().all(|s| s.kind == shardmap::sql::Kind::Read);
            on_all(c, frame, read).await
        }
        _ => everywhere(c, frame).await,
    }
}

/// One statement on one of the transaction's connections.
async fn one<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Client<S>, i: usize, frame: Bytes) -> Result<(), Reported> {
    let mut conns = std::mem::take(&mut c.bound_all);
    let r = async {
        let p: &mut Pooled = &mut conns[i];
        p.conn().io.push(&frame);
        p.conn().flush().await?;
        c.relay_until_ready(p).await
    }
    .await;
    c.bound_all = conns;
    r?;
    finish(c);
    Ok(())
}

/// The same simple Query on every connection of the transaction: the first shard's answer is relayed, the
/// first error of any shard is reported.
pub async fn everywhere<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Client<S>, frame: Bytes) -> Result<(), Reported> {
    on_all(c, frame, false).await
}

/// A simple Query on every connection of the transaction, merged (`fanout::merge_on`); the client's status
/// comes from the connections' (all idle: the transaction ended).
async fn on_all<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    frame: Bytes,
    read: bool,
) -> Result<(), Reported> {
    let mut conns = std::mem::take(&mut c.bound_all);
    let r = crate::frontend::fanout::merge_on(c, &mut conns, read, frame).await;
    c.bound_all = conns;
    r?;
    let status = finish(c);
    proto::ready(&mut c.io.wbuf, status);
    c.io.flush().await.map_err(|e| reported("08006", e.to_string()))
}
