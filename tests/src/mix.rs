//! Record mixes: deterministic generated records of one kind and size, as the benchmark
//! (`spoke-bench`) and the scenarios over emulated links produce them at the edge.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::kafka;
use crate::site::SITE;

/// What the records look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Realistic JSON: ids, numbers, timestamps and words from a small vocabulary.
    Json,
    /// Incompressible bytes.
    Random,
}

/// One record mix, as produced at the edge.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub kind: Kind,
    pub size: usize,
    /// The edge producer's `compression.type`.
    pub edge_zstd: bool,
}

impl Mix {
    pub fn name(&self) -> String {
        let kind = match self.kind {
            Kind::Json => "json",
            Kind::Random => "random",
        };
        let size = if self.size >= 1024 {
            format!("{}KiB", self.size / 1024)
        } else {
            format!("{}B", self.size)
        };
        let edge = if self.edge_zstd { "zstd" } else { "plain" };
        format!("{kind}-{size}-edge-{edge}")
    }

    /// Record `i` of this mix: deterministic, so every system moves the same bytes.
    pub fn record(&self, i: usize) -> kafka::Rec {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (i as u64).wrapping_mul(0x2545_F491));
        let value = match self.kind {
            Kind::Json => json_value(i, self.size, &mut rng),
            Kind::Random => (0..self.size).map(|_| rng.next() as u8).collect(),
        };
        kafka::Rec {
            key: Some(format!("order-{i:08}").into_bytes()),
            value: Some(value),
            headers: Vec::new(),
            timestamp: Some(now_ms()),
        }
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "valve",
    "gasket",
    "sensor",
    "pump",
    "bearing",
    "cable",
    "filter",
    "motor",
    "relay",
    "switch",
    "north",
    "south",
    "depot",
    "express",
    "standard",
    "priority",
    "pending",
    "shipped",
    "delivered",
    "returned",
    "warehouse",
    "customer",
    "invoice",
    "pallet",
    "crate",
    "steel",
    "copper",
    "blue",
    "green",
    "large",
    "small",
    "spare",
    "replacement",
    "urgent",
];

/// A JSON order of about `size` bytes: a header of ids and numbers, then line items until the
/// size is reached. Compresses like real event data (about 3x with zstd), not like padding.
fn json_value(i: usize, size: usize, rng: &mut XorShift) -> Vec<u8> {
    let mut out = format!(
        "{{\"id\":\"ord-{i:08}\",\"site\":\"{SITE}\",\"ts\":{},\"customer\":{{\"id\":{},\"tier\":\"{}\"}},\"items\":[",
        1_700_000_000_000u64 + i as u64 * 37 + rng.below(1000),
        rng.below(100_000),
        WORDS[rng.below(WORDS.len() as u64) as usize],
    );
    let mut first = true;
    while out.len() + 80 < size {
        if !first {
            out.push(',');
        }
        first = false;
        let note: Vec<&str> = (0..1 + rng.below(4))
            .map(|_| WORDS[rng.below(WORDS.len() as u64) as usize])
            .collect();
        out.push_str(&format!(
            "{{\"sku\":\"{}-{}\",\"qty\":{},\"price\":{}.{:02},\"note\":\"{}\"}}",
            WORDS[rng.below(WORDS.len() as u64) as usize].to_uppercase(),
            rng.below(10_000),
            1 + rng.below(50),
            rng.below(500),
            rng.below(100),
            note.join(" ")
        ));
    }
    out.push_str("]}");
    out.into_bytes()
}

/// Wall-clock milliseconds, as Kafka record timestamps count them.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_records_have_the_requested_size_and_realistic_compression() {
        let mix = Mix {
            kind: Kind::Json,
            size: 1024,
            edge_zstd: false,
        };
        let sample: Vec<u8> = (0..200)
            .flat_map(|i| mix.record(i).value.unwrap_or_default())
            .collect();
        let average = sample.len() / 200;
        assert!((900..=1100).contains(&average), "average {average} B");
        let compressed = zstd::bulk::compress(&sample, 3).expect("zstd");
        let ratio = sample.len() as f64 / compressed.len() as f64;
        assert!((2.0..8.0).contains(&ratio), "zstd ratio {ratio:.1}");
        assert!(serde_json::from_slice::<serde_json::Value>(
            &mix.record(7).value.unwrap_or_default()
        )
        .is_ok());
    }

    #[test]
    fn random_records_do_not_compress() {
        let mix = Mix {
            kind: Kind::Random,
            size: 1024,
            edge_zstd: false,
        };
        let sample: Vec<u8> = (0..50)
            .flat_map(|i| mix.record(i).value.unwrap_or_default())
            .collect();
        let compressed = zstd::bulk::compress(&sample, 3).expect("zstd");
        assert!(compressed.len() as f64 > sample.len() as f64 * 0.95);
    }
}
