//! One agent connection: authenticate the site, answer `Hello` with resume points, then turn
//! `Batch` frames into hub records and answer each with `Ack` once the hub confirmed all of it.
//!
//! A session reads each of the agent's streams (the control stream, and from protocol version
//! 3 its data streams) with its own reader, which decodes batches and hands them to the
//! producer in order; one acker awaits the hub's confirmations in the order the readers handed
//! batches over and writes `Ack`/`Nack` on the control stream. A bounded queue between them
//! limits how much unconfirmed data one site can hold in memory.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt, TryStreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use regex::Regex;
use spoke_proto::{
    Ack, Batch, BatchLimits, Dictionaries, DictionaryError, DictionaryLimits, Frame, Goodbye,
    GoodbyeCode, Hello, Limits, Nack, NackCode, Negotiated, Record, Rejected, ResumePoint,
    TopicConfig, VersionError, Welcome, CARRIED_TOPIC_CONFIGS,
};
use tokio::sync::{mpsc, OwnedMutexGuard};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::checkpoint::{self, Checkpoint, Checkpoints};
use crate::config::LimitsConfig;
use crate::config::{hub_topic, Acl, Delivery, OnRejected};
use crate::dead_letter;
use crate::deny::DenyList;
use crate::handoff::{self, Gates, Pending};
use crate::hub::{
    Hub, HubError, HEADER_OFFSET, HEADER_ORIGIN, HEADER_PARTITION, TRANSACTION_TIMEOUT,
};
use crate::hub_limits::TimestampWindow;
use spoke_transport::wire::{
    read_frame_when_it_comes, read_frame_within, write_frame_within, WireError,
};

/// Batches decoded and handed to the producer but not yet confirmed by the hub: as many as
/// an agent keeps in flight by default (`ship.window`), so a long link stays busy. Memory is
/// bounded by the session producer's queue (64 MiB), not by this count.
const UNCONFIRMED_BATCHES: usize = 256;

/// QUIC application close codes.
pub mod close_code {
    pub const SHUTDOWN: u32 = 0;
    pub const NOT_AUTHORIZED: u32 = 1;
    pub const PROTOCOL_ERROR: u32 = 2;
    pub const HUB_ERROR: u32 = 3;
}

/// What every session of one relay shares.
#[derive(Debug)]
pub struct SessionContext {
    pub hub: Arc<Hub>,
    /// Replaced on SIGHUP; batches are checked against the current one.
    pub acl: tokio::sync::watch::Receiver<Acl>,
    /// Replaced on SIGHUP; a session whose certificate it comes to deny is closed.
    pub deny: tokio::sync::watch::Receiver<DenyList>,
    pub limits: LimitsConfig,
    pub site_connections: SiteConnections,
    pub topic_template: String,
    /// `[hub.topic_config]`: topic configuration for the hub topics the relay creates (not
    /// the dead-letter topic, whose records have no keys to compact by).
    pub topic_config: Vec<(String, String)>,
    pub delivery: Delivery,
    pub frame_limits: Limits,
    pub batch_limits: BatchLimits,
    pub dictionary_limits: DictionaryLimits,
    pub relay_name: String,
    pub fleet: Arc<crate::fleet::Fleet>,
    pub turns: SessionTurns,
    pub checkpoints: Arc<Checkpoints>,
    /// Producers of ended sessions, still draining.
    pub teardowns: TaskTracker,
    /// How long after the last frame on the agent's control stream records may still be
    /// handed to the hub producer (`HubConfig::handover_window`).
    pub handover_window: Duration,
    /// `hub.on_rejected`, `hub.dead_letter_topic` and `hub.max_record_bytes`.
    pub rejects: Rejects,
}

/// What the relay does with records the hub refuses ([`crate::dead_letter`]).
#[derive(Debug, Clone)]
pub struct Rejects {
    pub policy: OnRejected,
    pub dead_letter_topic: String,
    /// `None`: each hub topic's `max.message.bytes` ([`Reader::topic_limits`]).
    pub max_record_bytes: Option<usize>,
    /// How long after the relay judges a record's timestamp it may still reach the hub
    /// (`hub.fence_delay` bounds it), which narrows the timestamps it lets pass.
    pub in_flight: Duration,
}

/// What a session lets through to one hub topic ([`crate::hub_limits`]).
#[derive(Debug, Clone, Copy)]
struct HubTopicLimits {
    record_bytes: usize,
    timestamps: TimestampWindow,
}

/// How long a well-ending session waits for a hub topic's partition ends.
const FLOORS_WAIT: Duration = Duration::from_secs(5);
/// How long a session of a just-started relay waits for the checkpoint view.
const CHECKPOINTS_WAIT: Duration = Duration::from_secs(10);
/// Resume scans of one Hello that run at once: each asks the hub for watermarks, and one with
/// records to read opens a consumer of its own.
const RESUME_SCANS_AT_ONCE: usize = 8;
/// How long a new session waits for the previous session of its site to drain.
const TURN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a closing session waits for its in-flight hub deliveries to resolve.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Serialises sessions of one site within this relay.
#[derive(Debug, Default)]
pub struct SessionTurns {
    sites: std::sync::Mutex<HashMap<String, Slot>>,
}

#[derive(Debug)]
struct Slot {
    turn: Arc<tokio::sync::Mutex<()>>,
    current: CancellationToken,
}

impl SessionTurns {
    /// Supersedes the site's current session, waits until it has drained, and returns this
    /// session's turn plus the token that a later session will cancel.
    async fn take(
        &self,
        site: &str,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, CancellationToken), SessionError> {
        let mine = CancellationToken::new();
        let turn = {
            let mut sites = self
                .sites
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let slot = sites.entry(site.to_owned()).or_insert_with(|| Slot {
                turn: Arc::new(tokio::sync::Mutex::new(())),
                current: CancellationToken::new(),
            });
            std::mem::replace(&mut slot.current, mine.clone()).cancel();
            slot.turn.clone()
        };
        let guard = tokio::time::timeout(TURN_TIMEOUT, turn.lock_owned())
            .await
            .map_err(|_| SessionError::TurnTimeout)?;
        Ok((guard, mine))
    }
}

/// Open connections per site, for `limits.max_connections_per_site`.
#[derive(Debug, Default)]
pub struct SiteConnections {
    sites: Arc<std::sync::Mutex<HashMap<String, u32>>>,
}

/// One counted connection of a site; dropping it uncounts it.
#[derive(Debug)]
struct SiteSlot {
    sites: Arc<std::sync::Mutex<HashMap<String, u32>>>,
    site: String,
}

impl SiteConnections {
    fn take(&self, site: &str, max: u32) -> Result<SiteSlot, SessionError> {
        let mut sites = self
            .sites
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let open = sites.entry(site.to_owned()).or_default();
        if *open >= max {
            return Err(SessionError::TooManySiteConnections { max });
        }
        *open += 1;
        Ok(SiteSlot {
            sites: self.sites.clone(),
            site: site.to_owned(),
        })
    }
}

impl Drop for SiteSlot {
    fn drop(&mut self) {
        let mut sites = self
            .sites
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(open) = sites.get_mut(&self.site) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                sites.remove(&self.site);
            }
        }
    }
}

