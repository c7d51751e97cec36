//! Reads whose rows are combined across shards (`shardmap::sql::combine`): each shard runs its part through
//! the extended protocol (text results); the first connection then runs the final query with the shards'
//! rows as its parameters, so that PostgreSQL itself finishes aggregates, merges groups, orders under its
//! collation and limits; the client gets that answer, in the formats it asked for, described as one
//! PostgreSQL would describe it (columns passed through keep the shards' description: table, column, type
//! modifier). Nothing is sent to the client before every shard has answered, so an error anywhere is the
//! client's only answer.
//!
//! The connections are left inside their exchange (no Sync): the simple protocol syncs them at once, the
//! extended protocol at the client's Sync, as for any statement of its sync group.

use bytes::Bytes;
use shardmap::sql::{array_literal, array_oid, combine_plan, Column, Source};
use shardmap::{Decision, ShardId};

use super::session::{Failure, Session};
use super::txn::Run;
use crate::net::proto;
use crate::net::wire::Stream;
use crate::net::Reported;

/// The most values the final query can take as parameters (the protocol counts them in 16 bits).
pub(super) const MAX_VALUES: usize = 65_535;
/// The most bytes of shards' rows held for one combined read.
pub(super) const MAX_BYTES: usize = 256 << 20;

/// What the client sent with the statement, and what it expects back.
pub struct ClientPart<'a> {
    pub params: &'a [Option<&'a [u8]>],
    /// Parameter format codes as sent (none, one for all, or one each).
    pub param_formats: &'a [i16],
    pub param_types: &'a [u32],
    /// Result format codes as sent.
    pub result_formats: &'a [i16],
    /// The client's messages in order, each answered in turn: `P` ParseComplete, `B` BindComplete, `C`
    /// CloseComplete, `D` a description (of the statement `S` or the portal `P`), `E` the rows and the
    /// command tag.
    pub order: &'a [(u8, u8)],
}

/// Parameters to bind: their types, format codes and values.
pub type Bound<'a> = (Vec<u32>, Vec<i16>, Vec<Option<&'a [u8]>>);

impl<'a> ClientPart<'a> {
    /// The types, format codes and values of these of the client's parameters (zero-based), in this order:
    /// what a statement the router writes in the client's place binds.
    pub fn params_of(&self, which: &[usize]) -> Bound<'a> {
        let types = which.iter().map(|&k| self.param_types.get(k).copied().unwrap_or(0)).collect();
        let formats = which.iter().map(|&k| format_of(self.param_formats, k)).collect();
        let values = which.iter().map(|&k| self.params.get(k).copied().flatten()).collect();
        (types, formats, values)
    }
}

pub(super) fn format_of(formats: &[i16], k: usize) -> i16 {
    match formats {
        [] => 0,
        [one] => *one,
        many => many.get(k).copied().unwrap_or(0),
    }
}

