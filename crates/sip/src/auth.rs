//! Digest credentials in Authorization / Proxy-Authorization (RFC 3261 §25.1,
//! RFC 7616 §3.4).

use std::borrow::Cow;

use super::header::HeaderName;
use super::lex::{self, Cursor};

/// Which credentials header to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthHeader {
    /// Answers a 401 (registrars, user agents).
    Authorization,
    /// Answers a 407 (proxies).
    ProxyAuthorization,
}

impl AuthHeader {
    pub fn header_name(&self) -> HeaderName {
        match self {
            AuthHeader::Authorization => HeaderName::Authorization,
            AuthHeader::ProxyAuthorization => HeaderName::ProxyAuthorization,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestCredentials<'a> {
    pub username: Cow<'a, str>,
    pub realm: Cow<'a, str>,
    pub nonce: Cow<'a, str>,
    pub uri: Cow<'a, str>,
    pub response: Cow<'a, str>,
    pub algorithm: Option<&'a str>,
    pub cnonce: Option<Cow<'a, str>>,
    pub opaque: Option<Cow<'a, str>>,
    pub qop: Option<&'a str>,
    pub nc: Option<&'a str>,
    /// RFC 7616 §3.4.4: the username is hashed.
    pub userhash: bool,
}

/// One auth-param value: a token (borrowed) or a quoted-string's content.
#[derive(Clone, Copy)]
enum Value<'a> {
    Token(&'a str),
    /// The content, and whether it holds a quoted-pair (known from the scan that
    /// found the closing quote, so clean values are never looked at again).
    Quoted(&'a str, bool),
}

impl<'a> Value<'a> {
    fn text(self) -> Cow<'a, str> {
        match self {
            Value::Token(t) | Value::Quoted(t, false) => Cow::Borrowed(t),
            Value::Quoted(q, true) => lex::unescape_quoted(q),
        }
    }

    /// Token-valued fields; clients that quote them anyway (`qop="auth"`) are
    /// tolerated as long as the quotes hold no escapes.
    fn token(self) -> Option<&'a str> {
        match self {
            Value::Token(t) => Some(t),
            Value::Quoted(q, false) if lex::is_token(q) => Some(q),
            Value::Quoted(..) => None,
        }
    }
}

// Where `parse` keeps each parameter it reads.
const USERNAME: usize = 0;
const REALM: usize = 1;
const NONCE: usize = 2;
const URI: usize = 3;
const RESPONSE: usize = 4;
const ALGORITHM: usize = 5;
const CNONCE: usize = 6;
const OPAQUE: usize = 7;
const QOP: usize = 8;
const NC: usize = 9;
const USERHASH: usize = 10;

/// Which parameter a name (`b[at..at + len]`, any case) is, if it is one we read.
#[inline]
fn param_index(b: &[u8], at: usize, len: usize) -> Option<usize> {
    const fn word(name: &str) -> u64 {
        lex::pack_lower(name, 0)
    }
    // Length and first letter leave at most two candidates; the names are letters,
    // so one folded word compares them exactly (see `lex::FOLD`).
    let w = (lex::load_word(b, at) | lex::FOLD) & lex::low_bytes(len);
    let first = b.get(at)? | 0x20;
    let (index, want) = match (len, first) {
        (8, b'u') if w == word("userhash") => (USERHASH, w),
        (8, b'u') => (USERNAME, word("username")),
        (5, b'r') => (REALM, word("realm")),
        (5, b'n') => (NONCE, word("nonce")),
        (3, b'u') => (URI, word("uri")),
        (8, b'r') => (RESPONSE, word("response")),
        (9, b'a') if b.get(at + 8).is_some_and(|&c| c | 0x20 == b'm') => {
            (ALGORITHM, word("algorith"))
        }
        (6, b'c') => (CNONCE, word("cnonce")),
        (6, b'o') => (OPAQUE, word("opaque")),
        (3, b'q') => (QOP, word("qop")),
        (2, b'n') => (NC, word("nc")),
        _ => return None,
    };
    (w == want).then_some(index)
}

/// Parses one credentials header value. `Ok(None)` for a well-formed scheme other
/// than Digest: such credentials are ignored, so the policy challenges as if there
/// were none (RFC 4475 §3.3.9 regaut01).
pub(crate) fn parse<'a>(value: &'a str) -> Result<Option<DigestCredentials<'a>>, &'static str> {
    let mut c = Cursor::new(lex::trim_lws(value));
    let scheme = c.take_while(lex::is_token_byte);
    if scheme.is_empty() {
        return Err("missing scheme");
    }
    if !scheme.eq_ignore_ascii_case("Digest") {
        return Ok(None);
    }
    if !c.skip_lws() {
        return Err("missing parameters");
    }
    let params = c.rest();
    let mut f: [Option<Value<'a>>; USERHASH + 1] = [None; USERHASH + 1];
    let mut pos = Some(0);
    while let Some(start) = pos {
        let (index, value, next) = match well_formed(params, start) {
            Some(param) => param,
            None => {
                // Anything unusual takes the general path: split off the piece as
                // `,` separates it (outside quotes and `<>`), then read it.
                let bytes = params.as_bytes();
                let end = lex::piece_end(bytes, start, lex::COMMA);
                let piece = params.get(start..end.unwrap_or(bytes.len())).unwrap_or("");
                let (name, value) = parse_piece(piece)?;
                let index = param_index(name.as_bytes(), 0, name.len());
                (index, value, end.map(|sep| sep + 1))
            }
        };
        if let Some(slot) = index.and_then(|i| f.get_mut(i)) {
            if slot.replace(value).is_some() {
                return Err("duplicate parameter");
            }
        }
        pos = next;
    }
    let field = |i: usize| f.get(i).copied().flatten();
    let required = |i: usize, missing: &'static str| field(i).ok_or(missing);
    let token = |i: usize, bad: &'static str| -> Result<Option<&'a str>, &'static str> {
        field(i).map(|v| v.token().ok_or(bad)).transpose()
    };
    let creds = DigestCredentials {
        username: required(USERNAME, "missing username")?.text(),
        realm: required(REALM, "missing realm")?.text(),
        nonce: required(NONCE, "missing nonce")?.text(),
        uri: required(URI, "missing uri")?.text(),
        response: required(RESPONSE, "missing response")?.text(),
        algorithm: token(ALGORITHM, "bad algorithm")?,
        cnonce: field(CNONCE).map(Value::text),
        opaque: field(OPAQUE).map(Value::text),
        qop: token(QOP, "bad qop")?,
        nc: token(NC, "bad nc")?,
        userhash: match token(USERHASH, "bad userhash")? {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(_) => return Err("bad userhash"),
        },
    };
    if creds
        .nc
        .is_some_and(|nc| nc.len() != 8 || !nc.bytes().all(lex::is_hex))
    {
        return Err("bad nc");
    }
    // RFC 7616 §3.4: with qop the response covers cnonce and nc, so both must be sent.
    if creds.qop.is_some() && (creds.cnonce.is_none() || creds.nc.is_none()) {
        return Err("qop without cnonce or nc");
    }
    Ok(Some(creds))
}

