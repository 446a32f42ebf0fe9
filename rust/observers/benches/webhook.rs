//! Webhook delivery to a local HTTP server: throughput, added latency, and memory while the
//! sink is down.
//!
//! `cargo bench -p fraiseql_observers --bench webhook` — everything runs in this process, on
//! loopback only:
//!
//! - the sink: an axum HTTP/1.1 server on 127.0.0.1:0, on its own two-worker tokio runtime,
//!   answering `200 ok` at once and counting requests and TCP connections;
//! - the baseline, in the same run: a bare `reqwest::Client` (one shared client, keep-alive)
//!   POSTing the same body (the standard webhook payload) with the same concurrency (256 in
//!   flight, bounded by a semaphore, one task per request);
//! - the engine: one observer with one webhook action (standard payload), events emitted
//!   through `MemoryTransport` (queue 10,000, max concurrency 256).
//!
//! Phases, in the order they run:
//!
//! 1. Sink down: the action points at a loopback port nothing listens on, retry policy 3
//!    attempts, fixed 100 ms, no jitter, dead-letter queue capped at 1,000 entries; 20,000
//!    events emitted as fast as `emit` allows (it waits while the queue is full). VmRSS from
//!    `/proc/self/status` is sampled every 500 ms. Runs first, so that memory freed by the
//!    later phases cannot hide growth here.
//! 2. Throughput: 50,000 events; deliveries/s = events / time until `stop()` returns (every
//!    delivery answered); the sink must have counted 50,000 requests. Same for the baseline.
//! 3. Added latency: 2,000 events/s for 5 s; each row carries `"t"`, nanoseconds since the
//!    start of the process when it was emitted; the sink parses the body and records
//!    receive time − `t`. p50/p99/max for the engine and for the baseline.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::serve::ListenerExt;
use axum::Router;
use fraiseql_observers::action::webhook::{default_payload, IDEMPOTENCY_HEADER};
use fraiseql_observers::config::{ActionConfig, BackoffStrategy, WebhookConfig};
use fraiseql_observers::{
    CheckpointStrategy, Engine, Event, EventKind, ListenerConfig, MemoryDlq,
    MemoryIdempotencyStores, MemoryTransport, Metrics, ObserverSpec, RetryPolicy,
};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

const CONCURRENCY: usize = 256;
const QUEUE: usize = 10_000;
const BURST_EVENTS: usize = 50_000;
const WARMUP_EVENTS: usize = 2_000;
const PACED_RATE: u64 = 2_000;
const PACED_SECS: u64 = 5;
const DOWN_EVENTS: usize = 20_000;
const DOWN_ATTEMPTS: u32 = 3;
const DOWN_DELAY: Duration = Duration::from_millis(100);
const DOWN_DLQ_MAX: usize = 1_000;
const RSS_EVERY: Duration = Duration::from_millis(500);

static START: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the first call: the clock shared by emitters and the sink.
fn now_ns() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------------------------------------
// The sink

#[derive(Default)]
struct SinkState {
    requests: AtomicU64,
    connections: AtomicU64,
    record: AtomicBool,
    latencies_ns: Mutex<Vec<u64>>,
}

struct Sink {
    addr: SocketAddr,
    state: Arc<SinkState>,
    _runtime: tokio::runtime::Runtime,
}

impl Sink {
    fn start() -> Sink {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sink")
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(SinkState::default());
        let app = Router::new().fallback(receive).with_state(state.clone());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let counted = state.clone();
        let listener = listener.tap_io(move |tcp| {
            counted.connections.fetch_add(1, Ordering::Relaxed);
            let _ = tcp.set_nodelay(true);
        });
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Sink {
            addr,
            state,
            _runtime: runtime,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }

    fn record(&self, on: bool) -> Vec<u64> {
        self.state.record.store(on, Ordering::Relaxed);
        std::mem::take(&mut *self.state.latencies_ns.lock().unwrap())
    }
}

async fn receive(State(state): State<Arc<SinkState>>, body: Bytes) -> &'static str {
    if state.record.load(Ordering::Relaxed) {
        let received = now_ns();
        let sent = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["data"]["new"]["t"].as_u64());
        if let Some(sent) = sent {
            state
                .latencies_ns
                .lock()
                .unwrap()
                .push(received.saturating_sub(sent));
        }
    }
    state.requests.fetch_add(1, Ordering::Relaxed);
    "ok"
}

// ---------------------------------------------------------------------------------------------
// Events, engine, baseline client

fn order(i: usize) -> Event {
    let row = json!({"id": format!("ord_{i}"), "status": "paid", "total": 1500.0,
                     "is_premium": true, "customer_email": "a@example.com",
                     "created_at": "2026-02-25T10:00:00Z", "t": now_ns()});
    Event::new("Order", EventKind::Insert, "tb_order", Some(row), None)
}

fn orders(n: usize) -> Vec<Event> {
    (0..n).map(order).collect()
}

