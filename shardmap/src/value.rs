//! Shard key values: what a key is (integer, uuid, text), how it is read from SQL literals and from Bind
//! parameters in text or binary format, and how it prints.

use std::fmt;

/// The type of the shard key column, from `shard-key-type` (default `auto`: inferred from each value, an
/// integer literal is an integer, a string that parses as a uuid is a uuid, anything else is text).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    #[default]
    Auto,
    #[serde(alias = "bigint", alias = "integer", alias = "int8", alias = "int4", alias = "int2")]
    Int,
    Uuid,
    #[serde(alias = "varchar")]
    Text,
}

/// One value of the shard key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyValue {
    Int(i64),
    Uuid([u8; 16]),
    Text(Box<str>),
}

/// Why a parameter could not be read as a key value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parameter ${index}: {what}")]
pub struct ParamError {
    pub index: usize,
    pub what: String,
}

// Type OIDs of the parameter types whose binary format we read.
pub const INT2: u32 = 21;
pub const INT4: u32 = 23;
pub const INT8: u32 = 20;
pub const TEXT: u32 = 25;
pub const VARCHAR: u32 = 1043;
pub const BPCHAR: u32 = 1042;
pub const NAME: u32 = 19;
pub const UUID: u32 = 2950;

impl KeyValue {
    /// A value written as a string (a quoted SQL literal, a text-format parameter, a config value).
    pub fn from_text(s: &str, ty: KeyType) -> Result<KeyValue, String> {
        match ty {
            KeyType::Auto => Ok(if let Ok(v) = s.trim().parse::<i64>() {
                KeyValue::Int(v)
            } else if let Some(u) = KeyValue::parse_uuid(s) {
                u
            } else {
                KeyValue::Text(s.into())
            }),
            KeyType::Int => s.trim().parse::<i64>().map(KeyValue::Int).map_err(|_| format!("{s:?} is not an integer")),
            KeyType::Uuid => KeyValue::parse_uuid(s).ok_or_else(|| format!("{s:?} is not a uuid")),
            KeyType::Text => Ok(KeyValue::Text(s.into())),
        }
    }

    /// A uuid in any of the input forms PostgreSQL accepts for the common case: 32 hex digits, with or
    /// without hyphens and braces.
    pub fn parse_uuid(s: &str) -> Option<KeyValue> {
        let s = s.trim();
        let s = s.strip_prefix('{').and_then(|t| t.strip_suffix('}')).unwrap_or(s);
        let mut out = [0u8; 16];
        let mut n = 0;
        let mut hi: Option<u8> = None;
        for (i, ch) in s.bytes().enumerate() {
            if ch == b'-' {
                // PostgreSQL accepts a hyphen after any group of four hex digits.
                if hi.is_some() || i == 0 || n % 2 != 0 {
                    return None;
                }
                continue;
            }
            let d = (ch as char).to_digit(16)? as u8;
            match hi.take() {
                None => hi = Some(d),
                Some(h) => {
                    if n == 16 {
                        return None;
                    }
                    out[n] = h << 4 | d;
                    n += 1;
                }
            }
        }
        (n == 16 && hi.is_none() && !s.ends_with('-')).then_some(KeyValue::Uuid(out))
    }

    /// A value in binary format for a parameter of type `oid` (0 when the client left it unspecified; then
    /// the configured key type decides, and under `auto` the length: 2, 4 or 8 bytes is an integer, 16 a uuid).
    pub fn from_binary(bytes: &[u8], oid: u32, ty: KeyType) -> Result<KeyValue, String> {
        let as_int = |b: &[u8]| -> Result<KeyValue, String> {
            Ok(KeyValue::Int(match b.len() {
                2 => i64::from(i16::from_be_bytes([b[0], b[1]])),
                4 => i64::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]])),
                8 => i64::from_be_bytes(b.try_into().expect("8 bytes")),
                n => return Err(format!("a binary integer of {n} bytes")),
            }))
        };
        let as_uuid = |b: &[u8]| -> Result<KeyValue, String> {
            <[u8; 16]>::try_from(b).map(KeyValue::Uuid).map_err(|_| format!("a binary uuid of {} bytes", b.len()))
        };
        let as_text = |b: &[u8]| -> Result<KeyValue, String> {
            std::str::from_utf8(b).map(|s| KeyValue::Text(s.into())).map_err(|_| "text that is not UTF-8".to_string())
        };
        match oid {
            INT2 | INT4 | INT8 => as_int(bytes),
            UUID => as_uuid(bytes),
            // Text in binary format is its bytes: read it as a text-format value would be, so that `$1` means
            // the same whichever format the client picked.
            TEXT | VARCHAR | BPCHAR | NAME => {
                KeyValue::from_text(std::str::from_utf8(bytes).map_err(|_| "text that is not UTF-8".to_string())?, ty)
            }
            _ => match ty {
                KeyType::Int => as_int(bytes),
                KeyType::Uuid => as_uuid(bytes),
                KeyType::Text => as_text(bytes),
                KeyType::Auto => match bytes.len() {
                    2 | 4 | 8 => as_int(bytes),
                    16 => as_uuid(bytes),
                    _ => as_text(bytes),
                },
            },
        }
    }

    /// The element values of an array parameter (`key = ANY($1)`), text format (`{1,2,3}`) or binary.
    pub fn array_from_param(bytes: &[u8], binary: bool, ty: KeyType) -> Result<Vec<KeyValue>, String> {
        if binary {
            return decode_binary_array(bytes, ty);
        }
        let s = std::str::from_utf8(bytes).map_err(|_| "array text that is not UTF-8".to_string())?;
        let inner = s
            .trim()
            .strip_prefix('{')
            .and_then(|t| t.strip_suffix('}'))
            .ok_or_else(|| format!("{s:?} is not an array literal"))?;
        if inner.trim().is_empty() {
            return Ok(Vec::new());
        }
        split_array_text(inner)?.into_iter().map(|e| KeyValue::from_text(&e, ty)).collect()
    }

    pub fn is_int(&self) -> bool {
        matches!(self, KeyValue::Int(_))
    }
}

