//! Property tests: round trips, and that no input makes a decoder panic.

use bytes::Bytes;
use proptest::prelude::*;
use spoke_proto::*;

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

fn topic_partition() -> impl Strategy<Value = TopicPartition> {
    (text(), any::<i32>()).prop_map(|(topic, partition)| TopicPartition { topic, partition })
}

/// Any frame, each frame type equally likely.
fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        hello_frame(),
        welcome_frame(),
        batch_frame(),
        ack_frame(),
        nack_frame(),
        heartbeat_frame(),
        goodbye_frame(),
        dictionary_frame(),
        rejected_frame(),
        topic_config_frame()
    ]
}

fn hello_frame() -> impl Strategy<Value = Frame> {
    (
        text(),
        any::<u8>(),
        any::<u8>(),
        text(),
        prop::collection::vec(topic_partition(), 0..4),
    )
        .prop_map(|(site, min_version, max_version, software, partitions)| {
            Frame::Hello(Hello {
                site,
                min_version,
                max_version,
                software,
                partitions,
            })
        })
}

fn welcome_frame() -> impl Strategy<Value = Frame> {
    (
        any::<u8>(),
        text(),
        prop::collection::vec((text(), any::<i32>(), any::<i64>()), 0..4),
    )
        .prop_map(|(version, relay, resume)| {
            Frame::Welcome(Welcome {
                version,
                relay,
                resume: resume
                    .into_iter()
                    .map(|(topic, partition, next_offset)| ResumePoint {
                        topic,
                        partition,
                        next_offset,
                    })
                    .collect(),
            })
        })
}

/// Every codec a batch frame can name, a dictionary's among them (the payload is not
/// decoded, so it need not match).
fn batch_codec() -> impl Strategy<Value = Codec> {
    prop_oneof![
        Just(Codec::None),
        Just(Codec::Zstd),
        any::<u32>().prop_map(Codec::ZstdDict)
    ]
}

fn batch_frame() -> impl Strategy<Value = Frame> {
    (
        (any::<u64>(), text(), any::<i32>(), any::<i32>()),
        (any::<i64>(), any::<i64>(), any::<i64>(), any::<u32>()),
        (
            batch_codec(),
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..64),
        ),
    )
        .prop_map(
            |(
                (seq, topic, partition, partition_count),
                (first_offset, last_offset, next_offset, record_count),
                (codec, uncompressed_len, payload),
            )| {
                Frame::Batch(Batch {
                    seq,
                    topic,
                    partition,
                    partition_count,
                    first_offset,
                    last_offset,
                    next_offset,
                    record_count,
                    codec,
                    uncompressed_len,
                    payload: Bytes::from(payload),
                })
            },
        )
}

fn ack_frame() -> impl Strategy<Value = Frame> {
    (any::<u64>(), any::<i64>()).prop_map(|(seq, next_offset)| Frame::Ack(Ack { seq, next_offset }))
}

/// Unknown codes only outside the named range: Unknown(1) would decode as NotAllowed.
fn nack_code() -> impl Strategy<Value = NackCode> {
    prop_oneof![
        Just(NackCode::NotAllowed),
        Just(NackCode::Malformed),
        Just(NackCode::HubUnavailable),
        Just(NackCode::Internal),
        Just(NackCode::Unknown(0)),
        (5u16..).prop_map(NackCode::Unknown),
    ]
}

fn nack_frame() -> impl Strategy<Value = Frame> {
    (any::<u64>(), nack_code(), text())
        .prop_map(|(seq, code, message)| Frame::Nack(Nack { seq, code, message }))
}

fn heartbeat_frame() -> impl Strategy<Value = Frame> {
    (
        prop::array::uniform6(any::<u64>()),
        prop::collection::vec((text(), any::<i32>(), any::<u64>()), 0..4),
    )
        .prop_map(|([a, b, c, d, e, f], lag)| {
            Frame::Heartbeat(Heartbeat {
                sent_at_ms: a,
                spool_bytes: b,
                spool_max_bytes: c,
                oldest_unacked_ms: d,
                lost_records: e,
                records_per_s: f,
                lag: lag
                    .into_iter()
                    .map(|(topic, partition, lag_records)| PartitionLag {
                        topic,
                        partition,
                        lag_records,
                    })
                    .collect(),
            })
        })
}

/// Unknown codes only outside the named range, as for [`nack_code`].
fn goodbye_code() -> impl Strategy<Value = GoodbyeCode> {
    prop_oneof![
        Just(GoodbyeCode::Shutdown),
        Just(GoodbyeCode::NotAuthorized),
        Just(GoodbyeCode::ProtocolError),
        Just(GoodbyeCode::Unknown(0)),
        (4u16..).prop_map(GoodbyeCode::Unknown),
    ]
}

