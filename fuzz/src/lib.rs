//! Checks shared by the fuzz targets (see `fuzz_targets/`) and the generator of their seed
//! corpus ([`seeds`]).
//!
//! A target only finds what it asserts. Beyond "no panic, no hang, no runaway allocation"
//! (libFuzzer's own checks), every decoded value is held to the invariants a relay relies on:
//! it re-encodes to the bytes it came from, the split header/body path (`spoke-transport`'s
//! `read_frame`) agrees with the one-shot decoder, bytes arriving in pieces decode to the same
//! frames as bytes arriving at once, and decoded records respect the limits they were decoded
//! under.

use bytes::{Bytes, BytesMut};
use spoke_proto::{
    decode_records, encode_records, Batch, BatchError, BatchLimits, Codec, DecodeError, Frame,
    FrameHeader, Limits, Record, HEADER_LEN,
};

pub mod connection;
pub mod seeds;
pub mod structured;

/// Frame cap small enough that fuzzed headers reach it often.
pub const TIGHT_FRAME_LIMITS: Limits = Limits {
    max_frame_bytes: 256,
};

/// The relay's default batch limits, except for the uncompressed cap: the logic does not depend
/// on the size, and 1 MiB keeps a zstd bomb from costing 64 MiB of writes per execution.
pub const FUZZ_BATCH_LIMITS: BatchLimits = BatchLimits {
    max_uncompressed_bytes: 1 << 20,
    max_records: 1_000_000,
    max_headers_per_record: 1024,
    max_header_bytes: 1 << 20,
    zstd_window_log_max: 24,
};

/// Batch caps small enough that fuzzed payloads reach every one of them.
pub const TIGHT_BATCH_LIMITS: BatchLimits = BatchLimits {
    max_uncompressed_bytes: 4096,
    max_records: 8,
    max_headers_per_record: 2,
    max_header_bytes: 64,
    zstd_window_log_max: 10,
};

/// How a stream of bytes ended after the frames that decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Everything from `consumed` on is an incomplete frame: read more.
    NeedMore { consumed: usize },
    /// The frame starting at `consumed` is refused.
    Error { consumed: usize, error: DecodeError },
}

/// What a reader makes of a byte stream: frames, then how it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub frames: Vec<Frame>,
    pub end: End,
}

/// Decodes `data` as a relay reads a stream: frames back to back until one is refused or the
/// bytes run out. Each step is checked against the split path, prefixes and re-encoding.
pub fn decode_stream(data: &[u8], limits: &Limits) -> Decoded {
    let mut frames = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &data[pos..];
        match Frame::decode(rest, limits) {
            Ok(Some((frame, used))) => {
                assert!(
                    (HEADER_LEN..=rest.len()).contains(&used),
                    "consumed {used} of {} bytes",
                    rest.len()
                );
                assert!(used - HEADER_LEN <= limits.max_frame_bytes as usize);
                check_frame(&frame, &rest[..used], limits);
                frames.push(frame);
                pos += used;
            }
            Ok(None) => {
                check_incomplete(rest, limits);
                return Decoded {
                    frames,
                    end: End::NeedMore { consumed: pos },
                };
            }
            Err(error) => {
                check_split_path_refuses(rest, limits, &error);
                return Decoded {
                    frames,
                    end: End::Error {
                        consumed: pos,
                        error,
                    },
                };
            }
        }
    }
}

/// The same stream fed to a receive buffer in pieces of 1 to 23 bytes (sizes drawn from the
/// data itself, so a failing input replays exactly), decoding after every piece: the
/// "need more bytes" path a relay takes while a frame is in flight.
pub fn decode_in_pieces(data: &[u8], limits: &Limits) -> Decoded {
    let mut rng = crc32fast::hash(data) | 1;
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut consumed = 0;
    let mut fed = 0;
    while fed < data.len() {
        // xorshift32: any cheap, deterministic spread of piece sizes will do.
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        let piece = 1 + (rng % 23) as usize;
        let next = data.len().min(fed + piece);
        buf.extend_from_slice(&data[fed..next]);
        fed = next;
        loop {
            match Frame::decode(&buf, limits) {
                Ok(Some((frame, used))) => {
                    frames.push(frame);
                    consumed += used;
                    let _ = buf.split_to(used);
                }
                Ok(None) => break,
                Err(error) => {
                    return Decoded {
                        frames,
                        end: End::Error { consumed, error },
                    }
                }
            }
        }
    }
    Decoded {
        frames,
        end: End::NeedMore { consumed },
    }
}

