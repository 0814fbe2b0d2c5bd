//! The message-level C ABI for hosts that hand over whole SIP messages: the wasmtime
//! reference host and through it Kamailio's module and extension. `docs/abi.md` is
//! its contract; every unsafe host call of this front is in this file.
//!
//! Calls are synchronous and the module is single-threaded: one instance per worker.
//! The host writes its input into the guest's buffer (`tg_buffer`), calls an entry
//! point, and reads back a result (a verdict record for `tg_judge`, JSON for the
//! others) whose address and length come packed in the returned `u64`
//! (`ptr << 32 | len`), valid until the next call.

#![cfg(target_arch = "wasm32")]

use std::cell::RefCell;
use std::net::SocketAddr;

use trunkguard::alert::Alert;
use trunkguard::engine::{Engine, Host};
use trunkguard::policy::Input;
use trunkguard::store::{Store, StoreError};

pub use trunkguard::wire::ABI_VERSION;
use trunkguard::wire::binary;
use trunkguard::wire::{Configured, Ticked};

#[link(wasm_import_module = "trunkguard_host")]
unsafe extern "C" {
    /// Copies the value of `key` into `out` (capacity `out_cap`) and returns its full
    /// length, -1 when absent, or -2 on a store failure. A length above `out_cap`
    /// means nothing was copied: call again with a buffer that large.
    fn kv_get(key_ptr: *const u8, key_len: u32, out_ptr: *mut u8, out_cap: u32) -> i64;
    /// Returns 0, or non-zero on a store failure.
    fn kv_set(key_ptr: *const u8, key_len: u32, val_ptr: *const u8, val_len: u32) -> i32;
    fn kv_delete(key_ptr: *const u8, key_len: u32) -> i32;
    /// One alert event as JSON (docs/alerts.md).
    fn alert(ptr: *const u8, len: u32);
    /// Fills `len` bytes at `ptr` with unpredictable bytes.
    fn random(ptr: *mut u8, len: u32);
}

struct AbiHost;

impl Store for AbiHost {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut buf = vec![0u8; 512];
        loop {
            let cap = u32::try_from(buf.len()).unwrap_or(u32::MAX);
            // SAFETY: both pointers address live buffers of the given lengths for the
            // duration of the call; the host writes at most `cap` bytes to `out`.
            let n = unsafe { kv_get(key.as_ptr(), len32(key.as_bytes()), buf.as_mut_ptr(), cap) };
            match n {
                -1 => return Ok(None),
                n if n < 0 => return Err(StoreError(format!("kv_get({key}) failed"))),
                n => {
                    let n = usize::try_from(n).map_err(|_| StoreError("value too large".into()))?;
                    if n <= buf.len() {
                        buf.truncate(n);
                        return Ok(Some(buf));
                    }
                    if n > 16 << 20 {
                        return Err(StoreError(format!("value of {key} is {n} bytes")));
                    }
                    buf.resize(n, 0);
                }
            }
        }
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        // SAFETY: pointers and lengths describe live slices.
        let rc = unsafe {
            kv_set(
                key.as_ptr(),
                len32(key.as_bytes()),
                value.as_ptr(),
                len32(value),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(StoreError(format!("kv_set({key}) failed")))
        }
    }

    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        // SAFETY: pointer and length describe a live slice.
        let rc = unsafe { kv_delete(key.as_ptr(), len32(key.as_bytes())) };
        if rc == 0 {
            Ok(())
        } else {
            Err(StoreError(format!("kv_delete({key}) failed")))
        }
    }
}

impl Host for AbiHost {
    fn alert(&mut self, a: &Alert) {
        if let Ok(json) = serde_json::to_vec(a) {
            // SAFETY: pointer and length describe a live slice.
            unsafe { alert(json.as_ptr(), len32(&json)) }
        }
    }

    fn fill_random(&mut self, buf: &mut [u8]) {
        // SAFETY: pointer and length describe a live, writable slice.
        unsafe { random(buf.as_mut_ptr(), len32(buf)) }
    }
}

/// Transport codes of the ABI (docs/abi.md).
fn len32(b: &[u8]) -> u32 {
    u32::try_from(b.len()).unwrap_or(u32::MAX)
}

