//! The root contexts: one per plugin configuration of the network filter (the trunk
//! configuration JSON, pushed by ECDS), whose engine its connections
//! (`connection`) share, or the alert singleton's (`singleton`).

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, RootContext, StreamContext};
use proxy_wasm::types::ContextType;

use super::conn::OnRefusal;
use super::host::{self, Buffer, Level};
use super::metrics;
use super::shared::{self, ALERT_QUEUE, EnvoyBackend};
use super::singleton::Singleton;
use super::stream_context::Connection;
use super::txn::Txn;
use trunkguard::engine::Engine;

/// `root_id` of the alert singleton (`envoy.bootstrap.wasm`); any other root is a
/// filter.
pub const ALERTS_ROOT_ID: &str = "trunkguard_alerts";

/// The VM configuration (`vm_config.configuration`): options of this front, as
/// opposed to the trunk configuration, which is the plugin configuration.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct VmOptions {
    #[serde(default)]
    on_refusal: OnRefusal,
    #[serde(default)]
    drill: shared::Drill,
    /// Refusal log lines a second per worker VM (docs/envoy.md); 0: summaries only.
    #[serde(default)]
    refusal_log_per_second: Option<u32>,
    /// Connections one source holds per worker VM (docs/envoy.md, "Connection
    /// limit"); 0: no limit.
    #[serde(default)]
    max_connections_per_source: Option<u32>,
}

/// What a filter root shares with its connections.
pub(super) struct Worker {
    pub(super) engine: Engine,
    /// The shared generation of the configuration the engine holds.
    generation: u64,
    vm_id: String,
    alert_queue: Option<u32>,
}

impl Worker {
    fn new() -> Worker {
        Worker {
            engine: Engine::new(),
            generation: 0,
            vm_id: shared::DEFAULT_VM_ID.to_owned(),
            alert_queue: None,
        }
    }

    /// Takes up a configuration accepted since this one: Envoy keeps a connection
    /// on the filter instance it started with, but a push must apply to the next
    /// message on every connection (docs/envoy.md, "Publish a new configuration").
    pub(super) fn follow(&mut self) {
        let Some(newer) = shared::newer_config(self.generation) else {
            return;
        };
        let mut backend = EnvoyBackend;
        let mut txn = Txn::new(&mut backend);
        match self.engine.configure(newer.config.as_bytes(), &mut txn) {
            Ok(_) => {
                let _ = txn.commit();
                metrics::gauge("config.generation", newer.generation);
            }
            // Older code than the one that accepted it (a field it does not know):
            // its connections keep what they have. Once, not for every chunk.
            Err(e) => host::log(
                Level::Warn,
                &format!(
                    "connections of this VM keep generation {}: its code refuses generation {} at {}: {}",
                    self.generation, newer.generation, e.path, e.reason
                ),
            ),
        }
        self.generation = newer.generation;
    }

    /// Hands alerts to the singleton; without one they are counted as dropped.
    pub(super) fn send_alerts(&mut self, alerts: Vec<Vec<u8>>) {
        for alert in alerts {
            if self.alert_queue.is_none() {
                self.alert_queue = host::resolve_queue(&self.vm_id, ALERT_QUEUE).ok().flatten();
            }
            let sent = self
                .alert_queue
                .is_some_and(|q| host::enqueue(q, &alert).is_ok());
            if sent {
                metrics::count("alerts", "queued", 1);
            } else {
                // A stale id (the singleton's VM was replaced) is looked up again next time.
                self.alert_queue = None;
                metrics::count("alerts", "dropped", 1);
                host::log(
                    Level::Warn,
                    &format!(
                        "alert dropped, no alert singleton (queue {ALERT_QUEUE} of vm_id {}): {}",
                        self.vm_id,
                        String::from_utf8_lossy(&alert)
                    ),
                );
            }
        }
    }
}

pub struct Root {
    policy: Rc<RefCell<Worker>>,
    on_refusal: OnRefusal,
    singleton: Option<Singleton>,
}

impl Root {
    pub fn new() -> Root {
        Root {
            policy: Rc::new(RefCell::new(Worker::new())),
            on_refusal: OnRefusal::default(),
            singleton: None,
        }
    }

    fn configure_filter(&mut self, config: &[u8]) -> bool {
        let Ok(mut policy) = self.policy.try_borrow_mut() else {
            return false;
        };
        policy.vm_id = shared::vm_id();
        let mut backend = EnvoyBackend;
        let mut txn = Txn::new(&mut backend);
        match policy.engine.configure(config, &mut txn) {
            Ok(_) => {
                // Dropping the bindings of removed trunk groups is best effort.
                let _ = txn.commit();
                let generation = shared::record_config(config).unwrap_or_default();
                policy.generation = generation;
                metrics::gauge("config.generation", generation);
                host::log(
                    Level::Info,
                    &format!("configuration accepted, generation {generation}"),
                );
                true
            }
            Err(e) => {
                metrics::count("config", "refused", 1);
                host::log(
                    Level::Warn,
                    &format!(
                        "configuration refused at {}: {}; generation {} stays in force",
                        e.path,
                        e.reason,
                        shared::generation()
                    ),
                );
                false
            }
        }
    }
}

impl Default for Root {
    fn default() -> Self {
        Root::new()
    }
}

fn plugin_bytes(kind: Buffer, size: usize) -> Vec<u8> {
    host::get_buffer(kind, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body: usize,
        _trailers: usize,
    ) {
        if let Some(s) = &mut self.singleton {
            s.on_response(token, body);
        }
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, size: usize) -> bool {
        let raw = plugin_bytes(Buffer::VmConfiguration, size);
        let text = String::from_utf8_lossy(&raw);
        if text.trim().is_empty() {
            return true;
        }
        match serde_json::from_str::<VmOptions>(&text) {
            Ok(options) => {
                self.on_refusal = options.on_refusal;
                shared::set_drill(options.drill);
                if let Some(n) = options.refusal_log_per_second {
                    super::stream_context::set_refusal_rate(n);
                }
                if let Some(n) = options.max_connections_per_source {
                    super::stream_context::set_connections_per_source(n);
                }
                true
            }
            Err(e) => {
                host::log(Level::Error, &format!("VM configuration refused: {e}"));
                false
            }
        }
    }

    fn on_configure(&mut self, size: usize) -> bool {
        let config = plugin_bytes(Buffer::PluginConfiguration, size);
        let root_id = host::get_property(&["plugin_root_id"]).ok().flatten();
        if root_id.as_deref() == Some(ALERTS_ROOT_ID.as_bytes()) {
            match Singleton::start(&config) {
                Ok(s) => {
                    self.singleton = Some(s);
                    true
                }
                Err(e) => {
                    host::log(
                        Level::Error,
                        &format!("alert singleton configuration refused: {e}"),
                    );
                    false
                }
            }
        } else {
            // Once a second: the refusal log's summary comes out when a flood stops.
            let _ = host::set_tick_period_ms(1_000);
            self.configure_filter(&config)
        }
    }

    fn on_tick(&mut self) {
        match &mut self.singleton {
            Some(s) => s.on_tick(),
            None => {
                super::stream_context::flush_refusal_summary(host::now_ms().unwrap_or_default())
            }
        }
    }

    fn on_queue_ready(&mut self, queue: u32) {
        if let Some(s) = &mut self.singleton {
            s.on_queue_ready(queue);
        }
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Connection::new(
            Rc::clone(&self.policy),
            self.on_refusal,
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }
}
