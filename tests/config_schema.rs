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

/// Every configuration the repository ships or tests with, beside whether the
/// loader accepts it.
fn configurations() -> Vec<(String, serde_json::Value)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for file in ["examples/config.json", "examples/kamailio/trunks.json"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        out.push((file.to_string(), serde_json::from_str(&text).unwrap()));
    }
    let table: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/scenario/scenarios.json")).unwrap(),
    )
    .unwrap();
    for (name, config) in table["configs"].as_object().unwrap() {
        out.push((format!("scenarios.json configs.{name}"), config.clone()));
    }
    out
}

#[test]
fn every_shipped_config_validates_against_the_committed_schema_and_loads() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("docs/config.schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let configs = configurations();
    assert!(configs.len() >= 10, "only {} configurations", configs.len());
    for (name, config) in configs {
        let errors: Vec<String> = validator
            .iter_errors(&config)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{name}: {errors:?}");
        // The table's bad_* configurations are refused past the schema's reach (a
        // CIDR's prefix length): the scenarios that push them expect that.
        if !name.contains(".bad_") {
            trunkguard::index::Index::from_json(config.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

#[test]
fn the_schema_refuses_what_the_loader_refuses_by_shape() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("docs/config.schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let (_, good) = configurations().remove(0);
    let mut typo = good.clone();
    typo["locations"][0]["trunk_groups"][0]["require_registraton"] = serde_json::json!(true);
    let mut wrong_type = good.clone();
    wrong_type["core_sockets"] = serde_json::json!("10.0.0.1:5060");
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("realm");
    for (what, bad) in [
        ("typo", typo),
        ("wrong type", wrong_type),
        ("missing realm", missing),
    ] {
        assert!(!validator.is_valid(&bad), "{what} passed the schema");
        assert!(
            trunkguard::index::Index::from_json(bad.to_string().as_bytes()).is_err(),
            "{what} passed the loader"
        );
    }
}
