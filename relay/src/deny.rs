//! The certificates `tls.deny` refuses although they chain to the client CA (a lost or
//! compromised site certificate, until it expires), by fingerprint or serial number.

use std::collections::BTreeSet;

/// Certificates refused although they chain to the client CA: a lost or compromised site
/// certificate, until it expires.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DenyList {
    sha256: BTreeSet<[u8; 32]>,
    /// Big-endian serial numbers without leading zero bytes.
    serials: BTreeSet<Vec<u8>>,
}

impl DenyList {
    /// Parses `tls.deny`: `"sha256:<64 hex digits>"` (the SHA-256 of the certificate's DER, as
    /// `openssl x509 -fingerprint -sha256` prints it) or `"serial:<hex>"` (as
    /// `openssl x509 -serial` prints it). Case, `:` separators and leading zeros of a serial do
    /// not matter.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut deny = DenyList::default();
        for entry in entries {
            let (kind, hex) = entry.split_once(':').ok_or_else(|| {
                format!("{entry:?}: expected \"sha256:<hex>\" or \"serial:<hex>\"")
            })?;
            let bytes = parse_hex(hex).map_err(|reason| format!("{entry:?}: {reason}"))?;
            match kind.trim().to_ascii_lowercase().as_str() {
                "sha256" => {
                    let digest: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
                        format!(
                            "{entry:?}: a SHA-256 fingerprint has 32 bytes, not {}",
                            b.len()
                        )
                    })?;
                    deny.sha256.insert(digest);
                }
                "serial" => {
                    let serial = strip_leading_zeros(&bytes);
                    if serial.is_empty() || serial.len() > 20 {
                        return Err(format!(
                            "{entry:?}: a serial number has 1 to 20 significant bytes"
                        ));
                    }
                    deny.serials.insert(serial.to_vec());
                }
                other => {
                    return Err(format!(
                        "{entry:?}: unknown kind {other:?}; use sha256 or serial"
                    ))
                }
            }
        }
        Ok(deny)
    }

    pub fn len(&self) -> usize {
        self.sha256.len() + self.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the DER certificate is on the list. A certificate that cannot be parsed is only
    /// matched by fingerprint; the chain verifier refuses it anyway.
    pub fn denies(&self, der: &[u8]) -> bool {
        if self.is_empty() {
            return false;
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        if <[u8; 32]>::try_from(digest.as_ref()).is_ok_and(|d| self.sha256.contains(&d)) {
            return true;
        }
        if self.serials.is_empty() {
            return false;
        }
        x509_parser::parse_x509_certificate(der).is_ok_and(|(_, cert)| {
            self.serials
                .contains(strip_leading_zeros(cert.tbs_certificate.raw_serial()))
        })
    }
}

fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|b| !matches!(b, b':' | b' '))
        .map(|b| match b {
            b'0'..=b'9' => Ok(b - b'0'),
            b'a'..=b'f' => Ok(b - b'a' + 10),
            b'A'..=b'F' => Ok(b - b'A' + 10),
            _ => Err(format!("{:?} is not a hex digit", char::from(b))),
        })
        .collect::<Result<_, _>>()?;
    if digits.is_empty() {
        return Err("no hex digits".into());
    }
    // An odd count is a serial printed without its leading zero.
    let pad = usize::from(digits.len() % 2 == 1);
    let mut bytes = vec![0u8; (digits.len() + pad) / 2];
    for (i, d) in digits.iter().enumerate() {
        let pos = i + pad;
        bytes[pos / 2] |= if pos % 2 == 0 { d << 4 } else { *d };
    }
    Ok(bytes)
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}
