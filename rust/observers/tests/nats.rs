//! The NATS JetStream transport against a real server ([`services::nats_url`]: the one in
//! FRAISEQL_TEST_NATS_URL, on the standard port, or started for this test binary). Each test
//! uses its own stream and subject prefix and deletes the stream at the end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, stream::StorageType};
use async_trait::async_trait;
use fraiseql_observers::config::NatsConfig;
use fraiseql_observers::dlq::MemoryDlq;
use fraiseql_observers::dlq::PushOutcome;
use fraiseql_observers::order::OrderKeys;
use fraiseql_observers::transport::codec::subject_for;
use fraiseql_observers::transport::nats::{connect, ensure_consumer, ensure_stream};
use fraiseql_observers::{
    bridge, Action, ActionError, Backend, CheckpointStrategy, Config, DeadLetterQueue, DlqEntry,
    Engine, EntityDef, Event, EventKind, ListenerConfig, MemoryIdempotencyStores, Metrics,
    NatsMetrics, NatsPublisher, NatsSource, ObserverSpec, Schema,
};
use serde_json::{json, Value};
use tokio::sync::watch;

mod poison;
mod services;

fn nats_url() -> String {
    services::nats_url()
}

/// A config with a unique stream, prefix and consumer.
fn config(tag: &str) -> NatsConfig {
    let suffix: u32 = rand::random();
    let mut c = NatsConfig {
        url: Some(nats_url()),
        subject_prefix: format!("fqtest.{tag}{suffix:08x}"),
        consumer_name: format!("fqtest_{tag}_{suffix:08x}_worker"),
        stream_name: format!("fqtest_{tag}_{suffix:08x}"),
        ..NatsConfig::default()
    };
    c.jetstream.max_age_days = 1;
    c.jetstream.max_bytes = 512 * 1024 * 1024;
    c
}

async fn setup(config: &NatsConfig) -> (async_nats::Client, jetstream::Context) {
    let client = tokio::time::timeout(Duration::from_secs(20), connect(config))
        .await
        .expect("connect timed out")
        .expect("connect");
    let js = jetstream::new(client.clone());
    (client, js)
}

async fn cleanup(js: &jetstream::Context, config: &NatsConfig) {
    js.delete_stream(&config.stream_name)
        .await
        .expect("delete stream");
}

fn order(kind: EventKind, n: usize) -> Event {
    let row = json!({"id": format!("ord_{n}"), "total": n as f64 * 1.5, "status": "pending"});
    let (new, old) = match kind {
        EventKind::Insert => (Some(row), None),
        EventKind::Update => (
            Some(row.clone()),
            Some(json!({"id": format!("ord_{n}"), "status": "new"})),
        ),
        EventKind::Delete => (None, Some(row)),
    };
    Event::new("Order", kind, "tb_order", new, old)
}

fn orders(n: usize) -> Vec<Event> {
    (0..n).map(|i| order(EventKind::ALL[i % 3], i)).collect()
}

async fn stream_messages(js: &jetstream::Context, config: &NatsConfig) -> u64 {
    let mut stream = js.get_stream(&config.stream_name).await.unwrap();
    stream.info().await.unwrap().state.messages
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts the events it sees, per id.
#[derive(Default)]
struct Counting {
    seen: Mutex<HashMap<String, usize>>,
    delay: Duration,
}

impl Counting {
    fn with_delay(delay: Duration) -> Arc<Counting> {
        Arc::new(Counting {
            delay,
            ..Default::default()
        })
    }
    fn total(&self) -> usize {
        self.seen.lock().unwrap().values().sum()
    }
    fn distinct(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    fn snapshot(&self) -> HashMap<String, usize> {
        self.seen.lock().unwrap().clone()
    }
}

#[async_trait]
impl Action for Counting {
    fn kind(&self) -> &'static str {
        "counting"
    }
    async fn execute(&self, event: &Event) -> Result<(), ActionError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        *self
            .seen
            .lock()
            .unwrap()
            .entry(event.id.clone())
            .or_default() += 1;
        Ok(())
    }
}

