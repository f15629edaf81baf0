//! A session's checkpoints in the offsets topic ([`crate::checkpoint`]): where each source
//! partition's records are in the hub, written as the hub confirms batches.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::producer::Producer;
use tracing::debug;

use super::acker::commit;
use super::SiteSession;
use crate::checkpoint::{self, Checkpoint};
use crate::config::{hub_topic, Delivery};
use crate::producer::{HubRecord, InFlight};

/// How long a well-ending session waits for a hub topic's partition ends.
pub(super) const FLOORS_WAIT: Duration = Duration::from_secs(5);
/// A session's checkpoints, raised as batches are confirmed. Without transactions they are
/// written when the session starts, at most once per `hub.checkpoint_interval` per source
/// partition, and when it ends well; with transactions, inside every batch's transaction.
pub(super) struct CheckpointWriter<'a> {
    pub(super) session: SiteSession<'a>,
    pub(super) partitions: HashMap<(String, i32), Tracked>,
    /// Transactions only: checkpoints written in the open transaction. They join the relay's
    /// view of the offsets topic once it committed, never before: an aborted batch's
    /// checkpoint would otherwise make the next session on this relay skip that batch.
    pub(super) uncommitted: Vec<(String, Checkpoint)>,
}

pub(super) struct Tracked {
    pub(super) checkpoint: Checkpoint,
    pub(super) written_at: Option<tokio::time::Instant>,
    pub(super) dirty: bool,
}

impl<'a> CheckpointWriter<'a> {
    pub(super) fn new(session: SiteSession<'a>) -> Self {
        Self {
            session,
            partitions: HashMap::new(),
            uncommitted: Vec::new(),
        }
    }

    /// The open transaction committed: its checkpoints now hold.
    pub(super) fn committed(&mut self) {
        for (key, checkpoint) in self.uncommitted.drain(..) {
            self.session.context.checkpoints.merge(key, checkpoint);
        }
    }

    pub(super) fn enabled(&self) -> bool {
        self.session.context.delivery == Delivery::ExactlyOnce
    }

    /// Takes the checkpoint the resume scan established, and writes it at once when it can
    /// (a transactional producer writes only inside a batch's transaction).
    pub(super) fn start(&mut self, topic: &str, partition: i32, checkpoint: Checkpoint) {
        self.track(topic, partition, checkpoint);
        if !self.session.transactional {
            self.write((topic.to_owned(), partition));
        }
    }

    pub(super) fn track(&mut self, topic: &str, partition: i32, checkpoint: Checkpoint) {
        let tracked = Tracked {
            checkpoint,
            written_at: None,
            dirty: true,
        };
        self.partitions
            .insert((topic.to_owned(), partition), tracked);
    }

    /// Folds in a batch that brings the partition to `next_offset`, with the hub positions
    /// its records `landed` at (none yet, for a transaction about to commit).
    pub(super) fn advance(
        &mut self,
        topic: &str,
        partition: i32,
        next_offset: i64,
        landed: &[(i32, i64)],
    ) {
        if !self.enabled() {
            return;
        }
        let SiteSession { site, context, .. } = self.session;
        let tracked = self
            .partitions
            .entry((topic.to_owned(), partition))
            .or_insert_with(|| Tracked {
                // Not reached: every partition is tracked from its resume scan or its first
                // batch. Should it happen, an empty floor is still a valid checkpoint.
                checkpoint: Checkpoint {
                    hub_topic: hub_topic(&context.topic_template, site, topic),
                    next_offset: 0,
                    scan_from: std::collections::BTreeMap::new(),
                },
                written_at: None,
                dirty: false,
            });
        tracked.checkpoint.next_offset = tracked.checkpoint.next_offset.max(next_offset);
        for &(hub_partition, hub_offset) in landed {
            tracked.checkpoint.confirmed(hub_partition, hub_offset);
        }
        tracked.dirty = true;
    }