fn webhook_engine(url: String, retry: RetryPolicy, dlq_max: Option<usize>) -> Arc<Engine> {
    let config = ActionConfig::Webhook(WebhookConfig {
        url: Some(url),
        url_env: None,
        headers: Vec::new(),
        body_template: None,
        secret_env: None,
        signing_secret_env: None,
        format: fraiseql_observers::config::WebhookFormat::Json,
        source: None,
        timeout_ms: 10_000,
    });
    let action =
        fraiseql_observers::action::build("on_order_paid", &config, None, &|_| None).unwrap();
    let spec = ObserverSpec::new(
        ListenerConfig::new("on_order_paid", CheckpointStrategy::AtLeastOnce),
        "Order",
        EventKind::Insert,
    )
    .retry(retry)
    .action(action);
    Arc::new(
        Engine::new(
            vec![spec],
            Arc::new(MemoryDlq::new(dlq_max)),
            &MemoryIdempotencyStores::default(),
            Arc::new(Metrics::new()),
        )
        .unwrap(),
    )
}

/// A plain client configured like the action's (no redirects, 60 s idle pool, HTTP/1.1). The
/// crate builds reqwest without a default TLS provider, so one is installed (plain http here).
fn bare_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// What the action does per event, without the engine: render the standard payload, POST it
/// with the same headers, read the response.
async fn bare_post(client: &reqwest::Client, url: reqwest::Url, event: &Event) {
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(IDEMPOTENCY_HEADER, event.id.as_str())
        .body(default_payload(event))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("baseline POST");
    assert!(response.status().is_success());
    let _ = response.bytes().await;
}

struct Bare {
    client: reqwest::Client,
    url: reqwest::Url,
    permits: Arc<Semaphore>,
}

impl Bare {
    fn new(url: &str) -> Bare {
        Bare {
            client: bare_client(),
            url: reqwest::Url::parse(url).unwrap(),
            permits: Arc::new(Semaphore::new(CONCURRENCY)),
        }
    }

    /// Waits for a slot, then sends in a task of its own.
    async fn send(&self, event: Event) {
        let permit = self.permits.clone().acquire_owned().await.unwrap();
        let client = self.client.clone();
        let url = self.url.clone();
        tokio::spawn(async move {
            bare_post(&client, url, &event).await;
            drop(permit);
        });
    }

    async fn wait_idle(&self) {
        let _all = self.permits.acquire_many(CONCURRENCY as u32).await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Phases

async fn bare_burst(bare: &Bare, events: Vec<Event>) -> Duration {
    let started = Instant::now();
    for e in events {
        bare.send(e).await;
    }
    bare.wait_idle().await;
    started.elapsed()
}

async fn engine_burst(engine: &Arc<Engine>, events: Vec<Event>) -> Duration {
    let transport = MemoryTransport::start(engine.clone(), QUEUE, CONCURRENCY);
    let started = Instant::now();
    for e in events {
        transport.emit(e).await.unwrap();
    }
    transport.stop().await;
    started.elapsed()
}

fn paced_events() -> usize {
    (PACED_RATE * PACED_SECS) as usize
}

fn due(started: tokio::time::Instant, i: usize) -> tokio::time::Instant {
    started + Duration::from_nanos(i as u64 * 1_000_000_000 / PACED_RATE)
}

async fn bare_paced(bare: &Bare) -> Duration {
    let started = tokio::time::Instant::now();
    for i in 0..paced_events() {
        tokio::time::sleep_until(due(started, i)).await;
        bare.send(order(i)).await;
    }
    bare.wait_idle().await;
    started.elapsed()
}

async fn engine_paced(engine: &Arc<Engine>) -> Duration {
    let transport = MemoryTransport::start(engine.clone(), QUEUE, CONCURRENCY);
    let started = tokio::time::Instant::now();
    for i in 0..paced_events() {
        tokio::time::sleep_until(due(started, i)).await;
        transport.emit(order(i)).await.unwrap();
    }
    transport.stop().await;
    started.elapsed()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Phase 1: the sink refuses connections; retries pile up against bounded in-flight work.
fn sink_down(rt: &tokio::runtime::Runtime) {
    let port = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    });
    let retry = RetryPolicy {
        max_attempts: DOWN_ATTEMPTS,
        backoff: BackoffStrategy::Fixed,
        initial_delay: DOWN_DELAY,
        max_delay: DOWN_DELAY,
        jitter: false,
    };
    let engine = webhook_engine(
        format!("http://127.0.0.1:{port}/hook"),
        retry,
        Some(DOWN_DLQ_MAX),
    );
    println!(
        "1. sink down (127.0.0.1:{port} refuses connections): {DOWN_EVENTS} events, \
         {DOWN_ATTEMPTS} attempts fixed {}ms each, queue {QUEUE}, max concurrency {CONCURRENCY}, \
         DLQ capped at {DOWN_DLQ_MAX}",
        DOWN_DELAY.as_millis()
    );
    let rss_before = rss_kib();
    let transport = {
        let _guard = rt.enter();
        Arc::new(MemoryTransport::start(engine.clone(), QUEUE, CONCURRENCY))
    };
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let transport = transport.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(RSS_EVERY);
                samples.push((started.elapsed(), rss_kib(), transport.pending()));
            }
            samples
        })
    };
    let (emitted_in, total) = rt.block_on(async {
        let started = Instant::now();
        for i in 0..DOWN_EVENTS {
            transport.emit(order(i)).await.unwrap();
        }
        let emitted_in = started.elapsed();
        transport.stop().await;
        (emitted_in, started.elapsed())
    });
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    let rss_after = rss_kib();
    let shown: Vec<String> = samples
        .iter()
        .map(|(t, rss, pending)| {
            format!(
                "{:>5.1}s {:>6.1} MiB {pending:>6} pending",
                t.as_secs_f64(),
                *rss as f64 / 1024.0
            )
        })
        .collect();
    for row in shown.chunks(3) {
        println!("     {}", row.join(" | "));
    }
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let max_pending = samples.iter().map(|s| s.2).max().unwrap_or(0);
    let metrics = engine.metrics();
    println!(
        "   RSS before {}, max {} (+{}), after stop {}; max pending (queue + in flight) {max_pending}",
        mib(rss_before),
        mib(max),
        mib(max.saturating_sub(rss_before)),
        mib(rss_after)
    );
    println!(
        "   all {DOWN_EVENTS} emitted in {:.1}s (emit waited on the full queue), done in {:.1}s; \
         dead-lettered {} + dropped at the DLQ cap {}",
        emitted_in.as_secs_f64(),
        total.as_secs_f64(),
        metrics.dlq_size.get(),
        metrics.dlq_overflow.get()
    );
}

