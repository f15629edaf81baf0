//! What resume scans of a hub partition shared by many sites learned, kept for the next
//! site's scan.
//!
//! In an aggregated hub topic (`hub.topic = "{topic}"`) one hub partition holds every site's
//! records. A site with no checkpoint (new, or whose checkpoints were lost) has its resume
//! scan read back until it finds its newest record, which for a site with none there is the
//! whole partition: after a relay restart a fleet of such sites read it once each (1,000
//! sites: 228 welcomed within 70 s). The index reads the older part once, forward, and keeps
//! the newest record of every (site, source partition) in it, so each later scan reads only
//! what landed since. It is a cache of the hub, never a source of truth: an answer that
//! names a record is checked against the record in the hub before it is used, an index
//! unused for [`INDEX_IDLE`] is dropped, and one that cannot answer falls back to the scan.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

/// An index no scan has used for this long is dropped: what it holds is then read again
/// from the hub by the next scan that needs it.
pub const INDEX_IDLE: Duration = Duration::from_secs(60);

/// (site, source partition) pairs one partition's index holds at most (about 100 bytes
/// each); past that the partition is scanned as without an index.
pub const INDEX_MAX_ENTRIES: usize = 1_000_000;

/// A record of a site's source partition in a hub partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Landed {
    pub hub_offset: i64,
    pub source_offset: i64,
}

/// What an index says about the newest record of a (site, source partition) between two
/// hub offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// This one (to be checked against the hub before it is trusted).
    Newest(Landed),
    /// There is none.
    Nothing,
    /// The index cannot tell: the range is not what it read, or it saw a newer record than
    /// the range allows.
    Unknown,
}

/// The newest record of every (site, source partition) among hub offsets `start..end` of one
/// hub partition.
#[derive(Debug)]
pub struct PartitionIndex {
    start: i64,
    end: i64,
    newest: HashMap<(Vec<u8>, i32), Landed>,
    used: Instant,
}

impl PartitionIndex {
    /// An index that has read nothing yet and will read from `start` on.
    pub fn starting_at(start: i64) -> Self {
        PartitionIndex {
            start,
            end: start,
            newest: HashMap::new(),
            used: Instant::now(),
        }
    }

    /// Where the index has read up to (exclusive).
    pub fn end(&self) -> i64 {
        self.end
    }

    /// Where the index started reading: it answers for ranges from here on.
    pub fn start(&self) -> i64 {
        self.start
    }

    pub fn is_full(&self) -> bool {
        self.newest.len() >= INDEX_MAX_ENTRIES
    }

    /// Takes in the record at `hub_offset` (read in order, from [`Self::end`] on) and, if it
    /// carries provenance, its (origin, source partition, source offset).
    pub fn read(&mut self, hub_offset: i64, provenance: Option<(&[u8], i32, i64)>) {
        if let Some((origin, source_partition, source_offset)) = provenance {
            let landed = Landed {
                hub_offset,
                source_offset,
            };
            // Records are read in hub order: the last one seen is the newest.
            self.newest
                .insert((origin.to_vec(), source_partition), landed);
        }
        self.end = self.end.max(hub_offset + 1);
    }

    /// Marks the index read up to `end` (what follows the last record in a range: markers,
    /// aborted records).
    pub fn reached(&mut self, end: i64) {
        self.end = self.end.max(end);
    }

    /// The newest record of (`site`, `source_partition`) among hub offsets `floor..upto`.
    pub fn answer(&mut self, site: &str, source_partition: i32, floor: i64, upto: i64) -> Answer {
        self.used = Instant::now();
        if self.start > floor || self.end < upto {
            return Answer::Unknown;
        }
        match self
            .newest
            .get(&(site.as_bytes().to_vec(), source_partition))
        {
            None => Answer::Nothing,
            Some(landed) if landed.hub_offset < floor => Answer::Nothing,
            Some(landed) if landed.hub_offset < upto => Answer::Newest(*landed),
            // A newer record than the range allows: the scan of the part above `upto` found
            // none, so the index read another incarnation of the topic. Do not guess.
            Some(_) => Answer::Unknown,
        }
    }

    fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.used)
    }
}

/// The indexes of the hub partitions that resume scans needed one for, by (topic, partition).
/// A scan locks its partition's index while it reads it on, so scans of the same partition
/// read each record once between them, not once each.
#[derive(Debug, Default)]
pub struct ProvenanceIndex {
    partitions: Mutex<HashMap<(String, i32), SharedIndex>>,
}

