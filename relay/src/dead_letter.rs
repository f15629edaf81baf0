//! Records the hub refuses, and the dead-letter topic that takes them instead
//! (`hub.on_rejected`, `hub.dead_letter_topic`).
//!
//! A refused record must not stall its partition: everything behind it would wait, and
//! drop-oldest cannot help because the chunk is in flight. So the relay judges each record
//! before the producer sees it (a broker that refuses one record fails the idempotent,
//! gapless producer for the whole session) and sends a refused one to the dead-letter topic,
//! in the same transaction as its batch where the hub has transactions. Its dead-letter copy
//! carries the provenance, the hub topic it was meant for and the reason in headers, and as
//! much of the record as fits under `hub.max_record_bytes`.

use bytes::Bytes;
use spoke_proto::{Record, RejectedRange};

use crate::hub::{HEADER_OFFSET, HEADER_ORIGIN, HEADER_PARTITION};

/// Header naming the record's source topic.
pub const HEADER_TOPIC: &str = "spoke-topic";
/// Header naming the hub topic the record was meant for.
pub const HEADER_HUB_TOPIC: &str = "spoke-hub-topic";
/// Header with the reason ([`reason`]).
pub const HEADER_REASON: &str = "spoke-rejected";
/// Header present when the dead-letter copy lacks part of the record; its value is the
/// original record's size in bytes (key, value and headers).
pub const HEADER_TRUNCATED: &str = "spoke-truncated";
/// Header with the record's own timestamp (milliseconds since the epoch) when the
/// dead-letter topic would refuse it too, so the copy carries the time it was written instead.
pub const HEADER_TIMESTAMP: &str = "spoke-timestamp";

/// Why the hub refuses a record; the agent counts it under loss reason `rejected`.
pub mod reason {
    /// Larger than `hub.max_record_bytes` once the provenance headers are added.
    pub const TOO_LARGE: &str = "too_large";
    /// `hub.topic` makes a hub topic name longer than Kafka allows (249 characters).
    pub const HUB_TOPIC_INVALID: &str = "hub_topic_invalid";
    /// A CreateTime outside the hub topic's `message.timestamp.before/after.max.ms`
    /// ([`crate::hub_limits`]).
    pub const TIMESTAMP_INVALID: &str = "timestamp_invalid";
    pub const ALL: &[&str] = &[TOO_LARGE, HUB_TOPIC_INVALID, TIMESTAMP_INVALID];
}

/// What the dead-letter copy of `record` holds. Key and headers are kept whole when they
/// fit beside the dead-letter headers, and the value is cut to the rest of `max_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    /// The record's own headers, then the dead-letter ones.
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// Where a refused record came from and why.
#[derive(Debug, Clone, Copy)]
pub struct Refusal<'a> {
    pub site: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub hub_topic: &'a str,
    pub reason: &'static str,
}

/// Room kept for record framing, as [`crate::handoff::record_bytes`] counts it.
const FRAMING: usize = 64;

/// With `restamped`, the record's timestamp goes into [`HEADER_TIMESTAMP`].
pub fn copy(record: &Record, refusal: &Refusal<'_>, max_bytes: usize, restamped: bool) -> Copy {
    let mut headers: Vec<(String, Option<Bytes>)> = [
        (HEADER_ORIGIN, refusal.site.to_owned()),
        (HEADER_TOPIC, refusal.topic.to_owned()),
        (HEADER_PARTITION, refusal.partition.to_string()),
        (HEADER_OFFSET, record.offset.to_string()),
        // A hub topic name too long for Kafka is cut for the header too: it is the reason,
        // and the record must stay small.
        (HEADER_HUB_TOPIC, truncate_str(refusal.hub_topic, 300)),
        (HEADER_REASON, refusal.reason.to_owned()),
    ]
    .into_iter()
    .chain(
        record
            .timestamp
            .filter(|_| restamped)
            .map(|timestamp| (HEADER_TIMESTAMP, timestamp.to_string())),
    )
    .map(|(key, value)| (key.to_owned(), Some(Bytes::from(value))))
    .collect();
    let header_bytes = |headers: &[(String, Option<Bytes>)]| -> usize {
        headers
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Bytes::len))
            .sum()
    };
    let len = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len);
    let own_headers: Vec<(String, Option<Bytes>)> = record
        .headers
        .iter()
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    let original = len(&record.key) + len(&record.value) + header_bytes(&own_headers);
    // The truncation header's worst case is counted up front, so adding it cannot overflow.
    let reserved = FRAMING + header_bytes(&headers) + HEADER_TRUNCATED.len() + 20;
    let mut room = max_bytes.saturating_sub(reserved);
    let mut truncated = false;
    let key = match &record.key {
        Some(key) if key.len() <= room / 2 => {
            room -= key.len();
            Some(key.clone())
        }
        Some(_) => {
            truncated = true;
            None
        }
        None => None,
    };
    if header_bytes(&own_headers) <= room / 2 {
        room -= header_bytes(&own_headers);
        let mut all = own_headers;
        all.append(&mut headers);
        headers = all;
    } else if !own_headers.is_empty() {
        truncated = true;
    }
    let value = record.value.as_ref().map(|value| {
        if value.len() > room {
            truncated = true;
            value.slice(..room)
        } else {
            value.clone()
        }
    });
    if truncated {
        headers.push((
            HEADER_TRUNCATED.to_owned(),
            Some(Bytes::from(original.to_string())),
        ));
    }
    Copy {
        key,
        value,
        headers,
    }
}

