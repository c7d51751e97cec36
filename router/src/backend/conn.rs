//! A raw connection to a PostgreSQL server: startup and authentication (SCRAM-SHA-256, md5, cleartext or
//! trust, with the credentials of the node's URL), then protocol messages relayed as bytes.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::net::TcpStream;

use crate::net::proto;
use crate::net::wire::{Framed, Msg, WireError};

/// Where and as whom to connect.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    /// The node URL's `sslmode` and `sslrootcert`.
    pub tls: super::tls::Tls,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to {addr}: {why}")]
    Connect { addr: String, why: String },
    #[error("{addr}: {message} (SQLSTATE {code})")]
    Server { addr: String, code: String, message: String },
    #[error("{addr}: {0}", addr = .1)]
    Wire(WireError, String),
    #[error("{addr}: the server asked for {what}, which the router does not support")]
    Unsupported { addr: String, what: String },
}

impl BackendError {
    /// The SQLSTATE a client sees: the server's own, 08001/08006 for connection failures, or 40003
    /// (statement_completion_unknown) when the server went away after committing locally.
    pub fn sqlstate(&self) -> &str {
        match self {
            BackendError::Server { code, .. } => code,
            BackendError::Connect { .. } | BackendError::Unsupported { .. } => "08001",
            BackendError::Wire(WireError::CommitUnconfirmed, _) => "40003",
            BackendError::Wire(..) => "08006",
        }
    }
}

/// One server connection.
pub struct ServerConn {
    pub io: Framed<super::tls::ServerStream>,
    pub addr: String,
    pub pid: i32,
    pub secret: i32,
    /// ParameterStatus values reported at startup.
    pub params: Vec<(String, String)>,
    /// Statements prepared on this connection, by the router's server-side name.
    /// (foldhash: looked up on every Parse and Bind; SipHash was a visible share of a prepared statement's cost.)
    pub prepared: foldhash::HashSet<String>,
    /// Statements whose Parse was written here and whose ParseComplete has not come back yet (a pipeline).
    pub parsing: foldhash::HashSet<String>,
    /// Hash of the session settings last replayed here (0: server defaults).
    pub settings: u64,
    pub since: Instant,
    /// Reaper rounds seen idle in its pool's list (see `Pools::reap`).
    pub idle_rounds: u32,
    /// Status of the last ReadyForQuery: b'I' idle, b'T' in a transaction, b'E' failed transaction.
    pub status: u8,
    /// How to cancel this connection's query (made once, shared with the client that holds it).
    pub cancel_key: std::sync::Arc<crate::backend::cancel::CancelKey>,
    /// PostgreSQL warned that a shutdown cut a commit's wait for the synchronous standby (see
    /// [`WireError::CommitUnconfirmed`]).
    pub shutdown_warning: bool,
}

