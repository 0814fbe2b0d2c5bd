//! CIDR access lists with longest-prefix match.
//!
//! Networks are kept in one hash set per prefix length, so a lookup costs at most one
//! probe per *distinct* prefix length in the list (≤ 33 for IPv4, ≤ 129 for IPv6)
//! whatever the number of entries: 1 entry and 100k entries cost about the same.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;

/// Why an ACL entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    #[error("invalid address or CIDR {0:?}")]
    Invalid(String),
    #[error("{0:?} has host bits set; did you mean {1}?")]
    HostBits(String, IpNet),
}

/// Parses one ACL entry: CIDR, or a bare address meaning /32 or /128.
pub fn parse_entry(text: &str) -> Result<IpNet, AclError> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        // 203.0.113.7/24 is almost always a typo for .0/24 or /32: refuse rather
        // than guess which one the operator meant.
        if net.trunc() != net {
            return Err(AclError::HostBits(text.to_string(), net.trunc()));
        }
        return Ok(normalize_net(net));
    }
    text.parse::<IpAddr>()
        .map(|ip| IpNet::from(canonical_ip(ip)))
        .map_err(|_| AclError::Invalid(text.to_string()))
}

/// IPv4-mapped IPv6 addresses (::ffff:a.b.c.d, what dual-stack sockets report) are
/// the IPv4 address: compare and match them as such.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        IpAddr::V4(_) => ip,
    }
}

/// Appends `ip` as its Display writes it (dotted decimal), without core::fmt: store
/// keys and records name a source on every authenticated request, and `Ipv4Addr`'s
/// Display costs more than the rest of such a key (docs/performance.md).
pub fn push_ipv4(out: &mut String, ip: std::net::Ipv4Addr) {
    let mut digits = itoa::Buffer::new();
    for (i, octet) in ip.octets().iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(digits.format(*octet));
    }
}

fn normalize_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.addr().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96) {
                    return IpNet::V4(n);
                }
            }
        }
    }
    net
}

/// A compiled access list.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    v4: PrefixTable<u32>,
    v6: PrefixTable<u128>,
    entries: Vec<IpNet>,
}

#[derive(Debug, Clone)]
struct PrefixTable<K> {
    /// Prefix lengths present, longest first.
    lengths: Vec<u8>,
    by_len: HashMap<u8, HashSet<K>>,
}

impl<K> Default for PrefixTable<K> {
    fn default() -> Self {
        PrefixTable {
            lengths: Vec::new(),
            by_len: HashMap::new(),
        }
    }
}

trait Bits: Copy + Eq + std::hash::Hash {
    const WIDTH: u8;
    fn masked(self, len: u8) -> Self;
}

impl Bits for u32 {
    const WIDTH: u8 = 32;
    fn masked(self, len: u8) -> Self {
        if len == 0 {
            0
        } else {
            self & (u32::MAX << (32 - u32::from(len)))
        }
    }
}

impl Bits for u128 {
    const WIDTH: u8 = 128;
    fn masked(self, len: u8) -> Self {
        if len == 0 {
            0
        } else {
            self & (u128::MAX << (128 - u32::from(len)))
        }
    }
}

impl<K: Bits> PrefixTable<K> {
    fn insert(&mut self, addr: K, len: u8) {
        let len = len.min(K::WIDTH);
        let set = self.by_len.entry(len).or_default();
        set.insert(addr.masked(len));
        if !self.lengths.contains(&len) {
            self.lengths.push(len);
            self.lengths.sort_unstable_by(|a, b| b.cmp(a));
        }
    }

    fn longest_match(&self, addr: K) -> Option<u8> {
        self.lengths.iter().copied().find(|&len| {
            self.by_len
                .get(&len)
                .is_some_and(|set| set.contains(&addr.masked(len)))
        })
    }
}

impl Acl {
    pub fn new(entries: impl IntoIterator<Item = IpNet>) -> Self {
        let mut acl = Acl::default();
        for net in entries {
            match normalize_net(net) {
                IpNet::V4(n) => acl.v4.insert(u32::from(n.network()), n.prefix_len()),
                IpNet::V6(n) => acl.v6.insert(u128::from(n.network()), n.prefix_len()),
            }
            acl.entries.push(net);
        }
        acl
    }

    /// An empty list admits any authenticated caller (docs/configuration.md, `acl`).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[IpNet] {
        &self.entries
    }

    /// The prefix length of the most specific entry containing `ip`, if any.
    pub fn longest_match(&self, ip: IpAddr) -> Option<u8> {
        match canonical_ip(ip) {
            IpAddr::V4(v4) => self.v4.longest_match(u32::from(v4)),
            IpAddr::V6(v6) => self.v6.longest_match(u128::from(v6)),
        }
    }

    /// Whether `ip` may pass: always when the list is empty.
    pub fn admits(&self, ip: IpAddr) -> bool {
        self.is_empty() || self.longest_match(ip).is_some()
    }

    /// Whether `ip` is inside one of the entries (false for an empty list).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.longest_match(ip).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[&str]) -> Acl {
        Acl::new(entries.iter().map(|e| parse_entry(e).unwrap()))
    }

    #[test]
    fn matches_by_longest_prefix_for_v4_and_v6() {
        let list = acl(&[
            "10.0.0.0/8",
            "10.1.0.0/16",
            "203.0.113.7",
            "2001:db8:7::/48",
            "::/0",
        ]);
        let cases: &[(&str, Option<u8>)] = &[
            ("10.2.3.4", Some(8)),
            ("10.1.3.4", Some(16)),
            ("203.0.113.7", Some(32)),
            ("203.0.113.8", None),
            ("2001:db8:7:1::5", Some(48)),
            ("2001:db8:8::1", Some(0)),
            ("::ffff:10.1.0.1", Some(16)),
        ];
        for (ip, want) in cases {
            assert_eq!(list.longest_match(ip.parse().unwrap()), *want, "{ip}");
        }
    }

    #[test]
    fn empty_list_admits_everyone_but_contains_nobody() {
        let list = Acl::default();
        assert!(list.admits("198.51.100.1".parse().unwrap()));
        assert!(!list.contains("198.51.100.1".parse().unwrap()));
    }

    #[test]
    fn bare_address_is_a_host_route() {
        assert_eq!(
            parse_entry("203.0.113.7").unwrap().to_string(),
            "203.0.113.7/32"
        );
        assert_eq!(
            parse_entry("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        assert_eq!(
            parse_entry("::ffff:192.0.2.1").unwrap().to_string(),
            "192.0.2.1/32"
        );
    }

    #[test]
    fn refuses_garbage_and_host_bits() {
        assert!(matches!(
            parse_entry("203.0.113.300"),
            Err(AclError::Invalid(_))
        ));
        assert!(matches!(
            parse_entry("10.0.0.1/33"),
            Err(AclError::Invalid(_))
        ));
        assert!(matches!(
            parse_entry("10.0.0.1/8"),
            Err(AclError::HostBits(..))
        ));
        assert!(matches!(parse_entry(""), Err(AclError::Invalid(_))));
    }

    #[test]
    fn v4_list_never_matches_v6_sources() {
        let list = acl(&["0.0.0.0/0"]);
        assert!(!list.admits("2001:db8::1".parse().unwrap()));
        assert!(list.admits("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn push_ipv4_writes_what_display_writes() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.0.255",
            "192.0.2.10",
            "255.255.255.255",
        ] {
            let ip: std::net::Ipv4Addr = ip.parse().unwrap();
            let mut out = String::from("x");
            push_ipv4(&mut out, ip);
            assert_eq!(out, format!("x{ip}"));
        }
    }
}
