//! Record chunk round trips, validation and decompression-bomb defences.

use bytes::Bytes;
use spoke_proto::*;
use zstd::zstd_safe::CParameter;

fn b(s: &[u8]) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(s))
}

fn tricky_records() -> Vec<Record> {
    vec![
        Record {
            offset: 10,
            timestamp: Some(1_700_000_000_000),
            key: None,
            value: b(b"hello"),
            headers: vec![],
        },
        Record {
            offset: 11,
            timestamp: None,
            key: b(b""),
            value: b(b""),
            headers: vec![
                Header {
                    key: "trace".into(),
                    value: b(&[0, 0xff, 0x80, 7]),
                },
                Header {
                    key: "trace".into(),
                    value: None,
                },
                Header {
                    key: String::new(),
                    value: b(b""),
                },
            ],
        },
        Record {
            offset: 15,
            timestamp: Some(-1),
            key: b(b"k"),
            value: None,
            headers: vec![],
        },
        Record {
            offset: 16,
            timestamp: Some(i64::MIN),
            key: b(&[0xde, 0xad]),
            value: Some(Bytes::from(vec![0xab; 1 << 20])),
            headers: vec![],
        },
        Record {
            offset: i64::MAX,
            timestamp: Some(i64::MAX),
            key: None,
            value: None,
            headers: vec![],
        },
    ]
}

fn decode(chunk: &EncodedChunk, limits: &BatchLimits) -> Result<Vec<Record>, BatchError> {
    decode_records(
        chunk.codec,
        chunk.uncompressed_len,
        &chunk.payload,
        chunk.first_offset,
        chunk.last_offset,
        chunk.record_count,
        limits,
    )
}

#[test]
fn records_round_trip_with_both_codecs() {
    let records = tricky_records();
    for codec in [Codec::None, Codec::Zstd] {
        let chunk = encode_records(&records, codec, 3).expect("encode");
        assert_eq!(chunk.codec, codec);
        assert_eq!(chunk.record_count, 5);
        assert_eq!(chunk.first_offset, 10);
        assert_eq!(chunk.last_offset, i64::MAX);
        if codec == Codec::Zstd {
            assert!(chunk.payload.len() < 10_000, "1 MiB of 0xab compresses");
        } else {
            assert_eq!(chunk.payload.len(), chunk.uncompressed_len as usize);
        }
        assert_eq!(decode(&chunk, &BatchLimits::default()), Ok(records.clone()));
    }
}

#[test]
fn batch_frame_records_round_trip() {
    let records = tricky_records();
    let chunk = encode_records(&records, Codec::Zstd, 1).expect("encode");
    let frame = Frame::Batch(Batch {
        seq: 1,
        topic: "t".into(),
        partition: 0,
        partition_count: 1,
        first_offset: chunk.first_offset,
        last_offset: chunk.last_offset,
        next_offset: i64::MAX,
        record_count: chunk.record_count,
        codec: chunk.codec,
        uncompressed_len: chunk.uncompressed_len,
        payload: chunk.payload,
    });
    let bytes = frame.to_bytes().expect("encode");
    let Some((Frame::Batch(batch), _)) = Frame::decode(&bytes, &Limits::default()).expect("ok")
    else {
        panic!("not a batch");
    };
    assert_eq!(batch.records(&BatchLimits::default()), Ok(records));
}

#[test]
fn builder_tracks_state_and_resets() {
    let mut builder = ChunkBuilder::new();
    assert!(builder.is_empty());
    assert_eq!(builder.finish(Codec::None, 0), Err(BatchError::Empty));
    builder
        .push(5, Some(1), Some(b"k"), Some(b"v"), &[("h", Some(b"x"))])
        .expect("push");
    builder.push(9, None, None, None, &[]).expect("push");
    assert_eq!(
        builder.push(9, None, None, None, &[]),
        Err(BatchError::OffsetOrder { prev: 9, next: 9 })
    );
    assert_eq!(
        builder.push(3, None, None, None, &[]),
        Err(BatchError::OffsetOrder { prev: 9, next: 3 })
    );
    assert_eq!(builder.record_count(), 2);
    assert_eq!(builder.first_offset(), Some(5));
    assert_eq!(builder.last_offset(), Some(9));
    let len = builder.uncompressed_len();
    let chunk = builder.finish(Codec::Zstd, 3).expect("finish");
    assert_eq!(chunk.uncompressed_len as usize, len);
    assert!(builder.is_empty());
    assert_eq!(builder.first_offset(), None);
    assert_eq!(builder.uncompressed_len(), 0);
    // Reuse after finish starts a fresh chunk; offsets may go anywhere.
    builder.push(1, None, None, None, &[]).expect("push");
    let second = builder.finish(Codec::None, 0).expect("finish");
    assert_eq!(second.first_offset, 1);
    assert_eq!(second.record_count, 1);
}

