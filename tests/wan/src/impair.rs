//! What one direction of the emulated link does to a packet, without any I/O: time and packet
//! sizes are passed in, a verdict comes out, so the arithmetic is testable without TUN devices.
//!
//! Order of events, as on a real link: the packet joins the bottleneck queue (or is dropped at
//! its tail when the queue already holds more than `queue` worth of serialization time), is
//! serialized at the link rate (a "link free at" clock), may be lost on the wire (it used the
//! link's capacity all the same), then arrives one propagation delay (± jitter) later.

use std::time::{Duration, Instant};

use crate::LinkSpec;

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it to the far side at this instant.
    Deliver(Instant),
    /// Random loss on the wire.
    Lost,
    /// The bottleneck queue was full (drop-tail).
    QueueFull,
}

/// One direction's clocks and random source.
#[derive(Debug)]
pub struct Impairment {
    spec: LinkSpec,
    link_free_at: Instant,
    last_delivery: Instant,
    rng: SplitMix64,
}

impl Impairment {
    pub fn new(spec: LinkSpec, seed: u64, now: Instant) -> Impairment {
        Impairment {
            spec,
            link_free_at: now,
            last_delivery: now,
            rng: SplitMix64(seed),
        }
    }

    /// Decides the fate of a packet of `len` bytes (the whole IP packet) read at `now`.
    pub fn admit(&mut self, now: Instant, len: usize) -> Verdict {
        let mut finished = now;
        if self.spec.rate_bps > 0 {
            let backlog = self.link_free_at.saturating_duration_since(now);
            if backlog > self.spec.queue {
                return Verdict::QueueFull;
            }
            let bits = len as u128 * 8;
            let nanos = bits * 1_000_000_000 / u128::from(self.spec.rate_bps);
            let serialization = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
            finished = self.link_free_at.max(now) + serialization;
            self.link_free_at = finished;
        }
        if self.spec.loss > 0.0 && self.rng.unit() < self.spec.loss {
            return Verdict::Lost;
        }
        let delay = if self.spec.jitter.is_zero() {
            self.spec.delay
        } else {
            // Uniform in delay ± jitter; never negative.
            let span = self.spec.jitter.as_secs_f64() * (2.0 * self.rng.unit() - 1.0);
            Duration::from_secs_f64((self.spec.delay.as_secs_f64() + span).max(0.0))
        };
        // A link does not reorder: a packet never overtakes the one before it, so a jittered
        // delay shorter than its predecessor's waits for it. This also keeps delivery times
        // monotonic, which lets the forwarder use a FIFO instead of a timer heap.
        let at = (finished + delay).max(self.last_delivery);
        self.last_delivery = at;
        Verdict::Deliver(at)
    }
}

/// A tiny seeded generator: loss decisions are reproducible from the seed, and a test can
/// compare the emulator's counters with what the endpoints saw.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rate_bps: u64, delay_ms: u64, queue_ms: u64) -> LinkSpec {
        LinkSpec {
            rate_bps,
            delay: Duration::from_millis(delay_ms),
            jitter: Duration::ZERO,
            loss: 0.0,
            queue: Duration::from_millis(queue_ms),
        }
    }

    #[test]
    fn back_to_back_packets_leave_one_serialization_time_apart() {
        let t0 = Instant::now();
        // 1250 bytes at 1 Mbit/s take exactly 10 ms on the wire.
        let mut link = Impairment::new(spec(1_000_000, 50, 1000), 1, t0);
        let ms = Duration::from_millis;
        assert_eq!(link.admit(t0, 1250), Verdict::Deliver(t0 + ms(60)));
        assert_eq!(link.admit(t0, 1250), Verdict::Deliver(t0 + ms(70)));
        // An idle link starts serializing at arrival, not at its old free-at time.
        assert_eq!(
            link.admit(t0 + ms(100), 1250),
            Verdict::Deliver(t0 + ms(160))
        );
    }

    #[test]
    fn the_queue_drops_at_its_tail_once_it_holds_more_than_its_size() {
        let t0 = Instant::now();
        let mut link = Impairment::new(spec(1_000_000, 0, 25), 1, t0);
        // Each packet adds 10 ms of backlog; the fourth finds 30 ms queued (> 25 ms).
        for _ in 0..3 {
            assert!(matches!(link.admit(t0, 1250), Verdict::Deliver(_)));
        }
        assert_eq!(link.admit(t0, 1250), Verdict::QueueFull);
        // Once the backlog drains below the size, packets are accepted again.
        assert!(matches!(
            link.admit(t0 + Duration::from_millis(10), 1250),
            Verdict::Deliver(_)
        ));
    }

    #[test]
    fn jitter_never_reorders_and_stays_within_its_bounds() {
        let t0 = Instant::now();
        let mut s = spec(0, 50, 0);
        s.jitter = Duration::from_millis(10);
        let mut link = Impairment::new(s, 7, t0);
        let mut last = t0;
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_micros(i * 100);
            let Verdict::Deliver(at) = link.admit(now, 100) else {
                panic!("no loss configured");
            };
            assert!(at >= last, "packet {i} overtook its predecessor");
            assert!(at >= now + Duration::from_millis(40));
            // Waiting for a late predecessor can push a packet past delay + jitter, but never
            // past the latest any predecessor could arrive.
            assert!(at <= now + Duration::from_millis(60));
            last = at;
        }
    }

    #[test]
    fn loss_rate_matches_the_setting() {
        let t0 = Instant::now();
        let mut s = spec(0, 0, 0);
        s.loss = 0.03;
        let mut link = Impairment::new(s, 42, t0);
        let lost = (0..100_000)
            .filter(|_| link.admit(t0, 100) == Verdict::Lost)
            .count();
        // Binomial sd is ~54 packets: ±300 is over 5 sd.
        assert!((2_700..=3_300).contains(&lost), "lost {lost} of 100000");
    }
}
