//! Building and reading the few protocol messages the router itself makes or looks into. Message bodies are
//! read in place; nothing here allocates per relayed row.

use bytes::{BufMut, BytesMut};

pub const READY_IDLE: u8 = b'I';
pub const READY_IN_TX: u8 = b'T';
pub const READY_FAILED: u8 = b'E';

/// Appends a message with `tag` whose body `f` writes, filling in the length.
pub fn put(buf: &mut BytesMut, tag: u8, f: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    f(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

pub fn ready(buf: &mut BytesMut, status: u8) {
    put(buf, b'Z', |b| b.put_u8(status));
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    put(buf, b'C', |b| cstr(b, tag));
}

pub fn parse_complete(buf: &mut BytesMut) {
    put(buf, b'1', |_| {});
}

pub fn close_complete(buf: &mut BytesMut) {
    put(buf, b'3', |_| {});
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put(buf, b'S', |b| {
        cstr(b, name);
        cstr(b, value);
    });
}

/// An ErrorResponse (or, with `severity` "FATAL", the last words before closing).
pub fn error(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    report(buf, b'E', severity, code, message);
}

/// A NoticeResponse (a WARNING the router gives in a server's place, as the server would).
pub fn notice(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    report(buf, b'N', severity, code, message);
}

/// An ErrorResponse or NoticeResponse (`tag`) with its severity, SQLSTATE and message.
fn report(buf: &mut BytesMut, tag: u8, severity: &str, code: &str, message: &str) {
    put(buf, tag, |b| {
        b.put_u8(b'S');
        cstr(b, severity);
        b.put_u8(b'V');
        cstr(b, severity);
        b.put_u8(b'C');
        cstr(b, code);
        b.put_u8(b'M');
        cstr(b, message);
        b.put_u8(0);
    });
}

/// A simple Query message.
pub fn query(buf: &mut BytesMut, sql: &str) {
    put(buf, b'Q', |b| cstr(b, sql));
}

/// A simple Query message whose text is bytes (in the client's encoding).
pub fn query_bytes(buf: &mut BytesMut, sql: &[u8]) {
    put(buf, b'Q', |b| {
        b.put_slice(sql);
        b.put_u8(0);
    });
}

/// Reads a NUL-terminated string at the start of `b`: the string and the rest.
pub fn read_cstr(b: &[u8]) -> Option<(&str, &[u8])> {
    // (Most names are empty — the unnamed portal and statement —: answered before memchr's vector search,
    // which costs more to set up than that.)
    if let Some((0, rest)) = b.split_first() {
        return Some(("", rest));
    }
    let end = memchr::memchr(0, b)?;
    Some((std::str::from_utf8(&b[..end]).ok()?, &b[end + 1..]))
}

pub fn read_i16(b: &[u8]) -> Option<(i16, &[u8])> {
    Some((i16::from_be_bytes(b.get(..2)?.try_into().ok()?), &b[2..]))
}

pub fn read_i32(b: &[u8]) -> Option<(i32, &[u8])> {
    Some((i32::from_be_bytes(b.get(..4)?.try_into().ok()?), &b[4..]))
}

/// The values of a DataRow body, as text (NULL as `None`).
pub fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let Some((n, mut rest)) = read_i16(body) else { return Vec::new() };
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let Some((len, r)) = read_i32(rest) else { break };
        if len < 0 {
            out.push(None);
            rest = r;
        } else {
            let Some(v) = r.get(..len as usize) else { break };
            out.push(Some(String::from_utf8_lossy(v).into_owned()));
            rest = &r[len as usize..];
        }
    }
    out
}

/// The fields of an ErrorResponse or NoticeResponse body: (field type, value).
fn fields(body: &[u8]) -> impl Iterator<Item = (u8, &str)> {
    let mut b = body;
    std::iter::from_fn(move || {
        let (&field, rest) = b.split_first()?;
        if field == 0 {
            return None;
        }
        let (value, rest) = read_cstr(rest)?;
        b = rest;
        Some((field, value))
    })
}

