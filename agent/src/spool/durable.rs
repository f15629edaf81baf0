//! How far each partition's writes are durable: the line the shipper may not cross.
//!
//! A chunk the tailer appended is visible to readers at once, but survives a crash only once
//! a later flush returned. A batch that left the agent before that could be in the hub while
//! the crash took it out of the spool: the hub then runs ahead of the spool, which only the
//! relay's resume scan hides (and `delivery = "at-least-once"` has none). So a flush records,
//! per partition, the position its writes had reached when it started, and only chunks at or
//! below that position are shipped.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::SourcePartition;

#[derive(Debug, Default)]
pub(super) struct DurableMarks {
    marks: Mutex<Marks>,
}

#[derive(Debug, Default)]
struct Marks {
    /// Positions written since the last flush began.
    written: HashMap<SourcePartition, i64>,
    /// Positions a returned flush covers.
    durable: HashMap<SourcePartition, i64>,
}

/// The positions one flush covers, taken when it begins.
#[derive(Debug)]
pub(super) struct Covered(HashMap<SourcePartition, i64>);

impl DurableMarks {
    /// Everything already stored is durable (the store synced it when it opened).
    pub(super) fn opened(positions: impl IntoIterator<Item = (SourcePartition, i64)>) -> Self {
        Self {
            marks: Mutex::new(Marks {
                written: HashMap::new(),
                durable: positions.into_iter().collect(),
            }),
        }
    }

    /// A write that returned moved `partition` to `next_offset`.
    pub(super) fn written(&self, partition: &SourcePartition, next_offset: i64) {
        let mut marks = self.lock();
        let position = marks
            .written
            .entry(partition.clone())
            .or_insert(next_offset);
        *position = (*position).max(next_offset);
    }

    /// A flush begins: it covers every write that returned before now.
    pub(super) fn flushing(&self) -> Covered {
        Covered(std::mem::take(&mut self.lock().written))
    }

    /// The flush that began with `covered` returned.
    pub(super) fn flushed(&self, covered: Covered) {
        let mut marks = self.lock();
        for (partition, next_offset) in covered.0 {
            let position = marks.durable.entry(partition).or_insert(next_offset);
            *position = (*position).max(next_offset);
        }
    }

    /// The failed flush that began with `covered` must be covered by the next one.
    pub(super) fn retry(&self, covered: Covered) {
        let mut marks = self.lock();
        for (partition, next_offset) in covered.0 {
            let position = marks.written.entry(partition).or_insert(next_offset);
            *position = (*position).max(next_offset);
        }
    }

    pub(super) fn position(&self, partition: &SourcePartition) -> Option<i64> {
        self.lock().durable.get(partition).copied()
    }

    fn lock(&self) -> MutexGuard<'_, Marks> {
        // Plain maps updated by statements that cannot panic half-way.
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(partition: i32) -> SourcePartition {
        SourcePartition {
            topic: "orders".into(),
            partition,
        }
    }

    #[test]
    fn only_writes_before_a_flush_began_become_durable() {
        let marks = DurableMarks::opened([(sp(0), 10)]);
        assert_eq!(marks.position(&sp(0)), Some(10));
        marks.written(&sp(0), 20);
        assert_eq!(marks.position(&sp(0)), Some(10), "written, not flushed");
        let covered = marks.flushing();
        marks.written(&sp(0), 30);
        marks.written(&sp(1), 5);
        marks.flushed(covered);
        assert_eq!(
            marks.position(&sp(0)),
            Some(20),
            "the write after the flush began"
        );
        assert_eq!(marks.position(&sp(1)), None);
        let failed = marks.flushing();
        marks.retry(failed);
        marks.flushed(marks.flushing());
        assert_eq!(marks.position(&sp(0)), Some(30));
        assert_eq!(marks.position(&sp(1)), Some(5));
    }
}
