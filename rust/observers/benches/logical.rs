//! Logical capture end to end, beside trigger capture on the same server: what writers pay,
//! WAL → engine throughput and CPU per change, commit → action latency (also with a
//! transaction left open in another database), and memory while one transaction of a million
//! rows streams.
//!
//! `cargo bench -p fraiseql_observers --bench logical` against the PostgreSQL at
//! `FRAISEQL_BENCH_LOGICAL_DATABASE_URL` (it needs `wal_level = logical`), else one it starts
//! (as the tests do, with `fsync = off`: writer figures are CPU-bound, not disk-bound). It
//! creates the database `fraiseql_bench_wal` afresh. `FRAISEQL_BENCH_ONLY=writer,throughput,
//! latency,bigtx` picks phases; `FRAISEQL_BENCH_BACKLOG` sizes the backlog (default 1,000,000).
//!
//! The engine runs on a runtime of its own (threads `engine`); its CPU is read from
//! `/proc/self/task`, PostgreSQL's walsender's from `/proc/<pid>/stat`.

#[path = "../tests/services/mod.rs"]
mod services;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fraiseql_observers::capture::logical::{self, LogicalCapture};
use fraiseql_observers::capture::{self, CaptureOptions};
use fraiseql_observers::transport::logical::{LogicalOptions, LogicalSource};
use fraiseql_observers::{
    Action, ActionError, CheckpointStrategy, EntityDef, Event, EventKind, ListenerConfig,
    MemoryDlq, MemoryIdempotencyStores, Metrics, ObserverSpec, Schema,
};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection};
use tokio::runtime::Runtime;
use tokio::sync::watch;

const WRITERS: usize = 4;
const DB: &str = "fraiseql_bench_wal";

fn server_url() -> String {
    std::env::var("FRAISEQL_BENCH_LOGICAL_DATABASE_URL")
        .unwrap_or_else(|_| services::start_logical_postgres().url)
}

fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let cut = base.rfind('/').expect("a URL with a database");
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{}/{db}{query}", &base[..cut])
}

fn runtime(name: &str, threads: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

/// utime + stime in seconds of `/proc/<stat>` (a process or a task).
fn stat_cpu(stat: &str) -> f64 {
    let (Some(_), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return 0.0;
    };
    let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
    (fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()) as f64 / 100.0
}

/// CPU seconds of this process's threads called `name`.
fn thread_cpu(name: &str) -> f64 {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .filter(|stat| stat.contains(&format!("({name})")))
        .map(|stat| stat_cpu(&stat))
        .sum()
}

/// CPU seconds of another process (PostgreSQL's walsender), 0 if gone.
fn process_cpu(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| stat_cpu(&s))
        .unwrap_or(0.0)
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<f64>()
        .unwrap()
        / 1024.0
}

/// Counts events and records commit → action latency.
#[derive(Default)]
struct Recorder {
    seen: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    record: AtomicBool,
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

struct Bench {
    url: String,
    pool: PgPool,
}

async fn setup(server: &str) -> Bench {
    let mut admin = PgConnection::connect(server).await.unwrap();
    let _ = admin
        .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'fraiseql_bench%'")
        .await;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)").as_str())
        .await
        .unwrap();
    admin
        .execute(format!("CREATE DATABASE {DB}").as_str())
        .await
        .unwrap();
    let url = with_database(server, DB);
    // Writers commit as PostgreSQL does by default (the test servers turn it off): with
    // synchronous_commit = off, a walsender sees a commit only once the WAL writer flushed
    // it, up to wal_writer_delay (200 ms) later.
    let options = url
        .parse::<sqlx::postgres::PgConnectOptions>()
        .unwrap()
        .options([("synchronous_commit", "on")]);
    let pool = PgPoolOptions::new()
        .max_connections(WRITERS as u32 + 2)
        .connect_with(options)
        .await
        .unwrap();
    pool.execute(
        "CREATE TABLE tb_bench (id bigserial PRIMARY KEY, status text NOT NULL, total numeric NOT NULL);
         CREATE TABLE plain_bench (id bigserial PRIMARY KEY, status text NOT NULL, total numeric NOT NULL);",
    )
    .await
    .unwrap();
    Bench { url, pool }
}

