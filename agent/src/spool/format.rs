//! The spool's on-disk format: key layouts, value encodings and their checksums, as pure
//! functions of bytes; [`super::sled`] stores them. The layouts are described in the module doc
//! of [`super`].

use bytes::Bytes;

use super::{Chunk, Incarnation, SourcePartition, SpoolError, StoredDictionary, TopicId};

pub(super) const CHUNK_TAG: u8 = b'c';
pub(super) const POSITION_TAG: u8 = b'p';
pub(super) const DICTIONARY_TAG: u8 = b'd';
pub(super) const PIECE_TAG: u8 = b'q';
pub(super) const INCARNATION_TAG: u8 = b'i';
pub(super) const TOPIC_CONFIG_TAG: u8 = b't';
/// A topic configuration's value: this version byte, crc32 u32 (key ++ the rest), then
/// count u16 and that many (name, value) pairs of u16-length strings.
const TOPIC_CONFIG_FORMAT_VERSION: u8 = 1;
/// An incarnation's value: this version byte, epoch u32, base i64.
pub(super) const INCARNATION_FORMAT_VERSION: u8 = 1;
/// An incarnation's value with its topic id: this version byte, epoch u32, base i64, id.
const NAMED_INCARNATION_FORMAT_VERSION: u8 = 2;
/// A chunk whose payload follows its header in the same value.
const FORMAT_VERSION: u8 = 2;
/// A chunk whose payload is stored in pieces under keys of their own.
const PIECES_FORMAT_VERSION: u8 = 3;
/// version, last, next, record_count, codec, uncompressed_len, spooled_at_ms, seq,
/// has_dictionary, dictionary id, crc
const HEADER_LEN: usize = 1 + 8 + 8 + 4 + 1 + 4 + 8 + 8 + 1 + 4 + 4;
/// the CRC is stored at `CRC_AT..HEADER_LEN` and covers the key, `0..CRC_AT` and the payload
const CRC_AT: usize = HEADER_LEN - 4;
/// Format version 1: the same without the dictionary fields; still read.
const V1_HEADER_LEN: usize = HEADER_LEN - 5;
/// Format version 3: version 2's fields, the payload length (u32), then the CRC.
const PIECES_HEADER_LEN: usize = HEADER_LEN + 4;

/// Payloads longer than this are stored in pieces of this size. sled 0.34 writes any page
/// over a quarter of its 512 KiB segment as a separate blob and then counts only the blob's
/// pointer against the cache, so a leaf holding backlog chunks (100 KB–1 MB each) is never
/// evicted and the spool's whole backlog stays resident: 1.5 GiB of RSS for a 1.5 GiB spool
/// (agent/examples/spool_memory.rs). A leaf holds at most 17 entries, and 17 pieces of 4 KiB
/// stay under the blob threshold, so the cache bound holds (docs/benchmarks.md, "The spool's
/// memory"); pieces of 8 KiB do not.
pub(super) const PIECE_BYTES: usize = 4096;
/// A dictionary's value: this version byte, crc32 u32 (key ++ the rest), topic length u16,
/// topic, then the dictionary.
const DICTIONARY_FORMAT_VERSION: u8 = 1;

// ---- values with a version and a checksum (dictionaries, topic configurations) ----

/// `version u8, crc32 u32 (key ++ body), body`.
fn checked_value(key: &[u8], version: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + body.len());
    v.push(version);
    v.extend_from_slice(&checksum(key, &[], body).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// The body of a [`checked_value`] of `version`, once its checksum holds.
fn checked_body<'v>(
    key: &[u8],
    value: &'v [u8],
    version: u8,
    corrupt: &dyn Fn(&str) -> SpoolError,
) -> Result<&'v [u8], SpoolError> {
    let (&found, rest) = value.split_first().ok_or_else(|| corrupt("empty"))?;
    if found != version {
        return Err(corrupt(&format!("unknown format version {found}")));
    }
    let (crc, body) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| corrupt("shorter than its header"))?;
    if checksum(key, &[], body) != u32::from_be_bytes(*crc) {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(body)
}

// ---- dictionaries ----

pub(super) fn dictionary_key(id: u32) -> [u8; 5] {
    let [a, b, c, d] = id.to_be_bytes();
    [DICTIONARY_TAG, a, b, c, d]
}

