//! The resume point of a site's source partition: how far it already is in the hub, read
//! back from the hub itself (the newest checkpoint, then the provenance headers of what landed
//! after it), so that a relay keeps no state and any relay can serve any site.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::checkpoint::Checkpoint;
use crate::hub::{
    hub_partition, scan_consumer, Hub, HubError, HEADER_OFFSET, HEADER_ORIGIN, HEADER_PARTITION,
    METADATA_TIMEOUT, SCAN_POLL_TIMEOUT,
};

impl Hub {
    /// Where a site's source partition resumes: the first source offset that `hub_topic`
    /// does not hold yet. Starts from `checkpoint` (if any) and scans the hub partition's tail
    /// down to the checkpoint's floor for records that landed after it, so a crash between
    /// data and checkpoint never duplicates. Without a checkpoint the scan goes back until it
    /// finds the site's newest record, or to the start of the partition.
    ///
    /// `count` is the hub topic's partition count as the session resolved it. Source partition
    /// p lands in hub partition [`hub_partition`]`(p, count)`, so the tail of that one hub
    /// partition is read, and of any other the checkpoint names: where p landed while the
    /// topic had fewer partitions (Kafka can add partitions to a topic, never remove them).
    pub async fn resume_point(
        &self,
        site: &str,
        hub_topic: &str,
        source_partition: i32,
        checkpoint: Option<Checkpoint>,
        count: i32,
    ) -> Result<Resume, HubError> {
        if count == 0 {
            // No hub topic (any more): nothing of this site is in the hub.
            return Ok(Resume::from_start(hub_topic));
        }
        let hub_partitions = partitions_to_scan(source_partition, count, checkpoint.as_ref());
        let marks = self.watermarks(hub_topic, hub_partitions).await?;
        let checkpoint =
            checkpoint.filter(|checkpoint| checkpoint_fits(checkpoint, &marks, count, hub_topic));
        let ranges = ranges_to_scan(&marks, checkpoint.as_ref());
        let (newest, scanned) = self
            .newest_landed(site, hub_topic, source_partition, ranges)
            .await?;
        let next_offset = newest
            .map_or(0, |offset| offset + 1)
            .max(checkpoint.as_ref().map_or(0, |c| c.next_offset));
        // Everything below each partition's end as of now is older than `next_offset`: no
        // other session of the site is producing while this one starts.
        let progress = Checkpoint {
            hub_topic: hub_topic.to_owned(),
            next_offset,
            scan_from: marks.iter().map(|&(q, _, high)| (q, high)).collect(),
        };
        Ok(Resume {
            next_offset,
            progress,
            scanned,
        })
    }

    /// The low and high watermarks of each of `hub_topic`'s `hub_partitions`, as
    /// `(partition, low, high)`.
    async fn watermarks(
        &self,
        hub_topic: &str,
        hub_partitions: Vec<i32>,
    ) -> Result<Vec<Marks>, HubError> {
        let topic = hub_topic.to_owned();
        self.ask(move |client| {
            hub_partitions
                .into_iter()
                .map(|hub_partition| {
                    let (low, high) = client
                        .fetch_watermarks(&topic, hub_partition, METADATA_TIMEOUT)
                        .map_err(|source| HubError::Scan {
                            topic: topic.clone(),
                            partition: hub_partition,
                            source,
                        })?;
                    Ok((hub_partition, low, high))
                })
                .collect::<Result<Vec<_>, HubError>>()
        })
        .await
    }

    /// The source offset of the newest record of (`site`, `source_partition`) in `ranges` of
    /// `hub_topic`, if any, and how many hub records were read to find it.
    async fn newest_landed(
        &self,
        site: &str,
        hub_topic: &str,
        source_partition: i32,
        ranges: Vec<Marks>,
    ) -> Result<(Option<i64>, u64), HubError> {
        if ranges.is_empty() {
            // Nothing landed after the checkpoint (a session that ended cleanly): no records
            // to read, so no consumer of its own to set up.
            return Ok((None, 0));
        }
        // The semaphore is never closed: a permit always comes.
        let permit = self.scans.permits.clone().acquire_owned().await.ok();
        let scans = self.scans.clone();
        let config = self.client_config();
        let site = site.to_owned();
        let topic = hub_topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let consumer = match scans.idle() {
                Some(consumer) => consumer,
                None => scan_consumer(config, "spoke-relay-resume-scan")?,
            };
            let mut newest: Option<i64> = None;
            let mut scanned = 0;
            for (hub_partition, floor, high) in ranges {
                let found = scan_partition(
                    &consumer,
                    &topic,
                    hub_partition,
                    (floor, high),
                    &site,
                    source_partition,
                    &mut scanned,
                )?;
                newest = newest.max(found);
            }
            scans.put_back(consumer);
            Ok::<_, HubError>((newest, scanned))
        })
        .await?
    }
}

