//! End-to-end throughput through Redis, with NATS JetStream measured in the same run.
//!
//! `cargo bench -p fraiseql_observers --bench transports` — needs a live Redis and NATS
//! (`FRAISEQL_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`; `FRAISEQL_TEST_NATS_URL`,
//! default `nats://127.0.0.1:4222`). For each transport, `EVENTS` INSERT events are published
//! (Redis: `XADD … MAXLEN ~`, 1024 in flight; NATS: publish with PubAck, 1024 in flight) while
//! one source (consumer group / durable pull consumer, max concurrency 256) runs the engine
//! with one observer and a no-op action and acknowledges each entry. The clock runs from the
//! first publish until every event was received, processed and acknowledged.
//!
//! Then the same from PostgreSQL (`FRAISEQL_TEST_DATABASE_URL`, default
//! `postgresql://postgres@127.0.0.1:5432/postgres`; a throwaway database is created and
//! dropped): `EVENTS` rows are inserted into a captured table first (not timed), then the
//! forwarder (PostgreSQL source under its own cursor, batch size 1000, publishing engine) and
//! the consumer start together; the clock runs until every change was consumed and acked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fraiseql_observers::config::RedisConfig;
use fraiseql_observers::transport::{nats, redis};
use fraiseql_observers::{
    CheckpointStrategy, Engine, Event, EventKind, ListenerConfig, MemoryDlq,
    MemoryIdempotencyStores, Metrics, NatsMetrics, NatsPublisher, NatsSource, NoopAction,
    ObserverSpec, RedisMetrics, RedisPublisher, RedisSource,
};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::watch;

mod support;
use support::{nats_config, Backlog};

const EVENTS: usize = 100_000;
const MAX_CONCURRENCY: usize = 256;

fn engine() -> Arc<Engine> {
    let spec = ObserverSpec::new(
        ListenerConfig::new("noop", CheckpointStrategy::AtLeastOnce),
        "Order",
        EventKind::Insert,
    )
    .action(Arc::new(NoopAction));
    let dlq = Arc::new(MemoryDlq::new(None));
    let stores = MemoryIdempotencyStores::default();
    Arc::new(Engine::new(vec![spec], dlq, &stores, Arc::new(Metrics::new())).unwrap())
}

fn events() -> Vec<Event> {
    (0..EVENTS)
        .map(|i| {
            let row = json!({"id": format!("ord_{i}"), "status": "pending", "total": 1500.0,
                             "customer_email": "a@example.com", "created_at": "2026-02-25T10:00:00Z"});
            Event::new("Order", EventKind::Insert, "tb_order", Some(row), None)
        })
        .collect()
}