/// The SQLSTATE and message of an ErrorResponse body.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    for (field, value) in fields(body) {
        match field {
            b'C' => code = value.to_string(),
            b'M' => message = value.to_string(),
            _ => {}
        }
    }
    (code, message)
}

/// Whether a NoticeResponse body is PostgreSQL's warning that a shutdown cut a commit's wait for the
/// synchronous standby (SQLSTATE 57P01 raised in `SyncRepWaitForLSN`: the transaction committed locally,
/// and the session ends without an answer). Told by the routine field, which is never translated: an
/// immediate shutdown sends a 57P01 warning too, to idle sessions.
pub fn is_commit_cut(notice: &[u8]) -> bool {
    let (mut code, mut routine) = ("", "");
    for (field, value) in fields(notice) {
        match field {
            b'C' => code = value,
            b'R' => routine = value,
            _ => {}
        }
    }
    code == "57P01" && routine == "SyncRepWaitForLSN"
}

/// The row count of a CommandComplete tag (`SELECT 3`, `INSERT 0 3`, `UPDATE 3`), and the tag's verb.
pub fn command_rows(tag: &str) -> Option<(&str, u64)> {
    let (verb, rest) = tag.split_once(' ')?;
    let n = rest.rsplit(' ').next()?.parse().ok()?;
    Some((verb, n))
}

/// A Parse message body: statement name, query text (as bytes: it is in the client's encoding), parameter
/// type OIDs.
pub struct ParseBytes<'a> {
    pub name: &'a str,
    pub query: &'a [u8],
    pub types: Vec<u32>,
}

pub fn read_parse_bytes(body: &[u8]) -> Option<ParseBytes<'_>> {
    let (name, rest) = read_cstr(body)?;
    let end = memchr::memchr(0, rest)?;
    let (query, rest) = (&rest[..end], &rest[end + 1..]);
    let (n, mut rest) = read_i16(rest)?;
    let mut types = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let (t, r) = read_i32(rest)?;
        types.push(t as u32);
        rest = r;
    }
    Some(ParseBytes { name, query, types })
}

pub fn write_parse_bytes(buf: &mut BytesMut, name: &str, query: &[u8], types: &[u32]) {
    put(buf, b'P', |b| {
        cstr(b, name);
        b.put_slice(query);
        b.put_u8(0);
        b.put_i16(types.len() as i16);
        for t in types {
            b.put_u32(*t);
        }
    });
}

pub fn write_parse(buf: &mut BytesMut, name: &str, query: &str, types: &[u32]) {
    put(buf, b'P', |b| {
        cstr(b, name);
        cstr(b, query);
        b.put_i16(types.len() as i16);
        for t in types {
            b.put_u32(*t);
        }
    });
}

/// A Bind message body, read in place.
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    /// The parameter format codes as sent, two bytes each (none: all text; one: for all).
    formats: &'a [u8],
    values: BindValues<'a>,
    /// The bytes after the statement name (formats, values, result formats), for re-writing the name.
    pub tail: &'a [u8],
}

/// A Bind's parameter values: a few held in place (nearly every statement: no allocation per Bind), more in
/// a vector.
enum BindValues<'a> {
    Few([Option<&'a [u8]>; FEW_VALUES], usize),
    Many(Vec<Option<&'a [u8]>>),
}

const FEW_VALUES: usize = 8;

impl<'a> BindValues<'a> {
    fn as_slice(&self) -> &[Option<&'a [u8]>] {
        match self {
            BindValues::Few(v, n) => &v[..*n],
            BindValues::Many(v) => v,
        }
    }
}

pub fn read_bind(body: &[u8]) -> Option<Bind<'_>> {
    let (portal, rest) = read_cstr(body)?;
    let (statement, tail) = read_cstr(rest)?;
    let (nf, rest) = read_i16(tail)?;
    let formats = rest.get(..2 * nf.max(0) as usize)?;
    let (n, mut rest) = read_i16(&rest[formats.len()..])?;
    let n = n.max(0) as usize;
    let mut next = || {
        let (v, r) = read_value(rest)?;
        rest = r;
        Some(v)
    };
    let values = if n <= FEW_VALUES {
        let mut few = [None; FEW_VALUES];
        for v in few.iter_mut().take(n) {
            *v = next()?;
        }
        BindValues::Few(few, n)
    } else {
        let mut many = Vec::with_capacity(n);
        for _ in 0..n {
            many.push(next()?);
        }
        BindValues::Many(many)
    };
    Some(Bind { portal, statement, formats, values, tail })
}

impl Bind<'_> {
    /// Whether parameter `i` is in binary format (format codes: none = all text, one = for all, else each).
    pub fn binary(&self, i: usize) -> bool {
        let code = |k: usize| self.formats.get(2 * k..2 * k + 2).is_some_and(|c| c == [0, 1]);
        match self.formats.len() / 2 {
            0 => false,
            1 => code(0),
            _ => code(i),
        }
    }

    pub fn value(&self, i: usize) -> Option<Option<&[u8]>> {
        self.values.as_slice().get(i).copied()
    }
}

