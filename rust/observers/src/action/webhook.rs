//! `type = "webhook"`: an HTTP POST per event, and the HTTP plumbing shared with Slack.
//!
//! # Request
//!
//! - `POST` to `url` (or the URL in the variable named by `url_env`, read at build time);
//! - body: the `body_template` rendered for the event, or the standard payload
//!   `{"event","table","timestamp","data":{"new","old"},"id"}`;
//! - `Content-Type: application/json` (a `headers` entry may override it), the configured
//!   `headers` (`${VAR}` references resolved at build time), and
//!   `Idempotency-Key: <event id>`, stable across retries and redeliveries of the same change.
//!
//! # Signature
//!
//! With `secret_env` set, every request carries
//!
//! ```text
//! X-Fraiseql-Signature: t=<unix seconds>,v1=<hex(HMAC-SHA256(secret, "<t>.<body>"))>
//! ```
//!
//! To verify: take `t` and `v1` from the header, compute HMAC-SHA256 with the shared secret
//! over the bytes of `t`, a `.`, and the raw request body, hex-encode it (lower case) and
//! compare it with `v1` in constant time; reject a `t` too far from the current time (for
//! example more than five minutes) to stop replays.
//!
//! # Outcome
//!
//! 2xx succeeds. 408, 429, 5xx, timeouts and connection errors are retryable; any other
//! status (including 3xx: redirects are not followed) is permanent. `Retry-After` (seconds
//! or an HTTP date) is passed on to the engine. Error messages carry the status and the
//! first 200 characters of the response body, never the URL's credentials, path or query,
//! header values or the signing secret.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;

use super::template::{Escape, Syntax, Template};
use super::{Action, ActionError, FailureReason};
use crate::config::WebhookConfig;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::schema::EntityDef;

/// Header carrying the HMAC signature.
pub const SIGNATURE_HEADER: &str = "X-Fraiseql-Signature";
/// Header carrying the event id.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// How many characters of a response body an error message quotes.
const BODY_EXCERPT_CHARS: usize = 200;
/// How many bytes of a response body are read at most.
const BODY_READ_LIMIT: usize = 64 * 1024;

type HmacSha256 = Hmac<Sha256>;

/// A build error: `observer `o`: webhook action, key `url_env`: …`.
pub(crate) fn build_error(observer: &str, kind: &str, key: &str, msg: impl AsRef<str>) -> Error {
    Error::Action(format!(
        "observer `{observer}`: {kind} action, key `{key}`: {}",
        msg.as_ref()
    ))
}

