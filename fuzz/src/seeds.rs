//! The seed corpus, generated so that it stays in step with the wire format: `tests/corpus.rs`
//! fails when a committed file under `corpus/` differs from what this produces, and rewrites
//! them with `SPOKE_WRITE_CORPUS=1`.
//!
//! Seeds give the fuzzer valid structure to mutate (a valid CRC or zstd frame is out of reach
//! of random bytes) and the known hostile cases (bomb, big window, oversize length).

use bytes::{Bytes, BytesMut};
use spoke_proto::{
    encode_records, Ack, Batch, BatchLimits, Codec, Frame, Goodbye, GoodbyeCode, Header, Heartbeat,
    Hello, Nack, NackCode, PartitionLag, Record, Rejected, RejectedRange, ResumePoint, TopicConfig,
    TopicPartition, Welcome, HEADER_LEN,
};
use zstd::zstd_safe::CParameter;

use crate::{BatchInput, FUZZ_BATCH_LIMITS};

/// One seed file: `corpus/<target>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

fn records() -> Vec<Record> {
    let b = |s: &[u8]| Some(Bytes::copy_from_slice(s));
    vec![
        Record {
            offset: 10,
            timestamp: Some(1_700_000_000_000),
            key: b(b"sensor-1"),
            value: b(br#"{"t":21.5}"#),
            headers: vec![Header {
                key: "trace".into(),
                value: b(b"abc"),
            }],
        },
        Record {
            offset: 11,
            timestamp: None,
            key: None,
            value: None,
            headers: vec![],
        },
        Record {
            offset: 15,
            timestamp: Some(-1),
            key: b(b""),
            value: b(b"value"),
            headers: vec![
                Header {
                    key: "dup".into(),
                    value: None,
                },
                Header {
                    key: "dup".into(),
                    value: b(b""),
                },
            ],
        },
    ]
}

fn batch_frame(codec: Codec) -> Batch {
    let recs = records();
    let chunk = encode_records(&recs, codec, 3).expect("seed records encode");
    Batch {
        seq: 1,
        topic: "sensors".into(),
        partition: 0,
        partition_count: 1,
        first_offset: chunk.first_offset,
        last_offset: chunk.last_offset,
        next_offset: chunk.last_offset + 1,
        record_count: chunk.record_count,
        codec: chunk.codec,
        uncompressed_len: chunk.uncompressed_len,
        payload: chunk.payload,
    }
}

/// One frame of each type, as in proto's golden tests, plus valid batches of both codecs.
fn frames() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "hello",
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
        ),
        (
            "welcome",
            Frame::Welcome(Welcome {
                version: 1,
                relay: "hub-relay-1".into(),
                resume: vec![ResumePoint {
                    topic: "sensors".into(),
                    partition: 0,
                    next_offset: 12_345,
                }],
            }),
        ),
        ("batch-plain", Frame::Batch(batch_frame(Codec::None))),
        ("batch-zstd", Frame::Batch(batch_frame(Codec::Zstd))),
        (
            "ack",
            Frame::Ack(Ack {
                seq: 1,
                next_offset: 42,
            }),
        ),
        (
            "nack",
            Frame::Nack(Nack {
                seq: 8,
                code: NackCode::NotAllowed,
                message: "site plant-7 may not write topic secrets".into(),
            }),
        ),
        (
            "heartbeat",
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
        ),
        (
            "goodbye",
            Frame::Goodbye(Goodbye {
                code: GoodbyeCode::ProtocolError,
                reason: "bad frame".into(),
            }),
        ),
        (
            "rejected",
            Frame::Rejected(Rejected {
                seq: 7,
                topic: "orders".into(),
                partition: 1,
                reason: "too_large".into(),
                ranges: vec![RejectedRange {
                    first_offset: 40,
                    last_offset: 44,
                    records: 5,
                }],
            }),
        ),
        (
            "topic_config",
            Frame::TopicConfig(TopicConfig {
                topic: "inventory".into(),
                entries: vec![("cleanup.policy".into(), "compact".into())],
            }),
        ),
    ]
}

fn encode(frame: &Frame) -> Vec<u8> {
    frame.to_bytes().expect("seed frame encodes").to_vec()
}

/// 8 MiB of zeros in a few hundred bytes of zstd.
fn zstd_bomb() -> Vec<u8> {
    zstd::bulk::compress(&vec![0u8; 8 << 20], 3).expect("compress")
}

/// A small frame whose header asks for a 128 MiB window (streamed, so zstd keeps it).
fn zstd_big_window(content: &[u8]) -> Vec<u8> {
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("encoder");
    encoder
        .set_parameter(CParameter::WindowLog(27))
        .expect("window");
    encoder
        .set_parameter(CParameter::EnableLongDistanceMatching(true))
        .expect("ldm");
    std::io::Write::write_all(&mut encoder, content).expect("write");
    encoder.finish().expect("finish")
}

