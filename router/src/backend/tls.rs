//! TLS to the shards on the data plane: a node URL's `sslmode` and `sslrootcert` (read by
//! [`shard_catalog::tls`], which the control plane's connections share). The connection asks for TLS with
//! SSLRequest; the handshake is rustls'.

use std::pin::Pin;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
pub use shard_catalog::tls::{SslMode, Tls};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A server connection's stream: plain TCP, or TLS over it.
pub enum ServerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl ServerStream {
    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, ServerStream::Tls(_))
    }
}

impl crate::net::wire::Stream for ServerStream {
    fn try_write_now(&mut self, buf: &[u8]) -> Option<std::io::Result<usize>> {
        match self {
            ServerStream::Plain(s) => Some(s.try_write(buf)),
            ServerStream::Tls(_) => None,
        }
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerStream::Plain(s) => s.is_write_vectored(),
            ServerStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Asks the server for TLS on a fresh TCP connection (SSLRequest) and, when it agrees, does the handshake;
/// under `prefer` a server without TLS keeps the plain connection.
pub async fn negotiate(mut sock: TcpStream, host: &str, tls: &Tls) -> Result<ServerStream, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if tls.mode == SslMode::Disable {
        return Ok(ServerStream::Plain(sock));
    }
    let config = tls.client_config()?;
    sock.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.map_err(|e| e.to_string())?;
    let mut answer = [0u8; 1];
    sock.read_exact(&mut answer).await.map_err(|e| e.to_string())?;
    match answer[0] {
        b'S' => {}
        b'N' if tls.mode == SslMode::Prefer => return Ok(ServerStream::Plain(sock)),
        b'N' => return Err("the server does not accept TLS (ssl = off), and the node's sslmode requires it".into()),
        other => return Err(format!("unexpected answer {:?} to SSLRequest", other as char)),
    }
    let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))?;
    let stream = tokio_rustls::TlsConnector::from(config).connect(name, sock).await.map_err(|e| format!("TLS: {e}"))?;
    Ok(ServerStream::Tls(Box::new(stream)))
}
