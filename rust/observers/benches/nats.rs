//! NATS JetStream: the engine's publisher and consumer against bare async-nats, in one run.
//!
//! `cargo bench -p fraiseql_observers --bench nats` — needs a live nats-server with JetStream
//! (`FRAISEQL_TEST_NATS_URL`, default `nats://127.0.0.1:4222`). Every phase uses a stream of
//! its own (file storage, the engine's stream settings) that is deleted afterwards.
//!
//! Raw baselines, written the way a team would with async-nats alone:
//! - async publish: 200-byte payloads with a `Nats-Msg-Id`, up to 8,192 PubAcks in flight;
//! - publish awaiting each PubAck before the next;
//! - pull consume with explicit acks from a durable consumer (batches of 256).
//!
//! The engine, on the same server in the same run:
//! - publisher: `NatsPublisher::publish_all` (each event serialised to the bridge's JSON body,
//!   `Nats-Msg-Id` = event id, every PubAck awaited);
//! - in-memory source → engine → publish action (`bridge_observers`, max concurrency 256,
//!   the default);
//! - the bridge: `n` INSERTs already in the change log of a throwaway database
//!   (`FRAISEQL_TEST_DATABASE_URL`, default `postgresql://postgres@127.0.0.1:5432/postgres`),
//!   forwarded by the PostgreSQL source (batches of 5,000, 1,024 in flight) through the same
//!   publish action, timed from the forwarder's start to the last PubAck; PostgreSQL's own
//!   CPU is not counted;
//! - consumer: `NatsSource` (durable pull consumer, max concurrency 256) through a condition
//!   and a no-op action, acking each message, with 1 and with 3 instances (each with its own
//!   connection) sharing the consumer.
//!
//! CPU is this process's user + system time (`/proc/self/stat`) over the phase divided by the
//! messages; nats-server is another process and is not counted.
//! `FRAISEQL_BENCH_MESSAGES` sets the messages per phase (default 200,000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, context::PublishAckFuture};
use async_nats::HeaderMap;
use bytes::Bytes;
use fraiseql_observers::bridge;
use fraiseql_observers::config::NatsConfig;
use fraiseql_observers::transport::nats;
use fraiseql_observers::{
    CheckpointStrategy, Condition, Engine, EntityDef, Event, EventKind, ListenerConfig, MemoryDlq,
    MemoryIdempotencyStores, MemoryTransport, Metrics, NatsMetrics, NatsPublisher, NatsSource,
    NoopAction, ObserverSpec, Schema,
};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::watch;

mod support;
use support::nats_config;

const RAW_WINDOW: usize = 8192;
const MAX_CONCURRENCY: usize = 256;

fn messages() -> usize {
    std::env::var("FRAISEQL_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

/// utime + stime of the whole process, in seconds.
fn process_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let close = stat.rfind(')').unwrap();
    let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0 // USER_HZ
}

/// Rate and CPU per message of one phase.
struct Measured {
    rate: f64,
    cpu_us: f64,
}

async fn measure<F: std::future::Future<Output = ()>>(n: usize, phase: F) -> Measured {
    let cpu0 = process_cpu();
    let started = Instant::now();
    phase.await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = process_cpu() - cpu0;
    Measured {
        rate: n as f64 / elapsed,
        cpu_us: cpu * 1e6 / n as f64,
    }
}

async fn fresh_stream(client: &async_nats::Client, config: &NatsConfig) -> jetstream::Context {
    let js = jetstream::new(client.clone());
    nats::ensure_stream(&js, config).await.unwrap();
    js
}

async fn delete_stream(client: &async_nats::Client, config: &NatsConfig) {
    let _ = jetstream::new(client.clone())
        .delete_stream(&config.stream_name)
        .await;
}

/// A context that lets `RAW_WINDOW` PubAcks be outstanding (async-nats' default is 5,000).
fn raw_context(client: &async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .max_ack_inflight(RAW_WINDOW)
        .build(client.clone())
}

fn headers(i: usize) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("raw-{i}").as_str(),
    );
    headers
}

