//! The tailer: reads the selected local topics with `assign()` from the positions the spool
//! holds, gathers each partition's records into a chunk, and writes chunk + next source
//! position to the spool in one atomic write.
//!
//! It runs on its own thread because librdkafka's poll blocks; it stops on `stop`, closing
//! open chunks into the spool and flushing it first, so nothing it read is read twice.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use spoke_proto::{ChunkBuilder, Codec, CARRIED_TOPIC_CONFIGS};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{DictionaryMode, Loaded, WhenFull};
use crate::dictionary::TopicDictionaries;
use crate::progress::Progress;
use crate::select::TopicSelector;
use crate::spool::{Chunk, Incarnation, SourcePartition, Spool, SpoolError, TopicId};
use spoke_kafka::topics::ConfigEntry;
use spoke_process::logging::LogLimiter;

/// Header with a record's source incarnation, on records of an incarnation after the first.
pub const HEADER_EPOCH: &str = "spoke-epoch";
/// Header with a record's offset in its source incarnation, beside [`HEADER_EPOCH`]: there
/// `spoke-offset` (the record's offset in spoke, which never goes back) is not it.
pub const HEADER_SOURCE_OFFSET: &str = "spoke-source-offset";

const METADATA_REFRESH: Duration = Duration::from_secs(5);
/// How long a log must stay below what was read of it before it counts as a new log
/// ([`Tailer::find_shrunk_logs`]): far longer than a new leader's high watermark takes to
/// catch up, two metadata refreshes at least.
const SHORT_LOG_GRACE: Duration = Duration::from_secs(10);
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_SLICE: Duration = Duration::from_millis(50);
/// Messages taken per poll burst before chunk deadlines are checked again, so one fsync
/// covers many records.
const BURST: usize = 2048;
/// The header a replicated record carries; see `source.forward_replicated`.
const HEADER_ORIGIN: &str = "spoke-origin";

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("local Kafka client: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("chunk encoding: {0}")]
    Chunk(#[from] spoke_proto::BatchError),
}

/// Local broker consumer settings; `isolation.level` and the offset policy are not
/// overridable because the spool, not a group, owns positions.
pub fn consumer_config(loaded: &Loaded) -> ClientConfig {
    let source = &loaded.config.source;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &source.bootstrap)
        .set("group.id", format!("spoke-agent-{}", loaded.config.site))
        // A broker that honours fetch.min.bytes answers as soon as records arrive, so this
        // only sets how often an idle agent asks. tansu holds every fetch for the whole wait
        // (docs/benchmarks.md, "Latency"), which makes it the floor under the latency.
        .set("fetch.wait.max.ms", "20")
        // High watermarks for the lag metric come from librdkafka's statistics.
        .set("statistics.interval.ms", "1000")
        // The prefetch queue is the largest part of the agent's memory where edge topics are
        // compressed: librdkafka holds each fetched batch decompressed while any of its
        // records waits here, 31 MB of the heap at the peak of a 20 Mbit/s backlog with
        // 16 MiB (25 MB with 4 MiB; docs/benchmarks.md). 4 MiB is still a quarter second of
        // 1 KiB records at the fastest rate the spool took on the test machine, many local
        // fetches. One fetch response may overshoot it, so that is bounded too.
        .set("queued.max.messages.kbytes", "4096")
        .set("fetch.max.bytes", "4194304")
        // A partition whose queue is full is not fetched again for this long: librdkafka's
        // 1 s left the tailer idle with a backlog at the edge, and 100,000 records took 15 s
        // to spool instead of 2 (20 Mbit/s bench row, 4,874 records/s against 8,310).
        .set("fetch.queue.backoff.ms", "20");
    for (key, value) in loaded.source_kafka.iter() {
        config.set(key, value);
    }
    config
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest");
    config
}

/// Topics of the local cluster that `selector` picks, with their partition counts.
pub fn selected_topics<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    selector: &TopicSelector,
) -> Result<Vec<(String, i32)>, KafkaError> {
    let metadata = consumer.fetch_metadata(None, METADATA_TIMEOUT)?;
    let mut topics: Vec<(String, i32)> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && selector.selects(t.name()))
        .map(|t| {
            let count = i32::try_from(t.partitions().len()).unwrap_or(i32::MAX);
            (t.name().to_owned(), count)
        })
        .filter(|(_, count)| *count > 0)
        .collect();
    topics.sort();
    Ok(topics)
}

/// Receives librdkafka's statistics: the per-partition high watermarks behind the lag metric.
#[derive(Debug)]
pub struct TailContext {
    progress: Arc<Progress>,
}

#[derive(serde::Deserialize)]
struct RawStats {
    #[serde(default)]
    topics: HashMap<String, RawTopic>,
}

#[derive(serde::Deserialize)]
struct RawTopic {
    #[serde(default)]
    partitions: HashMap<String, RawPartition>,
}

#[derive(serde::Deserialize)]
struct RawPartition {
    partition: i32,
    #[serde(default = "unknown_offset")]
    hi_offset: i64,
    #[serde(default = "unknown_offset")]
    ls_offset: i64,
    #[serde(default = "unknown_offset")]
    lo_offset: i64,
}

fn unknown_offset() -> i64 {
    -1
}

