//! Checkpoints in `spoke.offsets`: written as batches are confirmed, read back by a relay that
//! starts later, and used to bound the resume scan.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use spoke_tests::kafka::{self, Rec};
use spoke_tests::process::Spoke;
use spoke_tests::site::{AgentOptions, Env, SITE};
use spoke_tests::{admin, eventually};

const HUB_TOPIC: &str = "branch-042.orders";

fn rec(i: usize, key: &str) -> Rec {
    Rec {
        key: Some(key.as_bytes().to_vec()),
        value: Some(format!("value-{i}").into_bytes()),
        headers: Vec::new(),
        timestamp: Some(1_700_000_000_000 + i as i64),
    }
}

/// The newest checkpoint per key, as the offsets topic holds them.
fn checkpoints(env: &Env) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
    let mut newest = BTreeMap::new();
    for stored in kafka::read_partition(&env.hub.bootstrap(), "spoke.offsets", 0)? {
        let (Some(key), Some(value)) = (stored.rec.key, stored.rec.value) else {
            continue;
        };
        // The relay's transaction probe writes one record that is not a checkpoint.
        if let Ok(checkpoint) = serde_json::from_slice::<serde_json::Value>(&value) {
            newest.insert(String::from_utf8(key)?, checkpoint);
        }
    }
    Ok(newest)
}

/// Source offsets of a source partition's records in the hub, from their provenance headers.
fn source_offsets(env: &Env, source_partition: i32) -> anyhow::Result<Vec<i64>> {
    let wanted = source_partition.to_string();
    let mut offsets = Vec::new();
    for p in 0..2 {
        for stored in kafka::read_partition(&env.hub.bootstrap(), HUB_TOPIC, p)? {
            let header = |name: &str| {
                stored
                    .rec
                    .headers
                    .iter()
                    .rev()
                    .find(|(key, _)| key == name)
                    .and_then(|(_, value)| value.clone())
            };
            if header("spoke-partition").as_deref() == Some(wanted.as_bytes()) {
                let offset = header("spoke-offset").unwrap_or_default();
                offsets.push(String::from_utf8(offset)?.parse()?);
            }
        }
    }
    offsets.sort_unstable();
    Ok(offsets)
}

