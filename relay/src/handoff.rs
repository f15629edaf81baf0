//! Handing a partition's records to the hub producer one produce request at a time.
//!
//! librdkafka's idempotent producer keeps one ProduceRequest in flight per partition: it
//! compares the partition's in-flight *messages* with the limit of 5 requests, so a batch of
//! more than 4 records holds the next back until it is answered. And while it waits, a queued
//! record older than `linger.ms` sets its broker thread's next wake-up to "now": the thread
//! polls its socket without sleeping until the response comes. Behind a hub slower than the
//! link that is a core spinning per session, taken from the hub brokers where they share the
//! machine (docs/benchmarks.md, "The relay's producer").
//!
//! So a reader hands the producer one group of a partition's records at a time, each group
//! small enough for one produce request (`batch.size`), and the next group only once the last
//! record of the one before landed. Nothing then waits in librdkafka's queue behind a request
//! in flight, and the partition still moves one request per round trip to the hub, as before;
//! what it adds per request is the hand-over of the next group and, for a group under
//! `batch.size`, the producer's `linger.ms` (5 ms) before it goes out.

use std::collections::HashMap;
use std::future::Future;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use spoke_proto::Record;

use crate::producer::InFlight;
pub use crate::producer::Landing;

/// The producer's `batch.size`, set explicitly so that the groups below fit it.
pub const BATCH_SIZE: usize = 1_000_000;

/// Bytes of records per group: a tenth under `batch.size`, the margin for the estimate of
/// [`record_bytes`] against librdkafka's own framing.
pub const GROUP_BYTES: usize = BATCH_SIZE / 10 * 9;

/// A record's size in a produce request, as near as the relay can tell before librdkafka
/// frames it: key, value, header names and values (its own and `provenance` bytes of the
/// relay's), and the record's framing (lengths, deltas and attributes, a few dozen bytes).
pub fn record_bytes(record: &Record, provenance: usize) -> usize {
    const FRAMING: usize = 64;
    let len = |bytes: &Option<bytes::Bytes>| bytes.as_ref().map_or(0, |b| b.len());
    let headers: usize = record
        .headers
        .iter()
        .map(|h| h.key.len() + len(&h.value))
        .sum();
    len(&record.key) + len(&record.value) + headers + provenance + FRAMING
}

/// Counts a partition's records into groups of at most [`GROUP_BYTES`] (a single larger
/// record is a group of its own).
#[derive(Debug, Default)]
pub struct Grouping {
    bytes: usize,
}

impl Grouping {
    /// Counts a record of `bytes`; true if it starts a new group, so that the one before must
    /// be closed (and waited for) first.
    pub fn starts_group(&mut self, bytes: usize) -> bool {
        let starts = self.bytes > 0 && self.bytes + bytes > GROUP_BYTES;
        if starts {
            self.bytes = 0;
        }
        self.bytes += bytes;
        starts
    }
}

/// The last record of a group: awaited by the reader before the partition's next group, and
/// by the acker with the rest of its batch.
type Tail = Shared<BoxFuture<'static, Landing>>;

/// A record handed to the producer, not yet confirmed.
pub enum Pending {
    Record(InFlight),
    Last(Tail),
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pending::Record(_) => "Pending::Record",
            Pending::Last(_) => "Pending::Last",
        })
    }
}

impl Pending {
    pub async fn landed(self) -> Landing {
        match self {
            Pending::Record(delivery) => delivery.await,
            Pending::Last(tail) => tail.await,
        }
    }
}

/// One reader's record of the group each of its partitions last handed over.
#[derive(Default)]
pub struct Gates {
    tails: HashMap<(String, i32), Tail>,
}

impl std::fmt::Debug for Gates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gates")
            .field("partitions", &self.tails.len())
            .finish()
    }
}

