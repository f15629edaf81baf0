//! Reading frames from a real QUIC stream on loopback: what a peer that stalls, or stops in the
//! middle of a frame, gets.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spoke_proto::{Frame, Goodbye, GoodbyeCode, Limits, HEADER_LEN};
use spoke_transport::wire::{
    read_frame, read_frame_when_it_comes, read_frame_within, write_frame, write_frame_within,
    WireError,
};

/// A connected pair: the client's send half and the server's receive half of one stream.
struct Pair {
    _server: quinn::Endpoint,
    _client: quinn::Endpoint,
    _connections: (quinn::Connection, quinn::Connection),
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

async fn pair() -> Pair {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let server_crypto = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .expect("server cert");
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(server_crypto).expect("quic server"),
    ));
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().expect("addr"))
        .expect("bind server");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).expect("root");
    let client_crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut client =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("bind client");
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client_crypto).expect("quic client"),
    )));
    let addr = server.local_addr().expect("addr");
    let accepting = server.clone();
    let accepted = tokio::spawn(async move {
        accepting
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("server handshake")
    });
    let client_connection = client
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("client handshake");
    let server_connection = accepted.await.expect("accept task");
    let (mut send, _) = client_connection.open_bi().await.expect("open");
    // A stream reaches the peer with its first bytes, so one frame goes first.
    let first = goodbye();
    write_frame(&mut send, &first).await.expect("first frame");
    let (_, mut recv) = server_connection.accept_bi().await.expect("accept stream");
    let got = read_frame(&mut recv, &Limits::default())
        .await
        .expect("first frame read");
    assert_eq!(got, Some(first));
    Pair {
        _server: server,
        _client: client,
        _connections: (server_connection, client_connection),
        send,
        recv,
    }
}

fn goodbye() -> Frame {
    Frame::Goodbye(Goodbye {
        code: GoodbyeCode::Shutdown,
        reason: "x".repeat(1000),
    })
}

const STALL: Duration = Duration::from_millis(300);

#[tokio::test]
async fn a_peer_silent_between_frames_is_stalled() {
    let mut pair = pair().await;
    let started = tokio::time::Instant::now();
    let result = read_frame_within(&mut pair.recv, &Limits::default(), STALL).await;
    assert!(
        matches!(result, Err(WireError::Stalled(d)) if d == STALL),
        "{result:?}"
    );
    assert!(started.elapsed() >= STALL);
}

#[tokio::test]
async fn a_peer_that_stops_inside_a_frame_is_stalled_there() {
    let mut pair = pair().await;
    let bytes = goodbye().to_bytes().expect("encode");
    // The header and part of the body, then nothing: the stream stays open.
    pair.send
        .write_all(&bytes[..HEADER_LEN + 100])
        .await
        .expect("write");
    let result = read_frame_within(&mut pair.recv, &Limits::default(), STALL).await;
    assert!(matches!(result, Err(WireError::Stalled(_))), "{result:?}");
}

#[tokio::test]
async fn a_peer_that_keeps_sending_is_not_stalled_by_a_slow_frame() {
    let mut pair = pair().await;
    let frame = goodbye();
    let bytes = frame.to_bytes().expect("encode");
    let mut send = pair.send;
    // Each piece arrives well within the stall timeout, the whole frame well after it.
    let writer = tokio::spawn(async move {
        for piece in bytes.chunks(bytes.len() / 4 + 1) {
            send.write_all(piece).await.expect("write");
            tokio::time::sleep(STALL / 3).await;
        }
        send
    });
    let started = tokio::time::Instant::now();
    let got = read_frame_within(&mut pair.recv, &Limits::default(), STALL)
        .await
        .expect("slow but steady frame");
    assert_eq!(got, Some(frame));
    assert!(
        started.elapsed() > STALL,
        "the frame took longer than one stall timeout"
    );
    let _send = writer.await.expect("writer");
}