pub(super) fn decode_dictionary_key(key: &[u8]) -> Result<u32, SpoolError> {
    match *key {
        [DICTIONARY_TAG, a, b, c, d] => Ok(u32::from_be_bytes([a, b, c, d])),
        _ => Err(SpoolError::Corrupt(format!(
            "malformed dictionary key {key:?}"
        ))),
    }
}

/// `version u8, crc32 u32 (key ++ the rest), topic_len u16, topic, dictionary`
pub(super) fn encode_dictionary(
    key: &[u8],
    topic: &str,
    bytes: &[u8],
) -> Result<Vec<u8>, SpoolError> {
    let topic_len = u16::try_from(topic.len())
        .map_err(|_| SpoolError::Corrupt(format!("topic name of {} bytes", topic.len())))?;
    let mut rest = Vec::with_capacity(2 + topic.len() + bytes.len());
    rest.extend_from_slice(&topic_len.to_be_bytes());
    rest.extend_from_slice(topic.as_bytes());
    rest.extend_from_slice(bytes);
    Ok(checked_value(key, DICTIONARY_FORMAT_VERSION, &rest))
}

pub(super) fn decode_dictionary(key: &[u8], value: &[u8]) -> Result<StoredDictionary, SpoolError> {
    let id = decode_dictionary_key(key)?;
    let corrupt = |why: &str| SpoolError::Corrupt(format!("dictionary {id}: {why}"));
    let rest = checked_body(key, value, DICTIONARY_FORMAT_VERSION, &corrupt)?;
    let (len, rest) = rest
        .split_first_chunk::<2>()
        .ok_or_else(|| corrupt("shorter than its header"))?;
    let (topic, bytes) = rest
        .split_at_checked(usize::from(u16::from_be_bytes(*len)))
        .ok_or_else(|| corrupt("topic runs past the end"))?;
    let topic = std::str::from_utf8(topic).map_err(|_| corrupt("topic is not UTF-8"))?;
    Ok(StoredDictionary {
        id,
        topic: topic.to_owned(),
        bytes: Bytes::copy_from_slice(bytes),
    })
}

// ---- topic configurations ----

pub(super) fn topic_config_key(topic: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + topic.len());
    key.push(TOPIC_CONFIG_TAG);
    key.extend_from_slice(topic.as_bytes());
    key
}

pub(super) fn encode_topic_config(
    key: &[u8],
    entries: &[(String, String)],
) -> Result<Vec<u8>, SpoolError> {
    let too_long = |what: &str| SpoolError::Corrupt(format!("topic configuration {what} too long"));
    let mut rest = Vec::new();
    let count = u16::try_from(entries.len()).map_err(|_| too_long("list"))?;
    rest.extend_from_slice(&count.to_be_bytes());
    for text in entries.iter().flat_map(|(name, value)| [name, value]) {
        let len = u16::try_from(text.len()).map_err(|_| too_long("entry"))?;
        rest.extend_from_slice(&len.to_be_bytes());
        rest.extend_from_slice(text.as_bytes());
    }
    Ok(checked_value(key, TOPIC_CONFIG_FORMAT_VERSION, &rest))
}

pub(super) fn decode_topic_config(
    key: &[u8],
    value: &[u8],
) -> Result<Vec<(String, String)>, SpoolError> {
    let topic = String::from_utf8_lossy(key.get(1..).unwrap_or_default());
    let corrupt = |why: &str| SpoolError::Corrupt(format!("topic configuration of {topic}: {why}"));
    let rest = checked_body(key, value, TOPIC_CONFIG_FORMAT_VERSION, &corrupt)?;
    let (count, mut rest) = rest
        .split_first_chunk::<2>()
        .ok_or_else(|| corrupt("shorter than its header"))?;
    let mut text = || -> Result<String, SpoolError> {
        let (len, tail) = rest
            .split_first_chunk::<2>()
            .ok_or_else(|| corrupt("an entry runs past the end"))?;
        let (bytes, tail) = tail
            .split_at_checked(usize::from(u16::from_be_bytes(*len)))
            .ok_or_else(|| corrupt("an entry runs past the end"))?;
        rest = tail;
        String::from_utf8(bytes.to_vec()).map_err(|_| corrupt("an entry is not UTF-8"))
    };
    let entries = (0..u16::from_be_bytes(*count))
        .map(|_| Ok((text()?, text()?)))
        .collect::<Result<Vec<_>, SpoolError>>()?;
    if !rest.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    Ok(entries)
}

