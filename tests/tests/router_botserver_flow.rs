//! A botserver-shaped flow, run the same on one plain PostgreSQL and through the router on four shards, with
//! each table its own key: `users` keyed by `id`, `user_sessions` and `message_history` by `user_id`,
//! `session_tools` by `session_id`, `bots` global. Messages are numbered by a count of the session's messages
//! (a wrong count would number them wrong); reports read across shards (counts, joins on the key, GROUP BY,
//! ORDER BY ... LIMIT). Every answer must be the plain server's.

use integration::{Cluster, PgServer};
use tokio_postgres::{Client, SimpleQueryMessage};

const SCHEMA: &str = "
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE user_sessions (id bigint NOT NULL, user_id bigint NOT NULL, title text, PRIMARY KEY (user_id, id));
CREATE TABLE message_history (user_id bigint NOT NULL, session_id bigint NOT NULL, message_index int NOT NULL,
  role text NOT NULL, content text NOT NULL, PRIMARY KEY (user_id, session_id, message_index));
CREATE TABLE session_tools (session_id bigint NOT NULL, tool text NOT NULL, PRIMARY KEY (session_id, tool));
CREATE TABLE bots (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE automations (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), bot_id int NOT NULL, name text NOT NULL,
  runs int NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now());
";

/// Text rows of a simple query (each row its values joined by `|`).
async fn rows(db: &Client, sql: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for m in db.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(r) = m {
            out.push((0..r.len()).map(|i| r.get(i).unwrap_or("NULL")).collect::<Vec<_>>().join("|"));
        }
    }
    Ok(out)
}

