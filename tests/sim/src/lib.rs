//! spoke-sim: a fleet of simulated sites against one real `spoke-relay` and a real hub broker
//! (tansu), measuring what the relay costs as the fleet grows (issue 23): its resident memory,
//! threads, TCP connections to the hub and CPU, with every record checked in the hub at the end.
//!
//! The sites live in this process ([`site`]), each with its own certificate and QUIC
//! connection, spread over a few client endpoints. The relay's hub traffic goes through a proxy
//! that counts Kafka requests ([`proxy`]). A run ([`run_fleet`]) goes through phases, each
//! capped by a timeout: connect every site, warm up, measure a steady window, measure a window
//! with shipping paused (what idle sites cost), optionally kill and restart the relay and time
//! the reconnect storm, or (with two relays) kill one for good and time its sites' failover to
//! the other, then stop, drain and verify ([`verify`]).

pub mod procfs;
pub mod proxy;
pub mod records;
pub mod relay;
pub mod site;
pub mod verify;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use spoke_tests::broker::Broker;
use tokio::sync::watch;

use crate::proxy::CountingProxy;
use crate::relay::{Relay, RelaySetup};
use crate::site::{Fleet, Outcome, Role, Settings, Site};

/// Everything one run does.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Names the run in its line (`fleet`, `throughput-one`, ...).
    pub label: String,
    pub sites: usize,
    /// Sites that ship records; the rest are idle.
    pub shipping: usize,
    /// Of the shipping sites, those shipping as fast as the window allows.
    pub heavy: usize,
    pub warmup: Duration,
    pub steady: Duration,
    /// A window with shipping paused, to measure what connected idle sites cost (0: none).
    pub idle_window: Duration,
    /// After the stop, how long sites may take to get their outstanding records confirmed.
    pub drain: Duration,
    /// How long connecting every site may take; `None`: 60 s plus 10 ms per site.
    pub connect_timeout: Option<Duration>,
    pub storm: bool,
    /// How long the storm, or the failover, may take.
    pub storm_timeout: Duration,
    /// Relays started alike but for their ports, 1 or 2; site `i` connects to relay
    /// `i % relays` first and, as the agent with two `relay.endpoints`, to the next one
    /// whenever a session fails.
    pub relays: usize,
    /// After the steady state (and the idle window), SIGKILL the first relay and do not start
    /// it again; time until its sites hold sessions with the second one, and shipping sites got
    /// an Ack from it. Needs `relays` = 2.
    pub failover: bool,
    pub trickle_interval: Duration,
    pub batch_records: u32,
    pub heavy_batch_records: u32,
    pub record_bytes: usize,
    pub partitions: i32,
    pub idle_partitions: i32,
    pub window: usize,
    pub window_bytes: u64,
    pub streams: u32,
    pub fence_delay: Duration,
    /// `hub.topic` of the relay.
    pub hub_topic: String,
    /// Handshakes the simulator runs at once.
    pub connect_concurrency: usize,
    /// Sites sharing one client endpoint (UDP socket).
    pub sites_per_endpoint: usize,
    /// Worker threads of the simulator's runtime.
    pub worker_threads: usize,
    /// No request-counting proxy in front of the hub.
    pub direct_hub: bool,
    pub relay: RelaySetup,
    /// Keep the run's directory (broker database, relay config and log).
    pub keep_dir: bool,
    /// Progress lines on stderr.
    pub verbose: bool,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            label: "fleet".into(),
            sites: 100,
            shipping: 1,
            heavy: 0,
            warmup: Duration::from_secs(5),
            steady: Duration::from_secs(20),
            idle_window: Duration::from_secs(10),
            drain: Duration::from_secs(60),
            connect_timeout: None,
            storm: false,
            storm_timeout: Duration::from_secs(300),
            relays: 1,
            failover: false,
            trickle_interval: Duration::from_secs(1),
            batch_records: 10,
            heavy_batch_records: 200,
            record_bytes: 200,
            partitions: 1,
            idle_partitions: 0,
            window: 16,
            window_bytes: 16 << 20,
            streams: 4,
            fence_delay: Duration::from_secs(15),
            hub_topic: "{site}.{topic}".into(),
            connect_concurrency: 200,
            sites_per_endpoint: 500,
            worker_threads: 2,
            direct_hub: false,
            relay: RelaySetup {
                max_threads: 10_000,
                max_rss_mib: 8192,
                ..RelaySetup::default()
            },
            keep_dir: false,
            verbose: true,
        }
    }
}

/// What the relay cost over one measured window.
#[derive(Debug, Clone, Default)]
pub struct Window {
    pub secs: f64,
    pub relay_rss_mib: f64,
    pub relay_rss_max_mib: f64,
    pub relay_hwm_mib: f64,
    pub relay_threads: u64,
    pub relay_threads_max: u64,
    pub hub_connections: usize,
    pub hub_connections_max: usize,
    pub relay_tcp_connections: usize,
    pub relay_fds: usize,
    /// Datagrams the kernel dropped at the relay's UDP socket (full receive buffer) since
    /// it opened, and at the simulator's client sockets since they opened.
    pub relay_udp_drops: u64,
    pub sim_udp_drops: u64,
    pub relay_cpu_cores: f64,
    pub sim_cpu_cores: f64,
    /// The hub broker's CPU, where its process was found: the hub may be the bottleneck.
    pub hub_cpu_cores: Option<f64>,
    pub acked_per_s: f64,
    pub hub_requests_per_s: f64,
}

