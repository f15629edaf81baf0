//! The shipper: sends spooled chunks to a relay as `Batch` frames, keeps up to `window` of
//! them unacknowledged, and deletes a chunk from the spool only when the relay's `Ack` says
//! the hub holds it. Connection failures rotate through `relay.endpoints` with capped
//! exponential backoff; nothing is lost meanwhile because the spool still holds every chunk.
//!
//! Batches travel on `ship.streams` data streams, each partition on one of them, so that a
//! lost packet holds up only the partitions of its stream; the control stream carries the
//! handshake, heartbeats and the relay's acknowledgements (proto's `frame` docs, "Streams").

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use spoke_proto::{
    decompress_section, Batch, BatchLimits, Codec, Dictionaries, Dictionary, DictionaryLimits,
    Frame, Goodbye, GoodbyeCode, Heartbeat, Hello, Limits, NackCode, Negotiated, PartitionLag,
    TopicConfig, TopicPartition, VersionError, Welcome, MAX_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, error, info, warn, Instrument};

use crate::config::{Endpoint, Loaded};
use crate::fence::{self, Fence};
use crate::progress::Progress;
use crate::spool::{Chunk, SourcePartition, Spool, SpoolError};
use spoke_transport::wire::{read_frame, write_frame, WireError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The relay scans the hub to compute resume points before it answers.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopping agent waits for the relay to answer its Goodbye: the relay answers
/// once its hub deliveries are confirmed and its last checkpoints written, which takes a few
/// seconds on a busy hub.
const GOODBYE_WAIT: Duration = Duration::from_secs(15);
/// Every heartbeat extends the fence, and the relay hands records to the hub only for a few
/// seconds after the last one it heard (`hub.fence_delay - hub.delivery_timeout - 1 s`, 6 s
/// by default): this leaves room for a heartbeat that a lost packet holds up.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// Longest run of frame writes before acknowledgements, a stop and heartbeats are looked at.
const WRITE_PASS: Duration = Duration::from_millis(50);
/// How long a graceful stop waits for in-flight batches to be acknowledged.
const DRAIN_GRACE: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Frames read ahead of the session loop.
const INBOUND_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("resolving {address}: {reason}")]
    Resolve { address: String, reason: String },
    #[error("connecting to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("relay refused the session: {0}")]
    Refused(String),
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error("relay sent {got} where {expected} was expected")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    #[error("relay acknowledged batch {got} but batch {expected} was the oldest in flight")]
    AckOrder { expected: u64, got: u64 },
    #[error("relay rejected batch {seq}: {message}")]
    Nacked { seq: u64, message: String },
    #[error("relay did not answer in time ({0})")]
    Timeout(&'static str),
    #[error("relay closed the session: {0}")]
    Closed(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    #[error("fenced: batches went to {previous} less than relay.fence_delay ago ({wait:?} to go)")]
    Fenced { previous: String, wait: Duration },
    #[error("cannot record the fence at {path}: {source}")]
    FenceFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("spooled chunk of {partition} has unknown codec {codec}")]
    Codec { partition: String, codec: u8 },
    #[error("spooled chunk of {partition} needs dictionary {id}, which is not in the spool")]
    MissingDictionary { partition: String, id: u32 },
    #[error("re-encoding a dictionary chunk of {partition} for a version 1 relay: {reason}")]
    Transcode { partition: String, reason: String },
}

/// How a session ended.
enum Ended {
    /// Shutdown was requested and in-flight batches were drained (or the grace ran out).
    Stopped,
}

/// Runs until `stop` is cancelled.
pub async fn run(
    live: watch::Receiver<Arc<Loaded>>,
    client_config: quinn::ClientConfig,
    spool: Arc<dyn Spool>,
    progress: Arc<Progress>,
    stop: CancellationToken,
) -> Result<(), ShipError> {
    let mut endpoint_v4: Option<quinn::Endpoint> = None;
    let mut endpoint_v6: Option<quinn::Endpoint> = None;
    let mut backoff = BACKOFF_START;
    let mut index = 0usize;
    let fence_path = fence::path(&live.borrow().config.spool.path);
    let mut fence = fence::read(&fence_path);
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        // Ship tunables reloaded by SIGHUP take effect from the next session on.
        let loaded = live.borrow().clone();
        index %= loaded.endpoints.len();
        let relay = &loaded.endpoints[index];
        let mut session = RelaySession {
            loaded: &loaded,
            spool: spool.as_ref(),
            progress: &progress,
            stop: &stop,
            fence: &mut fence,
            fence_path: &fence_path,
            welcomed: false,
            relay: None,
        };
        let span = tracing::info_span!("relay", address = %relay.address);
        let result = async {
            let connection =
                connect(relay, &client_config, &mut endpoint_v4, &mut endpoint_v6).await?;
            let result = session.run(&connection).await.map_err(|error| {
                // A relay that refuses or ends the session says why in its close frame; that
                // beats the "connection lost" a pending read reports.
                match connection.close_reason() {
                    Some(quinn::ConnectionError::ApplicationClosed(close)) => {
                        ShipError::Closed(format!(
                            "{} (code {})",
                            String::from_utf8_lossy(&close.reason),
                            close.error_code
                        ))
                    }
                    _ => error,
                }
            });
            let (code, reason): (u32, &[u8]) = match &result {
                Ok(_) => (0, b"agent stopping"),
                Err(_) => (2, b"agent session error"),
            };
            connection.close(code.into(), reason);
            result
        }
        .instrument(span)
        .await;
        progress.relay_connected.store(false, Ordering::Relaxed);
        match result {
            Ok(Ended::Stopped) => {
                for endpoint in [endpoint_v4, endpoint_v6].into_iter().flatten() {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
                }
                return Ok(());
            }
            Err(ShipError::Spool(error)) => return Err(ShipError::Spool(error)),
            Err(ShipError::Fenced { previous, wait }) => {
                info!(%previous, ?wait, "another relay may still be delivering our last batches; waiting out relay.fence_delay");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => return Ok(()),
                }
            }
            Err(error) => {
                if session.welcomed {
                    backoff = BACKOFF_START;
                }
                warn!(relay = %relay.address, %error, retry_in = ?backoff, "relay session ended");
                index = (index + 1) % loaded.endpoints.len();
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return Ok(()),
                }
                backoff = (backoff * 2).min(BACKOFF_CAP);
            }
        }
    }
}