/// Elements of the inside of a one-dimensional text array literal, with double quotes and backslashes.
fn split_array_text(inner: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = inner.chars();
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                was_quoted = true;
            }
            '\\' if quoted => cur.push(chars.next().ok_or("array ends in a backslash")?),
            ',' if !quoted => {
                out.push(finish_elem(&mut cur, was_quoted)?);
                was_quoted = false;
            }
            '{' | '}' if !quoted => return Err("nested arrays are not shard keys".into()),
            c => cur.push(c),
        }
    }
    if quoted {
        return Err("unterminated quote in array".into());
    }
    out.push(finish_elem(&mut cur, was_quoted)?);
    Ok(out)
}

fn finish_elem(cur: &mut String, quoted: bool) -> Result<String, String> {
    let e = std::mem::take(cur);
    let e = if quoted { e } else { e.trim().to_string() };
    if !quoted && e.eq_ignore_ascii_case("NULL") {
        return Err("NULL in a key array".into());
    }
    Ok(e)
}

fn decode_binary_array(b: &[u8], ty: KeyType) -> Result<Vec<KeyValue>, String> {
    let rd = |at: usize| -> Result<i32, String> {
        b.get(at..at + 4)
            .map(|s| i32::from_be_bytes(s.try_into().expect("4 bytes")))
            .ok_or_else(|| "truncated binary array".to_string())
    };
    let ndim = rd(0)?;
    let elem_oid = rd(8)? as u32;
    if ndim == 0 {
        return Ok(Vec::new());
    }
    if ndim != 1 {
        return Err(format!("a {ndim}-dimensional array is not a list of keys"));
    }
    let n = rd(12)?;
    let mut at = 20;
    let mut out = Vec::with_capacity(n.clamp(0, 1024) as usize);
    for _ in 0..n {
        let len = rd(at)?;
        at += 4;
        if len < 0 {
            return Err("NULL in a key array".into());
        }
        let e = b.get(at..at + len as usize).ok_or("truncated binary array")?;
        out.push(KeyValue::from_binary(e, elem_oid, ty)?);
        at += len as usize;
    }
    Ok(out)
}

impl fmt::Display for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyValue::Int(v) => write!(f, "{v}"),
            KeyValue::Text(s) => f.write_str(s),
            KeyValue::Uuid(u) => {
                for (i, byte) in u.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_round_trip() {
        let s = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        let v = KeyValue::parse_uuid(s).unwrap();
        assert_eq!(v.to_string(), s);
        assert_eq!(KeyValue::parse_uuid("{A0EEBC999C0B4EF8BB6D6BB9BD380A11}"), Some(v.clone()));
        assert_eq!(KeyValue::parse_uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1"), None);
        assert_eq!(KeyValue::parse_uuid("-a0eebc999c0b4ef8bb6d6bb9bd380a11"), None);
        assert_eq!(KeyValue::parse_uuid("hello"), None);
    }

    #[test]
    fn auto_inference() {
        assert_eq!(KeyValue::from_text("42", KeyType::Auto), Ok(KeyValue::Int(42)));
        assert_eq!(KeyValue::from_text("42", KeyType::Text), Ok(KeyValue::Text("42".into())));
        assert!(KeyValue::from_text("x", KeyType::Int).is_err());
    }

    #[test]
    fn arrays() {
        let v = KeyValue::array_from_param(b"{1, 2,3}", false, KeyType::Auto).unwrap();
        assert_eq!(v, vec![KeyValue::Int(1), KeyValue::Int(2), KeyValue::Int(3)]);
        let v = KeyValue::array_from_param(br#"{"a,b",c}"#, false, KeyType::Text).unwrap();
        assert_eq!(v, vec![KeyValue::Text("a,b".into()), KeyValue::Text("c".into())]);
        // int8[] {7, -1} in binary
        let mut b = Vec::new();
        for x in [1i32, 0, INT8 as i32, 2, 1] {
            b.extend_from_slice(&x.to_be_bytes());
        }
        for v in [7i64, -1] {
            b.extend_from_slice(&8i32.to_be_bytes());
            b.extend_from_slice(&v.to_be_bytes());
        }
        let v = KeyValue::array_from_param(&b, true, KeyType::Auto).unwrap();
        assert_eq!(v, vec![KeyValue::Int(7), KeyValue::Int(-1)]);
        assert!(KeyValue::array_from_param(&b[..30], true, KeyType::Auto).is_err());
    }
}
