//! Batches: Kafka records ↔ the (compressed) payload of a [`Batch`] frame.
//!
//! # Record section
//!
//! The uncompressed payload ("record section") is the records back to back, with no section
//! header: the count, first and last offset and length travel in the [`Batch`] frame, and
//! [`decode_records`] checks the section against them. Each record is
//!
//! ```text
//! offset        first record: zvarint, the absolute offset (so the section can be checked
//!               against the frame's first_offset); later records: uvarint, the offset minus
//!               the previous record's offset (>= 1)
//! ts_flag       u8: 0 = no timestamp, 1 = a timestamp follows
//! timestamp     zvarint (only if ts_flag = 1), milliseconds; zigzag keeps negatives short
//! key           nullable
//! value         nullable
//! header_count  uvarint
//! headers       header_count × { key_len uvarint, key UTF-8, value nullable }
//! ```
//!
//! `uvarint` is unsigned LEB128 (at most 10 bytes), `zvarint` a zigzag-mapped i64 in a uvarint,
//! and `nullable` a uvarint `len + 1` followed by `len` bytes, with `0` meaning null; this
//! keeps null and empty distinct, as Kafka does. Later offsets are stored as deltas because
//! consecutive offsets mostly differ by 1, so a record costs one byte for its offset.
//!
//! With [`Codec::Zstd`] the payload is exactly one zstd frame holding the section; with
//! [`Codec::ZstdDict`] it is one zstd frame compressed with that dictionary (see
//! [`crate::dictionary`]), which small chunks of similar records compress much better with:
//! a frame of a few records has too little history of its own to find repeats in. Decoding
//! checks the declared length against [`BatchLimits`] before allocating, caps the zstd window,
//! decompresses into a buffer of exactly the declared size and stops as soon as the data would
//! exceed it, so a small hostile payload cannot make us allocate or inflate more than allowed.

use std::io;

use bytes::{Buf, Bytes};
use zstd::stream::raw::{Decoder, Operation};
use zstd::zstd_safe::{CCtx, CDict, DCtx, DDict, DParameter};

use crate::dictionary::Dictionaries;
use crate::error::BatchError;
use crate::frame::{Batch, Codec};

/// A Kafka record header; Kafka allows a null value and repeated keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header name.
    pub key: String,
    /// Header value; `None` is Kafka's null, distinct from empty.
    pub value: Option<Bytes>,
}

/// One Kafka record as it travels in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Source offset.
    pub offset: i64,
    /// Record timestamp in milliseconds, if the source had one.
    pub timestamp: Option<i64>,
    /// Record key; `None` is null, distinct from empty.
    pub key: Option<Bytes>,
    /// Record value; `None` is null (a tombstone), distinct from empty.
    pub value: Option<Bytes>,
    /// Record headers in source order.
    pub headers: Vec<Header>,
}

/// Caps applied while decoding a batch payload from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Largest accepted uncompressed record section; checked before decompressing.
    pub max_uncompressed_bytes: u32,
    /// Most records in one batch.
    pub max_records: u32,
    /// Most headers on one record.
    pub max_headers_per_record: u32,
    /// Most bytes of header keys plus values on one record.
    pub max_header_bytes: u32,
    /// Largest accepted zstd window, as log2 bytes; bounds the decoder's memory.
    pub zstd_window_log_max: u32,
}

impl Default for BatchLimits {
    /// 64 MiB, 1 000 000 records, 1024 headers of together at most 1 MiB per record, 16 MiB
    /// zstd window (2^24; the compressor's default levels stay below this).
    fn default() -> Self {
        BatchLimits {
            max_uncompressed_bytes: 64 * 1024 * 1024,
            max_records: 1_000_000,
            max_headers_per_record: 1024,
            max_header_bytes: 1024 * 1024,
            zstd_window_log_max: 24,
        }
    }
}

/// Builds one chunk incrementally from borrowed record parts (the agent feeds rdkafka messages
/// without copying them into owned [`Record`]s first).
#[derive(Debug, Default)]
pub struct ChunkBuilder {
    section: Vec<u8>,
    record_count: u32,
    first_offset: Option<i64>,
    last_offset: Option<i64>,
}

