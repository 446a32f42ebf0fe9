use super::*;

const MAIN: &str = "fraiseql.toml";
const RUNTIME: &str = "fraiseql-observer.toml";

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn main_only(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
    Config::from_sources(Some((MAIN, text)), None, env)
}

fn errors_of(r: Result<Config, ConfigErrors>) -> Vec<String> {
    match r {
        Ok(c) => panic!("expected errors, got {c:#?}"),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

fn has(errors: &[String], needle: &str) -> bool {
    errors.iter().any(|e| e.contains(needle))
}

// ---------------------------------------------------------------- spec examples

/// The `[observers]` snippet of the NATS integration page.
#[test]
fn spec_nats_snippet() {
    let text = r#"
[observers]
enabled = true
backend = "nats"
nats_url = "${NATS_URL}" # e.g. nats://localhost:4222
"#;
    let cfg = main_only(text, &env_of(&[("NATS_URL", "nats://localhost:4222")])).unwrap();
    assert_eq!(cfg.observers.backend, Backend::Nats);
    assert!(cfg.observers.enabled);
    assert_eq!(
        cfg.observers.nats.url.as_deref(),
        Some("nats://localhost:4222")
    );
}

/// The runtime file exactly as the spec shows it.
const SPEC_RUNTIME: &str = r#"
[transport]
backend = "nats"
[transport.nats]
url = "${NATS_URL}"
stream_name = "fraiseql_events"
subject_prefix = "fraiseql.mutation"
consumer_name = "fraiseql_observer_worker"
[transport.nats.jetstream]
dedup_window_minutes = 5
max_age_days = 7
max_msgs = 10_000_000
max_bytes = 10_737_418_240 # 10 GB
ack_wait_secs = 30
max_deliver = 3
"#;

#[test]
fn spec_runtime_file() {
    let env = env_of(&[("NATS_URL", "nats://n1:4222,nats://n2:4222")]);
    let cfg = Config::from_sources(None, Some((RUNTIME, SPEC_RUNTIME)), &env).unwrap();
    let n = &cfg.observers.nats;
    assert_eq!(cfg.observers.backend, Backend::Nats);
    assert_eq!(n.url.as_deref(), Some("nats://n1:4222,nats://n2:4222"));
    assert_eq!(n.stream_name, "fraiseql_events");
    assert_eq!(n.subject_prefix, "fraiseql.mutation");
    assert_eq!(n.consumer_name, "fraiseql_observer_worker");
    assert_eq!(
        n.jetstream,
        JetStreamConfig {
            dedup_window_minutes: 5,
            max_age_days: 7,
            max_msgs: 10_000_000,
            max_bytes: 10_737_418_240,
            ack_wait_secs: 30,
            max_deliver: 3,
            replicas: 1,
        }
    );
}

/// Every key of fraiseql.toml, with non-default values.
const FULL_MAIN: &str = r##"
[database]
url = "${DATABASE_URL}"

[observers]
enabled = false
backend = "nats"
nats_url = "${NATS_URL}"
redis_url = "redis://localhost:6379/0"
max_dlq_size = 1000
run_bridge = true
http_port = 9090
auto_install = false
max_concurrency = 64
queue_capacity = 5_000
notify_channel = "app_changes"

[observers.nats]
url = "${NATS_URL}"
subject_prefix = "acme.mutation"
consumer_name = "acme_worker"
stream_name = "acme_events"

[observers.nats.jetstream]
dedup_window_minutes = 10
max_age_days = 14
max_msgs = 20000000
max_bytes = 1_000_000
ack_wait_secs = 45
max_deliver = -1
replicas = 3

[observers.bridge]
transport_name = "pg_to_nats"
batch_size = 250
poll_interval_secs = 2
notify_channel = "fraiseql_events"

[[observers.handlers]]
name = "on_order_shipped"
entity = "Order"                      # table tb_order unless table = "..."
event = "UPDATE"                      # INSERT | UPDATE | DELETE
condition = "status.changed() && status == 'shipped'"
retry = { max_attempts = 5, backoff_strategy = "exponential", initial_delay_ms = 200, max_delay_ms = 30000, jitter = false }
checkpoint = { strategy = "effectively_once", idempotency_table = "shipping_observer_keys" }
actions = [
  { type = "webhook", url_env = "SHIPPING_WEBHOOK_URL", headers = { Authorization = "${API_TOKEN}" } },
  { type = "slack", webhook_url_env = "SLACK_WEBHOOK_URL", channel = "#shipping", message = "Order {id} shipped" },
]

[[observers.handlers]]
name = "on_payment_failed"
entity = "PaymentAttempt"
table = "billing.payment_attempts"
event = "create"

[[observers.handlers.actions]]
type = "email"
from = "billing@example.com"
to = ["ops@example.com", "Finance <finance@example.com>"]
subject = "Payment {id} failed"
body_template = "Payment {id} failed: {reason}"
smtp_host_env = "SMTP_HOST"
smtp_port = 2525
smtp_user_env = "SMTP_USER"
smtp_password_env = "SMTP_PASSWORD"
tls = "opportunistic"

[[observers.handlers.actions]]
type = "webhook"
url = "https://hooks.example.com/payments"
body_template = "{\"id\": \"{{id}}\"}"
secret_env = "PAYMENT_HOOK_SECRET"
timeout_ms = 2500
headers = { "X-Source" = "fraiseql", Authorization = "Bearer ${API_TOKEN}" }
"##;

fn full_env() -> impl Fn(&str) -> Option<String> {
    env_of(&[
        ("DATABASE_URL", "postgres://app:pw@db/app"),
        ("NATS_URL", "nats://localhost:4222"),
        ("API_TOKEN", "s3cr3t"),
    ])
}

#[test]
fn full_main_file_every_key() {
    let cfg = main_only(FULL_MAIN, &full_env()).unwrap();
    assert_eq!(
        cfg.database.url.as_deref(),
        Some("postgres://app:pw@db/app")
    );
    let o = &cfg.observers;
    assert!(!o.enabled);
    assert_eq!(o.backend, Backend::Nats);
    assert_eq!(o.redis_url.as_deref(), Some("redis://localhost:6379/0"));
    assert_eq!(o.max_dlq_size, Some(1000));
    assert!(o.run_bridge);
    assert_eq!(o.http_port, 9090);
    assert!(!o.auto_install);
    assert_eq!(o.max_concurrency, 64);
    assert_eq!(o.queue_capacity, 5000);
    assert_eq!(o.notify_channel, "app_changes");
    assert_eq!(o.nats.url.as_deref(), Some("nats://localhost:4222"));
    assert_eq!(o.nats.subject_prefix, "acme.mutation");
    assert_eq!(o.nats.consumer_name, "acme_worker");
    assert_eq!(o.nats.stream_name, "acme_events");
    assert_eq!(
        o.nats.jetstream,
        JetStreamConfig {
            dedup_window_minutes: 10,
            max_age_days: 14,
            max_msgs: 20_000_000,
            max_bytes: 1_000_000,
            ack_wait_secs: 45,
            max_deliver: -1,
            replicas: 3,
        }
    );
    assert_eq!(
        o.bridge,
        BridgeConfig {
            transport_name: "pg_to_nats".into(),
            batch_size: 250,
            poll_interval_secs: 2,
            notify_channel: "fraiseql_events".into(),
            format: MessageFormat::Json,
        }
    );

    assert_eq!(o.handlers.len(), 2);
    let h = &o.handlers[0];
    assert_eq!(h.name, "on_order_shipped");
    assert_eq!(h.entity, "Order");
    assert_eq!(h.table, "tb_order");
    assert_eq!(h.event, "UPDATE");
    assert_eq!(
        h.condition.as_deref(),
        Some("status.changed() && status == 'shipped'")
    );
    assert_eq!(
        h.retry,
        RetryConfig {
            max_attempts: 5,
            backoff_strategy: BackoffStrategy::Exponential,
            initial_delay_ms: 200,
            max_delay_ms: 30_000,
            jitter: false,
        }
    );
    assert_eq!(
        h.checkpoint,
        CheckpointConfig::EffectivelyOnce {
            idempotency_table: "shipping_observer_keys".into()
        }
    );
    assert_eq!(h.origin, "fraiseql.toml:39");
    assert_eq!(
        h.actions[0],
        ActionConfig::Webhook(WebhookConfig {
            url: None,
            url_env: Some("SHIPPING_WEBHOOK_URL".into()),
            headers: vec![("Authorization".into(), "s3cr3t".into())],
            body_template: None,
            secret_env: None,
            signing_secret_env: None,
            format: WebhookFormat::Json,
            source: None,
            timeout_ms: 10_000,
        })
    );
    assert_eq!(
        h.actions[1],
        ActionConfig::Slack(SlackConfig {
            webhook_url: None,
            webhook_url_env: Some("SLACK_WEBHOOK_URL".into()),
            channel: Some("#shipping".into()),
            message: "Order {id} shipped".into(),
        })
    );

    let h = &o.handlers[1];
    assert_eq!(h.name, "on_payment_failed");
    assert_eq!(h.table, "billing.payment_attempts");
    assert_eq!(h.event, "INSERT");
    assert_eq!(h.condition, None);
    assert_eq!(h.retry, RetryConfig::default());
    assert_eq!(h.checkpoint, CheckpointConfig::AtLeastOnce);
    assert_eq!(h.origin, "fraiseql.toml:51");
    assert_eq!(h.actions.len(), 2);
    assert_eq!(h.actions[0].kind(), "email");
    assert_eq!(
        h.actions[0],
        ActionConfig::Email(EmailConfig {
            from: "billing@example.com".into(),
            to: vec![
                "ops@example.com".into(),
                "Finance <finance@example.com>".into()
            ],
            subject: "Payment {id} failed".into(),
            body_template: "Payment {id} failed: {reason}".into(),
            smtp_host: None,
            smtp_host_env: Some("SMTP_HOST".into()),
            smtp_port: 2525,
            smtp_user_env: Some("SMTP_USER".into()),
            smtp_password_env: Some("SMTP_PASSWORD".into()),
            tls: EmailTls::Opportunistic,
        })
    );
    assert_eq!(
        h.actions[1],
        ActionConfig::Webhook(WebhookConfig {
            url: Some("https://hooks.example.com/payments".into()),
            url_env: None,
            headers: vec![
                ("X-Source".into(), "fraiseql".into()),
                ("Authorization".into(), "Bearer s3cr3t".into())
            ],
            body_template: Some("{\"id\": \"{{id}}\"}".into()),
            secret_env: Some("PAYMENT_HOOK_SECRET".into()),
            signing_secret_env: None,
            format: WebhookFormat::Json,
            source: None,
            timeout_ms: 2500,
        })
    );
}

#[test]
fn spec_bridge_and_observers_snippets() {
    let text = r#"
[observers]
backend = "nats"
run_bridge = true
nats_url = "nats://localhost:4222"

[observers.bridge]
transport_name = "pg_to_nats"
batch_size = 100
poll_interval_secs = 1
notify_channel = "fraiseql_events"
"#;
    let cfg = main_only(text, &no_env).unwrap();
    assert!(cfg.observers.run_bridge);
    assert_eq!(cfg.observers.bridge.notify_channel, "fraiseql_events");

    let text = r#"
[observers]
backend = "redis"
redis_url = "${REDIS_URL}"
max_dlq_size = 1000 # drop newest entry + emit metric when cap reached
"#;
    let cfg = main_only(text, &env_of(&[("REDIS_URL", "redis://cache:6379")])).unwrap();
    assert_eq!(cfg.observers.backend, Backend::Redis);
    assert_eq!(
        cfg.observers.redis_url.as_deref(),
        Some("redis://cache:6379")
    );
    assert_eq!(cfg.observers.max_dlq_size, Some(1000));

    let cfg = main_only("[observers]\nbackend = \"in-memory\"\n", &no_env).unwrap();
    assert_eq!(cfg.observers.backend, Backend::InMemory);
    assert_eq!(cfg.observers.backend.as_str(), "in_memory");
}

// ---------------------------------------------------------------- defaults & precedence

#[test]
fn defaults() {
    let cfg = Config::from_sources(None, None, &no_env).unwrap();
    assert_eq!(cfg, Config::default_with_backend(Backend::Postgres));
    let o = &cfg.observers;
    assert!(o.enabled);
    assert_eq!(o.backend, Backend::Postgres);
    assert_eq!(o.redis_url, None);
    assert_eq!(o.max_dlq_size, None);
    assert!(!o.run_bridge);
    assert_eq!(o.http_port, 8080);
    assert!(o.auto_install);
    assert_eq!(o.max_concurrency, 256);
    assert_eq!(o.queue_capacity, 10_000);
    assert_eq!(o.notify_channel, "fraiseql_changes");
    assert_eq!(o.nats.url, None);
    assert_eq!(o.nats.subject_prefix, "fraiseql.mutation");
    assert_eq!(o.nats.consumer_name, "fraiseql_observer_worker");
    assert_eq!(o.nats.stream_name, "fraiseql_events");
    assert_eq!(o.nats.jetstream, JetStreamConfig::default());
    assert_eq!(o.nats.jetstream.max_bytes, 10_737_418_240);
    assert_eq!(o.bridge.transport_name, "pg_to_nats");
    assert_eq!(o.bridge.batch_size, 100);
    assert_eq!(o.bridge.poll_interval_secs, 1);
    assert_eq!(o.bridge.notify_channel, "fraiseql_changes");
    assert!(o.handlers.is_empty());
    assert_eq!(
        Config::default_with_backend(Backend::InMemory)
            .observers
            .backend,
        Backend::InMemory
    );

    // An empty file is the defaults too; the bridge listens where the source listens.
    let cfg = main_only("[observers]\nnotify_channel = \"app_changes\"\n", &no_env).unwrap();
    assert_eq!(cfg.observers.bridge.notify_channel, "app_changes");
}

#[test]
fn precedence_file_then_runtime_then_env() {
    let main = r#"
[observers]
backend = "postgres"
[observers.nats]
url = "nats://from-main:4222"
stream_name = "main_stream"
consumer_name = "main_consumer"
[observers.nats.jetstream]
max_deliver = 7
ack_wait_secs = 11
"#;
    let runtime = r#"
[transport]
backend = "nats"
[transport.nats]
url = "nats://from-runtime:4222"
stream_name = "runtime_stream"
[transport.nats.jetstream]
ack_wait_secs = 22
"#;
    // main only
    let cfg = main_only(main, &no_env).unwrap();
    assert_eq!(cfg.observers.backend, Backend::Postgres);
    assert_eq!(
        cfg.observers.nats.url.as_deref(),
        Some("nats://from-main:4222")
    );

    // runtime overrides main, key by key
    let cfg = Config::from_sources(Some((MAIN, main)), Some((RUNTIME, runtime)), &no_env).unwrap();
    let n = &cfg.observers.nats;
    assert_eq!(cfg.observers.backend, Backend::Nats);
    assert_eq!(n.url.as_deref(), Some("nats://from-runtime:4222"));
    assert_eq!(n.stream_name, "runtime_stream");
    assert_eq!(n.consumer_name, "main_consumer");
    assert_eq!(n.jetstream.ack_wait_secs, 22);
    assert_eq!(n.jetstream.max_deliver, 7);
    assert_eq!(n.subject_prefix, "fraiseql.mutation");

    // env overrides both
    let env = env_of(&[
        ("FRAISEQL_NATS_URL", "nats://from-env:4222"),
        ("FRAISEQL_NATS_ACK_WAIT_SECS", "33"),
    ]);
    let cfg = Config::from_sources(Some((MAIN, main)), Some((RUNTIME, runtime)), &env).unwrap();
    let n = &cfg.observers.nats;
    assert_eq!(n.url.as_deref(), Some("nats://from-env:4222"));
    assert_eq!(n.jetstream.ack_wait_secs, 33);
    assert_eq!(n.stream_name, "runtime_stream");
    assert_eq!(n.jetstream.max_deliver, 7);
}

#[test]
fn each_fraiseql_nats_override() {
    type Check = fn(&NatsConfig) -> bool;
    let cases: [(&str, &str, Check); 12] = [
        ("FRAISEQL_NATS_URL", "nats://e:4222", |n| {
            n.url.as_deref() == Some("nats://e:4222")
        }),
        ("FRAISEQL_NATS_SUBJECT_PREFIX", "env.prefix", |n| {
            n.subject_prefix == "env.prefix"
        }),
        ("FRAISEQL_NATS_CONSUMER_NAME", "env_consumer", |n| {
            n.consumer_name == "env_consumer"
        }),
        ("FRAISEQL_NATS_STREAM_NAME", "env_stream", |n| {
            n.stream_name == "env_stream"
        }),
        ("FRAISEQL_NATS_DEDUP_WINDOW_MINUTES", "9", |n| {
            n.jetstream.dedup_window_minutes == 9
        }),
        ("FRAISEQL_NATS_MAX_AGE_DAYS", "30", |n| {
            n.jetstream.max_age_days == 30
        }),
        ("FRAISEQL_NATS_MAX_MSGS", "5_000", |n| {
            n.jetstream.max_msgs == 5000
        }),
        ("FRAISEQL_NATS_MAX_BYTES", "-1", |n| {
            n.jetstream.max_bytes == -1
        }),
        ("FRAISEQL_NATS_ACK_WAIT_SECS", " 90 ", |n| {
            n.jetstream.ack_wait_secs == 90
        }),
        ("FRAISEQL_NATS_MAX_DELIVER", "10", |n| {
            n.jetstream.max_deliver == 10
        }),
        ("FRAISEQL_NATS_REPLICAS", "3", |n| n.jetstream.replicas == 3),
        ("FRAISEQL_NATS_PARTITIONS", "16", |n| n.partitions == 16),
    ];
    for (var, value, check) in cases {
        let env = env_of(&[(var, value)]);
        let cfg = Config::from_sources(Some((RUNTIME, SPEC_RUNTIME)), None, &env);
        // SPEC_RUNTIME as a main file is all unknown keys: use it as the runtime file instead.
        assert!(cfg.is_err());
        let cfg = Config::from_sources(
            None,
            Some((RUNTIME, SPEC_RUNTIME)),
            &env_of(&[(var, value), ("NATS_URL", "nats://file:4222")]),
        )
        .unwrap();
        assert!(check(&cfg.observers.nats), "{var}={value} not applied");
        // and only that one changed
        let mut expected = Config::from_sources(
            None,
            Some((RUNTIME, SPEC_RUNTIME)),
            &env_of(&[("NATS_URL", "nats://file:4222")]),
        )
        .unwrap();
        assert!(
            !check(&expected.observers.nats),
            "{var}: test value equals the file's"
        );
        expected.observers.nats = cfg.observers.nats.clone();
        assert_eq!(cfg, expected);
    }
}

#[test]
fn bad_env_override_names_the_variable() {
    let env = env_of(&[
        ("FRAISEQL_NATS_MAX_MSGS", "lots"),
        ("FRAISEQL_NATS_ACK_WAIT_SECS", "0"),
        ("FRAISEQL_NATS_STREAM_NAME", "a.b"),
        ("FRAISEQL_NATS_URL", "http://user:hunter2@x"),
        ("FRAISEQL_NATS_CONSUMER_NAME", "   "), // blank: ignored
    ]);
    let errs = errors_of(Config::from_sources(None, None, &env));
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert!(has(
        &errs,
        "environment: FRAISEQL_NATS_MAX_MSGS: expected -1 (unlimited) or a positive integer \
         (overrides observers.nats.jetstream.max_msgs), found \"lots\""
    ));
    assert!(has(
        &errs,
        "environment: FRAISEQL_NATS_ACK_WAIT_SECS: expected an integer between 1"
    ));
    assert!(has(&errs, "environment: FRAISEQL_NATS_STREAM_NAME: "));
    assert!(has(&errs, "environment: FRAISEQL_NATS_URL: "));
    assert!(!errs.iter().any(|e| e.contains("hunter2")));
}

#[test]
fn database_url_falls_back_to_env() {
    let env = env_of(&[("DATABASE_URL", "postgres://localhost/x")]);
    let cfg = Config::from_sources(None, None, &env).unwrap();
    assert_eq!(cfg.database.url.as_deref(), Some("postgres://localhost/x"));
    let cfg = main_only("[database]\nurl = \"postgres://file/y\"\n", &env).unwrap();
    assert_eq!(cfg.database.url.as_deref(), Some("postgres://file/y"));
}

// ---------------------------------------------------------------- interpolation

#[test]
fn interpolation_forms() {
    let text = r#"
[observers]
notify_channel = "${CHAN}"
[observers.nats]
subject_prefix = "${PREFIX:-fraiseql.default}"
stream_name = "${EMPTY:-fallback}"
consumer_name = "pre_${NAME}_post"
[observers.bridge]
transport_name = "cost$5"
"#;
    let env = env_of(&[("CHAN", "my_chan"), ("NAME", "x"), ("EMPTY", "")]);
    let cfg = main_only(text, &env).unwrap();
    assert_eq!(cfg.observers.notify_channel, "my_chan");
    assert_eq!(cfg.observers.nats.subject_prefix, "fraiseql.default");
    assert_eq!(cfg.observers.nats.stream_name, "fallback");
    assert_eq!(cfg.observers.nats.consumer_name, "pre_x_post");
    assert_eq!(cfg.observers.bridge.transport_name, "cost$5");

    let env = env_of(&[("PREFIX", "from.env")]);
    let cfg = main_only(
        "[observers.nats]\nsubject_prefix = \"${PREFIX:-d}\"\n",
        &env,
    )
    .unwrap();
    assert_eq!(cfg.observers.nats.subject_prefix, "from.env");

    // integers and booleans given as "${VAR}" strings
    let text = "[observers]\nhttp_port = \"${PORT:-9000}\"\nenabled = \"${ON}\"\n";
    let cfg = main_only(text, &env_of(&[("ON", "false")])).unwrap();
    assert_eq!(cfg.observers.http_port, 9000);
    assert!(!cfg.observers.enabled);
}

#[test]
fn unset_variable_error_names_variable_file_key_line() {
    let text = "\n[observers]\nbackend = \"nats\"\nnats_url = \"${NATS_URL}\"\n";
    let errs = errors_of(main_only(text, &no_env));
    assert_eq!(
        errs[0],
        "fraiseql.toml:4: observers.nats_url: environment variable NATS_URL is not set \
         (referenced as ${NATS_URL}; set it, or give a default with ${NATS_URL:-default})"
    );

    let errs = errors_of(main_only("[observers.nats]\nurl = \"${1BAD}\"\n", &no_env));
    assert!(has(
        &errs,
        "fraiseql.toml:2: observers.nats.url: invalid variable reference ${1BAD}"
    ));
    let errs = errors_of(main_only("[observers.nats]\nurl = \"${OOPS\"\n", &no_env));
    assert!(has(&errs, "unterminated variable reference"));
}

// ---------------------------------------------------------------- error reporting

#[test]
fn unknown_key_did_you_mean_with_line() {
    let text = "[observers]\nbackend = \"postgres\"\nmax_dlq_sise = 10\n";
    let errs = errors_of(main_only(text, &no_env));
    assert_eq!(
        errs,
        vec!["fraiseql.toml:3: observers.max_dlq_sise: unknown key (did you mean max_dlq_size?)"]
    );

    let text = "[observer]\nbackend = \"nats\"\n";
    let errs = errors_of(main_only(text, &no_env));
    assert_eq!(
        errs,
        vec!["fraiseql.toml:1: observer: unknown key (did you mean observers?)"]
    );

    let text = "[observers.nats.jetstream]\nmax_deliveries = 3\n";
    let errs = errors_of(main_only(text, &no_env));
    assert!(has(&errs, "fraiseql.toml:2: observers.nats.jetstream.max_deliveries: unknown key (did you mean max_deliver?)"));

    let text = "[transport.nats]\nsubjectprefix = \"a\"\n";
    let errs = errors_of(Config::from_sources(None, Some((RUNTIME, text)), &no_env));
    assert!(has(&errs, "fraiseql-observer.toml:2: transport.nats.subjectprefix: unknown key (did you mean subject_prefix?)"));

    // nothing close: list the valid keys
    let text = "[observers.bridge]\nzzz = 1\n";
    let errs = errors_of(main_only(text, &no_env));
    assert!(has(&errs, "observers.bridge.zzz: unknown key (expected one of: transport_name, batch_size, poll_interval_secs, format, notify_channel)"));
}

#[test]
fn type_errors_with_line() {
    let text = r#"
[observers]
enabled = "yes"
http_port = 70000
max_concurrency = 0
queue_capacity = 1.5
[observers.nats.jetstream]
max_msgs = "10"
max_deliver = 0
replicas = 7
"#;
    let errs = errors_of(main_only(text, &no_env));
    assert_eq!(
        errs,
        vec![
            "fraiseql.toml:3: observers.enabled: expected true or false, found string \"yes\"",
            "fraiseql.toml:4: observers.http_port: expected an integer between 0 and 65535, found 70000",
            "fraiseql.toml:5: observers.max_concurrency: expected a positive integer (at least 1), found 0",
            "fraiseql.toml:6: observers.queue_capacity: expected a positive integer (at least 1), found float 1.5",
            "fraiseql.toml:8: observers.nats.jetstream.max_msgs: expected -1 (unlimited) or a positive integer, found string \"10\"",
            "fraiseql.toml:9: observers.nats.jetstream.max_deliver: expected -1 (unlimited) or a positive integer, found 0",
            "fraiseql.toml:10: observers.nats.jetstream.replicas: expected an integer between 1 and 5, found 7",
        ]
    );
    let errs = errors_of(main_only("observers = 5\n", &no_env));
    assert_eq!(
        errs,
        vec!["fraiseql.toml:1: observers: expected a table, found integer 5"]
    );
}

#[test]
fn backend_typo_suggests() {
    let errs = errors_of(main_only("[observers]\nbackend = \"nast\"\n", &no_env));
    assert_eq!(
        errs,
        vec![
            "fraiseql.toml:2: observers.backend: expected one of \"postgres\", \"nats\", \"redis\", \"in_memory\", found \"nast\" (did you mean \"nats\"?)"
        ]
    );
}

#[test]
fn syntax_error_has_line_and_column() {
    let errs = errors_of(main_only("[observers]\nbackend = \n", &no_env));
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("fraiseql.toml:2:11: TOML syntax error: "),
        "{}",
        errs[0]
    );
    let e = Config::from_sources(Some((MAIN, "a = 1\na = 2\n")), None, &no_env).unwrap_err();
    assert_eq!((e.0[0].line, e.0[0].column), (Some(2), Some(1)));
    assert!(e.0[0].message.contains("duplicate key"));
    // the runtime file is still checked when the main one does not parse
    let e = Config::from_sources(
        Some((MAIN, "[observers\n")),
        Some((RUNTIME, "[transport]\nbakend = \"nats\"\n")),
        &no_env,
    )
    .unwrap_err();
    assert_eq!(e.len(), 2, "{e}");
    assert!(e.to_string().contains(
        "fraiseql-observer.toml:2: transport.bakend: unknown key (did you mean backend?)"
    ));
}

#[test]
fn nats_without_url_verbatim() {
    let errs = errors_of(main_only("[observers]\nbackend = \"nats\"\n", &no_env));
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("fraiseql.toml:2: observers.backend: "));
    assert!(errs[0].contains("NATS transport requires nats.url to be set"));

    // backend from the runtime file, empty url from interpolation
    let errs = errors_of(Config::from_sources(
        Some((MAIN, "[observers]\nnats_url = \"${NATS_URL:-}\"\n")),
        Some((RUNTIME, "[transport]\nbackend = \"nats\"\n")),
        &no_env,
    ));
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("fraiseql-observer.toml:2: transport.backend: "));
    assert!(errs[0].contains("NATS transport requires nats.url to be set"));
    assert!(errs[0].contains("observers.nats_url in fraiseql.toml is empty"));

    // any source is enough
    let env = env_of(&[("FRAISEQL_NATS_URL", "nats://x:4222")]);
    assert!(main_only("[observers]\nbackend = \"nats\"\n", &env).is_ok());
    assert!(Config::from_sources(
        Some((MAIN, "[observers]\nbackend = \"nats\"\n")),
        Some((RUNTIME, "[transport.nats]\nurl = \"nats://r:4222\"\n")),
        &no_env
    )
    .is_ok());
}