// ---- keys ----

fn flip32(v: i32) -> [u8; 4] {
    ((v as u32) ^ (1 << 31)).to_be_bytes()
}

fn unflip32(b: [u8; 4]) -> i32 {
    (u32::from_be_bytes(b) ^ (1 << 31)) as i32
}

fn flip64(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

fn unflip64(b: [u8; 8]) -> i64 {
    (u64::from_be_bytes(b) ^ (1 << 63)) as i64
}

/// `tag ++ topic ++ 0x00 ++ partition (flipped)`
fn partition_key(tag: u8, partition: &SourcePartition, extra: usize) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + partition.topic.len() + 1 + 4 + extra);
    key.push(tag);
    key.extend_from_slice(partition.topic.as_bytes());
    key.push(0);
    key.extend_from_slice(&flip32(partition.partition));
    key
}

pub(super) fn position_key(partition: &SourcePartition) -> Vec<u8> {
    partition_key(POSITION_TAG, partition, 0)
}

pub(super) fn incarnation_key(partition: &SourcePartition) -> Vec<u8> {
    partition_key(INCARNATION_TAG, partition, 0)
}

pub(super) fn chunk_key(partition: &SourcePartition, first_offset: i64) -> Vec<u8> {
    let mut key = partition_key(CHUNK_TAG, partition, 8);
    key.extend_from_slice(&flip64(first_offset));
    key
}

/// Parses `tag ++ topic ++ 0x00 ++ partition` (`key` without any suffix).
pub(super) fn decode_partition(key: &[u8]) -> Result<SourcePartition, SpoolError> {
    let corrupt = || SpoolError::Corrupt(format!("malformed key {key:?}"));
    let body = key.get(1..).ok_or_else(corrupt)?;
    let split = body.len().checked_sub(5).ok_or_else(corrupt)?;
    let (topic, rest) = body.split_at(split);
    let (&zero, partition) = rest.split_first().ok_or_else(corrupt)?;
    let partition: [u8; 4] = partition.try_into().map_err(|_| corrupt())?;
    if zero != 0 {
        return Err(corrupt());
    }
    let topic = std::str::from_utf8(topic).map_err(|_| corrupt())?;
    Ok(SourcePartition {
        topic: topic.to_owned(),
        partition: unflip32(partition),
    })
}

/// `b'q' ++ topic ++ 0x00 ++ partition (flipped) ++ first_offset (flipped) ++ index (u32)`:
/// sorts after every chunk key, and a chunk's pieces in order.
pub(super) fn piece_key(partition: &SourcePartition, first_offset: i64, index: u32) -> Vec<u8> {
    let mut key = partition_key(PIECE_TAG, partition, 8 + 4);
    key.extend_from_slice(&flip64(first_offset));
    key.extend_from_slice(&index.to_be_bytes());
    key
}

pub(super) fn decode_piece_key(key: &[u8]) -> Result<(SourcePartition, i64, u32), SpoolError> {
    let corrupt = || SpoolError::Corrupt(format!("malformed piece key {key:?}"));
    let split = key.len().checked_sub(4).ok_or_else(corrupt)?;
    let (chunk, index) = key.split_at(split);
    let index: [u8; 4] = index.try_into().map_err(|_| corrupt())?;
    let (partition, first_offset) = decode_chunk_key(chunk)?;
    Ok((partition, first_offset, u32::from_be_bytes(index)))
}

pub(super) fn decode_position_key(key: &[u8]) -> Result<SourcePartition, SpoolError> {
    decode_partition(key)
}

pub(super) fn decode_chunk_key(key: &[u8]) -> Result<(SourcePartition, i64), SpoolError> {
    let corrupt = || SpoolError::Corrupt(format!("malformed chunk key {key:?}"));
    let split = key.len().checked_sub(8).ok_or_else(corrupt)?;
    let (head, first) = key.split_at(split);
    let first: [u8; 8] = first.try_into().map_err(|_| corrupt())?;
    Ok((decode_partition(head)?, unflip64(first)))
}

// ---- positions and incarnations ----

/// A position's value: the next source offset, 8 bytes.
pub(super) fn encode_position(next_offset: i64) -> [u8; 8] {
    next_offset.to_be_bytes()
}

