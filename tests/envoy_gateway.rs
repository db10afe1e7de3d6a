//! deploy/envoy-gateway/ cannot run here (no Kubernetes, no Envoy Gateway), so this keeps it
//! honest: every manifest is of a kind and API version Envoy Gateway serves; every filter
//! configuration in an EnvoyExtensionPolicy goes through the filter's own configuration parser and
//! equals the configuration of the shipped file it names (edgewise/config-from); the native
//! policies name a module of the EnvoyProxy allowlist and a filter libedgewise.so has, the wasm
//! policies pin the digest of the current OCI image and fail closed; the clusters and routes the
//! configurations rely on exist; and Envoy 1.40 accepts each filter as Envoy Gateway would hand it
//! over (rebuilt here after Envoy Gateway's translator: a DynamicModuleFilter or Wasm filter whose
//! configuration is the policy's `config` as a JSON string), with the module the image holds. The
//! alternative envoyproxy-remote.yaml (the module by URL, source type Remote) is envoyproxy.yaml
//! with the official image, pins the current build, and Envoy loads every native policy with the
//! module downloaded from loopback as that source asks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use edgewise::envoy::{self, Config};
use edgewise_core::{cloud_connector, egress, mesh_identity, serverless};
use serde::Deserialize;
use serde_json::{json, Value as Json};
use serde_yaml::Value;

const DIR: &str = "deploy/envoy-gateway";
const GATEWAY_CLASS: &str = "edgewise";
const CONTROLLER: &str = "gateway.envoyproxy.io/gatewayclass-controller";
const CONFIG_FROM: &str = "edgewise/config-from";

/// Every kind the directory may hold, with the API version Envoy Gateway (and the Gateway API
/// it bundles) serves it at.
const KINDS: &[(&str, &str)] = &[
    ("GatewayClass", "gateway.networking.k8s.io/v1"),
    ("Gateway", "gateway.networking.k8s.io/v1"),
    ("HTTPRoute", "gateway.networking.k8s.io/v1"),
    ("BackendTLSPolicy", "gateway.networking.k8s.io/v1"),
    ("ReferenceGrant", "gateway.networking.k8s.io/v1beta1"),
    ("EnvoyProxy", "gateway.envoyproxy.io/v1alpha1"),
    ("EnvoyExtensionPolicy", "gateway.envoyproxy.io/v1alpha1"),
    ("Backend", "gateway.envoyproxy.io/v1alpha1"),
];

/// The filter names libedgewise.so answers to (`filter_name`); the same names as the .wasm
/// modules (checked below), and Envoy loading the module with each one proves the rest.
const NATIVE_FILTERS: &[&str] = &["serverless", "egress", "mesh-identity", "cloud-connector", "tunnel-auth"];

/// Filters that have no place on Envoy Gateway, and why.
const NOT_FOR_ENVOY_GATEWAY: &[(&str, &str)] = &[(
    "tunnel-auth",
    "it runs on the reverse-tunnel hub, whose routes pick Envoy's reverse-connection cluster: Envoy Gateway \
     configures no such cluster and its routes can name none",
)];

struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }
    fn namespace(&self) -> &str {
        self.value["metadata"]["namespace"].as_str().unwrap_or_default()
    }
    fn at(&self) -> String {
        format!("{} ({} {}/{})", self.file, self.kind(), self.namespace(), self.name())
    }
}

