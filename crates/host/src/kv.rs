//! Host-side state stores behind the module's kv_* imports.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

pub use trunkguard::store::StoreError;

/// A key-value store the module's state lives in. Errors ([`StoreError`], the
/// core's) are reported to the module, which then fails closed.
pub trait KvBackend: Send {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    fn delete(&mut self, key: &str) -> Result<(), StoreError>;
}

/// In-memory store; clones share the same map, as the workers of one process do.
#[derive(Debug, Clone, Default)]
pub struct MemoryKv {
    map: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

impl MemoryKv {
    /// A copy of every entry (for inspection and tests).
    pub fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        self.map.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

impl KvBackend for MemoryKv {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let map = self
            .map
            .lock()
            .map_err(|_| StoreError("store lock poisoned".into()))?;
        Ok(map.get(key).cloned())
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut map = self
            .map
            .lock()
            .map_err(|_| StoreError("store lock poisoned".into()))?;
        map.insert(key.to_string(), value.to_vec());
        Ok(())
    }

    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        let mut map = self
            .map
            .lock()
            .map_err(|_| StoreError("store lock poisoned".into()))?;
        map.remove(key);
        Ok(())
    }
}
