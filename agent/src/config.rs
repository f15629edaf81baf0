//! agent.toml: parsed with unknown keys rejected, then validated once, so `check` and `run`
//! refuse exactly the same files. Defaults live here and nowhere else.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use crate::select::TopicSelector;
use spoke_kafka::security::{self as kafka_security, KafkaProperties, KafkaSasl, KafkaTls};

pub use spoke_process::config_file::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This site's name; must equal the DNS name in the client certificate.
    pub site: String,
    pub source: SourceConfig,
    pub spool: SpoolConfig,
    pub relay: UpstreamConfig,
    #[serde(default)]
    pub ship: ShipConfig,
    #[serde(default)]
    pub admin: AdminConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The local Kafka cluster.
    pub bootstrap: String,
    /// Topics to replicate: exact names or regexes, anchored at both ends.
    pub include: Vec<String>,
    /// Topics never replicated, even when included.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Ship records that already carry `spoke-origin` (chained topologies).
    #[serde(default)]
    pub forward_replicated: bool,
    /// librdkafka consumer properties passed through; values may name environment
    /// variables (`${NAME}`).
    #[serde(default)]
    pub kafka: BTreeMap<String, String>,
    /// TLS to the local brokers.
    #[serde(default)]
    pub tls: Option<KafkaTls>,
    /// SASL authentication to the local brokers.
    #[serde(default)]
    pub sasl: Option<KafkaSasl>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    pub path: PathBuf,
    #[serde(default = "default_spool_max")]
    pub max_bytes: ByteSize,
    #[serde(default)]
    pub when_full: WhenFull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Stop reading the local broker; its retention is the next buffer.
    #[default]
    Pause,
    /// Delete the oldest spooled records and count them as lost.
    DropOldest,
}

/// `ship.dictionary`: zstd dictionaries for small chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DictionaryMode {
    /// Train one per topic whose records average under 1 KiB, from its first records, and
    /// compress small chunks with it (sent to relays that speak protocol version 2).
    #[default]
    Auto,
    /// Never; dictionaries no spooled chunk needs any more are deleted.
    Off,
}

/// The `[relay]` section: the relays this agent ships to, and how it proves itself to them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `host:port` of each relay, tried in turn.
    pub endpoints: Vec<String>,
    /// Name the relay certificate must carry; default: the endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Wait after the last batch sent to one relay before opening a session with another, so a
    /// relay that lost us has stopped producing (fencing without broker transactions).
    #[serde(default = "default_fence_delay", with = "humantime_serde")]
    pub fence_delay: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipConfig {
    /// A partition's chunk is closed once its uncompressed records reach this size.
    #[serde(default = "default_batch_max")]
    pub batch_max_bytes: ByteSize,
    /// ... or once its first record waited this long.
    #[serde(default = "default_linger", with = "humantime_serde")]
    pub linger: Duration,
    /// ... or this long while the link is behind (see `zstd_level_backlog`) and the oldest
    /// chunk has waited over 2 s (never shorter than `linger`): records then wait for the
    /// backlog anyway, and fewer, larger chunks compress better and keep more records in the
    /// window, so a backlog drains faster.
    #[serde(default = "default_linger_backlog", with = "humantime_serde")]
    pub linger_backlog: Duration,
    /// zstd level of chunks while the link keeps up ...
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// ... and while it is behind (its congestion window held the shipper back most of the
    /// last second or so, or no relay has been heard from for 2 s and the oldest chunk waited
    /// as long), where the CPU would otherwise wait for the link. Dictionary chunks keep
    /// `zstd_level`: they are small ones, written while the link keeps up.
    #[serde(default = "default_zstd_level_backlog")]
    pub zstd_level_backlog: i32,
    /// Batches sent but not yet acknowledged ...
    #[serde(default = "default_window")]
    pub window: u32,
    /// ... and their bytes on the wire, whichever bound is reached first. The relay confirms a
    /// batch only once the hub has it, so a link is kept busy only if this covers the link
    /// rate × (RTT + a loss recovery + the hub's write time); see docs/benchmarks.md.
    #[serde(default = "default_window_bytes")]
    pub window_bytes: ByteSize,
    /// QUIC streams batches are spread over, each partition on one of them, so that a lost
    /// packet holds up only the partitions of its stream. A relay that allows fewer (its
    /// `limits.max_streams_per_connection` counts the control stream too) gets fewer.
    #[serde(default = "default_streams")]
    pub streams: u32,
    /// Bytes per second on the wire; 0 = unlimited.
    #[serde(default = "default_bandwidth")]
    pub max_bandwidth: ByteSize,
    /// zstd dictionaries for small chunks: `"auto"` or `"off"`.
    #[serde(default)]
    pub dictionary: DictionaryMode,
}

