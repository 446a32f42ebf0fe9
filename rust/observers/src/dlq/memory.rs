use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{DeadLetterQueue, DlqEntry, PushOutcome, RetryFailure};
use crate::error::Result;

/// Dead-letter queue in process memory, used when no database is configured.
#[derive(Debug)]
pub struct MemoryDlq {
    max_size: Option<usize>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    entries: BTreeMap<u64, DlqEntry>,
}

impl MemoryDlq {
    pub fn new(max_size: Option<usize>) -> Self {
        MemoryDlq {
            max_size,
            inner: Mutex::new(Inner {
                next_id: 1,
                entries: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("dlq lock")
    }
}

#[async_trait]
impl DeadLetterQueue for MemoryDlq {
    async fn push(&self, mut entry: DlqEntry) -> Result<PushOutcome> {
        let mut inner = self.lock();
        if self.max_size.is_some_and(|max| inner.entries.len() >= max) {
            return Ok(PushOutcome::Overflow);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        entry.id = id;
        inner.entries.insert(id, entry);
        Ok(PushOutcome::Stored(id))
    }

    async fn list(&self, limit: usize) -> Result<Vec<DlqEntry>> {
        Ok(self.lock().entries.values().take(limit).cloned().collect())
    }

    async fn search(&self, text: &str, limit: usize) -> Result<Vec<DlqEntry>> {
        let lowercase = text.to_lowercase();
        Ok(self
            .lock()
            .entries
            .values()
            .rev()
            .filter(|e| e.contains(&lowercase))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn get(&self, id: u64) -> Result<Option<DlqEntry>> {
        Ok(self.lock().entries.get(&id).cloned())
    }

    async fn record_failure(&self, id: u64, failure: &RetryFailure) -> Result<bool> {
        let mut inner = self.lock();
        let Some(entry) = inner.entries.get_mut(&id) else {
            return Ok(false);
        };
        entry.error.clone_from(&failure.error);
        entry.attempts = failure.attempts;
        entry.last_failed_at.clone_from(&failure.last_failed_at);
        Ok(true)
    }

    async fn remove(&self, id: u64) -> Result<bool> {
        Ok(self.lock().entries.remove(&id).is_some())
    }

    async fn purge(&self) -> Result<usize> {
        let mut inner = self.lock();
        let n = inner.entries.len();
        inner.entries.clear();
        Ok(n)
    }

    async fn len(&self) -> Result<usize> {
        Ok(self.lock().entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind};

    fn entry(n: u32) -> DlqEntry {
        DlqEntry {
            id: 0,
            origin: Default::default(),
            raw: None,
            event: Event::new("Order", EventKind::Insert, "tb_order", None, None),
            observer: format!("obs{n}"),
            action_index: 0,
            action: "webhook".into(),
            error: "boom".into(),
            attempts: n,
            first_failed_at: String::new(),
            last_failed_at: String::new(),
        }
    }

    #[tokio::test]
    async fn full_queue_drops_the_newest_and_keeps_the_oldest() {
        let dlq = MemoryDlq::new(Some(2));
        assert_eq!(dlq.push(entry(1)).await.unwrap(), PushOutcome::Stored(1));
        assert_eq!(dlq.push(entry(2)).await.unwrap(), PushOutcome::Stored(2));
        assert_eq!(dlq.push(entry(3)).await.unwrap(), PushOutcome::Overflow);
        let kept: Vec<_> = dlq
            .list(10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.observer)
            .collect();
        assert_eq!(kept, ["obs1", "obs2"]);
        assert!(dlq.remove(1).await.unwrap());
        assert_eq!(dlq.push(entry(4)).await.unwrap(), PushOutcome::Stored(3));
        assert_eq!(dlq.purge().await.unwrap(), 2);
        assert_eq!(dlq.len().await.unwrap(), 0);
    }
}
