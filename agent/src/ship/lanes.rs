//! Where a session's batches are written: its data streams, or the control stream alone when
//! the relay allows none (or speaks a version without them), with the protocol's window over
//! them; and the connection's send window, which keeps a backlog in the spool rather than in
//! memory.

use futures_util::FutureExt;
use spoke_proto::connection::agent::Window;
use spoke_proto::Negotiated;
use tracing::info;

use super::ShipError;

/// What the agent keeps of a batch in flight, to settle it in the spool once it is answered.
#[derive(Debug)]
pub(super) struct Shipped {
    /// The source position after the batch.
    pub(super) next_offset: i64,
    pub(super) records: u32,
}

/// The lanes of a session: the window of batches in flight over them, and the stream each
/// lane writes to (`None`: the control stream).
pub(super) struct Lanes {
    pub(super) window: Window<Shipped>,
    streams: Vec<Option<quinn::SendStream>>,
}

impl Lanes {
    /// Opens up to `wanted` data streams if the session's version allows them. Stream credit
    /// is known from the handshake, so an open that cannot complete at once never will: the
    /// relay allows fewer, and the session makes do with those it got.
    pub(super) fn open(
        connection: &quinn::Connection,
        version: Negotiated,
        wanted: u32,
        max_batches: usize,
        max_bytes: u64,
    ) -> Result<Self, ShipError> {
        let mut streams = Vec::new();
        if version.data_streams() {
            for _ in 0..wanted {
                match connection.open_uni().now_or_never() {
                    Some(opened) => streams.push(Some(opened?)),
                    None => break,
                }
            }
        }
        if streams.len() < wanted as usize {
            info!(
                wanted,
                data_streams = streams.len(),
                version = version.number(),
                "the relay allows fewer data streams"
            );
        }
        if streams.is_empty() {
            streams.push(None);
        }
        Ok(Self {
            window: Window::new(version, streams.len(), max_batches, max_bytes),
            streams,
        })
    }

    /// The data stream of `lane`; `None` where batches go on the control stream.
    pub(super) fn stream(&mut self, lane: usize) -> Option<&mut quinn::SendStream> {
        self.streams.get_mut(lane).and_then(Option::as_mut)
    }

    pub(super) fn data_streams(&self) -> usize {
        self.streams.iter().filter(|s| s.is_some()).count()
    }

    /// Ends every data stream: the relay's readers see the end once all sent is read.
    pub(super) fn finish(&mut self) {
        for send in self.streams.iter_mut().flatten() {
            let _ = send.finish();
        }
    }
}

/// The connection's send window, kept near what its congestion window can use
/// ([`spoke_transport::transport::send_window_for`]): the rest of a backlog waits in the spool, not
/// written ahead in memory.
#[derive(Default)]
pub(super) struct SendWindow {
    set: Option<u64>,
}

impl SendWindow {
    /// Before each write. Changes under an eighth are left, to spare the connection's task a
    /// wake-up per batch.
    pub(super) fn follow(&mut self, connection: &quinn::Connection) {
        let wanted =
            spoke_transport::transport::send_window_for(connection.congestion_state().window());
        let moved = self.set.is_none_or(|set| set.abs_diff(wanted) > set / 8);
        if moved {
            connection.set_send_window(wanted);
            self.set = Some(wanted);
        }
    }
}
