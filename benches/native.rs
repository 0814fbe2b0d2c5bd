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
        // The same authorized message is judged over and over: the replay set would
        // turn every repeat into a challenge. Its records are not kept, so each
        // iteration pays the full verification (common::FORGOTTEN).
        if key.starts_with(common::FORGOTTEN) {
            return Ok(());
        }
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

/// A message from `source` over UDP at the benchmarks' clock, on an unknown socket.
fn input(message: &[u8], source: std::net::SocketAddr) -> Input<'_> {
    Input {
        message,
        source,
        transport: Transport::Udp,
        local: None,
        now_ms: common::NOW_MS,
    }
}

fn messages(c: &mut Criterion) {
    let (mut e, mut host) = engine(10, 1);
    // Each workload is what its name says, on every iteration (an authorized request
    // is never answered with a challenge instead).
    for (msg, want) in [
        (common::options(), "allow"),
        (common::in_dialog_bye(), "allow"),
        (common::digest_invite(), "allow"),
        (common::digest_register(), "accept"),
        (common::register_challenge(), "challenge"),
    ] {
        for _ in 0..2 {
            let input = input(&msg, common::source());
            let v = e.judge(&input, &mut host);
            assert_eq!(serde_json::to_value(v.action).unwrap(), want);
        }
    }
    let mut g = c.benchmark_group("native/message");
    for (name, msg) in [
        ("options", common::options()),
        ("in_dialog_bye", common::in_dialog_bye()),
        ("digest_invite", common::digest_invite()),
        ("digest_register", common::digest_register()),
        ("register_challenge", common::register_challenge()),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let input = input(&msg, common::source());
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
                    let input = input(&msg, common::source());
                    e.judge(&input, &mut host)
                })
            },
        );
    }
    g.finish();
}

/// Authenticated calls refused from N distinct sources, each with its own alert:
/// the whole run's cost must grow linearly with N (the alert windows a trunk group
/// holds are capped, nothing is rewritten per window; docs/performance.md).
fn blocked_from_sources(c: &mut Criterion) {
    let mut g = c.benchmark_group("native/blocked_from_sources");
    g.sample_size(10);
    for n in [1_000u32, 4_000, 8_000] {
        let calls: Vec<(std::net::SocketAddr, Vec<u8>)> = (0..n)
            .map(|i| {
                // Outside tg0's access list (203.0.113.0/24): refused and alerted.
                let source = std::net::SocketAddr::from(([198, 18, (i >> 8) as u8, i as u8], 5060));
                (source, common::invite_from(source))
            })
            .collect();
        let (mut e, mut host) = engine(10, 1);
        let first = &calls[0];
        let v = e.judge(&input(&first.1, first.0), &mut host);
        assert_eq!(
            v.cause.map(|c| c.as_str()),
            Some("not_in_access_list"),
            "{v:?}"
        );
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_batched(
                || engine(10, 1),
                |(mut e, mut host)| {
                    for (source, message) in &calls {
                        e.judge(&input(message, *source), &mut host);
                    }
                    host.0.entries.len()
                },
                criterion::BatchSize::PerIteration,
            )
        });
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

criterion_group!(
    benches,
    parse,
    messages,
    scaling,
    blocked_from_sources,
    config_load
);
criterion_main!(benches);