pub(crate) async fn connect(
    relay: &Endpoint,
    client_config: &quinn::ClientConfig,
    endpoint_v4: &mut Option<quinn::Endpoint>,
    endpoint_v6: &mut Option<quinn::Endpoint>,
) -> Result<quinn::Connection, ShipError> {
    let resolve_err = |reason: String| ShipError::Resolve {
        address: relay.address.clone(),
        reason,
    };
    let address: SocketAddr = tokio::net::lookup_host(&relay.address)
        .await
        .map_err(|e| resolve_err(e.to_string()))?
        .next()
        .ok_or_else(|| resolve_err("no address".into()))?;
    // One UDP socket per address family, reused across reconnects.
    let (slot, bind) = if address.is_ipv4() {
        (endpoint_v4, SocketAddr::from(([0, 0, 0, 0], 0)))
    } else {
        (endpoint_v6, SocketAddr::from(([0u16; 8], 0)))
    };
    let endpoint = match slot {
        Some(endpoint) => endpoint,
        None => slot.insert(quinn::Endpoint::client(bind).map_err(ShipError::Socket)?),
    };
    let connect_err = |reason: String| ShipError::Connect {
        address: relay.address.clone(),
        reason,
    };
    let connecting = endpoint
        .connect_with(client_config.clone(), address, &relay.server_name)
        .map_err(|e| connect_err(e.to_string()))?;
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| connect_err("handshake timed out".into()))?
        .map_err(|e| connect_err(e.to_string()))
}

/// The connection's send window, kept near what its congestion window can use
/// ([`spoke_transport::transport::send_window_for`]): the rest of a backlog waits in the spool, not
/// written ahead in memory.
#[derive(Default)]
struct SendWindow {
    set: Option<u64>,
}

impl SendWindow {
    /// Before each write. Changes under an eighth are left, to spare the connection's task a
    /// wake-up per batch.
    fn follow(&mut self, connection: &quinn::Connection) {
        let wanted =
            spoke_transport::transport::send_window_for(connection.congestion_state().window());
        let moved = self.set.is_none_or(|set| set.abs_diff(wanted) > set / 8);
        if moved {
            connection.set_send_window(wanted);
            self.set = Some(wanted);
        }
    }
}

/// The QUIC path as the connection sees it, for diagnosing a slow link from the agent's log.
fn log_path(connection: &quinn::Connection) {
    let stats = connection.stats();
    debug!(
        rtt_ms = stats.path.rtt.as_millis() as u64,
        cwnd = stats.path.cwnd,
        mtu = stats.path.current_mtu,
        sent_packets = stats.path.sent_packets,
        lost_packets = stats.path.lost_packets,
        lost_bytes = stats.path.lost_bytes,
        congestion_events = stats.path.congestion_events,
        datagrams_out = stats.udp_tx.datagrams,
        bytes_out = stats.udp_tx.bytes,
        datagrams_in = stats.udp_rx.datagrams,
        stream_frames_out = stats.frame_tx.stream,
        ack_frames_out = stats.frame_tx.acks,
        "path"
    );
}

/// A batch sent and not yet acknowledged.
struct InFlight {
    seq: u64,
    /// Its frame's bytes on the wire.
    bytes: u64,
    partition: SourcePartition,
    next_offset: i64,
    records: u32,
}

/// Where batches go: data streams, or the control stream alone when the relay allows none
/// (or speaks a version without data streams).
struct Lanes {
    lanes: Vec<Lane>,
    /// Each partition's lane, dealt in turn as partitions first ship in this session, so that
    /// a few partitions spread over all lanes.
    assigned: HashMap<SourcePartition, usize>,
    /// Over all lanes.
    in_flight_batches: usize,
    in_flight_bytes: u64,
}

