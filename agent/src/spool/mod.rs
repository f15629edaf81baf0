//! The agent's durable spool: compressed chunks of source records plus, per source partition, the
//! position where reading resumes.
//!
//! The [`Spool`] trait is small on purpose. [`SledSpool`] is the real store (sled 0.34, which
//! calls itself beta); [`MemorySpool`] is the reference model it is checked against by a
//! model-based property test (see the tests at the bottom of this file).
//!
//! # Durability
//!
//! No write is durable when it returns. [`Spool::append`], [`Spool::advance`],
//! [`Spool::remove_acked`] and [`Spool::pop_oldest`] are visible to readers at once but only
//! survive a crash (process kill, power loss) once a later [`Spool::flush`] has returned `Ok`:
//! `flush` makes every write that returned before it durable. With sled that takes more than
//! `Db::flush`, which on Linux ends in `sync_file_range`: that neither flushes the disk's write
//! cache nor commits the log file's new size, and sled never syncs its blob files or
//! directories (traced with strace; docs/DESIGN.md, "Durability of the spool"). So
//! [`SledSpool`] also `fdatasync`s the log, syncs new blob files and their directory, and
//! syncs its directories when it opens. The tailer must not treat a chunk as spooled, nor the
//! source offset as safe, before `flush`, and the shipper sends only chunks a returned flush
//! covers ([`Spool::durable_position`]): otherwise a batch could be in the hub while a crash
//! took it out of the spool. A removal lost in a crash only means the chunk is sent again,
//! which the relay deduplicates.
//!
//! A chunk and the source position after it are written in **one** atomic sled batch, so after a
//! crash either both are there or neither is: reading resumes exactly where the spool ends.
//!
//! # On-disk format (sled, default tree, chunk format versions 2 and 3)
//!
//! `format.rs` encodes and decodes it (keys, values, checksums; no sled access); `sled.rs` is
//! the store that writes and reads it.
//!
//! All integers are big-endian. Signed integers used in keys are stored with the sign bit flipped
//! (`x ^ i64::MIN`), so that byte order equals numeric order. A Kafka topic name never contains a
//! `0x00` byte, so `topic 0x00` ends the name unambiguously and byte order of keys equals
//! [`SourcePartition`] order.
//!
//! * Position: key `b'p' ++ topic ++ 0x00 ++ partition (i32, flipped)`; value: the next source
//!   offset (`i64`, 8 bytes, not flipped).
//! * Chunk: key `b'c' ++ topic ++ 0x00 ++ partition (i32, flipped) ++ first_offset (i64,
//!   flipped)`; value, a 51-byte header then the payload exactly as it will be shipped:
//!
//!   | bytes  | field                                                     |
//!   |--------|-----------------------------------------------------------|
//!   | 0      | format version, `2`                                       |
//!   | 1..9   | `last_offset` (i64)                                       |
//!   | 9..17  | `next_offset` (i64)                                       |
//!   | 17..21 | `record_count` (u32)                                      |
//!   | 21     | `codec` (u8, opaque to the spool)                         |
//!   | 22..26 | `uncompressed_len` (u32)                                  |
//!   | 26..34 | `spooled_at_ms` (u64, wall clock)                         |
//!   | 34..42 | append sequence number (u64)                              |
//!   | 42     | `1` if the payload needs a dictionary, else `0`           |
//!   | 43..47 | dictionary id (u32; 0 when byte 42 is 0)                  |
//!   | 47..51 | CRC32 (IEEE) over the key, value bytes 0..47 and payload  |
//!   | 51..   | payload                                                   |
//!
//!   The checksum covers the key too, so a value found under the wrong key is detected. It is
//!   verified on every read, and on open for every chunk whose payload follows its header; a
//!   mismatch is [`SpoolError::Corrupt`]. Format version 1 (written before dictionaries
//!   existed) is the same without bytes 42..47 (a 46-byte header); it is still read, as a
//!   chunk without a dictionary, so an upgraded agent ships what an older one spooled. Every
//!   write of a payload up to 4 KiB uses version 2.
//! * A longer payload is stored in pieces (chunk format version 3): the chunk's value is the
//!   version 2 header with `3` in byte 0 and the payload's length (u32) at 47..51, then the
//!   CRC32 at 51..55 over the key, value bytes 0..51 and the whole payload; no payload follows.
//!   Piece `i` (from 0) holds payload bytes `4096 i .. 4096 (i + 1)` under the key
//!   `b'q' ++ topic ++ 0x00 ++ partition (i32, flipped) ++ first_offset (i64, flipped) ++ i
//!   (u32)`; the chunk, its pieces and the position are written in one batch and removed
//!   together. Why: sled 0.34 stores a page over about 128 KiB as a blob and counts only the
//!   blob's pointer against its cache, so a backlog of chunks in single values stayed
//!   resident in full (see `format.rs`, `PIECE_BYTES`). An agent older than version 3 refuses
//!   such a spool on open (unknown format version 3) rather than misreading it.
//! * Dictionary: key `b'd' ++ id (u32)`; value: format version `1` (u8), CRC32 (u32) over the
//!   key and the rest of the value, topic length (u16), topic, then the zstd dictionary. A
//!   dictionary is written (and flushed) before the first chunk that names it, and deleted
//!   only once no chunk names it ([`Spool::remove_unused_dictionaries`]), so every spooled
//!   chunk stays decodable across restarts. An agent older than the dictionary support
//!   refuses such a spool on open (unknown key) rather than misreading it.
//!
//! The append sequence number orders chunks globally for [`Spool::pop_oldest`]; on open it
//! continues after the largest one stored. Dictionary ids likewise continue after the largest
//! stored, and are never reused while the process runs.
//!
//! # Accounting
//!
//! [`SpoolStats::bytes`] counts each chunk as its payload length plus
//! [`CHUNK_OVERHEAD_BYTES`] (key, header and sled's per-entry overhead, roughly). Positions are not
//! counted. The counters live in memory and are rebuilt by a scan on open.