impl ClientContext for TailContext {
    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(stats) = serde_json::from_slice::<RawStats>(statistics) else {
            return;
        };
        for (topic, raw) in stats.topics {
            for partition in raw.partitions.into_values() {
                // -1 is librdkafka's internal "UA" partition and unknown offsets.
                if partition.partition < 0 {
                    continue;
                }
                // read_committed: the last stable offset is what can be read.
                let high = if partition.ls_offset >= 0 {
                    partition.ls_offset
                } else {
                    partition.hi_offset
                };
                let key = SourcePartition {
                    topic: topic.clone(),
                    partition: partition.partition,
                };
                if partition.lo_offset >= 0 {
                    self.progress
                        .set_low_watermark(key.clone(), partition.lo_offset);
                }
                if high >= 0 {
                    self.progress.set_high_watermark(key, high);
                }
            }
        }
    }
}

impl ConsumerContext for TailContext {}

/// A partition being read: the chunk being filled and the source position after it.
///
/// Offsets here are the spool's ([`Incarnation::spooled`]); librdkafka's are the source's.
struct Open {
    builder: ChunkBuilder,
    opened_at: Option<Instant>,
    next_offset: i64,
    /// Position already recorded in the spool; `next_offset` moves past it as records arrive.
    spooled_offset: i64,
    incarnation: Incarnation,
}

impl Open {
    /// The source offset the next record should have; -1 when nothing was read yet.
    fn expected_source(&self) -> i64 {
        if self.next_offset < 0 {
            -1
        } else {
            self.incarnation.source(self.next_offset)
        }
    }
}

pub struct Tailer {
    consumer: BaseConsumer<TailContext>,
    config: watch::Receiver<Arc<Loaded>>,
    selector: TopicSelector,
    spool: Arc<dyn Spool>,
    progress: Arc<Progress>,
    partitions: HashMap<SourcePartition, Open>,
    batch_max_bytes: usize,
    linger: Duration,
    /// Never shorter than `linger`.
    linger_backlog: Duration,
    /// What the last look at the link found; sets how long the tailer may sleep.
    link_backlogged: bool,
    zstd_level: i32,
    zstd_level_backlog: i32,
    dictionaries: TopicDictionaries,
    max_spool_bytes: u64,
    when_full: WhenFull,
    forward_replicated: bool,
    next_refresh: Instant,
    /// Partitions whose log the broker said ends below what was read, since when.
    short_since: HashMap<SourcePartition, Instant>,
    /// Topics whose configuration was read from the local broker in this process.
    configured: HashSet<String>,
    paused: bool,
    error_log: LogLimiter,
}

/// What of a source topic's configuration its hub topic must keep: `cleanup.policy` as the
/// broker applies it, and for a compacted topic the compaction settings it applies too
/// (whether set on the topic or the broker's defaults: brokers do not all say which), since
/// they are what its consumers rely on. A deleting topic's retention is the hub's business.
fn carried_config(entries: &[ConfigEntry]) -> Vec<(String, String)> {
    let value = |name: &str| {
        entries
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    let Some(policy) = value("cleanup.policy") else {
        return Vec::new();
    };
    let compacted = policy.split(',').any(|p| p.trim() == "compact");
    CARRIED_TOPIC_CONFIGS
        .iter()
        .filter(|name| compacted || **name == "cleanup.policy")
        .filter_map(|name| Some(((*name).to_owned(), value(name)?)))
        .collect()
}

impl std::fmt::Debug for Tailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tailer")
            .field("partitions", &self.partitions.len())
            .finish_non_exhaustive()
    }
}

impl Tailer {
    pub fn new(
        mut live: watch::Receiver<Arc<Loaded>>,
        spool: Arc<dyn Spool>,
        progress: Arc<Progress>,
    ) -> Result<Self, TailError> {
        let loaded = live.borrow_and_update().clone();
        let config = &loaded.config;
        let context = TailContext {
            progress: progress.clone(),
        };
        let dictionaries = TopicDictionaries::open(
            spool.as_ref(),
            config.ship.dictionary == DictionaryMode::Auto,
            config.ship.zstd_level,
        )?;
        Ok(Self {
            consumer: consumer_config(&loaded).create_with_context(context)?,
            config: live,
            selector: loaded.selector.clone(),
            spool,
            progress,
            partitions: HashMap::new(),
            configured: HashSet::new(),
            batch_max_bytes: usize::try_from(config.ship.batch_max_bytes.as_u64())
                .unwrap_or(usize::MAX),
            linger: config.ship.linger,
            linger_backlog: config.ship.linger_backlog.max(config.ship.linger),
            link_backlogged: false,
            zstd_level: config.ship.zstd_level,
            zstd_level_backlog: config.ship.zstd_level_backlog,
            dictionaries,
            max_spool_bytes: config.spool.max_bytes.as_u64(),
            when_full: config.spool.when_full,
            forward_replicated: config.source.forward_replicated,
            next_refresh: Instant::now(),
            short_since: HashMap::new(),
            paused: false,
            error_log: LogLimiter::new(Duration::from_secs(10)),
        })
    }