impl Default for ShipConfig {
    fn default() -> Self {
        Self {
            batch_max_bytes: default_batch_max(),
            linger: default_linger(),
            linger_backlog: default_linger_backlog(),
            zstd_level: default_zstd_level(),
            zstd_level_backlog: default_zstd_level_backlog(),
            window: default_window(),
            window_bytes: default_window_bytes(),
            streams: default_streams(),
            max_bandwidth: default_bandwidth(),
            dictionary: DictionaryMode::default(),
        }
    }
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

fn default_spool_max() -> ByteSize {
    ByteSize::gib(10)
}
fn default_fence_delay() -> Duration {
    Duration::from_secs(15)
}
fn default_batch_max() -> ByteSize {
    ByteSize::mib(1)
}
fn default_linger() -> Duration {
    Duration::from_millis(20)
}
fn default_linger_backlog() -> Duration {
    Duration::from_millis(500)
}
fn default_zstd_level() -> i32 {
    3
}
fn default_zstd_level_backlog() -> i32 {
    6
}
fn default_window() -> u32 {
    256
}
fn default_window_bytes() -> ByteSize {
    ByteSize::mib(16)
}
fn default_streams() -> u32 {
    4
}
fn default_bandwidth() -> ByteSize {
    ByteSize::b(0)
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

/// A validated configuration plus what validation compiled from it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub config: AgentConfig,
    pub selector: TopicSelector,
    /// (host:port, TLS server name) per endpoint.
    pub endpoints: Vec<Endpoint>,
    /// The local cluster's client properties: `[source.kafka]` with `[source.tls]` and
    /// `[source.sasl]`, secrets read.
    pub source_kafka: KafkaProperties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: String,
    pub server_name: String,
}

pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let config: AgentConfig = spoke_process::config_file::read(path)?;
    let invalid =
        |key: &str, reason: String| spoke_process::config_file::invalid(path, key, reason);
    validate_site(&config.site).map_err(|reason| invalid("site", reason))?;
    if config.source.bootstrap.trim().is_empty() {
        return Err(invalid("source.bootstrap", "must not be empty".into()));
    }
    if config.source.include.is_empty() {
        return Err(invalid(
            "source.include",
            "names no topic; list the topics (or anchored regexes) to replicate".into(),
        ));
    }
    let selector = TopicSelector::new(&config.source.include, &config.source.exclude)
        .map_err(|(key, reason)| invalid(key, reason))?;
    let source_kafka = kafka_security::resolve(
        &config.source.kafka,
        config.source.tls.as_ref(),
        config.source.sasl.as_ref(),
        &|name| std::env::var(name).ok(),
    )
    .map_err(|e| invalid(&format!("source.{}", e.key), e.reason))?;
    if config.relay.endpoints.is_empty() {
        return Err(invalid(
            "relay.endpoints",
            "at least one relay is required".into(),
        ));
    }
    let mut endpoints = Vec::new();
    for address in &config.relay.endpoints {
        let host = endpoint_host(address).ok_or_else(|| {
            invalid(
                "relay.endpoints",
                format!("{address:?} is not host:port (IPv6: [addr]:port)"),
            )
        })?;
        endpoints.push(Endpoint {
            address: address.clone(),
            server_name: config.relay.server_name.clone().unwrap_or(host),
        });
    }
    if config.ship.window == 0 {
        return Err(invalid("ship.window", "must be at least 1".into()));
    }
    if !(1..=64).contains(&config.ship.streams) {
        return Err(invalid("ship.streams", "must be between 1 and 64".into()));
    }
    if config.ship.window_bytes.as_u64() == 0 {
        return Err(invalid(
            "ship.window_bytes",
            "must be at least 1 byte".into(),
        ));
    }
    for (key, level) in [
        ("ship.zstd_level", config.ship.zstd_level),
        ("ship.zstd_level_backlog", config.ship.zstd_level_backlog),
    ] {
        if !(1..=22).contains(&level) {
            return Err(invalid(key, "must be between 1 and 22".into()));
        }
    }
    if config.ship.batch_max_bytes.as_u64() == 0 || config.ship.batch_max_bytes > ByteSize::mib(16)
    {
        return Err(invalid(
            "ship.batch_max_bytes",
            "must be between 1 byte and 16MiB (the frame limit)".into(),
        ));
    }
    if config.spool.max_bytes < config.ship.batch_max_bytes {
        return Err(invalid(
            "spool.max_bytes",
            "must hold at least one batch (ship.batch_max_bytes)".into(),
        ));
    }
    Ok(Loaded {
        path: path.to_owned(),
        config,
        selector,
        endpoints,
        source_kafka,
    })
}

/// Keys a SIGHUP cannot apply to a running agent (it keeps the old values and says so).
pub fn restart_required(old: &AgentConfig, new: &AgentConfig) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if old.site != new.site {
        fields.push("site");
    }
    if old.source.bootstrap != new.source.bootstrap || old.source.kafka != new.source.kafka {
        fields.push("source.bootstrap / source.kafka");
    }
    if old.spool.path != new.spool.path {
        fields.push("spool.path");
    }
    if old.relay.endpoints != new.relay.endpoints
        || old.relay.server_name != new.relay.server_name
        || old.relay.ca != new.relay.ca
        || old.relay.cert != new.relay.cert
        || old.relay.key != new.relay.key
    {
        fields.push("relay");
    }
    if old.admin.listen != new.admin.listen {
        fields.push("admin.listen");
    }
    fields
}

