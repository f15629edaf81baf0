//! The hub Kafka cluster: producers for sessions, hub topic creation, and the resume scan that
//! finds how far a site's source partition already is in the hub.
//!
//! Everything the relay knows about progress is read back from the hub itself (the provenance
//! headers), so a relay has no local state and any relay can serve any site.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::config::{HubConfig, Transactions};
use crate::hub_limits::TopicLimits;
use crate::producer::{HubContext, ProducerPool, RawProducer, SessionProducer};
use spoke_kafka::security::KafkaProperties;
use spoke_kafka::topics::{self as kafka_topics, TopicDescription};

/// Header naming the site a hub record came from.
pub const HEADER_ORIGIN: &str = "spoke-origin";
/// Header with the record's source partition (decimal ASCII).
pub const HEADER_PARTITION: &str = "spoke-partition";
/// Header with the record's source offset (decimal ASCII).
pub const HEADER_OFFSET: &str = "spoke-offset";

pub(crate) const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// The transactional id and consumer group of the transaction probe: under the `spoke`
/// prefix that the relay's ACLs grant, and never of a site's form `spoke-<site>`.
pub const TRANSACTION_PROBE: &str = "spoke.transaction-probe";
/// The ACLs transactions need, as the fix where the hub refuses them.
pub const TRANSACTION_ACLS: &str = "grant the relay's principal Write and Describe on \
     transactional ids with prefix `spoke` and Read on consumer group `spoke.transaction-probe`";
/// Upper bound for init/commit/abort of a transaction, and the broker-side timeout after
/// which it aborts a transaction whose producer vanished.
pub const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const SCAN_POLL_TIMEOUT: Duration = Duration::from_secs(15);

/// What committing a probe transaction showed.
#[derive(Debug)]
pub enum TransactionSupport {
    Supported,
    /// The hub has no (usable) transactions.
    Unsupported(KafkaError),
    /// The hub's ACLs refuse this relay a transactional id or the probe's group.
    NotAuthorized(KafkaError),
}

/// What the hub says this relay may do ([`Hub::permissions`]).
#[derive(Debug)]
pub struct HubPermissions {
    pub topics: HashMap<String, TopicDescription>,
    pub cluster: Option<kafka_topics::Permissions>,
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("hub client setup: {0}")]
    Client(KafkaError),
    #[error("hub metadata for {topic}: {source}")]
    Metadata { topic: String, source: KafkaError },
    #[error("creating hub topic {topic}: {source}")]
    CreateTopic { topic: String, source: KafkaError },
    #[error(
        "hub topic {topic} is missing and the agent does not know the source's partition count yet"
    )]
    PartitionCountUnknown { topic: String },
    #[error("hub topic {topic} still has no partitions after creation")]
    TopicNotReady { topic: String },
    #[error("resume scan of {topic}/{partition}: {source}")]
    Scan {
        topic: String,
        partition: i32,
        source: KafkaError,
    },
    #[error("resume scan of {topic}/{partition} timed out before reaching offset {target}")]
    ScanTimeout {
        topic: String,
        partition: i32,
        target: i64,
    },
    #[error("blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("hub transactions: {0}")]
    Transaction(KafkaError),
}

/// Shared by all sessions of one relay.
pub struct Hub {
    bootstrap: String,
    /// `[hub.kafka]`, `[hub.tls]` and `[hub.sasl]`, for every hub client.
    properties: KafkaProperties,
    admin: AdminClient<DefaultClientContext>,
    /// Metadata and watermarks for every session, the health probe and topic checks: one
    /// connected client instead of a new one (its threads, connection and bootstrap round
    /// trips) per question, of which a Hello asks two per partition before its Welcome.
    /// Configured as a scan consumer, so its high watermarks are the read_committed ones the
    /// scans read up to.
    metadata: Arc<BaseConsumer>,
    /// Hub topic → partition count when a session last resolved it. Never used to place a
    /// record (each session resolves its topics afresh: an operator may delete a hub topic
    /// and create it anew with another count while the relay runs); only to notice and
    /// report that the layout changed.
    partitions: Mutex<HashMap<String, i32>>,
    /// Times a session found a hub topic's partition count other than the last one seen.
    layout_changes: Counter,
    transactions: Transactions,
    /// `hub.transactions = "auto"`, once the hub answered definitively.
    transactions_probed: tokio::sync::OnceCell<bool>,
    /// `hub.replication_factor` and `hub.min_insync_replicas` as configured.
    replication: Replication,
    /// `hub.delivery_timeout`: librdkafka's `message.timeout.ms` for session producers.
    delivery_timeout: Duration,
    /// The producers sessions without transactions share (`hub.producers`).
    shared: ProducerPool,
    /// Consumers for resume scans, reused.
    pub(crate) scans: Arc<crate::resume::ScanPool>,
}

