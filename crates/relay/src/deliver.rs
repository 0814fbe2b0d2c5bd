//! The delivery loop: takes pending events in arrival order and delivers each to its
//! recipients and webhooks, retrying with backoff.
//!
//! Two kinds of waiting: a *channel* (the SMTP server, one webhook) that is down
//! waits as a whole, so an outage costs one connection attempt per backoff step
//! rather than one per queued event; a single delivery that the server deferred
//! (4xx for that message) waits on its own.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::channel::Channel;
use super::event;
use super::mail::render;
use super::queue::{Fate, GivenUp, Queue, QueueError, Record, Retry};
use super::{Failure, log, now_ms};

/// Exponential backoff between `min` and `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Delay after the `n`th consecutive failure (n ≥ 1).
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 1u32
            .checked_shl(n.saturating_sub(1).min(31))
            .unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max).max(self.min)
    }
}

/// What a channel looks like from outside (`GET /v1/health`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChannelState {
    /// "unknown" before the first attempt, then "up" or "down".
    pub state: &'static str,
    pub failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at_ms: Option<u64>,
    pub delivered: u64,
}

#[derive(Default)]
pub struct Status {
    channels: Mutex<BTreeMap<String, ChannelState>>,
}

impl Status {
    pub fn snapshot(&self) -> BTreeMap<String, ChannelState> {
        self.channels.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Lists a channel as "unknown" before its first attempt.
    pub fn register(&self, channel: &str) {
        self.with(channel, |_| {});
    }

    fn with(&self, channel: &str, f: impl FnOnce(&mut ChannelState)) {
        if let Ok(mut c) = self.channels.lock() {
            let entry = c.entry(channel.to_string()).or_insert(ChannelState {
                state: "unknown",
                ..ChannelState::default()
            });
            f(entry);
        }
    }

    fn ready_at(&self, channel: &str) -> u64 {
        self.channels
            .lock()
            .ok()
            .and_then(|c| c.get(channel).and_then(|s| s.retry_at_ms))
            .unwrap_or(0)
    }
}

pub struct Deliverer {
    pub queue: Arc<Queue>,
    pub status: Arc<Status>,
    /// Where events go (`channel`): e-mail, then the webhooks.
    pub channels: Vec<Box<dyn Channel>>,
    pub backoff: Backoff,
    pub keep: Duration,
}

struct Job {
    id: String,
    key: String,
    channel: usize,
    target: String,
    event: serde_json::Value,
}

impl Deliverer {
    /// Every target of a record, channel by channel: (key, channel, target).
    fn targets(&self, record: &Record) -> Vec<(String, usize, String)> {
        self.channels
            .iter()
            .enumerate()
            .flat_map(|(i, c)| {
                c.targets(&record.event)
                    .into_iter()
                    .map(move |(key, target)| (key, i, target))
            })
            .collect()
    }

    fn channel_name(&self, channel: usize) -> &str {
        self.channels.get(channel).map_or("?", |c| c.name())
    }

    /// Runs for the life of the process; returns only if the queue breaks.
    pub fn run(self) -> Result<(), QueueError> {
        for c in &self.channels {
            self.status.register(c.name());
        }
        let mut last_prune: Option<Instant> = None;
        loop {
            if last_prune.is_none_or(|t| t.elapsed() > Duration::from_secs(3600)) {
                match self.queue.prune(self.keep) {
                    Ok(0) => {}
                    Ok(n) => log(&format!("forgot {n} delivered event(s) older than --keep")),
                    Err(e) => log(&format!("cannot prune sent/: {e}")),
                }
                last_prune = Some(Instant::now());
            }
            let now = now_ms();
            let mut wake_ms = u64::MAX;
            let mut finished: Vec<(String, Fate)> = Vec::new();
            let (job, generation) = self.queue.find(|record| {
                let targets = self.targets(record);
                let open: Vec<_> = targets
                    .into_iter()
                    .filter(|(key, _, _)| !record.settled(key))
                    .collect();
                if open.is_empty() {
                    finished.push((record.id.clone(), fate_of(record)));
                    return None;
                }
                for (key, channel, target) in open {
                    let ready = self
                        .status
                        .ready_at(self.channel_name(channel))
                        .max(record.retry.get(&key).map_or(0, |r| r.next_ms));
                    if ready <= now {
                        return Some(Job {
                            id: record.id.clone(),
                            key,
                            channel,
                            target,
                            event: record.event.clone(),
                        });
                    }
                    wake_ms = wake_ms.min(ready);
                }
                None
            })?;
            // Records with nothing left to do: no recipient at all, or every
            // target settled in an earlier run.
            for (id, fate) in finished {
                if fate == Fate::Failed {
                    log(&format!(
                        "{id}: no recipient and no webhook; moved to failed/"
                    ));
                }
                self.queue.update(&id, now, |r| {
                    if r.done.is_empty() && r.given_up.is_empty() {
                        r.given_up.push(GivenUp {
                            target: "-".into(),
                            reason: "no recipient and no webhook".into(),
                        });
                    }
                    fate
                })?;
            }
            match job {
                Some(job) => self.deliver(job)?,
                None => {
                    let wait = Duration::from_millis(wake_ms.saturating_sub(now_ms()))
                        .min(Duration::from_secs(60));
                    self.queue.wait(generation, Instant::now() + wait)?;
                }
            }
        }
    }

