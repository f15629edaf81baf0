//! What the relay knows about every site it has seen: sessions, throughput, and the state
//! each agent reports in its heartbeats (lag, spool fill, losses). Exported as metrics and as
//! `/status` for `spoke-relay sites`.
//!
//! This is a view, not state the relay depends on: a restarted relay starts empty and fills
//! in as agents connect and send heartbeats.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use spoke_proto::Heartbeat;

type Labels = Vec<(String, String)>;

/// Reasons for `spoke_relay_rejected_total{reason}`.
pub mod reject {
    /// Handshake: the peer presented no client certificate.
    pub const NO_CERT: &str = "no_cert";
    /// Handshake: the certificate does not chain to `tls.client_ca`.
    pub const UNKNOWN_CA: &str = "unknown_ca";
    /// Handshake: the certificate has expired (or is not valid yet).
    pub const EXPIRED: &str = "expired";
    /// The certificate is on `tls.deny`: at the handshake, or a session closed by a reload.
    pub const DENIED: &str = "denied";
    /// Handshake failed otherwise: wrong ALPN, wrong key usage, malformed TLS, ...
    pub const HANDSHAKE: &str = "handshake";
    /// Handshake not finished within `limits.handshake_timeout`.
    pub const HANDSHAKE_TIMEOUT: &str = "handshake_timeout";
    /// `limits.max_handshakes` handshakes were already in progress.
    pub const TOO_MANY_HANDSHAKES: &str = "too_many_handshakes";
    /// `limits.max_connections` connections were already open.
    pub const TOO_MANY_CONNECTIONS: &str = "too_many_connections";
    /// `limits.max_connections_per_site` connections of the certificate's site were open.
    pub const TOO_MANY_SITE_CONNECTIONS: &str = "too_many_site_connections";
    /// Certificate without exactly one DNS name.
    pub const IDENTITY: &str = "identity";
    /// No `[sites.NAME]` table for the certificate's site.
    pub const UNKNOWN_SITE: &str = "unknown_site";
    /// `Hello` names another site than the certificate.
    pub const SITE_MISMATCH: &str = "site_mismatch";
    /// Malformed frames, bad batches, unexpected frames, no common version.
    pub const PROTOCOL: &str = "protocol";
    /// No `Hello` within `limits.hello_timeout`, or no bytes within `limits.read_timeout`.
    pub const TIMEOUT: &str = "timeout";
    /// A batch for a topic the site's ACL does not allow.
    pub const NOT_ALLOWED: &str = "not_allowed";

    /// Every reason, so that each series exists from the start.
    pub const ALL: [&str; 15] = [
        NO_CERT,
        UNKNOWN_CA,
        EXPIRED,
        DENIED,
        HANDSHAKE,
        HANDSHAKE_TIMEOUT,
        TOO_MANY_HANDSHAKES,
        TOO_MANY_CONNECTIONS,
        TOO_MANY_SITE_CONNECTIONS,
        IDENTITY,
        UNKNOWN_SITE,
        SITE_MISMATCH,
        PROTOCOL,
        TIMEOUT,
        NOT_ALLOWED,
    ];
}

#[derive(Debug, Default)]
struct SiteState {
    sessions: u32,
    last_seen_ms: u64,
    records: u64,
    /// The last heartbeat, without its per-partition lag list (a peer decides its length).
    heartbeat: Option<Heartbeat>,
    /// That list's sum.
    lag_records: u64,
}

#[derive(Debug)]
pub struct Fleet {
    sites: Mutex<BTreeMap<String, SiteState>>,
    pub registry: Registry,
    sites_connected: Gauge,
    records: Family<Labels, Counter>,
    dictionary_batches: Counter,
    rejected: Family<Labels, Counter>,
    dead_lettered: Family<Labels, Counter>,
    site_lag: Family<Labels, Gauge>,
    site_spool_bytes: Family<Labels, Gauge>,
    site_oldest_unacked: Family<Labels, Gauge<f64, AtomicU64>>,
    site_lost: Family<Labels, Gauge>,
}

