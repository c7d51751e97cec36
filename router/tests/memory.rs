//! Memory after a burst, through the real `shard-router` binary (its allocator is set up in its `main`, not
//! in the library the other tests run in-process): hundreds of clients connect, run a statement and leave,
//! and the router gives what their sessions took back to the system within seconds, even with nothing
//! running after them.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use localpg::{free_port, PgServer};

/// The router process, killed when dropped (also when the test fails).
struct Router(Child);

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Router {
    /// Resident memory, KiB.
    fn rss_kb(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmRSS in /proc/<pid>/status")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_of_a_burst_of_clients_goes_back_once_they_leave() -> Result<()> {
    let pg = PgServer::start()?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.csv");
    std::fs::write(
        &config,
        format!(
            "shard-strategy,hash\nshard-count,1\nrouter-auth,trust\npool-size,4\nshard-node-0,{}\n",
            pg.url("postgres")
        ),
    )?;
    let port = free_port();
    let router = Router(
        Command::new(env!("CARGO_BIN_EXE_shard-router"))
            .args(["serve", "--config", config.to_str().context("a UTF-8 path")?, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting shard-router")?,
    );
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let started = Instant::now();
    while tokio_postgres::connect(&url, tokio_postgres::NoTls).await.is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            bail!("the router did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = router.rss_kb()?;

    // 600 clients at once, each with a statement answered; then all gone.
    let mut clients = Vec::new();
    for _ in 0..6 {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let url = url.clone();
            batch.spawn(async move {
                let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                let task = tokio::spawn(conn);
                let n: i32 = c.query_one("SELECT 6 * 7", &[]).await?.get(0);
                anyhow::ensure!(n == 42, "6 * 7 = {n}");
                Ok((c, task))
            });
        }
        while let Some(r) = batch.join_next().await {
            clients.push(r??);
        }
    }
    let during = router.rss_kb()?;
    for (c, task) in clients {
        drop(c);
        let _ = task.await;
    }
    let grown = during.saturating_sub(before);
    assert!(grown > 4 * 1024, "600 clients took {grown} KiB: too little to tell anything by");

    // Back within a few seconds to less than half of what they took, with no client left to make the router
    // allocate or free anything.
    let left = Instant::now();
    let mut after = router.rss_kb()?;
    while after > before + grown / 2 && left.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = router.rss_kb()?;
    }
    println!(
        "router RSS: {} KiB before, {} KiB with 600 clients, {} KiB {:?} after they left",
        before,
        during,
        after,
        left.elapsed()
    );
    assert!(
        after <= before + grown / 2,
        "the router kept the memory of clients that left: {} KiB before, {} KiB with 600 clients, {} KiB 8 s after",
        before,
        during,
        after
    );
    Ok(())
}
