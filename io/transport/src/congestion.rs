//! A congestion window sized from the measured bandwidth-delay product.
//!
//! spoke used quinn 0.11's BBR, which overran the bottleneck queue: 34–55% of its packets were
//! dropped at the one-BDP queues of the emulated links (docs/benchmarks.md), where TCP lost a
//! few percent. Two things in quinn together cause that:
//! - its pacer sends at 1.25 × window ÷ smoothed RTT and never reads BBR's pacing rate, so the
//!   window alone sets the sending rate;
//! - its BBR takes a bandwidth sample from each acknowledged packet over the gap since the
//!   previous ACK frame and keeps the maximum. Two ACK frames that arrive together make a
//!   sample many times the link rate, and BBR's window (2 × bandwidth × minimum RTT, plus ACK
//!   aggregation) grows with it.
//!
//! Capping BBR's window at the real delivery rate stopped the drops but not BBR's loss
//! recovery, which shrinks the window to what is in flight at every loss: with 3% random loss
//! at 2 Mbit/s that cut spoke's rate by a fifth (659 against 831 records/s). [`BdpWindow`]
//! therefore keeps only BBR's model, without relying on pacing:
//! - the delivery rate is what was acknowledged over at least one minimum RTT (a round), so a
//!   burst of ACKs averages out; the estimate is the best of the last ten rounds;
//! - start-up is slow start (the window grows by what is acknowledged), bounded by
//!   [`STARTUP_GAIN`] × the estimated BDP; until the pipe is first full the estimate also
//!   takes BBR's per-packet delivery rate ([`PacketRate`]), so that the bound keeps up with a
//!   window that doubles each round;
//! - the pipe is full once a round the sender filled finds a queue (HyStart++'s delay test, on
//!   the quickest packet of the round) or three rounds bring no 25% more delivery (BBR's test);
//!   the window is then [`STEADY_GAIN`] × the estimated BDP. A window-limited sender keeps a
//!   quarter BDP queued at the bottleneck, and since each round can deliver a quarter more than
//!   the estimate, the estimate follows a path that gained capacity; when a filled round finds
//!   no queue, the start-up gain applies again;
//! - random loss does not shrink the window, as in BBR: edge links lose packets that were
//!   never congestion. Persistent congestion (every packet over several PTOs lost) starts over
//!   from the initial window.
//!
//! Measured with `spoke-wan bench` (docs/benchmarks.md): no packet dropped at the queue on the
//! three links, at the goodput quinn's BBR reached there with 34–55% dropped.
//!
//! The minimum RTT is quinn's, over the connection's life. A path whose RTT grows for good
//! keeps a window sized for the old RTT, and with it a lower rate, until the agent reconnects.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory};
use quinn_proto::RttEstimator;

/// Window over the estimated bandwidth-delay product once the pipe is full: a quarter of a BDP
/// queued at the bottleneck keeps it busy through ACK bunching without building a long queue.
pub const STEADY_GAIN: f64 = 1.25;
/// Bound on slow start over the estimated BDP. A packet's delivery rate is known a round trip
/// after it was sent, when slow start has doubled the window since, so a gain of 2 lets the
/// window double per round; in exchange, the delay test's round of lag can overshoot to at
/// most twice the BDP, which a one-BDP bottleneck buffer holds (with 2.89, BBR's start-up
/// gain, 1.5% of a benchmark run's packets were dropped at 2 Mbit/s and 4% at 20 Mbit/s).
pub const STARTUP_GAIN: f64 = 2.0;
/// The pipe counts as full after this many round trips without 25% more delivered (BBR's rule).
const ROUNDS_WITHOUT_GROWTH: u32 = 3;
/// The delivery rate is the best of this many round-trip samples (BBR's bandwidth filter).
const SAMPLES: usize = 10;
/// A floor on the measuring interval and on the RTT the window is sized from, so that a
/// sub-millisecond loopback RTT still averages over many ACK frames and leaves room for them.
const MIN_INTERVAL: Duration = Duration::from_millis(5);
/// Initial window in full-size packets: 38 kB, as Google's QUIC used. RFC 9002's 10 would add
/// about three rounds to every start-up, and a start-up after an outage is when the agent has
/// its largest backlog to move.
const INITIAL_WINDOW_PACKETS: u64 = 32;
/// The window never goes below this many full-size packets, as quinn's own minimum window.
const MIN_WINDOW_PACKETS: u64 = 4;

