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

/// The statements sent as one pipeline and its Sync (then a COMMIT, when a transaction is left open): the
/// answers outlined with the notices where they came, a warning's place in the answer being compared too.
fn pipeline(db: &mut RawClient, sqls: &[String]) -> anyhow::Result<Vec<String>> {
    let mut r = Vec::new();
    for sql in sqls {
        r.extend(db.send(Path::Pipelined, sql)?);
    }
    r.extend(db.sync()?);
    if !matches!(r.last(), Some(Reply::Ready('I'))) {
        r.extend(db.query("COMMIT")?);
    }
    Ok(r.iter()
        .filter_map(|x| match x {
            Reply::Done(t) => Some(t.clone()),
            Reply::Error { code, .. } => Some(format!("!{code}")),
            Reply::Ready(st) => Some(format!("Z{st}")),
            Reply::Row(v) => Some(format!("row {v:?}")),
            Reply::Notice(m) => Some(format!("notice {m}")),
            _ => None,
        })
        .collect())
}

/// One plain PostgreSQL and a hash cluster of `shards` (`extra` config lines) behind the router, both given
/// `schema`, a statement at a time (the router refuses some strings of several).
async fn plain_and_cluster(
    shards: usize,
    extra: &str,
    schema: &[&str],
) -> anyhow::Result<(integration::PgServer, Cluster)> {
    let plain = integration::PgServer::start()?;
    let c = Cluster::hash(shards, extra)?;
    for db in [plain.client("postgres").await?, c.client().await?] {
        for st in schema {
            db.batch_execute(st).await?;
        }
    }
    Ok((plain, c))
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

    // A pipeline's writes on two shards outside a transaction: each shard's part commits at the Sync (one
    // after the other: nothing to make them one transaction), prepared nowhere.
    let r = run_all(
        &mut cl,
        Path::Pipelined,
        &["INSERT INTO accounts VALUES (101, 1)", "INSERT INTO accounts VALUES (102, 2)"],
    )?;
    assert_eq!(outline(&r), ["INSERT 0 1", "INSERT 0 1", "ZI"], "{r:?}");
    let r = cl.query("SELECT count(*) FROM accounts WHERE user_id IN (101, 102)")?;
    assert_eq!(rows(&r), ["row 2"], "{r:?}");
    // DDL runs on every shard's connection: a BEGIN or ROLLBACK after it in the pipeline would end its work on
    // one of them only — refused, the pipeline rolled back.
    for end in ["BEGIN", "ROLLBACK"] {
        let r = run_all(&mut cl, Path::Pipelined, &["CREATE TABLE extra (id int)", end])?;
        assert_eq!(error_codes(&r), ["0A000"], "{end}: {r:?}");
        for sh in &c.shards {
            let db = sh.client("postgres").await?;
            let n: i64 = db.query_one("SELECT count(*) FROM pg_class WHERE relname = 'extra'", &[]).await?.get(0);
            assert_eq!(n, 0, "{end}: shard {}", sh.port);
        }
    }
    assert_eq!(prepared(&c).await?, 0);
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

/// A transaction that failed on one shard runs nothing more anywhere: a statement for another shard, for
/// several, or a read across shards is answered 25P02 as one PostgreSQL answers it — not run on a shard
/// joining the transaction (which answered it: a row count, a duplicate key) — and in a pipeline, what follows
/// the error is skipped up to the Sync, a write on several shards included (its merged row count was still
/// sent). On every protocol path, against one plain PostgreSQL; nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transaction_runs_nothing_more_on_any_shard() -> anyhow::Result<()> {
    let schema = "CREATE TABLE accounts (user_id bigint PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0))";
    let (plain, c) = plain_and_cluster(4, "", &[schema]).await?;
    let rows: Vec<String> = (1..=8).map(|k| format!("({k}, {k})")).collect();
    let fill = format!("INSERT INTO accounts VALUES {}", rows.join(", "));
    plain.client("postgres").await?.batch_execute(&fill).await?;
    c.client().await?.batch_execute(&fill).await?;
    let after_error = [
        "INSERT INTO accounts VALUES (2, 1)",
        "INSERT INTO accounts VALUES (20, 1), (21, 1), (22, 1)",
        "UPDATE accounts SET balance = 0 WHERE user_id IN (2, 3, 4)",
        "DELETE FROM accounts WHERE user_id = 3",
        "SELECT count(*) FROM accounts",
    ];
    for path in PATHS {
        for then in after_error {
            let unit = ["BEGIN", "INSERT INTO accounts VALUES (1, 1)", then, "SELECT 1", "COMMIT"];
            let mut answers = Vec::new();
            for port in [plain.port, c.port] {
                let mut cl = RawClient::connect(port, "postgres", "postgres", &[])?;
                answers.push(outline(&run_all(&mut cl, path, &unit)?));
            }
            assert_eq!(answers[1], answers[0], "{path:?}, then {then}: router, then plain");
        }
    }
    assert_eq!(balances(&c).await?.concat().len(), 8, "nothing written");
    // A pipeline's implicit transaction: after a write on several shards fails on one of them, what follows is
    // skipped — a write on that shard (which skipped it) and on another (which was sent it).
    let more = "CREATE TABLE moves (user_id bigint, id int, amount int, PRIMARY KEY (user_id, id)); \
                INSERT INTO moves VALUES (7, 3, 1)";
    plain.client("postgres").await?.batch_execute(more).await?;
    let db = c.client().await?;
    for sql in more.split("; ") {
        db.batch_execute(sql).await?;
    }
    let pipelines: [&[&str]; 4] = [
        &[
            "SELECT user_id, balance FROM accounts WHERE user_id IN (1, 2, 3) ORDER BY user_id",
            "UPDATE accounts SET balance = balance - 2 WHERE user_id IN (1, 7)",
            "INSERT INTO moves VALUES (7, 3, 52)",
        ],
        &[
            "SELECT user_id, balance FROM accounts WHERE user_id IN (1, 2, 3) ORDER BY user_id",
            "UPDATE accounts SET balance = balance - 5 WHERE user_id IN (3, 6)",
            "INSERT INTO moves VALUES (7, 3, 52)",
        ],
        &["UPDATE accounts SET balance = balance - 5 WHERE user_id IN (3, 6)", "INSERT INTO moves VALUES (8, 1, 1)"],
        &["INSERT INTO moves VALUES (7, 3, 1)", "UPDATE accounts SET balance = 0 WHERE user_id IN (1, 2, 3)"],
    ];
    for unit in pipelines {
        let mut answers = Vec::new();
        for port in [plain.port, c.port] {
            let mut cl = RawClient::connect(port, "postgres", "postgres", &[])?;
            let r = run_all(&mut cl, Path::Pipelined, unit)?;
            answers.push(outline(&r));
        }
        assert_eq!(answers[1], answers[0], "{unit:?}: router, then plain");
    }
    let mut all = balances(&c).await?.concat();
    all.sort();
    let mut want: Vec<String> = (1..=8).map(|k| format!("{k}:{k}")).collect();
    want.sort();
    assert_eq!(all, want, "nothing written");
    let mut moves = 0;
    for s in &c.shards {
        moves += s.client("postgres").await?.query_one("SELECT count(*) FROM moves", &[]).await?.get::<_, i64>(0);
    }
    assert_eq!(moves, 1, "nothing written");
    Ok(())
}

