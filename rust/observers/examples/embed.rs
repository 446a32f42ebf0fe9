//! Embedding the engine in a Rust application, with a native action.
//!
//! `cargo run -p fraiseql_observers --example embed` runs it on the in-memory backend: it
//! needs no service. With `DATABASE_URL` set,
//! `cargo run -p fraiseql_observers --example embed -- postgres` reads the PostgreSQL change
//! log of that database instead, until Ctrl-C: insert rows into `tb_order` from psql and
//! watch them arrive (change capture is installed on start).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use fraiseql_observers::runtime::{self, Instruments, StartOptions};
use fraiseql_observers::{
    Action, ActionError, Backend, CheckpointStrategy, Condition, Config, EntityDef, Event,
    EventKind, ListenerConfig, ObserverSpec, Schema,
};
use serde_json::json;

/// The native action: anything that implements [`Action`].
struct ChargeCustomer {
    charged: AtomicUsize,
}

#[async_trait]
impl Action for ChargeCustomer {
    fn kind(&self) -> &'static str {
        "charge"
    }

    async fn execute(&self, event: &Event) -> Result<(), ActionError> {
        let row = event.row().cloned().unwrap_or_default();
        self.charged.fetch_add(1, Ordering::Relaxed);
        println!(
            "charged {} for order {} (event {})",
            row["total"], row["id"], event.id
        );
        Ok(())
    }
}

#[tokio::main]
async fn main() -> fraiseql_observers::Result<()> {
    let postgres = std::env::args().nth(1).as_deref() == Some("postgres");
    let mut config = Config::default_with_backend(if postgres {
        Backend::Postgres
    } else {
        Backend::InMemory
    });
    config.database.url = std::env::var("DATABASE_URL").ok().filter(|_| postgres);
    let schema = Schema::new(vec![EntityDef {
        name: "Order".into(),
        table: "tb_order".into(),
        fields: vec!["id".into(), "total".into()],
        kinds: Vec::new(),
    }])?;

    // Default: fast, no deduplication. Effectively-once records an idempotency key (here in
    // memory; with a database, in this table) before the action runs.
    let _fast = CheckpointStrategy::AtLeastOnce;
    let strategy = CheckpointStrategy::EffectivelyOnce {
        idempotency_table: "fraiseql_observer_idempotency".to_string(),
    };
    let action = Arc::new(ChargeCustomer {
        charged: AtomicUsize::new(0),
    });
    let observer = ObserverSpec::new(
        ListenerConfig::new("charge_customer", strategy),
        "Order",
        EventKind::Insert,
    )
    .condition(Condition::compile("total > 1000", Some(&["id".into(), "total".into()])).unwrap())
    .action(action.clone());

    let instruments = Instruments::for_config(&config);
    let running = runtime::start(
        &config,
        &schema,
        vec![observer],
        &instruments,
        &StartOptions::default(),
    )
    .await?;

    if let Some(memory) = running.memory() {
        for (id, total) in [("ord_1", 1250), ("ord_2", 90), ("ord_3", 4000)] {
            let mut event = Event::new(
                "Order",
                EventKind::Insert,
                "tb_order",
                Some(json!({"id": id, "total": total})),
                None,
            );
            event.id = format!("order-{id}-created");
            memory.emit(event.clone()).await?;
            if id == "ord_3" {
                memory.emit(event).await?; // the same change delivered twice: charged once
            }
        }
        memory.drain().await;
    } else {
        println!("reading the change log; insert into tb_order, Ctrl-C to stop");
        let _ = tokio::signal::ctrl_c().await;
    }
    running.stop().await;
    let dead = running.dead_letters().list(10).await?.len();
    println!(
        "{} charge(s), {dead} dead letter(s)",
        action.charged.load(Ordering::Relaxed)
    );
    Ok(())
}
