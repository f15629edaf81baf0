//! Attacks on a real relay while a real site keeps flowing (issue #3 acceptance): refused
//! certificates and the per-site connection cap, hostile frames from an authenticated peer, a
//! Hello asking for a million resume points, data pushed into streams the relay never reads,
//! a flood of 200 bogus clients, and a certificate rotation by SIGHUP. After every attack the
//! honest site's records must be in the hub complete and exact (edge and hub compared record
//! by record), its session must never have been re-established, and the relay must be
//! running, healthy and free of panics.
//!
//! The relay runs with its default limits except `limits.read_timeout` (8 s, to keep the
//! stalled-frame case short): the defaults are what must protect a real install.
//!
//! Every scenario prints a `scenario=<name> ...` summary line.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use spoke_proto::Frame;
use spoke_tests::flood::{self, Flood};
use spoke_tests::hostile::{self, Session, CLOSE_NOT_AUTHORIZED, CLOSE_PROTOCOL_ERROR};
use spoke_tests::load::SteadyLoad;
use spoke_tests::pki::{self, Authority, Identity, Validity};
use spoke_tests::process::Spoke;
use spoke_tests::site::{AgentOptions, Env, RelayOptions, SITE};
use spoke_tests::{admin, case, eventually, kafka};

const TOPIC: &str = "orders";
const PARTITIONS: i32 = 3;
/// A site the relay knows, with a valid certificate, that turns hostile.
const MALLORY: &str = "mallory";

/// Relay config shared by the scenarios: the hostile site is configured (so its frames get
/// past authentication and reach the decoder), and the stalled-read timeout is short enough
/// for a test but longer than the agent's 5 s heartbeat, so the honest site never trips it.
fn relay_options(tls_extra: &str) -> RelayOptions {
    let mut extra = String::new();
    let flood_sites = (0..FLOOD_SITES).map(flood_site);
    for site in [MALLORY.to_owned(), "newcomer".to_owned()]
        .into_iter()
        .chain(flood_sites)
    {
        extra.push_str(&format!("[sites.{site}]\nallow = [\"{TOPIC}\"]\n"));
    }
    extra.push_str("[limits]\nread_timeout = \"8s\"\n");
    RelayOptions {
        tls_extra: tls_extra.to_owned(),
        extra,
        ..RelayOptions::default()
    }
}

/// Sites whose valid certificates the flood's idle clients and stallers use: with the
/// default of 4 connections per site, up to 4 × this many can be held open at once.
const FLOOD_SITES: usize = 20;

fn flood_site(i: usize) -> String {
    format!("flood-{i}")
}

/// The honest site flowing through a relay that a test is about to attack.
struct Scene {
    relay: Spoke,
    agent: Spoke,
    load: SteadyLoad,
    runtime: tokio::runtime::Runtime,
    // Last: the processes above print their logs from it when dropped.
    env: Env,
}

impl Scene {
    fn start(env: Env, tls_extra: &str, rate: usize) -> anyhow::Result<Scene> {
        kafka::create_topic(&env.edge.bootstrap(), TOPIC, PARTITIONS)?;
        let relay = env.start_relay_with(&[TOPIC], &relay_options(tls_extra))?;
        let agent = env.start_agent(&AgentOptions::include(&[TOPIC]))?;
        let load = SteadyLoad::start(env.edge.bootstrap(), TOPIC, PARTITIONS, rate);
        // One worker: hostile connections held across blocking test code keep being driven.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let scene = Scene {
            env,
            relay,
            agent,
            load,
            runtime,
        };
        eventually(
            "the honest site's first records in the hub",
            Duration::from_secs(120),
            || Ok(scene.hub_count()? > 0),
        )?;
        Ok(scene)
    }

    fn relay_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.env.relay_port))
    }

    fn ca_pem(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.env.pki().join("ca.pem"))?)
    }

    fn real_ca(&self) -> anyhow::Result<Authority> {
        Authority::load(
            &self.env.pki().join("ca.pem"),
            &self.env.pki().join("ca.key"),
        )
    }

    fn hub_count(&self) -> anyhow::Result<i64> {
        self.env.hub_count(TOPIC, PARTITIONS)
    }

    fn rejected(&self, reason: &str) -> anyhow::Result<f64> {
        let series = admin::scrape(&self.env.relay_admin())?;
        let label = format!("reason=\"{reason}\"");
        ensure!(
            series
                .keys()
                .any(|k| k.starts_with("spoke_relay_rejected_total{") && k.contains(&label)),
            "no spoke_relay_rejected_total series with {label}"
        );
        Ok(admin::sum(
            &series,
            "spoke_relay_rejected_total",
            &[label.as_str()],
        ))
    }

    /// Waits until `reason` counted exactly `expected`: no refusal missed, none counted twice.
    fn expect_rejected(&self, what: &str, reason: &str, expected: f64) -> anyhow::Result<()> {
        let mut last = f64::NAN;
        eventually(
            &format!("{what}: spoke_relay_rejected_total{{reason=\"{reason}\"}} = {expected}"),
            Duration::from_secs(20),
            || {
                last = self.rejected(reason)?;
                ensure!(
                    last <= expected,
                    "{what}: counted {last}, more than the {expected} expected"
                );
                Ok(last == expected)
            },
        )
        .with_context(|| format!("last value {last}"))
    }

    fn assert_relay_alive(&mut self, after: &str) -> anyhow::Result<()> {
        relay_alive(&mut self.relay, &self.env, after)
    }

    /// Stops the honest load, waits for the hub to hold it all and compares every partition
    /// record by record; returns how many records the honest site produced.
    fn finish(self, scenario: &str) -> anyhow::Result<usize> {
        let Scene {
            env,
            mut relay,
            mut agent,
            load,
            runtime,
        } = self;
        drop(runtime);
        let produced = load.finish()?;
        let wait = eventually(
            &format!("{produced} honest records in the hub"),
            Duration::from_secs(300),
            || {
                let n = env.hub_count(TOPIC, PARTITIONS)?;
                ensure!(n <= produced as i64, "hub holds {n} > {produced} produced");
                Ok(n == produced as i64)
            },
        );
        relay_alive(&mut relay, &env, scenario)?;
        ensure!(agent.is_running(), "the honest agent exited");
        wait?;
        let mut compared = 0;
        for p in 0..PARTITIONS {
            compared += kafka::assert_replicated(
                &env.edge.bootstrap(),
                &env.hub.bootstrap(),
                SITE,
                TOPIC,
                p,
            )?;
        }
        ensure!(compared == produced, "compared {compared} of {produced}");
        agent.stop()?;
        relay.stop()?;
        Ok(produced)
    }
}

