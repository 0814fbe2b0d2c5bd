//! What the host is told to do with one message.

use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// The five actions of the host contract (docs/abi.md); their names are part of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Let the message continue unchanged.
    Allow,
    /// Answer 401/407 with the challenge headers.
    Challenge,
    /// Answer the given 4xx/5xx code.
    Reject,
    /// A REGISTER the plugin took: answer 200 with the given headers.
    Accept,
    /// An inbound call: relay it to `target`.
    Route,
}

impl Action {
    pub const ALL: [Action; 5] = [
        Action::Allow,
        Action::Challenge,
        Action::Reject,
        Action::Accept,
        Action::Route,
    ];

    /// The action's name in the host contract.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Challenge => "challenge",
            Action::Reject => "reject",
            Action::Accept => "accept",
            Action::Route => "route",
        }
    }
}

/// Machine-readable reason for every verdict: for an allow it says why, and hosts
/// route by that alone (docs/policy.md, "Threat model"). The first eight names are
/// the product's original refusal causes; the rest extend them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    Malformed,
    BadCredentials,
    NotInAccessList,
    NotRegisteredAddress,
    RegistrationRequired,
    IntervalTooBrief,
    UnknownDid,
    TrunkUnavailable,
    /// First challenge: the request carried no usable credentials.
    AuthRequired,
    /// Correct response on an expired nonce (or one of the MAC before keyed BLAKE2s,
    /// src/digest.rs): challenged again with stale=true.
    StaleNonce,
    /// Correct response, but this (nonce, nc) was used before (a replay), or the
    /// replay set has no room for the nonce: challenged again with stale=true.
    ReplayedNonce,
    /// The source guessed too many passwords: refused for a while without a look
    /// at its credentials (config `digest.lockout`).
    SourceBanned,
    /// REGISTER stored (or queried).
    Registered,
    /// REGISTER with expiry 0 removed the binding.
    Unregistered,
    /// Inbound call relayed to the trunk group's registered Contact.
    RegisteredContact,
    /// Inbound call relayed to the trunk group's failover destination.
    Failover,
    /// Max-Forwards reached 0.
    TooManyHops,
    /// No configuration has been pushed yet: fail closed.
    NotConfigured,
    /// The host's state store failed: fail closed.
    StoreUnavailable,
    /// Allowed because it carries a To tag: the host relays it only inside a dialog
    /// it created, to that dialog's recorded next hop.
    InDialog,
    /// Allowed as core traffic (core source on a core-facing socket): routed by the
    /// Request-URI, never to the edge itself.
    Core,
    /// Allowed as an authenticated trunk group's request: to the carrier only.
    Trunk,
    /// OPTIONS, ACK or CANCEL outside a dialog from the access side: OPTIONS is
    /// answered by the host, ACK and CANCEL go only within a transaction it relayed.
    PassThrough,
    /// A response: relayed only within a transaction of the host.
    Response,
    /// Right credentials on a REGISTER from an address other than the trunk group's
    /// last registration's, while password guessing spread over several sources
    /// holds it there (src/lockout.rs, docs/policy.md step 6).
    HeldForGuessing,
}

/// Whether a final response `code` from a registered PBX sends the call to its
/// trunk group's failover (docs/policy.md, "Inbound calls"): a timeout (408, also
/// what a host's own no-answer timer reports) or a server failure, but not a 503
/// that says when to come back (`retry_after`: a deliberate, temporary refusal);
/// a 6xx only when configured, and never 600 Busy Everywhere or 603 Decline. Busy
/// (486), a decline and every other 4xx are the callee's answer and final.
pub fn fails_over(code: u16, retry_after: bool, on_6xx: bool) -> bool {
    match code {
        408 => true,
        503 => !retry_after,
        500..=599 => true,
        600 | 603 => false,
        604..=699 => on_6xx,
        _ => false,
    }
}

/// A name that is no cause's ([`Cause::as_str`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown cause {0:?}")]
pub struct UnknownCause(pub String);