/// How the relay creates hub topics: how many copies, and how many `acks=all` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replication {
    /// `None`: the hub's `default.replication.factor`.
    pub factor: Option<i32>,
    /// `None`: the hub's `min.insync.replicas`.
    pub min_insync: Option<i32>,
}

impl Replication {
    /// What a topic created now gets, on a hub of `brokers` brokers. Unset values follow the
    /// usual production rule where the hub can hold it: three copies, of which `acks=all`
    /// waits for two, so that a confirmed record survives the loss of any one broker. A
    /// smaller hub keeps its own defaults (a `min.insync.replicas` above its broker count
    /// would refuse every write).
    pub fn for_hub(configured: Replication, brokers: usize) -> Replication {
        let large = brokers >= 3;
        Replication {
            factor: configured.factor.or(large.then_some(3)),
            min_insync: configured
                .min_insync
                .or((large && configured.factor.is_none_or(|f| f >= 3)).then_some(2)),
        }
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("bootstrap", &self.bootstrap)
            .finish_non_exhaustive()
    }
}

impl Hub {
    pub fn new(config: &HubConfig, properties: &KafkaProperties) -> Result<Arc<Self>, HubError> {
        let shared = ProducerPool::new(
            producer_config(&config.bootstrap, properties, config.delivery_timeout),
            config.producers,
        );
        let hub = Hub {
            bootstrap: config.bootstrap.clone(),
            properties: properties.clone(),
            // The admin client needs the hub's security settings like any other: without
            // them DescribeConfigs and CreateTopics fail on a secured hub.
            admin: client_config(&config.bootstrap, properties)
                .set("client.id", "spoke-relay-admin")
                .create()
                .map_err(HubError::Client)?,
            metadata: Arc::new(scan_consumer(
                client_config(&config.bootstrap, properties),
                "spoke-relay-metadata",
            )?),
            partitions: Mutex::new(HashMap::new()),
            layout_changes: Counter::default(),
            transactions: config.transactions,
            transactions_probed: tokio::sync::OnceCell::new(),
            replication: Replication {
                factor: config.replication_factor,
                min_insync: config.min_insync_replicas,
            },
            delivery_timeout: config.delivery_timeout,
            shared,
            scans: crate::resume::ScanPool::new(),
        };
        Ok(Arc::new(hub))
    }

