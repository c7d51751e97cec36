//! Where the destination is known, the router relays what the client sent and PostgreSQL answers it: inside
//! a transaction bound to a shard, with one node, under the tenant strategy. Elsewhere a statement sqlparser
//! cannot parse is read by its words: to any shard when it names no sharded table, refused when it does.
//! Also: `pgbench -i` through the router, COPY TO merged in both protocols, cursors WITH HOLD, client-driven
//! two-phase commit, INSERT ... ON CONFLICT and INSERT ... SELECT by the inserted key.

use integration::wire::{error_codes, outline, Path, RawClient, Reply, PATHS};
use integration::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsed_statements_reach_postgresql_where_the_destination_is_known() -> anyhow::Result<()> {
    let c = Cluster::hash(2, "shard-global-tables,bots\n")?;
    let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    for sql in [
        "CREATE TABLE users (user_id bigint PRIMARY KEY, name text)",
        "CREATE TABLE bots (id int PRIMARY KEY, name text)",
    ] {
        assert!(error_codes(&cl.query(sql)?).is_empty(), "{sql}");
    }
    // Outside a transaction: a syntax error naming no sharded table reaches a server, which answers 42601.
    let r = cl.query("SELEC 1")?;
    assert_eq!(error_codes(&r), vec!["42601"], "{r:?}");
    let r = cl.query("SELECT * FROM bots WHERE id = ANY('{1}') AND name SIMILAR TO 'x' ESCAPE")?;
    assert_eq!(error_codes(&r), vec!["42601"], "PostgreSQL's own error: {r:?}");
    // Naming a sharded table: refused, with the reason.
    let r = cl.query("SELECT * FROM users WHERE user_id = 1 AND name SIMILAR TO 'x' ESCAPE")?;
    assert_eq!(error_codes(&r), vec!["0A000"], "{r:?}");
    // Inside a transaction bound to a shard: the server answers, whatever sqlparser thinks of it.
    cl.query("BEGIN")?;
    cl.query("INSERT INTO users (user_id, name) VALUES (1, 'one')")?;
    let r = cl.query("SELECT name FROM users WHERE user_id = 1 AND name SIMILAR TO 'o%' ESCAPE '!'")?;
    assert!(error_codes(&r).is_empty() && outline(&r).contains(&"row one".to_string()), "{r:?}");
    let r = cl.query("SELEC 1")?;
    assert_eq!(error_codes(&r), vec!["42601"], "{r:?}");
    let r = cl.query("ROLLBACK")?;
    assert_eq!(outline(&r), vec!["ROLLBACK", "ZI"]);
    // A table created and filled without a column list in one query string: refused with the reason, before
    // anything ran (the key's place is read before the string runs: not "relation does not exist").
    let r = cl.query("CREATE TABLE fresh (user_id bigint PRIMARY KEY, v int); INSERT INTO fresh VALUES (1, 2)")?;
    assert_eq!(error_codes(&r), vec!["0A000"], "{r:?}");
    let r = cl.query("SELECT to_regclass('fresh') IS NULL")?;
    assert_eq!(outline(&r), vec!["row t", "SELECT 1", "ZI"], "nothing created: {r:?}");

    // One node: everything is PostgreSQL's to answer.
    let one = Cluster::hash(1, "")?;
    let mut cl = RawClient::connect(one.port, "postgres", "postgres", &[])?;
    cl.query("CREATE TABLE users (user_id bigint PRIMARY KEY, name text)")?;
    let r = cl.query("INSERT INTO users VALUES (1, 'no column list'), (2, 'keys') ON CONFLICT DO NOTHING")?;
    assert!(error_codes(&r).is_empty(), "{r:?}");
    let r = cl.query("CREATE TABLE fresh (user_id bigint PRIMARY KEY, v int); INSERT INTO fresh VALUES (1, 2)")?;
    assert_eq!(outline(&r), vec!["CREATE TABLE", "INSERT 0 1", "ZI"], "{r:?}");
    let r = cl.query("UPDATE users SET user_id = user_id + 10")?;
    assert!(error_codes(&r).is_empty(), "the key changes: fine on one node: {r:?}");
    let r = cl.query("SELEC 1")?;
    assert_eq!(error_codes(&r), vec!["42601"], "{r:?}");
    // BEGIN is not held: SAVEPOINT, SET LOCAL and DECLARE run at once.
    for sql in ["BEGIN", "SAVEPOINT a", "SET LOCAL work_mem = '8MB'", "DECLARE c CURSOR FOR SELECT 1", "FETCH c"] {
        let r = cl.query(sql)?;
        assert!(error_codes(&r).is_empty(), "{sql}: {r:?}");
    }
    let r = cl.query("SHOW work_mem")?;
    assert!(outline(&r).contains(&"row 8MB".to_string()), "{r:?}");
    let r = cl.query("COMMIT")?;
    assert_eq!(outline(&r), vec!["COMMIT", "ZI"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_sessions_are_relayed_as_they_are() -> anyhow::Result<()> {
    let c = Cluster::start(
        2,
        "shard-strategy,tenant\nshard-tenant-db-prefix,gb_tenant_\nshard-auto-create,true\nrouter-auth,trust\n",
        |i, s| format!("shard-node-n{i},{}\n", s.url("postgres")),
    )?;
    let mut cl = RawClient::connect(c.port, "postgres", "gb_tenant_acme", &[])?;
    for sql in [
        "CREATE TABLE notes (id serial PRIMARY KEY, body text)",
        "BEGIN",
        "SAVEPOINT s",
        "INSERT INTO notes (body) VALUES ('a') RETURNING id",
        "ROLLBACK TO SAVEPOINT s",
        "INSERT INTO notes (body) VALUES ('b')",
        "COMMIT",
    ] {
        let r = cl.query(sql)?;
        assert!(error_codes(&r).is_empty(), "{sql}: {r:?}");
    }
    let r = cl.query("SELECT body FROM notes")?;
    assert_eq!(outline(&r), vec!["row b", "SELECT 1", "ZI"]);
    let r = cl.query("SELEC 1")?;
    assert_eq!(error_codes(&r), vec!["42601"], "{r:?}");
    // COPY passes through (binary too: nothing to split).
    let r = cl.query("COPY notes (body) TO STDOUT (FORMAT BINARY)")?;
    assert!(error_codes(&r).is_empty(), "{r:?}");
    Ok(())
}

#[test]
fn pgbench_initializes_through_the_router() -> anyhow::Result<()> {
    let c = Cluster::start(
        2,
        "shard-strategy,hash\nshard-count,2\nshard-key,aid\nrouter-auth,trust\n\
         shard-global-tables,pgbench_branches,pgbench_tellers\n",
        |i, s| format!("shard-node-{i},{}\n", s.url("postgres")),
    )?;
    let out = std::process::Command::new("pgbench")
        .args(["-i", "-s", "2", "-h", "127.0.0.1", "-p", &c.port.to_string(), "-U", "postgres", "postgres"])
        .output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("done"), "{text}");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut accounts = 0;
        for (i, s) in c.shards.iter().enumerate() {
            let db = s.client("postgres").await?;
            let n: i64 = db.query_one("SELECT count(*) FROM pgbench_accounts", &[]).await?.get(0);
            let wrong: i64 =
                db.query_one("SELECT count(*) FROM pgbench_accounts WHERE aid % 2 <> $1", &[&(i as i32)]).await?.get(0);
            assert_eq!(wrong, 0, "shard {i} holds only its accounts");
            accounts += n;
            let branches: i64 = db.query_one("SELECT count(*) FROM pgbench_branches", &[]).await?.get(0);
            assert_eq!(branches, 2, "a global table on every shard");
        }
        assert_eq!(accounts, 200_000);
        anyhow::Ok(())
    })?;
    // And pgbench runs on what it made.
    let out = std::process::Command::new("pgbench")
        .args(["-S", "-t", "50", "-M", "extended", "-h", "127.0.0.1", "-p", &c.port.to_string(), "-U", "postgres"])
        .arg("postgres")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("number of failed transactions: 0"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_cursors_two_phase_commit_and_inserts() -> anyhow::Result<()> {
    let c = Cluster::hash(2, "")?;
    let db = c.client().await?;
    db.batch_execute(
        "CREATE TABLE users (user_id bigint PRIMARY KEY, name text); CREATE TABLE staged (user_id bigint, name text)",
    )
    .await?;
    for k in 0..6i64 {
        db.execute("INSERT INTO users (user_id, name) VALUES ($1, $2)", &[&k, &format!("u{k}")]).await?;
    }
    // COPY TO from every shard, through the extended protocol: one CopyOutResponse, every row, one CopyDone.
    let stream = db.copy_out("COPY users TO STDOUT").await?;
    let chunks: Vec<bytes::Bytes> = futures_util::TryStreamExt::try_collect(stream).await?;
    let text: String = chunks.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort();
    assert_eq!(lines.len(), 6, "{text}");
    assert_eq!(lines[0], "0\tu0");

    // A cursor WITH HOLD outlives its transaction: under transaction pooling its connection stays the
    // client's until CLOSE (FETCH after the commit finds it); under session pooling too.
    let s = Cluster::hash(2, "pool-mode,session\n")?;
    for port in [c.port, s.port] {
        let mut cl = RawClient::connect(port, "postgres", "postgres", &[])?;
        if port == s.port {
            cl.query("CREATE TABLE users (user_id bigint PRIMARY KEY, name text)")?;
            cl.query("INSERT INTO users (user_id, name) VALUES (3, 'three')")?;
        }
        for sql in ["BEGIN", "DECLARE h CURSOR WITH HOLD FOR SELECT name FROM users WHERE user_id = 3", "COMMIT"] {
            assert!(error_codes(&cl.query(sql)?).is_empty(), "{sql}");
        }
        // Other clients come and go meanwhile.
        let other = c.client().await?;
        other.query_one("SELECT 1", &[]).await?;
        let r = cl.query("FETCH 1 FROM h")?;
        let row = if port == s.port { "row three" } else { "row u3" };
        assert_eq!(outline(&r), vec![row, "FETCH 1", "ZI"], "{r:?}");
        assert!(error_codes(&cl.query("CLOSE h")?).is_empty());
        let r = cl.query("FETCH 1 FROM h")?;
        assert_eq!(error_codes(&r), vec!["34000"], "closed: {r:?}");
    }

    // Client-driven two-phase commit on one shard, committed from another session.
    let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    for sql in ["BEGIN", "UPDATE users SET name = 'prepared' WHERE user_id = 3", "PREPARE TRANSACTION 'router-gid'"] {
        let r = cl.query(sql)?;
        assert!(error_codes(&r).is_empty(), "{sql}: {r:?}");
    }
    let mut other = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    let r = other.query("COMMIT PREPARED 'router-gid'")?;
    assert_eq!(outline(&r), vec!["COMMIT PREPARED", "ZI"], "{r:?}");
    let name: String = db.query_one("SELECT name FROM users WHERE user_id = 3", &[]).await?.get(0);
    assert_eq!(name, "prepared");
    let r = other.query("COMMIT PREPARED 'router-gid'")?;
    assert_eq!(error_codes(&r), vec!["42704"], "no such prepared transaction any more: {r:?}");

    // INSERT ... ON CONFLICT DO UPDATE that sets the key would move the row: refused, as UPDATE of the key.
    let e = db
        .execute(
            "INSERT INTO users (user_id, name) VALUES (1, 'x') ON CONFLICT (user_id) DO UPDATE SET user_id = 2",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("0A000"), "{e}");
    // INSERT ... SELECT goes where the inserted key says...
    db.execute("INSERT INTO staged (user_id, name) SELECT 5, 'five'", &[]).await?;
    let on1: i64 = c.shards[1].client("postgres").await?.query_one("SELECT count(*) FROM staged", &[]).await?.get(0);
    assert_eq!(on1, 1, "key 5 is on shard 1");
    // ...with a read of that shard's rows; refused when the read is of another shard.
    db.execute("INSERT INTO staged (user_id, name) SELECT user_id, name FROM users WHERE user_id = 4", &[]).await?;
    let on0: i64 = c.shards[0].client("postgres").await?.query_one("SELECT count(*) FROM staged", &[]).await?.get(0);
    assert_eq!(on0, 1, "key 4 is on shard 0");
    let e = db
        .execute("INSERT INTO staged (user_id, name) SELECT 5, name FROM users WHERE user_id = 4", &[])
        .await
        .unwrap_err();
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("0A000"), "{e}");
    Ok(())
}

/// Server-side prepared statements: a statement parsed again after a schema change (DROP/CREATE TYPE) is
/// parsed anew on the server, in both pooling modes; under session pooling what the client closes or
/// deallocates is gone from the server too (`pg_prepared_statements` shows what the client prepared).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_follow_schema_changes_and_deallocation() -> anyhow::Result<()> {
    for mode in ["transaction", "session"] {
        let c = Cluster::hash(1, &format!("pool-mode,{mode}\npool-size,1\n"))?;
        let db = c.client().await?;
        db.batch_execute("CREATE TYPE pe AS ENUM ('a', 'b'); CREATE TABLE pt (v pe[])").await?;
        let insert = "INSERT INTO pt (v) VALUES ($1::text::pe[])";
        let st = db.prepare(insert).await?;
        db.execute(&st, &[&"{a}"]).await?;
        drop(st);
        db.batch_execute(
            "DROP TABLE pt; DROP TYPE pe; CREATE TYPE pe AS ENUM ('a', 'b', 'c'); CREATE TABLE pt (v pe[])",
        )
        .await?;
        let st = db.prepare(insert).await?;
        db.execute(&st, &[&"{c}"]).await.map_err(|e| anyhow::anyhow!("{mode} pooling: {e}"))?;
        if mode == "session" {
            // tokio-postgres closed the first statement (Close) when it was dropped.
            let n: i64 = db
                .query_one("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'INSERT INTO pt%'", &[])
                .await?
                .get(0);
            assert_eq!(n, 1, "the closed statement is gone from the server");
            db.batch_execute("DEALLOCATE ALL").await?;
            let n: i64 = db.query_one("SELECT count(*) FROM pg_prepared_statements", &[]).await?.get(0);
            // (The count itself is a prepared statement now.)
            assert!(n <= 1, "DEALLOCATE ALL reached the server: {n}");
        }
    }
    Ok(())
}

