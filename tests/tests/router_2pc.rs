//! Writes and transactions on several shards commit atomically with two-phase commit: a multi-row INSERT
//! whose rows are for several shards (RETURNING in VALUES order), UPDATE and DELETE with keys on several
//! shards, and BEGIN ... two shards ... COMMIT / ROLLBACK, through every protocol path; a failure on one
//! shard leaves nothing on any; no prepared transaction stays behind.

use integration::wire::{error_codes, outline, Path, RawClient, Reply, PATHS};
use integration::{free_port, Cluster};

/// A sample of the router's `/metrics` (curl).
fn metric(http: u16, series: &str) -> anyhow::Result<f64> {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{http}/metrics"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '));
    Ok(line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN))
}

fn run(cl: &mut RawClient, path: Path, sql: &str) -> anyhow::Result<Vec<Reply>> {
    let mut r = cl.send(path, sql)?;
    if path == Path::Pipelined {
        r.extend(cl.sync()?);
    }
    Ok(r)
}

/// Runs statements in a row on `path` (pipelined: one Sync at the end); every reply.
fn run_all(cl: &mut RawClient, path: Path, sqls: &[&str]) -> anyhow::Result<Vec<Reply>> {
    let mut out = Vec::new();
    for sql in sqls {
        out.extend(cl.send(path, sql)?);
    }
    if path == Path::Pipelined {
        out.extend(cl.sync()?);
    }
    Ok(out)
}

/// `user_id:balance` of every row on every shard, each shard's sorted.
async fn balances(c: &Cluster) -> anyhow::Result<Vec<Vec<String>>> {
    let mut out = Vec::new();
    for s in &c.shards {
        let db = s.client("postgres").await?;
        let rows = db.query("SELECT user_id, balance FROM accounts ORDER BY user_id", &[]).await?;
        out.push(rows.iter().map(|r| format!("{}:{}", r.get::<_, i64>(0), r.get::<_, i32>(1))).collect());
    }
    Ok(out)
}

/// Transactions left prepared on the shards.
async fn prepared(c: &Cluster) -> anyhow::Result<i64> {
    let mut n = 0;
    for s in &c.shards {
        let db = s.client("postgres").await?;
        n += db.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).await?.get::<_, i64>(0);
    }
    Ok(n)
}

