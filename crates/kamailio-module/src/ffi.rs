//! The C interface (include/trunkguard.h). Every `unsafe` of the crate is here: the
//! pointers the C side hands over are read once, at the top of each function, into
//! Rust values. No panic crosses into Kamailio: each entry point catches one and
//! answers its failure value (a worker that aborted would drop every call it holds).

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use trunkguard::verdict::Cause;
use trunkguard_host::{
    ConfigureError, HostError, MemoryKv, PolicyInstance, PolicyModule, Transport,
};

use crate::post::{Posted, post_alert};
use crate::store::{CKv, CStore, Sink};
use crate::verdict::{Held, Lines, TgStr, TgVerdict};

/// `tg_policy`: one per Kamailio process.
pub struct TgPolicy {
    inner: PolicyInstance,
    held: Option<Held>,
    tick_alerts: Lines,
}

/// `tg_refusal_log`.
pub struct TgRefusalLog {
    inner: trunkguard::refusal_log::RefusalLog,
    lines: Lines,
}

/// Copies `msg` into the caller's buffer, truncated on a character boundary and
/// NUL-terminated.
fn write_err(err: *mut c_char, err_len: usize, msg: &str) {
    if err.is_null() || err_len == 0 {
        return;
    }
    let mut n = msg.len().min(err_len - 1);
    while !msg.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: the caller gave `err_len` writable bytes at `err`; n + 1 <= err_len.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), err.cast::<u8>(), n);
        *err.add(n) = 0;
    }
}

/// Runs `f`, turning a panic into `failed` and a message.
fn guarded<T>(err: *mut c_char, err_len: usize, failed: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => {
            write_err(err, err_len, "trunkguard: internal error (panic caught)");
            failed
        }
    }
}

/// A NUL-terminated C string as UTF-8; `None` for null or invalid.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string valid for the call.
unsafe fn c_str<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        return None;
    }
    // SAFETY: per this function's contract.
    unsafe { CStr::from_ptr(p) }.to_str().ok()
}

/// # Safety
/// `p` is null (then `len` must be 0) or valid for `len` bytes for the call.
unsafe fn bytes<'a>(p: *const u8, len: usize) -> &'a [u8] {
    if p.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: per this function's contract.
    unsafe { std::slice::from_raw_parts(p, len) }
}

/// `TG_INTERFACE_VERSION` of include/trunkguard.h: the structures and functions of
/// this file as the C side sees them. mod_init refuses a library of another version.
pub const INTERFACE_VERSION: u32 = 2;

#[unsafe(no_mangle)]
pub extern "C" fn tg_interface_version() -> u32 {
    INTERFACE_VERSION
}

/// Hands a found value to the store call in progress (`tg_sink_put`).
///
/// # Safety
/// `sink` is the pointer the store callback was given; `value` is valid for `len`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tg_sink_put(sink: *mut c_void, value: *const c_char, len: usize) {
    if sink.is_null() {
        return;
    }
    // SAFETY: `sink` is the `Sink` CKv::get passed down, alive for the callback.
    let sink = unsafe { &mut *sink.cast::<Sink>() };
    // SAFETY: per this function's contract.
    sink.value = Some(unsafe { bytes(value.cast(), len) }.to_vec());
}

fn module_at(path: &str) -> Result<PolicyModule, HostError> {
    PolicyModule::from_file_cached(Path::new(path))
}

/// # Safety
/// `wasm_path` is a NUL-terminated string; `err` has `err_len` writable bytes; the
/// store callbacks stay valid for the policy's life.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tg_policy_new(
    wasm_path: *const c_char,
    store: CStore,
    err: *mut c_char,
    err_len: usize,
) -> *mut TgPolicy {
    // SAFETY: per this function's contract.
    let path = unsafe { c_str(wasm_path) };
    guarded(err, err_len, std::ptr::null_mut(), || {
        let Some(path) = path else {
            write_err(err, err_len, "wasm path is missing or not UTF-8");
            return std::ptr::null_mut();
        };
        let Some(kv) = CKv::new(store) else {
            write_err(err, err_len, "store callbacks missing");
            return std::ptr::null_mut();
        };
        match module_at(path).and_then(|m| PolicyInstance::new(&m, Box::new(kv))) {
            Ok(inner) => Box::into_raw(Box::new(TgPolicy {
                inner,
                held: None,
                tick_alerts: Lines::default(),
            })),
            Err(e) => {
                write_err(err, err_len, &e.to_string());
                std::ptr::null_mut()
            }
        }
    })
}

