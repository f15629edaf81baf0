//! relay.toml: parsed with unknown keys rejected, then validated once, so `check` and `run`
//! refuse exactly the same files.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use regex::Regex;
use serde::Deserialize;

use spoke_kafka::security::{self as kafka_security, KafkaProperties, KafkaSasl, KafkaTls};
pub use spoke_process::config_file::ConfigError;

/// The relay's configuration file as written by the operator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// UDP address the QUIC server binds.
    pub listen: SocketAddr,
    pub tls: TlsConfig,
    pub hub: HubConfig,
    /// Per-site access: `[sites.NAME]`, or `[sites."*"]` for any site the CA vouches for.
    pub sites: BTreeMap<String, SiteConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM chain presented to agents.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA bundle that site certificates must chain to.
    pub client_ca: PathBuf,
    /// Certificates refused although they chain to `client_ca`: `"sha256:<hex>"` (SHA-256 of
    /// the leaf's DER) or `"serial:<hex>"`; see [`crate::deny::DenyList`].
    #[serde(default)]
    pub deny: Vec<String>,
}

/// What one peer, or all of them together, may cost the relay. Every wait on the network has
/// a timeout and every peer-controlled length a cap.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections in total, handshaking or established.
    pub max_connections: u32,
    /// Established connections presenting one site's certificate.
    pub max_connections_per_site: u32,
    /// QUIC/TLS handshakes in progress at once.
    pub max_handshakes: u32,
    /// A handshake must finish within this.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// After the handshake, the agent's `Hello` must arrive within this.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// QUIC idle timeout: a connection that carries no packet for this long is gone.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// After `Hello`, the longest wait for the agent's next bytes, between frames (agents send
    /// a heartbeat every 2 s) or inside one.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Concurrent streams a peer may open: its control stream and up to this minus one data
    /// streams (protocol version 3). However many it opens, they share one stream window
    /// (16 MiB) of unread data the peer can park in the relay.
    pub max_streams_per_connection: u32,
    /// Source partitions one `Hello` may list; each allowed one costs a resume scan of the hub.
    pub max_partitions_per_hello: u32,
    /// Largest partition count a batch may declare: it sizes the hub topic the relay creates.
    pub max_partitions_per_topic: u32,
    /// Largest frame body.
    pub max_frame_bytes: ByteSize,
    /// Largest uncompressed record section of one batch (caps zstd's output).
    pub max_batch_bytes: ByteSize,
    pub max_records_per_batch: u32,
    pub max_headers_per_record: u32,
    /// Header keys plus values of one record.
    pub max_header_bytes: ByteSize,
    /// zstd dictionaries one stream of a connection may define (protocol version 2); kept in
    /// memory for the connection only.
    pub max_dictionaries: u32,
    /// Largest zstd dictionary an agent may send.
    pub max_dictionary_bytes: ByteSize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let frame = spoke_proto::Limits::default();
        let batch = spoke_proto::BatchLimits::default();
        let dictionary = spoke_proto::DictionaryLimits::default();
        Self {
            max_connections: 1000,
            max_connections_per_site: 4,
            max_handshakes: 200,
            handshake_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(30),
            max_streams_per_connection: 9,
            max_partitions_per_hello: 10_000,
            max_partitions_per_topic: 10_000,
            max_frame_bytes: ByteSize::b(u64::from(frame.max_frame_bytes)),
            max_batch_bytes: ByteSize::b(u64::from(batch.max_uncompressed_bytes)),
            max_records_per_batch: batch.max_records,
            max_headers_per_record: batch.max_headers_per_record,
            max_header_bytes: ByteSize::b(u64::from(batch.max_header_bytes)),
            max_dictionaries: dictionary.max_dictionaries,
            max_dictionary_bytes: ByteSize::b(u64::from(dictionary.max_dictionary_bytes)),
        }
    }
}

impl LimitsConfig {
    /// The frame caps for spoke-proto; valid after [`load`] checked them.
    pub fn frame_limits(&self) -> spoke_proto::Limits {
        spoke_proto::Limits {
            max_frame_bytes: clamp_u32(self.max_frame_bytes),
        }
    }