/// What a server would refuse at connection, the router refuses at connection; under session pooling a
/// terminated backend ends the client's connection, as it would on the server — on every protocol path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_are_the_servers() -> anyhow::Result<()> {
    let c = Cluster::hash(1, "pool-mode,session\n")?;
    let conn = format!("host=127.0.0.1 port={} user=postgres dbname=nosuchdb", c.port);
    let e = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.err().expect("refused");
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("3D000"), "{e}");
    for (path, begin) in PATHS.into_iter().flat_map(|p| [(p, false), (p, true)]) {
        let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
        if begin {
            cl.query("BEGIN")?;
        }
        // The backend's FATAL reaches the client, then the end of its connection (no ReadyForQuery).
        let replies = send_synced(&mut cl, path, TERMINATE_OWN_BACKEND);
        assert!(
            replies.is_err(),
            "{path:?} (BEGIN: {begin}): the client's connection ended with its backend: {replies:?}"
        );
        assert!(cl.query("SELECT 1").is_err(), "{path:?} (BEGIN: {begin})");
    }
    // Transaction pooling: the client's connection outlives the server connection, in a transaction or
    // not; every path tells it the same (the server's FATAL, then 08006 naming that server).
    let c = Cluster::hash(1, "")?;
    let server = format!("127.0.0.1:{}: ", c.shards[0].port);
    let mut seen = None;
    for (path, begin) in PATHS.into_iter().flat_map(|p| [(p, false), (p, true)]) {
        let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
        if begin {
            cl.query("BEGIN")?;
        }
        let replies = send_synced(&mut cl, path, TERMINATE_OWN_BACKEND)?;
        let errors: Vec<(String, String)> = replies
            .iter()
            .filter_map(|r| match r {
                Reply::Error { code, message } => Some((code.clone(), message.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            errors.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
            ["57P01", "08006"],
            "{path:?}: {replies:?}"
        );
        assert!(errors[1].1.starts_with(&server), "{path:?}: {:?} names the server", errors[1].1);
        assert_eq!(replies.last(), Some(&Reply::Ready('I')), "{path:?}: the transaction is gone: {replies:?}");
        match &seen {
            None => seen = Some(errors),
            Some(first) => assert_eq!(first, &errors, "{path:?} (BEGIN: {begin}) against Simple"),
        }
        assert_eq!(outline(&cl.query("SELECT 1")?), ["row 1", "SELECT 1", "ZI"], "{path:?} (BEGIN: {begin})");
    }
    Ok(())
}

/// A temporary object stays on its server connection: under transaction pooling another client would meet
/// it there (42P07 on its own CREATE, or its rows read in place of a table of the same name), and it would
/// not follow its client. Refused on every path, but for a table dropped at its transaction's commit;
/// under session pooling the connection is the client's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_objects_under_transaction_pooling() -> anyhow::Result<()> {
    // One server connection: every client's statements use it.
    let c = Cluster::hash(1, "pool-size,1\n")?;
    let temp_objects = "SELECT count(*) FROM pg_class WHERE relpersistence = 't'";
    for path in PATHS {
        let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
        for sql in [
            "CREATE TEMP TABLE tt (x int)",
            "CREATE TABLE pg_temp.tt (x int)",
            "CREATE TEMP VIEW tv AS SELECT 1",
            "SELECT 1 AS x INTO TEMP tt",
        ] {
            let r = send_synced(&mut cl, path, sql)?;
            assert_eq!(error_codes(&r), ["0A000"], "{path:?}: {sql}: {r:?}");
            assert!(format!("{r:?}").contains("ON COMMIT DROP"), "{path:?}: the reason says what works: {r:?}");
        }
        for sql in [
            "BEGIN",
            "CREATE TEMP TABLE tt (x int) ON COMMIT DROP",
            "INSERT INTO tt VALUES (1)",
            "SELECT count(*) FROM tt",
            "COMMIT",
        ] {
            let r = send_synced(&mut cl, path, sql)?;
            assert!(error_codes(&r).is_empty(), "{path:?}: {sql}: {r:?}");
        }
        let mut other = RawClient::connect(c.port, "postgres", "postgres", &[])?;
        assert_eq!(outline(&other.query(temp_objects)?), ["row 0", "SELECT 1", "ZI"], "{path:?}");
    }
    let c = Cluster::hash(1, "pool-mode,session\n")?;
    let mut cl = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    for path in PATHS {
        let r = send_synced(&mut cl, path, &format!("CREATE TEMP TABLE t{} (x int)", path as u8))?;
        assert!(error_codes(&r).is_empty(), "session pooling, {path:?}: {r:?}");
    }
    assert_eq!(outline(&cl.query(temp_objects)?), ["row 4", "SELECT 1", "ZI"]);
    Ok(())
}

/// `set_config(name, value, false)` changes a session setting as SET does: under transaction pooling it
/// follows its client (read back from the server) and no other client's connection keeps it — its name
/// written in the statement, a literal of a simple query, a Bind parameter or computed; a local one ends
/// with its transaction. On every path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_follows_its_client_only() -> anyhow::Result<()> {
    // One server connection: every client's statements use it.
    let c = Cluster::hash(1, "pool-size,1\n")?;
    let value = |cl: &mut RawClient, sql: &str| -> anyhow::Result<String> {
        let r = cl.query(sql)?;
        match r.iter().find_map(|x| if let Reply::Row(v) = x { Some(v.clone()) } else { None }) {
            Some(v) => Ok(v[0].clone().unwrap_or_else(|| "NULL".into())),
            None => anyhow::bail!("{sql}: no row: {r:?}"),
        }
    };
    for path in PATHS {
        let mut a = RawClient::connect(c.port, "postgres", "postgres", &[])?;
        let mut b = RawClient::connect(c.port, "postgres", "postgres", &[])?;
        for sql in [
            "SELECT set_config('work_mem', '9MB', false)",
            "SELECT set_config('app.tenant', 'acme', false), set_config('app.user', '7', false)",
        ] {
            let r = send_synced(&mut a, path, sql)?;
            assert!(error_codes(&r).is_empty(), "{path:?}: {sql}: {r:?}");
        }
        assert_eq!(value(&mut b, "SHOW work_mem")?, "4MB", "{path:?}: not on another client's connection");
        // (Empty rather than NULL once a custom setting was made on the connection: a server keeps its name.)
        let tenant = "SELECT coalesce(current_setting('app.tenant', true), '')";
        assert_eq!(value(&mut b, tenant)?, "", "{path:?}");
        assert_eq!(value(&mut a, "SHOW work_mem")?, "9MB", "{path:?}: it follows its client");
        assert_eq!(value(&mut a, "SELECT current_setting('app.tenant') || current_setting('app.user')")?, "acme7");
        for sql in ["BEGIN", "SELECT set_config('work_mem', '5MB', true)", "COMMIT"] {
            let r = send_synced(&mut a, path, sql)?;
            assert!(error_codes(&r).is_empty(), "{path:?}: {sql}: {r:?}");
        }
        assert_eq!(value(&mut a, "SHOW work_mem")?, "9MB", "{path:?}: a local one ended with its transaction");
        // A computed name: every setting the session has is read back (a custom one, which pg_settings does
        // not show, does not follow the client; the connection is reset before its next use).
        let r = send_synced(&mut a, path, "SELECT set_config(lower('WORK_MEM'), '7MB', false)")?;
        assert!(error_codes(&r).is_empty(), "{path:?}: {r:?}");
        let r = send_synced(&mut a, path, "SELECT set_config(lower('APP.SECRET'), 'x', false)")?;
        assert!(error_codes(&r).is_empty(), "{path:?}: {r:?}");
        assert_eq!(value(&mut b, "SHOW work_mem")?, "4MB", "{path:?}");
        assert_eq!(value(&mut b, "SELECT coalesce(current_setting('app.secret', true), '')")?, "", "{path:?}");
        assert_eq!(value(&mut a, "SHOW work_mem")?, "7MB", "{path:?}");
    }
    // Names in Bind parameters (tokio-postgres binds them).
    let a = c.client().await?;
    let b = c.client().await?;
    a.query("SELECT set_config($1, $2, false)", &[&"app.tenant", &"acme"]).await?;
    let seen: String = b.query_one("SELECT coalesce(current_setting('app.tenant', true), '')", &[]).await?.get(0);
    assert_eq!(seen, "", "not on another client's connection");
    let mine: String = a.query_one("SELECT current_setting('app.tenant')", &[]).await?.get(0);
    assert_eq!(mine, "acme");
    Ok(())
}

