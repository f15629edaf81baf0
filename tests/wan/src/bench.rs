//! Measurements across a [`Link`]: UDP round trips and one-way loss, and bulk transfers over
//! TCP and over QUIC (quinn) with a choice of flow-control windows and congestion controller.
//! Senders run in the edge namespace, receivers in the hub namespace, as spoke ships.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::{Link, LinkSpec, EDGE_ADDR, HUB_ADDR};

/// What the senders write, over and over.
static PAYLOAD: [u8; 64 * 1024] = [0x5a; 64 * 1024];
/// Any single network wait: a handshake or connect across the slowest link with loss.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(30);

/// Round-trip times of `count` UDP echoes edge → hub → edge, one at a time.
pub fn udp_rtts(link: &Link, count: usize) -> anyhow::Result<Vec<Duration>> {
    let server = link.hub().enter(|| UdpSocket::bind((HUB_ADDR, 0)))?;
    let client = link.edge().enter(|| UdpSocket::bind((EDGE_ADDR, 0)))?;
    let server_addr = server.local_addr()?;
    server.set_read_timeout(Some(Duration::from_millis(100)))?;
    client.set_read_timeout(Some(link.spec().rtt() * 4 + Duration::from_secs(1)))?;
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(&buf[..n], from);
                }
            }
        });
        let result = (|| {
            let mut rtts = Vec::with_capacity(count);
            let mut buf = [0u8; 64];
            for seq in 0..count as u64 {
                let sent = Instant::now();
                client.send_to(&seq.to_be_bytes(), server_addr)?;
                // An echo of an earlier probe (lost, then late) is not this probe's answer.
                loop {
                    let n = client
                        .recv(&mut buf)
                        .with_context(|| format!("waiting for echo {seq}"))?;
                    if buf[..n] == seq.to_be_bytes() {
                        break;
                    }
                }
                rtts.push(sent.elapsed());
            }
            Ok(rtts)
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })
}

/// What [`udp_one_way`] saw.
#[derive(Debug, Clone, Copy)]
pub struct OneWay {
    pub received: u64,
    /// From the first send to the last.
    pub sending: Duration,
}

/// Sends `count` datagrams of `size` IP bytes (at least 36) edge → hub, `interval` apart, and
/// counts how many arrived.
pub fn udp_one_way(
    link: &Link,
    count: u64,
    size: usize,
    interval: Duration,
) -> anyhow::Result<OneWay> {
    let receiver = link.hub().enter(|| UdpSocket::bind((HUB_ADDR, 0)))?;
    let sender = link.edge().enter(|| UdpSocket::bind((EDGE_ADDR, 0)))?;
    let to = receiver.local_addr()?;
    // Everything in flight has arrived one delay plus a full queue after the last send.
    let spec = link.spec();
    receiver.set_read_timeout(Some(
        spec.delay + spec.jitter + spec.queue + Duration::from_millis(300),
    ))?;
    let sent = AtomicBool::new(false);
    let payload = vec![0u8; size.saturating_sub(28).max(8)];
    std::thread::scope(|scope| {
        // Read while sending: a socket buffer holds only a few hundred small datagrams.
        let counter = scope.spawn(|| {
            let mut received = 0;
            let mut buf = [0u8; 2048];
            loop {
                match receiver.recv(&mut buf) {
                    Ok(_) => received += 1,
                    Err(_) if sent.load(Ordering::Relaxed) => return received,
                    Err(_) => {}
                }
            }
        });
        let start = Instant::now();
        let result = (|| {
            for seq in 0..count {
                sender.send_to(&payload, to)?;
                // Paced against the start, so one late wake-up does not slow the whole run.
                let next = start + interval * u32::try_from(seq + 1)?;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            anyhow::Ok(start.elapsed())
        })();
        sent.store(true, Ordering::Relaxed);
        let received = counter
            .join()
            .map_err(|_| anyhow::anyhow!("the receiving thread panicked"))?;
        Ok(OneWay {
            received,
            sending: result?,
        })
    })
}

/// A bulk transfer's result over its measurement window (after the warm-up).
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Application bytes received per second, in bits.
    pub goodput_bps: f64,
    /// IP bytes the link delivered edge → hub per second, in bits.
    pub wire_bps: f64,
    /// Share of the packets sent edge → hub that the bottleneck queue dropped.
    pub queue_drop_ratio: f64,
}

