//! The bucket of a key computed in Rust equals the bucket PostgreSQL computes with its built-in hash
//! functions (`shardmap::hash::sql_slot_expr`), on thousands of integer, bigint, uuid and text keys. The
//! rebalancer relies on this to select a bucket's rows on the server.

use integration::PgServer;
use shardmap::hash::{hash_key, reduce, sql_hash_expr, sql_slot_expr};
use shardmap::{KeyType, KeyValue};

/// A small deterministic generator (xorshift64*), so a failure reproduces.
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

const N: usize = 3000;
const BUCKETS: u32 = 1024;

#[tokio::test(flavor = "current_thread")]
async fn rust_and_postgres_agree_on_every_key_type() -> anyhow::Result<()> {
    let pg = PgServer::start()?;
    let db = pg.client("postgres").await?;
    db.batch_execute("CREATE TABLE k (n serial, i int4, b int8, u uuid, t text)").await?;

    let mut g = Gen(0x5eed);
    let mut ints = Vec::with_capacity(N);
    let mut bigs = Vec::with_capacity(N);
    let mut uuids = Vec::with_capacity(N);
    let mut texts = Vec::with_capacity(N);
    let samples = [
        "",
        "a",
        "acme",
        "gb_tenant_acme",
        "ção",
        "日本語のテキスト",
        "emoji 🎉",
        "with\ttab",
        "a much longer text key that spans several twelve-byte blocks",
    ];
    for n in 0..N {
        let r = g.next();
        // Edge values first, then random ones (small, negative, full range).
        let i = match n {
            0 => 0,
            1 => i32::MIN,
            2 => i32::MAX,
            3 => -1,
            _ if n % 3 == 0 => (r % 1000) as i32,
            _ => r as i32,
        };
        let b = match n {
            0 => 0,
            1 => i64::MIN,
            2 => i64::MAX,
            3 => -1,
            4 => i64::from(i32::MAX) + 1,
            _ if n % 2 == 0 => (r >> 20) as i64 - (1 << 43),
            _ => r as i64,
        };
        let mut ub = [0u8; 16];
        ub[..8].copy_from_slice(&g.next().to_le_bytes());
        ub[8..].copy_from_slice(&g.next().to_le_bytes());
        let t = if n < samples.len() {
            samples[n].to_string()
        } else {
            let len = (g.next() % 40) as usize;
            (0..len).map(|_| char::from(b' ' + (g.next() % 94) as u8)).collect()
        };
        ints.push(i);
        bigs.push(b);
        uuids.push(KeyValue::Uuid(ub).to_string());
        texts.push(t);
    }
    db.execute(
        "INSERT INTO k (i, b, u, t) SELECT * FROM unnest($1::int4[], $2::int8[], $3::text[]::uuid[], $4::text[])",
        &[&ints, &bigs, &uuids, &texts],
    )
    .await?;

    let sql = format!(
        "SELECT {}, {}, {}, {}, {}, {}, {}, {}, hashint4extended(i, 0) = {} FROM k ORDER BY n",
        sql_hash_expr("i", KeyType::Int),
        sql_hash_expr("b", KeyType::Int),
        sql_hash_expr("u", KeyType::Uuid),
        sql_hash_expr("t", KeyType::Text),
        sql_slot_expr("i", KeyType::Int, BUCKETS),
        sql_slot_expr("b", KeyType::Int, BUCKETS),
        sql_slot_expr("u", KeyType::Uuid, BUCKETS),
        sql_slot_expr("t", KeyType::Text, BUCKETS),
        sql_hash_expr("i", KeyType::Int),
    );
    let rows = db.query(&sql, &[]).await?;
    assert_eq!(rows.len(), N);
    let mut checked = 0;
    for (n, row) in rows.iter().enumerate() {
        let keys = [
            KeyValue::Int(i64::from(ints[n])),
            KeyValue::Int(bigs[n]),
            KeyValue::parse_uuid(&uuids[n]).unwrap(),
            KeyValue::Text(texts[n].clone().into()),
        ];
        for (c, key) in keys.iter().enumerate() {
            let sql_hash: i64 = row.get(c);
            let sql_slot: i64 = row.get(c + 4);
            assert_eq!(hash_key(key), sql_hash, "hash of {key:?}");
            assert_eq!(i64::from(reduce(hash_key(key), BUCKETS)), sql_slot, "bucket of {key:?}");
            checked += 1;
        }
        let int4_native: bool = row.get(8);
        assert!(int4_native, "hashint4extended and hashint8extended differ for {}", ints[n]);
    }
    eprintln!("{checked} keys: Rust and PostgreSQL agree");
    Ok(())
}
