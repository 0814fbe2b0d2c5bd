//! trunkguard: a SIP-trunk access policy for proxies at a carrier's edge.
//!
//! The core is host-agnostic: it parses SIP, compiles the pushed configuration,
//! verifies digest credentials and decides what to do with each message. Hosts reach
//! it through one of the fronts, each a crate of its own: `trunkguard-abi`
//! (crates/abi), `trunkguard-envoy` (crates/envoy) and `trunkguard-js` (crates/js);
//! docs/architecture.md.

pub mod acl;
pub mod alert;
pub mod answer;
pub mod binding;
pub mod config;
pub mod digest;
pub mod engine;
pub mod index;
pub mod lockout;
pub mod policy;
pub mod refusal_log;
pub mod registration;
pub mod replay;
/// The SIP parser, its own crate (crates/sip) without `unsafe`.
pub use trunkguard_sip as sip;
pub mod store;
pub mod verdict;
pub mod wire;

pub use engine::{Engine, Host};
pub use policy::Input;
pub use verdict::{Action, Cause, Verdict};