/// A seeded random workload of writes and transactions, the same on one plain PostgreSQL and through the
/// router on four shards (a global table among them): keyed INSERTs (duplicates: 23505), upserts, multi-row
/// INSERTs with keys on several shards, UPDATE and DELETE by key and by keys on several shards (CHECK
/// violations: 23514), global-table writes, DDL (CREATE and DROP TABLE), keyed reads and reads across shards seeing the transaction's own
/// writes — alone, in BEGIN ... COMMIT / ROLLBACK with savepoints, in a pipeline of a whole transaction, in
/// a pipeline's implicit transaction, in one that a BEGIN in the same pipeline makes part of a transaction
/// (or a ROLLBACK undoes), and in one a COMMIT or ROLLBACK ends before more statements (a Flush between them,
/// sometimes), each statement on a random protocol path. Every answer (rows, tags,
/// error codes, transaction status) must be the plain server's, and the rows each shard holds, put together,
/// the plain server's rows; no transaction stays prepared. Seeded (`WRITES_FUZZ_SEED`, `WRITES_FUZZ_UNITS`) so
/// that a failure can be replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_writes_and_transactions_give_one_postgresql_answer() -> anyhow::Result<()> {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("WRITES_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261207);
    let units: usize = std::env::var("WRITES_FUZZ_UNITS").ok().and_then(|s| s.parse().ok()).unwrap_or(400);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let schema = [
        "CREATE TABLE accounts (user_id bigint PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0), note text)",
        "CREATE TABLE moves (user_id bigint, id int, amount int, PRIMARY KEY (user_id, id))",
        "CREATE TABLE bots (id int PRIMARY KEY, name text)",
    ];
    let (plain, c) = plain_and_cluster(4, "shard-global-tables,bots\n", &schema).await?;
    let mut reference = RawClient::connect(plain.port, "postgres", "postgres", &[])?;
    let mut routed = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    let mut statements = 0;
    // (`WRITES_FUZZ_REPLAY`: the units a failing run wrote, instead of random ones.)
    let replay = integration::wire::replay_lines("WRITES_FUZZ_REPLAY")?;
    let units = replay.as_ref().map_or(units, Vec::len);
    let mut script = Vec::new();
    for n in 0..units {
        // A unit: one statement, or a transaction, each statement on its own path (`None`: pipelined, synced
        // once at the unit's end).
        let path = |rng: &mut rand::rngs::StdRng| [Path::Simple, Path::Unnamed, Path::Named][rng.random_range(0..3)];
        let mut unit: Vec<(Option<Path>, String)> = Vec::new();
        match rng.random_range(0..12) {
            0..=3 => unit.push((Some(path(&mut rng)), random_write(&mut rng))),
            4..=7 => {
                unit.push((Some(path(&mut rng)), "BEGIN".into()));
                for _ in 0..rng.random_range(1..=4) {
                    unit.push((Some(path(&mut rng)), random_write(&mut rng)));
                }
                if rng.random_bool(0.25) {
                    // (Back to a savepoint after a write, or after an error: the transaction goes on.)
                    unit.push((Some(path(&mut rng)), "SAVEPOINT s".into()));
                    unit.push((Some(path(&mut rng)), random_write(&mut rng)));
                    if rng.random_bool(0.5) {
                        unit.push((Some(path(&mut rng)), "SELECT 1 / 0".into()));
                    }
                    let back = if rng.random_bool(0.8) { "ROLLBACK TO SAVEPOINT s" } else { "RELEASE SAVEPOINT s" };
                    unit.push((Some(path(&mut rng)), back.into()));
                    unit.push((Some(path(&mut rng)), random_write(&mut rng)));
                }
                let end = if rng.random_bool(0.7) { "COMMIT" } else { "ROLLBACK" };
                unit.push((Some(path(&mut rng)), end.into()));
            }
            8 => {
                unit.push((None, "BEGIN".into()));
                for _ in 0..rng.random_range(1..=3) {
                    unit.push((None, random_write(&mut rng)));
                }
                unit.push((None, "COMMIT".into()));
            }
            9 => {
                // A pipeline's implicit transaction on one key's shard, then BEGIN — which makes what went before
                // it part of the transaction — or a ROLLBACK of it all.
                let upsert = |k: u32, d: u32| {
                    format!(
                        "INSERT INTO accounts (user_id, balance) VALUES ({k}, {d}) ON CONFLICT (user_id) \
                         DO UPDATE SET balance = accounts.balance + EXCLUDED.balance"
                    )
                };
                let k = rng.random_range(1..=40);
                unit.push((None, upsert(k, rng.random_range(1..9))));
                if rng.random_bool(0.5) {
                    unit.push((None, "BEGIN".into()));
                    // (Nothing more, the same key, or a key on any shard.)
                    match rng.random_range(0..3) {
                        0 => {}
                        1 => unit.push((None, upsert(k, rng.random_range(1..9)))),
                        _ => unit.push((None, upsert(rng.random_range(1..=40), rng.random_range(1..9)))),
                    }
                }
                let end = if rng.random_bool(0.5) { "COMMIT" } else { "ROLLBACK" };
                unit.push((None, end.into()));
            }
            10 => {
                // A pipeline's implicit transaction on one key's shard, after a read on any shard (perhaps), ended
                // by COMMIT or ROLLBACK — perhaps followed by a Flush, whose answers are read — and then what
                // follows in the same pipeline: nothing, a write on any shard, or an error. What the COMMIT
                // committed stays, whatever follows; what the ROLLBACK undid does not.
                let upsert = |k: u32, d: u32| {
                    format!(
                        "INSERT INTO accounts (user_id, balance) VALUES ({k}, {d}) ON CONFLICT (user_id) \
                         DO UPDATE SET balance = accounts.balance + EXCLUDED.balance"
                    )
                };
                if rng.random_bool(0.5) {
                    unit.push((None, format!("SELECT * FROM accounts WHERE user_id = {}", rng.random_range(1..=40))));
                }
                let k = rng.random_range(1..=40);
                for _ in 0..rng.random_range(1..=2) {
                    unit.push((None, upsert(k, rng.random_range(1..9))));
                }
                unit.push((None, if rng.random_bool(0.6) { "COMMIT" } else { "ROLLBACK" }.into()));
                if rng.random_bool(0.5) {
                    unit.push((None, "Flush".into()));
                }
                match rng.random_range(0..3) {
                    0 => {}
                    1 => unit.push((None, upsert(rng.random_range(1..=40), rng.random_range(1..9)))),
                    _ => unit.push((None, "SELECT 1 / 0".into())),
                }
            }
            _ => {
                // Writes in a pipeline's implicit transaction, on one shard or several (one transaction: the
                // router's, committed with two-phase commit); perhaps then transaction control, which answers
                // as in PostgreSQL's implicit transaction, and another write.
                for _ in 0..rng.random_range(2..=3) {
                    unit.push((None, random_write(&mut rng)));
                }
                if rng.random_bool(0.4) {
                    let verbs = ["BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT s"];
                    unit.push((None, verbs[rng.random_range(0..verbs.len())].into()));
                    if rng.random_bool(0.5) {
                        unit.push((None, random_write(&mut rng)));
                    }
                }
            }
        }
        if let Some(lines) = &replay {
            unit = replayed_unit(&lines[n])?;
        }
        let fields: Vec<String> = unit
            .iter()
            .map(
                |(p, sql)| {
                    if sql == "Flush" {
                        sql.clone()
                    } else {
                        format!("{:?}:{sql}", p.unwrap_or(Path::Pipelined))
                    }
                },
            )
            .collect();
        script.push(fields.join("\t"));
        let (mut answers, mut errors) = (Vec::new(), Vec::new());
        for db in [&mut reference, &mut routed] {
            let mut replies = Vec::new();
            let mut sent = 0;
            for (p, sql) in &unit {
                if sql == "Flush" {
                    replies.extend(db.flush_answers(sent)?);
                    continue;
                }
                replies.extend(db.send(p.unwrap_or(Path::Pipelined), sql)?);
                sent += 1;
            }
            if db.piped() {
                replies.extend(db.sync()?);
            }
            // (A transaction left open or failed is rolled back, on both alike.)
            if !matches!(replies.last(), Some(Reply::Ready('I'))) {
                replies.extend(db.query("ROLLBACK")?);
            }
            // (Notices too: PostgreSQL's warnings — no transaction in progress, one already — are part of
            // its answer.)
            let mut outlined = canonical(outline(&replies));
            outlined.extend(integration::wire::notices(&replies));
            answers.push(outlined);
            errors.extend(replies.into_iter().filter(|r| matches!(r, Reply::Error { .. })));
        }
        statements += unit.len();
        let sqls: Vec<&str> = unit.iter().map(|(_, s)| s.as_str()).collect();
        let replay_hint = |script: &[String]| {
            let file = integration::wire::write_replay(&format!("writes-fuzz-{seed}.units"), script);
            format!("replay: WRITES_FUZZ_REPLAY={file} (scripts/fuzz-minimize.py cuts it down)")
        };
        if answers[1] != answers[0] {
            panic!(
                "seed {seed}, unit {n} ({:?}): router, then plain\n  {}\n  {:?}\n  {:?}\n  errors: {errors:?}\n{}",
                unit.iter().map(|u| u.0).collect::<Vec<_>>(),
                sqls.join("\n  "),
                answers[1],
                answers[0],
                replay_hint(&script)
            );
        }
        // (After every unit of a replay: the unit that first leaves other rows is the last of a cut-down file.)
        if replay.is_some() || n % 50 == 49 || n + 1 == units {
            let (got, want) = (shard_rows(&c).await?, plain_rows(&plain).await?);
            if got != want {
                panic!("seed {seed}: the rows after unit {n}\n  {got:?}\n  {want:?}\n{}", replay_hint(&script));
            }
        }
    }
    assert_eq!(prepared(&c).await?, 0, "seed {seed}: no transaction left prepared");
    println!("seed {seed}: {units} units, {statements} statements answered as one PostgreSQL");
    Ok(())
}

