//! The reference wasmtime host for trunkguard's message ABI (docs/abi.md).
//!
//! One [`PolicyModule`] is compiled once per process; each worker owns a [`PolicyInstance`]
//! (one instance). Instances share state through a [`KvBackend`], so a REGISTER judged
//! by one worker is seen by an INVITE judged by another, and a trap or a reload that
//! replaces an instance loses no binding.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use wasmtime::{Caller, Config, Engine, Instance, Linker, Memory, Module, Store, TypedFunc};

pub mod kv;

pub use kv::{KvBackend, MemoryKv, StoreError};

// The wire types are the guest's own (`trunkguard::wire`): one definition on both
// sides of the ABI.
pub use trunkguard::sip::Transport;
pub use trunkguard::wire::{ABI_VERSION, ConfigRefused};
pub use trunkguard::{Action, Cause, Verdict};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot read module {path}: {source}")]
    ModuleFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load module: {0}")]
    Load(String),
    #[error("module speaks ABI version {found}, this host speaks {ABI_VERSION}")]
    AbiVersion { found: u32 },
    /// The module trapped. The instance is replaced on the next call; state in the
    /// store and the last good configuration are kept.
    #[error("module trapped: {0}")]
    Trap(String),
    #[error("module answered an error: {0}")]
    Module(String),
    #[error("bad input: {0}")]
    BadInput(String),
}

/// Why a configuration push did not take.
#[derive(Debug, thiserror::Error)]
pub enum ConfigureError {
    /// The module refused the configuration (where and why); the previous one stays
    /// in force.
    #[error(transparent)]
    Refused(ConfigRefused),
    /// No answer from the module (a trap, a broken `.wasm`).
    #[error(transparent)]
    Host(#[from] HostError),
}

/// One judged message: the verdict and the alerts it raised.
#[derive(Debug, Clone)]
pub struct Judged {
    pub verdict: Verdict,
    /// Alert events (JSON) raised while judging, in order.
    pub alerts: Vec<String>,
}

/// Where the default build puts the message-ABI module, relative to the target dir.
pub const MODULE_RELATIVE_PATH: &str = "wasm32-unknown-unknown/wasm/trunkguard_abi.wasm";

/// Finds the module `scripts/build` produced: `$TRUNKGUARD_MODULE`, else beside the
/// running executable's target directory, else `target/` under the current directory.
pub fn default_module_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TRUNKGUARD_MODULE") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/release/trunkguard or target/release/deps/test-binary
        for dir in exe.ancestors().skip(1).take(3) {
            let candidate = dir.join(MODULE_RELATIVE_PATH);
            if candidate.exists() {
                return candidate;
            }
        }
        // Installed: /usr/bin/trunkguard beside /usr/lib/trunkguard/trunkguard.wasm.
        if let Some(prefix) = exe.parent().and_then(Path::parent) {
            let candidate = prefix.join("lib/trunkguard/trunkguard.wasm");
            if candidate.exists() {
                return candidate;
            }
        }
    }
    Path::new("target").join(MODULE_RELATIVE_PATH)
}

/// A compiled module, shared by every instance of a process.
#[derive(Clone)]
pub struct PolicyModule {
    engine: Engine,
    module: Module,
}

