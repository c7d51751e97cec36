//! PostgreSQL's own hash functions, bit for bit, so that the bucket of a key can be computed both here and on
//! a shard in SQL (`hashint8extended`, `uuid_hash_extended`, `hashtextextended`). The rebalancer selects a
//! bucket's rows on the server with [`sql_hash_expr`]; the router computes the same figure with [`hash_key`].
//!
//! The byte hash is Bob Jenkins' lookup3 as PostgreSQL's `src/common/hashfn.c` uses it on a little-endian
//! machine (the only kind we build for: `hash_bytes_extended` reads 32-bit words in native order).

use crate::value::{KeyType, KeyValue};

/// The seed given to PostgreSQL's `*extended` hash functions. Zero makes them skip the seed mixing step, which
/// is also what PostgreSQL's plain (32-bit) hash functions do.
pub const SEED: u64 = 0;

#[inline]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline]
fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

const INIT: u32 = 0x9e37_79b9_u32.wrapping_add(3_923_095);

fn seeded(len: u32, seed: u64) -> (u32, u32, u32) {
    let v = INIT.wrapping_add(len);
    let (mut a, mut b, mut c) = (v, v, v);
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    (a, b, c)
}

/// `hash_bytes_extended(k, len, seed)`: what `hashtextextended` (deterministic collations) and
/// `uuid_hash_extended` compute.
pub fn hash_bytes_extended(key: &[u8], seed: u64) -> u64 {
    let (mut a, mut b, mut c) = seeded(key.len() as u32, seed);
    let mut k = key;
    while k.len() >= 12 {
        a = a.wrapping_add(u32::from_le_bytes([k[0], k[1], k[2], k[3]]));
        b = b.wrapping_add(u32::from_le_bytes([k[4], k[5], k[6], k[7]]));
        c = c.wrapping_add(u32::from_le_bytes([k[8], k[9], k[10], k[11]]));
        mix(&mut a, &mut b, &mut c);
        k = &k[12..];
    }
    // The last 0..=11 bytes: a and b take whole little-endian words, c takes bytes 8..=10 shifted up by one
    // byte (its lowest byte is reserved for the length in lookup3).
    let byte = |i: usize| k.get(i).map_or(0u32, |&x| x as u32);
    if !k.is_empty() {
        a = a.wrapping_add(byte(0) | byte(1) << 8 | byte(2) << 16 | byte(3) << 24);
    }
    if k.len() > 4 {
        b = b.wrapping_add(byte(4) | byte(5) << 8 | byte(6) << 16 | byte(7) << 24);
    }
    if k.len() > 8 {
        c = c.wrapping_add(byte(8) << 8 | byte(9) << 16 | byte(10) << 24);
    }
    final_mix(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// `hash_bytes_uint32_extended(k, seed)`.
pub fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let (mut a, mut b, mut c) = seeded(4, seed);
    a = a.wrapping_add(k);
    final_mix(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// `hashint8extended(v, seed)`. For values that fit in 32 bits this equals `hashint4extended` and
/// `hashint2extended`, so a key column of any integer type hashes the same.
pub fn hashint8extended(v: i64, seed: u64) -> u64 {
    let lohalf = v as u32;
    let hihalf = (v >> 32) as u32;
    let lohalf = lohalf ^ if v >= 0 { hihalf } else { !hihalf };
    hash_uint32_extended(lohalf, seed)
}

/// The 64-bit hash of a key value, as PostgreSQL computes it for a column of the value's type.
pub fn hash_key(value: &KeyValue) -> i64 {
    let h = match value {
        KeyValue::Int(v) => hashint8extended(*v, SEED),
        KeyValue::Uuid(u) => hash_bytes_extended(u, SEED),
        KeyValue::Text(s) => hash_bytes_extended(s.as_bytes(), SEED),
    };
    h as i64
}

/// `n` slots, the hash reduced to one of them: the same figure as SQL's `((h % n) + n) % n`.
pub fn reduce(hash: i64, n: u32) -> u32 {
    hash.rem_euclid(i64::from(n)) as u32
}

/// The SQL expression that computes [`hash_key`] for `column` on a PostgreSQL server.
pub fn sql_hash_expr(column: &str, key_type: KeyType) -> String {
    match key_type {
        KeyType::Int | KeyType::Auto => format!("hashint8extended(({column})::int8, {SEED})"),
        KeyType::Uuid => format!("uuid_hash_extended(({column})::uuid, {SEED})"),
        KeyType::Text => format!("hashtextextended(({column})::text, {SEED})"),
    }
}

/// The SQL expression that computes the slot (`0..n`) of `column`: the bucket under `hash-buckets`, the
/// shard under `modulo` for non-integer keys.
pub fn sql_slot_expr(column: &str, key_type: KeyType, n: u32) -> String {
    format!("((({}) % {n}) + {n}) % {n}", sql_hash_expr(column, key_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Figures printed by PostgreSQL 15 itself, e.g. `SELECT hashint8extended(12345, 0)`.
    #[test]
    fn match_postgres_constants() {
        assert_eq!(hash_key(&KeyValue::Int(12345)), -4060231184274664867);
        assert_eq!(hash_key(&KeyValue::Int(-7)), -4284878795861022465);
        assert_eq!(hash_key(&KeyValue::Text("acme".into())), 7757017307627438190);
        assert_eq!(hash_key(&KeyValue::Text("hello world, longer text".into())), 8161919079003079);
        assert_eq!(hash_key(&KeyValue::Text("".into())), -6939563903564495251);
        let uuid = KeyValue::parse_uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap();
        assert_eq!(hash_key(&uuid), 7543054272012930821);
    }

    #[test]
    fn reduce_is_never_negative() {
        assert_eq!(reduce(-1, 4), 3);
        assert_eq!(reduce(i64::MIN, 1024), (i64::MIN).rem_euclid(1024) as u32);
    }
}
