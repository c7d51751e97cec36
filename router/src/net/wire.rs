//! Framing on the hot path: a protocol message is a tag byte, a big-endian length that counts itself, and a
//! body. Frames are split off one reused read buffer as `Bytes` (a reference-counted view: no copy, no
//! allocation per message), and outgoing frames are gathered in one write buffer so that a whole response
//! goes out in one `write` call. pgwire's codec decodes each message into an owned struct, which would cost an
//! allocation and a copy per relayed row; it serves the startup phase instead (see `startup.rs`).

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A client's or a server's stream as the router uses it: tokio's reads and writes, and a write tried at once,
/// without a future, where the stream can (plain TCP).
pub trait Stream: AsyncRead + AsyncWrite + Unpin {
    /// Writes what the socket takes of `buf` now (`TcpStream::try_write`: a readiness check and the
    /// `sendto`); `None` where only `poll_write` can tell (TLS: its records are written through it).
    fn try_write_now(&mut self, _buf: &[u8]) -> Option<io::Result<usize>> {
        None
    }
}

impl Stream for tokio::net::TcpStream {
    fn try_write_now(&mut self, buf: &[u8]) -> Option<io::Result<usize>> {
        Some(self.try_write(buf))
    }
}

impl Stream for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {}

/// In-memory pipes (the robustness tests feed the startup phase through them).
impl Stream for tokio::io::DuplexStream {}

/// Writes what `sock` takes of `buf` now, without a future: how many bytes it took (0: none, or the stream
/// cannot tell without polling). A request or a response fits the socket's buffer nearly always, and the
/// future and the polls of `write_all` cost about 250 instructions a write.
#[inline]
fn written_now<S: Stream>(sock: &mut S, buf: &[u8]) -> io::Result<usize> {
    match sock.try_write_now(buf) {
        Some(Ok(n)) => Ok(n),
        Some(Err(e)) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
        _ => Ok(0),
    }
}

/// The largest message accepted from a client or a server (PostgreSQL's own limit for most messages is 1 GB;
/// a proxy keeps it smaller so that one client cannot make it hold that much).
pub const MAX_MESSAGE: usize = 256 << 20;

/// Flush the write buffer once it holds this much, even before the end of a response.
pub const FLUSH_AT: usize = 64 << 10;

/// A message: its tag and its whole frame (tag, length and body).
#[derive(Clone, Debug)]
pub struct Msg {
    pub tag: u8,
    pub frame: Bytes,
}

impl Msg {
    pub fn body(&self) -> &[u8] {
        &self.frame[5..]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("message {tag:?} of {len} bytes is larger than the limit of {limit} bytes{}", if *.client { " (router-max-message-bytes)" } else { "" })]
    TooLarge { tag: char, len: usize, limit: usize, client: bool },
    #[error("malformed message {tag:?}: length {len}")]
    BadLength { tag: char, len: i64 },
    #[error("the connection closed in the middle of a message")]
    Truncated,
    /// End of stream after a statement was sent and before its answer was complete.
    #[error("the server closed the connection before it finished answering: the statement may or may not have run")]
    Closed,
    /// End of stream after PostgreSQL's 57P01 warning that a shutdown stopped its wait for a synchronous
    /// standby to confirm a commit (`proto::is_commit_cut`): the transaction committed on that server.
    #[error(
        "the server shut down after committing the statement locally, before a synchronous standby confirmed it: the statement may or may not be on the new primary"
    )]
    CommitUnconfirmed,
}

/// What failed while relaying from one stream to another.
#[derive(Debug)]
pub enum RelayError {
    /// Reading from the source (a server).
    Src(WireError),
    /// Writing to the destination (a client).
    Dst(io::Error),
}

/// The whole length (tag included) of the message whose header starts `b`, checked; `None` while the header
/// is incomplete.
fn frame_len(b: &[u8], limit: Limit) -> Result<Option<usize>, WireError> {
    if b.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as i64;
    if len < 4 {
        return Err(WireError::BadLength { tag: b[0] as char, len });
    }
    let total = 1 + len as usize;
    if total > limit.bytes {
        return Err(WireError::TooLarge { tag: b[0] as char, len: total, limit: limit.bytes, client: limit.client });
    }
    Ok(Some(total))
}

/// The largest message a stream accepts, and whether it is a client's (`router-max-message-bytes`).
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub bytes: usize,
    pub client: bool,
}

