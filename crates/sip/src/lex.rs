//! Byte classes and small scanners shared by the header parsers.
//!
//! Header values reach these helpers after the header splitter has checked that every
//! CR or LF inside them belongs to a CRLF followed by SP/HT (a fold), so CR and LF can
//! be treated as plain linear whitespace here.

use std::borrow::Cow;

/// RFC 3261 `token` characters.
pub(crate) const TOKEN: u8 = 1;
/// SP, HT, CR, LF.
pub(crate) const LWS: u8 = 2;
pub(crate) const QUOTE: u8 = 4;
pub(crate) const LT: u8 = 8;
pub(crate) const GT: u8 = 16;
pub(crate) const COMMA: u8 = 32;
pub(crate) const SEMI: u8 = 64;
/// `[`, `]` and `:`, which unquoted header parameter values add to tokens.
pub(crate) const PARAM_EXTRA: u8 = 128;

const fn class_table() -> [u8; 256] {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = if b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
            ) {
            TOKEN
        } else {
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => LWS,
                b'"' => QUOTE,
                b'<' => LT,
                b'>' => GT,
                b',' => COMMA,
                b';' => SEMI,
                b'[' | b']' | b':' => PARAM_EXTRA,
                _ => 0,
            }
        };
        i += 1;
    }
    table
}

/// One lookup classifies a byte for every scanner here, instead of a chain of
/// comparisons per byte.
static CLASS: [u8; 256] = class_table();

#[inline(always)]
pub(crate) fn class(b: u8) -> u8 {
    CLASS[usize::from(b)]
}

#[inline(always)]
pub(crate) fn is_token_byte(b: u8) -> bool {
    class(b) & TOKEN != 0
}

pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_byte)
}

#[inline(always)]
pub(crate) fn is_lws(b: u8) -> bool {
    class(b) & LWS != 0
}

/// Index of the first byte of `b` at or after `from` that is not LWS (or `b.len()`).
#[inline]
pub(crate) fn skip_lws(b: &[u8], mut from: usize) -> usize {
    while b.get(from).is_some_and(|&c| is_lws(c)) {
        from += 1;
    }
    from
}

/// Index of the first byte of `b` at or after `from` that is not a token byte.
#[inline]
pub(crate) fn skip_token(b: &[u8], mut from: usize) -> usize {
    while b.get(from).is_some_and(|&c| is_token_byte(c)) {
        from += 1;
    }
    from
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// High bit set in every byte of `word` equal to `b`, and possibly in bytes above
/// the first such byte (a borrow), never below it.
#[inline(always)]
fn bytes_equal(word: u64, b: u8) -> u64 {
    let x = word ^ (ONES * u64::from(b));
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// Position of the first byte of `word` (little-endian) equal to `b`.
#[inline(always)]
pub(crate) fn first_equal(word: u64, b: u8) -> Option<usize> {
    let found = bytes_equal(word, b);
    (found != 0).then(|| (found.trailing_zeros() / 8) as usize)
}

/// Index of the first byte of `b` that `hit` accepts, eight bytes per step:
/// `flags` must set the high bit of every byte of a word that `hit` accepts, and may
/// set it in bytes above such a byte but never below it (the has-zero-byte trick of
/// [`bytes_equal`]), so the lowest flag is always a true match.
#[inline(always)]
fn find_with(b: &[u8], flags: impl Fn(u64) -> u64, hit: impl Fn(u8) -> bool) -> Option<usize> {
    let mut chunks = b.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        if let Ok(word) = <[u8; 8]>::try_from(chunk) {
            let found = flags(u64::from_le_bytes(word));
            if found != 0 {
                return Some(offset + (found.trailing_zeros() / 8) as usize);
            }
        }
        offset += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&c| hit(c))
        .map(|i| offset + i)
}

/// Index of the first byte equal to `x` or `y`. Header lines, long quoted values
/// (nonces, responses) and whole header blocks go through here.
#[inline(always)]
pub(crate) fn find2(b: &[u8], x: u8, y: u8) -> Option<usize> {
    find_with(
        b,
        |w| bytes_equal(w, x) | bytes_equal(w, y),
        |c| c == x || c == y,
    )
}

/// Index of the first `"`, `<`, `>` or `sep`: what can end or nest a list piece.
#[inline(always)]
fn find_piece_stop(b: &[u8], sep: u8) -> Option<usize> {
    find_with(
        b,
        |w| {
            bytes_equal(w, b'"') | bytes_equal(w, b'<') | bytes_equal(w, b'>') | bytes_equal(w, sep)
        },
        |c| matches!(c, b'"' | b'<' | b'>') || c == sep,
    )
}

/// Index of the first byte equal to `x` (see [`find2`]).
#[inline(always)]
pub(crate) fn find1(b: &[u8], x: u8) -> Option<usize> {
    find2(b, x, x)
}

/// Eight bytes of `b` from `at`, little-endian, zero past the end.
#[inline]
pub(crate) fn load_word(b: &[u8], at: usize) -> u64 {
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

/// Up to eight bytes of `s` from `at`, lower-cased and packed like [`load_word`],
/// to compare names a word at a time.
pub(crate) const fn pack_lower(s: &str, at: usize) -> u64 {
    let b = s.as_bytes();
    let mut w = 0u64;
    let mut i = 0;
    while i < 8 && at + i < b.len() {
        w |= (b[at + i].to_ascii_lowercase() as u64) << (8 * i);
        i += 1;
    }
    w
}

/// The low `len` bytes of a word (all of it from eight on).
#[inline]
pub(crate) const fn low_bytes(len: usize) -> u64 {
    if len >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * len)) - 1
    }
}