#[test]
fn run_bridge_without_nats_verbatim() {
    let text = "[observers]\nrun_bridge = true\n";
    let errs = errors_of(main_only(text, &no_env));
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("fraiseql.toml:2: observers.run_bridge: "));
    assert!(errs[0].contains("run_bridge=true requires transport=nats"));

    let text = "[observers]\nbackend = \"redis\"\nredis_url = \"redis://r\"\nrun_bridge = true\n";
    let errs = errors_of(main_only(text, &no_env));
    assert!(errs[0].contains("run_bridge=true requires transport=nats (backend is \"redis\", set by observers.backend in fraiseql.toml"));
}

#[test]
fn redis_without_url() {
    let errs = errors_of(main_only("[observers]\nbackend = \"redis\"\n", &no_env));
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with(
        "fraiseql.toml:2: observers.backend: redis backend requires observers.redis_url to be set"
    ));
    let errs = errors_of(main_only(
        "[observers]\nbackend = \"redis\"\nredis_url = \"http://x\"\n",
        &no_env,
    ));
    assert!(has(
        &errs,
        "fraiseql.toml:3: observers.redis_url: expected a Redis URL"
    ));
}

#[test]
fn nats_url_shorthand_conflict() {
    let text =
        "[observers]\nnats_url = \"nats://a:4222\"\n[observers.nats]\nurl = \"nats://b:4222\"\n";
    let errs = errors_of(main_only(text, &no_env));
    assert_eq!(
        errs,
        vec!["fraiseql.toml:2: observers.nats_url: conflicts with observers.nats.url (line 4): nats_url is shorthand for [observers.nats] url and the two differ; set only one"]
    );
    let text =
        "[observers]\nnats_url = \"nats://a:4222\"\n[observers.nats]\nurl = \"nats://a:4222\"\n";
    assert!(main_only(text, &no_env).is_ok());
}