struct Lane {
    /// `None`: the control stream.
    send: Option<quinn::SendStream>,
    /// Dictionaries sent on this stream: a relay knows them per stream.
    dictionaries_sent: HashSet<u32>,
    /// Topics whose configuration went on this stream ahead of their first batch there.
    topic_configs_sent: HashSet<String>,
    /// In the order sent, which is the order the relay acknowledges them in.
    in_flight: VecDeque<InFlight>,
}

impl Lane {
    fn new(send: Option<quinn::SendStream>) -> Self {
        Self {
            send,
            dictionaries_sent: HashSet::new(),
            topic_configs_sent: HashSet::new(),
            in_flight: VecDeque::new(),
        }
    }
}

impl Lanes {
    /// Opens up to `wanted` data streams if the session's version allows them. Stream credit
    /// is known from the handshake, so an open that cannot complete at once never will: the
    /// relay allows fewer, and the session makes do with those it got.
    fn open(
        connection: &quinn::Connection,
        version: Negotiated,
        wanted: u32,
    ) -> Result<Self, ShipError> {
        let mut lanes = Vec::new();
        if version.data_streams() {
            for _ in 0..wanted {
                match connection.open_uni().now_or_never() {
                    Some(opened) => lanes.push(Lane::new(Some(opened?))),
                    None => break,
                }
            }
        }
        if lanes.len() < wanted as usize {
            info!(
                wanted,
                data_streams = lanes.len(),
                version = version.number(),
                "the relay allows fewer data streams"
            );
        }
        if lanes.is_empty() {
            lanes.push(Lane::new(None));
        }
        Ok(Self {
            lanes,
            assigned: HashMap::new(),
            in_flight_batches: 0,
            in_flight_bytes: 0,
        })
    }

    fn lane_of(&mut self, partition: &SourcePartition) -> usize {
        let next = self.assigned.len() % self.lanes.len();
        *self.assigned.entry(partition.clone()).or_insert(next)
    }

    fn sent(&mut self, lane: usize, batch: InFlight) {
        self.in_flight_batches += 1;
        self.in_flight_bytes += batch.bytes;
        self.lanes[lane].in_flight.push_back(batch);
    }

    /// The batch `seq` answers: the oldest in flight on its stream.
    fn answered(&mut self, seq: u64) -> Result<InFlight, ShipError> {
        let lane = self
            .lanes
            .iter_mut()
            .find(|lane| lane.in_flight.front().is_some_and(|f| f.seq == seq));
        let Some(batch) = lane.and_then(|lane| lane.in_flight.pop_front()) else {
            let expected = self
                .lanes
                .iter()
                .filter_map(|lane| lane.in_flight.front().map(|f| f.seq))
                .min()
                .unwrap_or(0);
            return Err(ShipError::AckOrder { expected, got: seq });
        };
        self.in_flight_batches -= 1;
        self.in_flight_bytes -= batch.bytes;
        Ok(batch)
    }

    fn is_empty(&self) -> bool {
        self.in_flight_batches == 0
    }

    fn data_streams(&self) -> usize {
        self.lanes.iter().filter(|lane| lane.send.is_some()).count()
    }

    /// Ends every data stream: the relay's readers see the end once all sent is read.
    fn finish(&mut self) {
        for lane in &mut self.lanes {
            if let Some(send) = lane.send.as_mut() {
                let _ = send.finish();
            }
        }
    }
}

/// The agent's side of one session with a relay: its Hello and the relay's Welcome, then
/// batches out and acknowledgements back, until the connection ends.
struct RelaySession<'a> {
    loaded: &'a Loaded,
    spool: &'a dyn Spool,
    progress: &'a Progress,
    stop: &'a CancellationToken,
    fence: &'a mut Option<Fence>,
    fence_path: &'a Path,
    welcomed: bool,
    /// The relay process of this session, once its Welcome passed the fence check.
    relay: Option<String>,
}