    pub(crate) fn client_config(&self) -> ClientConfig {
        client_config(&self.bootstrap, &self.properties)
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "spoke_relay_hub_topic_changes",
            "Times a session found a hub topic deleted, or with another partition count than \
             the relay saw before",
            self.layout_changes.clone(),
        );
    }

    /// Answers `ask` with the shared metadata client on a blocking thread: librdkafka's
    /// metadata and watermark calls wait for the broker.
    pub(crate) async fn ask<T, F>(&self, ask: F) -> Result<T, HubError>
    where
        T: Send + 'static,
        F: FnOnce(&BaseConsumer) -> Result<T, HubError> + Send + 'static,
    {
        let client = self.metadata.clone();
        tokio::task::spawn_blocking(move || ask(&client)).await?
    }

    /// The transactional id of a site's sessions.
    pub fn transactional_id(site: &str) -> String {
        format!("spoke-{site}")
    }

    /// Whether sessions use Kafka transactions. `"auto"` asks the hub once, by committing a
    /// probe transaction; a hub that cannot answer yet is an error (the session retries), not
    /// a reason to settle on the weaker mechanism.
    pub async fn transactional(&self, probe_topic: &str) -> Result<bool, HubError> {
        match self.transactions {
            Transactions::On => Ok(true),
            Transactions::Off => Ok(false),
            Transactions::Auto => self
                .transactions_probed
                .get_or_try_init(|| self.probe_transactions(probe_topic))
                .await
                .copied(),
        }
    }

    async fn probe_transactions(&self, probe_topic: &str) -> Result<bool, HubError> {
        match self.probe_transaction_support(probe_topic).await? {
            TransactionSupport::Supported => {
                tracing::info!("the hub supports transactions: sessions commit data and checkpoints atomically");
                Ok(true)
            }
            TransactionSupport::Unsupported(error) => {
                tracing::info!(%error, "the hub has no transactions: sessions are fenced by relay.fence_delay instead");
                Ok(false)
            }
            TransactionSupport::NotAuthorized(error) => {
                tracing::warn!(
                    %error,
                    fix = TRANSACTION_ACLS,
                    "the hub refuses this relay transactions: sessions are fenced by relay.fence_delay instead"
                );
                Ok(false)
            }
        }
    }

    /// Commits one probe transaction (a consumer offset of group
    /// [`TRANSACTION_PROBE`] for partition 0 of `probe_topic`, under transactional id
    /// [`TRANSACTION_PROBE`]) and says what the hub made of it.
    pub async fn probe_transaction_support(
        &self,
        probe_topic: &str,
    ) -> Result<TransactionSupport, HubError> {
        // Not of the form `spoke-<site>`, so it can never fence a site's producer.
        let producer = self.producer(Some(TRANSACTION_PROBE.to_owned()))?;
        let mut group = self.client_config();
        group.set("group.id", TRANSACTION_PROBE);
        let topic = probe_topic.to_owned();
        let outcome = tokio::task::spawn_blocking(move || {
            // The probe commits a consumer offset, not a record: a hub that takes the first
            // steps of a transaction but not the last (tansu) would otherwise keep an open
            // transaction in a topic forever, and read_committed readers of it stuck.
            let consumer: BaseConsumer = group.create()?;
            let metadata = consumer.group_metadata().ok_or(KafkaError::ClientCreation(
                "no consumer group metadata for the transaction probe".into(),
            ))?;
            let mut offsets = TopicPartitionList::new();
            offsets.add_partition_offset(&topic, 0, Offset::Offset(0))?;
            producer.init_transactions(TRANSACTION_TIMEOUT)?;
            producer.begin_transaction()?;
            producer.send_offsets_to_transaction(&offsets, &metadata, TRANSACTION_TIMEOUT)?;
            producer.commit_transaction(TRANSACTION_TIMEOUT)
        })
        .await?;
        match outcome {
            Ok(()) => Ok(TransactionSupport::Supported),
            Err(error) if not_authorized(&error) => Ok(TransactionSupport::NotAuthorized(error)),
            Err(error) if unsupported(&error) => Ok(TransactionSupport::Unsupported(error)),
            Err(error) => Err(HubError::Transaction(error)),
        }
    }

    /// This relay's permissions on `topics` and on the cluster, as the hub reports them
    /// (`None` where it does not).
    pub async fn permissions(&self, topics: Vec<String>) -> Result<HubPermissions, HubError> {
        self.ask(move |client| {
            let native = client.client().native_client();
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            let described =
                match kafka_topics::describe_topics(native, &names, true, METADATA_TIMEOUT) {
                    Ok(described) => described,
                    // A broker that does not answer DescribeTopics (older ones, librdkafka's mock
                    // cluster) still says in plain metadata whether a topic exists and may be
                    // described; it reports no permissions then.
                    Err(_) => names
                        .iter()
                        .map(|topic| {
                            let metadata = client
                                .fetch_metadata(Some(topic), METADATA_TIMEOUT)
                                .map_err(|source| HubError::Metadata {
                                    topic: (*topic).to_owned(),
                                    source,
                                })?;
                            let error = metadata
                                .topics()
                                .iter()
                                .find(|t| t.name() == *topic)
                                .map_or(Some(RDKafkaErrorCode::UnknownTopicOrPartition), |t| {
                                    t.error().map(RDKafkaErrorCode::from)
                                });
                            Ok((
                                (*topic).to_owned(),
                                TopicDescription {
                                    error,
                                    id: None,
                                    permissions: None,
                                },
                            ))
                        })
                        .collect::<Result<_, HubError>>()?,
                };
            // Brokers without DescribeCluster (or its permissions) answer nothing useful.
            let cluster = kafka_topics::cluster_permissions(native, METADATA_TIMEOUT)
                .ok()
                .flatten();
            Ok(HubPermissions {
                topics: described,
                cluster,
            })
        })
        .await
    }

    /// The producer a session of `site` hands its records to: with transactions the site's
    /// own, whose transactional id fences its older producers on any relay; otherwise one of
    /// the shared ones, so that a relay's threads and hub connections do not grow with the
    /// number of sites it serves.
    pub fn session_producer(
        &self,
        site: &str,
        transactional: bool,
    ) -> Result<SessionProducer, HubError> {
        if transactional {
            self.producer(Some(Self::transactional_id(site)))
                .map(SessionProducer::own)
        } else {
            self.shared.for_site(site).map_err(HubError::Client)
        }
    }

    /// The shared producers alive now (for shutdown).
    pub fn shared_producers(&self) -> Vec<RawProducer> {
        self.shared.live()
    }

    /// A producer of the relay's settings (see `producer_config`); with a `transactional_id`
    /// it is transactional, and a newer producer with the same id, on any relay, fences it
    /// at the broker.
    pub fn producer(&self, transactional_id: Option<String>) -> Result<RawProducer, HubError> {
        let mut config = producer_config(&self.bootstrap, &self.properties, self.delivery_timeout);
        if let Some(id) = transactional_id {
            config
                .set("transactional.id", id)
                .set(
                    "transaction.timeout.ms",
                    TRANSACTION_TIMEOUT.as_millis().to_string(),
                )
                // A site's own producer holds one site's records: librdkafka's 1 GiB
                // default queue would let one site pin that much relay memory while the hub
                // is slow.
                .set("queue.buffering.max.kbytes", "65536");
        }
        config
            .create_with_context(HubContext::default())
            .map_err(HubError::Client)
    }

    /// Makes sure `topic` exists (created with `source_partitions` and topic configuration
    /// `configs` when missing) and returns its partition count as the hub has it now. A
    /// session calls this once per hub topic and keeps the answer, so that it places every
    /// record and scans with one layout.
    pub async fn resolve_topic(
        &self,
        topic: &str,
        source_partitions: i32,
        configs: &[(String, String)],
    ) -> Result<i32, HubError> {
        let mut count = self.current_partitions(topic).await?;
        if count > 0 {
            return Ok(count);
        }
        if source_partitions == 0 {
            // The agent cannot tell the source's partitioning yet; creating the topic with a
            // guess would fix the wrong layout forever. The session ends and the agent retries.
            return Err(HubError::PartitionCountUnknown {
                topic: topic.to_owned(),
            });
        }
        let configs: Vec<(&str, &str)> = configs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.create_topic(topic, source_partitions.max(1), &configs)
            .await?;
        tracing::info!(topic, partitions = source_partitions, "created hub topic");
        // Creation is asynchronous in Kafka: wait until metadata shows the partitions.
        for _ in 0..50 {
            count = self.fetch_partition_count(topic).await?;
            if count > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if count == 0 {
            return Err(HubError::TopicNotReady {
                topic: topic.to_owned(),
            });
        }
        self.note_layout(topic, count);
        Ok(count)
    }

    /// What `topic` takes as the hub describes it; [`TopicLimits::UNKNOWN`] when it does not
    /// (a hub without DescribeConfigs, or a topic that is not there).
    pub async fn topic_limits(&self, topic: &str) -> TopicLimits {
        let resource = ResourceSpecifier::Topic(topic);
        let options = AdminOptions::new().request_timeout(Some(METADATA_TIMEOUT));
        let described = match self.admin.describe_configs([&resource], &options).await {
            Ok(results) => results.into_iter().next().and_then(Result::ok),
            Err(error) => {
                tracing::debug!(topic, %error, "hub did not describe the topic");
                None
            }
        };
        match described {
            Some(described) => {
                TopicLimits::from_configs(|key| described.get(key)?.value.as_deref())
            }
            None => TopicLimits::UNKNOWN,
        }
    }

    /// The partition count `topic` has now (0: it does not exist), reported when it is not
    /// the one this relay saw last.
    pub async fn current_partitions(&self, topic: &str) -> Result<i32, HubError> {
        let count = self.fetch_partition_count(topic).await?;
        self.note_layout(topic, count);
        Ok(count)
    }

    fn note_layout(&self, topic: &str, count: i32) {
        let mut known = self.lock_partitions();
        let before = if count > 0 {
            known.insert(topic.to_owned(), count)
        } else {
            known.remove(topic)
        };
        if let Some(before) = before.filter(|&before| before != count) {
            self.layout_changes.inc();
            tracing::warn!(
                topic,
                before,
                now = count,
                "hub topic changed (deleted, or created anew with another partition count): \
                 sessions place records by its layout as it is now"
            );
        }
    }

    fn lock_partitions(&self) -> std::sync::MutexGuard<'_, HashMap<String, i32>> {
        // The map is a cache: a panic elsewhere cannot leave it inconsistent.
        self.partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A consumer for reading the hub directly (resume scans, checkpoints): no group, no
    /// commits, committed records only.
    pub fn consumer(&self, role: &str) -> Result<BaseConsumer, HubError> {
        scan_consumer(self.client_config(), role)
    }

    /// Creates a topic with the relay's replication ([`Replication::for_hub`]) and `configs`;
    /// one that another relay created meanwhile is fine.
    async fn create_topic(
        &self,
        topic: &str,
        partitions: i32,
        configs: &[(&str, &str)],
    ) -> Result<(), HubError> {
        let replication = self.replication().await?;
        let min_insync = replication.min_insync.map(|n| n.to_string());
        let mut new_topic = NewTopic::new(
            topic,
            partitions,
            TopicReplication::Fixed(replication.factor.unwrap_or(-1)),
        );
        if let Some(min_insync) = &min_insync {
            new_topic = new_topic.set("min.insync.replicas", min_insync);
        }
        for &(key, value) in configs {
            new_topic = new_topic.set(key, value);
        }
        let results = self
            .admin
            .create_topics([&new_topic], &AdminOptions::new())
            .await
            .map_err(|source| HubError::CreateTopic {
                topic: topic.to_owned(),
                source,
            })?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(HubError::CreateTopic {
                        topic: topic.to_owned(),
                        source: KafkaError::AdminOp(code),
                    })
                }
            }
        }
        Ok(())
    }

    /// Makes sure the offsets topic exists: one partition (checkpoints are few and small),
    /// compacted so it keeps one record per key on hubs that compact.
    pub async fn ensure_offsets_topic(&self, topic: &str) -> Result<(), HubError> {
        if self.fetch_partition_count(topic).await? > 0 {
            return Ok(());
        }
        self.create_topic(topic, 1, &[("cleanup.policy", "compact")])
            .await?;
        tracing::info!(topic, "created the checkpoint topic");
        Ok(())
    }

    /// The replication a topic created now gets ([`Replication::for_hub`]).
    async fn replication(&self) -> Result<Replication, HubError> {
        let brokers = self
            .ask(|client| {
                client
                    .fetch_metadata(None, METADATA_TIMEOUT)
                    .map(|metadata| metadata.brokers().len())
                    .map_err(|source| HubError::Metadata {
                        topic: "(all)".into(),
                        source,
                    })
            })
            .await?;
        let replication = Replication::for_hub(self.replication, brokers);
        static SAID: std::sync::Once = std::sync::Once::new();
        if replication.min_insync.is_none() {
            SAID.call_once(|| {
                tracing::warn!(
                    brokers,
                    "hub topics are created with the hub's default min.insync.replicas: on a hub \
                 of fewer than three brokers acks=all may mean a single copy"
                )
            });
        }
        Ok(replication)
    }

    /// Asks the hub for its metadata: succeeds when the hub answers.
    pub async fn probe(&self) -> Result<(), HubError> {
        self.ask(|client| {
            client
                .fetch_metadata(None, METADATA_TIMEOUT)
                .map(|_| ())
                .map_err(|source| HubError::Metadata {
                    topic: "(all)".into(),
                    source,
                })
        })
        .await
    }

    /// Partition count of `topic`, 0 when it does not exist.
    async fn fetch_partition_count(&self, topic: &str) -> Result<i32, HubError> {
        let name = topic.to_owned();
        self.ask(move |client| {
            let metadata = client
                .fetch_metadata(Some(&name), METADATA_TIMEOUT)
                .map_err(|source| HubError::Metadata {
                    topic: name.clone(),
                    source,
                })?;
            let count = metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none())
                .map_or(0, |t| t.partitions().len());
            Ok(i32::try_from(count).unwrap_or(i32::MAX))
        })
        .await
    }

    /// Every topic in the hub.
    pub async fn topic_names(&self) -> Result<Vec<String>, HubError> {
        self.ask(|client| {
            let metadata = client
                .fetch_metadata(None, METADATA_TIMEOUT)
                .map_err(|source| HubError::Metadata {
                    topic: "(all)".into(),
                    source,
                })?;
            Ok(metadata
                .topics()
                .iter()
                .map(|t| t.name().to_owned())
                .collect())
        })
        .await
    }

    /// The end (high watermark) of every partition of `topic`.
    pub async fn partition_ends(&self, topic: &str) -> Result<BTreeMap<i32, i64>, HubError> {
        let count = self.fetch_partition_count(topic).await?;
        let topic = topic.to_owned();
        self.ask(move |client| {
            (0..count)
                .map(|partition| {
                    client
                        .fetch_watermarks(&topic, partition, METADATA_TIMEOUT)
                        .map(|(_, high)| (partition, high))
                        .map_err(|source| HubError::Scan {
                            topic: topic.clone(),
                            partition,
                            source,
                        })
                })
                .collect()
        })
        .await
    }
}

