//! The relay's TLS setup against real QUIC handshakes on loopback: which certificates get in,
//! and which rejection reason each refusal is counted under.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use spoke_relay::config::{LimitsConfig, TlsConfig};
use spoke_relay::deny::DenyList;
use spoke_relay::fleet::reject;
use spoke_relay::tls::{handshake_reject_reason, server_config};
use time::OffsetDateTime;

/// A CA made by `spoke-relay pki init`, plus a second, unrelated one.
struct Pki {
    dir: tempfile::TempDir,
    other: tempfile::TempDir,
}

/// A client certificate and its key, PEM.
struct Identity {
    cert: String,
    key: String,
}

const DAY: Duration = Duration::from_secs(86400);

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = tempfile::tempdir().expect("tempdir");
        let names = ["localhost".to_owned()];
        spoke_relay::pki::init(dir.path(), &names, DAY).expect("pki init");
        spoke_relay::pki::init(other.path(), &names, DAY).expect("pki init other");
        Pki { dir, other }
    }

    fn tls(&self, deny: &[&str]) -> (TlsConfig, DenyList) {
        let deny: Vec<String> = deny.iter().map(|d| (*d).to_owned()).collect();
        let list = DenyList::parse(&deny).expect("deny list");
        let tls = TlsConfig {
            cert: self.dir.path().join("relay.pem"),
            key: self.dir.path().join("relay.key"),
            client_ca: self.dir.path().join("ca.pem"),
            deny,
        };
        (tls, list)
    }

    /// A site certificate signed by the CA in `ca_dir`, valid from `from` to `until` (seconds
    /// relative to now), with the given serial.
    fn issue(ca_dir: &Path, site: &str, from: i64, until: i64, serial: &[u8]) -> Identity {
        let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).expect("ca.pem");
        let ca_key_pem = std::fs::read_to_string(ca_dir.join("ca.key")).expect("ca.key");
        let ca_key = KeyPair::from_pem(&ca_key_pem).expect("ca key");
        let ca_cert = CertificateParams::from_ca_cert_pem(&ca_pem)
            .expect("ca params")
            .self_signed(&ca_key)
            .expect("ca cert");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, site);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(site.try_into().expect("dns"))];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(serial));
        let now = OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(until);
        let cert = params
            .signed_by(&key, &ca_cert, &ca_key)
            .expect("sign site cert");
        Identity {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn site(&self, serial: &[u8]) -> Identity {
        Self::issue(self.dir.path(), "branch-042", -3600, 86400, serial)
    }
}

/// Starts a relay endpoint with `tls` and returns its address plus a channel of each
/// handshake's outcome: `Ok(())` or the rejection reason.
fn relay(
    tls: &TlsConfig,
    deny: &DenyList,
) -> (
    quinn::Endpoint,
    SocketAddr,
    tokio::sync::mpsc::Receiver<Result<(), &'static str>>,
) {
    let config = server_config(tls, deny, &LimitsConfig::default()).expect("server config");
    let endpoint =
        quinn::Endpoint::server(config, "127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = endpoint.local_addr().expect("local addr");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let accepting = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            let outcome = match incoming.await {
                Ok(connection) => {
                    // Hold the connection until the client is done with it.
                    tokio::spawn(async move { connection.closed().await });
                    Ok(())
                }
                Err(error) => Err(handshake_reject_reason(&error)),
            };
            if tx.send(outcome).await.is_err() {
                return;
            }
        }
    });
    (endpoint, addr, rx)
}

fn client(ca_dir: &Path, identity: Option<&Identity>, alpn: &[u8]) -> quinn::Endpoint {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = CertificateDer::from_pem_file(ca_dir.join("ca.pem")).expect("ca pem");
    roots.add(ca).expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots);
    let mut crypto = match identity {
        Some(identity) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(identity.cert.as_bytes()).expect("cert")],
                PrivateKeyDer::from_pem_slice(identity.key.as_bytes()).expect("key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    crypto.alpn_protocols = vec![alpn.to_vec()];
    let quic = QuicClientConfig::try_from(crypto).expect("quic client");
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client bind");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    endpoint
}

/// Dials the relay and returns the relay's verdict on the handshake.
async fn attempt(
    relay_ca: &Path,
    addr: SocketAddr,
    identity: Option<&Identity>,
    outcomes: &mut tokio::sync::mpsc::Receiver<Result<(), &'static str>>,
) -> Result<(), &'static str> {
    attempt_with_alpn(relay_ca, addr, identity, spoke_proto::ALPN, outcomes).await
}

