//! The QUIC endpoint: accepts connections and gives each its own session task.

use std::sync::Arc;
use std::time::Duration;

use spoke_proto::{BatchLimits, Limits};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Loaded;
use crate::hub::Hub;
use crate::session::{self, SessionContext};

/// How long sessions get to finish confirmed work after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
}

/// Runs the relay until `shutdown` is cancelled.
pub async fn run(loaded: Loaded, shutdown: CancellationToken) -> Result<(), RelayError> {
    let config = &loaded.config;
    let server_config = crate::tls::server_config(&config.tls)?;
    let endpoint = quinn::Endpoint::server(server_config, config.listen).map_err(|source| {
        RelayError::Listen {
            addr: config.listen,
            source,
        }
    })?;
    let hub = Hub::new(&config.hub)?;
    let context = Arc::new(SessionContext {
        hub,
        acl: loaded.acl.clone(),
        topic_template: config.hub.topic.clone(),
        delivery: config.hub.delivery,
        frame_limits: Limits::default(),
        batch_limits: BatchLimits::default(),
        relay_name: hostname(),
    });
    info!(listen = %config.listen, hub = %config.hub.bootstrap, "relay ready");

    let sessions = TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let context = context.clone();
        let shutdown = shutdown.child_token();
        sessions.spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(connection) => session::serve(connection, context, shutdown).await,
                Err(error) => warn!(%remote, %error, "handshake failed"),
            }
        });
    }
    info!("relay shutting down");
    sessions.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, sessions.wait())
        .await
        .is_err()
    {
        warn!("sessions still running after the shutdown grace period");
    }
    endpoint.close(session::close_code::SHUTDOWN.into(), b"relay shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "spoke-relay".to_owned())
}