fn rate(n: usize, d: Duration) -> String {
    format!(
        "{:>7.0} deliveries/s ({n} in {:.2}s)",
        n as f64 / d.as_secs_f64(),
        d.as_secs_f64()
    )
}

/// Phase 2: throughput, baseline then engine.
fn throughput(rt: &tokio::runtime::Runtime, sink: &Sink, bare: &Bare, engine: &Arc<Engine>) {
    let body = default_payload(&order(0)).len();
    println!(
        "2. throughput: {BURST_EVENTS} POSTs of {body} B, {CONCURRENCY} in flight \
         (after {WARMUP_EVENTS} untimed to open connections)"
    );
    rt.block_on(bare_burst(bare, orders(WARMUP_EVENTS)));
    let (requests, connections) = (sink.requests(), sink.connections());
    let d = rt.block_on(bare_burst(bare, orders(BURST_EVENTS)));
    assert_eq!(sink.requests() - requests, BURST_EVENTS as u64);
    println!(
        "   baseline: bare reqwest client  {}, {} connections opened",
        rate(BURST_EVENTS, d),
        sink.connections() - connections
    );
    rt.block_on(engine_burst(engine, orders(WARMUP_EVENTS)));
    let (requests, connections) = (sink.requests(), sink.connections());
    let d = rt.block_on(engine_burst(engine, orders(BURST_EVENTS)));
    assert_eq!(sink.requests() - requests, BURST_EVENTS as u64);
    println!(
        "   engine: MemoryTransport+webhook {}, {} connections opened",
        rate(BURST_EVENTS, d),
        sink.connections() - connections
    );
    println!(
        "   keep-alive: {} requests so far over {} connections in all",
        sink.requests(),
        sink.connections()
    );
}

fn latency_line(label: &str, mut ns: Vec<u64>, took: Duration) -> String {
    assert_eq!(ns.len(), paced_events(), "{label}: every request timed");
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    format!(
        "   {label} p50 {:>6.0} µs  p99 {:>6.0} µs  max {:>6.0} µs  ({} events in {:.2}s)",
        at(0.50),
        at(0.99),
        at(1.0),
        ns.len(),
        took.as_secs_f64()
    )
}

/// Phase 3: emit → sink latency at a fixed rate, baseline then engine.
fn latency(rt: &tokio::runtime::Runtime, sink: &Sink, bare: &Bare, engine: &Arc<Engine>) {
    println!(
        "3. latency, emit -> sink received, {PACED_RATE} events/s for {PACED_SECS}s \
         (keep-alive connections already open)"
    );
    sink.record(true);
    let took = rt.block_on(bare_paced(bare));
    let bare_ns = sink.record(true);
    println!(
        "{}",
        latency_line("baseline: bare reqwest client  ", bare_ns, took)
    );
    let took = rt.block_on(engine_paced(engine));
    let engine_ns = sink.record(false);
    println!(
        "{}",
        latency_line("engine: MemoryTransport+webhook", engine_ns, took)
    );
}

fn main() {
    now_ns();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "webhook delivery over loopback HTTP/1.1, {cores} cores; emitter + engine on a \
         multi-thread tokio runtime, axum sink on its own 2-worker runtime in the same process"
    );
    let started = Instant::now();
    sink_down(&rt);

    let sink = Sink::start();
    let bare = Bare::new(&sink.url());
    let engine = webhook_engine(sink.url(), RetryPolicy::default(), None);
    throughput(&rt, &sink, &bare, &engine);
    latency(&rt, &sink, &bare, &engine);
    assert_eq!(engine.metrics().dlq_size.get(), 0, "no delivery failed");
    println!("total {:.1}s", started.elapsed().as_secs_f64());
}