impl ChunkBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one record. Offsets must strictly increase, else [`BatchError::OffsetOrder`]
    /// (and nothing is appended).
    pub fn push(
        &mut self,
        offset: i64,
        timestamp: Option<i64>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) -> Result<(), BatchError> {
        if let Some(prev) = self.last_offset {
            if offset <= prev {
                return Err(BatchError::OffsetOrder { prev, next: offset });
            }
        }
        if self.record_count == u32::MAX {
            return Err(BatchError::TooManyRecords {
                count: u64::from(u32::MAX) + 1,
                max: u32::MAX,
            });
        }
        let out = &mut self.section;
        match self.last_offset {
            None => put_uvarint(out, zigzag(offset)),
            // abs_diff because the distance between two i64 offsets can exceed i64::MAX; it is
            // offset - prev, as offset > prev was checked above.
            Some(prev) => put_uvarint(out, offset.abs_diff(prev)),
        }
        match timestamp {
            None => out.push(0),
            Some(ts) => {
                out.push(1);
                put_uvarint(out, zigzag(ts));
            }
        }
        put_nullable(out, key);
        put_nullable(out, value);
        put_uvarint(out, headers.len() as u64);
        for (name, value) in headers {
            put_uvarint(out, name.len() as u64);
            out.extend_from_slice(name.as_bytes());
            put_nullable(out, *value);
        }
        self.record_count += 1;
        self.first_offset.get_or_insert(offset);
        self.last_offset = Some(offset);
        Ok(())
    }

    /// Records pushed since the last [`finish`](Self::finish).
    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    /// Bytes of the encoded, uncompressed record section so far.
    pub fn uncompressed_len(&self) -> usize {
        self.section.len()
    }

    /// The encoded, uncompressed record section so far (e.g. to sample records for training a
    /// dictionary).
    pub fn section(&self) -> &[u8] {
        &self.section
    }

    /// Whether no record was pushed since the last [`finish`](Self::finish).
    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// Offset of the first pushed record.
    pub fn first_offset(&self) -> Option<i64> {
        self.first_offset
    }

    /// Offset of the last pushed record.
    pub fn last_offset(&self) -> Option<i64> {
        self.last_offset
    }

    /// Compresses (`Codec::Zstd` at `zstd_level`) or copies (`Codec::None`) the section and
    /// resets the builder for reuse.
    ///
    /// On error the builder keeps its records, so the caller can retry (e.g. uncompressed).
    ///
    /// [`Codec::ZstdDict`] needs the dictionary: use
    /// [`finish_with_dictionary`](Self::finish_with_dictionary); here it is
    /// [`BatchError::UnknownDictionary`].
    pub fn finish(&mut self, codec: Codec, zstd_level: i32) -> Result<EncodedChunk, BatchError> {
        self.finish_inner(codec, zstd_level, None)
    }

    /// Compresses the section with `dictionary` ([`Codec::ZstdDict`] with its id, at the level
    /// it was prepared for) and resets the builder; on error the builder keeps its records.
    pub fn finish_with_dictionary(
        &mut self,
        dictionary: &EncoderDictionary,
    ) -> Result<EncodedChunk, BatchError> {
        self.finish_inner(Codec::ZstdDict(dictionary.id), 0, Some(dictionary))
    }

    fn finish_inner(
        &mut self,
        codec: Codec,
        zstd_level: i32,
        dictionary: Option<&EncoderDictionary>,
    ) -> Result<EncodedChunk, BatchError> {
        let (Some(first_offset), Some(last_offset)) = (self.first_offset, self.last_offset) else {
            return Err(BatchError::Empty);
        };
        let uncompressed_len =
            u32::try_from(self.section.len()).map_err(|_| BatchError::TooLarge {
                len: self.section.len() as u64,
                max: u64::from(u32::MAX),
            })?;
        let payload = match codec {
            // Hand the buffer over instead of copying it; the next chunk allocates afresh.
            Codec::None => Bytes::from(std::mem::take(&mut self.section)),
            Codec::Zstd => {
                let compressed = zstd::bulk::Compressor::new(zstd_level)
                    .and_then(|mut c| c.compress(&self.section))
                    .map_err(|e| BatchError::Compress(e.to_string()))?;
                // Keep the allocation: the next chunk will be about as large.
                self.section.clear();
                Bytes::from(compressed)
            }
            Codec::ZstdDict(id) => {
                let dictionary = dictionary
                    .filter(|d| d.id == id)
                    .ok_or(BatchError::UnknownDictionary(id))?;
                let compressed = dictionary.compress(&self.section)?;
                self.section.clear();
                Bytes::from(compressed)
            }
        };
        let chunk = EncodedChunk {
            first_offset,
            last_offset,
            record_count: self.record_count,
            codec,
            uncompressed_len,
            payload,
        };
        self.record_count = 0;
        self.first_offset = None;
        self.last_offset = None;
        Ok(chunk)
    }
}