/// A Bind's portal and statement names and the bytes after them, read without the parameter values (what
/// re-writing a Bind for a server connection needs, on every statement).
pub struct BindHead<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    pub tail: &'a [u8],
}

pub fn read_bind_head(body: &[u8]) -> Option<BindHead<'_>> {
    let (portal, rest) = read_cstr(body)?;
    let (statement, tail) = read_cstr(rest)?;
    Some(BindHead { portal, statement, tail })
}

/// Re-writes a Bind with another statement name.
pub fn write_bind_renamed(buf: &mut BytesMut, bind: &BindHead<'_>, statement: &str) {
    put(buf, b'B', |b| {
        cstr(b, bind.portal);
        cstr(b, statement);
        b.put_slice(bind.tail);
    });
}

impl Bind<'_> {
    /// The parameter format codes as sent (none, one for all, or one each).
    pub fn formats(&self) -> Vec<i16> {
        self.formats.chunks_exact(2).map(|c| i16::from_be_bytes([c[0], c[1]])).collect()
    }

    pub fn values(&self) -> &[Option<&[u8]>] {
        self.values.as_slice()
    }

    /// The result-column format codes (after the values in the message).
    pub fn result_formats(&self) -> Option<Vec<i16>> {
        let (nf, mut rest) = read_i16(self.tail)?;
        rest = rest.get(2 * nf.max(0) as usize..)?;
        let (nv, mut rest) = read_i16(rest)?;
        for _ in 0..nv {
            let (len, r) = read_i32(rest)?;
            rest = r.get(len.max(0) as usize..)?;
        }
        let (nr, mut rest) = read_i16(rest)?;
        let mut out = Vec::with_capacity(nr.max(0) as usize);
        for _ in 0..nr {
            let (f, r) = read_i16(rest)?;
            out.push(f);
            rest = r;
        }
        Some(out)
    }
}

/// A Bind message: portal, statement, parameter formats and values, result formats.
pub fn write_bind(
    buf: &mut BytesMut,
    portal: &str,
    statement: &str,
    formats: &[i16],
    values: &[Option<&[u8]>],
    results: &[i16],
) {
    put(buf, b'B', |b| {
        cstr(b, portal);
        cstr(b, statement);
        b.put_i16(formats.len() as i16);
        for f in formats {
            b.put_i16(*f);
        }
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v);
                }
                None => b.put_i32(-1),
            }
        }
        b.put_i16(results.len() as i16);
        for f in results {
            b.put_i16(*f);
        }
    });
}

/// Describe of the unnamed portal (`b'P'`) or statement (`b'S'`), Execute of the unnamed portal with no row
/// limit, Flush.
pub fn describe_unnamed(buf: &mut BytesMut, kind: u8) {
    put(buf, b'D', |b| {
        b.put_u8(kind);
        b.put_u8(0);
    });
}

pub fn execute_unnamed(buf: &mut BytesMut) {
    put(buf, b'E', |b| {
        b.put_u8(0);
        b.put_i32(0);
    });
}

