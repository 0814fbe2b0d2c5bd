//! Header names (long and compact forms) and the splitting of list-valued headers.

use std::borrow::Cow;

use super::lex::{self, Split};

/// A header field name. Known names match their long and compact forms
/// case-insensitively; `Other` matches any other name case-insensitively (and is
/// normalised to the known variant when it spells one, so `Other("l")` finds
/// Content-Length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderName {
    Via,
    From,
    To,
    CallId,
    CSeq,
    Contact,
    Expires,
    MinExpires,
    MaxForwards,
    ContentLength,
    ContentType,
    ContentEncoding,
    Authorization,
    ProxyAuthorization,
    WwwAuthenticate,
    ProxyAuthenticate,
    Route,
    RecordRoute,
    Allow,
    Supported,
    Unsupported,
    Require,
    ProxyRequire,
    Accept,
    UserAgent,
    Server,
    Subject,
    Date,
    Event,
    AllowEvents,
    ReferTo,
    ReferredBy,
    SessionExpires,
    AcceptContact,
    RejectContact,
    RequestDisposition,
    Identity,
    IdentityInfo,
    Other(&'static str),
}

use HeaderName as H;

/// Every known name, for tests and for callers that want to enumerate them.
pub const KNOWN_HEADERS: &[HeaderName] = &[
    H::Via,
    H::From,
    H::To,
    H::CallId,
    H::CSeq,
    H::Contact,
    H::Expires,
    H::MinExpires,
    H::MaxForwards,
    H::ContentLength,
    H::ContentType,
    H::ContentEncoding,
    H::Authorization,
    H::ProxyAuthorization,
    H::WwwAuthenticate,
    H::ProxyAuthenticate,
    H::Route,
    H::RecordRoute,
    H::Allow,
    H::Supported,
    H::Unsupported,
    H::Require,
    H::ProxyRequire,
    H::Accept,
    H::UserAgent,
    H::Server,
    H::Subject,
    H::Date,
    H::Event,
    H::AllowEvents,
    H::ReferTo,
    H::ReferredBy,
    H::SessionExpires,
    H::AcceptContact,
    H::RejectContact,
    H::RequestDisposition,
    H::Identity,
    H::IdentityInfo,
];

/// Unknown-to-the-enum headers whose grammar is a comma-separated list.
const OTHER_LIST_HEADERS: &[&str] = &[
    "Accept-Encoding",
    "Accept-Language",
    "Content-Language",
    "In-Reply-To",
    "Alert-Info",
    "Call-Info",
    "Error-Info",
    "Warning",
    "Path",
    "Service-Route",
    "Reason",
    "Security-Client",
    "Security-Server",
    "Security-Verify",
    "P-Associated-URI",
    "P-Asserted-Identity",
    "P-Preferred-Identity",
    "History-Info",
];