/// # Safety
/// `p` is null or a policy from `tg_policy_new`, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tg_policy_free(p: *mut TgPolicy) {
    if !p.is_null() {
        // SAFETY: made by Box::into_raw in tg_policy_new, freed once.
        drop(unsafe { Box::from_raw(p) });
    }
}

/// The answer of a configuration push: generation, 0 refused, -1 failed.
fn configured(out: Result<u64, ConfigureError>, err: *mut c_char, err_len: usize) -> i64 {
    match out {
        Ok(generation) => i64::try_from(generation).unwrap_or(i64::MAX),
        Err(e @ ConfigureError::Refused(_)) => {
            write_err(err, err_len, &e.to_string());
            0
        }
        Err(e @ ConfigureError::Host(_)) => {
            write_err(err, err_len, &e.to_string());
            -1
        }
    }
}

/// # Safety
/// `p` is a live policy; `json` valid for `len`; `err` has `err_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tg_policy_configure(
    p: *mut TgPolicy,
    json: *const c_char,
    len: usize,
    err: *mut c_char,
    err_len: usize,
) -> i64 {
    // SAFETY: per this function's contract.
    let (policy, json) = unsafe { (p.as_mut(), bytes(json.cast(), len)) };
    guarded(err, err_len, -1, || match policy {
        Some(policy) => configured(policy.inner.configure(json), err, err_len),
        None => {
            write_err(err, err_len, "no policy");
            -1
        }
    })
}

/// # Safety
/// As for `tg_policy_configure`; `wasm_path` NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tg_policy_load_module(
    p: *mut TgPolicy,
    wasm_path: *const c_char,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    // SAFETY: per this function's contract.
    let (policy, path) = unsafe { (p.as_mut(), c_str(wasm_path)) };
    guarded(err, err_len, -1, || {
        let (Some(policy), Some(path)) = (policy, path) else {
            write_err(err, err_len, "no policy or no wasm path");
            return -1;
        };
        match module_at(path).and_then(|m| policy.inner.replace_module(&m)) {
            Ok(()) => 0,
            Err(e) => {
                write_err(err, err_len, &e.to_string());
                -1
            }
        }
    })
}

fn parse_judge_input(
    source: Option<&str>,
    local: Option<&str>,
    transport: Option<&str>,
) -> Result<(SocketAddr, Option<SocketAddr>, Transport), String> {
    let source = source
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad source address {source:?}"))?;
    let local = match local {
        None | Some("") => None,
        Some(l) => Some(l.parse().map_err(|_| format!("bad local address {l:?}"))?),
    };
    let transport = transport.ok_or("no transport")?;
    let transport = transport
        .parse()
        .map_err(|_| format!("unknown transport {transport:?}"))?;
    Ok((source, local, transport))
}

/// # Safety
/// `p` a live policy; `msg` valid for `msg_len`; the strings NUL-terminated; `out`
/// writable; `err` has `err_len` bytes.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tg_policy_judge(
    p: *mut TgPolicy,
    msg: *const c_char,
    msg_len: usize,
    source: *const c_char,
    local: *const c_char,
    transport: *const c_char,
    now_ms: u64,
    out: *mut TgVerdict,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    // SAFETY: per this function's contract.
    let (policy, message, source, local, transport, out) = unsafe {
        (
            p.as_mut(),
            bytes(msg.cast(), msg_len),
            c_str(source),
            c_str(local),
            c_str(transport),
            out.as_mut(),
        )
    };
    guarded(err, err_len, -1, || {
        let (Some(policy), Some(out)) = (policy, out) else {
            write_err(err, err_len, "no policy or no verdict to fill");
            return -1;
        };
        // The previous message's views end here, as the header says.
        policy.held = None;
        let judged = parse_judge_input(source, local, transport).and_then(|(s, l, t)| {
            policy
                .inner
                .judge(message, s, l, t, now_ms)
                .map_err(|e| e.to_string())
        });
        match judged {
            Ok(judged) => {
                let held = Held::new(judged);
                *out = held.view();
                policy.held = Some(held);
                0
            }
            Err(e) => {
                write_err(err, err_len, &e);
                -1
            }
        }
    })
}