/// Everything checked on an arbitrary byte stream; the body of the `frame_decode` target.
pub fn check_stream(data: &[u8]) {
    let limits = Limits::default();
    let at_once = decode_stream(data, &limits);
    assert_eq!(
        decode_in_pieces(data, &limits),
        at_once,
        "piecewise decoding disagrees with one-shot decoding"
    );
    // A tighter cap may only stop the stream earlier, at a frame that exceeds it.
    let tight = decode_stream(data, &TIGHT_FRAME_LIMITS);
    match &tight.end {
        End::Error {
            error: DecodeError::FrameTooLarge { len, max },
            ..
        } => {
            assert!(len > max);
            assert_eq!(*max, TIGHT_FRAME_LIMITS.max_frame_bytes);
            assert!(tight.frames.len() <= at_once.frames.len());
            assert_eq!(tight.frames[..], at_once.frames[..tight.frames.len()]);
        }
        _ => assert_eq!(
            tight, at_once,
            "a tighter cap changed more than where it stops"
        ),
    }
}

/// One decoded frame against the bytes it came from.
fn check_frame(frame: &Frame, bytes: &[u8], limits: &Limits) {
    // Decoding is exact, so the encoding is canonical: a frame re-encodes to its own bytes.
    let encoded = frame.to_bytes().expect("a decoded frame encodes");
    assert_eq!(
        &encoded[..],
        bytes,
        "{} did not re-encode to its bytes",
        frame.name()
    );

    // spoke-transport reads the header, then exactly body_len bytes, then decodes the body.
    let (head, body) = bytes.split_at(HEADER_LEN);
    let head: &[u8; HEADER_LEN] = head.try_into().expect("12 bytes");
    let header = FrameHeader::decode(head, limits).expect("split path accepts the header");
    assert_eq!(header.body_len as usize, body.len());
    assert_eq!(
        Frame::decode_body(&header, Bytes::copy_from_slice(body)).as_ref(),
        Ok(frame)
    );

    // Any shorter prefix is "need more bytes", never an error or a different frame.
    for end in [
        0,
        1,
        HEADER_LEN - 1,
        HEADER_LEN,
        bytes.len() / 2,
        bytes.len() - 1,
    ] {
        if end < bytes.len() {
            assert_eq!(
                Frame::decode(&bytes[..end], limits),
                Ok(None),
                "prefix {end}"
            );
        }
    }

    if let Frame::Batch(batch) = frame {
        check_batch(batch);
    }
}

/// `Ok(None)` is only right when the header is incomplete, or valid with its body incomplete.
fn check_incomplete(rest: &[u8], limits: &Limits) {
    if let Some(head) = rest.first_chunk::<HEADER_LEN>() {
        let header = FrameHeader::decode(head, limits).expect("need-more with a bad header");
        assert!(rest.len() < HEADER_LEN + header.body_len as usize);
    }
}

/// The split path refuses the same frame with the same error.
fn check_split_path_refuses(rest: &[u8], limits: &Limits, error: &DecodeError) {
    let head = rest
        .first_chunk::<HEADER_LEN>()
        .expect("an error needs a whole header");
    match FrameHeader::decode(head, limits) {
        Err(e) => assert_eq!(&e, error),
        Ok(header) => {
            let body = rest
                .get(HEADER_LEN..HEADER_LEN + header.body_len as usize)
                .expect("a body error needs the whole body");
            assert_eq!(
                Frame::decode_body(&header, Bytes::copy_from_slice(body)).as_ref(),
                Err(error)
            );
        }
    }
}