impl HeaderName {
    /// The canonical long name.
    pub fn as_str(&self) -> &'static str {
        self.long_name()
    }

    /// [`HeaderName::as_str`], usable in constants.
    const fn long_name(self) -> &'static str {
        match self {
            H::Via => "Via",
            H::From => "From",
            H::To => "To",
            H::CallId => "Call-ID",
            H::CSeq => "CSeq",
            H::Contact => "Contact",
            H::Expires => "Expires",
            H::MinExpires => "Min-Expires",
            H::MaxForwards => "Max-Forwards",
            H::ContentLength => "Content-Length",
            H::ContentType => "Content-Type",
            H::ContentEncoding => "Content-Encoding",
            H::Authorization => "Authorization",
            H::ProxyAuthorization => "Proxy-Authorization",
            H::WwwAuthenticate => "WWW-Authenticate",
            H::ProxyAuthenticate => "Proxy-Authenticate",
            H::Route => "Route",
            H::RecordRoute => "Record-Route",
            H::Allow => "Allow",
            H::Supported => "Supported",
            H::Unsupported => "Unsupported",
            H::Require => "Require",
            H::ProxyRequire => "Proxy-Require",
            H::Accept => "Accept",
            H::UserAgent => "User-Agent",
            H::Server => "Server",
            H::Subject => "Subject",
            H::Date => "Date",
            H::Event => "Event",
            H::AllowEvents => "Allow-Events",
            H::ReferTo => "Refer-To",
            H::ReferredBy => "Referred-By",
            H::SessionExpires => "Session-Expires",
            H::AcceptContact => "Accept-Contact",
            H::RejectContact => "Reject-Contact",
            H::RequestDisposition => "Request-Disposition",
            H::Identity => "Identity",
            H::IdentityInfo => "Identity-Info",
            H::Other(name) => name,
        }
    }

    /// The compact form (RFC 3261 §7.3.3 and the extensions that define one).
    pub fn compact(&self) -> Option<char> {
        Some(match self {
            H::AcceptContact => 'a',
            H::ReferredBy => 'b',
            H::ContentType => 'c',
            H::RequestDisposition => 'd',
            H::ContentEncoding => 'e',
            H::From => 'f',
            H::CallId => 'i',
            H::RejectContact => 'j',
            H::Supported => 'k',
            H::ContentLength => 'l',
            H::Contact => 'm',
            H::IdentityInfo => 'n',
            H::Event => 'o',
            H::ReferTo => 'r',
            H::Subject => 's',
            H::To => 't',
            H::AllowEvents => 'u',
            H::Via => 'v',
            H::SessionExpires => 'x',
            H::Identity => 'y',
            _ => return None,
        })
    }

    /// Classifies a name as received (long or compact, any case); `None` if unknown.
    pub fn from_name(name: &str) -> Option<HeaderName> {
        if !lex::is_token(name) {
            return None;
        }
        HeaderName::from_token(name.as_bytes())
    }

    /// [`HeaderName::from_name`] for a name already known to be a token.
    pub(crate) fn from_token(name: &[u8]) -> Option<HeaderName> {
        let (len, known) = HeaderName::scan(name);
        if len == name.len() { known } else { None }
    }

    /// Reads the token that starts `field` and classifies it: (its length, the
    /// known name it spells). One pass, as it runs on every header received.
    #[inline]
    pub(crate) fn scan(field: &[u8]) -> (usize, Option<HeaderName>) {
        let len = lex::skip_token(field, 0);
        (len, classify(field, len))
    }
}

/// The known name that the token `field[..len]` spells (long or compact form, any
/// case); bytes after the token may be read but do not count.
#[inline]
fn classify(field: &[u8], len: usize) -> Option<HeaderName> {
    // Length and first letter leave at most one candidate (two for 7-letter `c`),
    // so a name costs one comparison instead of a search. Setting bit 0x20 only
    // turns upper-case letters into letters.
    let first = field.first()? | 0x20;
    let candidate = match (len, first) {
        (1, _) => return compact(first),
        (2, b't') => H::To,
        (3, b'v') => H::Via,
        (4, b'f') => H::From,
        (4, b'c') => H::CSeq,
        (4, b'd') => H::Date,
        (5, b'r') => H::Route,
        (5, b'a') => H::Allow,
        (5, b'e') => H::Event,
        (6, b'a') => H::Accept,
        (6, b's') => H::Server,
        (7, b'c') if field.get(6).is_some_and(|b| b | 0x20 == b'd') => H::CallId,
        (7, b'c') => H::Contact,
        (7, b'e') => H::Expires,
        (7, b'r') => H::Require,
        (7, b's') => H::Subject,
        (8, b'r') => H::ReferTo,
        (8, b'i') => H::Identity,
        (9, b's') => H::Supported,
        (10, b'u') => H::UserAgent,
        (11, b'm') => H::MinExpires,
        (11, b'u') => H::Unsupported,
        (11, b'r') => H::ReferredBy,
        (12, b'm') => H::MaxForwards,
        (12, b'c') => H::ContentType,
        (12, b'r') => H::RecordRoute,
        (12, b'a') => H::AllowEvents,
        (13, b'a') => H::Authorization,
        (13, b'p') => H::ProxyRequire,
        (13, b'i') => H::IdentityInfo,
        (14, b'c') => H::ContentLength,
        (14, b'a') => H::AcceptContact,
        (14, b'r') => H::RejectContact,
        (15, b's') => H::SessionExpires,
        (16, b'c') => H::ContentEncoding,
        (16, b'w') => H::WwwAuthenticate,
        (18, b'p') => H::ProxyAuthenticate,
        (19, b'p') => H::ProxyAuthorization,
        (19, b'r') => H::RequestDisposition,
        _ => return None,
    };
    let packed = PACKED.get(usize::from(candidate.id()?))?;
    eq_packed(field, len, packed).then_some(candidate)
}

