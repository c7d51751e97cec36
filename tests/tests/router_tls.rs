//! TLS for clients when `router-tls-cert` and `router-tls-key` are set: psql with `sslmode=require` gets a
//! TLS session through the router; a plain-text client is still served.

use std::process::Command;

use integration::Cluster;

#[test]
fn psql_over_tls() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = integration::certs::self_signed(dir.path());
    let extra = format!("router-tls-cert,{}\nrouter-tls-key,{}\n", cert.display(), key.display());
    let c = Cluster::hash(2, &extra)?;
    let run = |sslmode: &str| {
        let out = Command::new("psql")
            .arg(format!("{} sslmode={sslmode}", c.conn_str()))
            .args(["-X", "-A", "-t", "-c", "\\conninfo", "-c", "SELECT 40 + 2"])
            .output()
            .expect("psql");
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (out, err) = run("require");
    assert!(out.contains("SSL connection") && out.contains("42"), "{out}{err}");
    let (out, err) = run("disable");
    assert!(!out.contains("SSL connection") && out.contains("42"), "{out}{err}");
    Ok(())
}

/// TLS to the shards: a node URL's `sslmode` and `sslrootcert`, against PostgreSQL servers with `ssl = on`
/// and certificates the test makes: `require` and `verify-full` connect over TLS (the server's
/// `pg_stat_ssl` says so), `verify-ca` accepts a certificate for another name and `verify-full` refuses it,
/// a certificate from another CA is refused, and `require` against a server without TLS says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_shards() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    use integration::certs;
    certs::ca(d, "ca");
    certs::signed(d, "ca", "good", "IP:127.0.0.1,DNS:localhost");
    certs::ca(d, "other");
    certs::signed(d, "other", "misnamed", "DNS:db.example.org");
    // (The server runs as the postgres user when the tests run as root: its key must be its own, 0600.)
    certs::for_server(d, "good");
    certs::for_server(d, "misnamed");
    let server = |name: &str| {
        let cert = format!("ssl_cert_file={}", d.join(format!("{name}.crt")).display());
        let key = format!("ssl_key_file={}", d.join(format!("{name}.key")).display());
        integration::PgServer::start_with(&["ssl=on", &cert, &key])
    };
    let good = server("good")?;
    let misnamed = server("misnamed")?;
    let plain = integration::PgServer::start()?;
    let ca = d.join("ca.crt").display().to_string();
    let other_ca = d.join("other.crt").display().to_string();

    // Through a one-node router (the server answers every statement): whether the session is encrypted.
    async fn ssl_through(url: &str) -> Result<String, String> {
        let c = Cluster::start_url(url).map_err(|e| e.to_string())?;
        let db = c.client().await.map_err(|e| {
            let db = e.downcast_ref::<tokio_postgres::Error>().and_then(|e| e.as_db_error());
            db.map_or(e.to_string(), |d| d.message().to_string())
        })?;
        let row = db
            .query_one("SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .await
            .map_err(|e| e.as_db_error().map_or(e.to_string(), |d| d.message().to_string()))?;
        Ok(row.get(0))
    }
    let url = |s: &integration::PgServer, params: &str| format!("{}?{params}", s.url("postgres"));
    assert_eq!(ssl_through(&url(&good, "sslmode=require")).await, Ok("true".into()));
    assert_eq!(ssl_through(&url(&good, &format!("sslmode=verify-full&sslrootcert={ca}"))).await, Ok("true".into()));
    assert_eq!(ssl_through(&url(&good, "sslmode=disable")).await, Ok("false".into()));
    assert_eq!(ssl_through(&url(&plain, "sslmode=prefer")).await, Ok("false".into()));
    // Another name: verify-ca accepts it (the chain is checked), verify-full does not.
    let misnamed_ca = d.join("other.crt").display().to_string();
    assert_eq!(
        ssl_through(&url(&misnamed, &format!("sslmode=verify-ca&sslrootcert={misnamed_ca}"))).await,
        Ok("true".into())
    );
    let e = ssl_through(&url(&misnamed, &format!("sslmode=verify-full&sslrootcert={misnamed_ca}"))).await.unwrap_err();
    assert!(e.contains("TLS") && e.to_lowercase().contains("name"), "{e}");
    // Another CA: refused.
    let e = ssl_through(&url(&good, &format!("sslmode=verify-ca&sslrootcert={other_ca}"))).await.unwrap_err();
    assert!(e.contains("TLS"), "{e}");
    // A server without TLS under require: said so.
    let e = ssl_through(&url(&plain, "sslmode=require")).await.unwrap_err();
    assert!(e.contains("does not accept TLS"), "{e}");
    Ok(())
}

