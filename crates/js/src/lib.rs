//! The wasm-bindgen front: a `TrunkPolicy` class for Node.js and
//! browsers. The same engine as every other host; state lives in a JavaScript store
//! object (a `Map` by default) so a Node.js host can share it between instances or
//! back it with Redis.

#![cfg(target_arch = "wasm32")]

use std::net::SocketAddr;

use js_sys::{Function, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;

use trunkguard::alert::Alert;
use trunkguard::engine::{Engine, Host};
use trunkguard::policy::Input;
use trunkguard::refusal_log::{self, RefusalLog};
use trunkguard::sip::Transport;
use trunkguard::store::{Store, StoreError};

// The TypeScript types of the verdict, kept in one file that the core's tests check
// against the Rust types (src/wire.rs).
#[wasm_bindgen(typescript_custom_section)]
const TS_TYPES: &'static str = include_str!("verdict.d.ts");

/// The JavaScript side of the host: a store object, an optional alert callback.
struct JsHost<'a> {
    store: &'a JsValue,
    on_alert: Option<&'a Function>,
}

fn call(target: &JsValue, method: &str, args: &[JsValue]) -> Result<JsValue, StoreError> {
    let f: Function = Reflect::get(target, &JsValue::from_str(method))
        .ok()
        .and_then(|f| f.dyn_into().ok())
        .ok_or_else(|| StoreError(format!("store has no {method}() method")))?;
    let args: js_sys::Array = args.iter().collect();
    f.apply(target, &args)
        .map_err(|e| StoreError(format!("store.{method}() threw: {}", describe(&e))))
}

fn describe(e: &JsValue) -> String {
    e.as_string()
        .or_else(|| Reflect::get(e, &"message".into()).ok()?.as_string())
        .unwrap_or_else(|| "an exception".into())
}

impl Store for JsHost<'_> {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let v = call(self.store, "get", &[key.into()])?;
        if v.is_undefined() || v.is_null() {
            return Ok(None);
        }
        if let Some(s) = v.as_string() {
            return Ok(Some(s.into_bytes()));
        }
        if let Some(bytes) = v.dyn_ref::<Uint8Array>() {
            return Ok(Some(bytes.to_vec()));
        }
        Err(StoreError(format!(
            "store.get({key}) returned neither a string nor bytes"
        )))
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        // Values are JSON or hex text: keep them strings so a Map stays readable.
        let text = String::from_utf8_lossy(value);
        call(self.store, "set", &[key.into(), JsValue::from_str(&text)]).map(|_| ())
    }

    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        call(self.store, "delete", &[key.into()]).map(|_| ())
    }
}

impl Host for JsHost<'_> {
    fn alert(&mut self, alert: &Alert) {
        if let (Some(f), Ok(json)) = (self.on_alert, serde_json::to_string(alert)) {
            if let Ok(value) = js_sys::JSON::parse(&json) {
                // An exception in the alert callback must not change the verdict.
                let _ = f.call1(&JsValue::NULL, &value);
            }
        }
    }

    fn fill_random(&mut self, buf: &mut [u8]) {
        // Web Crypto exists in browsers and in Node.js ≥ 19 as globalThis.crypto.
        let filled = Reflect::get(&js_sys::global(), &"crypto".into())
            .ok()
            .and_then(|crypto| {
                let f: Function = Reflect::get(&crypto, &"getRandomValues".into())
                    .ok()?
                    .dyn_into()
                    .ok()?;
                let array = Uint8Array::new_with_length(u32::try_from(buf.len()).ok()?);
                f.call1(&crypto, &array).ok()?;
                array.copy_to(buf);
                Some(())
            });
        if filled.is_none() {
            for b in buf.iter_mut() {
                *b = (js_sys::Math::random() * 256.0) as u8;
            }
        }
    }
}

/// Whether a final response `code` from a registered PBX sends an inbound call to
/// the verdict's `failover` (docs/policy.md, "Inbound calls"): the core's rule.
#[wasm_bindgen(js_name = failsOver)]
pub fn fails_over(code: u16, retry_after: bool, on_6xx: bool) -> bool {
    trunkguard::verdict::fails_over(code, retry_after, on_6xx)
}

/// What to do with an alert after one POST to the relay that answered `status`
/// (`undefined`: no answer): `"sent"`, `"retry"` or `"refused"` (keep it for the
/// operator). The core's rule (docs/alerts.md, "Posting from a host").
#[wasm_bindgen(js_name = alertDelivery)]
pub fn alert_delivery(status: Option<u16>) -> String {
    trunkguard::alert::delivery(status).as_str().to_string()
}

