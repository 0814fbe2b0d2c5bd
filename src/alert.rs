//! Alert events and their throttle.
//!
//! One attack must not become ten thousand e-mails: the first occurrence of a
//! (trunk group, kind, source IP) is sent at once, later ones inside the window are
//! only counted, and when the window closes a single summary carries the count.

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, keys};
use crate::verdict::Cause;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// An authenticated call was refused (switch `alerts.blocked_calls`).
    BlockedCall,
    /// The registration IP differs from the last successful one (switch
    /// `alerts.reg_ip_change`).
    RegIpChange,
    /// An authenticated REGISTER came from outside the ACL: the credentials work from
    /// somewhere they should not. Sent under the `blocked_calls` switch.
    BlockedRegistration,
    /// Wrong passwords for this trunk group's username reached the lockout
    /// threshold (config `digest.lockout`): somebody is guessing it. Under the
    /// `blocked_calls` switch.
    PasswordGuessing,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::BlockedCall => "blocked_call",
            AlertKind::RegIpChange => "reg_ip_change",
            AlertKind::BlockedRegistration => "blocked_registration",
            AlertKind::PasswordGuessing => "password_guessing",
        }
    }
}

/// One alert event, handed to the host's alert callback as JSON (docs/alerts.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Unique per event, so a relay can drop duplicates from host retries.
    pub id: String,
    pub kind: AlertKind,
    pub location: String,
    pub trunk_group: String,
    pub recipients: Vec<String>,
    /// Milliseconds since the Unix epoch, and the same instant in RFC 3339 UTC.
    pub at_ms: u64,
    pub time: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cause: Option<Cause>,
    /// Words for the cause, for people reading the alert.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub description: Option<String>,
    /// `ip:port` the refused message came from.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source: Option<String>,
    /// `ip:port` of the current registration, for `not_registered_address`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub registered: Option<String>,
    /// The trunk group's ACL, for `not_in_access_list`.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub acl: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub old_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub new_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub to: Option<String>,
    /// How many occurrences this event stands for: 1 for a first alert, the number of
    /// folded repeats for a summary.
    pub count: u64,
    /// True for the end-of-window summary of repeats that were counted, not sent.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub summary: bool,
    /// For a summary: when the repeats were first and last seen.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub first_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_ms: Option<u64>,
}

/// Windows one trunk group may hold open at once. Past this, alerts from further
/// sources share one overflow window per kind, counted in its summary: the store a
/// trunk group uses stays bounded however many addresses an attacker has.
pub const MAX_OPEN_PER_TRUNK: usize = 64;

/// Sender-written header text (Call-ID, From, To) copied into an alert, at most:
/// enough to recognise a call, too little to fill the host's memory.
pub const MAX_HEADER_TEXT: usize = 256;

/// `text` on one line (folding and control characters become a space, so a sender
/// cannot add lines of its own to an alert e-mail), cut to [`MAX_HEADER_TEXT`] bytes
/// at a character boundary, marked when cut.
pub fn bounded_text(text: &str) -> String {
    let text: String = text
        .chars()
        .map(|c| {
            // Controls, and the bidirectional overrides that make text read in
            // another order than it is written.
            if c.is_control()
                || ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c)
            {
                ' '
            } else {
                c
            }
        })
        .collect();
    if text.len() <= MAX_HEADER_TEXT {
        return text;
    }
    let mut end = MAX_HEADER_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", text.get(..end).unwrap_or(""))
}

impl Alert {
    /// One window per (trunk group, kind, source), a source being an IPv4 address
    /// or an IPv6 /64 (one subscriber's prefix, which it can fill with addresses).
    pub fn throttle_key(&self) -> String {
        let source = self
            .source
            .as_deref()
            .and_then(|s| s.parse::<std::net::SocketAddr>().ok())
            .map(|s| crate::lockout::source_unit(s.ip()))
            .or_else(|| self.new_ip.clone())
            .unwrap_or_default();
        keys::throttle(&self.trunk_group, self.kind.as_str(), &source)
    }
}

/// RFC 3339 UTC with milliseconds, from Unix milliseconds.
pub fn rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Window {
    until_ms: u64,
    repeats: u64,
    first_repeat_ms: u64,
    last_repeat_ms: u64,
    first: Alert,
}

