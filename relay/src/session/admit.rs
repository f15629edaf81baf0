//! Who may hold a session on this relay: at most `limits.max_connections_per_site`
//! connections per site, one serving session per site at a time (a newer one supersedes it
//! once what it handed to the hub producer resolved), and the teardown that frees both.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::SessionError;
use crate::producer::SessionProducer;

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

/// Ends a session's hands on its hub producer however the session ends, and only then
/// releases the site's turn to a newer session: records already handed over are waited for
/// (landed or failed; a site's own producer is purged of what is still queued first). A
/// shared producer cannot be purged for one site: the session stopped handing over, and what
/// it handed resolves within `hub.delivery_timeout`. The wait runs on `teardowns`, which the
/// server waits for at shutdown.
pub(super) struct Teardown {
    pub(super) producer: Option<SessionProducer>,
    pub(super) turn: Option<tokio::sync::OwnedMutexGuard<()>>,
    pub(super) teardowns: TaskTracker,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        let (Some(producer), Some(turn)) = (self.producer.take(), self.turn.take()) else {
            return;
        };
        if producer.is_own() {
            self.teardowns.spawn_blocking(move || {
                use rdkafka::producer::{Producer, PurgeConfig};
                let own = producer.transactions();
                own.purge(PurgeConfig::default().queue());
                if let Err(error) = own.flush(DRAIN_TIMEOUT) {
                    warn!(%error, "in-flight hub deliveries did not resolve in time");
                }
                drop(producer);
                drop(turn);
            });
        } else {
            self.teardowns.spawn(async move {
                let load = producer.load();
                if tokio::time::timeout(DRAIN_TIMEOUT, load.settled())
                    .await
                    .is_err()
                {
                    warn!(
                        records = load.records(),
                        "in-flight hub deliveries did not resolve in time"
                    );
                }
                drop(turn);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::producer::{HubRecord, ProducerPool};

    /// A shared producer with no broker behind it: what it is handed stays queued until
    /// `message.timeout.ms` fails it.
    fn unreachable_hub(timeout: Duration) -> ProducerPool {
        let mut config = rdkafka::ClientConfig::new();
        config
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("message.timeout.ms", timeout.as_millis().to_string())
            .set("log_level", "0");
        ProducerPool::new(config, 1)
    }

    #[tokio::test]
    async fn a_sites_next_session_waits_until_the_ended_ones_records_left_the_shared_producer() {
        let pool = unreachable_hub(Duration::from_secs(3));
        let producer = pool.for_site("store-1").expect("producer");
        let in_flight = producer
            .send(HubRecord::to("orders").payload(&b"r1"[..]))
            .expect("queued");
        let turns = SessionTurns::default();
        let (turn, _superseded) = turns.take("store-1").await.expect("first turn");
        let teardowns = TaskTracker::new();
        drop(Teardown {
            producer: Some(producer),
            turn: Some(turn),
            teardowns: teardowns.clone(),
        });
        let started = tokio::time::Instant::now();
        assert!(
            tokio::time::timeout(Duration::from_secs(1), turns.take("store-1"))
                .await
                .is_err(),
            "the next session went ahead while the ended one's record was still in the producer"
        );
        let (_next, _) = tokio::time::timeout(Duration::from_secs(20), turns.take("store-1"))
            .await
            .expect("the turn comes once the record left the producer")
            .expect("turn");
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(in_flight.await.is_err(), "no hub: the record failed");
        // Another site's turn never waited on this one.
        let (_other, _) = tokio::time::timeout(Duration::from_secs(1), turns.take("store-2"))
            .await
            .expect("another site")
            .expect("turn");
    }
}
