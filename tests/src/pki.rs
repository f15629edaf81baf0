//! Certificates the `spoke-relay pki` commands will not make: from a foreign CA, expired,
//! a second CA for rotation. Made with rcgen like `pki` does, so they differ from real site
//! certificates only in the property a test is about.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Identity {
    /// Reads a `NAME.pem` / `NAME.key` pair as `pki issue` writes it.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Identity> {
        Ok(Identity {
            cert_pem: std::fs::read_to_string(cert)
                .with_context(|| format!("reading {}", cert.display()))?,
            key_pem: std::fs::read_to_string(key)
                .with_context(|| format!("reading {}", key.display()))?,
        })
    }

    /// DER of the (first) certificate.
    pub fn der(&self) -> anyhow::Result<Vec<u8>> {
        Ok(CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .context("certificate PEM")?
            .to_vec())
    }

    /// Lowercase hex SHA-256 of the certificate's DER: the fingerprint deny lists name.
    pub fn sha256_hex(&self) -> anyhow::Result<String> {
        Ok(hex(ring::digest::digest(
            &ring::digest::SHA256,
            &self.der()?,
        )
        .as_ref()))
    }

    /// Writes `dir/NAME.pem` and `dir/NAME.key` (0600, as the relay insists on for keys).
    pub fn write(&self, dir: &Path, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        replace_file(&cert, self.cert_pem.as_bytes(), 0o644)?;
        replace_file(&key, self.key_pem.as_bytes(), 0o600)?;
        Ok((cert, key))
    }
}

/// Writes `path` atomically (temporary file, then rename) with `mode`, so a process that
/// re-reads it on SIGHUP never sees half a file.
pub fn replace_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp-rotate");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))?;
    Ok(())
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// Valid from an hour ago for a day.
    pub fn current() -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(1),
        }
    }

    /// Valid for one day that ended yesterday.
    pub fn expired() -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::days(2),
            not_after: now - Duration::days(1),
        }
    }
}

/// A certificate authority that can issue site (client) and relay (server) certificates.
pub struct Authority {
    key: KeyPair,
    cert: rcgen::Certificate,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

impl Authority {
    /// A new CA, unrelated to any other.
    pub fn new(name: &str) -> anyhow::Result<Authority> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let validity = Validity::current();
        params.not_before = validity.not_before;
        params.not_after = validity.not_after + Duration::days(30);
        let cert = params.self_signed(&key)?;
        Ok(Authority { key, cert })
    }

    /// The CA in `ca.pem` / `ca.key` as `spoke-relay pki init` wrote them.
    pub fn load(ca_pem: &Path, ca_key: &Path) -> anyhow::Result<Authority> {
        let pem = std::fs::read_to_string(ca_pem)?;
        let key = KeyPair::from_pem(&std::fs::read_to_string(ca_key)?)
            .with_context(|| format!("CA key {}", ca_key.display()))?;
        // Re-signing the parsed CA with its own key reproduces the subject and key identifier
        // that chain validation matches; only certificates it issues leave this process.
        let cert = CertificateParams::from_ca_cert_pem(&pem)
            .with_context(|| format!("CA certificate {}", ca_pem.display()))?
            .self_signed(&key)?;
        Ok(Authority { key, cert })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A site certificate: DNS SAN `site`, client auth, `validity`, a given serial.
    pub fn issue_site(
        &self,
        site: &str,
        validity: Validity,
        serial: u64,
    ) -> anyhow::Result<Identity> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(site);
        params.subject_alt_names = vec![SanType::DnsName(site.try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from(serial.to_be_bytes().to_vec()));
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A relay certificate for `localhost` and 127.0.0.1, with `label` as its common name so
    /// a test can tell two of them apart.
    pub fn issue_relay(&self, label: &str) -> anyhow::Result<Identity> {
        self.issue_server(label, &["localhost"], true, Validity::current())
    }

    /// A server certificate (a relay's, a broker's behind a TLS terminator) for the DNS names
    /// `names`, and 127.0.0.1 with `loopback_ip`.
    pub fn issue_server(
        &self,
        label: &str,
        names: &[&str],
        loopback_ip: bool,
        validity: Validity,
    ) -> anyhow::Result<Identity> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(label);
        for name in names {
            params
                .subject_alt_names
                .push(SanType::DnsName((*name).try_into()?));
        }
        if loopback_ip {
            params
                .subject_alt_names
                .push(SanType::IpAddress([127, 0, 0, 1].into()));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
