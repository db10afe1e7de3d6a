//! JSON Schemas of every filter's plugin configuration, generated from the Rust config types
//! (schemars), committed under schemas/ and checked here to be up to date.
//! `make schemas` (EDGEWISE_UPDATE_SCHEMAS=1) rewrites them.

use edgewise_core::{cloud_connector, egress, mesh_identity, serverless, tunnel_auth};

fn generated() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        ("serverless", serde_json::to_value(schemars::schema_for!(serverless::Config)).unwrap()),
        ("egress", serde_json::to_value(schemars::schema_for!(egress::Config)).unwrap()),
        ("mesh-identity", serde_json::to_value(schemars::schema_for!(mesh_identity::Config)).unwrap()),
        ("cloud-connector", serde_json::to_value(schemars::schema_for!(cloud_connector::config::Config)).unwrap()),
        ("tunnel-auth", serde_json::to_value(schemars::schema_for!(tunnel_auth::Config)).unwrap()),
    ]
}

#[test]
fn every_filter_has_an_up_to_date_schema() {
    let dir = edgewise::repo_root().join("schemas");
    let schemas = generated();
    for (name, _) in edgewise::oci::modules().unwrap() {
        assert!(schemas.iter().any(|(n, _)| *n == name), "filter {name} has no schema: add its Config type here");
    }
    let update = std::env::var_os("EDGEWISE_UPDATE_SCHEMAS").is_some();
    for (name, schema) in schemas {
        let path = dir.join(format!("{name}.schema.json"));
        let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        if update {
            std::fs::write(&path, &text).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(committed == text, "{} is out of date: run `make schemas`", path.display());
    }
}
