//! The configuration compiled once per push into lookup tables: username → trunk
//! group, DID → trunk group, trunk-group id → trunk group, one ACL per trunk group.
//! Every check that can refuse a push lives here, so a compiled [`Index`] is always
//! internally consistent and the per-message path never re-validates anything.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;

use crate::acl::{self, Acl};
use crate::config::{AlertSwitches, Config, ConfigError, Registration};
use crate::digest::{self, Algorithm, Ha1Set};

/// A customer site, as the alerts need it.
#[derive(Debug, Clone)]
pub struct LocationInfo {
    pub id: String,
    pub contacts: Vec<String>,
}

/// A validated trunk group.
#[derive(Debug, Clone)]
pub struct Trunk {
    pub id: String,
    pub location: usize,
    pub username: String,
    pub ha1: Ha1Set,
    pub require_registration: bool,
    pub acl: Acl,
    pub alerts: AlertSwitches,
    pub failover: Option<String>,
    /// Algorithms its answers may use (config `algorithms`, within what its
    /// credentials verify).
    pub algorithms: Vec<Algorithm>,
    /// The trunk group's numbers, normalised (digits, leading `+` kept as written
    /// first): the identities the edge may assert for its calls.
    pub dids: Vec<String>,
}

/// A compiled configuration.
#[derive(Debug, Clone)]
pub struct Index {
    pub realm: String,
    pub core_networks: Acl,
    /// The proxy sockets that face the core (config `core_sockets`).
    pub core_sockets: Vec<SocketAddr>,
    /// Header naming the trunk group on relayed calls (config `relay`).
    pub trunk_group_header: String,
    /// The binding announcement's headers: the binding, its Contact, its failover
    /// (config `relay.binding_header`, docs/envoy.md "Inbound calls").
    pub binding_headers: [String; 3],
    pub asserted_identity: bool,
    pub registration: Registration,
    pub inbound: crate::config::InboundSettings,
    pub nonce_ttl_ms: u64,
    pub allow_rfc2069: bool,
    pub replay_slots: u32,
    /// `None`: password-guessing lockout off.
    pub lockout: Option<crate::lockout::Limits>,
    pub alert_window_ms: u64,
    pub locations: Vec<LocationInfo>,
    pub trunks: Vec<Trunk>,
    /// Algorithms any trunk group can answer, strongest first: what challenges offer.
    algorithms: Vec<Algorithm>,
    by_username: HashMap<String, usize>,
    by_did: HashMap<String, usize>,
    by_id: HashMap<String, usize>,
}

impl Index {
    /// Parses and compiles a JSON document.
    pub fn from_json(json: &[u8]) -> Result<Index, ConfigError> {
        Index::compile(crate::config::parse(json)?)
    }

