//! The tenant strategy for real: a client connecting to database `gb_tenant_<name>` is served by that
//! tenant's database on the node that holds it; with `shard-auto-create,true` a missing tenant database is
//! created on first use from `gb_tenant_template`, once, even when two clients race for it.

use integration::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_get_their_own_database_created_once() -> anyhow::Result<()> {
    let c = Cluster::start(
        2,
        "shard-strategy,tenant\nshard-tenant-db-prefix,gb_tenant_\nshard-auto-create,true\nrouter-auth,trust\n",
        |i, s| format!("shard-node-n{i},{}\n", s.url("postgres")),
    )?;
    // The template carries the schema.
    for s in &c.shards {
        let db = s.client("postgres").await?;
        db.batch_execute("CREATE DATABASE gb_tenant_template").await?;
        let t = s.client("gb_tenant_template").await?;
        t.batch_execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)").await?;
    }
    let connect = |tenant: &str| {
        let conn = format!("host=127.0.0.1 port={} user=postgres dbname=gb_tenant_{tenant}", c.port);
        async move {
            let (client, conn) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok::<_, tokio_postgres::Error>(client)
        }
    };
    // Two clients race to create acme.
    let (a, b) = tokio::join!(connect("acme"), connect("acme"));
    let (a, b) = (a?, b?);
    a.execute("INSERT INTO notes (body) VALUES ('from a')", &[]).await?;
    b.execute("INSERT INTO notes (body) VALUES ($1)", &[&"from b"]).await?;
    let n: i64 = a.query_one("SELECT count(*) FROM notes", &[]).await?.get(0);
    assert_eq!(n, 2, "both clients use the same database");
    let globex = connect("globex").await?;
    let n: i64 = globex.query_one("SELECT count(*) FROM notes", &[]).await?.get(0);
    assert_eq!(n, 0, "another tenant, another database");
    globex.batch_execute("BEGIN; INSERT INTO notes (body) VALUES ('g'); COMMIT").await?;
    // Each tenant database exists once, on one node.
    for tenant in ["gb_tenant_acme", "gb_tenant_globex"] {
        let mut found = 0;
        for s in &c.shards {
            let db = s.client("postgres").await?;
            found += db.query("SELECT 1 FROM pg_database WHERE datname = $1", &[&tenant]).await?.len();
        }
        assert_eq!(found, 1, "{tenant}");
    }
    // SET and SHOW run in the tenant's own database.
    let here: String = globex.query_one("SELECT current_database()", &[]).await?.get(0);
    assert_eq!(here, "gb_tenant_globex");
    globex.batch_execute("SET statement_timeout = 1234").await?;
    let t: String = globex.query_one("SHOW statement_timeout", &[]).await?.get(0);
    assert_eq!(t, "1234ms");
    Ok(())
}
