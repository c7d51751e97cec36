//! Differential test of reads across shards: the same schema and data on one plain PostgreSQL and on four
//! hash shards behind the router; a corpus of statements (aggregates, GROUP BY, HAVING, DISTINCT, ORDER BY,
//! LIMIT/OFFSET, joins, subqueries, NULLs, empty results, ties) each run as a simple Query, through
//! Parse/Bind/Execute with text results and with binary results, as a named statement, in a pipeline, and on
//! each of these paths inside a transaction. Every answer must be the plain server's,
//! row for row (as multisets where the statement does not order its rows totally), with the same column
//! names, types and formats and the same command tag — or a refusal (0A000), which the test lists with its
//! reason. Nothing else passes.

use bytes::Bytes;
use futures_util::SinkExt;
use integration::wire::{RawClient, Reply};
use integration::{Cluster, PgServer};

const SCHEMA: &str = "
CREATE TABLE users (user_id bigint PRIMARY KEY, name text, email text, age int, score numeric(10,2),
  ratio float8, active bool, created_at timestamptz, bot_id int, nick varchar(20), label text COLLATE \"und-x-icu\");
CREATE TABLE messages (user_id bigint NOT NULL, id int NOT NULL, role text, tokens int, big bigint,
  content text, created_at timestamptz, PRIMARY KEY (user_id, id));
CREATE TABLE bots (id int PRIMARY KEY, name text);
";

const USERS: usize = 160;

/// The rows, as COPY text.
fn data() -> (String, String, String) {
    let names = ["Ana", "bob", "ana", "Zoë", "Çelik", "zed", "Bob", "émile", "", "O'Neil"];
    let roles = ["user", "assistant", "system"];
    let mut users = String::new();
    let mut messages = String::new();
    for k in 1..=USERS {
        let name = if k % 13 == 0 { "\\N".to_string() } else { names[k % names.len()].to_string() };
        let age = if k % 11 == 0 { "\\N".to_string() } else { ((k * 7) % 50 + 18).to_string() };
        let score = format!("{}.{:02}", (k * 37) % 1000, (k * 13) % 100);
        let ratio = format!("{}", (k % 40) as f64 * 0.25);
        let active = if k % 3 == 0 { "f" } else { "t" };
        let created = format!("2026-01-{:02} {:02}:{:02}:00+00", 1 + k % 28, k % 24, (k * 7) % 60);
        let bot = if k % 9 == 0 { "\\N".to_string() } else { (k % 5 + 1).to_string() };
        users.push_str(&format!(
            "{k}\t{name}\tu{k}@example.com\t{age}\t{score}\t{ratio}\t{active}\t{created}\t{bot}\tn{}\t{name}\n",
            k % 17
        ));
        for id in 1..=(k % 17) {
            let tokens = if (k + id) % 10 == 0 { "\\N".to_string() } else { ((k * id * 13) % 500).to_string() };
            let created = format!("2026-02-{:02} {:02}:00:00+00", 1 + (k + id) % 28, (k * id) % 24);
            messages.push_str(&format!(
                "{k}\t{id}\t{}\t{tokens}\t{}\tmessage {id} of {k}\t{created}\n",
                roles[(k + id) % 3],
                k as i64 * 1_000_000_000_000 + id as i64
            ));
        }
    }
    let bots = (1..=5).map(|b| format!("{b}\tbot{}\n", b % 3)).collect();
    (users, messages, bots)
}

async fn load(db: &tokio_postgres::Client) -> anyhow::Result<()> {
    db.batch_execute(SCHEMA).await?;
    let (users, messages, bots) = data();
    for (table, rows) in [("users", users), ("messages", messages), ("bots", bots)] {
        let sink = db.copy_in(&format!("COPY {table} FROM STDIN")).await?;
        futures_util::pin_mut!(sink);
        sink.send(Bytes::from(rows)).await?;
        sink.close().await?;
    }
    Ok(())
}

/// One statement of the corpus: its text (`$n` parameters), the parameters' text, and whether its ORDER BY
/// orders the rows totally (else rows are compared as multisets).
struct Case {
    sql: String,
    params: Vec<String>,
    ordered: bool,
}

fn case(sql: impl Into<String>, params: &[String], ordered: bool) -> Case {
    Case { sql: sql.into(), params: params.to_vec(), ordered }
}

fn corpus() -> Vec<Case> {
    let mut out = Vec::new();
    let p = |v: &[i64]| -> Vec<String> { v.iter().map(|x| x.to_string()).collect() };
    for t in [0i64, 50, 120, 200, 250, 333, 499, 10_000] {
        let tp = p(&[t]);
        out.push(case("SELECT count(*) FROM messages WHERE tokens > $1", &tp, true));
        out.push(case(
            "SELECT count(tokens), sum(tokens), min(tokens), max(tokens), avg(tokens) FROM messages WHERE tokens < $1",
            &tp,
            true,
        ));
        out.push(case(
            "SELECT count(*) FILTER (WHERE role = 'user'), count(*) FILTER (WHERE tokens > $1), count(*) FROM messages",
            &tp,
            true,
        ));
        out.push(case("SELECT role, count(*), sum(tokens), avg(tokens) FROM messages WHERE tokens > $1 GROUP BY role ORDER BY role", &tp, true));
        out.push(case(
            "SELECT role, count(*) FROM messages WHERE tokens > $1 GROUP BY 1 ORDER BY 2 DESC, 1",
            &tp,
            true,
        ));
        out.push(case("SELECT role, count(*) FROM messages WHERE tokens > $1 GROUP BY role", &tp, false));
        out.push(case(
            "SELECT count(*) FROM users u JOIN messages m ON m.user_id = u.user_id WHERE m.tokens > $1",
            &tp,
            true,
        ));
        out.push(case(
            "SELECT u.user_id, m.id FROM users u JOIN messages m USING (user_id) WHERE m.tokens > $1",
            &tp,
            false,
        ));
        out.push(case("SELECT user_id FROM users u WHERE EXISTS (SELECT 1 FROM messages m WHERE m.user_id = u.user_id AND m.tokens > $1)", &tp, false));
        out.push(case(
            "SELECT role, count(*) FROM messages GROUP BY role HAVING avg(tokens) > $1 ORDER BY role",
            &tp,
            true,
        ));
        out.push(case(
            "SELECT max(tokens) - min(tokens), sum(tokens)::float8 / count(*) FROM messages WHERE tokens > $1",
            &tp,
            true,
        ));
        out.push(case("SELECT user_id, id, tokens FROM messages WHERE tokens > $1 ORDER BY tokens DESC NULLS LAST, user_id, id LIMIT 7", &tp, true));
        out.push(case("SELECT DISTINCT role FROM messages WHERE tokens > $1 ORDER BY role", &tp, true));
        out.push(case(
            "SELECT sum(tokens), avg(tokens), max(tokens) FROM messages WHERE tokens > $1 + 100000",
            &tp,
            true,
        ));
        out.push(case(
            "SELECT user_id, sum(tokens) FROM messages WHERE tokens > $1 GROUP BY user_id HAVING sum(tokens) > 300",
            &tp,
            false,
        ));
    }
    for a in [0i64, 20, 25, 30, 38, 45, 52, 60, 100] {
        let ap = p(&[a]);
        out.push(case("SELECT sum(score), avg(score), min(score), max(score) FROM users WHERE age > $1", &ap, true));
        out.push(case("SELECT sum(ratio), avg(ratio), min(ratio), max(ratio) FROM users WHERE age > $1", &ap, true));
        out.push(case("SELECT bool_and(active), bool_or(active), every(active) FROM users WHERE age < $1", &ap, true));
        out.push(case("SELECT avg(age), count(age), count(*) FROM users WHERE age >= $1", &ap, true));
        out.push(case("SELECT * FROM users WHERE age > $1", &ap, false));
        out.push(case(
            "SELECT name FROM users WHERE age > $1 ORDER BY age DESC NULLS LAST, user_id LIMIT 9",
            &ap,
            true,
        ));
        out.push(case(
            "SELECT age % 3 AS bucket, count(*), avg(score) FROM users WHERE age > $1 GROUP BY 1 ORDER BY 1",
            &ap,
            true,
        ));
        out.push(case("SELECT active, min(name), max(email), min(created_at), max(nick) FROM users WHERE age > $1 GROUP BY active ORDER BY active", &ap, true));
        out.push(case("SELECT DISTINCT bot_id, active FROM users WHERE age > $1", &ap, false));
        out.push(case(
            "SELECT count(*) AS n, max(age) - min(age) AS spread FROM users WHERE age > $1 HAVING count(*) > 0",
            &ap,
            true,
        ));
    }
    for l in [1i64, 3, 10, 50, 500] {
        for o in [0i64, 2, 17, 200] {
            let lo = p(&[l, o]);
            out.push(case("SELECT user_id, name FROM users ORDER BY user_id LIMIT $1 OFFSET $2", &lo, true));
            out.push(case(
                "SELECT user_id, name FROM users ORDER BY name NULLS FIRST, user_id DESC LIMIT $1 OFFSET $2",
                &lo,
                true,
            ));
            out.push(case("SELECT * FROM users ORDER BY created_at DESC, user_id LIMIT $1 OFFSET $2", &lo, true));
            out.push(case("SELECT user_id, id FROM messages ORDER BY big DESC LIMIT $1 OFFSET $2", &lo, true));
            out.push(case(
                "SELECT age, count(*) FROM users GROUP BY age ORDER BY age NULLS FIRST LIMIT $1 OFFSET $2",
                &lo,
                true,
            ));
            out.push(case(
                "SELECT user_id, count(*) FROM messages GROUP BY user_id ORDER BY 2 DESC, 1 LIMIT $1 OFFSET $2",
                &lo,
                true,
            ));
            out.push(case("SELECT DISTINCT age FROM users ORDER BY age LIMIT $1 OFFSET $2", &lo, true));
            out.push(case(
                "SELECT user_id, name AS n FROM users ORDER BY n DESC, user_id LIMIT $1 OFFSET $2",
                &lo,
                true,
            ));
            out.push(case("SELECT date_trunc('day', created_at) AS d, count(*) FROM messages GROUP BY d ORDER BY d LIMIT $1 OFFSET $2", &lo, true));
            out.push(case("SELECT bot_id, count(*) AS n FROM users GROUP BY bot_id HAVING count(*) > $2 ORDER BY n DESC, bot_id NULLS FIRST LIMIT $1", &lo, true));
        }
    }
    for k in [1i64, 2, 5, 8, 40, 77, 159, 160, 161] {
        let kp = p(&[k]);
        out.push(case("SELECT count(*) FROM users WHERE user_id IN (1, 2, 3, $1)", &kp, true));
        out.push(case(
            "SELECT user_id, name FROM users WHERE user_id IN (1, 2, 3, $1) ORDER BY user_id DESC",
            &kp,
            true,
        ));
        out.push(case(
            "SELECT count(*), sum(tokens) FROM messages WHERE user_id = ANY(ARRAY[$1::int8, 7, 9, 10])",
            &kp,
            true,
        ));
        out.push(case(
            "SELECT user_id, count(*) FROM messages WHERE user_id <= $1 GROUP BY user_id ORDER BY user_id",
            &kp,
            true,
        ));
        out.push(case("SELECT * FROM messages WHERE user_id >= $1 ORDER BY user_id, id OFFSET 300", &kp, true));
        out.push(case("SELECT u.user_id, (SELECT count(*) FROM messages m WHERE m.user_id = u.user_id) FROM users u WHERE u.user_id > $1", &kp, false));
        out.push(case("SELECT * FROM users WHERE age > $1 + 1000 ORDER BY user_id LIMIT 5", &kp, true));
        out.push(case(
            "SELECT role, min(created_at), max(content) FROM messages WHERE user_id > $1 GROUP BY role ORDER BY role",
            &kp,
            true,
        ));
        out.push(case(
            "SELECT content FROM messages WHERE user_id > $1 ORDER BY content DESC, user_id, id LIMIT 25",
            &kp,
            true,
        ));
        out.push(case(
            "SELECT count(*) FROM messages m JOIN bots b ON b.id = m.tokens % 5 WHERE m.user_id > $1",
            &kp,
            true,
        ));
    }
    let fixed = [
        "SELECT count(*) FROM users",
        // A column with a collation of its own (ICU): compared under it, not the database's C.
        "SELECT label, user_id FROM users ORDER BY label, user_id LIMIT 40",
        "SELECT DISTINCT label FROM users ORDER BY label",
        "SELECT label, count(*) FROM users GROUP BY label ORDER BY label DESC",
        // Many rows in an order: merged as they come (integer, float, numeric, timestamp keys).
        "SELECT user_id, id, tokens FROM messages ORDER BY tokens DESC NULLS LAST, user_id, id LIMIT 6000 OFFSET 3",
        "SELECT * FROM users ORDER BY score, ratio DESC, created_at, user_id",
        "SELECT user_id, name FROM users ORDER BY active, age NULLS FIRST, user_id DESC",
        "SELECT user_id, id FROM messages WHERE tokens > 100 ORDER BY created_at DESC, big LIMIT 9000",
        "SELECT user_id FROM users ORDER BY name, user_id",
        "SELECT user_id, ARRAY[age, bot_id] AS pair FROM users ORDER BY user_id LIMIT 20",
        "SELECT json_build_object('id', user_id, 'name', name) AS j FROM users ORDER BY user_id DESC LIMIT 7",
        "SELECT role, max(created_at) - min(created_at) AS span FROM messages GROUP BY role ORDER BY role",
        "SELECT name, count(*) FROM users WHERE name LIKE '%e%' OR name = '' GROUP BY name ORDER BY name",
        "SELECT * FROM messages ORDER BY big",
        "SELECT user_id, id, content FROM messages ORDER BY created_at DESC, user_id, id",
        "SELECT count(*), sum(tokens) FROM messages WHERE tokens IS NULL",
        "SELECT avg(tokens)::float8, avg(score)::int FROM messages, users WHERE users.user_id = messages.user_id",
        "SELECT count(*) FROM users WHERE age > 1000",
        "SELECT sum(big), avg(big), min(big), max(big) FROM messages",
        "SELECT min(name), max(name), min(created_at), max(created_at) FROM users",
        "SELECT count(*) FROM users u JOIN bots b ON b.id = u.bot_id",
        "SELECT b.name, count(*) FROM users u JOIN bots b ON b.id = u.bot_id GROUP BY b.name ORDER BY b.name",
        "SELECT count(*) AS n, avg(age)::numeric(10,3) AS a FROM users",
        "SELECT count(*) FROM users LIMIT 1",
        "SELECT role, count(*) FROM messages GROUP BY role HAVING count(*) > 100000 ORDER BY role",
        "SELECT DISTINCT role FROM messages ORDER BY role DESC",
        "SELECT name, count(*) FROM users GROUP BY name ORDER BY name NULLS LAST",
        "SELECT nick, count(*) FROM users GROUP BY nick ORDER BY count(*) DESC, nick",
        "SELECT user_id FROM users WHERE bot_id IN (SELECT id FROM bots WHERE name = 'bot1') ORDER BY user_id",
        "SELECT count(DISTINCT role) FROM messages",
        "SELECT role, count(DISTINCT user_id), sum(DISTINCT user_id), avg(DISTINCT user_id) FROM messages GROUP BY role ORDER BY role",
        "SELECT count(DISTINCT tokens) FROM messages WHERE tokens > 300",
        "SELECT count(DISTINCT name) AS names FROM users HAVING count(DISTINCT name) > 1",
        "SELECT count(DISTINCT role), count(*), sum(tokens), avg(tokens), max(created_at) FROM messages",
        "SELECT user_id % 3 AS g, count(DISTINCT role), min(tokens), count(tokens) FROM messages GROUP BY 1 ORDER BY 1",
        // Refused: no combination of per-shard answers is the answer.
        "SELECT count(DISTINCT role), count(DISTINCT user_id) FROM messages",
        "SELECT string_agg(role, ',' ORDER BY role) FROM messages WHERE user_id < 3",
        "SELECT user_id, row_number() OVER (ORDER BY created_at, user_id) FROM users ORDER BY user_id",
        "SELECT role FROM messages UNION SELECT name FROM users ORDER BY 1",
        "SELECT count(*) FROM users u JOIN messages m ON m.id = u.age",
        // Subqueries: `key IN (SELECT key ...)` whose rows are each shard's, and those that are not; a
        // subquery inside one correlated on the key that is not; sharded reads in VALUES, ORDER BY, a
        // function's arguments (once answered by one shard).
        "SELECT count(*) FROM users WHERE user_id IN (SELECT DISTINCT user_id FROM messages WHERE tokens > 400)",
        "SELECT count(*) FROM users WHERE user_id IN (SELECT user_id FROM messages GROUP BY user_id HAVING count(*) > 10)",
        "SELECT count(*) FROM users u WHERE EXISTS (SELECT 1 FROM messages m WHERE m.user_id = u.user_id AND m.tokens > (SELECT avg(tokens) FROM messages m2 WHERE m2.user_id = m.user_id))",
        "SELECT user_id FROM users WHERE user_id IN (SELECT user_id FROM messages ORDER BY big LIMIT 3) ORDER BY user_id",
        "SELECT count(*) FROM users WHERE user_id IN (SELECT user_id FROM messages OFFSET 100)",
        "SELECT count(*) FROM users WHERE user_id IN (SELECT m.user_id FROM messages m WHERE m.tokens > (SELECT avg(tokens) FROM messages))",
        "SELECT count(*) FROM users u WHERE EXISTS (SELECT 1 FROM messages m WHERE m.user_id = u.user_id AND m.tokens > (SELECT avg(tokens) FROM messages))",
        "VALUES ((SELECT count(*) FROM users))",
        "SELECT * FROM (VALUES ((SELECT max(age) FROM users))) v(a)",
        "SELECT * FROM bots ORDER BY (SELECT count(*) FROM users), id",
        "SELECT * FROM generate_series(1, (SELECT count(*) FROM users)::int) g",
        // Outer joins: a key in an outer join's ON does not filter its preserved side (once routed to one
        // shard); a global table's unmatched rows are kept once, not by every shard (refused).
        "SELECT count(*) FROM users u LEFT JOIN messages m ON m.user_id = u.user_id AND m.user_id = 5",
        "SELECT u.user_id, m.id FROM users u LEFT JOIN messages m ON m.user_id = u.user_id AND u.user_id = 7 ORDER BY u.user_id, m.id",
        "SELECT count(*), count(b.id) FROM users u LEFT JOIN bots b ON b.id = u.bot_id",
        "SELECT count(*), count(m.id) FROM users u FULL JOIN messages m USING (user_id)",
        "SELECT b.id, u.user_id FROM bots b LEFT JOIN users u ON u.bot_id = b.id AND u.age > 60 ORDER BY b.id, u.user_id",
        "SELECT count(*) FROM users u RIGHT JOIN bots b ON b.id = u.bot_id AND u.age > 60",
    ];
    for sql in fixed {
        out.push(case(sql, &[], true));
    }
    out
}

/// What a statement's answer is, for comparison.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Rows { columns: Vec<(String, u32, i32, i16)>, rows: Vec<Vec<Option<String>>>, tag: String },
    Error { code: String, message: String },
}

