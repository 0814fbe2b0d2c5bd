//! SIP, SIPS and tel URIs (RFC 3261 §19.1, RFC 3966), other schemes kept opaque.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::ParseError;
use super::lex;

/// A host as written in a URI or Via.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Host<'a> {
    /// A domain name, as received (compare case-insensitively).
    Name(&'a str),
    V4(Ipv4Addr),
    /// Written as `[...]` on the wire.
    V6(Ipv6Addr),
    /// The URI scheme has no host (tel:, unknown schemes).
    Absent,
}

impl Host<'_> {
    pub fn ip(&self) -> Option<IpAddr> {
        match *self {
            Host::V4(ip) => Some(IpAddr::V4(ip)),
            Host::V6(ip) => Some(IpAddr::V6(ip)),
            Host::Name(_) | Host::Absent => None,
        }
    }
}

impl fmt::Display for Host<'_> {
    /// The wire form: IPv6 in brackets, nothing for `Absent`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::V4(ip) => write!(f, "{ip}"),
            Host::V6(ip) => write!(f, "[{ip}]"),
            Host::Absent => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Sip,
    Sips,
    Tel,
    Other,
}

/// A URI as slices of the message. For sip/sips every part is filled in; for tel the
/// subscriber number is `user` and `host` is `Absent`; for other schemes only
/// `scheme`, `opaque` and `raw` carry data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uri<'a> {
    pub scheme: &'a str,
    /// Still %-escaped; see [`Uri::user_unescaped`].
    pub user: Option<&'a str>,
    pub password: Option<&'a str>,
    pub host: Host<'a>,
    pub port: Option<u16>,
    /// The `;`-separated parameters without the leading `;` (empty if none).
    pub params: &'a str,
    /// The `&`-separated headers without the leading `?` (empty if none).
    pub headers: &'a str,
    /// The whole URI.
    pub raw: &'a str,
    /// Everything after `scheme:`.
    pub opaque: &'a str,
}

/// Bytes a URI may contain unescaped (RFC 3261 §25.1 reserved, unreserved, `%`, and
/// the brackets of IPv6 references). Anything else (space, `<`, `>`, `"`, controls,
/// non-ASCII) means the URI is malformed.
const fn is_uri_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'_'
                | b'.'
                | b'!'
                | b'~'
                | b'*'
                | b'\''
                | b'('
                | b')'
                | b';'
                | b'/'
                | b'?'
                | b':'
                | b'@'
                | b'&'
                | b'='
                | b'+'
                | b'$'
                | b','
                | b'%'
                | b'['
                | b']'
        )
}

const fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'_' | b'.' | b'!' | b'~' | b'*' | b'\'' | b'(' | b')'
        )
}

// Character-set bits of `URI_BYTES`, one per set of the URI grammar, so a run of bytes is
// checked against a set by AND-ing their entries (no branch per byte).
const PARAMCHAR: u8 = 1;
const HNVCHAR: u8 = 2;
const PASSWORD: u8 = 4;
/// Hostnames: RFC 3261 allows letters, digits, `-` and `.`; `_` is tolerated because
/// PBXs put Windows-style host names into Contact.
const HOSTNAME: u8 = 8;
/// Digits and `.`: a host made only of these must be an IPv4 address.
const NUMERIC: u8 = 16;

const fn chars_table() -> [u8; 256] {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let u = is_unreserved(b);
        let mut bits = 0;
        if u || matches!(b, b'%' | b'[' | b']' | b'/' | b':' | b'&' | b'+' | b'$') {
            bits |= PARAMCHAR;
        }
        if u || matches!(b, b'%' | b'[' | b']' | b'/' | b'?' | b':' | b'+' | b'$') {
            bits |= HNVCHAR;
        }
        if u || matches!(b, b'%' | b'&' | b'=' | b'+' | b'$' | b',') {
            bits |= PASSWORD;
        }
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_') {
            bits |= HOSTNAME;
        }
        if b.is_ascii_digit() || b == b'.' {
            bits |= NUMERIC;
        }
        table[i] = bits;
        i += 1;
    }
    table
}