/// Setting bit 0x20 in every byte lower-cases the letters of eight bytes at once.
/// Only `A` and `a` become `a` that way (likewise for each letter), so comparing a
/// folded word with lower-case letters is exact for any bytes; for `-` it is exact
/// on token bytes (only CR, not a token byte, also becomes `-`).
pub(crate) const FOLD: u64 = 0x2020_2020_2020_2020;

/// `s` equals `lower` (lower-case letters only) in any case. Only `A` and `a` have
/// bit 0x20 set to give `a` (likewise for each letter), so this is exact for any `s`.
#[inline]
pub(crate) fn eq_letters(s: &str, lower: &str) -> bool {
    s.len() == lower.len() && s.bytes().zip(lower.bytes()).all(|(a, b)| a | 0x20 == b)
}

// Byte-wise trims: `str::trim_matches` with a char set costs a UTF-8 decode per step.

pub(crate) fn trim_lws(s: &str) -> &str {
    trim_lws_end(trim_lws_start(s))
}

pub(crate) fn trim_lws_start(s: &str) -> &str {
    s.get(skip_lws(s.as_bytes(), 0)..).unwrap_or("")
}

pub(crate) fn trim_lws_end(s: &str) -> &str {
    let end = s
        .as_bytes()
        .iter()
        .rposition(|&c| !is_lws(c))
        .map_or(0, |i| i + 1);
    s.get(..end).unwrap_or("")
}

/// Index of the `"` closing the quoted-string that opens at `open` (which must be a
/// `"`), honouring quoted-pairs. `None` when the quote is never closed.
pub(crate) fn quoted_end(s: &str, open: usize) -> Option<usize> {
    let bytes = s.as_bytes();
    if bytes.get(open) != Some(&b'"') {
        return None;
    }
    quoted_close(bytes, open).map(|(end, _)| end)
}

/// [`quoted_end`] without the opening check, and whether a quoted-pair was seen
/// (so callers know the content needs no unescaping without looking again).
#[inline]
pub(crate) fn quoted_close(b: &[u8], open: usize) -> Option<(usize, bool)> {
    let mut i = open + 1;
    let mut escaped = false;
    loop {
        let j = i + find2(b.get(i..)?, b'"', b'\\')?;
        if b.get(j) == Some(&b'"') {
            return Some((j, escaped));
        }
        escaped = true;
        // A quoted-pair escapes whatever byte follows the backslash.
        i = j + 2;
    }
}

