//! `scripts/bench`: spoke against a direct mirror and against the physical limit, on the
//! same brokers and records, in one run. Prints a table and writes `target/bench/latest.json`.
//!
//! usage: spoke-bench [--quick] [--records N] [--latency-secs S] [--mix NAME]... [--json PATH]

use std::path::PathBuf;

use anyhow::Context;
use spoke_tests::bench::{self, Figures, Mix, Plan};

struct Args {
    quick: bool,
    plan: Plan,
    mixes: Vec<String>,
    json: PathBuf,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        quick: false,
        plan: Plan {
            records: 50_000,
            latency_secs: 10,
        },
        mixes: Vec::new(),
        json: PathBuf::from("target/bench/latest.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--records" => args.plan.records = value("--records")?.parse()?,
            "--latency-secs" => args.plan.latency_secs = value("--latency-secs")?.parse()?,
            "--mix" => args.mixes.push(value("--mix")?),
            "--json" => args.json = PathBuf::from(value("--json")?),
            other => anyhow::bail!(
                "unknown argument {other}\nusage: spoke-bench [--quick] [--records N] [--latency-secs S] [--mix NAME]... [--json PATH]"
            ),
        }
    }
    if args.quick {
        args.plan = Plan {
            records: 2_000,
            latency_secs: 2,
        };
        if args.mixes.is_empty() {
            args.mixes.push("json-1KiB-edge-plain".into());
        }
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    spoke_tests::process::quiet_logs();
    let mixes: Vec<Mix> = bench::all_mixes()
        .into_iter()
        .filter(|m| args.mixes.is_empty() || args.mixes.contains(&m.name()))
        .collect();
    if mixes.is_empty() {
        let names: Vec<String> = bench::all_mixes().iter().map(Mix::name).collect();
        anyhow::bail!("no mix matches; known: {}", names.join(", "));
    }
    let link = "loopback";
    let mut results = Vec::new();
    let mut provenance_rates = serde_json::Map::new();
    println!(
        "{:<28} {:<9} {:<7} {:>10} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7} {:>7}",
        "scenario",
        "link",
        "system",
        "records/s",
        "wire B/r",
        "spool B/r",
        "p50 ms",
        "p99 ms",
        "RSS MiB",
        "x base",
        "% limit"
    );
    for mix in &mixes {
        let scenario = mix.name();
        let (limit, with_provenance) =
            bench::run_limit(mix, &args.plan).with_context(|| format!("{scenario}: limit"))?;
        let mirror =
            bench::run_mirror(mix, &args.plan).with_context(|| format!("{scenario}: mirror"))?;
        let spoke =
            bench::run_spoke(mix, &args.plan).with_context(|| format!("{scenario}: spoke"))?;
        provenance_rates.insert(scenario.clone(), serde_json::json!(with_provenance.round()));
        println!(
            "{scenario:<28} hub ingest with spoke's provenance headers, alone: {with_provenance:.0} records/s"
        );
        for (system, figures, baseline) in [
            ("limit", &limit, None),
            ("mirror", &mirror, None),
            ("spoke", &spoke, Some(mirror.records_per_s)),
        ] {
            print_row(
                &scenario,
                link,
                system,
                figures,
                baseline,
                limit.records_per_s,
            );
            results.push(bench::result_json(
                &scenario,
                link,
                system,
                figures,
                baseline,
                limit.records_per_s,
            ));
        }
    }
    let report = serde_json::json!({
        "hub_ingest_with_provenance_per_s": provenance_rates,
        "plan": {"records": args.plan.records, "latency_secs": args.plan.latency_secs, "quick": args.quick},
        "machine": {"cpus": std::thread::available_parallelism().map_or(0, |n| n.get())},
        "results": results,
    });
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("wrote {}", args.json.display());
    Ok(())
}

fn print_row(
    scenario: &str,
    link: &str,
    system: &str,
    f: &Figures,
    baseline: Option<f64>,
    limit: f64,
) {
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    println!(
        "{:<28} {:<9} {:<7} {:>10.0} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7} {:>7.0}",
        scenario,
        link,
        system,
        f.records_per_s,
        opt(f.wire_bytes_per_record),
        opt(f.spool_bytes_per_record),
        opt(f.p50_ms),
        opt(f.p99_ms),
        opt(f.agent_rss_mib),
        baseline.map_or("-".to_owned(), |b| format!("{:.2}", f.records_per_s / b)),
        100.0 * f.records_per_s / limit,
    );
}