impl std::str::FromStr for Cause {
    type Err = UnknownCause;

    /// The name [`Cause::as_str`] gives (hosts that hold a verdict as strings). A
    /// table lookup: the Kamailio module asks it of every message's cause, and going
    /// through serde_json allocated a string and a JSON value each time.
    fn from_str(s: &str) -> Result<Cause, UnknownCause> {
        Cause::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCause(s.to_owned()))
    }
}

impl Cause {
    /// Every cause, in declaration order: what the generated types of other languages
    /// are checked against (`wire`'s tests). A new cause goes here too.
    pub const ALL: [Cause; 25] = [
        Cause::Malformed,
        Cause::BadCredentials,
        Cause::NotInAccessList,
        Cause::NotRegisteredAddress,
        Cause::RegistrationRequired,
        Cause::IntervalTooBrief,
        Cause::UnknownDid,
        Cause::TrunkUnavailable,
        Cause::AuthRequired,
        Cause::StaleNonce,
        Cause::ReplayedNonce,
        Cause::SourceBanned,
        Cause::Registered,
        Cause::Unregistered,
        Cause::RegisteredContact,
        Cause::Failover,
        Cause::TooManyHops,
        Cause::NotConfigured,
        Cause::StoreUnavailable,
        Cause::InDialog,
        Cause::Core,
        Cause::Trunk,
        Cause::PassThrough,
        Cause::Response,
        Cause::HeldForGuessing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Malformed => "malformed",
            Cause::BadCredentials => "bad_credentials",
            Cause::NotInAccessList => "not_in_access_list",
            Cause::NotRegisteredAddress => "not_registered_address",
            Cause::RegistrationRequired => "registration_required",
            Cause::IntervalTooBrief => "interval_too_brief",
            Cause::UnknownDid => "unknown_did",
            Cause::TrunkUnavailable => "trunk_unavailable",
            Cause::AuthRequired => "auth_required",
            Cause::StaleNonce => "stale_nonce",
            Cause::SourceBanned => "source_banned",
            Cause::ReplayedNonce => "replayed_nonce",
            Cause::Registered => "registered",
            Cause::Unregistered => "unregistered",
            Cause::RegisteredContact => "registered_contact",
            Cause::Failover => "failover",
            Cause::TooManyHops => "too_many_hops",
            Cause::NotConfigured => "not_configured",
            Cause::StoreUnavailable => "store_unavailable",
            Cause::InDialog => "in_dialog",
            Cause::Core => "core",
            Cause::Trunk => "trunk",
            Cause::PassThrough => "pass_through",
            Cause::Response => "response",
            Cause::HeldForGuessing => "held_for_guessing",
        }
    }

    /// Plain words for people (alert e-mails, summaries).
    pub fn describe(self) -> &'static str {
        match self {
            Cause::Malformed => "the message could not be parsed",
            Cause::BadCredentials => "wrong username or password",
            Cause::NotInAccessList => "the source address is not in the trunk group's access list",
            Cause::NotRegisteredAddress => {
                "the call came from an address other than the one currently registered"
            }
            Cause::RegistrationRequired => {
                "the trunk group requires a registration and none is current"
            }
            Cause::IntervalTooBrief => "the registration interval is below the minimum",
            Cause::UnknownDid => "the dialled number belongs to no trunk group",
            Cause::TrunkUnavailable => "the trunk group is not registered and has no failover",
            Cause::AuthRequired => "credentials are required",
            Cause::StaleNonce => "the nonce expired (or predates the current nonce form)",
            Cause::SourceBanned => {
                "the source sent too many wrong passwords and is refused for a while"
            }
            Cause::ReplayedNonce => "the nonce and nonce count were used before",
            Cause::Registered => "registered",
            Cause::Unregistered => "unregistered",
            Cause::RegisteredContact => "routed to the registered PBX",
            Cause::Failover => "routed to the failover destination",
            Cause::TooManyHops => "Max-Forwards reached zero",
            Cause::NotConfigured => "no configuration loaded",
            Cause::StoreUnavailable => "the shared state store failed",
            Cause::InDialog => "inside a dialog",
            Cause::Core => "from the carrier core",
            Cause::Trunk => "an authenticated trunk group's request",
            Cause::PassThrough => "a keep-alive, ACK or CANCEL",
            Cause::Response => "a response",
            Cause::HeldForGuessing => {
                "a registration from elsewhere while password guessing holds the trunk group"
            }
        }
    }
}

