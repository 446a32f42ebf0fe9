use std::collections::HashSet;
use std::sync::Mutex;

use async_trait::async_trait;

use super::IdempotencyStore;
use crate::error::Result;

/// Process-local idempotency keys: deduplicates within one engine (in_memory backend, tests).
#[derive(Debug, Default)]
pub struct MemoryIdempotencyStore {
    keys: Mutex<HashSet<(String, String)>>,
}

impl MemoryIdempotencyStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.keys.lock().expect("idempotency lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl IdempotencyStore for MemoryIdempotencyStore {
    async fn is_duplicate(&self, listener_id: &str, key: &str) -> Result<bool> {
        let keys = self.keys.lock().expect("idempotency lock");
        Ok(keys.contains(&(listener_id.to_owned(), key.to_owned())))
    }

    async fn record_idempotency_key(&self, listener_id: &str, key: &str) -> Result<bool> {
        let mut keys = self.keys.lock().expect("idempotency lock");
        Ok(keys.insert((listener_id.to_owned(), key.to_owned())))
    }

    async fn forget(&self, listener_id: &str, key: &str) -> Result<()> {
        let mut keys = self.keys.lock().expect("idempotency lock");
        keys.remove(&(listener_id.to_owned(), key.to_owned()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{is_duplicate, record_idempotency_key};

    #[tokio::test]
    async fn second_record_of_a_key_reports_duplicate() {
        let store = MemoryIdempotencyStore::new();
        assert!(!is_duplicate(&store, "billing", "evt-1").await.unwrap());
        assert!(record_idempotency_key(&store, "billing", "evt-1")
            .await
            .unwrap());
        assert!(!record_idempotency_key(&store, "billing", "evt-1")
            .await
            .unwrap());
        assert!(is_duplicate(&store, "billing", "evt-1").await.unwrap());
        // Keys are per listener.
        assert!(record_idempotency_key(&store, "shipping", "evt-1")
            .await
            .unwrap());
        store.forget("billing", "evt-1").await.unwrap();
        assert!(!is_duplicate(&store, "billing", "evt-1").await.unwrap());
    }
}
