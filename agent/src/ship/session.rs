//! One session with a relay: the Hello and the relay's Welcome, then batches out and the
//! relay's answers back, until the connection ends or the agent stops.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use spoke_proto::connection::agent::{Answer, Handshake, Reply, Window};
use spoke_proto::{
    Frame, Goodbye, GoodbyeCode, Heartbeat, Limits, NackCode, Negotiated, PartitionLag, Rejected,
    TopicPartition, Welcome,
};
use spoke_transport::wire::{read_frame, write_frame, WireError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, error, info, warn};

use super::fence::SessionFence;
use super::frames::frames_for;
use super::lanes::{Lanes, SendWindow, Shipped};
use super::pacer::Pacer;
use super::ShipError;
use crate::config::Loaded;
use crate::progress::Progress;
use crate::spool::{Chunk, SourcePartition, Spool};

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
/// Frames read ahead of the session loop.
const INBOUND_QUEUE: usize = 64;

/// What the relay sent, as the task reading its stream hands it over.
type RelayFrames = mpsc::Receiver<Result<Option<Frame>, WireError>>;

/// How a session ended.
pub(super) enum Ended {
    /// Shutdown was requested and in-flight batches were drained (or the grace ran out).
    Stopped,
}

/// The agent's side of one session with a relay.
pub(super) struct RelaySession<'a> {
    pub(super) loaded: &'a Loaded,
    pub(super) spool: &'a dyn Spool,
    pub(super) progress: &'a Progress,
    pub(super) stop: &'a CancellationToken,
    pub(super) fence: SessionFence<'a>,
    /// Whether the relay welcomed this session (the reconnect backoff starts over then).
    pub(super) welcomed: bool,
    /// The relay process of this session, once its Welcome passed the fence check.
    pub(super) relay: Option<String>,
}

/// What the session loop keeps between its passes.
struct Shipping {
    /// The relay process the batches go to.
    relay: String,
    control: quinn::SendStream,
    lanes: Lanes,
    /// Per partition, the offset the next chunk to send starts at or after.
    cursors: HashMap<SourcePartition, i64>,
    /// Partitions whose topic the relay refused: not sent again in this session.
    refused: HashSet<SourcePartition>,
    round_robin: usize,
    heartbeat: tokio::time::Interval,
    pacer: Pacer,
    send_window: SendWindow,
}

