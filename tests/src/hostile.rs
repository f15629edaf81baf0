//! A hostile spoke peer: a quinn client that speaks to a real relay with whatever certificate
//! and whatever bytes a test chooses. Honest frames come from spoke-proto's encoders and are
//! then corrupted, so each attack differs from a valid frame in exactly one property.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use quinn::crypto::rustls::QuicClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use spoke_proto::{Batch, Codec, Frame, Heartbeat, Hello, Limits, HEADER_LEN, PROTOCOL_VERSION};

use crate::pki::Identity;

/// QUIC application close codes of the relay (relay/src/session.rs `close_code`).
pub const CLOSE_NOT_AUTHORIZED: u32 = 1;
pub const CLOSE_PROTOCOL_ERROR: u32 = 2;

/// A client configuration trusting `ca_pem` for the relay and presenting `identity` (or no
/// certificate at all). `keep_alive` keeps a stalled connection alive at the QUIC level, so
/// only the relay's own timeouts can end it.
pub fn client_config(
    ca_pem: &str,
    identity: Option<&Identity>,
    keep_alive: Option<Duration>,
) -> anyhow::Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.context("CA PEM")?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut crypto = match identity {
        Some(identity) => {
            let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .context("client certificate PEM")?;
            let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
                .context("client key PEM")?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    crypto.alpn_protocols = vec![spoke_proto::ALPN.to_vec()];
    // Offered only where a test asks for it (`into_0rtt`): a plain connect never sends early
    // data.
    crypto.enable_early_data = true;
    let quic = QuicClientConfig::try_from(crypto)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(keep_alive);
    transport.max_idle_timeout(Some(quinn::VarInt::from_u32(60_000).into()));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A client endpoint on an ephemeral loopback port; call inside a tokio runtime.
pub fn endpoint() -> anyhow::Result<quinn::Endpoint> {
    Ok(quinn::Endpoint::client(SocketAddr::from((
        [127, 0, 0, 1],
        0,
    )))?)
}

/// Dials the relay (server name `localhost`, as `pki init` names it). The outer error is a
/// local failure; the inner one is the relay refusing or failing the handshake.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    relay: SocketAddr,
) -> anyhow::Result<Result<quinn::Connection, quinn::ConnectionError>> {
    let connecting = endpoint
        .connect_with(config.clone(), relay, "localhost")
        .context("starting a QUIC connection")?;
    Ok(connecting.await)
}

/// Expects the relay to refuse this client: the handshake fails, or, since in TLS 1.3 the
/// client is done with its side of the handshake before the server has judged its
/// certificate, the connection is closed right after (even when it sends a Hello for
/// `site`). Returns how the relay ended it; fails if the relay keeps talking for `within`.
pub async fn expect_refused(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    relay: SocketAddr,
    site: &str,
    within: Duration,
) -> anyhow::Result<quinn::ConnectionError> {
    let connection = match connect(endpoint, config, relay).await? {
        Ok(connection) => connection,
        Err(refused) => return Ok(refused),
    };
    // Ok(true): the relay answered with a Welcome, i.e. let the client in.
    let talk = async {
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(&encode(&hello(site))?).await?;
        let mut buf = Vec::new();
        // A refused peer may get a Goodbye before the close.
        while let Some(frame) = read_frame(&mut recv, &mut buf).await? {
            if let Frame::Welcome(_) = frame {
                return anyhow::Ok(true);
            }
        }
        anyhow::Ok(false)
    };
    let outcome = tokio::time::timeout(within, async {
        if let Ok(true) = talk.await {
            bail!("relay answered the Hello with a Welcome");
        }
        Ok(connection.closed().await)
    })
    .await;
    match outcome {
        Ok(closed) => closed,
        Err(_) => bail!("relay kept the connection open for {within:?}"),
    }
}

/// Whether the relay accepts 0-RTT data from a returning client: one full session (Hello,
/// Welcome) leaves a session ticket in `config`'s resumption store, then a second connection
/// offers early data with it.
pub async fn zero_rtt_accepted(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    relay: SocketAddr,
    site: &str,
) -> anyhow::Result<bool> {
    let session = Session::open(endpoint, config, relay, site).await?;
    session.connection.close(0u32.into(), b"done");
    let connecting = endpoint.connect_with(config.clone(), relay, "localhost")?;
    match connecting.into_0rtt() {
        Ok((connection, accepted)) => {
            let accepted = accepted.await;
            connection.close(0u32.into(), b"done");
            Ok(accepted)
        }
        // The ticket allows no early data: the client falls back to a full handshake.
        Err(connecting) => {
            connecting.await?.close(0u32.into(), b"done");
            Ok(false)
        }
    }
}

/// An authenticated session past the handshake: `Hello` sent, `Welcome` received, the first
/// bidirectional stream ready for (hostile) bytes.
#[derive(Debug)]
pub struct Session {
    pub connection: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

impl Session {
    pub async fn open(
        endpoint: &quinn::Endpoint,
        config: &quinn::ClientConfig,
        relay: SocketAddr,
        site: &str,
    ) -> anyhow::Result<Session> {
        Self::open_with(endpoint, config, relay, &hello(site)).await
    }

    /// As [`Session::open`], with the `Hello` given.
    pub async fn open_with(
        endpoint: &quinn::Endpoint,
        config: &quinn::ClientConfig,
        relay: SocketAddr,
        hello: &Frame,
    ) -> anyhow::Result<Session> {
        let connection = connect(endpoint, config, relay)
            .await?
            .context("relay refused a valid certificate")?;
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(&encode(hello)?).await?;
        let mut buf = Vec::new();
        let first = tokio::time::timeout(Duration::from_secs(30), read_frame(&mut recv, &mut buf))
            .await
            .context("no Welcome within 30 s")??;
        match first {
            Some(Frame::Welcome(_)) => Ok(Session {
                connection,
                send,
                recv,
            }),
            other => bail!("expected Welcome, got {other:?}"),
        }
    }

    /// A connection with its first stream open but nothing sent: for attacks on the `Hello`.
    pub async fn before_hello(
        endpoint: &quinn::Endpoint,
        config: &quinn::ClientConfig,
        relay: SocketAddr,
    ) -> anyhow::Result<Session> {
        let connection = connect(endpoint, config, relay)
            .await?
            .context("relay refused a valid certificate")?;
        let (send, recv) = connection.open_bi().await?;
        Ok(Session {
            connection,
            send,
            recv,
        })
    }

    /// Waits until the relay closes the connection; returns the application close code and
    /// the reason text the relay gave.
    pub async fn closed_by_relay(&self, within: Duration) -> anyhow::Result<(u64, String)> {
        let closed = tokio::time::timeout(within, self.connection.closed())
            .await
            .with_context(|| format!("relay kept the connection open for {within:?}"))?;
        match closed {
            quinn::ConnectionError::ApplicationClosed(close) => Ok((
                close.error_code.into_inner(),
                String::from_utf8_lossy(&close.reason).into_owned(),
            )),
            other => bail!("connection ended without an application close: {other}"),
        }
    }

    /// As [`Session::closed_by_relay`], for a test whose point is that the relay ends the
    /// connection, not how the peer learns it: the relay sends its CONNECTION_CLOSE once,
    /// and when that packet is lost (a loaded machine drops loopback datagrams too) the
    /// client hears nothing until its idle timeout. So this pokes the relay every half
    /// second with a full-sized packet, which a closing relay answers with the close again,
    /// and one that has forgotten the connection with a stateless reset: `None` then.
    pub async fn ended_by_relay(&self, within: Duration) -> anyhow::Result<Option<(u64, String)>> {
        let poke = async {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Ok(mut stream) = self.connection.open_uni().await {
                    let _ = stream.write_all(&[0u8; 1100]).await;
                }
            }
        };
        let closed = tokio::time::timeout(within, async {
            tokio::select! {
                reason = self.connection.closed() => reason,
                () = poke => unreachable!("the poke loop never ends"),
            }
        })
        .await
        .with_context(|| format!("relay kept the connection open for {within:?}"))?;
        match closed {
            quinn::ConnectionError::ApplicationClosed(close) => Ok(Some((
                close.error_code.into_inner(),
                String::from_utf8_lossy(&close.reason).into_owned(),
            ))),
            quinn::ConnectionError::Reset => Ok(None),
            other => bail!("connection ended without an application close: {other}"),
        }
    }
}

/// Reads one frame, buffering in `buf`; `None` at a clean end of stream.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    buf: &mut Vec<u8>,
) -> anyhow::Result<Option<Frame>> {
    loop {
        if let Some((frame, used)) = Frame::decode(buf, &Limits::default())? {
            buf.drain(..used);
            return Ok(Some(frame));
        }
        match recv.read_chunk(64 * 1024, true).await? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None if buf.is_empty() => return Ok(None),
            None => bail!("stream ended inside a frame"),
        }
    }
}