fn engine(action: &Arc<Counting>) -> Arc<Engine> {
    let specs = EventKind::ALL
        .iter()
        .map(|&kind| {
            ObserverSpec::new(
                ListenerConfig::new(
                    format!("count_{}", kind.as_lower()),
                    CheckpointStrategy::AtLeastOnce,
                ),
                "Order",
                kind,
            )
            .action(action.clone() as Arc<dyn Action>)
        })
        .collect();
    Arc::new(
        Engine::new(
            specs,
            Arc::new(MemoryDlq::new(None)),
            &MemoryIdempotencyStores::default(),
            Arc::new(Metrics::new()),
        )
        .unwrap(),
    )
}

/// Waits until the durable consumer has acknowledged everything up to `last_seq`.
async fn wait_ack_floor(js: &jetstream::Context, config: &NatsConfig, last_seq: u64) {
    let stream = js.get_stream(&config.stream_name).await.unwrap();
    eventually(
        "consumer ack floor at the end",
        Duration::from_secs(20),
        || {
            let stream = stream.clone();
            async move {
                let info = stream.consumer_info(&config.consumer_name).await.unwrap();
                info.ack_floor.stream_sequence >= last_seq && info.num_ack_pending == 0
            }
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn stream_and_consumer_get_the_configured_limits() {
    let mut cfg = config("limits");
    cfg.jetstream.dedup_window_minutes = 2;
    cfg.jetstream.max_age_days = 3;
    cfg.jetstream.max_msgs = 5_000;
    cfg.jetstream.max_bytes = 10 * 1024 * 1024;
    cfg.jetstream.ack_wait_secs = 7;
    cfg.jetstream.max_deliver = 4;
    let (client, js) = setup(&cfg).await;

    let mut stream = ensure_stream(&js, &cfg).await.unwrap();
    let info = stream.info().await.unwrap().config.clone();
    assert_eq!(info.subjects, vec![format!("{}.>", cfg.subject_prefix)]);
    assert_eq!(info.storage, StorageType::File);
    assert_eq!(info.retention, jetstream::stream::RetentionPolicy::Limits);
    assert_eq!(info.max_age, Duration::from_secs(3 * 86_400));
    assert_eq!(info.max_messages, 5_000);
    assert_eq!(info.max_bytes, 10 * 1024 * 1024);
    assert_eq!(info.duplicate_window, Duration::from_secs(120));

    let consumer = ensure_consumer(&stream, &cfg).await.unwrap();
    let ci = consumer.cached_info().config.clone();
    assert_eq!(ci.durable_name.as_deref(), Some(cfg.consumer_name.as_str()));
    assert_eq!(ci.ack_policy, jetstream::consumer::AckPolicy::Explicit);
    assert_eq!(ci.ack_wait, Duration::from_secs(7));
    // One more than configured: the engine dead-letters that delivery without running it.
    assert_eq!(ci.max_deliver, 5);
    assert_eq!(ci.max_ack_pending, 1024);

    // Ensuring again with new limits updates the existing stream.
    cfg.jetstream.max_msgs = 6_000;
    cfg.jetstream.dedup_window_minutes = 1;
    let mut stream = ensure_stream(&js, &cfg).await.unwrap();
    let info = stream.info().await.unwrap().config.clone();
    assert_eq!(info.max_messages, 6_000);
    assert_eq!(info.duplicate_window, Duration::from_secs(60));
    ensure_consumer(&stream, &cfg).await.unwrap();

    // Health: connected, names the stream.
    let source = NatsSource::new(client.clone(), &cfg, NatsMetrics::new(), 4)
        .await
        .unwrap();
    let health = source.health();
    assert!(health.healthy());
    assert_eq!(
        health.observers(),
        json!({"transport": "nats", "connected": true, "stream": cfg.stream_name})
    );
    cleanup(&js, &cfg).await;
}

#[tokio::test]
async fn an_immutable_setting_that_differs_is_a_clear_error() {
    let cfg = config("immut");
    let (_client, js) = setup(&cfg).await;
    let mut existing = fraiseql_observers::transport::nats::stream_config(&cfg);
    existing.storage = StorageType::Memory;
    js.create_stream(existing).await.unwrap();
    let err = ensure_stream(&js, &cfg).await.unwrap_err().to_string();
    assert!(err.contains("storage"), "{err}");
    assert!(err.contains(&cfg.stream_name), "{err}");
    cleanup(&js, &cfg).await;
}

#[tokio::test]
async fn the_same_event_id_published_twice_is_stored_once() {
    let cfg = config("dedup");
    let (client, js) = setup(&cfg).await;
    ensure_stream(&js, &cfg).await.unwrap();
    let publisher = NatsPublisher::new(client, &cfg, NatsMetrics::new());
    let event = order(EventKind::Insert, 1);
    publisher.publish(&event).await.unwrap();
    publisher.publish(&event).await.unwrap();
    publisher
        .publish_all(&[event.clone(), event])
        .await
        .unwrap();
    assert_eq!(stream_messages(&js, &cfg).await, 1);
    cleanup(&js, &cfg).await;
}

#[tokio::test]
async fn publish_all_stores_every_event() {
    let cfg = config("bulk");
    let (client, js) = setup(&cfg).await;
    ensure_stream(&js, &cfg).await.unwrap();
    let metrics = NatsMetrics::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let publisher = NatsPublisher::new(client, &cfg, metrics.clone());
    let events = orders(10_000);
    publisher.publish_all(&events).await.unwrap();
    assert_eq!(stream_messages(&js, &cfg).await, 10_000);
    assert_eq!(metrics.published.get(), 10_000);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("fraiseql_nats_messages_published_total 10000"),
        "{text}"
    );
    assert!(
        text.contains("fraiseql_nats_publish_latency_seconds_count 10000"),
        "{text}"
    );
    cleanup(&js, &cfg).await;
}

#[tokio::test]
async fn a_pipelined_batch_reports_the_events_it_could_not_publish() {
    let cfg = config("pipe");
    let (client, js) = setup(&cfg).await;
    ensure_stream(&js, &cfg).await.unwrap();
    let publisher = NatsPublisher::new(client.clone(), &cfg, NatsMetrics::new()).with_window(2);
    let mut events = orders(6);
    // An entity that cannot be a subject token fails before it is sent.
    events[3].entity = "Bad.Entity".into();
    assert_eq!(publisher.publish_pipelined(&events).await, vec![3]);
    assert_eq!(stream_messages(&js, &cfg).await, 5);

    // A prefix no stream captures: every PubAck is a "no responders" at once.
    let mut elsewhere = cfg.clone();
    elsewhere.subject_prefix = format!("{}x", cfg.subject_prefix.replace('.', "_"));
    let stray = NatsPublisher::new(client, &elsewhere, NatsMetrics::new());
    let started = std::time::Instant::now();
    assert_eq!(stray.publish_pipelined(&orders(4)).await, vec![0, 1, 2, 3]);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(stream_messages(&js, &cfg).await, 5);
    cleanup(&js, &cfg).await;
}

/// A core NATS subscriber on `{prefix}.>` (no stream captures it) that answers every publish
/// with a JetStream error at once, and counts what it received.
async fn refusing_responder(client: &async_nats::Client, prefix: &str) -> Arc<Mutex<usize>> {
    let received = Arc::new(Mutex::new(0));
    let mut sub = client.subscribe(format!("{prefix}.>")).await.unwrap();
    let (count, answering) = (received.clone(), client.clone());
    tokio::spawn(async move {
        while let Some(msg) = futures::StreamExt::next(&mut sub).await {
            *count.lock().unwrap() += 1;
            if let Some(reply) = msg.reply {
                let refusal = r#"{"error":{"code":503,"err_code":10077,"description":"refused"}}"#;
                let _ = answering.publish(reply, refusal.into()).await;
            }
        }
    });
    client.flush().await.unwrap();
    received
}

#[tokio::test]
async fn a_change_the_bridge_cannot_publish_is_sent_bridge_attempts_times_in_all() {
    let cfg = config("attempts");
    let (client, _js) = setup(&cfg).await;
    let sent = refusing_responder(&client, &cfg.subject_prefix).await;
    let publisher = Arc::new(NatsPublisher::new(client, &cfg, NatsMetrics::new()));
    let schema = Schema::new(vec![EntityDef {
        name: "Order".into(),
        table: "tb_order".into(),
        fields: Vec::new(),
        kinds: Vec::new(),
    }])
    .unwrap();
    let dlq = Arc::new(MemoryDlq::new(None));
    let engine = Engine::new(
        bridge::bridge_observers(&schema, publisher.clone(), "pg_to_nats"),
        dlq.clone(),
        &MemoryIdempotencyStores::default(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let event = order(EventKind::Insert, 1);
    // What the bridge does with a batch: one pipelined attempt, then the engine for the rest.
    assert_eq!(
        fraiseql_observers::transport::Publisher::publish_batch(publisher.as_ref(), &[&event])
            .await,
        Some(vec![0])
    );
    let report = engine.process_after(&event, 1).await;
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(*sent.lock().unwrap(), bridge::BRIDGE_ATTEMPTS as usize);
    let [entry] = dlq.list(10).await.unwrap().try_into().unwrap();
    assert_eq!(entry.attempts, bridge::BRIDGE_ATTEMPTS);
    assert!(entry.error.contains("refused"), "{}", entry.error);
}

/// An event whose row holds `bytes` of text.
fn large_order(n: usize, bytes: usize) -> Event {
    let mut event = order(EventKind::Insert, n);
    event.new.as_mut().unwrap()["note"] = json!("x".repeat(bytes));
    event
}

#[tokio::test]
async fn a_change_larger_than_max_payload_fails_at_once_and_the_connection_stays_up() {
    let cfg = config("toolarge");
    let (client, js) = setup(&cfg).await;
    ensure_stream(&js, &cfg).await.unwrap();
    let limit = client.server_info().max_payload;
    let publisher = NatsPublisher::new(client.clone(), &cfg, NatsMetrics::new());
    let big = large_order(1, 2 * limit);
    let started = std::time::Instant::now();
    let err = publisher.publish(&big).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2), "not retried");
    let fraiseql_observers::Error::Publish(p) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        p.kind(),
        fraiseql_observers::error::PublishErrorKind::TooLarge
    );
    let message = err.to_string();
    assert!(
        message.contains(&format!("max_payload of {limit} bytes")),
        "{message}"
    );
    assert!(message.contains(&big.id), "{message}");
    // Just under the limit goes through; in a batch only the big one is set aside.
    let fits = large_order(2, limit - 1024);
    publisher.publish_once(&fits).await.unwrap();
    let batch = [
        order(EventKind::Insert, 3),
        big,
        order(EventKind::Insert, 4),
    ];
    assert_eq!(publisher.publish_pipelined(&batch).await, vec![1]);
    assert_eq!(stream_messages(&js, &cfg).await, 3);
    assert_eq!(
        client.connection_state(),
        async_nats::connection::State::Connected
    );
    cleanup(&js, &cfg).await;
}

fn dead_letter(observer: &str, event: &Event) -> DlqEntry {
    let now = fraiseql_observers::event::now_rfc3339();
    DlqEntry {
        id: 0,
        origin: fraiseql_observers::dlq::DlqOrigin::Forwarder,
        raw: None,
        event: event.clone(),
        observer: observer.into(),
        action_index: 0,
        action: "nats_publish".into(),
        error: "cannot publish: timed out".into(),
        attempts: 5,
        first_failed_at: now.clone(),
        last_failed_at: now,
    }
}

/// A config running the bridge `pg_to_nats` on `cfg`, and a schema of one entity, Order.
fn bridge_of_orders(cfg: &NatsConfig) -> (Config, Schema) {
    let mut config = Config::default_with_backend(Backend::Nats);
    config.observers.nats = cfg.clone();
    config.observers.run_bridge = true;
    config.observers.bridge.transport_name = "pg_to_nats".into();
    let schema = Schema::new(vec![EntityDef {
        name: "Order".into(),
        table: "tb_order".into(),
        fields: Vec::new(),
        kinds: Vec::new(),
    }])
    .unwrap();
    (config, schema)
}

/// Pushes `entry` into `dlq`, which must store it; its id.
async fn stored(dlq: &Arc<dyn DeadLetterQueue>, entry: DlqEntry) -> u64 {
    match dlq.push(entry).await.unwrap() {
        PushOutcome::Stored(id) => id,
        PushOutcome::Overflow => panic!("unbounded queue"),
    }
}

#[tokio::test]
async fn dlq_retry_publishes_a_dead_lettered_bridge_change_again() {
    let cfg = config("dlqretry");
    let (_client, js) = setup(&cfg).await;
    let (mut config, schema) = bridge_of_orders(&cfg);
    let dlq: Arc<dyn DeadLetterQueue> = Arc::new(MemoryDlq::new(None));
    let event = order(EventKind::Insert, 7);
    let push = |observer: &'static str| {
        let (dlq, entry) = (dlq.clone(), dead_letter(observer, &event));
        async move { stored(&dlq, entry).await }
    };
    let metrics = Arc::new(Metrics::new());
    let keys = Arc::new(OrderKeys::default());
    let retry = |id| {
        let keys = keys.clone();
        bridge::retry_forwarded(&config, &schema, dlq.clone(), metrics.clone(), keys, id)
    };

    // The stream does not exist yet: the retry's publisher creates it, as the bridge does.
    let id = push("pg_to_nats:Order:insert").await;
    assert!(retry(id).await.unwrap());
    assert!(
        dlq.get(id).await.unwrap().is_none(),
        "delivered entries are removed"
    );
    assert_eq!(stream_messages(&js, &cfg).await, 1);
    // The same change dead-lettered twice is stored once (same Nats-Msg-Id).
    let again = push("pg_to_nats:Order:insert").await;
    assert!(retry(again).await.unwrap());
    assert_eq!(stream_messages(&js, &cfg).await, 1);
    let stream = js.get_stream(&cfg.stream_name).await.unwrap();
    let stored = stream
        .get_last_raw_message_by_subject(&subject_for(&cfg.subject_prefix, &event).unwrap())
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&stored.payload).unwrap();
    assert_eq!(body["id"], json!(event.id));

    // A forwarder's entry of a listener id the config does not run is refused, and kept.
    let id = push("pg_to_nats_b:Order:insert").await;
    let err = retry(id).await.unwrap_err().to_string();
    assert!(err.contains("not declared any more"), "{err}");
    assert!(dlq.get(id).await.unwrap().is_some());
    // Without a forwarder in the config, it says so.
    config.observers.run_bridge = false;
    let retry = |id| {
        let keys = keys.clone();
        bridge::retry_forwarded(&config, &schema, dlq.clone(), metrics.clone(), keys, id)
    };
    let err = retry(id).await.unwrap_err().to_string();
    assert!(err.contains("runs none"), "{err}");
    cleanup(&js, &cfg).await;
}

