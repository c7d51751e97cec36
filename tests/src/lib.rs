//! The test harness: real PostgreSQL servers on free loopback ports in temporary directories, stopped when
//! dropped (also when a test fails), never a mock (`router::localpg`); and a `Cluster` of them with a router
//! in front, running in this process on a free port.
#![forbid(unsafe_code)]

use std::process::{Command, Output};

use anyhow::{Context, Result};
pub use localpg::{free_port, pg_bin, PgServer};

pub mod certs;
pub mod patroni;
pub mod wire;

/// Several PostgreSQL shards and a router in front of them, running in this process on a free port.
/// Dropping it stops the router and the servers.
pub struct Cluster {
    pub shards: Vec<PgServer>,
    pub port: u16,
    pub config: String,
    /// The config file the router was started from (RELOAD re-reads it).
    pub config_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Cluster {
    /// `n` hash shards (modulo on `user_id`, `trust` authentication) plus `extra` config.csv rows.
    pub fn hash(n: usize, extra: &str) -> Result<Cluster> {
        let head = format!("shard-strategy,hash\nshard-count,{n}\nshard-key,user_id\nrouter-auth,trust\n{extra}");
        Self::start(n, &head, |i, s| format!("shard-node-{i},{}\n", s.url("postgres")))
    }

    /// A router in front of one node at `url` (a server started elsewhere), `trust` authentication.
    pub fn start_url(url: &str) -> Result<Cluster> {
        let config = format!("shard-strategy,hash\nshard-count,1\nrouter-auth,trust\nshard-node-0,{url}\n");
        Self::with_servers(Vec::new(), &config, |_, _| String::new())
    }

    /// `n` servers and a config made of `head` plus one row per server from `node`.
    pub fn start(n: usize, head: &str, node: impl Fn(usize, &PgServer) -> String) -> Result<Cluster> {
        let shards = (0..n).map(|_| PgServer::start()).collect::<Result<Vec<_>>>()?;
        Self::with_servers(shards, head, node)
    }

    /// A router in front of servers already started.
    pub fn with_servers(
        shards: Vec<PgServer>,
        head: &str,
        node: impl Fn(usize, &PgServer) -> String,
    ) -> Result<Cluster> {
        let mut config = head.to_string();
        for (i, s) in shards.iter().enumerate() {
            config.push_str(&node(i, s));
        }
        let dir = tempfile::Builder::new().prefix("shard-router-config-").tempdir()?;
        let config_path = dir.path().join("config.csv");
        std::fs::write(&config_path, &config)?;
        let parsed = shardmap::Config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = router::server::run(listener, parsed, async {
                    let _ = stopped.await;
                })
                .await;
            });
        });
        Ok(Cluster { shards, port, config, config_path, _dir: dir, stop: Some(stop), thread: Some(thread) })
    }

    /// A libpq connection string to the router.
    pub fn conn_str(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    /// A tokio-postgres client through the router.
    pub async fn client(&self) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.conn_str(), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Runs psql through the router with `script` on standard input; returns its output (stdout + stderr).
    pub fn psql(&self, script: &str) -> Result<Output> {
        use std::io::Write;
        let mut child = Command::new("psql")
            .args([&self.conn_str(), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=0"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("psql (apt-get install postgresql-client)")?;
        child.stdin.take().expect("stdin").write_all(script.as_bytes())?;
        Ok(child.wait_with_output()?)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
