//! The HTTP endpoint hosts post events to (docs/alerts.md, "HTTP API").

use std::io::Read;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde_json::json;

use super::deliver::Status;
use super::event;
use super::queue::{Enqueued, Queue, QueueError};
use super::state::StateFile;
use super::{log, now_ms};

pub const ALERTS_PATH: &str = "/v1/alerts";
pub const HEALTH_PATH: &str = "/v1/health";
/// Envoy's state, kept across its restarts (`--state`, [`super::state`]).
pub const STATE_PATH: &str = "/v1/state";
/// A state batch carries many keys: its own, larger limit.
const STATE_MAX_BODY: usize = 16 * 1024 * 1024;

pub struct Endpoint {
    pub queue: Arc<Queue>,
    pub status: Arc<Status>,
    pub token: String,
    pub allow: Vec<IpNet>,
    pub max_body: usize,
    pub state: Option<Arc<StateFile>>,
}

/// An answer: status code and a JSON body (`{"status":…}` or `{"error":…}`).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub code: u16,
    pub body: serde_json::Value,
}

fn error(code: u16, reason: impl Into<String>) -> Answer {
    Answer {
        code,
        body: json!({ "error": reason.into() }),
    }
}

/// What the endpoint needs to know of a request before reading its body.
pub struct Head<'a> {
    pub peer: Option<IpAddr>,
    pub method: &'a str,
    pub path: &'a str,
    pub authorization: Option<&'a str>,
    pub content_length: Option<usize>,
}

/// Which request is for what, or its refusal; in the order that leaks least to a
/// stranger (a peer that is not allowed learns nothing else).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Post,
    Health,
    StateGet,
    StatePut,
}