/// A zstd dictionary prepared for compression at one level, with the id batches name it by.
pub struct EncoderDictionary {
    id: u32,
    cdict: CDict<'static>,
}

impl std::fmt::Debug for EncoderDictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncoderDictionary")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl EncoderDictionary {
    /// Prepares `dictionary` (as made by `zstd::dict::from_samples`) for compressing at
    /// `zstd_level`; [`BatchError::Compress`] if zstd refuses it.
    pub fn new(id: u32, dictionary: &[u8], zstd_level: i32) -> Result<Self, BatchError> {
        let cdict = CDict::try_create(dictionary, zstd_level)
            .ok_or_else(|| BatchError::Compress(format!("zstd refused dictionary {id}")))?;
        Ok(EncoderDictionary { id, cdict })
    }

    /// The id batches compressed with it carry.
    pub fn id(&self) -> u32 {
        self.id
    }

    fn compress(&self, section: &[u8]) -> Result<Vec<u8>, BatchError> {
        let error = |code| BatchError::Compress(zstd::zstd_safe::get_error_name(code).to_owned());
        let mut cctx = CCtx::try_create()
            .ok_or_else(|| BatchError::Compress("cannot allocate a zstd context".to_owned()))?;
        cctx.ref_cdict(&self.cdict).map_err(error)?;
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(section.len()));
        cctx.compress2(&mut out, section).map_err(error)?;
        Ok(out)
    }
}

/// A finished chunk: the fields of a [`Batch`] frame that describe its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedChunk {
    /// Offset of the first record.
    pub first_offset: i64,
    /// Offset of the last record.
    pub last_offset: i64,
    /// Number of records.
    pub record_count: u32,
    /// Compression of `payload`.
    pub codec: Codec,
    /// Length of the record section before compression.
    pub uncompressed_len: u32,
    /// The (compressed) record section.
    pub payload: Bytes,
}

/// Encodes owned records into one chunk (a convenience over [`ChunkBuilder`]).
///
/// An empty slice is [`BatchError::Empty`]; offsets must strictly increase.
pub fn encode_records(
    records: &[Record],
    codec: Codec,
    zstd_level: i32,
) -> Result<EncodedChunk, BatchError> {
    let mut builder = ChunkBuilder::new();
    for r in records {
        let headers: Vec<(&str, Option<&[u8]>)> = r
            .headers
            .iter()
            .map(|h| (h.key.as_str(), h.value.as_deref()))
            .collect();
        builder.push(
            r.offset,
            r.timestamp,
            r.key.as_deref(),
            r.value.as_deref(),
            &headers,
        )?;
    }
    builder.finish(codec, zstd_level)
}

/// Decompresses and parses a batch payload, validating it against the batch's header fields.
///
/// The declared `uncompressed_len` is checked against `limits` before anything is allocated;
/// zstd decoding runs with the window capped at `limits.zstd_window_log_max` into a buffer of
/// exactly `uncompressed_len` bytes, and any size mismatch is an error. Then: record count ==
/// `record_count` (<= `max_records`), first record offset == `first_offset`, last ==
/// `last_offset`, offsets strictly increasing, header count capped, header keys UTF-8, no
/// trailing bytes.
pub fn decode_records(
    codec: Codec,
    uncompressed_len: u32,
    payload: &[u8],
    first_offset: i64,
    last_offset: i64,
    record_count: u32,
    limits: &BatchLimits,
) -> Result<Vec<Record>, BatchError> {
    let expected = Expected {
        uncompressed_len,
        first_offset,
        last_offset,
        record_count,
    };
    expected.precheck(limits)?;
    let section = match codec {
        Codec::None => {
            expected.check_plain_len(payload.len())?;
            Bytes::copy_from_slice(payload)
        }
        Codec::Zstd => decompress(payload, uncompressed_len, limits, None)?,
        // No dictionaries here; see [`Batch::records_with`].
        Codec::ZstdDict(id) => return Err(BatchError::UnknownDictionary(id)),
    };
    expected.parse(section, limits)
}

