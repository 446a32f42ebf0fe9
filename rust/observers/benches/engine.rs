//! Engine throughput on the in-memory transport with a no-op native action.
//!
//! `cargo bench -p fraiseql_observers --bench engine` — prints events/s for a run of
//! 1,000,000 INSERT events through `MemoryTransport` (bounded queue, bounded concurrency)
//! into an engine with one observer whose condition matches half the events, and the same
//! run's baseline: the bare cost of pushing the events through a tokio mpsc channel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fraiseql_observers::{
    CheckpointStrategy, Condition, Engine, Event, EventKind, ListenerConfig, MemoryDlq,
    MemoryIdempotencyStores, MemoryTransport, Metrics, NoopAction, ObserverSpec,
};
use serde_json::json;

const EVENTS: usize = 1_000_000;

fn engine(checkpoint: CheckpointStrategy) -> Arc<Engine> {
    engine_as_run(checkpoint, false, false)
}

/// As `run` sets it up: on a declared type the fields the condition reads are checked on
/// every change (`check_fields`); with the status server on, the console's recent events
/// are kept (`recent`).
fn engine_as_run(checkpoint: CheckpointStrategy, check_fields: bool, recent: bool) -> Arc<Engine> {
    let mut spec = ObserverSpec::new(
        ListenerConfig::new("on_high_value_order", checkpoint),
        "Order",
        EventKind::Insert,
    )
    .condition(Condition::compile("total > 1000 && is_premium == true", None).unwrap())
    .action(Arc::new(NoopAction));
    spec.check_fields = check_fields;
    let metrics = Arc::new(Metrics::new());
    let dlq = Arc::new(MemoryDlq::new(None));
    let engine = Engine::new(
        vec![spec],
        dlq,
        &MemoryIdempotencyStores::default(),
        metrics,
    )
    .unwrap();
    Arc::new(if recent {
        engine.with_recent(fraiseql_observers::console::RECENT_EVENTS)
    } else {
        engine
    })
}

/// One observer of UPDATEs with `action`, ordered per key (`id`) or not.
fn keyed_engine(action: Arc<dyn fraiseql_observers::Action>, ordered: bool) -> Arc<Engine> {
    let spec = ObserverSpec::new(
        ListenerConfig::new("on_update", CheckpointStrategy::AtLeastOnce),
        "Order",
        EventKind::Update,
    )
    .action(action)
    .ordering(ordered.then(|| vec!["id".to_owned()]));
    Arc::new(
        Engine::new(
            vec![spec],
            Arc::new(MemoryDlq::new(None)),
            &MemoryIdempotencyStores::default(),
            Arc::new(Metrics::new()),
        )
        .unwrap(),
    )
}

/// `n` UPDATEs spread over `keys` rows.
fn keyed_events(n: usize, keys: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let row = json!({"id": format!("ord_{}", i % keys), "status": "paid", "total": i});
            Event::new("Order", EventKind::Update, "tb_order", Some(row), None)
        })
        .collect()
}

/// An action that takes a millisecond (a fast webhook), without using a thread.
struct Sleeps;

#[async_trait::async_trait]
impl fraiseql_observers::Action for Sleeps {
    fn kind(&self) -> &'static str {
        "sleeps"
    }
    async fn execute(&self, _event: &Event) -> Result<(), fraiseql_observers::ActionError> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok(())
    }
}

fn events() -> Vec<Event> {
    (0..EVENTS)
        .map(|i| {
            let row = json!({"id": format!("ord_{i}"), "status": "pending",
                             "total": if i % 2 == 0 { 1500.0 } else { 10.0 }, "is_premium": true,
                             "customer_email": "a@example.com", "created_at": "2026-02-25T10:00:00Z"});
            Event::new("Order", EventKind::Insert, "tb_order", Some(row), None)
        })
        .collect()
}

fn per_key(rt: &tokio::runtime::Runtime) {
    const KEYS: usize = 64;
    println!(
        "\nper-key order, {KEYS} keys, one instance (max_concurrency 256), ordered vs unordered"
    );
    for (label, action, n) in [
        (
            "no-op action",
            Arc::new(NoopAction) as Arc<dyn fraiseql_observers::Action>,
            EVENTS,
        ),
        (
            "1 ms action",
            Arc::new(Sleeps) as Arc<dyn fraiseql_observers::Action>,
            100_000,
        ),
    ] {
        let unordered = rt.block_on(through_engine_n(
            keyed_engine(action.clone(), false),
            keyed_events(n, KEYS),
        ));
        let ordered = rt.block_on(through_engine_n(
            keyed_engine(action, true),
            keyed_events(n, KEYS),
        ));
        let per_sec = |d: Duration| n as f64 / d.as_secs_f64();
        println!(
            "  {label:<13} unordered {:>9.0} events/s, per key {:>9.0} events/s ({:.2} x)",
            per_sec(unordered),
            per_sec(ordered),
            per_sec(ordered) / per_sec(unordered)
        );
    }
}

async fn through_engine_n(engine: Arc<Engine>, events: Vec<Event>) -> Duration {
    through_engine(engine, events).await
}

async fn through_engine(engine: Arc<Engine>, events: Vec<Event>) -> Duration {
    let transport = MemoryTransport::start(engine, 10_000, 256);
    let started = Instant::now();
    for e in events {
        transport.emit(e).await.unwrap();
    }
    transport.stop().await;
    started.elapsed()
}

async fn through_channel(events: Vec<Event>) -> Duration {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(10_000);
    let consumer = tokio::spawn(async move {
        let mut n = 0usize;
        while let Some(e) = rx.recv().await {
            n += e.id.len();
        }
        n
    });
    let started = Instant::now();
    for e in events {
        tx.send(e).await.unwrap();
    }
    drop(tx);
    consumer.await.unwrap();
    started.elapsed()
}

fn rate(d: Duration) -> String {
    format!(
        "{:>10.0} events/s ({:.0} ns/event)",
        EVENTS as f64 / d.as_secs_f64(),
        d.as_nanos() as f64 / EVENTS as f64
    )
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("engine throughput, {EVENTS} INSERT events, half matching, {cores} cores, tokio multi-thread");
    let baseline = rt.block_on(through_channel(events()));
    println!(
        "  baseline: bare tokio mpsc channel          {}",
        rate(baseline)
    );
    let at_least_once = rt.block_on(through_engine(
        engine(CheckpointStrategy::AtLeastOnce),
        events(),
    ));
    println!(
        "  engine, AtLeastOnce, no-op action         {}",
        rate(at_least_once)
    );
    for (label, check_fields, recent) in [
        ("same, fields checked                     ", true, false),
        ("same, recent events kept (console)       ", false, true),
        ("same, both (as `run` with the console)   ", true, true),
    ] {
        let engine = engine_as_run(CheckpointStrategy::AtLeastOnce, check_fields, recent);
        let took = rt.block_on(through_engine(engine, events()));
        println!("  {label} {}", rate(took));
    }
    let once = CheckpointStrategy::EffectivelyOnce {
        idempotency_table: "bench_keys".into(),
    };
    let effectively_once = rt.block_on(through_engine(engine(once), events()));
    println!(
        "  engine, EffectivelyOnce (in-memory store) {}",
        rate(effectively_once)
    );
    per_key(&rt);
}
