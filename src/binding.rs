//! A trunk group's current registration, as kept in the host store.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::index::Trunk;
use crate::store::{Store, StoreError, keys};

/// The registration of one trunk group; at most one, a newer REGISTER replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// Transport peer address the REGISTER came from (never a header's claim).
    #[serde(serialize_with = "serialize_source")]
    pub source: SocketAddr,
    pub transport: String,
    /// The Contact URI the PBX registered.
    pub contact: String,
    pub expires_at_ms: u64,
    pub registered_at_ms: u64,
    pub call_id: String,
}

/// The source as serde writes a `SocketAddr` (its Display, `ip:port`), with an IPv4
/// address written without core::fmt: every REGISTER saves a binding, and
/// `Ipv4Addr`'s Display cost more than the rest of the record.
fn serialize_source<S: serde::Serializer>(source: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
    match source {
        SocketAddr::V4(v4) => {
            let mut text = String::with_capacity(21);
            crate::acl::push_ipv4(&mut text, *v4.ip());
            text.push(':');
            text.push_str(itoa::Buffer::new().format(v4.port()));
            s.serialize_str(&text)
        }
        SocketAddr::V6(_) => source.serialize(s),
    }
}

impl Binding {
    pub fn ip(&self) -> IpAddr {
        crate::acl::canonical_ip(self.source.ip())
    }

    /// `sip:ip:port;transport=x`: where inbound calls for this binding are sent.
    pub fn next_hop(&self) -> String {
        format!("sip:{};transport={}", self.source, self.transport)
    }

    pub fn remaining_s(&self, now_ms: u64) -> u64 {
        self.expires_at_ms.saturating_sub(now_ms).div_ceil(1000)
    }
}

/// Reads the trunk group's binding if it is current: unexpired, and its address still
/// passes the trunk group's ACL (a configuration push may have narrowed it). A
/// record that fails either test is removed so it cannot come back.
pub fn current(
    store: &mut dyn Store,
    trunk: &Trunk,
    now_ms: u64,
) -> Result<Option<Binding>, StoreError> {
    let key = keys::binding(&trunk.id);
    let Some(raw) = store.get(&key)? else {
        return Ok(None);
    };
    match serde_json::from_slice::<Binding>(&raw) {
        Ok(b) if b.expires_at_ms > now_ms && trunk.acl.admits(b.ip()) => Ok(Some(b)),
        // Expired, outside the ACL, or unreadable (written by an incompatible
        // version): all mean "not registered".
        _ => {
            store.delete(&key)?;
            Ok(None)
        }
    }
}

pub fn save(store: &mut dyn Store, trunk: &str, binding: &Binding) -> Result<(), StoreError> {
    // Sized for the whole record (field names, the source, two numbers, the texts),
    // so serde_json writes it without growing the buffer unless a text needs escapes:
    // every REGISTER saves one.
    let mut raw = Vec::with_capacity(
        184 + binding.transport.len() + binding.contact.len() + binding.call_id.len(),
    );
    serde_json::to_writer(&mut raw, binding).map_err(|e| StoreError(e.to_string()))?;
    store.set(&keys::binding(trunk), &raw)
}

pub fn remove(store: &mut dyn Store, trunk: &str) -> Result<(), StoreError> {
    store.delete(&keys::binding(trunk))
}

/// The IP of the trunk group's last successful registration, kept after the binding
/// expires so a PBX coming back from elsewhere is still noticed.
pub fn last_reg_ip(store: &mut dyn Store, trunk: &str) -> Result<Option<IpAddr>, StoreError> {
    Ok(store
        .get(&keys::last_reg_ip(trunk))?
        .and_then(|raw| std::str::from_utf8(&raw).ok()?.parse().ok()))
}

pub fn set_last_reg_ip(store: &mut dyn Store, trunk: &str, ip: IpAddr) -> Result<(), StoreError> {
    store.set(&keys::last_reg_ip(trunk), ip.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_is_written_as_serde_writes_its_source_and_reads_back() {
        for source in [
            "203.0.113.7:5060",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[2001:db8::1]:5060",
            "[::ffff:192.0.2.1]:5062",
        ] {
            let source: SocketAddr = source.parse().unwrap();
            let b = Binding {
                source,
                transport: "udp".into(),
                contact: "sip:pbx@192.0.2.1".into(),
                expires_at_ms: 2,
                registered_at_ms: 1,
                call_id: "c@pbx".into(),
            };
            let text = serde_json::to_string(&b).unwrap();
            let expected = serde_json::to_string(&source).unwrap();
            assert!(text.contains(&format!("\"source\":{expected}")), "{text}");
            assert_eq!(serde_json::from_str::<Binding>(&text).unwrap(), b);
        }
    }
}