    /// Reads until `stop` is cancelled; then closes every open chunk into the spool.
    pub fn run(mut self, stop: &CancellationToken) -> Result<(), TailError> {
        while !stop.is_cancelled() {
            if Instant::now() >= self.next_refresh {
                if self.config.has_changed().unwrap_or(false) {
                    self.apply_reload()?;
                }
                if let Err(error) = self.refresh_assignment() {
                    warn!(%error, "metadata refresh failed; retrying");
                }
                self.find_shrunk_logs()?;
                self.next_refresh = Instant::now() + METADATA_REFRESH;
            }
            if self.spool_full()? {
                // Records already read stay in their open chunks; nothing more is read until
                // the shipper frees space (local Kafka retention is the next buffer).
                std::thread::sleep(POLL_SLICE);
                continue;
            }
            self.poll_burst()?;
            self.close_chunks(false)?;
        }
        self.close_chunks(true)?;
        self.consumer.unassign()?;
        info!("tailer stopped; spool flushed");
        Ok(())
    }

    /// SIGHUP: new include/exclude and ship tunables. Partitions no longer selected stop
    /// being read (what was spooled from them still ships).
    fn apply_reload(&mut self) -> Result<(), TailError> {
        let loaded = self.config.borrow_and_update().clone();
        let config = &loaded.config;
        self.selector = loaded.selector.clone();
        self.batch_max_bytes =
            usize::try_from(config.ship.batch_max_bytes.as_u64()).unwrap_or(usize::MAX);
        self.linger = config.ship.linger;
        self.linger_backlog = config.ship.linger_backlog.max(config.ship.linger);
        self.zstd_level = config.ship.zstd_level;
        self.zstd_level_backlog = config.ship.zstd_level_backlog;
        self.dictionaries.set_level(self.zstd_level);
        self.max_spool_bytes = config.spool.max_bytes.as_u64();
        self.when_full = config.spool.when_full;
        self.forward_replicated = config.source.forward_replicated;
        self.close_chunks(true)?;
        let mut removed = TopicPartitionList::new();
        let dropped: Vec<SourcePartition> = self
            .partitions
            .keys()
            .filter(|p| !self.selector.selects(&p.topic))
            .cloned()
            .collect();
        for partition in dropped {
            removed.add_partition(&partition.topic, partition.partition);
            self.partitions.remove(&partition);
            info!(topic = %partition.topic, partition = partition.partition, "no longer selected; stopped tailing");
        }
        if removed.count() > 0 {
            self.consumer.incremental_unassign(&removed)?;
        }
        info!("configuration reloaded");
        Ok(())
    }

    fn refresh_assignment(&mut self) -> Result<(), TailError> {
        let topics = selected_topics(&self.consumer, &self.selector)?;
        Progress::touch(&self.progress.local_broker_seen_ms);
        let topic_ids = self.topic_ids(topics.iter().map(|(topic, _)| topic.as_str()));
        // Before the first record of a new topic is read, so that its first batch can carry it.
        let mut unflushed = self.record_topic_configs(&topics)?;
        let mut added = TopicPartitionList::new();
        let mut recreated = Vec::new();
        for (topic, count) in &topics {
            self.progress.set_partition_count(topic, *count);
            let topic_id = topic_ids.get(topic).copied();
            for partition in 0..*count {
                let key = SourcePartition {
                    topic: topic.clone(),
                    partition,
                };
                if let Some(open) = self.partitions.get_mut(&key) {
                    match (open.incarnation.topic_id, topic_id) {
                        (Some(known), Some(now)) if known != now => recreated.push(key),
                        (None, Some(now)) => {
                            self.spool.name_incarnation(&key, now)?;
                            open.incarnation.topic_id = Some(now);
                            unflushed = true;
                        }
                        _ => {}
                    }
                    continue;
                }
                let position = self.spool.position(&key)?;
                let mut incarnation = self.spool.incarnation(&key)?;
                let mut offset = position.map_or(Offset::Beginning, |position| {
                    Offset::Offset(incarnation.source(position))
                });
                let mut recreated_while_away = false;
                match (incarnation.topic_id, topic_id) {
                    // Recreated while the agent was away, perhaps refilled past its position:
                    // the new log is read from its start, as the next incarnation.
                    (Some(known), Some(now)) if known != now && position.is_some() => {
                        offset = Offset::Beginning;
                        recreated_while_away = true;
                    }
                    (known, Some(now)) if known != Some(now) => {
                        self.spool.name_incarnation(&key, now)?;
                        incarnation.topic_id = Some(now);
                        unflushed = true;
                    }
                    _ => {}
                }
                added.add_partition_offset(topic, partition, offset)?;
                info!(%topic, partition, ?position, epoch = incarnation.epoch, "tailing partition");
                self.partitions.insert(
                    key.clone(),
                    Open {
                        builder: ChunkBuilder::new(),
                        opened_at: None,
                        next_offset: position.unwrap_or(-1),
                        spooled_offset: position.unwrap_or(-1),
                        incarnation,
                    },
                );
                if recreated_while_away {
                    // Before the consumer reads a record of the new log.
                    self.source_reset(&key, None, topic_id)?;
                }
            }
        }
        if unflushed {
            self.spool.flush()?;
        }
        if added.count() > 0 {
            self.consumer.incremental_assign(&added)?;
        }
        for key in recreated {
            let topic_id = topic_ids.get(&key.topic).copied();
            self.source_reset(&key, Some(Offset::Beginning), topic_id)?;
        }
        Ok(())
    }

