//! The `judge` fuzz target's seeds (fuzz/corpus/judge/, written by fuzz/seeds.py)
//! carry digest answers for the target's fixed nonce secret and clock. If they
//! stopped verifying (a change of nonce format, of the example config), the fuzzer
//! would silently stay out of the authenticated paths: this pins what each seed
//! reaches, without the fuzzer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly

use trunkguard::alert::Alert;
use trunkguard::sip::Transport;
use trunkguard::store::{MemoryStore, Store, StoreError, keys};
use trunkguard::{Engine, Host, Input};

#[derive(Default)]
struct H(MemoryStore);
impl Store for H {
    fn get(&mut self, k: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(k)
    }
    fn set(&mut self, k: &str, v: &[u8]) -> Result<(), StoreError> {
        self.0.set(k, v)
    }
    fn delete(&mut self, k: &str) -> Result<(), StoreError> {
        self.0.delete(k)
    }
}
impl Host for H {
    fn alert(&mut self, _: &Alert) {}
    fn fill_random(&mut self, b: &mut [u8]) {
        b.fill(3)
    }
}

fn seed(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/fuzz/corpus/judge/{name}.sip",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn every_judge_seed_reaches_the_path_it_is_named_after() {
    let mut host = H::default();
    host.set(
        keys::NONCE_SECRET,
        "0707070707070707070707070707070707070707070707070707070707070707".as_bytes(),
    )
    .unwrap();
    let mut engine = Engine::new();
    engine
        .configure(
            &std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/config.json")).unwrap(),
            &mut host,
        )
        .unwrap();
    let cases = [
        (
            "register-hq",
            "203.0.113.7:5060",
            "192.0.2.1:5060",
            "accept",
            "registered",
        ),
        (
            "invite-hq",
            "203.0.113.7:5060",
            "192.0.2.1:5060",
            "allow",
            "trunk",
        ),
        (
            "register-hq-sha256",
            "203.0.113.7:5060",
            "192.0.2.1:5060",
            "accept",
            "registered",
        ),
        (
            "invite-branch",
            "192.0.2.10:5060",
            "192.0.2.1:5060",
            "allow",
            "trunk",
        ),
        (
            "invite-branch-nc2",
            "192.0.2.10:5060",
            "192.0.2.1:5060",
            "allow",
            "trunk",
        ),
        (
            "invite-wrong-password",
            "203.0.113.7:5060",
            "192.0.2.1:5060",
            "reject",
            "bad_credentials",
        ),
        (
            "invite-core",
            "10.0.0.5:5060",
            "10.0.0.1:5060",
            "route",
            "registered_contact",
        ),
        (
            "bye-in-dialog",
            "203.0.113.7:5060",
            "192.0.2.1:5060",
            "allow",
            "in_dialog",
        ),
        (
            "options",
            "203.0.113.7:5060",
            "192.0.2.1:5060",
            "allow",
            "pass_through",
        ),
        (
            "unregister-hq",
            "203.0.113.7:5060",
            "192.0.2.1:5060",
            "accept",
            "unregistered",
        ),
    ];
    for (name, source, local, action, cause) in cases {
        let message = seed(name);
        let v = engine.judge(
            &Input {
                message: &message,
                source: source.parse().unwrap(),
                transport: Transport::Udp,
                local: Some(local.parse().unwrap()),
                now_ms: 1_000,
            },
            &mut host,
        );
        let got = serde_json::to_value(&v).unwrap();
        assert_eq!(
            (got["action"].as_str(), got["cause"].as_str()),
            (Some(action), Some(cause)),
            "{name}: {got}"
        );
    }
}
