//! QUIC transport settings both ends agree on.

use std::sync::Arc;
use std::time::Duration;

use crate::congestion::BdpWindowConfig;

/// Receive window of one stream: what a peer may send before the reader takes any of it.
pub const STREAM_WINDOW: u32 = 16 << 20;
/// Receive window of a whole connection, over all its streams.
pub const CONNECTION_WINDOW: u64 = 64 << 20;
/// What a sender keeps written but unacknowledged, over all streams: the agent's memory for
/// data in flight. A batch window of 16 MiB (`ship.window_bytes`) written at once would
/// otherwise all wait here, in the agent's memory, for a link that moves 2.5 MB/s; 8 MiB still
/// covers a round trip and a loss recovery at 100 Mbit/s and 300 ms RTT.
pub const SEND_WINDOW: u64 = 8 << 20;

/// Windows sized for a long fat link: quinn's defaults (~1.25 MB per stream) would cap one
/// stream near 100 Mbit/s at 100 ms RTT, and after a loss the receiver also holds up to a
/// round trip of data behind the hole, so a window of one bandwidth-delay product is not
/// enough either (docs/benchmarks.md: 74% of 100 Mbit/s at 0.1% loss, against 95% with these).
/// `keep_alive` keeps NAT bindings open on the side that dials out.
///
/// BBR instead of quinn's default Cubic: edge links lose packets that were never congestion
/// (radio, long paths), and a loss-based controller collapses on them. Measured over the
/// emulated links of docs/benchmarks.md, Cubic reached 5% of 100 Mbit/s at 100 ms RTT with
/// 0.1% random loss and 5% of 20 Mbit/s at 200 ms with 1% loss; BBR reached 95% on both. Not
/// quinn's BBR, though, which overran the links' queues (34–55% of its packets dropped there),
/// but spoke's window from the measured bandwidth-delay product ([`crate::congestion`]), which
/// kept BBR's goodput with none dropped. The congestion controller acts on the sending side:
/// the agent, for data.
pub fn transport_config(keep_alive: Option<Duration>) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW));
    transport
        .receive_window(quinn::VarInt::from_u64(CONNECTION_WINDOW).unwrap_or(quinn::VarInt::MAX));
    transport.send_window(SEND_WINDOW);
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    transport.max_idle_timeout(Some(quinn::VarInt::from_u32(30_000).into()));
    transport.keep_alive_interval(keep_alive);
    transport.congestion_controller_factory(Arc::new(BdpWindowConfig::default()));
    transport
}
