//! One client connection through the filter: messages reassembled in both
//! directions, every client message judged, and the answers of the policy delivered
//! in place of the upstream's refusal of their probe (see `probe`).
//!
//! Pure logic: the proxy-wasm glue (`filter`) feeds it the chunks Envoy hands over
//! and applies the outcome, so all of it is tested natively.

use std::collections::VecDeque;
use std::net::SocketAddr;

use super::probe::{self, Key};
use super::stream::{Item, Reassembler};
use trunkguard::answer;
use trunkguard::sip::{Framing, frames_alike, parse};
use trunkguard::verdict::{Cause, Verdict};

/// What the filter does with a request the policy answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRefusal {
    /// Send a probe upstream and turn its refusal into the policy's answer.
    #[default]
    Answer,
    /// Drop the request and close the connection: for upstreams that do not refuse
    /// a request with Max-Forwards 0. The client gets no SIP answer.
    Close,
}

/// The policy, as the connection sees it.
pub trait Judge {
    fn judge(&mut self, message: &[u8]) -> Verdict;
    /// A fresh To-tag for an answer.
    fn to_tag(&mut self) -> String;
}

/// Answers waiting for the upstream's refusal of their probe, per connection. A PBX
/// or an SBC may pipeline hundreds of requests on one connection; past this many the
/// oldest is forgotten, and its client gets the upstream's refusal (483) as it is.
const MAX_PENDING: usize = 1024;
/// INVITEs answered, whose ACK (for that answer) stops at the filter; an ACK of an
/// older one goes upstream, which drops it (it matches no transaction there).
const MAX_ANSWERED: usize = 1024;

#[derive(Debug)]
struct Pending {
    key: Key,
    answer: Vec<u8>,
}

/// What to do with one chunk.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes that replace the chunk; `None`: pass it on as received.
    pub data: Option<Vec<u8>>,
    /// Close the connection (after `data`), and why.
    pub close: Option<&'static str>,
    /// Messages judged.
    pub judged: u32,
    /// Requests replaced by a probe.
    pub probes: u32,
    /// Upstream refusals replaced by the policy's answer.
    pub answers: u32,
    /// ACKs of the filter's own answers, dropped.
    pub absorbed: u32,
    /// Refused messages that are never answered (responses, ACKs), dropped.
    pub dropped: u32,
}

enum Step {
    Pass,
    Replace(Vec<u8>),
    Drop,
    Close(&'static str),
}

#[derive(Debug, Default)]
pub struct Conn {
    mode: OnRefusal,
    down: Reassembler,
    up: Reassembler,
    pending: VecDeque<Pending>,
    answered: VecDeque<Key>,
}

impl Conn {
    pub fn new(mode: OnRefusal) -> Conn {
        Conn {
            mode,
            ..Conn::default()
        }
    }

    /// Answers still waiting for the upstream.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Bytes from the client.
    pub fn downstream(&mut self, chunk: &[u8], judge: &mut dyn Judge) -> Outcome {
        let Conn {
            mode,
            down,
            pending,
            answered,
            ..
        } = self;
        let mut o = Outcome::default();
        let mut out = Vec::with_capacity(chunk.len());
        let mut changed = false;
        let fed = down.feed(chunk, |item| {
            if o.close.is_some() {
                changed = true;
                return;
            }
            let Item::Message(raw) = item else {
                out.extend_from_slice(item.bytes());
                return;
            };
            match upstream_reads_alike(
                raw,
                on_request(raw, *mode, pending, answered, judge, &mut o),
            ) {
                Step::Pass => out.extend_from_slice(raw),
                Step::Replace(bytes) => {
                    changed = true;
                    out.extend_from_slice(&bytes);
                }
                Step::Drop => changed = true,
                Step::Close(why) => {
                    changed = true;
                    o.close = Some(why);
                }
            }
        });
        match fed {
            Ok(fed) => changed |= fed.reshaped(),
            Err(_) => {
                changed = true;
                o.close
                    .get_or_insert("the client's stream cannot be framed");
            }
        }
        if changed {
            o.data = Some(out);
        }
        o
    }