/// Decompresses a payload into its record section without parsing it, under the same caps as
/// [`decode_records`] (e.g. to re-encode a dictionary chunk for a peer without dictionaries).
pub fn decompress_section(
    codec: Codec,
    uncompressed_len: u32,
    payload: &Bytes,
    limits: &BatchLimits,
    dictionaries: &Dictionaries,
) -> Result<Bytes, BatchError> {
    if uncompressed_len > limits.max_uncompressed_bytes {
        return Err(BatchError::TooLarge {
            len: u64::from(uncompressed_len),
            max: u64::from(limits.max_uncompressed_bytes),
        });
    }
    match codec {
        Codec::None => {
            if payload.len() != uncompressed_len as usize {
                return Err(BatchError::LengthMismatch {
                    declared: uncompressed_len,
                    actual: payload.len() as u64,
                });
            }
            Ok(payload.clone())
        }
        Codec::Zstd => decompress(payload, uncompressed_len, limits, None),
        Codec::ZstdDict(id) => decompress(
            payload,
            uncompressed_len,
            limits,
            Some(dictionaries.get(id)?),
        ),
    }
}

impl Batch {
    /// Decodes this batch's records; see [`decode_records`]. Uncompressed payloads are sliced
    /// without copying. A [`Codec::ZstdDict`] batch needs [`Batch::records_with`].
    pub fn records(&self, limits: &BatchLimits) -> Result<Vec<Record>, BatchError> {
        self.records_with(limits, &Dictionaries::default())
    }

    /// As [`Batch::records`], decompressing a [`Codec::ZstdDict`] payload with its dictionary
    /// from `dictionaries` ([`BatchError::UnknownDictionary`] if it is not there).
    pub fn records_with(
        &self,
        limits: &BatchLimits,
        dictionaries: &Dictionaries,
    ) -> Result<Vec<Record>, BatchError> {
        let expected = Expected {
            uncompressed_len: self.uncompressed_len,
            first_offset: self.first_offset,
            last_offset: self.last_offset,
            record_count: self.record_count,
        };
        expected.precheck(limits)?;
        let section = decompress_section(
            self.codec,
            self.uncompressed_len,
            &self.payload,
            limits,
            dictionaries,
        )?;
        expected.parse(section, limits)
    }
}

/// What the batch header claims about its payload.
struct Expected {
    uncompressed_len: u32,
    first_offset: i64,
    last_offset: i64,
    record_count: u32,
}

impl Expected {
    /// Checks that cost nothing, before any allocation or decompression.
    fn precheck(&self, limits: &BatchLimits) -> Result<(), BatchError> {
        if self.record_count == 0 {
            return Err(BatchError::Empty);
        }
        if self.record_count > limits.max_records {
            return Err(BatchError::TooManyRecords {
                count: u64::from(self.record_count),
                max: limits.max_records,
            });
        }
        if self.uncompressed_len > limits.max_uncompressed_bytes {
            return Err(BatchError::TooLarge {
                len: u64::from(self.uncompressed_len),
                max: u64::from(limits.max_uncompressed_bytes),
            });
        }
        if self.first_offset > self.last_offset {
            return Err(BatchError::OffsetMismatch(
                "first_offset is after last_offset",
            ));
        }
        Ok(())
    }

    fn check_plain_len(&self, len: usize) -> Result<(), BatchError> {
        if len != self.uncompressed_len as usize {
            return Err(BatchError::LengthMismatch {
                declared: self.uncompressed_len,
                actual: len as u64,
            });
        }
        Ok(())
    }

    /// Parses the record section (see the module docs).
    fn parse(&self, section: Bytes, limits: &BatchLimits) -> Result<Vec<Record>, BatchError> {
        let mut r = SectionReader { buf: section };
        // A record takes at least 5 bytes, so the remaining bytes bound the real count even
        // when the declared count lies.
        let mut records = Vec::with_capacity((self.record_count as usize).min(r.buf.len() / 5));
        let mut prev = self.first_offset;
        while !r.buf.is_empty() {
            if records.len() >= limits.max_records as usize {
                return Err(BatchError::TooManyRecords {
                    count: records.len() as u64 + 1,
                    max: limits.max_records,
                });
            }
            let offset = if records.is_empty() {
                self.first_record_offset(&mut r)?
            } else {
                r.offset_after(prev)?
            };
            records.push(r.record_at(offset, limits)?);
            prev = offset;
        }
        self.check_end(records.len(), prev)?;
        Ok(records)
    }

