//! The singleton's state keeper: Envoy's shared data dies with the process, so
//! every store write the workers make (`shared::keep`) is posted, in batches, to the
//! relay's `/v1/state` (`trunkguard alerts serve --state`), and when Envoy starts
//! the kept state is read back into shared data before any message is judged
//! (docs/envoy.md, "Upgrade and restart").
//!
//! The decisions (what to post, when to retry, when to give up restoring) are here
//! as plain functions of time and answers; `Singleton` makes the calls.

use std::collections::BTreeMap;

/// What the keeper wants done next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// GET the kept state.
    Restore,
    /// PUT these changes (`None`: delete).
    Save(BTreeMap<String, Option<String>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing restored yet; since when we have been trying.
    Restoring {
        since_ms: u64,
    },
    Running,
}

#[derive(Debug)]
pub struct Keeper {
    phase: Phase,
    /// Changes not yet posted; later ones replace earlier ones of the same key.
    pending: BTreeMap<String, Option<String>>,
    /// The call in flight (token) and, for a save, what it carries.
    in_flight: Option<(u32, Call)>,
    next_try_ms: u64,
    backoff_ms: u64,
    /// How long to keep trying to restore before judging with what Envoy has.
    restore_timeout_ms: u64,
}

const FIRST_BACKOFF_MS: u64 = 500;
const MAX_BACKOFF_MS: u64 = 30_000;

/// How a call ended, as the singleton counts and logs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Restored(BTreeMap<String, String>),
    Saved(usize),
    /// Failed; tried again after a backoff.
    Failed,
    /// Restoring failed for `restore_timeout_ms`: the workers go on without it.
    GaveUpRestoring,
}

impl Keeper {
    /// `already_restored`: shared data still holds the restored mark (a reload of
    /// the singleton's VM inside a running Envoy: nothing to read back).
    pub fn new(now_ms: u64, restore_timeout_ms: u64, already_restored: bool) -> Keeper {
        Keeper {
            phase: if already_restored {
                Phase::Running
            } else {
                Phase::Restoring { since_ms: now_ms }
            },
            pending: BTreeMap::new(),
            in_flight: None,
            next_try_ms: now_ms,
            backoff_ms: FIRST_BACKOFF_MS,
            restore_timeout_ms,
        }
    }

    pub fn restoring(&self) -> bool {
        matches!(self.phase, Phase::Restoring { .. })
    }

