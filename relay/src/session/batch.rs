//! One batch into the hub: the site's ACL, the hub topic and its layout, records below the
//! resume point skipped, what the hub would refuse to the dead-letter topic, and the rest handed
//! to the producer in groups ([`crate::handoff`]) within the hand-over deadline.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::Producer;
use spoke_proto::{Batch, Nack, NackCode, Record, Rejected};
use std::time::Duration;
use tokio::sync::OwnedMutexGuard;
use tracing::warn;

use super::reader::{HubTopicLimits, Outcome, Produced, StreamReader};
use super::{SessionError, SiteSession};
use crate::checkpoint::Checkpoint;
use crate::config::{hub_topic, Acl, Delivery, OnRejected};
use crate::dead_letter;
use crate::handoff::{self, Pending};
use crate::hub::{HEADER_OFFSET, HEADER_ORIGIN, HEADER_PARTITION};
use crate::hub_limits::TimestampWindow;
use crate::producer::{HubRecord, InFlight, SessionProducer};

impl StreamReader<'_> {
    /// The site's ACL's verdict on `batch`: a `Nack` where it may not write the topic.
    pub(super) fn not_allowed(&self, batch: &Batch) -> Option<Nack> {
        let SiteSession { site, context, .. } = self.session;
        let allowed = context
            .acl
            .borrow()
            .site(site)
            .is_some_and(|patterns| Acl::allows(patterns, &batch.topic));
        if allowed {
            return None;
        }
        context.fleet.rejected(crate::fleet::reject::NOT_ALLOWED);
        warn!(topic = %batch.topic, "batch for a topic this site may not write");
        Some(Nack {
            seq: batch.seq,
            code: NackCode::NotAllowed,
            message: format!("site {} may not write topic {}", site, batch.topic),
        })
    }

    /// Checks what the peer declares about `batch` and names its hub topic; the reason the
    /// hub refuses the topic as a whole, if it does.
    pub(super) fn hub_target(
        &self,
        batch: &Batch,
    ) -> Result<(String, Option<&'static str>), SessionError> {
        let SiteSession { site, context, .. } = self.session;
        let bad_batch = |reason: String| bad_batch(batch, reason);
        // A count of 0 means the agent does not know it (yet); see `Hub::ensure_topic`.
        if batch.partition < 0
            || batch.partition_count < 0
            || (batch.partition_count > 0 && batch.partition >= batch.partition_count)
        {
            return Err(bad_batch(format!(
                "partition outside the declared count {}",
                batch.partition_count
            )));
        }
        let max_partitions = context.limits.max_partitions_per_topic;
        if batch.partition_count.unsigned_abs() > max_partitions {
            // The count sizes a hub topic the relay may create: it must not be the peer's
            // choice without bound.
            return Err(bad_batch(format!(
                "partition count {} above limits.max_partitions_per_topic {max_partitions}",
                batch.partition_count
            )));
        }
        if batch.next_offset <= batch.last_offset {
            return Err(bad_batch("next offset not past the last record".into()));
        }
        let target = hub_topic(&context.topic_template, site, &batch.topic);
        // The template and the site name are valid by configuration, and an edge broker
        // allows no other characters: only a peer's error can put them in the name. But a
        // long edge topic name under the template is the hub refusing the topic.
        let topic_refused = match crate::hub_limits::check_topic_name(&target) {
            Ok(()) => None,
            Err(crate::hub_limits::TopicNameError::TooLong) => {
                Some(dead_letter::reason::HUB_TOPIC_INVALID)
            }
            Err(error) => return Err(bad_batch(format!("hub topic name {target:?}: {error}"))),
        };
        Ok((target, topic_refused))
    }

    /// Where `key`'s records of this batch start (records below it are in the hub), and for
    /// a partition the Hello did not name, the checkpoint that held before its first batch.
    pub(super) async fn resume_from(
        &self,
        batch: &Batch,
        target: &str,
        topic_refused: Option<&'static str>,
    ) -> Result<(i64, Option<Checkpoint>), SessionError> {
        let context = self.session.context;
        let key = (batch.topic.clone(), batch.partition);
        let resume_from = {
            let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
            partitions.streams.pin(batch, self.stream.id())?;
            partitions.resume.get(&key).copied()
        };
        // A partition the Hello did not name had nothing unacknowledged: all its earlier
        // records are in the hub, below the partitions' current ends.
        let base = match (resume_from, context.delivery) {
            (None, Delivery::ExactlyOnce) if topic_refused.is_none() => Some(Checkpoint {
                hub_topic: target.to_owned(),
                next_offset: 0,
                scan_from: context.hub.partition_ends(target).await?,
            }),
            _ => None,
        };
        Ok((resume_from.unwrap_or(0), base))
    }

    /// With transactions: waits for the previous batch's commit and opens this batch's.
    pub(super) async fn open_transaction(
        &self,
    ) -> Result<Option<OwnedMutexGuard<()>>, SessionError> {
        let Some(lock) = &self.transaction else {
            return Ok(None);
        };
        let open = self.before_deadline(lock.clone().lock_owned()).await?;
        self.session
            .producer
            .transactions()
            .begin_transaction()
            .map_err(SessionError::Transaction)?;
        Ok(Some(open))
    }

    /// One batch into the hub: refused as a whole where the site may not write its topic;
    /// otherwise its records from the resume point on handed to the producer (or the
    /// dead-letter topic), and what the acker is to answer once they landed.
    pub(super) async fn handle_batch(&mut self, batch: Batch) -> Result<Outcome, SessionError> {
        if let Some(nack) = self.not_allowed(&batch) {
            return Ok(Outcome::Refused(nack));
        }
        let context = self.session.context;
        let (target, topic_refused) = self.hub_target(&batch)?;
        let records = batch
            .records_with(&context.batch_limits, self.stream.dictionaries())
            .map_err(|e| bad_batch(&batch, e.to_string()))?;
        if batch.codec.dictionary_id().is_some() {
            context.fleet.dictionary_batch();
        }
        let hub_partition = match topic_refused {
            Some(_) => -1,
            None => {
                let hub_partitions = self
                    .layout(&batch.topic, &target, batch.partition_count)
                    .await?;
                crate::hub::hub_partition(batch.partition, hub_partitions)
            }
        };
        let key = (batch.topic.clone(), batch.partition);
        let (resume_from, base) = self.resume_from(&batch, &target, topic_refused).await?;
        // Outside the transaction lock: with transactions the previous batch was committed,
        // so its records landed, before the lock is free.
        self.before_deadline(self.gates.wait(&key))
            .await?
            .map_err(SessionError::Delivery)?;
        let transaction = self.open_transaction().await?;
        let destination = Destination {
            target: &target,
            hub_partition,
            topic_refused,
        };
        let handed = self
            .hand_over(&batch, &records, resume_from, &destination, &key)
            .await?;
        self.partitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resume
            .insert(key, batch.next_offset);
        Ok(handed.into_outcome(batch, base, transaction))
    }

    /// Hands the batch's `records` from `resume_from` on to the producer, in groups that each
    /// wait for the partition's group before them to land (`key`'s gate); a record the hub
    /// would refuse goes to the dead-letter topic instead.
    async fn hand_over(
        &mut self,
        batch: &Batch,
        records: &[Record],
        resume_from: i64,
        destination: &Destination<'_>,
        key: &(String, i32),
    ) -> Result<HandedOver, SessionError> {
        let SiteSession { site, context, .. } = self.session;
        let partition_text = batch.partition.to_string();
        let mut handed = HandedOver {
            deliveries: Vec::with_capacity(records.len()),
            dead_letters: Vec::new(),
            refused: dead_letter::Runs::default(),
            refusal_reason: None,
        };
        let mut grouping = handoff::Grouping::default();
        let mut last: Option<InFlight> = None;
        let provenance = provenance_bytes(site, &partition_text);
        let limits = self.record_limits(destination).await;
        let now_ms = unix_millis();
        for record in records.iter().filter(|r| r.offset >= resume_from) {
            let offset_text = record.offset.to_string();
            let record_bytes = handoff::record_bytes(record, provenance + offset_text.len());
            let reason = destination.topic_refused.or(hub_refuses(
                record,
                record_bytes,
                &limits,
                now_ms,
                context.rejects.in_flight,
            ));
            if let Some(reason) = reason {
                let refusal = dead_letter::Refusal {
                    site,
                    topic: &batch.topic,
                    partition: batch.partition,
                    hub_topic: destination.target,
                    reason,
                };
                let copy = self
                    .dead_letter(record, &refusal, limits.record_bytes)
                    .await?;
                handed.dead_lettered(record.offset, reason, copy);
                continue;
            }
            handed.refused.accepted();
            if grouping.starts_group(record_bytes) {
                if let Some(last) = last.take() {
                    handed.deliveries.push(self.gates.close(key.clone(), last));
                }
                self.before_deadline(self.gates.wait(key))
                    .await?
                    .map_err(SessionError::Delivery)?;
            }
            let headers = with_provenance(record, site, &partition_text, &offset_text);
            let hub_record = hub_record(
                destination.target,
                destination.hub_partition,
                record,
                headers,
            );
            let delivery = enqueue(
                self.session.producer,
                hub_record,
                || self.handover_deadline(),
                context.handover_window,
            )
            .await?;
            if let Some(previous) = last.replace(delivery) {
                handed.deliveries.push(Pending::Record(previous));
            }
        }
        if let Some(last) = last {
            handed.deliveries.push(self.gates.close(key.clone(), last));
        }
        Ok(handed)
    }

    /// What the batch's records are judged by. A topic the hub refuses as a whole is not
    /// asked: all its records go to the dead-letter topic, whose own limits bound the copies.
    async fn record_limits(&self, destination: &Destination<'_>) -> HubTopicLimits {
        match destination.topic_refused {
            Some(_) => HubTopicLimits {
                record_bytes: crate::config::MAX_RECORD_BYTES,
                timestamps: TimestampWindow::ANY,
            },
            None => self.topic_limits(destination.target).await,
        }
    }

    /// Hands `record`'s dead-letter copy to the producer, or ends the session where
    /// `hub.on_rejected = "stop"`.
    pub(super) async fn dead_letter(
        &self,
        record: &Record,
        refusal: &dead_letter::Refusal<'_>,
        record_limit: usize,
    ) -> Result<InFlight, SessionError> {
        let context = self.session.context;
        let rejects = &context.rejects;
        if rejects.policy == OnRejected::Stop {
            return Err(SessionError::Refused {
                topic: refusal.topic.to_owned(),
                partition: refusal.partition,
                offset: record.offset,
                reason: refusal.reason,
            });
        }
        // Created at the first refusal, like any hub topic; one partition holds the few.
        self.layout("", &rejects.dead_letter_topic, 1).await?;
        // The dead-letter topic may take less than the hub topic did.
        let limits = self.topic_limits(&rejects.dead_letter_topic).await;
        let limit = record_limit.min(limits.record_bytes);
        // A timestamp the dead-letter topic would refuse too goes into a header, and the
        // producer stamps the copy.
        let keep_timestamp = record.timestamp.filter(|&t| {
            !limits
                .timestamps
                .refuses(t, unix_millis(), context.rejects.in_flight)
        });
        let copy = dead_letter::copy(record, refusal, limit, keep_timestamp.is_none());
        let mut headers = OwnedHeaders::new_with_capacity(copy.headers.len());
        for (key, value) in &copy.headers {
            headers = headers.insert(KafkaHeader {
                key,
                value: value.as_deref(),
            });
        }
        let mut dead = HubRecord::to(&rejects.dead_letter_topic).headers(headers);
        if let Some(key) = &copy.key {
            dead = dead.key(key.as_ref());
        }
        if let Some(value) = &copy.value {
            dead = dead.payload(value.as_ref());
        }
        if let Some(timestamp) = keep_timestamp {
            dead = dead.timestamp(timestamp);
        }
        enqueue(
            self.session.producer,
            dead,
            || self.handover_deadline(),
            context.handover_window,
        )
        .await
    }
}