/// Builds [`BdpWindow`] controllers: the congestion controller spoke's connections use.
#[derive(Debug, Clone, Default)]
pub struct BdpWindowConfig {
    link_limited: Option<Arc<LinkLimited>>,
}

impl BdpWindowConfig {
    /// Controllers that tell `link_limited` whenever the window, not a lack of data, held the
    /// sender back.
    pub fn reporting_to(link_limited: Arc<LinkLimited>) -> BdpWindowConfig {
        BdpWindowConfig {
            link_limited: Some(link_limited),
        }
    }
}

impl ControllerFactory for BdpWindowConfig {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let mut controller = BdpWindow::new(current_mtu);
        controller.link_limited = self.link_limited.clone();
        Box::new(controller)
    }
}

/// How much of the recent time a connection's congestion window, rather than a lack of data,
/// held its sender back: near 1 while the link is the bottleneck; near 0 while the sender
/// waits for data (the agent: for the hub's confirmations), even if its bursts fill the window
/// for a moment. Written by the connection's controller on every acknowledgement, read by
/// whoever wants to know (the agent's tailer and metrics).
#[derive(Debug)]
pub struct LinkLimited {
    origin: Instant,
    /// Milliseconds from `origin` plus one of the last report, shifted left by
    /// [`SHARE_BITS`], and the share in thousandths below them: one word, so a reader never
    /// sees the share of one report with the time of another. 0: never reported.
    report: AtomicU64,
}

/// Bits of [`LinkLimited::report`] that hold the share (0–1000).
const SHARE_BITS: u32 = 10;
/// The time constant of the share's moving average: long enough that the bursts of a sender
/// waiting on something else average out, short enough to follow a backlog within a second.
const SHARE_TIME_CONSTANT: Duration = Duration::from_secs(1);

impl Default for LinkLimited {
    fn default() -> Self {
        LinkLimited {
            origin: Instant::now(),
            report: AtomicU64::new(0),
        }
    }
}

impl LinkLimited {
    fn publish(&self, now: Instant, share: f64) {
        let ms = u64::try_from(now.saturating_duration_since(self.origin).as_millis())
            .unwrap_or(u64::MAX >> SHARE_BITS);
        let permille = (share.clamp(0.0, 1.0) * 1000.0).round() as u64;
        self.report.store(
            (ms.saturating_add(1) << SHARE_BITS) | permille,
            Ordering::Relaxed,
        );
    }