/// The relay survived: still running, healthy, and no panic in its log.
fn relay_alive(relay: &mut Spoke, env: &Env, after: &str) -> anyhow::Result<()> {
    ensure!(relay.is_running(), "relay exited after {after}");
    let (code, _) = admin::get(&env.relay_admin(), "/healthz")?;
    ensure!(code == 200, "relay /healthz answered {code} after {after}");
    ensure!(
        !relay.log().contains("panicked"),
        "relay panicked after {after}"
    );
    Ok(())
}

/// How often the honest site's session was (re)established on this relay.
fn honest_sessions(relay: &Spoke) -> usize {
    let quoted = format!("site=\"{SITE}\"");
    let bare = format!("site={SITE} ");
    relay
        .log()
        .lines()
        .filter(|l| l.contains("site connected") && (l.contains(&quoted) || l.contains(&bare)))
        .count()
}

/// The certificates the relay must refuse, each for its own reason, and the deny list that
/// refuses three of them.
struct Refusable {
    foreign: Identity,
    impostor: Identity,
    expired: Identity,
    denied_by_hash: Identity,
    denied_by_serial: Identity,
    denied_as_printed: Identity,
    /// The site `denied_as_printed` was issued for.
    printed_site: String,
    /// Mallory's valid certificate, for a Hello claiming another site.
    mallory: Identity,
    /// The `deny = [...]` line of the relay's `[tls]`.
    deny: String,
}

/// One refused client: what it tries, the certificate it shows, the site its Hello claims and
/// the `spoke_relay_rejected_total` reason it must be counted under.
struct Refusal<'a> {
    what: &'static str,
    identity: Option<&'a Identity>,
    hello_site: &'a str,
    reason: &'static str,
}

const DENIED_SERIAL: u64 = 0x05_0c_e5_ba_d0;

impl Refusable {
    fn issue(env: &Env) -> anyhow::Result<Refusable> {
        let real_ca = Authority::load(&env.pki().join("ca.pem"), &env.pki().join("ca.key"))?;
        let foreign_ca = Authority::new("another CA")?;
        let foreign = foreign_ca.issue_site(SITE, Validity::current(), 6)?;
        // Same CA name and site as the real ones, as `pki init` elsewhere would make them:
        // only the signature tells them apart.
        let impostor = Authority::new("spoke CA")?.issue_site(SITE, Validity::current(), 7)?;
        let expired = real_ca.issue_site(SITE, Validity::expired(), 8)?;
        let denied_by_hash = real_ca.issue_site(MALLORY, Validity::current(), 9)?;
        let denied_by_serial = real_ca.issue_site(MALLORY, Validity::current(), DENIED_SERIAL)?;
        let (mallory_pem, mallory_key) = env.issue_cert(MALLORY)?;
        let mallory = Identity::load(&mallory_pem, &mallory_key)?;
        // Upper case and colons: the relay ignores both (NOTES: "hex, case and ':' ignored").
        let hash = denied_by_hash.sha256_hex()?.to_uppercase();
        let hash_with_colons: Vec<String> = hash
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        let printed_site = flood_site(1);
        let (denied_as_printed, printed_entry) =
            case("pki issue prints the deny-list entry", || {
                issued_with_printed_deny_entry(env, &printed_site)
            })?;
        let deny = format!(
            "deny = [\"sha256:{}\", \"serial:{DENIED_SERIAL:x}\", \"{printed_entry}\"]",
            hash_with_colons.join(":")
        );
        Ok(Refusable {
            foreign,
            impostor,
            expired,
            denied_by_hash,
            denied_by_serial,
            denied_as_printed,
            printed_site,
            mallory,
            deny,
        })
    }

    fn refusals(&self) -> [Refusal<'_>; 8] {
        let refusal = |what, identity, hello_site, reason| Refusal {
            what,
            identity,
            hello_site,
            reason,
        };
        [
            refusal("no client certificate", None, SITE, "no_cert"),
            refusal(
                "certificate from another CA",
                Some(&self.foreign),
                SITE,
                "unknown_ca",
            ),
            refusal("expired certificate", Some(&self.expired), SITE, "expired"),
            refusal(
                "certificate denied by SHA-256",
                Some(&self.denied_by_hash),
                MALLORY,
                "denied",
            ),
            refusal(
                "certificate denied by serial",
                Some(&self.denied_by_serial),
                MALLORY,
                "denied",
            ),
            refusal(
                "certificate denied by the line pki issue printed",
                Some(&self.denied_as_printed),
                &self.printed_site,
                "denied",
            ),
            refusal(
                "Hello claiming another site",
                Some(&self.mallory),
                SITE,
                "site_mismatch",
            ),
            refusal(
                "certificate from another CA of the same name",
                Some(&self.impostor),
                SITE,
                "unknown_ca",
            ),
        ]
    }
}

/// The operator's way to deny a certificate: `pki issue` prints the deny-list entries of what
/// it issued. Returns the certificate issued for `site` and the `sha256:` line printed.
fn issued_with_printed_deny_entry(env: &Env, site: &str) -> anyhow::Result<(Identity, String)> {
    let (printed_pem, printed_key, printed) = env.issue_cert_printing(site)?;
    let issued = Identity::load(&printed_pem, &printed_key)?;
    let printed_entry = printed
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("sha256:"))
        .with_context(|| format!("pki issue printed no sha256: line:\n{printed}"))?;
    ensure!(
        printed_entry == format!("sha256:{}", issued.sha256_hex()?),
        "pki issue printed {printed_entry}, not the certificate's SHA-256"
    );
    Ok((issued, printed_entry.to_owned()))
}

#[test]
fn tls_refusals_are_counted_by_reason_while_the_honest_site_flows() -> anyhow::Result<()> {
    let env = Env::new()?;
    let refusable = Refusable::issue(&env)?;
    let mut scene = Scene::start(env, &refusable.deny, 1000)?;
    let endpoint = scene.runtime.block_on(async { hostile::endpoint() })?;
    let refusals = refusable.refusals();
    for refusal in &refusals {
        case(refusal.what, || {
            case_refused(&mut scene, &endpoint, refusal)
        })?;
    }
    // The same site certificate with an honest Hello gets in, and 0-RTT stays off for it.
    let config = hostile::client_config(&scene.ca_pem()?, Some(&refusable.mallory), None)?;
    case("an honest Hello with a certificate refused above", || {
        case_honest_hello_gets_in(&scene, &endpoint, &config)
    })?;
    case("0-RTT", || {
        case_zero_rtt_is_refused(&scene, &endpoint, &config)
    })?;
    case("the per-site connection cap", || {
        case_per_site_connection_cap(&scene, &endpoint)
    })?;

    ensure!(
        honest_sessions(&scene.relay) == 1,
        "the honest site's session was interrupted"
    );
    let produced = scene.finish("tls-refusals")?;
    println!(
        "scenario=tls-refusals cases={} honest_records={produced} lost=0 dup=0",
        refusals.len()
    );
    Ok(())
}