#[tokio::test]
async fn a_dead_lettered_bridge_change_retried_goes_back_to_its_keys_partition() {
    let mut cfg = config("dlqpart");
    cfg.partitions = 4;
    let (_client, js) = setup(&cfg).await;
    let (config, schema) = bridge_of_orders(&cfg);
    // The observers order Order inserts by customer, not by id.
    let mut keys = OrderKeys::default();
    keys.add("Order", EventKind::Insert, &["customer".to_owned()]);
    let by_id = OrderKeys::default();
    // A customer whose partition differs from the one the row's id would give.
    let event = (0..64)
        .map(|c| {
            let mut event = order(EventKind::Insert, 7);
            event.new.as_mut().unwrap()["customer"] = json!(format!("cus_{c}"));
            event
        })
        .find(|e| keys.partition(e, 4) != by_id.partition(e, 4))
        .expect("a customer in another partition");
    let dlq: Arc<dyn DeadLetterQueue> = Arc::new(MemoryDlq::new(None));
    let id = stored(&dlq, dead_letter("pg_to_nats:Order:insert", &event)).await;
    let metrics = Arc::new(Metrics::new());
    let retried =
        bridge::retry_forwarded(&config, &schema, dlq, metrics, Arc::new(keys.clone()), id);
    assert!(retried.await.unwrap());
    let subject = format!(
        "{}.{}",
        subject_for(&cfg.subject_prefix, &event).unwrap(),
        keys.partition(&event, 4)
    );
    let stream = js.get_stream(&cfg.stream_name).await.unwrap();
    let stored = stream
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&stored.payload).unwrap();
    assert_eq!(body["id"], json!(event.id));
    cleanup(&js, &cfg).await;
}

