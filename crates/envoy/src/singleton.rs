//! The alert singleton (`envoy.bootstrap.wasm`, same `vm_id` as the filters): owns
//! the queue the workers put alerts on, posts them to the webhook cluster with
//! `dispatch_http_call` (never on a worker, so SIP traffic never waits for it),
//! retries with backoff, and runs the core's `tick` that closes alert windows.

use super::host::{self, Buffer, Level};
use super::keeper::{self, Call, Ended, Keeper};
use super::metrics;
use super::outbox::{Limits, Outbox, Outcome};
use super::shared::{ALERT_QUEUE, EnvoyBackend, RESTORED_KEY, STATE_QUEUE};
use super::txn;
use trunkguard::engine::Engine;

/// The singleton's plugin configuration.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// The Envoy cluster of the webhook (the alert relay, docs/alerts.md).
    cluster: String,
    /// HTTP `:authority` (Host) of the posts.
    authority: String,
    #[serde(default = "default_path")]
    path: String,
    /// Sent as `Authorization: Bearer <token>` when set.
    #[serde(default)]
    token: Option<String>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_max_attempts")]
    max_attempts: u32,
    /// How often alert windows are closed (the core's `tick`).
    #[serde(default = "default_tick_s")]
    window_tick_s: u64,
    /// The relay's state path (`/v1/state`, `trunkguard alerts serve --state`): when
    /// set, every store write is kept there and read back when Envoy starts
    /// (docs/envoy.md, "Upgrade and restart").
    #[serde(default)]
    state_path: Option<String>,
    /// How long a starting Envoy refuses messages (503) while it cannot read the
    /// kept state back, before it goes on without it.
    #[serde(default = "default_restore_timeout_s")]
    restore_timeout_s: u64,
}

fn default_restore_timeout_s() -> u64 {
    30
}

fn default_path() -> String {
    "/v1/alerts".into()
}
fn default_timeout_ms() -> u64 {
    5_000
}
/// Never give up: an alert waits out a relay outage of any length (bounded by the
/// queue's size), as the relay and the Kamailio spool do.
fn default_max_attempts() -> u32 {
    0
}
fn default_tick_s() -> u64 {
    5
}

/// How often the singleton wakes up: retries and window ticks are due on it.
const TICK_MS: u32 = 500;
/// Alerts taken off the shared queue per wake-up.
const DRAIN_MAX: usize = 1_000;

pub struct Singleton {
    config: AlertsConfig,
    queue: u32,
    outbox: Outbox,
    engine: Engine,
    next_window_tick_ms: u64,
    /// The state keeper and the queue the workers' writes arrive on.
    keeper: Option<(Keeper, u32)>,
}

/// Why the alert singleton did not start: Envoy logs it and refuses the plugin.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] serde_json::Error),
    #[error(transparent)]
    Host(#[from] host::HostError),
}

impl Singleton {
    pub fn start(raw: &[u8]) -> Result<Singleton, StartError> {
        let config: AlertsConfig = serde_json::from_slice(raw)?;
        let queue = host::register_queue(ALERT_QUEUE)?;
        host::set_tick_period_ms(TICK_MS)?;
        host::log(
            Level::Info,
            &format!(
                "alert singleton posting to cluster {} {}",
                config.cluster, config.path
            ),
        );
        let outbox = Outbox::new(Limits {
            max_attempts: config.max_attempts,
            ..Limits::default()
        });
        let keeper = match &config.state_path {
            Some(path) => {
                let queue = host::register_queue(STATE_QUEUE)?;
                let restored = matches!(host::shared_get(RESTORED_KEY), Ok((Some(_), _)));
                host::log(
                    Level::Info,
                    &format!(
                        "keeping state at cluster {} {path}{}",
                        config.cluster,
                        if restored { "" } else { "; reading it back" }
                    ),
                );
                let now = host::now_ms().unwrap_or_default();
                let timeout = config.restore_timeout_s.saturating_mul(1_000);
                Some((Keeper::new(now, timeout, restored), queue))
            }
            None => None,
        };
        Ok(Singleton {
            config,
            queue,
            outbox,
            engine: Engine::new(),
            next_window_tick_ms: 0,
            keeper,
        })
    }

