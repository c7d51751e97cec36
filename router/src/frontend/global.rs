//! INSERT into a global table (`shardmap::sql::global`): the first shard runs the client's statement and
//! returns every column of the rows it wrote; the other shards insert exactly those rows (their values as
//! typed parameters, the client's ON CONFLICT and RETURNING kept), so that defaults and volatile calls
//! (`gen_random_uuid()`, `now()`, `nextval()`) are evaluated once and every copy is identical. The shards'
//! row counts must agree; otherwise the client gets an error and the write is undone (no connection has
//! been synced yet: outside a transaction the router's own transaction on them is rolled back — or, without
//! two-phase commit, they are closed, which rolls their part back; inside, the transaction is failed). The client's answer is the second shard's (RETURNING evaluated over the same
//! rows), sent only once every shard has answered.

use bytes::Bytes;
use shardmap::sql::{global_insert, global_write};

use super::combine::{ClientPart, Described, Ended, MAX_BYTES, MAX_VALUES};
use super::session::{Failure, Session};
use crate::net::proto;
use crate::net::wire::Stream;
use crate::net::Reported;

/// One shard's answer to a write, held for the client until every shard agreed.
#[derive(Default)]
struct Answer {
    param_desc: Option<Bytes>,
    desc: Option<Bytes>,
    rows: Vec<Bytes>,
    tag: Option<Bytes>,
}

/// The row count of a CommandComplete body (`INSERT 0 3` → 3).
fn count(tag: &[u8]) -> Option<u64> {
    let tag = std::str::from_utf8(tag.strip_suffix(&[0]).unwrap_or(tag)).ok()?;
    proto::command_rows(tag).map(|(_, n)| n)
}

impl<S: Stream> Session<S> {
    /// Runs an INSERT into a global table on `links` (see the module doc). `Ok(false)`: an error was
    /// written for the client; the links are still to be synced or closed by the caller.
    pub async fn global_insert_on(&mut self, links: &[usize], text: &str, c: &ClientPart<'_>) -> Result<bool, Failure> {
        let plan = global_insert(text).map_err(|why| {
            Reported::unsupported(format!(
                "{why} is not supported: a write to a global table must leave every shard's copy identical"
            ))
        })?;
        let describe_stmt = c.order.iter().any(|&(t, k)| t == b'D' && k == b'S');
        let first = links[0];
        {
            let l = self.links.get(first);
            l.pending = true;
            let buf = &mut l.conn.conn().io.wbuf;
            proto::write_parse_bytes(buf, "", &self.encoding.encode(&plan.first_sql), c.param_types);
            if describe_stmt {
                proto::describe_unnamed(buf, b'S');
            }
            proto::write_bind(buf, "", "", c.param_formats, c.params, &[]);
            proto::describe_unnamed(buf, b'P');
            proto::execute_unnamed(buf);
            proto::flush(buf);
        }
        if let Err(e) = self.links.get(first).conn.conn().flush().await {
            return Err(self.merge_broken(links, e.into()).into());
        }
        let (mut desc, mut param_desc, mut rows) = (None::<Bytes>, None::<Bytes>, Vec::<Bytes>::new());
        let mut bytes = 0usize;
        let ended = self
            .read_answer(links, first, |m| match m.tag {
                b't' => param_desc = Some(m.frame),
                b'T' => desc = Some(m.frame),
                b'D' => {
                    bytes += m.frame.len();
                    rows.push(m.frame);
                }
                _ => {}
            })
            .await?;
        let written = match ended {
            Ended::Done(tag) => count(&tag[5..]),
            Ended::Failed(e) => {
                self.io.push(&e);
                return Ok(false);
            }
        };
        let Some(fields) = desc.as_ref().and_then(|d| proto::row_fields(&d[5..])) else {
            proto::error(&mut self.io.wbuf, "ERROR", "XX000", "the first shard did not describe the rows it wrote");
            return Ok(false);
        };
        let width = fields.len();
        if bytes > MAX_BYTES || rows.len().max(1) * width > MAX_VALUES {
            let message = format!(
                "the INSERT into a global table wrote {} rows of {width} columns on the first shard; at most {MAX_VALUES} values are copied to the others in one statement: insert fewer rows at a time",
                rows.len()
            );
            proto::error(&mut self.io.wbuf, "ERROR", "54000", &message);
            return Ok(false);
        }
        let names: Vec<&str> = fields.iter().map(|f| f.name).collect();
        let others_sql = plan.others_sql(&names, rows.len());
        let mut types = Vec::with_capacity(rows.len().max(1) * width);
        let mut vals: Vec<Option<&[u8]>> = Vec::with_capacity(types.capacity());
        for r in &rows {
            let Some(row) = proto::data_row_values(&r[5..]).filter(|v| v.len() == width) else {
                proto::error(&mut self.io.wbuf, "ERROR", "08P01", "malformed DataRow from a shard");
                return Ok(false);
            };
            for (f, v) in fields.iter().zip(row) {
                types.push(f.type_oid);
                vals.push(v);
            }
        }
        if rows.is_empty() {
            for f in &fields {
                types.push(f.type_oid);
                vals.push(None);
            }
        }
        let formats = vec![0i16; vals.len()];
        let others_sql = self.encoding.encode(&others_sql).into_owned();
        for (n, &i) in links[1..].iter().enumerate() {
            let l = self.links.get(i);
            l.pending = true;
            let buf = &mut l.conn.conn().io.wbuf;
            proto::write_parse_bytes(buf, "", &others_sql, &types);
            proto::write_bind(buf, "", "", &formats, &vals, if n == 0 { c.result_formats } else { &[] });
            proto::describe_unnamed(buf, b'P');
            proto::execute_unnamed(buf);
            proto::flush(buf);
            if let Err(e) = l.conn.conn().flush().await {
                return Err(self.merge_broken(links, e.into()).into());
            }
        }
        drop(vals);
        // The second shard's answer is the client's (held until every shard agreed).
        let Some(mut answer) =
            self.agreeing_answers(links, &links[1..], Some((0, written)), "the INSERT wrote").await?
        else {
            return Ok(false);
        };
        // (The client's statement was described on the first shard.)
        answer.param_desc = answer.param_desc.or(param_desc);
        self.answer_with(c, &answer);
        Ok(true)
    }

