//! Per-message decision cost inside the `.wasm` under wasmtime, through the message
//! ABI (buffer write, call, JSON result read): what a host pays. Same workloads as
//! benches/native.rs; docs/performance.md records the ratio.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly

mod common;
#[path = "../tests/common/module.rs"]
mod module;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use trunkguard_host::{KvBackend, MemoryKv, PolicyInstance, StoreError, Transport};

/// [`MemoryKv`] that does not keep the replay set (see common::FORGOTTEN).
struct BenchKv(MemoryKv);

impl KvBackend for BenchKv {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(key)
    }
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        if key.starts_with(common::FORGOTTEN) {
            return Ok(());
        }
        self.0.set(key, value)
    }
    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        self.0.delete(key)
    }
}

fn policy(trunks: usize, acl: usize) -> PolicyInstance {
    let mut kv = MemoryKv::default();
    let _ = kv.set(
        trunkguard::store::keys::NONCE_SECRET,
        common::SECRET_HEX.as_bytes(),
    );
    let mut p = match PolicyInstance::new(&module::module(), Box::new(BenchKv(kv))) {
        Ok(p) => p,
        Err(e) => unreachable!("instantiate: {e}"),
    };
    match p.configure(common::config(trunks, acl).as_bytes()) {
        Ok(_) => p,
        other => unreachable!("bench config: {other:?}"),
    }
}

fn messages(c: &mut Criterion) {
    let mut p = policy(10, 1);
    let mut g = c.benchmark_group("wasm/message");
    for (name, msg) in [
        ("options", common::options()),
        ("in_dialog_bye", common::in_dialog_bye()),
        ("digest_invite", common::digest_invite()),
        ("digest_register", common::digest_register()),
        ("register_challenge", common::register_challenge()),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                p.judge(&msg, common::source(), None, Transport::Udp, common::NOW_MS)
                    .map(|j| j.verdict.code)
            })
        });
    }
    g.finish();
}

fn scaling(c: &mut Criterion) {
    let msg = common::digest_invite();
    let mut g = c.benchmark_group("wasm/digest_invite");
    g.sample_size(30);
    for (trunks, acl) in [
        (10, 1),
        (10_000, 1),
        (100_000, 1),
        (10, 1_000),
        (10, 100_000),
    ] {
        let mut p = policy(trunks, acl);
        g.bench_function(
            BenchmarkId::from_parameter(format!("trunks={trunks},acl={acl}")),
            |b| {
                b.iter(|| {
                    p.judge(&msg, common::source(), None, Transport::Udp, common::NOW_MS)
                        .map(|j| j.verdict.code)
                })
            },
        );
    }
    g.finish();
}

fn config_load(c: &mut Criterion) {
    let json = common::config(100_000, 1);
    let mut p = policy(10, 1);
    let mut g = c.benchmark_group("wasm/config_load");
    g.sample_size(10);
    g.bench_function("trunks=100000", |b| {
        b.iter(|| p.configure(json.as_bytes()).is_ok())
    });
    g.finish();
}

criterion_group!(benches, messages, scaling, config_load);
criterion_main!(benches);
