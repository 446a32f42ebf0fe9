//! `PgDeadLetterQueue` against a real PostgreSQL (`FRAISEQL_TEST_DATABASE_URL`, else
//! `postgres://postgres@127.0.0.1:5432/postgres`). Each test creates its own database and
//! drops it at the end.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use fraiseql_observers::dlq::{DlqOrigin, PushOutcome, RetryFailure};
use fraiseql_observers::event::now_rfc3339;
use fraiseql_observers::{
    Action, ActionError, CheckpointStrategy, DeadLetterQueue, DlqEntry, Engine, Event, EventKind,
    ListenerConfig, MemoryDlq, MemoryIdempotencyStores, Metrics, ObserverSpec, PgDeadLetterQueue,
};
use serde_json::json;
use tokio::sync::Barrier;

mod pg;
mod services;

use pg::{connect, TestDb};

async fn test_db() -> TestDb {
    TestDb::create("fraiseql_dlq", 4).await
}

fn event(n: u32) -> Event {
    Event::new(
        "Order",
        EventKind::Update,
        "tb_order",
        Some(json!({
            "id": n,
            "status": "paid",
            "total": 12.5,
            "note": "naïve — ✓ \"quoted\"\nline two",
            "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-2", "qty": null}],
            "flags": {"vip": true, "tags": []},
        })),
        Some(json!({"id": n, "status": "new", "total": 0, "note": null})),
    )
}

fn entry(n: u32) -> DlqEntry {
    DlqEntry {
        id: 0,
        origin: DlqOrigin::Observer,
        raw: None,
        event: event(n),
        observer: format!("obs{n}"),
        action_index: n as usize % 3,
        action: format!("python:handler_{n}"),
        error: format!(
            "Traceback (most recent call last):\n  File \"h.py\", line {n}\nValueError: bad {n}"
        ),
        attempts: n + 1,
        first_failed_at: "2024-05-01T12:00:00.123456Z".into(),
        last_failed_at: now_rfc3339(),
    }
}

fn with_id(mut e: DlqEntry, id: u64) -> DlqEntry {
    e.id = id;
    e
}

fn stored(outcome: PushOutcome) -> u64 {
    match outcome {
        PushOutcome::Stored(id) => id,
        PushOutcome::Overflow => panic!("unexpected overflow"),
    }
}

