//! State the tailer, the shipper and (later) the admin endpoint share: counters that only
//! grow, wake-ups between the tasks, and what the tailer learned from the local broker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Progress {
    pub records_spooled: AtomicU64,
    pub records_acked: AtomicU64,
    pub records_lost: AtomicU64,
    pub wire_bytes: AtomicU64,
    pub relay_connected: AtomicBool,
    /// Signalled by the tailer after chunks became durable in the spool.
    pub spooled: Notify,
    /// Source topic → partition count, from the tailer's metadata refreshes. The relay needs
    /// it to create a missing hub topic with the same partitioning.
    partition_counts: Mutex<HashMap<String, i32>>,
}

impl Progress {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn set_partition_count(&self, topic: &str, count: i32) {
        self.counts().insert(topic.to_owned(), count);
    }

    pub fn partition_count(&self, topic: &str) -> Option<i32> {
        self.counts().get(topic).copied()
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, i32>> {
        // A plain map of last-seen values: a panic elsewhere cannot leave it inconsistent.
        self.partition_counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
