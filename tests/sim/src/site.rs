//! One simulated site: a task that speaks the agent's side of the protocol to the relay over
//! its own QUIC connection and certificate, as the real agent does it (Hello, Welcome and its
//! resume points, heartbeats every 2 s, batches on data streams within the window, the fence
//! between relay processes, reconnects with backoff and jitter, failing over to the next of
//! the relay addresses as `relay.endpoints` does), without a local broker or a
//! spool: records are computed from their identity ([`crate::records`]), and the site keeps
//! only, per partition, how far it sent and how far the relay acknowledged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::FutureExt;
use spoke_proto::connection::agent::{Answer, Handshake, Reply, Window};
use spoke_proto::{
    Frame, Goodbye, GoodbyeCode, Heartbeat, Limits, PartitionLag, TopicPartition, Welcome,
};
use spoke_transport::wire::write_frame;
use tokio::sync::{watch, Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::records::{self, TOPIC};

/// The real agent's heartbeat period (agent/src/ship/session.rs).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// QUIC and TLS handshake, and then the Welcome: the agent's waits.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// Reconnect backoff: the first wait is drawn from 0.5–2 s, and the base doubles up to 10 s.
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// How long a stopping site waits for the relay's Goodbye (the agent's wait).
const GOODBYE_WAIT: Duration = Duration::from_secs(15);
/// How far ahead the fence claims batches may go to the current relay (agent/src/fence.rs).
const FENCE_SLACK: Duration = Duration::from_secs(1);
/// Distinct error kinds kept for the report; more are counted under one entry.
const ERROR_KINDS: usize = 32;

const SOFTWARE: &str = concat!("spoke-sim/", env!("CARGO_PKG_VERSION"));

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Connected, heartbeating, nothing to ship.
    Idle,
    /// One batch per interval, each after the previous one's Ack.
    Trickle,
    /// As fast as the window allows.
    Heavy,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Idle => "idle",
            Role::Trickle => "trickle",
            Role::Heavy => "heavy",
        }
    }
}

/// What every site of a run does alike.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The relays' addresses (the agent's `relay.endpoints`): a site starts with
    /// [`Site::first_relay`] and moves on to the next one whenever a session fails.
    pub relays: Vec<SocketAddr>,
    /// Partitions of the source topic a shipping site ships (and declares).
    pub partitions: i32,
    /// Partitions an idle site asks resume points for in its Hello.
    pub idle_partitions: i32,
    pub trickle_interval: Duration,
    pub batch_records: u32,
    pub heavy_batch_records: u32,
    pub record_bytes: usize,
    /// Batches and bytes in flight (the agent's `ship.window`, `ship.window_bytes`).
    pub window: usize,
    pub window_bytes: u64,
    /// Data streams a shipping site opens (the agent's `ship.streams`).
    pub streams: u32,
    /// The agent's `relay.fence_delay`.
    pub fence_delay: Duration,
}

/// Counters over the whole fleet.
#[derive(Debug, Default)]
pub struct Counters {
    pub sessions: AtomicU64,
    pub connect_failures: AtomicU64,
    pub refused: AtomicU64,
    pub disconnects: AtomicU64,
    pub fenced: AtomicU64,
    pub batches: AtomicU64,
    pub records_sent: AtomicU64,
    pub records_acked: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    pub rejected_records: AtomicU64,
    pub heartbeats: AtomicU64,
    pub resume_behind_ack: AtomicU64,
    pub resume_ahead_of_sent: AtomicU64,
    pub ack_mismatch: AtomicU64,
    pub goodbyes: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("sessions", get(&self.sessions)),
            ("connect_failures", get(&self.connect_failures)),
            ("refused", get(&self.refused)),
            ("disconnects", get(&self.disconnects)),
            ("fenced", get(&self.fenced)),
            ("batches", get(&self.batches)),
            ("records_sent", get(&self.records_sent)),
            ("records_acked", get(&self.records_acked)),
            ("acks", get(&self.acks)),
            ("nacks", get(&self.nacks)),
            ("rejected_records", get(&self.rejected_records)),
            ("heartbeats", get(&self.heartbeats)),
            ("resume_behind_ack", get(&self.resume_behind_ack)),
            ("resume_ahead_of_sent", get(&self.resume_ahead_of_sent)),
            ("ack_mismatch", get(&self.ack_mismatch)),
            ("goodbyes", get(&self.goodbyes)),
        ]
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Where one site stands, for the orchestrator's phases (all connected? everyone shipping
/// again after the storm?). Times are ms since [`Fleet::epoch`], 0 for never.
#[derive(Debug, Default)]
pub struct SiteStatus {
    pub welcomed_ms: AtomicU64,
    pub acked_ms: AtomicU64,
    pub connected: AtomicBool,
    /// The index in [`Settings::relays`] of the relay of the latest Welcome.
    pub relay: AtomicUsize,
}