#[tokio::test]
async fn push_list_get_remove_purge_len_round_trip() {
    let db = test_db().await;
    let dlq = PgDeadLetterQueue::new(db.pool.clone(), None).await.unwrap();
    assert!(dlq.is_empty().await.unwrap());
    assert!(dlq.list(10).await.unwrap().is_empty());

    let entries: Vec<DlqEntry> = (1..=3).map(entry).collect();
    let mut ids = Vec::new();
    for e in &entries {
        ids.push(stored(dlq.push(e.clone()).await.unwrap()));
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let expected: Vec<DlqEntry> = entries
        .iter()
        .zip(&ids)
        .map(|(e, &id)| with_id(e.clone(), id))
        .collect();

    // Every field comes back as pushed, oldest first.
    assert_eq!(dlq.list(10).await.unwrap(), expected);
    assert_eq!(dlq.list(2).await.unwrap(), expected[..2]);
    assert!(dlq.list(0).await.unwrap().is_empty());
    assert_eq!(dlq.get(ids[1]).await.unwrap(), Some(expected[1].clone()));
    assert_eq!(dlq.get(ids[2] + 100).await.unwrap(), None);
    assert_eq!(dlq.get(u64::MAX).await.unwrap(), None);
    assert_eq!(dlq.len().await.unwrap(), 3);

    // The row itself: the event_id column, and the event as JSON bytes SQL can read.
    let (event_id, kind): (String, String) = sqlx::query_as(
        "SELECT event_id, convert_from(payload, 'UTF8')::jsonb->>'event' \
         FROM fraiseql_dead_letters WHERE id = $1",
    )
    .bind(ids[0] as i64)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(event_id, entries[0].event.id);
    assert_eq!(kind, "UPDATE");

    assert!(dlq.remove(ids[1]).await.unwrap());
    assert!(!dlq.remove(ids[1]).await.unwrap());
    assert!(!dlq.remove(u64::MAX).await.unwrap());
    assert_eq!(dlq.get(ids[1]).await.unwrap(), None);
    assert_eq!(
        dlq.list(10).await.unwrap(),
        [expected[0].clone(), expected[2].clone()]
    );
    assert_eq!(dlq.len().await.unwrap(), 2);

    assert_eq!(dlq.purge().await.unwrap(), 2);
    assert_eq!(dlq.len().await.unwrap(), 0);
    assert!(dlq.is_empty().await.unwrap());
    assert_eq!(dlq.purge().await.unwrap(), 0);

    // Ids are never reused after a purge.
    let next = stored(dlq.push(entry(4)).await.unwrap());
    assert!(next > ids[2]);

    db.cleanup().await;
}

#[tokio::test]
async fn timestamps_are_normalised_to_utc_and_must_be_rfc3339() {
    let db = test_db().await;
    let dlq = PgDeadLetterQueue::new(db.pool.clone(), None).await.unwrap();

    let mut e = entry(1);
    e.first_failed_at = "2024-05-01T14:00:00+02:00".into();
    e.last_failed_at = "2024-05-01T12:00:01.5Z".into();
    let id = stored(dlq.push(e).await.unwrap());
    let got = dlq.get(id).await.unwrap().unwrap();
    assert_eq!(got.first_failed_at, "2024-05-01T12:00:00.000000Z");
    assert_eq!(got.last_failed_at, "2024-05-01T12:00:01.500000Z");

    for bad in ["", "now", "2024-05-01 12:00"] {
        let mut e = entry(2);
        e.first_failed_at = bad.into();
        let err = dlq.push(e).await.unwrap_err();
        assert!(err.to_string().contains("RFC 3339"), "{err}");
    }
    assert_eq!(dlq.len().await.unwrap(), 1);

    // Free-text NULs (which PostgreSQL text cannot hold) are replaced, not fatal.
    let mut e = entry(3);
    e.error = "body: a\0b".into();
    let id = stored(dlq.push(e).await.unwrap());
    assert_eq!(
        dlq.get(id).await.unwrap().unwrap().error,
        "body: a\u{FFFD}b"
    );

    db.cleanup().await;
}

#[tokio::test]
async fn table_and_index_are_created_idempotently() {
    let db = test_db().await;
    PgDeadLetterQueue::new(db.pool.clone(), None).await.unwrap();
    PgDeadLetterQueue::new(db.pool.clone(), Some(5))
        .await
        .unwrap();
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'fraiseql_dead_letters' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(indexes.len(), 2, "{indexes:?}");
    assert!(indexes.iter().any(|i| i.contains("(created_at, id)")));
    assert!(indexes.iter().any(|i| i.contains("(id)")));
    db.cleanup().await;
}

#[tokio::test]
async fn full_queue_drops_the_newest_and_keeps_the_oldest() {
    let db = test_db().await;
    let dlq = PgDeadLetterQueue::new(db.pool.clone(), Some(2))
        .await
        .unwrap();
    let first = stored(dlq.push(entry(1)).await.unwrap());
    let second = stored(dlq.push(entry(2)).await.unwrap());
    assert_eq!(dlq.push(entry(3)).await.unwrap(), PushOutcome::Overflow);
    assert_eq!(dlq.push(entry(4)).await.unwrap(), PushOutcome::Overflow);
    let kept: Vec<_> = dlq
        .list(10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.id, e.observer))
        .collect();
    assert_eq!(
        kept,
        [(first, "obs1".to_owned()), (second, "obs2".to_owned())]
    );
    assert_eq!(dlq.len().await.unwrap(), 2);

    // Room again after a removal.
    assert!(dlq.remove(first).await.unwrap());
    let third = stored(dlq.push(entry(5)).await.unwrap());
    assert!(third > second);
    assert_eq!(dlq.push(entry(6)).await.unwrap(), PushOutcome::Overflow);
    assert_eq!(dlq.purge().await.unwrap(), 2);
    assert_eq!(dlq.len().await.unwrap(), 0);

    // A cap of 0 stores nothing.
    let none = PgDeadLetterQueue::new(db.pool.clone(), Some(0))
        .await
        .unwrap();
    assert_eq!(none.push(entry(7)).await.unwrap(), PushOutcome::Overflow);
    assert_eq!(none.len().await.unwrap(), 0);

    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cap_holds_across_concurrent_pushers_with_separate_pools() {
    const TASKS: usize = 4;
    const PER_TASK: u32 = 50;
    const CAP: usize = 20;
    let db = test_db().await;
    let barrier = Arc::new(Barrier::new(TASKS));
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let url = db.url.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            // Its own pool, as another process would have; creation races too.
            let pool = connect(&url, 2).await;
            let dlq = PgDeadLetterQueue::new(pool.clone(), Some(CAP))
                .await
                .unwrap();
            barrier.wait().await;
            let (mut stored, mut overflow) = (0usize, 0usize);
            for i in 0..PER_TASK {
                let mut e = entry(i);
                e.observer = format!("task{t}");
                match dlq.push(e).await.unwrap() {
                    PushOutcome::Stored(_) => stored += 1,
                    PushOutcome::Overflow => overflow += 1,
                }
            }
            pool.close().await;
            (stored, overflow)
        }));
    }
    let (mut stored, mut overflow) = (0, 0);
    for h in handles {
        let (s, o) = h.await.unwrap();
        stored += s;
        overflow += o;
    }
    assert_eq!(stored, CAP);
    assert_eq!(overflow, TASKS * PER_TASK as usize - CAP);

    let dlq = PgDeadLetterQueue::new(db.pool.clone(), Some(CAP))
        .await
        .unwrap();
    assert_eq!(dlq.len().await.unwrap(), CAP);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM fraiseql_dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, CAP as i64);

    db.cleanup().await;
}