impl ServerConn {
    pub async fn connect(t: &Target, timeout: Duration) -> Result<ServerConn, BackendError> {
        let addr = format!("{}:{}", t.host, t.port);
        match tokio::time::timeout(timeout, Self::connect_inner(t, &addr)).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Connect { addr, why: format!("no answer within {} ms", timeout.as_millis()) }),
        }
    }

    async fn connect_inner(t: &Target, addr: &str) -> Result<ServerConn, BackendError> {
        let sock = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| BackendError::Connect { addr: addr.to_string(), why: e.to_string() })?;
        sock.set_nodelay(true).ok();
        let sock = super::tls::negotiate(sock, &t.host, &t.tls)
            .await
            .map_err(|why| BackendError::Connect { addr: addr.to_string(), why })?;
        let mut io = Framed::new(sock);
        let wire = |e: WireError| BackendError::Wire(e, addr.to_string());
        let mut buf = BytesMut::new();
        frontend::startup_message(
            [
                ("user", t.user.as_str()),
                ("database", t.database.as_str()),
                ("client_encoding", "UTF8"),
                ("application_name", "shard-router"),
            ],
            &mut buf,
        )
        .map_err(|e| wire(e.into()))?;
        io.push(&buf);
        io.flush().await.map_err(|e| wire(e.into()))?;
        let mut scram: Option<ScramSha256> = None;
        let mut conn = ServerConn {
            io,
            addr: addr.to_string(),
            pid: 0,
            secret: 0,
            params: Vec::new(),
            prepared: Default::default(),
            parsing: Default::default(),
            settings: 0,
            since: Instant::now(),
            idle_rounds: 0,
            status: proto::READY_IDLE,
            cancel_key: Default::default(),
            shutdown_warning: false,
        };
        let password = || -> Result<&str, BackendError> {
            t.password.as_deref().ok_or_else(|| BackendError::Server {
                addr: addr.to_string(),
                code: "28P01".into(),
                message: format!("the server wants a password for {}, and the node's URL has none", t.user),
            })
        };
        loop {
            let msg = conn.io.read().await.map_err(wire)?.ok_or_else(|| wire(WireError::Truncated))?;
            let body = msg.body();
            match msg.tag {
                b'R' => {
                    let (code, rest) = proto::read_i32(body).ok_or_else(|| wire(WireError::Truncated))?;
                    let mut out = BytesMut::new();
                    match code {
                        0 => continue,
                        3 => {
                            frontend::password_message(password()?.as_bytes(), &mut out).map_err(|e| wire(e.into()))?
                        }
                        5 => {
                            let salt: [u8; 4] = rest
                                .get(..4)
                                .and_then(|s| s.try_into().ok())
                                .ok_or_else(|| wire(WireError::Truncated))?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                t.user.as_bytes(),
                                password()?.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut out).map_err(|e| wire(e.into()))?;
                        }
                        10 => {
                            let mechanisms: Vec<&str> =
                                rest.split(|&b| b == 0).filter_map(|m| std::str::from_utf8(m).ok()).collect();
                            if !mechanisms.contains(&"SCRAM-SHA-256") {
                                return Err(BackendError::Unsupported {
                                    addr: addr.to_string(),
                                    what: format!("SASL {mechanisms:?}"),
                                });
                            }
                            let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                            frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                                .map_err(|e| wire(e.into()))?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| wire(WireError::Truncated))?;
                            s.update(rest).map_err(|e| BackendError::Server {
                                addr: addr.to_string(),
                                code: "28000".into(),
                                message: e.to_string(),
                            })?;
                            frontend::sasl_response(s.message(), &mut out).map_err(|e| wire(e.into()))?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| wire(WireError::Truncated))?;
                            s.finish(rest).map_err(|e| BackendError::Server {
                                addr: addr.to_string(),
                                code: "28000".into(),
                                message: e.to_string(),
                            })?;
                            continue;
                        }
                        other => {
                            return Err(BackendError::Unsupported {
                                addr: addr.to_string(),
                                what: format!("authentication method {other}"),
                            })
                        }
                    }
                    conn.io.push(&out);
                    conn.io.flush().await.map_err(|e| wire(e.into()))?;
                }
                b'S' => {
                    if let Some((k, rest)) = proto::read_cstr(body) {
                        if let Some((v, _)) = proto::read_cstr(rest) {
                            conn.params.push((k.to_string(), v.to_string()));
                        }
                    }
                }
                b'K' => {
                    if let Some((pid, rest)) = proto::read_i32(body) {
                        conn.pid = pid;
                        conn.secret = proto::read_i32(rest).map_or(0, |(s, _)| s);
                    }
                }
                b'Z' => {
                    conn.cancel_key = std::sync::Arc::new(crate::backend::cancel::CancelKey {
                        host: t.host.clone(),
                        port: t.port,
                        pid: conn.pid,
                        secret: conn.secret,
                    });
                    return Ok(conn);
                }
                b'E' => {
                    let (code, message) = proto::error_fields(body);
                    return Err(BackendError::Server { addr: addr.to_string(), code, message });
                }
                _ => {} // NoticeResponse, NegotiateProtocolVersion: nothing to do
            }
        }
    }

    /// The server's next message (what [`ServerConn::peek`] looks at, split off).
    pub async fn read(&mut self) -> Result<Msg, BackendError> {
        let len = self.peek().await?;
        Ok(self.io.take(len))
    }

    /// The server's next message, left at the front of the read buffer (see
    /// [`crate::net::wire::Framed::peek`]): its length is returned; `self.io.head(len)` is the message and
    /// `self.io.consume(len)` takes it. A notice that the server is shutting down and a ParameterStatus are
    /// noted on the way.
    pub async fn peek(&mut self) -> Result<usize, BackendError> {
        if let Some(len) = self.peek_buffered(0) {
            return Ok(len);
        }
        match self.io.peek().await {
            Ok(Some(len)) => {
                self.note(0, len);
                Ok(len)
            }
            Ok(None) => {
                let e = if self.shutdown_warning { WireError::CommitUnconfirmed } else { WireError::Closed };
                Err(BackendError::Wire(e, self.addr.clone()))
            }
            Err(e) => Err(BackendError::Wire(e, self.addr.clone())),
        }
    }

    /// [`ServerConn::peek`] without waiting, for a message already read (most of a statement's answer comes
    /// in one read): no future is made and polled for it. `at`: where the message starts in what was read
    /// and not taken (see [`crate::net::wire::Framed::peek_buffered`]); `self.io.bytes_at(at, len)` is the
    /// message. `None`: take what is before `at`, then call [`ServerConn::peek`].
    #[inline]
    pub fn peek_buffered(&mut self, at: usize) -> Option<usize> {
        let len = self.io.peek_buffered(at)?;
        self.note(at, len);
        Some(len)
    }

    /// What the connection learns from the message `at` bytes into the read buffer (`len` bytes): a
    /// shutdown's warning, a parameter's new value.
    #[inline]
    fn note(&mut self, at: usize, len: usize) {
        if matches!(self.io.bytes_at(at, 1)[0], b'N' | b'S') {
            self.note_rare(at, len);
        }
    }

    #[inline(never)]
    fn note_rare(&mut self, at: usize, len: usize) {
        let frame = self.io.bytes_at(at, len);
        if frame[0] == b'N' && proto::is_commit_cut(&frame[5..]) {
            self.shutdown_warning = true;
        } else if frame[0] == b'S' {
            note_param(&mut self.params, &frame[5..]);
        }
    }

    /// Sends one frame (after anything queued).
    pub async fn send(&mut self, frame: &[u8]) -> Result<(), BackendError> {
        self.io.send(frame).await.map_err(|e| BackendError::Wire(e.into(), self.addr.clone()))
    }

    pub async fn flush(&mut self) -> Result<(), BackendError> {
        self.io.flush().await.map_err(|e| BackendError::Wire(e.into(), self.addr.clone()))
    }

    /// [`ServerConn::flush`] without a future, for what the socket takes now (see
    /// [`crate::net::wire::Framed::flush_now`]): `Ok(false)`: call `flush` for the rest.
    #[inline]
    pub fn flush_now(&mut self) -> Result<bool, BackendError> {
        self.io.flush_now().map_err(|e| BackendError::Wire(e.into(), self.addr.clone()))
    }

    /// Runs a simple query whose results nobody sees (settings replay); the first error is returned.
    pub async fn run_quiet(&mut self, sql: &str) -> Result<(), BackendError> {
        proto::query(&mut self.io.wbuf, sql);
        self.flush().await?;
        self.drain_to_ready().await
    }

    /// A ParameterStatus body the server sent: `params` keeps the values in force on this connection.
    pub fn reported(&mut self, body: &[u8]) {
        note_param(&mut self.params, body);
    }

    /// Relays this connection's answer to `dst` up to ReadyForQuery (see [`Framed::relay_to_ready`]), keeping
    /// `params` up to date.
    pub async fn relay_to_ready<D: crate::net::wire::Stream>(
        &mut self,
        dst: &mut Framed<D>,
        status: &(dyn Fn(u8, bool) -> u8 + Sync),
    ) -> Result<(u8, bool), crate::net::wire::RelayError> {
        let mut reported = Vec::new();
        let r = self.io.relay_to_ready(dst, status, &mut reported).await;
        for m in reported {
            self.reported(&m[5..]);
        }
        r
    }

    /// Runs a simple query and returns its first row's values as text (NULL as `None`); the first error is
    /// returned.
    pub async fn query_row(&mut self, sql: &str) -> Result<Vec<Option<String>>, BackendError> {
        proto::query(&mut self.io.wbuf, sql);
        self.flush().await?;
        self.answer_row().await
    }

    /// Reads the answer to a simple query sent before, up to ReadyForQuery: its first row's values as text
    /// (none when it has no rows), or its first error.
    pub async fn answer_row(&mut self) -> Result<Vec<Option<String>>, BackendError> {
        let mut row = None;
        let mut err = None;
        loop {
            let m = self.read().await?;
            match m.tag {
                b'D' if row.is_none() => row = Some(proto::data_row(m.body())),
                b'E' if err.is_none() => {
                    let (code, message) = proto::error_fields(m.body());
                    err = Some(BackendError::Server { addr: self.addr.clone(), code, message });
                }
                b'Z' => {
                    self.status = m.body().first().copied().unwrap_or(proto::READY_IDLE);
                    return match err {
                        Some(e) => Err(e),
                        None => Ok(row.unwrap_or_default()),
                    };
                }
                _ => {}
            }
        }
    }

    /// Reads and drops messages up to ReadyForQuery; the first ErrorResponse is returned.
    pub async fn drain_to_ready(&mut self) -> Result<(), BackendError> {
        self.drain_to_ready_relaying(None).await
    }

    /// Like [`ServerConn::drain_to_ready`], copying ParameterStatus and NoticeResponse messages to `relay`
    /// when given.
    pub async fn drain_to_ready_relaying(
        &mut self,
        mut relay: Option<&mut bytes::BytesMut>,
    ) -> Result<(), BackendError> {
        let mut err = None;
        loop {
            let m = self.read().await?;
            if let (b'S' | b'N', Some(out)) = (m.tag, relay.as_deref_mut()) {
                out.extend_from_slice(&m.frame);
            }
            match m.tag {
                b'E' if err.is_none() => {
                    let (code, message) = proto::error_fields(m.body());
                    err = Some(BackendError::Server { addr: self.addr.clone(), code, message });
                }
                b'Z' => {
                    self.status = m.body().first().copied().unwrap_or(proto::READY_IDLE);
                    return err.map_or(Ok(()), Err);
                }
                _ => {}
            }
        }
    }
}

