//! Many bogus clients at once, cheaply: one single-threaded tokio runtime and a handful of
//! quinn endpoints carry every client, so the attack costs the test machine little more
//! than the relay has to spend refusing it.
//!
//! Three kinds of client, in turn by index:
//! - handshake flooders: dial again and again with certificates the relay must refuse;
//! - idle clients: complete the handshake with a valid certificate, then say nothing;
//! - stallers: complete the handshake, send half a `Hello` frame, then stall (QUIC
//!   keep-alives on, so only the relay's own timeouts can end them); the first staller of
//!   each valid site instead completes its session (Hello, Welcome: the relay sets up a hub
//!   producer for it) and then stalls in the middle of a `Batch`.
//!
//! Idle clients and stallers dial again whenever the relay drops them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::hostile::{self, connect};
use crate::pki::Identity;

#[derive(Debug, Clone)]
pub struct Flood {
    pub relay: SocketAddr,
    /// The CA the relay's certificate chains to (the flooders do check the server).
    pub ca_pem: String,
    /// Certificates the relay must refuse; `None` is "no certificate".
    pub bad: Vec<Option<Identity>>,
    /// Valid certificates for configured sites other than the honest one, with their site
    /// names; clients take them in turn.
    pub valid: Vec<(String, Identity)>,
    pub clients: usize,
    pub duration: Duration,
    /// QUIC client endpoints (UDP sockets) the clients share.
    pub endpoints: usize,
    /// Pause between a flooder's handshakes.
    pub handshake_pause: Duration,
}

/// What the flood did, for the summary line and the assertions.
#[derive(Debug, Default)]
pub struct FloodReport {
    /// Handshakes attempted with bad certificates.
    pub bad_handshakes: u64,
    /// Of those, refused by the relay (handshake failure or immediate close).
    pub bad_refused: u64,
    /// Of those, connections the relay kept open: must be zero.
    pub bad_accepted: u64,
    /// Bad handshakes that got no answer in time (an overloaded relay).
    pub bad_timed_out: u64,
    /// Connections with a valid certificate that were established (idle or stalled).
    pub valid_connections: u64,
    /// Valid-certificate dials the relay refused during the handshake.
    pub valid_refused: u64,
    /// Valid-certificate connections the relay closed within a second (connection limits).
    pub valid_cut_short: u64,
    /// Half frames sent by stallers.
    pub half_frames: u64,
    /// Sessions (Welcome received) that stallers then left hanging mid-batch.
    pub stalled_sessions: u64,
    /// Most valid-certificate connections open at the same time.
    pub peak_open: u64,
}

#[derive(Debug, Default)]
struct Counters {
    bad_handshakes: AtomicU64,
    bad_refused: AtomicU64,
    bad_accepted: AtomicU64,
    bad_timed_out: AtomicU64,
    valid_connections: AtomicU64,
    valid_refused: AtomicU64,
    valid_cut_short: AtomicU64,
    half_frames: AtomicU64,
    stalled_sessions: AtomicU64,
    open: AtomicU64,
    peak_open: AtomicU64,
}

impl Counters {
    fn opened(&self) {
        self.valid_connections.fetch_add(1, Ordering::Relaxed);
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_open.fetch_max(open, Ordering::Relaxed);
    }

    fn report(&self) -> FloodReport {
        FloodReport {
            bad_handshakes: self.bad_handshakes.load(Ordering::Relaxed),
            bad_refused: self.bad_refused.load(Ordering::Relaxed),
            bad_accepted: self.bad_accepted.load(Ordering::Relaxed),
            bad_timed_out: self.bad_timed_out.load(Ordering::Relaxed),
            valid_connections: self.valid_connections.load(Ordering::Relaxed),
            valid_refused: self.valid_refused.load(Ordering::Relaxed),
            valid_cut_short: self.valid_cut_short.load(Ordering::Relaxed),
            half_frames: self.half_frames.load(Ordering::Relaxed),
            stalled_sessions: self.stalled_sessions.load(Ordering::Relaxed),
            peak_open: self.peak_open.load(Ordering::Relaxed),
        }
    }
}

