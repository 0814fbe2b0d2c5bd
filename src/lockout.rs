//! Password guessing: failed digest answers (and right ones from outside the trunk
//! group's access list, src/policy.rs) are counted per source (an IPv6 source per
//! /64, the unit one subscriber gets) and, the failed ones, per trunk group; a
//! source past `digest.lockout.failures` inside `window_s` is refused for `ban_s`
//! without its credentials being checked, and a trunk group past the same threshold
//! raises an alert to its contacts. A trunk group is never locked itself: its own
//! PBX keeps working from where it is while somebody elsewhere guesses its password.
//!
//! Guessing spread over many sources (a botnet, an IPv6 /48: each source under the
//! threshold) is what the per-source count cannot bound, so a trunk group past the
//! threshold with wrong answers from more than one unit in the window is also
//! *guarded* for `ban_s`, renewed by each such answer at or past the threshold:
//! while it is, src/policy.rs takes its REGISTER only from the unit of its last
//! registration, and a right password from anywhere else reads like a wrong one.
//! One source alone (a PBX left with an old password) never guards it: its own ban
//! bounds it. Its PBX keeps its address and its calls; only moving it waits for the
//! attack to stop (docs/policy.md, "Password guessing").
//!
//! Source records sit in a fixed number of slots ([`SLOTS`], [`PER_SLOT`] records
//! each), so a guesser with many addresses cannot grow the store: a full slot
//! forgets its oldest record that is not banned. Which slot a unit lands in is keyed
//! from the nonce secret ([`SlotKey`]): a slot whose records are all bans in force
//! counts no newcomer, and with a public spread a guesser holding a few addresses
//! (an IPv6 /48 has 65,536 units) could work out offline which of them share a slot,
//! have four banned there, and guess from the others uncounted.

use std::net::IpAddr;

use crate::store::{Store, StoreError};

pub const SLOTS: u32 = 4096;
pub const PER_SLOT: usize = 4;

/// The unit a source is counted as: an IPv4 address, or an IPv6 /64.
pub fn source_unit(ip: IpAddr) -> String {
    match crate::acl::canonical_ip(ip) {
        IpAddr::V4(v4) => {
            let mut unit = String::with_capacity(15);
            crate::acl::push_ipv4(&mut unit, v4);
            unit
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// The thresholds (config `digest.lockout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub failures: u32,
    pub window_ms: u64,
    pub ban_ms: u64,
}

/// One record: `unit window_start_ms count banned_until_ms`; `;` between records.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    unit: String,
    window_start_ms: u64,
    count: u32,
    banned_until_ms: u64,
}

fn parse(text: &str) -> Vec<Record> {
    text.split(';')
        .filter_map(|r| {
            let mut p = r.split(' ');
            Some(Record {
                unit: p.next()?.to_string(),
                window_start_ms: p.next()?.parse().ok()?,
                count: p.next()?.parse().ok()?,
                banned_until_ms: p.next()?.parse().ok()?,
            })
        })
        .collect()
}

fn render(records: &[Record]) -> String {
    records
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {}",
                r.unit, r.window_start_ms, r.count, r.banned_until_ms
            )
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// The key of the spread of units over the slots, the same on every worker and node
/// that shares the nonce secret ([`crate::digest::NonceSecret::lockout_slot_key`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SlotKey(pub [u64; 2]);

/// Never the key itself: it is derived from the nonce secret.
impl std::fmt::Debug for SlotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlotKey(..)")
    }
}

/// SipHash-2-4 under `key`: a spread nobody without the secret can predict
/// (collisions only share a slot's room, never a count). `SipHasher` is the standard
/// library's own SipHash-2-4, deprecated only as a general-purpose hasher.
#[allow(deprecated)]
fn slot_of(unit: &str, key: SlotKey) -> u32 {
    use std::hash::Hasher as _;
    let mut h = std::hash::SipHasher::new_with_keys(key.0[0], key.0[1]);
    h.write(unit.as_bytes());
    (h.finish() % u64::from(SLOTS)) as u32
}