/// Ends a session's hub producer however the session ends: queued records are purged, and
/// records already sent are waited for (landed or failed), and only then is the site's turn
/// released to a newer session. The blocking part runs on `teardowns`, which the server
/// waits for at shutdown.
struct Teardown {
    producer: Option<FutureProducer>,
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
    teardowns: TaskTracker,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        let (Some(producer), Some(turn)) = (self.producer.take(), self.turn.take()) else {
            return;
        };
        self.teardowns.spawn_blocking(move || {
            use rdkafka::producer::{Producer, PurgeConfig};
            producer.purge(PurgeConfig::default().queue());
            if let Err(error) = producer.flush(DRAIN_TIMEOUT) {
                warn!(%error, "in-flight hub deliveries did not resolve in time");
            }
            drop(producer);
            drop(turn);
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("certificate: {0}")]
    Identity(#[from] crate::tls::IdentityError),
    #[error("site {0} is not configured on this relay")]
    UnknownSite(String),
    #[error("Hello claims site {claimed} but the certificate is for {certified}")]
    SiteMismatch { claimed: String, certified: String },
    #[error("Hello lists {count} partitions; this relay accepts at most {max} (limits.max_partitions_per_hello)")]
    TooManyPartitions { count: usize, max: u32 },
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error("no Hello within {0:?}")]
    HelloTimeout(Duration),
    #[error(
        "the hub is too slow: records could not be handed to it within {window:?} of the \
         agent's last heartbeat, so they could land after the agent's fence \
         (hub.fence_delay); the session ends and they are sent again"
    )]
    HandoverLate { window: Duration },
    #[error("site already has {max} open connections on this relay")]
    TooManySiteConnections { max: u32 },
    #[error("the certificate is now on tls.deny")]
    Denied,
    #[error(
        "the hub refuses {topic}/{partition} offset {offset} ({reason}) and hub.on_rejected = \"stop\": \
         the site waits at this record (hub.on_rejected = \"dead-letter\" moves it aside)"
    )]
    Refused {
        topic: String,
        partition: i32,
        offset: i64,
        reason: &'static str,
    },
    #[error("expected {expected}, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("batch {seq} for {topic}/{partition}: {reason}")]
    BadBatch {
        seq: u64,
        topic: String,
        partition: i32,
        reason: String,
    },
    #[error("dictionary {id}: {source}")]
    Dictionary { id: u32, source: DictionaryError },
    #[error("{frame} frame of protocol version {frame_version} in a session of version {version}")]
    AboveVersion {
        frame: &'static str,
        frame_version: u8,
        version: u8,
    },
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("hub delivery failed: {0}")]
    Delivery(KafkaError),
    #[error("hub transaction failed: {0}")]
    Transaction(KafkaError),
    #[error("a newer session of this site took over")]
    Superseded,
    #[error("the previous session of this site did not finish in time")]
    TurnTimeout,
}

impl SessionError {
    /// The `spoke_relay_rejected_total` reason, for errors that are the peer's fault.
    fn reject_reason(&self) -> Option<&'static str> {
        use crate::fleet::reject;
        match self {
            Self::Identity(_) => Some(reject::IDENTITY),
            Self::UnknownSite(_) => Some(reject::UNKNOWN_SITE),
            Self::SiteMismatch { .. } => Some(reject::SITE_MISMATCH),
            Self::TooManySiteConnections { .. } => Some(reject::TOO_MANY_SITE_CONNECTIONS),
            Self::Denied => Some(reject::DENIED),
            Self::HelloTimeout(_) | Self::Wire(WireError::Stalled(_)) => Some(reject::TIMEOUT),
            Self::Version { .. }
            | Self::TooManyPartitions { .. }
            | Self::Unexpected { .. }
            | Self::BadBatch { .. }
            | Self::Dictionary { .. }
            | Self::AboveVersion { .. }
            | Self::Wire(WireError::Decode(_))
            | Self::Wire(WireError::Read(quinn::ReadExactError::FinishedEarly(_))) => {
                Some(reject::PROTOCOL)
            }
            Self::Connection(_)
            | Self::Wire(_)
            | Self::Hub(_)
            | Self::Delivery(_)
            | Self::Transaction(_)
            | Self::Superseded
            | Self::HandoverLate { .. }
            | Self::Refused { .. }
            | Self::TurnTimeout => None,
        }
    }

    fn close_code(&self) -> u32 {
        match self {
            Self::Identity(_)
            | Self::UnknownSite(_)
            | Self::SiteMismatch { .. }
            | Self::Denied
            | Self::TooManySiteConnections { .. } => close_code::NOT_AUTHORIZED,
            Self::Hub(_)
            | Self::Delivery(_)
            | Self::Transaction(_)
            | Self::TurnTimeout
            | Self::Refused { .. }
            | Self::HandoverLate { .. } => close_code::HUB_ERROR,
            _ => close_code::PROTOCOL_ERROR,
        }
    }
}

/// Serves one connection until the agent leaves, an error ends it, or the relay shuts down.
pub async fn serve(
    connection: quinn::Connection,
    context: Arc<SessionContext>,
    shutdown: CancellationToken,
) {
    let remote = connection.remote_address();
    let span = tracing::info_span!("session", %remote, site = tracing::field::Empty);
    let leaf = crate::tls::peer_leaf(&connection);
    let result = tokio::select! {
        result = run(&connection, &context).instrument(span) => result,
        () = denied(leaf, context.deny.clone()) => Err(SessionError::Denied),
        // A peer that leaves ends the session's work at once, hub work included (a resume
        // scan would otherwise run on until the session next writes).
        reason = connection.closed() => Err(SessionError::Connection(reason)),
        () = shutdown.cancelled() => Ok(()),
    };
    match result {
        Ok(()) => {
            connection.close(close_code::SHUTDOWN.into(), b"bye");
            debug!(%remote, "session closed");
        }
        Err(_) if closed_by_agent(&connection) => debug!(%remote, "agent closed the session"),
        Err(error) => {
            if let Some(reason) = error.reject_reason() {
                context.fleet.rejected(reason);
            }
            warn!(%remote, %error, "session ended");
            connection.close(error.close_code().into(), error.to_string().as_bytes());
        }
    }
}

/// Resolves once the deny list (as reloaded on SIGHUP) covers the session's certificate.
async fn denied(
    leaf: Option<rustls_pki_types::CertificateDer<'static>>,
    mut deny: tokio::sync::watch::Receiver<DenyList>,
) {
    let Some(leaf) = leaf else {
        // Only a verified certificate gets this far; without one, `run` refuses the session.
        return std::future::pending().await;
    };
    loop {
        if deny.borrow_and_update().denies(&leaf) {
            return;
        }
        if deny.changed().await.is_err() {
            // The relay is shutting down; the shutdown branch ends the session.
            return std::future::pending().await;
        }
    }
}

/// An agent that stops gracefully closes with code 0 after its Goodbye; the relay may still be
/// writing its own Goodbye then, which is no error worth a warning.
fn closed_by_agent(connection: &quinn::Connection) -> bool {
    matches!(
        connection.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(close)) if close.error_code == quinn::VarInt::from_u32(0)
    )
}

async fn run(connection: &quinn::Connection, context: &SessionContext) -> Result<(), SessionError> {
    let site = crate::tls::site_identity(connection)?;
    let _slot = context
        .site_connections
        .take(&site, context.limits.max_connections_per_site)?;
    let allow = context
        .acl
        .borrow()
        .site(&site)
        .ok_or_else(|| SessionError::UnknownSite(site.clone()))?
        .to_vec();
    tracing::Span::current().record("site", site.as_str());
    let _in_fleet = context.fleet.session(&site);

    // One deadline for the stream and its first frame: a peer that trickles the Hello in
    // byte by byte gets no more time than one that sends nothing.
    let hello_timeout = context.limits.hello_timeout;
    let hello = tokio::time::timeout(hello_timeout, async {
        let (send, mut recv) = connection.accept_bi().await?;
        let hello = read_frame_within(&mut recv, &context.frame_limits, hello_timeout).await?;
        Ok::<_, SessionError>((send, recv, hello))
    })
    .await
    .map_err(|_| SessionError::HelloTimeout(hello_timeout))??;
    let (mut send, recv, hello) = hello;
    let hello_at = Instant::now();
    let hello = match hello {
        Some(Frame::Hello(hello)) => hello,
        Some(other) => {
            return Err(SessionError::Unexpected {
                expected: "Hello",
                got: other.name(),
            })
        }
        None => {
            return Err(SessionError::Unexpected {
                expected: "Hello",
                got: "end of stream",
            })
        }
    };
    let version = match check_hello(&hello, &site, context.limits.max_partitions_per_hello) {
        Ok(version) => version,
        Err(error) => {
            let code = match error.close_code() {
                close_code::NOT_AUTHORIZED => GoodbyeCode::NotAuthorized,
                _ => GoodbyeCode::ProtocolError,
            };
            let goodbye = Goodbye {
                code,
                reason: error.to_string(),
            };
            // Best effort: the agent learns why before the connection closes.
            let _ = write_frame_within(&mut send, Frame::Goodbye(goodbye), hello_timeout).await;
            let _ = send.finish();
            return Err(error);
        }
    };

    // One session per site on this relay: the previous one (an agent that crashed and came
    // back before its old connection timed out) is told to stop, and its producer drained,
    // before this one reads the hub. Otherwise its late deliveries could land after the
    // resume scan and be sent again.
    let (turn, superseded) = context.turns.take(&site).await?;
    let transactional = context.delivery == Delivery::ExactlyOnce
        && context
            .hub
            .transactional(&context.checkpoints.topic)
            .await?;
    let producer = context
        .hub
        .producer(transactional.then(|| Hub::transactional_id(&site)))?;
    let _teardown = Teardown {
        producer: Some(producer.clone()),
        turn: Some(turn),
        teardowns: context.teardowns.clone(),
    };
    if transactional {
        // Fences every older producer of this site, on any relay, and aborts its open
        // transaction: the resume scan below then reads only committed data.
        let initialising = producer.clone();
        tokio::task::spawn_blocking(move || initialising.init_transactions(TRANSACTION_TIMEOUT))
            .await
            .map_err(HubError::from)?
            .map_err(SessionError::Transaction)?;
    }
    let session = SiteSession {
        site: &site,
        context,
        producer: &producer,
        transactional,
        hello_at,
        version,
    };
    tokio::select! {
        result = serve_site(session, connection, &allow, hello, send, recv) => result,
        () = superseded.cancelled() => Err(SessionError::Superseded),
    }
}

