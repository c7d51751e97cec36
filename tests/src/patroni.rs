//! A real Patroni cluster on loopback for the failover tests: one etcd (v3 API) and PostgreSQL nodes under
//! Debian's Patroni, with fast timings (ttl 5, loop_wait 1, retry_timeout 2), `synchronous_mode: true` and
//! durable settings (fsync and synchronous_commit on), so that no acknowledged commit can be lost. Patroni and
//! PostgreSQL run as the `postgres` OS user when the tests run as root. Everything is killed and removed when
//! the value is dropped, also when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{free_port, pg_bin};

pub struct Member {
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
    config: PathBuf,
    process: Option<Child>,
}

pub struct PatroniCluster {
    dir: tempfile::TempDir,
    etcd: Child,
    pub etcd_port: u16,
    pub members: Vec<Member>,
    as_postgres: bool,
    /// The REST API's certificate and key, when it serves HTTPS.
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// `program` as the `postgres` user when running as root.
fn command(as_postgres: bool, program: &str) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    }
}

impl PatroniCluster {
    /// Starts etcd and `n` Patroni members, and waits until there is a leader and `n - 1` streaming replicas.
    pub fn start(n: usize) -> Result<PatroniCluster> {
        Self::start_with(n, None)
    }

    /// Like [`PatroniCluster::start`], the REST API serving HTTPS with this certificate and key (PEM files
    /// readable by the user Patroni runs as).
    pub fn start_tls(n: usize, cert: &std::path::Path, key: &std::path::Path) -> Result<PatroniCluster> {
        Self::start_with(n, Some((cert.to_path_buf(), key.to_path_buf())))
    }

