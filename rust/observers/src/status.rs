//! The status server: `GET /health` and `GET /metrics` on `[observers] http_port`, and the
//! operator console (`/`, `/api/`) when the engine runs one (see [`crate::console`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::console::Console;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// What `/health` reports. Transports implement it; `healthy == false` answers 503.
pub trait HealthSource: Send + Sync {
    /// The `observers` object of the health JSON (`transport`, `connected`, …).
    fn observers(&self) -> Value;
    /// The `databases` object, if a database is configured.
    fn databases(&self) -> Option<Value> {
        None
    }
    fn healthy(&self) -> bool;
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<dyn HealthSource>,
}

pub struct StatusServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusServer {
    /// Binds `host:port` (port 0 picks a free port) and serves on the current runtime.
    pub async fn start(
        host: &str,
        port: u16,
        metrics: Arc<Metrics>,
        health: Arc<dyn HealthSource>,
        console: Option<Console>,
    ) -> Result<StatusServer> {
        let listener = TcpListener::bind((host, port)).await.map_err(|e| {
            Error::Transport(format!(
                "cannot listen on {host}:{port} for /health and /metrics (observers.http_port): {e}"
            ))
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Transport(e.to_string()))?;
        let mut app = Router::new()
            .route("/health", get(health_handler))
            .route("/metrics", get(metrics_handler))
            .with_state(AppState { metrics, health });
        if let Some(console) = console {
            app = app.merge(console.routes());
        }
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!("http server stopped: {e}");
            }
        });
        Ok(StatusServer {
            addr,
            shutdown: Some(tx),
            task,
        })
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
    }
}

async fn health_handler(State(state): State<AppState>) -> impl IntoResponse {
    let healthy = state.health.healthy();
    let mut body = json!({
        "status": if healthy { "ok" } else { "unavailable" },
        "observers": state.health.observers(),
    });
    if let Some(dbs) = state.health.databases() {
        body["databases"] = dbs;
    }
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
