//! Foundation scenarios: local broker → agent → spool → QUIC → relay → hub broker, with real
//! tansu brokers and real spoke processes. Each asserts exact per-partition content.

use std::time::{Duration, Instant};

use anyhow::Context;
use spoke_tests::kafka::{self, Rec};
use spoke_tests::site::{AgentOptions, Env, SITE};
use spoke_tests::{eventually, process};

const REPLICATION_TIMEOUT: Duration = Duration::from_secs(300);

fn hub_topic(topic: &str) -> String {
    format!("{SITE}.{topic}")
}

fn wait_replicated(env: &Env, topic: &str, partitions: i32, expected: i64) -> anyhow::Result<()> {
    eventually(
        &format!("{expected} records of {topic} in the hub"),
        REPLICATION_TIMEOUT,
        || {
            let n = env.hub_count(topic, partitions)?;
            anyhow::ensure!(
                n <= expected,
                "hub holds {n} records of {topic}, more than the {expected} produced"
            );
            Ok(n == expected)
        },
    )
}

/// Records of every shape Kafka allows: null and empty keys and values, binary and repeated
/// headers, headers with null values, explicit timestamps, and a few 1 MiB values.
fn varied_record(i: usize) -> Rec {
    let key = match i % 7 {
        0 => None,
        1 => Some(Vec::new()),
        _ => Some(format!("key-{i}").into_bytes()),
    };
    let value = if i % 9_000 == 4_500 {
        Some(
            (0..(1 << 20))
                .map(|b: usize| (b.wrapping_mul(31) ^ i) as u8)
                .collect(),
        )
    } else {
        match i % 11 {
            0 => None,
            1 => Some(Vec::new()),
            _ => Some(
                format!(
                    "{{\"id\":{i},\"reading\":{},\"unit\":\"kPa\",\"ok\":true}}",
                    i * 37 % 1000
                )
                .into_bytes(),
            ),
        }
    };
    let mut headers = Vec::new();
    if i % 3 == 0 {
        headers.push(("bin".to_owned(), Some(vec![0, 255, (i % 256) as u8, 0x80])));
    }
    if i % 5 == 0 {
        headers.push(("trace".to_owned(), None));
        headers.push(("trace".to_owned(), Some(b"again".to_vec())));
    }
    Rec {
        key,
        value,
        headers,
        timestamp: Some(1_600_000_000_000 + i as i64),
    }
}

fn raw_bytes(rec: &Rec) -> usize {
    rec.key.as_ref().map_or(0, Vec::len)
        + rec.value.as_ref().map_or(0, Vec::len)
        + rec
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
}

/// Peak resident memory of a process, from /proc (kernel's high-water mark).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The agent logs its totals when it stops; the figures for the closing note come from there.
fn logged_figure(log: &str, field: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains("agent stopped"))?;
    let start = line.find(&format!("{field}="))? + field.len() + 1;
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn three_topics_by_three_partitions_replicate_exactly() -> anyhow::Result<()> {
    let env = Env::new()?;
    let topics = ["orders", "payments", "telemetry.cpu"];
    for topic in topics {
        kafka::create_topic(&env.edge.bootstrap(), topic, 3)?;
    }
    let mut relay = env.start_relay(&[".*"])?;
    let mut agent = env.start_agent(&AgentOptions::include(&[
        "orders",
        "payments",
        "telemetry\\..*",
    ]))?;

    const TOTAL: usize = 100_000;
    let producer = kafka::producer(&env.edge.bootstrap())?;
    let started = Instant::now();
    let mut raw = 0usize;
    let mut per_topic = [0i64; 3];
    // 9 partitions; records of one partition are produced in order.
    for (slot, (topic_index, partition)) in
        (0..3).flat_map(|t| (0..3).map(move |p| (t, p))).enumerate()
    {
        let records: Vec<Rec> = (slot..TOTAL).step_by(9).map(varied_record).collect();
        raw += records.iter().map(raw_bytes).sum::<usize>();
        per_topic[topic_index] += records.len() as i64;
        kafka::produce(&producer, topics[topic_index], partition, &records)?;
    }
    let produced_at = started.elapsed();
    for (topic, expected) in topics.iter().zip(per_topic) {
        wait_replicated(&env, topic, 3, expected)?;
    }
    let replicated_at = started.elapsed();
    let agent_pid = agent.pid().context("agent pid")?;
    let rss = peak_rss_kib(agent_pid);

    let mut checked = 0;
    let compare_started = Instant::now();
    for topic in topics {
        checked += env.assert_all_replicated(topic, 3)?;
    }
    println!(
        "compared {checked} records in {:.1}s",
        compare_started.elapsed().as_secs_f64()
    );
    assert_eq!(checked, TOTAL, "every produced record compared");

    agent.stop()?;
    relay.stop()?;
    let log = agent.log();
    let wire = logged_figure(&log, "wire_bytes");
    println!(
        "figures: records={TOTAL} raw_bytes={raw} produce_s={:.1} end_to_end_s={:.1} records_per_s={:.0} agent_peak_rss_mib={:.1} wire_bytes={} wire_to_raw={:.3}",
        produced_at.as_secs_f64(),
        replicated_at.as_secs_f64(),
        TOTAL as f64 / replicated_at.as_secs_f64(),
        rss.unwrap_or(0) as f64 / 1024.0,
        wire.unwrap_or(0),
        wire.unwrap_or(0) as f64 / raw as f64,
    );
    Ok(())
}

