//! Global tables stay identical on every shard: an INSERT whose defaults or values are volatile
//! (`gen_random_uuid()`, `clock_timestamp()`, a sequence) through every protocol path, in and out of
//! transactions, with RETURNING and ON CONFLICT, leaves the same rows on every shard; copies that already
//! differ make the INSERT fail and leave nothing anywhere; writes whose effect cannot be made identical are
//! refused. Sequences, advisory locks and notifications, which one PostgreSQL holds once for every client,
//! are the first shard's.

use integration::wire::{error_codes, outline, Path, RawClient, Reply, PATHS};
use integration::Cluster;

/// Every shard's copy of `automations`, as text rows.
async fn copies(c: &Cluster) -> anyhow::Result<Vec<Vec<String>>> {
    let mut out = Vec::new();
    for s in &c.shards {
        let db = s.client("postgres").await?;
        let rows =
            db.query("SELECT id::text, name, created_at::text, n::text FROM automations ORDER BY n", &[]).await?;
        out.push(
            rows.iter()
                .map(|r| {
                    format!(
                        "{}|{}|{}|{}",
                        r.get::<_, String>(0),
                        r.get::<_, String>(1),
                        r.get::<_, String>(2),
                        r.get::<_, String>(3)
                    )
                })
                .collect(),
        );
    }
    Ok(out)
}

