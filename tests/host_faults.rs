//! Bad things inside or under the module: a failing store, a trap, a broken `.wasm`.
//! None of them may turn into an allowed call, and none may lose the configuration
//! or the bindings.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly

#[path = "common/module.rs"]
mod common;

use trunkguard_host::{
    Action, Fault, HostError, MemoryKv, PolicyInstance, PolicyModule, Transport,
};

const CONFIG: &str = r#"{"realm": "trunks.example.net", "locations": [{"id": "hq", "contacts": ["noc@example.com"],
  "trunk_groups": [{"id": "hq-pbx1", "username": "hq1", "password": "pw", "require_registration": false}]}]}"#;

fn invite() -> Vec<u8> {
    b"INVITE sip:+15559876543@trunks.example.net SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.7:5060;branch=z9hG4bK-1\r\nMax-Forwards: 70\r\nFrom: <sip:hq1@trunks.example.net>;tag=a\r\nTo: <sip:+15559876543@trunks.example.net>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n".to_vec()
}

fn policy() -> (PolicyInstance, MemoryKv) {
    let kv = MemoryKv::default();
    let mut p = PolicyInstance::new(&common::module(), Box::new(kv.clone())).unwrap();
    p.configure(CONFIG.as_bytes()).unwrap();
    (p, kv)
}

#[test]
fn a_failing_store_refuses_with_500_never_allows() {
    let (mut p, _) = policy();
    p.set_fault(Some(Fault::StoreFailure));
    let j = p
        .judge(
            &invite(),
            "203.0.113.7:5060".parse().unwrap(),
            None,
            Transport::Udp,
            1_000,
        )
        .unwrap();
    assert_eq!(j.verdict.action, Action::Reject);
    assert_eq!(j.verdict.code, Some(500));
    assert_eq!(j.verdict.cause, Some(trunkguard::Cause::StoreUnavailable));
    // A call the policy would allow (peer-to-peer, no access list, the right
    // password), answered on a nonce issued before the store failed: refused too.
    p.set_fault(None);
    let src = "203.0.113.7:5060".parse().unwrap();
    let challenge = p
        .judge(&invite(), src, None, Transport::Udp, 2_000)
        .unwrap();
    let nonce = &nonce_of(&challenge.verdict);
    let uri = "sip:+15559876543@trunks.example.net";
    let response = trunkguard::digest::client_response(
        trunkguard::digest::Algorithm::Md5,
        "hq1",
        "trunks.example.net",
        "pw",
        "INVITE",
        uri,
        nonce,
        "00000001",
        "c0ffee",
    );
    let answered = String::from_utf8(invite()).unwrap().replace(
        "Content-Length: 0",
        &format!("Proxy-Authorization: Digest username=\"hq1\", realm=\"trunks.example.net\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{response}\", algorithm=MD5, qop=auth, nc=00000001, cnonce=\"c0ffee\"\r\nContent-Length: 0"),
    );
    p.set_fault(Some(Fault::StoreFailure));
    let j = p
        .judge(answered.as_bytes(), src, None, Transport::Udp, 2_010)
        .unwrap();
    assert_eq!(j.verdict.code, Some(500), "{:?}", j.verdict);
    // The same answer with the store back is allowed: the refusal was the store's.
    p.set_fault(None);
    let j = p
        .judge(answered.as_bytes(), src, None, Transport::Udp, 2_020)
        .unwrap();
    assert_eq!(j.verdict.action, Action::Allow, "{:?}", j.verdict);
}

