//! Prometheus metrics of the engine (`fraiseql_observer_*`). Per-observer handles are
//! resolved once at build time so the hot path only bumps atomics.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::action::FailureReason;

type Labels = Vec<(String, String)>;

/// Upper bounds of the action-duration buckets, in seconds: from 1 ms (a webhook to a
/// nearby sink, a Python handler; the benches measure 0.1–0.2 ms on loopback) to 30 s (a
/// webhook's default timeout is 10 s; SMTP and slow handlers take seconds), about ×4 apart:
/// nine buckets and +Inf instead of the twenty of a ×2 series.
pub const ACTION_DURATION_BUCKETS: [f64; 9] =
    [0.001, 0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 30.0];

fn action_latency_histogram() -> Histogram {
    Histogram::new(ACTION_DURATION_BUCKETS)
}

/// Threads running a host-language handler that outlived its timeout, left to finish on
/// their own and replaced (`fraiseql_observer_handler_threads_abandoned_total`). Process-wide:
/// the handlers' thread pool is.
pub fn abandoned_handler_threads() -> &'static Counter {
    static COUNTER: std::sync::OnceLock<Counter> = std::sync::OnceLock::new();
    COUNTER.get_or_init(Counter::default)
}

pub struct Metrics {
    registry: Registry,
    pub events_received: Counter,
    pub events_matched: Family<Labels, Counter>,
    pub duplicates_skipped: Family<Labels, Counter>,
    pub actions_succeeded: Family<Labels, Counter>,
    pub actions_failed: Family<Labels, Counter>,
    pub actions_retried: Family<Labels, Counter>,
    pub action_duration: Family<Labels, Histogram, fn() -> Histogram>,
    pub dlq_size: Gauge,
    pub dlq_overflow: Counter,
    pub events_in_flight: Gauge,
    /// Change-log rows after the postgres source's cursor (capped, see the source).
    pub changelog_lag_rows: Gauge,
    /// Age of the oldest change-log row not yet processed; 0 when caught up.
    pub changelog_lag_seconds: Gauge<f64, AtomicU64>,
    /// Bytes of WAL the logical-capture slot keeps on the server.
    pub slot_retained_wal_bytes: Gauge,
    /// Bytes of WAL between the server's position and the slot's confirmed one.
    pub slot_lag_bytes: Gauge,
    /// Batches the postgres source read and processed.
    pub source_batches: Counter,
    /// Change-log rows or messages that could not be decoded (dead-lettered).
    pub source_undecodable: Counter,
    /// 1 while the source is stalled (`/health` 503 for it): a trigger reader whose cursor
    /// has not moved for `stall_warning_secs` with changes pending, or a slot past
    /// `max_retained_wal`.
    pub source_stalled: Gauge,
    /// Changes whose `traceparent` was not a W3C trace context (delivered without it).
    pub traceparent_invalid: Counter,
    /// Changes without a field an observer reads, by observer and field (schema drift).
    pub missing_fields: Family<Labels, Counter>,
}

/// The handles one (observer, action) pair updates. Failures are counted per reason, so
/// those counters are looked up when a failure happens (off the success path).
#[derive(Clone)]
pub struct ActionMetrics {
    pub succeeded: Counter,
    pub duration: Histogram,
    labels: Labels,
    failed: Family<Labels, Counter>,
    retried: Family<Labels, Counter>,
}

impl ActionMetrics {
    fn with_reason(&self, reason: FailureReason) -> Labels {
        let mut labels = self.labels.clone();
        labels.push(("reason".to_owned(), reason.as_label().to_owned()));
        labels
    }

    /// An action that exhausted its retries or failed permanently.
    pub fn failed(&self, reason: FailureReason) {
        self.failed.get_or_create(&self.with_reason(reason)).inc();
    }

    /// An attempt that failed and will be retried.
    pub fn retried(&self, reason: FailureReason) {
        self.retried.get_or_create(&self.with_reason(reason)).inc();
    }

    /// Failures so far, of every reason.
    pub fn failed_total(&self) -> u64 {
        self.total(&self.failed)
    }

    /// Retried attempts so far, of every reason.
    pub fn retried_total(&self) -> u64 {
        self.total(&self.retried)
    }

    fn total(&self, family: &Family<Labels, Counter>) -> u64 {
        FailureReason::ALL
            .iter()
            .map(|&reason| family.get_or_create(&self.with_reason(reason)).get())
            .sum()
    }
}