/// What a session's parts share once the site is known.
#[derive(Clone, Copy)]
struct SiteSession<'a> {
    site: &'a str,
    context: &'a SessionContext,
    producer: &'a FutureProducer,
    /// Data and checkpoint of each batch are committed in one Kafka transaction.
    transactional: bool,
    /// When the Hello arrived: the agent ships nothing until its Welcome.
    hello_at: Instant,
    /// The protocol version chosen for the Welcome: what either side may send.
    version: Negotiated,
}

/// The hub topics of `wanted` that exist now, with their partition counts. Each hub topic's
/// layout is resolved once, here or at its first batch, and the session scans and places
/// records by it (`Partitions::layouts`).
async fn existing_layouts(
    session: SiteSession<'_>,
    wanted: &[(String, i32)],
) -> Result<HashMap<String, i32>, SessionError> {
    let SiteSession { site, context, .. } = session;
    let mut layouts = HashMap::new();
    if context.delivery != Delivery::ExactlyOnce {
        return Ok(layouts);
    }
    let targets: BTreeSet<String> = wanted
        .iter()
        .map(|(topic, _)| hub_topic(&context.topic_template, site, topic))
        .filter(|target| crate::hub_limits::check_topic_name(target).is_ok())
        .collect();
    for target in targets {
        let count = context.hub.current_partitions(&target).await?;
        if count > 0 {
            layouts.insert(target, count);
        }
    }
    Ok(layouts)
}

/// The resume point of each of `wanted` (none without exactly-once). The scans run side by
/// side, a few at a time: each asks the hub a round trip or two, and the agent waits for all
/// of them before its first batch.
async fn resume_scans(
    session: SiteSession<'_>,
    wanted: Vec<(String, i32)>,
    layouts: &HashMap<String, i32>,
) -> Result<Vec<(String, i32, Option<crate::resume::Resume>)>, SessionError> {
    let SiteSession { site, context, .. } = session;
    let scans =
        futures_util::stream::iter(wanted.into_iter().map(|(topic, partition)| async move {
            let found = match context.delivery {
                Delivery::ExactlyOnce => {
                    let target = hub_topic(&context.topic_template, site, &topic);
                    let known = context.checkpoints.get(site, &topic, partition, &target);
                    if crate::hub_limits::check_topic_name(&target).is_err() {
                        // Nothing of it can be in the hub: its records went to the
                        // dead-letter topic, as far as the checkpoint says.
                        let progress = known.unwrap_or(Checkpoint {
                            hub_topic: target,
                            next_offset: 0,
                            scan_from: Default::default(),
                        });
                        let found = crate::resume::Resume {
                            next_offset: progress.next_offset,
                            progress,
                            scanned: 0,
                        };
                        return Ok((topic, partition, Some(found)));
                    }
                    let count = layouts.get(&target).copied().unwrap_or(0);
                    let found = context
                        .hub
                        .resume_point(site, &target, partition, known, count)
                        .await?;
                    Some(found)
                }
                Delivery::AtLeastOnce => None,
            };
            Ok::<_, HubError>((topic, partition, found))
        }))
        .buffered(RESUME_SCANS_AT_ONCE)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(scans)
}

async fn serve_site(
    session: SiteSession<'_>,
    connection: &quinn::Connection,
    allow: &[Regex],
    hello: Hello,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), SessionError> {
    let context = session.context;
    let mut resume = HashMap::new();
    let mut resume_points = Vec::new();
    let mut progress = CheckpointWriter::new(session);
    if context.delivery == Delivery::ExactlyOnce {
        context.checkpoints.wait_caught_up(CHECKPOINTS_WAIT).await;
    }
    // A partition listed twice gets one resume scan and one resume point.
    let mut seen = HashSet::new();
    let wanted: Vec<(String, i32)> = hello
        .partitions
        .iter()
        .filter(|tp| Acl::allows(allow, &tp.topic) && seen.insert((&tp.topic, tp.partition)))
        .map(|tp| (tp.topic.clone(), tp.partition))
        .collect();
    let layouts = existing_layouts(session, &wanted).await?;
    let scans = resume_scans(session, wanted, &layouts).await?;
    for (topic, partition, found) in scans {
        let next_offset = match found {
            Some(found) => {
                context.checkpoints.counted_scan(found.scanned);
                debug!(%topic, partition, next_offset = found.next_offset, scanned = found.scanned, "resume point");
                // Written now, before any data: the next session's scan then starts at this
                // session's beginning even if no later checkpoint makes it to the hub.
                progress.start(&topic, partition, found.progress);
                found.next_offset
            }
            None => 0,
        };
        resume_points.push(ResumePoint {
            topic: topic.clone(),
            partition,
            next_offset,
        });
        resume.insert((topic, partition), next_offset);
    }
    info!(
        partitions = resume_points.len(),
        welcome_after_ms = session.hello_at.elapsed().as_millis(),
        "site connected"
    );
    let welcome = Welcome {
        version: session.version.number(),
        relay: context.relay_name.clone(),
        resume: resume_points,
    };
    write_frame_within(
        &mut send,
        Frame::Welcome(welcome),
        context.limits.read_timeout,
    )
    .await?;

    let version = session.version;
    let (queue, confirmations) = mpsc::channel(UNCONFIRMED_BATCHES);
    let acker = acknowledge(send, confirmations, progress, version);
    let shared = Mutex::new(Partitions {
        resume,
        layouts,
        topic_limits: HashMap::new(),
        carried: HashMap::new(),
        stream: HashMap::new(),
        last_heard_at: tokio::time::Instant::now(),
    });
    // With transactions one batch is open at a time, whichever stream it came on: its reader
    // holds this until the acker committed it.
    let transaction = session
        .transactional
        .then(|| Arc::new(tokio::sync::Mutex::new(())));
    let reader = |stream: u64, queue: mpsc::Sender<Outcome>| Reader {
        session,
        stream,
        partitions: &shared,
        queue,
        transaction: transaction.clone(),
        version,
        dictionaries: Dictionaries::new(context.dictionary_limits),
        gates: Gates::default(),
    };
    let mut readers = FuturesUnordered::new();
    readers.push(reader(CONTROL_STREAM, queue.clone()).run(recv));
    // Dropped once no new reader can start, so that the acker sees the queue close when the
    // last reader ends.
    let mut queue = Some(queue);
    let mut next_stream = CONTROL_STREAM + 1;
    // Every reader ending (the agent finished its streams, or said Goodbye on the control
    // stream) closes the queue, and the acker then drains what is still unconfirmed; a reader
    // or the acker failing ends the session.
    tokio::pin!(acker);
    // Once the agent said Goodbye its data streams must finish within `read_timeout`: the
    // session's checkpoints and Goodbye wait for them.
    let stall = context.limits.read_timeout;
    let leaving = tokio::time::sleep(Duration::MAX);
    tokio::pin!(leaving);
    loop {
        let accepting = version.data_streams() && queue.is_some();
        tokio::select! {
            accepted = connection.accept_uni(), if accepting => {
                let Some(sender) = queue.clone() else { continue };
                readers.push(reader(next_stream, sender).run(accepted?));
                next_stream += 1;
            }
            ended = readers.next() => match ended {
                Some(Ok(stream)) => {
                    if stream == CONTROL_STREAM {
                        queue = None;
                        leaving.as_mut().reset(tokio::time::Instant::now() + stall);
                    }
                }
                Some(Err(error)) => return Err(error),
                None => break,
            },
            result = &mut acker => return result,
            () = &mut leaving => return Err(SessionError::Wire(WireError::Stalled(stall))),
        }
    }
    drop(queue);
    acker.await
}

