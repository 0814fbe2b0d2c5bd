//! Runs `tests/scenario/scenarios.json` against any [`Subject`]: the native core and
//! the compiled `.wasm` under wasmtime run the very same table. Each step is sent the
//! way a PBX would: a request that needs credentials is first sent bare, must be
//! challenged, and is then re-sent with a digest response computed from that
//! challenge's nonce. `auth.nonce` says otherwise: "previous" (the last nonce a
//! step used or was challenged with), "kept" (the nonce of the last step that said
//! `auth.keep: true`, as an attacker keeps one captured off the wire), or a literal.

#![allow(dead_code)]

use std::net::SocketAddr;

use serde_json::{Value, json};
use trunkguard::digest::{Algorithm, client_response};

/// Something that judges messages: one or more workers over one shared state.
pub trait Subject {
    /// Pushes a configuration to every worker: Ok(()) or Err((path, reason)).
    fn configure(&mut self, json: &str) -> Result<(), (String, String)>;
    /// Judges on `worker`; returns the verdict object and the alert events raised.
    fn judge(
        &mut self,
        worker: usize,
        message: &[u8],
        source: SocketAddr,
        local: Option<SocketAddr>,
        transport: &str,
        now_ms: u64,
    ) -> (Value, Vec<Value>);
    /// Closes alert windows; returns the summaries.
    fn tick(&mut self, worker: usize, now_ms: u64) -> Vec<Value>;
    /// Replaces a worker by a fresh instance (a reload of the .wasm): it gets the
    /// last good configuration again, state stays in the shared store.
    fn reload(&mut self, worker: usize);
}

pub fn table() -> Value {
    let text = include_str!("scenarios.json");
    serde_json::from_str(text).unwrap_or_else(|e| panic!("scenarios.json: {e}"))
}

