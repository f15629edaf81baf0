//! `hub.transactions`: each batch's records and its checkpoint committed in one Kafka
//! transaction under `transactional.id = spoke-<site>`.
//!
//! No broker on this machine implements transactions fully (`../shared/KAFKA.md`): tansu has
//! no EndTxn, and librdkafka's mock cluster commits and aborts but neither fences a zombie
//! producer by epoch nor hides aborted records from read_committed consumers. So:
//! - against tansu, `"auto"` must find out that there are no transactions and fall back to
//!   fencing by `relay.fence_delay` (every other end-to-end test runs that way);
//! - against the mock cluster, the transactional path must replicate exactly, commit the
//!   checkpoints with the data, and ride out the transient errors a transaction coordinator
//!   returns (injected here);
//! - fencing of a zombie relay by a newer producer epoch, and aborted data staying invisible,
//!   are broker guarantees that no broker here can show; they are not tested.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use spoke_tests::kafka::{self, Rec};
use spoke_tests::process::Spoke;
use spoke_tests::site::{AgentOptions, Env, SITE};
use spoke_tests::{admin, eventually, markers, oracle, process};

const HUB_TOPIC: &str = "branch-042.orders";

fn record(i: usize) -> Rec {
    Rec {
        key: (i % 5 != 0).then(|| format!("key-{i}").into_bytes()),
        value: Some(format!("{{\"order\":{i},\"qty\":{}}}", i % 17).into_bytes()),
        headers: vec![("trace".into(), Some(i.to_le_bytes().to_vec()))],
        timestamp: Some(1_700_000_000_000 + i as i64),
    }
}

/// Starts the relay against `hub` with `transactions` set as given.
fn start_relay(env: &Env, hub: &str, transactions: &str) -> anyhow::Result<Spoke> {
    start_relay_with(env, hub, transactions, "")
}

/// As [`start_relay`], with more lines in `[hub]`.
fn start_relay_with(
    env: &Env,
    hub: &str,
    transactions: &str,
    hub_lines: &str,
) -> anyhow::Result<Spoke> {
    let path = relay_config(env, hub, transactions, hub_lines)?;
    Spoke::start(
        "spoke-relay",
        &["run", "--config", &path],
        env.path("relay.log"),
    )
}

/// The relay's config with `hub` as the hub, `transactions` set, and `hub_lines` in `[hub]`.
fn relay_config(
    env: &Env,
    hub: &str,
    transactions: &str,
    hub_lines: &str,
) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(env.relay_config(&["orders"])?)?
        .replace(&env.hub.bootstrap(), hub)
        .replace(
            "[hub]\n",
            &format!("[hub]\ntransactions = \"{transactions}\"\n{hub_lines}\n"),
        );
    let path = env.path("relay-transactions.toml");
    std::fs::write(&path, text)?;
    Ok(path.to_str().context("non-UTF-8 temp path")?.to_owned())
}

/// A tansu edge with topic `orders` (2 partitions) and a producer for it, and librdkafka's
/// mock cluster as the hub, with the topics the relay needs (it has no CreateTopics).
fn edge_and_mock_hub() -> anyhow::Result<(
    Env,
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    rdkafka::producer::BaseProducer,
)> {
    let env = Env::new()?;
    let mock = MockCluster::new(1)?;
    mock.create_topic(HUB_TOPIC, 2, 1)?;
    mock.create_topic("spoke.offsets", 1, 1)?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 2)?;
    let producer = kafka::producer(&env.edge.bootstrap())?;
    Ok((env, mock, producer))
}