    /// The first record's offset, written in full so that the section can be checked against
    /// the frame's `first_offset`.
    #[inline]
    fn first_record_offset(&self, r: &mut SectionReader) -> Result<i64, BatchError> {
        let offset = unzigzag(r.uvarint()?);
        if offset != self.first_offset {
            return Err(BatchError::OffsetMismatch(
                "first record's offset differs from first_offset",
            ));
        }
        Ok(offset)
    }

    /// Whether the section held as many records as the frame declares, the last at its
    /// `last_offset`.
    #[inline]
    fn check_end(&self, count: usize, last_offset: i64) -> Result<(), BatchError> {
        let actual = u32::try_from(count).unwrap_or(u32::MAX);
        if actual != self.record_count {
            return Err(BatchError::CountMismatch {
                declared: self.record_count,
                actual,
            });
        }
        if last_offset != self.last_offset {
            return Err(BatchError::OffsetMismatch(
                "last record's offset differs from last_offset",
            ));
        }
        Ok(())
    }
}

/// Output is produced in steps of this size. Besides bounding each step, it keeps zstd from
/// taking its single-pass shortcut (taken when the whole frame fits the output), which skips
/// the window-size check: every frame with a window above this size goes through the cap.
const DECOMPRESS_STEP: usize = 128 * 1024;

/// Decompresses exactly one zstd frame into exactly `declared` bytes, with `dictionary` if
/// given.
fn decompress(
    payload: &[u8],
    declared: u32,
    limits: &BatchLimits,
    dictionary: Option<&DDict<'static>>,
) -> Result<Bytes, BatchError> {
    let zstd_err = |e: io::Error| BatchError::Decompress(e.to_string());
    let mut context;
    let mut decoder = match dictionary {
        None => Decoder::new().map_err(zstd_err)?,
        Some(ddict) => {
            context = DCtx::try_create()
                .ok_or_else(|| BatchError::Decompress("cannot allocate a zstd context".into()))?;
            context.ref_ddict(ddict).map_err(|code| {
                BatchError::Decompress(zstd::zstd_safe::get_error_name(code).to_owned())
            })?;
            Decoder::with_context(&mut context)
        }
    };
    decoder
        .set_parameter(DParameter::WindowLogMax(limits.zstd_window_log_max))
        .map_err(zstd_err)?;
    let len = declared as usize;
    let mut out = vec![0u8; len];
    let mut written = 0usize;
    let mut read = 0usize;
    loop {
        let input = payload.get(read..).unwrap_or_default();
        let mut overflow = [0u8; 1];
        // Once the declared size is filled, offer one spare byte: if zstd writes it, the
        // payload expands beyond its declaration and we stop right here.
        let dst = match out.get_mut(written..len.min(written.saturating_add(DECOMPRESS_STEP))) {
            Some(dst) if !dst.is_empty() => dst,
            _ => &mut overflow[..],
        };
        let full = written >= len;
        let status = decoder.run_on_buffers(input, dst).map_err(zstd_err)?;
        if full && status.bytes_written > 0 {
            return Err(BatchError::LengthMismatch {
                declared,
                actual: u64::from(declared) + 1,
            });
        }
        read += status.bytes_read;
        written += status.bytes_written;
        if status.remaining == 0 {
            // End of the zstd frame.
            break;
        }
        if status.bytes_read == 0 && status.bytes_written == 0 {
            // No input left and the frame is not finished.
            return Err(BatchError::Decompress("truncated zstd frame".to_owned()));
        }
    }
    if written != len {
        return Err(BatchError::LengthMismatch {
            declared,
            actual: written as u64,
        });
    }
    if read != payload.len() {
        return Err(BatchError::TrailingBytes(payload.len() - read));
    }
    Ok(Bytes::from(out))
}

/// Cursor over a record section; every read is length-checked first.
struct SectionReader {
    buf: Bytes,
}

impl SectionReader {
    fn u8(&mut self) -> Result<u8, BatchError> {
        if self.buf.is_empty() {
            return Err(BatchError::Truncated);
        }
        Ok(self.buf.get_u8())
    }

