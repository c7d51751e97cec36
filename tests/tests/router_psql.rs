//! psql through the router in front of four hash shards: DDL everywhere, rows on their shards (checked by
//! asking the shards directly), reads with and without a key, transactions, and the router's own errors.

use integration::Cluster;

/// What each shard holds of `table`, as sorted `user_id`s.
async fn placement(c: &Cluster, table: &str) -> anyhow::Result<Vec<Vec<i64>>> {
    let mut out = Vec::new();
    for s in &c.shards {
        let db = s.client("postgres").await?;
        let rows = db.query(&format!("SELECT user_id FROM {table} ORDER BY user_id"), &[]).await?;
        out.push(rows.iter().map(|r| r.get::<_, i64>(0)).collect());
    }
    Ok(out)
}

fn run(c: &Cluster, script: &str) -> (String, String) {
    let out = c.psql(script).expect("psql runs");
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_scripts_through_four_hash_shards() -> anyhow::Result<()> {
    let c = Cluster::hash(4, "shard-global-tables,bots\n")?;

    // DDL goes to every shard, so migrations run through the router.
    let (out, err) = run(
        &c,
        "CREATE TABLE users (user_id bigint PRIMARY KEY, name text);\n\
         CREATE TABLE bots (id int PRIMARY KEY, name text);\n\
         CREATE INDEX users_name ON users (name);\n",
    );
    assert!(err.is_empty(), "{err}");
    assert!(out.is_empty(), "{out}");
    for s in &c.shards {
        let db = s.client("postgres").await?;
        assert_eq!(db.query("SELECT 1 FROM pg_indexes WHERE indexname = 'users_name'", &[]).await?.len(), 1);
    }

    // Rows land on key % 4; writes to a global table land everywhere.
    let mut script = String::new();
    for k in 0..20 {
        script.push_str(&format!("INSERT INTO users (user_id, name) VALUES ({k}, 'u{k}');\n"));
    }
    script.push_str("INSERT INTO bots (id, name) VALUES (1, 'helper');\n");
    let (_, err) = run(&c, &script);
    assert!(err.is_empty(), "{err}");
    let p = placement(&c, "users").await?;
    for (shard, keys) in p.iter().enumerate() {
        assert_eq!(keys.len(), 5, "shard {shard}: {keys:?}");
        assert!(keys.iter().all(|k| k % 4 == shard as i64), "shard {shard}: {keys:?}");
    }
    for s in &c.shards {
        let db = s.client("postgres").await?;
        assert_eq!(db.query("SELECT 1 FROM bots", &[]).await?.len(), 1);
    }

    // Reads: by key, on every shard (one count), and of a global table.
    let (out, err) = run(
        &c,
        "SELECT name FROM users WHERE user_id = 13;\n\
         SELECT count(*) FROM users WHERE name LIKE 'u1%';\n\
         SELECT user_id FROM users WHERE user_id IN (3, 6, 9) ORDER BY user_id;\n\
         SELECT name FROM bots;\n\
         \\echo done\n",
    );
    assert!(err.is_empty(), "{err}");
    // count(*) of every shard is one count, as one PostgreSQL answers; ORDER BY orders across shards.
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "u13");
    assert_eq!(lines[1], "11", "u1 and u10..u19 across the four shards: {out}");
    assert_eq!(lines[2..5].to_vec(), vec!["3", "6", "9"]);
    assert_eq!(lines[5], "helper");
    assert_eq!(lines[6], "done");

    // Transactions: BEGIN is held until a statement names a shard; one on two shards commits or rolls back
    // on both (two-phase commit).
    let (out, err) = run(
        &c,
        "BEGIN;\n\
         UPDATE users SET name = 'x5' WHERE user_id = 5;\n\
         UPDATE users SET name = 'x9' WHERE user_id = 9;\n\
         COMMIT;\n\
         BEGIN;\n\
         UPDATE users SET name = 'y5' WHERE user_id = 5;\n\
         UPDATE users SET name = 'y6' WHERE user_id = 6;\n\
         ROLLBACK;\n\
         SELECT name FROM users WHERE user_id IN (5, 9) ORDER BY user_id;\n\
         SELECT name FROM users WHERE user_id = 6;\n",
    );
    assert!(err.is_empty(), "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["x5", "x9", "u6"], "the second transaction rolled back: {out}");

    // The router's own errors, with their SQLSTATE, leave the session usable.
    let (out, err) = run(
        &c,
        "\\set VERBOSITY verbose\n\
         DELETE FROM users;\n\
         UPDATE users SET user_id = 100 WHERE user_id = 1;\n\
         INSERT INTO users (user_id, name) VALUES (200, 'a'), (1, 'b');\n\
         SELECT count(*) FROM users WHERE user_id = 200;\n\
         SELECT 'still here';\n",
    );
    assert!(err.contains("42000") && err.contains("needs the shard key user_id"), "{err}");
    assert!(err.contains("0A000") && err.contains("changes the shard key"), "{err}");
    // Rows for two shards, one of which fails: nothing of the INSERT anywhere.
    assert!(err.contains("23505"), "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["0", "still here"], "{out}");

    // Session keys: SET gb.shard_key routes statements that cannot carry the key.
    let (out, err) =
        run(&c, "SET gb.shard_key = 7;\nSELECT name FROM users WHERE name LIKE 'u%';\nRESET gb.shard_key;\n");
    assert!(err.is_empty(), "{err}");
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    assert_eq!(got, vec!["u11", "u15", "u19", "u3", "u7"], "only shard 3's rows");

    // COPY TO STDOUT reads every shard; NOTICEs pass through.
    let (out, err) =
        run(&c, "COPY (SELECT user_id FROM users WHERE user_id < 8) TO STDOUT;\nDROP TABLE IF EXISTS not_there;\n");
    let mut copied: Vec<i64> = out.lines().map(|l| l.parse().unwrap()).collect();
    copied.sort();
    assert_eq!(copied, (0..8).collect::<Vec<i64>>(), "{out}");
    assert!(err.contains("NOTICE") && err.contains("not_there"), "{err}");
    let (out, _) = run(&c, "COPY users TO STDOUT;\n");
    assert_eq!(out.lines().count(), 20);
    // Rows in an order across shards are not concatenated: refused, with the reason.
    let (_, err) = run(&c, "COPY (SELECT user_id FROM users ORDER BY user_id) TO STDOUT;\n");
    assert!(err.contains("COPY of rows combined from several shards"), "{err}");

    // A multi-statement string for one shard is relayed as is.
    let (out, err) = run(&c, "SELECT name FROM users WHERE user_id = 2; SELECT name FROM users WHERE user_id = 6;\n");
    assert!(err.is_empty(), "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["u2", "u6"]);
    Ok(())
}

/// What broke before one state machine owned the session, as psql sees it: `\copy` inside a transaction,
/// COMMIT after a failed statement (answered ROLLBACK, the session goes on), savepoints and SET before the
/// first keyed statement, a statement psql's server understands and sqlparser does not; a transaction on
/// both shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_transactions_copy_and_refusals() -> anyhow::Result<()> {
    let c = Cluster::hash(2, "")?;
    let (_, err) = run(&c, "CREATE TABLE users (user_id bigint PRIMARY KEY, name text);\n");
    assert!(err.is_empty(), "{err}");
    let data = c.config_path.parent().expect("a directory").join("users.csv");
    std::fs::write(&data, (0..10).map(|k| format!("{k},c{k}\n")).collect::<String>())?;
    let (out, err) = run(
        &c,
        &format!(
            "BEGIN;\n\\copy users (user_id, name) FROM '{}' WITH (FORMAT csv)\nCOMMIT;\n\
             BEGIN;\nSAVEPOINT a;\nSET LOCAL work_mem = '8MB';\nUPDATE users SET name = 'held' WHERE user_id = 2;\nROLLBACK TO SAVEPOINT a;\nUPDATE users SET name = 'kept' WHERE user_id = 4;\nCOMMIT;\n\
             BEGIN;\nUPDATE users SET name = 'x' WHERE user_id = 1;\nUPDATE users SET name = 'y' WHERE user_id = 2;\nSELECT 1;\nCOMMIT;\n\
             BEGIN;\nUPDATE users SET name = 'z' WHERE user_id = 3;\nUPDATE users SET name = 'w' WHERE user_id = 2;\nSELECT 1/0;\nSELECT 1;\nCOMMIT;\n\
             SELECT name FROM users WHERE user_id = 4;\n\
             SELECT name FROM users WHERE user_id IN (1, 2, 3) ORDER BY user_id;\n",
            data.display()
        ),
    );
    assert!(out.contains("COPY 10") || !err.contains("COPY"), "{out}{err}");
    assert!(err.contains("division by zero"), "{err}");
    // The SELECT after the error gets 25P02; the COMMIT does not (it rolls back, as on a server).
    assert_eq!(err.matches("current transaction is aborted").count(), 1, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[lines.len() - 4..], ["kept", "x", "y", "c3"], "{out}");
    let p = placement(&c, "users").await?;
    assert_eq!(p, vec![vec![0, 2, 4, 6, 8], vec![1, 3, 5, 7, 9]]);
    Ok(())
}