/// What the sites share: settings, the bound on handshakes, the stop signals, the counters.
#[derive(Debug)]
pub struct Fleet {
    pub settings: Settings,
    /// Handshakes (connect, Hello, Welcome) in progress at once, bounded so the simulator does
    /// not melt; the relay has its own bound (`limits.max_handshakes`).
    pub handshakes: Semaphore,
    /// Stop shipping new records, wait for the outstanding acks, say Goodbye.
    pub stop: CancellationToken,
    /// Give up at once (the drain's deadline passed).
    pub abort: CancellationToken,
    /// Shipping sites send nothing new while true (the idle measurement window).
    pub paused: watch::Receiver<bool>,
    pub epoch: Instant,
    pub counters: Counters,
    pub status: Vec<SiteStatus>,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Fleet {
    pub fn new(
        settings: Settings,
        sites: usize,
        handshakes: usize,
        paused: watch::Receiver<bool>,
    ) -> Fleet {
        Fleet {
            settings,
            handshakes: Semaphore::new(handshakes.max(1)),
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            paused,
            epoch: Instant::now(),
            counters: Counters::default(),
            status: (0..sites).map(|_| SiteStatus::default()).collect(),
            errors: Mutex::new(BTreeMap::new()),
        }
    }

    /// Now, in ms since the epoch, never 0.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
    }

    /// Why sessions ended, by kind (numbers masked so that kinds add up), most frequent first.
    pub fn errors(&self) -> Vec<(String, u64)> {
        let mut kinds: Vec<(String, u64)> = match self.errors.lock() {
            Ok(errors) => errors.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            Err(_) => Vec::new(),
        };
        kinds.sort_by_key(|kind| std::cmp::Reverse(kind.1));
        kinds
    }

    fn note_error(&self, error: &anyhow::Error) {
        let text: String = format!("{error:#}")
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .take(160)
            .collect();
        if let Ok(mut errors) = self.errors.lock() {
            let key = if errors.len() < ERROR_KINDS || errors.contains_key(&text) {
                text
            } else {
                "(other kinds)".to_owned()
            };
            *errors.entry(key).or_default() += 1;
        }
    }
}

/// One site's identity and the endpoint (UDP socket) it dials from.
#[derive(Debug)]
pub struct Site {
    pub index: usize,
    pub name: String,
    pub role: Role,
    pub client: quinn::ClientConfig,
    pub endpoint: quinn::Endpoint,
    /// The index in [`Settings::relays`] the site connects to first.
    pub first_relay: usize,
}

/// One source partition of a site: what it sent and what the relay confirmed.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Every offset below this is in the hub, as far as the relay said (Ack, Welcome).
    pub acked: i64,
    /// Every offset below this was sent at least once.
    pub sent: i64,
    /// Offset ranges (first, last) the relay said the hub refused (dead-letter topic).
    pub rejected: Vec<(i64, i64)>,
}

/// What a site did, for the verification.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub index: usize,
    pub name: String,
    pub role: Role,
    pub partitions: Vec<Ledger>,
}