/// Passes `alert` through the throttle: returns the events to deliver now (the alert
/// itself when its window is new, preceded by the summary of an expired window).
/// Its cost does not grow with the number of open windows: it touches the window
/// and, for a new one, its trunk group's list of at most [`MAX_OPEN_PER_TRUNK`].
pub fn throttle(
    store: &mut dyn Store,
    alert: Alert,
    window_ms: u64,
) -> Result<Vec<Alert>, StoreError> {
    if window_ms == 0 {
        return Ok(vec![alert]);
    }
    let mut key = alert.throttle_key();
    let mut out = Vec::new();
    let mut open = load_list(store, &keys::open_throttles(&alert.trunk_group))?;
    if !open.iter().any(|k| k == &key) && open.len() >= MAX_OPEN_PER_TRUNK {
        key = keys::throttle(&alert.trunk_group, alert.kind.as_str(), "overflow");
    }
    if let Some(mut w) = load(store, &key)? {
        if alert.at_ms < w.until_ms {
            if w.repeats == 0 {
                w.first_repeat_ms = alert.at_ms;
            }
            w.repeats += 1;
            w.last_repeat_ms = alert.at_ms;
            save(store, &key, &w)?;
            return Ok(out);
        }
        out.extend(summary(&w, alert.at_ms));
    }
    let w = Window {
        until_ms: alert.at_ms.saturating_add(window_ms),
        repeats: 0,
        first_repeat_ms: 0,
        last_repeat_ms: 0,
        first: alert.clone(),
    };
    // The lists first, the window last: a store that fails between these writes
    // leaves at worst a listed window that does not exist, which `flush` drops,
    // never a window that no list names and no `tick` would ever close.
    if !open.iter().any(|k| k == &key) {
        if open.is_empty() {
            // The trunk group's first open window: `tick` must look at it.
            let mut trunks = load_list(store, keys::OPEN_THROTTLES)?;
            if !trunks.iter().any(|t| t == &alert.trunk_group) {
                trunks.push(alert.trunk_group.clone());
                save_list(store, keys::OPEN_THROTTLES, &trunks)?;
            }
        }
        open.push(key.clone());
        save_list(store, &keys::open_throttles(&alert.trunk_group), &open)?;
    }
    save(store, &key, &w)?;
    out.push(alert);
    Ok(out)
}

/// Closes every window that ended by `now_ms`, returning the summaries to deliver.
///
/// A window is deleted as its summary is made; should a later write of the same
/// tick fail, the summaries already made are still handed out (their windows are
/// gone), and what the failure left listed is closed by the next tick.
pub fn flush(store: &mut dyn Store, now_ms: u64) -> Result<Vec<Alert>, StoreError> {
    let mut out = Vec::new();
    match flush_into(store, now_ms, &mut out) {
        Ok(()) => Ok(out),
        Err(_) if !out.is_empty() => Ok(out),
        Err(e) => Err(e),
    }
}

fn flush_into(store: &mut dyn Store, now_ms: u64, out: &mut Vec<Alert>) -> Result<(), StoreError> {
    let trunks = load_list(store, keys::OPEN_THROTTLES)?;
    if trunks.is_empty() {
        return Ok(());
    }
    let mut still_trunks = Vec::with_capacity(trunks.len());
    for trunk in &trunks {
        let list_key = keys::open_throttles(trunk);
        let open = load_list(store, &list_key)?;
        let mut still_open = Vec::with_capacity(open.len());
        for key in &open {
            match load(store, key)? {
                Some(w) if w.until_ms > now_ms => still_open.push(key.clone()),
                Some(w) => {
                    out.extend(summary(&w, now_ms.min(w.until_ms)));
                    store.delete(key)?;
                }
                None => {}
            }
        }
        // Lists are written only when they changed: while a window stays open,
        // a tick writes nothing (each write is replicated to every DMQ node).
        if still_open.is_empty() {
            store.delete(&list_key)?;
        } else {
            if still_open != open {
                save_list(store, &list_key, &still_open)?;
            }
            still_trunks.push(trunk.clone());
        }
    }
    if still_trunks.is_empty() {
        store.delete(keys::OPEN_THROTTLES)?;
    } else if still_trunks != trunks {
        save_list(store, keys::OPEN_THROTTLES, &still_trunks)?;
    }
    Ok(())
}