impl Window {
    fn json(&self) -> Value {
        json!({
            "secs": round(self.secs),
            "relay_rss_mib": round(self.relay_rss_mib),
            "relay_rss_max_mib": round(self.relay_rss_max_mib),
            "relay_hwm_mib": round(self.relay_hwm_mib),
            "relay_threads": self.relay_threads,
            "relay_threads_max": self.relay_threads_max,
            "hub_connections": self.hub_connections,
            "hub_connections_max": self.hub_connections_max,
            "relay_tcp_connections": self.relay_tcp_connections,
            "relay_fds": self.relay_fds,
            "relay_udp_drops": self.relay_udp_drops,
            "sim_udp_drops": self.sim_udp_drops,
            "relay_cpu_cores": round(self.relay_cpu_cores),
            "sim_cpu_cores": round(self.sim_cpu_cores),
            "hub_cpu_cores": self.hub_cpu_cores.map(round),
            "acked_per_s": round(self.acked_per_s),
            "hub_requests_per_s": round(self.hub_requests_per_s),
        })
    }
}

/// The reconnect storm after a relay restart.
#[derive(Debug, Clone, Default)]
pub struct Storm {
    /// From the restart until every site had a Welcome and every shipping site an Ack again
    /// (`None`: not within the timeout).
    pub secs: Option<f64>,
    /// Until no site held a session with the killed relay any more (it noticed the loss).
    pub detect_all_secs: Option<f64>,
    pub welcome_all_secs: Option<f64>,
    /// Until every idle site had a Welcome (shipping sites may wait out the fence besides).
    pub idle_back_secs: Option<f64>,
    pub ship_all_secs: Option<f64>,
    pub sites_back: usize,
    pub shipping_back: usize,
    pub hub_requests: u64,
    pub hub_requests_by_api: Vec<(String, u64)>,
    pub relay_rss_mib: f64,
    pub relay_threads: u64,
}

/// One relay's footprint at one moment.
#[derive(Debug, Clone, Default)]
pub struct RelayFigures {
    pub rss_mib: f64,
    pub hwm_mib: f64,
    pub threads: u64,
    pub hub_connections: usize,
    /// Sites whose session is with this relay.
    pub sites: usize,
}

impl RelayFigures {
    fn json(&self) -> Value {
        json!({
            "rss_mib": round(self.rss_mib),
            "hwm_mib": round(self.hwm_mib),
            "threads": self.threads,
            "hub_connections": self.hub_connections,
            "sites": self.sites,
        })
    }
}

/// The first of two relays killed for good (issue 23's failover): its sites move to the
/// second. Times are seconds from the kill; `None`: not within the timeout.
#[derive(Debug, Clone, Default)]
pub struct Failover {
    /// Sites whose latest Welcome at the kill was the killed relay's, and the shipping ones
    /// among them.
    pub sites: usize,
    pub shipping: usize,
    /// Of those, the sites the other relay welcomed (past the fence) since, and the shipping
    /// ones with an Ack from it.
    pub moved: usize,
    pub shipped_again: usize,
    /// Until no site held a session with the killed relay any more (its sites noticed).
    pub detect_secs: Option<f64>,
    /// Until every idle site of the killed relay held a session with the other one.
    pub idle_move_secs: Option<f64>,
    /// Until every site of the killed relay held a session with the other one (a shipping
    /// site only once its fence opened).
    pub move_secs: Option<f64>,
    /// Until every shipping site of the killed relay had an Ack from the other one.
    pub ship_again_secs: Option<f64>,
    pub hub_requests: u64,
    pub hub_requests_by_api: Vec<(String, u64)>,
    /// The surviving relay once every site moved and shipped again (or at the timeout), and
    /// its maxima over the failover.
    pub relay_b: RelayFigures,
    pub relay_b_rss_max_mib: f64,
    pub relay_b_threads_max: u64,
    pub relay_b_hub_connections_max: usize,
}

/// One run's figures.
#[derive(Debug, Clone, Default)]
pub struct FleetReport {
    pub label: String,
    pub sites: usize,
    pub shipping: usize,
    pub heavy: usize,
    pub relays: usize,
    pub certs_secs: f64,
    pub connect_secs: Option<f64>,
    /// When half, 99% and all of the sites had their first Welcome (s from the start).
    pub connect_p50_secs: Option<f64>,
    pub connect_p99_secs: Option<f64>,
    pub connected: usize,
    /// UDP datagrams the kernel dropped during the run (system-wide: full socket buffers).
    pub udp_in_errors: u64,
    pub udp_rcvbuf_errors: u64,
    /// The first relay's figures (with two relays, the second one's at the end of the steady
    /// window are in `steady_b`).
    pub steady: Option<Window>,
    pub steady_b: Option<RelayFigures>,
    pub idle: Option<Window>,
    pub storm: Option<Storm>,
    pub failover: Option<Failover>,
    pub verdict: verify::Verdict,
    /// Whether the hub could be read back; without it lost and dup say nothing.
    pub verified: bool,
    pub counters: Vec<(&'static str, u64)>,
    pub session_errors: Vec<(String, u64)>,
    pub hub_requests_by_api: Vec<(String, u64)>,
    pub relay_starts: u32,
    /// Phases that failed or timed out, in words; empty on a clean run.
    pub failures: Vec<String>,
    pub dir: Option<String>,
}

impl FleetReport {
    /// Whether the hub holds exactly what the relay confirmed, byte for byte.
    pub fn exactly_once(&self) -> bool {
        self.verified
            && self.verdict.lost == 0
            && self.verdict.dup == 0
            && self.verdict.corrupt == 0
            && self.verdict.unknown == 0
    }

