//! The `trunkguard` command end to end: check, replay of JSON Lines (file and an
//! interactive stdin client answering its own challenge), and replay of a pcap made
//! from the project's own demo traffic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly

#[path = "common/module.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

const DEMO_SECRET: &str = "7472756e6b67756172642d64656d6f2d6e6f6e63652d7365637265742d303031";

fn root() -> PathBuf {
    common::workspace_root()
}

fn trunkguard() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_trunkguard"));
    c.arg("--module")
        .arg(common::module_path())
        .current_dir(root());
    c
}

fn lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn check_accepts_the_example_and_names_the_path_of_a_bad_config() {
    let ok = trunkguard()
        .args(["check", "examples/config.json"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );

    let dir = tempdir();
    let bad = dir.join("bad.json");
    let text = std::fs::read_to_string(root().join("examples/config.json"))
        .unwrap()
        .replace("192.0.2.0/28", "192.0.2.0/33");
    std::fs::write(&bad, text).unwrap();
    let out = trunkguard().arg("check").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("locations[1].trunk_groups[0].acl[0]"),
        "{said}"
    );
}

#[test]
fn missing_module_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_trunkguard"))
        .args([
            "--module",
            "/nonexistent/trunkguard.wasm",
            "check",
            "examples/config.json",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("scripts/build"));
}

