//! Via header elements (RFC 3261 §20.42, RFC 3581 rport, RFC 5118 §4.5 received).

use std::net::IpAddr;

use super::lex;
use super::param::Params;
use super::transport::Transport;
use super::uri::{self, Host};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Via<'a> {
    /// `None` for a transport this crate does not know (RFC 4475 `transports` has
    /// `SIP/2.0/UNKNOWN`); the token is in `transport_raw`.
    pub transport: Option<Transport>,
    pub transport_raw: &'a str,
    pub host: Host<'a>,
    pub port: Option<u16>,
    pub branch: Option<&'a str>,
    /// As written: an IPv6 address may come with or without brackets.
    pub received: Option<&'a str>,
    /// `Some(None)`: `;rport` without a value (a request for symmetric response routing).
    pub rport: Option<Option<u16>>,
    pub maddr: Option<&'a str>,
    pub ttl: Option<u8>,
    /// The parameters after sent-by, without the first `;` (may hold LWS).
    pub params: &'a str,
    /// The whole element, trimmed.
    pub raw: &'a str,
}

impl<'a> Via<'a> {
    pub(crate) fn parse(s: &'a str) -> Result<Via<'a>, &'static str> {
        parse(s)
    }

    /// The `received` address (bracketed or not).
    pub fn received_ip(&self) -> Option<IpAddr> {
        self.received.and_then(parse_received)
    }

    /// RFC 3261 §8.1.1.7: a branch starting with the magic cookie marks a
    /// transaction id unique across time; older ones are RFC 2543-style.
    pub fn has_rfc3261_branch(&self) -> bool {
        self.branch.is_some_and(|b| b.starts_with("z9hG4bK"))
    }
}

fn parse_received(v: &str) -> Option<IpAddr> {
    let bare = v
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(v);
    bare.parse().ok()
}