impl RelaySession<'_> {
    /// Sends Hello on the control stream and checks the relay's Welcome: a version this agent
    /// offered, and a relay the fence lets it write to.
    async fn handshake(
        &mut self,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        limits: &Limits,
    ) -> Result<(Welcome, Negotiated), ShipError> {
        let wanted: Vec<TopicPartition> = self
            .spool
            .pending_partitions()?
            .into_iter()
            .map(|p| TopicPartition {
                topic: p.topic,
                partition: p.partition,
            })
            .collect();
        let hello = Hello {
            site: self.loaded.config.site.clone(),
            min_version: PROTOCOL_VERSION,
            max_version: MAX_PROTOCOL_VERSION,
            software: format!("spoke-agent/{}", env!("CARGO_PKG_VERSION")),
            partitions: wanted,
        };
        let offered = (hello.min_version, hello.max_version);
        write_frame(send, &Frame::Hello(hello)).await?;
        let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, read_frame(recv, limits))
            .await
            .map_err(|_| ShipError::Timeout("Welcome"))??
        {
            Some(Frame::Welcome(welcome)) => welcome,
            Some(Frame::Goodbye(goodbye)) => return Err(ShipError::Refused(goodbye.reason)),
            Some(other) => {
                return Err(ShipError::Unexpected {
                    expected: "Welcome",
                    got: other.name(),
                })
            }
            None => return Err(ShipError::Closed("before Welcome".into())),
        };
        let version = Negotiated::from_welcome(offered, &welcome)?;
        self.check_fence(&welcome.relay)?;
        self.relay = Some(welcome.relay.clone());
        Ok((welcome, version))
    }

    /// Takes the Welcome's resume points: chunks below them are in the hub already.
    fn resume(&mut self, welcome: &Welcome) -> Result<(), ShipError> {
        // Chunks wholly below the resume point are already in the hub (an Ack that was lost
        // with the previous connection): drop them instead of sending them again.
        for point in &welcome.resume {
            let partition = SourcePartition {
                topic: point.topic.clone(),
                partition: point.partition,
            };
            let freed = self.spool.remove_acked(&partition, point.next_offset)?;
            if freed.records > 0 {
                self.progress.records_acked.inc_by(freed.records);
                info!(topic = %point.topic, partition = point.partition, records = freed.records, "already in the hub");
            }
        }
        self.progress.settled(welcome.resume.iter().map(|point| {
            let partition = SourcePartition {
                topic: point.topic.clone(),
                partition: point.partition,
            };
            (partition, point.next_offset)
        }));
        self.welcomed = true;
        self.progress.relay_connected.store(true, Ordering::Relaxed);
        Ok(())
    }

    async fn run(&mut self, connection: &quinn::Connection) -> Result<Ended, ShipError> {
        let limits = Limits::default();
        let (mut send, mut recv) = connection.open_bi().await?;
        let (welcome, version) = self.handshake(&mut send, &mut recv, &limits).await?;
        self.resume(&welcome)?;
        let (inbound_tx, mut inbound) = mpsc::channel(INBOUND_QUEUE);
        let _reader = AbortOnDropHandle::new(tokio::spawn(async move {
            loop {
                let frame = read_frame(&mut recv, &limits).await;
                let done = !matches!(frame, Ok(Some(_)));
                if inbound_tx.send(frame).await.is_err() || done {
                    return;
                }
            }
        }));

        let ship = &self.loaded.config.ship;
        let window = usize::try_from(ship.window).unwrap_or(usize::MAX);
        let window_bytes = ship.window_bytes.as_u64();
        let mut lanes = Lanes::open(connection, version, ship.streams)?;
        info!(relay = %welcome.relay, version = welcome.version, data_streams = lanes.data_streams(), "connected");
        // Per partition, the offset the next chunk to send starts at or after.
        let mut cursors: HashMap<SourcePartition, i64> = HashMap::new();
        // Partitions whose topic the relay refused: not sent again in this session.
        let mut refused: HashSet<SourcePartition> = HashSet::new();
        let mut round_robin = 0usize;
        let mut seq = 0u64;
        let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
        let mut pacer = Pacer::new(ship.max_bandwidth.as_u64());
        let mut send_window = SendWindow::default();
        loop {
            // At least one batch goes out whatever its size, so a chunk larger than the byte
            // window still ships. A pass ends after WRITE_PASS so that acknowledgements and a
            // stop are taken between frames, not only once the window is full: over a slow
            // link a full window is minutes of writing.
            let pass = tokio::time::Instant::now();
            let mut more_to_write = false;
            while lanes.in_flight_batches < window
                && (lanes.is_empty() || lanes.in_flight_bytes < window_bytes)
            {
                if pass.elapsed() >= WRITE_PASS {
                    more_to_write = true;
                    break;
                }
                let chunk = self.progress.with_unsettled(|unsettled| {
                    let chunk = self.next_chunk(&cursors, &refused, &mut round_robin)?;
                    if let Some(chunk) = &chunk {
                        let until = unsettled
                            .entry(chunk.partition.clone())
                            .or_insert(chunk.next_offset);
                        *until = (*until).max(chunk.next_offset);
                    }
                    Ok::<_, ShipError>(chunk)
                })?;
                let Some(chunk) = chunk else {
                    break;
                };
                // Unknown until the tailer reaches the local broker (e.g. after a restart while
                // it is down): 0 tells the relay, which needs it only to create a missing hub
                // topic, so a backlog still ships to existing hub topics.
                // The same for a partition the topic no longer has (it was recreated with
                // fewer): its spooled chunks still ship, and no count includes it.
                let partition_count = self
                    .progress
                    .partition_count(&chunk.partition.topic)
                    .filter(|&count| chunk.partition.partition < count)
                    .unwrap_or(0);
                seq += 1;
                let lane_index = lanes.lane_of(&chunk.partition);
                let lane = &mut lanes.lanes[lane_index];
                let (ahead, bytes) =
                    self.frames_for(&chunk, seq, partition_count, lane, version)?;
                let start_at = pacer.reserve(bytes.len());
                self.heartbeat_until(start_at, &mut send, connection, &mut heartbeat)
                    .await?;
                self.extend_fence(&welcome.relay).await?;
                send_window.follow(connection);
                for frame in ahead.iter().chain([&bytes]) {
                    self.write_heartbeating(
                        lane.send.as_mut(),
                        &mut send,
                        connection,
                        &mut heartbeat,
                        frame,
                    )
                    .await?;
                    self.progress.wire_bytes.inc_by(frame.len() as u64);
                }
                cursors.insert(chunk.partition.clone(), chunk.next_offset);
                lanes.sent(
                    lane_index,
                    InFlight {
                        seq,
                        bytes: bytes.len() as u64,
                        partition: chunk.partition,
                        next_offset: chunk.next_offset,
                        records: chunk.record_count,
                    },
                );
            }
            tokio::select! {
                // In this order so that a steady stream of acknowledgements cannot hold off a
                // stop or a heartbeat, and both come before more writing.
                biased;
                () = self.stop.cancelled() => {
                    self.drain(&mut inbound, &mut lanes, &mut refused).await;
                    lanes.finish();
                    let goodbye = Goodbye { code: GoodbyeCode::Shutdown, reason: "agent stopping".into() };
                    let _ = write_frame(&mut send, &Frame::Goodbye(goodbye)).await;
                    let _ = send.finish();
                    // Closing a QUIC connection discards stream data the peer has not
                    // received yet: wait for the relay's own Goodbye (sent once it has
                    // confirmed everything and written its checkpoints) or end of stream.
                    let goodbye_seen = async {
                        while let Some(Ok(Some(frame))) = inbound.recv().await {
                            if matches!(frame, Frame::Goodbye(_)) {
                                break;
                            }
                        }
                    };
                    let _ = tokio::time::timeout(GOODBYE_WAIT, goodbye_seen).await;
                    return Ok(Ended::Stopped);
                }
                _ = heartbeat.tick() => self.send_heartbeat(&mut send, connection).await?,
                frame = inbound.recv() => {
                    let frame = frame.ok_or_else(|| ShipError::Closed("reader stopped".into()))?;
                    Progress::touch(&self.progress.relay_seen_ms);
                    self.handle(frame?, &mut lanes, &mut refused)?;
                }
                // Before `spooled`, whose permit it then leaves for the next pass.
                () = std::future::ready(()), if more_to_write => {}
                () = self.progress.spooled.notified() => {}
            }
        }
    }

    /// A heartbeat also extends the fence while it names this session's relay: the relay
    /// counts the heartbeat as the agent still being there (`hub.fence_delay` on the relay),
    /// so the agent must not move elsewhere sooner than the fence delay after it either.
    async fn send_heartbeat(
        &mut self,
        control: &mut quinn::SendStream,
        connection: &quinn::Connection,
    ) -> Result<(), ShipError> {
        let relay = self
            .fence
            .as_ref()
            .map(|fence| fence.relay.clone())
            .filter(|relay| self.relay.as_deref() == Some(relay.as_str()));
        if let Some(relay) = relay {
            self.extend_fence(&relay).await?;
        }
        write_frame(control, &Frame::Heartbeat(self.heartbeat())).await?;
        log_path(connection);
        Ok(())
    }

    /// Waits for `until` (the pacer's start for the next frame), heartbeating on the control
    /// stream meanwhile: between frames a heartbeat may go on it whatever stream the data uses.
    async fn heartbeat_until(
        &mut self,
        until: Option<tokio::time::Instant>,
        control: &mut quinn::SendStream,
        connection: &quinn::Connection,
        heartbeat: &mut tokio::time::Interval,
    ) -> Result<(), ShipError> {
        let Some(until) = until else {
            return Ok(());
        };
        loop {
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(until) => return Ok(()),
                _ = heartbeat.tick() => self.send_heartbeat(control, connection).await?,
            }
        }
    }

    /// Writes one frame on its data stream (`data`), or on the control stream where the relay
    /// allows no data streams. The relay drops a session whose control stream carries nothing
    /// for its read timeout (30 s), and a frame may wait longer than that for the send window
    /// over a slow link (a 1 MiB frame on each of four streams is 17 s at 2 Mbit/s), so the
    /// heartbeat goes on while a data stream waits. On the control stream the frame's own
    /// bytes are what the relay hears: a heartbeat cannot go inside a frame.
    async fn write_heartbeating(
        &mut self,
        data: Option<&mut quinn::SendStream>,
        control: &mut quinn::SendStream,
        connection: &quinn::Connection,
        heartbeat: &mut tokio::time::Interval,
        frame: &[u8],
    ) -> Result<(), ShipError> {
        let Some(data) = data else {
            control.write_all(frame).await.map_err(WireError::from)?;
            return Ok(());
        };
        let mut written = 0;
        while written < frame.len() {
            tokio::select! {
                biased;
                // `write` is cancel-safe: it wrote nothing unless it returned.
                n = data.write(&frame[written..]) => written += n.map_err(WireError::from)?,
                _ = heartbeat.tick() => self.send_heartbeat(control, connection).await?,
            }
        }
        Ok(())
    }

    /// A version 1 relay knows no dictionaries: the chunk is decompressed with its dictionary
    /// and compressed again without (the only case where the agent re-encodes what it spooled;
    /// it ends once the relays are upgraded).
    /// The frames that carry `chunk` on `lane`: its `Batch`, and ahead of it on the same
    /// (ordered) stream what the relay must know first: the source topic's configuration
    /// before the topic's first batch there (the relay creates a missing hub topic at it),
    /// and a dictionary before the first batch that names it. A relay without dictionaries
    /// gets the batch compressed without one.
    fn frames_for(
        &self,
        chunk: &Chunk,
        seq: u64,
        partition_count: i32,
        lane: &mut Lane,
        version: Negotiated,
    ) -> Result<(Vec<bytes::Bytes>, bytes::Bytes), ShipError> {
        let mut ahead = Vec::new();
        let topic = &chunk.partition.topic;
        if version.topic_configs() && lane.topic_configs_sent.insert(topic.clone()) {
            if let Some(entries) = self.spool.topic_config(topic)? {
                ahead.push(frame_bytes(&Frame::TopicConfig(TopicConfig {
                    topic: topic.clone(),
                    entries,
                }))?);
            }
        }
        let mut batch = batch_frame(seq, partition_count, chunk)?;
        if let Some(id) = chunk.dictionary {
            let stored =
                self.spool
                    .dictionary(id)?
                    .ok_or_else(|| ShipError::MissingDictionary {
                        partition: chunk.partition.to_string(),
                        id,
                    })?;
            if !version.dictionaries() {
                batch = self.without_dictionary(batch, chunk, stored.bytes)?;
            } else if lane.dictionaries_sent.insert(id) {
                ahead.push(frame_bytes(&Frame::Dictionary(Dictionary {
                    id,
                    dictionary: stored.bytes,
                }))?);
            }
        }
        Ok((ahead, frame_bytes(&batch)?))
    }

    fn without_dictionary(
        &self,
        batch: Frame,
        chunk: &Chunk,
        dictionary: bytes::Bytes,
    ) -> Result<Frame, ShipError> {
        let Frame::Batch(mut batch) = batch else {
            return Ok(batch);
        };
        let failed = |reason: String| ShipError::Transcode {
            partition: chunk.partition.to_string(),
            reason,
        };
        let mut known = Dictionaries::new(DictionaryLimits {
            max_dictionaries: 1,
            max_dictionary_bytes: u32::MAX,
        });
        let id = batch.codec.dictionary_id().unwrap_or_default();
        known
            .insert(&Dictionary { id, dictionary })
            .map_err(|e| failed(e.to_string()))?;
        let section = decompress_section(
            batch.codec,
            batch.uncompressed_len,
            &batch.payload,
            &BatchLimits::default(),
            &known,
        )
        .map_err(|e| failed(e.to_string()))?;
        let level = self.loaded.config.ship.zstd_level;
        let payload = zstd::bulk::compress(&section, level).map_err(|e| failed(e.to_string()))?;
        batch.codec = Codec::Zstd;
        batch.payload = bytes::Bytes::from(payload);
        Ok(Frame::Batch(batch))
    }

    /// Without broker transactions a relay that lost us may still have records in flight to
    /// the hub (DESIGN.md, fencing). A session with a *different* relay process therefore
    /// starts only `fence_delay` after the last batch that went to the previous one; the
    /// resume point it computed before that is not trusted, so the session is dropped and
    /// opened again after the wait.
    fn check_fence(&self, relay: &str) -> Result<(), ShipError> {
        let Some(fence) = self.fence.as_ref() else {
            return Ok(());
        };
        let wait = fence::wait(
            fence,
            relay,
            &fence::Instant::now(),
            self.loaded.config.relay.fence_delay,
        );
        if wait.is_zero() {
            return Ok(());
        }
        Err(ShipError::Fenced {
            previous: fence.relay.clone(),
            wait,
        })
    }

    /// Records, durably and ahead of time, that batches may go to `relay` for the next
    /// second, so that even a restart after a crash honours the fence.
    async fn extend_fence(&mut self, relay: &str) -> Result<(), ShipError> {
        let now = fence::Instant::now();
        if let Some(held) = self.fence.as_ref() {
            if held.relay == relay && held.until.left_after(&now) > fence::SLACK / 2 {
                return Ok(());
            }
        }
        let fence = Fence {
            relay: relay.to_owned(),
            until: now.after(fence::SLACK),
        };
        // Two fsyncs (the file and its directory), a few ms: off the async workers.
        let (path, written) = (self.fence_path.to_owned(), fence.clone());
        tokio::task::spawn_blocking(move || fence::write(&path, &written))
            .await
            .map_err(std::io::Error::other)
            .and_then(|result| result)
            .map_err(|source| ShipError::FenceFile {
                path: self.fence_path.to_owned(),
                source,
            })?;
        *self.fence = Some(fence);
        Ok(())
    }

    /// The next chunk to send, taking partitions in turn so one busy partition cannot starve
    /// the others.
    fn next_chunk(
        &self,
        cursors: &HashMap<SourcePartition, i64>,
        refused: &HashSet<SourcePartition>,
        round_robin: &mut usize,
    ) -> Result<Option<Chunk>, ShipError> {
        let partitions = self.spool.pending_partitions()?;
        let n = partitions.len();
        for i in 0..n {
            let partition = &partitions[(*round_robin + i) % n];
            if refused.contains(partition) {
                continue;
            }
            let from = cursors.get(partition).copied().unwrap_or(i64::MIN);
            let durable = self.spool.durable_position(partition);
            if let Some(chunk) = self
                .spool
                .chunks_from(partition, from, 1)?
                .into_iter()
                .next()
                // Not flushed yet: the tailer's flush wakes the shipper again.
                .filter(|chunk| durable.is_some_and(|at| chunk.next_offset <= at))
            {
                *round_robin = (*round_robin + i + 1) % n;
                return Ok(Some(chunk));
            }
        }
        Ok(None)
    }

    fn handle(
        &self,
        frame: Option<Frame>,
        lanes: &mut Lanes,
        refused: &mut HashSet<SourcePartition>,
    ) -> Result<(), ShipError> {
        match frame {
            Some(Frame::Ack(ack)) => {
                let oldest = lanes.answered(ack.seq)?;
                // The window between a batch landing in the hub and leaving the spool.
                spoke_process::failpoint::hit("ship.ack_received");
                self.spool
                    .remove_acked(&oldest.partition, oldest.next_offset)?;
                self.progress
                    .records_acked
                    .inc_by(u64::from(oldest.records));
                Ok(())
            }
            Some(Frame::Nack(nack)) => {
                let oldest = lanes.answered(nack.seq)?;
                if nack.code == NackCode::NotAllowed {
                    error!(topic = %oldest.partition.topic, partition = oldest.partition.partition, message = %nack.message,
                        "relay refuses this topic; it stays spooled until the relay's ACL allows it");
                    refused.insert(oldest.partition);
                    return Ok(());
                }
                Err(ShipError::Nacked {
                    seq: nack.seq,
                    message: nack.message,
                })
            }
            Some(Frame::Rejected(rejected)) => {
                // Counted when the relay says so; the batch's Ack follows and removes them
                // from the spool with the rest of the batch. A batch resent because that Ack
                // never came is judged again: what was counted is not counted twice.
                let partition = SourcePartition {
                    topic: rejected.topic.clone(),
                    partition: rejected.partition,
                };
                for range in &rejected.ranges {
                    if !self.progress.first_rejection(&partition, range.last_offset) {
                        debug!(topic = %partition.topic, partition = partition.partition,
                            first = range.first_offset, last = range.last_offset,
                            "refused records already counted");
                        continue;
                    }
                    self.progress.record_loss(crate::progress::Loss {
                        reason: crate::progress::loss::REJECTED.to_owned(),
                        topic: rejected.topic.clone(),
                        partition: rejected.partition,
                        first_offset: range.first_offset,
                        last_offset: range.last_offset,
                        records: u64::from(range.records),
                        at_ms: crate::now_ms(),
                    });
                    error!(
                        topic = %rejected.topic,
                        partition = rejected.partition,
                        first = range.first_offset,
                        last = range.last_offset,
                        records = range.records,
                        reason = %rejected.reason,
                        "the hub refuses these records; the relay put them in its dead-letter topic (records lost)"
                    );
                }
                Ok(())
            }
            Some(Frame::Goodbye(goodbye)) => Err(ShipError::Closed(goodbye.reason)),
            Some(other) => Err(ShipError::Unexpected {
                expected: "Ack, Nack, Rejected or Goodbye",
                got: other.name(),
            }),
            None => Err(ShipError::Closed("relay finished the stream".into())),
        }
    }

    /// On shutdown: wait (bounded) for the acknowledgements of batches already sent, so a
    /// restart does not resend them.
    async fn drain(
        &self,
        inbound: &mut mpsc::Receiver<Result<Option<Frame>, WireError>>,
        lanes: &mut Lanes,
        refused: &mut HashSet<SourcePartition>,
    ) {
        let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
        while !lanes.is_empty() {
            match tokio::time::timeout_at(deadline, inbound.recv()).await {
                Ok(Some(Ok(frame))) => {
                    if let Err(error) = self.handle(frame, lanes, refused) {
                        debug!(%error, "while draining");
                        return;
                    }
                }
                _ => {
                    warn!(
                        batches = lanes.in_flight_batches,
                        "stopping with unacknowledged batches; they stay spooled"
                    );
                    return;
                }
            }
        }
    }

    fn heartbeat(&self) -> Heartbeat {
        let status = self.progress.snapshot(
            &self.loaded.config.site,
            self.spool,
            self.loaded.config.spool.max_bytes.as_u64(),
        );
        Heartbeat {
            sent_at_ms: crate::now_ms(),
            spool_bytes: status.spool_bytes,
            spool_max_bytes: status.spool_max_bytes,
            oldest_unacked_ms: (status.oldest_unacked_seconds * 1000.0) as u64,
            lost_records: status.records_lost,
            records_per_s: status.records_per_s as u64,
            lag: status
                .partitions
                .into_iter()
                .map(|p| PartitionLag {
                    topic: p.topic,
                    partition: p.partition,
                    lag_records: p.lag,
                })
                .collect(),
        }
    }
}