    /// The batch caps for spoke-proto; valid after [`load`] checked them.
    pub fn batch_limits(&self) -> spoke_proto::BatchLimits {
        spoke_proto::BatchLimits {
            max_uncompressed_bytes: clamp_u32(self.max_batch_bytes),
            max_records: self.max_records_per_batch,
            max_headers_per_record: self.max_headers_per_record,
            max_header_bytes: clamp_u32(self.max_header_bytes),
            ..spoke_proto::BatchLimits::default()
        }
    }

    /// The dictionary caps for spoke-proto; valid after [`load`] checked them.
    pub fn dictionary_limits(&self) -> spoke_proto::DictionaryLimits {
        spoke_proto::DictionaryLimits {
            max_dictionaries: self.max_dictionaries,
            max_dictionary_bytes: clamp_u32(self.max_dictionary_bytes),
        }
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        let counts = [
            ("limits.max_connections", self.max_connections),
            (
                "limits.max_connections_per_site",
                self.max_connections_per_site,
            ),
            ("limits.max_handshakes", self.max_handshakes),
            (
                "limits.max_streams_per_connection",
                self.max_streams_per_connection,
            ),
            ("limits.max_records_per_batch", self.max_records_per_batch),
            (
                "limits.max_partitions_per_hello",
                self.max_partitions_per_hello,
            ),
        ];
        for (key, value) in counts {
            if value == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        let times = [
            ("limits.handshake_timeout", self.handshake_timeout),
            ("limits.hello_timeout", self.hello_timeout),
            ("limits.idle_timeout", self.idle_timeout),
            ("limits.read_timeout", self.read_timeout),
        ];
        for (key, value) in times {
            if value.is_zero() {
                return Err((key, "must be longer than 0".into()));
            }
        }
        // QUIC carries the idle timeout in milliseconds as a varint of at most 2^62.
        if self.idle_timeout > Duration::from_secs(3600) {
            return Err(("limits.idle_timeout", "must be at most 1h".into()));
        }
        let sizes = [
            ("limits.max_frame_bytes", self.max_frame_bytes),
            ("limits.max_batch_bytes", self.max_batch_bytes),
            ("limits.max_header_bytes", self.max_header_bytes),
            ("limits.max_dictionary_bytes", self.max_dictionary_bytes),
        ];
        for (key, value) in sizes {
            // The frame and batch formats carry lengths as u32.
            if value.as_u64() == 0 || value.as_u64() > u64::from(u32::MAX) {
                return Err((
                    key,
                    format!(
                        "must be between 1 B and {}",
                        ByteSize::b(u64::from(u32::MAX))
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn clamp_u32(size: ByteSize) -> u32 {
    u32::try_from(size.as_u64()).unwrap_or(u32::MAX)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    pub bootstrap: String,
    /// Target topic template; `{site}` and `{topic}` are substituted.
    #[serde(default = "default_topic_template")]
    pub topic: String,
    #[serde(default)]
    pub delivery: Delivery,
    #[serde(default)]
    pub transactions: Transactions,
    /// Hub topic holding the checkpoints of every site (shared by all relays).
    #[serde(default = "default_offsets_topic")]
    pub offsets_topic: String,
    /// At most one checkpoint per source partition per this interval (and one when a session
    /// ends); the resume scan covers whatever landed after the last one.
    #[serde(default = "default_checkpoint_interval", with = "humantime_serde")]
    pub checkpoint_interval: std::time::Duration,
    /// A record the hub has not confirmed this long after the relay handed it to its
    /// producer fails (librdkafka's `message.timeout.ms`): the session ends and the agent
    /// sends it again.
    #[serde(default = "default_delivery_timeout", with = "humantime_serde")]
    pub delivery_timeout: std::time::Duration,
    /// The `relay.fence_delay` of the agents this relay serves (theirs defaults to 15 s too).
    /// Without transactions it is what keeps two relays from writing a site's records at
    /// once: a session hands records to the hub producer only until
    /// `fence_delay - delivery_timeout - 1 s` after the agent's last batch or heartbeat, so
    /// nothing it sent can land once the agent may have moved on to another relay.
    #[serde(default = "default_fence_delay", with = "humantime_serde")]
    pub fence_delay: std::time::Duration,
    /// Replication factor of the hub topics the relay creates; unset: 3 on a hub of three
    /// or more brokers, else the hub's default.
    #[serde(default)]
    pub replication_factor: Option<i32>,
    /// `min.insync.replicas` of the hub topics the relay creates, so that `acks=all` means
    /// that many copies; unset: 2 on a hub of three or more brokers, else the hub's default.
    #[serde(default)]
    pub min_insync_replicas: Option<i32>,
    /// What to do with a record the hub refuses (larger than `max_record_bytes` with its
    /// provenance headers, a timestamp outside the hub topic's window, or bound for a hub
    /// topic name Kafka does not allow):
    /// `dead-letter` puts it in `dead_letter_topic` and the site carries on; `stop` ends the
    /// session, so the site stalls at that record until the operator acts.
    #[serde(default)]
    pub on_rejected: OnRejected,
    /// Where refused records go: provenance, hub topic and reason in headers, and as much of
    /// the record as fits.
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Hub producers shared by the sessions of every site without transactions: each has
    /// its own threads and one connection per hub broker, however many sites it carries.
    #[serde(default = "default_producers")]
    pub producers: usize,
    /// The largest record the hub takes (key, value and headers, provenance included,
    /// uncompressed): it lowers each hub topic's `max.message.bytes` as the hub describes it,
    /// never raises it; 16 MiB at most (the relay's producer refuses larger ones itself).
    #[serde(default)]
    pub max_record_bytes: Option<ByteSize>,
    /// librdkafka properties passed through to every hub client (producers, the scan and
    /// checkpoint consumers, the admin client); values may name environment variables
    /// (`${NAME}`).
    #[serde(default)]
    pub kafka: BTreeMap<String, String>,
    /// Topic configuration for the hub topics the relay creates, over the source topic's
    /// compaction that the agent carries (`TopicConfig`), name by name. Not the dead-letter
    /// topic.
    #[serde(default)]
    pub topic_config: BTreeMap<String, String>,
    /// TLS to the hub brokers.
    #[serde(default)]
    pub tls: Option<KafkaTls>,
    /// SASL authentication to the hub brokers.
    #[serde(default)]
    pub sasl: Option<KafkaSasl>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnRejected {
    #[default]
    DeadLetter,
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    #[default]
    ExactlyOnce,
    AtLeastOnce,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transactions {
    #[default]
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Source topics this site may write: exact names or regexes, anchored at both ends.
    pub allow: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

fn default_topic_template() -> String {
    "{site}.{topic}".to_owned()
}

/// The relay's hub producer refuses larger records itself (`message.max.bytes`).
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

fn default_offsets_topic() -> String {
    "spoke.offsets".to_owned()
}

fn default_producers() -> usize {
    4
}

/// More shared producers than this only add threads and hub connections.
pub const MAX_PRODUCERS: usize = 64;

fn default_dead_letter_topic() -> String {
    "spoke.dead-letter".to_owned()
}

fn default_delivery_timeout() -> std::time::Duration {
    // Leaves a hand-over window (15 - 8 - 1 = 6 s) longer than the agents' 2 s heartbeat.
    std::time::Duration::from_secs(8)
}

fn default_fence_delay() -> std::time::Duration {
    std::time::Duration::from_secs(15)
}

/// What the fence budget keeps back for a batch's way from the agent to the relay.
pub const TRANSIT_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

impl HubConfig {
    /// How long after the agent's last batch a session may still hand records to the hub
    /// producer (see `fence_delay`); validated to be at least a second.
    pub fn handover_window(&self) -> std::time::Duration {
        self.fence_delay
            .saturating_sub(self.delivery_timeout)
            .saturating_sub(TRANSIT_MARGIN)
    }
}

fn default_checkpoint_interval() -> std::time::Duration {
    std::time::Duration::from_secs(1)
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9465))
}

/// A validated configuration plus what validation compiled from it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub config: RelayConfig,
    pub acl: Acl,
    pub deny: crate::deny::DenyList,
    /// The hub's client properties: `[hub.kafka]` with `[hub.tls]` and `[hub.sasl]`,
    /// secrets read.
    pub hub_kafka: KafkaProperties,
}

/// Which site may write which source topics.
#[derive(Debug, Clone)]
pub struct Acl {
    sites: BTreeMap<String, Vec<Regex>>,
}

impl Acl {
    /// The allow-list that governs `site`: its own table, else the `"*"` table, else none
    /// (the site is refused).
    pub fn site(&self, site: &str) -> Option<&[Regex]> {
        self.sites
            .get(site)
            .or_else(|| self.sites.get("*"))
            .map(Vec::as_slice)
    }

    pub fn allows(patterns: &[Regex], topic: &str) -> bool {
        patterns.iter().any(|p| p.is_match(topic))
    }
}

/// Compiles an include/allow pattern: an exact topic name is a regex that matches only itself,
/// so both forms are one anchored regex.
pub fn anchored(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})$"))
}

/// Reads, parses and validates `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let config: RelayConfig = spoke_process::config_file::read(path)?;
    let (acl, deny) = validate(path, &config)?;
    let hub_kafka = kafka_security::resolve(
        &config.hub.kafka,
        config.hub.tls.as_ref(),
        config.hub.sasl.as_ref(),
        &|name| std::env::var(name).ok(),
    )
    .map_err(|e| spoke_process::config_file::invalid(path, &format!("hub.{}", e.key), e.reason))?;
    Ok(Loaded {
        path: path.to_owned(),
        config,
        acl,
        deny,
        hub_kafka,
    })
}

fn validate(
    path: &Path,
    config: &RelayConfig,
) -> Result<(Acl, crate::deny::DenyList), ConfigError> {
    let invalid =
        |key: &str, reason: String| spoke_process::config_file::invalid(path, key, reason);
    if config.sites.is_empty() {
        return Err(invalid(
            "sites",
            "at least one [sites.NAME] (or [sites.\"*\"]) table is required".into(),
        ));
    }
    validate_template(&config.hub.topic).map_err(|reason| invalid("hub.topic", reason))?;
    for (key, topic) in [
        ("hub.offsets_topic", &config.hub.offsets_topic),
        ("hub.dead_letter_topic", &config.hub.dead_letter_topic),
    ] {
        if let Err(reason) = crate::hub_limits::check_topic_name(topic) {
            return Err(invalid(
                key,
                format!("{topic:?} is not a valid Kafka topic name: {reason}"),
            ));
        }
    }
    if config
        .hub
        .max_record_bytes
        .is_some_and(|max| max.as_u64() < 1024 || max.as_u64() > MAX_RECORD_BYTES as u64)
    {
        return Err(invalid(
            "hub.max_record_bytes",
            "must be between 1KiB and 16MiB".into(),
        ));
    }
    if config.hub.checkpoint_interval.is_zero() {
        return Err(invalid(
            "hub.checkpoint_interval",
            "must be positive".into(),
        ));
    }
    if !(1..=MAX_PRODUCERS).contains(&config.hub.producers) {
        return Err(invalid(
            "hub.producers",
            format!("must be between 1 and {MAX_PRODUCERS}"),
        ));
    }
    if let Some(factor) = config.hub.replication_factor {
        if factor < 1 {
            return Err(invalid(
                "hub.replication_factor",
                format!("{factor}: must be at least 1 (leave it unset for the default)"),
            ));
        }
    }
    if let Some(min_insync) = config.hub.min_insync_replicas {
        if min_insync < 1 {
            return Err(invalid(
                "hub.min_insync_replicas",
                format!("{min_insync}: must be at least 1"),
            ));
        }
        if let Some(factor) = config.hub.replication_factor.filter(|&f| min_insync > f) {
            return Err(invalid(
                "hub.min_insync_replicas",
                format!(
                    "{min_insync} is above hub.replication_factor {factor}: every write would fail"
                ),
            ));
        }
    }
    if config.hub.topic_config.contains_key("min.insync.replicas") {
        return Err(invalid(
            "hub.topic_config.min.insync.replicas",
            "set by hub.min_insync_replicas; use that".into(),
        ));
    }
    if config.hub.delivery_timeout < std::time::Duration::from_secs(1) {
        return Err(invalid(
            "hub.delivery_timeout",
            "must be at least 1s".into(),
        ));
    }
    if config.hub.handover_window() < std::time::Duration::from_secs(1) {
        return Err(invalid(
            "hub.fence_delay",
            format!(
                "{} leaves no time to hand records to the hub: it must exceed \
                 hub.delivery_timeout ({}) by at least 2s, or a relay that lost an agent \
                 could still write after the agent moved to another relay",
                humantime::format_duration(config.hub.fence_delay),
                humantime::format_duration(config.hub.delivery_timeout)
            ),
        ));
    }
    for key in [
        "message.timeout.ms",
        "delivery.timeout.ms",
        "request.timeout.ms",
    ] {
        if config.hub.kafka.contains_key(key) {
            return Err(invalid(
                &format!("hub.kafka.{key}"),
                "set hub.delivery_timeout instead: the fence between relays depends on it".into(),
            ));
        }
    }
    if config.hub.bootstrap.trim().is_empty() {
        return Err(invalid("hub.bootstrap", "must not be empty".into()));
    }
    let mut sites = BTreeMap::new();
    for (site, table) in &config.sites {
        let key = format!("sites.{site}.allow");
        if site != "*" {
            crate::pki::validate_site_name(site).map_err(|reason| invalid(&key, reason))?;
        }
        let mut patterns = Vec::with_capacity(table.allow.len());
        for pattern in &table.allow {
            patterns.push(
                anchored(pattern)
                    .map_err(|e| invalid(&key, format!("pattern {pattern:?}: {e}")))?,
            );
        }
        sites.insert(site.clone(), patterns);
    }
    let deny = crate::deny::DenyList::parse(&config.tls.deny)
        .map_err(|reason| invalid("tls.deny", reason))?;
    config
        .limits
        .validate()
        .map_err(|(key, reason)| invalid(key, reason))?;
    Ok((Acl { sites }, deny))
}

/// The template must name the source topic: the resume scan tells sources apart by hub topic
/// plus the `spoke-partition` header, and the provenance headers carry no topic.
fn validate_template(template: &str) -> Result<(), String> {
    if !template.contains("{topic}") {
        return Err(format!("template {template:?} must contain {{topic}}"));
    }
    let rest = template.replace("{site}", "").replace("{topic}", "");
    if rest.contains('{') || rest.contains('}') {
        return Err(format!(
            "template {template:?}: only {{site}} and {{topic}} may be substituted"
        ));
    }
    if !rest
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "template {template:?} contains characters Kafka does not allow in topic names"
        ));
    }
    Ok(())
}

/// The hub topic a site's source topic lands in.
pub fn hub_topic(template: &str, site: &str, topic: &str) -> String {
    template.replace("{site}", site).replace("{topic}", topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Loaded, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, text).expect("write");
        load(&path)
    }

    const MINIMAL: &str = r#"
listen = "127.0.0.1:7000"
[tls]
cert = "/r.pem"
key = "/r.key"
client_ca = "/ca.pem"
[hub]
bootstrap = "127.0.0.1:9092"
[sites.branch-042]
allow = ["orders", "telemetry\\..*"]
"#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let loaded = parse(MINIMAL).expect("valid");
        assert_eq!(loaded.config.hub.topic, "{site}.{topic}");
        assert_eq!(loaded.config.hub.delivery, Delivery::ExactlyOnce);
        assert_eq!(loaded.config.hub.transactions, Transactions::Auto);
        assert_eq!(loaded.config.hub.offsets_topic, "spoke.offsets");
        assert_eq!(
            loaded.config.hub.checkpoint_interval,
            std::time::Duration::from_secs(1)
        );
        assert_eq!(loaded.config.admin.listen.port(), 9465);
        let allow = loaded.acl.site("branch-042").expect("site");
        assert!(Acl::allows(allow, "orders"));
        assert!(Acl::allows(allow, "telemetry.cpu"));
        assert!(!Acl::allows(allow, "orders2"), "patterns are anchored");
        assert!(loaded.acl.site("other").is_none());
    }