use std::fmt;

pub use spoke_kafka::topics::TopicId;

mod durable;
mod format;
mod model;
mod sled;

pub use self::model::MemorySpool;
pub use self::sled::SledSpool;

/// Bytes counted per chunk on top of its payload in [`SpoolStats::bytes`] and [`Freed::bytes`]:
/// roughly the key, the 46-byte value header and sled's per-entry overhead.
pub const CHUNK_OVERHEAD_BYTES: u64 = 64;

/// Source partition identity
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourcePartition {
    pub topic: String,
    pub partition: i32,
}

/// Which log of a source partition the agent reads. A partition whose offsets went backwards
/// (the topic deleted and created anew, a broker that lost records it had acknowledged) is a
/// new log under the same name: incarnation `epoch` + 1, whose offset `o` the agent spools,
/// ships and checkpoints as `base + o`, `base` being where the previous incarnation's
/// position stood. So the partition's offsets in spoke never go back, and two incarnations'
/// offset 0 never meet in a resume point. Records carry the edge truth in `spoke-epoch` and
/// `spoke-source-offset` headers (see `tail`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Incarnation {
    pub epoch: u32,
    pub base: i64,
    /// The broker's id of the topic whose log this is, once the agent has seen one: a
    /// different id is a new log even where the offsets do not show it.
    pub topic_id: Option<TopicId>,
}

impl Incarnation {
    /// The spool offset of source offset `offset` of this incarnation.
    pub fn spooled(&self, offset: i64) -> i64 {
        self.base.saturating_add(offset)
    }

    /// The source offset of spool offset `offset`.
    pub fn source(&self, offset: i64) -> i64 {
        offset.saturating_sub(self.base)
    }
}

impl fmt::Display for SourcePartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// One spooled chunk: zstd-compressed records of one partition, stored exactly as it will be shipped.
///
/// A well-formed chunk has `first_offset <= last_offset < next_offset`; [`Spool::append`] rejects
/// any other as [`SpoolError::Corrupt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub partition: SourcePartition,
    /// offset of the first record in the chunk
    pub first_offset: i64,
    /// offset of the last record
    pub last_offset: i64,
    /// the source position after this chunk (> last_offset)
    pub next_offset: i64,
    pub record_count: u32,
    /// wire codec id, opaque to the spool
    pub codec: u8,
    /// the stored dictionary the payload was compressed with, if any
    pub dictionary: Option<u32>,
    pub uncompressed_len: u32,
    /// wall clock when spooled, for "oldest unacked" age
    pub spooled_at_ms: u64,
    pub payload: bytes::Bytes,
}

impl Chunk {
    /// What this chunk counts for in [`SpoolStats::bytes`] / [`Freed::bytes`].
    pub fn accounted_bytes(&self) -> u64 {
        self.payload.len() as u64 + CHUNK_OVERHEAD_BYTES
    }

    /// `Err(Corrupt)` unless `first_offset <= last_offset < next_offset`.
    fn check_well_formed(&self) -> Result<(), SpoolError> {
        if self.first_offset <= self.last_offset && self.last_offset < self.next_offset {
            Ok(())
        } else {
            Err(SpoolError::Corrupt(format!(
                "chunk for {} has offsets first {}, last {}, next {} (want first <= last < next)",
                self.partition, self.first_offset, self.last_offset, self.next_offset
            )))
        }
    }
}

/// A zstd dictionary kept in the spool for the chunks that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDictionary {
    pub id: u32,
    /// the source topic it was trained on
    pub topic: String,
    pub bytes: bytes::Bytes,
}

/// What the spool holds: chunks only (positions are not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolStats {
    /// payload bytes + [`CHUNK_OVERHEAD_BYTES`] per chunk
    pub bytes: u64,
    pub chunks: u64,
    pub records: u64,
}

