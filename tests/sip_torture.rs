//! The RFC 4475 and RFC 5118 torture messages, each judged as
//! `tests/testdata/README.md` says. Every file in the directory must have a row in
//! [`EXPECTED`], so a new file cannot be skipped silently.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use trunkguard::sip::{Frame, Framing, Message, ParseError, frame_stream, parse};

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Well-formed: parses with datagram framing and passes `validate()`.
    Valid,
    /// Well-formed syntax, wrong semantics (RFC 4475 §3.3): parses; `validate()`
    /// gives this result.
    Semantic(Result<(), ParseError>),
    /// Malformed: `parse()` refuses it with this error.
    RefusedByParse(ParseError),
    /// Malformed: parses, `validate()` refuses it with this error.
    RefusedByValidate(ParseError),
    /// clerr: Content-Length beyond the body: incomplete over a stream, an error over
    /// a datagram.
    IncompleteOverStream,
}

use Expect::*;
use ParseError as E;

const fn bad(header: &'static str, reason: &'static str) -> ParseError {
    E::BadHeaderValue { header, reason }
}

const EXPECTED: &[(&str, Expect)] = &[
    // RFC 4475 §3.1.1: well-formed.
    ("rfc4475/wsinv.dat", Valid),
    ("rfc4475/intmeth.dat", Valid),
    ("rfc4475/esc01.dat", Valid),
    ("rfc4475/escnull.dat", Valid),
    ("rfc4475/esc02.dat", Valid),
    ("rfc4475/lwsdisp.dat", Valid),
    ("rfc4475/longreq.dat", Valid),
    ("rfc4475/dblreq.dat", Valid),
    ("rfc4475/semiuri.dat", Valid),
    ("rfc4475/transports.dat", Valid),
    ("rfc4475/mpart01.dat", Valid),
    ("rfc4475/unreason.dat", Valid),
    ("rfc4475/noreason.dat", Valid),
    // RFC 4475 §3.1.2: malformed.
    (
        "rfc4475/badinv01.dat",
        RefusedByValidate(bad("Via", "empty parameter")),
    ),
    ("rfc4475/clerr.dat", IncompleteOverStream),
    ("rfc4475/ncl.dat", RefusedByParse(E::BadContentLength)),
    (
        "rfc4475/scalar02.dat",
        RefusedByValidate(bad("CSeq", "sequence number out of range")),
    ),
    (
        "rfc4475/scalarlg.dat",
        RefusedByValidate(bad("CSeq", "sequence number out of range")),
    ),
    (
        "rfc4475/quotbal.dat",
        RefusedByValidate(bad("To", "unbalanced quotes")),
    ),
    (
        "rfc4475/ltgtruri.dat",
        RefusedByParse(E::BadUri {
            reason: "bad scheme",
        }),
    ),
    ("rfc4475/lwsruri.dat", RefusedByParse(E::BadStartLine)),
    ("rfc4475/lwsstart.dat", RefusedByParse(E::BadStartLine)),
    // Trailing whitespace after SIP-Version: the RFC tolerates accepting it, and we do.
    ("rfc4475/trws.dat", Valid),
    (
        "rfc4475/escruri.dat",
        RefusedByParse(E::BadUri {
            reason: "headers not allowed in Request-URI",
        }),
    ),
    (
        "rfc4475/baddate.dat",
        RefusedByValidate(bad("Date", "not in GMT")),
    ),
    (
        "rfc4475/regbadct.dat",
        RefusedByValidate(bad("Contact", "URI with , ? or quotes must be in <>")),
    ),
    (
        "rfc4475/badaspec.dat",
        RefusedByValidate(bad("To", "bad scheme")),
    ),
    (
        "rfc4475/baddn.dat",
        RefusedByValidate(bad("From", "bad display name")),
    ),
    ("rfc4475/badvers.dat", RefusedByParse(E::BadVersion)),
    ("rfc4475/mismatch01.dat", RefusedByValidate(E::CSeqMismatch)),
    ("rfc4475/mismatch02.dat", RefusedByValidate(E::CSeqMismatch)),
    ("rfc4475/bigcode.dat", RefusedByParse(E::BadStatusCode)),
    // RFC 4475 §3.2: transaction layer.
    ("rfc4475/badbranch.dat", Valid),
    // RFC 4475 §3.3: application layer, parse without crashing.
    ("rfc4475/insuf.dat", Semantic(Err(E::MissingHeader("To")))),
    ("rfc4475/unkscm.dat", Semantic(Ok(()))),
    ("rfc4475/novelsc.dat", Semantic(Ok(()))),
    ("rfc4475/unksm2.dat", Semantic(Ok(()))),
    ("rfc4475/bext01.dat", Semantic(Ok(()))),
    ("rfc4475/invut.dat", Semantic(Ok(()))),
    ("rfc4475/regaut01.dat", Semantic(Ok(()))),
    (
        "rfc4475/multi01.dat",
        Semantic(Err(E::DuplicateHeader("Call-ID"))),
    ),
    // Two Content-Length values that disagree: refused at the parse over any
    // transport, as a datagram may be relayed onto a stream (docs/policy.md).
    ("rfc4475/mcl01.dat", RefusedByParse(E::BadContentLength)),
    ("rfc4475/bcast.dat", Semantic(Ok(()))),
    ("rfc4475/zeromf.dat", Semantic(Ok(()))),
    ("rfc4475/cparam01.dat", Semantic(Ok(()))),
    ("rfc4475/cparam02.dat", Semantic(Ok(()))),
    ("rfc4475/regescrt.dat", Semantic(Ok(()))),
    ("rfc4475/sdp01.dat", Semantic(Ok(()))),
    // RFC 4475 §3.4: RFC 2543 syntax, accepted by a tolerant parser.
    ("rfc4475/inv2543.dat", Valid),
    // RFC 5118.
    ("rfc5118/ipv6-good", Valid),
    ("rfc5118/ipv6-correct-abnf-2-colons", Valid),
    ("rfc5118/port-unambiguous", Valid),
    ("rfc5118/port-ambiguous", Valid),
    ("rfc5118/ipv4-mapped-ipv6", Valid),
    ("rfc5118/via-received-param-with-delim", Valid),
    ("rfc5118/via-received-param-no-delim", Valid),
    ("rfc5118/mult-ip-in-header", Valid),
    ("rfc5118/ipv6-in-sdp", Valid),
    ("rfc5118/mult-ip-in-sdp", Valid),
    (
        "rfc5118/ipv6-bad",
        RefusedByParse(E::BadUri { reason: "bad port" }),
    ),
    // May be accepted or refused; refusing is the stricter choice.
    (
        "rfc5118/ipv6-bug-abnf-3-colons",
        RefusedByParse(E::BadUri {
            reason: "bad IPv6 address",
        }),
    ),
];