/// The response to `request` (the request's bytes, as the host will have it
/// answered: its top Via carrying `received`/`rport`) with `code`, `reason` and
/// `headersJson` (a JSON array of `[name, value]` pairs), and `toTag` added to a To
/// without one: the core's rendering (RFC 3261 §8.2.6), the one every host uses.
/// `undefined` when the request does not parse or the headers are not such an array.
#[wasm_bindgen(js_name = renderReply)]
pub fn render_reply(
    request: &[u8],
    code: u16,
    reason: &str,
    headers_json: &str,
    to_tag: &str,
) -> Option<Vec<u8>> {
    let headers: Vec<(String, String)> = serde_json::from_str(headers_json).ok()?;
    let msg = trunkguard::sip::parse(request, trunkguard::sip::Framing::Datagram).ok()?;
    Some(trunkguard::answer::render_status(
        &msg, code, reason, &headers, to_tag,
    ))
}

/// A datagram's dialog identifiers and CSeq as the policy reads them (RFC 3261 §12,
/// one reading only: `Message::dialog_ids`): `{callId, fromTag, toTag, cseq,
/// method, length}`, tags `undefined` when absent, `length` the bytes the message
/// takes (what follows its Content-Length is no part of it). `undefined` when the
/// message does not parse, or they cannot be read one way. A host matches its
/// transactions and dialogs by these, never by a reading of its own: a second
/// reading is a second message (docs/policy.md, "Threat model").
#[wasm_bindgen(js_name = dialogIds)]
pub fn dialog_ids(message: &[u8]) -> JsValue {
    let Ok(msg) = trunkguard::sip::parse(message, trunkguard::sip::Framing::Datagram) else {
        return JsValue::UNDEFINED;
    };
    let Ok(ids) = msg.dialog_ids() else {
        return JsValue::UNDEFINED;
    };
    let out = js_sys::Object::new();
    let tag = |t: Option<&str>| t.map_or(JsValue::UNDEFINED, JsValue::from_str);
    for (key, value) in [
        ("callId", JsValue::from_str(ids.call_id)),
        ("fromTag", tag(ids.from_tag)),
        ("toTag", tag(ids.to_tag)),
        ("cseq", JsValue::from(ids.cseq.seq)),
        ("method", JsValue::from_str(ids.cseq.method.as_str())),
        ("length", JsValue::from(msg.wire_len() as u32)),
    ] {
        let _ = Reflect::set(&out, &JsValue::from_str(key), &value);
    }
    out.into()
}

/// A trunk access policy instance.
#[wasm_bindgen]
pub struct TrunkPolicy {
    engine: Engine,
    store: JsValue,
    on_alert: Option<Function>,
    /// The refusal log and where its lines go (`onRefusalLog`).
    refusals: Option<(RefusalLog, Function)>,
}

#[wasm_bindgen]
impl TrunkPolicy {
    /// `store`: an object with get/set/delete (default: a new `Map`). Share one store
    /// between instances to share bindings.
    #[wasm_bindgen(constructor)]
    pub fn new(store: Option<js_sys::Object>) -> TrunkPolicy {
        TrunkPolicy {
            engine: Engine::new(),
            store: store
                .map(JsValue::from)
                .unwrap_or_else(|| js_sys::Map::new().into()),
            on_alert: None,
            refusals: None,
        }
    }

    /// Receives the refusal log's lines (strings, docs/policy.md "The refusal log"):
    /// one per refused request, at most `perSecond` a second (default 20), then a
    /// summary line counting the rest; `tick` writes a pending summary too.
    #[wasm_bindgen(js_name = onRefusalLog)]
    pub fn on_refusal_log(&mut self, callback: Option<Function>, per_second: Option<u32>) {
        self.refusals = callback.map(|f| {
            (
                RefusalLog::new(per_second.unwrap_or(refusal_log::DEFAULT_PER_SECOND)),
                f,
            )
        });
    }

    /// Receives every alert event (an object, docs/alerts.md).
    #[wasm_bindgen(js_name = onAlert)]
    pub fn on_alert(&mut self, callback: Option<Function>) {
        self.on_alert = callback;
    }

