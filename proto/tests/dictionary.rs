//! Protocol version 2: the `Dictionary` frame, the dictionary codec, and the per-connection
//! dictionary set, including hostile input.

use bytes::Bytes;
use proptest::prelude::*;
use spoke_proto::*;

fn records(n: usize, from: i64) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let offset = from + i as i64;
            Record {
                offset,
                timestamp: Some(1_700_000_000_000 + offset),
                key: Some(Bytes::from(format!("order-{offset:08}"))),
                value: Some(Bytes::from(format!(
                    "{{\"id\":\"ord-{offset:08}\",\"customer\":{{\"id\":{},\"tier\":\"gold\"}},\"items\":[{{\"sku\":\"VALVE-{}\",\"qty\":{}}}]}}",
                    offset * 7919 % 100_000,
                    offset * 31 % 10_000,
                    1 + offset % 50
                ))),
                headers: vec![],
            }
        })
        .collect()
}

/// A dictionary trained on records unlike the measured ones only in their numbers.
fn trained() -> Vec<u8> {
    static TRAINED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    TRAINED.get_or_init(train).clone()
}

fn train() -> Vec<u8> {
    let samples: Vec<Vec<u8>> = records(2000, 0)
        .iter()
        .map(|r| {
            encode_records(std::slice::from_ref(r), Codec::None, 0)
                .expect("encode")
                .payload
                .to_vec()
        })
        .collect();
    zstd::dict::from_samples(&samples, 16 * 1024).expect("train")
}

fn batch(chunk: &EncodedChunk) -> Batch {
    Batch {
        seq: 9,
        topic: "orders".into(),
        partition: 1,
        partition_count: 3,
        first_offset: chunk.first_offset,
        last_offset: chunk.last_offset,
        next_offset: chunk.last_offset + 1,
        record_count: chunk.record_count,
        codec: chunk.codec,
        uncompressed_len: chunk.uncompressed_len,
        payload: chunk.payload.clone(),
    }
}

fn dictionary(id: u32, bytes: &[u8]) -> Dictionary {
    Dictionary {
        id,
        dictionary: Bytes::copy_from_slice(bytes),
    }
}

#[test]
fn dictionary_frame_golden_bytes() {
    let frame = Frame::Dictionary(dictionary(0x0102_0304, b"abc"));
    let bytes = frame.to_bytes().expect("encode");
    let body = [1, 2, 3, 4, 0, 0, 0, 3, b'a', b'b', b'c'];
    let mut want = vec![b'S', b'K', 2, 8, 0, 0, 0, body.len() as u8];
    want.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    want.extend_from_slice(&body);
    assert_eq!(bytes.as_ref(), want.as_slice());
    assert_eq!(frame.version(), 2);
    assert_eq!(
        Frame::decode(&bytes, &Limits::default()),
        Ok(Some((frame, want.len())))
    );
}

#[test]
fn dictionary_batch_carries_its_id_after_the_codec_in_a_version_2_header() {
    let mut b = batch(&encode_records(&records(2, 5), Codec::Zstd, 3).expect("encode"));
    let plain = Frame::Batch(b.clone()).to_bytes().expect("encode");
    b.codec = Codec::ZstdDict(0xAABB_CCDD);
    let with_dict = Frame::Batch(b.clone()).to_bytes().expect("encode");
    assert_eq!(plain[2], 1);
    assert_eq!(with_dict[2], 2);
    assert_eq!(with_dict.len(), plain.len() + 4);
    // seq 8, topic 2+6, partition 4, count 4, offsets 3*8, record_count 4: codec at 52
    let codec_at = 12 + 8 + 8 + 4 + 4 + 24 + 4;
    assert_eq!(plain[codec_at], 1);
    assert_eq!(with_dict[codec_at], 2);
    assert_eq!(
        with_dict[codec_at + 1..codec_at + 5],
        0xAABB_CCDDu32.to_be_bytes()
    );
    let (decoded, _) = Frame::decode(&with_dict, &Limits::default())
        .expect("decode")
        .expect("complete");
    assert_eq!(decoded, Frame::Batch(b));
}