fn rows(r: &[Reply]) -> Vec<String> {
    outline(r).into_iter().filter(|x| x.starts_with("row ")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_transactions_on_two_shards_commit_atomically() -> anyhow::Result<()> {
    let http = free_port();
    let c = Cluster::hash(2, &format!("router-http,127.0.0.1:{http}\n"))?;
    let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    let r =
        cl.query("CREATE TABLE accounts (user_id bigint PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0))")?;
    assert!(error_codes(&r).is_empty(), "{r:?}");
    for (k, path) in PATHS.into_iter().enumerate() {
        let (a, b, x) = (100 * k + 1, 100 * k + 2, 100 * k + 3);
        // Shards by modulo 2: a and x on shard 1, b on shard 0.
        let r = run(
            &mut cl,
            path,
            &format!("INSERT INTO accounts (user_id, balance) VALUES ({a}, 1), ({b}, 2), ({x}, 3) RETURNING user_id, balance"),
        )?;
        assert_eq!(error_codes(&r), Vec::<String>::new(), "{path:?}: {r:?}");
        assert_eq!(rows(&r), [format!("row {a},1"), format!("row {b},2"), format!("row {x},3")], "{path:?}: {r:?}");
        assert!(outline(&r).contains(&"INSERT 0 3".to_string()), "{path:?}: {r:?}");

        let r = run(&mut cl, path, &format!("UPDATE accounts SET balance = balance + 10 WHERE user_id IN ({a}, {b})"))?;
        assert!(outline(&r).contains(&"UPDATE 2".to_string()), "{path:?}: {r:?}");

        // A transaction on both shards: all of it, or nothing.
        let r = run_all(
            &mut cl,
            path,
            &[
                "BEGIN",
                &format!("UPDATE accounts SET balance = 100 WHERE user_id = {a}"),
                &format!("UPDATE accounts SET balance = 200 WHERE user_id = {b}"),
                "COMMIT",
            ],
        )?;
        assert_eq!(error_codes(&r), Vec::<String>::new(), "{path:?}: {r:?}");
        assert!(outline(&r).contains(&"COMMIT".to_string()), "{path:?}: {r:?}");
        let r = run_all(
            &mut cl,
            path,
            &[
                "BEGIN",
                &format!("UPDATE accounts SET balance = 1 WHERE user_id = {a}"),
                &format!("UPDATE accounts SET balance = 2 WHERE user_id = {b}"),
                "ROLLBACK",
            ],
        )?;
        assert_eq!(error_codes(&r), Vec::<String>::new(), "{path:?}: {r:?}");
        let r = run(
            &mut cl,
            path,
            &format!("SELECT user_id, balance FROM accounts WHERE user_id IN ({a}, {b}, {x}) ORDER BY user_id"),
        )?;
        assert_eq!(rows(&r), [format!("row {a},100"), format!("row {b},200"), format!("row {x},3")], "{path:?}: {r:?}");

        // A row that fails on one shard: nothing of the statement anywhere.
        let r = run(
            &mut cl,
            path,
            &format!("INSERT INTO accounts (user_id, balance) VALUES ({}, 5), ({b}, 5)", 100 * k + 5),
        )?;
        assert_eq!(error_codes(&r), ["23505"], "{path:?}: {r:?}");
        let r =
            run(&mut cl, path, &format!("UPDATE accounts SET balance = balance - 150 WHERE user_id IN ({a}, {b})"))?;
        assert_eq!(error_codes(&r), ["23514"], "{path:?}: {r:?}");
        let r = run(
            &mut cl,
            path,
            &format!("SELECT count(*), sum(balance) FROM accounts WHERE user_id BETWEEN {a} AND {}", 100 * k + 9),
        )?;
        assert_eq!(rows(&r), ["row 3,303"], "{path:?}: {r:?}");

        let r = run(&mut cl, path, &format!("DELETE FROM accounts WHERE user_id IN ({a}, {x})"))?;
        assert!(outline(&r).contains(&"DELETE 2".to_string()), "{path:?}: {r:?}");
        assert_eq!(prepared(&c).await?, 0, "{path:?}");
    }
    let all = balances(&c).await?;
    let want: Vec<Vec<String>> =
        vec![["2:200", "102:200", "202:200", "302:200"].map(String::from).to_vec(), Vec::new()];
    assert_eq!(all, want);
    // Per path: the INSERT, the UPDATE and the transaction wrote to both shards.
    assert_eq!(metric(http, "shard_router_two_phase_commits_total")?, 12.0);
    assert_eq!(metric(http, "shard_router_two_phase_commit_duration_seconds_count")?, 12.0);
    Ok(())
}

/// `bigserial` and identity columns of sharded tables created through the router hand out ids that cannot
/// collide across shards (interleaved sequences); one with its own start or increment is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_and_identity_ids_do_not_collide_across_shards() -> anyhow::Result<()> {
    let c = Cluster::hash(3, "")?;
    let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    for sql in [
        "CREATE TABLE messages (id bigserial PRIMARY KEY, user_id bigint NOT NULL, body text)",
        "CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY, user_id bigint NOT NULL)",
        "BEGIN",
        "CREATE TABLE notes (id serial, user_id bigint NOT NULL)",
        "ALTER TABLE notes ADD COLUMN n bigint GENERATED BY DEFAULT AS IDENTITY",
        "COMMIT",
        "CREATE TABLE custom (id bigint GENERATED ALWAYS AS IDENTITY (START WITH 1000), user_id bigint)",
    ] {
        let r = cl.query(sql)?;
        assert!(error_codes(&r).is_empty(), "{sql}: {r:?}");
    }
    let mut ids = Vec::new();
    for (k, path) in PATHS.into_iter().enumerate() {
        let k = k as i64 * 10;
        let r = run(
            &mut cl,
            path,
            &format!(
                "INSERT INTO messages (user_id, body) VALUES ({}, 'a'), ({}, 'b'), ({}, 'c'), ({}, 'd') RETURNING id, user_id",
                k,
                k + 1,
                k + 2,
                k + 3
            ),
        )?;
        assert_eq!(error_codes(&r), Vec::<String>::new(), "{path:?}: {r:?}");
        for row in r.iter().filter_map(|x| if let Reply::Row(v) = x { Some(v.clone()) } else { None }) {
            ids.push(row[0].clone().unwrap().parse::<i64>()?);
            // Each id is its shard's: id ≡ shard + 1 (mod 3), and the shard is user_id mod 3.
            let (id, user): (i64, i64) = (row[0].clone().unwrap().parse()?, row[1].clone().unwrap().parse()?);
            assert_eq!((id - 1) % 3, user % 3, "{path:?}: id {id} for user {user}");
        }
        let r = run(&mut cl, path, &format!("INSERT INTO events (user_id) VALUES ({k}), ({}), ({})", k + 1, k + 2))?;
        assert_eq!(error_codes(&r), Vec::<String>::new(), "{path:?}: {r:?}");
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "ids collide: {ids:?}");
    for (i, s) in c.shards.iter().enumerate() {
        let db = s.client("postgres").await?;
        for (seq, want) in [
            ("messages_id_seq", (3i64, i as i64 + 1)),
            ("events_id_seq", (3, i as i64 + 1)),
            ("notes_id_seq", (3, i as i64 + 1)),
            ("notes_n_seq", (3, i as i64 + 1)),
            ("custom_id_seq", (1, 1000)),
        ] {
            let row = db
                .query_one("SELECT increment_by, start_value FROM pg_sequences WHERE sequencename = $1", &[&seq])
                .await?;
            assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), want, "{seq} on shard {i}");
        }
    }
    Ok(())
}

