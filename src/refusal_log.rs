//! One structured log line per refused request (docs/policy.md, "The refusal log"):
//! an attack leaves its sources in the host's own log, where a scanner such as
//! fail2ban can act on them, and a rate limit keeps a flood from filling the disk.
//!
//! The line is `trunkguard-refusal {json}`; past the limit the lines left out are
//! counted and reported once a second as `trunkguard-refusal-summary {json}`.

use serde::Serialize;

use crate::policy::Input;
use crate::sip;
use crate::verdict::{Action, Cause, Verdict};

pub const MARKER: &str = "trunkguard-refusal";
pub const SUMMARY_MARKER: &str = "trunkguard-refusal-summary";
/// Lines a second, per process (or VM), unless the host sets another.
pub const DEFAULT_PER_SECOND: u32 = 20;
/// The Call-ID is the sender's: bounded, so that a log line stays one short line.
const CALL_ID_MAX: usize = 64;
const METHOD_MAX: usize = 32;

/// Whether the log records this verdict: every refusal of a request, and the
/// challenges that follow an answer that did not hold (a replayed nonce). A first
/// challenge, a stale nonce (an honest client whose nonce expired), a route, an
/// answer to a registration and an allow are ordinary traffic.
pub fn is_logged(v: &Verdict) -> bool {
    v.cause
        .is_some_and(|cause| logs(cause, v.action == Action::Allow))
}

/// What the refusal log needs of a message, from a host that holds the source and
/// transport as text (the Kamailio extension and module); `None` for text that does
/// not parse, and the line is then left out (never the request refused for it).
pub fn input_of<'m>(
    message: &'m [u8],
    source: &str,
    transport: &str,
    now_ms: u64,
) -> Option<Input<'m>> {
    Some(Input {
        message,
        source: source.parse().ok()?,
        transport: transport.parse().ok()?,
        local: None,
        now_ms,
    })
}

/// [`is_logged`] for a verdict held as the message ABI reports it: whether a verdict
/// with this cause (allowed or not) gets a line. Hosts ask it before they parse
/// anything else of the message.
pub fn logs(cause: Cause, allowed: bool) -> bool {
    match cause {
        Cause::AuthRequired
        | Cause::StaleNonce
        | Cause::Registered
        | Cause::Unregistered
        | Cause::RegisteredContact
        | Cause::Failover
        | Cause::InDialog
        | Cause::Core
        | Cause::Trunk
        | Cause::PassThrough
        | Cause::Response => false,
        _ => !allowed,
    }
}

/// [`logs`] for a cause as its name (as hosts receive it); an unknown name is not logged.
pub fn logs_reported(cause: &str, allowed: bool) -> bool {
    cause.parse().is_ok_and(|c| logs(c, allowed))
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    source: String,
    transport: &'static str,
    method: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<u16>,
    cause: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    trunk_group: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    call_id: Option<String>,
}

/// Printable ASCII only, at most `max` characters: the sender chose these bytes.
fn bounded(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect()
}

/// The log line for `verdict` on `input`, or `None` when it is not logged.
pub fn line(input: &Input<'_>, verdict: &Verdict) -> Option<String> {
    if !is_logged(verdict) {
        return None;
    }
    render(
        input,
        verdict.code,
        verdict.cause?.as_str(),
        verdict.trunk_group.as_deref(),
    )
}

/// The line itself, for a verdict known to be logged.
fn render(
    input: &Input<'_>,
    code: Option<u16>,
    cause: &str,
    trunk_group: Option<&str>,
) -> Option<String> {
    // The policy's own parse, so that the log names what the policy judged; a
    // message that does not parse is logged with what can be read of its first word.
    let parsed = sip::parse(input.message, input.transport.framing()).ok();
    let method = match parsed.as_ref().and_then(|m| m.method()) {
        Some(m) => bounded(m.as_str(), METHOD_MAX),
        None => {
            let first = input
                .message
                .split(|b| *b == b' ')
                .next()
                .unwrap_or_default();
            bounded(&String::from_utf8_lossy(first), METHOD_MAX)
        }
    };
    let call_id = parsed
        .as_ref()
        .and_then(|m| m.call_id())
        .map(|c| bounded(c, CALL_ID_MAX));
    let line = Line {
        time: crate::alert::rfc3339(input.now_ms),
        // An IPv4-mapped IPv6 peer is the IPv4 address, as the policy judges it.
        source: std::net::SocketAddr::new(input.source.ip().to_canonical(), input.source.port())
            .to_string(),
        transport: input.transport.as_str(),
        method,
        code,
        cause,
        trunk_group,
        call_id,
    };
    let json = serde_json::to_string(&line).ok()?;
    Some(format!("{MARKER} {json}"))
}

