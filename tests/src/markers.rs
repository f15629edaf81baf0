//! Transaction markers written into a partition the way a transaction coordinator does.
//!
//! Real Kafka ends every partition a transaction wrote with a control record (commit or
//! abort), which no consumer ever returns: a reader that waits to *see* the partition's last
//! offset never gets there. No broker on this machine writes them (tansu has no EndTxn, and
//! librdkafka's mock cluster acknowledges EndTxn without writing a marker), but the mock
//! cluster stores a produced record batch as it is, control bit included, and serves it to
//! consumers like a real log. So this module sends a hand-made Produce request (v3) with one
//! control batch, and the partition then ends in a real marker for every client.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context};

/// Control record types (Kafka's `ControlRecordType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    Abort = 0,
    Commit = 1,
}

/// Appends one `marker` control record to `topic`/`partition` of the single-broker cluster at
/// `bootstrap`, as producer `producer_id`; returns the marker's offset.
pub fn append(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    marker: Marker,
    producer_id: i64,
) -> anyhow::Result<i64> {
    let batch = control_batch(marker, producer_id);
    let mut body = Vec::new();
    put_i16(&mut body, 0); // api key: Produce
    put_i16(&mut body, 3); // api version
    put_i32(&mut body, 1); // correlation id
    put_str(&mut body, "spoke-tests-markers");
    put_i16(&mut body, -1); // transactional id: null (no idempotence check by the mock)
    put_i16(&mut body, -1); // acks = all
    put_i32(&mut body, 10_000); // timeout ms
    put_i32(&mut body, 1); // topics
    put_str(&mut body, topic);
    put_i32(&mut body, 1); // partitions
    put_i32(&mut body, partition);
    put_i32(&mut body, i32::try_from(batch.len())?);
    body.extend_from_slice(&batch);

    let mut stream =
        TcpStream::connect(bootstrap).with_context(|| format!("connecting to {bootstrap}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(&i32::try_from(body.len())?.to_be_bytes())?;
    stream.write_all(&body)?;
    let mut size = [0u8; 4];
    stream.read_exact(&mut size)?;
    let mut response = vec![0u8; usize::try_from(i32::from_be_bytes(size))?];
    stream.read_exact(&mut response)?;
    // correlation id, topics count, topic name, partitions count, partition, error, offset.
    let mut r = Reader(&response);
    let _correlation = r.i32()?;
    let _topics = r.i32()?;
    let name_len = usize::try_from(r.i16()?)?;
    r.skip(name_len)?;
    let _partitions = r.i32()?;
    let _partition = r.i32()?;
    let error = r.i16()?;
    let offset = r.i64()?;
    if error != 0 {
        bail!("Produce of a {marker:?} marker to {topic}/{partition}: error code {error}");
    }
    Ok(offset)
}

/// A record batch (magic 2) holding one control record, with the transactional and control
/// attributes set and its CRC-32C.
fn control_batch(marker: Marker, producer_id: i64) -> Vec<u8> {
    let mut record = Vec::new();
    record.push(0); // attributes
    put_varint(&mut record, 0); // timestamp delta
    put_varint(&mut record, 0); // offset delta
    put_varint(&mut record, 4); // key: version i16, type i16
    put_i16(&mut record, 0);
    put_i16(&mut record, marker as i16);
    put_varint(&mut record, 6); // value: version i16, coordinator epoch i32
    put_i16(&mut record, 0);
    put_i32(&mut record, 0);
    put_varint(&mut record, 0); // headers
    let mut records = Vec::new();
    put_varint(
        &mut records,
        i64::try_from(record.len()).unwrap_or(i64::MAX),
    );
    records.extend_from_slice(&record);

    let now = 1_700_000_000_000_i64;
    let mut tail = Vec::new(); // from attributes on: what the CRC covers
    put_i16(&mut tail, 0x10 | 0x20); // transactional | control
    put_i32(&mut tail, 0); // last offset delta
    put_i64(&mut tail, now);
    put_i64(&mut tail, now);
    put_i64(&mut tail, producer_id);
    put_i16(&mut tail, 0); // producer epoch
    put_i32(&mut tail, -1); // base sequence
    put_i32(&mut tail, 1); // record count
    tail.extend_from_slice(&records);

    let mut batch = Vec::new();
    put_i64(&mut batch, 0); // base offset: the broker assigns it
    let length = 4 + 1 + 4 + tail.len(); // leader epoch, magic, crc, rest
    put_i32(&mut batch, i32::try_from(length).unwrap_or(i32::MAX));
    put_i32(&mut batch, -1); // partition leader epoch
    batch.push(2); // magic
    batch.extend_from_slice(&crc32c(&tail).to_be_bytes());
    batch.extend_from_slice(&tail);
    batch
}

fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn put_i16(out: &mut Vec<u8>, v: i16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_i32(out: &mut Vec<u8>, v: i32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_str(out: &mut Vec<u8>, s: &str) {
    put_i16(out, i16::try_from(s.len()).unwrap_or(i16::MAX));
    out.extend_from_slice(s.as_bytes());
}
fn put_varint(out: &mut Vec<u8>, v: i64) {
    let mut zigzag = ((v << 1) ^ (v >> 63)) as u64;
    loop {
        let byte = (zigzag & 0x7f) as u8;
        zigzag >>= 7;
        if zigzag == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> anyhow::Result<&[u8]> {
        if self.0.len() < n {
            bail!("short Produce response");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn skip(&mut self, n: usize) -> anyhow::Result<()> {
        self.take(n).map(|_| ())
    }
    fn i16(&mut self) -> anyhow::Result<i16> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into()?))
    }
    fn i32(&mut self) -> anyhow::Result<i32> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into()?))
    }
    fn i64(&mut self) -> anyhow::Result<i64> {
        Ok(i64::from_be_bytes(self.take(8)?.try_into()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