#[tokio::test]
async fn the_message_has_the_spec_fields_plus_id_and_old() {
    let cfg = config("body");
    let (client, js) = setup(&cfg).await;
    let stream = ensure_stream(&js, &cfg).await.unwrap();
    let publisher = NatsPublisher::new(client, &cfg, NatsMetrics::new());
    let update = order(EventKind::Update, 7);
    let delete = order(EventKind::Delete, 8);
    publisher.publish(&update).await.unwrap();
    publisher.publish(&delete).await.unwrap();

    let msg = stream.get_raw_message(1).await.unwrap();
    let subject = format!("{}.order.update", cfg.subject_prefix);
    assert_eq!(msg.subject.as_str(), subject);
    assert_eq!(subject_for(&cfg.subject_prefix, &update).unwrap(), subject);
    assert_eq!(
        msg.headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str()),
        Some(update.id.as_str())
    );
    let body: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(body["event"], "UPDATE");
    assert_eq!(body["entity"], "Order");
    assert_eq!(body["subject"], subject.as_str());
    assert_eq!(body["timestamp"], update.timestamp.as_str());
    assert_eq!(&body["data"], update.new.as_ref().unwrap());
    assert_eq!(body["id"], update.id.as_str());
    assert_eq!(&body["old"], update.old.as_ref().unwrap());

    let msg = stream.get_raw_message(2).await.unwrap();
    assert_eq!(
        msg.subject.as_str(),
        format!("{}.order.delete", cfg.subject_prefix)
    );
    let body: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(body["event"], "DELETE");
    // DELETE: data is the old row.
    assert_eq!(&body["data"], delete.old.as_ref().unwrap());
    assert_eq!(&body["old"], delete.old.as_ref().unwrap());
    cleanup(&js, &cfg).await;
}

