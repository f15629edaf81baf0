//! The fault suite, quick mode: real processes killed, stopped and restarted while a producer
//! writes at the edge, then hub and edge compared record by record. Every scenario prints
//! `scenario=<name> produced=N hub=N lost=N dup=N`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use spoke_tests::kafka::{self, Rec};
use spoke_tests::site::{AgentOptions, Env, SITE};
use spoke_tests::{admin, eventually};

const PARTITIONS: i32 = 3;

/// `SPOKE_FAULTS_LONG=1` (scripts/faults-long) runs the long mode: 50 agent and 20 relay
/// kills, a 10 minute outage.
fn long_mode() -> bool {
    let long = std::env::var_os("SPOKE_FAULTS_LONG").is_some();
    println!("fault suite mode: {}", if long { "long" } else { "quick" });
    long
}

fn record(i: usize) -> Rec {
    Rec {
        key: (i % 5 != 0).then(|| format!("device-{}", i % 113).into_bytes()),
        value: Some(
            format!(
                "{{\"seq\":{i},\"temp\":{}.{},\"site\":\"{SITE}\"}}",
                15 + i % 20,
                i % 10
            )
            .into_bytes(),
        ),
        headers: if i % 4 == 0 {
            vec![("trace".into(), Some(i.to_le_bytes().to_vec()))]
        } else {
            Vec::new()
        },
        timestamp: Some(1_750_000_000_000 + i as i64),
    }
}

/// A record whose value zstd cannot shrink, so a small spool really fills.
fn incompressible(i: usize) -> Rec {
    let mut r = record(i);
    r.value = Some(
        (0..64)
            .map(|b| ((i * 7919 + b * 104_729) % 251) as u8)
            .collect(),
    );
    r
}

/// Produces continuously in the background until stopped; returns how many it produced.
struct Load {
    stop: Arc<AtomicBool>,
    hold: Arc<AtomicBool>,
    held: Arc<AtomicBool>,
    produced: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Load {
    fn start(edge: String, topic: &'static str, batch: usize, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicBool::new(false));
        let produced = Arc::new(AtomicUsize::new(0));
        let (stop_flag, hold_flag, held_flag, count) =
            (stop.clone(), hold.clone(), held.clone(), produced.clone());
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let mut producer = None;
            let mut n = 0;
            while !stop_flag.load(Ordering::Relaxed) {
                if hold_flag.load(Ordering::Relaxed) {
                    producer = None;
                    held_flag.store(true, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                held_flag.store(false, Ordering::Relaxed);
                let p = match &producer {
                    Some(p) => p,
                    None => producer.insert(kafka::producer(&edge)?),
                };
                let records: Vec<Rec> = (n..n + batch).map(record).collect();
                kafka::produce(
                    p,
                    topic,
                    ((n / batch) % PARTITIONS as usize) as i32,
                    &records,
                )?;
                n += batch;
                count.store(n, Ordering::Relaxed);
                std::thread::sleep(pause);
            }
            Ok(())
        });
        Load {
            stop,
            hold,
            held,
            produced,
            thread,
        }
    }

    /// Runs `f` while the producer is parked and dropped. tansu 0.6 cannot take an
    /// idempotent producer across its own restart: the producer's next request makes the
    /// sqlite storage panic ("more or less than one row") and the broker stays broken, so
    /// the test's producer starts afresh; what is tested is spoke riding out the restart.
    fn held<T>(&self, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        self.hold.store(true, Ordering::Relaxed);
        while !self.held.load(Ordering::Relaxed) && !self.thread.is_finished() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let result = f();
        self.hold.store(false, Ordering::Relaxed);
        result
    }

    fn finish(self) -> anyhow::Result<usize> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("producer thread panicked"))??;
        Ok(self.produced.load(Ordering::Relaxed))
    }
}

