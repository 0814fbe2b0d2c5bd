//! A verdict as the SIP response a host sends back for it (RFC 3261 §8.2.6), for
//! hosts that answer on the wire themselves rather than through a proxy's own reply
//! function (the Envoy front, the Node edge through `renderReply`).

use crate::sip::{HeaderName, Message};
use crate::verdict::{Action, Verdict};

/// The status a verdict answers with, or `None` when it answers nothing (`allow`,
/// `route`: the message goes on).
pub fn status(verdict: &Verdict) -> Option<(u16, &str)> {
    match verdict.action {
        Action::Allow | Action::Route => None,
        Action::Accept => Some((
            verdict.code.unwrap_or(200),
            verdict.reason.as_deref().unwrap_or("OK"),
        )),
        Action::Challenge | Action::Reject => Some((
            verdict.code.unwrap_or(500),
            verdict.reason.as_deref().unwrap_or("Server Internal Error"),
        )),
    }
}

/// The response to `request` for `verdict`: its Via fields, From, To (with
/// `to_tag` added when it has none), Call-ID and CSeq, then the verdict's headers,
/// and no body. `None` for a verdict that answers nothing.
///
/// Reason phrases and header values never carry a line break into the answer, even
/// when they quote the request (a 400's parse error).
pub fn render(request: &Message<'_>, verdict: &Verdict, to_tag: &str) -> Option<Vec<u8>> {
    let (code, reason) = status(verdict)?;
    Some(render_status(
        request,
        code,
        reason,
        &verdict.headers,
        to_tag,
    ))
}

/// [`render`] for an answer a host gives itself (a `200` to an OPTIONS or a
/// CANCEL, a `408` for a PBX that said nothing): the same rendering, so every answer
/// of a host leaves in one shape.
pub fn render_status(
    request: &Message<'_>,
    code: u16,
    reason: &str,
    headers: &[(String, String)],
    to_tag: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(format!("SIP/2.0 {code} ").as_bytes());
    push_line(&mut out, reason);
    for h in request.header_fields() {
        let Some(known) = h.known else { continue };
        let name = match known {
            HeaderName::Via => "Via",
            HeaderName::From => "From",
            HeaderName::CallId => "Call-ID",
            HeaderName::CSeq => "CSeq",
            HeaderName::To => "To",
            _ => continue,
        };
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        if known == HeaderName::To && !has_tag(request) {
            push_value(&mut out, h.value);
            out.extend_from_slice(b";tag=");
            push_line(&mut out, to_tag);
        } else {
            push_line(&mut out, h.value);
        }
    }
    for (name, value) in headers {
        push_value(&mut out, name);
        out.extend_from_slice(b": ");
        push_line(&mut out, value);
    }
    out.extend_from_slice(b"Content-Length: 0\r\n\r\n");
    out
}

fn has_tag(request: &Message<'_>) -> bool {
    request.to().is_ok_and(|to| to.tag.is_some())
}

/// Appends `value` with every CR, LF or NUL (and a folded line's break) replaced by
/// a space.
fn push_value(out: &mut Vec<u8>, value: &str) {
    out.extend(value.bytes().map(|b| match b {
        b'\r' | b'\n' | 0 => b' ',
        b => b,
    }));
}

fn push_line(out: &mut Vec<u8>, value: &str) {
    push_value(out, value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::{Framing, parse};
    use crate::verdict::Cause;

    const INVITE: &[u8] = b"INVITE sip:+15559876543@trunks.example.net SIP/2.0\r\n\
Via: SIP/2.0/TCP 127.0.0.2:5060;branch=z9hG4bK-1;rport\r\n\
v: SIP/2.0/TCP 10.0.0.1;branch=z9hG4bK-0\r\n\
Max-Forwards: 70\r\n\
f: <sip:hq1@trunks.example.net>;tag=abc\r\n\
To: <sip:+15559876543@trunks.example.net>\r\n\
Call-ID: c1@pbx\r\n\
CSeq: 2 INVITE\r\n\
Contact: <sip:hq1@127.0.0.2:5060>\r\n\
Content-Length: 4\r\n\r\nbody";

    fn text(v: Option<Vec<u8>>) -> String {
        String::from_utf8(v.unwrap_or_default()).unwrap_or_default()
    }

    #[test]
    fn a_refusal_copies_the_transaction_headers_and_adds_a_to_tag() {
        let msg = parse(INVITE, Framing::Stream).unwrap();
        let v = Verdict::reject(
            403,
            "Forbidden (not_registered_address)",
            Cause::NotRegisteredAddress,
        );
        assert_eq!(
            text(render(&msg, &v, "t1")),
            "SIP/2.0 403 Forbidden (not_registered_address)\r\n\
Via: SIP/2.0/TCP 127.0.0.2:5060;branch=z9hG4bK-1;rport\r\n\
Via: SIP/2.0/TCP 10.0.0.1;branch=z9hG4bK-0\r\n\
From: <sip:hq1@trunks.example.net>;tag=abc\r\n\
To: <sip:+15559876543@trunks.example.net>;tag=t1\r\n\
Call-ID: c1@pbx\r\n\
CSeq: 2 INVITE\r\n\
Content-Length: 0\r\n\r\n"
        );
    }

    #[test]
    fn headers_are_added_an_existing_tag_is_kept_and_line_breaks_never_pass() {
        let req = String::from_utf8_lossy(INVITE).replace(
            "To: <sip:+15559876543@trunks.example.net>",
            "To: <sip:x@y>;tag=old",
        );
        let msg = parse(req.as_bytes(), Framing::Stream).unwrap();
        let mut v = Verdict::reject(
            407,
            "Proxy Authentication Required\r\nX: y",
            Cause::AuthRequired,
        )
        .with_header("Proxy-Authenticate", "Digest realm=\"r\"");
        v.action = Action::Challenge;
        let out = text(render(&msg, &v, "t1"));
        assert!(
            out.starts_with("SIP/2.0 407 Proxy Authentication Required  X: y\r\n"),
            "{out}"
        );
        assert!(out.contains("\r\nTo: <sip:x@y>;tag=old\r\n"), "{out}");
        assert!(
            out.ends_with("Proxy-Authenticate: Digest realm=\"r\"\r\nContent-Length: 0\r\n\r\n")
        );
        assert_eq!(render(&msg, &Verdict::allow(), "t"), None);
    }
}
