//! A parsed message: start line, header fields in order, body; typed accessors for
//! the headers the policy reads, and [`Message::validate`] for RFC 3261 §8.1.1.

use super::auth::{self, AuthHeader, DigestCredentials};
use super::framing::{self, MAX_HEADERS, Scanner};
use super::header::{self, Elements, Entry, Header, HeaderName, KNOWN_HEADERS};
use super::lex::{self, Split};
use super::method::Method;
use super::name_addr::{self, Contacts, NameAddr};
use super::uri::Uri;
use super::via::Via;
use super::{Framing, ParseError};
use std::cell::OnceCell;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartLine<'a> {
    Request {
        method: Method<'a>,
        uri: Uri<'a>,
        raw_uri: &'a str,
    },
    Response {
        code: u16,
        reason: &'a str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CSeq<'a> {
    /// At most 2^31-1 (RFC 3261 §8.1.1.5).
    pub seq: u32,
    pub method: Method<'a>,
}

/// A message's dialog identifiers and CSeq ([`Message::dialog_ids`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DialogIds<'a> {
    pub call_id: &'a str,
    pub from_tag: Option<&'a str>,
    pub to_tag: Option<&'a str>,
    pub cseq: CSeq<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    start: StartLine<'a>,
    /// The start line as received, without its CRLF.
    start_raw: &'a str,
    /// The header fields' text (after the start line, through the empty line).
    text: &'a str,
    entries: Entries,
    index: HeaderIndex,
    body: &'a [u8],
    content_length: Option<usize>,
    framing: Framing,
    wire_len: usize,
    parsed: Parsed<'a>,
}

/// The header values both `validate` and the policy read, parsed once: the second
/// reader gets the first one's result (and the same reading of the message) rather
/// than parsing the text again. Reading the credentials and name-addrs twice was
/// about an eighth of a digest REGISTER's native instructions (docs/performance.md,
/// "The policy, per message").
#[derive(Clone, Default)]
struct Parsed<'a> {
    from: OnceCell<Result<NameAddr<'a>, ParseError>>,
    to: OnceCell<Result<NameAddr<'a>, ParseError>>,
    contacts: OnceCell<Result<Contacts<'a>, ParseError>>,
    /// Authorization, then Proxy-Authorization ([`AuthHeader`]'s order).
    credentials: [OnceCell<CredentialList<'a>>; 2],
}

type CredentialList<'a> = Vec<Result<DigestCredentials<'a>, ParseError>>;

/// What was parsed so far is no part of a message's identity.
impl PartialEq for Parsed<'_> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Parsed<'_> {}

impl std::fmt::Debug for Parsed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Parsed")
    }
}

/// The stored fields: typical messages fit in place, so parsing allocates nothing;
/// longer ones continue on the heap.
#[derive(Clone)]
struct Entries {
    first: [Entry; INLINE],
    len: usize,
    rest: Vec<Entry>,
}

/// Enough for usual messages (a PBX's INVITE carries 10 to 20 header fields)
/// without making every `Message` large to move.
const INLINE: usize = 20;

impl Entries {
    fn new() -> Self {
        Entries {
            first: [Entry::default(); INLINE],
            len: 0,
            rest: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn push(&mut self, entry: Entry) {
        match self.first.get_mut(self.len) {
            Some(slot) => *slot = entry,
            None => self.rest.push(entry),
        }
        self.len += 1;
    }

    #[inline]
    fn get(&self, i: usize) -> Option<&Entry> {
        if i < INLINE {
            self.first.get(i).filter(|_| i < self.len)
        } else {
            self.rest.get(i - INLINE)
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Entry> {
        (0..self.len).filter_map(|i| self.get(i))
    }
}

/// The stored fields with one name, in order (see [`Message::entries_named`]).
struct Named<'m> {
    entries: &'m Entries,
    text: &'m str,
    /// Canonical.
    name: HeaderName,
    pos: usize,
    /// Where the search ends (exclusive).
    end: usize,
}

impl<'m> Iterator for Named<'m> {
    type Item = &'m Entry;

    #[inline]
    fn next(&mut self) -> Option<&'m Entry> {
        while self.pos < self.end {
            let entry = self.entries.get(self.pos)?;
            self.pos += 1;
            if self
                .name
                .matches(entry.known, || entry.header(self.text).name)
            {
                return Some(entry);
            }
        }
        None
    }
}

impl PartialEq for Entries {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for Entries {}

impl std::fmt::Debug for Entries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Where each known header first occurs, filled while the fields are split, so a
/// lookup is one array access instead of a walk over every field, and whether it
/// repeats, so single-valued headers are checked without counting.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HeaderIndex {
    /// Bit [`HeaderName::id`] set: the header is present.
    present: u64,
    /// Bit [`HeaderName::id`] set: the header occurs more than once.
    repeated: u64,
    /// Position in `entries` of the first field of each present known header
    /// (fits: at most [`MAX_HEADERS`] fields).
    first: [u8; KNOWN_HEADERS.len()],
}

// Bitsets over the known headers need one bit per known name.
const _: () = assert!(KNOWN_HEADERS.len() <= 64);
const _: () = assert!(MAX_HEADERS <= 256);

impl HeaderIndex {
    fn new() -> Self {
        HeaderIndex {
            present: 0,
            repeated: 0,
            first: [0; KNOWN_HEADERS.len()],
        }
    }

    fn add(&mut self, id: u8, position: usize) {
        let bit = 1u64 << (id & 63);
        if self.present & bit != 0 {
            self.repeated |= bit;
        } else {
            self.present |= bit;
            if let Some(slot) = self.first.get_mut(usize::from(id)) {
                *slot = position as u8;
            }
        }
    }
}

/// The bitset of some known headers.
const fn mask(names: &[HeaderName]) -> u64 {
    let mut m = 0;
    let mut i = 0;
    while i < names.len() {
        if let Some(id) = names[i].id() {
            m |= 1 << id;
        }
        i += 1;
    }
    m
}

/// Parses exactly one message occupying `buf`. Leading CRLFs (keep-alives) are
/// skipped.
///
/// - Datagram: Content-Length is optional (the body then runs to the end of `buf`);
///   one larger than the body is an error; bytes past it are ignored (RFC 3261
///   §18.3). With several Content-Length headers the first one frames the body and
///   [`Message::validate`] refuses the duplicate.
/// - Stream: Content-Length is required and must not be contradicted by another;
///   a header block without its empty line, or a body shorter than announced, is
///   [`ParseError::Incomplete`]. Bytes after the body other than CR/LF are refused
///   ([`ParseError::TrailingData`]) so a second message cannot ride along unjudged;
///   split streams with [`frame_stream`](super::frame_stream) first.
///
/// The start line (including the Request-URI) and the header field structure are
/// checked here; the header values are checked lazily by the accessors and all
/// together by [`Message::validate`].
pub fn parse(buf: &[u8], framing: Framing) -> Result<Message<'_>, ParseError> {
    parse_with(buf, framing, true)
}

/// [`parse`], optionally without the fast path for the header fields (tests check
/// that both give the same result).
#[inline(always)]
pub(crate) fn parse_with(
    buf: &[u8],
    framing: Framing,
    fast: bool,
) -> Result<Message<'_>, ParseError> {
    let start = framing::keepalive_len(buf);
    let unterminated = |e| match (e, framing) {
        (ParseError::Incomplete, Framing::Datagram) if start == buf.len() => ParseError::Empty,
        (ParseError::Incomplete, Framing::Datagram) => ParseError::UnterminatedHeaders,
        (e, _) => e,
    };
    let mut scanner = Scanner::new(buf, start);
    let (line_start, line_end) = scanner.start_line().map_err(unterminated)?;

