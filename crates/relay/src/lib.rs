//! The alert relay (`trunkguard alerts serve`, docs/alerts.md): hosts post alert
//! events to a loopback HTTP endpoint; the relay stores each on disk before
//! answering, then mails it to its recipients and forwards it to webhooks, retrying
//! until the servers take it, across restarts.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use lettre::message::Mailbox;

pub mod channel;
pub mod deliver;
pub mod event;
pub mod forward;
pub mod http;
pub mod mail;
pub mod queue;
pub mod state;

use channel::Channel;
use deliver::{Backoff, Deliverer, Status};
use forward::{Webhook, WebhookChannel};
use mail::{Mailer, SmtpConfig, TlsMode};
use queue::Queue;

/// Why one delivery did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The server is unreachable or refuses everything for now: the whole channel
    /// waits, then retries.
    Down(String),
    /// This message was deferred (4xx): it alone waits, then retries.
    Retry(String),
    /// Refused for good (5xx recipient, a webhook's 4xx): not retried.
    Reject(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{0}")]
    Config(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Queue(#[from] queue::QueueError),
    #[error(transparent)]
    Mail(#[from] mail::MailError),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("the delivery thread stopped: {0}")]
    Stopped(String),
}

/// `trunkguard alerts serve`: the flags are documented in docs/alerts.md.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address of the HTTP endpoint (loopback: hosts on this machine post to it).
    #[arg(long, default_value = "127.0.0.1:8465")]
    pub listen: SocketAddr,
    /// Queue directory (created if missing): events wait here until delivered.
    #[arg(long)]
    pub queue: PathBuf,
    /// File holding the token hosts send as `Authorization: Bearer <token>`.
    /// Default: the TRUNKGUARD_RELAY_TOKEN environment variable; one is required.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Peer addresses (IP or CIDR) allowed to post; repeatable.
    #[arg(long = "allow", default_values = ["127.0.0.1/32", "::1/128"])]
    pub allow: Vec<String>,
    /// File keeping a proxy's state across its restarts (Envoy's shared data,
    /// docs/envoy.md "Upgrade and restart"), served at /v1/state with the same token.
    /// Without it, /v1/state answers 404.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Largest accepted event, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_body: usize,
    /// Events waiting at most; beyond, posts get 503 (the host retries later).
    #[arg(long, default_value_t = 100_000)]
    pub max_pending: usize,
    /// How long delivered events are remembered, so a host's late retry of one is
    /// recognised as a duplicate.
    #[arg(long, default_value = "7days", value_parser = humantime::parse_duration)]
    pub keep: Duration,

    /// Sender of the e-mails, e.g. "trunkguard <alerts@example.net>".
    #[arg(long)]
    pub from: String,
    /// SMTP server (a local MTA, or the provider's submission server).
    #[arg(long, default_value = "localhost")]
    pub smtp_host: String,
    /// Default: 25 with --smtp-tls none, 587 with starttls, 465 with tls.
    #[arg(long)]
    pub smtp_port: Option<u16>,
    #[arg(long, value_enum, default_value = "starttls")]
    pub smtp_tls: TlsMode,
    /// PEM file of a CA to trust besides the public roots (a private MTA's CA).
    #[arg(long)]
    pub smtp_ca_file: Option<PathBuf>,
    /// SMTP AUTH user (PLAIN or LOGIN).
    #[arg(long)]
    pub smtp_user: Option<String>,
    /// File holding the SMTP password. Default: the TRUNKGUARD_SMTP_PASSWORD
    /// environment variable.
    #[arg(long)]
    pub smtp_password_file: Option<PathBuf>,
    /// Name sent in EHLO (default: this machine's host name).
    #[arg(long)]
    pub smtp_hello: Option<String>,
    /// Longest wait for the SMTP server at any step of a delivery.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub smtp_timeout: Duration,
    /// Address that gets a copy of every alert (a NOC); repeatable.
    #[arg(long)]
    pub copy_to: Vec<String>,

    /// Forward every event to a webhook, as NAME=URL (NAME appears in logs and
    /// /v1/health instead of the URL, which often holds a secret); repeatable.
    #[arg(long = "webhook")]
    pub webhooks: Vec<String>,
    /// Forward every event to a webhook, as NAME=FILE, FILE holding the URL (its first
    /// line): a URL given with --webhook stays in the relay's command line, which every
    /// local user can read (ps, /proc/PID/cmdline); repeatable.
    #[arg(long = "webhook-file")]
    pub webhook_files: Vec<String>,
    /// Longest wait for a webhook's answer.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub webhook_timeout: Duration,

    /// First retry delay after a failure; doubles up to --retry-max.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry_min: Duration,
    /// Longest retry delay.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub retry_max: Duration,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One line on stderr (the journal, under systemd).
pub fn log(line: &str) {
    let t = trunkguard::alert::rfc3339(now_ms());
    let _ = writeln!(std::io::stderr().lock(), "{t} trunkguard-relay: {line}");
}

fn secret(file: Option<&PathBuf>, env: &str) -> Result<Option<String>, RelayError> {
    match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| RelayError::Read {
                path: path.clone(),
                source,
            })?;
            Ok(Some(
                text.lines().next().unwrap_or_default().trim().to_string(),
            ))
        }
        None => Ok(std::env::var(env).ok().map(|s| s.trim().to_string())),
    }
}