/// Waits until the hub holds `produced` records, then compares every partition exactly and
/// prints the scenario's summary line.
fn settle_and_compare(
    env: &Env,
    scenario: &str,
    topic: &str,
    produced: usize,
) -> anyhow::Result<()> {
    let wait = eventually(
        &format!("{produced} records in the hub"),
        Duration::from_secs(300),
        || Ok(env.hub_count(topic, PARTITIONS)? >= produced as i64),
    );
    let hub = env.hub_count(topic, PARTITIONS)?;
    let mut missing = 0;
    for p in 0..PARTITIONS {
        missing +=
            kafka::missing_from_hub(&env.edge.bootstrap(), &env.hub.bootstrap(), SITE, topic, p)?
                .len();
    }
    let dup = (hub + missing as i64 - produced as i64).max(0);
    println!("scenario={scenario} produced={produced} hub={hub} lost={missing} dup={dup}");
    wait?;
    for p in 0..PARTITIONS {
        kafka::assert_replicated(&env.edge.bootstrap(), &env.hub.bootstrap(), SITE, topic, p)?;
    }
    Ok(())
}

#[test]
fn kill_nine_of_agents_and_relays_under_load_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", PARTITIONS)?;
    let mut relay_a = env.start_relay(&["orders"])?;
    let mut relay_b = env.start_relay_b(&["orders"])?;
    let mut options = AgentOptions::include(&["orders"]);
    options.both_relays = true;
    options.relay_extra = "fence_delay = \"2s\"".into();
    let mut agent = env.start_agent(&options)?;
    let load = Load::start(
        env.edge.bootstrap(),
        "orders",
        100,
        Duration::from_millis(30),
    );

    let mut rng = 0x9e37_79b9_u64;
    let mut jitter = |max_ms: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        Duration::from_millis(200 + rng % max_ms)
    };
    let started = Instant::now();
    // Quick: 10 agent and 5 relay kills; long: 50 and 20, the relay kills spread evenly.
    let (agent_kills, relay_target) = if long_mode() { (50, 20) } else { (10, 5) };
    let mut relay_kills = 0;
    for round in 0..agent_kills {
        std::thread::sleep(jitter(1200));
        agent.kill9()?;
        agent = env.start_agent(&options)?;
        if (round + 1) * relay_target / agent_kills > round * relay_target / agent_kills {
            relay_kills += 1;
            std::thread::sleep(jitter(800));
            // Alternate relays; the agent fails over to the other endpoint.
            if relay_kills % 2 == 1 {
                relay_a.kill9()?;
                relay_a = env.start_relay(&["orders"])?;
            } else {
                relay_b.kill9()?;
                relay_b = env.start_relay_b(&["orders"])?;
            }
        }
    }
    let produced = load.finish()?;
    println!(
        "faults injected over {:.1}s: {agent_kills} agent and {relay_kills} relay kill -9s",
        started.elapsed().as_secs_f64()
    );
    let scenario = format!("kill9-agent-x{agent_kills}-relay-x{relay_kills}");
    settle_and_compare(&env, &scenario, "orders", produced)?;

    // Liveness after the faults: one more record arrives.
    kafka::produce(
        &kafka::producer(&env.edge.bootstrap())?,
        "orders",
        0,
        &[record(produced)],
    )?;
    eventually(
        "a fresh record after the faults",
        Duration::from_secs(60),
        || Ok(env.hub_count("orders", PARTITIONS)? == produced as i64 + 1),
    )?;
    Ok(())
}

/// With drop-oldest: the spool_full loss the agent reports must equal, exactly, the records
/// the hub misses, and every other record must be there once.
fn assert_loss_is_what_the_hub_misses(
    env: &Env,
    scenario: &str,
    total: usize,
) -> anyhow::Result<()> {
    let m = admin::scrape(&env.agent_admin())?;
    let reported = admin::sum(
        &m,
        "spoke_agent_lost_records_total",
        &["reason=\"spool_full\""],
    ) as usize;
    let mut missing = 0;
    for p in 0..PARTITIONS {
        missing += kafka::missing_from_hub(
            &env.edge.bootstrap(),
            &env.hub.bootstrap(),
            SITE,
            "orders",
            p,
        )?
        .len();
    }
    let hub = env.hub_count("orders", PARTITIONS)?;
    println!(
        "scenario={scenario} produced={total} hub={hub} lost={reported} dup=0 missing={missing}"
    );
    assert!(reported > 0, "the spool was meant to overflow");
    assert_eq!(
        reported, missing,
        "reported loss must equal the records missing from the hub"
    );
    assert_eq!(hub as usize + missing, total);
    Ok(())
}