impl PolicyModule {
    pub fn from_file(path: &Path) -> Result<PolicyModule, HostError> {
        let bytes = read_module(path)?;
        PolicyModule::from_bytes(&bytes)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<PolicyModule, HostError> {
        let engine = new_engine()?;
        let module = Module::new(&engine, bytes).map_err(|e| HostError::Load(format!("{e:#}")))?;
        Ok(PolicyModule { engine, module })
    }

    /// Like [`PolicyModule::from_file`], through a cache of the compiled code beside
    /// the module (`<path>.<sha256 prefix>.cwasm`): a host with many processes
    /// (Kamailio's workers) compiles once, the others map the cache in milliseconds
    /// instead of compiling for a second each. The cache's name carries the hash of the
    /// module bytes just read, so it is only ever used for exactly those bytes, and
    /// wasmtime refuses one built by another version or configuration. Written through
    /// a new temporary file and a rename; a failure to write it only costs the next
    /// process a compile. Use it for modules in a directory only the host writes (the
    /// published copies), since the cache is machine code the host runs.
    pub fn from_file_cached(path: &Path) -> Result<PolicyModule, HostError> {
        let bytes = read_module(path)?;
        let cache = cache_path(path, &bytes);
        let engine = new_engine()?;
        if cache.is_file() {
            // SAFETY: the cache is written only by this function, under a name tied to
            // the module's content, next to a module the operator published; it is as
            // trusted as the .wasm beside it, and wasmtime checks its version and
            // configuration header.
            if let Ok(module) = unsafe { Module::deserialize_file(&engine, &cache) } {
                return Ok(PolicyModule { engine, module });
            }
        }
        let module = Module::new(&engine, &bytes).map_err(|e| HostError::Load(format!("{e:#}")))?;
        if let Ok(code) = module.serialize() {
            write_new_then_rename(&cache, &code);
        }
        Ok(PolicyModule { engine, module })
    }
}

/// Writes `data` to a temporary file that must not exist yet (no following a planted
/// link) beside `dest`, then renames it over `dest`. Best effort.
fn write_new_then_rename(dest: &Path, data: &[u8]) {
    use std::io::Write as _;
    let mut name = dest.as_os_str().to_owned();
    name.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(name);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| f.write_all(data));
    if written.is_err() || std::fs::rename(&tmp, dest).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

fn read_module(path: &Path) -> Result<Vec<u8>, HostError> {
    std::fs::read(path).map_err(|source| HostError::ModuleFile {
        path: path.to_path_buf(),
        source,
    })
}

fn new_engine() -> Result<Engine, HostError> {
    let mut config = Config::new();
    // The `parallel-compilation` feature is off: compiling on the calling thread
    // keeps forking hosts (Kamailio) safe.
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    Engine::new(&config).map_err(|e| HostError::Load(e.to_string()))
}

fn cache_path(module: &Path, bytes: &[u8]) -> PathBuf {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(bytes);
    let mut name = module.as_os_str().to_owned();
    name.push(".");
    for b in &digest[..8] {
        name.push(format!("{b:02x}"));
    }
    name.push(".cwasm");
    PathBuf::from(name)
}

/// A fault the host injects into the module's store imports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Every kv_get reports a store failure (-2).
    StoreFailure,
    /// The next kv_get traps the instance (as a host bug or OOM would), then the
    /// fault clears itself.
    TrapOnce,
    /// Only the n-th kv_set or kv_delete from now on fails (1: the next one): a
    /// store that fails between two writes of one decision.
    FailWrite(u32),
}

/// What the module's imports reach.
pub struct HostState {
    kv: Box<dyn KvBackend>,
    alerts: Vec<String>,
    rng: rand_core_fallback::Rng,
    /// Fault injection for tests and drills: proves the module fails closed.
    fault: Option<Fault>,
    /// Writes seen since `fault` was last checked for `FailWrite`.
    writes: u32,
    /// The instance's memory, for the imports, so a store call does not look the
    /// export up by name each time.
    memory: Option<Memory>,
}

impl HostState {
    /// Whether this write is the one `Fault::FailWrite` fails.
    fn write_fails(&mut self) -> bool {
        let Some(Fault::FailWrite(n)) = self.fault else {
            return false;
        };
        self.writes += 1;
        if self.writes >= n {
            self.fault = None;
            self.writes = 0;
            return true;
        }
        false
    }
}

mod rand_core_fallback {
    /// Random bytes from the OS; the module only needs them for the nonce secret and
    /// alert ids, so a failure to read them is reported as zeros plus a counter,
    /// never a crash.
    pub struct Rng(u64);

    impl Rng {
        pub fn new() -> Rng {
            Rng(0)
        }

        pub fn fill(&mut self, buf: &mut [u8]) {
            if getrandom::fill(buf).is_err() {
                self.0 += 1;
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = (self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> ((i % 8) * 8)) as u8;
                }
            }
        }
    }
}

