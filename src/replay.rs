//! The replay set: each (nonce, nc) is accepted once, as RFC 7616 §3.4.5 and
//! RFC 2617 §3.2.3 expect of a server that checks `nc` (Kamailio's auth module
//! does the same with `nonce_count`).
//!
//! Nonces stay stateless (`digest.rs`); what is stored is only the highest `nc`
//! accepted for each nonce that has been used, until the nonce expires. The records
//! sit in a fixed number of slots (`digest.replay_slots`), each holding at most
//! [`PER_SLOT`] live nonces, so the store holds a bounded amount whatever the
//! traffic. Only requests with a correct response reach this, so a stranger cannot
//! fill it; a slot that is full of live nonces answers "try a fresh nonce", which a
//! PBX does on its own (`stale=true`).

use crate::store::{Store, StoreError};

/// Live nonces one slot keeps.
pub const PER_SLOT: usize = 4;

/// What the replay set says of one accepted answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First use of this nc (or a higher one) of this nonce: recorded.
    Fresh,
    /// This nonce was already used with this nc or a higher one.
    Replayed,
    /// The slot holds [`PER_SLOT`] other live nonces: ask for a fresh one.
    Full,
}

/// One record: `issued_ms nonce nc`, records separated by `;`.
struct Record<'a> {
    issued_ms: u64,
    nonce: &'a str,
    nc: u32,
}

fn parse(text: &str) -> Vec<Record<'_>> {
    text.split(';')
        .filter_map(|r| {
            let mut parts = r.split(' ');
            let issued_ms = parts.next()?.parse().ok()?;
            let nonce = parts.next()?;
            let nc = parts.next()?.parse().ok()?;
            Some(Record {
                issued_ms,
                nonce,
                nc,
            })
        })
        .collect()
}

/// The slot of a nonce: from its MAC, which an outsider cannot choose.
fn slot(nonce: &str, slots: u32) -> u32 {
    let tail = nonce.get(nonce.len().saturating_sub(8)..).unwrap_or("");
    let n = u32::from_str_radix(tail, 16).unwrap_or(0);
    n % slots.max(1)
}

/// `nc` as a number: 8 hex digits (RFC 7616 §3.4); an answer without one (RFC
/// 2069) counts as 1, so it can be used once.
pub fn nc_value(nc: Option<&str>) -> Option<u32> {
    match nc {
        None => Some(1),
        Some(text) if text.len() == 8 => u32::from_str_radix(text, 16).ok(),
        Some(_) => None,
    }
}

/// Records (nonce, nc), issued at `issued_ms`, as used at `now_ms`; records of
/// nonces older than `ttl_ms` are dropped on the way (they are refused anyway).
pub fn claim(
    store: &mut dyn Store,
    slots: u32,
    nonce: &str,
    issued_ms: u64,
    nc: u32,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<Claim, StoreError> {
    let key = crate::store::keys::replay_slot(slot(nonce, slots));
    let raw = store.get(&key)?.unwrap_or_default();
    let text = String::from_utf8_lossy(&raw);
    let mut records: Vec<Record<'_>> = parse(&text)
        .into_iter()
        .filter(|r| now_ms.saturating_sub(r.issued_ms) <= ttl_ms)
        .collect();
    let live = records.len();
    match records.iter_mut().find(|r| r.nonce == nonce) {
        Some(r) if nc <= r.nc => return Ok(Claim::Replayed),
        Some(r) => r.nc = nc,
        None if live >= PER_SLOT => return Ok(Claim::Full),
        None => records.push(Record {
            issued_ms,
            nonce,
            nc,
        }),
    }
    let value = records
        .iter()
        .map(|r| format!("{} {} {}", r.issued_ms, r.nonce, r.nc))
        .collect::<Vec<_>>()
        .join(";");
    store.set(&key, value.as_bytes())?;
    Ok(Claim::Fresh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const TTL: u64 = 300_000;

    #[test]
    fn each_nc_of_a_nonce_is_accepted_once_and_only_upwards() {
        let mut s = MemoryStore::default();
        let n = "00000001aaaaaaaabbbbbbbbccccccccdddddddd00000001";
        assert_eq!(claim(&mut s, 16, n, 0, 1, 10, TTL), Ok(Claim::Fresh));
        assert_eq!(claim(&mut s, 16, n, 0, 1, 20, TTL), Ok(Claim::Replayed));
        assert_eq!(claim(&mut s, 16, n, 0, 2, 30, TTL), Ok(Claim::Fresh));
        assert_eq!(claim(&mut s, 16, n, 0, 2, 40, TTL), Ok(Claim::Replayed));
        assert_eq!(claim(&mut s, 16, n, 0, 1, 50, TTL), Ok(Claim::Replayed));
    }

    #[test]
    fn a_full_slot_asks_for_a_fresh_nonce_until_its_nonces_expire() {
        let mut s = MemoryStore::default();
        // One slot: every nonce lands in it.
        for i in 0..PER_SLOT {
            let n = format!("nonce{i}");
            assert_eq!(claim(&mut s, 1, &n, 0, 1, 10, TTL), Ok(Claim::Fresh));
        }
        assert_eq!(claim(&mut s, 1, "late", 5, 1, 10, TTL), Ok(Claim::Full));
        // Once the first ones are older than the TTL, their room is free again.
        assert_eq!(
            claim(&mut s, 1, "later", TTL, 1, TTL + 1, TTL),
            Ok(Claim::Fresh)
        );
        assert_eq!(s.entries.len(), 1, "one slot, one key");
    }

    #[test]
    fn nc_must_be_eight_hex_digits_or_absent() {
        assert_eq!(nc_value(Some("00000001")), Some(1));
        assert_eq!(nc_value(Some("0000000a")), Some(10));
        assert_eq!(nc_value(None), Some(1));
        assert_eq!(nc_value(Some("1")), None);
        assert_eq!(nc_value(Some("zzzzzzzz")), None);
    }
}