    /// The run as one line of `key=value`s.
    pub fn line(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("none".to_owned(), |v| format!("{v:.2}"));
        let steady = self.steady.clone().unwrap_or_default();
        let mut line = format!(
            "{} sites={} idle={} shipping={} heavy={} certs_secs={:.2} connect_secs={} \
             connect_p99_secs={} connected={} relay_rss_mib={:.1} relay_threads={} hub_connections={} relay_cpu_cores={:.3} \
             sim_cpu_cores={:.3} hub_cpu_cores={} relay_udp_drops={} sim_udp_drops={} acked_per_s={:.0} hub_requests_per_s={:.1}",
            self.label,
            self.sites,
            self.sites - self.shipping,
            self.shipping,
            self.heavy,
            self.certs_secs,
            opt(self.connect_secs),
            opt(self.connect_p99_secs),
            self.connected,
            steady.relay_rss_mib,
            steady.relay_threads,
            steady.hub_connections,
            steady.relay_cpu_cores,
            steady.sim_cpu_cores,
            steady
                .hub_cpu_cores
                .map_or("none".to_owned(), |c| format!("{c:.3}")),
            steady.relay_udp_drops,
            steady.sim_udp_drops,
            steady.acked_per_s,
            steady.hub_requests_per_s,
        );
        if let Some(idle) = &self.idle {
            line += &format!(" relay_idle_cpu_cores={:.3}", idle.relay_cpu_cores);
        }
        if self.relays > 1 {
            line += &format!(" relays={}", self.relays);
        }
        if let Some(b) = &self.steady_b {
            line += &format!(
                " relay_b_steady_rss_mib={:.1} relay_b_steady_threads={} relay_b_steady_hub_connections={}",
                b.rss_mib, b.threads, b.hub_connections
            );
        }
        if let Some(f) = &self.failover {
            line += &format!(
                " failover_sites={} failover_shipping={} moved={} shipped_again={} \
                 detect_secs={} idle_move_secs={} move_secs={} ship_again_secs={} \
                 relay_b_sites={} relay_b_rss_mib={:.1} relay_b_rss_max_mib={:.1} relay_b_threads={} \
                 relay_b_threads_max={} relay_b_hub_connections={} failover_hub_requests={}",
                f.sites,
                f.shipping,
                f.moved,
                f.shipped_again,
                opt(f.detect_secs),
                opt(f.idle_move_secs),
                opt(f.move_secs),
                opt(f.ship_again_secs),
                f.relay_b.sites,
                f.relay_b.rss_mib,
                f.relay_b_rss_max_mib,
                f.relay_b.threads,
                f.relay_b_threads_max,
                f.relay_b.hub_connections,
                f.hub_requests,
            );
        }
        if let Some(storm) = &self.storm {
            line += &format!(
                " storm_secs={} storm_detect_secs={} storm_idle_back_secs={} storm_welcome_secs={} \
                 storm_ship_secs={} \
                 storm_sites_back={} \
                 storm_hub_requests={} storm_hub_requests_per_site={:.1}",
                opt(storm.secs),
                opt(storm.detect_all_secs),
                opt(storm.idle_back_secs),
                opt(storm.welcome_all_secs),
                opt(storm.ship_all_secs),
                storm.sites_back,
                storm.hub_requests,
                storm.hub_requests as f64 / self.sites.max(1) as f64,
            );
        }
        let v = &self.verdict;
        if self.verified {
            line += &format!(
                " records={} acked={} hub={} lost={} dup={} corrupt={} unknown={} unacked={}",
                v.records, v.acked, v.hub_records, v.lost, v.dup, v.corrupt, v.unknown, v.unacked
            );
        } else {
            line += &format!(
                " records={} acked={} hub=unread lost=unknown dup=unknown unacked={}",
                v.records, v.acked, v.unacked
            );
        }
        if !self.failures.is_empty() {
            line += &format!(" failures={}", self.failures.len());
        }
        line
    }

