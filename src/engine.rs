//! The stateful shell around the pure policy: the current configuration generation
//! (last good kept on a refused push), the cached nonce secret, alert ids and
//! throttling. Every front (C ABI, proxy-wasm, wasm-bindgen) drives one of these.

use crate::alert::{self, Alert};
use crate::config::ConfigError;
use crate::digest::{NonceSecret, hex};
use crate::index::Index;
use crate::policy::{self, Decision, Input};
use crate::store::{Store, StoreError, keys};
use crate::verdict::{Cause, Verdict};

/// What the core needs from its host besides the store.
pub trait Host: Store {
    /// Hands one alert event to the host for delivery. Must not block on a network.
    fn alert(&mut self, alert: &Alert);
    /// Fills `buf` with unpredictable bytes (nonce secret, alert ids).
    fn fill_random(&mut self, buf: &mut [u8]);
}

/// A policy instance. One per worker; state shared between workers lives in the host
/// store, so instances agree on bindings without talking to each other.
#[derive(Debug, Default)]
pub struct Engine {
    index: Option<Index>,
    generation: u64,
    secret: Option<NonceSecret>,
    /// Counter mixed into each nonce (digest::make_nonce), seeded at random so two
    /// workers do not count alike.
    nonce_counter: Option<u16>,
}

impl Engine {
    pub fn new() -> Engine {
        Engine::default()
    }

    /// The configuration generation in force: 0 until the first good push.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn index(&self) -> Option<&Index> {
        self.index.as_ref()
    }

    /// Compiles and installs a configuration. On error nothing changes: the last good
    /// configuration stays in force and no binding is touched.
    pub fn configure(&mut self, json: &[u8], store: &mut dyn Store) -> Result<u64, ConfigError> {
        let new = Index::from_json(json)?;
        if let Some(old) = &self.index {
            // Bindings of trunk groups that no longer exist must not revive if the id
            // is reused later. (Bindings outside a narrowed ACL are dropped lazily
            // by binding::current, which also covers a fresh instance after a reload.)
            for trunk in &old.trunks {
                if new.trunk_by_id(&trunk.id).is_none() {
                    // Best effort: a store failure here must not refuse a good config.
                    let _ = crate::binding::remove(store, &trunk.id);
                }
            }
        }
        self.index = Some(new);
        self.generation += 1;
        Ok(self.generation)
    }

    /// Judges one message and hands the alerts it raised (after throttling) to the host.
    pub fn judge(&mut self, input: &Input<'_>, host: &mut dyn Host) -> Verdict {
        match self.try_judge(input, host) {
            Ok(v) => v,
            Err(e) => {
                // Without state the policy cannot tell a registered PBX from a
                // fraudster: fail closed, but as a server error the PBX will retry.
                Verdict::reject(
                    500,
                    format!("Server Internal Error ({e})"),
                    Cause::StoreUnavailable,
                )
            }
        }
    }

    fn try_judge(&mut self, input: &Input<'_>, host: &mut dyn Host) -> Result<Verdict, StoreError> {
        let Some(index) = &self.index else {
            return Ok(Verdict::reject(
                503,
                "Service Unavailable (not configured)",
                Cause::NotConfigured,
            ));
        };
        let secret = match &mut self.secret {
            Some(s) => &*s,
            empty => &*empty.insert(load_or_create_secret(host)?),
        };
        let unique = match &mut self.nonce_counter {
            Some(n) => {
                *n = n.wrapping_add(1);
                *n
            }
            empty => {
                let mut seed = [0u8; 2];
                host.fill_random(&mut seed);
                *empty.insert(u16::from_be_bytes(seed))
            }
        };
        let Decision { verdict, alerts } = policy::decide(index, input, host, secret, unique)?;
        let window = index.alert_window_ms;
        for mut a in alerts {
            a.id = new_alert_id(host, a.at_ms);
            // The decision is already in the store: a throttle that cannot write
            // must not lose its alert (a retry would no longer raise it), so the
            // alert goes out unthrottled instead.
            match alert::throttle(host, a.clone(), window) {
                Ok(out) => out.iter().for_each(|o| host.alert(o)),
                Err(_) => host.alert(&a),
            }
        }
        Ok(verdict)
    }

    /// Closes expired alert windows, delivering their summaries. Hosts call this
    /// periodically (every few seconds is plenty); replay calls it between inputs.
    pub fn tick(&mut self, now_ms: u64, host: &mut dyn Host) -> Result<usize, StoreError> {
        let summaries = alert::flush(host, now_ms)?;
        let n = summaries.len();
        for s in &summaries {
            host.alert(s);
        }
        Ok(n)
    }
}

/// The nonce secret is created by whichever worker needs it first and then read back,
/// so that racing workers converge on the one value the store kept.
fn load_or_create_secret(host: &mut dyn Host) -> Result<NonceSecret, StoreError> {
    if let Some(s) = read_secret(host)? {
        return Ok(s);
    }
    let mut fresh = [0u8; 32];
    host.fill_random(&mut fresh);
    host.set(keys::NONCE_SECRET, hex(&fresh).as_bytes())?;
    Ok(read_secret(host)?.unwrap_or_else(|| NonceSecret::new(&fresh)))
}

fn read_secret(store: &mut dyn Store) -> Result<Option<NonceSecret>, StoreError> {
    let Some(raw) = store.get(keys::NONCE_SECRET)? else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&raw).unwrap_or("");
    Ok(crate::digest::unhex::<32>(text).map(|bytes| NonceSecret::new(&bytes)))
}

fn new_alert_id(host: &mut dyn Host, at_ms: u64) -> String {
    let mut r = [0u8; 8];
    host.fill_random(&mut r);
    format!("{at_ms:x}-{}", hex(&r))
}