pub fn flush(buf: &mut BytesMut) {
    put(buf, b'H', |_| {});
}

/// The values of a DataRow body, as bytes (NULL as `None`); `None` when malformed.
pub fn data_row_values(body: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    read_values(body).map(|(v, _)| v)
}

/// Values of a message, as bytes (NULL as `None`).
type Values<'a> = Vec<Option<&'a [u8]>>;

/// A count, then that many values, each its length (-1: NULL) and bytes, as in DataRow and Bind; what
/// follows them.
fn read_values(b: &[u8]) -> Option<(Values<'_>, &[u8])> {
    let (n, mut rest) = read_i16(b)?;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let (v, r) = read_value(rest)?;
        out.push(v);
        rest = r;
    }
    Some((out, rest))
}

/// One value: its length (-1: NULL) and bytes; what follows it.
fn read_value(b: &[u8]) -> Option<(Option<&[u8]>, &[u8])> {
    let (len, r) = read_i32(b)?;
    if len < 0 {
        return Some((None, r));
    }
    let v = r.get(..len as usize)?;
    Some((Some(v), &r[len as usize..]))
}

/// One field of a RowDescription: its name, its type OID, and its bytes (name to format code).
pub struct Field<'a> {
    pub name: &'a str,
    pub type_oid: u32,
    pub raw: &'a [u8],
}

/// The fields of a RowDescription body; `None` when malformed.
pub fn row_fields(body: &[u8]) -> Option<Vec<Field<'_>>> {
    let (n, mut rest) = read_i16(body)?;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let (name, r) = read_cstr(rest)?;
        let fixed = r.get(..18)?;
        let type_oid = u32::from_be_bytes(fixed[6..10].try_into().ok()?);
        let len = rest.len() - r.len() + 18;
        out.push(Field { name, type_oid, raw: &rest[..len] });
        rest = &r[18..];
    }
    Some(out)
}

/// A RowDescription of these fields, each with the given format code.
pub fn write_row_description(buf: &mut BytesMut, fields: &[(Vec<u8>, i16)]) {
    put(buf, b'T', |b| {
        b.put_i16(fields.len() as i16);
        for (raw, format) in fields {
            b.put_slice(&raw[..raw.len() - 2]);
            b.put_i16(*format);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_of_every_length_read_up_to_their_zero() {
        for n in 0..40 {
            let text = "x".repeat(n);
            let mut b = text.clone().into_bytes();
            b.extend_from_slice(b"\0rest");
            assert_eq!(read_cstr(&b), Some((text.as_str(), &b"rest"[..])), "{n}");
            assert_eq!(read_cstr(&b[..n]), None, "{n}: no zero");
        }
    }

    #[test]
    fn binds_with_few_and_many_values_read_back_as_written() {
        for n in [0usize, 1, 8, 9, 40] {
            let values: Vec<Option<&[u8]>> =
                (0..n).map(|i| if i % 3 == 2 { None } else { Some(&b"value"[..i % 5]) }).collect();
            for formats in [vec![], vec![1i16], (0..n as i16).map(|i| i % 2).collect::<Vec<_>>()] {
                let mut out = BytesMut::new();
                write_bind(&mut out, "p", "s", &formats, &values, &[1]);
                let b = read_bind(&out[5..]).expect("a Bind written reads");
                assert_eq!((b.portal, b.statement), ("p", "s"));
                assert_eq!(b.values(), &values[..]);
                assert_eq!(b.formats(), formats);
                for i in 0..n {
                    let binary = match formats.as_slice() {
                        [] => false,
                        [one] => *one == 1,
                        many => many[i] == 1,
                    };
                    assert_eq!((b.value(i), b.binary(i)), (Some(values[i]), binary));
                }
                assert_eq!(b.value(n), None);
                assert_eq!(b.result_formats(), Some(vec![1]));
                // Cut anywhere, it reads what is there or nothing, without a panic.
                for cut in 5..out.len() - 2 {
                    let _ = read_bind(&out[5..cut]);
                }
            }
        }
    }
}