    pub(super) fn write_if_due(&mut self, key: (String, i32)) {
        let interval = self.session.context.checkpoints.interval;
        let due = self
            .partitions
            .get(&key)
            .is_some_and(|t| t.written_at.is_none_or(|at| at.elapsed() >= interval));
        if due {
            self.write(key);
        }
    }

    /// Hands one checkpoint to the producer. Without transactions this is best effort: a
    /// checkpoint that does not make it only makes the next resume scan longer. With them,
    /// a failed write fails the commit.
    pub(super) fn write(&mut self, key: (String, i32)) -> Option<InFlight> {
        if !self.enabled() {
            return None;
        }
        let SiteSession {
            site,
            context,
            producer,
            ..
        } = self.session;
        let tracked = self.partitions.get_mut(&key)?;
        let record_key = checkpoint::key(site, &key.0, key.1);
        let value = checkpoint::encode(&tracked.checkpoint);
        let record = HubRecord::to(&context.checkpoints.topic)
            .key(record_key.as_bytes())
            .payload(&value);
        match producer.send(record) {
            Ok(delivery) => {
                tracked.dirty = false;
                tracked.written_at = Some(tokio::time::Instant::now());
                context.checkpoints.counted_write();
                if self.session.transactional {
                    self.uncommitted
                        .push((record_key, tracked.checkpoint.clone()));
                } else {
                    // Without transactions a checkpoint describes records the hub confirmed:
                    // it holds whether or not its own write makes it.
                    context
                        .checkpoints
                        .merge(record_key, tracked.checkpoint.clone());
                }
                Some(delivery)
            }
            Err((error, _)) => {
                debug!(%error, "checkpoint not written");
                None
            }
        }
    }

    /// Writes what is not written yet and waits for it: the session's producer is purged
    /// right after the session ends. Everything this session sent is confirmed by now, so
    /// every record of its partitions lies below the hub partitions' current ends: the floors
    /// rise to them, and a quiet partition in a busy hub topic resumes without a long scan.
    pub(super) async fn finish(&mut self) {
        if !self.enabled() {
            return;
        }
        let hub = &self.session.context.hub;
        let mut ends = HashMap::new();
        for tracked in self.partitions.values_mut() {
            let topic = &tracked.checkpoint.hub_topic;
            if !ends.contains_key(topic) {
                // Bounded: the agent waits for this session's Goodbye only so long, and the
                // checkpoints are still worth writing with their floors as they are.
                match tokio::time::timeout(FLOORS_WAIT, hub.partition_ends(topic)).await {
                    Ok(Ok(found)) => {
                        ends.insert(topic.clone(), found);
                    }
                    Ok(Err(error)) => debug!(%error, "cannot raise checkpoint floors"),
                    Err(_) => debug!(topic, "hub too slow to raise checkpoint floors"),
                }
            }
            for (&partition, &end) in ends.get(topic).into_iter().flatten() {
                let floor = tracked.checkpoint.scan_from.entry(partition).or_insert(0);
                if *floor < end {
                    *floor = end;
                    tracked.dirty = true;
                }
            }
        }
        let dirty: Vec<(String, i32)> = self
            .partitions
            .iter()
            .filter(|(_, tracked)| tracked.dirty)
            .map(|(key, _)| key.clone())
            .collect();
        if dirty.is_empty() {
            return;
        }
        let transactional = self.session.transactional;
        if transactional {
            if let Err(error) = self.session.producer.transactions().begin_transaction() {
                debug!(%error, "final checkpoints not written");
                return;
            }
        }
        let pending: Vec<InFlight> = dirty
            .into_iter()
            .filter_map(|key| self.write(key))
            .collect();
        if transactional {
            match commit(self.session.producer).await {
                Ok(()) => self.committed(),
                Err(error) => debug!(%error, "final checkpoints not committed"),
            }
        }
        for delivery in pending {
            if delivery.await.is_err() {
                debug!("final checkpoint not confirmed");
            }
        }
    }
}
