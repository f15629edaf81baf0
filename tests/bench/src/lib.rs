//! The benchmark behind `scripts/bench`: spoke against a direct mirror (the MirrorMaker
//! pattern: a consumer on the hub side pulling from the edge broker and producing into the
//! hub) and against the physical limit, on the same brokers and record mixes, in one run.
//!
//! Figures are measured, never assumed; each (scenario, system) becomes one JSON object.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;

use spoke_tests::admin;
use spoke_tests::kafka;
use spoke_tests::mix::{now_ms, Kind, Mix};
use spoke_tests::site::{AgentOptions, Env, Placement, RelayOptions, SITE};
use spoke_wan::{Link, LinkSpec};

pub const TOPIC: &str = "bench";
pub const PARTITIONS: i32 = 3;

/// How one system did on one scenario.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub records_per_s: f64,
    /// Over an emulated link: the IP bytes the link delivered, both directions, per record
    /// moved (packets the sender overran the bottleneck queue with are in `link_packets`,
    /// not here). On loopback: the application's own count.
    pub wire_bytes_per_record: Option<f64>,
    pub spool_bytes_per_record: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The records/s the latency figures were taken at.
    pub latency_rate: Option<f64>,
    pub agent_rss_mib: Option<f64>,
    pub agent_cpu_s: Option<f64>,
    /// Agent CPU while nothing is produced, in % of one core.
    pub agent_idle_cpu_pct: Option<f64>,
    /// Over an emulated link, while the backlog moved: packets that entered it, and those
    /// dropped at its bottleneck queue and lost at random, both directions.
    pub link_packets: Option<LinkCounts>,
    /// Over an emulated link, the records/s once the system's start is behind it: see
    /// [`LinkPace`].
    pub pace_per_s: Option<f64>,
    /// The records moved, for per-record link figures.
    pub records: usize,
}

/// Counters of an emulated link over an interval, both directions.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkCounts {
    pub packets: u64,
    pub queue_dropped: u64,
    pub lost: u64,
    /// IP bytes senders offered to the link, dropped ones included.
    pub offered_bytes: u64,
    /// IP bytes the link delivered.
    pub delivered_bytes: u64,
    /// Of `packets`, those the hub side sent (acknowledgements, for both systems).
    pub packets_back: u64,
    /// Of `delivered_bytes`, those delivered to the edge side.
    pub delivered_bytes_back: u64,
}

impl LinkCounts {
    fn of(link: &Link) -> LinkCounts {
        let s = link.stats();
        let (a, b) = (s.edge_to_hub, s.hub_to_edge);
        LinkCounts {
            packets: a.packets_in + b.packets_in,
            queue_dropped: a.queue_dropped + b.queue_dropped,
            lost: a.lost + b.lost,
            offered_bytes: a.bytes_in + b.bytes_in,
            delivered_bytes: a.delivered_bytes + b.delivered_bytes,
            packets_back: b.packets_in,
            delivered_bytes_back: b.delivered_bytes,
        }
    }

    fn since(self, before: LinkCounts) -> LinkCounts {
        LinkCounts {
            packets: self.packets - before.packets,
            queue_dropped: self.queue_dropped - before.queue_dropped,
            lost: self.lost - before.lost,
            offered_bytes: self.offered_bytes - before.offered_bytes,
            delivered_bytes: self.delivered_bytes - before.delivered_bytes,
            packets_back: self.packets_back - before.packets_back,
            delivered_bytes_back: self.delivered_bytes_back - before.delivered_bytes_back,
        }
    }
}

/// The bytes an emulated link delivered over time while a backlog moved, for the pace of a
/// system once its start (connection set-up, the congestion window's first round trips) is
/// behind it: a short backlog's rate from the start cannot tell that start from the pace.
///
/// The hub's record count cannot give the pace either: between the link and the count sit a
/// window of unacknowledged batches and a producer queue whose fill differs between any two
/// readings (a rate between two such readings came out at 123% of the link). The link's byte
/// counters are exact to a packet.
#[derive(Debug)]
pub struct LinkPace {
    /// (when, bytes delivered both directions since the link started); one sample per poll of
    /// the hub, whose 30-minute deadline bounds them.
    samples: Vec<(Instant, u64)>,
}

impl LinkPace {
    /// Starts sampling now, or never on loopback.
    fn start(link: Option<&Link>) -> Option<LinkPace> {
        link.map(|link| LinkPace {
            samples: vec![(Instant::now(), LinkCounts::of(link).delivered_bytes)],
        })
    }

    fn sample(&mut self, link: &Link, at: Instant) {
        self.samples
            .push((at, LinkCounts::of(link).delivered_bytes));
    }

