//! `check` against a Kafka cluster: connect and authenticate as the service would, and when
//! that fails, say why in terms an operator can act on. librdkafka reports every certificate
//! problem as "certificate verify failed", so a TLS failure is diagnosed again with a
//! handshake of our own against the configured CA, which tells a foreign CA, an expired
//! certificate and a wrong host name apart.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError};
use rustls_pki_types::pem::PemObject;

use crate::security::{KafkaProperties, KafkaTls};

/// How long the diagnosis waits, after its handshake, for the broker to refuse the client's
/// certificate.
const REFUSAL_WAIT: Duration = Duration::from_millis(1500);

/// One line of `check`'s report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    /// What was checked, e.g. `hub 10.0.0.5:9093`.
    pub subject: String,
    pub finding: String,
    /// What to change, for a failure.
    pub fix: Option<String>,
}

impl Verdict {
    pub fn ok(subject: impl Into<String>, finding: impl Into<String>) -> Verdict {
        Verdict {
            ok: true,
            subject: subject.into(),
            finding: finding.into(),
            fix: None,
        }
    }

    pub fn failed(
        subject: impl Into<String>,
        finding: impl Into<String>,
        fix: impl Into<String>,
    ) -> Verdict {
        Verdict {
            ok: false,
            subject: subject.into(),
            finding: finding.into(),
            fix: Some(fix.into()),
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = if self.ok { "ok  " } else { "FAIL" };
        write!(f, "{mark} {}: {}", self.subject, self.finding)?;
        if let Some(fix) = &self.fix {
            write!(f, "; fix: {fix}")?;
        }
        Ok(())
    }
}

/// Collects what librdkafka says while `check` waits, instead of logging it.
#[derive(Default)]
struct Heard {
    lines: Mutex<Vec<String>>,
}

/// librdkafka repeats a failing connection's reason every retry: the first ones say it.
const HEARD_MAX_LINES: usize = 64;

impl Heard {
    fn push(&self, line: String) {
        let mut lines = self
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if lines.len() < HEARD_MAX_LINES {
            lines.push(line);
        }
    }

