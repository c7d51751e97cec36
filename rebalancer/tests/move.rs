//! `rebalance move` through the real binary: a hash bucket moves between two real PostgreSQL shards while
//! writers insert and update keys of that bucket through two routers at a steady rate.
//!
//! Checked (writers use the simple and extended protocols, and psql's `\copy`): no writer sees an error;
//! every acknowledged insert is on the target once and every acknowledged update is counted once; nothing of
//! the bucket is left on the source; no replication slot, publication or subscription is left; both routers send the bucket to its new owner. Printed: the freeze window as the
//! writers saw it (the extra wait of statements held during the cutover).

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use integration::{Cluster, PgServer};
use shardmap::hash::{hash_key, reduce};
use shardmap::KeyValue;

const BUCKETS: u32 = 16;

fn rebalance(config: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rebalance"))
        .args(["--config", config])
        .args(args)
        .output()
        .expect("the rebalance binary")
}

fn bucket_of(k: i64) -> u32 {
    reduce(hash_key(&KeyValue::Int(k)), BUCKETS)
}

/// What a writer saw.
#[derive(Default)]
struct Seen {
    inserted: Vec<i64>,
    updates: HashMap<i64, i32>,
    errors: Vec<String>,
    latencies: Vec<(Instant, Duration)>,
}