    /// A write a worker made.
    pub fn changed(&mut self, key: String, value: Option<String>) {
        self.pending.insert(key, value);
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The call to make now, if any; [`Keeper::dispatched`] must follow with its
    /// token, or [`Keeper::not_dispatched`].
    pub fn next(&mut self, now_ms: u64) -> Option<Call> {
        if self.in_flight.is_some() || now_ms < self.next_try_ms {
            return None;
        }
        match self.phase {
            Phase::Restoring { .. } => Some(Call::Restore),
            Phase::Running if self.pending.is_empty() => None,
            Phase::Running => Some(Call::Save(std::mem::take(&mut self.pending))),
        }
    }

    pub fn dispatched(&mut self, token: u32, call: Call) {
        self.in_flight = Some((token, call));
    }

    pub fn not_dispatched(&mut self, call: Call, now_ms: u64) -> Ended {
        self.failed(call, now_ms)
    }

    /// Whether `token` is the keeper's call.
    pub fn owns(&self, token: u32) -> bool {
        self.in_flight.as_ref().is_some_and(|(t, _)| *t == token)
    }

    /// The call `token` ended with HTTP `status` and `body`.
    pub fn finished(
        &mut self,
        token: u32,
        status: Option<u32>,
        body: &[u8],
        now_ms: u64,
    ) -> Option<Ended> {
        if !self.owns(token) {
            return None;
        }
        let (_, call) = self.in_flight.take()?;
        let ok = matches!(status, Some(200..=299));
        Some(match (call, ok) {
            (Call::Restore, true) => match parse_entries(body) {
                Some(entries) => {
                    self.phase = Phase::Running;
                    self.backoff_ms = FIRST_BACKOFF_MS;
                    Ended::Restored(entries)
                }
                None => self.failed(Call::Restore, now_ms),
            },
            (Call::Save(batch), true) => {
                self.backoff_ms = FIRST_BACKOFF_MS;
                Ended::Saved(batch.len())
            }
            (call, false) => self.failed(call, now_ms),
        })
    }

    fn failed(&mut self, call: Call, now_ms: u64) -> Ended {
        self.next_try_ms = now_ms.saturating_add(self.backoff_ms);
        self.backoff_ms = (self.backoff_ms * 2).min(MAX_BACKOFF_MS);
        match call {
            Call::Save(batch) => {
                // Changes made since are newer: they win over the batch's.
                for (key, value) in batch {
                    self.pending.entry(key).or_insert(value);
                }
                Ended::Failed
            }
            Call::Restore => match self.phase {
                Phase::Restoring { since_ms }
                    if now_ms.saturating_sub(since_ms) >= self.restore_timeout_ms =>
                {
                    self.phase = Phase::Running;
                    Ended::GaveUpRestoring
                }
                _ => Ended::Failed,
            },
        }
    }
}

/// `{"entries": {key: value}}`, as the relay answers a GET.
fn parse_entries(body: &[u8]) -> Option<BTreeMap<String, String>> {
    #[derive(serde::Deserialize)]
    struct Kept {
        entries: BTreeMap<String, String>,
    }
    serde_json::from_slice::<Kept>(body).ok().map(|k| k.entries)
}

/// The body of a save.
pub fn save_body(batch: &BTreeMap<String, Option<String>>) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Put<'a> {
        changes: &'a BTreeMap<String, Option<String>>,
    }
    serde_json::to_vec(&Put { changes: batch }).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restores_first_then_saves_batches_newest_value_winning() {
        let mut k = Keeper::new(0, 30_000, false);
        k.changed("a".into(), Some("1".into()));
        assert_eq!(
            k.next(0),
            Some(Call::Restore),
            "nothing is saved before the restore"
        );
        k.dispatched(1, Call::Restore);
        assert_eq!(k.next(0), None, "one call at a time");
        let body = br#"{"entries":{"tg/binding/x":"{}"}}"#;
        assert_eq!(
            k.finished(1, Some(200), body, 10),
            Some(Ended::Restored(BTreeMap::from([(
                "tg/binding/x".into(),
                "{}".into()
            )])))
        );
        k.changed("a".into(), Some("2".into()));
        let Some(Call::Save(batch)) = k.next(10) else {
            panic!()
        };
        assert_eq!(batch.get("a"), Some(&Some("2".into())));
        k.dispatched(2, Call::Save(batch));
        // While it is in flight, a newer value and a delete arrive; the post fails.
        k.changed("a".into(), Some("3".into()));
        k.changed("b".into(), None);
        assert_eq!(k.finished(2, Some(503), b"", 20), Some(Ended::Failed));
        assert_eq!(k.next(20), None, "backs off");
        let Some(Call::Save(batch)) = k.next(520) else {
            panic!()
        };
        assert_eq!(
            batch.get("a"),
            Some(&Some("3".into())),
            "the newer value wins"
        );
        assert_eq!(batch.get("b"), Some(&None));
        k.dispatched(3, Call::Save(batch));
        assert_eq!(k.finished(3, Some(200), b"{}", 600), Some(Ended::Saved(2)));
        assert_eq!(
            k.finished(3, Some(200), b"{}", 600),
            None,
            "not ours any more"
        );
    }

    #[test]
    fn a_relay_that_stays_down_stops_holding_the_workers_back() {
        let mut k = Keeper::new(0, 2_000, false);
        let mut now = 0;
        let mut token = 0;
        loop {
            while k.next(now).is_none() {
                now += 100;
            }
            token += 1;
            k.dispatched(token, Call::Restore);
            match k.finished(token, None, b"", now) {
                Some(Ended::Failed) => assert!(k.restoring()),
                Some(Ended::GaveUpRestoring) => break,
                other => panic!("{other:?}"),
            }
        }
        assert!(now >= 2_000 && !k.restoring());
        assert!(
            Keeper::new(0, 1, true).next(0).is_none(),
            "already restored"
        );
    }
}