/// The relay is up but the link is slower than the edge: the oldest chunks are the ones in
/// flight, and dropping one of them would count as lost records the hub then receives.
#[test]
fn drop_oldest_while_shipping_never_counts_a_delivered_record_as_lost() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", PARTITIONS)?;
    let mut options = AgentOptions::include(&["orders"]);
    options.extra =
        "[ship]\nbatch_max_bytes = \"8KiB\"\nlinger = \"5ms\"\nwindow = 4\nmax_bandwidth = \"100KiB\"\n"
            .into();
    options.spool_extra = "max_bytes = \"64KiB\"\nwhen_full = \"drop-oldest\"".into();
    let _relay = env.start_relay(&["orders"])?;
    let agent = env.start_agent(&options)?;

    const TOTAL: usize = 21_000;
    let producer = kafka::producer(&env.edge.bootstrap())?;
    for p in 0..PARTITIONS {
        let records: Vec<Rec> = (0..TOTAL / 3).map(incompressible).collect();
        kafka::produce(&producer, "orders", p, &records)?;
    }
    eventually(
        "everything read, and the spool drained",
        Duration::from_secs(180),
        || {
            let m = admin::scrape(&env.agent_admin())?;
            Ok(
                admin::sum(&m, "spoke_agent_records_spooled_total", &[]) == TOTAL as f64
                    && admin::sum(&m, "spoke_agent_spool_bytes", &[]) == 0.0,
            )
        },
    )?;
    assert_loss_is_what_the_hub_misses(&env, "drop-oldest-while-shipping", TOTAL)?;
    drop(agent);
    Ok(())
}

#[test]
fn drop_oldest_reports_exactly_the_records_missing_from_the_hub() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", PARTITIONS)?;
    let mut options = AgentOptions::include(&["orders"]);
    options.extra = "[ship]\nbatch_max_bytes = \"8KiB\"\nlinger = \"5ms\"\n".into();
    options.spool_extra = "max_bytes = \"64KiB\"\nwhen_full = \"drop-oldest\"".into();
    let agent = env.start_agent(&options)?;

    // Relay down, far more than 64 KiB of compressed records: the oldest must go.
    const TOTAL: usize = 30_000;
    let producer = kafka::producer(&env.edge.bootstrap())?;
    for p in 0..PARTITIONS {
        let records: Vec<Rec> = (0..TOTAL / 3).map(incompressible).collect();
        kafka::produce(&producer, "orders", p, &records)?;
    }
    eventually(
        "everything read from the edge",
        Duration::from_secs(120),
        || {
            let m = admin::scrape(&env.agent_admin())?;
            let spooled = admin::sum(&m, "spoke_agent_records_spooled_total", &[]);
            Ok(spooled == TOTAL as f64)
        },
    )?;
    let _relay = env.start_relay(&["orders"])?;
    eventually("the spool to drain", Duration::from_secs(120), || {
        let m = admin::scrape(&env.agent_admin())?;
        Ok(admin::sum(&m, "spoke_agent_spool_bytes", &[]) == 0.0
            && admin::sum(&m, "spoke_agent_relay_connected", &[]) == 1.0)
    })?;
    assert_loss_is_what_the_hub_misses(&env, "drop-oldest", TOTAL)?;
    drop(agent);
    Ok(())
}