#[test]
fn collects_every_error() {
    let text = r#"
[database]
url = 42

[observers]
backend = "nats"
run_bridge = true
max_dlq_sise = 10
http_port = -1
nats_url = "${MISSING}"

[observers.nats]
stream_name = "bad.name"

[[observers.handlers]]
name = "h"
entity = "Order"
event = "UPSERT"
retry = { backoff_strategy = "exponentail" }
actions = [{ type = "webhook" }]
"#;
    let errs = errors_of(main_only(text, &no_env));
    let expected = [
        "fraiseql.toml:3: database.url: expected a string, found integer 42",
        "fraiseql.toml:8: observers.max_dlq_sise: unknown key (did you mean max_dlq_size?)",
        "fraiseql.toml:9: observers.http_port: expected an integer between 0 and 65535, found -1",
        "fraiseql.toml:13: observers.nats.stream_name:",
        "fraiseql.toml:10: observers.nats_url: environment variable MISSING is not set",
        "fraiseql.toml:18: observers.handlers[0].event: expected one of \"INSERT\", \"UPDATE\", \"DELETE\", found \"UPSERT\"",
        "fraiseql.toml:19: observers.handlers[0].retry.backoff_strategy: expected one of \"fixed\", \"linear\", \"exponential\", found \"exponentail\" (did you mean \"exponential\"?)",
        "fraiseql.toml:20: observers.handlers[0].actions[0].url: webhook action: exactly one of url or url_env must be set, found neither",
    ];
    for e in expected {
        assert!(has(&errs, e), "missing {e:?} in {errs:#?}");
    }
    assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    // run_bridge is fine (backend is nats); the unreadable nats_url is reported once, without a
    // second "requires nats.url" error; the Display is one error per line
    let all = main_only(text, &no_env).unwrap_err();
    assert_eq!(all.to_string().lines().count(), expected.len());
}