#[test]
fn a_trap_is_a_host_error_and_the_next_call_has_config_and_state_back() {
    let (mut p, mut kv) = policy();
    let src = "203.0.113.7:5060".parse().unwrap();
    // State another worker wrote: it must survive this instance's trap.
    trunkguard_host::KvBackend::set(&mut kv, "tg/last_reg_ip/hq-pbx1", b"203.0.113.7").unwrap();
    // The first judged message reads the nonce secret from the store: trap there.
    p.set_fault(Some(Fault::TrapOnce));
    match p.judge(&invite(), src, None, Transport::Udp, 1_000) {
        Err(HostError::Trap(msg)) => assert!(msg.contains("injected trap"), "{msg}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    // A fresh instance answers, with the last good configuration and the same store.
    let again = p
        .judge(&invite(), src, None, Transport::Udp, 2_000)
        .unwrap();
    assert_eq!(
        again.verdict.action,
        Action::Challenge,
        "{:?}",
        again.verdict
    );
    // The fresh instance reads that state: a registration from elsewhere is a move
    // away from 203.0.113.7, alerted as such.
    let (v, alerts) = register_with(
        &mut p,
        ("hq1", "pw", "hq-pbx1"),
        "198.51.100.9:5060",
        3_000,
        None,
    );
    assert_eq!(v.action, Action::Accept, "{v:?}");
    assert!(
        alerts
            .iter()
            .any(|a| a.contains("\"reg_ip_change\"") && a.contains("\"old_ip\":\"203.0.113.7\"")),
        "{alerts:?}"
    );
}

#[test]
fn a_refused_config_keeps_the_last_good_one() {
    let (mut p, _) = policy();
    let Err(trunkguard_host::ConfigureError::Refused(refused)) =
        p.configure(br#"{"realm": "x", "locations": [], "oops": true}"#)
    else {
        panic!("the module must refuse it")
    };
    assert_eq!(refused.path, "oops");
    let j = p
        .judge(
            &invite(),
            "203.0.113.7:5060".parse().unwrap(),
            None,
            Transport::Udp,
            1_000,
        )
        .unwrap();
    assert_eq!(j.verdict.action, Action::Challenge, "still configured");
}

#[test]
fn non_utf8_and_binary_messages_get_400_not_a_crash() {
    let (mut p, _) = policy();
    for msg in [
        vec![0xff, 0xfe, 0x00, 0x01],
        b"INVITE \xff SIP/2.0\r\n\r\n".to_vec(),
        vec![0u8; 4096],
    ] {
        let j = p
            .judge(
                &msg,
                "203.0.113.7:5060".parse().unwrap(),
                None,
                Transport::Udp,
                1_000,
            )
            .unwrap();
        assert_eq!(
            (j.verdict.action, j.verdict.code),
            (Action::Reject, Some(400))
        );
    }
}

#[test]
fn a_corrupt_or_foreign_module_is_a_clear_load_error() {
    let err = PolicyModule::from_bytes(b"\0asm\x01\0\0\0garbage")
        .err()
        .expect("refused");
    assert!(matches!(err, HostError::Load(_)), "{err}");
    // A valid module that is not trunkguard (no exports, no ABI): refused at instantiation.
    let empty = PolicyModule::from_bytes(b"\0asm\x01\0\0\0").unwrap();
    let err = PolicyInstance::new(&empty, Box::new(MemoryKv::default()))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("tg_abi_version"), "{err}");
}

/// The nonce of a challenge's first header.
fn nonce_of(challenge: &trunkguard_host::Verdict) -> String {
    let header = &challenge.headers[0].1;
    let start = header.find("nonce=\"").unwrap() + 7;
    let end = start + header[start..].find('"').unwrap();
    header[start..end].to_string()
}

/// A REGISTER of `user` (password `password`) from `source`, answering `nonce`.
fn register(user: &str, password: &str, source: &str, nonce: Option<&str>) -> Vec<u8> {
    let uri = "sip:trunks.example.net";
    let mut m = format!(
        "REGISTER {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {source};branch=z9hG4bK-r\r\nMax-Forwards: 70\r\nFrom: <sip:{user}@trunks.example.net>;tag=a\r\nTo: <sip:{user}@trunks.example.net>\r\nCall-ID: r-{source}\r\nCSeq: 1 REGISTER\r\nContact: <sip:{user}@{source}>\r\nExpires: 600\r\n"
    );
    if let Some(nonce) = nonce {
        let response = trunkguard::digest::client_response(
            trunkguard::digest::Algorithm::Md5,
            user,
            "trunks.example.net",
            password,
            "REGISTER",
            uri,
            nonce,
            "00000001",
            "c0ffee",
        );
        m.push_str(&format!("Authorization: Digest username=\"{user}\", realm=\"trunks.example.net\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{response}\", algorithm=MD5, qop=auth, nc=00000001, cnonce=\"c0ffee\"\r\n"));
    }
    m.push_str("Content-Length: 0\r\n\r\n");
    m.into_bytes()
}

/// Registers `(user, password, trunk group)` from `source` through a challenge, with
/// `fault` set just before the answer is judged; returns that verdict and the alerts
/// it raised.
fn register_with(
    p: &mut PolicyInstance,
    (user, password, _trunk): (&str, &str, &str),
    source: &str,
    at: u64,
    fault: Option<Fault>,
) -> (trunkguard_host::Verdict, Vec<String>) {
    let src = source.parse().unwrap();
    let challenge = p
        .judge(
            &register(user, password, source, None),
            src,
            None,
            Transport::Udp,
            at,
        )
        .unwrap();
    let nonce = nonce_of(&challenge.verdict);
    p.set_fault(fault);
    let j = p
        .judge(
            &register(user, password, source, Some(&nonce)),
            src,
            None,
            Transport::Udp,
            at + 10,
        )
        .unwrap();
    (j.verdict, j.alerts)
}

const HQ2: (&str, &str, &str) = ("hq2", "pw2", "hq-pbx2");

/// A fresh instance with trunk group hq-pbx2 (registered mode) registered from
/// 203.0.113.7, and its store.
fn registered_hq2() -> (PolicyInstance, MemoryKv) {
    const CONFIG: &str = r#"{"realm": "trunks.example.net", "locations": [{"id": "hq", "contacts": ["noc@example.com"],
      "trunk_groups": [{"id": "hq-pbx2", "username": "hq2", "password": "pw2"}]}]}"#;
    let kv = MemoryKv::default();
    let mut p = PolicyInstance::new(&common::module(), Box::new(kv.clone())).unwrap();
    p.configure(CONFIG.as_bytes()).unwrap();
    let (v, _) = register_with(&mut p, HQ2, "203.0.113.7:5060", 1_000, None);
    assert_eq!(v.action, Action::Accept, "{v:?}");
    (p, kv)
}