/// One plain PostgreSQL and a router on two hash shards (`pool-size` 2: two clients share its connections),
/// each given `setup`: statements separated by "; " (the router's DDL is not sent in one string with writes).
async fn plain_and_two_shards(setup: &str) -> anyhow::Result<(integration::PgServer, Cluster)> {
    let plain = integration::PgServer::start()?;
    let c = Cluster::hash(2, "pool-size,2\n")?;
    plain.client("postgres").await?.batch_execute(setup).await?;
    let db = c.client().await?;
    for sql in setup.split("; ") {
        db.batch_execute(sql).await?;
    }
    Ok((plain, c))
}

/// `script` on every path, each statement synced on its own, by a new client of the plain server and one of the
/// router: every answer must be the plain server's.
fn same_on_every_path(plain: &integration::PgServer, c: &Cluster, script: &[&str]) -> anyhow::Result<()> {
    for path in PATHS {
        let mut p = RawClient::connect(plain.port, "postgres", "postgres", &[])?;
        let mut r = RawClient::connect(c.port, "postgres", "postgres", &[])?;
        for sql in script {
            let (want, got) = (outline(&send_synced(&mut p, path, sql)?), outline(&send_synced(&mut r, path, sql)?));
            assert_eq!(got, want, "{path:?}: {sql}: router, then plain");
        }
    }
    Ok(())
}