fn batch_input(batch: Batch, limits: BatchLimits) -> Vec<u8> {
    BatchInput { batch, limits }.to_bytes()
}

/// Every seed of every target.
pub fn seeds() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut seed = |target, name: &str, bytes: Vec<u8>| {
        out.push(Seed {
            target,
            name: name.to_owned(),
            bytes,
        })
    };
    let frames = frames();

    // frame_decode: whole frames and streams.
    let mut stream = BytesMut::new();
    for (name, frame) in &frames {
        seed("frame_decode", name, encode(frame));
        frame.encode(&mut stream).expect("encode");
    }
    // Every frame back to back, then half a frame: the reader must stop at "need more".
    let ack = encode(&frames[4].1);
    stream.extend_from_slice(&ack[..ack.len() / 2]);
    seed("frame_decode", "stream", stream.to_vec());
    let mut oversize = ack.clone();
    oversize[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    seed("frame_decode", "oversize-length", oversize);
    let mut bad_crc = ack.clone();
    bad_crc[HEADER_LEN] ^= 1;
    seed("frame_decode", "bad-checksum", bad_crc);
    let mut bad_version = ack;
    bad_version[2] = 2;
    seed("frame_decode", "bad-version", bad_version);

    // frame_body: frame type byte, then the body; the target adds length and CRC.
    for (name, frame) in &frames {
        let bytes = encode(frame);
        let mut body = vec![bytes[3]];
        body.extend_from_slice(&bytes[HEADER_LEN..]);
        seed("frame_body", name, body);
    }

    // batch_decode: header fields, limits, payload (see BatchInput).
    let plain = batch_frame(Codec::None);
    let zstd = batch_frame(Codec::Zstd);
    seed(
        "batch_decode",
        "plain",
        batch_input(plain.clone(), FUZZ_BATCH_LIMITS),
    );
    seed(
        "batch_decode",
        "zstd",
        batch_input(zstd.clone(), FUZZ_BATCH_LIMITS),
    );
    // Valid, but over tight limits: two records allowed, one header per record.
    let tight = BatchLimits {
        max_uncompressed_bytes: 4096,
        max_records: 2,
        max_headers_per_record: 1,
        max_header_bytes: 1 << 20,
        zstd_window_log_max: 10,
    };
    seed("batch_decode", "zstd-over-limits", batch_input(zstd, tight));
    seed(
        "batch_decode",
        "plain-over-limits",
        batch_input(plain, tight),
    );
    // Declares 1000 bytes, inflates to 8 MiB: must stop at 1001.
    let bomb = Batch {
        codec: Codec::Zstd,
        uncompressed_len: 1000,
        first_offset: 0,
        last_offset: 0,
        record_count: 1,
        payload: Bytes::from(zstd_bomb()),
        ..batch_frame(Codec::None)
    };
    seed(
        "batch_decode",
        "zstd-bomb",
        batch_input(bomb.clone(), FUZZ_BATCH_LIMITS),
    );
    // Declares the full size, over the cap: refused before decompressing.
    let declared_bomb = Batch {
        uncompressed_len: 8 << 20,
        ..bomb
    };
    seed(
        "batch_decode",
        "zstd-bomb-declared",
        batch_input(declared_bomb, FUZZ_BATCH_LIMITS),
    );
    // One record of 300 kB in a frame asking for a 128 MiB window.
    let big = encode_records(
        &[Record {
            offset: 0,
            timestamp: None,
            key: None,
            value: Some(Bytes::from(vec![7u8; 300_000])),
            headers: vec![],
        }],
        Codec::None,
        0,
    )
    .expect("encode");
    let window = Batch {
        codec: Codec::Zstd,
        uncompressed_len: big.uncompressed_len,
        first_offset: 0,
        last_offset: 0,
        record_count: 1,
        payload: Bytes::from(zstd_big_window(&big.payload)),
        ..batch_frame(Codec::None)
    };
    seed(
        "batch_decode",
        "zstd-big-window",
        batch_input(window, FUZZ_BATCH_LIMITS),
    );

    // roundtrip: any bytes are a valid input; a few shapes to start from.
    seed("roundtrip", "zeros", vec![0; 64]);
    seed("roundtrip", "ascending", (0..=255).collect());
    seed(
        "roundtrip",
        "text",
        b"sensors plant-7 \x02\x00\x01\xff batch zstd \x07\x07\x07\x07".to_vec(),
    );

    // connection: any bytes are a valid input (first byte: the side); shapes to start from.
    seed("connection", "relay-zeros", [vec![1], vec![0; 63]].concat());
    seed("connection", "agent-zeros", vec![0; 64]);
    seed(
        "connection",
        "relay-ascending",
        [vec![1], (0..=255).collect()].concat(),
    );
    seed(
        "connection",
        "agent-ascending",
        [vec![0], (0..=255).rev().collect()].concat(),
    );
    out
}
