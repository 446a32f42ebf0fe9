//! `type = "slack"`: a message to a Slack incoming webhook.
//!
//! Posts `{"text": <message>, "channel": <channel>}` (`channel` only when configured) to
//! `webhook_url` or the URL in the variable named by `webhook_url_env`. `{field}`
//! placeholders in `message` take their values from the row (`new`, or `old` for a DELETE);
//! substituted values have Slack's control characters (`&`, `<`, `>`) escaped so that row
//! data cannot mention `<!channel>` or forge links, while the template's own text keeps its
//! formatting (`:emoji:`, `*bold*`, `<https://…|links>`). Status codes are handled as for the
//! webhook action.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::Url;
use serde::Serialize;

use super::http::{build_error, http_client, resolve_url, send, warn_missing};
use super::template::{Escape, Syntax, Template};
use super::{Action, ActionError};
use crate::config::{SlackConfig, DEFAULT_WEBHOOK_TIMEOUT_MS};
use crate::error::Result;
use crate::event::Event;
use crate::redact::{shown_url, url_secrets};
use crate::schema::EntityDef;

#[derive(Serialize)]
struct SlackPayload<'a> {
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
}

/// A built Slack action.
pub struct SlackAction {
    observer: String,
    client: reqwest::Client,
    url: Url,
    shown: String,
    channel: Option<String>,
    message: Template,
    timeout: Duration,
    secrets: Vec<String>,
    warned: AtomicBool,
}

impl SlackAction {
    pub fn new(
        observer: &str,
        config: &SlackConfig,
        entity: Option<&EntityDef>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<SlackAction> {
        const KIND: &str = "slack";
        let url = resolve_url(
            observer,
            KIND,
            ("webhook_url", config.webhook_url.as_deref()),
            ("webhook_url_env", config.webhook_url_env.as_deref()),
            env,
        )?;
        let message = Template::compile(&config.message, Syntax::Braces, Escape::Slack, entity)
            .map_err(|m| build_error(observer, KIND, "message", m))?;
        let client = http_client().map_err(|m| build_error(observer, KIND, "webhook_url", m))?;
        Ok(SlackAction {
            observer: observer.to_owned(),
            client,
            shown: shown_url(&url),
            secrets: url_secrets(&url),
            url,
            channel: config.channel.clone(),
            message,
            timeout: Duration::from_millis(DEFAULT_WEBHOOK_TIMEOUT_MS),
            warned: AtomicBool::new(false),
        })
    }

    /// The JSON body posted for `event`.
    pub fn render_payload(&self, event: &Event) -> String {
        let mut missing = None;
        let text = self.message.render(event, &mut missing);
        if let Some(field) = missing {
            warn_missing(
                &self.warned,
                &self.observer,
                &self.describe(),
                &field,
                event,
            );
        }
        let payload = SlackPayload {
            text: &text,
            channel: self.channel.as_deref(),
        };
        serde_json::to_string(&payload).unwrap_or_else(|_| "{}".to_owned())
    }

    fn target(&self) -> String {
        match &self.channel {
            Some(c) => format!(" to {c}"),
            None => String::new(),
        }
    }
}

#[async_trait]
impl Action for SlackAction {
    fn kind(&self) -> &'static str {
        "slack"
    }

    fn fields(&self) -> Vec<String> {
        self.message.fields().map(str::to_owned).collect()
    }

    fn describe(&self) -> String {
        format!("Slack notification{}", self.target())
    }

    fn timeout(&self) -> Duration {
        self.timeout + Duration::from_millis(500)
    }

    async fn execute(&self, event: &Event) -> std::result::Result<(), ActionError> {
        let body = self.render_payload(event);
        tracing::debug!("[observer] Sending Slack notification{}", self.target());
        let request = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        send(request, self.timeout, &self.secrets).await?;
        match &self.channel {
            Some(c) => tracing::debug!("[observer] Slack notification delivered (channel={c})"),
            None => tracing::debug!(
                "[observer] Slack notification delivered (webhook {})",
                self.shown
            ),
        }
        Ok(())
    }
}
