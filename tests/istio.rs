//! deploy/istio/ cannot run here (no Kubernetes), so this keeps it honest: every WasmPlugin's
//! pluginConfig goes through the filter's own configuration parser (documentation and code cannot
//! drift), auth and policy filters fail closed, and each pins the digest of the current image.

use edgewise_core::{cloud_connector, egress, mesh_identity, serverless};
use serde::Deserialize;

/// Filters that have no place in Istio, and why.
const NOT_FOR_ISTIO: &[(&str, &str)] = &[(
    "tunnel-auth",
    "it runs on the reverse-tunnel hub, a plain Envoy: Istio does not configure reverse-connection clusters",
)];

#[test]
fn every_wasmplugin_is_accepted_by_its_filter_and_pins_the_current_image() {
    let version = env!("CARGO_PKG_VERSION");
    let work = tempfile::tempdir().unwrap();
    let digests: std::collections::BTreeMap<String, String> = edgewise::oci::modules()
        .unwrap()
        .into_iter()
        .map(|(name, wasm)| {
            let image = edgewise::oci::build(&wasm, &name, version, &work.path().join(&name)).unwrap();
            (name, image.digest)
        })
        .collect();
    let mut covered = std::collections::BTreeSet::new();
    let dir = edgewise::repo_root().join("deploy/istio");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let doc = serde_yaml::Value::deserialize(doc).unwrap();
            if doc["kind"] != "WasmPlugin" {
                continue;
            }
            let at = format!("{} ({})", file.display(), doc["metadata"]["name"].as_str().unwrap_or("?"));
            let spec = &doc["spec"];
            let url = spec["url"].as_str().unwrap_or_default();
            let filter = edgewise::oci::filter_of_url(url)
                .unwrap_or_else(|| panic!("{at}: url {url:?} names no edgewise filter"));
            assert!(url.starts_with("oci://") && url.ends_with(&format!(":{version}")), "{at}: url {url}");
            let config = serde_json::to_vec(&serde_json::to_value(&spec["pluginConfig"]).unwrap()).unwrap();
            let parsed = match filter {
                "serverless" => serverless::Router::from_json(&config).map(drop),
                // The secret comes from the gateway pod's environment (vmConfig.env).
                "cloud-connector" => {
                    let secret = |var: &str| (var == "EDGEWISE_AUTHENTICITY_SECRET").then(|| "s".repeat(32));
                    cloud_connector::Gateway::from_json_env(&config, secret).map(drop)
                }
                "egress" => egress::Policy::from_json(&config).map(drop),
                "mesh-identity" => mesh_identity::Role::from_json(&config).map(drop),
                other => panic!("{at}: no parser for filter {other}: add it here"),
            };
            if let Err(e) = parsed {
                panic!("{at}: the filter refuses this pluginConfig: {e}");
            }
            assert_eq!(spec["failStrategy"], "FAIL_CLOSE", "{at}");
            assert!(spec["priority"].as_i64().is_some(), "{at}: priority (chosen and explained)");
            assert!(["AUTHN", "AUTHZ", "STATS"].contains(&spec["phase"].as_str().unwrap_or_default()), "{at}: phase");
            assert!(spec["selector"]["matchLabels"].as_mapping().is_some_and(|m| !m.is_empty()), "{at}: selector");
            assert_eq!(spec["pluginName"], filter, "{at}: pluginName is the filter's root id");
            let pinned = spec["sha256"].as_str().unwrap_or_default();
            let current = digests.get(filter).unwrap_or_else(|| panic!("{at}: no module {filter}"));
            assert_eq!(format!("sha256:{pinned}"), *current, "{at}: stale sha256, run `make oci-pin`");
            covered.insert(filter.to_string());
        }
    }
    for name in digests.keys() {
        if let Some((_, why)) = NOT_FOR_ISTIO.iter().find(|(n, _)| n == name) {
            assert!(!covered.contains(name), "{name}: {why}, yet it has a WasmPlugin");
            continue;
        }
        assert!(covered.contains(name), "filter {name} has no WasmPlugin under deploy/istio/");
    }
}
