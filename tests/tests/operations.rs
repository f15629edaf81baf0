//! Operating spoke: metrics during an outage, the fleet view, the dashboard's queries, and
//! configuration reload, against real brokers and processes.

use std::time::Duration;

use anyhow::Context;
use rdkafka::producer::Producer;
use spoke_tests::kafka::{self, Rec};
use spoke_tests::site::{AgentOptions, Env, SITE};
use spoke_tests::{admin, eventually, process};

fn record(i: usize) -> Rec {
    Rec {
        key: Some(format!("k{i}").into_bytes()),
        value: Some(
            format!(
                "{{\"id\":{i},\"status\":\"shipped\",\"weight\":{}}}",
                i % 97
            )
            .into_bytes(),
        ),
        headers: Vec::new(),
        timestamp: Some(1_700_000_000_000 + i as i64),
    }
}

#[test]
fn metrics_follow_an_outage_and_the_fleet_view_shows_the_lag() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 1)?;
    let mut options = AgentOptions::include(&["orders"]);
    // Slow shipping, so the relay sees the site while it still lags.
    options.extra = "[ship]\nmax_bandwidth = \"16KiB\"\nbatch_max_bytes = \"16KiB\"\n".into();
    let agent = env.start_agent(&options)?;
    let producer = kafka::producer(&env.edge.bootstrap())?;
    let records: Vec<Rec> = (0..20_000).map(record).collect();
    kafka::produce(&producer, "orders", 0, &records)?;

    // Relay down: lag rises to everything produced, the spool fills.
    eventually(
        "lag and spool to rise while the relay is down",
        Duration::from_secs(60),
        || {
            let m = admin::scrape(&env.agent_admin())?;
            Ok(
                admin::sum(&m, "spoke_agent_lag_records", &["topic=\"orders\""]) == 20_000.0
                    && admin::sum(&m, "spoke_agent_spool_bytes", &[]) > 0.0
                    && admin::sum(&m, "spoke_agent_records_spooled_total", &[]) == 20_000.0
                    && admin::sum(&m, "spoke_agent_relay_connected", &[]) == 0.0,
            )
        },
    )?;
    let (code, _) = admin::get(&env.agent_admin(), "/healthz")?;
    assert_eq!(code, 200, "spooling through an outage is the job");

    let relay = env.start_relay(&["orders"])?;
    let relay_admin = env.relay_admin();
    eventually(
        "`spoke-relay sites` to show the site with lag",
        Duration::from_secs(60),
        || {
            let out = process::run("spoke-relay", &["sites", "--admin", &relay_admin])?;
            let table = String::from_utf8_lossy(&out.stdout);
            let row = table.lines().find(|l| l.starts_with(SITE));
            let json = process::run("spoke-relay", &["sites", "--admin", &relay_admin, "--json"])?;
            let status: serde_json::Value = serde_json::from_slice(&json.stdout)?;
            let lag = status["sites"][0]["lag_records"].as_u64().unwrap_or(0);
            Ok(out.status.success()
                && row.is_some_and(|r| r.contains(" yes ") && r.contains(&format!(" {lag} ")))
                && lag > 0)
        },
    )?;

    eventually(
        "lag and spool to return to 0",
        Duration::from_secs(180),
        || {
            let m = admin::scrape(&env.agent_admin())?;
            Ok(admin::sum(&m, "spoke_agent_lag_records", &[]) == 0.0
                && admin::sum(&m, "spoke_agent_spool_bytes", &[]) == 0.0
                && admin::sum(&m, "spoke_agent_records_acked_total", &[]) == 20_000.0
                && admin::sum(&m, "spoke_agent_relay_connected", &[]) == 1.0)
        },
    )?;
    assert_eq!(env.hub_count("orders", 1)?, 20_000);
    let raw: usize = records
        .iter()
        .map(|r| r.key.as_ref().map_or(0, Vec::len) + r.value.as_ref().map_or(0, Vec::len))
        .sum();
    let wire = admin::sum(
        &admin::scrape(&env.agent_admin())?,
        "spoke_agent_wire_bytes_total",
        &[],
    );
    println!(
        "figures: small JSON records={} raw_bytes={raw} wire_bytes={wire} wire_per_record={:.1} wire_to_raw={:.3} (16 KiB chunks)",
        records.len(),
        wire / records.len() as f64,
        wire / raw as f64
    );
    let relay_metrics = admin::scrape(&relay_admin)?;
    assert_eq!(
        admin::sum(
            &relay_metrics,
            "spoke_relay_records_total",
            &[&format!("site=\"{SITE}\"")]
        ),
        20_000.0
    );
    assert_eq!(
        admin::sum(&relay_metrics, "spoke_relay_sites_connected", &[]),
        1.0
    );

    let status = process::run("spoke-agent", &["status", "--admin", &env.agent_admin()])?;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert!(
        text.contains("connected") && text.contains("backlog           0 records"),
        "{text}"
    );
    drop(relay);
    drop(agent);
    Ok(())
}