fn answer(replies: Vec<Reply>, ordered: bool) -> Answer {
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    let mut tag = String::new();
    for r in replies {
        match r {
            Reply::Error { code, message } => return Answer::Error { code, message },
            Reply::Columns(c) => columns = c,
            Reply::Row(v) => rows.push(v),
            Reply::Done(t) => tag = t,
            _ => {}
        }
    }
    if !ordered {
        rows.sort();
    }
    Answer::Rows { columns, rows, tag }
}

/// The statement's text with its parameters written in as literals, for the simple protocol.
fn inline(c: &Case) -> String {
    let mut sql = c.sql.clone();
    for (i, v) in c.params.iter().enumerate().rev() {
        sql = sql.replace(&format!("${}", i + 1), &format!("'{v}'"));
    }
    sql
}

/// One plain PostgreSQL and four shards behind the router, both loaded, and a raw client of each (the servers
/// stop when the first two are dropped).
async fn loaded() -> anyhow::Result<(PgServer, Cluster, RawClient, RawClient)> {
    let plain = PgServer::start()?;
    let c = Cluster::hash(4, "shard-global-tables,bots\n")?;
    load(&plain.client("postgres").await?).await.map_err(|e| anyhow::anyhow!("plain: {e:?}"))?;
    load(&c.client().await?).await.map_err(|e| anyhow::anyhow!("router: {e:?}"))?;
    let reference = RawClient::connect(plain.port, "postgres", "postgres", &[])?;
    let routed = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    Ok((plain, c, reference, routed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_across_shards_give_one_postgresql_answer() -> anyhow::Result<()> {
    let (_plain, _c, mut reference, mut routed) = loaded().await?;

    let cases = corpus();
    let (mut runs, mut different, mut refused) = (0, Vec::new(), Vec::new());
    for case in &cases {
        let params: Vec<Option<&str>> = case.params.iter().map(|p| Some(p.as_str())).collect();
        for mode in ["simple", "text", "binary"] {
            let run = |db: &mut RawClient| match mode {
                "simple" => db.query(&inline(case)),
                "text" => db.extended(&case.sql, &params, false),
                _ => db.extended(&case.sql, &params, true),
            };
            let want = answer(run(&mut reference)?, case.ordered);
            let got = answer(run(&mut routed)?, case.ordered);
            runs += 1;
            if runs == 40 {
                println!("sample: {}\n  {got:?}", case.sql);
            }
            match (&want, &got) {
                _ if want == got => {}
                (Answer::Error { code: a, .. }, Answer::Error { code: b, .. }) if a == b => {}
                (Answer::Rows { .. }, Answer::Error { code, message }) if code == "0A000" => {
                    refused.push(format!("[{mode}] {}\n    {message}", case.sql));
                }
                _ => different.push(format!("[{mode}] {}\n    plain:  {want:?}\n    router: {got:?}", case.sql)),
            }
        }
    }
    println!("{} statements, {runs} runs; {} refused:", cases.len(), refused.len());
    for r in &refused {
        println!("  {r}");
    }
    assert!(different.is_empty(), "{} of {runs} answers differ:\n{}", different.len(), different.join("\n"));
    assert!(cases.len() >= 500, "the corpus has {} statements", cases.len());
    assert!(refused.len() * 10 < runs, "{} of {runs} runs refused", refused.len());
    Ok(())
}

/// The corpus through the paths the first test does not take — a named statement (Parse and Sync, then
/// Bind/Execute/Sync), a pipeline (Parse/Bind/Describe/Execute, then a Sync of its own) — and through every
/// path inside a transaction: BEGIN, the statement, COMMIT, with COMMIT's answer compared too (a statement
/// that fails fails its transaction as on one server: COMMIT answers ROLLBACK). Parameters are bound on every
/// extended path, written into the text on the simple one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_across_shards_on_every_path_in_and_out_of_transactions() -> anyhow::Result<()> {
    use integration::wire::{outline, Path, PATHS};
    let (_plain, _c, mut reference, mut routed) = loaded().await?;

    let cases = corpus();
    let (mut runs, mut different, mut refused) = (0, Vec::new(), 0);
    for case in &cases {
        let params: Vec<Option<&str>> = case.params.iter().map(|p| Some(p.as_str())).collect();
        for path in PATHS {
            for in_txn in [false, true] {
                if !in_txn && matches!(path, Path::Simple | Path::Unnamed) {
                    continue; // (the first test's runs)
                }
                let run = |db: &mut RawClient| -> anyhow::Result<(Answer, Vec<String>)> {
                    if in_txn {
                        db.query("BEGIN")?;
                    }
                    let mut r = match path {
                        Path::Simple => db.query(&inline(case))?,
                        _ => db.send_with(path, &case.sql, &params)?,
                    };
                    if path == Path::Pipelined {
                        r.extend(db.sync()?);
                    }
                    let end = if in_txn { outline(&db.query("COMMIT")?) } else { Vec::new() };
                    Ok((answer(r, case.ordered), end))
                };
                let want = run(&mut reference)?;
                let got = run(&mut routed)?;
                runs += 1;
                match (&want.0, &got.0) {
                    _ if want == got => {}
                    (Answer::Error { code: a, .. }, Answer::Error { code: b, .. }) if a == b && want.1 == got.1 => {}
                    (Answer::Rows { .. }, Answer::Error { code, .. }) if code == "0A000" => refused += 1,
                    _ => different.push(format!(
                        "[{path:?}, in a transaction: {in_txn}] {}\n    plain:  {want:?}\n    router: {got:?}",
                        case.sql
                    )),
                }
            }
        }
    }
    println!("{} statements, {runs} runs, {refused} refused", cases.len());
    assert!(different.is_empty(), "{} of {runs} answers differ:\n{}", different.len(), different.join("\n"));
    assert!(refused * 10 < runs, "{refused} of {runs} runs refused");
    Ok(())
}

/// A combined read that fails inside a transaction fails the transaction, as any error does on one server,
/// through every protocol path: later statements get 25P02 and COMMIT answers ROLLBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_combined_read_fails_its_transaction_on_every_path() -> anyhow::Result<()> {
    use integration::wire::{outline, Path, PATHS};
    let plain = PgServer::start()?;
    let c = Cluster::hash(2, "")?;
    let setup = "CREATE TABLE t (user_id bigint PRIMARY KEY, x int)";
    plain.client("postgres").await?.batch_execute(setup).await?;
    let db = c.client().await?;
    db.batch_execute(setup).await?;
    for k in 1..=6i64 {
        db.execute("INSERT INTO t VALUES ($1, 1)", &[&k]).await?;
        plain.client("postgres").await?.execute("INSERT INTO t VALUES ($1, 1)", &[&k]).await?;
    }
    for path in PATHS {
        let mut outlines = Vec::new();
        for port in [plain.port, c.port] {
            let mut cl = RawClient::connect(port, "postgres", "postgres", &[])?;
            let mut all = Vec::new();
            for (p, sql) in [
                (Path::Simple, "BEGIN"),
                (path, "SELECT count(*) FROM t WHERE 1 / (x - x) = 1"),
                (Path::Simple, "SELECT 1"),
                (Path::Simple, "COMMIT"),
            ] {
                let mut r = cl.send(p, sql)?;
                if p == Path::Pipelined {
                    r.extend(cl.sync()?);
                }
                all.extend(outline(&r));
            }
            outlines.push(all);
        }
        assert_eq!(outlines[0], outlines[1], "{path:?}: plain, then router");
    }
    Ok(())
}

/// Combined reads through every protocol path (simple, unnamed, named, pipelined), outside and inside a
/// transaction: the same answers as one PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_reads_on_every_path_in_and_out_of_transactions() -> anyhow::Result<()> {
    use integration::wire::{Path, PATHS};
    let plain = PgServer::start()?;
    let c = Cluster::hash(4, "shard-global-tables,bots\n")?;
    load(&plain.client("postgres").await?).await?;
    load(&c.client().await?).await?;
    let statements = [
        ("SELECT count(*), sum(tokens), avg(tokens) FROM messages", true),
        ("SELECT role, count(DISTINCT user_id), max(tokens) FROM messages GROUP BY role ORDER BY role", true),
        ("SELECT user_id, name FROM users ORDER BY name NULLS FIRST, user_id LIMIT 10 OFFSET 5", true),
        ("SELECT user_id, id, big FROM messages ORDER BY big DESC", true),
        ("SELECT DISTINCT role FROM messages", false),
    ];
    for path in PATHS {
        for in_txn in [false, true] {
            let mut got = Vec::new();
            for port in [plain.port, c.port] {
                let mut cl = RawClient::connect(port, "postgres", "postgres", &[])?;
                let mut answers = Vec::new();
                if in_txn {
                    cl.query("BEGIN")?;
                }
                for (sql, ordered) in statements {
                    let mut r = cl.send(path, sql)?;
                    if path == Path::Pipelined {
                        r.extend(cl.sync()?);
                    }
                    answers.push(answer(r, ordered));
                }
                if in_txn {
                    cl.query("COMMIT")?;
                }
                got.push(answers);
            }
            assert_eq!(got[0], got[1], "{path:?}, in a transaction: {in_txn}");
        }
    }
    Ok(())
}