pub(super) fn encode_incarnation(incarnation: &Incarnation) -> Vec<u8> {
    let version = match incarnation.topic_id {
        Some(_) => NAMED_INCARNATION_FORMAT_VERSION,
        None => INCARNATION_FORMAT_VERSION,
    };
    let mut value = vec![version];
    value.extend_from_slice(&incarnation.epoch.to_be_bytes());
    value.extend_from_slice(&incarnation.base.to_be_bytes());
    if let Some(id) = incarnation.topic_id {
        value.extend_from_slice(&id.0);
    }
    value
}

pub(super) fn decode_incarnation(
    partition: &SourcePartition,
    value: &[u8],
) -> Result<Incarnation, SpoolError> {
    let fields = |e: &[u8], b: &[u8]| -> Option<(u32, i64)> {
        Some((
            u32::from_be_bytes(e.try_into().ok()?),
            i64::from_be_bytes(b.try_into().ok()?),
        ))
    };
    let decoded = match value {
        [INCARNATION_FORMAT_VERSION, rest @ ..] if rest.len() == 12 => {
            fields(&rest[..4], &rest[4..]).map(|(epoch, base)| (epoch, base, None))
        }
        [NAMED_INCARNATION_FORMAT_VERSION, rest @ ..] if rest.len() == 28 => {
            let id = rest[12..].try_into().ok().and_then(TopicId::new);
            fields(&rest[..4], &rest[4..12])
                .zip(id)
                .map(|((epoch, base), id)| (epoch, base, Some(id)))
        }
        _ => None,
    };
    match decoded {
        Some((epoch, base, topic_id)) => Ok(Incarnation {
            epoch,
            base,
            topic_id,
        }),
        _ => Err(SpoolError::Corrupt(format!(
            "incarnation of {partition}: {} bytes of an unknown format",
            value.len()
        ))),
    }
}

pub(super) fn decode_position(
    partition: &SourcePartition,
    value: &[u8],
) -> Result<i64, SpoolError> {
    let bytes: [u8; 8] = value.try_into().map_err(|_| {
        SpoolError::Corrupt(format!(
            "position of {partition} has {} bytes, not 8",
            value.len()
        ))
    })?;
    Ok(i64::from_be_bytes(bytes))
}

// ---- chunk values ----

fn checksum(key: &[u8], header: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(key);
    h.update(header);
    h.update(payload);
    h.finalize()
}

/// A chunk as stored: the value under its chunk key, and the pieces of its payload under keys
/// of their own when it is longer than [`PIECE_BYTES`] (none otherwise: the value holds it).
pub(super) struct Encoded {
    pub(super) value: Vec<u8>,
    pub(super) pieces: Vec<(Vec<u8>, Bytes)>,
}

/// How many pieces a payload of `len` bytes is stored in; 0 when it follows the header.
pub(super) fn piece_count(len: usize) -> u32 {
    if len <= PIECE_BYTES {
        0
    } else {
        u32::try_from(len.div_ceil(PIECE_BYTES)).unwrap_or(u32::MAX)
    }
}

pub(super) fn encode_chunk(key: &[u8], chunk: &Chunk, seq: u64) -> Result<Encoded, SpoolError> {
    let in_pieces = piece_count(chunk.payload.len()) > 0;
    let inline_len = if in_pieces { 0 } else { chunk.payload.len() };
    let mut v = Vec::with_capacity(PIECES_HEADER_LEN + inline_len);
    v.push(if in_pieces {
        PIECES_FORMAT_VERSION
    } else {
        FORMAT_VERSION
    });
    v.extend_from_slice(&chunk.last_offset.to_be_bytes());
    v.extend_from_slice(&chunk.next_offset.to_be_bytes());
    v.extend_from_slice(&chunk.record_count.to_be_bytes());
    v.push(chunk.codec);
    v.extend_from_slice(&chunk.uncompressed_len.to_be_bytes());
    v.extend_from_slice(&chunk.spooled_at_ms.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    v.push(u8::from(chunk.dictionary.is_some()));
    v.extend_from_slice(&chunk.dictionary.unwrap_or(0).to_be_bytes());
    debug_assert_eq!(v.len(), CRC_AT);
    let mut pieces = Vec::new();
    if in_pieces {
        let len = u32::try_from(chunk.payload.len()).map_err(|_| {
            SpoolError::Corrupt(format!(
                "chunk {}:{} has a payload of {} bytes",
                chunk.partition,
                chunk.first_offset,
                chunk.payload.len()
            ))
        })?;
        v.extend_from_slice(&len.to_be_bytes());
        let starts = (0..chunk.payload.len()).step_by(PIECE_BYTES);
        for (index, start) in (0u32..).zip(starts) {
            let end = (start + PIECE_BYTES).min(chunk.payload.len());
            pieces.push((
                piece_key(&chunk.partition, chunk.first_offset, index),
                chunk.payload.slice(start..end),
            ));
        }
    }
    let crc = checksum(key, &v, &chunk.payload);
    v.extend_from_slice(&crc.to_be_bytes());
    if !in_pieces {
        v.extend_from_slice(&chunk.payload);
    }
    Ok(Encoded { value: v, pieces })
}

/// Reads fixed-size big-endian fields off the front of a header.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let (head, rest) = self.0.split_at(N.min(self.0.len()));
        out[..head.len()].copy_from_slice(head);
        self.0 = rest;
        out
    }
}

