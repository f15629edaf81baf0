//! Frame round trips, golden bytes and hostile-header cases.

use bytes::{Bytes, BytesMut};
use spoke_proto::*;

fn all_frames() -> Vec<Frame> {
    vec![
        Frame::Hello(Hello {
            site: "plant-7".into(),
            min_version: 1,
            max_version: 1,
            software: "spoke-agent 0.1.0".into(),
            partitions: vec![
                TopicPartition {
                    topic: "sensors".into(),
                    partition: 0,
                },
                TopicPartition {
                    topic: "événements".into(),
                    partition: 11,
                },
            ],
        }),
        Frame::Welcome(Welcome {
            version: 1,
            relay: "hub-relay-1".into(),
            resume: vec![ResumePoint {
                topic: "sensors".into(),
                partition: 0,
                next_offset: 12_345,
            }],
        }),
        Frame::Batch(Batch {
            seq: u64::MAX,
            topic: "sensors".into(),
            partition: 3,
            partition_count: 12,
            first_offset: 100,
            last_offset: 199,
            next_offset: 200,
            record_count: 100,
            codec: Codec::Zstd,
            uncompressed_len: 4096,
            payload: Bytes::from_static(b"\x28\xb5\x2f\xfdnot really zstd"),
        }),
        Frame::Ack(Ack {
            seq: 7,
            next_offset: 200,
        }),
        Frame::Nack(Nack {
            seq: 8,
            code: NackCode::HubUnavailable,
            message: "broker down".into(),
        }),
        Frame::Nack(Nack {
            seq: 9,
            code: NackCode::Unknown(999),
            message: String::new(),
        }),
        Frame::Heartbeat(Heartbeat {
            sent_at_ms: 1_700_000_000_000,
            spool_bytes: 1 << 30,
            spool_max_bytes: 1 << 34,
            oldest_unacked_ms: 1500,
            lost_records: 0,
            records_per_s: 25_000,
            lag: vec![PartitionLag {
                topic: "sensors".into(),
                partition: 1,
                lag_records: 77,
            }],
        }),
        Frame::Heartbeat(Heartbeat::default()),
        Frame::Goodbye(Goodbye {
            code: GoodbyeCode::NotAuthorized,
            reason: "unknown site".into(),
        }),
        Frame::Dictionary(Dictionary {
            id: 3,
            dictionary: Bytes::from_static(b"\x37\xa4\x30\xec dictionary"),
        }),
        Frame::Rejected(Rejected {
            seq: 9,
            topic: "orders".into(),
            partition: 2,
            reason: "too_large".into(),
            ranges: vec![RejectedRange {
                first_offset: 40,
                last_offset: 42,
                records: 2,
            }],
        }),
        Frame::TopicConfig(TopicConfig {
            topic: "inventory".into(),
            entries: vec![
                ("cleanup.policy".into(), "compact".into()),
                ("min.compaction.lag.ms".into(), "60000".into()),
            ],
        }),
    ]
}

#[test]
fn every_variant_round_trips() {
    let limits = Limits::default();
    for frame in all_frames() {
        let bytes = frame.to_bytes().expect("encode");
        let (decoded, used) = Frame::decode(&bytes, &limits)
            .expect("decode")
            .expect("complete");
        assert_eq!(used, bytes.len(), "{}", frame.name());
        assert_eq!(decoded, frame);
    }
}

#[test]
fn frames_decode_back_to_back_from_one_buffer() {
    let limits = Limits::default();
    let frames = all_frames();
    let mut buf = BytesMut::new();
    for f in &frames {
        f.encode(&mut buf).expect("encode");
    }
    let mut rest = &buf[..];
    let mut decoded = Vec::new();
    while let Some((f, used)) = Frame::decode(rest, &limits).expect("decode") {
        decoded.push(f);
        rest = &rest[used..];
    }
    assert!(rest.is_empty());
    assert_eq!(decoded, frames);
}

/// The wire format must not drift silently: these bytes are what a peer of another build sends.
#[test]
fn golden_ack() {
    let bytes = Frame::Ack(Ack {
        seq: 1,
        next_offset: 42,
    })
    .to_bytes()
    .expect("encode");
    let expected: &[u8] = &[
        b'S', b'K', 1, 4, // magic, version, type Ack
        0, 0, 0, 16, // body length
        0x20, 0x7b, 0x96, 0xc0, // crc32 of body
        0, 0, 0, 0, 0, 0, 0, 1, // seq
        0, 0, 0, 0, 0, 0, 0, 42, // next_offset
    ];
    assert_eq!(&bytes[..], expected);
}

#[test]
fn golden_goodbye() {
    let bytes = Frame::Goodbye(Goodbye {
        code: GoodbyeCode::Shutdown,
        reason: "bye".into(),
    })
    .to_bytes()
    .expect("encode");
    let expected: &[u8] = &[
        b'S', b'K', 1, 7, 0, 0, 0, 7, 0xcc, 0xf3, 0xeb, 0x13, // header
        0, 1, // code Shutdown
        0, 3, b'b', b'y', b'e', // reason
    ];
    assert_eq!(&bytes[..], expected);
}