fn check_hello(hello: &Hello, site: &str, max_partitions: u32) -> Result<Negotiated, SessionError> {
    if hello.site != site {
        return Err(SessionError::SiteMismatch {
            claimed: hello.site.clone(),
            certified: site.to_owned(),
        });
    }
    // Before any hub work: each listed partition the ACL allows costs a resume scan.
    if hello.partitions.len() > max_partitions as usize {
        return Err(SessionError::TooManyPartitions {
            count: hello.partitions.len(),
            max: max_partitions,
        });
    }
    Ok(Negotiated::from_hello(hello)?)
}

/// What the acker answers, in the order batches arrived.
enum Outcome {
    Produced {
        seq: u64,
        topic: String,
        partition: i32,
        next_offset: i64,
        deliveries: Vec<Pending>,
        /// The batch's records the hub refuses, for the agent ([`crate::dead_letter`]).
        rejected: Option<Box<Rejected>>,
        /// Their dead-letter copies.
        dead_letters: Vec<DeliveryFuture>,
        /// For the first batch of a partition the Hello did not name: the checkpoint that
        /// held before it.
        base: Option<Checkpoint>,
        /// Transactions only: the batch's open transaction, released once it is committed.
        transaction: Option<OwnedMutexGuard<()>>,
    },
    Refused(Nack),
}

/// The stream the agent opened first, which carries `Hello`, heartbeats and `Goodbye`.
const CONTROL_STREAM: u64 = 0;

/// The most source topics whose configuration one session keeps: more than any site has.
const MAX_CARRIED_TOPICS: usize = 4096;

/// A created hub topic's configuration: what the agent carried from the source topic, with
/// `[hub.topic_config]` (`configured`) taking precedence name by name.
fn hub_topic_config(
    carried: Vec<(String, String)>,
    configured: &[(String, String)],
) -> Vec<(String, String)> {
    let mut merged: Vec<(String, String)> = carried
        .into_iter()
        .filter(|(name, _)| !configured.iter().any(|(own, _)| own == name))
        .collect();
    merged.extend(configured.iter().cloned());
    merged
}

/// What the readers of one session share, per source partition.
struct Partitions {
    /// The first offset not yet handed to the producer in this session; records below it are
    /// already in the hub (a chunk may straddle the resume point).
    resume: HashMap<(String, i32), i64>,
    /// Per hub topic, its partition count as this session resolved it: records are placed
    /// and resume points scanned by it, so one session never mixes two layouts.
    layouts: HashMap<String, i32>,
    /// Per hub topic, what it takes, as this session learned it.
    topic_limits: HashMap<String, HubTopicLimits>,
    /// Per source topic, the configuration the agent says its hub topic must keep
    /// (`TopicConfig`, only names in [`CARRIED_TOPIC_CONFIGS`]); at most
    /// [`MAX_CARRIED_TOPICS`] topics.
    carried: HashMap<String, Vec<(String, String)>>,
    /// The stream its batches arrive on: one, so that they reach the producer in order.
    stream: HashMap<(String, i32), u64>,
    /// When the control stream last carried a frame (a heartbeat, or a batch from an agent
    /// without data streams): records are handed to the producer only until
    /// `handover_window` after it (`Reader::handover_deadline`).
    last_heard_at: tokio::time::Instant,
}

struct Reader<'a> {
    session: SiteSession<'a>,
    /// Which of the session's streams this reads ([`CONTROL_STREAM`] or a data stream).
    stream: u64,
    partitions: &'a Mutex<Partitions>,
    queue: mpsc::Sender<Outcome>,
    /// Transactions only: held from a batch's `begin_transaction` to its commit.
    transaction: Option<Arc<tokio::sync::Mutex<()>>>,
    /// Protocol version chosen in `Welcome`: frames above it are the peer's error.
    version: Negotiated,
    /// Dictionaries the agent sent on this stream (relays keep no state beyond the connection).
    dictionaries: Dictionaries,
    /// Per partition of this stream, the last group of records handed to the producer.
    gates: Gates,
}

