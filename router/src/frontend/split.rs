//! An INSERT whose VALUES rows are for several shards (`shardmap::sql::split_insert`): each shard of the
//! transaction runs the INSERT of its own rows, with its own parameters; the client gets the RETURNING rows
//! in the order of the VALUES rows and one command tag with the total. The statement runs inside a
//! transaction on those shards (the client's, or the router's own when it sent none: see `Txn::implicit`),
//! so that it commits atomically with two-phase commit.

use bytes::Bytes;
use shardmap::{Decision, ShardId};

use super::combine::{ClientPart, Described, Ended};
use super::session::{Failure, Session};
use crate::net::proto;
use crate::net::wire::Stream;
use crate::net::Reported;

impl<S: Stream> Session<S> {
    /// Runs a split INSERT on `links` (see the module doc). `Ok(false)`: an error was written for the
    /// client; the links are still to be synced by the caller.
    pub async fn split_insert_on(
        &mut self,
        links: &[usize],
        text: &str,
        c: &ClientPart<'_>,
        d: Option<&Decision>,
    ) -> Result<bool, Failure> {
        let d = d.ok_or_else(|| Reported::new("XX000", "a split INSERT without its routing decision"))?;
        // Each row's shard, in VALUES order.
        let mut row_shards = Vec::with_capacity(d.values.len());
        for v in &d.values {
            row_shards.push(self.routing.map.locate(v).map_err(|e| Reported::new("22023", e.to_string()))?.shard);
        }
        let shards: Vec<ShardId> =
            links.iter().map(|&i| self.links.iter().nth(i).expect("a link").dest.shard).collect();
        let groups: Vec<Vec<usize>> = shards
            .iter()
            .map(|s| row_shards.iter().enumerate().filter(|(_, r)| *r == s).map(|(n, _)| n).collect())
            .collect();
        let parts = shardmap::sql::split_insert(text, &groups).map_err(|why| {
            Reported::unsupported(format!("{why} is not supported: insert the rows of each shard in its own statement"))
        })?;
        let describe_stmt = c.order.iter().any(|&(t, k)| t == b'D' && k == b'S');
        let mut sent = Vec::new();
        for (n, (&i, part)) in links.iter().zip(&parts).enumerate() {
            if groups[n].is_empty() {
                continue;
            }
            let (types, formats, values) = c.params_of(&part.params);
            let sql = self.encoding.encode(&part.sql).into_owned();
            let original = self.encoding.encode(text).into_owned();
            let l = self.links.get(i);
            l.pending = true;
            let buf = &mut l.conn.conn().io.wbuf;
            if sent.is_empty() && describe_stmt {
                // The client's statement as it wrote it, described for its parameters.
                proto::write_parse_bytes(buf, "", &original, c.param_types);
                proto::describe_unnamed(buf, b'S');
            }
            proto::write_parse_bytes(buf, "", &sql, &types);
            proto::write_bind(buf, "", "", &formats, &values, c.result_formats);
            proto::describe_unnamed(buf, b'P');
            proto::execute_unnamed(buf);
            proto::flush(buf);
            if let Err(e) = l.conn.conn().flush().await {
                return Err(self.merge_broken(links, e.into()).into());
            }
            sent.push(n);
        }
        let (mut param_desc, mut desc) = (None::<Bytes>, None::<Bytes>);
        let mut rows: Vec<std::collections::VecDeque<Bytes>> = vec![Default::default(); links.len()];
        let (mut total, mut error) = (0u64, None::<Bytes>);
        for &n in &sent {
            let i = links[n];
            let mut mine = std::collections::VecDeque::new();
            let ended = self
                .read_answer(links, i, |m| match m.tag {
                    b't' => param_desc = param_desc.take().or(Some(m.frame)),
                    b'T' | b'n' => desc = Some(m.frame),
                    b'D' => mine.push_back(m.frame),
                    _ => {}
                })
                .await?;
            match ended {
                Ended::Done(tag) => {
                    let tag = std::str::from_utf8(&tag[5..tag.len().saturating_sub(1)]).unwrap_or("").to_string();
                    total += proto::command_rows(&tag).map_or(0, |(_, r)| r);
                }
                Ended::Failed(e) => {
                    error.get_or_insert(e);
                }
            }
            rows[n] = mine;
        }
        if let Some(e) = error {
            self.io.push(&e);
            return Ok(false);
        }
        self.answer_prefix(c, param_desc.as_ref(), Described::Frame(desc.as_ref()));
        // RETURNING rows in VALUES order: each row's shard gives its next one (a shard that returned fewer
        // rows than it inserted — a trigger skipped some — gives the rest in its own order).
        for s in &row_shards {
            if let Some(n) = shards.iter().position(|x| x == s) {
                if let Some(r) = rows[n].pop_front() {
                    self.io.push(&r);
                }
            }
        }
        for rest in &mut rows {
            for r in rest.drain(..) {
                self.io.push(&r);
            }
        }
        if c.order.iter().any(|&(t, _)| t == b'E') {
            proto::command_complete(&mut self.io.wbuf, &format!("INSERT 0 {total}"));
        }
        Ok(true)
    }
}