    pub fn compile(config: Config) -> Result<Index, ConfigError> {
        let realm = config.realm.trim().to_string();
        // The realm goes into every challenge (a quoted string) and into the
        // P-Asserted-Identity the edge writes (`<sip:NUMBER@realm>`): a host name.
        if realm.is_empty()
            || !realm
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(ConfigError::new(
                "realm",
                "must be a host name: letters, digits, '.', '-', '_' (no quote, space, line break or '<>,;')",
            ));
        }
        let core_networks = compile_acl(&config.core_networks, "core_networks")?;
        let core_sockets = compile_sockets(&config.core_sockets)?;
        if core_sockets.is_empty() && !config.core_networks.is_empty() {
            // Source addresses alone are spoofable over UDP: without a core-facing
            // socket to tie them to, core trust would be open to anyone.
            return Err(ConfigError::new(
                "core_sockets",
                "core_networks needs core_sockets: the proxy's listening sockets (ip:port) that face the core",
            ));
        }
        let trunk_group_header = config.relay.trunk_group_header.trim().to_string();
        if !is_header_name(&trunk_group_header) {
            return Err(ConfigError::new(
                "relay.trunk_group_header",
                HEADER_NAME_RULE,
            ));
        }
        let binding_header = config.relay.binding_header.trim().to_string();
        if !is_header_name(&binding_header) {
            return Err(ConfigError::new("relay.binding_header", HEADER_NAME_RULE));
        }
        let binding_headers = [
            binding_header.clone(),
            format!("{binding_header}-Contact"),
            format!("{binding_header}-Failover"),
        ];
        let reg = &config.registration;
        if reg.min_expires == 0 {
            return Err(ConfigError::new(
                "registration.min_expires",
                "must be at least 1 second",
            ));
        }
        if reg.min_expires > reg.max_expires {
            return Err(ConfigError::new(
                "registration.min_expires",
                format!(
                    "{} is above max_expires {}",
                    reg.min_expires, reg.max_expires
                ),
            ));
        }
        if config.inbound.no_answer_ms == 0 {
            return Err(ConfigError::new(
                "inbound.no_answer_ms",
                "must be at least 1 ms (a PBX needs time to answer)",
            ));
        }
        let offered = compile_algorithms(&config.digest.algorithms, "digest.algorithms")?;
        let l = &config.digest.lockout;
        if l.failures > 0 && (l.window_s == 0 || l.ban_s == 0) {
            return Err(ConfigError::new(
                "digest.lockout",
                "window_s and ban_s must be at least 1 second (failures: 0 turns the lockout off)",
            ));
        }
        if config.digest.replay_slots == 0 {
            return Err(ConfigError::new(
                "digest.replay_slots",
                "must be at least 1",
            ));
        }
        if config.digest.nonce_ttl_s == 0 {
            return Err(ConfigError::new(
                "digest.nonce_ttl_s",
                "must be at least 1 second",
            ));
        }

        let mut index = Index {
            realm,
            core_networks,
            core_sockets,
            trunk_group_header,
            binding_headers,
            asserted_identity: config.relay.asserted_identity,
            registration: config.registration.clone(),
            inbound: config.inbound.clone(),
            nonce_ttl_ms: u64::from(config.digest.nonce_ttl_s) * 1000,
            allow_rfc2069: config.digest.allow_rfc2069,
            lockout: {
                let l = &config.digest.lockout;
                (l.failures > 0).then(|| crate::lockout::Limits {
                    failures: l.failures,
                    window_ms: u64::from(l.window_s) * 1000,
                    ban_ms: u64::from(l.ban_s) * 1000,
                })
            },
            replay_slots: config.digest.replay_slots,
            alert_window_ms: u64::from(config.alerts.window_s) * 1000,
            locations: Vec::with_capacity(config.locations.len()),
            trunks: Vec::new(),
            algorithms: Vec::new(),
            by_username: HashMap::new(),
            by_did: HashMap::new(),
            by_id: HashMap::new(),
        };
        let mut location_ids: HashMap<&str, usize> = HashMap::new();

