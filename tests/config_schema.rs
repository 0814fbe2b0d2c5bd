//! `docs/config.schema.json` is generated from the configuration types; this test
//! fails when the committed file is stale. Regenerate with
//! `TRUNKGUARD_BLESS=1 cargo test --release --features schema --test config_schema`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly

#[test]
fn committed_json_schema_matches_the_config_types() {
    let schema = schemars::schema_for!(trunkguard::config::Config);
    let fresh = format!("{}\n", serde_json::to_string_pretty(&schema).unwrap());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/config.schema.json");
    if std::env::var_os("TRUNKGUARD_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "docs/config.schema.json is stale; see this test's header"
    );
}

#[test]
fn the_example_config_validates_against_the_schema_shape() {
    // The schema forbids unknown properties, like the loader does.
    let schema = schemars::schema_for!(trunkguard::config::Config);
    let text = serde_json::to_string(&schema).unwrap();
    assert!(text.contains("\"additionalProperties\":false"), "{text}");
    let example = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config.json"),
    )
    .unwrap();
    trunkguard::index::Index::from_json(&example).unwrap();
}
