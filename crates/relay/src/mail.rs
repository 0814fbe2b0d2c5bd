//! The e-mail: what happened and what to do, in words, then SMTP delivery.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use lettre::message::header::{ContentType, Header, HeaderName, HeaderValue};
use lettre::message::{Mailbox, Mailboxes, header};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{Address, Message, SmtpTransport, Transport};
use trunkguard::Cause;
use trunkguard::alert::{Alert, AlertKind, rfc3339};

use super::Failure;

/// Subject and plain-text body of one alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub body: String,
}

/// "2023-11-14 22:13:20.123 UTC"
pub fn utc(ms: u64) -> String {
    let t = rfc3339(ms);
    format!("{} UTC", t.trim_end_matches('Z').replacen('T', " ", 1))
}

fn ip_of(addr: &str) -> String {
    addr.parse::<SocketAddr>()
        .map(|s| s.ip().to_string())
        .unwrap_or_else(|_| addr.to_string())
}

/// A few words for a subject line.
fn cause_short(cause: Option<Cause>) -> &'static str {
    match cause {
        Some(Cause::NotRegisteredAddress) => "not the registered address",
        Some(Cause::RegistrationRequired) => "trunk group not registered",
        Some(Cause::NotInAccessList) => "outside the access list",
        Some(Cause::BadCredentials) => "wrong credentials",
        Some(Cause::HeldForGuessing) => "held during password guessing",
        Some(c) => c.as_str(),
        None => "refused",
    }
}

/// "1 more blocked call", "9 more blocked calls"
fn more(n: u64, one: &str, many: &str) -> String {
    format!("{n} more {}", if n == 1 { one } else { many })
}

