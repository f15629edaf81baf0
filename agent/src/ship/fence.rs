//! The fence as a session keeps it: the wait before batches may go to another relay process,
//! and the durable promise, renewed ahead of time, that they may go to this one.
//!
//! Without broker transactions a relay that lost us may still have records in flight to the
//! hub (DESIGN.md, fencing). A session with a *different* relay process therefore starts only
//! `relay.fence_delay` after the last batch that went to the previous one.

use std::path::Path;
use std::time::Duration;

use super::ShipError;
use crate::fence::{self, Fence};

/// The agent's fence, borrowed by one session.
pub(super) struct SessionFence<'a> {
    /// The fence as last written (read from its file at start).
    pub(super) held: &'a mut Option<Fence>,
    pub(super) path: &'a Path,
    /// `relay.fence_delay`.
    pub(super) delay: Duration,
}

impl SessionFence<'_> {
    /// The relay process the fence names, if any.
    pub(super) fn relay(&self) -> Option<&str> {
        self.held.as_ref().map(|fence| fence.relay.as_str())
    }

    /// Whether batches may go to `relay` now. A resume point computed before the wait is over
    /// is not trusted, so a fenced session is dropped and opened again after the wait.
    pub(super) fn check(&self, relay: &str) -> Result<(), ShipError> {
        let Some(fence) = self.held.as_ref() else {
            return Ok(());
        };
        let wait = fence::wait(fence, relay, &fence::Instant::now(), self.delay);
        if wait.is_zero() {
            return Ok(());
        }
        Err(ShipError::Fenced {
            previous: fence.relay.clone(),
            wait,
        })
    }

    /// Records, durably and ahead of time, that batches may go to `relay` for the next
    /// second, so that even a restart after a crash honours the fence.
    pub(super) async fn extend(&mut self, relay: &str) -> Result<(), ShipError> {
        let now = fence::Instant::now();
        if let Some(held) = self.held.as_ref() {
            if held.relay == relay && held.until.left_after(&now) > fence::SLACK / 2 {
                return Ok(());
            }
        }
        let fence = Fence {
            relay: relay.to_owned(),
            until: now.after(fence::SLACK),
        };
        // Two fsyncs (the file and its directory), a few ms: off the async workers.
        let (path, written) = (self.path.to_owned(), fence.clone());
        tokio::task::spawn_blocking(move || fence::write(&path, &written))
            .await
            .map_err(std::io::Error::other)
            .and_then(|result| result)
            .map_err(|source| ShipError::FenceFile {
                path: self.path.to_owned(),
                source,
            })?;
        *self.held = Some(fence);
        Ok(())
    }
}