/// The handles one observer updates.
#[derive(Clone)]
pub struct ObserverMetrics {
    pub matched: Counter,
    pub duplicates: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::new_with(|_| {})
    }

    /// With more metrics in the same registry (a transport's, e.g. `fraiseql_nats_*`), so
    /// one `/metrics` serves them all.
    pub fn new_with(extra: impl FnOnce(&mut Registry)) -> Self {
        Self::observers_and(Gauge::default(), Counter::default(), extra)
    }

    /// The observers' metrics (`fraiseql_observer_*`) over a dead-letter queue whose gauges
    /// are given (shared with a forwarder's metrics), and more in the same registry.
    fn observers_and(
        dlq_size: Gauge,
        dlq_overflow: Counter,
        extra: impl FnOnce(&mut Registry),
    ) -> Self {
        let mut registry = Registry::default();
        let m = Metrics::handles(dlq_size, dlq_overflow);
        m.register(&mut registry, "fraiseql_observer", true);
        let build_info = Family::<Labels, Gauge>::default();
        build_info
            .get_or_create(&vec![(
                "version".to_owned(),
                env!("CARGO_PKG_VERSION").to_owned(),
            )])
            .set(1);
        registry.register(
            "fraiseql_build_info",
            "The running fraiseql's version (always 1)",
            build_info,
        );
        extra(&mut registry);
        Metrics { registry, ..m }
    }

    /// The observers' metrics and a forwarder's (`fraiseql_forwarder_*`: the bridge's or the
    /// Redis forwarder's engine, whose observers publish), in one registry and sharing the
    /// dead-letter gauges (one queue), plus `extra`.
    pub fn with_forwarder(extra: impl FnOnce(&mut Registry)) -> (Self, Self) {
        let (dlq_size, dlq_overflow) = (Gauge::default(), Counter::default());
        let forwarder = Metrics::handles(dlq_size.clone(), dlq_overflow.clone());
        let observers = Self::observers_and(dlq_size, dlq_overflow, |registry| {
            forwarder.register(registry, "fraiseql_forwarder", false);
            extra(registry);
        });
        (observers, forwarder)
    }

    /// Handles only, registered nowhere.
    fn handles(dlq_size: Gauge, dlq_overflow: Counter) -> Self {
        Metrics {
            events_received: Counter::default(),
            events_matched: Family::default(),
            duplicates_skipped: Family::default(),
            actions_succeeded: Family::default(),
            actions_failed: Family::default(),
            actions_retried: Family::default(),
            action_duration: Family::new_with_constructor(action_latency_histogram),
            dlq_size,
            dlq_overflow,
            events_in_flight: Gauge::default(),
            changelog_lag_rows: Gauge::default(),
            changelog_lag_seconds: Gauge::default(),
            slot_retained_wal_bytes: Gauge::default(),
            slot_lag_bytes: Gauge::default(),
            source_batches: Counter::default(),
            source_undecodable: Counter::default(),
            source_stalled: Gauge::default(),
            traceparent_invalid: Counter::default(),
            missing_fields: Family::default(),
            registry: Registry::default(),
        }
    }

    /// Registers the families under `{prefix}_…`; the dead-letter gauges only with `dlq`.
    fn register(&self, registry: &mut Registry, prefix: &str, dlq: bool) {
        let name = |n: &str| format!("{prefix}_{n}");
        registry.register(
            name("events_received"),
            "Change events received by the engine",
            self.events_received.clone(),
        );
        registry.register(
            name("events_matched"),
            "Events whose entity, event and condition matched an observer",
            self.events_matched.clone(),
        );
        registry.register(
            name("duplicates_skipped"),
            "EffectivelyOnce deliveries skipped because the key was already recorded",
            self.duplicates_skipped.clone(),
        );
        registry.register(
            name("actions_succeeded"),
            "Actions that completed",
            self.actions_succeeded.clone(),
        );
        registry.register(
            name("actions_failed"),
            "Actions that exhausted their retries or failed permanently, by reason",
            self.actions_failed.clone(),
        );
        registry.register(
            name("actions_retried"),
            "Action attempts that failed and were retried, by reason",
            self.actions_retried.clone(),
        );
        registry.register(
            name("action_duration_seconds"),
            "Duration of one action attempt",
            self.action_duration.clone(),
        );
        if dlq {
            registry.register(
                name("dlq_size"),
                "Entries in the dead-letter queue",
                self.dlq_size.clone(),
            );
            registry.register(
                name("dlq_overflow"),
                "Dead-letter entries dropped because max_dlq_size was reached",
                self.dlq_overflow.clone(),
            );
        }
        registry.register(
            name("events_in_flight"),
            "Events accepted and not yet fully processed",
            self.events_in_flight.clone(),
        );
        registry.register(
            name("changelog_lag_rows"),
            "Change-log rows not yet processed by this instance's postgres source",
            self.changelog_lag_rows.clone(),
        );
        registry.register(
            name("changelog_lag_seconds"),
            "Age of the oldest change-log row not yet processed",
            self.changelog_lag_seconds.clone(),
        );
        registry.register(
            name("slot_retained_wal_bytes"),
            "Bytes of WAL the replication slot of logical capture keeps on the server",
            self.slot_retained_wal_bytes.clone(),
        );
        registry.register(
            name("slot_lag_bytes"),
            "Bytes of WAL between the server's position and the slot's confirmed one",
            self.slot_lag_bytes.clone(),
        );
        registry.register(
            name("source_batches"),
            "Change-log batches read and processed",
            self.source_batches.clone(),
        );
        registry.register(
            name("source_undecodable"),
            "Change-log rows or messages that could not be decoded and were dead-lettered",
            self.source_undecodable.clone(),
        );
        registry.register(
            name("source_stalled"),
            "1 while the source is stalled (a cursor that does not move, a slot past max_retained_wal)",
            self.source_stalled.clone(),
        );
        if dlq {
            registry.register(
                name("handler_threads_abandoned"),
                "Handler threads that outlived their timeout, left to finish and replaced",
                abandoned_handler_threads().clone(),
            );
        }
        registry.register(
            name("traceparent_invalid"),
            "Changes whose traceparent was not a W3C trace context and was dropped",
            self.traceparent_invalid.clone(),
        );
        registry.register(
            name("missing_fields"),
            "Changes without a field an observer's condition or template reads (a renamed or dropped column)",
            self.missing_fields.clone(),
        );
    }

    /// A change without `field`, which `observer` reads.
    pub fn missing_field(&self, observer: &str, field: &str) {
        let labels = vec![
            ("observer".to_owned(), observer.to_owned()),
            ("field".to_owned(), field.to_owned()),
        ];
        self.missing_fields.get_or_create(&labels).inc();
    }

    pub fn observer(&self, observer: &str) -> ObserverMetrics {
        let labels = vec![("observer".to_owned(), observer.to_owned())];
        ObserverMetrics {
            matched: self.events_matched.get_or_create(&labels).clone(),
            duplicates: self.duplicates_skipped.get_or_create(&labels).clone(),
        }
    }

    pub fn action(&self, observer: &str, action: &str) -> ActionMetrics {
        let labels = vec![
            ("observer".to_owned(), observer.to_owned()),
            ("action".to_owned(), action.to_owned()),
        ];
        // Every series at 0 from the start, so a fresh dashboard shows 0, not "no data".
        for reason in FailureReason::ALL {
            let mut with_reason = labels.clone();
            with_reason.push(("reason".to_owned(), reason.as_label().to_owned()));
            drop(self.actions_failed.get_or_create(&with_reason));
            drop(self.actions_retried.get_or_create(&with_reason));
        }
        ActionMetrics {
            succeeded: self.actions_succeeded.get_or_create(&labels).clone(),
            duration: self.action_duration.get_or_create(&labels).clone(),
            labels,
            failed: self.actions_failed.clone(),
            retried: self.actions_retried.clone(),
        }
    }

    /// Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Redis transport metrics (`fraiseql_redis_*`). Cheap to clone handles; register them once.