    /// Pushes a configuration (JSON text). Throws an Error whose message is
    /// `path: reason` and which carries `path` and `reason` properties; the previous
    /// configuration stays in force. Returns the new generation.
    pub fn configure(&mut self, json: &str) -> Result<f64, JsValue> {
        let mut host = JsHost {
            store: &self.store,
            on_alert: self.on_alert.as_ref(),
        };
        match self.engine.configure(json.as_bytes(), &mut host) {
            Ok(generation) => Ok(generation as f64),
            Err(e) => {
                let err = js_sys::Error::new(&e.to_string());
                let _ = Reflect::set(&err, &"path".into(), &JsValue::from_str(&e.path));
                let _ = Reflect::set(&err, &"reason".into(), &JsValue::from_str(&e.reason));
                Err(err.into())
            }
        }
    }

    /// The configuration generation in force (0: none yet).
    #[wasm_bindgen(getter)]
    pub fn generation(&self) -> f64 {
        self.engine.generation() as f64
    }

    /// Judges one message (a string or bytes) from `source` (`ip:port`, IPv6 in
    /// brackets) over `transport` (`udp`, `tcp`, …) at `nowMs`. Returns the verdict.
    #[wasm_bindgen(unchecked_return_type = "Verdict")]
    pub fn judge(
        &mut self,
        message: JsValue,
        source: &str,
        transport: &str,
        now_ms: f64,
        local: Option<String>,
    ) -> Result<JsValue, JsValue> {
        // The socket the message arrived on: only a core-facing one (config
        // `core_sockets`) makes a core source the core. Absent: never core.
        let local = match local.as_deref() {
            None | Some("") => None,
            Some(l) => Some(l.parse::<SocketAddr>().map_err(|_| {
                js_sys::Error::new(&format!("local {l:?} is not ip:port (IPv6 in brackets)"))
            })?),
        };
        let bytes = match message.as_string() {
            Some(s) => s.into_bytes(),
            None => message
                .dyn_ref::<Uint8Array>()
                .map(Uint8Array::to_vec)
                .ok_or_else(|| js_sys::Error::new("message must be a string or a Uint8Array"))?,
        };
        let source: SocketAddr = source.parse().map_err(|_| {
            js_sys::Error::new(&format!(
                "source {source:?} is not ip:port (IPv6 in brackets)"
            ))
        })?;
        let transport: Transport = transport
            .parse()
            .map_err(|_| js_sys::Error::new(&format!("unknown transport {transport:?}")))?;
        if !(now_ms.is_finite() && now_ms >= 0.0) {
            return Err(js_sys::Error::new("nowMs must be a non-negative number").into());
        }
        let mut host = JsHost {
            store: &self.store,
            on_alert: self.on_alert.as_ref(),
        };
        let input = Input {
            message: &bytes,
            source,
            transport,
            local,
            now_ms: now_ms as u64,
        };
        let verdict = self.engine.judge(&input, &mut host);
        if let Some((log, f)) = &mut self.refusals {
            for line in log.record(&input, &verdict) {
                let _ = f.call1(&JsValue::NULL, &JsValue::from_str(&line));
            }
        }
        let json =
            serde_json::to_string(&verdict).map_err(|e| js_sys::Error::new(&e.to_string()))?;
        js_sys::JSON::parse(&json)
    }

    /// Writes a refusal the host makes itself after an allow (`no_dialog`, `loop`,
    /// `policy_error`, …) to the refusal log, under the same rate as the policy's.
    #[wasm_bindgen(js_name = logHostRefusal)]
    pub fn log_host_refusal(
        &mut self,
        message: &[u8],
        source: &str,
        transport: &str,
        now_ms: f64,
        code: u16,
        cause: &str,
    ) {
        let Some((log, f)) = &mut self.refusals else {
            return;
        };
        let (Ok(source), Ok(transport)) = (source.parse(), transport.parse::<Transport>()) else {
            return;
        };
        let input = Input {
            message,
            source,
            transport,
            local: None,
            now_ms: now_ms as u64,
        };
        for line in log.record_host(&input, code, cause) {
            let _ = f.call1(&JsValue::NULL, &JsValue::from_str(&line));
        }
    }

    /// Closes expired alert windows; their summaries go to the alert callback.
    /// Returns how many were sent. Call it every few seconds.
    pub fn tick(&mut self, now_ms: f64) -> Result<u32, JsValue> {
        if let Some((log, f)) = &mut self.refusals {
            if let Some(summary) = log.flush(now_ms as u64) {
                let _ = f.call1(&JsValue::NULL, &JsValue::from_str(&summary));
            }
        }
        let mut host = JsHost {
            store: &self.store,
            on_alert: self.on_alert.as_ref(),
        };
        self.engine
            .tick(now_ms as u64, &mut host)
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
            .map_err(|e| js_sys::Error::new(&e.to_string()).into())
    }
}