/// Whether `unit` is banned at `now_ms`.
pub fn banned(
    store: &mut dyn Store,
    unit: &str,
    slots: SlotKey,
    now_ms: u64,
) -> Result<bool, StoreError> {
    let key = crate::store::keys::lockout_source(slot_of(unit, slots));
    let Some(raw) = store.get(&key)? else {
        return Ok(false);
    };
    Ok(parse(&String::from_utf8_lossy(&raw))
        .iter()
        .any(|r| r.unit == unit && r.banned_until_ms > now_ms))
}

/// Counts one failure of `unit` (a source) and says whether it is now banned.
pub fn source_failed(
    store: &mut dyn Store,
    unit: &str,
    slots: SlotKey,
    now_ms: u64,
    limits: Limits,
) -> Result<bool, StoreError> {
    let key = crate::store::keys::lockout_source(slot_of(unit, slots));
    let raw = store.get(&key)?.unwrap_or_default();
    let mut records = parse(&String::from_utf8_lossy(&raw));
    // Forget what no longer counts: windows that ended without a ban, bans served.
    records.retain(|r| {
        r.banned_until_ms > now_ms || now_ms.saturating_sub(r.window_start_ms) <= limits.window_ms
    });
    let i = match records.iter().position(|r| r.unit == unit) {
        Some(i) => i,
        None => {
            if records.len() >= PER_SLOT {
                // Room for the newcomer: the oldest record that is not banned.
                let oldest = records
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.banned_until_ms <= now_ms)
                    .min_by_key(|(_, r)| r.window_start_ms)
                    .map(|(i, _)| i);
                match oldest {
                    Some(i) => {
                        records.remove(i);
                    }
                    // Every record is a ban in force: keep them, count nothing.
                    None => return Ok(false),
                }
            }
            records.push(Record {
                unit: unit.to_string(),
                window_start_ms: now_ms,
                count: 0,
                banned_until_ms: 0,
            });
            records.len() - 1
        }
    };
    let Some(r) = records.get_mut(i) else {
        return Ok(false);
    };
    r.count = r.count.saturating_add(1);
    let now_banned = r.count >= limits.failures;
    if now_banned {
        r.banned_until_ms = now_ms.saturating_add(limits.ban_ms);
        // The next window starts after the ban.
        r.window_start_ms = r.banned_until_ms;
        r.count = 0;
    }
    store.set(&key, render(&records).as_bytes())?;
    Ok(now_banned)
}

/// A trunk group's record: `window_start_ms count guarded_until_ms first_unit
/// spread` (the window's first failing unit, and 1 once another unit failed in it).
/// A record of an older version lacks the last three fields: not guarded.
#[derive(Default)]
struct TrunkRecord {
    window_start_ms: u64,
    count: u32,
    guarded_until_ms: u64,
    first_unit: String,
    spread: bool,
}

fn trunk_record(store: &mut dyn Store, key: &str) -> Result<TrunkRecord, StoreError> {
    let raw = store.get(key)?.unwrap_or_default();
    let text = String::from_utf8_lossy(&raw);
    let mut parts = text.split(' ');
    let mut number = || parts.next().and_then(|s| s.parse::<u64>().ok());
    let window_start_ms = number().unwrap_or(0);
    let count = number().and_then(|c| u32::try_from(c).ok()).unwrap_or(0);
    let guarded_until_ms = number().unwrap_or(0);
    Ok(TrunkRecord {
        window_start_ms,
        count,
        guarded_until_ms,
        first_unit: parts.next().unwrap_or_default().to_string(),
        spread: parts.next() == Some("1"),
    })
}