#[test]
fn a_write_failing_inside_a_registration_leaves_nothing_half_registered() {
    // A registration from a new IP writes the replay record, the binding and the
    // last registration IP: fail each one in turn.
    for nth in 1..=3u32 {
        let (mut p, kv) = registered_hq2();
        let before = kv.snapshot();
        let (v, alerts) = register_with(
            &mut p,
            HQ2,
            "198.51.100.9:5060",
            2_000,
            Some(Fault::FailWrite(nth)),
        );
        assert_eq!(v.action, Action::Reject, "write {nth}: {v:?}");
        assert_eq!(
            v.cause,
            Some(trunkguard::Cause::StoreUnavailable),
            "write {nth}"
        );
        assert!(alerts.is_empty(), "write {nth}: {alerts:?}");
        // The call lock and the last registration IP are where they were.
        let after = kv.snapshot();
        for key in ["tg/binding/hq-pbx2", "tg/last_reg_ip/hq-pbx2"] {
            assert_eq!(after.get(key), before.get(key), "write {nth}: {key}");
        }
        // The PBX's retry registers, and the move is alerted.
        let (v, alerts) = register_with(&mut p, HQ2, "198.51.100.9:5060", 3_000, None);
        assert_eq!(v.action, Action::Accept, "write {nth}: {v:?}");
        assert!(
            alerts.iter().any(|a| a.contains("\"reg_ip_change\"")),
            "write {nth}: {alerts:?}"
        );
    }
}

#[test]
fn a_write_failing_in_the_alert_throttle_after_a_registration_still_sends_the_alert() {
    // Writes 4 to 6 of a move are the alert window and its lists: the binding has
    // moved by then, so the alert must go out (unthrottled) rather than be lost.
    for nth in 4..=6u32 {
        let (mut p, _) = registered_hq2();
        let (v, alerts) = register_with(
            &mut p,
            HQ2,
            "198.51.100.9:5060",
            2_000,
            Some(Fault::FailWrite(nth)),
        );
        assert_eq!(v.action, Action::Accept, "write {nth}: {v:?}");
        assert!(
            alerts.iter().any(|a| a.contains("\"reg_ip_change\"")),
            "write {nth}: {alerts:?}"
        );
        assert!(p.fault().is_none(), "write {nth} was never made");
    }
}

