//! The QUIC endpoint: accepts connections and gives each its own session task.

use std::sync::Arc;
use std::time::Duration;

use spoke_proto::{BatchLimits, Limits};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use std::sync::atomic::{AtomicU64, Ordering};

use crate::admin::Admin;
use crate::checkpoint::Checkpoints;
use crate::config::Loaded;
use crate::fleet::Fleet;
use crate::hub::Hub;
use crate::session::{self, SessionContext};

/// How long sessions get to finish confirmed work after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a stopping relay waits for ended sessions' producers to drain.
const TEARDOWN_GRACE: Duration = Duration::from_secs(5);

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
/// Runs the relay until `shutdown` is cancelled; `acl` carries the site ACLs, replaced on
/// SIGHUP.
pub async fn run(
    loaded: Loaded,
    acl: tokio::sync::watch::Receiver<crate::config::Acl>,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    let config = &loaded.config;
    let server_config = crate::tls::server_config(&config.tls)?;
    let endpoint = quinn::Endpoint::server(server_config, config.listen).map_err(|source| {
        RelayError::Listen {
            addr: config.listen,
            source,
        }
    })?;
    let hub = Hub::new(&config.hub)?;
    let checkpoints = Arc::new(Checkpoints::new(
        config.hub.offsets_topic.clone(),
        config.hub.checkpoint_interval,
    ));
    let mut fleet = Fleet::new();
    checkpoints.register(&mut fleet.registry);
    let fleet = Arc::new(fleet);
    let relay_name = instance_name(config.listen);
    let admin_state = Arc::new(Admin {
        fleet: fleet.clone(),
        relay_name: relay_name.clone(),
        hub_seen_ms: AtomicU64::new(0),
    });
    let admin_listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| RelayError::Listen {
            addr: config.admin.listen,
            source,
        })?;
    let background = TaskTracker::new();
    background.spawn(crate::admin::serve(
        admin_listener,
        admin_state.clone(),
        shutdown.clone(),
    ));
    background.spawn(probe_hub(hub.clone(), admin_state, shutdown.clone()));
    background.spawn(follow_checkpoints(
        hub.clone(),
        checkpoints.clone(),
        shutdown.clone(),
    ));
    let context = Arc::new(SessionContext {
        fleet: fleet.clone(),
        hub,
        acl,
        topic_template: config.hub.topic.clone(),
        delivery: config.hub.delivery,
        frame_limits: Limits::default(),
        batch_limits: BatchLimits::default(),
        relay_name: relay_name.clone(),
        handoff: session::Handoff::default(),
        checkpoints,
        teardowns: TaskTracker::new(),
    });
    info!(listen = %config.listen, hub = %config.hub.bootstrap, "relay ready");

    let sessions = TaskTracker::new();
    let handshake_log = Arc::new(std::sync::Mutex::new(None));
    loop {
        let incoming = tokio::select! {
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let context = context.clone();
        let fleet = fleet.clone();
        let handshake_log = handshake_log.clone();
        let shutdown = shutdown.child_token();
        sessions.spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(connection) => session::serve(connection, context, shutdown).await,
                Err(error) => {
                    fleet.rejected(crate::fleet::reject::HANDSHAKE);
                    // A flood of bad handshakes must not flood the log: the counter has
                    // them all, the log one line per interval.
                    let total = fleet.rejected_count(crate::fleet::reject::HANDSHAKE);
                    if handshake_log.try_lock().is_ok_and(|mut last| {
                        let due = last.is_none_or(|t: std::time::Instant| t.elapsed() >= Duration::from_secs(10));
                        if due {
                            *last = Some(std::time::Instant::now());
                        }
                        due
                    }) {
                        warn!(%remote, %error, handshake_failures_total = total, "handshake failed");
                    }
                }
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
    // Ended sessions' producers get a moment to resolve what they sent. What is still
    // unresolved when the process exits is what a crash leaves: the next session's resume
    // point makes it exact.
    context.teardowns.close();
    if tokio::time::timeout(TEARDOWN_GRACE, context.teardowns.wait())
        .await
        .is_err()
    {
        warn!("hub deliveries of ended sessions still unresolved at exit");
    }
    background.close();
    background.wait().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(())
}

/// Keeps `/healthz` honest about the hub.
async fn probe_hub(hub: Arc<Hub>, admin: Arc<Admin>, shutdown: CancellationToken) {
    loop {
        match hub.probe().await {
            Ok(()) => admin
                .hub_seen_ms
                .store(crate::fleet::now_ms(), Ordering::Relaxed),
            Err(error) => warn!(%error, "hub probe failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Creates the offsets topic if needed, then keeps this relay's view of it current.
async fn follow_checkpoints(
    hub: Arc<Hub>,
    checkpoints: Arc<Checkpoints>,
    shutdown: CancellationToken,
) {
    loop {
        match hub.ensure_offsets_topic(&checkpoints.topic).await {
            Ok(()) => break,
            Err(error) => warn!(%error, "cannot create the checkpoint topic; will retry"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
            () = shutdown.cancelled() => return,
        }
    }
    let follower = tokio::task::spawn_blocking(move || checkpoints.follow(&hub, &shutdown));
    if let Err(error) = follower.await {
        warn!(%error, "checkpoint follower failed");
    }
}

/// This relay process: unique across relays and restarts, because an agent treats a
/// session with any other process as a relay change (see `relay.fence_delay`).
fn instance_name(listen: std::net::SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "spoke-relay".to_owned());
    format!(
        "{host}:{}/{}-{}",
        listen.port(),
        std::process::id(),
        crate::fleet::now_ms()
    )
}
