//! SIP messages out of one direction of a TCP stream: Envoy hands the filter the
//! bytes as they arrive, so a message may be split over several chunks and one
//! chunk may hold several messages (pipelining).

use trunkguard::sip::{Frame, ParseError, frame_stream};

/// One framed piece of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    /// CRLF keep-alives (RFC 5626 §4.4.1): passed on as they are.
    KeepAlive(&'a [u8]),
    /// One whole message, with any keep-alive CRLFs before it.
    Message(&'a [u8]),
}

impl<'a> Item<'a> {
    pub fn bytes(&self) -> &'a [u8] {
        match self {
            Item::KeepAlive(b) | Item::Message(b) => b,
        }
    }
}

/// The bytes of one direction that do not yet form a whole message.
#[derive(Debug, Default)]
pub struct Reassembler {
    held: Vec<u8>,
}

/// What one chunk came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// Bytes held back from an earlier chunk were released in this one's items.
    pub released_held: bool,
    /// The chunk ended inside a message, whose start is now held back.
    pub holds_tail: bool,
}

impl Fed {
    /// Whether the items, put back to back, differ from the chunk as received.
    pub fn reshaped(&self) -> bool {
        self.released_held || self.holds_tail
    }
}

impl Reassembler {
    /// Bytes held back, waiting for the rest of their message.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Frames `chunk` (after whatever was held back) and hands every whole item to
    /// `each`, in order; an incomplete message at the end is held back for the next
    /// chunk. An error means the stream cannot be framed any more (no or a bad
    /// Content-Length, a header block past the limits): the caller closes the
    /// connection, and the items before the error have already been handed over.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        mut each: impl FnMut(Item<'_>),
    ) -> Result<Fed, ParseError> {
        if self.held.is_empty() {
            // The usual case: frame in place and copy only an incomplete tail.
            let used = frame_all(chunk, &mut each)?;
            let tail = chunk.get(used..).unwrap_or_default();
            self.held.extend_from_slice(tail);
            return Ok(Fed {
                released_held: false,
                holds_tail: !tail.is_empty(),
            });
        }
        let before = self.held.len();
        self.held.extend_from_slice(chunk);
        let buf = std::mem::take(&mut self.held);
        let used = frame_all(&buf, &mut each)?;
        self.held = buf.get(used..).unwrap_or_default().to_vec();
        Ok(Fed {
            released_held: used > 0 && before > 0,
            holds_tail: !self.held.is_empty(),
        })
    }
}

/// Hands every whole item of `buf` to `each`; returns how many bytes they took.
fn frame_all(buf: &[u8], each: &mut impl FnMut(Item<'_>)) -> Result<usize, ParseError> {
    let mut at = 0;
    loop {
        let rest = buf.get(at..).unwrap_or_default();
        if rest.is_empty() {
            return Ok(at);
        }
        match frame_stream(rest)? {
            Frame::Incomplete => return Ok(at),
            Frame::KeepAlive(n) => {
                each(Item::KeepAlive(rest.get(..n).unwrap_or_default()));
                at += n;
            }
            Frame::Message(n) => {
                each(Item::Message(rest.get(..n).unwrap_or_default()));
                at += n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &[u8] = b"OPTIONS sip:a@b SIP/2.0\r\nCall-ID: a\r\nContent-Length: 2\r\n\r\nhi";
    const B: &[u8] = b"BYE sip:a@b SIP/2.0\r\nCall-ID: b\r\nl: 0\r\n\r\n";

    fn feed_all(r: &mut Reassembler, chunk: &[u8]) -> (Vec<Vec<u8>>, Fed) {
        let mut out = Vec::new();
        let fed = r.feed(chunk, |i| out.push(i.bytes().to_vec())).unwrap();
        (out, fed)
    }

    #[test]
    fn pipelined_messages_come_out_whole_and_in_order() {
        let mut r = Reassembler::default();
        let stream = [A, b"\r\n\r\n", B, A].concat();
        let (items, fed) = feed_all(&mut r, &stream);
        assert_eq!(
            items,
            vec![A.to_vec(), [b"\r\n\r\n".as_slice(), B].concat(), A.to_vec()]
        );
        assert!(!fed.reshaped());
    }

    #[test]
    fn a_message_split_anywhere_is_released_once_complete() {
        let stream = [A, B].concat();
        for cut in 1..stream.len() {
            let mut r = Reassembler::default();
            let (mut items, first) = feed_all(&mut r, &stream[..cut]);
            let (rest, second) = feed_all(&mut r, &stream[cut..]);
            items.extend(rest);
            assert_eq!(items, vec![A.to_vec(), B.to_vec()], "cut at {cut}");
            assert_eq!(r.held(), 0);
            assert!(first.holds_tail || cut == A.len(), "cut at {cut}");
            assert_eq!(second.released_held, cut != A.len(), "cut at {cut}");
        }
    }

    #[test]
    fn byte_by_byte() {
        let mut r = Reassembler::default();
        let mut items = Vec::new();
        for b in [A, B].concat() {
            items.extend(feed_all(&mut r, &[b]).0);
        }
        assert_eq!(items, vec![A.to_vec(), B.to_vec()]);
    }

    #[test]
    fn an_unframeable_stream_is_an_error_after_the_good_messages() {
        let mut r = Reassembler::default();
        let mut seen = 0;
        let bad = [A, b"INVITE x SIP/2.0\r\nVia: x\r\n\r\n"].concat();
        assert!(r.feed(&bad, |_| seen += 1).is_err());
        assert_eq!(seen, 1);
    }
}
