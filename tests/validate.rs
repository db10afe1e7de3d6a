//! Every shipped YAML passes `envoy --mode validate` with the fresh .wasm modules, and a plugin
//! configuration that a filter refuses keeps Envoy from starting, with a log line naming the field.

use edgewise::envoy::{self, Config, Envoy};
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

/// (scenario, text in the shipped YAML, replacement, what Envoy's log must say)
const BAD_PLUGIN_CONFIGS: &[(&str, &str, &str, &str)] = &[
    (
        "serverless",
        "\"domain\": \"serverless.gitlab.io\"",
        "\"domian\": \"serverless.gitlab.io\"",
        "serverless: invalid plugin configuration: unknown field `domian`",
    ),
    (
        "serverless",
        "\"host\": \"hello.ns-42.knative.customer-a.example\"",
        "\"host\": \"hello/world\"",
        "serverless: invalid plugin configuration: `routes[0].host` \"hello/world\" is not a valid Host",
    ),
    (
        "serverless",
        "\"domain\": \"serverless.gitlab.io\"",
        "\"domain\": \"serverless.gitlab.io\", \"pattern\": \"(?i)(?P<function>[a-z]+)\"",
        "serverless: invalid plugin configuration: `pattern` at offset 2: flags are not supported",
    ),
    (
        "egress",
        "\"allow_private\": [\"api.github.com\"",
        "\"allow_private\": [\"api.gitlab.com\"",
        "egress: invalid plugin configuration: `allow_private[0]` \"api.gitlab.com\" is not an entry of `allow`",
    ),
    (
        "egress",
        "\"suffix\": \"egress.local\"",
        "\"suffix\": \"egress..local\"",
        "egress: invalid plugin configuration: `suffix`",
    ),
    (
        "cloud-connector",
        "\"clock_skew_seconds\": 60",
        "\"clock_skew\": 60",
        "cloud-connector: invalid plugin configuration: unknown field `clock_skew`",
    ),
    (
        "cloud-connector",
        "\"secret_env\": \"EDGEWISE_AUTHENTICITY_SECRET\"",
        "\"secret_env\": \"EDGEWISE_HMAC_KEY\"",
        "cloud-connector: invalid plugin configuration: `authenticity.secret_env` environment variable EDGEWISE_HMAC_KEY is not set",
    ),
    (
        "cloud-connector",
        "\"prefix\": \"/observability\"",
        "\"prefix\": \"observability\"",
        "cloud-connector: invalid plugin configuration: `features[2].prefix` must be a path starting with /",
    ),
    (
        "tunnel-hub",
        "\"clusters_claim\": \"clusters\",",
        "",
        "tunnel-auth: invalid plugin configuration: `clusters_claim` set clusters_claim or allow",
    ),
];

#[tokio::test]
async fn a_bad_plugin_configuration_keeps_envoy_from_starting() {
    for (scenario, from, to, says) in BAD_PLUGIN_CONFIGS {
        let run = tempfile::tempdir().unwrap();
        scenarios::install(scenario, run.path()).unwrap();
        let config = Config::shipped(scenario).run_dir(run.path()).replace(from, to);
        match Envoy::start(&config).await {
            Ok(_) => panic!("envoy/{scenario}.yaml started with {to}"),
            Err(e) => assert!(format!("{e:#}").contains(says), "envoy/{scenario}.yaml with {to}: {e:#}"),
        }
    }
}