async fn attempt_with_alpn(
    relay_ca: &Path,
    addr: SocketAddr,
    identity: Option<&Identity>,
    alpn: &[u8],
    outcomes: &mut tokio::sync::mpsc::Receiver<Result<(), &'static str>>,
) -> Result<(), &'static str> {
    let endpoint = client(relay_ca, identity, alpn);
    // The client may believe it is connected before the relay has judged its certificate
    // (TLS 1.3 sends it last), so the verdict that counts is the relay's.
    let connecting = endpoint.connect(addr, "localhost").expect("connect");
    let client_side = tokio::spawn(async move {
        if let Ok(connection) = connecting.await {
            connection.closed().await;
        }
    });
    let outcome = tokio::time::timeout(Duration::from_secs(10), outcomes.recv())
        .await
        .expect("the relay judged the handshake within 10 s")
        .expect("relay running");
    endpoint.close(0u32.into(), b"done");
    client_side.abort();
    outcome
}

#[tokio::test]
async fn each_refused_certificate_is_counted_under_its_own_reason() {
    let pki = Pki::new();
    let ca = pki.dir.path();
    let (tls, deny) = pki.tls(&[]);
    let (_relay, addr, mut outcomes) = relay(&tls, &deny);

    let good = pki.site(&[1]);
    assert_eq!(attempt(ca, addr, Some(&good), &mut outcomes).await, Ok(()));
    assert_eq!(
        attempt(ca, addr, None, &mut outcomes).await,
        Err(reject::NO_CERT)
    );
    let stranger = Pki::issue(pki.other.path(), "branch-042", -3600, 86400, &[2]);
    assert_eq!(
        attempt(ca, addr, Some(&stranger), &mut outcomes).await,
        Err(reject::UNKNOWN_CA)
    );
    // Validity ended a minute ago: `pki issue --valid-for` certificates end exactly so.
    let expired = Pki::issue(ca, "branch-042", -7200, -60, &[3]);
    assert_eq!(
        attempt(ca, addr, Some(&expired), &mut outcomes).await,
        Err(reject::EXPIRED)
    );
    assert_eq!(
        attempt_with_alpn(ca, addr, Some(&good), b"not-spoke", &mut outcomes).await,
        Err(reject::HANDSHAKE)
    );
}

#[tokio::test]
async fn denied_certificates_are_refused_by_fingerprint_or_serial_and_others_still_get_in() {
    let pki = Pki::new();
    let ca = pki.dir.path();
    let by_fingerprint = pki.site(&[0x0a, 0x0b]);
    let by_serial = pki.site(&[0x0c, 0x0d, 0x0e]);
    let untouched = pki.site(&[0x0f]);
    let der = CertificateDer::from_pem_slice(by_fingerprint.cert.as_bytes()).expect("der");
    // Written as openssl prints it: upper case, colon separated.
    let fingerprint = ring::digest::digest(&ring::digest::SHA256, &der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    let (tls, deny) = pki.tls(&[&format!("sha256:{fingerprint}"), "serial:0C0D0E"]);
    assert_eq!(deny.len(), 2);
    let (_relay, addr, mut outcomes) = relay(&tls, &deny);

    assert_eq!(
        attempt(ca, addr, Some(&by_fingerprint), &mut outcomes).await,
        Err(reject::DENIED)
    );
    assert_eq!(
        attempt(ca, addr, Some(&by_serial), &mut outcomes).await,
        Err(reject::DENIED)
    );
    assert_eq!(
        attempt(ca, addr, Some(&untouched), &mut outcomes).await,
        Ok(())
    );
}

#[tokio::test]
async fn a_new_server_config_denies_new_handshakes_and_keeps_open_connections() {
    let pki = Pki::new();
    let ca = pki.dir.path();
    let site = pki.site(&[0x42]);
    let (tls, deny) = pki.tls(&[]);
    let (relay_endpoint, addr, mut outcomes) = relay(&tls, &deny);

    let endpoint = client(ca, Some(&site), spoke_proto::ALPN);
    let open = endpoint
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("connected");
    assert_eq!(outcomes.recv().await, Some(Ok(())));

    // What the relay does on SIGHUP with `deny = ["serial:42"]`.
    let (tls, deny) = pki.tls(&["serial:42"]);
    relay_endpoint.set_server_config(Some(
        server_config(&tls, &deny, &LimitsConfig::default()).expect("reloaded config"),
    ));
    assert_eq!(
        attempt(ca, addr, Some(&site), &mut outcomes).await,
        Err(reject::DENIED)
    );
    assert!(
        open.close_reason().is_none(),
        "the connection made before the reload is still open"
    );
    let (mut stream, _) = open.open_bi().await.expect("stream on the old connection");
    stream.write_all(b"still here").await.expect("write");
}