/// What a site keeps across its sessions.
struct State {
    partitions: Vec<Ledger>,
    /// The next offset to send per partition in the current session.
    next: Vec<i64>,
    /// The relay process batches last went to, and until when (the agent's fence file).
    fence: Option<(String, Instant)>,
    /// The index in [`Settings::relays`] of the relay the next session goes to.
    relay: usize,
    round_robin: usize,
    rng: u64,
    sessions: u64,
}

impl State {
    /// Nothing sent is still unconfirmed.
    fn settled(&self) -> bool {
        self.partitions.iter().all(|p| p.acked >= p.sent)
    }

    /// The Hello's partitions. Like the agent, which asks for the partitions its spool holds
    /// records of: all of them at a shipping site's first session (it starts with a backlog),
    /// then those with unconfirmed records. An idle site asks for its configured ones.
    fn wanted(&self, role: Role) -> Vec<TopicPartition> {
        self.partitions
            .iter()
            .enumerate()
            .filter(|(_, p)| role == Role::Idle || self.sessions == 0 || p.acked < p.sent)
            .map(|(partition, _)| TopicPartition {
                topic: TOPIC.to_owned(),
                partition: partition as i32,
            })
            .collect()
    }

    /// The wait before batches may go to `relay`, if the fence names another relay process
    /// that may still be delivering.
    fn fence_wait(&self, relay: &str, delay: Duration) -> Option<Duration> {
        let (previous, until) = self.fence.as_ref()?;
        if previous == relay {
            return None;
        }
        let open = *until + delay;
        open.checked_duration_since(Instant::now())
            .filter(|wait| !wait.is_zero())
    }

    /// Takes the Welcome's resume points: what the hub holds counts as confirmed, and the
    /// session sends from the first unconfirmed offset.
    fn resume(&mut self, welcome: &Welcome, counters: &Counters) {
        for point in welcome.resume.iter().filter(|p| p.topic == TOPIC) {
            let Some(ledger) = usize::try_from(point.partition)
                .ok()
                .and_then(|p| self.partitions.get_mut(p))
            else {
                continue;
            };
            if point.next_offset < ledger.acked {
                // The relay forgot what it confirmed: the verifier will tell whether the hub
                // did too.
                bump(&counters.resume_behind_ack, 1);
            }
            if point.next_offset > ledger.sent {
                bump(&counters.resume_ahead_of_sent, 1);
                ledger.sent = point.next_offset;
            }
            if point.next_offset > ledger.acked {
                bump(
                    &counters.records_acked,
                    (point.next_offset - ledger.acked) as u64,
                );
                ledger.acked = point.next_offset;
            }
        }
        self.next = self.partitions.iter().map(|p| p.acked).collect();
    }

    /// A partition with records sent in an earlier session and not confirmed, to send again
    /// (the same records: they are computed from their identity), and how many.
    fn resend(&self, batch_records: u32) -> Option<(usize, u32)> {
        self.partitions
            .iter()
            .zip(&self.next)
            .position(|(ledger, next)| *next < ledger.sent)
            .map(|p| {
                let left = self.partitions[p].sent - self.next[p];
                (
                    p,
                    u32::try_from(left).unwrap_or(u32::MAX).min(batch_records),
                )
            })
    }

