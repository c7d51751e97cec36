//! A raw PostgreSQL protocol client for tests that need to choose the protocol path exactly: a statement as a
//! simple Query, as Parse/Bind/Execute of the unnamed statement, as a named prepared statement, or several in
//! one pipeline with one Sync. Trust authentication only (the test clusters use it).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// One message from the server, decoded as far as tests care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// CommandComplete with its tag.
    Done(String),
    Error {
        code: String,
        message: String,
    },
    /// A DataRow: text values as they are, other bytes (binary format) as `\\x` and hex.
    Row(Vec<Option<String>>),
    /// A RowDescription: each column's name, type OID, type modifier and format code.
    Columns(Vec<(String, u32, i32, i16)>),
    /// ReadyForQuery with its status.
    Ready(char),
    CopyIn,
    CopyOut,
    Notice(String),
    Param(String, String),
    Other(char),
}

/// How a statement is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// A Query message.
    Simple,
    /// Parse/Bind/Describe/Execute of the unnamed statement, then Sync.
    Unnamed,
    /// Parse of a named statement and Sync, then Bind/Execute of it and Sync.
    Named,
    /// Parse/Bind/Describe/Execute without Sync: statements in a row share one Sync.
    Pipelined,
}

pub const PATHS: [Path; 4] = [Path::Simple, Path::Unnamed, Path::Named, Path::Pipelined];

/// The messages of the notices among `replies` (`notice <message>`), in order: PostgreSQL's warnings are part
/// of its answer (no transaction in progress, one already, SET LOCAL outside a transaction).
pub fn notices(replies: &[Reply]) -> Vec<String> {
    replies
        .iter()
        .filter_map(|r| match r {
            Reply::Notice(m) => Some(format!("notice {m}")),
            _ => None,
        })
        .collect()
}

impl Path {
    /// The path its `Debug` form names (`Simple`, `Unnamed`, `Named`, `Pipelined`).
    pub fn named(name: &str) -> Option<Path> {
        PATHS.into_iter().find(|p| format!("{p:?}") == name)
    }
}

/// The fuzz tests' replay files (`SETTINGS_FUZZ_REPLAY`, `WRITES_FUZZ_REPLAY`): what a failing run wrote, one
/// step a line, its fields separated by tabs; replayed instead of random steps, and cut down to a few lines by
/// `scripts/fuzz-minimize.py`. `None` when `var` is not set.
pub fn replay_lines(var: &str) -> anyhow::Result<Option<Vec<String>>> {
    let Some(file) = std::env::var_os(var) else { return Ok(None) };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| anyhow::anyhow!("{var}={}: {e}", std::path::Path::new(&file).display()))?;
    Ok(Some(text.lines().filter(|l| !l.trim().is_empty()).map(String::from).collect()))
}

/// Writes the steps of a failing fuzz run where [`replay_lines`] reads them back; returns the file's path.
/// It prints the line `fuzz: first difference at line <n>` (from 1, the last line of the file) for
/// `scripts/fuzz-minimize.py`.
pub fn write_replay(name: &str, lines: &[String]) -> String {
    let file = std::env::temp_dir().join(name);
    let _ = std::fs::write(&file, lines.join("\n") + "\n");
    println!("fuzz: first difference at line {}", lines.len());
    file.display().to_string()
}

pub struct RawClient {
    sock: TcpStream,
    buf: Vec<u8>,
    next_name: usize,
    /// Statements sent in a pipeline and not yet synced.
    piped: usize,
    /// The ParameterStatus of the startup, in order.
    pub params: Vec<(String, String)>,
}

fn put(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
}

fn cstr(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(s.as_bytes());
    b.push(0);
}

/// A Bind message's parameters, all in text (`None`: NULL).
fn put_params(b: &mut Vec<u8>, params: &[Option<&str>]) {
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        match p {
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v.as_bytes());
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
}

