//! The admin console, as PgBouncer's: a client that connects to the virtual database `shard_admin` as a user
//! listed in `router-admin-users` (after the same authentication as any client) talks to the router itself,
//! in the simple protocol:
//!
//! - `SHOW SHARDS`: each shard's primary, generation, failovers, circuit, queries and errors;
//! - `SHOW POOLS`: each pool's server, database, user, active, idle and waiting connections;
//! - `SHOW CLIENTS`: each client connection: user, database, address, age;
//! - `SHOW STATS`: per shard: queries, errors, average latency;
//! - `PAUSE [shard]` / `RESUME [shard]`: new transactions for the shard (all shards without a name) wait;
//!   transactions already running finish; PAUSE returns once the shard's server connections are all back;
//! - `RELOAD`: re-reads config.csv without dropping clients (see `control::reload` for what takes effect);
//! - `SHOW HELP`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use shardmap::ShardId;

use crate::net::proto;
use crate::net::wire::{Framed, Stream};
use crate::server::Router;

/// The virtual database of the admin console.
pub const ADMIN_DB: &str = "shard_admin";

/// A result set: column names and rows of text.
struct Table {
    columns: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

fn write_table(buf: &mut BytesMut, t: &Table) {
    proto::put(buf, b'T', |b| {
        b.put_i16(t.columns.len() as i16);
        for c in &t.columns {
            proto::cstr(b, c);
            b.put_i32(0); // table oid
            b.put_i16(0); // column number
            b.put_i32(25); // text
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(0); // text format
        }
    });
    for r in &t.rows {
        proto::put(buf, b'D', |b| {
            b.put_i16(r.len() as i16);
            for v in r {
                b.put_i32(v.len() as i32);
                b.put_slice(v.as_bytes());
            }
        });
    }
    proto::command_complete(buf, &format!("SHOW {}", t.rows.len()));
}

/// Serves an admin session after authentication: the startup's end, then commands until the client leaves.
pub async fn serve<S: Stream>(
    shared: Arc<Router>,
    mut io: Framed<S>,
    user: &str,
    key: (i32, i32),
) -> anyhow::Result<()> {
    if !shared.routing.config.load().router.admin_users.iter().any(|u| u == user) {
        proto::error(
            &mut io.wbuf,
            "FATAL",
            "28000",
            &format!("user \"{user}\" may not use the admin console: list it in router-admin-users"),
        );
        io.flush().await.ok();
        return Ok(());
    }
    for (k, v) in [
        ("server_version", "15.0 (shard-router admin)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        proto::parameter_status(&mut io.wbuf, k, v);
    }
    crate::frontend::startup::backend_key(&mut io.wbuf, key.0, key.1);
    proto::ready(&mut io.wbuf, proto::READY_IDLE);
    io.flush().await?;
    // A shutdown ends the admin session too (between commands), as it ends clients outside a transaction.
    let mut draining = shared.registry.draining.subscribe();
    loop {
        let msg = tokio::select! {
            m = io.read() => m?,
            _ = async { drop(draining.wait_for(|d| *d).await) } => {
                let e = crate::frontend::shutting_down();
                proto::error(&mut io.wbuf, "FATAL", &e.code, &e.message);
                io.flush().await.ok();
                return Ok(());
            }
        };
        let Some(msg) = msg else { return Ok(()) };
        match msg.tag {
            b'Q' => {
                let text = proto::read_cstr(msg.body()).map(|(t, _)| t.to_string()).unwrap_or_default();
                match command(&shared, &text).await {
                    Ok(Reply::Table(t)) => write_table(&mut io.wbuf, &t),
                    Ok(Reply::Done(tag, notice)) => {
                        if let Some(n) = notice {
                            proto::put(&mut io.wbuf, b'N', |b| {
                                b.put_u8(b'S');
                                proto::cstr(b, "NOTICE");
                                b.put_u8(b'C');
                                proto::cstr(b, "00000");
                                b.put_u8(b'M');
                                proto::cstr(b, &n);
                                b.put_u8(0);
                            });
                        }
                        proto::command_complete(&mut io.wbuf, &tag);
                    }
                    Err((code, message)) => proto::error(&mut io.wbuf, "ERROR", code, &message),
                }
                proto::ready(&mut io.wbuf, proto::READY_IDLE);
                io.flush().await?;
            }
            b'X' => return Ok(()),
            b'S' => {
                proto::error(&mut io.wbuf, "ERROR", "0A000", "the admin console speaks the simple query protocol only");
                proto::ready(&mut io.wbuf, proto::READY_IDLE);
                io.flush().await?;
            }
            _ => {}
        }
    }
}

enum Reply {
    Table(Table),
    /// A command tag, and a notice to send before it.
    Done(String, Option<String>),
}

type Failure = (&'static str, String);

async fn command(shared: &Arc<Router>, text: &str) -> Result<Reply, Failure> {
    let words: Vec<String> =
        text.trim().trim_end_matches(';').split_whitespace().map(|w| w.to_ascii_uppercase()).collect();
    let arg = text.trim().trim_end_matches(';').split_whitespace().nth(1).map(|s| s.trim_matches('"').to_string());
    match words.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["SHOW", "SHARDS"] => Ok(Reply::Table(shards(shared))),
        ["SHOW", "POOLS"] => Ok(Reply::Table(pools(shared))),
        ["SHOW", "CLIENTS"] => Ok(Reply::Table(clients(shared))),
        ["SHOW", "STATS"] => Ok(Reply::Table(stats(shared))),
        ["SHOW", "HELP"] | ["HELP"] => Ok(Reply::Table(Table {
            columns: vec!["command", "what it does"],
            rows: [
                ("SHOW SHARDS", "each shard's primary, generation, failovers, circuit, queries, errors"),
                ("SHOW POOLS", "each pool's server, database, user and active, idle, waiting connections"),
                ("SHOW CLIENTS", "each client connection: user, database, address, seconds connected"),
                ("SHOW STATS", "per shard: queries, errors, average latency"),
                (
                    "PAUSE [shard]",
                    "new transactions wait (every shard without a name); returns when the shard's connections are back",
                ),
                ("RESUME [shard]", "ends a PAUSE"),
                ("RELOAD", "re-reads config.csv without dropping clients; keys that need a restart are named"),
            ]
            .iter()
            .map(|(c, w)| vec![c.to_string(), w.to_string()])
            .collect(),
        })),
        ["PAUSE"] | ["PAUSE", _] => pause(shared, arg.as_deref(), true).await,
        ["RESUME"] | ["RESUME", _] => pause(shared, arg.as_deref(), false).await,
        ["RELOAD"] => reload(shared),
        _ => Err(("42601", format!("unknown admin command {:?}; try SHOW HELP", text.trim()))),
    }
}

fn shards(shared: &Router) -> Table {
    let t = &shared.backends.topology;
    let rows = shared
        .routing
        .map
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let s = ShardId(i as u16);
            let (queries, errors, _) = shared.backends.stats.shard(i);
            vec![
                n.name.clone(),
                t.current(s).map_or("(none)".to_string(), |(h, p)| format!("{h}:{p}")),
                t.generation(s).to_string(),
                t.failovers(s).to_string(),
                if t.is_paused(s) { "paused".into() } else { "running".into() },
                shared.backends.breaker.state(i).to_string(),
                queries.to_string(),
                errors.to_string(),
                shared.routing.config.load().node_patroni.get(&n.name).map(|u| u.join(",")).unwrap_or_default(),
            ]
        })
        .collect();
    Table {
        columns: vec![
            "shard",
            "primary",
            "generation",
            "failovers",
            "state",
            "circuit",
            "queries",
            "errors",
            "patroni",
        ],
        rows,
    }
}