    /// Uniform in [0, 1).
    fn fraction(&mut self) -> f64 {
        (records::splitmix64(&mut self.rng) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A reconnect wait drawn from [base, 4 × base], at most the cap.
    fn jitter(&mut self, base: Duration) -> Duration {
        let fraction = self.fraction();
        base.mul_f64(1.0 + 3.0 * fraction).min(BACKOFF_CAP)
    }
}

/// How a session ended, when it ended as planned.
enum Ended {
    /// The site is done (Goodbye exchanged, or the run aborted).
    Done,
    /// The relay is another process than the one batches last went to: wait this long.
    Fenced(Duration),
}

/// Runs one site until the fleet stops (and its records are confirmed) or aborts; returns
/// its ledger.
pub async fn run(fleet: Arc<Fleet>, site: Site) -> Outcome {
    let partitions = match site.role {
        Role::Idle => fleet.settings.idle_partitions,
        Role::Trickle | Role::Heavy => fleet.settings.partitions,
    };
    let partitions = usize::try_from(partitions).unwrap_or(0);
    let mut state = State {
        partitions: vec![Ledger::default(); partitions],
        next: vec![0; partitions],
        fence: None,
        relay: site.first_relay % fleet.settings.relays.len().max(1),
        round_robin: 0,
        rng: site.index as u64 ^ 0x5eed_0000_0000 ^ records::now_ms() as u64,
        sessions: 0,
    };
    let mut backoff = BACKOFF_START;
    loop {
        if fleet.abort.is_cancelled() || (fleet.stop.is_cancelled() && state.settled()) {
            break;
        }
        let settled = state.settled();
        let permit = tokio::select! {
            biased;
            () = fleet.abort.cancelled() => break,
            // A site with nothing unconfirmed has no reason to connect once the run stops.
            () = fleet.stop.cancelled(), if settled => break,
            permit = fleet.handshakes.acquire() => permit,
        };
        let Ok(permit) = permit else { break };
        let mut welcomed = false;
        let result = session(&fleet, &site, &mut state, permit, &mut welcomed).await;
        fleet.status[site.index]
            .connected
            .store(false, Ordering::Relaxed);
        let wait = match result {
            Ok(Ended::Done) => break,
            Ok(Ended::Fenced(wait)) => {
                bump(&fleet.counters.fenced, 1);
                wait
            }
            Err(error) => {
                if welcomed {
                    bump(&fleet.counters.disconnects, 1);
                    backoff = BACKOFF_START;
                } else {
                    bump(&fleet.counters.connect_failures, 1);
                }
                fleet.note_error(&error);
                // As the agent: any failure moves on to the next relay address; a fenced
                // session tries the same one again.
                state.relay = (state.relay + 1) % fleet.settings.relays.len().max(1);
                let wait = state.jitter(backoff);
                backoff = (backoff * 2).min(BACKOFF_CAP);
                wait
            }
        };
        let settled = state.settled();
        tokio::select! {
            biased;
            () = fleet.abort.cancelled() => break,
            () = fleet.stop.cancelled(), if settled => break,
            () = tokio::time::sleep(wait) => {}
        }
    }
    Outcome {
        index: site.index,
        name: site.name,
        role: site.role,
        partitions: state.partitions,
    }
}

async fn session(
    fleet: &Fleet,
    site: &Site,
    state: &mut State,
    permit: SemaphorePermit<'_>,
    welcomed: &mut bool,
) -> anyhow::Result<Ended> {
    let relay = *fleet
        .settings
        .relays
        .get(state.relay)
        .context("no relay address")?;
    let connecting = site
        .endpoint
        .connect_with(site.client.clone(), relay, "localhost")
        .context("starting a QUIC connection")?;
    let settled = state.settled();
    let connection = tokio::select! {
        biased;
        () = fleet.abort.cancelled() => return Ok(Ended::Done),
        () = fleet.stop.cancelled(), if settled => return Ok(Ended::Done),
        connected = tokio::time::timeout(CONNECT_TIMEOUT, connecting) => connected
            .context("QUIC handshake timed out")?
            .context("QUIC handshake")?,
    };
    let result = Session {
        fleet,
        site,
        state,
        connection: &connection,
    }
    .talk(permit, welcomed)
    .await;
    // 0: the agent stopped; 1: it failed (the agent's close codes).
    let code = if matches!(result, Ok(Ended::Done)) {
        0u32
    } else {
        1
    };
    connection.close(code.into(), b"");
    result
}

/// What the agent keeps of a batch in flight.
#[derive(Debug)]
struct Shipped {
    next_offset: i64,
}

struct Session<'a> {
    fleet: &'a Fleet,
    site: &'a Site,
    state: &'a mut State,
    connection: &'a quinn::Connection,
}

/// The streams batches go on: the data streams, or the control stream where there are none.
struct Lanes {
    control: quinn::SendStream,
    data: Vec<quinn::SendStream>,
}

impl Lanes {
    async fn write(&mut self, lane: usize, bytes: &[u8]) -> anyhow::Result<()> {
        match self.data.get_mut(lane) {
            Some(stream) => stream.write_all(bytes).await?,
            None => self.control.write_all(bytes).await?,
        }
        Ok(())
    }
}

impl Session<'_> {
    async fn talk(
        mut self,
        permit: SemaphorePermit<'_>,
        welcomed: &mut bool,
    ) -> anyhow::Result<Ended> {
        let (mut control, mut recv) = self.connection.open_bi().await?;
        let (hello, handshake) = Handshake::hello(
            self.site.name.clone(),
            SOFTWARE.to_owned(),
            self.state.wanted(self.site.role),
        );
        write_frame(&mut control, &Frame::Hello(hello)).await?;
        let mut reader = FrameReader::default();
        let settled = self.state.settled();
        let first = tokio::select! {
            biased;
            () = self.fleet.stop.cancelled(), if settled => return Ok(Ended::Done),
            first = tokio::time::timeout(WELCOME_TIMEOUT, reader.next(&mut recv)) => {
                first.context("no Welcome in time")??
            }
        };
        let (welcome, version) = match handshake.answer(first)? {
            Answer::Welcome { welcome, version } => (welcome, version),
            Answer::Refused(goodbye) => {
                bump(&self.fleet.counters.refused, 1);
                bail!("refused: {:?} {}", goodbye.code, goodbye.reason);
            }
        };
        drop(permit);
        let settings = &self.fleet.settings;
        if let Some(wait) = self.state.fence_wait(&welcome.relay, settings.fence_delay) {
            // The agent drops a fenced session: a resume point computed before the wait is
            // over is not trusted.
            return Ok(Ended::Fenced(wait));
        }
        *welcomed = true;
        self.state.sessions += 1;
        bump(&self.fleet.counters.sessions, 1);
        let status = &self.fleet.status[self.site.index];
        status.relay.store(self.state.relay, Ordering::Relaxed);
        status
            .welcomed_ms
            .store(self.fleet.now_ms(), Ordering::Relaxed);
        status.connected.store(true, Ordering::Relaxed);
        self.state.resume(&welcome, &self.fleet.counters);

        let mut data = Vec::new();
        if self.site.role != Role::Idle && version.data_streams() {
            let wanted = settings
                .streams
                .min(u32::try_from(settings.partitions).unwrap_or(1));
            // Stream credit is known from the handshake: an open that cannot complete at once
            // never will (as in the agent).
            for _ in 0..wanted {
                match self.connection.open_uni().now_or_never() {
                    Some(opened) => data.push(opened?),
                    None => break,
                }
            }
        }
        let lanes = data.len().max(1);
        let mut lanes_io = Lanes { control, data };
        let window = Window::new(version, lanes, settings.window, settings.window_bytes);
        self.ship(welcome.relay, &mut lanes_io, window, reader, recv)
            .await
    }