#[test]
fn a_transactional_hub_gets_every_record_once_with_its_checkpoint() -> anyhow::Result<()> {
    let (env, mock, producer) = edge_and_mock_hub()?;
    let hub = mock.bootstrap_servers();
    let records: Vec<Rec> = (0..2_000).map(record).collect();
    for p in 0..2 {
        kafka::produce(&producer, "orders", p, &records[..1_000])?;
    }
    // What a busy or moving transaction coordinator answers; librdkafka retries them.
    mock.request_errors(
        RDKafkaApiKey::AddPartitionsToTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS; 3],
    );
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS,
        ],
    );

    let relay = start_relay(&env, &hub, "on")?;
    let _agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    // The rest while the session runs, so that it commits many small transactions.
    for chunk in records[1_000..].chunks(50) {
        for p in 0..2 {
            kafka::produce(&producer, "orders", p, chunk)?;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eventually("4,000 records in the hub", Duration::from_secs(180), || {
        let total = kafka::records_held(&hub, HUB_TOPIC, 2)?;
        anyhow::ensure!(total <= 4_000, "{total} records in the hub: duplicates");
        Ok(total == 4_000)
    })?;
    for p in 0..2 {
        kafka::assert_replicated(&env.edge.bootstrap(), &hub, SITE, "orders", p)?;
    }

    // Each partition's newest committed checkpoint is at the edge's end.
    let mut newest = BTreeMap::new();
    for stored in kafka::read_partition(&hub, "spoke.offsets", 0)? {
        if let (Some(key), Some(value)) = (stored.rec.key, stored.rec.value) {
            if let Ok(checkpoint) = serde_json::from_slice::<serde_json::Value>(&value) {
                newest.insert(String::from_utf8(key)?, checkpoint["next_offset"].as_i64());
            }
        }
    }
    for p in 0..2 {
        assert_eq!(
            newest.get(&format!("{SITE}/orders/{p}")),
            Some(&Some(2_000)),
            "checkpoints: {newest:?}"
        );
    }
    let metrics = admin::scrape(&env.relay_admin())?;
    let written = admin::sum(&metrics, "spoke_relay_checkpoints_written_total", &[]);
    assert!(
        written >= 10.0,
        "only {written} transactions: the test must commit many"
    );
    let log = relay.log();
    println!(
        "scenario=transactions-mock produced=4000 hub=4000 lost=0 dup=0 checkpoints={written}"
    );
    assert!(
        !log.contains("hub transaction failed"),
        "transient coordinator errors must be retried, not fail the session:\n{log}"
    );
    Ok(())
}

#[test]
fn auto_falls_back_to_fencing_on_a_hub_without_transactions() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 2)?;
    let producer = kafka::producer(&env.edge.bootstrap())?;
    let records: Vec<Rec> = (0..500).map(record).collect();
    kafka::produce(&producer, "orders", 0, &records)?;
    let relay = start_relay(&env, &env.hub.bootstrap(), "auto")?;
    let _agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    eventually("500 records in the hub", Duration::from_secs(120), || {
        Ok(env.hub_held(HUB_TOPIC, 2)? == 500)
    })?;
    kafka::assert_replicated(
        &env.edge.bootstrap(),
        &env.hub.bootstrap(),
        SITE,
        "orders",
        0,
    )?;
    let log = relay.log();
    assert!(
        log.contains("the hub has no transactions"),
        "the relay must say which mechanism it uses:\n{log}"
    );
    Ok(())
}

/// `spoke-relay check` commits the probe transaction and says what it found: supported, not
/// supported (fine under "auto", a failure under "on"), or refused by the hub's ACLs, with
/// the grant that fixes it.
#[test]
fn check_says_whether_the_hub_takes_transactions_and_which_acl_is_missing() -> anyhow::Result<()> {
    let (env, mock, _producer) = edge_and_mock_hub()?;
    let check = |hub: &str, transactions: &str| -> anyhow::Result<(bool, String)> {
        let config = relay_config(&env, hub, transactions, "")?;
        let out = process::run("spoke-relay", &["check", "--config", &config])?;
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        println!("{said}");
        Ok((out.status.success(), said))
    };
    let (passed, said) = check(&mock.bootstrap_servers(), "on")?;
    anyhow::ensure!(
        passed
            && said.contains(
                "ok   hub transactions: supported: sessions commit records and checkpoints atomically"
            ),
        "a hub with transactions:\n{said}"
    );
    mock.request_errors(
        RDKafkaApiKey::InitProducerId,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED; 4],
    );
    let (passed, said) = check(&mock.bootstrap_servers(), "auto")?;
    anyhow::ensure!(
        !passed
            && said.contains("FAIL hub transactions: refused: ")
            && said.contains(
                "fix: grant the relay's principal Write and Describe on transactional ids with \
                 prefix `spoke`"
            ),
        "a hub whose ACLs refuse the transactional id:\n{said}"
    );
    let tansu = env.hub.bootstrap();
    kafka::create_topic(&tansu, "spoke.offsets", 1)?;
    let (passed, said) = check(&tansu, "auto")?;
    anyhow::ensure!(
        passed && said.contains("ok   hub transactions: not supported by the hub"),
        "auto on a hub without transactions:\n{said}"
    );
    let (passed, said) = check(&tansu, "on")?;
    anyhow::ensure!(
        !passed
            && said
                .contains("FAIL hub transactions: hub.transactions = \"on\", but the hub has none"),
        "on, on a hub without transactions:\n{said}"
    );
    Ok(())
}

/// The probe runs when the relay starts, not in its first site's session: that session would
/// otherwise wait for a transaction's round trips to the hub before its Welcome.
#[test]
fn a_relay_asks_the_hub_about_transactions_before_any_site_connects() -> anyhow::Result<()> {
    let env = Env::new()?;
    let relay = start_relay(&env, &env.hub.bootstrap(), "auto")?;
    eventually(
        "the relay's transaction probe, with no site connected",
        Duration::from_secs(60),
        || Ok(relay.log().contains("the hub has no transactions")),
    )?;
    Ok(())
}

