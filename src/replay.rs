//! The replay set: each (nonce, nc) is accepted once, as RFC 7616 §3.4.5 and
//! RFC 2617 §3.2.3 expect of a server that checks `nc` (Kamailio's auth module
//! does the same with `nonce_count`).
//!
//! Nonces stay stateless (`digest.rs`); what is stored is only the highest `nc`
//! accepted for each nonce that has been used, until the nonce expires. The records
//! sit in a fixed number of slots (`digest.replay_slots`), each holding at most
//! [`PER_SLOT`] live nonces, so the store holds a bounded amount whatever the
//! traffic. A full slot forgets its oldest record and remembers only that every
//! nonce of the slot issued up to then is spent (its watermark): an answer on such
//! a nonce is asked to try a fresh one (`stale=true`, which a PBX does on its own),
//! so nothing forgotten can be replayed, and a busy edge or a flood of valid
//! answers costs others a re-challenge, never a lockout.

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
    /// The nonce is older than what its slot still remembers: ask for a fresh one.
    Forgotten,
}

/// One record: `issued_ms nonce nc`, records separated by `;`, after the slot's
/// watermark `w=<ms>` when it has one.
struct Record<'a> {
    issued_ms: u64,
    nonce: &'a str,
    nc: u32,
}

fn parse(text: &str) -> (u64, Vec<Record<'_>>) {
    let watermark = text
        .split(';')
        .find_map(|r| r.strip_prefix("w=").and_then(|w| w.parse().ok()))
        .unwrap_or(0);
    let records = text
        .split(';')
        .filter(|r| !r.starts_with("w="))
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
        .collect();
    (watermark, records)
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

/// Spends every nc of a nonce whose answer let nothing through (a wrong answer, or
/// a right one refused for where it came from): `Fresh` only when the nonce had not
/// been used before. A nonce is thus worth at most one counted guess, whoever holds
/// it, and every later answer on it, right or wrong, gets the same `stale=true`
/// challenge (docs/policy.md, "A nonce is worth one guess").
pub fn spend(
    store: &mut dyn Store,
    slots: u32,
    nonce: &str,
    issued_ms: u64,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<Claim, StoreError> {
    claim(store, slots, nonce, issued_ms, u32::MAX, now_ms, ttl_ms)
}

/// Records (nonce, nc), issued at `issued_ms`, as used at `now_ms`; records of
/// nonces older than `ttl_ms` are dropped on the way (they are refused anyway). An
/// nc of `u32::MAX`, above every one a PBX counts to, spends the whole nonce
/// ([`spend`]): `Fresh` only for a nonce not used before.
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
    let (mut watermark, records) = parse(&text);
    let mut records: Vec<Record<'_>> = records
        .into_iter()
        .filter(|r| now_ms.saturating_sub(r.issued_ms) <= ttl_ms)
        .collect();
    if now_ms.saturating_sub(watermark) > ttl_ms {
        // Every nonce it covers has expired anyway.
        watermark = 0;
    }
    if watermark > 0 && issued_ms <= watermark {
        return Ok(Claim::Forgotten);
    }
    let live = records.len();
    let outcome = match records.iter_mut().find(|r| r.nonce == nonce) {
        Some(r) if nc <= r.nc => return Ok(Claim::Replayed),
        Some(r) => {
            r.nc = nc;
            if nc == u32::MAX {
                Claim::Replayed
            } else {
                Claim::Fresh
            }
        }
        None => {
            if live >= PER_SLOT {
                // Room for the newcomer: forget the oldest record, and with it every
                // nonce of this slot issued up to then.
                let Some((i, oldest)) = records
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, r)| r.issued_ms)
                    .map(|(i, r)| (i, r.issued_ms))
                else {
                    return Ok(Claim::Forgotten);
                };
                if issued_ms <= oldest {
                    return Ok(Claim::Forgotten);
                }
                records.remove(i);
                watermark = watermark.max(oldest);
            }
            records.push(Record {
                issued_ms,
                nonce,
                nc,
            });
            Claim::Fresh
        }
    };
    store.set(&key, render(watermark, &records).as_bytes())?;
    Ok(outcome)
}