impl Default for Limit {
    fn default() -> Self {
        Limit { bytes: MAX_MESSAGE, client: false }
    }
}

/// Takes one whole message off the front of `buf`, if it holds one; reserves room for the rest of a partial
/// one (the header is checked first: a message over the limit is refused before anything is reserved). The
/// frame is a view of the buffer's memory (no copy).
pub fn split_frame(buf: &mut BytesMut) -> Result<Option<Msg>, WireError> {
    split_frame_within(buf, Limit::default())
}

/// [`split_frame`] under `limit`.
pub fn split_frame_within(buf: &mut BytesMut, limit: Limit) -> Result<Option<Msg>, WireError> {
    let Some(total) = frame_len(buf, limit)? else { return Ok(None) };
    let tag = buf[0];
    if buf.len() >= total {
        let frame = buf.split_to(total).freeze();
        return Ok(Some(Msg { tag, frame }));
    }
    buf.reserve(total - buf.len());
    Ok(None)
}

/// A stream with a read buffer and a write buffer.
pub struct Framed<S> {
    pub sock: S,
    rbuf: BytesMut,
    pub wbuf: BytesMut,
    /// The largest message read from the stream.
    pub limit: Limit,
}

impl<S: Stream> Framed<S> {
    pub fn new(sock: S) -> Self {
        Framed {
            sock,
            rbuf: BytesMut::with_capacity(16 << 10),
            wbuf: BytesMut::with_capacity(16 << 10),
            limit: Limit::default(),
        }
    }

    /// Bytes already read but not yet taken.
    pub fn buffered(&self) -> usize {
        self.rbuf.len()
    }

    /// Waits until a whole message is at the front of the read buffer and returns its length (tag and length
    /// field included), or `None` at a clean end of stream. The message stays there: look at it with
    /// [`Framed::head`], then take it with [`Framed::consume`] — no `Bytes` is split off (a relay that looks
    /// at each message and copies it on saves that on every message).
    pub async fn peek(&mut self) -> Result<Option<usize>, WireError> {
        loop {
            if let Some(total) = frame_len(&self.rbuf, self.limit)? {
                if self.rbuf.len() >= total {
                    return Ok(Some(total));
                }
                self.rbuf.reserve(total - self.rbuf.len());
            }
            if self.sock.read_buf(&mut self.rbuf).await? == 0 {
                return if self.rbuf.is_empty() { Ok(None) } else { Err(WireError::Truncated) };
            }
        }
    }

    /// [`Framed::peek`] without waiting, for the message that starts `at` bytes into what was read and not
    /// taken (`0`: the front; more: after messages looked at and left there to be taken together): its
    /// length when it was read already (`None`: not yet, or a header that [`Framed::peek`] refuses — take
    /// what is before it and call that).
    #[inline]
    pub fn peek_buffered(&self, at: usize) -> Option<usize> {
        let rest = self.rbuf.get(at..)?;
        match frame_len(rest, self.limit) {
            Ok(Some(total)) if rest.len() >= total => Some(total),
            _ => None,
        }
    }

    /// The first `len` bytes read and not yet taken (after [`Framed::peek`]: the whole message).
    pub fn head(&self, len: usize) -> &[u8] {
        &self.rbuf[..len]
    }

    /// Writes `v` over the byte `at` bytes into what was read and not yet taken (a status in a message
    /// relayed from where it was read).
    #[inline]
    pub fn set_byte(&mut self, at: usize, v: u8) {
        self.rbuf[at] = v;
    }

    /// The `len` bytes read and not yet taken from `at` on (after [`Framed::peek_buffered`]`(at)`: the
    /// message there).
    #[inline]
    pub fn bytes_at(&self, at: usize, len: usize) -> &[u8] {
        &self.rbuf[at..at + len]
    }

    /// Takes the first `len` bytes read (the message [`Framed::peek`] found).
    pub fn consume(&mut self, len: usize) {
        self.rbuf.advance(len);
    }

    /// Splits off the message [`Framed::peek`] found (`len` bytes) as a [`Msg`] of its own.
    pub fn take(&mut self, len: usize) -> Msg {
        let frame = self.rbuf.split_to(len).freeze();
        Msg { tag: frame[0], frame }
    }

