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

fn frame() -> impl Strategy<Value = Frame> {
    let hello = (
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
        });
    let welcome = (
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
        });
    let batch = (
        (any::<u64>(), text(), any::<i32>(), any::<i32>()),
        (any::<i64>(), any::<i64>(), any::<i64>(), any::<u32>()),
        (
            prop_oneof![Just(Codec::None), Just(Codec::Zstd)],
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
        );
    let ack = (any::<u64>(), any::<i64>())
        .prop_map(|(seq, next_offset)| Frame::Ack(Ack { seq, next_offset }));
    // Unknown codes only outside the named range: Unknown(1) would decode as NotAllowed.
    let nack_code = prop_oneof![
        Just(NackCode::NotAllowed),
        Just(NackCode::Malformed),
        Just(NackCode::HubUnavailable),
        Just(NackCode::Internal),
        Just(NackCode::Unknown(0)),
        (5u16..).prop_map(NackCode::Unknown),
    ];
    let nack = (any::<u64>(), nack_code, text())
        .prop_map(|(seq, code, message)| Frame::Nack(Nack { seq, code, message }));
    let heartbeat = (
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
        });
    let goodbye_code = prop_oneof![
        Just(GoodbyeCode::Shutdown),
        Just(GoodbyeCode::NotAuthorized),
        Just(GoodbyeCode::ProtocolError),
        Just(GoodbyeCode::Unknown(0)),
        (4u16..).prop_map(GoodbyeCode::Unknown),
    ];
    let goodbye =
        (goodbye_code, text()).prop_map(|(code, reason)| Frame::Goodbye(Goodbye { code, reason }));
    prop_oneof![hello, welcome, batch, ack, nack, heartbeat, goodbye]
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
    fn unknown_version_and_type_are_typed(frame in frame(), version in 2u8.., frame_type in 8u8..) {
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
        let mut z = bytes;
        z[3] = 0;
        prop_assert_eq!(Frame::decode(&z, &Limits::default()), Err(DecodeError::UnknownFrameType(0)));
    }

    #[test]
    fn random_bytes_never_panic_the_frame_decoder(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Frame::decode(&bytes, &Limits::default());
    }

    /// Random bodies behind a valid header and checksum, so the body parsers see hostile input
    /// rather than bouncing off the CRC.
    #[test]
    fn random_bodies_never_panic_the_body_parsers(
        frame_type in 1u8..=7, body in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut bytes = vec![b'S', b'K', PROTOCOL_VERSION, frame_type];
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
}
