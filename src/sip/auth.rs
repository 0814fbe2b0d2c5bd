//! Digest credentials in Authorization / Proxy-Authorization (RFC 3261 §25.1,
//! RFC 7616 §3.4).

use std::borrow::Cow;

use super::header::HeaderName;
use super::lex::{self, Cursor, Split};

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
    Quoted(&'a str),
}

impl<'a> Value<'a> {
    fn text(self) -> Cow<'a, str> {
        match self {
            Value::Token(t) => Cow::Borrowed(t),
            Value::Quoted(q) => lex::unescape_quoted(q),
        }
    }

    /// Token-valued fields; clients that quote them anyway (`qop="auth"`) are
    /// tolerated as long as the quotes hold no escapes.
    fn token(self) -> Option<&'a str> {
        match self {
            Value::Token(t) => Some(t),
            Value::Quoted(q) if !q.contains('\\') && lex::is_token(q) => Some(q),
            Value::Quoted(_) => None,
        }
    }
}

#[derive(Default)]
struct Fields<'a> {
    username: Option<Value<'a>>,
    realm: Option<Value<'a>>,
    nonce: Option<Value<'a>>,
    uri: Option<Value<'a>>,
    response: Option<Value<'a>>,
    algorithm: Option<Value<'a>>,
    cnonce: Option<Value<'a>>,
    opaque: Option<Value<'a>>,
    qop: Option<Value<'a>>,
    nc: Option<Value<'a>>,
    userhash: Option<Value<'a>>,
}

impl<'a> Fields<'a> {
    fn slot(&mut self, name: &str) -> Option<&mut Option<Value<'a>>> {
        const NAMES: [&str; 11] = [
            "username",
            "realm",
            "nonce",
            "uri",
            "response",
            "algorithm",
            "cnonce",
            "opaque",
            "qop",
            "nc",
            "userhash",
        ];
        let i = NAMES.iter().position(|n| n.eq_ignore_ascii_case(name))?;
        Some(match i {
            0 => &mut self.username,
            1 => &mut self.realm,
            2 => &mut self.nonce,
            3 => &mut self.uri,
            4 => &mut self.response,
            5 => &mut self.algorithm,
            6 => &mut self.cnonce,
            7 => &mut self.opaque,
            8 => &mut self.qop,
            9 => &mut self.nc,
            _ => &mut self.userhash,
        })
    }
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
    let mut f = Fields::default();
    for piece in Split::new(c.rest(), b',') {
        let (name, value) = lex::trim_lws(piece)
            .split_once('=')
            .ok_or("bad parameter")?;
        let name = lex::trim_lws(name);
        let value = lex::trim_lws(value);
        if !lex::is_token(name) {
            return Err("bad parameter name");
        }
        let value = if value.starts_with('"') {
            Value::Quoted(lex::quoted_inner(value).ok_or("bad quoted value")?)
        } else if !value.is_empty() && !value.bytes().any(|b| b == b'"' || lex::is_lws(b)) {
            Value::Token(value)
        } else {
            return Err("bad parameter value");
        };
        if let Some(slot) = f.slot(name) {
            if slot.replace(value).is_some() {
                return Err("duplicate parameter");
            }
        }
    }
    let required = |v: Option<Value<'a>>, missing: &'static str| v.ok_or(missing);
    let token =
        |v: Option<Value<'a>>, bad: &'static str| -> Result<Option<&'a str>, &'static str> {
            v.map(|v| v.token().ok_or(bad)).transpose()
        };
    let creds = DigestCredentials {
        username: required(f.username, "missing username")?.text(),
        realm: required(f.realm, "missing realm")?.text(),
        nonce: required(f.nonce, "missing nonce")?.text(),
        uri: required(f.uri, "missing uri")?.text(),
        response: required(f.response, "missing response")?.text(),
        algorithm: token(f.algorithm, "bad algorithm")?,
        cnonce: f.cnonce.map(Value::text),
        opaque: f.opaque.map(Value::text),
        qop: token(f.qop, "bad qop")?,
        nc: token(f.nc, "bad nc")?,
        userhash: match token(f.userhash, "bad userhash")? {
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