fn yaml_files() -> Vec<PathBuf> {
    let dir = edgewise::repo_root().join(DIR);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The alternative to envoyproxy.yaml that fetches libedgewise.so by URL (the same GatewayClass
/// and EnvoyProxy, so not applied with it): checked against it by its own test below.
const REMOTE_PROXY: &str = "envoyproxy-remote.yaml";

/// The manifests applied together: every file but [`REMOTE_PROXY`].
fn manifests() -> Vec<Doc> {
    yaml_files().into_iter().filter(|p| !p.ends_with(REMOTE_PROXY)).flat_map(|p| docs_of(&p)).collect()
}

fn docs_of(path: &Path) -> Vec<Doc> {
    let file = format!("{DIR}/{}", path.file_name().unwrap().to_str().unwrap());
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Doc { file: file.clone(), value: Value::deserialize(doc).unwrap_or_else(|e| panic!("{file}: {e}")) })
        .collect()
}

fn to_json(v: &Value) -> Json {
    serde_json::to_value(v).unwrap()
}

/// The current image digest (`sha256:<hex>`) of every filter, as `make oci` computes it.
fn digests(work: &Path) -> BTreeMap<String, (String, PathBuf)> {
    let version = env!("CARGO_PKG_VERSION");
    edgewise::oci::modules()
        .unwrap()
        .into_iter()
        .map(|(name, wasm)| {
            let image = edgewise::oci::build(&wasm, &name, version, &work.join(&name)).unwrap();
            (name, (image.digest, image.dir))
        })
        .collect()
}

/// The one configuration of `filter` in a shipped Envoy YAML: a dynamic-module filter's
/// `filter_config` (filter_name) or a wasm filter's `configuration` (root_id).
fn shipped_config(file: &str, filter: &str) -> Json {
    fn walk(v: &Value, filter: &str, out: &mut Vec<String>) {
        match v {
            Value::Mapping(m) => {
                if m.get("filter_name").and_then(Value::as_str) == Some(filter) {
                    out.extend(m.get("filter_config").and_then(|c| c["value"].as_str()).map(str::to_owned));
                }
                if m.get("root_id").and_then(Value::as_str) == Some(filter) {
                    out.extend(m.get("configuration").and_then(|c| c["value"].as_str()).map(str::to_owned));
                }
                m.values().for_each(|v| walk(v, filter, out));
            }
            Value::Sequence(s) => s.iter().for_each(|v| walk(v, filter, out)),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(edgewise::repo_root().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut found = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        walk(&Value::deserialize(doc).unwrap(), filter, &mut found);
    }
    assert_eq!(found.len(), 1, "{file}: expected one configuration of {filter}, found {}", found.len());
    serde_json::from_str(&found[0]).unwrap_or_else(|e| panic!("{file}: the {filter} configuration: {e}"))
}

/// What a configuration asks of the Envoy around the filter.
#[derive(Default)]
struct Needs {
    /// Clusters the filter calls out to, by name.
    callouts: Vec<String>,
    /// (header, value): the filter sets the header to the value for a route to forward on.
    routed: Vec<(String, String)>,
    /// Environment variables the filter reads.
    env: Vec<String>,
}

/// Runs the configuration through the filter's own parser.
fn parse(filter: &str, config: &Json, at: &str) -> Needs {
    let bytes = serde_json::to_vec(config).unwrap();
    let mut needs = Needs::default();
    let parsed = match filter {
        "serverless" => serverless::Router::from_json(&bytes).map(|router| {
            needs.callouts.extend(router.management.iter().map(|m| m.cluster.clone()));
            for route in config["routes"].as_array().into_iter().flatten() {
                let cluster = route["cluster"].as_str().unwrap_or_default();
                needs.routed.push((router.cluster_header.clone(), cluster.to_string()));
            }
        }),
        // The secret comes from the Envoy container's environment (envoyproxy.yaml).
        "cloud-connector" => {
            let var = config["authenticity"]["secret_env"].as_str().unwrap_or_default().to_string();
            let secret = |v: &str| (v == var).then(|| "s".repeat(32));
            cloud_connector::Gateway::from_json_env(&bytes, secret).map(|gateway| {
                needs.callouts.extend(gateway.issuers().iter().map(|i| i.cluster.clone()));
                for feature in &gateway.features {
                    needs.routed.push((gateway.cluster_header.clone(), feature.cluster.clone()));
                }
                needs.env.push(var.clone());
            })
        }
        "egress" => {
            assert!(
                config.get("allow_private").is_none(),
                "{at}: allow_private exempts destinations from the SSRF guard"
            );
            egress::Policy::from_json(&bytes).map(drop)
        }
        "mesh-identity" => mesh_identity::Role::from_json(&bytes).map(|role| {
            // The sidecar role belongs in the workloads' sidecars, not on a gateway.
            assert!(
                matches!(role, mesh_identity::Role::Gateway(_)),
                "{at}: mesh-identity on a Gateway takes the gateway role"
            );
        }),
        other => panic!("{at}: no parser for filter {other}: add it here"),
    };
    if let Err(e) = parsed {
        panic!("{at}: the filter refuses this configuration: {e}");
    }
    needs
}

/// Keys YAML 1.1 (which kubectl's YAML reader follows) reads as booleans: `y:` in a JWK would
/// reach the filter as `"true"`. They must be quoted.
fn yaml11_boolean_keys(text: &str) -> Vec<String> {
    const WORDS: &[&str] = &["y", "Y", "n", "N", "yes", "Yes", "no", "No", "on", "On", "off", "Off"];
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.split(" #").next().unwrap_or_default();
        if code.trim_start().starts_with('#') {
            continue;
        }
        for word in WORDS {
            let starts = [format!("{word}:"), format!("- {word}:")];
            let inner = [format!(" {word}:"), format!("{{{word}:"), format!(",{word}:")];
            if starts.iter().any(|s| code.trim_start().starts_with(s.as_str()))
                || inner.iter().any(|s| code.contains(s.as_str()))
            {
                found.push(format!("line {}: {}", i + 1, line.trim()));
            }
        }
    }
    found
}

/// Whether an HTTPRoute on the Gateway forwards requests carrying `header: value` (exact match)
/// somewhere and removes the header on the way.
fn forwards(docs: &[Doc], namespace: &str, gateway: &str, header: &str, value: &str) -> bool {
    let list = |v: &Value| v.as_sequence().cloned().unwrap_or_default();
    let routes = docs.iter().filter(|d| d.kind() == "HTTPRoute" && d.namespace() == namespace);
    let attached = routes.filter(|r| list(&r.value["spec"]["parentRefs"]).iter().any(|p| p["name"] == gateway));
    attached.flat_map(|r| list(&r.value["spec"]["rules"])).any(|rule| {
        let matches = list(&rule["matches"]).iter().flat_map(|m| list(&m["headers"])).any(|h| {
            h["name"].as_str().is_some_and(|n| n.eq_ignore_ascii_case(header))
                && h["value"] == value
                && h["type"].as_str().is_none_or(|t| t == "Exact")
        });
        let removes = list(&rule["filters"])
            .iter()
            .flat_map(|f| list(&f["requestHeaderModifier"]["remove"]))
            .any(|r| r.as_str().is_some_and(|r| r.eq_ignore_ascii_case(header)));
        matches && removes && !list(&rule["backendRefs"]).is_empty()
    })
}

/// A listener whose HTTP filters are `filter` and the router, with `clusters`: what the filter
/// needs of Envoy to be configured.
fn envoy_yaml(filter: Json, clusters: &Json) -> String {
    let config = json!({
        "static_resources": {
            "listeners": [{
                "name": "gateway",
                "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } },
                "filter_chains": [{ "filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "gateway",
                        "http_filters": [filter, {
                            "name": "envoy.filters.http.router",
                            "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
                        }],
                        "route_config": { "virtual_hosts": [{
                            "name": "all", "domains": ["*"],
                            "routes": [{ "match": { "prefix": "/" }, "direct_response": { "status": 404 } }],
                        }] },
                    },
                }] }],
            }],
            "clusters": clusters,
        },
    });
    serde_json::to_string_pretty(&config).unwrap()
}