pub fn hello(site: &str) -> Frame {
    Frame::Hello(Hello {
        site: site.to_owned(),
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        software: "spoke-tests hostile peer".to_owned(),
        partitions: Vec::new(),
    })
}

/// A `Hello` offering protocol versions 1 to `max_version`.
pub fn hello_speaking(site: &str, max_version: u8) -> Frame {
    let mut frame = hello(site);
    if let Frame::Hello(hello) = &mut frame {
        hello.max_version = max_version;
    }
    frame
}

/// A `Hello` asking for resume points of `count` partitions of `topic`: each one costs the
/// relay a scan of the hub, so the list is an amplification lever if it is not bounded.
pub fn hello_with_partitions(site: &str, topic: &str, count: i32) -> Frame {
    let mut frame = hello(site);
    if let Frame::Hello(hello) = &mut frame {
        hello.partitions = (0..count)
            .map(|partition| spoke_proto::TopicPartition {
                topic: topic.to_owned(),
                partition,
            })
            .collect();
    }
    frame
}

pub fn heartbeat() -> Frame {
    Frame::Heartbeat(Heartbeat::default())
}

/// A syntactically valid heartbeat with every figure at its maximum and a lag list of
/// `entries` partitions: the relay must neither overflow summing it nor keep it.
pub fn extreme_heartbeat(entries: i32) -> Frame {
    Frame::Heartbeat(Heartbeat {
        sent_at_ms: u64::MAX,
        spool_bytes: u64::MAX,
        spool_max_bytes: u64::MAX,
        oldest_unacked_ms: u64::MAX,
        lost_records: u64::MAX,
        records_per_s: u64::MAX,
        lag: (0..entries)
            .map(|partition| spoke_proto::PartitionLag {
                topic: "orders".to_owned(),
                partition,
                lag_records: u64::MAX,
            })
            .collect(),
    })
}

