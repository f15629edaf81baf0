//! One agent connection: authenticate the site, answer `Hello` with resume points, then turn
//! `Batch` frames into hub records and answer each with `Ack` once the hub confirmed all of it.
//!
//! A session reads each of the agent's streams (the control stream, and from protocol version
//! 3 its data streams) with its own reader, which decodes batches and hands them to the
//! producer in order; one acker awaits the hub's confirmations in the order the readers handed
//! batches over and writes `Ack`/`Nack` on the control stream. A bounded queue between them
//! limits how much unconfirmed data one site can hold in memory.
//!
//! - [`admit`]: who may hold a session (connections per site, one session per site at a time);
//! - [`hello`]: the Hello's answer, with the resume point of each partition it names;
//! - [`reader`]: one stream's frames, as the protocol's rules let them through;
//! - [`batch`]: one batch's records into the hub producer (or the dead-letter topic);
//! - [`acker`]: the hub's confirmations back to the agent, in order;
//! - [`checkpoints`]: the session's checkpoints in the offsets topic.
//!
//! The protocol's rules (the Hello's checks, frames per stream, dictionaries per stream, one
//! stream per partition) are `spoke_proto::connection::relay`'s; these modules do the I/O.

mod acker;
mod admit;
mod batch;
mod checkpoints;
mod hello;
mod reader;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;
use regex::Regex;
use spoke_proto::connection::relay::{HelloRules, InboundStream};
use spoke_proto::connection::{ProtocolError, CONTROL_STREAM};
use spoke_proto::{
    BatchLimits, DictionaryLimits, Frame, Goodbye, GoodbyeCode, Hello, Limits, Negotiated,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use crate::checkpoint::Checkpoints;
use crate::config::{Acl, Delivery, LimitsConfig, OnRejected};
use crate::deny::DenyList;
use crate::handoff::Gates;
use crate::hub::{Hub, HubError, TRANSACTION_TIMEOUT};
use crate::producer::SessionProducer;
use admit::Teardown;
pub use admit::{SessionTurns, SiteConnections};
use checkpoints::CheckpointWriter;
use reader::{Outcome, Partitions, StreamReader};
use spoke_transport::wire::{read_frame_within, write_frame_within, WireError};

/// Batches decoded and handed to the producer but not yet confirmed by the hub: as many as
/// an agent keeps in flight by default (`ship.window`), so a long link stays busy. Memory is
/// bounded by the session's share of its producer's queue (`batch::SESSION_SHARE_BYTES`), not
/// by this count.
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
    /// `None`: each hub topic's `max.message.bytes` ([`StreamReader::topic_limits`]).
    pub max_record_bytes: Option<usize>,
    /// How long after the relay judges a record's timestamp it may still reach the hub
    /// (`hub.fence_delay` bounds it), which narrows the timestamps it lets pass.
    pub in_flight: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("certificate: {0}")]
    Identity(#[from] crate::tls::IdentityError),
    #[error("site {0} is not configured on this relay")]
    UnknownSite(String),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
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
            Self::Protocol(ProtocolError::SiteMismatch { .. }) => Some(reject::SITE_MISMATCH),
            Self::TooManySiteConnections { .. } => Some(reject::TOO_MANY_SITE_CONNECTIONS),
            Self::Denied => Some(reject::DENIED),
            Self::HelloTimeout(_) | Self::Wire(WireError::Stalled(_)) => Some(reject::TIMEOUT),
            Self::Protocol(_)
            | Self::BadBatch { .. }
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
            | Self::Protocol(ProtocolError::SiteMismatch { .. })
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

/// One agent connection from its certificate to its end: the site admitted, its Hello
/// accepted, the previous session of the site over and its producer fenced, then
/// [`serve_site`] until the agent is done or a newer session of the site takes over.
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

    let (mut send, recv, hello) = receive_hello(connection, context).await?;
    let hello_at = Instant::now();
    let hello = HelloRules::first_frame(hello)?;
    let version = accept_hello(&hello, &site, context, &mut send).await?;

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
    let producer = context.hub.session_producer(&site, transactional)?;
    let _teardown = Teardown {
        producer: Some(producer.clone()),
        turn: Some(turn),
        teardowns: context.teardowns.clone(),
    };
    if transactional {
        fence_older_producers(&producer).await?;
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

/// The agent's first stream and its first frame. One deadline for both: a peer that trickles
/// the Hello in byte by byte gets no more time than one that sends nothing.
async fn receive_hello(
    connection: &quinn::Connection,
    context: &SessionContext,
) -> Result<(quinn::SendStream, quinn::RecvStream, Option<Frame>), SessionError> {
    let hello_timeout = context.limits.hello_timeout;
    tokio::time::timeout(hello_timeout, async {
        let (send, mut recv) = connection.accept_bi().await?;
        let hello = read_frame_within(&mut recv, &context.frame_limits, hello_timeout).await?;
        Ok::<_, SessionError>((send, recv, hello))
    })
    .await
    .map_err(|_| SessionError::HelloTimeout(hello_timeout))?
}

/// The Hello's checks for the certified `site`: the protocol version the Welcome chooses, or
/// the reason it is refused, which the agent is told in a Goodbye before the session ends.
async fn accept_hello(
    hello: &Hello,
    site: &str,
    context: &SessionContext,
    send: &mut quinn::SendStream,
) -> Result<Negotiated, SessionError> {
    let rules = HelloRules {
        certified_site: site,
        max_partitions: context.limits.max_partitions_per_hello,
    };
    match rules.check(hello).map_err(SessionError::from) {
        Ok(version) => Ok(version),
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
            let hello_timeout = context.limits.hello_timeout;
            let _ = write_frame_within(send, Frame::Goodbye(goodbye), hello_timeout).await;
            let _ = send.finish();
            Err(error)
        }
    }
}

/// Fences every older producer of this site, on any relay, and aborts its open transaction:
/// the resume scan then reads only committed data.
async fn fence_older_producers(producer: &SessionProducer) -> Result<(), SessionError> {
    let initialising = producer.transactions().clone();
    tokio::task::spawn_blocking(move || initialising.init_transactions(TRANSACTION_TIMEOUT))
        .await
        .map_err(HubError::from)?
        .map_err(SessionError::Transaction)
}

/// What a session's parts share once the site is known.
#[derive(Clone, Copy)]
pub(super) struct SiteSession<'a> {
    pub(super) site: &'a str,
    pub(super) context: &'a SessionContext,
    pub(super) producer: &'a SessionProducer,
    /// Data and checkpoint of each batch are committed in one Kafka transaction.
    pub(super) transactional: bool,
    /// When the Hello arrived: the agent ships nothing until its Welcome.
    pub(super) hello_at: Instant,
    /// The protocol version chosen for the Welcome: what either side may send.
    pub(super) version: Negotiated,
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
    let mut progress = CheckpointWriter::new(session);
    let (resume, layouts) =
        hello::welcome(session, allow, &hello, &mut send, &mut progress).await?;
    let version = session.version;
    let (queue, confirmations) = mpsc::channel(UNCONFIRMED_BATCHES);
    let acker = acker::acknowledge(send, confirmations, progress, version);
    let shared = Mutex::new(Partitions::new(resume, layouts));
    // With transactions one batch is open at a time, whichever stream it came on: its reader
    // holds this until the acker committed it.
    let transaction = session
        .transactional
        .then(|| Arc::new(tokio::sync::Mutex::new(())));
    let reader = |stream: InboundStream, queue: mpsc::Sender<Outcome>| StreamReader {
        session,
        stream,
        partitions: &shared,
        queue,
        transaction: transaction.clone(),
        gates: Gates::default(),
    };
    let limits = context.dictionary_limits;
    let mut readers = FuturesUnordered::new();
    readers.push(reader(InboundStream::control(version, limits), queue.clone()).run(recv));
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
                let stream = InboundStream::data(next_stream, version, limits)?;
                readers.push(reader(stream, sender).run(accepted?));
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
            assert!(
                matches!(error, SessionError::Protocol(ProtocolError::Version(_))),
                "{error}"
            );
            assert_eq!(error.reject_reason(), Some(crate::fleet::reject::PROTOCOL));
        }
        let above = SessionError::Protocol(ProtocolError::AboveVersion {
            frame: "Dictionary",
            frame_version: 2,
            version: 1,
        });
        assert_eq!(above.reject_reason(), Some(crate::fleet::reject::PROTOCOL));
        assert_eq!(above.close_code(), close_code::PROTOCOL_ERROR);
    }

    /// The relay's Hello check, as `accept_hello` applies it, with the error as the session
    /// reports it.
    fn check_hello(hello: &Hello, site: &str, max: u32) -> Result<Negotiated, SessionError> {
        let rules = HelloRules {
            certified_site: site,
            max_partitions: max,
        };
        Ok(rules.check(hello)?)
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
            SessionError::Protocol(ProtocolError::TooManyPartitions { count: 4, max: 3 })
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