    /// Records per second over the middle half of the bytes: from the instant a quarter of
    /// them had crossed to the instant three quarters had, at `bytes_per_record` (the run's
    /// own, so retransmissions and headers are charged as in its wire figure).
    fn middle_half_per_s(&self, bytes_per_record: f64) -> Option<f64> {
        let (&(_, first), &(_, last)) = (self.samples.first()?, self.samples.last()?);
        let total = last.checked_sub(first)? as f64;
        let quarter = self.crossing(first as f64 + total / 4.0)?;
        let three_quarters = self.crossing(first as f64 + total * 3.0 / 4.0)?;
        let secs = three_quarters.duration_since(quarter).as_secs_f64();
        (secs > 0.0 && bytes_per_record > 0.0).then(|| total / 2.0 / secs / bytes_per_record)
    }

    /// When the delivered bytes reached `bytes`, interpolated between the samples around it.
    fn crossing(&self, bytes: f64) -> Option<Instant> {
        let after = self.samples.iter().position(|&(_, b)| b as f64 >= bytes)?;
        let (at, b) = self.samples[after];
        let Some(&(before_at, before_b)) = after.checked_sub(1).map(|i| &self.samples[i]) else {
            return Some(at);
        };
        let fraction = (bytes - before_b as f64) / (b - before_b).max(1) as f64;
        Some(
            before_at
                + at.duration_since(before_at)
                    .mul_f64(fraction.clamp(0.0, 1.0)),
        )
    }
}

/// Run sizes.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Records in the backlog each system moves (at most; see `link_secs`).
    pub records: usize,
    /// Seconds of paced production for the latency figures.
    pub latency_secs: u64,
    /// Records/s of that production, lowered to half the limit where the link cannot carry it.
    pub latency_rate: f64,
    /// Over an emulated link, the backlog is cut to what the limit moves in this many seconds,
    /// so that a 2 Mbit/s profile does not take an hour per system.
    pub link_secs: f64,
    /// The outage scenario's cut, in seconds (0: no outage scenario).
    pub outage_secs: u64,
}

/// One emulated link of the issue. Delays are one-way, as netem's are: the RTT is twice.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub name: &'static str,
    pub spec: LinkSpec,
}

pub fn profiles() -> Vec<Profile> {
    let ms = Duration::from_millis;
    vec![
        Profile {
            name: "100Mbit-50ms-0.1%",
            spec: LinkSpec::new(100_000_000, ms(50), 0.001),
        },
        Profile {
            name: "20Mbit-100ms-1%",
            spec: LinkSpec::new(20_000_000, ms(100), 0.01),
        },
        Profile {
            name: "2Mbit-300ms-3%",
            spec: LinkSpec::new(2_000_000, ms(300), 0.03),
        },
    ]
}

/// What one system moves, and over what.
#[derive(Debug, Clone, Copy)]
pub struct Scenario<'a> {
    pub mix: Mix,
    /// None: loopback.
    pub link: Option<&'a Link>,
    pub records: usize,
    pub latency_rate: f64,
    pub latency_secs: u64,
    /// TOML appended to the agent's configuration, for tuning experiments (e.g.
    /// `[ship]` + `window_bytes = "4MiB"`); empty for the defaults.
    pub agent_extra: &'a str,
    /// TOML appended to the relay's configuration, likewise (e.g. `[hub.kafka]` +
    /// `"linger.ms" = "20"`).
    pub relay_extra: &'a str,
}

impl Scenario<'_> {
    /// The link's counters now, to measure an interval from (None on loopback).
    fn link_counts(&self) -> Option<LinkCounts> {
        self.link.map(LinkCounts::of)
    }

    /// The link's counters since `before` was taken.
    fn link_counts_since(&self, before: Option<LinkCounts>) -> Option<LinkCounts> {
        self.link_counts()
            .zip(before)
            .map(|(after, before)| after.since(before))
    }

    fn env(&self) -> anyhow::Result<Env> {
        Env::placed(
            self.link
                .map_or_else(Placement::loopback, Placement::across),
        )
    }
}

/// What the brokers alone can do with a mix, measured on loopback.
#[derive(Debug, Clone, Copy)]
pub struct Ceiling {
    /// The lower of the hub's ingest and the edge's read, records/s.
    pub brokers_per_s: f64,
    /// Kafka's own zstd batches, bytes per record on the fetch path.
    pub kafka_zstd_bytes: f64,
    /// The hub's ingest of the same records with spoke's three provenance headers.
    pub hub_with_provenance_per_s: f64,
}

