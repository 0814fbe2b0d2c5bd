//! Every call into Envoy, and every `unsafe` block of this front, in one place.
//!
//! The proxy-wasm SDK's own wrappers `panic!` on a status they do not expect, and a
//! panic is a trap: with `failure_policy: FAIL_RELOAD` Envoy then rebuilds the VM,
//! which on a per-packet path is a denial of service. These wrappers return every
//! status as an error instead. The imports are those of the proxy-wasm ABI 0.2.1
//! (module `env`) and WASI's `random_get`, which Envoy provides.

use std::ptr::null_mut;

/// A host call that did not succeed: which one, and the status Envoy returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Envoy host call {call} failed with status {status}")]
pub struct HostError {
    pub call: &'static str,
    pub status: u32,
}

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const EMPTY: u32 = 7;
const CAS_MISMATCH: u32 = 8;

fn check(call: &'static str, status: u32) -> Result<(), HostError> {
    if status == OK {
        Ok(())
    } else {
        Err(HostError { call, status })
    }
}

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_register_shared_queue(
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_resolve_shared_queue(
        vm_id_data: *const u8,
        vm_id_size: usize,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_dequeue_shared_queue(
        queue_id: u32,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_enqueue_shared_queue(queue_id: u32, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_close_stream(stream_type: u32) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
unsafe extern "C" {
    fn random_get(buf: *mut u8, buf_len: usize) -> i32;
}

/// Takes ownership of bytes the host wrote into memory it got from the SDK's
/// `proxy_on_memory_allocate` (a `Vec<u8>` of exactly that capacity, forgotten).
fn take(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    // SAFETY: the host allocated `size` bytes at `data` through
    // proxy_on_memory_allocate (Vec::with_capacity(size), then forgotten) and
    // hands their ownership to us; nothing else refers to them.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
}

/// Logs through Envoy (its `wasm` logger). A failing log is not worth an error.
pub fn log(level: Level, message: &str) {
    // SAFETY: pointer and length describe a live slice.
    unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

/// Milliseconds since the Unix epoch (Envoy's clock).
pub fn now_ms() -> Result<u64, HostError> {
    let mut ns = 0u64;
    // SAFETY: `ns` is a live u64 the host writes.
    let status = unsafe { proxy_get_current_time_nanoseconds(&mut ns) };
    check("get_current_time", status)?;
    Ok(ns / 1_000_000)
}

pub fn set_tick_period_ms(ms: u32) -> Result<(), HostError> {
    // SAFETY: plain value call.
    check("set_tick_period", unsafe {
        proxy_set_tick_period_milliseconds(ms)
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    DownstreamData = 2,
    UpstreamData = 3,
    HttpCallResponseBody = 4,
    VmConfiguration = 6,
    PluginConfiguration = 7,
}

/// Up to `max` bytes of a buffer from `start`; `None` when the buffer is absent.
pub fn get_buffer(kind: Buffer, start: usize, max: usize) -> Result<Option<Vec<u8>>, HostError> {
    let mut data = null_mut();
    let mut size = 0usize;
    // SAFETY: the out-pointers address live locals the host writes.
    let status = unsafe { proxy_get_buffer_bytes(kind as u32, start, max, &mut data, &mut size) };
    match status {
        OK => Ok(take(data, size)),
        NOT_FOUND => Ok(None),
        status => Err(HostError {
            call: "get_buffer_bytes",
            status,
        }),
    }
}

/// Replaces `size` bytes from `start` of a buffer by `value` (`start` 0 and the
/// buffer's whole length: replace it all).
pub fn set_buffer(kind: Buffer, start: usize, size: usize, value: &[u8]) -> Result<(), HostError> {
    // SAFETY: pointer and length describe a live slice.
    let status =
        unsafe { proxy_set_buffer_bytes(kind as u32, start, size, value.as_ptr(), value.len()) };
    check("set_buffer_bytes", status)
}

/// A header of the response to an HTTP call (`on_http_call_response`).
pub fn http_call_response_header(name: &str) -> Result<Option<Vec<u8>>, HostError> {
    const HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
    let mut data = null_mut();
    let mut size = 0usize;
    // SAFETY: the key is a live slice; the out-pointers address live locals.
    let status = unsafe {
        proxy_get_header_map_value(
            HTTP_CALL_RESPONSE_HEADERS,
            name.as_ptr(),
            name.len(),
            &mut data,
            &mut size,
        )
    };
    match status {
        OK => Ok(take(data, size)),
        NOT_FOUND => Ok(None),
        status => Err(HostError {
            call: "get_header_map_value",
            status,
        }),
    }
}

/// A property of the stream or the plugin (`["source", "address"]`, …).
pub fn get_property(path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
    let serialized = path.join("\0");
    let mut data = null_mut();
    let mut size = 0usize;
    // SAFETY: the path is a live slice; the out-pointers address live locals.
    let status =
        unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) };
    match status {
        OK => Ok(take(data, size)),
        NOT_FOUND => Ok(None),
        status => Err(HostError {
            call: "get_property",
            status,
        }),
    }
}

/// A shared-data value (`None` when absent or empty) and its CAS (0 when absent).
pub fn shared_get(key: &str) -> Result<(Option<Vec<u8>>, u32), HostError> {
    let mut data = null_mut();
    let mut size = 0usize;
    let mut cas = 0u32;
    // SAFETY: the key is a live slice; the out-pointers address live locals.
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match status {
        OK => Ok((take(data, size).filter(|v| !v.is_empty()), cas)),
        NOT_FOUND => Ok((None, 0)),
        status => Err(HostError {
            call: "get_shared_data",
            status,
        }),
    }
}

/// Writes a shared-data value if its CAS is still `cas` (0: unconditionally).
/// `Ok(false)`: another writer came first; nothing was written.
pub fn shared_set(key: &str, value: &[u8], cas: u32) -> Result<bool, HostError> {
    // SAFETY: pointers and lengths describe live slices.
    let status =
        unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) };
    match status {
        OK => Ok(true),
        CAS_MISMATCH => Ok(false),
        status => Err(HostError {
            call: "set_shared_data",
            status,
        }),
    }
}

/// Registers a shared queue owned by this VM (it then gets `on_queue_ready`).
pub fn register_queue(name: &str) -> Result<u32, HostError> {
    let mut id = 0u32;
    // SAFETY: the name is a live slice; `id` is a live local.
    let status = unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) };
    check("register_shared_queue", status).map(|()| id)
}

/// The id of another VM's queue; `None` when nobody registered it yet.
pub fn resolve_queue(vm_id: &str, name: &str) -> Result<Option<u32>, HostError> {
    let mut id = 0u32;
    // SAFETY: the names are live slices; `id` is a live local.
    let status = unsafe {
        proxy_resolve_shared_queue(
            vm_id.as_ptr(),
            vm_id.len(),
            name.as_ptr(),
            name.len(),
            &mut id,
        )
    };
    match status {
        OK => Ok(Some(id)),
        NOT_FOUND => Ok(None),
        status => Err(HostError {
            call: "resolve_shared_queue",
            status,
        }),
    }
}

pub fn dequeue(queue: u32) -> Result<Option<Vec<u8>>, HostError> {
    let mut data = null_mut();
    let mut size = 0usize;
    // SAFETY: the out-pointers address live locals.
    let status = unsafe { proxy_dequeue_shared_queue(queue, &mut data, &mut size) };
    match status {
        OK => Ok(take(data, size)),
        EMPTY => Ok(None),
        status => Err(HostError {
            call: "dequeue_shared_queue",
            status,
        }),
    }
}

pub fn enqueue(queue: u32, value: &[u8]) -> Result<(), HostError> {
    // SAFETY: pointer and length describe a live slice.
    let status = unsafe { proxy_enqueue_shared_queue(queue, value.as_ptr(), value.len()) };
    check("enqueue_shared_queue", status)
}

/// Closes the client connection (Envoy flushes what was already written to it).
pub fn close_downstream() -> Result<(), HostError> {
    const DOWNSTREAM: u32 = 2;
    // SAFETY: plain value call.
    check("close_stream", unsafe { proxy_close_stream(DOWNSTREAM) })
}

/// Posts `body` to an Envoy cluster; the answer comes to `on_http_call_response`
/// with the returned token.
///
/// This one call goes through the SDK, because its dispatcher routes the response
/// only for tokens it registered itself. Its wrapper panics only on statuses Envoy
/// never returns for an HTTP call (it returns Ok, BadArgument or InternalFailure).
pub fn http_call(
    cluster: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout_ms: u64,
) -> Result<u32, HostError> {
    proxy_wasm::hostcalls::dispatch_http_call(
        cluster,
        headers.to_vec(),
        Some(body),
        Vec::new(),
        std::time::Duration::from_millis(timeout_ms),
    )
    .map_err(|status| HostError {
        call: "http_call",
        status: status as u32,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter = 0,
    Gauge = 1,
}

pub fn define_metric(kind: MetricKind, name: &str) -> Result<u32, HostError> {
    let mut id = 0u32;
    // SAFETY: the name is a live slice; `id` is a live local.
    let status = unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) };
    check("define_metric", status).map(|()| id)
}

pub fn increment_metric(id: u32, by: i64) -> Result<(), HostError> {
    // SAFETY: plain value call.
    check("increment_metric", unsafe {
        proxy_increment_metric(id, by)
    })
}

pub fn record_metric(id: u32, value: u64) -> Result<(), HostError> {
    // SAFETY: plain value call.
    check("record_metric", unsafe { proxy_record_metric(id, value) })
}

/// Fills `buf` from the host's CSPRNG.
pub fn random(buf: &mut [u8]) -> Result<(), HostError> {
    // SAFETY: pointer and length describe a live, writable slice.
    let errno = unsafe { random_get(buf.as_mut_ptr(), buf.len()) };
    check("random_get", u32::try_from(errno).unwrap_or(u32::MAX))
}
