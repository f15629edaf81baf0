//! Data streams (protocol version 3, issue #6): batches of different partitions travel on
//! different QUIC streams, so one stalled stream holds up only its own partitions; a relay
//! that allows no data streams still gets everything over the control stream.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context};
use spoke_proto::{Frame, MAX_PROTOCOL_VERSION};
use spoke_tests::eventually;
use spoke_tests::hostile::{self, Session, CLOSE_PROTOCOL_ERROR};
use spoke_tests::kafka::{self, Rec};
use spoke_tests::mix::{Kind, Mix};
use spoke_tests::pki::Identity;
use spoke_tests::site::{AgentOptions, Env, Placement, RelayOptions};
use spoke_wan::{Link, LinkSpec};

const TOPIC: &str = "orders";
const PEER: &str = "peer";

/// A valid batch of `count` records of `partition` (of two), starting at offset `first`.
fn batch(seq: u64, partition: i32, first: i64, count: usize) -> anyhow::Result<Vec<u8>> {
    let mut frame = hostile::valid_batch(seq, TOPIC, first, count)?;
    if let Frame::Batch(batch) = &mut frame {
        batch.partition = partition;
        batch.partition_count = 2;
    }
    hostile::encode(&frame)
}

async fn answer(session: &mut Session, buf: &mut Vec<u8>) -> anyhow::Result<Frame> {
    tokio::time::timeout(
        Duration::from_secs(60),
        hostile::read_frame(&mut session.recv, buf),
    )
    .await
    .context("no answer within 60 s")??
    .context("the relay finished the control stream")
}

#[test]
fn a_stalled_data_stream_holds_up_only_its_own_partitions() -> anyhow::Result<()> {
    let env = Env::new()?;
    let (pem, key) = env.issue_cert(PEER)?;
    let identity = Identity::load(&pem, &key)?;
    let options = RelayOptions {
        extra: format!("[sites.{PEER}]\nallow = [\"{TOPIC}\"]\n"),
        ..RelayOptions::default()
    };
    let mut relay = env.start_relay_with(&[TOPIC], &options)?;
    let ca = std::fs::read_to_string(env.pki().join("ca.pem"))?;
    let config = hostile::client_config(&ca, Some(&identity), Some(Duration::from_secs(1)))?;
    let address = SocketAddr::from(([127, 0, 0, 1], env.relay_port));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let endpoint = hostile::endpoint()?;
        let hello = hostile::hello_speaking(PEER, MAX_PROTOCOL_VERSION);
        let mut session = Session::open_with(&endpoint, &config, address, &hello).await?;
        let mut buf = Vec::new();

        // Partition 0's batch stops halfway on one data stream, as if a packet were lost ...
        let held = batch(1, 0, 0, 20)?;
        let mut held_stream = session.connection.open_uni().await?;
        held_stream.write_all(&held[..held.len() / 2]).await?;
        // ... while partition 1's goes whole on another: it is acknowledged all the same.
        let mut flowing = session.connection.open_uni().await?;
        flowing.write_all(&batch(2, 1, 0, 20)?).await?;
        let first = answer(&mut session, &mut buf).await?;
        ensure!(
            matches!(first, Frame::Ack(ref ack) if ack.seq == 2 && ack.next_offset == 20),
            "expected partition 1's batch acknowledged past the stalled stream, got {first:?}"
        );

        // The rest of the held batch arrives, and it is acknowledged in turn.
        held_stream.write_all(&held[held.len() / 2..]).await?;
        let second = answer(&mut session, &mut buf).await?;
        ensure!(
            matches!(second, Frame::Ack(ref ack) if ack.seq == 1 && ack.next_offset == 20),
            "expected the held batch acknowledged once complete, got {second:?}"
        );

        // A partition stays on the stream it started on: two streams could hand its records
        // to the hub out of order.
        held_stream.write_all(&batch(3, 1, 20, 10)?).await?;
        let (code, reason) = session.closed_by_relay(Duration::from_secs(30)).await?;
        ensure!(
            code == u64::from(CLOSE_PROTOCOL_ERROR) && reason.contains("already sent on stream"),
            "a partition moved to another stream: closed with {code} ({reason})"
        );
        anyhow::Ok(())
    })?;
    let held = env.hub_held(&format!("{PEER}.{TOPIC}"), 2)?;
    ensure!(
        held == 40,
        "the hub holds {held} records, expected the 40 acknowledged"
    );
    ensure!(relay.is_running(), "the relay exited");
    relay.stop()?;
    Ok(())
}

#[test]
fn an_agent_ships_on_data_streams_or_on_the_control_stream_as_the_relay_allows(
) -> anyhow::Result<()> {
    const PARTITIONS: i32 = 3;
    const PER_PARTITION: usize = 200;
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), TOPIC, PARTITIONS)?;
    let producer = kafka::producer(&env.edge.bootstrap())?;
    let produce = |round: usize| -> anyhow::Result<()> {
        for partition in 0..PARTITIONS {
            let records: Vec<Rec> = (0..PER_PARTITION)
                .map(|i| Rec {
                    key: None,
                    value: Some(format!("round {round} partition {partition} record {i}").into()),
                    headers: Vec::new(),
                    timestamp: None,
                })
                .collect();
            kafka::produce(&producer, TOPIC, partition, &records)?;
        }
        Ok(())
    };
    let replicated = |rounds: usize| {
        let expected = (rounds * PER_PARTITION) as i64 * i64::from(PARTITIONS);
        eventually(
            &format!("{expected} records in the hub"),
            Duration::from_secs(120),
            || {
                let n = env.hub_count(TOPIC, PARTITIONS)?;
                ensure!(
                    n <= expected,
                    "hub holds {n}, more than {expected} produced"
                );
                Ok(n == expected)
            },
        )
    };

    // A relay that allows the control stream only.
    let only_control = RelayOptions {
        extra: "[limits]\nmax_streams_per_connection = 1\n".into(),
        ..RelayOptions::default()
    };
    let mut relay = env.start_relay_with(&[TOPIC], &only_control)?;
    let mut agent = env.start_agent(&AgentOptions::include(&[TOPIC]))?;
    produce(0)?;
    replicated(1)?;
    let log = agent.log();
    ensure!(
        log.contains("data_streams=0") && log.contains("the relay allows fewer data streams"),
        "the agent did not fall back to the control stream:\n{log}"
    );

    // The same agent, once the relay allows the default: four data streams.
    relay.stop()?;
    let mut relay = env.start_relay(&[TOPIC])?;
    eventually("the agent on data streams", Duration::from_secs(60), || {
        Ok(agent.log().contains("data_streams=4"))
    })?;
    produce(1)?;
    replicated(2)?;
    env.assert_all_replicated(TOPIC, PARTITIONS)?;
    agent.stop()?;
    relay.stop()?;
    Ok(())
}