const TERMINATE_OWN_BACKEND: &str = "SELECT pg_terminate_backend(pg_backend_pid())";

/// `sql` on `path`: its replies up to ReadyForQuery (a pipeline synced).
fn send_synced(cl: &mut RawClient, path: Path, sql: &str) -> anyhow::Result<Vec<Reply>> {
    match (path, cl.send(path, sql)) {
        (Path::Pipelined, Ok(_)) => cl.sync(),
        (_, r) => r,
    }
}

/// A seeded random session of settings, the same on one plain PostgreSQL and through the router on two shards
/// under transaction pooling, for two clients whose statements interleave on shared server connections, each
/// on a random path (a Query, the unnamed statement, a named one, or a pipeline of two to four synced once,
/// some with a Flush inside):
/// SET, SET LOCAL, RESET, RESET ALL, `set_config()` (session and local), SHOW, inside and outside
/// transactions that commit, roll back, fail and go back to savepoints — and reads whose text depends on the
/// settings (DateStyle, TimeZone, IntervalStyle, extra_float_digits, bytea_output), by key and across shards.
/// Every answer must be the plain server's for the same client: what a client set follows it and no other.
/// Seeded (`SETTINGS_FUZZ_SEED`, `SETTINGS_FUZZ_STEPS`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_settings_follow_their_client_as_on_one_postgresql() -> anyhow::Result<()> {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("SETTINGS_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261207);
    let steps: usize = std::env::var("SETTINGS_FUZZ_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(800);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (plain, c) = plain_and_two_shards(
        "CREATE TABLE t (user_id bigint PRIMARY KEY, at timestamptz, f float8, b bytea, iv interval); \
         INSERT INTO t VALUES (1, '2026-03-04 05:06:07.5+00', 0.1, '\\x01ff', '1 day 02:03:04'), \
         (2, '1999-12-31 23:59:59+00', 1e-7, '\\x', '-3 months'), (3, NULL, 2.5, '\\x7a', '00:00:01.25'), \
         (4, '2026-07-01 00:00:00+00', -0.3, NULL, '2 years 1 mon')",
    )
    .await?;
    let mut plains = [
        RawClient::connect(plain.port, "postgres", "postgres", &[])?,
        RawClient::connect(plain.port, "postgres", "postgres", &[])?,
    ];
    let mut routed = [
        RawClient::connect(c.port, "postgres", "postgres", &[])?,
        RawClient::connect(c.port, "postgres", "postgres", &[])?,
    ];
    // (A session learns what `t` is at its first read across shards; inside a pipeline, on this full pool, that
    // lookup would wait for a connection — a limit of its own, documented in docs/proxy.md, not this test's.)
    for cl in routed.iter_mut() {
        cl.query("SELECT * FROM t ORDER BY user_id")?;
    }
    let settings: [(&str, &[&str]); 7] = [
        ("DateStyle", &["'ISO, MDY'", "'SQL, DMY'", "'German'", "'Postgres, YMD'"]),
        ("TimeZone", &["'UTC'", "'America/Sao_Paulo'", "'Asia/Kolkata'", "'+05:30'"]),
        ("IntervalStyle", &["postgres", "iso_8601", "sql_standard", "postgres_verbose"]),
        ("extra_float_digits", &["0", "1", "-2", "3"]),
        ("bytea_output", &["hex", "escape"]),
        // (A bad value: the server refuses it, 22023.)
        ("work_mem", &["'8MB'", "'64kB'", "'1GB'", "'bogus'"]),
        ("statement_timeout", &["0", "'5s'", "'1min'"]),
    ];
    let (mut history, mut refused, mut idle) = (Vec::new(), 0, [true, true]);
    // (`SETTINGS_FUZZ_REPLAY`: the steps a failing run wrote, instead of random ones.)
    let replay = integration::wire::replay_lines("SETTINGS_FUZZ_REPLAY")?;
    let steps = replay.as_ref().map_or(steps, Vec::len);
    let mut script = Vec::new();
    for n in 0..steps {
        let (who, path, sqls, flush_after) = match &replay {
            Some(lines) => replayed_step(&lines[n])?,
            None => {
                let who = rng.random_range(0..2);
                // A step: one statement on a random path, or (one in six) a pipeline of two to four synced
                // once — a third of them with a Flush after one of their statements but the last, its answers
                // read before the rest is sent.
                let piped = rng.random_range(0..6) == 0;
                let count = if piped { rng.random_range(2..=4) } else { 1 };
                let flush_after = (piped && rng.random_range(0..3) == 0).then(|| rng.random_range(1..count));
                let sqls: Vec<String> =
                    (0..count).map(|_| random_setting_step(&mut rng, &settings, idle[who])).collect();
                let path = if piped {
                    Path::Pipelined
                } else {
                    [Path::Simple, Path::Unnamed, Path::Named][rng.random_range(0..3)]
                };
                (who, path, sqls, flush_after)
            }
        };
        let mut fields = vec![who.to_string(), format!("{path:?}")];
        for (i, sql) in sqls.iter().enumerate() {
            if flush_after == Some(i) {
                fields.push("Flush".into());
            }
            fields.push(sql.clone());
        }
        script.push(fields.join("\t"));
        let mut answers = Vec::new();
        for db in [&mut plains[who], &mut routed[who]] {
            let mut replies = Vec::new();
            for (i, sql) in sqls.iter().enumerate() {
                replies.extend(db.send(path, sql)?);
                if flush_after == Some(i + 1) {
                    replies.extend(db.flush_answers(i + 1)?);
                }
            }
            if db.piped() {
                replies.extend(db.sync()?);
            }
            // (Notices too, first: SET LOCAL outside a transaction warns, and so do BEGIN in one and COMMIT
            // outside.)
            let mut outlined = integration::wire::notices(&replies);
            outlined.extend(outline(&replies));
            answers.push(outlined);
        }
        let (want, got) = (&answers[0], &answers[1]);
        let sql = match flush_after {
            Some(k) => format!("{}; Flush; {}", sqls[..k].join("; "), sqls[k..].join("; ")),
            None => sqls.join("; "),
        };
        history.push(format!("{who} {path:?}: {sql}  {want:?}"));
        idle[who] = want.last().is_some_and(|z| z == "ZI");
        if got.iter().any(|g| g == "!0A000") && !want.iter().any(|w| w == "!0A000") {
            // A refusal (the router cannot answer this as one PostgreSQL would): both roll back and go on —
            // after a pipeline, from the defaults (what the plain server ran after the refused statement, in
            // the pipeline's implicit transaction, committed; on the router it did not run).
            refused += 1;
            for db in [&mut plains[who], &mut routed[who]] {
                db.query("ROLLBACK")?;
                if path == Path::Pipelined {
                    db.query("RESET ALL")?;
                }
            }
            idle[who] = true;
            continue;
        }
        if got != want {
            let file = integration::wire::write_replay(&format!("settings-fuzz-{seed}.steps"), &script);
            panic!(
                "seed {seed}, step {n}, client {who}, {path:?}: {sql}: router, then plain:\n  {got:?}\n  {want:?}\n\
                 before:\n  {}\nreplay: SETTINGS_FUZZ_REPLAY={file} (scripts/fuzz-minimize.py cuts it down)",
                history[history.len().saturating_sub(400)..].join("\n  ")
            );
        }
    }
    println!("seed {seed}: {steps} statements of two clients, {refused} refused, the rest answered as one PostgreSQL");
    assert!(replay.is_some() || refused * 20 < steps, "{refused} of {steps} refused");
    Ok(())
}

