//! `name-addr / addr-spec` values with header parameters: From, To, Contact, Route,
//! Record-Route (RFC 3261 §20.10, §25.1).

use std::borrow::Cow;

use super::lex::{self, Split};
use super::param::{self, Params};
use super::uri::{self, Uri};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameAddr<'a> {
    /// The display name: a quoted-string's content (still escaped, see
    /// [`NameAddr::display_unescaped`]) or the run of tokens before `<`.
    pub display: Option<&'a str>,
    pub uri: Uri<'a>,
    pub tag: Option<&'a str>,
    /// The header parameters after the URI, without the first `;` (may hold LWS).
    pub params: &'a str,
    /// The whole element, trimmed.
    pub raw: &'a str,
    display_quoted: bool,
}

impl<'a> NameAddr<'a> {
    pub(crate) fn parse(s: &'a str) -> Result<NameAddr<'a>, &'static str> {
        parse(s)
    }

    pub fn display_unescaped(&self) -> Option<Cow<'a, str>> {
        let display = self.display?;
        Some(if self.display_quoted {
            lex::unescape_quoted(display)
        } else {
            Cow::Borrowed(display)
        })
    }

    /// `Some(None)` for a parameter without value; quoted values keep their quotes.
    pub fn param(&self, name: &str) -> Option<Option<&'a str>> {
        param::find(self.params, name)
    }

    pub fn params(&self) -> impl Iterator<Item = (&'a str, Option<&'a str>)> + use<'a> {
        let section = (!self.params.is_empty()).then_some(self.params);
        Params::new(section).map_while(Result::ok)
    }
}

fn parse(s: &str) -> Result<NameAddr<'_>, &'static str> {
    let raw = lex::trim_lws(s);
    let b = raw.as_bytes();
    let (display, display_quoted, uri_str, after) = match b.first() {
        None => return Err("empty value"),
        Some(b'"') => {
            let (close, _) = lex::quoted_close(b, 0).ok_or("unbalanced quotes")?;
            let display = raw.get(1..close).unwrap_or("");
            let (uri_str, after) = angle(raw, lex::skip_lws(b, close + 1))?;
            (Some(display), true, uri_str, after)
        }
        Some(_) => match lex::find1(b, b'<') {
            Some(lt) => {
                let display = lex::trim_lws(raw.get(..lt).unwrap_or(""));
                // An unquoted display name is a run of tokens separated by LWS.
                if !display
                    .bytes()
                    .all(|c| lex::class(c) & (lex::TOKEN | lex::LWS) != 0)
                {
                    return Err("bad display name");
                }
                let (uri_str, after) = angle(raw, lt)?;
                (
                    (!display.is_empty()).then_some(display),
                    false,
                    uri_str,
                    after,
                )
            }
            None => {
                // addr-spec: the URI ends at the first `;` (those are header
                // parameters), which is why URIs with `;`, `,` or `?` must be
                // enclosed in `<>`.
                let (uri_str, after) = match lex::find1(b, b';') {
                    Some(i) => (
                        lex::trim_lws(raw.get(..i).unwrap_or("")),
                        raw.get(i..).unwrap_or(""),
                    ),
                    None => (raw, ""),
                };
                if uri_str.bytes().any(|c| matches!(c, b',' | b'?' | b'"')) {
                    return Err("URI with , ? or quotes must be in <>");
                }
                (None, false, uri_str, after)
            }
        },
    };
    let uri = uri::parse(uri_str)?;
    let after = lex::trim_lws_start(after);
    let section = match after.as_bytes().first() {
        None => None,
        Some(b';') => after.get(1..),
        Some(_) => return Err("unexpected text after URI"),
    };
    let tag = dialog_tag(section)?;
    Ok(NameAddr {
        display,
        uri,
        tag,
        params: section.unwrap_or(""),
        raw,
        display_quoted,
    })
}

/// The `tag` parameter, read so that no proxy can read it another way: a second
/// `tag` (in any letter case), an empty one or one that is not a token is an error,
/// not "the first one wins" (Kamailio keeps the last; docs/policy.md, "Threat model").
fn dialog_tag(section: Option<&str>) -> Result<Option<&str>, &'static str> {
    let mut tag = None;
    for p in param::Params::new(section) {
        let (name, value) = p?;
        if !name.eq_ignore_ascii_case("tag") {
            continue;
        }
        if tag.is_some() {
            return Err("more than one tag");
        }
        match value {
            Some(v) if !v.is_empty() && lex::is_token(v) => tag = Some(v),
            _ => return Err("empty or bad tag"),
        }
    }
    Ok(tag)
}