impl Ceiling {
    /// The physical limit over `link`: the lower of the brokers' ceiling and the link rate
    /// divided by Kafka's zstd bytes per record.
    pub fn limit(&self, link: Option<&LinkSpec>) -> f64 {
        match link {
            Some(spec) if spec.rate_bps > 0 => self
                .brokers_per_s
                .min(spec.rate_bps as f64 / 8.0 / self.kafka_zstd_bytes),
            _ => self.brokers_per_s,
        }
    }
}

fn edge_producer(env: &Env, zstd: bool) -> anyhow::Result<BaseProducer> {
    edge_producer_lingering(env, zstd, 20)
}

fn edge_producer_lingering(env: &Env, zstd: bool, linger_ms: u32) -> anyhow::Result<BaseProducer> {
    let bootstrap = env.edge.bootstrap();
    env.on_edge(|| {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("enable.idempotence", "true")
            .set("linger.ms", linger_ms.to_string())
            .set("batch.size", "1000000")
            .set("compression.type", if zstd { "zstd" } else { "none" })
            .set("message.max.bytes", "16777216")
            .create()?)
    })
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
        .flush(Duration::from_secs(600))
        .context("flushing")?;
    Ok(())
}

/// Counts a topic's records with one long-lived client: polled every few milliseconds, a
/// client per call would cost the CPU the systems under test need.
struct Counter {
    consumer: BaseConsumer,
    topic: String,
    exists: bool,
}

impl Counter {
    fn new(bootstrap: &str, topic: &str) -> anyhow::Result<Counter> {
        Ok(Counter {
            consumer: ClientConfig::new()
                .set("bootstrap.servers", bootstrap)
                .set("group.id", "spoke-bench-counter")
                .create()?,
            topic: topic.to_owned(),
            exists: false,
        })
    }

    fn total(&mut self) -> anyhow::Result<i64> {
        let timeout = Duration::from_secs(10);
        if !self.exists {
            let metadata = self.consumer.fetch_metadata(Some(&self.topic), timeout)?;
            self.exists = metadata.topics().iter().any(|t| {
                t.name() == self.topic && t.error().is_none() && !t.partitions().is_empty()
            });
            if !self.exists {
                return Ok(0);
            }
        }
        let mut sum = 0;
        for p in 0..PARTITIONS {
            let (low, high) = self.consumer.fetch_watermarks(&self.topic, p, timeout)?;
            sum += high - low;
        }
        Ok(sum)
    }
}

/// Waits until `topic` holds `expected` records and returns when the last one was seen.
/// `on_poll` runs between checks.
fn drained(
    bootstrap: &str,
    topic: &str,
    expected: i64,
    mut on_poll: impl FnMut(Instant),
) -> anyhow::Result<Instant> {
    let mut counter = Counter::new(bootstrap, topic)?;
    let deadline = Instant::now() + Duration::from_secs(1_800);
    loop {
        let n = counter.total()?;
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

/// Records per second from the system's start to the last record in the hub: connection
/// set-up is in for every system alike (a few round trips over a long link), as is the
/// backlog's whole journey. Timing from a system's first record read would favour the mirror
/// over a slow link: its first fetch response crosses the link before the first record is
/// handed to it, while spoke reads at the edge before anything crosses.
fn rate(records: usize, started: Instant, last: Instant) -> f64 {
    let secs = last.duration_since(started).as_secs_f64().max(0.001);
    records as f64 / secs
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

/// Produces `mix` records from `first` on at `rate` per second from a thread of its own
/// until `stop` is set or `count` are sent, each stamped with its produce time. Returns
/// how many were produced.
fn paced_producer(
    producer: BaseProducer,
    mix: Mix,
    first: usize,
    rate: f64,
    count: Option<usize>,
    produced: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<u64>> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) && count.is_none_or(|c| n < c) {
            let due = start + interval.mul_f64(n as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            produce_one(&producer, &mix, first + n)?;
            n += 1;
            produced.store(n as u64, Ordering::Relaxed);
        }
        producer.flush(Duration::from_secs(120))?;
        Ok(n as u64)
    })
}

/// Latencies (ms) from edge produce to hub visibility, at the scenario's latency rate.
/// `None` when the system could not keep up: some records had not arrived a minute after
/// the last was produced.
fn measure_latency(
    env: &Env,
    scenario: &Scenario,
    hub_topic: &str,
    first: usize,
) -> anyhow::Result<Option<(f64, f64)>> {
    let count = (scenario.latency_rate * scenario.latency_secs as f64) as usize;
    if count == 0 {
        // `--latency-secs 0`: no latency phase.
        return Ok(None);
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", env.hub.bootstrap())
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

    // librdkafka's default linger, as an application that cares for latency would keep.
    let producer = edge_producer_lingering(env, scenario.mix.edge_zstd, 5)?;
    // One record through the whole path first, so that the clients' start (connections,
    // the idempotent producer's id, the first fetch) is not counted as the system's latency.
    produce_one(&producer, &scenario.mix, first)?;
    producer.flush(Duration::from_secs(30))?;
    let warm_by = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            message?;
            break;
        }
        if Instant::now() >= warm_by {
            return Ok(None);
        }
    }
    let writer = paced_producer(
        producer,
        scenario.mix,
        first + 1,
        scenario.latency_rate,
        Some(count),
        Arc::default(),
        Arc::default(),
    );
    let mut latencies = Vec::with_capacity(count);
    let deadline = Instant::now() + Duration::from_secs(scenario.latency_secs + 60);
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
        return Ok(None);
    }
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    Ok(Some((pick(0.50), pick(0.99))))
}

