//! What the built-in actions share: the process-wide HTTP client, sending a request and
//! classifying its outcome, reading URLs and secrets from the environment at build time, and
//! the warning for a template field that has no value.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use reqwest::header::{HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};

use super::{ActionError, FailureReason};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::redact::scrub;

/// How many characters of a response body an error message quotes.
const BODY_EXCERPT_CHARS: usize = 200;
/// How many bytes of a response body are read at most.
const BODY_READ_LIMIT: usize = 64 * 1024;

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
