//! BBR whose window follows the delivery rate measured over whole round trips.
//!
//! Two things in quinn 0.11 together made spoke overrun a bottleneck queue (20–39% of its
//! packets dropped at a one-BDP queue in docs/benchmarks.md, where TCP lost 0.6–3.3%):
//! - its pacer sends at 1.25 × window ÷ smoothed RTT and never reads BBR's pacing rate, so the
//!   window alone sets the sending rate;
//! - its BBR takes a bandwidth sample from each acknowledged packet over the gap since the
//!   previous ACK frame and keeps the maximum. Two ACK frames that arrive together make a
//!   sample many times the link rate, and BBR's window (2 × bandwidth × minimum RTT, plus ACK
//!   aggregation) grows with it.
//!
//! [`CappedBbr`] keeps BBR's state machine (start-up, drain, RTT probing, loss handling) and
//! caps its window at a gain × the delivery rate × the minimum RTT, where the delivery rate is
//! what was acknowledged over at least one minimum RTT: a burst of ACKs averages out over a
//! round trip. A window-limited sender keeps (gain − 1) × BDP in the bottleneck queue, and
//! because the gain is above 1, each round trip can deliver more than the last, so the
//! estimate (and the cap) rises to a faster link within a few round trips.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// Window over the estimated bandwidth-delay product once the pipe is full: a quarter of a BDP
/// queued at the bottleneck keeps it busy through ACK bunching without building a long queue.
const STEADY_GAIN: f64 = 1.25;
/// While the delivery rate still grows, the window may double each round trip, as BBR's own
/// start-up does.
const STARTUP_GAIN: f64 = 2.0;
/// The pipe counts as full after this many round trips without 25% more delivered (BBR's rule).
const ROUNDS_WITHOUT_GROWTH: u32 = 3;
/// The delivery rate is the best of this many round-trip samples (BBR's bandwidth filter).
const SAMPLES: usize = 10;
/// A floor on the measuring interval, so that a sub-millisecond loopback RTT still averages
/// over many ACK frames.
const MIN_INTERVAL: Duration = Duration::from_millis(5);
/// The cap never goes below this many full-size packets, as quinn's own minimum window.
const MIN_WINDOW_PACKETS: u64 = 4;

/// Builds [`CappedBbr`] controllers: the congestion controller spoke's connections use.
#[derive(Debug, Default)]
pub struct CappedBbrConfig {
    bbr: Arc<BbrConfig>,
}

impl ControllerFactory for CappedBbrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(CappedBbr {
            bbr: self.bbr.clone().build(now, current_mtu),
            rate: DeliveryRate::default(),
            min_rtt: None,
            mtu: current_mtu,
        })
    }
}

/// See the module documentation.
pub struct CappedBbr {
    bbr: Box<dyn Controller>,
    rate: DeliveryRate,
    min_rtt: Option<Duration>,
    mtu: u16,
}

impl std::fmt::Debug for CappedBbr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CappedBbr")
            .field("bbr_window", &self.bbr.window())
            .field("rate", &self.rate)
            .field("min_rtt", &self.min_rtt)
            .field("cap", &self.cap())
            .finish()
    }
}

impl CappedBbr {
    fn cap(&self) -> Option<u64> {
        let bytes_per_s = self.rate.best()?;
        let min_rtt = self.min_rtt?;
        let gain = if self.rate.pipe_full() {
            STEADY_GAIN
        } else {
            STARTUP_GAIN
        };
        let window = (bytes_per_s as f64 * min_rtt.as_secs_f64() * gain) as u64;
        Some(window.max(MIN_WINDOW_PACKETS * u64::from(self.mtu)))
    }
}

