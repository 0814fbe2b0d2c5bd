//! The scenario table inside the compiled `.wasm`, under wasmtime, through the same
//! message ABI the Kamailio shim and the `trunkguard` command use.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly

#[path = "common/module.rs"]
mod common;
#[path = "scenario/harness.rs"]
mod harness;

use std::net::SocketAddr;

use harness::Subject;
use serde_json::Value;
use trunkguard_host::{MemoryKv, PolicyInstance};

struct Wasm {
    workers: Vec<PolicyInstance>,
}

impl Subject for Wasm {
    fn configure(&mut self, json: &str) -> Result<(), (String, String)> {
        for w in &mut self.workers {
            match w.configure(json.as_bytes()) {
                Ok(_) => {}
                Err(trunkguard_host::ConfigureError::Refused(r)) => return Err((r.path, r.reason)),
                Err(e) => panic!("host error: {e}"),
            }
        }
        Ok(())
    }

    fn judge(
        &mut self,
        worker: usize,
        message: &[u8],
        source: SocketAddr,
        local: Option<SocketAddr>,
        transport: &str,
        now_ms: u64,
    ) -> (Value, Vec<Value>) {
        let judged = self.workers[worker]
            .judge(
                message,
                source,
                local,
                transport.parse().expect("transport"),
                now_ms,
            )
            .expect("judge");
        let verdict = serde_json::to_value(&judged.verdict).expect("verdict JSON");
        let alerts = judged
            .alerts
            .iter()
            .map(|a| serde_json::from_str(a).expect("alert JSON"))
            .collect();
        (verdict, alerts)
    }

    fn tick(&mut self, worker: usize, now_ms: u64) -> Vec<Value> {
        self.workers[worker]
            .tick(now_ms)
            .expect("tick")
            .iter()
            .map(|a| serde_json::from_str(a).expect("alert JSON"))
            .collect()
    }

    fn reload(&mut self, worker: usize) {
        self.workers[worker].reload().expect("reload");
    }
}

#[test]
fn scenario_table_passes_inside_the_wasm_module() {
    let module = common::module();
    harness::run_all(&mut || {
        let kv = MemoryKv::default();
        let workers = (0..2)
            .map(|_| PolicyInstance::new(&module, Box::new(kv.clone())).expect("instantiate"))
            .collect();
        Box::new(Wasm { workers })
    });
}
