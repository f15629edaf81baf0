//! Certificates and private keys from PEM files, with errors that name the file.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct PemError {
    pub path: PathBuf,
    pub reason: String,
}

/// Every certificate in the file, in order; an empty file is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let pem_err = |reason: String| PemError {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no PEM certificate in file".into()));
    }
    Ok(certs)
}

/// The first private key in the file. A key file that group or others may read (or write) is
/// refused: the key is what a site or the relay is, and a copy taken by another local user
/// would stay valid until the certificate expires.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    check_key_mode(path)?;
    // The parse error carries no key material, only the file's position and PEM section kind.
    PrivateKeyDer::from_pem_file(path).map_err(|e| PemError {
        path: path.to_owned(),
        reason: format!("no usable private key: {e}"),
    })
}

fn check_key_mode(path: &Path) -> Result<(), PemError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| PemError {
            path: path.to_owned(),
            reason: e.to_string(),
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(PemError {
            path: path.to_owned(),
            reason: format!(
                "private key is accessible to group or others (mode {:04o}); run `chmod 600 {}` \
                 so that only its owner can read it",
                mode & 0o7777,
                path.display()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A PKCS#8 Ed25519 key with an arbitrary seed, used nowhere else.
    const KEY: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIBvD4kX0oCsmnTp2Y2VkQ1zQzGO9n2aFSm1ySffSDm7x
-----END PRIVATE KEY-----
";

    fn key_file(mode: u32) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("site.key");
        std::fs::write(&path, KEY).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        (dir, path)
    }

    #[test]
    fn owner_only_key_loads_and_its_debug_output_hides_it() {
        for mode in [0o600, 0o400] {
            let (_dir, path) = key_file(mode);
            let key = load_key(&path).expect("owner-only key loads");
            // The DER starts 0x30 0x2e (48, 46): no byte of it may reach a log line.
            let debug = format!("{key:?}");
            assert!(!debug.contains("48, 46"), "{debug}");
            assert!(debug.contains("elided"), "{debug}");
        }
    }

    #[test]
    fn key_readable_by_group_or_others_is_refused_with_the_fix() {
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            let (_dir, path) = key_file(mode);
            let err = load_key(&path).expect_err("refused").to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(
                err.contains(&format!("chmod 600 {}", path.display())),
                "{err}"
            );
            assert!(err.contains(&format!("{mode:04o}")), "{err}");
            assert!(
                !err.contains("MC4CAQAw"),
                "key material in the error: {err}"
            );
        }
    }

    #[test]
    fn errors_do_not_echo_the_key() {
        let (_dir, path) = key_file(0o600);
        let mut text = std::fs::read_to_string(&path).expect("read");
        text = text.replace("BEGIN PRIVATE KEY", "BEGIN PRIVATE KEZ");
        std::fs::write(&path, text).expect("write");
        let err = load_key(&path).expect_err("no key").to_string();
        assert!(!err.contains("MC4CAQAw"), "{err}");
        assert!(err.contains("no usable private key"), "{err}");
    }
}
