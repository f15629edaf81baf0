//! End-to-end harness: real tansu brokers, real `spoke-relay` and `spoke-agent` processes.
//!
//! Everything a test starts is owned by a guard that kills it on drop, and lives in a
//! temporary directory that disappears with the test, so a failing test leaves nothing behind.
//! On failure, the child processes' logs are printed (see [`process::Spoke`]).

pub mod accept_loop;
pub mod admin;
pub mod broker;
pub mod flood;
pub mod hostile;
pub mod kafka;
pub mod load;
pub mod markers;
pub mod mix;
pub mod oracle;
pub mod pki;
pub mod process;
pub mod sasl_front;
pub mod site;
pub mod tcp_delay;
pub mod tls_terminator;
pub mod token_endpoint;
pub mod udp_proxy;

use std::time::{Duration, Instant};

/// Polls `check` until it returns `Ok(true)` or `timeout` passes; the error names `what`
/// and the last check error, so a failing test says what it was waiting for.
pub fn eventually<F>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> anyhow::Result<bool>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => last_error = Some(error),
        }
        if Instant::now() >= deadline {
            match last_error {
                Some(error) => {
                    anyhow::bail!("timed out after {timeout:?} waiting for {what}: {error:#}")
                }
                None => anyhow::bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs one named case of a test whose cases share an expensive environment (brokers, relay,
/// agent) and therefore run in sequence inside one `#[test]`: prints how the case went and
/// how long it took, and a failure's error starts with `case <name>`, so it says which case.
pub fn case<T>(name: &str, run: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    use anyhow::Context as _;
    let started = Instant::now();
    let result = run().with_context(|| format!("case {name}"));
    println!(
        "case {name}: {} in {:.1}s",
        if result.is_ok() { "ok" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    result
}

/// A port free on loopback for both TCP and UDP (bound and released; good enough for tests),
/// below the kernel's ephemeral range. A port from that range (what binding port 0 gives) can
/// be handed to any outgoing connection before the process meant to listen on it starts: a
/// Kafka client of the same test took an agent's admin port that way ("Address already in
/// use", 2026-12-08 in CI).
pub fn free_port() -> anyhow::Result<u16> {
    // The kernel picks a port free for TCP; UDP may hold the same number, since concurrent
    // tests open many ephemeral UDP sockets (QUIC clients, the flood of bogus clients), so a
    // taken one means trying another rather than failing the test.
    const ATTEMPTS: usize = 256;
    let (low, high) = below_ephemeral_ports();
    for attempt in 0..ATTEMPTS {
        let port = if low < high {
            low + u16::try_from(spread(attempt) % u64::from(high - low)).unwrap_or(0)
        } else {
            std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port()
        };
        let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) else {
            continue;
        };
        match std::net::UdpSocket::bind(("127.0.0.1", port)) {
            Ok(_) => {
                drop(listener);
                return Ok(port);
            }
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(error) => return Err(error.into()),
        }
    }
    anyhow::bail!("no loopback port free for both TCP and UDP in {ATTEMPTS} attempts")
}

/// Ports tests choose from: from 10000 up to the start of the kernel's ephemeral range, or
/// none (then the kernel chooses) where that range starts too low.
fn below_ephemeral_ports() -> (u16, u16) {
    const LOW: u16 = 10_000;
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if start > LOW + 1_000 {
        (LOW, start)
    } else {
        (0, 0)
    }
}

/// A different pseudo-random number per call across the processes and threads of a test run.
fn spread(attempt: usize) -> u64 {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ call.wrapping_mul(0x9e37_79b9)
        ^ attempt as u64;
    // splitmix64's finaliser: nearby inputs land far apart.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
