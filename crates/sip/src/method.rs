//! Request methods. Method names are case-sensitive (RFC 3261 §7.1): `invite` is an
//! extension method, not INVITE.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method<'a> {
    Invite,
    Ack,
    Bye,
    Cancel,
    Register,
    Options,
    Info,
    Update,
    Prack,
    Subscribe,
    Notify,
    Refer,
    Message,
    Publish,
    /// Any other token; never spells one of the names above.
    Other(&'a str),
}

impl<'a> Method<'a> {
    /// Classifies a method token (the caller has checked it is a token).
    pub fn from_token(token: &'a str) -> Method<'a> {
        match token {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "REGISTER" => Method::Register,
            "OPTIONS" => Method::Options,
            "INFO" => Method::Info,
            "UPDATE" => Method::Update,
            "PRACK" => Method::Prack,
            "SUBSCRIBE" => Method::Subscribe,
            "NOTIFY" => Method::Notify,
            "REFER" => Method::Refer,
            "MESSAGE" => Method::Message,
            "PUBLISH" => Method::Publish,
            other => Method::Other(other),
        }
    }

    pub fn as_str(&self) -> &'a str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Register => "REGISTER",
            Method::Options => "OPTIONS",
            Method::Info => "INFO",
            Method::Update => "UPDATE",
            Method::Prack => "PRACK",
            Method::Subscribe => "SUBSCRIBE",
            Method::Notify => "NOTIFY",
            Method::Refer => "REFER",
            Method::Message => "MESSAGE",
            Method::Publish => "PUBLISH",
            Method::Other(token) => token,
        }
    }
}

/// The method names Kamailio 5.6.3 knows besides those of [`Method`]
/// (`core/parser/parse_methods.c`, docs/kamailio.md, "Facts about Kamailio 5.6.3").
const KAMAILIO_NAMES: [&str; 5] = ["KDMQ", "GET", "POST", "PUT", "DELETE"];

/// The longest known name (SUBSCRIBE).
const LONGEST_NAME: usize = 9;

/// Whether `token` spells a known method name in another case (`Cancel`, `invite`).
/// RFC 3261 §7.1 makes it another method; Kamailio's parser makes it the known one,
/// and tm cancels a transaction for a `cancel`: the one message would be read two ways.
pub fn is_another_case_of_a_known_name(token: &str) -> bool {
    let mut buf = [0u8; LONGEST_NAME];
    let Some(upper) = buf.get_mut(..token.len()) else {
        return false;
    };
    upper.copy_from_slice(token.as_bytes());
    upper.make_ascii_uppercase();
    if upper == token.as_bytes() {
        return false;
    }
    let Ok(upper) = std::str::from_utf8(upper) else {
        return false;
    };
    !matches!(Method::from_token(upper), Method::Other(_)) || KAMAILIO_NAMES.contains(&upper)
}

impl fmt::Display for Method<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_case_sensitive_and_round_trip() {
        let cases = [
            ("INVITE", Method::Invite),
            ("REGISTER", Method::Register),
            ("invite", Method::Other("invite")),
            ("RE%47IST%45R", Method::Other("RE%47IST%45R")),
            ("NEWMETHOD", Method::Other("NEWMETHOD")),
        ];
        for (token, want) in cases {
            let m = Method::from_token(token);
            assert_eq!(m, want);
            assert_eq!(m.as_str(), token);
        }
    }

    #[test]
    fn only_a_known_name_in_another_case_is_another_case_of_a_known_name() {
        let cases = [
            ("CANCEL", false),
            ("Cancel", true),
            ("cancel", true),
            ("aCK", true),
            ("kdmq", true),
            ("Subscribe", true),
            ("KDMQ", false),
            ("NEWMETHOD", false),
            ("newmethod", false),
            ("CANCELX", false),
            ("!interesting-Method0123456789_*+`.%indeed'~", false),
        ];
        for (token, want) in cases {
            assert_eq!(is_another_case_of_a_known_name(token), want, "{token}");
        }
    }
}
