//! TLS for the QUIC client: trust only `relay.ca`, present the site certificate.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use spoke_process::pem::{load_certs, load_key, PemError};
use spoke_transport::congestion::{BdpWindowConfig, LinkLimited};
use spoke_transport::transport::transport_config;

use crate::config::UpstreamConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("CA {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// `link_limited` hears from the congestion controller when the link is the bottleneck.
pub fn client_config(
    relay: &UpstreamConfig,
    link_limited: Arc<LinkLimited>,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in load_certs(&relay.ca)? {
        roots.add(ca).map_err(|e| TlsError::Ca {
            path: relay.ca.clone(),
            reason: e.to_string(),
        })?;
    }
    let chain = load_certs(&relay.cert)?;
    let key = load_key(&relay.key)?;
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    crypto.alpn_protocols = vec![spoke_proto::ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(crypto)
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    // Keep-alives keep NAT bindings open between batches: the agent is the side that dials.
    let mut transport = transport_config(Some(Duration::from_secs(5)));
    transport.congestion_controller_factory(Arc::new(BdpWindowConfig::reporting_to(link_limited)));
    client.transport_config(Arc::new(transport));
    Ok(client)
}
