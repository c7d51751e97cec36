//! Statements for several shards: reads with no key (the same statement on each, rows concatenated in shard
//! order, one RowDescription, one CommandComplete with the total) and DDL (the same statement on each; the
//! first error is reported). Ordered merging and aggregates come later.

use bytes::Bytes;
use shardmap::sql::Kind;
use shardmap::{Decision, ShardId};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::backend::pool::Pooled;
use crate::frontend::session::{Client, Reported};
use crate::net::proto;
use crate::net::wire::Msg;

fn reported(code: &str, message: impl Into<String>) -> Reported {
    Reported { code: code.to_string(), message: message.into() }
}

async fn checkout_all<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    shards: &[ShardId],
    d: &Decision,
) -> Result<Vec<Pooled>, Reported> {
    let mut conns = Vec::with_capacity(shards.len());
    for s in shards {
        conns.push(c.checkout(*s, d.database.as_deref()).await?);
    }
    Ok(conns)
}

/// A simple Query for several shards.
pub async fn simple<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    shards: &[ShardId],
    d: &Decision,
    frame: Bytes,
) -> Result<(), Reported> {
    let mut conns = checkout_all(c, shards, d).await?;
    let read = d.analysis.statements.iter().all(|s| s.kind == Kind::Read);
    let r = merge_on(c, &mut conns, read, frame).await;
    for p in conns {
        c.give_back(p);
    }
    r?;
    let status = c.status();
    proto::ready(&mut c.io.wbuf, status);
    c.io.flush().await.map_err(|e| reported("08006", e.to_string()))
}

/// Sends a simple Query on each connection and merges the answers (see the module doc): for a read, rows
/// concatenated under one RowDescription and one CommandComplete; otherwise the first connection's answer.
/// The first error of any connection is reported. ReadyForQuery is the caller's to send (the status is the
/// client's, which the caller knows once the connections' statuses are in); the connections stay with it.
pub async fn merge_on<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    conns: &mut [Pooled],
    read: bool,
    frame: Bytes,
) -> Result<(), Reported> {
    for p in conns.iter_mut() {
        p.conn().io.push(&frame);
        p.conn().flush().await?;
    }
    let mut error: Option<Msg> = None;
    let mut rows = 0u64;
    let mut verb = String::from("SELECT");
    let mut described = false;
    let mut copy_out = false;
    for (i, p) in conns.iter_mut().enumerate() {
        loop {
            let m = p.conn().read().await?;
            match m.tag {
                b'Z' => {
                    p.conn().status = m.body().first().copied().unwrap_or(proto::READY_IDLE);
                    break;
                }
                b'E' if error.is_none() => error = Some(m),
                b'E' => {}
                b'T' if read && !described => {
                    described = true;
                    c.io.push(&m.frame);
                }
                b'D' if read && error.is_none() => {
                    c.io.push(&m.frame);
                    c.io.flush_if_full().await.map_err(|e| reported("08006", e.to_string()))?;
                }
                b'T' | b'D' if read => {}
                // COPY ... TO STDOUT on every shard: one CopyOutResponse, every shard's data, one CopyDone.
                b'H' if read && !copy_out => {
                    copy_out = true;
                    c.io.push(&m.frame);
                }
                b'H' if read => {}
                b'd' if read => {
                    c.io.push(&m.frame);
                    c.io.flush_if_full().await.map_err(|e| reported("08006", e.to_string()))?;
                }
                b'c' if read => {}
                b'C' if read => {
                    if let Some((tag, _)) = proto::read_cstr(m.body()) {
                        if let Some((v, n)) = proto::command_rows(tag) {
                            verb = v.to_string();
                            rows += n;
                        }
                    }
                }
                // DDL: the first shard's answers stand for all; notices of the first shard pass through.
                _ if i == 0 => c.io.push(&m.frame),
                _ => {}
            }
        }
    }
    if copy_out {
        proto::put(&mut c.io.wbuf, b'c', |_| {});
    }
    match error {
        Some(e) => c.io.push(&e.frame),
        None if read => proto::command_complete(&mut c.io.wbuf, &format!("{verb} {rows}")),
        None => {}
    }
    Ok(())
}
