use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use spoke_process::logging::LogFormat;
use spoke_relay::{config, pki, server, tls};
use tokio_util::sync::CancellationToken;

/// spoke relay: receives sites' Kafka records over QUIC and produces them into the hub.
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
    /// Run the relay.
    Run {
        #[arg(long, default_value = "/etc/spoke/relay.toml")]
        config: PathBuf,
    },
    /// Validate a configuration and its certificates, connect to the hub as the relay would
    /// (TLS, authentication), print one line per check with its verdict and the fix, then
    /// exit (1 on a failure).
    Check {
        #[arg(long, default_value = "/etc/spoke/relay.toml")]
        config: PathBuf,
        /// Only the configuration and the certificates; connect to nothing.
        #[arg(long)]
        offline: bool,
    },
    /// Every site this relay has seen: connected, last seen, records/s, lag, spool, losses.
    Sites {
        /// The relay's admin endpoint.
        #[arg(long, default_value = "127.0.0.1:9465")]
        admin: String,
        /// Print the raw JSON of /status.
        #[arg(long)]
        json: bool,
    },
    /// Certificates for a demo or a small install.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create a CA and a relay certificate: ca.pem, ca.key, relay.pem, relay.key.
    Init {
        #[arg(long)]
        out: PathBuf,
        /// DNS name or IP address the relay certificate is valid for (repeatable).
        #[arg(long = "name", default_values = ["localhost", "127.0.0.1"])]
        names: Vec<String>,
        /// Validity of the relay certificate (the CA gets ten times as long), e.g. "365d".
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        valid_for: Duration,
    },
    /// Issue a site's client certificate NAME.pem / NAME.key, signed by the CA.
    Issue {
        #[arg(long)]
        site: String,
        #[arg(long)]
        out: PathBuf,
        /// Directory holding ca.pem and ca.key (default: --out).
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// Validity, e.g. "90d" or "12h" for short-lived certificates.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        valid_for: Duration,
    },
}

/// How long `check` waits for a cluster to answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let cli = Cli::parse();
    spoke_process::logging::init(cli.log_format);
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!(
                "spoke-relay: error: {}",
                spoke_process::logging::error_chain(error.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

/// Threads for blocking calls to the hub (see `dispatch`).
const BLOCKING_THREADS: usize = 24;

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => {
            let loaded = config::load(&config)?;
            let (librdkafka, features) = spoke_kafka::security::librdkafka_build();
            tracing::info!(version = env!("CARGO_PKG_VERSION"), %librdkafka, %features, "starting");
            // Blocking work is librdkafka calls that wait for the hub (metadata, watermarks,
            // resume scans, transactions). Tokio's default of 512 threads would let a
            // reconnect storm of thousands of sites start hundreds of them at once; a few
            // dozen keep the hub as busy as it can usefully be, and the rest queue.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .max_blocking_threads(BLOCKING_THREADS)
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                // One pending reload is enough: it reads the file as it is when it runs.
                let (reload_tx, reloads) = tokio::sync::mpsc::channel(1);
                tokio::spawn(handle_signals(shutdown.clone(), reload_tx));
                server::run(loaded, reloads, shutdown).await
            })?;
            Ok(())
        }
        Command::Check { config, offline } => {
            let loaded = config::load(&config)?;
            tls::server_config(&loaded.config.tls, &loaded.deny, &loaded.config.limits)
                .with_context(|| format!("{}: [tls]", config.display()))?;
            println!(
                "{}: ok (listen {}, hub {}, {} site table(s), {} denied certificate(s))",
                config.display(),
                loaded.config.listen,
                loaded.config.hub.bootstrap,
                loaded.config.sites.len(),
                loaded.deny.len()
            );
            if offline {
                return Ok(());
            }
            let verdicts = spoke_relay::check::run(&loaded, CHECK_TIMEOUT);
            for verdict in &verdicts {
                println!("{verdict}");
            }
            let failed = verdicts.iter().filter(|v| !v.ok).count();
            if failed > 0 {
                anyhow::bail!(
                    "{failed} check(s) failed against the hub as configured ([hub] in {})",
                    config.display()
                );
            }
            Ok(())
        }
        Command::Sites { admin, json } => sites(&admin, json),
        Command::Pki { command } => match command {
            PkiCommand::Init {
                out,
                names,
                valid_for,
            } => {
                pki::init(&out, &names, valid_for)?;
                println!(
                    "wrote ca.pem, ca.key, relay.pem, relay.key to {}",
                    out.display()
                );
                Ok(())
            }
            PkiCommand::Issue {
                site,
                out,
                ca_dir,
                valid_for,
            } => {
                let ca_dir = ca_dir.unwrap_or_else(|| out.clone());
                let issued = pki::issue(&ca_dir, &out, &site, valid_for)?;
                println!("wrote {site}.pem, {site}.key to {}", out.display());
                // Worth recording: either string in `tls.deny` refuses this certificate.
                println!("{}\n{}", issued.fingerprint, issued.serial);
                Ok(())
            }
        },
    }
}

fn sites(admin: &str, json: bool) -> anyhow::Result<()> {
    let body = spoke_process::admin_client::http_get(admin, "/status")
        .with_context(|| format!("asking the relay's admin endpoint at {admin}"))?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let status: spoke_relay::admin::RelayStatus =
        serde_json::from_str(&body).context("parsing /status")?;
    println!(
        "relay {} (hub {})",
        status.relay,
        if status.hub_reachable {
            "reachable"
        } else {
            "NOT reachable"
        }
    );
    println!(
        "{:<24} {:<9} {:>13} {:>10} {:>10} {:>20} {:>8}",
        "SITE", "CONNECTED", "LAST SEEN", "RECORDS/S", "LAG", "SPOOL", "LOST"
    );
    let now = spoke_relay::fleet::now_ms();
    for site in &status.sites {
        let ago = Duration::from_secs(now.saturating_sub(site.last_seen_ms) / 1000);
        let spool = if site.spool_max_bytes > 0 {
            format!(
                "{:.1}% of {}",
                100.0 * site.spool_bytes as f64 / site.spool_max_bytes as f64,
                bytesize::ByteSize::b(site.spool_max_bytes)
            )
        } else {
            "-".to_owned()
        };
        println!(
            "{:<24} {:<9} {:>13} {:>10} {:>10} {:>20} {:>8}",
            site.site,
            if site.connected { "yes" } else { "no" },
            format!("{} ago", humantime::format_duration(ago)),
            site.records_per_s,
            site.lag_records,
            spool,
            site.lost_records
        );
    }
    Ok(())
}

/// SIGTERM/SIGINT stop the relay; SIGHUP asks it to re-read the file (see `server::run`).
async fn handle_signals(shutdown: CancellationToken, reload: tokio::sync::mpsc::Sender<()>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the relay with SIGKILL");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // Full means a reload is already queued, and it will read the newest file.
                let _ = reload.try_send(());
            }
        }
    }
    tracing::info!("signal received, shutting down");
    shutdown.cancel();
}