/// What the relay does with a decoded batch: decode its records under its limits.
pub fn check_batch(batch: &Batch) {
    for limits in [FUZZ_BATCH_LIMITS, TIGHT_BATCH_LIMITS] {
        let direct = decode_records(
            batch.codec,
            batch.uncompressed_len,
            &batch.payload,
            batch.first_offset,
            batch.last_offset,
            batch.record_count,
            &limits,
        );
        assert_eq!(batch.records(&limits), direct, "Batch::records disagrees");
        match direct {
            Ok(records) => check_records(&records, batch, &limits),
            Err(e) => check_batch_error(&e, batch.codec, &limits),
        }
    }
}

/// Decoded records hold everything the batch header claims, within the limits.
pub fn check_records(records: &[Record], batch: &Batch, limits: &BatchLimits) {
    assert!(!records.is_empty());
    assert_eq!(records.len(), batch.record_count as usize);
    assert!(batch.record_count <= limits.max_records);
    assert!(batch.uncompressed_len <= limits.max_uncompressed_bytes);
    assert_eq!(records[0].offset, batch.first_offset);
    assert_eq!(records[records.len() - 1].offset, batch.last_offset);
    assert!(records.windows(2).all(|w| w[0].offset < w[1].offset));
    for r in records {
        assert!(r.headers.len() <= limits.max_headers_per_record as usize);
    }

    // Re-encoding is at most as long (the decoder accepts overlong varints, the encoder writes
    // the shortest form) and decodes to the same records.
    let plain = encode_records(records, Codec::None, 0).expect("decoded records encode");
    assert!(plain.uncompressed_len <= batch.uncompressed_len);
    assert_eq!(plain.first_offset, batch.first_offset);
    assert_eq!(plain.last_offset, batch.last_offset);
    assert_eq!(plain.record_count, batch.record_count);
    let again = decode_records(
        plain.codec,
        plain.uncompressed_len,
        &plain.payload,
        plain.first_offset,
        plain.last_offset,
        plain.record_count,
        limits,
    );
    assert_eq!(again.as_deref(), Ok(records));
}

/// A refusal names the limit that was actually configured.
pub fn check_batch_error(error: &BatchError, codec: Codec, limits: &BatchLimits) {
    match *error {
        BatchError::TooLarge { len, max } => {
            assert_eq!(max, u64::from(limits.max_uncompressed_bytes));
            assert!(len > max);
        }
        BatchError::TooManyRecords { count, max } => {
            assert_eq!(max, limits.max_records);
            assert!(count > u64::from(max));
        }
        BatchError::TooManyHeaders { count, max } => {
            assert_eq!(max, limits.max_headers_per_record);
            assert!(count > u64::from(max));
        }
        BatchError::HeadersTooLarge { len, max } => {
            assert_eq!(max, limits.max_header_bytes);
            assert!(len > u64::from(max));
        }
        BatchError::LengthMismatch { declared, actual } => {
            assert_ne!(u64::from(declared), actual);
            // Decompression stops one byte past the declaration: a bomb is never inflated.
            // (Uncompressed, `actual` is just the payload's length.)
            if codec == Codec::Zstd {
                assert!(actual <= u64::from(declared) + 1);
            }
        }
        _ => {}
    }
}

/// The protocol version that added the `Dictionary` frame: its layout version for ever, however
/// many versions come after.
const DICTIONARY_LAYOUT_VERSION: u8 = 2;

/// Wraps `body` in a valid header (type, length, CRC), so the body parsers see hostile input
/// instead of bouncing off the checksum.
pub fn frame_with_body(frame_type: u8, body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
    bytes.extend_from_slice(b"SK");
    // The header version is the frame layout's own: 2 for `Dictionary` (type 8), else 1. (A
    // dictionary batch body under version 1 is refused after parsing, which is fuzzed too.)
    bytes.push(if frame_type == 8 {
        DICTIONARY_LAYOUT_VERSION
    } else {
        spoke_proto::PROTOCOL_VERSION
    });
    bytes.push(frame_type);
    bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&crc32fast::hash(body).to_be_bytes());
    bytes.extend_from_slice(body);
    bytes
}

