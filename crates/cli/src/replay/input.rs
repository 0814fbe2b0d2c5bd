//! Inputs of `trunkguard replay`: JSON Lines, pcap and pcapng captures.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use pcap_file::DataLink;
use serde::Deserialize;
use trunkguard::sip::{Frame, frame_stream};

use trunkguard_host::Transport;

/// One message to judge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayInput {
    pub at_ms: u64,
    pub source: SocketAddr,
    /// The proxy socket the message arrived on (a capture's destination).
    pub local: Option<SocketAddr>,
    pub transport: Transport,
    pub message: Vec<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    at_ms: u64,
    source: String,
    /// The proxy socket it arrived on (core trust needs a core-facing one).
    #[serde(default)]
    local: Option<String>,
    #[serde(default = "udp")]
    transport: String,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    message_b64: Option<String>,
}

fn udp() -> String {
    "udp".into()
}

/// Parses one JSON Lines input object.
pub fn parse_line(line: &str) -> Result<ReplayInput, String> {
    let l: Line = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let source: SocketAddr = l
        .source
        .parse()
        .map_err(|_| format!("source {:?} is not ip:port (IPv6 in brackets)", l.source))?;
    let local = match &l.local {
        None => None,
        Some(text) => Some(
            text.parse::<SocketAddr>()
                .map_err(|_| format!("local {text:?} is not ip:port (IPv6 in brackets)"))?,
        ),
    };
    let transport: Transport = l
        .transport
        .parse()
        .map_err(|_| format!("unknown transport {:?}", l.transport))?;
    let message = match (l.message, l.message_b64) {
        (Some(m), None) => m.into_bytes(),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .map_err(|e| format!("message_b64: {e}"))?,
        _ => return Err("give exactly one of message or message_b64".into()),
    };
    Ok(ReplayInput {
        at_ms: l.at_ms,
        source,
        local,
        transport,
        message,
    })
}

/// Whether `bytes` start like a capture file rather than JSON Lines.
pub fn is_capture(bytes: &[u8]) -> bool {
    matches!(
        bytes.get(..4),
        Some(
            [0xa1, 0xb2, 0xc3, 0xd4]
                | [0xd4, 0xc3, 0xb2, 0xa1]
                | [0xa1, 0xb2, 0x3c, 0x4d]
                | [0x4d, 0x3c, 0xb2, 0xa1]
                | [0x0a, 0x0d, 0x0d, 0x0a]
        )
    )
}