pub fn render(a: &Alert) -> Rendered {
    let tg = format!("{} ({})", a.trunk_group, a.location);
    let source_ip = a.source.as_deref().map(ip_of);
    let from_ip = source_ip.as_deref().unwrap_or("an unknown address");
    let (what_one, what_many) = match a.kind {
        AlertKind::BlockedCall => ("blocked call", "blocked calls"),
        AlertKind::BlockedRegistration => ("blocked registration", "blocked registrations"),
        AlertKind::RegIpChange => ("registration IP change", "registration IP changes"),
        AlertKind::PasswordGuessing => ("password-guessing alert", "password-guessing alerts"),
    };
    let old_ip = a.old_ip.as_deref().unwrap_or("?");
    let new_ip = a.new_ip.as_deref().unwrap_or(from_ip);

    let subject = match (a.kind, a.summary) {
        (AlertKind::RegIpChange, false) => {
            format!("[trunkguard] Registration of {tg} moved from {old_ip} to {new_ip}")
        }
        (AlertKind::RegIpChange, true) => format!(
            "[trunkguard] {} on {tg} (to {new_ip})",
            more(a.count, what_one, what_many)
        ),
        (_, false) => format!(
            "[trunkguard] {}{} on {tg} from {from_ip}: {}",
            what_one[..1].to_uppercase(),
            &what_one[1..],
            cause_short(a.cause)
        ),
        (_, true) => format!(
            "[trunkguard] {} on {tg} from {from_ip}: {}",
            more(a.count, what_one, what_many),
            cause_short(a.cause)
        ),
    };

    // In sentences; the module always sends `source`, this is only for hand-made events.
    let from_ip = source_ip.as_deref().unwrap_or("the source address");
    let mut b = String::new();
    let headline = match (a.kind, a.summary) {
        (AlertKind::BlockedCall, false) => format!(
            "trunkguard refused a call on trunk group {} (location {}).",
            a.trunk_group, a.location
        ),
        (AlertKind::BlockedRegistration, false) => format!(
            "trunkguard refused a registration on trunk group {} (location {}).",
            a.trunk_group, a.location
        ),
        (AlertKind::RegIpChange, false) => format!(
            "The PBX of trunk group {} (location {}) now registers from another IP address.",
            a.trunk_group, a.location
        ),
        (AlertKind::PasswordGuessing, false) => format!(
            "Somebody is guessing the password of trunk group {} (location {}): wrong \
             passwords for its username reached the lockout threshold. Its own PBX keeps \
             working; the guessing address is refused for a while.",
            a.trunk_group, a.location
        ),
        (_, true) => format!(
            "Since the last alert, trunkguard saw {} on trunk group {} (location {}) from {}. \
             They were counted instead of being sent one by one.",
            more(a.count, what_one, what_many),
            a.trunk_group,
            a.location,
            if a.kind == AlertKind::RegIpChange {
                new_ip
            } else {
                from_ip
            }
        ),
    };
    wrap_into(&mut b, &headline, "");
    b.push('\n');

    let mut rows: Vec<(&str, String)> = Vec::new();
    rows.push(("Trunk group", a.trunk_group.clone()));
    rows.push(("Location", a.location.clone()));
    if let Some(cause) = a.cause {
        let words = a
            .description
            .clone()
            .unwrap_or_else(|| cause.describe().to_string());
        rows.push(("Cause", format!("{words} ({})", cause.as_str())));
    } else if let Some(words) = &a.description {
        rows.push(("Cause", words.clone()));
    }
    if a.kind == AlertKind::RegIpChange {
        rows.push(("Old IP", old_ip.to_string()));
        rows.push(("New IP", new_ip.to_string()));
    }
    if let Some(source) = &a.source {
        rows.push(("Source", source.clone()));
    }
    if let Some(registered) = &a.registered {
        rows.push(("Registered", registered.clone()));
    }
    if !a.acl.is_empty() {
        rows.push(("Access list", a.acl.join(", ")));
    }
    if a.summary {
        rows.push(("Repeats", a.count.to_string()));
        if let Some(first) = a.first_ms {
            rows.push(("First repeat", utc(first)));
        }
        if let Some(last) = a.last_ms {
            rows.push(("Last repeat", utc(last)));
        }
        rows.push(("Reported", utc(a.at_ms)));
    } else {
        rows.push(("Time", utc(a.at_ms)));
    }
    let first = if a.summary { " (first)" } else { "" };
    for (label, value) in [
        ("Method", &a.method),
        ("Call-ID", &a.call_id),
        ("From", &a.from),
        ("To", &a.to),
    ] {
        if let Some(v) = value {
            rows.push((label, format!("{v}{first}")));
        }
    }
    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0) + 3;
    for (label, value) in &rows {
        let _ = writeln!(b, "{:<width$}{value}", format!("{label}:"));
    }
    if a.call_id.is_some() || a.from.is_some() || a.to.is_some() {
        // The sender wrote these: a fraudster can put anything there.
        b.push_str(
            "\nCall-ID, From and To are as the sender wrote them (cut at 256 bytes): \
             do not trust them, and do not follow anything they say.\n",
        );
    }

    b.push_str("\nWhat to do\n");
    let leaked = "the trunk group's credentials have leaked: change its password now, \
                  on the PBX and in the trunkguard configuration, and check the PBX for compromise";
    let advice = match (a.kind, a.cause) {
        (AlertKind::RegIpChange, _) => format!(
            "Calls are now accepted only from {new_ip}. If you moved the PBX, changed \
             internet connection or failed over, nothing needs doing. Otherwise someone \
             with {leaked}; then register your PBX again."
        ),
        // Wrong passwords are no leak: the advice for a leak (change it now) would
        // have every customer whose trunk a stranger scans change a good password.
        (AlertKind::PasswordGuessing, _) => format!(
            "Every guess counted here was wrong: on its own this does not mean the \
             password has leaked. Any address that goes on guessing ({from_ip} among \
             them) is refused for a while, its answers unread, and the PBX keeps \
             working from where it is (while the guessing comes from several addresses, \
             a trunk group without an access list takes registrations only from the \
             address the PBX last registered from). Make sure the trunk group's password is long and random (not a \
             word, a name or a number). If the guessing goes on from many addresses, \
             an access list (\"acl\") for the trunk group keeps even a guessed \
             password from being used anywhere else."
        ),
        (_, Some(Cause::HeldForGuessing)) => format!(
            "Someone is guessing this trunk group's password from several addresses \
             (the password_guessing alert), and while they do, registrations are taken \
             only from the address the PBX last registered from{}. This one, from \
             {from_ip}, had the right password. If {from_ip} is not one of your \
             systems, {leaked}. If it is your PBX, moved, it registers once the \
             guessing stops (some PBXs stop trying after a refusal: restart its \
             registration then), or ask your provider to lift the hold.",
            a.registered
                .as_deref()
                .map(|r| format!(" ({})", ip_of(r)))
                .unwrap_or_default()
        ),
        (_, Some(Cause::NotRegisteredAddress)) => format!(
            "Valid credentials of this trunk group were used from {from_ip}, which is \
             not the registered PBX{}. If {from_ip} is not one of your systems, {leaked}. \
             If it is yours (a second PBX, a new internet connection), let that PBX \
             register instead: only the registered address may call.",
            a.registered
                .as_deref()
                .map(|r| format!(" ({})", ip_of(r)))
                .unwrap_or_default()
        ),
        (_, Some(Cause::RegistrationRequired)) => format!(
            "The credentials were valid, but this trunk group takes calls only from a \
             registered PBX and none is registered. If {from_ip} is your PBX, check why \
             it does not register (network, DNS, firewall, its registration settings). \
             If it is not yours, {leaked}."
        ),
        (_, Some(Cause::NotInAccessList)) => format!(
            "{from_ip} is outside the trunk group's access list. If it is not one of your \
             systems, {leaked}. If it is yours, add it to the trunk group's \"acl\" in \
             the trunkguard configuration."
        ),
        _ => format!("If {from_ip} is not one of your systems, {leaked}."),
    };
    wrap_into(&mut b, &advice, "  ");
    if !a.summary {
        b.push('\n');
        wrap_into(
            &mut b,
            "Repeats of this alert from the same address are counted, not mailed, \
             and reported in one summary when the throttle window closes.",
            "",
        );
    }
    let _ = write!(
        b,
        "\n-- \ntrunkguard alert relay; event {} ({}{})\n",
        a.id,
        a.kind.as_str(),
        if a.summary { ", summary" } else { "" }
    );
    Rendered { subject, body: b }
}