/// With no relay the link is behind once the oldest chunk waited 2 s: chunks then linger
/// `ship.linger_backlog` (500 ms) instead of `ship.linger` (20 ms), so a backlog built at a
/// live rate ships as few, large batches (issue 6: the drain after an outage).
#[test]
fn chunks_linger_longer_while_the_relay_is_away_and_still_all_arrive() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 1)?;
    let _agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    let producer = kafka::producer(&env.edge.bootstrap())?;
    let spooled = || -> anyhow::Result<(f64, f64)> {
        let m = admin::scrape(&env.agent_admin())?;
        Ok((
            admin::sum(&m, "spoke_agent_records_spooled_total", &[]),
            admin::sum(&m, "spoke_agent_chunks_spooled_total", &[]),
        ))
    };
    // About 50 records/s: one per 20 ms linger, so a chunk per record unless chunks linger.
    const RECORDS: usize = 400;
    let mut before = None;
    let started = std::time::Instant::now();
    for i in 0..RECORDS {
        kafka::send(&producer, record(i).to("orders", 0))?;
        std::thread::sleep(Duration::from_millis(20));
        if before.is_none() && started.elapsed() > Duration::from_secs(4) {
            before = Some(spooled()?);
        }
    }
    producer.flush(Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_secs(1));
    let (records_before, chunks_before) = before.context("producing took under 4 s")?;
    let (records_after, chunks_after) = spooled()?;
    let per_chunk = (records_after - records_before) / (chunks_after - chunks_before).max(1.0);
    assert!(
        per_chunk >= 8.0,
        "{per_chunk:.1} records per chunk spooled while the relay was away: chunks did not \
         linger ({} records in {} chunks)",
        records_after - records_before,
        chunks_after - chunks_before
    );

    let _relay = env.start_relay(&["orders"])?;
    eventually(
        "every record to reach the hub",
        Duration::from_secs(60),
        || Ok(env.hub_count("orders", 1)? == RECORDS as i64),
    )?;
    Ok(())
}

#[test]
fn every_metric_the_dashboard_queries_exists_in_a_live_scrape() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 1)?;
    let _relay = env.start_relay(&["orders", "secret"])?;
    let _agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    kafka::produce(
        &kafka::producer(&env.edge.bootstrap())?,
        "orders",
        0,
        &(0..10).map(record).collect::<Vec<_>>(),
    )?;
    eventually("records in the hub", Duration::from_secs(60), || {
        Ok(env.hub_count("orders", 1)? == 10)
    })?;
    // Per-site series appear with the first heartbeat (every 5 s), per-partition lag with
    // librdkafka's first statistics (every second).
    eventually(
        "a heartbeat at the relay and lag at the agent",
        Duration::from_secs(30),
        || {
            let relay = admin::names(&admin::scrape(&env.relay_admin())?);
            let agent = admin::names(&admin::scrape(&env.agent_admin())?);
            Ok(relay.contains(&"spoke_relay_site_lag_records".to_owned())
                && agent.contains(&"spoke_agent_lag_records".to_owned()))
        },
    )?;

    let mut live = admin::names(&admin::scrape(&env.agent_admin())?);
    live.extend(admin::names(&admin::scrape(&env.relay_admin())?));
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/grafana/spoke.json"
    ))?;
    let queried = metric_names_in(&dashboard);
    assert!(queried.len() >= 8, "the dashboard queries {queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|m| !live.contains(m)).collect();
    assert!(
        missing.is_empty(),
        "dashboard queries metrics no binary exports: {missing:?}\nlive: {live:?}"
    );
    Ok(())
}

/// `spoke_*` identifiers in the dashboard's `expr` fields.
fn metric_names_in(dashboard: &str) -> Vec<String> {
    let mut names = Vec::new();
    for expr in dashboard
        .lines()
        .filter(|l| l.trim_start().starts_with("\"expr\""))
    {
        let mut rest = expr;
        while let Some(start) = rest.find("spoke_") {
            let tail = &rest[start..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.push(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn sighup_adding_a_topic_to_include_replicates_it_without_restart() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 1)?;
    kafka::create_topic(&env.edge.bootstrap(), "returns", 1)?;
    let _relay = env.start_relay(&["orders", "returns"])?;
    let mut agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    let producer = kafka::producer(&env.edge.bootstrap())?;
    let records: Vec<Rec> = (0..500).map(record).collect();
    kafka::produce(&producer, "orders", 0, &records)?;
    kafka::produce(&producer, "returns", 0, &records)?;
    eventually("orders replicated", Duration::from_secs(60), || {
        Ok(env.hub_count("orders", 1)? == 500)
    })?;
    assert_eq!(env.hub_count("returns", 1)?, 0, "not included yet");

    let pid = agent.pid().context("agent pid")?;
    env.agent_config(&AgentOptions::include(&["orders", "returns"]))?;
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    assert!(status.success());
    eventually(
        "returns replicated after SIGHUP",
        Duration::from_secs(60),
        || Ok(env.hub_count("returns", 1)? == 500),
    )?;
    assert!(agent.is_running(), "SIGHUP must not stop the agent");
    assert_eq!(
        kafka::assert_replicated(
            &env.edge.bootstrap(),
            &env.hub.bootstrap(),
            SITE,
            "returns",
            0
        )?,
        500
    );
    assert!(agent.log().contains("configuration reloaded"));
    Ok(())
}