/// One partition's index, locked by the scan reading it.
pub type SharedIndex = Arc<Mutex<PartitionIndex>>;

impl ProvenanceIndex {
    /// Whether a scan indexed `topic`/`partition` lately: it is shared by sites.
    pub fn has(&self, topic: &str, partition: i32) -> bool {
        lock(&self.partitions).contains_key(&(topic.to_owned(), partition))
    }

    /// The index of `topic`/`partition`, new if there was none; indexes idle for
    /// [`INDEX_IDLE`] are dropped on the way.
    pub fn partition(&self, topic: &str, partition: i32, start: i64) -> SharedIndex {
        let now = Instant::now();
        let mut partitions = lock(&self.partitions);
        partitions.retain(|_, index| match index.try_lock() {
            Ok(index) => index.idle_for(now) < INDEX_IDLE,
            // In use by a scan: not idle.
            Err(TryLockError::WouldBlock) => true,
            Err(TryLockError::Poisoned(poisoned)) => {
                poisoned.into_inner().idle_for(now) < INDEX_IDLE
            }
        });
        partitions
            .entry((topic.to_owned(), partition))
            .or_insert_with(|| Arc::new(Mutex::new(PartitionIndex::starting_at(start))))
            .clone()
    }

    /// Hub partitions with an index.
    pub(super) fn len(&self) -> usize {
        lock(&self.partitions).len()
    }
}

/// A poisoned lock only means a scan panicked while holding it; the index is a cache that
/// the answer check guards, so it stays usable.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn landed(hub_offset: i64, source_offset: i64) -> Landed {
        Landed {
            hub_offset,
            source_offset,
        }
    }

    /// Hub offsets 100..106 of a shared partition: sites a and b, a's partitions 0 and 1.
    fn index() -> PartitionIndex {
        let mut index = PartitionIndex::starting_at(100);
        index.read(100, Some((b"a", 0, 7)));
        index.read(101, Some((b"b", 0, 50)));
        index.read(102, None);
        index.read(103, Some((b"a", 1, 3)));
        index.read(104, Some((b"a", 0, 8)));
        index.reached(106);
        index
    }

    #[test]
    fn it_names_the_newest_record_of_a_site_and_source_partition() {
        let mut index = index();
        assert_eq!(
            index.answer("a", 0, 100, 106),
            Answer::Newest(landed(104, 8))
        );
        assert_eq!(
            index.answer("a", 1, 100, 106),
            Answer::Newest(landed(103, 3))
        );
        assert_eq!(
            index.answer("b", 0, 100, 106),
            Answer::Newest(landed(101, 50))
        );
        assert_eq!(index.answer("c", 0, 100, 106), Answer::Nothing);
        assert_eq!(index.answer("b", 1, 100, 106), Answer::Nothing);
    }

    #[test]
    fn it_answers_only_for_what_it_read() {
        let mut index = index();
        // Below its start, or beyond its end: it cannot tell.
        assert_eq!(index.answer("c", 0, 99, 106), Answer::Unknown);
        assert_eq!(index.answer("c", 0, 100, 107), Answer::Unknown);
        // A record below the range's floor is not in the range.
        assert_eq!(index.answer("b", 0, 102, 106), Answer::Nothing);
        // A newest record above the range means the range's own scan missed it: the index
        // read something else (a recreated topic), so it does not answer.
        assert_eq!(index.answer("a", 0, 100, 104), Answer::Unknown);
    }

    #[test]
    fn scans_of_one_partition_share_its_index_and_idle_ones_are_dropped() {
        let indexes = ProvenanceIndex::default();
        let first = indexes.partition("t", 0, 0);
        lock(&first).read(0, Some((b"a", 0, 1)));
        let again = indexes.partition("t", 0, 0);
        assert!(Arc::ptr_eq(&first, &again));
        assert!(!Arc::ptr_eq(&first, &indexes.partition("t", 1, 0)));
        assert_eq!(indexes.len(), 2);
        lock(&first).used = Instant::now() - INDEX_IDLE;
        let fresh = indexes.partition("t", 1, 0);
        assert_eq!(indexes.len(), 1, "the idle index of t/0 is dropped");
        drop(fresh);
        assert_eq!(
            lock(&indexes.partition("t", 0, 0)).end(),
            0,
            "t/0 starts over"
        );
    }
}
