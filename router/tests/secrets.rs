//! Secrets: `router-user-<name>` may hold a SCRAM verifier (as PostgreSQL stores it) instead of a password,
//! and a node's password may come from a file or an environment variable; clients authenticate with SCRAM
//! against either. No secret appears in the router's log (at debug level), `shard-router check`, the admin
//! console, `/metrics` or the health endpoint.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use localpg::{free_port, PgServer};

const BOB: &str = "bob-clear-secret-51";
const ALICE: &str = "alice-secret-77";
const NODE_FILE: &str = "node-file-secret-93";
const NODE_ENV: &str = "node-env-secret-28";

async fn connect(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let url = format!("host=127.0.0.1 port={port} user={user} password={password} dbname={db} connect_timeout=3");
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifiers_and_password_files_and_no_secret_anywhere() {
    let shards = [PgServer::start().unwrap(), PgServer::start().unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let pw_file = dir.path().join("node0.password");
    std::fs::write(&pw_file, format!("{NODE_FILE}\n")).unwrap();
    let verifier = postgres_protocol::password::scram_sha_256(ALICE.as_bytes());
    let (port, http) = (free_port(), free_port());
    let config = dir.path().join("config.csv");
    std::fs::write(
        &config,
        format!(
            "shard-strategy,hash\nshard-count,2\nrouter-auth,scram-sha-256\nrouter-user-alice,{verifier}\n\
             router-user-bob,{BOB}\nrouter-admin-users,bob\nrouter-http,127.0.0.1:{http}\n\
             shard-node-0,{}\nshard-node-0-password-file,{}\nshard-node-1,{}\nshard-node-1-password-env,GB_NODE1_PW\n",
            shards[0].url("postgres"),
            pw_file.display(),
            shards[1].url("postgres"),
        ),
    )
    .unwrap();
    let log = dir.path().join("router.log");
    let mut router = Command::new(env!("CARGO_BIN_EXE_shard-router"))
        .args(["serve", "--config", config.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "debug")
        .env("GB_NODE1_PW", NODE_ENV)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let bob = loop {
        match connect(port, "bob", BOB, "postgres").await {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("{e}"),
        }
    };
    bob.batch_execute("CREATE TABLE notes (user_id bigint, body text)").await.unwrap();
    // Alice's verifier: the right password works, a wrong one is refused.
    let alice = connect(port, "alice", ALICE, "postgres").await.unwrap();
    alice.execute("INSERT INTO notes VALUES (1, 'hi')", &[]).await.unwrap();
    let Err(e) = connect(port, "alice", "not-her-password", "postgres").await else { panic!("accepted") };
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("28P01"), "{e}");
    let Err(e) = connect(port, "bob", "wrong", "postgres").await else { panic!("accepted") };
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("28P01"), "{e}");

    // Everything the router shows.
    let admin = connect(port, "bob", BOB, "shard_admin").await.unwrap();
    let mut shown = String::new();
    for cmd in ["SHOW SHARDS", "SHOW POOLS", "SHOW CLIENTS", "SHOW STATS"] {
        for m in admin.simple_query(cmd).await.unwrap() {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                shown.extend((0..r.len()).map(|i| r.get(i).unwrap_or("").to_string() + " "));
            }
        }
    }
    for path in ["/metrics", "/api/health"] {
        let out = Command::new("curl").args(["-s", &format!("http://127.0.0.1:{http}{path}")]).output().unwrap();
        shown.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    let check = Command::new(env!("CARGO_BIN_EXE_shard-router"))
        .args(["check", "--config", config.to_str().unwrap()])
        .env("GB_NODE1_PW", NODE_ENV)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    shown.push_str(&String::from_utf8_lossy(&check.stdout));
    shown.push_str(&String::from_utf8_lossy(&check.stderr));
    router.kill().unwrap();
    router.wait().unwrap();
    shown.push_str(&std::fs::read_to_string(&log).unwrap());
    let stored_key = verifier.split('$').nth(2).unwrap().split(':').next().unwrap().to_string();
    for secret in [BOB, ALICE, NODE_FILE, NODE_ENV, verifier.as_str(), stored_key.as_str()] {
        assert!(!shown.contains(secret), "{secret} appears in what the router shows");
    }
    assert!(shown.contains("shard_router_queries_total"), "the outputs were read");
    // Without the variable, the config names the key and the variable.
    let check = Command::new(env!("CARGO_BIN_EXE_shard-router"))
        .args(["check", "--config", config.to_str().unwrap()])
        .env_remove("GB_NODE1_PW")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&check.stderr).to_string() + &String::from_utf8_lossy(&check.stdout);
    assert!(
        !check.status.success() && err.contains("shard-node-1-password-env") && err.contains("GB_NODE1_PW"),
        "{err}"
    );
}
