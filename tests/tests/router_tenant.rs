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

/// `router-user-<name>-tenants`: an attacker limited to tenant `acme` tries every way to another tenant's
/// database — connecting to it, to a database of no tenant, `SET gb.tenant`, a tenant hint, a search_path —
/// and gets 42501 each time (or stays in its own database); another user is not limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_limited_to_its_tenants_reaches_no_other() -> anyhow::Result<()> {
    use integration::wire::{error_codes, RawClient, Reply};
    let c = Cluster::start(
        2,
        "shard-strategy,tenant\nshard-tenant-db-prefix,gb_tenant_\nshard-auto-create,true\nrouter-auth,trust\n\
         router-user-mallory-tenants,acme\n",
        |i, s| format!("shard-node-n{i},{}\n", s.url("postgres")),
    )?;
    // Another user makes both tenants' databases.
    for t in ["acme", "beta"] {
        let mut cl = RawClient::connect(c.port, "postgres", &format!("gb_tenant_{t}"), &[])?;
        let r = cl.query("SELECT current_database()")?;
        assert!(r.contains(&Reply::Row(vec![Some(format!("gb_tenant_{t}"))])), "{r:?}");
    }
    for db in ["gb_tenant_beta", "postgres"] {
        let e = RawClient::connect(c.port, "mallory", db, &[]).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(e.contains("42501") && e.contains("router-user-mallory-tenants"), "{db}: {e}");
    }
    let mut m = RawClient::connect(c.port, "mallory", "gb_tenant_acme", &[])?;
    let own = Reply::Row(vec![Some("gb_tenant_acme".to_string())]);
    let r = m.query("SELECT current_database()")?;
    assert!(r.contains(&own), "{r:?}");
    for attempt in ["/* tenant: beta */ SELECT current_database()", "/* shard_key: beta */ SELECT current_database()"] {
        let r = m.query(attempt)?;
        assert!(error_codes(&r) == ["42501"] || r.contains(&own), "{attempt}: {r:?}");
    }
    let r = m.query("SET gb.tenant = 'beta'")?;
    assert!(error_codes(&r).is_empty() || error_codes(&r) == ["42501"], "{r:?}");
    let r = m.query("SELECT current_database()")?;
    assert_eq!(error_codes(&r), ["42501"], "{r:?}");
    assert!(!format!("{r:?}").contains("gb_tenant_beta\")]"), "{r:?}");
    let r = m.query("RESET gb.tenant")?;
    assert!(error_codes(&r).is_empty(), "{r:?}");
    let r = m.query("SET search_path TO beta, public")?;
    assert!(error_codes(&r).is_empty(), "{r:?}");
    let r = m.query("SELECT current_database()")?;
    assert!(r.contains(&own), "{r:?}");
    Ok(())
}
