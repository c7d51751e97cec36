//! The admin console (`shard_admin`) through the real router: every SHOW command with psql, access limited to
//! `router-admin-users`, and PAUSE/RESUME of one shard while clients keep working.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use integration::Cluster;

/// psql on the admin console as `user`: its rows (`|`-separated) or its error text.
fn admin_psql(cluster: &Cluster, user: &str, sql: &str) -> (bool, String) {
    let out = Command::new("psql")
        .arg(format!("host=127.0.0.1 port={} user={user} dbname=shard_admin", cluster.port))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

async fn admin_client(cluster: &Cluster) -> Result<tokio_postgres::Client> {
    let conn = format!("host=127.0.0.1 port={} user=admin dbname=shard_admin", cluster.port);
    let (client, conn) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_commands_and_pause() -> Result<()> {
    let cluster = Cluster::hash(2, "router-admin-users,admin\n")?;
    let c = cluster.client().await?;
    c.batch_execute("CREATE TABLE notes (user_id bigint, body text)").await?;
    for k in 0..6i64 {
        c.execute("INSERT INTO notes (user_id, body) VALUES ($1, 'x')", &[&k]).await?;
    }

    // Only router-admin-users get in.
    let (ok, text) = admin_psql(&cluster, "postgres", "SHOW SHARDS");
    assert!(!ok && text.contains("may not use the admin console"), "{text}");

    let (ok, text) = admin_psql(&cluster, "admin", "SHOW SHARDS");
    assert!(ok, "{text}");
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert_eq!(rows[0][0], "0");
    assert_eq!(rows[0][1], format!("127.0.0.1:{}", cluster.shards[0].port));
    assert_eq!(rows[0][4], "running");
    assert_eq!(rows[0][5], "closed");
    assert_eq!(rows[0][6], "3", "3 inserts went to shard 0: {text}");

    let (ok, text) = admin_psql(&cluster, "admin", "SHOW POOLS");
    assert!(ok, "{text}");
    // The client keeps its last connection between transactions: it counts as idle, not active.
    assert!(
        text.lines().any(|l| l.starts_with(&format!("0|127.0.0.1:{}|postgres|postgres|0|1|0", cluster.shards[0].port))),
        "{text}"
    );

    let (ok, text) = admin_psql(&cluster, "admin", "SHOW CLIENTS");
    assert!(ok, "{text}");
    assert!(text.lines().any(|l| l.starts_with("postgres|postgres|127.0.0.1:")), "the tokio-postgres client: {text}");
    assert!(text.lines().any(|l| l.starts_with("admin|shard_admin|")), "psql itself: {text}");

    let (ok, text) = admin_psql(&cluster, "admin", "SHOW STATS");
    assert!(ok, "{text}");
    assert!(text.lines().any(|l| l.starts_with("1|3|0|")), "{text}");

    let (ok, text) = admin_psql(&cluster, "admin", "SHOW HELP");
    assert!(ok && text.contains("PAUSE [shard]"), "{text}");
    let (ok, text) = admin_psql(&cluster, "admin", "DROP TABLE notes");
    assert!(!ok && text.contains("unknown admin command"), "{text}");
    let (ok, text) = admin_psql(&cluster, "admin", "PAUSE nine");
    assert!(!ok && text.contains("no shard named"), "{text}");

    // PAUSE 0 under load: a transaction already running on shard 0 finishes (PAUSE waits for it), new
    // statements for shard 0 wait, shard 1 keeps working, and RESUME lets the waiting ones run.
    let admin = admin_client(&cluster).await?;
    let running = cluster.client().await?;
    running.batch_execute("BEGIN").await?;
    running.batch_execute("INSERT INTO notes (user_id, body) VALUES (10, 'in flight')").await?;
    let pause = tokio::spawn(async move { admin.simple_query("PAUSE 0").await.map(|_| admin) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pause.is_finished(), "PAUSE waits for the running transaction");
    running.batch_execute("COMMIT").await?;
    let admin = tokio::time::timeout(Duration::from_secs(5), pause).await???;

    let waiting = cluster.client().await?;
    let blocked =
        tokio::spawn(
            async move { waiting.simple_query("SELECT count(*) FROM notes WHERE user_id = 2").await.map(|_| ()) },
        );
    // The client whose transaction PAUSE waited for kept its connection to shard 0: it waits too.
    let kept =
        tokio::spawn(
            async move { running.simple_query("SELECT count(*) FROM notes WHERE user_id = 10").await.map(|_| ()) },
        );
    // Shard 1 is not paused.
    for k in [1i64, 3, 5] {
        c.execute("INSERT INTO notes (user_id, body) VALUES ($1, 'during pause')", &[&k]).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!blocked.is_finished(), "a statement for a paused shard waits");
    assert!(!kept.is_finished(), "a statement for a paused shard waits, on a connection its client kept too");
    let (_, text) = admin_psql(&cluster, "admin", "SHOW SHARDS");
    assert!(text.lines().next().is_some_and(|l| l.split('|').nth(4) == Some("paused")), "{text}");
    admin.simple_query("RESUME 0").await?;
    tokio::time::timeout(Duration::from_secs(5), blocked).await???;
    tokio::time::timeout(Duration::from_secs(5), kept).await???;
    // Nothing was lost.
    // (A read without a key runs on every shard: one count per shard.)
    let n: i64 = c.query("SELECT count(*) FROM notes", &[]).await?.iter().map(|r| r.get::<_, i64>(0)).sum();
    assert_eq!(n, 6 + 1 + 3);
    Ok(())
}

/// RELOAD under load: a client keeps writing through the router while the config changes; live settings take
/// effect (a new admin user, the circuit breaker), structural ones are named as needing a restart, and a
/// broken file leaves the running config in place. No client statement fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_without_dropping_clients() -> Result<()> {
    let cluster = Cluster::hash(2, "router-admin-users,admin\n")?;
    let c = cluster.client().await?;
    c.batch_execute("CREATE TABLE notes (user_id bigint, body text)").await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let c = cluster.client().await?;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 50_000 {
                c.execute("INSERT INTO notes (user_id, body) VALUES ($1, 'w')", &[&n]).await?;
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            anyhow::Ok(n)
        })
    };
    let (ok, text) = admin_psql(&cluster, "ops", "SHOW SHARDS");
    assert!(!ok && text.contains("may not use the admin console"), "{text}");

    // Live settings: a second admin user and the circuit breaker; a structural one: shard-count.
    let changed = format!(
        "{}router-admin-users,admin,ops\ncircuit-breaker-enabled,true\n",
        cluster.config.replace("router-admin-users,admin\n", "")
    );
    std::fs::write(&cluster.config_path, &changed)?;
    let (ok, text) = admin_psql(&cluster, "admin", "RELOAD");
    assert!(ok, "{text}");
    let (ok, text) = admin_psql(&cluster, "ops", "SHOW SHARDS");
    assert!(ok, "the reloaded admin user gets in: {text}");

    std::fs::write(
        &cluster.config_path,
        changed.replace("shard-count,2", "shard-count,3") + "shard-node-2,postgres://postgres@127.0.0.1:1/postgres\n",
    )?;
    let (ok, text) = admin_psql(&cluster, "admin", "RELOAD");
    assert!(ok && text.contains("not applied until a restart: shard-count, shard-node-<name>"), "{text}");
    let (_, text) = admin_psql(&cluster, "admin", "SHOW SHARDS");
    assert_eq!(text.lines().count(), 2, "the shard map is the running one: {text}");

    std::fs::write(&cluster.config_path, "shard-strategy,hash\nshard-count,two\n")?;
    let (ok, text) = admin_psql(&cluster, "admin", "RELOAD");
    assert!(!ok && text.contains("the running config is kept") && text.contains("shard-count"), "{text}");
    let (ok, text) = admin_psql(&cluster, "ops", "SHOW STATS");
    assert!(ok, "the running config (with ops) is still in place: {text}");

    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await??;
    assert!(written > 20, "the writer kept going: {written}");
    let total: i64 = c.query("SELECT count(*) FROM notes", &[]).await?.iter().map(|r| r.get::<_, i64>(0)).sum();
    assert_eq!(total, written, "every acknowledged row is there");
    Ok(())
}