#[test]
fn every_policy_is_accepted_by_its_filter_and_matches_what_it_repeats() {
    let version = env!("CARGO_PKG_VERSION");
    let work = tempfile::tempdir().unwrap();
    let images = digests(work.path());
    let wasm_filters: BTreeSet<&str> = images.keys().map(String::as_str).collect();
    assert_eq!(
        wasm_filters,
        NATIVE_FILTERS.iter().copied().collect(),
        "the filters of libedgewise.so and the .wasm modules"
    );
    let docs = manifests();

    // Kinds, API versions, names; and YAML that kubectl reads as written.
    for doc in &docs {
        let at = doc.at();
        let api = KINDS.iter().find(|(k, _)| *k == doc.kind()).map(|(_, v)| *v);
        let api = api.unwrap_or_else(|| panic!("{at}: a kind this directory does not expect"));
        assert_eq!(doc.value["apiVersion"], api, "{at}: apiVersion");
        assert!(!doc.name().is_empty(), "{at}: metadata.name");
        assert!(doc.kind() == "GatewayClass" || !doc.namespace().is_empty(), "{at}: metadata.namespace");
    }
    for path in yaml_files() {
        let bad = yaml11_boolean_keys(&std::fs::read_to_string(&path).unwrap());
        assert!(bad.is_empty(), "{}: quote these keys, YAML 1.1 reads them as booleans: {bad:?}", path.display());
    }
    let find = |kind: &str, ns: &str, name: &str| {
        docs.iter().find(|d| d.kind() == kind && (ns.is_empty() || d.namespace() == ns) && d.name() == name)
    };

    // The GatewayClass and its EnvoyProxy: the image, the module allowlist, the callout clusters.
    let class = find("GatewayClass", "", GATEWAY_CLASS).expect("GatewayClass edgewise");
    assert_eq!(class.value["spec"]["controllerName"], CONTROLLER);
    let params = &class.value["spec"]["parametersRef"];
    assert_eq!(
        (params["group"].as_str(), params["kind"].as_str()),
        (Some("gateway.envoyproxy.io"), Some("EnvoyProxy"))
    );
    let proxy = find("EnvoyProxy", params["namespace"].as_str().unwrap_or("?"), params["name"].as_str().unwrap_or("?"))
        .expect("the EnvoyProxy of the GatewayClass");
    let spec = &proxy.value["spec"];
    let container = &spec["provider"]["kubernetes"]["envoyDeployment"]["container"];
    let image = container["image"].as_str().unwrap_or_default();
    assert!(
        image.ends_with(&format!("-edgewise-{version}")),
        "{}: the Envoy image {image} (the Dockerfile's, tagged with this version)",
        proxy.at()
    );
    let env: BTreeSet<&str> =
        container["env"].as_sequence().into_iter().flatten().filter_map(|e| e["name"].as_str()).collect();

    let dockerfile = std::fs::read_to_string(edgewise::repo_root().join(DIR).join("Dockerfile")).unwrap();
    let base =
        dockerfile.lines().find_map(|l| l.strip_prefix("ARG ENVOY_IMAGE=")).expect("Dockerfile: ARG ENVOY_IMAGE");
    // The ABI of libedgewise.so is Envoy 1.40's; the distroless image lacks libgcc_s.
    assert!(base.contains("envoy:v1.40.") && !base.contains("distroless"), "Dockerfile: base image {base}");
    let copied_to = dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY") && l.contains("libedgewise.so"))
        .find_map(|l| l.split_whitespace().last())
        .expect("Dockerfile: COPY libedgewise.so");

    let mut modules = BTreeMap::new();
    for entry in spec["dynamicModules"].as_sequence().into_iter().flatten() {
        let name = entry["name"].as_str().unwrap_or_default();
        assert_eq!(entry["source"]["type"], "Local", "{}: module {name}", proxy.at());
        let path = entry["source"]["local"]["path"].as_str().unwrap_or_default();
        assert_eq!(path, copied_to, "{}: module {name} is not where the Dockerfile puts libedgewise.so", proxy.at());
        // The module runs a background thread (polling, key refresh): it must never be unloaded.
        assert_eq!(entry["doNotClose"], true, "{}: module {name}", proxy.at());
        modules.insert(name.to_string(), entry.clone());
    }
    assert_eq!(spec["bootstrap"]["type"], "Merge", "{}", proxy.at());
    let bootstrap: Value = serde_yaml::from_str(spec["bootstrap"]["value"].as_str().unwrap_or_default()).unwrap();
    let clusters = to_json(&bootstrap["static_resources"]["clusters"]);
    let cluster_names: BTreeSet<&str> =
        clusters.as_array().into_iter().flatten().filter_map(|c| c["name"].as_str()).collect();

    // The policies.
    let mut configs: BTreeMap<(&str, String), (Json, String)> = BTreeMap::new();
    let mut checks: Vec<(String, String, Json)> = Vec::new(); // (config name, at, Envoy filter)
    let mut stale = Vec::new();
    for doc in docs.iter().filter(|d| d.kind() == "EnvoyExtensionPolicy") {
        let at = doc.at();
        let spec = &doc.value["spec"];
        let targets = spec["targetRefs"].as_sequence().cloned().unwrap_or_default();
        assert_eq!(targets.len(), 1, "{at}: one target");
        let target = &targets[0];
        assert_eq!(
            (target["group"].as_str(), target["kind"].as_str()),
            (Some("gateway.networking.k8s.io"), Some("Gateway")),
            "{at}: on the Gateway, so that no route of it escapes the filter"
        );
        let gateway_name = target["name"].as_str().unwrap_or_default();
        let gateway = find("Gateway", doc.namespace(), gateway_name)
            .unwrap_or_else(|| panic!("{at}: no Gateway {gateway_name} in its namespace"));
        assert_eq!(gateway.value["spec"]["gatewayClassName"], GATEWAY_CLASS, "{}", gateway.at());

        let native = spec["dynamicModule"].as_sequence().cloned().unwrap_or_default();
        let wasm = spec["wasm"].as_sequence().cloned().unwrap_or_default();
        assert_eq!(native.len() + wasm.len(), 1, "{at}: one filter per policy");
        let (mode, entry) = if native.is_empty() { ("wasm", &wasm[0]) } else { ("native", &native[0]) };
        let config = to_json(&entry["config"]);
        let filter = match mode {
            "native" => entry["filterName"].as_str().unwrap_or_default().to_string(),
            _ => {
                let url = entry["code"]["image"]["url"].as_str().unwrap_or_default();
                let filter = edgewise::oci::filter_of_url(url)
                    .unwrap_or_else(|| panic!("{at}: url {url:?} names no edgewise filter"));
                filter.to_string()
            }
        };
        assert!(NATIVE_FILTERS.contains(&filter.as_str()), "{at}: libedgewise.so has no filter {filter:?}");
        if let Some((_, why)) = NOT_FOR_ENVOY_GATEWAY.iter().find(|(n, _)| *n == filter) {
            panic!("{at}: {filter}: {why}");
        }

        // The filter's own parser, and what the configuration needs around the filter.
        let needs = parse(&filter, &config, &at);
        for cluster in &needs.callouts {
            assert!(
                cluster_names.contains(cluster.as_str()),
                "{at}: the filter calls out to cluster {cluster:?}, which {} does not define",
                proxy.at()
            );
        }
        for var in &needs.env {
            assert!(env.contains(var.as_str()), "{at}: the filter reads {var}, which {} does not set", proxy.at());
        }
        for (header, value) in &needs.routed {
            assert!(
                forwards(&docs, doc.namespace(), gateway_name, header, value),
                "{at}: no HTTPRoute on Gateway {gateway_name} forwards `{header}: {value}` and removes the header"
            );
        }

        // The filter as Envoy Gateway hands it to Envoy: the configuration as a JSON string.
        let configuration =
            json!({ "@type": "type.googleapis.com/google.protobuf.StringValue", "value": config.to_string() });
        let block = if mode == "native" {
            let module = entry["name"].as_str().unwrap_or_default();
            let registered = modules
                .get(module)
                .unwrap_or_else(|| panic!("{at}: module {module} is not in the allowlist of {}", proxy.at()));
            json!({
                "name": format!("envoy.filters.http.dynamic_modules/{module}"),
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
                    "dynamic_module_config": {
                        "module": { "local": { "filename": edgewise::filters_dir().join("libedgewise.so") } },
                        "do_not_close": registered["doNotClose"] == true,
                        "load_globally": registered["loadGlobally"] == true,
                    },
                    "filter_name": filter,
                    "filter_config": configuration,
                },
            })
        } else {
            let code = &entry["code"];
            assert_eq!(code["type"], "Image", "{at}: code.type");
            let url = code["image"]["url"].as_str().unwrap_or_default();
            assert!(
                !url.contains("://") && url.ends_with(&format!(":{version}")),
                "{at}: url {url} (registry/image:tag)"
            );
            let (digest, image_dir) = images.get(&filter).unwrap_or_else(|| panic!("{at}: no module {filter}"));
            let pinned = code["image"]["sha256"].as_str().unwrap_or_default();
            if format!("sha256:{pinned}") != *digest {
                stale.push(format!("{at}: sha256 {pinned}, the current image is {digest}"));
            }
            assert_eq!(entry["failOpen"], false, "{at}: failOpen (fail closed)");
            assert_eq!(entry["name"], filter.as_str(), "{at}: name");
            assert_eq!(entry["rootID"], filter.as_str(), "{at}: rootID, as in envoy/*.yaml");
            let host_keys: Vec<&str> =
                entry["env"]["hostKeys"].as_sequence().into_iter().flatten().filter_map(Value::as_str).collect();
            for var in &needs.env {
                assert!(host_keys.contains(&var.as_str()), "{at}: env.hostKeys must pass {var} into the VM");
            }
            // The module the pinned image holds, byte for byte.
            let module = work.path().join(format!("{filter}.wasm"));
            std::fs::write(&module, edgewise::oci::extract_wasm(image_dir).unwrap()).unwrap();
            json!({
                "name": format!("envoy.filters.http.wasm/{filter}"),
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                    "config": {
                        "name": filter,
                        "root_id": filter,
                        "failure_policy": "FAIL_CLOSED",
                        "vm_config": {
                            "vm_id": filter,
                            "runtime": "envoy.wasm.runtime.v8",
                            "code": { "local": { "filename": module } },
                            "environment_variables": { "host_env_keys": host_keys },
                        },
                        "configuration": configuration,
                    },
                },
            })
        };
        checks.push((filter.clone(), format!("{at}, as Envoy Gateway hands it to Envoy"), block));

        // The configuration it repeats.
        let from = doc.value["metadata"]["annotations"][CONFIG_FROM].as_str();
        let from = from.unwrap_or_else(|| panic!("{at}: annotation {CONFIG_FROM} (the shipped file it repeats)"));
        assert_eq!(config, shipped_config(from, &filter), "{at}: the configuration differs from the one in {from}");
        let previous =
            configs.insert((mode, filter.clone()), (config.clone(), format!("{}/{gateway_name}", doc.namespace())));
        assert!(previous.is_none(), "{at}: a second {mode} policy for {filter}");
    }

    assert!(stale.is_empty(), "stale pins, run `make oci-pin`:\n{}", stale.join("\n"));

    // Both builds of every filter that belongs here, with the same configuration on the same Gateway.
    for &filter in NATIVE_FILTERS {
        let native = configs.get(&("native", filter.to_string()));
        let wasm = configs.get(&("wasm", filter.to_string()));
        if NOT_FOR_ENVOY_GATEWAY.iter().any(|(n, _)| *n == filter) {
            assert!(native.is_none() && wasm.is_none());
            continue;
        }
        let native = native.unwrap_or_else(|| panic!("filter {filter} has no native policy under {DIR}"));
        let wasm = wasm.unwrap_or_else(|| panic!("filter {filter} has no wasm policy under {DIR}"));
        assert_eq!(native, wasm, "{filter}: the native and wasm policies differ (configuration or Gateway)");
    }

    // Envoy 1.40 takes each filter as Envoy Gateway passes it, with the callout clusters. The
    // configuration is named after the filter: `cloud-connector` gets its secret in the
    // environment (edgewise::envoy::shipped_env), as the container does from envoyproxy.yaml.
    for (name, at, filter) in checks {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { name, yaml: envoy_yaml(filter, &clusters) };
        if let Err(e) = envoy::validate(&config, dir.path()) {
            panic!("{at}: {e:#}");
        }
    }
}