#[test]
fn version_2_layouts_in_a_version_1_header_are_refused() {
    let limits = Limits::default();
    let mut dict = Frame::Dictionary(dictionary(1, b"x"))
        .to_bytes()
        .expect("encode")
        .to_vec();
    dict[2] = 1;
    assert_eq!(
        Frame::decode(&dict, &limits),
        Err(DecodeError::UnknownFrameType(8))
    );
    let mut b = batch(&encode_records(&records(1, 0), Codec::Zstd, 3).expect("encode"));
    b.codec = Codec::ZstdDict(7);
    let mut bytes = Frame::Batch(b).to_bytes().expect("encode").to_vec();
    bytes[2] = 1;
    assert_eq!(
        Frame::decode(&bytes, &limits),
        Err(DecodeError::VersionMismatch {
            header: 1,
            frame: 2
        })
    );
    // A body too short for the dictionary id is a typed truncation.
    let body = {
        let mut b = batch(&encode_records(&records(1, 0), Codec::Zstd, 3).expect("encode"));
        b.codec = Codec::ZstdDict(7);
        let full = Frame::Batch(b).to_bytes().expect("encode");
        full[HEADER_LEN..HEADER_LEN + 53].to_vec()
    };
    let mut cut = vec![b'S', b'K', 2, 3];
    cut.extend_from_slice(&(body.len() as u32).to_be_bytes());
    cut.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    cut.extend_from_slice(&body);
    assert_eq!(
        Frame::decode(&cut, &limits),
        Err(DecodeError::Truncated {
            what: "batch.dictionary_id"
        })
    );
}

/// A chunk builder holding `recs` (headerless records).
fn builder_of(recs: &[Record]) -> ChunkBuilder {
    let mut builder = ChunkBuilder::new();
    for r in recs {
        builder
            .push(
                r.offset,
                r.timestamp,
                r.key.as_deref(),
                r.value.as_deref(),
                &[],
            )
            .expect("push");
    }
    builder
}

#[test]
fn dictionary_chunks_round_trip_and_shrink_small_chunks() {
    let dict = trained();
    let encoder = EncoderDictionary::new(42, &dict, 3).expect("prepare");
    let recs = records(7, 1_000_000);
    let mut builder = builder_of(&recs);
    let plain = builder_of(&recs).finish(Codec::Zstd, 3).expect("finish");
    let chunk = builder.finish_with_dictionary(&encoder).expect("finish");
    assert_eq!(chunk.codec, Codec::ZstdDict(42));
    assert!(builder.is_empty(), "the builder is reset");
    assert!(
        chunk.payload.len() * 10 < plain.payload.len() * 8,
        "a dictionary saves at least 20% on a 7-record chunk: {} vs {}",
        chunk.payload.len(),
        plain.payload.len()
    );
    let b = batch(&chunk);
    let limits = BatchLimits::default();
    // Batch before its dictionary: typed, never a panic.
    assert_eq!(b.records(&limits), Err(BatchError::UnknownDictionary(42)));
    assert_eq!(
        decode_records(
            chunk.codec,
            chunk.uncompressed_len,
            &chunk.payload,
            chunk.first_offset,
            chunk.last_offset,
            chunk.record_count,
            &limits
        ),
        Err(BatchError::UnknownDictionary(42))
    );
    let mut known = Dictionaries::new(DictionaryLimits::default());
    known.insert(&dictionary(42, &dict)).expect("insert");
    assert_eq!(b.records_with(&limits, &known), Ok(recs.clone()));
    // Another dictionary under that id: zstd notices the mismatch.
    let mut wrong = Dictionaries::new(DictionaryLimits::default());
    let other = zstd::dict::from_samples(
        &(0..200)
            .map(|i| format!("something else entirely {i} {}", i * i).into_bytes())
            .collect::<Vec<_>>(),
        4096,
    )
    .expect("train");
    wrong.insert(&dictionary(42, &other)).expect("insert");
    assert!(matches!(
        b.records_with(&limits, &wrong),
        Err(BatchError::Decompress(_))
    ));
    // The uncompressed section can be recovered for a peer without dictionaries.
    let section = decompress_section(
        chunk.codec,
        chunk.uncompressed_len,
        &chunk.payload,
        &limits,
        &known,
    )
    .expect("section");
    assert_eq!(section.len(), chunk.uncompressed_len as usize);
    // finish(ZstdDict) without the dictionary is typed, and keeps the records.
    let mut builder = ChunkBuilder::new();
    builder.push(0, None, None, Some(b"v"), &[]).expect("push");
    assert_eq!(
        builder.finish(Codec::ZstdDict(42), 3),
        Err(BatchError::UnknownDictionary(42))
    );
    assert_eq!(builder.record_count(), 1);
}