/// The client is refused, counted once under its reason, and the relay lives on.
fn case_refused(
    scene: &mut Scene,
    endpoint: &quinn::Endpoint,
    refusal: &Refusal,
) -> anyhow::Result<()> {
    let what = refusal.what;
    let before = scene.rejected(refusal.reason)?;
    let config = hostile::client_config(&scene.ca_pem()?, refusal.identity, None)?;
    let closed = scene
        .runtime
        .block_on(hostile::expect_refused(
            endpoint,
            &config,
            scene.relay_addr(),
            refusal.hello_site,
            Duration::from_secs(20),
        ))
        .with_context(|| format!("{what}: not refused"))?;
    println!("refused: {what}: {closed}");
    if refusal.reason == "site_mismatch" {
        match &closed {
            quinn::ConnectionError::ApplicationClosed(close)
                if close.error_code == quinn::VarInt::from_u32(CLOSE_NOT_AUTHORIZED) => {}
            other => bail!("{what}: expected a NOT_AUTHORIZED close, got {other}"),
        }
    }
    scene.expect_rejected(what, refusal.reason, before + 1.0)?;
    scene.assert_relay_alive(what)
}

/// Mallory's certificate with an honest Hello is served: the refusals were about the property
/// each case broke, not about this client.
fn case_honest_hello_gets_in(
    scene: &Scene,
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
) -> anyhow::Result<()> {
    let session = scene
        .runtime
        .block_on(Session::open(endpoint, config, scene.relay_addr(), MALLORY))
        .context("a valid certificate with an honest Hello was refused")?;
    session.connection.close(0u32.into(), b"done");
    Ok(())
}

/// 0-RTT stays off: early data could carry a replayed frame before the handshake is done.
fn case_zero_rtt_is_refused(
    scene: &Scene,
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
) -> anyhow::Result<()> {
    ensure!(
        !scene.runtime.block_on(hostile::zero_rtt_accepted(
            endpoint,
            config,
            scene.relay_addr(),
            MALLORY
        ))?,
        "the relay accepted 0-RTT data"
    );
    Ok(())
}

