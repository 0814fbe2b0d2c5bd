//! The policy's store, answered by the C module through Kamailio's htable API (so DMQ
//! replication and the write-through the module does keep working).

use trunkguard_host::{KvBackend, StoreError};

/// The store callbacks of `tg_store` in include/trunkguard.h.
pub type GetFn = unsafe extern "C" fn(
    ctx: *mut std::ffi::c_void,
    key: *const u8,
    key_len: usize,
    sink: *mut std::ffi::c_void,
) -> i32;
pub type SetFn = unsafe extern "C" fn(
    ctx: *mut std::ffi::c_void,
    key: *const u8,
    key_len: usize,
    value: *const u8,
    value_len: usize,
) -> i32;
pub type DelFn =
    unsafe extern "C" fn(ctx: *mut std::ffi::c_void, key: *const u8, key_len: usize) -> i32;

/// `tg_store` as the C side lays it out.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CStore {
    pub ctx: *mut std::ffi::c_void,
    pub get: Option<GetFn>,
    pub set: Option<SetFn>,
    pub del: Option<DelFn>,
}

/// What `tg_sink_put` fills during one `get` call.
#[derive(Default)]
pub struct Sink {
    pub value: Option<Vec<u8>>,
}

/// A [`KvBackend`] over the C callbacks.
pub struct CKv {
    store: CStore,
}

// SAFETY: a tg_policy lives in the one Kamailio process (and thread) that made it;
// wasmtime's `Send` bound on the backend is for hosts that move stores between
// threads, which this one never does.
unsafe impl Send for CKv {}

impl CKv {
    /// `None` when a callback is missing: the policy cannot run without all three.
    pub fn new(store: CStore) -> Option<CKv> {
        (store.get.is_some() && store.set.is_some() && store.del.is_some()).then_some(CKv { store })
    }
}

impl KvBackend for CKv {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(get) = self.store.get else {
            return Err(StoreError("store has no get".into()));
        };
        let mut sink = Sink::default();
        // SAFETY: the callback gets the context it was registered with, a key valid
        // for the call, and a sink pointer that lives until it returns; tg_sink_put
        // copies what it is given.
        let found = unsafe {
            get(
                self.store.ctx,
                key.as_ptr(),
                key.len(),
                (&raw mut sink).cast(),
            )
        };
        match found {
            1 => match sink.value {
                // An htable answers an empty string for an item deleted by setting it
                // empty; trunkguard's store holds no empty value.
                Some(v) if v.is_empty() => Ok(None),
                Some(v) => Ok(Some(v)),
                None => Err(StoreError(format!(
                    "store found {key} but handed over no value"
                ))),
            },
            0 => Ok(None),
            code => Err(StoreError(format!("store failed reading {key} ({code})"))),
        }
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let Some(set) = self.store.set else {
            return Err(StoreError("store has no set".into()));
        };
        // SAFETY: as for get; both buffers are valid for the call.
        let code = unsafe {
            set(
                self.store.ctx,
                key.as_ptr(),
                key.len(),
                value.as_ptr(),
                value.len(),
            )
        };
        // A binding that was not stored must not be reported as registered.
        if code < 0 {
            return Err(StoreError(format!("store refused {key} ({code})")));
        }
        Ok(())
    }

    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        let Some(del) = self.store.del else {
            return Err(StoreError("store has no delete".into()));
        };
        // SAFETY: as for get.
        let code = unsafe { del(self.store.ctx, key.as_ptr(), key.len()) };
        // A refused delete reported as done would answer an un-REGISTER with 200
        // while the binding stays.
        if code < 0 {
            return Err(StoreError(format!("store refused deleting {key} ({code})")));
        }
        Ok(())
    }
}
