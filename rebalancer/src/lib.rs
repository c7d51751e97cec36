//! The online move engine (`mover`), the plans that propose moves (`plan`) and the shard-balance report
//! (`report`) behind the `rebalance` CLI.
#![forbid(unsafe_code)]

pub mod mover;
pub mod plan;
pub mod report;

/// An HTTP client (routers' `/metrics`, Patroni's REST API): reqwest is built with rustls and no default
/// crypto provider, so its TLS configuration is given here: ring, trusting `ca` (`patroni-ca-file`) if any.
pub fn http_client(ca: Option<&std::path::Path>, timeout: std::time::Duration) -> anyhow::Result<reqwest::Client> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca {
        use rustls::pki_types::pem::PemObject;
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(path)? {
            roots.add(cert?)?;
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(reqwest::Client::builder().use_preconfigured_tls(tls).timeout(timeout).build()?)
}

pub(crate) use shardmap::sql::{quote_ident, quote_literal as quote_literal_sql};
