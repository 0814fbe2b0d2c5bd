//! Connections held per source, so that one address cannot take every connection
//! Envoy allows (docs/envoy.md, "Connection limit"). A source is counted as its
//! unit: an IPv4 address, or an IPv6 /64 (`trunkguard::lockout::source_unit`, one
//! subscriber's prefix, which it can fill with addresses).
//!
//! Each worker VM counts the connections it serves: its count lives and dies with
//! the VM, so a VM that traps and is reloaded (`failure_policy`) leaves no count
//! behind for connections that are gone, as a count in Envoy's shared data would.
//! A source therefore holds at most `limit` connections per worker.

use std::collections::HashMap;
use std::net::IpAddr;

/// The default `max_connections_per_source`: room for the PBXs of an office or a
/// hosting provider behind one address, far below Envoy's own limit.
pub const DEFAULT_PER_SOURCE: u32 = 64;

#[derive(Debug)]
pub struct Slots {
    /// 0: no limit.
    limit: u32,
    held: HashMap<String, u32>,
}

impl Default for Slots {
    fn default() -> Self {
        Slots::new(DEFAULT_PER_SOURCE)
    }
}

impl Slots {
    pub fn new(limit: u32) -> Slots {
        Slots {
            limit,
            held: HashMap::new(),
        }
    }

    /// Sets the limit for connections from now on; those held stay.
    pub fn set_limit(&mut self, limit: u32) {
        self.limit = limit;
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// A slot for a new connection from `ip`: its unit, to hand back to
    /// [`Slots::release`] when the connection ends; `None` when the unit holds
    /// `limit` connections already (the connection is to be closed).
    pub fn take(&mut self, ip: IpAddr) -> Option<String> {
        let unit = trunkguard::lockout::source_unit(ip);
        let held = self.held.entry(unit.clone()).or_insert(0);
        if self.limit != 0 && *held >= self.limit {
            return None;
        }
        *held = held.saturating_add(1);
        Some(unit)
    }

    /// Gives back the slot [`Slots::take`] returned.
    pub fn release(&mut self, unit: &str) {
        if let Some(held) = self.held.get_mut(unit) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.held.remove(unit);
            }
        }
    }

    /// Units holding at least one connection.
    pub fn sources(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_holds_at_most_the_limit_and_a_released_slot_serves_again() {
        let mut slots = Slots::new(2);
        let a = slots.take(ip("192.0.2.1")).unwrap();
        let b = slots.take(ip("192.0.2.1")).unwrap();
        assert_eq!(slots.take(ip("192.0.2.1")), None);
        // Another source is not held back by the first.
        assert!(slots.take(ip("192.0.2.2")).is_some());
        slots.release(&a);
        assert!(slots.take(ip("192.0.2.1")).is_some());
        slots.release(&b);
    }

    #[test]
    fn an_ipv6_64_counts_as_one_source_and_a_mapped_ipv4_as_its_address() {
        let mut slots = Slots::new(1);
        assert!(slots.take(ip("2001:db8:1:2::1")).is_some());
        assert_eq!(slots.take(ip("2001:db8:1:2::ffff")), None);
        assert!(slots.take(ip("2001:db8:1:3::1")).is_some());
        assert!(slots.take(ip("192.0.2.9")).is_some());
        assert_eq!(slots.take(ip("::ffff:192.0.2.9")), None);
    }

    #[test]
    fn released_units_are_forgotten_and_a_zero_limit_admits_all() {
        let mut slots = Slots::new(0);
        let units: Vec<_> = (0..100)
            .map(|_| slots.take(ip("198.51.100.7")).unwrap())
            .collect();
        assert_eq!(slots.sources(), 1);
        for u in &units {
            slots.release(u);
        }
        assert_eq!(slots.sources(), 0);
        // A release of a unit never taken changes nothing.
        slots.release("203.0.113.1");
        assert_eq!(slots.sources(), 0);
    }
}
