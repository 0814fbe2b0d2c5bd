//! Where a message starts and ends in the received bytes: keep-alives, the header
//! block, Content-Length, and the limits that keep a peer from making us buffer
//! without end.

use super::ParseError;
use super::lex;

/// Largest header block (start line and headers, with the empty line) accepted.
pub const MAX_HEAD_LEN: usize = 64 * 1024;
/// Most header fields accepted in one message.
pub const MAX_HEADERS: usize = 256;
/// Largest Content-Length accepted: SIP bodies (SDP, XML, multipart) are small, and a
/// stream peer must not make the host buffer megabytes for one message.
pub const MAX_BODY_LEN: usize = 1024 * 1024;

/// The first frame of a stream buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Nothing decidable yet: wait for more bytes.
    Incomplete,
    /// The buffer holds only `n` bytes of CRLF keep-alives (RFC 5626 §4.4.1) and
    /// possibly the first CR of another; consume `n`.
    KeepAlive(usize),
    /// The first message, with any CRLFs before it, is `buf[..n]`.
    Message(usize),
}

/// Length of the run of CRLF pairs at the start of `buf`.
pub(crate) fn keepalive_len(buf: &[u8]) -> usize {
    buf.chunks_exact(2).take_while(|c| *c == b"\r\n").count() * 2
}

/// Index of the first CR or LF in `b` (see [`lex::find2`]).
#[inline]
pub(crate) fn find_cr_or_lf(b: &[u8]) -> Option<usize> {
    lex::find2(b, b'\r', b'\n')
}

/// One logical header field: `buf[start..end]`, continuation lines included,
/// final CRLF excluded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field {
    pub start: usize,
    pub end: usize,
    pub line: usize,
}

/// Why a line could not be read.
enum LineError {
    /// The buffer ends inside the line.
    Short,
    /// A CR not followed by LF, or an LF not preceded by CR: other parsers may read
    /// either as a line end, which is how header injection starts.
    Bare,
    TooLarge,
}

/// Walks the header block of the message starting at `start` in one pass: the start
/// line, then each logical field (folded lines joined), then the empty line.
///
/// Errors are [`ParseError::Incomplete`] when the buffer ends before the empty line
/// (the caller turns that into an error for datagrams), [`ParseError::TooLarge`]
/// past [`MAX_HEAD_LEN`], or a malformed line.
pub(crate) struct Scanner<'a> {
    buf: &'a [u8],
    start: usize,
    pos: usize,
    line: usize,
    /// Lines are only searched for up to here.
    limit: usize,
}

impl<'a> Scanner<'a> {
    pub(crate) fn new(buf: &'a [u8], start: usize) -> Self {
        Scanner {
            buf,
            start,
            pos: start,
            line: 1,
            limit: buf.len().min(start.saturating_add(MAX_HEAD_LEN)),
        }
    }

    /// Index of the CR ending the line that starts at `from`.
    #[inline]
    fn line_end(&self, from: usize) -> Result<usize, LineError> {
        let window = self.buf.get(from..self.limit).unwrap_or(&[]);
        let Some(off) = find_cr_or_lf(window) else {
            return Err(if self.limit < self.buf.len() {
                LineError::TooLarge
            } else {
                LineError::Short
            });
        };
        let i = from + off;
        match (self.buf.get(i), self.buf.get(i + 1)) {
            (Some(b'\r'), Some(b'\n')) => Ok(i),
            (Some(b'\r'), None) => Err(LineError::Short),
            _ => Err(LineError::Bare),
        }
    }

    fn error(&self, e: LineError, bad: ParseError) -> ParseError {
        match e {
            LineError::Short => ParseError::Incomplete,
            LineError::Bare => bad,
            LineError::TooLarge => ParseError::TooLarge,
        }
    }

    /// The start line as `buf[start..end]`.
    pub(crate) fn start_line(&mut self) -> Result<(usize, usize), ParseError> {
        let eol = self
            .line_end(self.pos)
            .map_err(|e| self.error(e, ParseError::BadStartLine))?;
        let start = self.pos;
        self.pos = eol + 2;
        self.line = 2;
        Ok((start, eol))
    }

