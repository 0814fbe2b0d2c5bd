//! The host-provided key-value store that holds everything that must outlive one
//! message: bindings, last registration IPs, alert throttles, the nonce secret.
//!
//! It is the host's so that every worker of the proxy sees the same state, a reload of
//! the configuration or of the `.wasm` keeps it, and the host can replicate it with its
//! own machinery (Envoy shared data, Kamailio htable + DMQ).

/// A failure of the host store. The policy fails closed on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(pub String);

/// Keys are short ASCII strings; values are opaque bytes (JSON in practice, so an
/// operator can read them with `kamcmd htable.dump` or the Envoy admin page).
pub trait Store {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    fn delete(&mut self, key: &str) -> Result<(), StoreError>;
}

/// A plain in-memory store: the reference host's default and the tests' state.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    pub entries: std::collections::BTreeMap<String, Vec<u8>>,
}

impl Store for MemoryStore {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.entries.get(key).cloned())
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.entries.insert(key.to_string(), value.to_vec());
        Ok(())
    }

    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        self.entries.remove(key);
        Ok(())
    }
}

/// Store keys, in one place so hosts and docs agree on them.
pub mod keys {
    pub const NONCE_SECRET: &str = "tg/nonce_secret";
    /// Trunk groups with open alert windows (`src/alert.rs`).
    pub const OPEN_THROTTLES: &str = "tg/throttles";

    /// One trunk group's open alert windows.
    pub fn open_throttles(trunk: &str) -> String {
        format!("tg/throttles/{trunk}")
    }

    pub fn binding(trunk: &str) -> String {
        format!("tg/binding/{trunk}")
    }

    pub fn last_reg_ip(trunk: &str) -> String {
        format!("tg/last_reg_ip/{trunk}")
    }

    /// One slot of the password-guessing counts per source (`src/lockout.rs`).
    pub fn lockout_source(slot: u32) -> String {
        format!("tg/lockout/src/{slot}")
    }

    /// Failed answers against one trunk group's username.
    pub fn lockout_trunk(trunk: &str) -> String {
        format!("tg/lockout/tg/{trunk}")
    }

    /// One slot of the replay set (`src/replay.rs`).
    pub fn replay_slot(slot: u32) -> String {
        format!("tg/nc/{slot}")
    }

    pub fn throttle(trunk: &str, kind: &str, source_ip: &str) -> String {
        format!("tg/throttle/{trunk}/{kind}/{source_ip}")
    }
}
