//! Generates `examples/traffic/demo.jsonl`, the README's demo, and checks that the
//! committed file is what the generator makes. The PBXs answer challenges with
//! responses computed for the fixed demo nonce secret that `scripts/demo` passes to
//! `trunkguard replay --nonce-secret`. Regenerate with `TRUNKGUARD_BLESS=1 cargo test
//! --release --test example_traffic`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly

#[path = "scenario/harness.rs"]
mod harness;

use std::net::SocketAddr;

use serde_json::{Value, json};
use trunkguard::digest::make_nonce;

pub const DEMO_SECRET_HEX: &str =
    "7472756e6b67756172642d64656d6f2d6e6f6e63652d7365637265742d303031";
const REALM: &str = "trunks.example.net";
/// 2026-11-26T12:00:00Z: the story's clock starts here.
const START_MS: u64 = 1_795_694_400_000;

fn secret() -> trunkguard::digest::NonceSecret {
    let mut s = [0u8; 32];
    for (i, b) in s.iter_mut().enumerate() {
        *b = u8::from_str_radix(&DEMO_SECRET_HEX[i * 2..i * 2 + 2], 16).unwrap();
    }
    trunkguard::digest::NonceSecret::new(&s)
}

/// (at_ms, send spec, answer the challenge with credentials?)
fn story() -> Vec<(u64, Value, bool)> {
    let hq =
        json!({"user": "hq1", "password": "correct horse battery staple", "algorithm": "SHA-256"});
    let branch = json!({"user": "branch1", "password": "branch-secret", "algorithm": "SHA-256"});
    let leaked = json!({"user": "hq1", "password": "correct horse battery staple"});
    let guess = json!({"user": "hq1", "password": "123456"});
    let pbx = "203.0.113.7:5060";
    let mut s = vec![
        // The HQ PBX registers: challenged, then accepted.
        (
            1_000,
            json!({"method": "REGISTER", "source": pbx, "expires": 600, "call_id": "reg-1@hq", "from": "hq1"}),
            false,
        ),
        (
            1_050,
            json!({"method": "REGISTER", "source": pbx, "expires": 600, "call_id": "reg-1@hq", "cseq": 2, "auth": hq}),
            true,
        ),
        (
            2_000,
            json!({"method": "OPTIONS", "source": pbx, "ruri": "sip:trunks.example.net", "call_id": "ka-1@hq", "from": "hq1"}),
            false,
        ),
        // An outbound call from the registered PBX: challenged, then allowed.
        (
            3_000,
            json!({"method": "INVITE", "source": pbx, "call_id": "call-1@hq", "from": "hq1"}),
            false,
        ),
        (
            3_040,
            json!({"method": "INVITE", "source": pbx, "call_id": "call-1@hq", "cseq": 2, "auth": hq}),
            true,
        ),
        (
            3_900,
            json!({"method": "BYE", "source": pbx, "call_id": "call-1@hq", "cseq": 3, "to_tag": "carrier-1", "from": "hq1"}),
            false,
        ),
        // Someone with hq1's leaked password calls from elsewhere: blocked, alerted.
        (
            4_000,
            json!({"method": "INVITE", "source": "198.51.100.66:5060", "call_id": "fraud-1", "auth": leaked}),
            true,
        ),
    ];
    for i in 2..=4 {
        s.push((4_000 + i * 100, json!({"method": "INVITE", "source": "198.51.100.66:5060", "call_id": format!("fraud-{i}"), "auth": leaked}), true));
    }
    s.extend([
        // A scanner guessing passwords.
        (5_000, json!({"method": "INVITE", "source": "198.51.100.99:5060", "call_id": "scan-1", "auth": guess}), true),
        // The branch's peer-to-peer trunk: inside its ACL allowed, outside blocked.
        (6_000, json!({"method": "INVITE", "source": "192.0.2.10:5060", "call_id": "br-1", "auth": branch, "ruri": "sip:+15559870001@trunks.example.net"}), true),
        (6_500, json!({"method": "INVITE", "source": "[2001:db8:7::20]:5060", "transport": "tcp", "call_id": "br-2", "auth": branch}), true),
        (6_800, json!({"method": "INVITE", "source": "203.0.113.200:5060", "call_id": "br-3", "auth": branch}), true),
        // Inbound calls from the carrier core.
        (7_000, json!({"method": "INVITE", "source": "10.0.0.5:5060", "local": "10.0.0.1:5060", "ruri": "sip:+15551230000@edge.example.net", "call_id": "in-1@core", "from": "carrier"}), false),
        (7_100, json!({"method": "INVITE", "source": "10.0.0.5:5060", "local": "10.0.0.1:5060", "ruri": "sip:+15557770000@edge.example.net", "call_id": "in-2@core", "from": "carrier"}), false),
        (7_200, json!({"method": "INVITE", "source": "10.0.0.5:5060", "local": "10.0.0.1:5060", "ruri": "sip:+15550000000@edge.example.net", "call_id": "in-3@core", "from": "carrier"}), false),
        // The HQ PBX comes back from a new address (new ISP): accepted, alerted.
        (8_000, json!({"method": "REGISTER", "source": "203.0.113.9:5060", "expires": 600, "call_id": "reg-2@hq", "auth": hq}), true),
        (8_500, json!({"method": "INVITE", "source": "203.0.113.9:5060", "call_id": "call-2@hq", "auth": hq}), true),
    ]);
    s
}

fn generate() -> String {
    let mut out = String::new();
    for (offset, send, with_auth) in story() {
        let at = START_MS + offset;
        let source: SocketAddr = send["source"].as_str().unwrap().parse().unwrap();
        let transport = send["transport"].as_str().unwrap_or("udp");
        let nonce = with_auth.then(|| make_nonce(&secret(), at, 0, source.ip(), REALM));
        let message = harness::build_message(&send, source, transport, nonce.as_deref());
        let mut line = json!({"at_ms": at, "source": source.to_string(), "transport": transport, "message": message});
        // The carrier's calls arrive on the proxy's core-facing socket (config
        // `core_sockets`); the PBXs' on the public one, which the input leaves out.
        if let Some(local) = send["local"].as_str() {
            line["local"] = json!(local);
        }
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

#[test]
fn demo_traffic_file_is_up_to_date() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/traffic/demo.jsonl");
    let fresh = generate();
    if std::env::var_os("TRUNKGUARD_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "{} is stale: run TRUNKGUARD_BLESS=1 cargo test --release --test example_traffic",
        path.display()
    );
}