/// what a removal freed
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Freed {
    /// payload bytes + [`CHUNK_OVERHEAD_BYTES`] per chunk
    pub bytes: u64,
    pub chunks: u64,
    pub records: u64,
}

impl Freed {
    fn add(&mut self, chunk_bytes: u64, records: u32) {
        self.bytes += chunk_bytes;
        self.chunks += 1;
        self.records += u64::from(records);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The storage engine failed (I/O error, ...). `MemorySpool` never returns it.
    #[error("spool storage error: {0}")]
    Storage(#[from] ::sled::Error),
    /// A stored entry failed its checksum or does not parse, or a chunk handed to `append` is
    /// not well-formed.
    #[error("spool entry is corrupt: {0}")]
    Corrupt(String),
    /// Another process still held the spool's lock after `open` waited for it.
    #[error("spool {0} is locked by another process (is another spoke-agent running?)")]
    Locked(String),
    /// `append` of a chunk naming a dictionary the spool does not hold.
    #[error("chunk for {partition}:{first} names dictionary {id}, which is not in the spool")]
    UnknownDictionary {
        partition: String,
        first: i64,
        id: u32,
    },
    /// Every dictionary id is taken (2^32 dictionaries in one process).
    #[error("no dictionary id left")]
    DictionaryIds,
    /// Making the spool's files durable failed.
    #[error("syncing {path} to disk: {source}")]
    Sync {
        path: String,
        source: std::io::Error,
    },
    /// `append` of a chunk that starts before the partition's spooled position.
    #[error("chunk for {partition}:{first} does not follow the spooled position {position}")]
    OutOfOrder {
        partition: String,
        first: i64,
        position: i64,
    },
}

/// Durable store of chunks and source positions. See the module doc for when writes are durable.
pub trait Spool: Send + Sync + 'static {
    /// Stores the chunk and moves the partition's source position to `chunk.next_offset` in ONE
    /// atomic write (sled: a single `apply_batch`), so after a crash either both or neither are
    /// there. Rejects (`OutOfOrder`) a chunk whose `first_offset` < the current position, and
    /// (`Corrupt`) one that is not well-formed (see [`Chunk`]). NOT durable until `flush`.
    fn append(&self, chunk: &Chunk) -> Result<(), SpoolError>;
    /// Moves the source position forward without data (records skipped/filtered, or a gap).
    /// Never moves it backward (no-op then). Not durable until flush.
    fn advance(&self, partition: &SourcePartition, next_offset: i64) -> Result<(), SpoolError>;
    /// Where reading of this partition resumes, if the spool has ever seen it.
    fn position(&self, partition: &SourcePartition) -> Result<Option<i64>, SpoolError>;
    /// Every known partition with its position, sorted by partition.
    fn positions(&self) -> Result<Vec<(SourcePartition, i64)>, SpoolError>;
    /// The partition's current incarnation (the first one, epoch 0 and base 0, unless
    /// [`Spool::begin_incarnation`] said otherwise).
    fn incarnation(&self, partition: &SourcePartition) -> Result<Incarnation, SpoolError>;
    /// Records that the partition's source is a new log from here on: `incarnation.base` must
    /// be at or past the partition's position, and becomes it. Not durable until flush.
    fn begin_incarnation(
        &self,
        partition: &SourcePartition,
        incarnation: Incarnation,
    ) -> Result<(), SpoolError>;
    /// Records the topic id of the partition's current incarnation, first seen now; the
    /// position stays. Not durable until flush.
    fn name_incarnation(
        &self,
        partition: &SourcePartition,
        topic_id: TopicId,
    ) -> Result<(), SpoolError>;
    /// Up to `limit` chunks of the partition with first_offset >= from, in offset order.
    fn chunks_from(
        &self,
        partition: &SourcePartition,
        from: i64,
        limit: usize,
    ) -> Result<Vec<Chunk>, SpoolError>;
    /// Partitions that currently hold at least one chunk, sorted.
    fn pending_partitions(&self) -> Result<Vec<SourcePartition>, SpoolError>;
    /// Deletes every chunk of the partition whose last_offset < next_offset (the relay
    /// acknowledged them in the hub). Does not touch the position. Not durable until flush (a
    /// lost delete only means a resend, which the relay dedups).
    fn remove_acked(
        &self,
        partition: &SourcePartition,
        next_offset: i64,
    ) -> Result<Freed, SpoolError>;
    /// Deletes the globally oldest chunk (smallest append sequence) that `keep` does not
    /// claim, given its partition and first offset, and returns it: for when_full =
    /// "drop-oldest", which must not drop what may already be in the hub. None when every
    /// chunk is kept or the spool is empty. Not durable until flush.
    fn pop_oldest(
        &self,
        keep: &dyn Fn(&SourcePartition, i64) -> bool,
    ) -> Result<Option<Chunk>, SpoolError>;
    /// Oldest spooled_at_ms over all chunks (None when empty).
    fn oldest_spooled_at_ms(&self) -> Result<Option<u64>, SpoolError>;
    /// Byte accounting (see [`SpoolStats`]); kept in memory, rebuilt by scanning on open.
    fn stats(&self) -> SpoolStats;
    /// Stores a zstd dictionary trained on `topic` under a new id, which it returns. Not
    /// durable until flush; flush before appending a chunk that names it.
    fn add_dictionary(&self, topic: &str, bytes: &[u8]) -> Result<u32, SpoolError>;
    /// The dictionary `id`, if stored.
    fn dictionary(&self, id: u32) -> Result<Option<StoredDictionary>, SpoolError>;
    /// Every stored dictionary, by id.
    fn dictionaries(&self) -> Result<Vec<StoredDictionary>, SpoolError>;
    /// Deletes each dictionary that no chunk names and `keep` does not claim; returns their
    /// ids. Not durable until flush.
    fn remove_unused_dictionaries(
        &self,
        keep: &dyn Fn(u32) -> bool,
    ) -> Result<Vec<u32>, SpoolError>;
    /// Records the source topic's configuration that its hub topic must keep (the entries of
    /// [`spoke_proto::CARRIED_TOPIC_CONFIGS`] the local broker gave), replacing what was
    /// recorded; kept so that the shipper can tell the relay even while the local broker is
    /// away. Not durable until flush.
    fn set_topic_config(&self, topic: &str, entries: &[(String, String)])
        -> Result<(), SpoolError>;
    /// What [`Spool::set_topic_config`] last recorded for `topic`.
    fn topic_config(&self, topic: &str) -> Result<Option<Vec<(String, String)>>, SpoolError>;
    /// Makes every earlier write durable (sled: `Db::flush` and an `fdatasync`, see the module
    /// doc). Only after this returns may the caller treat appended data as safely spooled /
    /// source positions as safe.
    fn flush(&self) -> Result<(), SpoolError>;
    /// How far `partition`'s chunks are durable: a flush that returned covers every chunk with
    /// `next_offset` at or below it. Nothing beyond it may leave the agent.
    fn durable_position(&self, partition: &SourcePartition) -> Option<i64>;
}

fn incarnation_behind(
    partition: &SourcePartition,
    incarnation: Incarnation,
    position: i64,
) -> SpoolError {
    SpoolError::Corrupt(format!(
        "incarnation {} of {partition} would start at {}, behind its position {position}",
        incarnation.epoch, incarnation.base
    ))
}

fn unknown_dictionary(chunk: &Chunk, id: u32) -> SpoolError {
    SpoolError::UnknownDictionary {
        partition: chunk.partition.to_string(),
        first: chunk.first_offset,
        id,
    }
}

fn out_of_order(chunk: &Chunk, position: i64) -> SpoolError {
    SpoolError::OutOfOrder {
        partition: chunk.partition.to_string(),
        first: chunk.first_offset,
        position,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;
    use std::path::Path;

    pub(crate) fn sp(topic: &str, partition: i32) -> SourcePartition {
        SourcePartition {
            topic: topic.to_owned(),
            partition,
        }
    }

    pub(crate) fn chunk(p: &SourcePartition, first: i64, last: i64, next: i64, at: u64) -> Chunk {
        let payload = format!("{}-{first}-{last}", p.topic).into_bytes();
        Chunk {
            partition: p.clone(),
            first_offset: first,
            last_offset: last,
            next_offset: next,
            record_count: u32::try_from(last - first + 1).unwrap_or(u32::MAX),
            codec: 4,
            dictionary: None,
            uncompressed_len: 1000,
            spooled_at_ms: at,
            payload: Bytes::from(payload),
        }
    }

    /// A chunk of `len` bytes of payload, longer than [`chunk`]'s.
    pub(crate) fn big_chunk(p: &SourcePartition, first: i64, len: usize) -> Chunk {
        let mut c = chunk(p, first, first + 9, first + 10, 0x0102);
        c.payload = (0..len)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into();
        c
    }

    /// Runs a test body against both implementations.
    macro_rules! both {
        ($name:ident, $body:expr) => {
            mod $name {
                use super::*;
                #[test]
                fn memory() {
                    let s = MemorySpool::new();
                    ($body)(&s);
                }
                #[test]
                fn sled() {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let s = SledSpool::open(dir.path()).expect("spool op");
                    ($body)(&s);
                }
            }
        };
    }

    fn topic_configs_are_replaced_whole(s: &dyn Spool) {
        assert_eq!(s.topic_config("inventory").expect("spool op"), None);
        let compact = vec![
            ("cleanup.policy".to_owned(), "compact".to_owned()),
            ("min.compaction.lag.ms".to_owned(), "60000".to_owned()),
        ];
        s.set_topic_config("inventory", &compact).expect("spool op");
        s.set_topic_config("orders", &[]).expect("spool op");
        assert_eq!(
            s.topic_config("inventory").expect("spool op"),
            Some(compact)
        );
        let delete = vec![("cleanup.policy".to_owned(), "delete".to_owned())];
        s.set_topic_config("inventory", &delete).expect("spool op");
        assert_eq!(s.topic_config("inventory").expect("spool op"), Some(delete));
        assert_eq!(s.topic_config("orders").expect("spool op"), Some(vec![]));
        s.flush().expect("spool op");
    }

    both!(topic_configs, topic_configs_are_replaced_whole);
    fn append_sets_position_and_stores(s: &dyn Spool) {
        let a = sp("a", 0);
        assert_eq!(s.position(&a).expect("spool op"), None);
        let c = chunk(&a, 10, 14, 15, 100);
        s.append(&c).expect("spool op");
        assert_eq!(s.position(&a).expect("spool op"), Some(15));
        assert_eq!(s.chunks_from(&a, 0, 10).expect("spool op"), vec![c.clone()]);
        // starting exactly at the position, or after it (a gap), is fine
        let c2 = chunk(&a, 15, 15, 16, 101);
        s.append(&c2).expect("spool op");
        let c3 = chunk(&a, 20, 29, 31, 102);
        s.append(&c3).expect("spool op");
        assert_eq!(s.position(&a).expect("spool op"), Some(31));
        assert_eq!(s.chunks_from(&a, 0, 10).expect("spool op"), vec![c, c2, c3]);
        s.flush().expect("spool op");
    }
    both!(append_basic, append_sets_position_and_stores);

    fn append_rejects(s: &dyn Spool) {
        let a = sp("a", 0);
        s.append(&chunk(&a, 10, 14, 15, 100)).expect("spool op");
        let before = s.stats();
        let err = s
            .append(&chunk(&a, 14, 20, 21, 100))
            .expect_err("must fail");
        assert!(
            matches!(&err, SpoolError::OutOfOrder { partition, first: 14, position: 15 } if partition == "a/0"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "chunk for a/0:14 does not follow the spooled position 15"
        );
        // malformed chunks
        for bad in [
            chunk(&a, 20, 19, 21, 0),
            chunk(&a, 20, 21, 21, 0),
            chunk(&a, 20, 21, 20, 0),
        ] {
            assert!(matches!(s.append(&bad), Err(SpoolError::Corrupt(_))));
        }
        assert_eq!(s.position(&a).expect("spool op"), Some(15));
        assert_eq!(s.stats(), before);
        assert_eq!(s.chunks_from(&a, 0, 10).expect("spool op").len(), 1);
    }
    both!(append_rejects_out_of_order_and_malformed, append_rejects);

    fn advance_forward_only(s: &dyn Spool) {
        let a = sp("a", 0);
        let b = sp("b", 3);
        s.advance(&a, 5).expect("spool op");
        assert_eq!(s.position(&a).expect("spool op"), Some(5));
        s.advance(&a, 3).expect("spool op");
        assert_eq!(s.position(&a).expect("spool op"), Some(5));
        s.advance(&a, 9).expect("spool op");
        assert_eq!(s.position(&a).expect("spool op"), Some(9));
        // an append must now start at 9 or later
        assert!(matches!(
            s.append(&chunk(&a, 8, 9, 10, 0)),
            Err(SpoolError::OutOfOrder { position: 9, .. })
        ));
        s.append(&chunk(&a, 9, 9, 10, 0)).expect("spool op");
        s.advance(&b, -7).expect("spool op");
        assert_eq!(s.position(&b).expect("spool op"), Some(-7));
        assert_eq!(s.stats().chunks, 1);
        assert_eq!(s.pending_partitions().expect("spool op"), vec![a]);
    }
    both!(advance, advance_forward_only);

    fn positions_sorted(s: &dyn Spool) {
        let parts = [
            sp("b", 0),
            sp("a", 10),
            sp("a", -1),
            sp("ab", 0),
            sp("a", 2),
        ];
        for (i, p) in parts.iter().enumerate() {
            s.advance(p, i as i64 * 100 - 150).expect("spool op");
        }
        let mut want: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), i as i64 * 100 - 150))
            .collect();
        want.sort();
        assert_eq!(s.positions().expect("spool op"), want);
        assert_eq!(s.pending_partitions().expect("spool op"), vec![]);
    }
    both!(positions, positions_sorted);

