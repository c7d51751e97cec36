//! The cost of a transaction on two shards (two-phase commit) against one on one shard, measured side by side
//! through the router (the release binary `shard-router`, beside this one) in front of two PostgreSQL
//! servers: `BEGIN; UPDATE ... WHERE user_id = a; UPDATE ... WHERE user_id = b; COMMIT` with `a` and `b` on
//! the same shard, then on two shards; also a single `UPDATE ... WHERE user_id IN (a, b)` on two shards.
//! Rounds alternate the kinds so that machine noise falls on both. Prints transactions per second and
//! latency percentiles per kind, and the two-shard/one-shard ratios.
//!
//! `cargo build --release -p router -p benches && target/release/twophase [--clients N] [--seconds S] [--rounds R]`

use std::time::{Duration, Instant};

use anyhow::Result;
use benches::start_router;
use localpg::PgServer;

async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    OneShard,
    TwoShards,
    InList,
}

const ROWS: i64 = 10_000;

/// Runs `kind` from `clients` connections for `secs`: each transaction's latency.
async fn round(url: &str, kind: Kind, clients: usize, secs: u64) -> Result<Vec<Duration>> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let db = connect(&url).await?;
            let one = db.prepare("UPDATE accounts SET balance = balance + 1 WHERE user_id = $1").await?;
            let list = db.prepare("UPDATE accounts SET balance = balance + 1 WHERE user_id IN ($1, $2)").await?;
            let mut lat = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(secs);
            let mut n = c as i64;
            while Instant::now() < deadline {
                // Even keys on shard 0, odd on shard 1 (modulo 2); clients apart from each other.
                n = (n + clients as i64) % (ROWS / 2);
                let a = 2 * n;
                let b = if kind == Kind::OneShard { (a + 2 * clients as i64) % ROWS } else { a + 1 };
                let t = Instant::now();
                if kind == Kind::InList {
                    db.execute(&list, &[&a, &b]).await?;
                } else {
                    db.batch_execute("BEGIN").await?;
                    db.execute(&one, &[&a]).await?;
                    db.execute(&one, &[&b]).await?;
                    db.batch_execute("COMMIT").await?;
                }
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (clients, secs, rounds) = (arg("--clients", 8) as usize, arg("--seconds", 5), arg("--rounds", 3));
    let shards = [PgServer::start()?, PgServer::start()?];
    for s in &shards {
        let db = connect(&s.url("postgres")).await?;
        db.batch_execute("CREATE TABLE accounts (user_id bigint PRIMARY KEY, balance bigint NOT NULL)").await?;
    }
    let dir = tempfile::tempdir()?;
    let mut config = format!(
        "shard-strategy,hash\nshard-count,2\nshard-key,user_id\nrouter-auth,trust\npool-size,{}\n",
        clients * 2 + 4
    );
    for (i, s) in shards.iter().enumerate() {
        config.push_str(&format!("shard-node-{i},{}\n", s.url("postgres")));
    }
    let (_router, port) = start_router(dir.path(), &config)?;
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let db = connect(&url).await?;
    for k in (0..ROWS).step_by(1000) {
        let values: Vec<String> = (k..k + 1000).map(|u| format!("({u}, 0)")).collect();
        db.batch_execute(&format!("INSERT INTO accounts VALUES {}", values.join(", "))).await?;
    }
    // Warm up (pools, the decision log's database and table).
    for kind in [Kind::OneShard, Kind::TwoShards, Kind::InList] {
        round(&url, kind, clients, 1).await?;
    }
    let kinds = [Kind::OneShard, Kind::TwoShards, Kind::InList];
    let mut results: Vec<Vec<Duration>> = vec![Vec::new(); kinds.len()];
    let mut elapsed = [0f64; 3];
    for _ in 0..rounds {
        for (k, kind) in kinds.iter().enumerate() {
            let t = Instant::now();
            results[k].extend(round(&url, *kind, clients, secs).await?);
            elapsed[k] += t.elapsed().as_secs_f64();
        }
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("two-phase commit cost: 2 shards (PostgreSQL 15, fsync=off), {clients} clients, {rounds} rounds of {secs} s per kind, {cores} cores");
    println!("{:<44} {:>9} {:>9} {:>9} {:>9}", "kind", "tps", "p50 ms", "p90 ms", "p99 ms");
    let mut tps = [0f64; 3];
    for (k, kind) in kinds.iter().enumerate() {
        let mut l = results[k].clone();
        l.sort();
        tps[k] = l.len() as f64 / elapsed[k];
        let name = match kind {
            Kind::OneShard => "BEGIN; 2 UPDATEs on one shard; COMMIT",
            Kind::TwoShards => "BEGIN; 2 UPDATEs on two shards; COMMIT (2PC)",
            Kind::InList => "UPDATE ... user_id IN (a, b) on two shards (2PC)",
        };
        println!("{name:<44} {:>9.0} {:>9.2} {:>9.2} {:>9.2}", tps[k], pct(&l, 0.5), pct(&l, 0.9), pct(&l, 0.99));
    }
    println!("two shards / one shard: {:.2}x the throughput", tps[1] / tps[0]);
    Ok(())
}