    /// [`Framed::read`] without waiting: the next message if it was read already.
    #[inline]
    pub fn read_buffered(&mut self) -> Result<Option<Msg>, WireError> {
        split_frame_within(&mut self.rbuf, self.limit)
    }

    /// The next message, or `None` at a clean end of stream.
    pub async fn read(&mut self) -> Result<Option<Msg>, WireError> {
        loop {
            if let Some(m) = split_frame_within(&mut self.rbuf, self.limit)? {
                return Ok(Some(m));
            }
            if self.sock.read_buf(&mut self.rbuf).await? == 0 {
                return if self.rbuf.is_empty() { Ok(None) } else { Err(WireError::Truncated) };
            }
        }
    }

    /// A startup-phase packet (no tag: a length that counts itself, then the body), returned without the
    /// length. `None` at a clean end of stream.
    pub async fn read_startup(&mut self) -> Result<Option<BytesMut>, WireError> {
        loop {
            if self.rbuf.len() >= 4 {
                let len = i32::from_be_bytes([self.rbuf[0], self.rbuf[1], self.rbuf[2], self.rbuf[3]]) as i64;
                if !(8..=10_000).contains(&len) {
                    return Err(WireError::BadLength { tag: '\0', len });
                }
                if self.rbuf.len() >= len as usize {
                    let mut packet = self.rbuf.split_to(len as usize);
                    packet.advance(4);
                    return Ok(Some(packet));
                }
            }
            if self.sock.read_buf(&mut self.rbuf).await? == 0 {
                return if self.rbuf.is_empty() { Ok(None) } else { Err(WireError::Truncated) };
            }
        }
    }

    /// The first message that tells how a statement went — past the ones that come before any execution
    /// (ParseComplete, BindComplete, ParameterDescription, RowDescription, NoData) — read in full but left in
    /// the buffer with those before it; `None` at end of stream.
    pub async fn front(&mut self) -> Result<Option<(u8, &[u8])>, WireError> {
        let mut pos = 0;
        loop {
            while let Some(total) = frame_len(&self.rbuf[pos..], self.limit)? {
                let b = &self.rbuf[pos..];
                if b.len() < total {
                    self.rbuf.reserve(pos + total - self.rbuf.len());
                    break;
                }
                if matches!(b[0], b'1' | b'2' | b't' | b'T' | b'n') {
                    pos += total;
                    continue;
                }
                return Ok(Some((self.rbuf[pos], &self.rbuf[pos + 5..pos + total])));
            }
            if self.sock.read_buf(&mut self.rbuf).await? == 0 {
                return if self.rbuf.len() == pos { Ok(None) } else { Err(WireError::Truncated) };
            }
        }
    }

