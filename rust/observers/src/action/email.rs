//! `type = "email"`: one message per event over SMTP (lettre, pooled connections).
//!
//! `subject` and `body_template` take `{field}` placeholders (row `new`, or `old` for a
//! DELETE). TLS: `required` (default) upgrades with STARTTLS and refuses to go on without it
//! (on port 465, where STARTTLS does not exist, it uses implicit TLS instead);
//! `opportunistic` upgrades when the server offers STARTTLS; `none` stays in plain text.
//! Credentials come from the variables named by `smtp_user_env` / `smtp_password_env`, read
//! at build time. SMTP 4xx replies, timeouts and connection errors are retryable; 5xx
//! replies and client-side errors (no STARTTLS where required, no shared AUTH mechanism)
//! are permanent. Each message carries `Message-ID: <event id.observer@fraiseql>` so that a
//! redelivered event produces the same id.

use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::AsyncSmtpTransportBuilder;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::http::{build_error, env_value, warn_missing};
use super::template::{Escape, Syntax, Template};
use super::{Action, ActionError, FailureReason};
use crate::config::{EmailConfig, EmailTls};
use crate::error::Result;
use crate::event::Event;
use crate::redact::scrub;
use crate::schema::EntityDef;

/// Per-command SMTP timeout.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

/// A built email action.
pub struct EmailAction {
    observer: String,
    from: Mailbox,
    to: Vec<Mailbox>,
    shown_to: String,
    subject: Template,
    body: Template,
    /// Validated at build time; turned into a transport on first use, inside the runtime
    /// (the connection pool spawns its cleanup task there).
    builder: AsyncSmtpTransportBuilder,
    transport: OnceLock<PooledTransport>,
    secrets: Vec<String>,
    warned: AtomicBool,
}

