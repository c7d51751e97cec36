//! The routing decision for typical statements: cold (parse + analyse + decide) and cached (a hash lookup in
//! the parse cache plus reading the parameters and placing the key).
//!
//! Run: `cargo bench -p benches --bench decision`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use shardmap::{Config, NoParams, Planner, Session, ShardMap, TextParams};

const CONFIG: &str = "shard-strategy,hash\nshard-count,4\nshard-key,user_id\nshard-algorithm,hash-buckets\nshard-global-tables,bots,tools\n";

/// (name, statement, text parameters). The first is about 200 bytes, the size the targets are set for.
const STATEMENTS: &[(&str, &str, &[&str])] = &[
    (
        "select_200b",
        "SELECT m.id, m.role, m.content, m.created_at FROM message_history m JOIN user_sessions s ON s.id = m.session_id WHERE m.user_id = $1 AND s.active ORDER BY m.created_at DESC LIMIT 50",
        &["12345"],
    ),
    ("pgbench_select", "SELECT abalance FROM pgbench_accounts WHERE user_id = $1", &["4242"]),
    ("insert", "INSERT INTO message_history (user_id, session_id, role, content) VALUES ($1, $2, $3, $4) RETURNING id", &["77", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "user", "hello"]),
    ("update_literal", "UPDATE user_sessions SET last_seen = now() WHERE user_id = 12345 AND id = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", &[]),
    ("begin", "BEGIN", &[]),
];

fn planner() -> Planner {
    let c = Config::parse("bench.csv", CONFIG.as_bytes()).unwrap();
    Planner::new(Arc::new(ShardMap::new(&c).unwrap()))
}

fn decision(c: &mut Criterion) {
    let p = planner();
    let session = Session::default();
    let mut g = c.benchmark_group("decision");
    for (name, sql, params) in STATEMENTS {
        let params = TextParams(params.iter().map(|s| Some(s.to_string())).collect());
        g.bench_function(format!("cold/{name}"), |b| {
            b.iter(|| {
                let a = p.analyze_uncached(black_box(sql));
                black_box(p.decide_analyzed(&a, &params, &session).unwrap());
            })
        });
        p.decide(sql, &params, &session).unwrap();
        g.bench_function(format!("cached/{name}"), |b| {
            b.iter(|| black_box(p.decide(black_box(sql), &params, &session).unwrap()))
        });
    }
    // A prepared statement's analysis is held by the router: only parameters and placement remain.
    let sql = STATEMENTS[1].1;
    let a = p.analyze(sql);
    let params = TextParams(vec![Some("4242".into())]);
    g.bench_function("prepared/pgbench_select", |b| {
        b.iter(|| black_box(p.decide_analyzed(&a, &params, &session).unwrap()))
    });
    g.bench_function("cached/no_params_select_1", |b| {
        b.iter(|| black_box(p.decide("SELECT 1", &NoParams, &session).unwrap()))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = decision
}
criterion_main!(benches);