    pub fn json(&self) -> Value {
        let pairs = |pairs: &[(String, u64)]| -> Value {
            pairs
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let v = &self.verdict;
        json!({
            "label": self.label,
            "sites": self.sites,
            "idle": self.sites - self.shipping,
            "shipping": self.shipping,
            "heavy": self.heavy,
            "relays": self.relays,
            "certs_secs": round(self.certs_secs),
            "connect_secs": self.connect_secs.map(round),
            "connect_p50_secs": self.connect_p50_secs.map(round),
            "connect_p99_secs": self.connect_p99_secs.map(round),
            "connected": self.connected,
            "udp_in_errors": self.udp_in_errors,
            "udp_rcvbuf_errors": self.udp_rcvbuf_errors,
            "steady": self.steady.as_ref().map(Window::json),
            "steady_relay_b": self.steady_b.as_ref().map(RelayFigures::json),
            "idle_window": self.idle.as_ref().map(Window::json),
            "storm": self.storm.as_ref().map(|s| json!({
                "secs": s.secs.map(round),
                "detect_all_secs": s.detect_all_secs.map(round),
                "welcome_all_secs": s.welcome_all_secs.map(round),
                "idle_back_secs": s.idle_back_secs.map(round),
                "ship_all_secs": s.ship_all_secs.map(round),
                "sites_back": s.sites_back,
                "shipping_back": s.shipping_back,
                "hub_requests": s.hub_requests,
                "hub_requests_per_site": round(s.hub_requests as f64 / self.sites.max(1) as f64),
                "hub_requests_by_api": pairs(&s.hub_requests_by_api),
                "relay_rss_mib": round(s.relay_rss_mib),
                "relay_threads": s.relay_threads,
            })),
            "failover": self.failover.as_ref().map(|f| json!({
                "sites": f.sites,
                "shipping": f.shipping,
                "moved": f.moved,
                "shipped_again": f.shipped_again,
                "detect_secs": f.detect_secs.map(round),
                "idle_move_secs": f.idle_move_secs.map(round),
                "move_secs": f.move_secs.map(round),
                "ship_again_secs": f.ship_again_secs.map(round),
                "hub_requests": f.hub_requests,
                "hub_requests_by_api": pairs(&f.hub_requests_by_api),
                "relay_b": f.relay_b.json(),
                "relay_b_rss_max_mib": round(f.relay_b_rss_max_mib),
                "relay_b_threads_max": f.relay_b_threads_max,
                "relay_b_hub_connections_max": f.relay_b_hub_connections_max,
            })),
            "verified": self.verified,
            "verify": {
                "hub_topics": v.hub_topics,
                "hub_records": v.hub_records,
                "records": v.records,
                "acked": v.acked,
                "lost": v.lost,
                "dup": v.dup,
                "corrupt": v.corrupt,
                "unknown": v.unknown,
                "unacked": v.unacked,
                "unacked_in_hub": v.unacked_in_hub,
                "rejected": v.rejected,
                "lost_examples": v.lost_examples,
                "read_secs": round(v.read_secs),
            },
            "counters": self.counters.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "session_errors": pairs(&self.session_errors),
            "hub_requests_by_api": pairs(&self.hub_requests_by_api),
            "relay_starts": self.relay_starts,
            "failures": self.failures,
            "dir": self.dir,
        })
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The broker, the proxy in front of it and the relay of one run; dropped in that order's
/// reverse so nothing outlives the run.
struct Hub {
    // Fields drop in order: the relays before the proxy and the broker they talk to.
    relay: Relay,
    /// The second relay of a two-relay run.
    second: Option<Relay>,
    proxy: Option<CountingProxy>,
    /// Held for the run: dropping it stops the broker.
    _broker: Broker,
    /// The port the relay's hub connections go to (the proxy's, or the broker's).
    port: u16,
    /// The broker's process, for its CPU.
    broker_pid: Option<u32>,
}

impl Hub {
    /// Fails if a relay exited (other than one killed on purpose) or went over the caps.
    fn check(&mut self) -> anyhow::Result<()> {
        self.relay.check()?;
        if let Some(second) = self.second.as_mut() {
            second.check().context("the second relay")?;
        }
        Ok(())
    }

    fn requests(&self) -> Vec<u64> {
        self.proxy
            .as_ref()
            .map(|p| p.counts.snapshot())
            .unwrap_or_default()
    }
}

/// Runs one fleet through its phases and verifies the hub. An error means the run could not
/// be set up or verified; a phase that fails or times out is listed in
/// [`FleetReport::failures`] and the run goes on to verify what it can.
pub fn run_fleet(options: &FleetOptions) -> anyhow::Result<FleetReport> {
    let o = options;
    anyhow::ensure!(o.sites > 0, "a fleet needs at least one site");
    anyhow::ensure!(
        (1..=2).contains(&o.relays),
        "one or two relays, not {}",
        o.relays
    );
    anyhow::ensure!(
        !o.failover || o.relays == 2,
        "the failover needs two relays"
    );
    anyhow::ensure!(
        !(o.failover && o.storm),
        "the storm and the failover are separate runs"
    );
    let shipping = o.shipping.min(o.sites);
    let heavy = o.heavy.min(shipping);
    let say = |text: String| {
        if o.verbose {
            eprintln!("[{}] {text}", o.label);
        }
    };
    let mut report = FleetReport {
        label: o.label.clone(),
        sites: o.sites,
        shipping,
        heavy,
        relays: o.relays,
        ..FleetReport::default()
    };
    let mut dir = tempfile::Builder::new().prefix("spoke-sim-").tempdir()?;
    if o.keep_dir {
        dir.disable_cleanup(true);
        report.dir = Some(dir.path().display().to_string());
    }
    let path = dir.path();

    let (broker, proxy, port) = if o.direct_hub {
        let broker = Broker::start(path, "hub")?;
        let port = broker.port;
        (broker, None, port)
    } else {
        let port = spoke_tests::free_port()?;
        let broker = Broker::start_behind(path, "hub", port)?;
        let proxy = CountingProxy::start(
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from(([127, 0, 0, 1], broker.port)),
        )?;
        (broker, Some(proxy), port)
    };
    let bootstrap = broker.bootstrap();

    let started = Instant::now();
    let ca = relay::write_pki(path)?;
    let names: Vec<String> = (0..o.sites).map(|i| format!("site-{i:05}")).collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let clients = relay::site_clients(&ca, &names, threads)?;
    report.certs_secs = started.elapsed().as_secs_f64();
    say(format!(
        "{} site certificates in {:.1} s",
        o.sites, report.certs_secs
    ));

    let relay = Relay::start(path, "relay", &bootstrap, o.sites, &o.hub_topic, &o.relay)?;
    let second = if o.relays > 1 {
        Some(Relay::start(
            path,
            "relay-b",
            &bootstrap,
            o.sites,
            &o.hub_topic,
            &o.relay,
        )?)
    } else {
        None
    };
    let mut hub = Hub {
        relay,
        second,
        proxy,
        broker_pid: procfs::find_process(&[
            "tansu",
            &format!("--listener-url tcp://127.0.0.1:{} ", broker.port),
        ]),
        _broker: broker,
        port,
    };
    let relay_addrs: Vec<SocketAddr> = std::iter::once(&hub.relay)
        .chain(hub.second.as_ref())
        .map(|relay| SocketAddr::from(([127, 0, 0, 1], relay.port)))
        .collect();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.worker_threads.max(1))
        .thread_name("spoke-sim")
        .enable_all()
        .build()?;
    let (paused_tx, paused_rx) = watch::channel(false);
    let settings = Settings {
        relays: relay_addrs.clone(),
        partitions: o.partitions.max(1),
        idle_partitions: o.idle_partitions.max(0),
        trickle_interval: o.trickle_interval,
        batch_records: o.batch_records.max(1),
        heavy_batch_records: o.heavy_batch_records.max(1),
        record_bytes: o.record_bytes,
        window: o.window.max(1),
        window_bytes: o.window_bytes,
        streams: o.streams,
        fence_delay: o.fence_delay,
    };
    let fleet = Arc::new(Fleet::new(
        settings,
        o.sites,
        o.connect_concurrency,
        paused_rx,
    ));
    let endpoints = {
        let _entered = runtime.enter();
        (0..o.sites.div_ceil(o.sites_per_endpoint.max(1)))
            .map(|_| quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))))
            .collect::<Result<Vec<_>, _>>()
            .context("opening the client endpoints")?
    };
    let sites: Vec<Site> = names
        .into_iter()
        .zip(clients)
        .enumerate()
        .map(|(index, (name, client))| Site {
            index,
            name,
            role: if index < heavy {
                Role::Heavy
            } else if index < shipping {
                Role::Trickle
            } else {
                Role::Idle
            },
            client,
            // Round robin, so the shipping sites (the first indices) spread over sockets.
            endpoint: endpoints[index % endpoints.len()].clone(),
            // Half of the sites on each relay, the shipping ones too.
            first_relay: index % relay_addrs.len(),
        })
        .collect();
    let connecting = Instant::now();
    let udp_before = procfs::udp_drops().unwrap_or_default();
    let mut fleet_task = runtime.spawn(run_sites(fleet.clone(), sites));

