//! The scenario table against the core, natively (no Wasm involved).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly

#[path = "scenario/harness.rs"]
mod harness;

use std::net::SocketAddr;

use harness::Subject;
use serde_json::Value;
use trunkguard::alert::Alert;
use trunkguard::sip::Transport;
use trunkguard::store::{MemoryStore, Store, StoreError};
use trunkguard::{Engine, Host, Input};

/// Two workers over one store, as two proxy threads would be.
struct Native {
    workers: Vec<Engine>,
    shared: SharedHost,
    last_good: Option<String>,
}

#[derive(Default)]
struct SharedHost {
    store: MemoryStore,
    alerts: Vec<Alert>,
    counter: u8,
}

impl Store for SharedHost {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get(key)
    }
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.store.set(key, value)
    }
    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        self.store.delete(key)
    }
}

impl Host for SharedHost {
    fn alert(&mut self, alert: &Alert) {
        self.alerts.push(alert.clone());
    }
    fn fill_random(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.counter = self.counter.wrapping_add(37);
            *b = self.counter;
        }
    }
}

impl Subject for Native {
    fn configure(&mut self, json: &str) -> Result<(), (String, String)> {
        for w in &mut self.workers {
            w.configure(json.as_bytes(), &mut self.shared)
                .map_err(|e| (e.path, e.reason))?;
        }
        self.last_good = Some(json.to_string());
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
        let transport: Transport = transport.parse().expect("transport");
        let input = Input {
            message,
            source,
            transport,
            local,
            now_ms,
        };
        let verdict = self.workers[worker].judge(&input, &mut self.shared);
        let alerts = self
            .shared
            .alerts
            .drain(..)
            .map(|a| serde_json::to_value(a).unwrap())
            .collect();
        (serde_json::to_value(verdict).unwrap(), alerts)
    }

    fn tick(&mut self, worker: usize, now_ms: u64) -> Vec<Value> {
        self.workers[worker]
            .tick(now_ms, &mut self.shared)
            .expect("tick");
        self.shared
            .alerts
            .drain(..)
            .map(|a| serde_json::to_value(a).unwrap())
            .collect()
    }

    fn reload(&mut self, worker: usize) {
        let mut fresh = Engine::new();
        if let Some(cfg) = &self.last_good {
            fresh
                .configure(cfg.as_bytes(), &mut self.shared)
                .expect("last good config");
        }
        self.workers[worker] = fresh;
    }
}

#[test]
fn scenario_table_passes_natively() {
    harness::run_all(&mut || {
        Box::new(Native {
            workers: vec![Engine::new(), Engine::new()],
            shared: SharedHost::default(),
            last_good: None,
        })
    });
}