fn truncate_str(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// The refused records of one batch as runs of consecutive records, for the agent's
/// `Rejected` frame.
#[derive(Debug, Default)]
pub struct Runs {
    ranges: Vec<RejectedRange>,
    /// Whether the last record seen was refused, so the next refused one extends its run.
    open: bool,
}

impl Runs {
    pub fn refused(&mut self, offset: i64) {
        match self.ranges.last_mut() {
            Some(run) if self.open => {
                run.last_offset = offset;
                run.records = run.records.saturating_add(1);
            }
            _ => self.ranges.push(RejectedRange {
                first_offset: offset,
                last_offset: offset,
                records: 1,
            }),
        }
        self.open = true;
    }

    pub fn accepted(&mut self) {
        self.open = false;
    }

    pub fn records(&self) -> u64 {
        self.ranges.iter().map(|r| u64::from(r.records)).sum()
    }

    pub fn into_ranges(self) -> Vec<RejectedRange> {
        self.ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spoke_proto::Header;

    fn refusal() -> Refusal<'static> {
        Refusal {
            site: "branch-042",
            topic: "orders",
            partition: 3,
            hub_topic: "branch-042.orders",
            reason: reason::TOO_LARGE,
        }
    }

    fn header<'a>(copy: &'a Copy, key: &str) -> Option<&'a [u8]> {
        copy.headers
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }

    fn size(copy: &Copy) -> usize {
        let len = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len);
        len(&copy.key)
            + len(&copy.value)
            + copy
                .headers
                .iter()
                .map(|(k, v)| k.len() + len(v))
                .sum::<usize>()
            + FRAMING
    }

    #[test]
    fn a_copy_that_fits_is_whole_and_carries_its_provenance() {
        let record = Record {
            offset: 77,
            timestamp: Some(1),
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from_static(b"value")),
            headers: vec![Header {
                key: "h".into(),
                value: Some(Bytes::from_static(b"v")),
            }],
        };
        let copy = copy(&record, &refusal(), 4096, false);
        assert_eq!(copy.key, record.key);
        assert_eq!(copy.value, record.value);
        assert_eq!(header(&copy, "h"), Some(&b"v"[..]));
        assert_eq!(header(&copy, HEADER_OFFSET), Some(&b"77"[..]));
        assert_eq!(header(&copy, HEADER_PARTITION), Some(&b"3"[..]));
        assert_eq!(header(&copy, HEADER_TOPIC), Some(&b"orders"[..]));
        assert_eq!(header(&copy, HEADER_REASON), Some(&b"too_large"[..]));
        assert_eq!(header(&copy, HEADER_TRUNCATED), None);
        assert_eq!(
            header(&copy, HEADER_TIMESTAMP),
            None,
            "its own timestamp is kept"
        );
    }

    #[test]
    fn a_restamped_copy_keeps_the_timestamp_in_a_header() {
        let record = Record {
            offset: 5,
            timestamp: Some(1_700_000_000_123),
            key: None,
            value: Some(Bytes::from_static(b"late")),
            headers: vec![],
        };
        let copy = copy(&record, &refusal(), 4096, true);
        assert_eq!(header(&copy, HEADER_TIMESTAMP), Some(&b"1700000000123"[..]));
        assert_eq!(copy.value, record.value);
    }

    #[test]
    fn a_large_record_is_cut_to_the_limit_and_says_so() {
        let record = Record {
            offset: 1,
            timestamp: None,
            key: Some(Bytes::from(vec![b'k'; 100])),
            value: Some(Bytes::from(vec![b'v'; 50_000])),
            headers: vec![],
        };
        let copy = copy(&record, &refusal(), 8192, false);
        assert!(size(&copy) <= 8192, "{} bytes", size(&copy));
        assert_eq!(copy.key, record.key, "a small key is kept");
        let value = copy.value.clone().expect("value kept in part");
        assert!(value.len() > 7000 && record.value.as_ref().is_some_and(|v| v.starts_with(&value)));
        assert_eq!(header(&copy, HEADER_TRUNCATED), Some(&b"50100"[..]));
    }

    #[test]
    fn a_limit_below_the_headers_keeps_the_provenance_only() {
        let record = Record {
            offset: 1,
            timestamp: None,
            key: Some(Bytes::from(vec![b'k'; 100])),
            value: None,
            headers: vec![],
        };
        let copy = copy(&record, &refusal(), 10, false);
        assert_eq!(copy.key, None);
        assert_eq!(copy.value, None, "a null value stays null");
        assert_eq!(header(&copy, HEADER_OFFSET), Some(&b"1"[..]));
    }

    #[test]
    fn runs_join_consecutive_refusals_only() {
        let mut runs = Runs::default();
        runs.refused(5);
        runs.refused(7);
        runs.accepted();
        runs.refused(9);
        assert_eq!(runs.records(), 3);
        let ranges = runs.into_ranges();
        assert_eq!(
            ranges,
            vec![
                RejectedRange {
                    first_offset: 5,
                    last_offset: 7,
                    records: 2
                },
                RejectedRange {
                    first_offset: 9,
                    last_offset: 9,
                    records: 1
                },
            ]
        );
    }
}