// ---------------------------------------------------------------- handlers

fn handler_errors(handler_toml: &str) -> Vec<String> {
    let text = format!("[[observers.handlers]]\n{handler_toml}");
    errors_of(main_only(&text, &env_of(&[("API_TOKEN", "t")])))
}

const OK_ACTIONS: &str =
    "actions = [{ type = \"slack\", webhook_url_env = \"S\", message = \"m\" }]\n";

#[test]
fn handler_table_name_and_event_forms() {
    let text = format!(
        "[[observers.handlers]]\nname = \"a\"\nentity = \"OrderItem\"\nevent = \"delete\"\n{OK_ACTIONS}\
         [[observers.handlers]]\nname = \"b\"\nentity = \"HTTPRequest\"\nevent = \"Update\"\n{OK_ACTIONS}"
    );
    let cfg = main_only(&text, &no_env).unwrap();
    let hs = &cfg.observers.handlers;
    assert_eq!(
        (hs[0].table.as_str(), hs[0].event.as_str()),
        ("tb_order_item", "DELETE")
    );
    assert_eq!(
        (hs[1].table.as_str(), hs[1].event.as_str()),
        ("tb_http_request", "UPDATE")
    );
    assert_eq!(hs[0].origin, "fraiseql.toml:1");
    assert_eq!(hs[1].origin, "fraiseql.toml:6");
}