#[derive(Clone, Debug, Default)]
pub struct RedisMetrics {
    /// `fraiseql_redis_entries_forwarded_total`: change-log rows appended (XADD confirmed).
    pub forwarded: Counter,
    /// `fraiseql_redis_entries_received_total`: entries read or reclaimed from the group.
    pub received: Counter,
    /// `fraiseql_redis_entries_pending`: entries received and not yet acknowledged.
    pub pending: Gauge,
    /// `fraiseql_redis_entries_reclaimed_total`: entries taken over from an idle consumer.
    pub reclaimed: Counter,
    /// `fraiseql_redis_entries_dead_lettered_total`: malformed or over `max_deliver`.
    pub dead_lettered: Counter,
}

impl RedisMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every metric (counters get `_total` from the encoder).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "fraiseql_redis_entries_forwarded",
            "Change-log rows appended to the Redis stream",
            self.forwarded.clone(),
        );
        registry.register(
            "fraiseql_redis_entries_received",
            "Entries read from the Redis consumer group",
            self.received.clone(),
        );
        registry.register(
            "fraiseql_redis_entries_pending",
            "Entries received and not yet acknowledged",
            self.pending.clone(),
        );
        registry.register(
            "fraiseql_redis_entries_reclaimed",
            "Entries reclaimed from idle consumers",
            self.reclaimed.clone(),
        );
        registry.register(
            "fraiseql_redis_entries_dead_lettered",
            "Entries dead-lettered by the Redis transport (malformed or over max_deliver)",
            self.dead_lettered.clone(),
        );
    }
}
