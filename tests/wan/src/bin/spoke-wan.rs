//! The WAN emulator by hand, and the transport benchmark that runs over it.
//!
//!   spoke-wan link --rate-mbit 20 --delay 50ms --loss-pct 1
//!       two namespaces joined by an emulated link until Ctrl-C; run programs inside with
//!       `ip netns exec <name> ...` (the names are printed).
//!   spoke-wan bench [--profile NAME]... [--congestion NAME]... [--windows NAME]...
//!                   [--warmup 4s] [--measure 12s] [--json PATH]
//!       bulk throughput over the link profiles: TCP, and QUIC with quinn's default
//!       windows, bandwidth-delay sized windows and spoke's own, under Cubic, quinn's BBR and
//!       spoke's BDP window; with the share of packets the bottleneck queue dropped.
//!
//! Needs root and /dev/net/tun. The namespaces are deleted on exit, Ctrl-C or SIGTERM.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Serialize;
use spoke_wan::bench::{self, Congestion, QuicCase, Windows};
use spoke_wan::{Link, LinkSpec};

#[derive(Debug, Parser)]
#[command(
    name = "spoke-wan",
    about = "Userspace WAN link emulator and transport benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a link and keep it up until interrupted.
    Link {
        /// Bottleneck rate; 0 for unlimited.
        #[arg(long, default_value_t = 20.0)]
        rate_mbit: f64,
        /// One-way delay (the round trip is twice this).
        #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
        delay: Duration,
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        jitter: Duration,
        #[arg(long, default_value_t = 0.0)]
        loss_pct: f64,
        /// Bottleneck buffer in time at the link rate; default one bandwidth-delay product.
        #[arg(long, value_parser = humantime::parse_duration)]
        queue: Option<Duration>,
    },
    /// Measure bulk throughput over the link profiles.
    Bench {
        /// Profiles to run (default: all): fast, medium, slow.
        #[arg(long)]
        profile: Vec<String>,
        /// Congestion controllers to run (default: all): cubic, bbr (TCP's and quinn's),
        /// bdp-window (spoke's; QUIC only).
        #[arg(long)]
        congestion: Vec<String>,
        /// QUIC window sizings to run (default: all): quinn, bdp, bdp2, spoke. TCP runs
        /// unless this is given.
        #[arg(long)]
        windows: Vec<String>,
        /// Time from the first byte before measuring (slow start, window growth).
        #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
        measure: Duration,
        /// Also write the results here as JSON.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
}

/// The link profiles of issue 6; delays are one-way.
const PROFILES: [(&str, u64, u64, f64); 3] = [
    ("fast", 100_000_000, 50, 0.001),
    ("medium", 20_000_000, 100, 0.01),
    ("slow", 2_000_000, 300, 0.03),
];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        // On a signal the command's future is dropped, and with it any Link: namespaces go.
        tokio::select! {
            result = run(cli.command) => result,
            signal = shutdown_signal() => {
                signal?;
                eprintln!("interrupted; links removed");
                Ok(())
            }
        }
    })
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for Ctrl-C"),
        _ = term.recv() => Ok(()),
    }
}