#[test]
fn retention_gap_at_the_edge_is_reported_exactly() -> anyhow::Result<()> {
    let mut env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 1)?;
    let _relay = env.start_relay(&["orders"])?;
    let options = AgentOptions::include(&["orders"]);
    let mut agent = env.start_agent(&options)?;
    let producer = kafka::producer(&env.edge.bootstrap())?;
    kafka::produce(
        &producer,
        "orders",
        0,
        &(0..100).map(record).collect::<Vec<_>>(),
    )?;
    eventually(
        "the first 100 records in the hub",
        Duration::from_secs(60),
        || Ok(kafka::watermarks(&env.hub.bootstrap(), &format!("{SITE}.orders"), 0)?.1 == 100),
    )?;
    agent.stop()?;
    kafka::produce(
        &producer,
        "orders",
        0,
        &(100..300).map(record).collect::<Vec<_>>(),
    )?;
    drop(producer);

    // The edge loses offsets 100..250 before the agent reads them.
    env.edge.stop()?;
    env.edge.delete_records_below("orders", 0, 250)?;
    env.edge.restart()?;
    let agent = env.start_agent(&options)?;
    eventually(
        "records after the gap in the hub",
        Duration::from_secs(60),
        || Ok(kafka::watermarks(&env.hub.bootstrap(), &format!("{SITE}.orders"), 0)?.1 == 150),
    )?;
    let m = admin::scrape(&env.agent_admin())?;
    let reported = admin::sum(
        &m,
        "spoke_agent_lost_records_total",
        &["reason=\"retention\""],
    );
    let (_, status) = admin::get(&env.agent_admin(), "/status")?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    let loss = &status["recent_losses"][0];
    println!(
        "scenario=retention-gap produced=300 hub=150 lost={reported} dup=0 gap={}..{}",
        loss["first_offset"], loss["last_offset"]
    );
    assert_eq!(reported, 150.0);
    assert_eq!(
        (loss["first_offset"].as_i64(), loss["last_offset"].as_i64()),
        (Some(100), Some(249))
    );
    assert_eq!(loss["topic"], "orders");
    let missing = kafka::missing_from_hub(
        &env.edge.bootstrap(),
        &env.hub.bootstrap(),
        SITE,
        "orders",
        0,
    )?;
    assert!(
        missing.is_empty(),
        "everything still at the edge is in the hub: {missing:?}"
    );
    assert!(agent.log().contains("retention gap"));
    Ok(())
}

#[test]
fn relay_outage_and_broker_restarts_under_load_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    let mut env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", PARTITIONS)?;
    let mut relay = env.start_relay(&["orders"])?;
    let _agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    let load = Load::start(
        env.edge.bootstrap(),
        "orders",
        100,
        Duration::from_millis(50),
    );

    eventually("records flowing", Duration::from_secs(60), || {
        Ok(env.hub_count("orders", PARTITIONS)? > 500)
    })?;
    relay.stop()?;
    let outage = Instant::now();
    std::thread::sleep(Duration::from_secs(if long_mode() { 601 } else { 61 }));
    let during = env.hub_count("orders", PARTITIONS)?;
    relay = env.start_relay(&["orders"])?;
    let outage_seconds = outage.elapsed().as_secs_f64();
    println!(
        "relay outage of {:.0}s; the hub held {during} records meanwhile",
        outage.elapsed().as_secs_f64()
    );
    eventually("flow after the outage", Duration::from_secs(120), || {
        Ok(env.hub_count("orders", PARTITIONS)? > during + 500)
    })?;

    env.hub.restart()?;
    let after_hub = env.hub_count("orders", PARTITIONS)?;
    eventually(
        "flow after the hub broker restart",
        Duration::from_secs(120),
        || Ok(env.hub_count("orders", PARTITIONS)? > after_hub + 500),
    )?;

    load.held(|| env.edge.restart())?;
    let after_edge = env.hub_count("orders", PARTITIONS)?;
    eventually(
        "flow after the edge broker restart",
        Duration::from_secs(120),
        || Ok(env.hub_count("orders", PARTITIONS)? > after_edge + 500),
    )?;

    let produced = load.finish()?;
    let scenario = format!("outage-{outage_seconds:.0}s-hub-restart-edge-restart");
    settle_and_compare(&env, &scenario, "orders", produced)?;
    drop(relay);
    Ok(())
}