    fn chunks_from_ranges(s: &dyn Spool) {
        let a = sp("a", 1);
        let b = sp("a", 2);
        let cs: Vec<_> = (0..5)
            .map(|i| chunk(&a, -20 + i * 10, -20 + i * 10 + 4, -20 + i * 10 + 10, 0))
            .collect();
        for c in &cs {
            s.append(c).expect("spool op");
            s.append(&chunk(&b, c.first_offset, c.last_offset, c.next_offset, 0))
                .expect("spool op");
        }
        assert_eq!(s.chunks_from(&a, i64::MIN, 100).expect("spool op"), cs);
        assert_eq!(
            s.chunks_from(&a, -20, 2).expect("spool op"),
            cs[..2].to_vec()
        );
        // a chunk straddling `from` is not included
        assert_eq!(
            s.chunks_from(&a, -19, 2).expect("spool op"),
            cs[1..3].to_vec()
        );
        assert_eq!(
            s.chunks_from(&a, 0, 100).expect("spool op"),
            cs[2..].to_vec()
        );
        assert_eq!(s.chunks_from(&a, 21, 100).expect("spool op"), vec![]);
        assert_eq!(s.chunks_from(&a, 0, 0).expect("spool op"), vec![]);
        assert_eq!(s.chunks_from(&sp("a", 3), 0, 10).expect("spool op"), vec![]);
        assert_eq!(
            s.chunks_from(&sp("", 1), i64::MIN, 10).expect("spool op"),
            vec![]
        );
    }
    both!(chunks_from, chunks_from_ranges);