/// A token value ends at LWS, a quote, the separator or an angle bracket (which
/// would change where the general path splits).
fn ends_token_value(b: u8) -> bool {
    lex::class(b) & (lex::LWS | lex::QUOTE | lex::COMMA | lex::LT | lex::GT) != 0
}

type Param<'a> = (Option<usize>, Value<'a>, Option<usize>);

/// The common shape, read in one pass: `LWS token LWS = LWS (value | quoted) LWS`
/// then `,` or the end, giving the parameter's [`param_index`], its value and where
/// the next one starts. `None` when the piece has any other shape, for
/// [`parse_piece`] to judge: on this shape both read the same parameter.
#[inline]
fn well_formed(s: &str, start: usize) -> Option<Param<'_>> {
    let b = s.as_bytes();
    let name_start = lex::skip_lws(b, start);
    // The name runs to the `=` (LWS before it aside); a name we read is letters
    // only, so matching one proves it a token, and only others are checked.
    let eq = name_start + lex::find1(b.get(name_start..)?, b'=')?;
    let mut name_end = eq;
    while name_end > name_start && b.get(name_end - 1).is_some_and(|&c| lex::is_lws(c)) {
        name_end -= 1;
    }
    let len = name_end - name_start;
    let index = param_index(b, name_start, len);
    if index.is_none() && (len == 0 || lex::skip_token(b, name_start) != name_end) {
        return None;
    }
    let value_start = lex::skip_lws(b, eq + 1);
    let (value, value_end) = if b.get(value_start) == Some(&b'"') {
        let (close, escaped) = lex::quoted_close(b, value_start)?;
        (
            Value::Quoted(s.get(value_start + 1..close)?, escaped),
            close + 1,
        )
    } else {
        let mut j = value_start;
        while b.get(j).is_some_and(|&c| !ends_token_value(c)) {
            j += 1;
        }
        if j == value_start {
            return None;
        }
        (Value::Token(s.get(value_start..j)?), j)
    };
    let i = lex::skip_lws(b, value_end);
    let next = match b.get(i) {
        None => None,
        Some(b',') => Some(i + 1),
        Some(_) => return None,
    };
    Some((index, value, next))
}