/// Same rule as the relay's certificate names: a DNS name that is also safe in topic names.
fn validate_site(site: &str) -> Result<(), String> {
    let ok_chars = site
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if site.is_empty() || site.len() > 63 || !ok_chars {
        return Err(format!(
            "{site:?}: 1 to 63 lowercase letters, digits, '-' or '.'"
        ));
    }
    Ok(())
}

/// The host part of `host:port` / `[v6]:port`, if the port is a number.
fn endpoint_host(address: &str) -> Option<String> {
    let (host, port) = address.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then(|| host.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const MINIMAL: &str = r#"
site = "branch-042"
[source]
bootstrap = "127.0.0.1:9092"
include = ["orders", "telemetry\\..*"]
[spool]
path = "/tmp/spool"
[relay]
endpoints = ["relay-a.example:7000", "[::1]:7001"]
ca = "/ca.pem"
cert = "/site.pem"
key = "/site.key"
"#;

    fn parse(text: &str) -> Result<Loaded, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).expect("write");
        load(&path)
    }

    #[test]
    fn defaults_match_the_design_document() {
        let loaded = parse(MINIMAL).expect("valid");
        let c = &loaded.config;
        assert_eq!(c.spool.max_bytes, ByteSize::gib(10));
        assert_eq!(c.spool.when_full, WhenFull::Pause);
        assert_eq!(c.relay.fence_delay, Duration::from_secs(15));
        assert_eq!(c.ship.batch_max_bytes, ByteSize::mib(1));
        assert_eq!(c.ship.linger, Duration::from_millis(20));
        assert_eq!(c.ship.linger_backlog, Duration::from_millis(500));
        assert_eq!(c.ship.zstd_level, 3);
        assert_eq!(c.ship.zstd_level_backlog, 6);
        assert_eq!(c.ship.window, 256);
        assert_eq!(c.ship.window_bytes, ByteSize::mib(16));
        assert_eq!(c.ship.streams, 4);
        assert_eq!(c.ship.max_bandwidth.as_u64(), 0);
        assert_eq!(c.ship.dictionary, DictionaryMode::Auto);
        assert_eq!(c.admin.listen.port(), 9464);
        assert_eq!(loaded.endpoints[0].server_name, "relay-a.example");
        assert_eq!(loaded.endpoints[1].server_name, "::1");
    }

    #[test]
    fn sizes_and_durations_parse_human_forms() {
        let text = MINIMAL.replace(
            "[spool]\npath = \"/tmp/spool\"",
            "[spool]\npath = \"/tmp/spool\"\nmax_bytes = \"2GiB\"\nwhen_full = \"drop-oldest\"\n[ship]\nlinger = \"5ms\"\nbatch_max_bytes = \"256KiB\"",
        );
        let loaded = parse(&text).expect("valid");
        assert_eq!(loaded.config.spool.max_bytes, ByteSize::gib(2));
        assert_eq!(loaded.config.spool.when_full, WhenFull::DropOldest);
        assert_eq!(loaded.config.ship.linger, Duration::from_millis(5));
        assert_eq!(loaded.config.ship.batch_max_bytes, ByteSize::kib(256));
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let text = MINIMAL.replace("[spool]", "[spool]\nmax_byte = \"1GiB\"");
        let err = parse(&text).expect_err("unknown key").to_string();
        assert!(err.contains("agent.toml"), "{err}");
        assert!(err.contains("max_byte"), "{err}");
    }

    #[test]
    fn missing_required_key_is_named() {
        let text = MINIMAL.replace("site = \"branch-042\"", "");
        let err = parse(&text).expect_err("missing site").to_string();
        assert!(err.contains("site"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (from, to, key) in [
            (
                "include = [\"orders\", \"telemetry\\\\..*\"]",
                "include = []",
                "source.include",
            ),
            (
                "include = [\"orders\",",
                "include = [\"(orders\",",
                "source.include",
            ),
            (
                "endpoints = [\"relay-a.example:7000\", \"[::1]:7001\"]",
                "endpoints = [\"relay\"]",
                "relay.endpoints",
            ),
            ("site = \"branch-042\"", "site = \"Branch 42\"", "site"),
            (
                "key = \"/site.key\"",
                "key = \"/site.key\"\n[ship]\nstreams = 0",
                "ship.streams",
            ),
            (
                "key = \"/site.key\"",
                "key = \"/site.key\"\n[ship]\nstreams = 65",
                "ship.streams",
            ),
            (
                "key = \"/site.key\"",
                "key = \"/site.key\"\n[ship]\nzstd_level_backlog = 23",
                "ship.zstd_level_backlog",
            ),
        ] {
            let text = MINIMAL.replace(from, to);
            assert_ne!(text, MINIMAL, "{from}");
            let err = parse(&text).expect_err(key).to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }
}

#[cfg(test)]
mod packaged {
    /// The commented example shipped in packages must stay valid.
    #[test]
    fn packaged_example_config_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agent.toml");
        let loaded = super::load(&path).expect("packaging/agent.toml must load");
        assert_eq!(loaded.config.site, "branch-042");
    }
}
