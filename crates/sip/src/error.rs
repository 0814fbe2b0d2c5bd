use thiserror::Error;

/// Why a message (or one of its headers) was refused.
///
/// The `Display` texts are short ASCII sentences without CR/LF and never echo input
/// bytes, so they can go verbatim into a 400 reason phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ParseError {
    /// More bytes are needed (stream framing only): not an error of the peer yet.
    #[error("incomplete message")]
    Incomplete,
    /// Nothing but keep-alive CRLFs (datagram framing).
    #[error("empty message")]
    Empty,
    #[error("malformed start line")]
    BadStartLine,
    #[error("unsupported SIP version")]
    BadVersion,
    #[error("status code out of range")]
    BadStatusCode,
    /// `line` counts from 1 at the start line (leading keep-alive CRLFs excluded).
    #[error("malformed header at line {line}")]
    BadHeader { line: usize },
    #[error("header block is not UTF-8")]
    NotUtf8,
    #[error("header block not terminated by an empty line")]
    UnterminatedHeaders,
    #[error("invalid Content-Length")]
    BadContentLength,
    #[error("body shorter than Content-Length")]
    BodyShorterThanContentLength,
    /// Stream framing: bytes after the message that are not keep-alive CRLFs.
    #[error("unexpected data after the message")]
    TrailingData,
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    #[error("duplicate {0} header")]
    DuplicateHeader(&'static str),
    #[error("malformed URI: {reason}")]
    BadUri { reason: &'static str },
    #[error("malformed {header} header: {reason}")]
    BadHeaderValue {
        header: &'static str,
        reason: &'static str,
    },
    #[error("CSeq method does not match the request method")]
    CSeqMismatch,
    /// A known method name in another case ([`crate::method::is_another_case_of_a_known_name`]).
    #[error("method name in another case than its own")]
    MethodCase,
    /// Header block or declared body over the limits of this parser.
    #[error("message too large")]
    TooLarge,
    #[error("too many headers")]
    TooManyHeaders,
    #[error("unknown transport")]
    UnknownTransport,
}

impl ParseError {
    /// True when the peer may still complete the message (stream framing).
    pub fn is_incomplete(&self) -> bool {
        matches!(self, ParseError::Incomplete)
    }
}
