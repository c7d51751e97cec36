//! The floor under the router's CPU per statement on its runtime: a proxy that only relays bytes, on the
//! same tokio runtime the router runs (one thread, a task per client, the client's own server connection for
//! its whole session, no parsing, no pool, no routing). What it costs per transaction is what tokio's tasks
//! and I/O cost any design built on them; the router's figure above it is the router's own work.
//!
//! ```text
//! relay_floor --listen 127.0.0.1:6433 --server 127.0.0.1:5432 [--threads N]
//! ```
//!
//! `--threads`: as the router's `router-threads` — 0 (the default) one per two cores, 1 tokio's
//! single-threaded runtime, more a multi-threaded one with that many workers.
//!
//! Ends on SIGINT or SIGTERM (so that a profiler wrapping it writes its output). Used by
//! `benches/callgrind.sh FLOOR=1` and in docs/performance.md ("The floor under tokio").

use std::net::SocketAddr;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};

fn main() -> anyhow::Result<()> {
    let mut listen: Option<SocketAddr> = None;
    let mut server: Option<SocketAddr> = None;
    let mut threads = 0usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs an address"));
        match a.as_str() {
            "--listen" => listen = Some(value()?.parse().context("--listen")?),
            "--server" => server = Some(value()?.parse().context("--server")?),
            "--threads" => threads = value()?.parse().context("--threads")?,
            "-h" | "--help" => {
                println!(
                    "relay_floor --listen ADDR --server ADDR [--threads N]\n\nRelays every client connection to its \
                     own connection to the server, bytes as they come, on tokio: the floor of a tokio proxy's CPU \
                     per statement. --threads as the router's router-threads (0, the default: one per two cores; \
                     1: the single-threaded runtime). Ends on SIGINT or SIGTERM."
                );
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    let (Some(listen), Some(server)) = (listen, server) else { bail!("--listen and --server are needed") };
    if threads == 0 {
        threads = std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1));
    }
    let rt = match threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build()?,
    };
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).await.with_context(|| format!("listen on {listen}"))?;
        let (mut int, mut term) = (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (client, _) = accepted?;
                    tokio::spawn(Box::pin(async move {
                        if let Err(e) = relay(client, server).await {
                            eprintln!("relay_floor: {e}");
                        }
                    }));
                }
                _ = int.recv() => break,
                _ = term.recv() => break,
            }
        }
        anyhow::Ok(())
    })
}

/// Bytes from the client to the server and back, as each side sends them, until either closes.
async fn relay(mut client: TcpStream, server: SocketAddr) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut upstream = TcpStream::connect(server).await?;
    upstream.set_nodelay(true)?;
    let (mut up, mut down) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
    loop {
        tokio::select! {
            biased;
            n = client.read(&mut up) => match n? {
                0 => return Ok(()),
                n => upstream.write_all(&up[..n]).await?,
            },
            n = upstream.read(&mut down) => match n? {
                0 => return Ok(()),
                n => client.write_all(&down[..n]).await?,
            },
        }
    }
}