    pub fn on_queue_ready(&mut self, queue: u32) {
        if queue == self.queue {
            self.drain();
            self.dispatch();
        } else if self.keeper.as_ref().is_some_and(|(_, q)| *q == queue) {
            self.keep();
        }
    }

    pub fn on_tick(&mut self) {
        let now = host::now_ms().unwrap_or_default();
        if now >= self.next_window_tick_ms {
            self.next_window_tick_ms = now + self.config.window_tick_s.max(1) * 1_000;
            let engine = &mut self.engine;
            match txn::run(&mut EnvoyBackend, |t| engine.tick(now, t)) {
                Ok((_, summaries)) => {
                    for s in summaries {
                        self.push(s, now);
                    }
                }
                Err(e) => host::log(Level::Warn, &format!("alert tick: {e}")),
            }
        }
        // on_queue_ready can be missed while the VM is busy: poll too.
        self.drain();
        self.dispatch();
        self.keep();
    }

    pub fn on_response(&mut self, token: u32, body_size: usize) {
        let status = host::http_call_response_header(":status")
            .ok()
            .flatten()
            .and_then(|s| String::from_utf8(s).ok()?.parse::<u32>().ok());
        let now = host::now_ms().unwrap_or_default();
        if let Some((keeper, _)) = &mut self.keeper
            && keeper.owns(token)
        {
            let body = host::get_buffer(Buffer::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default();
            if let Some(ended) = keeper.finished(token, status, &body, now) {
                self.kept(ended, status);
            }
            self.keep();
            return;
        }
        match self.outbox.finished(token, status, now) {
            Some(Outcome::Sent) => metrics::count("alerts", "sent", 1),
            Some(Outcome::Retry) => metrics::count("alerts", "retried", 1),
            Some(Outcome::Deferred(body)) => {
                metrics::count("alerts", "retried", 1);
                let why = status.map_or_else(|| "no answer".to_string(), |s| format!("HTTP {s}"));
                log_waiting(&why, &body);
            }
            Some(Outcome::Dropped) => {
                metrics::count("alerts", "dropped", 1);
                host::log(
                    Level::Warn,
                    &format!("alert dropped after max_attempts tries ({status:?})"),
                );
            }
            Some(Outcome::Rejected(body)) => {
                // Refused for good (a wrong token, say): nothing to gain by retrying,
                // and the alert must not be lost. Its whole JSON goes to the log, to
                // be posted again by hand once the cause is fixed (docs/alerts.md).
                metrics::count("alerts", "rejected", 1);
                host::log(
                    Level::Error,
                    &format!(
                        "alert refused by the relay ({}, check the alert token); \
                         re-deliver by hand: {}",
                        status.unwrap_or_default(),
                        String::from_utf8_lossy(&body)
                    ),
                );
            }
            None => {}
        }
        self.dispatch();
    }

    /// Takes the workers' writes off the state queue and makes the keeper's next call.
    fn keep(&mut self) {
        let Some((keeper, queue)) = &mut self.keeper else {
            return;
        };
        for _ in 0..DRAIN_MAX * 10 {
            match host::dequeue(*queue) {
                Ok(Some(item)) => match serde_json::from_slice::<(String, Option<String>)>(&item) {
                    Ok((key, value)) => keeper.changed(key, value),
                    Err(e) => host::log(Level::Warn, &format!("state queue: {e}")),
                },
                Ok(None) => break,
                Err(e) => {
                    host::log(Level::Warn, &format!("state queue: {e}"));
                    break;
                }
            }
        }
        let now = host::now_ms().unwrap_or_default();
        let Some(call) = keeper.next(now) else {
            return;
        };
        let Some(path) = self.config.state_path.as_deref() else {
            return;
        };
        let (method, body) = match &call {
            Call::Restore => ("GET", Vec::new()),
            Call::Save(batch) => ("PUT", keeper::save_body(batch)),
        };
        match call_relay(&self.config, method, path, &body) {
            Ok(token) => keeper.dispatched(token, call),
            Err(e) => {
                host::log(Level::Warn, &format!("state call: {e}"));
                let ended = keeper.not_dispatched(call, now);
                self.kept(ended, None);
            }
        }
    }

    /// Counts and logs how a keeper call ended; puts restored state back.
    fn kept(&mut self, ended: Ended, status: Option<u32>) {
        match ended {
            Ended::Restored(entries) => {
                let mut put = 0u32;
                for (key, value) in &entries {
                    // A key a worker already wrote since the start is newer.
                    if let Ok((None, cas)) = host::shared_get(key) {
                        if host::shared_set(key, value.as_bytes(), cas).unwrap_or(false) {
                            put += 1;
                        }
                    }
                }
                let _ = host::shared_set(RESTORED_KEY, b"1", 0);
                metrics::count("state", "restored", put);
                host::log(
                    Level::Info,
                    &format!("state read back: {put} of {} kept entries", entries.len()),
                );
            }
            Ended::Saved(n) => {
                metrics::count("state", "saved", u32::try_from(n).unwrap_or(u32::MAX))
            }
            Ended::Failed => {
                metrics::count("state", "failed", 1);
                host::log(
                    Level::Warn,
                    &format!("state call failed ({status:?}); retrying"),
                );
            }
            Ended::GaveUpRestoring => {
                let _ = host::shared_set(RESTORED_KEY, b"0", 0);
                metrics::count("state", "restore_failed", 1);
                host::log(
                    Level::Error,
                    "cannot read the kept state back: going on without it (registrations \
                     are refused until the PBXs register again)",
                );
            }
        }
    }

    fn push(&mut self, alert: Vec<u8>, now: u64) {
        if !self.outbox.push(alert, now) {
            metrics::count("alerts", "dropped", 1);
        }
    }

    fn drain(&mut self) {
        let now = host::now_ms().unwrap_or_default();
        for _ in 0..DRAIN_MAX {
            match host::dequeue(self.queue) {
                Ok(Some(alert)) => self.push(alert, now),
                Ok(None) => break,
                Err(e) => {
                    host::log(Level::Warn, &format!("alert queue: {e}"));
                    break;
                }
            }
        }
    }

    fn dispatch(&mut self) {
        let now = host::now_ms().unwrap_or_default();
        while let Some(entry) = self.outbox.next_due(now) {
            match call_relay(&self.config, "POST", &self.config.path, &entry.body) {
                Ok(token) => self.outbox.dispatched(token, entry),
                Err(e) => {
                    host::log(Level::Warn, &format!("alert post: {e}"));
                    match self.outbox.not_dispatched(entry, now) {
                        Outcome::Dropped => metrics::count("alerts", "dropped", 1),
                        Outcome::Deferred(body) => log_waiting(&e.to_string(), &body),
                        _ => {}
                    }
                    // The cluster is missing or Envoy refused: try the rest later.
                    break;
                }
            }
        }
    }
}

/// Until the relay takes it, an alert lives only in this VM's memory (Envoy has no
/// disk of its own): at its first failure it is logged whole, so that an Envoy
/// stopped or killed meanwhile loses nothing that cannot be posted again by hand
/// (docs/alerts.md).
fn log_waiting(why: &str, body: &[u8]) {
    host::log(
        Level::Warn,
        &format!(
            "alert waits for the relay ({why}); if Envoy stops before it is taken, \
             re-deliver by hand: {}",
            String::from_utf8_lossy(body)
        ),
    );
}

/// One HTTP call to the relay's cluster, with the token; returns the call's token.
fn call_relay(
    config: &AlertsConfig,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<u32, host::HostError> {
    let bearer = config.token.as_ref().map(|t| format!("Bearer {t}"));
    let mut headers = vec![
        (":method", method),
        (":path", path),
        (":authority", config.authority.as_str()),
        ("content-type", "application/json"),
    ];
    if let Some(b) = &bearer {
        headers.push(("authorization", b.as_str()));
    }
    host::http_call(&config.cluster, &headers, body, config.timeout_ms)
}