impl EmailAction {
    pub fn new(
        observer: &str,
        config: &EmailConfig,
        entity: Option<&EntityDef>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<EmailAction> {
        const KIND: &str = "email";
        let mailbox = |key: &str, raw: &str| {
            raw.trim().parse::<Mailbox>().map_err(|e| {
                build_error(
                    observer,
                    KIND,
                    key,
                    format!("`{raw}` is not a valid email address ({e})"),
                )
            })
        };
        let from = mailbox("from", &config.from)?;
        let to = config
            .to
            .iter()
            .map(|raw| mailbox("to", raw))
            .collect::<Result<Vec<_>>>()?;
        let subject = Template::compile(&config.subject, Syntax::Braces, Escape::None, entity)
            .map_err(|m| build_error(observer, KIND, "subject", m))?;
        let body = Template::compile(&config.body_template, Syntax::Braces, Escape::None, entity)
            .map_err(|m| build_error(observer, KIND, "body_template", m))?;

        let (host_key, host) = match (&config.smtp_host, &config.smtp_host_env) {
            (Some(h), _) => ("smtp_host", h.trim().to_owned()),
            (None, Some(var)) => (
                "smtp_host_env",
                env_value(observer, KIND, "smtp_host_env", var, env)?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => {
                return Err(build_error(
                    observer,
                    KIND,
                    "smtp_host",
                    "one of smtp_host or smtp_host_env must be set",
                ))
            }
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(build_error(
                observer,
                KIND,
                host_key,
                "expected a host name or IP address (no scheme, port or path)",
            ));
        }
        let tls_params = || {
            TlsParameters::new(host.clone()).map_err(|e| {
                build_error(
                    observer,
                    KIND,
                    host_key,
                    format!("cannot set up TLS for this host ({e})"),
                )
            })
        };
        let tls = match config.tls {
            EmailTls::Required if config.smtp_port == 465 => Tls::Wrapper(tls_params()?),
            EmailTls::Required => Tls::Required(tls_params()?),
            EmailTls::Opportunistic => Tls::Opportunistic(tls_params()?),
            EmailTls::None => Tls::None,
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.as_str())
            .port(config.smtp_port)
            .tls(tls)
            .timeout(Some(SMTP_TIMEOUT));
        let mut secrets = Vec::new();
        match (&config.smtp_user_env, &config.smtp_password_env) {
            (Some(user_var), Some(password_var)) => {
                let user = env_value(observer, KIND, "smtp_user_env", user_var, env)?;
                let password = env_value(observer, KIND, "smtp_password_env", password_var, env)?;
                secrets.push(password.clone());
                secrets.push(user.clone());
                builder = builder.credentials(Credentials::new(user, password));
            }
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err(build_error(
                    observer,
                    KIND,
                    "smtp_user_env",
                    "smtp_user_env and smtp_password_env must be set together",
                ))
            }
        }
        let shown_to = to
            .iter()
            .map(|m| m.email.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(EmailAction {
            observer: observer.to_owned(),
            from,
            to,
            shown_to,
            subject,
            body,
            builder,
            transport: OnceLock::new(),
            secrets,
            warned: AtomicBool::new(false),
        })
    }

    /// The rendered subject and body for `event`.
    pub fn render(&self, event: &Event) -> (String, String) {
        let mut missing = None;
        let subject = self.subject.render(event, &mut missing);
        // A header value: no line breaks.
        let subject = subject.replace(['\r', '\n'], " ");
        let body = self.body.render(event, &mut missing);
        if let Some(field) = missing {
            warn_missing(
                &self.warned,
                &self.observer,
                &self.describe(),
                &field,
                event,
            );
        }
        (subject, body)
    }

    fn message(&self, event: &Event) -> std::result::Result<Message, ActionError> {
        let (subject, body) = self.render(event);
        let id_part = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(subject)
            .message_id(Some(format!(
                "<{}.{}@fraiseql>",
                id_part(&event.id),
                id_part(&self.observer)
            )))
            .header(ContentType::TEXT_PLAIN);
        for to in &self.to {
            builder = builder.to(to.clone());
        }
        builder.body(body).map_err(|e| {
            ActionError::permanent(format!("could not build the message: {e}"))
                .with_reason(FailureReason::InvalidMessage)
        })
    }
}

/// The pooled SMTP transport and the runtime it was created on. lettre's pool spawns a task
/// when dropped, which panics outside a tokio runtime — and the engine may be dropped on any
/// thread (a Python thread, for one), so the drop re-enters the runtime it came from.
struct PooledTransport {
    /// Always Some until dropped.
    transport: Option<AsyncSmtpTransport<Tokio1Executor>>,
    runtime: tokio::runtime::Handle,
}

impl PooledTransport {
    /// Called on first send, so inside the caller's runtime.
    fn new(transport: AsyncSmtpTransport<Tokio1Executor>) -> Self {
        PooledTransport {
            transport: Some(transport),
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for PooledTransport {
    fn drop(&mut self) {
        let _inside = self.runtime.enter();
        drop(self.transport.take());
    }
}

fn smtp_error(e: &lettre::transport::smtp::Error, secrets: &[String]) -> ActionError {
    let message = if e.is_timeout() {
        format!("SMTP timed out after {}s", SMTP_TIMEOUT.as_secs())
    } else {
        scrub(format!("SMTP {e}"), secrets)
    };
    let reason = if e.is_timeout() {
        FailureReason::Timeout
    } else if e.is_permanent() || e.is_transient() {
        FailureReason::SmtpRejected
    } else if e.is_client() {
        FailureReason::InvalidMessage
    } else {
        FailureReason::Connection
    };
    let error = if e.is_permanent() || e.is_client() {
        ActionError::permanent(message)
    } else {
        ActionError::retryable(message)
    };
    error.with_reason(reason)
}

#[async_trait]
impl Action for EmailAction {
    fn kind(&self) -> &'static str {
        "email"
    }

    fn fields(&self) -> Vec<String> {
        self.subject
            .fields()
            .chain(self.body.fields())
            .map(str::to_owned)
            .collect()
    }

    fn describe(&self) -> String {
        format!("Email to {}", self.shown_to)
    }

    /// Connecting, TLS and each SMTP command have their own timeout; a whole delivery gets
    /// a minute.
    fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(60)
    }

    async fn execute(&self, event: &Event) -> std::result::Result<(), ActionError> {
        let message = self.message(event)?;
        let transport = &self
            .transport
            .get_or_init(|| PooledTransport::new(self.builder.clone().build()))
            .transport
            .as_ref()
            .expect("present until dropped");
        tracing::debug!("[observer] Sending email to {}", self.shown_to);
        transport
            .send(message)
            .await
            .map_err(|e| smtp_error(&e, &self.secrets))?;
        tracing::debug!("[observer] Email delivered (to={})", self.shown_to);
        Ok(())
    }
}
