//! State the tailer, the shipper and the admin endpoint share: counters that only grow,
//! wake-ups between the tasks, and what the tailer learned from the local broker. The
//! counters are Prometheus metrics themselves, so a scrape reads the same numbers the
//! heartbeats carry.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;
use tokio::sync::Notify;

use crate::spool::{SourcePartition, Spool};

/// Why records were lost (the `reason` label of `spoke_agent_lost_records_total`).
pub mod loss {
    /// `when_full = "drop-oldest"` deleted spooled records.
    pub const SPOOL_FULL: &str = "spool_full";
    /// The local broker deleted records before the agent read them (retention).
    pub const RETENTION: &str = "retention";
    /// Offsets skipped where the local broker could not say whether they were deleted (its
    /// low watermark was unavailable): counted as lost, an upper bound, with their range.
    pub const GAP_UNMEASURED: &str = "gap_unmeasured";
    /// The hub refuses the records (too large once provenance is added, a hub topic name
    /// Kafka does not allow): the relay put them in its dead-letter topic instead.
    pub const REJECTED: &str = "rejected";
    /// The source partition's offsets went back (topic recreated, records lost by the local
    /// broker): records of the old log the agent never read. The new log is replicated as the
    /// partition's next incarnation.
    pub const SOURCE_RESET: &str = "source_reset";
    /// Every reason, so each series exists (at 0) before the first loss.
    pub const REASONS: &[&str] = &[
        SPOOL_FULL,
        RETENTION,
        GAP_UNMEASURED,
        REJECTED,
        SOURCE_RESET,
    ];
}

pub type LossLabels = Vec<(String, String)>;

/// A report of the congestion controller older than this says nothing about the link: with
/// no acknowledgements the shipper is idle or has no connection. Longer than the gaps between
/// acknowledgements on a 600 ms link.
pub const LINK_REPORT_FRESH: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct Progress {
    pub records_spooled: Counter,
    /// Records per chunk is what the linger and the batch size make of the edge's rate.
    pub chunks_spooled: Counter,
    pub records_acked: Counter,
    pub wire_bytes: Counter,
    pub lost: Family<LossLabels, Counter>,
    /// Source partitions found to be a new log: also those whose lost records nobody can
    /// count (a topic recreated while the agent was stopped), which `lost` cannot show.
    pub source_resets: Counter,
    pub relay_connected: AtomicBool,
    /// Signalled by the tailer after chunks became durable in the spool.
    pub spooled: Notify,
    /// Unix ms of the tailer's last successful metadata refresh (local broker reachable).
    pub local_broker_seen_ms: AtomicU64,
    /// Unix ms of the last frame received from a relay.
    pub relay_seen_ms: AtomicU64,
    /// How much of the recent time the congestion window held the shipper back.
    pub link_limited: Arc<spoke_transport::congestion::LinkLimited>,
    /// Source topic → partition count, from the tailer's metadata refreshes. The relay needs
    /// it to create a missing hub topic with the same partitioning.
    partition_counts: Mutex<HashMap<String, i32>>,
    /// Local (last stable) high watermark per partition, from librdkafka statistics.
    high_watermarks: Mutex<HashMap<SourcePartition, i64>>,
    /// Local low watermark (log start) per partition, from librdkafka statistics: an offset
    /// jump from at or above it is a hole in the log (markers, aborted records, compaction),
    /// not a loss.
    low_watermarks: Mutex<HashMap<SourcePartition, i64>>,
    rate: Mutex<Option<RateSample>>,
    /// The most recent losses, for `/status` (the counter has them all).
    recent_losses: Mutex<std::collections::VecDeque<Loss>>,
    /// Per partition, the source offset below which spooled chunks may already be in the hub:
    /// sent without an Ack yet, or straddling the last resume point. Drop-oldest spares them,
    /// so a record it counts as lost is never delivered as well.
    unsettled: Mutex<HashMap<SourcePartition, i64>>,
    /// Per partition, the last offset counted as `rejected` by this process.
    rejected_through: Mutex<HashMap<SourcePartition, i64>>,
}

/// Records that will never reach the hub: which, and why.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Loss {
    pub reason: String,
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub records: u64,
    pub at_ms: u64,
}

const RECENT_LOSSES: usize = 100;

#[derive(Debug, Clone, Copy)]
struct RateSample {
    at: Instant,
    acked: u64,
    per_second: f64,
}

