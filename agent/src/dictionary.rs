//! `ship.dictionary = "auto"`: one zstd dictionary per topic of small records, trained from
//! the topic's first records as they are spooled, stored in the spool, and used for small
//! chunks.
//!
//! Why only small chunks: a chunk of a few records (low rate, short linger) has too little
//! history of its own for zstd to find repeats in, so a dictionary of what such records look
//! like saves about a third of the bytes (100 B JSON records, 7 per chunk: 47 → 35 wire bytes
//! per record at level 3); a full 1 MiB chunk finds the same repeats in itself and gains
//! nothing (docs/decisions.md; figures in docs/benchmarks.md). Everything here is bounded: samples per
//! topic, topics sampled at once, one training per topic and process.

use std::collections::HashMap;
use std::sync::Arc;

use spoke_proto::EncoderDictionary;
use tracing::{info, warn};

use crate::spool::{Spool, SpoolError};

/// Records sampled per topic before training.
const SAMPLE_RECORDS: usize = 2000;
/// Sample bytes kept per topic; training starts when reached even with fewer records.
const SAMPLE_BYTES: usize = 1024 * 1024;
/// Topics sampled at once: bounds sample memory to `SAMPLE_BYTES` times this.
const SAMPLING_TOPICS: usize = 4;
/// Topics whose records average this much or more get no dictionary.
const SMALL_RECORD: usize = 1024;
/// Size of a trained dictionary (measured: 16 KiB does as well as 64 KiB on small records).
pub const DICTIONARY_BYTES: usize = 16 * 1024;
/// Chunks whose record section is larger than this are compressed without the dictionary.
pub const MAX_SECTION: usize = 64 * 1024;

enum Topic {
    Sampling {
        /// sampled records back to back
        data: Vec<u8>,
        sizes: Vec<usize>,
    },
    Ready(Arc<EncoderDictionary>),
    /// Large records, or training failed: no dictionary for this topic in this process.
    Skipped,
}

/// Per-topic dictionaries of the tailer.
pub struct TopicDictionaries {
    enabled: bool,
    zstd_level: i32,
    topics: HashMap<String, Topic>,
    /// stored dictionary bytes per topic, to prepare again when the level changes
    stored: HashMap<String, (u32, Vec<u8>)>,
}

impl std::fmt::Debug for TopicDictionaries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicDictionaries")
            .field("enabled", &self.enabled)
            .field("topics", &self.topics.len())
            .finish_non_exhaustive()
    }
}

impl TopicDictionaries {
    /// Loads each topic's newest stored dictionary (when `enabled`) and deletes stored
    /// dictionaries that no chunk needs and that are not in use.
    pub fn open(
        spool: &dyn Spool,
        enabled: bool,
        zstd_level: i32,
    ) -> Result<TopicDictionaries, SpoolError> {
        let mut this = TopicDictionaries {
            enabled,
            zstd_level,
            topics: HashMap::new(),
            stored: HashMap::new(),
        };
        if enabled {
            // Ids grow, so the last one per topic is its newest.
            for stored in spool.dictionaries()? {
                this.stored
                    .insert(stored.topic.clone(), (stored.id, stored.bytes.to_vec()));
            }
            let stored: Vec<_> = this.stored.keys().cloned().collect();
            for topic in stored {
                this.prepare(&topic);
            }
        }
        let in_use: Vec<u32> = this.stored.values().map(|(id, _)| *id).collect();
        let removed = spool.remove_unused_dictionaries(&|id| in_use.contains(&id))?;
        if !removed.is_empty() {
            spool.flush()?;
            info!(?removed, "deleted dictionaries no spooled chunk needs");
        }
        Ok(this)
    }

    fn prepare(&mut self, topic: &str) {
        let Some((id, bytes)) = self.stored.get(topic) else {
            return;
        };
        let state = match EncoderDictionary::new(*id, bytes, self.zstd_level) {
            Ok(encoder) => Topic::Ready(Arc::new(encoder)),
            Err(error) => {
                warn!(%topic, %error, "cannot use the stored dictionary; compressing without");
                Topic::Skipped
            }
        };
        self.topics.insert(topic.to_owned(), state);
    }

    /// A new zstd level (configuration reload): dictionaries are prepared per level.
    pub fn set_level(&mut self, zstd_level: i32) {
        if zstd_level == self.zstd_level {
            return;
        }
        self.zstd_level = zstd_level;
        let topics: Vec<_> = self.stored.keys().cloned().collect();
        for topic in topics {
            self.prepare(&topic);
        }
    }

