//! The built-in actions against real servers started by the tests: an HTTP sink (axum) for
//! webhook and Slack, an SMTP sink (tokio) for email. No mocks.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fraiseql_observers::action::{self, webhook};
use fraiseql_observers::checkpoint::CheckpointStrategy;
use fraiseql_observers::config::{
    ActionConfig, BackoffStrategy, EmailConfig, EmailTls, SlackConfig, WebhookConfig,
};
use fraiseql_observers::{
    Action, Engine, EntityDef, Event, EventKind, ListenerConfig, MemoryDlq,
    MemoryIdempotencyStores, Metrics, ObserverSpec, RetryPolicy,
};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use support::{closed_port, HttpSink, Reply, SmtpSink};

// ---------------------------------------------------------------------------------------------
// helpers

fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn order_entity() -> EntityDef {
    EntityDef {
        name: "Order".into(),
        table: "tb_order".into(),
        fields: vec![
            "id".into(),
            "status".into(),
            "total".into(),
            "user_id".into(),
            "note".into(),
            "customer".into(),
        ],
        kinds: Vec::new(),
    }
}

fn insert_event() -> Event {
    Event::new(
        "Order",
        EventKind::Insert,
        "tb_order",
        Some(
            json!({"id": "order-123", "status": "confirmed", "total": 99.99, "user_id": "user-456"}),
        ),
        None,
    )
}

fn webhook_config(url: &str) -> WebhookConfig {
    WebhookConfig {
        url: Some(url.to_owned()),
        url_env: None,
        headers: Vec::new(),
        body_template: None,
        secret_env: None,
        signing_secret_env: None,
        format: fraiseql_observers::config::WebhookFormat::Json,
        source: None,
        timeout_ms: 5_000,
    }
}

fn build_webhook(config: WebhookConfig, env: &dyn Fn(&str) -> Option<String>) -> Arc<dyn Action> {
    action::build(
        "on_order",
        &ActionConfig::Webhook(config),
        Some(&order_entity()),
        env,
    )
    .expect("build webhook")
}

fn build_err(config: ActionConfig, env: &dyn Fn(&str) -> Option<String>) -> String {
    match action::build("on_order", &config, Some(&order_entity()), env) {
        Ok(a) => panic!("expected a build error, got {}", a.describe()),
        Err(e) => e.to_string(),
    }
}

fn assert_no_secrets(text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!text.contains(s), "secret {s:?} leaked in: {text}");
    }
}

// ---------------------------------------------------------------------------------------------
// webhook

#[tokio::test]
async fn webhook_default_payload_matches_the_spec_plus_id() {
    let sink = HttpSink::start().await;
    let action = build_webhook(webhook_config(&sink.url("/hook")), &no_env);
    let event = insert_event();
    action.execute(&event).await.expect("delivered");

    let req = sink.last();
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/hook");
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.header("idempotency-key"), Some(event.id.as_str()));
    assert_eq!(req.header("x-fraiseql-signature"), None);

    let body: Value = serde_json::from_str(&req.body).unwrap();
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["event", "table", "timestamp", "data", "id"]);
    let data_keys: Vec<&str> = body["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(data_keys, ["new", "old"]);
    assert_eq!(
        body,
        json!({
            "event": "INSERT",
            "table": "tb_order",
            "timestamp": event.timestamp,
            "data": {
                "new": {"id": "order-123", "status": "confirmed", "total": 99.99, "user_id": "user-456"},
                "old": null
            },
            "id": event.id,
        })
    );

    // DELETE: new is null, old holds the deleted row.
    let delete = Event::new(
        "Order",
        EventKind::Delete,
        "tb_order",
        None,
        Some(json!({"id": "order-123"})),
    );
    action.execute(&delete).await.unwrap();
    let body: Value = serde_json::from_str(&sink.last().body).unwrap();
    assert_eq!(body["event"], "DELETE");
    assert_eq!(body["data"]["new"], Value::Null);
    assert_eq!(body["data"]["old"]["id"], "order-123");
}