    /// Records in the spool, for each topic of `topics` not yet seen in this process, what its
    /// hub topic must keep ([`carried_config`]). Whether anything was written (to flush).
    fn record_topic_configs(&mut self, topics: &[(String, i32)]) -> Result<bool, TailError> {
        let new: Vec<&str> = topics
            .iter()
            .map(|(topic, _)| topic.as_str())
            .filter(|topic| !self.configured.contains(*topic))
            .collect();
        if new.is_empty() {
            return Ok(false);
        }
        let described = match spoke_kafka::topics::topic_configs(
            self.consumer.client().native_client(),
            &new,
            METADATA_TIMEOUT,
        ) {
            Ok(described) => described,
            Err(error) => {
                // Tailing goes on: a hub topic created meanwhile takes the hub's defaults and
                // [hub.topic_config], which is what the relay did before topics carried theirs.
                warn!(%error, topics = ?new, "the local broker did not describe the topics' configuration; hub topics created now take the hub's defaults");
                self.configured.extend(new.iter().map(|t| (*t).to_owned()));
                return Ok(false);
            }
        };
        let mut written = false;
        for topic in new {
            self.configured.insert(topic.to_owned());
            let Some(entries) = described.get(topic) else {
                continue;
            };
            let carried = carried_config(entries);
            if self.spool.topic_config(topic)?.as_ref() != Some(&carried) {
                debug!(%topic, ?carried, "topic configuration for the hub");
                self.spool.set_topic_config(topic, &carried)?;
                written = true;
            }
        }
        Ok(written)
    }

