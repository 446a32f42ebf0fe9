//! What an observer does when its condition holds. Built-in actions (webhook, Slack, email)
//! and host-language handlers (the Python binding's) all implement [`Action`].

pub mod email;
pub(crate) mod http;
pub mod slack;
pub(crate) mod template;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::ActionConfig;
use crate::event::Event;
use crate::schema::EntityDef;

pub use email::EmailAction;
pub use slack::SlackAction;
pub use webhook::WebhookAction;

/// Why an attempt failed, as a bounded set: the `reason` label of
/// `fraiseql_observer_actions_failed_total` and `…_retried_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureReason {
    /// No answer within the per-attempt timeout.
    Timeout,
    /// The connection could not be made or broke (DNS, refused, TLS, reset).
    Connection,
    /// A 3xx: redirects are not followed.
    HttpRedirect,
    /// 429 Too Many Requests.
    HttpRateLimited,
    /// Any other 4xx (408 included).
    HttpClientError,
    /// A 5xx.
    HttpServerError,
    /// The SMTP server rejected the message or the session.
    SmtpRejected,
    /// The message could not be built (an invalid address, header or URL).
    InvalidMessage,
    /// A host-language handler raised.
    Exception,
    /// Anything else.
    #[default]
    Other,
}

impl FailureReason {
    /// Every reason, in the order the metrics list them.
    pub const ALL: [FailureReason; 10] = [
        FailureReason::Timeout,
        FailureReason::Connection,
        FailureReason::HttpRedirect,
        FailureReason::HttpRateLimited,
        FailureReason::HttpClientError,
        FailureReason::HttpServerError,
        FailureReason::SmtpRejected,
        FailureReason::InvalidMessage,
        FailureReason::Exception,
        FailureReason::Other,
    ];

    pub fn as_label(self) -> &'static str {
        match self {
            FailureReason::Timeout => "timeout",
            FailureReason::Connection => "connection",
            FailureReason::HttpRedirect => "http_3xx",
            FailureReason::HttpRateLimited => "http_429",
            FailureReason::HttpClientError => "http_4xx",
            FailureReason::HttpServerError => "http_5xx",
            FailureReason::SmtpRejected => "smtp_rejected",
            FailureReason::InvalidMessage => "invalid_message",
            FailureReason::Exception => "exception",
            FailureReason::Other => "other",
        }
    }

    /// The reason for a non-2xx HTTP status.
    pub fn for_status(status: u16) -> Self {
        match status {
            300..=399 => FailureReason::HttpRedirect,
            429 => FailureReason::HttpRateLimited,
            500..=599 => FailureReason::HttpServerError,
            _ => FailureReason::HttpClientError,
        }
    }
}

/// The outcome of one failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionError {
    /// Whether another attempt may succeed (5xx, timeout, a raised exception) or not (4xx).
    pub retryable: bool,
    /// The metric label of the failure.
    pub reason: FailureReason,
    /// Safe to log and store in the DLQ: never contains secrets.
    pub message: String,
    /// A delay the sink asked for (`Retry-After`), honoured within the policy's max delay.
    pub retry_after: Option<Duration>,
}

impl ActionError {
    pub fn retryable(message: impl Into<String>) -> Self {
        ActionError {
            retryable: true,
            reason: FailureReason::Other,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        ActionError {
            retryable: false,
            reason: FailureReason::Other,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn with_reason(mut self, reason: FailureReason) -> Self {
        self.reason = reason;
        self
    }
}

impl std::fmt::Display for ActionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[async_trait]
pub trait Action: Send + Sync {
    /// Metric label and log name: `webhook`, `slack`, `email`, `python`, `noop`.
    fn kind(&self) -> &'static str;
    /// A short description without secrets, e.g. `python:charge_customer`.
    fn describe(&self) -> String {
        self.kind().to_owned()
    }
    /// The top-level row fields its templates read: a captured change without one of them
    /// is reported (schema drift), see `Engine`.
    fn fields(&self) -> Vec<String> {
        Vec::new()
    }
    /// One attempt. Retries are the engine's business.
    async fn execute(&self, event: &Event) -> Result<(), ActionError>;
    /// How long one attempt may take: the engine gives up on it after this (a failure of
    /// reason `timeout`, retried under the observer's policy).
    fn timeout(&self) -> std::time::Duration {
        DEFAULT_ACTION_TIMEOUT
    }
}

/// The timeout of an action that sets none (Python handlers' default too).
pub const DEFAULT_ACTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Does nothing, successfully. Used by benchmarks and as a placeholder in tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopAction;

#[async_trait]
impl Action for NoopAction {
    fn kind(&self) -> &'static str {
        "noop"
    }

    async fn execute(&self, _event: &Event) -> Result<(), ActionError> {
        Ok(())
    }
}

/// Builds the runnable action for one validated action config. `entity` (if declared) is used to
/// check template fields at startup. `env` reads environment variables (`url_env`,
/// `secret_env`, `${VAR}` in header values, SMTP credentials…), all at build time: a missing
/// variable is an error naming it (never a value), not a failure on the first event.
/// What [`build`] checks that needs no environment: each template compiles against the
/// entity's declared fields (`fraiseql check` runs this; it reads no secret).
pub fn check(
    observer: &str,
    config: &ActionConfig,
    entity: Option<&EntityDef>,
) -> crate::Result<()> {
    use template::{Escape, Syntax, Template};
    let templates: Vec<(&str, &str, &str, Syntax, Escape)> = match config {
        ActionConfig::Webhook(c) => c
            .body_template
            .as_deref()
            .map(|t| {
                (
                    "webhook",
                    "body_template",
                    t,
                    Syntax::Mustache,
                    Escape::json_if_json_template(t),
                )
            })
            .into_iter()
            .collect(),
        ActionConfig::Slack(c) => vec![(
            "slack",
            "message",
            c.message.as_str(),
            Syntax::Braces,
            Escape::Slack,
        )],
        ActionConfig::Email(c) => vec![
            (
                "email",
                "subject",
                c.subject.as_str(),
                Syntax::Braces,
                Escape::None,
            ),
            (
                "email",
                "body_template",
                c.body_template.as_str(),
                Syntax::Braces,
                Escape::None,
            ),
        ],
    };
    for (kind, key, text, syntax, escape) in templates {
        Template::compile(text, syntax, escape, entity)
            .map_err(|m| http::build_error(observer, kind, key, m))?;
    }
    Ok(())
}

pub fn build(
    observer: &str,
    config: &ActionConfig,
    entity: Option<&EntityDef>,
    env: &dyn Fn(&str) -> Option<String>,
) -> crate::Result<Arc<dyn Action>> {
    Ok(match config {
        ActionConfig::Webhook(c) => Arc::new(WebhookAction::new(observer, c, entity, env)?),
        ActionConfig::Slack(c) => Arc::new(SlackAction::new(observer, c, entity, env)?),
        ActionConfig::Email(c) => Arc::new(EmailAction::new(observer, c, entity, env)?),
    })
}