#[test]
fn hung_agent_and_hung_relay_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", PARTITIONS)?;
    let relay = env.start_relay(&["orders"])?;
    let agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    let load = Load::start(
        env.edge.bootstrap(),
        "orders",
        100,
        Duration::from_millis(40),
    );
    eventually("records flowing", Duration::from_secs(60), || {
        Ok(env.hub_count("orders", PARTITIONS)? > 500)
    })?;

    // A hung agent: the relay's session idles out; the agent wakes to a dead connection.
    agent.signal("STOP")?;
    std::thread::sleep(Duration::from_secs(35));
    agent.signal("CONT")?;
    let before = env.hub_count("orders", PARTITIONS)?;
    eventually(
        "flow after the agent woke",
        Duration::from_secs(120),
        || Ok(env.hub_count("orders", PARTITIONS)? > before + 500),
    )?;

    // A hung relay, mid-stream: when it wakes, its old session must drain before the
    // agent's new session computes where to resume.
    relay.signal("STOP")?;
    std::thread::sleep(Duration::from_secs(35));
    relay.signal("CONT")?;
    let before = env.hub_count("orders", PARTITIONS)?;
    eventually(
        "flow after the relay woke",
        Duration::from_secs(120),
        || Ok(env.hub_count("orders", PARTITIONS)? > before + 500),
    )?;

    let produced = load.finish()?;
    settle_and_compare(&env, "sigstop-agent-35s-relay-35s", "orders", produced)?;
    Ok(())
}

#[test]
fn full_spool_with_pause_loses_nothing_once_the_relay_returns() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", PARTITIONS)?;
    let mut options = AgentOptions::include(&["orders"]);
    options.extra = "[ship]\nbatch_max_bytes = \"8KiB\"\n".into();
    options.spool_extra = "max_bytes = \"64KiB\"\nwhen_full = \"pause\"".into();
    let _agent = env.start_agent(&options)?;

    const TOTAL: usize = 20_000;
    let producer = kafka::producer(&env.edge.bootstrap())?;
    for p in 0..PARTITIONS {
        let records: Vec<Rec> = (0..TOTAL / 3).map(incompressible).collect();
        kafka::produce(&producer, "orders", p, &records)?;
    }
    let produced = (TOTAL / 3) * PARTITIONS as usize;
    eventually(
        "the spool to fill and reading to pause",
        Duration::from_secs(60),
        || {
            let m = admin::scrape(&env.agent_admin())?;
            Ok(admin::sum(&m, "spoke_agent_spool_bytes", &[]) >= 64.0 * 1024.0)
        },
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let m = admin::scrape(&env.agent_admin())?;
    let spooled = admin::sum(&m, "spoke_agent_records_spooled_total", &[]) as usize;
    assert!(
        spooled < produced,
        "paused before reading everything ({spooled} of {produced})"
    );

    let _relay = env.start_relay(&["orders"])?;
    settle_and_compare(&env, "spool-full-pause", "orders", produced)?;
    let m = admin::scrape(&env.agent_admin())?;
    assert_eq!(admin::sum(&m, "spoke_agent_lost_records_total", &[]), 0.0);
    Ok(())
}

/// The stale relay is cut off from the agent by a network partition but keeps running with its
/// session and whatever it still had to deliver. (A relay *process* frozen mid-delivery and
/// woken later can still land what librdkafka had queued: only broker-side producer fencing,
/// Kafka transactions, stops that; tansu has none. See docs/DESIGN.md.)
#[test]
fn a_stale_relay_cannot_commit_after_another_relay_took_the_site() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", PARTITIONS)?;
    let _relay_a = env.start_relay(&["orders"])?;
    let _relay_b = env.start_relay_b(&["orders"])?;
    let link_a = spoke_tests::udp_proxy::UdpProxy::start(([127, 0, 0, 1], env.relay_port).into())?;
    let options = AgentOptions::include(&["orders"]);
    let config = env.agent_config(&options)?;
    let text = std::fs::read_to_string(&config)?.replace(
        &format!("endpoints = [\"127.0.0.1:{}\"]", env.relay_port),
        &format!(
            "endpoints = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\nfence_delay = \"12s\"",
            link_a.port, env.relay_b_port
        ),
    );
    std::fs::write(&config, text)?;
    let _agent = spoke_tests::process::Spoke::start(
        "spoke-agent",
        &["run", "--config", config.to_str().context("path")?],
        env.path("agent.log"),
    )?;
    let load = Load::start(
        env.edge.bootstrap(),
        "orders",
        100,
        Duration::from_millis(40),
    );
    eventually(
        "records flowing through relay A",
        Duration::from_secs(60),
        || Ok(env.hub_count("orders", PARTITIONS)? > 1_000),
    )?;

    link_a.cut();
    let cut_at = env.hub_count("orders", PARTITIONS)?;
    eventually("relay B to take the site", Duration::from_secs(120), || {
        Ok(env.hub_count("orders", PARTITIONS)? > cut_at + 1_000)
    })?;
    // The partition heals; relay A's old session must not write anything more.
    link_a.heal();
    std::thread::sleep(Duration::from_secs(5));
    let produced = load.finish()?;
    settle_and_compare(&env, "split-brain-partitioned-relay", "orders", produced)?;
    Ok(())
}

