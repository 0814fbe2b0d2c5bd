//! The configuration document as pushed by the host (JSON), before validation.
//!
//! These types mirror the JSON one to one and refuse unknown fields, so a typo in a
//! push is an error instead of a silently ignored setting. Validation that needs more
//! than the shape of the document (CIDR syntax, duplicates, hash lengths) happens when
//! the document is compiled into an [`crate::index::Index`].

use serde::Deserialize;

#[cfg(feature = "schema")]
use schemars::JsonSchema;

/// Whole configuration document.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Digest realm offered in challenges and expected in credentials.
    pub realm: String,
    /// Sources inside these networks are the carrier core: their INVITEs are inbound
    /// calls routed by DID, and they are never challenged.
    #[serde(default)]
    pub core_networks: Vec<String>,
    /// The proxy's own listening sockets (`ip:port`, IPv6 in brackets) that face the
    /// core. A source in `core_networks` is the core only when its message arrived on
    /// one of these: a spoofed core address on the public listener is access side
    /// (docs/policy.md, "Threat model"). Required when `core_networks` is not empty.
    #[serde(default)]
    pub core_sockets: Vec<String>,
    /// What the edge asserts on the requests it relays to the carrier.
    #[serde(default)]
    pub relay: RelaySettings,
    #[serde(default)]
    pub registration: Registration,
    /// When an inbound call to a registered PBX goes to the trunk group's failover.
    #[serde(default)]
    pub inbound: InboundSettings,
    #[serde(default)]
    pub digest: DigestSettings,
    #[serde(default)]
    pub alerts: AlertSettings,
    pub locations: Vec<Location>,
}

/// Headers the edge writes on the requests it relays (docs/configuration.md).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RelaySettings {
    /// Header naming the authenticated trunk group on calls relayed to the carrier.
    /// Any copy a sender supplied is removed from every relayed request, so the
    /// carrier can trust it from the edge.
    #[serde(default = "default_trunk_group_header")]
    pub trunk_group_header: String,
    /// Replace the PBX's P-Asserted-Identity with one the edge asserts: the caller's
    /// number when it is one of the trunk group's DIDs, else the trunk's first DID.
    #[serde(default = "default_true")]
    pub asserted_identity: bool,
    /// Header announcing a binding to the proxy behind an edge that answers
    /// REGISTERs itself (Envoy: docs/envoy.md, "Inbound calls"), with its companions
    /// `<name>-Contact` and `<name>-Failover`. Any copy a sender supplied is removed
    /// from every relayed request, like the trunk-group header.
    #[serde(default = "default_binding_header")]
    pub binding_header: String,
}

impl Default for RelaySettings {
    fn default() -> Self {
        RelaySettings {
            trunk_group_header: default_trunk_group_header(),
            asserted_identity: true,
            binding_header: default_binding_header(),
        }
    }
}

fn default_binding_header() -> String {
    "X-Trunkguard-Binding".to_string()
}

fn default_trunk_group_header() -> String {
    "X-Trunkguard-Trunk-Group".to_string()
}

/// Failover of inbound calls whose registered PBX does not answer (docs/policy.md,
/// "Inbound calls").
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct InboundSettings {
    /// Milliseconds without any response from the registered PBX after which the
    /// call goes to the failover (a PBX that is ringing has answered).
    #[serde(default = "default_no_answer_ms")]
    pub no_answer_ms: u32,
    /// Also fail over on a 6xx other than 600 Busy Everywhere and 603 Decline.
    #[serde(default)]
    pub failover_on_6xx: bool,
}

impl Default for InboundSettings {
    fn default() -> Self {
        InboundSettings {
            no_answer_ms: default_no_answer_ms(),
            failover_on_6xx: false,
        }
    }
}

fn default_no_answer_ms() -> u32 {
    5_000
}

/// Limits applied to REGISTER expiry.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// Shorter non-zero expiries are refused with 423 and Min-Expires.
    #[serde(default = "default_min_expires")]
    pub min_expires: u32,
    /// Longer expiries are shortened to this.
    #[serde(default = "default_max_expires")]
    pub max_expires: u32,
    /// Expiry when the REGISTER names none (RFC 3261 §10.2.1.1 suggests 3600).
    #[serde(default = "default_default_expires")]
    pub default_expires: u32,
}

impl Default for Registration {
    fn default() -> Self {
        Registration {
            min_expires: default_min_expires(),
            max_expires: default_max_expires(),
            default_expires: default_default_expires(),
        }
    }
}

fn default_min_expires() -> u32 {
    60
}
fn default_max_expires() -> u32 {
    3600
}
fn default_default_expires() -> u32 {
    3600
}