/// Views, materialized views, sequences and foreign tables look like tables in a statement's text. Read
/// across shards, the router asks a shard what each name is: a view whose rows are each shard's part (a
/// filter, GROUP BY the key, a view of such a view) is read like a sharded table, one that reads only global
/// tables like a global table, a sequence on the first shard (where nextval() advances it), and a view whose
/// rows each shard would compute from its own part (an aggregate, a LIMIT), or a foreign table, is refused
/// (0A000) — on every protocol path, in and out of a transaction, and again after the name changes meaning
/// through the router. Never the concatenation of each shard's own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_and_sequences_across_shards_give_one_postgresql_answer() -> anyhow::Result<()> {
    use integration::wire::{Path, PATHS};
    let plain = PgServer::start()?;
    let c = Cluster::hash(4, "shard-global-tables,bots\n")?;
    let objects = "
        CREATE VIEW active_users AS SELECT user_id, name, age FROM users WHERE active;
        CREATE VIEW older_active AS SELECT * FROM active_users WHERE age > 30;
        CREATE VIEW per_user AS SELECT user_id, count(*) AS n, sum(tokens) AS tokens FROM messages GROUP BY user_id;
        CREATE VIEW bot_names AS SELECT id, name FROM bots;
        CREATE VIEW user_count AS SELECT count(*) AS n FROM users;
        CREATE VIEW user_count_again AS SELECT n FROM user_count;
        CREATE MATERIALIZED VIEW top_users AS SELECT user_id, score FROM users ORDER BY score DESC LIMIT 5;
        CREATE SEQUENCE counter;
        CREATE FOREIGN DATA WRAPPER nowhere;
        CREATE SERVER elsewhere FOREIGN DATA WRAPPER nowhere;
        CREATE FOREIGN TABLE remote_users (user_id bigint) SERVER elsewhere;
        CREATE TABLE swap (user_id bigint PRIMARY KEY);
    ";
    let pdb = plain.client("postgres").await?;
    load(&pdb).await?;
    pdb.batch_execute(objects).await?;
    let rdb = c.client().await?;
    load(&rdb).await?;
    rdb.batch_execute(objects).await.map_err(|e| anyhow::anyhow!("router: {e:?}"))?;
    for db in [&pdb, &rdb] {
        db.batch_execute("INSERT INTO swap (user_id) VALUES (1), (2), (3), (4), (5)").await?;
        for _ in 0..3 {
            db.query_one("SELECT nextval('counter')", &[]).await?;
        }
    }
    // (statement, ordered, refused by the router)
    let statements = [
        ("SELECT * FROM active_users", false, false),
        ("SELECT count(*), avg(age)::numeric(10,4), max(name) FROM active_users", true, false),
        ("SELECT * FROM older_active ORDER BY user_id", true, false),
        ("SELECT a.user_id, p.n FROM active_users a JOIN per_user p USING (user_id)", false, false),
        ("SELECT sum(n), max(tokens) FROM per_user", true, false),
        ("SELECT * FROM bot_names ORDER BY id", true, false),
        ("SELECT count(*) FROM bot_names", true, false),
        ("SELECT last_value, is_called FROM counter", true, false),
        ("SELECT * FROM active_users WHERE user_id = 7", true, false),
        ("SELECT * FROM user_count", true, true),
        ("SELECT n FROM user_count_again", true, true),
        ("SELECT * FROM top_users", false, true),
        ("SELECT * FROM remote_users", false, true),
        ("SELECT u.user_id, c.last_value FROM users u, counter c", false, true),
    ];
    for path in PATHS {
        for in_txn in [false, true] {
            let mut got = Vec::new();
            for port in [plain.port, c.port] {
                let mut cl = RawClient::connect(port, "postgres", "postgres", &[])?;
                let mut answers = Vec::new();
                if in_txn {
                    cl.query("BEGIN")?;
                }
                for (sql, ordered, refused) in statements {
                    let mut r = cl.send(path, sql)?;
                    if path == Path::Pipelined {
                        r.extend(cl.sync()?);
                    }
                    let a = answer(r, ordered);
                    if port == c.port && refused {
                        match &a {
                            Answer::Error { code, message } if code == "0A000" => {
                                assert!(message.contains("across shards"), "{path:?} {sql}: {message}");
                                answers.push(None);
                            }
                            _ => panic!("{path:?}, in a transaction: {in_txn}: {sql}: not refused: {a:?}"),
                        }
                        if in_txn {
                            // (The refusal failed the transaction, as any error does.)
                            cl.query("ROLLBACK")?;
                            cl.query("BEGIN")?;
                        }
                    } else if refused {
                        answers.push(None);
                        if in_txn {
                            cl.query("ROLLBACK")?;
                            cl.query("BEGIN")?;
                        }
                    } else {
                        assert!(!matches!(a, Answer::Error { .. }), "{path:?} {sql}: {a:?}");
                        answers.push(Some(a));
                    }
                }
                if in_txn {
                    cl.query("COMMIT")?;
                }
                got.push(answers);
            }
            assert_eq!(got[0], got[1], "{path:?}, in a transaction: {in_txn}: plain, then router");
        }
    }

    // nextval() in a read across shards: every shard would advance its own `counter` (refused on its own
    // here: on the plain server it advances the sequence the reads above compare).
    let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    for path in PATHS {
        let mut r = cl.send(path, "SELECT nextval('counter'), user_id FROM users")?;
        if path == Path::Pipelined {
            r.extend(cl.sync()?);
        }
        match answer(r, false) {
            Answer::Error { code, message } if code == "0A000" => assert!(message.contains("nextval()"), "{message}"),
            other => panic!("{path:?}: nextval() across shards: {other:?}"),
        }
    }

    // A name that changes meaning through the router: a session that read `swap` as a table, then another
    // session replaces it with a view of a count.
    let mut first = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    let rows = answer(first.query("SELECT * FROM swap")?, false);
    assert!(matches!(&rows, Answer::Rows { rows, .. } if rows.len() == 5), "{rows:?}");
    rdb.batch_execute("DROP TABLE swap; CREATE VIEW swap AS SELECT count(*) AS user_id FROM users").await?;
    for cl in [&mut first, &mut RawClient::connect(c.port, "postgres", "postgres", &[])?] {
        match answer(cl.query("SELECT * FROM swap")?, false) {
            Answer::Error { code, message } if code == "0A000" => assert!(message.contains("swap"), "{message}"),
            other => panic!("a view of a count read across shards: {other:?}"),
        }
    }
    // ... and back, in a transaction of the session that knew it as a view.
    first.query("BEGIN")?;
    first.query("DROP VIEW swap")?;
    first.query("CREATE TABLE swap (user_id bigint PRIMARY KEY)")?;
    first.query("INSERT INTO swap (user_id) VALUES (1), (2)")?;
    let rows = answer(first.query("SELECT * FROM swap")?, false);
    assert!(matches!(&rows, Answer::Rows { rows, .. } if rows.len() == 2), "{rows:?}");
    first.query("COMMIT")?;
    Ok(())
}