#[tokio::test]
async fn the_consumer_processes_every_event_once_and_acks_to_the_end() {
    let cfg = config("consume");
    let (client, js) = setup(&cfg).await;
    let metrics = NatsMetrics::new();
    let source = NatsSource::new(client.clone(), &cfg, metrics.clone(), 32)
        .await
        .unwrap();
    let counting = Counting::with_delay(Duration::ZERO);
    let (stop, stop_rx) = watch::channel(false);
    let runner = tokio::spawn(source.run(engine(&counting), stop_rx));

    let events = orders(600);
    NatsPublisher::new(client, &cfg, NatsMetrics::new())
        .publish_all(&events)
        .await
        .unwrap();
    eventually("all events processed", Duration::from_secs(30), || async {
        counting.total() >= events.len()
    })
    .await;
    wait_ack_floor(&js, &cfg, events.len() as u64).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = counting.snapshot();
    assert_eq!(seen.len(), events.len());
    for e in &events {
        assert_eq!(seen.get(&e.id), Some(&1), "event {} processed once", e.id);
    }
    assert_eq!(metrics.received.get(), events.len() as u64);
    assert_eq!(metrics.subscriptions_active.get(), 1);
    assert_eq!(metrics.jetstream_pending.get(), 0);

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), runner)
        .await
        .expect("run stops on shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(metrics.subscriptions_active.get(), 0);
    cleanup(&js, &cfg).await;
}

