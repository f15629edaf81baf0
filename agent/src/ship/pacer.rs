//! `ship.max_bandwidth`: the agent's own cap on its link use, for sites whose uplink carries
//! more than spoke.

use std::time::Duration;

/// `ship.max_bandwidth`: spaces sends so the average stays under the cap.
pub(super) struct Pacer {
    bytes_per_s: u64,
    next_send: tokio::time::Instant,
}

impl Pacer {
    pub(super) fn new(bytes_per_s: u64) -> Self {
        Self {
            bytes_per_s,
            next_send: tokio::time::Instant::now(),
        }
    }

    /// Books the link time of a frame of `bytes`; returns when it may start if that is later
    /// than now.
    pub(super) fn reserve(&mut self, bytes: usize) -> Option<tokio::time::Instant> {
        if self.bytes_per_s == 0 {
            return None;
        }
        let now = tokio::time::Instant::now();
        let start = self.next_send.max(now);
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_s as f64);
        self.next_send = start + cost;
        (start > now).then_some(start)
    }
}