#[test]
fn topics_created_later_follow_include_and_exclude() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 1)?;
    let _relay = env.start_relay(&[".*"])?;
    let mut options = AgentOptions::include(&["orders", "telemetry\\..*"]);
    options.exclude = vec!["telemetry\\.debug".into()];
    let _agent = env.start_agent(&options)?;

    let producer = kafka::producer(&env.edge.bootstrap())?;
    let records: Vec<Rec> = (0..100).map(varied_record).collect();
    kafka::produce(&producer, "orders", 0, &records)?;
    wait_replicated(&env, "orders", 1, 100)?;

    // Created while the agent runs: the excluded one first, so by the time the included one
    // is replicated the agent has certainly seen both.
    kafka::create_topic(&env.edge.bootstrap(), "telemetry.debug", 1)?;
    kafka::produce(&producer, "telemetry.debug", 0, &records)?;
    kafka::create_topic(&env.edge.bootstrap(), "telemetry.cpu", 2)?;
    kafka::produce(&producer, "telemetry.cpu", 0, &records[..60])?;
    kafka::produce(&producer, "telemetry.cpu", 1, &records[60..])?;
    wait_replicated(&env, "telemetry.cpu", 2, 100)?;
    assert_eq!(env.assert_all_replicated("telemetry.cpu", 2)?, 100);
    assert_eq!(env.assert_all_replicated("orders", 1)?, 100);

    // One more record on the included topic, and once it arrived the excluded one must still
    // be absent from the hub.
    kafka::produce(&producer, "telemetry.cpu", 0, &records[..1])?;
    wait_replicated(&env, "telemetry.cpu", 2, 101)?;
    let hub_topics = kafka::topic_names(&env.hub.bootstrap())?;
    assert!(
        !hub_topics.iter().any(|t| t.contains("telemetry.debug")),
        "excluded topic reached the hub: {hub_topics:?}"
    );
    Ok(())
}

#[test]
fn check_refuses_an_include_that_matches_nothing() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 2)?;

    let config = env.agent_config(&AgentOptions::include(&["order", "nothing\\..*"]))?;
    let out = process::run(
        "spoke-agent",
        &["check", "--config", config.to_str().context("path")?],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check must fail; stderr: {stderr}");
    assert!(stderr.contains("matches no topic"), "{stderr}");

    // A check that passes also shakes hands with the relay.
    let _relay = env.start_relay(&["orders"])?;
    let config = env.agent_config(&AgentOptions::include(&["orders"]))?;
    let out = process::run(
        "spoke-agent",
        &["check", "--config", config.to_str().context("path")?],
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("orders (2 partitions)"), "{stdout}");
    assert!(stdout.contains("ok   relay 127.0.0.1:"), "{stdout}");

    let mut options = AgentOptions::include(&["orders"]);
    options.extra = "[ship]\nwindoww = 4\n".into();
    let config = env.agent_config(&options)?;
    let out = process::run(
        "spoke-agent",
        &["check", "--config", config.to_str().context("path")?],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&config.display().to_string()),
        "names the file: {stderr}"
    );
    assert!(stderr.contains("windoww"), "names the key: {stderr}");
    Ok(())
}

#[test]
fn agent_spools_while_relay_is_down_then_ships_everything() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 2)?;
    let agent = env.start_agent(&AgentOptions::include(&["orders"]))?;

    let producer = kafka::producer(&env.edge.bootstrap())?;
    let records: Vec<Rec> = (0..5_000).map(varied_record).collect();
    kafka::produce(&producer, "orders", 0, &records[..2_500])?;
    kafka::produce(&producer, "orders", 1, &records[2_500..])?;
    eventually(
        "the agent to spool while the relay is unreachable",
        Duration::from_secs(60),
        || {
            let log = agent.log();
            Ok(log.contains("spooled chunk") && log.contains("relay session ended"))
        },
    )?;
    assert_eq!(
        env.hub_count("orders", 2)?,
        0,
        "nothing can reach the hub yet"
    );

    let _relay = env.start_relay(&["orders"])?;
    wait_replicated(&env, "orders", 2, 5_000)?;
    assert_eq!(env.assert_all_replicated("orders", 2)?, 5_000);
    Ok(())
}