fn run(cl: &mut RawClient, path: Path, sql: &str) -> anyhow::Result<Vec<Reply>> {
    let mut r = cl.send(path, sql)?;
    if path == Path::Pipelined {
        r.extend(cl.sync()?);
    }
    Ok(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_tables_stay_identical() -> anyhow::Result<()> {
    let c = Cluster::hash(3, "shard-global-tables,automations\n")?;
    let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    let r = cl.query(
        "CREATE TABLE automations (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), name text NOT NULL, \
         created_at timestamptz NOT NULL DEFAULT clock_timestamp(), n bigserial UNIQUE)",
    )?;
    assert!(error_codes(&r).is_empty(), "{r:?}");

    for (k, path) in PATHS.into_iter().enumerate() {
        // Defaults evaluated once: the same uuid, time and sequence value on every shard.
        let r = run(&mut cl, path, &format!("INSERT INTO automations (name) VALUES ('a{k}'), ('b{k}')"))?;
        assert_eq!(error_codes(&r), Vec::<String>::new(), "{path:?}: {r:?}");
        assert!(outline(&r).contains(&"INSERT 0 2".to_string()), "{path:?}: {r:?}");
        // Volatile calls in the statement too; RETURNING answers with the rows every shard holds.
        let r = run(
            &mut cl,
            path,
            &format!("INSERT INTO automations (id, name) VALUES (gen_random_uuid(), 'c{k}') RETURNING id, name"),
        )?;
        let returned: Vec<&Reply> = r.iter().filter(|x| matches!(x, Reply::Row(_))).collect();
        assert_eq!(returned.len(), 1, "{path:?}: {r:?}");
        let Reply::Row(v) = returned[0] else { unreachable!() };
        let id = v[0].clone().expect("an id");
        let copies = copies(&c).await?;
        assert!(copies.iter().all(|x| *x == copies[0]), "{path:?}: the copies differ: {copies:?}");
        assert!(copies[0].iter().any(|row| row.starts_with(&id)), "{path:?}: {id} not in {copies:?}");
        // An upsert: the updated row is the same everywhere.
        let r = run(
            &mut cl,
            path,
            &format!("INSERT INTO automations (id, name) VALUES ('{id}', 'x') ON CONFLICT (id) DO UPDATE SET name = automations.name || '!', created_at = clock_timestamp()"),
        )?;
        assert_eq!(error_codes(&r), Vec::<String>::new(), "{path:?}: {r:?}");
    }
    let all = copies(&c).await?;
    assert!(all.iter().all(|x| *x == all[0]), "the copies differ: {all:?}");
    assert_eq!(all[0].len(), 12);
    assert_eq!(all[0].iter().filter(|r| r.contains("|c") && r.contains("!|")).count(), 4, "{all:?}");

    // In a transaction (held BEGIN, then the all-shards transaction), committed together.
    for path in PATHS {
        let mut r = run(&mut cl, Path::Simple, "BEGIN")?;
        r.extend(run(&mut cl, path, "INSERT INTO automations (name) VALUES ('in a transaction')")?);
        r.extend(run(&mut cl, Path::Simple, "COMMIT")?);
        assert_eq!(error_codes(&r), Vec::<String>::new(), "{path:?}: {r:?}");
    }
    let all = copies(&c).await?;
    assert!(all.iter().all(|x| *x == all[0]), "the copies differ: {all:?}");
    assert_eq!(all[0].len(), 16);

    // Copies that already differ: the INSERT fails and leaves nothing on any shard.
    let stray = "00000000-0000-0000-0000-000000000001";
    c.shards[1]
        .client("postgres")
        .await?
        .execute(&format!("INSERT INTO automations (id, name, n) VALUES ('{stray}', 'only here', 1000000)"), &[])
        .await?;
    for path in PATHS {
        let r = run(
            &mut cl,
            path,
            &format!("INSERT INTO automations (id, name) VALUES ('{stray}', 'dup') ON CONFLICT DO NOTHING"),
        )?;
        assert_eq!(error_codes(&r), vec!["55000"], "{path:?}: {r:?}");
        for (i, s) in c.shards.iter().enumerate() {
            let n: i64 = s
                .client("postgres")
                .await?
                .query_one(&format!("SELECT count(*) FROM automations WHERE id = '{stray}'"), &[])
                .await?
                .get(0);
            assert_eq!(n, i64::from(i == 1), "{path:?}: shard {i}");
        }
    }
    let r = cl.query("SELECT 1")?;
    assert_eq!(error_codes(&r), Vec::<String>::new(), "the session goes on: {r:?}");

    // UPDATE and DELETE: the transaction's clock is read once; counts that disagree undo the statement.
    let r = cl.query(&format!("UPDATE automations SET name = 'x' WHERE id = '{stray}'"))?;
    assert_eq!(error_codes(&r), vec!["55000"], "{r:?}");
    let stray_name: String = c.shards[1]
        .client("postgres")
        .await?
        .query_one(&format!("SELECT name FROM automations WHERE id = '{stray}'"), &[])
        .await?
        .get(0);
    assert_eq!(stray_name, "only here", "the disagreeing UPDATE was undone");
    c.shards[1]
        .client("postgres")
        .await?
        .execute(&format!("DELETE FROM automations WHERE id = '{stray}'"), &[])
        .await?;
    for path in PATHS {
        let r =
            run(&mut cl, path, "UPDATE automations SET created_at = now(), name = name || '.' WHERE name LIKE 'a%'")?;
        assert!(outline(&r).contains(&"UPDATE 4".to_string()), "{path:?}: {r:?}");
        let mut r = run(&mut cl, Path::Simple, "BEGIN")?;
        r.extend(run(
            &mut cl,
            path,
            "DELETE FROM automations WHERE name = 'in a transaction' AND n = (SELECT max(n) FROM automations)",
        )?);
        r.extend(run(&mut cl, Path::Simple, "COMMIT")?);
        assert_eq!(error_codes(&r), Vec::<String>::new(), "{path:?}: {r:?}");
    }
    let all = copies(&c).await?;
    assert!(all.iter().all(|x| *x == all[0]), "the copies differ: {all:?}");
    assert_eq!(all[0].len(), 12, "{all:?}");

    // What cannot be made identical is refused.
    for sql in [
        "UPDATE automations SET id = gen_random_uuid()",
        "DELETE FROM automations WHERE random() < 0.5",
        "UPDATE automations SET created_at = clock_timestamp()",
    ] {
        let r = cl.query(sql)?;
        assert_eq!(error_codes(&r), vec!["0A000"], "{sql}: {r:?}");
    }
    Ok(())
}

/// The value of the first row's first column among replies.
fn first_value(r: &[Reply]) -> Option<String> {
    r.iter().find_map(|x| match x {
        Reply::Row(v) => v.first().cloned().flatten(),
        _ => None,
    })
}

/// Sequences, advisory locks and notifications, which one PostgreSQL holds once for every client, are the
/// first shard's: `nextval` hands out one series through every protocol path (each shard has its own `s`),
/// `setval` sets the one `nextval` reads, every notification reaches the listeners there, and
/// transaction-level advisory locks exclude each other whatever shard the transaction writes on, until the
/// writes they guard are committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_locks_and_notifications_are_one() -> anyhow::Result<()> {
    let c = Cluster::hash(3, "")?;
    let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    let r = cl.query("CREATE SEQUENCE s; CREATE TABLE counters (user_id bigint PRIMARY KEY, n int NOT NULL)")?;
    assert!(error_codes(&r).is_empty(), "{r:?}");

    // One series, as one PostgreSQL would hand out.
    let mut got = Vec::new();
    for path in PATHS {
        let mut r = Vec::new();
        for _ in 0..4 {
            r.extend(cl.send(path, "SELECT nextval('s')")?);
        }
        if path == Path::Pipelined {
            r.extend(cl.sync()?);
        }
        assert!(error_codes(&r).is_empty(), "{path:?}: {r:?}");
        got.extend(r.iter().filter_map(|x| match x {
            Reply::Row(v) => v[0].clone(),
            _ => None,
        }));
    }
    let want: Vec<String> = (1..=16).map(|n| n.to_string()).collect();
    assert_eq!(got, want, "nextval through every path");
    for (k, path) in PATHS.into_iter().enumerate() {
        let base = 100 * (k + 1);
        let r = run(&mut cl, path, &format!("SELECT setval('s', {base})"))?;
        assert_eq!(first_value(&r).as_deref(), Some(base.to_string().as_str()), "{path:?}: {r:?}");
        let r = run(&mut cl, path, "SELECT nextval('s')")?;
        assert_eq!(first_value(&r), Some((base + 1).to_string()), "{path:?}: {r:?}");
        // In a transaction, currval answers for the connection that called nextval.
        let mut r = run(&mut cl, Path::Simple, "BEGIN")?;
        r.extend(run(&mut cl, path, "SELECT nextval('s')")?);
        let cur = run(&mut cl, path, "SELECT currval('s')")?;
        r.extend(run(&mut cl, Path::Simple, "COMMIT")?);
        assert!(error_codes(&r).is_empty() && error_codes(&cur).is_empty(), "{path:?}: {r:?} {cur:?}");
        assert_eq!(first_value(&cur), Some((base + 2).to_string()), "{path:?}: {cur:?}");
    }

    // Notifications (pg_notify(), NOTIFY, in and out of a transaction) reach a listener on the first shard
    // (where session mode's LISTEN goes), every one of them.
    let mut listener = RawClient::connect(c.shards[0].port, "postgres", "postgres", &[])?;
    assert!(error_codes(&listener.query("LISTEN jobs")?).is_empty());
    for path in PATHS {
        let mut r = run(&mut cl, path, "SELECT pg_notify('jobs', 'ready')")?;
        r.extend(run(&mut cl, path, "NOTIFY jobs, 'ready'")?);
        r.extend(run(&mut cl, Path::Simple, "BEGIN")?);
        r.extend(run(&mut cl, path, "NOTIFY jobs")?);
        r.extend(run(&mut cl, Path::Simple, "COMMIT")?);
        assert!(error_codes(&r).is_empty(), "{path:?}: {r:?}");
    }
    let heard = listener.query("SELECT 1")?;
    assert_eq!(heard.iter().filter(|r| **r == Reply::Other('A')).count(), 3 * PATHS.len(), "{heard:?}");

    // A key whose row is on another shard than the first: the lock and the write are on two shards.
    for k in 1..=6 {
        let r = cl.query(&format!("INSERT INTO counters VALUES ({k}, 0)"))?;
        assert!(error_codes(&r).is_empty(), "{r:?}");
    }
    let first = c.shards[0].client("postgres").await?;
    let (mut key, mut key0) = (0, 0);
    for k in 1..=6 {
        match first.query(&format!("SELECT 1 FROM counters WHERE user_id = {k}"), &[]).await?.is_empty() {
            true => key = k,
            false => key0 = k,
        }
    }
    assert!(key > 0 && key0 > 0, "the keys are all on one shard");

    // Each path: one client's lock keeps another's from taking it until its transaction commits.
    let mut other = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    for path in PATHS {
        let mut r = run(&mut cl, Path::Simple, "BEGIN")?;
        r.extend(run(&mut cl, path, "SELECT pg_advisory_xact_lock(7)")?);
        r.extend(run(&mut cl, path, &format!("UPDATE counters SET n = n + 1 WHERE user_id = {key}"))?);
        assert!(error_codes(&r).is_empty(), "{path:?}: {r:?}");
        let mut o = run(&mut other, Path::Simple, "BEGIN")?;
        let tried = run(&mut other, path, "SELECT pg_try_advisory_xact_lock(7)")?;
        o.extend(run(&mut other, Path::Simple, "COMMIT")?);
        assert_eq!(first_value(&tried).as_deref(), Some("f"), "{path:?}: taken twice: {tried:?}");
        let r = run(&mut cl, Path::Simple, "COMMIT")?;
        assert_eq!(outline(&r), vec!["COMMIT", "ZI"], "{path:?}");
        let mut o = run(&mut other, Path::Simple, "BEGIN")?;
        let tried = run(&mut other, path, "SELECT pg_try_advisory_xact_lock(7)")?;
        o.extend(run(&mut other, Path::Simple, "COMMIT")?);
        assert_eq!(first_value(&tried).as_deref(), Some("t"), "{path:?}: {tried:?} {o:?}");
    }

    // Read, modify, write under the lock from two clients at once: no update is lost (the lock is let go
    // only once the write it guarded is committed). A deferred trigger makes each COMMIT of a write take a
    // while, as a slow disk would. Every other transaction writes on the first shard too (two-phase commit).
    let r = cl.query(
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.02); RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER slow AFTER UPDATE ON counters DEFERRABLE INITIALLY DEFERRED \
         FOR EACH ROW EXECUTE FUNCTION slow_commit()",
    )?;
    assert!(error_codes(&r).is_empty(), "{r:?}");
    const EACH: usize = 25;
    let port = c.port;
    let workers: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut cl = RawClient::connect(port, "postgres", "postgres", &[])?;
                for i in 0..EACH {
                    let path = PATHS[i % PATHS.len()];
                    let mut r = run(&mut cl, Path::Simple, "BEGIN")?;
                    r.extend(run(&mut cl, path, "SELECT pg_advisory_xact_lock(8)")?);
                    let n = run(&mut cl, path, &format!("SELECT n FROM counters WHERE user_id = {key}"))?;
                    let n: i64 = first_value(&n).unwrap_or_default().parse()?;
                    r.extend(run(&mut cl, path, &format!("UPDATE counters SET n = {} WHERE user_id = {key}", n + 1))?);
                    if i % 2 == 1 {
                        r.extend(run(&mut cl, path, &format!("UPDATE counters SET n = n + 1 WHERE user_id = {key0}"))?);
                    }
                    r.extend(run(&mut cl, Path::Simple, "COMMIT")?);
                    anyhow::ensure!(error_codes(&r).is_empty(), "{path:?}: {r:?}");
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a worker")?;
    }
    let r = cl.query(&format!("SELECT n FROM counters WHERE user_id = {key}"))?;
    assert_eq!(first_value(&r), Some((PATHS.len() + 2 * EACH).to_string()), "updates lost: {r:?}");
    let r = cl.query(&format!("SELECT n FROM counters WHERE user_id = {key0}"))?;
    assert_eq!(first_value(&r), Some((2 * (EACH / 2)).to_string()), "{r:?}");
    Ok(())
}
