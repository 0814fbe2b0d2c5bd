//! The alert relay end to end (`trunkguard alerts serve`, docs/alerts.md): events in
//! over HTTP, e-mails out through a real SMTP server (aiosmtpd, run by
//! tests/alert_relay/smtp_sink.py), through outages, restarts and bad input.
//!
//! Tests that need aiosmtpd are ignored in the plain `cargo test`; scripts/test-alerts
//! makes a venv with it and runs them with TRUNKGUARD_PYTHON set. Everything listens
//! on 127.0.0.1 with ports the OS picks, and every process started here is killed
//! when its guard drops.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TOKEN: &str = "relay-test-token-7f3a";
/// Long enough for a loaded 2-core CI machine; every wait ends as soon as it can.
const WAIT: Duration = Duration::from_secs(20);

fn python() -> PathBuf {
    match std::env::var_os("TRUNKGUARD_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "TRUNKGUARD_PYTHON is not set: run scripts/test-alerts, which makes a venv \
             with aiosmtpd and sets it"
        ),
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh directory per test, removed when the test passes (kept for a look when
/// it fails).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("alert_relay")
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Polls `f` until it returns Some, or fails the test after `limit`.
fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The first line a child writes on stdout, within `WAIT`.
fn first_line(child: &mut Child, what: &str) -> String {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(WAIT) {
        Ok(line) if !line.is_empty() => line.trim().to_string(),
        _ => {
            let _ = child.kill();
            panic!("{what} did not start")
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// aiosmtpd, writing each accepted message into `dir` as JSON.
struct Sink {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Sink {
    fn start(scratch: &Scratch, port: u16, extra: &[&str]) -> Sink {
        let dir = scratch.path("mail");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(scratch.path("sink.log"))
            .unwrap();
        let mut child = Command::new(python())
            .arg(root().join("tests/alert_relay/smtp_sink.py"))
            .arg("--dir")
            .arg(&dir)
            .args(["--port", &port.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start the SMTP sink (TRUNKGUARD_PYTHON with aiosmtpd)");
        let line = first_line(&mut child, "the SMTP sink");
        let port = line
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("sink said {line:?}"));
        Sink { child, port, dir }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn messages(&self) -> Vec<Value> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
            .collect()
    }

    fn wait_for(&self, n: usize) -> Vec<Value> {
        poll(
            &format!("{n} e-mails in {}", self.dir.display()),
            WAIT,
            || {
                let m = self.messages();
                (m.len() >= n).then_some(m)
            },
        )
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `trunkguard alerts serve` on 127.0.0.1 with a port the OS picks.
struct Relay {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Relay {
    fn start(scratch: &Scratch, queue: &str, smtp_port: u16, extra: &[&str]) -> Relay {
        let log = scratch.path("relay.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_trunkguard"))
            .args(["alerts", "serve", "--listen", "127.0.0.1:0", "--queue"])
            .arg(scratch.path(queue))
            .args(
                [
                    ("--from", "trunkguard <alerts@relay.test>".to_string()),
                    ("--smtp-host", "127.0.0.1".into()),
                    ("--smtp-port", smtp_port.to_string()),
                    ("--smtp-tls", "none".into()),
                    ("--smtp-timeout", "5s".into()),
                    ("--retry-min", "100ms".into()),
                    ("--retry-max", "400ms".into()),
                ]
                .into_iter()
                // A test's own value of a flag wins.
                .filter(|(flag, _)| !extra.contains(flag))
                .flat_map(|(flag, value)| [flag.to_string(), value]),
            )
            .args(extra)
            .env("TRUNKGUARD_RELAY_TOKEN", TOKEN)
            .env_remove("TRUNKGUARD_SMTP_PASSWORD")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let line = first_line(&mut child, "the relay");
        let addr = line
            .strip_prefix("listening on http://")
            .and_then(|rest| rest.strip_suffix("/v1/alerts"))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "relay said {line:?}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        Relay { child, addr, log }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn post(&self, event: &Value) -> (u16, Value) {
        let auth = format!("Bearer {TOKEN}");
        let (code, body) = http(
            self.addr,
            "POST",
            "/v1/alerts",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            event.to_string().as_bytes(),
        );
        (code, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    fn health(&self) -> Value {
        let (code, body) = http(self.addr, "GET", "/v1/health", &[], b"");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Waits until nothing is pending.
    fn wait_idle(&self) -> Value {
        poll("an empty queue", WAIT, || {
            let h = self.health();
            (h["pending"] == 0).then_some(h)
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP/1.1 request on a fresh connection; returns status and body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // The relay may answer (413) without reading an oversized body: a failed write
    // is fine as long as the answer arrives.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// A blocked call with every field a host sends.
fn blocked_call(id: &str, recipients: &[&str]) -> Value {
    json!({
        "id": id, "kind": "blocked_call", "location": "hq", "trunk_group": "hq-pbx1",
        "recipients": recipients, "at_ms": 1_700_000_000_123u64,
        "time": "2023-11-14T22:13:20.123Z", "cause": "not_registered_address",
        "description": "the call came from an address other than the one currently registered",
        "source": "198.51.100.9:5060", "registered": "203.0.113.7:5060", "method": "INVITE",
        "call_id": "a84b4c76e66710@pc33", "from": "<sip:hq1@trunks.example.net>;tag=1928301774",
        "to": "<sip:+15557654321@trunks.example.net>", "count": 1
    })
}

fn ids_of(mails: &[Value]) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for m in mails {
        let id = m["message_id"]
            .as_str()
            .unwrap()
            .trim_matches(['<', '>'])
            .trim_end_matches("@trunkguard")
            .to_string();
        *seen.entry(id).or_default() += 1;
    }
    seen
}

/// How often each (event id, envelope recipient) was delivered.
fn deliveries(mails: &[Value]) -> BTreeMap<(String, String), usize> {
    let mut seen = BTreeMap::new();
    for m in mails {
        let id = ids_of(std::slice::from_ref(m)).into_keys().next().unwrap();
        for rcpt in m["rcpt_tos"].as_array().unwrap() {
            *seen
                .entry((id.clone(), rcpt.as_str().unwrap().to_string()))
                .or_default() += 1;
        }
    }
    seen
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
#[ignore = "needs aiosmtpd: run by scripts/test-alerts"]
fn events_in_emails_out_with_recipients_and_text() {
    let scratch = Scratch::new("in-out");
    let sink = Sink::start(&scratch, 0, &[]);
    let relay = Relay::start(&scratch, "queue", sink.port, &[]);

    let call = blocked_call(
        "18bcf5a1b7b-0a1b2c3d",
        &["noc@example.com", "ops@example.com"],
    );
    let ip_change = json!({
        "id": "18bcf5a1b7c-44556677", "kind": "reg_ip_change", "location": "hq",
        "trunk_group": "hq-pbx1", "recipients": ["noc@example.com"],
        "at_ms": 1_700_000_100_000u64, "time": "2023-11-14T22:15:00.000Z",
        "source": "198.51.100.9:5060", "old_ip": "203.0.113.7", "new_ip": "198.51.100.9",
        "method": "REGISTER", "call_id": "reg-1@pbx", "from": "<sip:hq1@trunks.example.net>;tag=9",
        "to": "<sip:hq1@trunks.example.net>", "count": 1
    });
    let mut summary = blocked_call("18bcf5a1b7b-0a1b2c3d-summary", &["noc@example.com"]);
    summary["summary"] = json!(true);
    summary["count"] = json!(9);
    summary["first_ms"] = json!(1_700_000_002_000u64);
    summary["last_ms"] = json!(1_700_000_010_000u64);
    summary["at_ms"] = json!(1_700_000_300_123u64);

    for ev in [&call, &ip_change, &summary] {
        let (code, answer) = relay.post(ev);
        assert_eq!(code, 202, "{answer}");
        assert_eq!(answer, json!({"status": "queued", "id": ev["id"]}));
    }
    let mails = sink.wait_for(4);
    let health = relay.wait_idle();
    assert_eq!(sink.messages().len(), 4, "{mails:#?}");
    assert_eq!(health["channels"]["smtp"]["state"], "up", "{health}");
    assert_eq!(health["channels"]["smtp"]["delivered"], 4, "{health}");

    let by_rcpt = |id: &str, rcpt: &str| -> Value {
        mails
            .iter()
            .find(|m| {
                m["message_id"] == format!("<{id}@trunkguard>") && m["rcpt_tos"] == json!([rcpt])
            })
            .unwrap_or_else(|| panic!("no mail {id} to {rcpt}: {mails:#?}"))
            .clone()
    };
    // One transaction per recipient; the To header names them all.
    for rcpt in ["noc@example.com", "ops@example.com"] {
        let m = by_rcpt("18bcf5a1b7b-0a1b2c3d", rcpt);
        assert_eq!(m["mail_from"], "alerts@relay.test");
        assert_eq!(m["from"], "trunkguard <alerts@relay.test>");
        assert_eq!(m["to"], "noc@example.com, ops@example.com");
        assert_eq!(m["auto_submitted"], "auto-generated");
        assert_eq!(
            m["subject"],
            "[trunkguard] Blocked call on hq-pbx1 (hq) from 198.51.100.9: not the registered address"
        );
        let body = m["body"].as_str().unwrap();
        for line in [
            "trunkguard refused a call on trunk group hq-pbx1 (location hq).",
            "Trunk group:  hq-pbx1",
            "Location:     hq",
            "Cause:        the call came from an address other than the one currently registered (not_registered_address)",
            "Source:       198.51.100.9:5060",
            "Registered:   203.0.113.7:5060",
            "Time:         2023-11-14 22:13:20.123 UTC",
            "Method:       INVITE",
            "Call-ID:      a84b4c76e66710@pc33",
            "From:         <sip:hq1@trunks.example.net>;tag=1928301774",
            "To:           <sip:+15557654321@trunks.example.net>",
            "What to do",
        ] {
            assert!(body.contains(line), "body lacks {line:?}:\n{body}");
        }
    }
    let m = by_rcpt("18bcf5a1b7c-44556677", "noc@example.com");
    assert_eq!(
        m["subject"],
        "[trunkguard] Registration of hq-pbx1 (hq) moved from 203.0.113.7 to 198.51.100.9"
    );
    let body = m["body"].as_str().unwrap();
    assert!(body.contains("Old IP:       203.0.113.7"), "{body}");
    assert!(body.contains("New IP:       198.51.100.9"), "{body}");

    let m = by_rcpt("18bcf5a1b7b-0a1b2c3d-summary", "noc@example.com");
    assert_eq!(
        m["subject"],
        "[trunkguard] 9 more blocked calls on hq-pbx1 (hq) from 198.51.100.9: not the registered address"
    );
    let body = m["body"].as_str().unwrap();
    for line in [
        "Repeats:       9",
        "First repeat:  2023-11-14 22:13:22.000 UTC",
        "Last repeat:   2023-11-14 22:13:30.000 UTC",
        "Call-ID:       a84b4c76e66710@pc33 (first)",
    ] {
        assert!(body.contains(line), "body lacks {line:?}:\n{body}");
    }

    let queue = scratch.path("queue");
    assert!(files(&queue.join("pending")).is_empty());
    assert_eq!(files(&queue.join("sent")).len(), 3);
}

#[test]
#[ignore = "needs aiosmtpd: run by scripts/test-alerts"]
fn a_duplicate_event_id_is_mailed_once() {
    let scratch = Scratch::new("dup");
    let sink = Sink::start(&scratch, 0, &[]);
    let relay = Relay::start(&scratch, "queue", sink.port, &[]);
    let ev = blocked_call("dup-1", &["noc@example.com"]);
    assert_eq!(relay.post(&ev).0, 202);
    // A host retrying at once (say its first answer was lost), then after delivery.
    let (code, answer) = relay.post(&ev);
    assert_eq!(code, 200);
    assert_eq!(answer, json!({"status": "duplicate", "id": "dup-1"}));
    sink.wait_for(1);
    relay.wait_idle();
    assert_eq!(relay.post(&ev).0, 200);
    // Give a wrongly re-queued copy time to go out before counting.
    let other = blocked_call("dup-2", &["noc@example.com"]);
    assert_eq!(relay.post(&other).0, 202);
    sink.wait_for(2);
    relay.wait_idle();
    let ids = ids_of(&sink.messages());
    assert_eq!(
        ids,
        BTreeMap::from([("dup-1".into(), 1), ("dup-2".into(), 1)])
    );
}

/// (method, path, authorization, body, status, words in the reason)
type BadCase<'a> = (&'a str, &'a str, Option<&'a str>, String, u16, &'a str);

#[test]
fn bad_input_gets_a_4xx_with_the_reason() {
    let scratch = Scratch::new("bad-input");
    // No SMTP server: nothing here may be queued anyway.
    let relay = Relay::start(&scratch, "queue", free_port(), &["--max-body", "2000"]);
    let auth = format!("Bearer {TOKEN}");
    let good = blocked_call("ok-1", &["noc@example.com"]);
    let mut no_kind = good.clone();
    no_kind.as_object_mut().unwrap().remove("kind");
    let mut bad_kind = good.clone();
    bad_kind["kind"] = json!("coffee_break");
    let mut bad_id = good.clone();
    bad_id["id"] = json!("../../etc/passwd");
    let mut bad_type = good.clone();
    bad_type["recipients"] = json!(["noc@example.com", 42]);
    let mut huge = good.clone();
    huge["description"] = json!("x".repeat(5000));

    let cases: Vec<BadCase<'_>> = vec![
        (
            "POST",
            "/v1/alerts",
            Some(&auth),
            "{\"id\": ".into(),
            400,
            "body is not JSON",
        ),
        (
            "POST",
            "/v1/alerts",
            Some(&auth),
            "[]".into(),
            400,
            "expected a JSON object",
        ),
        (
            "POST",
            "/v1/alerts",
            Some(&auth),
            no_kind.to_string(),
            400,
            "missing field `kind`",
        ),
        (
            "POST",
            "/v1/alerts",
            Some(&auth),
            bad_kind.to_string(),
            400,
            "unknown variant `coffee_break`",
        ),
        (
            "POST",
            "/v1/alerts",
            Some(&auth),
            bad_id.to_string(),
            400,
            "is not usable",
        ),
        (
            "POST",
            "/v1/alerts",
            Some(&auth),
            bad_type.to_string(),
            400,
            "recipients[1]: invalid type",
        ),
        (
            "POST",
            "/v1/alerts",
            Some(&auth),
            huge.to_string(),
            413,
            "larger than the limit of 2000",
        ),
        (
            "POST",
            "/v1/alerts",
            None,
            good.to_string(),
            401,
            "missing \"Authorization: Bearer",
        ),
        (
            "POST",
            "/v1/alerts",
            Some("Bearer guess"),
            good.to_string(),
            401,
            "wrong token",
        ),
        (
            "POST",
            "/v1/alert",
            Some(&auth),
            good.to_string(),
            404,
            "post events to /v1/alerts",
        ),
        (
            "GET",
            "/v1/alerts",
            Some(&auth),
            String::new(),
            405,
            "use POST",
        ),
    ];
    for (method, path, authorization, body, status, words) in &cases {
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(a) = authorization {
            headers.push(("Authorization", a));
        }
        let (code, answer) = http(relay.addr, method, path, &headers, body.as_bytes());
        assert_eq!(code, *status, "{method} {path}: {answer}");
        let reason: Value = serde_json::from_str(&answer).unwrap();
        let reason = reason["error"].as_str().unwrap_or_default();
        assert!(
            reason.contains(words),
            "{method} {path}: {reason:?} lacks {words:?}"
        );
    }
    assert_eq!(relay.health()["pending"], 0);
    assert!(files(&scratch.path("queue/pending")).is_empty());

    // A relay that allows another host only refuses this one, token or not.
    let strict = Relay::start(&scratch, "queue2", free_port(), &["--allow", "127.0.0.9"]);
    let (code, answer) = strict.post(&good);
    assert_eq!(code, 403);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1 is not allowed")
    );
    let (code, _) = http(strict.addr, "GET", "/v1/health", &[], b"");
    assert_eq!(code, 403);
    assert!(files(&scratch.path("queue2/pending")).is_empty());

    // Without a token the relay does not start.
    let out = Command::new(env!("CARGO_BIN_EXE_trunkguard"))
        .args([
            "alerts",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--from",
            "a@b.test",
        ])
        .arg("--queue")
        .arg(scratch.path("queue3"))
        .env_remove("TRUNKGUARD_RELAY_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no token"));
}

#[test]
#[ignore = "needs aiosmtpd: run by scripts/test-alerts"]
fn smtp_down_for_a_while_then_everything_is_delivered() {
    let scratch = Scratch::new("smtp-down");
    let mut sink = Sink::start(&scratch, 0, &[]);
    let port = sink.port;
    sink.stop();
    let relay = Relay::start(&scratch, "queue", port, &[]);
    let ids: Vec<String> = (1..=5).map(|n| format!("down-{n}")).collect();
    for id in &ids {
        assert_eq!(relay.post(&blocked_call(id, &["noc@example.com"])).0, 202);
    }
    // It keeps trying, and says why it cannot deliver.
    let health = poll("retries against the dead server", WAIT, || {
        let h = relay.health();
        (h["channels"]["smtp"]["failures"].as_u64().unwrap_or(0) >= 3).then_some(h)
    });
    assert_eq!(health["pending"], 5, "{health}");
    assert_eq!(health["channels"]["smtp"]["state"], "down", "{health}");
    assert!(
        health["channels"]["smtp"]["last_error"].is_string(),
        "{health}"
    );

    let sink = Sink::start(&scratch, port, &[]);
    sink.wait_for(5);
    let health = relay.wait_idle();
    assert_eq!(health["channels"]["smtp"]["state"], "up");
    let want: BTreeMap<String, usize> = ids.iter().map(|i| (i.clone(), 1)).collect();
    assert_eq!(ids_of(&sink.messages()), want);
    assert!(relay.log().contains("smtp is back"), "{}", relay.log());
}

#[test]
#[ignore = "needs aiosmtpd: run by scripts/test-alerts"]
fn relay_restarted_mid_queue_loses_nothing_and_sends_nothing_twice() {
    let scratch = Scratch::new("restart");
    // The first server defers one recipient (451), so one event is half delivered
    // when the relay dies.
    let mut sink = Sink::start(&scratch, 0, &["--defer", "later"]);
    let port = sink.port;
    let mut relay = Relay::start(&scratch, "queue", port, &[]);
    let post = |relay: &Relay, id: &str, rcpts: &[&str]| {
        let (code, answer) = relay.post(&blocked_call(id, rcpts));
        assert_eq!(code, 202, "{id}: {answer}");
    };
    for n in 1..=3 {
        post(&relay, &format!("r-{n}"), &["noc@example.com"]);
    }
    post(&relay, "r-8", &["noc@example.com", "later@example.com"]);
    sink.wait_for(4);
    poll("the deferred recipient to be retried", WAIT, || {
        let record = std::fs::read_to_string(scratch.path("queue/pending/r-8.json")).ok()?;
        let record: Value = serde_json::from_str(&record).ok()?;
        (record["done"] == json!(["mail:noc@example.com"])
            && record["retry"]["mail:later@example.com"]["attempts"].as_u64() >= Some(1))
        .then_some(())
    });

    // The server goes away; four more arrive; the relay dies with them queued.
    sink.stop();
    for n in 4..=7 {
        post(&relay, &format!("r-{n}"), &["noc@example.com"]);
    }
    poll("a failed attempt", WAIT, || {
        (relay.health()["channels"]["smtp"]["state"] == "down").then_some(())
    });
    relay.kill();
    let pending = files(&scratch.path("queue/pending"));
    assert_eq!(
        pending,
        ["r-4.json", "r-5.json", "r-6.json", "r-7.json", "r-8.json"],
        "{}",
        relay.log()
    );

    let sink = Sink::start(&scratch, port, &[]);
    let relay = Relay::start(&scratch, "queue", port, &[]);
    sink.wait_for(9);
    relay.wait_idle();
    let mut want: BTreeMap<(String, String), usize> = (1..=7)
        .map(|n| ((format!("r-{n}"), "noc@example.com".to_string()), 1))
        .collect();
    want.insert(("r-8".into(), "noc@example.com".into()), 1);
    want.insert(("r-8".into(), "later@example.com".into()), 1);
    assert_eq!(deliveries(&sink.messages()), want, "{}", relay.log());
    assert!(relay.log().contains(": 5 pending"), "{}", relay.log());
    // The restarted relay still knows what it delivered before.
    for id in ["r-1", "r-5", "r-8"] {
        let (code, _) = relay.post(&blocked_call(id, &["noc@example.com"]));
        assert_eq!(code, 200, "{id}");
    }
}

#[test]
#[ignore = "needs aiosmtpd: run by scripts/test-alerts"]
fn relay_killed_inside_an_smtp_transaction_delivers_after_restart() {
    let scratch = Scratch::new("kill-in-transaction");
    // A server that accepts the connection and never says a word.
    let tarpit = TcpListener::bind("127.0.0.1:0").unwrap();
    let tarpit_port = tarpit.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in tarpit.incoming() {
            held.push(conn);
            let _ = tx.send(());
        }
    });
    let mut relay = Relay::start(&scratch, "queue", tarpit_port, &["--smtp-timeout", "30s"]);
    assert_eq!(
        relay.post(&blocked_call("t-1", &["noc@example.com"])).0,
        202
    );
    rx.recv_timeout(WAIT)
        .expect("the relay connects to the SMTP server");
    relay.kill();
    assert_eq!(files(&scratch.path("queue/pending")), ["t-1.json"]);

    let sink = Sink::start(&scratch, 0, &[]);
    let relay = Relay::start(&scratch, "queue", sink.port, &[]);
    sink.wait_for(1);
    relay.wait_idle();
    assert_eq!(
        ids_of(&sink.messages()),
        BTreeMap::from([("t-1".into(), 1)])
    );
}

/// A webhook receiver: records each request; answers the first `fail_first` with 503.
struct Hook {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(String, String)>>>,
}

impl Hook {
    fn start(fail_first: usize) -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        length = v.trim().parse().unwrap();
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                seen2
                    .lock()
                    .unwrap()
                    .push((head, String::from_utf8(body).unwrap()));
                let status = if count.fetch_add(1, Ordering::SeqCst) < fail_first {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                };
                let _ = conn.write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
        Hook { addr, seen }
    }
}

#[test]
#[ignore = "needs aiosmtpd: run by scripts/test-alerts"]
fn events_are_forwarded_to_webhooks_until_accepted() {
    // The URL on the command line (--webhook), and read from a file (--webhook-file),
    // which keeps it out of the command line every local user can read.
    for by_file in [false, true] {
        forwarded_to_a_webhook_until_accepted(by_file);
    }
}

fn forwarded_to_a_webhook_until_accepted(by_file: bool) {
    let scratch = Scratch::new(if by_file { "webhook-file" } else { "webhook" });
    let sink = Sink::start(&scratch, 0, &[]);
    let hook = Hook::start(1);
    let url = format!("http://{}/hooks/secret-path", hook.addr);
    let (flag, value) = if by_file {
        let file = scratch.path("chat-url");
        std::fs::write(&file, format!("{url}\n")).unwrap();
        ("--webhook-file", format!("chat={}", file.display()))
    } else {
        ("--webhook", format!("chat={url}"))
    };
    let relay = Relay::start(&scratch, "queue", sink.port, &[flag, &value]);
    if by_file {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", relay.child.id())).unwrap();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains("secret-path"),
            "the webhook URL is on the relay's command line"
        );
    }
    let ev = blocked_call("w-1", &["noc@example.com"]);
    assert_eq!(relay.post(&ev).0, 202);
    sink.wait_for(1);
    let health = relay.wait_idle();
    let seen = hook.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one 503, then one accepted: {seen:#?}");
    for (head, body) in &seen {
        assert!(
            head.starts_with("POST /hooks/secret-path HTTP/1.1"),
            "{head}"
        );
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("idempotency-key: w-1"), "{head}");
        assert!(lower.contains("content-type: application/json"), "{head}");
        let got: Value = serde_json::from_str(body).unwrap();
        // The event as posted, plus the e-mail's text for chat systems.
        let mut want = ev.clone();
        want["text"] = got["text"].clone();
        assert_eq!(got, want);
        assert!(
            got["text"]
                .as_str()
                .unwrap()
                .starts_with("[trunkguard] Blocked call on hq-pbx1 (hq) from 198.51.100.9")
        );
    }
    assert_eq!(
        health["channels"]["webhook:chat"]["state"], "up",
        "{health}"
    );
    assert!(
        !health.to_string().contains("secret-path"),
        "health must not show the webhook URL: {health}"
    );
    assert_eq!(
        ids_of(&sink.messages()),
        BTreeMap::from([("w-1".into(), 1)])
    );
}

#[test]
#[ignore = "needs aiosmtpd: run by scripts/test-alerts"]
fn starttls_and_auth_are_used_and_checked() {
    let scratch = Scratch::new("tls-auth");
    let ca = scratch.path("ca.pem");
    let sink = Sink::start(
        &scratch,
        0,
        &[
            "--auth",
            "alerts:right-pw",
            "--tls-ca-out",
            ca.to_str().unwrap(),
        ],
    );
    let write = |name: &str, text: &str| {
        let p = scratch.path(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let right = write("right-pw", "right-pw\n");
    let wrong = write("wrong-pw", "wrong-pw\n");
    let ca = ca.to_str().unwrap();
    let common = |pw: &str| -> Vec<String> {
        [
            "--smtp-tls",
            "starttls",
            "--smtp-user",
            "alerts",
            "--smtp-password-file",
            pw,
        ]
        .map(String::from)
        .to_vec()
    };

    // An untrusted certificate (the public roots only) and a wrong password both
    // leave the event queued, with the reason in /v1/health.
    let untrusted: Vec<String> = common(&right);
    let wrong_pw: Vec<String> = [common(&wrong), vec!["--smtp-ca-file".into(), ca.into()]].concat();
    for (name, args, words) in [
        ("q-untrusted", untrusted, "certificate"),
        ("q-wrong", wrong_pw, "535"),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let relay = Relay::start(&scratch, name, sink.port, &args);
        assert_eq!(
            relay.post(&blocked_call("tls-1", &["noc@example.com"])).0,
            202
        );
        let health = poll("a refused attempt", WAIT, || {
            let h = relay.health();
            (h["channels"]["smtp"]["state"] == "down").then_some(h)
        });
        let error = health["channels"]["smtp"]["last_error"].as_str().unwrap();
        assert!(error.contains(words), "{name}: {error}");
        assert_eq!(health["pending"], 1);
    }
    assert!(sink.messages().is_empty());

    let good: Vec<String> = [common(&right), vec!["--smtp-ca-file".into(), ca.into()]].concat();
    let good: Vec<&str> = good.iter().map(String::as_str).collect();
    let relay = Relay::start(&scratch, "q-good", sink.port, &good);
    assert_eq!(
        relay.post(&blocked_call("tls-1", &["noc@example.com"])).0,
        202
    );
    let mails = sink.wait_for(1);
    relay.wait_idle();
    assert_eq!(mails[0]["tls"], true);
    assert_eq!(mails[0]["authenticated"], true);
}

#[test]
#[ignore = "needs aiosmtpd: run by scripts/test-alerts"]
fn starttls_required_but_not_offered_sends_nothing_in_clear() {
    // A server that offers no STARTTLS (a downgrade by whoever sits on the path
    // looks the same): the relay must keep the event queued rather than send the
    // fraud details, and the SMTP password, in clear (docs/alerts.md).
    let scratch = Scratch::new("no-starttls");
    let sink = Sink::start(&scratch, 0, &[]);
    let pw = scratch.path("pw");
    std::fs::write(&pw, "secret\n").unwrap();
    let relay = Relay::start(
        &scratch,
        "q",
        sink.port,
        &[
            "--smtp-tls",
            "starttls",
            "--smtp-user",
            "alerts",
            "--smtp-password-file",
            pw.to_str().unwrap(),
        ],
    );
    assert_eq!(
        relay.post(&blocked_call("plain-1", &["noc@example.com"])).0,
        202
    );
    let health = poll("a refused attempt", WAIT, || {
        let h = relay.health();
        (h["channels"]["smtp"]["state"] == "down").then_some(h)
    });
    let error = health["channels"]["smtp"]["last_error"]
        .as_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        error.contains("starttls") || error.contains("tls"),
        "{error}"
    );
    assert_eq!(health["pending"], 1);
    assert!(sink.messages().is_empty(), "{:?}", sink.messages());
}

#[test]
#[ignore = "needs aiosmtpd: run by scripts/test-alerts"]
fn a_refused_recipient_does_not_hold_back_the_others() {
    let scratch = Scratch::new("refused");
    let sink = Sink::start(&scratch, 0, &["--reject", "nobody"]);
    let relay = Relay::start(
        &scratch,
        "queue",
        sink.port,
        &["--copy-to", "carrier-noc@carrier.test"],
    );
    let ev = blocked_call("x-1", &["noc@example.com", "nobody@example.com"]);
    assert_eq!(relay.post(&ev).0, 202);
    let health = poll("the event to finish", WAIT, || {
        let h = relay.health();
        (h["pending"] == 0).then_some(h)
    });
    assert_eq!(health["failed"], 1, "{health}");
    let mut rcpts: Vec<String> = sink
        .messages()
        .iter()
        .map(|m| m["rcpt_tos"][0].as_str().unwrap().to_string())
        .collect();
    rcpts.sort();
    assert_eq!(rcpts, ["carrier-noc@carrier.test", "noc@example.com"]);
    let record: Value =
        serde_json::from_slice(&std::fs::read(scratch.path("queue/failed/x-1.json")).unwrap())
            .unwrap();
    assert_eq!(record["given_up"][0]["target"], "mail:nobody@example.com");
    assert!(
        record["given_up"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("550"),
        "{record}"
    );
    assert_eq!(
        record["done"],
        json!(["mail:noc@example.com", "mail:carrier-noc@carrier.test"])
    );
}