/// One row of `spoke-relay sites`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteStatus {
    pub site: String,
    pub connected: bool,
    pub last_seen_ms: u64,
    pub records: u64,
    pub records_per_s: u64,
    pub lag_records: u64,
    pub spool_bytes: u64,
    pub spool_max_bytes: u64,
    pub oldest_unacked_seconds: f64,
    pub lost_records: u64,
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

impl Fleet {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let fleet = Fleet {
            sites: Mutex::new(BTreeMap::new()),
            sites_connected: Gauge::default(),
            records: Family::default(),
            dictionary_batches: Counter::default(),
            rejected: Family::default(),
            dead_lettered: Family::default(),
            site_lag: Family::default(),
            site_spool_bytes: Family::default(),
            site_oldest_unacked: Family::default(),
            site_lost: Family::default(),
            registry: Registry::default(),
        };
        // prometheus-client appends `_total` to counters.
        registry.register(
            "spoke_relay_sites_connected",
            "Sites with at least one session on this relay",
            fleet.sites_connected.clone(),
        );
        registry.register(
            "spoke_relay_records",
            "Records this relay confirmed in the hub, by site",
            fleet.records.clone(),
        );
        registry.register(
            "spoke_relay_dictionary_batches",
            "Batches decoded with a zstd dictionary the agent sent (protocol version 2)",
            fleet.dictionary_batches.clone(),
        );
        registry.register(
            "spoke_relay_rejected",
            "Connections, sessions and batches refused, by reason",
            fleet.rejected.clone(),
        );
        registry.register(
            "spoke_relay_dead_letter_records",
            "Records the hub refuses, put in the dead-letter topic, by reason",
            fleet.dead_lettered.clone(),
        );
        registry.register(
            "spoke_relay_site_lag_records",
            "Records at the site not yet in the hub (from heartbeats)",
            fleet.site_lag.clone(),
        );
        registry.register(
            "spoke_relay_site_spool_bytes",
            "Bytes in the site's spool (from heartbeats)",
            fleet.site_spool_bytes.clone(),
        );
        registry.register(
            "spoke_relay_site_oldest_unacked_seconds",
            "Age of the site's oldest unacknowledged chunk (from heartbeats)",
            fleet.site_oldest_unacked.clone(),
        );
        registry.register(
            "spoke_relay_site_lost_records",
            "Records the site reports lost (from heartbeats)",
            fleet.site_lost.clone(),
        );
        // Every reason exists from the start at 0, so `increase()` alerts see the first one.
        for reason in reject::ALL {
            drop(
                fleet
                    .rejected
                    .get_or_create(&vec![("reason".to_owned(), reason.to_owned())]),
            );
        }
        for reason in crate::dead_letter::reason::ALL {
            drop(
                fleet
                    .dead_lettered
                    .get_or_create(&vec![("reason".to_owned(), reason.to_string())]),
            );
        }
        Fleet { registry, ..fleet }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SiteState>> {
        // A view of last-seen values: a panic elsewhere cannot leave it inconsistent.
        self.sites
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn site_labels(site: &str) -> Labels {
        vec![("site".to_owned(), site.to_owned())]
    }

    pub fn rejected(&self, reason: &str) {
        self.rejected
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    /// Records the hub refused and the relay put in the dead-letter topic.
    pub fn dead_lettered(&self, reason: &str, records: u64) {
        self.dead_lettered
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc_by(records);
    }

    pub fn rejected_count(&self, reason: &str) -> u64 {
        self.rejected
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .get()
    }

    /// Marks a session of `site` as open until the guard is dropped.
    pub fn session(self: &Arc<Self>, site: &str) -> SessionGuard {
        let mut sites = self.lock();
        let state = sites.entry(site.to_owned()).or_default();
        state.sessions += 1;
        state.last_seen_ms = now_ms();
        self.sites_connected.set(connected(&sites));
        SessionGuard {
            fleet: self.clone(),
            site: site.to_owned(),
        }
    }

    /// Counts a batch decoded with a dictionary.
    pub fn dictionary_batch(&self) {
        self.dictionary_batches.inc();
    }

    pub fn records(&self, site: &str, count: u64) {
        self.records
            .get_or_create(&Self::site_labels(site))
            .inc_by(count);
        if let Some(state) = self.lock().get_mut(site) {
            state.records += count;
            state.last_seen_ms = now_ms();
        }
    }

    pub fn heartbeat(&self, site: &str, mut heartbeat: Heartbeat) {
        let labels = Self::site_labels(site);
        // Saturating: the values come from the peer, and an overflow must not panic.
        let lag = heartbeat
            .lag
            .iter()
            .fold(0u64, |sum, p| sum.saturating_add(p.lag_records));
        heartbeat.lag = Vec::new();
        self.site_lag.get_or_create(&labels).set(clamp(lag));
        self.site_spool_bytes
            .get_or_create(&labels)
            .set(clamp(heartbeat.spool_bytes));
        self.site_oldest_unacked
            .get_or_create(&labels)
            .set(heartbeat.oldest_unacked_ms as f64 / 1000.0);
        self.site_lost
            .get_or_create(&labels)
            .set(clamp(heartbeat.lost_records));
        if let Some(state) = self.lock().get_mut(site) {
            state.last_seen_ms = now_ms();
            state.heartbeat = Some(heartbeat);
            state.lag_records = lag;
        }
    }

    pub fn snapshot(&self) -> Vec<SiteStatus> {
        self.lock()
            .iter()
            .map(|(site, state)| {
                let hb = state.heartbeat.as_ref();
                SiteStatus {
                    site: site.clone(),
                    connected: state.sessions > 0,
                    last_seen_ms: state.last_seen_ms,
                    records: state.records,
                    records_per_s: hb.map_or(0, |h| h.records_per_s),
                    lag_records: state.lag_records,
                    spool_bytes: hb.map_or(0, |h| h.spool_bytes),
                    spool_max_bytes: hb.map_or(0, |h| h.spool_max_bytes),
                    oldest_unacked_seconds: hb.map_or(0.0, |h| h.oldest_unacked_ms as f64 / 1000.0),
                    lost_records: hb.map_or(0, |h| h.lost_records),
                }
            })
            .collect()
    }
}

fn connected(sites: &BTreeMap<String, SiteState>) -> i64 {
    clamp(sites.values().filter(|s| s.sessions > 0).count() as u64)
}

fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Closes a site's session in the fleet view when the session task ends, however it ends.
#[derive(Debug)]
pub struct SessionGuard {
    fleet: Arc<Fleet>,
    site: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut sites = self.fleet.lock();
        if let Some(state) = sites.get_mut(&self.site) {
            state.sessions = state.sessions.saturating_sub(1);
            state.last_seen_ms = now_ms();
        }
        self.fleet.sites_connected.set(connected(&sites));
    }
}

// The one wall clock of spoke-process, under the path the relay's modules and binary use.
pub use spoke_process::clock::now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_lag_saturates_and_its_list_is_not_kept() {
        let fleet = Arc::new(Fleet::new());
        let _session = fleet.session("branch-1");
        let lag = |partition| spoke_proto::PartitionLag {
            topic: "orders".into(),
            partition,
            lag_records: u64::MAX,
        };
        fleet.heartbeat(
            "branch-1",
            Heartbeat {
                sent_at_ms: 0,
                spool_bytes: 0,
                spool_max_bytes: 0,
                oldest_unacked_ms: 0,
                lost_records: 0,
                records_per_s: 0,
                lag: vec![lag(0), lag(1)],
            },
        );
        let status = fleet.snapshot();
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].lag_records, u64::MAX);
        let sites = fleet.lock();
        let kept = sites
            .get("branch-1")
            .and_then(|s| s.heartbeat.as_ref())
            .map(|h| h.lag.len());
        assert_eq!(kept, Some(0));
    }

    #[test]
    fn every_reject_reason_is_exported_from_the_start() {
        let fleet = Fleet::new();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &fleet.registry).expect("encode");
        for reason in reject::ALL {
            assert!(
                text.contains(&format!(
                    "spoke_relay_rejected_total{{reason=\"{reason}\"}} 0"
                )),
                "{reason} missing:\n{text}"
            );
        }
    }
}
