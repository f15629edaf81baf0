//! Structured inputs for the `roundtrip` target: frames and records built from the fuzzer's
//! bytes with `arbitrary`, so every input is a valid value and the target checks
//! decode(encode(x)) == x instead of mostly exercising refusals.
//!
//! spoke-proto's types do not derive `Arbitrary` (the library should not depend on a fuzzing
//! crate), so they are assembled field by field here.

use arbitrary::{Result, Unstructured};
use bytes::Bytes;
use spoke_proto::{
    encode_records, Ack, Batch, BatchLimits, Codec, Frame, Goodbye, GoodbyeCode, Header, Heartbeat,
    Hello, Limits, Nack, NackCode, PartitionLag, Record, ResumePoint, TopicPartition, Welcome,
};

use crate::{check_batch_error, check_stream};

fn text(u: &mut Unstructured) -> Result<String> {
    u.arbitrary()
}

fn bytes(u: &mut Unstructured) -> Result<Bytes> {
    Ok(Bytes::from(u.arbitrary::<Vec<u8>>()?))
}

fn nullable(u: &mut Unstructured) -> Result<Option<Bytes>> {
    if u.arbitrary()? {
        bytes(u).map(Some)
    } else {
        Ok(None)
    }
}

fn codec(u: &mut Unstructured) -> Result<Codec> {
    Ok(if u.arbitrary()? {
        Codec::Zstd
    } else {
        Codec::None
    })
}

/// Named codes, or an unknown one outside the named range (Unknown(1) would decode as a
/// named code, which is the canonical form, not a round-trip failure).
fn nack_code(u: &mut Unstructured) -> Result<NackCode> {
    Ok(match u.arbitrary::<u16>()? {
        1 => NackCode::NotAllowed,
        2 => NackCode::Malformed,
        3 => NackCode::HubUnavailable,
        4 => NackCode::Internal,
        other => NackCode::Unknown(other),
    })
}

fn goodbye_code(u: &mut Unstructured) -> Result<GoodbyeCode> {
    Ok(match u.arbitrary::<u16>()? {
        1 => GoodbyeCode::Shutdown,
        2 => GoodbyeCode::NotAuthorized,
        3 => GoodbyeCode::ProtocolError,
        other => GoodbyeCode::Unknown(other),
    })
}

pub fn frame(u: &mut Unstructured) -> Result<Frame> {
    Ok(match u.int_in_range(0u8..=6)? {
        0 => Frame::Hello(Hello {
            site: text(u)?,
            min_version: u.arbitrary()?,
            max_version: u.arbitrary()?,
            software: text(u)?,
            partitions: u
                .arbitrary_iter::<(String, i32)>()?
                .map(|p| p.map(|(topic, partition)| TopicPartition { topic, partition }))
                .collect::<Result<_>>()?,
        }),
        1 => Frame::Welcome(Welcome {
            version: u.arbitrary()?,
            relay: text(u)?,
            resume: u
                .arbitrary_iter::<(String, i32, i64)>()?
                .map(|p| {
                    p.map(|(topic, partition, next_offset)| ResumePoint {
                        topic,
                        partition,
                        next_offset,
                    })
                })
                .collect::<Result<_>>()?,
        }),
        2 => Frame::Batch(Batch {
            seq: u.arbitrary()?,
            topic: text(u)?,
            partition: u.arbitrary()?,
            partition_count: u.arbitrary()?,
            first_offset: u.arbitrary()?,
            last_offset: u.arbitrary()?,
            next_offset: u.arbitrary()?,
            record_count: u.arbitrary()?,
            codec: codec(u)?,
            uncompressed_len: u.arbitrary()?,
            payload: bytes(u)?,
        }),
        3 => Frame::Ack(Ack {
            seq: u.arbitrary()?,
            next_offset: u.arbitrary()?,
        }),
        4 => Frame::Nack(Nack {
            seq: u.arbitrary()?,
            code: nack_code(u)?,
            message: text(u)?,
        }),
        5 => Frame::Heartbeat(Heartbeat {
            sent_at_ms: u.arbitrary()?,
            spool_bytes: u.arbitrary()?,
            spool_max_bytes: u.arbitrary()?,
            oldest_unacked_ms: u.arbitrary()?,
            lost_records: u.arbitrary()?,
            records_per_s: u.arbitrary()?,
            lag: u
                .arbitrary_iter::<(String, i32, u64)>()?
                .map(|p| {
                    p.map(|(topic, partition, lag_records)| PartitionLag {
                        topic,
                        partition,
                        lag_records,
                    })
                })
                .collect::<Result<_>>()?,
        }),
        _ => Frame::Goodbye(Goodbye {
            code: goodbye_code(u)?,
            reason: text(u)?,
        }),
    })
}

/// One to 64 records with strictly increasing offsets (a start and positive deltas, stopping
/// before i64 overflows).
pub fn records(u: &mut Unstructured) -> Result<Vec<Record>> {
    let mut offset: i64 = u.arbitrary()?;
    let count = u.int_in_range(1usize..=64)?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        if i > 0 {
            let delta = u.int_in_range(1u64..=u64::MAX)?;
            match offset.checked_add_unsigned(delta) {
                Some(next) => offset = next,
                None => break,
            }
        }
        let mut headers = Vec::new();
        for _ in 0..u.int_in_range(0u8..=4)? {
            headers.push(Header {
                key: text(u)?,
                value: nullable(u)?,
            });
        }
        out.push(Record {
            offset,
            timestamp: u.arbitrary()?,
            key: nullable(u)?,
            value: nullable(u)?,
            headers,
        });
    }
    Ok(out)
}

/// The body of the `roundtrip` target.
pub fn check_roundtrip(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let frame = frame(&mut u)?;
    // Strings over 64 KiB do not fit the wire; that refusal is tested in proto.
    if let Ok(bytes) = frame.to_bytes() {
        assert_eq!(
            Frame::decode(&bytes, &Limits::default()),
            Ok(Some((frame.clone(), bytes.len())))
        );
        check_stream(&bytes);
    }

    let records = records(&mut u)?;
    let codec = codec(&mut u)?;
    let level = u.int_in_range(-3..=3)?;
    let chunk = encode_records(&records, codec, level).expect("valid records encode");
    let decode = |limits: &BatchLimits| {
        spoke_proto::decode_records(
            chunk.codec,
            chunk.uncompressed_len,
            &chunk.payload,
            chunk.first_offset,
            chunk.last_offset,
            chunk.record_count,
            limits,
        )
    };
    assert_eq!(decode(&BatchLimits::default()), Ok(records.clone()));

    // Under tight caps an uncompressed chunk decodes exactly when it is within every cap.
    // (With zstd the window the compressor picked also counts, which this does not model.)
    let tight = crate::TIGHT_BATCH_LIMITS;
    let result = decode(&tight);
    if codec == Codec::None {
        let within = chunk.uncompressed_len <= tight.max_uncompressed_bytes
            && chunk.record_count <= tight.max_records
            && records.iter().all(|r| {
                let header_bytes: usize = r
                    .headers
                    .iter()
                    .map(|h| h.key.len() + h.value.as_ref().map_or(0, |v| v.len()))
                    .sum();
                r.headers.len() <= tight.max_headers_per_record as usize
                    && header_bytes <= tight.max_header_bytes as usize
            });
        assert_eq!(result.is_ok(), within, "{result:?}");
    }
    match result {
        Ok(decoded) => assert_eq!(decoded, records),
        Err(e) => check_batch_error(&e, codec, &tight),
    }
    Ok(())
}
