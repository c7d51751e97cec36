//! COPY ... FROM STDIN, in both protocols. Where the destination is one connection (one node, a tenant's
//! database) the COPY and its data pass through as they are. Otherwise the COPY statement is started on every
//! shard of the transaction (or every shard, outside one), the client's CopyData stream is cut into rows
//! (text or CSV, rows may straddle CopyData messages), each row's key field is read and the row goes to its
//! shard's stream; a global table's rows go to every shard. CommandComplete reports the total. Outside a
//! transaction the shards' COPYs run in transactions the router commits once every shard has taken its rows
//! (or rolls back if one failed); inside a transaction bound to one shard, every row must belong there.

use bytes::{BufMut, Bytes, BytesMut};
use shardmap::sql::{CopyFormat, CopyIn, Tables};
use shardmap::{Decision, KeyValue, ShardId};

use super::extended::{rewrite, Exp, Merge, Role};
use super::session::{Failure, Session};
use super::txn::{Dest, State, To};
use crate::net::proto::{self, READY_IDLE};
use crate::net::wire::{Msg, Stream};
use crate::net::{Fatal, Reported};

/// Send a shard's rows once this many bytes are waiting.
const CHUNK: usize = 64 << 10;

/// Cuts a COPY data stream into rows and reads each row's key field.
pub struct Splitter {
    format: CopyFormat,
    delimiter: u8,
    key_column: usize,
    /// Bytes of an incomplete row.
    partial: Vec<u8>,
    /// How far into `partial` the text and CSV formats have looked for the row's end (past its length when
    /// the last byte was an escaping backslash), and whether that point is inside a CSV quote: each byte is
    /// scanned once however many pieces a long row arrives in.
    scanned: usize,
    quoted: bool,
    /// The binary format: how far the fields of the tuple at the start of `partial` have been walked.
    walk: Walk,
    /// The longest row (or binary header) waited for: past it the COPY fails rather than buffer more.
    max_row: usize,
    /// The header line (CSV HEADER) still to come.
    header: bool,
    ended: bool,
}

/// The fields of a binary tuple read so far: the offset of the next one, its number, the key field's bytes.
struct Walk {
    at: usize,
    field: usize,
    key: Option<std::ops::Range<usize>>,
}

impl Default for Walk {
    fn default() -> Walk {
        Walk { at: 2, field: 0, key: None }
    }
}

impl From<Walk> for (usize, usize, Option<std::ops::Range<usize>>) {
    fn from(w: Walk) -> Self {
        (w.at, w.field, w.key)
    }
}

/// One complete row from the stream.
pub enum Row<'a> {
    /// A data row and its key field (`None` for NULL).
    Data { line: &'a [u8], key: Option<Key<'a>> },
    /// The CSV header, the binary format's header and trailer: every shard gets it.
    Header(&'a [u8]),
}

/// A row's key field: text (unescaped), or the binary format's bytes.
pub enum Key<'a> {
    Text(String),
    Binary(&'a [u8]),
}