/// Random reads over the corpus's tables — joins on the key and not, outer joins, global tables, subqueries
/// correlated and not, `IN (SELECT ...)` with and without LIMIT, aggregates, GROUP BY, HAVING, DISTINCT,
/// ORDER BY/LIMIT/OFFSET, WITH, UNION ALL — as a simple Query, through Parse/Bind/Execute, as a named
/// statement or in a pipeline, some inside a transaction, on one plain PostgreSQL and through the router on
/// four shards. Every answer must be the plain server's, or a refusal
/// (0A000). Seeded (`CROSS_FUZZ_SEED`, `CROSS_FUZZ_CASES`) so that a failure can be replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_reads_across_shards_give_one_postgresql_answer() -> anyhow::Result<()> {
    use integration::wire::{outline, Path};
    use rand::SeedableRng;
    let seed: u64 = std::env::var("CROSS_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261207);
    let cases: usize = std::env::var("CROSS_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(1500);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let plain = PgServer::start()?;
    let c = Cluster::hash(4, "shard-global-tables,bots\n")?;
    load(&plain.client("postgres").await?).await?;
    load(&c.client().await?).await?;
    let mut reference = RawClient::connect(plain.port, "postgres", "postgres", &[])?;
    let mut routed = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    let (mut different, mut refused, mut answered) = (Vec::new(), 0, 0);
    for n in 0..cases {
        let (sql, ordered) = random_read(&mut rng);
        // (Half as a simple Query; the rest through Parse/Bind/Execute with text or binary results, as a named
        // statement or in a pipeline; one in seven inside a transaction, whose COMMIT's answer is compared too.)
        let in_txn = n % 7 == 3;
        let run = |db: &mut RawClient| -> anyhow::Result<(Answer, Vec<String>)> {
            if in_txn {
                db.query("BEGIN")?;
            }
            let r = match n % 6 {
                2 => db.extended(&sql, &[], false)?,
                5 => db.extended(&sql, &[], true)?,
                4 if n % 12 == 4 => db.send(Path::Named, &sql)?,
                4 => {
                    let mut r = db.send(Path::Pipelined, &sql)?;
                    r.extend(db.sync()?);
                    r
                }
                _ => db.query(&sql)?,
            };
            let end = if in_txn { outline(&db.query("COMMIT")?) } else { Vec::new() };
            Ok((answer(r, ordered), end))
        };
        let want = run(&mut reference)?;
        let got = run(&mut routed)?;
        match (&want.0, &got.0) {
            _ if want == got => answered += 1,
            (Answer::Error { code: a, .. }, Answer::Error { code: b, .. }) if a == b && want.1 == got.1 => {
                answered += 1
            }
            (Answer::Rows { .. }, Answer::Error { code, .. }) if code == "0A000" => refused += 1,
            _ => different.push(format!("{sql}\n    plain:  {want:?}\n    router: {got:?}")),
        }
    }
    println!("seed {seed}: {cases} random reads, {answered} answered as one PostgreSQL, {refused} refused");
    assert!(different.is_empty(), "{} of {cases} answers differ:\n{}", different.len(), different.join("\n"));
    assert!(answered * 2 > cases, "only {answered} of {cases} answered");
    Ok(())
}

/// One random read (and whether its ORDER BY orders its rows totally). With a key condition, only what the
/// router's co-location rule answers on the key's shards (docs/proxy.md, "How a statement is routed": sharded
/// tables joined on the key, subqueries correlated on it or reading only the key's rows); without one,
/// anything, which the router must answer as one PostgreSQL or refuse.
fn random_read(rng: &mut impl rand::Rng) -> (String, bool) {
    let pick =
        |rng: &mut dyn rand::RngCore, xs: &[&str]| -> String { xs[rng.next_u32() as usize % xs.len()].to_string() };
    let k = |rng: &mut dyn rand::RngCore| (rng.next_u32() % 170 + 1).to_string();
    let keyed = rng.random_bool(0.35);
    // FROM: (text, whether `m` is in scope, whether `b` is)
    let (from, has_m, has_b) = match rng.random_range(0..if keyed { 7 } else { 9 }) {
        0 | 1 => ("users u".to_string(), false, false),
        2 => ("users u JOIN messages m ON m.user_id = u.user_id".to_string(), true, false),
        3 => ("users u JOIN messages m USING (user_id)".to_string(), true, false),
        4 => (
            format!(
                "users u LEFT JOIN messages m ON m.user_id = u.user_id AND m.tokens > {}",
                rng.random_range(0..500)
            ),
            true,
            false,
        ),
        5 => ("users u JOIN bots b ON b.id = u.bot_id".to_string(), false, true),
        6 => ("bots b LEFT JOIN users u ON u.bot_id = b.id".to_string(), false, true),
        7 => ("users u JOIN messages m ON m.id = u.age % 17".to_string(), true, false),
        _ => (format!("users u LEFT JOIN messages m ON m.user_id = u.user_id AND m.user_id = {}", k(rng)), true, false),
    };
    let mut conds = Vec::new();
    if keyed {
        conds.push(match rng.random_range(0..3) {
            0 => format!("u.user_id = {}", k(rng)),
            1 => format!("u.user_id IN ({}, {})", k(rng), k(rng)),
            _ => format!("u.user_id = ANY(ARRAY[{}, {}, {}])", k(rng), k(rng), k(rng)),
        });
    }
    for _ in 0..rng.random_range(0..3) {
        conds.push(match rng.random_range(0..if keyed { 9 } else { 12 }) {
            0 => format!("u.age > {}", rng.random_range(15..70)),
            1 if has_m => format!("m.tokens < {}", rng.random_range(0..500)),
            1 => format!("u.age < {}", rng.random_range(15..70)),
            2 => format!(
                "EXISTS (SELECT 1 FROM messages x WHERE x.user_id = u.user_id AND x.tokens > {})",
                rng.random_range(0..500)
            ),
            3 => format!("u.user_id IN (SELECT user_id FROM messages WHERE tokens > {})", rng.random_range(0..500)),
            4 => "u.bot_id IN (SELECT id FROM bots WHERE name = 'bot1')".to_string(),
            5 => "EXISTS (SELECT 1 FROM messages x WHERE x.user_id = u.user_id AND x.tokens > (SELECT avg(tokens) FROM messages y WHERE y.user_id = x.user_id))".to_string(),
            6 => format!("NOT EXISTS (SELECT 1 FROM messages x WHERE x.user_id = u.user_id AND x.role = '{}')", pick(rng, &["user", "system"])),
            7 => format!("u.active = {}", pick(rng, &["true", "false"])),
            8 => format!("u.user_id IN (SELECT DISTINCT user_id FROM messages WHERE role = '{}')", pick(rng, &["user", "system"])),
            // (Not tied to the key: each shard alone cannot answer them.)
            9 => "u.age > (SELECT avg(age) FROM users)".to_string(),
            10 => format!("u.user_id IN (SELECT user_id FROM messages ORDER BY big LIMIT {})", rng.random_range(1..9)),
            _ => "EXISTS (SELECT 1 FROM messages x WHERE x.user_id = u.user_id AND x.tokens > (SELECT avg(tokens) FROM messages))".to_string(),
        });
    }
    let filter = if conds.is_empty() { String::new() } else { format!(" WHERE {}", conds.join(" AND ")) };
    let m_col = if has_m {
        "m.id"
    } else if has_b {
        "b.id"
    } else {
        "u.age"
    };
    match rng.random_range(0..9) {
        // Rows, totally ordered (and perhaps limited).
        0 => {
            let limit = match rng.random_range(0..3) {
                0 => format!(" LIMIT {}", rng.random_range(1..30)),
                1 => format!(" LIMIT {} OFFSET {}", rng.random_range(1..30), rng.random_range(0..20)),
                _ => String::new(),
            };
            (format!("SELECT u.user_id, {m_col} FROM {from}{filter} ORDER BY u.user_id, {m_col}{limit}"), true)
        }
        // Rows, any order.
        1 => (format!("SELECT u.user_id, u.name, {m_col} FROM {from}{filter}"), false),
        // Aggregates.
        2 => (format!("SELECT count(*), count({m_col}), sum(u.age), max(u.name) FROM {from}{filter}"), true),
        4 => (format!("SELECT DISTINCT u.active, u.bot_id FROM {from}{filter}"), false),
        5 => {
            let g = pick(rng, &["u.active", "u.bot_id", "u.age % 4"]);
            let n = rng.random_range(0..30);
            (format!("SELECT {g}, count(*), sum(u.age) FROM {from}{filter} GROUP BY {g} HAVING count(*) > {n} ORDER BY 1"), true)
        }
        6 => (
            format!(
                "SELECT count(DISTINCT u.bot_id), avg(u.age)::numeric(10,4), min(u.created_at) FROM {from}{filter}"
            ),
            true,
        ),
        7 => {
            (format!("WITH w AS (SELECT u.user_id, u.age FROM {from}{filter}) SELECT count(*), max(age) FROM w"), true)
        }
        8 => {
            (format!("SELECT u.user_id FROM {from}{filter} UNION ALL SELECT user_id FROM users WHERE age < 20"), false)
        }
        // Groups.
        _ => {
            let g = pick(rng, &["u.active", "u.user_id", "u.bot_id", "u.age % 3"]);
            (format!("SELECT {g}, count(*), min({m_col}) FROM {from}{filter} GROUP BY {g} ORDER BY 1"), true)
        }
    }
}