#[test]
fn empty_input_is_refused() {
    assert_eq!(encode_records(&[], Codec::Zstd, 3), Err(BatchError::Empty));
    assert_eq!(
        decode_records(Codec::None, 0, &[], 0, 0, 0, &BatchLimits::default()),
        Err(BatchError::Empty)
    );
}

#[test]
fn header_fields_must_agree_with_the_records() {
    let records = tricky_records();
    let chunk = encode_records(&records[..3], Codec::None, 0).expect("encode");
    let limits = BatchLimits::default();
    let with = |first: i64, last: i64, count: u32| {
        decode_records(
            Codec::None,
            chunk.uncompressed_len,
            &chunk.payload,
            first,
            last,
            count,
            &limits,
        )
    };
    assert_eq!(
        with(9, 15, 3),
        Err(BatchError::OffsetMismatch(
            "first record's offset differs from first_offset"
        ))
    );
    assert_eq!(
        with(10, 16, 3),
        Err(BatchError::OffsetMismatch(
            "last record's offset differs from last_offset"
        ))
    );
    assert_eq!(
        with(10, 15, 2),
        Err(BatchError::CountMismatch {
            declared: 2,
            actual: 3
        })
    );
    assert_eq!(
        with(16, 15, 3),
        Err(BatchError::OffsetMismatch(
            "first_offset is after last_offset"
        ))
    );
    assert_eq!(
        decode_records(
            Codec::None,
            chunk.uncompressed_len - 1,
            &chunk.payload,
            10,
            15,
            3,
            &limits
        ),
        Err(BatchError::LengthMismatch {
            declared: chunk.uncompressed_len - 1,
            actual: u64::from(chunk.uncompressed_len)
        })
    );
    let tight = BatchLimits {
        max_records: 2,
        ..limits
    };
    assert_eq!(
        decode(&chunk, &tight),
        Err(BatchError::TooManyRecords { count: 3, max: 2 })
    );
    let few_headers = BatchLimits {
        max_headers_per_record: 2,
        ..limits
    };
    assert_eq!(
        decode(&chunk, &few_headers),
        Err(BatchError::TooManyHeaders { count: 3, max: 2 })
    );
}

#[test]
fn header_bytes_are_capped_per_record() {
    let limits = BatchLimits::default();
    let headers = vec![
        Header {
            key: "ab".into(),
            value: Some(Bytes::from_static(b"0123456789")),
        },
        Header {
            key: "c".into(),
            value: None,
        },
    ];
    let record = Record {
        offset: 7,
        timestamp: None,
        key: None,
        value: Some(Bytes::from_static(b"v")),
        headers,
    };
    let chunk = encode_records(std::slice::from_ref(&record), Codec::None, 0).expect("encode");
    let decode = |limits: &BatchLimits| {
        decode_records(
            Codec::None,
            chunk.uncompressed_len,
            &chunk.payload,
            7,
            7,
            1,
            limits,
        )
    };
    // 2 + 10 + 1 bytes of keys and values: exactly at the cap passes, one below it does not.
    let exact = BatchLimits {
        max_header_bytes: 13,
        ..limits
    };
    assert_eq!(decode(&exact), Ok(vec![record]));
    let below = BatchLimits {
        max_header_bytes: 12,
        ..limits
    };
    assert_eq!(
        decode(&below),
        Err(BatchError::HeadersTooLarge { len: 13, max: 12 })
    );
}

#[test]
fn hand_made_sections_are_checked() {
    let limits = BatchLimits::default();
    let parse = |section: &[u8], first: i64, last: i64, count: u32| {
        decode_records(
            Codec::None,
            section.len() as u32,
            section,
            first,
            last,
            count,
            &limits,
        )
    };
    // Two records with offset delta 0: not strictly increasing.
    assert_eq!(
        parse(&[8, 0, 0, 0, 0, 0, 0, 0, 0, 0], 4, 4, 2),
        Err(BatchError::OffsetOrder { prev: 4, next: 4 })
    );
    // Header key that is not UTF-8.
    assert_eq!(
        parse(&[0, 0, 0, 0, 1, 2, 0xff, 0xfe, 0], 0, 0, 1),
        Err(BatchError::InvalidUtf8)
    );
    // Timestamp flag 2.
    assert_eq!(
        parse(&[0, 2, 0, 0, 0], 0, 0, 1),
        Err(BatchError::Malformed("timestamp flag is neither 0 nor 1"))
    );
    // Value claims 100 bytes, section ends.
    assert_eq!(
        parse(&[0, 0, 0, 101, 1], 0, 0, 1),
        Err(BatchError::Truncated)
    );
    // 11-byte varint.
    assert_eq!(
        parse(&[0xff; 11], 0, 0, 1),
        Err(BatchError::Malformed("varint overflows u64"))
    );
    // Second record's delta pushes the offset past i64::MAX.
    let mut overflow = vec![2, 0, 0, 0, 0];
    overflow.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    overflow.extend_from_slice(&[0, 0, 0, 0]);
    assert_eq!(
        parse(&overflow, 1, 1, 2),
        Err(BatchError::Malformed("record offset overflows i64"))
    );
}

