//! [`SledSpool`]: the spool on sled 0.34, with its in-memory index of the chunks and the
//! syncs that make its writes durable. The on-disk format is [`super::format`]'s; it and when
//! writes are durable are described in the module doc of [`super`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use ::sled::{Batch, Db, IVec};
use std::ffi::OsString;
use std::fs::File;

use super::durable::DurableMarks;
use super::format::{
    chunk_key, corrupt_chunk, decode_chunk_key, decode_chunk_with, decode_dictionary,
    decode_dictionary_key, decode_header, decode_incarnation, decode_partition, decode_piece_key,
    decode_position, decode_position_key, decode_topic_config, dictionary_key, encode_chunk,
    encode_dictionary, encode_incarnation, encode_position, encode_topic_config, incarnation_key,
    piece_count, piece_key, position_key, topic_config_key, Header, CHUNK_TAG, DICTIONARY_TAG,
    INCARNATION_TAG, PIECE_TAG, POSITION_TAG, TOPIC_CONFIG_TAG,
};
use bytes::Bytes;

use super::{
    out_of_order, unknown_dictionary, Chunk, Freed, Incarnation, SourcePartition, Spool,
    SpoolError, SpoolStats, StoredDictionary, TopicId,
};

/// sled's page cache; the spool is written once and read about once, so it need not be big,
/// and it counts against the agent's memory (edge boxes are small; the target is 64 MiB).
const CACHE_CAPACITY: u64 = 16 * 1024 * 1024;

/// The most `read_pieces` allocates ahead: the largest chunk (`ship.batch_max_bytes` is at most
/// 16 MiB) compressed, with room to spare.
const MAX_PAYLOAD_PREALLOCATION: usize = 17 * 1024 * 1024;

/// The spool on sled (one database, its default tree). See the module doc of [`super`].
///
/// Keeps an index of the chunks' metadata (not payloads) and the positions in memory, rebuilt
/// by a scan on open, so that only `chunks_from` and `pop_oldest` read from sled. Writes are
/// serialised by one mutex (there is one tailer); reads of chunks take no lock.
pub struct SledSpool {
    db: Db,
    path: PathBuf,
    state: Mutex<State>,
    marks: DurableMarks,
    /// sled's log, synced by [`Spool::flush`] after `Db::flush`.
    log_file: File,
    /// Blob files already synced, with the length they had then (see `sync_new_blobs`).
    synced_blobs: Mutex<BTreeMap<OsString, u64>>,
}

#[derive(Debug, Default)]
struct State {
    positions: BTreeMap<SourcePartition, i64>,
    incarnations: BTreeMap<SourcePartition, Incarnation>,
    chunks: BTreeMap<(SourcePartition, i64), Meta>,
    /// append sequence → chunk, for `pop_oldest`
    by_seq: BTreeMap<u64, (SourcePartition, i64)>,
    /// (spooled_at_ms, seq), for `oldest_spooled_at_ms`
    by_age: BTreeSet<(u64, u64)>,
    stats: SpoolStats,
    next_seq: u64,
    /// dictionary id → chunks naming it (0 for a stored dictionary no chunk names)
    dictionaries: BTreeMap<u32, u64>,
    next_dictionary: u32,
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    seq: u64,
    last_offset: i64,
    record_count: u32,
    spooled_at_ms: u64,
    bytes: u64,
    dictionary: Option<u32>,
    /// pieces the payload is stored in; 0 when it follows the header
    pieces: u32,
}

impl Meta {
    /// The index entry of a stored chunk, from its header and its payload's length.
    fn stored(header: &Header<'_>, payload_len: u64) -> Meta {
        Meta {
            seq: header.seq,
            last_offset: header.last_offset,
            record_count: header.record_count,
            spooled_at_ms: header.spooled_at_ms,
            bytes: payload_len + super::CHUNK_OVERHEAD_BYTES,
            dictionary: header.dictionary,
            pieces: header.pieces(),
        }
    }
}

impl State {
    fn insert(&mut self, partition: SourcePartition, first_offset: i64, meta: Meta) {
        self.stats.bytes += meta.bytes;
        self.stats.chunks += 1;
        self.stats.records += u64::from(meta.record_count);
        self.by_seq
            .insert(meta.seq, (partition.clone(), first_offset));
        self.by_age.insert((meta.spooled_at_ms, meta.seq));
        self.next_seq = self.next_seq.max(meta.seq + 1);
        if let Some(id) = meta.dictionary {
            *self.dictionaries.entry(id).or_default() += 1;
        }
        self.chunks.insert((partition, first_offset), meta);
    }

    fn remove(&mut self, key: &(SourcePartition, i64)) -> Option<Meta> {
        let meta = self.chunks.remove(key)?;
        self.stats.bytes -= meta.bytes;
        self.stats.chunks -= 1;
        self.stats.records -= u64::from(meta.record_count);
        self.by_seq.remove(&meta.seq);
        self.by_age.remove(&(meta.spooled_at_ms, meta.seq));
        if let Some(refs) = meta
            .dictionary
            .and_then(|id| self.dictionaries.get_mut(&id))
        {
            *refs = refs.saturating_sub(1);
        }
        Some(meta)
    }
}

