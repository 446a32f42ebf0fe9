//! The PostgreSQL transport, capture SQL and idempotency store against a real PostgreSQL
//! (`FRAISEQL_TEST_DATABASE_URL`, else `postgres://postgres@127.0.0.1:5432/postgres`). Each
//! test creates its own database and drops it at the end.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fraiseql_observers::checkpoint::{is_duplicate, record_idempotency_key};
use fraiseql_observers::engine::Engine;
use fraiseql_observers::status::HealthSource;
use fraiseql_observers::DeadLetterQueue as _;
use fraiseql_observers::{
    capture, Action, ActionError, CheckpointStrategy, ClaimStamp, EntityDef, Event, EventKind,
    IdempotencyStore, IdempotencyStores, ListenerConfig, MemoryDlq, MemoryIdempotencyStores,
    Metrics, ObserverSpec, PgIdempotencyStore, PgIdempotencyStores, PostgresOptions,
    PostgresSource, Schema,
};
use serde_json::json;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::{Connection, Executor, PgConnection};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(60);
const CHANNEL: &str = "fraiseql_test_changes";

mod pg;
mod poison;
mod services;

use pg::TestDb;

/// A database of its own with a `tb_order` table.
async fn test_db() -> TestDb {
    let db = TestDb::create("fraiseql_rs", 8).await;
    db.pool
        .execute(
            "CREATE TABLE tb_order (id serial PRIMARY KEY, status text NOT NULL DEFAULT 'new', \
             total numeric NOT NULL DEFAULT 0, note text)",
        )
        .await
        .unwrap();
    db
}

/// Change capture on `tb_order`, notifying `CHANNEL`.
async fn install(db: &TestDb) {
    capture::install(&db.pool, &schema(), CHANNEL)
        .await
        .unwrap();
}

fn schema() -> Schema {
    Schema::new(vec![EntityDef {
        name: "Order".into(),
        table: "tb_order".into(),
        fields: vec!["id".into(), "status".into(), "total".into(), "note".into()],
        kinds: Vec::new(),
    }])
    .unwrap()
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

    /// Waits until at least `n` events arrived; returns them sorted by change-log id.
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
        by_id(self.events())
    }
}

fn by_id(mut events: Vec<Event>) -> Vec<Event> {
    events.sort_by_key(|e| e.id.parse::<i64>().unwrap());
    events
}

/// One observer per event kind on `Order`, all feeding `recorder`.
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

fn options(listener_id: &str) -> PostgresOptions {
    PostgresOptions {
        listener_id: listener_id.into(),
        notify_channel: CHANNEL.into(),
        batch_size: 100,
        poll_interval: Duration::from_millis(200),
        listen: true,
        max_concurrency: 8,
        stall_after: Duration::from_secs(2),
        ..PostgresOptions::default()
    }
}

struct Running {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<fraiseql_observers::Result<()>>,
    health: Arc<dyn HealthSource>,
}