/// Counts one failure of source `unit` against trunk group `trunk`; true when this
/// one reaches the threshold (once per window: the moment to alert its contacts).
/// At or past the threshold, with failures from more than one unit in the window,
/// it guards the trunk group for `ban_ms` from now ([`trunk_guarded`]).
pub fn trunk_failed(
    store: &mut dyn Store,
    trunk: &str,
    unit: &str,
    now_ms: u64,
    limits: Limits,
) -> Result<bool, StoreError> {
    let key = crate::store::keys::lockout_trunk(trunk);
    let mut r = trunk_record(store, &key)?;
    // A record of the version before has no first unit: its window starts here.
    if r.count == 0
        || r.first_unit.is_empty()
        || now_ms.saturating_sub(r.window_start_ms) > limits.window_ms
    {
        r.window_start_ms = now_ms;
        r.count = 0;
        r.first_unit = unit.to_string();
        r.spread = false;
    }
    r.spread |= r.first_unit != unit;
    r.count = r.count.saturating_add(1);
    let reached = r.count == limits.failures;
    if r.count >= limits.failures && r.spread {
        // Every such answer renews the guard, so it holds as long as the attack
        // goes on at that pace.
        r.guarded_until_ms = r.guarded_until_ms.max(now_ms.saturating_add(limits.ban_ms));
    }
    if r.count >= limits.failures.saturating_mul(2) {
        // A long attack: a new window, so the contacts hear of it again.
        r.window_start_ms = now_ms;
        r.count = 0;
    }
    let mut text = String::with_capacity(64);
    for n in [r.window_start_ms, u64::from(r.count), r.guarded_until_ms] {
        text.push_str(itoa::Buffer::new().format(n));
        text.push(' ');
    }
    text.push_str(&r.first_unit);
    text.push_str(if r.spread { " 1" } else { " 0" });
    store.set(&key, text.as_bytes())?;
    Ok(reached)
}