    /// The local broker's ids of `topics`; none where it gives none, or cannot answer now
    /// (the next refresh asks again).
    fn topic_ids<'a>(&self, topics: impl Iterator<Item = &'a str>) -> HashMap<String, TopicId> {
        let topics: Vec<&str> = topics.collect();
        spoke_kafka::topics::topic_ids(
            self.consumer.client().native_client(),
            &topics,
            METADATA_TIMEOUT,
        )
        .unwrap_or_else(|error| {
            debug!(%error, "local broker did not give topic ids");
            HashMap::new()
        })
    }

    fn spool_full(&mut self) -> Result<bool, TailError> {
        let over = |spool: &dyn Spool, max: u64| spool.stats().bytes >= max;
        if !over(self.spool.as_ref(), self.max_spool_bytes) {
            if self.paused {
                info!("spool has room again; reading resumes");
                self.paused = false;
            }
            return Ok(false);
        }
        match self.when_full {
            WhenFull::Pause => {
                if !self.paused {
                    warn!(
                        max_bytes = self.max_spool_bytes,
                        "spool full; pausing reads"
                    );
                    self.paused = true;
                }
                Ok(true)
            }
            WhenFull::DropOldest => {
                while over(self.spool.as_ref(), self.max_spool_bytes) {
                    let dropped = self.progress.with_unsettled(|unsettled| {
                        self.spool.pop_oldest(&|partition, first_offset| {
                            unsettled
                                .get(partition)
                                .is_some_and(|&until| first_offset < until)
                        })
                    })?;
                    let Some(dropped) = dropped else {
                        // Only chunks that may be in the hub are left: dropping them could
                        // report as lost what was delivered. Wait for their Acks instead.
                        self.spool.flush()?;
                        if !self.paused {
                            warn!("spool full of chunks awaiting acknowledgement; pausing reads");
                            self.paused = true;
                        }
                        return Ok(true);
                    };
                    self.progress.record_loss(crate::progress::Loss {
                        reason: crate::progress::loss::SPOOL_FULL.to_owned(),
                        topic: dropped.partition.topic.clone(),
                        partition: dropped.partition.partition,
                        first_offset: dropped.first_offset,
                        last_offset: dropped.last_offset,
                        records: u64::from(dropped.record_count),
                        at_ms: crate::now_ms(),
                    });
                    error!(
                        topic = %dropped.partition.topic,
                        partition = dropped.partition.partition,
                        first = dropped.first_offset,
                        last = dropped.last_offset,
                        records = dropped.record_count,
                        "spool full: dropped oldest chunk (records lost)"
                    );
                }
                self.spool.flush()?;
                Ok(false)
            }
        }
    }

    fn poll_burst(&mut self) -> Result<(), TailError> {
        let mut timeout = self.poll_timeout();
        let mut reset = None;
        for _ in 0..BURST {
            match self.consumer.poll(timeout) {
                None => break,
                Some(Ok(message)) => {
                    let key = SourcePartition {
                        topic: message.topic().to_owned(),
                        partition: message.partition(),
                    };
                    let Some(open) = self.partitions.get_mut(&key) else {
                        continue;
                    };
                    // Below what the spool already holds: not a redelivery (the consumer was
                    // positioned at the spool's position), but a new log under the same name.
                    if open.spooled_offset >= 0
                        && message.offset() < open.incarnation.source(open.spooled_offset)
                    {
                        reset = Some((key, Offset::Offset(message.offset())));
                        break;
                    }
                    // A jump is a hole in the log (transaction markers, aborted records,
                    // compaction) or records the broker deleted before we read them: the
                    // low watermark tells which. Statistics give it every second without a
                    // request, enough for the one-offset jump every transaction's marker
                    // makes; a larger jump, or one from below that cached log start, asks
                    // the broker (the cache may be a second old).
                    let expected = open.expected_source();
                    let jumped = expected >= 0 && message.offset() > expected;
                    if jumped
                        && (message.offset() > expected + 1
                            || self
                                .progress
                                .low_watermark(&key)
                                .is_none_or(|low| low > expected))
                    {
                        check_gap(
                            &self.consumer,
                            &self.progress,
                            &key,
                            expected,
                            message.offset(),
                        );
                    }
                    let before = open.builder.uncompressed_len();
                    add_message(open, &message, self.forward_replicated)?;
                    let record = open.builder.section().get(before..).unwrap_or_default();
                    if !record.is_empty() && self.dictionaries.wants_samples(&key.topic) {
                        self.dictionaries
                            .sample(self.spool.as_ref(), &key.topic, record)?;
                    }
                    if open.builder.uncompressed_len() >= self.batch_max_bytes {
                        break;
                    }
                }
                Some(Err(error)) => {
                    // librdkafka repeats a broker-down error on every poll; one line per
                    // interval says the same with the count.
                    if let Some(suppressed) = self.error_log.allow() {
                        warn!(%error, suppressed, "local broker error");
                    }
                    break;
                }
            }
            timeout = Duration::ZERO;
        }
        if let Some((key, offset)) = reset {
            let topic_id = self.topic_ids(std::iter::once(key.topic.as_str()));
            self.source_reset(&key, Some(offset), topic_id.get(&key.topic).copied())?;
        }
        Ok(())
    }

    /// A log that now ends below what the spool holds of it was replaced, but a broker need
    /// not say so on a fetch (a fetch past the end may just wait for data): so the ends
    /// librdkafka's statistics report are compared with the spool's positions, and one that
    /// looks short is asked of the broker before it counts (statistics can be a second old).
    /// Even the broker's answer counts only once it has held for [`SHORT_LOG_GRACE`]: right
    /// after a leader election the new leader's high watermark can trail what consumers
    /// already read, and taking that for a new log would replicate the whole log again.
    fn find_shrunk_logs(&mut self) -> Result<(), TailError> {
        let suspects: Vec<(SourcePartition, i64)> = self
            .partitions
            .iter()
            .filter(|(_, open)| open.spooled_offset >= 0)
            .filter_map(|(key, open)| {
                let read = open.incarnation.source(open.spooled_offset);
                let high = self.progress.high_watermark(key)?;
                (high < read).then(|| (key.clone(), read))
            })
            .collect();
        for (key, read) in suspects {
            let (_, high) = match self.consumer.fetch_watermarks(
                &key.topic,
                key.partition,
                METADATA_TIMEOUT,
            ) {
                Ok(marks) => marks,
                Err(error) => {
                    debug!(%error, topic = %key.topic, partition = key.partition, "cannot confirm a short log yet");
                    continue;
                }
            };
            let now = Instant::now();
            let short_since = self.short_since.entry(key.clone()).or_insert(now);
            if high < read && now.duration_since(*short_since) >= SHORT_LOG_GRACE {
                self.short_since.remove(&key);
                let topic_id = self.topic_ids(std::iter::once(key.topic.as_str()));
                let topic_id = topic_id.get(&key.topic).copied();
                self.source_reset(&key, Some(Offset::Beginning), topic_id)?;
            } else if high >= read {
                self.short_since.remove(&key);
            }
        }
        // A log that caught up again was not short after all.
        let partitions = &self.partitions;
        let progress = &self.progress;
        self.short_since.retain(|key, _| {
            partitions.get(key).is_some_and(|open| {
                progress
                    .high_watermark(key)
                    .is_some_and(|high| high < open.incarnation.source(open.spooled_offset))
            })
        });
        Ok(())
    }

    /// The source partition is a new log: its offsets went back (to `seek_to`, where reading
    /// goes on), or its topic id changed (read from the start; `seek_to` is `None` when the
    /// partition is not assigned yet). Its topic was deleted and created anew, or its broker
    /// lost records it had acknowledged. What was read of the old log is spooled as it is;
    /// the new log (topic id `topic_id`, as far as the broker says) becomes the next
    /// incarnation, spooled from the old one's position on ([`Incarnation`]).
    fn source_reset(
        &mut self,
        key: &SourcePartition,
        seek_to: Option<Offset>,
        topic_id: Option<TopicId>,
    ) -> Result<(), TailError> {
        self.close_chunks(true)?;
        let Some(open) = self.partitions.get_mut(key) else {
            return Ok(());
        };
        let old = open.incarnation;
        let base = open.next_offset.max(open.spooled_offset);
        let read_to = old.source(base);
        let new = Incarnation {
            epoch: old.epoch.saturating_add(1),
            base,
            topic_id,
        };
        self.spool.begin_incarnation(key, new)?;
        self.spool.flush()?;
        open.incarnation = new;
        open.next_offset = base;
        open.spooled_offset = base;
        // What the old log held beyond the agent's position, as the broker last said; gone.
        let old_end = self
            .progress
            .high_watermark(key)
            .filter(|&high| high > read_to)
            .unwrap_or(read_to);
        let loss = crate::progress::Loss {
            reason: crate::progress::loss::SOURCE_RESET.to_owned(),
            topic: key.topic.clone(),
            partition: key.partition,
            first_offset: read_to,
            last_offset: old_end - 1,
            records: u64::try_from(old_end - read_to).unwrap_or(0),
            at_ms: crate::now_ms(),
        };
        let new_id = old.topic_id.is_some() && topic_id.is_some() && old.topic_id != topic_id;
        let cause = match seek_to {
            None => "its topic was recreated while the agent was stopped (a new topic id)",
            Some(_) if new_id => "its topic was recreated (a new topic id)",
            Some(_) => {
                "its offsets went back (topic recreated, or records lost by the local broker)"
            }
        };
        let unread = if seek_to.is_none() {
            // The old log is gone and the broker never told this process its end.
            "unknown".to_owned()
        } else {
            loss.records.to_string()
        };
        error!(
            topic = %key.topic,
            partition = key.partition,
            read_to,
            now_at = ?seek_to.unwrap_or(Offset::Beginning),
            unread,
            epoch = new.epoch,
            old_topic_id = ?old.topic_id.map(|id| id.to_string()),
            topic_id = ?topic_id.map(|id| id.to_string()),
            "source partition reset: {cause}; the new log is replicated as a new incarnation, \
             and records of the old one that were never read are lost"
        );
        self.progress.record_loss(loss);
        self.progress.source_resets.inc();
        if let Some(offset) = seek_to {
            self.consumer
                .seek(&key.topic, key.partition, offset, METADATA_TIMEOUT)?;
        }
        Ok(())
    }

    /// Waits no longer than the earliest chunk deadline.
    fn poll_timeout(&self) -> Duration {
        let now = Instant::now();
        let linger = if self.link_backlogged {
            self.linger_backlog
        } else {
            self.linger
        };
        self.partitions
            .values()
            .filter_map(|open| open.opened_at)
            .map(|opened| (opened + linger).saturating_duration_since(now))
            .min()
            .unwrap_or(POLL_SLICE)
            .min(POLL_SLICE)
    }

    /// Writes every chunk that is full or past its linger (all of them when `all`), then makes
    /// them durable with one flush before the shipper hears of them. Behind a backlog the link
    /// holds back ([`LinkState::is_backlogged`]) chunks linger `linger_backlog`: their records
    /// wait for the backlog anyway, and fewer, larger chunks compress better and keep more
    /// records in the shipper's window.
    fn close_chunks(&mut self, all: bool) -> Result<(), TailError> {
        let now = Instant::now();
        let mut spooled_records = 0u64;
        let mut spooled_chunks = 0u64;
        let mut wrote = false;
        // Asked once per call, and only when a chunk's deadline or level depends on it: this
        // runs after every poll, mostly with no chunk due.
        let mut link = None;
        for (key, open) in &mut self.partitions {
            let lingered = |linger| open.opened_at.is_some_and(|t| now >= t + linger);
            if open.builder.is_empty() {
                // Only filtered records arrived: move the position past them.
                if open.next_offset > open.spooled_offset
                    && (all || lingered(self.linger) || open.opened_at.is_none())
                {
                    self.spool.advance(key, open.next_offset)?;
                    open.spooled_offset = open.next_offset;
                    wrote = true;
                }
                open.opened_at = None;
                continue;
            }
            let due = all
                || open.builder.uncompressed_len() >= self.batch_max_bytes
                || lingered(self.linger_backlog)
                || (lingered(self.linger)
                    && !look(&mut link, &self.progress, &*self.spool)?.backlogged);
            if !due {
                continue;
            }
            let encoded = match self
                .dictionaries
                .for_chunk(&key.topic, open.builder.uncompressed_len())
            {
                Some(dictionary) => open.builder.finish_with_dictionary(&dictionary)?,
                None => {
                    let level = if look(&mut link, &self.progress, &*self.spool)?.behind {
                        self.zstd_level_backlog
                    } else {
                        self.zstd_level
                    };
                    open.builder.finish(Codec::Zstd, level)?
                }
            };
            let chunk = Chunk {
                partition: key.clone(),
                first_offset: encoded.first_offset,
                last_offset: encoded.last_offset,
                next_offset: open.next_offset,
                record_count: encoded.record_count,
                codec: encoded.codec.wire_id(),
                dictionary: encoded.codec.dictionary_id(),
                uncompressed_len: encoded.uncompressed_len,
                spooled_at_ms: crate::now_ms(),
                payload: encoded.payload,
            };
            self.spool.append(&chunk)?;
            open.spooled_offset = open.next_offset;
            open.opened_at = None;
            spooled_records += u64::from(chunk.record_count);
            spooled_chunks += 1;
            wrote = true;
            debug!(topic = %key.topic, partition = key.partition, records = chunk.record_count, bytes = chunk.payload.len(), "spooled chunk");
        }
        if wrote {
            // The window between a chunk's write and its flush, for the crash tests.
            spoke_process::failpoint::hit("tail.before_flush");
            // Durable before reported: only now do the records count as spooled.
            self.spool.flush()?;
            self.progress.records_spooled.inc_by(spooled_records);
            self.progress.chunks_spooled.inc_by(spooled_chunks);
            self.progress.spooled.notify_one();
        }
        if let Some(link) = link {
            self.link_backlogged = link.backlogged;
        }
        Ok(())
    }
}

