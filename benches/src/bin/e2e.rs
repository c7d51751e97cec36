//! The end-to-end benchmark: pgbench against a direct connection, PgBouncer (Debian's, transaction pooling)
//! and shard-router (1 shard, and 4 hash shards with `pgbench_accounts` sharded by `aid`), in alternation
//! (A B C D A B C D ...) so that drift shows, on servers it starts itself. Prints one table and keeps the raw
//! pgbench output under `benches/results/<date>/`.
//!
//! Run: `bash benches/run.sh [--seconds 30] [--rounds 3] [--clients 16,64] [--quick]`

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use localpg::{free_port, PgServer};

struct Args {
    seconds: u64,
    rounds: usize,
    clients: Vec<u32>,
    workloads: Vec<String>,
    idle: usize,
    scale: u32,
    shard_pool: Option<u32>,
    out: PathBuf,
    /// `--targets`: only these (default: all).
    targets: Option<Vec<String>>,
    /// `--event-loops`: also the router with one shard as an event loop per core
    /// (`SHARD_ROUTER_RUNTIME=event-loops`), beside the default work-stealing runtime, side by side.
    event_loops: bool,
    /// `--threads N`: also the router with one shard at `router-threads,N` (router-1t), beside the default.
    threads: Option<u32>,
    /// `--baseline BIN`: also the router with one shard run from another build (router-1b), beside this
    /// one: a change measured before and after in one alternating run.
    baseline: Option<PathBuf>,
    /// `--floor`: also `relay_floor` (bytes relayed on the router's runtime, nothing parsed, a server
    /// connection per client) in front of the one server: the floor under a proxy on tokio (floor); and the
    /// same on an event loop of its own over epoll (floor-epoll, `relay_floor --io epoll`).
    floor: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        seconds: 30,
        rounds: 3,
        clients: vec![16, 64],
        workloads: vec!["simple".into(), "extended".into(), "prepared".into(), "tpcb".into()],
        idle: 10_000,
        scale: 10,
        shard_pool: None,
        out: PathBuf::from(format!("benches/results/{}", today())),
        targets: None,
        event_loops: false,
        threads: None,
        baseline: None,
        floor: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--seconds" => a.seconds = v()?.parse()?,
            "--rounds" => a.rounds = v()?.parse()?,
            "--clients" => a.clients = v()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--workloads" => a.workloads = v()?.split(',').map(str::to_string).collect(),
            "--idle" => a.idle = v()?.parse()?,
            "--scale" => a.scale = v()?.parse()?,
            "--shard-pool" => a.shard_pool = Some(v()?.parse()?),
            "--out" => a.out = PathBuf::from(v()?),
            "--targets" => a.targets = Some(v()?.split(',').map(str::to_string).collect()),
            "--event-loops" => a.event_loops = true,
            "--threads" => a.threads = Some(v()?.parse()?),
            "--baseline" => a.baseline = Some(PathBuf::from(v()?)),
            "--floor" => a.floor = true,
            "--quick" => {
                a.seconds = 5;
                a.rounds = 2;
                a.clients = vec![16];
                a.idle = 1000;
                a.scale = 2;
            }
            "--help" | "-h" => {
                println!(
                    "e2e: pgbench against direct, PgBouncer and shard-router, in alternation.\n\
                     --seconds N (30) --rounds N (3) --clients 16,64 --workloads simple,extended,prepared,tpcb\n\
                     (with the simple workload, a run at 512 clients is always added)\n\
                     --idle N (10000 idle clients for the RSS run; 0 skips it) --scale N (10) --out DIR --quick\n\
                     --shard-pool N (pool-size per shard of the 4-shard router; default 5, so that its 4 pools\n\
                     hold as many server connections as PgBouncer's one pool of 20)\n\
                     --targets direct,pgbouncer,router-1,router-4,direct-4 (default: all)\n\
                     --event-loops (also router-1el: one shard, an event loop per core)\n\
                     --threads N (also router-1t: one shard, router-threads N, beside the default)\n\
                     --baseline BIN (also router-1b: one shard, the router binary BIN — another build —, beside\n\
                     this one, for a before/after comparison in one run; with --threads N also router-1bt:\n\
                     that build at router-threads N)\n\
                     --floor (also floor: relay_floor, bytes relayed on tokio with nothing parsed, a server\n\
                     connection per client, at the router's default thread count; and floor-epoll: the same\n\
                     on an event loop of its own over epoll, relay_floor --io epoll)"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other} (see --help)"),
        }
    }
    // (`--targets floor` or `floor-epoll` starts the floors too; `--floor` with `--targets` adds both.)
    if let (true, Some(t)) = (a.floor, &mut a.targets) {
        t.extend(["floor".to_string(), "floor-epoll".to_string()]);
    }
    a.floor |= a.targets.as_ref().is_some_and(|t| t.iter().any(|n| n.starts_with("floor")));
    Ok(a)
}

