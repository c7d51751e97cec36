//! The k-way merge of rows in an order across shards (`shardmap::sql::StreamPlan`): each shard sorts its
//! rows and sends them with their sort keys again as hidden columns; the router holds one row per shard,
//! sends the least (by the keys, decoded from PostgreSQL's binary format), and reads that shard's next. Used
//! when the keys are of types the router compares exactly as the server does (integers, floats, numeric,
//! bool, dates and times, uuid); text keys are left to the servers (collations), through the final query.
//! Memory is one row per shard, whatever the number of rows; OFFSET and LIMIT apply as rows go out.

use std::cmp::Ordering;

use bytes::{BufMut, Bytes, BytesMut};
use shardmap::sql::StreamPlan;

use super::combine::{format_of, ClientPart, Described};
use super::session::{Failure, Session};
use crate::net::proto;
use crate::net::wire::Stream;

/// Rows the shards return for LIMIT + OFFSET below which the final query is cheaper than a merge set up.
pub const STREAM_FROM: u64 = 5_000;

/// A sort key's value, comparable as the server compares it.
#[derive(Debug, PartialEq)]
enum Key {
    Null,
    Int(i64),
    Float(f64),
    Numeric(String),
    Bytes(Vec<u8>),
}

/// The binary format a key type is compared in: `Some(true)` binary, `Some(false)` text (numeric), `None`
/// a type the router does not compare.
fn key_format(oid: u32) -> Option<bool> {
    match oid {
        16 | 20 | 21 | 23 | 26 | 700 | 701 | 1082 | 1083 | 1114 | 1184 | 2950 => Some(true),
        1700 => Some(false),
        _ => None,
    }
}

fn decode(oid: u32, v: Option<&[u8]>) -> Key {
    let Some(v) = v else { return Key::Null };
    let be = |n: usize| -> Option<[u8; 8]> {
        let mut b = [0u8; 8];
        b[8 - n..].copy_from_slice(v.get(..n)?);
        Some(b)
    };
    match oid {
        21 => Key::Int(i64::from(i16::from_be_bytes([v[0], v[1]]))),
        23 | 1082 => Key::Int(i64::from(i32::from_be_bytes([v[0], v[1], v[2], v[3]]))),
        26 => Key::Int(i64::from(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))),
        20 | 1083 | 1114 | 1184 => Key::Int(be(8).map_or(0, i64::from_be_bytes)),
        700 => Key::Float(f64::from(f32::from_be_bytes([v[0], v[1], v[2], v[3]]))),
        701 => Key::Float(f64::from_be_bytes(be(8).unwrap_or_default())),
        1700 => Key::Numeric(String::from_utf8_lossy(v).into_owned()),
        _ => Key::Bytes(v.to_vec()),
    }
}

