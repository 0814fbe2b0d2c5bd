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
///
/// Built by concatenation rather than `format!`: several are made for every
/// authenticated request, and the formatting machinery cost more than the rest of the
/// key's work (docs/performance.md, "The policy, per message").
pub mod keys {
    pub const NONCE_SECRET: &str = "tg/nonce_secret";
    /// Trunk groups with open alert windows (`src/alert.rs`).
    pub const OPEN_THROTTLES: &str = "tg/throttles";

    fn join(parts: &[&str]) -> String {
        parts.concat()
    }

    fn numbered(prefix: &str, n: u32) -> String {
        let mut digits = itoa::Buffer::new();
        join(&[prefix, digits.format(n)])
    }

    /// One trunk group's open alert windows.
    pub fn open_throttles(trunk: &str) -> String {
        join(&["tg/throttles/", trunk])
    }

    pub fn binding(trunk: &str) -> String {
        join(&["tg/binding/", trunk])
    }

    pub fn last_reg_ip(trunk: &str) -> String {
        join(&["tg/last_reg_ip/", trunk])
    }

    /// One slot of the password-guessing counts per source (`src/lockout.rs`).
    pub fn lockout_source(slot: u32) -> String {
        numbered("tg/lockout/src/", slot)
    }

    /// Failed answers against one trunk group's username.
    pub fn lockout_trunk(trunk: &str) -> String {
        join(&["tg/lockout/tg/", trunk])
    }

    /// One slot of the replay set (`src/replay.rs`).
    pub fn replay_slot(slot: u32) -> String {
        numbered("tg/nc/", slot)
    }

    pub fn throttle(trunk: &str, kind: &str, source_ip: &str) -> String {
        join(&["tg/throttle/", trunk, "/", kind, "/", source_ip])
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn keys_read_as_documented() {
            assert_eq!(super::binding("hq"), "tg/binding/hq");
            assert_eq!(super::last_reg_ip("hq"), "tg/last_reg_ip/hq");
            assert_eq!(super::open_throttles("hq"), "tg/throttles/hq");
            assert_eq!(super::lockout_source(0), "tg/lockout/src/0");
            assert_eq!(
                super::lockout_source(4_294_967_295),
                "tg/lockout/src/4294967295"
            );
            assert_eq!(super::lockout_trunk("hq"), "tg/lockout/tg/hq");
            assert_eq!(super::replay_slot(17), "tg/nc/17");
            assert_eq!(
                super::throttle("hq", "blocked_call", "192.0.2.1"),
                "tg/throttle/hq/blocked_call/192.0.2.1"
            );
        }
    }
}