/// Appends `text` wrapped at 76 columns, each line indented by `indent`.
fn wrap_into(out: &mut String, text: &str, indent: &str) {
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && indent.len() + line.len() + 1 + word.len() > 76 {
            let _ = writeln!(out, "{indent}{line}");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        let _ = writeln!(out, "{indent}{line}");
    }
}

/// `Auto-Submitted: auto-generated` (RFC 3834): vacation responders stay quiet.
#[derive(Clone)]
struct AutoSubmitted;

impl Header for AutoSubmitted {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Auto-Submitted")
    }

    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(AutoSubmitted)
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "auto-generated".into())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// Plain SMTP: only for a local MTA on loopback.
    None,
    /// STARTTLS, required: the relay refuses to send in clear.
    Starttls,
    /// TLS from the first byte (submissions, port 465).
    Tls,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::None => "plain",
            TlsMode::Starttls => "STARTTLS",
            TlsMode::Tls => "TLS",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub ca_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub timeout: Duration,
    pub hello: Option<String>,
    pub from: Mailbox,
}

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("cannot read --smtp-ca-file {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS set-up: {0}")]
    Tls(#[from] lettre::transport::smtp::Error),
}

pub struct Mailer {
    transport: SmtpTransport,
    from: Mailbox,
}

