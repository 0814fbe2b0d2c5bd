//! The proxy-wasm front for Envoy: a network filter in front
//! of `tcp_proxy` for SIP over TCP (and TLS terminated by Envoy), and an alert
//! singleton (`envoy.bootstrap.wasm`). `docs/envoy.md` describes its deployment.
//!
//! - `stream`, `probe`, `conn`: reassembly of SIP messages from TCP chunks, and the
//!   delivery of the policy's answers on the upstream's refusal of a probe.
//! - `txn`: the core's store over Envoy shared data, with CAS and retries.
//! - `slots`: connections held per source, each worker VM counting its own.
//! - `outbox`: the singleton's alert delivery queue; `keeper`: its keeping of the
//!   state outside Envoy, so that a restart loses nothing.
//! - `host` (every `unsafe` and host call), `metrics`, `shared`, `filter` (root
//!   contexts), `stream_context` (a connection's stream context), `singleton`: the
//!   glue, built for wasm32 only.
//!
//! The pure modules build on any target so that `cargo test` runs their tests
//! natively.

pub mod conn;
pub mod keeper;
pub mod outbox;
pub mod probe;
pub mod slots;
pub mod stream;
pub mod txn;

#[cfg(target_arch = "wasm32")]
mod filter;
#[cfg(target_arch = "wasm32")]
mod host;
#[cfg(target_arch = "wasm32")]
mod metrics;
#[cfg(target_arch = "wasm32")]
mod shared;
#[cfg(target_arch = "wasm32")]
mod singleton;
#[cfg(target_arch = "wasm32")]
mod stream_context;

/// Called by Envoy once the module is loaded: every root context (filter or alert
/// singleton, told apart by their `root_id`) is a [`filter::Root`].
#[cfg(target_arch = "wasm32")]
#[unsafe(no_mangle)]
pub extern "C" fn _initialize() {
    proxy_wasm::set_root_context(|_| Box::new(filter::Root::new()));
}
