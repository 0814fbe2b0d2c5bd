#![no_main]
//! The configuration loader on arbitrary bytes: a named error or an index, never a panic.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = trunkguard::index::Index::from_json(data);
});
