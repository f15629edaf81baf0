//! A minimal certificate authority so that a demo or a small install needs no openssl:
//! one CA, a relay certificate, and one client certificate per site whose DNS SAN is the
//! site's name (the identity the relay trusts, DESIGN.md).

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path} already exists; refusing to overwrite it (remove it first)")]
    Exists { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadInput { path: PathBuf, reason: String },
    #[error("invalid site name {name:?}: {reason}")]
    SiteName { name: String, reason: String },
    #[error("invalid relay name {name:?}: {reason}")]
    RelayName { name: String, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The files `pki init` writes into its output directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const RELAY_CERT: &str = "relay.pem";
pub const RELAY_KEY: &str = "relay.key";

/// A site name becomes a certificate DNS SAN and part of hub topic names, so it must be a
/// valid DNS name made of characters Kafka also allows in topic names.
pub fn validate_site_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1 to 63 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return Err("only lowercase letters, digits, '-' and '.' are allowed".into());
    }
    if name.starts_with(['-', '.']) || name.ends_with(['-', '.']) || name.contains("..") {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

/// Creates the CA and a relay certificate valid for `names` (DNS names or IP addresses).
pub fn init(out: &Path, names: &[String], validity: Duration) -> Result<(), PkiError> {
    let files = [CA_CERT, CA_KEY, RELAY_CERT, RELAY_KEY].map(|f| out.join(f));
    for path in &files {
        if path.exists() {
            return Err(PkiError::Exists { path: path.clone() });
        }
    }
    std::fs::create_dir_all(out).map_err(|source| PkiError::Write {
        path: out.to_owned(),
        source,
    })?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = common_name("spoke CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut ca_params, validity.saturating_mul(10));
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let relay_key = KeyPair::generate()?;
    let mut relay_params = CertificateParams::default();
    relay_params.distinguished_name = common_name("spoke relay");
    for name in names {
        relay_params.subject_alt_names.push(relay_san(name)?);
    }
    relay_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    relay_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    relay_params.use_authority_key_identifier_extension = true;
    set_validity(&mut relay_params, validity);
    let relay_cert = relay_params.signed_by(&relay_key, &ca_cert, &ca_key)?;

    let [ca_pem, ca_key_path, relay_pem, relay_key_path] = files;
    write_file(&ca_pem, ca_cert.pem().as_bytes(), 0o644)?;
    write_file(&ca_key_path, ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&relay_pem, relay_cert.pem().as_bytes(), 0o644)?;
    write_file(&relay_key_path, relay_key.serialize_pem().as_bytes(), 0o600)?;
    Ok(())
}

/// How to name an issued certificate in `tls.deny` should it ever be lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// `"sha256:<hex>"` of the certificate's DER.
    pub fingerprint: String,
    /// `"serial:<hex>"`.
    pub serial: String,
}

/// Issues `SITE.pem` / `SITE.key` into `out`, signed by the CA found in `ca_dir`.
pub fn issue(
    ca_dir: &Path,
    out: &Path,
    site: &str,
    validity: Duration,
) -> Result<Issued, PkiError> {
    validate_site_name(site).map_err(|reason| PkiError::SiteName {
        name: site.to_owned(),
        reason,
    })?;
    let cert_path = out.join(format!("{site}.pem"));
    let key_path = out.join(format!("{site}.key"));
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(PkiError::Exists { path: path.clone() });
        }
    }
    let ca_pem_path = ca_dir.join(CA_CERT);
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_pem = read(&ca_pem_path)?;
    let ca_key_pem = read(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::BadInput {
        path: ca_key_path.clone(),
        reason: e.to_string(),
    })?;
    let ca_params =
        CertificateParams::from_ca_cert_pem(&ca_pem).map_err(|e| PkiError::BadInput {
            path: ca_pem_path.clone(),
            reason: e.to_string(),
        })?;
    // Re-signing the parsed CA with its own key reproduces the issuer name and key identifier
    // that chain validation looks for; only the issued leaf is written out.
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let site_key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(site);
    params.subject_alt_names = vec![SanType::DnsName(site.try_into()?)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, validity);
    let cert = params.signed_by(&site_key, &ca_cert, &ca_key)?;

    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.der());
    // rcgen picks the serial; read it back from what was signed.
    let serial = x509_parser::parse_x509_certificate(cert.der())
        .map(|(_, parsed)| hex(parsed.tbs_certificate.raw_serial()))
        .map_err(|e| PkiError::BadInput {
            path: cert_path.clone(),
            reason: format!("issued certificate does not parse: {e}"),
        })?;
    let issued = Issued {
        fingerprint: format!("sha256:{}", hex(digest.as_ref())),
        serial: format!("serial:{serial}"),
    };

    std::fs::create_dir_all(out).map_err(|source| PkiError::Write {
        path: out.to_owned(),
        source,
    })?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    write_file(&key_path, site_key.serialize_pem().as_bytes(), 0o600)?;
    Ok(issued)
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

fn relay_san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let dns = name
        .try_into()
        .map_err(|e: rcgen::Error| PkiError::RelayName {
            name: name.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(SanType::DnsName(dns))
}

/// Backdated by an hour so that a peer whose clock runs slightly behind accepts a fresh cert.
fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    let validity = time::Duration::try_from(validity).unwrap_or(time::Duration::days(36500));
    params.not_after = now
        .checked_add(validity)
        .unwrap_or(now + time::Duration::days(36500));
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Creates the file with its final mode from the start, so a key is never readable by others,
/// not even for an instant.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_and_issue_write_pem_files_with_private_keys_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let year = Duration::from_secs(365 * 86400);
        init(dir.path(), &["localhost".into(), "127.0.0.1".into()], year).expect("init");
        let issued = issue(dir.path(), dir.path(), "branch-042", year).expect("issue");
        for (file, mode) in [
            ("ca.pem", 0o644),
            ("ca.key", 0o600),
            ("relay.pem", 0o644),
            ("relay.key", 0o600),
            ("branch-042.pem", 0o644),
            ("branch-042.key", 0o600),
        ] {
            let meta = std::fs::metadata(dir.path().join(file)).expect(file);
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
        }
        let site_pem = std::fs::read(dir.path().join("branch-042.pem")).expect("pem");
        let identity = crate::tls::site_identity_from_pem(&site_pem).expect("identity");
        assert_eq!(identity, "branch-042");
        // What `pki issue` prints is exactly what denies this certificate, by either name.
        let der = rustls_pki_types::CertificateDer::from_pem_slice(&site_pem).expect("der");
        for entry in [&issued.fingerprint, &issued.serial] {
            let deny = crate::deny::DenyList::parse(std::slice::from_ref(entry)).expect(entry);
            assert!(deny.denies(&der), "{entry} does not deny the certificate");
        }
    }

    #[test]
    fn init_refuses_to_overwrite_a_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let day = Duration::from_secs(86400);
        init(dir.path(), &["localhost".into()], day).expect("init");
        let err = init(dir.path(), &["localhost".into()], day).expect_err("second init");
        assert!(matches!(err, PkiError::Exists { .. }), "{err}");
    }

    #[test]
    fn site_names_must_be_dns_and_topic_safe() {
        assert!(validate_site_name("branch-042").is_ok());
        assert!(validate_site_name("eu.branch-1").is_ok());
        for bad in [
            "",
            "Branch",
            "a_b",
            "-a",
            "a.",
            "a..b",
            "a/b",
            &"x".repeat(64),
        ] {
            assert!(validate_site_name(bad).is_err(), "{bad:?}");
        }
    }
}