fn batch_frame(seq: u64, partition_count: i32, chunk: &Chunk) -> Result<Frame, ShipError> {
    let unknown = || ShipError::Codec {
        partition: format!("{}/{}", chunk.partition.topic, chunk.partition.partition),
        codec: chunk.codec,
    };
    let codec = Codec::from_wire(chunk.codec, chunk.dictionary.unwrap_or_default())
        .map_err(|_| unknown())?;
    // The codec and the dictionary reference must agree.
    if codec.dictionary_id() != chunk.dictionary {
        return Err(unknown());
    }
    Ok(Frame::Batch(Batch {
        seq,
        topic: chunk.partition.topic.clone(),
        partition: chunk.partition.partition,
        partition_count,
        first_offset: chunk.first_offset,
        last_offset: chunk.last_offset,
        next_offset: chunk.next_offset,
        record_count: chunk.record_count,
        codec,
        uncompressed_len: chunk.uncompressed_len,
        // Shipped exactly as spooled: compressed once, at the edge.
        payload: chunk.payload.clone(),
    }))
}

fn frame_bytes(frame: &Frame) -> Result<bytes::Bytes, ShipError> {
    frame
        .to_bytes()
        .map_err(|e| ShipError::Wire(WireError::Encode(e)))
}

/// `ship.max_bandwidth`: spaces sends so the average stays under the cap.
struct Pacer {
    bytes_per_s: u64,
    next_send: tokio::time::Instant,
}

