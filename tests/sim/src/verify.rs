//! The end of a run: every hub record checked against what the sites sent, by identity (the
//! provenance headers `spoke-origin`, `spoke-partition`, `spoke-offset`) and by bytes (key
//! and value recomputed from that identity).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::records::{self, TOPIC};
use crate::site::{Outcome, Role};

/// Reading fails only when it stops making progress, not when a large hub is slow.
const STALL: Duration = Duration::from_secs(60);
/// Lost records listed by identity in the report, at most.
const EXAMPLES: usize = 10;

#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub hub_topics: usize,
    pub hub_records: u64,
    /// Records the sites generated (each once, however often resent).
    pub records: u64,
    /// Records the relay confirmed.
    pub acked: u64,
    /// Confirmed but not in the hub.
    pub lost: u64,
    /// Copies beyond the first of a (site, partition, offset).
    pub dup: u64,
    /// Hub records whose key or value differs from what their identity says.
    pub corrupt: u64,
    /// Hub records naming no record any site sent (an unknown site, partition or offset).
    pub unknown: u64,
    /// Sent and not confirmed when the run ended.
    pub unacked: u64,
    /// Of those, in the hub anyway (an Ack not yet received).
    pub unacked_in_hub: u64,
    /// Confirmed records the relay said went to the dead-letter topic instead.
    pub rejected: u64,
    pub lost_examples: Vec<String>,
    pub read_secs: f64,
}

/// Reads every hub topic the shipping sites of `outcomes` wrote to (hub topic template
/// `template`) and compares it with their ledgers.
pub fn verify(
    bootstrap: &str,
    template: &str,
    outcomes: &[Outcome],
    record_bytes: usize,
) -> anyhow::Result<Verdict> {
    let started = Instant::now();
    let mut verdict = Verdict::default();
    let by_name: HashMap<&str, &Outcome> = outcomes.iter().map(|o| (o.name.as_str(), o)).collect();
    // Per (site, partition): how often each offset below what was sent is in the hub.
    let mut seen: HashMap<(usize, i32), Vec<u8>> = HashMap::new();
    for outcome in outcomes {
        for (partition, ledger) in outcome.partitions.iter().enumerate() {
            verdict.records += ledger.sent.max(0) as u64;
            verdict.acked += ledger.acked.max(0) as u64;
            verdict.unacked += (ledger.sent - ledger.acked).max(0) as u64;
            seen.insert(
                (outcome.index, partition as i32),
                vec![0; usize::try_from(ledger.sent).unwrap_or(0)],
            );
        }
    }
    let topics: BTreeSet<String> = outcomes
        .iter()
        .filter(|o| o.role != Role::Idle && o.partitions.iter().any(|p| p.sent > 0))
        .map(|o| hub_topic(template, &o.name))
        .collect();
    verdict.hub_topics = topics.len();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "spoke-sim-verify")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // tansu returns nothing when a record batch exceeds the partition fetch size.
        .set("max.partition.fetch.bytes", "33554432")
        .create()
        .context("creating the hub reader")?;
    let mut assignment = TopicPartitionList::new();
    // Where each hub partition ends now: the sites have stopped, so nothing more comes.
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    // A hub that has just taken a flood of topics and records may not answer at once.
    let mut attempts = 0;
    let metadata = loop {
        attempts += 1;
        match consumer.fetch_metadata(None, Duration::from_secs(30)) {
            Ok(metadata) => break metadata,
            Err(error) if attempts < 5 => {
                eprintln!("reading the hub's metadata (attempt {attempts}): {error}");
                std::thread::sleep(Duration::from_secs(5));
            }
            Err(error) => return Err(error).context("reading the hub's metadata"),
        }
    };
    for topic in metadata.topics() {
        if !topics.contains(topic.name()) {
            continue;
        }
        for partition in topic.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic.name(), partition.id(), Duration::from_secs(30))
                .with_context(|| format!("watermarks of {}/{}", topic.name(), partition.id()))?;
            if high > low {
                assignment.add_partition_offset(
                    topic.name(),
                    partition.id(),
                    Offset::Offset(low),
                )?;
                ends.insert((topic.name().to_owned(), partition.id()), high);
            }
        }
    }
    let mut remaining = ends.len();
    if remaining > 0 {
        consumer.assign(&assignment)?;
    }
    let mut positions: HashMap<(String, i32), i64> = HashMap::new();
    let mut last_progress = Instant::now();
    while remaining > 0 {
        if last_progress.elapsed() > STALL {
            bail!("reading the hub: no progress for {STALL:?}, {remaining} partitions unfinished");
        }
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let Ok(message) = message else {
            // Transient (a broker hiccup); the stall check bounds the wait.
            continue;
        };
        last_progress = Instant::now();
        let at = (message.topic().to_owned(), message.partition());
        let next = message.offset() + 1;
        let end = ends.get(&at).copied().unwrap_or(i64::MAX);
        let position = positions.entry(at).or_insert(i64::MIN);
        if next <= *position {
            continue;
        }
        let was_done = *position >= end;
        *position = next;
        if !was_done && next >= end {
            remaining -= 1;
        }
        if message.offset() >= end {
            continue;
        }
        verdict.hub_records += 1;
        check(&message, &by_name, &mut seen, record_bytes, &mut verdict);
    }
    for outcome in outcomes {
        for (partition, ledger) in outcome.partitions.iter().enumerate() {
            let Some(counts) = seen.get(&(outcome.index, partition as i32)) else {
                continue;
            };
            for (offset, &count) in counts.iter().enumerate() {
                let offset = offset as i64;
                verdict.dup += u64::from(count.saturating_sub(1));
                if offset >= ledger.acked {
                    verdict.unacked_in_hub += u64::from(count > 0);
                    continue;
                }
                if count == 0 {
                    if ledger
                        .rejected
                        .iter()
                        .any(|(first, last)| (*first..=*last).contains(&offset))
                    {
                        verdict.rejected += 1;
                        continue;
                    }
                    verdict.lost += 1;
                    if verdict.lost_examples.len() < EXAMPLES {
                        verdict.lost_examples.push(records::key(
                            &outcome.name,
                            partition as i32,
                            offset,
                        ));
                    }
                }
            }
        }
    }
    verdict.read_secs = started.elapsed().as_secs_f64();
    Ok(verdict)
}

