//! The QUIC endpoint: accepts connections and gives each its own session task.

use std::sync::Arc;
use std::time::Duration;

use spoke_process::logging::LogLimiter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use std::sync::atomic::{AtomicU64, Ordering};

use crate::admin::Admin;
use crate::checkpoint::Checkpoints;
use crate::config::{Delivery, Loaded};
use crate::fleet::{reject, Fleet};
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

/// Runs the relay until `shutdown` is cancelled. Each message on `reloads` (SIGHUP) re-reads
/// the configuration file and applies its `[tls]` and `[sites]` to new handshakes and batches,
/// all or nothing: a file that does not load keeps everything running as it was.
pub async fn run(
    loaded: Loaded,
    mut reloads: tokio::sync::mpsc::Receiver<()>,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    let config = &loaded.config;
    let limits = config.limits.clone();
    let endpoint = listen(&loaded, &limits)?;
    let hub = Hub::new(&config.hub, &loaded.hub_kafka)?;
    let checkpoints = Arc::new(Checkpoints::new(
        config.hub.offsets_topic.clone(),
        config.hub.checkpoint_interval,
    ));
    let fleet = new_fleet(&hub, &checkpoints);
    let relay_name = instance_name(config.listen);
    let background =
        start_background(&loaded, &hub, &checkpoints, &fleet, &relay_name, &shutdown).await?;
    let (acl_tx, acl) = tokio::sync::watch::channel(loaded.acl.clone());
    let (deny_tx, deny) = tokio::sync::watch::channel(loaded.deny.clone());
    let context = Arc::new(session_context(
        &loaded,
        hub,
        fleet.clone(),
        checkpoints,
        relay_name,
        acl,
        deny,
    ));
    info!(listen = %config.listen, hub = %config.hub.bootstrap, "relay ready");

    let admission = Admission {
        // Permits, not counters: a task that ends in any way (even a panic) gives its permit
        // back.
        connections: Arc::new(Semaphore::new(limits.max_connections as usize)),
        handshakes: Arc::new(Semaphore::new(limits.max_handshakes as usize)),
        fleet: fleet.clone(),
    };
    let sessions = TaskTracker::new();
    let handshake_log = Arc::new(LogLimiter::new(Duration::from_secs(10)));
    loop {
        let incoming = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(()) = reloads.recv() => {
                reload(&loaded.path, &limits, &endpoint, &acl_tx, &deny_tx);
                continue;
            }
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let Some(admitted) = admission.admit(incoming) else {
            continue;
        };
        sessions.spawn(handshake_then_serve(
            admitted,
            limits.handshake_timeout,
            context.clone(),
            fleet.clone(),
            handshake_log.clone(),
            shutdown.child_token(),
        ));
    }
    shut_down(&endpoint, sessions, &context, background).await;
    Ok(())
}

/// The QUIC endpoint on `listen`, with the TLS setup of `loaded`.
fn listen(
    loaded: &Loaded,
    limits: &crate::config::LimitsConfig,
) -> Result<quinn::Endpoint, RelayError> {
    let config = &loaded.config;
    let server_config = crate::tls::server_config(&config.tls, &loaded.deny, limits)?;
    let failed = |source| RelayError::Listen {
        addr: config.listen,
        source,
    };
    let socket = udp_socket(config.listen).map_err(failed)?;
    let runtime = quinn::default_runtime().ok_or_else(|| {
        failed(std::io::Error::other(
            "no async runtime for the QUIC endpoint",
        ))
    })?;
    let secret = crate::tls::endpoint_secret(&config.tls)?;
    quinn::Endpoint::new(
        endpoint_config(&secret),
        Some(server_config),
        socket,
        runtime,
    )
    .map_err(failed)
}

/// The endpoint's stateless-reset key and connection-id key, both from `secret`
/// ([`crate::tls::endpoint_secret`]), so they survive a restart; and resets as often as a
/// fleet needs them.
fn endpoint_config(secret: &[u8; 32]) -> quinn::EndpointConfig {
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    let digest = ring::digest::digest(&ring::digest::SHA256, secret);
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&digest.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // quinn sends at most one reset per 20 ms by default, and judges a whole batch of
    // received datagrams by one clock reading, so after a restart a fleet's packets got one
    // reset per batch and most sites fell back to the idle timeout (10,000 sites: 32 s).
    // Every reset is smaller than the packet it answers (no amplification, and a loop of
    // resets dies out), and only connection ids this relay's key issued get one.
    config.min_reset_interval(Duration::ZERO);
    config
}