impl Reader<'_> {
    /// Reads the stream to its end; returns which stream it was.
    async fn run(mut self, mut recv: quinn::RecvStream) -> Result<u64, SessionError> {
        let limits = &self.session.context.frame_limits;
        let stall = self.session.context.limits.read_timeout;
        loop {
            // The control stream carries a heartbeat every 5 s, so silence there means a lost
            // agent; a data stream is quiet whenever its partitions have nothing to send.
            let frame = if self.stream == CONTROL_STREAM {
                read_frame_within(&mut recv, limits, stall).await?
            } else {
                read_frame_when_it_comes(&mut recv, limits, stall).await?
            };
            if let Some(frame) = &frame {
                if !self.version.allows(frame.version()) {
                    return Err(SessionError::AboveVersion {
                        frame: frame.name(),
                        frame_version: frame.version(),
                        version: self.version.number(),
                    });
                }
            }
            let on_control = self.stream == CONTROL_STREAM;
            let outcome = match frame {
                None => return Ok(self.stream),
                Some(Frame::Batch(batch)) => {
                    // Only the control stream's frames say that the agent is still there: a
                    // data stream's frames wait in QUIC's buffers while their reader waits for
                    // the hub, and may be read long after the agent died. With data streams
                    // the control stream carries heartbeats alone and is read at once.
                    if on_control {
                        self.lock_partitions().last_heard_at = tokio::time::Instant::now();
                    }
                    self.handle_batch(batch).await?
                }
                Some(Frame::Dictionary(dictionary)) => {
                    self.dictionaries.insert(&dictionary).map_err(|source| {
                        SessionError::Dictionary {
                            id: dictionary.id,
                            source,
                        }
                    })?;
                    debug!(
                        id = dictionary.id,
                        bytes = dictionary.dictionary.len(),
                        "dictionary"
                    );
                    continue;
                }
                Some(Frame::TopicConfig(config)) => {
                    self.carry(config);
                    continue;
                }
                Some(Frame::Heartbeat(heartbeat)) if on_control => {
                    self.lock_partitions().last_heard_at = tokio::time::Instant::now();
                    debug!(spool_bytes = heartbeat.spool_bytes, "heartbeat");
                    self.session
                        .context
                        .fleet
                        .heartbeat(self.session.site, heartbeat);
                    continue;
                }
                Some(Frame::Goodbye(goodbye)) if on_control => {
                    info!(reason = %goodbye.reason, "agent said goodbye");
                    return Ok(self.stream);
                }
                Some(other) => {
                    return Err(SessionError::Unexpected {
                        expected: if on_control {
                            "Batch, Dictionary, TopicConfig, Heartbeat or Goodbye"
                        } else {
                            "Batch, Dictionary or TopicConfig on a data stream"
                        },
                        got: other.name(),
                    })
                }
            };
            if self.queue.send(outcome).await.is_err() {
                // The acker ended; its result is what the session reports.
                return Ok(self.stream);
            }
        }
    }

    fn lock_partitions(&self) -> std::sync::MutexGuard<'_, Partitions> {
        self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps what of `config` a hub topic may take from its site: the names in
    /// [`CARRIED_TOPIC_CONFIGS`], nothing that could change what the hub keeps beyond them.
    fn carry(&self, config: TopicConfig) {
        let (kept, ignored): (Vec<_>, Vec<_>) = config
            .entries
            .into_iter()
            .partition(|(name, _)| CARRIED_TOPIC_CONFIGS.contains(&name.as_str()));
        if !ignored.is_empty() {
            let names: Vec<&str> = ignored.iter().map(|(name, _)| name.as_str()).collect();
            debug!(topic = %config.topic, ?names, "topic configuration not carried to the hub");
        }
        let mut partitions = self.lock_partitions();
        if partitions.carried.len() >= MAX_CARRIED_TOPICS
            && !partitions.carried.contains_key(&config.topic)
        {
            warn!(topic = %config.topic, "too many topic configurations in one session; this one is not carried");
            return;
        }
        debug!(topic = %config.topic, entries = ?kept, "topic configuration");
        partitions.carried.insert(config.topic, kept);
    }

    /// The time by which a record must be in the hub producer's hands. The agent moves to
    /// another relay no sooner than its fence delay after its last batch or heartbeat to this
    /// one, and a record handed over lands (or fails) within `hub.delivery_timeout`: handing
    /// one over later could let it land while another relay resumes the site.
    fn handover_deadline(&self) -> tokio::time::Instant {
        self.lock_partitions().last_heard_at + self.session.context.handover_window
    }

    /// Waits for `wait` (the hub taking earlier records), but never past the hand-over
    /// deadline, which moves on while the agent keeps sending.
    async fn before_deadline<F: std::future::Future>(
        &self,
        wait: F,
    ) -> Result<F::Output, SessionError> {
        tokio::pin!(wait);
        loop {
            let deadline = self.handover_deadline();
            if let Ok(done) = tokio::time::timeout_at(deadline, &mut wait).await {
                return Ok(done);
            }
            if self.handover_deadline() <= deadline {
                return Err(SessionError::HandoverLate {
                    window: self.session.context.handover_window,
                });
            }
        }
    }

    /// The partition count of `target`, the hub topic of source `topic`, for this session:
    /// resolved (and created if missing) at its first batch unless the Hello's resume scans
    /// already did. A created topic takes the configuration the agent carried for `topic`,
    /// overridden by `[hub.topic_config]`.
    async fn layout(
        &self,
        topic: &str,
        target: &str,
        source_partitions: i32,
    ) -> Result<i32, SessionError> {
        let lock = || self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&count) = lock().layouts.get(target) {
            return Ok(count);
        }
        let context = self.session.context;
        let configs = if target == context.rejects.dead_letter_topic {
            Vec::new()
        } else {
            let carried = lock().carried.get(topic).cloned().unwrap_or_default();
            hub_topic_config(carried, &context.topic_config)
        };
        let count = context
            .hub
            .resolve_topic(target, source_partitions, &configs)
            .await?;
        // Another stream may have resolved it meanwhile: the first answer holds.
        Ok(*lock().layouts.entry(target.to_owned()).or_insert(count))
    }

    /// What `target` takes, asked once per session: records up to the least of
    /// `hub.max_record_bytes`, the topic's `max.message.bytes` and what the producer takes;
    /// timestamps as the topic's configuration says.
    async fn topic_limits(&self, target: &str) -> HubTopicLimits {
        let context = self.session.context;
        let lock = || self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&limits) = lock().topic_limits.get(target) {
            return limits;
        }
        let described = context.hub.topic_limits(target).await;
        // A `hub.max_record_bytes` above what the topic takes would be a stall, not a choice.
        let record_bytes = [
            context.rejects.max_record_bytes,
            described.max_message_bytes,
        ]
        .into_iter()
        .flatten()
        .fold(crate::config::MAX_RECORD_BYTES, usize::min);
        let limits = HubTopicLimits {
            record_bytes,
            timestamps: described.timestamps,
        };
        *lock()
            .topic_limits
            .entry(target.to_owned())
            .or_insert(limits)
    }

    /// The site's ACL's verdict on `batch`: a `Nack` where it may not write the topic.
    fn not_allowed(&self, batch: &Batch) -> Option<Nack> {
        let SiteSession { site, context, .. } = self.session;
        let allowed = context
            .acl
            .borrow()
            .site(site)
            .is_some_and(|patterns| Acl::allows(patterns, &batch.topic));
        if allowed {
            return None;
        }
        context.fleet.rejected(crate::fleet::reject::NOT_ALLOWED);
        warn!(topic = %batch.topic, "batch for a topic this site may not write");
        Some(Nack {
            seq: batch.seq,
            code: NackCode::NotAllowed,
            message: format!("site {} may not write topic {}", site, batch.topic),
        })
    }

    /// Checks what the peer declares about `batch` and names its hub topic; the reason the
    /// hub refuses the topic as a whole, if it does.
    fn hub_target(&self, batch: &Batch) -> Result<(String, Option<&'static str>), SessionError> {
        let SiteSession { site, context, .. } = self.session;
        let bad_batch = |reason: String| bad_batch(batch, reason);
        // A count of 0 means the agent does not know it (yet); see `Hub::ensure_topic`.
        if batch.partition < 0
            || batch.partition_count < 0
            || (batch.partition_count > 0 && batch.partition >= batch.partition_count)
        {
            return Err(bad_batch(format!(
                "partition outside the declared count {}",
                batch.partition_count
            )));
        }
        let max_partitions = context.limits.max_partitions_per_topic;
        if batch.partition_count.unsigned_abs() > max_partitions {
            // The count sizes a hub topic the relay may create: it must not be the peer's
            // choice without bound.
            return Err(bad_batch(format!(
                "partition count {} above limits.max_partitions_per_topic {max_partitions}",
                batch.partition_count
            )));
        }
        if batch.next_offset <= batch.last_offset {
            return Err(bad_batch("next offset not past the last record".into()));
        }
        let target = hub_topic(&context.topic_template, site, &batch.topic);
        // The template and the site name are valid by configuration, and an edge broker
        // allows no other characters: only a peer's error can put them in the name. But a
        // long edge topic name under the template is the hub refusing the topic.
        let topic_refused = match crate::hub_limits::check_topic_name(&target) {
            Ok(()) => None,
            Err(crate::hub_limits::TopicNameError::TooLong) => {
                Some(dead_letter::reason::HUB_TOPIC_INVALID)
            }
            Err(error) => return Err(bad_batch(format!("hub topic name {target:?}: {error}"))),
        };
        Ok((target, topic_refused))
    }

    /// Where `key`'s records of this batch start (records below it are in the hub), and for
    /// a partition the Hello did not name, the checkpoint that held before its first batch.
    async fn resume_from(
        &self,
        batch: &Batch,
        target: &str,
        topic_refused: Option<&'static str>,
    ) -> Result<(i64, Option<Checkpoint>), SessionError> {
        let context = self.session.context;
        let key = (batch.topic.clone(), batch.partition);
        let resume_from = {
            let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
            let stream = *partitions.stream.entry(key.clone()).or_insert(self.stream);
            if stream != self.stream {
                // Two readers would hand its records to the producer in no sure order.
                return Err(bad_batch(
                    batch,
                    format!("partition already sent on stream {stream} of this connection"),
                ));
            }
            partitions.resume.get(&key).copied()
        };
        // A partition the Hello did not name had nothing unacknowledged: all its earlier
        // records are in the hub, below the partitions' current ends.
        let base = match (resume_from, context.delivery) {
            (None, Delivery::ExactlyOnce) if topic_refused.is_none() => Some(Checkpoint {
                hub_topic: target.to_owned(),
                next_offset: 0,
                scan_from: context.hub.partition_ends(target).await?,
            }),
            _ => None,
        };
        Ok((resume_from.unwrap_or(0), base))
    }

    /// With transactions: waits for the previous batch's commit and opens this batch's.
    async fn open_transaction(&self) -> Result<Option<OwnedMutexGuard<()>>, SessionError> {
        let Some(lock) = &self.transaction else {
            return Ok(None);
        };
        let open = self.before_deadline(lock.clone().lock_owned()).await?;
        self.session
            .producer
            .begin_transaction()
            .map_err(SessionError::Transaction)?;
        Ok(Some(open))
    }

    async fn handle_batch(&mut self, batch: Batch) -> Result<Outcome, SessionError> {
        if let Some(nack) = self.not_allowed(&batch) {
            return Ok(Outcome::Refused(nack));
        }
        let SiteSession { site, context, .. } = self.session;
        let (target, topic_refused) = self.hub_target(&batch)?;
        let records = batch
            .records_with(&context.batch_limits, &self.dictionaries)
            .map_err(|e| bad_batch(&batch, e.to_string()))?;
        if batch.codec.dictionary_id().is_some() {
            context.fleet.dictionary_batch();
        }
        let hub_partition = match topic_refused {
            Some(_) => -1,
            None => {
                let hub_partitions = self
                    .layout(&batch.topic, &target, batch.partition_count)
                    .await?;
                crate::hub::hub_partition(batch.partition, hub_partitions)
            }
        };
        let key = (batch.topic.clone(), batch.partition);
        let (resume_from, base) = self.resume_from(&batch, &target, topic_refused).await?;
        // Outside the transaction lock: with transactions the previous batch was committed,
        // so its records landed, before the lock is free.
        self.before_deadline(self.gates.wait(&key)).await?;
        let transaction = self.open_transaction().await?;
        let partition_text = batch.partition.to_string();
        let mut deliveries = Vec::with_capacity(records.len());
        let mut grouping = handoff::Grouping::default();
        let mut last: Option<DeliveryFuture> = None;
        // The provenance headers' bytes but the offset's, which differ per record.
        let provenance = HEADER_ORIGIN.len()
            + site.len()
            + HEADER_PARTITION.len()
            + partition_text.len()
            + HEADER_OFFSET.len();
        let limits = match topic_refused {
            Some(_) => HubTopicLimits {
                record_bytes: crate::config::MAX_RECORD_BYTES,
                timestamps: TimestampWindow::ANY,
            },
            None => self.topic_limits(&target).await,
        };
        let now_ms = unix_millis();
        let mut refused = dead_letter::Runs::default();
        let mut dead_letters = Vec::new();
        let mut refusal_reason = None;
        for record in records.iter().filter(|r| r.offset >= resume_from) {
            let offset_text = record.offset.to_string();
            let record_bytes = handoff::record_bytes(record, provenance + offset_text.len());
            let reason = topic_refused.or(hub_refuses(
                record,
                record_bytes,
                &limits,
                now_ms,
                context.rejects.in_flight,
            ));
            if let Some(reason) = reason {
                let refusal = dead_letter::Refusal {
                    site,
                    topic: &batch.topic,
                    partition: batch.partition,
                    hub_topic: &target,
                    reason,
                };
                dead_letters.push(
                    self.dead_letter(record, &refusal, limits.record_bytes)
                        .await?,
                );
                refused.refused(record.offset);
                refusal_reason = Some(reason);
                continue;
            }
            refused.accepted();
            if grouping.starts_group(record_bytes) {
                if let Some(last) = last.take() {
                    deliveries.push(self.gates.close(key.clone(), last));
                }
                self.before_deadline(self.gates.wait(&key)).await?;
            }
            let headers = with_provenance(record, site, &partition_text, &offset_text);
            let hub_record = hub_record(&target, hub_partition, record, headers);
            let delivery = enqueue(
                self.session.producer,
                hub_record,
                || self.handover_deadline(),
                context.handover_window,
            )
            .await?;
            if let Some(previous) = last.replace(delivery) {
                deliveries.push(Pending::Record(previous));
            }
        }
        if let Some(last) = last {
            deliveries.push(self.gates.close(key.clone(), last));
        }
        self.partitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resume
            .insert(key, batch.next_offset);
        let rejected = refusal_reason.map(|reason| {
            Box::new(Rejected {
                seq: batch.seq,
                topic: batch.topic.clone(),
                partition: batch.partition,
                reason: reason.to_owned(),
                ranges: refused.into_ranges(),
            })
        });
        Ok(Outcome::Produced {
            seq: batch.seq,
            topic: batch.topic,
            partition: batch.partition,
            next_offset: batch.next_offset,
            deliveries,
            rejected,
            dead_letters,
            base,
            transaction,
        })
    }

    /// Hands `record`'s dead-letter copy to the producer, or ends the session where
    /// `hub.on_rejected = "stop"`.
    async fn dead_letter(
        &self,
        record: &Record,
        refusal: &dead_letter::Refusal<'_>,
        record_limit: usize,
    ) -> Result<DeliveryFuture, SessionError> {
        let context = self.session.context;
        let rejects = &context.rejects;
        if rejects.policy == OnRejected::Stop {
            return Err(SessionError::Refused {
                topic: refusal.topic.to_owned(),
                partition: refusal.partition,
                offset: record.offset,
                reason: refusal.reason,
            });
        }
        // Created at the first refusal, like any hub topic; one partition holds the few.
        self.layout("", &rejects.dead_letter_topic, 1).await?;
        // The dead-letter topic may take less than the hub topic did.
        let limits = self.topic_limits(&rejects.dead_letter_topic).await;
        let limit = record_limit.min(limits.record_bytes);
        // A timestamp the dead-letter topic would refuse too goes into a header, and the
        // producer stamps the copy.
        let keep_timestamp = record.timestamp.filter(|&t| {
            !limits
                .timestamps
                .refuses(t, unix_millis(), context.rejects.in_flight)
        });
        let copy = dead_letter::copy(record, refusal, limit, keep_timestamp.is_none());
        let mut headers = OwnedHeaders::new_with_capacity(copy.headers.len());
        for (key, value) in &copy.headers {
            headers = headers.insert(KafkaHeader {
                key,
                value: value.as_deref(),
            });
        }
        let mut dead: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&rejects.dead_letter_topic).headers(headers);
        if let Some(key) = &copy.key {
            dead = dead.key(key.as_ref());
        }
        if let Some(value) = &copy.value {
            dead = dead.payload(value.as_ref());
        }
        if let Some(timestamp) = keep_timestamp {
            dead = dead.timestamp(timestamp);
        }
        enqueue(
            self.session.producer,
            dead,
            || self.handover_deadline(),
            context.handover_window,
        )
        .await
    }
}

