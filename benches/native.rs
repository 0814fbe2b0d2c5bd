//! Per-message decision cost of the core, natively (the baseline of the wasm/native
//! ratio; see docs/performance.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly

mod common;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use trunkguard::alert::Alert;
use trunkguard::sip::Transport;
use trunkguard::store::{MemoryStore, Store, StoreError, keys};
use trunkguard::{Engine, Host, Input};

#[derive(Default)]
struct BenchHost(MemoryStore);

impl Store for BenchHost {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(key)
    }
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.0.set(key, value)
    }
    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        self.0.delete(key)
    }
}

impl Host for BenchHost {
    fn alert(&mut self, _: &Alert) {}
    fn fill_random(&mut self, buf: &mut [u8]) {
        buf.fill(1);
    }
}

fn engine(trunks: usize, acl: usize) -> (Engine, BenchHost) {
    let mut host = BenchHost::default();
    let _ = host.set(keys::NONCE_SECRET, common::SECRET_HEX.as_bytes());
    let mut e = Engine::new();
    if e.configure(common::config(trunks, acl).as_bytes(), &mut host)
        .is_err()
    {
        unreachable!("bench config refused");
    }
    (e, host)
}

fn messages(c: &mut Criterion) {
    let (mut e, mut host) = engine(10, 1);
    let mut g = c.benchmark_group("native/message");
    for (name, msg) in [
        ("options", common::options()),
        ("in_dialog_bye", common::in_dialog_bye()),
        ("digest_invite", common::digest_invite()),
        ("digest_register", common::digest_register()),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let input = Input {
                    message: &msg,
                    source: common::source(),
                    transport: Transport::Udp,
                    local: None,
                    now_ms: common::NOW_MS,
                };
                e.judge(&input, &mut host)
            })
        });
    }
    g.finish();
}

fn scaling(c: &mut Criterion) {
    let msg = common::digest_invite();
    let mut g = c.benchmark_group("native/digest_invite");
    g.sample_size(30);
    for (trunks, acl) in [
        (10, 1),
        (10_000, 1),
        (100_000, 1),
        (10, 1_000),
        (10, 100_000),
    ] {
        let (mut e, mut host) = engine(trunks, acl);
        g.bench_function(
            BenchmarkId::from_parameter(format!("trunks={trunks},acl={acl}")),
            |b| {
                b.iter(|| {
                    let input = Input {
                        message: &msg,
                        source: common::source(),
                        transport: Transport::Udp,
                        local: None,
                        now_ms: common::NOW_MS,
                    };
                    e.judge(&input, &mut host)
                })
            },
        );
    }
    g.finish();
}

fn config_load(c: &mut Criterion) {
    let json = common::config(100_000, 1);
    let mut g = c.benchmark_group("native/config_load");
    g.sample_size(10);
    g.bench_function("trunks=100000", |b| {
        b.iter(|| {
            let mut host = BenchHost::default();
            Engine::new()
                .configure(json.as_bytes(), &mut host)
                .map(|_| ())
        })
    });
    g.finish();
}

/// The parser alone, to tell parsing cost from decision cost.
fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("native/parse");
    for (name, msg) in [
        ("options", common::options()),
        ("digest_invite", common::digest_invite()),
    ] {
        g.bench_function(format!("{name}/parse"), |b| {
            b.iter(|| {
                trunkguard::sip::parse(&msg, trunkguard::sip::Framing::Datagram)
                    .map(|m| m.is_request())
            })
        });
        g.bench_function(format!("{name}/parse+validate"), |b| {
            b.iter(|| {
                trunkguard::sip::parse(&msg, trunkguard::sip::Framing::Datagram)
                    .map(|m| m.validate().is_ok())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, parse, messages, scaling, config_load);
criterion_main!(benches);
