//! `scripts/bench`: spoke against a direct mirror and against the physical limit, on the
//! same brokers, records and emulated links, in one run. Prints a table and writes
//! `target/bench/latest.json`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use spoke_bench::{self as bench, Ceiling, Figures, Plan, Profile, Scenario};
use spoke_tests::mix::Mix;
use spoke_wan::Link;

const USAGE: &str = "usage: spoke-bench [--quick] [--records N] [--latency-secs S] \
[--latency-rate R] [--link-secs S] [--mix NAME]... [--link NAME|loopback]... \
[--outage-secs S] [--outage-link NAME] [--outage-mix NAME] [--outage-only] \
[--agent-extra TOML] [--relay-extra TOML] [--json PATH]";

struct Args {
    quick: bool,
    outage_only: bool,
    plan: Plan,
    mixes: Vec<String>,
    links: Vec<String>,
    outage_link: String,
    outage_mix: String,
    /// Appended to spoke's agent and relay configurations, for tuning experiments.
    agent_extra: String,
    relay_extra: String,
    json: PathBuf,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        quick: false,
        outage_only: false,
        plan: Plan {
            records: 50_000,
            latency_secs: 10,
            latency_rate: 1_000.0,
            link_secs: 30.0,
            outage_secs: 300,
        },
        mixes: Vec::new(),
        links: Vec::new(),
        outage_link: "2Mbit-300ms-3%".into(),
        outage_mix: "json-1KiB-edge-plain".into(),
        agent_extra: String::new(),
        relay_extra: String::new(),
        json: PathBuf::from("target/bench/latest.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--quick" => args.quick = true,
            "--outage-only" => args.outage_only = true,
            "--records" => args.plan.records = value("--records")?.parse()?,
            "--latency-secs" => args.plan.latency_secs = value("--latency-secs")?.parse()?,
            "--latency-rate" => args.plan.latency_rate = value("--latency-rate")?.parse()?,
            "--link-secs" => args.plan.link_secs = value("--link-secs")?.parse()?,
            "--outage-secs" => args.plan.outage_secs = value("--outage-secs")?.parse()?,
            "--outage-link" => args.outage_link = value("--outage-link")?,
            "--outage-mix" => args.outage_mix = value("--outage-mix")?,
            "--mix" => args.mixes.push(value("--mix")?),
            "--agent-extra" => args.agent_extra = value("--agent-extra")?,
            "--relay-extra" => args.relay_extra = value("--relay-extra")?,
            "--link" => args.links.push(value("--link")?),
            "--json" => args.json = PathBuf::from(value("--json")?),
            other => anyhow::bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if args.quick {
        // Checks that every part works, loopback and one emulated link, in a few minutes.
        args.plan.records = 2_000;
        args.plan.latency_secs = 2;
        args.plan.link_secs = 2.0;
        // Longer than the QUIC idle timeout (30 s), as a real outage of minutes is: the agent
        // reconnects with a fresh congestion controller (see docs/benchmarks.md on short cuts).
        args.plan.outage_secs = 40;
        if args.mixes.is_empty() {
            args.mixes.push("json-1KiB-edge-plain".into());
        }
        if args.links.is_empty() {
            args.links = vec!["loopback".into(), "20Mbit-100ms-1%".into()];
        }
    }
    if args.links.is_empty() {
        args.links.push("loopback".into());
        args.links
            .extend(bench::profiles().iter().map(|p| p.name.to_owned()));
    }
    Ok(args)
}

fn profile(name: &str) -> anyhow::Result<Option<Profile>> {
    if name == "loopback" {
        return Ok(None);
    }
    let profiles = bench::profiles();
    match profiles.iter().find(|p| p.name == name) {
        Some(p) => Ok(Some(*p)),
        None => {
            let names: Vec<&str> = profiles.iter().map(|p| p.name).collect();
            anyhow::bail!("no link {name}; known: loopback, {}", names.join(", "))
        }
    }
}

fn mix(name: &str) -> anyhow::Result<Mix> {
    bench::all_mixes()
        .into_iter()
        .find(|m| m.name() == name)
        .with_context(|| {
            let names: Vec<String> = bench::all_mixes().iter().map(Mix::name).collect();
            format!("no mix {name}; known: {}", names.join(", "))
        })
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    spoke_tests::process::quiet_logs();
    let mixes: Vec<Mix> = if args.outage_only {
        Vec::new()
    } else if args.mixes.is_empty() {
        bench::all_mixes()
    } else {
        args.mixes
            .iter()
            .map(|m| mix(m))
            .collect::<anyhow::Result<_>>()?
    };
    let links: Vec<(String, Option<Profile>)> = args
        .links
        .iter()
        .map(|l| Ok((l.clone(), profile(l)?)))
        .collect::<anyhow::Result<_>>()?;
    let plan = args.plan;
    let mut results = Vec::new();
    let mut ceilings = serde_json::Map::new();
    print_header();
    for mix in &mixes {
        let scenario_name = mix.name();
        let ceiling = bench::run_ceiling(mix, plan.records)
            .with_context(|| format!("{scenario_name}: the brokers' ceiling"))?;
        println!(
            "{scenario_name}: brokers alone {:.0} records/s, Kafka zstd {:.1} B/record, hub ingest with spoke's provenance headers {:.0} records/s",
            ceiling.brokers_per_s, ceiling.kafka_zstd_bytes, ceiling.hub_with_provenance_per_s
        );
        ceilings.insert(
            scenario_name.clone(),
            serde_json::json!({
                "brokers_per_s": ceiling.brokers_per_s.round(),
                "kafka_zstd_bytes_per_record": (ceiling.kafka_zstd_bytes * 10.0).round() / 10.0,
                "hub_ingest_with_provenance_per_s": ceiling.hub_with_provenance_per_s.round(),
            }),
        );
        for (link_name, profile) in &links {
            let rows = run_pair(mix, &ceiling, profile.as_ref(), &plan, &args)
                .with_context(|| format!("{scenario_name} over {link_name}"))?;
            for (system, figures, baseline, limit) in rows {
                print_row(&scenario_name, link_name, system, &figures, baseline, limit);
                results.push(bench::result_json(
                    &scenario_name,
                    link_name,
                    system,
                    &figures,
                    baseline,
                    limit,
                ));
            }
        }
        save(&args, &plan, &ceilings, &results)?;
    }
    if plan.outage_secs > 0 {
        match run_outage_scenario(&args, &plan) {
            Ok(json) => results.push(json),
            Err(error) => {
                // The rows above are worth keeping: report the failure in the table and JSON.
                println!("outage scenario failed: {error:#}");
                results.push(serde_json::json!({
                    "scenario": format!("outage-{}s-{}", plan.outage_secs, args.outage_mix),
                    "link": args.outage_link,
                    "system": "spoke",
                    "error": format!("{error:#}"),
                }));
            }
        }
    }
    save(&args, &plan, &ceilings, &results)?;
    println!("wrote {}", args.json.display());
    Ok(())
}

/// The link outage and its drain (spoke only: the mirror falls behind a half-loaded link
/// from a plain edge even without an outage). Prints its line, returns its JSON object.
fn run_outage_scenario(args: &Args, plan: &Plan) -> anyhow::Result<serde_json::Value> {
    let mix = mix(&args.outage_mix)?;
    let profile = profile(&args.outage_link)?
        .context("the outage scenario needs an emulated link, not loopback")?;
    let ceiling = bench::run_ceiling(&mix, plan.records)
        .with_context(|| format!("{}: the brokers' ceiling", mix.name()))?;
    let limit = ceiling.limit(Some(&profile.spec));
    let link = Link::start(profile.spec)?;
    // The figures need half the limit; --quick only checks that the scenario works, with a
    // load that a debug build keeps up with.
    let produce_rate = if args.quick {
        (limit / 2.0).min(20.0)
    } else {
        limit / 2.0
    };
    let outage = bench::run_outage(
        &mix,
        &link,
        limit,
        produce_rate,
        Duration::from_secs(plan.outage_secs),
        Duration::from_secs(10),
        &args.agent_extra,
    )?;
    let name = format!("outage-{}s-{}", plan.outage_secs, mix.name());
    println!(
        "{name} over {}: produced {:.0}/s, backlog {} records, reconnect {:.1} s, drain {:.0} records/s ({:.0}% of the limit {:.0}), zero lag (back to the steady {} records) after {:.1} s, longest hub stall during the drain {:.2} s, {} produced during the drain, spool {} B/record, agent RSS {} MiB, {} produced, {} delivered",
        profile.name,
        outage.produce_rate,
        outage.backlog,
        outage.reconnect_s,
        outage.drain_per_s,
        100.0 * outage.drain_per_s / outage.limit_per_s,
        outage.limit_per_s,
        outage.steady_lag,
        outage.time_to_zero_lag_s,
        outage.longest_stall_s,
        outage.produced_during_drain,
        opt(outage.spool_bytes_per_record),
        opt(outage.agent_rss_mib),
        outage.produced,
        outage.delivered,
    );
    Ok(bench::outage_json(&name, profile.name, &outage))
}

/// Writes the report; called after every mix, so an interrupted run keeps what it measured.
fn save(
    args: &Args,
    plan: &Plan,
    ceilings: &serde_json::Map<String, serde_json::Value>,
    results: &[serde_json::Value],
) -> anyhow::Result<()> {
    let report = serde_json::json!({
        "ceilings": ceilings,
        "plan": {
            "records": plan.records,
            "latency_secs": plan.latency_secs,
            "latency_rate": plan.latency_rate,
            "link_secs": plan.link_secs,
            "outage_secs": plan.outage_secs,
            "quick": args.quick,
        },
        "machine": {"cpus": std::thread::available_parallelism().map_or(0, |n| n.get())},
        "results": results,
    });
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", args.json.display()))
}

type Row = (&'static str, Figures, Option<f64>, f64);

/// The limit, the mirror and spoke over one link (or loopback), with a fresh link and fresh
/// brokers for each system.
fn run_pair(
    mix: &Mix,
    ceiling: &Ceiling,
    profile: Option<&Profile>,
    plan: &Plan,
    args: &Args,
) -> anyhow::Result<Vec<Row>> {
    let spec = profile.map(|p| p.spec);
    let limit = ceiling.limit(spec.as_ref());
    let records = match spec {
        Some(_) => plan
            .records
            .min((limit * plan.link_secs) as usize)
            .max(1_000),
        None => plan.records,
    };
    let run = |system: &str| -> anyhow::Result<Figures> {
        let link = spec.map(Link::start).transpose()?;
        let scenario = Scenario {
            mix: *mix,
            link: link.as_ref(),
            records,
            latency_rate: plan.latency_rate.min(limit / 2.0),
            latency_secs: plan.latency_secs,
            agent_extra: &args.agent_extra,
            relay_extra: &args.relay_extra,
        };
        match system {
            "mirror" => bench::run_mirror(&scenario),
            _ => bench::run_spoke(&scenario),
        }
        .with_context(|| system.to_owned())
    };
    let mirror = run("mirror")?;
    let spoke = run("spoke")?;
    let baseline = mirror.records_per_s;
    let limit_row = Figures {
        records_per_s: limit,
        wire_bytes_per_record: Some(ceiling.kafka_zstd_bytes),
        ..Figures::default()
    };
    Ok(vec![
        ("limit", limit_row, None, limit),
        ("mirror", mirror, None, limit),
        ("spoke", spoke, Some(baseline), limit),
    ])
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.1}"))
}

fn print_header() {
    println!(
        "{:<26} {:<17} {:<6} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6}",
        "scenario",
        "link",
        "system",
        "records/s",
        "wire B/r",
        "spool B/r",
        "p50 ms",
        "p99 ms",
        "RSS MiB",
        "idle %",
        "x base",
        "%limit",
        "%pace"
    );
}

fn print_row(
    scenario: &str,
    link: &str,
    system: &str,
    f: &Figures,
    baseline: Option<f64>,
    limit: f64,
) {
    println!(
        "{:<26} {:<17} {:<6} {:>9.0} {:>9} {:>9} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6.0} {:>6}",
        scenario,
        link,
        system,
        f.records_per_s,
        opt(f.wire_bytes_per_record),
        opt(f.spool_bytes_per_record),
        opt(f.p50_ms),
        opt(f.p99_ms),
        opt(f.agent_rss_mib),
        opt(f.agent_idle_cpu_pct),
        baseline.map_or("-".to_owned(), |b| format!("{:.2}", f.records_per_s / b)),
        100.0 * f.records_per_s / limit,
        f.pace_per_s
            .map_or("-".to_owned(), |p| format!("{:.0}", 100.0 * p / limit)),
    );
    if let Some(c) = f.link_packets {
        println!(
            "{:<26} {:<17} {:<6} link: {} packets ({} back), {} dropped at the queue, {} lost, \
             {:.1} B/record offered ({:.1} delivered back)",
            "",
            "",
            "",
            c.packets,
            c.packets_back,
            c.queue_dropped,
            c.lost,
            c.offered_bytes as f64 / f.records.max(1) as f64,
            c.delivered_bytes_back as f64 / f.records.max(1) as f64
        );
    }
}
