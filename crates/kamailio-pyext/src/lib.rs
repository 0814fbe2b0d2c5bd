//! `trunkguard_kamailio`: the reference wasmtime host (crates/host) as a Python
//! extension, so Kamailio's KEMI script calls the policy directly instead of through
//! wasmtime-py's generic call path (50–100 µs per call, docs/kamailio.md). Kamailio, the CLI and
//! the tests share one host implementation: trap recovery, last-good configuration and
//! the store imports are the same code.
//!
//! State lives where the caller says: three Python callables (get/set/delete) that the
//! KEMI script binds to a Kamailio htable, so every worker sees the same bindings.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::path::PathBuf;

use base64::Engine as _;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use trunkguard_host::{ConfigureError, HostError, KvBackend, PolicyModule, StoreError, Transport};

create_exception!(
    trunkguard_kamailio,
    PolicyError,
    PyException,
    "No verdict: the module failed (trap, missing or corrupt .wasm, store failure). The caller must refuse the message."
);
create_exception!(
    trunkguard_kamailio,
    ConfigRefused,
    PyException,
    "The module refused a configuration; args are (path, reason). The previous one stays in force."
);

/// Marks store values that are not UTF-8 (or that could be mistaken for such a value):
/// htable strings reach Python as `str`. Everything trunkguard stores today is JSON or
/// hex, so this is a guard, not the common path.
const BINARY_PREFIX: &str = "base64:";

/// The store imports, answered by Python callables (an htable in Kamailio).
struct PyKv {
    get: Py<PyAny>,
    set: Py<PyAny>,
    delete: Py<PyAny>,
    /// When set, the callables take the table name first (`KSR.htable.sht_get(table,
    /// key)`), so the KEMI script can hand over Kamailio's own functions with no
    /// Python wrapper frame per store access.
    table: Option<Py<PyString>>,
}

impl PyKv {
    fn encode(value: &[u8]) -> String {
        match std::str::from_utf8(value) {
            Ok(text) if !text.starts_with(BINARY_PREFIX) => text.to_owned(),
            _ => format!(
                "{BINARY_PREFIX}{}",
                base64::engine::general_purpose::STANDARD.encode(value)
            ),
        }
    }

    fn decode(text: &str) -> Result<Vec<u8>, StoreError> {
        match text.strip_prefix(BINARY_PREFIX) {
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| StoreError(format!("stored value is not valid base64: {e}"))),
            None => Ok(text.as_bytes().to_vec()),
        }
    }
}

impl KvBackend for PyKv {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Python::attach(|py| {
            let out = match &self.table {
                Some(t) => self.get.call1(py, (t.clone_ref(py), key)),
                None => self.get.call1(py, (key,)),
            }
            .map_err(|e| StoreError(e.to_string()))?;
            let out = out.bind(py);
            if out.is_none() {
                return Ok(None);
            }
            if let Ok(text) = out.cast::<PyString>() {
                let text = text.to_str().map_err(|e| StoreError(e.to_string()))?;
                // An htable answers an empty string for an item that was deleted by
                // setting it empty; there is no empty value in trunkguard's store.
                if text.is_empty() {
                    return Ok(None);
                }
                return PyKv::decode(text).map(Some);
            }
            if let Ok(bytes) = out.cast::<PyBytes>() {
                return Ok(Some(bytes.as_bytes().to_vec()));
            }
            // An integer (e.g. `kamcmd htable.seti` by mistake) is not a trunkguard
            // value: report it, the module fails closed for this message.
            Err(StoreError(format!("store value for {key} is not a string")))
        })
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let text = PyKv::encode(value);
        Python::attach(|py| {
            let out = match &self.table {
                Some(t) => self.set.call1(py, (t.clone_ref(py), key, text)),
                None => self.set.call1(py, (key, text)),
            }
            .map_err(|e| StoreError(e.to_string()))?;
            // Kamailio's sht_sets answers a negative number instead of raising (out of
            // shared memory, say): a binding that was not stored must not be reported
            // as registered.
            match out.extract::<i64>(py) {
                Ok(code) if code < 0 => Err(StoreError(format!("store refused {key} ({code})"))),
                _ => Ok(()),
            }
        })
    }

    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        Python::attach(|py| {
            let out = match &self.table {
                Some(t) => self.delete.call1(py, (t.clone_ref(py), key)),
                None => self.delete.call1(py, (key,)),
            }
            .map_err(|e| StoreError(e.to_string()))?;
            // As for `set`: a delete Kamailio refuses (sht_rm answers -1; removing an
            // absent key is not refused) must not be reported as done, or an
            // un-REGISTER would answer 200 with the binding still in place.
            match out.extract::<i64>(py) {
                Ok(code) if code < 0 => {
                    Err(StoreError(format!("store refused deleting {key} ({code})")))
                }
                _ => Ok(()),
            }
        })
    }
}

fn policy_error(e: HostError) -> PyErr {
    PolicyError::new_err(e.to_string())
}