impl RawClient {
    /// Connects to `port` as `user` to `database` with extra startup parameters.
    pub fn connect(port: u16, user: &str, database: &str, params: &[(&str, &str)]) -> Result<RawClient> {
        let sock = TcpStream::connect(("127.0.0.1", port)).context("connecting to the router")?;
        sock.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut c = RawClient { sock, buf: Vec::new(), next_name: 0, piped: 0, params: Vec::new() };
        let mut body = Vec::new();
        body.extend_from_slice(&196608i32.to_be_bytes());
        for (k, v) in [("user", user), ("database", database)].iter().chain(params.iter()) {
            cstr(&mut body, k);
            cstr(&mut body, v);
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        c.sock.write_all(&packet)?;
        loop {
            match c.read()? {
                (b'Z', _) => return Ok(c),
                (b'E', body) => bail!("startup refused: {:?}", fields(&body)),
                (b'S', body) => {
                    let mut parts = body.split(|b| *b == 0).map(|p| String::from_utf8_lossy(p).into_owned());
                    let (k, v) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
                    c.params.push((k, v));
                }
                _ => {}
            }
        }
    }

    fn read(&mut self) -> Result<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if self.buf.len() > len {
                    let msg: Vec<u8> = self.buf.drain(..len + 1).collect();
                    return Ok((msg[0], msg[5..].to_vec()));
                }
            }
            let mut chunk = [0u8; 65536];
            // (A read on a socket with a timeout is not restarted after a signal, SA_RESTART or not: the
            // harness's child processes' SIGCHLD can interrupt it. Interrupted is not an answer: read again.)
            let n = match self.sock.read(&mut chunk) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.context("reading from the router (no answer within 30 s?)")?,
            };
            if n == 0 {
                bail!("the router closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next message, decoded.
    pub fn reply(&mut self) -> Result<Reply> {
        let (tag, body) = self.read()?;
        Ok(match tag {
            b'C' => Reply::Done(String::from_utf8_lossy(&body[..body.len().saturating_sub(1)]).into_owned()),
            b'E' => {
                let f = fields(&body);
                Reply::Error { code: f.0, message: f.1 }
            }
            b'N' => Reply::Notice(fields(&body).1),
            b'D' => Reply::Row(data_row(&body)),
            b'T' => Reply::Columns(row_description(&body)),
            b'Z' => Reply::Ready(body.first().copied().unwrap_or(b'?') as char),
            b'G' => Reply::CopyIn,
            b'H' => Reply::CopyOut,
            b'S' => {
                let parts: Vec<&[u8]> = body.split(|b| *b == 0).collect();
                Reply::Param(
                    String::from_utf8_lossy(parts.first().copied().unwrap_or_default()).into_owned(),
                    String::from_utf8_lossy(parts.get(1).copied().unwrap_or_default()).into_owned(),
                )
            }
            other => Reply::Other(other as char),
        })
    }

    /// Replies up to and including the next ReadyForQuery.
    pub fn until_ready(&mut self) -> Result<Vec<Reply>> {
        let mut out = Vec::new();
        loop {
            let r = self.reply()?;
            let done = matches!(r, Reply::Ready(_));
            out.push(r);
            if done {
                return Ok(out);
            }
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.sock.write_all(bytes)?;
        Ok(())
    }

    /// A simple Query; its replies up to ReadyForQuery.
    pub fn query(&mut self, sql: &str) -> Result<Vec<Reply>> {
        let mut b = Vec::new();
        cstr(&mut b, sql);
        let mut out = Vec::new();
        put(&mut out, b'Q', &b);
        self.sock.write_all(&out)?;
        self.until_ready()
    }

    fn parse_bind_execute(&mut self, out: &mut Vec<u8>, name: &str, sql: &str, parse: bool, params: &[Option<&str>]) {
        if parse {
            let mut b = Vec::new();
            cstr(&mut b, name);
            cstr(&mut b, sql);
            b.extend_from_slice(&0i16.to_be_bytes());
            put(out, b'P', &b);
        }
        let mut b = Vec::new();
        cstr(&mut b, "");
        cstr(&mut b, name);
        // Parameters in text, results in text.
        put_params(&mut b, params);
        b.extend_from_slice(&0i16.to_be_bytes());
        put(out, b'B', &b);
        put(out, b'D', b"P\0");
        let mut b = Vec::new();
        cstr(&mut b, "");
        b.extend_from_slice(&0i32.to_be_bytes());
        put(out, b'E', &b);
    }

    /// Sends `sql` on `path`. For every path but `Pipelined` the replies up to ReadyForQuery are returned;
    /// a pipelined statement is only written (see [`RawClient::sync`]).
    pub fn send(&mut self, path: Path, sql: &str) -> Result<Vec<Reply>> {
        self.send_with(path, sql, &[])
    }

    /// [`RawClient::send`] with text parameters bound (`None`: NULL); the simple protocol takes none (write
    /// them into the text).
    pub fn send_with(&mut self, path: Path, sql: &str, params: &[Option<&str>]) -> Result<Vec<Reply>> {
        let mut out = Vec::new();
        match path {
            Path::Simple => {
                assert!(params.is_empty(), "a Query message has no parameters: write them into its text");
                return self.query(sql);
            }
            Path::Unnamed => {
                self.parse_bind_execute(&mut out, "", sql, true, params);
                put(&mut out, b'S', &[]);
            }
            Path::Named => {
                self.next_name += 1;
                let name = format!("stmt{}", self.next_name);
                let mut b = Vec::new();
                cstr(&mut b, &name);
                cstr(&mut b, sql);
                b.extend_from_slice(&0i16.to_be_bytes());
                put(&mut out, b'P', &b);
                put(&mut out, b'S', &[]);
                self.sock.write_all(&out)?;
                let prepared = self.until_ready()?;
                if prepared.iter().any(|r| matches!(r, Reply::Error { .. })) {
                    return Ok(prepared);
                }
                out.clear();
                self.parse_bind_execute(&mut out, &name, sql, false, params);
                put(&mut out, b'S', &[]);
            }
            Path::Pipelined => {
                self.parse_bind_execute(&mut out, "", sql, true, params);
                self.sock.write_all(&out)?;
                self.piped += 1;
                return Ok(Vec::new());
            }
        }
        self.sock.write_all(&out)?;
        self.until_ready()
    }

    /// Parse/Bind/Describe/Execute/Sync of the unnamed statement with text parameters (`None`: NULL) and
    /// results in binary format (`binary`) or text; the replies up to ReadyForQuery.
    pub fn extended(&mut self, sql: &str, params: &[Option<&str>], binary: bool) -> Result<Vec<Reply>> {
        let mut out = Vec::new();
        let mut b = Vec::new();
        cstr(&mut b, "");
        cstr(&mut b, sql);
        b.extend_from_slice(&0i16.to_be_bytes());
        put(&mut out, b'P', &b);
        let mut b = Vec::new();
        cstr(&mut b, "");
        cstr(&mut b, "");
        put_params(&mut b, params);
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&i16::from(binary).to_be_bytes());
        put(&mut out, b'B', &b);
        put(&mut out, b'D', b"P\0");
        let mut b = Vec::new();
        cstr(&mut b, "");
        b.extend_from_slice(&0i32.to_be_bytes());
        put(&mut out, b'E', &b);
        put(&mut out, b'S', &[]);
        self.sock.write_all(&out)?;
        self.until_ready()
    }

    /// The Sync of a pipeline: the replies of everything sent since, up to ReadyForQuery.
    pub fn sync(&mut self) -> Result<Vec<Reply>> {
        let mut out = Vec::new();
        put(&mut out, b'S', &[]);
        self.sock.write_all(&out)?;
        self.piped = 0;
        self.until_ready()
    }

    /// A Flush after pipelined statements: the server sends what it has answered so far, and the pipeline
    /// goes on (see [`RawClient::until_done`]).
    pub fn flush(&mut self) -> Result<()> {
        let mut out = Vec::new();
        put(&mut out, b'H', &[]);
        self.sock.write_all(&out)?;
        Ok(())
    }

    /// A Flush after `statements` pipelined statements: their replies, up to the last one's CommandComplete, or
    /// up to an error (after which the server skips the rest up to the Sync).
    pub fn flush_answers(&mut self, statements: usize) -> Result<Vec<Reply>> {
        self.flush()?;
        let (mut out, mut done) = (Vec::new(), 0);
        while done < statements {
            let r = self.reply()?;
            match &r {
                Reply::Done(_) => done += 1,
                Reply::Error { .. } => done = statements,
                _ => {}
            }
            out.push(r);
        }
        Ok(out)
    }

    /// Replies up to and including the CommandComplete tagged `tag`, or the first error.
    pub fn until_done(&mut self, tag: &str) -> Result<Vec<Reply>> {
        let mut out = Vec::new();
        loop {
            let r = self.reply()?;
            let done = matches!(&r, Reply::Done(t) if t == tag) || matches!(&r, Reply::Error { .. });
            out.push(r);
            if done {
                return Ok(out);
            }
        }
    }

    /// Whether pipelined statements wait for a Sync.
    pub fn piped(&self) -> bool {
        self.piped > 0
    }

    /// Sends CopyData with `data`, then CopyDone.
    pub fn copy_data(&mut self, data: &[u8]) -> Result<()> {
        let mut out = Vec::new();
        put(&mut out, b'd', data);
        put(&mut out, b'c', &[]);
        self.sock.write_all(&out)?;
        Ok(())
    }
}

/// The SQLSTATE and message of an ErrorResponse or NoticeResponse body.
fn fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    let mut rest = body;
    while let Some((&f, r)) = rest.split_first() {
        if f == 0 {
            break;
        }
        let end = r.iter().position(|b| *b == 0).unwrap_or(r.len());
        let v = String::from_utf8_lossy(&r[..end]).into_owned();
        match f {
            b'C' => code = v,
            b'M' => message = v,
            _ => {}
        }
        rest = r.get(end + 1..).unwrap_or_default();
    }
    (code, message)
}

fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let n = i16::from_be_bytes([body[0], body[1]]);
    let mut rest = &body[2..];
    let mut out = Vec::new();
    for _ in 0..n {
        let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        rest = &rest[4..];
        if len < 0 {
            out.push(None);
        } else {
            let v = &rest[..len as usize];
            out.push(Some(match std::str::from_utf8(v) {
                Ok(s) => s.to_string(),
                Err(_) => format!("\\x{}", v.iter().map(|b| format!("{b:02x}")).collect::<String>()),
            }));
            rest = &rest[len as usize..];
        }
    }
    out
}

fn row_description(body: &[u8]) -> Vec<(String, u32, i32, i16)> {
    let n = i16::from_be_bytes([body[0], body[1]]);
    let mut rest = &body[2..];
    let mut out = Vec::new();
    for _ in 0..n {
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        let name = String::from_utf8_lossy(&rest[..end]).into_owned();
        let f = &rest[end + 1..end + 19];
        let ty = u32::from_be_bytes([f[6], f[7], f[8], f[9]]);
        let typmod = i32::from_be_bytes([f[12], f[13], f[14], f[15]]);
        let format = i16::from_be_bytes([f[16], f[17]]);
        out.push((name, ty, typmod, format));
        rest = &rest[end + 19..];
    }
    out
}

/// The SQLSTATEs of the ErrorResponses among replies, in order.
pub fn error_codes(replies: &[Reply]) -> Vec<String> {
    replies
        .iter()
        .filter_map(|r| match r {
            Reply::Error { code, .. } => Some(code.clone()),
            _ => None,
        })
        .collect()
}

/// The CommandComplete tags and error codes of replies, in order (`!code` for an error), for comparisons.
pub fn outline(replies: &[Reply]) -> Vec<String> {
    replies
        .iter()
        .filter_map(|r| match r {
            Reply::Done(t) => Some(t.clone()),
            Reply::Error { code, .. } => Some(format!("!{code}")),
            Reply::Ready(s) => Some(format!("Z{s}")),
            Reply::Row(v) => {
                Some(format!("row {}", v.iter().map(|x| x.as_deref().unwrap_or("NULL")).collect::<Vec<_>>().join(",")))
            }
            _ => None,
        })
        .collect()
}