    /// Whether `topic` wants samples (call [`TopicDictionaries::sample`] with each new record).
    pub fn wants_samples(&mut self, topic: &str) -> bool {
        if !self.enabled {
            return false;
        }
        if let Some(state) = self.topics.get(topic) {
            return matches!(state, Topic::Sampling { .. });
        }
        let sampling = self
            .topics
            .values()
            .filter(|t| matches!(t, Topic::Sampling { .. }))
            .count();
        if sampling >= SAMPLING_TOPICS {
            return false;
        }
        self.topics.insert(
            topic.to_owned(),
            Topic::Sampling {
                data: Vec::new(),
                sizes: Vec::new(),
            },
        );
        true
    }

    /// Adds one encoded record of `topic`; trains, stores and starts using the dictionary
    /// once enough are sampled.
    pub fn sample(
        &mut self,
        spool: &dyn Spool,
        topic: &str,
        record: &[u8],
    ) -> Result<(), SpoolError> {
        let Some(Topic::Sampling { data, sizes }) = self.topics.get_mut(topic) else {
            return Ok(());
        };
        if record.is_empty() {
            return Ok(());
        }
        data.extend_from_slice(record);
        sizes.push(record.len());
        if sizes.len() < SAMPLE_RECORDS && data.len() < SAMPLE_BYTES {
            return Ok(());
        }
        let average = data.len() / sizes.len();
        if average >= SMALL_RECORD {
            info!(%topic, average, "records too large to gain from a dictionary");
            self.topics.insert(topic.to_owned(), Topic::Skipped);
            return Ok(());
        }
        // Trained inline, once per topic: tens of milliseconds for a MiB of samples.
        let trained = zstd::dict::from_continuous(data, sizes, DICTIONARY_BYTES);
        let records = sizes.len();
        let bytes = match trained {
            Ok(bytes) => bytes,
            Err(error) => {
                warn!(%topic, %error, "dictionary training failed; compressing without");
                self.topics.insert(topic.to_owned(), Topic::Skipped);
                return Ok(());
            }
        };
        // Durable before any chunk names it.
        let id = spool.add_dictionary(topic, &bytes)?;
        spool.flush()?;
        info!(%topic, id, records, average, bytes = bytes.len(), "trained a dictionary");
        self.stored.insert(topic.to_owned(), (id, bytes));
        self.prepare(topic);
        Ok(())
    }

    /// The dictionary to compress a chunk of `topic` with `section_len` uncompressed bytes.
    pub fn for_chunk(&self, topic: &str, section_len: usize) -> Option<Arc<EncoderDictionary>> {
        if !self.enabled || section_len > MAX_SECTION {
            return None;
        }
        match self.topics.get(topic) {
            Some(Topic::Ready(encoder)) => Some(encoder.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::MemorySpool;

    fn record(i: usize) -> Vec<u8> {
        format!(
            "{{\"id\":\"ord-{i:08}\",\"qty\":{},\"sku\":\"VALVE-{}\",\"tier\":\"gold\"}}",
            i % 50,
            i * 7919 % 10_000
        )
        .into_bytes()
    }

    #[test]
    fn trains_once_from_small_records_and_reloads_after_restart() {
        let spool = MemorySpool::new();
        let mut d = TopicDictionaries::open(&spool, true, 3).expect("open");
        assert!(d.for_chunk("t", 100).is_none());
        for i in 0..SAMPLE_RECORDS {
            assert!(d.wants_samples("t"), "record {i}");
            d.sample(&spool, "t", &record(i)).expect("sample");
        }
        assert!(!d.wants_samples("t"), "trained");
        let encoder = d.for_chunk("t", 1000).expect("a dictionary");
        assert!(
            d.for_chunk("t", MAX_SECTION + 1).is_none(),
            "large chunks go without"
        );
        let stored = spool.dictionaries().expect("spool");
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].topic, "t");
        assert_eq!(encoder.id(), stored[0].id);
        assert!(stored[0].bytes.len() <= DICTIONARY_BYTES);
        // "Restart": the stored dictionary is used again, not trained anew.
        let mut again = TopicDictionaries::open(&spool, true, 3).expect("open");
        assert_eq!(again.for_chunk("t", 10).map(|e| e.id()), Some(encoder.id()));
        assert!(!again.wants_samples("t"));
        // Off: not used, and deleted once no chunk needs it.
        let off = TopicDictionaries::open(&spool, false, 3).expect("open");
        assert!(off.for_chunk("t", 10).is_none());
        assert!(spool.dictionaries().expect("spool").is_empty());
    }

    #[test]
    fn large_records_and_many_topics_are_bounded() {
        let spool = MemorySpool::new();
        let mut d = TopicDictionaries::open(&spool, true, 3).expect("open");
        let big = vec![b'x'; 2000];
        while d.wants_samples("big") {
            d.sample(&spool, "big", &big).expect("sample");
        }
        assert!(d.for_chunk("big", 10).is_none());
        assert!(spool.dictionaries().expect("spool").is_empty());
        for t in 0..SAMPLING_TOPICS {
            assert!(d.wants_samples(&format!("t{t}")));
        }
        assert!(!d.wants_samples("one-too-many"));
    }
}
