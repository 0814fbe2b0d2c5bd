//! `trunkguard`: the reference host's command line.

//!
//! One file per subcommand: `check.rs`, `replay/` (with the input formats in
//! `replay/input.rs`), `ha1.rs`; `alerts serve` is the relay's own crate
//! (crates/relay).

mod check;
mod ha1;
mod replay;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use trunkguard_host::{HostError, MemoryKv, PolicyInstance, PolicyModule, default_module_path};

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
    Serve(Box<trunkguard_relay::ServeArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let module_path = cli.module.clone().unwrap_or_else(default_module_path);
    let result = match cli.command {
        Command::Check { config } => check::run(&module_path, &config),
        Command::Replay {
            config,
            input,
            summary,
            nonce_secret,
        } => replay::run(
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
        } => ha1::run(&username, &realm, algorithm.as_deref()),
        Command::Alerts {
            command: AlertsCommand::Serve(args),
        } => trunkguard_relay::serve(*args).map_err(|e| e.to_string()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("trunkguard: {e}");
            ExitCode::from(2)
        }
    }
}

/// The module at `module_path`, instantiated over `kv`.
fn load(module_path: &Path, kv: MemoryKv) -> Result<PolicyInstance, String> {
    let module = PolicyModule::from_file(module_path).map_err(|e| match e {
        HostError::ModuleFile { .. } => {
            format!("{e} (build it with scripts/build, or pass --module PATH)")
        }
        other => other.to_string(),
    })?;
    PolicyInstance::new(&module, Box::new(kv)).map_err(|e| e.to_string())
}

fn read_config(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}
