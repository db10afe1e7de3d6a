//! The Kubernetes manifests under deploy/ cannot run here; this keeps them honest: every file
//! parses, every object names its kind, every file a kustomization lists exists, and each Envoy
//! configuration shipped there passes `envoy --mode validate` with the freshly built modules.

use std::fs;
use std::path::{Path, PathBuf};

use edgewise::envoy::{self, Config};
use serde::Deserialize;

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[test]
fn every_manifest_parses_and_names_its_kind() {
    let deploy = edgewise::repo_root().join("deploy");
    let files = yaml_files(&deploy);
    assert!(files.iter().any(|f| f.ends_with("egress/deployment.yaml")), "{files:?}");
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name == "envoy.yaml" {
                assert!(value.get("static_resources").is_some(), "{}", file.display());
                continue;
            }
            if name.starts_with("sds-") {
                assert!(value["resources"].as_sequence().is_some_and(|r| !r.is_empty()), "{}", file.display());
                continue;
            }
            for key in ["apiVersion", "kind"] {
                assert!(value.get(key).and_then(|v| v.as_str()).is_some(), "{}: no {key}", file.display());
            }
            if value["kind"] == "Kustomization" {
                let dir = file.parent().unwrap();
                let mut listed: Vec<String> = Vec::new();
                for r in value["resources"].as_sequence().into_iter().flatten() {
                    listed.push(r.as_str().unwrap().to_string());
                }
                for g in value["configMapGenerator"].as_sequence().into_iter().flatten() {
                    for f in g["files"].as_sequence().into_iter().flatten() {
                        listed.push(f.as_str().unwrap().to_string());
                    }
                }
                for l in listed {
                    assert!(dir.join(&l).is_file(), "{} lists {l}, which does not exist", file.display());
                }
            } else {
                assert!(value["metadata"]["name"].as_str().is_some(), "{}: no metadata.name", file.display());
            }
        }
    }
}

#[test]
fn the_production_egress_config_validates_and_allows_nothing_private() {
    let path = edgewise::repo_root().join("deploy/egress/envoy.yaml");
    let yaml = fs::read_to_string(&path).unwrap();
    assert!(!yaml.contains("\"allow_private\""), "production must not exempt destinations from the SSRF guard");
    assert!(yaml.contains("/etc/ssl/certs/ca-certificates.crt"));
    let dir = tempfile::tempdir().unwrap();
    let config = Config { name: "deploy-egress".into(), yaml }
        .replace("/etc/edgewise/wasm/", &format!("{}/", edgewise::filters_dir().display()));
    if let Err(e) = envoy::validate(&config, dir.path()) {
        panic!("{e:#}");
    }
}

#[test]
fn the_tunnel_agent_config_validates_and_only_dials_out() {
    let dir = edgewise::repo_root().join("deploy/tunnel-agent");
    let yaml = fs::read_to_string(dir.join("envoy.yaml")).unwrap();
    // One listener, and it is the reverse-connection one: no inbound socket but the admin.
    let value: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
    let listeners = value["static_resources"]["listeners"].as_sequence().unwrap();
    assert_eq!(listeners.len(), 1);
    assert!(listeners[0]["address"]["socket_address"]["address"].as_str().unwrap().starts_with("rc://"));
    assert_eq!(value["admin"]["address"]["socket_address"]["address"], "127.0.0.1");
    // The SDS files it names come from the same ConfigMap: validate with copies of them.
    let tmp = tempfile::tempdir().unwrap();
    let mut config = Config { name: "deploy-tunnel-agent".into(), yaml };
    for sds in ["sds-agent.yaml", "sds-hub-ca.yaml"] {
        fs::copy(dir.join(sds), tmp.path().join(sds)).unwrap();
        let to = tmp.path().join(sds).display().to_string();
        config = config.replace(&format!("/etc/edgewise/envoy/{sds}"), &to);
    }
    if let Err(e) = envoy::validate(&config, tmp.path()) {
        panic!("{e:#}");
    }
}

/// A container's ports: name -> number.
fn container_ports(container: &serde_yaml::Value) -> std::collections::BTreeMap<&str, u64> {
    let ports = container["ports"].as_sequence().unwrap().iter();
    ports.map(|p| (p["name"].as_str().unwrap(), p["containerPort"].as_u64().unwrap())).collect()
}