/// Kernel buffer the relay asks for on its UDP socket, each way.
const UDP_BUFFER_BYTES: usize = 8 << 20;
/// Below this a receive buffer is reported: the fix is the host's `net.core.rmem_max`.
const UDP_BUFFER_ENOUGH: usize = 2 << 20;

/// The relay's one UDP socket, with kernel buffers sized for a fleet. Every site's packets
/// arrive on it; at Linux's default of 208 KiB a burst of thousands of handshakes (a relay
/// restart) overflows it, the kernel drops datagrams, and handshakes time out and retry
/// (docs/benchmarks.md, "Fleet scale"). The kernel caps the request at `net.core.rmem_max`
/// and `wmem_max`.
fn udp_socket(listen: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if listen.is_ipv6() {
        // As quinn's own bind: an IPv6 wildcard takes IPv4 too where the system allows.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: a refused size leaves the system's default, which still works.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&listen.into())?;
    let received = socket.recv_buffer_size().unwrap_or(0);
    if received < UDP_BUFFER_ENOUGH {
        warn!(
            bytes = received,
            wanted = UDP_BUFFER_BYTES,
            fix = "raise net.core.rmem_max (sysctl) to 8388608",
            "the kernel gave the relay's UDP socket a small receive buffer: a reconnect storm of \
             many sites will lose packets and slow their handshakes"
        );
    } else {
        info!(receive_buffer = received, "QUIC socket bound");
    }
    Ok(socket.into())
}

/// The relay's metrics, with the checkpoints' and the hub's.
fn new_fleet(hub: &Hub, checkpoints: &Checkpoints) -> Arc<Fleet> {
    let mut fleet = Fleet::new();
    checkpoints.register(&mut fleet.registry);
    hub.register(&mut fleet.registry);
    Arc::new(fleet)
}

/// Starts what runs beside the sessions until `shutdown`: the admin endpoint, the hub probe
/// behind its `/healthz`, and the checkpoint follower.
async fn start_background(
    loaded: &Loaded,
    hub: &Arc<Hub>,
    checkpoints: &Arc<Checkpoints>,
    fleet: &Arc<Fleet>,
    relay_name: &str,
    shutdown: &CancellationToken,
) -> Result<TaskTracker, RelayError> {
    let config = &loaded.config;
    let admin_state = Arc::new(Admin {
        fleet: fleet.clone(),
        relay_name: relay_name.to_owned(),
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
        config.hub.delivery == Delivery::ExactlyOnce,
        shutdown.clone(),
    ));
    Ok(background)
}

/// What lets a connection attempt through to a TLS handshake.
struct Admission {
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    fleet: Arc<Fleet>,
}

/// A connection attempt let through, with the permits it holds: one for the connection's life,
/// one for its handshake.
struct Admitted {
    incoming: quinn::Incoming,
    connection_permit: OwnedSemaphorePermit,
    handshake_permit: OwnedSemaphorePermit,
}

impl Admission {
    /// Lets `incoming` through if its address is validated and a connection and a handshake
    /// permit are free; otherwise answers it (a Retry, or a refusal the fleet counts).
    fn admit(&self, incoming: quinn::Incoming) -> Option<Admitted> {
        // Address validation: an address that has not echoed a Retry token costs the relay one
        // stateless packet, never a TLS handshake, so spoofed sources cannot make it work.
        if !incoming.remote_address_validated() {
            if let Err(error) = incoming.retry() {
                // Dropping the Incoming refuses it.
                drop(error.into_incoming());
            }
            return None;
        }
        let Ok(connection_permit) = self.connections.clone().try_acquire_owned() else {
            self.fleet.rejected(reject::TOO_MANY_CONNECTIONS);
            incoming.refuse();
            return None;
        };
        let Ok(handshake_permit) = self.handshakes.clone().try_acquire_owned() else {
            self.fleet.rejected(reject::TOO_MANY_HANDSHAKES);
            incoming.refuse();
            return None;
        };
        Some(Admitted {
            incoming,
            connection_permit,
            handshake_permit,
        })
    }
}

/// One connection's task: its TLS handshake within `handshake_timeout`, then its session. A
/// failed handshake is counted by reason, and logged at most once per interval of
/// `handshake_log`.
async fn handshake_then_serve(
    admitted: Admitted,
    handshake_timeout: Duration,
    context: Arc<SessionContext>,
    fleet: Arc<Fleet>,
    handshake_log: Arc<LogLimiter>,
    shutdown: CancellationToken,
) {
    let Admitted {
        incoming,
        connection_permit,
        handshake_permit,
    } = admitted;
    let remote = incoming.remote_address();
    let handshake = match incoming.accept() {
        Ok(connecting) => tokio::time::timeout(handshake_timeout, connecting)
            .await
            .unwrap_or(Err(quinn::ConnectionError::TimedOut)),
        Err(error) => Err(error),
    };
    drop(handshake_permit);
    match handshake {
        Ok(connection) => session::serve(connection, context, shutdown).await,
        Err(error) => {
            let reason = crate::tls::handshake_reject_reason(&error);
            fleet.rejected(reason);
            // A flood of bad handshakes must not flood the log: the counter has them all, the
            // log one line per interval.
            if handshake_log.allow().is_some() {
                warn!(%remote, %error, reason, "handshake failed");
            }
        }
    }
    drop(connection_permit);
}

/// Ends the sessions, then lets the hub deliveries of ended sessions resolve, within bounds.
async fn shut_down(
    endpoint: &quinn::Endpoint,
    sessions: TaskTracker,
    context: &SessionContext,
    background: TaskTracker,
) {
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
}

/// What every session of this relay shares.
fn session_context(
    loaded: &Loaded,
    hub: Arc<Hub>,
    fleet: Arc<Fleet>,
    checkpoints: Arc<Checkpoints>,
    relay_name: String,
    acl: tokio::sync::watch::Receiver<crate::config::Acl>,
    deny: tokio::sync::watch::Receiver<crate::deny::DenyList>,
) -> SessionContext {
    let config = &loaded.config;
    let limits = &config.limits;
    SessionContext {
        fleet,
        hub,
        acl,
        deny,
        topic_template: config.hub.topic.clone(),
        topic_config: config
            .hub
            .topic_config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        delivery: config.hub.delivery,
        frame_limits: limits.frame_limits(),
        batch_limits: limits.batch_limits(),
        dictionary_limits: limits.dictionary_limits(),
        limits: limits.clone(),
        relay_name,
        turns: session::SessionTurns::default(),
        site_connections: session::SiteConnections::default(),
        checkpoints,
        teardowns: TaskTracker::new(),
        handover_window: config.hub.handover_window(),
        rejects: session::Rejects {
            policy: config.hub.on_rejected,
            dead_letter_topic: config.hub.dead_letter_topic.clone(),
            max_record_bytes: config
                .hub
                .max_record_bytes
                .map(|max| usize::try_from(max.as_u64()).unwrap_or(usize::MAX)),
            in_flight: config.hub.fence_delay,
        },
    }
}

/// Applies a reloaded configuration file, or none of it. `[limits]` stay as the relay started:
/// they size what is already running.
fn reload(
    path: &std::path::Path,
    limits: &crate::config::LimitsConfig,
    endpoint: &quinn::Endpoint,
    acl: &tokio::sync::watch::Sender<crate::config::Acl>,
    deny: &tokio::sync::watch::Sender<crate::deny::DenyList>,
) {
    let loaded = match crate::config::load(path) {
        Ok(loaded) => loaded,
        Err(error) => {
            error!(%error, "SIGHUP: configuration refused; keeping the running configuration");
            return;
        }
    };
    let server_config = match crate::tls::server_config(&loaded.config.tls, &loaded.deny, limits) {
        Ok(server_config) => server_config,
        Err(error) => {
            error!(%error, "SIGHUP: [tls] refused; keeping the running configuration");
            return;
        }
    };
    // Sessions keep their connections: only handshakes from now on see the new TLS setup.
    endpoint.set_server_config(Some(server_config));
    info!(
        config = %path.display(),
        sites = loaded.config.sites.len(),
        denied = loaded.deny.len(),
        "SIGHUP: reloaded certificate, key, client CA, deny list and site ACLs"
    );
    acl.send_replace(loaded.acl);
    deny.send_replace(loaded.deny);
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

/// Creates the offsets topic if needed, then keeps this relay's view of it current. With
/// `probe_transactions`, it also asks the hub whether it has transactions (once the topic the
/// probe names exists) while the follower starts, so that a relay's first session does not
/// wait for the probe.
async fn follow_checkpoints(
    hub: Arc<Hub>,
    checkpoints: Arc<Checkpoints>,
    probe_transactions: bool,
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
    let shutdown_probe = shutdown.clone();
    let follower = {
        let hub = hub.clone();
        let checkpoints = checkpoints.clone();
        tokio::task::spawn_blocking(move || checkpoints.follow(&hub, &shutdown))
    };
    if probe_transactions {
        tokio::select! {
            probed = hub.transactional(&checkpoints.topic) => {
                if let Err(error) = probed {
                    warn!(%error, "transaction probe failed; the first session asks again");
                }
            }
            // A hub that does not answer holds the probe for its transaction timeout.
            () = shutdown_probe.cancelled() => {}
        }
    }
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