fn today() -> String {
    let out = Command::new("date").arg("+%F").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    out.unwrap_or_else(|_| "today".into())
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{cmd:?} failed:\n{text}");
    }
    Ok(text)
}

fn psql(conn: &str, sql: &str) -> Result<String> {
    run(Command::new("psql").args([conn, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]))
}

/// CPU seconds (user + system, and user alone) and peak RSS (KiB) of a process, from /proc.
fn cpu_and_rss(pid: u32) -> ((f64, f64), u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = 100.0; // sysconf(_SC_CLK_TCK) on Linux
    let user = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = user + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    ((cpu / ticks, user / ticks), hwm)
}

fn rss_now(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A background process stopped on drop.
/// A child process, killed when dropped; with a pidfile, the process it names too (PgBouncer started through
/// runuser is runuser's child, which killing runuser would leave behind).
struct Proc(Child, Option<PathBuf>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(pid) = self.1.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on {port}")
}

fn start_pgbouncer(dir: &Path, server: &PgServer, pool: u32) -> Result<(Proc, u16)> {
    let port = free_port();
    std::fs::create_dir_all(dir)?;
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\npostgres = host=127.0.0.1 port={} dbname=postgres user=postgres\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\n\
             pool_mode = transaction\ndefault_pool_size = {pool}\nmax_client_conn = 20000\nmax_db_connections = {pool}\n\
             logfile = {}\npidfile = {}\n",
            server.port,
            dir.join("users.txt").display(),
            dir.join("pgbouncer.log").display(),
            dir.join("pgbouncer.pid").display()
        ),
    )?;
    std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n")?;
    let root = Command::new("id").arg("-u").output()?.stdout.starts_with(b"0\n");
    let child = if root {
        run(Command::new("chown").args(["-R", "postgres:", &dir.display().to_string()]))?;
        Command::new("runuser")
            .args(["-u", "postgres", "--", "pgbouncer"])
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?
    } else {
        Command::new("pgbouncer").arg(&ini).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?
    };
    let p = Proc(child, Some(dir.join("pgbouncer.pid")));
    wait_port(port)?;
    Ok((p, port))
}

/// Starts `cmd` (output dropped) and waits until something listens on `port`; `build` says how to build the
/// program when it is missing.
fn start_listening(cmd: &mut Command, port: u16, build: &str) -> Result<(Proc, u16)> {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("{} (build it: {build})", cmd.get_program().to_string_lossy()))?;
    let p = Proc(child, None);
    wait_port(port)?;
    Ok((p, port))
}

