//! `make bench` itself: it builds every binary it starts, every configuration it measures is one
//! Envoy accepts, and the stock chain it judges cloud-connector against does the same job (a
//! reference that let everything through would cost less and prove nothing).

use std::process::Command;

use edgewise::bench::{benches, edits_module, front_config, stock_chain, Bench, Ports, Tokens, CC_HOST, ISSUER};
use edgewise::client::{Client, Request};
use edgewise::envoy::{Envoy, Options};
use edgewise::idp::Idp;
use edgewise::server::{Document, Listen, Server};

/// The binaries the bench programs start beside themselves (`current_exe()?.with_file_name(..)`).
fn started_binaries() -> Vec<String> {
    let mut found = Vec::new();
    let dir = edgewise::repo_root().join("src");
    let mut stack = vec![dir];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for rest in text.split("current_exe()?.with_file_name(\"").skip(1) {
                    found.push(rest.split('"').next().unwrap_or_default().to_string());
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

#[test]
fn make_bench_builds_every_binary_it_starts_before_running_any() {
    let out = Command::new("make")
        .args(["-n", "bench"])
        .current_dir(edgewise::repo_root())
        .output()
        .expect("running make -n bench");
    assert!(out.status.success(), "make -n bench: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let build = lines
        .iter()
        .position(|l| l.contains("cargo build") && l.contains("--release") && l.contains("--bins"))
        .unwrap_or_else(|| panic!("make bench builds no release binaries:\n{text}"));
    let runs: Vec<usize> = lines.iter().enumerate().filter(|(_, l)| l.contains("cargo run")).map(|(i, _)| i).collect();
    assert!(!runs.is_empty(), "make bench runs nothing:\n{text}");
    assert!(runs.iter().all(|&i| i > build), "a bench program runs before the build:\n{text}");
    for needed in [
        "edgewise-bench",
        "edgewise-instructions",
        "edgewise-scale",
        "edgewise-fleet",
        "edgewise-ha",
        "edgewise-domains",
    ] {
        assert!(text.contains(&format!("--bin {needed}")), "make bench does not run {needed}:\n{text}");
    }
    // What they start beside themselves is a binary of this package, which `--bins` builds.
    let started = started_binaries();
    assert!(started.contains(&"edgewise-ratelimit".to_string()), "{started:?}");
    for name in started {
        let source = edgewise::repo_root().join(format!("src/bin/{name}.rs"));
        assert!(source.exists(), "{name} is started by a bench program but is no binary of this package");
    }
}

#[test]
fn every_configuration_the_bench_measures_is_one_envoy_accepts() {
    let idp = Idp::rs256(ISSUER, "bench-1").unwrap();
    let jwks = serde_json::json!({ "keys": [idp.jwk()] }).to_string();
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports { upstream: 1, management: 2, issuer: 3, ratelimit: 4 };
    let all = benches(&jwks, &edgewise::noop_module());
    assert!(all.iter().any(|b| b.name == "stock-chain") && all.iter().any(|b| b.name == "noop-module"));
    for bench in &all {
        if let Err(e) = edgewise::envoy::validate(&front_config(bench, ports), dir.path()) {
            panic!("{}: {e}", bench.name);
        }
    }
}

#[test]
fn the_edits_module_refuses_an_edit_it_does_not_know() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports { upstream: 1, management: 2, issuer: 3, ratelimit: 4 };
    let bench = |edits: &[&str]| Bench {
        name: "edits",
        what: "",
        host: CC_HOST,
        path: "/",
        filters: edits_module(&edgewise::noop_module(), edits),
        tokens: Tokens::None,
    };
    let valid = |edits: &[&str]| edgewise::envoy::validate(&front_config(&bench(edits), ports), dir.path());
    valid(&["set x-a one two", "remove x-b", "state k v", "reroute"]).expect("every kind of edit");
    for wrong in [&["sets x-a 1"][..], &["remove"], &["reroute now"], &["state k"]] {
        assert!(valid(wrong).is_err(), "{wrong:?} was accepted");
    }
}

#[tokio::test]
async fn the_stock_chain_checks_the_token_and_the_scope_and_sets_the_identity() {
    edgewise::init_crypto();
    let idp = Idp::rs256(ISSUER, "bench-1").unwrap();
    let jwks = serde_json::json!({ "keys": [idp.jwk()] }).to_string();
    let upstream = Server::echo("upstream", Listen::default()).await.unwrap();
    let bench = Bench {
        name: "stock-chain",
        what: "",
        host: CC_HOST,
        path: "/",
        filters: stock_chain(&jwks),
        tokens: Tokens::One,
    };
    let ports = Ports { upstream: upstream.port(), management: 1, issuer: 1, ratelimit: 1 };
    let envoy = Envoy::start_with(&front_config(&bench, ports), Options::default()).await.unwrap();
    let addr = envoy.listener("bench").await.unwrap();
    let client = Client::plain();
    let token = |scopes: &[&str]| {
        idp.token(serde_json::json!({
            "aud": "gitlab-ai-gateway", "sub": "instance-7", "gitlab_realm": "saas",
            "scopes": scopes, "exp": edgewise::idp::now() + 600,
        }))
    };
    let send = |bearer: Option<String>| {
        let client = &client;
        async move {
            let value = bearer.map(|t| format!("Bearer {t}"));
            let mut request = Request::get(CC_HOST, "/").header("x-gitlab-instance-id", "spoofed");
            if let Some(value) = &value {
                request = request.header("authorization", value);
            }
            client.send(addr, request).await.unwrap().status
        }
    };
    assert_eq!(send(Some(token(&["code_suggestions", "duo_chat"]))).await, 200);
    let seen = upstream.seen();
    let seen = seen.last().expect("the upstream saw the allowed request");
    assert_eq!(seen.header("x-gitlab-instance-id"), Some("instance-7"), "the identity replaces what the client sent");
    assert_eq!(seen.header("x-gitlab-realm"), Some("saas"));
    assert_eq!(seen.header("x-gitlab-token-issuer"), Some(ISSUER));
    assert_eq!(seen.header("x-gitlab-feature"), Some("code_suggestions"));
    assert_eq!(send(Some(token(&["duo_chat"]))).await, 403, "a token without the feature's scope is refused");
    assert_eq!(send(None).await, 401, "no token is refused");
    assert_eq!(send(Some("not.a.token".into())).await, 401, "a malformed token is refused");
    assert_eq!(upstream.count(), 1, "only the allowed request reached the upstream");
}

/// The floors edgewise-instructions reads the lean cached-token target against make the edits
/// cloud-connector makes there and no other: the backend sees the same gateway headers from the
/// module as from the filter, including the route matched again (its request_headers_to_remove
/// takes x-edgewise-feature away); without `reroute` the route is not matched again, and
/// identity-edits sets the same four identity headers and nothing else.
#[tokio::test]
async fn the_lean_edits_floor_makes_the_edits_the_lean_filter_makes() {
    edgewise::init_crypto();
    let idp = Idp::rs256(ISSUER, "bench-1").unwrap();
    let jwks = serde_json::json!({ "keys": [idp.jwk()] }).to_string();
    let token = idp.token(serde_json::json!({
        "aud": "gitlab-ai-gateway", "sub": "instance-0-0", "gitlab_realm": "saas",
        "scopes": ["code_suggestions", "duo_chat"], "exp": edgewise::idp::now() + 600,
    }));
    let upstream = Server::echo("upstream", Listen::default()).await.unwrap();
    let issuer = Server::start("issuer", Listen::default(), Document::new(jwks.clone()).handler()).await.unwrap();
    let ports = Ports { upstream: upstream.port(), management: 1, issuer: issuer.port(), ratelimit: 1 };
    let all = benches(&jwks, &edgewise::noop_module());
    let bearer = format!("Bearer {token}");
    let mut forwarded = Vec::new();
    for name in ["cc-hit-lean-native", "cc-lean-edits-reroute", "cc-lean-edits", "identity-edits"] {
        let bench = all.iter().find(|b| b.name == name).expect("a bench configuration");
        let envoy = Envoy::start_with(&front_config(bench, ports), Options::default()).await.unwrap();
        let addr = envoy.listener("bench").await.unwrap();
        let request = Request::get(CC_HOST, "/")
            .header("authorization", &bearer)
            .header("x-edgewise-signature", "forged")
            .header("x-edgewise-feature", "forged");
        let answer = Client::plain().send(addr, request).await.unwrap();
        assert_eq!(answer.status, 200, "{name}: {}", answer.text());
        let seen = upstream.seen().pop().expect("the upstream saw the request");
        let mut gateway: Vec<(String, String)> = seen
            .headers
            .into_iter()
            .filter(|(k, _)| k.starts_with("x-gitlab-") || k.starts_with("x-edgewise-"))
            .collect();
        gateway.sort();
        forwarded.push(gateway);
    }
    let [lean, floor, no_reroute, identity] = &forwarded[..] else { unreachable!() };
    assert_eq!(floor, lean, "the floor makes what the filter makes");
    assert!(lean.iter().any(|(k, v)| k == "x-gitlab-instance-id" && v == "instance-0-0"), "{lean:?}");
    assert!(!lean.iter().any(|(k, _)| k == "x-edgewise-signature" || k == "x-edgewise-feature"), "{lean:?}");
    let kept: Vec<_> = no_reroute.iter().filter(|h| !floor.contains(h)).collect();
    assert_eq!(kept, [&("x-edgewise-feature".to_string(), "forged".to_string())], "without the route matched again");
    let lean_identity: Vec<_> = lean.iter().filter(|(k, _)| k.starts_with("x-gitlab-")).cloned().collect();
    let forged: Vec<_> = identity.iter().filter(|(k, _)| k.starts_with("x-edgewise-")).collect();
    assert_eq!(identity.len() - forged.len(), 4, "{identity:?}");
    assert!(identity.iter().filter(|(k, _)| k.starts_with("x-gitlab-")).eq(lean_identity.iter()), "{identity:?}");
}

/// The floors edgewise-fleet reads the service's CPU per change against count the CPU of the
/// writes they make: fifty connections' writes cost more than one's (a clock that stood still
/// while the thread ran, as a running thread's schedstat does between ticks, reads 0 for both),
/// every byte written arrives, and a synced page costs something.
#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_floors_count_the_cpu_of_the_writes_they_make() {
    use std::time::Duration;
    let one = edgewise::watchers::send_floor(1, 224, 20, Duration::from_millis(5)).await.unwrap();
    let fifty = edgewise::watchers::send_floor(50, 224, 20, Duration::from_millis(5)).await.unwrap();
    assert!(one > 0.0 && fifty > 5.0 * one, "one connection {one:.1} µs, fifty {fifty:.1} µs a round");
    let dir = tempfile::tempdir().unwrap();
    let sync = edgewise::scale::sync_floor(dir.path(), 20).unwrap();
    assert!(sync > 0.0, "a synced page: {sync} µs");
}