/// What the tailer makes of the link for the chunks it closes now.
#[derive(Debug, Clone, Copy)]
struct LinkView {
    /// Chunks take `ship.zstd_level_backlog`.
    behind: bool,
    /// Chunks linger `ship.linger_backlog`.
    backlogged: bool,
}

/// The link as `progress` and `spool` show it, asked of them the first time only.
fn look(
    asked: &mut Option<LinkView>,
    progress: &Progress,
    spool: &dyn Spool,
) -> Result<LinkView, SpoolError> {
    if let Some(view) = *asked {
        return Ok(view);
    }
    let state = LinkState::now(progress, spool)?;
    let now_ms = crate::now_ms();
    Ok(*asked.insert(LinkView {
        behind: state.is_behind(now_ms),
        backlogged: state.is_backlogged(now_ms),
    }))
}

/// With no word from a relay, the link counts as behind once the oldest chunk has waited this
/// long: a few round trips with a loss recovery on the slowest links spoke is tuned for
/// (600 ms RTT), so that a reconnect is not taken for an outage.
const BACKLOG_AGE_MS: u64 = 2_000;

/// What tells whether the link is behind. Chunks then take `ship.zstd_level_backlog` and
/// `ship.linger_backlog`: every byte saved is a record more per second, the CPU would
/// otherwise wait for the link, and the records wait for the backlog anyway. Otherwise they
/// take `ship.zstd_level` and `ship.linger`, the CPU and the latency being then all there is
/// to save. A spool that fills because the hub is slow does not count: the CPU that
/// compresses harder may be what the hub's side needs, and fewer bytes would not move more
/// records.
struct LinkState {
    /// The congestion window, not a lack of data, held the shipper back lately.
    window_limited: bool,
    relay_connected: bool,
    /// Unix ms of the last frame from a relay. A link that went dark keeps its connection
    /// until the idle timeout (30 s), silent: the first half minute of an outage.
    relay_seen_ms: u64,
    oldest_spooled_at_ms: Option<u64>,
}