#[test]
fn bad_idempotency_table() {
    let errs = handler_errors(&format!(
        "name = \"a\"\nentity = \"Order\"\nevent = \"INSERT\"\n\
         checkpoint = {{ strategy = \"effectively_once\", idempotency_table = \"x; DROP TABLE y\" }}\n{OK_ACTIONS}"
    ));
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with(
        "fraiseql.toml:5: observers.handlers[0].checkpoint.idempotency_table: expected a SQL identifier"
    ));
    assert!(errs[0].contains("found \"x; DROP TABLE y\" (';' is not allowed)"));

    // default table; at_least_once with a table is an error; string form
    let text = format!(
        "[[observers.handlers]]\nname = \"a\"\nentity = \"Order\"\nevent = \"INSERT\"\n\
         checkpoint = {{ strategy = \"effectively_once\" }}\n{OK_ACTIONS}\
         [[observers.handlers]]\nname = \"b\"\nentity = \"Order\"\nevent = \"INSERT\"\n\
         checkpoint = \"effectively-once\"\n{OK_ACTIONS}"
    );
    let cfg = main_only(&text, &no_env).unwrap();
    for h in &cfg.observers.handlers {
        assert_eq!(
            h.checkpoint.idempotency_table(),
            Some("fraiseql_observer_idempotency")
        );
    }
    let errs = handler_errors(&format!(
        "name = \"a\"\nentity = \"Order\"\nevent = \"INSERT\"\n\
         checkpoint = {{ idempotency_table = \"keys\" }}\n{OK_ACTIONS}"
    ));
    assert!(has(&errs, "checkpoint.idempotency_table: idempotency_table is only used with strategy = \"effectively_once\""));
}

#[test]
fn bad_event_and_missing_keys() {
    let errs = handler_errors("event = \"INSRET\"\n");
    assert_eq!(
        errs,
        vec![
            "fraiseql.toml:1: observers.handlers[0].name: required key is missing (expected the handler's name, e.g. \"on_order_shipped\")",
            "fraiseql.toml:1: observers.handlers[0].entity: required key is missing (expected the entity type name, e.g. \"Order\")",
            "fraiseql.toml:2: observers.handlers[0].event: expected one of \"INSERT\", \"UPDATE\", \"DELETE\", found \"INSRET\" (did you mean \"INSERT\"?)",
            "fraiseql.toml:1: observers.handlers[0].actions: required key is missing: a handler needs at least one action (actions = [{ type = \"webhook\", ... }] or [[observers.handlers.actions]] tables)",
        ]
    );
    let errs = handler_errors(
        "name = \"a\"\nentity = \"Order\"\nevent = \"INSERT\"\nactions = []\nwhen = \"x\"\n",
    );
    assert!(has(
        &errs,
        "observers.handlers[0].actions: expected at least one action"
    ));
    assert!(has(
        &errs,
        "fraiseql.toml:6: observers.handlers[0].when: unknown key"
    ));
}

#[test]
fn bad_retry() {
    let base = "name = \"a\"\nentity = \"Order\"\nevent = \"INSERT\"\n";
    let errs = handler_errors(&format!(
        "{base}retry = {{ max_attempts = 0, backoff_strategy = \"exponentail\", jitter = 1, max_attemps = 2 }}\n{OK_ACTIONS}"
    ));
    assert_eq!(
        errs,
        vec![
            "fraiseql.toml:5: observers.handlers[0].retry.max_attemps: unknown key (did you mean max_attempts?)",
            "fraiseql.toml:5: observers.handlers[0].retry.max_attempts: expected an integer between 1 and 4294967295, found 0",
            "fraiseql.toml:5: observers.handlers[0].retry.backoff_strategy: expected one of \"fixed\", \"linear\", \"exponential\", found \"exponentail\" (did you mean \"exponential\"?)",
            "fraiseql.toml:5: observers.handlers[0].retry.jitter: expected true or false, found integer 1",
        ]
    );
    let errs = handler_errors(&format!(
        "{base}[observers.handlers.retry]\ninitial_delay_ms = 5000\nmax_delay_ms = 1000\n\
         [[observers.handlers.actions]]\ntype = \"slack\"\nwebhook_url = \"https://hooks.slack.com/x\"\nmessage = \"m\"\n"
    ));
    assert_eq!(
        errs,
        vec!["fraiseql.toml:7: observers.handlers[0].retry.max_delay_ms: max_delay_ms (1000) must be at least initial_delay_ms (5000)"]
    );
}

#[test]
fn duplicate_handler_names() {
    let h = format!("[[observers.handlers]]\nname = \"dup\"\nentity = \"Order\"\nevent = \"INSERT\"\n{OK_ACTIONS}");
    let errs = errors_of(main_only(&format!("{h}{h}"), &no_env));
    assert_eq!(
        errs,
        vec!["fraiseql.toml:7: observers.handlers[1].name: duplicate handler name \"dup\" (first defined at fraiseql.toml:1); handler names must be unique"]
    );
}

#[test]
fn action_errors() {
    let base = "name = \"a\"\nentity = \"Order\"\nevent = \"INSERT\"\n";
    let errs = handler_errors(&format!(
        "{base}actions = [\n\
         {{ type = \"webhook\", url = \"https://a\", url_env = \"B\" }},\n\
         {{ type = \"slack\", webhook_url = \"ftp://user:pw@x\", channel = \"general\" }},\n\
         {{ type = \"email\", from = \"nobody\", to = [], smtp_host = \"h\", smtp_user_env = \"U\", tls = \"always\" }},\n\
         {{ type = \"webhok\" }},\n\
         {{ type = \"webhook\", url_env = \"${{API_TOKEN}}\", headers = {{ Authorization = 5 }} }},\n\
         {{ type = \"webhook\", url_env = \"https://secret.example/x\", timout_ms = 5 }},\n\
         ]\n"
    ));
    let expected = [
        "fraiseql.toml:6: observers.handlers[0].actions[0].url_env: webhook action: url and url_env are mutually exclusive; set only one",
        "fraiseql.toml:7: observers.handlers[0].actions[1].webhook_url: expected a URL starting with http:// or https://, found \"ftp://…\"",
        "fraiseql.toml:7: observers.handlers[0].actions[1].channel: expected a channel starting with # or a user starting with @, found \"general\"",
        "fraiseql.toml:7: observers.handlers[0].actions[1].message: required key is missing",
        "fraiseql.toml:8: observers.handlers[0].actions[2].from: expected an email address like \"ops@example.com\", found \"nobody\"",
        "fraiseql.toml:8: observers.handlers[0].actions[2].to: expected at least one recipient, found an empty array",
        "fraiseql.toml:8: observers.handlers[0].actions[2].subject: required key is missing",
        "fraiseql.toml:8: observers.handlers[0].actions[2].body_template: required key is missing",
        "fraiseql.toml:8: observers.handlers[0].actions[2].smtp_password_env: smtp_user_env is set but smtp_password_env is not",
        "fraiseql.toml:8: observers.handlers[0].actions[2].tls: expected one of \"required\", \"opportunistic\", \"none\", found \"always\"",
        "fraiseql.toml:9: observers.handlers[0].actions[3].type: expected one of \"webhook\", \"slack\", \"email\", found \"webhok\" (did you mean \"webhook\"?)",
        "fraiseql.toml:10: observers.handlers[0].actions[4].url_env: expected the name of an environment variable, found a ${...} reference",
        "fraiseql.toml:10: observers.handlers[0].actions[4].headers.Authorization: expected a string, found integer 5",
        "fraiseql.toml:11: observers.handlers[0].actions[5].timout_ms: unknown key (did you mean timeout_ms?)",
        "fraiseql.toml:11: observers.handlers[0].actions[5].url_env: expected the name of an environment variable, found what looks like a URL",
    ];
    for e in expected {
        assert!(has(&errs, e), "missing {e:?} in {errs:#?}");
    }
    assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    for e in &errs {
        assert!(
            !e.contains("pw@") && !e.contains("secret.example"),
            "leak: {e}"
        );
    }
}