fn summary(w: &Window, at_ms: u64) -> Option<Alert> {
    // Derived from the window's first alert, so a summary re-sent by a host retry
    // keeps its id and the relay can drop the duplicate.
    (w.repeats > 0).then(|| Alert {
        id: format!("{}-summary", w.first.id),
        at_ms,
        time: rfc3339(at_ms),
        count: w.repeats,
        summary: true,
        first_ms: Some(w.first_repeat_ms),
        last_ms: Some(w.last_repeat_ms),
        ..w.first.clone()
    })
}

fn load(store: &mut dyn Store, key: &str) -> Result<Option<Window>, StoreError> {
    Ok(store
        .get(key)?
        .and_then(|raw| serde_json::from_slice(&raw).ok()))
}

fn save(store: &mut dyn Store, key: &str, w: &Window) -> Result<(), StoreError> {
    let raw = serde_json::to_vec(w).map_err(|e| StoreError(e.to_string()))?;
    store.set(key, &raw)
}

fn load_list(store: &mut dyn Store, key: &str) -> Result<Vec<String>, StoreError> {
    Ok(store
        .get(key)?
        .and_then(|raw| serde_json::from_slice(&raw).ok())
        .unwrap_or_default())
}

fn save_list(store: &mut dyn Store, key: &str, list: &[String]) -> Result<(), StoreError> {
    let raw = serde_json::to_vec(list).map_err(|e| StoreError(e.to_string()))?;
    store.set(key, &raw)
}

/// What a host does with an alert after one POST to the relay (docs/alerts.md,
/// "Posting from a host"), the same in every host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Taken (`202 queued`, `200 duplicate`): forget it.
    Sent,
    /// No answer, a timeout, `408`, `429`, a `5xx` (or a redirect, which a fixed URL
    /// mends): post the same body again later, with a growing delay; the relay
    /// recognises the id, so a retry never becomes a second e-mail.
    Retry,
    /// Any other `4xx` (`401`/`403`: the token or the `--allow` list is wrong): no
    /// retry mends it; keep the alert for the operator to re-deliver (never drop it).
    Refused,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Sent => "sent",
            Delivery::Retry => "retry",
            Delivery::Refused => "refused",
        }
    }
}