/// How the answer's rows are described to the client.
pub enum Described<'a> {
    /// Fields the router put together (name to format code, each with the client's format).
    Fields(&'a [(Vec<u8>, i16)]),
    /// A shard's own RowDescription (or NoData) frame, as it is.
    Frame(Option<&'a Bytes>),
}

/// Text types, whose order and equality follow a collation.
const TEXT_TYPES: [u32; 3] = [25, 1042, 1043];

/// A RowDescription field's table OID and column number (0 for an expression).
fn origin(f: &proto::Field<'_>) -> (u32, i16) {
    let fixed = &f.raw[f.name.len() + 1..];
    (u32::from_be_bytes([fixed[0], fixed[1], fixed[2], fixed[3]]), i16::from_be_bytes([fixed[4], fixed[5]]))
}

/// How a link's answer to one statement ended: its CommandComplete or its ErrorResponse frame.
pub enum Ended {
    Done(Bytes),
    Failed(Bytes),
}

impl<S: Stream> Session<S> {
    /// Reads link `i`'s answer to one statement of an exchange left open (Flush, no Sync) up to its
    /// CommandComplete or ErrorResponse (which marks the link errored); every other message goes to `each`,
    /// but notices, parameter changes and notifications, which go to the client. A link that breaks loses
    /// the exchange of all `links`.
    pub(super) async fn read_answer(
        &mut self,
        links: &[usize],
        i: usize,
        mut each: impl FnMut(crate::net::wire::Msg),
    ) -> Result<Ended, Failure> {
        loop {
            let m = match self.links.get(i).conn.conn().read().await {
                Ok(m) => m,
                Err(e) => return Err(self.merge_broken(links, e.into()).into()),
            };
            match m.tag {
                b'C' => return Ok(Ended::Done(m.frame)),
                b'E' => {
                    self.links.get(i).errored = true;
                    return Ok(Ended::Failed(m.frame));
                }
                b'N' | b'S' | b'A' => self.io.push(&m.frame),
                _ => each(m),
            }
        }
    }

    /// The client's messages answered in order up to its Execute, for a statement the router ran itself:
    /// ParseComplete, BindComplete, CloseComplete, and descriptions (a statement's with its
    /// ParameterDescription and format codes 0; a portal's; `(D, p)`, the simple protocol's, only when there
    /// are rows to describe). The rows and the command tag follow.
    pub fn answer_prefix(&mut self, c: &ClientPart<'_>, param_desc: Option<&Bytes>, described: Described<'_>) {
        for &(tag, kind) in c.order {
            match (tag, kind, &described) {
                (b'P', ..) => proto::parse_complete(&mut self.io.wbuf),
                (b'B', ..) => proto::put(&mut self.io.wbuf, b'2', |_| {}),
                (b'C', ..) => proto::close_complete(&mut self.io.wbuf),
                (b'D', b'S', d) => {
                    if let Some(p) = param_desc {
                        self.io.push(p);
                    }
                    let fields: Option<Vec<(Vec<u8>, i16)>> = match d {
                        Described::Fields(f) => Some(f.iter().map(|(raw, _)| (raw.clone(), 0)).collect()),
                        Described::Frame(f) => f
                            .and_then(|f| proto::row_fields(&f[5..]))
                            .map(|f| f.iter().map(|f| (f.raw.to_vec(), 0)).collect()),
                    };
                    match fields {
                        Some(f) => proto::write_row_description(&mut self.io.wbuf, &f),
                        None => proto::put(&mut self.io.wbuf, b'n', |_| {}),
                    }
                }
                (b'D', _, Described::Fields(f)) => proto::write_row_description(&mut self.io.wbuf, f),
                (b'D', b'p', Described::Frame(f)) => {
                    if let Some(f) = f.filter(|f| f[0] == b'T') {
                        self.io.push(f);
                    }
                }
                (b'D', _, Described::Frame(f)) => {
                    if let Some(f) = f {
                        self.io.push(f);
                    }
                }
                _ => break,
            }
        }
    }

    /// The collation of each text column of the shards' rows that is a table column declared with a collation
    /// of its own (others: `None`, the database's default), read on the first link inside its open exchange
    /// and remembered for the session. `Err(())`: the server's error, written for the client.
    async fn collations_of(
        &mut self,
        links: &[usize],
        fields: &[proto::Field<'_>],
    ) -> Result<Result<Vec<Option<String>>, ()>, Failure> {
        self.schema_checked();
        let wanted: Vec<(u32, i16)> = fields
            .iter()
            .filter(|f| TEXT_TYPES.contains(&f.type_oid))
            .map(origin)
            .filter(|(t, a)| *t != 0 && *a > 0 && !self.collations.contains_key(&(*t, *a)))
            .collect();
        if !wanted.is_empty() {
            let list: Vec<String> = wanted.iter().map(|(t, a)| format!("({t}::oid, {a}::int2)")).collect();
            let sql = format!(
                "SELECT a.attrelid::int8, a.attnum, format('%I.%I', n.nspname, c.collname) FROM pg_attribute a \
                 JOIN pg_collation c ON c.oid = a.attcollation JOIN pg_namespace n ON n.oid = c.collnamespace \
                 WHERE a.attcollation NOT IN (0, 100) AND (a.attrelid, a.attnum) IN (VALUES {})",
                list.join(", ")
            );
            let first = links[0];
            {
                let buf = &mut self.links.get(first).conn.conn().io.wbuf;
                proto::write_parse_bytes(buf, "", sql.as_bytes(), &[]);
                proto::write_bind(buf, "", "", &[], &[], &[]);
                proto::execute_unnamed(buf);
                proto::flush(buf);
            }
            if let Err(e) = self.links.get(first).conn.conn().flush().await {
                return Err(self.merge_broken(links, e.into()).into());
            }
            for w in &wanted {
                self.collations.insert(*w, None);
            }
            let mut found = Vec::new();
            let ended = self
                .read_answer(links, first, |m| {
                    if m.tag != b'D' {
                        return;
                    }
                    let row = proto::data_row(m.body());
                    let table = row.first().cloned().flatten().and_then(|v| v.parse::<u32>().ok());
                    let att = row.get(1).cloned().flatten().and_then(|v| v.parse::<i16>().ok());
                    if let (Some(t), Some(a), Some(Some(c))) = (table, att, row.get(2).cloned()) {
                        found.push(((t, a), c));
                    }
                })
                .await?;
            if let Ended::Failed(e) = ended {
                self.io.push(&e);
                return Ok(Err(()));
            }
            for (k, c) in found {
                self.collations.insert(k, Some(c));
            }
        }
        Ok(Ok(fields
            .iter()
            .map(|f| {
                if TEXT_TYPES.contains(&f.type_oid) {
                    self.collations.get(&origin(f)).cloned().flatten()
                } else {
                    None
                }
            })
            .collect()))
    }

    /// A statement the router runs itself (`run`) on `links`: `Ok(false)` after an error written for the
    /// client, the links still to be synced or closed.
    pub async fn run_on(
        &mut self,
        run: Run,
        links: &[usize],
        text: &str,
        c: &ClientPart<'_>,
        d: Option<&Decision>,
    ) -> Result<bool, Failure> {
        match run {
            Run::SplitInsert => self.split_insert_on(links, text, c, d).await,
            Run::Combine => self.combine_on(links, text, c).await,
            Run::GlobalInsert => self.global_insert_on(links, text, c).await,
            Run::GlobalWrite => self.global_write_on(links, text, c).await,
        }
    }

    /// A simple Query the router runs itself: on `shards` outside a transaction (or outside the held one),
    /// or on every connection of the all-shards transaction (`every`). Then each connection is synced and
    /// one ReadyForQuery answers the client; after a failure the transaction, if any, is failed (as by any
    /// error in it), and a write outside it is undone by closing its connections (nothing was committed).
    pub async fn router_simple(
        &mut self,
        run: Run,
        every: bool,
        shards: Vec<ShardId>,
        text: &str,
        d: Option<&Decision>,
    ) -> Result<(), Failure> {
        let links = if every { self.join_simple(&shards, d).await? } else { self.links_to(shards, d).await? };
        let order = [(b'D', b'p'), (b'E', 0)];
        let c = ClientPart { params: &[], param_formats: &[], param_types: &[], result_formats: &[], order: &order };
        if self.run_on(run, &links, text, &c, d).await? {
            return self.sync_links(&links, every).await;
        }
        self.txn.error_inside();
        if every || run == Run::Combine {
            return self.sync_links(&links, every).await;
        }
        let mut sorted = links;
        sorted.sort_unstable();
        for i in sorted.into_iter().rev() {
            drop(self.links.remove(i));
        }
        self.ready_for_query();
        self.io.flush().await.map_err(|e| Failure::Fatal(e.into()))
    }

    /// Syncs `links` after an exchange left open (combined reads, global inserts): their ReadyForQuery
    /// statuses settle the transaction (`every`: the all-shards transaction's links), then one ReadyForQuery
    /// answers the client.
    pub async fn sync_links(&mut self, links: &[usize], every: bool) -> Result<(), Failure> {
        let links = links.to_vec();
        for &i in &links {
            let conn = self.links.get(i).conn.conn();
            proto::put(&mut conn.io.wbuf, b'S', |_| {});
            if let Err(e) = conn.flush().await {
                return Err(self.merge_broken(&links, e.into()).into());
            }
        }
        let mut statuses = Vec::with_capacity(links.len());
        for &i in &links {
            let status = loop {
                let m = match self.links.get(i).conn.conn().read().await {
                    Ok(m) => m,
                    Err(e) => return Err(self.merge_broken(&links, e.into()).into()),
                };
                match m.tag {
                    b'Z' => break m.body().first().copied().unwrap_or(proto::READY_IDLE),
                    // An error at Sync: the implicit transaction's commit failed.
                    b'E' => {
                        self.links.get(i).errored = true;
                        self.io.push(&m.frame);
                    }
                    b'N' | b'S' | b'A' => self.io.push(&m.frame),
                    _ => {}
                }
            };
            let l = self.links.get(i);
            let errored = std::mem::take(&mut l.errored);
            l.pending = false;
            l.conn.conn().parsing.clear();
            statuses.push((l.dest.clone(), status, errored));
        }
        if every {
            let s: Vec<u8> = statuses.iter().map(|(_, s, _)| *s).collect();
            self.txn.ready_all(&s);
        } else {
            for (dest, status, errored) in &statuses {
                self.txn.ready(dest, *status, *errored);
            }
        }
        self.end_implicit().await;
        self.ready_for_query();
        self.io.flush().await.map_err(|e| Failure::Fatal(e.into()))
    }

    /// Runs a combined read on `links` (see the module doc). `Ok(true)`: answered; `Ok(false)`: an error was
    /// written for the client (the links are still to be synced). `Err` before anything was sent (the
    /// statement is refused) or when a link broke (its exchange is lost: every link of it is closed).
    pub async fn combine_on(&mut self, links: &[usize], text: &str, c: &ClientPart<'_>) -> Result<bool, Failure> {
        let key = self.routing.map.key.clone();
        let plan = combine_plan(text).map_err(|why| {
            Reported::unsupported(format!(
                "{why} across shards is not supported: the shards' answers cannot be combined into one PostgreSQL's answer; add a {key} condition to read one shard"
            ))
        })?;
        if let Some(stream) = &plan.stream {
            // Many rows in an order: merged as they come (one row per shard held), when the keys allow.
            if stream.limit.is_none_or(|l| l + stream.offset >= super::stream::STREAM_FROM) {
                match self.stream_describe(links, stream, c).await? {
                    Ok(Some(described)) => return self.stream_on(links, stream, c, described).await,
                    Ok(None) => {}
                    Err(()) => return Ok(false),
                }
            }
        }
        let shard_sql = self.encoding.encode(&plan.shard_sql).into_owned();
        let describe_stmt = c.order.iter().any(|&(t, k)| t == b'D' && k == b'S');
        // The client's parameters the shards' statement uses, in its numbering.
        let (shard_types, shard_formats, shard_values) = c.params_of(&plan.shard_params);
        for (n, &i) in links.iter().enumerate() {
            let l = self.links.get(i);
            l.pending = true;
            let conn = l.conn.conn();
            let buf = &mut conn.io.wbuf;
            proto::write_parse_bytes(buf, "", &shard_sql, &shard_types);
            if n == 0 && describe_stmt {
                proto::describe_unnamed(buf, b'S');
            }
            proto::write_bind(buf, "", "", &shard_formats, &shard_values, &[]);
            proto::describe_unnamed(buf, b'P');
            proto::execute_unnamed(buf);
            proto::flush(buf);
            if let Err(e) = conn.flush().await {
                return Err(self.merge_broken(links, e.into()).into());
            }
        }

        // Every shard's rows (their DataRow bodies copied into one arena: views of the connections' read
        // buffers would pin those buffers), its description, the first error.
        let mut arena: Vec<u8> = Vec::new();
        let mut rows: Vec<std::ops::Range<usize>> = Vec::new();
        let mut desc: Option<Bytes> = None;
        let mut param_desc: Option<Bytes> = None;
        let mut error: Option<Bytes> = None;
        let (mut bytes, mut too_big) = (0usize, false);
        for (n, &i) in links.iter().enumerate() {
            let ended = self
                .read_answer(links, i, |m| match m.tag {
                    b't' if n == 0 => param_desc = Some(m.frame),
                    b'T' if desc.is_none() || n == 0 => desc = Some(m.frame),
                    b'D' => {
                        bytes += m.frame.len();
                        too_big |= bytes > MAX_BYTES;
                        if !too_big {
                            let start = arena.len();
                            arena.extend_from_slice(m.body());
                            rows.push(start..arena.len());
                        }
                    }
                    _ => {}
                })
                .await?;
            if let Ended::Failed(e) = ended {
                error.get_or_insert(e);
            }
        }
        if let Some(e) = error {
            self.io.push(&e);
            return Ok(false);
        }
        let Some(desc) = desc else {
            proto::error(&mut self.io.wbuf, "ERROR", "XX000", "the shards returned no row description");
            return Ok(false);
        };
        let Some(fields) = proto::row_fields(&desc[5..]) else {
            proto::error(&mut self.io.wbuf, "ERROR", "08P01", "malformed RowDescription from a shard");
            return Ok(false);
        };
        let width = fields.len();
        // The shards' rows go to the final query as one array per column when every column's type has a
        // known array type (unbounded but by MAX_BYTES), else as VALUES of single parameters.
        let arrays = fields.iter().all(|f| array_oid(f.type_oid).is_some());
        let values = rows.len().max(1) * width + plan.final_params.len();
        if too_big || (!arrays && values > MAX_VALUES) {
            let message = format!(
                "the rows to combine across shards are too many ({} rows of {width} columns, {} MB; at most {MAX_VALUES} values and {} MB): add a LIMIT, narrow the query, or add a {key} condition",
                rows.len(),
                bytes >> 20,
                MAX_BYTES >> 20
            );
            proto::error(&mut self.io.wbuf, "ERROR", "54000", &message);
            return Ok(false);
        }
        let collations = match self.collations_of(links, &fields).await? {
            Ok(c) => c,
            Err(()) => return Ok(false),
        };
        let columns: Vec<Column<'_>> = fields
            .iter()
            .zip(&collations)
            .map(|(f, c)| Column { name: f.name, type_oid: f.type_oid, collation: c.as_deref() })
            .collect();
        let final_sql = if arrays { plan.final_sql_arrays(&columns) } else { plan.final_sql(&columns, rows.len()) };
        let final_sql = match final_sql {
            Ok(s) => s,
            Err(why) => {
                let message = format!(
                    "{why} across shards is not supported: the shards' answers cannot be combined into one PostgreSQL's answer; add a {key} condition to read one shard"
                );
                proto::error(&mut self.io.wbuf, "ERROR", "0A000", &message);
                return Ok(false);
            }
        };

        // The final query's parameters: the client's it uses, then the shards' values row by row.
        let mut types: Vec<u32> = Vec::with_capacity(values);
        let mut formats: Vec<i16> = Vec::with_capacity(values);
        let mut vals: Vec<Option<&[u8]>> = Vec::with_capacity(values);
        let (t, f, v) = c.params_of(&plan.final_params);
        types.extend(t);
        formats.extend(f);
        vals.extend(v);
        let mut parsed = Vec::with_capacity(rows.len());
        for r in &rows {
            let Some(row) = proto::data_row_values(&arena[r.clone()]).filter(|v| v.len() == width) else {
                proto::error(&mut self.io.wbuf, "ERROR", "08P01", "malformed DataRow from a shard");
                return Ok(false);
            };
            parsed.push(row);
        }
        let literals: Vec<Vec<u8>> = if arrays {
            (0..width).map(|c| array_literal(parsed.iter().map(|row| row[c]))).collect()
        } else {
            Vec::new()
        };
        if arrays {
            for (f, lit) in fields.iter().zip(&literals) {
                types.push(array_oid(f.type_oid).unwrap_or(0));
                formats.push(0);
                vals.push(Some(lit));
            }
        } else {
            for row in &parsed {
                for (f, v) in fields.iter().zip(row) {
                    types.push(f.type_oid);
                    formats.push(0);
                    vals.push(*v);
                }
            }
        }
        if rows.is_empty() && !arrays {
            for f in &fields {
                types.push(f.type_oid);
                formats.push(0);
                vals.push(None);
            }
        }
        let first = links[0];
        {
            let conn = self.links.get(first).conn.conn();
            let buf = &mut conn.io.wbuf;
            proto::write_parse_bytes(buf, "", &self.encoding.encode(&final_sql), &types);
            proto::write_bind(buf, "", "", &formats, &vals, c.result_formats);
            proto::describe_unnamed(buf, b'P');
            proto::execute_unnamed(buf);
            proto::flush(buf);
        }
        drop(vals);
        if let Err(e) = self.links.get(first).conn.conn().flush().await {
            return Err(self.merge_broken(links, e.into()).into());
        }
        let sources = plan.sources(width);
        let mut described = false;
        loop {
            let m = match self.links.get(first).conn.conn().read().await {
                Ok(m) => m,
                Err(e) => return Err(self.merge_broken(links, e.into()).into()),
            };
            match m.tag {
                b'T' if !described => {
                    described = true;
                    let Some(finals) = proto::row_fields(m.body()) else {
                        proto::error(&mut self.io.wbuf, "ERROR", "08P01", "malformed RowDescription from a shard");
                        return Ok(false);
                    };
                    // The client's description: the shards' for columns passed through, else the final's.
                    let described_as = |formats: &[i16]| -> Vec<(Vec<u8>, i16)> {
                        sources
                            .iter()
                            .enumerate()
                            .map(|(k, (s, name))| {
                                let field = match *s {
                                    Source::Partial(j) => &fields[j],
                                    Source::Final(j) => finals.get(j).unwrap_or(&fields[0]),
                                };
                                let raw = match name {
                                    // (The description after the name: table, column, type, size, modifier, format.)
                                    Some(n) => [n.as_bytes(), &field.raw[field.name.len()..]].concat(),
                                    None => field.raw.to_vec(),
                                };
                                (raw, format_of(formats, k))
                            })
                            .collect()
                    };
                    let described = described_as(c.result_formats);
                    self.answer_prefix(c, param_desc.as_ref(), Described::Fields(&described));
                }
                b'D' => {
                    self.io.push(&m.frame);
                    if self.io.wbuf.len() > 1 << 16 {
                        self.io.flush().await.map_err(|e| Failure::Fatal(e.into()))?;
                    }
                }
                b'C' => {
                    self.io.push(&m.frame);
                    return Ok(true);
                }
                b'E' => {
                    self.links.get(first).errored = true;
                    self.io.push(&m.frame);
                    return Ok(false);
                }
                b'N' | b'S' | b'A' => self.io.push(&m.frame),
                _ => {}
            }
        }
    }
}
