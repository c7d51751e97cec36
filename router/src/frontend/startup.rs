//! The client's startup: SSL negotiation (TLS when configured), the startup packet, and authentication
//! (`router-auth`: SCRAM-SHA-256 by default, md5, or trust) against `router-user-<name>` passwords or SCRAM
//! verifiers. The SCRAM exchange is `scram.rs` (from a verifier, so no clear password is needed); the
//! Authentication messages are pgwire's.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::{BufMut, Bytes, BytesMut};
use pgwire::messages::startup::Authentication;
use pgwire::messages::Message;
use shardmap::config::AuthMethod;

use crate::net::proto;
use crate::net::wire::{Framed, Stream, WireError};

const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;
const PROTOCOL_3: i32 = 196608;
const SCRAM_ITERATIONS: usize = 4096;

/// What the client asked for at startup.
pub enum Hello {
    /// SSLRequest, with TLS configured: the caller answers 'S' and upgrades the connection.
    Tls,
    Startup {
        params: Vec<(String, String)>,
    },
    Cancel {
        pid: i32,
        secret: i32,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("{message}")]
    Refused { code: &'static str, message: String },
}

impl From<std::io::Error> for StartupError {
    fn from(e: std::io::Error) -> Self {
        StartupError::Wire(e.into())
    }
}

fn refused(code: &'static str, message: impl Into<String>) -> StartupError {
    StartupError::Refused { code, message: message.into() }
}

/// Reads packets until a startup message or a cancel request.
/// With `tls`, an SSLRequest returns [`Hello::Tls`]; without, it is answered 'N' (the client goes on in plain
/// text or gives up, as with a server without ssl).
pub async fn hello<S: Stream>(io: &mut Framed<S>, tls: bool) -> Result<Option<Hello>, StartupError> {
    loop {
        let Some(packet) = io.read_startup().await? else { return Ok(None) };
        let (code, rest) = proto::read_i32(&packet).ok_or_else(|| refused("08P01", "short startup packet"))?;
        match code {
            SSL_REQUEST if tls => return Ok(Some(Hello::Tls)),
            SSL_REQUEST | GSSENC_REQUEST => {
                io.push(b"N");
                io.flush().await?;
            }
            CANCEL_REQUEST => {
                let (pid, rest) = proto::read_i32(rest).ok_or_else(|| refused("08P01", "short cancel request"))?;
                let (secret, _) = proto::read_i32(rest).ok_or_else(|| refused("08P01", "short cancel request"))?;
                return Ok(Some(Hello::Cancel { pid, secret }));
            }
            PROTOCOL_3 => {
                let mut params = Vec::new();
                let mut b = rest;
                while let Some((k, r)) = proto::read_cstr(b) {
                    if k.is_empty() {
                        break;
                    }
                    let (v, r) = proto::read_cstr(r).ok_or_else(|| refused("08P01", "malformed startup packet"))?;
                    params.push((k.to_string(), v.to_string()));
                    b = r;
                }
                return Ok(Some(Hello::Startup { params }));
            }
            other => {
                return Err(refused(
                    "0A000",
                    format!("unsupported frontend protocol {}.{}: the router speaks 3.0", other >> 16, other & 0xffff),
                ))
            }
        }
    }
}

/// SCRAM verifiers of users configured with a clear password, computed once per user (4096 PBKDF2 rounds
/// cost milliseconds); users configured with a verifier use it as it is.
#[derive(Default)]
pub struct ScramCache {
    salted: Mutex<HashMap<String, super::scram::Verifier>>,
}

impl ScramCache {
    /// Forgets every salted password (after RELOAD changed users or passwords).
    pub fn clear(&self) {
        self.salted.lock().expect("scram cache lock").clear();
    }