    /// The session after the Welcome: heartbeats, batches as the role says, acknowledgements;
    /// on stop, the outstanding records confirmed, then Goodbye.
    async fn ship(
        &mut self,
        relay: String,
        lanes: &mut Lanes,
        mut window: Window<Shipped>,
        mut reader: FrameReader,
        mut recv: quinn::RecvStream,
    ) -> anyhow::Result<Ended> {
        let fleet = self.fleet;
        let settings = &fleet.settings;
        let role = self.site.role;
        let batch_records = match role {
            Role::Heavy => settings.heavy_batch_records,
            Role::Idle | Role::Trickle => settings.batch_records,
        };
        let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Shipping sites spread over the interval rather than all sending at once.
        let phase = settings.trickle_interval.mul_f64(self.state.fraction());
        let mut trickle = tokio::time::interval_at(
            tokio::time::Instant::now() + phase,
            settings.trickle_interval.max(Duration::from_millis(1)),
        );
        trickle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut paused = fleet.paused.clone();
        let mut paused_open = true;
        let mut draining = fleet.stop.is_cancelled();
        loop {
            if draining && window.is_empty() && self.state.settled() {
                return self.goodbye(lanes, &mut reader, &mut recv).await;
            }
            let shipping = role != Role::Idle && !draining && !*paused.borrow();
            let resend = self.state.resend(batch_records);
            let room = window.has_room();
            let fresh = shipping && resend.is_none();
            tokio::select! {
                biased;
                () = fleet.abort.cancelled() => return Ok(Ended::Done),
                frame = reader.next(&mut recv) => self.answer(&mut window, frame?)?,
                _ = heartbeat.tick() => {
                    write_frame(&mut lanes.control, &Frame::Heartbeat(self.heartbeat())).await?;
                    bump(&fleet.counters.heartbeats, 1);
                    if let Some((fenced, until)) = self.state.fence.as_mut() {
                        if *fenced == relay {
                            *until = Instant::now() + FENCE_SLACK;
                        }
                    }
                }
                () = fleet.stop.cancelled(), if !draining => draining = true,
                changed = paused.changed(), if paused_open => paused_open = changed.is_ok(),
                () = std::future::ready(()), if room && resend.is_some() => {
                    if let Some((partition, count)) = resend {
                        self.send(&relay, lanes, &mut window, partition, count).await?;
                    }
                }
                _ = trickle.tick(), if fresh && role == Role::Trickle && window.is_empty() => {
                    let partition = self.next_partition();
                    self.send(&relay, lanes, &mut window, partition, batch_records).await?;
                }
                () = std::future::ready(()), if fresh && role == Role::Heavy && room => {
                    let partition = self.next_partition();
                    self.send(&relay, lanes, &mut window, partition, batch_records).await?;
                }
            }
        }
    }

