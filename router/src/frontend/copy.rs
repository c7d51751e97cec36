//! COPY ... FROM STDIN with rows split by the shard key: the COPY statement is started on every shard, the
//! client's CopyData stream is cut into rows (text or CSV, rows may straddle CopyData messages), each row's
//! key field is read and the row goes to its shard's stream. CommandComplete reports the total.

use bytes::{BufMut, BytesMut};
use shardmap::sql::{CopyFormat, CopyIn};
use shardmap::{Decision, KeyValue, ShardId};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::backend::pool::Pooled;
use crate::frontend::session::{Client, Fatal, Reported};
use crate::net::proto;

/// Send a shard's rows once this many bytes are waiting.
const CHUNK: usize = 64 << 10;

fn reported(code: &str, message: impl Into<String>) -> Reported {
    Reported { code: code.to_string(), message: message.into() }
}

/// Cuts a COPY data stream into rows and reads each row's key field.
pub struct Splitter {
    format: CopyFormat,
    delimiter: u8,
    key_column: usize,
    /// Bytes of an incomplete row.
    partial: Vec<u8>,
    /// The header line (CSV HEADER) still to come.
    header: bool,
    ended: bool,
}

/// One complete row from the stream.
pub enum Row<'a> {
    /// A data row and its key field (`None` for NULL).
    Data { line: &'a [u8], key: Option<String> },
    /// The CSV header: every shard gets it.
    Header(&'a [u8]),
}

impl Splitter {
    pub fn new(copy: &CopyIn, key_column: usize) -> Splitter {
        Splitter {
            format: copy.format,
            delimiter: copy.delimiter,
            key_column,
            partial: Vec::new(),
            header: copy.header && copy.format == CopyFormat::Csv,
            ended: false,
        }
    }

    /// Feeds bytes; calls `row` for each complete row. Errors name the row's problem.
    pub fn feed(&mut self, data: &[u8], mut row: impl FnMut(Row<'_>) -> Result<(), String>) -> Result<(), String> {
        self.partial.extend_from_slice(data);
        let buf = std::mem::take(&mut self.partial);
        let mut start = 0;
        let mut quoted = false;
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.format {
                CopyFormat::Csv if b == b'"' => quoted = !quoted,
                CopyFormat::Text if b == b'\\' => i += 1, // an escaped byte never ends a row
                _ => {}
            }
            if b == b'\n' && !quoted {
                let line = &buf[start..=i];
                start = i + 1;
                if !self.ended {
                    self.row(line, &mut row)?;
                }
            }
            i += 1;
        }
        self.partial = buf[start.min(buf.len())..].to_vec();
        Ok(())
    }

    /// The rest at CopyDone: a last row without a newline.
    pub fn finish(&mut self, mut row: impl FnMut(Row<'_>) -> Result<(), String>) -> Result<(), String> {
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
        row(Row::Data { line, key })
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

/// Looks up the position of the key among a table's columns, for COPY without a column list.
async fn key_position<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    d: &Decision,
    table: &str,
) -> Result<usize, Reported> {
    let mut p = c.checkout_any(d.database.as_deref()).await?;
    let sql = format!(
        "SELECT attname FROM pg_attribute WHERE attrelid = '{}'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        table.replace('\'', "''")
    );
    proto::query(&mut p.conn().io.wbuf, &sql);
    p.conn().flush().await?;
    let mut names = Vec::new();
    let mut error = None;
    loop {
        let m = p.conn().read().await?;
        match m.tag {
            b'D' => {
                // One text column: i16 count, i32 length, bytes.
                let body = m.body();
                if let Some((len, rest)) = body.get(2..).and_then(proto::read_i32) {
                    if len >= 0 {
                        names.push(String::from_utf8_lossy(&rest[..len as usize]).into_owned());
                    }
                }
            }
            b'E' => error = Some(proto::error_fields(m.body())),
            b'Z' => {
                p.conn().status = m.body().first().copied().unwrap_or(proto::READY_IDLE);
                break;
            }
            _ => {}
        }
    }
    c.give_back(p);
    if let Some((code, message)) = error {
        return Err(Reported { code, message });
    }
    let key = &c.shared.routing.map.key;
    names
        .iter()
        .position(|n| n == key)
        .ok_or_else(|| reported("42703", format!("table {table} has no column {key}, the shard key")))
}

/// Runs `COPY ... FROM STDIN` for several shards.
pub async fn copy_in<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    d: &Decision,
    copy: &CopyIn,
    frame: bytes::Bytes,
) -> Result<(), Fatal> {
    match copy_in_inner(c, d, copy, frame).await {
        Ok(()) => Ok(()),
        Err(Outcome::Reported(e)) => c.report(e).await,
        Err(Outcome::Fatal(f)) => Err(f),
    }
}

enum Outcome {
    Reported(Reported),
    Fatal(Fatal),
}

impl From<Reported> for Outcome {
    fn from(e: Reported) -> Self {
        Outcome::Reported(e)
    }
}

impl From<crate::backend::conn::BackendError> for Outcome {
    fn from(e: crate::backend::conn::BackendError) -> Self {
        Outcome::Reported(e.into())
    }
}

async fn copy_in_inner<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    d: &Decision,
    copy: &CopyIn,
    frame: bytes::Bytes,
) -> Result<(), Outcome> {
    let key_column = match copy.key_column {
        Some(k) => k,
        None if !copy.columns_given => key_position(c, d, &copy.table).await?,
        None => {
            return Err(
                reported("0A000", format!("COPY {}: the columns do not include the shard key", copy.table)).into()
            )
        }
    };
    let shards: Vec<ShardId> = d.shards(&c.shared.routing.map);
    let mut conns: Vec<Pooled> = Vec::with_capacity(shards.len());
    for s in &shards {
        conns.push(c.checkout(*s, d.database.as_deref()).await?);
    }
    // Start COPY everywhere; every shard must answer CopyInResponse.
    let mut response = None;
    for p in conns.iter_mut() {
        p.conn().io.push(&frame);
        p.conn().flush().await?;
    }
    for p in conns.iter_mut() {
        let m = p.conn().read().await?;
        match m.tag {
            b'G' => response = Some(m.frame),
            b'E' => {
                // The statement failed (no such table...): finish every shard and report it.
                let e = proto::error_fields(m.body());
                for q in conns.iter_mut() {
                    let _ = abort(q, "COPY failed on another shard").await;
                }
                return Err(Reported { code: e.0, message: e.1 }.into());
            }
            other => return Err(reported("08P01", format!("unexpected answer {:?} to COPY", other as char)).into()),
        }
    }
    c.io.push(&response.expect("at least one shard"));
    c.io.flush().await.map_err(|e| Outcome::Fatal(e.into()))?;

    let map = c.shared.routing.map.clone();
    let key_type = map.key_type;
    let index_of: std::collections::HashMap<ShardId, usize> = shards.iter().enumerate().map(|(i, s)| (*s, i)).collect();
    let mut bufs: Vec<BytesMut> = vec![BytesMut::new(); shards.len()];
    let mut splitter = Splitter::new(copy, key_column);
    let mut failure: Option<String> = None;
    let route = |r: Row<'_>, bufs: &mut Vec<BytesMut>| -> Result<(), String> {
        match r {
            Row::Header(line) => bufs.iter_mut().for_each(|b| b.put_slice(line)),
            Row::Data { line, key } => {
                let key = key.ok_or("a row's shard key is NULL")?;
                let v = KeyValue::from_text(&key, key_type).map_err(|e| format!("shard key {key:?}: {e}"))?;
                let shard = map.locate(&v).map_err(|e| e.to_string())?.shard;
                let i = *index_of.get(&shard).ok_or("a row for a shard outside the COPY")?;
                bufs[i].put_slice(line);
            }
        }
        Ok(())
    };
    loop {
        let m = match c.io.read().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(Outcome::Fatal(Fatal::Wire(crate::net::wire::WireError::Truncated))),
            Err(e) => return Err(Outcome::Fatal(e.into())),
        };
        match m.tag {
            b'd' if failure.is_none() => {
                if let Err(e) = splitter.feed(m.body(), |r| route(r, &mut bufs)) {
                    failure = Some(e);
                    continue;
                }
                for (i, b) in bufs.iter_mut().enumerate() {
                    if b.len() >= CHUNK {
                        send_data(&mut conns[i], b).await?;
                    }
                }
            }
            b'd' => {}
            b'c' => {
                if failure.is_none() {
                    if let Err(e) = splitter.finish(|r| route(r, &mut bufs)) {
                        failure = Some(e);
                    }
                }
                break;
            }
            b'f' => {
                failure = Some(
                    proto::read_cstr(m.body())
                        .map_or("COPY failed".to_string(), |(s, _)| format!("COPY from stdin failed: {s}")),
                );
                break;
            }
            b'H' | b'S' => {} // Flush and Sync during COPY are ignored, as by the server
            other => {
                failure = Some(format!("unexpected message type {:?} during COPY", other as char));
                break;
            }
        }
    }
    if let Some(why) = failure {
        for p in conns.iter_mut() {
            let _ = abort(p, &why).await;
        }
        for p in conns {
            c.give_back(p);
        }
        return Err(reported("22P04", why).into());
    }
    let mut total = 0u64;
    let mut error = None;
    for (i, p) in conns.iter_mut().enumerate() {
        send_data(p, &mut bufs[i]).await?;
        proto::put(&mut p.conn().io.wbuf, b'c', |_| {});
        p.conn().flush().await?;
    }
    for p in conns.iter_mut() {
        loop {
            let m = p.conn().read().await?;
            match m.tag {
                b'C' => {
                    total += proto::read_cstr(m.body()).and_then(|(t, _)| proto::command_rows(t)).map_or(0, |(_, n)| n)
                }
                b'E' if error.is_none() => error = Some(proto::error_fields(m.body())),
                b'Z' => {
                    p.conn().status = m.body().first().copied().unwrap_or(proto::READY_IDLE);
                    break;
                }
                _ => {}
            }
        }
    }
    for p in conns {
        c.give_back(p);
    }
    if let Some((code, message)) = error {
        // Shards that succeeded keep their rows: COPY across shards is not atomic (documented).
        return Err(Reported { code, message }.into());
    }
    proto::command_complete(&mut c.io.wbuf, &format!("COPY {total}"));
    proto::ready(&mut c.io.wbuf, proto::READY_IDLE);
    c.io.flush().await.map_err(|e| Outcome::Fatal(e.into()))?;
    Ok(())
}

