//! What every VM of one `vm_id` shares through Envoy: the core's store (shared
//! data), the alert queue to the singleton, and the configuration generation.

use sha2::{Digest, Sha256};

use super::host::{self, HostError};
use super::txn::Backend;
use trunkguard::digest::hex;
use trunkguard::store::StoreError;

/// The queue the workers put alerts on and the singleton delivers from.
pub const ALERT_QUEUE: &str = "trunkguard.alerts";
/// The queue every store write goes on when the singleton keeps the state outside
/// Envoy (docs/envoy.md, "Upgrade and restart"): `[key, value or null]`.
pub const STATE_QUEUE: &str = "trunkguard.state";
/// Written by the singleton once the kept state is back in shared data.
pub const RESTORED_KEY: &str = "tg/envoy/restored";
/// The `vm_id` of docs/envoy.md, when Envoy does not tell.
pub const DEFAULT_VM_ID: &str = "trunkguard";

fn store_error(e: HostError) -> StoreError {
    StoreError(e.to_string())
}

/// Faults a VM injects into its own store and message path: for the test suites and
/// for an operator's fire drill (docs/envoy.md, "Drills"). Set only through the VM
/// configuration, which only the operator writes; all off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drill {
    /// Every store read fails: the filter answers 500 `store_unavailable`.
    #[serde(default)]
    pub store_failure: bool,
    /// The n-th store write of this VM from its start fails (1: the first), once.
    #[serde(default)]
    pub fail_write: Option<u32>,
    /// The first message judged under this `vm_id` traps the VM, once (a shared-data
    /// mark survives the reload that `failure_policy` makes).
    #[serde(default)]
    pub trap_once: bool,
}

thread_local! {
    /// Each VM is one thread's: its drill and how many writes it has left to go.
    static DRILL: std::cell::Cell<Drill> = const { std::cell::Cell::new(Drill {
        store_failure: false,
        fail_write: None,
        trap_once: false,
    }) };
}

pub fn set_drill(drill: Drill) {
    if drill != Drill::default() {
        host::log(host::Level::Warn, &format!("drill in force: {drill:?}"));
    }
    DRILL.with(|d| d.set(drill));
}

/// The mark `trap_once` leaves so that the reloaded VM runs normally.
const TRAPPED_KEY: &str = "tg/envoy/drill_trapped";

/// Whether this message is the one `trap_once` traps on (marks it first).
pub fn drill_traps_now() -> bool {
    if !DRILL.with(|d| d.get().trap_once) {
        return false;
    }
    match host::shared_get(TRAPPED_KEY) {
        Ok((Some(_), _)) => false,
        Ok((None, cas)) => host::shared_set(TRAPPED_KEY, b"1", cas).unwrap_or(false),
        Err(_) => false,
    }
}

fn drill_fails_read() -> bool {
    DRILL.with(|d| d.get().store_failure)
}

fn drill_fails_write() -> bool {
    DRILL.with(|d| {
        let mut drill = d.get();
        let Some(n) = drill.fail_write else {
            return false;
        };
        drill.fail_write = n.checked_sub(1).filter(|n| *n > 0);
        d.set(drill);
        n <= 1
    })
}

/// Envoy's shared data as the transaction's backend.
pub struct EnvoyBackend;

impl Backend for EnvoyBackend {
    fn get(&mut self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        if drill_fails_read() {
            return Err(StoreError("drill: store_failure".into()));
        }
        host::shared_get(key).map_err(store_error)
    }

    fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<bool, StoreError> {
        if drill_fails_write() {
            return Err(StoreError("drill: fail_write".into()));
        }
        let written = host::shared_set(key, value, cas).map_err(store_error)?;
        if written {
            keep(key, value);
        }
        Ok(written)
    }

    fn fill_random(&mut self, buf: &mut [u8]) {
        random(buf);
    }
}