    /// The next field, or `None` at the empty line ending the header block (then
    /// [`Scanner::body_start`] is known).
    pub(crate) fn next_field(&mut self) -> Result<Option<Field>, ParseError> {
        let start = self.pos;
        let line = self.line;
        let bad = ParseError::BadHeader { line };
        let mut cur = start;
        loop {
            let eol = self.line_end(cur).map_err(|e| self.error(e, bad))?;
            self.line += 1;
            if eol == start {
                self.pos = eol + 2;
                if self.pos - self.start > MAX_HEAD_LEN {
                    return Err(ParseError::TooLarge);
                }
                return Ok(None);
            }
            cur = eol + 2;
            match self.buf.get(cur) {
                // A line starting with whitespace continues the field (RFC 3261 §7.3.1).
                Some(b' ' | b'\t') => {}
                Some(_) => {
                    self.pos = cur;
                    return Ok(Some(Field {
                        start,
                        end: eol,
                        line,
                    }));
                }
                // Whether the next line continues this field is not known yet.
                None => return Err(ParseError::Incomplete),
            }
        }
    }

    /// Where the next line starts, and where line ends are searched up to.
    pub(crate) fn window(&self) -> (usize, usize) {
        (self.pos, self.limit)
    }

    /// Whether a header block ending at `body_start` (after its empty line) is
    /// within [`MAX_HEAD_LEN`].
    pub(crate) fn head_fits(&self, body_start: usize) -> bool {
        body_start - self.start <= MAX_HEAD_LEN
    }

    /// Records that the caller read the header fields itself, up to `body_start`.
    pub(crate) fn finish(&mut self, body_start: usize) {
        self.pos = body_start;
    }

    /// After `next_field` returned `None`: the first byte after the empty line.
    pub(crate) fn body_start(&self) -> usize {
        self.pos
    }
}

/// Trims SP, HT, CR and LF: the same bytes `lex::trim_lws` trims from `str` values,
/// so framing and parsing read the same Content-Length.
fn trim_lws(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t' | b'\r' | b'\n', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t' | b'\r' | b'\n'] = v {
        v = rest;
    }
    v
}

/// Header names end before the colon, minus SP/HT (folding there is malformed).
pub(crate) fn trim_name(mut v: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

pub(crate) fn is_content_length_name(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l")
}

/// A Content-Length value: digits only (no sign, no garbage), within limits.
pub(crate) fn content_length_value(v: &[u8]) -> Result<usize, ParseError> {
    let v = trim_lws(v);
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::BadContentLength);
    }
    let mut n: usize = 0;
    for &d in v {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(usize::from(d - b'0')))
            .ok_or(ParseError::BadContentLength)?;
    }
    if n > MAX_BODY_LEN {
        return Err(ParseError::TooLarge);
    }
    Ok(n)
}

/// Stream framing: how long is the first message in `buf`?
///
/// Only the framing is checked here (line structure, Content-Length); the message
/// itself may still be refused by [`parse`](super::parse), which lets a host answer
/// 400 and carry on with the connection. An error means the stream cannot be framed
/// any more and the connection should be closed.
pub fn frame_stream(buf: &[u8]) -> Result<Frame, ParseError> {
    let start = keepalive_len(buf);
    let rest = buf.get(start..).unwrap_or(&[]);
    if rest.is_empty() || rest == b"\r" {
        return Ok(if start == 0 {
            Frame::Incomplete
        } else {
            Frame::KeepAlive(start)
        });
    }
    match frame_message(buf, start) {
        Err(ParseError::Incomplete) => Ok(Frame::Incomplete),
        other => other,
    }
}

fn frame_message(buf: &[u8], start: usize) -> Result<Frame, ParseError> {
    let mut scanner = Scanner::new(buf, start);
    scanner.start_line()?;
    let mut length = None;
    while let Some(field) = scanner.next_field()? {
        let text = buf.get(field.start..field.end).unwrap_or(&[]);
        let Some(colon) = text.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = text.split_at(colon);
        if is_content_length_name(trim_name(name)) {
            let n = content_length_value(value.get(1..).unwrap_or(&[]))?;
            if length.is_some_and(|m| m != n) {
                return Err(ParseError::BadContentLength);
            }
            length = Some(n);
        }
    }
    let length = length.ok_or(ParseError::MissingHeader("Content-Length"))?;
    let end = scanner.body_start() + length;
    Ok(if end > buf.len() {
        Frame::Incomplete
    } else {
        Frame::Message(end)
    })
}

