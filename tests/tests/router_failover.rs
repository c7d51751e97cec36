//! Failover while clients write through the router at a steady rate, in the simple and the extended protocol:
//! - without Patroni: a node URL with two hosts (a primary and its streaming standby); the primary is stopped
//!   and the standby promoted;
//! - under a real Patroni cluster (etcd, two PostgreSQL nodes, synchronous mode): a planned `patronictl
//!   switchover`, then a `kill -9` of the leader's Patroni and PostgreSQL; and the two-phase commit decision
//!   log, kept on shard 0, following shard 0's switchover.
//!
//! The router finds the new primary by itself, statements that arrive in between wait for it instead of
//! failing, and every acknowledged row is on the new primary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use integration::{Cluster, PgServer};

/// What a writer saw: acknowledged keys, errors, latencies.
type Written = (Vec<i64>, Vec<String>, Vec<Duration>);

/// Writes `INSERT`s through the router until `stop` or the bounds, keys from `first` up, in the simple
/// protocol or (`extended`) with a parameter; returns (acknowledged keys, errors, latencies).
async fn writer(
    client: tokio_postgres::Client,
    stop: Arc<std::sync::atomic::AtomicBool>,
    first: i64,
    extended: bool,
) -> Written {
    let (mut acked, mut errors, mut lat) = (Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    for i in first..first + 20_000 {
        if stop.load(std::sync::atomic::Ordering::Relaxed) || start.elapsed() > Duration::from_secs(60) {
            break;
        }
        let t = Instant::now();
        let r = if extended {
            client.execute("INSERT INTO events (user_id, n) VALUES ($1, 1)", &[&i]).await.map(drop)
        } else {
            client.simple_query(&format!("INSERT INTO events (user_id, n) VALUES ({i}, 0)")).await.map(drop)
        };
        match r {
            Ok(()) => acked.push(i),
            Err(e) => errors.push(format!("{i}: {e:?}")),
        }
        lat.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (acked, errors, lat)
}

fn report(what: &str, lat: &mut [Duration]) {
    lat.sort();
    let p = |q: f64| lat.get(((lat.len() as f64 - 1.0) * q) as usize).copied().unwrap_or_default();
    println!(
        "{what}: {} statements, stall p50 {:?} p99 {:?} max {:?}",
        lat.len(),
        p(0.5),
        p(0.99),
        lat.last().copied().unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_node_follows_a_promoted_standby() -> Result<()> {
    let primary = PgServer::start()?;
    primary.client("postgres").await?.batch_execute("CREATE TABLE events (user_id bigint PRIMARY KEY, n int)").await?;
    let standby = primary.standby()?;
    let head = format!(
        "shard-strategy,hash\nshard-count,1\nshard-key,user_id\nrouter-auth,trust\npatroni-interval-ms,200\n\
         shard-node-0,postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres\n",
        primary.port, standby.port
    );
    let cluster = Cluster::with_servers(Vec::new(), &head, |_, _| String::new())?;
    // The first statements find the primary among the two hosts.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let simple = tokio::spawn(writer(cluster.client().await?, stop.clone(), 0, false));
    let extended = tokio::spawn(writer(cluster.client().await?, stop.clone(), 1_000_000, true));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The primary goes away (fast shutdown: its sessions get 57P01); the standby is promoted a second later.
    let failover = tokio::task::spawn_blocking(move || -> Result<(PgServer, Instant)> {
        primary.stop("fast")?;
        let stopped = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        standby.promote()?;
        drop(primary);
        Ok((standby, stopped))
    });
    let (new_primary, stopped) = failover.await??;
    let promoted = stopped.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut acked, mut errors, mut lat) = simple.await?;
    let (acked_x, errors_x, mut lat_x) = extended.await?;
    println!("promoted {promoted:?} after the stop");
    report("multi-host failover, simple protocol", &mut lat);
    report("multi-host failover, extended protocol", &mut lat_x);
    acked.extend(acked_x);
    errors.extend(errors_x);

    assert!(errors.is_empty(), "statements failed during the failover: {errors:?}");
    assert!(acked.len() > 400, "the writer made too little progress: {}", acked.len());
    let db = new_primary.client("postgres").await?;
    let rows = db.query("SELECT user_id FROM events", &[]).await?;
    let on_new: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let lost: Vec<i64> = acked.iter().filter(|k| !on_new.contains(k)).copied().collect();
    assert!(lost.is_empty(), "{} acknowledged rows are missing on the new primary: {lost:?}", lost.len());
    // Writes after the failover went to the new primary through the router.
    let c = cluster.client().await?;
    c.simple_query("INSERT INTO events (user_id, n) VALUES (-1, -1)").await?;
    assert_eq!(db.query_one("SELECT n FROM events WHERE user_id = -1", &[]).await?.get::<_, i32>(0), -1);
    Ok(())
}

/// A commit waiting for a synchronous standby when the primary shuts down has committed on that server, but
/// PostgreSQL closes the session without answering (a 57P01 warning, then end of stream). The router must not
/// retry it on the next primary (it would run twice) nor call it a broken connection: the client gets 40003
/// (statement_completion_unknown), and the row is there exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_cut_by_a_shutdown_is_reported_as_unknown() -> Result<()> {
    // A synchronous standby that never comes: every commit waits until the shutdown.
    let primary = PgServer::start_with(&["synchronous_standby_names=nobody"])?;
    primary
        .client("postgres")
        .await?
        .batch_execute("SET synchronous_commit = local; CREATE TABLE events (user_id bigint PRIMARY KEY, n int)")
        .await?;
    // Two hosts (the second never answers): the node is followed, the path on which statements are retried.
    let head = format!(
        "shard-strategy,hash\nshard-count,1\nshard-key,user_id\nrouter-auth,trust\npatroni-interval-ms,200\n\
         shard-node-0,postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres\n",
        primary.port,
        integration::free_port()
    );
    let mut cluster = Cluster::with_servers(vec![primary], &head, |_, _| String::new())?;
    let client = cluster.client().await?;
    let simple =
        tokio::spawn(
            async move { client.simple_query("INSERT INTO events (user_id, n) VALUES (1, 0)").await.map(drop) },
        );
    let client = cluster.client().await?;
    let extended = tokio::spawn(async move {
        client.execute("INSERT INTO events (user_id, n) VALUES ($1, 1)", &[&2i64]).await.map(drop)
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    if simple.is_finished() || extended.is_finished() {
        panic!("the commits did not wait for the standby: {:?} {:?}", simple.await?, extended.await?);
    }
    tokio::task::block_in_place(|| cluster.shards[0].stop("fast"))?;
    for (what, task) in [("simple", simple), ("extended", extended)] {
        let e = tokio::time::timeout(Duration::from_secs(30), task).await??.expect_err("the commit was cut");
        let db = e.as_db_error().unwrap_or_else(|| panic!("{what}: not a server error: {e:?}"));
        assert_eq!(db.code().code(), "40003", "{what}: {db:?}");
        assert!(db.message().contains("committing the statement locally"), "{what}: {}", db.message());
    }
    tokio::task::block_in_place(|| cluster.shards[0].restart())?;
    let db = cluster.shards[0].client("postgres").await?;
    let rows: Vec<(i64, i32)> =
        db.query("SELECT user_id, n FROM events ORDER BY 1", &[]).await?.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows, vec![(1, 0), (2, 1)], "each cut commit is there, once");
    Ok(())
}

/// The keys in `events` on the server at `conn_str`.
async fn keys_on(conn_str: &str) -> Result<std::collections::HashSet<i64>> {
    let (db, conn) = tokio_postgres::connect(conn_str, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let rows = db.query("SELECT user_id FROM events", &[]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Stops the writers, checks that every acknowledged row is on `server`, and returns the errors seen.
async fn finish(
    writers: Vec<tokio::task::JoinHandle<Written>>,
    stop: &std::sync::atomic::AtomicBool,
    conn_str: &str,
    what: &str,
) -> Result<Vec<String>> {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut acked, mut errors) = (Vec::new(), Vec::new());
    for (i, w) in writers.into_iter().enumerate() {
        let (a, e, mut lat) = w.await?;
        report(&format!("{what}, {} protocol", if i == 0 { "simple" } else { "extended" }), &mut lat);
        assert!(a.len() > 100, "a writer made too little progress: {} statements", a.len());
        acked.extend(a);
        errors.extend(e);
    }
    let on_new = keys_on(conn_str).await?;
    let lost: Vec<i64> = acked.iter().filter(|k| !on_new.contains(k)).copied().collect();
    assert!(lost.is_empty(), "{what}: {} acknowledged rows are missing on the new primary: {lost:?}", lost.len());
    println!("{what}: {} acknowledged rows, all on the new primary; {} statements failed", acked.len(), errors.len());
    Ok(errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_patroni_through_switchover_and_kill() -> Result<()> {
    let mut patroni = tokio::task::spawn_blocking(|| integration::patroni::PatroniCluster::start(2)).await??;
    let leader = patroni.wait_leader(Duration::from_secs(30))?;
    let first = &patroni.members[patroni.member_index(&leader)];
    let leader_conn = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", first.pg_port);
    let (db, conn) = tokio_postgres::connect(&leader_conn, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    db.batch_execute("CREATE TABLE events (user_id bigint PRIMARY KEY, n int)").await?;
    // The node's URL names the first leader only: Patroni tells the router where the primary is after that.
    let head = format!(
        "shard-strategy,hash\nshard-count,1\nshard-key,user_id\nrouter-auth,trust\npatroni-interval-ms,200\n\
         shard-node-0,postgres://postgres@127.0.0.1:{}/postgres\nshard-node-0-patroni,{}\n",
        first.pg_port,
        patroni.api_urls().join(",")
    );
    let cluster = Cluster::with_servers(Vec::new(), &head, |_, _| String::new())?;

    // 1. Planned switchover: no client statement fails.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = vec![
        tokio::spawn(writer(cluster.client().await?, stop.clone(), 0, false)),
        tokio::spawn(writer(cluster.client().await?, stop.clone(), 1_000_000, true)),
    ];
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let candidate = patroni.members.iter().find(|m| m.name != leader).expect("two members").name.clone();
    let (p, l, c) = (&patroni, leader.clone(), candidate.clone());
    let out = tokio::task::block_in_place(|| p.switchover(&l, &c))?;
    println!("{}", out.lines().last().unwrap_or_default());
    let (new_leader, _) = tokio::task::block_in_place(|| patroni.wait_new_leader(&leader, Duration::from_secs(60)))?;
    assert_eq!(new_leader, candidate);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let new_conn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        patroni.members[patroni.member_index(&new_leader)].pg_port
    );
    let errors = finish(writers, &stop, &new_conn, "patroni switchover").await?;
    // No statement fails, with one exception PostgreSQL itself makes: a commit that was waiting for the
    // synchronous standby when the old primary shut down has committed there, but the server closes the
    // session without answering (a 57P01 warning, then end of stream). Nobody can tell the client its row
    // count, so the router reports 40003 (statement_completion_unknown) — never retrying it, which could apply
    // it twice — and Patroni's graceful switchover carries the row to the new primary.
    let on_new = keys_on(&new_conn).await?;
    for e in &errors {
        let key: i64 = e.split(':').next().and_then(|k| k.parse().ok()).unwrap_or(-1);
        assert!(
            e.contains("E40003") && on_new.contains(&key),
            "a statement failed during the switchover: {e} (its row is {}on the new primary)",
            if on_new.contains(&key) { "" } else { "not " }
        );
    }
    assert!(errors.len() <= 2, "more statements failed than were in flight at the shutdown: {errors:?}");
    // The old leader comes back as a replica (synchronous mode needs one for the next failover).
    tokio::task::block_in_place(|| {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            let v = patroni.cluster_json().unwrap_or_default();
            let ok = v["members"].as_array().is_some_and(|ms| {
                ms.iter().any(|m| {
                    m["name"] == leader.as_str()
                        && m["role"] == "sync_standby"
                        && matches!(m["state"].as_str(), Some("running" | "streaming"))
                })
            });
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        anyhow::bail!("the old leader did not rejoin as a synchronous standby\n{}", patroni.logs())
    })?;

    // 2. kill -9 of the leader's Patroni and PostgreSQL: only statements in flight at the kill may fail.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = vec![
        tokio::spawn(writer(cluster.client().await?, stop.clone(), 2_000_000, false)),
        tokio::spawn(writer(cluster.client().await?, stop.clone(), 3_000_000, true)),
    ];
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let victim = patroni.member_index(&new_leader);
    let killed = Instant::now();
    tokio::task::block_in_place(|| patroni.kill_member(victim))?;
    let (third, published) =
        tokio::task::block_in_place(|| patroni.wait_new_leader(&new_leader, Duration::from_secs(60)))?;
    // The first write through the router that succeeds after Patroni named the new leader.
    let probe = cluster.client().await?;
    let mut k = 9_000_000i64;
    let first_ok = loop {
        k += 1;
        if probe.simple_query(&format!("INSERT INTO events (user_id, n) VALUES ({k}, 9)")).await.is_ok() {
            break Instant::now();
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "no write succeeded within 60 s of the kill");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!(
        "kill -9: Patroni named {third} {:?} after the kill; first write through the router {:?} after the kill ({:?} after the new leader was published)",
        published - killed,
        first_ok - killed,
        first_ok.saturating_duration_since(published)
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let third_conn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        patroni.members[patroni.member_index(&third)].pg_port
    );
    let errors = finish(writers, &stop, &third_conn, "patroni kill -9").await?;
    // Each writer has at most one statement in flight at the kill.
    assert!(errors.len() <= 2, "more than the statements in flight failed: {errors:?}");
    assert!(
        first_ok.saturating_duration_since(published) < Duration::from_secs(2),
        "the router took more than 2 s after Patroni published the new leader"
    );
    drop(cluster);
    drop(patroni);
    Ok(())
}

/// Fencing without Patroni: a standby promoted while the old primary still runs (a split brain) makes two
/// hosts say they are the primary; the router holds writes rather than pick one, fails them after the
/// buffer window with a clear error, and resumes on the new primary once the old one is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_holds_writes() -> Result<()> {
    let old = PgServer::start()?;
    old.client("postgres").await?.batch_execute("CREATE TABLE events (user_id bigint PRIMARY KEY, n int)").await?;
    let new = old.standby()?;
    let head = format!(
        "shard-strategy,hash\nshard-count,1\nshard-key,user_id\nrouter-auth,trust\npatroni-interval-ms,100\n\
         failover-buffer-window-ms,1500\nshard-node-0,postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres\n",
        old.port, new.port
    );
    let cluster = Cluster::with_servers(Vec::new(), &head, |_, _| String::new())?;
    let c = cluster.client().await?;
    c.simple_query("INSERT INTO events (user_id, n) VALUES (1, 1)").await?;

    tokio::task::block_in_place(|| new.promote())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let e = c.simple_query("INSERT INTO events (user_id, n) VALUES (2, 2)").await.unwrap_err();
    let db = e.as_db_error().expect("an error from the router");
    assert_eq!(db.code().code(), "08001", "{e:?}");
    assert!(db.message().contains("no primary"), "{}", db.message());
    assert!(t.elapsed() >= Duration::from_millis(1400), "the write was held for the buffer window: {:?}", t.elapsed());
    for server in [&old, &new] {
        let n: i64 = server
            .client("postgres")
            .await?
            .query_one("SELECT count(*) FROM events WHERE user_id = 2", &[])
            .await?
            .get(0);
        assert_eq!(n, 0, "a held write reached no server");
    }

    // The old primary goes away: the new one (on a newer timeline) gets the writes.
    tokio::task::block_in_place(|| old.stop("fast"))?;
    c.simple_query("INSERT INTO events (user_id, n) VALUES (3, 3)").await?;
    let n: i64 = new
        .client("postgres")
        .await?
        .query_one("SELECT count(*) FROM events WHERE user_id IN (1, 3)", &[])
        .await?
        .get(0);
    assert_eq!(n, 2);
    Ok(())
}

/// Patroni's REST API over HTTPS (`patroni-ca-file`): the node URL names the replica, so only Patroni can
/// tell the router where to write; with the CA that signed the API's certificate it does, and with another
/// CA the router trusts no answer (no primary: the statement fails after the failover buffer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_patroni_over_https() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_path_buf();
    use integration::certs;
    certs::ca(&d, "ca");
    certs::ca(&d, "other");
    certs::signed(&d, "ca", "api", "IP:127.0.0.1,DNS:localhost");
    certs::for_server(&d, "api");
    let (cert, key) = (d.join("api.crt"), d.join("api.key"));
    let patroni =
        tokio::task::spawn_blocking(move || integration::patroni::PatroniCluster::start_tls(2, &cert, &key)).await??;
    let leader = patroni.wait_leader(Duration::from_secs(30))?;
    let replica = patroni.members.iter().find(|m| m.name != leader).expect("two members");
    assert!(patroni.api_urls()[0].starts_with("https://"));
    let head = |ca: &str| {
        format!(
            "shard-strategy,hash\nshard-count,1\nshard-key,user_id\nrouter-auth,trust\npatroni-interval-ms,200\n\
             failover-buffer-window-ms,2000\npatroni-ca-file,{}\n\
             shard-node-0,postgres://postgres@127.0.0.1:{}/postgres\nshard-node-0-patroni,{}\n",
            d.join(ca).display(),
            replica.pg_port,
            patroni.api_urls().join(",")
        )
    };
    let cluster = Cluster::with_servers(Vec::new(), &head("ca.crt"), |_, _| String::new())?;
    let db = cluster.client().await?;
    db.batch_execute("CREATE TABLE t (user_id bigint PRIMARY KEY)").await?;
    db.execute("INSERT INTO t VALUES (1)", &[]).await?;
    drop(cluster);
    let wrong = Cluster::with_servers(Vec::new(), &head("other.crt"), |_, _| String::new())?;
    let started = std::time::Instant::now();
    let r = match wrong.client().await {
        Ok(db) => db.execute("INSERT INTO t VALUES (2)", &[]).await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(r.is_err(), "a router that cannot verify Patroni's certificate wrote");
    assert!(started.elapsed() < Duration::from_secs(30));
    Ok(())
}

/// The two-phase commit decision log lives on shard 0's server (no `shard-catalog`); when Patroni switches
/// shard 0 over, the log follows the new primary, and transactions on two shards commit again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_log_follows_a_patroni_switchover() -> Result<()> {
    let patroni = tokio::task::spawn_blocking(|| integration::patroni::PatroniCluster::start(2)).await??;
    let leader = patroni.wait_leader(Duration::from_secs(30))?;
    let first = patroni.members[patroni.member_index(&leader)].pg_port;
    let plain = PgServer::start()?;
    for url in [format!("host=127.0.0.1 port={first} user=postgres dbname=postgres"), plain.conn_str("postgres")] {
        let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        db.batch_execute("CREATE TABLE kv (user_id bigint PRIMARY KEY)").await?;
    }
    let head = format!(
        "shard-strategy,hash\nshard-count,2\nshard-key,user_id\nshard-algorithm,modulo\nrouter-auth,trust\n\
         patroni-interval-ms,200\nshard-node-0,postgres://postgres@127.0.0.1:{first}/postgres\n\
         shard-node-0-patroni,{}\n",
        patroni.api_urls().join(",")
    );
    let cluster = Cluster::with_servers(vec![plain], &head, |_, s| format!("shard-node-1,{}\n", s.url("postgres")))?;
    // Keys 2n and 2n+1: one on each shard.
    async fn both(db: &tokio_postgres::Client, n: i64) -> Result<(), tokio_postgres::Error> {
        db.batch_execute("BEGIN").await?;
        db.execute("INSERT INTO kv VALUES ($1)", &[&(2 * n)]).await?;
        db.execute("INSERT INTO kv VALUES ($1)", &[&(2 * n + 1)]).await?;
        db.batch_execute("COMMIT").await
    }
    let db = cluster.client().await?;
    both(&db, 0).await?;

    let candidate = patroni.members.iter().find(|m| m.name != leader).expect("two members").name.clone();
    tokio::task::block_in_place(|| patroni.switchover(&leader, &candidate))?;
    let (new_leader, _) = tokio::task::block_in_place(|| patroni.wait_new_leader(&leader, Duration::from_secs(60)))?;
    // Transactions may fail while the switchover is under way; soon after, they commit again.
    let started = Instant::now();
    let mut n = 1;
    loop {
        let last = match cluster.client().await {
            Ok(db) => match both(&db, n).await {
                Ok(()) => break,
                Err(e) => format!("{e:?}"),
            },
            Err(e) => e.to_string(),
        };
        n += 1;
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no transaction on two shards committed within 30 s of the switchover; the last error: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its rows are on both shards: the new primary of shard 0 and shard 1.
    let new_port = patroni.members[patroni.member_index(&new_leader)].pg_port;
    let url = format!("host=127.0.0.1 port={new_port} user=postgres dbname=postgres");
    let (db0, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let (db1, conn) = tokio_postgres::connect(&cluster.shards[0].conn_str("postgres"), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    async fn on(db: &tokio_postgres::Client, k: i64) -> Result<bool, tokio_postgres::Error> {
        db.query_opt("SELECT 1 FROM kv WHERE user_id = $1", &[&k]).await.map(|r| r.is_some())
    }
    assert!(on(&db0, 2 * n).await? && on(&db1, 2 * n + 1).await?, "the committed transaction's rows are missing");
    println!("a transaction on two shards committed {:?} after the switchover", started.elapsed());
    drop(cluster);
    drop(patroni);
    Ok(())
}
