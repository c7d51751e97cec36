//! Pool checkout and checkin (the semaphore, the idle stack, the cancel registration), on connections to a
//! real PostgreSQL server that the benchmark starts; the connections are made before measuring, so this is
//! the per-statement cost of borrowing one and giving it back. `kept`: the same with the connection kept by
//! its client between transactions (its `Parking`), the path a client takes while nobody waits.
//!
//! Run: `cargo bench -p benches --bench pool`

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use localpg::PgServer;
use router::backend::cancel::Slot;
use router::backend::conn::Target;
use router::backend::pool::{Parking, PoolKey, Pools, Settings};
use shardmap::ShardId;

fn pool(c: &mut Criterion) {
    let pg = PgServer::start().expect("a local PostgreSQL (see the README's prerequisites)");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pools = Pools::new(Settings {
        size: 4,
        timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(600),
        homes: 1,
    });
    let target = Target {
        host: "127.0.0.1".into(),
        port: pg.port,
        user: "postgres".into(),
        password: None,
        database: "postgres".into(),
        tls: Default::default(),
    };
    let pool = pools.pool(PoolKey { shard: ShardId(0), target }, "0");
    let slot = Arc::new(Slot::default());
    // Warm: make the connections once.
    rt.block_on(async {
        let held: Vec<_> = warm(&pool, 4).await;
        for p in held {
            p.release();
        }
    });
    c.bench_function("pool/checkout + checkin", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let mut p = pool.get(0).await.unwrap();
                    p.register_cancel(&slot);
                    p.release();
                }
                start.elapsed()
            })
        })
    });
    let parking = Arc::new(Parking::default());
    c.bench_function("pool/kept: take back + keep", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let mut p = match pool.unpark(&parking) {
                        Some(p) => p,
                        None => {
                            let mut p = pool.get(0).await.unwrap();
                            p.keep_in(&parking);
                            p
                        }
                    };
                    p.register_cancel(&slot);
                    p.release();
                }
                start.elapsed()
            })
        })
    });
    parking.give_back();
    drop(pg);
}

async fn warm(pool: &Arc<router::backend::pool::Pool>, n: usize) -> Vec<router::backend::pool::Pooled> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(pool.get(0).await.unwrap());
    }
    v
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = pool
}
criterion_main!(benches);
