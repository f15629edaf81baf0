use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use rdkafka::consumer::BaseConsumer;
use spoke_agent::config::Loaded;
use spoke_agent::progress::AgentStatus;
use spoke_agent::{config, tail, tls};
use spoke_process::logging::LogFormat;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// spoke agent: replicates local Kafka topics to the hub through a durable spool over QUIC.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent. SIGHUP reloads include/exclude and the [ship] and [spool] limits.
    Run {
        #[arg(long, default_value = "/etc/spoke/agent.toml")]
        config: PathBuf,
    },
    /// Validate the configuration, certificates and topic selection against the local
    /// broker, connecting as the agent would (TLS, authentication: a failure is printed with
    /// its fix); print the resolved topics. Exits 1 on any error, including an `include`
    /// that matches no topic.
    Check {
        #[arg(long, default_value = "/etc/spoke/agent.toml")]
        config: PathBuf,
        /// Only the configuration and the certificates; connect to nothing.
        #[arg(long)]
        offline: bool,
    },
    /// Print a running agent's view: relay session, lag, spool, losses, time to drain.
    Status {
        /// The agent's admin endpoint.
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin: String,
        /// Print the raw JSON of /status.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // Before anything else: no thread may exist yet.
    let malloc = spoke_agent::malloc::tune();
    let cli = Cli::parse();
    spoke_process::logging::init(cli.log_format);
    match malloc {
        spoke_agent::malloc::Tuning::Refused(setting) => {
            tracing::warn!(
                setting,
                "glibc refused an allocator setting; memory use may be higher"
            );
        }
        other => tracing::debug!(malloc = ?other, "glibc allocator"),
    }
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!(
                "spoke-agent: error: {}",
                spoke_process::logging::error_chain(error.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => {
            let loaded = config::load(&config)?;
            let (librdkafka, features) = spoke_kafka::security::librdkafka_build();
            tracing::info!(version = env!("CARGO_PKG_VERSION"), %librdkafka, %features, "starting");
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                let (live_tx, live) = watch::channel(Arc::new(loaded));
                tokio::spawn(handle_signals(shutdown.clone(), config, live_tx));
                spoke_agent::run(live, shutdown).await
            })?;
            Ok(())
        }
        Command::Check { config, offline } => check(&config, offline),
        Command::Status { admin, json } => status(&admin, json),
    }
}

/// How long `check` waits for the local cluster to answer.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn check(path: &Path, offline: bool) -> anyhow::Result<()> {
    let loaded = config::load(path)?;
    let quic = tls::client_config(&loaded.config.relay, Default::default())
        .with_context(|| format!("{}: [relay] certificates", path.display()))?;
    if offline {
        println!("{}: ok (configuration and certificates)", path.display());
        return Ok(());
    }
    let source = &loaded.config.source;
    let verdict = spoke_kafka::check::check_cluster(
        "local cluster",
        &source.bootstrap,
        &loaded.source_kafka,
        source.tls.as_ref(),
        CHECK_TIMEOUT,
    );
    println!("{verdict}");
    if !verdict.ok {
        bail!(
            "{}: the local cluster at {} is not reachable as configured (source.bootstrap)",
            path.display(),
            source.bootstrap
        );
    }
    let consumer: BaseConsumer = tail::consumer_config(&loaded)
        .create()
        .context("creating the local Kafka client")?;
    let topics = tail::selected_topics(&consumer, &loaded.selector).with_context(|| {
        format!(
            "reading topics from the local broker {} (source.bootstrap)",
            source.bootstrap
        )
    })?;
    if topics.is_empty() {
        bail!(
            "{}: source.include {:?} (minus exclude {:?}) matches no topic on {}: nothing would be replicated",
            path.display(),
            source.include,
            source.exclude,
            source.bootstrap
        );
    }
    println!(
        "{}: ok; replicating {} topic(s):",
        path.display(),
        topics.len()
    );
    for (topic, partitions) in topics {
        println!("  {topic} ({partitions} partitions)");
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let mut relays_failed = 0;
    for endpoint in &loaded.endpoints {
        let verdict = runtime.block_on(spoke_agent::check::relay(endpoint, &quic));
        println!("{verdict}");
        relays_failed += usize::from(!verdict.ok);
    }
    if relays_failed > 0 {
        bail!(
            "{}: {relays_failed} of {} relay(s) refused or did not answer ([relay])",
            path.display(),
            loaded.endpoints.len()
        );
    }
    Ok(())
}

fn status(admin: &str, json: bool) -> anyhow::Result<()> {
    let body = spoke_process::admin_client::http_get(admin, "/status")
        .with_context(|| format!("asking the agent's admin endpoint at {admin}"))?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let s: AgentStatus = serde_json::from_str(&body).context("parsing /status")?;
    println!("site              {}", s.site);
    println!(
        "relay             {}",
        if s.relay_connected {
            "connected"
        } else {
            "NOT connected"
        }
    );
    println!(
        "spool             {} of {} ({:.1}%), {} records, oldest unacked {:.0}s",
        bytesize::ByteSize::b(s.spool_bytes),
        bytesize::ByteSize::b(s.spool_max_bytes),
        100.0 * s.spool_bytes as f64 / s.spool_max_bytes.max(1) as f64,
        s.spool_records,
        s.oldest_unacked_seconds
    );
    println!(
        "shipping          {:.0} records/s, {} wire bytes sent",
        s.records_per_s, s.wire_bytes
    );
    let drain = match s.drain_seconds {
        Some(seconds) => {
            humantime::format_duration(std::time::Duration::from_secs(seconds.ceil() as u64))
                .to_string()
        }
        None if s.backlog_records == 0 => "0s".to_owned(),
        None => "unknown (nothing acknowledged recently)".to_owned(),
    };
    println!(
        "backlog           {} records, drains in {drain}",
        s.backlog_records
    );
    println!(
        "lost              {} {:?}",
        s.records_lost, s.lost_by_reason
    );
    println!();
    println!(
        "{:<32} {:>9} {:>14} {:>14} {:>10}",
        "TOPIC", "PARTITION", "HIGH WATERMARK", "IN HUB UP TO", "LAG"
    );
    for p in &s.partitions {
        println!(
            "{:<32} {:>9} {:>14} {:>14} {:>10}",
            p.topic, p.partition, p.high_watermark, p.acked_offset, p.lag
        );
    }
    Ok(())
}

/// SIGTERM/SIGINT stop the agent; SIGHUP reloads the configuration file. A file that no longer
/// validates is refused and the running configuration kept.
async fn handle_signals(
    shutdown: CancellationToken,
    path: PathBuf,
    live: watch::Sender<Arc<Loaded>>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match config::load(&path) {
                Ok(loaded) => {
                    let current = live.borrow().clone();
                    for field in config::restart_required(&current.config, &loaded.config) {
                        tracing::warn!(field, "changed in the file but needs a restart to take effect");
                    }
                    tracing::info!(config = %path.display(), "SIGHUP: reloading configuration");
                    live.send_replace(Arc::new(loaded));
                }
                Err(error) => tracing::error!(%error, "SIGHUP: configuration refused; keeping the running one"),
            },
        }
    }
    tracing::info!("signal received, shutting down");
    shutdown.cancel();
}