/// Records that zstd cannot shrink, `per_partition` in each of `partitions`.
fn produce_random(edge: &str, partitions: i32, per_partition: usize) -> anyhow::Result<()> {
    let random = Mix {
        kind: Kind::Random,
        size: 1024,
        edge_zstd: false,
    };
    let producer = kafka::producer(edge)?;
    for partition in 0..partitions {
        let first = partition as usize * per_partition;
        let records: Vec<Rec> = (first..first + per_partition)
            .map(|i| random.record(i))
            .collect();
        kafka::produce(&producer, TOPIC, partition, &records)?;
    }
    Ok(())
}

/// Ships what [`produce_random`] wrote through a relay whose `limits.read_timeout` is 12 s (the
/// agent heartbeats every 5 s; the margin is for a loaded test machine, where the emulated
/// link also drops and delays more), and fails if the relay dropped the session for silence
/// or the hub does not reach the count produced.
fn ships_in_one_session(
    env: &Env,
    partitions: i32,
    per_partition: usize,
    agent_ship: &str,
) -> anyhow::Result<()> {
    let relay_options = RelayOptions {
        extra: "[limits]\nread_timeout = \"12s\"\n".into(),
        ..RelayOptions::default()
    };
    let mut relay = env.start_relay_with(&[TOPIC], &relay_options)?;
    let mut options = AgentOptions::include(&[TOPIC]);
    options.extra = format!("[ship]\n{agent_ship}");
    let mut agent = env.start_agent(&options)?;
    let expected = per_partition as i64 * i64::from(partitions);
    let hub_count = || env.on_hub(|| env.hub_count(TOPIC, partitions));
    eventually(
        &format!("{expected} records in the hub"),
        Duration::from_secs(120),
        || Ok(hub_count()? == expected),
    )?;
    let relay_admin = env.relay_admin();
    let metrics = env.on_hub(|| spoke_tests::admin::scrape(&relay_admin))?;
    let timeouts = spoke_tests::admin::sum(
        &metrics,
        "spoke_relay_rejected_total",
        &["reason=\"timeout\""],
    );
    let log = agent.log();
    ensure!(
        timeouts == 0.0 && !log.contains("relay session ended"),
        "the relay dropped the agent's session {timeouts} time(s) for silence:\n{log}"
    );
    agent.stop()?;
    relay.stop()?;
    Ok(())
}

/// A backlog that takes longer to send than the relay's read timeout ships in one session.
/// Over a slow link the agent's next frame waits for the link, and the control stream must
/// keep its heartbeat meanwhile: the relay drops a session whose control stream is silent for
/// `limits.read_timeout`, and the link then carries the batches it was in the middle of again
/// (a 2 Mbit/s benchmark row of 10 KiB random records lost 20% of its bytes so, and fell
/// below the direct mirror). Here the wait is the agent's bandwidth cap: 2.4 MB at 100 KiB/s,
/// 24 s.
#[test]
fn a_backlog_longer_than_the_read_timeout_ships_in_one_session() -> anyhow::Result<()> {
    let env = Env::new()?;
    kafka::create_topic(&env.edge.bootstrap(), TOPIC, 3)?;
    produce_random(&env.edge.bootstrap(), 3, 800)?;
    ships_in_one_session(
        &env,
        3,
        800,
        "max_bandwidth = \"100KiB\"\nbatch_max_bytes = \"256KiB\"\n",
    )?;
    env.assert_all_replicated(TOPIC, 3)?;
    Ok(())
}

/// As above, with the wait in the send window: one 7.4 MB frame (`batch_max_bytes` 8 MiB)
/// over an emulated 2 Mbit/s link, 29 s, nearly all of it spent waiting for the window to take
/// the frame's next bytes. Needs root and /dev/net/tun, as the WAN emulator does.
#[test]
fn a_backlog_longer_than_the_read_timeout_over_a_slow_link_ships_in_one_session(
) -> anyhow::Result<()> {
    // 50 ms of RTT, so that the one-BDP queue holds some packets (12.5 KB).
    let link = Link::start(LinkSpec::new(2_000_000, Duration::from_millis(25), 0.0))?;
    let env = Env::placed(Placement::across(&link))?;
    let edge = env.edge.bootstrap();
    env.on_edge(|| -> anyhow::Result<()> {
        kafka::create_topic(&edge, TOPIC, 1)?;
        produce_random(&edge, 1, 7000)
    })?;
    ships_in_one_session(&env, 1, 7000, "batch_max_bytes = \"8MiB\"\n")
}
