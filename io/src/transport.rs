//! QUIC transport settings both ends agree on.

use std::time::Duration;

/// Receive window of one stream: what a peer may send before the reader takes any of it.
pub const STREAM_WINDOW: u32 = 16 << 20;
/// Receive window of a whole connection, over all its streams.
pub const CONNECTION_WINDOW: u64 = 64 << 20;

/// Windows sized for a long fat link: quinn's defaults (~1.25 MB per stream) would cap one
/// stream near 100 Mbit/s at 100 ms RTT. `keep_alive` keeps NAT bindings open on the side
/// that dials out.
pub fn transport_config(keep_alive: Option<Duration>) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW));
    transport
        .receive_window(quinn::VarInt::from_u64(CONNECTION_WINDOW).unwrap_or(quinn::VarInt::MAX));
    transport.send_window(64 << 20);
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    transport.max_idle_timeout(Some(quinn::VarInt::from_u32(30_000).into()));
    transport.keep_alive_interval(keep_alive);
    transport
}