/// Digest authentication settings (all optional; docs/configuration.md).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DigestSettings {
    /// Seconds a nonce stays valid; an older nonce with a correct response gets
    /// `stale=true` so the PBX retries without asking its user for a password.
    #[serde(default = "default_nonce_ttl")]
    pub nonce_ttl_s: u32,
    /// Algorithms offered in challenges, in this order (`MD5`, `SHA-256`). A UAC
    /// answers the first one it supports (RFC 8760 §2.4), and many PBXs read only
    /// the first challenge: MD5 first lets MD5-only PBXs in.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Accept RFC 2069 answers (no `qop`, no `nc`/`cnonce`): weaker, and their
    /// replays cannot be told from a reused nonce's. Off unless a PBX needs it.
    #[serde(default)]
    pub allow_rfc2069: bool,
    /// Slots of the replay set that accepts each (nonce, nc) once; each holds a few
    /// nonces until they expire. Its store size is bounded by this, whatever the
    /// traffic (docs/policy.md).
    #[serde(default = "default_replay_slots")]
    pub replay_slots: u32,
    /// Password guessing: sources refused for a while after too many wrong answers.
    #[serde(default)]
    pub lockout: Lockout,
}

/// `failures` wrong digest answers inside `window_s` from one source (an IPv6 source
/// per /64) ban it for `ban_s`; the same count against one trunk group alerts its
/// contacts. `failures: 0` turns it off.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Lockout {
    #[serde(default = "default_lockout_failures")]
    pub failures: u32,
    #[serde(default = "default_lockout_window")]
    pub window_s: u32,
    #[serde(default = "default_lockout_ban")]
    pub ban_s: u32,
}

impl Default for Lockout {
    fn default() -> Self {
        Lockout {
            failures: default_lockout_failures(),
            window_s: default_lockout_window(),
            ban_s: default_lockout_ban(),
        }
    }
}

fn default_lockout_failures() -> u32 {
    10
}
fn default_lockout_window() -> u32 {
    300
}
fn default_lockout_ban() -> u32 {
    900
}

impl Default for DigestSettings {
    fn default() -> Self {
        DigestSettings {
            nonce_ttl_s: default_nonce_ttl(),
            algorithms: default_algorithms(),
            allow_rfc2069: false,
            replay_slots: default_replay_slots(),
            lockout: Lockout::default(),
        }
    }
}

fn default_algorithms() -> Vec<String> {
    vec!["MD5".to_string(), "SHA-256".to_string()]
}

fn default_replay_slots() -> u32 {
    4096
}

fn default_nonce_ttl() -> u32 {
    300
}

/// Alert throttling (optional; docs/configuration.md).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AlertSettings {
    /// Repeats of the same (trunk group, kind, source IP) inside this many seconds
    /// are counted instead of re-sent.
    #[serde(default = "default_alert_window")]
    pub window_s: u32,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            window_s: default_alert_window(),
        }
    }
}

fn default_alert_window() -> u32 {
    300
}

/// A customer site.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Location {
    pub id: String,
    /// E-mail addresses that receive this location's alerts.
    #[serde(default)]
    pub contacts: Vec<String>,
    pub trunk_groups: Vec<TrunkGroup>,
}

/// One physical PBX.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TrunkGroup {
    pub id: String,
    /// Digest username, unique across the whole configuration.
    pub username: String,
    /// Plain password; enables both MD5 and SHA-256.
    #[serde(default)]
    pub password: Option<String>,
    /// Hex MD5 of `username:realm:password`.
    #[serde(default)]
    pub ha1: Option<String>,
    /// Hex SHA-256 of `username:realm:password`.
    #[serde(default)]
    pub ha1_sha256: Option<String>,
    /// Calls need a current registration and come only from its IP (the default).
    /// `false` is peer-to-peer mode.
    #[serde(default = "default_true")]
    pub require_registration: bool,
    /// CIDR entries (a bare address is /32 or /128); empty means any address.
    #[serde(default)]
    pub acl: Vec<String>,
    #[serde(default)]
    pub alerts: AlertSwitches,
    /// Algorithms this trunk group's answers may use (default: every one of
    /// `digest.algorithms` its credentials can verify); `["SHA-256"]` refuses MD5.
    #[serde(default)]
    pub algorithms: Option<Vec<String>>,
    /// Numbers routed to this trunk group, E.164 (`+15551230000`).
    #[serde(default)]
    pub dids: Vec<String>,
    /// Where inbound calls go while the trunk group has no registration.
    #[serde(default)]
    pub failover: Option<String>,
}

/// The trunk group's two alert switches (docs/configuration.md).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AlertSwitches {
    #[serde(default = "default_true")]
    pub blocked_calls: bool,
    #[serde(default = "default_true")]
    pub reg_ip_change: bool,
}

impl Default for AlertSwitches {
    fn default() -> Self {
        AlertSwitches {
            blocked_calls: true,
            reg_ip_change: true,
        }
    }
}

fn default_true() -> bool {
    true
}

/// A refused configuration push: where in the document, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ConfigError {
    /// JSON path such as `locations[0].trunk_groups[1].acl[2]`, or `.` for the root.
    pub path: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Parses the JSON document, reporting the path of the first offending element.
pub fn parse(json: &[u8]) -> Result<Config, ConfigError> {
    let de = &mut serde_json::Deserializer::from_slice(json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_json appends " at line L column C"; keep it, it helps with big files.
        ConfigError::new(
            if path.is_empty() { ".".into() } else { path },
            inner.to_string(),
        )
    })
}