/// The delivery rule for the relay's answer `status` (`None`: no answer at all).
pub fn delivery(status: Option<u16>) -> Delivery {
    match status {
        Some(200..=299) => Delivery::Sent,
        Some(408 | 429) => Delivery::Retry,
        Some(400..=499) => Delivery::Refused,
        _ => Delivery::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_retries_what_time_mends_and_keeps_what_it_cannot() {
        for (status, want) in [
            (Some(202), Delivery::Sent),
            (Some(200), Delivery::Sent),
            (None, Delivery::Retry),
            (Some(500), Delivery::Retry),
            (Some(503), Delivery::Retry),
            (Some(408), Delivery::Retry),
            (Some(429), Delivery::Retry),
            (Some(307), Delivery::Retry),
            (Some(401), Delivery::Refused),
            (Some(403), Delivery::Refused),
            (Some(400), Delivery::Refused),
        ] {
            assert_eq!(delivery(status), want, "{status:?}");
        }
    }
    use crate::store::MemoryStore;

    fn alert(at_ms: u64, source: &str) -> Alert {
        Alert {
            id: format!("a{at_ms}"),
            kind: AlertKind::BlockedCall,
            location: "hq".into(),
            trunk_group: "hq-pbx1".into(),
            recipients: vec!["noc@example.com".into()],
            at_ms,
            time: rfc3339(at_ms),
            cause: Some(Cause::NotRegisteredAddress),
            description: None,
            source: Some(source.into()),
            registered: None,
            acl: vec![],
            old_ip: None,
            new_ip: None,
            method: None,
            call_id: None,
            from: None,
            to: None,
            count: 1,
            summary: false,
            first_ms: None,
            last_ms: None,
        }
    }

    /// A store whose n-th write fails.
    struct FailingWrite {
        inner: MemoryStore,
        writes_left: u32,
    }

    impl Store for FailingWrite {
        fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(key)
        }
        fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
            self.writes_left = self.writes_left.saturating_sub(1);
            if self.writes_left == 0 {
                return Err(StoreError("injected".into()));
            }
            self.inner.set(key, value)
        }
        fn delete(&mut self, key: &str) -> Result<(), StoreError> {
            self.inner.delete(key)
        }
    }

    #[test]
    fn a_write_failing_anywhere_never_leaves_a_window_no_tick_would_close() {
        for n in 1..=4 {
            let mut store = FailingWrite {
                inner: MemoryStore::default(),
                writes_left: n,
            };
            let _ = throttle(&mut store, alert(1_000, "198.51.100.9:5060"), 60_000);
            let lists = store.inner.clone();
            let listed = |key: &str| {
                let mut s = lists.clone();
                load_list(&mut s, keys::OPEN_THROTTLES).unwrap() == ["hq-pbx1"]
                    && load_list(&mut s, &keys::open_throttles("hq-pbx1"))
                        .unwrap()
                        .iter()
                        .any(|k| k == key)
            };
            for key in store.inner.entries.keys() {
                if key.starts_with("tg/throttle/") {
                    assert!(listed(key), "write {n} failed: {key} is in no list");
                }
            }
            // Whatever was left, the next tick leaves the store clean.
            flush(&mut store.inner, 100_000).unwrap();
            assert!(
                store.inner.entries.is_empty(),
                "write {n}: {:?}",
                store.inner.entries.keys()
            );
        }
    }

    /// Counts writes; the n-th delete or set fails when `fail_at` says so.
    struct Counting {
        inner: MemoryStore,
        writes: u32,
        fail_at: Option<u32>,
    }

    impl Counting {
        fn write(&mut self) -> Result<(), StoreError> {
            self.writes += 1;
            if self.fail_at == Some(self.writes) {
                return Err(StoreError("injected".into()));
            }
            Ok(())
        }
    }

    impl Store for Counting {
        fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(key)
        }
        fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
            self.write()?;
            self.inner.set(key, value)
        }
        fn delete(&mut self, key: &str) -> Result<(), StoreError> {
            self.write()?;
            self.inner.delete(key)
        }
    }

    #[test]
    fn a_tick_writes_nothing_while_windows_stay_open_and_keeps_summaries_made() {
        let mut store = Counting {
            inner: MemoryStore::default(),
            writes: 0,
            fail_at: None,
        };
        throttle(&mut store, alert(1_000, "198.51.100.9:5060"), 60_000).unwrap();
        throttle(&mut store, alert(2_000, "198.51.100.9:5060"), 60_000).unwrap();
        throttle(&mut store, alert(3_000, "198.51.100.10:5060"), 120_000).unwrap();
        throttle(&mut store, alert(4_000, "198.51.100.10:5060"), 120_000).unwrap();
        store.writes = 0;
        assert!(flush(&mut store, 30_000).unwrap().is_empty());
        assert_eq!(store.writes, 0, "nothing changed, nothing written");
        // The first window ends; the write after its delete (its list) fails.
        store.fail_at = Some(2);
        let out = flush(&mut store, 70_000).unwrap();
        assert_eq!(
            out.len(),
            1,
            "the summary made before the failure is handed out"
        );
        assert!(out[0].summary);
        store.fail_at = None;
        assert!(flush(&mut store, 70_001).unwrap().is_empty(), "not twice");
        assert_eq!(flush(&mut store, 200_000).unwrap().len(), 1);
        assert!(store.inner.entries.is_empty());
    }

    #[test]
    fn repeats_inside_the_window_are_counted_then_summarised_once() {
        let mut store = MemoryStore::default();
        let sent = throttle(&mut store, alert(1_000, "198.51.100.9:5060"), 60_000).unwrap();
        assert_eq!(sent.len(), 1);
        for t in 2..=10 {
            // Another port from the same IP is the same source.
            let a = alert(t * 1_000, &format!("198.51.100.9:{}", 5000 + t));
            assert!(throttle(&mut store, a, 60_000).unwrap().is_empty());
        }
        // A different source IP is alerted on its own.
        assert_eq!(
            throttle(&mut store, alert(11_000, "198.51.100.10:5060"), 60_000)
                .unwrap()
                .len(),
            1
        );
        assert!(
            flush(&mut store, 60_000).unwrap().is_empty(),
            "window still open"
        );
        let summaries = flush(&mut store, 61_000).unwrap();
        assert_eq!(summaries.len(), 1);
        let s = &summaries[0];
        assert!(s.summary);
        assert_eq!(s.count, 9);
        assert_eq!((s.first_ms, s.last_ms), (Some(2_000), Some(10_000)));
        assert_eq!(s.at_ms, 61_000);
        // The other source's window had no repeats: closing it says nothing.
        assert!(flush(&mut store, 100_000).unwrap().is_empty());
        assert!(store.entries.keys().all(|k| !k.starts_with("tg/throttle/")));
    }

    #[test]
    fn occurrence_after_the_window_sends_summary_then_new_alert() {
        let mut store = MemoryStore::default();
        throttle(&mut store, alert(0, "198.51.100.9:5060"), 10_000).unwrap();
        throttle(&mut store, alert(5_000, "198.51.100.9:5060"), 10_000).unwrap();
        let sent = throttle(&mut store, alert(20_000, "198.51.100.9:5060"), 10_000).unwrap();
        assert_eq!(sent.len(), 2);
        assert!(sent[0].summary && sent[0].count == 1);
        assert!(!sent[1].summary && sent[1].at_ms == 20_000);
    }

    #[test]
    fn a_trunk_groups_open_windows_are_capped_and_the_rest_share_one_overflow_window() {
        let mut store = MemoryStore::default();
        let mut sent = 0;
        for i in 0..1_000u64 {
            let source = format!("198.51.{}.{}:5060", i / 250, i % 250);
            sent += throttle(&mut store, alert(1_000 + i, &source), 60_000)
                .unwrap()
                .len();
        }
        // One alert per window: the capped ones plus the overflow window's first.
        assert_eq!(sent, MAX_OPEN_PER_TRUNK + 1);
        assert!(
            store.entries.len() <= MAX_OPEN_PER_TRUNK + 4,
            "{}",
            store.entries.len()
        );
        let summaries = flush(&mut store, 100_000).unwrap();
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].count, 1_000 - MAX_OPEN_PER_TRUNK as u64 - 1);
        assert!(store.entries.keys().all(|k| k == keys::OPEN_THROTTLES));
    }

    #[test]
    fn ipv6_sources_share_a_window_per_64() {
        let mut store = MemoryStore::default();
        let first = throttle(&mut store, alert(1_000, "[2001:db8:1:2::1]:5060"), 60_000).unwrap();
        let same_64 = throttle(
            &mut store,
            alert(2_000, "[2001:db8:1:2::ffff]:5060"),
            60_000,
        )
        .unwrap();
        let other_64 =
            throttle(&mut store, alert(3_000, "[2001:db8:1:3::1]:5060"), 60_000).unwrap();
        assert_eq!((first.len(), same_64.len(), other_64.len()), (1, 0, 1));
    }

    #[test]
    fn header_text_is_cut_at_a_character_boundary() {
        let long = "é".repeat(400);
        let cut = bounded_text(&long);
        assert!(cut.len() <= MAX_HEADER_TEXT + "…".len());
        assert!(cut.ends_with('…'));
        assert_eq!(bounded_text("<sip:a@b>"), "<sip:a@b>");
        assert_eq!(
            bounded_text("\"x\r\n Dear customer\u{202e}\" <sip:a@b>"),
            "\"x   Dear customer \" <sip:a@b>"
        );
    }

    #[test]
    fn zero_window_sends_everything() {
        let mut store = MemoryStore::default();
        for t in 0..3 {
            assert_eq!(
                throttle(&mut store, alert(t, "198.51.100.9:5060"), 0)
                    .unwrap()
                    .len(),
                1
            );
        }
    }

    #[test]
    fn time_is_rfc3339_utc() {
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