/// A unit of a writes fuzz replay file: its statements, each `path:sql` (`Pipelined`: synced once at the
/// unit's end), and `Flush` where the unit had one.
fn replayed_unit(line: &str) -> anyhow::Result<Vec<(Option<Path>, String)>> {
    line.split('\t')
        .map(|f| {
            if f == "Flush" {
                return Ok((None, f.to_string()));
            }
            let (p, sql) =
                f.split_once(':').ok_or_else(|| anyhow::anyhow!("not a statement of a replay file: {f:?}"))?;
            let path = Path::named(p).ok_or_else(|| anyhow::anyhow!("no path {p:?} in {f:?}"))?;
            Ok(((path != Path::Pipelined).then_some(path), sql.to_string()))
        })
        .collect()
}

/// `outline` with each run of rows sorted (a write's RETURNING rows, or keys on several shards, come in no
/// order one server would promise).
fn canonical(mut outline: Vec<String>) -> Vec<String> {
    let mut i = 0;
    while i < outline.len() {
        let run = outline[i..].iter().take_while(|x| x.starts_with("row ")).count();
        outline[i..i + run].sort();
        i += run.max(1);
    }
    outline
}

const WRITES_TABLES: [&str; 4] = [
    "SELECT user_id::text, balance::text, coalesce(note, '-') FROM accounts",
    "SELECT user_id::text, id::text, amount::text FROM moves",
    // (From here on, what every shard has a copy of.)
    "SELECT id::text, coalesce(name, '-') FROM bots",
    // (The tables the workload's DDL makes and drops.)
    "SELECT relname::text FROM pg_class WHERE relname LIKE 'extra%' AND relkind = 'r'",
];

