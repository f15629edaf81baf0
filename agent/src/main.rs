use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use rdkafka::consumer::BaseConsumer;
use spoke_agent::{config, tail, tls};
use tokio_util::sync::CancellationToken;

/// spoke agent: replicates local Kafka topics to the hub through a durable spool over QUIC.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        #[arg(long, default_value = "/etc/spoke/agent.toml")]
        config: PathBuf,
    },
    /// Validate the configuration, certificates and topic selection against the local
    /// broker; print the resolved topics. Exits 1 on any error, including an `include` that
    /// matches no topic.
    Check {
        #[arg(long, default_value = "/etc/spoke/agent.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("spoke-agent: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => {
            let loaded = config::load(&config)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(stop_on_signal(shutdown.clone()));
                spoke_agent::run(loaded, shutdown).await
            })?;
            Ok(())
        }
        Command::Check { config } => check(&config),
    }
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let loaded = config::load(path)?;
    tls::client_config(&loaded.config.relay)
        .with_context(|| format!("{}: [relay] certificates", path.display()))?;
    let consumer: BaseConsumer = tail::consumer_config(&loaded)
        .create()
        .context("creating the local Kafka client")?;
    let source = &loaded.config.source;
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
    Ok(())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPOKE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("signal received, shutting down");
    shutdown.cancel();
}