/// A commit that fails is aborted and the session starts over with a new producer and a new
/// resume point. The mock cluster shows aborted records to every reader, so this checks that
/// nothing is lost and that the relay recovers, not that nothing is duplicated.
#[test]
fn a_failed_commit_aborts_and_the_site_resumes_without_loss() -> anyhow::Result<()> {
    let (env, mock, producer) = edge_and_mock_hub()?;
    let hub = mock.bootstrap_servers();
    let records: Vec<Rec> = (0..600).map(record).collect();
    kafka::produce(&producer, "orders", 0, &records[..300])?;

    let relay = start_relay(&env, &hub, "on")?;
    let _agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    eventually(
        "the first records in the hub",
        Duration::from_secs(120),
        || Ok(kafka::records_held(&hub, HUB_TOPIC, 2)? >= 300),
    )?;
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_TXN_STATE],
    );
    kafka::produce(&producer, "orders", 0, &records[300..])?;
    eventually(
        "every record in the hub after the abort",
        Duration::from_secs(120),
        || {
            let stored = kafka::read_partition(&hub, HUB_TOPIC, 0)?;
            let mut offsets: Vec<i64> = stored
                .iter()
                .filter_map(|s| {
                    let (_, value) = s.rec.headers.iter().rfind(|(k, _)| k == "spoke-offset")?;
                    std::str::from_utf8(value.as_deref()?).ok()?.parse().ok()
                })
                .collect();
            offsets.sort_unstable();
            offsets.dedup();
            Ok(offsets == (0..600).collect::<Vec<i64>>())
        },
    )?;
    // The relay logs the abort after it closed the session, and the agent's next session can
    // finish the work before that line reaches the file, so wait for it rather than read once.
    let aborted = eventually(
        "the relay's log of the aborted transaction",
        Duration::from_secs(10),
        || {
            Ok(relay
                .log()
                .contains("hub transaction failed; aborting the session"))
        },
    );
    assert!(
        aborted.is_ok(),
        "the injected commit failure must abort the transaction:\n{}",
        relay.log()
    );
    Ok(())
}

/// Scenario 1 of the correctness review: on a real Kafka hub every partition a transaction
/// wrote ends in a commit marker, which no consumer returns. A resume scan that waits to see
/// the partition's last offset then never finishes, and the site never ships again. The mock
/// cluster writes no markers of its own, so the test appends real control records (a
/// hand-made Produce request, `spoke_tests::markers`) after the first session, as the
/// coordinator of a real hub would have, and the relay restarts so that it must scan.
#[test]
fn a_hub_partition_that_ends_in_a_transaction_marker_resumes() -> anyhow::Result<()> {
    let (env, mock, producer) = edge_and_mock_hub()?;
    let hub = mock.bootstrap_servers();
    let records: Vec<Rec> = (0..1_000).map(record).collect();
    for p in 0..2 {
        kafka::produce(&producer, "orders", p, &records[..500])?;
    }
    let mut relay = start_relay(&env, &hub, "on")?;
    let mut agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    eventually(
        "the first 1,000 records in the hub",
        Duration::from_secs(120),
        || Ok(kafka::records_held(&hub, HUB_TOPIC, 2)? >= 1_000),
    )?;
    agent.stop()?;
    relay.stop()?;
    for p in 0..2 {
        markers::append(&hub, HUB_TOPIC, p, markers::Marker::Commit, 4242)?;
    }
    markers::append(&hub, "spoke.offsets", 0, markers::Marker::Commit, 4242)?;
    for p in 0..2 {
        kafka::produce(&producer, "orders", p, &records[500..])?;
    }
    let _relay = start_relay(&env, &hub, "on")?;
    let agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    // Each partition holds 1,000 records and a marker; the second marker (if any) of the
    // session's own commits is not written by the mock.
    let landed = eventually(
        "all 2,000 records in the hub past the markers",
        Duration::from_secs(120),
        || {
            let landed = oracle::read_hub(&hub, HUB_TOPIC, 2)?;
            Ok(landed.len() >= 2_000)
        },
    );
    let hub_records = oracle::read_hub(&hub, HUB_TOPIC, 2)?;
    let (tally, faults) = oracle::compare(&env.edge.bootstrap(), SITE, "orders", 2, &hub_records)?;
    let reported = admin::scrape(&env.agent_admin())
        .map(|s| admin::sum(&s, "spoke_agent_lost_records_total", &[]) as u64)
        .unwrap_or(0);
    println!("{}", tally.line("hub-transaction-markers", reported));
    drop(agent);
    landed?;
    anyhow::ensure!(faults.is_empty(), "{}", faults.join("\n"));
    anyhow::ensure!(tally.lost == 0 && tally.dup == 0, "{tally:?}");
    Ok(())
}

