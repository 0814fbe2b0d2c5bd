//! `trunkguard check`: validates a configuration file with the module itself.

use std::path::Path;
use std::process::ExitCode;

use trunkguard_host::{ConfigureError, MemoryKv};

use crate::{load, read_config};

pub fn run(module_path: &Path, config: &Path) -> Result<ExitCode, String> {
    let json = read_config(config)?;
    let mut policy = load(module_path, MemoryKv::default())?;
    match policy.configure(&json) {
        Ok(_) => {
            println!("{}: ok", config.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(ConfigureError::Refused(refused)) => {
            println!("{}: {refused}", config.display());
            Ok(ExitCode::from(1))
        }
        Err(ConfigureError::Host(e)) => Err(e.to_string()),
    }
}
