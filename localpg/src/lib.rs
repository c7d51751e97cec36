//! Local PostgreSQL servers for `shard-router demo` and the tests: `initdb` and `pg_ctl` in a temporary
//! directory, on a free loopback port, stopped (and the directory removed) when dropped.
//!
//! PostgreSQL refuses to run as root, so when started as root the servers run as the `postgres` OS user
//! (`runuser`). Server binaries come from `$PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`, else the
//! directory `pg_config --bindir` names.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

/// The directory holding initdb, pg_ctl and postgres.
pub fn pg_bin() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return Ok(bin);
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .context("no PostgreSQL server binaries: install postgresql (see the README)")?;
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// One running PostgreSQL server (fsync off, 200 connections, two-phase commit enabled).
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    pub port: u16,
}

impl PgServer {
    /// initdb (trust authentication, user `postgres`) and start on a free port.
    pub fn start() -> Result<PgServer> {
        Self::start_with(&[])
    }

    /// Like [`PgServer::start`], with extra `-c name=value` server settings.
    pub fn start_with(settings: &[&str]) -> Result<PgServer> {
        let bin = pg_bin()?;
        let as_postgres = is_root();
        let dir = tempfile::Builder::new().prefix("shard-router-pg-").tempdir()?;
        if as_postgres {
            run(Command::new("chown").args(["postgres:", &dir.path().display().to_string()]))?;
        }
        let mut server = PgServer { dir, bin, as_postgres, port: 0 };
        let data = server.data();
        server.pg(
            &server.bin.join("initdb"),
            &["-D", &data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
        )?;
        server.launch(settings)?;
        Ok(server)
    }

    /// A streaming-replication standby of this server (`pg_basebackup -R`), started on its own free port.
    pub fn standby(&self) -> Result<PgServer> {
        let dir = tempfile::Builder::new().prefix("shard-router-pg-").tempdir()?;
        if self.as_postgres {
            run(Command::new("chown").args(["postgres:", &dir.path().display().to_string()]))?;
        }
        let mut server = PgServer { dir, bin: self.bin.clone(), as_postgres: self.as_postgres, port: 0 };
        let data = server.data();
        let port = self.port.to_string();
        server.pg(
            &self.bin.join("pg_basebackup"),
            &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-D", &data, "-R", "-X", "stream", "--no-sync"],
        )?;
        server.launch(&[])?;
        Ok(server)
    }

    /// Starts the server again after [`PgServer::stop`] on the port it had (as a restarted database
    /// server comes back where its clients and the router's config expect it).
    pub fn start_again(&mut self) -> Result<()> {
        self.launch_at(Some(self.port), &[])
    }

    /// Starts the server in its data directory on a free port.
    fn launch(&mut self, settings: &[&str]) -> Result<()> {
        self.launch_at(None, settings)
    }

    /// Starts the server on `port`, or on a free port (another one if it was taken in between).
    fn launch_at(&mut self, fixed: Option<u16>, settings: &[&str]) -> Result<()> {
        let data = self.data();
        let mut last = None;
        for _ in 0..5 {
            let port = fixed.unwrap_or_else(free_port);
            let mut opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200 -c max_prepared_transactions=50",
                self.dir.path().display()
            );
            for s in settings {
                opts.push_str(&format!(" -c {s}"));
            }
            let log = self.dir.path().join("log").display().to_string();
            match self.pg(&self.bin.join("pg_ctl"), &["-D", &data, "-l", &log, "-w", "-t", "60", "-o", &opts, "start"])
            {
                Ok(_) => {
                    self.port = port;
                    return Ok(());
                }
                Err(e) => last = Some(e), // the port was taken in between: try another
            }
        }
        let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
        bail!("PostgreSQL did not start: {:?}\n{log}", last)
    }

    /// Stops the server (`pg_ctl stop -m <mode>`: smart, fast or immediate); the directory stays until drop.
    pub fn stop(&self, mode: &str) -> Result<()> {
        self.pg(&self.bin.join("pg_ctl"), &["-D", &self.data(), "-m", mode, "-w", "stop"]).map(drop)
    }

    /// The server's log so far (for a test's failure message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Starts the server again after [`PgServer::stop`] (on a new free port).
    pub fn restart(&mut self) -> Result<()> {
        self.launch(&[])
    }

    /// Promotes a standby to primary and waits until it accepts writes.
    pub fn promote(&self) -> Result<()> {
        self.pg(&self.bin.join("pg_ctl"), &["-D", &self.data(), "-w", "promote"]).map(drop)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn pg(&self, program: &Path, args: &[&str]) -> Result<Output> {
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(args).current_dir(self.dir.path());
        run(&mut cmd)
    }

    /// Makes TCP connections need `password` for user `postgres`, checked with `method` (`scram-sha-256`
    /// or `md5`), from now on.
    pub async fn require_password(&self, method: &str, password: &str) -> Result<()> {
        let db = self.client("postgres").await?;
        let encryption = if method == "md5" { "md5" } else { "scram-sha-256" };
        db.batch_execute(&format!(
            "SET password_encryption = '{encryption}'; ALTER ROLE postgres PASSWORD '{}'",
            password.replace('\'', "''")
        ))
        .await?;
        let hba = format!("local all all trust\nhost all all 127.0.0.1/32 {method}\nhost all all ::1/128 {method}\n");
        std::fs::write(self.dir.path().join("data").join("pg_hba.conf"), hba)?;
        db.batch_execute("SELECT pg_reload_conf()").await?;
        Ok(())
    }

    /// Refuses TCP connections without TLS from now on (`hostssl` only; the server must run with `ssl=on`).
    pub async fn require_ssl(&self) -> Result<()> {
        let db = self.client("postgres").await?;
        let hba = "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n";
        std::fs::write(self.dir.path().join("data").join("pg_hba.conf"), hba)?;
        db.batch_execute("SELECT pg_reload_conf()").await?;
        Ok(())
    }

    /// A libpq-style connection string for database `db`.
    pub fn conn_str(&self, db: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={db}", self.port)
    }

    /// A `postgres://` URL for database `db`, as config.csv's `shard-node-*` wants it.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A tokio-postgres client on database `db`; its connection task runs on the current runtime.
    pub async fn client(&self, db: &str) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.conn_str(db), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self.pg(&self.bin.join("pg_ctl"), &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}
