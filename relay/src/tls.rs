//! TLS for the QUIC server: the relay's own certificate, and mandatory client certificates
//! chained to `tls.client_ca`. The site identity is read from the verified certificate only.

use std::path::PathBuf;
use std::sync::Arc;

use quinn::crypto::rustls::QuicServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use spoke_io::pem::{load_certs, load_key, PemError};
use spoke_io::transport::transport_config;
use x509_parser::extensions::GeneralName;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA {path}: {reason}")]
    ClientCa { path: PathBuf, reason: String },
}

/// Why a verified peer certificate still does not name a site.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("peer presented no certificate")]
    NoCertificate,
    #[error("peer certificate cannot be parsed")]
    Unparseable,
    #[error("peer certificate has no DNS subject alternative name")]
    NoDnsName,
    #[error("peer certificate has several DNS names ({0}); a site certificate must name exactly one site")]
    Ambiguous(usize),
}

/// Builds the quinn server configuration from `[tls]`.
pub fn server_config(tls: &TlsConfig) -> Result<quinn::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = load_certs(&tls.cert)?;
    let key = load_key(&tls.key)?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in load_certs(&tls.client_ca)? {
        roots.add(ca).map_err(|e| TlsError::ClientCa {
            path: tls.client_ca.clone(),
            reason: e.to_string(),
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::ClientCa {
            path: tls.client_ca.clone(),
            reason: e.to_string(),
        })?;
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    crypto.alpn_protocols = vec![spoke_proto::ALPN.to_vec()];
    // 0-RTT stays off: a replayed Hello or Batch would be harmless to the hub (the resume point
    // dedups) but nothing is gained on long-lived sessions, so no replay surface is opened.
    crypto.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(crypto)
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(transport_config(None)));
    Ok(server)
}

/// The site a connection speaks for: the single DNS SAN of its verified client certificate.
pub fn site_identity(connection: &quinn::Connection) -> Result<String, IdentityError> {
    let certs = connection
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(IdentityError::NoCertificate)?;
    let leaf = certs.first().ok_or(IdentityError::NoCertificate)?;
    site_identity_from_der(leaf)
}

/// As [`site_identity`], for a DER certificate.
pub fn site_identity_from_der(der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::Unparseable)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| IdentityError::Unparseable)?
        .ok_or(IdentityError::NoDnsName)?;
    let names: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(*dns),
            _ => None,
        })
        .collect();
    match names.as_slice() {
        [] => Err(IdentityError::NoDnsName),
        [one] => Ok((*one).to_owned()),
        many => Err(IdentityError::Ambiguous(many.len())),
    }
}

/// As [`site_identity`], for the first certificate of a PEM file's contents.
pub fn site_identity_from_pem(pem: &[u8]) -> Result<String, IdentityError> {
    let der = CertificateDer::from_pem_slice(pem).map_err(|_| IdentityError::Unparseable)?;
    site_identity_from_der(&der)
}