    // Connect.
    let connect_timeout = o
        .connect_timeout
        .unwrap_or(Duration::from_secs(60) + Duration::from_millis(10) * o.sites as u32);
    let all_welcomed = wait_for(connect_timeout, &mut hub, || {
        welcomed_since(&fleet, 0) == o.sites
    });
    report.connected = welcomed_since(&fleet, 0);
    let mut first_welcomes: Vec<u64> = fleet
        .status
        .iter()
        .map(|s| s.welcomed_ms.load(Ordering::Relaxed))
        .filter(|ms| *ms > 0)
        .collect();
    first_welcomes.sort_unstable();
    let quantile = |q: f64| {
        // Sites never welcomed count as later than every one that was.
        let rank = ((o.sites as f64 * q).ceil() as usize).clamp(1, o.sites);
        first_welcomes.get(rank - 1).map(|ms| *ms as f64 / 1000.0)
    };
    report.connect_p50_secs = quantile(0.5);
    report.connect_p99_secs = quantile(0.99);
    match all_welcomed {
        Ok(true) => {
            report.connect_secs = Some(connecting.elapsed().as_secs_f64());
            say(format!(
                "{} sites connected in {:.1} s",
                o.sites,
                connecting.elapsed().as_secs_f64()
            ));
        }
        Ok(false) => report.failures.push(format!(
            "connect: {} of {} sites welcomed within {connect_timeout:?}",
            report.connected, o.sites
        )),
        Err(error) => report.failures.push(format!("connect: {error:#}")),
    }

