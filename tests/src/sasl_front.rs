//! A SASL authenticator in front of a broker, for the mechanisms tansu 0.6 cannot check:
//! its SASL library is built without PLAIN, and its OAUTHBEARER refuses every token. It
//! speaks Kafka's own SaslHandshake (v0–v1) and SaslAuthenticate (v0–v2) to the client,
//! checks PLAIN credentials or an OAUTHBEARER bearer token (RFC 7628), and once the client
//! is authenticated forwards the connection to the broker as it is. Before that it forwards
//! ApiVersions only, as a Kafka broker allows; anything else closes the connection. Put a
//! [`crate::tls_terminator::TlsTerminator`] in front of it for SASL_SSL.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::accept_loop::AcceptLoop;

const API_VERSIONS: i16 = 18;
const SASL_HANDSHAKE: i16 = 17;
const SASL_AUTHENTICATE: i16 = 36;
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
const SASL_AUTHENTICATION_FAILED: i16 = 58;
/// Larger requests before authentication are refused, as brokers bound them.
const MAX_UNAUTHENTICATED_FRAME: usize = 64 * 1024;

/// Who may connect: each a mechanism with the secret it must present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Plain {
        user: String,
        password: String,
    },
    /// A bearer token exactly as the token endpoint issued it.
    Bearer {
        token: String,
    },
}

impl Credential {
    fn mechanism(&self) -> &'static str {
        match self {
            Credential::Plain { .. } => "PLAIN",
            Credential::Bearer { .. } => "OAUTHBEARER",
        }
    }
}

/// The authenticator; it stops (and drops its connections) when dropped.
pub struct SaslFront {
    pub listen: SocketAddr,
    counts: Arc<Counts>,
    _accepting: AcceptLoop,
}

#[derive(Default)]
struct Counts {
    accepted: AtomicU64,
    refused: AtomicU64,
}

impl SaslFront {
    /// Listens on `listen` and forwards authenticated connections to `target`.
    pub fn start(
        listen: SocketAddr,
        target: SocketAddr,
        credentials: Vec<Credential>,
    ) -> anyhow::Result<SaslFront> {
        let counts = Arc::new(Counts::default());
        let credentials = Arc::new(credentials);
        let counting = counts.clone();
        let accepting = AcceptLoop::start("sasl-front", listen, move |client| {
            let (counts, credentials) = (counting.clone(), credentials.clone());
            async move {
                let _ = serve(client, target, &credentials, &counts).await;
            }
        })?;
        Ok(SaslFront {
            listen,
            counts,
            _accepting: accepting,
        })
    }

    /// Authentications that succeeded.
    pub fn accepted(&self) -> u64 {
        self.counts.accepted.load(Ordering::Relaxed)
    }