        for (li, location) in config.locations.iter().enumerate() {
            let lpath = format!("locations[{li}]");
            check_id(&location.id, &format!("{lpath}.id"))?;
            if let Some(first) = location_ids.insert(&location.id, li) {
                return Err(ConfigError::new(
                    format!("{lpath}.id"),
                    format!(
                        "duplicate location id {:?} (also locations[{first}])",
                        location.id
                    ),
                ));
            }
            for (ci, contact) in location.contacts.iter().enumerate() {
                check_email(contact, &format!("{lpath}.contacts[{ci}]"))?;
            }
            index.locations.push(LocationInfo {
                id: location.id.clone(),
                contacts: location.contacts.clone(),
            });
            for (ti, tg) in location.trunk_groups.iter().enumerate() {
                let tpath = format!("{lpath}.trunk_groups[{ti}]");
                let trunk_no = index.trunks.len();
                check_id(&tg.id, &format!("{tpath}.id"))?;
                claim(
                    &mut index.by_id,
                    &tg.id,
                    trunk_no,
                    &format!("{tpath}.id"),
                    "trunk group id",
                    &index.trunks,
                )?;
                if tg.username.is_empty() || tg.username.contains(['"', '\\', ':', '\r', '\n']) {
                    return Err(ConfigError::new(
                        format!("{tpath}.username"),
                        "must be non-empty and contain no quote, backslash, colon or line break",
                    ));
                }
                claim(
                    &mut index.by_username,
                    &tg.username,
                    trunk_no,
                    &format!("{tpath}.username"),
                    "username",
                    &index.trunks,
                )?;
                let ha1 = digest::Ha1Set::from_config(
                    &tg.username,
                    &index.realm,
                    tg.password.as_deref(),
                    tg.ha1.as_deref(),
                    tg.ha1_sha256.as_deref(),
                )
                .map_err(|(field, reason)| ConfigError::new(format!("{tpath}{field}"), reason))?;
                let acl = compile_acl(&tg.acl, &format!("{tpath}.acl"))?;
                let mut dids = Vec::with_capacity(tg.dids.len());
                for (di, did) in tg.dids.iter().enumerate() {
                    let dpath = format!("{tpath}.dids[{di}]");
                    let Some(norm) = normalize_did(did) else {
                        return Err(ConfigError::new(
                            dpath,
                            format!("{did:?} is not a phone number (digits, optional leading +)"),
                        ));
                    };
                    claim(
                        &mut index.by_did,
                        &norm,
                        trunk_no,
                        &dpath,
                        "DID",
                        &index.trunks,
                    )?;
                    dids.push(if did.trim_start().starts_with('+') {
                        format!("+{norm}")
                    } else {
                        norm
                    });
                }
                let algorithms = trunk_algorithms(&ha1, tg.algorithms.as_deref(), &offered)
                    .map_err(|reason| ConfigError::new(format!("{tpath}.algorithms"), reason))?;
                if let Some(failover) = &tg.failover {
                    check_sip_uri(failover, &format!("{tpath}.failover"))?;
                }
                index.trunks.push(Trunk {
                    id: tg.id.clone(),
                    location: li,
                    username: tg.username.clone(),
                    ha1,
                    require_registration: tg.require_registration,
                    acl,
                    alerts: tg.alerts.clone(),
                    failover: tg.failover.clone(),
                    algorithms,
                    dids,
                });
            }
        }
        // Offered in the configured order, each only if some trunk group accepts it.
        for alg in offered {
            if index.trunks.iter().any(|t| t.algorithms.contains(&alg)) {
                index.algorithms.push(alg);
            }
        }
        Ok(index)
    }

    pub fn algorithms(&self) -> &[Algorithm] {
        &self.algorithms
    }

    pub fn trunk_by_username(&self, username: &str) -> Option<&Trunk> {
        self.by_username
            .get(username)
            .and_then(|&i| self.trunks.get(i))
    }

    pub fn trunk_by_id(&self, id: &str) -> Option<&Trunk> {
        self.by_id.get(id).and_then(|&i| self.trunks.get(i))
    }

    /// The trunk group a dialled number belongs to. `user` is a Request-URI user part,
    /// possibly with user parameters (`+15551230000;npdi`) or visual separators.
    pub fn trunk_by_did(&self, user: &str) -> Option<&Trunk> {
        let number = user.split(';').next().unwrap_or(user);
        let plain = number.strip_prefix('+').unwrap_or(number);
        // Fast path without allocating: the usual carrier form is already plain digits.
        let hit = if !plain.is_empty() && plain.bytes().all(|b| b.is_ascii_digit()) {
            self.by_did.get(plain)
        } else {
            normalize_did(number).and_then(|n| self.by_did.get(&n))
        };
        hit.and_then(|&i| self.trunks.get(i))
    }

    pub fn location_of(&self, trunk: &Trunk) -> Option<&LocationInfo> {
        self.locations.get(trunk.location)
    }

    /// Core traffic: a core source on a core-facing socket. Either alone is not
    /// enough (a UDP source is spoofable; a core socket may be reachable from
    /// outside).
    pub fn is_core(&self, ip: std::net::IpAddr, local: Option<SocketAddr>) -> bool {
        local.is_some_and(|l| self.core_sockets.iter().any(|s| same_socket(*s, l)))
            && self.core_networks.contains(ip)
    }
}