/// The control plane over TLS too: with shards that refuse connections without TLS (`hostssl` only) and
/// `sslmode=verify-full` in the node URLs, a transaction on two shards commits — its decision is recorded in
/// the decision log on node 0 through a TLS connection of the router's own — and each part is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_over_tls() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    use integration::certs;
    certs::ca(d, "ca");
    certs::signed(d, "ca", "good", "IP:127.0.0.1,DNS:localhost");
    certs::for_server(d, "good");
    let cert = format!("ssl_cert_file={}", d.join("good.crt").display());
    let key = format!("ssl_key_file={}", d.join("good.key").display());
    let mut servers = Vec::new();
    for _ in 0..2 {
        let s = integration::PgServer::start_with(&["ssl=on", &cert, &key])?;
        s.client("postgres").await?.batch_execute("CREATE TABLE kv (user_id bigint PRIMARY KEY)").await?;
        s.require_ssl().await?;
        servers.push(s);
    }
    assert!(servers[0].client("postgres").await.is_err(), "the server still takes connections without TLS");
    let ca = d.join("ca.crt").display().to_string();
    let head = "shard-strategy,hash\nshard-count,2\nshard-key,user_id\nshard-algorithm,modulo\nrouter-auth,trust\n";
    let cluster = Cluster::with_servers(servers, head, |i, s| {
        format!("shard-node-{i},{}?sslmode=verify-full&sslrootcert={ca}\n", s.url("postgres"))
    })?;
    let db = cluster.client().await?;
    db.batch_execute("BEGIN").await?;
    db.execute("INSERT INTO kv VALUES (0)", &[]).await?;
    db.execute("INSERT INTO kv VALUES (1)", &[]).await?;
    db.batch_execute("COMMIT").await?;
    let rows = db.query("SELECT user_id FROM kv ORDER BY 1", &[]).await?;
    assert_eq!(rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>(), vec![0, 1]);
    Ok(())
}

/// SCRAM channel binding over TLS (SCRAM-SHA-256-PLUS, `tls-server-end-point`): psql with
/// `channel_binding=require` authenticates through the router over TLS; in plain text the router offers no
/// binding, so such a client refuses to go on; a wrong password is still refused.
#[test]
fn scram_channel_binding_over_tls() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = integration::certs::self_signed(dir.path());
    let extra = format!(
        "router-tls-cert,{}\nrouter-tls-key,{}\nrouter-auth,scram-sha-256\nrouter-user-bob,bob-pw\n",
        cert.display(),
        key.display()
    );
    let c = Cluster::start(1, &format!("shard-strategy,hash\nshard-count,1\n{extra}"), |i, s| {
        format!("shard-node-{i},{}\n", s.url("postgres"))
    })?;
    let run = |params: &str| {
        let out = Command::new("psql")
            .arg(format!("host=127.0.0.1 port={} user=bob dbname=postgres {params}", c.port))
            .args(["-X", "-A", "-t", "-c", "\\conninfo", "-c", "SELECT 40 + 2"])
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .expect("psql");
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (out, err) = run("password=bob-pw sslmode=require channel_binding=require");
    assert!(out.contains("SSL connection") && out.contains("42"), "{out}{err}");
    let (out, err) = run("password=bob-pw sslmode=disable channel_binding=require");
    assert!(!out.contains("42") && err.contains("channel binding"), "{out}{err}");
    let (out, err) = run("password=wrong sslmode=require channel_binding=require");
    assert!(!out.contains("42") && err.contains("password authentication failed"), "{out}{err}");
    let (out, err) = run("password=bob-pw sslmode=disable");
    assert!(out.contains("42"), "{out}{err}");
    Ok(())
}