/// Where one batch's records go in the hub.
struct Destination<'a> {
    /// The hub topic.
    target: &'a str,
    /// The hub partition the source partition maps to; -1 where the topic is refused.
    hub_partition: i32,
    /// Why the hub refuses the topic as a whole (every record is dead-lettered), if it does.
    topic_refused: Option<&'static str>,
}

/// What one batch's records came to: deliveries to await, and what the hub refuses.
struct HandedOver {
    /// The records handed to the producer, in order; each group's last one is a gate.
    deliveries: Vec<Pending>,
    /// The dead-letter copies of the refused records.
    dead_letters: Vec<InFlight>,
    /// The offsets of the refused records, as runs.
    refused: dead_letter::Runs,
    /// Why the last refused record was refused: the `Rejected` frame names one reason.
    refusal_reason: Option<&'static str>,
}

impl HandedOver {
    /// Notes the record at `offset` as refused for `reason`, with its dead-letter copy.
    fn dead_lettered(&mut self, offset: i64, reason: &'static str, copy: InFlight) {
        self.dead_letters.push(copy);
        self.refused.refused(offset);
        self.refusal_reason = Some(reason);
    }

    /// The acker's part of `batch`: its deliveries, and a `Rejected` where records were
    /// refused; `base` and `transaction` as [`Produced`] describes them.
    fn into_outcome(
        self,
        batch: Batch,
        base: Option<Checkpoint>,
        transaction: Option<OwnedMutexGuard<()>>,
    ) -> Outcome {
        let refused = self.refused;
        let rejected = self.refusal_reason.map(|reason| {
            Box::new(Rejected {
                seq: batch.seq,
                topic: batch.topic.clone(),
                partition: batch.partition,
                reason: reason.to_owned(),
                ranges: refused.into_ranges(),
            })
        });
        Outcome::Produced(Produced {
            seq: batch.seq,
            topic: batch.topic,
            partition: batch.partition,
            next_offset: batch.next_offset,
            deliveries: self.deliveries,
            rejected,
            dead_letters: self.dead_letters,
            base,
            transaction,
        })
    }
}