/// The long names lower-cased and packed little-endian into words, in
/// [`KNOWN_HEADERS`] order, so a received name is compared eight bytes at a time.
static PACKED: [[u64; 3]; KNOWN_HEADERS.len()] = {
    let mut table = [[0u64; 3]; KNOWN_HEADERS.len()];
    let mut h = 0;
    while h < KNOWN_HEADERS.len() {
        let name = KNOWN_HEADERS[h].long_name().as_bytes();
        let mut i = 0;
        while i < name.len() && i < 24 {
            table[h][i / 8] |= (name[i].to_ascii_lowercase() as u64) << (8 * (i % 8));
            i += 1;
        }
        h += 1;
    }
    table
};

// The longest known name must fit the packed words.
const _: () = {
    let mut h = 0;
    while h < KNOWN_HEADERS.len() {
        assert!(KNOWN_HEADERS[h].long_name().len() <= 24);
        h += 1;
    }
};

/// Eight bytes of `b` from `at`, little-endian, zero past the end.
#[inline]
fn load(b: &[u8], at: usize) -> u64 {
    match b.get(at..at + 8).map(<[u8; 8]>::try_from) {
        Some(Ok(word)) => u64::from_le_bytes(word),
        _ => b
            .iter()
            .skip(at)
            .take(8)
            .enumerate()
            .fold(0, |w, (i, &c)| w | u64::from(c) << (8 * i)),
    }
}

/// Whether the token `field[..len]` is, in any case, the name `packed` holds (which
/// has `len` bytes). For token bytes, setting bit 0x20 maps exactly the upper-case
/// letters onto lower-case ones and leaves `-` alone (only CR, not a token byte,
/// would also reach `-`), so one OR folds eight bytes.
#[inline]
fn eq_packed(field: &[u8], len: usize, packed: &[u64; 3]) -> bool {
    const FOLD: u64 = 0x2020_2020_2020_2020;
    let mut at = 0;
    for &want in packed {
        if at >= len {
            break;
        }
        let keep = match len - at {
            n if n >= 8 => u64::MAX,
            n => (1u64 << (8 * n)) - 1,
        };
        if (load(field, at) | FOLD) & keep != want {
            return false;
        }
        at += 8;
    }
    true
}

/// The known name a lower-cased one-letter name stands for.
fn compact(lower: u8) -> Option<HeaderName> {
    Some(match lower {
        b'a' => H::AcceptContact,
        b'b' => H::ReferredBy,
        b'c' => H::ContentType,
        b'd' => H::RequestDisposition,
        b'e' => H::ContentEncoding,
        b'f' => H::From,
        b'i' => H::CallId,
        b'j' => H::RejectContact,
        b'k' => H::Supported,
        b'l' => H::ContentLength,
        b'm' => H::Contact,
        b'n' => H::IdentityInfo,
        b'o' => H::Event,
        b'r' => H::ReferTo,
        b's' => H::Subject,
        b't' => H::To,
        b'u' => H::AllowEvents,
        b'v' => H::Via,
        b'x' => H::SessionExpires,
        b'y' => H::Identity,
        _ => return None,
    })
}