    fn start_with(n: usize, tls: Option<(std::path::PathBuf, std::path::PathBuf)>) -> Result<PatroniCluster> {
        for tool in ["patroni", "patronictl", "etcd"] {
            if Command::new(tool).arg("--version").output().is_err() {
                bail!("{tool} is not installed (apt-get install patroni etcd-server; scripts/test.sh does it)");
            }
        }
        let as_postgres = is_root();
        let dir = tempfile::Builder::new().prefix("shard-router-patroni-").tempdir()?;
        if as_postgres {
            let status = Command::new("chown").args(["postgres:", &dir.path().display().to_string()]).status()?;
            if !status.success() {
                bail!("chown of {} failed", dir.path().display());
            }
        }
        let etcd_port = free_port();
        let peer_port = free_port();
        let etcd_log = std::fs::File::create(dir.path().join("etcd.log"))?;
        let etcd = command(as_postgres, "etcd")
            .args(["--name", "e0", "--data-dir"])
            .arg(dir.path().join("etcd"))
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{etcd_port}")])
            .args(["--advertise-client-urls", &format!("http://127.0.0.1:{etcd_port}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer_port}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer_port}")])
            .args(["--initial-cluster", &format!("e0=http://127.0.0.1:{peer_port}")])
            .stdout(etcd_log.try_clone()?)
            .stderr(etcd_log)
            .spawn()
            .context("etcd")?;
        let mut cluster = PatroniCluster { dir, etcd, etcd_port, members: Vec::new(), as_postgres, tls };
        wait_for(Duration::from_secs(30), "etcd to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", etcd_port)).is_ok()
        })?;
        for i in 0..n {
            let m = cluster.member(i)?;
            cluster.members.push(m);
            cluster.launch(i)?;
            if i == 0 {
                // The first member bootstraps the cluster; the others clone it.
                cluster.wait_leader(Duration::from_secs(90))?;
            }
        }
        cluster.wait_replicas(n - 1, Duration::from_secs(120))?;
        Ok(cluster)
    }

    fn member(&self, i: usize) -> Result<Member> {
        let name = format!("pg{i}");
        let (pg_port, api_port) = (free_port(), free_port());
        let home = self.dir.path().join(&name);
        std::fs::create_dir_all(&home)?;
        let bin = pg_bin()?;
        let yaml = format!(
            r#"scope: shard-router-test
name: {name}
log:
  level: INFO
  dir: {home}
restapi:
  listen: 127.0.0.1:{api_port}
  connect_address: 127.0.0.1:{api_port}
{restapi_tls}etcd3:
  hosts: 127.0.0.1:{etcd}
bootstrap:
  dcs:
    ttl: 5
    loop_wait: 1
    retry_timeout: 2
    maximum_lag_on_failover: 1048576
    synchronous_mode: true
    postgresql:
      use_pg_rewind: true
      parameters:
        wal_level: logical
        hot_standby: "on"
        wal_log_hints: "on"
        max_wal_senders: 10
        max_replication_slots: 10
        fsync: "on"
        synchronous_commit: "on"
        max_prepared_transactions: 50
  initdb:
  - encoding: UTF8
  - locale: C
  pg_hba:
  - local all all trust
  - host all all 127.0.0.1/32 trust
  - host replication all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:{pg_port}
  connect_address: 127.0.0.1:{pg_port}
  data_dir: {home}/data
  bin_dir: {bin}
  pgpass: {home}/pgpass
  authentication:
    superuser:
      username: postgres
      password: postgres
    replication:
      username: replicator
      password: replicator
    rewind:
      username: postgres
      password: postgres
  parameters:
    unix_socket_directories: {home}
    max_connections: 100
"#,
            home = home.display(),
            etcd = self.etcd_port,
            restapi_tls = match &self.tls {
                Some((cert, key)) =>
                    format!("  certfile: {}\n  keyfile: {}\nctl:\n  insecure: true\n", cert.display(), key.display()),
                None => String::new(),
            },
            bin = bin.display(),
        );
        let config = home.join("patroni.yml");
        std::fs::write(&config, yaml)?;
        if self.as_postgres {
            Command::new("chown").args(["-R", "postgres:", &home.display().to_string()]).status()?;
        }
        Ok(Member { name, pg_port, api_port, config, process: None })
    }

    /// Starts member `i`'s Patroni (again, after a kill).
    pub fn launch(&mut self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let log = std::fs::File::create(self.dir.path().join(format!("{}.out", m.name)))?;
        let child = command(self.as_postgres, "patroni")
            .arg(&m.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("patroni")?;
        self.members[i].process = Some(child);
        Ok(())
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The members' REST API URLs, for `shard-node-<name>-patroni`.
    pub fn api_urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.members.iter().map(|m| format!("{scheme}://127.0.0.1:{}", m.api_port)).collect()
    }

    /// `GET /cluster` from the first member that answers.
    pub fn cluster_json(&self) -> Option<serde_json::Value> {
        self.members.iter().find_map(|m| {
            let out = Command::new("curl")
                .args(["-s", "-k", "--max-time", "2", &format!("{}://127.0.0.1:{}/cluster", self.scheme(), m.api_port)])
                .output()
                .ok()?;
            serde_json::from_slice(&out.stdout).ok()
        })
    }

    /// The leader's name, if the cluster has one that runs.
    pub fn leader(&self) -> Option<String> {
        let v = self.cluster_json()?;
        v["members"].as_array()?.iter().find_map(|m| {
            let role = m["role"].as_str()?;
            (matches!(role, "leader" | "master" | "primary") && m["state"].as_str() == Some("running"))
                .then(|| m["name"].as_str().map(str::to_string))
                .flatten()
        })
    }

    pub fn member_index(&self, name: &str) -> usize {
        self.members.iter().position(|m| m.name == name).expect("a member of this cluster")
    }

    pub fn wait_leader(&self, within: Duration) -> Result<String> {
        let t = Instant::now();
        while t.elapsed() < within {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("no Patroni leader within {within:?}\n{}", self.logs())
    }

    /// Waits for a leader other than `old`; returns its name and when it was seen.
    pub fn wait_new_leader(&self, old: &str, within: Duration) -> Result<(String, Instant)> {
        let t = Instant::now();
        while t.elapsed() < within {
            if let Some(l) = self.leader().filter(|l| l != old) {
                return Ok((l, Instant::now()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("no new Patroni leader within {within:?}\n{}", self.logs())
    }

    fn wait_replicas(&self, n: usize, within: Duration) -> Result<()> {
        let t = Instant::now();
        while t.elapsed() < within {
            // Synchronous mode: one of them must be the synchronous standby before a switchover can go to it.
            let counts = self.cluster_json().and_then(|v| {
                let members = v["members"].as_array()?.clone();
                let up = |m: &&serde_json::Value| matches!(m["state"].as_str(), Some("running" | "streaming"));
                let replicas = members
                    .iter()
                    .filter(|m| matches!(m["role"].as_str(), Some("replica" | "sync_standby")))
                    .filter(up);
                let sync = members.iter().filter(|m| m["role"] == "sync_standby").filter(up).count();
                Some((replicas.count(), sync))
            });
            if counts.is_some_and(|(r, s)| r >= n && (n == 0 || s >= 1)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        bail!("{n} replicas did not come up within {within:?}\n{}", self.logs())
    }

    /// `patronictl switchover` from the current leader to `candidate`.
    pub fn switchover(&self, leader: &str, candidate: &str) -> Result<String> {
        let out = command(self.as_postgres, "patronictl")
            .args(["-c"])
            .arg(&self.members[0].config)
            .args(["switchover", "--leader", leader, "--candidate", candidate, "--force"])
            .output()?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() || text.contains("failed") {
            bail!("patronictl switchover failed: {text}");
        }
        Ok(text)
    }

    /// `kill -9` of member `i`'s Patroni and of its PostgreSQL (postmaster and children).
    pub fn kill_member(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        let data = self.dir.path().join(&m.name).join("data");
        if let Some(mut p) = m.process.take() {
            // Under runuser, the child is runuser: kill the Patroni process under it too.
            let _ = Command::new("pkill").args(["-9", "-f", &m.config.display().to_string()]).status();
            let _ = p.kill();
            let _ = p.wait();
        }
        if let Some(pid) = postmaster_pid(&data) {
            let _ = Command::new("pkill").args(["-9", "-P", &pid.to_string()]).status();
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        Ok(())
    }

    /// The tail of every log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "out" || x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                out.push_str(&format!("--- {}\n", p.display()));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }
}

fn postmaster_pid(data: &Path) -> Option<u32> {
    std::fs::read_to_string(data.join("postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
}

fn wait_for(within: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < within {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out waiting for {what}")
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            let _ = self.kill_member(i);
        }
        let _ = Command::new("pkill").args(["-9", "-f", &self.dir.path().display().to_string()]).status();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
    }
}
