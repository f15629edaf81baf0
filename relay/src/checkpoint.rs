//! Checkpoints in the hub topic `spoke.offsets` (`hub.offsets_topic`): how far each site's
//! source partition is in the hub, and from which hub offsets on the resume scan must look.
//!
//! A checkpoint is a promise about records already confirmed by the hub, never about records
//! in flight, so it can only be stale, never wrong: a crash between data and checkpoint leaves
//! an older checkpoint, and the resume scan past it (see [`crate::hub::Hub::resume_point`])
//! finds what landed after it. That is why checkpoints are written at most once per
//! `hub.checkpoint_interval` per partition, and why a lost checkpoint write is harmless.
//!
//! Record layout: key `site/topic/partition` (neither a DNS name nor a Kafka topic can contain
//! `/`), value JSON `{"hub_topic": .., "next_offset": N, "scan_from": {"q": H, ..}}`. Every
//! relay follows the topic from its beginning into memory (a view rebuilt from the hub, not
//! local state); on a hub with compaction the topic stays one record per key.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use spoke_process::logging::LogLimiter;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::hub::{Hub, HubError};

/// At most this many checkpoints are kept in memory: one per source partition of the fleet,
/// so this is a guard against a polluted offsets topic, not a working limit.
const MAX_KEYS: usize = 1_000_000;

/// What one checkpoint promises for one (site, source topic, source partition).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The hub topic the records went to. A checkpoint for another hub topic (the template
    /// changed) says nothing about the current one.
    pub hub_topic: String,
    /// Every record of the source partition below this source offset is in the hub (or never
    /// existed: compaction and transaction markers leave holes).
    pub next_offset: i64,
    /// Per hub partition: every record of this source partition stored below this hub offset
    /// has a source offset below `next_offset`, so the resume scan can stop there.
    pub scan_from: BTreeMap<i32, i64>,
}

impl Checkpoint {
    /// Folds in a record of this source partition that the hub confirmed at `hub_offset` of
    /// `hub_partition`, as part of a batch that brings the partition to `next_offset`.
    pub fn confirmed(&mut self, hub_partition: i32, hub_offset: i64) {
        let from = self.scan_from.entry(hub_partition).or_insert(0);
        *from = (*from).max(hub_offset + 1);
    }
}

/// The key of a checkpoint record.
pub fn key(site: &str, topic: &str, partition: i32) -> String {
    format!("{site}/{topic}/{partition}")
}

/// Parses a checkpoint record's value; `None` for anything that is not one.
pub fn decode(value: &[u8]) -> Option<Checkpoint> {
    let checkpoint: Checkpoint = serde_json::from_slice(value).ok()?;
    let sane = checkpoint.next_offset >= 0
        && checkpoint
            .scan_from
            .iter()
            .all(|(&partition, &offset)| partition >= 0 && offset >= 0);
    sane.then_some(checkpoint)
}

pub fn encode(checkpoint: &Checkpoint) -> Vec<u8> {
    // Serialising plain integers and strings into a Vec cannot fail.
    serde_json::to_vec(checkpoint).unwrap_or_default()
}

/// This relay's view of `spoke.offsets`, fed by [`Checkpoints::follow`] and by the relay's own
/// writes.
#[derive(Debug)]
pub struct Checkpoints {
    pub topic: String,
    pub interval: Duration,
    latest: Mutex<HashMap<String, Checkpoint>>,
    /// True once the view holds everything the topic held when this relay started.
    caught_up: tokio::sync::watch::Sender<bool>,
    written: Counter,
    read: Counter,
    scanned: Counter,
}

impl Checkpoints {
    pub fn new(topic: String, interval: Duration) -> Self {
        Self {
            topic,
            interval,
            latest: Mutex::new(HashMap::new()),
            caught_up: tokio::sync::watch::Sender::new(false),
            written: Counter::default(),
            read: Counter::default(),
            scanned: Counter::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "spoke_relay_checkpoints_written",
            "Checkpoints this relay handed to the hub producer",
            self.written.clone(),
        );
        registry.register(
            "spoke_relay_checkpoints_read",
            "Checkpoint records read back from the offsets topic",
            self.read.clone(),
        );
        registry.register(
            "spoke_relay_resume_scanned_records",
            "Hub records read by resume scans (checkpoints keep this small)",
            self.scanned.clone(),
        );
    }

    /// Waits until the view has read the topic up to where it ended when the relay started,
    /// or `timeout` passed: a session that starts earlier still resumes exactly, only with a
    /// longer scan.
    pub async fn wait_caught_up(&self, timeout: Duration) {
        let mut caught_up = self.caught_up.subscribe();
        let _ = tokio::time::timeout(timeout, caught_up.wait_for(|&done| done)).await;
    }

    /// The newest checkpoint of a source partition for `hub_topic`.
    pub fn get(
        &self,
        site: &str,
        topic: &str,
        partition: i32,
        hub_topic: &str,
    ) -> Option<Checkpoint> {
        self.lock()
            .get(&key(site, topic, partition))
            .filter(|checkpoint| checkpoint.hub_topic == hub_topic)
            .cloned()
    }

    /// Takes `checkpoint` into the view if it is at least as far as the one held. Several
    /// relays may write a key (and a relay that lost a site may write late); every
    /// checkpoint is valid, so the one furthest along wins whatever the order.
    pub fn merge(&self, key: String, checkpoint: Checkpoint) {
        let mut latest = self.lock();
        if latest.len() >= MAX_KEYS && !latest.contains_key(&key) {
            return;
        }
        let newer = latest.get(&key).is_none_or(|held| {
            held.hub_topic != checkpoint.hub_topic || held.next_offset <= checkpoint.next_offset
        });
        if newer {
            latest.insert(key, checkpoint);
        }
    }

