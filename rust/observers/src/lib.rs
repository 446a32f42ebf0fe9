//! `fraiseql_observers`: the native observer engine of fraiseql.
//!
//! Pure Rust with no Python in it and no runtime of its own: everything async runs on the
//! caller's tokio runtime. The PyO3 binding lives in the `fraiseql-python` crate.

pub mod action;
pub mod bridge;
pub mod capture;
pub mod checkpoint;
pub mod condition;
pub mod config;
pub mod console;
pub mod database;
pub mod dlq;
pub mod engine;
pub mod error;
pub mod event;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod order;
pub mod recent;
pub mod redact;
pub mod retry;
pub mod runtime;
pub mod schema;
pub mod status;
pub mod telemetry;
pub mod transport;

pub use action::{Action, ActionError, FailureReason, NoopAction};
pub use capture::CaptureOptions;
pub use checkpoint::{
    is_duplicate, record_idempotency_key, CheckpointStrategy, ClaimStamp, IdempotencyStore,
    IdempotencyStores, ListenerConfig, MemoryIdempotencyStore, MemoryIdempotencyStores,
};
pub use checkpoint::{PgIdempotencyStore, PgIdempotencyStores};
pub use condition::{Condition, ConditionError};
pub use config::{Backend, Config, ConfigError, ConfigErrors};
pub use dlq::{DeadLetterQueue, DlqEntry, MemoryDlq, PgDeadLetterQueue};
pub use engine::{Engine, ObserverSpec, ProcessReport};
pub use error::{Error, Result};
pub use event::{Event, EventKind};
pub use metrics::Metrics;
pub use metrics::RedisMetrics;
pub use retry::RetryPolicy;
pub use runtime::{DeadLetters, Instruments, Running, StartOptions};
pub use schema::{EntityDef, Schema};
pub use transport::memory::MemoryTransport;
pub use transport::nats::{NatsHealth, NatsMetrics, NatsPublisher, NatsSource};
pub use transport::postgres::{PostgresOptions, PostgresSource};
pub use transport::redis::{RedisHealth, RedisPublisher, RedisSource};