/// The provenance headers' bytes but the offset's, which differ per record.
fn provenance_bytes(site: &str, partition_text: &str) -> usize {
    HEADER_ORIGIN.len()
        + site.len()
        + HEADER_PARTITION.len()
        + partition_text.len()
        + HEADER_OFFSET.len()
}

/// The batch's declared facts do not hold: the peer's error, which ends the session.
pub(super) fn bad_batch(batch: &Batch, reason: String) -> SessionError {
    SessionError::BadBatch {
        seq: batch.seq,
        topic: batch.topic.clone(),
        partition: batch.partition,
        reason,
    }
}

/// Why the hub would refuse `record` (of `record_bytes` with its provenance) under `limits`,
/// if it would; `in_flight` is how long a judged record may take to land.
pub(super) fn hub_refuses(
    record: &Record,
    record_bytes: usize,
    limits: &HubTopicLimits,
    now_ms: i64,
    in_flight: Duration,
) -> Option<&'static str> {
    if record_bytes > limits.record_bytes {
        return Some(dead_letter::reason::TOO_LARGE);
    }
    record
        .timestamp
        .filter(|&t| limits.timestamps.refuses(t, now_ms, in_flight))
        .map(|_| dead_letter::reason::TIMESTAMP_INVALID)
}

/// The record's own headers, then the provenance the resume scan reads back.
pub(super) fn with_provenance(
    record: &Record,
    site: &str,
    partition: &str,
    offset: &str,
) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 3);
    for header in &record.headers {
        headers = headers.insert(KafkaHeader {
            key: &header.key,
            value: header.value.as_deref(),
        });
    }
    headers
        .insert(KafkaHeader {
            key: HEADER_ORIGIN,
            value: Some(site.as_bytes()),
        })
        .insert(KafkaHeader {
            key: HEADER_PARTITION,
            value: Some(partition.as_bytes()),
        })
        .insert(KafkaHeader {
            key: HEADER_OFFSET,
            value: Some(offset.as_bytes()),
        })
}

