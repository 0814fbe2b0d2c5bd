//! SIP message parsing (RFC 3261 §7, §25), zero-copy over the received bytes.
//!
//! [`parse`] checks the framing, the start line (with the Request-URI) and the header
//! field structure; typed accessors on [`Message`] parse the headers the policy needs
//! when asked; [`Message::validate`] checks everything RFC 3261 §8.1.1 requires.
//! Nothing here panics on any input, and every error is a [`ParseError`] whose text
//! can go into a 400 reason phrase.
//!
//! Conformance: the RFC 4475 and RFC 5118 torture messages, judged file by file in
//! `tests/sip_torture.rs`.
//!
//! Its own crate, so that the one part of trunkguard that reads untrusted bytes first
//! can promise it has no `unsafe` at all; the policy core re-exports it as
//! `trunkguard::sip`.

#![forbid(unsafe_code)]

mod auth;
mod error;
mod framing;
mod header;
mod lex;
mod message;
mod method;
mod name_addr;
mod param;
mod transport;
mod uri;
mod via;

pub use auth::{AuthHeader, DigestCredentials};
pub use error::ParseError;
pub use framing::{Frame, MAX_BODY_LEN, MAX_HEAD_LEN, MAX_HEADERS, frame_stream, frames_alike};
pub use header::{Header, HeaderName, KNOWN_HEADERS, unfold};
pub use message::{CSeq, DialogIds, Message, StartLine, parse};
pub use method::Method;
pub use name_addr::{Contact, Contacts, NameAddr};
pub use transport::{Framing, Transport};
pub use uri::{Host, Scheme, Uri};
pub use via::Via;

/// Whether `s` is a SIP token (RFC 3261 §25.1): header names, tags, methods.
pub fn is_token(s: &str) -> bool {
    lex::is_token(s)
}

#[cfg(test)]
mod robustness;