    // Steady state, then the idle window, then the storm: each only while the relay runs.
    let windows = (|| -> anyhow::Result<()> {
        sleep_checking(o.warmup, &mut hub)?;
        say(format!("measuring {:?} of steady state", o.steady));
        report.steady = Some(measure(&mut hub, &fleet, o.steady)?);
        if let Some(second) = hub.second.as_ref() {
            report.steady_b = Some(relay_figures(second, hub.port, &fleet, 1)?);
        }
        if !o.idle_window.is_zero() && shipping > 0 {
            paused_tx.send_replace(true);
            // Let the last batches' acks come back before the window starts.
            sleep_checking(Duration::from_secs(3), &mut hub)?;
            say(format!(
                "measuring {:?} with shipping paused",
                o.idle_window
            ));
            report.idle = Some(measure(&mut hub, &fleet, o.idle_window)?);
            paused_tx.send_replace(false);
        } else if !o.idle_window.is_zero() {
            report.idle = report.steady.clone();
        }
        if o.storm {
            say("killing and restarting the relay".into());
            report.storm = Some(storm(&mut hub, &fleet, shipping, o.storm_timeout)?);
            if report.storm.as_ref().is_some_and(|s| s.secs.is_none()) {
                report.failures.push(format!(
                    "storm: not every site shipping again within {:?}",
                    o.storm_timeout
                ));
            }
        }
        if o.failover {
            say("killing the first relay for good".into());
            let result = failover(&mut hub, &fleet, shipping, o.storm_timeout)?;
            if result.move_secs.is_none() || result.ship_again_secs.is_none() {
                report.failures.push(format!(
                    "failover: {} of {} sites on the other relay, {} of {} shipping ones with an \
                     Ack from it, within {:?}",
                    result.moved,
                    result.sites,
                    result.shipped_again,
                    result.shipping,
                    o.storm_timeout
                ));
            }
            report.failover = Some(result);
        }
        Ok(())
    })();
    if let Err(error) = windows {
        report.failures.push(format!("{error:#}"));
    }
    paused_tx.send_replace(false);

    // Stop, drain, collect the ledgers.
    say("stopping the sites and waiting for outstanding acks".into());
    fleet.stop.cancel();
    let outcomes = runtime.block_on(async {
        match tokio::time::timeout(o.drain, &mut fleet_task).await {
            Ok(joined) => joined.ok(),
            Err(_) => {
                fleet.abort.cancel();
                tokio::time::timeout(Duration::from_secs(30), &mut fleet_task)
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
        }
    });
    if fleet.abort.is_cancelled() {
        report.failures.push(format!(
            "drain: sites still had unconfirmed records after {:?}",
            o.drain
        ));
    }
    let Some(outcomes) = outcomes else {
        anyhow::bail!("the site tasks did not end; no ledger to verify against");
    };
    if outcomes.len() != o.sites {
        report.failures.push(format!(
            "{} site tasks failed (panicked); their records are not verified",
            o.sites - outcomes.len()
        ));
    }
    let udp_after = procfs::udp_drops().unwrap_or_default();
    report.udp_in_errors = udp_after.0.saturating_sub(udp_before.0);
    report.udp_rcvbuf_errors = udp_after.1.saturating_sub(udp_before.1);
    report.counters = fleet.counters.snapshot();
    report.session_errors = fleet.errors();
    report.hub_requests_by_api = proxy::requests_between(&[], &hub.requests());
    // The endpoints close with the runtime; the sites are done with them.
    drop(endpoints);
    runtime.shutdown_timeout(Duration::from_secs(5));

    say("reading the hub".into());
    match verify::verify(&bootstrap, &o.hub_topic, &outcomes, o.record_bytes) {
        Ok(verdict) => {
            report.verdict = verdict;
            report.verified = true;
        }
        Err(error) => {
            // The figures measured still count; what the ledgers say is kept for the report.
            report.verdict = verify::ledger_totals(&outcomes);
            report.failures.push(format!("verify: {error:#}"));
        }
    }
    report.relay_starts = hub.relay.starts + hub.second.as_ref().map_or(0, |r| r.starts);
    if let Err(error) = hub.relay.stop() {
        report
            .failures
            .push(format!("relay stop: {}", first_line(&format!("{error:#}"))));
    }
    if let Some(second) = hub.second.as_mut() {
        if let Err(error) = second.stop() {
            report.failures.push(format!(
                "second relay stop: {}",
                first_line(&format!("{error:#}"))
            ));
        }
    }
    Ok(report)
}

async fn run_sites(fleet: Arc<Fleet>, sites: Vec<Site>) -> Vec<Outcome> {
    let mut tasks = tokio::task::JoinSet::new();
    for site in sites {
        tasks.spawn(site::run(fleet.clone(), site));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(outcome) => outcomes.push(outcome),
            Err(error) => eprintln!("a site task failed: {error}"),
        }
    }
    outcomes.sort_by_key(|o| o.index);
    outcomes
}

/// Sites welcomed after `since_ms` (fleet time).
fn welcomed_since(fleet: &Fleet, since_ms: u64) -> usize {
    fleet
        .status
        .iter()
        .filter(|s| s.welcomed_ms.load(Ordering::Relaxed) > since_ms)
        .count()
}

/// Polls `done` until it holds (true) or `timeout` passes (false); fails at once if the
/// relay exits.
fn wait_for(
    timeout: Duration,
    hub: &mut Hub,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return Ok(true);
        }
        hub.check()?;
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sleep_checking(duration: Duration, hub: &mut Hub) -> anyhow::Result<()> {
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        hub.check()?;
        std::thread::sleep(Duration::from_millis(200).min(duration));
    }
    Ok(())
}