impl Controller for CappedBbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.bbr.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        let min_rtt = rtt.min();
        self.min_rtt = Some(min_rtt);
        self.rate
            .on_ack(now, bytes, app_limited, min_rtt.max(MIN_INTERVAL));
        self.bbr.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.bbr
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.bbr
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu;
        self.bbr.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        let window = self.bbr.window();
        self.cap().map_or(window, |cap| window.min(cap))
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut metrics = self.bbr.metrics();
        metrics.congestion_window = self.window();
        metrics
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(CappedBbr {
            bbr: self.bbr.clone_box(),
            rate: self.rate.clone(),
            min_rtt: self.min_rtt,
            mtu: self.mtu,
        })
    }

    fn initial_window(&self) -> u64 {
        self.bbr.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Bytes acknowledged per second, measured over intervals of at least one round trip, and the
/// best of the last [`SAMPLES`] of them.
#[derive(Debug, Clone, Default)]
struct DeliveryRate {
    acked: u64,
    /// Start of the current interval: when, and `acked` then.
    interval: Option<(Instant, u64)>,
    /// The sender ran out of data at some point in the current interval, so its rate says
    /// little about the path unless it beats the estimate anyway.
    interval_app_limited: bool,
    /// Bytes per second, oldest first.
    samples: VecDeque<u64>,
    /// The best estimate when the delivery rate last grew by 25%.
    growth_base: u64,
    rounds_without_growth: u32,
}

impl DeliveryRate {
    fn on_ack(&mut self, now: Instant, bytes: u64, app_limited: bool, interval: Duration) {
        self.acked += bytes;
        self.interval_app_limited |= app_limited;
        let Some((start, acked_at_start)) = self.interval else {
            // The first ACK only starts the clock: its bytes were sent before any interval.
            self.interval = Some((now, self.acked));
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < interval {
            return;
        }
        let bytes_per_s =
            ((self.acked - acked_at_start) as f64 / elapsed.as_secs_f64()).round() as u64;
        let best = self.best().unwrap_or(0);
        if !self.interval_app_limited || bytes_per_s > best {
            if self.samples.len() == SAMPLES {
                self.samples.pop_front();
            }
            self.samples.push_back(bytes_per_s);
            self.note_growth(bytes_per_s, self.interval_app_limited);
        }
        self.interval = Some((now, self.acked));
        self.interval_app_limited = false;
    }

    /// BBR's full-pipe test: three round trips in a row that the sender filled without
    /// raising the delivery rate by a quarter.
    fn note_growth(&mut self, bytes_per_s: u64, app_limited: bool) {
        if self.pipe_full() {
            return;
        }
        if bytes_per_s as f64 >= self.growth_base as f64 * 1.25 {
            self.growth_base = bytes_per_s;
            self.rounds_without_growth = 0;
        } else if !app_limited {
            self.rounds_without_growth += 1;
        }
    }

    fn pipe_full(&self) -> bool {
        self.rounds_without_growth >= ROUNDS_WITHOUT_GROWTH
    }

    fn best(&self) -> Option<u64> {
        self.samples.iter().copied().max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(100);

    /// Acknowledges `bytes_per_rtt` each round trip for `rounds` round trips, in ACK frames
    /// that arrive in bursts of two at the same instant (the pattern that inflates quinn's
    /// per-packet estimate).
    fn deliver(
        rate: &mut DeliveryRate,
        start: Instant,
        bytes_per_rtt: u64,
        rounds: u32,
    ) -> Instant {
        let frames = 20u32;
        let mut now = start;
        for _ in 0..rounds {
            for frame in 0..frames {
                if frame % 2 == 0 {
                    now += RTT / frames * 2;
                }
                rate.on_ack(now, bytes_per_rtt / u64::from(frames), false, RTT);
            }
        }
        now
    }

    #[test]
    fn bursts_of_acks_do_not_inflate_the_rate() {
        let mut rate = DeliveryRate::default();
        // 250 kB per 100 ms: 2.5 MB/s, 20 Mbit/s.
        deliver(&mut rate, Instant::now(), 250_000, 12);
        let best = rate.best().expect("a sample after one round trip") as f64;
        assert!(
            (best - 2_500_000.0).abs() / 2_500_000.0 < 0.15,
            "estimate {best} B/s for 2.5 MB/s"
        );
    }

    #[test]
    fn the_pipe_is_full_after_three_round_trips_without_growth_and_not_before() {
        let mut rate = DeliveryRate::default();
        let mut now = Instant::now();
        for bytes in [10_000, 20_000, 40_000, 80_000] {
            now = deliver(&mut rate, now, bytes, 1);
            assert!(
                !rate.pipe_full(),
                "still growing at {bytes} bytes per round trip"
            );
        }
        deliver(&mut rate, now, 80_000, 4);
        assert!(rate.pipe_full());
    }

    #[test]
    fn app_limited_rounds_do_not_lower_the_estimate() {
        let mut rate = DeliveryRate::default();
        let now = deliver(&mut rate, Instant::now(), 250_000, 12);
        let before = rate.best();
        let mut later = now;
        for _ in 0..(SAMPLES as u32 * 40) {
            later += RTT / 20;
            rate.on_ack(later, 100, true, RTT);
        }
        assert_eq!(rate.best(), before);
    }

    #[test]
    fn a_slower_path_lowers_the_estimate_within_the_filter_length() {
        let mut rate = DeliveryRate::default();
        let now = deliver(&mut rate, Instant::now(), 250_000, 12);
        deliver(&mut rate, now, 25_000, SAMPLES as u32 + 2);
        let best = rate.best().expect("samples") as f64;
        assert!(
            best < 300_000.0,
            "estimate {best} B/s after the path slowed to 250 kB/s"
        );
    }

    #[test]
    fn the_cap_is_the_steady_gain_times_the_bdp_once_the_pipe_is_full() {
        let factory = Arc::new(CappedBbrConfig::default());
        let mut controller = CappedBbr {
            bbr: factory.bbr.clone().build(Instant::now(), 1200),
            rate: DeliveryRate::default(),
            min_rtt: Some(RTT),
            mtu: 1200,
        };
        deliver(&mut controller.rate, Instant::now(), 250_000, 12);
        assert!(controller.rate.pipe_full());
        let cap = controller.cap().expect("a cap once the rate is known");
        let expected = 250_000.0 * STEADY_GAIN;
        assert!(
            (cap as f64 - expected).abs() / expected < 0.15,
            "cap {cap} for {expected}"
        );
    }
}
