//! Condition evaluation cost: the two reference conditions, each on a matching and a
//! non-matching row of ~6 fields. Target: <= 50 ns per evaluation.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use fraiseql_observers::condition::Condition;
use serde_json::json;

fn conditions(c: &mut Criterion) {
    let mut group = c.benchmark_group("condition_evaluate");

    let changed = Condition::compile("status.changed() && status == 'shipped'", None).unwrap();
    let old = json!({"id": 42, "status": "pending", "total": 1250.0, "is_premium": true,
                     "email": "a@example.com", "updated_at": "2025-01-01T00:00:00Z"});
    let shipped = json!({"id": 42, "status": "shipped", "total": 1250.0, "is_premium": true,
                         "email": "a@example.com", "updated_at": "2025-01-02T00:00:00Z"});
    let unchanged = json!({"id": 42, "status": "pending", "total": 1300.0, "is_premium": true,
                           "email": "a@example.com", "updated_at": "2025-01-02T00:00:00Z"});
    assert!(changed.evaluate(Some(&shipped), Some(&old)));
    assert!(!changed.evaluate(Some(&unchanged), Some(&old)));
    group.bench_function("status_changed_to_shipped/match", |b| {
        b.iter(|| changed.evaluate(black_box(Some(&shipped)), black_box(Some(&old))))
    });
    group.bench_function("status_changed_to_shipped/no_match", |b| {
        b.iter(|| changed.evaluate(black_box(Some(&unchanged)), black_box(Some(&old))))
    });

    let premium = Condition::compile("total > 1000 && is_premium == true", None).unwrap();
    let big = json!({"id": 7, "status": "paid", "total": 1500, "is_premium": true,
                     "email": "b@example.com", "country": "FR"});
    let small = json!({"id": 8, "status": "paid", "total": 250.5, "is_premium": true,
                       "email": "c@example.com", "country": "DE"});
    assert!(premium.evaluate(Some(&big), None));
    assert!(!premium.evaluate(Some(&small), None));
    group.bench_function("total_and_premium/match", |b| {
        b.iter(|| premium.evaluate(black_box(Some(&big)), black_box(None)))
    });
    group.bench_function("total_and_premium/no_match", |b| {
        b.iter(|| premium.evaluate(black_box(Some(&small)), black_box(None)))
    });

    group.finish();
}

criterion_group!(benches, conditions);
criterion_main!(benches);