fn pools(shared: &Router) -> Table {
    let mut stats = shared.backends.pools.stats();
    stats.sort_by(|a, b| (a.shard.0, &a.host, a.port, &a.database).cmp(&(b.shard.0, &b.host, b.port, &b.database)));
    let rows = stats
        .into_iter()
        .map(|p| {
            vec![
                shared.routing.map.node(p.shard).name.clone(),
                format!("{}:{}", p.host, p.port),
                p.database,
                p.user,
                p.active.to_string(),
                p.idle.to_string(),
                p.waiting.to_string(),
            ]
        })
        .collect();
    Table { columns: vec!["shard", "server", "database", "user", "active", "idle", "waiting"], rows }
}

fn clients(shared: &Router) -> Table {
    let mut list = shared.registry.clients.lock().expect("clients lock").values().cloned().collect::<Vec<_>>();
    list.sort_by_key(|c| c.since);
    let rows =
        list.into_iter().map(|c| vec![c.user, c.database, c.addr, c.since.elapsed().as_secs().to_string()]).collect();
    Table { columns: vec!["user", "database", "address", "connected_s"], rows }
}

fn stats(shared: &Router) -> Table {
    let rows = shared
        .routing
        .map
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (queries, errors, sum) = shared.backends.stats.shard(i);
            let avg = if queries == 0 { 0.0 } else { sum.as_secs_f64() * 1e6 / queries as f64 };
            vec![n.name.clone(), queries.to_string(), errors.to_string(), format!("{avg:.0}")]
        })
        .collect();
    Table { columns: vec!["shard", "queries", "errors", "avg_us"], rows }
}

async fn pause(shared: &Arc<Router>, shard: Option<&str>, on: bool) -> Result<Reply, Failure> {
    let targets: Vec<ShardId> = match shard {
        None => shared.routing.map.all().collect(),
        Some(name) => match shared.routing.map.nodes.iter().position(|n| n.name == name) {
            Some(i) => vec![ShardId(i as u16)],
            None => return Err(("42704", format!("no shard named {name:?} (SHOW SHARDS lists them)"))),
        },
    };
    for s in &targets {
        shared.backends.topology.set_paused(*s, on);
    }
    if !on {
        return Ok(Reply::Done("RESUME".into(), None));
    }
    // PAUSE returns once the shards' connections are all back (running transactions finished), or after a
    // minute with a notice of what still runs.
    let t = Instant::now();
    loop {
        let active: usize =
            shared.backends.pools.stats().iter().filter(|p| targets.contains(&p.shard)).map(|p| p.active).sum();
        if active == 0 {
            return Ok(Reply::Done("PAUSE".into(), None));
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Ok(Reply::Done(
                "PAUSE".into(),
                Some(format!("{active} server connections are still in use after 60 s; new transactions wait")),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn reload(shared: &Arc<Router>) -> Result<Reply, Failure> {
    let restart = crate::control::reload::reload_file(shared)
        .map_err(|e| ("F0000", format!("RELOAD failed, the running config is kept: {e}")))?;
    let notice =
        (!restart.is_empty()).then(|| format!("changed but not applied until a restart: {}", restart.join(", ")));
    Ok(Reply::Done("RELOAD".into(), notice))
}
