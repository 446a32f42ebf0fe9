//! The operator console: one static page at `/` and the JSON API under `/api/` it reads,
//! on the status server beside `/health` and `/metrics`.
//!
//! | Method and path | What |
//! |---|---|
//! | `GET /api/console` | version, whether mutations are enabled |
//! | `GET /api/observers` | each observer: entity, event, condition, actions and their counts |
//! | `GET /api/source` | the source's health and lag (change-log rows, slot WAL) |
//! | `GET /api/events?limit=` | the last events processed and each observer's outcome |
//! | `GET /api/dlq?q=&limit=` | dead letters, newest first, optionally searched |
//! | `GET /api/dlq/{id}` | one dead letter: event, attempts, last error |
//! | `POST /api/dlq/{id}/retry` | re-runs it (token) |
//! | `DELETE /api/dlq/{id}` | purges it (token) |
//! | `POST /api/dlq/retry` `{"ids": […]}` | re-runs several (token) |
//! | `POST /api/dlq/purge` `{"ids": […]}` or `{"all": true}` | purges several or all (token) |
//!
//! Reads are open, like `/health`; the server binds 127.0.0.1 unless `http_host` says
//! otherwise. Mutations need `Authorization: Bearer <token>`, the token being the value of
//! the variable `[observers] admin_token_env` names; without one they answer 403 (the console
//! is read-only). Every error is `{"error": "…"}` with its status code. Nothing here shows a
//! secret: actions are shown by their safe description, never their configuration.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::dlq::DlqEntry;
use crate::engine::Engine;
use crate::error::{DeadLetterErrorKind, Error};
use crate::metrics::Metrics;
use crate::runtime::DeadLetters;
use crate::status::HealthSource;

/// How many recent events an engine with a console keeps.
pub const RECENT_EVENTS: usize = 200;
/// The most entries one list or one bulk request handles.
const MAX_BATCH: usize = 1000;
/// The largest request body accepted (a bulk request of `MAX_BATCH` ids fits many times).
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Bulk retries run this many at a time.
const RETRY_CONCURRENCY: usize = 8;
/// A dead letter's error is cut to this many characters in lists (`/api/dlq/{id}` has it all).
const LISTED_ERROR_CHARS: usize = 300;

const INDEX_HTML: &str = include_str!("console/index.html");
const CONSOLE_JS: &str = include_str!("console/console.js");
const CONSOLE_CSS: &str = include_str!("console/console.css");

/// The page runs only its own script and talks only to this server; no page may frame it
/// (its buttons retry and purge).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// What the console reads and acts on.
pub struct Console {
    engine: Arc<Engine>,
    dead_letters: Arc<DeadLetters>,
    metrics: Arc<Metrics>,
    health: Arc<dyn HealthSource>,
    /// SHA-256 of the admin token: compared in constant time, whatever its length.
    admin_token: Option<[u8; 32]>,
}

impl Console {
    pub fn new(
        engine: Arc<Engine>,
        dead_letters: Arc<DeadLetters>,
        metrics: Arc<Metrics>,
        health: Arc<dyn HealthSource>,
        admin_token: Option<&str>,
    ) -> Console {
        Console {
            engine,
            dead_letters,
            metrics,
            health,
            admin_token: admin_token.map(digest),
        }
    }

    /// The page and the API, to merge into the status server's router.
    pub(crate) fn routes(self) -> Router {
        let api = Router::new()
            .route("/console", get(console_info))
            .route("/observers", get(observers))
            .route("/source", get(source))
            .route("/events", get(events))
            .route("/dlq", get(dlq_list))
            .route("/dlq/retry", post(dlq_retry_many))
            .route("/dlq/purge", post(dlq_purge_many))
            .route("/dlq/{id}", get(dlq_show).delete(dlq_delete))
            .route("/dlq/{id}/retry", post(dlq_retry_one))
            .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such API endpoint") })
            .method_not_allowed_fallback(|| async {
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method not allowed on this endpoint",
                )
            });
        Router::new()
            .route("/", get(|| page(INDEX_HTML, "text/html; charset=utf-8")))
            .route(
                "/console.js",
                get(|| page(CONSOLE_JS, "text/javascript; charset=utf-8")),
            )
            .route(
                "/console.css",
                get(|| page(CONSOLE_CSS, "text/css; charset=utf-8")),
            )
            .nest("/api", api)
            .with_state(Arc::new(self))
    }

    /// Mutations need the token: 403 when none is configured, 401 when it is missing or wrong.
    /// The entry a request that changes the queue names in its path (`/api/dlq/{id}…`),
    /// once the request may change it.
    fn authorized_entry(&self, headers: &HeaderMap, raw_id: &str) -> Result<u64, ApiError> {
        self.authorize(headers)?;
        entry_id(raw_id)
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = &self.admin_token else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "the console is read-only: set [observers] admin_token_env to the name of a \
                 variable holding a token to enable retry and purge",
            ));
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "this needs the admin token: send Authorization: Bearer <token>",
                )
            })?;
        if bool::from(digest(given.trim()).ct_eq(expected)) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the admin token is not the one configured",
            ))
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