impl Pacer {
    fn new(bytes_per_s: u64) -> Self {
        Self {
            bytes_per_s,
            next_send: tokio::time::Instant::now(),
        }
    }

    /// Books the link time of a frame of `bytes`; returns when it may start if that is later
    /// than now.
    fn reserve(&mut self, bytes: usize) -> Option<tokio::time::Instant> {
        if self.bytes_per_s == 0 {
            return None;
        }
        let now = tokio::time::Instant::now();
        let start = self.next_send.max(now);
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_s as f64);
        self.next_send = start + cost;
        (start > now).then_some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lanes without streams: the bookkeeping alone.
    fn lanes(count: usize) -> Lanes {
        Lanes {
            lanes: (0..count).map(|_| Lane::new(None)).collect(),
            assigned: HashMap::new(),
            in_flight_batches: 0,
            in_flight_bytes: 0,
        }
    }

    fn partition(n: i32) -> SourcePartition {
        SourcePartition {
            topic: "orders".into(),
            partition: n,
        }
    }

    fn batch(seq: u64, partition: SourcePartition) -> InFlight {
        InFlight {
            seq,
            bytes: 100,
            partition,
            next_offset: 0,
            records: 1,
        }
    }

    #[test]
    fn partitions_are_dealt_over_the_lanes_and_keep_theirs() {
        let mut lanes = lanes(2);
        assert_eq!(lanes.lane_of(&partition(7)), 0);
        assert_eq!(lanes.lane_of(&partition(3)), 1);
        assert_eq!(lanes.lane_of(&partition(5)), 0);
        assert_eq!(
            lanes.lane_of(&partition(3)),
            1,
            "a partition keeps its lane"
        );
    }