async fn send_data(p: &mut Pooled, buf: &mut BytesMut) -> Result<(), crate::backend::conn::BackendError> {
    if buf.is_empty() {
        return Ok(());
    }
    let conn = p.conn();
    proto::put(&mut conn.io.wbuf, b'd', |b| b.put_slice(buf));
    buf.clear();
    conn.flush().await
}

/// Ends a shard's COPY with CopyFail and waits for its ReadyForQuery.
async fn abort(p: &mut Pooled, why: &str) -> Result<(), crate::backend::conn::BackendError> {
    let conn = p.conn();
    proto::put(&mut conn.io.wbuf, b'f', |b| proto::cstr(b, why));
    conn.flush().await?;
    let _ = conn.drain_to_ready().await;
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
        let mut s = Splitter::new(&copy, 0);
        let mut keys = Vec::new();
        let mut headers = 0;
        let mut on = |r: Row<'_>| {
            match r {
                Row::Header(_) => headers += 1,
                Row::Data { key, .. } => keys.push(key),
            }
            Ok(())
        };
        s.feed(b"id,note\n1,\"multi\nline\"\n2,x", &mut on).unwrap();
        s.feed(b"\n3,y\n4", &mut on).unwrap();
        s.finish(&mut on).unwrap();
        assert_eq!(headers, 1);
        assert_eq!(keys, vec![Some("1".into()), Some("2".into()), Some("3".into()), Some("4".into())]);
    }
}