/// The batch's declared facts do not hold: the peer's error, which ends the session.
fn bad_batch(batch: &Batch, reason: String) -> SessionError {
    SessionError::BadBatch {
        seq: batch.seq,
        topic: batch.topic.clone(),
        partition: batch.partition,
        reason,
    }
}

/// Why the hub would refuse `record` (of `record_bytes` with its provenance) under `limits`,
/// if it would; `in_flight` is how long a judged record may take to land.
fn hub_refuses(
    record: &Record,
    record_bytes: usize,
    limits: &HubTopicLimits,
    now_ms: i64,
    in_flight: Duration,
) -> Option<&'static str> {
    if record_bytes > limits.record_bytes {
        return Some(dead_letter::reason::TOO_LARGE);
    }
    record
        .timestamp
        .filter(|&t| limits.timestamps.refuses(t, now_ms, in_flight))
        .map(|_| dead_letter::reason::TIMESTAMP_INVALID)
}

/// The record's own headers, then the provenance the resume scan reads back.
fn with_provenance(record: &Record, site: &str, partition: &str, offset: &str) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 3);
    for header in &record.headers {
        headers = headers.insert(KafkaHeader {
            key: &header.key,
            value: header.value.as_deref(),
        });
    }
    headers
        .insert(KafkaHeader {
            key: HEADER_ORIGIN,
            value: Some(site.as_bytes()),
        })
        .insert(KafkaHeader {
            key: HEADER_PARTITION,
            value: Some(partition.as_bytes()),
        })
        .insert(KafkaHeader {
            key: HEADER_OFFSET,
            value: Some(offset.as_bytes()),
        })
}

/// `record` as the hub gets it: key, value and timestamp as they were, in `hub_partition`.
fn hub_record<'a>(
    target: &'a str,
    hub_partition: i32,
    record: &'a Record,
    headers: OwnedHeaders,
) -> FutureRecord<'a, [u8], [u8]> {
    let mut hub_record = FutureRecord::to(target)
        .headers(headers)
        .partition(hub_partition);
    if let Some(key) = &record.key {
        hub_record = hub_record.key(key.as_ref());
    }
    if let Some(value) = &record.value {
        hub_record = hub_record.payload(value.as_ref());
    }
    if let Some(timestamp) = record.timestamp {
        hub_record = hub_record.timestamp(timestamp);
    }
    hub_record
}

/// The relay's wall clock, as brokers judge timestamps by theirs.
fn unix_millis() -> i64 {
    i64::try_from(crate::fleet::now_ms()).unwrap_or(i64::MAX)
}

/// Hands one record to librdkafka, waiting while its local queue is full, but not past the
/// hand-over deadline (`Reader::handover_deadline`), asked again before every attempt.
async fn enqueue<'a>(
    producer: &FutureProducer,
    mut record: FutureRecord<'a, [u8], [u8]>,
    deadline: impl Fn() -> tokio::time::Instant,
    window: Duration,
) -> Result<DeliveryFuture, SessionError> {
    loop {
        if tokio::time::Instant::now() > deadline() {
            return Err(SessionError::HandoverLate { window });
        }
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((error, _)) => return Err(SessionError::Delivery(error)),
        }
    }
}

