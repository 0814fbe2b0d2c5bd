#![no_main]
//! The Envoy filter's connection logic (crates/envoy/src/conn.rs) on arbitrary TCP bytes in
//! both directions, cut into chunks of a fuzzer-chosen size, with the real policy
//! judging each reassembled message: reassembly, probes, answers and edits must
//! return, never panic, whatever the client or the upstream sends.

use libfuzzer_sys::fuzz_target;
use trunkguard_envoy::conn::{Conn, Judge, OnRefusal};
use trunkguard::sip::Transport;
use trunkguard::{Engine, Input, Verdict};

#[path = "host.rs"]
mod host;
use host::H;

struct Policy {
    engine: Engine,
    host: H,
    tags: u32,
}

impl Judge for Policy {
    fn judge(&mut self, message: &[u8]) -> Verdict {
        let input = Input {
            message,
            source: "203.0.113.7:40000".parse().unwrap_or_else(|_| unreachable!()),
            transport: Transport::Tcp,
            local: None,
            now_ms: 1_000,
        };
        self.engine.judge(&input, &mut self.host)
    }
    fn to_tag(&mut self) -> String {
        self.tags += 1;
        format!("t{}", self.tags)
    }
}

const CONFIG: &[u8] = include_bytes!("../../examples/config.json");

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let chunk = usize::from(first % 64) + 1;
    let mut policy = Policy { engine: Engine::new(), host: H::default(), tags: 0 };
    if policy.engine.configure(CONFIG, &mut policy.host).is_err() {
        return;
    }
    for mode in [OnRefusal::Answer, OnRefusal::Close] {
        let mut conn = Conn::new(mode);
        for piece in rest.chunks(chunk) {
            let _ = conn.downstream(piece, &mut policy);
            let _ = conn.upstream(piece);
        }
    }
});
