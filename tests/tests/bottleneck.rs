//! The agent knows when the link, not the hub or a lack of data, holds shipping back: spoke's
//! congestion controller reports sends its window held back, which pick the backlog zstd level
//! (`ship.zstd_level_backlog`) and show as `spoke_agent_link_bottleneck` (issue 6).
//! Needs root and /dev/net/tun, as the WAN emulator does.

use std::time::{Duration, Instant};

use spoke_tests::admin;
use spoke_tests::kafka;
use spoke_tests::mix::{Kind, Mix};
use spoke_tests::site::{AgentOptions, Env, Placement, SITE};
use spoke_wan::{Link, LinkSpec};

const TOPIC: &str = "telemetry";
/// About 0.9 MB once compressed: some 4 s of a 2 Mbit/s link.
const RECORDS: usize = 4_000;

fn bottleneck(metrics: &std::collections::BTreeMap<String, f64>) -> anyhow::Result<f64> {
    metrics
        .get("spoke_agent_link_bottleneck")
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no spoke_agent_link_bottleneck in the agent's metrics"))
}

#[test]
fn a_backlog_over_a_slow_link_shows_the_link_as_the_bottleneck_until_it_is_sent(
) -> anyhow::Result<()> {
    let link = Link::start(LinkSpec::new(2_000_000, Duration::from_millis(20), 0.0))?;
    let env = Env::placed(Placement::across(&link))?;
    let mix = Mix {
        kind: Kind::Json,
        size: 1024,
        edge_zstd: false,
    };
    let edge = env.edge.bootstrap();
    env.on_edge(|| -> anyhow::Result<()> {
        kafka::create_topic(&edge, TOPIC, 1)?;
        let records: Vec<kafka::Rec> = (0..RECORDS).map(|i| mix.record(i)).collect();
        kafka::produce(&kafka::producer(&edge)?, TOPIC, 0, &records)
    })?;
    let _relay = env.start_relay(&[TOPIC])?;
    let _agent = env.start_agent(&AgentOptions::include(&[TOPIC]))?;
    let agent_admin = env.agent_admin();
    let scrape = || env.on_edge(|| admin::scrape(&agent_admin));
    let hub = env.hub.bootstrap();
    let hub_topic = format!("{SITE}.{TOPIC}");

    let mut seen_bottleneck = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(metrics) = scrape() {
            seen_bottleneck |= bottleneck(&metrics)? == 1.0;
        }
        let (_, high) = env.on_hub(|| kafka::watermarks(&hub, &hub_topic, 0))?;
        if high >= RECORDS as i64 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {high} of {RECORDS} records reached the hub"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        seen_bottleneck,
        "a backlog four times a 2 Mbit/s link's second never showed the link as the bottleneck"
    );

    // Sent and confirmed, the agent has nothing left the window could hold back.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        bottleneck(&scrape()?)?,
        0.0,
        "an idle agent still reports the link as the bottleneck"
    );
    Ok(())
}