struct Exports {
    memory: Memory,
    buffer: TypedFunc<u32, u32>,
    /// The guest input buffer (address, capacity) from the last `tg_buffer` call: it
    /// only moves when it has to grow, so most calls skip asking for it.
    input: std::cell::Cell<(u32, u32)>,
    configure: TypedFunc<u32, u64>,
    judge: TypedFunc<(u32, u32, u32, u32, u64), u64>,
    tick: TypedFunc<u64, u64>,
}

impl Exports {
    fn input_buffer(&self, store: &mut Store<HostState>, len: u32) -> Result<u32, HostError> {
        let (ptr, cap) = self.input.get();
        if len <= cap && cap > 0 {
            return Ok(ptr);
        }
        // Grow geometrically so a stream of slightly longer messages does not ask
        // every time.
        let want = len.max(cap.saturating_mul(2)).max(4096);
        let ptr = self.buffer.call(&mut *store, want).map_err(trap)?;
        self.input.set((ptr, want));
        Ok(ptr)
    }
}

/// One policy instance (one per worker thread).
pub struct PolicyInstance {
    module: PolicyModule,
    store: Store<HostState>,
    exports: Option<Exports>,
    /// The last configuration the module accepted, re-pushed after a trap.
    last_good: Option<Vec<u8>>,
}

impl PolicyInstance {
    pub fn new(module: &PolicyModule, kv: Box<dyn KvBackend>) -> Result<PolicyInstance, HostError> {
        let store = Store::new(
            &module.engine,
            HostState {
                kv,
                alerts: Vec::new(),
                rng: rand_core_fallback::Rng::new(),
                fault: None,
                writes: 0,
                memory: None,
            },
        );
        let mut policy = PolicyInstance {
            module: module.clone(),
            store,
            exports: None,
            last_good: None,
        };
        policy.instantiate()?;
        Ok(policy)
    }

    /// Injects a fault into this instance's store imports (tests and drills); `None`
    /// clears it. Only the fault: the state itself (its memory belongs to this store)
    /// never moves between instances.
    pub fn set_fault(&mut self, fault: Option<Fault>) {
        self.store.data_mut().fault = fault;
    }

    /// The fault still armed (a `FailWrite` or `TrapOnce` clears itself when it fires).
    pub fn fault(&self) -> Option<Fault> {
        self.store.data().fault
    }