/// PostgreSQL's order of floats: NaN above everything, -0 equal to 0.
fn cmp_float(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// numeric's order on its text form: -Infinity < numbers < Infinity < NaN.
fn cmp_numeric(a: &str, b: &str) -> Ordering {
    fn rank(s: &str) -> i8 {
        match s {
            "NaN" => 3,
            "Infinity" => 2,
            "-Infinity" => -2,
            _ => 0,
        }
    }
    let (ra, rb) = (rank(a), rank(b));
    if ra != 0 || rb != 0 {
        return ra.cmp(&rb).then(Ordering::Equal);
    }
    let parts = |s: &str| {
        let (neg, s) = s.strip_prefix('-').map_or((false, s), |r| (true, r));
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        let int = int.trim_start_matches('0');
        let frac = frac.trim_end_matches('0');
        let zero = int.is_empty() && frac.is_empty();
        (neg && !zero, int.to_string(), frac.to_string())
    };
    let (na, ia, fa) = parts(a);
    let (nb, ib, fb) = parts(b);
    let magnitude = ia.len().cmp(&ib.len()).then_with(|| ia.cmp(&ib)).then_with(|| fa.cmp(&fb));
    match (na, nb) {
        (false, false) => magnitude,
        (true, true) => magnitude.reverse(),
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
    }
}

fn cmp_key(a: &Key, b: &Key) -> Ordering {
    match (a, b) {
        (Key::Int(x), Key::Int(y)) => x.cmp(y),
        (Key::Float(x), Key::Float(y)) => cmp_float(*x, *y),
        (Key::Numeric(x), Key::Numeric(y)) => cmp_numeric(x, y),
        (Key::Bytes(x), Key::Bytes(y)) => x.cmp(y),
        _ => Ordering::Equal,
    }
}

/// Rows in the order of `keys` (descending, NULLs first), compared key by key.
fn cmp_rows(a: &[Key], b: &[Key], keys: &[(bool, bool)]) -> Ordering {
    for (i, &(desc, nulls_first)) in keys.iter().enumerate() {
        let o = match (&a[i], &b[i]) {
            (Key::Null, Key::Null) => Ordering::Equal,
            (Key::Null, _) => return if nulls_first { Ordering::Less } else { Ordering::Greater },
            (_, Key::Null) => return if nulls_first { Ordering::Greater } else { Ordering::Less },
            (x, y) if desc => cmp_key(x, y).reverse(),
            (x, y) => cmp_key(x, y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

/// One shard's current row: the DataRow frame cut to the client's columns, and its decoded keys.
struct Head {
    frame: Bytes,
    keys: Vec<Key>,
}

/// A DataRow body split into the client's columns (as a new frame) and the hidden keys (decoded).
fn split_row(body: &[u8], visible: usize, oids: &[u32]) -> Option<Head> {
    let values = proto::data_row_values(body)?;
    if values.len() != visible + oids.len() {
        return None;
    }
    // The visible columns are the body's first fields: their bytes are copied as they are.
    let mut end = 2;
    for v in &values[..visible] {
        end += 4 + v.map_or(0, <[u8]>::len);
    }
    let mut frame = BytesMut::with_capacity(end + 5);
    frame.put_u8(b'D');
    frame.put_i32((end + 4) as i32);
    frame.put_i16(visible as i16);
    frame.put_slice(&body[2..end]);
    let keys = oids.iter().zip(&values[visible..]).map(|(&o, v)| decode(o, *v)).collect();
    Some(Head { frame: frame.freeze(), keys })
}

impl<S: Stream> Session<S> {
    /// Whether the merge can run: the keys' types (from a Describe of `plan.sql` on the first link) are all
    /// comparable by the router. `None`: no (the final query is used); `Some(..)`: the statement's
    /// description (its ParameterDescription frame, and each column's type OID); `Err(())`: the server's
    /// error, written for the client.
    #[allow(clippy::type_complexity)]
    pub async fn stream_describe(
        &mut self,
        links: &[usize],
        plan: &StreamPlan,
        c: &ClientPart<'_>,
    ) -> Result<Result<Option<(Option<Bytes>, Vec<u32>)>, ()>, Failure> {
        let first = links[0];
        let (types, _, _) = c.params_of(&plan.params);
        {
            let l = self.links.get(first);
            l.pending = true;
            let buf = &mut l.conn.conn().io.wbuf;
            proto::write_parse_bytes(buf, "", &self.encoding.encode(&plan.sql), &types);
            proto::describe_unnamed(buf, b'S');
            proto::flush(buf);
        }
        if let Err(e) = self.links.get(first).conn.conn().flush().await {
            return Err(self.merge_broken(links, e.into()).into());
        }
        let mut param_desc = None;
        loop {
            let m = match self.links.get(first).conn.conn().read().await {
                Ok(m) => m,
                Err(e) => return Err(self.merge_broken(links, e.into()).into()),
            };
            match m.tag {
                b't' => param_desc = Some(m.frame),
                b'T' => {
                    let Some(fields) = proto::row_fields(m.body()) else { return Ok(Ok(None)) };
                    let oids: Vec<u32> = fields.iter().map(|f| f.type_oid).collect();
                    let n = plan.keys.len();
                    if oids.len() < n || oids[oids.len() - n..].iter().any(|&o| key_format(o).is_none()) {
                        return Ok(Ok(None));
                    }
                    return Ok(Ok(Some((param_desc, oids))));
                }
                b'n' => return Ok(Ok(None)),
                // (An error here leaves the first link skipping to its Sync: the final query's path would fail
                // there too, so the error is the client's.)
                b'E' => {
                    self.links.get(first).errored = true;
                    self.io.push(&m.frame);
                    return Ok(Err(()));
                }
                _ => {}
            }
        }
    }

    /// The merge itself (see the module doc). `Ok(false)`: an error was written for the client.
    pub async fn stream_on(
        &mut self,
        links: &[usize],
        plan: &StreamPlan,
        c: &ClientPart<'_>,
        (param_desc, oids): (Option<Bytes>, Vec<u32>),
    ) -> Result<bool, Failure> {
        let sql = self.encoding.encode(&plan.sql).into_owned();
        let (types, formats, values) = c.params_of(&plan.params);
        let n = plan.keys.len();
        let visible = oids.len() - n;
        // The client's columns in its formats, the keys in the router's.
        let mut results: Vec<i16> = (0..visible).map(|k| format_of(c.result_formats, k)).collect();
        results.extend(oids[visible..].iter().map(|&o| i16::from(key_format(o) == Some(true))));
        for &i in links {
            let l = self.links.get(i);
            l.pending = true;
            let buf = &mut l.conn.conn().io.wbuf;
            proto::write_parse_bytes(buf, "", &sql, &types);
            proto::write_bind(buf, "", "", &formats, &values, &results);
            proto::describe_unnamed(buf, b'P');
            proto::execute_unnamed(buf);
            proto::flush(buf);
            if let Err(e) = l.conn.conn().flush().await {
                return Err(self.merge_broken(links, e.into()).into());
            }
        }
        let key_oids = oids[visible..].to_vec();
        let mut heads: Vec<Option<Head>> = Vec::with_capacity(links.len());
        let mut desc: Option<Bytes> = None;
        for &i in links {
            match self.next_head(links, i, visible, &key_oids, &mut desc).await? {
                Ok(h) => heads.push(h),
                Err(()) => return Ok(false),
            }
        }
        let Some(fields) = desc.as_ref().and_then(|d| proto::row_fields(&d[5..])) else {
            proto::error(&mut self.io.wbuf, "ERROR", "XX000", "the shards did not describe their rows");
            return Ok(false);
        };
        let described: Vec<(Vec<u8>, i16)> = fields[..visible]
            .iter()
            .enumerate()
            .map(|(k, f)| (f.raw.to_vec(), format_of(c.result_formats, k)))
            .collect();
        self.answer_prefix(c, param_desc.as_ref(), Described::Fields(&described));
        let (mut skipped, mut sent) = (0u64, 0u64);
        loop {
            if plan.limit.is_some_and(|l| sent >= l) {
                break;
            }
            let mut best: Option<usize> = None;
            for (k, h) in heads.iter().enumerate() {
                let Some(h) = h else { continue };
                let better = match best.and_then(|b| heads[b].as_ref()) {
                    None => true,
                    Some(b) => cmp_rows(&h.keys, &b.keys, &plan.keys) == Ordering::Less,
                };
                if better {
                    best = Some(k);
                }
            }
            let Some(k) = best else { break };
            let head = heads[k].take().expect("chosen");
            if skipped < plan.offset {
                skipped += 1;
            } else {
                self.io.push(&head.frame);
                sent += 1;
                if self.io.wbuf.len() > 1 << 16 {
                    self.io.flush().await.map_err(|e| Failure::Fatal(e.into()))?;
                }
            }
            match self.next_head(links, links[k], visible, &key_oids, &mut desc).await? {
                Ok(h) => heads[k] = h,
                Err(()) => return Ok(false),
            }
        }
        // What the shards sent past the LIMIT is read and dropped (at most LIMIT + OFFSET rows each).
        for (k, h) in heads.iter_mut().enumerate() {
            while h.is_some() {
                match self.next_head(links, links[k], visible, &key_oids, &mut desc).await? {
                    Ok(next) => *h = next,
                    Err(()) => return Ok(false),
                }
            }
        }
        proto::command_complete(&mut self.io.wbuf, &format!("SELECT {sent}"));
        Ok(true)
    }

    /// The next row of link `i` (`None` at its CommandComplete); `Err(())` after an error, written for the
    /// client.
    async fn next_head(
        &mut self,
        links: &[usize],
        i: usize,
        visible: usize,
        key_oids: &[u32],
        desc: &mut Option<Bytes>,
    ) -> Result<Result<Option<Head>, ()>, Failure> {
        loop {
            let m = match self.links.get(i).conn.conn().read().await {
                Ok(m) => m,
                Err(e) => return Err(self.merge_broken(links, e.into()).into()),
            };
            match m.tag {
                b'D' => {
                    return match split_row(m.body(), visible, key_oids) {
                        Some(h) => Ok(Ok(Some(h))),
                        None => {
                            proto::error(&mut self.io.wbuf, "ERROR", "08P01", "malformed DataRow from a shard");
                            Ok(Err(()))
                        }
                    }
                }
                b'T' if desc.is_none() => *desc = Some(m.frame),
                b'C' => return Ok(Ok(None)),
                b'E' => {
                    self.links.get(i).errored = true;
                    self.io.push(&m.frame);
                    return Ok(Err(()));
                }
                b'N' | b'S' | b'A' => self.io.push(&m.frame),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_and_float_orders_are_postgresqls() {
        let sorted = ["-Infinity", "-10.5", "-2", "-0.001", "0", "0.000", "0.5", "2", "10", "10.01", "Infinity", "NaN"];
        for w in sorted.windows(2) {
            assert_ne!(cmp_numeric(w[0], w[1]), Ordering::Greater, "{} <= {}", w[0], w[1]);
        }
        assert_eq!(cmp_numeric("0", "-0.000"), Ordering::Equal);
        assert_eq!(cmp_numeric("1.50", "1.5"), Ordering::Equal);
        assert_eq!(cmp_float(f64::NAN, f64::INFINITY), Ordering::Greater);
        assert_eq!(cmp_float(-0.0, 0.0), Ordering::Equal);
    }

    #[test]
    fn nulls_and_directions() {
        let keys = [(true, true)];
        assert_eq!(cmp_rows(&[Key::Null], &[Key::Int(5)], &keys), Ordering::Less);
        assert_eq!(cmp_rows(&[Key::Int(6)], &[Key::Int(5)], &keys), Ordering::Less);
        let keys = [(false, false)];
        assert_eq!(cmp_rows(&[Key::Null], &[Key::Int(5)], &keys), Ordering::Greater);
    }
}
