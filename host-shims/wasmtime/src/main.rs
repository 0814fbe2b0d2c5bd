//! `trunkguard`: the reference host's command line.

use std::collections::BTreeMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use trunkguard_host::replay::{ReplayInput, is_capture, parse_line, read_capture};
use trunkguard_host::{HostError, KvBackend, MemoryKv, Policy, PolicyModule, default_module_path};

#[derive(Parser)]
#[command(
    name = "trunkguard",
    version,
    about = "SIP-trunk access policy: reference wasmtime host"
)]
struct Cli {
    /// The message-ABI module (default: the one scripts/build produced).
    #[arg(long, global = true)]
    module: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file: exit 0, or exit 1 naming the JSON path and reason.
    Check { config: PathBuf },
    /// Judge messages from JSON Lines (stdin when INPUT is omitted) or a pcap/pcapng
    /// capture; print one verdict line per message, preceded by the alerts it raised.
    Replay {
        #[arg(long)]
        config: PathBuf,
        input: Option<PathBuf>,
        /// Print a human-readable table of the verdicts on stderr.
        #[arg(long)]
        summary: bool,
        /// Hex nonce secret (64 digits), for reproducible challenges in scripted
        /// traffic. Default: a random secret.
        #[arg(long)]
        nonce_secret: Option<String>,
    },
    /// Print the HA1 values of a password, to put in a configuration instead of the
    /// password (docs/configuration.md). The password is read from standard input
    /// (its first line), or asked for without echo when standard input is a terminal.
    Ha1 {
        #[arg(long)]
        username: String,
        #[arg(long)]
        realm: String,
        /// `MD5`, `SHA-256`, or both (the default).
        #[arg(long)]
        algorithm: Option<String>,
    },
    /// The alert relay: receive alert events from hosts, mail them (docs/alerts.md).
    Alerts {
        #[command(subcommand)]
        command: AlertsCommand,
    },
}