/// `edgewise::oci::pin` (what `make oci-pin` runs) keeps the pins of this directory too: from
/// blanked digests it writes back exactly the files as committed.
#[test]
fn pinning_restores_the_digests_and_touches_nothing_else() {
    let work = tempfile::tempdir().unwrap();
    let digests: BTreeMap<String, String> =
        digests(&work.path().join("oci")).into_iter().map(|(name, (digest, _))| (name, digest)).collect();
    let copy = work.path().join("envoy-gateway");
    std::fs::create_dir(&copy).unwrap();
    let mut committed = BTreeMap::new();
    for path in yaml_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        let blank: String = text
            .lines()
            .map(|l| match l.trim_start().strip_prefix("sha256: ") {
                Some(hex) => l.replace(hex, &"0".repeat(64)),
                None => l.to_string(),
            })
            .map(|l| l + "\n")
            .collect();
        let name = path.file_name().unwrap().to_owned();
        std::fs::write(copy.join(&name), blank).unwrap();
        committed.insert(name, text);
    }
    let changed = edgewise::oci::pin(&copy, &digests).unwrap();
    assert!(changed.iter().any(|p| p.ends_with("wasm.yaml")), "{changed:?}");
    let module = edgewise::oci::file_sha256(&edgewise::filters_dir().join(edgewise::oci::MODULE)).unwrap();
    let changed = edgewise::oci::pin_module(&copy, &module, env!("CARGO_PKG_VERSION")).unwrap();
    assert_eq!(changed, [copy.join(REMOTE_PROXY)]);
    for (name, text) in committed {
        let pinned = std::fs::read_to_string(copy.join(&name)).unwrap();
        assert!(
            pinned == text,
            "{name:?}: pinning does not give back the committed file (stale sha256? run `make oci-pin`)"
        );
    }
}