#[tokio::test]
async fn entries_survive_recreating_the_queue() {
    let db = test_db().await;
    let expected: Vec<DlqEntry> = {
        let pool = connect(&db.url, 2).await;
        let dlq = PgDeadLetterQueue::new(pool.clone(), Some(3)).await.unwrap();
        let mut expected = Vec::new();
        for e in (1..=3).map(entry) {
            let id = stored(dlq.push(e.clone()).await.unwrap());
            expected.push(with_id(e, id));
        }
        drop(dlq);
        pool.close().await;
        expected
    };

    let pool = connect(&db.url, 2).await;
    let dlq = PgDeadLetterQueue::new(pool.clone(), Some(3)).await.unwrap();
    assert_eq!(dlq.list(10).await.unwrap(), expected);
    assert_eq!(dlq.len().await.unwrap(), 3);
    // The cap counts what earlier instances stored.
    assert_eq!(dlq.push(entry(4)).await.unwrap(), PushOutcome::Overflow);
    // Ids continue after the stored ones.
    assert!(dlq.remove(expected[0].id).await.unwrap());
    let next = stored(dlq.push(entry(5)).await.unwrap());
    assert!(next > expected[2].id);
    pool.close().await;

    db.cleanup().await;
}

/// Fails permanently until told to succeed.
#[derive(Default)]
struct Flaky {
    succeed: AtomicBool,
    calls: AtomicUsize,
}

#[async_trait]
impl Action for Flaky {
    fn kind(&self) -> &'static str {
        "flaky"
    }

    fn describe(&self) -> String {
        "flaky:test".into()
    }

    async fn execute(&self, _event: &Event) -> Result<(), ActionError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.succeed.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(ActionError::permanent("HTTP 400: rejected"))
        }
    }
}

fn engine(dlq: Arc<PgDeadLetterQueue>, action: Arc<Flaky>) -> Engine {
    Engine::new(
        vec![ObserverSpec::new(
            ListenerConfig::new("on_order_update", CheckpointStrategy::AtLeastOnce),
            "Order",
            EventKind::Update,
        )
        .action(action as Arc<dyn Action>)],
        dlq,
        &MemoryIdempotencyStores::default(),
        Arc::new(Metrics::new()),
    )
    .unwrap()
}

