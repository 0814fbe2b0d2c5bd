//! Header parameters (`;name=value` after a name-addr or Via sent-by), where linear
//! whitespace may surround `;` and `=` and values may be quoted-strings.

use super::lex;

/// Iterates the parameters of a header's parameter section (the text after its
/// first `;`). Each item is `(name, value)` with the value as written (a quoted
/// value keeps its quotes). After an error the iteration ends.
#[derive(Debug, Clone)]
pub(crate) struct Params<'a> {
    section: &'a str,
    /// Where the next parameter starts; `None` once done.
    pos: Option<usize>,
}

impl<'a> Params<'a> {
    /// `section` is what follows the first `;`; `None` means there are no parameters.
    pub(crate) fn new(section: Option<&'a str>) -> Self {
        Params {
            section: section.unwrap_or(""),
            pos: section.map(|_| 0),
        }
    }
}

/// Unquoted values: tokens, plus `[`, `]` and `:` so that IPv6 addresses fit
/// (RFC 5118 §4.5 asks for `received=` with and without brackets).
fn is_value_byte(b: u8) -> bool {
    lex::class(b) & (lex::TOKEN | lex::PARAM_EXTRA) != 0
}

type Param<'a> = (&'a str, Option<&'a str>);

impl<'a> Iterator for Params<'a> {
    type Item = Result<Param<'a>, &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        let start = self.pos?;
        if let Some((param, next)) = well_formed(self.section, start) {
            self.pos = next;
            return Some(Ok(param));
        }
        // Anything unusual takes the general path: split off the piece as `;`
        // separates it (outside quotes and `<>`), then read it.
        let bytes = self.section.as_bytes();
        let end = lex::piece_end(bytes, start, lex::SEMI);
        let piece = self
            .section
            .get(start..end.unwrap_or(bytes.len()))
            .unwrap_or("");
        let item = parse_one(lex::trim_lws(piece));
        self.pos = match (&item, end) {
            (Ok(_), Some(sep)) => Some(sep + 1),
            _ => None,
        };
        Some(item)
    }
}

/// The common shape, read in one pass: `LWS token LWS [= LWS (token | quoted) LWS]`
/// then `;` or the end, giving the parameter and where the next one starts. `None`
/// when the piece has any other shape (malformed or unusual), for the general path
/// to judge: on this shape both read the same parameter.
#[inline]
fn well_formed(s: &str, start: usize) -> Option<(Param<'_>, Option<usize>)> {
    let b = s.as_bytes();
    let name_start = lex::skip_lws(b, start);
    let name_end = lex::skip_token(b, name_start);
    if name_end == name_start {
        return None;
    }
    let name = s.get(name_start..name_end)?;
    let mut i = lex::skip_lws(b, name_end);
    let value = if b.get(i) == Some(&b'=') {
        let value_start = lex::skip_lws(b, i + 1);
        i = if b.get(value_start) == Some(&b'"') {
            lex::quoted_close(b, value_start)?.0 + 1
        } else {
            let mut j = value_start;
            while b.get(j).copied().is_some_and(is_value_byte) {
                j += 1;
            }
            if j == value_start {
                return None;
            }
            j
        };
        let value = s.get(value_start..i)?;
        i = lex::skip_lws(b, i);
        Some(value)
    } else {
        None
    };
    match b.get(i) {
        None => Some(((name, value), None)),
        Some(b';') => Some(((name, value), Some(i + 1))),
        Some(_) => None,
    }
}

fn parse_one(piece: &str) -> Result<Param<'_>, &'static str> {
    if piece.is_empty() {
        return Err("empty parameter");
    }
    let (name, value) = match lex::split_once_byte(piece, b'=') {
        Some((n, v)) => (lex::trim_lws(n), Some(lex::trim_lws(v))),
        None => (piece, None),
    };
    if !lex::is_token(name) {
        return Err("bad parameter name");
    }
    if let Some(v) = value {
        let ok = if v.starts_with('"') {
            lex::quoted_inner(v).is_some()
        } else {
            !v.is_empty() && v.bytes().all(is_value_byte)
        };
        if !ok {
            return Err("bad parameter value");
        }
    }
    Ok((name, value))
}

/// The first parameter named `name`, skipping malformed ones.
pub(crate) fn find<'a>(section: &'a str, name: &str) -> Option<Option<&'a str>> {
    Params::new(Some(section))
        .map_while(Result::ok)
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Items<'a> = Vec<(&'a str, Option<&'a str>)>;

    #[test]
    fn params_allow_lws_and_quoted_values() {
        let cases: &[(&str, Items)] = &[
            ("tag=1", vec![("tag", Some("1"))]),
            (
                "   tag    = 1918181833n",
                vec![("tag", Some("1918181833n"))],
            ),
            (
                " newparam =\r\n      newvalue ;\r\n  secondparam ; q = 0.33",
                vec![
                    ("newparam", Some("newvalue")),
                    ("secondparam", None),
                    ("q", Some("0.33")),
                ],
            ),
            ("x=\"a;b\";lr", vec![("x", Some("\"a;b\"")), ("lr", None)]),
            (
                "received=2001:db8::9:255;branch=z9hG4bKas3",
                vec![
                    ("received", Some("2001:db8::9:255")),
                    ("branch", Some("z9hG4bKas3")),
                ],
            ),
        ];
        for (input, want) in cases {
            let got: Result<Items, _> = Params::new(Some(input)).collect();
            assert_eq!(got.as_ref(), Ok(want), "input {input:?}");
        }
    }

    #[test]
    fn malformed_params_are_reported() {
        let cases = [
            ";", "a;;b", "=x", "a=", "a=\"open", "a=\"x\"y", "a b=c", "a=<x>",
        ];
        for input in cases {
            let got: Result<Items, _> = Params::new(Some(input)).collect();
            assert!(got.is_err(), "input {input:?} gave {got:?}");
        }
    }

    #[test]
    fn lookup_is_case_insensitive() {
        assert_eq!(find("lr;TTL=5", "ttl"), Some(Some("5")));
    }
}