fn capture_of(reader: &str) -> LogicalCapture {
    LogicalCapture {
        publication: "fraiseql".into(),
        slots: vec![logical::slot_name(reader)],
    }
}

async fn install_logical(pool: &PgPool, reader: &str) {
    logical::install(pool, &schema(), &capture_of(reader))
        .await
        .unwrap();
}

async fn uninstall_logical(pool: &PgPool, reader: &str) {
    logical::uninstall(pool, &capture_of(reader)).await.unwrap();
}

/// `WRITERS` connections inserting `rows_per_tx` rows per transaction into `table`, for
/// `duration`, at most `rate` rows/s in all (0 = flat out). Returns rows written and time.
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
}

async fn start_engine(bench: &Bench, reader: &str) -> RunningEngine {
    let recorder = Arc::new(Recorder::default());
    let spec = ObserverSpec::new(
        ListenerConfig::new("bench", CheckpointStrategy::AtLeastOnce),
        "Bench",
        EventKind::Insert,
    )
    .action(recorder.clone());
    let update = ObserverSpec::new(
        ListenerConfig::new("bench_update", CheckpointStrategy::AtLeastOnce),
        "Bench",
        EventKind::Update,
    )
    .action(recorder.clone());
    let engine = fraiseql_observers::Engine::new(
        vec![spec, update],
        Arc::new(MemoryDlq::new(None)),
        &MemoryIdempotencyStores::default(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let options = LogicalOptions {
        reader: reader.into(),
        slot: logical::slot_name(reader),
        publication: "fraiseql".into(),
        batch_size: 500,
        poll_interval: Duration::from_millis(500),
        max_concurrency: 256,
        skip_unchanged_updates: true,
        max_retained_wal: u64::MAX,
    };
    let source = LogicalSource::new(bench.pool.clone(), &bench.url, &schema(), options)
        .await
        .unwrap();
    let (shutdown, rx) = watch::channel(false);
    let task = tokio::spawn(source.run(Arc::new(engine), rx));
    RunningEngine {
        shutdown,
        task,
        recorder,
    }
}

impl RunningEngine {
    async fn wait_for(&self, n: u64, timeout: Duration) -> Duration {
        let started = Instant::now();
        while self.recorder.seen.load(Ordering::Relaxed) < n {
            assert!(
                started.elapsed() < timeout,
                "timed out waiting for {n} events (got {})",
                self.recorder.seen.load(Ordering::Relaxed)
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

/// The walsender streaming `reader`'s slot.
async fn walsender_pid(pool: &PgPool, reader: &str) -> i32 {
    for _ in 0..500 {
        let pid: Option<i32> =
            sqlx::query_scalar("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1")
                .bind(logical::slot_name(reader))
                .fetch_one(pool)
                .await
                .unwrap();
        if let Some(pid) = pid {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the slot is not streamed")
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn enabled(phase: &str) -> bool {
    std::env::var("FRAISEQL_BENCH_ONLY").map_or(true, |only| only.split(',').any(|p| p == phase))
}

fn main() {
    let writer = runtime("writer", 2);
    let engine_rt = runtime("engine", 2);
    let backlog: u64 = std::env::var("FRAISEQL_BENCH_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let server = server_url();
    let bench = writer.block_on(setup(&server));
    let (version, settings): (String, String) = writer
        .block_on(
            sqlx::query_as(
                "SELECT current_setting('server_version'), \
                 format('wal_level=%s fsync=%s synchronous_commit=%s', current_setting('wal_level'), \
                 current_setting('fsync'), current_setting('synchronous_commit'))",
            )
            .fetch_one(&bench.pool),
        )
        .unwrap();
    println!("PostgreSQL {version} ({settings})");
    if enabled("writer") {
        writer_cost(&writer, &engine_rt, &bench, Duration::from_secs(5));
    }
    if enabled("throughput") {
        throughput(&writer, &engine_rt, &bench, backlog);
    }
    if enabled("latency") {
        latency(&writer, &engine_rt, &bench, &server);
    }
    if enabled("bigtx") {
        big_transaction(&writer, &engine_rt, &bench, backlog);
    }
    writer.block_on(bench.pool.close());
}

fn rate(writer: &Runtime, bench: &Bench, table: &str, rows: usize, secs: Duration) -> f64 {
    let (n, t) = writer.block_on(write(&bench.pool, table, rows, secs, 0));
    n as f64 / t.as_secs_f64()
}

fn writer_cost(writer: &Runtime, engine_rt: &Runtime, bench: &Bench, secs: Duration) {
    println!(
        "## writer cost ({WRITERS} connections, {}s each), rows/s and share of no capture",
        secs.as_secs()
    );
    let pool = &bench.pool;
    for rows in [1usize, 100] {
        // No capture before and after the others: the mean of the two is the reference.
        let plain_before = rate(writer, bench, "plain_bench", rows, secs);
        writer
            .block_on(capture::install_with(
                pool,
                &schema(),
                &CaptureOptions::new("fraiseql_bench"),
            ))
            .unwrap();
        let trigger = rate(writer, bench, "tb_bench", rows, secs);
        writer.block_on(install_logical(pool, "bench_writer"));
        let logical = rate(writer, bench, "tb_bench", rows, secs);
        // The slot read at the same time by the engine, on the same two cores.
        let running = engine_rt.block_on(start_engine(bench, "bench_writer"));
        let read = rate(writer, bench, "tb_bench", rows, secs);
        engine_rt.block_on(running.stop());
        writer.block_on(uninstall_logical(pool, "bench_writer"));
        let plain_after = rate(writer, bench, "plain_bench", rows, secs);
        let plain = (plain_before + plain_after) / 2.0;
        println!(
            "{rows:>3} row(s)/tx: no capture {plain:>8.0} ({plain_before:.0} before, {plain_after:.0} after) | trigger + NOTIFY {trigger:>8.0} ({:.2}) | \
             logical, slot not read {logical:>8.0} ({:.2}) | logical, engine reading {read:>8.0} ({:.2})",
            trigger / plain,
            logical / plain,
            read / plain
        );
        writer
            .block_on(pool.execute("TRUNCATE fraiseql_change_log, tb_bench, plain_bench"))
            .unwrap();
    }
}

fn throughput(writer: &Runtime, engine_rt: &Runtime, bench: &Bench, backlog: u64) {
    println!("\n## WAL -> engine: a backlog of {backlog} inserts (100 rows/tx), no-op action");
    let reader = "bench_throughput";
    writer.block_on(install_logical(&bench.pool, reader));
    let started = Instant::now();
    let mut written = 0;
    while written < backlog {
        let rows = 100.min(backlog - written);
        let sql = format!(
            "INSERT INTO tb_bench (status, total) SELECT 'pending', g FROM generate_series(1, {rows}) g"
        );
        // Four writers, 100 rows per transaction.
        let batch: Vec<_> = (0..WRITERS)
            .map(|_| {
                let pool = bench.pool.clone();
                let sql = sql.clone();
                writer.spawn(async move { pool.execute(sql.as_str()).await.unwrap() })
            })
            .collect();
        for b in batch {
            writer.block_on(b).unwrap();
        }
        written += rows * WRITERS as u64;
    }
    println!(
        "backlog written in {:.1}s ({} rows)",
        started.elapsed().as_secs_f64(),
        written
    );
    let running = engine_rt.block_on(start_engine(bench, reader));
    let walsender = writer.block_on(walsender_pid(&bench.pool, reader));
    let (cpu0, pg0) = (thread_cpu("engine"), process_cpu(walsender));
    let took = engine_rt.block_on(running.wait_for(written, Duration::from_secs(600)));
    let (cpu, pg) = (thread_cpu("engine") - cpu0, process_cpu(walsender) - pg0);
    println!(
        "engine {:.0} changes/s; engine CPU {:.2} µs/change, walsender (PostgreSQL decoding) {:.2} µs/change",
        written as f64 / took.as_secs_f64(),
        cpu * 1e6 / written as f64,
        pg * 1e6 / written as f64
    );
    engine_rt.block_on(running.stop());
    writer.block_on(uninstall_logical(&bench.pool, reader));
    writer
        .block_on(bench.pool.execute("TRUNCATE tb_bench"))
        .unwrap();
}

fn latency(writer: &Runtime, engine_rt: &Runtime, bench: &Bench, server: &str) {
    writer.block_on(bench.pool.execute("CHECKPOINT")).unwrap();
    for open_elsewhere in [false, true] {
        let label = if open_elsewhere {
            ", a transaction open in another database all along"
        } else {
            ""
        };
        println!("\n## latency at 1,000 changes/s (1 row/tx){label}, commit -> action start");
        let reader = "bench_latency";
        writer.block_on(install_logical(&bench.pool, reader));
        let blocker = open_elsewhere.then(|| {
            writer.block_on(async {
                let mut conn = PgConnection::connect(server).await.unwrap();
                conn.execute("BEGIN; CREATE TEMP TABLE held (x int); INSERT INTO held VALUES (1)")
                    .await
                    .unwrap();
                conn
            })
        });
        let running = engine_rt.block_on(start_engine(bench, reader));
        running.recorder.record.store(true, Ordering::Relaxed);
        let cpu0 = thread_cpu("engine");
        let (n, _) = writer.block_on(write(
            &bench.pool,
            "tb_bench",
            1,
            Duration::from_secs(10),
            1000,
        ));
        engine_rt.block_on(running.wait_for(n, Duration::from_secs(60)));
        let cpu = thread_cpu("engine") - cpu0;
        let mut lat = std::mem::take(&mut *running.recorder.latencies_us.lock().unwrap());
        lat.sort_unstable();
        println!(
            "{n} changes: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; engine CPU {:.1} µs/change",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999),
            percentile(&lat, 1.0),
            cpu * 1e6 / n as f64
        );
        engine_rt.block_on(running.stop());
        if let Some(conn) = blocker {
            writer.block_on(conn.close()).unwrap();
        }
        writer.block_on(uninstall_logical(&bench.pool, reader));
    }
}

fn big_transaction(writer: &Runtime, engine_rt: &Runtime, bench: &Bench, rows: u64) {
    println!("\n## one transaction updating {rows} rows, streamed to the engine");
    let reader = "bench_bigtx";
    writer
        .block_on(bench.pool.execute(
            format!(
                "TRUNCATE tb_bench; INSERT INTO tb_bench (status, total) SELECT 'pending', g FROM generate_series(1, {rows}) g"
            )
            .as_str(),
        ))
        .unwrap();
    writer.block_on(install_logical(&bench.pool, reader));
    let running = engine_rt.block_on(start_engine(bench, reader));
    let rss_before = rss_mib();
    let started = Instant::now();
    writer
        .block_on(bench.pool.execute("UPDATE tb_bench SET status = 'shipped'"))
        .unwrap();
    let committed = started.elapsed();
    let mut samples = Vec::new();
    let mut peak = rss_before;
    while running.recorder.seen.load(Ordering::Relaxed) < rows {
        std::thread::sleep(Duration::from_millis(100));
        let rss = rss_mib();
        peak = peak.max(rss);
        if running.recorder.seen.load(Ordering::Relaxed) > 0 {
            samples.push(rss);
        }
    }
    let took = started.elapsed();
    let quarter = |q: usize| samples.get(samples.len() * q / 4).copied().unwrap_or(peak);
    println!(
        "committed after {:.1}s, all {rows} delivered after {:.1}s; RSS {:.0} MiB before, {:.0}/{:.0}/{:.0} MiB at 25/50/75% of the delivery, peak {:.0} MiB",
        committed.as_secs_f64(),
        took.as_secs_f64(),
        rss_before,
        quarter(1),
        quarter(2),
        quarter(3),
        peak
    );
    engine_rt.block_on(running.stop());
    writer.block_on(uninstall_logical(&bench.pool, reader));
}