/// `relay_floor` (built beside this binary) in front of `server`, on tokio or (`io` "epoll") its own event loop.
fn start_floor(server: &PgServer, io: &str) -> Result<(Proc, u16)> {
    let port = free_port();
    let mut cmd = Command::new(std::env::current_exe()?.with_file_name("relay_floor"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--server", &format!("127.0.0.1:{}", server.port)]);
    cmd.args(["--io", io]);
    start_listening(&mut cmd, port, "cargo build --release -p benches --bins")
}

fn start_router(dir: &Path, config: &str, env: &[(&str, &str)]) -> Result<(Proc, u16)> {
    start_router_from(&std::env::current_exe()?.with_file_name("shard-router"), dir, config, env)
}

fn start_router_from(exe: &Path, dir: &Path, config: &str, env: &[(&str, &str)]) -> Result<(Proc, u16)> {
    let port = free_port();
    std::fs::create_dir_all(dir)?;
    let path = dir.join("config.csv");
    std::fs::write(&path, config)?;
    let mut cmd = Command::new(exe);
    cmd.args(["serve", "--config"])
        .arg(&path)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied());
    start_listening(&mut cmd, port, "cargo build --release -p router")
}

/// One target: a name, a connection string, and the process whose CPU it costs (none for direct).
struct Target {
    name: &'static str,
    conns: Vec<String>,
    pid: Option<u32>,
}

#[derive(Default, Clone)]
struct Figures {
    tps: Vec<f64>,
    lat_ms: Vec<f64>,
    p99_ms: Vec<f64>,
    cpu_per_10k: Vec<f64>,
    user_per_10k: Vec<f64>,
    failed: u64,
}

/// The median of the finite figures (a failed run gives NaN and is left out; its count shows as failed).
fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One pgbench run's figures: output, TPS, average and p99 latency (ms), transactions, failures.
type Run = (String, f64, f64, f64, u64, u64);

/// Runs pgbench against a target. A target with several connection strings (direct-4: each shard on its own)
/// gets one pgbench per string at the same time, the clients split between them, and the figures combined.
fn pgbench(target: &Target, workload: &str, clients: u32, seconds: u64, log_dir: &Path) -> Result<Run> {
    let n = target.conns.len() as u32;
    let mut children = Vec::new();
    for (i, conn) in target.conns.iter().enumerate() {
        let dir = log_dir.join(i.to_string());
        std::fs::create_dir_all(&dir)?;
        let mut cmd = Command::new("pgbench");
        let (c, j) = if n == 1 { (clients, 2) } else { ((clients / n).max(1), 1) };
        cmd.args(["-n", "-T", &seconds.to_string(), "-c", &c.to_string(), "-j", &j.to_string(), "-r"]);
        match workload {
            "tpcb" => cmd.args(["-M", "extended"]),
            mode => cmd.args(["-S", "-M", mode]),
        };
        cmd.current_dir(&dir).args(["--log", "--sampling-rate", "0.1", "--log-prefix", "lat"]).arg(conn);
        children.push((cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?, dir));
    }
    let mut runs = Vec::new();
    let mut lats: Vec<f64> = Vec::new();
    for (child, dir) in children {
        let out = child.wait_with_output()?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        runs.push(parse(text, out.status.success()));
        // The sampled per-transaction log: the third column is the latency in microseconds.
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            if e.file_name().to_string_lossy().starts_with("lat") {
                for line in std::fs::read_to_string(e.path())?.lines() {
                    if let Some(v) = line.split_whitespace().nth(2).and_then(|v| v.parse::<f64>().ok()) {
                        lats.push(v / 1000.0);
                    }
                }
                std::fs::remove_file(e.path())?;
            }
        }
    }
    lats.sort_by(f64::total_cmp);
    let p99 = lats.get(lats.len().saturating_sub(1) * 99 / 100).copied().unwrap_or(f64::NAN);
    let text = runs.iter().map(|r| r.0.as_str()).collect::<Vec<_>>().join("\n----\n");
    let tps = runs.iter().map(|r| r.1).sum();
    let processed: u64 = runs.iter().map(|r| r.4).sum();
    let lat = runs.iter().map(|r| r.2 * r.4 as f64).sum::<f64>() / processed.max(1) as f64;
    let failed = runs.iter().map(|r| r.5).fold(0u64, u64::saturating_add);
    Ok((text, tps, lat, p99, processed, failed))
}