#[tokio::test]
async fn webhook_body_template_renders_and_escapes_json() {
    let sink = HttpSink::start().await;
    let mut config = webhook_config(&sink.url("/t"));
    config.body_template = Some(
        r#"{"order": "{{id}}", "note": "{{note}}", "total": {{total}}, "was": "{{old.status}}", "who": "{{customer.name}}", "row": {{_json}}, "event": "{{_event}}"}"#
            .into(),
    );
    let action = build_webhook(config, &no_env);
    let note = "He said \"hi\" \\ then\nleft";
    let event = Event::new(
        "Order",
        EventKind::Update,
        "tb_order",
        Some(
            json!({"id": "o-1", "status": "shipped", "total": 12.5, "note": note,
                    "customer": {"name": "Zoë"}}),
        ),
        Some(json!({"id": "o-1", "status": "paid"})),
    );
    action.execute(&event).await.unwrap();
    let req = sink.last();
    let body: Value = serde_json::from_str(&req.body)
        .unwrap_or_else(|e| panic!("template output is not JSON ({e}): {}", req.body));
    assert_eq!(body["order"], "o-1");
    assert_eq!(body["note"], note);
    assert_eq!(body["total"], 12.5);
    assert_eq!(body["was"], "paid");
    assert_eq!(body["who"], "Zoë");
    assert_eq!(body["row"], event.new.clone().unwrap());
    assert_eq!(body["event"], "UPDATE");
    assert_eq!(req.header("idempotency-key"), Some(event.id.as_str()));
}

#[tokio::test]
async fn webhook_text_template_is_not_escaped_and_missing_values_render_empty() {
    let sink = HttpSink::start().await;
    let mut config = webhook_config(&sink.url("/t"));
    config.body_template = Some(r#"Order {{id}} says "{{note}}" [{{customer.name}}]"#.into());
    config.headers = vec![("Content-Type".into(), "text/plain".into())];
    let action = build_webhook(config, &no_env);
    let event = Event::new(
        "Order",
        EventKind::Insert,
        "tb_order",
        Some(json!({"id": "o-2", "note": "a \"quoted\" word"})),
        None,
    );
    action.execute(&event).await.unwrap();
    action.execute(&event).await.unwrap();
    let req = sink.last();
    assert_eq!(req.body, r#"Order o-2 says "a "quoted" word" []"#);
    assert_eq!(req.header("content-type"), Some("text/plain"));
}

#[tokio::test]
async fn webhook_signature_verifies_with_the_documented_recipe() {
    let sink = HttpSink::start().await;
    let mut config = webhook_config(&sink.url("/signed"));
    config.secret_env = Some("HOOK_SECRET".into());
    let secret = "whsec-test-0123456789";
    let action = build_webhook(config, &env_of(&[("HOOK_SECRET", secret)]));
    action.execute(&insert_event()).await.unwrap();

    let req = sink.last();
    let header = req
        .header("x-fraiseql-signature")
        .expect("signature header");
    let (t, v1) = header
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("unexpected header format: {header}"));
    let t_num: u64 = t.parse().unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(t_num) < 60, "t={t_num} now={now}");

    // hex(HMAC-SHA256(secret, "<t>.<body>"))
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{}", req.body).as_bytes());
    let expected = hex::encode(mac.finalize().into_bytes());
    assert_eq!(v1, expected);
    assert_eq!(
        webhook::signature(secret.as_bytes(), t_num, req.body.as_bytes()),
        header
    );

    // A missing secret variable is a build error naming it.
    let mut config = webhook_config(&sink.url("/signed"));
    config.secret_env = Some("HOOK_SECRET".into());
    let err = build_err(ActionConfig::Webhook(config), &no_env);
    assert!(
        err.contains("HOOK_SECRET") && err.contains("secret_env"),
        "{err}"
    );
    assert!(err.contains("on_order"), "{err}");
}