#[derive(Subcommand)]
enum AlertsCommand {
    /// Serve the loopback endpoint hosts post alert events to; deliver them by SMTP
    /// and to webhooks, retrying until delivered.
    // Boxed: the relay's flags outweigh every other command's (clippy large_enum_variant).
    Serve(Box<trunkguard_host::relay::ServeArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let module_path = cli.module.clone().unwrap_or_else(default_module_path);
    let result = match cli.command {
        Command::Check { config } => check(&module_path, &config),
        Command::Replay {
            config,
            input,
            summary,
            nonce_secret,
        } => replay(
            &module_path,
            &config,
            input.as_deref(),
            summary,
            nonce_secret.as_deref(),
        ),
        Command::Ha1 {
            username,
            realm,
            algorithm,
        } => ha1(&username, &realm, algorithm.as_deref()),
        Command::Alerts {
            command: AlertsCommand::Serve(args),
        } => trunkguard_host::relay::serve(*args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("trunkguard: {e}");
            ExitCode::from(2)
        }
    }
}

fn ha1(username: &str, realm: &str, algorithm: Option<&str>) -> Result<ExitCode, String> {
    use std::io::IsTerminal;
    use trunkguard::digest::{Algorithm, ha1};
    let algorithms = match algorithm {
        None => vec![Algorithm::Md5, Algorithm::Sha256],
        Some(name) => vec![
            Algorithm::from_param(Some(name))
                .ok_or_else(|| format!("unknown algorithm {name:?} (MD5 or SHA-256)"))?,
        ],
    };
    // The challenge quotes both (RFC 7616 §3.3): the configuration refuses these too.
    for (what, value) in [("username", username), ("realm", realm)] {
        if value.is_empty()
            || value
                .chars()
                .any(|c| c == '"' || c == '\\' || c.is_control())
        {
            return Err(format!(
                "{what} must be non-empty, without quotes, backslashes or control characters"
            ));
        }
    }
    let password = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(format!("password for {username}@{realm}: "))
            .map_err(|e| format!("cannot read the password: {e}"))?
    } else {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    if password.is_empty() {
        return Err("empty password".into());
    }
    let mut out = serde_json::Map::new();
    for a in algorithms {
        let field = match a {
            Algorithm::Md5 => "ha1",
            Algorithm::Sha256 => "ha1_sha256",
        };
        out.insert(field.into(), ha1(a, username, realm, &password).into());
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(ExitCode::SUCCESS)
}

fn load(module_path: &std::path::Path, kv: MemoryKv) -> Result<Policy, String> {
    let module = PolicyModule::from_file(module_path).map_err(|e| match e {
        HostError::ModuleFile { .. } => {
            format!("{e} (build it with scripts/build, or pass --module PATH)")
        }
        other => other.to_string(),
    })?;
    Policy::new(&module, Box::new(kv)).map_err(|e| e.to_string())
}

fn read_config(path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn check(module_path: &std::path::Path, config: &std::path::Path) -> Result<ExitCode, String> {
    let json = read_config(config)?;
    let mut policy = load(module_path, MemoryKv::default())?;
    match policy.configure(&json).map_err(|e| e.to_string())? {
        Ok(_) => {
            println!("{}: ok", config.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(refused) => {
            println!("{}: {refused}", config.display());
            Ok(ExitCode::from(1))
        }
    }
}

#[derive(Default)]
struct Summary {
    rows: Vec<[String; 7]>,
    by_outcome: BTreeMap<String, usize>,
    alerts: usize,
}

impl Summary {
    fn add(&mut self, input: &ReplayInput, verdict: &trunkguard_host::Verdict) {
        let first_line = input
            .message
            .split(|&b| b == b'\r' || b == b'\n')
            .next()
            .unwrap_or_default();
        let word =
            String::from_utf8_lossy(first_line.split(|&b| b == b' ').next().unwrap_or_default())
                .into_owned();
        let cause = verdict.cause.map(|c| c.as_str()).unwrap_or_default();
        let outcome = format!("{} {cause}", verdict.action.as_str());
        *self
            .by_outcome
            .entry(outcome.trim().to_string())
            .or_default() += 1;
        self.rows.push([
            (self.rows.len() + 1).to_string(),
            input.at_ms.to_string(),
            input.source.to_string(),
            word,
            verdict.action.as_str().to_string(),
            verdict.code.map(|c| c.to_string()).unwrap_or_default(),
            format!(
                "{cause} {}",
                verdict
                    .trunk_group
                    .clone()
                    .map(|t| format!("[{t}]"))
                    .unwrap_or_default()
            ),
        ]);
    }

    fn print(&self) {
        let header = [
            "#",
            "at_ms",
            "source",
            "message",
            "action",
            "code",
            "cause [trunk group]",
        ];
        let mut widths = header.map(str::len);
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: &[&str]| {
            let parts: Vec<String> = cells
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            eprintln!("{}", parts.join("  ").trim_end());
        };
        line(&header);
        for row in &self.rows {
            line(&row.each_ref().map(String::as_str));
        }
        eprintln!();
        for (outcome, n) in &self.by_outcome {
            eprintln!("{n:>6}  {outcome}");
        }
        eprintln!("{:>6}  alert events", self.alerts);
    }
}

fn replay(
    module_path: &std::path::Path,
    config: &std::path::Path,
    input: Option<&std::path::Path>,
    summary: bool,
    nonce_secret: Option<&str>,
) -> Result<ExitCode, String> {
    let json = read_config(config)?;
    let mut kv = MemoryKv::default();
    if let Some(secret) = nonce_secret {
        if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("--nonce-secret takes 64 hexadecimal digits".into());
        }
        kv.set(
            trunkguard::store::keys::NONCE_SECRET,
            secret.to_ascii_lowercase().as_bytes(),
        )?;
    }
    let mut policy = load(module_path, kv)?;
    if let Err(refused) = policy.configure(&json).map_err(|e| e.to_string())? {
        return Err(format!("{}: {refused}", config.display()));
    }
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut table = Summary::default();
    let mut failures = 0usize;
    // Returns whether the message got no verdict from the module.
    let mut judge_one = |item: ReplayInput,
                         out: &mut BufWriter<std::io::StdoutLock<'_>>|
     -> std::io::Result<bool> {
        let mut alerts = policy.tick(item.at_ms).unwrap_or_default();
        match policy.judge(
            &item.message,
            item.source,
            item.local,
            item.transport,
            item.at_ms,
        ) {
            Ok(judged) => {
                alerts.extend(judged.alerts);
                table.alerts += alerts.len();
                for a in &alerts {
                    writeln!(out, "{{\"alert\":{a}}}")?;
                }
                table.add(&item, &judged.verdict);
                writeln!(out, "{}", judged.raw)?;
                out.flush()?;
                Ok(false)
            }
            Err(e) => {
                // No verdict means refuse: the line says so and why.
                let line = serde_json::json!({
                    "verdict": {"action": "reject", "code": 500, "reason": "Server Internal Error", "cause": "host_error"},
                    "error": e.to_string(),
                });
                writeln!(out, "{line}")?;
                out.flush()?;
                Ok(true)
            }
        }
    };
    let io = |e: std::io::Error| format!("output: {e}");
    match input {
        Some(path) => {
            let bytes =
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if is_capture(&bytes) {
                for item in read_capture(&bytes).map_err(|e| format!("{}: {e}", path.display()))? {
                    failures += usize::from(judge_one(item, &mut out).map_err(io)?);
                }
            } else {
                for (n, line) in String::from_utf8_lossy(&bytes).lines().enumerate() {
                    handle_line(n + 1, line, &mut out, &mut failures, &mut judge_one)
                        .map_err(io)?;
                }
            }
        }
        None => {
            // Line by line, flushing each verdict before reading on, so a client
            // can answer a challenge it just received.
            let stdin = std::io::stdin();
            for (n, line) in stdin.lock().lines().enumerate() {
                let line = line.map_err(|e| format!("stdin: {e}"))?;
                handle_line(n + 1, &line, &mut out, &mut failures, &mut judge_one).map_err(io)?;
            }
        }
    }
    // Close every alert window still open, so their repeat counts are not lost.
    for a in policy.tick(u64::MAX).unwrap_or_default() {
        table.alerts += 1;
        writeln!(out, "{{\"alert\":{a}}}").map_err(io)?;
    }
    out.flush().map_err(io)?;
    if summary {
        table.print();
    }
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn handle_line(
    n: usize,
    line: &str,
    out: &mut BufWriter<std::io::StdoutLock<'_>>,
    failures: &mut usize,
    judge_one: &mut impl FnMut(
        ReplayInput,
        &mut BufWriter<std::io::StdoutLock<'_>>,
    ) -> std::io::Result<bool>,
) -> std::io::Result<()> {
    if line.trim().is_empty() {
        return Ok(());
    }
    match parse_line(line) {
        Ok(item) => {
            *failures += usize::from(judge_one(item, out)?);
            Ok(())
        }
        Err(e) => {
            *failures += 1;
            writeln!(
                out,
                "{}",
                serde_json::json!({"error": format!("input line {n}: {e}")})
            )?;
            out.flush()
        }
    }
}