#[test]
fn secrets_stay_out_of_errors_and_debug() {
    let text = r#"
[database]
url = "postgres://app:dbpass@db:5432/app"
[observers]
backend = "nats"
nats_url = "nats://u:natspass@n:4222"
[[observers.handlers]]
name = "a"
entity = "Order"
event = "INSERT"
actions = [
  { type = "webhook", url = "https://h.example/hook?token=qtoken", headers = { Authorization = "${API_TOKEN}" } },
  { type = "slack", webhook_url = "https://hooks.slack.com/services/T/B/slacksecret", message = "m" },
]
"#;
    let cfg = main_only(text, &env_of(&[("API_TOKEN", "Bearer hdrsecret")])).unwrap();
    let debug = format!("{cfg:?}");
    for secret in ["dbpass", "natspass", "qtoken", "hdrsecret", "slacksecret"] {
        assert!(!debug.contains(secret), "{secret} in {debug}");
    }
    assert!(debug.contains("Authorization"));
    assert!(debug.contains("nats://u:***@n:4222"));

    // a table where a string was expected: the string is not echoed for header-ish keys
    let errs = handler_errors(
        "name = \"a\"\nentity = \"O\"\nevent = \"INSERT\"\nactions = [{ type = \"webhook\", url_env = \"U\", headers = \"Bearer hdrsecret\" }]\n",
    );
    assert!(has(&errs, "headers: expected a table, found a string"));
    assert!(!errs.iter().any(|e| e.contains("hdrsecret")));
}

// ---------------------------------------------------------------- public helpers

fn value(text: &str) -> toml::Value {
    toml::Value::Table(text.parse::<toml::Table>().unwrap())
}

#[test]
fn parse_handler_from_value() {
    let v = value(
        r##"
name = "on_high_value_order"
entity = "Order"
event = "INSERT"
condition = "total > 1000"
retry = { max_attempts = 5, backoff_strategy = "linear", initial_delay_ms = 200, max_delay_ms = 30_000 }
actions = [
  { type = "webhook", url_env = "ORDER_WEBHOOK_URL", headers = { Authorization = "${API_TOKEN}" } },
  { type = "slack", webhook_url_env = "SLACK_WEBHOOK_URL", channel = "#sales", message = "High-value order {id}: {total}" },
]
"##,
    );
    let origin = "schema.py: observer on_high_value_order";
    let h = parse_handler(&v, origin, &env_of(&[("API_TOKEN", "tok")])).unwrap();
    assert_eq!(h.origin, origin);
    assert_eq!(h.table, "tb_order");
    assert_eq!(h.retry.backoff_strategy, BackoffStrategy::Linear);
    assert_eq!(h.retry.backoff_strategy.as_str(), "linear");
    assert!(h.retry.jitter);
    assert_eq!(h.actions.len(), 2);

    let errs = parse_handler(&v, origin, &no_env).unwrap_err();
    assert_eq!(
        errs.to_string(),
        "schema.py: observer on_high_value_order: actions[0].headers.Authorization: environment \
         variable API_TOKEN is not set (referenced as ${API_TOKEN}; set it, or give a default \
         with ${API_TOKEN:-default})"
    );
    assert_eq!(errs.0[0].line, None);
}

#[test]
fn parse_action_and_retry_from_value() {
    let a = parse_action(
        &value("type = \"email\"\nfrom = \"a@b.c\"\nto = \"d@e.f\"\nsubject = \"s\"\nbody_template = \"b\"\nsmtp_host = \"${SMTP:-localhost}\""),
        "schema.py",
        &no_env,
    )
    .unwrap();
    let ActionConfig::Email(e) = a else {
        panic!("not an email action")
    };
    assert_eq!(e.to, vec!["d@e.f".to_string()]);
    assert_eq!(e.smtp_host.as_deref(), Some("localhost"));
    assert_eq!(e.smtp_port, 587);
    assert_eq!(e.tls, EmailTls::Required);

    let errs = parse_action(
        &value("type = \"slack\"\nmessage = \"\""),
        "schema.py",
        &no_env,
    )
    .unwrap_err();
    assert_eq!(
        errs.to_string(),
        "schema.py: webhook_url: slack action: exactly one of webhook_url or webhook_url_env must be set, found neither\n\
         schema.py: message: expected a non-empty string, found an empty one"
    );

    assert_eq!(
        parse_retry(&value("max_attempts = 1"), "x").unwrap(),
        RetryConfig {
            max_attempts: 1,
            ..RetryConfig::default()
        }
    );
    let errs = parse_retry(
        &value("backoff_strategy = \"random\""),
        "schema.py: charge_customer",
    )
    .unwrap_err();
    assert_eq!(
        errs.to_string(),
        "schema.py: charge_customer: backoff_strategy: expected one of \"fixed\", \"linear\", \"exponential\", found \"random\""
    );
    assert_eq!(
        parse_checkpoint(
            &value(
                "strategy = \"effectively_once\"\nidempotency_table = \"billing_observer_keys\""
            ),
            "x"
        )
        .unwrap(),
        CheckpointConfig::EffectivelyOnce {
            idempotency_table: "billing_observer_keys".into()
        }
    );
}

