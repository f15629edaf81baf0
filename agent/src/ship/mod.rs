//! The shipper: sends spooled chunks to a relay as `Batch` frames, keeps up to `window` of
//! them unacknowledged, and deletes a chunk from the spool only when the relay's `Ack` says
//! the hub holds it. Connection failures rotate through `relay.endpoints` with capped
//! exponential backoff; nothing is lost meanwhile because the spool still holds every chunk.
//!
//! Batches travel on `ship.streams` data streams, each partition on one of them, so that a
//! lost packet holds up only the partitions of its stream; the control stream carries the
//! handshake, heartbeats and the relay's acknowledgements (proto's `frame` docs, "Streams").
//! The protocol's rules (the Welcome's check, the window, what goes ahead of a batch, the
//! order of acknowledgements) are `spoke_proto::connection::agent`'s; this module does the I/O:
//!
//! - [`session`]: one session with a relay, from Hello to Goodbye;
//! - [`lanes`]: the streams batches are written to, and the connection's send window;
//! - [`frames`]: a spooled chunk as the frames that carry it;
//! - [`fence`]: the wait before a session with another relay, kept durably;
//! - [`pacer`]: the cap `ship.max_bandwidth` sets.

mod fence;
mod frames;
mod lanes;
mod pacer;
mod session;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use spoke_proto::connection::ProtocolError;
use spoke_transport::wire::WireError;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::config::{Endpoint, Loaded};
use crate::progress::Progress;
use crate::spool::{Spool, SpoolError};
use session::{Ended, RelaySession};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("resolving {address}: {reason}")]
    Resolve { address: String, reason: String },
    #[error("connecting to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("relay refused the session: {0}")]
    Refused(String),
    #[error("the relay broke the protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("relay rejected batch {seq}: {message}")]
    Nacked { seq: u64, message: String },
    #[error("relay did not answer in time ({0})")]
    Timeout(&'static str),
    #[error("relay closed the session: {0}")]
    Closed(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    #[error("fenced: batches went to {previous} less than relay.fence_delay ago ({wait:?} to go)")]
    Fenced { previous: String, wait: Duration },
    #[error("cannot record the fence at {path}: {source}")]
    FenceFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("spooled chunk of {partition} has unknown codec {codec}")]
    Codec { partition: String, codec: u8 },
    #[error("spooled chunk of {partition} needs dictionary {id}, which is not in the spool")]
    MissingDictionary { partition: String, id: u32 },
    #[error("re-encoding a dictionary chunk of {partition} for a version 1 relay: {reason}")]
    Transcode { partition: String, reason: String },
}

/// Runs until `stop` is cancelled.
pub async fn run(
    live: watch::Receiver<Arc<Loaded>>,
    client_config: quinn::ClientConfig,
    spool: Arc<dyn Spool>,
    progress: Arc<Progress>,
    stop: CancellationToken,
) -> Result<(), ShipError> {
    let mut endpoint_v4: Option<quinn::Endpoint> = None;
    let mut endpoint_v6: Option<quinn::Endpoint> = None;
    let mut backoff = BACKOFF_START;
    let mut index = 0usize;
    let fence_path = crate::fence::path(&live.borrow().config.spool.path);
    let mut fence = crate::fence::read(&fence_path);
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        // Ship tunables reloaded by SIGHUP take effect from the next session on.
        let loaded = live.borrow().clone();
        index %= loaded.endpoints.len();
        let relay = &loaded.endpoints[index];
        let mut session = RelaySession {
            loaded: &loaded,
            spool: spool.as_ref(),
            progress: &progress,
            stop: &stop,
            fence: fence::SessionFence {
                held: &mut fence,
                path: &fence_path,
                delay: loaded.config.relay.fence_delay,
            },
            welcomed: false,
            relay: None,
        };
        let span = tracing::info_span!("relay", address = %relay.address);
        let result = session_with(
            relay,
            &client_config,
            &mut endpoint_v4,
            &mut endpoint_v6,
            &mut session,
        )
        .instrument(span)
        .await;
        progress.relay_connected.store(false, Ordering::Relaxed);
        match result {
            Ok(Ended::Stopped) => {
                wait_idle([endpoint_v4, endpoint_v6]).await;
                return Ok(());
            }
            Err(ShipError::Spool(error)) => return Err(ShipError::Spool(error)),
            Err(ShipError::Fenced { previous, wait }) => {
                info!(%previous, ?wait, "another relay may still be delivering our last batches; waiting out relay.fence_delay");
                if !slept(wait, &stop).await {
                    return Ok(());
                }
            }
            Err(error) => {
                if session.welcomed {
                    backoff = BACKOFF_START;
                }
                warn!(relay = %relay.address, %error, retry_in = ?backoff, "relay session ended");
                index = (index + 1) % loaded.endpoints.len();
                if !slept(backoff, &stop).await {
                    return Ok(());
                }
                backoff = (backoff * 2).min(BACKOFF_CAP);
            }
        }
    }
}

