//! `ship.dictionary`: small records in small chunks, replicated byte for byte, with fewer wire
//! bytes when the agent trains a zstd dictionary than when it does not (real tansu brokers,
//! real spoke processes).

use std::time::Duration;

use spoke_tests::kafka::{self, Rec};
use spoke_tests::mix::{Kind, Mix};
use spoke_tests::site::{AgentOptions, Env, SITE};
use spoke_tests::{admin, eventually};

const TOPIC: &str = "small";
const TIMEOUT: Duration = Duration::from_secs(180);
/// Enough records for the agent to train on (it samples 2000).
const TRAINING: usize = 2_100;
/// Small chunks: groups of this many records, each flushed and then left alone for longer
/// than the agent's linger, as 1,000 records/s over 3 partitions with 20 ms linger gives.
const GROUP: usize = 7;
const GROUPS: usize = 80;

struct Run {
    /// agent wire bytes for the small-chunk phase only (after the dictionary was sent)
    wire_bytes: f64,
    dictionary_batches: f64,
}

fn wait_for(env: &Env, expected: usize) -> anyhow::Result<()> {
    eventually(&format!("{expected} records in the hub"), TIMEOUT, || {
        Ok(env.hub_count(TOPIC, 1)? == expected as i64)
    })
}

fn run(dictionary: &str) -> anyhow::Result<Run> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), TOPIC, 1)?;
    let mut relay = env.start_relay(&[".*"])?;
    let mut options = AgentOptions::include(&[TOPIC]);
    options.extra = format!("[ship]\nlinger = \"20ms\"\ndictionary = \"{dictionary}\"\n");
    let mut agent = env.start_agent(&options)?;
    let mix = Mix {
        kind: Kind::Json,
        size: 100,
        edge_zstd: false,
    };
    let producer = kafka::producer(&env.edge.bootstrap())?;
    let training: Vec<Rec> = (0..TRAINING).map(|i| mix.record(i)).collect();
    kafka::produce(&producer, TOPIC, 0, &training)?;
    let mut produced = TRAINING;
    wait_for(&env, produced)?;
    // One small chunk first, so that the dictionary itself (sent once per connection) is
    // not counted below.
    let group = |produced: &mut usize| -> anyhow::Result<()> {
        let records: Vec<Rec> = (*produced..*produced + GROUP)
            .map(|i| mix.record(i))
            .collect();
        kafka::produce(&producer, TOPIC, 0, &records)?;
        *produced += GROUP;
        std::thread::sleep(Duration::from_millis(80));
        Ok(())
    };
    group(&mut produced)?;
    wait_for(&env, produced)?;
    let before = admin::scrape(&env.agent_admin())?;
    for _ in 0..GROUPS {
        group(&mut produced)?;
    }
    wait_for(&env, produced)?;
    let after = admin::scrape(&env.agent_admin())?;
    let relay_metrics = admin::scrape(&env.relay_admin())?;
    let checked =
        kafka::assert_replicated(&env.edge.bootstrap(), &env.hub.bootstrap(), SITE, TOPIC, 0)?;
    assert_eq!(checked, produced, "every record compared byte for byte");
    agent.stop()?;
    relay.stop()?;
    let wire = |m| admin::sum(m, "spoke_agent_wire_bytes_total", &[]);
    Ok(Run {
        wire_bytes: wire(&after) - wire(&before),
        dictionary_batches: admin::sum(&relay_metrics, "spoke_relay_dictionary_batches_total", &[]),
    })
}

#[test]
fn small_records_ship_in_fewer_bytes_with_a_dictionary() -> anyhow::Result<()> {
    let with = run("auto")?;
    let without = run("off")?;
    let records = (GROUPS * GROUP) as f64;
    println!(
        "figures: small-chunk wire bytes per record: dictionary {:.1}, none {:.1} (ratio {:.2}); dictionary batches {}",
        with.wire_bytes / records,
        without.wire_bytes / records,
        with.wire_bytes / without.wire_bytes,
        with.dictionary_batches,
    );
    assert!(
        with.dictionary_batches >= GROUPS as f64,
        "the small chunks used the dictionary: {} dictionary batches",
        with.dictionary_batches
    );
    assert_eq!(without.dictionary_batches, 0.0, "off means off");
    assert!(
        with.wire_bytes < 0.85 * without.wire_bytes,
        "the dictionary saves at least 15% on small chunks: {} vs {} bytes",
        with.wire_bytes,
        without.wire_bytes
    );
    Ok(())
}
