//! Global tables stay identical on every shard: an INSERT whose defaults or values are volatile
//! (`gen_random_uuid()`, `clock_timestamp()`, a sequence) through every protocol path, in and out of
//! transactions, with RETURNING and ON CONFLICT, leaves the same rows on every shard; copies that already
//! differ make the INSERT fail and leave nothing anywhere; writes whose effect cannot be made identical are
//! refused.

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