    fn deliver(&self, job: Job) -> Result<(), QueueError> {
        let channel = self.channel_name(job.channel).to_string();
        let result = match (event::alert_of(&job.event), self.channels.get(job.channel)) {
            (Err(e), _) => Err(Failure::Reject(format!("stored event is unreadable: {e}"))),
            (_, None) => Err(Failure::Reject("channel no longer configured".into())),
            (Ok(alert), Some(c)) => {
                c.send(&job.id, &job.target, &job.event, &alert, &render(&alert))
            }
        };
        let now = now_ms();
        let what = self
            .channels
            .get(job.channel)
            .map_or_else(|| channel.clone(), |c| c.describe(&job.target));
        match &result {
            Ok(()) => {
                let was_down = self.status.ready_at(&channel) > 0;
                self.status.with(&channel, |s| {
                    s.state = "up";
                    s.failures = 0;
                    s.retry_at_ms = None;
                    s.delivered += 1;
                });
                if was_down {
                    log(&format!("{channel} is back"));
                }
                log(&format!("{}: {what} delivered", job.id));
            }
            Err(Failure::Down(e)) => {
                let mut delay = Duration::ZERO;
                self.status.with(&channel, |s| {
                    s.state = "down";
                    s.failures = s.failures.saturating_add(1);
                    delay = self.backoff.delay(s.failures);
                    s.retry_at_ms = Some(now.saturating_add(delay.as_millis() as u64));
                    s.last_error = Some(e.clone());
                });
                log(&format!(
                    "{}: {what} failed, {channel} unusable ({e}); retry in {}",
                    job.id,
                    humantime::format_duration(delay)
                ));
            }
            Err(Failure::Retry(e)) => {
                self.status
                    .with(&channel, |s| s.last_error = Some(e.clone()));
                log(&format!("{}: {what} deferred ({e})", job.id));
            }
            Err(Failure::Reject(e)) => {
                self.status
                    .with(&channel, |s| s.last_error = Some(e.clone()));
                log(&format!("{}: {what} refused for good ({e})", job.id));
            }
        }
        let targets_of = |r: &Record| self.targets(r);
        let backoff = self.backoff;
        let fate = self.queue.update(&job.id, now, |r| {
            match result {
                Ok(()) => {
                    r.retry.remove(&job.key);
                    r.done.push(job.key.clone());
                }
                Err(Failure::Reject(reason)) => {
                    r.retry.remove(&job.key);
                    r.given_up.push(GivenUp {
                        target: job.key.clone(),
                        reason,
                    });
                }
                Err(Failure::Down(e)) => {
                    // The channel's backoff decides when; the record only keeps the
                    // count and the reason, for whoever looks at pending/.
                    let entry = r
                        .retry
                        .entry(job.key.clone())
                        .or_insert_with(Retry::default);
                    entry.attempts = entry.attempts.saturating_add(1);
                    entry.last_error = e;
                }
                Err(Failure::Retry(e)) => {
                    let entry = r
                        .retry
                        .entry(job.key.clone())
                        .or_insert_with(Retry::default);
                    entry.attempts = entry.attempts.saturating_add(1);
                    entry.next_ms =
                        now.saturating_add(backoff.delay(entry.attempts).as_millis() as u64);
                    entry.last_error = e;
                }
            }
            if targets_of(r).iter().all(|(key, _, _)| r.settled(key)) {
                fate_of(r)
            } else {
                Fate::Pending
            }
        })?;
        match fate {
            Some(Fate::Sent) => log(&format!("{}: done", job.id)),
            Some(Fate::Failed) => log(&format!(
                "{}: finished with refusals; kept in failed/{}.json",
                job.id, job.id
            )),
            _ => {}
        }
        Ok(())
    }
}

fn fate_of(r: &Record) -> Fate {
    if r.given_up.is_empty() && !r.done.is_empty() {
        Fate::Sent
    } else {
        Fate::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(300),
        };
        let cases = [
            (0, 1),
            (1, 1),
            (2, 2),
            (3, 4),
            (9, 256),
            (10, 300),
            (40, 300),
        ];
        for (n, secs) in cases {
            assert_eq!(b.delay(n), Duration::from_secs(secs), "{n}");
        }
    }
}
