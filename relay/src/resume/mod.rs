//! The resume point of a site's source partition: how far it already is in the hub, read
//! back from the hub itself (the newest checkpoint, then the provenance headers of what landed
//! after it), so that a relay keeps no state and any relay can serve any site.

mod index;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
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
        let mut config = self.client_config();
        // A scan reads a range that is there and stops; the hub holding a fetch open for
        // more data (fetch.wait.max.ms, 500 ms by default) only delays it. Measured on the
        // test broker under load: a read of 16 records took 250 ms and one of 64 took 750 ms
        // by default, 20 to 45 ms with this.
        config.set("fetch.wait.max.ms", SCAN_FETCH_WAIT_MS);
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
            let partition_scan = PartitionScan {
                reader: &consumer,
                topic: &topic,
                site: &site,
                source_partition,
            };
            for (hub_partition, floor, high) in ranges {
                let found = partition_scan.newest(
                    &scans.index,
                    hub_partition,
                    (floor, high),
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
    /// What scans of shared hub partitions learned, for the next ones.
    index: index::ProvenanceIndex,
}

impl std::fmt::Debug for ScanPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScanPool")
            .field("idle", &self.lock().len())
            .field("indexed_partitions", &self.index.len())
            .finish_non_exhaustive()
    }
}

/// How long a resume scan's fetch lets the hub wait for more data (ms).
const SCAN_FETCH_WAIT_MS: &str = "20";

/// Resume scans that read the hub at the same time; the rest wait their turn.
pub const CONCURRENT_SCANS: usize = 4;

impl ScanPool {
    pub fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(ScanPool {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENT_SCANS)),
            consumers: std::sync::Mutex::new(Vec::new()),
            index: index::ProvenanceIndex::default(),
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

/// Hub records a resume scan reads backwards from a partition's end before it indexes the
/// older part: enough for the site's own topic (its newest record is the last one), so
/// only a partition shared by sites gets an index.
const DIRECT_SCAN_RECORDS: i64 = 256;

/// One resume scan's reads of hub partitions: the newest record of (`site`,
/// `source_partition`) in `topic`.
struct PartitionScan<'a> {
    reader: &'a dyn HubReader,
    topic: &'a str,
    site: &'a str,
    source_partition: i32,
}

