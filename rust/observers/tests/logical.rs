//! Logical capture against a real PostgreSQL with `wal_level = logical`: the server in
//! `FRAISEQL_TEST_LOGICAL_DATABASE_URL`, else one this test binary starts (tests that restart
//! PostgreSQL start one of their own). Each test creates its own database, and its own slot.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fraiseql_observers::capture::logical::{self, LogicalCapture};
use fraiseql_observers::engine::Engine;
use fraiseql_observers::status::HealthSource;
use fraiseql_observers::transport::logical::{LogicalOptions, LogicalSource};
use fraiseql_observers::{
    Action, ActionError, CheckpointStrategy, EntityDef, Event, EventKind, ListenerConfig,
    MemoryDlq, MemoryIdempotencyStores, Metrics, ObserverSpec, Schema,
};
use serde_json::{json, Value};
use sqlx::{Connection, Executor, PgConnection};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

mod pg;
mod poison;
mod services;

use pg::TestDb;

const WAIT: Duration = Duration::from_secs(60);

async fn test_db_on(server: &str) -> TestDb {
    let db = TestDb::create_on(server, "fraiseql_wal", 8).await;
    db.pool
        .execute(
            "CREATE TABLE tb_order (id serial PRIMARY KEY, status text NOT NULL DEFAULT 'new', \
             total numeric NOT NULL DEFAULT 0, note text)",
        )
        .await
        .unwrap();
    db
}

async fn test_db() -> TestDb {
    test_db_on(&services::logical_database_url()).await
}

fn schema() -> Schema {
    Schema::new(vec![EntityDef {
        name: "Order".into(),
        table: "tb_order".into(),
        fields: vec![],
        kinds: Vec::new(),
    }])
    .unwrap()
}

/// A reader name of the test's own: slot names are shared by every database of a server.
fn reader(db: &TestDb, what: &str) -> String {
    format!("{what}_{}", &db.name[db.name.len() - 12..])
}

fn options(reader: &str) -> LogicalOptions {
    LogicalOptions {
        reader: reader.to_owned(),
        slot: logical::slot_name(reader),
        publication: "fraiseql".into(),
        batch_size: 100,
        poll_interval: Duration::from_millis(200),
        max_concurrency: 8,
        skip_unchanged_updates: true,
        max_retained_wal: 1 << 30,
    }
}

async fn install(db: &TestDb, readers: &[&str]) {
    logical::install(
        &db.pool,
        &schema(),
        &LogicalCapture {
            publication: "fraiseql".into(),
            slots: readers.iter().map(|r| logical::slot_name(r)).collect(),
        },
    )
    .await
    .unwrap();
}

/// Records every event it is given.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
    changed: Notify,
}

#[async_trait]
impl Action for Recorder {
    fn kind(&self) -> &'static str {
        "recorder"
    }

    async fn execute(&self, event: &Event) -> Result<(), ActionError> {
        self.events.lock().unwrap().push(event.clone());
        self.changed.notify_waiters();
        Ok(())
    }
}