/// Where a chunk's payload is.
#[derive(Debug, Clone, Copy)]
enum Stored<'a> {
    /// after the header, in the same value (format versions 1 and 2)
    Inline(&'a [u8]),
    /// in this many bytes of pieces under [`piece_key`]s (format version 3)
    Pieces(u32),
}

/// A chunk's value, decoded but not yet checked against its payload.
pub(super) struct Header<'a> {
    pub(super) last_offset: i64,
    next_offset: i64,
    pub(super) record_count: u32,
    codec: u8,
    uncompressed_len: u32,
    pub(super) spooled_at_ms: u64,
    pub(super) seq: u64,
    pub(super) dictionary: Option<u32>,
    /// the header bytes the CRC covers (after the key, before the payload)
    covered: &'a [u8],
    crc: u32,
    payload: Stored<'a>,
}

impl Header<'_> {
    /// How many pieces the payload is stored in; 0 when it follows the header.
    pub(super) fn pieces(&self) -> u32 {
        match self.payload {
            Stored::Inline(_) => 0,
            Stored::Pieces(len) => piece_count(len as usize),
        }
    }

    /// The payload's length, once an inline payload's checksum holds. A payload in pieces is
    /// verified when it is read: its pieces are not at hand here.
    pub(super) fn verified_payload_len(
        &self,
        key: &[u8],
        partition: &SourcePartition,
        first_offset: i64,
    ) -> Result<u64, SpoolError> {
        match self.payload {
            Stored::Inline(payload) => {
                if checksum(key, self.covered, payload) != self.crc {
                    return Err(corrupt_chunk(partition, first_offset, "checksum mismatch"));
                }
                Ok(payload.len() as u64)
            }
            Stored::Pieces(len) => Ok(u64::from(len)),
        }
    }

    /// The chunk this header and `payload` make up.
    fn into_chunk(self, partition: SourcePartition, first_offset: i64, payload: Bytes) -> Chunk {
        Chunk {
            partition,
            first_offset,
            last_offset: self.last_offset,
            next_offset: self.next_offset,
            record_count: self.record_count,
            codec: self.codec,
            dictionary: self.dictionary,
            uncompressed_len: self.uncompressed_len,
            spooled_at_ms: self.spooled_at_ms,
            payload,
        }
    }
}

pub(super) fn corrupt_chunk(
    partition: &SourcePartition,
    first_offset: i64,
    why: &str,
) -> SpoolError {
    SpoolError::Corrupt(format!("chunk {partition}:{first_offset}: {why}"))
}