/// IPv4-mapped IPv6 and plain IPv4 name the same socket (dual-stack listeners
/// report either form).
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && acl::canonical_ip(a.ip()) == acl::canonical_ip(b.ip())
}

fn compile_sockets(entries: &[String]) -> Result<Vec<SocketAddr>, ConfigError> {
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let path = format!("core_sockets[{i}]");
            let socket = e.trim().parse::<SocketAddr>().map_err(|_| {
                ConfigError::new(&path, format!("{e:?} is not ip:port (IPv6 in brackets)"))
            })?;
            // A proxy reports the address a message arrived on, never 0.0.0.0:
            // a wildcard here would match nothing, or (in a host that reported the
            // bind address) every socket.
            if socket.ip().is_unspecified() || socket.port() == 0 {
                return Err(ConfigError::new(
                    path,
                    format!("{e:?} is not one socket: name the address and port it listens on"),
                ));
            }
            Ok(socket)
        })
        .collect()
}

fn compile_algorithms(names: &[String], path: &str) -> Result<Vec<Algorithm>, ConfigError> {
    let mut out = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let alg = Algorithm::from_param(Some(name)).ok_or_else(|| {
            ConfigError::new(
                format!("{path}[{i}]"),
                format!("{name:?} is not a digest algorithm (MD5, SHA-256)"),
            )
        })?;
        if out.contains(&alg) {
            return Err(ConfigError::new(
                format!("{path}[{i}]"),
                format!("{name:?} is listed twice"),
            ));
        }
        out.push(alg);
    }
    if out.is_empty() {
        return Err(ConfigError::new(path, "needs at least one algorithm"));
    }
    Ok(out)
}

/// What a trunk group's answers may use: its own list (each one offered and
/// verifiable with its credentials) or, by default, every offered algorithm its
/// credentials verify.
fn trunk_algorithms(
    ha1: &Ha1Set,
    own: Option<&[String]>,
    offered: &[Algorithm],
) -> Result<Vec<Algorithm>, String> {
    let verifiable = |alg: &Algorithm| ha1.algorithms().any(|a| a == *alg);
    let list = match own {
        None => offered.iter().copied().filter(verifiable).collect(),
        Some(names) => {
            let list = compile_algorithms(names, "algorithms").map_err(|e| e.reason)?;
            if let Some(alg) = list.iter().find(|a| !verifiable(a)) {
                return Err(format!(
                    "{} cannot be verified with this trunk group's credentials",
                    alg.name()
                ));
            }
            if let Some(alg) = list.iter().find(|a| !offered.contains(a)) {
                return Err(format!("{} is not in digest.algorithms", alg.name()));
            }
            list
        }
    };
    if list.is_empty() {
        return Err(
            "none of digest.algorithms can be verified with this trunk group's credentials".into(),
        );
    }
    Ok(list)
}

fn claim(
    map: &mut HashMap<String, usize>,
    key: &str,
    trunk_no: usize,
    path: &str,
    what: &str,
    trunks: &[Trunk],
) -> Result<(), ConfigError> {
    match map.entry(key.to_string()) {
        Entry::Occupied(e) => {
            let other = trunks.get(*e.get()).map(|t| t.id.as_str()).unwrap_or("?");
            Err(ConfigError::new(
                path,
                format!("duplicate {what} {key:?} (already used by trunk group {other:?})"),
            ))
        }
        Entry::Vacant(e) => {
            e.insert(trunk_no);
            Ok(())
        }
    }
}

