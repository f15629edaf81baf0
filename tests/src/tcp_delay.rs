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
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::accept_loop::AcceptLoop;

/// Chunks in flight per direction of one connection.
const IN_FLIGHT: usize = 4096;

/// The proxy; it stops (and drops its connections) when dropped.
#[derive(Debug)]
pub struct DelayProxy {
    pub listen: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    _accepting: AcceptLoop,
}

impl DelayProxy {
    /// Listens on `listen` and forwards each connection to `target`, with no delay yet.
    pub fn start(listen: SocketAddr, target: SocketAddr) -> anyhow::Result<DelayProxy> {
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = delay_ms.clone();
        let accepting = AcceptLoop::start("delay-proxy", listen, move |client| {
            let delay = delay.clone();
            async move {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                // Either side closing ends the connection, as a broker's close would.
                tokio::select! {
                    () = pump(client_read, server_write, delay.clone()) => {}
                    () = pump(server_read, client_write, delay) => {}
                }
            }
        })?;
        Ok(DelayProxy {
            listen,
            delay_ms,
            _accepting: accepting,
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
