//! The C interface of include/trunkguard.h, called as the Kamailio module calls it:
//! through the `extern "C"` functions, with C callbacks for the store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly

#[path = "../../../tests/common/module.rs"]
mod common;

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_void};
use std::io::{Read, Write};

use trunkguard_kamailio::ffi::*;
use trunkguard_kamailio::store::CStore;
use trunkguard_kamailio::verdict::{TgStr, TgVerdict};

const CONFIG: &str = r#"{"realm": "trunks.example.net", "locations": [{"id": "hq", "contacts": ["noc@example.com"],
  "trunk_groups": [{"id": "hq-pbx1", "username": "hq1", "password": "pw", "dids": ["+15551230000"]}]}]}"#;

const REGISTER: &str = "REGISTER sip:trunks.example.net SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.7:5060;branch=z9hG4bK-1\r\nMax-Forwards: 70\r\nFrom: <sip:hq1@trunks.example.net>;tag=a\r\nTo: <sip:hq1@trunks.example.net>\r\nCall-ID: r1\r\nCSeq: 1 REGISTER\r\nContact: <sip:hq1@203.0.113.7:5060>\r\nContent-Length: 0\r\n\r\n";

/// The store the C side would be: a map, and a switch that makes it fail.
#[derive(Default)]
struct Table {
    map: HashMap<Vec<u8>, Vec<u8>>,
    failing: bool,
    sets: u32,
}

unsafe extern "C" fn get(ctx: *mut c_void, key: *const u8, len: usize, sink: *mut c_void) -> i32 {
    let t = unsafe { &mut *ctx.cast::<Table>() };
    if t.failing {
        return -1;
    }
    let key = unsafe { std::slice::from_raw_parts(key, len) };
    match t.map.get(key) {
        Some(v) => {
            unsafe { tg_sink_put(sink, v.as_ptr().cast(), v.len()) };
            1
        }
        None => 0,
    }
}

unsafe extern "C" fn set(
    ctx: *mut c_void,
    key: *const u8,
    len: usize,
    value: *const u8,
    value_len: usize,
) -> i32 {
    let t = unsafe { &mut *ctx.cast::<Table>() };
    if t.failing {
        return -1;
    }
    let key = unsafe { std::slice::from_raw_parts(key, len) }.to_vec();
    let value = unsafe { std::slice::from_raw_parts(value, value_len) }.to_vec();
    t.map.insert(key, value);
    t.sets += 1;
    0
}

unsafe extern "C" fn del(ctx: *mut c_void, key: *const u8, len: usize) -> i32 {
    let t = unsafe { &mut *ctx.cast::<Table>() };
    if t.failing {
        return -1;
    }
    t.map
        .remove(unsafe { std::slice::from_raw_parts(key, len) });
    0
}

fn s(v: TgStr) -> String {
    if v.len == 0 {
        return String::new();
    }
    String::from_utf8(unsafe { std::slice::from_raw_parts(v.s, v.len) }.to_vec()).unwrap()
}

fn c(text: &str) -> CString {
    CString::new(text).unwrap()
}

