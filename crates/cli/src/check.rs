//! `trunkguard check`: validates a configuration file with the module itself.

use std::path::Path;
use std::process::ExitCode;

use trunkguard_host::MemoryKv;

use crate::{load, read_config};

pub fn run(module_path: &Path, config: &Path) -> Result<ExitCode, String> {
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