    fn instantiate(&mut self) -> Result<(), HostError> {
        let mut linker: Linker<HostState> = Linker::new(&self.module.engine);
        link_imports(&mut linker).map_err(|e| HostError::Load(e.to_string()))?;
        // A fresh store per instance: a trapped instance's memory is dropped whole.
        let data = std::mem::replace(
            self.store.data_mut(),
            HostState {
                kv: Box::new(MemoryKv::default()),
                alerts: Vec::new(),
                rng: rand_core_fallback::Rng::new(),
                fault: None,
                writes: 0,
                memory: None,
            },
        );
        // The old instance's memory belongs to the old store: wasmtime refuses (panics
        // on) a memory used with another store, so none until this instance's is known.
        let data = HostState {
            memory: None,
            ..data
        };
        self.store = Store::new(&self.module.engine, data);
        let instance = linker
            .instantiate(&mut self.store, &self.module.module)
            .map_err(|e| HostError::Load(format!("{e:#}")))?;
        let version: TypedFunc<(), u32> = typed(&instance, &mut self.store, "tg_abi_version")?;
        let found = version.call(&mut self.store, ()).map_err(trap)?;
        if found != ABI_VERSION {
            return Err(HostError::AbiVersion { found });
        }
        let memory = instance
            .get_memory(&mut self.store, "memory")
            .ok_or_else(|| HostError::Load("module exports no memory".into()))?;
        self.store.data_mut().memory = Some(memory);
        self.exports = Some(Exports {
            memory,
            buffer: typed(&instance, &mut self.store, "tg_buffer")?,
            input: std::cell::Cell::new((0, 0)),
            configure: typed(&instance, &mut self.store, "tg_configure")?,
            judge: typed(&instance, &mut self.store, "tg_judge")?,
            tick: typed(&instance, &mut self.store, "tg_tick")?,
        });
        if let Some(cfg) = self.last_good.clone() {
            match self.push(&cfg) {
                Ok(_) => {}
                Err(ConfigureError::Host(e)) => return Err(e),
                Err(ConfigureError::Refused(refused)) => {
                    return Err(HostError::Module(format!(
                        "last good config refused after reload: {refused}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Runs `f` against live exports; after a trap the instance is dropped so the next
    /// call gets a fresh one (with the last good configuration re-pushed).
    fn call<T>(
        &mut self,
        f: impl FnOnce(&Exports, &mut Store<HostState>) -> Result<T, HostError>,
    ) -> Result<T, HostError> {
        if self.exports.is_none() {
            self.instantiate()?;
        }
        let exports = self
            .exports
            .as_ref()
            .ok_or_else(|| HostError::Load("no instance".into()))?;
        let out = f(exports, &mut self.store);
        if let Err(HostError::Trap(_)) = &out {
            self.exports = None;
        }
        out
    }

    /// Replaces the instance by a fresh one (as after a trap or a new `.wasm`): the
    /// last good configuration is pushed again; the store keeps all state.
    pub fn reload(&mut self) -> Result<(), HostError> {
        self.exports = None;
        self.instantiate()
    }

    /// Runs another compiled module (a new `.wasm`) with the last good configuration
    /// and the same store. If the new module cannot be instantiated or refuses that
    /// configuration, the previous module is put back and the error returned.
    pub fn replace_module(&mut self, module: &PolicyModule) -> Result<(), HostError> {
        let previous = std::mem::replace(&mut self.module, module.clone());
        self.exports = None;
        match self.instantiate() {
            Ok(()) => Ok(()),
            Err(e) => {
                self.module = previous;
                self.exports = None;
                // The previous module ran this configuration a moment ago; if even that
                // fails now, the next call retries and reports it.
                let _ = self.instantiate();
                Err(e)
            }
        }
    }

    /// Pushes a configuration: the generation now in force, or why not (the module
    /// refused it and the previous one stays in force, or the host failed).
    pub fn configure(&mut self, json: &[u8]) -> Result<u64, ConfigureError> {
        let generation = self.push(json)?;
        self.last_good = Some(json.to_vec());
        Ok(generation)
    }

    fn push(&mut self, json: &[u8]) -> Result<u64, ConfigureError> {
        let raw = self.call(|ex, store| {
            let len = len32(json.len())?;
            let ptr = ex.input_buffer(store, len)?;
            write(ex.memory, store, ptr, json)?;
            let packed = ex.configure.call(&mut *store, len).map_err(trap)?;
            read_result(ex.memory, store, packed)
        })?;
        let o: trunkguard::wire::Configured =
            serde_json::from_str(&raw).map_err(|e| HostError::Module(format!("{e}: {raw}")))?;
        o.outcome().map_err(ConfigureError::Refused)
    }

    /// Judges one message. An error means no verdict: the caller must refuse the
    /// message (fail closed), never let it through.
    pub fn judge(
        &mut self,
        message: &[u8],
        source: SocketAddr,
        local: Option<SocketAddr>,
        transport: Transport,
        now_ms: u64,
    ) -> Result<Judged, HostError> {
        let mut src_buf = [0u8; 64];
        let src_len_usize = format_source(source, &mut src_buf)?;
        let src = &src_buf[..src_len_usize];
        let mut local_buf = [0u8; 64];
        let local_len_usize = match local {
            Some(l) => format_source(l, &mut local_buf)?,
            None => 0,
        };
        let local = &local_buf[..local_len_usize];
        let verdict = self.call(|ex, store| {
            let msg_len = len32(message.len())?;
            let src_len = len32(src.len())?;
            let local_len = len32(local.len())?;
            let ptr = ex.input_buffer(
                store,
                msg_len.saturating_add(src_len).saturating_add(local_len),
            )?;
            write(ex.memory, store, ptr, message)?;
            write(ex.memory, store, ptr.saturating_add(msg_len), src)?;
            write(
                ex.memory,
                store,
                ptr.saturating_add(msg_len).saturating_add(src_len),
                local,
            )?;
            let packed = ex
                .judge
                .call(
                    &mut *store,
                    (
                        msg_len,
                        src_len,
                        local_len,
                        trunkguard::wire::transport_code(transport),
                        now_ms,
                    ),
                )
                .map_err(trap)?;
            let record = result_bytes(ex.memory, store, packed)?;
            trunkguard::wire::binary::read(record).map_err(|e| HostError::Module(e.to_string()))
        });
        let alerts = std::mem::take(&mut self.store.data_mut().alerts);
        Ok(Judged {
            verdict: verdict?,
            alerts,
        })
    }

    /// Closes expired alert windows; returns the summary alerts (JSON).
    pub fn tick(&mut self, now_ms: u64) -> Result<Vec<String>, HostError> {
        let raw = self.call(|ex, store| {
            let packed = ex.tick.call(&mut *store, now_ms).map_err(trap)?;
            read_result(ex.memory, store, packed)
        });
        let alerts = std::mem::take(&mut self.store.data_mut().alerts);
        let raw = raw?;
        let ticked: trunkguard::wire::Ticked =
            serde_json::from_str(&raw).map_err(|e| HostError::Module(format!("{e}: {raw}")))?;
        match ticked.error {
            Some(e) => Err(HostError::Module(e)),
            None => Ok(alerts),
        }
    }
}

/// Writes `ip:port` (IPv6 in brackets) into `buf`, returning the length. Runs for every
/// message: the IPv4 case by hand costs a tenth of `core::fmt` (callgrind,
/// scripts/bench-instructions).
fn format_source(source: SocketAddr, buf: &mut [u8; 64]) -> Result<usize, HostError> {
    fn decimal(mut n: u32, out: &mut [u8], at: usize) -> usize {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let len = digits.len() - i;
        out[at..at + len].copy_from_slice(&digits[i..]);
        at + len
    }
    match source {
        SocketAddr::V4(v4) => {
            let mut at = 0;
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    buf[at] = b'.';
                    at += 1;
                }
                at = decimal(u32::from(octet), buf, at);
            }
            buf[at] = b':';
            Ok(decimal(u32::from(v4.port()), buf, at + 1))
        }
        SocketAddr::V6(_) => {
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            std::io::Write::write_fmt(&mut cursor, format_args!("{source}"))
                .map_err(|_| HostError::BadInput(format!("source {source} too long")))?;
            Ok(cursor.position() as usize)
        }
    }
}

fn typed<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
    instance: &Instance,
    store: &mut Store<HostState>,
    name: &str,
) -> Result<TypedFunc<P, R>, HostError> {
    instance
        .get_typed_func::<P, R>(&mut *store, name)
        .map_err(|e| HostError::Load(format!("export {name}: {e}")))
}

fn trap(e: wasmtime::Error) -> HostError {
    HostError::Trap(format!("{e:#}"))
}

fn len32(n: usize) -> Result<u32, HostError> {
    u32::try_from(n).map_err(|_| HostError::BadInput(format!("{n} bytes is too large")))
}

fn write(
    memory: Memory,
    store: &mut Store<HostState>,
    ptr: u32,
    bytes: &[u8],
) -> Result<(), HostError> {
    memory
        .write(&mut *store, ptr as usize, bytes)
        .map_err(|e| HostError::Module(format!("buffer out of bounds: {e}")))
}

/// A JSON result (`tg_configure`, `tg_tick`), as text.
fn read_result(
    memory: Memory,
    store: &mut Store<HostState>,
    packed: u64,
) -> Result<String, HostError> {
    let bytes = result_bytes(memory, store, packed)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| HostError::Module("result is not UTF-8".into()))
}

/// The bytes a packed result addresses, read in place (valid until the next call).
fn result_bytes(memory: Memory, store: &Store<HostState>, packed: u64) -> Result<&[u8], HostError> {
    if packed == 0 {
        return Err(HostError::Module(
            "module was busy (re-entrant call)".into(),
        ));
    }
    let ptr = (packed >> 32) as usize;
    let len = (packed & 0xffff_ffff) as usize;
    memory
        .data(store)
        .get(ptr..ptr.saturating_add(len))
        .ok_or_else(|| HostError::Module("result out of bounds".into()))
}

/// Reads guest memory `[ptr, ptr+len)` inside an import.
fn guest_bytes(caller: &mut Caller<'_, HostState>, ptr: u32, len: u32) -> Option<Vec<u8>> {
    let memory = caller.data().memory?;
    memory
        .data(&*caller)
        .get(ptr as usize..(ptr as usize).checked_add(len as usize)?)
        .map(<[u8]>::to_vec)
}

fn link_imports(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    const M: &str = "trunkguard_host";
    linker.func_wrap(
        M,
        "kv_get",
        |mut caller: Caller<'_, HostState>,
         kp: u32,
         kl: u32,
         out: u32,
         cap: u32|
         -> wasmtime::Result<i64> {
            match caller.data().fault {
                Some(Fault::StoreFailure) => return Ok(-2),
                Some(Fault::TrapOnce) => {
                    caller.data_mut().fault = None;
                    return Err(wasmtime::Error::msg("injected trap"));
                }
                Some(Fault::FailWrite(_)) | None => {}
            }
            let Some(key) =
                guest_bytes(&mut caller, kp, kl).and_then(|k| String::from_utf8(k).ok())
            else {
                return Ok(-2);
            };
            let value = match caller.data_mut().kv.get(&key) {
                Ok(Some(v)) => v,
                Ok(None) => return Ok(-1),
                Err(_) => return Ok(-2),
            };
            if value.len() <= cap as usize {
                let Some(memory) = caller.data().memory else {
                    return Ok(-2);
                };
                if memory.write(&mut caller, out as usize, &value).is_err() {
                    return Ok(-2);
                }
            }
            Ok(i64::try_from(value.len()).unwrap_or(-2))
        },
    )?;
    linker.func_wrap(
        M,
        "kv_set",
        |mut caller: Caller<'_, HostState>, kp: u32, kl: u32, vp: u32, vl: u32| -> i32 {
            let (Some(key), Some(value)) = (
                guest_bytes(&mut caller, kp, kl),
                guest_bytes(&mut caller, vp, vl),
            ) else {
                return 1;
            };
            let Ok(key) = String::from_utf8(key) else {
                return 1;
            };
            if caller.data_mut().write_fails() {
                return 1;
            }
            match caller.data_mut().kv.set(&key, &value) {
                Ok(()) => 0,
                Err(_) => 1,
            }
        },
    )?;
    linker.func_wrap(
        M,
        "kv_delete",
        |mut caller: Caller<'_, HostState>, kp: u32, kl: u32| -> i32 {
            let Some(key) =
                guest_bytes(&mut caller, kp, kl).and_then(|k| String::from_utf8(k).ok())
            else {
                return 1;
            };
            if caller.data_mut().write_fails() {
                return 1;
            }
            match caller.data_mut().kv.delete(&key) {
                Ok(()) => 0,
                Err(_) => 1,
            }
        },
    )?;
    linker.func_wrap(
        M,
        "alert",
        |mut caller: Caller<'_, HostState>, p: u32, l: u32| {
            if let Some(text) =
                guest_bytes(&mut caller, p, l).and_then(|b| String::from_utf8(b).ok())
            {
                caller.data_mut().alerts.push(text);
            }
        },
    )?;
    linker.func_wrap(
        M,
        "random",
        |mut caller: Caller<'_, HostState>, p: u32, l: u32| -> wasmtime::Result<()> {
            let mut buf = vec![0u8; l as usize];
            caller.data_mut().rng.fill(&mut buf);
            // Bytes the guest takes for random but that never arrived (no memory yet,
            // out of bounds) would be a predictable nonce secret: trap instead.
            let Some(memory) = caller.data().memory else {
                return Err(wasmtime::Error::msg("random before the instance is set up"));
            };
            memory
                .write(&mut caller, p as usize, &buf)
                .map_err(|e| wasmtime::Error::msg(format!("random out of bounds: {e}")))
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_formatted_as_the_module_parses_them() {
        for text in [
            "0.0.0.0:0",
            "203.0.113.7:5060",
            "255.255.255.255:65535",
            "10.1.20.3:7",
            "[2001:db8::7]:5061",
            "[::ffff:192.0.2.1]:5060",
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            let mut buf = [0u8; 64];
            let len = format_source(addr, &mut buf).unwrap();
            assert_eq!(std::str::from_utf8(&buf[..len]).unwrap(), text);
        }
    }
}
