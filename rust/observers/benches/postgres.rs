//! The postgres backend end to end: writer cost, throughput, engine CPU per change, latency
//! and memory while a backlog drains.
//!
//! `cargo bench -p fraiseql_observers --bench postgres` against the PostgreSQL at
//! `FRAISEQL_BENCH_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`); it
//! creates the database `fraiseql_bench` afresh. Set `FRAISEQL_BENCH_BACKLOG` to change the
//! backlog size (default 1,000,000 rows).
//!
//! The engine runs on a tokio runtime of its own whose threads are named `engine`; its CPU
//! time is read from `/proc/self/task/*/stat` for those threads only, so the writer (another
//! runtime in this process) and PostgreSQL are not counted. The action is a no-op that
//! records `now - committed_at` (the trigger's `clock_timestamp()`) for the latency figures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fraiseql_observers::capture::{self, CaptureOptions};
use fraiseql_observers::{
    Action, ActionError, CheckpointStrategy, EntityDef, Event, EventKind, ListenerConfig,
    MemoryDlq, MemoryIdempotencyStores, Metrics, ObserverSpec, PostgresOptions, PostgresSource,
    Schema,
};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection};
use tokio::runtime::Runtime;
use tokio::sync::watch;

const WRITERS: usize = 4;
const DB: &str = "fraiseql_bench";

