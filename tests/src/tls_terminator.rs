//! A TLS terminator in front of a broker, as a TLS listener of a secured Kafka cluster is
//! (tansu 0.6 has no working TLS of its own): it accepts TLS with a server certificate of a
//! test CA and forwards the plaintext to the broker. The broker must advertise the
//! terminator's address ([`crate::broker::Broker::start_behind`]), or clients would reach
//! it directly after their first metadata answer. With a client CA it requires client
//! certificates, as a mutual-TLS listener does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::accept_loop::AcceptLoop;
use crate::pki::Identity;

/// The terminator; it stops (and drops its connections) when dropped.
pub struct TlsTerminator {
    pub listen: SocketAddr,
    /// What new connections are accepted with ([`TlsTerminator::present`]).
    acceptor: Arc<Mutex<TlsAcceptor>>,
    /// PEM of the CA whose client certificates it requires (mutual TLS); `None`: none asked.
    client_ca: Option<String>,
    handshakes_failed: Arc<AtomicU64>,
    _accepting: AcceptLoop,
}

impl TlsTerminator {
    /// Listens on `listen` with `server`'s certificate and forwards each connection to
    /// `target`.
    pub fn start(
        listen: SocketAddr,
        target: SocketAddr,
        server: &Identity,
    ) -> anyhow::Result<TlsTerminator> {
        Self::start_with(listen, target, server, None)
    }

    /// As [`TlsTerminator::start`], and requires each client to present a certificate
    /// signed by the CA `client_ca_pem` (mutual TLS, a listener with `ssl.client.auth`).
    pub fn start_mutual(
        listen: SocketAddr,
        target: SocketAddr,
        server: &Identity,
        client_ca_pem: &str,
    ) -> anyhow::Result<TlsTerminator> {
        Self::start_with(listen, target, server, Some(client_ca_pem.to_owned()))
    }

    fn start_with(
        listen: SocketAddr,
        target: SocketAddr,
        server: &Identity,
        client_ca: Option<String>,
    ) -> anyhow::Result<TlsTerminator> {
        let acceptor = Arc::new(Mutex::new(acceptor(server, client_ca.as_deref())?));
        let handshakes_failed = Arc::new(AtomicU64::new(0));
        let (current, failed) = (acceptor.clone(), handshakes_failed.clone());
        let accepting = AcceptLoop::start("tls-terminator", listen, move |client| {
            let acceptor = current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let failed = failed.clone();
            async move {
                let Ok(mut tls) = acceptor.accept(client).await else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let Ok(mut server) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
            }
        })?;
        Ok(TlsTerminator {
            listen,
            acceptor,
            client_ca,
            handshakes_failed,
            _accepting: accepting,
        })
    }

    /// Presents `server`'s certificate to connections accepted from now on.
    pub fn present(&self, server: &Identity) -> anyhow::Result<()> {
        *self
            .acceptor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            acceptor(server, self.client_ca.as_deref())?;
        Ok(())
    }

    /// TLS handshakes that did not complete: a client that refused the certificate.
    pub fn handshakes_failed(&self) -> u64 {
        self.handshakes_failed.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for TlsTerminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTerminator")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

fn acceptor(server: &Identity, client_ca: Option<&str>) -> anyhow::Result<TlsAcceptor> {
    let chain = CertificateDer::pem_slice_iter(server.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("server certificate PEM")?;
    let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).context("server key PEM")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(cert.context("client CA PEM")?)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