impl Running {
    async fn start(url: &str, listener_id: &str, engine: Arc<Engine>) -> Running {
        let source = PostgresSource::connect(url, options(listener_id))
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

    fn role(&self) -> String {
        self.health.observers()["role"].as_str().unwrap().to_owned()
    }

    async fn wait_until(&self, what: &str, check: impl Fn(&dyn HealthSource) -> bool) {
        tokio::time::timeout(WAIT, async {
            while !check(self.health.as_ref()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}: {}", self.health.observers()));
    }

    async fn stop(self) {
        self.shutdown.send(true).unwrap();
        self.task.await.unwrap().unwrap();
    }

    /// Gone without a word, as a killed process: its connections drop.
    async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Several poll intervals: long enough for a wrongly delivered event to show up.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1000)).await;
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_is_idempotent_and_notifies_once_per_transaction() {
    let db = test_db().await;
    install(&db).await;
    install(&db).await;
    // Two installers at once serialise on the advisory lock.
    let entities = schema();
    let (a, b) = tokio::join!(
        capture::install(&db.pool, &entities, CHANNEL),
        capture::install(&db.pool, &entities, CHANNEL)
    );
    a.unwrap();
    b.unwrap();
    let triggers = count(
        &db.pool,
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'tb_order'::regclass AND NOT tgisinternal",
    )
    .await;
    assert_eq!(triggers, 3, "UPDATE (row), INSERT and DELETE (statement)");

    let mut listener = PgListener::connect(&db.url).await.unwrap();
    listener.listen(CHANNEL).await.unwrap();
    // One transaction of 10 rows, then one of 1 row: exactly one notification each.
    db.pool
        .execute("INSERT INTO tb_order (total) SELECT g FROM generate_series(1, 10) g")
        .await
        .unwrap();
    db.pool
        .execute("INSERT INTO tb_order (total) VALUES (11)")
        .await
        .unwrap();
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM fraiseql_change_log").await,
        11
    );
    let first = listener.recv().await.unwrap();
    let second = listener.recv().await.unwrap();
    assert_eq!(first.channel(), CHANNEL);
    assert_eq!(first.payload(), "10", "the statement's last change-log id");
    assert_eq!(second.payload(), "11");

    capture::uninstall(&db.pool, &schema()).await.unwrap();
    capture::uninstall(&db.pool, &schema()).await.unwrap();
    db.pool
        .execute("INSERT INTO tb_order (total) VALUES (12)")
        .await
        .unwrap();
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM fraiseql_change_log").await,
        11
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM pg_proc WHERE proname = 'fraiseql_capture'"
        )
        .await,
        0
    );
    drop(listener);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_missing_names_are_rejected() {
    let db = test_db().await;
    let hostile = Schema::new(vec![EntityDef {
        name: "Order".into(),
        table: "tb_order; DROP TABLE tb_order".into(),
        fields: vec![],
        kinds: Vec::new(),
    }])
    .unwrap();
    let err = capture::install(&db.pool, &hostile, CHANNEL)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected a SQL identifier"), "{err}");
    let err = capture::install(&db.pool, &schema(), "chan'; --")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("notify channel"), "{err}");
    for bad in ["keys; DROP TABLE tb_order", "a\"b", "1keys", "a.b.c", ""] {
        assert!(
            PgIdempotencyStore::new(db.pool.clone(), bad).await.is_err(),
            "{bad:?} accepted"
        );
    }
    // Nothing was created or dropped.
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        )
        .await,
        1
    );
    // A source refuses to start before the install, and says what to do.
    let err = PostgresSource::connect(&db.url, options("x"))
        .await
        .err()
        .expect("connect must fail without the change log")
        .to_string();
    assert!(err.contains("fraiseql db install"), "{err}");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_updates_and_deletes_reach_observers() {
    let db = test_db().await;
    install(&db).await;
    let recorder = Arc::new(Recorder::default());
    let running = Running::start(&db.url, "crud", engine(&recorder)).await;
    running
        .wait_until("the LISTEN connection", |h| h.healthy())
        .await;
    assert_eq!(running.health.observers()["transport"], "postgres");
    assert_eq!(
        running.health.databases().unwrap(),
        json!({"primary": {"status": "ok"}})
    );

    db.pool
        .execute("INSERT INTO tb_order (id, status, total) VALUES (1, 'new', 1250.5)")
        .await
        .unwrap();
    db.pool
        .execute("UPDATE tb_order SET status = 'shipped' WHERE id = 1")
        .await
        .unwrap();
    // An UPDATE that changes nothing is not captured.
    db.pool
        .execute("UPDATE tb_order SET status = status WHERE id = 1")
        .await
        .unwrap();
    db.pool
        .execute("DELETE FROM tb_order WHERE id = 1")
        .await
        .unwrap();
    let events = recorder.wait_for(3).await;
    settle().await;
    assert_eq!(recorder.len(), 3);

    let kinds: Vec<_> = events.iter().map(|e| e.event).collect();
    assert_eq!(
        kinds,
        [EventKind::Insert, EventKind::Update, EventKind::Delete]
    );
    for e in &events {
        assert_eq!(e.entity, "Order");
        assert_eq!(e.table, "tb_order");
        e.id.parse::<i64>().unwrap();
        chrono::DateTime::parse_from_rfc3339(&e.timestamp).unwrap();
    }
    let row = json!({"id": 1, "status": "new", "total": 1250.5, "note": null});
    let shipped = json!({"id": 1, "status": "shipped", "total": 1250.5, "note": null});
    assert_eq!(events[0].new, Some(row.clone()));
    assert_eq!(events[0].old, None);
    assert_eq!(events[1].new, Some(shipped.clone()));
    assert_eq!(events[1].old, Some(row));
    assert_eq!(events[2].new, None);
    assert_eq!(events[2].old, Some(shipped));

    running.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_rows_written_before_start_are_all_processed() {
    let db = test_db().await;
    install(&db).await;
    db.pool
        .execute("INSERT INTO tb_order (total) SELECT g FROM generate_series(1, 600) g")
        .await
        .unwrap();
    for i in 0..4 {
        db.pool
            .execute(
                format!(
                    "INSERT INTO tb_order (total) SELECT g FROM generate_series({}, {}) g",
                    601 + i * 100,
                    700 + i * 100
                )
                .as_str(),
            )
            .await
            .unwrap();
    }
    let recorder = Arc::new(Recorder::default());
    let running = Running::start(&db.url, "backlog", engine(&recorder)).await;
    let events = recorder.wait_for(1000).await;
    settle().await;
    assert_eq!(recorder.len(), 1000);
    let totals: HashSet<i64> = events
        .iter()
        .map(|e| e.new.as_ref().unwrap()["total"].as_i64().unwrap())
        .collect();
    assert_eq!(totals, (1..=1000).collect());
    running
        .wait_until("lag 0", |h| h.observers()["lag_rows"] == 0)
        .await;
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_delivers_what_came_after_and_nothing_acknowledged() {
    let db = test_db().await;
    install(&db).await;
    let first = Arc::new(Recorder::default());
    let running = Running::start(&db.url, "restart", engine(&first)).await;
    for i in 0..10 {
        db.pool
            .execute(format!("INSERT INTO tb_order (total) VALUES ({i})").as_str())
            .await
            .unwrap();
    }
    first.wait_for(10).await;
    running.stop().await;

    // Written while no source runs.
    db.pool
        .execute("INSERT INTO tb_order (total) SELECT g FROM generate_series(100, 104) g")
        .await
        .unwrap();
    let second = Arc::new(Recorder::default());
    let running = Running::start(&db.url, "restart", engine(&second)).await;
    let events = second.wait_for(5).await;
    settle().await;
    assert_eq!(second.len(), 5, "acknowledged events were redelivered");
    let totals: Vec<i64> = events
        .iter()
        .map(|e| e.new.as_ref().unwrap()["total"].as_i64().unwrap())
        .collect();
    assert_eq!(totals, [100, 101, 102, 103, 104]);
    assert_eq!(first.len(), 10);
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_commits_late_is_not_skipped() {
    let db = test_db().await;
    install(&db).await;
    let recorder = Arc::new(Recorder::default());
    let running = Running::start(&db.url, "late", engine(&recorder)).await;
    running.wait_until("healthy", |h| h.healthy()).await;
    let mut a = PgConnection::connect(&db.url).await.unwrap();
    let mut b = PgConnection::connect(&db.url).await.unwrap();

    // 1. A begins and inserts first (lower id), B inserts and commits, then A commits.
    a.execute("BEGIN").await.unwrap();
    a.execute("INSERT INTO tb_order (note) VALUES ('a1')")
        .await
        .unwrap();
    b.execute("INSERT INTO tb_order (note) VALUES ('b1')")
        .await
        .unwrap();
    settle().await;
    assert_eq!(recorder.len(), 0, "B must wait while the older A is open");
    a.execute("COMMIT").await.unwrap();
    let events = recorder.wait_for(2).await;
    let notes: Vec<_> = events
        .iter()
        .map(|e| e.new.as_ref().unwrap()["note"].clone())
        .collect();
    assert_eq!(notes, [json!("a1"), json!("b1")]);

    // 2. A takes its transaction id first but writes its row only after B has committed:
    //    A's row comes after B's in id order but before it in txid order.
    a.execute("BEGIN").await.unwrap();
    a.execute("SELECT pg_current_xact_id()").await.unwrap();
    b.execute("INSERT INTO tb_order (note) VALUES ('b2')")
        .await
        .unwrap();
    settle().await;
    assert_eq!(recorder.len(), 2, "B must wait while the older A is open");
    a.execute("INSERT INTO tb_order (note) VALUES ('a2')")
        .await
        .unwrap();
    a.execute("COMMIT").await.unwrap();
    recorder.wait_for(4).await;
    settle().await;
    let notes: HashSet<String> = recorder
        .events()
        .iter()
        .map(|e| e.new.as_ref().unwrap()["note"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(recorder.len(), 4);
    assert_eq!(
        notes,
        ["a1", "b1", "a2", "b2"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_kb_row_is_delivered_whole() {
    let db = test_db().await;
    install(&db).await;
    let recorder = Arc::new(Recorder::default());
    let running = Running::start(&db.url, "large", engine(&recorder)).await;
    let note = "x".repeat(100 * 1024);
    sqlx::query("INSERT INTO tb_order (note) VALUES ($1)")
        .bind(&note)
        .execute(&db.pool)
        .await
        .unwrap();
    let events = recorder.wait_for(1).await;
    assert_eq!(events[0].new.as_ref().unwrap()["note"], json!(note));
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_change_log_row_is_skipped_and_counted() {
    let db = test_db().await;
    install(&db).await;
    db.pool
        .execute(
            "INSERT INTO fraiseql_change_log (entity, event, table_name, new) \
             VALUES ('Order', 'TRUNCATE', 'tb_order', '{}'), ('Ghost', 'INSERT', 'tb_ghost', '{}')",
        )
        .await
        .unwrap();
    db.pool
        .execute("INSERT INTO tb_order (note) VALUES ('after')")
        .await
        .unwrap();
    let recorder = Arc::new(Recorder::default());
    let running = Running::start(&db.url, "bad", engine(&recorder)).await;
    let events = recorder.wait_for(1).await;
    assert_eq!(events[0].new.as_ref().unwrap()["note"], "after");
    running
        .wait_until("the bad row counted", |h| {
            h.observers()["skipped_rows"] == 1
        })
        .await;
    running.stop().await;
    db.cleanup().await;
}

/// Transaction ids are ordered as numbers: with one row per batch, txid 9 comes before txid
/// 10 (ordered as text, '10' < '9', and the cursor would jump past txid 9's change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_read_in_numeric_transaction_order() {
    let db = test_db().await;
    install(&db).await;
    db.pool
        .execute(
            "INSERT INTO fraiseql_change_log (txid, entity, event, table_name, new) VALUES \
             ('10', 'Order', 'INSERT', 'tb_order', '{\"id\": 10}'), \
             ('9', 'Order', 'INSERT', 'tb_order', '{\"id\": 9}')",
        )
        .await
        .unwrap();
    let recorder = Arc::new(Recorder::default());
    let source = PostgresSource::connect(
        &db.url,
        PostgresOptions {
            batch_size: 1,
            ..options("numeric")
        },
    )
    .await
    .unwrap();
    let (shutdown, rx) = watch::channel(false);
    let task = tokio::spawn(source.run(engine(&recorder), rx));
    recorder.wait_for(2).await;
    let order: Vec<_> = recorder
        .events()
        .iter()
        .map(|e| e.new.as_ref().unwrap()["id"].clone())
        .collect();
    assert_eq!(order, [json!(9), json!(10)]);
    shutdown.send(true).unwrap();
    task.await.unwrap().unwrap();
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sources_on_one_listener_id_process_each_change_once() {
    let db = test_db().await;
    install(&db).await;
    let (r1, r2) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let s1 = Running::start(&db.url, "shared", engine(&r1)).await;
    let s2 = Running::start(&db.url, "shared", engine(&r2)).await;
    for i in 0..20 {
        db.pool
            .execute(
                format!(
                    "INSERT INTO tb_order (total) SELECT g FROM generate_series({}, {}) g",
                    i * 10,
                    i * 10 + 9
                )
                .as_str(),
            )
            .await
            .unwrap();
    }
    let total = || r1.len() + r2.len();
    tokio::time::timeout(WAIT, async {
        while total() < 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("all 200 changes processed");
    settle().await;
    let ids: HashSet<String> = r1
        .events()
        .into_iter()
        .chain(r2.events())
        .map(|e| e.id)
        .collect();
    assert_eq!(total(), 200);
    assert_eq!(ids.len(), 200);
    let mut roles = [s1.role(), s2.role()];
    roles.sort();
    assert_eq!(roles, ["active", "standby"]);

    // The active one leaves: the standby takes over from the stored cursor.
    let (active, standby, standby_recorder) = if s1.role() == "active" {
        (s1, s2, &r2)
    } else {
        (s2, s1, &r1)
    };
    active.stop().await;
    let before = standby_recorder.len();
    db.pool
        .execute("INSERT INTO tb_order (total) SELECT g FROM generate_series(1000, 1009) g")
        .await
        .unwrap();
    standby_recorder.wait_for(before + 10).await;
    settle().await;
    assert_eq!(total(), 210);
    assert_eq!(standby.role(), "active");
    standby.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_store_records_each_key_once() {
    let db = test_db().await;
    let store = PgIdempotencyStore::new(db.pool.clone(), "billing_observer_keys")
        .await
        .unwrap();
    // Creating it again finds the table.
    PgIdempotencyStore::new(db.pool.clone(), "billing_observer_keys")
        .await
        .unwrap();
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text, is_nullable::text FROM information_schema.columns \
         WHERE table_name = 'billing_observer_keys' ORDER BY ordinal_position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let columns: Vec<(&str, &str, &str)> = columns
        .iter()
        .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
        .collect();
    assert_eq!(
        columns,
        [
            ("listener_id", "text", "NO"),
            ("event_key", "text", "NO"),
            ("processed_at", "timestamp with time zone", "NO"),
        ]
    );

    assert!(!is_duplicate(&store, "billing", "evt-1").await.unwrap());
    assert!(record_idempotency_key(&store, "billing", "evt-1")
        .await
        .unwrap());
    assert!(!record_idempotency_key(&store, "billing", "evt-1")
        .await
        .unwrap());
    assert!(is_duplicate(&store, "billing", "evt-1").await.unwrap());
    assert!(record_idempotency_key(&store, "shipping", "evt-1")
        .await
        .unwrap());
    store.forget("billing", "evt-1").await.unwrap();
    assert!(!is_duplicate(&store, "billing", "evt-1").await.unwrap());

    // A claim tried again after its answer was lost finds its own key; another claim does not.
    let (mine, other) = (ClaimStamp::new(), ClaimStamp(1));
    assert!(store.claim("billing", "evt-2", mine).await.unwrap());
    assert!(store.claim("billing", "evt-2", mine).await.unwrap());
    assert!(!store.claim("billing", "evt-2", other).await.unwrap());
    assert!(!record_idempotency_key(&store, "billing", "evt-2")
        .await
        .unwrap());

    // Two tasks racing on each key: exactly one wins.
    let store = Arc::new(store);
    for i in 0..50 {
        let key = format!("race-{i}");
        let (a, b) = tokio::join!(
            tokio::spawn({
                let (store, key) = (store.clone(), key.clone());
                async move { store.record_idempotency_key("billing", &key).await }
            }),
            tokio::spawn({
                let (store, key) = (store.clone(), key.clone());
                async move { store.record_idempotency_key("billing", &key).await }
            })
        );
        let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
        assert!(a ^ b, "key {key}: {a} {b}");
    }
    drop(store);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effectively_once_holds_across_engines_sharing_the_table() {
    let db = test_db().await;
    let stores = PgIdempotencyStores::new(db.pool.clone());
    stores.prepare(["charge_keys"]).await.unwrap();
    let recorder = Arc::new(Recorder::default());
    let build = |stores: &dyn IdempotencyStores| {
        Engine::new(
            vec![ObserverSpec::new(
                ListenerConfig::new(
                    "charge_customer",
                    CheckpointStrategy::EffectivelyOnce {
                        idempotency_table: "charge_keys".into(),
                    },
                ),
                "Order",
                EventKind::Insert,
            )
            .action(recorder.clone() as Arc<dyn Action>)],
            Arc::new(MemoryDlq::new(None)),
            stores,
            Arc::new(Metrics::new()),
        )
        .unwrap()
    };
    let e1 = build(&stores);
    // A second instance, with stores of its own, created lazily on first use.
    let e2 = build(&PgIdempotencyStores::new(db.pool.clone()));
    let event = Event {
        id: "42".into(),
        ..Event::new(
            "Order",
            EventKind::Insert,
            "tb_order",
            Some(json!({"id": 1})),
            None,
        )
    };
    let (r1, r2) = tokio::join!(e1.process(&event), e2.process(&event));
    assert_eq!(r1.duplicates + r2.duplicates, 1);
    assert_eq!(recorder.len(), 1);
    let store = stores.store_for("charge_keys");
    assert!(is_duplicate(store.as_ref(), "charge_customer", "42")
        .await
        .unwrap());
    // A hostile table name gives a store that fails (the engine dead-letters), never SQL.
    let bad: Arc<dyn IdempotencyStore> = stores.store_for("x; DROP TABLE charge_keys");
    assert!(bad.record_idempotency_key("l", "k").await.is_err());
    db.cleanup().await;
}

/// Counts the claims that reach the PostgreSQL store it wraps.
struct CountingStore {
    inner: PgIdempotencyStore,
    claims: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl IdempotencyStore for CountingStore {
    async fn is_duplicate(&self, l: &str, k: &str) -> fraiseql_observers::Result<bool> {
        self.inner.is_duplicate(l, k).await
    }
    async fn record_idempotency_key(&self, l: &str, k: &str) -> fraiseql_observers::Result<bool> {
        self.inner.record_idempotency_key(l, k).await
    }
    async fn forget(&self, l: &str, k: &str) -> fraiseql_observers::Result<()> {
        self.inner.forget(l, k).await
    }
    async fn claim(&self, l: &str, k: &str, stamp: ClaimStamp) -> fraiseql_observers::Result<bool> {
        self.claims
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.claim(l, k, stamp).await
    }
}

struct OneStore(Arc<CountingStore>);

impl IdempotencyStores for OneStore {
    fn store_for(&self, _: &str) -> Arc<dyn IdempotencyStore> {
        self.0.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_store_cannot_hold_is_dead_lettered_at_once_not_retried() {
    use fraiseql_observers::error::CheckpointErrorKind;
    let db = test_db().await;
    let store = PgIdempotencyStore::new(db.pool.clone(), "nul_keys")
        .await
        .unwrap();
    // PostgreSQL text cannot hold a NUL: a data exception (SQLSTATE 22021), the same on
    // every attempt.
    match store.claim("billing", "evt\0nul", ClaimStamp::new()).await {
        Err(fraiseql_observers::Error::Checkpoint(e)) => {
            assert_eq!(e.kind(), CheckpointErrorKind::Rejected, "{e}");
            assert!(e.message().contains("nul_keys"), "{e}");
        }
        other => panic!("expected a rejected key, got {other:?}"),
    }
    assert!(store
        .claim("billing", "evt-1", ClaimStamp::new())
        .await
        .unwrap());

    let counting = Arc::new(CountingStore {
        inner: store,
        claims: Default::default(),
    });
    let recorder = Arc::new(Recorder::default());
    let dlq = Arc::new(MemoryDlq::new(None));
    let retry = fraiseql_observers::RetryPolicy {
        max_attempts: 5,
        ..Default::default()
    };
    let engine = Engine::new(
        vec![ObserverSpec::new(
            ListenerConfig::new(
                "charge_customer",
                CheckpointStrategy::EffectivelyOnce {
                    idempotency_table: "nul_keys".into(),
                },
            ),
            "Order",
            EventKind::Insert,
        )
        .retry(retry)
        .action(recorder.clone() as Arc<dyn Action>)],
        dlq.clone(),
        &OneStore(counting.clone()),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let event = |id: &str| Event {
        id: id.into(),
        ..Event::new(
            "Order",
            EventKind::Insert,
            "tb_order",
            Some(json!({"id": 1})),
            None,
        )
    };
    let report = engine.process(&event("evt\0nul")).await;
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(recorder.len(), 0, "never run unguarded");
    assert_eq!(counting.claims.load(std::sync::atomic::Ordering::SeqCst), 1);
    let entries = dlq.list(10).await.unwrap();
    assert_eq!(entries.len(), 1);
    assert!(
        entries[0].error.contains("idempotency store") && entries[0].error.contains("0x00"),
        "{}",
        entries[0].error
    );
    // The next event is not held up by it.
    let report = engine.process(&event("evt-2")).await;
    assert_eq!(report.dead_lettered, 0);
    assert_eq!(recorder.len(), 1);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_reconnects_after_its_connections_are_killed() {
    let db = test_db().await;
    install(&db).await;
    let recorder = Arc::new(Recorder::default());
    let running = Running::start(&db.url, "reconnect", engine(&recorder)).await;
    running.wait_until("healthy", |h| h.healthy()).await;
    db.pool
        .execute("INSERT INTO tb_order (note) VALUES ('before')")
        .await
        .unwrap();
    recorder.wait_for(1).await;
    running
        .wait_until("the cursor saved", |h| h.observers()["lag_rows"] == 0)
        .await;

    let mut admin = PgConnection::connect(&db.url).await.unwrap();
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
           AND backend_type = 'client backend'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(killed >= 2, "killed {killed} connections");
    admin
        .execute("INSERT INTO tb_order (note) SELECT 'after' FROM generate_series(1, 5)")
        .await
        .unwrap();
    let events = recorder.wait_for(6).await;
    let after = events
        .iter()
        .filter(|e| e.new.as_ref().unwrap()["note"] == "after")
        .count();
    assert_eq!(after, 5);
    running.wait_until("healthy again", |h| h.healthy()).await;
    assert_eq!(running.role(), "active");
    running.stop().await;
    db.cleanup().await;
}

/// Only the connection that stores the cursor is killed: the reader reads on and never
/// rewinds, so the next batch's cursor must be stored on a new connection (it was only
/// logged, and an idle reader stayed behind and stalled until another change came).
#[tokio::test]
async fn a_killed_cursor_connection_is_replaced_when_the_next_batch_is_stored() {
    let db = test_db().await;
    install(&db).await;
    let recorder = Arc::new(Recorder::default());
    let running = Running::start(&db.url, "cursor_conn", engine(&recorder)).await;
    running.wait_until("healthy", |h| h.healthy()).await;
    db.pool
        .execute("INSERT INTO tb_order (note) VALUES ('before')")
        .await
        .unwrap();
    recorder.wait_for(1).await;
    running
        .wait_until("the cursor stored", |h| {
            h.observers()["events_delivered"] == 1
        })
        .await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
           AND application_name = 'fraiseql cursor cursor_conn'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(killed, 1, "the cursor store's connection");
    db.pool
        .execute("INSERT INTO tb_order (note) SELECT 'after' FROM generate_series(1, 5)")
        .await
        .unwrap();
    recorder.wait_for(6).await;
    running
        .wait_until("the cursor saved again", |h| {
            h.observers()["lag_rows"] == 0 && h.observers()["events_delivered"] == 6
        })
        .await;
    assert_eq!(recorder.events().len(), 6, "nothing read twice");
    running.stop().await;
    db.cleanup().await;
}

/// A dead-letter queue that fails while `down` is set (a database that went away), else
/// keeps entries in memory.
struct FlakyDlq {
    down: std::sync::atomic::AtomicBool,
    failed_pushes: std::sync::atomic::AtomicUsize,
    inner: MemoryDlq,
}

#[async_trait]
impl fraiseql_observers::DeadLetterQueue for FlakyDlq {
    async fn push(
        &self,
        entry: fraiseql_observers::DlqEntry,
    ) -> fraiseql_observers::Result<fraiseql_observers::dlq::PushOutcome> {
        use std::sync::atomic::Ordering;
        if self.down.load(Ordering::SeqCst) {
            self.failed_pushes.fetch_add(1, Ordering::SeqCst);
            return Err(fraiseql_observers::Error::Transport(
                "the DLQ is down".into(),
            ));
        }
        self.inner.push(entry).await
    }
    async fn list(
        &self,
        limit: usize,
    ) -> fraiseql_observers::Result<Vec<fraiseql_observers::DlqEntry>> {
        self.inner.list(limit).await
    }
    async fn search(
        &self,
        text: &str,
        limit: usize,
    ) -> fraiseql_observers::Result<Vec<fraiseql_observers::DlqEntry>> {
        self.inner.search(text, limit).await
    }
    async fn record_failure(
        &self,
        id: u64,
        failure: &fraiseql_observers::dlq::RetryFailure,
    ) -> fraiseql_observers::Result<bool> {
        self.inner.record_failure(id, failure).await
    }
    async fn get(
        &self,
        id: u64,
    ) -> fraiseql_observers::Result<Option<fraiseql_observers::DlqEntry>> {
        self.inner.get(id).await
    }
    async fn remove(&self, id: u64) -> fraiseql_observers::Result<bool> {
        self.inner.remove(id).await
    }
    async fn purge(&self) -> fraiseql_observers::Result<usize> {
        self.inner.purge().await
    }
    async fn len(&self) -> fraiseql_observers::Result<usize> {
        self.inner.len().await
    }
}

/// Always fails, at once.
struct Refusing;

#[async_trait]
impl Action for Refusing {
    fn kind(&self) -> &'static str {
        "refusing"
    }
    async fn execute(&self, _event: &Event) -> Result<(), ActionError> {
        Err(ActionError::permanent("refused"))
    }
}

#[tokio::test]
async fn a_dead_letter_that_cannot_be_stored_holds_the_cursor_until_it_is() {
    use std::sync::atomic::Ordering;
    let db = test_db().await;
    install(&db).await;
    let dlq = Arc::new(FlakyDlq {
        down: true.into(),
        failed_pushes: 0.into(),
        inner: MemoryDlq::new(None),
    });
    let spec = ObserverSpec::new(
        ListenerConfig::new("refuses", CheckpointStrategy::AtLeastOnce),
        "Order",
        EventKind::Insert,
    )
    .action(Arc::new(Refusing));
    let engine = Arc::new(
        Engine::new(
            vec![spec],
            dlq.clone(),
            &MemoryIdempotencyStores::default(),
            Arc::new(Metrics::new()),
        )
        .unwrap(),
    );
    let running = Running::start(&db.url, "flaky", engine).await;
    db.pool
        .execute("INSERT INTO tb_order (total) VALUES (1)")
        .await
        .unwrap();
    // Read again (with a backoff), never acknowledged: the cursor stays before the row.
    tokio::time::timeout(WAIT, async {
        while dlq.failed_pushes.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the change is delivered again while its dead letter cannot be stored");
    let stored: i64 = count(
        &db.pool,
        "SELECT count(*) FROM fraiseql_cursor WHERE listener_id = 'flaky' AND last_id > 0",
    )
    .await;
    assert_eq!(stored, 0, "the cursor must not pass an unsettled change");
    // The queue is back: the dead letter is stored once and the cursor moves past it.
    dlq.down.store(false, Ordering::SeqCst);
    running
        .wait_until("the cursor past the row", |h| {
            h.observers()["events_delivered"].as_u64() >= Some(1)
        })
        .await;
    let [entry] = dlq.inner.list(10).await.unwrap().try_into().unwrap();
    assert_eq!(entry.observer, "refuses");
    assert!(entry.error.contains("refused"));
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumed_rows_are_pruned_below_the_slowest_live_cursor() {
    let db = test_db().await;
    install(&db).await;
    let log_rows = || count(&db.pool, "SELECT count(*) FROM fraiseql_change_log");
    let wait_for_rows = |n: i64| async move {
        tokio::time::timeout(WAIT, async {
            while log_rows().await != n {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the change log never held {n} rows"));
    };
    let (a, b) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let fast = Running::start(&db.url, "fast", engine(&a)).await;
    let slow = Running::start(&db.url, "slow", engine(&b)).await;
    db.pool
        .execute("INSERT INTO tb_order (total) SELECT g FROM generate_series(1, 100) g")
        .await
        .unwrap();
    a.wait_for(100).await;
    b.wait_for(100).await;
    slow.stop().await;
    db.pool
        .execute("INSERT INTO tb_order (total) SELECT g FROM generate_series(101, 200) g")
        .await
        .unwrap();
    a.wait_for(200).await;
    fast.stop().await;
    // A reader prunes as it becomes active, below `slow`, which is alive (it moved
    // recently): the rows `slow` has not read stay.
    let fast = Running::start(&db.url, "fast", engine(&a)).await;
    wait_for_rows(100).await;
    fast.stop().await;
    // `slow` gone for longer than the retention: it holds nothing back any more.
    db.pool
        .execute("UPDATE fraiseql_cursor SET updated_at = now() - interval '8 days' WHERE listener_id = 'slow'")
        .await
        .unwrap();
    let fast = Running::start(&db.url, "fast", engine(&a)).await;
    wait_for_rows(0).await;
    fast.wait_until("the deletion counted", |h| {
        h.observers()["pruned_rows"] == 100
    })
    .await;
    fast.stop().await;
    assert_eq!(a.len(), 200, "pruning delivers nothing twice");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transaction_holding_delivery_back_is_named_in_health() {
    let db = test_db().await;
    install(&db).await;
    let recorder = Arc::new(Recorder::default());
    // stall_after is 2 s in these tests.
    let running = Running::start(&db.url, "held", engine(&recorder)).await;
    let mut blocker = PgConnection::connect(&db.url).await.unwrap();
    blocker
        .execute("SET application_name = 'nightly-batch'")
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut blocker)
        .await
        .unwrap();
    blocker
        .execute("BEGIN; INSERT INTO tb_order (total, note) VALUES (1, 'held')")
        .await
        .unwrap();
    db.pool
        .execute("INSERT INTO tb_order (total) VALUES (2)")
        .await
        .unwrap();
    running
        .wait_until("the blocker named", |h| {
            h.observers()["held_back_by"]["pid"] == pid
        })
        .await;
    let held = running.health.observers()["held_back_by"].clone();
    assert_eq!(held["application_name"], "nightly-batch");
    assert_eq!(held["database"], db.name.as_str());
    assert!(
        held["query"]
            .as_str()
            .unwrap()
            .starts_with("BEGIN; INSERT INTO tb_order"),
        "{held}"
    );
    assert!(held["transaction_age_secs"].as_f64().unwrap() >= 0.0);
    running
        .wait_until("stalled", |h| {
            h.observers()["stalled"] == true && !h.healthy()
        })
        .await;
    assert_eq!(recorder.len(), 0);
    blocker.execute("COMMIT").await.unwrap();
    recorder.wait_for(2).await;
    running
        .wait_until("caught up", |h| {
            h.observers()["held_back_by"].is_null() && h.healthy()
        })
        .await;
    running.stop().await;
    db.cleanup().await;
}

async fn guard(db: &TestDb) -> fraiseql_observers::capture::guard::Guard {
    use fraiseql_observers::capture::guard::{Capture, Guard};
    Guard::new(
        db.pool.clone(),
        &schema(),
        Capture::Trigger(fraiseql_observers::CaptureOptions::new(CHANNEL)),
        true,
        Duration::from_millis(100),
    )
    .unwrap()
}

const RECREATE: &str = "DROP TABLE tb_order; CREATE TABLE tb_order (id serial PRIMARY KEY, \
     status text NOT NULL DEFAULT 'new', total numeric NOT NULL DEFAULT 0, note text)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_created_again_is_captured_from_its_first_row() {
    let db = test_db().await;
    install(&db).await;
    // The event trigger (the tests run as a superuser) captures the new table in the
    // transaction that creates it: even a row written in that same transaction.
    db.pool
        .execute(
            format!("BEGIN; {RECREATE}; INSERT INTO tb_order (total) VALUES (7); COMMIT").as_str(),
        )
        .await
        .unwrap();
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM fraiseql_change_log WHERE (new->>'total')::int = 7"
        )
        .await,
        1
    );
    let mut guard = guard(&db).await;
    guard.check().await.unwrap();
    assert_eq!(guard.health().gaps(), json!([]), "nothing was missed");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_event_trigger_the_guard_repairs_and_says_what_was_missed() {
    let db = test_db().await;
    install(&db).await;
    // As where the installer may not create event triggers.
    db.pool
        .execute("DROP EVENT TRIGGER fraiseql_capture_on_create")
        .await
        .unwrap();
    let mut guard = guard(&db).await;
    guard.check().await.unwrap();
    db.pool.execute(RECREATE).await.unwrap();
    db.pool
        .execute("INSERT INTO tb_order (total) VALUES (1)")
        .await
        .unwrap();
    guard.check().await.unwrap();
    let [gap] = guard
        .health()
        .gaps()
        .as_array()
        .unwrap()
        .clone()
        .try_into()
        .unwrap();
    assert_eq!(gap["table"], "tb_order");
    assert_eq!(gap["entity"], "Order");
    assert!(
        gap["reason"]
            .as_str()
            .unwrap()
            .contains("lost its capture triggers"),
        "{gap}"
    );
    assert!(
        gap["repaired_at"].is_string() && gap["not_captured_since"].is_string(),
        "{gap}"
    );
    db.pool
        .execute("INSERT INTO tb_order (total) VALUES (2)")
        .await
        .unwrap();
    let totals: Vec<i64> =
        sqlx::query_scalar("SELECT (new->>'total')::int8 FROM fraiseql_change_log ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        totals,
        [2],
        "the row before the repair was missed, and said so"
    );
    // A table that is gone is reported once, and again when it is back and repaired.
    db.pool.execute("DROP TABLE tb_order").await.unwrap();
    guard.check().await.unwrap();
    guard.check().await.unwrap();
    let gaps = guard.health().gaps();
    assert_eq!(gaps.as_array().unwrap().len(), 2, "{gaps}");
    assert!(gaps[1]["reason"]
        .as_str()
        .unwrap()
        .contains("does not exist"));
    assert!(gaps[1]["repaired_at"].is_null());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_may_not_create_event_triggers_still_installs() {
    let db = test_db().await;
    let role = format!("fraiseql_app_{}", &db.name[db.name.len() - 8..]);
    db.pool
        .execute(
            format!(
                "CREATE ROLE {role} LOGIN; GRANT CREATE ON SCHEMA public TO {role}; \
                 ALTER TABLE tb_order OWNER TO {role}"
            )
            .as_str(),
        )
        .await
        .unwrap();
    let url = db.url.replacen("postgres@", &format!("{role}@"), 1);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    capture::install(&pool, &schema(), CHANNEL).await.unwrap();
    let event_triggers = count(&db.pool, "SELECT count(*) FROM pg_event_trigger").await;
    assert_eq!(event_triggers, 0);
    pool.execute("INSERT INTO tb_order (total) VALUES (1)")
        .await
        .unwrap();
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM fraiseql_change_log").await,
        1
    );
    pool.close().await;
    db.cleanup().await;
    let mut admin = PgConnection::connect(&pg::base_url()).await.unwrap();
    admin
        .execute(format!("DROP ROLE IF EXISTS {role}").as_str())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_kills_the_engine_every_time_is_dead_lettered_not_run_for_ever() {
    let db = test_db().await;
    install(&db).await;
    db.pool
        .execute("INSERT INTO tb_order (total) SELECT g FROM generate_series(1, 40) g")
        .await
        .unwrap();
    let poison = Arc::new(poison::Poison::default());
    let dlq = Arc::new(MemoryDlq::new(None));
    // The poison row kills each run: first in its batch, then run alone, twice.
    for run in 1..=3 {
        let running = Running::start(&db.url, "poison", poison::engine(&poison, &dlq)).await;
        poison
            .wait_until(&format!("run {run} of the poison row"), |p| p.runs() == run)
            .await;
        running.crash().await;
    }
    assert_eq!(
        dlq.len().await.unwrap(),
        0,
        "nothing is dead-lettered while it may still succeed"
    );
    // The fourth start dead-letters it without running it; everything else is delivered.
    let running = Running::start(&db.url, "poison", poison::engine(&poison, &dlq)).await;
    let others: Vec<i64> = (1..=40).filter(|t| *t != poison::POISON_TOTAL).collect();
    poison
        .wait_until("the other rows", |p| p.others_seen() == others)
        .await;
    poison::wait_for_a_dead_letter(&dlq).await;
    settle().await;
    assert_eq!(poison.runs(), 3, "never run a fourth time");
    let entries = dlq.list(10).await.unwrap();
    assert_eq!(entries.len(), 1, "only the poison row: {entries:?}");
    assert_eq!(
        entries[0].event.new.as_ref().unwrap()["total"],
        json!(poison::POISON_TOTAL)
    );
    assert_eq!(entries[0].error, poison::DEAD_LETTER_REASON);
    assert_eq!(entries[0].attempts, 4);
    running.stop().await;
    // A clean stop leaves nothing suspect for the next start.
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM fraiseql_deliveries").await,
        0
    );
    db.cleanup().await;
}
