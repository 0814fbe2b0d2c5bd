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
        let (len, id) = scan(name);
        if len == name.len() { known(id?) } else { None }
    }
}

/// The known header with [`HeaderName::id`] `id`.
#[inline]
pub(crate) fn known(id: u8) -> Option<HeaderName> {
    KNOWN_HEADERS.get(usize::from(id)).copied()
}

/// Reads the token that starts `field` and classifies it: (its length, the
/// [`HeaderName::id`] of the known name it spells). One pass, as it runs on every
/// header received.
#[inline]
pub(crate) fn scan(field: &[u8]) -> (usize, Option<u8>) {
    let len = lex::skip_token(field, 0);
    (len, classify(field, len))
}

/// Where the first `:` of `field` is, if within the length of a known name: the
/// name's length when the colon follows it directly (found eight bytes a step).
/// The bytes before it are not checked: only a match with a known name makes them
/// a name.
#[inline]
pub(crate) fn colon_in_name(field: &[u8]) -> Option<usize> {
    (0..3).find_map(|i| {
        let hit = lex::first_equal(lex::load_word(field, 8 * i), b':')?;
        Some(8 * i + hit).filter(|&len| len > 0 && len < field.len())
    })
}

/// The [`HeaderName::id`] of the known name that `field[..len]` spells (long or
/// compact form, any case); bytes after it may be read but do not count. Exact for
/// any bytes, so callers may classify before checking that the name is a token.
#[inline(always)]
pub(crate) fn classify(field: &[u8], len: usize) -> Option<u8> {
    // Length and first letter leave at most one candidate (two for 7-letter `c`),
    // so a name costs one comparison instead of a search. Setting bit 0x20 only
    // turns upper-case letters into letters.
    let first = field.first()? | 0x20;
    let id = match (len, first) {
        (1, _) => return compact(first).and_then(HeaderName::id),
        (2, b't') => const { id(H::To) },
        (3, b'v') => const { id(H::Via) },
        (4, b'f') => const { id(H::From) },
        (4, b'c') => const { id(H::CSeq) },
        (4, b'd') => const { id(H::Date) },
        (5, b'r') => const { id(H::Route) },
        (5, b'a') => const { id(H::Allow) },
        (5, b'e') => const { id(H::Event) },
        (6, b'a') => const { id(H::Accept) },
        (6, b's') => const { id(H::Server) },
        (7, b'c') if field.get(6).is_some_and(|b| b | 0x20 == b'd') => const { id(H::CallId) },
        (7, b'c') => const { id(H::Contact) },
        (7, b'e') => const { id(H::Expires) },
        (7, b'r') => const { id(H::Require) },
        (7, b's') => const { id(H::Subject) },
        (8, b'r') => const { id(H::ReferTo) },
        (8, b'i') => const { id(H::Identity) },
        (9, b's') => const { id(H::Supported) },
        (10, b'u') => const { id(H::UserAgent) },
        (11, b'm') => const { id(H::MinExpires) },
        (11, b'u') => const { id(H::Unsupported) },
        (11, b'r') => const { id(H::ReferredBy) },
        (12, b'm') => const { id(H::MaxForwards) },
        (12, b'c') => const { id(H::ContentType) },
        (12, b'r') => const { id(H::RecordRoute) },
        (12, b'a') => const { id(H::AllowEvents) },
        (13, b'a') => const { id(H::Authorization) },
        (13, b'p') => const { id(H::ProxyRequire) },
        (13, b'i') => const { id(H::IdentityInfo) },
        (14, b'c') => const { id(H::ContentLength) },
        (14, b'a') => const { id(H::AcceptContact) },
        (14, b'r') => const { id(H::RejectContact) },
        (15, b's') => const { id(H::SessionExpires) },
        (16, b'c') => const { id(H::ContentEncoding) },
        (16, b'w') => const { id(H::WwwAuthenticate) },
        (18, b'p') => const { id(H::ProxyAuthenticate) },
        (19, b'p') => const { id(H::ProxyAuthorization) },
        (19, b'r') => const { id(H::RequestDisposition) },
        _ => return None,
    };
    eq_packed(field, len, id).then_some(id)
}

