//! Property tests: no input makes the parser panic, and a stream that is cut short is
//! incomplete rather than wrong. Seeds are the torture files plus a few messages
//! built here; inputs are every prefix and single-byte mutations of each seed.

use std::path::PathBuf;

use super::*;

fn testdata_dir() -> PathBuf {
    let dir = std::env::var_os("TRUNKGUARD_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/testdata"));
    assert!(
        dir.is_dir(),
        "torture test data not found at {} (set TRUNKGUARD_TESTDATA)",
        dir.display()
    );
    dir
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let root = testdata_dir();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.file_name().is_some_and(|n| n != "README.md") {
                let bytes =
                    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                out.push((path.display().to_string(), bytes));
            }
        }
    }
    assert!(
        out.len() >= 50,
        "expected the torture files, found {}",
        out.len()
    );
    out.push((
        "auth".into(),
        b"INVITE sip:+15551230000@trunks.example.net SIP/2.0\r\nVia: SIP/2.0/TCP [2001:db8::1]:5060;branch=z9hG4bK1;rport=5060;received=[2001:db8::2]\r\nTo: <sip:+15551230000@trunks.example.net>\r\nFrom: \"a\\\"b\" <sips:hq1@trunks.example.net>;tag=1\r\nCall-ID: x@y\r\nCSeq: 2 INVITE\r\nContact: <sip:hq1@[2001:db8::1]:5060;transport=tcp>;expires=60;q=0.5, *\r\nProxy-Authorization: Digest username=\"hq1\", realm=\"r\", nonce=\"n\", uri=\"sip:x\", response=\"0\", qop=auth, nc=00000001, cnonce=\"c\"\r\nRoute: <sip:p1;lr>, <sip:p2;lr>\r\nExpires: 60\r\nMax-Forwards: 70\r\nDate: Sat, 15 Oct 2005 04:44:56 GMT\r\nContent-Length: 4\r\n\r\nbody"
            .to_vec(),
    ));
    out
}

/// Calls what a caller may call beyond `validate` (which parses every header it
/// knows); only panics matter here.
fn exercise(m: &Message<'_>) {
    let _ = m.validate();
    if let Some(uri) = m.request_uri() {
        let _ = (uri.user_unescaped(), uri.param("lr"), uri.host.to_string());
    }
    for name in [HeaderName::Supported, HeaderName::Other("X-Y")] {
        let _ = m.header_values(name).count();
    }
    for (_, value) in m.headers() {
        let _ = unfold(value);
    }
    let _ = (
        m.top_via().map(|v| v.received_ip()),
        m.status_code(),
        m.wire_len(),
    );
    if let Ok(na) = m.from() {
        let _ = (na.display_unescaped(), na.params().count());
    }
}

/// The fast path for header fields gives up on anything unusual; where it does
/// not, it must store exactly what the exact path stores.
fn fast_path_agrees(input: &[u8]) {
    for framing in [Framing::Datagram, Framing::Stream] {
        let fast = message::parse_with(input, framing, true);
        let exact = message::parse_with(input, framing, false);
        assert_eq!(fast, exact, "{:?}", String::from_utf8_lossy(input));
    }
}

fn feed(input: &[u8]) {
    fast_path_agrees(input);
    if let Ok(m) = parse(input, Framing::Datagram) {
        exercise(&m);
    }
    // Stream parsing differs only in framing; the header values are the same.
    let _ = parse(input, Framing::Stream);
    if let Ok(Frame::Message(n) | Frame::KeepAlive(n)) = frame_stream(input) {
        assert!(
            n > 0 && n <= input.len(),
            "frame length {n} of {}",
            input.len()
        );
    }
}

#[test]
fn every_prefix_of_every_seed_returns() {
    for (_, seed) in seeds() {
        for end in 0..=seed.len() {
            feed(seed.get(..end).unwrap_or(&[]));
        }
    }
}

#[test]
fn single_byte_mutations_return() {
    // Bytes that steer the parser: separators, quotes, brackets, escapes, line ends,
    // NUL and non-UTF-8.
    const MUTATIONS: &[u8] = b"\r\n \t\":;,<>[]@%\\?=/\x00\xff\x80*0";
    for (_, seed) in seeds() {
        for i in 0..seed.len() {
            let mut m = seed.clone();
            // One mutation per position, rotating through the list, keeps this fast
            // in debug builds while every byte class lands all over every seed.
            if let Some(slot) = m.get_mut(i) {
                *slot = MUTATIONS[i % MUTATIONS.len()];
            }
            feed(&m);
        }
    }
}

#[test]
fn every_cut_of_a_valid_stream_message_is_incomplete() {
    for (name, seed) in seeds() {
        let Ok(Frame::Message(n)) = frame_stream(&seed) else {
            continue;
        };
        let framed = seed.get(..n).unwrap_or(&[]);
        if parse(framed, Framing::Stream).is_err() {
            continue;
        }
        for end in 1..n {
            let cut = framed.get(..end).unwrap_or(&[]);
            let frame = frame_stream(cut);
            assert!(
                matches!(frame, Ok(Frame::Incomplete | Frame::KeepAlive(_))),
                "{name}: cut at {end} framed as {frame:?}"
            );
            if cut.iter().any(|&b| b != b'\r' && b != b'\n') {
                assert_eq!(
                    parse(cut, Framing::Stream).map(|_| ()),
                    Err(ParseError::Incomplete),
                    "{name}: cut at {end}"
                );
            }
        }
    }
}

#[test]
fn a_stream_of_all_seeds_frames_back_into_the_same_messages() {
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    for (_, seed) in seeds() {
        if let Ok(Frame::Message(n)) = frame_stream(&seed) {
            let framed = seed.get(..n).unwrap_or(&[]);
            stream.extend_from_slice(b"\r\n");
            stream.extend_from_slice(framed);
            expected.push(n + 2);
        }
    }
    let mut got = Vec::new();
    let mut rest = stream.as_slice();
    while !rest.is_empty() {
        match frame_stream(rest) {
            Ok(Frame::Message(n)) => {
                got.push(n);
                rest = rest.get(n..).unwrap_or(&[]);
            }
            other => panic!("unexpected {other:?} with {} bytes left", rest.len()),
        }
    }
    assert_eq!(got, expected);
}