/// With `shard-two-phase-commit,false` a transaction stays on one shard: a statement for another is refused
/// (0A000) and fails it, as do writes whose keys are on several shards, and a write after an advisory lock
/// (the first shard's) to another shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_two_phase_commit_transactions_stay_on_one_shard() -> anyhow::Result<()> {
    let c = Cluster::hash(2, "shard-two-phase-commit,false\n")?;
    let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    let r = cl.query("CREATE TABLE accounts (user_id bigint PRIMARY KEY, balance int NOT NULL)")?;
    assert!(error_codes(&r).is_empty(), "{r:?}");
    for path in PATHS {
        let r = run_all(
            &mut cl,
            path,
            &["BEGIN", "INSERT INTO accounts VALUES (1, 1)", "INSERT INTO accounts VALUES (2, 2)", "COMMIT"],
        )?;
        assert_eq!(error_codes(&r).first().map(String::as_str), Some("0A000"), "{path:?}: {r:?}");
        if matches!(r.last(), Some(Reply::Ready('T' | 'E'))) {
            cl.query("ROLLBACK")?;
        }
        let r = run(&mut cl, path, "UPDATE accounts SET balance = 0 WHERE user_id IN (1, 2)")?;
        assert_eq!(error_codes(&r), ["0A000"], "{path:?}: {r:?}");
        let r = run(&mut cl, path, "INSERT INTO accounts VALUES (3, 3), (4, 4)")?;
        assert_eq!(error_codes(&r), ["0A000"], "{path:?}: {r:?}");
    }
    assert_eq!(balances(&c).await?, vec![Vec::<String>::new(), Vec::<String>::new()]);

    // An advisory lock is the first shard's: a transaction that took one writes there only (the lock on one
    // shard and the write on another would be a transaction on two).
    for (p, path) in PATHS.into_iter().enumerate() {
        for k in (10 * p + 1)..=(10 * p + 4) {
            let mut r = run_all(
                &mut cl,
                path,
                &["BEGIN", "SELECT pg_advisory_xact_lock(1)", &format!("INSERT INTO accounts VALUES ({k}, 0)")],
            )?;
            r.extend(run(&mut cl, Path::Simple, "COMMIT")?);
            let first: i64 = c.shards[0]
                .client("postgres")
                .await?
                .query_one(&format!("SELECT count(*) FROM accounts WHERE user_id = {k}"), &[])
                .await?
                .get(0);
            let want = if first == 1 { vec![] } else { vec!["0A000".to_string()] };
            assert_eq!(error_codes(&r), want, "{path:?}, key {k}: {r:?}");
        }
    }
    let on = balances(&c).await?;
    assert!(on[1].is_empty() && !on[0].is_empty(), "{on:?}");
    Ok(())
}