/// The relay's footprint over `duration`, sampled every second (maxima) and at the end.
fn measure(hub: &mut Hub, fleet: &Fleet, duration: Duration) -> anyhow::Result<Window> {
    let pid = hub
        .relay
        .pid()
        .context("the relay is not running")?
        .to_string();
    let ticks = procfs::clock_ticks();
    let before = procfs::sample(&pid)?;
    let sim_before = procfs::sample("self")?;
    let hub_pid = hub.broker_pid.map(|pid| pid.to_string());
    let hub_before = hub_pid.as_deref().and_then(|pid| procfs::sample(pid).ok());
    let acked_before = fleet.counters.records_acked.load(Ordering::Relaxed);
    let requests_before: u64 = hub.requests().iter().sum();
    let started = Instant::now();
    let mut window = Window::default();
    let mut last = before;
    while started.elapsed() < duration {
        std::thread::sleep(Duration::from_secs(1).min(duration));
        hub.check()?;
        last = procfs::sample(&pid)?;
        let (to_hub, all) = procfs::tcp_established(&pid, hub.port)?;
        window.relay_rss_max_mib = window.relay_rss_max_mib.max(last.rss_kib as f64 / 1024.0);
        window.relay_threads_max = window.relay_threads_max.max(last.threads);
        window.hub_connections_max = window.hub_connections_max.max(to_hub);
        window.hub_connections = to_hub;
        window.relay_tcp_connections = all;
    }
    let secs = started.elapsed().as_secs_f64();
    let sim_after = procfs::sample("self")?;
    let hub_after = hub_pid.as_deref().and_then(|pid| procfs::sample(pid).ok());
    window.hub_cpu_cores = hub_before
        .zip(hub_after)
        .map(|(b, a)| a.cpu_ticks.saturating_sub(b.cpu_ticks) as f64 / ticks / secs);
    let acked_after = fleet.counters.records_acked.load(Ordering::Relaxed);
    let requests_after: u64 = hub.requests().iter().sum();
    window.secs = secs;
    window.relay_rss_mib = last.rss_kib as f64 / 1024.0;
    window.relay_hwm_mib = last.hwm_kib as f64 / 1024.0;
    window.relay_threads = last.threads;
    window.relay_fds = procfs::open_fds(&pid)?;
    window.relay_udp_drops = procfs::udp_socket_drops(&pid)?;
    window.sim_udp_drops = procfs::udp_socket_drops("self")?;
    window.relay_cpu_cores = last.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / ticks / secs;
    window.sim_cpu_cores =
        sim_after.cpu_ticks.saturating_sub(sim_before.cpu_ticks) as f64 / ticks / secs;
    window.acked_per_s = acked_after.saturating_sub(acked_before) as f64 / secs;
    window.hub_requests_per_s = requests_after.saturating_sub(requests_before) as f64 / secs;
    Ok(window)
}

