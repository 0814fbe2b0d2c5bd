//! Envoy stats of the filter and the singleton (`define_metric`): `/stats` shows them
//! as `wasmcustom.trunkguard.*`, `/stats/prometheus` as `trunkguard_*`. Every VM
//! defines the same names, which Envoy maps to the same stat, so the figures add up
//! across workers.

use std::cell::RefCell;
use std::collections::BTreeMap;

use super::host::{self, MetricKind};

thread_local! {
    static IDS: RefCell<BTreeMap<(&'static str, &'static str), u32>> =
        const { RefCell::new(BTreeMap::new()) };
}

fn id(kind: MetricKind, group: &'static str, name: &'static str) -> Option<u32> {
    IDS.with(|ids| {
        let mut ids = ids.try_borrow_mut().ok()?;
        if let Some(id) = ids.get(&(group, name)) {
            return Some(*id);
        }
        let full = if group.is_empty() {
            format!("trunkguard.{name}")
        } else {
            format!("trunkguard.{group}.{name}")
        };
        let id = host::define_metric(kind, &full).ok()?;
        ids.insert((group, name), id);
        Some(id)
    })
}

/// Adds `n` to the counter `trunkguard.<group>.<name>` (`trunkguard.<name>` when
/// `group` is empty). Stats are best effort: a failure is ignored.
pub fn count(group: &'static str, name: &'static str, n: u32) {
    if n == 0 {
        return;
    }
    if let Some(id) = id(MetricKind::Counter, group, name) {
        let _ = host::increment_metric(id, i64::from(n));
    }
}

pub fn gauge(name: &'static str, value: u64) {
    if let Some(id) = id(MetricKind::Gauge, "", name) {
        let _ = host::record_metric(id, value);
    }
}
