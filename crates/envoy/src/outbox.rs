//! The alert singleton's delivery queue: alerts waiting to be posted to the webhook,
//! posts in flight, retries with backoff. Bounded, so a webhook that is down for
//! long costs memory up to a limit and then drops (and counts) alerts.

use std::collections::{BTreeMap, VecDeque};

use trunkguard::alert::Delivery;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub body: Vec<u8>,
    /// Posts tried so far.
    pub attempts: u32,
    /// Not to be posted before this time (ms since the epoch).
    pub due_ms: u64,
}

/// How a post ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// Will be posted again later.
    Retry,
    /// Will be posted again later, and this was its first failure: the alert is
    /// handed back once, so that it can be logged whole while it waits (it lives only
    /// in this VM's memory until the relay takes it).
    Deferred(Vec<u8>),
    /// Given up: out of tries (`max_attempts`).
    Dropped,
    /// The relay refused it (a 4xx but 408 and 429: `401`/`403` a wrong token, the
    /// core's `alert::delivery`): no retry mends it; the alert is handed back for the
    /// operator to re-deliver.
    Rejected(Vec<u8>),
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_queued: usize,
    pub max_in_flight: usize,
    /// Tries before an alert is given up; 0: never, it waits in the queue (bounded by
    /// `max_queued`) until the webhook takes it.
    pub max_attempts: u32,
    pub first_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_queued: 10_000,
            max_in_flight: 8,
            max_attempts: 0,
            first_backoff_ms: 1_000,
            max_backoff_ms: 60_000,
        }
    }
}

#[derive(Debug, Default)]
pub struct Outbox {
    limits: Limits,
    queue: VecDeque<Entry>,
    in_flight: BTreeMap<u32, Entry>,
}

impl Outbox {
    pub fn new(limits: Limits) -> Self {
        Outbox {
            limits,
            ..Outbox::default()
        }
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Queues a new alert; `false`: the queue is full and it was dropped.
    pub fn push(&mut self, body: Vec<u8>, now_ms: u64) -> bool {
        if self.queue.len() >= self.limits.max_queued {
            return false;
        }
        self.queue.push_back(Entry {
            body,
            attempts: 0,
            due_ms: now_ms,
        });
        true
    }

    /// The next alert to post now, if one is due and a post slot is free.
    pub fn next_due(&mut self, now_ms: u64) -> Option<Entry> {
        if self.in_flight.len() >= self.limits.max_in_flight {
            return None;
        }
        let i = self.queue.iter().position(|e| e.due_ms <= now_ms)?;
        self.queue.remove(i)
    }

    /// `entry` was handed to Envoy as the call `token`.
    pub fn dispatched(&mut self, token: u32, mut entry: Entry) {
        entry.attempts += 1;
        self.in_flight.insert(token, entry);
    }

    /// `entry` could not even be handed to Envoy: counts as a failed try.
    pub fn not_dispatched(&mut self, mut entry: Entry, now_ms: u64) -> Outcome {
        entry.attempts += 1;
        self.retry(entry, now_ms)
    }

    /// The call `token` ended with HTTP `status` (`None`: no response, e.g. a
    /// timeout or a reset). `None` when the token is not ours.
    pub fn finished(&mut self, token: u32, status: Option<u32>, now_ms: u64) -> Option<Outcome> {
        let entry = self.in_flight.remove(&token)?;
        let status = status.map(|s| u16::try_from(s).unwrap_or(u16::MAX));
        Some(match trunkguard::alert::delivery(status) {
            Delivery::Sent => Outcome::Sent,
            Delivery::Refused => Outcome::Rejected(entry.body),
            Delivery::Retry => self.retry(entry, now_ms),
        })
    }

    fn retry(&mut self, mut entry: Entry, now_ms: u64) -> Outcome {
        if self.limits.max_attempts != 0 && entry.attempts >= self.limits.max_attempts {
            return Outcome::Dropped;
        }
        let shift = entry.attempts.saturating_sub(1).min(16);
        let backoff = self
            .limits
            .first_backoff_ms
            .saturating_mul(1 << shift)
            .min(self.limits.max_backoff_ms);
        entry.due_ms = now_ms.saturating_add(backoff);
        let first = (entry.attempts == 1).then(|| entry.body.clone());
        self.queue.push_back(entry);
        match first {
            Some(body) => Outcome::Deferred(body),
            None => Outcome::Retry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posts_are_retried_with_backoff_then_dropped() {
        let mut o = Outbox::new(Limits {
            max_attempts: 3,
            ..Limits::default()
        });
        assert!(o.push(b"a".to_vec(), 0));
        let e = o.next_due(0).unwrap();
        o.dispatched(1, e);
        assert_eq!(
            o.finished(1, Some(503), 10),
            Some(Outcome::Deferred(b"a".to_vec())),
            "the first failure hands the alert back, to be logged while it waits"
        );
        assert_eq!(o.next_due(500), None, "backs off 1 s");
        let e = o.next_due(1_010).unwrap();
        o.dispatched(2, e);
        assert_eq!(o.finished(2, None, 2_000), Some(Outcome::Retry));
        assert_eq!(o.next_due(3_000), None, "then 2 s");
        let e = o.next_due(4_000).unwrap();
        o.dispatched(3, e);
        assert_eq!(o.finished(3, Some(500), 4_000), Some(Outcome::Dropped));
        assert_eq!(o.finished(3, Some(200), 4_000), None);
    }

    #[test]
    fn by_default_an_outage_of_any_length_loses_nothing() {
        let mut o = Outbox::new(Limits::default());
        assert!(o.push(b"a".to_vec(), 0));
        let mut now = 0;
        // An hour of a relay that does not answer: retried every minute at most.
        for token in 0..70 {
            let e = o.next_due(now).expect("still queued");
            o.dispatched(token, e);
            let want = if token == 0 {
                Outcome::Deferred(b"a".to_vec())
            } else {
                Outcome::Retry
            };
            assert_eq!(o.finished(token, None, now), Some(want));
            now += 60_000;
        }
        let e = o.next_due(now).unwrap();
        o.dispatched(99, e);
        assert_eq!(o.finished(99, Some(202), now), Some(Outcome::Sent));
    }

    #[test]
    fn success_refusal_and_limits() {
        let mut o = Outbox::new(Limits {
            max_queued: 2,
            max_in_flight: 1,
            ..Limits::default()
        });
        assert!(o.push(b"a".to_vec(), 0) && o.push(b"b".to_vec(), 0));
        assert!(!o.push(b"c".to_vec(), 0));
        let a = o.next_due(0).unwrap();
        o.dispatched(7, a);
        assert_eq!(o.next_due(0), None, "one post at a time");
        assert_eq!(o.finished(7, Some(202), 0), Some(Outcome::Sent));
        let b = o.next_due(0).unwrap();
        o.dispatched(8, b);
        assert_eq!(
            o.finished(8, Some(400), 0),
            Some(Outcome::Rejected(b"b".to_vec())),
            "refused for good is kept for the operator, never dropped"
        );
        assert!(o.push(b"c".to_vec(), 0));
        let c = o.next_due(0).unwrap();
        o.dispatched(9, c);
        assert_eq!(
            o.finished(9, Some(401), 0),
            Some(Outcome::Rejected(b"c".to_vec())),
            "a refused token hands the alert back"
        );
        assert_eq!(
            o.not_dispatched(
                Entry {
                    body: vec![],
                    attempts: 0,
                    due_ms: 0
                },
                0
            ),
            Outcome::Deferred(vec![])
        );
    }
}
