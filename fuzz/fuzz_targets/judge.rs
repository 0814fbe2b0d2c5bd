#![no_main]
//! The whole decision path on arbitrary messages against a fixed configuration.

use libfuzzer_sys::fuzz_target;
use trunkguard::alert::Alert;
use trunkguard::sip::Transport;
use trunkguard::store::{MemoryStore, Store, StoreError};
use trunkguard::{Engine, Host, Input};

#[derive(Default)]
struct H(MemoryStore);
impl Store for H {
    fn get(&mut self, k: &str) -> Result<Option<Vec<u8>>, StoreError> { self.0.get(k) }
    fn set(&mut self, k: &str, v: &[u8]) -> Result<(), StoreError> { self.0.set(k, v) }
    fn delete(&mut self, k: &str) -> Result<(), StoreError> { self.0.delete(k) }
}
impl Host for H {
    fn alert(&mut self, _: &Alert) {}
    fn fill_random(&mut self, b: &mut [u8]) { b.fill(3) }
}

const CONFIG: &[u8] = include_bytes!("../../examples/config.json");

fuzz_target!(|data: &[u8]| {
    let mut host = H::default();
    let mut engine = Engine::new();
    if engine.configure(CONFIG, &mut host).is_err() {
        return;
    }
    for (source, transport) in [("203.0.113.7:5060", Transport::Udp), ("10.0.0.5:5060", Transport::Tcp)] {
        let input = Input { message: data, source: source.parse().unwrap_or_else(|_| unreachable!()), transport, local: None, now_ms: 1_000 };
        let _ = engine.judge(&input, &mut host);
    }
});
