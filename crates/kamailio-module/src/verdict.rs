//! The verdict as the C side reads it (`tg_verdict` in include/trunkguard.h): views
//! into strings this crate holds until the next call on the same policy.

use trunkguard_host::{Action, Judged};

/// `tg_str`: a view, not NUL-terminated.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TgStr {
    pub s: *const u8,
    pub len: usize,
}

impl TgStr {
    pub const EMPTY: TgStr = TgStr {
        s: std::ptr::null(),
        len: 0,
    };

    pub fn of(text: &str) -> TgStr {
        TgStr {
            s: text.as_ptr(),
            len: text.len(),
        }
    }

    fn of_opt(text: Option<&String>) -> TgStr {
        text.map_or(TgStr::EMPTY, |t| TgStr::of(t))
    }
}

/// `tg_header`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TgHeader {
    pub name: TgStr,
    pub value: TgStr,
}

/// `tg_verdict`.
#[repr(C)]
pub struct TgVerdict {
    pub action: i32,
    pub code: u16,
    pub reason: TgStr,
    pub cause: TgStr,
    pub trunk_group: TgStr,
    pub target: TgStr,
    pub next_hop: TgStr,
    pub headers: *const TgHeader,
    pub headers_len: usize,
    pub strip: *const TgStr,
    pub strip_len: usize,
    pub insert: *const TgHeader,
    pub insert_len: usize,
    pub alerts: *const TgStr,
    pub alerts_len: usize,
    pub failover: TgStr,
    pub failover_after_ms: u64,
    pub failover_on_6xx: i32,
}

/// `enum tg_action`: fixed numbers, since a native cfg switches on them.
pub fn action_code(action: Action) -> i32 {
    match action {
        Action::Allow => 1,
        Action::Challenge => 2,
        Action::Reject => 3,
        Action::Accept => 4,
        Action::Route => 5,
    }
}

/// One judged message and the views the C side reads of it. The views point into
/// `judged`'s heap strings, which do not move while this value is held unchanged.
pub struct Held {
    judged: Judged,
    headers: Vec<TgHeader>,
    strip: Vec<TgStr>,
    insert: Vec<TgHeader>,
    alerts: Vec<TgStr>,
}

fn pairs(list: &[(String, String)]) -> Vec<TgHeader> {
    list.iter()
        .map(|(n, v)| TgHeader {
            name: TgStr::of(n),
            value: TgStr::of(v),
        })
        .collect()
}

impl Held {
    pub fn new(judged: Judged) -> Held {
        let v = &judged.verdict;
        Held {
            headers: pairs(&v.headers),
            strip: v.strip.iter().map(|s| TgStr::of(s)).collect(),
            insert: pairs(&v.insert),
            alerts: judged.alerts.iter().map(|s| TgStr::of(s)).collect(),
            judged,
        }
    }

    /// The C view; valid while `self` is held unchanged.
    pub fn view(&self) -> TgVerdict {
        // Every field of the core's verdict named, none with `..`: a field added to
        // `trunkguard::Verdict` (the one wire definition, src/wire.rs) fails to
        // compile here until the C view (include/trunkguard.h) carries it.
        let trunkguard::Verdict {
            action,
            code,
            reason,
            cause,
            trunk_group,
            target,
            next_hop,
            headers: _,
            failover,
            failover_after_ms,
            failover_on_6xx,
            strip: _,
            insert: _,
        } = &self.judged.verdict;
        TgVerdict {
            action: action_code(*action),
            code: code.unwrap_or(0),
            reason: TgStr::of_opt(reason.as_ref()),
            cause: cause.map_or(TgStr::EMPTY, |c| TgStr::of(c.as_str())),
            trunk_group: TgStr::of_opt(trunk_group.as_ref()),
            target: TgStr::of_opt(target.as_ref()),
            next_hop: TgStr::of_opt(next_hop.as_ref()),
            headers: self.headers.as_ptr(),
            headers_len: self.headers.len(),
            strip: self.strip.as_ptr(),
            strip_len: self.strip.len(),
            insert: self.insert.as_ptr(),
            insert_len: self.insert.len(),
            alerts: self.alerts.as_ptr(),
            alerts_len: self.alerts.len(),
            failover: TgStr::of_opt(failover.as_ref()),
            failover_after_ms: failover_after_ms.unwrap_or(0),
            failover_on_6xx: i32::from(*failover_on_6xx),
        }
    }
}

/// A list of lines (alerts of a tick, refusal-log lines) and their views.
#[derive(Default)]
pub struct Lines {
    lines: Vec<String>,
    views: Vec<TgStr>,
}

impl Lines {
    pub fn set(&mut self, lines: Vec<String>) {
        self.views = lines.iter().map(|l| TgStr::of(l)).collect();
        self.lines = lines;
    }

    pub fn views(&self) -> &[TgStr] {
        &self.views
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}