impl PartitionScan<'_> {
    /// The source offset of the newest record of the site's source partition among hub
    /// offsets `floor..high` of `partition`. A partition with an index (shared by sites) is
    /// asked through it; any other has its last [`DIRECT_SCAN_RECORDS`] read backwards, and
    /// if the record is not there, the older part is indexed: read once for every site that
    /// needs it, instead of once per site.
    fn newest(
        &self,
        indexes: &index::ProvenanceIndex,
        partition: i32,
        (floor, high): (i64, i64),
        scanned: &mut u64,
    ) -> Result<Option<i64>, HubError> {
        if indexes.has(self.topic, partition) {
            // Each read of a busy hub costs a round trip or more (250 ms to seconds on the
            // test broker under load): one read of what landed since beats three windows.
            return match self.indexed(indexes, partition, (floor, high), scanned)? {
                Some(answer) => Ok(answer),
                None => self.backwards(partition, (floor, high), scanned),
            };
        }
        let older = floor.max(high - DIRECT_SCAN_RECORDS);
        if let Some(found) = self.backwards(partition, (older, high), scanned)? {
            return Ok(Some(found));
        }
        if older == floor {
            return Ok(None);
        }
        // The index takes in the tail just read too, so that the next site's scan reads on
        // from the partition's end instead of reading that tail again.
        match self.indexed(indexes, partition, (floor, high), scanned)? {
            Some(answer) => Ok(answer),
            None => self.backwards(partition, (floor, older), scanned),
        }
    }

    /// Reads hub offsets `floor..end` of `partition` backwards in growing windows until it
    /// finds the newest record of the site's source partition, and returns its source offset.
    fn backwards(
        &self,
        partition: i32,
        (floor, mut end): (i64, i64),
        scanned: &mut u64,
    ) -> Result<Option<i64>, HubError> {
        let mut window: i64 = 16;
        while end > floor {
            let start = (end - window).max(floor);
            let mut newest = None;
            self.read(partition, (start, end), |_, landed| {
                *scanned += 1;
                if let Some(offset) = self.own_offset(landed) {
                    newest = Some(offset);
                }
            })?;
            if newest.is_some() {
                return Ok(newest);
            }
            end = start;
            window = window.saturating_mul(4);
        }
        Ok(None)
    }

    /// What `partition`'s index says about hub offsets `floor..upto`, after it read on to
    /// `upto`: `Some(newest)`, checked against the hub, or `None` when the index cannot
    /// answer (it is full, or named a record the hub does not hold).
    fn indexed(
        &self,
        indexes: &index::ProvenanceIndex,
        partition: i32,
        (floor, upto): (i64, i64),
        scanned: &mut u64,
    ) -> Result<Option<Option<i64>>, HubError> {
        let shared = indexes.partition(self.topic, partition, floor);
        let mut index = index::lock(&shared);
        if index.is_full() {
            return Ok(None);
        }
        if index.start() > floor || index.end() < floor {
            // Started above this floor (by a site with a checkpoint), or ended below it (read
            // a while ago): start over from the floor, reading what this scan has to read
            // anyway. The index stays one contiguous range of the partition.
            *index = index::PartitionIndex::starting_at(floor);
        }
        if index.end() < upto {
            let from = index.end();
            // On a failure what it read so far stays: its end says how far that is.
            self.read(partition, (from, upto), |offset, landed| {
                *scanned += 1;
                index.read(offset, landed);
            })?;
            index.reached(upto);
            if index.is_full() {
                return Ok(None);
            }
        }
        match index.answer(self.site, self.source_partition, floor, upto) {
            index::Answer::Nothing => Ok(Some(None)),
            index::Answer::Unknown => Ok(None),
            index::Answer::Newest(landed) => {
                let mut holds = false;
                self.read(
                    partition,
                    (landed.hub_offset, landed.hub_offset + 1),
                    |_, provenance| {
                        *scanned += 1;
                        holds = self.own_offset(provenance) == Some(landed.source_offset);
                    },
                )?;
                if holds {
                    Ok(Some(Some(landed.source_offset)))
                } else {
                    // The topic was recreated since the index read it: read it anew.
                    tracing::warn!(
                        topic = self.topic,
                        partition,
                        hub_offset = landed.hub_offset,
                        "the resume scan index named a record the hub no longer holds; \
                         dropping the index"
                    );
                    *index = index::PartitionIndex::starting_at(floor);
                    Ok(None)
                }
            }
        }
    }

    /// Reads hub offsets `start..end` of `partition` in order, handing every record's
    /// offset and provenance to `visit`.
    fn read(
        &self,
        partition: i32,
        range: (i64, i64),
        mut visit: impl FnMut(i64, Option<Provenance<'_>>),
    ) -> Result<(), HubError> {
        self.reader.read(self.topic, partition, range, &mut visit)
    }

    /// The source offset a record's provenance names, if it is of this scan's site and
    /// source partition.
    fn own_offset(&self, provenance: Option<Provenance<'_>>) -> Option<i64> {
        let (origin, partition, offset) = provenance?;
        (origin == self.site.as_bytes() && partition == self.source_partition).then_some(offset)
    }
}

/// A record's (origin, source partition, source offset).
type Provenance<'a> = (&'a [u8], i32, i64);

