//! Producing test records at the edge and reading them back, with the real rdkafka client.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// A record as Kafka stores it: what the tests compare between edge and hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub timestamp: Option<i64>,
}

/// A record read back, with where it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub offset: i64,
    pub rec: Rec,
}

/// An admin client and a runtime to wait on its futures with.
fn admin_client(
    bootstrap: &str,
) -> anyhow::Result<(AdminClient<DefaultClientContext>, tokio::runtime::Runtime)> {
    let admin = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok((admin, runtime))
}

/// The edge record with the provenance headers the relay appends.
pub fn with_provenance(rec: &Rec, site: &str, partition: i32, offset: i64) -> Rec {
    let mut expected = rec.clone();
    expected
        .headers
        .push(("spoke-origin".into(), Some(site.as_bytes().to_vec())));
    expected.headers.push((
        "spoke-partition".into(),
        Some(partition.to_string().into_bytes()),
    ));
    expected
        .headers
        .push(("spoke-offset".into(), Some(offset.to_string().into_bytes())));
    expected
}

/// `topic`'s configuration as the broker describes it (name → value).
pub fn topic_config(
    bootstrap: &str,
    topic: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let (admin, runtime) = admin_client(bootstrap)?;
    let resource = rdkafka::admin::ResourceSpecifier::Topic(topic);
    let results = runtime.block_on(admin.describe_configs([&resource], &AdminOptions::new()))?;
    let mut configs = std::collections::BTreeMap::new();
    for result in results {
        let described = result.map_err(|code| anyhow::anyhow!("describing {topic}: {code}"))?;
        for entry in described.entries {
            if let Some(value) = entry.value {
                configs.insert(entry.name, value);
            }
        }
    }
    Ok(configs)
}

pub fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    create_topic_with(bootstrap, topic, partitions, &[])
}

/// Creates `topic` with topic configuration `configs` (name, value).
pub fn create_topic_with(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) -> anyhow::Result<()> {
    let (admin, runtime) = admin_client(bootstrap)?;
    let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
    for (name, value) in configs {
        new_topic = new_topic.set(name, value);
    }
    let results = runtime.block_on(admin.create_topics([&new_topic], &AdminOptions::new()))?;
    for result in results {
        result.map_err(|(name, code)| anyhow::anyhow!("creating {name}: {code}"))?;
    }
    Ok(())
}

pub fn producer(bootstrap: &str) -> anyhow::Result<BaseProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("message.max.bytes", "16777216")
        .create()?)
}

/// Produces `records` to `topic`/`partition` in order and waits until all are acknowledged.
pub fn produce(
    producer: &BaseProducer,
    topic: &str,
    partition: i32,
    records: &[Rec],
) -> anyhow::Result<()> {
    for rec in records {
        send(producer, rec.to(topic, partition))?;
    }
    producer
        .flush(Duration::from_secs(60))
        .context("flushing the test producer")?;
    Ok(())
}

/// Hands one record to the producer, waiting while its local queue is full.
pub fn send(producer: &BaseProducer, record: BaseRecord<'_, [u8], [u8]>) -> anyhow::Result<()> {
    let mut pending = record;
    loop {
        match producer.send(pending) {
            Ok(()) => break,
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                back,
            )) => {
                producer.poll(Duration::from_millis(10));
                pending = back;
            }
            Err((error, back)) => {
                bail!("producing to {}/{:?}: {error}", back.topic, back.partition)
            }
        }
    }
    producer.poll(Duration::ZERO);
    Ok(())
}

impl Rec {
    /// This record as a producer record for `topic`/`partition`.
    pub fn to<'a>(&'a self, topic: &'a str, partition: i32) -> BaseRecord<'a, [u8], [u8]> {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len());
        for (key, value) in &self.headers {
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        let mut record = BaseRecord::to(topic).partition(partition).headers(headers);
        if let Some(key) = &self.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &self.value {
            record = record.payload(value.as_slice());
        }
        if let Some(ts) = self.timestamp {
            record = record.timestamp(ts);
        }
        record
    }
}

fn consumer(bootstrap: &str) -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "spoke-test-reader")
        // tansu returns nothing (instead of the first batch, as Kafka does) when a record
        // batch exceeds the partition fetch size; 1 MiB values need room.
        .set("max.partition.fetch.bytes", "33554432")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?)
}

/// (low, high) watermarks; (0, 0) when the topic does not exist yet.
pub fn watermarks(bootstrap: &str, topic: &str, partition: i32) -> anyhow::Result<(i64, i64)> {
    let consumer = consumer(bootstrap)?;
    if !topic_exists(&consumer, topic)? {
        return Ok((0, 0));
    }
    Ok(consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?)
}

pub fn topic_names(bootstrap: &str) -> anyhow::Result<Vec<String>> {
    let consumer = consumer(bootstrap)?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| t.name().to_owned())
        .collect())
}

fn topic_exists(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<bool> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
}

/// Every record of `topic`/`partition`, from the start up to the high watermark.
pub fn read_partition(bootstrap: &str, topic: &str, partition: i32) -> anyhow::Result<Vec<Stored>> {
    let consumer = consumer(bootstrap)?;
    if !topic_exists(&consumer, topic)? {
        return Ok(Vec::new());
    }
    let (low, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    let mut out = Vec::new();
    if high <= low {
        return Ok(out);
    }
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(low))?;
    consumer.assign(&assignment)?;
    // Fails only when reading stops making progress, not when a large partition is slow.
    let mut last_progress = Instant::now();
    let mut next = low;
    while next < high {
        if last_progress.elapsed() > Duration::from_secs(30) {
            bail!("reading {topic}/{partition}: stuck at offset {next} of {high}");
        }
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            // A partition may end in transaction markers, which no consumer returns; the
            // position still passes them.
            if position(&consumer, topic, partition)?.is_some_and(|at| at >= high) {
                break;
            }
            continue;
        };
        last_progress = Instant::now();
        let message = message?;
        next = message.offset() + 1;
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Stored {
            offset: message.offset(),
            rec: Rec {
                key: message.key().map(<[u8]>::to_vec),
                value: message.payload().map(<[u8]>::to_vec),
                headers,
                timestamp: message.timestamp().to_millis(),
            },
        });
    }
    Ok(out)
}

