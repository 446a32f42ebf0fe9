//! `type = "webhook"`: an HTTP POST per event.
//!
//! # Request
//!
//! - `POST` to `url` (or the URL in the variable named by `url_env`, read at build time);
//! - body: the `body_template` rendered for the event, or the standard payload
//!   `{"event","table","timestamp","data":{"new","old"},"id"}` (plus `"backfill": true` and a
//!   `Fraiseql-Backfill: <backfill id>` header on a row fed by `fraiseql backfill`);
//! - `Content-Type: application/json` (a `headers` entry may override it), the configured
//!   `headers` (`${VAR}` references resolved at build time), and
//!   `Idempotency-Key: <event id>`, stable across retries and redeliveries of the same change.
//!
//! With `format = "cloudevents"` the body is a CloudEvents 1.0 event in structured mode
//! (`Content-Type: application/cloudevents+json`): `specversion`, `id` (the event id),
//! `source`, `type` (`fraiseql.<entity>.<event>`, lower case), `time`, `subject` (the row's
//! `id`, when it has one), `datacontenttype` and `data` (`{"table","new","old"}`, and
//! `"backfill": true` on a backfilled row).
//!
//! # Signatures
//!
//! With `signing_secret_env` set ([Standard Webhooks](https://www.standardwebhooks.com/),
//! the scheme for new configs), every request carries `webhook-id` (the event id, the same
//! on every retry), `webhook-timestamp` (unix seconds) and
//! `webhook-signature: v1,<base64(HMAC-SHA256(key, "<id>.<timestamp>.<body>"))>`, where the
//! key is the base64 after `whsec_`; a variable holding several secrets separated by spaces
//! (a rotation) gives one `v1,…` per secret, space-separated. Receivers verify with any
//! Standard Webhooks library.
//!
//! With `secret_env` set (the original scheme, kept for receivers that use it), every
//! request carries
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

use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::Url;
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;

use super::http::{build_error, env_value, http_client, resolve_url, send, warn_missing};
use super::template::{Escape, Syntax, Template};
use super::{Action, ActionError};
use crate::config::{WebhookConfig, WebhookFormat};
use crate::error::Result;
use crate::event::Event;
use crate::redact::{shown_url, url_secrets};
use crate::schema::EntityDef;

/// Header carrying the HMAC signature.
pub const SIGNATURE_HEADER: &str = "X-Fraiseql-Signature";
/// Header carrying the event id.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";
/// On a backfilled row: the backfill's id (the body says `"backfill": true`).
pub const BACKFILL_HEADER: &str = "Fraiseql-Backfill";
/// Standard Webhooks headers.
pub const WEBHOOK_ID_HEADER: &str = "webhook-id";
pub const WEBHOOK_TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const WEBHOOK_SIGNATURE_HEADER: &str = "webhook-signature";
/// The W3C trace context of the attempt (or of the change, when spans are off).
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// The prefix of a Standard Webhooks secret.
const STANDARD_SECRET_PREFIX: &str = "whsec_";

/// Headers set on every request: a configured header of one of these names is an error.
const RESERVED_HEADERS: [&str; 7] = [
    TRACEPARENT_HEADER,
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    BACKFILL_HEADER,
    WEBHOOK_ID_HEADER,
    WEBHOOK_TIMESTAMP_HEADER,
    WEBHOOK_SIGNATURE_HEADER,
];

type HmacSha256 = Hmac<Sha256>;

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
    /// `true` on a row fed by `fraiseql backfill` (absent otherwise).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    backfill: bool,
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
        backfill: event.backfill.is_some(),
    };
    serde_json::to_string(&payload).unwrap_or_else(|_| "{}".to_owned())
}

/// A CloudEvents 1.0 structured event for `event`.
#[derive(Serialize)]
struct CloudEvent<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    kind: String,
    time: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    datacontenttype: &'static str,
    data: CloudEventData<'a>,
}

#[derive(Serialize)]
struct CloudEventData<'a> {
    table: &'a str,
    new: Option<&'a Value>,
    old: Option<&'a Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    backfill: bool,
}

/// The CloudEvents type of an event: `fraiseql.<entity>.<event>`, lower case.
pub fn cloudevent_type(event: &Event) -> String {
    format!(
        "fraiseql.{}.{}",
        event.entity.to_lowercase(),
        event.event.as_lower()
    )
}

/// The structured-mode body for `event` from `source`.
pub fn cloudevent_payload(event: &Event, source: &str) -> String {
    let payload = CloudEvent {
        specversion: "1.0",
        id: &event.id,
        source,
        kind: cloudevent_type(event),
        time: &event.timestamp,
        subject: event.key(),
        datacontenttype: "application/json",
        data: CloudEventData {
            table: &event.table,
            new: event.new.as_ref(),
            old: event.old.as_ref(),
            backfill: event.backfill.is_some(),
        },
    };
    serde_json::to_string(&payload).unwrap_or_else(|_| "{}".to_owned())
}