#[tokio::test]
async fn engine_dead_letters_into_the_table_and_retries_from_it() {
    let db = test_db().await;
    let dlq = Arc::new(PgDeadLetterQueue::new(db.pool.clone(), None).await.unwrap());
    let action = Arc::new(Flaky::default());
    let engine = engine(dlq.clone(), action.clone());

    let ev = event(42);
    let report = engine.process(&ev).await;
    assert_eq!(report.matched, 1);
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(
        action.calls.load(Ordering::SeqCst),
        1,
        "permanent: no retry"
    );
    assert_eq!(engine.metrics().dlq_size.get(), 1);

    let rows: Vec<(i64, String, String, i32, String, String, i32)> = sqlx::query_as(
        "SELECT id, event_id, observer, action_index, action, error, attempts \
         FROM fraiseql_dead_letters",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    let (id, event_id, observer, action_index, action_name, error, attempts) = rows[0].clone();
    assert_eq!(event_id, ev.id);
    assert_eq!(observer, "on_order_update");
    assert_eq!(action_index, 0);
    assert_eq!(action_name, "flaky:test");
    assert_eq!(error, "HTTP 400: rejected");
    assert_eq!(attempts, 1);
    let entry = dlq.get(id as u64).await.unwrap().unwrap();
    assert_eq!(entry.event, ev);

    action.succeed.store(true, Ordering::SeqCst);
    assert!(engine.retry_dead_letter(id as u64).await.unwrap());
    assert_eq!(action.calls.load(Ordering::SeqCst), 2);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM fraiseql_dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert_eq!(engine.metrics().dlq_size.get(), 0);
    assert!(engine.retry_dead_letter(id as u64).await.is_err());

    db.cleanup().await;
}

#[tokio::test]
async fn engine_counts_overflow_when_the_table_is_full() {
    let db = test_db().await;
    let dlq = Arc::new(
        PgDeadLetterQueue::new(db.pool.clone(), Some(1))
            .await
            .unwrap(),
    );
    let action = Arc::new(Flaky::default());
    let engine = engine(dlq.clone(), action);

    let first = event(1);
    engine.process(&first).await;
    engine.process(&event(2)).await;
    assert_eq!(engine.metrics().dlq_overflow.get(), 1);
    let kept = dlq.list(10).await.unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].event.id, first.id, "the oldest is kept");

    db.cleanup().await;
}

#[tokio::test]
async fn any_content_is_kept_nul_characters_and_raw_bytes_included() {
    let db = test_db().await;
    let dlq = PgDeadLetterQueue::new(db.pool.clone(), Some(10))
        .await
        .unwrap();
    let mut e = entry(1);
    e.event.id = "evt\0nul".into();
    e.event.new = Some(json!({"id": 1, "note": "a\u{0}b", "bytes": "\u{0}\u{1}\u{7f}"}));
    e.observer = "obs\0".into();
    let id = stored(dlq.push(e.clone()).await.unwrap());
    let back = dlq.get(id).await.unwrap().unwrap();
    assert_eq!(back.event, e.event, "the event keeps its NULs");
    assert_eq!(back.observer, "obs\u{FFFD}", "text columns replace them");

    let raw = vec![0u8, 0xff, b'{', b'x', 0];
    let undecodable = DlqEntry {
        origin: DlqOrigin::Undecodable,
        raw: Some(raw.clone()),
        ..entry(2)
    };
    let id = stored(dlq.push(undecodable).await.unwrap());
    let back = dlq.get(id).await.unwrap().unwrap();
    assert_eq!(back.origin, DlqOrigin::Undecodable);
    assert_eq!(back.raw.as_deref(), Some(&raw[..]));
    // Shown as base64 where it is not text, as text where it is.
    let shown = serde_json::to_value(&back).unwrap();
    assert_eq!(
        shown["raw"],
        json!({"encoding": "base64", "data": "AP97eAA="})
    );
    assert_eq!(shown["origin"], "undecodable");
    let text = DlqEntry {
        raw: Some(b"{not json".to_vec()),
        ..back
    };
    let shown = serde_json::to_value(&text).unwrap();
    assert_eq!(
        shown["raw"],
        json!({"encoding": "utf-8", "text": "{not json"})
    );
    let parsed: DlqEntry = serde_json::from_value(shown).unwrap();
    assert_eq!(parsed.raw, text.raw);

    // Chosen entries go, the others stay.
    assert_eq!(
        dlq.remove_many(&[id, id + 1000, u64::MAX]).await.unwrap(),
        1
    );
    assert_eq!(dlq.len().await.unwrap(), 1);
    db.cleanup().await;
}