/// Whether trunk group `trunk` is guarded at `now_ms` ([`trunk_failed`]).
pub fn trunk_guarded(store: &mut dyn Store, trunk: &str, now_ms: u64) -> Result<bool, StoreError> {
    let key = crate::store::keys::lockout_trunk(trunk);
    Ok(trunk_record(store, &key)?.guarded_until_ms > now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const K: SlotKey = SlotKey([1, 2]);

    const LIMITS: Limits = Limits {
        failures: 3,
        window_ms: 60_000,
        ban_ms: 600_000,
    };

    #[test]
    fn a_source_is_banned_at_the_threshold_and_freed_after_the_ban() {
        let mut s = MemoryStore::default();
        assert_eq!(
            source_failed(&mut s, "198.51.100.9", K, 1_000, LIMITS),
            Ok(false)
        );
        assert_eq!(
            source_failed(&mut s, "198.51.100.9", K, 2_000, LIMITS),
            Ok(false)
        );
        assert_eq!(banned(&mut s, "198.51.100.9", K, 2_500), Ok(false));
        assert_eq!(
            source_failed(&mut s, "198.51.100.9", K, 3_000, LIMITS),
            Ok(true)
        );
        assert_eq!(banned(&mut s, "198.51.100.9", K, 3_001), Ok(true));
        assert_eq!(banned(&mut s, "198.51.100.10", K, 3_001), Ok(false));
        assert_eq!(banned(&mut s, "198.51.100.9", K, 603_001), Ok(false));
    }

    #[test]
    fn failures_spread_beyond_the_window_do_not_ban() {
        let mut s = MemoryStore::default();
        for i in 0..10u64 {
            let banned = source_failed(&mut s, "198.51.100.9", K, i * 61_000, LIMITS);
            assert_eq!(banned, Ok(false), "failure {i}");
        }
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        let a = source_unit("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = source_unit("2001:db8:1:2:bbbb::9".parse().unwrap());
        let c = source_unit("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            source_unit("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1"
        );
    }

    #[test]
    fn the_store_stays_bounded_whatever_the_number_of_sources() {
        let mut s = MemoryStore::default();
        for i in 0..20_000u32 {
            let unit = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
            source_failed(&mut s, &unit, K, 1_000, LIMITS).unwrap();
        }
        assert!(s.entries.len() <= SLOTS as usize);
        let longest = s.entries.values().map(Vec::len).max().unwrap_or(0);
        assert!(longest < 200, "a slot holds {longest} bytes");
    }

    #[test]
    fn the_slots_units_share_depend_on_the_key() {
        let units: Vec<String> = (0..64u32).map(|i| format!("10.0.0.{i}")).collect();
        let spread = |k| units.iter().map(|u| slot_of(u, k)).collect::<Vec<_>>();
        assert_eq!(spread(K), spread(SlotKey([1, 2])));
        assert_ne!(spread(K), spread(SlotKey([1, 3])));
        assert!(spread(K).iter().all(|&slot| slot < SLOTS));
    }

    #[test]
    fn a_trunk_group_alert_fires_once_per_window() {
        let mut s = MemoryStore::default();
        let fired: Vec<bool> = (0..7u64)
            .map(|i| trunk_failed(&mut s, "hq", "198.51.100.9", 1_000 + i, LIMITS).unwrap())
            .collect();
        assert_eq!(fired, [false, false, true, false, false, false, false]);
    }

    #[test]
    fn a_trunk_group_is_guarded_from_the_threshold_for_ban_s_renewed_while_guessing_goes_on() {
        let mut s = MemoryStore::default();
        trunk_failed(&mut s, "hq", "198.51.100.1", 1_000, LIMITS).unwrap();
        trunk_failed(&mut s, "hq", "198.51.100.2", 2_000, LIMITS).unwrap();
        assert_eq!(trunk_guarded(&mut s, "hq", 2_001), Ok(false));
        trunk_failed(&mut s, "hq", "198.51.100.3", 3_000, LIMITS).unwrap();
        assert_eq!(trunk_guarded(&mut s, "hq", 3_001), Ok(true));
        assert_eq!(trunk_guarded(&mut s, "branch", 3_001), Ok(false));
        assert_eq!(trunk_guarded(&mut s, "hq", 603_000), Ok(false));
        // A fourth failure in the same window renews it.
        trunk_failed(&mut s, "hq", "198.51.100.1", 50_000, LIMITS).unwrap();
        assert_eq!(trunk_guarded(&mut s, "hq", 603_000), Ok(true));
        assert_eq!(trunk_guarded(&mut s, "hq", 650_000), Ok(false));
        // Failures spread beyond the window never guard it.
        let mut s = MemoryStore::default();
        for i in 0..10u64 {
            let unit = format!("198.51.100.{i}");
            trunk_failed(&mut s, "hq", &unit, i * 61_000, LIMITS).unwrap();
            assert_eq!(trunk_guarded(&mut s, "hq", i * 61_000 + 1), Ok(false));
        }
        // A record of the version before (two fields) is not guarded, and starts a
        // window of its own: one source after it guards nothing.
        let mut s = MemoryStore::default();
        s.set(&crate::store::keys::lockout_trunk("hq"), b"1000 2")
            .unwrap();
        assert_eq!(trunk_guarded(&mut s, "hq", 1_500), Ok(false));
        for at in [2_000, 2_001, 2_002] {
            trunk_failed(&mut s, "hq", "198.51.100.1", at, LIMITS).unwrap();
        }
        assert_eq!(trunk_guarded(&mut s, "hq", 2_003), Ok(false));
    }

    #[test]
    fn one_source_alone_alerts_but_never_guards_the_trunk_group() {
        let mut s = MemoryStore::default();
        let fired: Vec<bool> = (0..6u64)
            .map(|i| trunk_failed(&mut s, "hq", "2001:db8:1:2::/64", 1_000 + i, LIMITS).unwrap())
            .collect();
        assert_eq!(fired, [false, false, true, false, false, false]);
        assert_eq!(trunk_guarded(&mut s, "hq", 1_010), Ok(false));
        // A second unit in the same window does.
        let mut s = MemoryStore::default();
        trunk_failed(&mut s, "hq", "198.51.100.7", 1_020, LIMITS).unwrap();
        trunk_failed(&mut s, "hq", "198.51.100.7", 1_030, LIMITS).unwrap();
        trunk_failed(&mut s, "hq", "198.51.100.8", 1_040, LIMITS).unwrap();
        assert_eq!(trunk_guarded(&mut s, "hq", 1_041), Ok(true));
    }
}