    fn next_partition(&mut self) -> usize {
        let partition = self.state.round_robin % self.state.partitions.len().max(1);
        self.state.round_robin = self.state.round_robin.wrapping_add(1);
        partition
    }

    /// Sends records `next..next + count` of `partition` as one batch on its lane.
    async fn send(
        &mut self,
        relay: &str,
        lanes: &mut Lanes,
        window: &mut Window<Shipped>,
        partition: usize,
        count: u32,
    ) -> anyhow::Result<()> {
        let settings = &self.fleet.settings;
        let first = self.state.next[partition];
        let mut batch = records::batch(
            &self.site.name,
            partition as i32,
            settings.partitions,
            first,
            count,
            settings.record_bytes,
        )?;
        let lane = window.lane_of(TOPIC, partition as i32);
        batch.seq = window.next_seq();
        let next_offset = batch.next_offset;
        let bytes = Frame::Batch(batch).to_bytes()?;
        // The agent records the fence before a batch goes out.
        self.state.fence = Some((relay.to_owned(), Instant::now() + FENCE_SLACK));
        lanes.write(lane, &bytes).await?;
        window.sent(
            lane,
            bytes.len() as u64,
            TOPIC,
            partition as i32,
            Shipped { next_offset },
        );
        self.state.next[partition] = next_offset;
        let ledger = &mut self.state.partitions[partition];
        ledger.sent = ledger.sent.max(next_offset);
        bump(&self.fleet.counters.batches, 1);
        bump(&self.fleet.counters.records_sent, u64::from(count));
        Ok(())
    }