/// A `Hello` offering only protocol versions this relay does not speak.
pub fn future_hello(site: &str) -> Frame {
    let mut frame = hello(site);
    if let Frame::Hello(hello) = &mut frame {
        hello.min_version = spoke_proto::MAX_PROTOCOL_VERSION + 1;
        hello.max_version = u8::MAX;
    }
    frame
}

pub fn encode(frame: &Frame) -> anyhow::Result<Vec<u8>> {
    Ok(frame.to_bytes()?.to_vec())
}

/// A valid batch of `count` small records at offsets `first..first+count`, uncompressed.
pub fn valid_batch(seq: u64, topic: &str, first: i64, count: usize) -> anyhow::Result<Frame> {
    let offsets: Vec<i64> = (first..first + count as i64).collect();
    section_batch(seq, topic, &offsets)
}

/// A batch whose record section lists `offsets` exactly as given (the encoder refuses
/// anything but strictly increasing offsets, so the section is written by hand; see
/// proto/src/batch.rs for the layout). The header's first/last/count agree with the list,
/// so only the order inside can be wrong.
pub fn section_batch(seq: u64, topic: &str, offsets: &[i64]) -> anyhow::Result<Frame> {
    let (Some(&first), Some(&last)) = (offsets.first(), offsets.last()) else {
        bail!("a batch needs records");
    };
    let mut section = Vec::new();
    let mut prev = None;
    for &offset in offsets {
        match prev {
            None => put_uvarint(&mut section, ((offset << 1) ^ (offset >> 63)) as u64),
            // Two's complement: a step backwards becomes a huge forward delta.
            Some(p) => put_uvarint(&mut section, offset.wrapping_sub(p) as u64),
        }
        section.push(0); // no timestamp
        section.push(0); // null key
        let value = format!("hostile-{offset}");
        put_uvarint(&mut section, value.len() as u64 + 1);
        section.extend_from_slice(value.as_bytes());
        section.push(0); // no headers
        prev = Some(offset);
    }
    plain_batch(
        seq,
        topic,
        first,
        last,
        u32::try_from(offsets.len())?,
        section,
    )
}