/// The per-site connection cap (default 4): a fifth connection carrying one site's
/// certificate is closed and counted; a freed slot can be used again.
fn case_per_site_connection_cap(scene: &Scene, endpoint: &quinn::Endpoint) -> anyhow::Result<()> {
    let relay = scene.relay_addr();
    let site = flood_site(0);
    let (capped_pem, capped_key) = scene.env.issue_cert(&site)?;
    let capped = Identity::load(&capped_pem, &capped_key)?;
    let config = hostile::client_config(
        &scene.ca_pem()?,
        Some(&capped),
        Some(Duration::from_secs(1)),
    )?;
    let before = scene.rejected("too_many_site_connections")?;
    let (mut held, fifth) = scene.runtime.block_on(async {
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(
                hostile::connect(endpoint, &config, relay)
                    .await?
                    .context("one of the first 4 connections of a site was refused")?,
            );
        }
        let fifth = match hostile::connect(endpoint, &config, relay).await? {
            Err(refused) => refused,
            Ok(connection) => tokio::time::timeout(Duration::from_secs(10), connection.closed())
                .await
                .context("a fifth connection of one site stayed open")?,
        };
        anyhow::Ok((held, fifth))
    })?;
    println!("refused: fifth connection of one site: {fifth}");
    scene.expect_rejected(
        "fifth connection of one site",
        "too_many_site_connections",
        before + 1.0,
    )?;
    ensure!(
        held.iter().all(|c| c.close_reason().is_none()),
        "refusing the fifth connection closed one of the first four"
    );
    if let Some(first) = held.pop() {
        first.close(0u32.into(), b"making room");
    }
    scene.runtime.block_on(async {
        // The relay learns of the close from a packet in flight: retry briefly.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match Session::open(endpoint, &config, relay, &site).await {
                Ok(session) => {
                    session.connection.close(0u32.into(), b"done");
                    return anyhow::Ok(());
                }
                Err(error) if attempts >= 5 => {
                    return Err(error.context("a freed connection slot could not be used"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    })?;
    drop(held);
    Ok(())
}

/// One hostile frame (or part of one) sent by an authenticated peer after its Welcome.
struct FrameAttack {
    name: &'static str,
    bytes: Vec<u8>,
    /// Finish the stream after the bytes (else leave the relay waiting for more).
    finish: bool,
    /// Send the bytes instead of the `Hello` (else after the `Welcome`).
    before_hello: bool,
    /// The `spoke_relay_rejected_total` reason it must be counted under.
    reason: &'static str,
    /// A fragment of the typed error the relay closes with, proving the attack was stopped
    /// by the defence meant for it and not by some earlier check.
    error: &'static str,
}

impl FrameAttack {
    /// Sent after the `Welcome`, left unfinished, counted under `protocol`.
    fn new(name: &'static str, bytes: Vec<u8>, error: &'static str) -> FrameAttack {
        FrameAttack {
            name,
            bytes,
            finish: false,
            before_hello: false,
            reason: "protocol",
            error,
        }
    }
}

/// Every attack `hostile_frames_...` sends, in order.
fn frame_attacks() -> anyhow::Result<Vec<FrameAttack>> {
    let mut attacks = header_attacks()?;
    attacks.extend(truncation_attacks()?);
    attacks.extend(batch_attacks()?);
    attacks.extend(hello_attacks()?);
    Ok(attacks)
}

/// Frames whose 12-byte header lies: length, checksum, version, type.
fn header_attacks() -> anyhow::Result<Vec<FrameAttack>> {
    let batch = hostile::encode(&hostile::valid_batch(1, TOPIC, 100, 50)?)?;
    let heartbeat = hostile::encode(&hostile::heartbeat())?;
    Ok(vec![
        // Only the 12-byte header: a 4 GiB body must be refused before it is awaited.
        FrameAttack::new(
            "oversize length",
            hostile::with_length(heartbeat.clone(), 0xffff_fff0)[..spoke_proto::HEADER_LEN]
                .to_vec(),
            "frame body of 4294967280 bytes exceeds the limit",
        ),
        FrameAttack::new(
            "bad checksum",
            hostile::with_corrupt_body(batch),
            "checksum mismatch",
        ),
        FrameAttack::new(
            "unknown version",
            hostile::with_byte(heartbeat.clone(), hostile::header::VERSION, 99),
            "unsupported protocol version 99",
        ),
        FrameAttack::new(
            "unknown frame type",
            hostile::with_byte(heartbeat, hostile::header::TYPE, 66),
            "unknown frame type 66",
        ),
    ])
}

/// Half a frame, then the stream's end or silence.
fn truncation_attacks() -> anyhow::Result<Vec<FrameAttack>> {
    let batch = hostile::encode(&hostile::valid_batch(1, TOPIC, 100, 50)?)?;
    let half_batch = batch[..batch.len() / 2].to_vec();
    Ok(vec![
        FrameAttack {
            finish: true,
            ..FrameAttack::new(
                "truncated frame, stream finished",
                half_batch.clone(),
                "finished early",
            )
        },
        FrameAttack {
            reason: "timeout",
            ..FrameAttack::new(
                "truncated frame, then stalled",
                half_batch,
                "sent nothing for",
            )
        },
    ])
}

/// Batches that decode as frames but lie about their records or ask for too much.
fn batch_attacks() -> anyhow::Result<Vec<FrameAttack>> {
    let valid = || match hostile::valid_batch(1, TOPIC, 100, 50)? {
        Frame::Batch(batch) => Ok(batch),
        other => bail!("valid_batch made a {}", other.name()),
    };
    let mut inverted = valid()?;
    std::mem::swap(&mut inverted.first_offset, &mut inverted.last_offset);
    // The relay creates missing hub topics with the declared partition count.
    let mut wide = valid()?;
    wide.partition_count = 1_000_000;
    Ok(vec![
        // The payload inflates to 512 MiB; the relay must stop one byte past the declared
        // 1 MiB instead of trusting the payload.
        FrameAttack::new(
            "zstd bomb (512 MiB of zeros declared as 1 MiB)",
            hostile::encode(&hostile::zstd_bomb(1, TOPIC, 512 << 20)?)?,
            "declared 1048576 uncompressed bytes but holds 1048577",
        ),
        FrameAttack::new(
            "repeated offset in a batch",
            hostile::encode(&hostile::section_batch(1, TOPIC, &[10, 11, 11, 12])?)?,
            "offsets must strictly increase: 11 follows 11",
        ),
        FrameAttack::new(
            "offset going backwards in a batch",
            hostile::encode(&hostile::section_batch(1, TOPIC, &[10, 12, 11])?)?,
            "record offset overflows",
        ),
        FrameAttack::new(
            "batch with first offset after last",
            hostile::encode(&Frame::Batch(inverted))?,
            "first_offset is after last_offset",
        ),
        FrameAttack::new(
            "batch declaring a million partitions",
            hostile::encode(&Frame::Batch(wide))?,
            "partition count 1000000 above limits.max_partitions_per_topic",
        ),
        FrameAttack::new(
            "record with 2000 headers",
            hostile::encode(&hostile::headers_batch(1, TOPIC, 2000, 1)?)?,
            "record with 2000 headers exceeds the limit",
        ),
        FrameAttack::new(
            "record with 1.4 MiB of headers",
            hostile::encode(&hostile::headers_batch(1, TOPIC, 2, 700 << 10)?)?,
            "record headers of",
        ),
        FrameAttack::new(
            "batch declaring a 4 GiB record section",
            hostile::encode(&hostile::overclaiming_batch(1, TOPIC, u32::MAX, 1)?)?,
            "uncompressed batch of 4294967295 bytes exceeds the limit",
        ),
        FrameAttack::new(
            "batch declaring 4 billion records",
            hostile::encode(&hostile::overclaiming_batch(1, TOPIC, 64, u32::MAX)?)?,
            "batch of 4294967295 records exceeds the limit",
        ),
    ])
}

/// The handshake out of order: a second `Hello`, something else first, no common version.
fn hello_attacks() -> anyhow::Result<Vec<FrameAttack>> {
    let batch = hostile::encode(&hostile::valid_batch(1, TOPIC, 100, 50)?)?;
    let before_hello = |attack: FrameAttack| FrameAttack {
        before_hello: true,
        ..attack
    };
    Ok(vec![
        FrameAttack::new(
            "second Hello",
            hostile::encode(&hostile::hello(MALLORY))?,
            "got Hello",
        ),
        before_hello(FrameAttack::new(
            "Batch instead of Hello",
            batch,
            "expected Hello, got Batch",
        )),
        before_hello(FrameAttack::new(
            "Hello offering only future versions",
            hostile::encode(&hostile::future_hello(MALLORY))?,
            "no common protocol version",
        )),
        before_hello(FrameAttack::new(
            "garbage instead of Hello",
            b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n".to_vec(),
            "bad frame magic",
        )),
    ])
}

/// Mallory's client side: its valid certificate, keep-alives (a connection must end by the
/// relay's decision, not by QUIC idling) and an endpoint.
struct Mallory {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    relay: SocketAddr,
}

impl Mallory {
    fn new(scene: &Scene, identity: &Identity) -> anyhow::Result<Mallory> {
        let config = hostile::client_config(
            &scene.ca_pem()?,
            Some(identity),
            Some(Duration::from_secs(1)),
        )?;
        let endpoint = scene.runtime.block_on(async { hostile::endpoint() })?;
        Ok(Mallory {
            endpoint,
            config,
            relay: scene.relay_addr(),
        })
    }

    async fn open(&self) -> anyhow::Result<Session> {
        Session::open(&self.endpoint, &self.config, self.relay, MALLORY).await
    }
}

#[test]
fn hostile_frames_close_only_their_connection_and_the_honest_site_loses_nothing(
) -> anyhow::Result<()> {
    let env = Env::new()?;
    let (mallory_pem, mallory_key) = env.issue_cert(MALLORY)?;
    let identity = Identity::load(&mallory_pem, &mallory_key)?;
    let mut scene = Scene::start(env, "", 1000)?;
    let mallory = Mallory::new(&scene, &identity)?;
    // Control: the same peer with a valid batch is served (the relay acks it), so each
    // refusal below is caused by the one thing that attack broke.
    case("a valid batch from the same peer", || {
        case_valid_batch_is_acked(&scene, &mallory)
    })?;
    let attacks = frame_attacks()?;
    let mut summary = Vec::new();
    for attack in &attacks {
        summary.push(case(attack.name, || {
            case_frame_attack(&mut scene, &mallory, attack)
        })?);
    }
    // Measured before the 10 MB heartbeat below, which the relay must buffer whole.
    let (rss, hwm) = case("the relay's memory after the attacks", || {
        case_memory_after_attacks(&scene)
    })?;
    for line in &summary {
        println!("{line}");
    }
    case("an extreme heartbeat", || {
        case_extreme_heartbeat_is_survived(&mut scene, &mallory)
    })?;
    ensure!(
        honest_sessions(&scene.relay) == 1,
        "the honest site's session was interrupted"
    );
    let produced = scene.finish("hostile-frames")?;
    println!(
        "scenario=hostile-frames attacks={} honest_records={produced} lost=0 dup=0 relay_rss_mib={} relay_hwm_mib={}",
        summary.len(),
        rss / 1024,
        hwm / 1024
    );
    Ok(())
}

fn case_valid_batch_is_acked(scene: &Scene, mallory: &Mallory) -> anyhow::Result<()> {
    let ack = scene.runtime.block_on(async {
        let mut session = mallory.open().await?;
        session
            .send
            .write_all(&hostile::encode(&hostile::valid_batch(1, TOPIC, 0, 20)?)?)
            .await?;
        let mut buf = Vec::new();
        let answer = tokio::time::timeout(
            Duration::from_secs(60),
            hostile::read_frame(&mut session.recv, &mut buf),
        )
        .await
        .context("no answer to a valid batch")??;
        session.connection.close(0u32.into(), b"done");
        anyhow::Ok(answer)
    })?;
    ensure!(
        matches!(ack, Some(Frame::Ack(ref a)) if a.seq == 1 && a.next_offset == 20),
        "valid batch answered with {ack:?}"
    );
    Ok(())
}

/// The relay closes the attacker's connection with PROTOCOL_ERROR for the defence meant for
/// this attack, counts it once, and lives on; returns a line for the summary.
fn case_frame_attack(
    scene: &mut Scene,
    mallory: &Mallory,
    attack: &FrameAttack,
) -> anyhow::Result<String> {
    let before = scene.rejected(attack.reason)?;
    let started = Instant::now();
    let (code, error) = scene
        .runtime
        .block_on(async {
            let mut session = if attack.before_hello {
                Session::before_hello(&mallory.endpoint, &mallory.config, mallory.relay).await?
            } else {
                mallory.open().await?
            };
            session.send.write_all(&attack.bytes).await?;
            if attack.finish {
                session.send.finish()?;
            }
            // A stalled read is cut after limits.read_timeout (8 s here).
            session.closed_by_relay(Duration::from_secs(30)).await
        })
        .with_context(|| format!("{}: connection not closed by the relay", attack.name))?;
    ensure!(
        code == u64::from(CLOSE_PROTOCOL_ERROR),
        "{}: closed with code {code} ({error}), expected PROTOCOL_ERROR ({CLOSE_PROTOCOL_ERROR})",
        attack.name
    );
    ensure!(
        error.contains(attack.error),
        "{}: closed for {error:?}, expected an error containing {:?}",
        attack.name,
        attack.error
    );
    scene.expect_rejected(attack.name, attack.reason, before + 1.0)?;
    scene.assert_relay_alive(attack.name)?;
    Ok(format!(
        "{}: closed in {:.1}s: {error}",
        attack.name,
        started.elapsed().as_secs_f64()
    ))
}

/// The bomb inflates to 512 MiB: a relay that trusted it would have peaked far above the
/// bound. Returns the relay's (RSS, peak RSS) in KiB.
fn case_memory_after_attacks(scene: &Scene) -> anyhow::Result<(u64, u64)> {
    let (rss, hwm) = flood::rss_kib(scene.relay.pid().context("relay stopped")?)?;
    ensure!(
        hwm < 128 * 1024,
        "relay peak RSS {} MiB after the attacks",
        hwm / 1024
    );
    Ok((rss, hwm))
}

/// Hostile but well-formed: a heartbeat of 500 000 partitions, every figure u64::MAX. The
/// session must go on (a later valid batch is acked) and nothing may overflow.
fn case_extreme_heartbeat_is_survived(scene: &mut Scene, mallory: &Mallory) -> anyhow::Result<()> {
    let ack = scene.runtime.block_on(async {
        let mut session = mallory.open().await?;
        session
            .send
            .write_all(&hostile::encode(&hostile::extreme_heartbeat(500_000))?)
            .await?;
        session
            .send
            .write_all(&hostile::encode(&hostile::valid_batch(2, TOPIC, 20, 20)?)?)
            .await?;
        let mut buf = Vec::new();
        let answer = tokio::time::timeout(
            Duration::from_secs(60),
            hostile::read_frame(&mut session.recv, &mut buf),
        )
        .await
        .context("no answer to a valid batch after an extreme heartbeat")??;
        session.connection.close(0u32.into(), b"done");
        anyhow::Ok(answer)
    })?;
    ensure!(
        matches!(ack, Some(Frame::Ack(ref a)) if a.seq == 2 && a.next_offset == 40),
        "valid batch after an extreme heartbeat answered with {ack:?}"
    );
    scene.assert_relay_alive("an extreme heartbeat")
}

/// The flood's certificates: bad ones of every kind, valid ones of the configured flood sites,
/// and a legitimate newcomer's.
struct FloodIdentities {
    bad: Vec<Option<Identity>>,
    valid: Vec<(String, Identity)>,
    newcomer: Identity,
}

impl FloodIdentities {
    fn issue(env: &Env) -> anyhow::Result<FloodIdentities> {
        let real_ca = Authority::load(&env.pki().join("ca.pem"), &env.pki().join("ca.key"))?;
        let foreign_ca = Authority::new("another CA")?;
        let bad = vec![
            None,
            Some(foreign_ca.issue_site("flood", Validity::current(), 11)?),
            Some(real_ca.issue_site("flood", Validity::expired(), 12)?),
        ];
        let valid = (0..FLOOD_SITES)
            .map(|i| {
                let site = flood_site(i);
                let identity = real_ca.issue_site(&site, Validity::current(), 100 + i as u64)?;
                anyhow::Ok((site, identity))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let newcomer = real_ca.issue_site("newcomer", Validity::current(), 99)?;
        Ok(FloodIdentities {
            bad,
            valid,
            newcomer,
        })
    }
}

/// What the flood scenario measured.
struct FloodRun {
    /// The honest site's records per second arriving in the hub, before and during the flood.
    unattacked: f64,
    attacked: f64,
    /// The relay's largest RSS seen during the flood and its peak RSS after it, in KiB.
    peak_rss_kib: u64,
    hwm_kib: u64,
    report: flood::FloodReport,
    /// How long each of the newcomer's dials during the flood took to its Welcome.
    latencies: Vec<Duration>,
}

#[test]
fn flood_of_200_bogus_clients_keeps_the_honest_site_above_half_its_throughput() -> anyhow::Result<()>
{
    const RATE: usize = 2000;
    const RSS_CAP_MIB: u64 = 256;
    let env = Env::new()?;
    let identities = FloodIdentities::issue(&env)?;
    let mut scene = Scene::start(env, "", RATE)?;
    let run = flood_the_relay(&scene, identities)?;
    scene.assert_relay_alive("the flood")?;
    let refusals: Vec<String> = [
        "no_cert",
        "unknown_ca",
        "expired",
        "handshake",
        "too_many_site_connections",
        "too_many_handshakes",
        "too_many_connections",
        "timeout",
    ]
    .iter()
    .map(|r| Ok(format!("{r}={}", scene.rejected(r)?)))
    .collect::<anyhow::Result<_>>()?;
    let FloodRun {
        unattacked,
        attacked,
        peak_rss_kib,
        hwm_kib,
        report,
        latencies,
    } = run;
    println!("flood: {report:?}");
    println!("relay refusals: {}", refusals.join(" "));
    let ratio = attacked / unattacked;
    let slowest = latencies.iter().max().copied().unwrap_or_default();
    println!(
        "scenario=flood clients=200 attack_s={} offered={RATE}/s honest_unattacked={unattacked:.0}/s honest_attacked={attacked:.0}/s ratio={ratio:.2} relay_rss_mib={} relay_hwm_mib={} bad_handshakes={} valid_connections={} newcomer_dials={} newcomer_slowest_ms={}",
        FLOOD_ATTACK.as_secs(),
        peak_rss_kib / 1024,
        hwm_kib / 1024,
        report.bad_handshakes,
        report.valid_connections,
        latencies.len(),
        slowest.as_millis()
    );
    case("a legitimate site dials in during the flood", || {
        ensure!(
            latencies.len() >= 5,
            "only {} legitimate dials completed during the flood",
            latencies.len()
        );
        Ok(())
    })?;
    case("every bogus client is refused for what it is", || {
        case_bogus_clients_refused(&scene, &report)
    })?;
    case("the honest site keeps half its throughput", || {
        ensure!(
            unattacked > 0.0 && ratio >= 0.5,
            "honest throughput fell from {unattacked:.0}/s to {attacked:.0}/s under attack"
        );
        Ok(())
    })?;
    case("the relay's memory", || {
        ensure!(
            hwm_kib < RSS_CAP_MIB * 1024,
            "relay peak RSS {} MiB exceeds {RSS_CAP_MIB} MiB",
            hwm_kib / 1024
        );
        Ok(())
    })?;
    ensure!(
        honest_sessions(&scene.relay) == 1,
        "the honest site's session was interrupted by the flood"
    );
    scene.finish("flood")?;
    Ok(())
}

/// How long the flood lasts.
const FLOOD_ATTACK: Duration = Duration::from_secs(60);

/// Measures the honest site alone, then during a flood of 200 bogus clients while a
/// legitimate newcomer dials in every few seconds.
fn flood_the_relay(scene: &Scene, identities: FloodIdentities) -> anyhow::Result<FloodRun> {
    const UNATTACKED: Duration = Duration::from_secs(12);
    let relay_pid = scene.relay.pid().context("relay stopped")?;
    // Let the pipeline reach its steady state before measuring.
    std::thread::sleep(Duration::from_secs(3));
    let (unattacked, _) = honest_rate(scene, relay_pid, UNATTACKED)?;

    let attack = Flood {
        relay: scene.relay_addr(),
        ca_pem: scene.ca_pem()?,
        bad: identities.bad,
        valid: identities.valid,
        clients: 200,
        duration: FLOOD_ATTACK,
        endpoints: 4,
        handshake_pause: Duration::from_millis(100),
    }
    .start()?;
    // Meanwhile a legitimate site dials in every few seconds: the flood must not lock new
    // honest connections out (handshake slots, connection caps).
    let newcomer_config =
        hostile::client_config(&scene.ca_pem()?, Some(&identities.newcomer), None)?;
    let relay = scene.relay_addr();
    let probe = scene.runtime.spawn(async move {
        let endpoint = hostile::endpoint()?;
        let deadline = tokio::time::Instant::now() + FLOOD_ATTACK - Duration::from_secs(5);
        let mut latencies = Vec::new();
        while tokio::time::Instant::now() < deadline {
            let started = Instant::now();
            let session = tokio::time::timeout(
                Duration::from_secs(20),
                Session::open(&endpoint, &newcomer_config, relay, "newcomer"),
            )
            .await
            .context("a legitimate site got no Welcome within 20 s during the flood")??;
            latencies.push(started.elapsed());
            session.connection.close(0u32.into(), b"done");
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        anyhow::Ok(latencies)
    });
    let (attacked, peak_rss_kib) = honest_rate(scene, relay_pid, FLOOD_ATTACK)?;
    let report = attack.join()?;
    let latencies = scene.runtime.block_on(probe)??;
    let (_, hwm_kib) = flood::rss_kib(relay_pid)?;
    Ok(FloodRun {
        unattacked,
        attacked,
        peak_rss_kib,
        hwm_kib,
        report,
        latencies,
    })
}

/// The honest site's records per second into the hub over `length`, and the relay's largest
/// RSS (KiB) sampled meanwhile.
fn honest_rate(scene: &Scene, relay_pid: u32, length: Duration) -> anyhow::Result<(f64, u64)> {
    let start = Instant::now();
    let first = scene.hub_count()?;
    let mut peak_rss = 0;
    while start.elapsed() < length {
        std::thread::sleep(Duration::from_millis(500));
        peak_rss = peak_rss.max(flood::rss_kib(relay_pid)?.0);
    }
    let last = scene.hub_count()?;
    Ok((
        (last - first) as f64 / start.elapsed().as_secs_f64(),
        peak_rss,
    ))
}

/// No bad certificate got a connection that stayed open, every kind of bogus client was seen
/// and refused for what it was, and idle clients and stallers were cut by the hello timeout,
/// not left to hold their connections.
fn case_bogus_clients_refused(scene: &Scene, report: &flood::FloodReport) -> anyhow::Result<()> {
    ensure!(
        report.bad_accepted == 0,
        "{} connections with bad certificates stayed open",
        report.bad_accepted
    );
    ensure!(
        report.bad_handshakes > 0
            && report.valid_connections > 0
            && report.half_frames > 0
            && report.stalled_sessions > 0,
        "the flood did not run: {report:?}"
    );
    for reason in ["no_cert", "unknown_ca", "expired", "timeout"] {
        ensure!(
            scene.rejected(reason)? > 0.0,
            "no {reason} refusal counted during the flood"
        );
    }
    Ok(())
}

/// Sends SIGHUP and waits for the relay's verdict: `true` reloaded, `false` refused.
fn sighup(relay: &Spoke) -> anyhow::Result<bool> {
    let count = |log: &str, what: &str| log.matches(what).count();
    let refusals = |log: &str| {
        count(log, "SIGHUP: configuration refused") + count(log, "SIGHUP: [tls] refused")
    };
    let log = relay.log();
    let (reloads_before, refusals_before) = (count(&log, "SIGHUP: reloaded"), refusals(&log));
    relay.signal("HUP")?;
    let mut verdict = None;
    eventually(
        "the relay's verdict on SIGHUP",
        Duration::from_secs(20),
        || {
            let log = relay.log();
            if count(&log, "SIGHUP: reloaded") > reloads_before {
                verdict = Some(true);
            } else if refusals(&log) > refusals_before {
                verdict = Some(false);
            }
            Ok(verdict.is_some())
        },
    )?;
    verdict.context("no SIGHUP verdict")
}

/// The relay's leaf certificate as a new connection sees it.
fn peer_certificate(connection: &quinn::Connection) -> anyhow::Result<Vec<u8>> {
    connection
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.first().map(|c| c.to_vec()))
        .context("no relay certificate on the connection")
}

/// Connects as `identity` (trusting the current ca.pem) and returns the relay's certificate.
fn presented_certificate(
    scene: &Scene,
    endpoint: &quinn::Endpoint,
    identity: &Identity,
) -> anyhow::Result<Vec<u8>> {
    let config = hostile::client_config(&scene.ca_pem()?, Some(identity), None)?;
    scene.runtime.block_on(async {
        let connection = hostile::connect(endpoint, &config, scene.relay_addr())
            .await?
            .context("relay refused a valid certificate")?;
        let certificate = peer_certificate(&connection);
        connection.close(0u32.into(), b"done");
        certificate
    })
}

/// What a relay trusted and presented before the rotation.
struct BeforeRotation {
    ca_pem: String,
    relay_cert: Vec<u8>,
}

#[test]
fn sighup_rotates_certificates_without_dropping_the_connected_site() -> anyhow::Result<()> {
    let env = Env::new()?;
    let (mallory_pem, mallory_key) = env.issue_cert(MALLORY)?;
    let mallory = Identity::load(&mallory_pem, &mallory_key)?;
    let scene = Scene::start(env, "", 1000)?;
    let before = BeforeRotation {
        ca_pem: scene.ca_pem()?,
        relay_cert: Identity::load(
            &scene.env.pki().join("relay.pem"),
            &scene.env.pki().join("relay.key"),
        )?
        .der()?,
    };
    let endpoint = scene.runtime.block_on(async { hostile::endpoint() })?;

    // A site from a second CA, not trusted yet.
    let second_ca = Authority::new("spoke CA 2")?;
    let newcomer = second_ca.issue_site("newcomer", Validity::current(), 21)?;
    case("a second CA's site before the reload", || {
        case_untrusted_ca_refused(&scene, &endpoint, &before, &newcomer)
    })?;

    // Mallory is connected, and will be denied by the reload.
    let mallory_config =
        hostile::client_config(&before.ca_pem, Some(&mallory), Some(Duration::from_secs(1)))?;
    let mallory_session = scene.runtime.block_on(Session::open(
        &endpoint,
        &mallory_config,
        scene.relay_addr(),
        MALLORY,
    ))?;
    let produced_before = scene.load.produced();

    // Rotate: a new relay key and certificate (same CA, so agents need no change), the
    // second CA added to the client CA bundle, Mallory's certificate denied. First with the
    // new key left readable by others.
    let rotated = scene.real_ca()?.issue_relay("spoke relay rotated")?;
    let (_, rotated_key) = rotated.write(scene.env.pki(), "relay")?;
    std::fs::set_permissions(&rotated_key, std::fs::Permissions::from_mode(0o644))?;
    pki::replace_file(
        &scene.env.pki().join("ca.pem"),
        format!("{}{}", before.ca_pem, second_ca.cert_pem()).as_bytes(),
        0o644,
    )?;
    let deny = format!("deny = [\"sha256:{}\"]", mallory.sha256_hex()?);
    scene
        .env
        .relay_config_with(&[TOPIC], &relay_options(&deny))?;
    case("a reload with a world-readable key", || {
        case_world_readable_key_refuses_the_reload(
            &scene,
            &endpoint,
            &before,
            &mallory,
            &mallory_session,
        )
    })?;
    case("the reload with the key's mode fixed", || {
        case_reload_closes_the_denied_session(&scene, &rotated_key, mallory_session)
    })?;
    case("new connections after the reload", || {
        case_new_connections_see_the_rotation(&scene, &endpoint, &before, &rotated, &newcomer)
    })?;
    case("the honest site across the reload", || {
        case_honest_site_keeps_shipping(&scene, produced_before)
    })?;
    let produced = scene.finish("sighup-rotation")?;
    println!(
        "scenario=sighup-rotation honest_records={produced} produced_before_reload={produced_before} honest_sessions=1 lost=0 dup=0"
    );
    Ok(())
}

fn case_untrusted_ca_refused(
    scene: &Scene,
    endpoint: &quinn::Endpoint,
    before: &BeforeRotation,
    newcomer: &Identity,
) -> anyhow::Result<()> {
    let newcomer_config = hostile::client_config(&before.ca_pem, Some(newcomer), None)?;
    let rejected = scene.rejected("unknown_ca")?;
    scene.runtime.block_on(hostile::expect_refused(
        endpoint,
        &newcomer_config,
        scene.relay_addr(),
        "newcomer",
        Duration::from_secs(20),
    ))?;
    scene.expect_rejected("second CA before the reload", "unknown_ca", rejected + 1.0)
}

/// With the new key left readable by others, the relay must refuse the whole reload and keep
/// serving exactly as before: the old certificate, no deny list.
fn case_world_readable_key_refuses_the_reload(
    scene: &Scene,
    endpoint: &quinn::Endpoint,
    before: &BeforeRotation,
    mallory: &Identity,
    mallory_session: &Session,
) -> anyhow::Result<()> {
    ensure!(
        !sighup(&scene.relay)?,
        "the relay accepted a world-readable key on SIGHUP"
    );
    ensure!(
        scene.relay.log().contains("chmod 600"),
        "the refused reload does not say how to fix the key's mode"
    );
    ensure!(
        presented_certificate(scene, endpoint, mallory)? == before.relay_cert,
        "a refused reload changed the relay certificate"
    );
    ensure!(
        mallory_session.connection.close_reason().is_none(),
        "a refused reload applied the deny list"
    );
    Ok(())
}

/// The reload is taken, and the session whose certificate it denies is closed and counted.
fn case_reload_closes_the_denied_session(
    scene: &Scene,
    rotated_key: &std::path::Path,
    mallory_session: Session,
) -> anyhow::Result<()> {
    std::fs::set_permissions(rotated_key, std::fs::Permissions::from_mode(0o600))?;
    let denied_before = scene.rejected("denied")?;
    ensure!(
        sighup(&scene.relay)?,
        "the relay refused the rotated configuration"
    );
    let ended = scene
        .runtime
        .block_on(mallory_session.ended_by_relay(Duration::from_secs(20)))
        .context("a session whose certificate is now denied stayed open")?;
    // A reset means the relay's close was lost on the way; the counter below still says why
    // the relay ended it.
    if let Some((code, error)) = ended {
        ensure!(
            code == u64::from(CLOSE_NOT_AUTHORIZED),
            "denied session closed with code {code} ({error})"
        );
    }
    scene.expect_rejected("denied by the reload", "denied", denied_before + 1.0)
}

/// New connections get the rotated relay certificate, and the second CA is trusted.
fn case_new_connections_see_the_rotation(
    scene: &Scene,
    endpoint: &quinn::Endpoint,
    before: &BeforeRotation,
    rotated: &Identity,
    newcomer: &Identity,
) -> anyhow::Result<()> {
    let new_ca = scene.ca_pem()?;
    let newcomer_config = hostile::client_config(&new_ca, Some(newcomer), None)?;
    let session = scene
        .runtime
        .block_on(Session::open(
            endpoint,
            &newcomer_config,
            scene.relay_addr(),
            "newcomer",
        ))
        .context("a site of the newly trusted CA was refused after the reload")?;
    let presented = peer_certificate(&session.connection)?;
    session.connection.close(0u32.into(), b"done");
    ensure!(
        presented == rotated.der()?,
        "new connection got {} the rotated relay certificate",
        if presented == before.relay_cert {
            "the old certificate, not"
        } else {
            "neither the old certificate nor"
        }
    );
    Ok(())
}

/// The honest site keeps producing across and after the reload, on its first session.
fn case_honest_site_keeps_shipping(scene: &Scene, produced_before: usize) -> anyhow::Result<()> {
    eventually(
        "the honest site to keep shipping after the reload",
        Duration::from_secs(120),
        || Ok(scene.hub_count()? > produced_before as i64 + 2000),
    )?;
    let sessions = honest_sessions(&scene.relay);
    ensure!(
        sessions == 1,
        "the honest site's session was re-established {} times",
        sessions - 1
    );
    Ok(())
}

#[test]
fn hello_asking_for_a_million_resume_points_is_refused_before_any_hub_work() -> anyhow::Result<()> {
    let env = Env::new()?;
    let (mallory_pem, mallory_key) = env.issue_cert(MALLORY)?;
    let mallory = Identity::load(&mallory_pem, &mallory_key)?;
    let mut scene = Scene::start(env, "", 1000)?;
    let relay = scene.relay_addr();
    // Keep-alives: the connection must end by the relay's decision, not by QUIC idling.
    let config = hostile::client_config(
        &scene.ca_pem()?,
        Some(&mallory),
        Some(Duration::from_secs(1)),
    )?;
    let endpoint = scene.runtime.block_on(async { hostile::endpoint() })?;
    let hello = hostile::encode(&hostile::hello_with_partitions(MALLORY, TOPIC, 1_000_000))?;
    let before = scene.rejected("protocol")?;
    let started = Instant::now();
    let outcome = scene.runtime.block_on(async {
        let connection = hostile::connect(&endpoint, &config, relay)
            .await?
            .context("relay refused a valid certificate")?;
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(&hello).await?;
        let mut buf = Vec::new();
        let answer = tokio::time::timeout(
            Duration::from_secs(30),
            hostile::read_frame(&mut recv, &mut buf),
        )
        .await;
        let closed = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
        anyhow::Ok((answer, closed))
    })?;
    println!(
        "after {:.1}s: answer {:?}, close {:?}",
        started.elapsed().as_secs_f64(),
        outcome
            .0
            .as_ref()
            .map(|r| r.as_ref().map(|f| f.as_ref().map(Frame::name))),
        outcome.1
    );
    let closed = outcome.1.context("connection still open")?;
    match &closed {
        quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == quinn::VarInt::from_u32(CLOSE_PROTOCOL_ERROR) => {}
        other => bail!("expected a PROTOCOL_ERROR close, got {other}"),
    }
    scene.expect_rejected("oversized Hello", "protocol", before + 1.0)?;
    scene.assert_relay_alive("a Hello with a million partitions")?;
    let produced = scene.finish("hello-partitions")?;
    println!("scenario=hello-partitions honest_records={produced} lost=0 dup=0");
    Ok(())
}

/// A peer that opens the streams its connection allows beyond the first, which the relay
/// never reads, and fills them: whatever the relay buffers for them is memory an
/// authenticated peer pins for free until a timeout.
#[test]
fn data_pushed_into_streams_the_relay_never_reads_is_bounded() -> anyhow::Result<()> {
    /// The default per-site connection cap.
    const CONNECTIONS: usize = 4;
    /// More than any stream cap: opening stops where the relay's credit does.
    const STREAMS: usize = 8;
    const PER_STREAM: usize = 16 << 20;
    let env = Env::new()?;
    let (mallory_pem, mallory_key) = env.issue_cert(MALLORY)?;
    let mallory = Identity::load(&mallory_pem, &mallory_key)?;
    let mut scene = Scene::start(env, "", 1000)?;
    let relay = scene.relay_addr();
    let relay_pid = scene.relay.pid().context("relay stopped")?;
    let (rss_before, _) = flood::rss_kib(relay_pid)?;
    let config = hostile::client_config(
        &scene.ca_pem()?,
        Some(&mallory),
        Some(Duration::from_secs(1)),
    )?;
    let endpoint = scene.runtime.block_on(async { hostile::endpoint() })?;
    let (pushed, held) = scene.runtime.block_on(async {
        let mut held = Vec::new();
        let mut pushed = 0usize;
        let junk = vec![0x5au8; PER_STREAM];
        for _ in 0..CONNECTIONS {
            let session = Session::open(&endpoint, &config, relay, MALLORY).await?;
            let mut streams = Vec::new();
            for _ in 1..STREAMS {
                let opened =
                    tokio::time::timeout(Duration::from_secs(2), session.connection.open_bi())
                        .await;
                let Ok(Ok((mut send, recv))) = opened else {
                    break;
                };
                // Writing stops when the relay's flow-control credit runs out.
                let mut written = 0;
                while written < junk.len() {
                    let write = send.write(&junk[written..]);
                    match tokio::time::timeout(Duration::from_secs(2), write).await {
                        Ok(Ok(n)) => written += n,
                        _ => break,
                    }
                }
                pushed += written;
                streams.push((send, recv));
            }
            held.push((session, streams));
        }
        anyhow::Ok((pushed, held))
    })?;
    // quinn's write returns once the data is in the client's send buffer: give the relay
    // time to receive what its credit allows, watching its memory meanwhile.
    let mut rss = 0;
    for _ in 0..24 {
        std::thread::sleep(Duration::from_millis(250));
        rss = rss.max(flood::rss_kib(relay_pid)?.0);
    }
    let (_, hwm) = flood::rss_kib(relay_pid)?;
    println!(
        "scenario=unread-streams pushed_mib={} relay_rss_before_mib={} relay_rss_mib={} relay_hwm_mib={}",
        pushed >> 20,
        rss_before / 1024,
        rss / 1024,
        hwm / 1024
    );
    drop(held);
    scene.assert_relay_alive("unread streams")?;
    // One site's certificate (4 connections at the default per-site cap) must not be able
    // to pin much relay memory: the relay reads only the first stream of a connection.
    ensure!(
        hwm.saturating_sub(rss_before) < 64 * 1024,
        "relay RSS grew from {} to {} MiB after one site pushed {} MiB into streams it never reads",
        rss_before / 1024,
        hwm / 1024,
        pushed >> 20
    );
    scene.finish("unread-streams")?;
    Ok(())
}