    let fields_start = line_end + 2;
    let mut entries = Entries::new();
    let mut index = HeaderIndex::new();
    let fast = if fast {
        read_fields_fast(buf, &scanner, fields_start, &mut entries, &mut index)
    } else {
        None
    };
    let (content_length, conflicting) = match fast {
        Some((body_start, content_length, conflicting)) => {
            scanner.finish(body_start);
            (content_length, conflicting)
        }
        None => {
            // Start over on the exact path, which also finds the right error.
            entries = Entries::new();
            index = HeaderIndex::new();
            read_fields(buf, &mut scanner, fields_start, &mut entries, &mut index)
                .map_err(unterminated)?
        }
    };
    let body_start = scanner.body_start();
    // One UTF-8 check for the whole header block; every offset taken above sits next
    // to an ASCII byte, so slicing the checked text at them cannot fail.
    let head = utf8(buf, line_start, body_start)?;
    let start_line = parse_start_line(head.get(..line_end - line_start).unwrap_or(""))?;
    let text = head.get(fields_start - line_start..).unwrap_or("");

    // Kamailio's TCP reader (core/tcp_read.c) reads a message that starts `MSRP ` as
    // an MSRP frame, which ends at a line of dashes whatever its Content-Length says,
    // and, where HEP is taken (tcp_accept_hep3), one that starts `HEP3` as a HEP
    // packet, which its next two bytes measure: relayed onto a stream, a SIP request
    // of such a method would end where this parser reads on. No SIP request has one.
    if let StartLine::Request {
        method: Method::Other(m),
        ..
    } = start_line
        && (m.eq_ignore_ascii_case("MSRP")
            || m.get(..4).is_some_and(|h| h.eq_ignore_ascii_case("HEP3")))
    {
        return Err(ParseError::BadStartLine);
    }
    // A known method spelled in another case: Kamailio (its parser, tm, the dialog
    // module) reads it as the known method, this parser as another one (RFC 3261
    // §7.1): a `Cancel` judged as an extension method would be relayed, and cancel
    // a transaction, as no CANCEL is.
    if let StartLine::Request {
        method: Method::Other(m),
        ..
    } = start_line
        && crate::method::is_another_case_of_a_known_name(m)
    {
        return Err(ParseError::MethodCase);
    }
    // Kamailio's TCP reader takes a `Content_Length` field for Content-Length, this
    // parser does not: relayed onto a stream, such a message would end where this
    // parser reads on (docs/policy.md, "Threat model").
    if entries
        .iter()
        .any(|e| e.known.is_none() && e.header(text).name.eq_ignore_ascii_case("content_length"))
    {
        return Err(ParseError::BadContentLength);
    }
    // Two Content-Length values are refused whatever the transport: a datagram is
    // relayed onto a stream too (a carrier over TCP), where a reader that takes the
    // last value would end it elsewhere than Kamailio, which fixes only the first
    // when it relays, and read the rest as a request of its own.
    if conflicting {
        return Err(ParseError::BadContentLength);
    }
    let available = buf.get(body_start..).unwrap_or(&[]);
    let body = match framing {
        Framing::Datagram => match content_length {
            Some(n) => available
                .get(..n)
                .ok_or(ParseError::BodyShorterThanContentLength)?,
            None => available,
        },
        Framing::Stream => {
            let n = content_length.ok_or(ParseError::MissingHeader("Content-Length"))?;
            let body = available.get(..n).ok_or(ParseError::Incomplete)?;
            let after = available.get(n..).unwrap_or(&[]);
            if !after.iter().all(|&b| b == b'\r' || b == b'\n') {
                return Err(ParseError::TrailingData);
            }
            body
        }
    };
    Ok(Message {
        start: start_line,
        start_raw: head.get(..line_end - line_start).unwrap_or(""),
        text,
        entries,
        index,
        body,
        content_length,
        framing,
        wire_len: body_start + body.len(),
        parsed: Parsed::default(),
    })
}

/// [`read_fields`] for the usual shape of a header block, in one lean pass: every
/// line `name ":" value CRLF` with no folding, the limits not reached, every
/// Content-Length well-formed. Gives where the body starts, or `None` as soon as
/// anything else shows up (the caller then starts over on the exact path). On the
/// shape it accepts it stores exactly what [`read_fields`] stores. Kept out of line
/// so its loop gets the registers to itself.
#[inline(never)]
fn read_fields_fast(
    buf: &[u8],
    scanner: &Scanner<'_>,
    fields_start: usize,
    entries: &mut Entries,
    index: &mut HeaderIndex,
) -> Option<(usize, Option<usize>, bool)> {
    let (mut pos, limit) = scanner.window();
    let mut content_length = None;
    let mut conflicting = false;
    loop {
        if pos >= limit {
            return None;
        }
        if buf.get(pos..pos + 2)? == b"\r\n" {
            let body_start = pos + 2;
            return scanner.head_fits(body_start).then_some((
                body_start,
                content_length,
                conflicting,
            ));
        }
        if entries.len() == MAX_HEADERS {
            return None;
        }
        // A known name followed directly by the colon is recognised from the colon's
        // position alone; anything else is read as a token first.
        let rest = buf.get(pos..)?;
        let (name_end, colon, id) = match header::colon_in_name(rest)
            .and_then(|len| Some((len, header::classify(rest, len)?)))
        {
            Some((len, id)) => (pos + len, pos + len, Some(id)),
            None => {
                let name_end = lex::skip_token(buf, pos);
                let mut colon = name_end;
                while let Some(b' ' | b'\t') = buf.get(colon) {
                    colon += 1;
                }
                if name_end == pos || buf.get(colon) != Some(&b':') {
                    return None;
                }
                (name_end, colon, header::classify(rest, name_end - pos))
            }
        };
        let eol = colon + 1 + framing::find_cr_or_lf(buf.get(colon + 1..limit)?)?;
        if buf.get(eol..eol + 2)? != b"\r\n" {
            return None;
        }
        // A continuation line, or not knowing yet whether one follows.
        if matches!(buf.get(eol + 2), None | Some(b' ' | b'\t')) {
            return None;
        }
        if id == CONTENT_LENGTH {
            let n = framing::content_length_value(buf.get(colon + 1..eol)?).ok()?;
            match content_length {
                None => content_length = Some(n),
                Some(m) if m != n => conflicting = true,
                Some(_) => {}
            }
        }
        if let Some(id) = id {
            index.add(id, entries.len());
        }
        let at = |i: usize| i.wrapping_sub(fields_start) as u16;
        // Without folding, field n sits on line n + 2 (the start line is line 1).
        let line = entries.len() as u16 + 2;
        entries.push(Entry {
            name: (at(pos), at(name_end)),
            value: (at(colon + 1), at(eol)),
            line,
            known: id,
        });
        pos = eol + 2;
    }
}

/// Reads the header fields into `entries` and `index`; gives the first
/// Content-Length and whether another one contradicts it. Judges every shape and
/// reports the first error, so it is what [`read_fields_fast`] falls back to.
#[inline(never)]
fn read_fields(
    buf: &[u8],
    scanner: &mut Scanner<'_>,
    fields_start: usize,
    entries: &mut Entries,
    index: &mut HeaderIndex,
) -> Result<(Option<usize>, bool), ParseError> {
    let mut content_length = None;
    let mut conflicting = false;
    while let Some(field) = scanner.next_field()? {
        let bad = ParseError::BadHeader { line: field.line };
        if entries.len() == MAX_HEADERS {
            return Err(ParseError::TooManyHeaders);
        }
        let bytes = buf.get(field.start..field.end).ok_or(bad)?;
        // The name is a token, then optional SP/HT, then the colon.
        let (name_len, id) = header::scan(bytes);
        let mut colon = name_len;
        while let Some(b' ' | b'\t') = bytes.get(colon) {
            colon += 1;
        }
        if name_len == 0 || bytes.get(colon) != Some(&b':') {
            return Err(bad);
        }
        if id == CONTENT_LENGTH {
            let n = framing::content_length_value(bytes.get(colon + 1..).unwrap_or(&[]))?;
            match content_length {
                None => content_length = Some(n),
                Some(m) if m != n => conflicting = true,
                Some(_) => {}
            }
        }
        if let Some(id) = id {
            index.add(id, entries.len());
        }
        // The scanner keeps the header block within MAX_HEAD_LEN (64 KiB), so
        // offsets and line numbers fit u16.
        let at = |i: usize| i.wrapping_sub(fields_start) as u16;
        entries.push(Entry {
            name: (at(field.start), at(field.start + name_len)),
            value: (at(field.start + colon + 1), at(field.end)),
            line: field.line as u16,
            known: id,
        });
    }
    Ok((content_length, conflicting))
}