#[test]
fn header_rejections_are_typed() {
    let limits = Limits::default();
    let good = Frame::Ack(Ack {
        seq: 1,
        next_offset: 2,
    })
    .to_bytes()
    .expect("encode");
    let with = |i: usize, b: u8| {
        let mut v = good.to_vec();
        v[i] = b;
        v
    };
    assert_eq!(
        Frame::decode(&with(0, b'X'), &limits),
        Err(DecodeError::BadMagic)
    );
    assert_eq!(
        Frame::decode(&with(2, MAX_PROTOCOL_VERSION + 1), &limits),
        Err(DecodeError::UnsupportedVersion(MAX_PROTOCOL_VERSION + 1))
    );
    // Versions 2 and 3 are spoken, but an Ack's layout is version 1's.
    for version in [2, 3] {
        assert_eq!(
            Frame::decode(&with(2, version), &limits),
            Err(DecodeError::VersionMismatch {
                header: version,
                frame: 1
            })
        );
    }
    assert_eq!(
        Frame::decode(&with(3, 0), &limits),
        Err(DecodeError::UnknownFrameType(0))
    );
    assert_eq!(
        Frame::decode(&with(3, 200), &limits),
        Err(DecodeError::UnknownFrameType(200))
    );
}

#[test]
fn oversize_body_is_refused_from_the_header_alone() {
    // Only the header is present: the cap must fire before the body is awaited or allocated.
    let mut head = [0u8; HEADER_LEN];
    head[..4].copy_from_slice(&[b'S', b'K', PROTOCOL_VERSION, 3]);
    head[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    let limits = Limits {
        max_frame_bytes: 1024,
    };
    assert_eq!(
        Frame::decode(&head, &limits),
        Err(DecodeError::FrameTooLarge {
            len: u32::MAX,
            max: 1024
        })
    );
    assert_eq!(
        FrameHeader::decode(&head, &limits),
        Err(DecodeError::FrameTooLarge {
            len: u32::MAX,
            max: 1024
        })
    );
}

#[test]
fn decode_body_checks_exact_length_and_trailing_bytes() {
    let frame = Frame::Ack(Ack {
        seq: 1,
        next_offset: 2,
    });
    let bytes = frame.to_bytes().expect("encode");
    let head: &[u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().expect("12 bytes");
    let header = FrameHeader::decode(head, &Limits::default()).expect("header");
    let body = bytes.slice(HEADER_LEN..);
    assert_eq!(
        Frame::decode_body(&header, body.slice(..15)),
        Err(DecodeError::Truncated { what: "frame body" })
    );
    let mut long = body.to_vec();
    long.push(0);
    assert_eq!(
        Frame::decode_body(&header, Bytes::from(long.clone())),
        Err(DecodeError::TrailingBytes(1))
    );
    // A body with a valid checksum but an extra byte the Ack layout does not read.
    let lying = FrameHeader {
        body_len: 17,
        checksum: crc32fast::hash(&long),
        ..header
    };
    assert_eq!(
        Frame::decode_body(&lying, Bytes::from(long)),
        Err(DecodeError::TrailingBytes(1))
    );
    assert_eq!(Frame::decode_body(&header, body), Ok(frame));
}

#[test]
fn batch_payload_is_a_zero_copy_slice_of_the_body() {
    let frame = all_frames().swap_remove(2);
    let bytes = frame.to_bytes().expect("encode");
    let head: &[u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().expect("12 bytes");
    let header = FrameHeader::decode(head, &Limits::default()).expect("header");
    let body = bytes.slice(HEADER_LEN..);
    let range = body.as_ptr_range();
    let Ok(Frame::Batch(b)) = Frame::decode_body(&header, body) else {
        panic!("not a batch");
    };
    assert!(range.contains(&b.payload.as_ptr()));
}

#[test]
fn invalid_fields_are_typed_errors() {
    fn body_frame(frame_type: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![b'S', b'K', PROTOCOL_VERSION, frame_type];
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend_from_slice(&crc32fast::hash(body).to_be_bytes());
        v.extend_from_slice(body);
        v
    }
    let limits = Limits::default();
    // Goodbye with a reason that is not UTF-8.
    let bad_utf8 = body_frame(7, &[0, 1, 0, 2, 0xff, 0xfe]);
    assert_eq!(
        Frame::decode(&bad_utf8, &limits),
        Err(DecodeError::InvalidUtf8)
    );
    // Hello claiming 4 billion partitions in a tiny body: refused before allocating.
    let huge_list = body_frame(1, &[0, 0, 1, 1, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    assert_eq!(
        Frame::decode(&huge_list, &limits),
        Err(DecodeError::Truncated {
            what: "hello.partitions"
        })
    );
    // Batch with codec 9.
    let mut batch = all_frames()
        .swap_remove(2)
        .to_bytes()
        .expect("encode")
        .to_vec();
    let codec_at = HEADER_LEN + 8 + 2 + 7 + 4 + 4 + 8 + 8 + 8 + 4;
    batch[codec_at] = 9;
    let body = batch[HEADER_LEN..].to_vec();
    let batch = body_frame(3, &body);
    assert_eq!(
        Frame::decode(&batch, &limits),
        Err(DecodeError::UnknownCodec(9))
    );
}

#[test]
fn encode_refuses_overlong_strings_and_leaves_dst_untouched() {
    let mut dst = BytesMut::from(&b"prefix"[..]);
    let frame = Frame::Goodbye(Goodbye {
        code: GoodbyeCode::Shutdown,
        reason: "x".repeat(70_000),
    });
    assert_eq!(
        frame.encode(&mut dst),
        Err(EncodeError::StringTooLong {
            field: "goodbye.reason",
            len: 70_000
        })
    );
    assert_eq!(&dst[..], b"prefix");
}

#[test]
fn names() {
    let names: Vec<_> = all_frames().iter().map(Frame::name).collect();
    assert_eq!(
        names,
        [
            "Hello",
            "Welcome",
            "Batch",
            "Ack",
            "Nack",
            "Nack",
            "Heartbeat",
            "Heartbeat",
            "Goodbye",
            "Dictionary",
            "Rejected",
            "TopicConfig"
        ]
    );
}