/// A step of a settings fuzz replay file: `who`, the path, then the statements, `Flush` between two of them
/// where the pipeline had one (see `write_replay`).
fn replayed_step(line: &str) -> anyhow::Result<(usize, Path, Vec<String>, Option<usize>)> {
    let mut fields = line.split('\t');
    let who = fields.next().and_then(|w| w.parse().ok()).filter(|w: &usize| *w < 2);
    let path = fields.next().and_then(Path::named);
    let (Some(who), Some(path)) = (who, path) else { anyhow::bail!("not a step of a replay file: {line:?}") };
    let (mut sqls, mut flush_after) = (Vec::new(), None);
    for f in fields {
        match f {
            "Flush" => flush_after = Some(sqls.len()),
            sql => sqls.push(sql.to_string()),
        }
    }
    Ok((who, path, sqls, flush_after))
}

/// One statement of the settings fuzz test: a setting changed, reset or shown, a read whose text depends on the
/// settings, a transaction's verb, or an error. `idle`: no transaction is open (a `set_config()` is then
/// session-wide).
fn random_setting_step(rng: &mut rand::rngs::StdRng, settings: &[(&str, &[&str])], idle: bool) -> String {
    use rand::Rng;
    let (name, values) = settings[rng.random_range(0..settings.len())];
    let value = values[rng.random_range(0..values.len())];
    match rng.random_range(0..22) {
        0 | 1 => format!("SET {name} = {value}"),
        2 => format!("SET LOCAL {name} = {value}"),
        3 => format!("RESET {name}"),
        4 => "RESET ALL".to_string(),
        5 => format!(
            "SELECT set_config('{name}', {}, {})",
            if value.starts_with('\'') { value.to_string() } else { format!("'{value}'") },
            !idle && rng.random_bool(0.4)
        ),
        6 | 7 => format!("SHOW {name}"),
        8..=10 => format!("SELECT * FROM t WHERE user_id = {}", rng.random_range(1..=4)),
        11 => "SELECT * FROM t ORDER BY user_id".to_string(),
        12 => "SELECT current_setting('DateStyle'), current_setting('TimeZone'), current_setting('work_mem')".into(),
        13 | 14 => "BEGIN".into(),
        15 => "COMMIT".into(),
        16 => "ROLLBACK".into(),
        17 => "SAVEPOINT s".into(),
        18 => "ROLLBACK TO SAVEPOINT s".into(),
        // (The transaction's own settings: before its first query, or 25001.)
        19 => [
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET TRANSACTION READ ONLY",
        ][rng.random_range(0..3)]
        .into(),
        20 => "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')".into(),
        _ => "SELECT 1 / 0".into(),
    }
}