impl Endpoint {
    pub fn route(&self, head: &Head<'_>) -> Result<Route, Answer> {
        let allowed = head
            .peer
            .map(|ip| ip.to_canonical())
            .is_some_and(|ip| self.allow.iter().any(|net| net.contains(&ip)));
        if !allowed {
            return Err(error(
                403,
                format!(
                    "host {} is not allowed (see --allow)",
                    head.peer.map(|p| p.to_string()).unwrap_or_default()
                ),
            ));
        }
        // Query strings are not part of the API.
        let path = head.path.split('?').next().unwrap_or_default();
        let route = match (path, head.method) {
            (ALERTS_PATH, "POST") => Route::Post,
            (HEALTH_PATH, "GET") => return Ok(Route::Health),
            (STATE_PATH, _) if self.state.is_none() => {
                return Err(error(
                    404,
                    "no state kept here (start the relay with --state)",
                ));
            }
            (STATE_PATH, "GET") => Route::StateGet,
            (STATE_PATH, "PUT") => Route::StatePut,
            (ALERTS_PATH, _) => return Err(error(405, "use POST")),
            (HEALTH_PATH, _) => return Err(error(405, "use GET")),
            (STATE_PATH, _) => return Err(error(405, "use GET or PUT")),
            _ => {
                return Err(error(
                    404,
                    format!("no such path; post events to {ALERTS_PATH}"),
                ));
            }
        };
        let presented = head
            .authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            None => return Err(error(401, "missing \"Authorization: Bearer <token>\"")),
            Some(t) if !same(t.as_bytes(), self.token.as_bytes()) => {
                return Err(error(401, "wrong token"));
            }
            Some(_) => {}
        }
        if let Some(len) = head.content_length
            && len > self.body_limit(route)
        {
            return Err(too_large(len, self.body_limit(route)));
        }
        Ok(route)
    }

    /// Checks and queues one posted body. 202 only once the event is on disk.
    pub fn post(&self, body: &[u8]) -> Answer {
        if body.len() > self.max_body {
            return too_large(body.len(), self.max_body);
        }
        let ev = match event::parse(body) {
            Ok(ev) => ev,
            Err(e) => return error(400, e.to_string()),
        };
        let id = ev.alert.id.clone();
        match self.queue.enqueue(&id, ev.raw, now_ms()) {
            Ok(Enqueued::Queued) => {
                log(&format!(
                    "queued {id} ({} for {}, {} recipient(s))",
                    ev.alert.kind.as_str(),
                    ev.alert.trunk_group,
                    ev.alert.recipients.len()
                ));
                Answer {
                    code: 202,
                    body: json!({"status": "queued", "id": id}),
                }
            }
            Ok(Enqueued::Duplicate) => Answer {
                code: 200,
                body: json!({"status": "duplicate", "id": id}),
            },
            Err(e @ QueueError::Full(_)) => error(503, e.to_string()),
            Err(e) => {
                log(&format!("cannot queue {id}: {e}"));
                error(503, format!("cannot store the event: {e}"))
            }
        }
    }

    fn body_limit(&self, route: Route) -> usize {
        match route {
            Route::StatePut => STATE_MAX_BODY,
            _ => self.max_body,
        }
    }

    /// Every state entry: `{"entries": {key: value}}`.
    pub fn state_get(&self) -> Answer {
        match &self.state {
            Some(state) => Answer {
                code: 200,
                body: json!({ "entries": state.snapshot() }),
            },
            None => error(404, "no state kept here"),
        }
    }

    /// Stores `{"changes": {key: value or null}}`; 200 only once it is on disk.
    pub fn state_put(&self, body: &[u8]) -> Answer {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Put {
            changes: std::collections::BTreeMap<String, Option<String>>,
        }
        let Some(state) = &self.state else {
            return error(404, "no state kept here");
        };
        let put: Put = match serde_json::from_slice(body) {
            Ok(p) => p,
            Err(e) => return error(400, e.to_string()),
        };
        let n = put.changes.len();
        match state.apply(put.changes) {
            Ok(()) => Answer {
                code: 200,
                body: json!({"status": "stored", "changes": n, "entries": state.len()}),
            },
            Err(e) => {
                log(&format!("cannot store state: {e}"));
                error(503, e.to_string())
            }
        }
    }

    pub fn health(&self) -> Answer {
        match self.queue.counts() {
            Ok(counts) => Answer {
                code: 200,
                body: json!({
                    "pending": counts.pending,
                    "failed": counts.failed,
                    "channels": self.status.snapshot(),
                }),
            },
            Err(e) => error(500, e.to_string()),
        }
    }

    pub fn handle(&self, mut req: tiny_http::Request) {
        let authorization = header(&req, "Authorization");
        let head = Head {
            peer: req.remote_addr().map(|a| a.ip()),
            method: req.method().as_str(),
            path: req.url(),
            authorization: authorization.as_deref(),
            content_length: req.body_length(),
        };
        let answer = match self.route(&head) {
            Err(answer) => answer,
            Ok(Route::Health) => self.health(),
            Ok(Route::StateGet) => self.state_get(),
            Ok(route @ (Route::Post | Route::StatePut)) => {
                let mut body = Vec::new();
                let limit = self.body_limit(route);
                // One byte past the limit tells an oversized chunked body apart.
                match req
                    .as_reader()
                    .take(limit as u64 + 1)
                    .read_to_end(&mut body)
                {
                    Ok(_) if body.len() > limit => too_large(body.len(), limit),
                    Ok(_) if route == Route::StatePut => self.state_put(&body),
                    Ok(_) => self.post(&body),
                    Err(e) => error(400, format!("cannot read the body: {e}")),
                }
            }
        };
        respond(req, answer);
    }
}

fn too_large(len: usize, max: usize) -> Answer {
    error(
        413,
        format!("event of {len} bytes is larger than the limit of {max} (--max-body)"),
    )
}

/// Compares without an early exit, so response timing does not reveal how much of
/// a guessed token was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn header(req: &tiny_http::Request, name: &str) -> Option<String> {
    req.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str().to_string())
}