fn parse_net(text: &str) -> Result<IpNet, RelayError> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| RelayError::Config(format!("--allow {text:?} is not an IP address or CIDR")))
}

fn parse_webhook(text: &str) -> Result<Webhook, RelayError> {
    let bad = || {
        RelayError::Config(format!(
            "--webhook {text:?}: expected NAME=URL with an http:// or https:// URL"
        ))
    };
    let (name, url) = text.split_once('=').ok_or_else(bad)?;
    webhook(name, url).ok_or_else(bad)
}

/// `--webhook-file NAME=FILE`: the URL read from FILE's first line. Its errors name the
/// file, never the URL (the secret the file keeps off the command line).
fn parse_webhook_file(text: &str) -> Result<Webhook, RelayError> {
    let (name, file) = text.split_once('=').ok_or_else(|| {
        RelayError::Config(format!(
            "--webhook-file {text:?}: expected NAME=FILE, FILE holding the URL"
        ))
    })?;
    let path = PathBuf::from(file);
    let url = secret(Some(&path), "")?.unwrap_or_default();
    webhook(name, &url).ok_or_else(|| {
        RelayError::Config(format!(
            "--webhook-file {text:?}: expected a NAME of letters, digits, '-', '_' or '.', \
             and an http:// or https:// URL on the file's first line"
        ))
    })
}

fn webhook(name: &str, url: &str) -> Option<Webhook> {
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !name_ok || !(url.starts_with("http://") || url.starts_with("https://")) {
        return None;
    }
    Some(Webhook {
        name: name.to_string(),
        url: url.to_string(),
    })
}

/// Everything `serve` needs, checked before anything starts.
struct Plan {
    endpoint_token: String,
    allow: Vec<IpNet>,
    smtp: SmtpConfig,
    webhooks: Vec<Webhook>,
    copy_to: Vec<String>,
}