/// One `name=value` piece of any shape.
fn parse_piece(piece: &str) -> Result<(&str, Value<'_>), &'static str> {
    let (name, value) = lex::split_once_byte(lex::trim_lws(piece), b'=').ok_or("bad parameter")?;
    let name = lex::trim_lws(name);
    let value = lex::trim_lws(value);
    if !lex::is_token(name) {
        return Err("bad parameter name");
    }
    let value = if value.starts_with('"') {
        let inner = lex::quoted_inner(value).ok_or("bad quoted value")?;
        Value::Quoted(inner, inner.contains('\\'))
    } else if !value.is_empty() && !value.bytes().any(|b| b == b'"' || lex::is_lws(b)) {
        Value::Token(value)
    } else {
        return Err("bad parameter value");
    };
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "Digest username=\"hq1\", realm=\"trunks.example.net\",\r\n nonce=\"abc\", uri=\"sip:x@y\", response=\"0123\", algorithm=SHA-256, cnonce=\"c\\\"n\", opaque=\"op\", qop=auth, nc=00000001, userhash=false";

    #[test]
    fn full_digest_credentials_parse() {
        let Ok(Some(c)) = parse(FULL) else {
            panic!("should parse");
        };
        assert_eq!(c.username, "hq1");
        assert_eq!(c.realm, "trunks.example.net");
        assert_eq!(c.nonce, "abc");
        assert_eq!(c.uri, "sip:x@y");
        assert_eq!(c.response, "0123");
        assert_eq!(c.algorithm, Some("SHA-256"));
        assert_eq!(c.cnonce.as_deref(), Some("c\"n"));
        assert_eq!(c.opaque.as_deref(), Some("op"));
        assert_eq!(c.qop, Some("auth"));
        assert_eq!(c.nc, Some("00000001"));
        assert!(!c.userhash);
        assert!(matches!(c.username, Cow::Borrowed(_)));
    }

    #[test]
    fn minimal_and_tolerated_forms_parse() {
        let cases = [
            "digest username=\"a\",realm=\"r\",nonce=\"n\",uri=\"sip:r\",response=\"x\"",
            "Digest username=a, realm=r, nonce=n, uri=\"sip:r\", response=x, qop=\"auth\", cnonce=\"c\", nc=0000000a",
            "Digest username=\"a\", realm=\"r\", nonce=\"n\", uri=\"sip:r\", response=\"x\", unknown=\"ignored\", userhash=TRUE",
        ];
        for input in cases {
            assert!(
                matches!(parse(input), Ok(Some(_))),
                "{input:?}: {:?}",
                parse(input)
            );
        }
    }

    #[test]
    fn other_schemes_are_skipped() {
        assert_eq!(parse("NoOneKnowsThisScheme opaque-data=here"), Ok(None));
        assert_eq!(parse("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="), Ok(None));
    }

    #[test]
    fn malformed_digest_credentials_are_refused() {
        let cases = [
            ("", "missing scheme"),
            ("Digest", "missing parameters"),
            (
                "Digest realm=\"r\", nonce=\"n\", uri=\"u\", response=\"x\"",
                "missing username",
            ),
            (
                "Digest username=\"a\", nonce=\"n\", uri=\"u\", response=\"x\"",
                "missing realm",
            ),
            (
                "Digest username=\"a\", realm=\"r\", uri=\"u\", response=\"x\"",
                "missing nonce",
            ),
            (
                "Digest username=\"a\", realm=\"r\", nonce=\"n\", response=\"x\"",
                "missing uri",
            ),
            (
                "Digest username=\"a\", realm=\"r\", nonce=\"n\", uri=\"u\"",
                "missing response",
            ),
            (
                "Digest username=\"a\", username=\"b\", realm=\"r\", nonce=\"n\", uri=\"u\", response=\"x\"",
                "duplicate parameter",
            ),
            ("Digest username=\"a, realm=\"r\"", "bad quoted value"),
            ("Digest username", "bad parameter"),
            ("Digest username=\"a\",, realm=\"r\"", "bad parameter"),
            (
                "Digest username=\"a\" junk, realm=\"r\"",
                "bad quoted value",
            ),
            (
                "Digest username=\"a\", realm=\"r\", nonce=\"n\", uri=\"u\", response=\"x\", nc=1",
                "bad nc",
            ),
            (
                "Digest username=\"a\", realm=\"r\", nonce=\"n\", uri=\"u\", response=\"x\", qop=auth",
                "qop without cnonce or nc",
            ),
            (
                "Digest username=\"a\", realm=\"r\", nonce=\"n\", uri=\"u\", response=\"x\", userhash=maybe",
                "bad userhash",
            ),
            (
                "Digest username=\"a\", realm=\"r\", nonce=\"n\", uri=\"u\", response=\"x\", algorithm=\"MD\\5\"",
                "bad algorithm",
            ),
        ];
        for (input, reason) in cases {
            assert_eq!(parse(input), Err(reason), "{input:?}");
        }
    }
}