/// Extracts the SIP messages of a pcap or pcapng capture: every UDP datagram that
/// looks like SIP, and every SIP message of every TCP stream (reassembled in capture
/// order and framed by Content-Length, as a proxy would).
pub fn read_capture(bytes: &[u8]) -> Result<Vec<ReplayInput>, String> {
    let mut packets: Vec<(u64, DataLink, Vec<u8>)> = Vec::new();
    if bytes.starts_with(&[0x0a, 0x0d, 0x0d, 0x0a]) {
        let mut reader = pcap_file::pcapng::PcapNgReader::new(bytes).map_err(|e| e.to_string())?;
        let mut links = Vec::new();
        while let Some(block) = reader.next_block() {
            match block.map_err(|e| e.to_string())? {
                pcap_file::pcapng::Block::InterfaceDescription(i) => links.push(i.linktype),
                pcap_file::pcapng::Block::EnhancedPacket(p) => {
                    let link = links
                        .get(p.interface_id as usize)
                        .copied()
                        .unwrap_or(DataLink::ETHERNET);
                    packets.push((p.timestamp.as_millis() as u64, link, p.data.into_owned()));
                }
                _ => {}
            }
        }
    } else {
        let mut reader = pcap_file::pcap::PcapReader::new(bytes).map_err(|e| e.to_string())?;
        let link = reader.header().datalink;
        while let Some(p) = reader.next_packet() {
            let p = p.map_err(|e| e.to_string())?;
            packets.push((p.timestamp.as_millis() as u64, link, p.data.into_owned()));
        }
    }
    let mut out = Vec::new();
    let mut streams: HashMap<(SocketAddr, SocketAddr), Vec<u8>> = HashMap::new();
    for (at_ms, link, data) in packets {
        let sliced = match link {
            DataLink::ETHERNET => SlicedPacket::from_ethernet(&data),
            DataLink::LINUX_SLL => SlicedPacket::from_linux_sll(&data),
            DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => SlicedPacket::from_ip(&data),
            // BSD loopback: a 4-byte address family, then IP.
            DataLink::NULL | DataLink::LOOP => {
                SlicedPacket::from_ip(data.get(4..).unwrap_or_default())
            }
            other => return Err(format!("unsupported link type {other:?}")),
        };
        let Ok(p) = sliced else { continue };
        let (src_ip, dst_ip): (IpAddr, IpAddr) = match &p.net {
            Some(NetSlice::Ipv4(v4)) => (
                v4.header().source_addr().into(),
                v4.header().destination_addr().into(),
            ),
            Some(NetSlice::Ipv6(v6)) => (
                v6.header().source_addr().into(),
                v6.header().destination_addr().into(),
            ),
            _ => continue,
        };
        match &p.transport {
            Some(TransportSlice::Udp(udp)) => {
                let payload = udp.payload();
                if looks_like_sip(payload) {
                    out.push(ReplayInput {
                        at_ms,
                        source: SocketAddr::new(src_ip, udp.source_port()),
                        local: Some(SocketAddr::new(dst_ip, udp.destination_port())),
                        transport: Transport::Udp,
                        message: payload.to_vec(),
                    });
                }
            }
            Some(TransportSlice::Tcp(tcp)) => {
                let src = SocketAddr::new(src_ip, tcp.source_port());
                let dst = SocketAddr::new(dst_ip, tcp.destination_port());
                let buf = streams.entry((src, dst)).or_default();
                buf.extend_from_slice(tcp.payload());
                loop {
                    match frame_stream(buf) {
                        Ok(Frame::Message(n)) => {
                            let msg: Vec<u8> = buf.drain(..n).collect();
                            out.push(ReplayInput {
                                at_ms,
                                source: src,
                                local: Some(dst),
                                transport: Transport::Tcp,
                                message: msg,
                            });
                        }
                        Ok(Frame::KeepAlive(n)) => {
                            buf.drain(..n);
                        }
                        Ok(Frame::Incomplete) => break,
                        // Not SIP, or broken beyond framing: hand it over whole so the
                        // policy answers it (400), then forget this stream's bytes.
                        Err(_) => {
                            if looks_like_sip(buf) {
                                out.push(ReplayInput {
                                    at_ms,
                                    source: src,
                                    local: Some(dst),
                                    transport: Transport::Tcp,
                                    message: std::mem::take(buf),
                                });
                            }
                            buf.clear();
                            break;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// A request line ending in SIP/2.0 or a status line starting with it.
fn looks_like_sip(payload: &[u8]) -> bool {
    let line_end = payload
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(payload.len());
    let line = &payload[..line_end.min(payload.len())];
    line.starts_with(b"SIP/2.0 ") || line.ends_with(b" SIP/2.0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_text_and_base64_lines() {
        let a = parse_line(r#"{"at_ms": 5, "source": "[2001:db8::1]:5060", "transport": "TCP", "message": "OPTIONS sip:x SIP/2.0\r\n\r\n"}"#).unwrap();
        assert_eq!(a.transport, Transport::Tcp);
        assert_eq!(a.source.port(), 5060);
        let b = parse_line(r#"{"at_ms": 5, "source": "192.0.2.1:5060", "message_b64": "AAEC"}"#)
            .unwrap();
        assert_eq!(b.message, vec![0, 1, 2]);
        assert_eq!(b.transport, Transport::Udp);
    }

    #[test]
    fn refuses_bad_lines_with_a_reason() {
        for (line, needle) in [
            (
                r#"{"at_ms": 5, "source": "192.0.2.1", "message": "x"}"#,
                "ip:port",
            ),
            (
                r#"{"at_ms": 5, "source": "192.0.2.1:1", "transport": "carrier-pigeon", "message": "x"}"#,
                "transport",
            ),
            (r#"{"at_ms": 5, "source": "192.0.2.1:1"}"#, "exactly one"),
            (
                r#"{"at_ms": 5, "source": "192.0.2.1:1", "message": "x", "extra": 1}"#,
                "unknown field",
            ),
            ("not json", "expected"),
        ] {
            let err = parse_line(line).unwrap_err();
            assert!(err.contains(needle), "{line}: {err}");
        }
    }
}