impl Recorder {
    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    fn len(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    async fn wait_for(&self, n: usize) -> Vec<Event> {
        tokio::time::timeout(WAIT, async {
            loop {
                let notified = self.changed.notified();
                if self.len() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("expected {n} events, got {}", self.len()));
        self.events()
    }
}

fn engine(recorder: &Arc<Recorder>) -> Arc<Engine> {
    let specs = EventKind::ALL
        .iter()
        .map(|&kind| {
            ObserverSpec::new(
                ListenerConfig::new(
                    format!("record_{}", kind.as_lower()),
                    CheckpointStrategy::AtLeastOnce,
                ),
                "Order",
                kind,
            )
            .action(recorder.clone() as Arc<dyn Action>)
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

struct Running {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<fraiseql_observers::Result<()>>,
    health: Arc<dyn HealthSource>,
}

impl Running {
    async fn start(db: &TestDb, options: LogicalOptions, engine: Arc<Engine>) -> Running {
        let source = LogicalSource::new(db.pool.clone(), &db.url, &schema(), options)
            .await
            .unwrap();
        let health = source.health();
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(source.run(engine, rx));
        Running {
            shutdown,
            task,
            health,
        }
    }

    fn observers(&self) -> Value {
        self.health.observers()
    }

    async fn wait_until(&self, what: &str, check: impl Fn(&Value) -> bool) {
        tokio::time::timeout(WAIT, async {
            while !check(&self.health.observers()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}: {}", self.observers()));
    }

    async fn stop(self) {
        self.shutdown.send(true).unwrap();
        self.task.await.unwrap().unwrap();
    }

    /// Gone without a word, as a killed process: nothing more is confirmed.
    async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn exec(db: &TestDb, sql: &str) {
    db.pool.execute(sql).await.unwrap();
}

/// Several poll intervals: long enough for a wrongly delivered event to show up.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

/// Waits until the recorders together saw every total in `expected`; returns what they saw.
async fn wait_for_totals(
    recorders: &[&Recorder],
    expected: std::ops::RangeInclusive<i64>,
) -> HashSet<i64> {
    let expected: HashSet<i64> = expected.collect();
    let seen = || -> HashSet<i64> { recorders.iter().flat_map(|r| totals(&r.events())).collect() };
    tokio::time::timeout(WAIT, async {
        while !expected.is_subset(&seen()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        let missing: Vec<_> = expected.difference(&seen()).copied().collect();
        panic!("never delivered: {missing:?}")
    });
    seen()
}

fn totals(events: &[Event]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e.row().unwrap()["total"].as_i64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_is_idempotent_and_uninstall_removes_slot_and_publication() {
    let db = test_db().await;
    let reader = reader(&db, "install");
    // Trigger capture first: a logical install takes the triggers off.
    fraiseql_observers::capture::install(&db.pool, &schema(), "fraiseql_changes")
        .await
        .unwrap();
    install(&db, &[&reader]).await;
    install(&db, &[&reader]).await;
    let row: (i64, String, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_publication_tables WHERE pubname = 'fraiseql' \
                 AND tablename = 'tb_order'), \
                (SELECT relreplident::text FROM pg_class WHERE oid = 'tb_order'::regclass), \
                (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 \
                 AND plugin = 'pgoutput'), \
                (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'tb_order'::regclass \
                 AND NOT tgisinternal)",
    )
    .bind(logical::slot_name(&reader))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(row, (1, "f".into(), 1, 0));

    let capture = LogicalCapture {
        publication: "fraiseql".into(),
        slots: vec![logical::slot_name(&reader)],
    };
    logical::uninstall(&db.pool, &capture).await.unwrap();
    logical::uninstall(&db.pool, &capture).await.unwrap();
    let left: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_publication), \
                (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1)",
    )
    .bind(logical::slot_name(&reader))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, (0, 0));
    // Without its slot, a source says what to do.
    let err = LogicalSource::new(db.pool.clone(), &db.url, &schema(), options(&reader))
        .await
        .err()
        .expect("no slot, no source")
        .to_string();
    assert!(err.contains("fraiseql db install"), "{err}");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_arrive_in_commit_order_with_ids_from_the_wal() {
    let db = test_db().await;
    let reader = reader(&db, "crud");
    install(&db, &[&reader]).await;
    let recorder = Arc::new(Recorder::default());
    let running = Running::start(&db, options(&reader), engine(&recorder)).await;
    running
        .wait_until("the session", |o| o["role"] == "active")
        .await;
    assert_eq!(running.observers()["capture"], "logical");

    exec(
        &db,
        "INSERT INTO tb_order (id, status, total) VALUES (1, 'new', 1250.5)",
    )
    .await;
    exec(&db, "UPDATE tb_order SET status = 'shipped' WHERE id = 1").await;
    // An UPDATE that changes nothing is not delivered.
    exec(&db, "UPDATE tb_order SET status = status WHERE id = 1").await;
    exec(&db, "DELETE FROM tb_order WHERE id = 1").await;
    // Two rows of one transaction: one commit LSN, two positions.
    exec(
        &db,
        "INSERT INTO tb_order (id, total) VALUES (2, 2), (3, 3)",
    )
    .await;
    let mut events = recorder.wait_for(5).await;
    settle().await;
    assert_eq!(recorder.len(), 5);
    // Ordered per key, not across keys: in WAL order by id (commit LSN, then position).
    events.sort_by(|a, b| a.id.cmp(&b.id));

    let kinds: Vec<_> = events.iter().map(|e| e.event).collect();
    use EventKind::{Delete, Insert, Update};
    assert_eq!(kinds, [Insert, Update, Delete, Insert, Insert]);
    let row = json!({"id": 1, "status": "new", "total": 1250.5, "note": null});
    let shipped = json!({"id": 1, "status": "shipped", "total": 1250.5, "note": null});
    assert_eq!(
        (&events[0].new, &events[0].old),
        (&Some(row.clone()), &None)
    );
    assert_eq!(
        (&events[1].new, &events[1].old),
        (&Some(shipped.clone()), &Some(row))
    );
    assert_eq!((&events[2].new, &events[2].old), (&None, &Some(shipped)));
    for e in &events {
        assert_eq!((e.entity.as_str(), e.table.as_str()), ("Order", "tb_order"));
        chrono::DateTime::parse_from_rfc3339(&e.timestamp).unwrap();
    }
    let (lsn3, pos3) = events[3].id.split_once('-').unwrap();
    let (lsn4, pos4) = events[4].id.split_once('-').unwrap();
    assert_eq!(lsn3, lsn4, "{:?}", (&events[3].id, &events[4].id));
    assert_eq!((pos3, pos4), ("1", "2"));
    assert!(events[0].id < events[1].id && events[1].id < events[3].id);
    running
        .wait_until("the slot confirmed past every change", |o| {
            o["events_delivered"] == 5 && o["lag_bytes"].as_i64() < Some(1 << 20)
        })
        .await;
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_match_what_trigger_capture_writes() {
    let db = test_db().await;
    exec(
        &db,
        "CREATE TABLE tb_kinds (id int PRIMARY KEY, b bool, i2 int2, i8 int8, f4 float4, \
         f8 float8, n numeric, t text, j jsonb, js json, ts timestamp, tz timestamptz, d date, \
         u uuid, ai int[], at text[], nested int[][], by bytea, nan float8, nn numeric)",
    )
    .await;
    let kinds = Schema::new(vec![EntityDef {
        name: "Kinds".into(),
        table: "tb_kinds".into(),
        fields: vec![],
        kinds: Vec::new(),
    }])
    .unwrap();
    let reader = reader(&db, "kinds");
    let capture = LogicalCapture {
        publication: "fraiseql".into(),
        slots: vec![logical::slot_name(&reader)],
    };
    logical::install(&db.pool, &kinds, &capture).await.unwrap();
    let recorder = Arc::new(Recorder::default());
    let spec = ObserverSpec::new(
        ListenerConfig::new("kinds", CheckpointStrategy::AtLeastOnce),
        "Kinds",
        EventKind::Insert,
    )
    .action(recorder.clone() as Arc<dyn Action>);
    let engine = Arc::new(
        Engine::new(
            vec![spec],
            Arc::new(MemoryDlq::new(None)),
            &MemoryIdempotencyStores::default(),
            Arc::new(Metrics::new()),
        )
        .unwrap(),
    );
    let source = LogicalSource::new(db.pool.clone(), &db.url, &kinds, options(&reader))
        .await
        .unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(source.run(engine, rx));
    // The writer's own time zone differs from the walsender's UTC: the instants agree.
    exec(
        &db,
        "SET TIME ZONE 'UTC'; INSERT INTO tb_kinds VALUES (1, true, -2, 9007199254740993, 1.5, \
         -0.25, 12345678901234.5678, 'a \"quoted\" ünïcode\\n', '{\"k\": [1, null, {\"x\": \
         true}]}', '{\"raw\": 1}', '2024-05-01 12:00:00.123456', '2024-05-01 12:00:00+02', \
         '2024-05-01', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{1,NULL,3}', \
         '{\"a b\",\"c,d\",NULL}', '{{1,2},{3,4}}', '\\x00ff', 'NaN', 'NaN')",
    )
    .await;
    exec(&db, "INSERT INTO tb_kinds (id) VALUES (2)").await;
    let events = recorder.wait_for(2).await;
    let mut conn = db.pool.acquire().await.unwrap();
    conn.execute("SET TIME ZONE 'UTC'").await.unwrap();
    for (event, id) in events.iter().zip([1, 2]) {
        let expected: Value =
            sqlx::query_scalar("SELECT to_jsonb(k) FROM tb_kinds k WHERE id = $1")
                .bind(id)
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        assert_eq!(event.new.as_ref(), Some(&expected), "row {id}");
    }
    drop(conn);
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toasted_value_unchanged_by_an_update_arrives_in_new_and_old() {
    let db = test_db().await;
    let reader = reader(&db, "toast");
    install(&db, &[&reader]).await;
    let recorder = Arc::new(Recorder::default());
    let running = Running::start(&db, options(&reader), engine(&recorder)).await;
    // 100 kB that does not compress: stored out of line (TOAST).
    exec(
        &db,
        "INSERT INTO tb_order (id, total, note) SELECT 1, 1, string_agg(md5(g::text), '') \
         FROM generate_series(1, 3200) g",
    )
    .await;
    exec(&db, "UPDATE tb_order SET total = 2 WHERE id = 1").await;
    let events = recorder.wait_for(2).await;
    let update = &events[1];
    assert_eq!(update.event, EventKind::Update);
    let note = |row: &Option<Value>| row.as_ref().unwrap()["note"].as_str().unwrap().len();
    assert_eq!(note(&update.new), 102_400);
    assert_eq!(note(&update.old), 102_400);
    assert_eq!(update.new.as_ref().unwrap()["total"], 2);
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_elsewhere_delays_nothing() {
    let db = test_db().await;
    let other = test_db().await;
    let reader = reader(&db, "open");
    install(&db, &[&reader]).await;
    // Open, written-to transactions: one in another database of the server, one on this
    // database's own captured table, one that only took a transaction id.
    let mut elsewhere = PgConnection::connect(&other.url).await.unwrap();
    elsewhere
        .execute("BEGIN; INSERT INTO tb_order (total) VALUES (-1)")
        .await
        .unwrap();
    let mut here = PgConnection::connect(&db.url).await.unwrap();
    here.execute("BEGIN; INSERT INTO tb_order (total) VALUES (-2)")
        .await
        .unwrap();
    let mut idle = PgConnection::connect(&db.url).await.unwrap();
    idle.execute("BEGIN; SELECT txid_current()").await.unwrap();

    let recorder = Arc::new(Recorder::default());
    let running = Running::start(&db, options(&reader), engine(&recorder)).await;
    for total in 1..=3 {
        exec(
            &db,
            &format!("INSERT INTO tb_order (total) VALUES ({total})"),
        )
        .await;
    }
    // Delivered while the three transactions are still open.
    let events = recorder.wait_for(3).await;
    assert_eq!(totals(&events), [1, 2, 3]);
    // The open transaction on the captured table arrives when it commits, after the others.
    here.execute("COMMIT").await.unwrap();
    let events = recorder.wait_for(4).await;
    assert_eq!(totals(&events), [1, 2, 3, -2]);
    elsewhere.execute("ROLLBACK").await.unwrap();
    idle.execute("ROLLBACK").await.unwrap();
    running.stop().await;
    other.cleanup().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_resumes_after_the_confirmed_position() {
    let db = test_db().await;
    let reader = reader(&db, "resume");
    install(&db, &[&reader]).await;
    let first = Arc::new(Recorder::default());
    let running = Running::start(&db, options(&reader), engine(&first)).await;
    for total in 1..=10 {
        exec(
            &db,
            &format!("INSERT INTO tb_order (total) VALUES ({total})"),
        )
        .await;
    }
    let seen = first.wait_for(10).await;
    assert_eq!(totals(&seen), (1..=10).collect::<Vec<_>>(), "{seen:?}");
    running.stop().await;
    // Written while no engine runs.
    exec(
        &db,
        "INSERT INTO tb_order (total) SELECT g FROM generate_series(11, 20) g",
    )
    .await;
    let second = Arc::new(Recorder::default());
    let running = Running::start(&db, options(&reader), engine(&second)).await;
    let events = second.wait_for(10).await;
    settle().await;
    assert_eq!(
        totals(&second.events()),
        (11..=20).collect::<Vec<_>>(),
        "{events:?}"
    );
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_redelivers_what_was_not_confirmed_and_loses_nothing() {
    let db = test_db().await;
    let reader = reader(&db, "crash");
    install(&db, &[&reader]).await;
    let first = Arc::new(Recorder::default());
    let running = Running::start(&db, options(&reader), engine(&first)).await;
    exec(
        &db,
        "INSERT INTO tb_order (total) SELECT g FROM generate_series(1, 500) g",
    )
    .await;
    first.wait_for(100).await;
    running.crash().await;
    exec(
        &db,
        "INSERT INTO tb_order (total) SELECT g FROM generate_series(501, 600) g",
    )
    .await;
    let second = Arc::new(Recorder::default());
    let running = Running::start(&db, options(&reader), engine(&second)).await;
    let seen = wait_for_totals(&[&first, &second], 1..=600).await;
    assert_eq!(seen.len(), 600);
    // Redelivered ones carry the ids they had.
    let ids: HashSet<String> = first.events().into_iter().map(|e| e.id).collect();
    for e in second.events() {
        let total = e.new.as_ref().unwrap()["total"].as_i64().unwrap();
        if first.events().iter().any(|f| f.new == e.new) {
            assert!(
                ids.contains(&e.id),
                "total {total} came back with another id"
            );
        }
    }
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_reader_dies() {
    let db = test_db().await;
    let reader = reader(&db, "standby");
    install(&db, &[&reader]).await;
    let (a, b) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let active = Running::start(&db, options(&reader), engine(&a)).await;
    active.wait_until("active", |o| o["role"] == "active").await;
    let standby = Running::start(&db, options(&reader), engine(&b)).await;
    standby
        .wait_until("standing by", |o| o["role"] == "standby")
        .await;
    exec(
        &db,
        "INSERT INTO tb_order (total) SELECT g FROM generate_series(1, 50) g",
    )
    .await;
    a.wait_for(50).await;
    active.crash().await;
    exec(
        &db,
        "INSERT INTO tb_order (total) SELECT g FROM generate_series(51, 100) g",
    )
    .await;
    standby
        .wait_until("taken over", |o| o["role"] == "active")
        .await;
    let seen = wait_for_totals(&[&a, &b], 1..=100).await;
    assert_eq!(seen.len(), 100);
    standby.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_loses_nothing() {
    let server = services::start_logical_postgres();
    let db = test_db_on(&server.url).await;
    let reader = reader(&db, "pgrestart");
    install(&db, &[&reader]).await;
    let recorder = Arc::new(Recorder::default());
    let running = Running::start(&db, options(&reader), engine(&recorder)).await;
    exec(
        &db,
        "INSERT INTO tb_order (total) SELECT g FROM generate_series(1, 200) g",
    )
    .await;
    recorder.wait_for(200).await;
    let url = db.url.clone();
    tokio::task::spawn_blocking(move || server_restart(server))
        .await
        .unwrap();
    // The pool reconnects by itself; write through a fresh connection.
    let mut conn = PgConnection::connect(&url).await.unwrap();
    conn.execute("INSERT INTO tb_order (total) SELECT g FROM generate_series(201, 300) g")
        .await
        .unwrap();
    running
        .wait_until("streaming again", |o| {
            o["role"] == "active" && o["connected"] == true
        })
        .await;
    let seen = wait_for_totals(&[&recorder], 1..=300).await;
    assert_eq!(seen.len(), 300);
    running.stop().await;
    db.cleanup().await;
}

fn server_restart(server: services::PgServer) {
    server.restart();
    // Kept running until the test binary exits (its watchdog stops it then).
    std::mem::forget(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_wal_is_shown_and_past_the_limit_turns_health_red() {
    let db = test_db().await;
    let reader = reader(&db, "retained");
    install(&db, &[&reader]).await;
    let recorder = Arc::new(Recorder::default());
    let mut tight = options(&reader);
    tight.max_retained_wal = 1;
    let running = Running::start(&db, tight, engine(&recorder)).await;
    exec(
        &db,
        "INSERT INTO tb_order (total) SELECT g FROM generate_series(1, 100) g",
    )
    .await;
    recorder.wait_for(100).await;
    running
        .wait_until("the slot's WAL read", |o| {
            o["retained_wal_bytes"].as_i64() > Some(1)
        })
        .await;
    running
        .wait_until("stalled", |o| o["stalled"] == true)
        .await;
    assert!(!running.health.healthy());
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_of_another_database_is_refused_with_a_clear_error() {
    let db = test_db().await;
    let other = test_db().await;
    let reader = reader(&db, "shared");
    install(&db, &[&reader]).await;
    let err = logical::install(
        &other.pool,
        &schema(),
        &LogicalCapture {
            publication: "fraiseql".into(),
            slots: vec![logical::slot_name(&reader)],
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&format!("belongs to database `{}`", db.name)),
        "{err}"
    );
    assert!(err.contains("listener_id"), "{err}");
    other.cleanup().await;
    db.cleanup().await;
}

fn logical_guard(db: &TestDb) -> fraiseql_observers::capture::guard::Guard {
    use fraiseql_observers::capture::guard::{Capture, Guard};
    Guard::new(
        db.pool.clone(),
        &schema(),
        Capture::Logical {
            publication: "fraiseql".into(),
        },
        true,
        Duration::from_millis(100),
    )
    .unwrap()
}

const RECREATE: &str = "DROP TABLE tb_order; CREATE TABLE tb_order (id serial PRIMARY KEY, \
     status text NOT NULL DEFAULT 'new', total numeric NOT NULL DEFAULT 0, note text)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_dropped_and_created_again_while_running_is_captured_from_its_first_row() {
    let db = test_db().await;
    let reader = reader(&db, "recreate");
    install(&db, &[&reader]).await;
    let recorder = Arc::new(Recorder::default());
    let running = Running::start(&db, options(&reader), engine(&recorder)).await;
    exec(&db, "INSERT INTO tb_order (total) VALUES (1)").await;
    recorder.wait_for(1).await;
    // The event trigger adds the new table to the publication in the creating transaction.
    exec(
        &db,
        &format!("BEGIN; {RECREATE}; INSERT INTO tb_order (total) VALUES (2); COMMIT"),
    )
    .await;
    exec(&db, "UPDATE tb_order SET total = 3").await;
    let events = recorder.wait_for(3).await;
    assert_eq!(totals(&events), [1, 2, 3]);
    assert_eq!(
        events[2].old.as_ref().unwrap()["total"],
        2,
        "REPLICA IDENTITY FULL again"
    );
    let mut guard = logical_guard(&db);
    guard.check().await.unwrap();
    assert_eq!(guard.health().gaps(), json!([]));
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_taken_out_of_the_publication_is_put_back_and_the_gap_reported() {
    let db = test_db().await;
    let reader = reader(&db, "unpublished");
    install(&db, &[&reader]).await;
    let recorder = Arc::new(Recorder::default());
    let running = Running::start(&db, options(&reader), engine(&recorder)).await;
    let mut guard = logical_guard(&db);
    guard.check().await.unwrap();
    exec(&db, "ALTER PUBLICATION fraiseql DROP TABLE tb_order").await;
    exec(&db, "INSERT INTO tb_order (total) VALUES (1)").await;
    guard.check().await.unwrap();
    let [gap] = guard
        .health()
        .gaps()
        .as_array()
        .unwrap()
        .clone()
        .try_into()
        .unwrap();
    assert!(
        gap["reason"]
            .as_str()
            .unwrap()
            .contains("not in the publication"),
        "{gap}"
    );
    assert!(gap["repaired_at"].is_string(), "{gap}");
    exec(&db, "INSERT INTO tb_order (total) VALUES (2)").await;
    let events = recorder.wait_for(1).await;
    settle().await;
    assert_eq!(totals(&recorder.events()), [2], "{events:?}");
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_feeds_existing_rows_in_key_order_once_across_a_kill_and_never_stale() {
    use fraiseql_observers::capture::backfill::{self, BackfillOptions};
    use fraiseql_observers::capture::logical::Mode;
    let db = test_db().await;
    exec(
        &db,
        "INSERT INTO tb_order (id, total) SELECT g, g FROM generate_series(1, 250) g",
    )
    .await;
    let reader = reader(&db, "backfill");
    install(&db, &[&reader]).await;
    let recorder = Arc::new(Recorder::default());
    let running = Running::start(&db, options(&reader), engine(&recorder)).await;
    let entity = schema().entities()[0].clone();
    let options = BackfillOptions {
        chunk: 100,
        ..BackfillOptions::default()
    };
    // Killed after its first chunk committed.
    let (pool, e, o) = (db.pool.clone(), entity.clone(), options.clone());
    let killed = tokio::spawn(async move {
        backfill::run(&pool, Mode::Logical, &e, &o, "unused", |p| {
            assert!(p.sent < 200, "killed after the first chunk");
            if p.sent == 100 {
                panic!("killed");
            }
        })
        .await
    })
    .await;
    assert!(killed.is_err(), "the first run dies");
    recorder.wait_for(100).await;
    // A live UPDATE of row 150, not yet committed: the next chunk waits for it and sends
    // the row as it is after it.
    let mut live = PgConnection::connect(&db.url).await.unwrap();
    live.execute("BEGIN; UPDATE tb_order SET status = 'live' WHERE id = 150")
        .await
        .unwrap();
    let (pool, e, o) = (db.pool.clone(), entity.clone(), options.clone());
    let resumed =
        tokio::spawn(
            async move { backfill::run(&pool, Mode::Logical, &e, &o, "unused", |_| {}).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    live.execute("COMMIT").await.unwrap();
    let done = resumed.await.unwrap().unwrap();
    assert_eq!(
        (done.sent, done.total, done.resumed_at, done.done),
        (250, 250, 100, true)
    );
    let events = recorder.wait_for(251).await;
    settle().await;
    let backfilled: Vec<&Event> = events.iter().filter(|e| e.backfill.is_some()).collect();
    let ids: Vec<i64> = backfilled
        .iter()
        .map(|e| e.new.as_ref().unwrap()["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        ids,
        (1..=250).collect::<Vec<_>>(),
        "each row once, in key order"
    );
    assert_eq!(backfilled[0].event, EventKind::Insert);
    assert_eq!(backfilled[0].backfill.as_ref().unwrap().id, done.id);
    let row_150: Vec<&Event> = events
        .iter()
        .filter(|e| e.new.as_ref().unwrap()["id"] == 150)
        .collect();
    assert_eq!(row_150.len(), 2);
    assert_eq!(row_150[0].event, EventKind::Update, "the live change first");
    assert_eq!(
        row_150[1].new.as_ref().unwrap()["status"],
        "live",
        "never stale"
    );
    // Run again: it finished, nothing more is sent.
    let again = backfill::run(&db.pool, Mode::Logical, &entity, &options, "unused", |_| {})
        .await
        .unwrap();
    assert!(again.done && again.sent == 250);
    settle().await;
    assert_eq!(recorder.len(), 251);
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_from_trigger_to_logical_capture_loses_and_repeats_nothing() {
    use fraiseql_observers::config::Capture;
    use fraiseql_observers::runtime::{self, Instruments, StartOptions};
    use fraiseql_observers::{Config, PostgresOptions, PostgresSource};
    let db = test_db().await;
    let listener = reader(&db, "switch");
    // Trigger capture first: 10 changes delivered, 10 more captured while it is down.
    fraiseql_observers::capture::install(&db.pool, &schema(), "fraiseql_changes")
        .await
        .unwrap();
    let before = Arc::new(Recorder::default());
    let source = PostgresSource::new(
        db.pool.clone(),
        PostgresOptions {
            listener_id: listener.clone(),
            ..PostgresOptions::default()
        },
    )
    .await
    .unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(source.run(engine(&before), rx));
    exec(
        &db,
        "INSERT INTO tb_order (total) SELECT g FROM generate_series(1, 10) g",
    )
    .await;
    before.wait_for(10).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    exec(
        &db,
        "INSERT INTO tb_order (total) SELECT g FROM generate_series(11, 20) g",
    )
    .await;

    // Then the engine starts with logical capture.
    let mut config = Config::default();
    config.database.url = Some(db.url.clone());
    config.observers.postgres.capture = Capture::Logical;
    config.observers.postgres.listener_id = listener.clone();
    let after = Arc::new(Recorder::default());
    let specs = EventKind::ALL
        .iter()
        .map(|&kind| {
            ObserverSpec::new(
                ListenerConfig::new(
                    format!("record_{}", kind.as_lower()),
                    CheckpointStrategy::AtLeastOnce,
                ),
                "Order",
                kind,
            )
            .action(after.clone() as Arc<dyn Action>)
        })
        .collect();
    let running = runtime::start(
        &config,
        &schema(),
        specs,
        &Instruments::for_config(&config),
        &StartOptions::default(),
    )
    .await
    .unwrap();
    after.wait_for(10).await;
    exec(
        &db,
        "INSERT INTO tb_order (total) SELECT g FROM generate_series(21, 30) g",
    )
    .await;
    after.wait_for(20).await;
    settle().await;
    assert_eq!(
        totals(&after.events()),
        (11..=30).collect::<Vec<_>>(),
        "the change log's rows first, then the WAL's, each once"
    );
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'tb_order'::regclass AND NOT tgisinternal",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(triggers, 0, "writers no longer pay for triggers");
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_kills_the_engine_every_time_is_dead_lettered_not_run_for_ever() {
    use fraiseql_observers::DeadLetterQueue as _;
    let db = test_db().await;
    let reader = reader(&db, "poison");
    install(&db, &[&reader]).await;
    // One transaction: confirmed only at its end, so each run streams it from its start.
    exec(
        &db,
        "INSERT INTO tb_order (total) SELECT g FROM generate_series(1, 40) g",
    )
    .await;
    let poison = Arc::new(poison::Poison::default());
    let dlq = Arc::new(MemoryDlq::new(None));
    for run in 1..=3 {
        let running = Running::start(&db, options(&reader), poison::engine(&poison, &dlq)).await;
        poison
            .wait_until(&format!("run {run} of the poison row"), |p| p.runs() == run)
            .await;
        running.crash().await;
    }
    assert_eq!(dlq.len().await.unwrap(), 0);
    let running = Running::start(&db, options(&reader), poison::engine(&poison, &dlq)).await;
    let others: Vec<i64> = (1..=40).filter(|t| *t != poison::POISON_TOTAL).collect();
    poison
        .wait_until("the other rows", |p| p.others_seen() == others)
        .await;
    poison::wait_for_a_dead_letter(&dlq).await;
    settle().await;
    assert_eq!(poison.runs(), 3, "never run a fourth time");
    let entries = dlq.list(10).await.unwrap();
    assert_eq!(entries.len(), 1, "only the poison row: {entries:?}");
    assert_eq!(entries[0].error, poison::DEAD_LETTER_REASON);
    running.stop().await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM fraiseql_deliveries")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "a clean stop leaves nothing suspect");
    db.cleanup().await;
}
