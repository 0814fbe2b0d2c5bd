//! Finds the message-ABI `.wasm`, building it first (cargo decides whether it is stale).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use trunkguard_host::PolicyModule;

/// The workspace root (this file is in tests/common/).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds `trunkguard.wasm` once per test process and returns its path.
pub fn module_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os("TRUNKGUARD_MODULE") {
            return PathBuf::from(p);
        }
        let root = workspace_root();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(&root)
            .args([
                "build",
                "-p",
                "trunkguard-abi",
                "--target",
                "wasm32-unknown-unknown",
                "--profile",
                "wasm",
            ])
            .status()
            .expect("run cargo to build the .wasm");
        assert!(status.success(), "building trunkguard_abi.wasm failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join(trunkguard_host::MODULE_RELATIVE_PATH)
    })
    .clone()
}

pub fn module() -> PolicyModule {
    static MODULE: OnceLock<PolicyModule> = OnceLock::new();
    MODULE
        .get_or_init(|| PolicyModule::from_file(&module_path()).expect("load trunkguard_abi.wasm"))
        .clone()
}