/// If `s` is exactly one quoted-string, its content (still escaped).
pub(crate) fn quoted_inner(s: &str) -> Option<&str> {
    let end = quoted_end(s, 0)?;
    if end + 1 != s.len() {
        return None;
    }
    s.get(1..end)
}

/// Resolves the quoted-pairs of a quoted-string's content; borrows when there are none.
pub(crate) fn unescape_quoted(inner: &str) -> Cow<'_, str> {
    if !inner.as_bytes().contains(&b'\\') {
        return Cow::Borrowed(inner);
    }
    let mut out = String::with_capacity(inner.len());
    let mut escaped = false;
    for c in inner.chars() {
        if escaped {
            out.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Where the piece of `b` starting at `from` ends: the index of the first separator
/// (a byte whose class is `sep`) outside quoted-strings and `<...>`, or `None` when
/// the piece runs to the end. An unterminated quote or angle bracket swallows the
/// rest of the input, so the structured parser that receives it reports the
/// imbalance.
#[inline]
pub(crate) fn piece_end(b: &[u8], from: usize, sep: u8) -> Option<usize> {
    let sep = if sep == SEMI { b';' } else { b',' };
    let mut in_angle = false;
    let mut i = from;
    loop {
        i += find_piece_stop(b.get(i..)?, sep)?;
        match b.get(i) {
            Some(b'"') => i = quoted_close(b, i)?.0,
            Some(b'<') => in_angle = true,
            Some(b'>') => in_angle = false,
            _ if !in_angle => return Some(i),
            _ => {}
        }
        i += 1;
    }
}

/// Splits on a separator outside quoted-strings and `<...>`, yielding untrimmed
/// pieces (see [`piece_end`]).
#[derive(Debug, Clone)]
pub(crate) struct Split<'a> {
    rest: Option<&'a str>,
    /// The separator's class bit.
    sep: u8,
}

impl<'a> Split<'a> {
    pub(crate) fn commas(s: &'a str) -> Self {
        Split {
            rest: Some(s),
            sep: COMMA,
        }
    }
}

impl<'a> Iterator for Split<'a> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        let rest = self.rest?;
        // Most values hold no separator at all, which one plain search settles.
        let sep = if self.sep == SEMI { b';' } else { b',' };
        if find1(rest.as_bytes(), sep).is_none() {
            self.rest = None;
            return Some(rest);
        }
        match piece_end(rest.as_bytes(), 0, self.sep) {
            Some(i) => {
                let (piece, after) = split_around(rest, i);
                self.rest = Some(after);
                Some(piece)
            }
            None => {
                self.rest = None;
                Some(rest)
            }
        }
    }
}

/// `str::split_once` for an ASCII byte: a plain scan beats `memchr`'s set-up on the
/// short strings of URIs and parameters.
#[inline]
pub(crate) fn split_once_byte(s: &str, b: u8) -> Option<(&str, &str)> {
    let i = s.bytes().position(|c| c == b)?;
    Some(split_around(s, i))
}

/// `(s[..i], s[i + 1..])` for the index of an ASCII byte; never panics.
#[inline]
pub(crate) fn split_around(s: &str, i: usize) -> (&str, &str) {
    (s.get(..i).unwrap_or(s), s.get(i + 1..).unwrap_or(""))
}

/// A forward-only reader over a header value.
#[derive(Debug, Clone)]
pub(crate) struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(s: &'a str) -> Self {
        Cursor { s, pos: 0 }
    }

    pub(crate) fn rest(&self) -> &'a str {
        self.s.get(self.pos..).unwrap_or("")
    }

    pub(crate) fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    /// Skips linear whitespace; tells whether there was any.
    pub(crate) fn skip_lws(&mut self) -> bool {
        let start = self.pos;
        while self.peek().is_some_and(is_lws) {
            self.pos += 1;
        }
        self.pos > start
    }

    /// Takes the longest run of bytes accepted by `f`. Predicates must treat every
    /// byte >= 0x80 alike so the run always ends on a character boundary.
    pub(crate) fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a str {
        let start = self.pos;
        while self.peek().is_some_and(&f) {
            self.pos += 1;
        }
        self.s.get(start..self.pos).unwrap_or("")
    }
}

