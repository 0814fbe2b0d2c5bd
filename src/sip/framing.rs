//! Where a message starts and ends in the received bytes: keep-alives, the header
//! block, Content-Length, and the limits that keep a peer from making us buffer
//! without end.

use super::{Framing, ParseError};

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

/// Offsets of one message's parts in the buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    /// First byte of the start line (after keep-alive CRLFs).
    pub start: usize,
    /// End of the header block: just after the last header's CRLF.
    pub head_end: usize,
    /// First byte after the empty line.
    pub body_start: usize,
}

/// Finds the empty line ending the header block of the message that starts at
/// `start`. `Incomplete` for stream framing when it is not there yet.
pub(crate) fn locate(buf: &[u8], start: usize, framing: Framing) -> Result<Layout, ParseError> {
    let rest = buf.get(start..).unwrap_or(&[]);
    let Some(crlfcrlf) = find_crlfcrlf(rest) else {
        return Err(if rest.len() > MAX_HEAD_LEN {
            ParseError::TooLarge
        } else if rest.is_empty() {
            match framing {
                Framing::Stream => ParseError::Incomplete,
                Framing::Datagram => ParseError::Empty,
            }
        } else {
            match framing {
                Framing::Stream => ParseError::Incomplete,
                Framing::Datagram => ParseError::UnterminatedHeaders,
            }
        });
    };
    if crlfcrlf + 4 > MAX_HEAD_LEN {
        return Err(ParseError::TooLarge);
    }
    Ok(Layout {
        start,
        head_end: start + crlfcrlf + 2,
        body_start: start + crlfcrlf + 4,
    })
}

/// Index of the first CRLFCRLF.
fn find_crlfcrlf(b: &[u8]) -> Option<usize> {
    let mut from = 0;
    // Scanning for LF only keeps the inner loop on one comparison per byte.
    while let Some(off) = b.get(from..)?.iter().position(|&c| c == b'\n') {
        let lf = from + off;
        if lf >= 3 && b.get(lf - 3..=lf) == Some(b"\r\n\r\n") {
            return Some(lf - 3);
        }
        from = lf + 1;
    }
    None
}

/// Splits the header block `head` (start line first, every line ending in CRLF) at
/// the end of the start line: returns (start line end, first header byte).
pub(crate) fn start_line_end(head: &[u8]) -> Result<(usize, usize), ParseError> {
    let i = head
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .ok_or(ParseError::BadStartLine)?;
    if head.get(i..i + 2) != Some(b"\r\n") {
        return Err(ParseError::BadStartLine);
    }
    Ok((i, i + 2))
}

/// One logical header field: `head[start..end]`, continuation lines included,
/// final CRLF excluded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field {
    pub start: usize,
    pub end: usize,
    pub line: usize,
}

/// Iterates the logical header fields of `head[from..]`, joining folded lines and
/// refusing bare CR or LF (which other parsers may read as line ends, the start of
/// header injection).
pub(crate) struct Fields<'a> {
    head: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> Fields<'a> {
    /// `first_line` numbers the line at `from` (the start line is line 1).
    pub(crate) fn new(head: &'a [u8], from: usize, first_line: usize) -> Self {
        Fields {
            head,
            pos: from,
            line: first_line,
        }
    }
}

impl Iterator for Fields<'_> {
    type Item = Result<Field, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.head.len() {
            return None;
        }
        let start = self.pos;
        let line = self.line;
        let mut cur = start;
        loop {
            let found = self
                .head
                .get(cur..)
                .and_then(|r| r.iter().position(|&b| b == b'\r' || b == b'\n'));
            let eol = match found {
                Some(off) if self.head.get(cur + off..cur + off + 2) == Some(b"\r\n") => cur + off,
                _ => {
                    self.pos = self.head.len();
                    return Some(Err(ParseError::BadHeader { line: self.line }));
                }
            };
            self.line += 1;
            cur = eol + 2;
            if !matches!(self.head.get(cur), Some(b' ' | b'\t')) {
                self.pos = cur;
                return Some(Ok(Field {
                    start,
                    end: eol,
                    line,
                }));
            }
        }
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
    let layout = match locate(buf, start, Framing::Stream) {
        Ok(layout) => layout,
        Err(ParseError::Incomplete) => return Ok(Frame::Incomplete),
        Err(e) => return Err(e),
    };
    let head = buf.get(start..layout.head_end).unwrap_or(&[]);
    let (_, first_field) = start_line_end(head)?;
    let mut length = None;
    for field in Fields::new(head, first_field, 2) {
        let field = field?;
        let text = head.get(field.start..field.end).unwrap_or(&[]);
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
    let end = layout.body_start + length;
    Ok(if end > buf.len() {
        Frame::Incomplete
    } else {
        Frame::Message(end)
    })
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
            (b"X x SIP/2.0\r\nContent-Length:\r\n 2\r\n\r\nab", Frame::Message(37)),
        ];
        for (input, want) in cases {
            assert_eq!(frame_stream(input), Ok(want), "input {:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn unframeable_streams_are_errors() {
        let big_head = [b"X x SIP/2.0\r\nX: ".as_slice(), &vec![b'a'; MAX_HEAD_LEN]].concat();
        let cases: Vec<(&[u8], ParseError)> = vec![
            (b"X x SIP/2.0\r\nVia: x\r\n\r\n", ParseError::MissingHeader("Content-Length")),
            (b"X x SIP/2.0\r\nl: -1\r\n\r\n", ParseError::BadContentLength),
            (b"X x SIP/2.0\r\nl: 1\r\nl: 2\r\n\r\n", ParseError::BadContentLength),
            (b"X x SIP/2.0\r\nl: 99999999999999999999999\r\n\r\n", ParseError::BadContentLength),
            (b"X x SIP/2.0\r\nl: 2000000\r\n\r\n", ParseError::TooLarge),
            (b"X x SIP/2.0\nl: 0\r\n\r\n", ParseError::BadStartLine),
            (b"X x SIP/2.0\r\nA: b\nl: 0\r\n\r\n", ParseError::BadHeader { line: 2 }),
            (b"X x SIP/2.0\r\nA: b\rl: 0\r\n\r\n", ParseError::BadHeader { line: 2 }),
            (&big_head, ParseError::TooLarge),
        ];
        for (input, want) in cases {
            assert_eq!(frame_stream(input), Err(want), "input {:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn same_lengths_are_fine_and_lws_is_trimmed() {
        assert_eq!(
            frame_stream(b"X x SIP/2.0\r\nl: 1\r\nContent-Length : 1 \r\n\r\nab"),
            Ok(Frame::Message(42))
        );
    }
}