#[derive(Default)]
struct State {
    engine: Engine,
    input: Vec<u8>,
    output: Vec<u8>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Stores `value` as the call's JSON result and packs its address and length.
fn result(output: &mut Vec<u8>, value: &impl serde::Serialize) -> u64 {
    output.clear();
    if serde_json::to_writer(&mut *output, value).is_err() {
        output.clear();
        output.extend_from_slice(br#"{"error":"result serialisation failed"}"#);
    }
    packed(output)
}

/// The address and length of the call's result, as the exports return them.
fn packed(output: &[u8]) -> u64 {
    ((output.as_ptr() as u64) << 32) | output.len() as u64
}

/// `tg_judge`'s answer when there is no verdict: the host refuses the message.
fn no_verdict(output: &mut Vec<u8>, error: String) -> u64 {
    binary::write_no_verdict(output, &error);
    packed(output)
}

fn with_state(f: impl FnOnce(&mut State) -> u64) -> u64 {
    // A re-entrant call (host calling back in from an import) finds the state
    // borrowed; answer with an error instead of trapping.
    STATE.with(|s| match s.try_borrow_mut() {
        Ok(mut st) => f(&mut st),
        Err(_) => 0,
    })
}

/// The ABI version this module speaks; hosts refuse a module with another one.
#[unsafe(no_mangle)]
pub extern "C" fn tg_abi_version() -> u32 {
    ABI_VERSION
}

/// Returns the address of a guest buffer of at least `cap` bytes for the next call's
/// input (reused across calls, so steady-state calls allocate nothing here).
#[unsafe(no_mangle)]
pub extern "C" fn tg_buffer(cap: u32) -> u32 {
    with_state(|st| {
        let cap = cap as usize;
        if st.input.len() < cap {
            st.input.resize(cap, 0);
        }
        st.input.as_ptr() as u64
    }) as u32
}

/// Pushes a configuration (the first `len` bytes of the buffer). Result:
/// `{"ok":true,"generation":N}` or `{"ok":false,"path":"…","reason":"…","generation":N}`
/// where N is the generation still in force.
#[unsafe(no_mangle)]
pub extern "C" fn tg_configure(len: u32) -> u64 {
    with_state(|st| {
        let json = st.input.get(..len as usize).unwrap_or_default().to_vec();
        let outcome = st.engine.configure(&json, &mut AbiHost);
        let value = match outcome {
            Ok(generation) => Configured {
                ok: true,
                generation,
                path: None,
                reason: None,
            },
            Err(e) => Configured {
                ok: false,
                generation: st.engine.generation(),
                path: Some(e.path),
                reason: Some(e.reason),
            },
        };
        result(&mut st.output, &value)
    })
}

/// Judges one message. The buffer holds the message (`msg_len` bytes) followed by the
/// source `ip:port` (`src_len` bytes, IPv6 in brackets). `transport`: 0 udp, 1 tcp,
/// 2 tls, 3 ws, 4 wss, 5 sctp. Result: a verdict record, or a no-verdict record (the
/// host must then refuse the message: an error is never an allow); `wire::binary`.
#[unsafe(no_mangle)]
pub extern "C" fn tg_judge(
    msg_len: u32,
    src_len: u32,
    local_len: u32,
    transport: u32,
    now_ms: u64,
) -> u64 {
    with_state(|st| {
        let State {
            engine,
            input,
            output,
        } = st;
        let msg_len = msg_len as usize;
        let end = msg_len.saturating_add(src_len as usize);
        let local_end = end.saturating_add(local_len as usize);
        let (Some(message), Some(source), Some(local)) = (
            input.get(..msg_len),
            input.get(msg_len..end),
            input.get(end..local_end),
        ) else {
            return no_verdict(output, "lengths exceed the buffer".into());
        };
        let source = match std::str::from_utf8(source)
            .ok()
            .and_then(|s| s.parse::<SocketAddr>().ok())
        {
            Some(s) => s,
            None => {
                let text = String::from_utf8_lossy(source).into_owned();
                return no_verdict(output, format!("bad source address {text:?}"));
            }
        };
        // Empty: the host does not know the socket, and nothing is core traffic.
        let local = if local.is_empty() {
            None
        } else {
            match std::str::from_utf8(local)
                .ok()
                .and_then(|s| s.parse::<SocketAddr>().ok())
            {
                Some(l) => Some(l),
                None => {
                    let text = String::from_utf8_lossy(local).into_owned();
                    return no_verdict(output, format!("bad local address {text:?}"));
                }
            }
        };
        let Some(transport) = trunkguard::wire::transport_of_code(transport) else {
            return no_verdict(output, format!("bad transport code {transport}"));
        };
        let input = Input {
            message,
            source,
            transport,
            local,
            now_ms,
        };
        let verdict = engine.judge(&input, &mut AbiHost);
        binary::write_verdict(output, &verdict);
        packed(output)
    })
}

/// Closes expired alert windows (their summaries go to the `alert` import).
/// Result: `{"summaries":N}` or `{"error":"…"}`.
#[unsafe(no_mangle)]
pub extern "C" fn tg_tick(now_ms: u64) -> u64 {
    with_state(|st| {
        let value = match st.engine.tick(now_ms, &mut AbiHost) {
            Ok(summaries) => Ticked {
                summaries,
                error: None,
            },
            Err(e) => Ticked {
                summaries: 0,
                error: Some(e.to_string()),
            },
        };
        result(&mut st.output, &value)
    })
}

/// The configuration generation in force (0: none yet).
#[unsafe(no_mangle)]
pub extern "C" fn tg_generation() -> u64 {
    with_state(|st| st.engine.generation())
}