fn replay_demo() -> Vec<Value> {
    let out = trunkguard()
        .args([
            "replay",
            "--config",
            "examples/config.json",
            "--summary",
            "--nonce-secret",
            DEMO_SECRET,
            "examples/traffic/demo.jsonl",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stderr);
    assert!(
        table.contains("not_registered_address [hq-pbx1]"),
        "summary table: {table}"
    );
    lines(&out.stdout)
}

#[test]
fn replay_of_the_demo_shows_allowed_challenged_blocked_calls_and_alerts() {
    let out = replay_demo();
    let verdicts: Vec<String> = out
        .iter()
        .filter(|l| l.get("verdict").is_some())
        .map(|l| {
            let v = &l["verdict"];
            format!(
                "{}{}",
                v["action"].as_str().unwrap(),
                v["cause"]
                    .as_str()
                    .map(|c| format!(":{c}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        [
            "challenge:auth_required",
            "accept:registered",
            "allow:pass_through",
            "challenge:auth_required",
            "allow:trunk",
            "allow:in_dialog",
            "reject:not_registered_address",
            "reject:not_registered_address",
            "reject:not_registered_address",
            "reject:not_registered_address",
            "reject:bad_credentials",
            "allow:trunk",
            "allow:trunk",
            "reject:not_in_access_list",
            "route:registered_contact",
            "reject:trunk_unavailable",
            "reject:unknown_did",
            "accept:registered",
            "allow:trunk",
        ]
    );
    let alerts: Vec<&Value> = out.iter().filter_map(|l| l.get("alert")).collect();
    let kinds: Vec<String> = alerts
        .iter()
        .map(|a| {
            format!(
                "{}{}",
                a["kind"].as_str().unwrap(),
                if a["summary"] == true {
                    format!(" x{}", a["count"])
                } else {
                    String::new()
                }
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "blocked_call",
            "blocked_call",
            "reg_ip_change",
            "blocked_call x3"
        ]
    );
    assert_eq!(
        alerts[0]["recipients"],
        serde_json::json!(["noc@example.com"])
    );
    assert_eq!(alerts[0]["registered"], "203.0.113.7:5060");
    assert_eq!(alerts[2]["old_ip"], "203.0.113.7");
    // Each alert line comes right before the verdict of the message that raised it.
    let first_alert = out.iter().position(|l| l.get("alert").is_some()).unwrap();
    assert_eq!(
        out[first_alert + 1]["verdict"]["cause"],
        "not_registered_address"
    );
}

#[test]
fn replay_on_stdin_answers_before_reading_on_so_a_client_can_answer_a_challenge() {
    let mut child = trunkguard()
        .args(["replay", "--config", "examples/config.json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let source = "203.0.113.7:5060";
    let register = |auth: Option<String>| {
        let mut m = format!(
            "REGISTER sip:trunks.example.net SIP/2.0\r\nVia: SIP/2.0/UDP {source};branch=z9hG4bK-r1\r\nMax-Forwards: 70\r\nFrom: <sip:hq1@trunks.example.net>;tag=a\r\nTo: <sip:hq1@trunks.example.net>\r\nCall-ID: r1\r\nCSeq: 1 REGISTER\r\nContact: <sip:hq1@{source}>\r\nExpires: 300\r\n"
        );
        if let Some(a) = auth {
            m.push_str(&a);
        }
        m.push_str("Content-Length: 0\r\n\r\n");
        serde_json::json!({"at_ms": 1000, "source": source, "message": m}).to_string()
    };
    writeln!(stdin, "{}", register(None)).unwrap();
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["verdict"]["action"], "challenge");
    // MD5 is offered first by default (digest.algorithms), for PBXs that read only
    // the first challenge.
    let header = v["verdict"]["headers"][0][1].as_str().unwrap();
    assert!(header.contains("algorithm=MD5"), "{header}");
    let nonce = header
        .split("nonce=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let response = trunkguard::digest::client_response(
        trunkguard::digest::Algorithm::Md5,
        "hq1",
        "trunks.example.net",
        "correct horse battery staple",
        "REGISTER",
        "sip:trunks.example.net",
        nonce,
        "00000001",
        "c0ffee",
    );
    let auth = format!(
        "Authorization: Digest username=\"hq1\", realm=\"trunks.example.net\", nonce=\"{nonce}\", uri=\"sip:trunks.example.net\", response=\"{response}\", qop=auth, nc=00000001, cnonce=\"c0ffee\"\r\n"
    );
    writeln!(stdin, "{}", register(Some(auth))).unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["verdict"]["action"], "accept", "{line}");
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

/// Writes the demo traffic as a pcap: UDP datagrams as they are, and each TCP message
/// split across two segments inside a header line, as a proxy may see it on the wire.
fn demo_pcap(path: &Path) {
    use etherparse::PacketBuilder;
    use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
    let text = std::fs::read_to_string(root().join("examples/traffic/demo.jsonl")).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = PcapWriter::with_header(
        file,
        PcapHeader {
            datalink: pcap_file::DataLink::ETHERNET,
            ..Default::default()
        },
    )
    .unwrap();
    // The PBXs' packets go to the public listener; the carrier core's to the
    // core-facing one the line names (config `core_sockets`), as a capture taken on
    // the edge would show them.
    let public_v4 = [192, 0, 2, 254];
    let mut tcp_seq = 1000u32;
    let mut pending_tcp: Vec<u8> = Vec::new();
    /// (at, source, message, over TCP, the socket it arrived on)
    type Segment = (u64, SocketAddr, Vec<u8>, bool, Option<SocketAddr>);
    let mut segments: Vec<Segment> = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let at = v["at_ms"].as_u64().unwrap();
        let src: SocketAddr = v["source"].as_str().unwrap().parse().unwrap();
        let msg = v["message"].as_str().unwrap().as_bytes().to_vec();
        let local = v["local"].as_str().map(|l| l.parse().unwrap());
        segments.push((at, src, msg, v["transport"] == "tcp", local));
    }
    for (at, src, msg, tcp, local) in segments {
        let (dst_v4, dst_port) = match local {
            Some(SocketAddr::V4(l)) => (l.ip().octets(), l.port()),
            _ => (public_v4, 5060),
        };
        let mut frames: Vec<Vec<u8>> = Vec::new();
        if tcp {
            // Split this message in two segments at an awkward place (inside a header).
            pending_tcp.extend_from_slice(&msg);
            let cut = pending_tcp.len() / 3;
            frames.push(pending_tcp[..cut].to_vec());
            frames.push(pending_tcp[cut..].to_vec());
            pending_tcp.clear();
        } else {
            frames.push(msg);
        }
        for payload in frames {
            let builder = match src {
                SocketAddr::V4(s) => PacketBuilder::ethernet2(
                    [2, 0, 0, 0, 0, 1],
                    [2, 0, 0, 0, 0, 2],
                )
                .ipv4(s.ip().octets(), dst_v4, 64),
                SocketAddr::V6(s) => {
                    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv6(
                        s.ip().octets(),
                        "2001:db8::fe"
                            .parse::<std::net::Ipv6Addr>()
                            .unwrap()
                            .octets(),
                        64,
                    )
                }
            };
            let mut frame = Vec::new();
            if tcp {
                let b = builder.tcp(src.port(), dst_port, tcp_seq, 65535);
                tcp_seq = tcp_seq.wrapping_add(payload.len() as u32);
                b.write(&mut frame, &payload).unwrap();
            } else {
                builder
                    .udp(src.port(), dst_port)
                    .write(&mut frame, &payload)
                    .unwrap();
            }
            let ts = std::time::Duration::from_millis(at);
            w.write_packet(&PcapPacket::new(ts, frame.len() as u32, &frame))
                .unwrap();
        }
    }
}

#[test]
fn replay_of_a_pcap_of_the_demo_traffic_gives_the_same_verdicts() {
    let dir = tempdir();
    let pcap = dir.join("demo.pcap");
    demo_pcap(&pcap);
    let out = trunkguard()
        .args([
            "replay",
            "--config",
            "examples/config.json",
            "--nonce-secret",
            DEMO_SECRET,
        ])
        .arg(&pcap)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_pcap = lines(&out.stdout);
    let strip = |v: &[Value]| -> Vec<Value> {
        // Alert ids, and the counter in each issued nonce, are random per run;
        // everything else must match.
        v.iter()
            .map(|l| {
                let mut l = l.clone();
                if let Some(a) = l.get_mut("alert") {
                    a.as_object_mut().unwrap().remove("id");
                }
                if let Some(headers) = l
                    .get_mut("verdict")
                    .and_then(|v| v.get_mut("headers"))
                    .and_then(Value::as_array_mut)
                {
                    for h in headers {
                        if let Some(text) = h[1].as_str()
                            && let Some(start) = text.find("nonce=\"")
                        {
                            let end = text[start + 7..].find('"').unwrap() + start + 7;
                            h[1] = Value::from(format!("{}{}", &text[..start + 7], &text[end..]));
                        }
                    }
                }
                l
            })
            .collect()
    };
    assert_eq!(strip(&from_pcap), strip(&replay_demo()));
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "trunkguard-cli-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn ha1_prints_the_digest_hashes_of_a_password_read_from_stdin() {
    let run = |args: &[&str], stdin: &str| {
        let mut child = trunkguard()
            .arg("ha1")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A username the command refuses ends it before it reads stdin: the pipe may
        // be closed by the time the password is written (the exit status says why).
        if let Err(e) = child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
        child.wait_with_output().unwrap()
    };
    // RFC 2617 §3.5's user: HA1 = MD5("Mufasa:testrealm@host.com:Circle Of Life").
    let out = run(
        &["--username", "Mufasa", "--realm", "testrealm@host.com"],
        "Circle Of Life\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ha1"], "939e7578ed9e3c518a452acee763bce9");
    assert_eq!(v["ha1_sha256"].as_str().unwrap().len(), 64);
    // What it prints is what the configuration accepts in place of the password.
    let only = run(
        &[
            "--username",
            "Mufasa",
            "--realm",
            "testrealm@host.com",
            "--algorithm",
            "SHA-256",
        ],
        "Circle Of Life",
    );
    let w: Value = serde_json::from_slice(&only.stdout).unwrap();
    assert_eq!(w["ha1_sha256"], v["ha1_sha256"]);
    assert!(w.get("ha1").is_none());
    for (args, stdin) in [
        (["--username", "a\"b", "--realm", "r"], "pw\n"),
        (["--username", "a", "--realm", "r"], "\n"),
    ] {
        let bad = run(&args, stdin);
        assert_eq!(bad.status.code(), Some(2), "{args:?}");
        assert!(bad.stdout.is_empty());
    }
}