fn plan(args: &ServeArgs) -> Result<Plan, RelayError> {
    let token = secret(args.token_file.as_ref(), "TRUNKGUARD_RELAY_TOKEN")?
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            RelayError::Config(
                "no token: pass --token-file or set TRUNKGUARD_RELAY_TOKEN (hosts send it as \
                 \"Authorization: Bearer <token>\")"
                    .into(),
            )
        })?;
    let allow = args
        .allow
        .iter()
        .map(|a| parse_net(a))
        .collect::<Result<Vec<_>, _>>()?;
    let from: Mailbox = args
        .from
        .parse()
        .map_err(|e| RelayError::Config(format!("--from {:?}: {e}", args.from)))?;
    for addr in &args.copy_to {
        addr.parse::<lettre::Address>()
            .map_err(|e| RelayError::Config(format!("--copy-to {addr:?}: {e}")))?;
    }
    let webhooks = args
        .webhooks
        .iter()
        .map(|w| parse_webhook(w))
        .chain(args.webhook_files.iter().map(|w| parse_webhook_file(w)))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, w) in webhooks.iter().enumerate() {
        if webhooks[..i].iter().any(|o| o.name == w.name) {
            return Err(RelayError::Config(format!(
                "--webhook name {:?} is used twice",
                w.name
            )));
        }
    }
    let password = secret(args.smtp_password_file.as_ref(), "TRUNKGUARD_SMTP_PASSWORD")?;
    if args.smtp_user.is_some() && password.is_none() {
        return Err(RelayError::Config(
            "--smtp-user needs --smtp-password-file or TRUNKGUARD_SMTP_PASSWORD".into(),
        ));
    }
    if args.retry_min.is_zero() || args.retry_max < args.retry_min {
        return Err(RelayError::Config(
            "--retry-min must be above zero and not above --retry-max".into(),
        ));
    }
    let port = args.smtp_port.unwrap_or(match args.smtp_tls {
        TlsMode::None => 25,
        TlsMode::Starttls => 587,
        TlsMode::Tls => 465,
    });
    Ok(Plan {
        endpoint_token: token,
        allow,
        smtp: SmtpConfig {
            host: args.smtp_host.clone(),
            port,
            tls: args.smtp_tls,
            ca_file: args.smtp_ca_file.clone(),
            user: args.smtp_user.clone(),
            password,
            timeout: args.smtp_timeout,
            hello: args.smtp_hello.clone(),
            from,
        },
        webhooks,
        copy_to: args.copy_to.clone(),
    })
}

/// Runs the relay until it is killed (every accepted event is already on disk, so
/// stopping it any time loses nothing).
pub fn serve(args: ServeArgs) -> Result<ExitCode, RelayError> {
    run(&args)
}

