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