impl Progress {
    pub fn count_lost(&self, reason: &str, records: u64) {
        self.lost
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc_by(records);
    }

    /// Counts a loss and keeps it for `/status`; the caller logs it.
    pub fn record_loss(&self, loss: Loss) {
        self.count_lost(&loss.reason, loss.records);
        let mut recent = lock(&self.recent_losses);
        if recent.len() == RECENT_LOSSES {
            recent.pop_front();
        }
        recent.push_back(loss);
    }

    /// Whether refused records up to `last_offset` are news: a relay that judges a resent
    /// batch again refuses the same records, and they must be counted once. Offsets in the
    /// spool only grow (a new incarnation continues them), so a refusal never seen before
    /// always ends past the last one.
    pub fn first_rejection(&self, partition: &SourcePartition, last_offset: i64) -> bool {
        let mut through = lock(&self.rejected_through);
        match through.get(partition) {
            Some(&counted) if last_offset <= counted => false,
            _ => {
                through.insert(partition.clone(), last_offset);
                true
            }
        }
    }

    pub fn lost_total(&self) -> u64 {
        lost_by_reason(&self.lost).values().sum()
    }

    pub fn set_partition_count(&self, topic: &str, count: i32) {
        lock(&self.partition_counts).insert(topic.to_owned(), count);
    }

    /// Runs `f` with the per-partition bounds below which chunks may be in the hub, locked:
    /// the shipper takes a chunk from the spool and raises the bound in one step, and
    /// drop-oldest picks its victim under the same lock, so it never takes a chunk that is
    /// on its way to a relay.
    pub fn with_unsettled<T>(&self, f: impl FnOnce(&mut HashMap<SourcePartition, i64>) -> T) -> T {
        f(&mut lock(&self.unsettled))
    }

    /// At start nothing is known of what the previous process sent: every spooled chunk
    /// (below each partition's spooled `position`) may be in the hub until a relay's Welcome
    /// settles it, and drop-oldest must spare it until then.
    pub fn unsettled_since_start(
        &self,
        positions: impl IntoIterator<Item = (SourcePartition, i64)>,
    ) {
        self.settled(positions);
    }

    /// A relay's Welcome settles everything sent before: chunks wholly below its resume
    /// points are in the hub (and removed), everything else is not, except a chunk that
    /// straddles a resume point.
    pub fn settled(&self, resume: impl IntoIterator<Item = (SourcePartition, i64)>) {
        let mut unsettled = lock(&self.unsettled);
        unsettled.clear();
        unsettled.extend(resume);
    }

    pub fn partition_count(&self, topic: &str) -> Option<i32> {
        lock(&self.partition_counts).get(topic).copied()
    }

    /// The partition's high watermark as librdkafka's statistics last gave it.
    pub fn high_watermark(&self, partition: &SourcePartition) -> Option<i64> {
        lock(&self.high_watermarks).get(partition).copied()
    }

    pub fn set_high_watermark(&self, partition: SourcePartition, offset: i64) {
        lock(&self.high_watermarks).insert(partition, offset);
    }

    pub fn set_low_watermark(&self, partition: SourcePartition, offset: i64) {
        lock(&self.low_watermarks).insert(partition, offset);
    }

    pub fn low_watermark(&self, partition: &SourcePartition) -> Option<i64> {
        lock(&self.low_watermarks).get(partition).copied()
    }

    /// The congestion window, not a lack of data, held the shipper back most of the recent
    /// time: the link is what limits shipping.
    pub fn link_is_bottleneck(&self, now: Instant) -> bool {
        self.link_limited.is_bottleneck(LINK_REPORT_FRESH, now)
    }

    pub fn touch(stamp: &AtomicU64) {
        stamp.store(crate::now_ms(), Ordering::Relaxed);
    }

    /// Acknowledged records per second, smoothed over the calls (at least a second apart).
    fn acked_rate(&self) -> f64 {
        let now = Instant::now();
        let acked = self.records_acked.get();
        let mut rate = lock(&self.rate);
        match *rate {
            None => {
                *rate = Some(RateSample {
                    at: now,
                    acked,
                    per_second: 0.0,
                });
                0.0
            }
            Some(sample) if now.duration_since(sample.at).as_secs_f64() >= 1.0 => {
                let instant =
                    (acked - sample.acked) as f64 / now.duration_since(sample.at).as_secs_f64();
                let per_second = if sample.per_second == 0.0 {
                    instant
                } else {
                    0.5 * instant + 0.5 * sample.per_second
                };
                *rate = Some(RateSample {
                    at: now,
                    acked,
                    per_second,
                });
                per_second
            }
            Some(sample) => sample.per_second,
        }
    }