#[test]
fn zstd_bomb_expanding_beyond_declared_length_is_refused() {
    let zeros = vec![0u8; 64 << 20];
    let payload = zstd::bulk::compress(&zeros, 3).expect("compress");
    assert!(payload.len() < 64 << 10);
    let err = decode_records(
        Codec::Zstd,
        1000,
        &payload,
        0,
        0,
        1,
        &BatchLimits::default(),
    );
    assert_eq!(
        err,
        Err(BatchError::LengthMismatch {
            declared: 1000,
            actual: 1001
        })
    );
}

#[test]
fn huge_declared_length_is_refused_before_decompressing() {
    // The payload is garbage: the length check must fire before zstd ever sees it.
    let err = decode_records(
        Codec::Zstd,
        200 << 20,
        b"garbage",
        0,
        0,
        1,
        &BatchLimits::default(),
    );
    assert_eq!(
        err,
        Err(BatchError::TooLarge {
            len: 200 << 20,
            max: 64 << 20
        })
    );
}

#[test]
fn large_zstd_window_is_refused() {
    // A small payload whose frame header asks for a 128 MiB window (streamed without a pledged
    // size, so zstd keeps the window it was told to use).
    let records = vec![Record {
        offset: 0,
        timestamp: None,
        key: None,
        value: Some(Bytes::from(vec![7u8; 300_000])),
        headers: vec![],
    }];
    let plain = encode_records(&records, Codec::None, 0).expect("encode");
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("encoder");
    encoder
        .set_parameter(CParameter::WindowLog(27))
        .expect("window");
    encoder
        .set_parameter(CParameter::EnableLongDistanceMatching(true))
        .expect("ldm");
    std::io::Write::write_all(&mut encoder, &plain.payload).expect("write");
    let payload = encoder.finish().expect("finish");
    let limits = BatchLimits::default();
    let err = decode_records(
        Codec::Zstd,
        plain.uncompressed_len,
        &payload,
        0,
        0,
        1,
        &limits,
    );
    match err {
        Err(BatchError::Decompress(msg)) => assert!(msg.contains("too much memory"), "{msg}"),
        other => panic!("expected a window error, got {other:?}"),
    }
    // The same payload passes with a cap that admits the window: the refusal above is the cap.
    let roomy = BatchLimits {
        zstd_window_log_max: 27,
        ..limits
    };
    assert_eq!(
        decode_records(
            Codec::Zstd,
            plain.uncompressed_len,
            &payload,
            0,
            0,
            1,
            &roomy
        ),
        Ok(records)
    );
}

#[test]
fn zstd_payload_shorter_than_declared_or_with_trailing_bytes() {
    let records = &tricky_records()[..2];
    let chunk = encode_records(records, Codec::Zstd, 3).expect("encode");
    let limits = BatchLimits::default();
    assert_eq!(
        decode_records(
            Codec::Zstd,
            chunk.uncompressed_len + 1,
            &chunk.payload,
            10,
            11,
            2,
            &limits
        ),
        Err(BatchError::LengthMismatch {
            declared: chunk.uncompressed_len + 1,
            actual: u64::from(chunk.uncompressed_len)
        })
    );
    let mut trailing = chunk.payload.to_vec();
    trailing.extend_from_slice(b"xyz");
    assert_eq!(
        decode_records(
            Codec::Zstd,
            chunk.uncompressed_len,
            &trailing,
            10,
            11,
            2,
            &limits
        ),
        Err(BatchError::TrailingBytes(3))
    );
    let cut = &chunk.payload[..chunk.payload.len() - 4];
    assert!(matches!(
        decode_records(Codec::Zstd, chunk.uncompressed_len, cut, 10, 11, 2, &limits),
        Err(BatchError::Decompress(_))
    ));
}
