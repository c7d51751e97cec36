//! Authentication: clients to the router with SCRAM-SHA-256 (the default) and md5 against
//! `router-user-<name>`, refused with the right SQLSTATE on a wrong password or an unknown user; the router
//! to servers that demand SCRAM-SHA-256 or md5, with the credentials of each node's URL.

use integration::Cluster;

async fn connect(c: &Cluster, user: &str, password: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1").port(c.port).user(user).password(password).dbname("postgres");
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn code(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.code().code().to_string()).unwrap_or_else(|| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_and_md5_on_both_sides() -> anyhow::Result<()> {
    for (client_method, server_method) in [("scram-sha-256", "scram-sha-256"), ("md5", "md5")] {
        // Servers demand a password; the node URLs carry it.
        let shards = (0..2).map(|_| integration::PgServer::start()).collect::<anyhow::Result<Vec<_>>>()?;
        for s in &shards {
            s.require_password(server_method, "server secret").await?;
        }
        let head =
            format!("shard-strategy,hash\nshard-count,2\nrouter-auth,{client_method}\nrouter-user-bot,bot's secret\n");
        let urls: Vec<String> = shards
            .iter()
            .map(|s| format!("postgres://postgres:server%20secret@127.0.0.1:{}/postgres", s.port))
            .collect();
        let c = Cluster::with_servers(shards, &head, |i, _| format!("shard-node-{i},{}\n", urls[i]))?;

        let db = connect(&c, "bot", "bot's secret").await?;
        db.batch_execute("CREATE TABLE users (user_id bigint PRIMARY KEY)").await?;
        db.execute("INSERT INTO users (user_id) VALUES ($1), ($2)", &[&2i64, &4i64]).await?;
        let n: i64 = db.query_one("SELECT count(*) FROM users WHERE user_id = $1", &[&2i64]).await?.get(0);
        assert_eq!(n, 1, "{client_method}");

        let e = connect(&c, "bot", "wrong").await.expect_err("a wrong password is refused");
        assert_eq!(code(&e), "28P01", "{client_method}: {e}");
        let e = connect(&c, "nobody", "x").await.expect_err("an unknown user is refused");
        assert_eq!(code(&e), "28000", "{client_method}: {e}");
    }
    Ok(())
}
