//! The core's store over Envoy shared data, with compare-and-swap.
//!
//! Every worker thread has its own VM, and all of them (and a reloaded VM) see one
//! shared-data map per `vm_id`. The core reads a value, decides, and writes it back
//! (an alert window's count, the list of open windows), so two workers could each
//! overwrite the other's update. A [`Txn`] therefore buffers the writes of one call
//! into the core and commits them only if nothing it read has changed since (the CAS
//! Envoy keeps per key); on a conflict the whole call runs again on fresh state
//! ([`run`]). Alerts raised by a call are handed out only once it committed, so a
//! retried call does not alert twice.

use std::collections::BTreeMap;

use trunkguard::alert::Alert;
use trunkguard::engine::Host;
use trunkguard::store::{Store, StoreError, keys};

/// Envoy's shared data and entropy, as the store needs them.
pub trait Backend {
    /// The value (`None` when absent or emptied) and its CAS (0: the key never
    /// existed).
    fn get(&mut self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError>;
    /// Writes `value` if the key's CAS is still `cas` (0: unconditionally).
    /// `Ok(false)`: the CAS did not match, nothing was written.
    fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<bool, StoreError>;
    fn fill_random(&mut self, buf: &mut [u8]);
}

/// Tries of one call before it fails closed as a store failure.
pub const ATTEMPTS: usize = 4;

/// One call's view of the shared data.
pub struct Txn<'b, B: Backend> {
    backend: &'b mut B,
    /// Value and CAS of every key read, as read.
    reads: BTreeMap<String, (Option<Vec<u8>>, u32)>,
    /// `None`: delete (Envoy's shared data cannot remove a key; it is emptied).
    writes: BTreeMap<String, Option<Vec<u8>>>,
    alerts: Vec<Vec<u8>>,
}

/// Why a call did not commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("state store: still conflicting after {ATTEMPTS} tries")]
    Conflict,
}

impl<'b, B: Backend> Txn<'b, B> {
    pub fn new(backend: &'b mut B) -> Self {
        Txn {
            backend,
            reads: BTreeMap::new(),
            writes: BTreeMap::new(),
            alerts: Vec::new(),
        }
    }

    /// Writes the buffered values unless a key read has changed meanwhile.
    /// `Ok(false)`: a conflict; nothing of this call is kept.
    ///
    /// Every key is first checked (and its value before the commit kept), then
    /// written with its CAS. Shared data locks per operation, so another worker can
    /// still slip in between two writes of one commit and the CAS then refuses the
    /// second; and a store can fail between two writes. Either way the writes already
    /// made are put back as they were, so that one decision is never half kept (a
    /// registration's binding without its last registration IP, say): the call then
    /// runs again on fresh state, or fails closed.
    pub fn commit(&mut self) -> Result<bool, StoreError> {
        let mut before: Vec<(&str, Option<Vec<u8>>)> = Vec::with_capacity(self.writes.len());
        for key in self.writes.keys() {
            let (value, now) = self.backend.get(key)?;
            if let Some((_, seen)) = self.reads.get(key) {
                if now != *seen {
                    return Ok(false);
                }
            }
            before.push((key, value));
        }
        for (done, (key, value)) in self.writes.iter().enumerate() {
            let (existed, cas) = match self.reads.get(key) {
                Some((v, cas)) => (v.is_some() || *cas != 0, *cas),
                None => (true, 0),
            };
            if value.is_none() && !existed {
                continue;
            }
            let value = value.as_deref().unwrap_or_default();
            let written = self.backend.set(key, value, cas);
            if !matches!(written, Ok(true)) {
                for (key, old) in &before[..done] {
                    // Best effort: the store may be failing for these too.
                    let _ = self.backend.set(key, old.as_deref().unwrap_or_default(), 0);
                }
                return written;
            }
        }
        Ok(true)
    }
}