impl RelaySession<'_> {
    pub(super) async fn run(&mut self, connection: &quinn::Connection) -> Result<Ended, ShipError> {
        let limits = Limits::default();
        let (mut control, mut recv) = connection.open_bi().await?;
        let (welcome, version) = self.handshake(&mut control, &mut recv, &limits).await?;
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
        let mut state = self.shipping(connection, welcome.relay, version, control)?;
        loop {
            let more_to_write = self.write_pass(connection, &mut state).await?;
            tokio::select! {
                // In this order so that a steady stream of acknowledgements cannot hold off a
                // stop or a heartbeat, and both come before more writing.
                biased;
                () = self.stop.cancelled() => {
                    self.leave(&mut state, &mut inbound).await;
                    return Ok(Ended::Stopped);
                }
                _ = state.heartbeat.tick() => self.send_heartbeat(&mut state.control, connection).await?,
                frame = inbound.recv() => {
                    let frame = frame.ok_or_else(|| ShipError::Closed("reader stopped".into()))?;
                    Progress::touch(&self.progress.relay_seen_ms);
                    self.handle(frame?, &mut state.lanes.window, &mut state.refused)?;
                }
                // Before `spooled`, whose permit it then leaves for the next pass.
                () = std::future::ready(()), if more_to_write => {}
                () = self.progress.spooled.notified() => {}
            }
        }
    }

    /// Sends Hello on the control stream and checks the relay's answer: a Welcome at a version
    /// this agent offered, from a relay the fence lets it write to.
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
        let (hello, handshake) = Handshake::hello(
            self.loaded.config.site.clone(),
            format!("spoke-agent/{}", env!("CARGO_PKG_VERSION")),
            wanted,
        );
        write_frame(send, &Frame::Hello(hello)).await?;
        let answer = tokio::time::timeout(WELCOME_TIMEOUT, read_frame(recv, limits))
            .await
            .map_err(|_| ShipError::Timeout("Welcome"))??;
        let (welcome, version) = match handshake.answer(answer)? {
            Answer::Welcome { welcome, version } => (welcome, version),
            Answer::Refused(goodbye) => return Err(ShipError::Refused(goodbye.reason)),
        };
        self.fence.check(&welcome.relay)?;
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

    fn shipping(
        &self,
        connection: &quinn::Connection,
        relay: String,
        version: Negotiated,
        control: quinn::SendStream,
    ) -> Result<Shipping, ShipError> {
        let ship = &self.loaded.config.ship;
        let window = usize::try_from(ship.window).unwrap_or(usize::MAX);
        let lanes = Lanes::open(
            connection,
            version,
            ship.streams,
            window,
            ship.window_bytes.as_u64(),
        )?;
        info!(%relay, version = version.number(), data_streams = lanes.data_streams(), "connected");
        Ok(Shipping {
            relay,
            control,
            lanes,
            cursors: HashMap::new(),
            refused: HashSet::new(),
            round_robin: 0,
            heartbeat: tokio::time::interval(HEARTBEAT_EVERY),
            pacer: Pacer::new(ship.max_bandwidth.as_u64()),
            send_window: SendWindow::default(),
        })
    }

    /// Writes batches while the window has room and the spool has durable chunks; true if it
    /// stopped only because the pass took its time. At least one batch goes out whatever its
    /// size, so a chunk larger than the byte window still ships. A pass ends after WRITE_PASS
    /// so that acknowledgements and a stop are taken between frames, not only once the window
    /// is full: over a slow link a full window is minutes of writing.
    async fn write_pass(
        &mut self,
        connection: &quinn::Connection,
        state: &mut Shipping,
    ) -> Result<bool, ShipError> {
        let pass = tokio::time::Instant::now();
        while state.lanes.window.has_room() {
            if pass.elapsed() >= WRITE_PASS {
                return Ok(true);
            }
            let chunk = self.progress.with_unsettled(|unsettled| {
                let chunk = self.next_chunk(state)?;
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
            self.send_chunk(connection, state, chunk).await?;
        }
        Ok(false)
    }

    /// Writes `chunk`'s frames on its partition's lane, heartbeating meanwhile, and takes it
    /// into the window.
    async fn send_chunk(
        &mut self,
        connection: &quinn::Connection,
        state: &mut Shipping,
        chunk: Chunk,
    ) -> Result<(), ShipError> {
        // Unknown until the tailer reaches the local broker (e.g. after a restart while it is
        // down): 0 tells the relay, which needs it only to create a missing hub topic, so a
        // backlog still ships to existing hub topics. The same for a partition the topic no
        // longer has (it was recreated with fewer): its spooled chunks still ship, and no
        // count includes it.
        let partition_count = self
            .progress
            .partition_count(&chunk.partition.topic)
            .filter(|&count| chunk.partition.partition < count)
            .unwrap_or(0);
        let SourcePartition { topic, partition } = &chunk.partition;
        let window = &mut state.lanes.window;
        let lane = window.lane_of(topic, *partition);
        let ahead = window.ahead(lane, topic, chunk.dictionary);
        let seq = window.next_seq();
        let level = self.loaded.config.ship.zstd_level;
        let (ahead, batch) = frames_for(self.spool, &chunk, seq, partition_count, ahead, level)?;
        let start_at = state.pacer.reserve(batch.len());
        self.heartbeat_until(
            start_at,
            &mut state.control,
            connection,
            &mut state.heartbeat,
        )
        .await?;
        self.fence.extend(&state.relay).await?;
        state.send_window.follow(connection);
        for frame in ahead.iter().chain([&batch]) {
            self.write_heartbeating(
                state.lanes.stream(lane),
                &mut state.control,
                connection,
                &mut state.heartbeat,
                frame,
            )
            .await?;
            self.progress.wire_bytes.inc_by(frame.len() as u64);
        }
        state
            .cursors
            .insert(chunk.partition.clone(), chunk.next_offset);
        let shipped = Shipped {
            next_offset: chunk.next_offset,
            records: chunk.record_count,
        };
        state
            .lanes
            .window
            .sent(lane, batch.len() as u64, topic, *partition, shipped);
        Ok(())
    }

    /// A graceful stop: waits (bounded) for the answers to batches in flight, ends the
    /// streams, says Goodbye and waits for the relay's.
    async fn leave(&mut self, state: &mut Shipping, inbound: &mut RelayFrames) {
        self.drain(inbound, &mut state.lanes.window, &mut state.refused)
            .await;
        state.lanes.finish();
        let goodbye = Goodbye {
            code: GoodbyeCode::Shutdown,
            reason: "agent stopping".into(),
        };
        let _ = write_frame(&mut state.control, &Frame::Goodbye(goodbye)).await;
        let _ = state.control.finish();
        // Closing a QUIC connection discards stream data the peer has not received yet: wait
        // for the relay's own Goodbye (sent once it has confirmed everything and written its
        // checkpoints) or end of stream.
        let goodbye_seen = async {
            while let Some(Ok(Some(frame))) = inbound.recv().await {
                if matches!(frame, Frame::Goodbye(_)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(GOODBYE_WAIT, goodbye_seen).await;
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
            .relay()
            .filter(|relay| self.relay.as_deref() == Some(*relay))
            .map(str::to_owned);
        if let Some(relay) = relay {
            self.fence.extend(&relay).await?;
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

    /// The next chunk to send, taking partitions in turn so one busy partition cannot starve
    /// the others.
    fn next_chunk(&self, state: &mut Shipping) -> Result<Option<Chunk>, ShipError> {
        let partitions = self.spool.pending_partitions()?;
        let n = partitions.len();
        for i in 0..n {
            let partition = &partitions[(state.round_robin + i) % n];
            if state.refused.contains(partition) {
                continue;
            }
            let from = state.cursors.get(partition).copied().unwrap_or(i64::MIN);
            let durable = self.spool.durable_position(partition);
            if let Some(chunk) = self
                .spool
                .chunks_from(partition, from, 1)?
                .into_iter()
                .next()
                // Not flushed yet: the tailer's flush wakes the shipper again.
                .filter(|chunk| durable.is_some_and(|at| chunk.next_offset <= at))
            {
                state.round_robin = (state.round_robin + i + 1) % n;
                return Ok(Some(chunk));
            }
        }
        Ok(None)
    }

    /// Takes one frame from the relay, as the protocol's window judges it.
    fn handle(
        &self,
        frame: Option<Frame>,
        window: &mut Window<Shipped>,
        refused: &mut HashSet<SourcePartition>,
    ) -> Result<(), ShipError> {
        match window.receive(frame)? {
            Reply::Acked { batch, .. } => {
                // The window between a batch landing in the hub and leaving the spool.
                spoke_process::failpoint::hit("ship.ack_received");
                let partition = SourcePartition {
                    topic: batch.topic,
                    partition: batch.partition,
                };
                self.spool
                    .remove_acked(&partition, batch.batch.next_offset)?;
                self.progress
                    .records_acked
                    .inc_by(u64::from(batch.batch.records));
                Ok(())
            }
            Reply::Nacked { batch, nack } => {
                if nack.code == NackCode::NotAllowed {
                    error!(topic = %batch.topic, partition = batch.partition, message = %nack.message,
                        "relay refuses this topic; it stays spooled until the relay's ACL allows it");
                    refused.insert(SourcePartition {
                        topic: batch.topic,
                        partition: batch.partition,
                    });
                    return Ok(());
                }
                Err(ShipError::Nacked {
                    seq: nack.seq,
                    message: nack.message,
                })
            }
            Reply::Rejected(rejected) => {
                self.count_rejected(&rejected);
                Ok(())
            }
            Reply::Goodbye(goodbye) => Err(ShipError::Closed(goodbye.reason)),
            Reply::End => Err(ShipError::Closed("relay finished the stream".into())),
        }
    }

    /// Records the hub refuses are counted as lost when the relay says so; the batch's Ack
    /// follows and removes them from the spool with the rest of the batch. A batch resent
    /// because that Ack never came is judged again: what was counted is not counted twice.
    fn count_rejected(&self, rejected: &Rejected) {
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
    }

    /// On shutdown: wait (bounded) for the acknowledgements of batches already sent, so a
    /// restart does not resend them.
    async fn drain(
        &self,
        inbound: &mut RelayFrames,
        window: &mut Window<Shipped>,
        refused: &mut HashSet<SourcePartition>,
    ) {
        let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
        while !window.is_empty() {
            match tokio::time::timeout_at(deadline, inbound.recv()).await {
                Ok(Some(Ok(frame))) => {
                    if let Err(error) = self.handle(frame, window, refused) {
                        debug!(%error, "while draining");
                        return;
                    }
                }
                _ => {
                    warn!(
                        batches = window.batches(),
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