/// Scenario 1, second half: a checkpoint is part of its batch's transaction, so it must not
/// count (not even in the relay's own view of `spoke.offsets`) before that transaction
/// committed. Here the hub refuses the batch's records (a permanent produce error), the
/// commit fails and the transaction is aborted: the next session on the same relay must
/// resume at the refused batch, not after it, or its records are lost.
#[test]
fn an_aborted_batch_is_resent_not_skipped() -> anyhow::Result<()> {
    let (env, mock, producer) = edge_and_mock_hub()?;
    let hub = mock.bootstrap_servers();
    let records: Vec<Rec> = (0..600).map(record).collect();
    kafka::produce(&producer, "orders", 0, &records[..300])?;
    let relay = start_relay(&env, &hub, "on")?;
    let agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    eventually(
        "the first records in the hub",
        Duration::from_secs(120),
        || Ok(kafka::records_held(&hub, HUB_TOPIC, 2)? >= 300),
    )?;
    // The batch's records and, if they go in a request of their own, its checkpoint.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 2],
    );
    kafka::produce(&producer, "orders", 0, &records[300..])?;
    let arrived = eventually(
        "all 600 records in the hub after the abort",
        Duration::from_secs(90),
        || Ok(oracle::read_hub(&hub, HUB_TOPIC, 2)?.len() >= 600),
    );
    let hub_records = oracle::read_hub(&hub, HUB_TOPIC, 2)?;
    let (tally, faults) = oracle::compare(&env.edge.bootstrap(), SITE, "orders", 2, &hub_records)?;
    let reported = admin::scrape(&env.agent_admin())
        .map(|s| admin::sum(&s, "spoke_agent_lost_records_total", &[]) as u64)
        .unwrap_or(0);
    println!("{}", tally.line("aborted-commit", reported));
    drop(agent);
    let log = relay.log();
    anyhow::ensure!(
        log.contains("hub transaction failed"),
        "the injected produce errors must fail a commit:\n{log}"
    );
    arrived?;
    anyhow::ensure!(faults.is_empty(), "{}", faults.join("\n"));
    anyhow::ensure!(tally.lost == 0 && tally.dup == 0, "{tally:?}");
    Ok(())
}

/// Scenario 6 on a hub with transactions: a record the hub refuses goes to the dead-letter
/// topic inside its batch's transaction, so it lands there once with the batch, and the
/// checkpoint committed with it keeps the next session from dead-lettering it again.
#[test]
fn a_refused_record_is_dead_lettered_once_inside_its_transaction() -> anyhow::Result<()> {
    const DEAD_LETTER: &str = "spoke.dead-letter";
    let (env, mock, producer) = edge_and_mock_hub()?;
    mock.create_topic(DEAD_LETTER, 1, 1)?;
    let hub = mock.bootstrap_servers();
    for p in 0..2 {
        let records: Vec<Rec> = (0..500)
            .map(|i| {
                let mut rec = record(i);
                if p == 1 && i == 250 {
                    rec.value = Some(vec![7u8; 20_000]);
                }
                rec
            })
            .collect();
        kafka::produce(&producer, "orders", p, &records)?;
    }
    let _relay = start_relay_with(&env, &hub, "on", "max_record_bytes = \"8KiB\"")?;
    let mut agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    eventually("999 records in the hub", Duration::from_secs(120), || {
        Ok(kafka::records_held(&hub, HUB_TOPIC, 2)? >= 999)
    })?;
    // A new session resumes from the committed checkpoint, past the dead-lettered record.
    agent.stop()?;
    let agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    eventually(
        "the agent's second session",
        Duration::from_secs(60),
        || Ok(agent.log().contains("connected relay=")),
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let dead = kafka::read_partition(&hub, DEAD_LETTER, 0)?;
    let total = kafka::records_held(&hub, HUB_TOPIC, 2)?;
    println!(
        "scenario=dead-letter-transactional produced=1000 hub={total} dead_letters={} dup={}",
        dead.len(),
        (total - 999).max(0) + (dead.len() as i64 - 1).max(0)
    );
    anyhow::ensure!(total == 999, "{total} records in the hub");
    anyhow::ensure!(dead.len() == 1, "{} dead letters", dead.len());
    let offset = dead[0]
        .rec
        .headers
        .iter()
        .find(|(k, _)| k == "spoke-offset")
        .and_then(|(_, v)| v.clone());
    anyhow::ensure!(offset.as_deref() == Some(&b"250"[..]), "{offset:?}");
    Ok(())
}