fn goodbye_frame() -> impl Strategy<Value = Frame> {
    (goodbye_code(), text()).prop_map(|(code, reason)| Frame::Goodbye(Goodbye { code, reason }))
}

fn dictionary_frame() -> impl Strategy<Value = Frame> {
    (any::<u32>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(id, dictionary)| {
        Frame::Dictionary(Dictionary {
            id,
            dictionary: Bytes::from(dictionary),
        })
    })
}

fn rejected_frame() -> impl Strategy<Value = Frame> {
    (
        any::<u64>(),
        text(),
        any::<i32>(),
        text(),
        prop::collection::vec((any::<i64>(), any::<i64>(), any::<u32>()), 0..8),
    )
        .prop_map(|(seq, topic, partition, reason, ranges)| {
            Frame::Rejected(Rejected {
                seq,
                topic,
                partition,
                reason,
                ranges: ranges
                    .into_iter()
                    .map(|(first_offset, last_offset, records)| RejectedRange {
                        first_offset,
                        last_offset,
                        records,
                    })
                    .collect(),
            })
        })
}

fn topic_config_frame() -> impl Strategy<Value = Frame> {
    (text(), prop::collection::vec((text(), text()), 0..8))
        .prop_map(|(topic, entries)| Frame::TopicConfig(TopicConfig { topic, entries }))
}

fn nullable() -> impl Strategy<Value = Option<Bytes>> {
    prop::option::of(prop::collection::vec(any::<u8>(), 0..16).prop_map(Bytes::from))
}

fn records() -> impl Strategy<Value = Vec<Record>> {
    let parts = (
        prop::option::of(any::<i64>()),
        nullable(),
        nullable(),
        prop::collection::vec(
            (text(), nullable()).prop_map(|(key, value)| Header { key, value }),
            0..3,
        ),
    );
    (
        prop::collection::btree_set(any::<i64>(), 1..12),
        prop::collection::vec(parts, 12),
    )
        .prop_map(|(offsets, parts)| {
            offsets
                .into_iter()
                .zip(parts)
                .map(|(offset, (timestamp, key, value, headers))| Record {
                    offset,
                    timestamp,
                    key,
                    value,
                    headers,
                })
                .collect()
        })
}

fn codec() -> impl Strategy<Value = Codec> {
    prop_oneof![Just(Codec::None), Just(Codec::Zstd)]
}

/// Caps small enough that generated batches cross each of them.
fn tight_limits() -> impl Strategy<Value = BatchLimits> {
    (0u32..2048, 1u32..12, 0u32..3, 0u32..64, 10u32..=24).prop_map(
        |(
            max_uncompressed_bytes,
            max_records,
            max_headers_per_record,
            max_header_bytes,
            zstd_window_log_max,
        )| {
            BatchLimits {
                max_uncompressed_bytes,
                max_records,
                max_headers_per_record,
                max_header_bytes,
                zstd_window_log_max,
            }
        },
    )
}

/// Whether decoded records respect `limits`; `section_len` is the uncompressed length.
fn within(records: &[Record], section_len: u32, limits: &BatchLimits) -> bool {
    section_len <= limits.max_uncompressed_bytes
        && records.len() <= limits.max_records as usize
        && records.iter().all(|r| {
            let header_bytes: usize = r
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.as_ref().map_or(0, |v| v.len()))
                .sum();
            r.headers.len() <= limits.max_headers_per_record as usize
                && header_bytes <= limits.max_header_bytes as usize
        })
}

/// A refusal for exceeding a limit names the configured cap and a value above it.
fn is_limit_error(e: &BatchError, limits: &BatchLimits) -> bool {
    match *e {
        BatchError::TooLarge { len, max } => {
            max == u64::from(limits.max_uncompressed_bytes) && len > max
        }
        BatchError::TooManyRecords { count, max } => {
            max == limits.max_records && count > u64::from(max)
        }
        BatchError::TooManyHeaders { count, max } => {
            max == limits.max_headers_per_record && count > u64::from(max)
        }
        BatchError::HeadersTooLarge { len, max } => {
            max == limits.max_header_bytes && len > u64::from(max)
        }
        _ => false,
    }
}

