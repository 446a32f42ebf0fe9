//! Proves that `Condition::evaluate` does not allocate: a counting global allocator
//! (per thread, so the test harness's own threads do not interfere) must see zero
//! allocations across 10,000 evaluations of several compiled conditions.
#![allow(unsafe_code)] // a `GlobalAlloc` impl is unsafe by definition

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;

use fraiseql_observers::condition::Condition;
use serde_json::json;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: the thread-local may already be gone while a thread shuts down.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: every method forwards to `System` unchanged; counting has no side effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn evaluate_does_not_allocate() {
    let conditions: Vec<Condition> = [
        "status.changed() && status == 'shipped'",
        "total > 1000 && is_premium == true",
        "status.old == 'pending' && status == 'approved'",
        "status == 'failed' || retry_count > 3",
        "quantity > min_quantity",
        "customer.address.city == \"Paris\" && !(total <= 10.5) && customer.tags != null",
        "email.changed() || customer.changed() || note.new == null",
    ]
    .iter()
    .map(|src| Condition::compile(src, None).expect("compiles"))
    .collect();
    let old = json!({
        "id": 1, "status": "pending", "total": 999, "is_premium": false,
        "email": "a@example.com", "quantity": 3, "min_quantity": 5, "retry_count": 0,
        "customer": {"address": {"city": "Lyon"}, "tags": ["a"]}
    });
    let new = json!({
        "id": 1, "status": "shipped", "total": 1500.5, "is_premium": true,
        "email": "a@example.com", "quantity": 7, "min_quantity": 5, "retry_count": 4,
        "customer": {"address": {"city": "Paris"}, "tags": ["a", "b"]}
    });
    let row_pairs = [
        (Some(&new), Some(&old)),
        (Some(&new), None),
        (None, Some(&old)),
        (Some(&old), Some(&new)),
    ];
    // Warm up once (lazy statics, if any, are not per-evaluation allocations).
    for c in &conditions {
        for &(n, o) in &row_pairs {
            black_box(c.evaluate(n, o));
        }
    }

    let before = allocations();
    let mut matched = 0usize;
    for i in 0..10_000 {
        let c = &conditions[i % conditions.len()];
        let (n, o) = row_pairs[i % row_pairs.len()];
        if c.evaluate(black_box(n), black_box(o)) {
            matched += 1;
        }
    }
    let after = allocations();
    assert_eq!(
        after - before,
        0,
        "evaluate allocated {} times",
        after - before
    );
    assert!(
        matched > 0 && matched < 10_000,
        "both outcomes exercised: {matched}"
    );

    // Sanity check that the counter works at all.
    let before = allocations();
    black_box(vec![1u8; 16]);
    assert!(
        allocations() > before,
        "the counting allocator is not active"
    );
}
