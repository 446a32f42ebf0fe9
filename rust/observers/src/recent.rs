//! The last events an engine processed and what each observer did with them: what the
//! console's "recent events" shows. Kept only when asked for ([`Engine::with_recent`]), in a
//! ring of fixed size, without the rows (they may hold what the console must not show).
//!
//! [`Engine::with_recent`]: crate::engine::Engine::with_recent

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use chrono::{DateTime, SecondsFormat, Utc};

use crate::event::{Event, EventKind};

/// What one observer did with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Its condition did not match.
    NoMatch,
    /// EffectivelyOnce: processed before, skipped.
    Duplicate,
    /// Every action succeeded.
    Delivered,
    /// An action used up its attempts: the event is in the dead-letter queue.
    DeadLettered,
    /// An action failed and its dead letter could not be stored: delivered again later.
    Unstored,
}

/// One processed event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecentEvent {
    pub id: String,
    pub entity: String,
    pub event: EventKind,
    /// The row's `id`, if it has one.
    pub key: Option<String>,
    /// When the change happened (the event's timestamp).
    pub timestamp: String,
    /// When processing finished.
    pub processed_at: String,
    pub duration_ms: f64,
    pub backfill: bool,
    /// Each observer of its entity and kind, in definition order; empty when none observes it.
    pub outcomes: Vec<ObserverOutcome>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObserverOutcome {
    pub observer: String,
    pub outcome: Outcome,
}

/// Keys longer than this are cut (with `…`): a ring of large keys must not hold megabytes.
const MAX_KEY_CHARS: usize = 200;

fn shortened(key: String) -> String {
    match key.char_indices().nth(MAX_KEY_CHARS) {
        Some((at, _)) => format!("{}…", &key[..at]),
        None => key,
    }
}

/// The ring of recent events.
pub(crate) struct Recent {
    capacity: usize,
    /// Each with when it was processed, formatted only when read (off the per-event path).
    events: Mutex<VecDeque<(DateTime<Utc>, RecentEvent)>>,
}

impl Recent {
    pub(crate) fn new(capacity: usize) -> Recent {
        Recent {
            capacity: capacity.max(1),
            events: Mutex::new(VecDeque::with_capacity(capacity.max(1))),
        }
    }

    pub(crate) fn record(&self, event: &Event, started: Instant, outcomes: Vec<ObserverOutcome>) {
        let recent = RecentEvent {
            id: event.id.clone(),
            entity: event.entity.clone(),
            event: event.event,
            key: event.key().map(shortened),
            timestamp: event.timestamp.clone(),
            processed_at: String::new(),
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            backfill: event.backfill.is_some(),
            outcomes,
        };
        let mut events = self.events.lock().expect("recent events lock");
        if events.len() == self.capacity {
            events.pop_front();
        }
        events.push_back((Utc::now(), recent));
    }

    /// Newest first, at most `limit`.
    pub(crate) fn newest(&self, limit: usize) -> Vec<RecentEvent> {
        let events = self.events.lock().expect("recent events lock");
        events
            .iter()
            .rev()
            .take(limit)
            .map(|(at, recent)| RecentEvent {
                processed_at: at.to_rfc3339_opts(SecondsFormat::Micros, true),
                ..recent.clone()
            })
            .collect()
    }
}