/// The rows of the random workload's tables on the plain server, sorted.
async fn plain_rows(plain: &integration::PgServer) -> anyhow::Result<Vec<Vec<Vec<String>>>> {
    let db = plain.client("postgres").await?;
    let mut out = Vec::new();
    for sql in WRITES_TABLES {
        let mut rows: Vec<Vec<String>> =
            db.query(sql, &[]).await?.iter().map(|r| (0..r.len()).map(|i| r.get(i)).collect()).collect();
        rows.sort();
        out.push(rows);
    }
    Ok(out)
}

/// The same, read from each shard directly and put together (the global table and the DDL's tables once:
/// every shard's copy must be the same).
async fn shard_rows(c: &Cluster) -> anyhow::Result<Vec<Vec<Vec<String>>>> {
    let mut out = vec![Vec::new(); WRITES_TABLES.len()];
    let mut copies: Vec<Option<Vec<Vec<String>>>> = vec![None; WRITES_TABLES.len()];
    for s in &c.shards {
        let db = s.client("postgres").await?;
        for (t, sql) in WRITES_TABLES.iter().enumerate() {
            let mut rows: Vec<Vec<String>> =
                db.query(*sql, &[]).await?.iter().map(|r| (0..r.len()).map(|i| r.get(i)).collect()).collect();
            rows.sort();
            if t >= 2 {
                if let Some(first) = &copies[t] {
                    assert_eq!(&rows, first, "shard {}'s copy of {sql}", s.port);
                }
                copies[t] = Some(rows);
            } else {
                out[t].extend(rows);
            }
        }
    }
    for (t, copy) in copies.into_iter().enumerate().skip(2) {
        out[t] = copy.unwrap_or_default();
    }
    for rows in &mut out {
        rows.sort();
    }
    Ok(out)
}