/// What resume scans read the hub through: a consumer, or a partition in memory in tests.
trait HubReader {
    /// Reads hub offsets `start..end` of `topic`/`partition` in order, handing every record's
    /// offset and provenance to `visit`.
    fn read(
        &self,
        topic: &str,
        partition: i32,
        range: (i64, i64),
        visit: &mut dyn FnMut(i64, Option<Provenance<'_>>),
    ) -> Result<(), HubError>;
}

impl HubReader for BaseConsumer {
    /// Fails when the read makes no progress for [`SCAN_POLL_TIMEOUT`].
    fn read(
        &self,
        topic: &str,
        partition: i32,
        (start, end): (i64, i64),
        visit: &mut dyn FnMut(i64, Option<Provenance<'_>>),
    ) -> Result<(), HubError> {
        let scan_err = |source| HubError::Scan {
            topic: topic.to_owned(),
            partition,
            source,
        };
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(start))
            .map_err(scan_err)?;
        self.assign(&assignment).map_err(scan_err)?;
        let began = Instant::now();
        let mut deadline = Instant::now() + SCAN_POLL_TIMEOUT;
        let mut reached = start;
        while reached < end {
            if Instant::now() > deadline {
                return Err(HubError::ScanTimeout {
                    topic: topic.to_owned(),
                    partition,
                    target: end,
                });
            }
            let before = reached;
            match self.poll(Duration::from_millis(200)) {
                None => {
                    // On a hub with transactions a range ends in a commit or abort marker
                    // (and may hold aborted records), which this read_committed consumer
                    // never returns: only its position says that it passed them.
                    reached = reached.max(position(self, topic, partition).map_err(scan_err)?);
                }
                Some(Err(KafkaError::MessageConsumption(code))) if reconnecting(code) => {
                    // librdkafka reconnects by itself; the deadline bounds the wait. A
                    // pooled consumer reports this after the hub was restarted while it
                    // was idle, and its first reads after that are no failure.
                    tracing::debug!(topic, partition, %code, "resume scan waits for the hub");
                }
                Some(result) => {
                    let message = result.map_err(scan_err)?;
                    if message.topic() != topic || message.partition() != partition {
                        // Fetched for an earlier assignment of this reused consumer.
                        continue;
                    }
                    reached = message.offset() + 1;
                    if message.offset() >= end {
                        break;
                    }
                    visit(message.offset(), provenance(&message));
                }
            }
            if reached > before {
                // A long range (an index read through a whole partition) takes as long as
                // it takes; only a read that stops moving fails.
                deadline = Instant::now() + SCAN_POLL_TIMEOUT;
            }
        }
        tracing::debug!(
            topic,
            partition,
            start,
            end,
            elapsed_ms = began.elapsed().as_millis() as u64,
            "TIMING read"
        );
        Ok(())
    }
}

/// Whether a consumer error only says that the hub connection is being re-established.
fn reconnecting(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure
    )
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

/// The (origin, source partition, source offset) a hub record carries, if it carries them.
fn provenance<M: Message>(message: &M) -> Option<Provenance<'_>> {
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
    Some((
        origin?,
        i32::try_from(parse(partition)?).ok()?,
        parse(offset)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// One hub partition in memory: each offset's provenance (site, source offset; source
    /// partition 0), and how many reads asked for it.
    #[derive(Default)]
    struct Partition {
        records: RefCell<Vec<(String, i64)>>,
        reads: Cell<usize>,
    }

    impl Partition {
        fn holding(runs: &[(&str, i64)]) -> Self {
            let partition = Partition::default();
            partition.refill(runs);
            partition
        }

        /// The partition as a topic created anew with `runs`: (site, records from source
        /// offset 0) one after another.
        fn refill(&self, runs: &[(&str, i64)]) {
            *self.records.borrow_mut() = runs
                .iter()
                .flat_map(|&(site, count)| (0..count).map(move |offset| (site.to_owned(), offset)))
                .collect();
        }
    }

    impl HubReader for Partition {
        fn read(
            &self,
            _topic: &str,
            _partition: i32,
            (start, end): (i64, i64),
            visit: &mut dyn FnMut(i64, Option<Provenance<'_>>),
        ) -> Result<(), HubError> {
            self.reads.set(self.reads.get() + 1);
            let records = self.records.borrow();
            for offset in start..end {
                let record = usize::try_from(offset).ok().and_then(|i| records.get(i));
                if let Some((site, source_offset)) = record {
                    visit(offset, Some((site.as_bytes(), 0, *source_offset)));
                }
            }
            Ok(())
        }
    }

    /// Where `site`'s source partition 0 is in all of `hub`, and the records read to find it.
    fn newest(hub: &Partition, indexes: &index::ProvenanceIndex, site: &str) -> (Option<i64>, u64) {
        let scan = PartitionScan {
            reader: hub,
            topic: "orders",
            site,
            source_partition: 0,
        };
        let high = i64::try_from(hub.records.borrow().len()).expect("small");
        let mut scanned = 0;
        let found = scan
            .newest(indexes, 0, (0, high), &mut scanned)
            .expect("in memory");
        (found, scanned)
    }

    #[test]
    fn sites_in_a_shared_partition_read_it_once_between_them() {
        let hub = Partition::holding(&[("b", 6), ("a", 1_000)]);
        let indexes = index::ProvenanceIndex::default();
        // c has nothing there: the tail read backwards, then the whole partition indexed.
        assert_eq!(newest(&hub, &indexes, "c"), (None, 256 + 1_006));
        // b is answered by the index, and its record read back once.
        assert_eq!(newest(&hub, &indexes, "b"), (Some(5), 1));
        assert_eq!(newest(&hub, &indexes, "d"), (None, 0));
        assert_eq!(newest(&hub, &indexes, "a"), (Some(999), 1));
    }

    /// The index is a cache of the hub: the hub topic deleted and created anew under it
    /// (records of a only) must not resume b after a record the hub no longer holds, which
    /// would skip b's records 0..=5 for good.
    #[test]
    fn an_index_answer_is_read_back_from_the_hub_before_it_is_trusted() {
        let hub = Partition::holding(&[("b", 6), ("a", 1_000)]);
        let indexes = index::ProvenanceIndex::default();
        assert_eq!(newest(&hub, &indexes, "c").0, None);
        assert_eq!(newest(&hub, &indexes, "b").0, Some(5));
        hub.refill(&[("a", 1_006)]);
        assert_eq!(
            newest(&hub, &indexes, "b").0,
            None,
            "resumed after a record of the deleted topic"
        );
        // The index was dropped and built anew from the new topic.
        assert_eq!(newest(&hub, &indexes, "a").0, Some(1_005));
    }

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