/// `EXPLAIN ANALYZE` runs the write it explains: through the router it goes whole to the one shard its key
/// names, or is refused — never the whole statement on each of several shards (a multi-row INSERT for two
/// shards once inserted both rows on both), nor a keyless write on every shard — on every protocol path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_analyze_runs_a_write_once_or_not_at_all() -> anyhow::Result<()> {
    let c = Cluster::hash(2, "shard-global-tables,bots\n")?;
    let db = c.client().await?;
    db.batch_execute("CREATE TABLE accounts (user_id bigint PRIMARY KEY, balance int); CREATE TABLE bots (id int)")
        .await?;
    // Keys 1 and 2 are on different shards.
    for path in PATHS {
        let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
        for (sql, code) in [
            ("EXPLAIN ANALYZE INSERT INTO accounts (user_id, balance) VALUES (1, 10), (2, 20)", "0A000"),
            ("EXPLAIN (ANALYZE, COSTS off) UPDATE accounts SET balance = 0 WHERE user_id IN (1, 2)", "0A000"),
            ("EXPLAIN ANALYZE DELETE FROM accounts", "42000"),
            ("EXPLAIN ANALYZE INSERT INTO bots VALUES (1)", "0A000"),
        ] {
            let r = run(&mut cl, path, sql)?;
            assert_eq!(error_codes(&r), [code], "{path:?} {sql}: {r:?}");
        }
        assert_eq!(balances(&c).await?, [Vec::<String>::new(), Vec::new()], "{path:?}");
        let r = run(&mut cl, path, "EXPLAIN ANALYZE INSERT INTO accounts (user_id, balance) VALUES (1, 10)")?;
        assert!(error_codes(&r).is_empty() && !rows(&r).is_empty(), "{path:?}: {r:?}");
        let on_shards = balances(&c).await?;
        assert_eq!(on_shards.concat(), ["1:10"], "{path:?}: the row on one shard once: {on_shards:?}");
        // (EXPLAIN without ANALYZE runs nothing: each shard's plan.)
        let r = run(&mut cl, path, "EXPLAIN DELETE FROM accounts")?;
        assert!(error_codes(&r).is_empty(), "{path:?}: {r:?}");
        db.batch_execute("DELETE FROM accounts WHERE user_id = 1").await?;
    }
    for s in &c.shards {
        let n: i64 = s.client("postgres").await?.query_one("SELECT count(*) FROM bots", &[]).await?.get(0);
        assert_eq!(n, 0);
    }
    Ok(())
}

/// A write on several shards runs on each with what that shard holds: what it reads besides its own rows —
/// other tables, subqueries in WHERE, SET, VALUES, RETURNING — must be each shard's part (joined or correlated
/// on the key), else it is refused (0A000) before anything runs, on every protocol path; the writes that run
/// leave the rows one PostgreSQL leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_several_shards_read_only_what_each_shard_holds() -> anyhow::Result<()> {
    let plain = integration::PgServer::start()?;
    let c = Cluster::hash(2, "")?;
    let schema = "CREATE TABLE accounts (user_id bigint PRIMARY KEY, balance int); \
                  CREATE TABLE moves (user_id bigint, amount int)";
    let data = "TRUNCATE accounts, moves; \
                INSERT INTO accounts (user_id, balance) VALUES (1, 10), (2, 20), (3, 30), (4, 40); \
                INSERT INTO moves (user_id, amount) VALUES (1, 5), (1, 20), (2, 7), (3, 100), (4, 1)";
    let pdb = plain.client("postgres").await?;
    pdb.batch_execute(schema).await?;
    let rdb = c.client().await?;
    rdb.batch_execute(schema).await?;
    let refused = [
        "UPDATE accounts SET balance = (SELECT max(amount) FROM moves) WHERE user_id IN (1, 2)",
        "DELETE FROM moves WHERE user_id IN (1, 2) AND amount = (SELECT min(amount) FROM moves)",
        "UPDATE accounts a SET balance = a.balance + m.amount FROM moves m WHERE m.amount = a.balance AND a.user_id IN (1, 2)",
        "INSERT INTO accounts (user_id, balance) VALUES (5, (SELECT count(*) FROM moves)), (6, 0)",
        "UPDATE accounts SET balance = 0 WHERE user_id IN (1, 2) RETURNING (SELECT sum(amount) FROM moves)",
    ];
    let run_both = [
        "UPDATE accounts a SET balance = a.balance + m.amount FROM moves m WHERE m.user_id = a.user_id AND a.user_id IN (1, 2)",
        "DELETE FROM moves WHERE user_id IN (3, 4) AND amount < (SELECT balance FROM accounts a WHERE a.user_id = moves.user_id)",
        "UPDATE accounts SET balance = balance + 1 WHERE user_id IN (1, 4) AND user_id IN (SELECT user_id FROM moves)",
    ];
    for path in PATHS {
        pdb.batch_execute(data).await?;
        // (The router splits a multi-row INSERT by shard; a multi-statement string must agree on a place, so
        // each statement goes alone.)
        for sql in data.split("; ") {
            rdb.batch_execute(sql).await?;
        }
        let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
        let before = contents(&rdb).await?;
        for sql in refused {
            let r = run(&mut cl, path, sql)?;
            assert_eq!(error_codes(&r), ["0A000"], "{path:?} {sql}: {r:?}");
        }
        assert_eq!(contents(&rdb).await?, before, "{path:?}: a refused write changed nothing");
        let mut plain_cl = RawClient::connect(plain.port, "postgres", "postgres", &[])?;
        for sql in run_both {
            let want = outline(&run(&mut plain_cl, path, sql)?);
            let got = outline(&run(&mut cl, path, sql)?);
            assert_eq!(got, want, "{path:?} {sql}");
        }
        assert_eq!(contents(&rdb).await?, contents(&pdb).await?, "{path:?}: router, then plain");
    }
    Ok(())
}

