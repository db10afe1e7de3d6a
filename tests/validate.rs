//! Every shipped YAML, of both builds, passes `envoy --mode validate` with the fresh modules; the
//! native YAML is what `edgewise::native` makes of the wasm one; and a plugin configuration that a
//! filter refuses keeps Envoy from starting, with a log line naming the field.

use edgewise::envoy::{self, Build, Config, Envoy};
use edgewise::scenarios;

#[test]
fn every_shipped_yaml_of_both_builds_validates() {
    let names = scenarios::shipped().unwrap();
    assert!(names.contains(&"serverless".to_string()), "{names:?}");
    for build in Build::ALL {
        for name in &names {
            let run = tempfile::tempdir().unwrap();
            scenarios::install(name, run.path()).unwrap();
            let config = Config::shipped_as(name, build).run_dir(run.path());
            if let Err(e) = envoy::validate(&config, run.path()) {
                panic!("{build:?} {name}: {e:#}");
            }
        }
    }
}

/// Each envoy/native/<name>.yaml is the wasm original with the filters swapped (`make
/// native-yaml` rewrites them; EDGEWISE_UPDATE_NATIVE_YAML=1 here does the same).
#[test]
fn the_native_yaml_is_current() {
    let root = edgewise::repo_root();
    let update = std::env::var_os("EDGEWISE_UPDATE_NATIVE_YAML").is_some();
    let mut with_filters = 0;
    for name in scenarios::shipped().unwrap() {
        let original = std::fs::read_to_string(root.join(format!("envoy/{name}.yaml"))).unwrap();
        if !original.contains("filters.http.wasm.v3.Wasm") {
            continue;
        }
        with_filters += 1;
        let native = edgewise::native::from_wasm(&name, &original).unwrap();
        let path = root.join(format!("envoy/native/{name}.yaml"));
        if update {
            std::fs::create_dir_all(root.join("envoy/native")).unwrap();
            std::fs::write(&path, &native).unwrap();
        }
        let shipped = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(shipped == native, "envoy/native/{name}.yaml is stale: run `make native-yaml`");
    }
    assert!(with_filters >= 6, "{with_filters} shipped files with filters");
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
        for build in Build::ALL {
            let config = Config::shipped_as(scenario, build).run_dir(run.path()).replace(from, to);
            match Envoy::start(&config).await {
                Ok(_) => panic!("{build:?} envoy/{scenario}.yaml started with {to}"),
                Err(e) => assert!(format!("{e:#}").contains(says), "{build:?} envoy/{scenario}.yaml with {to}: {e:#}"),
            }
        }
    }
}

/// The dynamic module refuses a `filter_name` it does not have, naming the field.
#[tokio::test]
async fn an_unknown_native_filter_name_keeps_envoy_from_starting() {
    let run = tempfile::tempdir().unwrap();
    scenarios::install("egress", run.path()).unwrap();
    let config = Config::shipped_as("egress", Build::Native)
        .run_dir(run.path())
        .replace("filter_name: egress", "filter_name: egres");
    match Envoy::start(&config).await {
        Ok(_) => panic!("started with filter_name: egres"),
        Err(e) => assert!(
            format!("{e:#}").contains("`filter_name` \"egres\" is none of serverless, egress, mesh-identity"),
            "{e:#}"
        ),
    }
}