/// Whether every SIP stream reader cuts `unit` (one message as [`frame_stream`] framed
/// it, keep-alive CRLFs before it allowed) where this framing does, so that a host
/// relaying it onto a stream hands its next hop the very message the policy judged.
///
/// Readers differ on what counts as Content-Length. Kamailio's TCP reader
/// (core/tcp_read.c) takes the first line that reads as one, a continuation line
/// included, spells the name with `-` or `_`, and stops at the first SP after the
/// digits; this framing takes only the fields it parses, folded lines joined. Held to
/// the form on which every reader agrees, none is left to choose: CRLF line ends only,
/// no continuation line (RFC 3261 §7.3.1 allows them; hosts unfold what they relay,
/// [`Message::edited`](super::Message::edited)), every line whose name reads as
/// Content-Length to any of them spelled `Content-Length` or `l` with the body's
/// length in digits alone, and nothing Kamailio's reader takes for an MSRP frame
/// (a message that starts `MSRP `, which a line of dashes ends) or a HEP packet (one
/// that starts `HEP3`).
pub fn frames_alike(unit: &[u8]) -> bool {
    let start = keepalive_len(unit);
    let rest = unit.get(start..).unwrap_or(&[]);
    let Some(head_len) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let (head, body) = (
        rest.get(..head_len).unwrap_or(&[]),
        rest.get(head_len + 4..).unwrap_or(&[]),
    );
    // Kamailio's reader takes a message that starts `MSRP ` for an MSRP frame, which
    // ends at a line of dashes (`-------<transaction id>`), not by Content-Length, and
    // where it takes HEP, one that starts `HEP3` for a HEP packet.
    if head
        .get(..5)
        .is_some_and(|m| m.eq_ignore_ascii_case(b"MSRP "))
        || head
            .get(..4)
            .is_some_and(|m| m.eq_ignore_ascii_case(b"HEP3"))
    {
        return false;
    }
    let mut lengths = 0;
    let mut lines = head.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        // Each line ends in CR before its LF (the last one before the empty line's
        // CRLF CRLF); a CR anywhere else, or an LF without its CR, is a line end to
        // some reader and not to another.
        let line = match (lines.peek().is_some(), line.split_last()) {
            (true, Some((b'\r', line))) => line,
            (false, _) => line,
            _ => return false,
        };
        if line.contains(&b'\r') || matches!(line.first(), Some(b' ' | b'\t' | b'-') | None) {
            return false;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = trim_name(line.get(..colon).unwrap_or(&[]));
        if name.eq_ignore_ascii_case(b"content_length") {
            return false;
        }
        if is_content_length_name(name) {
            match content_length_value(line.get(colon + 1..).unwrap_or(&[])) {
                Ok(n) if n == body.len() => lengths += 1,
                _ => return false,
            }
        }
    }
    lengths > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTIONS: &[u8] = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nContent-Length: 5\r\n\r\nhello";

    #[test]
    fn frames_messages_keepalives_and_partial_input() {
        let two = [OPTIONS, OPTIONS].concat();
        let with_ka = [b"\r\n\r\n".as_slice(), OPTIONS].concat();
        let cases: Vec<(&[u8], Frame)> = vec![
            (b"", Frame::Incomplete),
            (b"\r", Frame::Incomplete),
            (b"\r\n", Frame::KeepAlive(2)),
            (b"\r\n\r\n", Frame::KeepAlive(4)),
            (b"\r\n\r\n\r", Frame::KeepAlive(4)),
            (b"OPTIONS sip:a@b SIP/2.0\r\n", Frame::Incomplete),
            (&OPTIONS[..OPTIONS.len() - 1], Frame::Incomplete),
            (OPTIONS, Frame::Message(OPTIONS.len())),
            (&two, Frame::Message(OPTIONS.len())),
            (&with_ka, Frame::Message(with_ka.len())),
            (b"X x SIP/2.0\r\nl:0\r\n\r\nREST", Frame::Message(20)),
            (
                b"X x SIP/2.0\r\nContent-Length:\r\n 2\r\n\r\nab",
                Frame::Message(38),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                frame_stream(input),
                Ok(want),
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn frames_alike_only_what_every_stream_reader_cuts_in_the_same_place() {
        let alike: [&[u8]; 4] = [
            OPTIONS,
            b"\r\n\r\nX x SIP/2.0\r\nl: 0\r\n\r\n",
            b"X x SIP/2.0\r\nContent-Length :\t2 \r\nL: 02\r\n\r\nab",
            b"X x SIP/2.0\r\nLength: 9\r\nlx: 9\r\nContent-Lengthy: 9\r\nl: 0\r\n\r\n",
        ];
        for unit in alike {
            assert!(frames_alike(unit), "{:?}", String::from_utf8_lossy(unit));
        }
        // Each of these is one message to this framing (or none), and to Kamailio's
        // TCP reader, where it says, another.
        let otherwise: [(&str, &[u8]); 13] = [
            (
                "an MSRP frame, ended by its dashes",
                b"MSRP sip:x SIP/2.0\r\nl: 2\r\n\r\nab",
            ),
            (
                "a HEP packet, measured by its next two bytes",
                b"HEP3s sip:x SIP/2.0\r\nl: 2\r\n\r\nab",
            ),
            (
                "a line of dashes",
                b"X x SIP/2.0\r\n-------x$: 1\r\nl: 2\r\n\r\nab",
            ),
            (
                "`_` in the name: 0",
                b"X x SIP/2.0\r\nContent_Length: 0\r\nContent-Length: 2\r\n\r\nab",
            ),
            (
                "a continuation line: 0",
                b"X x SIP/2.0\r\nSubject: a\r\n l: 0 x\r\nContent-Length: 2\r\n\r\nab",
            ),
            (
                "a folded value: none",
                b"X x SIP/2.0\r\nContent-Length:\r\n 2\r\n\r\nab",
            ),
            (
                "an LF alone: 0",
                b"X x SIP/2.0\nl: 0\r\nContent-Length: 2\r\n\r\nab",
            ),
            (
                "a CR alone",
                b"X x SIP/2.0\r\nA: b\rl: 0\r\nContent-Length: 2\r\n\r\nab",
            ),
            (
                "a CR before the empty line",
                b"X x SIP/2.0\r\nContent-Length: 2\r\r\n\r\nab",
            ),
            ("digits and more: 2", b"X x SIP/2.0\r\nl: 2 x\r\n\r\nab"),
            (
                "not the body's length",
                b"X x SIP/2.0\r\nContent-Length: 1\r\n\r\nab",
            ),
            ("no length", b"X x SIP/2.0\r\nA: b\r\n\r\n"),
            ("no empty line", b"X x SIP/2.0\r\nContent-Length: 0\r\n"),
        ];
        for (why, unit) in otherwise {
            assert!(!frames_alike(unit), "{why}");
        }
    }

    #[test]
    fn cr_lf_search_agrees_with_a_naive_scan() {
        let naive = |b: &[u8]| b.iter().position(|&c| c == b'\r' || c == b'\n');
        let mut inputs: Vec<Vec<u8>> = vec![vec![], b"\r".to_vec(), b"abcdefgh\n".to_vec()];
        // Every position of CR or LF in buffers around the 8-byte word size, with
        // neighbours that differ from CR/LF by one bit or by a borrow.
        for len in 0..20 {
            for at in 0..len {
                for (fill, hit) in [
                    (b'a', b'\r'),
                    (b'\x0c', b'\n'),
                    (b'\x0e', b'\r'),
                    (0xff, b'\n'),
                    (0, b'\r'),
                ] {
                    let mut v = vec![fill; len];
                    v[at] = hit;
                    inputs.push(v);
                }
            }
            inputs.push(vec![b'\x0b'; len]);
        }
        for input in inputs {
            assert_eq!(find_cr_or_lf(&input), naive(&input), "{input:?}");
        }
    }

    #[test]
    fn unframeable_streams_are_errors() {
        let big_head = [b"X x SIP/2.0\r\nX: ".as_slice(), &vec![b'a'; MAX_HEAD_LEN]].concat();
        let many_lines = [
            b"X x SIP/2.0\r\n".as_slice(),
            &b"a: b\r\n".repeat(MAX_HEAD_LEN / 6 + 1),
        ]
        .concat();
        let cases: Vec<(&[u8], ParseError)> = vec![
            (
                b"X x SIP/2.0\r\nVia: x\r\n\r\n",
                ParseError::MissingHeader("Content-Length"),
            ),
            (
                b"X x SIP/2.0\r\nl: -1\r\n\r\n",
                ParseError::BadContentLength,
            ),
            (
                b"X x SIP/2.0\r\nl: 1\r\nl: 2\r\n\r\n",
                ParseError::BadContentLength,
            ),
            (
                b"X x SIP/2.0\r\nl: 99999999999999999999999\r\n\r\n",
                ParseError::BadContentLength,
            ),
            (b"X x SIP/2.0\r\nl: 2000000\r\n\r\n", ParseError::TooLarge),
            (b"X x SIP/2.0\nl: 0\r\n\r\n", ParseError::BadStartLine),
            (
                b"X x SIP/2.0\r\nA: b\nl: 0\r\n\r\n",
                ParseError::BadHeader { line: 2 },
            ),
            (
                b"X x SIP/2.0\r\nA: b\rl: 0\r\n\r\n",
                ParseError::BadHeader { line: 2 },
            ),
            (&big_head, ParseError::TooLarge),
            (&many_lines, ParseError::TooLarge),
        ];
        for (input, want) in cases {
            assert_eq!(
                frame_stream(input),
                Err(want),
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn same_lengths_are_fine_and_lws_is_trimmed() {
        assert_eq!(
            frame_stream(b"X x SIP/2.0\r\nl: 1\r\nContent-Length : 1 \r\n\r\nab"),
            Ok(Frame::Message(43))
        );
    }
}
