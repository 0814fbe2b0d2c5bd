//! The stand-in sent upstream for a request the policy answers itself.
//!
//! A network filter cannot write to the client (docs/envoy.md), so the answer rides
//! on the upstream's answer to a *probe*: the request's transaction headers (Via,
//! From, To, Call-ID, CSeq) under its request line, with `Max-Forwards: 0` and no
//! body, which a proxy refuses at once with 483 (RFC 3261 §16.3 step 2). Nothing
//! else of the request goes upstream: no credentials, no Contact, no SDP.

use trunkguard::sip::{Framing, Message, parse};

/// Identifies a transaction in both directions: what the upstream's response to a
/// probe repeats of it (RFC 3261 §8.2.6: Via, Call-ID and CSeq are copied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub branch: String,
    pub call_id: String,
    pub cseq: u32,
    pub method: String,
}

impl Key {
    pub fn of(msg: &Message<'_>) -> Option<Key> {
        let via = msg.top_via().ok()?;
        let cseq = msg.cseq().ok()?;
        Some(Key {
            branch: via.branch.unwrap_or_default().to_owned(),
            call_id: msg.call_id()?.to_owned(),
            cseq: cseq.seq,
            method: cseq.method.as_str().to_owned(),
        })
    }

    /// Whether `ack` acknowledges a non-2xx final answer to this INVITE: same
    /// branch, Call-ID and CSeq number (RFC 3261 §17.1.1.3).
    pub fn acked_by(&self, ack: &Key) -> bool {
        self.method == "INVITE"
            && ack.method == "ACK"
            && self.cseq == ack.cseq
            && self.branch == ack.branch
            && self.call_id == ack.call_id
    }
}

/// A probe, with the key its answer will carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub bytes: Vec<u8>,
    pub key: Key,
}

impl Probe {
    /// The probe parsed again: the answer to the client is rendered from it, so it
    /// carries exactly the transaction headers the upstream saw.
    pub fn message(&self) -> Option<Message<'_>> {
        parse(&self.bytes, Framing::Stream).ok()
    }
}

/// Where a request line uses an unusable Request-URI (a malformed request's), the
/// probe names this one instead: `.invalid` never resolves (RFC 6761), so even an
/// upstream that ignored Max-Forwards could not route it.
const FALLBACK_URI: &str = "sip:trunkguard.invalid";