/// One statement of the random workload: what the router runs on one shard, on several (two-phase), on
/// every shard's copy of the global table, DDL, or reads across shards.
fn random_write(rng: &mut impl rand::Rng) -> String {
    let k = |rng: &mut dyn rand::RngCore| rng.next_u32() % 40 + 1;
    let (k1, k2, k3) = (k(rng), k(rng), k(rng));
    let d = rng.random_range(1..60);
    let b = rng.random_range(1..6);
    match rng.random_range(0..23) {
        0 => format!("INSERT INTO accounts (user_id, balance, note) VALUES ({k1}, {d}, 'n{k2}')"),
        // DDL: on every shard, in the transaction or pipeline it is part of.
        21 => format!("CREATE TABLE IF NOT EXISTS extra{b} (id int)"),
        22 => format!("DROP TABLE IF EXISTS extra{b}"),
        1 => format!(
            "INSERT INTO accounts (user_id, balance) VALUES ({k1}, {d}) ON CONFLICT (user_id) \
             DO UPDATE SET balance = accounts.balance + EXCLUDED.balance RETURNING user_id, balance"
        ),
        // (ON CONFLICT DO NOTHING RETURNING with rows for several shards is refused: the rows it returns
        // would not say which were skipped in VALUES order.)
        2 if rng.random_bool(0.5) => format!(
            "INSERT INTO accounts (user_id, balance) VALUES ({k1}, {d}), ({k2}, 1), ({k3}, 2) \
             ON CONFLICT (user_id) DO NOTHING"
        ),
        2 => {
            format!("INSERT INTO accounts (user_id, balance) VALUES ({k1}, {d}), ({k2}, 1) RETURNING user_id, balance")
        }
        3 => format!("UPDATE accounts SET balance = balance + {d} WHERE user_id = {k1} RETURNING balance"),
        4 => format!("UPDATE accounts SET balance = balance - {d}, note = 'u' WHERE user_id IN ({k1}, {k2})"),
        5 => format!("DELETE FROM accounts WHERE user_id = {k1} RETURNING user_id, balance"),
        6 => format!("DELETE FROM moves WHERE user_id IN ({k1}, {k2}) AND amount > {d}"),
        7 => format!("INSERT INTO moves (user_id, id, amount) VALUES ({k1}, {b}, {d})"),
        8 => format!("INSERT INTO moves (user_id, id, amount) VALUES ({k1}, {b}, {d}), ({k2}, {b}, 1) RETURNING *"),
        9 => format!("UPDATE bots SET name = 'b{d}' WHERE id = {b}"),
        10 => format!(
            "INSERT INTO bots (id, name) VALUES ({b}, 'n{d}') ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name"
        ),
        11 => format!("SELECT balance, note FROM accounts WHERE user_id = {k1}"),
        12 => "SELECT count(*), sum(balance), max(user_id) FROM accounts".into(),
        15 => format!("DELETE FROM accounts WHERE user_id IN ({k1}, {k2}) RETURNING user_id, balance"),
        16 => format!(
            "INSERT INTO moves (user_id, id, amount) VALUES ({k1}, {b}, {d}), ({k2}, {b}, 2) \
             ON CONFLICT (user_id, id) DO UPDATE SET amount = moves.amount + EXCLUDED.amount"
        ),
        17 => format!("DELETE FROM bots WHERE id = {b} RETURNING id, name"),
        18 => format!(
            "UPDATE accounts a SET balance = a.balance + m.amount FROM moves m \
             WHERE m.user_id = a.user_id AND m.id = {b} AND a.user_id = {k1} RETURNING a.user_id, a.balance"
        ),
        19 => format!("SELECT balance FROM accounts WHERE user_id = {k1} FOR UPDATE"),
        20 => format!(
            "INSERT INTO moves (user_id, id, amount) SELECT user_id, {b}, balance FROM accounts WHERE user_id = {k1} \
             ON CONFLICT DO NOTHING"
        ),
        13 => format!("SELECT user_id, balance FROM accounts WHERE user_id IN ({k1}, {k2}, {k3}) ORDER BY user_id"),
        _ => "SELECT user_id, count(*), sum(amount) FROM moves GROUP BY user_id ORDER BY user_id LIMIT 5".into(),
    }
}