/// The long names lower-cased and packed little-endian into words, in
/// [`KNOWN_HEADERS`] order, so a received name is compared eight bytes at a time.
static PACKED: [[u64; 3]; KNOWN_HEADERS.len()] = {
    let mut table = [[0u64; 3]; KNOWN_HEADERS.len()];
    let mut h = 0;
    while h < KNOWN_HEADERS.len() {
        let name = KNOWN_HEADERS[h].long_name();
        let mut w = 0;
        while w < 3 {
            table[h][w] = lex::pack_lower(name, 8 * w);
            w += 1;
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

/// For each name length, the bytes of the three packed words that belong to it.
static KEEP: [[u64; 3]; 25] = {
    let mut table = [[0u64; 3]; 25];
    let mut len = 0;
    while len <= 24 {
        let mut i = 0;
        while i < len {
            table[len][i / 8] |= 0xff << (8 * (i % 8));
            i += 1;
        }
        len += 1;
    }
    table
};

/// The bytes of each packed name that are `-`.
static DASHES: [[u64; 3]; KNOWN_HEADERS.len()] = {
    let mut table = [[0u64; 3]; KNOWN_HEADERS.len()];
    let mut h = 0;
    while h < KNOWN_HEADERS.len() {
        let name = KNOWN_HEADERS[h].long_name().as_bytes();
        let mut i = 0;
        while i < name.len() {
            if name[i] == b'-' {
                table[h][i / 8] |= 0xff << (8 * (i % 8));
            }
            i += 1;
        }
        h += 1;
    }
    table
};

/// Whether `field[..len]` is, in any case, the name with id `id` (which has `len`
/// bytes). Folding with [`lex::FOLD`] matches letters exactly; a `-` must be one
/// exactly (CR would fold onto it).
#[inline]
fn eq_packed(field: &[u8], len: usize, id: u8) -> bool {
    let (Some(keep), Some(packed), Some(dashes)) = (
        KEEP.get(len),
        PACKED.get(usize::from(id)),
        DASHES.get(usize::from(id)),
    ) else {
        return false;
    };
    let same = |i: usize| {
        let word = lex::load_word(field, 8 * i);
        (word | lex::FOLD) & keep[i] == packed[i] && word & dashes[i] == packed[i] & dashes[i]
    };
    same(0) && (len <= 8 || (same(1) && (len <= 16 || same(2))))
}

/// [`HeaderName::id`] of a known name, for constants.
const fn id(h: HeaderName) -> u8 {
    match h.id() {
        Some(id) => id,
        None => u8::MAX,
    }
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
    /// From after the colon to the end of the field, untrimmed.
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
            known: self.known.and_then(known),
        }
    }

    /// The value, without the linear whitespace around it: parsing stores the
    /// span after the colon as is, since most values are never looked at.
    #[inline]
    pub(crate) fn value<'a>(&self, text: &'a str) -> &'a str {
        lex::trim_lws(slice(text, self.value))
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
    fn names_are_classified_exactly_from_any_position() {
        for &h in KNOWN_HEADERS {
            let long = h.as_str();
            let id = h.id();
            for name in [
                long.to_string(),
                long.to_ascii_uppercase(),
                long.to_ascii_lowercase(),
            ] {
                // Followed by the colon and a value, as in a message, or alone.
                let field = format!("{name}: value");
                assert_eq!(classify(field.as_bytes(), name.len()), id, "{field:?}");
                assert_eq!(classify(name.as_bytes(), name.len()), id, "{name:?}");
                assert_eq!(
                    colon_in_name(field.as_bytes()),
                    Some(name.len()),
                    "{field:?}"
                );
                // One byte changed anywhere is another name (CR would fold onto `-`).
                for i in 0..name.len() {
                    for c in [b'\r', b'\n', b'_', b'@', 0x80] {
                        let mut bytes = field.clone().into_bytes();
                        bytes[i] = c;
                        assert_eq!(classify(&bytes, name.len()), None, "{bytes:?}");
                    }
                }
                // A prefix is no name (but `T` is To's compact form).
                if name.len() > 2 {
                    assert_eq!(
                        classify(field.as_bytes(), name.len() - 1),
                        None,
                        "{field:?}"
                    );
                }
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