/// A pipeline's COMMIT, then a Flush: the client has the COMMIT's answer, and what it committed stands whatever
/// fails after it before the Sync (one PostgreSQL keeps it). The router kept a transaction's settings until the
/// Sync and dropped them when a statement sent after the Flush failed — as it drops those of a transaction
/// that rolled back. Now they are the client's at the Flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_commit_keeps_its_settings_whatever_fails_after_it() -> anyhow::Result<()> {
    let (plain, c) = plain_and_two_shards(
        "CREATE TABLE t (user_id bigint PRIMARY KEY, at timestamptz); \
         INSERT INTO t VALUES (1, '2026-03-04 05:06:07.5+00'), (2, '1999-12-31 23:59:59+00'), (3, '2026-07-01 00:00:00+00')",
    )
    .await?;
    let commits: [&[&str]; 4] = [
        // (A transaction the router holds until its COMMIT, one on a shard, the group's implicit one, and one
        // that went back to a savepoint.)
        &["BEGIN", "SET TimeZone = 'Asia/Kolkata'", "COMMIT"],
        &["BEGIN", "SELECT * FROM t WHERE user_id = 1", "SET TimeZone = 'Asia/Kolkata'", "COMMIT"],
        &["SET TimeZone = 'Asia/Kolkata'", "COMMIT"],
        &[
            "BEGIN",
            "SELECT * FROM t WHERE user_id = 2",
            "SET TimeZone = 'Asia/Kolkata'",
            "SAVEPOINT a",
            "SET DateStyle = 'German'",
            "ROLLBACK TO a",
            "COMMIT",
        ],
    ];
    let afters = [
        "SELECT 1 / 0",
        "SELECT * FROM t WHERE user_id = 2",
        "SELECT * FROM t WHERE user_id = 3",
        "SELECT * FROM t ORDER BY user_id",
    ];
    for commit in commits {
        for after in afters {
            let mut answers = Vec::new();
            for port in [plain.port, c.port] {
                let mut db = RawClient::connect(port, "postgres", "postgres", &[])?;
                // (Both of the router's shards have a connection of the client's before it.)
                db.query("SELECT * FROM t ORDER BY user_id")?;
                for sql in commit {
                    db.send(Path::Pipelined, sql)?;
                }
                db.flush()?;
                let mut got = outline(&db.until_done("COMMIT")?);
                db.send(Path::Pipelined, after)?;
                got.extend(outline(&db.sync()?));
                for sql in ["SHOW TimeZone", "SHOW DateStyle", "SELECT * FROM t ORDER BY user_id"] {
                    got.extend(outline(&db.query(sql)?));
                }
                answers.push(got);
            }
            assert_eq!(answers[1], answers[0], "{commit:?}, Flush, {after}, Sync: router, then plain");
        }
    }
    // A connection the pipeline used before the COMMIT does not have the settings until the Sync: a statement
    // there after the Flush is refused (0A000), and the settings still stand.
    let commit = [
        "SELECT * FROM t WHERE user_id = 2",
        "BEGIN",
        "SELECT * FROM t WHERE user_id = 1",
        "SET TimeZone = 'Asia/Kolkata'",
        "COMMIT",
    ];
    let mut answers = Vec::new();
    for port in [plain.port, c.port] {
        let mut db = RawClient::connect(port, "postgres", "postgres", &[])?;
        for sql in commit {
            db.send(Path::Pipelined, sql)?;
        }
        db.flush()?;
        db.until_done("COMMIT")?;
        db.send(Path::Pipelined, "SELECT * FROM t WHERE user_id = 2")?;
        let after = outline(&db.sync()?);
        answers.push((after, outline(&db.query("SHOW TimeZone")?)));
    }
    assert!(answers[1].0 == answers[0].0 || answers[1].0.contains(&"!0A000".to_string()), "{answers:?}");
    assert_eq!(answers[1].1, answers[0].1, "then SHOW TimeZone: router, then plain");
    Ok(())
}

/// COMMIT and ROLLBACK outside a transaction block in a pipeline end the group's implicit transaction: what ran
/// before them is committed, or undone, whatever follows. The router sent them to whichever of the group's
/// connections came first, so that a write on another connection was neither committed by the COMMIT (and was
/// lost when a statement after it failed: the client had been told COMMIT) nor undone by the ROLLBACK. Now they
/// go where the group wrote; with writes on several shards' connections they are refused (0A000) unless
/// nothing but the Sync follows the COMMIT, and nothing of a refused pipeline stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_commit_ends_what_ran_before_it_as_on_one_postgresql() -> anyhow::Result<()> {
    let (plain, c) = plain_and_two_shards(
        "CREATE TABLE t (user_id bigint PRIMARY KEY, at timestamptz); \
         INSERT INTO t VALUES (1, '2026-03-04 05:06:07.5+00'), (2, '1999-12-31 23:59:59+00')",
    )
    .await?;
    // (The statements before the Flush or Sync, whether a Flush follows them, what follows, the keys inserted,
    // whether the router may refuse it. Keys 1 and 2 are on different shards.)
    struct Case {
        before: &'static [&'static str],
        flush: bool,
        after: &'static str,
        keys: &'static [i64],
        may_refuse: bool,
    }
    let case = |before, flush, after, keys, may_refuse| Case { before, flush, after, keys, may_refuse };
    let cases = [
        case(
            &["SELECT * FROM t WHERE user_id = 2", "INSERT INTO t VALUES (10, NULL)", "COMMIT"],
            false,
            "SELECT 1 / 0",
            &[10],
            false,
        ),
        case(
            &["SELECT * FROM t WHERE user_id = 1", "INSERT INTO t VALUES (11, NULL)", "COMMIT"],
            false,
            "SELECT 1 / 0",
            &[11],
            false,
        ),
        case(
            &["SELECT * FROM t WHERE user_id = 2", "INSERT INTO t VALUES (12, NULL)", "COMMIT"],
            true,
            "SELECT 1 / 0",
            &[12],
            false,
        ),
        case(
            &["SELECT * FROM t WHERE user_id = 2", "INSERT INTO t VALUES (13, NULL)", "ROLLBACK"],
            false,
            "SELECT 1",
            &[13],
            false,
        ),
        case(
            &["SELECT * FROM t WHERE user_id = 1", "INSERT INTO t VALUES (14, NULL)", "ROLLBACK"],
            false,
            "SELECT 1",
            &[14],
            false,
        ),
        case(
            &["INSERT INTO t VALUES (15, NULL)", "INSERT INTO t VALUES (16, NULL)", "COMMIT"],
            false,
            "SELECT 1 / 0",
            &[15, 16],
            true,
        ),
        case(
            &["INSERT INTO t VALUES (17, NULL)", "INSERT INTO t VALUES (18, NULL)", "COMMIT"],
            true,
            "SELECT 1 / 0",
            &[17, 18],
            true,
        ),
        // (The Sync right after the COMMIT commits the writes on every connection.)
        case(
            &[
                "INSERT INTO t VALUES (19, NULL)",
                "INSERT INTO t VALUES (20, NULL)",
                "INSERT INTO t VALUES (21, NULL)",
                "COMMIT",
            ],
            false,
            "",
            &[19, 20, 21],
            false,
        ),
    ];
    let check = "SELECT * FROM t ORDER BY user_id";
    let mut p = RawClient::connect(plain.port, "postgres", "postgres", &[])?;
    let mut r = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    for Case { before, flush, after, keys, may_refuse } in cases {
        let mut answers = Vec::new();
        for db in [&mut p, &mut r] {
            for sql in before {
                db.send(Path::Pipelined, sql)?;
            }
            let mut got = Vec::new();
            if flush {
                db.flush()?;
                got.extend(outline(&db.until_done(before.last().expect("a statement"))?));
            }
            if !after.is_empty() {
                db.send(Path::Pipelined, after)?;
            }
            got.extend(outline(&db.sync()?));
            answers.push(got);
        }
        if answers[1].iter().any(|a| a == "!0A000") {
            // Refused: nothing of it stays on the router, so the plain server is brought back to match.
            assert!(may_refuse, "{before:?}: refused: {:?}", answers[1]);
            for k in keys {
                p.query(&format!("DELETE FROM t WHERE user_id = {k}"))?;
            }
        } else {
            assert_eq!(answers[1], answers[0], "{before:?} ({flush}), {after}: router, then plain");
        }
        assert_eq!(outline(&r.query(check)?), outline(&p.query(check)?), "{before:?}, {after}: then {check}");
    }
    Ok(())
}

