//! Produce → visible latency of one tansu broker alone, at 1,000 records/s, for several
//! consumer `fetch.wait.max.ms` settings: tansu holds every fetch for the whole wait, so the
//! wait is a floor under any pipeline's latency against it (issue 6).
//!
//! `cargo run --release -p spoke-bench --example tansu_latency` (a measurement, not a test).

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use spoke_tests::broker::Broker;
use spoke_tests::mix::now_ms;

const RATE: u64 = 1_000;
const SECS: u64 = 8;

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path(), "alone")?;
    let bootstrap = broker.bootstrap();
    spoke_tests::kafka::create_topic(&bootstrap, "t", 1)?;
    let value = vec![b'x'; 1024];
    for wait in ["10", "100", "500"] {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "latency")
            .set("fetch.wait.max.ms", wait)
            .create()?;
        let (_, high) = consumer.fetch_watermarks("t", 0, Duration::from_secs(10))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Offset(high))?;
        consumer.assign(&tpl)?;
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("linger.ms", "5")
            .create()?;
        let count = (RATE * SECS) as usize;
        let start = Instant::now();
        let mut sent = 0usize;
        let mut lat = Vec::with_capacity(count);
        while lat.len() < count && start.elapsed() < Duration::from_secs(SECS + 30) {
            let due = start + Duration::from_micros(1_000_000 / RATE) * sent as u32;
            if sent < count && Instant::now() >= due {
                let _ = producer.send(
                    BaseRecord::<[u8], [u8]>::to("t")
                        .payload(&value[..])
                        .timestamp(now_ms()),
                );
                sent += 1;
            }
            producer.poll(Duration::ZERO);
            if let Some(m) = consumer.poll(Duration::from_micros(500)) {
                if let Some(ts) = m?.timestamp().to_millis() {
                    lat.push(now_ms() - ts);
                }
            }
        }
        producer.flush(Duration::from_secs(10))?;
        lat.sort_unstable();
        let pick = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
        println!(
            "fetch.wait.max.ms={wait:>4}: {} records, p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
            lat.len(),
            pick(0.5),
            pick(0.9),
            pick(0.99),
            pick(1.0)
        );
    }
    Ok(())
}