    #[test]
    fn acks_come_in_order_per_lane_and_in_any_order_across_lanes() {
        let mut lanes = lanes(2);
        for (seq, lane) in [(1, 0), (2, 1), (3, 0), (4, 1)] {
            lanes.sent(lane, batch(seq, partition(lane as i32)));
        }
        assert_eq!((lanes.in_flight_batches, lanes.in_flight_bytes), (4, 400));
        // Lane 1 overtakes lane 0: a lost packet held up only lane 0.
        assert_eq!(lanes.answered(2).map(|b| b.seq).ok(), Some(2));
        assert_eq!(lanes.answered(4).map(|b| b.seq).ok(), Some(4));
        // Within a lane, order holds: 3 before 1 is the relay's error.
        match lanes.answered(3) {
            Err(ShipError::AckOrder { expected, got }) => assert_eq!((expected, got), (1, 3)),
            other => panic!("expected AckOrder, got {:?}", other.map(|b| b.seq)),
        }
        assert_eq!(lanes.answered(1).map(|b| b.seq).ok(), Some(1));
        assert_eq!(lanes.answered(3).map(|b| b.seq).ok(), Some(3));
        assert!(lanes.is_empty());
        assert_eq!(lanes.in_flight_bytes, 0);
        assert!(matches!(
            lanes.answered(5),
            Err(ShipError::AckOrder { got: 5, .. })
        ));
    }
}