/// At most `per_second` lines in each wall-clock second; the rest counted and
/// reported by one summary line.
#[derive(Debug, Clone)]
pub struct RateLimit {
    per_second: u32,
    second: u64,
    used: u32,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(per_second: u32) -> RateLimit {
        RateLimit {
            per_second,
            second: 0,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be written now. Call [`RateLimit::summary`] first so that
    /// the count of an earlier second comes out before this second's lines.
    pub fn admit(&mut self, now_ms: u64) -> bool {
        self.roll(now_ms);
        if self.used < self.per_second {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// The summary line of a past second that left lines out, once. Hosts call it
    /// before [`RateLimit::admit`] and from a timer, so the count comes out when
    /// the flood stops too.
    pub fn summary(&mut self, now_ms: u64) -> Option<String> {
        if self.suppressed == 0 || now_ms / 1_000 == self.second {
            return None;
        }
        let n = std::mem::take(&mut self.suppressed);
        let time = crate::alert::rfc3339(self.second * 1_000);
        Some(format!(
            "{SUMMARY_MARKER} {{\"time\":\"{time}\",\"suppressed\":{n}}}"
        ))
    }

    fn roll(&mut self, now_ms: u64) {
        let second = now_ms / 1_000;
        if second != self.second {
            self.second = second;
            self.used = 0;
        }
    }
}

/// The log as a host keeps it (one per process or VM): the lines to write for a
/// verdict, rate limit and summary included, so that hosts only write them out.
#[derive(Debug, Clone)]
pub struct RefusalLog {
    rate: RateLimit,
}

impl RefusalLog {
    pub fn new(per_second: u32) -> RefusalLog {
        RefusalLog {
            rate: RateLimit::new(per_second),
        }
    }

    /// The lines (none, one or two: a pending summary first) to write for `verdict`.
    pub fn record(&mut self, input: &Input<'_>, verdict: &Verdict) -> Vec<String> {
        let mut out = Vec::new();
        if !is_logged(verdict) {
            return out;
        }
        out.extend(self.rate.summary(input.now_ms));
        if self.rate.admit(input.now_ms) {
            out.extend(line(input, verdict));
        }
        out
    }

    /// [`RefusalLog::record`] for a host that holds the verdict as the message ABI
    /// reported it (action, code, cause, trunk group) rather than as a [`Verdict`]:
    /// the Kamailio extension and module. An unknown cause is not logged. The core's
    /// rule is asked before anything else, since every message passes here.
    pub fn record_reported(
        &mut self,
        input: &Input<'_>,
        allowed: bool,
        code: u16,
        cause: &str,
        trunk_group: Option<&str>,
    ) -> Vec<String> {
        let Ok(cause) = cause.parse::<crate::Cause>() else {
            return Vec::new();
        };
        if !logs(cause, allowed) {
            return Vec::new();
        }
        let mut verdict = if allowed {
            Verdict::allow_as(cause)
        } else {
            Verdict::reject(code, "", cause)
        };
        verdict.code = (code != 0).then_some(code);
        verdict.trunk_group = trunk_group.map(str::to_owned);
        self.record(input, &verdict)
    }

    /// The lines for a refusal the host makes itself after the policy allowed the
    /// request (an in-dialog request no dialog of the host knows: `no_dialog`; a
    /// request for the edge itself: `loop`; no verdict at all: `policy_error`),
    /// under the same rate and summary.
    pub fn record_host(&mut self, input: &Input<'_>, code: u16, cause: &str) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(self.rate.summary(input.now_ms));
        if self.rate.admit(input.now_ms) {
            out.extend(render(input, Some(code), &bounded(cause, 32), None));
        }
        out
    }

    /// The summary of a past second's left-out lines, once: hosts call it from a
    /// timer so that the count comes out when a flood stops.
    pub fn flush(&mut self, now_ms: u64) -> Option<String> {
        self.rate.summary(now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::Transport;

    fn input(message: &[u8]) -> Input<'_> {
        Input {
            message,
            source: "[2001:db8::7]:5070".parse().unwrap(),
            transport: Transport::Udp,
            local: None,
            now_ms: 1_764_500_000_123,
        }
    }

    const INVITE: &[u8] = b"INVITE sip:1@x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
        From: <sip:a@x>;tag=1\r\nTo: <sip:1@x>\r\nCall-ID: abc\x01\"def\r\nCSeq: 1 INVITE\r\n\
        Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn a_refusal_is_one_json_line_with_its_source_and_a_bounded_call_id() {
        let mut v = Verdict::reject(403, "Forbidden", Cause::NotRegisteredAddress);
        v.trunk_group = Some("tg1".into());
        let line = line(&input(INVITE), &v).unwrap();
        let json = line.strip_prefix("trunkguard-refusal ").unwrap();
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(value["source"], "[2001:db8::7]:5070");
        assert_eq!(value["method"], "INVITE");
        assert_eq!(value["cause"], "not_registered_address");
        assert_eq!(value["code"], 403);
        assert_eq!(value["trunk_group"], "tg1");
        assert_eq!(value["transport"], "udp");
        assert_eq!(value["call_id"], "abc\"def", "control bytes removed");
        assert_eq!(value["time"], "2025-11-30T10:53:20.123Z");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn host_refusals_share_the_format_and_the_rate_and_mapped_sources_read_as_ipv4() {
        let mut log = RefusalLog::new(1);
        let mut at = input(INVITE);
        at.source = "[::ffff:192.0.2.9]:5060".parse().unwrap();
        let lines = log.record_host(&at, 404, "no_dialog");
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].contains("\"source\":\"192.0.2.9:5060\""),
            "{lines:?}"
        );
        assert!(lines[0].contains("\"cause\":\"no_dialog\""), "{lines:?}");
        let v = Verdict::reject(403, "Forbidden", Cause::BadCredentials);
        assert!(log.record(&at, &v).is_empty(), "one rate for both");
    }

    #[test]
    fn first_challenges_stale_nonces_and_allows_are_not_logged() {
        for v in [
            Verdict::reject(401, "Unauthorized", Cause::AuthRequired),
            Verdict::reject(401, "Unauthorized", Cause::StaleNonce),
            Verdict::allow(),
            Verdict::allow_as(Cause::Trunk),
        ] {
            assert_eq!(line(&input(INVITE), &v), None, "{v:?}");
        }
        assert!(
            line(
                &input(INVITE),
                &Verdict::reject(401, "Unauthorized", Cause::ReplayedNonce)
            )
            .is_some()
        );
    }

    #[test]
    fn the_host_log_writes_the_summary_before_the_next_line() {
        let mut log = RefusalLog::new(1);
        let v = Verdict::reject(403, "Forbidden", Cause::BadCredentials);
        let mut at = input(INVITE);
        assert_eq!(log.record(&at, &v).len(), 1);
        assert!(log.record(&at, &v).is_empty(), "over the rate");
        assert!(log.record(&at, &Verdict::allow()).is_empty());
        at.now_ms += 1_000;
        let lines = log.record(&at, &v);
        assert_eq!(lines.len(), 2);
        assert!(lines[0].contains("\"suppressed\":1"), "{lines:?}");
        assert!(lines[1].starts_with("trunkguard-refusal {"));
        assert_eq!(log.flush(at.now_ms + 5_000), None);
    }

    #[test]
    fn past_the_rate_lines_are_counted_and_summarised_once() {
        let mut r = RateLimit::new(3);
        let admitted = (0..10).filter(|_| r.admit(5_000)).count();
        assert_eq!(admitted, 3);
        assert_eq!(r.summary(5_999), None, "not before the second is over");
        let s = r.summary(6_000).unwrap();
        assert!(s.starts_with("trunkguard-refusal-summary {"), "{s}");
        assert!(s.contains("\"suppressed\":7"), "{s}");
        assert_eq!(r.summary(7_000), None, "once");
        assert!(r.admit(6_001));
    }
}