/// Awaits the hub's confirmations in arrival order and answers the agent. With transactions
/// it also commits each batch (data and checkpoint together) before acknowledging it.
async fn acknowledge(
    mut send: quinn::SendStream,
    mut confirmations: mpsc::Receiver<Outcome>,
    mut progress: CheckpointWriter<'_>,
    version: Negotiated,
) -> Result<(), SessionError> {
    // An agent that stops taking our frames (no flow-control credit) while keeping the
    // connection alive would otherwise hold this session, and all queued behind it, forever:
    // every write below is bounded by `stall`.
    let stall = progress.session.context.limits.read_timeout;
    while let Some(outcome) = confirmations.recv().await {
        let frame = match outcome {
            Outcome::Produced {
                seq,
                topic,
                partition,
                next_offset,
                deliveries,
                rejected,
                dead_letters,
                base,
                transaction,
            } => {
                if let Some(base) = base {
                    progress.track(&topic, partition, base);
                }
                if progress.session.transactional {
                    progress.advance(&topic, partition, next_offset, &[]);
                    progress.write((topic.clone(), partition));
                    commit(progress.session.producer).await?;
                    progress.committed();
                }
                let records = deliveries.len() as u64;
                let mut landed = Vec::with_capacity(deliveries.len());
                for delivery in deliveries {
                    landed.push(delivery.landed().await.map_err(SessionError::Delivery)?);
                }
                for delivery in dead_letters {
                    match delivery.await {
                        Ok(Ok(_)) => {}
                        Ok(Err((error, _))) => return Err(SessionError::Delivery(error)),
                        Err(_) => return Err(SessionError::Delivery(KafkaError::Canceled)),
                    }
                }
                let session = progress.session;
                session.context.fleet.records(session.site, records);
                progress.advance(&topic, partition, next_offset, &landed);
                if !session.transactional {
                    if rejected.is_some() {
                        // The resume scan reads the hub topic, not the dead-letter one: only
                        // a checkpoint past them keeps a reconnect from dead-lettering them
                        // again. (The failpoint loses this write, as a crash before its
                        // delivery would.)
                        if !spoke_process::failpoint::fails("session.rejects_checkpoint") {
                            progress.write((topic.clone(), partition));
                        }
                    } else {
                        progress.write_if_due((topic.clone(), partition));
                    }
                }
                // A reader may begin the next transaction.
                drop(transaction);
                if let Some(rejected) = rejected {
                    report_rejected(session, &rejected);
                    if version.rejected() {
                        write_frame_within(&mut send, Frame::Rejected(*rejected), stall).await?;
                        // The window between telling the agent and acknowledging the batch.
                        spoke_process::failpoint::reached("session.rejected_sent").await;
                    }
                }
                Frame::Ack(Ack { seq, next_offset })
            }
            Outcome::Refused(nack) => Frame::Nack(nack),
        };
        write_frame_within(&mut send, frame, stall).await?;
    }
    progress.finish().await;
    let goodbye = Goodbye {
        code: GoodbyeCode::Shutdown,
        reason: "all batches confirmed".into(),
    };
    write_frame_within(&mut send, Frame::Goodbye(goodbye), stall).await?;
    let _ = send.finish();
    Ok(())
}

/// Logs and counts records the hub refused; the agent learns of them from the `Rejected`
/// frame (protocol version 4) and counts them as lost.
fn report_rejected(session: SiteSession<'_>, rejected: &Rejected) {
    let records: u64 = rejected.ranges.iter().map(|r| u64::from(r.records)).sum();
    session
        .context
        .fleet
        .dead_lettered(&rejected.reason, records);
    let ranges: Vec<String> = rejected
        .ranges
        .iter()
        .map(|r| format!("{}..{}", r.first_offset, r.last_offset))
        .collect();
    warn!(
        topic = %rejected.topic,
        partition = rejected.partition,
        records,
        reason = %rejected.reason,
        offsets = %ranges.join(","),
        dead_letter_topic = %session.context.rejects.dead_letter_topic,
        "the hub refuses these records; they went to the dead-letter topic"
    );
}

/// Commits the open transaction. Any failure aborts it and ends the session: librdkafka
/// lacks KIP-890, so an unclear outcome is never retried or guessed at; the next session
/// starts a new producer (fencing this one) and computes its resume point afresh.
async fn commit(producer: &FutureProducer) -> Result<(), SessionError> {
    let committing = producer.clone();
    let result =
        tokio::task::spawn_blocking(move || committing.commit_transaction(TRANSACTION_TIMEOUT))
            .await
            .map_err(HubError::from)?;
    if let Err(error) = result {
        let aborting = producer.clone();
        let aborted =
            tokio::task::spawn_blocking(move || aborting.abort_transaction(TRANSACTION_TIMEOUT))
                .await;
        warn!(%error, aborted = matches!(aborted, Ok(Ok(()))), "hub transaction failed; aborting the session");
        return Err(SessionError::Transaction(error));
    }
    Ok(())
}

/// A session's checkpoints, raised as batches are confirmed. Without transactions they are
/// written when the session starts, at most once per `hub.checkpoint_interval` per source
/// partition, and when it ends well; with transactions, inside every batch's transaction.
struct CheckpointWriter<'a> {
    session: SiteSession<'a>,
    partitions: HashMap<(String, i32), Tracked>,
    /// Transactions only: checkpoints written in the open transaction. They join the relay's
    /// view of the offsets topic once it committed, never before: an aborted batch's
    /// checkpoint would otherwise make the next session on this relay skip that batch.
    uncommitted: Vec<(String, Checkpoint)>,
}

struct Tracked {
    checkpoint: Checkpoint,
    written_at: Option<tokio::time::Instant>,
    dirty: bool,
}

impl<'a> CheckpointWriter<'a> {
    fn new(session: SiteSession<'a>) -> Self {
        Self {
            session,
            partitions: HashMap::new(),
            uncommitted: Vec::new(),
        }
    }

    /// The open transaction committed: its checkpoints now hold.
    fn committed(&mut self) {
        for (key, checkpoint) in self.uncommitted.drain(..) {
            self.session.context.checkpoints.merge(key, checkpoint);
        }
    }

    fn enabled(&self) -> bool {
        self.session.context.delivery == Delivery::ExactlyOnce
    }

    /// Takes the checkpoint the resume scan established, and writes it at once when it can
    /// (a transactional producer writes only inside a batch's transaction).
    fn start(&mut self, topic: &str, partition: i32, checkpoint: Checkpoint) {
        self.track(topic, partition, checkpoint);
        if !self.session.transactional {
            self.write((topic.to_owned(), partition));
        }
    }

    fn track(&mut self, topic: &str, partition: i32, checkpoint: Checkpoint) {
        let tracked = Tracked {
            checkpoint,
            written_at: None,
            dirty: true,
        };
        self.partitions
            .insert((topic.to_owned(), partition), tracked);
    }

    /// Folds in a batch that brings the partition to `next_offset`, with the hub positions
    /// its records `landed` at (none yet, for a transaction about to commit).
    fn advance(&mut self, topic: &str, partition: i32, next_offset: i64, landed: &[(i32, i64)]) {
        if !self.enabled() {
            return;
        }
        let SiteSession { site, context, .. } = self.session;
        let tracked = self
            .partitions
            .entry((topic.to_owned(), partition))
            .or_insert_with(|| Tracked {
                // Not reached: every partition is tracked from its resume scan or its first
                // batch. Should it happen, an empty floor is still a valid checkpoint.
                checkpoint: Checkpoint {
                    hub_topic: hub_topic(&context.topic_template, site, topic),
                    next_offset: 0,
                    scan_from: std::collections::BTreeMap::new(),
                },
                written_at: None,
                dirty: false,
            });
        tracked.checkpoint.next_offset = tracked.checkpoint.next_offset.max(next_offset);
        for &(hub_partition, hub_offset) in landed {
            tracked.checkpoint.confirmed(hub_partition, hub_offset);
        }
        tracked.dirty = true;
    }

    fn write_if_due(&mut self, key: (String, i32)) {
        let interval = self.session.context.checkpoints.interval;
        let due = self
            .partitions
            .get(&key)
            .is_some_and(|t| t.written_at.is_none_or(|at| at.elapsed() >= interval));
        if due {
            self.write(key);
        }
    }