thread_local! {
    /// The state queue (when the singleton keeps state) and when to look for it again.
    static STATE: std::cell::Cell<(Option<u32>, u64)> = const { std::cell::Cell::new((None, 0)) };
    /// Once the kept state is back, it stays back for this VM's life.
    static RESTORED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The singleton's state queue, if it keeps state. Looked up again at most once a
/// second while absent: the singleton may start after a worker.
fn state_queue() -> Option<u32> {
    let (queue, next_ms) = STATE.with(|s| s.get());
    if queue.is_some() {
        return queue;
    }
    let now = host::now_ms().unwrap_or_default();
    if now < next_ms {
        return None;
    }
    let found = host::resolve_queue(&vm_id(), STATE_QUEUE).ok().flatten();
    STATE.with(|s| s.set((found, now + 1_000)));
    found
}

/// Hands one write to the singleton, which keeps it outside Envoy. An emptied key
/// is a delete (shared data cannot remove one).
fn keep(key: &str, value: &[u8]) {
    let Some(queue) = state_queue() else {
        return;
    };
    let value = match std::str::from_utf8(value) {
        Ok("") => None,
        Ok(text) => Some(text),
        Err(_) => {
            // The core stores JSON and hex only; anything else cannot be kept.
            host::log(
                host::Level::Warn,
                &format!("state {key}: not UTF-8, not kept"),
            );
            return;
        }
    };
    let item = serde_json::to_vec(&(key, value)).unwrap_or_default();
    if host::enqueue(queue, &item).is_err() {
        super::metrics::count("state", "lost", 1);
    }
}

/// Whether the singleton keeps state and has not put it back yet since Envoy
/// started: judging now would see no bindings, so messages are refused 503 and
/// retried by the PBX.
pub fn restoring() -> bool {
    if RESTORED.with(|r| r.get()) || state_queue().is_none() {
        return false;
    }
    let back = matches!(host::shared_get(RESTORED_KEY), Ok((Some(_), _)));
    RESTORED.with(|r| r.set(back));
    !back
}

/// Fills `buf` with unpredictable bytes: Envoy's CSPRNG (WASI `random_get`). Should
/// that fail, a hash of the clock and a counter, logged, so that the policy still
/// runs (the nonce secret is created once and then kept in shared data).
pub fn random(buf: &mut [u8]) {
    if host::random(buf).is_ok() {
        return;
    }
    host::log(
        host::Level::Error,
        "random_get failed; using a clock-based fallback",
    );
    thread_local! {
        static COUNTER: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    let n = COUNTER.with(|c| {
        c.set(c.get().wrapping_add(1));
        c.get()
    });
    for (block, chunk) in (0u64..).zip(buf.chunks_mut(32)) {
        let mut h = Sha256::new();
        h.update(host::now_ms().unwrap_or_default().to_le_bytes());
        h.update(n.to_le_bytes());
        h.update(block.to_le_bytes());
        h.update((chunk.as_ptr() as usize).to_le_bytes());
        let out = h.finalize();
        for (b, o) in chunk.iter_mut().zip(out.iter()) {
            *b = *o;
        }
    }
}

/// A random hex string of `2 * n` digits (To-tags).
pub fn random_hex<const N: usize>() -> String {
    let mut b = [0u8; N];
    random(&mut b);
    hex(&b)
}

/// The configuration in force, so that every VM counts generations alike and a
/// connection that started under an older configuration follows the new one: Envoy
/// keeps a connection on the filter configuration it started with.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct InForce {
    pub sha256: String,
    pub generation: u64,
    pub config: String,
}

/// The whole document ([`InForce`]).
const CONFIG_KEY: &str = "tg/envoy/config";
/// Only its generation (decimal), cheap enough to read for every chunk.
const GENERATION_KEY: &str = "tg/envoy/generation";

/// Records a configuration just accepted and returns its generation: the one in
/// force if it is the same document, else the next one. Every VM accepting the same
/// push agrees.
pub fn record_config(config: &[u8]) -> Result<u64, HostError> {
    let sha256 = hex(&Sha256::digest(config));
    for _ in 0..8 {
        let (raw, cas) = host::shared_get(CONFIG_KEY)?;
        let current = raw.and_then(|r| serde_json::from_slice::<InForce>(&r).ok());
        if let Some(c) = &current {
            if c.sha256 == sha256 {
                raise_generation(c.generation)?;
                return Ok(c.generation);
            }
        }
        let next = InForce {
            sha256: sha256.clone(),
            generation: current.map_or(1, |c| c.generation + 1),
            config: String::from_utf8_lossy(config).into_owned(),
        };
        let json = serde_json::to_vec(&next).unwrap_or_default();
        if host::shared_set(CONFIG_KEY, &json, cas)? {
            raise_generation(next.generation)?;
            return Ok(next.generation);
        }
    }
    Err(HostError {
        call: "set_shared_data (configuration)",
        status: 8,
    })
}

/// Sets the generation key to `generation` unless a racing VM already set a later one.
fn raise_generation(generation: u64) -> Result<(), HostError> {
    for _ in 0..8 {
        let (raw, cas) = host::shared_get(GENERATION_KEY)?;
        if parse_generation(raw.as_deref()) >= generation {
            return Ok(());
        }
        if host::shared_set(GENERATION_KEY, generation.to_string().as_bytes(), cas)? {
            return Ok(());
        }
    }
    Err(HostError {
        call: "set_shared_data (generation)",
        status: 8,
    })
}

fn parse_generation(raw: Option<&[u8]>) -> u64 {
    raw.and_then(|r| std::str::from_utf8(r).ok()?.parse().ok())
        .unwrap_or(0)
}

/// The generation in force (0: none yet).
pub fn generation() -> u64 {
    parse_generation(
        host::shared_get(GENERATION_KEY)
            .ok()
            .and_then(|(raw, _)| raw)
            .as_deref(),
    )
}

/// The configuration in force, when it is a later one than `known`.
pub fn newer_config(known: u64) -> Option<InForce> {
    if generation() == known {
        return None;
    }
    let (raw, _) = host::shared_get(CONFIG_KEY).ok()?;
    serde_json::from_slice::<InForce>(&raw?)
        .ok()
        .filter(|c| c.generation != known)
}

/// The `vm_id` this plugin runs under.
pub fn vm_id() -> String {
    host::get_property(&["plugin_vm_id"])
        .ok()
        .flatten()
        .and_then(|v| String::from_utf8(v).ok())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_VM_ID.to_owned())
}
