//! Python psycopg 3 through the router (`tests/clients/psycopg_app.py`): autocommit and transactions,
//! binary server-side parameters, prepared statements, executemany, fan-out reads, COPY.

use std::process::Command;

use integration::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_workload() -> anyhow::Result<()> {
    let c = Cluster::hash(4, "")?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/psycopg_app.py");
    let out = Command::new("python3").arg(script).arg(c.conn_str()).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim_end().ends_with("ok"), "{text}");
    for (shard, s) in c.shards.iter().enumerate() {
        let db = s.client("postgres").await?;
        let wrong: i64 =
            db.query_one("SELECT count(*) FROM sessions WHERE user_id % 4 <> $1", &[&(shard as i64)]).await?.get(0);
        assert_eq!(wrong, 0, "shard {shard}");
        let n: i64 = db.query_one("SELECT count(*) FROM sessions", &[]).await?.get(0);
        assert!(n >= 3, "shard {shard}: {n}");
    }
    Ok(())
}

/// psycopg's own behaviour (`tests/clients/psycopg_protocol.py`): pipelines with errors, COPY in
/// transactions (text, binary, an error mid-copy), server-side cursors, savepoints before the first keyed
/// statement, two-phase commit, client_encoding, ParameterStatus, notices.
fn psycopg_protocol(mode: &str) -> anyhow::Result<()> {
    let c = Cluster::hash(2, &format!("pool-mode,{mode}\n"))?;
    let out = c.psql("CREATE TABLE users (user_id bigint PRIMARY KEY, name text, n int)")?;
    assert!(out.status.success(), "{out:?}");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/psycopg_protocol.py");
    let out = Command::new("timeout").args(["120", "python3", script]).arg(c.conn_str()).arg("2").output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.trim_end().ends_with("ok"), "{mode} pooling:\n{text}");
    Ok(())
}

#[test]
fn psycopg_behaviour_in_transaction_pooling() -> anyhow::Result<()> {
    psycopg_protocol("transaction")
}

#[test]
fn psycopg_behaviour_in_session_pooling() -> anyhow::Result<()> {
    psycopg_protocol("session")
}

/// psycopg's AsyncConnection (`tests/clients/psycopg_async.py`), with every statement prepared.
#[test]
fn psycopg_async() -> anyhow::Result<()> {
    let c = Cluster::hash(2, "shard-global-tables,bots\n")?;
    let out = c.psql(
        "CREATE TABLE users (user_id bigint PRIMARY KEY, name text, n int); CREATE TABLE bots (id int PRIMARY KEY, name text);",
    )?;
    assert!(out.status.success(), "{out:?}");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/psycopg_async.py");
    let out = Command::new("timeout").args(["120", "python3", script]).arg(c.conn_str()).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.trim_end().ends_with("ok"), "{text}");
    Ok(())
}