/// Waits until `received` reached `EVENTS` and nothing is pending.
async fn settled(received: impl Fn() -> u64, pending: impl Fn() -> i64) {
    while received() < EVENTS as u64 || pending() != 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn through_redis(url: &str) -> Duration {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let config = RedisConfig {
        stream: format!("fq:bench:{suffix}"),
        group: "bench".into(),
        batch_size: 256,
        ..RedisConfig::default()
    };
    let metrics = RedisMetrics::new();
    let source = RedisSource::connect(url, &config, metrics.clone(), MAX_CONCURRENCY)
        .await
        .unwrap();
    let conn = redis::connect(url, Duration::from_secs(10)).await.unwrap();
    let publisher = RedisPublisher::new(conn.clone(), &config, metrics.clone());
    let (stop, stop_rx) = watch::channel(false);
    let consumer = tokio::spawn(source.run(engine(), stop_rx));
    let events = events();
    let started = Instant::now();
    futures::stream::iter(events.iter())
        .map(|e| publisher.publish(e))
        .buffer_unordered(1024)
        .for_each(|r| async move {
            r.unwrap();
        })
        .await;
    settled(|| metrics.received.get(), || metrics.pending.get()).await;
    let elapsed = started.elapsed();
    stop.send(true).unwrap();
    consumer.await.unwrap().unwrap();
    let _: () = ::redis::cmd("DEL")
        .arg(&config.stream)
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    elapsed
}

async fn through_nats(url: &str) -> Duration {
    let config = nats_config(url);
    let client = nats::connect(&config).await.unwrap();
    let metrics = NatsMetrics::new();
    let source = NatsSource::new(client.clone(), &config, metrics.clone(), MAX_CONCURRENCY)
        .await
        .unwrap();
    let publisher = NatsPublisher::new(client.clone(), &config, metrics.clone());
    let (stop, stop_rx) = watch::channel(false);
    let consumer = tokio::spawn(source.run(engine(), stop_rx));
    let events = events();
    let started = Instant::now();
    publisher.publish_all(&events).await.unwrap();
    settled(
        || metrics.received.get(),
        || metrics.jetstream_pending.get(),
    )
    .await;
    let elapsed = started.elapsed();
    stop.send(true).unwrap();
    consumer.await.unwrap().unwrap();
    let js = async_nats::jetstream::new(client);
    let _ = js.delete_stream(&config.stream_name).await;
    elapsed
}

async fn from_postgres_to_redis(db_url: &str, url: &str) -> Duration {
    let backlog = Backlog::create(db_url, EVENTS).await;
    let config = RedisConfig {
        stream: format!("fq:bench:{}", uuid::Uuid::new_v4().simple()),
        group: "bench".into(),
        ..RedisConfig::default()
    };
    let metrics = RedisMetrics::new();
    let source = RedisSource::connect(url, &config, metrics.clone(), MAX_CONCURRENCY)
        .await
        .unwrap();
    let conn = redis::connect(url, Duration::from_secs(10)).await.unwrap();
    let publisher = RedisPublisher::new(conn.clone(), &config, metrics.clone());
    let (stop, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let consumer = tokio::spawn(source.run(engine(), stop_rx.clone()));
    let forwarder = backlog.forward(Arc::new(publisher), stop_rx).await;
    settled(|| metrics.received.get(), || metrics.pending.get()).await;
    let elapsed = started.elapsed();
    stop.send(true).unwrap();
    consumer.await.unwrap().unwrap();
    forwarder.await.unwrap().unwrap();
    let _: () = ::redis::cmd("DEL")
        .arg(&config.stream)
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    backlog.drop_database().await;
    elapsed
}

async fn from_postgres_to_nats(db_url: &str, url: &str) -> Duration {
    let backlog = Backlog::create(db_url, EVENTS).await;
    let config = nats_config(url);
    let client = nats::connect(&config).await.unwrap();
    let metrics = NatsMetrics::new();
    let source = NatsSource::new(client.clone(), &config, metrics.clone(), MAX_CONCURRENCY)
        .await
        .unwrap();
    let publisher = NatsPublisher::new(client.clone(), &config, metrics.clone());
    let (stop, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let consumer = tokio::spawn(source.run(engine(), stop_rx.clone()));
    let forwarder = backlog.forward(Arc::new(publisher), stop_rx).await;
    settled(
        || metrics.received.get(),
        || metrics.jetstream_pending.get(),
    )
    .await;
    let elapsed = started.elapsed();
    stop.send(true).unwrap();
    consumer.await.unwrap().unwrap();
    forwarder.await.unwrap().unwrap();
    let _ = async_nats::jetstream::new(client)
        .delete_stream(&config.stream_name)
        .await;
    backlog.drop_database().await;
    elapsed
}

fn rate(d: Duration) -> f64 {
    EVENTS as f64 / d.as_secs_f64()
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis_url = std::env::var("FRAISEQL_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let nats_url =
        std::env::var("FRAISEQL_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "end-to-end publish -> consume -> no-op action -> ack, {EVENTS} events, {cores} cores"
    );
    let redis = rt.block_on(through_redis(&redis_url));
    println!(
        "  redis stream + consumer group  {:>8.0} changes/s ({:.2} s)",
        rate(redis),
        redis.as_secs_f64()
    );
    let nats = rt.block_on(through_nats(&nats_url));
    println!(
        "  nats jetstream pull consumer   {:>8.0} changes/s ({:.2} s)",
        rate(nats),
        nats.as_secs_f64()
    );
    println!("  ratio redis / nats: {:.2}", rate(redis) / rate(nats));

    let db_url = support::database_url();
    println!(
        "from PostgreSQL: {EVENTS} captured rows -> forwarder -> transport -> consumer -> ack"
    );
    let redis = rt.block_on(from_postgres_to_redis(&db_url, &redis_url));
    println!(
        "  postgres -> redis              {:>8.0} changes/s ({:.2} s)",
        rate(redis),
        redis.as_secs_f64()
    );
    let nats = rt.block_on(from_postgres_to_nats(&db_url, &nats_url));
    println!(
        "  postgres -> nats (the bridge)  {:>8.0} changes/s ({:.2} s)",
        rate(nats),
        nats.as_secs_f64()
    );
    println!("  ratio redis / nats: {:.2}", rate(redis) / rate(nats));
}