impl<B: Backend> Store for Txn<'_, B> {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.writes.get(key) {
            return Ok(v.clone());
        }
        if let Some((v, _)) = self.reads.get(key) {
            return Ok(v.clone());
        }
        let (v, cas) = self.backend.get(key)?;
        self.reads.insert(key.to_owned(), (v.clone(), cas));
        Ok(v)
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        if key == keys::NONCE_SECRET {
            // The core writes the secret once and reads it back to converge with
            // racing workers: that needs the write to happen now.
            self.backend.set(key, value, 0)?;
            self.reads.remove(key);
            return Ok(());
        }
        self.writes.insert(key.to_owned(), Some(value.to_vec()));
        Ok(())
    }

    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        self.writes.insert(key.to_owned(), None);
        Ok(())
    }
}

impl<B: Backend> Host for Txn<'_, B> {
    fn alert(&mut self, alert: &Alert) {
        if let Ok(json) = serde_json::to_vec(alert) {
            self.alerts.push(json);
        }
    }

    fn fill_random(&mut self, buf: &mut [u8]) {
        self.backend.fill_random(buf);
    }
}

/// Runs `call` against the shared data until it commits without conflict, at most
/// [`ATTEMPTS`] times. Returns its result and the alerts (JSON) it raised.
pub fn run<B: Backend, T>(
    backend: &mut B,
    mut call: impl FnMut(&mut Txn<'_, B>) -> T,
) -> Result<(T, Vec<Vec<u8>>), TxnError> {
    for _ in 0..ATTEMPTS {
        let mut txn = Txn::new(backend);
        let value = call(&mut txn);
        if txn.commit()? {
            return Ok((value, txn.alerts));
        }
    }
    Err(TxnError::Conflict)
}

/// Key -> (value, CAS), as Envoy keeps shared data.
#[cfg(test)]
type Entries = BTreeMap<String, (Vec<u8>, u32)>;

/// An in-memory [`Backend`] with Envoy's CAS rules, for tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct MemoryBackend {
    pub entries: Entries,
    pub next_cas: u32,
    /// Called before every `set`: lets a test act as another worker.
    pub before_set: Option<fn(&mut Entries)>,
    /// The `set` that fails as a broken store would (1: the next one).
    pub fail_set: Option<u32>,
}

#[cfg(test)]
impl Backend for MemoryBackend {
    fn get(&mut self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        Ok(match self.entries.get(key) {
            Some((v, cas)) => ((!v.is_empty()).then(|| v.clone()), *cas),
            None => (None, 0),
        })
    }

    fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<bool, StoreError> {
        if let Some(f) = self.before_set.take() {
            f(&mut self.entries);
        }
        if let Some(n) = self.fail_set {
            self.fail_set = (n > 1).then(|| n - 1);
            if n == 1 {
                return Err(StoreError("injected".into()));
            }
        }
        if let Some((_, current)) = self.entries.get(key) {
            if cas != 0 && cas != *current {
                return Ok(false);
            }
        }
        self.next_cas += 1;
        self.entries
            .insert(key.to_owned(), (value.to_vec(), self.next_cas));
        Ok(true)
    }