/// The figures of one pgbench output (p99 is filled in from the log by the caller).
fn parse(text: String, success: bool) -> Run {
    let num = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| l.split(['=', ':']).nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let tps = num("tps");
    let lat = num("latency average");
    let processed = text
        .lines()
        .find(|l| l.starts_with("number of transactions actually processed"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().split('/').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0u64);
    let failed = text
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(if success { 0 } else { u64::MAX });
    // An aborted run (a client got an error) counts as failed even when pgbench reports 0 failures.
    let failed = if text.contains("Run was aborted") || processed == 0 { failed.max(1) } else { failed };
    (text, tps, lat, f64::NAN, processed, failed)
}

fn main() -> Result<()> {
    let a = args()?;
    std::fs::create_dir_all(&a.out)?;
    let raw = a.out.join("raw");
    std::fs::create_dir_all(&raw)?;
    let work = tempfile::Builder::new().prefix("shard-router-e2e-").tempdir()?;
    let pool = 20;
    eprintln!("starting PostgreSQL (1 + 4 servers) ...");
    let settings = ["max_connections=700", "shared_buffers=256MB"];
    let one = PgServer::start_with(&settings)?;
    let four = (0..4).map(|_| PgServer::start_with(&settings)).collect::<Result<Vec<_>>>()?;
    eprintln!("loading pgbench data (scale {}) ...", a.scale);
    run(Command::new("pgbench").args(["-i", "-q", "-s", &a.scale.to_string()]).arg(one.conn_str("postgres")))?;
    for (i, s) in four.iter().enumerate() {
        run(Command::new("pgbench").args(["-i", "-q", "-s", &a.scale.to_string()]).arg(s.conn_str("postgres")))?;
        psql(&s.conn_str("postgres"), &format!("DELETE FROM pgbench_accounts WHERE aid % 4 <> {i}"))?;
        psql(&s.conn_str("postgres"), "VACUUM ANALYZE pgbench_accounts")?;
    }
    let (bouncer, bouncer_port) = start_pgbouncer(&work.path().join("pgbouncer"), &one, pool)?;
    let common = format!(
        "shard-strategy,hash\nshard-key,aid\nrouter-auth,trust\npool-size,{pool}\npool-timeout-ms,20000\n\
         shard-global-tables,pgbench_branches,pgbench_tellers,pgbench_history\nrouter-max-clients,{}\n",
        a.idle + 1000
    );
    let one_cfg = format!("{common}shard-count,1\nshard-node-0,{}\n", one.url("postgres"));
    let (r1, r1_port) = start_router(&work.path().join("r1"), &one_cfg, &[])?;
    let r1t = match a.threads {
        Some(n) => Some(start_router(&work.path().join("r1t"), &format!("{one_cfg}router-threads,{n}\n"), &[])?),
        None => None,
    };
    let r1b = match &a.baseline {
        Some(exe) => Some(start_router_from(exe, &work.path().join("r1b"), &one_cfg, &[])?),
        None => None,
    };
    // Both --baseline and --threads: the baseline at router-threads N too (router-1bt), to compare the two
    // builds with several threads.
    let r1bt = match (&a.baseline, a.threads) {
        (Some(exe), Some(n)) => {
            Some(start_router_from(exe, &work.path().join("r1bt"), &format!("{one_cfg}router-threads,{n}\n"), &[])?)
        }
        _ => None,
    };
    let el = if a.event_loops {
        Some(start_router(&work.path().join("r1el"), &one_cfg, &[("SHARD_ROUTER_RUNTIME", "event-loops")])?)
    } else {
        None
    };
    let shard_pool = a.shard_pool.unwrap_or(pool / 4);
    let mut four_cfg =
        format!("{common}shard-count,4\n").replace(&format!("pool-size,{pool}"), &format!("pool-size,{shard_pool}"));
    for (i, s) in four.iter().enumerate() {
        writeln!(four_cfg, "shard-node-{i},{}", s.url("postgres"))?;
    }
    let (r4, r4_port) = start_router(&work.path().join("r4"), &four_cfg, &[])?;
    let floor = if a.floor { Some(start_floor(&one, "tokio")?) } else { None };
    let floor_epoll = if a.floor { Some(start_floor(&one, "epoll")?) } else { None };
    let conn = |port: u16| format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let mut targets = vec![
        Target { name: "direct", conns: vec![one.conn_str("postgres")], pid: None },
        Target { name: "pgbouncer", conns: vec![conn(bouncer_port)], pid: Some(bouncer.0.id()) },
        Target { name: "router-1", conns: vec![conn(r1_port)], pid: Some(r1.0.id()) },
        Target { name: "router-4", conns: vec![conn(r4_port)], pid: Some(r4.0.id()) },
        // The 4-shard baseline: each shard's server directly, a quarter of the clients each, all at once.
        Target { name: "direct-4", conns: four.iter().map(|s| s.conn_str("postgres")).collect(), pid: None },
    ];
    if let Some((p, port)) = &el {
        targets.insert(3, Target { name: "router-1el", conns: vec![conn(*port)], pid: Some(p.0.id()) });
    }
    if let Some((p, port)) = &r1t {
        targets.insert(3, Target { name: "router-1t", conns: vec![conn(*port)], pid: Some(p.0.id()) });
    }
    if let Some((p, port)) = &r1bt {
        targets.insert(3, Target { name: "router-1bt", conns: vec![conn(*port)], pid: Some(p.0.id()) });
    }
    if let Some((p, port)) = &r1b {
        targets.insert(3, Target { name: "router-1b", conns: vec![conn(*port)], pid: Some(p.0.id()) });
    }
    if let Some((p, port)) = &floor_epoll {
        targets.insert(2, Target { name: "floor-epoll", conns: vec![conn(*port)], pid: Some(p.0.id()) });
    }
    if let Some((p, port)) = &floor {
        targets.insert(2, Target { name: "floor", conns: vec![conn(*port)], pid: Some(p.0.id()) });
    }
    if let Some(only) = &a.targets {
        targets.retain(|t| {
            only.iter().any(|o| o == t.name)
                || (t.name == "router-1el" && a.event_loops)
                || (t.name == "router-1t" && a.threads.is_some())
                || (t.name == "router-1b" && a.baseline.is_some())
                || (t.name == "router-1bt" && a.baseline.is_some() && a.threads.is_some())
        });
    }
    // PgBouncer's pid is runuser's when started as root: its pidfile names the process itself.
    let bouncer_pid =
        bouncer.1.as_ref().and_then(|f| std::fs::read_to_string(f).ok()).and_then(|p| p.trim().parse().ok());
    let pid_of = |t: &Target| if t.name == "pgbouncer" { bouncer_pid.or(t.pid) } else { t.pid };

    let mut results: BTreeMap<(String, u32, &'static str), Figures> = BTreeMap::new();
    let mut cases: Vec<(String, u32)> = Vec::new();
    for w in &a.workloads {
        for c in &a.clients {
            cases.push((w.clone(), *c));
        }
    }
    if a.clients.iter().all(|c| *c != 512) && a.workloads.iter().any(|w| w == "simple") {
        cases.push(("simple".into(), 512));
    }
    let total = cases.len() * a.rounds * targets.len();
    let mut done = 0;
    for (workload, clients) in &cases {
        for round in 0..a.rounds {
            for t in &targets {
                // The sharded router runs select-only workloads; PgBouncer 1.18 has no prepared statements in
                // transaction mode.
                if (t.name.ends_with("-4") && workload == "tpcb") || (t.name == "pgbouncer" && workload == "prepared") {
                    continue;
                }
                done += 1;
                eprintln!("[{done}/{total}] {workload} c={clients} round {} {}", round + 1, t.name);
                let before = pid_of(t).map(cpu_and_rss);
                let (text, tps, lat, p99, processed, failed) =
                    pgbench(t, workload, *clients, a.seconds, &work.path().join("log"))?;
                let after = pid_of(t).map(cpu_and_rss);
                std::fs::write(raw.join(format!("{workload}-c{clients}-{}-r{}.txt", t.name, round + 1)), &text)?;
                let f = results.entry((workload.clone(), *clients, t.name)).or_default();
                f.tps.push(tps);
                f.lat_ms.push(lat);
                f.p99_ms.push(p99);
                f.failed = f.failed.saturating_add(failed);
                if let (Some(((c0, u0), _)), Some(((c1, u1), _))) = (before, after) {
                    if processed > 0 {
                        f.cpu_per_10k.push((c1 - c0) / processed as f64 * 10_000.0);
                        f.user_per_10k.push((u1 - u0) / processed as f64 * 10_000.0);
                    }
                }
            }
        }
    }
    let peak = |p: Option<u32>| p.map(|p| cpu_and_rss(p).1).unwrap_or(0);
    let mut table = String::new();
    writeln!(
        table,
        "pgbench, {} s rounds x {}, alternating targets, pool {pool} (router-4: {shard_pool} per shard), scale {}, -j 2; medians",
        a.seconds, a.rounds, a.scale
    )?;
    writeln!(table)?;
    writeln!(
        table,
        "| workload | clients | target | TPS | vs PgBouncer | vs direct (-4: direct-4) | avg ms | p99 ms | CPU s / 10k tx (user) | failed |"
    )?;
    writeln!(table, "|---|---|---|---|---|---|---|---|---|---|")?;
    for (workload, clients) in &cases {
        let get = |name: &'static str| results.get(&(workload.clone(), *clients, name));
        let base = get("pgbouncer").map(|f| median(&f.tps));
        let direct = get("direct").map(|f| median(&f.tps));
        let direct4 = get("direct-4").map(|f| median(&f.tps));
        for t in &targets {
            let Some(f) = get(t.name) else { continue };
            let tps = median(&f.tps);
            let ratio = |b: Option<f64>| {
                b.filter(|b| b.is_finite() && *b > 0.0).map_or("–".to_string(), |b| format!("{:.2}×", tps / b))
            };
            let cpu = if f.cpu_per_10k.is_empty() {
                "–".to_string()
            } else {
                format!("{:.3} ({:.3})", median(&f.cpu_per_10k), median(&f.user_per_10k))
            };
            writeln!(
                table,
                "| {workload} | {clients} | {} | {:.0} | {} | {} | {:.2} | {:.2} | {cpu} | {} |",
                t.name,
                tps,
                ratio(base),
                ratio(if t.name.ends_with("-4") { direct4 } else { direct }),
                median(&f.lat_ms),
                median(&f.p99_ms),
                f.failed
            )?;
        }
    }
    writeln!(table)?;
    let pid = |name: &str| targets.iter().find(|t| t.name == name).and_then(|t| t.pid);
    writeln!(
        table,
        "peak RSS: router-1 {} KiB, router-4 {} KiB, pgbouncer {} KiB",
        peak(pid("router-1")),
        peak(pid("router-4")),
        peak(bouncer_pid)
    )?;
    if let (true, Some(r1)) = (a.idle > 0, targets.iter().find(|t| t.name == "router-1")) {
        writeln!(table, "{}", idle_run(r1, a.idle)?)?;
    }
    println!("{table}");
    std::fs::write(a.out.join("table.md"), &table)?;
    eprintln!("raw results in {}", a.out.display());
    drop((r1, r4, bouncer));
    Ok(())
}

/// Holds `n` idle client connections through the router and reports its RSS per client.
fn idle_run(t: &Target, n: usize) -> Result<String> {
    let pid = t.pid.context("router pid")?;
    let port: u16 = t.conns[0]
        .split("port=")
        .nth(1)
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .context("port")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let before = rss_now(pid);
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            let (client, conn) = tokio_postgres::connect(
                &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
                tokio_postgres::NoTls,
            )
            .await?;
            held.push((client, tokio::spawn(conn)));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_now(pid);
        let per = (after.saturating_sub(before)) as f64 / n as f64;
        drop(held);
        Ok::<String, anyhow::Error>(format!(
            "idle clients: {n} held through router-1; RSS {before} KiB -> {after} KiB, {per:.1} KiB per client"
        ))
    })
}
