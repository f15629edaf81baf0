//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz`, `/status` (JSON).
//!
//! Healthy means able to do the job: the hub answered a metadata request within the last
//! 30 s. Connected sites do not matter (a relay with no sites is idle, not broken).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::text::encode;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::fleet::{Fleet, SiteStatus};

const STALE_MS: u64 = 30_000;

/// What `/status` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayStatus {
    pub relay: String,
    pub hub_reachable: bool,
    pub sites: Vec<SiteStatus>,
}

#[derive(Debug)]
pub struct Admin {
    pub fleet: Arc<Fleet>,
    pub relay_name: String,
    /// Unix ms of the hub's last successful metadata answer.
    pub hub_seen_ms: AtomicU64,
}

impl Admin {
    fn hub_reachable(&self) -> bool {
        crate::fleet::now_ms().saturating_sub(self.hub_seen_ms.load(Ordering::Relaxed)) <= STALE_MS
    }
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    admin: Arc<Admin>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
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
    let mut text = String::new();
    match encode(&mut text, &admin.fleet.registry) {
        Ok(()) => (
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
    if admin.hub_reachable() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "hub has not answered for over 30 s\n",
        )
            .into_response()
    }
}

async fn status(State(admin): State<Arc<Admin>>) -> Json<RelayStatus> {
    Json(RelayStatus {
        relay: admin.relay_name.clone(),
        hub_reachable: admin.hub_reachable(),
        sites: admin.fleet.snapshot(),
    })
}
