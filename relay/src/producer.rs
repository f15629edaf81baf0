//! The hub producers sessions hand records to: a few shared by every site the relay serves,
//! so that threads and hub connections do not grow with the fleet, or a site's own where
//! Kafka transactions fence it (a transactional id belongs to one producer).
//!
//! librdkafka purges and flushes a whole producer, never one site's share of it. So each
//! record a session hands over carries its session's [`SessionLoad`] through librdkafka
//! (the delivery opaque) and leaves it when librdkafka lets go of the record, landed, failed
//! or purged, whether or not the session still listens. A session that ends waits on that
//! count before the site's next session may read the hub, as it once waited for its own
//! producer's flush.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientConfig;

/// Where a record landed in the hub (partition, offset), or why it did not.
pub type Landing = Result<(i32, i64), KafkaError>;

/// A record for a hub producer; sessions build it, the producer attaches the bookkeeping.
pub type HubRecord<'a> = BaseRecord<'a, [u8], [u8], ()>;

/// librdkafka's producer with the delivery bookkeeping of [`Handed`].
pub type RawProducer = ThreadedProducer<HubContext>;

/// Resolves each record's [`InFlight`], lets go of its session's load, and remembers that a
/// record failed.
#[derive(Debug, Default)]
pub struct HubContext {
    /// A record of this producer finally failed. The idempotent producer then bumps its
    /// epoch and carries on (KIP-360), which Kafka accepts; but a shared producer is retired
    /// instead, as a site's own producer always was with its session: nothing more is handed
    /// to it, its sessions end and their next ones get a fresh producer. (The test broker,
    /// tansu 0.6, even loses its storage to a produce at a bumped epoch.)
    failed: AtomicBool,
}

impl HubContext {
    /// Whether a record of this producer finally failed.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

impl ClientContext for HubContext {}

impl ProducerContext for HubContext {
    type DeliveryOpaque = Box<Handed>;

    fn delivery(&self, result: &DeliveryResult<'_>, mut handed: Box<Handed>) {
        let landing = match result {
            Ok(message) => Ok((message.partition(), message.offset())),
            Err((error, _)) => {
                self.failed.store(true, Ordering::Release);
                Err(error.clone())
            }
        };
        // A session that ended no longer listens; its load is released all the same, when
        // `handed` drops.
        if let Some(landed) = handed.landed.take() {
            let _ = landed.send(landing);
        }
    }
}

/// A record in librdkafka's hands: whom to tell where it landed, and whose load it is.
#[derive(Debug)]
pub struct Handed {
    landed: Option<tokio::sync::oneshot::Sender<Landing>>,
    load: Arc<SessionLoad>,
    bytes: usize,
}

impl Drop for Handed {
    fn drop(&mut self) {
        // Dropped by the delivery callback, by a failed `send` handing the record back, or
        // by librdkafka destroying a producer with the record still queued: every way a
        // record leaves librdkafka.
        self.load.release(self.bytes);
    }
}

/// Where one handed-over record landed, once the hub answered (or librdkafka gave up).
#[derive(Debug)]
pub struct InFlight(tokio::sync::oneshot::Receiver<Landing>);

impl InFlight {
    /// A delivery resolved by hand, for tests of what awaits one.
    #[cfg(test)]
    pub fn pending() -> (tokio::sync::oneshot::Sender<Landing>, InFlight) {
        let (landed, delivery) = tokio::sync::oneshot::channel();
        (landed, InFlight(delivery))
    }
}

impl Future for InFlight {
    type Output = Landing;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Landing> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(KafkaError::Canceled)))
    }
}

/// One session's records in a producer's hands: how many, how many bytes, and a wake-up
/// when the last one left.
#[derive(Debug, Default)]
pub struct SessionLoad {
    records: AtomicUsize,
    bytes: AtomicUsize,
    settled: tokio::sync::Notify,
}

impl SessionLoad {
    fn take(&self, bytes: usize) {
        self.records.fetch_add(1, Ordering::AcqRel);
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    fn release(&self, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        if self.records.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.settled.notify_waiters();
        }
    }