/// Builds the probe for one framed request (keep-alive CRLFs before it allowed).
/// Works from the raw lines, so that a request the parser refused still gets its
/// 400 when its transaction headers are readable. `None`: no usable request line or
/// transaction headers (a response, garbage), so no answer can be delivered.
///
/// `announce` goes on the probe too: the verdict's `insert` of an accepted
/// REGISTER, the binding the proxy behind needs to route the PBX's inbound calls
/// (docs/envoy.md, "Inbound calls"). A header that would not be one line of its own
/// (a name that is not a token, a value with a line break) is left out: the PBX's
/// Contact is its own text.
pub fn build(raw: &[u8], announce: &[(String, String)]) -> Option<Probe> {
    let text = std::str::from_utf8(raw).ok()?;
    let text = text.trim_start_matches("\r\n");
    let head = text.get(..text.find("\r\n\r\n")?)?;
    let mut lines = head.split("\r\n");
    let start = lines.next()?;
    let mut parts = start.split(' ');
    let (method, uri, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.eq_ignore_ascii_case("SIP/2.0") || !is_token(method) {
        return None;
    }
    let fields = transaction_fields(lines)?;
    let mut extra = String::new();
    for (name, value) in announce {
        if is_token(name) && !value.contains(['\r', '\n']) {
            extra.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    [uri, FALLBACK_URI].into_iter().find_map(|uri| {
        let bytes = format!(
            "{method} {uri} SIP/2.0\r\n{fields}{extra}Max-Forwards: 0\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes();
        let key = Key::of(&parse(&bytes, Framing::Stream).ok()?)?;
        Some(Probe { bytes, key })
    })
}

/// The Via fields and the first From, To, Call-ID and CSeq, each on one line ending
/// in CRLF (a folded one joined by one SP, as RFC 3261 §7.3.1 reads it: a
/// continuation line could read as a header of its own upstream, a Content-Length
/// among them); `None` unless all five are there.
fn transaction_fields<'a>(lines: impl Iterator<Item = &'a str>) -> Option<String> {
    let mut out = String::new();
    let mut seen = [false; 5];
    let mut keep = false;
    for line in lines {
        if line.starts_with([' ', '\t']) {
            if keep {
                out.truncate(out.len().saturating_sub(2));
                out.push(' ');
                out.push_str(line.trim_start_matches([' ', '\t']));
                out.push_str("\r\n");
            }
            continue;
        }
        let name = line.split(':').next().unwrap_or_default().trim_end();
        let slot = match name.to_ascii_lowercase().as_str() {
            "via" | "v" => 0,
            "from" | "f" => 1,
            "to" | "t" => 2,
            "call-id" | "i" => 3,
            "cseq" => 4,
            _ => {
                keep = false;
                continue;
            }
        };
        // Every Via, but only the first From, To, Call-ID and CSeq: a proxy drops a
        // message with two of those before its script runs (Kamailio: "duplicate To
        // header field"), so a probe carrying both would never be refused, and the
        // client would never get the policy's 400 for its ambiguous request.
        let repeat = slot > 0 && seen.get(slot).copied().unwrap_or(false);
        keep = line.contains(':') && !repeat;
        if keep {
            if let Some(s) = seen.get_mut(slot) {
                *s = true;
            }
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    seen.iter().all(|s| *s).then_some(out)
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:+15559876543@trunks.example.net SIP/2.0\r\n\
Via: SIP/2.0/TCP 127.0.0.2:5060;branch=z9hG4bK-1;rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:hq1@trunks.example.net>;tag=abc\r\n\
To: <sip:+15559876543@trunks.example.net>\r\n\
Call-ID: c1@pbx\r\n\
CSeq: 2 INVITE\r\n\
Proxy-Authorization: Digest username=\"hq1\"\r\n\
Contact: <sip:hq1@127.0.0.2:5060>\r\n\
Content-Length: 4\r\n\r\nbody";

    fn text(p: &Probe) -> &str {
        std::str::from_utf8(&p.bytes).unwrap()
    }

    #[test]
    fn an_announcement_rides_on_the_probe_one_line_per_header() {
        let announce = [
            (
                "X-Trunkguard-Binding".to_string(),
                "hq;expires=60".to_string(),
            ),
            (
                "X-Trunkguard-Binding-Contact".to_string(),
                "sip:a@b\r\nX-Evil: 1".to_string(),
            ),
            ("Bad Name".to_string(), "x".to_string()),
        ];
        let p = build(INVITE.as_bytes(), &announce).unwrap();
        let t = text(&p);
        assert!(
            t.contains(
                "CSeq: 2 INVITE\r\nX-Trunkguard-Binding: hq;expires=60\r\nMax-Forwards: 0\r\n"
            ),
            "{t}"
        );
        assert!(!t.contains("X-Evil") && !t.contains("Bad Name"), "{t}");
        assert_eq!(p.key, build(INVITE.as_bytes(), &[]).unwrap().key);
    }

    #[test]
    fn keeps_only_the_transaction_and_refuses_every_hop() {
        let p = build(format!("\r\n\r\n{INVITE}").as_bytes(), &[]).unwrap();
        assert_eq!(
            text(&p),
            "INVITE sip:+15559876543@trunks.example.net SIP/2.0\r\n\
Via: SIP/2.0/TCP 127.0.0.2:5060;branch=z9hG4bK-1;rport\r\n\
From: <sip:hq1@trunks.example.net>;tag=abc\r\n\
To: <sip:+15559876543@trunks.example.net>\r\n\
Call-ID: c1@pbx\r\n\
CSeq: 2 INVITE\r\n\
Max-Forwards: 0\r\n\
Content-Length: 0\r\n\r\n"
        );
        assert_eq!(
            p.key,
            Key {
                branch: "z9hG4bK-1".into(),
                call_id: "c1@pbx".into(),
                cseq: 2,
                method: "INVITE".into()
            }
        );
        assert!(p.message().is_some());
    }

    #[test]
    fn folded_fields_are_joined_compact_ones_kept_and_a_bad_uri_replaced() {
        let req = "REGISTER sip:[bad SIP/2.0\r\nv: SIP/2.0/TCP h;branch=z9hG4bK-2\r\nf: <sip:a@b>;tag=1\r\n\
t: <sip:a@b>\r\ni: x\r\nCSeq:\r\n 7 REGISTER\r\nX: y\r\n z\r\nl: 0\r\n\r\n";
        let p = build(req.as_bytes(), &[]).unwrap();
        assert!(text(&p).starts_with("REGISTER sip:trunkguard.invalid SIP/2.0\r\n"));
        assert!(text(&p).contains("CSeq: 7 REGISTER\r\nMax-Forwards: 0\r\n"));
        assert!(trunkguard::sip::frames_alike(&p.bytes), "{}", text(&p));
        assert!(!text(&p).contains("X: y"));
        assert_eq!(p.key.cseq, 7);
    }

    #[test]
    fn a_second_to_from_call_id_or_cseq_stays_out_of_the_probe() {
        let req = "INVITE sip:x@t SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK-3\r\nVia: SIP/2.0/TCP g;branch=z9hG4bK-0\r\n\
From: <sip:a@t>;tag=1\r\nTo: <sip:x@t>\r\nt: <sip:x@t>;tag=a\r\n ;tag=b\r\nCall-ID: c\r\ni: d\r\nCSeq: 1 INVITE\r\nCSeq: 2 INVITE\r\nl: 0\r\n\r\n";
        let p = build(req.as_bytes(), &[]).unwrap();
        let t = text(&p);
        assert_eq!(t.matches("Via:").count(), 2, "{t}");
        assert!(!t.contains("t: ") && !t.contains("tag=b"), "{t}");
        assert!(!t.contains("i: d") && !t.contains("CSeq: 2"), "{t}");
        assert!(p.message().is_some_and(|m| m.validate().is_ok()), "{t}");
    }

    #[test]
    fn responses_garbage_and_missing_transaction_headers_give_no_probe() {
        assert_eq!(build(b"SIP/2.0 200 OK\r\nl: 0\r\n\r\n", &[]), None);
        assert_eq!(build(b"\x00\xff\r\n\r\n", &[]), None);
        let no_cseq = INVITE.replace("CSeq: 2 INVITE\r\n", "");
        assert_eq!(build(no_cseq.as_bytes(), &[]), None);
        let bad_method = INVITE.replace("INVITE sip:", "INV@TE sip:");
        assert_eq!(build(bad_method.as_bytes(), &[]), None);
    }

    #[test]
    fn an_ack_matches_the_invite_it_acknowledges() {
        let invite = build(INVITE.as_bytes(), &[]).unwrap().key;
        let mut ack = invite.clone();
        ack.method = "ACK".into();
        assert!(invite.acked_by(&ack));
        ack.branch = "z9hG4bK-other".into();
        assert!(!invite.acked_by(&ack));
    }
}