/// The keys of a Standard Webhooks secret variable: one or more `whsec_<base64>` separated by
/// whitespace. The error says what is wrong, never the secret.
pub fn standard_keys(value: &str) -> std::result::Result<Vec<Vec<u8>>, String> {
    use base64::Engine as _;
    let secrets: Vec<&str> = value.split_whitespace().collect();
    if secrets.is_empty() {
        return Err("the variable is empty; expected a secret such as whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into());
    }
    secrets
        .iter()
        .enumerate()
        .map(|(i, secret)| {
            let which = if secrets.len() > 1 {
                format!("secret {} of {}", i + 1, secrets.len())
            } else {
                "the secret".to_owned()
            };
            let encoded = secret.strip_prefix(STANDARD_SECRET_PREFIX).ok_or_else(|| {
                format!("{which} does not start with {STANDARD_SECRET_PREFIX} (a Standard Webhooks secret is whsec_ and base64)")
            })?;
            // Padded or not, as the Standard Webhooks libraries accept both.
            let lenient = base64::engine::GeneralPurpose::new(
                &base64::alphabet::STANDARD,
                base64::engine::GeneralPurposeConfig::new()
                    .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
            );
            let key = lenient
                .decode(encoded)
                .map_err(|e| format!("{which} is not valid base64 after {STANDARD_SECRET_PREFIX}: {e}"))?;
            if key.is_empty() {
                return Err(format!("{which} holds no key after {STANDARD_SECRET_PREFIX}"));
            }
            Ok(key)
        })
        .collect()
}

/// The `webhook-signature` value for `id`, `timestamp` and `body`, one `v1,…` per key.
pub fn standard_signature(keys: &[HmacSha256], id: &str, timestamp: u64, body: &[u8]) -> String {
    use base64::Engine as _;
    keys.iter()
        .map(|key| {
            let mut mac = key.clone();
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
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
    /// `format = "cloudevents"`: the source of the events.
    cloudevents: Option<String>,
    mac: Option<HmacSha256>,
    /// Standard Webhooks keys (several during a rotation).
    standard: Vec<HmacSha256>,
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
            for reserved in RESERVED_HEADERS {
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
        let standard = match &config.signing_secret_env {
            Some(var) => {
                let value = env_value(observer, KIND, "signing_secret_env", var, env)?;
                let keys = standard_keys(&value).map_err(|m| {
                    build_error(observer, KIND, "signing_secret_env", format!("${var}: {m}"))
                })?;
                secrets.extend(value.split_whitespace().map(str::to_owned));
                keys.iter()
                    .map(|k| {
                        <HmacSha256 as KeyInit>::new_from_slice(k).map_err(|_| {
                            build_error(observer, KIND, "signing_secret_env", "unusable key")
                        })
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            None => Vec::new(),
        };
        let cloudevents = match config.format {
            WebhookFormat::Json => None,
            WebhookFormat::CloudEvents => {
                headers.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/cloudevents+json"),
                );
                Some(
                    config
                        .source
                        .clone()
                        .unwrap_or_else(|| "urn:fraiseql".to_owned()),
                )
            }
        };
        let client = http_client().map_err(|m| build_error(observer, KIND, "url", m))?;
        Ok(WebhookAction {
            observer: observer.to_owned(),
            client,
            shown: shown_url(&url),
            url,
            headers,
            body,
            cloudevents,
            standard,
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
            None => match &self.cloudevents {
                Some(source) => cloudevent_payload(event, source),
                None => default_payload(event),
            },
        }
    }
}

#[async_trait]
impl Action for WebhookAction {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn fields(&self) -> Vec<String> {
        self.body
            .iter()
            .flat_map(Template::fields)
            .map(str::to_owned)
            .collect()
    }

    fn describe(&self) -> String {
        format!("Webhook to {}", self.shown)
    }

    /// The request's own timeout ends an attempt first; this is the backstop.
    fn timeout(&self) -> Duration {
        self.timeout + Duration::from_millis(500)
    }

    async fn execute(&self, event: &Event) -> std::result::Result<(), ActionError> {
        let body = self.render_body(event);
        let mut request = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header(IDEMPOTENCY_HEADER, event.id.as_str());
        if let Some(backfill) = &event.backfill {
            request = request.header(BACKFILL_HEADER, backfill.id.as_str());
        }
        if let Some(traceparent) = crate::telemetry::outgoing(event) {
            request = request.header(TRACEPARENT_HEADER, traceparent);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if !self.standard.is_empty() {
            let signature = standard_signature(&self.standard, &event.id, now, body.as_bytes());
            request = request
                .header(WEBHOOK_ID_HEADER, event.id.as_str())
                .header(WEBHOOK_TIMESTAMP_HEADER, now.to_string())
                .header(WEBHOOK_SIGNATURE_HEADER, signature);
        }
        if let Some(mac) = &self.mac {
            let value = sign_with(mac.clone(), now, body.as_bytes());
            request = request.header(SIGNATURE_HEADER, value);
        }
        tracing::debug!("[observer] Sending webhook to {}", self.shown);
        let status = send(request.body(body), self.timeout, &self.secrets).await?;
        tracing::debug!("[observer] Webhook delivered (status={})", status.as_u16());
        Ok(())
    }
}