fn testdata_dir() -> PathBuf {
    let dir = std::env::var_os("TRUNKGUARD_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/testdata"));
    assert!(
        dir.is_dir(),
        "torture test data not found at {} (set TRUNKGUARD_TESTDATA)",
        dir.display()
    );
    dir
}

/// Every message file under the data directory, keyed by its path relative to it.
fn files() -> BTreeMap<String, Vec<u8>> {
    let root = testdata_dir();
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            if rel != "README.md" {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

fn judge(name: &str, bytes: &[u8], expect: Expect) -> Result<(), String> {
    let datagram = parse(bytes, Framing::Datagram);
    let validated = datagram.as_ref().map(Message::validate);
    let got = format!(
        "parse {:?}, validate {:?}",
        datagram.as_ref().map(|_| ()),
        validated
    );
    let ok = match expect {
        Valid => matches!(validated, Ok(Ok(()))),
        Semantic(want) => validated == Ok(want),
        RefusedByParse(want) => datagram.as_ref().err() == Some(&want),
        RefusedByValidate(want) => validated == Ok(Err(want)),
        IncompleteOverStream => {
            datagram.as_ref().err() == Some(&E::BodyShorterThanContentLength)
                && parse(bytes, Framing::Stream).err() == Some(E::Incomplete)
                && frame_stream(bytes) == Ok(Frame::Incomplete)
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{name}: expected {expect:?}, got {got}"))
    }
}

#[test]
fn every_torture_file_is_judged_as_the_readme_says() {
    let files = files();
    let table: BTreeMap<&str, Expect> = EXPECTED.iter().copied().collect();
    assert_eq!(table.len(), EXPECTED.len(), "duplicate rows in EXPECTED");
    let unlisted: Vec<&String> = files
        .keys()
        .filter(|f| !table.contains_key(f.as_str()))
        .collect();
    assert!(
        unlisted.is_empty(),
        "files without an expected outcome: {unlisted:?}"
    );
    let missing: Vec<&&str> = table.keys().filter(|f| !files.contains_key(**f)).collect();
    assert!(missing.is_empty(), "expected files not found: {missing:?}");

    let failures: Vec<String> = files
        .iter()
        .filter_map(|(name, bytes)| judge(name, bytes, table[name.as_str()]).err())
        .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Files that parse over a datagram but cannot be framed on a stream: no
/// Content-Length (RFC 2543 style).
const NOT_STREAM_FRAMABLE: &[(&str, ParseError)] =
    &[("rfc4475/inv2543.dat", E::MissingHeader("Content-Length"))];

#[test]
fn messages_that_parse_over_datagram_frame_and_parse_over_a_stream() {
    let files = files();
    for (name, bytes) in &files {
        let Ok(datagram) = parse(bytes, Framing::Datagram) else {
            continue;
        };
        let frame = frame_stream(bytes);
        if let Some((_, err)) = NOT_STREAM_FRAMABLE.iter().find(|(f, _)| f == name) {
            assert_eq!(frame, Err(*err), "{name}");
            continue;
        }
        let Ok(Frame::Message(n)) = frame else {
            panic!("{name}: framed as {frame:?}");
        };
        let stream = parse(&bytes[..n], Framing::Stream).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            stream.headers().count(),
            datagram.headers().count(),
            "{name}"
        );
        assert_eq!(stream.body(), datagram.body(), "{name}");
        assert_eq!(stream.validate(), datagram.validate(), "{name}");
    }
}

#[test]
fn well_formed_torture_messages_expose_their_details() {
    let files = files();
    let get = |name: &str| parse(&files[name], Framing::Datagram).unwrap();

    let wsinv = get("rfc4475/wsinv.dat");
    assert_eq!(wsinv.max_forwards(), Ok(Some(68)));
    assert_eq!(wsinv.cseq().map(|c| c.seq), Ok(9));
    assert_eq!(wsinv.to().unwrap().tag, Some("1918181833n"));
    let from = wsinv.from().unwrap();
    assert_eq!(
        from.display_unescaped().as_deref(),
        Some("J Rosenberg \\\"")
    );
    assert_eq!(from.tag, Some("98asjd8"));
    assert_eq!(wsinv.vias().count(), 3);
    assert_eq!(wsinv.top_via().unwrap().branch, Some("390skdjuw"));

    let esc01 = get("rfc4475/esc01.dat");
    assert_eq!(
        esc01.request_uri().unwrap().user_unescaped(),
        "sips:user@example.com"
    );
    assert_eq!(esc01.to().unwrap().uri.user_unescaped(), "user");

    let esc02 = get("rfc4475/esc02.dat");
    assert_eq!(esc02.method().unwrap().as_str(), "RE%47IST%45R");
    let trunkguard::sip::Contacts::List(contacts) = esc02.contacts().unwrap() else {
        panic!("esc02 contacts");
    };
    assert_eq!(contacts.len(), 2, "C%6Fntact is not Contact");

    let dblreq = get("rfc4475/dblreq.dat");
    assert_eq!(dblreq.body(), b"");
    assert_eq!(
        dblreq.call_id(),
        Some("dblreq.0ha0isndaksdj99sdfafnl3lk233412")
    );

    let transports = get("rfc4475/transports.dat");
    let kinds: Vec<_> = transports
        .vias()
        .map(|v| v.unwrap().transport_raw)
        .collect();
    assert_eq!(kinds, ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]);

    let noreason = get("rfc4475/noreason.dat");
    assert_eq!(
        (noreason.status_code(), noreason.reason_phrase()),
        (Some(100), Some(""))
    );

    let longreq = get("rfc4475/longreq.dat");
    assert_eq!(longreq.vias().count(), 34);

    let received = get("rfc5118/via-received-param-no-delim");
    assert_eq!(
        received.top_via().unwrap().received_ip(),
        "2001:db8::9:255".parse().ok()
    );
    let ambiguous = get("rfc5118/port-ambiguous");
    let uri = ambiguous.request_uri().unwrap();
    assert_eq!(
        (uri.host.to_string().as_str(), uri.port),
        ("[2001:db8::10:5070]", None)
    );
    let unambiguous = get("rfc5118/port-unambiguous");
    let uri = unambiguous.request_uri().unwrap();
    assert_eq!(
        (uri.host.to_string().as_str(), uri.port),
        ("[2001:db8::10]", Some(5070))
    );

    let sdp = get("rfc5118/ipv6-in-sdp");
    assert_eq!(
        sdp.body().len(),
        241,
        "Content-Length frames the body, extra bytes ignored"
    );

    let scalar02 = get("rfc4475/scalar02.dat");
    assert_eq!(
        scalar02.expires(),
        Ok(Some(u32::MAX)),
        "huge Expires saturates"
    );
}