/// Per byte: its class (`uri_class_table`) in the top three bits, its character
/// sets below, so the scan of a URI reads one table per byte.
static URI_BYTES: [u8; 256] = {
    let sets = chars_table();
    let class = uri_class_table();
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = class[i] << CLASS_SHIFT | sets[i];
        i += 1;
    }
    table
};

const CLASS_SHIFT: u32 = 5;
const SETS: u8 = (1 << CLASS_SHIFT) - 1;

/// The character sets `b` belongs to.
#[inline(always)]
fn sets(b: u8) -> u8 {
    URI_BYTES[usize::from(b)] & SETS
}

/// The character sets every byte of `s` belongs to.
#[inline]
fn common_bits(s: &[u8]) -> u8 {
    s.iter().fold(SETS, |acc, &b| acc & sets(b))
}

fn is_paramchar(b: u8) -> bool {
    sets(b) & PARAMCHAR != 0
}

impl<'a> Uri<'a> {
    /// Parses any URI; sip/sips/tel are checked against their grammar.
    #[inline]
    pub fn parse(s: &'a str) -> Result<Uri<'a>, ParseError> {
        parse(s).map_err(|reason| ParseError::BadUri { reason })
    }

    /// A Request-URI: additionally, sip/sips URIs may not carry headers (RFC 3261
    /// §19.1.1 table 1).
    #[inline]
    pub fn parse_request_uri(s: &'a str) -> Result<Uri<'a>, ParseError> {
        let uri = Uri::parse(s)?;
        if uri.is_sip() && !uri.headers.is_empty() {
            return Err(ParseError::BadUri {
                reason: "headers not allowed in Request-URI",
            });
        }
        Ok(uri)
    }

    pub fn kind(&self) -> Scheme {
        scheme_kind(self.scheme)
    }

    /// sip: or sips:
    pub fn is_sip(&self) -> bool {
        matches!(self.kind(), Scheme::Sip | Scheme::Sips)
    }

    /// The user part %-decoded (empty when there is none). Decoded bytes that are not
    /// UTF-8 are replaced with U+FFFD.
    pub fn user_unescaped(&self) -> Cow<'a, str> {
        let user = self.user.unwrap_or("");
        match lex::percent_decode(user) {
            Cow::Borrowed(_) => Cow::Borrowed(user),
            Cow::Owned(bytes) => match String::from_utf8(bytes) {
                Ok(s) => Cow::Owned(s),
                Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
            },
        }
    }

    /// URI parameters as (name, value); names are still %-escaped.
    pub fn params(&self) -> impl Iterator<Item = (&'a str, Option<&'a str>)> + use<'a> {
        self.params
            .split(';')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (p, None),
            })
    }

    /// `Some(None)` for a parameter without value; names compare case-insensitively.
    pub fn param(&self, name: &str) -> Option<Option<&'a str>> {
        self.params()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The `transport` parameter, lower-case comparison left to the caller.
    pub fn transport_param(&self) -> Option<&'a str> {
        self.param("transport").flatten()
    }
}

impl fmt::Display for Uri<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.raw)
    }
}

fn scheme_kind(scheme: &str) -> Scheme {
    // Only `S` and `s` become `s` when bit 0x20 is set (likewise for every letter),
    // so this folding compare is exact for any bytes.
    let fold = |b: &[u8]| {
        b.iter()
            .rev()
            .fold(0u32, |w, &c| w << 8 | u32::from(c | 0x20))
    };
    match scheme.as_bytes() {
        b @ [_, _, _] => match fold(b) {
            0x0070_6973 => Scheme::Sip,
            0x006c_6574 => Scheme::Tel,
            _ => Scheme::Other,
        },
        b @ [_, _, _, _] if fold(b) == 0x7370_6973 => Scheme::Sips,
        _ => Scheme::Other,
    }
}

fn is_scheme_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')
}