/// Runs every scenario on fresh subjects made by `make`; panics listing every failure.
pub fn run_all(make: &mut dyn FnMut() -> Box<dyn Subject>) {
    let table = table();
    let configs = &table["configs"];
    let scenarios = table["scenarios"].as_array().expect("scenarios array");
    assert!(
        scenarios.len() >= 75,
        "the table shrank to {}",
        scenarios.len()
    );
    let mut failures = Vec::new();
    for sc in scenarios {
        let name = sc["name"].as_str().unwrap_or("?");
        let mut subject = make();
        if let Err(e) = run_one(subject.as_mut(), configs, sc) {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} scenario(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn run_one(subject: &mut dyn Subject, configs: &Value, sc: &Value) -> Result<(), String> {
    let config_name = sc["config"].as_str().unwrap_or("base");
    if config_name != "none" {
        let config = config_json(configs, config_name)?;
        subject
            .configure(&config)
            .map_err(|(p, r)| format!("config {config_name} refused: {p}: {r}"))?;
    }
    let mut last_nonce: Option<String> = None;
    let mut kept_nonce: Option<String> = None;
    for (i, step) in sc["steps"].as_array().ok_or("steps")?.iter().enumerate() {
        let at = step["at"].as_u64().unwrap_or(1_000 + i as u64 * 1_000);
        let worker = step["worker"].as_u64().unwrap_or(0) as usize;
        let ctx = |e: String| format!("step {i}: {e}");
        if let Some(name) = step.get("configure") {
            let json = match name.as_str() {
                Some(n) => config_json(configs, n).map_err(ctx)?,
                None => name["raw"].as_str().ok_or("configure.raw")?.to_string(),
            };
            let got = subject.configure(&json);
            match (&step["expect_error"], got) {
                (Value::Null, Ok(())) => {}
                (Value::Null, Err((p, r))) => return Err(ctx(format!("config refused: {p}: {r}"))),
                (want, Err((p, r))) => {
                    if want["path"].as_str().is_some_and(|w| w != p) {
                        return Err(ctx(format!(
                            "refused at {p} ({r}), expected path {}",
                            want["path"]
                        )));
                    }
                    if let Some(needle) = want["reason_contains"].as_str()
                        && !r.contains(needle)
                    {
                        return Err(ctx(format!("reason {r:?} lacks {needle:?}")));
                    }
                }
                (_, Ok(())) => return Err(ctx("a bad config was accepted".into())),
            }
            continue;
        }
        if step.get("reload").is_some() {
            subject.reload(worker);
            continue;
        }
        if step.get("tick").is_some() {
            let alerts = subject.tick(worker, at);
            check_alerts(step, &alerts).map_err(ctx)?;
            continue;
        }
        let send = &step["send"];
        let source: SocketAddr = send["source"]
            .as_str()
            .ok_or_else(|| ctx("send.source".into()))?
            .parse()
            .map_err(|e| ctx(format!("source: {e}")))?;
        let transport = send["transport"].as_str().unwrap_or("udp");
        let local = local_socket(send, source).map_err(ctx)?;
        let auth = &send["auth"];
        let mut credentials = None;
        let mut alerts_seen = Vec::new();
        if auth.is_object() {
            let nonce = match auth["nonce"].as_str().unwrap_or("challenge") {
                "challenge" => {
                    // A real PBX's first attempt carries no credentials.
                    let bare = build_message(send, source, transport, None);
                    let (v, alerts) =
                        subject.judge(worker, bare.as_bytes(), source, local, transport, at);
                    alerts_seen.extend(alerts);
                    if v["action"] != "challenge" {
                        return Err(ctx(format!("first attempt was not challenged: {v}")));
                    }
                    let n = nonce_from(&v, auth["algorithm"].as_str())
                        .ok_or_else(|| ctx(format!("no nonce in {v}")))?;
                    last_nonce = Some(n.clone());
                    n
                }
                "previous" => last_nonce
                    .clone()
                    .ok_or_else(|| ctx("no previous nonce".into()))?,
                "kept" => kept_nonce
                    .clone()
                    .ok_or_else(|| ctx("no kept nonce".into()))?,
                literal => literal.to_string(),
            };
            if auth["keep"].as_bool() == Some(true) {
                kept_nonce = Some(nonce.clone());
            }
            credentials = Some(nonce);
        }
        let msg = match send["raw"].as_str() {
            Some(raw) => raw.replace("\\r\\n", "\r\n"),
            None => build_message(send, source, transport, credentials.as_deref()),
        };
        let (verdict, alerts) = subject.judge(worker, msg.as_bytes(), source, local, transport, at);
        alerts_seen.extend(alerts);
        if verdict["action"] == "challenge"
            && let Some(n) = nonce_from(&verdict, auth["algorithm"].as_str())
        {
            last_nonce = Some(n);
        }
        check_verdict(&step["expect"], &verdict).map_err(ctx)?;
        check_alerts(step, &alerts_seen).map_err(ctx)?;
    }
    Ok(())
}

/// The proxy socket a step's message arrives on: `send.local` ("none" for a host
/// that does not know it), else the core-facing socket of the table's configs
/// (10.0.0.1:5060) for a core source and the public one (192.0.2.1:5060) for the
/// rest, as in a correctly wired proxy. Attack scenarios name the wrong one.
fn local_socket(send: &Value, source: SocketAddr) -> Result<Option<SocketAddr>, String> {
    match send["local"].as_str() {
        Some("none") => Ok(None),
        Some(l) => l
            .parse()
            .map(Some)
            .map_err(|e| format!("send.local {l:?}: {e}")),
        None => {
            let core = match trunkguard::acl::canonical_ip(source.ip()) {
                std::net::IpAddr::V4(v4) => v4.octets()[0] == 10,
                std::net::IpAddr::V6(v6) => v6.segments()[0] == 0xfd00 && v6.segments()[1] == 0xc0,
            };
            let socket = if core {
                "10.0.0.1:5060"
            } else {
                "192.0.2.1:5060"
            };
            socket.parse().map(Some).map_err(|e| format!("{e}"))
        }
    }
}

fn config_json(configs: &Value, name: &str) -> Result<String, String> {
    let c = configs
        .get(name)
        .ok_or_else(|| format!("no config {name:?}"))?;
    Ok(c.to_string())
}

fn nonce_from(verdict: &Value, algorithm: Option<&str>) -> Option<String> {
    let headers = verdict["headers"].as_array()?;
    let wanted = algorithm.unwrap_or("");
    let value = headers
        .iter()
        .filter_map(|h| h[1].as_str())
        .find(|v| wanted.is_empty() || v.contains(&format!("algorithm={wanted},")))?;
    let start = value.find("nonce=\"")? + 7;
    let end = value[start..].find('"')? + start;
    Some(value[start..end].to_string())
}

/// Builds a request as a PBX (or the carrier core) would send it.
pub fn build_message(
    send: &Value,
    source: SocketAddr,
    transport: &str,
    nonce: Option<&str>,
) -> String {
    let method = send["method"].as_str().unwrap_or("INVITE");
    let register = method == "REGISTER";
    let user = send["auth"]["user"]
        .as_str()
        .or(send["from"].as_str())
        .unwrap_or("pbx");
    let ruri = send["ruri"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| {
            if register {
                "sip:trunks.example.net".into()
            } else {
                "sip:+15559876543@trunks.example.net".into()
            }
        });
    let call_id = send["call_id"].as_str().unwrap_or("call-1@pbx");
    let cseq = send["cseq"].as_u64().unwrap_or(1);
    let to = if register {
        format!("<sip:{user}@trunks.example.net>")
    } else {
        format!("<{ruri}>")
    };
    let to_tag = send["to_tag"]
        .as_str()
        .map(|t| format!(";tag={t}"))
        .unwrap_or_default();
    let branch: String = call_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let mut m = format!(
        "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/{} {source};branch=z9hG4bK-{branch}-{cseq}\r\nMax-Forwards: {}\r\nFrom: <sip:{user}@trunks.example.net>;tag=from-{cseq}\r\nTo: {to}{to_tag}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n",
        transport.to_ascii_uppercase(),
        send["max_forwards"].as_u64().unwrap_or(70),
    );
    match &send["contact"] {
        Value::Null if register || method == "INVITE" => {
            let exp = send["contact_expires"]
                .as_u64()
                .map(|e| format!(";expires={e}"))
                .unwrap_or_default();
            m.push_str(&format!(
                "Contact: <sip:{user}@{source};transport={transport}>{exp}\r\n"
            ));
        }
        Value::String(c) if !c.is_empty() => m.push_str(&format!("Contact: {c}\r\n")),
        _ => {}
    }
    if let Some(e) = send["expires"].as_u64() {
        m.push_str(&format!("Expires: {e}\r\n"));
    }
    if let Some(nonce) = nonce {
        let auth = &send["auth"];
        let username = auth["user"].as_str().unwrap_or(user);
        let password = auth["password"].as_str().unwrap_or("");
        let realm = auth["realm"].as_str().unwrap_or("trunks.example.net");
        let alg_name = auth["algorithm"].as_str().unwrap_or("MD5");
        let alg = if alg_name == "SHA-256" {
            Algorithm::Sha256
        } else {
            Algorithm::Md5
        };
        // `auth.uri`: credentials computed for another Request-URI (a captured
        // answer replayed towards another number).
        let digest_uri = auth["uri"].as_str().unwrap_or(&ruri);
        // `auth.nc`: the nonce count (8 hex digits); `auth.qop: "none"`: an RFC 2069
        // answer, without qop, nc and cnonce.
        let nc = auth["nc"].as_str().unwrap_or("00000001");
        let header = if register || auth["header"] == "Authorization" {
            "Authorization"
        } else {
            "Proxy-Authorization"
        };
        if auth["qop"] == "none" {
            let response = trunkguard::digest::client_response_rfc2069(
                alg, username, realm, password, method, digest_uri, nonce,
            );
            // An `nc` here is not covered by the response: a replay attempt.
            let nc = auth["nc"]
                .as_str()
                .map(|nc| format!(", nc={nc}"))
                .unwrap_or_default();
            m.push_str(&format!(
                "{header}: Digest username=\"{username}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{digest_uri}\", response=\"{response}\", algorithm={alg_name}{nc}\r\n"
            ));
        } else {
            let response = client_response(
                alg, username, realm, password, method, digest_uri, nonce, nc, "0a4f113b",
            );
            m.push_str(&format!(
                "{header}: Digest username=\"{username}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{digest_uri}\", response=\"{response}\", algorithm={alg_name}, qop=auth, nc={nc}, cnonce=\"0a4f113b\"\r\n"
            ));
        }
    }
    m.push_str("Content-Length: 0\r\n\r\n");
    m
}

fn check_verdict(want: &Value, got: &Value) -> Result<(), String> {
    let Some(want) = want.as_object() else {
        return Err("step has no expect".into());
    };
    for (key, w) in want {
        match key.as_str() {
            "header" => {
                let pair = w.as_array().ok_or("header: [name, value]")?;
                let found = got["headers"]
                    .as_array()
                    .is_some_and(|hs| hs.iter().any(|h| h == &json!(pair)));
                if !found {
                    return Err(format!("header {w} missing from {got}"));
                }
            }
            "header_contains" => {
                let pair = w.as_array().ok_or("header_contains: [name, needle]")?;
                let found = got["headers"].as_array().is_some_and(|hs| {
                    hs.iter().any(|h| {
                        h[0] == pair[0]
                            && h[1]
                                .as_str()
                                .zip(pair[1].as_str())
                                .is_some_and(|(v, n)| v.contains(n))
                    })
                });
                if !found {
                    return Err(format!("no header {w} in {got}"));
                }
            }
            "headers_count" => {
                for (name, n) in w.as_object().ok_or("headers_count: {name: n}")? {
                    let count = got["headers"]
                        .as_array()
                        .map_or(0, |hs| hs.iter().filter(|h| h[0] == name.as_str()).count());
                    if Some(count as u64) != n.as_u64() {
                        return Err(format!("{count} {name} headers, expected {n}: {got}"));
                    }
                }
            }
            "algorithms" => {
                // The algorithm= of each challenge header, in order.
                let got_algs: Vec<Value> = got["headers"]
                    .as_array()
                    .map(|hs| {
                        hs.iter()
                            .filter_map(|h| h[1].as_str())
                            .filter_map(|v| v.split("algorithm=").nth(1))
                            .map(|rest| json!(rest.split(',').next().unwrap_or("")))
                            .collect()
                    })
                    .unwrap_or_default();
                if &json!(got_algs) != w {
                    return Err(format!("algorithms {got_algs:?}, expected {w}: {got}"));
                }
            }
            "reason_contains" => {
                let needle = w.as_str().unwrap_or("");
                if !got["reason"].as_str().is_some_and(|r| r.contains(needle)) {
                    return Err(format!("reason lacks {needle:?}: {got}"));
                }
            }
            _ => {
                if &got[key] != w {
                    return Err(format!(
                        "{key}: got {}, expected {w} (verdict {got})",
                        got[key]
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Every step states its alerts: none when `alerts` is absent.
fn check_alerts(step: &Value, got: &[Value]) -> Result<(), String> {
    let want: &[Value] = step["alerts"].as_array().map_or(&[], Vec::as_slice);
    if want.len() != got.len() {
        return Err(format!(
            "{} alert(s), expected {}: {got:?}",
            got.len(),
            want.len()
        ));
    }
    for (w, g) in want.iter().zip(got) {
        for (key, value) in w.as_object().ok_or("alert expectation must be an object")? {
            if &g[key] != value {
                return Err(format!(
                    "alert {key}: got {}, expected {value} in {g}",
                    g[key]
                ));
            }
        }
        for required in [
            "id",
            "kind",
            "location",
            "trunk_group",
            "recipients",
            "time",
            "at_ms",
            "count",
        ] {
            if g.get(required).is_none() {
                return Err(format!("alert lacks {required}: {g}"));
            }
        }
    }
    Ok(())
}