/// The binary format's signature, at the start of its header.
const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl Splitter {
    /// A splitter for `copy`'s data, reading the key in column `key_column`; a row longer than `max_row`
    /// bytes fails the COPY (the router keeps no more than that of one client's COPY in memory).
    pub fn new(copy: &CopyIn, key_column: usize, max_row: usize) -> Splitter {
        Splitter {
            format: copy.format,
            delimiter: copy.delimiter,
            key_column,
            partial: Vec::new(),
            scanned: 0,
            quoted: false,
            walk: Walk::default(),
            max_row,
            header: (copy.header && copy.format == CopyFormat::Csv) || copy.format == CopyFormat::Binary,
            ended: false,
        }
    }

    /// Feeds bytes; calls `row` for each complete row. Errors name the row's problem.
    pub fn feed(&mut self, data: &[u8], mut row: impl FnMut(Row<'_>) -> Result<(), String>) -> Result<(), String> {
        self.partial.extend_from_slice(data);
        if self.format == CopyFormat::Binary {
            self.feed_binary(&mut row)?;
            return self.bounded();
        }
        let mut buf = std::mem::take(&mut self.partial);
        let mut start = 0;
        let mut i = self.scanned;
        while i < buf.len() {
            let b = buf[i];
            match self.format {
                CopyFormat::Csv if b == b'"' => self.quoted = !self.quoted,
                CopyFormat::Text if b == b'\\' => i += 1, // an escaped byte never ends a row
                _ => {}
            }
            if b == b'\n' && !self.quoted {
                let line = &buf[start..=i];
                start = i + 1;
                if !self.ended {
                    self.row(line, &mut row)?;
                }
            }
            i += 1;
        }
        // What is left is the start of one row, within this piece when a row ended in it: removing what
        // came before costs no more than the piece.
        self.scanned = i - start;
        buf.drain(..start);
        self.partial = buf;
        self.bounded()
    }

    /// Fails when the incomplete row waited for has grown past `max_row`.
    fn bounded(&self) -> Result<(), String> {
        if self.partial.len() > self.max_row {
            return Err(format!(
                "a COPY row is longer than {} bytes, the router's limit (router-max-message-bytes)",
                self.max_row
            ));
        }
        Ok(())
    }

    /// The binary format: a header (signature, flags, extension), then tuples (a field count, each field's
    /// length and bytes; -1 for NULL), then a trailer (a field count of -1).
    fn feed_binary(&mut self, row: &mut impl FnMut(Row<'_>) -> Result<(), String>) -> Result<(), String> {
        let mut buf = std::mem::take(&mut self.partial);
        let mut pos = 0;
        let be32 = |b: &[u8]| i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if self.header {
            // Signature (11 bytes), flags (4), extension length (4) and extension.
            if buf.len() < 19 {
                self.partial = buf;
                return Ok(());
            }
            if &buf[..11] != BINARY_SIGNATURE {
                return Err("COPY data in binary format does not start with its signature".into());
            }
            let total = 19 + be32(&buf[15..19]).max(0) as usize;
            if buf.len() < total {
                self.partial = buf;
                return Ok(());
            }
            row(Row::Header(&buf[..total]))?;
            self.header = false;
            pos = total;
        }
        while !self.ended {
            let rest = &buf[pos..];
            if rest.len() < 2 {
                break;
            }
            let fields = i16::from_be_bytes([rest[0], rest[1]]);
            if fields == -1 {
                self.ended = true;
                row(Row::Header(&rest[..2]))?;
                pos += 2;
                break;
            }
            // The tuple's length, and where its key field is, if it is all here; the first tuple goes on from
            // where the last piece left it.
            let (mut at, first, mut key) = match pos {
                0 => std::mem::take(&mut self.walk),
                _ => Walk::default(),
            }
            .into();
            let mut whole = true;
            for f in first..fields.max(0) as usize {
                if rest.len() < at + 4 {
                    whole = false;
                } else {
                    let len = be32(&rest[at..at + 4]);
                    if rest.len() < at + 4 + len.max(0) as usize {
                        whole = false;
                    } else if f == self.key_column && len >= 0 {
                        key = Some(at + 4..at + 4 + len as usize);
                    }
                }
                if !whole {
                    self.walk = Walk { at, field: f, key: key.take() };
                    break;
                }
                at += 4 + be32(&rest[at..at + 4]).max(0) as usize;
            }
            if !whole {
                break;
            }
            if self.key_column >= fields.max(0) as usize {
                return Err(format!("a row has no column {}", self.key_column + 1));
            }
            let line = &rest[..at];
            row(Row::Data { line, key: key.map(|r| Key::Binary(&rest[r])) })?;
            pos += at;
        }
        buf.drain(..pos);
        self.partial = buf;
        Ok(())
    }

    /// The rest at CopyDone: a last row without a newline.
    pub fn finish(&mut self, mut row: impl FnMut(Row<'_>) -> Result<(), String>) -> Result<(), String> {
        if self.format == CopyFormat::Binary {
            return match (self.ended, self.partial.is_empty()) {
                (false, true) => Err("COPY data in binary format ended without its trailer".into()),
                (_, false) => Err("COPY data in binary format ended in the middle of a row".into()),
                _ => Ok(()),
            };
        }
        let _ = &mut row;
        let rest = std::mem::take(&mut self.partial);
        if !rest.is_empty() && !self.ended {
            let mut line = rest;
            line.push(b'\n');
            self.row(&line, &mut row)?;
        }
        Ok(())
    }

    fn row(&mut self, line: &[u8], row: &mut impl FnMut(Row<'_>) -> Result<(), String>) -> Result<(), String> {
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if self.format == CopyFormat::Text && content == b"\\." {
            self.ended = true;
            return Ok(());
        }
        if self.header {
            self.header = false;
            return row(Row::Header(line));
        }
        let key = match self.format {
            CopyFormat::Csv => csv_field(content, self.delimiter, self.key_column),
            _ => text_field(content, self.delimiter, self.key_column),
        }
        .ok_or_else(|| {
            format!("a row has no column {}: {:?}", self.key_column + 1, String::from_utf8_lossy(content))
        })?;
        row(Row::Data { line, key: key.map(Key::Text) })
    }
}

/// Field `n` of a text-format row, unescaped; `None` inside for `\N`.
fn text_field(row: &[u8], delimiter: u8, n: usize) -> Option<Option<String>> {
    let mut field = 0;
    let mut i = 0;
    let mut start = 0;
    loop {
        let at_end = i >= row.len();
        if at_end || row[i] == delimiter {
            if field == n {
                let raw = &row[start..i.min(row.len())];
                if raw == b"\\N" {
                    return Some(None);
                }
                let mut out = Vec::with_capacity(raw.len());
                let mut k = 0;
                while k < raw.len() {
                    if raw[k] == b'\\' && k + 1 < raw.len() {
                        k += 1;
                        out.push(match raw[k] {
                            b'n' => b'\n',
                            b't' => b'\t',
                            b'r' => b'\r',
                            other => other,
                        });
                    } else {
                        out.push(raw[k]);
                    }
                    k += 1;
                }
                return Some(Some(String::from_utf8_lossy(&out).into_owned()));
            }
            if at_end {
                return None;
            }
            field += 1;
            start = i + 1;
        } else if row[i] == b'\\' {
            i += 1;
        }
        i += 1;
    }
}

/// Field `n` of a CSV row; `None` inside for an unquoted empty field (CSV's NULL).
fn csv_field(row: &[u8], delimiter: u8, n: usize) -> Option<Option<String>> {
    let mut field = 0;
    let mut i = 0;
    loop {
        // One field starting at i.
        let mut value = Vec::new();
        let mut was_quoted = false;
        if row.get(i) == Some(&b'"') {
            was_quoted = true;
            i += 1;
            while i < row.len() {
                if row[i] == b'"' {
                    if row.get(i + 1) == Some(&b'"') {
                        value.push(b'"');
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                value.push(row[i]);
                i += 1;
            }
        }
        while i < row.len() && row[i] != delimiter {
            value.push(row[i]);
            i += 1;
        }
        if field == n {
            if !was_quoted && value.is_empty() {
                return Some(None);
            }
            return Some(Some(String::from_utf8_lossy(&value).into_owned()));
        }
        if i >= row.len() {
            return None;
        }
        i += 1;
        field += 1;
    }
}

/// The COPY statement as the client sent it.
pub enum Request {
    Simple(Bytes),
    /// Its segment (Parse?, Bind, Describe?, Execute); the Sync comes after the data.
    Extended(Vec<Msg>),
}

/// Where the rows go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One connection: the data passes through unread.
    Through,
    /// Every connection gets every row (a global table).
    Everywhere,
    /// Each row to its shard's connection; `only`: inside a transaction on one shard, rows for others are
    /// refused.
    Split { only: Option<ShardId> },
}

/// How the client's data ended.
enum End {
    Done,
    Failed(String),
}

impl<S: Stream> Session<S> {
    /// Runs `COPY ... FROM STDIN` where the plan says (see the module doc).
    pub async fn copy_in(&mut self, to: To, copy: &CopyIn, d: Option<&Decision>, req: Request) -> Result<(), Failure> {
        let global = d.is_some_and(|d| d.analysis.statements.first().is_some_and(|s| s.tables == Tables::Global));
        let fixed = self.fixed();
        let db = d.and_then(|d| d.database.clone());
        let mut _pass = None;
        let mut wrap = false;
        let (links, mode) = match to {
            To::Once(dest) => (vec![self.link(&dest).await?], Mode::Through),
            To::Bound if fixed.is_some() => (vec![self.txn_link()?], Mode::Through),
            To::Bound if global => {
                return Err(Reported::unsupported(format!(
                    "COPY {} writes a global table on every shard, but the transaction is bound to one shard; multi-shard transactions are not supported yet",
                    copy.table
                ))
                .into())
            }
            To::Bound => {
                let i = self.txn_link()?;
                (vec![i], Mode::Split { only: Some(self.links.get(i).dest.shard) })
            }
            To::Fan(shards) => {
                // COPY's units are known row by row: it starts when no unit is frozen, and stays in the
                // catalog's gate to its end, so that a move's freeze waits for it (or rolls back) instead of
                // COPY meeting the guard.
                _pass = loop {
                    let pass = self.routing.catalog.enter();
                    if !self.routing.map.anything_frozen() {
                        break pass;
                    }
                    drop(pass);
                    self.routing.thaw(None).await?;
                };
                let shards = if shards.is_empty() || !global { self.routing.map.all().collect() } else { shards };
                let dests: Vec<Dest> = shards.into_iter().map(|shard| Dest { shard, db: db.clone() }).collect();
                self.hold_all(&dests).await?;
                for dest in &dests {
                    self.link(dest).await?;
                }
                wrap = dests.len() > 1 && matches!(req, Request::Simple(_));
                let links = dests.iter().filter_map(|d| self.links.find(d)).collect();
                (links, if global { Mode::Everywhere } else { Mode::Split { only: None } })
            }
            To::OpenParts(shards) | To::Parts(shards) => {
                let links = self.join_simple(&shards, d).await?;
                (links, if global { Mode::Everywhere } else { Mode::Split { only: None } })
            }
            To::Every => (self.part_links(&[]), if global { Mode::Everywhere } else { Mode::Split { only: None } }),
            _ => return Err(Reported::unsupported("COPY FROM STDIN is not supported here").into()),
        };
        let key = match (mode, copy.key_column) {
            (Mode::Split { .. }, Some(k)) if copy.format != CopyFormat::Binary => (k, 0),
            (Mode::Split { .. }, Some(k)) => (k, self.key_column(links[0], &copy.table).await?.1),
            (Mode::Split { .. }, None) if !copy.columns_given => self.key_column(links[0], &copy.table).await?,
            (Mode::Split { .. }, None) => {
                return Err(Reported::unsupported(format!(
                    "COPY {}: the columns do not include the shard key",
                    copy.table
                ))
                .into())
            }
            _ => (0, 0),
        };
        let extended = matches!(req, Request::Extended(_));
        let Some(mut exps) = self.copy_start(&links, &req, wrap).await? else { return Ok(()) };
        let end = Box::pin(self.copy_stream(&links, mode, copy, key)).await?;
        Box::pin(self.copy_finish(&links, mode, end, &mut exps, extended, wrap)).await
    }

    /// Sends the COPY statement on each link and reads up to its CopyInResponse; the client gets the first
    /// link's (after its ParseComplete/BindComplete in the extended protocol). Returns what each link still
    /// owes for the statement (extended protocol: its CommandComplete), or `None` when the statement failed
    /// and the client has been told (extended protocol: the sync group failed).
    async fn copy_start(&mut self, links: &[usize], req: &Request, wrap: bool) -> Result<Option<Vec<Exps>>, Failure> {
        let extended = matches!(req, Request::Extended(_));
        let mut exps = Vec::with_capacity(links.len());
        for &i in links {
            let l = self.links.get(i);
            let conn = l.conn.conn();
            let e = match req {
                Request::Simple(frame) => {
                    if wrap {
                        proto::query(&mut conn.io.wbuf, "BEGIN");
                    }
                    conn.io.push(frame);
                    Exps::new()
                }
                Request::Extended(seg) => {
                    l.pending = true;
                    rewrite(&self.statements, seg, false, conn)?
                }
            };
            exps.push(e);
            if let Err(e) = self.links.get(i).conn.conn().flush().await {
                return Err(self.copy_broken(links, e.into()).into());
            }
        }
        let mut started = vec![false; links.len()];
        // An error the client has not been told yet, or has (relayed from the first link).
        let mut failure: Option<Bytes> = None;
        let mut told = false;
        for (n, &i) in links.iter().enumerate() {
            if extended {
                let role = if n == 0 { Role::Only } else { Role::Silent };
                let mut merge = Merge::until_copy();
                if let Err(e) = self.relay(i, &mut exps[n], role, &mut merge, None).await {
                    return Err(self.copy_broken(links, e).into());
                }
                started[n] = merge.copy_in;
                if merge.failed {
                    match merge.take_error() {
                        Some(frame) if n > 0 => failure = failure.or(Some(frame)),
                        _ => told = true,
                    }
                }
                continue;
            }
            let conn = self.links.get(i).conn.conn();
            if wrap {
                if let Err(e) = conn.drain_to_ready().await {
                    return Err(self.copy_broken(links, e.into()).into());
                }
            }
            let m = match conn.read().await {
                Ok(m) => m,
                Err(e) => return Err(self.copy_broken(links, e.into()).into()),
            };
            match m.tag {
                b'G' => {
                    started[n] = true;
                    if n == 0 {
                        self.io.push(&m.frame);
                    }
                }
                b'E' => {
                    failure = failure.or(Some(m.frame.clone()));
                    let _ = conn.drain_to_ready().await;
                }
                other => {
                    let mut b = BytesMut::new();
                    proto::error(&mut b, "ERROR", "08P01", &format!("unexpected answer {:?} to COPY", other as char));
                    failure = failure.or(Some(b.freeze()));
                }
            }
        }
        if failure.is_none() && !told {
            self.io.flush().await.map_err(|e| Failure::Fatal(e.into()))?;
            return Ok(Some(exps));
        }
        // The statement failed somewhere (no such table...): the others are ended and rolled back.
        for (n, &i) in links.iter().enumerate() {
            let conn = self.links.get(i).conn.conn();
            if started[n] {
                let _ = abort(conn, "COPY failed on another shard", !extended).await;
            }
            if wrap {
                let _ = conn.run_quiet("ROLLBACK").await;
            }
            if extended {
                self.links.get(i).errored = true;
            }
        }
        if let (false, Some(frame)) = (told, &failure) {
            self.io.push(frame);
        }
        self.txn.error_inside();
        if extended {
            self.group_failed = true;
        } else {
            for &i in links {
                let dest = self.links.get(i).dest.clone();
                let status = self.links.get(i).status();
                self.txn.ready(&dest, status, true);
            }
            self.ready_for_query();
        }
        self.io.flush().await.map_err(|e| Failure::Fatal(e.into()))?;
        Ok(None)
    }

    /// The client's CopyData up to CopyDone (or CopyFail), sent on where `mode` says.
    async fn copy_stream(
        &mut self,
        links: &[usize],
        mode: Mode,
        copy: &CopyIn,
        (key_column, key_oid): (usize, u32),
    ) -> Result<End, Failure> {
        let map = self.routing.map.clone();
        let key_type = map.key_type;
        let mut bufs: Vec<BytesMut> = vec![BytesMut::new(); links.len()];
        let shards: Vec<ShardId> = links.iter().map(|&i| self.links.get(i).dest.shard).collect();
        let mut splitter = Splitter::new(copy, key_column, self.io.limit.bytes);
        let mut failure: Option<String> = None;
        let route = |r: Row<'_>, bufs: &mut Vec<BytesMut>| -> Result<(), String> {
            match r {
                Row::Header(line) => bufs.iter_mut().for_each(|b| b.put_slice(line)),
                Row::Data { line, key } => {
                    let v = match key.ok_or("a row's shard key is NULL")? {
                        Key::Text(key) => {
                            KeyValue::from_text(&key, key_type).map_err(|e| format!("shard key {key:?}: {e}"))?
                        }
                        Key::Binary(b) => KeyValue::from_binary(b, key_oid, key_type)
                            .map_err(|e| format!("shard key of {} bytes: {e}", b.len()))?,
                    };
                    let key = v.to_string();
                    let shard = map.locate(&v).map_err(|e| e.to_string())?.shard;
                    let i = shards.iter().position(|s| *s == shard).ok_or_else(|| {
                        format!(
                            "a row with shard key {key} belongs to shard {}, but the transaction is on shard {}; multi-shard transactions are not supported yet",
                            map.node(shard).name,
                            map.node(shards[0]).name
                        )
                    })?;
                    bufs[i].put_slice(line);
                }
            }
            Ok(())
        };
        let end = loop {
            let m = match self.next().await {
                Ok(Some(m)) => m,
                Ok(None) => return Err(Failure::Fatal(Fatal::Wire(crate::net::wire::WireError::Truncated))),
                Err(e) => return Err(Failure::Fatal(e)),
            };
            match m.tag {
                b'd' if failure.is_some() => {}
                b'd' => match mode {
                    Mode::Through => bufs[0].put_slice(&m.frame),
                    Mode::Everywhere => bufs.iter_mut().for_each(|b| b.put_slice(m.body())),
                    Mode::Split { .. } => {
                        if let Err(e) = splitter.feed(m.body(), |r| route(r, &mut bufs)) {
                            failure = Some(e);
                        }
                    }
                },
                b'c' => {
                    if let (Mode::Split { .. }, None) = (mode, &failure) {
                        if let Err(e) = splitter.finish(|r| route(r, &mut bufs)) {
                            failure = Some(e);
                        }
                    }
                    break match failure {
                        Some(why) => End::Failed(why),
                        None => End::Done,
                    };
                }
                b'f' => {
                    break End::Failed(
                        proto::read_cstr(m.body())
                            .map_or("COPY failed".to_string(), |(s, _)| format!("COPY from stdin failed: {s}")),
                    );
                }
                b'H' | b'S' => {} // Flush and Sync during COPY are ignored, as by the server
                other => {
                    break End::Failed(format!("unexpected message type {:?} during COPY from stdin", other as char))
                }
            }
            for (n, b) in bufs.iter_mut().enumerate() {
                if b.len() >= CHUNK {
                    if let Err(e) = send_data(&mut self.links.get(links[n]).conn, b, mode == Mode::Through).await {
                        return Err(self.copy_broken(links, e.into()).into());
                    }
                }
            }
        };
        if let End::Done = end {
            for (n, b) in bufs.iter_mut().enumerate() {
                if let Err(e) = send_data(&mut self.links.get(links[n]).conn, b, mode == Mode::Through).await {
                    return Err(self.copy_broken(links, e.into()).into());
                }
            }
        }
        Ok(end)
    }

    /// CopyDone (or CopyFail) on each link, and their answers: the total to the client, or the first error.
    async fn copy_finish(
        &mut self,
        links: &[usize],
        mode: Mode,
        end: End,
        exps: &mut [Exps],
        extended: bool,
        wrap: bool,
    ) -> Result<(), Failure> {
        for &i in links {
            let conn = self.links.get(i).conn.conn();
            match &end {
                End::Done => proto::put(&mut conn.io.wbuf, b'c', |_| {}),
                End::Failed(why) => proto::put(&mut conn.io.wbuf, b'f', |b| proto::cstr(b, why)),
            }
            if extended {
                // The extended protocol keeps the answer until Sync or Flush: it is wanted now.
                proto::put(&mut conn.io.wbuf, b'H', |_| {});
            }
            if let Err(e) = conn.flush().await {
                return Err(self.copy_broken(links, e.into()).into());
            }
        }
        if extended {
            // The answer up to CommandComplete; the Sync comes after.
            let mut merge = Merge::default();
            for (n, &i) in links.iter().enumerate() {
                let role = match (mode, n) {
                    (Mode::Through, _) => Role::Only,
                    (_, 0) => Role::First,
                    _ => Role::Rest,
                };
                if let Err(e) = self.relay(i, &mut exps[n], role, &mut merge, None).await {
                    return Err(self.copy_broken(links, e).into());
                }
            }
            let failed = merge.failed;
            if mode != Mode::Through {
                match (&end, merge.take_error()) {
                    (End::Failed(why), _) => proto::error(&mut self.io.wbuf, "ERROR", "22P04", why),
                    (_, Some(e)) => self.io.push(&e),
                    (End::Done, None) => proto::command_complete(&mut self.io.wbuf, &format!("COPY {}", merge.rows())),
                }
            }
            if failed || matches!(end, End::Failed(_)) {
                self.txn.error_inside();
                self.group_failed = true;
                for &i in links {
                    self.links.get(i).errored = true;
                }
            }
            return self.io.flush().await.map_err(|e| Failure::Fatal(e.into()));
        }
        if mode == Mode::Through {
            // One server: its answer as it is, up to ReadyForQuery.
            let i = links[0];
            let map = self.status_map(i);
            let r = self.links.get(i).conn.conn().relay_to_ready(&mut self.io, &map).await;
            return match r {
                Ok((status, error)) => {
                    self.answered(i, status, error, &[], None).await;
                    self.release();
                    self.io.flush().await.map_err(|e| Failure::Fatal(e.into()))
                }
                Err(crate::net::wire::RelayError::Src(e)) => {
                    let addr = self.links.get(i).conn.conn().addr.clone();
                    let e: Reported = crate::backend::conn::BackendError::Wire(e, addr).into();
                    self.lost(i, &e);
                    Err(e.into())
                }
                Err(crate::net::wire::RelayError::Dst(e)) => Err(Failure::Fatal(e.into())),
            };
        }
        let mut total = 0u64;
        let mut error: Option<Reported> = None;
        for &i in links {
            let conn = self.links.get(i).conn.conn();
            loop {
                let m = match conn.read().await {
                    Ok(m) => m,
                    Err(e) => return Err(self.copy_broken(links, e.into()).into()),
                };
                match m.tag {
                    b'C' => {
                        total +=
                            proto::read_cstr(m.body()).and_then(|(t, _)| proto::command_rows(t)).map_or(0, |(_, n)| n)
                    }
                    b'E' if error.is_none() => {
                        let (code, message) = proto::error_fields(m.body());
                        error = Some(Reported { code, message });
                    }
                    b'Z' => {
                        conn.status = m.body().first().copied().unwrap_or(READY_IDLE);
                        break;
                    }
                    _ => {}
                }
            }
        }
        let dests: Vec<Dest> = links.iter().map(|&i| self.links.get(i).dest.clone()).collect();
        if wrap {
            // Every shard took its rows (or one failed): commit them all (with two-phase commit), or none.
            let ok = error.is_none() && matches!(end, End::Done);
            if ok && self.txn.two_phase {
                if let Err(e) = self.commit_dests(&dests, &[]).await {
                    error.get_or_insert(e);
                }
            } else {
                let end = if ok { "COMMIT" } else { "ROLLBACK" };
                for &i in links {
                    if let Err(e) = self.links.get(i).conn.conn().run_quiet(end).await {
                        error.get_or_insert(e.into());
                    }
                }
            }
        }
        // (A connection that broke at the commit is gone.)
        let links: Vec<usize> = dests.iter().filter_map(|d| self.links.find(d)).collect();
        let statuses: Vec<(usize, u8)> = links.iter().map(|&i| (i, self.links.get(i).status())).collect();
        for (i, status) in statuses {
            let dest = self.links.get(i).dest.clone();
            if !matches!(self.txn.state, State::Many(_)) {
                self.txn.ready(&dest, status, error.is_some());
            }
        }
        match (end, error) {
            (End::Failed(why), _) => Err(Reported::new("22P04", why).into()),
            (End::Done, Some(e)) => Err(e.into()),
            (End::Done, None) => {
                proto::command_complete(&mut self.io.wbuf, &format!("COPY {total}"));
                self.ready_for_query();
                self.io.flush().await.map_err(|e| Failure::Fatal(e.into()))
            }
        }
    }

    /// A link broke during COPY: every link of it is closed (what they took is rolled back).
    fn copy_broken(&mut self, links: &[usize], e: Reported) -> Reported {
        let mut sorted = links.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        for i in sorted.into_iter().rev() {
            if i < self.links.len() {
                self.lost(i, &e);
            }
        }
        e
    }

    /// The position of the key among a table's columns (for COPY without a column list) and its type (for
    /// the binary format), looked up on `at`, a connection of the COPY: inside a transaction it sees a table
    /// made in it.
    async fn key_column(&mut self, at: usize, table: &str) -> Result<(usize, u32), Reported> {
        let sql = format!(
            "SELECT string_agg(attname, ',' ORDER BY attnum), max(atttypid::int) FILTER (WHERE attname = '{}') FROM pg_attribute WHERE attrelid = '{}'::regclass AND attnum > 0 AND NOT attisdropped",
            self.routing.map.key_of(table).replace('\'', "''"),
            table.replace('\'', "''")
        );
        let row = self.links.get(at).conn.conn().query_row(&sql).await?;
        let mut row = row.into_iter();
        let names = row.next().flatten().unwrap_or_default();
        let oid = row.next().flatten().and_then(|o| o.parse().ok()).unwrap_or(0);
        let key = self.routing.map.key_of(table);
        let pos = names
            .split(',')
            .position(|n| n == key)
            .ok_or_else(|| Reported::new("42703", format!("table {table} has no column {key}, the shard key")))?;
        Ok((pos, oid))
    }
}

type Exps = std::collections::VecDeque<Exp>;

async fn send_data(
    p: &mut crate::backend::pool::Pooled,
    buf: &mut BytesMut,
    frames: bool,
) -> Result<(), crate::backend::conn::BackendError> {
    if buf.is_empty() {
        return Ok(());
    }
    let conn = p.conn();
    if frames {
        // Passing through: the client's CopyData messages as they came.
        conn.io.wbuf.put_slice(buf);
    } else {
        proto::put(&mut conn.io.wbuf, b'd', |b| b.put_slice(buf));
    }
    buf.clear();
    conn.flush().await
}

/// Ends a shard's COPY with CopyFail (and, in the simple protocol, waits for its ReadyForQuery).
async fn abort(
    conn: &mut crate::backend::conn::ServerConn,
    why: &str,
    simple: bool,
) -> Result<(), crate::backend::conn::BackendError> {
    proto::put(&mut conn.io.wbuf, b'f', |b| proto::cstr(b, why));
    conn.flush().await?;
    if simple {
        let _ = conn.drain_to_ready().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_csv_fields() {
        assert_eq!(text_field(b"1\tab\\tc\t\\N", b'\t', 1), Some(Some("ab\tc".into())));
        assert_eq!(text_field(b"1\tab\t\\N", b'\t', 2), Some(None));
        assert_eq!(text_field(b"1\tab", b'\t', 5), None);
        assert_eq!(csv_field(b"\"a,\"\"b\",42,", b',', 0), Some(Some("a,\"b".into())));
        assert_eq!(csv_field(b"\"a,\"\"b\",42,", b',', 1), Some(Some("42".into())));
        assert_eq!(csv_field(b"\"a,\"\"b\",42,", b',', 2), Some(None));
        assert_eq!(csv_field(b"x,\"\"", b',', 1), Some(Some(String::new())));
    }

    #[test]
    fn rows_straddle_messages() {
        let copy = CopyIn {
            table: "t".into(),
            key_column: Some(0),
            columns_given: true,
            format: CopyFormat::Csv,
            delimiter: b',',
            header: true,
        };
        let mut s = Splitter::new(&copy, 0, 1 << 20);
        let mut keys = Vec::new();
        let mut headers = 0;
        let mut on = |r: Row<'_>| {
            match r {
                Row::Header(_) => headers += 1,
                Row::Data { key, .. } => keys.push(key.map(|k| match k {
                    Key::Text(t) => t,
                    Key::Binary(b) => format!("{b:?}"),
                })),
            }
            Ok(())
        };
        s.feed(b"id,note\n1,\"multi\nline\"\n2,x", &mut on).unwrap();
        s.feed(b"\n3,y\n4", &mut on).unwrap();
        s.finish(&mut on).unwrap();
        assert_eq!(headers, 1);
        assert_eq!(keys, vec![Some("1".into()), Some("2".into()), Some("3".into()), Some("4".into())]);
    }

    #[test]
    fn long_rows_in_small_pieces_and_rows_past_the_limit() {
        let copy = |format| CopyIn {
            table: "t".into(),
            key_column: Some(0),
            columns_given: true,
            format,
            delimiter: b',',
            header: false,
        };
        // A 1 MB CSV row with a quoted newline, in 16-byte pieces: each byte is looked at once (this took
        // minutes when every piece rescanned the row from its start).
        let mut data = b"7,\"".to_vec();
        data.extend(std::iter::repeat_n(b'x', 1 << 20));
        data.extend_from_slice(b"\n\"\n8,y\n");
        let mut s = Splitter::new(&copy(CopyFormat::Csv), 0, 2 << 20);
        let mut keys = Vec::new();
        let mut on = |r: Row<'_>| {
            if let Row::Data { key: Some(Key::Text(k)), line } = r {
                keys.push((k, line.len()));
            }
            Ok(())
        };
        for piece in data.chunks(16) {
            s.feed(piece, &mut on).unwrap();
        }
        s.finish(&mut on).unwrap();
        assert_eq!(keys, vec![("7".to_string(), (1 << 20) + 6), ("8".to_string(), 4)]);
        // Past the limit, the COPY fails naming it, in every format, before the row is complete.
        for format in [CopyFormat::Text, CopyFormat::Csv, CopyFormat::Binary] {
            let mut s = Splitter::new(&copy(format), 0, 1000);
            if format == CopyFormat::Binary {
                let mut start = BINARY_SIGNATURE.to_vec();
                start.extend_from_slice(&[0; 8]);
                start.extend_from_slice(&1i16.to_be_bytes());
                start.extend_from_slice(&100_000i32.to_be_bytes());
                s.feed(&start, |_| Ok(())).unwrap();
            }
            let piece = [b'1'; 600];
            s.feed(&piece, |_| Ok(())).unwrap();
            let e = s.feed(&piece, |_| Ok(())).unwrap_err();
            assert!(e.contains("router-max-message-bytes"), "{format:?}: {e}");
        }
    }

    #[test]
    fn binary_rows_straddle_messages() {
        let copy = CopyIn {
            table: "t".into(),
            key_column: Some(1),
            columns_given: true,
            format: CopyFormat::Binary,
            delimiter: b'\t',
            header: false,
        };
        let mut data = BINARY_SIGNATURE.to_vec();
        data.extend_from_slice(&0i32.to_be_bytes());
        data.extend_from_slice(&0i32.to_be_bytes());
        for (k, name) in [(7i64, "seven"), (8, "eight")] {
            data.extend_from_slice(&2i16.to_be_bytes());
            data.extend_from_slice(&(name.len() as i32).to_be_bytes());
            data.extend_from_slice(name.as_bytes());
            data.extend_from_slice(&8i32.to_be_bytes());
            data.extend_from_slice(&k.to_be_bytes());
        }
        data.extend_from_slice(&(-1i16).to_be_bytes());
        let mut s = Splitter::new(&copy, 1, 1 << 20);
        let (mut keys, mut headers, mut bytes) = (Vec::new(), 0, 0);
        let mut on = |r: Row<'_>| {
            match r {
                Row::Header(h) => {
                    headers += 1;
                    bytes += h.len();
                }
                Row::Data { key: Some(Key::Binary(b)), line } => {
                    keys.push(i64::from_be_bytes(b.try_into().expect("8 bytes")));
                    bytes += line.len();
                }
                Row::Data { .. } => panic!("a key"),
            }
            Ok(())
        };
        // Fed a few bytes at a time: rows cut anywhere come out whole.
        for chunk in data.chunks(5) {
            s.feed(chunk, &mut on).unwrap();
        }
        s.finish(&mut on).unwrap();
        assert_eq!(keys, vec![7, 8]);
        assert_eq!(headers, 2, "the header and the trailer");
        assert_eq!(bytes, data.len());
    }
}
