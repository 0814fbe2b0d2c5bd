//! The Rust half of Kamailio's `trunkguard.so` (docs/kamailio.md): the reference
//! wasmtime host (crates/host) behind the C interface of
//! `include/trunkguard.h`, which the C module (`c/`) calls from Kamailio's workers.
//!
//! Every `unsafe` of the crate is in [`ffi`]; the rest is safe Rust that owns the
//! memory the C side only borrows ([`verdict::Held`]).

pub mod ffi;
pub mod post;
pub mod store;
pub mod verdict;
