//! What a REGISTER asks of the registrar (RFC 3261 §10.3 steps 6–7), read from the
//! message alone, before its credentials are looked at: a refusal that depends only
//! on the request's shape (`Contact: *` without `Expires: 0`, an expiry below the
//! minimum) then answers a right and a wrong password alike, so it never tells a
//! guesser which it sent (docs/policy.md, step 7).

use crate::config::Registration;
use crate::sip::{Contacts, Message};
use crate::verdict::{Cause, Verdict};

/// A REGISTER's request, once its shape is known to be acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// No Contact: the current bindings are asked for (§10.3 step 6's query).
    Query,
    /// `Contact: *` with `Expires: 0`, or a Contact with an expiry of 0: the
    /// binding removed (a trunk group has one, whichever Contact is named).
    Remove,
    /// A Contact to bind for `expires` seconds (already shortened to the maximum).
    Bind { contact: &'a str, expires: u32 },
}

/// The request `msg` (a validated REGISTER) makes, or the refusal its shape gets
/// whoever sends it: `400` for `Contact: *` without `Expires: 0` (§10.3 step 6),
/// `423` with `Min-Expires` for a non-zero expiry below `reg.min_expires` (step 7).
/// Only the first Contact counts: a trunk group has one binding.
pub fn request<'a>(msg: &Message<'a>, reg: &Registration) -> Result<Request<'a>, Box<Verdict>> {
    let malformed = |e: crate::sip::ParseError| Box::new(crate::policy::malformed(&e));
    let header_expires = msg.expires().map_err(malformed)?;
    let contact = match msg.contacts().map_err(malformed)? {
        Contacts::Star if header_expires == Some(0) => return Ok(Request::Remove),
        Contacts::Star => {
            return Err(Box::new(Verdict::reject(
                400,
                "Bad Request (Contact * needs Expires: 0)",
                Cause::Malformed,
            )));
        }
        Contacts::List(list) => list.into_iter().next(),
    };
    let Some(contact) = contact else {
        return Ok(Request::Query);
    };
    let uri = contact.addr.uri.raw;
    match contact
        .expires
        .or(header_expires)
        .unwrap_or(reg.default_expires)
    {
        0 => Ok(Request::Remove),
        requested if requested < reg.min_expires => Err(Box::new(
            Verdict::reject(423, "Interval Too Brief", Cause::IntervalTooBrief)
                .with_header("Min-Expires", reg.min_expires.to_string()),
        )),
        requested => Ok(Request::Bind {
            contact: uri,
            expires: requested.min(reg.max_expires),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::{self, Framing};

    fn register(headers: &[&str]) -> Vec<u8> {
        let mut lines = vec![
            "REGISTER sip:trunks.example.net SIP/2.0",
            "Via: SIP/2.0/UDP 203.0.113.7;branch=z9hG4bK1",
            "From: <sip:hq1@trunks.example.net>;tag=1",
            "To: <sip:hq1@trunks.example.net>",
            "Call-ID: r@h",
            "CSeq: 1 REGISTER",
        ];
        lines.extend_from_slice(headers);
        lines.push("Content-Length: 0");
        format!("{}\r\n\r\n", lines.join("\r\n")).into_bytes()
    }

    #[test]
    fn each_shape_reads_as_its_request_or_its_refusal() {
        let reg = Registration {
            min_expires: 60,
            max_expires: 3600,
            default_expires: 1800,
        };
        let c = "Contact: <sip:hq1@203.0.113.7>";
        type Row<'t> = (&'t [&'t str], Result<Request<'t>, (u16, Cause)>);
        let table: [Row<'_>; 9] = [
            (&[], Ok(Request::Query)),
            (&["Contact: *", "Expires: 0"], Ok(Request::Remove)),
            (
                &["Contact: *", "Expires: 300"],
                Err((400, Cause::Malformed)),
            ),
            (&["Contact: *"], Err((400, Cause::Malformed))),
            (&[c, "Expires: 0"], Ok(Request::Remove)),
            (&[c, "Expires: 30"], Err((423, Cause::IntervalTooBrief))),
            (
                &["Contact: <sip:hq1@203.0.113.7>;expires=30", "Expires: 300"],
                Err((423, Cause::IntervalTooBrief)),
            ),
            (
                &[c],
                Ok(Request::Bind {
                    contact: "sip:hq1@203.0.113.7",
                    expires: 1800,
                }),
            ),
            (
                &[c, "Expires: 7200"],
                Ok(Request::Bind {
                    contact: "sip:hq1@203.0.113.7",
                    expires: 3600,
                }),
            ),
        ];
        for (headers, want) in table {
            let raw = register(headers);
            let msg = sip::parse(&raw, Framing::Datagram).unwrap();
            msg.validate().unwrap();
            let got = request(&msg, &reg).map_err(|v| (v.code.unwrap(), v.cause.unwrap()));
            assert_eq!(got, want, "{headers:?}");
        }
        let raw = register(&[c, "Expires: 30"]);
        let msg = sip::parse(&raw, Framing::Datagram).unwrap();
        let refused = request(&msg, &reg).unwrap_err();
        assert_eq!(
            refused.headers,
            vec![("Min-Expires".to_string(), "60".to_string())]
        );
    }
}