/// # Safety
/// `p` a live policy; `alerts` and `n` writable; `err` has `err_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tg_policy_tick(
    p: *mut TgPolicy,
    now_ms: u64,
    alerts: *mut *const TgStr,
    n: *mut usize,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    // SAFETY: per this function's contract.
    let (policy, alerts, n) = unsafe { (p.as_mut(), alerts.as_mut(), n.as_mut()) };
    guarded(err, err_len, -1, || {
        let (Some(policy), Some(alerts), Some(n)) = (policy, alerts, n) else {
            write_err(err, err_len, "no policy or no output");
            return -1;
        };
        match policy.inner.tick(now_ms) {
            Ok(lines) => {
                policy.tick_alerts.set(lines);
                *alerts = policy.tick_alerts.views().as_ptr();
                *n = policy.tick_alerts.len();
                0
            }
            Err(e) => {
                write_err(err, err_len, &e.to_string());
                -1
            }
        }
    })
}

/// # Safety
/// `wasm_path` NUL-terminated; `json` valid for `len`; `err` has `err_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tg_check(
    wasm_path: *const c_char,
    json: *const c_char,
    len: usize,
    err: *mut c_char,
    err_len: usize,
) -> i64 {
    // SAFETY: per this function's contract.
    let (path, json) = unsafe { (c_str(wasm_path), bytes(json.cast(), len)) };
    guarded(err, err_len, -1, || {
        let Some(path) = path else {
            write_err(err, err_len, "wasm path is missing or not UTF-8");
            return -1;
        };
        // A private store: validating a publication must not touch live state.
        let policy =
            module_at(path).and_then(|m| PolicyInstance::new(&m, Box::new(MemoryKv::default())));
        match policy {
            Ok(mut policy) => configured(policy.configure(json), err, err_len),
            Err(e) => {
                write_err(err, err_len, &e.to_string());
                -1
            }
        }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn tg_refusal_log_new(per_second: u32) -> *mut TgRefusalLog {
    Box::into_raw(Box::new(TgRefusalLog {
        inner: trunkguard::refusal_log::RefusalLog::new(per_second),
        lines: Lines::default(),
    }))
}

/// # Safety
/// `l` is null or from `tg_refusal_log_new`, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tg_refusal_log_free(l: *mut TgRefusalLog) {
    if !l.is_null() {
        // SAFETY: made by Box::into_raw in tg_refusal_log_new, freed once.
        drop(unsafe { Box::from_raw(l) });
    }
}

/// Hands `lines` to the C side through `out`; their count.
fn hand_over(log: &mut TgRefusalLog, lines: Vec<String>, out: Option<&mut *const TgStr>) -> usize {
    log.lines.set(lines);
    if let Some(out) = out {
        *out = log.lines.views().as_ptr();
    }
    log.lines.len()
}

/// # Safety
/// `l` live; `msg` valid for `msg_len`; strings NUL-terminated; `v` a verdict the
/// last `tg_policy_judge` filled (its views still valid); `lines` writable.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tg_refusal_log_record(
    l: *mut TgRefusalLog,
    msg: *const c_char,
    msg_len: usize,
    source: *const c_char,
    transport: *const c_char,
    now_ms: u64,
    v: *const TgVerdict,
    lines: *mut *const TgStr,
) -> usize {
    // SAFETY: per this function's contract; the verdict's views point into the
    // policy's held strings, valid until its next call.
    let (log, message, source, transport, v, lines) = unsafe {
        (
            l.as_mut(),
            bytes(msg.cast(), msg_len),
            c_str(source),
            c_str(transport),
            v.as_ref(),
            lines.as_mut(),
        )
    };
    let (Some(log), Some(v)) = (log, v) else {
        return 0;
    };
    // SAFETY: as above.
    let (cause, group) = unsafe {
        (
            bytes(v.cause.s, v.cause.len),
            bytes(v.trunk_group.s, v.trunk_group.len),
        )
    };
    let (Ok(cause), Ok(group)) = (std::str::from_utf8(cause), std::str::from_utf8(group)) else {
        return 0;
    };
    guarded(std::ptr::null_mut(), 0, 0, || {
        let allowed = v.action == crate::verdict::action_code(trunkguard_host::Action::Allow);
        // Every message passes here: the core's rule before any parsing.
        if !trunkguard::refusal_log::logs_reported(cause, allowed) {
            return 0;
        }
        let Some(input) = source
            .zip(transport)
            .and_then(|(s, t)| trunkguard::refusal_log::input_of(message, s, t, now_ms))
        else {
            return 0;
        };
        let group = (!group.is_empty()).then_some(group);
        let out = log
            .inner
            .record_reported(&input, allowed, v.code, cause, group);
        hand_over(log, out, lines)
    })
}

/// # Safety
/// As for `tg_refusal_log_record`; `cause` NUL-terminated.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tg_refusal_log_record_host(
    l: *mut TgRefusalLog,
    msg: *const c_char,
    msg_len: usize,
    source: *const c_char,
    transport: *const c_char,
    now_ms: u64,
    code: u16,
    cause: *const c_char,
    lines: *mut *const TgStr,
) -> usize {
    // SAFETY: per this function's contract.
    let (log, message, source, transport, cause, lines) = unsafe {
        (
            l.as_mut(),
            bytes(msg.cast(), msg_len),
            c_str(source),
            c_str(transport),
            c_str(cause),
            lines.as_mut(),
        )
    };
    guarded(std::ptr::null_mut(), 0, 0, || {
        let (Some(log), Some(cause)) = (log, cause) else {
            return 0;
        };
        let Some(input) = source
            .zip(transport)
            .and_then(|(s, t)| trunkguard::refusal_log::input_of(message, s, t, now_ms))
        else {
            return 0;
        };
        let out = log.inner.record_host(&input, code, cause);
        hand_over(log, out, lines)
    })
}