    fn all(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .join("\n")
    }
}

struct Listening(Arc<Heard>);

impl ClientContext for Listening {
    fn log(&self, level: RDKafkaLogLevel, _fac: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            self.0.push(message.to_owned());
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.0.push(format!("{error}: {reason}"));
    }
}

impl ConsumerContext for Listening {}

/// Connects to the cluster at `bootstrap` with `properties` (as the service would) and asks
/// for its metadata; `tls` is the `[*.tls]` table, for diagnosing a refused certificate.
/// `subject` names the cluster in the verdict, e.g. "hub".
pub fn check_cluster(
    subject: &str,
    bootstrap: &str,
    properties: &KafkaProperties,
    tls: Option<&KafkaTls>,
    timeout: Duration,
) -> Verdict {
    let subject = format!("{subject} {bootstrap}");
    let heard = Arc::new(Heard::default());
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    for (key, value) in properties.iter() {
        config.set(key, value);
    }
    config.set("client.id", "spoke-check");
    let consumer: BaseConsumer<Listening> =
        match config.create_with_context(Listening(heard.clone())) {
            Ok(consumer) => consumer,
            Err(error) => {
                return Verdict::failed(
                    subject,
                    format!("librdkafka refuses the settings: {error}"),
                    "correct the [*.kafka] property it names",
                )
            }
        };
    let protocol = properties.get("security.protocol").unwrap_or("plaintext");
    let who = match (
        properties.get("sasl.mechanism"),
        properties.get("sasl.username"),
    ) {
        (Some(mechanism), Some(user)) => format!(", {mechanism} as {user}"),
        (Some(mechanism), None) => format!(", {mechanism}"),
        _ => String::new(),
    };
    match consumer.fetch_metadata(None, timeout) {
        Ok(metadata) => Verdict::ok(
            subject,
            format!(
                "{} broker(s) answered ({protocol}{who})",
                metadata.brokers().len()
            ),
        ),
        Err(error) => {
            // librdkafka queues its log lines and errors for the client's poll (rust-rdkafka
            // sets log.queue): serving that queue is what lets them reach `Listening`.
            for _ in 0..5 {
                if consumer.poll(Duration::from_millis(50)).is_some() {
                    break;
                }
            }
            let heard = format!("{}\n{error}", heard.all());
            classify(&subject, bootstrap, &heard, protocol, &who, tls, timeout)
        }
    }
}

fn classify(
    subject: &str,
    bootstrap: &str,
    heard: &str,
    protocol: &str,
    who: &str,
    tls: Option<&KafkaTls>,
    timeout: Duration,
) -> Verdict {
    let said = |needle: &str| heard.to_ascii_lowercase().contains(needle);
    if said("ssl handshake failed")
        || said("certificate verify failed")
        || said("certificate required")
        || said("ssl transport error")
    {
        let first = bootstrap.split(',').next().unwrap_or(bootstrap).trim();
        return match tls {
            Some(tls) => diagnose_tls(subject, first, tls, timeout),
            None => Verdict::failed(
                subject,
                "TLS handshake failed",
                "configure the [*.tls] table",
            ),
        };
    }
    if said("oauthbearer token") {
        let detail = heard
            .lines()
            .find(|l| l.to_ascii_lowercase().contains("oauthbearer token"))
            .map(|l| l.chars().take(300).collect::<String>())
            .unwrap_or_default();
        return Verdict::failed(
            subject,
            format!(
                "no OAUTHBEARER token from the token endpoint ({})",
                detail.trim()
            ),
            "check sasl.token_endpoint, client_id and the client secret (client_secret_file, \
             or the environment variable it names), and that the identity provider knows this \
             client",
        );
    }
    if said("authentication") || (said("sasl") && said("failed")) {
        return Verdict::failed(
            subject,
            format!("authentication refused{who}"),
            "check sasl.username and the password (password_file, or the environment \
             variable it names), and that the broker knows this user for this mechanism",
        );
    }
    if said("disconnected while requesting apiversion")
        || said("unsupported protocol")
        || said("wrong version number")
    {
        return Verdict::failed(
            subject,
            format!("the broker does not speak {protocol} on this port"),
            "match the [*.tls]/[*.sasl] tables to the listener at this address",
        );
    }
    let last = heard
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no answer");
    Verdict::failed(
        subject,
        format!(
            "unreachable: no broker answered within {} s ({last})",
            timeout.as_secs()
        ),
        "check bootstrap (host and port), DNS, firewalls, and that the broker runs",
    )
}

/// Why a broker's certificate does not verify against `tls`, from a handshake of our own.
fn diagnose_tls(subject: &str, address: &str, tls: &KafkaTls, timeout: Duration) -> Verdict {
    let ca_text = tls
        .ca_file
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "the system's CAs".to_owned());
    let presents_cert = client_identity(tls).is_some();
    let failure = match handshake(address, tls, timeout) {
        Ok(()) if tls.ca_file.is_none() => {
            return Verdict::failed(
                subject,
                "the broker's certificate does not verify against the system's CAs",
                "set tls.ca_file to the CA that signed the brokers' certificates",
            )
        }
        Ok(()) => {
            return Verdict::failed(
                subject,
                "TLS handshake failed, though the broker's certificate verifies against \
                 tls.ca_file (a client certificate the broker refuses?)",
                "check tls.cert_file and tls.key_file against the broker's trusted CAs",
            )
        }
        Err(failure) => failure,
    };
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    match failure {
        TlsFailure::Certificate(CertificateError::UnknownIssuer)
        | TlsFailure::Certificate(CertificateError::BadSignature) => Verdict::failed(
            subject,
            format!("the broker's certificate is not signed by a CA in {ca_text}"),
            "set tls.ca_file to the CA that signed the brokers' certificates",
        ),
        TlsFailure::Certificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => Verdict::failed(
            subject,
            "the broker's certificate has expired",
            "renew the broker's certificate (and check this host's clock)",
        ),
        TlsFailure::Certificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => Verdict::failed(
            subject,
            "the broker's certificate is not valid yet",
            "check this host's clock and the broker's certificate",
        ),
        TlsFailure::Certificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) if tls.verify_hostname => Verdict::failed(
            subject,
            format!("the broker's certificate does not name {host}"),
            "connect by a name the certificate holds (bootstrap and the brokers' advertised \
             listeners), or set tls.verify_hostname = false (anyone with a certificate from \
             the CA could then pose as the broker)",
        ),
        TlsFailure::Certificate(other) => Verdict::failed(
            subject,
            format!("the broker's certificate is refused: {other}"),
            "check the broker's certificate and tls.ca_file",
        ),
        TlsFailure::Refused(AlertDescription::CertificateRequired) if tls.cert_file.is_none() => {
            Verdict::failed(
                subject,
                "the broker requires a client certificate (mutual TLS), and none is configured",
                "set tls.cert_file and tls.key_file to this client's certificate and key, \
                 issued by a CA the broker trusts",
            )
        }
        TlsFailure::Refused(AlertDescription::CertificateRequired) if !presents_cert => {
            Verdict::failed(
                subject,
                "the broker requires a client certificate; check cannot present tls.cert_file \
                 itself (an encrypted or unreadable key), so whether the broker takes it is not \
                 known",
                "check that tls.cert_file is issued by a CA the broker trusts for clients and \
                 is current, and that tls.key_file and its password are right",
            )
        }
        TlsFailure::Refused(AlertDescription::CertificateExpired) if presents_cert => {
            Verdict::failed(
                subject,
                "the broker refuses this client's certificate: it has expired",
                "renew the certificate in tls.cert_file (and check this host's clock)",
            )
        }
        TlsFailure::Refused(alert) if presents_cert => Verdict::failed(
            subject,
            format!("the broker refuses this client's certificate ({alert:?})"),
            "tls.cert_file must be issued by a CA the broker trusts for clients, be current, \
             and tls.key_file must be its key",
        ),
        TlsFailure::Refused(alert) => Verdict::failed(
            subject,
            format!("the broker ended the TLS handshake ({alert:?})"),
            "check that the broker's listener at this address is the one meant for this \
             client, and its TLS settings",
        ),
        TlsFailure::CaFile(reason) => Verdict::failed(
            subject,
            format!("tls.ca_file: {reason}"),
            "point tls.ca_file at a PEM file of CA certificates",
        ),
        TlsFailure::Other(reason) => Verdict::failed(
            subject,
            format!("TLS handshake failed: {reason}"),
            "check that the broker speaks TLS on this port, and tls.ca_file",
        ),
    }
}