    fn remove_acked_frees(s: &dyn Spool) {
        let a = sp("a", 0);
        let b = sp("b", 0);
        let c1 = chunk(&a, 0, 4, 5, 10);
        let c2 = chunk(&a, 5, 9, 10, 11);
        let c3 = chunk(&a, 10, 14, 15, 12);
        let cb = chunk(&b, 0, 4, 5, 9);
        for c in [&c1, &c2, &cb, &c3] {
            s.append(c).expect("spool op");
        }
        assert_eq!(s.remove_acked(&a, 0).expect("spool op"), Freed::default());
        // 9 is the last offset of c2: not yet acked
        let freed = s.remove_acked(&a, 9).expect("spool op");
        assert_eq!(
            freed,
            Freed {
                bytes: c1.accounted_bytes(),
                chunks: 1,
                records: 5
            }
        );
        let freed = s.remove_acked(&a, 10).expect("spool op");
        assert_eq!(freed.chunks, 1);
        assert_eq!(
            s.chunks_from(&a, 0, 10).expect("spool op"),
            vec![c3.clone()]
        );
        assert_eq!(s.position(&a).expect("spool op"), Some(15));
        assert_eq!(
            s.stats(),
            SpoolStats {
                bytes: c3.accounted_bytes() + cb.accounted_bytes(),
                chunks: 2,
                records: 10
            }
        );
        assert_eq!(
            s.pending_partitions().expect("spool op"),
            vec![a.clone(), b.clone()]
        );
        assert_eq!(s.remove_acked(&a, 1000).expect("spool op").chunks, 1);
        assert_eq!(s.pending_partitions().expect("spool op"), vec![b.clone()]);
        assert_eq!(
            s.remove_acked(&sp("zz", 0), 1000).expect("spool op"),
            Freed::default()
        );
        s.flush().expect("spool op");
    }
    both!(remove_acked, remove_acked_frees);