/// The flow; returns everything it read, in order.
async fn flow(db: &Client) -> anyhow::Result<Vec<String>> {
    db.batch_execute(SCHEMA).await?;
    db.execute("INSERT INTO bots (id, name) VALUES (1, 'helper'), (2, 'sales')", &[]).await?;
    let mut seen = Vec::new();
    let count = db.prepare("SELECT count(*) FROM message_history WHERE user_id = $1 AND session_id = $2").await?;
    let insert = db
        .prepare(
            "INSERT INTO message_history (user_id, session_id, message_index, role, content) VALUES ($1, $2, $3, $4, $5)",
        )
        .await?;
    for u in 1..=24i64 {
        db.execute("INSERT INTO users (id, name) VALUES ($1, $2)", &[&u, &format!("user{}", u % 7)]).await?;
        for s in 0..(u % 3 + 1) {
            let session = u * 100 + s;
            // No column list: the router reads the key's place (user_id, the second column) from the table.
            if s % 2 == 0 {
                db.execute("INSERT INTO user_sessions VALUES ($1, $2, $3)", &[&session, &u, &format!("chat {s}")])
                    .await?;
            } else {
                db.batch_execute(&format!("INSERT INTO user_sessions VALUES ({session}, {u}, 'chat {s}')")).await?;
            }
            db.execute(
                "INSERT INTO session_tools (session_id, tool) VALUES ($1, 'search'), ($1, 'calendar')",
                &[&session],
            )
            .await?;
            for m in 0..(u % 5 + 2) {
                // Numbered by a count: a count from one shard, or one per shard, numbers them wrong.
                let n: i64 = db.query_one(&count, &[&u, &session]).await?.get(0);
                let role = if m % 2 == 0 { "user" } else { "assistant" };
                db.execute(&insert, &[&u, &session, &(n as i32), &role, &format!("message {m}")]).await?;
            }
            let tools =
                db.query("SELECT tool FROM session_tools WHERE session_id = $1 ORDER BY tool", &[&session]).await?;
            seen.push(format!(
                "tools {session}: {:?}",
                tools.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()
            ));
        }
    }
    // Automations: a global table with random uuid defaults, updated by the bots as they run.
    for k in 0..6 {
        db.execute("INSERT INTO automations (bot_id, name) VALUES ($1, $2)", &[&(k % 2 + 1), &format!("job {k}")])
            .await?;
    }
    for _ in 0..3 {
        db.execute("UPDATE automations SET runs = runs + 1, updated_at = now() WHERE bot_id = 1", &[]).await?;
    }
    db.batch_execute("DELETE FROM automations WHERE name = 'job 5'").await?;
    seen.push(format!("{:?}", rows(db, "SELECT bot_id, name, runs FROM automations ORDER BY name").await?));
    // A table the server does not know: the server's own error.
    let e = db.batch_execute("INSERT INTO no_such_table VALUES (1, 2)").await.expect_err("no such table");
    seen.push(format!("{:?}", e.code()));
    // Reports across shards.
    for sql in [
        "SELECT count(*) FROM users",
        "SELECT count(*), max(message_index) FROM message_history",
        "SELECT role, count(*) FROM message_history GROUP BY role ORDER BY role",
        "SELECT u.name, count(*) AS messages FROM users u JOIN message_history m ON m.user_id = u.id GROUP BY u.name ORDER BY messages DESC, u.name",
        "SELECT u.id, count(s.id) FROM users u LEFT JOIN user_sessions s ON s.user_id = u.id GROUP BY u.id ORDER BY 2 DESC, 1 LIMIT 5",
        "SELECT user_id, session_id, message_index FROM message_history ORDER BY message_index DESC, user_id, session_id LIMIT 7",
        "SELECT count(*) FROM session_tools WHERE tool = 'search'",
        "SELECT name FROM users WHERE id IN (3, 9, 17) ORDER BY name, id",
        "SELECT count(*) FROM users u WHERE EXISTS (SELECT 1 FROM user_sessions s WHERE s.user_id = u.id AND s.title = 'chat 2')",
        "SELECT b.name, count(*) FROM message_history m JOIN bots b ON b.id = 1 + m.message_index % 2 GROUP BY b.name ORDER BY 1",
        "SELECT avg(message_index), sum(message_index), min(content), max(content) FROM message_history",
        "SELECT DISTINCT title FROM user_sessions ORDER BY title",
    ] {
        seen.push(format!("{sql}: {:?}", rows(db, sql).await?));
    }
    // Each message's number is its place in its session.
    seen.push(format!(
        "{:?}",
        rows(db, "SELECT count(*) FROM message_history m WHERE message_index >= (SELECT count(*) FROM message_history x WHERE x.user_id = m.user_id AND x.session_id = m.session_id)").await?
    ));
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_botserver_flow_with_a_key_per_table_answers_as_one_postgresql() -> anyhow::Result<()> {
    let plain = PgServer::start()?;
    let c = Cluster::hash(
        4,
        "shard-global-tables,bots,automations\nshard-table-users,id\nshard-table-session_tools,session_id\n",
    )?;
    let want = flow(&plain.client("postgres").await?).await?;
    let got = flow(&c.client().await?).await?;
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(w, g);
    }
    assert_eq!(want.len(), got.len());
    // A function that writes a global table runs where its SELECT goes: one shard without a hint, every
    // shard (one answer) with `/* shards: all */`.
    let db = c.client().await?;
    db.batch_execute("CREATE FUNCTION add_bot(int, text) RETURNS int LANGUAGE sql AS 'INSERT INTO bots VALUES ($1, $2) RETURNING $1'").await?;
    let r = db.query("/* shards: all */ SELECT add_bot(9, 'everywhere')", &[]).await?;
    assert_eq!(r.len(), 1, "one answer");
    assert_eq!(r[0].get::<_, i32>(0), 9);
    for shard in &c.shards {
        let n: i64 =
            shard.client("postgres").await?.query_one("SELECT count(*) FROM bots WHERE id = 9", &[]).await?.get(0);
        assert_eq!(n, 1, "the hint ran it on every shard");
    }
    // Every shard's copy of the global table is the same, random uuids and clocks included.
    let mut copies = Vec::new();
    for shard in &c.shards {
        let db = shard.client("postgres").await?;
        copies.push(rows(&db, "SELECT id, bot_id, name, runs, updated_at FROM automations ORDER BY id").await?);
    }
    assert!(copies.iter().all(|x| *x == copies[0]) && copies[0].len() == 5, "{copies:?}");
    // Rows are where their table's key puts them: users by id, session tools by session_id.
    for (i, shard) in c.shards.iter().enumerate() {
        let db = shard.client("postgres").await?;
        let users: Vec<i64> = db.query("SELECT id FROM users", &[]).await?.iter().map(|r| r.get(0)).collect();
        assert!(!users.is_empty() && users.iter().all(|id| id % 4 == i as i64), "shard {i}: users {users:?}");
        let tools: Vec<i64> =
            db.query("SELECT session_id FROM session_tools", &[]).await?.iter().map(|r| r.get(0)).collect();
        assert!(tools.iter().all(|s| s % 4 == i as i64), "shard {i}: session tools {tools:?}");
    }
    Ok(())
}