/// `<uri>rest` starting at `s[at]` → (uri, rest). Whitespace inside the brackets is
/// an error of the URI.
fn angle(s: &str, at: usize) -> Result<(&str, &str), &'static str> {
    let b = s.as_bytes();
    if b.get(at) != Some(&b'<') {
        return Err("expected <");
    }
    let gt = at + 1 + lex::find1(b.get(at + 1..).unwrap_or(&[]), b'>').ok_or("unterminated <")?;
    Ok((
        s.get(at + 1..gt).unwrap_or(""),
        s.get(gt + 1..).unwrap_or(""),
    ))
}

/// The value of the Contact header(s) of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contacts<'a> {
    /// `Contact: *` (REGISTER removing every binding).
    Star,
    List(Vec<Contact<'a>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contact<'a> {
    pub addr: NameAddr<'a>,
    /// The `expires` parameter; values over 2^32-1 are taken as 2^32-1.
    pub expires: Option<u32>,
    /// The `q` parameter as written, checked against the qvalue grammar.
    pub q: Option<&'a str>,
    pub raw: &'a str,
}

/// RFC 3261 qvalue: `0[.ddd]` or `1[.000]`.
fn is_qvalue(q: &str) -> bool {
    let (int, frac) = match q.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (q, None),
    };
    let frac_ok = |f: &str, only_zero: bool| {
        f.len() <= 3
            && f.bytes().all(|b| {
                if only_zero {
                    b == b'0'
                } else {
                    b.is_ascii_digit()
                }
            })
    };
    match int {
        "0" => frac.is_none_or(|f| frac_ok(f, false)),
        "1" => frac.is_none_or(|f| frac_ok(f, true)),
        _ => false,
    }
}

pub(crate) fn parse_contact(element: &str) -> Result<Contact<'_>, &'static str> {
    let addr = parse(element)?;
    let mut expires = None;
    let mut q = None;
    for (name, value) in addr.params() {
        if name.eq_ignore_ascii_case("expires") && expires.is_none() {
            expires = Some(
                value
                    .and_then(lex::parse_delta_seconds)
                    .ok_or("bad expires parameter")?,
            );
        } else if name.eq_ignore_ascii_case("q") && q.is_none() {
            q = Some(value.filter(|v| is_qvalue(v)).ok_or("bad q parameter")?);
        }
    }
    Ok(Contact {
        addr,
        expires,
        q,
        raw: addr.raw,
    })
}

/// Parses every Contact header value (each possibly a comma-separated list).
pub(crate) fn parse_contacts<'a>(
    values: impl Iterator<Item = &'a str>,
) -> Result<Contacts<'a>, &'static str> {
    let mut list = Vec::new();
    let star = visit_contacts(values, |c| list.push(c))?;
    Ok(if star {
        Contacts::Star
    } else {
        Contacts::List(list)
    })
}

/// Parses every Contact element, handing each to `visit`; tells whether the value
/// was `*`. Lets `validate` check Contact without allocating the list.
pub(crate) fn visit_contacts<'a>(
    values: impl Iterator<Item = &'a str>,
    mut visit: impl FnMut(Contact<'a>),
) -> Result<bool, &'static str> {
    let mut stars = 0usize;
    let mut contacts = 0usize;
    for value in values {
        for element in Split::commas(value) {
            let element = lex::trim_lws(element);
            if element.is_empty() {
                return Err("empty element");
            }
            if element == "*" {
                stars += 1;
            } else {
                visit(parse_contact(element)?);
                contacts += 1;
            }
        }
    }
    match (stars, contacts) {
        (0, _) => Ok(false),
        (1, 0) => Ok(true),
        _ => Err("* mixed with other contacts"),
    }
}

