#![no_main]
//! The whole decision path on arbitrary messages against examples/config.json, from
//! a PBX's address, an access-listed one and the core (on its core-facing socket),
//! with a fixed nonce secret and clock so that the seed corpus (fuzz/seeds.py) holds
//! answers that verify: the fuzzer starts on the authenticated paths. A binding is
//! made first, so the call lock is in play, and each input is judged twice, so the
//! second meets the replay set.

use libfuzzer_sys::fuzz_target;
use trunkguard::sip::Transport;
use trunkguard::store::{Store, keys};
use trunkguard::{Engine, Input};

#[path = "host.rs"]
mod host;
use host::H;

const CONFIG: &[u8] = include_bytes!("../../examples/config.json");
const REGISTER: &[u8] = include_bytes!("../corpus/judge/register-hq.sip");
/// fuzz/seeds.py's SECRET, as the store holds it.
const SECRET_HEX: &str = "0707070707070707070707070707070707070707070707070707070707070707";
const NOW_MS: u64 = 1_000;

fn input<'a>(message: &'a [u8], source: &str, local: &str, transport: Transport) -> Input<'a> {
    Input {
        message,
        source: source.parse().unwrap_or_else(|_| unreachable!()),
        transport,
        local: Some(local.parse().unwrap_or_else(|_| unreachable!())),
        now_ms: NOW_MS,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut host = H::default();
    let _ = host.set(keys::NONCE_SECRET, SECRET_HEX.as_bytes());
    let mut engine = Engine::new();
    if engine.configure(CONFIG, &mut host).is_err() {
        return;
    }
    let _ = engine.judge(&input(REGISTER, "203.0.113.7:5060", "192.0.2.1:5060", Transport::Udp), &mut host);
    for (source, local, transport) in [
        ("203.0.113.7:5060", "192.0.2.1:5060", Transport::Udp),
        ("192.0.2.10:5060", "192.0.2.1:5060", Transport::Tcp),
        ("10.0.0.5:5060", "10.0.0.1:5060", Transport::Udp),
    ] {
        for _ in 0..2 {
            let _ = engine.judge(&input(data, source, local, transport), &mut host);
        }
    }
    let _ = engine.tick(NOW_MS + 3_600_000, &mut host);
});
