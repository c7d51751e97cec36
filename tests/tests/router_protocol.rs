//! Protocol parity: every scenario runs through every protocol path — a simple Query, Parse/Bind/Execute of
//! the unnamed statement, a named prepared statement, a pipeline with one Sync — with its BEGIN/COMMIT sent
//! through each path too (4 × 4 cells per scenario). Each cell must reach the same outcome, and what the
//! client was told was committed must be on the shards (checked directly on each server).
//!
//! Regression tests for what broke before one state machine owned the session: a transaction bound to every
//! shard whose COMMIT came through the extended protocol was answered COMMIT and committed nothing (lost
//! commits); `SET gb.shard_key` through the extended protocol had no effect; COMMIT after a refused statement
//! answered an error and left the session stuck instead of answering ROLLBACK; an error in a pipeline hung
//! the client.

use integration::wire::{error_codes, outline, Path, RawClient, Reply, PATHS};
use integration::Cluster;

/// One statement of a scenario; `ctl`: transaction control, sent on the cell's control path.
struct S {
    sql: String,
    ctl: bool,
}

fn ctl(sql: &str) -> S {
    S { sql: sql.into(), ctl: true }
}

fn body(sql: impl Into<String>) -> S {
    S { sql: sql.into(), ctl: false }
}

/// Runs statements, each on its path; a pipeline is synced before a statement on another path, and at the
/// end. A transaction left open (a pipeline skipped its COMMIT after an error) is rolled back. Returns every
/// reply, and the outline of the replies.
fn run(c: &mut RawClient, stmts: &[S], body_path: Path, ctl_path: Path) -> anyhow::Result<(Vec<Reply>, Vec<String>)> {
    let mut replies = Vec::new();
    for s in stmts {
        let path = if s.ctl { ctl_path } else { body_path };
        if path != Path::Pipelined && c.piped() {
            replies.extend(c.sync()?);
        }
        replies.extend(c.send(path, &s.sql)?);
    }
    if c.piped() {
        replies.extend(c.sync()?);
    }
    if matches!(replies.last(), Some(Reply::Ready('T' | 'E'))) {
        replies.extend(c.query("ROLLBACK")?);
    }
    let o = outline(&replies);
    Ok((replies, o))
}