    pub fn counted_write(&self) {
        self.written.inc();
    }

    pub fn counted_scan(&self, records: u64) {
        self.scanned.inc_by(records);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Checkpoint>> {
        // A view that is rebuilt from the hub: a panic elsewhere cannot corrupt what matters.
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the offsets topic from its beginning and keeps following it until `shutdown`.
    /// Blocking: run it on a blocking thread. Errors are logged and retried, because the
    /// view is an optimisation: without it, resume scans are only longer.
    pub fn follow(&self, hub: &Hub, shutdown: &CancellationToken) {
        let error_log = LogLimiter::new(Duration::from_secs(60));
        while !shutdown.is_cancelled() {
            if let Err(error) = self.follow_once(hub, shutdown) {
                if error_log.allow().is_some() {
                    warn!(topic = %self.topic, %error, "cannot read checkpoints; resume scans fall back to the hub tail");
                }
                for _ in 0..50 {
                    if shutdown.is_cancelled() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn follow_once(&self, hub: &Hub, shutdown: &CancellationToken) -> Result<(), HubError> {
        let consumer = hub.consumer("spoke-relay-checkpoints")?;
        let kafka = |source| HubError::Scan {
            topic: self.topic.clone(),
            partition: -1,
            source,
        };
        let metadata = consumer
            .fetch_metadata(Some(&self.topic), Duration::from_secs(10))
            .map_err(kafka)?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == self.topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len());
        if partitions == 0 {
            return Err(HubError::TopicNotReady {
                topic: self.topic.clone(),
            });
        }
        let mut assignment = TopicPartitionList::new();
        for partition in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
            assignment
                .add_partition_offset(&self.topic, partition, Offset::Beginning)
                .map_err(kafka)?;
        }
        consumer.assign(&assignment).map_err(kafka)?;
        let mut behind = HashMap::new();
        for partition in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
            let (low, high) = consumer
                .fetch_watermarks(&self.topic, partition, Duration::from_secs(10))
                .map_err(kafka)?;
            if high > low {
                behind.insert(partition, high);
            }
        }
        while !shutdown.is_cancelled() {
            if behind.is_empty() {
                self.caught_up.send_replace(true);
            }
            let Some(result) = consumer.poll(Duration::from_millis(250)) else {
                // Transaction markers end a partition without a record to read: the
                // consumer's position still passes them.
                if !behind.is_empty() {
                    let position = consumer.position().map_err(kafka)?;
                    for element in position.elements() {
                        if let Offset::Offset(next) = element.offset() {
                            if behind
                                .get(&element.partition())
                                .is_some_and(|&end| next >= end)
                            {
                                behind.remove(&element.partition());
                            }
                        }
                    }
                }
                continue;
            };
            let message = result.map_err(kafka)?;
            if behind
                .get(&message.partition())
                .is_some_and(|&end| message.offset() + 1 >= end)
            {
                behind.remove(&message.partition());
            }
            let (Some(key), Some(value)) = (message.key(), message.payload()) else {
                continue;
            };
            let (Ok(key), Some(checkpoint)) = (std::str::from_utf8(key), decode(value)) else {
                debug!(
                    offset = message.offset(),
                    "skipping a record that is not a checkpoint"
                );
                continue;
            };
            self.read.inc();
            self.merge(key.to_owned(), checkpoint);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(next_offset: i64, scan_from: &[(i32, i64)]) -> Checkpoint {
        Checkpoint {
            hub_topic: "b1.orders".into(),
            next_offset,
            scan_from: scan_from.iter().copied().collect(),
        }
    }

    #[test]
    fn round_trips_and_rejects_garbage() {
        let original = checkpoint(42, &[(0, 7), (3, 9)]);
        assert_eq!(decode(&encode(&original)), Some(original));
        assert_eq!(decode(b"not json"), None);
        assert_eq!(
            decode(br#"{"hub_topic":"t","next_offset":-1,"scan_from":{}}"#),
            None
        );
        assert_eq!(
            decode(br#"{"hub_topic":"t","next_offset":1,"scan_from":{"0":-5}}"#),
            None
        );
    }

    #[test]
    fn the_furthest_checkpoint_wins_in_any_order() {
        let view = Checkpoints::new("spoke.offsets".into(), Duration::from_secs(1));
        let k = key("b1", "orders", 0);
        view.merge(k.clone(), checkpoint(50, &[(0, 60)]));
        view.merge(k.clone(), checkpoint(40, &[(0, 45)]));
        assert_eq!(
            view.get("b1", "orders", 0, "b1.orders"),
            Some(checkpoint(50, &[(0, 60)]))
        );
        view.merge(k, checkpoint(51, &[(0, 61)]));
        assert_eq!(
            view.get("b1", "orders", 0, "b1.orders")
                .map(|c| c.next_offset),
            Some(51)
        );
        assert_eq!(
            view.get("b1", "orders", 0, "other"),
            None,
            "another hub topic"
        );
    }

    #[test]
    fn confirmed_records_raise_the_scan_floor() {
        let mut progress = checkpoint(10, &[(0, 5)]);
        progress.confirmed(0, 20);
        progress.confirmed(0, 18);
        progress.confirmed(2, 3);
        assert_eq!(progress.scan_from, [(0, 21), (2, 4)].into_iter().collect());
    }
}