/// Header text is UTF-8 (RFC 3261 TEXT-UTF8); anything else is refused rather than
/// decoded lossily, so no two different byte strings read as the same header.
fn utf8(buf: &[u8], start: usize, end: usize) -> Result<&str, ParseError> {
    let bytes = buf.get(start..end).ok_or(ParseError::BadStartLine)?;
    std::str::from_utf8(bytes).map_err(|_| ParseError::NotUtf8)
}

/// `SIP` in any case then `/2.0`, compared as one word: only the letters are
/// folded (see [`lex::FOLD`]), the rest must match exactly.
fn is_sip_2_0(version: &str) -> bool {
    version.len() == 7
        && lex::load_word(version.as_bytes(), 0) | 0x20_2020 == lex::pack_lower("SIP/2.0", 0)
}

/// `SIP/` in any case.
fn starts_with_sip(s: &str) -> bool {
    let prefix = lex::load_word(s.as_bytes(), 0) & lex::low_bytes(4);
    s.len() >= 4 && prefix | 0x20_2020 == lex::pack_lower("SIP/", 0)
}

fn parse_start_line(line: &str) -> Result<StartLine<'_>, ParseError> {
    if starts_with_sip(line) {
        let (version, rest) = lex::split_once_byte(line, b' ').ok_or(ParseError::BadStartLine)?;
        if !is_sip_2_0(version) {
            return Err(ParseError::BadVersion);
        }
        let (code, reason) = lex::split_once_byte(rest, b' ').unwrap_or((rest, ""));
        // Status-Code is exactly three digits; refusing longer ones early keeps
        // `4294967301` (bigcode) from wrapping into a valid code.
        let code = match code.as_bytes() {
            &[a, b, c] if [a, b, c].iter().all(u8::is_ascii_digit) => {
                u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
            }
            _ => return Err(ParseError::BadStatusCode),
        };
        if !(100..=699).contains(&code) {
            return Err(ParseError::BadStatusCode);
        }
        return Ok(StartLine::Response { code, reason });
    }
    // Trailing whitespace after SIP-Version is tolerated (RFC 4475 §3.1.2.6 trws).
    let kept = line
        .bytes()
        .rposition(|b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    let line = line.get(..kept).unwrap_or("");
    // The method is a token ending at the first SP: anything else before that SP,
    // or no SP at all, is malformed.
    let method_end = lex::skip_token(line.as_bytes(), 0);
    if method_end == 0 || line.as_bytes().get(method_end) != Some(&b' ') {
        return Err(ParseError::BadStartLine);
    }
    let (method, rest) = lex::split_around(line, method_end);
    let version_sp = rest
        .bytes()
        .rposition(|b| b == b' ')
        .ok_or(ParseError::BadStartLine)?;
    let (raw_uri, version) = lex::split_around(rest, version_sp);
    if !is_sip_2_0(version) {
        return Err(if starts_with_sip(version) {
            ParseError::BadVersion
        } else {
            ParseError::BadStartLine
        });
    }
    let uri = Uri::parse_request_uri(raw_uri).map_err(|e| {
        // Exactly one SP between the elements (RFC 4475 lwsstart, lwsruri). A URI
        // never parses when empty or holding SP/HT, so this is only looked at once
        // it failed, and takes precedence over what the URI parser says.
        if raw_uri.is_empty() || raw_uri.bytes().any(|b| b == b' ' || b == b'\t') {
            ParseError::BadStartLine
        } else {
            e
        }
    })?;
    Ok(StartLine::Request {
        method: Method::from_token(method),
        uri,
        raw_uri,
    })
}

fn parse_cseq(v: &str) -> Result<CSeq<'_>, &'static str> {
    let b = v.as_bytes();
    let digits = b.iter().take_while(|d| d.is_ascii_digit()).count();
    if digits == 0 {
        return Err("bad sequence number");
    }
    // Saturating keeps any number too long for u64 above the limit as well.
    let seq = b.iter().take(digits).fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    let seq = u32::try_from(seq)
        .ok()
        .filter(|&n| n <= 0x7fff_ffff)
        .ok_or("sequence number out of range")?;
    let method_start = lex::skip_lws(b, digits);
    let method_end = lex::skip_token(b, method_start);
    if method_start == digits || method_end == method_start {
        return Err("missing method");
    }
    if lex::skip_lws(b, method_end) != b.len() {
        return Err("unexpected text after method");
    }
    Ok(CSeq {
        seq,
        method: Method::from_token(v.get(method_start..method_end).unwrap_or("")),
    })
}

/// Headers that may appear at most once (RFC 3261 §7.3.1: only list headers repeat).
const SINGLE_HEADERS: &[HeaderName] = &[
    HeaderName::CallId,
    HeaderName::CSeq,
    HeaderName::From,
    HeaderName::To,
    HeaderName::MaxForwards,
    HeaderName::ContentLength,
    HeaderName::ContentType,
    HeaderName::Expires,
    HeaderName::MinExpires,
    HeaderName::Date,
];

/// Headers every request and response carries (RFC 3261 §8.1.1); Max-Forwards is
/// left out because RFC 2543 peers omit it and a proxy inserts it (§16.6).
const REQUIRED_HEADERS: &[HeaderName] = &[
    HeaderName::To,
    HeaderName::From,
    HeaderName::CSeq,
    HeaderName::CallId,
    HeaderName::Via,
];

const CONTENT_LENGTH: Option<u8> = HeaderName::ContentLength.id();
const SINGLE_MASK: u64 = mask(SINGLE_HEADERS);
const REQUIRED_MASK: u64 = mask(REQUIRED_HEADERS);

fn bad_value(header: HeaderName) -> impl Fn(&'static str) -> ParseError {
    move |reason| ParseError::BadHeaderValue {
        header: header.as_str(),
        reason,
    }
}

