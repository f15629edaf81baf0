//! TLS for the QUIC server: the relay's own certificate, and mandatory client certificates
//! chained to `tls.client_ca` and not on `tls.deny`. The site identity is read from the
//! verified certificate only.

use std::path::PathBuf;
use std::sync::Arc;

use quinn::crypto::rustls::QuicServerConfig;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use spoke_process::pem::{load_certs, load_key, PemError};
use spoke_transport::transport::{transport_config, CONNECTION_WINDOW, STREAM_WINDOW};
use x509_parser::extensions::GeneralName;

use crate::config::{LimitsConfig, TlsConfig};
use crate::deny::DenyList;
use crate::fleet::reject;

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

/// A secret for the relay's QUIC endpoint that outlives the process: derived from the relay's
/// private key, so a relay restarted with the same key recognises the connection ids it
/// issued before and answers packets of those lost connections with a stateless reset that
/// the agents accept. They then know at their next packet (a heartbeat, every 2 s) that the
/// connection is gone, instead of after the 30 s idle timeout, which after a restart would
/// hold a whole fleet back that long. Anyone without the key can neither forge such a reset
/// nor tell the secret from the ids.
pub fn endpoint_secret(tls: &TlsConfig) -> Result<[u8; 32], TlsError> {
    let key = load_key(&tls.key)?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(b"spoke relay QUIC endpoint secret v1\0");
    context.update(key.secret_der());
    let mut secret = [0u8; 32];
    secret.copy_from_slice(context.finish().as_ref());
    Ok(secret)
}

/// Builds the quinn server configuration from `[tls]` (with its parsed deny list) and the
/// transport bounds of `[limits]`.
pub fn server_config(
    tls: &TlsConfig,
    deny: &DenyList,
    limits: &LimitsConfig,
) -> Result<quinn::ServerConfig, TlsError> {
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
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::ClientCa {
            path: tls.client_ca.clone(),
            reason: e.to_string(),
        })?;
    let verifier = Arc::new(DenyingVerifier {
        inner: webpki,
        deny: deny.clone(),
    });
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
    let mut transport = transport_config(None);
    // The agent's control stream is its one bidirectional stream; the rest are its data
    // streams (protocol version 3), which carry frames one way only.
    transport.max_concurrent_bidi_streams(1u32.into());
    transport
        .max_concurrent_uni_streams(limits.max_streams_per_connection.saturating_sub(1).into());
    // Unread data a peer can park in this relay (it can hold any stream back by withholding
    // one packet): one stream window for the whole connection, however many streams it opens.
    // Its streams share what one stream alone had, and the benchmarks' figures were measured
    // with this window (docs/benchmarks.md).
    let window = u64::from(STREAM_WINDOW).min(CONNECTION_WINDOW);
    transport.receive_window(quinn::VarInt::from_u64(window).unwrap_or(quinn::VarInt::MAX));
    // Validated by config::load to be at most an hour, far inside QUIC's varint range.
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(limits.idle_timeout).ok());
    server.transport_config(Arc::new(transport));
    // Incoming connections are handed to the accept loop at once and judged there; quinn only
    // needs room for the few that arrive between two turns of the loop.
    server.max_incoming(limits.max_handshakes as usize);
    server.incoming_buffer_size(64 * 1024);
    server.incoming_buffer_size_total(16 * 1024 * 1024);
    Ok(server)
}

/// webpki's verdict, preceded by the deny list. A denied certificate fails as `Revoked`, so
/// the peer gets a `certificate_revoked` alert and the relay can count it apart from other
/// failures (see [`handshake_reject_reason`]).
#[derive(Debug)]
struct DenyingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    deny: DenyList,
}

impl ClientCertVerifier for DenyingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.deny.denies(end_entity) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|error| match error {
                // An issuer name that matches the client CA with a signature that does not
                // verify means another CA of the same name (every `pki init` CA is called
                // "spoke CA"): to the peer and to the counter, an unknown CA.
                #[allow(deprecated)]
                rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
                    rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
                }
                other => other,
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The `spoke_relay_rejected_total` reason of a failed handshake. rustls turns each
/// verification failure into a TLS alert and quinn reports it as the crypto error code
/// `0x100 + alert`, which is all the relay learns about why.
pub fn handshake_reject_reason(error: &quinn::ConnectionError) -> &'static str {
    let quinn::ConnectionError::TransportError(transport) = error else {
        return match error {
            quinn::ConnectionError::TimedOut => reject::HANDSHAKE_TIMEOUT,
            _ => reject::HANDSHAKE,
        };
    };
    let code = u64::from(transport.code);
    let Some(alert) = code
        .checked_sub(0x100)
        .and_then(|alert| u8::try_from(alert).ok())
    else {
        return reject::HANDSHAKE;
    };
    match AlertDescription::from(alert) {
        AlertDescription::CertificateRequired => reject::NO_CERT,
        AlertDescription::UnknownCA => reject::UNKNOWN_CA,
        AlertDescription::CertificateExpired => reject::EXPIRED,
        AlertDescription::CertificateRevoked => reject::DENIED,
        _ => reject::HANDSHAKE,
    }
}

/// The leaf certificate a connection's peer presented (verified during the handshake).
pub fn peer_leaf(connection: &quinn::Connection) -> Option<CertificateDer<'static>> {
    connection
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().cloned())
}

/// The site a connection speaks for: the single DNS SAN of its verified client certificate.
pub fn site_identity(connection: &quinn::Connection) -> Result<String, IdentityError> {
    let leaf = peer_leaf(connection).ok_or(IdentityError::NoCertificate)?;
    site_identity_from_der(&leaf)
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