/// Settings after a transaction on two shards that went back to a savepoint and committed: which of its
/// changes stand is read back from the server — and a RESET afterwards undoes the setting everywhere (a name
/// read back from `pg_settings` in its mixed case, `IntervalStyle`, once stayed beside the client's own).
/// Against one PostgreSQL, on every path, and with the transaction sent as one pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_after_a_transaction_that_went_back_to_a_savepoint() -> anyhow::Result<()> {
    let (plain, c) = plain_and_two_shards(
        "CREATE TABLE t (user_id bigint PRIMARY KEY, iv interval); \
                 INSERT INTO t VALUES (1, '1 day'), (2, '2 hours'), (3, '3 mins'), (4, '4 secs')",
    )
    .await?;
    let script = [
        "SET IntervalStyle = postgres_verbose",
        "SET work_mem = '8MB'",
        "BEGIN",
        "SELECT * FROM t WHERE user_id = 1",
        "SELECT * FROM t WHERE user_id = 2",
        "SAVEPOINT s",
        "RESET ALL",
        "ROLLBACK TO SAVEPOINT s",
        "RESET work_mem",
        "COMMIT",
        "SHOW work_mem",
        "SELECT * FROM t ORDER BY user_id",
        "RESET IntervalStyle",
        "SELECT * FROM t ORDER BY user_id",
    ];
    // Each statement synced on its own, on every path; then the transaction as one pipeline.
    for (path, whole) in PATHS.iter().map(|p| (*p, false)).chain([(Path::Pipelined, true)]) {
        let mut p = RawClient::connect(plain.port, "postgres", "postgres", &[])?;
        let mut r = RawClient::connect(c.port, "postgres", "postgres", &[])?;
        for (i, sql) in script.iter().enumerate() {
            let mut answers = Vec::new();
            for db in [&mut p, &mut r] {
                let mut replies = db.send(path, sql)?;
                // (As one pipeline: synced after COMMIT only.)
                if db.piped() && (!whole || !(2..9).contains(&i)) {
                    replies.extend(db.sync()?);
                }
                answers.push(outline(&replies));
            }
            assert_eq!(answers[1], answers[0], "{path:?} (whole: {whole}): {sql}: router, then plain");
        }
    }
    Ok(())
}