/// A batch of one record (offset 0) carrying `count` headers of `value_len` bytes each.
pub fn headers_batch(
    seq: u64,
    topic: &str,
    count: usize,
    value_len: usize,
) -> anyhow::Result<Frame> {
    let mut section = vec![0, 0, 0, 0]; // offset 0, no timestamp, null key, null value
    put_uvarint(&mut section, count as u64);
    let value = vec![b'h'; value_len];
    for _ in 0..count {
        put_uvarint(&mut section, 1);
        section.push(b'h');
        put_uvarint(&mut section, value_len as u64 + 1);
        section.extend_from_slice(&value);
    }
    plain_batch(seq, topic, 0, 0, 1, section)
}

/// A batch whose header fields (`uncompressed_len`, `record_count`) claim more than the
/// relay's caps over a tiny payload: refused from the declaration, before any work.
pub fn overclaiming_batch(
    seq: u64,
    topic: &str,
    uncompressed_len: u32,
    record_count: u32,
) -> anyhow::Result<Frame> {
    let payload = zstd::bulk::compress(b"tiny", 1)?;
    Ok(Frame::Batch(Batch {
        seq,
        topic: topic.to_owned(),
        partition: 0,
        partition_count: 1,
        first_offset: 0,
        last_offset: i64::from(record_count) - 1,
        next_offset: i64::from(record_count),
        record_count,
        codec: Codec::Zstd,
        uncompressed_len,
        payload: Bytes::from(payload),
    }))
}

fn plain_batch(
    seq: u64,
    topic: &str,
    first: i64,
    last: i64,
    count: u32,
    section: Vec<u8>,
) -> anyhow::Result<Frame> {
    Ok(Frame::Batch(Batch {
        seq,
        topic: topic.to_owned(),
        partition: 0,
        partition_count: 1,
        first_offset: first,
        last_offset: last,
        next_offset: last + 1,
        record_count: count,
        codec: Codec::None,
        uncompressed_len: u32::try_from(section.len())?,
        payload: Bytes::from(section),
    }))
}

/// A zstd bomb: `inflated` bytes of zeros in a few KiB, declared as a 1 MiB record section.
/// A decoder that trusted the payload instead of the declaration would allocate `inflated`.
pub fn zstd_bomb(seq: u64, topic: &str, inflated: usize) -> anyhow::Result<Frame> {
    use std::io::Write;
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 1)?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = inflated;
    while left > 0 {
        let n = left.min(zeros.len());
        encoder.write_all(&zeros[..n])?;
        left -= n;
    }
    let payload = encoder.finish()?;
    Ok(Frame::Batch(Batch {
        seq,
        topic: topic.to_owned(),
        partition: 0,
        partition_count: 1,
        first_offset: 0,
        last_offset: 0,
        next_offset: 1,
        record_count: 1,
        codec: Codec::Zstd,
        uncompressed_len: 1 << 20,
        payload: Bytes::from(payload),
    }))
}