impl HeaderName {
    /// Position in [`KNOWN_HEADERS`]; `None` for `Other`.
    pub(crate) const fn id(self) -> Option<u8> {
        Some(match self {
            H::Via => 0,
            H::From => 1,
            H::To => 2,
            H::CallId => 3,
            H::CSeq => 4,
            H::Contact => 5,
            H::Expires => 6,
            H::MinExpires => 7,
            H::MaxForwards => 8,
            H::ContentLength => 9,
            H::ContentType => 10,
            H::ContentEncoding => 11,
            H::Authorization => 12,
            H::ProxyAuthorization => 13,
            H::WwwAuthenticate => 14,
            H::ProxyAuthenticate => 15,
            H::Route => 16,
            H::RecordRoute => 17,
            H::Allow => 18,
            H::Supported => 19,
            H::Unsupported => 20,
            H::Require => 21,
            H::ProxyRequire => 22,
            H::Accept => 23,
            H::UserAgent => 24,
            H::Server => 25,
            H::Subject => 26,
            H::Date => 27,
            H::Event => 28,
            H::AllowEvents => 29,
            H::ReferTo => 30,
            H::ReferredBy => 31,
            H::SessionExpires => 32,
            H::AcceptContact => 33,
            H::RejectContact => 34,
            H::RequestDisposition => 35,
            H::Identity => 36,
            H::IdentityInfo => 37,
            H::Other(_) => return None,
        })
    }

    /// `Other` spelling a known name becomes that name.
    pub(crate) fn canonical(self) -> HeaderName {
        match self {
            H::Other(name) => HeaderName::from_name(name).unwrap_or(self),
            known => known,
        }
    }

    /// Whether the header's grammar is a comma-separated list (RFC 3261 §7.3.1).
    pub fn is_list(&self) -> bool {
        match self {
            H::Via
            | H::Contact
            | H::Route
            | H::RecordRoute
            | H::Allow
            | H::Supported
            | H::Unsupported
            | H::Require
            | H::ProxyRequire
            | H::Accept
            | H::ContentEncoding
            | H::AllowEvents
            | H::AcceptContact
            | H::RejectContact
            | H::RequestDisposition => true,
            H::Other(name) => OTHER_LIST_HEADERS
                .iter()
                .any(|l| l.eq_ignore_ascii_case(name)),
            _ => false,
        }
    }

    /// Does a received field match `self` (which must be canonical)? `name` is only
    /// read for `Other`.
    pub(crate) fn matches<'a>(self, known: Option<u8>, name: impl FnOnce() -> &'a str) -> bool {
        match self {
            H::Other(other) => known.is_none() && name().eq_ignore_ascii_case(other),
            h => known.is_some() && known == h.id(),
        }
    }
}

impl std::fmt::Display for HeaderName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One header field as received: `name` as spelled on the wire (whitespace before
/// the colon removed) and `value` with surrounding linear whitespace removed. A
/// folded value keeps its inner CRLF+WS; see [`unfold`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    pub name: &'a str,
    pub value: &'a str,
    /// Line of the message where the field starts (the start line is line 1).
    pub line: usize,
    /// The known name this field carries, if any.
    pub known: Option<HeaderName>,
}

/// A header field as stored in a message: offsets into its header text, so parsing
/// validates UTF-8 once for the whole block instead of once per field. The header
/// text is under [`MAX_HEAD_LEN`](super::MAX_HEAD_LEN) (64 KiB) long, so offsets and
/// line numbers fit 16 bits, which keeps the table of a message small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Entry {
    pub name: (u16, u16),
    pub value: (u16, u16),
    pub line: u16,
    /// [`HeaderName::id`] of the name, if known.
    pub known: Option<u8>,
}

impl Entry {
    pub(crate) fn header<'a>(&self, text: &'a str) -> Header<'a> {
        Header {
            name: slice(text, self.name),
            value: self.value(text),
            line: usize::from(self.line),
            known: self
                .known
                .and_then(|id| KNOWN_HEADERS.get(usize::from(id)).copied()),
        }
    }

    #[inline]
    pub(crate) fn value<'a>(&self, text: &'a str) -> &'a str {
        slice(text, self.value)
    }
}

#[inline]
fn slice(text: &str, (a, b): (u16, u16)) -> &str {
    text.get(usize::from(a)..usize::from(b)).unwrap_or("")
}

