//! Workloads shared by the native and the wasm benchmarks, so their ratio compares
//! the same work.

#![allow(dead_code)]

use std::net::SocketAddr;

use trunkguard::digest::{Algorithm, client_response, make_nonce};

pub const REALM: &str = "trunks.example.net";
pub const SECRET_HEX: &str = "0101010101010101010101010101010101010101010101010101010101010101";
pub const SECRET: [u8; 32] = [1u8; 32];
pub const NOW_MS: u64 = 1_000_000;
/// Store keys the benchmark hosts do not keep: the replay set's (src/replay.rs),
/// which would otherwise answer every repeat of one authorized message with a
/// challenge instead of measuring its verification.
pub const FORGOTTEN: &str = "tg/nc/";

/// A configuration with `trunks` trunk groups (pre-hashed HA1, as a provisioning
/// system would push them) and `acl` entries on the benchmarked trunk group.
pub fn config(trunks: usize, acl: usize) -> String {
    let mut tgs = Vec::with_capacity(trunks);
    for i in 0..trunks {
        let acl_entries: Vec<String> = if i == 0 {
            // The benchmarked source 203.0.113.7 matches the last entry.
            let mut v: Vec<String> = (0..acl.saturating_sub(1))
                .map(|j| format!("\"10.{}.{}.0/24\"", (j >> 8) & 0xff, j & 0xff))
                .collect();
            if acl > 0 {
                v.push("\"203.0.113.0/24\"".into());
            }
            v
        } else {
            Vec::new()
        };
        let ha1 = format!("{:032x}", i as u128 * 0x9e37_79b9_7f4a_7c15);
        let password = if i == 0 {
            "\"password\": \"bench-pass\"".to_string()
        } else {
            format!("\"ha1\": \"{ha1}\"")
        };
        tgs.push(format!(
            "{{\"id\": \"tg{i}\", \"username\": \"user{i}\", {password}, \"require_registration\": false, \"acl\": [{}], \"dids\": [\"+1555{i:07}\"]}}",
            acl_entries.join(",")
        ));
    }
    format!(
        "{{\"realm\": \"{REALM}\", \"core_networks\": [\"10.0.0.0/8\"], \"core_sockets\": [\"10.0.0.1:5060\"], \"locations\": [{{\"id\": \"loc\", \"contacts\": [\"noc@example.com\"], \"trunk_groups\": [{}]}}]}}",
        tgs.join(",")
    )
}

pub fn source() -> SocketAddr {
    "203.0.113.7:5060"
        .parse()
        .unwrap_or_else(|_| unreachable!())
}

pub fn options() -> Vec<u8> {
    b"OPTIONS sip:trunks.example.net SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.7:5060;branch=z9hG4bK-ka1\r\nMax-Forwards: 70\r\nFrom: <sip:user0@trunks.example.net>;tag=ka\r\nTo: <sip:trunks.example.net>\r\nCall-ID: ka-1@pbx\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n".to_vec()
}

pub fn in_dialog_bye() -> Vec<u8> {
    b"BYE sip:+15559876543@198.51.100.20:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.7:5060;branch=z9hG4bK-bye1\r\nMax-Forwards: 70\r\nFrom: <sip:user0@trunks.example.net>;tag=from-1\r\nTo: <sip:+15559876543@trunks.example.net>;tag=to-1\r\nCall-ID: call-1@pbx\r\nCSeq: 3 BYE\r\nContent-Length: 0\r\n\r\n".to_vec()
}

/// The REGISTER a PBX sends first, without credentials: the half of a registration
/// that earns the 401 (a nonce made and signed, the challenge written).
pub fn register_challenge() -> Vec<u8> {
    format!(
        "REGISTER sip:{REALM} SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.7:5060;branch=z9hG4bK-reg1\r\nMax-Forwards: 70\r\nFrom: <sip:user0@{REALM}>;tag=from-1\r\nTo: <sip:user0@{REALM}>\r\nCall-ID: REGISTER-1@pbx\r\nCSeq: 1 REGISTER\r\nContact: <sip:user0@203.0.113.7:5060>\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

fn authorized(method: &str, ruri: &str, header: &str, extra: &str) -> Vec<u8> {
    authorized_from(source(), method, ruri, header, extra)
}

/// An authorized INVITE of trunk group tg0 from `source`, with a nonce issued to it.
#[allow(dead_code)] // used by benches/native.rs only
pub fn invite_from(source: SocketAddr) -> Vec<u8> {
    authorized_from(
        source,
        "INVITE",
        "sip:+15559876543@trunks.example.net",
        "Proxy-Authorization",
        "",
    )
}

fn authorized_from(
    source: SocketAddr,
    method: &str,
    ruri: &str,
    header: &str,
    extra: &str,
) -> Vec<u8> {
    let nonce = make_nonce(
        &trunkguard::digest::NonceSecret::new(&SECRET),
        NOW_MS,
        0,
        source.ip(),
        REALM,
    );
    let response = client_response(
        Algorithm::Md5,
        "user0",
        REALM,
        "bench-pass",
        method,
        ruri,
        &nonce,
        "00000001",
        "0a4f113b",
    );
    format!(
        "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {source};branch=z9hG4bK-{method}\r\nMax-Forwards: 70\r\nFrom: <sip:user0@{REALM}>;tag=from-1\r\nTo: <{ruri}>\r\nCall-ID: {method}-1@pbx\r\nCSeq: 2 {method}\r\n{extra}{header}: Digest username=\"user0\", realm=\"{REALM}\", nonce=\"{nonce}\", uri=\"{ruri}\", response=\"{response}\", algorithm=MD5, qop=auth, nc=00000001, cnonce=\"0a4f113b\"\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

pub fn digest_invite() -> Vec<u8> {
    authorized(
        "INVITE",
        "sip:+15559876543@trunks.example.net",
        "Proxy-Authorization",
        "Contact: <sip:user0@203.0.113.7:5060>\r\n",
    )
}

pub fn digest_register() -> Vec<u8> {
    authorized(
        "REGISTER",
        "sip:trunks.example.net",
        "Authorization",
        "Contact: <sip:user0@203.0.113.7:5060>\r\nExpires: 600\r\n",
    )
}
