//! Demo traffic for `scripts/demo`: produces sample orders at the edge and prints each record
//! as it arrives in the hub, with its provenance headers.
//!
//! usage: spoke-demo EDGE_BOOTSTRAP HUB_BOOTSTRAP SITE

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use spoke_tests::kafka::{self, Rec};

const TOPIC: &str = "orders";
const PARTITIONS: i32 = 3;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [edge, hub, site] = args.as_slice() else {
        anyhow::bail!("usage: spoke-demo EDGE_BOOTSTRAP HUB_BOOTSTRAP SITE");
    };
    if !kafka::topic_names(edge)?.iter().any(|t| t == TOPIC) {
        kafka::create_topic(edge, TOPIC, PARTITIONS).context("creating the demo topic")?;
    }
    let edge_owned = edge.clone();
    std::thread::spawn(move || {
        if let Err(error) = produce_forever(&edge_owned) {
            eprintln!("demo producer stopped: {error:#}");
        }
    });
    follow(hub, &format!("{site}.{TOPIC}"))
}

fn produce_forever(edge: &str) -> anyhow::Result<()> {
    let producer = kafka::producer(edge)?;
    let items = ["bolts", "gaskets", "valves", "sensors", "cable"];
    for n in 0u64.. {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
        let rec = Rec {
            key: Some(format!("order-{n}").into_bytes()),
            value: Some(
                format!(
                    "{{\"order\":{n},\"item\":\"{}\",\"qty\":{}}}",
                    items[(n % 5) as usize],
                    n % 17 + 1
                )
                .into_bytes(),
            ),
            headers: vec![("source".into(), Some(b"till-3".to_vec()))],
            timestamp: Some(i64::try_from(now)?),
        };
        kafka::produce(&producer, TOPIC, (n % PARTITIONS as u64) as i32, &[rec])?;
        println!("edge  <- produced order-{n}");
        std::thread::sleep(Duration::from_millis(700));
    }
    Ok(())
}

fn follow(hub: &str, topic: &str) -> anyhow::Result<()> {
    println!("waiting for {topic} to appear in the hub ...");
    while !kafka::topic_names(hub)?.iter().any(|t| t == topic) {
        std::thread::sleep(Duration::from_millis(500));
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", hub)
        .set("group.id", "spoke-demo")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    loop {
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message?;
        let provenance: Vec<String> = message
            .headers()
            .map(|h| {
                h.iter()
                    .filter(|h| h.key.starts_with("spoke-"))
                    .map(|h| {
                        format!(
                            "{}={}",
                            h.key,
                            String::from_utf8_lossy(h.value.unwrap_or_default())
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "hub   -> {topic}[{}]@{} {} {}",
            message.partition(),
            message.offset(),
            String::from_utf8_lossy(message.payload().unwrap_or_default()),
            provenance.join(" ")
        );
    }
}