/// The one hub partition that source partition `source_partition` lands in, for a hub topic
/// of `hub_partitions` partitions: the same number where the hub has it, else that number
/// modulo the count. One hub partition per source partition keeps the source's order (and so
/// per-key order, since a key lives in one source partition) and makes the resume point a
/// scan of one partition's tail; spreading by key hash would interleave a source partition
/// over several hub partitions, where no single newest record marks how far it got.
pub fn hub_partition(source_partition: i32, hub_partitions: i32) -> i32 {
    source_partition.rem_euclid(hub_partitions.max(1))
}

/// Every hub producer's settings: idempotent and acks=all, so a record the hub confirmed is
/// durable and retries never duplicate or reorder within a partition.
fn producer_config(
    bootstrap: &str,
    properties: &KafkaProperties,
    delivery_timeout: Duration,
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        // A delivery not confirmed in time fails (and ends the session) rather than landing
        // late: with the hand-over window (`HubConfig::handover_window`) it bounds when a
        // session's records can land, below the agents' fence delay.
        .set(
            "message.timeout.ms",
            delivery_timeout.as_millis().to_string(),
        )
        // A 1 MiB source value plus headers exceeds librdkafka's 1 MB default; larger
        // records go to the dead-letter topic (`dead_letter`).
        .set(
            "message.max.bytes",
            crate::config::MAX_RECORD_BYTES.to_string(),
        )
        // librdkafka's 1 GiB default queue per producer is more than the relay should pin
        // while the hub is slow: 64 MiB each (256 MiB with the 4 shared producers) is many
        // produce requests per partition in flight for hundreds of shipping sites. When this
        // fills, sessions wait (see `session::enqueue`, which also keeps each session to its
        // share) and QUIC flow control stops agents.
        .set("queue.buffering.max.kbytes", "65536")
        // The groups a session hands over at a time are sized to fit one request
        // (`handoff`); a smaller `batch.size` passed through splits them, which costs the
        // broker thread's idle waits again but nothing else.
        .set("batch.size", crate::handoff::BATCH_SIZE.to_string())
        // A hub topic deleted under a running session must fail its deliveries, not come
        // back with the broker's default layout: the relay creates hub topics itself, with
        // the source's partition count (`resolve_topic`).
        .set("allow.auto.create.topics", "false");
    for (key, value) in properties.iter() {
        config.set(key, value);
    }
    // Not overridable: exactly-once depends on them. With the gapless guarantee a record that
    // finally fails makes the producer fail everything after it, so the hub never holds a
    // later record of a partition without the earlier ones and the resume scan's "newest
    // record" is a true high-water mark.
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("enable.gapless.guarantee", "true")
        // A request still unanswered then fails too: together with message.timeout.ms this
        // bounds when a handed-over record can land (`HubConfig::handover_window`).
        .set(
            "request.timeout.ms",
            delivery_timeout.as_millis().to_string(),
        );
    config
}