/// The consumer's position in `topic`/`partition`, if it has one.
fn position(consumer: &BaseConsumer, topic: &str, partition: i32) -> anyhow::Result<Option<i64>> {
    let position = consumer.position()?;
    Ok(position
        .find_partition(topic, partition)
        .and_then(|element| match element.offset() {
            Offset::Offset(next) => Some(next),
            _ => None,
        }))
}

/// Records that `topic`'s partitions `0..partitions` hold: high minus low watermark, summed.
pub fn records_held(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<i64> {
    let mut total = 0;
    for partition in 0..partitions {
        let (low, high) = watermarks(bootstrap, topic, partition)?;
        total += high - low;
    }
    Ok(total)
}

/// [`assert_replicated`] for each of `topic`'s partitions `0..partitions`; the records
/// compared.
pub fn assert_all_replicated(
    edge: &str,
    hub: &str,
    site: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<usize> {
    let mut total = 0;
    for partition in 0..partitions {
        total += assert_replicated(edge, hub, site, topic, partition)?;
    }
    Ok(total)
}

/// Asserts that the hub partition holds exactly the edge partition's records, in order, each
/// with its provenance headers appended: no more, no fewer, byte for byte.
pub fn assert_replicated(
    edge: &str,
    hub: &str,
    site: &str,
    topic: &str,
    partition: i32,
) -> anyhow::Result<usize> {
    let source = read_partition(edge, topic, partition)?;
    let hub_topic = format!("{site}.{topic}");
    let replica = read_partition(hub, &hub_topic, partition)?;
    if source.len() != replica.len() {
        let hub_offsets: BTreeMap<i64, usize> =
            replica
                .iter()
                .filter_map(source_offset)
                .fold(BTreeMap::new(), |mut m, o| {
                    *m.entry(o).or_default() += 1;
                    m
                });
        let duplicated = hub_offsets.values().filter(|n| **n > 1).count();
        let missing = source
            .iter()
            .filter(|s| !hub_offsets.contains_key(&s.offset))
            .count();
        bail!(
            "{topic}/{partition}: edge has {} records, hub {hub_topic} has {} ({missing} missing, {duplicated} duplicated)",
            source.len(),
            replica.len()
        );
    }
    for (s, r) in source.iter().zip(&replica) {
        let expected = with_provenance(&s.rec, site, partition, s.offset);
        if expected != r.rec {
            bail!(
                "{topic}/{partition}: edge offset {} differs from hub offset {}:\n edge+provenance {:?}\n hub {:?}",
                s.offset,
                r.offset,
                abbreviate(&expected),
                abbreviate(&r.rec)
            );
        }
    }
    Ok(source.len())
}

/// For hubs that may legitimately miss records (reported losses): every hub record must be a
/// byte-exact copy of the edge record at its `spoke-offset`, in edge order, each at most once.
/// Hub records older than anything left at the edge (deleted there after replication) are
/// only checked for order. Returns the edge offsets missing from the hub.
pub fn missing_from_hub(
    edge: &str,
    hub: &str,
    site: &str,
    topic: &str,
    partition: i32,
) -> anyhow::Result<Vec<i64>> {
    let source = read_partition(edge, topic, partition)?;
    let replica = read_partition(hub, &format!("{site}.{topic}"), partition)?;
    let by_offset: BTreeMap<i64, &Stored> = source.iter().map(|s| (s.offset, s)).collect();
    // Records the edge deleted after they were replicated are not the hub's fault.
    let edge_low = source.first().map_or(i64::MAX, |s| s.offset);
    let mut previous = -1;
    let mut seen = std::collections::BTreeSet::new();
    for r in &replica {
        let offset = source_offset(r).context("hub record without spoke-offset")?;
        if offset <= previous {
            bail!("{topic}/{partition}: hub order broken or duplicate at source offset {offset}");
        }
        previous = offset;
        seen.insert(offset);
        if offset < edge_low {
            continue;
        }
        let s = by_offset
            .get(&offset)
            .with_context(|| format!("hub has source offset {offset} the edge does not"))?;
        let expected = with_provenance(&s.rec, site, partition, offset);
        if expected != r.rec {
            bail!("{topic}/{partition}: hub copy of source offset {offset} differs");
        }
    }
    Ok(source
        .iter()
        .map(|s| s.offset)
        .filter(|o| !seen.contains(o))
        .collect())
}

fn source_offset(stored: &Stored) -> Option<i64> {
    stored
        .rec
        .headers
        .iter()
        .rev()
        .find(|(k, _)| k == "spoke-offset")
        .and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok()?.parse().ok())
}

fn abbreviate(rec: &Rec) -> String {
    let short = |b: &Option<Vec<u8>>| {
        b.as_ref().map(|v| {
            if v.len() > 32 {
                format!("{} bytes", v.len())
            } else {
                format!("{v:?}")
            }
        })
    };
    format!(
        "key={:?} value={:?} ts={:?} headers={:?}",
        short(&rec.key),
        short(&rec.value),
        rec.timestamp,
        rec.headers
            .iter()
            .map(|(k, v)| (k, short(v)))
            .collect::<Vec<_>>()
    )
}