/// Source partition 2 has no hub partition of its own (the hub topic has 2), so it shares
/// hub partition 0 with source partition 0. Its first records land there before 3,000 of
/// partition 0's: without a checkpoint, the next resume scan reads back through all of those
/// to find partition 2's newest record; with one, it reads only what came after it.
#[test]
fn checkpoints_are_written_read_back_and_bound_the_resume_scan() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 3)?;
    kafka::create_topic(&env.hub.bootstrap(), HUB_TOPIC, 2)?;
    let producer = kafka::producer(&env.edge.bootstrap())?;
    let spread: Vec<Rec> = (0..20).map(|i| rec(i, "one-key")).collect();
    kafka::produce(&producer, "orders", 2, &spread[..10])?;

    let options = AgentOptions::include(&["orders"]);
    let mut relay = env.start_relay(&["orders"])?;
    let mut agent = env.start_agent(&options)?;
    eventually(
        "partition 2's first records in the hub",
        Duration::from_secs(60),
        || Ok(env.hub_held(HUB_TOPIC, 2)? == 10),
    )?;
    for p in 0..2 {
        let records: Vec<Rec> = (0..3_000).map(|i| rec(i, &format!("k{i}"))).collect();
        kafka::produce(&producer, "orders", p, &records)?;
    }
    eventually("6,010 records in the hub", Duration::from_secs(180), || {
        Ok(env.hub_held(HUB_TOPIC, 2)? == 6_010)
    })?;
    agent.stop()?;
    drop(agent);

    // Each source partition's newest checkpoint says exactly how far it is in the hub.
    eventually(
        "checkpoints up to the edge's ends",
        Duration::from_secs(30),
        || {
            let newest = checkpoints(&env)?;
            let next = |p: i32| {
                newest
                    .get(&format!("{SITE}/orders/{p}"))
                    .and_then(|c| c["next_offset"].as_i64())
            };
            // The session's last checkpoint raised every floor to the hub partitions' ends.
            let floors_at_ends = (0..2).all(|q| {
                let end = kafka::watermarks(&env.hub.bootstrap(), HUB_TOPIC, q).map(|(_, h)| h);
                newest
                    .get(&format!("{SITE}/orders/2"))
                    .and_then(|c| c["scan_from"][q.to_string()].as_i64())
                    .is_some_and(|floor| end.is_ok_and(|end| floor == end))
            });
            Ok(next(0) == Some(3_000)
                && next(1) == Some(3_000)
                && next(2) == Some(10)
                && floors_at_ends)
        },
    )?;
    relay.stop()?;

    // A new relay process knows only what the hub holds. The agent spools the new records
    // while no relay runs, so its Hello names source partition 2 and forces a resume scan.
    // First the baseline, a relay that reads another, empty offsets topic (what it writes
    // there the second relay does not read); then one that reads the checkpoints, whose floor
    // is where the first session ended.
    let without = resume_after_restart(&env, &options, &spread[10..15], "spoke.offsets.unused")?;
    let with_checkpoints = resume_after_restart(&env, &options, &spread[15..], "spoke.offsets")?;
    println!(
        "scenario=checkpoint-resume scanned_with_checkpoints={} scanned_without={} checkpoints_read={}",
        with_checkpoints.scanned, without.scanned, with_checkpoints.read
    );
    assert!(
        with_checkpoints.read > 0.0,
        "the new relay read no checkpoints"
    );
    assert!(
        with_checkpoints.scanned < 100.0,
        "with checkpoints the resume scan reads only what came after them, not {} records",
        with_checkpoints.scanned
    );
    assert!(
        without.scanned >= 3_000.0,
        "without checkpoints the scan must read back past source partition 0's 3,000 records \
         ({})",
        without.scanned
    );

    // Every source record exactly once (hub partition 0 or 1 also holds the spread ones).
    assert_eq!(source_offsets(&env, 0)?, (0..3_000).collect::<Vec<i64>>());
    assert_eq!(source_offsets(&env, 1)?, (0..3_000).collect::<Vec<i64>>());
    assert_eq!(source_offsets(&env, 2)?, (0..20).collect::<Vec<i64>>());
    Ok(())
}

struct Resumed {
    scanned: f64,
    read: f64,
}

/// Produces `records` to source partition 2 while no relay runs, then starts a relay reading
/// `offsets_topic` and waits until they are in the hub; returns what its resume scans cost.
fn resume_after_restart(
    env: &Env,
    options: &AgentOptions,
    records: &[Rec],
    offsets_topic: &str,
) -> anyhow::Result<Resumed> {
    let expected = env.hub_held(HUB_TOPIC, 2)? + records.len() as i64;
    let producer = kafka::producer(&env.edge.bootstrap())?;
    kafka::produce(&producer, "orders", 2, records)?;
    let spooled = || {
        std::fs::read_to_string(env.path("agent.log"))
            .unwrap_or_default()
            .matches("spooled chunk")
            .count()
    };
    let before = spooled();
    let mut agent = env.start_agent(options)?;
    eventually("the new records spooled", Duration::from_secs(60), || {
        Ok(spooled() > before)
    })?;
    let config = std::fs::read_to_string(env.relay_config(&["orders"])?)?.replace(
        "[hub]\n",
        &format!("[hub]\noffsets_topic = \"{offsets_topic}\"\n"),
    );
    let path = env.path("relay-offsets.toml");
    std::fs::write(&path, config)?;
    let path = path.to_str().context("non-UTF-8 temp path")?;
    let mut relay = Spoke::start(
        "spoke-relay",
        &["run", "--config", path],
        env.path("relay.log"),
    )?;
    eventually(
        &format!("{expected} records in the hub"),
        Duration::from_secs(120),
        || {
            let total = env.hub_held(HUB_TOPIC, 2)?;
            anyhow::ensure!(total <= expected, "{total} records in the hub: duplicates");
            Ok(total == expected)
        },
    )?;
    let metrics = admin::scrape(&env.relay_admin())?;
    agent.stop()?;
    relay.stop()?;
    Ok(Resumed {
        scanned: admin::sum(&metrics, "spoke_relay_resume_scanned_records_total", &[]),
        read: admin::sum(&metrics, "spoke_relay_checkpoints_read_total", &[]),
    })
}