    fn fill_random(&mut self, buf: &mut [u8]) {
        buf.fill(7);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bump(store: &mut dyn Store, key: &str) -> Result<(), StoreError> {
        let n = store
            .get(key)?
            .and_then(|v| String::from_utf8(v).ok()?.parse::<u32>().ok())
            .unwrap_or(0);
        store.set(key, (n + 1).to_string().as_bytes())
    }

    #[test]
    fn writes_are_buffered_read_back_and_committed() {
        let mut b = MemoryBackend::default();
        let ((), alerts) = run(&mut b, |t| {
            bump(t, "k").unwrap();
            bump(t, "k").unwrap();
            assert_eq!(t.get("gone").unwrap(), None);
            t.delete("gone").unwrap();
        })
        .unwrap();
        assert!(alerts.is_empty());
        assert_eq!(b.entries.get("k").map(|e| e.0.clone()), Some(b"2".to_vec()));
        assert!(
            !b.entries.contains_key("gone"),
            "deleting an absent key writes nothing"
        );
    }

    #[test]
    fn a_concurrent_update_makes_the_call_run_again_on_fresh_state() {
        let mut b = MemoryBackend::default();
        b.entries.insert("k".into(), (b"5".to_vec(), 1));
        b.next_cas = 1;
        // Another worker bumps k between our read and our commit, once.
        b.before_set = Some(|e| {
            e.insert("k".into(), (b"6".to_vec(), 99));
        });
        let mut calls = 0;
        run(&mut b, |t| {
            calls += 1;
            bump(t, "k").unwrap();
        })
        .unwrap();
        assert_eq!(calls, 2);
        assert_eq!(b.entries.get("k").map(|e| e.0.clone()), Some(b"7".to_vec()));
    }

    #[test]
    fn a_key_created_meanwhile_is_a_conflict_too() {
        let mut b = MemoryBackend::default();
        let mut calls = 0;
        let ((), _) = run(&mut b, |t| {
            calls += 1;
            if calls == 1 {
                assert_eq!(t.get("k").unwrap(), None);
                t.backend.entries.insert("k".into(), (b"1".to_vec(), 50));
                t.set("k", b"mine").unwrap();
            } else {
                bump(t, "k").unwrap();
            }
        })
        .unwrap();
        assert_eq!(b.entries.get("k").map(|e| e.0.clone()), Some(b"2".to_vec()));
    }

    fn two_writes(t: &mut Txn<'_, MemoryBackend>) {
        t.get("a").unwrap();
        t.get("b").unwrap();
        t.set("a", b"new-a").unwrap();
        t.set("b", b"new-b").unwrap();
    }

    fn values(b: &MemoryBackend) -> Vec<(String, Vec<u8>)> {
        b.entries
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    }

    #[test]
    fn a_store_failing_between_two_writes_keeps_neither() {
        let mut b = MemoryBackend::default();
        b.entries.insert("a".into(), (b"old-a".to_vec(), 1));
        b.next_cas = 1;
        let before = values(&b);
        b.fail_set = Some(2);
        let r = run(&mut b, two_writes);
        assert!(matches!(r, Err(TxnError::Store(_))), "{r:?}");
        let after: Vec<_> = values(&b)
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .collect();
        assert_eq!(after, before, "the first write was put back");
        run(&mut b, two_writes).unwrap();
        assert_eq!(b.entries["b"].0, b"new-b");
    }

    #[test]
    fn a_conflict_between_two_writes_keeps_neither_before_the_rerun() {
        let mut b = MemoryBackend::default();
        b.entries.insert("a".into(), (b"old-a".to_vec(), 1));
        b.entries.insert("b".into(), (b"old-b".to_vec(), 2));
        b.next_cas = 2;
        let mut t = Txn::new(&mut b);
        two_writes(&mut t);
        // Another worker writes b after our check, before our write of b.
        t.backend.before_set = Some(|e| {
            if let Some(b) = e.get_mut("b") {
                b.1 = 77;
            }
        });
        // before_set fires on the first set (a): b's CAS then no longer matches.
        assert_eq!(t.commit(), Ok(false));
        assert_eq!(b.entries["a"].0, b"old-a", "a was put back");
    }

    #[test]
    fn endless_conflicts_fail_closed_and_emptied_keys_read_as_absent() {
        let mut b = MemoryBackend::default();
        b.entries.insert("e".into(), (Vec::new(), 3));
        let r = run(&mut b, |t| {
            assert_eq!(t.get("e").unwrap(), None);
            t.get("k").unwrap();
            let cas = t.backend.next_cas + 100;
            t.backend.entries.insert("k".into(), (b"x".to_vec(), cas));
            t.backend.next_cas = cas;
            t.set("k", b"y").unwrap();
        });
        assert_eq!(r, Err(TxnError::Conflict));
    }
}
