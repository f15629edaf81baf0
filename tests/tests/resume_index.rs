//! Resume scans of a hub partition shared by sites (`relay/src/resume/`) against a real
//! broker, through the relay's own hub client. (That the index is read back from the hub
//! before it is trusted is tested in memory, `resume::tests`: deleting a topic under a live
//! client crashes librdkafka 2.12.1 on tansu 0.6's answers, see `Broker::delete_topic_offline`.)

use spoke_relay::hub::Hub;
use spoke_tests::broker::Broker;
use spoke_tests::kafka::{self, Rec};

const TOPIC: &str = "orders";

/// `count` records of `site`'s source partition 0 from source offset `first` on, as the
/// relay writes them into an aggregated hub topic.
fn from_site(site: &str, first: i64, count: i64) -> Vec<Rec> {
    (first..first + count)
        .map(|offset| {
            let rec = Rec {
                key: Some(format!("{site}/{offset}").into_bytes()),
                value: Some(vec![b'v'; 100]),
                headers: Vec::new(),
                timestamp: None,
            };
            kafka::with_provenance(&rec, site, 0, offset)
        })
        .collect()
}

/// The relay's hub client, as `spoke-relay run` builds it from relay.toml.
fn relay_hub(dir: &std::path::Path, bootstrap: &str) -> anyhow::Result<std::sync::Arc<Hub>> {
    let path = dir.join("relay.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:7000\"\n[tls]\ncert = \"/r.pem\"\nkey = \"/r.key\"\n\
             client_ca = \"/ca.pem\"\n[hub]\nbootstrap = \"{bootstrap}\"\ntopic = \"{{topic}}\"\n\
             [sites.\"*\"]\nallow = [\"{TOPIC}\"]\n"
        ),
    )?;
    let loaded = spoke_relay::config::load(&path)?;
    Ok(Hub::new(&loaded.config.hub, &loaded.hub_kafka)?)
}

/// A site's resume point in the one-partition aggregated topic, without a checkpoint, and
/// the hub records read to find it.
fn resume(runtime: &tokio::runtime::Runtime, hub: &Hub, site: &str) -> anyhow::Result<(i64, u64)> {
    let resume = runtime.block_on(hub.resume_point(site, TOPIC, 0, None, 1))?;
    Ok((resume.next_offset, resume.scanned))
}

/// Site b's six records sit below 1,000 of site a's. A scan for site c (nothing there) reads
/// the partition's tail and indexes the rest; b's scan is then answered by the index and the
/// one record it names, read back. Then the hub restarts while the relay's scan consumers sit
/// idle in their pool: they report that all brokers went down, which describes the past and
/// must not fail the next scan (it did: every session whose scan got such a consumer failed).
#[test]
fn sites_in_a_shared_hub_partition_are_answered_by_its_index_across_a_hub_restart(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start(dir.path(), "hub")?;
    kafka::create_topic(&broker.bootstrap(), TOPIC, 1)?;
    let producer = kafka::producer(&broker.bootstrap())?;
    kafka::produce(&producer, TOPIC, 0, &from_site("b", 0, 6))?;
    kafka::produce(&producer, TOPIC, 0, &from_site("a", 0, 1_000))?;
    drop(producer);

    // The relay's hub client lives in a runtime of its own: the harness's Kafka helpers
    // block on theirs.
    let runtime = tokio::runtime::Runtime::new()?;
    let hub = runtime.block_on(async { relay_hub(dir.path(), &broker.bootstrap()) })?;
    let (next, scanned) = resume(&runtime, &hub, "c")?;
    assert_eq!(next, 0, "c has nothing there");
    assert!(
        scanned <= 256 + 1_006,
        "c's scan reads the tail and then the partition once: {scanned} records read"
    );
    let (next, scanned) = resume(&runtime, &hub, "b")?;
    assert_eq!(next, 6, "b resumes after its sixth record");
    assert!(
        scanned <= 1,
        "b's scan is answered by the index (and its record read back), not by reading the \
         partition again: {scanned} records read"
    );

    broker.stop()?;
    broker.restart()?;
    let (next, _) = resume(&runtime, &hub, "b")?;
    assert_eq!(next, 6, "b after the hub's restart");
    let (next, _) = resume(&runtime, &hub, "a")?;
    assert_eq!(next, 1_000, "a after the hub's restart");
    Ok(())
}