/// The elements of one header value: the whole value for a single-valued header, or
/// the non-empty trimmed comma-separated elements of a list header.
#[derive(Debug, Clone)]
pub(crate) enum Elements<'a> {
    One(Option<&'a str>),
    List(Split<'a>),
}

impl<'a> Elements<'a> {
    pub(crate) fn new(value: &'a str, list: bool) -> Self {
        if list {
            Elements::List(Split::commas(value))
        } else {
            Elements::One(Some(value))
        }
    }
}

impl<'a> Iterator for Elements<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        match self {
            Elements::One(v) => v.take(),
            Elements::List(split) => split.by_ref().map(lex::trim_lws).find(|e| !e.is_empty()),
        }
    }
}

/// Replaces each fold (CRLF followed by whitespace) with a single space, borrowing
/// when the value was not folded.
pub fn unfold(value: &str) -> Cow<'_, str> {
    if !value.contains(['\r', '\n']) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len());
    // RFC 3261 §7.3.1: a fold (with the whitespace around it) means one SP.
    for (i, piece) in value.split("\r\n").enumerate() {
        if i == 0 {
            out.push_str(piece.trim_end_matches([' ', '\t']));
        } else {
            out.push(' ');
            out.push_str(piece.trim_matches([' ', '\t']));
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_name_round_trips_in_any_case_and_compact_form() {
        for &h in KNOWN_HEADERS {
            assert_eq!(HeaderName::from_name(h.as_str()), Some(h), "{h:?}");
            assert_eq!(
                HeaderName::from_name(&h.as_str().to_ascii_uppercase()),
                Some(h)
            );
            if let Some(c) = h.compact() {
                assert_eq!(HeaderName::from_name(&c.to_string()), Some(h));
                assert_eq!(
                    HeaderName::from_name(&c.to_ascii_uppercase().to_string()),
                    Some(h)
                );
            }
        }
    }

    #[test]
    fn ids_index_known_headers() {
        for (i, h) in KNOWN_HEADERS.iter().enumerate() {
            assert_eq!(h.id().map(usize::from), Some(i), "{h:?}");
        }
        assert_eq!(H::Other("X").id(), None);
    }

    #[test]
    fn unknown_names_are_not_classified() {
        for name in [
            "",
            "C%6Fntact",
            "Vias",
            "z",
            "Content-Lengths",
            "X-Foo",
            "Content\rLength",
            "Content\nLength",
            "Content_Length",
            "Content\x0dLength",
            "Call-I\x04",
            "To\r",
        ] {
            assert_eq!(HeaderName::from_name(name), None, "{name:?}");
        }
    }

    #[test]
    fn other_spelling_a_known_name_is_canonicalised() {
        let cases = [
            (H::Other("l"), H::ContentLength),
            (H::Other("call-id"), H::CallId),
            (H::Other("X-Custom"), H::Other("X-Custom")),
        ];
        for (input, want) in cases {
            assert_eq!(input.canonical(), want);
        }
    }

    #[test]
    fn list_elements_skip_empties_and_trim() {
        let cases: &[(&str, bool, &[&str])] = &[
            (" a , b ,,c ", true, &["a", "b", "c"]),
            ("Fri, 01 Jan 2010", false, &["Fri, 01 Jan 2010"]),
            ("", false, &[""]),
            ("", true, &[]),
            (
                "\"x, y\" <sip:a@b>, <sip:c@d>",
                true,
                &["\"x, y\" <sip:a@b>", "<sip:c@d>"],
            ),
        ];
        for (input, list, want) in cases {
            let got: Vec<&str> = Elements::new(input, *list).collect();
            assert_eq!(&got, want, "input {input:?}");
        }
    }

    #[test]
    fn unfold_joins_continuation_lines() {
        let cases = [
            ("plain", "plain"),
            ("a,\r\n        b", "a, b"),
            ("SIP  /   2.0\r\n /UDP", "SIP  /   2.0 /UDP"),
            ("x  \r\n\ty", "x y"),
        ];
        for (input, want) in cases {
            assert_eq!(unfold(input), want, "input {input:?}");
        }
    }
}