enum TlsFailure {
    Certificate(CertificateError),
    /// The broker sent this alert: it refused the client (certificate missing or refused).
    Refused(AlertDescription),
    CaFile(String),
    Other(String),
}

/// The client certificate and key `tls` names, as rustls takes them; `None` where there are
/// none, or the key is encrypted (rustls reads no encrypted keys: the diagnosis then goes
/// without a client certificate).
fn client_identity(
    tls: &KafkaTls,
) -> Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    if tls.key_password.is_some() || tls.key_password_file.is_some() {
        return None;
    }
    let chain = CertificateDer::pem_file_iter(tls.cert_file.as_deref()?)
        .ok()?
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let key = PrivateKeyDer::from_pem_file(tls.key_file.as_deref()?).ok()?;
    Some((chain, key))
}

/// Waits briefly for what the broker says after the client's last handshake message: under
/// TLS 1.3 a refused client certificate is an alert that comes only then.
fn refusal(
    connection: &mut rustls::ClientConnection,
    socket: &mut TcpStream,
) -> Option<AlertDescription> {
    socket.set_read_timeout(Some(REFUSAL_WAIT)).ok()?;
    loop {
        match connection.complete_io(socket) {
            Ok((0, 0)) => return None,
            Ok(_) => {}
            Err(error) => {
                return match error
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                {
                    Some(rustls::Error::AlertReceived(alert)) => Some(*alert),
                    _ => None,
                }
            }
        }
    }
}