impl Gates {
    /// Waits until the last record of `partition`'s previous group landed. If it failed, so
    /// does this: nothing more of the partition may be handed over, since later records
    /// landing after a failed one would leave a gap below the newest record, which the next
    /// resume scan takes for the partition's progress. librdkafka's gapless guarantee does not
    /// cover a record that timed out, and a shared producer cannot be purged for one session.
    pub async fn wait(&self, partition: &(String, i32)) -> Result<(), rdkafka::error::KafkaError> {
        match self.tails.get(partition) {
            Some(tail) => tail.clone().await.map(|_| ()),
            None => Ok(()),
        }
    }

    /// Closes a group with its last record's delivery: the partition's next group waits for
    /// it.
    pub fn close(
        &mut self,
        partition: (String, i32),
        last: impl Future<Output = Landing> + Send + 'static,
    ) -> Pending {
        let tail: Tail = last.boxed().shared();
        self.tails.insert(partition, tail.clone());
        Pending::Last(tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_chunk_is_handed_over_in_groups_that_fit_one_request() {
        let mut grouping = Grouping::default();
        let one = Record {
            offset: 7,
            timestamp: None,
            key: Some(bytes::Bytes::from_static(b"order-17")),
            value: Some(bytes::Bytes::from(vec![b'x'; 1_024])),
            headers: Vec::new(),
        };
        let record = record_bytes(&one, 60);
        assert_eq!(record, 8 + 1_024 + 60 + 64);
        let mut groups = vec![0usize];
        // A 1 MiB chunk of 1 KiB records: more than one request holds.
        for _ in 0..1_024 {
            if grouping.starts_group(record) {
                groups.push(0);
            }
            *groups.last_mut().expect("a group") += record;
        }
        assert_eq!(groups.len(), 2, "{groups:?}");
        assert!(groups.iter().all(|&g| g <= GROUP_BYTES), "{groups:?}");
        assert!(groups[0] > GROUP_BYTES - record, "{groups:?}");
        // A record larger than a group is one of its own, between two others.
        let mut grouping = Grouping::default();
        assert!(!grouping.starts_group(record));
        assert!(grouping.starts_group(2 * BATCH_SIZE));
        assert!(grouping.starts_group(record));
    }

    #[tokio::test]
    async fn a_partitions_next_group_waits_for_the_last_record_of_the_one_before() {
        let partition = ("orders".to_owned(), 2);
        let mut gates = Gates::default();
        // No group before: nothing to wait for.
        tokio::time::timeout(Duration::from_millis(100), gates.wait(&partition))
            .await
            .expect("no wait for a partition's first group")
            .expect("nothing failed");

        let (land, landed) = InFlight::pending();
        let pending = gates.close(partition.clone(), landed);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), gates.wait(&partition))
                .await
                .is_err(),
            "the next group went ahead of a record still in flight"
        );
        // Another partition's groups are not held.
        tokio::time::timeout(
            Duration::from_millis(100),
            gates.wait(&("orders".into(), 3)),
        )
        .await
        .expect("another partition waited")
        .expect("nothing failed there");

        land.send(Ok((2, 41))).expect("receiver alive");
        tokio::time::timeout(Duration::from_secs(5), gates.wait(&partition))
            .await
            .expect("the gate opens once the record landed")
            .expect("landed");
        // The acker still learns where it landed.
        assert_eq!(pending.landed().await.expect("landed"), (2, 41));
    }

    #[tokio::test]
    async fn nothing_more_of_a_partition_goes_after_a_group_that_failed() {
        let partition = ("orders".to_owned(), 0);
        let mut gates = Gates::default();
        let (land, landed) = InFlight::pending();
        let _pending = gates.close(partition.clone(), landed);
        land.send(Err(rdkafka::error::KafkaError::MessageProduction(
            rdkafka::types::RDKafkaErrorCode::MessageTimedOut,
        )))
        .expect("receiver alive");
        let verdict = tokio::time::timeout(Duration::from_secs(5), gates.wait(&partition))
            .await
            .expect("resolved");
        assert!(
            verdict.is_err(),
            "the next group would go out behind a record that may never land"
        );
    }
}
