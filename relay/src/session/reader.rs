//! One of a session's streams, read to its end: each frame goes through the protocol's rules
//! for its stream (`InboundStream`), then batches to [`super::batch`], dictionaries stay with
//! the stream, topic configurations and heartbeats with the session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use spoke_proto::connection::relay::{Inbound, InboundStream, PartitionStreams};
use spoke_proto::{Nack, Rejected, TopicConfig, CARRIED_TOPIC_CONFIGS};
use spoke_transport::wire::{read_frame_when_it_comes, read_frame_within};
use tokio::sync::{mpsc, OwnedMutexGuard};
use tracing::{debug, info, warn};

use super::{SessionError, SiteSession};
use crate::checkpoint::Checkpoint;
use crate::handoff::{Gates, Pending};
use crate::hub_limits::TimestampWindow;

/// What a session lets through to one hub topic ([`crate::hub_limits`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct HubTopicLimits {
    pub(super) record_bytes: usize,
    pub(super) timestamps: TimestampWindow,
}
/// What the acker answers, in the order batches arrived.
pub(super) enum Outcome {
    Produced(Produced),
    Refused(Nack),
}

/// A batch handed to the producer, which the acker answers once the hub confirmed all of it.
pub(super) struct Produced {
    pub(super) seq: u64,
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) next_offset: i64,
    pub(super) deliveries: Vec<Pending>,
    /// The batch's records the hub refuses, for the agent ([`crate::dead_letter`]).
    pub(super) rejected: Option<Box<Rejected>>,
    /// Their dead-letter copies.
    pub(super) dead_letters: Vec<crate::producer::InFlight>,
    /// For the first batch of a partition the Hello did not name: the checkpoint that held
    /// before it.
    pub(super) base: Option<Checkpoint>,
    /// Transactions only: the batch's open transaction, released once it is committed.
    pub(super) transaction: Option<OwnedMutexGuard<()>>,
}

/// The most source topics whose configuration one session keeps: more than any site has.
pub(super) const MAX_CARRIED_TOPICS: usize = 4096;

/// A created hub topic's configuration: what the agent carried from the source topic, with
/// `[hub.topic_config]` (`configured`) taking precedence name by name.
pub(super) fn hub_topic_config(
    carried: Vec<(String, String)>,
    configured: &[(String, String)],
) -> Vec<(String, String)> {
    let mut merged: Vec<(String, String)> = carried
        .into_iter()
        .filter(|(name, _)| !configured.iter().any(|(own, _)| own == name))
        .collect();
    merged.extend(configured.iter().cloned());
    merged
}

/// What the readers of one session share, per source partition.
pub(super) struct Partitions {
    /// The first offset not yet handed to the producer in this session; records below it are
    /// already in the hub (a chunk may straddle the resume point).
    pub(super) resume: HashMap<(String, i32), i64>,
    /// Per hub topic, its partition count as this session resolved it: records are placed
    /// and resume points scanned by it, so one session never mixes two layouts.
    pub(super) layouts: HashMap<String, i32>,
    /// Per hub topic, what it takes, as this session learned it.
    pub(super) topic_limits: HashMap<String, HubTopicLimits>,
    /// Per source topic, the configuration the agent says its hub topic must keep
    /// (`TopicConfig`, only names in [`CARRIED_TOPIC_CONFIGS`]); at most
    /// [`MAX_CARRIED_TOPICS`] topics.
    pub(super) carried: HashMap<String, Vec<(String, String)>>,
    /// The stream each partition's batches arrive on: one, so that they reach the producer in
    /// order.
    pub(super) streams: PartitionStreams,
    /// When the control stream last carried a frame (a heartbeat, or a batch from an agent
    /// without data streams): records are handed to the producer only until
    /// `handover_window` after it (`StreamReader::handover_deadline`).
    pub(super) last_heard_at: tokio::time::Instant,
}

pub(super) struct StreamReader<'a> {
    pub(super) session: SiteSession<'a>,
    /// The stream this reads, as the protocol's rules see it: which one, the dictionaries sent
    /// on it, whether it ended.
    pub(super) stream: InboundStream,
    pub(super) partitions: &'a Mutex<Partitions>,
    pub(super) queue: mpsc::Sender<Outcome>,
    /// Transactions only: held from a batch's `begin_transaction` to its commit.
    pub(super) transaction: Option<Arc<tokio::sync::Mutex<()>>>,
    /// Per partition of this stream, the last group of records handed to the producer.
    pub(super) gates: Gates,
}