    /// Everything an operator asks about, computed from the spool and the counters.
    pub fn snapshot(&self, site: &str, spool: &dyn Spool, spool_max_bytes: u64) -> AgentStatus {
        let stats = spool.stats();
        let now = crate::now_ms();
        let oldest = spool.oldest_spooled_at_ms().ok().flatten();
        let mut partitions = Vec::new();
        let high_watermarks: Vec<(SourcePartition, i64)> = lock(&self.high_watermarks)
            .iter()
            .map(|(p, o)| (p.clone(), *o))
            .collect();
        for (partition, high_watermark) in high_watermarks {
            // Not yet in the hub: everything from the oldest spooled chunk on, or (nothing
            // spooled) everything the tailer has not read yet.
            let acked = match spool.chunks_from(&partition, i64::MIN, 1) {
                Ok(chunks) => match chunks.first() {
                    Some(chunk) => Some(chunk.first_offset),
                    None => spool.position(&partition).ok().flatten(),
                },
                Err(_) => None,
            };
            // In the source's offsets, as the high watermark is.
            let incarnation = spool.incarnation(&partition).unwrap_or_default();
            let acked_offset = incarnation.source(acked.unwrap_or(0));
            partitions.push(PartitionStatus {
                lag: u64::try_from(high_watermark - acked_offset).unwrap_or(0),
                topic: partition.topic,
                partition: partition.partition,
                high_watermark,
                acked_offset,
            });
        }
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        let backlog: u64 = partitions.iter().map(|p| p.lag).sum();
        let records_per_s = self.acked_rate();
        let lost_by_reason = lost_by_reason(&self.lost);
        AgentStatus {
            site: site.to_owned(),
            relay_connected: self.relay_connected.load(Ordering::Relaxed),
            spool_bytes: stats.bytes,
            spool_max_bytes,
            spool_records: stats.records,
            oldest_unacked_seconds: oldest.map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0),
            records_spooled: self.records_spooled.get(),
            records_acked: self.records_acked.get(),
            wire_bytes: self.wire_bytes.get(),
            records_lost: lost_by_reason.values().sum(),
            lost_by_reason,
            records_per_s,
            backlog_records: backlog,
            drain_seconds: (records_per_s > 0.0).then(|| backlog as f64 / records_per_s),
            partitions,
            recent_losses: lock(&self.recent_losses).iter().cloned().collect(),
        }
    }
}

fn lost_by_reason(lost: &Family<LossLabels, Counter>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for reason in loss::REASONS {
        let labels = vec![("reason".to_owned(), (*reason).to_owned())];
        out.insert((*reason).to_owned(), lost.get_or_create(&labels).get());
    }
    out
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps of last-seen values: a panic elsewhere cannot leave them inconsistent.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The agent's view of itself: `/status`, `spoke-agent status`, and the heartbeats.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AgentStatus {
    pub site: String,
    pub relay_connected: bool,
    pub spool_bytes: u64,
    pub spool_max_bytes: u64,
    pub spool_records: u64,
    pub oldest_unacked_seconds: f64,
    pub records_spooled: u64,
    pub records_acked: u64,
    pub records_lost: u64,
    pub lost_by_reason: BTreeMap<String, u64>,
    pub wire_bytes: u64,
    pub records_per_s: f64,
    /// Records in the local broker not yet confirmed in the hub.
    pub backlog_records: u64,
    /// Time to drain the backlog at the current rate; None while nothing is being acked.
    pub drain_seconds: Option<f64>,
    pub partitions: Vec<PartitionStatus>,
    /// The last losses (at most 100), oldest first.
    pub recent_losses: Vec<Loss>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    pub high_watermark: i64,
    pub acked_offset: i64,
    pub lag: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_judged_again_is_counted_once() {
        let progress = Progress::default();
        let partition = |partition| SourcePartition {
            topic: "t".into(),
            partition,
        };
        assert!(progress.first_rejection(&partition(0), 50));
        assert!(
            !progress.first_rejection(&partition(0), 50),
            "the resent batch's"
        );
        assert!(!progress.first_rejection(&partition(0), 10));
        assert!(
            progress.first_rejection(&partition(1), 50),
            "another partition's"
        );
        assert!(progress.first_rejection(&partition(0), 51));
    }
}