/// `record` as the hub gets it: key, value and timestamp as they were, in `hub_partition`.
pub(super) fn hub_record<'a>(
    target: &'a str,
    hub_partition: i32,
    record: &'a Record,
    headers: OwnedHeaders,
) -> HubRecord<'a> {
    let mut hub_record = HubRecord::to(target)
        .headers(headers)
        .partition(hub_partition);
    if let Some(key) = &record.key {
        hub_record = hub_record.key(key.as_ref());
    }
    if let Some(value) = &record.value {
        hub_record = hub_record.payload(value.as_ref());
    }
    if let Some(timestamp) = record.timestamp {
        hub_record = hub_record.timestamp(timestamp);
    }
    hub_record
}

/// The relay's wall clock, as brokers judge timestamps by theirs.
pub(super) fn unix_millis() -> i64 {
    i64::try_from(crate::fleet::now_ms()).unwrap_or(i64::MAX)
}

/// Bytes of one session's records a shared producer holds at most: its share, so that one
/// heavy site cannot fill the queue the others' records wait in. A site's own producer is
/// bounded by its own queue instead.
pub(super) const SESSION_SHARE_BYTES: usize = 16 << 20;

/// Hands one record to librdkafka, waiting while its local queue is full or the session has
/// its share in it, but not past the hand-over deadline (`StreamReader::handover_deadline`),
/// asked again before every attempt.
pub(super) async fn enqueue<'a>(
    producer: &SessionProducer,
    mut record: HubRecord<'a>,
    deadline: impl Fn() -> tokio::time::Instant,
    window: Duration,
) -> Result<InFlight, SessionError> {
    loop {
        if tokio::time::Instant::now() > deadline() {
            return Err(SessionError::HandoverLate { window });
        }
        // A record larger than the share still goes, alone.
        let load = producer.load();
        if !producer.is_own() && load.records() > 0 && load.bytes() >= SESSION_SHARE_BYTES {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        match producer.send(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((error, _)) => return Err(SessionError::Delivery(error)),
        }
    }
}
