//! Measures wire bytes per record of spoke chunks against Kafka's own zstd record batches, at
//! several zstd levels, with and without a trained dictionary (issue 6).
//!
//! `cargo run --release -p spoke-bench --example dict_measure` (a measurement, not a test).

use std::time::Instant;

use spoke_proto::{Batch, ChunkBuilder, Codec, Frame};
use spoke_tests::mix::{Kind, Mix};

/// Records used to train the dictionary (offsets disjoint from the measured ones).
const TRAIN_RECORDS: usize = 4_000;
const MEASURE_FROM: usize = 1_000_000;

fn put_varint(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// Kafka record batch v2: a 61-byte header, then the records, compressed together.
fn kafka_batch_bytes(recs: &[spoke_tests::kafka::Rec], level: i32) -> usize {
    let base_ts = recs.first().and_then(|r| r.timestamp).unwrap_or(0);
    let mut records = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        let mut body = vec![0u8]; // attributes
        put_varint(&mut body, r.timestamp.unwrap_or(0) - base_ts);
        put_varint(&mut body, i as i64);
        for field in [&r.key, &r.value] {
            match field {
                None => put_varint(&mut body, -1),
                Some(b) => {
                    put_varint(&mut body, b.len() as i64);
                    body.extend_from_slice(b);
                }
            }
        }
        put_varint(&mut body, 0); // headers
        put_varint(&mut records, body.len() as i64);
        records.extend_from_slice(&body);
    }
    let compressed = zstd::bulk::compress(&records, level).expect("zstd");
    61 + compressed.len()
}

/// The section of one spoke chunk, one entry per record (for training) or all together.
fn section(recs: &[spoke_tests::kafka::Rec], first: i64) -> Vec<u8> {
    let mut b = ChunkBuilder::new();
    for (i, r) in recs.iter().enumerate() {
        b.push(
            first + i as i64,
            r.timestamp,
            r.key.as_deref(),
            r.value.as_deref(),
            &[],
        )
        .expect("push");
    }
    let chunk = b.finish(Codec::None, 0).expect("finish");
    chunk.payload.to_vec()
}

/// Bytes of a Batch frame around a payload of `payload_len` bytes (topic "bench"), plus the
/// 4-byte dictionary id a dictionary batch carries.
fn frame_overhead(dict: bool) -> usize {
    let batch = Batch {
        seq: 1,
        topic: "bench".into(),
        partition: 0,
        partition_count: 3,
        first_offset: 0,
        last_offset: 0,
        next_offset: 1,
        record_count: 1,
        codec: Codec::Zstd,
        uncompressed_len: 0,
        payload: bytes::Bytes::new(),
    };
    Frame::Batch(batch).to_bytes().expect("encode").len() + if dict { 4 } else { 0 }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let only_size: Option<usize> = args.get(1).and_then(|s| s.parse().ok());
    println!("size  chunk   level dict      payload/rec  wire/rec  kafka-same/rec kafka-1MiB/rec  ratio(wire/kafka-same)  compress µs/rec");
    for size in [100usize, 1024] {
        if only_size.is_some_and(|s| s != size) {
            continue;
        }
        let mix = Mix {
            kind: Kind::Json,
            size,
            edge_zstd: false,
        };
        let train: Vec<_> = (0..TRAIN_RECORDS).map(|i| mix.record(i)).collect();
        let samples: Vec<Vec<u8>> = train
            .iter()
            .enumerate()
            .map(|(i, r)| section(std::slice::from_ref(r), i as i64))
            .collect();
        let mut dicts = Vec::new();
        for dict_size in [16 * 1024, 64 * 1024] {
            let t = Instant::now();
            let dict = zstd::dict::from_samples(&samples, dict_size).expect("train");
            eprintln!(
                "size {size}: trained a {} B dictionary from {} samples ({} B) in {:?}",
                dict.len(),
                samples.len(),
                samples.iter().map(Vec::len).sum::<usize>(),
                t.elapsed()
            );
            dicts.push((dict_size, dict));
        }
        let per_full = (1 << 20) / (size + 40);
        let measured: Vec<_> = (MEASURE_FROM..MEASURE_FROM + per_full.max(7 * 400))
            .map(|i| mix.record(i))
            .collect();
        let kafka_full = {
            let b = kafka_batch_bytes(&measured[..per_full], 3);
            b as f64 / per_full as f64
        };
        for (label, per_chunk) in [("1MiB", per_full), ("7rec", 7)] {
            let chunks: Vec<&[spoke_tests::kafka::Rec]> = measured
                .chunks(per_chunk)
                .filter(|c| c.len() == per_chunk)
                .take(if per_chunk == 7 { 400 } else { 1 })
                .collect();
            let n: usize = chunks.iter().map(|c| c.len()).sum();
            let kafka_same: usize = chunks.iter().map(|c| kafka_batch_bytes(c, 3)).sum();
            let sections: Vec<Vec<u8>> = chunks
                .iter()
                .enumerate()
                .map(|(i, c)| section(c, (i * per_chunk) as i64))
                .collect();
            for level in [1, 3, 6, 9, 12, 19] {
                let mut variants: Vec<(String, Option<&Vec<u8>>)> = vec![("none".into(), None)];
                for (ds, d) in &dicts {
                    variants.push((format!("{}K", ds / 1024), Some(d)));
                }
                for (name, dict) in variants {
                    let prepared = dict.map(|d| zstd::dict::EncoderDictionary::copy(d, level));
                    let mut c = match &prepared {
                        Some(p) => zstd::bulk::Compressor::with_prepared_dictionary(p),
                        None => zstd::bulk::Compressor::new(level),
                    }
                    .expect("compressor");
                    let t = Instant::now();
                    let payload: usize = sections
                        .iter()
                        .map(|s| c.compress(s).expect("compress").len())
                        .sum();
                    let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
                    let wire = payload + chunks.len() * frame_overhead(dict.is_some());
                    let wire_rec = wire as f64 / n as f64;
                    let kafka_rec = kafka_same as f64 / n as f64;
                    println!(
                        "{size:<5} {label:<7} {level:<5} {name:<9} {:>11.1} {:>9.1} {:>14.1} {:>14.1} {:>23.2} {:>16.2}",
                        payload as f64 / n as f64,
                        wire_rec,
                        kafka_rec,
                        kafka_full,
                        wire_rec / kafka_rec,
                        us
                    );
                }
            }
        }
    }
}