impl LinkState {
    fn now(progress: &Progress, spool: &dyn Spool) -> Result<LinkState, SpoolError> {
        Ok(LinkState {
            window_limited: progress.link_is_bottleneck(Instant::now()),
            relay_connected: progress.relay_connected.load(Ordering::Relaxed),
            relay_seen_ms: progress.relay_seen_ms.load(Ordering::Relaxed),
            oldest_spooled_at_ms: spool.oldest_spooled_at_ms()?,
        })
    }

    fn is_behind(&self, now_ms: u64) -> bool {
        let relay_silent =
            !self.relay_connected || older_than_backlog_age(self.relay_seen_ms, now_ms);
        self.window_limited || (relay_silent && self.oldest_waited(now_ms))
    }

    /// Behind with chunks that waited past the backlog age: a backlog, not a link that now
    /// and then holds a sender back at a live rate (a loss shrinks the window), where a
    /// longer linger would add its wait to every record.
    fn is_backlogged(&self, now_ms: u64) -> bool {
        self.is_behind(now_ms) && self.oldest_waited(now_ms)
    }

    fn oldest_waited(&self, now_ms: u64) -> bool {
        self.oldest_spooled_at_ms
            .is_some_and(|at_ms| older_than_backlog_age(at_ms, now_ms))
    }
}

fn older_than_backlog_age(at_ms: u64, now_ms: u64) -> bool {
    now_ms.saturating_sub(at_ms) > BACKLOG_AGE_MS
}

/// Records from `expected` up to the partition's low watermark were deleted by the local
/// broker before they were read (real Kafka raises OFFSET_OUT_OF_RANGE and librdkafka resets to
/// the earliest offset; tansu silently serves the next record): count them as lost, exactly.
/// A hole above the low watermark is compaction or transaction markers, not loss.
fn check_gap<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    progress: &Progress,
    partition: &SourcePartition,
    expected: i64,
    received: i64,
) {
    let watermarks = if spoke_process::failpoint::fails("tail.gap_watermarks") {
        Err(KafkaError::MetadataFetch(
            RDKafkaErrorCode::OperationTimedOut,
        ))
    } else {
        consumer.fetch_watermarks(&partition.topic, partition.partition, METADATA_TIMEOUT)
    };
    let low = match watermarks {
        Ok((low, _)) => low,
        Err(error) => {
            // Reported, not only logged: an operator must see the range even if none of it
            // turns out to be lost (then it was a hole in the log).
            let loss = crate::progress::Loss {
                reason: crate::progress::loss::GAP_UNMEASURED.to_owned(),
                topic: partition.topic.clone(),
                partition: partition.partition,
                first_offset: expected,
                last_offset: received - 1,
                records: u64::try_from(received - expected).unwrap_or(0),
                at_ms: crate::now_ms(),
            };
            error!(%error, topic = %loss.topic, partition = loss.partition, first = loss.first_offset,
                last = loss.last_offset, records = loss.records,
                "offset jump, and the local broker cannot say whether these were deleted: counted as lost (at most)");
            progress.record_loss(loss);
            return;
        }
    };
    let first_kept = low.min(received);
    if first_kept <= expected {
        return;
    }
    let loss = crate::progress::Loss {
        reason: crate::progress::loss::RETENTION.to_owned(),
        topic: partition.topic.clone(),
        partition: partition.partition,
        first_offset: expected,
        last_offset: first_kept - 1,
        records: u64::try_from(first_kept - expected).unwrap_or(0),
        at_ms: crate::now_ms(),
    };
    error!(
        topic = %loss.topic,
        partition = loss.partition,
        first = loss.first_offset,
        last = loss.last_offset,
        records = loss.records,
        "local broker deleted records before they were read (retention gap): records lost"
    );
    progress.record_loss(loss);
}