/// deploy/ratelimit: the limits file is one the service accepts, the Deployment runs it with
/// that file on the ports its probes and the Service use, and the gateways' rate_limit_service
/// cluster (envoy/cloud-connector.yaml) is on the Service's gRPC port.
#[test]
fn the_ratelimit_deployment_runs_the_shipped_limits_on_the_gateways_port() {
    let dir = edgewise::repo_root().join("deploy/ratelimit");
    let limits = fs::read(dir.join("limits.json")).unwrap();
    let config = edgewise_ratelimit::Config::parse(&limits).unwrap();
    assert_eq!(config.domain, "cloud-connector");
    assert!(config.limits.contains_key("code_suggestions"));

    let yaml = |name: &str| -> serde_yaml::Value {
        serde_yaml::from_str(&fs::read_to_string(dir.join(name)).unwrap()).unwrap()
    };
    let deployment = yaml("deployment.yaml");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let arg = |flag: &str| args.iter().position(|a| *a == flag).map(|i| args[i + 1]).unwrap();
    let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert_eq!(arg("--config"), format!("{mount}/limits.json"));
    let ports = container_ports(container);
    assert_eq!(arg("--grpc"), format!("0.0.0.0:{}", ports["grpc"]));
    assert_eq!(arg("--http"), format!("0.0.0.0:{}", ports["http"]));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["env"][0]["name"], "REDIS_URL");

    let service = yaml("service.yaml");
    let grpc = service["spec"]["ports"].as_sequence().unwrap().iter().find(|p| p["name"] == "grpc").unwrap();
    assert_eq!(grpc["targetPort"], "grpc");
    let gateway = fs::read_to_string(edgewise::repo_root().join("envoy/cloud-connector.yaml")).unwrap();
    let cluster = gateway.split("- name: rate_limit_service").nth(1).unwrap();
    assert!(
        cluster.contains(&format!("port_value: {}", grpc["port"].as_u64().unwrap())),
        "the gateway's rate_limit_service port"
    );
}