#[tokio::test]
async fn a_malformed_message_is_terminated_and_processing_goes_on() {
    let mut cfg = config("malformed");
    cfg.jetstream.ack_wait_secs = 2;
    let (client, js) = setup(&cfg).await;
    let source = NatsSource::new(client.clone(), &cfg, NatsMetrics::new(), 8)
        .await
        .unwrap();
    let subject = format!("{}.order.insert", cfg.subject_prefix);
    js.publish(subject.clone(), "{not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    js.publish(
        subject,
        r#"{"event":"EXPLODE","entity":"Order","data":{}}"#.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let events = orders(20);
    NatsPublisher::new(client, &cfg, NatsMetrics::new())
        .publish_all(&events)
        .await
        .unwrap();

    let counting = Counting::with_delay(Duration::ZERO);
    let (stop, stop_rx) = watch::channel(false);
    let runner = tokio::spawn(source.run(engine(&counting), stop_rx));
    eventually(
        "valid events processed",
        Duration::from_secs(20),
        || async { counting.total() >= events.len() },
    )
    .await;
    wait_ack_floor(&js, &cfg, events.len() as u64 + 2).await;
    // Terminated, not redelivered: wait past ack_wait and check nothing came back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stream = js.get_stream(&cfg.stream_name).await.unwrap();
    let info = stream.consumer_info(&cfg.consumer_name).await.unwrap();
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(counting.total(), events.len());
    stop.send(true).unwrap();
    runner.await.unwrap().unwrap();
    cleanup(&js, &cfg).await;
}

/// Panics on every event it is given.
struct Panicking(Mutex<usize>);

#[async_trait]
impl Action for Panicking {
    fn kind(&self) -> &'static str {
        "panicking"
    }
    async fn execute(&self, _event: &Event) -> Result<(), ActionError> {
        *self.0.lock().unwrap() += 1;
        panic!("the handler exploded");
    }
}