fn respond(req: tiny_http::Request, answer: Answer) {
    let mut response = tiny_http::Response::from_string(format!("{}\n", answer.body))
        .with_status_code(answer.code);
    let mut extra = vec![("Content-Type", "application/json")];
    match answer.code {
        401 => extra.push(("WWW-Authenticate", "Bearer")),
        503 => extra.push(("Retry-After", "5")),
        _ => {}
    }
    for (name, value) in extra {
        if let Ok(h) = tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(h);
        }
    }
    if let Err(e) = req.respond(response) {
        log(&format!("cannot answer a request: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> (Endpoint, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "trunkguard-http-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let (queue, _) = Queue::open(&dir, 10).unwrap();
        (
            Endpoint {
                queue: Arc::new(queue),
                status: Arc::new(Status::default()),
                token: "s3cret-token".into(),
                allow: vec!["127.0.0.1/32".parse().unwrap(), "::1/128".parse().unwrap()],
                max_body: 1000,
                state: None,
            },
            dir,
        )
    }

    /// (peer, method, path, authorization, content length, expected)
    type Case<'a> = (
        Option<IpAddr>,
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<usize>,
        Result<Route, u16>,
    );

    #[test]
    fn routing_table() {
        let (ep, dir) = endpoint();
        let local: Option<IpAddr> = Some("127.0.0.1".parse().unwrap());
        let mapped: Option<IpAddr> = Some("::ffff:127.0.0.1".parse().unwrap());
        let other: Option<IpAddr> = Some("192.0.2.1".parse().unwrap());
        let good = Some("Bearer s3cret-token");
        let cases: Vec<Case<'_>> = vec![
            (local, "POST", "/v1/alerts", good, Some(10), Ok(Route::Post)),
            (mapped, "POST", "/v1/alerts", good, None, Ok(Route::Post)),
            (local, "GET", "/v1/health", None, None, Ok(Route::Health)),
            (other, "POST", "/v1/alerts", good, Some(10), Err(403)),
            (other, "GET", "/v1/health", None, None, Err(403)),
            (None, "POST", "/v1/alerts", good, Some(10), Err(403)),
            (local, "POST", "/v1/alert", good, Some(10), Err(404)),
            (local, "GET", "/v1/alerts", good, None, Err(405)),
            (local, "POST", "/v1/alerts", None, Some(10), Err(401)),
            (
                local,
                "POST",
                "/v1/alerts",
                Some("Bearer s3cret-tokeN"),
                Some(10),
                Err(401),
            ),
            (
                local,
                "POST",
                "/v1/alerts",
                Some("Basic czNjcmV0"),
                Some(10),
                Err(401),
            ),
            (local, "POST", "/v1/alerts", good, Some(1001), Err(413)),
        ];
        for (peer, method, path, authorization, content_length, want) in cases {
            let head = Head {
                peer,
                method,
                path,
                authorization,
                content_length,
            };
            let got = ep.route(&head).map_err(|a| a.code);
            assert_eq!(got, want, "{method} {path} from {peer:?}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn state_is_kept_only_with_a_state_file_and_the_token() {
        let (mut ep, dir) = endpoint();
        let local: Option<IpAddr> = Some("127.0.0.1".parse().unwrap());
        let head = |method, authorization, content_length| Head {
            peer: local,
            method,
            path: STATE_PATH,
            authorization,
            content_length,
        };
        let good = Some("Bearer s3cret-token");
        assert_eq!(
            ep.route(&head("GET", good, None)).map_err(|a| a.code),
            Err(404)
        );
        ep.state = Some(Arc::new(StateFile::open(&dir.join("state.json")).unwrap()));
        assert_eq!(
            ep.route(&head("GET", None, None)).map_err(|a| a.code),
            Err(401)
        );
        assert_eq!(
            ep.route(&head("PUT", good, Some(5_000))),
            Ok(Route::StatePut),
            "a batch may exceed --max-body"
        );
        assert_eq!(
            ep.route(&head("POST", good, None)).map_err(|a| a.code),
            Err(405)
        );
        let put = ep.state_put(br#"{"changes":{"tg/binding/a":"x","tg/gone":null}}"#);
        assert_eq!(put.code, 200, "{:?}", put.body);
        assert_eq!(ep.state_put(b"{\"set\":{}}").code, 400);
        let got = ep.state_get();
        assert_eq!(got.body["entries"], json!({"tg/binding/a": "x"}));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn post_answers() {
        let (ep, dir) = endpoint();
        let event = r#"{"id":"e-1","kind":"blocked_call","location":"hq","trunk_group":"hq-pbx1",
            "recipients":["noc@example.com"],"at_ms":1,"time":"1970-01-01T00:00:00.001Z","count":1}"#;
        let cases: Vec<(String, u16, &str)> = vec![
            (event.into(), 202, "queued"),
            (event.into(), 200, "duplicate"),
            ("{\"id\":".into(), 400, "body is not JSON"),
            ("{}".into(), 400, "missing field"),
            ("x".repeat(1001), 413, "larger than the limit of 1000"),
        ];
        for (body, code, words) in cases {
            let a = ep.post(body.as_bytes());
            assert_eq!(a.code, code, "{}", a.body);
            assert!(a.body.to_string().contains(words), "{}", a.body);
        }
        assert_eq!(ep.health().body["pending"], 1);
        let _ = std::fs::remove_dir_all(dir);
    }
}
