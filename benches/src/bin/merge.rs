//! Reads combined across shards, measured: 1,000,000 rows on one plain PostgreSQL (direct) and the same
//! rows on four hash shards behind the router (the release binary `shard-router`, beside this one), then
//! ORDER BY ... LIMIT, aggregates and GROUP BY through both, side by side. Prints each query's median time
//! over the rounds, rows scanned per second, and the router's peak RSS after each query (so that memory
//! bounded by the LIMIT, not by the table, shows). The answers are compared first.
//!
//! `cargo build --release -p router -p benches && target/release/merge [--rounds N] [--rows N]`

use std::time::Instant;

use anyhow::{bail, Result};
use benches::start_router;
use localpg::PgServer;

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn connect(port: u16) -> Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    Ok(c)
}

/// The text rows of a simple query.
async fn rows(db: &tokio_postgres::Client, sql: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for m in db.simple_query(sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            out.push((0..r.len()).map(|i| r.get(i).unwrap_or("NULL")).collect::<Vec<_>>().join("|"));
        }
    }
    Ok(out)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (rounds, total) = (arg("--rounds", 5), arg("--rows", 1_000_000));
    let shards = 4u64;
    let plain = PgServer::start()?;
    let nodes: Vec<PgServer> = (0..shards).map(|_| PgServer::start()).collect::<Result<_>>()?;
    let schema = "CREATE TABLE big (user_id bigint NOT NULL, v double precision NOT NULL, payload text NOT NULL)";
    let fill = |filter: &str| {
        format!(
            "INSERT INTO big SELECT k, ((k * 7919) % 1000003)::float8 / 1000.0, md5(k::text) FROM generate_series(1::bigint, {total}) k {filter}; ANALYZE big"
        )
    };
    let direct = plain.client("postgres").await?;
    direct.batch_execute(schema).await?;
    direct.batch_execute(&fill("")).await?;
    for (i, n) in nodes.iter().enumerate() {
        let db = n.client("postgres").await?;
        db.batch_execute(schema).await?;
        db.batch_execute(&fill(&format!("WHERE k % {shards} = {i}"))).await?;
    }
    let dir = tempfile::tempdir()?;
    let mut config = format!("shard-strategy,hash\nshard-count,{shards}\nshard-key,user_id\nrouter-auth,trust\n");
    for (i, n) in nodes.iter().enumerate() {
        config.push_str(&format!("shard-node-{i},{}\n", n.url("postgres")));
    }
    let (router, port) = start_router(dir.path(), &config)?;
    let pid = router.0.id();
    let routed = connect(port).await?;
    println!(
        "{total} rows ({} per shard on {shards} shards); {rounds} rounds; router RSS at start {} KiB",
        total / shards,
        status_kib(pid, "VmRSS:")
    );
    println!("| query | direct (ms) | router, 4 shards (ms) | ratio | rows scanned/s through the router | router peak RSS (KiB) |");
    println!("|---|---|---|---|---|---|");
    let queries = [
        "SELECT user_id, v FROM big ORDER BY v DESC, user_id LIMIT 100",
        "SELECT user_id, v, payload FROM big ORDER BY v, user_id LIMIT 10000",
        "SELECT user_id, v FROM big ORDER BY v DESC, user_id LIMIT 100 OFFSET 50000",
        "SELECT user_id, v FROM big ORDER BY v, user_id LIMIT 100000 OFFSET 100",
        "SELECT user_id, v, payload FROM big ORDER BY v DESC, user_id",
        "SELECT count(*), sum(user_id), avg(user_id), min(payload), max(v) FROM big",
        "SELECT user_id % 10 AS g, count(*), avg(user_id), max(v) FROM big GROUP BY 1 ORDER BY 1",
    ];
    for q in queries {
        let want = rows(&direct, q).await?;
        let got = rows(&routed, q).await?;
        if want != got {
            bail!("{q}: the router's answer differs from the direct one: {got:?} vs {want:?}");
        }
        let mut times = [Vec::new(), Vec::new()];
        for _ in 0..rounds {
            for (k, db) in [&direct, &routed].into_iter().enumerate() {
                let t = Instant::now();
                db.simple_query(q).await?;
                times[k].push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        for t in &mut times {
            t.sort_by(f64::total_cmp);
        }
        let (d, r) = (times[0][times[0].len() / 2], times[1][times[1].len() / 2]);
        println!(
            "| `{q}` | {d:.1} | {r:.1} | {:.2}x | {:.0}k | {} |",
            r / d,
            total as f64 / (r / 1000.0) / 1000.0,
            status_kib(pid, "VmHWM:")
        );
    }
    drop(router);
    Ok(())
}
