//! One client connection's stream context: hands the bytes Envoy passes in either
//! direction to a [`Conn`], judging client messages with the root's engine, and
//! applies the outcome to Envoy's buffers.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;

use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, PeerType};

use super::conn::{Conn, Judge, OnRefusal, Outcome, with_source};
use super::filter::Worker;
use super::host::{self, Buffer, Level};
use super::metrics;
use super::shared::{self, EnvoyBackend};
use super::slots::Slots;
use super::txn;
use trunkguard::policy::Input;
use trunkguard::refusal_log::{self, RefusalLog};
use trunkguard::sip::Transport;
use trunkguard::verdict::{Cause, Verdict};

/// The stream context of one client connection.
pub(super) struct Connection {
    policy: Rc<RefCell<Worker>>,
    conn: Conn,
    source: Option<SocketAddr>,
    /// The Envoy listener's address: core trust needs a core-facing one.
    local: Option<SocketAddr>,
    transport: Transport,
    /// The filter closed the connection: nothing more passes.
    closed: bool,
    /// The source's unit in this worker's `SLOTS`, given back when Envoy is done
    /// with the connection.
    slot: Option<String>,
}

/// The policy judging one connection's messages.
struct Judging<'a> {
    policy: &'a mut Worker,
    source: Option<SocketAddr>,
    local: Option<SocketAddr>,
    transport: Transport,
    now_ms: Result<u64, host::HostError>,
}

impl Judge for Judging<'_> {
    fn judge(&mut self, message: &[u8]) -> Verdict {
        metrics::count("", "messages", 1);
        let (Some(source), Ok(now_ms)) = (self.source, self.now_ms) else {
            // Without the peer address or the time, no decision can be made: fail closed.
            let v = Verdict::reject(
                500,
                "Server Internal Error (no source address or clock)",
                Cause::StoreUnavailable,
            );
            count_verdict(&v);
            return v;
        };
        let input = Input {
            message,
            source,
            transport: self.transport,
            local: self.local,
            now_ms,
        };
        if shared::drill_traps_now() {
            trap();
        }
        if shared::restoring() {
            let v = Verdict::reject(
                503,
                "Service Unavailable (restoring state)",
                Cause::StoreUnavailable,
            )
            .with_header("Retry-After", "1");
            count_verdict(&v);
            return v;
        }
        let engine = &mut self.policy.engine;
        let verdict = match txn::run(&mut EnvoyBackend, |t| engine.judge(&input, t)) {
            Ok((verdict, alerts)) => {
                self.policy.send_alerts(alerts);
                verdict
            }
            Err(e) => {
                metrics::count("store", "failures", 1);
                Verdict::reject(
                    500,
                    format!("Server Internal Error ({e})"),
                    Cause::StoreUnavailable,
                )
            }
        };
        count_verdict(&verdict);
        log_refusal(&input, &verdict);
        with_source(verdict, source)
    }

    fn to_tag(&mut self) -> String {
        shared::random_hex::<8>()
    }
}

/// The drill's trap: the VM stops as on a host bug, and Envoy's `failure_policy`
/// decides what happens next (docs/envoy.md, "Drills").
#[allow(clippy::panic)]
fn trap() -> ! {
    panic!("drill: trap_once")
}

thread_local! {
    /// Each VM (one per worker thread) keeps its own share of the rate.
    static REFUSALS: RefCell<RefusalLog> =
        RefCell::new(RefusalLog::new(refusal_log::DEFAULT_PER_SECOND));
}

thread_local! {
    /// The connections this worker VM serves, per source (`slots`).
    static SLOTS: RefCell<Slots> = RefCell::new(Slots::default());
}

/// The VM configuration's `max_connections_per_source`.
pub(super) fn set_connections_per_source(limit: u32) {
    SLOTS.with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            s.set_limit(limit);
        }
    });
}

/// The VM configuration's `refusal_log_per_second`.
pub(super) fn set_refusal_rate(per_second: u32) {
    REFUSALS.with(|r| {
        if let Ok(mut r) = r.try_borrow_mut() {
            *r = RefusalLog::new(per_second);
        }
    });
}

/// Writes the refusal log's lines for this verdict (docs/policy.md).
fn log_refusal(input: &Input<'_>, verdict: &Verdict) {
    REFUSALS.with(|r| {
        if let Ok(mut r) = r.try_borrow_mut() {
            for line in r.record(input, verdict) {
                host::log(Level::Info, &line);
            }
        }
    });
}

/// The summary of lines left out, once the flood's second is over (the filter
/// root's tick).
pub(super) fn flush_refusal_summary(now_ms: u64) {
    REFUSALS.with(|r| {
        if let Some(summary) = r.try_borrow_mut().ok().and_then(|mut r| r.flush(now_ms)) {
            host::log(Level::Info, &summary);
        }
    });
}

fn count_verdict(v: &Verdict) {
    let name = match v.cause {
        Some(cause) => cause.as_str(),
        None => "allow",
    };
    metrics::count("verdict", name, 1);
}

impl Connection {
    pub(super) fn new(policy: Rc<RefCell<Worker>>, on_refusal: OnRefusal) -> Connection {
        Connection {
            policy,
            conn: Conn::new(on_refusal),
            source: None,
            local: None,
            transport: Transport::Tcp,
            closed: false,
            slot: None,
        }
    }