impl Mailer {
    pub fn new(cfg: &SmtpConfig) -> Result<Mailer, MailError> {
        let tls = match cfg.tls {
            TlsMode::None => Tls::None,
            mode => {
                let mut params = TlsParameters::builder(cfg.host.clone());
                if let Some(path) = &cfg.ca_file {
                    let pem = std::fs::read(path).map_err(|source| MailError::CaFile {
                        path: path.clone(),
                        source,
                    })?;
                    params = params.add_root_certificate(Certificate::from_pem(&pem)?);
                }
                let params = params.build_rustls()?;
                if mode == TlsMode::Tls {
                    Tls::Wrapper(params)
                } else {
                    Tls::Required(params)
                }
            }
        };
        let mut builder = SmtpTransport::builder_dangerous(cfg.host.as_str())
            .port(cfg.port)
            .tls(tls)
            .timeout(Some(cfg.timeout));
        if let Some(hello) = &cfg.hello {
            builder = builder.hello_name(ClientId::Domain(hello.clone()));
        }
        if let Some(user) = &cfg.user {
            builder = builder.credentials(Credentials::new(
                user.clone(),
                cfg.password.clone().unwrap_or_default(),
            ));
        }
        Ok(Mailer {
            transport: builder.build(),
            from: cfg.from.clone(),
        })
    }

    /// Sends `rendered` to `rcpt` alone (one SMTP transaction per recipient, so a
    /// refused address does not hold back the others); the To header names every
    /// recipient of the alert so each reader sees who else was told.
    pub fn send(
        &self,
        id: &str,
        rcpt: &str,
        all: &[String],
        rendered: &Rendered,
    ) -> Result<(), Failure> {
        let to: Address = rcpt
            .parse()
            .map_err(|e| Failure::Reject(format!("invalid address {rcpt:?}: {e}")))?;
        let mut to_header: Mailboxes = all
            .iter()
            .filter_map(|r| r.parse::<Mailbox>().ok())
            .collect();
        if to_header.iter().next().is_none() {
            to_header = Mailboxes::new().with(Mailbox::new(None, to.clone()));
        }
        let message = Message::builder()
            .from(self.from.clone())
            .mailbox(header::To::from(to_header))
            .subject(rendered.subject.clone())
            // Stable per event: a copy sent twice (a crash between the server's 250
            // and the queue's record of it) threads as one message.
            .message_id(Some(format!("<{id}@trunkguard>")))
            .header(AutoSubmitted)
            .header(ContentType::TEXT_PLAIN)
            .body(rendered.body.clone())
            .map_err(|e| Failure::Reject(format!("cannot build the message: {e}")))?;
        let envelope = lettre::address::Envelope::new(Some(self.from.email.clone()), vec![to])
            .map_err(|e| Failure::Reject(format!("envelope: {e}")))?;
        self.transport
            .send_raw(&envelope, &message.formatted())
            .map(|_| ())
            .map_err(classify)
    }
}

/// Which SMTP failures are about the server (wait, then retry everything), about
/// this one message (retry it later), or final for this recipient.
fn classify(e: lettre::transport::smtp::Error) -> Failure {
    let text = e.to_string();
    match e.status().map(|c| c.to_string()) {
        // Service closing, or authentication trouble (wrong password, TLS needed):
        // every message would fail alike.
        Some(code) if matches!(code.as_str(), "421" | "454" | "530" | "534" | "535" | "538") => {
            Failure::Down(text)
        }
        Some(code) if code.starts_with('4') => Failure::Retry(text),
        Some(_) => Failure::Reject(text),
        // Connection refused, timeout, TLS, a garbled reply: the server is not usable.
        None => Failure::Down(text),
    }
}

/// E-mail as a delivery channel: each event to its recipients and the `--copy-to`
/// addresses (each address once, whatever its case).
pub struct MailChannel {
    pub mailer: Mailer,
    pub copy_to: Vec<String>,
}

impl crate::channel::Channel for MailChannel {
    fn name(&self) -> &str {
        "smtp"
    }

    fn targets(&self, event: &serde_json::Value) -> Vec<(String, String)> {
        let mut seen: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for addr in crate::event::recipients(event)
            .into_iter()
            .chain(self.copy_to.iter().cloned())
        {
            let folded = addr.to_ascii_lowercase();
            if !seen.contains(&folded) {
                seen.push(folded);
                out.push((format!("mail:{addr}"), addr));
            }
        }
        out
    }