    /// Bytes of this session's records the producer holds now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// Records of this session the producer holds now.
    pub fn records(&self) -> usize {
        self.records.load(Ordering::Acquire)
    }

    /// Returns once the producer holds none of this session's records.
    pub async fn settled(&self) {
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            // Registered before the check, so a release in between is not missed.
            settled.as_mut().enable();
            if self.records() == 0 {
                return;
            }
            settled.await;
        }
    }
}

/// The producer one session hands its records to, and that session's load on it.
#[derive(Clone)]
pub struct SessionProducer {
    producer: RawProducer,
    load: Arc<SessionLoad>,
    /// The site's own (transactional) producer, not shared with other sessions.
    own: bool,
}

impl std::fmt::Debug for SessionProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionProducer")
            .field("own", &self.own)
            .field("records", &self.load.records())
            .finish_non_exhaustive()
    }
}

impl SessionProducer {
    /// A site's own producer (transactional).
    pub fn own(producer: RawProducer) -> Self {
        SessionProducer {
            producer,
            load: Arc::default(),
            own: true,
        }
    }

    /// Hands `record` over; librdkafka's queue being full gives the record back.
    #[allow(clippy::result_large_err)] // the record comes back for the retry, as in rdkafka
    pub fn send<'a>(&self, record: HubRecord<'a>) -> Result<InFlight, (KafkaError, HubRecord<'a>)> {
        if !self.own && self.producer.client().context().failed() {
            // Retired (see `HubContext::failed`): the session ends, and its next one gets a
            // fresh producer.
            return Err((
                KafkaError::MessageProduction(RDKafkaErrorCode::Fatal),
                record,
            ));
        }
        let bytes = record.payload.map_or(0, <[u8]>::len) + record.key.map_or(0, <[u8]>::len);
        let (landed, delivery) = tokio::sync::oneshot::channel();
        self.load.take(bytes);
        let handed = Box::new(Handed {
            landed: Some(landed),
            load: self.load.clone(),
            bytes,
        });
        let (record, ()) = with_opaque(record, handed);
        match self.producer.send(record) {
            Ok(()) => Ok(InFlight(delivery)),
            Err((error, returned)) => {
                // Dropping the bookkeeping releases the load taken above.
                let (record, _handed) = with_opaque(returned, ());
                Err((error, record))
            }
        }
    }

    /// The producer, for its transactions.
    pub fn transactions(&self) -> &RawProducer {
        &self.producer
    }

    /// This session's records in the producer's hands.
    pub fn load(&self) -> &Arc<SessionLoad> {
        &self.load
    }

    /// Whether the producer is the site's own rather than shared.
    pub fn is_own(&self) -> bool {
        self.own
    }
}

/// `record` carrying `opaque` instead of its own, which is returned: rdkafka fixes a
/// record's opaque type, and the bookkeeping is attached and taken off at the producer.
fn with_opaque<'a, A, B>(
    record: BaseRecord<'a, [u8], [u8], A>,
    opaque: B,
) -> (BaseRecord<'a, [u8], [u8], B>, A)
where
    A: rdkafka::util::IntoOpaque,
    B: rdkafka::util::IntoOpaque,
{
    let BaseRecord {
        topic,
        partition,
        payload,
        key,
        timestamp,
        headers,
        delivery_opaque,
    } = record;
    let record = BaseRecord {
        topic,
        partition,
        payload,
        key,
        timestamp,
        headers,
        delivery_opaque: opaque,
    };
    (record, delivery_opaque)
}

/// The shared producers: `hub.producers` of them, created when first needed, each site's
/// sessions on the one its name hashes to, and a producer that failed fatally replaced.
pub struct ProducerPool {
    config: ClientConfig,
    producers: Mutex<Vec<Option<RawProducer>>>,
}

impl std::fmt::Debug for ProducerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerPool").finish_non_exhaustive()
    }
}

impl ProducerPool {
    pub fn new(config: ClientConfig, size: usize) -> Self {
        ProducerPool {
            config,
            producers: Mutex::new(vec![None; size.max(1)]),
        }
    }