    /// Bytes from the upstream.
    pub fn upstream(&mut self, chunk: &[u8]) -> Outcome {
        let Conn { up, pending, .. } = self;
        let mut o = Outcome::default();
        let mut out = Vec::with_capacity(chunk.len());
        let mut changed = false;
        let fed = up.feed(chunk, |item| {
            let raw = item.bytes();
            let answer = match item {
                Item::Message(raw) if !pending.is_empty() && is_response(raw) => {
                    answer_for(raw, pending)
                }
                _ => None,
            };
            match answer {
                None => out.extend_from_slice(raw),
                Some(None) => changed = true,
                Some(Some(bytes)) => {
                    changed = true;
                    o.answers += 1;
                    out.extend_from_slice(&bytes);
                }
            }
        });
        match fed {
            Ok(fed) => changed |= fed.reshaped(),
            Err(_) => {
                changed = true;
                o.close = Some("the upstream's stream cannot be framed");
            }
        }
        if changed {
            o.data = Some(out);
        }
        o
    }
}

fn on_request(
    raw: &[u8],
    mode: OnRefusal,
    pending: &mut VecDeque<Pending>,
    answered: &mut VecDeque<Key>,
    judge: &mut dyn Judge,
    o: &mut Outcome,
) -> Step {
    if !answered.is_empty() && starts(raw, b"ACK ") {
        let key = parse(raw, Framing::Stream).ok().and_then(|m| Key::of(&m));
        if let Some(i) = key.and_then(|k| answered.iter().position(|a| a.acked_by(&k))) {
            answered.remove(i);
            o.absorbed += 1;
            return Step::Drop;
        }
    }
    o.judged += 1;
    let verdict = judge.judge(raw);
    if answer::status(&verdict).is_none() {
        return relayed(raw, &verdict);
    }
    // RFC 3261 §17: a response or an ACK is never answered; refused, it just stops.
    if is_response(raw) || starts(raw, b"ACK ") {
        o.dropped += 1;
        return Step::Drop;
    }
    if mode == OnRefusal::Close {
        return Step::Close("a refused request (on_refusal: close)");
    }
    // An accepted REGISTER's verdict carries the binding announcement in `insert`,
    // and every request's the sender's IP (`with_source`): they go upstream on the
    // probe.
    let Some(probe) = probe::build(raw, &verdict.insert) else {
        return Step::Close("a refused request without readable transaction headers");
    };
    let tag = judge.to_tag();
    let Some(answer) = probe
        .message()
        .and_then(|m| answer::render(&m, &verdict, &tag))
    else {
        return Step::Close("a refused request without readable transaction headers");
    };
    if probe.key.method == "INVITE" {
        if answered.len() >= MAX_ANSWERED {
            answered.pop_front();
        }
        answered.push_back(probe.key.clone());
    }
    if pending.len() >= MAX_PENDING {
        pending.pop_front();
    }
    pending.push_back(Pending {
        key: probe.key,
        answer,
    });
    o.probes += 1;
    Step::Replace(probe.bytes)
}

/// The header the upstream reads a request's sender from (docs/envoy.md, "What the
/// upstream must do"): every connection through Envoy comes from Envoy's own
/// address, so without it the upstream cannot tell one PBX from another, nor hold
/// a call's in-dialog requests to its PBX.
pub const SOURCE_HEADER: &str = "X-Trunkguard-Source";

/// `verdict` with the sender's IP written on the request as it goes upstream (or on
/// its probe), after whatever the sender wrote in that header is removed; a
/// response goes as it came.
pub fn with_source(mut verdict: Verdict, source: SocketAddr) -> Verdict {
    if verdict.cause != Some(Cause::Response) {
        verdict.strip.push(SOURCE_HEADER.into());
        let ip = trunkguard::acl::canonical_ip(source.ip());
        verdict
            .insert
            .push((SOURCE_HEADER.to_string(), ip.to_string()));
    }
    verdict
}

/// For a response to a probe: `Some(None)` drops it (a provisional one),
/// `Some(Some(answer))` replaces it. `None`: not a probe's, pass it on.
fn answer_for(raw: &[u8], pending: &mut VecDeque<Pending>) -> Option<Option<Vec<u8>>> {
    let msg = parse(raw, Framing::Stream).ok()?;
    let key = Key::of(&msg)?;
    let i = pending.iter().position(|p| p.key == key)?;
    if msg.status_code().unwrap_or(0) < 200 {
        return Some(None);
    }
    Some(pending.remove(i).map(|p| p.answer))
}

/// An allowed message as it goes upstream: with the verdict's `strip`/`insert`
/// applied (the PBX's credentials and asserted identity stop here, the trunk group
/// is named), edited through the same parse the policy judged.
fn relayed(raw: &[u8], verdict: &Verdict) -> Step {
    if verdict.strip.is_empty() && verdict.insert.is_empty() {
        return Step::Pass;
    }
    match parse(raw, Framing::Stream) {
        Ok(m) => Step::Replace(m.edited(&verdict.strip, &verdict.insert)),
        Err(_) => Step::Close("an allowed message that cannot be edited"),
    }
}

/// What goes upstream must be the message the policy judged to the upstream's own
/// stream reader too (`frames_alike`, crates/sip/src/framing.rs): otherwise what the
/// filter took for one message's body could be a request of its own to the upstream,
/// one nobody judged (docs/envoy.md, "Framing"). A message passed as received that
/// folds a header goes unfolded, as an edited one does; anything else that could
/// be cut otherwise closes the connection, whose framing is then in doubt.
fn upstream_reads_alike(raw: &[u8], step: Step) -> Step {
    const OTHERWISE: &str = "a message the upstream could frame otherwise";
    match step {
        Step::Pass if !frames_alike(raw) => match parse(raw, Framing::Stream) {
            Ok(m) => upstream_reads_alike(raw, Step::Replace(m.edited::<&str>(&[], &[]))),
            Err(_) => Step::Close(OTHERWISE),
        },
        Step::Replace(bytes) if !frames_alike(&bytes) => Step::Close(OTHERWISE),
        step => step,
    }
}

fn starts(raw: &[u8], prefix: &[u8]) -> bool {
    let mut b = raw;
    while let [b'\r', b'\n', rest @ ..] = b {
        b = rest;
    }
    b.starts_with(prefix)
}

/// Read as the policy reads it (a status line parses as a response whatever the
/// letter case of `SIP/2.0`), so that a response is never mistaken for a request to
/// answer, nor the other way round. Unparseable bytes count as a response when they
/// start like one in any case, so they are dropped, never answered.
fn is_response(raw: &[u8]) -> bool {
    match parse(raw, Framing::Stream) {
        Ok(m) => m.method().is_none(),
        Err(_) => {
            let mut b = raw;
            while let [b'\r', b'\n', rest @ ..] = b {
                b = rest;
            }
            b.get(..4).is_some_and(|p| p.eq_ignore_ascii_case(b"SIP/"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trunkguard::verdict::Action;

    /// Refuses INVITEs from "intruder", challenges INVITEs without credentials,
    /// allows the rest.
    struct Fake(u32);

    impl Judge for Fake {
        fn judge(&mut self, m: &[u8]) -> Verdict {
            let t = String::from_utf8_lossy(m);
            if t.contains("From: <sip:intruder") {
                Verdict::reject(
                    403,
                    "Forbidden (not_in_access_list)",
                    Cause::NotInAccessList,
                )
            } else if t.starts_with("REGISTER") {
                // Accepted, with the binding announcement the real policy makes.
                let mut v = Verdict::reject(200, "OK", Cause::Registered)
                    .with_header("Contact", "<sip:hq1@127.0.0.2:5060>;expires=60");
                v.action = Action::Accept;
                v.insert = vec![
                    ("X-Trunkguard-Binding".into(), "hq;expires=60".into()),
                    (
                        "X-Trunkguard-Binding-Contact".into(),
                        "sip:hq1@127.0.0.2:5060".into(),
                    ),
                ];
                v
            } else if t.starts_with("garbage") {
                Verdict::reject(400, "Bad Request", Cause::Malformed)
            } else if t.starts_with("INVITE") && !t.contains("Proxy-Authorization") {
                let mut v =
                    Verdict::reject(407, "Proxy Authentication Required", Cause::AuthRequired)
                        .with_header("Proxy-Authenticate", "Digest realm=\"r\", nonce=\"n\"");
                v.action = Action::Challenge;
                v
            } else if t.contains("P-Asserted-Identity") {
                // A trunk call as the real policy allows it: edited on the way.
                let mut v = Verdict::allow_as(Cause::Trunk);
                v.strip = vec!["Proxy-Authorization".into(), "P-Asserted-Identity".into()];
                v.insert = vec![("X-Trunkguard-Trunk-Group".into(), "hq".into())];
                v
            } else {
                Verdict::allow()
            }
        }

        fn to_tag(&mut self) -> String {
            self.0 += 1;
            format!("tg{}", self.0)
        }
    }

    #[test]
    fn an_accepted_register_announces_its_binding_upstream_but_not_to_the_pbx() {
        let mut c = Conn::new(OnRefusal::Answer);
        let reg = "REGISTER sip:t SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.2:5060;branch=z9hG4bK-r\r\n\
Max-Forwards: 70\r\nFrom: <sip:hq1@t>;tag=f\r\nTo: <sip:hq1@t>\r\nCall-ID: r@pbx\r\n\
CSeq: 1 REGISTER\r\nContact: <sip:hq1@127.0.0.2:5060>\r\n\
X-Trunkguard-Binding: forged;expires=9\r\nContent-Length: 0\r\n\r\n";
        let o = c.downstream(reg.as_bytes(), &mut Fake(0));
        let probe = text(&o.data);
        assert!(
            probe.contains(
                "X-Trunkguard-Binding: hq;expires=60\r\n\
X-Trunkguard-Binding-Contact: sip:hq1@127.0.0.2:5060\r\nMax-Forwards: 0\r\n"
            ),
            "{probe}"
        );
        assert!(
            !probe.contains("forged"),
            "the PBX's own copy never goes up: {probe}"
        );
        let answer = c.upstream(&refusal(probe.as_bytes(), "483 Too Many Hops"));
        let answer = text(&answer.data);
        assert!(answer.starts_with("SIP/2.0 200 OK\r\n"), "{answer}");
        assert!(!answer.contains("X-Trunkguard"), "{answer}");
    }

    fn invite(from: &str, branch: &str, extra: &str) -> String {
        format!(
            "INVITE sip:+1555@t SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.2:5060;branch={branch}\r\n\
Max-Forwards: 70\r\nFrom: <sip:{from}@t>;tag=f\r\nTo: <sip:+1555@t>\r\nCall-ID: {branch}@pbx\r\n\
CSeq: 1 INVITE\r\n{extra}Content-Length: 3\r\n\r\nsdp"
        )
    }

    /// What a proxy answers to a probe (Kamailio's sl_send_reply adds a To-tag and
    /// received/rport, and a Server header).
    fn refusal(probe: &[u8], code: &str) -> Vec<u8> {
        let p = std::str::from_utf8(probe).unwrap();
        let mut out = format!("SIP/2.0 {code}\r\n");
        for line in p.split("\r\n").skip(1) {
            if line.starts_with("Via:") {
                out += &format!("{line};received=127.0.0.1;rport=40000\r\n");
            } else if line.starts_with("To:") {
                out += &format!("{line};tag=kam\r\n");
            } else if ["From:", "Call-ID:", "CSeq:"]
                .iter()
                .any(|h| line.starts_with(h))
            {
                out += &format!("{line}\r\n");
            }
        }
        out += "Server: kamailio\r\nContent-Length: 0\r\n\r\n";
        out.into_bytes()
    }

    fn text(b: &Option<Vec<u8>>) -> String {
        String::from_utf8_lossy(b.as_deref().unwrap_or_default()).into_owned()
    }

    #[test]
    fn allowed_traffic_passes_untouched_both_ways() {
        let mut c = Conn::new(OnRefusal::Answer);
        let mut j = Fake(0);
        let two = invite("hq1", "z9hG4bK-a", "Proxy-Authorization: Digest x\r\n").repeat(2);
        let o = c.downstream(two.as_bytes(), &mut j);
        assert_eq!((o.data, o.close, o.judged), (None, None, 2));
        let o = c.upstream(b"SIP/2.0 100 Trying\r\nContent-Length: 0\r\n\r\n\r\n\r\n");
        assert_eq!(o, Outcome::default());
    }

    #[test]
    fn a_challenge_goes_upstream_as_a_probe_and_comes_back_in_place_of_the_483() {
        let mut c = Conn::new(OnRefusal::Answer);
        let mut j = Fake(0);
        let req = invite("hq1", "z9hG4bK-b", "");
        let o = c.downstream(req.as_bytes(), &mut j);
        let probe = text(&o.data);
        assert!(
            probe.contains("Max-Forwards: 0\r\nContent-Length: 0\r\n\r\n"),
            "{probe}"
        );
        assert!(!probe.contains("sdp"));
        assert_eq!((o.probes, c.pending()), (1, 1));

        // The 483, split in two, after an unrelated response.
        let other = b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP x;branch=z9hG4bK-zz\r\nCall-ID: zz\r\nCSeq: 9 BYE\r\nContent-Length: 0\r\n\r\n";
        let wire = [
            other.as_slice(),
            &refusal(probe.as_bytes(), "483 Too Many Hops"),
        ]
        .concat();
        let (a, b) = wire.split_at(other.len() + 30);
        let first = c.upstream(a);
        assert_eq!(text(&first.data).as_bytes(), other);
        let second = c.upstream(b);
        let answer = text(&second.data);
        assert!(
            answer.starts_with("SIP/2.0 407 Proxy Authentication Required\r\n"),
            "{answer}"
        );
        assert!(
            answer.contains("\r\nVia: SIP/2.0/TCP 127.0.0.2:5060;branch=z9hG4bK-b\r\n"),
            "{answer}"
        );
        assert!(
            answer.contains("\r\nTo: <sip:+1555@t>;tag=tg1\r\n"),
            "{answer}"
        );
        assert!(answer.contains("\r\nProxy-Authenticate: Digest realm=\"r\", nonce=\"n\"\r\n"));
        assert!(!answer.contains("kamailio"));
        assert_eq!((second.answers, c.pending()), (1, 0));

        // Its ACK stops here; the authenticated INVITE after it passes.
        let ack = "ACK sip:+1555@t SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.2:5060;branch=z9hG4bK-b\r\n\
From: <sip:hq1@t>;tag=f\r\nTo: <sip:+1555@t>;tag=tg1\r\nCall-ID: z9hG4bK-b@pbx\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n";
        let next = invite("hq1", "z9hG4bK-c", "Proxy-Authorization: Digest x\r\n");
        let o = c.downstream(format!("{ack}{next}").as_bytes(), &mut j);
        assert_eq!(text(&o.data), next);
        assert_eq!(o.absorbed, 1);
    }

    #[test]
    fn a_provisional_response_to_a_probe_is_dropped_and_any_final_one_answers() {
        let mut c = Conn::new(OnRefusal::Answer);
        let mut j = Fake(0);
        let o = c.downstream(invite("intruder", "z9hG4bK-d", "").as_bytes(), &mut j);
        let probe = o.data.unwrap_or_default();
        let wire = [
            refusal(&probe, "100 Trying"),
            refusal(&probe, "404 Not Found"),
        ]
        .concat();
        let answer = text(&c.upstream(&wire).data);
        assert!(
            answer.starts_with("SIP/2.0 403 Forbidden (not_in_access_list)\r\n"),
            "{answer}"
        );
        assert_eq!(answer.matches("SIP/2.0 ").count(), 1);
    }

    #[test]
    fn pipelined_refusals_each_get_their_answer_in_order() {
        let mut c = Conn::new(OnRefusal::Answer);
        let mut j = Fake(0);
        let reqs = [
            invite("intruder", "z9hG4bK-1", ""),
            invite("hq1", "z9hG4bK-2", ""),
        ]
        .concat();
        let o = c.downstream(reqs.as_bytes(), &mut j);
        let probes = text(&o.data);
        let (p1, p2) = probes.split_at(probes.find("INVITE sip:+1555@t SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.2:5060;branch=z9hG4bK-2").unwrap());
        // The upstream may answer in any order.
        let wire = [
            refusal(p2.as_bytes(), "483 Too Many Hops"),
            refusal(p1.as_bytes(), "483 Too Many Hops"),
        ]
        .concat();
        let answers = text(&c.upstream(&wire).data);
        let codes: Vec<&str> = answers
            .match_indices("SIP/2.0 4")
            .map(|(i, _)| &answers[i + 8..i + 11])
            .collect();
        assert_eq!(codes, ["407", "403"]);
    }

    #[test]
    fn past_the_pending_limit_the_oldest_refusal_goes_through_as_it_is() {
        let mut c = Conn::new(OnRefusal::Answer);
        let mut j = Fake(0);
        let probes: Vec<Vec<u8>> = (0..=MAX_PENDING)
            .map(|i| {
                let req = invite("intruder", &format!("z9hG4bK-{i}"), "");
                c.downstream(req.as_bytes(), &mut j).data.unwrap()
            })
            .collect();
        assert_eq!(c.pending(), MAX_PENDING);
        let oldest = refusal(&probes[0], "483 Too Many Hops");
        assert_eq!(c.upstream(&oldest).data, None);
        let newest = refusal(&probes[MAX_PENDING], "483 Too Many Hops");
        assert!(text(&c.upstream(&newest).data).starts_with("SIP/2.0 403 "));
    }

    #[test]
    fn garbage_never_reaches_the_upstream() {
        let mut c = Conn::new(OnRefusal::Answer);
        let mut j = Fake(0);
        // Framed but unreadable: no transaction headers to answer with.
        let o = c.downstream(b"garbage x SIP/2.0\r\nContent-Length: 0\r\n\r\n", &mut j);
        assert_eq!(o.data, Some(Vec::new()));
        assert!(o.close.is_some());
        // Unframeable: no Content-Length on a stream.
        let mut c = Conn::new(OnRefusal::Answer);
        let o = c.downstream(b"OPTIONS sip:x SIP/2.0\r\nVia: x\r\n\r\n", &mut j);
        assert_eq!((o.data, o.judged), (Some(Vec::new()), 0));
        assert!(o.close.is_some());
    }

    #[test]
    fn what_goes_upstream_is_cut_where_the_filter_cut_it() {
        let hidden = invite("x", "z9hG4bK-hidden", "X-Trunkguard-Trunk-Group: hq\r\n");
        // Allowed as received, but Kamailio's TCP reader takes `Content_Length: 0`
        // and reads the body as an INVITE of its own: nothing of it goes.
        let mut c = Conn::new(OnRefusal::Answer);
        let mut j = Fake(0);
        let underscore = format!(
            "OPTIONS sip:t SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK-o\r\nFrom: <sip:a@t>;tag=1\r\n\
To: <sip:t>\r\nCall-ID: o\r\nCSeq: 1 OPTIONS\r\nContent_Length: 0\r\nContent-Length: {}\r\n\r\n{hidden}",
            hidden.len()
        );
        let o = c.downstream(underscore.as_bytes(), &mut j);
        assert_eq!(o.data, Some(Vec::new()));
        assert!(o.close.is_some());
        // A folded line that reads as Content-Length on its own: passed unfolded.
        let mut c = Conn::new(OnRefusal::Answer);
        let folded = format!(
            "SIP/2.0 180 Ringing\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK-r\r\nFrom: <sip:a@t>;tag=1\r\n\
To: <sip:b@t>;tag=2\r\nCall-ID: r\r\nCSeq: 1 INVITE\r\nSubject: hi\r\n l: 0 x\r\nContent-Length: {}\r\n\r\n{hidden}",
            hidden.len()
        );
        let o = c.downstream(folded.as_bytes(), &mut j);
        let out = o.data.expect("unfolded");
        assert!(o.close.is_none());
        assert!(frames_alike(&out), "{}", String::from_utf8_lossy(&out));
        assert!(String::from_utf8_lossy(&out).contains("Subject: hi l: 0 x\r\n"));
        // The probe of a refused INVITE whose To folds such a line: joined too.
        let mut c = Conn::new(OnRefusal::Answer);
        let req = invite("hq1", "z9hG4bK-p", "")
            .replace("To: <sip:+1555@t>", "To: \"a\r\n l: 0170 x\" <sip:+1555@t>");
        let o = c.downstream(req.as_bytes(), &mut j);
        let out = o.data.expect("a probe");
        assert_eq!((o.probes, o.close), (1, None));
        assert!(frames_alike(&out), "{}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn refused_responses_and_acks_are_dropped_not_answered() {
        let mut c = Conn::new(OnRefusal::Answer);
        let mut j = Fake(0);
        let resp = b"SIP/2.0 200 OK\r\nFrom: <sip:intruder@t>\r\nContent-Length: 0\r\n\r\n";
        let o = c.downstream(resp, &mut j);
        assert_eq!((o.data, o.close, o.dropped), (Some(Vec::new()), None, 1));
        // A status line in other letter case is still a response: dropped, never
        // answered through a probe.
        let resp = b"sip/2.0 200 OK\r\nFrom: <sip:intruder@t>\r\nContent-Length: 0\r\n\r\n";
        let o = c.downstream(resp, &mut j);
        assert_eq!(
            (o.data, o.close, o.dropped, o.probes),
            (Some(Vec::new()), None, 1, 0)
        );
        // The ACK of a refused request is never answered either.
        let ack = b"ACK sip:+1555@t SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.2:5060;branch=z9hG4bK-a\r\nFrom: <sip:intruder@t>;tag=f\r\nTo: <sip:+1555@t>;tag=x\r\nCall-ID: a@pbx\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n";
        let o = c.downstream(ack, &mut j);
        assert_eq!(
            (o.data, o.close, o.dropped, o.probes),
            (Some(Vec::new()), None, 1, 0)
        );
    }

    #[test]
    fn a_request_goes_upstream_with_its_senders_ip_in_place_of_any_it_wrote_and_a_response_as_it_came()
     {
        let source: SocketAddr = "[::ffff:203.0.113.7]:5060".parse().unwrap();
        let v = with_source(Verdict::allow_as(Cause::InDialog), source);
        assert_eq!(v.strip, vec![SOURCE_HEADER]);
        assert_eq!(
            v.insert,
            vec![(SOURCE_HEADER.to_string(), "203.0.113.7".to_string())]
        );
        let forged = format!(
            "BYE sip:x@y SIP/2.0\r\nVia: SIP/2.0/TCP 203.0.113.7;branch=z9hG4bK-1\r\n{SOURCE_HEADER}: 198.51.100.1\r\nFrom: <sip:a@y>;tag=1\r\nTo: <sip:b@y>;tag=2\r\nCall-ID: c\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n"
        );
        let Step::Replace(out) = relayed(forged.as_bytes(), &v) else {
            panic!("not edited")
        };
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains("198.51.100.1"), "{out}");
        assert_eq!(
            out.matches(&format!("{SOURCE_HEADER}: 203.0.113.7\r\n"))
                .count(),
            1,
            "{out}"
        );
        let response = with_source(Verdict::allow_as(Cause::Response), source);
        assert!(response.strip.is_empty() && response.insert.is_empty());
    }

    #[test]
    fn allowed_requests_leave_with_the_verdicts_strip_and_insert_applied() {
        let mut c = Conn::new(OnRefusal::Answer);
        let mut j = Fake(0);
        let call = invite(
            "hq1",
            "z9hG4bK-s",
            "Proxy-Authorization: Digest x\r\nP-Asserted-Identity: <sip:+19005550100@t>\r\n",
        );
        let o = c.downstream(call.as_bytes(), &mut j);
        let out = text(&o.data);
        assert!(!out.contains("Proxy-Authorization"), "{out}");
        assert!(!out.contains("P-Asserted-Identity"), "{out}");
        assert!(
            out.contains("\r\nX-Trunkguard-Trunk-Group: hq\r\n\r\nsdp"),
            "{out}"
        );
        assert_eq!(o.close, None);
    }

    #[test]
    fn close_mode_closes_instead_of_answering() {
        let mut c = Conn::new(OnRefusal::Close);
        let mut j = Fake(0);
        let ok = invite("hq1", "z9hG4bK-e", "Proxy-Authorization: Digest x\r\n");
        let o = c.downstream(
            format!("{ok}{}", invite("intruder", "z9hG4bK-f", "")).as_bytes(),
            &mut j,
        );
        assert_eq!(text(&o.data), ok);
        assert!(o.close.is_some());
    }
}