/// A running flood; [`FloodHandle::join`] waits for its end.
#[derive(Debug)]
pub struct FloodHandle {
    thread: std::thread::JoinHandle<anyhow::Result<FloodReport>>,
}

impl FloodHandle {
    pub fn join(self) -> anyhow::Result<FloodReport> {
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("flood thread panicked"))?
    }
}

impl Flood {
    /// Starts the flood on its own thread; it stops by itself after `duration`.
    pub fn start(self) -> anyhow::Result<FloodHandle> {
        let thread = std::thread::Builder::new()
            .name("flood".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(self.run())
            })?;
        Ok(FloodHandle { thread })
    }

    async fn run(self) -> anyhow::Result<FloodReport> {
        let deadline = tokio::time::Instant::now() + self.duration;
        let endpoints = (0..self.endpoints.max(1))
            .map(|_| hostile::endpoint())
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(
            !self.bad.is_empty(),
            "the flood needs at least one bad certificate (None = no certificate)"
        );
        let bad = self
            .bad
            .iter()
            .map(|identity| hostile::client_config(&self.ca_pem, identity.as_ref(), None))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let half_batch = hostile::encode(&hostile::valid_batch(1, "orders", 0, 100)?)?;
        let half_batch = half_batch[..half_batch.len() / 2].to_vec();
        let valid = self
            .valid
            .iter()
            .map(|(site, identity)| {
                let config = hostile::client_config(
                    &self.ca_pem,
                    Some(identity),
                    Some(Duration::from_secs(2)),
                )?;
                let hello = hostile::encode(&hostile::hello(site))?;
                let pre_hello = Stall::PreHello(hello[..hello.len() / 2].to_vec());
                let mid_batch = Stall::MidBatch {
                    hello,
                    half_batch: half_batch.clone(),
                };
                anyhow::Ok((config, pre_hello, mid_batch))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!valid.is_empty(), "the flood needs a valid certificate");
        let counters = Arc::new(Counters::default());
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..self.clients {
            let endpoint = endpoints[i % endpoints.len()].clone();
            let counters = counters.clone();
            let relay = self.relay;
            match i % 3 {
                0 => {
                    let configs = bad.clone();
                    let pause = self.handshake_pause;
                    tasks.spawn(async move {
                        flood_handshakes(endpoint, configs, relay, deadline, pause, i, &counters)
                            .await
                    });
                }
                kind => {
                    let (config, pre_hello, mid_batch) = valid[(i / 3) % valid.len()].clone();
                    // One session per site: a second Hello of a site would supersede the
                    // first, which tests the handoff, not the flood.
                    let stall = match kind {
                        1 => Stall::Idle,
                        _ if i / 3 < valid.len() => mid_batch,
                        _ => pre_hello,
                    };
                    tasks.spawn(async move {
                        hold_connections(endpoint, config, relay, deadline, stall, &counters).await
                    });
                }
            }
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            let result = joined.context("flood client task").and_then(|r| r);
            if let (Err(error), None) = (result, &first_error) {
                first_error = Some(error);
            }
        }
        for endpoint in &endpoints {
            endpoint.close(0u32.into(), b"flood over");
        }
        for endpoint in &endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(counters.report()),
        }
    }
}

