//! spoke-agent: runs beside an edge Kafka cluster and moves the selected topics to a relay.
//!
//! Data path, one module each: [`tail`] reads local partitions with `assign()` → [`spool`]
//! keeps compressed chunks and source positions durable in sled → [`ship`] sends them over
//! QUIC ([`tls`]; frames over streams in spoke-transport) and frees them when the relay acknowledged them in the hub.
//! [`config`] is the agent.toml contract, [`select`] the include/exclude rules.

pub mod admin;
pub mod check;
pub mod config;
pub mod dictionary;
pub mod fence;
pub mod malloc;
pub mod progress;
pub mod select;
pub mod ship;
pub mod spool;
pub mod tail;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::Loaded;
use crate::progress::Progress;
use crate::spool::{SledSpool, Spool};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("spool at {path}: {source}")]
    Spool {
        path: std::path::PathBuf,
        source: spool::SpoolError,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("tailer: {0}")]
    Tail(#[from] tail::TailError),
    #[error("shipper: {0}")]
    Ship(#[from] ship::ShipError),
    #[error("admin endpoint cannot listen on {addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("tailer thread panicked")]
    TailPanicked,
    #[error("shipper task panicked")]
    ShipPanicked,
    #[error("cannot start the tailer thread: {0}")]
    Thread(std::io::Error),
}

/// Runs the agent until `shutdown` is cancelled, then stops in drain order: stop reading and
/// spool what was read, finish in-flight batches, close the QUIC session, flush the spool.
pub async fn run(
    live: watch::Receiver<Arc<Loaded>>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let loaded = live.borrow().clone();
    let spool_path = loaded.config.spool.path.clone();
    let spool_err = |source| AgentError::Spool {
        path: spool_path.clone(),
        source,
    };
    let progress = Arc::new(Progress::default());
    let client_config = tls::client_config(&loaded.config.relay, progress.link_limited.clone())?;
    let spool: Arc<dyn Spool> = Arc::new(SledSpool::open(&spool_path).map_err(spool_err)?);
    progress.unsettled_since_start(spool.positions().map_err(spool_err)?);
    let stats = spool.stats();
    info!(site = %loaded.config.site, spooled_bytes = stats.bytes, spooled_records = stats.records, "agent starting");

    let admin_stop = CancellationToken::new();
    let admin = start_admin(&live, &spool, &progress, &admin_stop).await?;
    let tail_stop = CancellationToken::new();
    let tail_thread = start_tailer(&live, &spool, &progress, &tail_stop, &shutdown)?;

    let ship_stop = CancellationToken::new();
    let mut shipper = tokio::spawn(ship::run(
        live.clone(),
        client_config,
        spool.clone(),
        progress.clone(),
        ship_stop.clone(),
    ));

    let ship_result = tokio::select! {
        () = shutdown.cancelled() => None,
        result = &mut shipper => Some(result),
    };
    info!("agent stopping");
    tail_stop.cancel();
    let tail_result = tokio::task::spawn_blocking(move || tail_thread.join())
        .await
        .map_err(|_| AgentError::TailPanicked)?
        .map_err(|_| AgentError::TailPanicked)?;
    ship_stop.cancel();
    let ship_result = match ship_result {
        Some(result) => result,
        None => shipper.await,
    };
    spool.flush().map_err(spool_err)?;
    admin_stop.cancel();
    if let Ok(Err(error)) = admin.await {
        error!(%error, "admin endpoint failed");
    }
    tail_result?;
    ship_result.map_err(|_| AgentError::ShipPanicked)??;
    let stats = spool.stats();
    info!(
        records_spooled = progress.records_spooled.get(),
        records_acked = progress.records_acked.get(),
        records_lost = progress.lost_total(),
        wire_bytes = progress.wire_bytes.get(),
        spool_bytes = stats.bytes,
        spool_records = stats.records,
        "agent stopped"
    );
    Ok(())
}

/// Binds the admin endpoint (a port in use is a start-up error, not a silent agent without
/// metrics) and serves it until `stop`.
async fn start_admin(
    live: &watch::Receiver<Arc<Loaded>>,
    spool: &Arc<dyn Spool>,
    progress: &Arc<Progress>,
    stop: &CancellationToken,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, AgentError> {
    let listen = live.borrow().config.admin.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| AgentError::Admin {
            addr: listen,
            source,
        })?;
    Ok(tokio::spawn(admin::serve(
        listener,
        live.clone(),
        spool.clone(),
        progress.clone(),
        stop.clone(),
    )))
}

/// The tailer on a thread of its own (librdkafka's consumer blocks); its failure stops the
/// whole agent through `shutdown`.
fn start_tailer(
    live: &watch::Receiver<Arc<Loaded>>,
    spool: &Arc<dyn Spool>,
    progress: &Arc<Progress>,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<std::thread::JoinHandle<Result<(), tail::TailError>>, AgentError> {
    let tailer = tail::Tailer::new(live.clone(), spool.clone(), progress.clone())?;
    let (stop, failed) = (stop.clone(), shutdown.clone());
    std::thread::Builder::new()
        .name("spoke-tail".into())
        .spawn(move || {
            let result = tailer.run(&stop);
            if let Err(error) = &result {
                error!(%error, "tailer failed; stopping the agent");
                failed.cancel();
            }
            result
        })
        .map_err(AgentError::Thread)
}

// The one wall clock of spoke-process, under the short path the agent's modules stamp with.
pub(crate) use spoke_process::clock::now_ms;

/// How long `check` waits for the local broker.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