fn configure_error(e: ConfigureError) -> PyErr {
    match e {
        ConfigureError::Refused(refused) => ConfigRefused::new_err((refused.path, refused.reason)),
        ConfigureError::Host(e) => policy_error(e),
    }
}

/// What a routed call does when the PBX does not answer: (failover URI, ms without
/// a response, whether a 6xx counts), or None.
type Failover = Option<(String, u64, bool)>;

/// One verdict as plain Python values: (action, code, reason, cause, trunk_group,
/// target, next_hop, headers, strip, insert, alerts, failover). A tuple, not an
/// object, because the KEMI script unpacks it once per message and attribute lookups
/// cost more than the call.
type VerdictTuple = (
    &'static str,
    u16,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Vec<(String, String)>,
    Vec<String>,
    Vec<(String, String)>,
    Vec<String>,
    Failover,
);

/// A compiled module plus one instance: one per Kamailio process, created after the
/// fork (wasmtime must not compile before Kamailio forks its workers, docs/kamailio.md).
#[pyclass(unsendable, name = "Policy", module = "trunkguard_kamailio")]
struct PyPolicy {
    module_path: PathBuf,
    inner: trunkguard_host::PolicyInstance,
    generation: u64,
}

#[pymethods]
impl PyPolicy {
    /// Compiles the module at `module_path` and instantiates it with the store
    /// callables `kv_get(key) -> str | None`, `kv_set(key, str)`, `kv_delete(key)`;
    /// with `kv_table`, they are called as `kv_get(kv_table, key)` and so on (Kamailio's
    /// `KSR.htable.sht_get`, `sht_sets`, `sht_rm` as they are).
    #[new]
    #[pyo3(signature = (module_path, kv_get, kv_set, kv_delete, kv_table = None))]
    fn new(
        module_path: PathBuf,
        kv_get: Py<PyAny>,
        kv_set: Py<PyAny>,
        kv_delete: Py<PyAny>,
        kv_table: Option<Py<PyString>>,
    ) -> PyResult<PyPolicy> {
        let module = PolicyModule::from_file_cached(&module_path).map_err(policy_error)?;
        let kv = PyKv {
            get: kv_get,
            set: kv_set,
            delete: kv_delete,
            table: kv_table,
        };
        let inner =
            trunkguard_host::PolicyInstance::new(&module, Box::new(kv)).map_err(policy_error)?;
        Ok(PyPolicy {
            module_path,
            inner,
            generation: 0,
        })
    }

    /// Pushes a configuration (JSON bytes). Returns the module's generation number;
    /// raises ConfigRefused(path, reason) and keeps the previous one otherwise.
    fn configure(&mut self, json: &[u8]) -> PyResult<u64> {
        let generation = self.inner.configure(json).map_err(configure_error)?;
        self.generation = generation;
        Ok(generation)
    }

    /// Judges one SIP message. `source` is `ip:port` (IPv6 in brackets), `local` the
    /// socket it arrived on (`$Ri:$Rp`; "" when unknown), `transport`
    /// Kamailio's `$pr` (udp, tcp, tls, ws, wss, sctp). Raises PolicyError when there is
    /// no verdict: the caller refuses the message.
    fn judge(
        &mut self,
        message: &[u8],
        source: &str,
        local: &str,
        transport: &str,
        now_ms: u64,
    ) -> PyResult<VerdictTuple> {
        let source: SocketAddr = source
            .parse()
            .map_err(|_| PolicyError::new_err(format!("bad source address {source:?}")))?;
        // The socket the message arrived on ("" when unknown: then nothing is core).
        let local: Option<SocketAddr> = match local {
            "" => None,
            l => Some(
                l.parse()
                    .map_err(|_| PolicyError::new_err(format!("bad local address {l:?}")))?,
            ),
        };
        let transport: Transport = transport
            .parse()
            .map_err(|_| PolicyError::new_err(format!("unknown transport {transport:?}")))?;
        let judged = self
            .inner
            .judge(message, source, local, transport, now_ms)
            .map_err(policy_error)?;
        // Every field of the core's verdict named, none with `..`: a field added to
        // `trunkguard::Verdict` (the one wire definition, src/wire.rs) fails to
        // compile here until the tuple (and the KEMI script) carries it.
        let trunkguard::Verdict {
            action,
            code,
            reason,
            cause,
            trunk_group,
            target,
            next_hop,
            headers,
            failover,
            failover_after_ms,
            failover_on_6xx,
            strip,
            insert,
        } = judged.verdict;
        Ok((
            action.as_str(),
            code.unwrap_or(0),
            reason.unwrap_or_default(),
            cause.map(|c| c.as_str().to_owned()),
            trunk_group,
            target,
            next_hop,
            headers,
            strip
                .into_iter()
                .map(Cow::into_owned)
                .collect::<Vec<String>>(),
            insert,
            judged.alerts,
            failover.map(|uri| (uri, failover_after_ms.unwrap_or(0), failover_on_6xx)),
        ))
    }

    /// Closes expired alert windows; returns their summary alerts (JSON strings).
    fn tick(&mut self, now_ms: u64) -> PyResult<Vec<String>> {
        self.inner.tick(now_ms).map_err(policy_error)
    }

