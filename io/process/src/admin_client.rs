//! A plain HTTP/1.0 GET against a local admin endpoint, for `spoke-agent status` and
//! `spoke-relay sites`: the endpoint is local and small, so no HTTP client library is pulled
//! into the binaries for it.

use std::io::{Read, Write};
use std::time::Duration;

/// The body of a 200 answer; any other status is an error carrying the body.
pub fn http_get(address: &str, path: &str) -> std::io::Result<String> {
    let timeout = Duration::from_secs(5);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(address)?
        .next()
        .ok_or_else(|| std::io::Error::other("address resolves to nothing"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.take(16 << 20).read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("malformed HTTP response"))?;
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.contains(" 200 ") {
        return Err(std::io::Error::other(format!(
            "{status_line}: {}",
            body.trim()
        )));
    }
    Ok(body.to_owned())
}