/// # Safety
/// `l` live; `lines` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tg_refusal_log_flush(
    l: *mut TgRefusalLog,
    now_ms: u64,
    lines: *mut *const TgStr,
) -> usize {
    // SAFETY: per this function's contract.
    let (log, lines) = unsafe { (l.as_mut(), lines.as_mut()) };
    guarded(std::ptr::null_mut(), 0, 0, || match log {
        Some(log) => {
            let out = log.inner.flush(now_ms).into_iter().collect();
            hand_over(log, out, lines)
        }
        None => 0,
    })
}

/// The name of cause `index` in `Cause::ALL`'s order (src/verdict.rs), NUL-terminated
/// and alive for the process; NULL past the last. trunkguard_mod.c registers a
/// statistic `cause_<name>` for each before Kamailio forks, so the list is the core's
/// own and a new cause gets its counter without a change to the C.
#[unsafe(no_mangle)]
pub extern "C" fn tg_cause_name(index: u32) -> *const c_char {
    static NAMES: OnceLock<Vec<CString>> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        Cause::ALL
            .iter()
            .filter_map(|c| CString::new(c.as_str()).ok())
            .collect()
    });
    usize::try_from(index)
        .ok()
        .and_then(|i| names.get(i))
        .map_or(std::ptr::null(), |n| n.as_ptr())
}

#[unsafe(no_mangle)]
pub extern "C" fn tg_fails_over(code: u16, retry_after: c_int, on_6xx: c_int) -> c_int {
    c_int::from(trunkguard::verdict::fails_over(
        code,
        retry_after != 0,
        on_6xx != 0,
    ))
}

/// The delivery rule for the relay's answer (`status` -1: none): 1 sent, 0 retry,
/// -1 refused (keep it for the operator). The core's `alert::delivery`.
#[unsafe(no_mangle)]
pub extern "C" fn tg_alert_delivery(status: c_int) -> c_int {
    let status = u16::try_from(status).ok();
    match trunkguard::alert::delivery(status) {
        trunkguard::alert::Delivery::Sent => 1,
        trunkguard::alert::Delivery::Retry => 0,
        trunkguard::alert::Delivery::Refused => -1,
    }
}

/// # Safety
/// `url`, `token` NUL-terminated; `event` valid for `len`; `err` has `err_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tg_post_alert(
    url: *const c_char,
    token: *const c_char,
    event: *const c_char,
    len: usize,
    timeout_ms: u32,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    // SAFETY: per this function's contract.
    let (url, token, event) = unsafe { (c_str(url), c_str(token), bytes(event.cast(), len)) };
    guarded(err, err_len, -1, || {
        let Some(url) = url else {
            write_err(err, err_len, "no alert URL");
            return -1;
        };
        let timeout = Duration::from_millis(u64::from(timeout_ms.max(1)));
        match post_alert(url, token.unwrap_or(""), event, timeout) {
            Posted::Status(status) => c_int::from(status),
            Posted::Unreachable(e) => {
                write_err(err, err_len, &e);
                -1
            }
        }
    })
}