/// A module that calls `kv_get` from `tg_abi_version`, which the host calls while it
/// sets an instance up (the first time, after a trap, on a reload), and otherwise
/// answers nothing useful. Raw bytes: the test needs no WebAssembly toolchain.
fn module_calling_the_store_on_setup() -> Vec<u8> {
    fn section(id: u8, items: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![u8::try_from(items.len()).unwrap()];
        for i in items {
            body.extend_from_slice(i);
        }
        let mut out = vec![id, u8::try_from(body.len()).unwrap()];
        out.extend(body);
        out
    }
    fn name(n: &str) -> Vec<u8> {
        let mut out = vec![u8::try_from(n.len()).unwrap()];
        out.extend_from_slice(n.as_bytes());
        out
    }
    fn code(instructions: &[u8]) -> Vec<u8> {
        let mut body = vec![0]; // no locals
        body.extend_from_slice(instructions);
        body.push(0x0b);
        let mut out = vec![u8::try_from(body.len()).unwrap()];
        out.extend(body);
        out
    }
    let (i32_, i64_) = (0x7f, 0x7e);
    let functype = |params: &[u8], results: &[u8]| {
        let mut t = vec![0x60, u8::try_from(params.len()).unwrap()];
        t.extend_from_slice(params);
        t.push(u8::try_from(results.len()).unwrap());
        t.extend_from_slice(results);
        t
    };
    let types = [
        functype(&[i32_; 4], &[i64_]),                      // kv_get
        functype(&[], &[i32_]),                             // tg_abi_version
        functype(&[i32_], &[i32_]),                         // tg_buffer
        functype(&[i32_], &[i64_]),                         // tg_configure
        functype(&[i32_, i32_, i32_, i32_, i64_], &[i64_]), // tg_judge
        functype(&[i64_], &[i64_]),                         // tg_tick
    ];
    let mut import = name("trunkguard_host");
    import.extend(name("kv_get"));
    import.extend([0, 0]); // a function of type 0: function index 0
    let exports: Vec<Vec<u8>> = [
        "memory",
        "tg_abi_version",
        "tg_buffer",
        "tg_configure",
        "tg_judge",
        "tg_tick",
    ]
    .iter()
    .enumerate()
    .map(|(i, n)| {
        let mut e = name(n);
        e.extend(if i == 0 {
            [2, 0]
        } else {
            [0, u8::try_from(i).unwrap()]
        });
        e
    })
    .collect();
    let version = u8::try_from(trunkguard_host::ABI_VERSION).unwrap();
    let bodies = [
        // kv_get(0, 0, 0, 0), dropped; then the ABI version.
        code(&[
            0x41, 0, 0x41, 0, 0x41, 0, 0x41, 0, 0x10, 0, 0x1a, 0x41, version,
        ]),
        code(&[0x41, 0x80, 0x08]), // the buffer at 1024
        code(&[0x42, 0]),
        code(&[0x42, 0]),
        code(&[0x42, 0]),
    ];
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.extend(section(1, &types));
    m.extend(section(2, &[import]));
    m.extend(section(3, &[vec![1], vec![2], vec![3], vec![4], vec![5]]));
    m.extend(section(5, &[vec![0, 1]]));
    m.extend(section(7, &exports));
    m.extend(section(10, &bodies));
    m
}

/// Every instance gets a store of its own, and the memory the imports read must be
/// that store's: an import called while an instance is set up again (after a trap,
/// on a reload or a new `.wasm`) gets an error answer, never the previous
/// instance's memory (which wasmtime refuses with a panic: a crashed proxy worker).
#[test]
fn a_store_call_while_an_instance_is_set_up_again_is_answered_not_a_crash() {
    let module = PolicyModule::from_bytes(&module_calling_the_store_on_setup()).unwrap();
    let mut p = PolicyInstance::new(&module, Box::new(MemoryKv::default())).unwrap();
    p.reload().unwrap();
    p.replace_module(&module).unwrap();
}