fn err_text(buf: &[c_char]) -> String {
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

struct Fixture {
    policy: *mut TgPolicy,
    table: Box<Table>,
}

impl Fixture {
    fn new() -> Fixture {
        let mut table = Box::<Table>::default();
        let store = CStore {
            ctx: (&raw mut *table).cast(),
            get: Some(get),
            set: Some(set),
            del: Some(del),
        };
        let wasm = c(common::module_path().to_str().unwrap());
        let mut err = [0 as c_char; 256];
        let policy = unsafe { tg_policy_new(wasm.as_ptr(), store, err.as_mut_ptr(), err.len()) };
        assert!(!policy.is_null(), "{}", err_text(&err));
        let generation = unsafe {
            tg_policy_configure(
                policy,
                CONFIG.as_ptr().cast(),
                CONFIG.len(),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        assert_eq!(generation, 1, "{}", err_text(&err));
        Fixture { policy, table }
    }

    /// (return code, verdict fields as owned strings) for one message.
    fn judge(&mut self, msg: &str) -> (i32, TgVerdict, String) {
        let mut out: TgVerdict = unsafe { std::mem::zeroed() };
        let mut err = [0 as c_char; 256];
        let (src, local, transport) = (c("203.0.113.7:5060"), c(""), c("udp"));
        let rc = unsafe {
            tg_policy_judge(
                self.policy,
                msg.as_ptr().cast(),
                msg.len(),
                src.as_ptr(),
                local.as_ptr(),
                transport.as_ptr(),
                1_764_500_000_000,
                &mut out,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        (rc, out, err_text(&err))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        unsafe { tg_policy_free(self.policy) };
    }
}

#[test]
fn a_register_without_credentials_is_challenged_through_the_c_store() {
    let mut f = Fixture::new();
    let (rc, v, err) = f.judge(REGISTER);
    assert_eq!(rc, 0, "{err}");
    assert_eq!((v.action, v.code), (2, 401));
    assert_eq!(s(v.cause), "auth_required");
    let headers = unsafe { std::slice::from_raw_parts(v.headers, v.headers_len) };
    assert!(
        headers
            .iter()
            .any(|h| s(h.name) == "WWW-Authenticate" && s(h.value).contains("nonce=")),
        "a challenge carries its nonce"
    );
    // The nonce secret lives in the store the C side answers, not in the instance.
    assert!(f.table.sets > 0 && !f.table.map.is_empty());
}

#[test]
fn a_failing_store_gives_a_500_verdict_never_an_allow() {
    let mut f = Fixture::new();
    f.table.failing = true;
    let (rc, v, err) = f.judge(REGISTER);
    assert_eq!(rc, 0, "{err}");
    assert_eq!((v.action, v.code), (3, 500));
    assert_eq!(s(v.cause), "store_unavailable");
}

#[test]
fn a_refused_config_keeps_the_previous_one_and_says_why() {
    let f = Fixture::new();
    let bad = r#"{"realm": "", "locations": []}"#;
    let mut err = [0 as c_char; 256];
    let rc = unsafe {
        tg_policy_configure(
            f.policy,
            bad.as_ptr().cast(),
            bad.len(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    assert_eq!(rc, 0);
    assert!(err_text(&err).contains("realm"), "{}", err_text(&err));
    let rc = unsafe {
        tg_check(
            c(common::module_path().to_str().unwrap()).as_ptr(),
            bad.as_ptr().cast(),
            bad.len(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    assert_eq!(rc, 0, "tg_check refuses it the same way");
    let rc = unsafe {
        tg_check(
            c("/nonexistent/trunkguard.wasm").as_ptr(),
            CONFIG.as_ptr().cast(),
            CONFIG.len(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    assert_eq!(rc, -1, "a module that cannot load is not a refused config");
}

#[test]
fn bad_input_is_no_verdict_and_a_short_error_is_truncated_safely() {
    let mut f = Fixture::new();
    let mut out: TgVerdict = unsafe { std::mem::zeroed() };
    let mut err = [0 as c_char; 8];
    let (src, transport) = (c("not an address"), c("udp"));
    let rc = unsafe {
        tg_policy_judge(
            f.policy,
            REGISTER.as_ptr().cast(),
            REGISTER.len(),
            src.as_ptr(),
            std::ptr::null(),
            transport.as_ptr(),
            1,
            &mut out,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    assert_eq!(rc, -1);
    assert_eq!(err_text(&err), "bad sou", "7 bytes and the NUL");
    // The policy still works afterwards.
    assert_eq!(f.judge(REGISTER).0, 0);
}

#[test]
fn the_refusal_log_writes_a_line_for_a_logged_refusal_only() {
    let mut f = Fixture::new();
    let log = tg_refusal_log_new(20);
    let (src, transport) = (c("203.0.113.7:5060"), c("udp"));
    let mut lines: *const TgStr = std::ptr::null();
    // A first challenge is ordinary traffic: no line.
    let (_, v, _) = f.judge(REGISTER);
    let n = unsafe {
        tg_refusal_log_record(
            log,
            REGISTER.as_ptr().cast(),
            REGISTER.len(),
            src.as_ptr(),
            transport.as_ptr(),
            1_764_500_000_000,
            &v,
            &mut lines,
        )
    };
    assert_eq!(n, 0);
    // A refusal the module makes itself: one line.
    let n = unsafe {
        tg_refusal_log_record_host(
            log,
            REGISTER.as_ptr().cast(),
            REGISTER.len(),
            src.as_ptr(),
            transport.as_ptr(),
            1_764_500_000_000,
            404,
            c("no_dialog").as_ptr(),
            &mut lines,
        )
    };
    assert_eq!(n, 1);
    let line = s(unsafe { *lines });
    assert!(line.starts_with("trunkguard-refusal {"), "{line}");
    assert!(
        line.contains("\"cause\":\"no_dialog\"") && line.contains("203.0.113.7"),
        "{line}"
    );
    unsafe { tg_refusal_log_free(log) };
}

#[test]
fn cause_names_are_the_cores_in_order_and_end_with_null() {
    let all = trunkguard::verdict::Cause::ALL;
    for (i, cause) in all.iter().enumerate() {
        let name = tg_cause_name(u32::try_from(i).unwrap());
        assert!(!name.is_null(), "{i}");
        let name = unsafe { std::ffi::CStr::from_ptr(name) };
        assert_eq!(name.to_str().unwrap(), cause.as_str());
    }
    assert!(tg_cause_name(u32::try_from(all.len()).unwrap()).is_null());
    assert!(tg_cause_name(u32::MAX).is_null());
}

#[test]
fn failover_rule_is_the_cores() {
    for (code, retry_after, on_6xx) in [
        (408, 0, 0),
        (503, 0, 0),
        (503, 1, 0),
        (486, 0, 0),
        (604, 0, 1),
        (603, 0, 1),
    ] {
        assert_eq!(
            tg_fails_over(code, retry_after, on_6xx) == 1,
            trunkguard::verdict::fails_over(code, retry_after == 1, on_6xx == 1),
            "{code}"
        );
    }
}

#[test]
fn an_alert_is_posted_with_its_token_and_the_status_comes_back() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = c(&format!(
        "http://{}/v1/alerts",
        listener.local_addr().unwrap()
    ));
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("{\"kind\"") {
            let n = conn.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        conn.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        String::from_utf8_lossy(&seen).into_owned()
    });
    let event = r#"{"kind":"blocked_call"}"#;
    let mut err = [0 as c_char; 256];
    let status = unsafe {
        tg_post_alert(
            url.as_ptr(),
            c("s3cret-token").as_ptr(),
            event.as_ptr().cast(),
            event.len(),
            5_000,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    let request = server.join().unwrap();
    assert_eq!(status, 401, "{}", err_text(&err));
    // Header names are case-insensitive (RFC 9110 §5.1); the client writes them lower.
    let lower = request.to_ascii_lowercase();
    assert!(
        lower.contains("authorization: bearer s3cret-token"),
        "{request}"
    );
    assert!(
        lower.contains("content-type: application/json"),
        "{request}"
    );
    assert!(request.starts_with("POST /v1/alerts "), "{request}");
}

/// The structs and action numbers of include/trunkguard.h, as a C compiler lays them
/// out, are the Rust side's `#[repr(C)]` ones: a field added, moved or retyped on one
/// side only would have the module read the verdict at the wrong offsets.
#[test]
fn the_c_header_lays_out_what_the_rust_side_writes() {
    use std::mem::{offset_of, size_of};
    use trunkguard_kamailio::verdict::{TgHeader, action_code};

    let dir = std::env::temp_dir().join(format!("tg-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
    let fields: &[(&str, &str, usize)] = &[
        ("tg_str", "s", offset_of!(TgStr, s)),
        ("tg_str", "len", offset_of!(TgStr, len)),
        ("tg_header", "name", offset_of!(TgHeader, name)),
        ("tg_header", "value", offset_of!(TgHeader, value)),
        ("tg_store", "ctx", offset_of!(CStore, ctx)),
        ("tg_store", "get", offset_of!(CStore, get)),
        ("tg_store", "set", offset_of!(CStore, set)),
        ("tg_store", "del", offset_of!(CStore, del)),
        ("tg_verdict", "action", offset_of!(TgVerdict, action)),
        ("tg_verdict", "code", offset_of!(TgVerdict, code)),
        ("tg_verdict", "reason", offset_of!(TgVerdict, reason)),
        ("tg_verdict", "cause", offset_of!(TgVerdict, cause)),
        (
            "tg_verdict",
            "trunk_group",
            offset_of!(TgVerdict, trunk_group),
        ),
        ("tg_verdict", "target", offset_of!(TgVerdict, target)),
        ("tg_verdict", "next_hop", offset_of!(TgVerdict, next_hop)),
        ("tg_verdict", "headers", offset_of!(TgVerdict, headers)),
        (
            "tg_verdict",
            "headers_len",
            offset_of!(TgVerdict, headers_len),
        ),
        ("tg_verdict", "strip", offset_of!(TgVerdict, strip)),
        ("tg_verdict", "strip_len", offset_of!(TgVerdict, strip_len)),
        ("tg_verdict", "insert", offset_of!(TgVerdict, insert)),
        (
            "tg_verdict",
            "insert_len",
            offset_of!(TgVerdict, insert_len),
        ),
        ("tg_verdict", "alerts", offset_of!(TgVerdict, alerts)),
        (
            "tg_verdict",
            "alerts_len",
            offset_of!(TgVerdict, alerts_len),
        ),
        ("tg_verdict", "failover", offset_of!(TgVerdict, failover)),
        (
            "tg_verdict",
            "failover_after_ms",
            offset_of!(TgVerdict, failover_after_ms),
        ),
        (
            "tg_verdict",
            "failover_on_6xx",
            offset_of!(TgVerdict, failover_on_6xx),
        ),
    ];
    let sizes: &[(&str, usize)] = &[
        ("tg_str", size_of::<TgStr>()),
        ("tg_header", size_of::<TgHeader>()),
        ("tg_store", size_of::<CStore>()),
        ("tg_verdict", size_of::<TgVerdict>()),
    ];
    let actions: Vec<(String, i32)> = trunkguard::Action::ALL
        .iter()
        .map(|a| {
            (
                format!("TG_{}", a.as_str().to_ascii_uppercase()),
                action_code(*a),
            )
        })
        .collect();

    let mut program =
        String::from("#include <stdio.h>\n#include \"trunkguard.h\"\nint main(void) {\n");
    let mut expected = String::new();
    for (ty, field, off) in fields {
        program += &format!("printf(\"{ty}.{field} %zu\\n\", offsetof({ty}, {field}));\n");
        expected += &format!("{ty}.{field} {off}\n");
    }
    for (ty, size) in sizes {
        program += &format!("printf(\"sizeof {ty} %zu\\n\", sizeof({ty}));\n");
        expected += &format!("sizeof {ty} {size}\n");
    }
    for (name, code) in &actions {
        program += &format!("printf(\"{name} %d\\n\", (int){name});\n");
        expected += &format!("{name} {code}\n");
    }
    program += "printf(\"TG_INTERFACE_VERSION %d\\n\", TG_INTERFACE_VERSION);\n";
    expected += &format!(
        "TG_INTERFACE_VERSION {}\n",
        trunkguard_kamailio::ffi::INTERFACE_VERSION
    );
    program += "return 0;\n}\n";
    let source = dir.join("layout.c");
    let binary = dir.join("layout");
    std::fs::write(&source, program).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = std::process::Command::new(&cc)
        .arg("-I")
        .arg(include)
        .arg("-o")
        .arg(&binary)
        .arg(&source)
        .output()
        .unwrap_or_else(|e| panic!("{cc} (the C compiler the module build uses): {e}"));
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let ran = std::process::Command::new(&binary).output().unwrap();
    assert!(ran.status.success());
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(String::from_utf8(ran.stdout).unwrap(), expected);
}