impl State {
    /// The index and counters of the spool in `db` (at `path`), rebuilt by a scan of every
    /// entry but the pieces; a corrupt entry, or a chunk naming a dictionary that is not
    /// stored, fails it.
    fn scanned(db: &Db, path: &Path) -> Result<State, SpoolError> {
        let mut state = State::default();
        // Every key but the pieces ('q'), which are verified when read.
        let pieces = [PIECE_TAG];
        for entry in db
            .range(..&pieces[..])
            .chain(db.range(&[PIECE_TAG + 1][..]..))
        {
            let (key, value) = entry?;
            state.load(&key, &value, path)?;
        }
        // Chunks sort before dictionaries ('c' < 'd'), so check their references once all
        // are read: a chunk must never outlive the dictionary it needs.
        let stored: BTreeSet<u32> = db
            .scan_prefix([DICTIONARY_TAG])
            .keys()
            .map(|key| {
                key.map_err(SpoolError::from)
                    .and_then(|k| decode_dictionary_key(&k))
            })
            .collect::<Result<_, _>>()?;
        if let Some(missing) = state.dictionaries.keys().find(|id| !stored.contains(id)) {
            return Err(SpoolError::Corrupt(format!(
                "chunks name dictionary {missing}, which is not in spool {}",
                path.display()
            )));
        }
        Ok(state)
    }

    /// Adds the entry stored under `key` to the index, by the kind its tag names.
    fn load(&mut self, key: &[u8], value: &[u8], path: &Path) -> Result<(), SpoolError> {
        match key.first() {
            Some(&CHUNK_TAG) => {
                let (partition, first_offset) = decode_chunk_key(key)?;
                let header = decode_header(&partition, first_offset, value)?;
                let payload_len = header.verified_payload_len(key, &partition, first_offset)?;
                self.insert(partition, first_offset, Meta::stored(&header, payload_len));
            }
            Some(&POSITION_TAG) => {
                let partition = decode_position_key(key)?;
                let offset = decode_position(&partition, value)?;
                self.positions.insert(partition, offset);
            }
            Some(&INCARNATION_TAG) => {
                let partition = decode_partition(key)?;
                let incarnation = decode_incarnation(&partition, value)?;
                self.incarnations.insert(partition, incarnation);
            }
            Some(&TOPIC_CONFIG_TAG) => {
                // Read when the shipper asks; checked now so a bad one stops the open.
                decode_topic_config(key, value)?;
            }
            Some(&DICTIONARY_TAG) => {
                let dictionary = decode_dictionary(key, value)?;
                self.dictionaries.entry(dictionary.id).or_default();
                self.next_dictionary = self.next_dictionary.max(dictionary.id + 1);
            }
            _ => {
                return Err(SpoolError::Corrupt(format!(
                    "unknown key {key:?} in spool {}",
                    path.display()
                )))
            }
        }
        Ok(())
    }
}

impl fmt::Debug for SledSpool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledSpool")
            .field("path", &self.path)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// How long `open` waits for the spool's file lock: a previous agent (or, in tests, a dropped
/// `SledSpool` whose background flusher is still finishing) releases it shortly after exit.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn open_db(path: &Path) -> Result<::sled::Db, SpoolError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match ::sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_CAPACITY)
            .open()
        {
            Ok(db) => return Ok(db),
            // sled reports a held lock only as an I/O error with this text.
            Err(::sled::Error::Io(error))
                if error.to_string().contains("could not acquire lock") =>
            {
                if std::time::Instant::now() >= deadline {
                    return Err(SpoolError::Locked(path.display().to_string()));
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(error) => return Err(error.into()),
        }
    }
}

impl SledSpool {
    /// Opens (or creates) the spool in directory `path` and rebuilds the in-memory index and
    /// counters by scanning it, verifying the checksum of every chunk whose payload follows
    /// its header: a corrupt entry fails the open with [`SpoolError::Corrupt`]. A chunk stored
    /// in pieces is verified when it is read, so that opening reads no payload: sled's cache
    /// applies its accesses 64 at a time per shard, and a scan touches each page once; in two
    /// of eight reopenings of a 1,000 MiB spool, a scan of every piece left 379 and 409 MiB
    /// resident (36–40 MiB in the others; agent/examples/spool_memory.rs).
    pub fn open(path: &Path) -> Result<SledSpool, SpoolError> {
        let db = open_db(path)?;
        let state = State::scanned(&db, path)?;
        tracing::debug!(
            path = %path.display(),
            partitions = state.positions.len(),
            chunks = state.stats.chunks,
            bytes = state.stats.bytes,
            "opened spool"
        );
        let log_file = sync_opened(path)?;
        let marks = DurableMarks::opened(state.positions.iter().map(|(p, &o)| (p.clone(), o)));
        let spool = SledSpool {
            db,
            path: path.to_owned(),
            state: Mutex::new(state),
            marks,
            log_file,
            synced_blobs: Mutex::new(BTreeMap::new()),
        };
        spool.sync_new_blobs()?;
        Ok(spool)
    }

    /// `Db::flush`, then what it leaves undone: on Linux it ends in `sync_file_range`, which
    /// neither flushes the disk's write cache nor commits the log's new size, and sled never
    /// syncs the blob files it writes pages over ~128 KiB to.
    fn sync(&self) -> Result<(), SpoolError> {
        self.db.flush()?;
        self.log_file
            .sync_data()
            .map_err(|source| sync_error(&self.path.join(LOG_FILE), source))?;
        self.sync_new_blobs()
    }