/// Waits out `warmup` (slow start, window growth), then counts what was received and what the
/// link delivered over `measure`.
async fn measure_window(
    link: &Link,
    received: &AtomicU64,
    warmup: Duration,
    measure: Duration,
) -> Throughput {
    tokio::time::sleep(warmup).await;
    let (bytes0, link0, t0) = (
        received.load(Ordering::Relaxed),
        link.stats().edge_to_hub,
        Instant::now(),
    );
    tokio::time::sleep(measure).await;
    let (bytes1, link1, t1) = (
        received.load(Ordering::Relaxed),
        link.stats().edge_to_hub,
        Instant::now(),
    );
    let seconds = (t1 - t0).as_secs_f64();
    let packets = link1.packets_in - link0.packets_in;
    Throughput {
        goodput_bps: (bytes1 - bytes0) as f64 * 8.0 / seconds,
        wire_bps: (link1.delivered_bytes - link0.delivered_bytes) as f64 * 8.0 / seconds,
        queue_drop_ratio: (link1.queue_dropped - link0.queue_dropped) as f64
            / packets.max(1) as f64,
    }
}

/// `streams` parallel TCP connections edge → hub, each writing as fast as it can with
/// congestion control `congestion` (`cubic`, `bbr`, `reno`; the host's default may be any).
pub async fn tcp_bulk(
    link: &Link,
    congestion: &str,
    streams: usize,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Throughput> {
    let listener = link.hub().enter(|| TcpListener::bind((HUB_ADDR, 0)))?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let received = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..streams {
        let stream = link.edge().enter(move || {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.set_tcp_congestion(congestion.as_bytes())?;
            socket.connect_timeout(&addr.into(), NETWORK_TIMEOUT)?;
            socket.set_nonblocking(true)?;
            Ok(TcpStream::from(socket))
        })?;
        let (mut inbound, _) = tokio::time::timeout(NETWORK_TIMEOUT, listener.accept())
            .await
            .context("accepting a TCP connection")??;
        let received = received.clone();
        tasks.spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = inbound.read(&mut buf).await {
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
        let mut outbound = tokio::net::TcpStream::from_std(stream)?;
        tasks.spawn(async move { while outbound.write_all(&PAYLOAD).await.is_ok() {} });
    }
    let result = measure_window(link, &received, warmup, measure).await;
    tasks.shutdown().await;
    Ok(result)
}

/// Flow-control windows for a QUIC bulk transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Windows {
    /// `quinn::TransportConfig::default()`: 1.25 MB per stream, 10 MB send window.
    Quinn,
    /// Stream, connection and send windows all one bandwidth-delay product of the loaded link
    /// (rate × (RTT + queue)): as much as can be in flight, no more.
    Bdp,
    /// Twice that: after a loss the receiver also holds up to a round trip of data behind the
    /// hole until the retransmission fills it, and that counts against the window too.
    Bdp2,
    /// `spoke_transport::transport::transport_config`, as spoke-agent and spoke-relay run.
    Spoke,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    Cubic,
    /// quinn's BBR as it comes.
    Bbr,
    /// `spoke_transport::congestion::BdpWindow`: spoke's window from the measured bandwidth-delay product.
    BdpWindow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuicCase {
    pub windows: Windows,
    pub congestion: Congestion,
    pub streams: usize,
}

fn transport(case: QuicCase, spec: &LinkSpec) -> quinn::TransportConfig {
    let mut transport = match case.windows {
        Windows::Spoke => spoke_transport::transport::transport_config(None),
        Windows::Quinn => quinn::TransportConfig::default(),
        Windows::Bdp | Windows::Bdp2 => {
            let mut transport = quinn::TransportConfig::default();
            let loaded_rtt = (spec.rtt() + spec.queue).as_secs_f64();
            let rounds = if case.windows == Windows::Bdp2 {
                2.0
            } else {
                1.0
            };
            let bdp = (spec.rate_bps as f64 / 8.0 * loaded_rtt * rounds) as u64;
            let window = bdp.clamp(64 * 1024, u64::from(u32::MAX));
            let var = quinn::VarInt::from_u64(window).unwrap_or(quinn::VarInt::MAX);
            transport.stream_receive_window(var);
            transport.receive_window(var);
            transport.send_window(window);
            transport
        }
    };
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    match case.congestion {
        Congestion::Cubic => transport
            .congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
        Congestion::Bbr => transport
            .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
        Congestion::BdpWindow => transport.congestion_controller_factory(Arc::new(
            spoke_transport::congestion::BdpWindowConfig::default(),
        )),
    };
    transport
}

fn quic_configs(
    transport: quinn::TransportConfig,
) -> anyhow::Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec!["bench.invalid".to_owned()])?;
    let cert_der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let mut server_crypto = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key)?;
    server_crypto.alpn_protocols = vec![b"spoke-bench".to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der)?;
    let mut client_crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_crypto.alpn_protocols = vec![b"spoke-bench".to_vec()];
    let transport = Arc::new(transport);
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_crypto)?,
    ));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_crypto)?,
    ));
    client.transport_config(transport);
    Ok((server, client))
}