fn compile_acl(entries: &[String], path: &str) -> Result<Acl, ConfigError> {
    let mut nets = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        nets.push(
            acl::parse_entry(entry)
                .map_err(|e| ConfigError::new(format!("{path}[{i}]"), e.to_string()))?,
        );
    }
    Ok(Acl::new(nets))
}

fn check_id(id: &str, path: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        // Ids end up in store keys, alert subjects and log lines: keep them plain.
        Err(ConfigError::new(
            path,
            format!("{id:?} must be 1-128 characters of letters, digits, '-', '_' or '.'"),
        ))
    }
}

fn check_email(addr: &str, path: &str) -> Result<(), ConfigError> {
    let ok = match addr.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !addr.contains(|c: char| c.is_whitespace() || matches!(c, '<' | '>' | ',' | '"'))
                && !domain.contains('@')
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            path,
            format!("{addr:?} is not an e-mail address"),
        ))
    }
}

fn check_sip_uri(uri: &str, path: &str) -> Result<(), ConfigError> {
    let rest = uri
        .strip_prefix("sip:")
        .or_else(|| uri.strip_prefix("sips:"));
    let host = rest.map(|r| {
        let after_user = r.rsplit_once('@').map_or(r, |(_, h)| h);
        after_user.split([';', '?']).next().unwrap_or("")
    });
    let ok = matches!(host, Some(h) if !h.is_empty() && !h.starts_with(':'))
        && !uri.contains(|c: char| c.is_whitespace() || matches!(c, '<' | '>' | '"'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            path,
            format!("{uri:?} is not a sip: or sips: URI with a host"),
        ))
    }
}

/// `+1 (555) 123-0000` → `15551230000`; `None` when it is not a phone number.
pub fn normalize_did(text: &str) -> Option<String> {
    let text = text.trim();
    let body = text.strip_prefix('+').unwrap_or(text);
    let mut digits = String::with_capacity(body.len());
    for c in body.chars() {
        match c {
            '0'..='9' => digits.push(c),
            // RFC 3966 visual separators.
            '-' | '.' | '(' | ')' | ' ' => {}
            _ => return None,
        }
    }
    (!digits.is_empty() && digits.len() <= 20).then_some(digits)
}