/// The value of the variable an `*_env` key names. Errors name the variable, never a value.
pub(crate) fn env_value(
    observer: &str,
    kind: &str,
    key: &str,
    var: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String> {
    match env(var) {
        Some(v) if !v.is_empty() => Ok(v),
        Some(_) => Err(build_error(
            observer,
            kind,
            key,
            format!("environment variable {var} is set but empty"),
        )),
        None => Err(build_error(
            observer,
            kind,
            key,
            format!("environment variable {var} is not set"),
        )),
    }
}

/// An http(s) URL from the literal key or the variable named by the `_env` key. Errors show
/// no part of the URL.
pub(crate) fn resolve_url(
    observer: &str,
    kind: &str,
    (literal_key, literal): (&str, Option<&str>),
    (env_key, env_var): (&str, Option<&str>),
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Url> {
    let (key, raw, origin) = match (literal, env_var) {
        (Some(u), _) => (literal_key, u.to_owned(), String::from("the URL")),
        (None, Some(var)) => (
            env_key,
            env_value(observer, kind, env_key, var, env)?,
            format!("environment variable {var}"),
        ),
        (None, None) => {
            return Err(build_error(
                observer,
                kind,
                literal_key,
                format!("one of {literal_key} or {env_key} must be set"),
            ))
        }
    };
    let url = Url::parse(raw.trim()).map_err(|e| {
        build_error(
            observer,
            kind,
            key,
            format!("{origin} is not a valid URL ({e}); expected http(s)://host/path"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(build_error(
            observer,
            kind,
            key,
            format!("{origin} must be an http:// or https:// URL with a host"),
        ));
    }
    Ok(url)
}

/// `scheme://host[:port]/…`: what logs, errors and `describe()` show of a URL.
pub(crate) fn shown_url(url: &Url) -> String {
    let host = url.host_str().unwrap_or("");
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let tail = if url.path() != "/" || url.query().is_some() {
        "/…"
    } else {
        ""
    };
    format!("{}://{host}{port}{tail}", url.scheme())
}

/// Strings that must never appear in a message: the URL's password, path and query.
pub(crate) fn url_secrets(url: &Url) -> Vec<String> {
    let mut out = vec![url.as_str().to_owned()];
    if let Some(p) = url.password() {
        out.push(p.to_owned());
    }
    if url.path() != "/" {
        out.push(url.path().to_owned());
    }
    if let Some(q) = url.query() {
        out.push(q.to_owned());
    }
    out
}

/// Replaces every secret (longer than 3 characters) in `msg` with `***`.
pub(crate) fn scrub(mut msg: String, secrets: &[String]) -> String {
    for s in secrets {
        if s.len() > 3 && msg.contains(s.as_str()) {
            msg = msg.replace(s.as_str(), "***");
        }
    }
    msg
}

/// The process-wide HTTP client of the built-in actions (connection pooling, rustls with the
/// `ring` provider and the platform's trust store, no redirects).
pub(crate) fn http_client() -> std::result::Result<reqwest::Client, String> {
    static CLIENT: OnceLock<std::result::Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            use rustls_platform_verifier::BuilderVerifierExt;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS setup failed: {e}"))?
                .with_platform_verifier()
                .map_err(|e| format!("TLS setup failed: {e}"))?
                .with_no_client_auth();
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            reqwest::Client::builder()
                .tls_backend_preconfigured(tls)
                .redirect(reqwest::redirect::Policy::none())
                .pool_idle_timeout(Duration::from_secs(60))
                .user_agent(concat!("fraiseql-observers/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| format!("HTTP client setup failed: {e}"))
        })
        .clone()
}

/// Sends one request and classifies the outcome. `secrets` are scrubbed from messages.
pub(crate) async fn send(
    request: reqwest::RequestBuilder,
    timeout: Duration,
    secrets: &[String],
) -> std::result::Result<StatusCode, ActionError> {
    let response = match request.timeout(timeout).send().await {
        Ok(r) => r,
        Err(e) => return Err(request_error(e, timeout, secrets)),
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(parse_retry_after);
    let body = read_limited(response).await;
    if status.is_success() {
        return Ok(status);
    }
    let retryable = matches!(status.as_u16(), 408 | 429) || status.is_server_error();
    let mut message = format!("HTTP {}", status_text(status));
    if status.is_redirection() {
        message.push_str(" (redirects are not followed; configure the final URL)");
    }
    match body {
        Ok(b) if !b.trim().is_empty() => {
            message.push_str(": ");
            // Scrub before cutting, so that no part of a secret survives the cut.
            message.push_str(&excerpt(&scrub(b, secrets)));
        }
        _ => {}
    }
    Err(ActionError {
        retryable,
        reason: FailureReason::for_status(status.as_u16()),
        message: scrub(message, secrets),
        retry_after,
    })
}

fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(r) => format!("{} {r}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

async fn read_limited(mut response: reqwest::Response) -> std::result::Result<String, ()> {
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|_| ())? {
        let room = BODY_READ_LIMIT - bytes.len();
        bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if bytes.len() >= BODY_READ_LIMIT {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The first 200 characters, control characters as spaces.
fn excerpt(body: &str) -> String {
    let trimmed = body.trim();
    let mut out: String = trimmed
        .chars()
        .take(BODY_EXCERPT_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if trimmed.chars().nth(BODY_EXCERPT_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// `Retry-After: <seconds>` or `Retry-After: <HTTP date>`.
pub(crate) fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let s = value.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(s).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

fn request_error(e: reqwest::Error, timeout: Duration, secrets: &[String]) -> ActionError {
    let e = e.without_url();
    if e.is_timeout() {
        return ActionError::retryable(format!("timed out after {}ms", timeout.as_millis()))
            .with_reason(FailureReason::Timeout);
    }
    let mut chain = Vec::<String>::new();
    let mut source: Option<&dyn std::error::Error> = Some(&e);
    while let Some(err) = source {
        let text = err.to_string();
        if !chain.iter().any(|c| c.contains(&text)) {
            chain.push(text);
        }
        source = err.source();
    }
    let what = if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let message = scrub(format!("{what}: {}", chain.join(": ")), secrets);
    if e.is_builder() {
        ActionError::permanent(message).with_reason(FailureReason::InvalidMessage)
    } else {
        ActionError::retryable(message).with_reason(FailureReason::Connection)
    }
}

/// Resolves `${VAR}` and `${VAR:-default}` in a header value. Errors name the variable.
fn resolve_vars(
    raw: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${…} reference".to_owned())?;
        let inner = &after[..end];
        let (name, default) = match inner.find(":-") {
            Some(i) => (&inner[..i], Some(&inner[i + 2..])),
            None => (inner, None),
        };
        let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err("invalid ${…} reference: expected ${NAME} or ${NAME:-default}".into());
        }
        match (env(name), default) {
            (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set (referenced as ${{{name}}})"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[derive(Serialize)]
struct Payload<'a> {
    event: &'a str,
    table: &'a str,
    timestamp: &'a str,
    data: Data<'a>,
    id: &'a str,
}

#[derive(Serialize)]
struct Data<'a> {
    new: Option<&'a Value>,
    old: Option<&'a Value>,
}

/// The standard body: `{"event","table","timestamp","data":{"new","old"},"id"}`.
pub fn default_payload(event: &Event) -> String {
    let payload = Payload {
        event: event.event.as_str(),
        table: &event.table,
        timestamp: &event.timestamp,
        data: Data {
            new: event.new.as_ref(),
            old: event.old.as_ref(),
        },
        id: &event.id,
    };
    serde_json::to_string(&payload).unwrap_or_else(|_| "{}".to_owned())
}

/// `X-Fraiseql-Signature` value for `body` signed at unix time `t`.
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let mac = <HmacSha256 as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    sign_with(mac, t, body)
}

fn sign_with(mut mac: HmacSha256, t: u64, body: &[u8]) -> String {
    let t = t.to_string();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// A built webhook action.
pub struct WebhookAction {
    observer: String,
    client: reqwest::Client,
    url: Url,
    shown: String,
    headers: HeaderMap,
    body: Option<Template>,
    mac: Option<HmacSha256>,
    timeout: Duration,
    secrets: Vec<String>,
    warned: AtomicBool,
}

impl WebhookAction {
    pub fn new(
        observer: &str,
        config: &WebhookConfig,
        entity: Option<&EntityDef>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<WebhookAction> {
        const KIND: &str = "webhook";
        let url = resolve_url(
            observer,
            KIND,
            ("url", config.url.as_deref()),
            ("url_env", config.url_env.as_deref()),
            env,
        )?;
        let mut secrets = url_secrets(&url);
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, raw) in &config.headers {
            let key = format!("headers.{name}");
            let value = resolve_vars(raw, env).map_err(|m| build_error(observer, KIND, &key, m))?;
            let header_name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| build_error(observer, KIND, &key, "not a valid HTTP header name"))?;
            for reserved in [IDEMPOTENCY_HEADER, SIGNATURE_HEADER] {
                if header_name.as_str().eq_ignore_ascii_case(reserved) {
                    return Err(build_error(
                        observer,
                        KIND,
                        &key,
                        format!("{reserved} is set by fraiseql on every request; remove it"),
                    ));
                }
            }
            let mut header_value = HeaderValue::from_str(&value).map_err(|_| {
                build_error(
                    observer,
                    KIND,
                    &key,
                    "the value is not a valid HTTP header value (visible ASCII expected)",
                )
            })?;
            header_value.set_sensitive(true);
            if let Some((_, token)) = value.rsplit_once(' ') {
                secrets.push(token.to_owned());
            }
            secrets.push(value);
            headers.insert(header_name, header_value);
        }
        let body = match &config.body_template {
            Some(text) => Some(
                Template::compile(
                    text,
                    Syntax::Mustache,
                    Escape::json_if_json_template(text),
                    entity,
                )
                .map_err(|m| build_error(observer, KIND, "body_template", m))?,
            ),
            None => None,
        };
        let mac = match &config.secret_env {
            Some(var) => {
                let secret = env_value(observer, KIND, "secret_env", var, env)?;
                let mac = <HmacSha256 as KeyInit>::new_from_slice(secret.as_bytes())
                    .map_err(|_| build_error(observer, KIND, "secret_env", "unusable key"))?;
                secrets.push(secret);
                Some(mac)
            }
            None => None,
        };
        let client = http_client().map_err(|m| build_error(observer, KIND, "url", m))?;
        Ok(WebhookAction {
            observer: observer.to_owned(),
            client,
            shown: shown_url(&url),
            url,
            headers,
            body,
            mac,
            timeout: Duration::from_millis(config.timeout_ms),
            secrets,
            warned: AtomicBool::new(false),
        })
    }

    /// The body sent for `event`.
    pub fn render_body(&self, event: &Event) -> String {
        match &self.body {
            Some(template) => {
                let mut missing = None;
                let body = template.render(event, &mut missing);
                if let Some(field) = missing {
                    warn_missing(
                        &self.warned,
                        &self.observer,
                        &self.describe(),
                        &field,
                        event,
                    );
                }
                body
            }
            None => default_payload(event),
        }
    }
}

/// Logs a template field without value, once per action.
pub(crate) fn warn_missing(
    warned: &AtomicBool,
    observer: &str,
    action: &str,
    field: &str,
    event: &Event,
) {
    if !warned.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "[observer] {observer}: {action}: template field `{field}` has no value in event {} ({} {}); rendered empty (reported once per action)",
            event.id,
            event.entity,
            event.event
        );
    }
}

#[async_trait]
impl Action for WebhookAction {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn describe(&self) -> String {
        format!("Webhook to {}", self.shown)
    }

    async fn execute(&self, event: &Event) -> std::result::Result<(), ActionError> {
        let body = self.render_body(event);
        let mut request = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header(IDEMPOTENCY_HEADER, event.id.as_str());
        if let Some(mac) = &self.mac {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let value = sign_with(mac.clone(), t, body.as_bytes());
            request = request.header(SIGNATURE_HEADER, value);
        }
        tracing::debug!("[observer] Sending webhook to {}", self.shown);
        let status = send(request.body(body), self.timeout, &self.secrets).await?;
        tracing::debug!("[observer] Webhook delivered (status={})", status.as_u16());
        Ok(())
    }
}