impl StreamReader<'_> {
    /// Reads the stream to its end; returns which stream it was.
    pub(super) async fn run(mut self, mut recv: quinn::RecvStream) -> Result<u64, SessionError> {
        let limits = &self.session.context.frame_limits;
        let stall = self.session.context.limits.read_timeout;
        loop {
            // The control stream carries a heartbeat every 2 s, so silence there means a lost
            // agent; a data stream is quiet whenever its partitions have nothing to send.
            let frame = if self.stream.is_control() {
                read_frame_within(&mut recv, limits, stall).await?
            } else {
                read_frame_when_it_comes(&mut recv, limits, stall).await?
            };
            let outcome = match self.stream.receive(frame)? {
                Inbound::Batch(batch) => {
                    // Only the control stream's frames say that the agent is still there: a
                    // data stream's frames wait in QUIC's buffers while their reader waits for
                    // the hub, and may be read long after the agent died. With data streams
                    // the control stream carries heartbeats alone and is read at once.
                    if self.stream.is_control() {
                        self.lock_partitions().last_heard_at = tokio::time::Instant::now();
                    }
                    self.handle_batch(batch).await?
                }
                Inbound::Dictionary { id, bytes } => {
                    debug!(id, bytes, "dictionary");
                    continue;
                }
                Inbound::TopicConfig(config) => {
                    self.carry(config);
                    continue;
                }
                Inbound::Heartbeat(heartbeat) => {
                    self.lock_partitions().last_heard_at = tokio::time::Instant::now();
                    debug!(spool_bytes = heartbeat.spool_bytes, "heartbeat");
                    self.session
                        .context
                        .fleet
                        .heartbeat(self.session.site, heartbeat);
                    continue;
                }
                Inbound::Goodbye(goodbye) => {
                    info!(reason = %goodbye.reason, "agent said goodbye");
                    return Ok(self.stream.id());
                }
                Inbound::End => return Ok(self.stream.id()),
            };
            if self.queue.send(outcome).await.is_err() {
                // The acker ended; its result is what the session reports.
                return Ok(self.stream.id());
            }
        }
    }

    pub(super) fn lock_partitions(&self) -> std::sync::MutexGuard<'_, Partitions> {
        self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps what of `config` a hub topic may take from its site: the names in
    /// [`CARRIED_TOPIC_CONFIGS`], nothing that could change what the hub keeps beyond them.
    pub(super) fn carry(&self, config: TopicConfig) {
        let (kept, ignored): (Vec<_>, Vec<_>) = config
            .entries
            .into_iter()
            .partition(|(name, _)| CARRIED_TOPIC_CONFIGS.contains(&name.as_str()));
        if !ignored.is_empty() {
            let names: Vec<&str> = ignored.iter().map(|(name, _)| name.as_str()).collect();
            debug!(topic = %config.topic, ?names, "topic configuration not carried to the hub");
        }
        let mut partitions = self.lock_partitions();
        if partitions.carried.len() >= MAX_CARRIED_TOPICS
            && !partitions.carried.contains_key(&config.topic)
        {
            warn!(topic = %config.topic, "too many topic configurations in one session; this one is not carried");
            return;
        }
        debug!(topic = %config.topic, entries = ?kept, "topic configuration");
        partitions.carried.insert(config.topic, kept);
    }

    /// The time by which a record must be in the hub producer's hands. The agent moves to
    /// another relay no sooner than its fence delay after its last batch or heartbeat to this
    /// one, and a record handed over lands (or fails) within `hub.delivery_timeout`: handing
    /// one over later could let it land while another relay resumes the site.
    pub(super) fn handover_deadline(&self) -> tokio::time::Instant {
        self.lock_partitions().last_heard_at + self.session.context.handover_window
    }

    /// Waits for `wait` (the hub taking earlier records), but never past the hand-over
    /// deadline, which moves on while the agent keeps sending.
    pub(super) async fn before_deadline<F: std::future::Future>(
        &self,
        wait: F,
    ) -> Result<F::Output, SessionError> {
        tokio::pin!(wait);
        loop {
            let deadline = self.handover_deadline();
            if let Ok(done) = tokio::time::timeout_at(deadline, &mut wait).await {
                return Ok(done);
            }
            if self.handover_deadline() <= deadline {
                return Err(SessionError::HandoverLate {
                    window: self.session.context.handover_window,
                });
            }
        }
    }

    /// The partition count of `target`, the hub topic of source `topic`, for this session:
    /// resolved (and created if missing) at its first batch unless the Hello's resume scans
    /// already did. A created topic takes the configuration the agent carried for `topic`,
    /// overridden by `[hub.topic_config]`.
    pub(super) async fn layout(
        &self,
        topic: &str,
        target: &str,
        source_partitions: i32,
    ) -> Result<i32, SessionError> {
        let lock = || self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&count) = lock().layouts.get(target) {
            return Ok(count);
        }
        let context = self.session.context;
        let configs = if target == context.rejects.dead_letter_topic {
            Vec::new()
        } else {
            let carried = lock().carried.get(topic).cloned().unwrap_or_default();
            hub_topic_config(carried, &context.topic_config)
        };
        let count = context
            .hub
            .resolve_topic(target, source_partitions, &configs)
            .await?;
        // Another stream may have resolved it meanwhile: the first answer holds.
        Ok(*lock().layouts.entry(target.to_owned()).or_insert(count))
    }

    /// What `target` takes, asked once per session: records up to the least of
    /// `hub.max_record_bytes`, the topic's `max.message.bytes` and what the producer takes;
    /// timestamps as the topic's configuration says.
    pub(super) async fn topic_limits(&self, target: &str) -> HubTopicLimits {
        let context = self.session.context;
        let lock = || self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&limits) = lock().topic_limits.get(target) {
            return limits;
        }
        let described = context.hub.topic_limits(target).await;
        // A `hub.max_record_bytes` above what the topic takes would be a stall, not a choice.
        let record_bytes = [
            context.rejects.max_record_bytes,
            described.max_message_bytes,
        ]
        .into_iter()
        .flatten()
        .fold(crate::config::MAX_RECORD_BYTES, usize::min);
        let limits = HubTopicLimits {
            record_bytes,
            timestamps: described.timestamps,
        };
        *lock()
            .topic_limits
            .entry(target.to_owned())
            .or_insert(limits)
    }
}

impl Partitions {
    pub(super) fn new(resume: HashMap<(String, i32), i64>, layouts: HashMap<String, i32>) -> Self {
        Partitions {
            resume,
            layouts,
            topic_limits: HashMap::new(),
            carried: HashMap::new(),
            streams: PartitionStreams::default(),
            last_heard_at: tokio::time::Instant::now(),
        }
    }
}