#[tokio::test]
async fn a_quiet_data_stream_may_wait_for_its_next_frame_but_not_stop_inside_one() {
    let mut pair = pair().await;
    let frame = goodbye();
    let bytes = frame.to_bytes().expect("encode");
    let mut send = pair.send;
    // Silent for several stall timeouts, then a whole frame, then half of one.
    let writer = tokio::spawn(async move {
        tokio::time::sleep(STALL * 3).await;
        send.write_all(&bytes).await.expect("write");
        send.write_all(&bytes[..HEADER_LEN + 100])
            .await
            .expect("write");
        send
    });
    let got = read_frame_when_it_comes(&mut pair.recv, &Limits::default(), STALL)
        .await
        .expect("a frame after a long silence");
    assert_eq!(got, Some(frame));
    let result = read_frame_when_it_comes(&mut pair.recv, &Limits::default(), STALL).await;
    assert!(
        matches!(result, Err(WireError::Stalled(d)) if d == STALL),
        "{result:?}"
    );
    let _send = writer.await.expect("writer");
}

#[tokio::test]
async fn a_frame_cut_short_by_the_end_of_the_stream_is_an_error() {
    let mut pair = pair().await;
    let bytes = goodbye().to_bytes().expect("encode");
    pair.send
        .write_all(&bytes[..HEADER_LEN + 100])
        .await
        .expect("write");
    pair.send.finish().expect("finish");
    let result = read_frame_within(&mut pair.recv, &Limits::default(), STALL).await;
    assert!(
        matches!(
            result,
            Err(WireError::Read(quinn::ReadExactError::FinishedEarly(100)))
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_header_cut_short_is_an_error_and_a_clean_end_is_none() {
    let mut pair = pair().await;
    let bytes = goodbye().to_bytes().expect("encode");
    pair.send.write_all(&bytes[..5]).await.expect("write");
    pair.send.finish().expect("finish");
    let result = read_frame_within(&mut pair.recv, &Limits::default(), STALL).await;
    assert!(
        matches!(
            result,
            Err(WireError::Read(quinn::ReadExactError::FinishedEarly(5)))
        ),
        "{result:?}"
    );

    let mut clean = self::pair().await;
    clean.send.finish().expect("finish");
    let result = read_frame_within(&mut clean.recv, &Limits::default(), STALL).await;
    assert!(matches!(result, Ok(None)), "{result:?}");
}

#[tokio::test]
async fn an_oversize_declared_length_is_refused_before_the_body_arrives() {
    let mut pair = pair().await;
    let bytes = goodbye().to_bytes().expect("encode");
    pair.send
        .write_all(&bytes[..HEADER_LEN])
        .await
        .expect("write");
    let tight = Limits {
        max_frame_bytes: 100,
    };
    let result = read_frame_within(&mut pair.recv, &tight, STALL).await;
    assert!(matches!(result, Err(WireError::Decode(_))), "{result:?}");
}

#[tokio::test]
async fn a_peer_that_takes_nothing_stalls_a_write() {
    let mut pair = pair().await;
    let frame = Frame::Goodbye(Goodbye {
        code: GoodbyeCode::Shutdown,
        reason: "x".repeat(60_000),
    });
    // The receiving side never reads: once quinn's stream window (about 1.25 MB) is full, a
    // write waits for credit that never comes.
    let mut written = 0usize;
    let result = loop {
        match write_frame_within(&mut pair.send, frame.clone(), STALL).await {
            Ok(()) if written < 1000 => written += 1,
            other => break other,
        }
    };
    assert!(
        matches!(result, Err(WireError::Stalled(d)) if d == STALL),
        "after {written} frames: {result:?}"
    );
    assert!(written > 10, "the window took {written} frames first");
    // A frame the window has room for goes through.
    let mut fresh = self::pair().await;
    write_frame_within(&mut fresh.send, goodbye(), STALL)
        .await
        .expect("small frame");
}