type Shared = State<Arc<Console>>;

async fn page(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn console_info(State(console): Shared) -> Json<Value> {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "mutations": if console.admin_token.is_some() { "token" } else { "disabled" },
    }))
}

async fn observers(State(console): Shared) -> Json<Value> {
    Json(json!({
        "events_received": console.metrics.events_received.get(),
        "events_in_flight": console.metrics.events_in_flight.get(),
        "dlq_size": console.metrics.dlq_size.get(),
        "observers": console.engine.overview(),
    }))
}

async fn source(State(console): Shared) -> Json<Value> {
    let m = &console.metrics;
    let healthy = console.health.healthy();
    let mut body = json!({
        "status": if healthy { "ok" } else { "unavailable" },
        "source": console.health.observers(),
        "lag": {
            "changelog_rows": m.changelog_lag_rows.get(),
            "changelog_seconds": m.changelog_lag_seconds.get(),
            "slot_retained_wal_bytes": m.slot_retained_wal_bytes.get(),
            "slot_lag_bytes": m.slot_lag_bytes.get(),
        },
        "stalled": m.source_stalled.get() > 0,
    });
    if let Some(databases) = console.health.databases() {
        body["databases"] = databases;
    }
    Json(body)
}

async fn events(
    State(console): Shared,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let params = Params::parse(query.as_deref(), &["limit"])?;
    let limit = params.limit(RECENT_EVENTS)?;
    Ok(Json(json!({"events": console.engine.recent_events(limit)})))
}

async fn dlq_list(
    State(console): Shared,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let params = Params::parse(query.as_deref(), &["q", "limit"])?;
    let limit = params.limit(100)?;
    let text = params.get("q").unwrap_or_default();
    if text.chars().count() > 200 {
        return Err(ApiError::bad_request("q: at most 200 characters"));
    }
    let entries = console.dead_letters.search(text, limit).await?;
    let total = console.dead_letters.len().await?;
    Ok(Json(json!({
        "total": total,
        "entries": entries.iter().map(listed).collect::<Vec<_>>(),
    })))
}

/// An entry as lists show it: what failed and why, without the event's rows.
fn listed(entry: &DlqEntry) -> Value {
    json!({
        "id": entry.id,
        "origin": entry.origin.as_str(),
        "observer": entry.observer,
        "action": entry.action,
        "event_id": entry.event.id,
        "entity": entry.event.entity,
        "event": entry.event.event,
        "error": shortened(last_line(&entry.error), LISTED_ERROR_CHARS),
        "attempts": entry.attempts,
        "first_failed_at": entry.first_failed_at,
        "last_failed_at": entry.last_failed_at,
    })
}

async fn dlq_show(
    State(console): Shared,
    Path(id): Path<String>,
) -> Result<Json<DlqEntry>, ApiError> {
    let id = entry_id(&id)?;
    match console.dead_letters.get(id).await? {
        Some(entry) => Ok(Json(entry)),
        None => Err(not_found(id)),
    }
}

async fn dlq_retry_one(
    State(console): Shared,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let id = console.authorized_entry(&headers, &id)?;
    let delivered = retry(&console, id).await?;
    Ok(Json(retried(id, delivered, &console).await))
}

async fn dlq_delete(
    State(console): Shared,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let id = console.authorized_entry(&headers, &id)?;
    if console.dead_letters.remove(&[id]).await? == 0 {
        return Err(not_found(id));
    }
    tracing::info!("[console] purged dead-letter entry {id}");
    Ok(Json(json!({"removed": 1})))
}

/// `{"ids": […]}`; a purge may say `{"all": true}` instead.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Selection {
    #[serde(default)]
    ids: Vec<u64>,
    #[serde(default)]
    all: bool,
}

async fn dlq_retry_many(
    State(console): Shared,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    console.authorize(&headers)?;
    let selection = selection(body).await?;
    if selection.all {
        return Err(ApiError::bad_request(
            "all: a retry names its entries (ids); only a purge takes all",
        ));
    }
    let results: Vec<Value> = stream::iter(selection.ids)
        .map(|id| {
            let console = console.clone();
            async move {
                match retry(&console, id).await {
                    Ok(delivered) => retried(id, delivered, &console).await,
                    Err(e) => json!({"id": id, "status": e.status.as_u16(), "error": e.message}),
                }
            }
        })
        .buffered(RETRY_CONCURRENCY)
        .collect()
        .await;
    Ok(Json(json!({"results": results})))
}