/// On one PostgreSQL a pipeline's statements outside a transaction are one implicit transaction, committed at
/// the Sync or not at all. Through the router, writes of one pipeline on several shards' connections commit
/// together, with two-phase commit: a deferred constraint that fails at the commit on one shard leaves nothing
/// on the other; and transaction control inside such a pipeline answers as one server's implicit transaction
/// does (BEGIN takes it over without a warning, COMMIT and ROLLBACK end it with one, a savepoint needs a
/// transaction block). Each pipeline is compared, answers, notices and rows, with one plain PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_writing_on_several_shards_commits_all_of_it_or_nothing() -> anyhow::Result<()> {
    let plain = integration::PgServer::start()?;
    let c = Cluster::hash(2, "")?;
    let schema = "CREATE TABLE accounts (user_id bigint PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0), \
                  code int, UNIQUE (code) DEFERRABLE INITIALLY DEFERRED)";
    for db in [plain.client("postgres").await?, c.client().await?] {
        db.batch_execute(schema).await?;
        db.batch_execute("INSERT INTO accounts VALUES (2, 10, 7)").await?;
    }
    let mut reference = RawClient::connect(plain.port, "postgres", "postgres", &[])?;
    let mut routed = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    // Shards by modulo 2: odd keys on shard 1, even ones on shard 0, where code 7 is taken (user 2).
    let ins = |k: u32, code: u32| format!("INSERT INTO accounts (user_id, balance, code) VALUES ({k}, 10, {code})");
    let s = |x: &str| x.to_string();
    let cases: Vec<Vec<String>> = vec![
        // The second shard's part fails at the commit (deferred): nothing of the pipeline stays.
        vec![ins(1, 1), ins(4, 7)],
        vec![ins(1, 1), ins(4, 4)],
        vec![ins(3, 3), ins(6, 6), s("BEGIN"), ins(5, 5), s("COMMIT")],
        vec![ins(7, 70), ins(8, 80), s("ROLLBACK")],
        vec![ins(9, 90), ins(10, 100), s("SAVEPOINT s"), ins(11, 110)],
        vec![ins(13, 130), ins(14, 140), s("COMMIT"), ins(15, 150)],
        vec![ins(17, 170), ins(18, 180), s("ROLLBACK"), ins(19, 190)],
        // What needs a transaction block fails in an implicit transaction.
        vec![ins(43, 430), ins(44, 440), s("LOCK TABLE accounts IN SHARE MODE")],
        vec![ins(45, 450), ins(46, 460), s("DECLARE c CURSOR FOR SELECT user_id FROM accounts WHERE user_id = 45")],
        vec![ins(57, 570), ins(58, 580), s("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"), ins(59, 590)],
        vec![ins(61, 610), ins(62, 620), s("COMMIT AND CHAIN"), ins(63, 630)],
        vec![ins(65, 650), ins(66, 660), s("ROLLBACK AND CHAIN")],
        vec![ins(67, 670), ins(68, 680), s("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'")],
        // Keys on both shards in one statement after a write on one: one transaction, or none.
        vec![ins(21, 210), s("UPDATE accounts SET balance = balance - 20 WHERE user_id IN (1, 4)")],
        vec![ins(23, 230), s("UPDATE accounts SET balance = balance + 1 WHERE user_id IN (1, 4)")],
        // An error after the second shard joined: all of it rolled back.
        vec![ins(25, 250), ins(26, 260), s("UPDATE accounts SET balance = -1 WHERE user_id = 25")],
        vec![ins(27, 270), ins(28, 280), ins(29, 290), s("SELECT 1 / 0")],
        // BEGIN: the client's transaction from there on, still open after the Sync (then committed).
        vec![ins(31, 310), ins(32, 320), s("BEGIN")],
        vec![ins(33, 330), ins(34, 7), s("BEGIN"), ins(35, 350)],
        // Settings in it.
        vec![ins(47, 470), ins(48, 480), s("SET application_name = 'zz1'"), ins(49, 490), s("SHOW application_name")],
        vec![s("SHOW application_name")],
        vec![ins(51, 510), ins(52, 520), s("SET LOCAL work_mem = '8MB'"), s("SHOW work_mem")],
        vec![s("SHOW work_mem")],
        vec![ins(55, 550), ins(56, 7), s("SET application_name = 'zz2'")],
        vec![s("SHOW application_name")],
        // Reads in between, and writes on one shard only: as before.
        vec![ins(37, 370), s("SELECT count(*) FROM accounts WHERE user_id = 2"), ins(38, 380)],
        vec![ins(39, 390), ins(41, 410)],
    ];
    let all_rows = "SELECT user_id::text, balance::text, code::text FROM accounts ORDER BY user_id";
    for (n, case) in cases.iter().enumerate() {
        let mut answers = Vec::new();
        for db in [&mut reference, &mut routed] {
            answers.push(pipeline(db, case)?);
        }
        assert_eq!(answers[1], answers[0], "pipeline {n} ({case:?}): router, then plain");
        let mut want = rows(&reference.query(all_rows)?);
        let mut got = Vec::new();
        for sh in &c.shards {
            let db = sh.client("postgres").await?;
            for r in db.query(all_rows, &[]).await? {
                got.push(format!("row {},{},{}", r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, String>(2)));
            }
        }
        let by_key = |r: &String| r.split(',').next().and_then(|k| k[4..].parse::<i64>().ok());
        got.sort_by_key(by_key);
        want.sort_by_key(by_key);
        assert_eq!(got, want, "pipeline {n} ({case:?}): the rows after it");
        assert_eq!(prepared(&c).await?, 0, "pipeline {n}: nothing left prepared");
    }
    // `set_config()` there: refused, as in any transaction on several shards (SET does it), the pipeline
    // rolled back.
    for sql in [ins(53, 530), ins(54, 540), s("SELECT set_config('app.x', '1', false)")] {
        routed.send(Path::Pipelined, &sql)?;
    }
    let r = routed.sync()?;
    assert_eq!(error_codes(&r), ["0A000"], "{r:?}");
    let r = routed.query("SELECT count(*) FROM accounts WHERE user_id IN (53, 54)")?;
    assert_eq!(rows(&r), ["row 0"], "{r:?}");
    Ok(())
}