/// The hub's address and the operator's `[hub.kafka]`, `[hub.tls]` and `[hub.sasl]`
/// settings, for any hub client.
fn client_config(bootstrap: &str, properties: &KafkaProperties) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    for (key, value) in properties.iter() {
        config.set(key, value);
    }
    config
}

/// Unless `[hub.kafka]` sets one, `role` becomes the client id, so that the hub's logs and a
/// crash report say which of the relay's clients they are about.
pub(crate) fn scan_consumer(
    mut config: ClientConfig,
    role: &str,
) -> Result<BaseConsumer, HubError> {
    if config.get("client.id").is_none() {
        config.set("client.id", role);
    }
    config
        .set("group.id", "spoke-relay-resume-scan")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(HubError::Client)
}

/// Whether a transaction error says the hub has no (usable) transactions, as opposed to a
/// passing failure.
fn unsupported(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnsupportedFeature
                | RDKafkaErrorCode::UnsupportedVersion
                | RDKafkaErrorCode::UnsupportedForMessageFormat
        )
    )
}

/// Whether a transaction error is the hub's ACLs refusing this relay.
fn not_authorized(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::TransactionalIdAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::TopicAuthorizationFailed
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_topics_get_two_of_three_copies_where_the_hub_can_hold_them() {
        let unset = Replication {
            factor: None,
            min_insync: None,
        };
        let three_of_two = Replication {
            factor: Some(3),
            min_insync: Some(2),
        };
        assert_eq!(Replication::for_hub(unset, 3), three_of_two);
        assert_eq!(Replication::for_hub(unset, 9), three_of_two);
        assert_eq!(
            Replication::for_hub(unset, 1),
            unset,
            "a small hub keeps its defaults"
        );
        let configured = Replication {
            factor: Some(5),
            min_insync: Some(3),
        };
        assert_eq!(Replication::for_hub(configured, 1), configured);
        let one_copy = Replication {
            factor: Some(1),
            min_insync: None,
        };
        assert_eq!(
            Replication::for_hub(one_copy, 5),
            one_copy,
            "no minimum above an explicit factor"
        );
    }

    #[test]
    fn each_source_partition_has_exactly_one_hub_partition() {
        assert_eq!(hub_partition(2, 3), 2, "the same number where it exists");
        assert_eq!(hub_partition(0, 8), 0);
        assert_eq!(
            (0..6).map(|p| hub_partition(p, 2)).collect::<Vec<_>>(),
            [0, 1, 0, 1, 0, 1],
            "modulo the hub's count where it has fewer"
        );
        assert_eq!(
            hub_partition(5, 0),
            0,
            "never a partition that cannot exist"
        );
    }
}