    /// Takes a frame of the relay's on the control stream.
    fn answer(&mut self, window: &mut Window<Shipped>, frame: Option<Frame>) -> anyhow::Result<()> {
        let counters = &self.fleet.counters;
        match window.receive(frame)? {
            Reply::Acked { batch, ack } => {
                let ledger = usize::try_from(batch.partition)
                    .ok()
                    .and_then(|p| self.state.partitions.get_mut(p))
                    .context("Ack for a partition this site does not have")?;
                let confirmed = batch.batch.next_offset;
                if ack.next_offset != confirmed {
                    bump(&counters.ack_mismatch, 1);
                }
                if confirmed > ledger.acked {
                    bump(&counters.records_acked, (confirmed - ledger.acked) as u64);
                    ledger.acked = confirmed;
                }
                bump(&counters.acks, 1);
                self.fleet.status[self.site.index]
                    .acked_ms
                    .store(self.fleet.now_ms(), Ordering::Relaxed);
                Ok(())
            }
            Reply::Nacked { batch, nack } => {
                bump(&counters.nacks, 1);
                bail!(
                    "batch {} of partition {} refused: {:?} {}",
                    batch.seq,
                    batch.partition,
                    nack.code,
                    nack.message
                )
            }
            Reply::Rejected(rejected) => {
                let records: u64 = rejected.ranges.iter().map(|r| u64::from(r.records)).sum();
                bump(&counters.rejected_records, records);
                if let Some(ledger) = usize::try_from(rejected.partition)
                    .ok()
                    .and_then(|p| self.state.partitions.get_mut(p))
                {
                    ledger.rejected.extend(
                        rejected
                            .ranges
                            .iter()
                            .map(|r| (r.first_offset, r.last_offset)),
                    );
                }
                Ok(())
            }
            Reply::Goodbye(goodbye) => {
                bail!(
                    "relay ended the session: {:?} {}",
                    goodbye.code,
                    goodbye.reason
                )
            }
            Reply::End => bail!("relay ended the control stream"),
        }
    }

    fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            sent_at_ms: u64::try_from(records::now_ms()).unwrap_or(0),
            lag: self
                .state
                .partitions
                .iter()
                .enumerate()
                .filter(|_| self.site.role != Role::Idle)
                .map(|(partition, ledger)| PartitionLag {
                    topic: TOPIC.to_owned(),
                    partition: partition as i32,
                    lag_records: u64::try_from(ledger.sent - ledger.acked).unwrap_or(0),
                })
                .collect(),
            ..Heartbeat::default()
        }
    }

    /// The agent's clean end: Goodbye, then the relay's Goodbye once it has confirmed
    /// everything and written its checkpoints (or the end of its stream).
    async fn goodbye(
        &mut self,
        lanes: &mut Lanes,
        reader: &mut FrameReader,
        recv: &mut quinn::RecvStream,
    ) -> anyhow::Result<Ended> {
        for stream in &mut lanes.data {
            let _ = stream.finish();
        }
        let goodbye = Frame::Goodbye(Goodbye {
            code: GoodbyeCode::Shutdown,
            reason: "simulation over".to_owned(),
        });
        write_frame(&mut lanes.control, &goodbye).await?;
        let _ = lanes.control.finish();
        let answered = tokio::time::timeout(GOODBYE_WAIT, async {
            loop {
                match reader.next(recv).await {
                    Ok(Some(Frame::Goodbye(_))) | Ok(None) | Err(_) => return,
                    Ok(Some(_)) => {}
                }
            }
        })
        .await;
        if answered.is_ok() {
            bump(&self.fleet.counters.goodbyes, 1);
        }
        Ok(Ended::Done)
    }
}

/// Reads frames from a stream into a buffer of its own, so that a read abandoned by a
/// `select!` loses nothing: quinn's `read_chunk` is cancel-safe and a partly received frame
/// stays buffered for the next call.
#[derive(Debug, Default)]
struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    async fn next(&mut self, recv: &mut quinn::RecvStream) -> anyhow::Result<Option<Frame>> {
        loop {
            if let Some((frame, used)) = Frame::decode(&self.buf, &Limits::default())? {
                self.buf.drain(..used);
                return Ok(Some(frame));
            }
            match recv.read_chunk(64 * 1024, true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None if self.buf.is_empty() => return Ok(None),
                None => bail!("the relay's stream ended inside a frame"),
            }
        }
    }
}