fn produce_one(producer: &BaseProducer, mix: &Mix, i: usize) -> anyhow::Result<()> {
    let mut rec = mix.record(i);
    rec.timestamp = Some(now_ms());
    kafka::send(producer, rec.to(TOPIC, (i % PARTITIONS as usize) as i32))
}

/// The edge topic, created on the edge side, holding the scenario's backlog.
fn edge_backlog(env: &Env, scenario: &Scenario) -> anyhow::Result<()> {
    let bootstrap = env.edge.bootstrap();
    env.on_edge(|| kafka::create_topic(&bootstrap, TOPIC, PARTITIONS))?;
    let producer = edge_producer(env, scenario.mix.edge_zstd)?;
    produce(&producer, TOPIC, &scenario.mix, 0..scenario.records)
}

/// spoke: relay and agent processes; the backlog waits at the edge.
pub fn run_spoke(scenario: &Scenario) -> anyhow::Result<Figures> {
    let env = scenario.env()?;
    env.on_hub(|| spoke_on_hub(&env, scenario))
}

fn spoke_on_hub(env: &Env, scenario: &Scenario) -> anyhow::Result<Figures> {
    edge_backlog(env, scenario)?;
    let hub_topic = format!("{SITE}.{TOPIC}");
    // As for the mirror: the hub topic exists before the clock starts. A relay creates a
    // missing one once in a site's life, and against tansu that took 1.6 s of a 25 s run.
    kafka::create_topic(&env.hub.bootstrap(), &hub_topic, PARTITIONS)?;
    let relay_options = RelayOptions {
        extra: scenario.relay_extra.to_owned(),
        ..RelayOptions::default()
    };
    let _relay = env.start_relay_with(&[TOPIC], &relay_options)?;
    let counts_before = scenario.link_counts();
    let mut options = AgentOptions::include(&[TOPIC]);
    options.extra = scenario.agent_extra.to_owned();
    let mut pace = LinkPace::start(scenario.link);
    let started = Instant::now();
    let agent = env.start_agent(&options)?;
    let pid = agent.pid().context("agent has no pid")?;
    let agent_admin = env.agent_admin();
    let scrape = || env.on_edge(|| admin::scrape(&agent_admin));
    // Sample the spool while the backlog moves (every tenth poll, to leave the CPU to the
    // system): bytes per spooled record on disk, from the sample holding the most records,
    // so that the figure covers most of the backlog rather than its last chunks.
    let mut spool_per_record: Option<f64> = None;
    let mut most_held = 0.0;
    let mut polls = 0u32;
    let last = drained(
        &env.hub.bootstrap(),
        &hub_topic,
        scenario.records as i64,
        |now| {
            if let Some((pace, link)) = pace.as_mut().zip(scenario.link) {
                pace.sample(link, now);
            }
            polls += 1;
            if polls % 10 != 0 {
                return;
            }
            let Ok(m) = scrape() else {
                return;
            };
            let spooled = admin::sum(&m, "spoke_agent_records_spooled_total", &[]);
            let bytes = admin::sum(&m, "spoke_agent_spool_bytes", &[]);
            let held = spooled - admin::sum(&m, "spoke_agent_records_acked_total", &[]);
            if held >= 100.0 && bytes > 0.0 && held > most_held {
                most_held = held;
                spool_per_record = Some(bytes / held);
            }
        },
    )?;
    let counts = scenario.link_counts_since(counts_before);
    let rate = rate(scenario.records, started, last);
    let metrics = scrape()?;
    let wire = match counts {
        Some(counts) => counts.delivered_bytes as f64,
        None => admin::sum(&metrics, "spoke_agent_wire_bytes_total", &[]),
    };
    let wire_per_record = wire / scenario.records as f64;
    let pace_per_s = pace.and_then(|p| p.middle_half_per_s(wire_per_record));
    let latency = measure_latency(env, scenario, &hub_topic, scenario.records)?;
    let (rss, cpu) = process_figures(pid);
    let idle_cpu = idle_cpu_pct(pid, Duration::from_secs(5));
    Ok(Figures {
        records_per_s: rate,
        wire_bytes_per_record: Some(wire_per_record),
        spool_bytes_per_record: spool_per_record,
        p50_ms: latency.map(|l| l.0),
        p99_ms: latency.map(|l| l.1),
        latency_rate: Some(scenario.latency_rate),
        agent_rss_mib: rss,
        agent_cpu_s: cpu,
        agent_idle_cpu_pct: idle_cpu,
        link_packets: counts,
        pace_per_s,
        records: scenario.records,
    })
}