fn run(args: &ServeArgs) -> Result<ExitCode, RelayError> {
    let plan = plan(args)?;
    let mailer = Mailer::new(&plan.smtp)?;
    let forwarder = forward::Forwarder::new(args.webhook_timeout);

    let created = !args.queue.exists();
    let (queue, recovered) = Queue::open(&args.queue, args.max_pending)?;
    #[cfg(unix)]
    if created {
        use std::os::unix::fs::PermissionsExt;
        // Events carry phone numbers and addresses: the queue is for the relay's
        // user only.
        let _ = std::fs::set_permissions(&args.queue, std::fs::Permissions::from_mode(0o700));
    }
    let _ = created;
    log(&format!(
        "queue {}: {} pending{}{}",
        args.queue.display(),
        recovered.pending,
        if recovered.already_finished > 0 {
            format!(
                ", {} already delivered before a crash",
                recovered.already_finished
            )
        } else {
            String::new()
        },
        if recovered.corrupt.is_empty() {
            String::new()
        } else {
            format!(
                ", unreadable and moved to failed/: {}",
                recovered.corrupt.join(" ")
            )
        }
    ));
    let queue = Arc::new(queue);
    let status = Arc::new(Status::default());

    let server = tiny_http::Server::http(args.listen).map_err(|e| RelayError::Listen {
        addr: args.listen,
        reason: e.to_string(),
    })?;
    let bound = server
        .server_addr()
        .to_ip()
        .map(|a| a.to_string())
        .unwrap_or_else(|| args.listen.to_string());
    let server = Arc::new(server);

    let n_webhooks = plan.webhooks.len();
    // The delivery channels (channel.rs): e-mail, then each webhook.
    let mut channels: Vec<Box<dyn Channel>> = vec![Box::new(mail::MailChannel {
        mailer,
        copy_to: plan.copy_to,
    })];
    for hook in plan.webhooks {
        channels.push(Box::new(WebhookChannel::new(hook, forwarder.clone())));
    }
    let deliverer = Deliverer {
        queue: queue.clone(),
        status: status.clone(),
        channels,
        backoff: Backoff {
            min: args.retry_min,
            max: args.retry_max,
        },
        keep: args.keep,
    };
    let delivery = std::thread::Builder::new()
        .name("relay-deliver".into())
        .spawn(move || deliverer.run())
        .map_err(|e| RelayError::Stopped(e.to_string()))?;

    let state = match &args.state {
        Some(path) => {
            let state =
                state::StateFile::open(path).map_err(|e| RelayError::Config(e.to_string()))?;
            log(&format!(
                "state {}: {} entries",
                path.display(),
                state.len()
            ));
            Some(Arc::new(state))
        }
        None => None,
    };
    let endpoint = Arc::new(http::Endpoint {
        queue,
        status,
        token: plan.endpoint_token,
        allow: plan.allow,
        max_body: args.max_body,
        state,
    });
    // Each worker blocks on its own request (fsync included); four keep one slow
    // client from holding up the others.
    for n in 0..4 {
        let server = server.clone();
        let endpoint = endpoint.clone();
        std::thread::Builder::new()
            .name(format!("relay-http-{n}"))
            .spawn(move || {
                while let Ok(req) = server.recv() {
                    endpoint.handle(req);
                }
            })
            .map_err(|e| RelayError::Stopped(e.to_string()))?;
    }
    // The one line on stdout: scripts and tests read the bound address from it.
    println!("listening on http://{bound}{}", http::ALERTS_PATH);
    let _ = std::io::stdout().flush();
    log(&format!(
        "listening on http://{bound}{}; mail via {}:{} ({}{}), {} webhook(s)",
        http::ALERTS_PATH,
        plan.smtp.host,
        plan.smtp.port,
        plan.smtp.tls.as_str(),
        if plan.smtp.user.is_some() {
            ", AUTH"
        } else {
            ""
        },
        n_webhooks
    ));

    // Delivery only stops when the queue itself fails (disk gone): then the relay
    // stops too, so the hosts see it is down instead of posting into a void.
    let outcome = delivery.join();
    server.unblock();
    match outcome {
        Ok(Ok(())) => Ok(ExitCode::SUCCESS),
        Ok(Err(e)) => Err(RelayError::Stopped(e.to_string())),
        Err(_) => Err(RelayError::Stopped("it panicked".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_flags() {
        let cases = [
            (
                "chat=https://chat.example/hooks/abc",
                Some(("chat", "https://chat.example/hooks/abc")),
            ),
            (
                "t-1=http://127.0.0.1:9/x?a=b",
                Some(("t-1", "http://127.0.0.1:9/x?a=b")),
            ),
            ("https://chat.example/hooks/abc", None),
            ("=https://x", None),
            ("chat=ftp://x", None),
            ("a b=https://x", None),
        ];
        for (text, want) in cases {
            let got = parse_webhook(text).ok();
            let want = want.map(|(n, u)| Webhook {
                name: n.into(),
                url: u.into(),
            });
            assert_eq!(got, want, "{text}");
        }
    }

    #[test]
    fn webhook_file_flags_read_the_url_and_never_show_it() {
        let dir = std::env::temp_dir().join(format!("tg-relay-webhook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("chat");
        std::fs::write(&good, "https://chat.example/hooks/T0K3N\n").unwrap();
        let bad = dir.join("bad");
        std::fs::write(&bad, "ftp://chat.example/hooks/S3CR3T\n").unwrap();
        let got = parse_webhook_file(&format!("chat={}", good.display())).unwrap();
        assert_eq!(
            got,
            Webhook {
                name: "chat".into(),
                url: "https://chat.example/hooks/T0K3N".into()
            }
        );
        for text in [
            format!("chat={}", bad.display()),
            format!("a b={}", good.display()),
            format!("chat={}", dir.join("missing").display()),
            good.display().to_string(),
        ] {
            let e = parse_webhook_file(&text).unwrap_err().to_string();
            assert!(!e.contains("S3CR3T") && !e.contains("T0K3N"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn allow_flags() {
        assert_eq!(parse_net("127.0.0.1").unwrap().to_string(), "127.0.0.1/32");
        assert_eq!(parse_net("::1").unwrap().to_string(), "::1/128");
        assert_eq!(parse_net("10.1.0.0/16").unwrap().to_string(), "10.1.0.0/16");
        assert!(parse_net("localhost").is_err());
    }
}