/// The slot's text, as `parse` reads it; written without core::fmt, as it is for
/// every authenticated request (src/store.rs, keys).
fn render(watermark: u64, records: &[Record<'_>]) -> String {
    let mut value = String::with_capacity(8 + records.len() * 80);
    let mut digits = itoa::Buffer::new();
    if watermark > 0 {
        value.push_str("w=");
        value.push_str(digits.format(watermark));
    }
    for r in records {
        if !value.is_empty() {
            value.push(';');
        }
        value.push_str(digits.format(r.issued_ms));
        value.push(' ');
        value.push_str(r.nonce);
        value.push(' ');
        value.push_str(digits.format(r.nc));
    }
    value
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
    fn a_spent_nonce_counts_once_and_takes_no_answer_after() {
        let mut s = MemoryStore::default();
        let unused = "00000001aaaaaaaabbbbbbbbccccccccdddddddd00000001";
        assert_eq!(spend(&mut s, 16, unused, 0, 10, TTL), Ok(Claim::Fresh));
        assert_eq!(spend(&mut s, 16, unused, 0, 20, TTL), Ok(Claim::Replayed));
        assert_eq!(
            claim(&mut s, 16, unused, 0, 2, 30, TTL),
            Ok(Claim::Replayed)
        );
        // A nonce a PBX already answered with is not fresh to spend, and once spent
        // takes no higher nc either.
        let used = "00000001aaaaaaaabbbbbbbbccccccccdddddddd00000002";
        assert_eq!(claim(&mut s, 16, used, 0, 1, 40, TTL), Ok(Claim::Fresh));
        assert_eq!(spend(&mut s, 16, used, 0, 50, TTL), Ok(Claim::Replayed));
        assert_eq!(claim(&mut s, 16, used, 0, 2, 60, TTL), Ok(Claim::Replayed));
    }

    #[test]
    fn a_full_slot_forgets_its_oldest_nonce_which_then_can_never_be_replayed() {
        let mut s = MemoryStore::default();
        // One slot: every nonce lands in it, issued at 1, 2, 3, 4 ms.
        for i in 1..=PER_SLOT as u64 {
            let n = format!("nonce{i}");
            assert_eq!(claim(&mut s, 1, &n, i, 1, 10, TTL), Ok(Claim::Fresh));
        }
        // A fifth, newer nonce is accepted: the oldest record goes...
        assert_eq!(claim(&mut s, 1, "nonce5", 5, 1, 10, TTL), Ok(Claim::Fresh));
        // ...and its nonce is spent, whatever nc: a fresh one is asked for.
        assert_eq!(
            claim(&mut s, 1, "nonce1", 1, 1, 11, TTL),
            Ok(Claim::Forgotten)
        );
        assert_eq!(
            claim(&mut s, 1, "nonce1", 1, 9, 11, TTL),
            Ok(Claim::Forgotten)
        );
        // A nonce older than everything the full slot holds is spent too.
        assert_eq!(
            claim(&mut s, 1, "older", 1, 1, 12, TTL),
            Ok(Claim::Forgotten)
        );
        // The ones still held keep their replay protection.
        assert_eq!(
            claim(&mut s, 1, "nonce3", 3, 1, 13, TTL),
            Ok(Claim::Replayed)
        );
        assert_eq!(claim(&mut s, 1, "nonce3", 3, 2, 13, TTL), Ok(Claim::Fresh));
        assert_eq!(s.entries.len(), 1, "one slot, one key");
    }

    #[test]
    fn a_flood_of_valid_answers_never_locks_a_slot() {
        let mut s = MemoryStore::default();
        for i in 1..=10_000u64 {
            let n = format!("nonce{i}");
            assert_eq!(
                claim(&mut s, 1, &n, i, 1, i, TTL),
                Ok(Claim::Fresh),
                "answer {i}"
            );
        }
        let stored = s.entries.values().map(Vec::len).max().unwrap_or(0);
        assert!(stored < 400, "the slot holds {stored} bytes");
        // Once the watermark is older than the TTL it is dropped.
        assert_eq!(
            claim(&mut s, 1, "late", 2 * TTL, 1, 2 * TTL, TTL),
            Ok(Claim::Fresh)
        );
    }

    #[test]
    fn a_slot_is_written_as_it_is_read() {
        let records = [
            Record {
                issued_ms: 1,
                nonce: "n1",
                nc: 1,
            },
            Record {
                issued_ms: 20,
                nonce: "n2",
                nc: 4_294_967_295,
            },
        ];
        assert_eq!(render(0, &records), "1 n1 1;20 n2 4294967295");
        assert_eq!(render(7, &records[..1]), "w=7;1 n1 1");
        assert_eq!(render(7, &[]), "w=7");
        let text = render(7, &records);
        let (watermark, back) = parse(&text);
        assert_eq!(watermark, 7);
        assert_eq!(
            back.iter()
                .map(|r| (r.issued_ms, r.nonce, r.nc))
                .collect::<Vec<_>>(),
            [(1, "n1", 1), (20, "n2", 4_294_967_295)]
        );
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
