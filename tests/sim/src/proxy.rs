//! A TCP proxy in front of the hub broker that counts the Kafka requests going through it, by
//! API key: what the relay asks of the hub, e.g. per site during a reconnect storm. The broker
//! must advertise the proxy's port ([`spoke_tests::broker::Broker::start_behind`]), or clients
//! would go around it after their first metadata answer.
//!
//! Every Kafka request is a 4-byte big-endian length and a body starting with the i16 API key,
//! so the client-to-broker direction is forwarded frame by frame; answers are copied as bytes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// API keys counted one by one; higher ones (none in use by librdkafka's producer) are summed
/// under the last.
const API_KEYS: usize = 96;

/// A request larger than this is forwarded without being held whole: no Kafka client sends
/// one (the relay's produce requests are a few MiB at most), and the proxy must not allocate
/// what a corrupt length says.
const MAX_HELD_REQUEST: usize = 64 << 20;

/// What went through the proxy so far.
#[derive(Debug)]
pub struct Counts {
    requests: Vec<AtomicU64>,
    pub connections: AtomicU64,
    pub open: AtomicU64,
}

impl Counts {
    fn new() -> Counts {
        Counts {
            requests: (0..API_KEYS).map(|_| AtomicU64::new(0)).collect(),
            connections: AtomicU64::new(0),
            open: AtomicU64::new(0),
        }
    }

    fn request(&self, api_key: i16) {
        let index = usize::try_from(api_key)
            .unwrap_or(API_KEYS - 1)
            .min(API_KEYS - 1);
        self.requests[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests per API key so far.
    pub fn snapshot(&self) -> Vec<u64> {
        self.requests
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

/// The difference of two snapshots, as (API name, requests) for the keys that saw any.
pub fn requests_between(before: &[u64], after: &[u64]) -> Vec<(String, u64)> {
    after
        .iter()
        .enumerate()
        .filter_map(|(key, a)| {
            let n = a.saturating_sub(before.get(key).copied().unwrap_or(0));
            (n > 0).then(|| (api_name(key), n))
        })
        .collect()
}

fn api_name(key: usize) -> String {
    let name = match key {
        0 => "Produce",
        1 => "Fetch",
        2 => "ListOffsets",
        3 => "Metadata",
        8 => "OffsetCommit",
        9 => "OffsetFetch",
        10 => "FindCoordinator",
        11 => "JoinGroup",
        12 => "Heartbeat",
        13 => "LeaveGroup",
        14 => "SyncGroup",
        15 => "DescribeGroups",
        18 => "ApiVersions",
        19 => "CreateTopics",
        22 => "InitProducerId",
        24 => "AddPartitionsToTxn",
        25 => "AddOffsetsToTxn",
        26 => "EndTxn",
        28 => "TxnOffsetCommit",
        32 => "DescribeConfigs",
        37 => "CreatePartitions",
        60 => "DescribeCluster",
        71 => "GetTelemetrySubscriptions",
        72 => "PushTelemetry",
        _ => return format!("api_{key}"),
    };
    name.to_owned()
}

/// The running proxy; dropping it stops it and every connection through it.
#[derive(Debug)]
pub struct CountingProxy {
    pub counts: Arc<Counts>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CountingProxy {
    /// Listens on `listen` and forwards each connection to `target`, on a thread of its own
    /// (the simulated sites' runtime is busy enough).
    pub fn start(listen: SocketAddr, target: SocketAddr) -> anyhow::Result<CountingProxy> {
        let counts = Arc::new(Counts::new());
        let stop = CancellationToken::new();
        let listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("binding the hub proxy on {listen}"))?;
        listener.set_nonblocking(true)?;
        let (counting, stopping) = (counts.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("hub-proxy".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    eprintln!("hub proxy: cannot build its runtime");
                    return;
                };
                runtime.block_on(accept_loop(listener, target, counting, stopping));
            })?;
        Ok(CountingProxy {
            counts,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    target: SocketAddr,
    counts: Arc<Counts>,
    stop: CancellationToken,
) {
    let Ok(listener) = TcpListener::from_std(listener) else {
        eprintln!("hub proxy: cannot register its listener");
        return;
    };
    // Every connection's task is a child of this set, so a stop ends them all.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
            // Reap finished connections so the set does not grow with every one ever made.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(error) => {
                // Out of file descriptors (a relay with a connection per site): wait for some
                // to close instead of spinning on the error.
                eprintln!("hub proxy: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let counts = counts.clone();
        counts.connections.fetch_add(1, Ordering::Relaxed);
        counts.open.fetch_add(1, Ordering::Relaxed);
        connections.spawn(async move {
            if let Ok(server) = TcpStream::connect(target).await {
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                // Either side closing ends the connection, as a broker's close would.
                tokio::select! {
                    () = requests(client_read, server_write, &counts) => {}
                    _ = copy(server_read, client_write) => {}
                }
            }
            counts.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Forwards client requests one Kafka frame at a time, counting each by its API key.
async fn requests(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counts: &Counts,
) {
    let mut body = Vec::new();
    loop {
        let mut length = [0u8; 4];
        if from.read_exact(&mut length).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes(length) as usize;
        if !(2..=MAX_HELD_REQUEST).contains(&len) {
            // Not Kafka as this proxy knows it: pass the rest through uncounted.
            if to.write_all(&length).await.is_err() {
                return;
            }
            let _ = tokio::io::copy(&mut from, &mut to).await;
            return;
        }
        body.resize(len, 0);
        if from.read_exact(&mut body).await.is_err() {
            return;
        }
        counts.request(i16::from_be_bytes([body[0], body[1]]));
        if to.write_all(&length).await.is_err() || to.write_all(&body).await.is_err() {
            return;
        }
    }
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) -> std::io::Result<u64> {
    tokio::io::copy(&mut from, &mut to).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_api_key_and_answers_come_back() -> anyhow::Result<()> {
        let server = std::net::TcpListener::bind("127.0.0.1:0")?;
        let target = server.local_addr()?;
        let port = spoke_tests::free_port()?;
        let proxy = CountingProxy::start(([127, 0, 0, 1], port).into(), target)?;
        let echo = std::thread::spawn(move || -> anyhow::Result<Vec<u8>> {
            use std::io::{Read, Write};
            let (mut conn, _) = server.accept()?;
            let mut got = vec![0u8; 4 + 6 + 4 + 3];
            conn.read_exact(&mut got)?;
            conn.write_all(b"answer")?;
            Ok(got)
        });
        use std::io::{Read, Write};
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port))?;
        // Two requests: Metadata (3) with a 4-byte rest, Produce (0) with a 1-byte rest, the
        // second split across writes.
        client.write_all(&[0, 0, 0, 6, 0, 3, 1, 2, 3, 4, 0, 0])?;
        client.write_all(&[0, 3, 0, 0, 9])?;
        let mut answer = [0u8; 6];
        client.read_exact(&mut answer)?;
        assert_eq!(&answer, b"answer");
        let got = echo
            .join()
            .map_err(|_| anyhow::anyhow!("echo panicked"))??;
        assert_eq!(got, [0, 0, 0, 6, 0, 3, 1, 2, 3, 4, 0, 0, 0, 3, 0, 0, 9]);
        let counts = proxy.counts.snapshot();
        assert_eq!((counts[3], counts[0]), (1, 1));
        let named = requests_between(&[], &counts);
        assert_eq!(
            named,
            vec![("Produce".to_owned(), 1), ("Metadata".to_owned(), 1)]
        );
        Ok(())
    }
}