    /// Queues a frame for writing.
    pub fn push(&mut self, frame: &[u8]) {
        self.wbuf.extend_from_slice(frame);
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.flush_now()? {
            self.sock.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// [`Framed::flush`] without a future, for what the socket takes now: `true` when nothing is left queued
    /// (nearly always), `false`: call `flush` for the rest. (A hot path's `flush().await` costs the futures'
    /// set-up and poll of every `async fn` on the way even when nothing waits.)
    #[inline]
    pub fn flush_now(&mut self) -> io::Result<bool> {
        if self.wbuf.is_empty() {
            return Ok(true);
        }
        let n = written_now(&mut self.sock, &self.wbuf)?;
        self.wbuf.advance(n);
        Ok(self.wbuf.is_empty())
    }

    /// Whether the queue has grown past [`FLUSH_AT`] (see [`Framed::flush_if_full`]).
    #[inline]
    pub fn is_full(&self) -> bool {
        self.wbuf.len() >= FLUSH_AT
    }

    /// Writes the queue when it has grown past [`FLUSH_AT`].
    pub async fn flush_if_full(&mut self) -> io::Result<()> {
        if self.wbuf.len() >= FLUSH_AT {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends one frame now: written straight from `frame` when nothing else is queued (no copy).
    pub async fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let sent = self.send_now(frame)?;
        self.send_rest(frame, sent).await
    }

    /// [`Framed::send`] without a future, for what the socket takes now: how many bytes of `frame` it took
    /// (all of them, nearly always; none when something is queued before it) — [`Framed::send_rest`] sends
    /// the rest.
    #[inline]
    pub fn send_now(&mut self, frame: &[u8]) -> io::Result<usize> {
        if !self.wbuf.is_empty() {
            return Ok(0);
        }
        written_now(&mut self.sock, frame)
    }

    /// What [`Framed::send_now`] left of `frame` (it wrote `sent` bytes), through `write_all`'s future.
    pub async fn send_rest(&mut self, frame: &[u8], sent: usize) -> io::Result<()> {
        if sent == frame.len() {
            Ok(())
        } else if self.wbuf.is_empty() {
            self.sock.write_all(&frame[sent..]).await
        } else {
            self.push(frame);
            self.flush().await
        }
    }

    /// Relays this stream's messages to `dst` up to and including the next ReadyForQuery, whose status byte
    /// is returned (and replaced by what `status` makes of it and of whether an error came), with whether an
    /// ErrorResponse was among them. The messages
    /// are not split apart: whole runs of frames are written from this read buffer to `dst` (short ones
    /// gathered in `dst`'s write buffer), so a response costs one read and one write, whatever the number of
    /// rows. An end of stream before ReadyForQuery tells what is known of the statement's fate (see
    /// [`WireError::Closed`] and [`WireError::CommitUnconfirmed`]).
    ///
    /// The last run, the one that ends with ReadyForQuery, is left in `dst`'s write buffer: the caller flushes
    /// it once the connection is given back, so that a client told it may go on (and any client it talks to)
    /// finds the connection free, as the extended protocol's answers do.
    ///
    /// ParameterStatus messages (rare: after a SET of a reported parameter) are also copied to `reported`.
    pub async fn relay_to_ready<D>(
        &mut self,
        dst: &mut Framed<D>,
        status: &(dyn Fn(u8, bool) -> u8 + Sync),
        reported: &mut Vec<Bytes>,
    ) -> Result<(u8, bool), RelayError>
    where
        D: Stream,
    {
        let (mut error, mut shutdown_notice) = (false, false);
        loop {
            let mut pos = 0;
            let mut ready = None;
            while let Some(total) = frame_len(&self.rbuf[pos..], self.limit).map_err(RelayError::Src)? {
                let b = &self.rbuf[pos..];
                let tag = b[0];
                if b.len() < total {
                    break;
                }
                error |= tag == b'E';
                if tag == b'N' {
                    shutdown_notice |= crate::net::proto::is_commit_cut(&b[5..total]);
                } else if tag == b'S' {
                    reported.push(Bytes::copy_from_slice(&b[..total]));
                }
                if tag == b'Z' && total == 6 {
                    let theirs = b[5];
                    ready = Some(theirs);
                    self.rbuf[pos + 5] = status(theirs, error);
                    pos += total;
                    break;
                }
                pos += total;
            }
            if pos > 0 {
                let run = &self.rbuf[..pos];
                if ready.is_some() {
                    dst.push(run);
                } else if run.len() >= FLUSH_AT / 4 {
                    let sent = dst.send_now(run).map_err(RelayError::Dst)?;
                    if sent < run.len() {
                        dst.send_rest(run, sent).await.map_err(RelayError::Dst)?;
                    }
                } else {
                    dst.push(run);
                    dst.flush_if_full().await.map_err(RelayError::Dst)?;
                }
                self.rbuf.advance(pos);
            }
            if let Some(s) = ready {
                return Ok((s, error));
            }
            // (The header, if whole, was checked by the scan above.)
            if let Some(total) = frame_len(&self.rbuf, self.limit).map_err(RelayError::Src)? {
                self.rbuf.reserve(total.saturating_sub(self.rbuf.len()));
            } else if self.rbuf.capacity() - self.rbuf.len() < 4096 {
                self.rbuf.reserve(16 << 10);
            }
            match self.sock.read_buf(&mut self.rbuf).await {
                Ok(0) => {
                    return Err(RelayError::Src(if shutdown_notice {
                        WireError::CommitUnconfirmed
                    } else if self.rbuf.is_empty() {
                        WireError::Closed
                    } else {
                        WireError::Truncated
                    }))
                }
                Ok(_) => {}
                Err(e) => return Err(RelayError::Src(e.into())),
            }
        }
    }

    /// Takes the stream back with what was read but not consumed (for TLS upgrades).
    pub fn into_parts(self) -> (S, BytesMut) {
        (self.sock, self.rbuf)
    }
}
