//! `rebalance move tenant:NAME` through the real binary: a tenant's whole database moves to another node
//! while a client of that tenant inserts (serial ids), updates and deletes through the router, including in
//! a table without a primary key (whose UPDATE and DELETE need `REPLICA IDENTITY FULL` while it is
//! published).

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use integration::{Cluster, PgServer};

#[derive(Default)]
struct Seen {
    ids: Vec<i64>,
    bumps: std::collections::HashMap<i64, i32>,
    lines: Vec<String>,
    deleted: Vec<String>,
    errors: Vec<String>,
    max_latency: Duration,
}

async fn writer(client: tokio_postgres::Client, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let started = Instant::now();
    for i in 0..20_000 {
        if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) {
            break;
        }
        let t = Instant::now();
        match client.query_one("INSERT INTO messages (body) VALUES ($1) RETURNING id", &[&format!("m{i}")]).await {
            Ok(r) => seen.ids.push(r.get(0)),
            Err(e) => seen.errors.push(format!("insert: {e:?}")),
        }
        if let Some(&id) = seen.ids.get(i % 50) {
            match client.execute("UPDATE messages SET n = n + 1 WHERE id = $1", &[&id]).await {
                Ok(1) => *seen.bumps.entry(id).or_default() += 1,
                Ok(n) => seen.errors.push(format!("update {id}: {n} rows")),
                Err(e) => seen.errors.push(format!("update {id}: {e:?}")),
            }
        }
        let line = format!("line {i}");
        match client.simple_query(&format!("INSERT INTO log (line) VALUES ('{line}')")).await {
            Ok(_) => seen.lines.push(line),
            Err(e) => seen.errors.push(format!("log: {e:?}")),
        }
        if i % 3 == 0 && i > 0 {
            let gone = format!("line {}", i - 1);
            match client.execute("DELETE FROM log WHERE line = $1", &[&gone]).await {
                Ok(1) => seen.deleted.push(gone),
                Ok(n) => seen.errors.push(format!("delete {gone}: {n} rows")),
                Err(e) => seen.errors.push(format!("delete {gone}: {e:?}")),
            }
        }
        seen.max_latency = seen.max_latency.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_database_moves_under_writes() -> Result<()> {
    let servers = (0..2).map(|_| PgServer::start_with(&["wal_level=logical"])).collect::<Result<Vec<_>>>()?;
    let head = "shard-strategy,tenant\nshard-tenant-db-prefix,gb_tenant_\nrouter-auth,trust\n";
    let names = ["a", "b"];
    let cluster =
        Cluster::with_servers(servers, head, |i, s| format!("shard-node-{},{}\n", names[i], s.url("postgres")))?;
    let config = cluster.config_path.display().to_string();
    let map = shardmap::ShardMap::new(&shardmap::Config::load(&cluster.config_path).map_err(anyhow::Error::msg)?)
        .map_err(anyhow::Error::msg)?;
    let home = map.tenant_shard("acme").0 as usize;
    let (source, target) = (home, 1 - home);

    // acme's database on its node, with a serial key and a table without a primary key.
    let admin = cluster.shards[source].client("postgres").await?;
    admin.batch_execute("CREATE DATABASE gb_tenant_acme").await?;
    let acme = cluster.shards[source].client("gb_tenant_acme").await?;
    acme.batch_execute(
        "CREATE TABLE messages (id bigserial PRIMARY KEY, body text NOT NULL, n int NOT NULL DEFAULT 0);
         CREATE TABLE log (line text);
         INSERT INTO messages (body) SELECT 'old ' || g FROM generate_series(1, 20000) g;",
    )
    .await?;
    // The router has made the catalog on the first node.
    let t = Instant::now();
    while cluster.shards[0].client("gb_shard_catalog").await.is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "no catalog");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let connect = || async {
        let conn = format!("host=127.0.0.1 port={} user=postgres dbname=gb_tenant_acme", cluster.port);
        let (c, conn) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        anyhow::Ok(c)
    };
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(connect().await?, stop.clone()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_rebalance"))
                .args(["--config", &config, "move", "tenant:acme", "--to", names[target], "--json"])
                .output()
        }
    })
    .await??;
    assert!(
        out.status.success(),
        "{}\n{}\ntarget's log:\n{}\nsource's log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cluster.shards[target].log(),
        cluster.shards[source].log()
    );
    let o: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(o["state"], "done", "{o}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = w.await?;
    println!(
        "move of tenant:acme: {} rows, frozen {} ms, {:.1} s; the client's longest statement {:?}; {} inserts, {} deletes",
        o["rows"], o["freeze_ms"], o["seconds"].as_f64().unwrap_or(0.0), seen.max_latency, seen.ids.len(), seen.deleted.len()
    );
    assert!(seen.errors.is_empty(), "the client saw errors: {:?}", seen.errors);
    assert!(seen.ids.len() > 50 && !seen.deleted.is_empty());

    // Everything acknowledged is in the target's database, once; the source's is gone.
    let moved = cluster.shards[target].client("gb_tenant_acme").await?;
    let ids: std::collections::HashSet<i64> =
        moved.query("SELECT id FROM messages WHERE body LIKE 'm%'", &[]).await?.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids.len(), seen.ids.len());
    assert!(seen.ids.iter().all(|i| ids.contains(i)));
    for (id, n) in &seen.bumps {
        let got: i32 = moved.query_one("SELECT n FROM messages WHERE id = $1", &[id]).await?.get(0);
        assert_eq!(got, *n, "message {id}");
    }
    let lines: Vec<String> =
        moved.query("SELECT line FROM log ORDER BY 1", &[]).await?.iter().map(|r| r.get(0)).collect();
    let mut expected: Vec<String> = seen.lines.iter().filter(|l| !seen.deleted.contains(l)).cloned().collect();
    expected.sort();
    assert_eq!(lines, expected);
    let old: i64 = moved.query_one("SELECT count(*) FROM messages WHERE body LIKE 'old %'", &[]).await?.get(0);
    assert_eq!(old, 20000);
    let gone: bool = cluster.shards[source]
        .client("postgres")
        .await?
        .query_one("SELECT NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'gb_tenant_acme')", &[])
        .await?
        .get(0);
    assert!(gone, "the tenant's database is dropped from the source");
    let src = cluster.shards[source].client("postgres").await?;
    assert_eq!(src.query_one("SELECT count(*) FROM pg_replication_slots", &[]).await?.get::<_, i64>(0), 0);
    assert_eq!(moved.query_one("SELECT count(*) FROM pg_subscription", &[]).await?.get::<_, i64>(0), 0);
    // The log table's replica identity is back to its default; the serial goes on past the moved ids.
    let ident: String =
        moved.query_one("SELECT relreplident::text FROM pg_class WHERE relname = 'log'", &[]).await?.get(0);
    assert_eq!(ident, "d");
    let c = connect().await?;
    let next: i64 = c.query_one("INSERT INTO messages (body) VALUES ('after') RETURNING id", &[]).await?.get(0);
    assert!(next > *seen.ids.iter().max().unwrap(), "the sequence continues: {next}");
    let here: i64 = moved.query_one("SELECT count(*) FROM messages WHERE body = 'after'", &[]).await?.get(0);
    assert_eq!(here, 1, "new sessions of the tenant go to its new node");
    let v = Command::new(env!("CARGO_BIN_EXE_rebalance"))
        .args(["--config", &config, "verify", "tenant:acme", "--json"])
        .output()?;
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let v: serde_json::Value = serde_json::from_slice(&v.stdout)?;
    assert_eq!(v["owner"], names[target], "{v}");
    let on = |n: &str| v["nodes"].as_array().unwrap().iter().find(|x| x["node"] == n).unwrap()["rows"].clone();
    assert!(on(names[source]).is_null(), "no database left on the source: {v}");
    assert!(on(names[target]).as_i64() > Some(20000), "{v}");
    // plan knows tenants (by their databases' bytes): draining the new node would move acme back.
    let plan_file = std::env::temp_dir().join(format!("tenant-plan-{}.json", std::process::id()));
    let p = Command::new(env!("CARGO_BIN_EXE_rebalance"))
        .args(["--config", &config, "plan", "--drain", names[target], "--json", "--out"])
        .arg(&plan_file)
        .output()?;
    assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
    let p: serde_json::Value = serde_json::from_slice(&p.stdout)?;
    assert_eq!(p["by"], "bytes", "{p}");
    let moves = p["moves"].as_array().unwrap();
    assert!(moves.iter().any(|m| m["unit"] == "tenant:acme" && m["to"] == names[source]), "{p}");
    std::fs::remove_file(&plan_file)?;
    let rows =
        Command::new(env!("CARGO_BIN_EXE_rebalance")).args(["--config", &config, "plan", "--by", "rows"]).output()?;
    assert_eq!(rows.status.code(), Some(2), "tenants are not planned by rows");
    Ok(())
}