/// Byte positions in the 12-byte frame header (proto/src/frame.rs).
pub mod header {
    pub const VERSION: usize = 2;
    pub const TYPE: usize = 3;
    pub const LENGTH: std::ops::Range<usize> = 4..8;
    pub const CHECKSUM: std::ops::Range<usize> = 8..12;
}

/// `frame` with its header's body length replaced: the relay must refuse it from the header
/// alone, before waiting for or allocating the body.
pub fn with_length(mut frame: Vec<u8>, length: u32) -> Vec<u8> {
    frame[header::LENGTH].copy_from_slice(&length.to_be_bytes());
    frame
}

/// `frame` with one body byte flipped, so its CRC no longer matches.
pub fn with_corrupt_body(mut frame: Vec<u8>) -> Vec<u8> {
    if frame.len() > HEADER_LEN {
        if let Some(byte) = frame.last_mut() {
            *byte ^= 0x5a;
        }
    }
    frame
}

pub fn with_byte(mut frame: Vec<u8>, at: usize, value: u8) -> Vec<u8> {
    frame[at] = value;
    frame
}

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Authority, Validity};

    /// A stand-in relay that answers every Hello with a Welcome, with 0-RTT on or off: so
    /// that `zero_rtt_accepted` is shown to see 0-RTT where it exists.
    fn server(ca: &Authority, early_data: bool) -> anyhow::Result<quinn::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let relay = ca.issue_relay("stand-in relay")?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())?)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()?;
        let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(relay.cert_pem.as_bytes())?],
                PrivateKeyDer::from_pem_slice(relay.key_pem.as_bytes())?,
            )?;
        crypto.alpn_protocols = vec![spoke_proto::ALPN.to_vec()];
        crypto.max_early_data_size = if early_data { u32::MAX } else { 0 };
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)?;
        Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
    }

    async fn serve(endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else {
                    return;
                };
                let Ok((mut send, mut recv)) = connection.accept_bi().await else {
                    return;
                };
                let mut buf = Vec::new();
                if let Ok(Some(Frame::Hello(_))) = read_frame(&mut recv, &mut buf).await {
                    let welcome = Frame::Welcome(spoke_proto::Welcome {
                        version: PROTOCOL_VERSION,
                        relay: "stand-in".into(),
                        resume: Vec::new(),
                    });
                    if let Ok(bytes) = encode(&welcome) {
                        let _ = send.write_all(&bytes).await;
                    }
                }
                connection.closed().await;
            });
        }
    }

    #[tokio::test]
    async fn zero_rtt_probe_tells_a_server_with_0rtt_from_one_without() -> anyhow::Result<()> {
        let ca = Authority::new("test CA")?;
        let site = ca.issue_site("probe", Validity::current(), 1)?;
        for early_data in [true, false] {
            let server = quinn::Endpoint::server(
                server(&ca, early_data)?,
                SocketAddr::from(([127, 0, 0, 1], 0)),
            )?;
            let address = server.local_addr()?;
            let task = tokio::spawn(serve(server.clone()));
            // A fresh config per server: tickets of one must not leak into the other.
            let config = client_config(&ca.cert_pem(), Some(&site), None)?;
            let client = endpoint()?;
            let accepted = zero_rtt_accepted(&client, &config, address, "probe").await?;
            assert_eq!(
                accepted, early_data,
                "0-RTT offered by the server: {early_data}"
            );
            server.close(0u32.into(), b"done");
            task.abort();
        }
        Ok(())
    }
}