#[tokio::test]
async fn an_event_that_panics_on_its_last_delivery_is_dead_lettered_and_terminated() {
    let mut cfg = config("panic");
    cfg.jetstream.max_deliver = 2;
    let (client, js) = setup(&cfg).await;
    let source = NatsSource::new(client.clone(), &cfg, NatsMetrics::new(), 8)
        .await
        .unwrap();
    let event = order(EventKind::Insert, 1);
    NatsPublisher::new(client, &cfg, NatsMetrics::new())
        .publish(&event)
        .await
        .unwrap();
    let action = Arc::new(Panicking(Mutex::new(0)));
    let dlq = Arc::new(MemoryDlq::new(None));
    let engine = Engine::new(
        vec![ObserverSpec::new(
            ListenerConfig::new("explodes", CheckpointStrategy::AtLeastOnce),
            "Order",
            EventKind::Insert,
        )
        .action(action.clone())],
        dlq.clone(),
        &MemoryIdempotencyStores::default(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let runner = tokio::spawn(source.run(Arc::new(engine), stop_rx));
    let dead_letters = dlq.clone();
    eventually("the dead letter", Duration::from_secs(20), || {
        let dlq = dead_letters.clone();
        async move { dlq.len().await.unwrap() == 1 }
    })
    .await;
    wait_ack_floor(&js, &cfg, 1).await;
    let [entry] = dlq.list(10).await.unwrap().try_into().unwrap();
    assert_eq!(entry.observer, "explodes");
    assert_eq!(entry.event.id, event.id);
    assert!(
        entry
            .error
            .contains("panicked on delivery 2 (max_deliver = 2): the handler exploded"),
        "{}",
        entry.error
    );
    assert_eq!(
        *action.0.lock().unwrap(),
        2,
        "run on both deliveries, not more"
    );
    stop.send(true).unwrap();
    runner.await.unwrap().unwrap();
    cleanup(&js, &cfg).await;
}

#[tokio::test]
async fn long_processing_signals_progress_and_is_not_redelivered() {
    let mut cfg = config("progress");
    cfg.jetstream.ack_wait_secs = 1;
    let (client, js) = setup(&cfg).await;
    let source = NatsSource::new(client.clone(), &cfg, NatsMetrics::new(), 4)
        .await
        .unwrap();
    let counting = Counting::with_delay(Duration::from_millis(2_500));
    let (stop, stop_rx) = watch::channel(false);
    let runner = tokio::spawn(source.run(engine(&counting), stop_rx));
    let event = order(EventKind::Insert, 1);
    NatsPublisher::new(client, &cfg, NatsMetrics::new())
        .publish(&event)
        .await
        .unwrap();
    eventually("processed", Duration::from_secs(15), || async {
        counting.total() >= 1
    })
    .await;
    wait_ack_floor(&js, &cfg, 1).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(counting.snapshot().get(&event.id), Some(&1));
    let stream = js.get_stream(&cfg.stream_name).await.unwrap();
    let info = stream.consumer_info(&cfg.consumer_name).await.unwrap();
    assert_eq!(info.num_redelivered, 0);
    stop.send(true).unwrap();
    runner.await.unwrap().unwrap();
    cleanup(&js, &cfg).await;
}

#[tokio::test]
async fn two_sources_on_one_durable_consumer_share_the_work() {
    let cfg = config("shared");
    let (client, js) = setup(&cfg).await;
    let (client2, _) = setup(&cfg).await;
    let a = NatsSource::new(client.clone(), &cfg, NatsMetrics::new(), 8)
        .await
        .unwrap()
        .with_batch_size(8);
    let b = NatsSource::new(client2, &cfg, NatsMetrics::new(), 8)
        .await
        .unwrap()
        .with_batch_size(8);
    let count_a = Counting::with_delay(Duration::from_millis(2));
    let count_b = Counting::with_delay(Duration::from_millis(2));
    let (stop, stop_rx) = watch::channel(false);
    let run_a = tokio::spawn(a.run(engine(&count_a), stop_rx.clone()));
    let run_b = tokio::spawn(b.run(engine(&count_b), stop_rx));

    let events = orders(1_000);
    NatsPublisher::new(client, &cfg, NatsMetrics::new())
        .publish_all(&events)
        .await
        .unwrap();
    eventually("all events processed", Duration::from_secs(60), || async {
        count_a.total() + count_b.total() >= events.len()
    })
    .await;
    wait_ack_floor(&js, &cfg, events.len() as u64).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (sa, sb) = (count_a.snapshot(), count_b.snapshot());
    assert!(
        !sa.is_empty() && !sb.is_empty(),
        "both got work: {} / {}",
        sa.len(),
        sb.len()
    );
    assert_eq!(count_a.total() + count_b.total(), events.len());
    assert_eq!(count_a.distinct() + count_b.distinct(), events.len());
    for e in &events {
        let n = sa.get(&e.id).copied().unwrap_or(0) + sb.get(&e.id).copied().unwrap_or(0);
        assert_eq!(n, 1, "event {} processed once in total", e.id);
    }
    stop.send(true).unwrap();
    run_a.await.unwrap().unwrap();
    run_b.await.unwrap().unwrap();
    cleanup(&js, &cfg).await;
}

#[tokio::test]
async fn a_message_whose_runs_are_killed_max_deliver_times_is_dead_lettered_not_dropped() {
    let mut cfg = config("poison");
    cfg.jetstream.ack_wait_secs = 1;
    cfg.jetstream.max_deliver = 2;
    let (client, js) = setup(&cfg).await;
    ensure_stream(&js, &cfg).await.unwrap();
    let event = Event::new(
        "Order",
        EventKind::Insert,
        "tb_order",
        Some(json!({"id": "ord_poison", "total": poison::POISON_TOTAL})),
        None,
    );
    NatsPublisher::new(client.clone(), &cfg, NatsMetrics::new())
        .publish(&event)
        .await
        .unwrap();
    let poison = Arc::new(poison::Poison::default());
    let dlq = Arc::new(MemoryDlq::new(None));
    let start = || async {
        let source = NatsSource::new(client.clone(), &cfg, NatsMetrics::new(), 8)
            .await
            .unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let runner = tokio::spawn(source.run(poison::engine(&poison, &dlq), stop_rx));
        (stop, runner)
    };
    // Each run takes it and is killed (aborted) before it acks; the server delivers it again
    // after ack_wait.
    for run in 1..=2 {
        let (_stop, runner) = start().await;
        poison
            .wait_until(&format!("run {run}"), |p| p.runs() == run)
            .await;
        runner.abort();
        let _ = runner.await;
    }
    let (stop, runner) = start().await;
    poison::wait_for_a_dead_letter(&dlq).await;
    wait_ack_floor(&js, &cfg, 1).await;
    let [entry] = dlq.list(10).await.unwrap().try_into().unwrap();
    assert_eq!(entry.event.id, event.id);
    assert_eq!(
        entry.error,
        "delivered 3 times (max_deliver = 2) without being acknowledged"
    );
    assert_eq!(poison.runs(), 2, "not run a third time");
    stop.send(true).unwrap();
    runner.await.unwrap().unwrap();
    cleanup(&js, &cfg).await;
}