/// CPU a process uses over `window` (after a settling second), in % of one core.
fn idle_cpu_pct(pid: u32, window: Duration) -> Option<f64> {
    std::thread::sleep(Duration::from_secs(1));
    let (_, before) = process_figures(pid);
    std::thread::sleep(window);
    let (_, after) = process_figures(pid);
    Some(100.0 * (after? - before?) / window.as_secs_f64())
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

/// The consumer settings of the mirror, and of the limit's edge read: large fetches that
/// wait for a megabyte, as a tuned MirrorMaker would use.
fn tuned_consumer(bootstrap: &str, group: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("fetch.max.bytes", "67108864")
        .set("max.partition.fetch.bytes", "16777216")
        .set("fetch.min.bytes", "1048576")
        .set("fetch.wait.max.ms", "100")
        .set("queued.max.messages.kbytes", "262144")
        .set("statistics.interval.ms", "200");
    config
}

/// The direct mirror: one consumer on the hub side pulling from the edge with large
/// fetches, one zstd producer into the hub, as MirrorMaker does, in this process.
pub fn run_mirror(scenario: &Scenario) -> anyhow::Result<Figures> {
    let env = scenario.env()?;
    env.on_hub(|| mirror_on_hub(&env, scenario))
}

fn mirror_on_hub(env: &Env, scenario: &Scenario) -> anyhow::Result<Figures> {
    edge_backlog(env, scenario)?;
    let hub_topic = format!("{SITE}.{TOPIC}");
    kafka::create_topic(&env.hub.bootstrap(), &hub_topic, PARTITIONS)?;

    let stop = Arc::new(AtomicBool::new(false));
    let rx = Arc::new(AtomicU64::new(0));
    let counts_before = scenario.link_counts();
    let mut pace = LinkPace::start(scenario.link);
    let started = Instant::now();
    // Spawned from this hub-side thread, the mirror's clients live on the hub side.
    let mirror = {
        let (edge, hub, stop, rx) = (
            env.edge.bootstrap(),
            env.hub.bootstrap(),
            stop.clone(),
            rx.clone(),
        );
        let hub_topic = hub_topic.clone();
        std::thread::spawn(move || mirror_loop(&edge, &hub, &hub_topic, &stop, rx))
    };
    let moved = drained(
        &env.hub.bootstrap(),
        &hub_topic,
        scenario.records as i64,
        |now| {
            if let Some((pace, link)) = pace.as_mut().zip(scenario.link) {
                pace.sample(link, now);
            }
        },
    )
    .map(|last| {
        let counts = scenario.link_counts_since(counts_before);
        (rate(scenario.records, started, last), counts)
    });
    let latency = match &moved {
        Ok(_) => measure_latency(env, scenario, &hub_topic, scenario.records),
        Err(error) => Err(anyhow::anyhow!("{error:#}")),
    };
    stop.store(true, Ordering::Relaxed);
    mirror
        .join()
        .map_err(|_| anyhow::anyhow!("mirror thread panicked"))??;
    let (rate, counts) = moved?;
    let latency = latency?;
    let wire = match counts {
        Some(counts) => counts.delivered_bytes as f64,
        None => rx.load(Ordering::Relaxed) as f64,
    };
    let wire_per_record = wire / scenario.records as f64;
    Ok(Figures {
        records_per_s: rate,
        wire_bytes_per_record: Some(wire_per_record),
        p50_ms: latency.map(|l| l.0),
        p99_ms: latency.map(|l| l.1),
        latency_rate: Some(scenario.latency_rate),
        link_packets: counts,
        pace_per_s: pace.and_then(|p| p.middle_half_per_s(wire_per_record)),
        records: scenario.records,
        ..Figures::default()
    })
}

fn mirror_loop(
    edge: &str,
    hub: &str,
    hub_topic: &str,
    stop: &AtomicBool,
    rx: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer<RxBytes> =
        tuned_consumer(edge, "spoke-bench-mirror").create_with_context(RxBytes(rx))?;
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

/// The brokers' own ceiling, alone, on loopback: producing the backlog straight into a hub
/// topic (the faster of zstd and plain batches) and reading it back from the edge with the
/// mirror's tuned consumer. Also the zstd-compressed bytes per record Kafka itself would
/// store and send, and the hub's ingest rate for the same records carrying spoke's three
/// provenance headers.
pub fn run_ceiling(mix: &Mix, records: usize) -> anyhow::Result<Ceiling> {
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
        produce(&producer, &topic, mix, 0..records)?;
        hub_rate = hub_rate.max(records as f64 / start.elapsed().as_secs_f64());
    }
    // What spoke's exactly-once costs the hub: the same records with the three provenance
    // headers the relay appends (tansu stores every header as a row of its own).
    kafka::create_topic(&env.hub.bootstrap(), "ceiling-provenance", PARTITIONS)?;
    let producer = kafka::producer(&env.hub.bootstrap())?;
    let start = Instant::now();
    for i in 0..records {
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
    let with_provenance = records as f64 / start.elapsed().as_secs_f64();

    // Reading from the edge as this scenario stores it (the rate), and the same records
    // stored as Kafka's own zstd batches (their size on the fetch path).
    let (edge_rate, _) = read_edge_alone(&env, mix, records, mix.edge_zstd, "edge-own")?;
    let (_, kafka_zstd_bytes) = read_edge_alone(&env, mix, records, true, "edge-zstd")?;
    Ok(Ceiling {
        brokers_per_s: hub_rate.min(edge_rate),
        kafka_zstd_bytes,
        hub_with_provenance_per_s: with_provenance,
    })
}

/// Produces the backlog into an edge topic (zstd or plain batches), reads it back alone, and
/// returns the read rate and the bytes fetched per record.
fn read_edge_alone(
    env: &Env,
    mix: &Mix,
    records: usize,
    zstd: bool,
    topic: &str,
) -> anyhow::Result<(f64, f64)> {
    kafka::create_topic(&env.edge.bootstrap(), topic, PARTITIONS)?;
    let producer = edge_producer(env, zstd)?;
    produce(&producer, topic, mix, 0..records)?;
    let rx = Arc::new(AtomicU64::new(0));
    let consumer: BaseConsumer<RxBytes> =
        tuned_consumer(&env.edge.bootstrap(), topic).create_with_context(RxBytes(rx.clone()))?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let start = Instant::now();
    let mut read = 0usize;
    while read < records {
        if start.elapsed() > Duration::from_secs(1_800) {
            bail!("reading the edge alone: {read} of {records} records");
        }
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            message?;
            read += 1;
        }
    }
    let rate = records as f64 / start.elapsed().as_secs_f64();
    // Let the last statistics interval report the fetched bytes.
    std::thread::sleep(Duration::from_millis(400));
    consumer.poll(Duration::from_millis(10));
    Ok((rate, rx.load(Ordering::Relaxed) as f64 / records as f64))
}

/// How spoke came through a cut of the link.
#[derive(Debug, Clone, Default)]
pub struct Outage {
    /// Records/s produced at the edge throughout, half the limit.
    pub produce_rate: f64,
    pub outage_secs: f64,
    /// Records waiting at the edge when the link came back.
    pub backlog: i64,
    /// From the link's return to the first record in the hub: detecting the link, reconnecting,
    /// the handshake and the relay's resume point.
    pub reconnect_s: f64,
    /// Hub records/s from that first record to zero lag (new records included).
    pub drain_per_s: f64,
    pub limit_per_s: f64,
    /// From the link's return to zero lag: the lag (records produced, not yet in the hub) is
    /// back within what it was in steady flow before the cut, the pipeline's own depth.
    pub time_to_zero_lag_s: f64,
    /// The largest lag seen in steady flow before the cut, in records.
    pub steady_lag: i64,
    /// The longest the hub's count stood still between the first record after the link's
    /// return and zero lag: new records kept flowing if this is short.
    pub longest_stall_s: f64,
    /// Records produced while the backlog drained.
    pub produced_during_drain: i64,
    pub spool_bytes_per_record: Option<f64>,
    pub agent_rss_mib: Option<f64>,
    pub produced: i64,
    pub delivered: i64,
}

/// The link is cut for `outage` while the edge produces at `produce_rate` (half the limit,
/// for the figures), then restored; measures how spoke drains the backlog, and checks every
/// record arrives exactly once.
pub fn run_outage(
    mix: &Mix,
    link: &Link,
    limit: f64,
    produce_rate: f64,
    outage: Duration,
    before: Duration,
    agent_extra: &str,
) -> anyhow::Result<Outage> {
    let scenario = Scenario {
        mix: *mix,
        link: Some(link),
        records: 0,
        latency_rate: 0.0,
        latency_secs: 0,
        agent_extra,
        relay_extra: "",
    };
    let env = scenario.env()?;
    let cut = Cut {
        limit,
        produce_rate,
        outage,
        before,
    };
    env.on_hub(|| outage_on_hub(&env, link, mix, &cut, agent_extra))
}

/// The outage scenario's settings.
struct Cut {
    limit: f64,
    produce_rate: f64,
    outage: Duration,
    /// Steady flow before the cut.
    before: Duration,
}

fn outage_on_hub(
    env: &Env,
    link: &Link,
    mix: &Mix,
    cut: &Cut,
    agent_extra: &str,
) -> anyhow::Result<Outage> {
    let bootstrap = env.edge.bootstrap();
    env.on_edge(|| kafka::create_topic(&bootstrap, TOPIC, PARTITIONS))?;
    let hub_topic = format!("{SITE}.{TOPIC}");
    let _relay = env.start_relay(&[TOPIC])?;
    let mut options = AgentOptions::include(&[TOPIC]);
    options.extra = agent_extra.to_owned();
    let agent = env.start_agent(&options)?;
    let pid = agent.pid().context("agent has no pid")?;
    let agent_admin = env.agent_admin();
    let scrape = || env.on_edge(|| admin::scrape(&agent_admin));

    let produced = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = paced_producer(
        edge_producer(env, mix.edge_zstd)?,
        *mix,
        0,
        cut.produce_rate,
        None,
        produced.clone(),
        stop.clone(),
    );
    let result = outage_phases(env, link, &hub_topic, cut, &produced, &scrape);
    stop.store(true, Ordering::Relaxed);
    link.set_down(false);
    let sent = writer
        .join()
        .map_err(|_| anyhow::anyhow!("outage producer panicked"))??;
    let mut figures = result?;
    figures.produce_rate = cut.produce_rate;
    figures.produced = sent as i64;
    // Every record exactly once by count: `drained` fails on more, and times out on fewer.
    drained(&env.hub.bootstrap(), &hub_topic, sent as i64, |_| {})?;
    figures.delivered = sent as i64;
    figures.agent_rss_mib = process_figures(pid).0;
    Ok(figures)
}

fn outage_phases(
    env: &Env,
    link: &Link,
    hub_topic: &str,
    cut: &Cut,
    produced: &AtomicU64,
    scrape: &dyn Fn() -> anyhow::Result<std::collections::BTreeMap<String, f64>>,
) -> anyhow::Result<Outage> {
    let mut hub = Counter::new(&env.hub.bootstrap(), hub_topic)?;
    // The pipeline's own depth: records in flight between edge and hub in steady flow, over
    // the second half of the time before the cut (the first lets the session start).
    std::thread::sleep(cut.before / 2);
    let mut steady_lag = 0i64;
    let steady_until = Instant::now() + cut.before / 2;
    while Instant::now() < steady_until {
        let produced_before = produced.load(Ordering::Relaxed) as i64;
        steady_lag = steady_lag.max(produced_before - hub.total()?);
        std::thread::sleep(Duration::from_millis(100));
    }
    link.set_down(true);
    let mut spool_per_record = None;
    let cut_until = Instant::now() + cut.outage;
    while Instant::now() < cut_until {
        std::thread::sleep(Duration::from_secs(1));
        if let Ok(m) = scrape() {
            let held = admin::sum(&m, "spoke_agent_records_spooled_total", &[])
                - admin::sum(&m, "spoke_agent_records_acked_total", &[]);
            let bytes = admin::sum(&m, "spoke_agent_spool_bytes", &[]);
            if held >= 100.0 && bytes > 0.0 {
                spool_per_record = Some(bytes / held);
            }
        }
    }
    let at_return = hub.total()?;
    let produced_at_return = produced.load(Ordering::Relaxed) as i64;
    link.set_down(false);
    let back = Instant::now();

    let mut last_count = at_return;
    let mut last_change: Option<Instant> = None;
    let mut first_change: Option<Instant> = None;
    let mut longest_stall = Duration::ZERO;
    // Draining at the limit with half of it still arriving takes about as long as the cut;
    // far longer means the system cannot keep up, and waiting on would only hide that.
    let deadline = back + cut.outage * 6 + Duration::from_secs(120);
    loop {
        let now = Instant::now();
        // Produced is read before the hub, so the lag is never understated.
        let produced_now = produced.load(Ordering::Relaxed) as i64;
        let count = hub.total()?;
        if count != last_count {
            if let Some(since) = last_change {
                longest_stall = longest_stall.max(now.duration_since(since));
            }
            last_change = Some(now);
            first_change.get_or_insert(now);
            last_count = count;
        }
        if first_change.is_some() && produced_now - count <= steady_lag {
            let secs = now.duration_since(back).as_secs_f64();
            let first = first_change.unwrap_or(now);
            let draining = now.duration_since(first).as_secs_f64().max(0.001);
            return Ok(Outage {
                steady_lag,
                outage_secs: cut.outage.as_secs_f64(),
                backlog: produced_at_return - at_return,
                reconnect_s: first.duration_since(back).as_secs_f64(),
                drain_per_s: (count - at_return) as f64 / draining,
                limit_per_s: cut.limit,
                time_to_zero_lag_s: secs,
                longest_stall_s: longest_stall.as_secs_f64(),
                produced_during_drain: produced_now - produced_at_return,
                spool_bytes_per_record: spool_per_record,
                ..Outage::default()
            });
        }
        if now > deadline {
            bail!(
                "no zero lag {:.0} s after the link came back: hub {count}, produced {produced_now}, steady lag {steady_lag}",
                now.duration_since(back).as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
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
        "latency_rate_per_s": figures.latency_rate.map(round),
        "agent_rss_mib": figures.agent_rss_mib.map(round),
        "agent_cpu_s": figures.agent_cpu_s.map(round),
        "agent_idle_cpu_pct": figures.agent_idle_cpu_pct.map(round),
        "link_packets": figures.link_packets.map(|c| c.packets),
        "link_queue_dropped": figures.link_packets.map(|c| c.queue_dropped),
        "link_lost": figures.link_packets.map(|c| c.lost),
        "link_offered_bytes_per_record": figures
            .link_packets
            .map(|c| round(c.offered_bytes as f64 / figures.records.max(1) as f64)),
        "link_packets_back": figures.link_packets.map(|c| c.packets_back),
        "link_bytes_back_per_record": figures
            .link_packets
            .map(|c| round(c.delivered_bytes_back as f64 / figures.records.max(1) as f64)),
        "ratio_to_baseline": baseline.map(|b| round(figures.records_per_s / b)),
        "pct_of_limit": round(100.0 * figures.records_per_s / limit),
        "pace_records_per_s": figures.pace_per_s.map(round),
        "pace_pct_of_limit": figures.pace_per_s.map(|p| round(100.0 * p / limit)),
    })
}

/// The outage scenario's JSON object.
pub fn outage_json(scenario: &str, link: &str, o: &Outage) -> serde_json::Value {
    json!({
        "scenario": scenario,
        "link": link,
        "system": "spoke",
        "records_per_s": round(o.drain_per_s),
        "pct_of_limit": round(100.0 * o.drain_per_s / o.limit_per_s),
        "produce_rate_per_s": round(o.produce_rate),
        "outage_s": round(o.outage_secs),
        "backlog_records": o.backlog,
        "reconnect_s": round(o.reconnect_s),
        "time_to_zero_lag_s": round(o.time_to_zero_lag_s),
        "steady_lag_records": o.steady_lag,
        "longest_hub_stall_during_drain_s": round(o.longest_stall_s),
        "produced_during_drain": o.produced_during_drain,
        "spool_bytes_per_record": o.spool_bytes_per_record.map(round),
        "agent_rss_mib": o.agent_rss_mib.map(round),
        "produced": o.produced,
        "delivered": o.delivered,
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

    /// A run as a short backlog over a slow link looks: 2 s of set-up with a trickle of
    /// handshake bytes, 2 s of the window opening at half the link's rate, 8 s at the link's
    /// 1 MB/s, a trickle at the end; sampled every 20 ms.
    #[test]
    fn the_pace_is_the_links_rate_once_the_start_is_behind() {
        let t0 = Instant::now();
        let mut bytes = 0u64;
        let mut samples = vec![(t0, bytes)];
        for tick in 1..=650u32 {
            let rate = match tick {
                0..=100 => 2_000,
                101..=200 => 500_000,
                201..=600 => 1_000_000,
                _ => 10_000,
            };
            bytes += rate / 50;
            samples.push((t0 + Duration::from_millis(20) * tick, bytes));
        }
        let pace = LinkPace { samples };
        let per_s = pace.middle_half_per_s(100.0).expect("pace");
        // 1 MB/s at 100 B a record; the whole run averages 0.67 MB/s.
        assert!((per_s - 10_000.0).abs() < 100.0, "{per_s:.0} records/s");
        assert_eq!(
            LinkPace {
                samples: Vec::new()
            }
            .middle_half_per_s(100.0),
            None
        );
        let idle = LinkPace {
            samples: vec![(t0, 5), (t0 + Duration::from_secs(1), 5)],
        };
        assert_eq!(idle.middle_half_per_s(100.0), None);
    }
}