/// envoyproxy-remote.yaml is envoyproxy.yaml with the official Envoy image (the one the
/// Dockerfile builds on) and libedgewise.so by URL, pinned to this build; and Envoy 1.40 loads
/// every native policy's filter with the module fetched as Envoy Gateway asks for it
/// (`module.remote`: the URL, the sha256), from a download service on loopback.
#[tokio::test(flavor = "multi_thread")]
async fn the_remote_envoyproxy_fetches_this_build_and_envoy_loads_every_native_policy_with_it() {
    let version = env!("CARGO_PKG_VERSION");
    let dir = edgewise::repo_root().join(DIR);
    let (local, remote) = (docs_of(&dir.join("envoyproxy.yaml")), docs_of(&dir.join(REMOTE_PROXY)));
    let kinds = |docs: &[Doc]| docs.iter().map(|d| (d.kind().to_string(), d.name().to_string())).collect::<Vec<_>>();
    assert_eq!(kinds(&remote), kinds(&local), "{REMOTE_PROXY}: the same objects as envoyproxy.yaml");
    for doc in &remote {
        let api = KINDS.iter().find(|(k, _)| *k == doc.kind()).map(|(_, v)| *v);
        assert_eq!(doc.value["apiVersion"], api.unwrap_or("?"), "{}", doc.at());
    }
    let of = |docs: &[Doc], kind: &str| docs.iter().find(|d| d.kind() == kind).unwrap().value.clone();
    assert_eq!(of(&remote, "GatewayClass"), of(&local, "GatewayClass"));
    let (mut local_proxy, mut proxy) = (of(&local, "EnvoyProxy"), of(&remote, "EnvoyProxy"));

    // The official image the custom one is built on.
    let container = &proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"];
    let dockerfile = std::fs::read_to_string(dir.join("Dockerfile")).unwrap();
    let base = dockerfile.lines().find_map(|l| l.strip_prefix("ARG ENVOY_IMAGE=")).unwrap();
    assert_eq!(container["image"], base, "{REMOTE_PROXY}: the image");

    // The module by URL, pinned to this build.
    let modules = proxy["spec"]["dynamicModules"].as_sequence().unwrap().clone();
    let local_modules = local_proxy["spec"]["dynamicModules"].as_sequence().unwrap().clone();
    assert_eq!(modules.len(), 1);
    assert_eq!(local_modules.len(), 1);
    let (module, local_module) = (&modules[0], &local_modules[0]);
    for key in ["name", "doNotClose", "loadGlobally"] {
        assert_eq!(module[key], local_module[key], "{REMOTE_PROXY}: module {key}");
    }
    assert_eq!(module["source"]["type"], "Remote");
    let url = module["source"]["remote"]["url"].as_str().unwrap();
    assert!(
        url.starts_with("https://")
            && url.ends_with(&format!("/edgewise/{version}/native/linux-x86_64/libedgewise.so")),
        "{REMOTE_PROXY}: url {url} (the dist layout of version {version}; `make oci-pin` writes it)"
    );
    let so = edgewise::filters_dir().join(edgewise::oci::MODULE);
    let sha256 = edgewise::oci::file_sha256(&so).unwrap();
    assert_eq!(
        module["source"]["remote"]["sha256"],
        sha256.as_str(),
        "{REMOTE_PROXY}: stale sha256, run `make oci-pin`"
    );

    // Nothing else differs.
    for p in [&mut proxy, &mut local_proxy] {
        let container = &mut p["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"];
        container.as_mapping_mut().unwrap().remove("image");
        p["spec"]["dynamicModules"][0].as_mapping_mut().unwrap().remove("source");
    }
    assert!(proxy == local_proxy, "{REMOTE_PROXY} differs from envoyproxy.yaml beyond the image and the module source");

    // Envoy loads each native policy's filter with the module fetched by URL. The bootstrap's
    // callout clusters point at loopback here (their hosts do not resolve in tests).
    let bytes = bytes::Bytes::from(std::fs::read(&so).unwrap());
    let handler = std::sync::Arc::new(move |_: &edgewise::server::Seen| edgewise::server::Answer {
        status: 200,
        headers: vec![],
        body: bytes.clone(),
        trailers: vec![],
    });
    let downloads = edgewise::server::Server::start("downloads", Default::default(), handler).await.unwrap();
    let bootstrap: Value = serde_yaml::from_str(proxy["spec"]["bootstrap"]["value"].as_str().unwrap()).unwrap();
    let mut clusters = to_json(&bootstrap["static_resources"]["clusters"]);
    for cluster in clusters.as_array_mut().unwrap() {
        for endpoint in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"].as_array_mut().unwrap() {
            endpoint["endpoint"]["address"]["socket_address"]["address"] = json!("127.0.0.1");
        }
    }
    clusters.as_array_mut().unwrap().push(json!({
        "name": "edgewise_modules", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": { "cluster_name": "edgewise_modules", "endpoints": [{ "lb_endpoints": [{ "endpoint": {
            "address": { "socket_address": { "address": "127.0.0.1", "port_value": downloads.port() } } } }] }] },
    }));
    let path = url.split_once("://").and_then(|(_, rest)| rest.split_once('/')).map(|(_, p)| p).unwrap();
    let mut loaded = BTreeSet::new();
    for doc in manifests().iter().filter(|d| d.kind() == "EnvoyExtensionPolicy") {
        let Some(entry) = doc.value["spec"]["dynamicModule"].as_sequence().and_then(|s| s.first()) else { continue };
        let filter = entry["filterName"].as_str().unwrap().to_string();
        let block = json!({
            "name": format!("envoy.filters.http.dynamic_modules/{}", entry["name"].as_str().unwrap()),
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
                "dynamic_module_config": {
                    "module": { "remote": {
                        "http_uri": {
                            "uri": format!("http://127.0.0.1:{}/{path}", downloads.port()),
                            "cluster": "edgewise_modules",
                            "timeout": "10s",
                        },
                        "sha256": module["source"]["remote"]["sha256"].as_str().unwrap(),
                    } },
                    "do_not_close": module["doNotClose"] == true,
                    "load_globally": module["loadGlobally"] == true,
                },
                "filter_name": filter,
                "filter_config": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": to_json(&entry["config"]).to_string(),
                },
            },
        });
        let mut bootstrap: Json = serde_json::from_str(&envoy_yaml(block, &clusters)).unwrap();
        bootstrap["admin"] = json!({ "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } });
        let config = Config { name: filter.clone(), yaml: serde_yaml::to_string(&bootstrap).unwrap() };
        let cache = tempfile::tempdir().unwrap();
        let options = edgewise::envoy::Options {
            env: vec![("TMPDIR".into(), cache.path().display().to_string())],
            ..Default::default()
        };
        let envoy = edgewise::envoy::Envoy::start_with(&config, options).await.unwrap();
        let log = envoy.log();
        let at = doc.at();
        assert!(log.contains("Dynamic module ABI version v0.2.0 matched."), "{at}: {}", envoy.log_tail());
        for failure in
            ["Remote dynamic module fetch returned empty data", "Failed to create filter config from remote module"]
        {
            assert!(!log.contains(failure), "{at}: {}", envoy.log_tail());
        }
        loaded.insert(filter);
    }
    assert_eq!(loaded.len(), 4, "{loaded:?}");
    assert_eq!(downloads.count(), 4, "one download per Envoy");
}