#[inline]
pub(crate) fn parse(s: &str) -> Result<Uri<'_>, &'static str> {
    let b = s.as_bytes();
    // `sip:` and `sips:` in any case are recognised in one word compare (only the
    // letters folded, see `lex::FOLD`); any other scheme is scanned.
    let head = lex::load_word(b, 0);
    let mut colon = if head & lex::low_bytes(4) | 0x20_2020 == lex::pack_lower("sip:", 0) {
        3
    } else if head & lex::low_bytes(5) | 0x2020_2020 == lex::pack_lower("sips:", 0) {
        4
    } else {
        0
    };
    while b.get(colon).copied().is_some_and(is_scheme_byte) {
        colon += 1;
    }
    if b.get(colon) != Some(&b':') {
        // The scheme is what precedes the first `:`; if there is one, a byte before
        // it stopped the scan.
        return Err(if b.contains(&b':') {
            "bad scheme"
        } else {
            "missing scheme"
        });
    }
    if !b.first().is_some_and(u8::is_ascii_alphabetic) {
        return Err("bad scheme");
    }
    let (scheme, rest) = lex::split_around(s, colon);
    if rest.is_empty() {
        return Err("empty URI");
    }
    let marks = Marks::scan(rest.as_bytes())?;
    if marks.escaped && !lex::escapes_valid(rest) {
        return Err("invalid escape");
    }
    let mut uri = Uri {
        scheme,
        user: None,
        password: None,
        host: Host::Absent,
        port: None,
        params: "",
        headers: "",
        raw: s,
        opaque: rest,
    };
    match scheme_kind(scheme) {
        Scheme::Sip | Scheme::Sips => parse_sip(&mut uri, &marks)?,
        Scheme::Tel => parse_tel(&mut uri)?,
        Scheme::Other => {}
    }
    Ok(uri)
}

/// Zero, so a plain byte's table entry is below `1 << CLASS_SHIFT`.
const PLAIN: u8 = 0;
const INVALID: u8 = 1;
const AT: u8 = 2;
const PERCENT: u8 = 3;
/// `;` or `?`: where the host part ends.
const DELIM: u8 = 4;
const COLON: u8 = 5;
const BRACKET: u8 = 6;

const fn uri_class_table() -> [u8; 256] {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = match i as u8 {
            b'@' => AT,
            b'%' => PERCENT,
            b';' | b'?' => DELIM,
            b':' => COLON,
            b'[' | b']' => BRACKET,
            b if is_uri_byte(b) => PLAIN,
            _ => INVALID,
        };
        i += 1;
    }
    table
}

/// Offsets in a URI's text after the scheme, found in the one pass that checks every
/// byte, so the sip parts split without looking again.
struct Marks {
    /// The first `@`: the userinfo ends there.
    at: Option<usize>,
    /// The first `;` or `?` after `at` (or anywhere, without `@`).
    delim: Option<usize>,
    /// The first `?` after `at` (or anywhere, without `@`).
    question: Option<usize>,
    /// The first `:` anywhere (the password separator when before `at`).
    colon: Option<usize>,
    /// The first `:` after `at` (or anywhere, without `@`) and before `delim`.
    port_colon: Option<usize>,
    /// The first `[` or `]` anywhere.
    bracket: Option<usize>,
    /// The character sets common to the bytes of the host (from after `at`, or the
    /// start, to `port_colon` or `delim`, or the end).
    host_sets: u8,
    escaped: bool,
}

impl Marks {
    #[inline]
    fn scan(rest: &[u8]) -> Result<Marks, &'static str> {
        let mut m = Marks {
            at: None,
            delim: None,
            question: None,
            colon: None,
            port_colon: None,
            bracket: None,
            host_sets: SETS,
            escaped: false,
        };
        let mut host_sets = None;
        let mut sets = SETS;
        let mut i = 0;
        loop {
            // Most bytes are plain: a tight loop takes them.
            let mut entry = 0;
            while let Some(&b) = rest.get(i) {
                entry = URI_BYTES[usize::from(b)];
                if entry >= 1 << CLASS_SHIFT {
                    break;
                }
                sets &= entry;
                i += 1;
            }
            let Some(&b) = rest.get(i) else {
                break;
            };
            match entry >> CLASS_SHIFT {
                INVALID => return Err("invalid character"),
                AT if m.at.is_none() => {
                    m.at = Some(i);
                    m.delim = None;
                    m.question = None;
                    m.port_colon = None;
                    host_sets = None;
                    sets = SETS;
                    i += 1;
                    continue;
                }
                PERCENT => m.escaped = true,
                DELIM => {
                    if m.delim.is_none() {
                        m.delim = Some(i);
                        host_sets = host_sets.or(Some(sets));
                    }
                    if b == b'?' {
                        m.question = m.question.or(Some(i));
                    }
                }
                COLON => {
                    m.colon = m.colon.or(Some(i));
                    if m.delim.is_none() && m.port_colon.is_none() {
                        m.port_colon = Some(i);
                        host_sets = host_sets.or(Some(sets));
                    }
                }
                BRACKET => m.bracket = m.bracket.or(Some(i)),
                _ => {}
            }
            sets &= entry;
            i += 1;
        }
        m.host_sets = host_sets.unwrap_or(sets);
        Ok(m)
    }
}