/// One session with `relay`: connects (on the address family's endpoint, kept for the next
/// session), runs `session`, and closes the connection saying whether the agent stopped or
/// failed.
async fn session_with(
    relay: &Endpoint,
    client_config: &quinn::ClientConfig,
    endpoint_v4: &mut Option<quinn::Endpoint>,
    endpoint_v6: &mut Option<quinn::Endpoint>,
    session: &mut RelaySession<'_>,
) -> Result<Ended, ShipError> {
    let connection = connect(relay, client_config, endpoint_v4, endpoint_v6).await?;
    let result = session
        .run(&connection)
        .await
        .map_err(|error| closed_by_relay(&connection, error));
    let (code, reason): (u32, &[u8]) = match &result {
        Ok(_) => (0, b"agent stopping"),
        Err(_) => (2, b"agent session error"),
    };
    connection.close(code.into(), reason);
    result
}

/// A relay that refuses or ends the session says why in its close frame; that beats the
/// "connection lost" (`error`) a pending read reports.
fn closed_by_relay(connection: &quinn::Connection, error: ShipError) -> ShipError {
    match connection.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => ShipError::Closed(format!(
            "{} (code {})",
            String::from_utf8_lossy(&close.reason),
            close.error_code
        )),
        _ => error,
    }
}

/// Whether `wait` passed before `stop` was cancelled.
async fn slept(wait: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = stop.cancelled() => false,
    }
}

/// On shutdown, gives each endpoint up to 2 s to tell its relay that the connection closed.
async fn wait_idle(endpoints: [Option<quinn::Endpoint>; 2]) {
    for endpoint in endpoints.into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
}

pub(crate) async fn connect(
    relay: &Endpoint,
    client_config: &quinn::ClientConfig,
    endpoint_v4: &mut Option<quinn::Endpoint>,
    endpoint_v6: &mut Option<quinn::Endpoint>,
) -> Result<quinn::Connection, ShipError> {
    let resolve_err = |reason: String| ShipError::Resolve {
        address: relay.address.clone(),
        reason,
    };
    let address: SocketAddr = tokio::net::lookup_host(&relay.address)
        .await
        .map_err(|e| resolve_err(e.to_string()))?
        .next()
        .ok_or_else(|| resolve_err("no address".into()))?;
    // One UDP socket per address family, reused across reconnects.
    let (slot, bind) = if address.is_ipv4() {
        (endpoint_v4, SocketAddr::from(([0, 0, 0, 0], 0)))
    } else {
        (endpoint_v6, SocketAddr::from(([0u16; 8], 0)))
    };
    let endpoint = match slot {
        Some(endpoint) => endpoint,
        None => slot.insert(quinn::Endpoint::client(bind).map_err(ShipError::Socket)?),
    };
    let connect_err = |reason: String| ShipError::Connect {
        address: relay.address.clone(),
        reason,
    };
    let connecting = endpoint
        .connect_with(client_config.clone(), address, &relay.server_name)
        .map_err(|e| connect_err(e.to_string()))?;
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| connect_err("handshake timed out".into()))?
        .map_err(|e| connect_err(e.to_string()))
}