async fn dlq_purge_many(
    State(console): Shared,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    console.authorize(&headers)?;
    let selection = selection(body).await?;
    let removed = match (selection.all, selection.ids.is_empty()) {
        (true, true) => console.dead_letters.purge().await?,
        (false, false) => console.dead_letters.remove(&selection.ids).await?,
        (true, false) => {
            return Err(ApiError::bad_request("give ids or all, not both"));
        }
        (false, true) => return Err(ApiError::bad_request("ids: name at least one entry")),
    };
    tracing::info!("[console] purged {removed} dead-letter entries");
    Ok(Json(json!({"removed": removed})))
}

/// Runs on a task of its own, so a client that goes away mid-retry does not cancel an
/// action halfway (which could deliver it and leave the entry for a second delivery).
async fn retry(console: &Arc<Console>, id: u64) -> Result<bool, ApiError> {
    let dead_letters = console.dead_letters.clone();
    let delivered = tokio::spawn(async move { dead_letters.retry(id).await })
        .await
        .map_err(|e| ApiError::internal(format!("the retry of entry {id} failed: {e}")))??;
    tracing::info!(
        "[console] retried dead-letter entry {id}: {}",
        if delivered {
            "delivered"
        } else {
            "failed again"
        }
    );
    Ok(delivered)
}

/// A retry's answer: delivered, or the entry as it stands now with its new error.
async fn retried(id: u64, delivered: bool, console: &Console) -> Value {
    if delivered {
        return json!({"id": id, "delivered": true});
    }
    let error = match console.dead_letters.get(id).await {
        Ok(Some(entry)) => last_line(&entry.error).to_owned(),
        _ => "failed again".to_owned(),
    };
    json!({"id": id, "delivered": false, "error": error})
}

async fn selection(body: Body) -> Result<Selection, ApiError> {
    let bytes: Bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
            )
        })?;
    let selection: Selection = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(format!(
            "expected a JSON body {{\"ids\": [1, 2]}} or {{\"all\": true}}: {e}"
        ))
    })?;
    if selection.ids.len() > MAX_BATCH {
        return Err(ApiError::bad_request(format!(
            "ids: at most {MAX_BATCH} per request, found {}",
            selection.ids.len()
        )));
    }
    Ok(selection)
}

fn entry_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse::<u64>().ok().filter(|&id| id > 0).ok_or_else(|| {
        ApiError::bad_request(format!(
            "a dead-letter entry id is a positive integer, found {:?}",
            shortened(raw, 40)
        ))
    })
}

fn not_found(id: u64) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no dead-letter entry with id {id}"),
    )
}

/// The last non-empty line: for a traceback, the exception itself.
fn last_line(s: &str) -> &str {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or(s)
}

fn shortened(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// A query string's parameters, each known and given at most once.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: Option<&str>, known: &[&str]) -> Result<Params, ApiError> {
        let pairs: Vec<(String, String)> =
            url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        for (i, (key, _)) in pairs.iter().enumerate() {
            if !known.contains(&key.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {:?} (known: {})",
                    shortened(key, 40),
                    known.join(", ")
                )));
            }
            if pairs[..i].iter().any(|(k, _)| k == key) {
                return Err(ApiError::bad_request(format!("{key}: given twice")));
            }
        }
        Ok(Params(pairs))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `limit`: 1 to [`MAX_BATCH`], `default` when absent.
    fn limit(&self, default: usize) -> Result<usize, ApiError> {
        let Some(raw) = self.get("limit") else {
            return Ok(default);
        };
        raw.parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_BATCH).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "limit: expected a number from 1 to {MAX_BATCH}, found {:?}",
                    shortened(raw, 40)
                ))
            })
    }
}

/// An API error: `{"error": message}` with its status code.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        let status = match &e {
            Error::DeadLetter(d) => match d.kind() {
                DeadLetterErrorKind::NotFound => StatusCode::NOT_FOUND,
                DeadLetterErrorKind::InProgress => StatusCode::CONFLICT,
                DeadLetterErrorKind::Undecodable | DeadLetterErrorKind::ObserverGone => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                DeadLetterErrorKind::NoDatabase | DeadLetterErrorKind::Storage => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            },
            Error::Connect(_) | Error::Transport(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.message}))).into_response()
    }
}