/// One verdict, serialised as the `verdict` object of the host contract, and read
/// back by hosts as the same type (`wire`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub action: Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trunk_group: Option<String>,
    /// Request-URI for a `route` verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Where to send a routed call (`sip:ip:port;transport=x`): the address the
    /// registration came from, which is reachable through the PBX's NAT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_hop: Option<String>,
    /// Headers to add to the answer, in order.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub headers: Vec<(String, String)>,
    /// On a call routed to a registered PBX: where it goes when that PBX does not
    /// answer (no response in `failover_after_ms`, or a final response for which
    /// [`fails_over`] says so). Absent: the caller gets the PBX's answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover_after_ms: Option<u64>,
    /// Whether a 6xx (but 600 and 603) also fails over (config `inbound`).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub failover_on_6xx: bool,
    /// Header names the host removes from the request (every field of that name,
    /// compact forms too) before relaying it. Most are the policy's own constant
    /// names, borrowed rather than copied: every relayed request carries the list.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub strip: Vec<Cow<'static, str>>,
    /// Headers the host appends to the request, after `strip`, before relaying it.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub insert: Vec<(String, String)>,
}

impl Verdict {
    pub fn allow() -> Verdict {
        Verdict {
            action: Action::Allow,
            code: None,
            reason: None,
            cause: None,
            trunk_group: None,
            target: None,
            next_hop: None,
            failover: None,
            failover_after_ms: None,
            failover_on_6xx: false,
            headers: Vec::new(),
            strip: Vec::new(),
            insert: Vec::new(),
        }
    }

    /// An allow that says why (the host routes by `cause`).
    pub fn allow_as(cause: Cause) -> Verdict {
        Verdict {
            cause: Some(cause),
            ..Verdict::allow()
        }
    }

    pub fn reject(code: u16, reason: impl Into<String>, cause: Cause) -> Verdict {
        Verdict {
            action: Action::Reject,
            code: Some(code),
            reason: Some(reason.into()),
            cause: Some(cause),
            ..Verdict::allow()
        }
    }

    pub fn with_trunk(mut self, trunk: &str) -> Verdict {
        self.trunk_group = Some(trunk.to_string());
        self
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Verdict {
        self.headers.push((name.to_string(), value.into()));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_follows_timeouts_and_server_failures_never_the_callees_answer() {
        for (code, retry_after, on_6xx, want) in [
            (408, false, false, true),
            (500, false, false, true),
            (502, true, false, true),
            (503, false, false, true),
            (503, true, false, false),
            (486, false, true, false),
            (404, false, true, false),
            (480, false, false, false),
            (603, false, true, false),
            (600, false, true, false),
            (604, false, false, false),
            (604, false, true, true),
            (200, false, true, false),
        ] {
            assert_eq!(
                fails_over(code, retry_after, on_6xx),
                want,
                "{code} {retry_after} {on_6xx}"
            );
        }
    }

    #[test]
    fn every_cause_parses_from_its_wire_name_and_nothing_else_parses() {
        for c in Cause::ALL {
            let wire = serde_json::to_value(c).unwrap();
            assert_eq!(wire.as_str(), Some(c.as_str()), "{c:?}");
            assert_eq!(c.as_str().parse::<Cause>(), Ok(c));
        }
        for name in ["", "Trunk", "trunk ", "in-dialog", "trunk\0"] {
            assert_eq!(name.parse::<Cause>(), Err(UnknownCause(name.to_owned())));
        }
    }
}
