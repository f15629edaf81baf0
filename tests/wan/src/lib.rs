//! A userspace WAN link between two network namespaces, for tests and benchmarks.
//!
//! The kernel here has no netem, so [`Link::start`] builds the link itself: two namespaces
//! (`edge` and `hub`), one TUN device in each (`wan0`, point-to-point addresses from the
//! benchmarking range 198.18.0.0/15), and a forwarder in this process that copies every IP
//! packet from one TUN device to the other through an [`impair::Impairment`] per direction:
//! drop-tail queue, rate, random loss, delay and jitter. UDP (QUIC) and TCP cross it alike.
//!
//! Programs run inside a namespace with [`Namespace::command`] (`ip netns exec`); sockets are
//! opened inside one with [`Namespace::enter`]. Dropping the [`Link`] stops the forwarder and
//! deletes both namespaces; namespaces left by a process that was killed are swept by the
//! next [`Link::start`]. Needs root and `/dev/net/tun`.

pub mod bench;
mod forward;
pub mod impair;
mod netns;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use forward::DirectionStats;
pub use netns::{run_in, Namespace};

/// The edge side's address, on its `wan0`.
pub const EDGE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The hub side's address, on its `wan0`.
pub const HUB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// One direction's impairments; [`Link::start`] applies the same to both directions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkSpec {
    /// Bottleneck rate in bits per second of IP packets; 0 means unlimited.
    pub rate_bps: u64,
    /// One-way propagation delay.
    pub delay: Duration,
    /// Delay varies uniformly within ± this, without reordering packets.
    pub jitter: Duration,
    /// Probability in [0, 1) that a packet is lost on the wire.
    pub loss: f64,
    /// Bottleneck buffer, in time at the link rate: a packet that finds more than this queued
    /// ahead of it is dropped (drop-tail).
    pub queue: Duration,
}

impl LinkSpec {
    /// A link with a bottleneck buffer of one bandwidth-delay product (the classic router
    /// sizing: a single Reno/Cubic flow keeps the link busy through its backoffs), at least
    /// 10 ms.
    pub fn new(rate_bps: u64, delay: Duration, loss: f64) -> LinkSpec {
        LinkSpec {
            rate_bps,
            delay,
            jitter: Duration::ZERO,
            loss,
            queue: (delay * 2).max(Duration::from_millis(10)),
        }
    }

    /// Round-trip time of an empty link.
    pub fn rtt(&self) -> Duration {
        self.delay * 2
    }

    fn check(&self) -> Result<(), WanError> {
        if !(0.0..1.0).contains(&self.loss) {
            return Err(WanError::Spec(format!(
                "loss {} is not in [0, 1)",
                self.loss
            )));
        }
        if self.jitter > self.delay {
            return Err(WanError::Spec(format!(
                "jitter {:?} exceeds delay {:?}",
                self.jitter, self.delay
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WanError {
    #[error("invalid link: {0}")]
    Spec(String),
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("running `ip`: {0}")]
    IpSpawn(#[source] std::io::Error),
    #[error("creating TUN device {name} (needs root and /dev/net/tun): {source}")]
    Tun {
        name: String,
        #[source]
        source: tun::Error,
    },
    #[error("entering namespace {name}: {source}")]
    Enter {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("inside namespace {name}: {source}")]
    Inside {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the forwarder: {0}")]
    Thread(#[source] std::io::Error),
}

/// Both directions' counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub edge_to_hub: DirectionStats,
    pub hub_to_edge: DirectionStats,
}

/// The running link. Field order is drop order: the forwarder stops (closing the TUN devices)
/// before the namespaces are deleted.
#[derive(Debug)]
pub struct Link {
    forwarder: forward::Forwarder,
    edge: Namespace,
    hub: Namespace,
    spec: LinkSpec,
}

impl Link {
    pub fn start(spec: LinkSpec) -> Result<Link, WanError> {
        spec.check()?;
        netns::sweep_stale();
        static RUN: AtomicU32 = AtomicU32::new(0);
        let run = RUN.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Namespaces are torn down by their guards if anything below fails.
        let edge = Namespace::create(&format!("{}{pid}-{run}-edge", netns::PREFIX), EDGE_ADDR)?;
        let hub = Namespace::create(&format!("{}{pid}-{run}-hub", netns::PREFIX), HUB_ADDR)?;
        // Interface names are limited to 15 bytes (a 7-digit pid leaves 3 for the run) and
        // exist in this namespace only until moved and renamed.
        let short = run % 1000;
        let edge_tun = netns::tun_device(&format!("spk{pid}x{short}e"))?;
        let hub_tun = netns::tun_device(&format!("spk{pid}x{short}h"))?;
        edge.adopt(edge_tun.name(), HUB_ADDR)?;
        hub.adopt(hub_tun.name(), EDGE_ADDR)?;
        let forwarder =
            forward::Forwarder::start(spec, edge_tun.into_device(), hub_tun.into_device())?;
        Ok(Link {
            forwarder,
            edge,
            hub,
            spec,
        })
    }

    pub fn spec(&self) -> LinkSpec {
        self.spec
    }

    pub fn edge(&self) -> &Namespace {
        &self.edge
    }

    pub fn hub(&self) -> &Namespace {
        &self.hub
    }

    pub fn stats(&self) -> LinkStats {
        self.forwarder.stats()
    }

    /// Cuts the link (`true`) or restores it (`false`); see [`forward::Forwarder::set_down`].
    pub fn set_down(&self, down: bool) {
        self.forwarder.set_down(down);
    }
}