async fn flood_handshakes(
    endpoint: quinn::Endpoint,
    configs: Vec<quinn::ClientConfig>,
    relay: SocketAddr,
    deadline: tokio::time::Instant,
    pause: Duration,
    offset: usize,
    counters: &Counters,
) -> anyhow::Result<()> {
    let mut turn = offset;
    while tokio::time::Instant::now() < deadline {
        let config = &configs[turn % configs.len()];
        turn += 1;
        counters.bad_handshakes.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(Duration::from_secs(10), connect(&endpoint, config, relay)).await
        {
            Ok(attempt) => match attempt? {
                Err(_refused) => {
                    counters.bad_refused.fetch_add(1, Ordering::Relaxed);
                }
                // TLS 1.3: the client may finish before the relay judged its certificate.
                Ok(connection) => {
                    match tokio::time::timeout(Duration::from_secs(20), connection.closed()).await {
                        Ok(_) => counters.bad_refused.fetch_add(1, Ordering::Relaxed),
                        Err(_) => counters.bad_accepted.fetch_add(1, Ordering::Relaxed),
                    };
                    connection.close(0u32.into(), b"");
                }
            },
            Err(_) => {
                counters.bad_timed_out.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(pause).await;
    }
    Ok(())
}

/// What a client with a valid certificate does once connected.
#[derive(Debug, Clone)]
enum Stall {
    /// Nothing at all.
    Idle,
    /// Half a `Hello`.
    PreHello(Vec<u8>),
    /// A whole `Hello`, then (after the `Welcome`) half a `Batch`.
    MidBatch { hello: Vec<u8>, half_batch: Vec<u8> },
}

async fn hold_connections(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    relay: SocketAddr,
    deadline: tokio::time::Instant,
    stall: Stall,
    counters: &Counters,
) -> anyhow::Result<()> {
    while tokio::time::Instant::now() < deadline {
        let attempt = tokio::time::timeout_at(deadline, connect(&endpoint, &config, relay)).await;
        let connection = match attempt {
            Err(_) => break,
            Ok(attempt) => match attempt? {
                Ok(connection) => connection,
                Err(_) => {
                    counters.valid_refused.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
        };
        counters.opened();
        let opened = tokio::time::Instant::now();
        // Kept, not dropped: dropping would finish the stream, and the point is to leave the
        // relay waiting for the rest.
        let mut stream = None;
        match &stall {
            Stall::Idle => {}
            Stall::PreHello(half) => {
                if let Ok((mut send, recv)) = connection.open_bi().await {
                    if send.write_all(half).await.is_ok() {
                        counters.half_frames.fetch_add(1, Ordering::Relaxed);
                    }
                    stream = Some((send, recv));
                }
            }
            Stall::MidBatch { hello, half_batch } => {
                if let Ok((mut send, mut recv)) = connection.open_bi().await {
                    let welcomed = async {
                        send.write_all(hello).await?;
                        let mut buf = Vec::new();
                        let frame = hostile::read_frame(&mut recv, &mut buf).await?;
                        anyhow::ensure!(
                            matches!(frame, Some(spoke_proto::Frame::Welcome(_))),
                            "no Welcome"
                        );
                        send.write_all(half_batch).await?;
                        anyhow::Ok(())
                    };
                    let welcomed = tokio::time::timeout(Duration::from_secs(20), welcomed).await;
                    if let Ok(Ok(())) = welcomed {
                        counters.stalled_sessions.fetch_add(1, Ordering::Relaxed);
                        counters.half_frames.fetch_add(1, Ordering::Relaxed);
                    }
                    stream = Some((send, recv));
                }
            }
        }
        let cut_short = tokio::select! {
            _ = connection.closed() => opened.elapsed() < Duration::from_secs(1),
            () = tokio::time::sleep_until(deadline) => {
                connection.close(0u32.into(), b"flood over");
                false
            }
        };
        drop(stream);
        counters.open.fetch_sub(1, Ordering::Relaxed);
        // A dropped client comes back, as a real attacker would, but not in a hot loop.
        let pause = if cut_short {
            counters.valid_cut_short.fetch_add(1, Ordering::Relaxed);
            Duration::from_secs(1)
        } else {
            Duration::from_millis(200)
        };
        tokio::time::sleep(pause).await;
    }
    Ok(())
}

/// Resident memory of a process from /proc: (VmRSS, VmHWM) in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}
