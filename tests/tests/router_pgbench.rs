//! pgbench through the router: `pgbench_accounts` sharded by `aid` over four shards, loaded through the
//! router with COPY (rows split by key, column position read from the table), then select-only runs in
//! the simple, extended and prepared protocols with zero failed transactions.

use std::process::Command;

use integration::Cluster;

const ACCOUNTS: i64 = 20_000;

fn pgbench(c: &Cluster, args: &[&str]) -> String {
    let out = Command::new("pgbench")
        .args(args)
        .arg(c.conn_str())
        .output()
        .expect("pgbench (apt-get install postgresql-client)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_select_only_in_every_protocol() -> anyhow::Result<()> {
    let c = Cluster::start(
        4,
        "shard-strategy,hash\nshard-count,4\nshard-key,aid\nrouter-auth,trust\npool-size,8\nshard-global-tables,pgbench_branches,pgbench_tellers,pgbench_history\n",
        |i, s| format!("shard-node-{i},{}\n", s.url("postgres")),
    )?;

    // pgbench creates its tables through the router (DDL goes to every shard).
    pgbench(&c, &["-i", "-I", "dt", "-s", "1"]);

    // Branches and tellers are global; accounts are loaded with COPY through the router.
    let mut script = String::from("INSERT INTO pgbench_branches (bid, bbalance) VALUES (1, 0);\n");
    for t in 1..=10 {
        script.push_str(&format!("INSERT INTO pgbench_tellers (tid, bid, tbalance) VALUES ({t}, 1, 0);\n"));
    }
    script.push_str("COPY pgbench_accounts FROM STDIN;\n");
    for aid in 1..=ACCOUNTS {
        script.push_str(&format!("{aid}\t1\t0\t\n"));
    }
    script.push_str("\\.\n");
    let out = c.psql(&script)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.is_empty(), "{err}");
    let mut total = 0;
    for (shard, s) in c.shards.iter().enumerate() {
        let db = s.client("postgres").await?;
        let n: i64 = db.query_one("SELECT count(*) FROM pgbench_accounts", &[]).await?.get(0);
        let wrong: i64 =
            db.query_one("SELECT count(*) FROM pgbench_accounts WHERE aid % 4 <> $1", &[&(shard as i32)]).await?.get(0);
        assert_eq!(wrong, 0, "shard {shard} holds another shard's rows");
        assert!(n > ACCOUNTS / 5, "shard {shard}: {n} rows");
        total += n;
    }
    assert_eq!(total, ACCOUNTS);

    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(&c, &["-n", "-S", "-M", mode, "-c", "4", "-j", "2", "-t", "300"]);
        assert!(out.contains("number of failed transactions: 0"), "{mode}:\n{out}");
        assert!(out.contains("number of transactions actually processed: 1200/1200"), "{mode}:\n{out}");
        let tps = out.lines().find(|l| l.starts_with("tps")).unwrap_or("");
        eprintln!("pgbench -S -M {mode} through 4 shards: {tps}");
    }
    Ok(())
}
