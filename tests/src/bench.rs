//! The benchmark behind `scripts/bench`: spoke against a direct mirror (the MirrorMaker
//! pattern: a consumer on the hub side pulling from the edge broker and producing into the
//! hub) and against the physical limit, on the same brokers and record mixes, in one run.
//!
//! Figures are measured, never assumed; each (scenario, system) becomes one JSON object.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;

use crate::admin;
use crate::kafka;
use crate::site::{AgentOptions, Env, SITE};

pub const TOPIC: &str = "bench";
pub const PARTITIONS: i32 = 3;

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

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// How one system did on one scenario.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub records_per_s: f64,
    pub wire_bytes_per_record: Option<f64>,
    pub spool_bytes_per_record: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub agent_rss_mib: Option<f64>,
    pub agent_cpu_s: Option<f64>,
}

/// Run sizes.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Records in the backlog each system moves.
    pub records: usize,
    /// Seconds of 1,000 records/s for the latency figures.
    pub latency_secs: u64,
}

fn edge_producer(bootstrap: &str, zstd: bool) -> anyhow::Result<BaseProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", if zstd { "zstd" } else { "none" })
        .set("message.max.bytes", "16777216")
        .create()?)
}

/// Produces records `range` of `mix` round-robin over the partitions and waits for all.
fn produce(
    producer: &BaseProducer,
    topic: &str,
    mix: &Mix,
    range: std::ops::Range<usize>,
) -> anyhow::Result<()> {
    for i in range {
        let partition = (i % PARTITIONS as usize) as i32;
        kafka::send(producer, mix.record(i).to(topic, partition))?;
    }
    producer
        .flush(Duration::from_secs(120))
        .context("flushing")?;
    Ok(())
}

fn total(bootstrap: &str, topic: &str) -> anyhow::Result<i64> {
    let mut sum = 0;
    for p in 0..PARTITIONS {
        let (low, high) = kafka::watermarks(bootstrap, topic, p)?;
        sum += high - low;
    }
    Ok(sum)
}

/// Waits until `topic` holds `expected` records and returns when the last one was seen.
/// `on_poll` runs between checks.
fn drained(
    bootstrap: &str,
    topic: &str,
    expected: i64,
    mut on_poll: impl FnMut(Instant),
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(1_800);
    loop {
        let n = total(bootstrap, topic)?;
        let now = Instant::now();
        if n > expected {
            bail!("{topic} holds {n} records, more than the {expected} sent: duplicates");
        }
        if n == expected {
            return Ok(now);
        }
        if now > deadline {
            bail!("{topic} holds {n} of {expected} records after 30 min");
        }
        on_poll(now);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Records per second from the system's first read at the edge to the last record in the
/// hub: process start-up, handshakes and consumer joins are left out for every system alike,
/// and the backlog's whole journey is in.
fn rate(records: usize, first_read: Option<Instant>, last: Instant) -> anyhow::Result<f64> {
    let first = first_read.context("the system never read from the edge")?;
    let secs = last.duration_since(first).as_secs_f64().max(0.001);
    Ok(records as f64 / secs)
}

/// Peak RSS (VmHWM) in MiB and CPU seconds (user + system) of a process.
fn process_figures(pid: u32) -> (Option<f64>, Option<f64>) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib / 1024.0)
        });
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command (which may contain spaces) start after the last ')'.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        });
    (rss, cpu)
}

/// Latencies (ms) from edge produce to hub visibility, at 1,000 records/s for `secs`.
fn measure_latency(
    env: &Env,
    hub_topic: &str,
    mix: &Mix,
    first: usize,
    secs: u64,
) -> anyhow::Result<(f64, f64)> {
    let count = usize::try_from(secs * 1_000).unwrap_or(usize::MAX);
    let hub = env.hub.bootstrap();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &hub)
        .set("group.id", "spoke-bench-latency")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .set("max.partition.fetch.bytes", "33554432")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        let (_, high) = consumer.fetch_watermarks(hub_topic, p, Duration::from_secs(10))?;
        assignment.add_partition_offset(hub_topic, p, Offset::Offset(high))?;
    }
    consumer.assign(&assignment)?;

    let producer = edge_producer(&env.edge.bootstrap(), mix.edge_zstd)?;
    let paced = *mix;
    let writer = std::thread::spawn(move || -> anyhow::Result<()> {
        let start = Instant::now();
        for n in 0..count {
            let due = start + Duration::from_micros(n as u64 * 1_000);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            produce_one(&producer, &paced, first + n)?;
        }
        producer.flush(Duration::from_secs(60))?;
        Ok(())
    });
    let mut latencies = Vec::with_capacity(count);
    let deadline = Instant::now() + Duration::from_secs(secs + 120);
    while latencies.len() < count && Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message?;
            if let Some(ts) = message.timestamp().to_millis() {
                latencies.push((now_ms() - ts) as f64);
            }
        }
    }
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("latency producer panicked"))??;
    if latencies.len() < count {
        bail!(
            "only {} of {count} latency records reached the hub",
            latencies.len()
        );
    }
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    Ok((pick(0.50), pick(0.99)))
}