/// Bare async-nats: publish with `Nats-Msg-Id`, `RAW_WINDOW` PubAcks in flight.
async fn raw_publish_async(js: &jetstream::Context, subject: &str, n: usize) {
    let payload = Bytes::from(vec![b'x'; 200]);
    let mut acks: std::collections::VecDeque<PublishAckFuture> =
        std::collections::VecDeque::with_capacity(RAW_WINDOW);
    for i in 0..n {
        if acks.len() == RAW_WINDOW {
            acks.pop_front().unwrap().await.unwrap();
        }
        let ack = js
            .publish_with_headers(subject.to_owned(), headers(i), payload.clone())
            .await
            .unwrap();
        acks.push_back(ack);
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// Bare async-nats: each publish waits for its PubAck.
async fn raw_publish_sync(js: &jetstream::Context, subject: &str, n: usize) {
    let payload = Bytes::from(vec![b'x'; 200]);
    for i in 0..n {
        js.publish_with_headers(subject.to_owned(), headers(i), payload.clone())
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

/// Bare async-nats: pull `n` messages from a durable consumer and ack each.
async fn raw_consume(stream: &jetstream::stream::Stream, n: usize) {
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            "raw",
            pull::Config {
                durable_name: Some("raw".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await
        .unwrap();
    let mut seen = 0;
    while seen < n {
        let message = messages.next().await.unwrap().unwrap();
        message.ack().await.unwrap();
        seen += 1;
    }
}

fn schema() -> Schema {
    Schema::new(vec![EntityDef {
        name: "Order".into(),
        table: "tb_order".into(),
        fields: Vec::new(),
        kinds: Vec::new(),
    }])
    .unwrap()
}

/// INSERT events whose JSON body is about 200 bytes, as in the raw phases.
fn events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let row = json!({"id": format!("ord_{i}"), "status": "pending", "total": 1500.0});
            Event::new("Order", EventKind::Insert, "tb_order", Some(row), None)
        })
        .collect()
}

fn engine_with(specs: Vec<ObserverSpec>) -> Arc<Engine> {
    let dlq = Arc::new(MemoryDlq::new(None));
    let stores = MemoryIdempotencyStores::default();
    Arc::new(Engine::new(specs, dlq, &stores, Arc::new(Metrics::new())).unwrap())
}

/// One observer with a condition and a no-op action.
fn consuming_engine() -> Arc<Engine> {
    engine_with(vec![ObserverSpec::new(
        ListenerConfig::new("noop", CheckpointStrategy::AtLeastOnce),
        "Order",
        EventKind::Insert,
    )
    .condition(Condition::compile("status == 'pending' && total > 100", None).unwrap())
    .action(Arc::new(NoopAction))])
}

/// In-memory source → engine → publish action, as `fraiseql run` forwards every change.
async fn engine_forward(publisher: NatsPublisher, events: Vec<Event>) {
    let engine = engine_with(bridge::bridge_observers(
        &schema(),
        Arc::new(publisher),
        "bench",
    ));
    let transport = MemoryTransport::start(engine, 10_000, 256);
    for event in events {
        transport.emit(event).await.unwrap();
    }
    transport.stop().await;
}

/// `instances` consumers on one durable consumer, each with its own connection, until all
/// `n` messages are processed and acked.
async fn engine_consume(config: &NatsConfig, instances: usize, n: usize) -> Measured {
    let mut clients = Vec::new();
    let mut sources = Vec::new();
    let metrics = NatsMetrics::new();
    for _ in 0..instances {
        let client = nats::connect(config).await.unwrap();
        sources.push(
            NatsSource::new(client.clone(), config, metrics.clone(), MAX_CONCURRENCY)
                .await
                .unwrap(),
        );
        clients.push(client);
    }
    let (stop, stop_rx) = watch::channel(false);
    let engine = consuming_engine();
    measure(n, async {
        let runs: Vec<_> = sources
            .into_iter()
            .map(|s| tokio::spawn(s.run(engine.clone(), stop_rx.clone())))
            .collect();
        while metrics.received.get() < n as u64 || metrics.jetstream_pending.get() != 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.send(true).unwrap();
        for run in runs {
            run.await.unwrap().unwrap();
        }
    })
    .await
}

fn line(what: &str, m: &Measured, raw: Option<&Measured>) {
    let ratio = raw.map_or(String::new(), |r| format!("  {:.2} x raw", m.rate / r.rate));
    println!(
        "  {what:<44} {:>9.0} msgs/s  {:>6.2} µs CPU/msg{ratio}",
        m.rate, m.cpu_us
    );
}

/// The bridge: `n` changes already in the change log, forwarded by the PostgreSQL source
/// under its own cursor through the engine's publish action, until every PubAck is in.
async fn bridge_from_change_log(
    client: async_nats::Client,
    config: NatsConfig,
    n: usize,
) -> Measured {
    let backlog = support::Backlog::create(&support::database_url(), n).await;
    let metrics = NatsMetrics::new();
    let publisher = NatsPublisher::new(client, &config, metrics.clone());
    let (stop, stop_rx) = watch::channel(false);
    let measured = measure(n, async {
        let forwarder = backlog.forward(Arc::new(publisher), stop_rx).await;
        while metrics.published.get() < n as u64 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.send(true).unwrap();
        forwarder.await.unwrap().unwrap();
    })
    .await;
    backlog.drop_database().await;
    measured
}

/// `FRAISEQL_BENCH_ONLY=raw,publish,forward,bridge,consume` runs only those groups (all by default).
fn only(group: &str) -> bool {
    std::env::var("FRAISEQL_BENCH_ONLY").map_or(true, |v| v.split(',').any(|g| g.trim() == group))
}

/// Runs `phase` against a stream of its own, deleted afterwards.
async fn on_fresh_stream<F, Fut>(client: &async_nats::Client, url: &str, phase: F) -> Measured
where
    F: FnOnce(async_nats::Client, NatsConfig) -> Fut,
    Fut: std::future::Future<Output = Measured>,
{
    let config = nats_config(url);
    fresh_stream(client, &config).await;
    let measured = phase(client.clone(), config.clone()).await;
    delete_stream(client, &config).await;
    measured
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let url =
        std::env::var("FRAISEQL_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let n = messages();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let body = {
        let event = &events(1)[0];
        let subject =
            fraiseql_observers::transport::codec::subject_for("fraiseql.mutation", event).unwrap();
        serde_json::to_vec(&fraiseql_observers::transport::codec::message_body(
            &subject, event,
        ))
        .unwrap()
        .len()
    };
    println!(
        "NATS JetStream, {n} messages per phase, file storage, {cores} cores \
         (raw payload 200 bytes, engine body {body} bytes)"
    );
    rt.block_on(async {
        let client = async_nats::connect(&url).await.unwrap();
        let subject = |c: &NatsConfig| format!("{}.order.insert", c.subject_prefix);

        let mut raw_async = None;
        let mut raw_pull = None;
        if only("raw") {
            let m = on_fresh_stream(&client, &url, |client, c| async move {
                measure(n, raw_publish_async(&raw_context(&client), &subject(&c), n)).await
            })
            .await;
            line("raw publish, 8192 acks in flight", &m, None);
            raw_async = Some(m);

            let sync_n = (n / 20).max(1000);
            let m = on_fresh_stream(&client, &url, |client, c| async move {
                let js = jetstream::new(client.clone());
                measure(sync_n, raw_publish_sync(&js, &subject(&c), sync_n)).await
            })
            .await;
            line("raw publish, awaiting each ack", &m, None);

            let m = on_fresh_stream(&client, &url, |client, c| async move {
                raw_publish_async(&raw_context(&client), &subject(&c), n).await;
                let js = jetstream::new(client.clone());
                let stream = js.get_stream(&c.stream_name).await.unwrap();
                measure(n, raw_consume(&stream, n)).await
            })
            .await;
            line("raw pull consume + ack", &m, None);
            raw_pull = Some(m);
        }

        if only("publish") {
            let m = on_fresh_stream(&client, &url, |client, c| async move {
                let events = events(n);
                let publisher = NatsPublisher::new(client.clone(), &c, NatsMetrics::new());
                measure(n, async {
                    publisher.publish_all(&events).await.unwrap();
                })
                .await
            })
            .await;
            line("NatsPublisher::publish_all", &m, raw_async.as_ref());
        }

        if only("forward") {
            let m = on_fresh_stream(&client, &url, |client, c| async move {
                let publisher = NatsPublisher::new(client.clone(), &c, NatsMetrics::new());
                measure(n, engine_forward(publisher, events(n))).await
            })
            .await;
            line(
                "in-memory source -> engine -> publish",
                &m,
                raw_async.as_ref(),
            );
        }

        if only("bridge") {
            let m = on_fresh_stream(&client, &url, |client, c| async move {
                bridge_from_change_log(client, c, n).await
            })
            .await;
            line(
                "change log -> bridge (PostgreSQL source) -> publish",
                &m,
                raw_async.as_ref(),
            );
        }

        if only("consume") {
            for instances in [1, 3] {
                let m = on_fresh_stream(&client, &url, |client, c| async move {
                    NatsPublisher::new(client.clone(), &c, NatsMetrics::new())
                        .publish_all(&events(n))
                        .await
                        .unwrap();
                    engine_consume(&c, instances, n).await
                })
                .await;
                line(
                    &format!("NatsSource x{instances}: condition + no-op + ack"),
                    &m,
                    raw_pull.as_ref(),
                );
            }
        }
    });
}