/// Consumers for resume scans, reused, and how many scans run at once. A consumer costs a
/// client's threads, a connection to every hub broker and a bootstrap round trip; after a
/// relay restart thousands of sites ask for their resume points at once, and each would
/// have paid that, all together.
pub struct ScanPool {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    consumers: std::sync::Mutex<Vec<BaseConsumer>>,
}

impl std::fmt::Debug for ScanPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScanPool")
            .field("idle", &self.lock().len())
            .finish_non_exhaustive()
    }
}

/// Resume scans that read the hub at the same time; the rest wait their turn.
pub const CONCURRENT_SCANS: usize = 4;

impl ScanPool {
    pub fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(ScanPool {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENT_SCANS)),
            consumers: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn idle(&self) -> Option<BaseConsumer> {
        self.lock().pop()
    }

    /// Returns a consumer whose scan succeeded; one that failed is dropped, not trusted
    /// with the next scan.
    fn put_back(&self, consumer: BaseConsumer) {
        // The next scan assigns its own partition and offset; nothing of this one's stays
        // fetched in its name.
        if consumer.unassign().is_ok() {
            self.lock().push(consumer);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<BaseConsumer>> {
        self.consumers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One hub partition and two offsets in it: `(partition, low, high)`, as watermarks or as the
/// range a resume scan reads.
type Marks = (i32, i64, i64);

/// Whether `checkpoint` still describes the hub topic whose partitions' watermarks are
/// `marks` (of `count` partitions). A floor above the partition's end, or a partition the
/// topic no longer has, means the hub topic was recreated: the checkpoint describes data that
/// is gone, and is ignored (with a warning).
fn checkpoint_fits(checkpoint: &Checkpoint, marks: &[Marks], count: i32, hub_topic: &str) -> bool {
    let fits = marks.iter().all(|&(q, _, high)| {
        checkpoint
            .scan_from
            .get(&q)
            .is_none_or(|&floor| floor <= high)
    }) && checkpoint.scan_from.keys().all(|&q| q < count);
    if !fits {
        tracing::warn!(
            topic = hub_topic,
            "checkpoint is ahead of the hub topic; ignoring it"
        );
    }
    fits
}

/// The part of each partition in `marks` a resume scan reads: from the checkpoint's floor
/// (or the partition's start) to its end; partitions with nothing there are left out.
fn ranges_to_scan(marks: &[Marks], checkpoint: Option<&Checkpoint>) -> Vec<Marks> {
    marks
        .iter()
        .map(|&(hub_partition, low, high)| {
            let floor = checkpoint
                .and_then(|c| c.scan_from.get(&hub_partition).copied())
                .unwrap_or(low)
                .max(low);
            (hub_partition, floor, high)
        })
        .filter(|&(_, floor, high)| floor < high)
        .collect()
}

/// A resume point and what the session's checkpoints start from.
#[derive(Debug, Clone)]
pub struct Resume {
    pub next_offset: i64,
    /// A checkpoint valid at session start; the session raises it as batches are confirmed.
    pub progress: Checkpoint,
    /// Hub records read to find it.
    pub scanned: u64,
}

impl Resume {
    /// The resume point of a partition none of whose records are in `hub_topic`.
    fn from_start(hub_topic: &str) -> Self {
        Resume {
            next_offset: 0,
            progress: Checkpoint {
                hub_topic: hub_topic.to_owned(),
                next_offset: 0,
                scan_from: BTreeMap::new(),
            },
            scanned: 0,
        }
    }
}

/// The hub partitions a resume scan of `source_partition` reads: where it lands now, and
/// where the checkpoint says it landed before (while the topic had fewer partitions).
fn partitions_to_scan(
    source_partition: i32,
    count: i32,
    checkpoint: Option<&Checkpoint>,
) -> Vec<i32> {
    let mut partitions: Vec<i32> = checkpoint
        .iter()
        .flat_map(|checkpoint| checkpoint.scan_from.keys().copied())
        .filter(|&q| q < count)
        .collect();
    partitions.push(hub_partition(source_partition, count));
    partitions.sort_unstable();
    partitions.dedup();
    partitions
}

/// Reads hub offsets `floor..end` of one partition backwards in growing windows until it
/// finds the newest record of (`site`, `source_partition`), and returns its source offset.
fn scan_partition(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    (floor, mut end): (i64, i64),
    site: &str,
    source_partition: i32,
    scanned: &mut u64,
) -> Result<Option<i64>, HubError> {
    let scan_err = |source| HubError::Scan {
        topic: topic.to_owned(),
        partition,
        source,
    };
    let mut window: i64 = 16;
    while end > floor {
        let start = (end - window).max(floor);
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(start))
            .map_err(scan_err)?;
        consumer.assign(&assignment).map_err(scan_err)?;
        let mut newest = None;
        let deadline = std::time::Instant::now() + SCAN_POLL_TIMEOUT;
        let mut reached = start;
        while reached < end {
            if std::time::Instant::now() > deadline {
                return Err(HubError::ScanTimeout {
                    topic: topic.to_owned(),
                    partition,
                    target: end,
                });
            }
            let Some(result) = consumer.poll(Duration::from_millis(200)) else {
                // On a hub with transactions a range ends in a commit or abort marker (and
                // may hold aborted records), which this read_committed consumer never
                // returns: only its position says that it passed them.
                reached = reached.max(position(consumer, topic, partition).map_err(scan_err)?);
                continue;
            };
            let message = result.map_err(scan_err)?;
            if message.topic() != topic || message.partition() != partition {
                // Fetched for an earlier assignment of this reused consumer.
                continue;
            }
            reached = message.offset() + 1;
            if message.offset() >= end {
                break;
            }
            *scanned += 1;
            if let Some(offset) = provenance_offset(&message, site, source_partition) {
                newest = Some(offset);
            }
        }
        if newest.is_some() {
            return Ok(newest);
        }
        end = start;
        window = window.saturating_mul(4);
    }
    Ok(None)
}

/// Where `consumer` will read `topic`/`partition` next; -1 before it has a position.
fn position(consumer: &BaseConsumer, topic: &str, partition: i32) -> Result<i64, KafkaError> {
    let position = consumer.position()?;
    Ok(position
        .find_partition(topic, partition)
        .and_then(|element| match element.offset() {
            Offset::Offset(next) => Some(next),
            _ => None,
        })
        .unwrap_or(-1))
}

/// The source offset a hub record carries, if its provenance is (`site`, `source_partition`).
fn provenance_offset<M: Message>(message: &M, site: &str, source_partition: i32) -> Option<i64> {
    let headers = message.headers()?;
    let mut origin = None;
    let mut partition = None;
    let mut offset = None;
    for header in headers.iter() {
        match header.key {
            // The last triple is the one this hop appended; earlier ones (a chained
            // topology) describe earlier hops.
            HEADER_ORIGIN => origin = header.value,
            HEADER_PARTITION => partition = header.value,
            HEADER_OFFSET => offset = header.value,
            _ => {}
        }
    }
    let parse = |v: Option<&[u8]>| std::str::from_utf8(v?).ok()?.parse::<i64>().ok();
    (origin == Some(site.as_bytes()) && parse(partition) == Some(i64::from(source_partition)))
        .then(|| parse(offset))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_scan_also_reads_where_the_checkpoint_says_records_landed() {
        let checkpoint = |partitions: &[i32]| Checkpoint {
            hub_topic: "t".into(),
            next_offset: 10,
            scan_from: partitions.iter().map(|&q| (q, 5)).collect(),
        };
        assert_eq!(partitions_to_scan(2, 3, None), vec![2]);
        // Source partition 2 landed in hub partition 0 while the topic had two partitions;
        // a third was added since.
        assert_eq!(
            partitions_to_scan(2, 3, Some(&checkpoint(&[0]))),
            vec![0, 2]
        );
        assert_eq!(partitions_to_scan(2, 3, Some(&checkpoint(&[2]))), vec![2]);
        // A partition the topic no longer has (it was recreated smaller) is not asked for.
        assert_eq!(partitions_to_scan(1, 1, Some(&checkpoint(&[1]))), vec![0]);
    }
}