impl<'a> Message<'a> {
    pub fn start(&self) -> &StartLine<'a> {
        &self.start
    }

    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    pub fn method(&self) -> Option<Method<'a>> {
        match self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    pub fn request_uri(&self) -> Option<&Uri<'a>> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(uri),
            StartLine::Response { .. } => None,
        }
    }

    pub fn status_code(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { code, .. } => Some(code),
            StartLine::Request { .. } => None,
        }
    }

    pub fn reason_phrase(&self) -> Option<&'a str> {
        match self.start {
            StartLine::Response { reason, .. } => Some(reason),
            StartLine::Request { .. } => None,
        }
    }

    /// Every header field in order as (name as received, trimmed value). A folded
    /// value keeps its inner CRLF+WS; [`unfold`](super::unfold) joins it.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.header_fields().map(|h| (h.name, h.value))
    }

    /// The header fields in order, with their line numbers and classification.
    pub fn header_fields(&self) -> impl Iterator<Item = Header<'a>> {
        let text = self.text;
        self.entries.iter().map(move |e| e.header(text))
    }

    /// The stored fields named `name` (canonical), in order. A known name starts at
    /// its first occurrence and, unless it repeats, stops there.
    fn entries_named(&self, name: HeaderName) -> Named<'_> {
        let (pos, end) = match name.id() {
            Some(id) => {
                let bit = 1u64 << (id & 63);
                let first = self.first(id);
                if self.index.present & bit == 0 {
                    (0, 0)
                } else if self.index.repeated & bit == 0 {
                    (first, first + 1)
                } else {
                    (first, self.entries.len())
                }
            }
            None => (0, self.entries.len()),
        };
        Named {
            entries: &self.entries,
            text: self.text,
            name,
            pos,
            end,
        }
    }

    fn first(&self, id: u8) -> usize {
        self.index
            .first
            .get(usize::from(id))
            .map_or(self.entries.len(), |&i| usize::from(i))
    }

    /// The first field of a known header.
    fn first_entry(&self, id: u8) -> Option<&Entry> {
        if self.index.present & (1u64 << (id & 63)) == 0 {
            return None;
        }
        self.entries.get(self.first(id))
    }

    fn has(&self, name: HeaderName) -> bool {
        name.id()
            .is_some_and(|id| self.index.present & (1u64 << (id & 63)) != 0)
    }

    /// The fields named `name` (long or compact form, any case), unsplit.
    pub fn fields(&self, name: HeaderName) -> impl Iterator<Item = Header<'a>> {
        let text = self.text;
        self.entries_named(name.canonical())
            .map(move |e| e.header(text))
    }

    /// The values of the fields named `name` (canonical), unsplit.
    fn field_values(&self, name: HeaderName) -> impl Iterator<Item = &'a str> {
        let text = self.text;
        self.entries_named(name).map(move |e| e.value(text))
    }

    /// Every value of a header: list headers are split at commas outside quotes and
    /// `<>` (empty elements skipped); each value is trimmed.
    pub fn header_values(&self, name: HeaderName) -> impl Iterator<Item = &'a str> {
        let name = name.canonical();
        let list = name.is_list();
        self.field_values(name)
            .flat_map(move |v| Elements::new(v, list))
    }

    /// The first value of a header.
    #[inline]
    pub fn header(&self, name: HeaderName) -> Option<&'a str> {
        let name = name.canonical();
        match name.id() {
            Some(id) if !name.is_list() => self.first_entry(id).map(|e| e.value(self.text)),
            _ => self.header_values(name).next(),
        }
    }

    pub fn has_header(&self, name: HeaderName) -> bool {
        self.fields(name).next().is_some()
    }

    pub fn call_id(&self) -> Option<&'a str> {
        self.header(HeaderName::CallId)
    }

    pub fn cseq(&self) -> Result<CSeq<'a>, ParseError> {
        let v = self
            .header(HeaderName::CSeq)
            .ok_or(ParseError::MissingHeader("CSeq"))?;
        parse_cseq(v).map_err(bad_value(HeaderName::CSeq))
    }

    fn name_addr(&self, name: HeaderName) -> Result<NameAddr<'a>, ParseError> {
        let v = self
            .header(name)
            .ok_or(ParseError::MissingHeader(name.as_str()))?;
        NameAddr::parse(v).map_err(bad_value(name))
    }

    /// The message as it leaves the edge: every field named in `strip` removed (long
    /// or compact form, any case), the `insert` fields added after the others, the
    /// rest byte for byte as received. Hosts that relay bytes apply a verdict's
    /// `strip`/`insert` with this, so they never re-parse the message their own way.
    pub fn edited<S: AsRef<str>>(&self, strip: &[S], insert: &[(String, String)]) -> Vec<u8> {
        let stripped: Vec<(Option<u8>, &str)> = strip
            .iter()
            .map(|name| {
                let name = name.as_ref();
                (HeaderName::from_name(name).and_then(|h| h.id()), name)
            })
            .collect();
        let drop = |e: &Entry| {
            let name = e.header(self.text).name;
            stripped.iter().any(|&(id, s)| match (id, e.known) {
                (Some(a), Some(b)) => a == b,
                _ => name.eq_ignore_ascii_case(s),
            })
        };
        let mut out = Vec::with_capacity(self.wire_len + 64);
        out.extend_from_slice(self.start_raw.as_bytes());
        out.extend_from_slice(b"\r\n");
        // A field runs from its name to the next field's name (its folded lines and
        // CRLF included); the last one to the empty line.
        let fields_end = self.text.len().saturating_sub(2);
        for (i, e) in self.entries.iter().enumerate() {
            let end = self
                .entries
                .get(i + 1)
                .map_or(fields_end, |next| usize::from(next.name.0));
            if !drop(e) {
                let field = self.text.get(usize::from(e.name.0)..end).unwrap_or("");
                let field = field.strip_suffix("\r\n").unwrap_or(field);
                // Unfolded (RFC 3261 §7.3.1 allows it): a continuation line kept as
                // is could read as a header of its own to a parser that does not
                // unfold, placing a forged trunk-group header or Route before ours.
                let mut rest = field;
                while let Some(i) = rest.find("\r\n") {
                    out.extend_from_slice(rest.get(..i).unwrap_or("").as_bytes());
                    out.push(b' ');
                    rest = rest
                        .get(i + 2..)
                        .unwrap_or("")
                        .trim_start_matches([' ', '\t']);
                }
                out.extend_from_slice(rest.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        for (name, value) in insert {
            // Values come from the configuration and the verdict; a line break in
            // one must not start a header of its own.
            let line = format!("{name}: {value}");
            out.extend(
                line.bytes()
                    .map(|b| if matches!(b, b'\r' | b'\n') { b' ' } else { b }),
            );
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(self.body);
        out
    }

    fn repeated(&self, name: HeaderName) -> bool {
        name.id()
            .is_some_and(|id| self.index.repeated & (1u64 << (id & 63)) != 0)
    }

    /// The To tag, after checking that the dialog identifiers (RFC 3261 §12) can be
    /// read only one way: one To, one From and one Call-ID field (long and compact
    /// forms count together), each tag at most once, never empty. A proxy that keeps
    /// the first of two tags and another that keeps the last would disagree on
    /// whether a request is inside a dialog (docs/policy.md, "Threat model").
    pub fn dialog_to_tag(&self) -> Result<Option<&'a str>, ParseError> {
        for name in [HeaderName::To, HeaderName::From, HeaderName::CallId] {
            if self.repeated(name) {
                return Err(ParseError::DuplicateHeader(name.as_str()));
            }
        }
        if self.call_id().is_none_or(str::is_empty) {
            return Err(ParseError::MissingHeader(HeaderName::CallId.as_str()));
        }
        self.from()?;
        Ok(self.to()?.tag)
    }

    /// The dialog identifiers (RFC 3261 §12) and CSeq of a request or a response,
    /// read only one way ([`Message::dialog_to_tag`]'s checks, one CSeq field): what
    /// a host matches transactions and dialogs by must be what the policy and the
    /// next hop read, never a reading of its own.
    pub fn dialog_ids(&self) -> Result<DialogIds<'a>, ParseError> {
        let to_tag = self.dialog_to_tag()?;
        if self.repeated(HeaderName::CSeq) {
            return Err(ParseError::DuplicateHeader(HeaderName::CSeq.as_str()));
        }
        Ok(DialogIds {
            call_id: self.call_id().unwrap_or_default(),
            from_tag: self.from()?.tag,
            to_tag,
            cseq: self.cseq()?,
        })
    }

    pub fn from(&self) -> Result<NameAddr<'a>, ParseError> {
        *self
            .parsed
            .from
            .get_or_init(|| self.name_addr(HeaderName::From))
    }

    pub fn to(&self) -> Result<NameAddr<'a>, ParseError> {
        *self
            .parsed
            .to
            .get_or_init(|| self.name_addr(HeaderName::To))
    }

    /// Every Via element, top first, across all Via fields; empty elements are
    /// errors.
    pub fn vias(&self) -> impl Iterator<Item = Result<Via<'a>, ParseError>> {
        self.field_values(HeaderName::Via)
            .flat_map(Split::commas)
            .map(|element| Via::parse(element).map_err(bad_value(HeaderName::Via)))
    }

    pub fn top_via(&self) -> Result<Via<'a>, ParseError> {
        self.vias()
            .next()
            .unwrap_or(Err(ParseError::MissingHeader("Via")))
    }

    /// All Contact values; an absent Contact is an empty list.
    pub fn contacts(&self) -> Result<Contacts<'a>, ParseError> {
        self.contact_list().clone()
    }

    fn contact_list(&self) -> &Result<Contacts<'a>, ParseError> {
        self.parsed.contacts.get_or_init(|| {
            name_addr::parse_contacts(self.field_values(HeaderName::Contact))
                .map_err(bad_value(HeaderName::Contact))
        })
    }

    /// Route or Record-Route entries, in order.
    pub fn name_addrs(
        &self,
        name: HeaderName,
    ) -> impl Iterator<Item = Result<NameAddr<'a>, ParseError>> {
        let canonical = name.canonical();
        self.field_values(canonical)
            .flat_map(name_addr::parse_list)
            .map(move |r| r.map_err(bad_value(canonical)))
    }

    /// The Expires header in delta-seconds; values over 2^32-1 are taken as
    /// 2^32-1 (RFC 3261 §20.19).
    pub fn expires(&self) -> Result<Option<u32>, ParseError> {
        self.header(HeaderName::Expires)
            .map(|v| lex::parse_delta_seconds(v).ok_or("not delta-seconds"))
            .transpose()
            .map_err(bad_value(HeaderName::Expires))
    }

    /// Max-Forwards, 0..=255.
    pub fn max_forwards(&self) -> Result<Option<u32>, ParseError> {
        self.header(HeaderName::MaxForwards)
            .map(|v| {
                lex::parse_u64(v)
                    .filter(|&n| n <= 255)
                    .map(|n| n as u32)
                    .ok_or("not a number in 0..=255")
            })
            .transpose()
            .map_err(bad_value(HeaderName::MaxForwards))
    }

    /// The Content-Length that framed the body (the first one), if any.
    pub fn content_length(&self) -> Option<usize> {
        self.content_length
    }

    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Bytes of the buffer this message occupied, keep-alive CRLFs before it
    /// included, bytes ignored after the body excluded.
    pub fn wire_len(&self) -> usize {
        self.wire_len
    }

    /// Digest credentials of every Authorization or Proxy-Authorization field.
    /// Fields with another well-formed scheme are skipped (so the policy challenges
    /// as if there were none); malformed fields yield an error.
    pub fn credentials(
        &self,
        kind: AuthHeader,
    ) -> impl Iterator<Item = Result<DigestCredentials<'a>, ParseError>> {
        self.credential_list(kind).iter().cloned()
    }

    fn credential_list(&self, kind: AuthHeader) -> &CredentialList<'a> {
        let slot = match kind {
            AuthHeader::Authorization => 0,
            AuthHeader::ProxyAuthorization => 1,
        };
        let name = kind.header_name();
        self.parsed.credentials[slot].get_or_init(|| {
            self.field_values(name)
                .filter_map(|v| auth::parse(v).map_err(bad_value(name)).transpose())
                .collect()
        })
    }

    /// Checks what RFC 3261 §8.1.1 requires of every request (and, except for the
    /// method, of every response): the mandatory headers present (Max-Forwards may
    /// be missing), single-valued headers not repeated, and the syntax of every
    /// header this crate understands, with the CSeq method equal to the request
    /// method.
    ///
    /// The checks run in a fixed order (the first failure is the one reported), each
    /// reaching its header through the index.
    pub fn validate(&self) -> Result<(), ParseError> {
        if self.index.present & REQUIRED_MASK != REQUIRED_MASK {
            if let Some(name) = REQUIRED_HEADERS.iter().find(|&&h| !self.has(h)) {
                return Err(ParseError::MissingHeader(name.as_str()));
            }
        }
        if self.index.repeated & SINGLE_MASK != 0 {
            if let Some(name) = SINGLE_HEADERS.iter().find(|&&h| self.repeated(h)) {
                return Err(ParseError::DuplicateHeader(name.as_str()));
            }
        }
        let call_id = self.call_id().unwrap_or("");
        if call_id.is_empty() || !call_id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad_value(HeaderName::CallId)("not a word[@word]"));
        }
        self.from()?;
        self.to()?;
        let cseq = self.cseq()?;
        if self.method().is_some_and(|m| m != cseq.method) {
            return Err(ParseError::CSeqMismatch);
        }
        for via in self.vias() {
            via?;
        }
        self.max_forwards()?;
        self.expires()?;
        if self.has(HeaderName::Contact) {
            self.contact_list().as_ref().map_err(|e| *e)?;
        }
        for name in [HeaderName::Route, HeaderName::RecordRoute] {
            for entry in self.name_addrs(name) {
                entry?;
            }
        }
        if let Some(date) = self.header(HeaderName::Date) {
            // rfc1123-date always ends in GMT (RFC 3261 §20.17); the rest is not
            // worth a calendar parser here.
            if !date.ends_with("GMT") {
                return Err(bad_value(HeaderName::Date)("not in GMT"));
            }
        }
        for kind in [AuthHeader::Authorization, AuthHeader::ProxyAuthorization] {
            for creds in self.credential_list(kind) {
                creds.as_ref().map_err(|e| *e)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Contacts, Host, Transport};

    fn msg(lines: &[&str], body: &str) -> Vec<u8> {
        let mut s = lines.join("\r\n");
        s.push_str("\r\n\r\n");
        s.push_str(body);
        s.into_bytes()
    }

    fn register() -> Vec<u8> {
        msg(
            &[
                "REGISTER sip:trunks.example.net SIP/2.0",
                "Via: SIP/2.0/UDP 203.0.113.7:5060;branch=z9hG4bK776asdhds;rport",
                "Max-Forwards: 70",
                "To: <sip:hq1@trunks.example.net>",
                "From: \"HQ\" <sip:hq1@trunks.example.net>;tag=1928301774",
                "Call-ID: a84b4c76e66710@pbx.example.com",
                "CSeq: 314159 REGISTER",
                "Contact: <sip:hq1@203.0.113.7:5060;transport=udp>;expires=3600",
                "Authorization: Digest username=\"hq1\", realm=\"trunks.example.net\", nonce=\"n\", uri=\"sip:trunks.example.net\", response=\"r\"",
                "Expires: 7200",
                "Content-Length: 0",
            ],
            "",
        )
    }

    #[test]
    fn a_header_read_after_validate_is_the_parse_validate_made_and_no_part_of_equality() {
        let buf = register();
        let fresh = parse(&buf, Framing::Stream).unwrap_or_else(|e| panic!("{e}"));
        let read = fresh.clone();
        assert_eq!(read.validate(), Ok(()));
        assert_eq!(
            read, fresh,
            "a message stays equal to its copy whatever each parsed"
        );
        assert_eq!(read.from(), fresh.from());
        assert_eq!(read.to(), fresh.to());
        assert_eq!(read.contacts(), fresh.contacts());
        for kind in [AuthHeader::Authorization, AuthHeader::ProxyAuthorization] {
            assert!(read.credentials(kind).eq(fresh.credentials(kind)));
        }
        assert_eq!(read.credentials(AuthHeader::Authorization).count(), 1);
        // A malformed value reads as the same error every time.
        let bad = msg(
            &[
                "OPTIONS sip:a@b SIP/2.0",
                "Contact: <sip:a@b",
                "Content-Length: 0",
            ],
            "",
        );
        let m = parse(&bad, Framing::Stream).unwrap_or_else(|e| panic!("{e}"));
        assert!(m.contacts().is_err());
        assert_eq!(m.contacts(), m.contacts());
    }

    #[test]
    fn register_exposes_typed_headers() {
        let buf = register();
        let m = parse(&buf, Framing::Stream).unwrap_or_else(|e| panic!("{e}"));
        assert!(m.is_request());
        assert_eq!(m.method(), Some(Method::Register));
        assert_eq!(
            m.request_uri().map(|u| u.host),
            Some(Host::Name("trunks.example.net"))
        );
        assert_eq!(m.call_id(), Some("a84b4c76e66710@pbx.example.com"));
        assert_eq!(
            m.cseq(),
            Ok(CSeq {
                seq: 314159,
                method: Method::Register
            })
        );
        assert_eq!(m.from().map(|f| f.tag), Ok(Some("1928301774")));
        assert_eq!(m.to().map(|t| t.tag), Ok(None));
        let via = m.top_via().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(via.transport, Some(Transport::Udp));
        assert_eq!(via.rport, Some(None));
        assert_eq!(m.expires(), Ok(Some(7200)));
        assert_eq!(m.max_forwards(), Ok(Some(70)));
        assert_eq!(m.content_length(), Some(0));
        let Ok(Contacts::List(contacts)) = m.contacts() else {
            panic!("contacts");
        };
        assert_eq!(contacts[0].expires, Some(3600));
        assert_eq!(contacts[0].addr.uri.transport_param(), Some("udp"));
        let creds: Vec<_> = m.credentials(AuthHeader::Authorization).collect();
        assert_eq!(creds.len(), 1);
        assert!(matches!(&creds[0], Ok(c) if c.username == "hq1"));
        assert_eq!(m.credentials(AuthHeader::ProxyAuthorization).count(), 0);
        assert_eq!(m.validate(), Ok(()));
        assert_eq!(m.wire_len(), buf.len());
    }

    #[test]
    fn start_lines_parse_or_are_refused() {
        let cases: &[(&str, Result<(), ParseError>)] = &[
            ("OPTIONS sip:a@b SIP/2.0", Ok(())),
            ("OPTIONS sip:a@b sip/2.0", Ok(())),
            ("OPTIONS sip:a@b SIP/2.0  ", Ok(())),
            ("SIP/2.0 200 OK", Ok(())),
            ("SIP/2.0 100 ", Ok(())),
            ("SIP/2.0 180", Ok(())),
            ("SIP/2.0 699 x", Ok(())),
            (
                "SIP/2.0 4294967301 better not break the receiver",
                Err(ParseError::BadStatusCode),
            ),
            ("SIP/2.0 099 x", Err(ParseError::BadStatusCode)),
            ("SIP/2.0 700 x", Err(ParseError::BadStatusCode)),
            ("SIP/2.0 20 x", Err(ParseError::BadStatusCode)),
            ("SIP/2.0  200 OK", Err(ParseError::BadStatusCode)),
            ("SIP/7.0 200 OK", Err(ParseError::BadVersion)),
            ("SIP/2.0", Err(ParseError::BadStartLine)),
            (
                "OPTIONS sip:t.watson@example.org SIP/7.0",
                Err(ParseError::BadVersion),
            ),
            ("OPTIONS sip:a@b HTTP/1.1", Err(ParseError::BadStartLine)),
            (
                "INVITE  sip:user@example.com  SIP/2.0",
                Err(ParseError::BadStartLine),
            ),
            (
                " INVITE sip:user@example.com SIP/2.0",
                Err(ParseError::BadStartLine),
            ),
            (
                "INVITE sip:user@example.com; lr SIP/2.0",
                Err(ParseError::BadStartLine),
            ),
            ("INVITE sip:a@b", Err(ParseError::BadStartLine)),
            ("INVITE", Err(ParseError::BadStartLine)),
            ("INV\"ITE sip:a@b SIP/2.0", Err(ParseError::BadStartLine)),
            (
                "INVITE <sip:user@example.com> SIP/2.0",
                Err(ParseError::BadUri {
                    reason: "bad scheme",
                }),
            ),
            (
                "INVITE sip:2001:db8::10 SIP/2.0",
                Err(ParseError::BadUri { reason: "bad port" }),
            ),
            (
                "INVITE sip:user@example.com?Route=%3Csip:example.com%3E SIP/2.0",
                Err(ParseError::BadUri {
                    reason: "headers not allowed in Request-URI",
                }),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse_start_line(line).map(|_| ()), *want, "{line:?}");
        }
    }

    #[test]
    fn cseq_values_parse_or_are_refused() {
        type Row<'a> = (&'a str, Result<(u32, Method<'a>), &'a str>);
        let cases: &[Row] = &[
            ("1 INVITE", Ok((1, Method::Invite))),
            ("0009\r\n  INVITE", Ok((9, Method::Invite))),
            ("2147483647 ACK", Ok((2_147_483_647, Method::Ack))),
            ("2147483648 ACK", Err("sequence number out of range")),
            (
                "36893488147419103232 REGISTER",
                Err("sequence number out of range"),
            ),
            ("-1 INVITE", Err("bad sequence number")),
            ("1INVITE", Err("missing method")),
            ("1 ", Err("missing method")),
            ("1 INVITE x", Err("unexpected text after method")),
        ];
        for (input, want) in cases {
            let got = parse_cseq(input).map(|c| (c.seq, c.method));
            assert_eq!(got, *want, "{input:?}");
        }
    }

    #[test]
    fn dialog_ids_read_tags_past_quoted_parameters_and_refuse_a_second_cseq() {
        let response = |from: &str, cseq: &[&str]| {
            let mut lines = vec![
                "SIP/2.0 200 OK",
                "Via: SIP/2.0/UDP h;branch=z9hG4bK1",
                from,
                "To: <sip:b@x>;tag=tt",
                "Call-ID: c@h",
            ];
            lines.extend_from_slice(cseq);
            msg(&lines, "")
        };
        type Row<'t> = (
            &'t str,
            &'t [&'t str],
            Result<(Option<&'t str>, &'t str), ()>,
        );
        let table: [Row<'_>; 5] = [
            (
                "From: <sip:a@x>;tag=ft",
                &["CSeq: 1 INVITE"],
                Ok((Some("ft"), "INVITE")),
            ),
            // A `>` or a `;tag=` inside a quoted parameter is the parameter's.
            (
                "From: <sip:a@x>;tag=ft;x=\">\"",
                &["CSeq: 1 INVITE"],
                Ok((Some("ft"), "INVITE")),
            ),
            (
                "From: <sip:a@x>;x=\"q;tag=zz;\";tag=ft",
                &["CSeq: 1 INVITE"],
                Ok((Some("ft"), "INVITE")),
            ),
            (
                "From: <sip:a@x>;tag=ft",
                &["CSeq: 1 invite"],
                Ok((Some("ft"), "invite")),
            ),
            (
                "From: <sip:a@x>;tag=ft",
                &["CSeq: 1 INVITE", "CSeq: 1 BYE"],
                Err(()),
            ),
        ];
        for (from, cseq, want) in table {
            let raw = response(from, cseq);
            let m = parse(&raw, Framing::Datagram).unwrap();
            let got = m
                .dialog_ids()
                .map(|ids| {
                    assert_eq!(
                        (ids.call_id, ids.to_tag, ids.cseq.seq),
                        ("c@h", Some("tt"), 1)
                    );
                    (ids.from_tag, ids.cseq.method.as_str())
                })
                .map_err(|_| ());
            assert_eq!(got, want, "{from} {cseq:?}");
        }
    }

    #[test]
    fn datagram_and_stream_framing_rules() {
        let base = [
            "OPTIONS sip:a@b SIP/2.0",
            "Via: SIP/2.0/UDP h;branch=z9hG4bK1",
        ];
        let with = |extra: &[&str], body: &str| {
            let mut lines = base.to_vec();
            lines.extend_from_slice(extra);
            msg(&lines, body)
        };
        type Row<'a> = (&'a str, Vec<u8>, Framing, Result<&'a [u8], ParseError>);
        let cases: Vec<Row> = vec![
            (
                "no CL over datagram takes the rest",
                with(&[], "abc"),
                Framing::Datagram,
                Ok(b"abc"),
            ),
            (
                "no CL over stream is refused",
                with(&[], ""),
                Framing::Stream,
                Err(ParseError::MissingHeader("Content-Length")),
            ),
            (
                "short CL over datagram ignores extra",
                with(&["l: 1"], "abc"),
                Framing::Datagram,
                Ok(b"a"),
            ),
            (
                "long CL over datagram is an error",
                with(&["l: 9"], "abc"),
                Framing::Datagram,
                Err(ParseError::BodyShorterThanContentLength),
            ),
            (
                "long CL over stream is incomplete",
                with(&["l: 9"], "abc"),
                Framing::Stream,
                Err(ParseError::Incomplete),
            ),
            (
                "extra bytes over stream are refused",
                with(&["l: 1"], "abc"),
                Framing::Stream,
                Err(ParseError::TrailingData),
            ),
            (
                "trailing CRLF over stream is fine",
                with(&["l: 1"], "a\r\n"),
                Framing::Stream,
                Ok(b"a"),
            ),
            (
                "negative CL",
                with(&["Content-Length: -999"], ""),
                Framing::Datagram,
                Err(ParseError::BadContentLength),
            ),
            (
                "conflicting CL over stream",
                with(&["l: 1", "l: 2"], "ab"),
                Framing::Stream,
                Err(ParseError::BadContentLength),
            ),
            (
                "conflicting CL over datagram too",
                with(&["l: 1", "l: 2"], "ab"),
                Framing::Datagram,
                Err(ParseError::BadContentLength),
            ),
            (
                "leading keep-alives are skipped",
                [b"\r\n\r\n".as_slice(), &with(&["l: 0"], "")].concat(),
                Framing::Stream,
                Ok(b""),
            ),
            (
                "a Content_Length field, Content-Length to Kamailio's TCP reader",
                with(&["CONTENT_length: 0", "l: 2"], "ab"),
                Framing::Datagram,
                Err(ParseError::BadContentLength),
            ),
            (
                "a HEP3 request, a HEP packet to a Kamailio that takes HEP",
                [
                    b"HEP3s".as_slice(),
                    &with(&["l: 0"], "")[b"OPTIONS".len()..],
                ]
                .concat(),
                Framing::Stream,
                Err(ParseError::BadStartLine),
            ),
            (
                "an MSRP request, an MSRP frame to Kamailio's TCP reader",
                [b"MSRP".as_slice(), &with(&["l: 0"], "")[b"OPTIONS".len()..]].concat(),
                Framing::Stream,
                Err(ParseError::BadStartLine),
            ),
        ];
        for (name, buf, framing, want) in cases {
            assert_eq!(parse(&buf, framing).map(|m| m.body()), want, "{name}");
        }
    }

    #[test]
    fn head_limits_and_structure_are_enforced() {
        let many: Vec<String> = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v")).collect();
        let mut lines = vec!["OPTIONS sip:a@b SIP/2.0".to_string()];
        lines.extend(many);
        let too_many = msg(&lines.iter().map(String::as_str).collect::<Vec<_>>(), "");
        let huge = msg(
            &[
                "OPTIONS sip:a@b SIP/2.0",
                &format!("X: {}", "a".repeat(70_000)),
            ],
            "",
        );
        let cases: Vec<(&str, Vec<u8>, ParseError)> = vec![
            ("too many headers", too_many, ParseError::TooManyHeaders),
            ("head too large", huge, ParseError::TooLarge),
            (
                "not utf-8",
                msg(&["OPTIONS sip:a@b SIP/2.0", "X: \u{ff}"], "")
                    .into_iter()
                    .map(|b| if b == 0xc3 { 0xff } else { b })
                    .collect(),
                ParseError::NotUtf8,
            ),
            (
                "no colon",
                msg(&["OPTIONS sip:a@b SIP/2.0", "Via SIP/2.0/UDP h"], ""),
                ParseError::BadHeader { line: 2 },
            ),
            (
                "empty name",
                msg(&["OPTIONS sip:a@b SIP/2.0", "a: b", ": b"], ""),
                ParseError::BadHeader { line: 3 },
            ),
            (
                "space in name",
                msg(&["OPTIONS sip:a@b SIP/2.0", "X Y: b"], ""),
                ParseError::BadHeader { line: 2 },
            ),
            (
                "first header folded",
                msg(&["OPTIONS sip:a@b SIP/2.0", " X: b"], ""),
                ParseError::BadHeader { line: 2 },
            ),
            (
                "bare LF",
                b"OPTIONS sip:a@b SIP/2.0\r\nA: b\nC: d\r\n\r\n".to_vec(),
                ParseError::BadHeader { line: 2 },
            ),
            (
                "unterminated datagram",
                b"OPTIONS sip:a@b SIP/2.0\r\nA: b\r\n".to_vec(),
                ParseError::UnterminatedHeaders,
            ),
            ("only keep-alives", b"\r\n\r\n".to_vec(), ParseError::Empty),
        ];
        for (name, buf, want) in cases {
            assert_eq!(
                parse(&buf, Framing::Datagram).map(|_| ()),
                Err(want),
                "{name}"
            );
        }
    }

    #[test]
    fn header_values_split_lists_and_match_compact_names() {
        let buf = msg(
            &[
                "OPTIONS sip:a@b SIP/2.0",
                "v: SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/UDP b;branch=z9hG4bK2",
                "Via: SIP/2.0/TCP c",
                "Supported: timer,\r\n 100rel, ,path",
                "Date: Sat, 15 Oct 2005 04:44:56 GMT",
                "m: \"a, b\" <sip:a@b>, <sip:c@d;x=1,2>",
                "X-Custom: one, two",
                "l: 0",
            ],
            "",
        );
        let m = parse(&buf, Framing::Datagram).unwrap_or_else(|e| panic!("{e}"));
        let vias: Vec<_> = m.header_values(HeaderName::Via).collect();
        assert_eq!(
            vias,
            [
                "SIP/2.0/UDP a;branch=z9hG4bK1",
                "SIP/2.0/UDP b;branch=z9hG4bK2",
                "SIP/2.0/TCP c"
            ]
        );
        let supported: Vec<_> = m.header_values(HeaderName::Supported).collect();
        assert_eq!(supported, ["timer", "100rel", "path"]);
        assert_eq!(
            m.header(HeaderName::Date),
            Some("Sat, 15 Oct 2005 04:44:56 GMT")
        );
        let contacts: Vec<_> = m.header_values(HeaderName::Other("Contact")).collect();
        assert_eq!(contacts, ["\"a, b\" <sip:a@b>", "<sip:c@d;x=1,2>"]);
        assert_eq!(m.header(HeaderName::Other("x-custom")), Some("one, two"));
        assert_eq!(m.header(HeaderName::Other("l")), Some("0"));
        assert_eq!(m.header(HeaderName::CallId), None);
        assert_eq!(m.vias().count(), 3);
        let names: Vec<_> = m.headers().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["v", "Via", "Supported", "Date", "m", "X-Custom", "l"]
        );
    }

    #[test]
    fn validate_refuses_what_rfc3261_forbids() {
        let good = [
            "INVITE sip:u@example.com SIP/2.0",
            "Via: SIP/2.0/UDP h;branch=z9hG4bK1",
            "To: <sip:u@example.com>",
            "From: <sip:c@example.net>;tag=1",
            "Call-ID: abc@h",
            "CSeq: 1 INVITE",
            "Content-Length: 0",
        ];
        let with = |replace: Option<(usize, &str)>, extra: &[&str]| {
            let mut lines = good.to_vec();
            if let Some((i, line)) = replace {
                lines[i] = line;
            }
            lines.extend_from_slice(extra);
            msg(&lines, "")
        };
        let bad = |header, reason| ParseError::BadHeaderValue { header, reason };
        let cases: Vec<(&str, Vec<u8>, Result<(), ParseError>)> = vec![
            ("minimal request", with(None, &[]), Ok(())),
            (
                "missing To",
                with(Some((2, "X: y")), &[]),
                Err(ParseError::MissingHeader("To")),
            ),
            (
                "missing Via",
                with(Some((1, "X: y")), &[]),
                Err(ParseError::MissingHeader("Via")),
            ),
            (
                "duplicate Call-ID",
                with(None, &["i: other@h"]),
                Err(ParseError::DuplicateHeader("Call-ID")),
            ),
            (
                "duplicate Max-Forwards",
                with(None, &["Max-Forwards: 1", "Max-Forwards: 2"]),
                Err(ParseError::DuplicateHeader("Max-Forwards")),
            ),
            (
                "CSeq method mismatch",
                with(Some((5, "CSeq: 1 OPTIONS")), &[]),
                Err(ParseError::CSeqMismatch),
            ),
            (
                "Max-Forwards over 255",
                with(None, &["Max-Forwards: 300"]),
                Err(bad("Max-Forwards", "not a number in 0..=255")),
            ),
            (
                "Expires garbage",
                with(None, &["Expires: soon"]),
                Err(bad("Expires", "not delta-seconds")),
            ),
            (
                "Expires huge saturates",
                with(None, &["Expires: 99999999999999999999999"]),
                Ok(()),
            ),
            (
                "Date not GMT",
                with(None, &["Date: Fri, 01 Jan 2010 16:00:00 EST"]),
                Err(bad("Date", "not in GMT")),
            ),
            (
                "bad second Via",
                with(None, &["Via: SIP/2.0/UDP h;;"]),
                Err(bad("Via", "empty parameter")),
            ),
            (
                "empty Via element",
                with(Some((1, "Via: SIP/2.0/UDP h,")), &[]),
                Err(bad("Via", "empty element")),
            ),
            (
                "bad Contact",
                with(None, &["Contact: sip:a@b?x=y"]),
                Err(bad("Contact", "URI with , ? or quotes must be in <>")),
            ),
            (
                "bad Route",
                with(None, &["Route: <sip:a@b>, junk junk"]),
                Err(bad("Route", "missing scheme")),
            ),
            (
                "Call-ID with space",
                with(Some((4, "Call-ID: a b")), &[]),
                Err(bad("Call-ID", "not a word[@word]")),
            ),
            (
                "bad digest",
                with(None, &["Proxy-Authorization: Digest username=\"a\""]),
                Err(bad("Proxy-Authorization", "missing realm")),
            ),
            (
                "other auth scheme is fine",
                with(None, &["Authorization: Foo bar=baz"]),
                Ok(()),
            ),
        ];
        for (name, buf, want) in cases {
            let m = parse(&buf, Framing::Stream).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(m.validate(), want, "{name}");
        }
    }

    #[test]
    fn responses_do_not_need_a_method_match() {
        let buf = msg(
            &[
                "SIP/2.0 200 OK",
                "Via: SIP/2.0/UDP h;branch=z9hG4bK1",
                "To: <sip:u@example.com>;tag=2",
                "From: <sip:c@example.net>;tag=1",
                "Call-ID: abc@h",
                "CSeq: 1 INVITE",
                "Content-Length: 0",
            ],
            "",
        );
        let m = parse(&buf, Framing::Stream).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.status_code(), Some(200));
        assert_eq!(m.reason_phrase(), Some("OK"));
        assert_eq!(m.method(), None);
        assert_eq!(m.request_uri(), None);
        assert_eq!(m.validate(), Ok(()));
    }

    #[test]
    fn error_texts_are_single_line_ascii() {
        let errors = [
            ParseError::BadHeader { line: 7 },
            ParseError::MissingHeader("Call-ID"),
            ParseError::BadUri { reason: "bad host" },
            ParseError::BadHeaderValue {
                header: "Via",
                reason: "bad branch",
            },
        ];
        for e in errors {
            let text = e.to_string();
            assert!(text.is_ascii() && !text.contains(['\r', '\n']), "{text:?}");
        }
    }

    #[test]
    fn edited_strips_every_form_of_a_name_and_appends_inserts_keeping_the_rest() {
        let raw = b"INVITE sip:+15551230000@t SIP/2.0\r\nVia: SIP/2.0/UDP p;branch=z9hG4bK1\r\nRoute: <sip:edge;lr>,\r\n <sip:evil;lr>\r\nFrom: <sip:a@t>;tag=1\r\nTo: <sip:b@t>\r\nproxy-authorization: Digest username=\"u\"\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nP-Asserted-Identity: <sip:+19005550100@t>\r\nx-trunkguard-trunk-group: forged\r\nContent-Length: 4\r\n\r\nbody";
        let m = parse(raw, Framing::Datagram).unwrap();
        let strip: Vec<String> = [
            "Proxy-Authorization",
            "Route",
            "P-Asserted-Identity",
            "X-Trunkguard-Trunk-Group",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let insert = vec![(
            "X-Trunkguard-Trunk-Group".to_string(),
            "hq\r\nEvil: 1".to_string(),
        )];
        let out = String::from_utf8(m.edited(&strip, &insert)).unwrap();
        assert_eq!(
            out,
            "INVITE sip:+15551230000@t SIP/2.0\r\nVia: SIP/2.0/UDP p;branch=z9hG4bK1\r\nFrom: <sip:a@t>;tag=1\r\nTo: <sip:b@t>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 4\r\nX-Trunkguard-Trunk-Group: hq  Evil: 1\r\n\r\nbody"
        );
        // Compact forms are the same header: `i` is Call-ID.
        let m = parse(raw, Framing::Datagram).unwrap();
        let out = String::from_utf8(m.edited(&["i".to_string()], &[])).unwrap();
        assert!(!out.contains("Call-ID"), "{out}");
        // Nothing to do: the same bytes, but for the unfolding.
        let m = parse(raw, Framing::Datagram).unwrap();
        let unfolded = String::from_utf8(raw.to_vec())
            .unwrap()
            .replace(",\r\n <sip:evil", ", <sip:evil");
        assert_eq!(m.edited::<&str>(&[], &[]), unfolded.into_bytes());
        // A kept field's continuation lines are unfolded, so nothing in them can
        // read as a header line of its own further on.
        let folded = b"INVITE sip:x@t SIP/2.0\r\nVia: SIP/2.0/UDP p;branch=z9hG4bK1\r\nSubject: hi\r\n X-Trunkguard-Trunk-Group: victim\r\nFrom: <sip:a@t>;tag=1\r\nTo: <sip:x@t>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
        let m = parse(folded, Framing::Datagram).unwrap();
        let out = String::from_utf8(m.edited::<&str>(&[], &[])).unwrap();
        assert!(
            out.contains("\r\nSubject: hi X-Trunkguard-Trunk-Group: victim\r\nFrom:"),
            "{out}"
        );
    }
}