fn add_message(
    open: &mut Open,
    message: &BorrowedMessage<'_>,
    forward_replicated: bool,
) -> Result<(), TailError> {
    let source_offset = message.offset();
    let offset = open.incarnation.spooled(source_offset);
    if offset < open.next_offset {
        // librdkafka may redeliver after a reassignment; the spool already has it.
        return Ok(());
    }
    open.next_offset = offset + 1;
    let mut headers: Vec<(&str, Option<&[u8]>)> = Vec::new();
    // Only records of a later incarnation say where they were in their log.
    let incarnation_headers = (open.incarnation.epoch > 0).then(|| {
        (
            open.incarnation.epoch.to_string(),
            source_offset.to_string(),
        )
    });
    if let Some(borrowed) = message.headers() {
        for header in borrowed.iter() {
            if header.key == HEADER_ORIGIN && !forward_replicated {
                // Replicated into this cluster by spoke: shipping it back would loop.
                return Ok(());
            }
            headers.push((header.key, header.value));
        }
    }
    if let Some((epoch, source_offset)) = &incarnation_headers {
        headers.push((HEADER_EPOCH, Some(epoch.as_bytes())));
        headers.push((HEADER_SOURCE_OFFSET, Some(source_offset.as_bytes())));
    }
    open.builder.push(
        offset,
        message.timestamp().to_millis(),
        message.key(),
        message.payload(),
        &headers,
    )?;
    open.opened_at.get_or_insert_with(Instant::now);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compacted_topic_carries_its_compaction_and_a_deleting_one_only_its_policy() {
        let entry = |name: &str, value: &str| ConfigEntry {
            name: name.to_owned(),
            value: Some(value.to_owned()),
        };
        let described = |policy: &str| {
            vec![
                entry("cleanup.policy", policy),
                entry("min.compaction.lag.ms", "60000"),
                entry("delete.retention.ms", "86400000"),
                entry("retention.ms", "1000"),
                entry("max.message.bytes", "1048588"),
            ]
        };
        let owned = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(
            carried_config(&described("compact,delete")),
            owned(&[
                ("cleanup.policy", "compact,delete"),
                ("min.compaction.lag.ms", "60000"),
                ("delete.retention.ms", "86400000"),
            ])
        );
        assert_eq!(
            carried_config(&described("delete")),
            owned(&[("cleanup.policy", "delete")])
        );
        assert!(carried_config(&[]).is_empty());
    }

    #[test]
    fn the_link_is_behind_while_the_window_limits_or_chunks_age_with_no_word_from_a_relay() {
        let now = 1_000_000;
        let old = Some(now - BACKLOG_AGE_MS - 1);
        let behind = |window_limited, relay_connected, relay_seen_ms, oldest_spooled_at_ms| {
            LinkState {
                window_limited,
                relay_connected,
                relay_seen_ms,
                oldest_spooled_at_ms,
            }
            .is_behind(now)
        };
        let heard = now - 10;
        let silent = now - BACKLOG_AGE_MS - 1;
        assert!(behind(true, true, heard, Some(now - 10)), "window-limited");
        assert!(
            !behind(false, true, heard, None),
            "empty spool, link keeps up"
        );
        assert!(
            !behind(false, true, silent, None),
            "an idle relay says nothing, and nothing waits"
        );
        assert!(
            !behind(false, true, heard, old),
            "old chunks with a relay answering: the hub is what is slow"
        );
        assert!(
            behind(false, false, heard, old),
            "old chunks, no relay: an outage"
        );
        assert!(
            behind(false, true, silent, old),
            "old chunks, a connection gone silent: an outage before the idle timeout"
        );
        assert!(
            !behind(false, false, heard, Some(now - BACKLOG_AGE_MS)),
            "not past the age yet"
        );
        assert!(
            !behind(false, false, heard, Some(now + 5)),
            "clock stepped back"
        );
    }

    #[test]
    fn chunks_linger_longer_only_behind_a_backlog_that_has_waited() {
        let now = 1_000_000;
        let state = |window_limited, relay_connected, oldest_spooled_at_ms| LinkState {
            window_limited,
            relay_connected,
            relay_seen_ms: now - 10,
            oldest_spooled_at_ms,
        };
        let fresh = Some(now - 100);
        let old = Some(now - BACKLOG_AGE_MS - 1);
        let limited_at_a_live_rate = state(true, true, fresh);
        assert!(limited_at_a_live_rate.is_behind(now));
        assert!(
            !limited_at_a_live_rate.is_backlogged(now),
            "a window that holds back a live rate now and then must not add the long linger"
        );
        assert!(
            state(true, true, old).is_backlogged(now),
            "a backlog the link holds back"
        );
        assert!(state(false, false, old).is_backlogged(now), "an outage");
        assert!(
            !state(false, true, old).is_backlogged(now),
            "the hub is what is slow"
        );
        assert!(!state(false, true, None).is_backlogged(now));
    }
}