proptest! {
    #[test]
    fn frames_round_trip(frame in frame()) {
        let bytes = frame.to_bytes().expect("encode");
        let decoded = Frame::decode(&bytes, &Limits::default());
        prop_assert_eq!(decoded, Ok(Some((frame, bytes.len()))));
    }

    #[test]
    fn every_prefix_needs_more_bytes(frame in frame()) {
        let bytes = frame.to_bytes().expect("encode");
        for end in 0..bytes.len() {
            prop_assert_eq!(Frame::decode(&bytes[..end], &Limits::default()), Ok(None));
        }
    }

    #[test]
    fn any_flipped_body_byte_fails_the_checksum(
        frame in frame(), pos in any::<prop::sample::Index>(), mask in 1u8..,
    ) {
        let mut bytes = frame.to_bytes().expect("encode").to_vec();
        let body_len = bytes.len() - HEADER_LEN;
        prop_assume!(body_len > 0);
        bytes[HEADER_LEN + pos.index(body_len)] ^= mask;
        prop_assert_eq!(
            Frame::decode(&bytes, &Limits::default()),
            Err(DecodeError::ChecksumMismatch)
        );
    }

    #[test]
    fn oversize_length_is_refused(max in 0u32..1 << 20, extra in 1u32..1 << 20, frame_type in 1u8..=7) {
        let len = max + extra;
        let mut head = vec![b'S', b'K', PROTOCOL_VERSION, frame_type];
        head.extend_from_slice(&len.to_be_bytes());
        head.extend_from_slice(&[0; 4]);
        let limits = Limits { max_frame_bytes: max };
        prop_assert_eq!(
            Frame::decode(&head, &limits),
            Err(DecodeError::FrameTooLarge { len, max })
        );
    }

    #[test]
    fn unknown_version_and_type_are_typed(
        frame in frame(), version in MAX_PROTOCOL_VERSION + 1.., frame_type in 11u8..,
    ) {
        let bytes = frame.to_bytes().expect("encode").to_vec();
        let mut v = bytes.clone();
        v[2] = version;
        prop_assert_eq!(
            Frame::decode(&v, &Limits::default()),
            Err(DecodeError::UnsupportedVersion(version))
        );
        let mut t = bytes.clone();
        t[3] = frame_type;
        prop_assert_eq!(
            Frame::decode(&t, &Limits::default()),
            Err(DecodeError::UnknownFrameType(frame_type))
        );
        let mut z = bytes.clone();
        z[3] = 0;
        prop_assert_eq!(Frame::decode(&z, &Limits::default()), Err(DecodeError::UnknownFrameType(0)));
        // Every frame has exactly one header version: the other known one is refused.
        let mut other = bytes;
        let own = frame.version();
        let flipped = if own == 1 { 2 } else { 1 };
        other[2] = flipped;
        let refused = Frame::decode(&other, &Limits::default());
        match frame {
            // Version 1 does not define these frame types at all.
            Frame::Dictionary(_) => prop_assert_eq!(refused, Err(DecodeError::UnknownFrameType(8))),
            Frame::Rejected(_) => prop_assert_eq!(refused, Err(DecodeError::UnknownFrameType(9))),
            Frame::TopicConfig(_) => prop_assert_eq!(refused, Err(DecodeError::UnknownFrameType(10))),
            _ => prop_assert_eq!(refused, Err(DecodeError::VersionMismatch { header: flipped, frame: own })),
        }
    }

    #[test]
    fn random_bytes_never_panic_the_frame_decoder(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Frame::decode(&bytes, &Limits::default());
    }

    /// Random bodies behind a valid header and checksum, so the body parsers see hostile input
    /// rather than bouncing off the CRC.
    #[test]
    fn random_bodies_never_panic_the_body_parsers(
        frame_type in 1u8..=10, version in PROTOCOL_VERSION..=MAX_PROTOCOL_VERSION,
        body in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut bytes = vec![b'S', b'K', version, frame_type];
        bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        bytes.extend_from_slice(&body);
        let _ = Frame::decode(&bytes, &Limits::default());
    }

    #[test]
    fn records_round_trip(records in records(), codec in codec()) {
        let chunk = encode_records(&records, codec, 1).expect("encode");
        prop_assert_eq!(chunk.first_offset, records[0].offset);
        prop_assert_eq!(chunk.record_count as usize, records.len());
        let decoded = decode_records(
            chunk.codec, chunk.uncompressed_len, &chunk.payload,
            chunk.first_offset, chunk.last_offset, chunk.record_count,
            &BatchLimits::default(),
        );
        prop_assert_eq!(decoded, Ok(records));
    }

    #[test]
    fn random_payloads_never_panic_the_record_decoder(
        payload in prop::collection::vec(any::<u8>(), 0..256),
        codec in codec(),
        uncompressed_len in 0u32..1 << 16,
        first in any::<i64>(), last in any::<i64>(), count in any::<u32>(),
    ) {
        let limits = BatchLimits::default();
        let _ = decode_records(codec, uncompressed_len, &payload, first, last, count, &limits);
        // With the length matching, the plain-codec parser sees the random bytes themselves.
        let _ = decode_records(Codec::None, payload.len() as u32, &payload, first, last, count, &limits);
    }

    /// Corrupting a valid section exercises deeper parser paths than random bytes reach.
    #[test]
    fn corrupted_sections_never_panic(
        records in records(), pos in any::<prop::sample::Index>(), byte in any::<u8>(),
    ) {
        let chunk = encode_records(&records, Codec::None, 0).expect("encode");
        let mut section = chunk.payload.to_vec();
        let i = pos.index(section.len());
        section[i] = byte;
        let _ = decode_records(
            Codec::None, chunk.uncompressed_len, &section,
            chunk.first_offset, chunk.last_offset, chunk.record_count,
            &BatchLimits::default(),
        );
    }

    /// Valid chunks under random caps: an uncompressed chunk decodes exactly when it is within
    /// every cap, and is otherwise refused with the cap it crossed. With zstd the compressor's
    /// window also counts, so a refusal may instead be the window cap.
    #[test]
    fn valid_chunks_decode_exactly_when_within_limits(
        records in records(), codec in codec(), limits in tight_limits(),
    ) {
        let chunk = encode_records(&records, codec, 1).expect("encode");
        let result = decode_records(
            chunk.codec, chunk.uncompressed_len, &chunk.payload,
            chunk.first_offset, chunk.last_offset, chunk.record_count, &limits,
        );
        let fits = within(&records, chunk.uncompressed_len, &limits);
        match (&result, codec) {
            (Ok(decoded), _) => {
                prop_assert!(fits);
                prop_assert_eq!(decoded, &records);
            }
            (Err(e), Codec::None) => {
                prop_assert!(!fits);
                prop_assert!(is_limit_error(e, &limits), "{:?}", e);
            }
            (Err(e), Codec::Zstd) => prop_assert!(
                (!fits && is_limit_error(e, &limits)) || matches!(e, BatchError::Decompress(_)),
                "{:?}", e
            ),
            // codec() yields no dictionary codec; tests/dictionary.rs covers it.
            (Err(e), Codec::ZstdDict(_)) => prop_assert!(false, "{:?}", e),
        }
    }

    /// Random bytes as a real zstd frame (random bytes alone almost never get past the zstd
    /// header) and as a plain section, under random caps and declared fields: whatever decodes
    /// respects the caps.
    #[test]
    fn random_sections_never_exceed_random_limits(
        section in prop::collection::vec(any::<u8>(), 0..512),
        compress in any::<bool>(),
        declared_delta in -2i64..=2,
        limits in tight_limits(),
        first in -2i64..=2, span in 0i64..8, count in 1u32..12,
    ) {
        let (codec, payload) = if compress {
            (Codec::Zstd, zstd::bulk::compress(&section, 1).expect("compress"))
        } else {
            (Codec::None, section.clone())
        };
        let declared = u32::try_from((section.len() as i64 + declared_delta).max(0)).expect("fits");
        let result = decode_records(codec, declared, &payload, first, first + span, count, &limits);
        match result {
            Ok(records) => {
                prop_assert_eq!(declared as usize, section.len());
                prop_assert!(within(&records, declared, &limits));
                prop_assert_eq!(records.len(), count as usize);
                prop_assert_eq!(records[0].offset, first);
                prop_assert_eq!(records[records.len() - 1].offset, first + span);
            }
            // Decompression stops one byte past the declaration.
            Err(BatchError::LengthMismatch { declared: d, actual }) if codec == Codec::Zstd => {
                prop_assert_eq!(d, declared);
                prop_assert_eq!(actual, (section.len() as u64).min(u64::from(declared) + 1));
            }
            Err(_) => {}
        }
    }

    /// A zstd bomb of any size declared smaller than it inflates is refused one byte past the
    /// declaration, never inflated further.
    #[test]
    fn zstd_bombs_stop_one_byte_past_the_declaration(
        inflated in 1usize..(1 << 20), declared in 0u32..4096, byte in any::<u8>(),
    ) {
        prop_assume!((declared as usize) < inflated);
        let payload = zstd::bulk::compress(&vec![byte; inflated], 3).expect("compress");
        prop_assert_eq!(
            decode_records(Codec::Zstd, declared, &payload, 0, 0, 1, &BatchLimits::default()),
            Err(BatchError::LengthMismatch { declared, actual: u64::from(declared) + 1 })
        );
    }
}
