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
    pub(crate) fn scan(field: &[u8]) -> (usize, Option<HeaderName>) {
        // Setting bit 0x20 lower-cases letters. Known names hold only letters and
        // `-`, and no other token byte maps onto a letter or `-` that way (only CR
        // would reach `-`), so for a token the match below is exact.
        let mut folded = [0u8; 19];
        let mut len = 0;
        for &b in field {
            if !lex::is_token_byte(b) {
                break;
            }
            if let Some(slot) = folded.get_mut(len) {
                *slot = b | 0x20;
            }
            len += 1;
        }
        (len, folded.get(..len).and_then(classify))
    }
}

/// The known name a lower-cased token spells.
fn classify(lower: &[u8]) -> Option<HeaderName> {
    Some(match lower {
        b"a" => H::AcceptContact,
        b"b" => H::ReferredBy,
        b"c" => H::ContentType,
        b"d" => H::RequestDisposition,
        b"e" => H::ContentEncoding,
        b"f" => H::From,
        b"i" => H::CallId,
        b"j" => H::RejectContact,
        b"k" => H::Supported,
        b"l" => H::ContentLength,
        b"m" => H::Contact,
        b"n" => H::IdentityInfo,
        b"o" => H::Event,
        b"r" => H::ReferTo,
        b"s" => H::Subject,
        b"t" => H::To,
        b"u" => H::AllowEvents,
        b"v" => H::Via,
        b"x" => H::SessionExpires,
        b"y" => H::Identity,
        b"via" => H::Via,
        b"from" => H::From,
        b"to" => H::To,
        b"call-id" => H::CallId,
        b"cseq" => H::CSeq,
        b"contact" => H::Contact,
        b"expires" => H::Expires,
        b"min-expires" => H::MinExpires,
        b"max-forwards" => H::MaxForwards,
        b"content-length" => H::ContentLength,
        b"content-type" => H::ContentType,
        b"content-encoding" => H::ContentEncoding,
        b"authorization" => H::Authorization,
        b"proxy-authorization" => H::ProxyAuthorization,
        b"www-authenticate" => H::WwwAuthenticate,
        b"proxy-authenticate" => H::ProxyAuthenticate,
        b"route" => H::Route,
        b"record-route" => H::RecordRoute,
        b"allow" => H::Allow,
        b"supported" => H::Supported,
        b"unsupported" => H::Unsupported,
        b"require" => H::Require,
        b"proxy-require" => H::ProxyRequire,
        b"accept" => H::Accept,
        b"user-agent" => H::UserAgent,
        b"server" => H::Server,
        b"subject" => H::Subject,
        b"date" => H::Date,
        b"event" => H::Event,
        b"allow-events" => H::AllowEvents,
        b"refer-to" => H::ReferTo,
        b"referred-by" => H::ReferredBy,
        b"session-expires" => H::SessionExpires,
        b"accept-contact" => H::AcceptContact,
        b"reject-contact" => H::RejectContact,
        b"request-disposition" => H::RequestDisposition,
        b"identity" => H::Identity,
        b"identity-info" => H::IdentityInfo,
        _ => return None,
    })
}

impl HeaderName {
    /// Position in [`KNOWN_HEADERS`]; `None` for `Other`.
    pub(crate) fn id(self) -> Option<u8> {
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
/// validates UTF-8 once for the whole block instead of once per field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub name: (u32, u32),
    pub value: (u32, u32),
    pub line: u32,
    /// [`HeaderName::id`] of the name, if known.
    pub known: Option<u8>,
}

impl Entry {
    pub(crate) fn header<'a>(&self, text: &'a str) -> Header<'a> {
        let slice = |(a, b): (u32, u32)| text.get(a as usize..b as usize).unwrap_or("");
        Header {
            name: slice(self.name),
            value: slice(self.value),
            line: self.line as usize,
            known: self
                .known
                .and_then(|id| KNOWN_HEADERS.get(usize::from(id)).copied()),
        }
    }
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
            Elements::List(Split::new(value, b','))
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