impl From<BackendError> for crate::net::Reported {
    fn from(e: BackendError) -> Self {
        match e {
            // The server's own words, as a client of that server would read them (the router's log has
            // which server it was).
            BackendError::Server { addr, code, message } => {
                tracing::debug!(server = %addr, code = %code, "{message}");
                crate::net::Reported { code, message }
            }
            e => crate::net::Reported { code: e.sqlstate().to_string(), message: e.to_string() },
        }
    }
}

impl ServerConn {
    /// After a statement was sent: `Ok(Some(error))` when the server's first answer says it did not run
    /// (`topology::not_run`: shutting down, read-only, connection failure), `Ok(None)` when it is running,
    /// `Err(())` when no answer came. Nothing is consumed: the answer is relayed as usual afterwards.
    pub async fn refused(&mut self) -> Result<Option<crate::net::Reported>, ()> {
        match self.io.front().await {
            Ok(Some((b'E', body))) => {
                let (code, message) = proto::error_fields(body);
                Ok(super::topology::not_run(&code).then(|| crate::net::Reported::new(&code, message)))
            }
            Ok(Some(_)) => Ok(None),
            _ => Err(()),
        }
    }
}

/// Keeps in `params` the value a ParameterStatus body reports.
fn note_param(params: &mut Vec<(String, String)>, body: &[u8]) {
    let Some((k, rest)) = proto::read_cstr(body) else { return };
    let Some((v, _)) = proto::read_cstr(rest) else { return };
    match params.iter_mut().find(|(n, _)| n == k) {
        Some(p) => p.1 = v.to_string(),
        None => params.push((k.to_string(), v.to_string())),
    }
}