/// Decodes a chunk's value; the checksum is left to the caller, who has the whole payload.
pub(super) fn decode_header<'a>(
    partition: &SourcePartition,
    first_offset: i64,
    value: &'a [u8],
) -> Result<Header<'a>, SpoolError> {
    let corrupt = |why: &str| corrupt_chunk(partition, first_offset, why);
    let header_len = match value.first() {
        Some(&FORMAT_VERSION) => HEADER_LEN,
        Some(&PIECES_FORMAT_VERSION) => PIECES_HEADER_LEN,
        Some(1) => V1_HEADER_LEN,
        Some(other) => {
            return Err(corrupt(&format!(
                "unknown format version {other} (written by a newer spoke-agent?)"
            )))
        }
        None => return Err(corrupt("empty")),
    };
    if value.len() < header_len {
        return Err(corrupt("shorter than its header"));
    }
    let (header, rest) = value.split_at(header_len);
    let crc_at = header_len - 4;
    let covered = &header[..crc_at];
    let mut f = Fields(covered);
    let crc = u32::from_be_bytes(Fields(&header[crc_at..]).take::<4>());
    let [version] = f.take::<1>();
    let last_offset = i64::from_be_bytes(f.take());
    let next_offset = i64::from_be_bytes(f.take());
    let record_count = u32::from_be_bytes(f.take());
    let [codec] = f.take::<1>();
    let uncompressed_len = u32::from_be_bytes(f.take());
    let spooled_at_ms = u64::from_be_bytes(f.take());
    let seq = u64::from_be_bytes(f.take());
    // Version 1 ends here (`Fields` reads zeros past the end): its chunks need no dictionary.
    let has_dictionary = f.take::<1>();
    let dictionary_id = u32::from_be_bytes(f.take());
    let dictionary = match has_dictionary {
        [0] => None,
        [1] => Some(dictionary_id),
        _ => return Err(corrupt("dictionary flag is neither 0 nor 1")),
    };
    let payload = if version == PIECES_FORMAT_VERSION {
        if !rest.is_empty() {
            return Err(corrupt("payload both inline and in pieces"));
        }
        Stored::Pieces(u32::from_be_bytes(f.take()))
    } else {
        Stored::Inline(rest)
    };
    Ok(Header {
        last_offset,
        next_offset,
        record_count,
        codec,
        uncompressed_len,
        spooled_at_ms,
        seq,
        dictionary,
        covered,
        crc,
        payload,
    })
}

/// Decodes and verifies a chunk, reading its payload's pieces, if it has any, with
/// `read_pieces(partition, payload length)`; returns the chunk and its append sequence.
pub(super) fn decode_chunk_with(
    key: &[u8],
    partition: SourcePartition,
    first_offset: i64,
    value: &[u8],
    read_pieces: impl FnOnce(&SourcePartition, u32) -> Result<Bytes, SpoolError>,
) -> Result<(Chunk, u64), SpoolError> {
    let header = decode_header(&partition, first_offset, value)?;
    let payload = match header.payload {
        Stored::Inline(payload) => Bytes::copy_from_slice(payload),
        Stored::Pieces(len) => read_pieces(&partition, len)?,
    };
    if checksum(key, header.covered, &payload) != header.crc {
        return Err(corrupt_chunk(&partition, first_offset, "checksum mismatch"));
    }
    let seq = header.seq;
    Ok((header.into_chunk(partition, first_offset, payload), seq))
}

