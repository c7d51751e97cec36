//! TLS to PostgreSQL servers, as a node URL asks for it: `sslmode` (`disable`, the default; `prefer`,
//! `require`, `verify-ca`, `verify-full`, as libpq reads them) and `sslrootcert`. `require` encrypts without
//! checking the certificate (as libpq does); `verify-ca` checks that it chains to `sslrootcert`;
//! `verify-full` also that it names the host. The router's data plane uses [`Tls::client_config`] in its own
//! handshake; the control plane (the catalog, the decision log, recovery, probes, the rebalancer) connects
//! with tokio-postgres through [`connector`].

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// How a connection to a server is protected (a node URL's `sslmode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SslMode {
    #[default]
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// A node URL's `sslmode` (libpq's names; `allow` reads as `prefer`).
    pub fn parse(v: &str) -> Option<SslMode> {
        Some(match v {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

/// A node's TLS settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tls {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
}

impl Tls {
    /// From a node URL's parameters (`sslmode`, `sslrootcert`).
    pub fn of(params: &[(String, String)]) -> Tls {
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        Tls {
            mode: get("sslmode").and_then(SslMode::parse).unwrap_or_default(),
            root_cert: get("sslrootcert").map(PathBuf::from),
        }
    }

    /// The rustls configuration for this mode.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let config = match self.mode {
            SslMode::Disable => return Err("TLS is disabled".into()),
            SslMode::Prefer | SslMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient { provider, chain: None }))
                .with_no_client_auth(),
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let path = self.root_cert.as_ref().ok_or("sslmode verify-ca and verify-full need sslrootcert")?;
                let mut roots = rustls::RootCertStore::empty();
                use rustls::pki_types::pem::PemObject;
                for cert in
                    CertificateDer::pem_file_iter(path).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?
                {
                    let cert = cert.map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                    roots.add(cert).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                }
                let webpki =
                    rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| e.to_string())?;
                if self.mode == SslMode::VerifyFull {
                    builder.dangerous().with_custom_certificate_verifier(webpki).with_no_client_auth()
                } else {
                    let lenient = Lenient { provider, chain: Some(webpki) };
                    builder.dangerous().with_custom_certificate_verifier(Arc::new(lenient)).with_no_client_auth()
                }
            }
        };
        Ok(Arc::new(config))
    }
}

/// `require` (`chain: None`): any certificate; `verify-ca`: one that chains to the roots, whatever name it
/// gives. The handshake's signatures are checked either way.
#[derive(Debug)]
struct Lenient {
    provider: Arc<rustls::crypto::CryptoProvider>,
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// What the control plane's tokio-postgres connections connect with.
pub type Connector = tokio_postgres_rustls::MakeRustlsConnect;

/// tokio-postgres's settings for a node URL's `sslmode` and `sslrootcert`: the mode set on `cfg`, and the
/// connector to connect with (TLS never starts under `disable`).
pub fn connector(cfg: &mut tokio_postgres::Config, params: &[(String, String)]) -> Result<Connector, String> {
    let tls = Tls::of(params);
    use tokio_postgres::config::SslMode as Pg;
    cfg.ssl_mode(match tls.mode {
        SslMode::Disable => Pg::Disable,
        SslMode::Prefer => Pg::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
    });
    let config = match tls.mode {
        // Not used: a connector is needed all the same.
        SslMode::Disable => Tls { mode: SslMode::Require, root_cert: None }.client_config()?,
        _ => tls.client_config()?,
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new((*config).clone()))
}