/// What the sites' ledgers say alone (records, acked, unacked), for a hub that could not be
/// read.
pub fn ledger_totals(outcomes: &[Outcome]) -> Verdict {
    let mut verdict = Verdict::default();
    for ledger in outcomes.iter().flat_map(|o| &o.partitions) {
        verdict.records += ledger.sent.max(0) as u64;
        verdict.acked += ledger.acked.max(0) as u64;
        verdict.unacked += (ledger.sent - ledger.acked).max(0) as u64;
    }
    verdict
}

pub fn hub_topic(template: &str, site: &str) -> String {
    template.replace("{site}", site).replace("{topic}", TOPIC)
}

fn check(
    message: &rdkafka::message::BorrowedMessage<'_>,
    by_name: &HashMap<&str, &Outcome>,
    seen: &mut HashMap<(usize, i32), Vec<u8>>,
    record_bytes: usize,
    verdict: &mut Verdict,
) {
    let Some((origin, partition, offset)) = provenance(message) else {
        verdict.unknown += 1;
        return;
    };
    let Some(outcome) = by_name.get(origin.as_str()) else {
        verdict.unknown += 1;
        return;
    };
    let Some(count) = seen
        .get_mut(&(outcome.index, partition))
        .and_then(|counts| usize::try_from(offset).ok().and_then(|o| counts.get_mut(o)))
    else {
        verdict.unknown += 1;
        return;
    };
    *count = count.saturating_add(1);
    let key = records::key(&origin, partition, offset);
    let value = records::value(&origin, partition, offset, record_bytes);
    if message.key() != Some(key.as_bytes()) || message.payload() != Some(value.as_slice()) {
        verdict.corrupt += 1;
    }
}

/// The last provenance triple of a hub record.
fn provenance(message: &rdkafka::message::BorrowedMessage<'_>) -> Option<(String, i32, i64)> {
    let headers = message.headers()?;
    let last = |name: &str| -> Option<String> {
        headers
            .iter()
            .filter(|h| h.key == name)
            .last()
            .and_then(|h| String::from_utf8(h.value?.to_vec()).ok())
    };
    Some((
        last("spoke-origin")?,
        last("spoke-partition")?.parse().ok()?,
        last("spoke-offset")?.parse().ok()?,
    ))
}
