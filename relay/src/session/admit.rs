//! Who may hold a session on this relay: at most `limits.max_connections_per_site`
//! connections per site, one serving session per site at a time (a newer one supersedes it
//! once its producer drained), and the teardown that frees both.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::SessionError;

/// How long a new session waits for the previous session of its site to drain.
pub(super) const TURN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a closing session waits for its in-flight hub deliveries to resolve.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Serialises sessions of one site within this relay.
#[derive(Debug, Default)]
pub struct SessionTurns {
    pub(super) sites: std::sync::Mutex<HashMap<String, Slot>>,
}

#[derive(Debug)]
pub(super) struct Slot {
    pub(super) turn: Arc<tokio::sync::Mutex<()>>,
    pub(super) current: CancellationToken,
}

impl SessionTurns {
    /// Supersedes the site's current session, waits until it has drained, and returns this
    /// session's turn plus the token that a later session will cancel.
    pub(super) async fn take(
        &self,
        site: &str,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, CancellationToken), SessionError> {
        let mine = CancellationToken::new();
        let turn = {
            let mut sites = self
                .sites
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let slot = sites.entry(site.to_owned()).or_insert_with(|| Slot {
                turn: Arc::new(tokio::sync::Mutex::new(())),
                current: CancellationToken::new(),
            });
            std::mem::replace(&mut slot.current, mine.clone()).cancel();
            slot.turn.clone()
        };
        let guard = tokio::time::timeout(TURN_TIMEOUT, turn.lock_owned())
            .await
            .map_err(|_| SessionError::TurnTimeout)?;
        Ok((guard, mine))
    }
}

/// Open connections per site, for `limits.max_connections_per_site`.
#[derive(Debug, Default)]
pub struct SiteConnections {
    pub(super) sites: Arc<std::sync::Mutex<HashMap<String, u32>>>,
}

/// One counted connection of a site; dropping it uncounts it.
#[derive(Debug)]
pub(super) struct SiteSlot {
    pub(super) sites: Arc<std::sync::Mutex<HashMap<String, u32>>>,
    pub(super) site: String,
}

impl SiteConnections {
    pub(super) fn take(&self, site: &str, max: u32) -> Result<SiteSlot, SessionError> {
        let mut sites = self
            .sites
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let open = sites.entry(site.to_owned()).or_default();
        if *open >= max {
            return Err(SessionError::TooManySiteConnections { max });
        }
        *open += 1;
        Ok(SiteSlot {
            sites: self.sites.clone(),
            site: site.to_owned(),
        })
    }
}

impl Drop for SiteSlot {
    fn drop(&mut self) {
        let mut sites = self
            .sites
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(open) = sites.get_mut(&self.site) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                sites.remove(&self.site);
            }
        }
    }
}

/// Ends a session's hub producer however the session ends: queued records are purged, and
/// records already sent are waited for (landed or failed), and only then is the site's turn
/// released to a newer session. The blocking part runs on `teardowns`, which the server
/// waits for at shutdown.
pub(super) struct Teardown {
    pub(super) producer: Option<FutureProducer>,
    pub(super) turn: Option<tokio::sync::OwnedMutexGuard<()>>,
    pub(super) teardowns: TaskTracker,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        let (Some(producer), Some(turn)) = (self.producer.take(), self.turn.take()) else {
            return;
        };
        self.teardowns.spawn_blocking(move || {
            use rdkafka::producer::{Producer, PurgeConfig};
            producer.purge(PurgeConfig::default().queue());
            if let Err(error) = producer.flush(DRAIN_TIMEOUT) {
                warn!(%error, "in-flight hub deliveries did not resolve in time");
            }
            drop(producer);
            drop(turn);
        });
    }
}