#[test]
fn agent_restarted_mid_stream_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 3)?;
    let _relay = env.start_relay(&["orders"])?;
    let options = AgentOptions::include(&["orders"]);
    let mut agent = env.start_agent(&options)?;

    const TOTAL: usize = 30_000;
    let edge = env.edge.bootstrap();
    let writer = std::thread::spawn(move || -> anyhow::Result<()> {
        let producer = kafka::producer(&edge)?;
        for (n, start) in (0..TOTAL).step_by(300).enumerate() {
            let records: Vec<Rec> = (start..start + 300).map(varied_record).collect();
            kafka::produce(&producer, "orders", (n % 3) as i32, &records)?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    });

    for restart in 0..3 {
        eventually(
            "records flowing before the restart",
            Duration::from_secs(120),
            || Ok(env.hub_count("orders", 3)? > (restart * 6_000) as i64),
        )?;
        agent.stop().context("agent must stop cleanly on SIGTERM")?;
        agent = env.start_agent(&options)?;
    }
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("producer thread panicked"))??;
    wait_replicated(&env, "orders", 3, TOTAL as i64)?;
    assert_eq!(env.assert_all_replicated("orders", 3)?, TOTAL);
    Ok(())
}

#[test]
fn relay_refuses_a_hello_for_another_site_than_the_certificate() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 1)?;
    // Any site the CA vouches for may connect, so only the identity check can refuse.
    let relay_config = env.relay_config(&["orders"])?;
    let text = std::fs::read_to_string(&relay_config)?
        .replace(&format!("[sites.{SITE}]"), "[sites.\"*\"]");
    std::fs::write(&relay_config, text)?;
    let relay_arg = relay_config.to_str().context("path")?;
    let _relay = process::Spoke::start(
        "spoke-relay",
        &["run", "--config", relay_arg],
        env.path("relay.log"),
    )?;

    // A valid certificate of the same CA, but for another site than the agent claims.
    let (cert, key) = env.issue_cert("intruder")?;
    let config = env.agent_config(&AgentOptions::include(&["orders"]))?;
    let text = std::fs::read_to_string(&config)?
        .replace(
            &format!("{SITE}.pem"),
            cert.file_name().and_then(|f| f.to_str()).context("name")?,
        )
        .replace(
            &format!("{SITE}.key"),
            key.file_name().and_then(|f| f.to_str()).context("name")?,
        );
    std::fs::write(&config, text)?;
    let config_arg = config.to_str().context("path")?;
    let agent = process::Spoke::start(
        "spoke-agent",
        &["run", "--config", config_arg],
        env.path("intruder.log"),
    )?;

    let producer = kafka::producer(&env.edge.bootstrap())?;
    kafka::produce(&producer, "orders", 0, &[varied_record(1)])?;
    eventually(
        "the relay to refuse the session",
        Duration::from_secs(60),
        || {
            Ok(agent
                .log()
                .contains("Hello claims site branch-042 but the certificate is for intruder"))
        },
    )?;
    assert_eq!(env.hub_count("orders", 1)?, 0, "nothing may reach the hub");
    Ok(())
}

/// `[hub.topic_config]`: a compacted edge topic must not become a delete-policy hub topic, so
/// the hub topics the relay creates take the configured settings.
#[test]
fn hub_topics_the_relay_creates_take_hub_topic_config() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 1)?;
    let producer = kafka::producer(&env.edge.bootstrap())?;
    let records: Vec<Rec> = (0..20u32)
        .map(|i| Rec {
            key: Some(format!("k{}", i % 5).into_bytes()),
            value: Some(i.to_le_bytes().to_vec()),
            headers: vec![],
            timestamp: None,
        })
        .collect();
    kafka::produce(&producer, "orders", 0, &records)?;
    let _relay = env.start_relay_with(
        &["orders"],
        &spoke_tests::site::RelayOptions {
            hub_extra: "[hub.topic_config]\n\"cleanup.policy\" = \"compact\"\n\"retention.ms\" = \"604800000\"".into(),
            ..Default::default()
        },
    )?;
    let _agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    wait_replicated(&env, "orders", 1, 20)?;
    let configs = kafka::topic_config(&env.hub.bootstrap(), &hub_topic("orders"))?;
    anyhow::ensure!(
        configs.get("cleanup.policy").map(String::as_str) == Some("compact")
            && configs.get("retention.ms").map(String::as_str) == Some("604800000"),
        "hub topic created with {configs:?}"
    );
    Ok(())
}