fn produce_one(producer: &BaseProducer, mix: &Mix, i: usize) -> anyhow::Result<()> {
    let mut rec = mix.record(i);
    rec.timestamp = Some(now_ms());
    kafka::send(producer, rec.to(TOPIC, (i % PARTITIONS as usize) as i32))
}

/// spoke: relay and agent processes; the backlog of `plan.records` waits at the edge.
pub fn run_spoke(mix: &Mix, plan: &Plan) -> anyhow::Result<Figures> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), TOPIC, PARTITIONS)?;
    let producer = edge_producer(&env.edge.bootstrap(), mix.edge_zstd)?;
    produce(&producer, TOPIC, mix, 0..plan.records)?;
    let hub_topic = format!("{SITE}.{TOPIC}");

    let _relay = env.start_relay(&[TOPIC])?;
    let agent = env.start_agent(&AgentOptions::include(&[TOPIC]))?;
    let pid = agent.pid().context("agent has no pid")?;
    // Sample the spool while the backlog moves: bytes per spooled record on disk.
    let mut spool_per_record: Option<f64> = None;
    let agent_admin = env.agent_admin();
    let mut polls = 0u32;
    let mut first_read = None;
    let last = drained(
        &env.hub.bootstrap(),
        &hub_topic,
        plan.records as i64,
        |now| {
            polls += 1;
            if first_read.is_some() && polls % 5 != 0 {
                return;
            }
            let Ok(m) = admin::scrape(&agent_admin) else {
                return;
            };
            let spooled = admin::sum(&m, "spoke_agent_records_spooled_total", &[]);
            if spooled > 0.0 && first_read.is_none() {
                first_read = Some(now);
            }
            let bytes = admin::sum(&m, "spoke_agent_spool_bytes", &[]);
            let held = spooled - admin::sum(&m, "spoke_agent_records_acked_total", &[]);
            if held >= 100.0 && bytes > 0.0 {
                spool_per_record = Some(bytes / held);
            }
        },
    )?;
    let rate = rate(plan.records, first_read, last)?;
    let metrics = admin::scrape(&env.agent_admin())?;
    let wire = admin::sum(&metrics, "spoke_agent_wire_bytes_total", &[]);
    let (p50, p99) = measure_latency(&env, &hub_topic, mix, plan.records, plan.latency_secs)?;
    let (rss, cpu) = process_figures(pid);
    Ok(Figures {
        records_per_s: rate,
        wire_bytes_per_record: Some(wire / plan.records as f64),
        spool_bytes_per_record: spool_per_record,
        p50_ms: Some(p50),
        p99_ms: Some(p99),
        agent_rss_mib: rss,
        agent_cpu_s: cpu,
    })
}

/// Bytes a client received from brokers, from librdkafka's statistics.
#[derive(Default)]
struct RxBytes(Arc<AtomicU64>);

impl ClientContext for RxBytes {
    fn stats(&self, statistics: Statistics) {
        let rx: u64 = statistics.brokers.values().map(|b| b.rxbytes).sum();
        self.0.store(rx, Ordering::Relaxed);
    }
}

impl ConsumerContext for RxBytes {}