/// A pipeline's statements before its Sync are one implicit transaction on one PostgreSQL. DDL and writes to
/// global tables run on every shard: with writes for one shard before or after them, the router makes the
/// group's work one transaction of its own, committed with two-phase commit (`Session::implicit_to_own`), so a
/// failure at the commit on one shard (a deferred unique violation here) leaves nothing on the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_with_statements_for_every_shard_commits_all_of_it_or_nothing() -> anyhow::Result<()> {
    let schema = [
        "CREATE TABLE accounts (user_id bigint PRIMARY KEY, balance int NOT NULL, code int, UNIQUE (code) DEFERRABLE INITIALLY DEFERRED)",
        "CREATE TABLE g (id int PRIMARY KEY, v int, code int UNIQUE DEFERRABLE INITIALLY DEFERRED)",
    ];
    let (plain, c) = plain_and_cluster(2, "shard-global-tables,g\n", &schema).await?;
    let base = "INSERT INTO accounts (user_id, balance, code) VALUES (2, 10, 7); INSERT INTO g VALUES (100, 0, 7)";
    let mut reference = RawClient::connect(plain.port, "postgres", "postgres", &[])?;
    let mut routed = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    let ins = |k: u32| format!("INSERT INTO accounts (user_id, balance) VALUES ({k}, 10)");
    let bad = "INSERT INTO accounts (user_id, balance, code) VALUES (4, 1, 7)".to_string();
    let s = |x: &str| x.to_string();
    // Shards by modulo 2: code 7 is taken on both (user 2 on shard 0, the global row 100 everywhere).
    let cases: Vec<Vec<String>> = vec![
        vec![ins(1), bad.clone()],
        vec![ins(1), s("CREATE TABLE t1 (id int)"), bad.clone()],
        vec![s("CREATE TABLE t1 (id int)"), bad.clone()],
        vec![bad.clone(), s("CREATE TABLE t1 (id int)")],
        vec![s("CREATE TABLE t1 (id int)"), s("CREATE TABLE t2 (id int)"), bad.clone()],
        vec![s("CREATE TABLE t1 (id int)"), ins(1), ins(3)],
        vec![ins(1), s("INSERT INTO g VALUES (5, 5)"), bad.clone()],
        vec![s("INSERT INTO g VALUES (5, 5)"), bad.clone()],
        vec![bad.clone(), s("UPDATE g SET v = 9")],
        vec![s("UPDATE g SET v = 9"), bad.clone()],
        vec![s("INSERT INTO g VALUES (6, 6, 7)"), ins(1)],
        vec![ins(1), s("INSERT INTO g VALUES (6, 6, 7)")],
        vec![ins(1), s("CREATE TABLE t1 (id int)"), s("SELECT 1 / 0")],
        vec![ins(3), s("CREATE TABLE t2 (id int)")],
        vec![s("CREATE TABLE t3 (id int)"), ins(5), s("SELECT 1 / 0")],
        vec![ins(7), ins(8), s("CREATE TABLE t4 (id int)"), s("SELECT 1 / 0")],
        vec![ins(7), ins(8), s("CREATE TABLE t4 (id int)")],
        vec![ins(9), s("INSERT INTO g VALUES (1, 1)"), s("SELECT 1 / 0")],
        vec![ins(11), s("UPDATE g SET v = 2"), s("SELECT 1 / 0")],
        vec![ins(13), s("INSERT INTO g VALUES (2, 1)")],
        vec![ins(15), ins(16), s("INSERT INTO g VALUES (3, 1)"), s("SELECT 1 / 0")],
        vec![ins(17), s("CREATE TABLE t5 (id int)"), s("CREATE TABLE t5 (id int)")],
        vec![s("CREATE TABLE t5 (id int)"), s("SHOW work_mem"), ins(17), s("BEGIN"), ins(18), s("COMMIT")],
        // Transaction control after a statement for every shard ends all of its work, or makes it the
        // transaction's.
        vec![s("CREATE TABLE t1 (id int)"), s("ROLLBACK")],
        vec![s("CREATE TABLE t1 (id int)"), s("ROLLBACK"), ins(1)],
        vec![s("CREATE TABLE t1 (id int)"), s("COMMIT")],
        vec![s("CREATE TABLE t1 (id int)"), s("COMMIT"), bad.clone()],
        vec![s("CREATE TABLE t1 (id int)"), s("BEGIN"), ins(1), s("ROLLBACK")],
        vec![s("CREATE TABLE t1 (id int)"), s("BEGIN"), bad.clone(), s("COMMIT")],
        vec![s("CREATE TABLE t1 (id int)"), s("BEGIN"), ins(1)],
        vec![ins(1), s("CREATE TABLE t1 (id int)"), s("ROLLBACK"), ins(3)],
        vec![s("CREATE TABLE t1 (id int)"), s("SAVEPOINT a")],
        vec![s("UPDATE g SET v = 3"), s("ROLLBACK")],
        vec![s("UPDATE g SET v = 3"), s("BEGIN"), bad.clone(), s("COMMIT")],
        // Reads and writes on one shard: as before.
        vec![s("SELECT count(*) FROM accounts"), ins(1), ins(3)],
    ];
    let q = "SELECT (SELECT coalesce(string_agg(user_id::text, ',' ORDER BY user_id), '') FROM accounts), \
             (SELECT coalesce(string_agg(id::text || ':' || v, ',' ORDER BY id), '') FROM g) || ' / ' || \
             (SELECT coalesce(string_agg(relname, ',' ORDER BY relname), '') FROM pg_class WHERE relname LIKE 't_')";
    let mut failed = Vec::new();
    for (n, case) in cases.iter().enumerate() {
        let reset = format!("DELETE FROM accounts; DELETE FROM g; DROP TABLE IF EXISTS t1, t2, t3, t4, t5; {base}");
        plain.client("postgres").await?.batch_execute(&reset).await?;
        for sh in &c.shards {
            sh.client("postgres").await?.batch_execute(&reset).await?;
        }
        c.shards[1].client("postgres").await?.batch_execute("DELETE FROM accounts").await?;
        let mut answers = Vec::new();
        for db in [&mut reference, &mut routed] {
            answers.push(pipeline(db, case)?);
        }
        let p = plain.client("postgres").await?.query_one(q, &[]).await?;
        let (pk, pr): (String, String) = (p.get(0), p.get(1));
        let mut keys = Vec::new();
        let mut rest = Vec::new();
        for sh in &c.shards {
            let r = sh.client("postgres").await?.query_one(q, &[]).await?;
            let k: String = r.get(0);
            keys.extend(k.split(',').filter(|x| !x.is_empty()).map(|x| x.parse::<i64>().unwrap()));
            rest.push(r.get::<_, String>(1));
        }
        keys.sort();
        let rk = keys.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(",");
        let ok = answers[0] == answers[1] && rk == pk && rest.iter().all(|r| *r == pr) && prepared(&c).await? == 0;
        if !ok {
            failed.push(n);
        }
        eprintln!(
            "case {n} {}: {case:?}\n  plain  {:?} {pk} {pr}\n  router {:?} {rk} {rest:?}",
            if ok { "ok" } else { "DIFFERS" },
            answers[0],
            answers[1]
        );
    }
    assert!(failed.is_empty(), "{failed:?}");
    Ok(())
}