    /// Syncs every blob file not synced yet at its current length, then the blob directory
    /// if any was new. Chunks are stored in 4 KiB pieces, so sled rarely writes a blob; a
    /// blob file is written once and never changes afterwards, but one being written while
    /// this runs is synced again once its length moved.
    fn sync_new_blobs(&self) -> Result<(), SpoolError> {
        let dir = self.path.join(BLOBS_DIR);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(sync_error(&dir, source)),
        };
        let mut synced = self
            .synced_blobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut present = BTreeMap::new();
        let mut new = false;
        for entry in entries {
            let entry = entry.map_err(|source| sync_error(&dir, source))?;
            let blob = entry.path();
            let synced_now = match File::open(&blob) {
                // sled removed it meanwhile: nothing to make durable.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(sync_error(&blob, source)),
                Ok(file) => {
                    let len = file
                        .metadata()
                        .map_err(|source| sync_error(&blob, source))?
                        .len();
                    if synced.get(&entry.file_name()) != Some(&len) {
                        file.sync_all()
                            .map_err(|source| sync_error(&blob, source))?;
                        new = true;
                    }
                    len
                }
            };
            present.insert(entry.file_name(), synced_now);
        }
        if new {
            sync_path(&dir)?;
        }
        *synced = present;
        Ok(())
    }

    /// Decodes the chunk stored under `key` as `value`, reading its pieces if it has any, and
    /// verifies its checksum; returns the chunk and its append sequence.
    fn read_chunk(
        &self,
        key: &[u8],
        partition: SourcePartition,
        first_offset: i64,
        value: &IVec,
    ) -> Result<(Chunk, u64), SpoolError> {
        decode_chunk_with(key, partition, first_offset, value, |partition, len| {
            self.read_pieces(partition, first_offset, len)
        })
    }

    fn read_pieces(
        &self,
        partition: &SourcePartition,
        first_offset: i64,
        len: u32,
    ) -> Result<Bytes, SpoolError> {
        let count = piece_count(len as usize);
        // The length is not verified yet (the checksum needs the payload): allocate ahead at
        // most what the largest chunk can hold.
        let mut payload = Vec::with_capacity((len as usize).min(MAX_PAYLOAD_PREALLOCATION));
        let mut pieces = 0;
        let range =
            piece_key(partition, first_offset, 0)..piece_key(partition, first_offset, count);
        for (index, entry) in (0u32..).zip(self.db.range(range)) {
            let (key, piece) = entry?;
            if decode_piece_key(&key)?.2 != index {
                return Err(corrupt_chunk(
                    partition,
                    first_offset,
                    &format!("piece {index} of {count} is missing"),
                ));
            }
            payload.extend_from_slice(&piece);
            pieces = index + 1;
        }
        if pieces != count || payload.len() != len as usize {
            return Err(corrupt_chunk(
                partition,
                first_offset,
                &format!(
                    "{} of its {len} bytes in {pieces} of {count} pieces are stored",
                    payload.len()
                ),
            ));
        }
        Ok(Bytes::from(payload))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // the state is only changed after the sled write succeeded, by code that does not panic
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Spool for SledSpool {
    fn append(&self, chunk: &Chunk) -> Result<(), SpoolError> {
        chunk.check_well_formed()?;
        let mut state = self.lock();
        if let Some(&position) = state.positions.get(&chunk.partition) {
            if chunk.first_offset < position {
                return Err(out_of_order(chunk, position));
            }
        }
        if let Some(id) = chunk.dictionary {
            if !state.dictionaries.contains_key(&id) {
                return Err(unknown_dictionary(chunk, id));
            }
        }
        let seq = state.next_seq;
        let key = chunk_key(&chunk.partition, chunk.first_offset);
        let encoded = encode_chunk(&key, chunk, seq)?;
        let mut batch = Batch::default();
        batch.insert(key, encoded.value);
        for (piece_key, piece) in encoded.pieces {
            batch.insert(piece_key, &piece[..]);
        }
        batch.insert(
            position_key(&chunk.partition),
            &encode_position(chunk.next_offset),
        );
        self.db.apply_batch(batch)?;
        state.insert(
            chunk.partition.clone(),
            chunk.first_offset,
            meta(chunk, seq),
        );
        state
            .positions
            .insert(chunk.partition.clone(), chunk.next_offset);
        self.marks.written(&chunk.partition, chunk.next_offset);
        Ok(())
    }

    fn advance(&self, partition: &SourcePartition, next_offset: i64) -> Result<(), SpoolError> {
        let mut state = self.lock();
        if state
            .positions
            .get(partition)
            .is_some_and(|&position| position >= next_offset)
        {
            return Ok(());
        }
        self.db
            .insert(position_key(partition), &encode_position(next_offset))?;
        state.positions.insert(partition.clone(), next_offset);
        self.marks.written(partition, next_offset);
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
        let mut state = self.lock();
        if let Some(&position) = state.positions.get(partition) {
            if incarnation.base < position {
                return Err(super::incarnation_behind(partition, incarnation, position));
            }
        }
        // Both in one write: after a crash the new incarnation and its start are there, or
        // neither (and the reset is found again).
        let mut batch = sled::Batch::default();
        batch.insert(incarnation_key(partition), encode_incarnation(&incarnation));
        batch.insert(position_key(partition), &encode_position(incarnation.base));
        self.db.apply_batch(batch)?;
        state.positions.insert(partition.clone(), incarnation.base);
        state.incarnations.insert(partition.clone(), incarnation);
        self.marks.written(partition, incarnation.base);
        Ok(())
    }

    fn name_incarnation(
        &self,
        partition: &SourcePartition,
        topic_id: TopicId,
    ) -> Result<(), SpoolError> {
        let mut state = self.lock();
        let mut incarnation = state
            .incarnations
            .get(partition)
            .copied()
            .unwrap_or_default();
        incarnation.topic_id = Some(topic_id);
        self.db
            .insert(incarnation_key(partition), encode_incarnation(&incarnation))?;
        state.incarnations.insert(partition.clone(), incarnation);
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
        let mut chunks = Vec::new();
        if limit == 0 {
            return Ok(chunks);
        }
        let start = chunk_key(partition, from);
        let end = chunk_key(partition, i64::MAX);
        for entry in self.db.range(start..=end) {
            let (key, value) = entry?;
            let (_, first_offset) = decode_chunk_key(&key)?;
            let (chunk, _) = self.read_chunk(&key, partition.clone(), first_offset, &value)?;
            chunks.push(chunk);
            if chunks.len() == limit {
                break;
            }
        }
        Ok(chunks)
    }

    fn pending_partitions(&self) -> Result<Vec<SourcePartition>, SpoolError> {
        let state = self.lock();
        // Jump from partition to partition instead of walking every chunk: the shipper asks
        // often, and a long outage leaves many chunks per partition.
        let mut parts: Vec<SourcePartition> = Vec::new();
        let mut next = state.chunks.keys().next().map(|(p, _)| p.clone());
        while let Some(partition) = next {
            let after = (
                std::ops::Bound::Excluded((partition.clone(), i64::MAX)),
                std::ops::Bound::Unbounded,
            );
            next = state
                .chunks
                .range(after)
                .next()
                .map(|((p, _), _)| p.clone());
            parts.push(partition);
        }
        Ok(parts)
    }

    fn remove_acked(
        &self,
        partition: &SourcePartition,
        next_offset: i64,
    ) -> Result<Freed, SpoolError> {
        let mut state = self.lock();
        // a chunk with first_offset >= next_offset has last_offset >= next_offset too
        let acked: Vec<(SourcePartition, i64)> = state
            .chunks
            .range((partition.clone(), i64::MIN)..(partition.clone(), next_offset))
            .filter(|(_, meta)| meta.last_offset < next_offset)
            .map(|(k, _)| k.clone())
            .collect();
        let mut freed = Freed::default();
        if acked.is_empty() {
            return Ok(freed);
        }
        let mut batch = Batch::default();
        for (p, first) in &acked {
            let pieces = state
                .chunks
                .get(&(p.clone(), *first))
                .map_or(0, |m| m.pieces);
            remove_chunk(&mut batch, p, *first, pieces);
        }
        self.db.apply_batch(batch)?;
        for key in &acked {
            if let Some(meta) = state.remove(key) {
                freed.add(meta.bytes, meta.record_count);
            }
        }
        Ok(freed)
    }

    /// Also deletes a corrupt oldest entry (and then returns [`SpoolError::Corrupt`]), so that
    /// "drop-oldest" cannot get stuck on it.
    fn pop_oldest(
        &self,
        keep: &dyn Fn(&SourcePartition, i64) -> bool,
    ) -> Result<Option<Chunk>, SpoolError> {
        let mut state = self.lock();
        let Some((partition, first_offset)) = state
            .by_seq
            .values()
            .find(|(partition, first_offset)| !keep(partition, *first_offset))
        else {
            return Ok(None);
        };
        let (partition, first_offset) = (partition.clone(), *first_offset);
        let key = chunk_key(&partition, first_offset);
        let value = self.db.get(&key)?;
        let read = value
            .as_ref()
            .map(|value| self.read_chunk(&key, partition.clone(), first_offset, value));
        let pieces = state
            .chunks
            .get(&(partition.clone(), first_offset))
            .map_or(0, |m| m.pieces);
        let mut batch = Batch::default();
        remove_chunk(&mut batch, &partition, first_offset, pieces);
        self.db.apply_batch(batch)?;
        let meta = state.remove(&(partition.clone(), first_offset));
        let (chunk, seq) = read.ok_or_else(|| {
            SpoolError::Corrupt(format!(
                "chunk {partition}:{first_offset} is indexed but not stored"
            ))
        })??;
        if meta.map(|m| m.seq) != Some(seq) {
            return Err(SpoolError::Corrupt(format!(
                "chunk {}:{first_offset} has sequence {seq}, not the indexed one",
                chunk.partition
            )));
        }
        Ok(Some(chunk))
    }

    fn oldest_spooled_at_ms(&self) -> Result<Option<u64>, SpoolError> {
        Ok(self.lock().by_age.first().map(|&(at, _)| at))
    }

    fn stats(&self) -> SpoolStats {
        self.lock().stats
    }

    fn add_dictionary(&self, topic: &str, bytes: &[u8]) -> Result<u32, SpoolError> {
        let mut state = self.lock();
        let id = state.next_dictionary;
        let next = id.checked_add(1).ok_or(SpoolError::DictionaryIds)?;
        let key = dictionary_key(id);
        let value = encode_dictionary(&key, topic, bytes)?;
        self.db.insert(key, value)?;
        state.dictionaries.insert(id, 0);
        state.next_dictionary = next;
        Ok(id)
    }

    fn dictionary(&self, id: u32) -> Result<Option<StoredDictionary>, SpoolError> {
        let key = dictionary_key(id);
        match self.db.get(key)? {
            Some(value) => decode_dictionary(&key, &value).map(Some),
            None => Ok(None),
        }
    }

    fn set_topic_config(
        &self,
        topic: &str,
        entries: &[(String, String)],
    ) -> Result<(), SpoolError> {
        let key = topic_config_key(topic);
        let value = encode_topic_config(&key, entries)?;
        self.db.insert(key, value)?;
        Ok(())
    }

    fn topic_config(&self, topic: &str) -> Result<Option<Vec<(String, String)>>, SpoolError> {
        let key = topic_config_key(topic);
        match self.db.get(&key)? {
            Some(value) => decode_topic_config(&key, &value).map(Some),
            None => Ok(None),
        }
    }

    fn dictionaries(&self) -> Result<Vec<StoredDictionary>, SpoolError> {
        self.db
            .scan_prefix([DICTIONARY_TAG])
            .map(|entry| {
                let (key, value) = entry?;
                decode_dictionary(&key, &value)
            })
            .collect()
    }

    fn remove_unused_dictionaries(
        &self,
        keep: &dyn Fn(u32) -> bool,
    ) -> Result<Vec<u32>, SpoolError> {
        let mut state = self.lock();
        let unused: Vec<u32> = state
            .dictionaries
            .iter()
            .filter(|&(&id, &refs)| refs == 0 && !keep(id))
            .map(|(&id, _)| id)
            .collect();
        if unused.is_empty() {
            return Ok(unused);
        }
        let mut batch = Batch::default();
        for &id in &unused {
            batch.remove(&dictionary_key(id));
        }
        self.db.apply_batch(batch)?;
        for id in &unused {
            state.dictionaries.remove(id);
        }
        Ok(unused)
    }

    fn flush(&self) -> Result<(), SpoolError> {
        let covered = self.marks.flushing();
        match self.sync() {
            Ok(()) => {
                self.marks.flushed(covered);
                Ok(())
            }
            Err(error) => {
                self.marks.retry(covered);
                Err(error)
            }
        }
    }

    fn durable_position(&self, partition: &SourcePartition) -> Option<i64> {
        self.marks.position(partition)
    }
}

/// sled 0.34's files in the spool directory: its log, its config and its blob directory.
const LOG_FILE: &str = "db";
const CONF_FILE: &str = "conf";
const BLOBS_DIR: &str = "blobs";

/// Makes what an opened spool at `path` holds durable, and returns its log file for later
/// syncs. A crash of the process alone leaves sled's writes in the page cache, unsynced, and a
/// power cut after this start would still lose them: sled syncs none of the files and
/// directories it creates.
fn sync_opened(path: &Path) -> Result<File, SpoolError> {
    let log_path = path.join(LOG_FILE);
    let log_file = File::open(&log_path).map_err(|source| sync_error(&log_path, source))?;
    log_file
        .sync_all()
        .map_err(|source| sync_error(&log_path, source))?;
    for file in [path.join(CONF_FILE), path.join(BLOBS_DIR)] {
        if file.exists() {
            sync_path(&file)?;
        }
    }
    sync_path(path)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_path(parent)?;
    }
    Ok(log_file)
}

