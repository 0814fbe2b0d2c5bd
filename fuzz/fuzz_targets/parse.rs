#![no_main]
//! The SIP parser and stream framer on arbitrary bytes: they must return, never panic,
//! and every accessor of a parsed message must be total too.

use libfuzzer_sys::fuzz_target;
use trunkguard::sip::{self, AuthHeader, Framing};

fuzz_target!(|data: &[u8]| {
    let _ = sip::frame_stream(data);
    for framing in [Framing::Datagram, Framing::Stream] {
        if let Ok(msg) = sip::parse(data, framing) {
            let _ = msg.validate();
            let _ = msg.from();
            let _ = msg.to();
            let _ = msg.cseq();
            let _ = msg.top_via();
            let _ = msg.contacts();
            let _ = msg.expires();
            let _ = msg.max_forwards();
            for kind in [AuthHeader::Authorization, AuthHeader::ProxyAuthorization] {
                for c in msg.credentials(kind) {
                    let _ = c;
                }
            }
        }
    }
});