    /// The shared producer for a session of `site`. The same site always gets the same
    /// one (while it lives): a later session's checkpoints then queue behind an earlier
    /// one's in one producer and cannot overtake them.
    pub fn for_site(&self, site: &str) -> Result<SessionProducer, KafkaError> {
        let mut producers = self
            .producers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = slot_of(site, producers.len());
        let healthy = producers[slot]
            .as_ref()
            .filter(|producer| {
                producer.client().fatal_error().is_none() && !producer.client().context().failed()
            })
            .cloned();
        let producer = match healthy {
            Some(producer) => producer,
            None => {
                if let Some(failed) = producers[slot].as_ref() {
                    // A record of it finally failed (see `HubContext::failed`); every session
                    // on it has ended or is ending.
                    tracing::warn!(
                        slot,
                        fatal = ?failed.client().fatal_error(),
                        "a record of a shared hub producer failed: replacing the producer"
                    );
                }
                let mut config = self.config.clone();
                if config.get("client.id").is_none() {
                    config.set("client.id", format!("spoke-relay-producer-{slot}"));
                }
                let producer: RawProducer = config.create_with_context(HubContext::default())?;
                producers[slot] = Some(producer.clone());
                producer
            }
        };
        Ok(SessionProducer {
            producer,
            load: Arc::default(),
            own: false,
        })
    }

    /// The shared producers alive now.
    pub fn live(&self) -> Vec<RawProducer> {
        self.producers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .flatten()
            .cloned()
            .collect()
    }
}

/// Which of `slots` shared producers serves `site`: stable across runs and relays (FNV-1a),
/// so that logs of two relays agree.
fn slot_of(site: &str, slots: usize) -> usize {
    let hash = site.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    usize::try_from(hash % slots.max(1) as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sites_spread_over_the_shared_producers_and_each_keeps_its_own() {
        let mut counts = [0usize; 4];
        for site in 0..1_000 {
            counts[slot_of(&format!("store-{site:04}"), 4)] += 1;
        }
        assert!(counts.iter().all(|&n| n > 150), "{counts:?}");
        assert_eq!(slot_of("store-0042", 4), slot_of("store-0042", 4));
        assert_eq!(slot_of("anything", 1), 0);
        assert_eq!(slot_of("anything", 0), 0, "never a slot that cannot exist");
    }

    #[tokio::test]
    async fn a_session_settles_when_its_last_record_leaves_the_producer() {
        let load = Arc::new(SessionLoad::default());
        load.settled().await;
        let handed = |bytes| {
            load.take(bytes);
            Handed {
                landed: None,
                load: load.clone(),
                bytes,
            }
        };
        let first = handed(100);
        let second = handed(50);
        assert_eq!((load.records(), load.bytes()), (2, 150));
        drop(first);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), load.settled())
                .await
                .is_err(),
            "settled with a record still in the producer"
        );
        let waiting = tokio::spawn({
            let load = load.clone();
            async move { load.settled().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(second);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("settles once the last record left")
            .expect("task");
        assert_eq!((load.records(), load.bytes()), (0, 0));
    }

    #[tokio::test]
    async fn a_shared_producer_with_a_failed_record_is_retired() {
        // No broker: a record fails once `message.timeout.ms` passed.
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("message.timeout.ms", "1000")
            .set("log_level", "0");
        let pool = ProducerPool::new(config, 1);
        let first = pool.for_site("store-1").expect("producer");
        let record = || HubRecord::to("orders").payload(&b"r"[..]);
        let failed = first.send(record()).expect("queued");
        assert!(tokio::time::timeout(Duration::from_secs(20), failed)
            .await
            .expect("resolved")
            .is_err());
        assert!(
            first.send(record()).is_err(),
            "a record handed to a producer whose earlier record failed"
        );
        let next = pool.for_site("store-2").expect("producer");
        assert_ne!(
            next.transactions().client().native_ptr(),
            first.transactions().client().native_ptr(),
            "the pool still hands out the producer whose record failed"
        );
        next.send(record())
            .expect("the fresh producer takes records");
    }

    #[tokio::test]
    async fn a_delivery_nobody_answers_is_canceled() {
        let (landed, delivery) = InFlight::pending();
        drop(landed);
        assert!(matches!(delivery.await, Err(KafkaError::Canceled)));
    }
}