fn base_url() -> String {
    std::env::var("FRAISEQL_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn bench_url() -> String {
    let base = base_url();
    let (base, query) = base.split_once('?').unwrap_or((&base, ""));
    let cut = base.rfind('/').expect("a URL with a database");
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{}/{DB}{query}", &base[..cut])
}

fn runtime(name: &str, threads: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

/// utime + stime of this process's threads called `name`, in seconds.
fn thread_cpu(name: &str) -> f64 {
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if &stat[open + 1..close] != name {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // After the comm: state is field 0, utime 11, stime 12.
        ticks += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    ticks as f64 / ticks_per_sec
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib / 1024.0
}

/// Counts events and records commit → action latency.
#[derive(Default)]
struct Recorder {
    seen: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    record: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Action for Recorder {
    fn kind(&self) -> &'static str {
        "noop"
    }

    async fn execute(&self, event: &Event) -> Result<(), ActionError> {
        self.seen.fetch_add(1, Ordering::Relaxed);
        if self.record.load(Ordering::Relaxed) {
            let committed = chrono::DateTime::parse_from_rfc3339(&event.timestamp).unwrap();
            let micros = (chrono::Utc::now() - committed.with_timezone(&chrono::Utc))
                .num_microseconds()
                .unwrap_or(0);
            self.latencies_us.lock().unwrap().push(micros.max(0) as u64);
        }
        Ok(())
    }
}

fn schema() -> Schema {
    Schema::new(vec![EntityDef {
        name: "Bench".into(),
        table: "tb_bench".into(),
        fields: vec![],
        kinds: Vec::new(),
    }])
    .unwrap()
}

async fn setup_database() -> PgPool {
    let mut admin = PgConnection::connect(&base_url()).await.unwrap();
    admin
        .execute(format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)").as_str())
        .await
        .unwrap();
    admin
        .execute(format!("CREATE DATABASE {DB}").as_str())
        .await
        .unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(WRITERS as u32 + 2)
        .connect(&bench_url())
        .await
        .unwrap();
    pool.execute(
        "CREATE TABLE tb_bench (id bigserial PRIMARY KEY, status text NOT NULL, total numeric NOT NULL);
         CREATE TABLE plain_bench (id bigserial PRIMARY KEY, status text NOT NULL, total numeric NOT NULL);",
    )
    .await
    .unwrap();
    pool
}

async fn install(pool: &PgPool, notify: bool) {
    let mut options = CaptureOptions::new("fraiseql_bench");
    options.notify = notify;
    capture::install_with(pool, &schema(), &options)
        .await
        .unwrap();
}

/// `WRITERS` connections inserting `rows_per_tx` rows per transaction into `table`, for
/// `duration` or until `total` rows, at most `rate` rows/s in all (0 = flat out). Returns
/// rows written and the time taken.
async fn write(
    pool: &PgPool,
    table: &str,
    rows_per_tx: usize,
    duration: Duration,
    rate: u64,
) -> (u64, Duration) {
    let started = Instant::now();
    let sql = format!(
        "INSERT INTO {table} (status, total) SELECT 'pending', g FROM generate_series(1, {rows_per_tx}) g"
    );
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let pool = pool.clone();
        let sql = sql.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await.unwrap();
            let mut written = 0u64;
            let per_writer = rate as f64 / WRITERS as f64;
            let offset = Duration::from_secs_f64(if rate > 0 {
                w as f64 / rate as f64
            } else {
                0.0
            });
            while started.elapsed() < duration {
                if rate > 0 {
                    let due = offset + Duration::from_secs_f64(written as f64 / per_writer);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                conn.execute(sql.as_str()).await.unwrap();
                written += rows_per_tx as u64;
            }
            written
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    (total, started.elapsed())
}

struct RunningEngine {
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<fraiseql_observers::Result<()>>,
    recorder: Arc<Recorder>,
    metrics: Arc<Metrics>,
}

async fn start_engine(listen: bool, listener_id: &str) -> RunningEngine {
    let recorder = Arc::new(Recorder::default());
    let spec = ObserverSpec::new(
        ListenerConfig::new("bench", CheckpointStrategy::AtLeastOnce),
        "Bench",
        EventKind::Insert,
    )
    .action(recorder.clone());
    let metrics = Arc::new(Metrics::new());
    let engine = fraiseql_observers::Engine::new(
        vec![spec],
        Arc::new(MemoryDlq::new(None)),
        &MemoryIdempotencyStores::default(),
        metrics.clone(),
    )
    .unwrap();
    let options = PostgresOptions {
        listener_id: listener_id.into(),
        notify_channel: "fraiseql_bench".into(),
        batch_size: 500,
        poll_interval: Duration::from_millis(if listen { 1000 } else { 50 }),
        listen,
        max_concurrency: 256,
        ..PostgresOptions::default()
    };
    let source = PostgresSource::connect(&bench_url(), options)
        .await
        .unwrap();
    let (shutdown, rx) = watch::channel(false);
    let task = tokio::spawn(source.run(Arc::new(engine), rx));
    RunningEngine {
        shutdown,
        task,
        recorder,
        metrics,
    }
}

impl RunningEngine {
    async fn wait_for(&self, n: u64, timeout: Duration) -> Duration {
        let started = Instant::now();
        while self.recorder.seen.load(Ordering::Relaxed) < n {
            assert!(
                started.elapsed() < timeout,
                "timed out waiting for {n} events"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        started.elapsed()
    }

    async fn stop(self) {
        let _ = self.shutdown.send(true);
        self.task.await.unwrap().unwrap();
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// `FRAISEQL_BENCH_ONLY=writer,throughput,latency,backlog` (default: all).
fn enabled(phase: &str) -> bool {
    std::env::var("FRAISEQL_BENCH_ONLY").map_or(true, |only| only.split(',').any(|p| p == phase))
}

fn main() {
    let writer = runtime("writer", 2);
    let engine_threads = std::env::var("FRAISEQL_BENCH_ENGINE_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let engine_rt = runtime("engine", engine_threads);
    let backlog: u64 = std::env::var("FRAISEQL_BENCH_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let pool = writer.block_on(setup_database());
    let secs = Duration::from_secs(5);
    if enabled("writer") {
        writer_cost(&writer, &pool, secs);
    }
    if enabled("throughput") {
        throughput(&writer, &engine_rt, &pool, secs);
    }
    if enabled("latency") {
        latency(&writer, &engine_rt, &pool);
    }
    if enabled("backlog") {
        drain_backlog(&writer, &engine_rt, &pool, backlog);
    }
    writer.block_on(pool.close());
}

fn writer_cost(writer: &Runtime, pool: &PgPool, secs: Duration) {
    println!(
        "## writer cost ({WRITERS} connections, {}s each)",
        secs.as_secs()
    );
    for rows in [1usize, 100] {
        let (n, t) = writer.block_on(write(pool, "plain_bench", rows, secs, 0));
        let plain = n as f64 / t.as_secs_f64();
        writer.block_on(install(pool, true));
        let (n, t) = writer.block_on(write(pool, "tb_bench", rows, secs, 0));
        let notify = n as f64 / t.as_secs_f64();
        writer.block_on(install(pool, false));
        let (n, t) = writer.block_on(write(pool, "tb_bench", rows, secs, 0));
        let poll = n as f64 / t.as_secs_f64();
        println!(
            "{rows:>3} row(s)/tx: no trigger {plain:>8.0} rows/s | trigger + NOTIFY {notify:>8.0} ({:.0}%) | trigger, poll-only {poll:>8.0} ({:.0}%)",
            100.0 * notify / plain,
            100.0 * poll / plain
        );
    }
    writer
        .block_on(pool.execute("TRUNCATE fraiseql_change_log"))
        .unwrap();
}

fn throughput(writer: &Runtime, engine_rt: &Runtime, pool: &PgPool, secs: Duration) {
    println!("\n## throughput: the engine against a flat-out writer (100 rows/tx)");
    writer.block_on(install(pool, true));
    let running = engine_rt.block_on(start_engine(true, "throughput"));
    let cpu0 = thread_cpu("engine");
    let (n, t) = writer.block_on(write(pool, "tb_bench", 100, secs, 0));
    let behind_at_end = n - running.recorder.seen.load(Ordering::Relaxed);
    let tail = engine_rt.block_on(running.wait_for(n, Duration::from_secs(600)));
    let cpu = thread_cpu("engine") - cpu0;
    let total = t + tail;
    println!(
        "writer {:.0} changes/s for {:.1}s; engine {:.0} changes/s, {} behind when the writer stopped, done {:.0} ms later",
        n as f64 / t.as_secs_f64(),
        t.as_secs_f64(),
        n as f64 / total.as_secs_f64(),
        behind_at_end,
        tail.as_secs_f64() * 1000.0
    );
    println!(
        "engine CPU {:.2}s for {n} changes = {:.2} µs/change",
        cpu,
        cpu * 1e6 / n as f64
    );
    engine_rt.block_on(running.stop());
}

fn latency(writer: &Runtime, engine_rt: &Runtime, pool: &PgPool) {
    // The latency includes the writer's commit; flush what earlier phases left to write so
    // a checkpoint does not land in the middle of the measurement.
    writer.block_on(pool.execute("CHECKPOINT")).unwrap();
    for (listen, label) in [(true, "LISTEN/NOTIFY"), (false, "poll-only, 50 ms")] {
        println!("\n## latency at 1,000 changes/s (1 row/tx, {label}), commit → action start");
        writer.block_on(install(pool, listen));
        let id = if listen { "latency" } else { "latency_poll" };
        writer
            .block_on(
                pool.execute(
                    format!("INSERT INTO fraiseql_cursor (listener_id, last_txid, last_id) SELECT '{id}', pg_current_xact_id(), coalesce(max(id), 0) FROM fraiseql_change_log")
                        .as_str(),
                ),
            )
            .unwrap();
        let running = engine_rt.block_on(start_engine(listen, id));
        running.recorder.record.store(true, Ordering::Relaxed);
        let cpu0 = thread_cpu("engine");
        let (n, _) = writer.block_on(write(pool, "tb_bench", 1, Duration::from_secs(10), 1000));
        engine_rt.block_on(running.wait_for(n, Duration::from_secs(60)));
        let cpu = thread_cpu("engine") - cpu0;
        let mut lat = std::mem::take(&mut *running.recorder.latencies_us.lock().unwrap());
        lat.sort_unstable();
        println!(
            "{n} changes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; engine CPU {:.1} µs/change",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 1.0),
            cpu * 1e6 / n as f64
        );
        engine_rt.block_on(running.stop());
    }
}

fn drain_backlog(writer: &Runtime, engine_rt: &Runtime, pool: &PgPool, backlog: u64) {
    println!("\n## memory while a backlog of {backlog} change-log rows drains");
    writer.block_on(install(pool, true));
    writer
        .block_on(pool.execute("TRUNCATE fraiseql_change_log; DELETE FROM fraiseql_cursor"))
        .unwrap();
    let chunk = 100_000u64;
    let mut written = 0;
    while written < backlog {
        let rows = chunk.min(backlog - written);
        writer
            .block_on(pool.execute(
                format!("INSERT INTO tb_bench (status, total) SELECT 'pending', g FROM generate_series(1, {rows}) g").as_str(),
            ))
            .unwrap();
        written += rows;
    }
    let rss_before = rss_mib();
    let running = engine_rt.block_on(start_engine(true, "backlog"));
    let cpu0 = thread_cpu("engine");
    let started = Instant::now();
    let mut peak = rss_before;
    let mut samples = Vec::new();
    while running.recorder.seen.load(Ordering::Relaxed) < backlog {
        std::thread::sleep(Duration::from_millis(100));
        let rss = rss_mib();
        peak = peak.max(rss);
        samples.push(rss);
    }
    let t = started.elapsed();
    let cpu = thread_cpu("engine") - cpu0;
    let lag = running.metrics.changelog_lag_rows.get();
    engine_rt.block_on(running.stop());
    let quarter = |q: usize| samples.get(samples.len() * q / 4).copied().unwrap_or(peak);
    println!(
        "drained {backlog} rows in {:.1}s ({:.0} changes/s, {:.2} µs CPU/change); RSS {:.0} MiB before, {:.0}/{:.0}/{:.0} MiB at 25/50/75%, peak {:.0} MiB (lag gauge at the end: {lag})",
        t.as_secs_f64(),
        backlog as f64 / t.as_secs_f64(),
        cpu * 1e6 / backlog as f64,
        rss_before,
        quarter(1),
        quarter(2),
        quarter(3),
        peak
    );
}