fn handshake(address: &str, tls: &KafkaTls, timeout: Duration) -> Result<(), TlsFailure> {
    let other = |e: &dyn std::fmt::Display| TlsFailure::Other(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca_file) = tls.ca_file.as_deref() {
        let pems = CertificateDer::pem_file_iter(ca_file)
            .map_err(|e| TlsFailure::CaFile(e.to_string()))?;
        for cert in pems {
            let cert = cert.map_err(|e| TlsFailure::CaFile(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| TlsFailure::CaFile(e.to_string()))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| other(&e))?
    .with_root_certificates(roots);
    // As the client would present itself, so that the broker's verdict on its certificate
    // shows too.
    let config = match client_identity(tls) {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| other(&e))?,
        None => builder.with_no_client_auth(),
    };
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned()).map_err(|e| other(&e))?;
    let mut connection =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| other(&e))?;
    let socket_address = address
        .to_socket_addrs()
        .map_err(|e| other(&e))?
        .next()
        .ok_or_else(|| TlsFailure::Other(format!("{address} resolves to nothing")))?;
    let mut socket = TcpStream::connect_timeout(&socket_address, timeout).map_err(|e| other(&e))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| other(&e))?;
    while connection.is_handshaking() {
        match connection.complete_io(&mut socket) {
            Ok(_) => {}
            Err(error) => {
                return Err(
                    match error
                        .get_ref()
                        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    {
                        Some(rustls::Error::InvalidCertificate(certificate)) => {
                            TlsFailure::Certificate(certificate.clone())
                        }
                        Some(rustls::Error::AlertReceived(alert)) => TlsFailure::Refused(*alert),
                        _ => TlsFailure::Other(error.to_string()),
                    },
                )
            }
        }
    }
    if let Some(alert) = refusal(&mut connection, &mut socket) {
        return Err(TlsFailure::Refused(alert));
    }
    // Close politely; the broker behind it needs nothing from us.
    connection.send_close_notify();
    let _ = connection.complete_io(&mut socket);
    let _ = socket.flush();
    let mut rest = [0u8; 1];
    let _ = socket.read(&mut rest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_read_as_one_line_each() {
        let ok = Verdict::ok("hub h:9093", "1 broker(s) answered (SSL)");
        assert_eq!(
            ok.to_string(),
            "ok   hub h:9093: 1 broker(s) answered (SSL)"
        );
        let failed = Verdict::failed("hub h:9093", "authentication refused", "check it");
        assert_eq!(
            failed.to_string(),
            "FAIL hub h:9093: authentication refused; fix: check it"
        );
    }

    #[test]
    fn what_librdkafka_said_is_classified() {
        let verdict = |heard: &str| {
            classify(
                "hub h:1",
                "h:1",
                heard,
                "SASL_PLAINTEXT",
                ", SCRAM-SHA-512 as r",
                None,
                Duration::from_secs(10),
            )
            .finding
        };
        assert!(verdict(
            "SASL authentication error: SASL SCRAM authentication failed: broker responded with invalid-proof"
        )
        .starts_with("authentication refused, SCRAM-SHA-512 as r"));
        assert!(
            verdict("Connect to ipv4#127.0.0.1:1 failed: Connection refused")
                .starts_with("unreachable")
        );
        assert_eq!(
            verdict("SSL handshake failed: certificate verify failed"),
            "TLS handshake failed"
        );
        assert!(verdict(
            "Local: Authentication failure: Failed to acquire SASL OAUTHBEARER token: HTTP 401"
        )
        .starts_with("no OAUTHBEARER token from the token endpoint"));
    }
}
