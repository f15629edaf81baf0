//! QUIC transport settings both ends agree on.

use std::sync::Arc;
use std::time::Duration;

use crate::congestion::BdpWindowConfig;

/// Receive window of one stream: what a peer may send before the reader takes any of it.
pub const STREAM_WINDOW: u32 = 16 << 20;
/// Receive window of a whole connection, over all its streams.
pub const CONNECTION_WINDOW: u64 = 64 << 20;
/// What a sender keeps written but unacknowledged, over all streams, at most: the agent's
/// memory for data in flight. A batch window of 16 MiB (`ship.window_bytes`) written at once
/// would otherwise all wait here, in the agent's memory, for a link that moves 2.5 MB/s; 8 MiB
/// still covers a round trip and a loss recovery at 100 Mbit/s and 300 ms RTT. Below that, the
/// agent follows its congestion window with [`send_window_for`].
pub const SEND_WINDOW: u64 = 8 << 20;
/// The least send window [`send_window_for`] gives: enough that a connection's start-up, whose
/// congestion window at most doubles per round trip, never waits for the agent's next write.
pub const MIN_SEND_WINDOW: u64 = 1 << 20;
/// Send window per byte of congestion window: one window in flight, one written behind it
/// for the next round (which may be twice as large in start-up), one for retransmissions.
const SEND_WINDOWS_PER_CONGESTION_WINDOW: u64 = 3;

/// The send window for a connection whose congestion window is `congestion_window` bytes:
/// what keeps the link busy, and no more. With the fixed [`SEND_WINDOW`], a backlog at
/// 20 Mbit/s kept 8 MiB written ahead of a 0.6 MB congestion window in the agent's memory.
pub fn send_window_for(congestion_window: u64) -> u64 {
    congestion_window
        .saturating_mul(SEND_WINDOWS_PER_CONGESTION_WINDOW)
        .clamp(MIN_SEND_WINDOW, SEND_WINDOW)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_send_window_follows_the_congestion_window_between_bounds() {
        assert_eq!(send_window_for(38_000), MIN_SEND_WINDOW);
        assert_eq!(send_window_for(600_000), 1_800_000);
        assert_eq!(send_window_for(4 << 20), SEND_WINDOW);
        assert_eq!(send_window_for(u64::MAX), SEND_WINDOW);
    }
}