    fn pop_oldest_in_append_order(s: &dyn Spool) {
        assert_eq!(s.pop_oldest(&|_, _| false).expect("spool op"), None);
        assert_eq!(s.oldest_spooled_at_ms().expect("spool op"), None);
        let a = sp("a", 0);
        let b = sp("b", 0);
        // append order is b, a, b, a; the clock goes backward once
        let cs = [
            chunk(&b, 100, 100, 101, 50),
            chunk(&a, 0, 1, 2, 40),
            chunk(&b, 101, 105, 106, 60),
            chunk(&a, 2, 3, 4, 70),
        ];
        for c in &cs {
            s.append(c).expect("spool op");
        }
        assert_eq!(s.oldest_spooled_at_ms().expect("spool op"), Some(40));
        assert_eq!(
            s.pop_oldest(&|_, _| false).expect("spool op").as_ref(),
            Some(&cs[0])
        );
        assert_eq!(
            s.pop_oldest(&|_, _| false).expect("spool op").as_ref(),
            Some(&cs[1])
        );
        assert_eq!(s.oldest_spooled_at_ms().expect("spool op"), Some(60));
        assert_eq!(s.stats().chunks, 2);
        assert_eq!(
            s.pop_oldest(&|_, _| false).expect("spool op").as_ref(),
            Some(&cs[2])
        );
        assert_eq!(
            s.pop_oldest(&|_, _| false).expect("spool op").as_ref(),
            Some(&cs[3])
        );
        assert_eq!(s.pop_oldest(&|_, _| false).expect("spool op"), None);
        assert_eq!(s.stats(), SpoolStats::default());
        // positions are untouched
        assert_eq!(s.position(&b).expect("spool op"), Some(106));
    }
    both!(pop_oldest, pop_oldest_in_append_order);

