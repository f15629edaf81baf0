//! A TCP proxy that delays every byte by a settable one-way latency in both directions: a
//! slow hub, as a congested or far-away Kafka cluster is, put in front of a real broker.
//!
//! The broker behind it must advertise the proxy's address (see
//! [`crate::broker::Broker::start_behind`]), or clients would reach it directly after their
//! first metadata answer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Chunks in flight per direction of one connection.
const IN_FLIGHT: usize = 4096;

/// The proxy; it stops (and drops its connections) when dropped.
#[derive(Debug)]
pub struct DelayProxy {
    pub listen: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DelayProxy {
    /// Listens on `listen` and forwards each connection to `target`, with no delay yet.
    pub fn start(listen: SocketAddr, target: SocketAddr) -> anyhow::Result<DelayProxy> {
        let delay_ms = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let std_listener = std::net::TcpListener::bind(listen)?;
        std_listener.set_nonblocking(true)?;
        let (delay, stopping) = (delay_ms.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("delay-proxy".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else {
                        return;
                    };
                    loop {
                        let accepted = tokio::select! {
                            () = stopping.cancelled() => return,
                            accepted = listener.accept() => accepted,
                        };
                        let Ok((client, _)) = accepted else { continue };
                        let (delay, stopping) = (delay.clone(), stopping.clone());
                        tokio::spawn(async move {
                            let Ok(server) = TcpStream::connect(target).await else {
                                return;
                            };
                            let (client_read, client_write) = client.into_split();
                            let (server_read, server_write) = server.into_split();
                            tokio::select! {
                                () = stopping.cancelled() => {}
                                () = pump(client_read, server_write, delay.clone()) => {}
                                () = pump(server_read, client_write, delay) => {}
                            }
                        });
                    }
                });
            })?;
        Ok(DelayProxy {
            listen,
            delay_ms,
            stop,
            thread: Some(thread),
        })
    }

    /// Every byte read from now on is written `delay` later.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Copies `from` to `to`, each chunk held until its read time plus the delay then in force.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<AtomicU64>,
) {
    let (queue, mut due) = mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(IN_FLIGHT);
    let reader = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let at = tokio::time::Instant::now()
                + Duration::from_millis(delay_ms.load(Ordering::Relaxed));
            if queue.send((at, buffer[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((at, bytes)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}
