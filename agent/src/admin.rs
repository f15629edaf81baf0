//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz`, `/status` (JSON).
//!
//! Healthy means doing the job: the local broker answered a metadata request in the last
//! 30 s, and the agent either has a relay session or still has spool room to ride out the
//! outage (below 90% full). An agent that is disconnected but spooling is healthy; one that
//! cannot read its broker, or is about to pause or drop, is not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Loaded;
use crate::progress::{AgentStatus, Progress};
use crate::spool::Spool;

const STALE_MS: u64 = 30_000;

type Labels = Vec<(String, String)>;

struct Admin {
    live: watch::Receiver<Arc<Loaded>>,
    spool: Arc<dyn Spool>,
    progress: Arc<Progress>,
    registry: Registry,
    spool_bytes: Gauge,
    lag: Family<Labels, Gauge>,
    oldest_unacked: Gauge<f64, AtomicU64>,
    relay_connected: Gauge,
    link_bottleneck: Gauge,
}

impl Admin {
    fn new(
        live: watch::Receiver<Arc<Loaded>>,
        spool: Arc<dyn Spool>,
        progress: Arc<Progress>,
    ) -> Self {
        let mut registry = Registry::default();
        let spool_bytes = Gauge::default();
        let lag = Family::<Labels, Gauge>::default();
        let oldest_unacked = Gauge::<f64, AtomicU64>::default();
        let relay_connected = Gauge::default();
        let link_bottleneck = Gauge::default();
        // prometheus-client appends `_total` to counters.
        registry.register(
            "spoke_agent_records_spooled",
            "Records durably written to the spool",
            progress.records_spooled.clone(),
        );
        registry.register(
            "spoke_agent_chunks_spooled",
            "Chunks durably written to the spool",
            progress.chunks_spooled.clone(),
        );
        registry.register(
            "spoke_agent_records_acked",
            "Records the relay confirmed in the hub",
            progress.records_acked.clone(),
        );
        registry.register(
            "spoke_agent_lost_records",
            "Records that will never reach the hub, by reason",
            progress.lost.clone(),
        );
        registry.register(
            "spoke_agent_source_resets",
            "Source partitions found to be a new log (topic recreated, or records lost by the local broker)",
            progress.source_resets.clone(),
        );
        registry.register(
            "spoke_agent_wire_bytes",
            "Frame bytes sent to relays",
            progress.wire_bytes.clone(),
        );
        registry.register(
            "spoke_agent_spool_bytes",
            "Bytes held in the spool",
            spool_bytes.clone(),
        );
        registry.register(
            "spoke_agent_lag_records",
            "Local high watermark minus the first offset not yet in the hub",
            lag.clone(),
        );
        registry.register(
            "spoke_agent_oldest_unacked_seconds",
            "Age of the oldest spooled, unacknowledged chunk",
            oldest_unacked.clone(),
        );
        registry.register(
            "spoke_agent_relay_connected",
            "1 while a relay session is up",
            relay_connected.clone(),
        );
        registry.register(
            "spoke_agent_link_bottleneck",
            "1 while the link is what holds shipping back: the congestion window, not a lack of data, limited it most of the last second or so",
            link_bottleneck.clone(),
        );
        Self {
            live,
            spool,
            progress,
            registry,
            spool_bytes,
            lag,
            oldest_unacked,
            relay_connected,
            link_bottleneck,
        }
    }

    fn status(&self) -> AgentStatus {
        let loaded = self.live.borrow().clone();
        self.progress.snapshot(
            &loaded.config.site,
            self.spool.as_ref(),
            loaded.config.spool.max_bytes.as_u64(),
        )
    }

    fn metrics(&self) -> Result<String, std::fmt::Error> {
        let status = self.status();
        self.spool_bytes
            .set(i64::try_from(status.spool_bytes).unwrap_or(i64::MAX));
        self.oldest_unacked.set(status.oldest_unacked_seconds);
        self.relay_connected.set(i64::from(status.relay_connected));
        self.link_bottleneck.set(i64::from(
            self.progress.link_is_bottleneck(std::time::Instant::now()),
        ));
        self.lag.clear();
        for p in &status.partitions {
            let labels = vec![
                ("topic".to_owned(), p.topic.clone()),
                ("partition".to_owned(), p.partition.to_string()),
            ];
            self.lag
                .get_or_create(&labels)
                .set(i64::try_from(p.lag).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        Ok(text)
    }

    fn health(&self) -> Vec<String> {
        let now = crate::now_ms();
        let status = self.status();
        let mut problems = Vec::new();
        let seen = self.progress.local_broker_seen_ms.load(Ordering::Relaxed);
        if now.saturating_sub(seen) > STALE_MS {
            problems.push("local broker has not answered for over 30 s".to_owned());
        }
        let nearly_full =
            status.spool_bytes.saturating_mul(10) >= status.spool_max_bytes.saturating_mul(9);
        if !status.relay_connected && nearly_full {
            problems.push("no relay session and the spool is over 90% full".to_owned());
        }
        problems
    }
}

/// Serves until `shutdown`; the listener is bound by the caller so a taken port fails start-up.
pub async fn serve(
    listener: tokio::net::TcpListener,
    live: watch::Receiver<Arc<Loaded>>,
    spool: Arc<dyn Spool>,
    progress: Arc<Progress>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let admin = Arc::new(Admin::new(live, spool, progress));
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .with_state(admin);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    match admin.metrics() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn healthz(State(admin): State<Arc<Admin>>) -> Response {
    let problems = admin.health();
    if problems.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", problems.join("\n")),
        )
            .into_response()
    }
}

async fn status(State(admin): State<Arc<Admin>>) -> Json<AgentStatus> {
    Json(admin.status())
}