    /// The window held the sender back more than half of the recent time, by a report at most
    /// `fresh` old: without acknowledgements (idle, or no connection) there is no report.
    pub fn is_bottleneck(&self, fresh: Duration, now: Instant) -> bool {
        let report = self.report.load(Ordering::Relaxed);
        let stamp = report >> SHARE_BITS;
        if stamp == 0 {
            return false;
        }
        let at = self.origin + Duration::from_millis(stamp - 1);
        let permille = report & ((1 << SHARE_BITS) - 1);
        now.saturating_duration_since(at) <= fresh && permille > 500
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct BdpWindow {
    rate: DeliveryRate,
    min_rtt: Option<Duration>,
    mtu: u16,
    /// The window slow start has reached; `None` once the pipe was first full, after which a
    /// path that gains capacity grows at the start-up gain alone.
    slow_start_window: Option<u64>,
    link_limited: Option<Arc<LinkLimited>>,
    /// Moving share of the time the window held the sender back (see [`LinkLimited`]), and
    /// the last acknowledgement: when, and whether the window was holding the sender back.
    window_limited_share: f64,
    last_ack: Option<(Instant, bool)>,
}

impl BdpWindow {
    fn new(mtu: u16) -> BdpWindow {
        BdpWindow {
            rate: DeliveryRate::default(),
            min_rtt: None,
            mtu,
            slow_start_window: Some(INITIAL_WINDOW_PACKETS * u64::from(mtu)),
            link_limited: None,
            window_limited_share: 0.0,
            last_ack: None,
        }
    }

    /// [`Controller::on_ack`] with the one figure of quinn's RTT estimator it uses.
    fn on_acked(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        min_rtt: Duration,
    ) {
        self.min_rtt = Some(min_rtt);
        if let Some(link_limited) = &self.link_limited {
            // The time since the last acknowledgement counts as that acknowledgement found the
            // sender: an idle gap after a burst as not window-limited.
            if let Some((at, limited)) = self.last_ack {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                let weight = 1.0 - (-elapsed / SHARE_TIME_CONSTANT.as_secs_f64()).exp();
                let sample = if limited { 1.0 } else { 0.0 };
                self.window_limited_share += (sample - self.window_limited_share) * weight;
            }
            self.last_ack = Some((now, !app_limited));
            link_limited.publish(now, self.window_limited_share);
        }
        if self.rate.pipe_full() {
            self.slow_start_window = None;
        } else if let Some(window) = self.slow_start_window.as_mut() {
            if !app_limited {
                *window += bytes;
            }
        }
        self.rate.on_ack(now, sent, bytes, app_limited, min_rtt);
    }

    /// Estimated bandwidth-delay product, in bytes, over at least [`MIN_INTERVAL`]: on loopback
    /// or a LAN, ACK delays and the peer's scheduling stretch the round trip many times over
    /// its sub-millisecond minimum, and a window of 1.25 × that minimum would deliver less
    /// each round than the one before.
    fn bdp(&self) -> Option<f64> {
        let rtt = self.min_rtt?.max(MIN_INTERVAL);
        Some(self.rate.best()? as f64 * rtt.as_secs_f64())
    }
}

impl Controller for BdpWindow {
    fn on_sent(&mut self, now: Instant, _bytes: u64, _last_packet_number: u64) {
        self.rate.on_sent(now);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.on_acked(now, sent, bytes, app_limited, rtt.min());
    }

    fn on_congestion_event(
        &mut self,
        _now: Instant,
        _sent: Instant,
        is_persistent_congestion: bool,
        _lost_bytes: u64,
    ) {
        if is_persistent_congestion {
            *self = BdpWindow {
                link_limited: self.link_limited.take(),
                window_limited_share: self.window_limited_share,
                last_ack: self.last_ack,
                ..BdpWindow::new(self.mtu)
            };
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu;
    }

    fn window(&self) -> u64 {
        let floor = MIN_WINDOW_PACKETS * u64::from(self.mtu);
        let window = match (self.bdp(), self.rate.pipe_full()) {
            (Some(bdp), true) => (bdp * STEADY_GAIN) as u64,
            // Never below the initial window in start-up: the handshake's few packets make an
            // app-limited first sample far below what the path can take.
            (Some(bdp), false) => match self.slow_start_window {
                Some(slow_start) => slow_start
                    .min((bdp * STARTUP_GAIN) as u64)
                    .max(self.initial_window()),
                None => (bdp * STARTUP_GAIN) as u64,
            },
            (None, _) => self.slow_start_window.unwrap_or(self.initial_window()),
        };
        window.max(floor)
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        INITIAL_WINDOW_PACKETS * u64::from(self.mtu)
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Bytes acknowledged per second, measured over intervals of at least one minimum RTT (a
/// round), the best of the last [`SAMPLES`] of them, and whether the pipe is full.
#[derive(Debug, Clone)]
struct DeliveryRate {
    acked: u64,
    /// Start of the current round: when, and `acked` then.
    round: Option<(Instant, u64)>,
    /// The sender ran out of data at some point in the current round, so its rate says
    /// little about the path unless it beats the estimate anyway.
    round_app_limited: bool,
    /// Quickest round trip of a packet acknowledged in this round: the least disturbed by
    /// delayed ACKs and bursts.
    round_min_rtt: Option<Duration>,
    /// Bytes per second, oldest first.
    samples: VecDeque<u64>,
    /// The best estimate when the delivery rate last grew by 25%.
    growth_base: u64,
    rounds_without_growth: u32,
    /// The last round the sender filled found a queue at the bottleneck.
    queue_seen: bool,
    /// Per-packet samples until the pipe is first full; `None` after.
    start_up: Option<PacketRate>,
    /// The best per-packet sample of the current round.
    round_packet_best: u64,
}

impl Default for DeliveryRate {
    fn default() -> Self {
        DeliveryRate {
            acked: 0,
            round: None,
            round_app_limited: false,
            round_min_rtt: None,
            samples: VecDeque::new(),
            growth_base: 0,
            rounds_without_growth: 0,
            queue_seen: false,
            start_up: Some(PacketRate::default()),
            round_packet_best: 0,
        }
    }
}

impl DeliveryRate {
    /// Packets were sent `now`.
    fn on_sent(&mut self, now: Instant) {
        if let Some(start_up) = self.start_up.as_mut() {
            start_up.on_sent(now, self.acked);
        }
    }

    /// One acknowledged packet of `bytes`, sent at `sent`.
    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        min_rtt: Duration,
    ) {
        let packet_rtt = now.saturating_duration_since(sent);
        self.acked += bytes;
        if let Some(start_up) = self.start_up.as_mut() {
            if let Some(sample) = start_up.on_ack(now, sent, self.acked) {
                self.round_packet_best = self.round_packet_best.max(sample);
            }
        }
        self.round_app_limited |= app_limited;
        self.round_min_rtt = Some(self.round_min_rtt.map_or(packet_rtt, |m| m.min(packet_rtt)));
        let Some((start, acked_at_start)) = self.round else {
            // The first ACK only starts the clock: its bytes were sent before any round.
            self.round = Some((now, self.acked));
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < min_rtt.max(MIN_INTERVAL) {
            return;
        }
        let bytes_per_s =
            ((self.acked - acked_at_start) as f64 / elapsed.as_secs_f64()).round() as u64;
        let bytes_per_s = bytes_per_s.max(std::mem::take(&mut self.round_packet_best));
        let best = self.best().unwrap_or(0);
        if !self.round_app_limited || bytes_per_s > best {
            if self.samples.len() == SAMPLES {
                self.samples.pop_front();
            }
            self.samples.push_back(bytes_per_s);
            self.note_growth(bytes_per_s, self.round_app_limited);
        }
        if let Some(round_min_rtt) = self.round_min_rtt.take() {
            if !self.round_app_limited {
                self.note_delay(round_min_rtt, min_rtt);
            }
        }
        self.round = Some((now, self.acked));
        self.round_app_limited = false;
        if self.pipe_full() {
            self.start_up = None;
        }
    }

    /// HyStart++'s delay test on a round the sender filled: a queue stands at the bottleneck
    /// while even the quickest packet of the round took longer than the minimum RTT plus an
    /// eighth of it (at least 4 ms, timer noise; at most 16 ms). Judged again every round, so
    /// that a path that gained capacity (no queue although the window is full) grows again at
    /// the start-up gain.
    fn note_delay(&mut self, round_min_rtt: Duration, min_rtt: Duration) {
        let threshold = (min_rtt / 8).clamp(Duration::from_millis(4), Duration::from_millis(16));
        self.queue_seen = round_min_rtt > min_rtt + threshold;
    }

    /// BBR's full-pipe test: three round trips in a row that the sender filled without
    /// raising the delivery rate by a quarter.
    fn note_growth(&mut self, bytes_per_s: u64, app_limited: bool) {
        if bytes_per_s as f64 >= self.growth_base as f64 * 1.25 {
            self.growth_base = bytes_per_s;
            self.rounds_without_growth = 0;
        } else if !app_limited {
            self.rounds_without_growth = self.rounds_without_growth.saturating_add(1);
        }
    }

    fn pipe_full(&self) -> bool {
        self.queue_seen || self.rounds_without_growth >= ROUNDS_WITHOUT_GROWTH
    }

    /// The best sample of the last [`SAMPLES`] rounds and, in start-up, of the current
    /// round's packets so far: a window growing through a round is not held at the last
    /// round's figure.
    fn best(&self) -> Option<u64> {
        let rounds = self.samples.iter().copied().max();
        match (rounds, self.round_packet_best) {
            (rounds, 0) => rounds,
            (rounds, packets) => Some(rounds.unwrap_or(0).max(packets)),
        }
    }
}

/// Most send states kept: a few round trips of ACK frames at the rates spoke sees; older ones
/// are dropped (their packets then give no sample), so memory stays bounded whatever the
/// peer acknowledges.
const MAX_SEND_STATES: usize = 4096;

/// The delivery rate of each acknowledged packet, as BBR measures it
/// (draft-cheng-iccrg-delivery-rate-estimation): the bytes acknowledged between the last ACK
/// before the packet was sent and the packet's own ACK, over that interval (at least the
/// packet's round trip, so a burst of ACK frames cannot inflate it) or over the time its
/// flight took to send, whichever is longer.
///
/// A round's acknowledgements carry the rate of the window sent a round before, and the
/// round's figure is known only at its end: bounding slow start by twice that lets the window
/// grow by only about √2 per round. A packet's sample carries what was in flight when it was
/// sent, one round trip later, so the bound follows the window as it doubles.
///
/// Start-up only: a packet whose interval began with a delayed ACK and ended with a prompt one
/// reads up to the peer's ACK delay more than one round trip of the link's delivery. Once the
/// pipe is full the window is sized from whole rounds, which that skew cannot inflate.
#[derive(Debug, Clone, Default)]
struct PacketRate {
    /// The acknowledgement state as packets were sent, oldest first: a new entry only when an
    /// ACK came between two sends.
    sends: VecDeque<SendState>,
    /// The last acknowledgement: when it came, and when its packet was sent.
    last_ack: Option<(Instant, Instant)>,
}

#[derive(Debug, Clone, Copy)]
struct SendState {
    sent: Instant,
    acked: u64,
    last_ack_at: Instant,
    last_acked_sent: Instant,
}

impl PacketRate {
    fn on_sent(&mut self, now: Instant, acked: u64) {
        // Before any ACK the interval starts at the first send.
        let (last_ack_at, last_acked_sent) = *self.last_ack.get_or_insert((now, now));
        if self.sends.back().is_some_and(|last| last.acked == acked) {
            return;
        }
        if self.sends.len() == MAX_SEND_STATES {
            self.sends.pop_front();
        }
        self.sends.push_back(SendState {
            sent: now,
            acked,
            last_ack_at,
            last_acked_sent,
        });
    }

    /// The rate sample, in bytes per second, of a packet sent at `sent` and acknowledged
    /// `now`, `acked` counting its bytes.
    fn on_ack(&mut self, now: Instant, sent: Instant, acked: u64) -> Option<u64> {
        let at_send = self
            .sends
            .partition_point(|state| state.sent <= sent)
            .checked_sub(1);
        let sample = at_send.map(|index| {
            // Packets sent before this one are acknowledged or lost by now.
            self.sends.drain(..index);
            let state = self.sends[0];
            let sending = sent.saturating_duration_since(state.last_acked_sent);
            let acknowledging = now.saturating_duration_since(state.last_ack_at);
            let interval = sending.max(acknowledging).max(MIN_INTERVAL);
            ((acked - state.acked) as f64 / interval.as_secs_f64()).round() as u64
        });
        self.last_ack = Some((now, sent));
        sample
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(100);

    /// Acknowledges `bytes_per_rtt` each round trip for `rounds` round trips, each packet
    /// `packet_rtt` after it was sent, in ACK frames that arrive in pairs at the same instant
    /// (the pattern that inflates quinn's per-packet estimate).
    fn deliver_with_rtt(
        rate: &mut DeliveryRate,
        start: Instant,
        bytes_per_rtt: u64,
        rounds: u32,
        packet_rtt: Duration,
    ) -> Instant {
        let frames = 20u32;
        let mut now = start;
        for _ in 0..rounds {
            for frame in 0..frames {
                if frame % 2 == 0 {
                    now += RTT / frames * 2;
                }
                rate.on_ack(
                    now,
                    now - packet_rtt,
                    bytes_per_rtt / u64::from(frames),
                    false,
                    RTT,
                );
            }
        }
        now
    }

    fn deliver(
        rate: &mut DeliveryRate,
        start: Instant,
        bytes_per_rtt: u64,
        rounds: u32,
    ) -> Instant {
        deliver_with_rtt(rate, start, bytes_per_rtt, rounds, RTT)
    }

    fn assert_near(actual: f64, expected: f64, what: &str) {
        assert!(
            (actual - expected).abs() / expected < 0.15,
            "{what}: {actual}, expected about {expected}"
        );
    }

    #[test]
    fn bursts_of_acks_do_not_inflate_the_rate() {
        let mut rate = DeliveryRate::default();
        // 250 kB per 100 ms: 2.5 MB/s, 20 Mbit/s.
        deliver(&mut rate, Instant::now(), 250_000, 12);
        let best = rate.best().expect("a sample after one round trip") as f64;
        assert_near(best, 2_500_000.0, "estimate in B/s");
    }

    #[test]
    fn per_packet_samples_are_not_inflated_by_acks_that_arrive_in_pairs() {
        let mut rate = PacketRate::default();
        // 1,200-byte packets at 2.5 MB/s, each acknowledged a round trip later, two at a time.
        let gap = Duration::from_micros(480);
        let start = Instant::now();
        let sent_at = |packet: u32| start + gap * packet;
        let (mut acked_packets, mut acked_bytes) = (0, 0);
        let mut best = 0;
        for packet in 0..2_000 {
            let now = sent_at(packet);
            while acked_packets + 1 < packet && sent_at(acked_packets + 1) + RTT <= now {
                let arrival = sent_at(acked_packets + 1) + RTT;
                for pair in [acked_packets, acked_packets + 1] {
                    acked_bytes += 1200;
                    let sample = rate.on_ack(arrival, sent_at(pair), acked_bytes);
                    best = best.max(sample.unwrap_or(0));
                }
                acked_packets += 2;
            }
            rate.on_sent(now, acked_bytes);
        }
        assert_near(best as f64, 2_500_000.0, "best sample in B/s");
        assert!(
            rate.sends.len() < 500,
            "{} send states kept",
            rate.sends.len()
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
    fn the_pipe_is_full_once_a_queue_delays_a_whole_round() {
        let mut rate = DeliveryRate::default();
        let now = deliver(&mut rate, Instant::now(), 10_000, 2);
        // 10 ms over a 100 ms minimum is under the 12.5 ms threshold.
        let now = deliver_with_rtt(&mut rate, now, 20_000, 2, RTT + Duration::from_millis(10));
        assert!(!rate.pipe_full());
        deliver_with_rtt(&mut rate, now, 40_000, 2, RTT + Duration::from_millis(20));
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
            rate.on_ack(later, later - RTT, 100, true, RTT);
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
    fn the_window_is_the_steady_gain_times_the_bdp_once_the_pipe_is_full() {
        let mut window = BdpWindow::new(1200);
        window.min_rtt = Some(RTT);
        deliver(&mut window.rate, Instant::now(), 250_000, 12);
        assert!(window.rate.pipe_full());
        assert_near(
            window.window() as f64,
            250_000.0 * STEADY_GAIN,
            "window in bytes",
        );
    }

    #[test]
    fn slow_start_is_bounded_by_the_startup_gain() {
        let mut window = BdpWindow::new(1200);
        window.min_rtt = Some(RTT);
        let now = deliver(&mut window.rate, Instant::now(), 100_000, 1);
        deliver(&mut window.rate, now, 200_000, 1);
        assert!(!window.rate.pipe_full());
        window.slow_start_window = Some(10_000_000);
        let best = window.rate.best().expect("samples") as f64;
        assert_near(
            window.window() as f64,
            best * RTT.as_secs_f64() * STARTUP_GAIN,
            "window in bytes",
        );
    }

    #[test]
    fn an_app_limited_handshake_does_not_shrink_the_initial_window() {
        let mut window = BdpWindow::new(1200);
        let mut now = Instant::now();
        for _ in 0..10 {
            now += RTT / 2;
            window.on_acked(now, now - RTT, 300, true, RTT);
        }
        assert!(window.rate.best().is_some());
        assert_eq!(window.window(), window.initial_window());
    }

    #[test]
    fn a_filled_round_without_a_queue_grows_at_the_startup_gain_again() {
        let mut window = BdpWindow::new(1200);
        window.min_rtt = Some(RTT);
        let now = deliver(&mut window.rate, Instant::now(), 250_000, 4);
        // A queue: the pipe is full at the steady gain.
        let now = deliver_with_rtt(&mut window.rate, now, 250_000, 2, RTT * 2);
        assert!(window.rate.pipe_full());
        // The path gained capacity: with no queue, the sender delivers more than a quarter
        // more than before.
        window.slow_start_window = None;
        deliver(&mut window.rate, now, 400_000, 2);
        assert!(!window.rate.pipe_full());
        assert_near(
            window.window() as f64,
            400_000.0 * STARTUP_GAIN,
            "window in bytes",
        );
    }

    #[test]
    fn a_sub_millisecond_rtt_sizes_the_window_from_the_floor() {
        let mut window = BdpWindow::new(1200);
        deliver(&mut window.rate, Instant::now(), 250_000, 12);
        assert!(window.rate.pipe_full());
        window.min_rtt = Some(Duration::from_micros(100));
        let bytes_per_s = window.rate.best().expect("samples") as f64;
        assert_near(
            window.window() as f64,
            bytes_per_s * MIN_INTERVAL.as_secs_f64() * STEADY_GAIN,
            "window in bytes",
        );
    }

    #[test]
    fn persistent_congestion_starts_over_from_the_initial_window() {
        let mut window = BdpWindow::new(1200);
        window.min_rtt = Some(RTT);
        deliver(&mut window.rate, Instant::now(), 250_000, 12);
        let now = Instant::now();
        window.on_congestion_event(now, now, false, 1200);
        assert!(window.window() > 250_000);
        window.on_congestion_event(now, now, true, 1200);
        assert_eq!(window.window(), window.initial_window());
    }

    /// A bottleneck with a drop-tail queue of `buffer` bytes between the sender and a path of
    /// `rtt` round trip, driven as quinn drives a controller: `on_sent` per packet, an ACK per
    /// packet, sends paced at 1.25 × window ÷ smoothed RTT in millisecond steps.
    struct Bottleneck {
        bytes_per_s: f64,
        rtt: Duration,
        buffer: u64,
    }

    /// How a start-up over a [`Bottleneck`] went.
    #[derive(Debug)]
    struct StartUp {
        /// Round trips until one round trip delivered 90% of the link's rate.
        rounds_to_90_percent: Option<f64>,
        sent: u64,
        dropped: u64,
        max_queue: u64,
    }

    fn start_up(link: &Bottleneck, rounds: u32) -> StartUp {
        const MTU: u64 = 1200;
        let mut window = BdpWindow::new(MTU as u16);
        let step = Duration::from_millis(1);
        let start = Instant::now();
        let end = start + link.rtt * rounds;
        let serialise = Duration::from_secs_f64(MTU as f64 / link.bytes_per_s);
        // (ACK arrival, sent) per packet in flight, in order; dropped packets leave the
        // flight a round trip later, as if declared lost.
        let mut acks: VecDeque<(Instant, Instant)> = VecDeque::new();
        let mut losses: VecDeque<Instant> = VecDeque::new();
        let mut in_flight = 0u64;
        let mut link_free_at = start;
        let mut min_rtt: Option<Duration> = None;
        let mut smoothed_rtt = link.rtt.mul_f64(1.5);
        let mut pacing_credit = 0.0;
        let mut acked_at: VecDeque<(Instant, u64)> = VecDeque::new();
        let mut acked = 0u64;
        let mut outcome = StartUp {
            rounds_to_90_percent: None,
            sent: 0,
            dropped: 0,
            max_queue: 0,
        };
        let mut now = start;
        while now < end {
            now += step;
            while acks.front().is_some_and(|&(at, _)| at <= now) {
                let Some((_, sent)) = acks.pop_front() else {
                    break;
                };
                in_flight -= MTU;
                acked += MTU;
                let rtt = now - sent;
                smoothed_rtt = (smoothed_rtt * 7 + rtt) / 8;
                let min = *min_rtt.get_or_insert(rtt);
                min_rtt = Some(min.min(rtt));
                window.on_acked(now, sent, MTU, false, min.min(rtt));
            }
            while losses.front().is_some_and(|&at| at <= now) {
                losses.pop_front();
                in_flight -= MTU;
            }
            acked_at.push_back((now, acked));
            while acked_at.front().is_some_and(|&(at, _)| at + link.rtt < now) {
                acked_at.pop_front();
            }
            if let (None, Some(&(from, acked_then))) =
                (outcome.rounds_to_90_percent, acked_at.front())
            {
                let over = (now - from).as_secs_f64();
                if over >= link.rtt.as_secs_f64() * 0.99
                    && (acked - acked_then) as f64 / over >= 0.9 * link.bytes_per_s
                {
                    outcome.rounds_to_90_percent =
                        Some((now - start).as_secs_f64() / link.rtt.as_secs_f64());
                }
            }
            // quinn's pacer: bursts of 2 ms of the window's rate (10 to 256 packets).
            let rate = 1.25 * window.window() as f64 / smoothed_rtt.as_secs_f64();
            let burst = (window.window() as f64 * 0.002 / smoothed_rtt.as_secs_f64())
                .clamp(10.0 * MTU as f64, 256.0 * MTU as f64);
            pacing_credit = (pacing_credit + rate * step.as_secs_f64()).min(burst);
            while in_flight + MTU <= window.window() && pacing_credit >= MTU as f64 {
                pacing_credit -= MTU as f64;
                window.on_sent(now, MTU, 0);
                in_flight += MTU;
                outcome.sent += 1;
                let queued_for = link_free_at.saturating_duration_since(now);
                let queued = (queued_for.as_secs_f64() * link.bytes_per_s) as u64;
                if queued + MTU > link.buffer {
                    outcome.dropped += 1;
                    losses.push_back(now + link.rtt);
                    continue;
                }
                outcome.max_queue = outcome.max_queue.max(queued + MTU);
                link_free_at = link_free_at.max(now) + serialise;
                acks.push_back((link_free_at + link.rtt, now));
            }
        }
        outcome
    }

    #[test]
    fn start_up_doubles_per_round_trip_without_overflowing_a_bdp_queue() {
        // Round trips until 90% of the link's rate, where slow start bounded by a round's
        // delivery rate took 9.0, 6.9 and 13.1.
        for (mbit, rtt_ms, rounds) in [(20.0, 200, 7.5), (2.0, 600, 5.5), (100.0, 100, 10.0)] {
            let bytes_per_s = mbit * 1e6 / 8.0;
            let rtt = Duration::from_millis(rtt_ms);
            let link = Bottleneck {
                bytes_per_s,
                rtt,
                buffer: (bytes_per_s * rtt.as_secs_f64()) as u64,
            };
            let outcome = start_up(&link, 30);
            let what = format!("{mbit} Mbit/s, {rtt_ms} ms: {outcome:?}");
            assert!(
                outcome
                    .rounds_to_90_percent
                    .is_some_and(|reached| reached <= rounds),
                "{what}"
            );
            assert!(outcome.dropped * 200 <= outcome.sent, "{what}");
        }
    }

    /// Acknowledgements every `gap` for `span`, the window holding the sender back at each
    /// (`limited`) or not.
    fn ack_every(
        window: &mut BdpWindow,
        from: Instant,
        gap: Duration,
        span: Duration,
        limited: bool,
    ) -> Instant {
        let mut now = from;
        while now < from + span {
            now += gap;
            window.on_acked(now, now - RTT, 1200, !limited, RTT);
        }
        now
    }

    #[test]
    fn the_link_is_the_bottleneck_while_the_window_holds_the_sender_back_most_of_the_time() {
        let link_limited = Arc::new(LinkLimited::default());
        let config = Arc::new(BdpWindowConfig::reporting_to(link_limited.clone()));
        let mut window = config
            .build(Instant::now(), 1200)
            .into_any()
            .downcast::<BdpWindow>()
            .expect("a BdpWindow");
        let fresh = Duration::from_secs(1);
        let start = Instant::now();
        assert!(!link_limited.is_bottleneck(fresh, start), "no report yet");

        // A backlog: every acknowledgement finds the sender window-limited.
        let now = ack_every(&mut window, start, RTT / 10, Duration::from_secs(2), true);
        assert!(
            link_limited.is_bottleneck(fresh, now),
            "a backlog over the link"
        );

        // A sender waiting for something else: a burst that fills the window for 8 ms and is
        // all sent by its last acknowledgement, then 90 ms with nothing to send, over and over.
        let mut now = now;
        for _ in 0..30 {
            let ms = Duration::from_millis;
            now = ack_every(&mut window, now, ms(2), ms(8), true);
            now = ack_every(&mut window, now, ms(2), ms(2), false) + ms(90);
        }
        assert!(
            !link_limited.is_bottleneck(fresh, now),
            "bursts that fill the window"
        );

        // Back to a backlog, then silence: the report goes stale.
        let now = ack_every(&mut window, now, RTT / 10, Duration::from_secs(3), true);
        assert!(link_limited.is_bottleneck(fresh, now));
        assert!(
            !link_limited.is_bottleneck(fresh, now + fresh + Duration::from_millis(2)),
            "stale"
        );

        // Persistent congestion starts the window over, not the share.
        window.on_congestion_event(now, now, true, 1200);
        let now = ack_every(&mut window, now, RTT / 10, RTT / 10, true);
        assert!(link_limited.is_bottleneck(fresh, now));
    }
}