    /// Applies an outcome to the buffer Envoy handed over (`size` bytes).
    fn apply(&mut self, buffer: Buffer, size: usize, o: Outcome) {
        metrics::count("", "probes", o.probes);
        metrics::count("", "answers", o.answers);
        metrics::count("", "acks_absorbed", o.absorbed);
        metrics::count("", "dropped", o.dropped);
        if let Some(data) = o.data {
            if let Err(e) = host::set_buffer(buffer, 0, size, &data) {
                self.close(&format!("{e}"));
                return;
            }
        }
        if let Some(why) = o.close {
            self.close(why);
        }
    }

    fn close(&mut self, why: &str) {
        if self.closed {
            return;
        }
        self.closed = true;
        metrics::count("", "connections_closed", 1);
        let peer = self
            .source
            .map_or_else(|| "an unknown peer".to_owned(), |s| s.to_string());
        host::log(
            Level::Info,
            &format!("closing the connection of {peer}: {why}"),
        );
        if let Err(e) = host::close_downstream() {
            host::log(Level::Error, &format!("{e}"));
        }
    }

    /// Drops a chunk unseen: after a close, or when it could not be read (then
    /// closing too: nothing unjudged may pass).
    fn drop_chunk(&mut self, buffer: Buffer, size: usize, why: Option<&str>) {
        let _ = host::set_buffer(buffer, 0, size, &[]);
        if let Some(why) = why {
            self.close(why);
        }
    }

    /// The chunk Envoy hands over (`size` bytes), or `None` when it is not to be
    /// looked at: after a close, or when it cannot be read (then dropped, and the
    /// connection closed: nothing unjudged may pass).
    fn take(&mut self, buffer: Buffer, size: usize) -> Option<Vec<u8>> {
        if self.closed {
            self.drop_chunk(buffer, size, None);
            return None;
        }
        match host::get_buffer(buffer, 0, size) {
            Ok(chunk) => Some(chunk.unwrap_or_default()),
            Err(e) => {
                self.drop_chunk(buffer, size, Some(&e.to_string()));
                None
            }
        }
    }
}

impl Context for Connection {
    fn on_done(&mut self) -> bool {
        if let Some(unit) = self.slot.take() {
            SLOTS.with(|s| {
                if let Ok(mut s) = s.try_borrow_mut() {
                    s.release(&unit);
                }
            });
        }
        true
    }
}

impl StreamContext for Connection {
    fn on_new_connection(&mut self) -> Action {
        let address = |path: &[&str]| {
            host::get_property(path)
                .ok()
                .flatten()
                .and_then(|a| String::from_utf8(a).ok())
                .and_then(|a| a.parse().ok())
        };
        self.source = address(&["source", "address"]);
        self.local = address(&["destination", "address"]);
        let tls = host::get_property(&["connection", "tls_version"])
            .ok()
            .flatten()
            .is_some_and(|v| !v.is_empty());
        if tls {
            self.transport = Transport::Tls;
        }
        // Without its address a connection is not counted: its messages are refused
        // (`Judging::judge`).
        let Some(source) = self.source else {
            return Action::Continue;
        };
        let taken = SLOTS.with(|s| {
            s.try_borrow_mut()
                .map(|mut s| s.take(source.ip()).ok_or(s.limit()))
        });
        match taken {
            Ok(Ok(unit)) => self.slot = Some(unit),
            Ok(Err(limit)) => {
                // Counted, and logged at debug level only: a flood of connections
                // must not become a flood of log lines.
                metrics::count("", "connections_over_source_limit", 1);
                host::log(
                    Level::Debug,
                    &format!(
                        "closing the connection of {source}: its source holds {limit} on this worker (max_connections_per_source)"
                    ),
                );
                self.closed = true;
                if let Err(e) = host::close_downstream() {
                    host::log(Level::Error, &format!("{e}"));
                }
                // Nothing further: tcp_proxy opens no upstream connection for it.
                return Action::Pause;
            }
            Err(_) => {}
        }
        Action::Continue
    }

    fn on_downstream_data(&mut self, size: usize, _end_of_stream: bool) -> Action {
        let Some(chunk) = self.take(Buffer::DownstreamData, size) else {
            return Action::Continue;
        };
        let policy = Rc::clone(&self.policy);
        let Ok(mut policy) = policy.try_borrow_mut() else {
            self.drop_chunk(Buffer::DownstreamData, size, Some("policy busy"));
            return Action::Continue;
        };
        policy.follow();
        let mut judging = Judging {
            policy: &mut policy,
            source: self.source,
            local: self.local,
            transport: self.transport,
            now_ms: host::now_ms(),
        };
        let outcome = self.conn.downstream(&chunk, &mut judging);
        drop(policy);
        self.apply(Buffer::DownstreamData, size, outcome);
        Action::Continue
    }

    fn on_upstream_data(&mut self, size: usize, _end_of_stream: bool) -> Action {
        let Some(chunk) = self.take(Buffer::UpstreamData, size) else {
            return Action::Continue;
        };
        let outcome = self.conn.upstream(&chunk);
        self.apply(Buffer::UpstreamData, size, outcome);
        Action::Continue
    }

    fn on_downstream_close(&mut self, _peer: PeerType) {}

    fn on_upstream_close(&mut self, _peer: PeerType) {}
}
