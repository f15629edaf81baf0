//! What the simulated sites ship: records that carry their identity, so the hub can be checked
//! record by record (which site, partition and offset; the exact bytes), never by counts.
//!
//! A record is a pure function of (site, partition, offset): a site that resends after a lost
//! connection sends the same bytes again, and the verifier recomputes what each hub record
//! must hold instead of remembering every record sent.

use spoke_proto::{Batch, ChunkBuilder, Codec};

/// The source topic every simulated site ships.
pub const TOPIC: &str = "sim";

/// zstd level of the real agent's `ship.zstd_level` default.
const ZSTD_LEVEL: i32 = 3;

/// A record's key: its identity, readable in the hub.
pub fn key(site: &str, partition: i32, offset: i64) -> String {
    format!("{site}/{partition}/{offset}")
}

/// A record's value: `len` bytes drawn from a 32-letter alphabet by a generator seeded with the
/// record's identity. Text-like, so zstd compresses it about as it does real payloads instead of
/// either nothing (random bytes) or everything (repeats).
pub fn value(site: &str, partition: i32, offset: i64, len: usize) -> Vec<u8> {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz{}:,\" ";
    let mut state = fnv1a(site.as_bytes())
        ^ (u64::from(partition as u32) << 48)
        ^ (offset as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let word = splitmix64(&mut state);
        for shift in (0..60).step_by(5) {
            if out.len() == len {
                break;
            }
            out.push(ALPHABET[((word >> shift) & 31) as usize]);
        }
    }
    out
}

/// The `Batch` frame of records `first..first + count` of `site`'s `partition`, zstd-compressed
/// as the real agent sends them.
pub fn batch(
    site: &str,
    partition: i32,
    partition_count: i32,
    first: i64,
    count: u32,
    record_bytes: usize,
) -> anyhow::Result<Batch> {
    let mut builder = ChunkBuilder::new();
    let now = now_ms();
    for offset in first..first + i64::from(count) {
        let key = key(site, partition, offset);
        let value = value(site, partition, offset, record_bytes);
        builder.push(offset, Some(now), Some(key.as_bytes()), Some(&value), &[])?;
    }
    let chunk = builder.finish(Codec::Zstd, ZSTD_LEVEL)?;
    Ok(Batch {
        // Set by the sender from its window.
        seq: 0,
        topic: TOPIC.to_owned(),
        partition,
        partition_count,
        first_offset: chunk.first_offset,
        last_offset: chunk.last_offset,
        next_offset: chunk.last_offset + 1,
        record_count: chunk.record_count,
        codec: chunk.codec,
        uncompressed_len: chunk.uncompressed_len,
        payload: chunk.payload,
    })
}

/// The wall clock as a record timestamp (spoke-process's clock, as a Kafka `i64`).
pub fn now_ms() -> i64 {
    i64::try_from(spoke_process::clock::now_ms()).unwrap_or(i64::MAX)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A small, fast, well-mixed generator; also the simulator's source of jitter.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_a_function_of_its_identity() {
        assert_eq!(value("a", 0, 7, 200), value("a", 0, 7, 200));
        assert_ne!(value("a", 0, 7, 200), value("a", 0, 8, 200));
        assert_ne!(value("a", 0, 7, 200), value("b", 0, 7, 200));
        assert_ne!(value("a", 0, 7, 200), value("a", 1, 7, 200));
        assert_eq!(value("a", 0, 7, 13).len(), 13);
    }

    #[test]
    fn a_batch_decodes_to_the_records_it_was_built_from() -> anyhow::Result<()> {
        let batch = batch("site-1", 2, 4, 100, 5, 50)?;
        assert_eq!(
            (batch.first_offset, batch.last_offset, batch.next_offset),
            (100, 104, 105)
        );
        let records = batch.records(&spoke_proto::BatchLimits::default())?;
        assert_eq!(records.len(), 5);
        for (record, offset) in records.iter().zip(100..) {
            assert_eq!(record.offset, offset);
            assert_eq!(
                record.key.as_deref(),
                Some(key("site-1", 2, offset).as_bytes())
            );
            assert_eq!(
                record.value.as_deref(),
                Some(value("site-1", 2, offset, 50).as_slice())
            );
        }
        Ok(())
    }
}