#[test]
fn dictionary_set_is_bounded_and_typed() {
    let limits = DictionaryLimits {
        max_dictionaries: 2,
        max_dictionary_bytes: 8,
    };
    let mut set = Dictionaries::new(limits);
    assert_eq!(
        set.insert(&dictionary(1, &[7; 9])),
        Err(DictionaryError::TooLarge { len: 9, max: 8 })
    );
    assert_eq!(
        set.insert(&dictionary(1, &[])),
        Err(DictionaryError::Empty(1))
    );
    set.insert(&dictionary(1, b"raw-one")).expect("insert");
    // The same definition again is harmless; a different one is a conflict.
    set.insert(&dictionary(1, b"raw-one")).expect("insert");
    assert_eq!(
        set.insert(&dictionary(1, b"raw-two")),
        Err(DictionaryError::Conflict(1))
    );
    set.insert(&dictionary(2, b"raw-two")).expect("insert");
    assert_eq!(
        set.insert(&dictionary(3, b"raw-3")),
        Err(DictionaryError::TooMany { max: 2 })
    );
    assert_eq!(set.len(), 2);
    assert!(set.contains(1) && set.contains(2) && !set.contains(3));
    // zstd's dictionary magic with garbage tables: refused or kept, never a panic.
    let mut set = Dictionaries::new(DictionaryLimits::default());
    let mut hostile = vec![0x37, 0xA4, 0x30, 0xEC, 1, 0, 0, 0];
    hostile.extend_from_slice(&[0xFF; 64]);
    match set.insert(&dictionary(5, &hostile)) {
        Ok(()) | Err(DictionaryError::Load { id: 5, .. }) => {}
        Err(other) => panic!("unexpected {other}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn hostile_dictionaries_and_payloads_never_panic(
        dict in prop::collection::vec(any::<u8>(), 1..512),
        magic in any::<bool>(),
        payload in prop::collection::vec(any::<u8>(), 0..256),
        uncompressed_len in 0u32..1 << 16,
        count in 1u32..20,
    ) {
        let mut bytes = dict;
        if magic {
            bytes.splice(0..0, [0x37, 0xA4, 0x30, 0xEC]);
        }
        let mut set = Dictionaries::new(DictionaryLimits::default());
        let _ = set.insert(&dictionary(3, &bytes));
        let b = Batch {
            seq: 0,
            topic: String::new(),
            partition: 0,
            partition_count: 1,
            first_offset: 0,
            last_offset: i64::from(count) - 1,
            next_offset: i64::from(count),
            record_count: count,
            codec: Codec::ZstdDict(3),
            uncompressed_len,
            payload: Bytes::from(payload),
        };
        let _ = b.records_with(&BatchLimits::default(), &set);
    }

    #[test]
    fn dictionary_chunks_round_trip(n in 1usize..30, from in 0i64..1 << 40, level in 1i32..10) {
        let dict = trained();
        let encoder = EncoderDictionary::new(1, &dict, level).expect("prepare");
        let recs = records(n, from);
        let mut builder = ChunkBuilder::new();
        for r in &recs {
            builder.push(r.offset, r.timestamp, r.key.as_deref(), r.value.as_deref(), &[]).expect("push");
        }
        let chunk = builder.finish_with_dictionary(&encoder).expect("finish");
        let mut set = Dictionaries::new(DictionaryLimits::default());
        set.insert(&dictionary(1, &dict)).expect("insert");
        prop_assert_eq!(batch(&chunk).records_with(&BatchLimits::default(), &set), Ok(recs));
    }
}