/// A site with a compacted topic and a deleting one: each hub topic the relay creates keeps
/// its source topic's compaction (`cleanup.policy` and the compaction settings the agent
/// carries in `TopicConfig`), nothing else of it (not its retention), and `[hub.topic_config]`
/// still overrides what is carried, name by name.
#[test]
fn hub_topics_keep_their_source_topics_compaction() -> anyhow::Result<()> {
    let env = Env::new()?;
    let edge = env.edge.bootstrap();
    kafka::create_topic_with(
        &edge,
        "inventory",
        2,
        &[
            ("cleanup.policy", "compact"),
            ("min.compaction.lag.ms", "60000"),
            ("delete.retention.ms", "3600000"),
            ("retention.ms", "1000"),
        ],
    )?;
    kafka::create_topic(&edge, "orders", 1)?;
    let producer = kafka::producer(&edge)?;
    let records: Vec<Rec> = (0..20u32)
        .map(|i| Rec {
            key: Some(format!("sku-{}", i % 5).into_bytes()),
            value: Some(i.to_le_bytes().to_vec()),
            headers: vec![],
            timestamp: None,
        })
        .collect();
    for (topic, partition) in [("inventory", 0), ("inventory", 1), ("orders", 0)] {
        kafka::produce(&producer, topic, partition, &records)?;
    }
    let _relay = env.start_relay_with(
        &["inventory", "orders"],
        &spoke_tests::site::RelayOptions {
            hub_extra: "[hub.topic_config]\n\"delete.retention.ms\" = \"7200000\"".into(),
            ..Default::default()
        },
    )?;
    let _agent = env.start_agent(&AgentOptions::include(&["inventory", "orders"]))?;
    wait_replicated(&env, "inventory", 2, 40)?;
    wait_replicated(&env, "orders", 1, 20)?;
    let hub = env.hub.bootstrap();
    let inventory = kafka::topic_config(&hub, &hub_topic("inventory"))?;
    println!("hub topic {}: {inventory:?}", hub_topic("inventory"));
    let value = |configs: &std::collections::BTreeMap<String, String>, name: &str| {
        configs.get(name).cloned()
    };
    anyhow::ensure!(
        value(&inventory, "cleanup.policy").as_deref() == Some("compact")
            && value(&inventory, "min.compaction.lag.ms").as_deref() == Some("60000")
            && value(&inventory, "delete.retention.ms").as_deref() == Some("7200000")
            && value(&inventory, "retention.ms").as_deref() != Some("1000"),
        "the compacted topic's hub topic: {inventory:?}"
    );
    let orders = kafka::topic_config(&hub, &hub_topic("orders"))?;
    println!("hub topic {}: {orders:?}", hub_topic("orders"));
    anyhow::ensure!(
        value(&orders, "cleanup.policy").as_deref() != Some("compact")
            && value(&orders, "delete.retention.ms").as_deref() == Some("7200000"),
        "the deleting topic's hub topic: {orders:?}"
    );
    Ok(())
}

/// `spoke-agent check` makes the QUIC handshake the shipper makes: a relay that does not
/// answer, and one whose certificate another CA signed, are each a FAIL line with its fix.
#[test]
fn agent_check_shakes_hands_with_the_relay() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 1)?;
    let config = env.agent_config(&AgentOptions::include(&["orders"]))?;
    let config_arg = config.to_str().context("path")?.to_owned();
    let check = |config: &str| -> anyhow::Result<(bool, String)> {
        let out = process::run("spoke-agent", &["check", "--config", config])?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    };
    let (passed, said) = check(&config_arg)?;
    anyhow::ensure!(
        !passed && said.contains("FAIL relay 127.0.0.1:") && said.contains("no answer"),
        "no relay runs:\n{said}"
    );

    let _relay = env.start_relay(&["orders"])?;
    let other_ca = env.path("other-ca.pem");
    std::fs::write(
        &other_ca,
        spoke_tests::pki::Authority::new("someone-else")?.cert_pem(),
    )?;
    let text = std::fs::read_to_string(&config)?;
    let ca_line = text
        .lines()
        .find(|l| l.starts_with("ca = "))
        .context("agent config without relay.ca")?;
    let foreign = env.path("agent-foreign-ca.toml");
    std::fs::write(
        &foreign,
        text.replace(ca_line, &format!("ca = \"{}\"", other_ca.display())),
    )?;
    let (passed, said) = check(foreign.to_str().context("path")?)?;
    anyhow::ensure!(
        !passed && said.contains("the relay's certificate is not signed by the CA in relay.ca"),
        "a relay certificate from another CA:\n{said}"
    );
    let (passed, said) = check(&config_arg)?;
    anyhow::ensure!(passed && said.contains("ok   relay 127.0.0.1:"), "{said}");
    Ok(())
}