/// One QUIC connection edge → hub with `case.streams` bidirectional streams (as spoke opens
/// them), each writing as fast as flow and congestion control let it.
pub async fn quic_bulk(
    link: &Link,
    case: QuicCase,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Throughput> {
    let (server_config, client_config) = quic_configs(transport(case, &link.spec()))?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let server_socket = link.hub().enter(|| UdpSocket::bind((HUB_ADDR, 0)))?;
    let server_addr: SocketAddr = server_socket.local_addr()?;
    let server = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        server_socket,
        runtime.clone(),
    )?;
    let client_socket = link.edge().enter(|| UdpSocket::bind((EDGE_ADDR, 0)))?;
    let client = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        client_socket,
        runtime,
    )?;
    let connecting = client.connect_with(client_config, server_addr, "bench.invalid")?;
    let (outbound, inbound) = tokio::time::timeout(NETWORK_TIMEOUT, async {
        let incoming = server.accept().await.context("server endpoint closed")?;
        let (outbound, inbound) = tokio::join!(connecting, incoming);
        anyhow::Ok((outbound?, inbound?))
    })
    .await
    .context("QUIC handshake")??;

    let received = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    {
        let received = received.clone();
        tasks.spawn(async move {
            let mut streams = JoinSet::new();
            while let Ok((_send, mut recv)) = inbound.accept_bi().await {
                let received = received.clone();
                streams.spawn(async move {
                    while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, false).await {
                        received.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                    }
                });
            }
            streams.shutdown().await;
        });
    }
    for _ in 0..case.streams {
        let (mut send, _recv) = outbound.open_bi().await?;
        tasks.spawn(async move { while send.write_all(&PAYLOAD).await.is_ok() {} });
    }
    let result = measure_window(link, &received, warmup, measure).await;
    outbound.close(quinn::VarInt::from_u32(0), b"done");
    tasks.shutdown().await;
    client.close(quinn::VarInt::from_u32(0), b"done");
    server.close(quinn::VarInt::from_u32(0), b"done");
    if received.load(Ordering::Relaxed) == 0 {
        bail!("no bytes crossed the link");
    }
    Ok(result)
}