    fn pop_oldest_spares_what_may_be_delivered(s: &dyn Spool) {
        let a = sp("a", 0);
        let b = sp("b", 0);
        let cs = [
            chunk(&a, 0, 9, 10, 1),
            chunk(&b, 0, 9, 10, 2),
            chunk(&a, 10, 19, 20, 3),
        ];
        for c in &cs {
            s.append(c).expect("spool op");
        }
        // a's first chunk was sent and is not acknowledged yet
        let in_flight = |p: &SourcePartition, first: i64| p == &a && first < 10;
        assert_eq!(
            s.pop_oldest(&in_flight).expect("spool op").as_ref(),
            Some(&cs[1])
        );
        assert_eq!(
            s.pop_oldest(&in_flight).expect("spool op").as_ref(),
            Some(&cs[2])
        );
        assert_eq!(s.pop_oldest(&in_flight).expect("spool op"), None);
        assert_eq!(s.stats().chunks, 1, "the in-flight chunk stays");
        assert_eq!(
            s.pop_oldest(&|_, _| false).expect("spool op").as_ref(),
            Some(&cs[0])
        );
    }
    both!(pop_oldest_spares, pop_oldest_spares_what_may_be_delivered);

    fn stats_count(s: &dyn Spool) {
        assert_eq!(s.stats(), SpoolStats::default());
        let a = sp("a", 0);
        let mut c = chunk(&a, 0, 9, 10, 0);
        c.payload = Bytes::from(vec![7u8; 1000]);
        c.record_count = 10;
        s.append(&c).expect("spool op");
        let mut e = chunk(&a, 10, 10, 11, 0);
        e.payload = Bytes::new();
        e.record_count = 1;
        s.append(&e).expect("spool op");
        assert_eq!(
            s.stats(),
            SpoolStats {
                bytes: 1000 + 2 * CHUNK_OVERHEAD_BYTES,
                chunks: 2,
                records: 11
            }
        );
        assert_eq!(s.chunks_from(&a, 10, 1).expect("spool op"), vec![e]);
    }
    both!(stats, stats_count);

    fn dictionaries_live_as_long_as_their_chunks(s: &dyn Spool) {
        let a = sp("a", 0);
        let first = s.add_dictionary("a", b"dict-one").expect("spool op");
        let second = s.add_dictionary("a", b"dict-two").expect("spool op");
        assert_ne!(first, second);
        assert_eq!(
            s.dictionary(first).expect("spool op"),
            Some(StoredDictionary {
                id: first,
                topic: "a".into(),
                bytes: Bytes::from_static(b"dict-one")
            })
        );
        let mut c = chunk(&a, 0, 4, 5, 1);
        c.dictionary = Some(first);
        s.append(&c).expect("spool op");
        let mut orphan = chunk(&a, 5, 5, 6, 1);
        orphan.dictionary = Some(second + 100);
        assert!(matches!(
            s.append(&orphan),
            Err(SpoolError::UnknownDictionary { .. })
        ));
        assert_eq!(s.chunks_from(&a, 0, 10).expect("spool op"), vec![c.clone()]);
        // Only the dictionary no chunk names, and not kept, goes.
        assert_eq!(
            s.remove_unused_dictionaries(&|id| id == second)
                .expect("spool op"),
            Vec::<u32>::new()
        );
        assert_eq!(
            s.remove_unused_dictionaries(&|_| false).expect("spool op"),
            vec![second]
        );
        assert_eq!(s.dictionaries().expect("spool op").len(), 1);
        s.remove_acked(&a, 5).expect("spool op");
        assert_eq!(
            s.remove_unused_dictionaries(&|_| false).expect("spool op"),
            vec![first]
        );
        assert_eq!(s.dictionary(first).expect("spool op"), None);
        // Ids are not reused.
        assert!(s.add_dictionary("b", b"dict-three").expect("spool op") > second);
        // A popped chunk frees its dictionary too.
        let third = s.dictionaries().expect("spool op")[0].id;
        let mut c = chunk(&a, 10, 10, 11, 1);
        c.dictionary = Some(third);
        s.append(&c).expect("spool op");
        assert_eq!(
            s.remove_unused_dictionaries(&|_| false).expect("spool op"),
            Vec::<u32>::new()
        );
        assert_eq!(s.pop_oldest(&|_, _| false).expect("spool op"), Some(c));
        assert_eq!(
            s.remove_unused_dictionaries(&|_| false).expect("spool op"),
            vec![third]
        );
    }
    both!(dictionaries, dictionaries_live_as_long_as_their_chunks);

    // ---- model-based property test: SledSpool against MemorySpool ----

    const PARTS: [(&str, i32); 3] = [("a", 0), ("a", 1), ("b", -1)];

    #[derive(Debug, Clone)]
    enum Op {
        /// first = position (or 0) + delta; negative delta is out of order
        Append {
            part: usize,
            delta: i64,
            span: i64,
            gap: i64,
            bad: bool,
            at: u64,
            payload: Vec<u8>,
        },
        Advance {
            part: usize,
            delta: i64,
        },
        /// next = position (or 0) + delta
        RemoveAcked {
            part: usize,
            delta: i64,
        },
        PopOldest,
        /// from = position (or 0) + delta
        ChunksFrom {
            part: usize,
            delta: i64,
            limit: usize,
        },
        Position {
            part: usize,
        },
        Positions,
        Pending,
        Oldest,
        Flush,
        Reopen,
    }