    /// Swaps in another `.wasm` (or recompiles the same path): the new instance gets
    /// the last good configuration; state stays in the store. On failure the running
    /// instance is kept and PolicyError is raised.
    fn load_module(&mut self, module_path: PathBuf) -> PyResult<()> {
        let module = PolicyModule::from_file_cached(&module_path).map_err(policy_error)?;
        self.inner.replace_module(&module).map_err(policy_error)?;
        self.module_path = module_path;
        Ok(())
    }

    /// The `.wasm` this instance runs.
    #[getter]
    fn module_path(&self) -> PathBuf {
        self.module_path.clone()
    }

    /// The generation number of the configuration in force (0: none yet).
    #[getter]
    fn generation(&self) -> u64 {
        self.generation
    }
}

/// The refusal log (docs/policy.md, "The refusal log"): the core renders the lines
/// and keeps the rate, so that the shim only writes them.
#[pyclass(unsendable, module = "trunkguard_kamailio")]
struct RefusalLog {
    inner: trunkguard::refusal_log::RefusalLog,
}

#[pymethods]
impl RefusalLog {
    #[new]
    #[pyo3(signature = (per_second = trunkguard::refusal_log::DEFAULT_PER_SECOND))]
    fn new(per_second: u32) -> Self {
        RefusalLog {
            inner: trunkguard::refusal_log::RefusalLog::new(per_second),
        }
    }

    /// The lines to write for a verdict as `Policy.judge` returned it (action, code,
    /// cause, trunk group): none, one, or a pending summary and the line.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        message: &[u8],
        source: &str,
        transport: &str,
        now_ms: u64,
        action: &str,
        code: u16,
        cause: Option<&str>,
        trunk_group: Option<String>,
    ) -> Vec<String> {
        let Some(cause) = cause else {
            return Vec::new();
        };
        // Called for every message: the core's rule is asked first, the strings are
        // parsed only for the few verdicts it logs.
        let allowed = action == "allow";
        if !trunkguard::refusal_log::logs_reported(cause, allowed) {
            return Vec::new();
        }
        match trunkguard::refusal_log::input_of(message, source, transport, now_ms) {
            Some(input) => {
                self.inner
                    .record_reported(&input, allowed, code, cause, trunk_group.as_deref())
            }
            None => Vec::new(),
        }
    }

    /// The lines for a refusal the shim makes itself after an allow (`no_dialog`,
    /// `loop`, `policy_error`, …), under the same rate.
    fn record_host(
        &mut self,
        message: &[u8],
        source: &str,
        transport: &str,
        now_ms: u64,
        code: u16,
        cause: &str,
    ) -> Vec<String> {
        match trunkguard::refusal_log::input_of(message, source, transport, now_ms) {
            Some(input) => self.inner.record_host(&input, code, cause),
            None => Vec::new(),
        }
    }

    /// The summary of a past second's left-out lines, once (call it from a timer).
    fn flush(&mut self, now_ms: u64) -> Option<String> {
        self.inner.flush(now_ms)
    }
}

/// Whether a final response `code` from a registered PBX sends an inbound call to
/// the verdict's failover (the core's rule, docs/policy.md "Inbound calls").
#[pyfunction]
fn fails_over(code: u16, retry_after: bool, on_6xx: bool) -> bool {
    trunkguard::verdict::fails_over(code, retry_after, on_6xx)
}

/// What to do with an alert after one POST to the relay that answered `status`
/// (None: no answer): "sent", "retry" or "refused" (set it aside for the operator).
/// The core's rule (docs/alerts.md, "Posting from a host").
#[pyfunction]
#[pyo3(signature = (status = None))]
fn alert_delivery(status: Option<u16>) -> &'static str {
    trunkguard::alert::delivery(status).as_str()
}

/// Validates a publication before it goes out: compiles `module_path` (warming the
/// compiled-code cache every Kamailio process then maps), instantiates it with a
/// private in-memory store and pushes `config`. Returns the generation; raises
/// PolicyError for a module that cannot run, ConfigRefused(path, reason) for a config.
#[pyfunction]
fn check(module_path: PathBuf, config: &[u8]) -> PyResult<u64> {
    let module = PolicyModule::from_file_cached(&module_path).map_err(policy_error)?;
    let mut policy = trunkguard_host::PolicyInstance::new(
        &module,
        Box::new(trunkguard_host::MemoryKv::default()),
    )
    .map_err(policy_error)?;
    policy.configure(config).map_err(configure_error)
}

#[pymodule]
fn trunkguard_kamailio(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPolicy>()?;
    m.add_class::<RefusalLog>()?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    m.add_function(wrap_pyfunction!(fails_over, m)?)?;
    m.add_function(wrap_pyfunction!(alert_delivery, m)?)?;
    m.add("PolicyError", m.py().get_type::<PolicyError>())?;
    m.add("ConfigRefused", m.py().get_type::<ConfigRefused>())?;
    m.add("ABI_VERSION", trunkguard_host::ABI_VERSION)?;
    Ok(())
}