/// Pipelines (statements synced once) against one PostgreSQL, for what a pipeline does to transactions and
/// settings: BEGIN after statements of the pipeline makes them part of the transaction (a ROLLBACK then undoes
/// an INSERT and a SET made before the BEGIN); ROLLBACK outside a transaction undoes what the pipeline ran
/// before it; after an error nothing more runs, a BEGIN the router would answer itself included; a setting
/// made before BEGIN is on a shard that joins the transaction afterwards. Each answer is the plain server's,
/// or a refusal (0A000) that leaves nothing behind — as when a pipeline goes on, after a setting, to another
/// shard's connection (which would not have it), or its ROLLBACK would undo statements on several shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_take_the_transaction_transitions_of_one_postgresql() -> anyhow::Result<()> {
    let (plain, c) = plain_and_two_shards(
        "CREATE TABLE t (user_id bigint PRIMARY KEY, b bytea, iv interval); \
                 INSERT INTO t VALUES (1, '\\x01', '1 day'), (2, '\\x02', '2 hours')",
    )
    .await?;
    let check = "SELECT user_id, b, iv, current_setting('TimeZone') FROM t ORDER BY user_id";
    // (A pipeline, then the statements that show what it left behind, each synced on its own.)
    // (`true`: the router may refuse it.)
    let cases: [(&[&str], &[&str], bool); 11] = [
        (&["INSERT INTO t VALUES (4, NULL, NULL)", "BEGIN", "ROLLBACK"], &[check], false),
        (&["SET TimeZone = 'Asia/Kolkata'", "BEGIN", "ROLLBACK"], &["SHOW TimeZone"], false),
        (&["SET TimeZone = 'Asia/Kolkata'", "ROLLBACK"], &["SHOW TimeZone"], false),
        (&["SET TimeZone = 'Asia/Kolkata'", "SELECT 1 / 0", "BEGIN"], &["SHOW TimeZone", "COMMIT"], false),
        (&["SET IntervalStyle = iso_8601"], &[], false),
        (
            &["RESET ALL", "BEGIN", "SELECT * FROM t WHERE user_id = 1", "SELECT * FROM t WHERE user_id = 2", "COMMIT"],
            &[check],
            false,
        ),
        (&["SET bytea_output = escape", "BEGIN", "SELECT * FROM t WHERE user_id = 2", "ROLLBACK"], &[check], false),
        // (Reads before BEGIN bind the transaction to no shard.)
        (
            &[
                "SELECT * FROM t WHERE user_id = 1",
                "SELECT * FROM t WHERE user_id = 2",
                "BEGIN",
                "INSERT INTO t VALUES (7, NULL, NULL)",
                "ROLLBACK",
            ],
            &[check],
            false,
        ),
        (&["SET LOCAL bytea_output = escape", "SELECT * FROM t ORDER BY user_id"], &[check], true),
        // (The COMMIT's setting stands whatever follows it; refused unless the COMMIT ends the pipeline.)
        (
            &[
                "BEGIN",
                "SET TimeZone = 'Asia/Kolkata'",
                "SELECT * FROM t WHERE user_id = 1",
                "COMMIT",
                "SELECT * FROM t WHERE user_id = 2",
                "SELECT 1 / 0",
            ],
            &[check],
            true,
        ),
        (&["INSERT INTO t VALUES (5, NULL, NULL)", "INSERT INTO t VALUES (6, NULL, NULL)", "ROLLBACK"], &[check], true),
    ];
    let mut p = RawClient::connect(plain.port, "postgres", "postgres", &[])?;
    let mut r = RawClient::connect(c.port, "postgres", "postgres", &[])?;
    for (pipeline, after, may_refuse) in cases {
        let mut answers = Vec::new();
        for db in [&mut p, &mut r] {
            let mut replies = Vec::new();
            for sql in pipeline {
                replies.extend(db.send(Path::Pipelined, sql)?);
            }
            replies.extend(db.sync()?);
            answers.push(outline(&replies));
        }
        let refused = answers[1].iter().any(|a| a == "!0A000");
        if refused {
            // Refused: nothing of it stays on the router, so the plain server is brought back to match.
            assert!(may_refuse, "{pipeline:?}: refused: {:?}", answers[1]);
            r.query("ROLLBACK")?;
            p.query("ROLLBACK")?;
            p.query("DELETE FROM t WHERE user_id > 2")?;
            p.query("RESET ALL")?;
            r.query("RESET ALL")?;
        } else {
            assert_eq!(answers[1], answers[0], "{pipeline:?}: router, then plain");
        }
        for sql in after {
            assert_eq!(
                outline(&r.query(sql)?),
                outline(&p.query(sql)?),
                "{pipeline:?}, then {sql}: router, then plain"
            );
        }
    }
    // A transaction that changed settings rolls back, and a BEGIN follows in the same pipeline: the settings
    // it undid once passed for the next transaction's, and a RESET ALL among them reached the client's own
    // settings at that transaction's end (found by the settings fuzz test, seed 8, with Flush).
    let mut answers = Vec::new();
    for db in [&mut p, &mut r] {
        let mut got = Vec::new();
        for sql in [
            "SET TimeZone = 'Asia/Kolkata'",
            "BEGIN",
            "SELECT set_config('IntervalStyle', 'iso_8601', false)",
            "RESET ALL",
        ] {
            got.extend(outline(&db.query(sql)?));
        }
        db.send(Path::Pipelined, "ROLLBACK")?;
        db.send(Path::Pipelined, "BEGIN")?;
        got.extend(outline(&db.sync()?));
        for sql in ["ROLLBACK", "SELECT * FROM t WHERE user_id = 1", "SHOW TimeZone", "SHOW IntervalStyle", check] {
            got.extend(outline(&db.query(sql)?));
        }
        answers.push(got);
    }
    assert_eq!(answers[1], answers[0], "a rolled back transaction's settings, then BEGIN: router, then plain");
    // A transaction aborted on one shard goes back to a savepoint, and a read for another shard follows in the
    // same pipeline: it was sent to the aborted transaction's server, which answered it from its own rows
    // ("SELECT 0", found by the settings fuzz test, seed 35).
    let mut answers = Vec::new();
    for db in [&mut p, &mut r] {
        let mut got = Vec::new();
        for sql in ["BEGIN", "SELECT * FROM t WHERE user_id = 1", "SAVEPOINT s", "SELECT 1 / 0"] {
            got.extend(outline(&db.query(sql)?));
        }
        for sql in ["ROLLBACK TO SAVEPOINT s", "SELECT * FROM t WHERE user_id = 2", "SELECT * FROM t WHERE user_id = 1"]
        {
            db.send(Path::Pipelined, sql)?;
        }
        got.extend(outline(&db.sync()?));
        got.extend(outline(&db.query("ROLLBACK")?));
        answers.push(got);
    }
    assert_eq!(answers[1], answers[0], "ROLLBACK TO after an error, then a read elsewhere: router, then plain");
    Ok(())
}

/// A statement that failed in a transaction is not replayed on a shard that joins after the transaction went
/// back to a savepoint: a SET with a bad value stayed in the replay log and failed the join (22023 where one
/// PostgreSQL reads the row), and a SAVEPOINT the aborted transaction's server refused (25P02) stayed too, so
/// the joining shard went back to it instead, keeping a RESET ALL made after the real one. Against one
/// PostgreSQL, on every path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_failed_in_a_transaction_is_not_replayed_where_it_joins() -> anyhow::Result<()> {
    let (plain, c) = plain_and_two_shards(
        "CREATE TABLE t (user_id bigint PRIMARY KEY, iv interval); \
                 INSERT INTO t VALUES (1, '1 day'), (2, '2 hours')",
    )
    .await?;
    let script = [
        "SET IntervalStyle = iso_8601",
        "BEGIN",
        "SELECT * FROM t WHERE user_id = 1",
        "SAVEPOINT s",
        "RESET ALL",
        "SET work_mem = 'bogus'",
        "SAVEPOINT s",
        "ROLLBACK TO SAVEPOINT s",
        "SELECT * FROM t WHERE user_id = 2",
        "COMMIT",
        "SELECT * FROM t ORDER BY user_id",
    ];
    same_on_every_path(&plain, &c, &script)
}

/// A SET in a transaction that has not reached a shard yet is answered by the router, which holds it for the
/// shard the transaction opens on: a bad value or an unknown name is still refused as one PostgreSQL refuses
/// it (22023, 42704 — the server checks it first), and the transaction is aborted; a custom setting takes any
/// value. On every path, against one PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_transaction_refuses_a_bad_setting_as_postgresql() -> anyhow::Result<()> {
    let (plain, c) =
        plain_and_two_shards("CREATE TABLE t (user_id bigint PRIMARY KEY); INSERT INTO t VALUES (1)").await?;
    let script = [
        "BEGIN",
        "SET work_mem = 'bogus'",
        "SELECT * FROM t WHERE user_id = 1",
        "ROLLBACK",
        "BEGIN",
        "SET LOCAL no_such_setting = 1",
        "ROLLBACK",
        "BEGIN",
        "SET LOCAL statement_timeout = '5s'",
        "SET LOCAL app.tenant = 'any value at all'",
        "SELECT current_setting('statement_timeout'), current_setting('app.tenant') FROM t WHERE user_id = 1",
        "COMMIT",
        "SHOW statement_timeout",
    ];
    same_on_every_path(&plain, &c, &script)
}