    fn uvarint(&mut self) -> Result<u64, BatchError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            // The 10th byte holds bit 63 only; anything more would overflow u64.
            if shift == 63 && byte > 1 {
                return Err(BatchError::Malformed("varint overflows u64"));
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(BatchError::Malformed("varint longer than 10 bytes"))
    }

    fn take(&mut self, len: u64) -> Result<Bytes, BatchError> {
        match usize::try_from(len) {
            Ok(n) if n <= self.buf.len() => Ok(self.buf.split_to(n)),
            _ => Err(BatchError::Truncated),
        }
    }

    fn nullable(&mut self) -> Result<Option<Bytes>, BatchError> {
        match self.uvarint()? {
            0 => Ok(None),
            n => self.take(n - 1).map(Some),
        }
    }

    /// A later record's offset: a delta from the one before, which must move forward.
    #[inline]
    fn offset_after(&mut self, prev: i64) -> Result<i64, BatchError> {
        let delta = self.uvarint()?;
        if delta == 0 {
            return Err(BatchError::OffsetOrder { prev, next: prev });
        }
        prev.checked_add_unsigned(delta)
            .ok_or(BatchError::Malformed("record offset overflows i64"))
    }

    /// The rest of the record at `offset`: timestamp, key, value and headers. Key and value
    /// are slices of the section, not copies.
    #[inline]
    fn record_at(&mut self, offset: i64, limits: &BatchLimits) -> Result<Record, BatchError> {
        let timestamp = match self.u8()? {
            0 => None,
            1 => Some(unzigzag(self.uvarint()?)),
            _ => return Err(BatchError::Malformed("timestamp flag is neither 0 nor 1")),
        };
        let key = self.nullable()?;
        let value = self.nullable()?;
        let headers = self.headers(limits)?;
        Ok(Record {
            offset,
            timestamp,
            key,
            value,
            headers,
        })
    }

    /// A record's headers, within `limits`' count and bytes per record.
    #[inline]
    fn headers(&mut self, limits: &BatchLimits) -> Result<Vec<Header>, BatchError> {
        let header_count = self.uvarint()?;
        if header_count > u64::from(limits.max_headers_per_record) {
            return Err(BatchError::TooManyHeaders {
                count: header_count,
                max: limits.max_headers_per_record,
            });
        }
        // A header takes at least 2 bytes; bound the allocation by what is really there.
        let mut headers = Vec::with_capacity((header_count as usize).min(self.buf.len() / 2));
        let mut header_bytes = 0u64;
        for _ in 0..header_count {
            let key_len = self.uvarint()?;
            let key = String::from_utf8(self.take(key_len)?.to_vec())
                .map_err(|_| BatchError::InvalidUtf8)?;
            let value = self.nullable()?;
            header_bytes = header_bytes
                .saturating_add(key_len)
                .saturating_add(value.as_ref().map_or(0, |v| v.len() as u64));
            if header_bytes > u64::from(limits.max_header_bytes) {
                return Err(BatchError::HeadersTooLarge {
                    len: header_bytes,
                    max: limits.max_header_bytes,
                });
            }
            headers.push(Header { key, value });
        }
        Ok(headers)
    }
}

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_nullable(out: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        None => put_uvarint(out, 0),
        Some(bytes) => {
            put_uvarint(out, bytes.len() as u64 + 1);
            out.extend_from_slice(bytes);
        }
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zigzag_and_varint_extremes_round_trip() {
        for v in [0, 1, -1, 63, -64, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(v)), v);
            let mut out = Vec::new();
            put_uvarint(&mut out, zigzag(v));
            let mut r = SectionReader {
                buf: Bytes::from(out),
            };
            assert_eq!(r.uvarint().map(unzigzag), Ok(v));
            assert!(r.buf.is_empty());
        }
        let mut out = Vec::new();
        put_uvarint(&mut out, u64::MAX);
        assert_eq!(out.len(), 10, "u64::MAX takes the full 10 bytes");
    }

    #[test]
    fn defaults_match_the_documented_caps() {
        let l = BatchLimits::default();
        assert_eq!(l.max_uncompressed_bytes, 64 << 20);
        assert_eq!(l.max_records, 1_000_000);
        assert_eq!(l.max_headers_per_record, 1024);
        assert_eq!(l.max_header_bytes, 1 << 20);
        assert_eq!(l.zstd_window_log_max, 24);
    }
}