#[tokio::test]
async fn webhook_status_codes_are_classified() {
    let sink = HttpSink::start().await;
    let action = build_webhook(webhook_config(&sink.url("/s")), &no_env);
    let event = insert_event();
    let long_body = "x".repeat(500);
    sink.script([
        Reply::status(500).body(long_body.clone()),
        Reply::status(502),
        Reply::status(503),
        Reply::status(408),
        Reply::status(429).header("Retry-After", "7"),
        Reply::status(503).header("Retry-After", "Wed, 21 Oct 2015 07:28:00 GMT"),
        Reply::status(400).body("{\"error\":\"bad payload\"}"),
        Reply::status(404),
        Reply::status(410),
        Reply::status(301).header("Location", "http://elsewhere.test/"),
        Reply::status(204),
        Reply::status(201),
    ]);

    let e = action.execute(&event).await.unwrap_err();
    assert!(e.retryable);
    assert!(
        e.message.starts_with("HTTP 500 Internal Server Error: xxx"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains(&format!("{}…", "x".repeat(200)))
            && !e.message.contains(&"x".repeat(201)),
        "only 200 body characters expected: {}",
        e.message
    );
    assert_eq!(e.retry_after, None);

    for status in [502, 503, 408] {
        let e = action.execute(&event).await.unwrap_err();
        assert!(e.retryable, "{status}: {e:?}");
        assert!(
            e.message.contains(&format!("HTTP {status}")),
            "{}",
            e.message
        );
    }

    let e = action.execute(&event).await.unwrap_err();
    assert!(e.retryable && e.message.contains("HTTP 429"), "{e:?}");
    assert_eq!(e.retry_after, Some(Duration::from_secs(7)));

    let e = action.execute(&event).await.unwrap_err();
    assert!(e.retryable);
    assert_eq!(
        e.retry_after,
        Some(Duration::ZERO),
        "a date in the past means now"
    );

    let e = action.execute(&event).await.unwrap_err();
    assert!(!e.retryable, "{e:?}");
    assert_eq!(
        e.message,
        "HTTP 400 Bad Request: {\"error\":\"bad payload\"}"
    );

    for status in [404, 410, 301] {
        let e = action.execute(&event).await.unwrap_err();
        assert!(!e.retryable, "{status}: {e:?}");
        assert!(
            e.message.contains(&format!("HTTP {status}")),
            "{}",
            e.message
        );
    }

    action.execute(&event).await.expect("204 is success");
    action.execute(&event).await.expect("201 is success");
    assert_eq!(sink.requests().len(), 12, "no redirect was followed");
}

#[tokio::test]
async fn webhook_timeout_and_connection_errors_are_retryable() {
    let sink = HttpSink::start().await;
    let mut config = webhook_config(&sink.url("/slow"));
    config.timeout_ms = 200;
    let action = build_webhook(config, &no_env);
    sink.script([Reply::status(200).delay(Duration::from_secs(3))]);
    let e = action.execute(&insert_event()).await.unwrap_err();
    assert!(e.retryable, "{e:?}");
    assert_eq!(e.message, "timed out after 200ms");

    let port = closed_port().await;
    let action = build_webhook(
        webhook_config(&format!("http://127.0.0.1:{port}/hook")),
        &no_env,
    );
    let e = action.execute(&insert_event()).await.unwrap_err();
    assert!(e.retryable, "{e:?}");
    assert!(e.message.starts_with("connection failed"), "{}", e.message);
}

#[tokio::test]
async fn webhook_headers_resolve_env_references_at_build_time() {
    let sink = HttpSink::start().await;
    let mut config = webhook_config(&sink.url("/h"));
    config.headers = vec![
        ("Authorization".into(), "Bearer ${API_TOKEN}".into()),
        ("X-Team".into(), "${TEAM:-core}".into()),
        ("X-Static".into(), "plain".into()),
    ];
    let env = env_of(&[("API_TOKEN", "tok-123")]);
    let action = build_webhook(config.clone(), &env);
    action.execute(&insert_event()).await.unwrap();
    let req = sink.last();
    assert_eq!(req.header("authorization"), Some("Bearer tok-123"));
    assert_eq!(req.header("x-team"), Some("core"));
    assert_eq!(req.header("x-static"), Some("plain"));

    let err = build_err(ActionConfig::Webhook(config), &no_env);
    assert!(
        err.contains("API_TOKEN") && err.contains("headers.Authorization"),
        "{err}"
    );

    let mut reserved = webhook_config(&sink.url("/h"));
    reserved.headers = vec![("idempotency-key".into(), "mine".into())];
    let err = build_err(ActionConfig::Webhook(reserved), &no_env);
    assert!(err.contains("Idempotency-Key is set by fraiseql"), "{err}");
}

#[tokio::test]
async fn webhook_url_env_is_read_at_build_time() {
    let sink = HttpSink::start().await;
    let mut config = webhook_config("unused");
    config.url = None;
    config.url_env = Some("SHIPPING_WEBHOOK_URL".into());
    let url = sink.url("/from-env");
    let action = build_webhook(config.clone(), &env_of(&[("SHIPPING_WEBHOOK_URL", &url)]));
    assert_eq!(
        action.describe(),
        format!("Webhook to http://{}/…", sink.addr)
    );
    action.execute(&insert_event()).await.unwrap();
    assert_eq!(sink.last().path, "/from-env");

    let err = build_err(ActionConfig::Webhook(config.clone()), &no_env);
    assert!(
        err.contains("SHIPPING_WEBHOOK_URL") && err.contains("url_env") && err.contains("not set"),
        "{err}"
    );

    let err = build_err(
        ActionConfig::Webhook(config),
        &env_of(&[("SHIPPING_WEBHOOK_URL", "ftp://user:hunter2-pw@host/x")]),
    );
    assert!(err.contains("SHIPPING_WEBHOOK_URL"), "{err}");
    assert_no_secrets(&err, &["hunter2-pw", "ftp://"]);
}

#[tokio::test]
async fn unknown_template_fields_are_build_errors_with_did_you_mean() {
    let mut config = webhook_config("http://127.0.0.1:9/");
    config.body_template = Some(r#"{"total": {{totl}}}"#.into());
    let err = build_err(ActionConfig::Webhook(config), &no_env);
    assert!(err.contains("on_order"), "{err}");
    assert!(err.contains("body_template"), "{err}");
    assert!(err.contains("unknown field `totl`"), "{err}");
    assert!(err.contains("did you mean `total`?"), "{err}");

    let err = build_err(
        ActionConfig::Slack(slack_config(
            "http://127.0.0.1:9/",
            Some("#sales"),
            "Order {id} is {stauts}",
        )),
        &no_env,
    );
    assert!(
        err.contains("message") && err.contains("did you mean `status`?"),
        "{err}"
    );

    let mut email = email_config(25, EmailTls::None);
    email.subject = "Order {idd}".into();
    let err = build_err(ActionConfig::Email(email), &no_env);
    assert!(
        err.contains("subject") && err.contains("did you mean `id`?"),
        "{err}"
    );

    // Without a declared entity nothing is checked.
    let mut config = webhook_config("http://127.0.0.1:9/");
    config.body_template = Some(r#"{"total": {{totl}}}"#.into());
    assert!(action::build("o", &ActionConfig::Webhook(config), None, &no_env).is_ok());
}

#[tokio::test]
async fn no_secret_appears_in_errors_or_descriptions() {
    let url_password = "pw-s3cret-url";
    let path_token = "T0KEN-in-path";
    let query_token = "q-s3cret-query";
    let header_token = "hdr-s3cret-value";
    let signing = "sign-s3cret-key";
    let secrets = [url_password, path_token, query_token, header_token, signing];
    let env = env_of(&[("API_TOKEN", header_token), ("SIGNING", signing)]);

    let sink = HttpSink::start().await;
    let url = format!(
        "http://hook-user:{url_password}@{}/hooks/{path_token}?token={query_token}",
        sink.addr
    );
    let mut config = webhook_config(&url);
    config.headers = vec![("Authorization".into(), "Bearer ${API_TOKEN}".into())];
    config.secret_env = Some("SIGNING".into());
    let action = build_webhook(config.clone(), &env);
    let describe = action.describe();
    assert_eq!(describe, format!("Webhook to http://{}/…", sink.addr));
    assert_no_secrets(&describe, &secrets);

    // A sink that echoes what it got into its error body.
    sink.script([Reply::status(401).body(format!(
        "denied: Authorization=Bearer {header_token} url={url} key={signing}"
    ))]);
    let e = action.execute(&insert_event()).await.unwrap_err();
    assert!(!e.retryable);
    assert!(e.message.starts_with("HTTP 401"), "{}", e.message);
    assert_no_secrets(&e.message, &secrets);
    // The request did carry them.
    let req = sink.last();
    assert_eq!(
        req.header("authorization"),
        Some(format!("Bearer {header_token}").as_str())
    );
    assert!(req.path.contains(path_token));

    // Timeout and connection errors.
    let mut slow = config.clone();
    slow.timeout_ms = 100;
    let action = build_webhook(slow, &env);
    sink.script([Reply::status(200).delay(Duration::from_secs(2))]);
    let e = action.execute(&insert_event()).await.unwrap_err();
    assert_no_secrets(&e.message, &secrets);

    let port = closed_port().await;
    let mut refused = config.clone();
    refused.url = Some(format!(
        "http://hook-user:{url_password}@127.0.0.1:{port}/hooks/{path_token}?token={query_token}"
    ));
    let action = build_webhook(refused, &env);
    let e = action.execute(&insert_event()).await.unwrap_err();
    assert!(e.retryable);
    assert_no_secrets(&e.message, &secrets);
    assert_no_secrets(&action.describe(), &secrets);

    // Slack: the webhook URL path is the secret.
    let slack_url = format!("{}/services/{path_token}", sink.url(""));
    let slack = action::build(
        "on_order",
        &ActionConfig::Slack(slack_config(&slack_url, Some("#ops"), "x")),
        None,
        &no_env,
    )
    .unwrap();
    assert_no_secrets(&slack.describe(), &secrets);
    sink.script([Reply::status(403).body(format!("invalid_token for {slack_url}"))]);
    let e = slack.execute(&insert_event()).await.unwrap_err();
    assert_no_secrets(&e.message, &secrets);

    // Build errors about a bad header never echo other values.
    let mut bad = config;
    bad.headers.push(("X-Bad".into(), "${MISSING_VAR}".into()));
    let err = build_err(ActionConfig::Webhook(bad), &env);
    assert!(err.contains("MISSING_VAR"), "{err}");
    assert_no_secrets(&err, &secrets);
}

#[tokio::test]
async fn engine_retries_a_webhook_until_it_succeeds() {
    let sink = HttpSink::start().await;
    sink.script([Reply::status(500), Reply::status(503), Reply::status(200)]);
    let action = build_webhook(webhook_config(&sink.url("/retry")), &no_env);
    let engine = Engine::new(
        vec![ObserverSpec::new(
            ListenerConfig::new("on_order", CheckpointStrategy::AtLeastOnce),
            "Order",
            EventKind::Insert,
        )
        .retry(RetryPolicy {
            max_attempts: 3,
            backoff: BackoffStrategy::Fixed,
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            jitter: false,
        })
        .action(action)],
        Arc::new(MemoryDlq::new(None)),
        &MemoryIdempotencyStores::default(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let event = insert_event();
    let report = engine.process(&event).await;
    assert_eq!(report.matched, 1);
    assert_eq!(report.dead_lettered, 0);
    let requests = sink.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests
        .iter()
        .all(|r| r.header("idempotency-key") == Some(event.id.as_str())));
    assert!(requests.iter().all(|r| r.body == requests[0].body));
}

// ---------------------------------------------------------------------------------------------
// Slack

fn slack_config(url: &str, channel: Option<&str>, message: &str) -> SlackConfig {
    SlackConfig {
        webhook_url: Some(url.to_owned()),
        webhook_url_env: None,
        channel: channel.map(str::to_owned),
        message: message.to_owned(),
    }
}

#[tokio::test]
async fn slack_posts_text_and_channel() {
    let sink = HttpSink::start().await;
    let action = action::build(
        "on_order",
        &ActionConfig::Slack(slack_config(
            &sink.url("/services/T/B/X"),
            Some("#sales"),
            ":tada: *Order {id}* ({total}) by {customer.name} — <https://shop.test|open>",
        )),
        Some(&order_entity()),
        &no_env,
    )
    .unwrap();
    assert_eq!(action.kind(), "slack");
    assert_eq!(action.describe(), "Slack notification to #sales");
    let event = Event::new(
        "Order",
        EventKind::Insert,
        "tb_order",
        Some(json!({"id": "o-9", "total": 1250, "customer": {"name": "Tom & <Jerry> \"TJ\""}})),
        None,
    );
    action.execute(&event).await.unwrap();
    let req = sink.last();
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/services/T/B/X");
    assert_eq!(req.header("content-type"), Some("application/json"));
    let body: Value = serde_json::from_str(&req.body).unwrap();
    assert_eq!(
        body,
        json!({
            "text": ":tada: *Order o-9* (1250) by Tom &amp; &lt;Jerry&gt; \"TJ\" — <https://shop.test|open>",
            "channel": "#sales",
        })
    );
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["text", "channel"]);
}

#[tokio::test]
async fn slack_without_channel_uses_old_row_on_delete_and_classifies_statuses() {
    let sink = HttpSink::start().await;
    let mut config = slack_config("unused", None, "Order {id} deleted (was {status})");
    config.webhook_url = None;
    config.webhook_url_env = Some("SLACK_WEBHOOK_URL".into());
    let url = sink.url("/services/x");
    let action = action::build(
        "on_order",
        &ActionConfig::Slack(config.clone()),
        None,
        &env_of(&[("SLACK_WEBHOOK_URL", &url)]),
    )
    .unwrap();
    assert_eq!(action.describe(), "Slack notification");
    let event = Event::new(
        "Order",
        EventKind::Delete,
        "tb_order",
        None,
        Some(json!({"id": "o-3", "status": "cancelled"})),
    );
    action.execute(&event).await.unwrap();
    let body: Value = serde_json::from_str(&sink.last().body).unwrap();
    assert_eq!(body, json!({"text": "Order o-3 deleted (was cancelled)"}));

    sink.script([
        Reply::status(500).body("rollup_error"),
        Reply::status(429).header("Retry-After", "3"),
        Reply::status(404).body("no_service"),
    ]);
    let e = action.execute(&event).await.unwrap_err();
    assert!(e.retryable && e.message.contains("rollup_error"), "{e:?}");
    let e = action.execute(&event).await.unwrap_err();
    assert!(e.retryable);
    assert_eq!(e.retry_after, Some(Duration::from_secs(3)));
    let e = action.execute(&event).await.unwrap_err();
    assert!(!e.retryable);
    assert_eq!(e.message, "HTTP 404 Not Found: no_service");

    let err = build_err(ActionConfig::Slack(config), &no_env);
    assert!(
        err.contains("SLACK_WEBHOOK_URL") && err.contains("webhook_url_env"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// email

fn email_config(port: u16, tls: EmailTls) -> EmailConfig {
    EmailConfig {
        from: "Shop <noreply@shop.test>".into(),
        to: vec!["ops@shop.test".into(), "sales@shop.test".into()],
        subject: "Order {id} is {status}".into(),
        body_template: "Order {id} for {customer.name}\nTotal: {total}\n".into(),
        smtp_host: Some("127.0.0.1".into()),
        smtp_host_env: None,
        smtp_port: port,
        smtp_user_env: None,
        smtp_password_env: None,
        tls,
    }
}

fn email_event() -> Event {
    Event::new(
        "Order",
        EventKind::Update,
        "tb_order",
        Some(json!({"id": "o-7", "status": "shipped", "total": 42.5, "customer": {"name": "Ann"}})),
        Some(json!({"id": "o-7", "status": "paid"})),
    )
}

fn build_email(config: EmailConfig, env: &dyn Fn(&str) -> Option<String>) -> Arc<dyn Action> {
    action::build(
        "on_order",
        &ActionConfig::Email(config),
        Some(&order_entity()),
        env,
    )
    .expect("build email")
}

#[tokio::test]
async fn email_is_delivered_in_plain_text_without_auth() {
    let sink = SmtpSink::start(false).await;
    let action = build_email(email_config(sink.port, EmailTls::None), &no_env);
    assert_eq!(action.kind(), "email");
    assert_eq!(action.describe(), "Email to ops@shop.test, sales@shop.test");
    let event = email_event();
    action.execute(&event).await.expect("delivered");
    action
        .execute(&event)
        .await
        .expect("delivered again (pooled connection)");

    let mails = sink.mails();
    assert_eq!(mails.len(), 2);
    let mail = &mails[0];
    assert_eq!(mail.from, "noreply@shop.test");
    assert_eq!(mail.to, ["ops@shop.test", "sales@shop.test"]);
    assert_eq!(mail.auth, None);
    assert!(
        mail.data.contains("\r\nSubject: Order o-7 is shipped\r\n")
            || mail.data.starts_with("Subject: Order o-7 is shipped\r\n"),
        "{}",
        mail.data
    );
    assert!(
        mail.data.contains("From: Shop <noreply@shop.test>"),
        "{}",
        mail.data
    );
    assert!(
        mail.data.contains("To: ops@shop.test, sales@shop.test"),
        "{}",
        mail.data
    );
    assert!(
        mail.data
            .contains("Content-Type: text/plain; charset=utf-8"),
        "{}",
        mail.data
    );
    assert!(
        mail.data.contains("Order o-7 for Ann\r\nTotal: 42.5"),
        "{}",
        mail.data
    );
    let message_id = format!("Message-ID: <{}.on_order@fraiseql>", event.id);
    assert!(mail.data.contains(&message_id), "{}", mail.data);
}

#[tokio::test]
async fn email_authenticates_with_credentials_from_env() {
    let sink = SmtpSink::start(true).await;
    let mut config = email_config(sink.port, EmailTls::None);
    config.smtp_host = None;
    config.smtp_host_env = Some("SMTP_HOST".into());
    config.smtp_user_env = Some("SMTP_USER".into());
    config.smtp_password_env = Some("SMTP_PASSWORD".into());
    let env = env_of(&[
        ("SMTP_HOST", "127.0.0.1"),
        ("SMTP_USER", "mailer@shop.test"),
        ("SMTP_PASSWORD", "smtp-s3cret-pw"),
    ]);
    let action = build_email(config.clone(), &env);
    action.execute(&email_event()).await.expect("delivered");
    let mails = sink.mails();
    assert_eq!(mails.len(), 1);
    assert_eq!(
        mails[0].auth,
        Some(("mailer@shop.test".to_owned(), "smtp-s3cret-pw".to_owned()))
    );
    assert!(mails[0].data.contains("Subject: Order o-7 is shipped"));

    let err = build_err(
        ActionConfig::Email(config),
        &env_of(&[
            ("SMTP_HOST", "127.0.0.1"),
            ("SMTP_USER", "mailer@shop.test"),
        ]),
    );
    assert!(
        err.contains("SMTP_PASSWORD") && err.contains("smtp_password_env"),
        "{err}"
    );
    assert_no_secrets(&err, &["mailer@shop.test"]);
}

#[tokio::test]
async fn email_failures_are_classified() {
    let sink = SmtpSink::start(false).await;
    let action = build_email(email_config(sink.port, EmailTls::None), &no_env);

    sink.set_rcpt_reply(Some("451 4.3.0 Mailbox temporarily unavailable"));
    let e = action.execute(&email_event()).await.unwrap_err();
    assert!(e.retryable, "{e:?}");
    assert!(e.message.contains("451"), "{}", e.message);

    sink.set_rcpt_reply(Some("550 5.1.1 No such user"));
    let e = action.execute(&email_event()).await.unwrap_err();
    assert!(!e.retryable, "{e:?}");
    assert!(e.message.contains("550"), "{}", e.message);

    sink.set_rcpt_reply(None);
    action.execute(&email_event()).await.expect("recovers");
    assert_eq!(sink.mails().len(), 1);

    // STARTTLS required but not offered: permanent, nothing sent in plain text.
    let required = build_email(email_config(sink.port, EmailTls::Required), &no_env);
    let e = required.execute(&email_event()).await.unwrap_err();
    assert!(!e.retryable, "{e:?}");
    assert_eq!(sink.mails().len(), 1);

    // Nothing listening: retryable.
    let port = closed_port().await;
    let refused = build_email(email_config(port, EmailTls::None), &no_env);
    let e = refused.execute(&email_event()).await.unwrap_err();
    assert!(e.retryable, "{e:?}");
}