/// COMMIT AND CHAIN and ROLLBACK AND CHAIN start a new transaction as one ends. Inside a transaction — held,
/// on one shard, on two — the router refuses them (0A000: it would treat them as a plain COMMIT, and the
/// client would go on outside a transaction it believes open); outside one the server answers, 25P01, as one
/// PostgreSQL does. On every protocol path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_and_chain_is_refused_inside_a_transaction_and_answered_outside_one() -> anyhow::Result<()> {
    let c = Cluster::hash(2, "")?;
    c.client().await?.batch_execute("CREATE TABLE accounts (user_id bigint PRIMARY KEY, balance int)").await?;
    for path in PATHS {
        let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
        for end in ["COMMIT AND CHAIN", "ROLLBACK AND CHAIN"] {
            for writes in [
                &[][..],
                &["INSERT INTO accounts VALUES (1, 1)"],
                &["INSERT INTO accounts VALUES (1, 1)", "INSERT INTO accounts VALUES (2, 2)"],
            ] {
                let mut sqls = vec!["BEGIN"];
                sqls.extend(writes);
                sqls.push(end);
                let r = run_all(&mut cl, path, &sqls)?;
                assert_eq!(error_codes(&r), ["0A000"], "{path:?} {sqls:?}: {r:?}");
                assert!(matches!(r.last(), Some(Reply::Ready('E'))), "{path:?} {sqls:?}: {r:?}");
                let r = run(&mut cl, path, "ROLLBACK")?;
                assert_eq!(outline(&r), ["ROLLBACK", "ZI"], "{path:?} {sqls:?}: {r:?}");
                assert_eq!(balances(&c).await?, [Vec::<String>::new(), Vec::new()], "{path:?} {sqls:?}");
            }
            let r = run(&mut cl, path, end)?;
            assert_eq!(error_codes(&r), ["25P01"], "{path:?} {end}: {r:?}");
            assert!(matches!(r.last(), Some(Reply::Ready('I'))), "{path:?} {end}: {r:?}");
        }
    }
    Ok(())
}

/// SET TRANSACTION is part of the transaction on every shard it joins (replayed there, as SET LOCAL is): a
/// transaction made read-only after its first shard's write refuses a write on a second shard, as one
/// PostgreSQL refuses it. Compared with one plain PostgreSQL on every protocol path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_transaction_holds_on_every_shard_of_the_transaction() -> anyhow::Result<()> {
    let schema = "CREATE TABLE accounts (user_id bigint PRIMARY KEY, balance int)";
    let (plain, c) = plain_and_cluster(2, "", &[schema]).await?;
    let scripts: [&[&str]; 7] = [
        &[
            "BEGIN",
            "INSERT INTO accounts VALUES (1, 1)",
            "SET TRANSACTION READ ONLY",
            "INSERT INTO accounts VALUES (2, 2)",
        ],
        &[
            "BEGIN",
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
            "INSERT INTO accounts VALUES (1, 1)",
            "INSERT INTO accounts VALUES (2, 2)",
            "SHOW transaction_isolation",
        ],
        &["BEGIN", "INSERT INTO accounts VALUES (1, 1)", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"],
        // (A read of no table runs outside the transaction the router holds: on one PostgreSQL it took the
        // snapshot, and the isolation level can no longer change.)
        &["BEGIN", "SELECT 1", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"],
        &["BEGIN", "SELECT 1", "SET TRANSACTION READ ONLY", "INSERT INTO accounts VALUES (1, 1)"],
        &[
            "BEGIN ISOLATION LEVEL REPEATABLE READ",
            "SELECT 1",
            "SELECT count(*) FROM accounts WHERE user_id = 2",
            "SELECT count(*) FROM accounts WHERE user_id = 1",
            "SHOW transaction_isolation",
        ],
        // (The level it has already: accepted.)
        &[
            "BEGIN",
            "SELECT 1",
            "SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
            "SHOW transaction_isolation",
            "SELECT count(*) FROM accounts",
        ],
    ];
    for path in PATHS {
        let mut reference = RawClient::connect(plain.port, "postgres", "postgres", &[])?;
        let mut routed = RawClient::connect(c.port, "postgres", "postgres", &[])?;
        for script in scripts {
            let mut answers = Vec::new();
            for db in [&mut reference, &mut routed] {
                let mut r = run_all(db, path, script)?;
                r.extend(run(db, path, "ROLLBACK")?);
                answers.push(outline(&r));
            }
            assert_eq!(answers[1], answers[0], "{path:?} {script:?}: router, then plain");
        }
    }
    Ok(())
}

/// A REPEATABLE READ transaction sees one snapshot from its first read: a read of a global table (which
/// needs no shard) at its start runs inside it, so the same read later does not see what another client
/// committed in between — as on one PostgreSQL; so does one whose session's default_transaction_isolation
/// is SERIALIZABLE. (It ran outside the held transaction, on a fresh snapshot
/// each time.) On every protocol path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeatable_read_keeps_its_first_reads_snapshot() -> anyhow::Result<()> {
    let c = Cluster::hash(2, "shard-global-tables,g\n")?;
    c.client().await?.batch_execute("CREATE TABLE g (id int PRIMARY KEY)").await?;
    let other = c.client().await?;
    for (n, path) in PATHS.into_iter().enumerate() {
        let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
        let count = "SELECT count(*) FROM g";
        // (The level named by BEGIN, or the session's default.)
        for (k, begin) in ["BEGIN ISOLATION LEVEL REPEATABLE READ", "BEGIN"].into_iter().enumerate() {
            if k == 1 {
                let r = run(&mut cl, path, "SET default_transaction_isolation = 'serializable'")?;
                assert_eq!(error_codes(&r), Vec::<String>::new(), "{path:?}: {r:?}");
            }
            let r = run_all(&mut cl, path, &[begin, count])?;
            let before = rows(&r);
            let id = 10 * n + k;
            other.execute(&format!("INSERT INTO g VALUES ({id})"), &[]).await?;
            let r = run(&mut cl, path, count)?;
            assert_eq!(rows(&r), before, "{path:?} {begin}: {r:?}");
            let r = run(&mut cl, path, "COMMIT")?;
            assert_eq!(outline(&r), ["COMMIT", "ZI"], "{path:?} {begin}: {r:?}");
            let r = run(&mut cl, path, count)?;
            assert_eq!(rows(&r), [format!("row {}", 2 * n + k + 1)], "{path:?} {begin}: {r:?}");
        }
    }
    Ok(())
}