#[inline]
fn parse_sip<'a>(uri: &mut Uri<'a>, marks: &Marks) -> Result<(), &'static str> {
    let rest = uri.opaque;
    // The user part may contain `;`, `?` and `/`, but never an unescaped `@`, and no
    // later part may contain `@` either: the first `@` ends the userinfo.
    let host_start = match marks.at {
        Some(at) => {
            let (user, password) = match marks.colon {
                Some(c) if c < at => (
                    rest.get(..c).unwrap_or(""),
                    Some(rest.get(c + 1..at).unwrap_or("")),
                ),
                _ => (rest.get(..at).unwrap_or(""), None),
            };
            if user.is_empty() {
                return Err("empty user");
            }
            if marks.bracket.is_some_and(|i| i < user.len()) {
                return Err("invalid character in user");
            }
            if password.is_some_and(|p| common_bits(p.as_bytes()) & PASSWORD == 0) {
                return Err("invalid character in password");
            }
            uri.user = Some(user);
            uri.password = password;
            at + 1
        }
        None => 0,
    };
    let host_end = marks.delim.unwrap_or(rest.len());
    let hostport = rest.get(host_start..host_end).ok_or("bad host")?;
    (uri.host, uri.port) = if hostport.starts_with('[') {
        parse_hostport(hostport)?
    } else {
        match marks.port_colon {
            Some(c) => {
                let port = parse_port(rest.get(c + 1..host_end).unwrap_or(""))?;
                let host = host_name(rest.get(host_start..c).unwrap_or(""), marks.host_sets)?;
                (host, Some(port))
            }
            None => (host_name(hostport, marks.host_sets)?, None),
        }
    };
    let (params, headers) = match marks.question {
        Some(q) => (
            rest.get(host_end..q).unwrap_or(""),
            Some(rest.get(q + 1..).unwrap_or("")),
        ),
        None => (rest.get(host_end..).unwrap_or(""), None),
    };
    if let Some(p) = params.strip_prefix(';') {
        check_uri_params(p)?;
        uri.params = p;
    }
    if let Some(h) = headers {
        check_uri_headers(h)?;
        uri.headers = h;
    }
    Ok(())
}

fn parse_tel(uri: &mut Uri<'_>) -> Result<(), &'static str> {
    let rest = uri.opaque;
    let (number, params) = match lex::split_once_byte(rest, b';') {
        Some((n, p)) => (n, Some(p)),
        None => (rest, None),
    };
    if number.is_empty() || !number.bytes().all(is_paramchar) {
        return Err("bad telephone number");
    }
    uri.user = Some(number);
    if let Some(p) = params {
        check_uri_params(p)?;
        uri.params = p;
    }
    Ok(())
}

/// `name[=value]` pairs separated by `;`, each part non-empty paramchars; the first
/// bad pair decides the error, its name before its value.
fn check_uri_params(params: &str) -> Result<(), &'static str> {
    let mut name = SETS;
    let mut name_len = 0usize;
    // `Some` once the pair's first `=` is seen.
    let mut value: Option<(u8, usize)> = None;
    for &b in params.as_bytes().iter().chain(std::iter::once(&b';')) {
        match (b, &mut value) {
            (b';', _) => {
                if name_len == 0 || name & PARAMCHAR == 0 {
                    return Err("bad parameter");
                }
                if let Some((bits, len)) = value {
                    if len == 0 || bits & PARAMCHAR == 0 {
                        return Err("bad parameter value");
                    }
                }
                (name, name_len, value) = (SETS, 0, None);
            }
            (b'=', None) => {
                if name_len == 0 || name & PARAMCHAR == 0 {
                    return Err("bad parameter");
                }
                value = Some((SETS, 0));
            }
            (_, None) => {
                name &= sets(b);
                name_len += 1;
            }
            (_, Some((bits, len))) => {
                *bits &= sets(b);
                *len += 1;
            }
        }
    }
    Ok(())
}