/// The header names the configuration takes. Hosts strip these names (and
/// `NAME-Contact`, `NAME-Failover`) from every relayed request with their own header
/// functions, and Kamailio's functions refuse some SIP tokens: KEMI's `hdr.remove`
/// any name over 124 bytes, its header parser any character but letters, digits and
/// `-._+~`. A host that could not strip a name would have to refuse every request.
const MAX_HEADER_NAME: usize = 64;
const HEADER_NAME_RULE: &str =
    "must be a header name of at most 64 letters, digits and - . _ + ~ (what every host can strip)";

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HEADER_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._+~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{
      "realm": "trunks.example.net",
      "core_networks": ["10.0.0.0/8"],
      "core_sockets": ["10.0.0.1:5060"],
      "locations": [{
        "id": "hq", "contacts": ["noc@example.com"],
        "trunk_groups": [
          {"id": "hq-pbx1", "username": "hq1", "password": "s3cret",
           "acl": ["203.0.113.7/32", "2001:db8:7::/48"], "dids": ["+15551230000"],
           "failover": "sip:+15551230000@198.51.100.20:5060"},
          {"id": "hq-pbx2", "username": "hq2", "ha1": "0123456789abcdef0123456789abcdef",
           "require_registration": false, "dids": ["+1 (555) 123-0001"]}
        ]
      }]
    }"#;

    #[test]
    fn compiles_lookup_tables() {
        let index = Index::from_json(BASE.as_bytes()).unwrap();
        assert_eq!(index.trunk_by_username("hq1").unwrap().id, "hq-pbx1");
        assert_eq!(index.trunk_by_did("+15551230000").unwrap().id, "hq-pbx1");
        assert_eq!(index.trunk_by_did("15551230001").unwrap().id, "hq-pbx2");
        assert_eq!(
            index.trunk_by_did("+1-555-123-0001;npdi").unwrap().id,
            "hq-pbx2"
        );
        assert!(index.trunk_by_did("15559999999").is_none());
        assert!(index.trunk_by_username("nobody").is_none());
        assert!(!index.trunk_by_id("hq-pbx2").unwrap().require_registration);
        let core_socket = Some("10.0.0.1:5060".parse().unwrap());
        let public_socket = Some("192.0.2.1:5060".parse().unwrap());
        assert!(index.is_core("10.1.2.3".parse().unwrap(), core_socket));
        assert!(!index.is_core("203.0.113.7".parse().unwrap(), core_socket));
        // A core source address on the public listener (spoofed over UDP) or on an
        // unknown socket is not the core.
        assert!(!index.is_core("10.1.2.3".parse().unwrap(), public_socket));
        assert!(!index.is_core("10.1.2.3".parse().unwrap(), None));
        // A dual-stack listener reports the v4-mapped form.
        assert!(index.is_core(
            "10.1.2.3".parse().unwrap(),
            Some("[::ffff:10.0.0.1]:5060".parse().unwrap())
        ));
    }

    #[test]
    fn refused_pushes_name_the_path_and_reason() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "bad CIDR",
                "\"203.0.113.7/32\"",
                "\"203.0.113.300/32\"",
                "locations[0].trunk_groups[0].acl[0]",
            ),
            (
                "duplicate username",
                "\"username\": \"hq2\"",
                "\"username\": \"hq1\"",
                "locations[0].trunk_groups[1].username",
            ),
            (
                "duplicate DID",
                "\"+1 (555) 123-0001\"",
                "\"15551230000\"",
                "locations[0].trunk_groups[1].dids[0]",
            ),
            (
                "unknown field",
                "\"require_registration\": false",
                "\"require_registraton\": false",
                "locations[0].trunk_groups[1].require_registraton",
            ),
            (
                "wrong type",
                "\"require_registration\": false",
                "\"require_registration\": \"no\"",
                "locations[0].trunk_groups[1].require_registration",
            ),
            (
                "short ha1",
                "0123456789abcdef0123456789abcdef",
                "0123",
                "locations[0].trunk_groups[1].ha1",
            ),
            (
                "bad failover",
                "sip:+15551230000@198.51.100.20:5060",
                "http://x",
                "locations[0].trunk_groups[0].failover",
            ),
            (
                "bad core network",
                "10.0.0.0/8",
                "10.0.0.0/88",
                "core_networks[0]",
            ),
            (
                "bad contact",
                "noc@example.com",
                "noc",
                "locations[0].contacts[0]",
            ),
            (
                "bad DID",
                "+15551230000",
                "+1555CALLME",
                "locations[0].trunk_groups[0].dids[0]",
            ),
            // Header injection into every challenge: a quote or a line break in the
            // realm or a username would end up inside WWW-/Proxy-Authenticate.
            (
                "quote in realm",
                "\"trunks.example.net\"",
                "\"trunks\\\"x\"",
                "realm",
            ),
            (
                "line break in realm",
                "\"trunks.example.net\"",
                "\"trunks\\r\\nX-Evil: 1\"",
                "realm",
            ),
            (
                "quote in username",
                "\"username\": \"hq2\"",
                "\"username\": \"hq\\\"2\"",
                "locations[0].trunk_groups[1].username",
            ),
            (
                "line break in username",
                "\"username\": \"hq2\"",
                "\"username\": \"hq\\n2\"",
                "locations[0].trunk_groups[1].username",
            ),
            // Bindings and throttles are keyed by trunk-group id: a duplicate would let
            // one PBX's registration unlock the other's calls.
            (
                "duplicate trunk-group id",
                "\"id\": \"hq-pbx2\"",
                "\"id\": \"hq-pbx1\"",
                "locations[0].trunk_groups[1].id",
            ),
            (
                "password and a hash",
                "\"password\": \"s3cret\",",
                "\"password\": \"s3cret\", \"ha1\": \"0123456789abcdef0123456789abcdef\",",
                "locations[0].trunk_groups[0].password",
            ),
            (
                "min_expires 0",
                "\"core_networks\"",
                "\"registration\": {\"min_expires\": 0}, \"core_networks\"",
                "registration.min_expires",
            ),
            (
                "ha1_sha256 of the wrong length",
                "\"ha1\": \"0123456789abcdef0123456789abcdef\"",
                "\"ha1_sha256\": \"0123456789abcdef0123456789abcdef\"",
                "locations[0].trunk_groups[1].ha1_sha256",
            ),
            (
                "core networks without core sockets",
                "\"core_sockets\": [\"10.0.0.1:5060\"],",
                "",
                "core_sockets",
            ),
            (
                "bad core socket",
                "\"10.0.0.1:5060\"",
                "\"10.0.0.1\"",
                "core_sockets[0]",
            ),
            (
                "bad trunk-group header",
                "\"core_sockets\"",
                "\"relay\": {\"trunk_group_header\": \"X Bad: 1\"}, \"core_sockets\"",
                "relay.trunk_group_header",
            ),
            (
                "a binding header name over 64 characters",
                "\"core_sockets\"",
                "\"relay\": {\"binding_header\": \"X-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"}, \"core_sockets\"",
                "relay.binding_header",
            ),
            (
                "a trunk-group header name that is a token Kamailio does not parse",
                "\"core_sockets\"",
                "\"relay\": {\"trunk_group_header\": \"X-Trunk!Group\"}, \"core_sockets\"",
                "relay.trunk_group_header",
            ),
            (
                "unknown digest algorithm",
                "\"core_sockets\"",
                "\"digest\": {\"algorithms\": [\"SHA-512\"]}, \"core_sockets\"",
                "digest.algorithms[0]",
            ),
            (
                "SHA-256 for a trunk group with only an MD5 hash",
                "\"require_registration\": false,",
                "\"require_registration\": false, \"algorithms\": [\"SHA-256\"],",
                "locations[0].trunk_groups[1].algorithms",
            ),
        ];
        for (what, from, to, path) in cases {
            let json = BASE.replacen(from, to, 1);
            assert_ne!(json, BASE, "{what}: replacement did not apply");
            let err = Index::from_json(json.as_bytes()).unwrap_err();
            assert_eq!(err.path, *path, "{what}: {err}");
            assert!(!err.reason.is_empty(), "{what}");
        }
    }

    #[test]
    fn duplicate_location_ids_are_refused() {
        let json = BASE.replacen(
            "\"locations\": [{",
            "\"locations\": [{\"id\": \"hq\", \"trunk_groups\": []}, {",
            1,
        );
        let err = Index::from_json(json.as_bytes()).unwrap_err();
        assert_eq!(err.path, "locations[1].id", "{err}");
    }

    #[test]
    fn trunk_without_credentials_is_refused() {
        let json = BASE.replacen("\"password\": \"s3cret\",", "", 1);
        let err = Index::from_json(json.as_bytes()).unwrap_err();
        assert_eq!(err.path, "locations[0].trunk_groups[0]");
        assert!(err.reason.contains("password"), "{err}");
    }

    #[test]
    fn syntax_error_is_refused_at_root() {
        let err = Index::from_json(b"{\"realm\": ").unwrap_err();
        assert!(err.reason.contains("EOF"), "{err}");
    }

    #[test]
    fn min_expires_above_max_is_refused() {
        let json = BASE.replacen(
            "\"core_networks\"",
            "\"registration\": {\"min_expires\": 600, \"max_expires\": 60}, \"core_networks\"",
            1,
        );
        let err = Index::from_json(json.as_bytes()).unwrap_err();
        assert_eq!(err.path, "registration.min_expires");
    }
}