/// Parses every element of a list of name-addrs (Route, Record-Route).
pub(crate) fn parse_list<'a>(
    value: &'a str,
) -> impl Iterator<Item = Result<NameAddr<'a>, &'static str>> {
    Split::commas(value).map(|element| {
        let element = lex::trim_lws(element);
        if element.is_empty() {
            Err("empty element")
        } else {
            parse(element)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uri::Host;

    #[test]
    fn name_addr_forms_parse() {
        // (input, display, display unescaped, uri, tag)
        type Row<'a> = (
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            &'a str,
            Option<&'a str>,
        );
        let cases: &[Row] = &[
            (
                "sip:user@example.com",
                None,
                None,
                "sip:user@example.com",
                None,
            ),
            (
                "\"Bell, Alexander\" <sip:a.g.bell@example.com>;tag=433423",
                Some("Bell, Alexander"),
                Some("Bell, Alexander"),
                "sip:a.g.bell@example.com",
                Some("433423"),
            ),
            (
                "sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n",
                None,
                None,
                "sip:vivekg@chair-dnrc.example.com",
                Some("1918181833n"),
            ),
            (
                "\"J Rosenberg \\\\\\\"\"       <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8",
                Some("J Rosenberg \\\\\\\""),
                Some("J Rosenberg \\\""),
                "sip:jdrosen@example.com",
                Some("98asjd8"),
            ),
            (
                "caller<sip:caller@example.com>;tag=323",
                Some("caller"),
                Some("caller"),
                "sip:caller@example.com",
                Some("323"),
            ),
            (
                "token1~` token2'+_ token3*%!.- <sip:mundane@example.com>;fromParam''~+*_!.-%=\"\u{440}\";tag=_token~1'+`*%!-.",
                Some("token1~` token2'+_ token3*%!.-"),
                Some("token1~` token2'+_ token3*%!.-"),
                "sip:mundane@example.com",
                Some("_token~1'+`*%!-."),
            ),
            ("<sip:a@b>", None, None, "sip:a@b", None),
            (
                "sip:+19725552222@gw1.example.net;unknownparam",
                None,
                None,
                "sip:+19725552222@gw1.example.net",
                None,
            ),
            ("isbn:2983792873", None, None, "isbn:2983792873", None),
            (
                "<http://www.example.com>;tag=3234233",
                None,
                None,
                "http://www.example.com",
                Some("3234233"),
            ),
            ("\"\" <sip:a@b>", Some(""), Some(""), "sip:a@b", None),
        ];
        for &(input, display, unescaped, uri, tag) in cases {
            let na = NameAddr::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(na.display, display, "{input:?}");
            assert_eq!(na.display_unescaped().as_deref(), unescaped, "{input:?}");
            assert_eq!(na.uri.raw, uri, "{input:?}");
            assert_eq!(na.tag, tag, "{input:?}");
        }
    }

    #[test]
    fn malformed_name_addrs_are_refused() {
        let cases = [
            "",
            "\"Mr. J. User <sip:j.user@example.com>",
            "\"Watson, Thomas\" < sip:t.watson@example.org >",
            "Bell, Alexander <sip:a.g.bell@example.com>;tag=43",
            "sip:user@example.com?Route=%3Csip:sip.example.com%3E",
            "\"Joe\" <sip:joe@example.org>;;;;",
            "<sip:a@b",
            "<sip:a@b> junk",
            "\"x\" sip:a@b",
            "<sip:a@b>;tag=\"quoted\"",
            "<sip:a@b>;tag",
        ];
        for input in cases {
            assert!(
                NameAddr::parse(input).is_err(),
                "{input:?} should be refused"
            );
        }
    }

    #[test]
    fn contacts_star_list_and_params() {
        let star = parse_contacts(["*"].into_iter());
        assert_eq!(star, Ok(Contacts::Star));
        assert!(parse_contacts(["*, <sip:a@b>"].into_iter()).is_err());
        assert!(parse_contacts(["*", "*"].into_iter()).is_err());
        assert!(parse_contacts([""].into_iter()).is_err());
        assert!(parse_contacts(["<sip:a@b>,"].into_iter()).is_err());
        let Ok(Contacts::List(list)) = parse_contacts(
            [
                "<sip:user@host129.example.com>\r\n  ;expires=280297596632815",
                "\"Quoted string \\\"\\\"\" <sip:jdrosen@example.com> ; newparam =\r\n      newvalue ;\r\n  secondparam ; q = 0.33, <sip:b@[2001:db8::1]>;EXPIRES=60",
            ]
            .into_iter(),
        ) else {
            panic!("contacts should parse");
        };
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].expires, Some(u32::MAX));
        assert_eq!(list[1].q, Some("0.33"));
        assert_eq!(list[1].expires, None);
        assert_eq!(list[2].expires, Some(60));
        assert!(matches!(list[2].addr.uri.host, Host::V6(_)));
    }

    #[test]
    fn contact_params_are_checked() {
        for bad in [
            "<sip:a@b>;expires=soon",
            "<sip:a@b>;q=2",
            "<sip:a@b>;q=0.1234",
            "<sip:a@b>;q=1.5",
            "<sip:a@b>;expires",
        ] {
            assert!(parse_contact(bad).is_err(), "{bad:?}");
        }
        for good in [
            "<sip:a@b>;q=1",
            "<sip:a@b>;q=1.000",
            "<sip:a@b>;q=0",
            "<sip:a@b>;q=0.5",
        ] {
            assert!(parse_contact(good).is_ok(), "{good:?}");
        }
    }
}