/// Through one router: inserts new keys of `bucket` (simple protocol) and updates preloaded ones (extended),
/// plus inserts elsewhere, every 5 ms, until `stop` (or 60 s / 20,000 statements).
async fn writer(
    client: tokio_postgres::Client,
    conn: String,
    stop: Arc<AtomicBool>,
    fresh: Vec<i64>,
    preloaded: Vec<i64>,
    elsewhere: Vec<i64>,
) -> Seen {
    let mut seen = Seen::default();
    let started = Instant::now();
    let update = client.prepare("UPDATE events SET n = n + 1 WHERE user_id = $1").await.expect("prepare");
    // `notes`' primary key lacks the shard key: its UPDATEs fail on the source under a row-filtered
    // publication unless the move makes its replica identity FULL.
    let note = client.prepare("UPDATE notes SET n = n + 1 WHERE user_id = $1").await.expect("prepare");
    for i in 0..20_000usize {
        if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) || i >= fresh.len() {
            break;
        }
        let t = Instant::now();
        let k = fresh[i];
        // Every tenth key comes by COPY FROM STDIN (split by row in the router).
        let r = if i % 10 == 5 {
            copy_one(&conn, k).await
        } else {
            client
                .simple_query(&format!("INSERT INTO events (user_id, n) VALUES ({k}, 0)"))
                .await
                .map(drop)
                .map_err(|e| format!("{e:?}"))
        };
        match r {
            Ok(()) => seen.inserted.push(k),
            Err(e) => seen.errors.push(format!("insert {k}: {e:?}")),
        }
        // (A COPY's time is mostly starting psql: not a statement's latency.)
        if i % 10 != 5 {
            seen.latencies.push((t, t.elapsed()));
        }
        let t = Instant::now();
        let k = preloaded[i % preloaded.len()];
        match client.execute(&update, &[&k]).await {
            Ok(1) => match client.execute(&note, &[&k]).await {
                Ok(1) => *seen.updates.entry(k).or_default() += 1,
                Ok(n) => seen.errors.push(format!("update of note {k}: {n} rows")),
                Err(e) => seen.errors.push(format!("update of note {k}: {e:?}")),
            },
            Ok(n) => seen.errors.push(format!("update {k}: {n} rows")),
            Err(e) => seen.errors.push(format!("update {k}: {e:?}")),
        }
        seen.latencies.push((t, t.elapsed()));
        let k = elsewhere[i % elsewhere.len()];
        if let Err(e) = client.execute("UPDATE events SET n = n + 1 WHERE user_id = $1", &[&k]).await {
            seen.errors.push(format!("update elsewhere {k}: {e:?}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    seen
}

/// One row by `COPY ... FROM STDIN` in the simple protocol (psql's `\copy`), through the router at `conn`.
async fn copy_one(conn: &str, k: i64) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut psql = tokio::process::Command::new("psql")
        .args([conn, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", "\\copy events (user_id, n) FROM STDIN"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("psql: {e}"))?;
    let mut stdin = psql.stdin.take().expect("piped");
    stdin.write_all(format!("{k}\t0\n").as_bytes()).await.map_err(|e| e.to_string())?;
    drop(stdin);
    let out = psql.wait_with_output().await.map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> Result<i64> {
    Ok(db.query_one(sql, &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_moves_under_writes_through_two_routers() -> Result<()> {
    let servers = (0..2).map(|_| PgServer::start_with(&["wal_level=logical"])).collect::<Result<Vec<_>>>()?;
    let nodes: String =
        servers.iter().enumerate().map(|(i, s)| format!("shard-node-{i},{}\n", s.url("postgres"))).collect();
    let head = format!(
        "shard-strategy,hash\nshard-count,2\nshard-key,user_id\nshard-algorithm,hash-buckets\nshard-buckets,{BUCKETS}\n\
         shard-table-profiles,id\nrouter-auth,trust\nrebalance-max-freeze-ms,5000\n"
    );
    let first = Cluster::with_servers(servers, &head, |i, s| format!("shard-node-{i},{}\n", s.url("postgres")))?;
    // A second router in front of the same shards.
    let second = Cluster::with_servers(Vec::new(), &format!("{head}{nodes}"), |_, _| String::new())?;
    let config = first.config_path.display().to_string();

    // Bucket `b` is on node 0 (bucket b's first owner is b % 2).
    let b = 4u32;
    let keys: Vec<i64> = (1..).filter(|k| bucket_of(*k) == b).take(3200).collect();
    let (preloaded, fresh) = keys.split_at(200);
    let elsewhere: Vec<i64> = (1..).filter(|k| bucket_of(*k) != b).take(100).collect();
    let c = first.client().await?;
    c.batch_execute(
        "CREATE TABLE events (user_id bigint PRIMARY KEY, n int NOT NULL);
         CREATE TABLE notes (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id bigint NOT NULL, n int NOT NULL);
         CREATE TABLE profiles (id bigint PRIMARY KEY, user_id bigint, n int NOT NULL)",
    )
    .await?;
    for k in preloaded.iter().chain(&elsewhere) {
        c.execute("INSERT INTO events (user_id, n) VALUES ($1, 0)", &[k]).await?;
        c.execute("INSERT INTO notes (user_id, n) VALUES ($1, 0)", &[k]).await?;
        // A table keyed by its own column (shard-table-profiles,id); its user_id is another user's.
        c.execute("INSERT INTO profiles (id, user_id, n) VALUES ($1, $2, 0)", &[k, &(k + 1)]).await?;
    }

    // Bulk: more rows of the bucket, written on its node directly (keys from 10,000,000: apart from the ones
    // the writers use), so that the copy takes a while under the writes.
    let shard0 = first.shards[0].client("postgres").await?;
    let slot = shardmap::hash::sql_slot_expr("k", shardmap::KeyType::Int, BUCKETS);
    let bulk = shard0
        .execute(
            &format!("INSERT INTO events SELECT k, 0 FROM generate_series(10000000, 10800000) k WHERE {slot} = {b}"),
            &[],
        )
        .await? as i64;

    // Both routers follow the catalog (they made and seeded it on their first start).
    let t = Instant::now();
    let catalog = loop {
        if let Ok(cat) = first.shards[0].client("gb_shard_catalog").await {
            let live = "SELECT count(*) FROM gb_routers WHERE seen > now() - interval '2 s' AND version > 0";
            if count(&cat, live).await.unwrap_or(0) == 2 {
                break cat;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the routers did not register in the catalog");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let stop = Arc::new(AtomicBool::new(false));
    let half = fresh.len() / 2;
    let writers = vec![
        tokio::spawn(writer(
            first.client().await?,
            first.conn_str(),
            stop.clone(),
            fresh[..half].to_vec(),
            preloaded[..100].to_vec(),
            elsewhere.clone(),
        )),
        tokio::spawn(writer(
            second.client().await?,
            second.conn_str(),
            stop.clone(),
            fresh[half..].to_vec(),
            preloaded[100..].to_vec(),
            elsewhere.clone(),
        )),
    ];
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let move_started = Instant::now();
    let unit = format!("bucket:{b}");
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        let unit = unit.clone();
        move || rebalance(&config, &["move", &unit, "--to", "1", "--json"])
    })
    .await?;
    let move_ended = Instant::now();
    assert!(
        out.status.success(),
        "rebalance move: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let outcome: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(outcome["state"], "done", "{outcome}");
    // Writes go on a little on the new owner, then stop.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Seen::default();
    for w in writers {
        let s = w.await?;
        seen.inserted.extend(s.inserted);
        for (k, n) in s.updates {
            *seen.updates.entry(k).or_default() += n;
        }
        seen.errors.extend(s.errors);
        seen.latencies.extend(s.latencies);
    }
    // The freeze window as the writers saw it: latencies of statements that ran during the move.
    let mut during: Vec<Duration> =
        seen.latencies.iter().filter(|(t, _)| *t >= move_started && *t <= move_ended).map(|(_, d)| *d).collect();
    during.sort();
    let q = |p: f64| during.get(((during.len() as f64 - 1.0) * p) as usize).copied().unwrap_or_default();
    println!(
        "move of {unit}: {:.1} s, {} rows, frozen {} ms (the rebalancer's figure); statements during the move: {}, latency p50 {:?} p99 {:?} max {:?}",
        outcome["seconds"].as_f64().unwrap_or(0.0),
        outcome["rows"],
        outcome["freeze_ms"],
        during.len(),
        q(0.5),
        q(0.99),
        during.last().copied().unwrap_or_default()
    );
    assert!(seen.errors.is_empty(), "writers saw errors: {:?}", seen.errors);
    assert!(seen.inserted.len() > 100, "the writers made too little progress");

    // Every acknowledged write is on the target once; nothing of the bucket is left on the source.
    let shard1 = first.shards[1].client("postgres").await?;
    let slot = shardmap::hash::sql_slot_expr("user_id", shardmap::KeyType::Int, BUCKETS);
    let on_target: HashMap<i64, i32> = shard1
        .query(&format!("SELECT user_id, n FROM events WHERE {slot} = {b}"), &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let missing: Vec<&i64> = seen.inserted.iter().filter(|k| !on_target.contains_key(k)).collect();
    assert!(missing.is_empty(), "{} acknowledged inserts are not on the target: {missing:?}", missing.len());
    for k in preloaded {
        let expected = seen.updates.get(k).copied().unwrap_or(0);
        assert_eq!(on_target.get(k).copied(), Some(expected), "key {k}: acknowledged updates {expected}");
        let note: i32 = shard1.query_one("SELECT n FROM notes WHERE user_id = $1", &[k]).await?.get(0);
        assert_eq!(note, expected, "note of key {k}");
    }
    // `profiles` moved by its own key column: the bucket's ids are all on the target, none on the source.
    let by_id = shardmap::hash::sql_slot_expr("id", shardmap::KeyType::Int, BUCKETS);
    let profiles = format!("SELECT count(*) FROM profiles WHERE {by_id} = {b}");
    assert_eq!(count(&shard1, &profiles).await?, preloaded.len() as i64, "profiles of the bucket on the target");
    assert_eq!(count(&shard0, &profiles).await?, 0, "profiles of the bucket left on the source");
    // The replica identity the move set on `notes` is back to the default.
    let ident: String =
        shard0.query_one("SELECT relreplident::text FROM pg_class WHERE relname = 'notes'", &[]).await?.get(0);
    assert_eq!(ident, "d");
    assert_eq!(
        on_target.len() as i64,
        bulk + (preloaded.len() + seen.inserted.len()) as i64,
        "rows of the bucket on the target"
    );
    assert_eq!(count(&shard0, &format!("SELECT count(*) FROM events WHERE {slot} = {b}")).await?, 0);
    // Other buckets stayed where they were.
    let stayed = elsewhere.iter().filter(|k| bucket_of(**k).is_multiple_of(2)).count() as i64;
    assert_eq!(count(&shard0, &format!("SELECT count(*) FROM events WHERE {slot} <> {b}")).await?, stayed);
    // No replication left behind.
    assert_eq!(count(&shard0, "SELECT count(*) FROM pg_replication_slots").await?, 0, "a slot leaked");
    assert_eq!(count(&shard0, "SELECT count(*) FROM pg_publication").await?, 0, "a publication leaked");
    assert_eq!(count(&shard1, "SELECT count(*) FROM pg_subscription").await?, 0, "a subscription leaked");
    // The catalog says so, and both routers route the bucket to its new owner.
    let owner: String = catalog.query_one("SELECT node FROM gb_units WHERE unit = $1", &[&unit]).await?.get(0);
    assert_eq!(owner, "1");
    for (i, router) in [&first, &second].into_iter().enumerate() {
        let c = router.client().await?;
        let k = 1_000_000_000 + 1_000_000 * i as i64;
        let k = (k..).find(|k| bucket_of(*k) == b).expect("a key");
        c.execute("INSERT INTO events (user_id, n) VALUES ($1, 7)", &[&k]).await?;
        assert_eq!(count(&shard1, &format!("SELECT count(*) FROM events WHERE user_id = {k}")).await?, 1);
    }
    // `shard-router explain` answers from the live catalog: the new owner; --offline, from config.csv: the old.
    let sql = format!("SELECT * FROM events WHERE user_id = {}", preloaded[0]);
    for (offline, owner, source) in [(false, "1", "catalog"), (true, "0", "config")] {
        let (config, sql) = (config.clone(), sql.clone());
        let (j, routed) = tokio::task::spawn_blocking(move || {
            let q = router::explain::Question { offline, ..Default::default() };
            router::explain::explain(std::path::Path::new(&config), q, &sql)
        })
        .await??;
        assert!(routed, "{j}");
        assert_eq!(j["shards"], serde_json::json!([owner]), "offline {offline}: {j}");
        assert_eq!(j["source"], source, "{j}");
    }
    // The guard refuses a stale write on the old owner.
    let stale = shard0.execute("INSERT INTO events (user_id, n) VALUES ($1, 0)", &[&fresh[0]]).await;
    let e = stale.expect_err("the guard refuses the bucket's rows on the old owner");
    assert_eq!(e.code().map(|c| c.code()), Some("55R01"), "{e}");

    let out = rebalance(&config, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&format!("{unit} on 1")) && text.contains("done"), "{text}");
    let out = rebalance(&config, &["verify", &unit]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("1: ") && text.contains("(owner)"), "{text}");

    // Ids from each node's own sequence collide across nodes (a table made on each node directly: through
    // the router its sequences would be interleaved): the move refuses before copying anything, and says why
    // (rather than a copy that fails for ever).
    for node in [&shard0, &shard1] {
        node.batch_execute("CREATE TABLE clash (id bigserial PRIMARY KEY, user_id bigint NOT NULL)").await?;
    }
    let b2 = 6u32; // on node 0
    for k in (1..).filter(|k| bucket_of(*k) == b2).take(5).chain((1..).filter(|k| bucket_of(*k) % 2 == 1).take(5)) {
        c.execute("INSERT INTO clash (user_id) VALUES ($1)", &[&k]).await?;
    }
    let out = rebalance(&config, &["move", &format!("bucket:{b2}"), "--to", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("rolled back") && err.contains("already exist on 1") && err.contains("clash"), "{err}");
    assert_eq!(count(&shard0, "SELECT count(*) FROM pg_replication_slots").await?, 0, "a slot leaked");
    assert_eq!(count(&shard0, "SELECT count(*) FROM pg_publication").await?, 0, "a publication leaked");
    assert_eq!(count(&shard1, "SELECT count(*) FROM pg_subscription").await?, 0, "a subscription leaked");
    let owner: String =
        catalog.query_one("SELECT node FROM gb_units WHERE unit = $1", &[&format!("bucket:{b2}")]).await?.get(0);
    assert_eq!(owner, "0");
    println!("a move whose keys collide on the target: {}", err.trim());
    Ok(())
}

/// A rebalancer run in the background, killed (SIGKILL) and reaped when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// Polls `sql` on `db` until it returns true (30 s at most).
async fn until(db: &tokio_postgres::Client, sql: &str, what: &str) -> Result<()> {
    let t = Instant::now();
    loop {
        if db.query_opt(sql, &[]).await?.is_some_and(|r| r.get::<_, Option<bool>>(0) == Some(true)) {
            return Ok(());
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// No replication objects of a move on either node.
async fn no_leftovers(source: &tokio_postgres::Client, target: &tokio_postgres::Client) -> Result<()> {
    assert_eq!(count(source, "SELECT count(*) FROM pg_replication_slots").await?, 0, "a slot leaked");
    assert_eq!(count(source, "SELECT count(*) FROM pg_publication").await?, 0, "a publication leaked");
    assert_eq!(count(target, "SELECT count(*) FROM pg_subscription").await?, 0, "a subscription leaked");
    Ok(())
}

/// The rebalancer killed during the copy, then resumed; killed during a cutover (a router that never
/// acknowledges holds it open), then aborted; a cutover that routers do not acknowledge rolls back by itself.
/// A writer goes on through the router all along and sees no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_moves_resume_or_abort_and_unacknowledged_cutovers_roll_back() -> Result<()> {
    let head = format!(
        "shard-strategy,hash\nshard-count,2\nshard-key,user_id\nshard-algorithm,hash-buckets\nshard-buckets,{BUCKETS}\n\
         router-auth,trust\nrebalance-max-freeze-ms,1500\n"
    );
    let servers = (0..2).map(|_| PgServer::start_with(&["wal_level=logical"])).collect::<Result<Vec<_>>>()?;
    let cluster = Cluster::with_servers(servers, &head, |i, s| format!("shard-node-{i},{}\n", s.url("postgres")))?;
    let config = cluster.config_path.display().to_string();
    let (b1, b2) = (2u32, 6u32); // both on node 0 at first
    let c = cluster.client().await?;
    c.batch_execute(
        "CREATE TABLE events (user_id bigint PRIMARY KEY, n int NOT NULL);
         CREATE TABLE notes (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id bigint NOT NULL, n int NOT NULL)",
    )
    .await?;
    let shard0 = cluster.shards[0].client("postgres").await?;
    let shard1 = cluster.shards[1].client("postgres").await?;
    let slot = shardmap::hash::sql_slot_expr("k", shardmap::KeyType::Int, BUCKETS);
    shard0
        .execute(
            &format!("INSERT INTO events SELECT k, 0 FROM generate_series(10000000, 11600000) k WHERE {slot} IN ({b1}, {b2})"),
            &[],
        )
        .await?;
    let t = Instant::now();
    let catalog = loop {
        if let Ok(cat) = cluster.shards[0].client("gb_shard_catalog").await {
            if count(&cat, "SELECT count(*) FROM gb_routers WHERE version > 0").await.unwrap_or(0) == 1 {
                break cat;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the router did not register in the catalog");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let keys = |b: u32| (1..).filter(move |k| bucket_of(*k) == b);
    let stop = Arc::new(AtomicBool::new(false));
    let fresh: Vec<i64> = keys(b1).take(3000).zip(keys(b2).take(3000)).flat_map(|(x, y)| [x, y]).collect();
    let preloaded: Vec<i64> = keys(b1).skip(3000).take(20).chain(keys(b2).skip(3000).take(20)).collect();
    for k in &preloaded {
        c.execute("INSERT INTO events (user_id, n) VALUES ($1, 0)", &[k]).await?;
        c.execute("INSERT INTO notes (user_id, n) VALUES ($1, 0)", &[k]).await?;
    }
    let elsewhere: Vec<i64> = (1..).filter(|k| ![b1, b2].contains(&bucket_of(*k))).take(50).collect();
    for k in &elsewhere {
        c.execute("INSERT INTO events (user_id, n) VALUES ($1, 0)", &[k]).await?;
    }
    let w = tokio::spawn(writer(
        cluster.client().await?,
        cluster.conn_str(),
        stop.clone(),
        fresh,
        preloaded.clone(),
        elsewhere,
    ));
    let spawn = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rebalance"))
            .args(["--config", &config])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(Running)
            .expect("the rebalance binary")
    };

    // 1. Killed during the copy, then resumed.
    let unit1 = format!("bucket:{b1}");
    let child = spawn(&["move", &unit1, "--to", "1"]);
    until(&shard1, "SELECT EXISTS (SELECT 1 FROM pg_subscription)", "the subscription").await?;
    until(&catalog, "SELECT bool_or(state = 'copying') FROM gb_moves WHERE finished IS NULL", "copying").await?;
    drop(child); // kill -9
    let out = rebalance(&config, &["resume", "--json"]);
    assert!(out.status.success(), "resume: {}", String::from_utf8_lossy(&out.stderr));
    let o: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!((o["unit"].as_str(), o["state"].as_str()), (Some(unit1.as_str()), Some("done")), "{o}");
    no_leftovers(&shard0, &shard1).await?;
    println!("killed during the copy, resumed: {o}");

    // 2. A router that never acknowledges (alive: its heartbeat goes on) keeps the cutover waiting; the
    //    rebalancer is killed then, with the bucket frozen; abort rolls it back.
    catalog.execute("INSERT INTO gb_routers (id, addr, version) VALUES ('stuck', 'nowhere', 1)", &[]).await?;
    let beating = Arc::new(AtomicBool::new(true));
    let heartbeat = {
        let beating = beating.clone();
        let cat = cluster.shards[0].client("gb_shard_catalog").await?;
        tokio::spawn(async move {
            while beating.load(Ordering::Relaxed) {
                cat.execute("UPDATE gb_routers SET seen = now() WHERE id = 'stuck'", &[]).await.ok();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let unit2 = format!("bucket:{b2}");
    let child = spawn(&["move", &unit2, "--to", "1"]);
    until(&catalog, &format!("SELECT frozen FROM gb_units WHERE unit = '{unit2}'"), "the freeze").await?;
    // One rebalancer at a time (replication runs one way at a time): a second one is refused, status 3.
    let busy = rebalance(&config, &["move", &unit1, "--to", "0"]);
    assert_eq!(busy.status.code(), Some(3), "{}", String::from_utf8_lossy(&busy.stderr));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("another rebalancer"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(child); // kill -9
    let out = rebalance(&config, &["abort", "--json"]);
    assert!(out.status.success(), "abort: {}", String::from_utf8_lossy(&out.stderr));
    let o: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(o["state"], "aborted", "{o}");
    no_leftovers(&shard0, &shard1).await?;
    let frozen: bool = catalog.query_one("SELECT frozen FROM gb_units WHERE unit = $1", &[&unit2]).await?.get(0);
    assert!(!frozen, "abort thaws the bucket");
    let cond = shardmap::hash::sql_slot_expr("user_id", shardmap::KeyType::Int, BUCKETS);
    assert_eq!(count(&shard1, &format!("SELECT count(*) FROM events WHERE {cond} = {b2}")).await?, 0);
    println!("killed during the cutover, aborted: {o}");

    // 3. Not killed: the cutover that is not acknowledged within rebalance-max-freeze-ms rolls back.
    let t = Instant::now();
    let out = rebalance(&config, &["move", &unit2, "--to", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rolled back") && err.contains("stuck"), "{err}");
    println!("unacknowledged cutover rolled back after {:?}", t.elapsed());
    no_leftovers(&shard0, &shard1).await?;

    // 4. The stuck router goes silent (not live after 3 s): the move goes through.
    beating.store(false, Ordering::Relaxed);
    heartbeat.await?;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let out = rebalance(&config, &["move", &unit2, "--to", "1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    no_leftovers(&shard0, &shard1).await?;

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = w.await?;
    assert!(seen.errors.is_empty(), "the writer saw errors: {:?}", seen.errors);
    let mut lat: Vec<Duration> = seen.latencies.iter().map(|(_, d)| *d).collect();
    lat.sort();
    println!("writer: {} statements, max latency {:?}", lat.len(), lat.last().copied().unwrap_or_default());
    // Everything acknowledged is on node 1, once; nothing of the two buckets is left on node 0.
    for k in &seen.inserted {
        assert_eq!(count(&shard1, &format!("SELECT count(*) FROM events WHERE user_id = {k}")).await?, 1, "key {k}");
    }
    for k in &preloaded {
        let n: i32 = shard1.query_one("SELECT n FROM events WHERE user_id = $1", &[k]).await?.get(0);
        assert_eq!(n, seen.updates.get(k).copied().unwrap_or(0), "key {k}");
    }
    assert_eq!(count(&shard0, &format!("SELECT count(*) FROM events WHERE {cond} IN ({b1}, {b2})")).await?, 0);
    Ok(())
}