    /// The client's answer from one shard's: its messages answered in order, the rows, the tag.
    fn answer_with(&mut self, c: &ClientPart<'_>, a: &Answer) {
        self.answer_prefix(c, a.param_desc.as_ref(), Described::Frame(a.desc.as_ref()));
        for r in &a.rows {
            self.io.push(r);
        }
        if let Some(t) = &a.tag {
            self.io.push(t);
        }
    }

    /// Reads the answers of `read` (links of `all`) to the same write: the first's kept for the client, every
    /// row count compared with the `reference` link's (an index in `all`, and its count), else the first
    /// read's. `None`: an error, written for the client.
    async fn agreeing_answers(
        &mut self,
        all: &[usize],
        read: &[usize],
        mut reference: Option<(usize, Option<u64>)>,
        what: &str,
    ) -> Result<Option<Answer>, Failure> {
        let name = |s: &Self, i: usize| {
            s.links.iter().nth(i).map(|l| s.routing.map.node(l.dest.shard).name.clone()).unwrap_or_default()
        };
        let mut answer = Answer::default();
        let (mut error, mut disagree) = (None::<Bytes>, None::<String>);
        for (n, &i) in read.iter().enumerate() {
            let ended = self
                .read_answer(all, i, |m| match m.tag {
                    b't' if n == 0 => answer.param_desc = Some(m.frame),
                    b'T' | b'n' if n == 0 => answer.desc = Some(m.frame),
                    b'D' if n == 0 => answer.rows.push(m.frame),
                    _ => {}
                })
                .await?;
            let tag = match ended {
                Ended::Done(tag) => tag,
                Ended::Failed(e) => {
                    error.get_or_insert(e);
                    continue;
                }
            };
            let got = count(&tag[5..]);
            match reference {
                None => reference = Some((all.iter().position(|&x| x == i).unwrap_or(0), got)),
                Some((r, want)) if want != got && disagree.is_none() => {
                    disagree = Some(format!(
                        "the copies of a global table differ: {what} {} rows on shard {} and {} on shard {}; it was undone on every shard (make the copies identical again, then retry)",
                        want.unwrap_or(0),
                        name(self, all[r]),
                        got.unwrap_or(0),
                        name(self, i)
                    ));
                }
                Some(_) => {}
            }
            if n == 0 {
                answer.tag = Some(tag);
            }
        }
        if let Some(e) = error {
            self.io.push(&e);
            return Ok(None);
        }
        if let Some(why) = disagree {
            proto::error(&mut self.io.wbuf, "ERROR", "55000", &why);
            return Ok(None);
        }
        Ok(Some(answer))
    }

    /// Runs an UPDATE or DELETE of a global table on `links`: the transaction's clock read once on the first
    /// (`now()` and the like written in as literals), the statement on every link, their row counts compared;
    /// the first link's answer is the client's. `Ok(false)`: an error was written for the client.
    pub async fn global_write_on(&mut self, links: &[usize], text: &str, c: &ClientPart<'_>) -> Result<bool, Failure> {
        let plan = global_write(text).map_err(|why| {
            Reported::unsupported(format!(
                "a write to a global table {why} is not supported: it must leave every shard's copy identical"
            ))
        })?;
        let first = links[0];
        let mut values = Vec::new();
        if let Some(eval) = plan.eval_sql() {
            let l = self.links.get(first);
            l.pending = true;
            let buf = &mut l.conn.conn().io.wbuf;
            proto::write_parse_bytes(buf, "", eval.as_bytes(), &[]);
            proto::write_bind(buf, "", "", &[], &[], &[]);
            proto::execute_unnamed(buf);
            proto::flush(buf);
            if let Err(e) = l.conn.conn().flush().await {
                return Err(self.merge_broken(links, e.into()).into());
            }
            let ended = self
                .read_answer(links, first, |m| {
                    if m.tag == b'D' {
                        values = proto::data_row(m.body()).into_iter().map(Option::unwrap_or_default).collect();
                    }
                })
                .await?;
            if let Ended::Failed(e) = ended {
                self.io.push(&e);
                return Ok(false);
            }
        }
        let sql = self.encoding.encode(&plan.fill(&values)).into_owned();
        let describe_stmt = c.order.iter().any(|&(t, k)| t == b'D' && k == b'S');
        for (n, &i) in links.iter().enumerate() {
            let l = self.links.get(i);
            l.pending = true;
            let buf = &mut l.conn.conn().io.wbuf;
            proto::write_parse_bytes(buf, "", &sql, c.param_types);
            if n == 0 && describe_stmt {
                proto::describe_unnamed(buf, b'S');
            }
            proto::write_bind(buf, "", "", c.param_formats, c.params, if n == 0 { c.result_formats } else { &[] });
            proto::describe_unnamed(buf, b'P');
            proto::execute_unnamed(buf);
            proto::flush(buf);
            if let Err(e) = l.conn.conn().flush().await {
                return Err(self.merge_broken(links, e.into()).into());
            }
        }
        let Some(answer) = self.agreeing_answers(links, links, None, "the statement changed").await? else {
            return Ok(false);
        };
        self.answer_with(c, &answer);
        Ok(true)
    }
}