async fn run(command: Cmd) -> anyhow::Result<()> {
    match command {
        Cmd::Link {
            rate_mbit,
            delay,
            jitter,
            loss_pct,
            queue,
        } => {
            let mut spec = LinkSpec::new((rate_mbit * 1e6) as u64, delay, loss_pct / 100.0);
            spec.jitter = jitter;
            if let Some(queue) = queue {
                spec.queue = queue;
            }
            let link = Link::start(spec).context("starting the link")?;
            println!(
                "edge: namespace {} address {}\nhub:  namespace {} address {}\n{spec:?}\n\
                 e.g. ip netns exec {} ping {}; Ctrl-C to stop",
                link.edge().name(),
                link.edge().addr(),
                link.hub().name(),
                link.hub().addr(),
                link.edge().name(),
                link.hub().addr(),
            );
            // Held until the signal drops this future.
            let _link = link;
            std::future::pending().await
        }
        Cmd::Bench {
            profile,
            congestion,
            windows,
            warmup,
            measure,
            json,
        } => {
            let wanted = Wanted {
                profiles: profile,
                congestion,
                windows,
            };
            let results = bench_profiles(&wanted, warmup, measure).await?;
            if let Some(path) = json {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let text =
                    serde_json::to_string_pretty(&serde_json::json!({ "results": results }))?;
                std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
    }
}

#[derive(Debug, Serialize)]
struct Row {
    link: String,
    transport: String,
    windows: String,
    congestion: String,
    streams: usize,
    goodput_mbit: f64,
    pct_of_rate: f64,
    wire_mbit: f64,
    queue_drop_pct: f64,
}

/// Which cases to run; an empty list means all of that kind.
struct Wanted {
    profiles: Vec<String>,
    congestion: Vec<String>,
    windows: Vec<String>,
}

impl Wanted {
    fn check(&self) -> anyhow::Result<()> {
        let known: [(&[String], &[&str]); 3] = [
            (&self.profiles, &["fast", "medium", "slow"]),
            (&self.congestion, &["cubic", "bbr", "bdp-window"]),
            (&self.windows, &["quinn", "bdp", "bdp2", "spoke"]),
        ];
        for (given, names) in known {
            if let Some(unknown) = given.iter().find(|g| !names.contains(&g.as_str())) {
                anyhow::bail!("unknown choice {unknown}; known: {}", names.join(", "));
            }
        }
        Ok(())
    }

    fn includes(list: &[String], name: &str) -> bool {
        list.is_empty() || list.iter().any(|w| w == name)
    }
}

fn congestion_name(congestion: Congestion) -> &'static str {
    match congestion {
        Congestion::Cubic => "cubic",
        Congestion::Bbr => "bbr",
        Congestion::BdpWindow => "bdp-window",
    }
}

async fn bench_profiles(
    wanted: &Wanted,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Vec<Row>> {
    wanted.check()?;
    let mut rows = Vec::new();
    println!("| link | transport | windows | congestion | streams | goodput Mbit/s | % of rate | wire Mbit/s | queue drops |");
    println!("|---|---|---|---|---|---:|---:|---:|---:|");
    for (name, rate_bps, delay_ms, loss) in PROFILES {
        if !Wanted::includes(&wanted.profiles, name) {
            continue;
        }
        let spec = LinkSpec::new(rate_bps, Duration::from_millis(delay_ms), loss);
        let label = format!(
            "{} Mbit/s, {} ms RTT, {}% loss",
            rate_bps / 1_000_000,
            delay_ms * 2,
            loss * 100.0
        );
        let mut cases = Vec::new();
        for congestion in ["cubic", "bbr"] {
            if !wanted.windows.is_empty() || !Wanted::includes(&wanted.congestion, congestion) {
                continue;
            }
            for streams in [1, 4] {
                cases.push(Case::Tcp(congestion, streams));
            }
        }
        for windows in [Windows::Quinn, Windows::Bdp, Windows::Bdp2, Windows::Spoke] {
            if !Wanted::includes(&wanted.windows, &format!("{windows:?}").to_lowercase()) {
                continue;
            }
            for congestion in [Congestion::Cubic, Congestion::Bbr, Congestion::BdpWindow] {
                if !Wanted::includes(&wanted.congestion, congestion_name(congestion)) {
                    continue;
                }
                for streams in [1, 4] {
                    cases.push(Case::Quic(QuicCase {
                        windows,
                        congestion,
                        streams,
                    }));
                }
            }
        }
        for case in cases {
            // A fresh link per run: no queue or counters carried over from the last one.
            let link = Link::start(spec).context("starting the link")?;
            let (result, row) = match case {
                Case::Tcp(congestion, streams) => (
                    bench::tcp_bulk(&link, congestion, streams, warmup, measure).await?,
                    ("tcp", "kernel".to_owned(), congestion.to_owned(), streams),
                ),
                Case::Quic(quic) => (
                    bench::quic_bulk(&link, quic, warmup, measure)
                        .await
                        .with_context(|| format!("{label}: {quic:?}"))?,
                    (
                        "quic",
                        format!("{:?}", quic.windows).to_lowercase(),
                        congestion_name(quic.congestion).to_owned(),
                        quic.streams,
                    ),
                ),
            };
            let (transport, windows, congestion, streams) = row;
            drop(link);
            let row = Row {
                link: label.clone(),
                transport: transport.to_owned(),
                windows,
                congestion,
                streams,
                goodput_mbit: result.goodput_bps / 1e6,
                pct_of_rate: result.goodput_bps / rate_bps as f64 * 100.0,
                wire_mbit: result.wire_bps / 1e6,
                queue_drop_pct: result.queue_drop_ratio * 100.0,
            };
            println!(
                "| {} | {} | {} | {} | {} | {:.2} | {:.0}% | {:.2} | {:.1}% |",
                row.link,
                row.transport,
                row.windows,
                row.congestion,
                row.streams,
                row.goodput_mbit,
                row.pct_of_rate,
                row.wire_mbit,
                row.queue_drop_pct
            );
            rows.push(row);
        }
    }
    Ok(rows)
}

#[derive(Debug, Clone, Copy)]
enum Case {
    /// Kernel TCP with this congestion control and this many parallel connections.
    Tcp(&'static str, usize),
    Quic(QuicCase),
}