#[test]
fn spooled_backlog_ships_while_the_edge_broker_is_down() -> anyhow::Result<()> {
    let mut env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 1)?;
    let mut relay = env.start_relay(&["orders"])?;
    let options = AgentOptions::include(&["orders"]);
    let mut agent = env.start_agent(&options)?;
    let producer = kafka::producer(&env.edge.bootstrap())?;
    kafka::produce(
        &producer,
        "orders",
        0,
        &(0..1_000).map(record).collect::<Vec<_>>(),
    )?;
    eventually(
        "the first records in the hub",
        Duration::from_secs(60),
        || Ok(kafka::watermarks(&env.hub.bootstrap(), &format!("{SITE}.orders"), 0)?.1 == 1_000),
    )?;
    relay.stop()?;
    kafka::produce(
        &producer,
        "orders",
        0,
        &(1_000..1_500).map(record).collect::<Vec<_>>(),
    )?;
    drop(producer);
    eventually("the backlog spooled", Duration::from_secs(60), || {
        let m = admin::scrape(&env.agent_admin())?;
        Ok(admin::sum(&m, "spoke_agent_records_spooled_total", &[]) == 1_500.0)
    })?;
    agent.stop()?;

    // The edge broker is gone when the agent comes back: the spool alone must ship.
    env.edge.stop()?;
    let _agent = env.start_agent(&options)?;
    relay = env.start_relay(&["orders"])?;
    eventually(
        "the backlog in the hub without the edge broker",
        Duration::from_secs(60),
        || Ok(kafka::watermarks(&env.hub.bootstrap(), &format!("{SITE}.orders"), 0)?.1 == 1_500),
    )?;
    env.edge.restart()?;
    kafka::assert_replicated(
        &env.edge.bootstrap(),
        &env.hub.bootstrap(),
        SITE,
        "orders",
        0,
    )?;
    println!("scenario=edge-down-backlog produced=1500 hub=1500 lost=0 dup=0");
    drop(relay);
    Ok(())
}

/// A relay killed and started again at once (a crash, an OOM kill, a reboot) with the same
/// key: its agents must learn at their next packet that their connection is gone (the new
/// process answers it with a stateless reset it can sign, since its reset key comes from the
/// relay's private key), not after the 30 s QUIC idle timeout. After a restart a whole fleet
/// would otherwise wait that long before it even began to reconnect (issue 23's storm: every
/// one of 10,000 sites noticed only after 32 s).
#[test]
fn agents_notice_at_once_that_their_relay_was_restarted() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), "orders", 1)?;
    let mut relay = env.start_relay(&["orders"])?;
    let agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    eventually("the agent's session", Duration::from_secs(60), || {
        Ok(relay.log().contains("site connected"))
    })?;
    relay.kill9()?;
    let killed = Instant::now();
    let restarted = env.start_relay(&["orders"])?;
    let ended = |log: &str| {
        log.lines()
            .any(|line| line.contains("relay session ended") && line.contains("reset by peer"))
    };
    eventually(
        "the agent to learn its connection is gone",
        Duration::from_secs(40),
        || Ok(ended(&agent.log())),
    )?;
    let noticed = killed.elapsed();
    println!(
        "scenario=relay-restart noticed_after_ms={}",
        noticed.as_millis()
    );
    anyhow::ensure!(
        noticed < Duration::from_secs(10),
        "the agent noticed the restart only after {noticed:?}, as if by the idle timeout"
    );
    eventually(
        "the agent's session with the new relay",
        Duration::from_secs(60),
        || Ok(restarted.log().contains("site connected")),
    )?;
    Ok(())
}
