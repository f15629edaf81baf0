//! [`MemorySpool`]: the reference model of the spool, as plain as possible.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::durable::DurableMarks;
use super::{
    out_of_order, unknown_dictionary, Chunk, Freed, Incarnation, SourcePartition, Spool,
    SpoolError, SpoolStats, StoredDictionary, TopicId,
};

/// In-memory spool: the reference model [`super::SledSpool`] is tested against. Nothing is
/// durable; `flush` does nothing. Never returns [`SpoolError::Storage`].
#[derive(Debug, Default)]
pub struct MemorySpool {
    inner: Mutex<Inner>,
    marks: DurableMarks,
}

#[derive(Debug, Default)]
struct Inner {
    positions: BTreeMap<SourcePartition, i64>,
    incarnations: BTreeMap<SourcePartition, Incarnation>,
    /// (partition, first_offset) → (append sequence, chunk)
    chunks: BTreeMap<(SourcePartition, i64), (u64, Chunk)>,
    next_seq: u64,
    dictionaries: BTreeMap<u32, StoredDictionary>,
    topic_configs: BTreeMap<String, Vec<(String, String)>>,
    next_dictionary: u32,
}

impl MemorySpool {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // the state is consistent after every statement that can panic
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Spool for MemorySpool {
    fn append(&self, chunk: &Chunk) -> Result<(), SpoolError> {
        chunk.check_well_formed()?;
        let mut inner = self.lock();
        if let Some(&position) = inner.positions.get(&chunk.partition) {
            if chunk.first_offset < position {
                return Err(out_of_order(chunk, position));
            }
        }
        if let Some(id) = chunk.dictionary {
            if !inner.dictionaries.contains_key(&id) {
                return Err(unknown_dictionary(chunk, id));
            }
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.chunks.insert(
            (chunk.partition.clone(), chunk.first_offset),
            (seq, chunk.clone()),
        );
        inner
            .positions
            .insert(chunk.partition.clone(), chunk.next_offset);
        self.marks.written(&chunk.partition, chunk.next_offset);
        Ok(())
    }

    fn advance(&self, partition: &SourcePartition, next_offset: i64) -> Result<(), SpoolError> {
        let mut inner = self.lock();
        let position = inner
            .positions
            .entry(partition.clone())
            .or_insert(next_offset);
        *position = (*position).max(next_offset);
        self.marks.written(partition, *position);
        Ok(())
    }

    fn position(&self, partition: &SourcePartition) -> Result<Option<i64>, SpoolError> {
        Ok(self.lock().positions.get(partition).copied())
    }

    fn incarnation(&self, partition: &SourcePartition) -> Result<Incarnation, SpoolError> {
        Ok(self
            .lock()
            .incarnations
            .get(partition)
            .copied()
            .unwrap_or_default())
    }

    fn begin_incarnation(
        &self,
        partition: &SourcePartition,
        incarnation: Incarnation,
    ) -> Result<(), SpoolError> {
        let mut inner = self.lock();
        if let Some(&position) = inner.positions.get(partition) {
            if incarnation.base < position {
                return Err(super::incarnation_behind(partition, incarnation, position));
            }
        }
        inner.positions.insert(partition.clone(), incarnation.base);
        inner.incarnations.insert(partition.clone(), incarnation);
        drop(inner);
        self.marks.written(partition, incarnation.base);
        Ok(())
    }

    fn name_incarnation(
        &self,
        partition: &SourcePartition,
        topic_id: TopicId,
    ) -> Result<(), SpoolError> {
        self.lock()
            .incarnations
            .entry(partition.clone())
            .or_default()
            .topic_id = Some(topic_id);
        Ok(())
    }

    fn positions(&self) -> Result<Vec<(SourcePartition, i64)>, SpoolError> {
        Ok(self
            .lock()
            .positions
            .iter()
            .map(|(p, &o)| (p.clone(), o))
            .collect())
    }

    fn chunks_from(
        &self,
        partition: &SourcePartition,
        from: i64,
        limit: usize,
    ) -> Result<Vec<Chunk>, SpoolError> {
        Ok(self
            .lock()
            .chunks
            .values()
            .map(|(_, c)| c)
            .filter(|c| &c.partition == partition && c.first_offset >= from)
            .take(limit)
            .cloned()
            .collect())
    }

    fn pending_partitions(&self) -> Result<Vec<SourcePartition>, SpoolError> {
        let mut parts: Vec<_> = self.lock().chunks.keys().map(|(p, _)| p.clone()).collect();
        parts.dedup();
        Ok(parts)
    }

    fn remove_acked(
        &self,
        partition: &SourcePartition,
        next_offset: i64,
    ) -> Result<Freed, SpoolError> {
        let mut freed = Freed::default();
        self.lock().chunks.retain(|_, (_, c)| {
            let acked = &c.partition == partition && c.last_offset < next_offset;
            if acked {
                freed.add(c.accounted_bytes(), c.record_count);
            }
            !acked
        });
        Ok(freed)
    }

    fn pop_oldest(
        &self,
        keep: &dyn Fn(&SourcePartition, i64) -> bool,
    ) -> Result<Option<Chunk>, SpoolError> {
        let mut inner = self.lock();
        let oldest = inner
            .chunks
            .iter()
            .filter(|(_, (_, chunk))| !keep(&chunk.partition, chunk.first_offset))
            .min_by_key(|(_, (seq, _))| *seq)
            .map(|(k, _)| k.clone());
        Ok(oldest.and_then(|k| inner.chunks.remove(&k)).map(|(_, c)| c))
    }

    fn oldest_spooled_at_ms(&self) -> Result<Option<u64>, SpoolError> {
        Ok(self
            .lock()
            .chunks
            .values()
            .map(|(_, c)| c.spooled_at_ms)
            .min())
    }

    fn stats(&self) -> SpoolStats {
        let inner = self.lock();
        let mut stats = SpoolStats::default();
        for (_, c) in inner.chunks.values() {
            stats.bytes += c.accounted_bytes();
            stats.chunks += 1;
            stats.records += u64::from(c.record_count);
        }
        stats
    }

    fn add_dictionary(&self, topic: &str, bytes: &[u8]) -> Result<u32, SpoolError> {
        let mut inner = self.lock();
        let id = inner.next_dictionary;
        inner.next_dictionary = id.checked_add(1).ok_or(SpoolError::DictionaryIds)?;
        inner.dictionaries.insert(
            id,
            StoredDictionary {
                id,
                topic: topic.to_owned(),
                bytes: bytes::Bytes::copy_from_slice(bytes),
            },
        );
        Ok(id)
    }

    fn dictionary(&self, id: u32) -> Result<Option<StoredDictionary>, SpoolError> {
        Ok(self.lock().dictionaries.get(&id).cloned())
    }

    fn set_topic_config(
        &self,
        topic: &str,
        entries: &[(String, String)],
    ) -> Result<(), SpoolError> {
        self.lock()
            .topic_configs
            .insert(topic.to_owned(), entries.to_vec());
        Ok(())
    }

    fn topic_config(&self, topic: &str) -> Result<Option<Vec<(String, String)>>, SpoolError> {
        Ok(self.lock().topic_configs.get(topic).cloned())
    }

    fn dictionaries(&self) -> Result<Vec<StoredDictionary>, SpoolError> {
        Ok(self.lock().dictionaries.values().cloned().collect())
    }

    fn remove_unused_dictionaries(
        &self,
        keep: &dyn Fn(u32) -> bool,
    ) -> Result<Vec<u32>, SpoolError> {
        let mut inner = self.lock();
        let used: std::collections::BTreeSet<u32> = inner
            .chunks
            .values()
            .filter_map(|(_, c)| c.dictionary)
            .collect();
        let unused: Vec<u32> = inner
            .dictionaries
            .keys()
            .copied()
            .filter(|id| !used.contains(id) && !keep(*id))
            .collect();
        for id in &unused {
            inner.dictionaries.remove(id);
        }
        Ok(unused)
    }

    fn flush(&self) -> Result<(), SpoolError> {
        self.marks.flushed(self.marks.flushing());
        Ok(())
    }

    fn durable_position(&self, partition: &SourcePartition) -> Option<i64> {
        self.marks.position(partition)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{chunk, sp};
    use super::*;

    #[test]
    fn is_usable_across_threads() {
        let s = std::sync::Arc::new(MemorySpool::new());
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let p = sp("t", t);
                    for i in 0..50 {
                        s.append(&chunk(&p, i, i, i + 1, 0)).expect("spool op");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        assert_eq!(s.stats().chunks, 200);
        assert_eq!(s.pending_partitions().expect("spool op").len(), 4);
    }
}
