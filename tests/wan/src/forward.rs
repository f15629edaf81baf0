//! The packet forwarder: per direction, a reader thread that takes packets from one TUN device
//! and judges them, and a writer thread that hands them to the other device when due.
//!
//! Plain threads rather than tokio: the writer sleeps until each packet's delivery instant,
//! and a thread sleep is accurate to tens of microseconds where tokio's timer rounds to
//! milliseconds.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::impair::{Impairment, Verdict};
use crate::{LinkSpec, LinkStats, WanError};

/// Packets judged but not yet delivered, per direction: 3.75 MB in flight at 100 Mbit/s and
/// 300 ms is ~2,600 full-size packets, so this bound is only reached by a flood of tiny ones.
const IN_FLIGHT: usize = 65_536;
/// How often an idle reader looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Larger than any packet a 1500-byte MTU device hands over.
const MAX_PACKET: usize = 65_536;

/// One direction's counters since the link started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Random loss.
    pub lost: u64,
    /// Drop-tail at the bottleneck queue, or the in-flight bound.
    pub queue_dropped: u64,
    /// Dropped while the link was down ([`crate::Link::set_down`]).
    pub outage_dropped: u64,
    pub delivered: u64,
    pub delivered_bytes: u64,
    /// Reads or writes the TUN devices refused.
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    packets_in: AtomicU64,
    bytes_in: AtomicU64,
    lost: AtomicU64,
    queue_dropped: AtomicU64,
    outage_dropped: AtomicU64,
    delivered: AtomicU64,
    delivered_bytes: AtomicU64,
    errors: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DirectionStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DirectionStats {
            packets_in: get(&self.packets_in),
            bytes_in: get(&self.bytes_in),
            lost: get(&self.lost),
            queue_dropped: get(&self.queue_dropped),
            outage_dropped: get(&self.outage_dropped),
            delivered: get(&self.delivered),
            delivered_bytes: get(&self.delivered_bytes),
            errors: get(&self.errors),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

pub(crate) struct Forwarder {
    stop: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    edge_to_hub: Arc<Counters>,
    hub_to_edge: Arc<Counters>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl Forwarder {
    pub(crate) fn start(
        spec: LinkSpec,
        edge: tun::Device,
        hub: tun::Device,
    ) -> Result<Forwarder, WanError> {
        let edge = Arc::new(edge);
        let hub = Arc::new(hub);
        let mut forwarder = Forwarder {
            stop: Arc::new(AtomicBool::new(false)),
            down: Arc::new(AtomicBool::new(false)),
            threads: Vec::with_capacity(4),
            edge_to_hub: Arc::default(),
            hub_to_edge: Arc::default(),
        };
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let seed = u64::from(std::process::id()) << 32 ^ u64::from(clock);
        let directions = [
            (
                "e2h",
                edge.clone(),
                hub.clone(),
                forwarder.edge_to_hub.clone(),
                seed,
            ),
            ("h2e", hub, edge, forwarder.hub_to_edge.clone(), !seed),
        ];
        for (label, from, to, counters, seed) in directions {
            let (tx, rx) = mpsc::sync_channel(IN_FLIGHT);
            let impairment = Impairment::new(spec, seed, Instant::now());
            let (stop, down, read_counters) = (
                forwarder.stop.clone(),
                forwarder.down.clone(),
                counters.clone(),
            );
            // On failure, `forwarder` is dropped here and stops the threads already started.
            forwarder.spawn(format!("wan-{label}-in"), move || {
                read_loop(&from, impairment, &tx, &stop, &down, &read_counters)
            })?;
            let stop = forwarder.stop.clone();
            forwarder.spawn(format!("wan-{label}-out"), move || {
                write_loop(&to, &rx, &stop, &counters)
            })?;
        }
        Ok(forwarder)
    }

    fn spawn(&mut self, name: String, f: impl FnOnce() + Send + 'static) -> Result<(), WanError> {
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(f)
            .map_err(WanError::Thread)?;
        self.threads.push(handle);
        Ok(())
    }

    /// Drops every packet in both directions while `down`, as a cut cable or a dead router
    /// would: the endpoints see silence, not refusals. Packets already in flight still arrive.
    pub(crate) fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> LinkStats {
        LinkStats {
            edge_to_hub: self.edge_to_hub.snapshot(),
            hub_to_edge: self.hub_to_edge.snapshot(),
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Readers notice within POLL and drop their senders; writers then see the channel
        // closed (or the flag) and return. The TUN devices close with the last thread.
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn read_loop(
    from: &tun::Device,
    mut impairment: Impairment,
    tx: &SyncSender<(Instant, Vec<u8>)>,
    stop: &AtomicBool,
    down: &AtomicBool,
    counters: &Counters,
) {
    let mut buf = vec![0u8; MAX_PACKET];
    while !stop.load(Ordering::Relaxed) {
        let n = match from.recv_timeout(&mut buf, POLL) {
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(_) => {
                Counters::add(&counters.errors, 1);
                std::thread::sleep(POLL);
                continue;
            }
        };
        Counters::add(&counters.packets_in, 1);
        Counters::add(&counters.bytes_in, n as u64);
        if down.load(Ordering::Relaxed) {
            Counters::add(&counters.outage_dropped, 1);
            continue;
        }
        match impairment.admit(Instant::now(), n) {
            Verdict::Deliver(at) => match tx.try_send((at, buf[..n].to_vec())) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => Counters::add(&counters.queue_dropped, 1),
                Err(TrySendError::Disconnected(_)) => return,
            },
            Verdict::Lost => Counters::add(&counters.lost, 1),
            Verdict::QueueFull => Counters::add(&counters.queue_dropped, 1),
        }
    }
}

fn write_loop(
    to: &tun::Device,
    rx: &Receiver<(Instant, Vec<u8>)>,
    stop: &AtomicBool,
    counters: &Counters,
) {
    // Delivery instants never decrease (see `Impairment::admit`), so a FIFO suffices.
    for (at, packet) in rx {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let wait = at.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        match to.send(&packet) {
            Ok(_) => {
                Counters::add(&counters.delivered, 1);
                Counters::add(&counters.delivered_bytes, packet.len() as u64);
            }
            Err(_) => Counters::add(&counters.errors, 1),
        }
    }
}
