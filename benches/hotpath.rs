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

/// `iters` runs of the work `setup(t)` makes for thread `t`, on `threads` threads started together: the
/// longest thread's time (so the time per run of each thread, when they run at once).
fn at_once<W: FnMut(u64)>(threads: u64, iters: u64, setup: impl Fn(u64) -> W + Sync) -> std::time::Duration {
    let start = std::sync::Barrier::new(threads as usize);
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..threads)
            .map(|t| {
                let (setup, start) = (&setup, &start);
                s.spawn(move || {
                    let mut work = setup(t);
                    start.wait();
                    let t0 = std::time::Instant::now();
                    for i in 0..iters {
                        work(i);
                    }
                    t0.elapsed()
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).max().unwrap()
    })
}

/// The same decision made by two threads at once on one planner, as the router's worker threads make them:
/// the time per decision of each thread. What the threads share on the way (a lock, a reference count, a
/// counter) shows here as the difference with the one-thread case.
fn shapes_on_two_threads(c: &mut Criterion) {
    let config = Config::parse("bench.csv", b"shard-strategy,hash\nshard-count,4\nshard-key,aid\n").unwrap();
    let planner = Planner::new(Arc::new(ShardMap::new(&config).unwrap()));
    for threads in [1u64, 2] {
        c.bench_function(&format!("simple/pgbench -S decision, {threads} thread(s) at once"), |b| {
            b.iter_custom(|iters| {
                at_once(threads, iters, |t| {
                    let (planner, session) = (&planner, Session::default());
                    let texts: Vec<String> = (0..64)
                        .map(|k| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {};", k * 7919 + t))
                        .collect();
                    move |i| {
                        let sql = &texts[(i % 64) as usize];
                        black_box(planner.decide_simple(black_box(sql), &session).unwrap());
                    }
                })
            })
        });
    }
}

/// A statement's figures recorded (`Stats::record`, once per statement) by one thread, and by two at once.
fn stats_on_two_threads(c: &mut Criterion) {
    let stats = router::backend::stats::Stats::new(1);
    for threads in [1u64, 2] {
        c.bench_function(&format!("stats/record, {threads} thread(s) at once"), |b| {
            b.iter_custom(|iters| {
                at_once(threads, iters, |_| {
                    let stats = &stats;
                    move |i| stats.record(0, std::time::Duration::from_micros(black_box(i % 300)), false)
                })
            })
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = framing, shapes, shapes_on_two_threads, stats_on_two_threads
}
criterion_main!(benches);
