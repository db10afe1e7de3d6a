//! Every shipped YAML passes `envoy --mode validate` with the fresh .wasm modules, and a plugin
//! configuration that the filter refuses keeps validation from passing.

use edgewise::envoy::{self, Config};
use edgewise::scenarios;

#[test]
fn every_shipped_yaml_validates() {
    let names = scenarios::shipped().unwrap();
    assert!(names.contains(&"serverless".to_string()), "{names:?}");
    for name in names {
        let run = tempfile::tempdir().unwrap();
        scenarios::install(&name, run.path()).unwrap();
        let config = Config::shipped(&name).run_dir(run.path());
        if let Err(e) = envoy::validate(&config, run.path()) {
            panic!("{e:#}");
        }
    }
}

#[test]
fn validation_rejects_a_plugin_configuration_the_filter_refuses() {
    let run = tempfile::tempdir().unwrap();
    scenarios::install("serverless", run.path()).unwrap();
    let config = Config::shipped("serverless")
        .run_dir(run.path())
        .replace("\"poll_interval_ms\": 2000", "\"poll_interval_ms\": 5");
    let err = envoy::validate(&config, run.path()).unwrap_err();
    assert!(format!("{err:#}").contains("`management.poll_interval_ms` must be at least 100"), "{err:#}");
}