    fn get(&self, user: &str, secret: &str) -> super::scram::Verifier {
        if let Some(v) = super::scram::Verifier::parse(secret) {
            return v;
        }
        let mut m = self.salted.lock().expect("scram cache lock");
        m.entry(user.to_string())
            .or_insert_with(|| {
                let salt: [u8; 16] = rand::random();
                super::scram::Verifier::from_password(secret, &salt, SCRAM_ITERATIONS as u32)
            })
            .clone()
    }
}

fn send_auth(buf: &mut BytesMut, a: Authentication) {
    a.encode(buf).expect("authentication messages encode");
}

/// Authenticates `user`; on success AuthenticationOk has been queued.
pub async fn authenticate<S: Stream>(
    io: &mut Framed<S>,
    method: AuthMethod,
    user: &str,
    password: Option<&str>,
    cache: &ScramCache,
    endpoint: Option<&[u8; 32]>,
) -> Result<(), StartupError> {
    let failed = || refused("28P01", format!("password authentication failed for user \"{user}\""));
    if method == AuthMethod::Trust {
        send_auth(&mut io.wbuf, Authentication::Ok);
        return Ok(());
    }
    let Some(password) = password else {
        return Err(refused("28000", format!("no such user \"{user}\": add router-user-{user} to the config")));
    };
    match method {
        AuthMethod::Trust => unreachable!("handled above"),
        AuthMethod::Md5 if super::scram::Verifier::parse(password).is_some() => {
            return Err(refused(
                "28000",
                format!("router-user-{user} holds a SCRAM verifier, and router-auth md5 needs the clear password: use scram-sha-256"),
            ));
        }
        AuthMethod::Md5 => {
            let salt: [u8; 4] = rand::random();
            send_auth(&mut io.wbuf, Authentication::MD5Password(salt.to_vec()));
            io.flush().await?;
            let msg = read_password(io).await?;
            let given = proto::read_cstr(msg.as_ref()).map(|(s, _)| s).unwrap_or("");
            let expected = postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt);
            if given != expected {
                return Err(failed());
            }
        }
        AuthMethod::ScramSha256 => {
            // Over TLS, channel binding too (SCRAM-SHA-256-PLUS, tls-server-end-point).
            let mut mechanisms = vec!["SCRAM-SHA-256".to_string()];
            if endpoint.is_some() {
                mechanisms.insert(0, "SCRAM-SHA-256-PLUS".to_string());
            }
            send_auth(&mut io.wbuf, Authentication::SASL(mechanisms));
            io.flush().await?;
            let first = read_password(io).await?;
            let (mechanism, rest) =
                proto::read_cstr(&first).ok_or_else(|| refused("08P01", "malformed SASLInitialResponse"))?;
            let endpoint = match (mechanism, endpoint) {
                ("SCRAM-SHA-256", e) => e,
                ("SCRAM-SHA-256-PLUS", Some(e)) => Some(e),
                _ => return Err(refused("28000", format!("unsupported SASL mechanism {mechanism}"))),
            };
            let (len, data) = proto::read_i32(rest).ok_or_else(|| refused("08P01", "malformed SASLInitialResponse"))?;
            let data =
                data.get(..len.max(0) as usize).ok_or_else(|| refused("08P01", "malformed SASLInitialResponse"))?;
            let verifier = cache.get(user, password);
            let scram_error = |e: super::scram::ScramError| match e {
                super::scram::ScramError::Malformed(why) => refused("08P01", format!("SCRAM exchange: {why}")),
                super::scram::ScramError::BadProof => failed(),
            };
            let (server_first, exchange) =
                super::scram::server_first(&verifier, data, endpoint).map_err(scram_error)?;
            send_auth(&mut io.wbuf, Authentication::SASLContinue(Bytes::from(server_first)));
            io.flush().await?;
            let last = read_password(io).await?;
            let server_final = exchange.server_final(&verifier, &last).map_err(scram_error)?;
            send_auth(&mut io.wbuf, Authentication::SASLFinal(Bytes::from(server_final)));
        }
    }
    send_auth(&mut io.wbuf, Authentication::Ok);
    Ok(())
}

async fn read_password<S: Stream>(io: &mut Framed<S>) -> Result<Bytes, StartupError> {
    match io.read().await? {
        Some(m) if m.tag == b'p' => Ok(m.frame.slice(5..)),
        Some(m) => Err(refused("08P01", format!("expected a password message, got {:?}", m.tag as char))),
        None => Err(StartupError::Wire(WireError::Truncated)),
    }
}

/// The TLS acceptor for `router-tls-cert` and `router-tls-key` (PEM files), and the SHA-256 hash of the
/// certificate (SCRAM channel binding's `tls-server-end-point`, RFC 5929: SHA-256 for certificates signed with
/// SHA-256 or a weaker hash, as nearly all are).
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<(tokio_rustls::TlsAcceptor, [u8; 32])> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("router-tls-cert {}: {e}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| anyhow::anyhow!("router-tls-key {}: {e}", key.display()))?;
    let endpoint: [u8; 32] = {
        use sha2::Digest;
        let first =
            certs.first().ok_or_else(|| anyhow::anyhow!("router-tls-cert {}: no certificate", cert.display()))?;
        sha2::Sha256::digest(first.as_ref()).into()
    };
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("router-tls-cert/router-tls-key: {e}"))?;
    Ok((tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)), endpoint))
}

/// BackendKeyData: the pid and secret a client will quote in a CancelRequest.
pub fn backend_key(buf: &mut BytesMut, pid: i32, secret: i32) {
    proto::put(buf, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}
