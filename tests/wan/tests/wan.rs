//! The WAN emulator holds its settings: round-trip time, bottleneck rate and loss, measured by
//! traffic crossing it between its two namespaces. Benchmarks are only as good as this.
//! Needs root and /dev/net/tun.

use std::time::Duration;

use spoke_wan::{bench, Link, LinkSpec};

const MBIT: u64 = 1_000_000;

fn within(measured: f64, target: f64, tolerance: f64) -> bool {
    (measured - target).abs() <= target * tolerance
}

#[test]
fn round_trip_time_and_tcp_rate_match_the_setting() -> anyhow::Result<()> {
    let spec = LinkSpec::new(20 * MBIT, Duration::from_millis(50), 0.0);
    let link = Link::start(spec)?;

    let mut rtts = bench::udp_rtts(&link, 20)?;
    rtts.sort();
    let median = rtts[rtts.len() / 2].as_secs_f64() * 1000.0;
    let target = spec.rtt().as_secs_f64() * 1000.0;
    println!(
        "RTT at {target} ms: median {median:.2} ms, min {:.2} ms, max {:.2} ms",
        rtts[0].as_secs_f64() * 1000.0,
        rtts[rtts.len() - 1].as_secs_f64() * 1000.0
    );
    assert!(within(median, target, 0.10), "median RTT {median:.2} ms");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Two seconds cover slow start (~6 RTTs to a 250 KB window); then six seconds of steady
    // state, where a Cubic flow over a one-BDP buffer keeps the link busy.
    let tcp = runtime.block_on(bench::tcp_bulk(
        &link,
        "cubic",
        1,
        Duration::from_secs(2),
        Duration::from_secs(6),
    ))?;
    let (goodput, wire) = (tcp.goodput_bps / 1e6, tcp.wire_bps / 1e6);
    println!("TCP bulk at 20 Mbit/s: goodput {goodput:.2} Mbit/s, wire {wire:.2} Mbit/s");
    assert!(
        within(goodput, 20.0, 0.10),
        "TCP goodput {goodput:.2} Mbit/s"
    );
    assert!(within(wire, 20.0, 0.02), "wire rate {wire:.2} Mbit/s");
    let stats = link.stats();
    println!("{stats:?}");
    assert_eq!(stats.edge_to_hub.lost, 0);
    assert_eq!(stats.edge_to_hub.errors + stats.hub_to_edge.errors, 0);
    Ok(())
}

#[test]
fn random_loss_matches_the_setting_and_the_counters() -> anyhow::Result<()> {
    let spec = LinkSpec::new(0, Duration::from_millis(10), 0.05);
    let link = Link::start(spec)?;
    let sent = 4_000;
    let received = bench::udp_one_way(&link, sent, 64, Duration::from_micros(500))?.received;
    let stats = link.stats().edge_to_hub;
    let loss = 1.0 - received as f64 / sent as f64;
    println!(
        "loss at 5%: {:.2}% ({received} of {sent} arrived); {stats:?}",
        loss * 100.0
    );
    // The forwarder's own accounting matches what the endpoints saw, datagram for datagram.
    assert_eq!(stats.packets_in, sent);
    assert_eq!(stats.lost, sent - received);
    assert_eq!(stats.queue_dropped, 0);
    // Binomial sd of 4,000 draws at 5% is 0.34 points: 3%..7% is about 6 sd.
    assert!((0.03..=0.07).contains(&loss), "loss {:.2}%", loss * 100.0);
    Ok(())
}

#[test]
fn a_cut_link_drops_everything_and_a_restored_one_carries_again() -> anyhow::Result<()> {
    let link = Link::start(LinkSpec::new(0, Duration::from_millis(5), 0.0))?;
    link.set_down(true);
    let cut = bench::udp_one_way(&link, 200, 64, Duration::from_micros(500))?.received;
    let stats = link.stats().edge_to_hub;
    println!("cut: {cut} of 200 arrived; {stats:?}");
    assert_eq!(cut, 0);
    assert_eq!(stats.outage_dropped, 200);
    link.set_down(false);
    let restored = bench::udp_one_way(&link, 200, 64, Duration::from_micros(500))?.received;
    println!("restored: {restored} of 200 arrived");
    assert_eq!(restored, 200);
    Ok(())
}

#[test]
fn a_flood_beyond_the_rate_is_cut_to_the_rate_by_drop_tail() -> anyhow::Result<()> {
    // 2 Mbit/s with a 50 ms buffer, offered ~9.6 Mbit/s of 1,200-byte datagrams for 2 s.
    let mut spec = LinkSpec::new(2 * MBIT, Duration::from_millis(20), 0.0);
    spec.queue = Duration::from_millis(50);
    let link = Link::start(spec)?;
    let sent = 2_000;
    let bench::OneWay { received, sending } =
        bench::udp_one_way(&link, sent, 1200, Duration::from_millis(1))?;
    let stats = link.stats().edge_to_hub;
    // The link was busy while the sender sent and then for as long as its full buffer took
    // to drain.
    let busy = (sending + spec.queue).as_secs_f64();
    let wire_mbit = stats.delivered_bytes as f64 * 8.0 / busy / 1e6;
    println!("flood at 2 Mbit/s: {received} of {sent} arrived, {wire_mbit:.2} Mbit/s; {stats:?}");
    assert_eq!(stats.delivered, received);
    assert_eq!(stats.queue_dropped, sent - received);
    // What arrives is what the link can carry in the sending time plus the buffer.
    assert!(
        within(wire_mbit, 2.0, 0.10),
        "delivered {wire_mbit:.2} Mbit/s"
    );
    Ok(())
}

#[test]
fn dropping_the_link_deletes_its_namespaces() -> anyhow::Result<()> {
    let link = Link::start(LinkSpec::new(0, Duration::from_millis(1), 0.0))?;
    let names = [link.edge().name().to_owned(), link.hub().name().to_owned()];
    let output = link
        .edge()
        .command("ip")
        .args(["-br", "addr", "show", "wan0"])
        .output()?;
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(shown.contains("198.18.0.1"), "edge wan0: {shown}");
    drop(link);
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    let list = String::from_utf8_lossy(&list.stdout);
    for name in names {
        assert!(!list.contains(&name), "{name} still exists: {list}");
    }
    Ok(())
}