#[test]
fn sql_identifiers() {
    for ok in ["keys", "_k1", "public.keys", &"a".repeat(63)] {
        assert!(validate_sql_identifier(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "x; DROP TABLE y",
        "1abc",
        "a.b.c",
        "a.",
        "bad-name",
        "\"quoted\"",
        &"a".repeat(64),
    ] {
        assert!(validate_sql_identifier(bad).is_err(), "{bad}");
    }
}

#[test]
fn snake_case_names() {
    assert_eq!(handler::snake_case("Order"), "order");
    assert_eq!(handler::snake_case("OrderItem"), "order_item");
    assert_eq!(handler::snake_case("HTTPRequest"), "http_request");
    assert_eq!(handler::snake_case("user"), "user");
    assert_eq!(handler::snake_case("Order2Item"), "order2_item");
}

#[test]
fn load_reads_files_and_reports_missing() {
    let dir = std::env::temp_dir().join(format!("fraiseql-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let main = dir.join("fraiseql.toml");
    std::fs::write(&main, "[observers]\nbackend = \"in_memory\"\n").unwrap();
    let cfg = Config::load(Some(&main), None).unwrap();
    assert_eq!(cfg.observers.backend, Backend::InMemory);

    let missing = dir.join("nope.toml");
    let errs = Config::load(Some(&missing), None).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs.0[0].file, missing.display().to_string());
    assert!(errs.to_string().contains("cannot read configuration file"));

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[observers]\nbackend = \"nope\"\n").unwrap();
    let errs = Config::load(Some(&bad), None).unwrap_err();
    assert!(errs
        .to_string()
        .starts_with(&format!("{}:2: observers.backend:", bad.display())));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn backend_from_str_and_redact() {
    assert_eq!("In-Memory".parse::<Backend>().unwrap(), Backend::InMemory);
    assert_eq!(Backend::parse("postgresql"), Some(Backend::Postgres));
    assert!("kafka".parse::<Backend>().is_err());
    // The rules are `crate::redact`'s; config's Debug uses them.
    assert_eq!(
        redact_url("nats://u:p@a:4222,nats://b:4222"),
        "nats://u:***@a:4222,nats://b:4222"
    );
}

// ---------------------------------------------------------------- [observers.redis]

#[test]
fn redis_section_defaults_and_values() {
    let cfg = main_only(
        "[observers]\nbackend = \"redis\"\nredis_url = \"rediss://u:p@r:6380/2\"\n",
        &no_env,
    )
    .unwrap();
    let r = &cfg.observers.redis;
    assert_eq!(r.stream, "fraiseql:changes");
    assert_eq!(r.group, "fraiseql");
    assert_eq!(
        (r.maxlen, r.claim_idle_secs, r.max_deliver),
        (1_000_000, 30, 5)
    );
    assert_eq!(r.forwarder_name, "pg_to_redis");

    let text = "[observers]\nbackend = \"redis\"\nredis_url = \"redis://r\"\n\
                [observers.redis]\nstream = \"s:1\"\ngroup = \"g\"\nmaxlen = 10\n\
                claim_idle_secs = 2\nmax_deliver = 7\nblock_ms = 50\nbatch_size = 9\n\
                forwarder_name = \"fwd\"\n";
    let r = main_only(text, &no_env).unwrap().observers.redis;
    assert_eq!((r.stream.as_str(), r.group.as_str()), ("s:1", "g"));
    assert_eq!(
        (r.maxlen, r.claim_idle_secs, r.max_deliver, r.block_ms),
        (10, 2, 7, 50)
    );
    assert_eq!((r.batch_size, r.forwarder_name.as_str()), (9, "fwd"));
}

#[test]
fn redis_section_unknown_key_and_bad_values() {
    let text = "[observers]\nbackend = \"redis\"\nredis_url = \"redis://r\"\n\
                [observers.redis]\nmax_delivery = 3\nclaim_idle_secs = 0\nstream = \"a b\"\n";
    let errs = errors_of(main_only(text, &no_env));
    assert!(has(
        &errs,
        "fraiseql.toml:5: observers.redis.max_delivery: unknown key (did you mean max_deliver?)"
    ));
    assert!(has(
        &errs,
        "fraiseql.toml:6: observers.redis.claim_idle_secs:"
    ));
    assert!(has(
        &errs,
        "fraiseql.toml:7: observers.redis.stream: expected a name without spaces"
    ));
}

// ---------------------------------------------------------------- NATS files

/// A fresh directory for one test's files.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "fraiseql-config-{}-{name}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

fn user_seed() -> String {
    nkeys::KeyPair::new_user().seed().unwrap()
}

fn creds_text(seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln\n\
         ------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
}

fn nats_with(url: &str, extra: &str) -> String {
    format!("[observers]\nbackend = \"nats\"\n\n[observers.nats]\nurl = \"{url}\"\n{extra}")
}

#[test]
fn nats_nkey_and_credentials_files_are_read() {
    let dir = scratch("auth-ok");
    let seed = user_seed();
    let nk = write(&dir, "user.nk", &format!("{seed}\n"));
    let creds = write(&dir, "user.creds", &creds_text(&user_seed()));

    let text = nats_with("nats://n:4222", &format!("nkey_file = \"{nk}\"\n"));
    let cfg = main_only(&text, &no_env).unwrap();
    assert_eq!(cfg.observers.nats.nkey_file.as_deref(), Some(nk.as_str()));
    assert_eq!(cfg.observers.nats.credentials_file, None);
    let read = crate::config::nats_auth::read_nkey_seed(&nk).unwrap();
    assert_eq!(read.seed(), seed);
    assert!(read.public_key().starts_with('U'));
    assert!(
        !format!("{read:?} {cfg:?}").contains(&seed),
        "Debug never shows the seed"
    );

    let text = nats_with(
        "nats://n:4222",
        &format!("credentials_file = \"{creds}\"\n"),
    );
    let cfg = main_only(&text, &no_env).unwrap();
    assert_eq!(
        cfg.observers.nats.credentials_file.as_deref(),
        Some(creds.as_str())
    );

    // the runtime file's [transport.nats], and a seed file with decoration lines
    let decorated = write(
        &dir,
        "decorated.nk",
        &format!("-----BEGIN USER NKEY SEED-----\n  {seed}  \n------END USER NKEY SEED------\n"),
    );
    let runtime = format!("[transport.nats]\nnkey_file = \"{decorated}\"\n");
    let cfg = Config::from_sources(
        Some((MAIN, &nats_with("nats://n:4222", ""))),
        Some((RUNTIME, &runtime)),
        &no_env,
    )
    .unwrap();
    assert_eq!(
        cfg.observers.nats.nkey_file.as_deref(),
        Some(decorated.as_str())
    );
}

#[test]
fn nats_auth_file_that_is_missing_is_an_error_with_file_and_line() {
    let dir = scratch("auth-missing");
    let missing = dir.join("nope.creds");
    let missing = missing.to_str().unwrap();
    let text = nats_with(
        "nats://n:4222",
        &format!(
            "credentials_file = \"{missing}\"\nnkey_file = \"{}\"\n",
            dir.display()
        ),
    );
    let errs = errors_of(main_only(&text, &no_env));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0].starts_with(&format!(
        "fraiseql.toml:6: observers.nats.credentials_file: cannot read \"{missing}\": "
    )));
    assert!(
        errs[1].starts_with(&format!(
            "fraiseql.toml:7: observers.nats.nkey_file: cannot read \"{}\": ",
            dir.display()
        )),
        "{errs:#?}"
    );
}

#[test]
fn nats_nkey_file_without_a_valid_user_seed_names_the_file_not_the_seed() {
    let dir = scratch("auth-bad-seed");
    let seed = user_seed();
    // one character changed: the checksum no longer matches
    let mut chars: Vec<char> = seed.chars().collect();
    chars[20] = if chars[20] == 'A' { 'B' } else { 'A' };
    let broken: String = chars.into_iter().collect();
    let account = nkeys::KeyPair::new_account().seed().unwrap();
    let cases = [
        (
            "broken.nk",
            broken.clone(),
            "does not hold a valid nkey seed: its checksum does not match",
        ),
        (
            "short.nk",
            seed[..30].to_string(),
            "does not hold a valid nkey seed: it is 30 characters long, a seed has 58",
        ),
        (
            "public.nk",
            nkeys::KeyPair::new_user().public_key(),
            "holds no nkey seed (expected a line starting with \"SU\"",
        ),
        ("empty.nk", String::new(), "holds no nkey seed"),
        (
            "account.nk",
            account.clone(),
            "holds an account nkey seed; a client authenticates with a user seed (\"SU…\")",
        ),
    ];
    for (name, content, want) in cases {
        let path = write(&dir, name, &content);
        let text = nats_with("nats://n:4222", &format!("nkey_file = \"{path}\"\n"));
        let errs = errors_of(main_only(&text, &no_env));
        let expected = format!("fraiseql.toml:6: observers.nats.nkey_file: \"{path}\" {want}");
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(errs[0].starts_with(&expected), "{name}: {errs:#?}");
        if content.len() > 8 {
            assert!(
                !errs[0].contains(&content[2..]),
                "{name}: the key is never shown"
            );
        }
    }
}

#[test]
fn nats_credentials_file_that_is_not_a_creds_file() {
    let dir = scratch("auth-bad-creds");
    let jwt_only = write(
        &dir,
        "jwt-only.creds",
        "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.c2ln\n------END NATS USER JWT------\n",
    );
    let text = nats_with(
        "nats://n:4222",
        &format!("credentials_file = \"{jwt_only}\"\n"),
    );
    let errs = errors_of(main_only(&text, &no_env));
    assert_eq!(
        errs,
        [format!(
            "fraiseql.toml:6: observers.nats.credentials_file: \"{jwt_only}\" is not a NATS \
             credentials file (cannot parse nkey from the credentials file); expected the user \
             JWT and nkey seed blocks that `nsc generate creds` writes"
        )]
    );
}

#[test]
fn nats_credentials_file_and_nkey_file_together_conflict() {
    let dir = scratch("auth-both");
    let nk = write(&dir, "user.nk", &user_seed());
    let creds = write(&dir, "user.creds", &creds_text(&user_seed()));
    let text = nats_with(
        "nats://n:4222",
        &format!("credentials_file = \"{creds}\"\nnkey_file = \"{nk}\"\n"),
    );
    let errs = errors_of(main_only(&text, &no_env));
    assert_eq!(
        errs,
        ["fraiseql.toml:7: observers.nats.nkey_file: conflicts with \
          observers.nats.credentials_file (line 6): a credentials file already holds the user's \
          nkey seed (with its JWT); set only one of credentials_file and nkey_file"]
    );

    // across files: named with the other file
    let runtime = format!("[transport.nats]\nnkey_file = \"{nk}\"\n");
    let main = nats_with(
        "nats://n:4222",
        &format!("credentials_file = \"{creds}\"\n"),
    );
    let errs = errors_of(Config::from_sources(
        Some((MAIN, &main)),
        Some((RUNTIME, &runtime)),
        &no_env,
    ));
    assert!(
        has(
            &errs,
            "fraiseql-observer.toml:2: transport.nats.nkey_file: conflicts with \
             observers.nats.credentials_file in fraiseql.toml:"
        ),
        "{errs:#?}"
    );
}

#[test]
fn nats_auth_file_with_credentials_in_the_url_conflicts() {
    let dir = scratch("auth-url");
    let nk = write(&dir, "user.nk", &user_seed());
    let creds = write(&dir, "user.creds", &creds_text(&user_seed()));

    let text = nats_with(
        "nats://a:4222,nats://fraiseql:s3cret@b:4222",
        &format!("nkey_file = \"{nk}\"\n"),
    );
    let errs = errors_of(main_only(&text, &no_env));
    assert_eq!(
        errs,
        [
            "fraiseql.toml:6: observers.nats.nkey_file: cannot be combined with a user, password \
          or token in the NATS URL, set by observers.nats.url (line 5); authenticate one way only"
        ]
    );
    assert!(!errs[0].contains("s3cret"));

    // a token in FRAISEQL_NATS_URL, with the shorthand nats_url in the file
    let text = format!(
        "[observers]\nbackend = \"nats\"\nnats_url = \"nats://n:4222\"\n\n\
         [observers.nats]\ncredentials_file = \"{creds}\"\n"
    );
    let env = env_of(&[("FRAISEQL_NATS_URL", "tok3n@n:4222")]);
    let errs = errors_of(main_only(&text, &env));
    assert_eq!(
        errs,
        [
            "fraiseql.toml:6: observers.nats.credentials_file: cannot be combined with a user, \
          password or token in the NATS URL, set by FRAISEQL_NATS_URL; authenticate one way only"
        ]
    );

    // no credentials in the URL: fine ('@' in a path or query does not count)
    let text = nats_with("nats://n:4222/?x=a@b", &format!("nkey_file = \"{nk}\"\n"));
    assert!(main_only(&text, &no_env).is_ok());
}

#[test]
fn nats_tls_files_are_checked_when_the_config_is_read() {
    let dir = scratch("tls");
    let missing = dir.join("ca.pem");
    let missing = missing.to_str().unwrap();
    let text = nats_with(
        "tls://n:4222",
        &format!(
            "tls_ca_file = \"{missing}\"\ntls_cert_file = \"{}\"\n",
            dir.display()
        ),
    );
    let errs = errors_of(main_only(&text, &no_env));
    assert!(
        has(
            &errs,
            &format!("fraiseql.toml:6: observers.nats.tls_ca_file: cannot read \"{missing}\"")
        ),
        "{errs:#?}"
    );
    assert!(
        has(
            &errs,
            &format!(
                "fraiseql.toml:7: observers.nats.tls_cert_file: \"{}\" is not a file",
                dir.display()
            )
        ),
        "{errs:#?}"
    );
    assert!(
        has(
            &errs,
            "fraiseql.toml:7: observers.nats.tls_cert_file: a client certificate needs both \
             tls_cert_file and tls_key_file; tls_key_file is missing"
        ),
        "{errs:#?}"
    );
}

// ---------------------------------------------------------------- facts

#[test]
fn facts_are_read_even_when_the_config_does_not_load() {
    let main = r#"
[database]
url = "${PG_URL:-postgres://localhost/x}"

[observers]
redis_url = "${REDIS_URL}"
"#;
    let runtime = "[transport]\nbackend = \"nats\"\n";
    let none = |_: &str| None;
    let facts = Config::facts(
        Some(("fraiseql.toml", main)),
        Some(("fraiseql-observer.toml", runtime)),
        &none,
    );
    assert_eq!(
        facts.backend,
        Backend::Nats,
        "the runtime file's backend counts"
    );
    assert!(facts.uses_nats);
    assert_eq!(facts.database_url_env.as_deref(), Some("PG_URL"));
    assert_eq!(facts.nats_url, None);
    assert!(Config::from_sources(Some(("fraiseql.toml", main)), None, &none).is_err());

    let literal = "[database]\nurl = \"postgres://db/app\"\n[observers]\nrun_bridge = true\n";
    let facts = Config::facts(Some(("fraiseql.toml", literal)), None, &none);
    assert_eq!(facts.database_url_env, None, "a URL of its own");
    assert!(facts.uses_nats && facts.backend == Backend::Postgres);
    let nothing = Config::facts(Some(("fraiseql.toml", "")), None, &none);
    assert_eq!(nothing.database_url_env.as_deref(), Some("DATABASE_URL"));
    assert!(!nothing.uses_nats);
}

#[test]
fn unknown_keys_are_reported_in_file_order_among_the_other_errors() {
    let text = r#"
[observers]
http_port = "eighty"

[observers.bridge]
batch_sise = 5

[observers.redis]
maxlen = 0
"#;
    let errs = main_only(text, &env_of(&[])).unwrap_err();
    let lines: Vec<Option<usize>> = errs.iter().map(|e| e.line).collect();
    assert_eq!(lines, [Some(3), Some(6), Some(9)], "{errs}");
    assert!(errs.0[1]
        .to_string()
        .ends_with("observers.bridge.batch_sise: unknown key (did you mean batch_size?)"));
}

// ---------------------------------------------------------------- capture

#[test]
fn postgres_capture_keys_parse_and_bad_values_say_what_is_expected() {
    let c = main_only(
        r#"
[observers.postgres]
capture = "Logical"
publication = "orders_pub"
max_retained_wal = "512MB"
retention = "36h"
stall_warning_secs = "${STALL:-12}"
"#,
        &no_env,
    )
    .unwrap();
    let pg = &c.observers.postgres;
    assert_eq!(pg.capture, Capture::Logical);
    assert_eq!(pg.publication, "orders_pub");
    assert_eq!(pg.max_retained_wal, 512 << 20);
    assert_eq!(pg.retention, std::time::Duration::from_secs(36 * 3600));
    assert_eq!(pg.stall_warning_secs, 12);
    let defaults = Config::default();
    assert_eq!(defaults.observers.postgres.capture, Capture::Auto);
    assert_eq!(defaults.observers.postgres.max_retained_wal, 1 << 30);

    let errors = errors_of(main_only(
        r#"
[observers.postgres]
capture = "logcal"
publication = "a; DROP"
max_retained_wal = "lots"
retention = "7 weeks"
stall_warning_secs = 0
"#,
        &no_env,
    ));
    assert_eq!(errors.len(), 5, "{errors:#?}");
    assert!(has(&errors, "fraiseql.toml:3: observers.postgres.capture: expected one of \"auto\", \"logical\", \"trigger\", found \"logcal\" (did you mean \"logical\"?)"), "{errors:#?}");
    assert!(
        has(
            &errors,
            "observers.postgres.publication: expected a SQL identifier"
        ),
        "{errors:#?}"
    );
    assert!(
        has(
            &errors,
            "observers.postgres.max_retained_wal: expected a size such as \"512MB\""
        ),
        "{errors:#?}"
    );
    assert!(
        has(
            &errors,
            "observers.postgres.retention: expected a duration such as"
        ),
        "{errors:#?}"
    );
    assert!(
        has(
            &errors,
            "observers.postgres.stall_warning_secs: expected an integer between 1 and 86400"
        ),
        "{errors:#?}"
    );
}

#[test]
fn sizes_and_durations() {
    use super::reader::{parse_duration, parse_size};
    assert_eq!(parse_size("1GB"), Some(1 << 30));
    assert_eq!(parse_size(" 64 kB "), Some(64 << 10));
    assert_eq!(parse_size("1_000"), Some(1000));
    assert_eq!(parse_size("1.5GB"), None);
    assert_eq!(parse_size("-1"), None);
    assert_eq!(
        parse_size("99999999999TB"),
        None,
        "overflow is an error, not a wrap"
    );
    assert_eq!(
        parse_duration("90s"),
        Some(std::time::Duration::from_secs(90))
    );
    assert_eq!(
        parse_duration("7d"),
        Some(std::time::Duration::from_secs(604_800))
    );
    assert_eq!(
        parse_duration("3600"),
        Some(std::time::Duration::from_secs(3600))
    );
    assert_eq!(parse_duration("1w"), None);
    assert_eq!(parse_duration(""), None);
}

#[test]
fn nats_partitions_are_read_and_bounded() {
    let cfg = main_only("[observers.nats]\npartitions = 16\n", &no_env).unwrap();
    assert_eq!(cfg.observers.nats.partitions, 16);
    assert_eq!(
        main_only("", &no_env).unwrap().observers.nats.partitions,
        0,
        "off by default"
    );
    for bad in ["-1", "1025", "\"8\"", "2.5"] {
        let errs = errors_of(main_only(
            &format!("[observers.nats]\npartitions = {bad}\n"),
            &no_env,
        ));
        assert!(
            has(
                &errs,
                "fraiseql.toml:2: observers.nats.partitions: expected"
            ),
            "{bad}: {errs:?}"
        );
    }
    let env = env_of(&[("FRAISEQL_NATS_PARTITIONS", "4096")]);
    let errs = errors_of(main_only("", &env));
    assert!(
        has(&errs, "expected an integer between 0 and 1024 (overrides observers.nats.partitions), found \"4096\""),
        "{errs:?}"
    );
    let errs = errors_of(main_only("[observers.nats]\npartition = 4\n", &no_env));
    assert!(
        has(&errs, "unknown key (did you mean partitions?)"),
        "{errs:?}"
    );
}