/// The direct mirror: one consumer pulling from the edge with large fetches, one zstd
/// producer into the hub, as MirrorMaker does, in this process.
pub fn run_mirror(mix: &Mix, plan: &Plan) -> anyhow::Result<Figures> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), TOPIC, PARTITIONS)?;
    let hub_topic = format!("{SITE}.{TOPIC}");
    kafka::create_topic(&env.hub.bootstrap(), &hub_topic, PARTITIONS)?;
    let producer = edge_producer(&env.edge.bootstrap(), mix.edge_zstd)?;
    produce(&producer, TOPIC, mix, 0..plan.records)?;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rx = Arc::new(AtomicU64::new(0));
    let first_read = Arc::new(std::sync::OnceLock::new());
    let mirror = {
        let (edge, hub, stop, rx, first_read) = (
            env.edge.bootstrap(),
            env.hub.bootstrap(),
            stop.clone(),
            rx.clone(),
            first_read.clone(),
        );
        let hub_topic = hub_topic.clone();
        std::thread::spawn(move || mirror_loop(&edge, &hub, &hub_topic, &stop, rx, &first_read))
    };
    let rate = drained(
        &env.hub.bootstrap(),
        &hub_topic,
        plan.records as i64,
        |_| {},
    )
    .and_then(|last| rate(plan.records, first_read.get().copied(), last));
    let wire = rx.load(Ordering::Relaxed) as f64;
    let latency = match &rate {
        Ok(_) => measure_latency(&env, &hub_topic, mix, plan.records, plan.latency_secs),
        Err(error) => Err(anyhow::anyhow!("{error:#}")),
    };
    stop.store(true, Ordering::Relaxed);
    mirror
        .join()
        .map_err(|_| anyhow::anyhow!("mirror thread panicked"))??;
    let (p50, p99) = latency?;
    Ok(Figures {
        records_per_s: rate?,
        wire_bytes_per_record: Some(wire / plan.records as f64),
        spool_bytes_per_record: None,
        p50_ms: Some(p50),
        p99_ms: Some(p99),
        agent_rss_mib: None,
        agent_cpu_s: None,
    })
}

fn mirror_loop(
    edge: &str,
    hub: &str,
    hub_topic: &str,
    stop: &std::sync::atomic::AtomicBool,
    rx: Arc<AtomicU64>,
    first_read: &std::sync::OnceLock<Instant>,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer<RxBytes> = ClientConfig::new()
        .set("bootstrap.servers", edge)
        .set("group.id", "spoke-bench-mirror")
        .set("enable.auto.commit", "false")
        .set("fetch.max.bytes", "67108864")
        .set("max.partition.fetch.bytes", "16777216")
        .set("fetch.min.bytes", "1048576")
        .set("fetch.wait.max.ms", "100")
        .set("queued.max.messages.kbytes", "262144")
        .set("statistics.interval.ms", "500")
        .create_with_context(RxBytes(rx))?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment.add_partition_offset(TOPIC, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", hub)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "zstd")
        .set("linger.ms", "50")
        .set("batch.size", "1000000")
        .set("message.max.bytes", "16777216")
        .create()?;
    while !stop.load(Ordering::Relaxed) {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            producer.poll(Duration::ZERO);
            continue;
        };
        let message = message?;
        first_read.get_or_init(Instant::now);
        let mut headers = OwnedHeaders::new();
        if let Some(source) = message.headers() {
            for header in source.iter() {
                headers = headers.insert(Header {
                    key: header.key,
                    value: header.value,
                });
            }
        }
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(hub_topic)
            .partition(message.partition())
            .headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(value) = message.payload() {
            record = record.payload(value);
        }
        if let Some(ts) = message.timestamp().to_millis() {
            record = record.timestamp(ts);
        }
        kafka::send(&producer, record).context("mirror produce")?;
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(())
}

/// The brokers' own ceiling, alone: producing the backlog straight into a hub topic (the
/// faster of zstd and plain batches) and reading it back from the edge. Also the zstd-compressed
/// bytes per record Kafka itself would store and send, and (second) the hub's ingest rate for
/// the same records carrying spoke's three provenance headers.
pub fn run_limit(mix: &Mix, plan: &Plan) -> anyhow::Result<(Figures, f64)> {
    let env = Env::new()?;
    // The hub's ingest ceiling, whichever way is faster for this broker: zstd batches (as
    // the mirror writes) or plain ones (as spoke's relay writes).
    let mut hub_rate: f64 = 0.0;
    for compression in ["zstd", "none"] {
        let topic = format!("ceiling-{compression}");
        kafka::create_topic(&env.hub.bootstrap(), &topic, PARTITIONS)?;
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", env.hub.bootstrap())
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", compression)
            .set("linger.ms", "50")
            .set("batch.size", "1000000")
            .set("message.max.bytes", "16777216")
            .create()?;
        let start = Instant::now();
        produce(&producer, &topic, mix, 0..plan.records)?;
        hub_rate = hub_rate.max(plan.records as f64 / start.elapsed().as_secs_f64());
    }
    // What spoke's exactly-once costs the hub: the same records with the three provenance
    // headers the relay appends (tansu stores every header as a row of its own).
    kafka::create_topic(&env.hub.bootstrap(), "ceiling-provenance", PARTITIONS)?;
    let producer = kafka::producer(&env.hub.bootstrap())?;
    let start = Instant::now();
    for i in 0..plan.records {
        let partition = (i % PARTITIONS as usize) as i32;
        let mut rec = mix.record(i);
        rec.headers = vec![
            ("spoke-origin".into(), Some(SITE.as_bytes().to_vec())),
            (
                "spoke-partition".into(),
                Some(partition.to_string().into_bytes()),
            ),
            ("spoke-offset".into(), Some(i.to_string().into_bytes())),
        ];
        kafka::send(&producer, rec.to("ceiling-provenance", partition))?;
    }
    producer
        .flush(Duration::from_secs(120))
        .context("flushing")?;
    let with_provenance = plan.records as f64 / start.elapsed().as_secs_f64();

    // Reading from the edge as this scenario stores it (the rate), and the same records
    // stored as Kafka's own zstd batches (their size on the fetch path).
    let (edge_rate, _) = read_edge_alone(&env, mix, plan, mix.edge_zstd, "edge-own")?;
    let (_, kafka_zstd_bytes) = read_edge_alone(&env, mix, plan, true, "edge-zstd")?;
    Ok((
        Figures {
            records_per_s: hub_rate.min(edge_rate),
            wire_bytes_per_record: Some(kafka_zstd_bytes),
            ..Figures::default()
        },
        with_provenance,
    ))
}

/// Produces the backlog into an edge topic (zstd or plain batches), reads it back alone, and
/// returns the read rate and the bytes fetched per record.
fn read_edge_alone(
    env: &Env,
    mix: &Mix,
    plan: &Plan,
    zstd: bool,
    topic: &str,
) -> anyhow::Result<(f64, f64)> {
    kafka::create_topic(&env.edge.bootstrap(), topic, PARTITIONS)?;
    let producer = edge_producer(&env.edge.bootstrap(), zstd)?;
    produce(&producer, topic, mix, 0..plan.records)?;
    let rx = Arc::new(AtomicU64::new(0));
    let consumer: BaseConsumer<RxBytes> = ClientConfig::new()
        .set("bootstrap.servers", env.edge.bootstrap())
        .set("group.id", "spoke-bench-ceiling")
        .set("enable.auto.commit", "false")
        .set("fetch.max.bytes", "67108864")
        .set("max.partition.fetch.bytes", "16777216")
        .set("statistics.interval.ms", "200")
        .create_with_context(RxBytes(rx.clone()))?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let start = Instant::now();
    let mut read = 0usize;
    while read < plan.records {
        if start.elapsed() > Duration::from_secs(1_800) {
            bail!("reading the edge alone: {read} of {} records", plan.records);
        }
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            message?;
            read += 1;
        }
    }
    let rate = plan.records as f64 / start.elapsed().as_secs_f64();
    // Let the last statistics interval report the fetched bytes.
    std::thread::sleep(Duration::from_millis(400));
    consumer.poll(Duration::from_millis(10));
    Ok((
        rate,
        rx.load(Ordering::Relaxed) as f64 / plan.records as f64,
    ))
}