/// Every row of `accounts` and `moves`, each table's sorted.
async fn contents(db: &tokio_postgres::Client) -> anyhow::Result<Vec<Vec<(i64, i32)>>> {
    let mut out = Vec::new();
    for sql in ["SELECT user_id, balance FROM accounts", "SELECT user_id, amount FROM moves"] {
        let mut rows: Vec<(i64, i32)> = db.query(sql, &[]).await?.iter().map(|r| (r.get(0), r.get(1))).collect();
        rows.sort();
        out.push(rows);
    }
    Ok(out)
}

/// A WITH query that writes (`WITH d AS (DELETE ... RETURNING *) SELECT ...`) is a write: it goes whole to the
/// one shard its key names, or is refused — never, as a read, the whole statement to every shard (it once
/// deleted every row with no key, and inserted a multi-row INSERT's rows on each of their shards), nor to one
/// shard's copy of a global table — on every protocol path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_with_queries_run_whole_on_one_shard() -> anyhow::Result<()> {
    let c = Cluster::hash(2, "shard-global-tables,bots\n")?;
    let db = c.client().await?;
    db.batch_execute("CREATE TABLE accounts (user_id bigint PRIMARY KEY, balance int); CREATE TABLE bots (id int)")
        .await?;
    db.batch_execute("INSERT INTO bots VALUES (1)").await?;
    for path in PATHS {
        let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
        db.batch_execute("INSERT INTO accounts (user_id, balance) VALUES (3, 30)").await?;
        for (sql, code) in [
            ("WITH i AS (INSERT INTO accounts (user_id, balance) VALUES (1, 10), (2, 20) RETURNING *) SELECT * FROM i", "0A000"),
            ("WITH d AS (DELETE FROM accounts RETURNING *) SELECT count(*) FROM d", "42000"),
            ("WITH u AS (UPDATE accounts SET balance = 0 WHERE user_id IN (2, 3) RETURNING *) SELECT * FROM u", "0A000"),
            ("WITH u AS (UPDATE bots SET id = 2 RETURNING *) SELECT * FROM u", "0A000"),
        ] {
            let r = run(&mut cl, path, sql)?;
            assert_eq!(error_codes(&r), [code], "{path:?} {sql}: {r:?}");
        }
        assert_eq!(balances(&c).await?.concat(), ["3:30"], "{path:?}: nothing written");
        let r = run(&mut cl, path, "WITH d AS (DELETE FROM accounts WHERE user_id = 3 RETURNING *) SELECT * FROM d")?;
        assert_eq!(rows(&r), ["row 3,30"], "{path:?}: {r:?}");
        assert!(balances(&c).await?.concat().is_empty(), "{path:?}");
    }
    for s in &c.shards {
        let n: i64 = s.client("postgres").await?.query_one("SELECT count(*) FROM bots WHERE id = 1", &[]).await?.get(0);
        assert_eq!(n, 1);
    }
    Ok(())
}