fn parse(s: &str) -> Result<Via<'_>, &'static str> {
    let raw = lex::trim_lws(s);
    if raw.is_empty() {
        return Err("empty element");
    }
    let b = raw.as_bytes();
    let slice = |from: usize, to: usize| raw.get(from..to).unwrap_or("");
    // SLASH and COLON admit LWS on both sides (RFC 3261 §25.1), hence the skips.
    let protocol_end = lex::skip_token(b, 0);
    if !lex::eq_letters(slice(0, protocol_end), "sip") {
        return Err("protocol is not SIP");
    }
    let mut i = lex::skip_lws(b, protocol_end);
    if b.get(i) != Some(&b'/') {
        return Err("bad sent-protocol");
    }
    i = lex::skip_lws(b, i + 1);
    let version_end = lex::skip_token(b, i);
    if slice(i, version_end) != "2.0" {
        return Err("unsupported SIP version");
    }
    i = lex::skip_lws(b, version_end);
    if b.get(i) != Some(&b'/') {
        return Err("bad sent-protocol");
    }
    i = lex::skip_lws(b, i + 1);
    let transport_end = lex::skip_token(b, i);
    let transport_raw = slice(i, transport_end);
    if transport_raw.is_empty() {
        return Err("missing transport");
    }
    i = lex::skip_lws(b, transport_end);
    if i == transport_end {
        return Err("missing sent-by");
    }
    let host = if b.get(i) == Some(&b'[') {
        let close =
            i + lex::find1(b.get(i..).unwrap_or(&[]), b']').ok_or("unterminated IPv6 reference")?;
        let ip = slice(i + 1, close)
            .parse()
            .map_err(|_| "bad IPv6 address")?;
        i = close + 1;
        Host::V6(ip)
    } else {
        let (end, host) = uri::host_run(raw, i)?;
        i = end;
        host
    };
    i = lex::skip_lws(b, i);
    let port = if b.get(i) == Some(&b':') {
        i = lex::skip_lws(b, i + 1);
        let digits_end = i + b
            .get(i..)
            .unwrap_or(&[])
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        let port = uri::parse_port(slice(i, digits_end))?;
        i = digits_end;
        Some(port)
    } else {
        None
    };
    i = lex::skip_lws(b, i);
    let section = match b.get(i) {
        None => None,
        Some(b';') => raw.get(i + 1..),
        Some(_) => return Err("unexpected text after sent-by"),
    };
    let mut via = Via {
        transport: transport_raw.parse().ok(),
        transport_raw,
        host,
        port,
        branch: None,
        received: None,
        rport: None,
        maddr: None,
        ttl: None,
        params: section.unwrap_or(""),
        raw,
    };
    for p in Params::new(section) {
        let (name, value) = p?;
        match name.len() {
            6 if lex::eq_letters(name, "branch") => {
                via.branch = Some(value.filter(|v| lex::is_token(v)).ok_or("bad branch")?);
            }
            8 if lex::eq_letters(name, "received") => {
                via.received = Some(
                    value
                        .filter(|v| parse_received(v).is_some())
                        .ok_or("bad received")?,
                );
            }
            5 if lex::eq_letters(name, "rport") => {
                via.rport = Some(match value {
                    None => None,
                    Some(v) => Some(uri::parse_port(v).map_err(|_| "bad rport")?),
                });
            }
            5 if lex::eq_letters(name, "maddr") => {
                via.maddr = Some(value.ok_or("bad maddr")?);
            }
            3 if lex::eq_letters(name, "ttl") => {
                via.ttl = Some(value.and_then(|v| v.parse().ok()).ok_or("bad ttl")?);
            }
            _ => {}
        }
    }
    Ok(via)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn vias_parse_with_lws_ipv6_and_params() {
        // (input, transport, host, port, branch, received, rport)
        type Row<'a> = (
            &'a str,
            Option<Transport>,
            &'a str,
            Option<u16>,
            Option<&'a str>,
            Option<&'a str>,
            Option<Option<u16>>,
        );
        let cases: &[Row] = &[
            (
                "SIP/2.0/UDP host4.example.com:5060;branch=z9hG4bKkdju43234",
                Some(Transport::Udp),
                "host4.example.com",
                Some(5060),
                Some("z9hG4bKkdju43234"),
                None,
                None,
            ),
            (
                "SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=390skdjuw",
                Some(Transport::Udp),
                "192.0.2.2",
                None,
                Some("390skdjuw"),
                None,
                None,
            ),
            (
                "SIP  / 2.0  / TCP     spindle.example.com   ;\r\n  branch  =   z9hG4bK9ikj8",
                Some(Transport::Tcp),
                "spindle.example.com",
                None,
                Some("z9hG4bK9ikj8"),
                None,
                None,
            ),
            (
                "SIP/2.0/UNKNOWN t4.example.com;branch=z9hG4bKasd0f3en",
                None,
                "t4.example.com",
                None,
                Some("z9hG4bKasd0f3en"),
                None,
                None,
            ),
            (
                "SIP/2.0/UDP [::ffff:192.0.2.10]:19823;branch=z9hG4bKbh19",
                Some(Transport::Udp),
                "[::ffff:192.0.2.10]",
                Some(19823),
                Some("z9hG4bKbh19"),
                None,
                None,
            ),
            (
                "SIP/2.0/UDP [2001:db8::9:1];received=2001:db8::9:255;branch=z9hG4bKas3",
                Some(Transport::Udp),
                "[2001:db8::9:1]",
                None,
                Some("z9hG4bKas3"),
                Some("2001:db8::9:255"),
                None,
            ),
            (
                "SIP/2.0/UDP [2001:db8::9:1];received=[2001:db8::9:255];branch=z9hG4bKas3-111",
                Some(Transport::Udp),
                "[2001:db8::9:1]",
                None,
                Some("z9hG4bKas3-111"),
                Some("[2001:db8::9:255]"),
                None,
            ),
            (
                "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-d87543;rport",
                Some(Transport::Udp),
                "127.0.0.1",
                Some(5070),
                Some("z9hG4bK-d87543"),
                None,
                Some(None),
            ),
            (
                "sip/2.0/tls h : 5061 ; rport=5061",
                Some(Transport::Tls),
                "h",
                Some(5061),
                None,
                None,
                Some(Some(5061)),
            ),
            (
                "SIP/2.0/UDP iftgw.example.com",
                Some(Transport::Udp),
                "iftgw.example.com",
                None,
                None,
                None,
                None,
            ),
        ];
        for &(input, transport, host, port, branch, received, rport) in cases {
            let via = Via::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(via.transport, transport, "{input:?}");
            assert_eq!(via.host.to_string(), host, "{input:?}");
            assert_eq!(via.port, port, "{input:?}");
            assert_eq!(via.branch, branch, "{input:?}");
            assert_eq!(via.received, received, "{input:?}");
            assert_eq!(via.rport, rport, "{input:?}");
        }
    }

    #[test]
    fn malformed_vias_are_refused() {
        let cases = [
            "",
            "SIP/2.0/UDP 192.0.2.15;;",
            ";",
            "SIP/7.0/UDP c.example.com;branch=z9hG4bKkdjuw",
            "HTTP/2.0/UDP h",
            "SIP/2.0/UDP",
            "SIP/2.0/UDPhost",
            "SIP/2.0 UDP host",
            "SIP/2.0/UDP [2001:db8::1",
            "SIP/2.0/UDP host:70000",
            "SIP/2.0/UDP host;branch=",
            "SIP/2.0/UDP host;received=example.com",
            "SIP/2.0/UDP host;rport=x",
            "SIP/2.0/UDP host junk",
            "SIP/2.0/UDP 2001:db8::1",
        ];
        for input in cases {
            assert!(Via::parse(input).is_err(), "{input:?} should be refused");
        }
    }

    #[test]
    fn received_ip_accepts_both_ipv6_spellings() {
        let cases = [
            (
                "SIP/2.0/UDP h;received=192.0.2.1",
                Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
            ),
            (
                "SIP/2.0/UDP h;received=[2001:db8::1]",
                "2001:db8::1".parse().ok(),
            ),
            (
                "SIP/2.0/UDP h;received=2001:db8::1",
                "2001:db8::1".parse().ok(),
            ),
            ("SIP/2.0/UDP h", None),
        ];
        for (input, want) in cases {
            let via = Via::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(via.received_ip(), want, "{input:?}");
        }
    }
}
