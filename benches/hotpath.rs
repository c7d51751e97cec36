//! Pieces of the proxy's hot path, without sockets: framing server responses out of a read buffer, and the
//! simple protocol's statement shape (literals out, cached analysis, decision with the literals).
//!
//! Run: `cargo bench -p benches --bench hotpath`

use std::hint::black_box;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion};
use router::net::wire::split_frame;
use shardmap::{Config, Planner, Session, ShardMap};

/// A pgbench -S answer: RowDescription, DataRow, CommandComplete, ReadyForQuery.
fn select_answer() -> Vec<u8> {
    let mut b = BytesMut::new();
    let mut put = |tag: u8, body: &[u8]| {
        b.put_u8(tag);
        b.put_i32(body.len() as i32 + 4);
        b.put_slice(body);
    };
    put(b'T', b"\x00\x01abalance\x00\x00\x00\x40\x06\x00\x03\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00");
    put(b'D', b"\x00\x01\x00\x00\x00\x041234");
    put(b'C', b"SELECT 1\x00");
    put(b'Z', b"I");
    b.to_vec()
}

fn framing(c: &mut Criterion) {
    let answer = select_answer();
    let mut buf = BytesMut::with_capacity(64 << 10);
    c.bench_function("wire/split 4-message answer", |b| {
        b.iter(|| {
            buf.extend_from_slice(&answer);
            let mut n = 0;
            while let Some(m) = split_frame(&mut buf).unwrap() {
                n += m.frame.len();
            }
            black_box(n)
        })
    });
}

fn shapes(c: &mut Criterion) {
    let config = Config::parse("bench.csv", b"shard-strategy,hash\nshard-count,4\nshard-key,aid\n").unwrap();
    let planner = Planner::new(Arc::new(ShardMap::new(&config).unwrap()));
    let session = Session::default();
    let mut aid = 0u64;
    c.bench_function("simple/pgbench -S text, new literal each time", |b| {
        b.iter(|| {
            aid = (aid + 7919) % 1_000_000;
            let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};");
            black_box(planner.decide_simple(black_box(&sql), &session).unwrap())
        })
    });
    c.bench_function("simple/normalize only", |b| {
        b.iter(|| {
            black_box(shardmap::shape::normalize(black_box("SELECT abalance FROM pgbench_accounts WHERE aid = 4242;")))
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = framing, shapes
}
criterion_main!(benches);