/// deploy/control: the StatefulSet's arguments are ones edgewise-control accepts (mutual TLS on
/// xDS included), with its store on the volume and its files on the mounted Secrets, on the
/// ports its probes and the Service use, which are the ports envoy/serverless-xds.yaml names.
#[test]
fn the_control_statefulset_runs_edgewise_control_with_its_store_on_the_volume() {
    let dir = edgewise::repo_root().join("deploy/control");
    let yaml = |name: &str| -> serde_yaml::Value {
        serde_yaml::from_str(&fs::read_to_string(dir.join(name)).unwrap()).unwrap()
    };
    let set = yaml("statefulset.yaml");
    let pod = &set["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<String> =
        container["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    // The binary's own parser takes them (it needs the token from the environment).
    let env = container["env"].as_sequence().unwrap();
    assert!(env.iter().any(|e| e["name"] == edgewise_control::TOKEN_ENV), "the token comes from a Secret");
    std::env::set_var(edgewise_control::TOKEN_ENV, "a-token-long-enough-for-the-parser");
    let options = edgewise_control::Options::from_args(args.clone()).unwrap();
    assert!(options.tls.is_some(), "xDS carries the platform's private key: mutual TLS");

    let mounts: Vec<&str> =
        container["volumeMounts"].as_sequence().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap()).collect();
    let under_a_mount = |p: &std::path::Path| mounts.iter().any(|m| p.starts_with(m));
    let edgewise_control::StoreOption::Sqlite(db) = &options.store else { panic!("the StatefulSet runs on SQLite") };
    assert!(under_a_mount(db), "{db:?} is not on a volume");
    assert_eq!(set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"], "data");
    for file in [&options.client_cert, &options.client_key].into_iter().chain(options.tls.iter().flatten()) {
        assert!(under_a_mount(file), "{file:?} is not on a mounted Secret");
    }
    let ports = container_ports(container);
    assert_eq!(options.grpc.port() as u64, ports["grpc"]);
    assert_eq!(options.http.port() as u64, ports["http"]);
    assert_eq!(options.routes.port() as u64, ports["routes"]);
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");

    let service = yaml("service.yaml");
    let envoy = fs::read_to_string(edgewise::repo_root().join("envoy/serverless-xds.yaml")).unwrap();
    // The Envoys' clusters name the Service's xDS and route ports; the admin port is not theirs.
    for (port, cluster) in [("grpc", "- name: xds\n"), ("routes", "- name: control\n")] {
        let p = service["spec"]["ports"].as_sequence().unwrap().iter().find(|p| p["name"] == port).unwrap();
        assert_eq!(p["targetPort"], port);
        let section = envoy.split(cluster).nth(1).unwrap();
        let section = section.split("\n  - name:").next().unwrap();
        assert!(section.contains(&format!("port_value: {}", p["port"].as_u64().unwrap())), "{cluster}'s port");
    }
}

/// deploy/control/ha: three replicas on etcd, one per node, at most one down at a time, with
/// mutual TLS to etcd from a mounted Secret; the same ports and probes as the StatefulSet, and a
/// headless Service (the Envoys' STRICT_DNS clusters must see every replica).
#[test]
fn the_control_deployment_runs_three_replicas_on_etcd_one_per_node() {
    let dir = edgewise::repo_root().join("deploy/control/ha");
    let yaml = |name: &str| -> serde_yaml::Value {
        serde_yaml::from_str(&fs::read_to_string(dir.join(name)).unwrap()).unwrap()
    };
    let deployment = yaml("deployment.yaml");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pod = &deployment["spec"]["template"]["spec"];
    let anti = &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(anti["labelSelector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"]);
    assert!(pod["volumes"].as_sequence().unwrap().iter().all(|v| v.get("persistentVolumeClaim").is_none()));

    let container = &pod["containers"][0];
    let env = container["env"].as_sequence().unwrap();
    let endpoints = env.iter().find(|e| e["name"] == "ETCD_ENDPOINTS").expect("the endpoints from the Secret");
    assert_eq!(endpoints["valueFrom"]["secretKeyRef"]["name"], "edgewise-control-etcd");
    // Kubernetes expands $(ETCD_ENDPOINTS) in the arguments; the binary's own parser takes them.
    let args: Vec<String> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().replace("$(ETCD_ENDPOINTS)", "https://etcd-0.etcd:2379,https://etcd-1.etcd:2379"))
        .collect();
    std::env::set_var(edgewise_control::TOKEN_ENV, "a-token-long-enough-for-the-parser");
    let options = edgewise_control::Options::from_args(args).unwrap();
    let edgewise_control::StoreOption::Etcd(etcd) = &options.store else { panic!("the Deployment runs on etcd") };
    assert_eq!(etcd.endpoints.len(), 2);
    assert!(etcd.ca.is_some() && etcd.identity.is_some(), "mutual TLS to etcd");
    let mounts: Vec<&str> =
        container["volumeMounts"].as_sequence().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap()).collect();
    let (cert, key) = etcd.identity.clone().unwrap();
    for file in [etcd.ca.clone().unwrap(), cert, key, options.client_cert.clone(), options.client_key.clone()] {
        assert!(mounts.iter().any(|m| file.starts_with(m)), "{file:?} is not on a mounted Secret");
    }
    let secrets: Vec<&str> =
        pod["volumes"].as_sequence().unwrap().iter().filter_map(|v| v["secret"]["secretName"].as_str()).collect();
    assert!(secrets.contains(&"edgewise-control-etcd"), "{secrets:?}");

    // The same ports and probes as the one-replica StatefulSet.
    let set: serde_yaml::Value =
        serde_yaml::from_str(&fs::read_to_string(dir.join("../statefulset.yaml")).unwrap()).unwrap();
    let single = &set["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container_ports(container), container_ports(single));
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(container[probe], single[probe], "{probe}");
    }

    let pdb = yaml("pdb.yaml");
    assert_eq!(pdb["spec"]["minAvailable"], 2);
    assert_eq!(pdb["spec"]["selector"], deployment["spec"]["selector"]);
    let service = yaml("service.yaml");
    assert_eq!(service["spec"]["clusterIP"], "None", "headless: every replica resolves");
    let ports = |s: &serde_yaml::Value| s["spec"]["ports"].clone();
    let single_service: serde_yaml::Value =
        serde_yaml::from_str(&fs::read_to_string(dir.join("../service.yaml")).unwrap()).unwrap();
    assert_eq!(ports(&service), ports(&single_service));
}