    fn send(
        &self,
        id: &str,
        target: &str,
        _event: &serde_json::Value,
        alert: &Alert,
        rendered: &Rendered,
    ) -> Result<(), Failure> {
        self.mailer.send(id, target, &alert.recipients, rendered)
    }

    fn describe(&self, target: &str) -> String {
        format!("mail to {target}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(kind: AlertKind, cause: Option<Cause>) -> Alert {
        Alert {
            id: "18bcf5a1b7b-0a1b2c3d".into(),
            kind,
            location: "hq".into(),
            trunk_group: "hq-pbx1".into(),
            recipients: vec!["noc@example.com".into()],
            at_ms: 1_700_000_000_123,
            time: rfc3339(1_700_000_000_123),
            cause,
            description: cause.map(|c| c.describe().to_string()),
            source: Some("198.51.100.9:5060".into()),
            registered: None,
            acl: vec![],
            old_ip: None,
            new_ip: None,
            method: Some("INVITE".into()),
            call_id: Some("a84b4c76e66710@pc33".into()),
            from: Some("<sip:hq1@trunks.example.net>;tag=1928301774".into()),
            to: Some("<sip:+15557654321@trunks.example.net>".into()),
            count: 1,
            summary: false,
            first_ms: None,
            last_ms: None,
        }
    }

    #[test]
    fn text_per_kind_and_cause() {
        let not_registered = Alert {
            registered: Some("203.0.113.7:5060".into()),
            ..base(AlertKind::BlockedCall, Some(Cause::NotRegisteredAddress))
        };
        let not_in_acl = Alert {
            acl: vec!["203.0.113.7/32".into(), "2001:db8:7::/48".into()],
            ..base(AlertKind::BlockedCall, Some(Cause::NotInAccessList))
        };
        let blocked_reg = Alert {
            acl: vec!["203.0.113.7/32".into()],
            method: Some("REGISTER".into()),
            ..base(AlertKind::BlockedRegistration, Some(Cause::NotInAccessList))
        };
        let ip_change = Alert {
            old_ip: Some("203.0.113.7".into()),
            new_ip: Some("198.51.100.9".into()),
            method: Some("REGISTER".into()),
            ..base(AlertKind::RegIpChange, None)
        };
        let summary = Alert {
            id: "18bcf5a1b7b-0a1b2c3d-summary".into(),
            registered: Some("203.0.113.7:5060".into()),
            count: 9,
            summary: true,
            first_ms: Some(1_700_000_002_000),
            last_ms: Some(1_700_000_010_000),
            at_ms: 1_700_000_300_123,
            ..base(AlertKind::BlockedCall, Some(Cause::NotRegisteredAddress))
        };
        // (alert, exact subject, lines or phrases the body must contain)
        let cases: Vec<(Alert, &str, Vec<&str>)> = vec![
            (
                not_registered,
                "[trunkguard] Blocked call on hq-pbx1 (hq) from 198.51.100.9: not the registered address",
                vec![
                    "trunkguard refused a call on trunk group hq-pbx1 (location hq).",
                    "Trunk group:  hq-pbx1",
                    "Location:     hq",
                    "Cause:        the call came from an address other than the one currently registered (not_registered_address)",
                    "Source:       198.51.100.9:5060",
                    "Registered:   203.0.113.7:5060",
                    "Time:         2023-11-14 22:13:20.123 UTC",
                    "Method:       INVITE",
                    "Call-ID:      a84b4c76e66710@pc33",
                    "From:         <sip:hq1@trunks.example.net>;tag=1928301774",
                    "To:           <sip:+15557654321@trunks.example.net>",
                    "not the registered PBX (203.0.113.7)",
                    "change its password now",
                    "event 18bcf5a1b7b-0a1b2c3d (blocked_call)",
                ],
            ),
            (
                not_in_acl,
                "[trunkguard] Blocked call on hq-pbx1 (hq) from 198.51.100.9: outside the access list",
                vec![
                    "Access list:  203.0.113.7/32, 2001:db8:7::/48",
                    "add it to the trunk group's \"acl\"",
                ],
            ),
            (
                blocked_reg,
                "[trunkguard] Blocked registration on hq-pbx1 (hq) from 198.51.100.9: outside the access list",
                vec![
                    "trunkguard refused a registration on trunk group hq-pbx1",
                    "Method:       REGISTER",
                ],
            ),
            (
                ip_change,
                "[trunkguard] Registration of hq-pbx1 (hq) moved from 203.0.113.7 to 198.51.100.9",
                vec![
                    "Old IP:       203.0.113.7",
                    "New IP:       198.51.100.9",
                    "Calls are now accepted only from 198.51.100.9.",
                ],
            ),
            (
                Alert {
                    method: Some("REGISTER".into()),
                    ..base(AlertKind::PasswordGuessing, Some(Cause::BadCredentials))
                },
                "[trunkguard] Password-guessing alert on hq-pbx1 (hq) from 198.51.100.9: wrong credentials",
                vec![
                    "Somebody is guessing the password of trunk group hq-pbx1",
                    "Every guess counted here was wrong",
                    "Any address that goes on guessing (198.51.100.9 among them) is refused",
                    "long and random",
                ],
            ),
            (
                Alert {
                    method: Some("REGISTER".into()),
                    registered: Some("203.0.113.7:5060".into()),
                    ..base(AlertKind::BlockedRegistration, Some(Cause::HeldForGuessing))
                },
                "[trunkguard] Blocked registration on hq-pbx1 (hq) from 198.51.100.9: held during password guessing",
                vec![
                    "guessing this trunk group's password from several addresses",
                    "taken only from the address the PBX last registered from (203.0.113.7)",
                    "This one, from 198.51.100.9, had the right password. If 198.51.100.9 is not one of your systems, the trunk group's credentials have leaked",
                    "it registers once the guessing stops",
                ],
            ),
            (
                base(AlertKind::BlockedCall, Some(Cause::RegistrationRequired)),
                "[trunkguard] Blocked call on hq-pbx1 (hq) from 198.51.100.9: trunk group not registered",
                vec!["check why", "none is registered"],
            ),
            (
                summary,
                "[trunkguard] 9 more blocked calls on hq-pbx1 (hq) from 198.51.100.9: not the registered address",
                vec![
                    "Since the last alert, trunkguard saw 9 more blocked calls on trunk",
                    "Repeats:       9",
                    "First repeat:  2023-11-14 22:13:22.000 UTC",
                    "Last repeat:   2023-11-14 22:13:30.000 UTC",
                    "Reported:      2023-11-14 22:18:20.123 UTC",
                    "Call-ID:       a84b4c76e66710@pc33 (first)",
                    "(blocked_call, summary)",
                ],
            ),
        ];
        for (alert, subject, phrases) in cases {
            let r = render(&alert);
            assert_eq!(r.subject, subject);
            if alert.kind == AlertKind::PasswordGuessing {
                assert!(!r.body.contains("leaked:"), "{}", r.body);
            }
            let flat = r.body.split_whitespace().collect::<Vec<_>>().join(" ");
            for p in phrases {
                assert!(
                    r.body.contains(p) || flat.contains(p),
                    "body lacks {p:?}:\n{}",
                    r.body
                );
            }
            assert!(r.body.lines().all(|l| l.len() <= 140), "{}", r.body);
        }
    }

    #[test]
    fn summary_with_one_repeat_says_one() {
        let a = Alert {
            count: 1,
            summary: true,
            ..base(AlertKind::RegIpChange, None)
        };
        assert!(
            render(&a)
                .subject
                .starts_with("[trunkguard] 1 more registration IP change on")
        );
    }

    #[test]
    fn utc_time() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000 UTC");
    }
}