/// A decimal number of at most 20 digits, `None` on anything else or overflow.
pub(crate) fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for b in s.bytes() {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

/// RFC 3261 delta-seconds: values above 2^32-1 are taken as 2^32-1 (§20.19).
pub(crate) fn parse_delta_seconds(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(parse_u64(s).map_or(u32::MAX, |n| u32::try_from(n).unwrap_or(u32::MAX)))
}

pub(crate) fn is_hex(b: u8) -> bool {
    b.is_ascii_hexdigit()
}

fn hex_val(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0,
    }
}

/// True when every `%` starts a valid `%HH` escape.
pub(crate) fn escapes_valid(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while let Some(off) = b.get(i..).and_then(|r| r.iter().position(|&c| c == b'%')) {
        let p = i + off;
        match (b.get(p + 1), b.get(p + 2)) {
            (Some(&h), Some(&l)) if is_hex(h) && is_hex(l) => i = p + 3,
            _ => return false,
        }
    }
    true
}

/// %-decodes; invalid escapes are kept literally (callers validate beforehand).
pub(crate) fn percent_decode(s: &str) -> Cow<'_, [u8]> {
    if !s.contains('%') {
        return Cow::Borrowed(s.as_bytes());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            if let (Some(&h), Some(&l)) = (b.get(i + 1), b.get(i + 2)) {
                if is_hex(h) && is_hex(l) {
                    out.push(hex_val(h) << 4 | hex_val(l));
                    i += 3;
                    continue;
                }
            }
        }
        out.push(c);
        i += 1;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_respects_quotes_angles_and_escapes() {
        let cases: &[(&str, &[&str])] = &[
            ("a,b", &["a", "b"]),
            ("\"x,y\" <sip:a,b>,c", &["\"x,y\" <sip:a,b>", "c"]),
            ("\"a\\\",b\",c", &["\"a\\\",b\"", "c"]),
            ("\"open,never,closed", &["\"open,never,closed"]),
            ("", &[""]),
            (",", &["", ""]),
        ];
        for (input, want) in cases {
            let got: Vec<&str> = Split::commas(input).collect();
            assert_eq!(&got, want, "input {input:?}");
        }
    }

    #[test]
    fn quoted_end_handles_escapes_and_unterminated() {
        let cases: &[(&str, Option<usize>)] = &[
            ("\"abc\"", Some(4)),
            ("\"a\\\"b\"", Some(5)),
            ("\"a\\\\\"x", Some(4)),
            ("\"abc", None),
            ("\"abc\\\"", None),
            ("abc", None),
        ];
        for (input, want) in cases {
            assert_eq!(quoted_end(input, 0), *want, "input {input:?}");
        }
    }

    #[test]
    fn unescape_borrows_without_backslash() {
        assert!(matches!(unescape_quoted("plain"), Cow::Borrowed("plain")));
        assert_eq!(unescape_quoted("J Rosenberg \\\\\\\""), "J Rosenberg \\\"");
    }

    #[test]
    fn numbers_parse_and_saturate() {
        let cases: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("0068", Some(68)),
            ("18446744073709551615", Some(u64::MAX)),
            ("18446744073709551616", None),
            ("", None),
            ("-1", None),
            ("1 ", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_u64(input), *want, "input {input:?}");
        }
        assert_eq!(parse_delta_seconds("4294967296"), Some(u32::MAX));
        assert_eq!(parse_delta_seconds(&"9".repeat(100)), Some(u32::MAX));
        assert_eq!(parse_delta_seconds("3600"), Some(3600));
        assert_eq!(parse_delta_seconds("x"), None);
    }

    #[test]
    fn escapes_are_checked_and_decoded() {
        let cases: &[(&str, bool)] = &[
            ("abc", true),
            ("%41%62", true),
            ("%4", false),
            ("%ZZ", false),
            ("a%", false),
        ];
        for (input, want) in cases {
            assert_eq!(escapes_valid(input), *want, "input {input:?}");
        }
        assert_eq!(&*percent_decode("%75se%72"), b"user");
        assert_eq!(&*percent_decode("null-%00-null"), b"null-\0-null");
    }
}
