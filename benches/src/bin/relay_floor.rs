//! The floor under the router's CPU per statement on its runtime: a proxy that only relays bytes, on the
//! same tokio runtime the router runs (one thread, a task per client, the client's own server connection for
//! its whole session, no parsing, no pool, no routing). What it costs per transaction is what tokio's tasks
//! and I/O cost any design built on them; the router's figure above it is the router's own work.
//!
//! `--io epoll` relays the same bytes on an event loop of its own instead (epoll through mio, as PgBouncer's
//! libevent): no tasks, no wakers, a loop that reads a socket when epoll says it is readable and writes what it
//! read to the other one. The difference between the two is what tokio costs above an I/O layer of one's own.
//!
//! ```text
//! relay_floor --listen 127.0.0.1:6433 --server 127.0.0.1:5432 [--threads N] [--io tokio|epoll]
//! ```
//!
//! `--threads`: as the router's `router-threads` — 0 (the default) one per two cores, 1 tokio's
//! single-threaded runtime, more a multi-threaded one with that many workers; with `--io epoll`, that many
//! event loops, each with its own listener on the address (SO_REUSEPORT), one of them on the main thread.
//!
//! Ends on SIGINT or SIGTERM (so that a profiler wrapping it writes its output; with `--io epoll` by their
//! default action, which a profiler survives too — but a script's background job ignores SIGINT: send it
//! SIGTERM). Used by
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
    let mut epoll = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs an address"));
        match a.as_str() {
            "--listen" => listen = Some(value()?.parse().context("--listen")?),
            "--server" => server = Some(value()?.parse().context("--server")?),
            "--threads" => threads = value()?.parse().context("--threads")?,
            "--io" => {
                epoll = match value()?.as_str() {
                    "tokio" => false,
                    "epoll" => true,
                    other => bail!("--io {other:?}: tokio or epoll"),
                }
            }
            "-h" | "--help" => {
                println!(
                    "relay_floor --listen ADDR --server ADDR [--threads N] [--io tokio|epoll]\n\nRelays every client \
                     connection to its own connection to the server, bytes as they come: the floor of a proxy's CPU \
                     per statement.\n\n  --threads N   as the router's router-threads (0, the default: one per two \
                     cores; 1: tokio's single-threaded runtime)\n  --io tokio    on tokio's tasks, as the router \
                     (the default)\n  --io epoll    on an event loop of its own over epoll (mio), N loops each \
                     with its own listener\n\nEnds on SIGINT or SIGTERM."
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
    if epoll {
        return event_loop::main(listen, server, threads);
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

/// `--io epoll`: the same relay on an event loop of its own (mio over epoll, edge-triggered): a socket is read
/// until it has nothing more when epoll reports it readable, and what is read is written to the other side at
/// once; what the other side cannot take yet waits in that side's buffer until epoll reports it writable.
mod event_loop {
    use std::io::{self, ErrorKind, Read, Write};
    use std::net::SocketAddr;

    use anyhow::Context;
    use mio::net::{TcpListener, TcpStream};
    use mio::{Events, Interest, Poll, Token};

    const LISTENER: Token = Token(usize::MAX);

    /// One end of a client's relay: its socket and the bytes read from the other end that it has not taken yet.
    struct End {
        stream: TcpStream,
        pending: Vec<u8>,
    }

    pub fn main(listen: SocketAddr, server: SocketAddr, threads: usize) -> anyhow::Result<()> {
        let mut listeners = (0..threads).map(|_| bind(listen)).collect::<io::Result<Vec<_>>>()?;
        let own = listeners.pop().context("no thread")?;
        // One loop on the main thread: a single loop starts no other thread (a second thread in the process
        // makes glibc wrap every recv and send in cancellation bookkeeping).
        std::thread::scope(|s| {
            let others: Vec<_> = listeners.into_iter().map(|l| s.spawn(move || run(l, server))).collect();
            let mut result = run(own, server);
            for t in others {
                let r = t.join().unwrap_or_else(|_| Err(anyhow::anyhow!("an event loop panicked")));
                result = result.and(r);
            }
            result
        })
    }

    fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        Ok(TcpListener::from_std(socket.into()))
    }

    /// One event loop, until SIGTERM (or SIGINT, where not ignored) ends the process by its default action: a
    /// profiler wrapping it still writes its output, and there is nothing to flush. A client is the pair of
    /// ends at `pairs[i]`: tokens `2i` (the client's socket) and `2i + 1` (its server connection).
    fn run(mut listener: TcpListener, server: SocketAddr) -> anyhow::Result<()> {
        let mut poll = Poll::new()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut events = Events::with_capacity(256);
        let mut pairs: Vec<Option<[End; 2]>> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match poll.poll(&mut events, None) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                r => r?,
            }
            for ev in events.iter() {
                if ev.token() == LISTENER {
                    accept(&mut listener, server, &poll, &mut pairs, &mut free);
                    continue;
                }
                let (i, side) = (ev.token().0 / 2, ev.token().0 % 2);
                let Some(pair) = pairs.get_mut(i).and_then(Option::as_mut) else { continue };
                let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                match pump(pair, side, readable, ev.is_writable(), &mut buf) {
                    Ok(true) => {}
                    done => {
                        if let Err(e) = done {
                            eprintln!("relay_floor: {e}");
                        }
                        for end in pair.iter_mut() {
                            let _ = poll.registry().deregister(&mut end.stream);
                        }
                        pairs[i] = None;
                        free.push(i);
                    }
                }
            }
        }
    }

    /// Every client waiting at the listener, each with its own server connection (connected before the
    /// client is read: a floor, not a proxy that must not block).
    fn accept(
        listener: &mut TcpListener,
        server: SocketAddr,
        poll: &Poll,
        pairs: &mut Vec<Option<[End; 2]>>,
        free: &mut Vec<usize>,
    ) {
        loop {
            let client = match listener.accept() {
                Ok((client, _)) => client,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return eprintln!("relay_floor: accept: {e}"),
            };
            let upstream = std::net::TcpStream::connect(server).and_then(|s| {
                s.set_nodelay(true)?;
                s.set_nonblocking(true)?;
                Ok(TcpStream::from_std(s))
            });
            let upstream = match upstream.and_then(|u| client.set_nodelay(true).map(|()| u)) {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("relay_floor: {server}: {e}");
                    continue;
                }
            };
            let i = free.pop().unwrap_or_else(|| {
                pairs.push(None);
                pairs.len() - 1
            });
            let mut pair = [End { stream: client, pending: Vec::new() }, End { stream: upstream, pending: Vec::new() }];
            let registered = pair.iter_mut().enumerate().try_for_each(|(side, end)| {
                poll.registry().register(&mut end.stream, Token(2 * i + side), Interest::READABLE | Interest::WRITABLE)
            });
            match registered {
                Ok(()) => pairs[i] = Some(pair),
                Err(e) => {
                    eprintln!("relay_floor: register: {e}");
                    free.push(i);
                }
            }
        }
    }

    /// An event on end `side` of a pair: what waits for it is written if it is writable, what it has is read
    /// and passed to the other end if it is readable. False when it closed.
    fn pump(pair: &mut [End; 2], side: usize, readable: bool, writable: bool, buf: &mut [u8]) -> io::Result<bool> {
        let [a, b] = pair;
        let (from, to) = if side == 0 { (a, b) } else { (b, a) };
        if writable && !from.pending.is_empty() {
            let pending = std::mem::take(&mut from.pending);
            send(from, &pending)?;
        }
        if !readable {
            return Ok(true);
        }
        loop {
            match from.stream.read(buf) {
                Ok(0) => return Ok(false),
                Ok(n) => send(to, &buf[..n])?,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes `data` to `end`, or what it cannot take now to its pending bytes (behind any already there).
    fn send(end: &mut End, mut data: &[u8]) -> io::Result<()> {
        if !end.pending.is_empty() {
            end.pending.extend_from_slice(data);
            return Ok(());
        }
        while !data.is_empty() {
            match end.stream.write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    end.pending.extend_from_slice(data);
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