    #[test]
    fn wildcard_site_covers_unknown_sites() {
        let text = MINIMAL.replace("[sites.branch-042]", "[sites.\"*\"]");
        let loaded = parse(&text).expect("valid");
        assert!(loaded.acl.site("anyone").is_some());
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let text = MINIMAL.replace("[hub]", "[hub]\nbootstrapp = \"x\"");
        let err = parse(&text).expect_err("unknown key").to_string();
        assert!(err.contains("relay.toml"), "{err}");
        assert!(err.contains("bootstrapp"), "{err}");
    }

    #[test]
    fn hub_security_tables_resolve_and_their_mistakes_name_file_and_key() {
        let text = MINIMAL.replace(
            "[sites.branch-042]",
            "[hub.tls]\n[hub.sasl]\nmechanism = \"SCRAM-SHA-512\"\nusername = \"r\"\n\
             password = \"$${not-an-env-reference}\"\n[sites.branch-042]",
        );
        let loaded = parse(&text).expect("valid");
        let hub = &loaded.hub_kafka;
        assert_eq!(hub.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(hub.get("sasl.password"), Some("${not-an-env-reference}"));
        let text = MINIMAL.replace(
            "[sites.branch-042]",
            "[hub.sasl]\nmechanism = \"SCRAM-SHA-256\"\nusername = \"r\"\n\
             password_file = \"/nonexistent/hub.password\"\n[sites.branch-042]",
        );
        let err = parse(&text).expect_err("unreadable file").to_string();
        assert!(
            err.contains("relay.toml")
                && err.contains("hub.sasl.password_file")
                && err.contains("/nonexistent/hub.password"),
            "{err}"
        );
    }

    #[test]
    fn hub_topic_config_is_read_and_does_not_fight_min_insync_replicas() {
        let text = MINIMAL.replace(
            "[sites.branch-042]",
            "[hub.topic_config]\n\"cleanup.policy\" = \"compact\"\n[sites.branch-042]",
        );
        let loaded = parse(&text).expect("valid");
        assert_eq!(
            loaded
                .config
                .hub
                .topic_config
                .get("cleanup.policy")
                .map(String::as_str),
            Some("compact")
        );
        let text = MINIMAL.replace(
            "[sites.branch-042]",
            "[hub.topic_config]\n\"min.insync.replicas\" = \"2\"\n[sites.branch-042]",
        );
        let err = parse(&text)
            .expect_err("two places for one setting")
            .to_string();
        assert!(err.contains("hub.min_insync_replicas"), "{err}");
    }

    #[test]
    fn a_min_insync_above_the_replication_factor_is_refused() {
        let text = MINIMAL.replace(
            "[hub]",
            "[hub]\nreplication_factor = 2\nmin_insync_replicas = 3",
        );
        let err = parse(&text).expect_err("unwritable topics").to_string();
        assert!(err.contains("hub.min_insync_replicas"), "{err}");
        let text = MINIMAL.replace("[hub]", "[hub]\nmin_insync_replicas = 0");
        assert!(parse(&text).is_err());
        let text = MINIMAL.replace(
            "[hub]",
            "[hub]\nreplication_factor = 3\nmin_insync_replicas = 2",
        );
        let loaded = parse(&text).expect("valid");
        assert_eq!(loaded.config.hub.min_insync_replicas, Some(2));
    }

    #[test]
    fn sites_share_four_hub_producers_unless_told_otherwise() {
        assert_eq!(parse(MINIMAL).expect("valid").config.hub.producers, 4);
        let text = MINIMAL.replace("[hub]", "[hub]\nproducers = 1");
        assert_eq!(parse(&text).expect("valid").config.hub.producers, 1);
        for producers in [0, MAX_PRODUCERS + 1] {
            let text = MINIMAL.replace("[hub]", &format!("[hub]\nproducers = {producers}"));
            let err = parse(&text).expect_err("out of bounds").to_string();
            assert!(err.contains("hub.producers"), "{err}");
        }
    }

    #[test]
    fn refused_records_go_to_a_dead_letter_topic_unless_told_to_stop() {
        let loaded = parse(MINIMAL).expect("valid");
        assert_eq!(loaded.config.hub.on_rejected, OnRejected::DeadLetter);
        assert_eq!(loaded.config.hub.dead_letter_topic, "spoke.dead-letter");
        assert_eq!(loaded.config.hub.max_record_bytes, None);
        let text = MINIMAL.replace(
            "[hub]",
            "[hub]\non_rejected = \"stop\"\nmax_record_bytes = \"8MiB\"",
        );
        let loaded = parse(&text).expect("valid");
        assert_eq!(loaded.config.hub.on_rejected, OnRejected::Stop);
        assert_eq!(loaded.config.hub.max_record_bytes, Some(ByteSize::mib(8)));
        for (line, key) in [
            (
                "dead_letter_topic = \"dead letters\"",
                "hub.dead_letter_topic",
            ),
            ("max_record_bytes = \"100B\"", "hub.max_record_bytes"),
            ("max_record_bytes = \"1GiB\"", "hub.max_record_bytes"),
            ("on_rejected = \"ignore\"", "on_rejected"),
        ] {
            let text = MINIMAL.replace("[hub]", &format!("[hub]\n{line}"));
            let err = parse(&text).expect_err(line).to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn the_delivery_timeout_must_leave_time_before_the_agents_fence() {
        let loaded = parse(MINIMAL).expect("valid");
        assert_eq!(
            loaded.config.hub.handover_window(),
            std::time::Duration::from_secs(6)
        );
        let text = MINIMAL.replace("[hub]", "[hub]\ndelivery_timeout = \"14s\"");
        let err = parse(&text).expect_err("no hand-over time").to_string();
        assert!(err.contains("hub.fence_delay"), "{err}");
        let text = MINIMAL.replace(
            "[hub]",
            "[hub]\ndelivery_timeout = \"14s\"\nfence_delay = \"30s\"",
        );
        assert!(parse(&text).is_ok());
        let text = MINIMAL.replace(
            "[sites.branch-042]",
            "[hub.kafka]\n\"message.timeout.ms\" = \"300000\"\n[sites.branch-042]",
        );
        let err = parse(&text).map(|_| ()).expect_err("overridden timeout");
        assert!(err.to_string().contains("message.timeout.ms"), "{err}");
    }

    #[test]
    fn template_without_topic_is_refused() {
        let text = MINIMAL.replace("[hub]", "[hub]\ntopic = \"{site}\"");
        let err = parse(&text).expect_err("bad template").to_string();
        assert!(err.contains("hub.topic"), "{err}");
    }

    #[test]
    fn bad_regex_names_site_key() {
        let text = MINIMAL.replace("\"orders\",", "\"(orders\",");
        let err = parse(&text).expect_err("bad regex").to_string();
        assert!(err.contains("sites.branch-042.allow"), "{err}");
    }

    #[test]
    fn limits_default_to_the_documented_values() {
        let loaded = parse(MINIMAL).expect("valid");
        let limits = &loaded.config.limits;
        assert_eq!(limits.max_connections, 1000);
        assert_eq!(limits.max_connections_per_site, 4);
        assert_eq!(limits.max_handshakes, 200);
        assert_eq!(limits.handshake_timeout, Duration::from_secs(10));
        assert_eq!(limits.hello_timeout, Duration::from_secs(10));
        assert_eq!(limits.idle_timeout, Duration::from_secs(30));
        assert_eq!(limits.read_timeout, Duration::from_secs(30));
        assert_eq!(limits.max_streams_per_connection, 9);
        assert_eq!(limits.max_partitions_per_hello, 10_000);
        assert_eq!(limits.max_partitions_per_topic, 10_000);
        assert_eq!(limits.frame_limits(), spoke_proto::Limits::default());
        assert_eq!(limits.batch_limits(), spoke_proto::BatchLimits::default());
        assert_eq!(
            limits.dictionary_limits(),
            spoke_proto::DictionaryLimits::default()
        );
        assert!(loaded.deny.is_empty());
    }

    #[test]
    fn limits_are_read_with_units() {
        let text = format!(
            "{MINIMAL}\n[limits]\nmax_connections_per_site = 2\nread_timeout = \"2s\"\n\
             max_frame_bytes = \"1 MiB\"\nmax_header_bytes = \"4 KiB\"\nmax_records_per_batch = 10\n"
        );
        let loaded = parse(&text).expect("valid");
        let limits = &loaded.config.limits;
        assert_eq!(limits.max_connections_per_site, 2);
        assert_eq!(limits.read_timeout, Duration::from_secs(2));
        assert_eq!(limits.frame_limits().max_frame_bytes, 1 << 20);
        let batch = limits.batch_limits();
        assert_eq!(batch.max_header_bytes, 4096);
        assert_eq!(batch.max_records, 10);
        assert_eq!(batch.zstd_window_log_max, 24);
    }

    #[test]
    fn bad_limits_name_their_key() {
        for (line, key) in [
            ("max_connections = 0", "limits.max_connections"),
            (
                "max_streams_per_connection = 0",
                "limits.max_streams_per_connection",
            ),
            ("hello_timeout = \"0s\"", "limits.hello_timeout"),
            ("idle_timeout = \"2h\"", "limits.idle_timeout"),
            ("max_frame_bytes = \"5 GiB\"", "limits.max_frame_bytes"),
            ("max_batch_bytes = 0", "limits.max_batch_bytes"),
        ] {
            let text = format!("{MINIMAL}\n[limits]\n{line}\n");
            let err = parse(&text).expect_err(line).to_string();
            assert!(err.contains(key), "{line}: {err}");
        }
        let text = format!("{MINIMAL}\n[limits]\nmax_conections = 3\n");
        let err = parse(&text).expect_err("typo").to_string();
        assert!(err.contains("max_conections"), "{err}");
    }

    #[test]
    fn deny_entries_are_parsed_and_bad_ones_name_tls_deny() {
        let fingerprint = "AB:".repeat(31) + "AB";
        let text = MINIMAL.replace(
            "client_ca = \"/ca.pem\"",
            &format!(
                "client_ca = \"/ca.pem\"\ndeny = [\"sha256:{fingerprint}\", \"serial:00:0a:1B\"]"
            ),
        );
        let loaded = parse(&text).expect("valid");
        assert_eq!(loaded.deny.len(), 2);
        for bad in [
            "ab12",
            "md5:ab12",
            "sha256:ab12",
            "sha256:",
            "serial:xyz",
            "serial:00",
        ] {
            let text = MINIMAL.replace(
                "client_ca = \"/ca.pem\"",
                &format!("client_ca = \"/ca.pem\"\ndeny = [\"{bad}\"]"),
            );
            let err = parse(&text).expect_err(bad).to_string();
            assert!(err.contains("tls.deny"), "{bad}: {err}");
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn no_sites_is_refused() {
        let text = MINIMAL.replace(
            "[sites.branch-042]\nallow = [\"orders\", \"telemetry\\\\..*\"]",
            "",
        );
        let err = parse(&text).expect_err("no sites").to_string();
        assert!(err.contains("sites"), "{err}");
    }
}

#[cfg(test)]
mod packaged {
    /// The commented example shipped in packages must stay valid.
    #[test]
    fn packaged_example_config_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/relay.toml");
        let loaded = super::load(&path).expect("packaging/relay.toml must load");
        assert!(loaded.acl.site("branch-042").is_some());
        // The example spells out every limit with its default value.
        let text = std::fs::read_to_string(&path).expect("read");
        let defaults = super::LimitsConfig::default();
        for (key, value) in [
            ("max_connections", defaults.max_connections.to_string()),
            (
                "max_connections_per_site",
                defaults.max_connections_per_site.to_string(),
            ),
            ("max_handshakes", defaults.max_handshakes.to_string()),
            (
                "max_streams_per_connection",
                defaults.max_streams_per_connection.to_string(),
            ),
            (
                "max_records_per_batch",
                defaults.max_records_per_batch.to_string(),
            ),
            (
                "max_headers_per_record",
                defaults.max_headers_per_record.to_string(),
            ),
        ] {
            assert!(
                text.contains(&format!("{key} = {value}")),
                "{key} = {value}"
            );
        }
        let limits = &loaded.config.limits;
        assert_eq!(limits.frame_limits(), defaults.frame_limits());
        assert_eq!(limits.batch_limits(), defaults.batch_limits());
        assert_eq!(limits.read_timeout, defaults.read_timeout);
        assert_eq!(limits.hello_timeout, defaults.hello_timeout);
        assert_eq!(limits.handshake_timeout, defaults.handshake_timeout);
        assert_eq!(limits.idle_timeout, defaults.idle_timeout);
    }
}
