//! `trunkguard replay`: judges messages from JSON Lines or a pcap/pcapng capture and
//! prints one verdict line per message (README.md shows it on the example traffic).

mod input;

use std::collections::BTreeMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;

use input::{ReplayInput, is_capture, parse_line, read_capture};
use trunkguard_host::{KvBackend, MemoryKv};

use crate::{load, read_config};

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

pub fn run(
    module_path: &Path,
    config: &Path,
    input: Option<&Path>,
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
        )
        .map_err(|e| e.to_string())?;
    }
    let mut policy = load(module_path, kv)?;
    policy
        .configure(&json)
        .map_err(|e| format!("{}: {e}", config.display()))?;
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
                let line = serde_json::to_string(&trunkguard::wire::Judgement {
                    verdict: Some(&judged.verdict),
                    error: None,
                })?;
                writeln!(out, "{line}")?;
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