/// `fsync` of a file or directory: for a directory, what makes the entries in it durable.
fn sync_path(path: &Path) -> Result<(), SpoolError> {
    File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(|source| sync_error(path, source))
}

fn sync_error(path: &Path, source: std::io::Error) -> SpoolError {
    SpoolError::Sync {
        path: path.display().to_string(),
        source,
    }
}

/// Adds the removal of a chunk and its pieces to `batch`.
fn remove_chunk(batch: &mut Batch, partition: &SourcePartition, first_offset: i64, pieces: u32) {
    batch.remove(chunk_key(partition, first_offset));
    for index in 0..pieces {
        batch.remove(piece_key(partition, first_offset, index));
    }
}

fn meta(chunk: &Chunk, seq: u64) -> Meta {
    Meta {
        seq,
        last_offset: chunk.last_offset,
        record_count: chunk.record_count,
        spooled_at_ms: chunk.spooled_at_ms,
        bytes: chunk.accounted_bytes(),
        dictionary: chunk.dictionary,
        pieces: piece_count(chunk.payload.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::{INCARNATION_FORMAT_VERSION, PIECE_BYTES};
    use super::super::tests::big_chunk;
    use super::super::tests::{chunk, sp};
    use super::*;
    use crate::spool::MemorySpool;

    fn stored_pieces(s: &SledSpool) -> usize {
        s.db.scan_prefix([PIECE_TAG]).count()
    }

    #[test]
    fn chunks_in_pieces_are_read_restored_and_removed_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (sp("a", 0), sp("b", 1));
        let cs = [
            big_chunk(&a, 0, 3 * PIECE_BYTES),
            chunk(&a, 10, 10, 11, 7),
            big_chunk(&a, 11, PIECE_BYTES + 1),
            big_chunk(&b, 0, 100_000),
        ];
        {
            let s = SledSpool::open(dir.path()).expect("spool op");
            for c in &cs {
                s.append(c).expect("spool op");
            }
            assert_eq!(stored_pieces(&s), 3 + 2 + 25);
            assert_eq!(
                s.chunks_from(&a, 0, 10).expect("spool op"),
                cs[..3].to_vec()
            );
            s.flush().expect("spool op");
        }
        let s = SledSpool::open(dir.path()).expect("spool op");
        assert_eq!(
            s.chunks_from(&a, 0, 10).expect("spool op"),
            cs[..3].to_vec()
        );
        assert_eq!(
            s.chunks_from(&b, 0, 10).expect("spool op"),
            vec![cs[3].clone()]
        );
        let bytes: u64 = cs.iter().map(Chunk::accounted_bytes).sum();
        assert_eq!(s.stats().bytes, bytes);
        // the first two chunks of a acknowledged: the first one's pieces go with it
        s.remove_acked(&a, 11).expect("spool op");
        assert_eq!(stored_pieces(&s), 2 + 25);
        assert_eq!(
            s.pop_oldest(&|p, _| p == &a).expect("spool op"),
            Some(cs[3].clone())
        );
        assert_eq!(stored_pieces(&s), 2);
        assert_eq!(
            s.pop_oldest(&|_, _| false).expect("spool op"),
            Some(cs[2].clone())
        );
        assert_eq!(stored_pieces(&s), 0);
        assert_eq!(s.db.len(), 2, "only the two positions are left");
    }

    #[test]
    fn a_damaged_or_missing_piece_fails_the_read_not_the_open() {
        let a = sp("a", 0);
        let c = big_chunk(&a, 0, 3 * PIECE_BYTES);
        let later = big_chunk(&a, 10, 2 * PIECE_BYTES);
        /// What to do to the stored pieces of `c`, and what reading it must then say.
        type Damage = (&'static str, fn(&Db));
        let damage: [Damage; 3] = [
            ("checksum mismatch", |db| {
                let key = piece_key(&sp("a", 0), 0, 1);
                let mut piece = db.get(&key).expect("read").expect("present").to_vec();
                piece[100] ^= 1;
                db.insert(&key, piece).expect("write");
            }),
            ("piece 1 of 3 is missing", |db| {
                db.remove(piece_key(&sp("a", 0), 0, 1)).expect("write");
            }),
            (
                "8192 of its 12288 bytes in 2 of 3 pieces are stored",
                |db| {
                    db.remove(piece_key(&sp("a", 0), 0, 2)).expect("write");
                },
            ),
        ];
        for (want, damage) in damage {
            let dir = tempfile::tempdir().expect("tempdir");
            {
                let s = SledSpool::open(dir.path()).expect("spool op");
                s.append(&c).expect("spool op");
                s.append(&later).expect("spool op");
                damage(&s.db);
                s.flush().expect("spool op");
            }
            let s = SledSpool::open(dir.path()).expect("opens: pieces are checked when read");
            let error = s.chunks_from(&a, 0, 10).expect_err("must fail");
            assert!(
                matches!(&error, SpoolError::Corrupt(m) if m.contains(want)),
                "{want}: {error}"
            );
            assert_eq!(
                s.chunks_from(&a, 10, 10).expect("later chunks still read"),
                vec![later.clone()]
            );
        }
    }

    /// The reason for the pieces: with each backlog chunk in one value, sled kept every chunk
    /// written resident (its cache counts a blob page as its pointer's size), 1 MiB of RSS per
    /// MiB spooled. 256 MiB of incompressible 220 KB chunks must leave well under that, also
    /// once reopened and read. (The reopen does not catch an open that reads every piece:
    /// one that did grew by 31 MiB here, under the bound.)
    #[test]
    fn a_backlog_does_not_stay_resident() {
        fn rss_mib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|kib| kib.parse::<u64>().ok())
                .map_or(0, |kib| kib / 1024)
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SledSpool::open(dir.path()).expect("spool op");
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let payload: Bytes = (0..220_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect::<Vec<u8>>()
            .into();
        let a = sp("a", 0);
        let before = rss_mib();
        let chunks = 256 * 1024 * 1024 / payload.len();
        for i in 0..chunks {
            let first = i as i64 * 100;
            let mut c = chunk(&a, first, first + 99, first + 100, 0);
            c.payload = payload.clone();
            s.append(&c).expect("spool op");
            if i % 20 == 19 {
                s.flush().expect("spool op");
            }
        }
        s.flush().expect("spool op");
        let grown = rss_mib().saturating_sub(before);
        assert_eq!(s.stats().chunks, chunks as u64);
        assert!(grown < 96, "RSS grew by {grown} MiB for a 256 MiB backlog");
        // and as an agent restarting with it
        drop(s);
        let s = SledSpool::open(dir.path()).expect("spool op");
        assert_eq!(s.stats().chunks, chunks as u64);
        assert_eq!(
            s.chunks_from(&a, 0, 1).expect("spool op")[0].payload,
            payload
        );
        let grown = rss_mib().saturating_sub(before);
        assert!(grown < 96, "RSS grew by {grown} MiB after reopening");
    }

    #[test]
    fn a_dictionary_and_its_chunks_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = sp("a", 0);
        let mut c = chunk(&a, 0, 4, 5, 1);
        let id = {
            let s = SledSpool::open(dir.path()).expect("spool op");
            let id = s
                .add_dictionary("a", b"zstd dictionary bytes")
                .expect("spool op");
            c.dictionary = Some(id);
            s.append(&c).expect("spool op");
            s.flush().expect("spool op");
            id
        };
        let s = SledSpool::open(dir.path()).expect("spool op");
        assert_eq!(s.chunks_from(&a, 0, 10).expect("spool op"), vec![c]);
        let stored = s.dictionary(id).expect("spool op").expect("kept");
        assert_eq!(stored.topic, "a");
        assert_eq!(&stored.bytes[..], b"zstd dictionary bytes");
        // Still named by a chunk after the restart: not removable.
        assert!(s
            .remove_unused_dictionaries(&|_| false)
            .expect("spool op")
            .is_empty());
        assert!(s.add_dictionary("a", b"next").expect("spool op") > id);
        s.remove_acked(&a, 5).expect("spool op");
        assert!(s
            .remove_unused_dictionaries(&|_| false)
            .expect("spool op")
            .contains(&id));
        // A chunk whose dictionary vanished behind the spool's back fails the open.
        let mut orphan = chunk(&a, 5, 5, 6, 1);
        let spare = s.add_dictionary("a", b"spare").expect("spool op");
        orphan.dictionary = Some(spare);
        s.append(&orphan).expect("spool op");
        s.db.remove(dictionary_key(spare)).expect("spool op");
        s.flush().expect("spool op");
        drop(s);
        assert!(matches!(
            SledSpool::open(dir.path()),
            Err(SpoolError::Corrupt(m)) if m.contains("dictionary")
        ));
    }

    #[test]
    fn an_incarnation_survives_a_reopen_and_never_starts_behind_the_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = sp("a", 0);
        let models: [Box<dyn Spool>; 2] = [
            Box::new(MemorySpool::new()),
            Box::new(SledSpool::open(dir.path()).expect("spool op")),
        ];
        let second = Incarnation {
            epoch: 1,
            base: 14,
            topic_id: None,
        };
        for s in &models {
            assert_eq!(s.incarnation(&a).expect("spool op"), Incarnation::default());
            s.append(&chunk(&a, 0, 9, 14, 1)).expect("spool op");
            assert!(matches!(
                s.begin_incarnation(&a, Incarnation { base: 13, ..second }),
                Err(SpoolError::Corrupt(_))
            ));
            s.begin_incarnation(&a, second).expect("spool op");
            assert_eq!(s.incarnation(&a).expect("spool op"), second);
            assert_eq!(s.position(&a).expect("spool op"), Some(14));
            // Source offset 0 of the new log is spool offset 14.
            assert_eq!(second.spooled(0), 14);
            assert_eq!(second.source(20), 6);
            s.append(&chunk(&a, 14, 20, 21, 2)).expect("spool op");
            s.flush().expect("spool op");
        }
        drop(models);
        let s = SledSpool::open(dir.path()).expect("spool op");
        assert_eq!(s.incarnation(&a).expect("spool op"), second);
        assert_eq!(s.position(&a).expect("spool op"), Some(21));
        assert_eq!(
            s.incarnation(&sp("b", 0)).expect("spool op"),
            Incarnation::default()
        );
    }

    #[test]
    fn a_topic_configuration_survives_a_reopen_and_a_damaged_one_stops_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let compact = vec![("cleanup.policy".to_owned(), "compact".to_owned())];
        {
            let s = SledSpool::open(dir.path()).expect("spool op");
            s.set_topic_config("inventory", &compact).expect("spool op");
            s.flush().expect("spool op");
        }
        let s = SledSpool::open(dir.path()).expect("spool op");
        assert_eq!(
            s.topic_config("inventory").expect("spool op"),
            Some(compact.clone())
        );
        let key = topic_config_key("inventory");
        let mut damaged = encode_topic_config(&key, &compact).expect("encodes");
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert!(matches!(
            decode_topic_config(&key, &damaged),
            Err(SpoolError::Corrupt(why)) if why.contains("checksum mismatch")
        ));
        for cut in 0..damaged.len() {
            assert!(decode_topic_config(&key, &damaged[..cut]).is_err());
        }
        s.db.insert(&key, damaged).expect("sled insert");
        s.flush().expect("spool op");
        drop(s);
        assert!(matches!(
            SledSpool::open(dir.path()),
            Err(SpoolError::Corrupt(why)) if why.contains("topic configuration of inventory")
        ));
    }

    #[test]
    fn a_topic_id_names_the_incarnation_without_moving_the_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, fresh) = (sp("a", 0), sp("b", 0));
        let id = TopicId::new([7; 16]).expect("not zero");
        let models: [Box<dyn Spool>; 2] = [
            Box::new(MemorySpool::new()),
            Box::new(SledSpool::open(dir.path()).expect("spool op")),
        ];
        for s in &models {
            s.append(&chunk(&a, 0, 9, 10, 1)).expect("spool op");
            s.name_incarnation(&a, id).expect("spool op");
            s.name_incarnation(&fresh, id).expect("spool op");
            let named = s.incarnation(&a).expect("spool op");
            assert_eq!((named.epoch, named.base, named.topic_id), (0, 0, Some(id)));
            assert_eq!(s.position(&a).expect("spool op"), Some(10));
            assert_eq!(s.position(&fresh).expect("spool op"), None);
            s.flush().expect("spool op");
        }
        drop(models);
        let s = SledSpool::open(dir.path()).expect("spool op");
        assert_eq!(s.incarnation(&a).expect("spool op").topic_id, Some(id));
        assert_eq!(s.position(&a).expect("spool op"), Some(10));
        // A spool written before topic ids (format 1) still reads.
        let old = [
            &[INCARNATION_FORMAT_VERSION][..],
            &3u32.to_be_bytes(),
            &40i64.to_be_bytes(),
        ]
        .concat();
        assert_eq!(
            decode_incarnation(&a, &old).expect("format 1"),
            Incarnation {
                epoch: 3,
                base: 40,
                topic_id: None
            }
        );
        assert!(decode_incarnation(&a, &old[..12]).is_err());
    }

    #[test]
    fn reopen_restores_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b, idle) = (sp("a", 0), sp("b", 1), sp("c", 5));
        let cs = [
            chunk(&a, 0, 4, 5, 30),
            chunk(&b, 10, 19, 20, 10),
            chunk(&a, 5, 9, 12, 20),
            chunk(&b, 20, 20, 21, 40),
            chunk(&a, 12, 13, 14, 50),
        ];
        {
            let s = SledSpool::open(dir.path()).expect("spool op");
            for c in &cs {
                s.append(c).expect("spool op");
            }
            s.advance(&idle, 77).expect("spool op");
            s.advance(&b, 30).expect("spool op");
            assert_eq!(
                s.pop_oldest(&|_, _| false).expect("spool op").as_ref(),
                Some(&cs[0])
            );
            s.flush().expect("spool op");
        }
        let s = SledSpool::open(dir.path()).expect("spool op");
        assert_eq!(
            s.positions().expect("spool op"),
            vec![(a.clone(), 14), (b.clone(), 30), (idle.clone(), 77)]
        );
        assert_eq!(
            s.chunks_from(&a, 0, 10).expect("spool op"),
            vec![cs[2].clone(), cs[4].clone()]
        );
        assert_eq!(
            s.chunks_from(&b, 0, 10).expect("spool op"),
            vec![cs[1].clone(), cs[3].clone()]
        );
        let bytes: u64 = cs[1..].iter().map(Chunk::accounted_bytes).sum();
        assert_eq!(
            s.stats(),
            SpoolStats {
                bytes,
                chunks: 4,
                records: 10 + 5 + 1 + 2
            }
        );
        assert_eq!(s.oldest_spooled_at_ms().expect("spool op"), Some(10));
        assert_eq!(
            s.pending_partitions().expect("spool op"),
            vec![a.clone(), b.clone()]
        );
        // new appends sort after the restored ones
        let late = chunk(&idle, 77, 77, 78, 1);
        s.append(&late).expect("spool op");
        assert_eq!(s.oldest_spooled_at_ms().expect("spool op"), Some(1));
        for want in cs[1..].iter().chain([&late]) {
            assert_eq!(
                s.pop_oldest(&|_, _| false).expect("spool op").as_ref(),
                Some(want)
            );
        }
        assert_eq!(s.pop_oldest(&|_, _| false).expect("spool op"), None);
        assert_eq!(s.stats(), SpoolStats::default());
    }

    #[test]
    fn corruption_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = sp("a", 0);
        let c0 = chunk(&a, 0, 0, 1, 0);
        let c1 = chunk(&a, 1, 1, 2, 0);
        {
            let s = SledSpool::open(dir.path()).expect("spool op");
            s.append(&c0).expect("spool op");
            s.append(&c1).expect("spool op");
            // flip one payload bit of the first chunk behind the spool's back
            let key = chunk_key(&a, 0);
            let mut v = s.db.get(&key).expect("read").expect("present").to_vec();
            *v.last_mut().expect("non-empty") ^= 1;
            s.db.insert(&key, v).expect("spool op");
            let err = s.chunks_from(&a, 0, 10).expect_err("must fail");
            assert!(
                matches!(&err, SpoolError::Corrupt(m) if m.contains("checksum")),
                "{err}"
            );
            // later chunks are still readable
            assert_eq!(
                s.chunks_from(&a, 1, 10).expect("spool op"),
                vec![c1.clone()]
            );
            s.flush().expect("spool op");
        }
        // a corrupt entry fails the open
        assert!(matches!(
            SledSpool::open(dir.path()),
            Err(SpoolError::Corrupt(_))
        ));
    }

    #[test]
    fn pop_oldest_drops_a_corrupt_chunk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = sp("a", 0);
        let s = SledSpool::open(dir.path()).expect("spool op");
        s.append(&chunk(&a, 0, 0, 1, 0)).expect("spool op");
        let c1 = chunk(&a, 1, 1, 2, 0);
        s.append(&c1).expect("spool op");
        // the value of chunk 0 moved under another key: the checksum covers the key
        let moved = s.db.get(chunk_key(&a, 1)).expect("read").expect("present");
        s.db.insert(chunk_key(&a, 0), moved).expect("spool op");
        assert!(matches!(
            s.pop_oldest(&|_, _| false),
            Err(SpoolError::Corrupt(_))
        ));
        assert_eq!(s.stats().chunks, 1);
        assert_eq!(s.pop_oldest(&|_, _| false).expect("spool op"), Some(c1));
        assert_eq!(s.pop_oldest(&|_, _| false).expect("spool op"), None);
    }

    #[test]
    fn is_usable_across_threads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = std::sync::Arc::new(SledSpool::open(dir.path()).expect("spool op"));
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
        assert!(format!("{s:?}").contains("chunks: 200"));
    }
}