#[tokio::test]
async fn a_table_of_the_previous_version_is_migrated_and_read() {
    let db = test_db().await;
    sqlx::raw_sql(
        "CREATE TABLE fraiseql_dead_letters (
            id bigserial PRIMARY KEY, event_id text NOT NULL, observer text NOT NULL,
            action_index int NOT NULL, action text NOT NULL, event jsonb NOT NULL,
            error text NOT NULL, attempts int NOT NULL, first_failed_at timestamptz NOT NULL,
            last_failed_at timestamptz NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO fraiseql_dead_letters (event_id, observer, action_index, action, event,
            error, attempts, first_failed_at, last_failed_at) VALUES
          ('1', 'shipping', 0, 'webhook', '{\"id\":\"1\",\"entity\":\"Order\",\"event\":\"INSERT\",\"table\":\"tb_order\",\"timestamp\":\"t\",\"new\":{\"id\":1},\"old\":null}', 'HTTP 500', 3, now(), now()),
          ('2', 'redis:s', 0, 'redis decode', '{\"id\":\"2\",\"entity\":\"\",\"event\":\"INSERT\",\"table\":\"\",\"timestamp\":\"t\",\"new\":{\"fields\":{}},\"old\":null}', 'malformed', 1, now(), now()),
          ('3', 'pg_to_nats:Order:insert', 0, 'nats_publish', '{\"id\":\"3\",\"entity\":\"Order\",\"event\":\"INSERT\",\"table\":\"tb_order\",\"timestamp\":\"t\",\"new\":{\"id\":3},\"old\":null}', 'timed out', 5, now(), now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let dlq = PgDeadLetterQueue::new(db.pool.clone(), None).await.unwrap();
    let origins: Vec<(String, DlqOrigin)> = dlq
        .list(10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.event.id, e.origin))
        .collect();
    assert_eq!(
        origins,
        [
            ("1".to_owned(), DlqOrigin::Observer),
            ("2".to_owned(), DlqOrigin::Undecodable),
            ("3".to_owned(), DlqOrigin::Forwarder),
        ]
    );
    // New entries go into the migrated table beside the old ones.
    stored(dlq.push(entry(4)).await.unwrap());
    assert_eq!(dlq.len().await.unwrap(), 4);
    db.cleanup().await;
}

/// Search and a failed retry's record behave the same in PostgreSQL and in memory.
async fn search_and_record_failure(dlq: &dyn DeadLetterQueue) {
    let mut ids = Vec::new();
    for e in [
        {
            let mut e = entry(1);
            e.event.new = Some(json!({"id": 1, "note": "Needle\u{0}in a haystack"}));
            e
        },
        DlqEntry {
            origin: DlqOrigin::Undecodable,
            raw: Some(vec![0, 0xff, b'x']),
            ..entry(2)
        },
        {
            let mut e = entry(3);
            e.error = "100% failed_at 'o''clock' \\ done".into();
            e
        },
    ] {
        ids.push(stored(dlq.push(e).await.unwrap()));
    }
    let found = |text: &'static str, limit: usize| async move {
        dlq.search(text, limit)
            .await
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect::<Vec<_>>()
    };
    // Newest first; case-insensitive over observer, action, error, event id and the event.
    assert_eq!(found("", 10).await, [ids[2], ids[1], ids[0]]);
    assert_eq!(found("", 2).await, [ids[2], ids[1]]);
    assert_eq!(found("NEEDLE", 10).await, [ids[0]]);
    assert_eq!(found("obs2", 10).await, [ids[1]]);
    assert_eq!(found("HANDLER_3", 10).await, [ids[2]]);
    // LIKE's wildcards and quotes are plain characters.
    assert_eq!(found("100%", 10).await, [ids[2]]);
    assert_eq!(found("_at 'o''c", 10).await, [ids[2]]);
    assert_eq!(found("%", 10).await, [ids[2]]);
    // A NUL is stored escaped in the event's JSON: searching for one finds nothing.
    assert!(found("\0", 10).await.is_empty());
    assert!(found("no such text", 10).await.is_empty());

    let failure = RetryFailure {
        error: "HTTP 503\0again".into(),
        attempts: 9,
        last_failed_at: "2026-12-07T08:00:00.000001Z".into(),
    };
    assert!(dlq.record_failure(ids[0], &failure).await.unwrap());
    let kept = dlq.get(ids[0]).await.unwrap().unwrap();
    assert_eq!(kept.id, ids[0], "the entry keeps its id");
    assert_eq!(kept.attempts, 9);
    assert_eq!(kept.last_failed_at, failure.last_failed_at);
    assert!(kept.error.starts_with("HTTP 503") && kept.error.ends_with("again"));
    assert_eq!(kept.first_failed_at, "2024-05-01T12:00:00.123456Z");
    assert!(!dlq.record_failure(ids[2] + 1000, &failure).await.unwrap());
    assert_eq!(dlq.len().await.unwrap(), 3);
}

#[tokio::test]
async fn search_and_a_failed_retry_in_postgres() {
    let db = test_db().await;
    let dlq = PgDeadLetterQueue::new(db.pool.clone(), None).await.unwrap();
    search_and_record_failure(&dlq).await;
    db.cleanup().await;
}

#[tokio::test]
async fn search_and_a_failed_retry_in_memory() {
    search_and_record_failure(&MemoryDlq::new(None)).await;
}
