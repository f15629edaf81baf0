//! `scripts/fleet`: simulated sites against one real relay (or two) and hub; prints one line per run
//! and writes the figures as JSON (`target/fleet/latest.json`). Exits 1 when the hub does not
//! hold exactly what the relay confirmed (lost, duplicated, corrupt or unknown records) or
//! could not be read back, 2 when a phase failed or timed out.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde_json::json;
use spoke_sim::relay::RelaySetup;
use spoke_sim::{run_fleet, FleetOptions, FleetReport};

#[derive(Debug, Parser)]
#[command(
    name = "spoke-sim",
    about = "A fleet of simulated sites against one real spoke-relay and a tansu hub"
)]
struct Args {
    /// Sites connected to the relay.
    #[arg(long, default_value_t = 100)]
    sites: usize,
    /// Sites shipping records: a number, or a share of the sites such as `1%` (at least one
    /// site when the share is above zero).
    #[arg(long, default_value = "1%")]
    shipping: String,
    /// Of the shipping sites, this many ship as fast as the window allows.
    #[arg(long, default_value_t = 0)]
    heavy: usize,
    /// Seconds of steady state measured.
    #[arg(long, default_value_t = 20)]
    steady_secs: u64,
    #[arg(long, default_value_t = 5)]
    warmup_secs: u64,
    /// Seconds measured with shipping paused (what the idle fleet costs); 0 skips.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Seconds the sites may take to get their last records confirmed after the stop.
    #[arg(long, default_value_t = 60)]
    drain_secs: u64,
    /// Seconds connecting every site may take (default: 60 plus 10 ms per site).
    #[arg(long)]
    connect_timeout_secs: Option<u64>,
    /// After the steady state, SIGKILL the relay, start it again on the same port, and time
    /// until every site is back and every shipping site has an Ack.
    #[arg(long)]
    storm: bool,
    /// How long the storm, or the failover, may take.
    #[arg(long, default_value_t = 300)]
    storm_timeout_secs: u64,
    /// Relays (1 or 2), alike but for their ports, each with `[sites."*"]`. Every site knows
    /// both addresses (the agent's relay.endpoints): half start on the first relay, half on the
    /// second, and a site whose session fails moves on to the other one.
    #[arg(long, default_value_t = 1)]
    relays: usize,
    /// Issue 23's failover, with two relays (implies --relays 2): after the steady state,
    /// SIGKILL the first relay and do not start it again; time until its sites hold sessions
    /// with the second one (shipping sites wait out --fence-delay first) and its shipping
    /// sites have an Ack from it, with the second relay's footprint then; every record is
    /// verified at the end as in every run.
    #[arg(long)]
    failover: bool,
    /// One run per fleet size, e.g. `100,1000,10000`, each with its own relay and hub.
    #[arg(long, value_delimiter = ',')]
    curve: Vec<usize>,
    /// One site shipping as fast as it can, then `--throughput-sites` doing the same.
    #[arg(long)]
    throughput: bool,
    #[arg(long, default_value_t = 1000)]
    throughput_sites: usize,
    /// A trickling site's pace: one batch per interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    trickle_interval: Duration,
    #[arg(long, default_value_t = 10)]
    batch_records: u32,
    #[arg(long, default_value_t = 200)]
    heavy_batch_records: u32,
    #[arg(long, default_value_t = 200)]
    record_bytes: usize,
    /// Partitions of the source topic each shipping site ships.
    #[arg(long, default_value_t = 1)]
    partitions: i32,
    /// Partitions an idle site asks resume points for in its Hello.
    #[arg(long, default_value_t = 0)]
    idle_partitions: i32,
    /// Batches in flight per site (the agent's ship.window).
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Data streams per shipping site (the agent's ship.streams).
    #[arg(long, default_value_t = 4)]
    streams: u32,
    /// The agents' relay.fence_delay: after a relay restart (or a failover) a site that
    /// shipped waits this long before shipping to the new relay process.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    fence_delay: Duration,
    /// The relay's hub.topic; `{topic}` puts every site into one hub topic.
    #[arg(long, default_value = "{site}.{topic}")]
    hub_topic: String,
    /// Handshakes the simulator runs at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Sites per client UDP socket.
    #[arg(long, default_value_t = 500)]
    sites_per_endpoint: usize,
    /// Worker threads of the simulator's runtime.
    #[arg(long, default_value_t = 2)]
    worker_threads: usize,
    /// Connect the relay to the broker directly (no request counting).
    #[arg(long)]
    direct_hub: bool,
    /// TOML lines inside the relay's [hub] table.
    #[arg(long, default_value = "")]
    relay_hub_extra: String,
    /// TOML lines inside the relay's [limits] table.
    #[arg(long, default_value = "")]
    relay_limits: String,
    /// TOML appended to the relay's configuration.
    #[arg(long, default_value = "")]
    relay_extra: String,
    /// Kill the relay and fail the run past this many relay threads (0: no cap). A relay
    /// with threads per site would otherwise use up the machine's process ids.
    #[arg(long, default_value_t = 10_000)]
    relay_max_threads: u64,
    /// Kill the relay and fail the run past this resident memory (MiB; 0: no cap).
    #[arg(long, default_value_t = 8192)]
    relay_max_rss_mib: u64,
    /// Keep each run's directory (hub database, relay config and log).
    #[arg(long)]
    keep: bool,
    #[arg(long, default_value = "target/fleet/latest.json")]
    json: PathBuf,
}

fn shipping_for(spec: &str, sites: usize) -> anyhow::Result<usize> {
    match spec.strip_suffix('%') {
        Some(pct) => {
            let pct: f64 = pct.parse().with_context(|| format!("--shipping {spec}"))?;
            let n = (sites as f64 * pct / 100.0).round() as usize;
            Ok(if pct > 0.0 { n.max(1) } else { 0 }.min(sites))
        }
        None => Ok(spec
            .parse::<usize>()
            .with_context(|| format!("--shipping {spec}"))?
            .min(sites)),
    }
}

fn options(args: &Args, sites: usize) -> anyhow::Result<FleetOptions> {
    Ok(FleetOptions {
        label: if args.failover {
            "fleet-failover"
        } else {
            "fleet"
        }
        .into(),
        sites,
        shipping: shipping_for(&args.shipping, sites)?,
        heavy: args.heavy,
        warmup: Duration::from_secs(args.warmup_secs),
        steady: Duration::from_secs(args.steady_secs),
        idle_window: Duration::from_secs(args.idle_secs),
        drain: Duration::from_secs(args.drain_secs),
        connect_timeout: args.connect_timeout_secs.map(Duration::from_secs),
        storm: args.storm,
        storm_timeout: Duration::from_secs(args.storm_timeout_secs),
        relays: if args.failover {
            args.relays.max(2)
        } else {
            args.relays
        },
        failover: args.failover,
        trickle_interval: args.trickle_interval,
        batch_records: args.batch_records,
        heavy_batch_records: args.heavy_batch_records,
        record_bytes: args.record_bytes,
        partitions: args.partitions,
        idle_partitions: args.idle_partitions,
        window: args.window,
        window_bytes: 16 << 20,
        streams: args.streams,
        fence_delay: args.fence_delay,
        hub_topic: args.hub_topic.clone(),
        connect_concurrency: args.connect_concurrency,
        sites_per_endpoint: args.sites_per_endpoint,
        worker_threads: args.worker_threads,
        direct_hub: args.direct_hub,
        relay: RelaySetup {
            hub_extra: args.relay_hub_extra.clone(),
            limits_extra: args.relay_limits.clone(),
            extra: args.relay_extra.clone(),
            max_threads: args.relay_max_threads,
            max_rss_mib: args.relay_max_rss_mib,
        },
        keep_dir: args.keep,
        verbose: true,
    })
}

/// Runs one fleet and prints its line; a run that could not be set up or verified is a
/// failure line, and the other runs go on.
fn one(options: &FleetOptions) -> Option<FleetReport> {
    match run_fleet(options) {
        Ok(report) => {
            println!("{}", report.line());
            for failure in &report.failures {
                println!("  failure: {}", failure.replace('\n', "\n    "));
            }
            if !report.exactly_once() {
                println!("  lost examples: {:?}", report.verdict.lost_examples);
            }
            Some(report)
        }
        Err(error) => {
            println!(
                "{} sites={} shipping={} FAILED: {error:#}",
                options.label, options.sites, options.shipping
            );
            None
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The relay's log is in the run directory (--keep); dumping it on every exit would bury
    // the figures.
    spoke_tests::process::quiet_logs();
    let mut runs: Vec<Option<FleetReport>> = Vec::new();
    let mut summary = json!(null);
    if args.throughput {
        let mut one_site = options(&args, 1)?;
        one_site.label = "throughput-one".into();
        one_site.shipping = 1;
        one_site.heavy = 1;
        one_site.idle_window = Duration::ZERO;
        let mut many = options(&args, args.throughput_sites)?;
        many.label = "throughput-many".into();
        many.shipping = args.throughput_sites;
        many.heavy = args.throughput_sites;
        many.idle_window = Duration::ZERO;
        let alone = one(&one_site);
        let together = one(&many);
        let rate = |r: &Option<FleetReport>| {
            r.as_ref()
                .and_then(|r| r.steady.as_ref())
                .map(|w| w.acked_per_s)
        };
        if let (Some(alone), Some(together)) = (rate(&alone), rate(&together)) {
            let ratio = together / alone.max(f64::MIN_POSITIVE);
            println!(
                "throughput one_site_records_per_s={alone:.0} sites={} aggregate_records_per_s={together:.0} ratio={ratio:.2}",
                args.throughput_sites
            );
            summary = json!({
                "one_site_records_per_s": alone,
                "sites": args.throughput_sites,
                "aggregate_records_per_s": together,
                "ratio": ratio,
            });
        }
        runs.push(alone);
        runs.push(together);
    } else if !args.curve.is_empty() {
        for &sites in &args.curve {
            runs.push(one(&options(&args, sites)?));
        }
    } else {
        runs.push(one(&options(&args, args.sites)?));
    }
    let json = json!({
        "runs": runs.iter().map(|r| r.as_ref().map(FleetReport::json)).collect::<Vec<_>>(),
        "throughput": summary,
    });
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    eprintln!("figures written to {}", args.json.display());
    let reports: Vec<&FleetReport> = runs.iter().flatten().collect();
    if reports.iter().any(|r| !r.exactly_once()) {
        std::process::exit(1);
    }
    if reports.len() < runs.len() || reports.iter().any(|r| !r.failures.is_empty()) {
        std::process::exit(2);
    }
    Ok(())
}
