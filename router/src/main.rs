//! `shard-router`: the command line. Thin: argument parsing, then a call into the library.
#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use router::explain;

/// A PostgreSQL sharding proxy: point a connection string at it and each statement goes to its shard.
#[derive(Parser)]
#[command(name = "shard-router", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print where a statement would go, as JSON, as the running routers would place it.
    ///
    /// The shard map is the live one: when config.csv has a catalog (hash-buckets, range and tenant
    /// strategies, or shard-catalog), bucket owners, range splits and tenant placements are read from it, so
    /// that after `rebalance move` explain names the new owner ("source":"catalog"); --offline reads
    /// config.csv alone ("source":"config"), as does a catalog that cannot be reached (with a warning).
    ///
    /// Example: shard-router explain --config config.csv "SELECT * FROM users WHERE user_id = 12345"
    /// prints {"strategy":"hash","key":"user_id","values":["12345"],"shards":["1"],...}.
    /// Exit status: 0 routed, 1 refused (the JSON says why), 2 bad config or arguments.
    Explain {
        /// The config.csv to read.
        #[arg(long, short)]
        config: PathBuf,
        /// A Bind parameter value ($1, $2, ... in order), in text format; "NULL" for NULL.
        #[arg(long = "param", short = 'p', value_name = "VALUE")]
        params: Vec<String>,
        /// The tenant of the session (as if the client had run SET gb.tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// The database the client connected to (tenant strategy: <prefix><tenant>).
        #[arg(long)]
        database: Option<String>,
        /// The session's shard key (as if the client had run SET gb.shard_key).
        #[arg(long)]
        shard_key: Option<String>,
        /// Use config.csv alone: do not read the catalog (no connection is made).
        #[arg(long)]
        offline: bool,
        /// The SQL statement (or several, separated by ';').
        sql: String,
    },
    /// Serve clients: listen on router-listen, route each statement, relay it to its shard.
    ///
    /// Example: shard-router serve --config config.csv, then psql "host=127.0.0.1 port=6432 user=bot dbname=botserver".
    Serve {
        /// The config.csv to read.
        #[arg(long, short)]
        config: PathBuf,
        /// Listen here instead of router-listen (e.g. 127.0.0.1:0 for any free port; the address is printed).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Try it on this machine: start four local PostgreSQL shards in a temporary directory, a hash-sharded
    /// config and the router; print how to connect. Ctrl-C stops the shards and removes their data.
    ///
    /// Needs PostgreSQL's server binaries (initdb, pg_ctl, postgres) on PATH or in /usr/lib/postgresql/*/bin;
    /// started as root, the shards run as the postgres user.
    Demo {
        /// How many shards.
        #[arg(long, default_value_t = 4)]
        shards: usize,
        /// Where the router listens.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: String,
        /// Where the demo writes its config.csv (for `shard-router explain` and `rebalance`); removed when
        /// the demo stops.
        #[arg(long, default_value = "shard-router-demo.csv")]
        config_file: PathBuf,
    },
    /// Read a config.csv, report its errors, or print the settings it gives as JSON.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn demo(shards: usize, listen: &str, config_file: &std::path::Path) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if !(1..=64).contains(&shards) {
        anyhow::bail!("--shards must be between 1 and 64");
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        router::demo::run(shards, listen, config_file, async {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn serve(path: &std::path::Path, listen: Option<String>) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let config = shardmap::Config::load(path)?;
    let addr = listen.unwrap_or_else(|| config.router.listen.clone());
    // router-threads: worker threads of one work-stealing runtime (1: a single event loop). By default (0)
    // one per two cores: the router shares the machine with its clients and often its servers, and more
    // workers than that measured slower (16 cores: 79k TPS with 16 workers against 116k with 8 at 64 clients;
    // 2 cores: one thread spends 1-4 us less CPU per statement than two workers; docs/performance.md,
    // "How many threads"). SHARD_ROUTER_RUNTIME=event-loops runs as many single-threaded runtimes instead,
    // each with a listener of its own on the same address (SO_REUSEPORT), so that a client and its server
    // connections stay on one thread: on 2 cores it measured no cheaper, and its p99 was higher
    // (docs/performance.md, "Event loops or work stealing"); it stays for the many-core measurement.
    let threads = match config.router.threads {
        0 => router::server::default_threads(),
        n => n as usize,
    };
    let event_loops = std::env::var("SHARD_ROUTER_RUNTIME").is_ok_and(|v| v == "event-loops");
    // One thread is a single-threaded runtime (the default on 2 cores): about 9% fewer instructions per
    // statement than one worker of the multi-thread runtime, and up to 25% more throughput end to end. Under
    // thousands of clients connecting and leaving, glibc's malloc fragmented its heap (the soak test: RSS
    // 56 -> 102 MiB over six rounds, still growing); with mimalloc (below) the same soak reads 47 -> 32 MiB
    // (docs/performance.md, "mimalloc, and the single-threaded runtime back as the default").
    let rt = if event_loops || threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?
    };
    let loops = if event_loops { threads } else { 1 };
    let grace = std::time::Duration::from_secs(config.router.limits.shutdown_timeout_s);
    rt.block_on(async move {
        tokio::spawn(give_back_freed_memory());
        let listener = listen_reusable(&addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let local = listener.local_addr()?;
        // The other event loops' listeners, on the port the first got (it may have been 0).
        let mut others = Vec::with_capacity(loops - 1);
        for _ in 1..loops {
            let l = listen_reusable(&local.to_string())
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {local}: {e}"))?;
            others.push(l.into_std()?);
        }
        println!("shard-router listening on {local}");
        tracing::info!("listening on {local}");
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
        // SIGTERM: stop accepting, let transactions finish (router-shutdown-timeout-s); SIGINT: the same, with
        // at most a second for them. A second signal while draining stops at once.
        let stop = async move {
            tokio::select! {
                _ = term.recv() => router::server::Stop::Drain(grace),
                _ = int.recv() => router::server::Stop::Drain(grace.min(std::time::Duration::from_secs(1))),
            }
        };
        let again = || async {
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        router::server::run_homes(listener, others, config, stop, again).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// A listening socket with SO_REUSEPORT: a new router can listen on the same port while this one drains
/// (zero-downtime upgrade; see the README).
async fn listen_reusable(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        match socket.bind(a) {
            Ok(()) => return socket.listen(1024),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("{addr} names no address"))))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Explain { config, params, tenant, database, shard_key, offline, sql } => {
            let params = params.into_iter().map(|p| (p != "NULL").then_some(p)).collect();
            explain::run(&config, explain::Question { params, tenant, database, shard_key, offline }, &sql)
        }
        Command::Check { config } => explain::check(&config),
        Command::Serve { config, listen } => serve(&config, listen),
        Command::Demo { shards, listen, config_file } => demo(shards, &listen, &config_file),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shard-router: {e:#}");
            ExitCode::from(2)
        }
    }
}

// mimalloc rather than glibc's malloc: connections' buffers and tasks come and go by the thousand, and glibc's
// heap kept what they had fragmented (RSS growing round after round under the soak test); mimalloc gives it
// back, and spends 1-2% fewer instructions per statement (callgrind; docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Gives memory the router freed back to the system, once a second, for as long as the runtime runs.
/// mimalloc returns free pages only a second after they were freed (`purge_delay`), and only when the
/// program allocates or frees again past that: a router that goes quiet after a burst (a thousand clients
/// gone at once) kept what they had used — 44 MiB rather than 18 after 1000 clients, until traffic came back
/// — or not, depending on what ran after the second (the soak test's RSS after a round: 35 or 56 MiB, by
/// chance). With this, it goes back 1-2 s after the clients (docs/performance.md, "Memory back after a
/// burst"). A task of the runtime, not a thread of its own: a second thread would make glibc take the
/// multi-threaded path of every `recv` and `send` (cancellation points: ~250 more instructions per
/// transaction on the single-threaded runtime).
async fn give_back_freed_memory() {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        // (Not forced: pages whose delay has passed are returned; those freed within the second wait for the
        // next turn. Cheap when there are none: a clock read and a comparison.)
        #[allow(unsafe_code)]
        // SAFETY: `mi_collect` takes no pointer and may be called from any thread at any time.
        unsafe {
            libmimalloc_sys::mi_collect(false)
        };
    }
}