fn check_uri_headers(headers: &str) -> Result<(), &'static str> {
    for h in headers.split('&') {
        let (name, value) = lex::split_once_byte(h, b'=').ok_or("bad header")?;
        if name.is_empty()
            || common_bits(name.as_bytes()) & common_bits(value.as_bytes()) & HNVCHAR == 0
        {
            return Err("bad header");
        }
    }
    Ok(())
}

pub(crate) fn parse_hostport(hp: &str) -> Result<(Host<'_>, Option<u16>), &'static str> {
    if let Some(after_bracket) = hp.strip_prefix('[') {
        let (inner, after) =
            lex::split_once_byte(after_bracket, b']').ok_or("unterminated IPv6 reference")?;
        let ip = inner.parse::<Ipv6Addr>().map_err(|_| "bad IPv6 address")?;
        let port = match after {
            "" => None,
            _ => Some(parse_port(after.strip_prefix(':').ok_or("bad port")?)?),
        };
        return Ok((Host::V6(ip), port));
    }
    let (host, port) = match lex::split_once_byte(hp, b':') {
        Some((h, p)) => (h, Some(parse_port(p)?)),
        None => (hp, None),
    };
    Ok((parse_host_name(host)?, port))
}

/// A hostname or IPv4 address (not an IPv6 reference).
pub(crate) fn parse_host_name(host: &str) -> Result<Host<'_>, &'static str> {
    host_name(host, common_bits(host.as_bytes()))
}

/// The hostname or IPv4 address that starts at `s[from]` and runs while the bytes
/// are hostname bytes: (where it ends, the host).
pub(crate) fn host_run(s: &str, from: usize) -> Result<(usize, Host<'_>), &'static str> {
    let b = s.as_bytes();
    let mut end = from;
    let mut bits = SETS;
    while let Some(&c) = b.get(end) {
        let e = sets(c);
        if e & HOSTNAME == 0 {
            break;
        }
        bits &= e;
        end += 1;
    }
    Ok((end, host_name(s.get(from..end).unwrap_or(""), bits)?))
}

/// [`parse_host_name`] for a host whose bytes' common character sets are known.
fn host_name(host: &str, bits: u8) -> Result<Host<'_>, &'static str> {
    if host.is_empty() {
        return Err("empty host");
    }
    if bits & HOSTNAME == 0 {
        return Err("bad host");
    }
    // A name's top label starts with a letter, so digits and dots alone must be an
    // IPv4 address: this is what refuses `sip:2001:db8::10` (RFC 5118 §4.2).
    if bits & NUMERIC != 0 {
        return parse_ipv4(host.as_bytes())
            .map(Host::V4)
            .ok_or("bad IPv4 address");
    }
    Ok(Host::Name(host))
}

/// Dotted-quad IPv4 as `Ipv4Addr::from_str` reads it (four decimal octets of one to
/// three digits, no leading zero), in one pass without its generic parser.
pub(crate) fn parse_ipv4(s: &[u8]) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut n = 0;
    let mut value = 0u32;
    let mut digits = 0;
    for &c in s {
        if c == b'.' {
            if digits == 0 {
                return None;
            }
            *octets.get_mut(n)? = value as u8;
            n += 1;
            (value, digits) = (0, 0);
        } else {
            let d = c.wrapping_sub(b'0');
            // A second digit after a leading 0 is refused, as std does.
            if d > 9 || (digits > 0 && value == 0) {
                return None;
            }
            value = value * 10 + u32::from(d);
            digits += 1;
            if value > 255 {
                return None;
            }
        }
    }
    if n != 3 || digits == 0 {
        return None;
    }
    *octets.get_mut(3)? = value as u8;
    Some(Ipv4Addr::from(octets))
}

pub(crate) fn parse_port(p: &str) -> Result<u16, &'static str> {
    if p.is_empty() || p.len() > 5 {
        return Err("bad port");
    }
    let mut n = 0u32;
    for b in p.bytes() {
        if !b.is_ascii_digit() {
            return Err("bad port");
        }
        n = n * 10 + u32::from(b - b'0');
    }
    u16::try_from(n).map_err(|_| "bad port")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(s: &str) -> Host<'static> {
        Host::V6(s.parse().unwrap_or(Ipv6Addr::UNSPECIFIED))
    }

    #[test]
    fn sip_uris_split_into_parts() {
        // (uri, user, password, host, port, params, headers)
        type Row<'a> = (
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            Host<'a>,
            Option<u16>,
            &'a str,
            &'a str,
        );
        let cases: &[Row] = &[
            (
                "sip:user@example.com",
                Some("user"),
                None,
                Host::Name("example.com"),
                None,
                "",
                "",
            ),
            (
                "SIP:a:pw@10.0.0.1:5070;lr",
                Some("a"),
                Some("pw"),
                Host::V4(Ipv4Addr::new(10, 0, 0, 1)),
                Some(5070),
                "lr",
                "",
            ),
            (
                "sips:[2001:db8::10]:5070",
                None,
                None,
                v6("2001:db8::10"),
                Some(5070),
                "",
                "",
            ),
            (
                "sip:[2001:db8::10:5070]",
                None,
                None,
                v6("2001:db8::10:5070"),
                None,
                "",
                "",
            ),
            (
                "sip:user;par=u%40example.net@example.com",
                Some("user;par=u%40example.net"),
                None,
                Host::Name("example.com"),
                None,
                "",
                "",
            ),
            (
                "sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com",
                Some("1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"),
                Some("&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"),
                Host::Name("example.com"),
                None,
                "",
                "",
            ),
            (
                "sip:user@example.com?Route=%3Csip:sip.example.com%3E",
                Some("user"),
                None,
                Host::Name("example.com"),
                None,
                "",
                "Route=%3Csip:sip.example.com%3E",
            ),
            (
                "sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31",
                Some("cal%6Cer"),
                None,
                Host::Name("host5.example.net"),
                None,
                "%6C%72;n%61me=v%61lue%25%34%31",
                "",
            ),
            (
                "sip:pbx_1.local",
                None,
                None,
                Host::Name("pbx_1.local"),
                None,
                "",
                "",
            ),
        ];
        for &(input, user, password, host, port, params, headers) in cases {
            let uri = Uri::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(uri.user, user, "{input}");
            assert_eq!(uri.password, password, "{input}");
            assert_eq!(uri.host, host, "{input}");
            assert_eq!(uri.port, port, "{input}");
            assert_eq!(uri.params, params, "{input}");
            assert_eq!(uri.headers, headers, "{input}");
            assert_eq!(uri.raw, input);
        }
    }

    #[test]
    fn malformed_uris_are_refused() {
        let cases = [
            "<sip:user@example.com>",
            " sip:t.watson@example.org ",
            "sip:user@example.com; lr",
            "sip:2001:db8::10",
            "sip:user@[2001:db8:::192.0.2.1]",
            "sip:user@[2001:db8::1",
            "sip:@example.com",
            "sip:user@",
            "sip:user@host:99999",
            "sip:user@host:",
            "sip:user@host;;lr",
            "sip:user@host;=x",
            "sip:user@host;a=",
            "sip:user@host?",
            "sip:user@host?noequals",
            "sip:user@host;x=a@b",
            "sip:us%4gr@host",
            "sip:user@999.1.1.1",
            "sip:user@exa mple.com",
            "sip:",
            ":opaque",
            "1abc:x",
            "tel:",
            "sip:us\u{e9}r@host",
            "sip:user@host\"",
        ];
        for input in cases {
            assert!(Uri::parse(input).is_err(), "{input:?} should be refused");
        }
    }

    #[test]
    fn other_schemes_stay_opaque() {
        let cases = [
            (
                "nobodyKnowsThisScheme:totallyopaquecontent",
                "totallyopaquecontent",
            ),
            ("soap.beep://192.0.2.103:3002", "//192.0.2.103:3002"),
            ("http://www.example.com", "//www.example.com"),
            ("isbn:2983792873", "2983792873"),
        ];
        for (input, opaque) in cases {
            let uri = Uri::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(uri.kind(), Scheme::Other);
            assert_eq!(uri.opaque, opaque);
            assert_eq!(uri.host, Host::Absent);
        }
    }

    #[test]
    fn tel_uris_keep_the_number_as_user() {
        let uri = Uri::parse("tel:+1-201-555-0123;phone-context=example.com")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(uri.kind(), Scheme::Tel);
        assert_eq!(uri.user, Some("+1-201-555-0123"));
        assert_eq!(uri.param("phone-context"), Some(Some("example.com")));
    }

    #[test]
    fn request_uri_refuses_headers_only_for_sip() {
        assert!(
            Uri::parse_request_uri("sip:user@example.com?Route=%3Csip:example.com%3E").is_err()
        );
        assert!(Uri::parse_request_uri("sip:user@example.com;lr").is_ok());
        assert!(Uri::parse_request_uri("http://example.com/?q=1").is_ok());
    }

    #[test]
    fn params_and_unescaping() {
        let uri = Uri::parse("sip:%75se%72@example.com;Transport=TCP;lr;maddr=10.0.0.1")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(uri.user_unescaped(), "user");
        assert_eq!(uri.param("transport"), Some(Some("TCP")));
        assert_eq!(uri.transport_param(), Some("TCP"));
        assert_eq!(uri.param("lr"), Some(None));
        assert_eq!(uri.param("ttl"), None);
        let plain = Uri::parse("sip:+15551230000@example.com").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            plain.user_unescaped(),
            Cow::Borrowed("+15551230000")
        ));
        let bad_utf8 = Uri::parse("sip:%ff@example.com").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bad_utf8.user_unescaped(), "\u{fffd}");
        let nul = Uri::parse("sip:null-%00-null@example.com").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(nul.user_unescaped(), "null-\0-null");
    }

    #[test]
    fn ipv4_reading_agrees_with_std() {
        let mut inputs: Vec<String> = [
            "1.2.3.4",
            "255.255.255.255",
            "0.0.0.0",
            "256.1.1.1",
            "01.2.3.4",
            "1.2.3",
            "1.2.3.4.5",
            "1..2.3",
            ".1.2.3",
            "1.2.3.",
            "1000.1.1.1",
            "0001.1.1.1",
            "1.2.3.04",
            "",
            ".",
            "...",
            "12.34.56.789",
            "99.99.99.99",
            "1.2.3.4a",
            "1.2.3.+4",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Every string of digits and dots up to six bytes, from a small alphabet.
        let alphabet = ['0', '1', '2', '5', '9', '.'];
        let mut frontier = vec![String::new()];
        for _ in 0..6 {
            let mut next = Vec::new();
            for s in &frontier {
                for c in alphabet {
                    next.push(format!("{s}{c}"));
                }
            }
            inputs.extend(next.iter().cloned());
            frontier = next;
        }
        for octet in ["0", "00", "7", "07", "25", "255", "256", "300"] {
            inputs.push(format!("{octet}.{octet}.{octet}.{octet}"));
        }
        for input in inputs {
            assert_eq!(
                parse_ipv4(input.as_bytes()),
                input.parse::<Ipv4Addr>().ok(),
                "{input:?}"
            );
        }
    }

    #[test]
    fn host_display_brackets_ipv6() {
        assert_eq!(v6("2001:db8::1").to_string(), "[2001:db8::1]");
        assert_eq!(Host::V4(Ipv4Addr::LOCALHOST).to_string(), "127.0.0.1");
        assert_eq!(Host::Name("a.example").to_string(), "a.example");
    }
}