async fn count(c: &Cluster, shard: usize, sql: &str) -> anyhow::Result<i64> {
    let db = c.shards[shard].client("postgres").await?;
    Ok(db.query_one(sql, &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_path_takes_the_same_decision_and_transition() -> anyhow::Result<()> {
    let c = Cluster::hash(2, "shard-global-tables,bots\n")?;
    let mut setup = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    for sql in [
        "CREATE TABLE users (user_id bigint PRIMARY KEY, name text)",
        "CREATE TABLE bots (id int PRIMARY KEY, name text)",
    ] {
        let r = setup.query(sql)?;
        assert!(error_codes(&r).is_empty(), "{sql}: {r:?}");
    }
    let mut cell = 0i64;
    for body_path in PATHS {
        for ctl_path in PATHS {
            cell += 1;
            let k = cell * 100; // even: shard 0; k + 1: shard 1
            let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
            let label = format!("body {body_path:?}, BEGIN/COMMIT {ctl_path:?}");

            // A keyed write in a transaction: told COMMIT, on the key's shard.
            let (_, o) = run(
                &mut cl,
                &[
                    ctl("BEGIN"),
                    body(format!("INSERT INTO users (user_id, name) VALUES ({k}, 'a')")),
                    body(format!("UPDATE users SET name = 'b' WHERE user_id = {k}")),
                    ctl("COMMIT"),
                ],
                body_path,
                ctl_path,
            )?;
            assert!(o.contains(&"COMMIT".to_string()) && !o.iter().any(|x| x.starts_with('!')), "{label}: {o:?}");
            let n = count(&c, 0, &format!("SELECT count(*) FROM users WHERE user_id = {k} AND name = 'b'")).await?;
            assert_eq!(n, 1, "{label}: keyed write committed");

            // A write to a global table in a transaction (bound to every shard): on every shard.
            let (_, o) = run(
                &mut cl,
                &[ctl("BEGIN"), body(format!("INSERT INTO bots VALUES ({k}, 'g')")), ctl("COMMIT")],
                body_path,
                ctl_path,
            )?;
            assert!(o.contains(&"COMMIT".to_string()) && !o.iter().any(|x| x.starts_with('!')), "{label}: {o:?}");
            for shard in 0..2 {
                let n = count(&c, shard, &format!("SELECT count(*) FROM bots WHERE id = {k}")).await?;
                assert_eq!(n, 1, "{label}: the global row on shard {shard} (told COMMIT)");
            }

            // DDL in a transaction, then a global write: both on every shard.
            let (_, o) = run(
                &mut cl,
                &[
                    ctl("BEGIN"),
                    body(format!("CREATE TABLE t{cell} (user_id bigint)")),
                    body(format!("INSERT INTO bots VALUES ({}, 'ddl')", k + 1)),
                    ctl("COMMIT"),
                ],
                body_path,
                ctl_path,
            )?;
            assert!(!o.iter().any(|x| x.starts_with('!')), "{label}: {o:?}");
            for shard in 0..2 {
                let n = count(&c, shard, &format!("SELECT count(*) FROM pg_class WHERE relname = 't{cell}'")).await?;
                assert_eq!(n, 1, "{label}: table t{cell} on shard {shard}");
            }

            // A transaction on two shards: told COMMIT, committed on both (two-phase commit).
            let (r, o) = run(
                &mut cl,
                &[
                    ctl("BEGIN"),
                    body(format!("INSERT INTO users (user_id, name) VALUES ({}, 'x')", k + 2)),
                    body(format!("INSERT INTO users (user_id, name) VALUES ({}, 'y')", k + 3)),
                    body("SELECT 1"),
                    ctl("COMMIT"),
                ],
                body_path,
                ctl_path,
            )?;
            assert!(error_codes(&r).is_empty(), "{label}: {o:?}");
            assert!(o.contains(&"COMMIT".to_string()), "{label}: {o:?}");
            assert_eq!(o.last().map(String::as_str), Some("ZI"), "{label}: {o:?}");
            for (shard, key) in [(0, k + 2), (1, k + 3)] {
                let n = count(&c, shard, &format!("SELECT count(*) FROM users WHERE user_id = {key}")).await?;
                assert_eq!(n, 1, "{label}: the transaction's row on shard {shard}");
            }

            // An error on one of its shards aborts it (25P02 after it), COMMIT answers ROLLBACK as PostgreSQL
            // does, nothing of it is committed anywhere, and the session goes on.
            let (r, o) = run(
                &mut cl,
                &[
                    ctl("BEGIN"),
                    body(format!("INSERT INTO users (user_id, name) VALUES ({}, 'x')", k + 4)),
                    body(format!("INSERT INTO users (user_id, name) VALUES ({}, 'again')", k + 3)),
                    body("SELECT 1"),
                    ctl("COMMIT"),
                ],
                body_path,
                ctl_path,
            )?;
            let errs = error_codes(&r);
            assert_eq!(errs.first().map(String::as_str), Some("23505"), "{label}: {o:?}");
            if body_path != Path::Pipelined {
                assert_eq!(errs.get(1).map(String::as_str), Some("25P02"), "{label}: {o:?}");
            }
            if body_path != Path::Pipelined && ctl_path != Path::Pipelined {
                assert!(o.contains(&"ROLLBACK".to_string()), "{label}: COMMIT answered ROLLBACK: {o:?}");
            }
            assert_eq!(o.last().map(String::as_str), Some("ZI"), "{label}: {o:?}");
            let n = count(&c, 0, &format!("SELECT count(*) FROM users WHERE user_id = {}", k + 4)).await?;
            assert_eq!(n, 0, "{label}: nothing of the failed transaction");
            let r = cl.send(body_path, "SELECT 1")?;
            let r = if body_path == Path::Pipelined { cl.sync()? } else { r };
            assert!(error_codes(&r).is_empty(), "{label}: usable after: {r:?}");

            // SET gb.shard_key: a statement without a key goes to the session key's shard, in every path.
            let seed = count(&c, 1, &format!("SELECT count(*) FROM users WHERE user_id = {}", k + 5)).await?;
            assert_eq!(seed, 0);
            c.shards[1]
                .client("postgres")
                .await?
                .execute(&format!("INSERT INTO users VALUES ({}, 'seed')", k + 5), &[])
                .await?;
            let (r, o) = run(
                &mut cl,
                &[
                    body(format!("SET gb.shard_key = {}", k + 5)),
                    body(format!("UPDATE users SET name = 'gb{cell}' WHERE name = 'seed'")),
                    body("RESET gb.shard_key"),
                ],
                body_path,
                ctl_path,
            )?;
            assert!(error_codes(&r).is_empty(), "{label}: {o:?}");
            let n = count(&c, 1, &format!("SELECT count(*) FROM users WHERE name = 'gb{cell}'")).await?;
            assert_eq!(n, 1, "{label}: SET gb.shard_key took effect: {o:?}");
            let r = cl.query("UPDATE users SET name = 'z' WHERE name = 'nobody'")?;
            assert_eq!(error_codes(&r), vec!["42000".to_string()], "{label}: RESET gb.shard_key took effect");

            // A cursor in a transaction stays on the transaction's connection.
            let (r, o) = run(
                &mut cl,
                &[
                    ctl("BEGIN"),
                    body(format!("DECLARE c{cell} CURSOR FOR SELECT name FROM users WHERE user_id = {k}")),
                    body(format!("FETCH 1 FROM c{cell}")),
                    body(format!("MOVE 1 IN c{cell}")),
                    body(format!("CLOSE c{cell}")),
                    ctl("COMMIT"),
                ],
                body_path,
                ctl_path,
            )?;
            assert!(error_codes(&r).is_empty(), "{label}: {o:?}");
            assert!(o.contains(&"row b".to_string()), "{label}: the cursor's row: {o:?}");

            // An error in a pipeline (or alone): the client gets it, nothing hangs, the session goes on.
            let (r, o) = run(
                &mut cl,
                &[body("SELECT 1"), body("SELECT * FROM doesnotexist"), body("SELECT 'x'")],
                body_path,
                ctl_path,
            )?;
            assert_eq!(error_codes(&r), vec!["42P01".to_string()], "{label}: {o:?}");
            assert_eq!(o.last().map(String::as_str), Some("ZI"), "{label}: {o:?}");
            let r = cl.query("SELECT 2")?;
            assert!(outline(&r).contains(&"row 2".to_string()), "{label}: {r:?}");
        }
    }
    Ok(())
}

/// COPY FROM STDIN inside a transaction, in the simple and the extended protocol: rows split by key before
/// the transaction is bound (it binds every shard), committed with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_transactions_on_every_path() -> anyhow::Result<()> {
    let c = Cluster::hash(2, "")?;
    let mut setup = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    assert!(error_codes(&setup.query("CREATE TABLE events (user_id bigint, n int)")?).is_empty());
    for (cell, path) in [Path::Simple, Path::Unnamed, Path::Named].into_iter().enumerate() {
        let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
        let base = cell as i64 * 10;
        assert!(error_codes(&cl.send(path, "BEGIN")?).is_empty());
        // The statement, then its CopyInResponse; the data; then the answer (and, extended, the Sync's).
        let mut replies = Vec::new();
        match path {
            Path::Simple => {
                cl.send_raw(&query_frame("COPY events (user_id, n) FROM STDIN"))?;
            }
            _ => {
                cl.send_raw(&extended_frames("COPY events (user_id, n) FROM STDIN"))?;
            }
        }
        loop {
            let r = cl.reply()?;
            let started = r == Reply::CopyIn;
            replies.push(r);
            if started {
                break;
            }
            assert!(!matches!(replies.last(), Some(Reply::Error { .. } | Reply::Ready(_))), "{path:?}: {replies:?}");
        }
        let data: String = (0..10).map(|i| format!("{}\t{i}\n", base + i)).collect();
        cl.copy_data(data.as_bytes())?;
        if path != Path::Simple {
            cl.send_raw(&[b'S', 0, 0, 0, 4])?;
        }
        replies.extend(cl.until_ready()?);
        let o = outline(&replies);
        assert!(o.contains(&"COPY 10".to_string()) && o.last() == Some(&"ZT".to_string()), "{path:?}: {o:?}");
        let r = cl.send(path, "COMMIT")?;
        assert_eq!(outline(&r), vec!["COMMIT".to_string(), "ZI".to_string()], "{path:?}");
        for shard in 0..2 {
            let n =
                count(&c, shard, &format!("SELECT count(*) FROM events WHERE user_id BETWEEN {base} AND {}", base + 9))
                    .await?;
            assert_eq!(n, 5, "{path:?}: shard {shard} has its rows");
        }
    }
    Ok(())
}

fn query_frame(sql: &str) -> Vec<u8> {
    let mut out = vec![b'Q'];
    out.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    out.extend_from_slice(sql.as_bytes());
    out.push(0);
    out
}

/// Parse/Bind/Execute of the unnamed statement and a Sync, as tokio-postgres' copy_in sends COPY.
fn extended_frames(sql: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |tag: u8, body: &[u8]| {
        out.push(tag);
        out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(body);
    };
    let mut p = vec![0u8];
    p.extend_from_slice(sql.as_bytes());
    p.extend_from_slice(&[0, 0, 0]);
    put(b'P', &p);
    put(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]);
    put(b'E', &[0, 0, 0, 0, 0]);
    put(b'S', &[]);
    out
}