    /// Authentications refused (wrong secret, or a mechanism not offered).
    pub fn refused(&self) -> u64 {
        self.counts.refused.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for SaslFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaslFront")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// One client connection: the SASL exchange here, then the broker's.
async fn serve(
    mut client: TcpStream,
    target: SocketAddr,
    credentials: &[Credential],
    counts: &Counts,
) -> anyhow::Result<()> {
    let mut broker = TcpStream::connect(target).await?;
    let mut mechanism: Option<&'static str> = None;
    loop {
        let frame = read_frame(&mut client).await?;
        let mut request = Reader(&frame);
        let api_key = request.i16()?;
        let api_version = request.i16()?;
        let correlation_id = request.i32()?;
        match api_key {
            API_VERSIONS => {
                write_frame(&mut broker, &frame).await?;
                let answer = read_frame(&mut broker).await?;
                write_frame(&mut client, &answer).await?;
            }
            SASL_HANDSHAKE => {
                request.string()?; // client id
                let asked = request.string()?;
                let offered: Vec<&'static str> =
                    credentials.iter().map(Credential::mechanism).collect();
                let chosen = offered.iter().find(|m| **m == asked).copied();
                let mut answer = correlation_id.to_be_bytes().to_vec();
                let code = if chosen.is_some() {
                    0
                } else {
                    UNSUPPORTED_SASL_MECHANISM
                };
                answer.extend(code.to_be_bytes());
                answer.extend((offered.len() as i32).to_be_bytes());
                for m in &offered {
                    put_string(&mut answer, m);
                }
                write_frame(&mut client, &answer).await?;
                if chosen.is_none() {
                    counts.refused.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                mechanism = chosen;
            }
            SASL_AUTHENTICATE => {
                let flexible = api_version >= 2;
                request.string()?; // client id
                if flexible {
                    request.skip_tags()?;
                }
                let auth = if flexible {
                    request.compact_bytes()?
                } else {
                    request.bytes()?
                };
                let verdict = judge(mechanism, &auth, credentials);
                let answer = authenticate_answer(correlation_id, api_version, verdict.err());
                write_frame(&mut client, &answer).await?;
                if verdict.is_err() {
                    counts.refused.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                counts.accepted.fetch_add(1, Ordering::Relaxed);
                tokio::io::copy_bidirectional(&mut client, &mut broker).await?;
                return Ok(());
            }
            _ => anyhow::bail!("request {api_key} before authentication"),
        }
    }
}

/// Whether `auth` (the client's SASL message) presents one of `credentials` for `mechanism`.
fn judge(
    mechanism: Option<&str>,
    auth: &[u8],
    credentials: &[Credential],
) -> Result<(), &'static str> {
    let presented = match mechanism {
        Some("PLAIN") => {
            // authzid NUL authcid NUL password (RFC 4616)
            let parts: Vec<&[u8]> = auth.split(|b| *b == 0).collect();
            match parts.as_slice() {
                [_, user, password] => Credential::Plain {
                    user: String::from_utf8_lossy(user).into_owned(),
                    password: String::from_utf8_lossy(password).into_owned(),
                },
                _ => return Err("malformed PLAIN message"),
            }
        }
        Some("OAUTHBEARER") => {
            // gs2 header, then key=value pairs separated by 0x01 (RFC 7628)
            let text = String::from_utf8_lossy(auth);
            let token = text
                .split('\u{1}')
                .find_map(|kv| kv.strip_prefix("auth=Bearer "))
                .ok_or("no bearer token")?;
            Credential::Bearer {
                token: token.to_owned(),
            }
        }
        _ => return Err("SaslAuthenticate before SaslHandshake"),
    };
    if credentials.contains(&presented) {
        Ok(())
    } else {
        Err("Authentication failed: invalid credentials")
    }
}

fn authenticate_answer(correlation_id: i32, version: i16, refused: Option<&str>) -> Vec<u8> {
    let flexible = version >= 2;
    let mut answer = correlation_id.to_be_bytes().to_vec();
    if flexible {
        answer.push(0); // response header tags
    }
    let code = if refused.is_some() {
        SASL_AUTHENTICATION_FAILED
    } else {
        0
    };
    answer.extend(code.to_be_bytes());
    match (refused, flexible) {
        (Some(message), true) => {
            put_uvarint(&mut answer, message.len() as u64 + 1);
            answer.extend(message.as_bytes());
        }
        (None, true) => answer.push(0),
        (Some(message), false) => put_string(&mut answer, message),
        (None, false) => answer.extend((-1i16).to_be_bytes()),
    }
    // No server message in either mechanism's last step.
    if flexible {
        answer.push(1);
    } else {
        answer.extend(0i32.to_be_bytes());
    }
    if version >= 1 {
        answer.extend(0i64.to_be_bytes()); // session lifetime: no re-authentication
    }
    if flexible {
        answer.push(0);
    }
    answer
}

async fn read_frame(stream: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    let size = stream.read_i32().await?;
    let size = usize::try_from(size)?;
    anyhow::ensure!(size <= MAX_UNAUTHENTICATED_FRAME, "frame of {size} bytes");
    let mut frame = vec![0; size];
    stream.read_exact(&mut frame).await?;
    Ok(frame)
}

async fn write_frame(stream: &mut TcpStream, frame: &[u8]) -> anyhow::Result<()> {
    stream
        .write_all(&(frame.len() as i32).to_be_bytes())
        .await?;
    stream.write_all(frame).await?;
    Ok(())
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    out.extend((text.len() as i16).to_be_bytes());
    out.extend(text.as_bytes());
}

fn put_uvarint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads Kafka's primitive types from a request.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> anyhow::Result<&[u8]> {
        anyhow::ensure!(self.0.len() >= n, "request ends early");
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn i16(&mut self) -> anyhow::Result<i16> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into()?))
    }

    fn i32(&mut self) -> anyhow::Result<i32> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into()?))
    }

    fn uvarint(&mut self) -> anyhow::Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        anyhow::bail!("varint too long")
    }

    /// A nullable string (null reads as empty).
    fn string(&mut self) -> anyhow::Result<String> {
        let len = self.i16()?;
        if len < 0 {
            return Ok(String::new());
        }
        Ok(String::from_utf8_lossy(self.take(usize::try_from(len)?)?).into_owned())
    }

    fn bytes(&mut self) -> anyhow::Result<Vec<u8>> {
        let len = self.i32()?;
        Ok(self.take(usize::try_from(len.max(0))?)?.to_vec())
    }

    fn compact_bytes(&mut self) -> anyhow::Result<Vec<u8>> {
        let len = self.uvarint()?.saturating_sub(1);
        Ok(self.take(usize::try_from(len)?)?.to_vec())
    }

    fn skip_tags(&mut self) -> anyhow::Result<()> {
        for _ in 0..self.uvarint()? {
            self.uvarint()?;
            let size = self.uvarint()?;
            self.take(usize::try_from(size)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_bearer_messages_are_judged_by_their_secret() {
        let credentials = vec![
            Credential::Plain {
                user: "spoke-relay".into(),
                password: "right".into(),
            },
            Credential::Bearer {
                token: "a.b.c".into(),
            },
        ];
        assert!(judge(Some("PLAIN"), b"\0spoke-relay\0right", &credentials).is_ok());
        assert!(judge(Some("PLAIN"), b"\0spoke-relay\0wrong", &credentials).is_err());
        assert!(judge(
            Some("OAUTHBEARER"),
            b"n,,\x01auth=Bearer a.b.c\x01\x01",
            &credentials
        )
        .is_ok());
        assert!(judge(
            Some("OAUTHBEARER"),
            b"n,,\x01auth=Bearer x.y.z\x01\x01",
            &credentials
        )
        .is_err());
        assert!(judge(None, b"\0spoke-relay\0right", &credentials).is_err());
    }
}
