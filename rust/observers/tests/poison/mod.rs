//! A poison change for the delivery-ledger tests: an action that never returns on the row
//! with `total = POISON_TOTAL` (the test then kills the source's task, as a handler calling
//! `os._exit` kills the process) and records every other row.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fraiseql_observers::engine::Engine;
use fraiseql_observers::{
    Action, ActionError, CheckpointStrategy, Event, EventKind, ListenerConfig, MemoryDlq,
    MemoryIdempotencyStores, Metrics, ObserverSpec,
};
use tokio::sync::Notify;

pub const POISON_TOTAL: i64 = 13;

#[derive(Default)]
pub struct Poison {
    /// How many times the poison row was run.
    pub runs: AtomicUsize,
    /// The totals of the other rows, as often as they were run.
    pub others: Mutex<Vec<i64>>,
    changed: Notify,
}

fn total(event: &Event) -> i64 {
    let total = &event.new.as_ref().expect("an INSERT")["total"];
    total
        .as_i64()
        .or_else(|| total.as_str().and_then(|s| s.parse().ok()))
        .expect("total")
}

#[async_trait]
impl Action for Poison {
    fn kind(&self) -> &'static str {
        "poison"
    }

    async fn execute(&self, event: &Event) -> Result<(), ActionError> {
        let total = total(event);
        if total == POISON_TOTAL {
            self.runs.fetch_add(1, Ordering::SeqCst);
            self.changed.notify_waiters();
            std::future::pending::<()>().await;
        }
        self.others.lock().unwrap().push(total);
        self.changed.notify_waiters();
        Ok(())
    }
}

impl Poison {
    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// The distinct totals of the other rows run so far.
    pub fn others_seen(&self) -> Vec<i64> {
        let mut seen = self.others.lock().unwrap().clone();
        seen.sort_unstable();
        seen.dedup();
        seen
    }

    pub async fn wait_until(&self, what: &str, check: impl Fn(&Poison) -> bool) {
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let notified = self.changed.notified();
                if check(self) {
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }
}

/// One observer of `Order` INSERTs whose action is `poison`, dead letters into `dlq`.
pub fn engine(poison: &Arc<Poison>, dlq: &Arc<MemoryDlq>) -> Arc<Engine> {
    let spec = ObserverSpec::new(
        ListenerConfig::new("poisoned", CheckpointStrategy::AtLeastOnce),
        "Order",
        EventKind::Insert,
    )
    .action(poison.clone() as Arc<dyn Action>);
    Arc::new(
        Engine::new(
            vec![spec],
            dlq.clone(),
            &MemoryIdempotencyStores::default(),
            Arc::new(Metrics::new()),
        )
        .unwrap(),
    )
}

/// The dead letter a poison change gets on the start after its third run.
pub const DEAD_LETTER_REASON: &str = "the engine stopped (killed or crashed) while processing \
                                      it at least 3 times; dead-lettered without running it \
                                      again";

/// Waits until `dlq` holds an entry.
pub async fn wait_for_a_dead_letter(dlq: &MemoryDlq) {
    use fraiseql_observers::DeadLetterQueue as _;
    tokio::time::timeout(Duration::from_secs(60), async {
        while dlq.len().await.unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the poison row is dead-lettered");
}
