//! Transports and how each delimits messages.

use std::fmt;
use std::str::FromStr;

use super::ParseError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
    Ws,
    Wss,
    Sctp,
}

/// How the bytes handed to [`parse`](super::parse) were delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Framing {
    /// One message per transport unit (UDP datagram, WebSocket message, SCTP
    /// message): Content-Length is optional and bytes past it are ignored.
    Datagram,
    /// A byte stream (TCP, TLS): Content-Length is mandatory and a short buffer means
    /// more bytes are on their way.
    Stream,
}

impl Transport {
    pub const ALL: [Transport; 6] = [
        Transport::Udp,
        Transport::Tcp,
        Transport::Tls,
        Transport::Ws,
        Transport::Wss,
        Transport::Sctp,
    ];

    /// Lower-case name, as in a `transport=` URI parameter.
    pub fn as_str(&self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
            Transport::Sctp => "sctp",
        }
    }

    /// A byte stream without message boundaries (TCP, TLS). WebSocket and SCTP are
    /// reliable but preserve message boundaries (RFC 7118 §5, RFC 4168), so they are
    /// not streams in this sense; see [`Transport::is_reliable`].
    pub fn is_stream(&self) -> bool {
        matches!(self, Transport::Tcp | Transport::Tls)
    }

    /// Everything but UDP.
    pub fn is_reliable(&self) -> bool {
        !matches!(self, Transport::Udp)
    }

    pub fn framing(&self) -> Framing {
        if self.is_stream() {
            Framing::Stream
        } else {
            Framing::Datagram
        }
    }
}

impl FromStr for Transport {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Transport::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
            .ok_or(ParseError::UnknownTransport)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_case_insensitively() {
        for t in Transport::ALL {
            assert_eq!(t.as_str().parse::<Transport>(), Ok(t));
            assert_eq!(t.as_str().to_uppercase().parse::<Transport>(), Ok(t));
        }
        for bad in ["", "UNKNOWN", "udp "] {
            assert_eq!(bad.parse::<Transport>(), Err(ParseError::UnknownTransport));
        }
    }

    #[test]
    fn only_tcp_and_tls_use_stream_framing() {
        let cases = [
            (Transport::Udp, Framing::Datagram, false),
            (Transport::Tcp, Framing::Stream, true),
            (Transport::Tls, Framing::Stream, true),
            (Transport::Ws, Framing::Datagram, true),
            (Transport::Wss, Framing::Datagram, true),
            (Transport::Sctp, Framing::Datagram, true),
        ];
        for (t, framing, reliable) in cases {
            assert_eq!(t.framing(), framing, "{t}");
            assert_eq!(t.is_stream(), framing == Framing::Stream, "{t}");
            assert_eq!(t.is_reliable(), reliable, "{t}");
        }
    }
}