    /// Mostly a few bytes; sometimes around the size above which the sled spool stores a
    /// payload in 4 KiB pieces (inline, two pieces, three), with bytes that tell pieces apart.
    fn payload() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => prop::collection::vec(any::<u8>(), 0..12),
            1 => (4094usize..8195, any::<u8>()).prop_map(|(len, seed)| {
                (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
            }),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        let part = 0..PARTS.len();
        prop_oneof![
            6 => (part.clone(), -3i64..4, 0i64..4, 1i64..3, prop::bool::weighted(0.05), 0u64..100,
                  payload())
                .prop_map(|(part, delta, span, gap, bad, at, payload)| Op::Append {
                    part, delta, span, gap, bad, at, payload
                }),
            2 => (part.clone(), -3i64..6).prop_map(|(part, delta)| Op::Advance { part, delta }),
            3 => (part.clone(), -25i64..3).prop_map(|(part, delta)| Op::RemoveAcked { part, delta }),
            2 => Just(Op::PopOldest),
            2 => (part.clone(), -30i64..2, 0usize..5)
                .prop_map(|(part, delta, limit)| Op::ChunksFrom { part, delta, limit }),
            1 => part.prop_map(|part| Op::Position { part }),
            1 => Just(Op::Positions),
            1 => Just(Op::Pending),
            1 => Just(Op::Oldest),
            1 => Just(Op::Flush),
            2 => Just(Op::Reopen),
        ]
    }

    /// Observable result of an op, errors compared by their message.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Unit,
        Position(Option<i64>),
        Positions(Vec<(SourcePartition, i64)>),
        Chunks(Vec<Chunk>),
        Chunk(Option<Chunk>),
        Parts(Vec<SourcePartition>),
        Freed(Freed),
        Oldest(Option<u64>),
    }

    fn apply(s: &dyn Spool, op: &Op, model_pos: &dyn Fn(usize) -> i64) -> Result<Seen, String> {
        let p = |i: usize| sp(PARTS[i].0, PARTS[i].1);
        let r = match op {
            Op::Append {
                part,
                delta,
                span,
                gap,
                bad,
                at,
                payload,
            } => {
                let first = model_pos(*part) + delta;
                let last = first + span;
                let next = if *bad { last } else { last + gap };
                let mut c = chunk(&p(*part), first, last, next, *at);
                c.payload = Bytes::from(payload.clone());
                s.append(&c).map(|()| Seen::Unit)
            }
            Op::Advance { part, delta } => s
                .advance(&p(*part), model_pos(*part) + delta)
                .map(|()| Seen::Unit),
            Op::RemoveAcked { part, delta } => s
                .remove_acked(&p(*part), model_pos(*part) + delta)
                .map(Seen::Freed),
            Op::PopOldest => s.pop_oldest(&|_, _| false).map(Seen::Chunk),
            Op::ChunksFrom { part, delta, limit } => s
                .chunks_from(&p(*part), model_pos(*part) + delta, *limit)
                .map(Seen::Chunks),
            Op::Position { part } => s.position(&p(*part)).map(Seen::Position),
            Op::Positions => s.positions().map(Seen::Positions),
            Op::Pending => s.pending_partitions().map(Seen::Parts),
            Op::Oldest => s.oldest_spooled_at_ms().map(Seen::Oldest),
            Op::Flush | Op::Reopen => s.flush().map(|()| Seen::Unit),
        };
        r.map_err(|e| e.to_string())
    }

    fn check_against_model(dir: &Path, ops: &[Op]) {
        let model = MemorySpool::new();
        let mut real = Some(SledSpool::open(dir).expect("spool op"));
        for (i, op) in ops.iter().enumerate() {
            if let Op::Reopen = op {
                drop(real.take());
                real = Some(SledSpool::open(dir).expect("spool op"));
            }
            let Some(r) = real.as_ref() else {
                unreachable!()
            };
            // offsets are relative to the positions before the op
            let before: Vec<i64> = PARTS
                .iter()
                .map(|&(t, p)| model.position(&sp(t, p)).expect("spool op").unwrap_or(0))
                .collect();
            let pos = |part: usize| before[part];
            let want = apply(&model, op, &pos);
            let got = apply(r, op, &pos);
            assert_eq!(got, want, "op #{i} {op:?}");
            assert_eq!(r.stats(), model.stats(), "stats after op #{i} {op:?}");
        }
        let r = real.as_ref().expect("spool op");
        assert_eq!(
            r.positions().expect("spool op"),
            model.positions().expect("spool op")
        );
        for (p, _) in model.positions().expect("spool op") {
            assert_eq!(
                r.chunks_from(&p, i64::MIN, usize::MAX).expect("spool op"),
                model
                    .chunks_from(&p, i64::MIN, usize::MAX)
                    .expect("spool op")
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn sled_matches_model(ops in prop::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().expect("tempdir");
            check_against_model(dir.path(), &ops);
        }
    }
}
