//! Benchmarks of shard-router: see the README in this folder. What the benchmark programs share: the
//! release router started beside them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A child process, killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the release `shard-router` (beside the running program) with `config` written in `dir`, on a free
/// port; returns it once it accepts connections.
pub fn start_router(dir: &Path, config: &str) -> Result<(Proc, u16)> {
    let port = localpg::free_port();
    let path = dir.join("config.csv");
    std::fs::write(&path, config)?;
    let exe: PathBuf = std::env::current_exe()?.with_file_name("shard-router");
    let child = Command::new(&exe)
        .args(["serve", "--config"])
        .arg(&path)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("{} (build it: cargo build --release -p router)", exe.display()))?;
    let p = Proc(child);
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the router did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((p, port))
}