/// [`decode_chunk_with`] for a chunk whose payload follows its header.
#[cfg(test)]
fn decode_chunk(
    key: &[u8],
    partition: SourcePartition,
    first_offset: i64,
    value: &[u8],
) -> Result<(Chunk, u64), SpoolError> {
    decode_chunk_with(key, partition, first_offset, value, |partition, _| {
        Err(corrupt_chunk(partition, first_offset, "payload in pieces"))
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{big_chunk, chunk, sp};
    use super::*;

    #[test]
    fn keys_sort_like_partitions_and_offsets() {
        let parts = [
            sp("a", i32::MIN),
            sp("a", -1),
            sp("a", 0),
            sp("a", 7),
            sp("ab", 0),
            sp("b", i32::MIN),
        ];
        let offsets = [i64::MIN, -1, 0, 1, 255, 256, i64::MAX];
        let mut keys = Vec::new();
        for p in &parts {
            for &o in &offsets {
                keys.push(chunk_key(p, o));
                assert_eq!(
                    decode_chunk_key(&chunk_key(p, o)).expect("spool op"),
                    (p.clone(), o)
                );
            }
            assert_eq!(decode_position_key(&position_key(p)).expect("spool op"), *p);
        }
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert!(decode_chunk_key(b"c").is_err());
        assert!(decode_chunk_key(b"ca\x01\0\0\0\0\0\0\0\0\0\0\0\0").is_err());
        assert!(decode_position_key(b"p\xff\0\0\0\0\0").is_err());
        assert_eq!(
            decode_position_key(b"p\0\x80\0\0\x01").expect("spool op"),
            sp("", 1)
        );
    }

    #[test]
    fn value_layout_is_as_documented() {
        let p = sp("t", 2);
        let mut c = chunk(&p, 5, 6, 7, 0x0102);
        c.codec = 9;
        let key = chunk_key(&p, 5);
        c.dictionary = Some(0x0A0B_0C0D);
        let v = encode_chunk(&key, &c, 3).expect("encodes").value;
        assert_eq!(HEADER_LEN, 51);
        assert_eq!(v.len(), 51 + c.payload.len());
        assert_eq!(v[0], 2);
        assert_eq!(v[1..9], 6i64.to_be_bytes());
        assert_eq!(v[9..17], 7i64.to_be_bytes());
        assert_eq!(v[17..21], 2u32.to_be_bytes());
        assert_eq!(v[21], 9);
        assert_eq!(v[22..26], 1000u32.to_be_bytes());
        assert_eq!(v[26..34], 0x0102u64.to_be_bytes());
        assert_eq!(v[34..42], 3u64.to_be_bytes());
        assert_eq!(v[42], 1);
        assert_eq!(v[43..47], 0x0A0B_0C0Du32.to_be_bytes());
        assert_eq!(v[51..], c.payload[..]);
        let (back, seq) = decode_chunk(&key, p.clone(), 5, &v).expect("spool op");
        assert_eq!((back, seq), (c.clone(), 3));
    }

    #[test]
    fn a_payload_over_a_piece_is_stored_in_pieces_as_documented() {
        let p = sp("t", 2);
        let key = chunk_key(&p, 5);
        let inline = encode_chunk(&key, &big_chunk(&p, 5, PIECE_BYTES), 3).expect("encodes");
        assert_eq!(inline.value[0], 2);
        assert_eq!(inline.value.len(), 51 + PIECE_BYTES);
        assert!(inline.pieces.is_empty());
        let c = big_chunk(&p, 5, 2 * PIECE_BYTES + 1);
        let encoded = encode_chunk(&key, &c, 3).expect("encodes");
        let v = &encoded.value;
        assert_eq!(PIECES_HEADER_LEN, 55);
        assert_eq!(v.len(), 55);
        assert_eq!(v[0], 3);
        assert_eq!(v[1..9], c.last_offset.to_be_bytes());
        assert_eq!(v[34..42], 3u64.to_be_bytes());
        assert_eq!(v[47..51], (2 * PIECE_BYTES as u32 + 1).to_be_bytes());
        assert_eq!(
            v[51..55],
            checksum(&key, &v[..51], &c.payload).to_be_bytes()
        );
        let pieces: Vec<(Vec<u8>, usize)> = encoded
            .pieces
            .iter()
            .map(|(k, piece)| (k.clone(), piece.len()))
            .collect();
        let mut want_key = b"qt\0\x80\0\0\x02\x80\0\0\0\0\0\0\x05".to_vec();
        want_key.extend_from_slice(&1u32.to_be_bytes());
        assert_eq!(pieces[1].0, want_key);
        assert_eq!(
            pieces,
            vec![
                (piece_key(&p, 5, 0), PIECE_BYTES),
                (piece_key(&p, 5, 1), PIECE_BYTES),
                (piece_key(&p, 5, 2), 1),
            ]
        );
        assert_eq!(decode_piece_key(&want_key).expect("decodes"), (p, 5, 1));
    }

    #[test]
    fn format_version_1_chunks_are_still_read() {
        let p = sp("t", 2);
        let c = chunk(&p, 5, 6, 7, 0x0102);
        let key = chunk_key(&p, 5);
        // A version 1 value: the version 2 header without bytes 42..47, its own CRC.
        let v2 = encode_chunk(&key, &c, 3).expect("encodes").value;
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&v2[1..42]);
        let crc = checksum(&key, &v1, &c.payload);
        v1.extend_from_slice(&crc.to_be_bytes());
        v1.extend_from_slice(&c.payload);
        assert_eq!(v1.len(), 46 + c.payload.len());
        let (back, seq) = decode_chunk(&key, p.clone(), 5, &v1).expect("v1 reads");
        assert_eq!((back, seq), (c, 3));
        let mut v9 = v2.to_vec();
        v9[0] = 9;
        let error = decode_chunk(&key, p, 5, &v9).expect_err("unknown version");
        assert!(
            error.to_string().contains("unknown format version 9"),
            "{error}"
        );
    }
}