/// Kills the relay, starts it again on the same port, and times until every site had a
/// Welcome and every shipping site an Ack from the new process.
fn storm(
    hub: &mut Hub,
    fleet: &Fleet,
    shipping: usize,
    timeout: Duration,
) -> anyhow::Result<Storm> {
    let requests_before = hub.requests();
    let restart_ms = fleet.now_ms();
    let restarted = Instant::now();
    hub.relay.kill_and_restart()?;
    let shipping_back = || {
        fleet.status[..shipping]
            .iter()
            .filter(|s| s.acked_ms.load(Ordering::Relaxed) > restart_ms)
            .count()
    };
    let mut result = Storm::default();
    let deadline = restarted + timeout;
    loop {
        let welcomed = welcomed_since(fleet, restart_ms);
        let shipped = shipping_back();
        let on_old_relay = fleet
            .status
            .iter()
            .filter(|s| {
                s.connected.load(Ordering::Relaxed)
                    && s.welcomed_ms.load(Ordering::Relaxed) <= restart_ms
            })
            .count();
        let idle_welcomed = fleet.status[shipping..]
            .iter()
            .filter(|s| s.welcomed_ms.load(Ordering::Relaxed) > restart_ms)
            .count();
        if result.idle_back_secs.is_none() && idle_welcomed == fleet.status.len() - shipping {
            result.idle_back_secs = Some(restarted.elapsed().as_secs_f64());
        }
        if result.detect_all_secs.is_none() && on_old_relay == 0 {
            result.detect_all_secs = Some(restarted.elapsed().as_secs_f64());
        }
        if result.welcome_all_secs.is_none() && welcomed == fleet.status.len() {
            result.welcome_all_secs = Some(restarted.elapsed().as_secs_f64());
        }
        if result.ship_all_secs.is_none() && shipped == shipping {
            result.ship_all_secs = Some(restarted.elapsed().as_secs_f64());
        }
        result.sites_back = welcomed;
        result.shipping_back = shipped;
        if result.welcome_all_secs.is_some() && result.ship_all_secs.is_some() {
            result.secs = Some(restarted.elapsed().as_secs_f64());
            break;
        }
        hub.check()?;
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let requests_after = hub.requests();
    let by_api = proxy::requests_between(&requests_before, &requests_after);
    result.hub_requests = by_api.iter().map(|(_, n)| n).sum();
    result.hub_requests_by_api = by_api;
    if let Some(pid) = hub.relay.pid() {
        let sample = procfs::sample(&pid.to_string())?;
        result.relay_rss_mib = sample.rss_kib as f64 / 1024.0;
        result.relay_threads = sample.threads;
    }
    Ok(result)
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

/// `relay`'s footprint now, and the sites whose session is with relay `index`.
fn relay_figures(
    relay: &Relay,
    hub_port: u16,
    fleet: &Fleet,
    index: usize,
) -> anyhow::Result<RelayFigures> {
    let pid = relay.pid().context("the relay is not running")?.to_string();
    let sample = procfs::sample(&pid)?;
    let (to_hub, _) = procfs::tcp_established(&pid, hub_port)?;
    Ok(RelayFigures {
        rss_mib: sample.rss_kib as f64 / 1024.0,
        hwm_mib: sample.hwm_kib as f64 / 1024.0,
        threads: sample.threads,
        hub_connections: to_hub,
        sites: fleet
            .status
            .iter()
            .filter(|s| {
                s.connected.load(Ordering::Relaxed) && s.relay.load(Ordering::Relaxed) == index
            })
            .count(),
    })
}

/// Kills the first relay for good and times until every site it held has a session with the
/// second one, and every shipping site among them an Ack from it (a shipping site waits out
/// its fence first, as the agent does); then the second relay's footprint.
fn failover(
    hub: &mut Hub,
    fleet: &Fleet,
    shipping: usize,
    timeout: Duration,
) -> anyhow::Result<Failover> {
    let killed_ms = fleet.now_ms();
    // The killed relay's sites: those whose latest Welcome was its.
    let of_a: Vec<usize> = fleet
        .status
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            s.welcomed_ms.load(Ordering::Relaxed) > 0 && s.relay.load(Ordering::Relaxed) == 0
        })
        .map(|(index, _)| index)
        .collect();
    let requests_before = hub.requests();
    let killed = Instant::now();
    hub.relay.kill()?;
    let second = hub.second.as_ref().context("no second relay")?;
    let b_pid = second
        .pid()
        .context("the second relay is not running")?
        .to_string();
    let mut result = Failover {
        sites: of_a.len(),
        shipping: of_a.iter().filter(|&&i| i < shipping).count(),
        ..Failover::default()
    };
    let mut moved = vec![false; fleet.status.len()];
    let mut shipped = vec![false; fleet.status.len()];
    let deadline = killed + timeout;
    let mut next_sample = Instant::now();
    loop {
        let mut on_a = 0;
        for &i in &of_a {
            let status = &fleet.status[i];
            let welcomed = status.welcomed_ms.load(Ordering::Relaxed);
            let relay = status.relay.load(Ordering::Relaxed);
            let connected = status.connected.load(Ordering::Relaxed);
            if connected && relay == 0 {
                on_a += 1;
            }
            // Sessions come one after the other: a Welcome from the second relay after the
            // kill, and an Ack after that Welcome, are that relay's.
            let on_b = relay == 1 && welcomed > killed_ms;
            if on_b {
                moved[i] = true;
                if status.acked_ms.load(Ordering::Relaxed) > welcomed {
                    shipped[i] = true;
                }
            }
        }
        let elapsed = killed.elapsed().as_secs_f64();
        result.moved = of_a.iter().filter(|&&i| moved[i]).count();
        result.shipped_again = of_a.iter().filter(|&&i| i < shipping && shipped[i]).count();
        let idle_moved = of_a.iter().filter(|&&i| i >= shipping && moved[i]).count();
        if result.detect_secs.is_none() && on_a == 0 {
            result.detect_secs = Some(elapsed);
        }
        if result.idle_move_secs.is_none() && idle_moved == result.sites - result.shipping {
            result.idle_move_secs = Some(elapsed);
        }
        if result.move_secs.is_none() && result.moved == result.sites {
            result.move_secs = Some(elapsed);
        }
        if result.ship_again_secs.is_none() && result.shipped_again == result.shipping {
            result.ship_again_secs = Some(elapsed);
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(1);
            let sample = procfs::sample(&b_pid)?;
            let (to_hub, _) = procfs::tcp_established(&b_pid, hub.port)?;
            result.relay_b_rss_max_mib = result
                .relay_b_rss_max_mib
                .max(sample.rss_kib as f64 / 1024.0);
            result.relay_b_threads_max = result.relay_b_threads_max.max(sample.threads);
            result.relay_b_hub_connections_max = result.relay_b_hub_connections_max.max(to_hub);
        }
        if result.move_secs.is_some() && result.ship_again_secs.is_some() {
            break;
        }
        hub.check()?;
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let requests_after = hub.requests();
    let by_api = proxy::requests_between(&requests_before, &requests_after);
    result.hub_requests = by_api.iter().map(|(_, n)| n).sum();
    result.hub_requests_by_api = by_api;
    let second = hub.second.as_ref().context("no second relay")?;
    result.relay_b = relay_figures(second, hub.port, fleet, 1)?;
    result.relay_b_rss_max_mib = result.relay_b_rss_max_mib.max(result.relay_b.rss_mib);
    result.relay_b_threads_max = result.relay_b_threads_max.max(result.relay_b.threads);
    result.relay_b_hub_connections_max = result
        .relay_b_hub_connections_max
        .max(result.relay_b.hub_connections);
    Ok(result)
}