    /// Hands one checkpoint to the producer. Without transactions this is best effort: a
    /// checkpoint that does not make it only makes the next resume scan longer. With them,
    /// a failed write fails the commit.
    fn write(&mut self, key: (String, i32)) -> Option<DeliveryFuture> {
        if !self.enabled() {
            return None;
        }
        let SiteSession {
            site,
            context,
            producer,
            ..
        } = self.session;
        let tracked = self.partitions.get_mut(&key)?;
        let record_key = checkpoint::key(site, &key.0, key.1);
        let value = checkpoint::encode(&tracked.checkpoint);
        let record = FutureRecord::to(&context.checkpoints.topic)
            .key(record_key.as_bytes())
            .payload(&value);
        match producer.send_result(record) {
            Ok(delivery) => {
                tracked.dirty = false;
                tracked.written_at = Some(tokio::time::Instant::now());
                context.checkpoints.counted_write();
                if self.session.transactional {
                    self.uncommitted
                        .push((record_key, tracked.checkpoint.clone()));
                } else {
                    // Without transactions a checkpoint describes records the hub confirmed:
                    // it holds whether or not its own write makes it.
                    context
                        .checkpoints
                        .merge(record_key, tracked.checkpoint.clone());
                }
                Some(delivery)
            }
            Err((error, _)) => {
                debug!(%error, "checkpoint not written");
                None
            }
        }
    }

    /// Writes what is not written yet and waits for it: the session's producer is purged
    /// right after the session ends. Everything this session sent is confirmed by now, so
    /// every record of its partitions lies below the hub partitions' current ends: the floors
    /// rise to them, and a quiet partition in a busy hub topic resumes without a long scan.
    async fn finish(&mut self) {
        if !self.enabled() {
            return;
        }
        let hub = &self.session.context.hub;
        let mut ends = HashMap::new();
        for tracked in self.partitions.values_mut() {
            let topic = &tracked.checkpoint.hub_topic;
            if !ends.contains_key(topic) {
                // Bounded: the agent waits for this session's Goodbye only so long, and the
                // checkpoints are still worth writing with their floors as they are.
                match tokio::time::timeout(FLOORS_WAIT, hub.partition_ends(topic)).await {
                    Ok(Ok(found)) => {
                        ends.insert(topic.clone(), found);
                    }
                    Ok(Err(error)) => debug!(%error, "cannot raise checkpoint floors"),
                    Err(_) => debug!(topic, "hub too slow to raise checkpoint floors"),
                }
            }
            for (&partition, &end) in ends.get(topic).into_iter().flatten() {
                let floor = tracked.checkpoint.scan_from.entry(partition).or_insert(0);
                if *floor < end {
                    *floor = end;
                    tracked.dirty = true;
                }
            }
        }
        let dirty: Vec<(String, i32)> = self
            .partitions
            .iter()
            .filter(|(_, tracked)| tracked.dirty)
            .map(|(key, _)| key.clone())
            .collect();
        if dirty.is_empty() {
            return;
        }
        let transactional = self.session.transactional;
        if transactional {
            if let Err(error) = self.session.producer.begin_transaction() {
                debug!(%error, "final checkpoints not written");
                return;
            }
        }
        let pending: Vec<DeliveryFuture> = dirty
            .into_iter()
            .filter_map(|key| self.write(key))
            .collect();
        if transactional {
            match commit(self.session.producer).await {
                Ok(()) => self.committed(),
                Err(error) => debug!(%error, "final checkpoints not committed"),
            }
        }
        for delivery in pending {
            if !matches!(delivery.await, Ok(Ok(_))) {
                debug!("final checkpoint not confirmed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spoke_proto::{MAX_PROTOCOL_VERSION, PROTOCOL_VERSION};

    #[test]
    fn site_connections_are_capped_per_site_and_freed_on_drop() {
        let connections = SiteConnections::default();
        let first = connections.take("branch-1", 2).expect("first");
        let second = connections.take("branch-1", 2).expect("second");
        let refused = connections.take("branch-1", 2).expect_err("third");
        assert!(matches!(
            refused,
            SessionError::TooManySiteConnections { max: 2 }
        ));
        assert_eq!(
            refused.reject_reason(),
            Some(crate::fleet::reject::TOO_MANY_SITE_CONNECTIONS)
        );
        let _other_site = connections.take("branch-2", 2).expect("another site");
        drop(first);
        let again = connections.take("branch-1", 2).expect("a slot was freed");
        drop(second);
        drop(again);
        let sites = connections.sites.lock().expect("lock");
        assert_eq!(sites.get("branch-1"), None, "empty entries are removed");
        assert_eq!(sites.get("branch-2"), Some(&1));
    }

    #[test]
    fn a_hello_without_a_common_version_is_refused_as_a_protocol_error() {
        // Which version is chosen, and what it enables: spoke_proto::version.
        let with = |min, max| Hello {
            min_version: min,
            max_version: max,
            ..hello("s", 0)
        };
        check_hello(&with(1, 2), "s", 1).expect("overlap");
        check_hello(&with(2, 200), "s", 1).expect("overlap");
        for (min, max) in [(MAX_PROTOCOL_VERSION + 1, 200), (0, 0), (2, 1)] {
            let error = check_hello(&with(min, max), "s", 1).expect_err("no overlap");
            assert!(matches!(error, SessionError::Version(_)), "{error}");
            assert_eq!(error.reject_reason(), Some(crate::fleet::reject::PROTOCOL));
        }
        let above = SessionError::AboveVersion {
            frame: "Dictionary",
            frame_version: 2,
            version: 1,
        };
        assert_eq!(above.reject_reason(), Some(crate::fleet::reject::PROTOCOL));
        assert_eq!(above.close_code(), close_code::PROTOCOL_ERROR);
    }

    fn hello(site: &str, partitions: usize) -> Hello {
        Hello {
            site: site.to_owned(),
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            software: "test".into(),
            partitions: (0..partitions)
                .map(|p| spoke_proto::TopicPartition {
                    topic: "orders".into(),
                    partition: i32::try_from(p).unwrap_or(i32::MAX),
                })
                .collect(),
        }
    }

    #[test]
    fn hello_is_checked_for_site_and_partition_count_before_any_hub_work() {
        assert!(check_hello(&hello("branch-1", 3), "branch-1", 3).is_ok());
        let error = check_hello(&hello("branch-1", 4), "branch-1", 3).expect_err("4 > 3");
        assert!(matches!(
            error,
            SessionError::TooManyPartitions { count: 4, max: 3 }
        ));
        assert_eq!(error.reject_reason(), Some(crate::fleet::reject::PROTOCOL));
        assert_eq!(error.close_code(), close_code::PROTOCOL_ERROR);
        let error = check_hello(&hello("branch-2", 1), "branch-1", 3).expect_err("mismatch");
        assert_eq!(
            error.reject_reason(),
            Some(crate::fleet::reject::SITE_MISMATCH)
        );
        assert_eq!(error.close_code(), close_code::NOT_AUTHORIZED);
    }

    #[tokio::test]
    async fn a_session_ends_when_a_reload_denies_its_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let day = Duration::from_secs(86400);
        crate::pki::init(dir.path(), &["localhost".into()], day).expect("init");
        let issued = crate::pki::issue(dir.path(), dir.path(), "branch-1", day).expect("issue");
        let pem = std::fs::read(dir.path().join("branch-1.pem")).expect("pem");
        let leaf = {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::CertificateDer::from_pem_slice(&pem).expect("der")
        };
        let (deny, watch) = tokio::sync::watch::channel(DenyList::default());
        let mut ended = tokio::spawn(denied(Some(leaf), watch));
        let unrelated = DenyList::parse(&["serial:01".to_owned()]).expect("parse");
        deny.send_replace(unrelated);
        tokio::time::timeout(Duration::from_millis(200), &mut ended)
            .await
            .expect_err("an unrelated deny entry leaves the session alone");
        deny.send_replace(DenyList::parse(&[issued.serial]).expect("parse"));
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("the session's certificate was denied")
            .expect("task");
    }

    #[test]
    fn timeouts_and_truncation_are_counted_as_the_peer_s_fault() {
        use crate::fleet::reject;
        let stalled = SessionError::Wire(WireError::Stalled(Duration::from_secs(1)));
        assert_eq!(stalled.reject_reason(), Some(reject::TIMEOUT));
        let no_hello = SessionError::HelloTimeout(Duration::from_secs(1));
        assert_eq!(no_hello.reject_reason(), Some(reject::TIMEOUT));
        let truncated =
            SessionError::Wire(WireError::Read(quinn::ReadExactError::FinishedEarly(3)));
        assert_eq!(truncated.reject_reason(), Some(reject::PROTOCOL));
        assert_eq!(SessionError::Denied.reject_reason(), Some(reject::DENIED));
        assert_eq!(
            SessionError::Denied.close_code(),
            close_code::NOT_AUTHORIZED
        );
        assert_eq!(SessionError::Superseded.reject_reason(), None);
    }
}
