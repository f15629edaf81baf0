//! An OAuth 2.0 token endpoint for the client-credentials grant, as an identity provider
//! serves it to librdkafka's OIDC support: it checks the client's id and secret (HTTP Basic)
//! and answers with a JWT that a [`crate::sasl_front::SaslFront`] then accepts as the bearer
//! token. Only what the grant needs; plain HTTP on loopback.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;

/// The endpoint; it stops when dropped.
pub struct TokenEndpoint {
    pub listen: SocketAddr,
    /// The token it issues (a JWT for subject `sub`, valid for an hour).
    pub token: String,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Counts {
    issued: AtomicU64,
    refused: AtomicU64,
}

impl TokenEndpoint {
    /// Serves `POST /token` on a free loopback port to client `client_id` with `secret`.
    pub fn start(client_id: &str, secret: &str, sub: &str) -> anyhow::Result<TokenEndpoint> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        let listen = listener.local_addr()?;
        let token = jwt(sub)?;
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{client_id}:{secret}"))
        );
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (counting, stopping, issued) = (counts.clone(), stop.clone(), token.clone());
        let thread = std::thread::Builder::new()
            .name("token-endpoint".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = answer(stream, &expected, &issued, &counting);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })?;
        Ok(TokenEndpoint {
            listen,
            token,
            counts,
            stop,
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}/token", self.listen)
    }

    /// Tokens issued.
    pub fn issued(&self) -> u64 {
        self.counts.issued.load(Ordering::Relaxed)
    }

    /// Requests refused for wrong client credentials.
    pub fn refused(&self) -> u64 {
        self.counts.refused.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for TokenEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEndpoint")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer(
    mut stream: TcpStream,
    expected_authorization: &str,
    token: &str,
    counts: &Counts,
) -> anyhow::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut buf)?;
        anyhow::ensure!(n > 0, "connection closed mid-request");
        request.extend_from_slice(&buf[..n]);
        if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        anyhow::ensure!(request.len() < 64 * 1024, "request head too large");
    };
    let head = String::from_utf8_lossy(&request[..head_end]).into_owned();
    let header = |name: &str| {
        head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while request.len() < head_end + length {
        let n = stream.read(&mut buf)?;
        anyhow::ensure!(n > 0, "connection closed mid-body");
        request.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&request[head_end..]).into_owned();
    let granted = head.starts_with("POST /token ")
        && header("authorization").as_deref() == Some(expected_authorization)
        && body.contains("grant_type=client_credentials");
    let (status, json) = if granted {
        counts.issued.fetch_add(1, Ordering::Relaxed);
        (
            "200 OK",
            format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":3600}}"#),
        )
    } else {
        counts.refused.fetch_add(1, Ordering::Relaxed);
        (
            "401 Unauthorized",
            r#"{"error":"invalid_client"}"#.to_owned(),
        )
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        json.len()
    )?;
    stream.flush()?;
    Ok(())
}

/// An unsigned JWT with the claims librdkafka reads (`exp`, `sub`); the broker side here
/// compares it whole, as a signature check would accept only what the provider issued.
fn jwt(sub: &str) -> anyhow::Result<String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let b64 = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
    Ok(format!(
        "{}.{}.{}",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&format!(
            r#"{{"sub":"{sub}","iat":{now},"exp":{}}}"#,
            now + 3600
        )),
        b64("spoke-test-signature")
    ))
}