/// The `batch_decode` input: a fixed 36-byte prefix of batch header fields and limits, then the
/// payload. A plain layout rather than `arbitrary` so that seeds are easy to write by hand.
///
/// ```text
/// 0       flags: bit 0 = zstd codec
/// 1..5    uncompressed_len   u32 BE
/// 5..13   first_offset       i64 BE
/// 13..21  last_offset        i64 BE
/// 21..25  record_count       u32 BE
/// 25..29  max_uncompressed   u32 BE, capped at FUZZ_BATCH_LIMITS'
/// 29..33  max_records        u32 BE, capped at the default
/// 33..35  max_headers        u16 BE, capped at the default
/// 35      zstd_window_log_max = 10 + byte % 15 (10..=24, zstd's minimum to the default)
/// 36..    payload
/// ```
#[derive(Debug, Clone)]
pub struct BatchInput {
    pub batch: Batch,
    pub limits: BatchLimits,
}

/// Length of the fixed prefix of a [`BatchInput`].
pub const BATCH_INPUT_PREFIX: usize = 36;

impl BatchInput {
    pub fn parse(data: &[u8]) -> Option<BatchInput> {
        let (head, payload) = data.split_at_checked(BATCH_INPUT_PREFIX)?;
        let u32_at = |i: usize| u32::from_be_bytes(head[i..i + 4].try_into().expect("4"));
        let i64_at = |i: usize| i64::from_be_bytes(head[i..i + 8].try_into().expect("8"));
        let defaults = BatchLimits::default();
        Some(BatchInput {
            batch: Batch {
                seq: 0,
                topic: String::new(),
                partition: 0,
                partition_count: 1,
                first_offset: i64_at(5),
                last_offset: i64_at(13),
                next_offset: 0,
                record_count: u32_at(21),
                codec: if head[0] & 1 == 1 {
                    Codec::Zstd
                } else {
                    Codec::None
                },
                uncompressed_len: u32_at(1),
                payload: Bytes::copy_from_slice(payload),
            },
            limits: BatchLimits {
                max_uncompressed_bytes: u32_at(25).min(FUZZ_BATCH_LIMITS.max_uncompressed_bytes),
                max_records: u32_at(29).min(defaults.max_records),
                max_headers_per_record: u32::from(u16::from_be_bytes([head[33], head[34]]))
                    .min(defaults.max_headers_per_record),
                // Not taken from the input, so the committed corpus keeps its layout.
                max_header_bytes: defaults.max_header_bytes,
                zstd_window_log_max: 10 + u32::from(head[35] % 15),
            },
        })
    }

    /// The bytes [`BatchInput::parse`] reads back as `self` (for seeds).
    pub fn to_bytes(&self) -> Vec<u8> {
        let b = &self.batch;
        let mut out = vec![u8::from(b.codec == Codec::Zstd)];
        out.extend_from_slice(&b.uncompressed_len.to_be_bytes());
        out.extend_from_slice(&b.first_offset.to_be_bytes());
        out.extend_from_slice(&b.last_offset.to_be_bytes());
        out.extend_from_slice(&b.record_count.to_be_bytes());
        out.extend_from_slice(&self.limits.max_uncompressed_bytes.to_be_bytes());
        out.extend_from_slice(&self.limits.max_records.to_be_bytes());
        let headers = u16::try_from(self.limits.max_headers_per_record).unwrap_or(u16::MAX);
        out.extend_from_slice(&headers.to_be_bytes());
        out.push((self.limits.zstd_window_log_max.saturating_sub(10) % 15) as u8);
        out.extend_from_slice(&b.payload);
        out
    }
}

/// The body of the `batch_decode` target.
pub fn check_batch_input(data: &[u8]) {
    let Some(input) = BatchInput::parse(data) else {
        return;
    };
    let batch = &input.batch;
    let limits = &input.limits;
    let direct = decode_records(
        batch.codec,
        batch.uncompressed_len,
        &batch.payload,
        batch.first_offset,
        batch.last_offset,
        batch.record_count,
        limits,
    );
    assert_eq!(batch.records(limits), direct, "Batch::records disagrees");
    match direct {
        Ok(records) => check_records(&records, batch, limits),
        Err(e) => check_batch_error(&e, batch.codec, limits),
    }
}