/// One JSON object of `target/bench/latest.json`.
pub fn result_json(
    scenario: &str,
    link: &str,
    system: &str,
    figures: &Figures,
    baseline: Option<f64>,
    limit: f64,
) -> serde_json::Value {
    json!({
        "scenario": scenario,
        "link": link,
        "system": system,
        "records_per_s": round(figures.records_per_s),
        "wire_bytes_per_record": figures.wire_bytes_per_record.map(round),
        "spool_bytes_per_record": figures.spool_bytes_per_record.map(round),
        "p50_ms": figures.p50_ms.map(round),
        "p99_ms": figures.p99_ms.map(round),
        "agent_rss_mib": figures.agent_rss_mib.map(round),
        "agent_cpu_s": figures.agent_cpu_s.map(round),
        "ratio_to_baseline": baseline.map(|b| round(figures.records_per_s / b)),
        "pct_of_limit": round(100.0 * figures.records_per_s / limit),
    })
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Every mix of the issue: 100 B, 1 KiB, 10 KiB; JSON-like and random; edge plain and zstd.
pub fn all_mixes() -> Vec<Mix> {
    let mut mixes = Vec::new();
    for size in [100, 1024, 10 * 1024] {
        for kind in [Kind::Json, Kind::Random] {
            for edge_zstd in [false, true] {
                mixes.push(Mix {
                    kind,
                    size,
                    edge_zstd,
                });
            }
        }
    }
    mixes
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
