//! libedgewise.so fetched by URL: envoy/native/mesh-gateway-remote.yaml on real Envoy, the module
//! served over HTTPS by a stand-in on loopback (a certificate for downloads.example.com from a
//! test CA), each Envoy with a module cache ($TMPDIR) of its own.
//!
//! What Envoy 1.40 does, measured here and written down in docs/deploying.md: it fetches the
//! module before it serves (and retries by the file's policy); it loads a cached module without
//! fetching, and fetches again when the cached file is not the pinned one; a wrong sha256, an
//! unreachable URL or a configuration the filter refuses leave the filter out of the chain
//! without stopping Envoy, which would then forward requests unfiltered (tested without the
//! guard); with the guard of the shipped file, every such request is refused with a 503.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgewise::certs::{self, Ca, LeafSpec};
use edgewise::client::{Client, Request};
use edgewise::envoy::{self, Config, Envoy, Options};
use edgewise::scenarios::mesh::{ports, Pki};
use edgewise::server::{Answer, Listen, Seen, Server};
use serde_yaml::Value;
use sha2::{Digest, Sha256};

const FILE: &str = "envoy/native/mesh-gateway-remote.yaml";
const NATIVE: &str = "envoy/native/mesh-gateway.yaml";
const MODULE_HOST: &str = "downloads.example.com";
const FILTER: &str = "mesh-identity";
const PENDING: &str = "x-edgewise-pending-mesh-identity";
const FETCH_FAILED: &str = "Remote dynamic module fetch returned empty data; module will not be loaded";
const FETCH_ERRORS: &str = "dynamic_modules.remote_fetch_error.config_name.mesh-identity.guarded";
const GUARD_DENIED: &str = "http.gateway.rbac.edgewise_guard.denied";
const GUARD_ALLOWED: &str = "http.gateway.rbac.edgewise_guard.allowed";

/// The two blocks of the shipped file that make a missing filter fail closed (their first line,
/// and the first line after them).
const GUARD_BLOCKS: &[(&str, &str)] = &[
    ("          # Marks every request as not yet seen", "          - name: edgewise.mesh_identity"),
    ("          # Refuses a request the filter did not see", "          - name: envoy.filters.http.router"),
];

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn module() -> Vec<u8> {
    let path = edgewise::filters_dir().join("libedgewise.so");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn shipped() -> String {
    std::fs::read_to_string(edgewise::repo_root().join(FILE)).unwrap()
}

/// The value of the first `key: value` line of the shipped file.
fn field(yaml: &str, key: &str) -> String {
    let value = yaml.lines().find_map(|l| l.trim().strip_prefix(key)).unwrap_or_else(|| panic!("{FILE}: no {key}"));
    value.trim().to_string()
}

/// The download service: `libedgewise.so` (or whatever `body` is) over HTTPS, after `delay`,
/// answering 503 to the first `failures` requests.
struct Downloads {
    server: Server,
    ca_file: PathBuf,
}

impl Downloads {
    async fn start(dir: &Path, body: Vec<u8>, failures: usize, delay: Duration) -> Downloads {
        let ca = Ca::new("downloads test CA").unwrap();
        let ca_file = certs::write_pem(dir, "downloads-ca.pem", &ca.pem).unwrap();
        let tls = edgewise::tls::server(&ca.issue(&LeafSpec::server(&[MODULE_HOST])).unwrap(), &[], &["http/1.1"]);
        let body = Bytes::from(body);
        let served = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(move |_: &Seen| {
            std::thread::sleep(delay);
            if served.fetch_add(1, Ordering::SeqCst) < failures {
                return Answer::json(503, r#"{"error":"restarting"}"#);
            }
            Answer {
                status: 200,
                headers: vec![("content-type".into(), "application/octet-stream".into())],
                body: body.clone(),
                trailers: vec![],
            }
        });
        let listen = Listen { tls: Some(tls.unwrap()), ..Listen::default() };
        let server = Server::start("downloads", listen, handler).await.unwrap();
        Downloads { server, ca_file }
    }

    fn fetches(&self) -> usize {
        self.server.seen().iter().filter(|s| s.method == "GET" && s.path.ends_with("/libedgewise.so")).count()
    }
}

/// How a test runs the shipped file.
struct Run {
    /// The sha256 the configuration pins.
    sha256: String,
    /// Where the module cluster points (the download service, or a closed port).
    port: u16,
    ca_file: PathBuf,
    /// Retries fast: (num_retries, base_interval).
    retries: Option<(u32, &'static str)>,
    /// The guard blocks left in (as shipped) or cut out.
    guard: bool,
    /// Extra substitutions.
    replace: Vec<(&'static str, &'static str)>,
}

impl Downloads {
    /// A run fetching `module`'s sha256 from this service, as shipped: guarded, no fast retries.
    fn run(&self, module: &[u8]) -> Run {
        Run {
            sha256: sha256_hex(module),
            port: self.server.port(),
            ca_file: self.ca_file.clone(),
            retries: None,
            guard: true,
            replace: vec![],
        }
    }
}

struct Gateway {
    envoy: Envoy,
    front: SocketAddr,
    started_in: Duration,
}

/// The mesh gateway with its catalog: the non-meshed endpoint is the workload; the meshed one is a
/// closed port, so that every request ends at the workload (the route retries on the other host).
struct Setup {
    run: tempfile::TempDir,
    pki: Pki,
    workload: Server,
    meshed: u16,
}

impl Setup {
    async fn new() -> Setup {
        let run = tempfile::tempdir().unwrap();
        let pki = Pki::install(run.path()).unwrap();
        let workload = Server::echo("catalog", Listen::default()).await.unwrap();
        let meshed = edgewise::free_port().unwrap();
        Setup { run, pki, workload, meshed }
    }

    fn config(&self, run: &Run) -> Config {
        let yaml = shipped();
        let yaml = if run.guard {
            yaml
        } else {
            GUARD_BLOCKS.iter().fold(yaml, |yaml, (from, to)| {
                let start = yaml.find(from).unwrap_or_else(|| panic!("{FILE}: no {from:?}"));
                let end = start + yaml[start..].find(to).unwrap_or_else(|| panic!("{FILE}: no {to:?}"));
                format!("{}{}", &yaml[..start], &yaml[end..])
            })
        };
        let pinned = field(&yaml, "sha256:");
        let mut config = Config { name: "mesh-gateway-remote".into(), yaml }
            .run_dir(self.run.path())
            .port(ports::GATEWAY, 0)
            .port(ports::SIDECAR, self.meshed)
            .port(ports::NON_MESHED, self.workload.port())
            .replace(
                &format!("address: {MODULE_HOST}, port_value: 443"),
                &format!("address: 127.0.0.1, port_value: {}", run.port),
            )
            .replace("/etc/ssl/certs/ca-certificates.crt", &run.ca_file.display().to_string())
            .replace(&format!("sha256: {pinned}"), &format!("sha256: {}", run.sha256));
        if let Some((retries, base)) = run.retries {
            config = config.replace("num_retries: 10", &format!("num_retries: {retries}")).replace(
                "retry_back_off: { base_interval: 1s, max_interval: 10s }",
                &format!("retry_back_off: {{ base_interval: {base}, max_interval: {base} }}"),
            );
        }
        for (from, to) in &run.replace {
            config = config.replace(from, to);
        }
        self.pki.gateway_config(config)
    }

    /// Starts the gateway with `cache` as its module cache.
    async fn gateway(&self, run: &Run, cache: &Path) -> Gateway {
        let options = Options { env: vec![("TMPDIR".into(), cache.display().to_string())], ..Options::default() };
        let started = Instant::now();
        let envoy = Envoy::start_with(&self.config(run), options).await.unwrap();
        let started_in = started.elapsed();
        let front = envoy.listener("gateway_http").await.unwrap();
        Gateway { envoy, front, started_in }
    }

    async fn send(&self, gateway: &Gateway, token: Option<&str>, extra: &[(&str, &str)]) -> edgewise::client::Response {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut req = Request::get("shop.example", "/catalog/items");
        if let Some(b) = &bearer {
            req = req.header("authorization", b);
        }
        for (k, v) in extra {
            req = req.header(k, v);
        }
        Client::plain().send(gateway.front, req).await.unwrap()
    }
}

fn cached_module(cache: &Path) -> Option<PathBuf> {
    std::fs::read_dir(cache).unwrap().map(|e| e.unwrap().path()).find(|p| {
        p.file_name().unwrap().to_string_lossy().starts_with("envoy_dynamic_module_")
            && p.extension().is_some_and(|e| e == "so")
    })
}

/// The ABI line Envoy logs when it loads the module: the version the module states, matched.
fn abi_matched(log: &str) -> bool {
    log.contains("Dynamic module ABI version v0.2.0 matched.") && !log.contains("is deprecated")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_module_is_fetched_before_envoy_serves_and_filters_every_request() {
    let s = Setup::new().await;
    let module = module();
    // The download takes 2 s: Envoy is not ready, and takes no request, before it has the module.
    let downloads = Downloads::start(s.run.path(), module.clone(), 0, Duration::from_secs(2)).await;
    let cache = tempfile::tempdir().unwrap();
    let run = downloads.run(&module);
    let gw = s.gateway(&run, cache.path()).await;
    assert!(gw.started_in >= Duration::from_secs(2), "ready after {:?}, before the module arrived", gw.started_in);
    assert_eq!(downloads.fetches(), 1);
    let seen = downloads.server.seen().pop().unwrap();
    assert_eq!(seen.tls.as_ref().and_then(|t| t.sni.as_deref()), Some(MODULE_HOST), "fetched over TLS with SNI");
    assert!(abi_matched(&gw.envoy.log()), "{}", gw.envoy.log_tail());

    // The filter decides: a token's identity, never the client's header; no token, no request.
    let token = s.pki.user_token("alice");
    let r = s.send(&gw, Some(&token), &[("x-edgewise-user", "mallory"), (PENDING, "forged")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = s.workload.seen().pop().unwrap();
    assert_eq!(seen.header("x-edgewise-user"), Some("alice"));
    assert_eq!(seen.header(PENDING), None, "the module removes the guard's marker");
    let r = s.send(&gw, None, &[("x-edgewise-user", "mallory")]).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(s.workload.count(), 1);
    let stats = gw.envoy.stats().await.unwrap();
    assert_eq!((stats.get(GUARD_ALLOWED), stats.get(GUARD_DENIED)), (Some(&1), Some(&0)), "the guard's counters");
    assert_eq!(stats.get(FETCH_ERRORS).copied().unwrap_or(0), 0);

    // Cached under $TMPDIR by its sha256: a restart loads it without fetching ...
    let cached = cached_module(cache.path()).expect("the module cached in $TMPDIR");
    assert!(cached.ends_with(format!("envoy_dynamic_module_{}.so", run.sha256)), "{}", cached.display());
    drop(gw);
    let again = s.gateway(&run, cache.path()).await;
    assert_eq!(downloads.fetches(), 1, "a cached module is not fetched again");
    assert_eq!(s.send(&again, None, &[]).await.status, 401);
    drop(again);

    // ... and a cached file that is not the pinned module is removed and fetched again.
    std::fs::write(&cached, b"not the module").unwrap();
    let refetched = s.gateway(&run, cache.path()).await;
    assert!(
        refetched.envoy.log().contains("removed cached file failing SHA256 verification"),
        "{}",
        refetched.envoy.log_tail()
    );
    assert_eq!(downloads.fetches(), 2);
    assert_eq!(std::fs::read(&cached).unwrap(), module);
    assert_eq!(s.send(&refetched, None, &[]).await.status, 401);
}

/// What a request gets when the filter is not in the chain, with the guard: a 503 that says so,
/// nothing forwarded.
async fn assert_refused(s: &Setup, gw: &Gateway) {
    let before = s.workload.count();
    let token = s.pki.user_token("alice");
    for (token, extra) in [(Some(token.as_str()), vec![]), (None, vec![("x-edgewise-user", "mallory")])] {
        let r = s.send(gw, token, &extra).await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["error"], "filter_unavailable");
    }
    assert_eq!(s.workload.count(), before, "nothing reaches the workload");
    let stats = gw.envoy.stats().await.unwrap();
    assert_eq!(stats.get(GUARD_DENIED), Some(&2));
    assert_eq!(stats.get(FETCH_ERRORS), Some(&1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_sha256_leaves_the_filter_out_and_the_guard_refuses_every_request() {
    let s = Setup::new().await;
    let downloads = Downloads::start(s.run.path(), module(), 0, Duration::ZERO).await;
    let run = Run {
        sha256: sha256_hex(b"another build"),
        port: downloads.server.port(),
        ca_file: downloads.ca_file.clone(),
        retries: Some((1, "0.1s")),
        guard: true,
        replace: vec![],
    };
    let cache = tempfile::tempdir().unwrap();
    let gw = s.gateway(&run, cache.path()).await;
    // Envoy starts anyway, says why the filter is missing, and retried once as configured.
    assert!(gw.envoy.log().contains(FETCH_FAILED), "{}", gw.envoy.log_tail());
    assert_eq!(downloads.fetches(), 2);
    assert!(cached_module(cache.path()).is_none(), "nothing of the wrong module is kept");
    assert_refused(&s, &gw).await;

    // Without the guard, Envoy 1.40 forwards the requests without the filter (it fails open):
    // the client's own identity header reaches the workload. The reason for the guard.
    let open = s.gateway(&Run { guard: false, ..run }, cache.path()).await;
    assert!(open.envoy.log().contains(FETCH_FAILED));
    let r = s.send(&open, None, &[("x-edgewise-user", "mallory")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.workload.seen().pop().unwrap().header("x-edgewise-user"), Some("mallory"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_url_leaves_the_filter_out_and_the_guard_refuses_every_request() {
    let s = Setup::new().await;
    let ca_file = certs::write_pem(s.run.path(), "unused-ca.pem", &Ca::new("unused").unwrap().pem).unwrap();
    let run = Run {
        sha256: sha256_hex(&module()),
        port: edgewise::free_port().unwrap(),
        ca_file,
        retries: Some((2, "0.5s")),
        guard: true,
        replace: vec![],
    };
    let cache = tempfile::tempdir().unwrap();
    let gw = s.gateway(&run, cache.path()).await;
    assert!(gw.envoy.log().contains(FETCH_FAILED), "{}", gw.envoy.log_tail());
    // Three attempts (two retries) while Envoy waited, not ready.
    assert_eq!(gw.envoy.stat("cluster.edgewise_modules.upstream_cx_connect_fail").await.unwrap(), 3);
    assert_refused(&s, &gw).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_wait_out_a_download_service_that_fails_at_first() {
    let s = Setup::new().await;
    let module = module();
    let downloads = Downloads::start(s.run.path(), module.clone(), 2, Duration::ZERO).await;
    let run = Run {
        sha256: sha256_hex(&module),
        port: downloads.server.port(),
        ca_file: downloads.ca_file.clone(),
        retries: Some((3, "0.2s")),
        guard: true,
        replace: vec![],
    };
    let cache = tempfile::tempdir().unwrap();
    let gw = s.gateway(&run, cache.path()).await;
    assert_eq!(downloads.fetches(), 3, "two 503s, then the module");
    assert_eq!(gw.envoy.stat("cluster.edgewise_modules.upstream_rq_503").await.unwrap(), 2);
    assert!(!gw.envoy.log().contains(FETCH_FAILED), "{}", gw.envoy.log_tail());
    assert_eq!(s.send(&gw, None, &[]).await.status, 401, "the filter decides");
}

/// `envoy --mode validate` does not fetch a remote module, so it cannot check the filter's
/// configuration; a configuration the filter refuses is found after the fetch and leaves the
/// filter out, like a failed fetch.
#[tokio::test(flavor = "multi_thread")]
async fn a_configuration_the_filter_refuses_is_found_only_after_the_fetch() {
    let s = Setup::new().await;
    let module = module();
    let downloads = Downloads::start(s.run.path(), module.clone(), 0, Duration::ZERO).await;
    let run =
        Run { replace: vec![("\"audiences\": [\"shop\"]", "\"audience\": [\"shop\"]")], ..downloads.run(&module) };
    let dir = tempfile::tempdir().unwrap();
    envoy::validate(&s.config(&run), dir.path()).expect("validate mode passes what it cannot check");
    assert_eq!(downloads.fetches(), 0, "validate mode fetches nothing");

    let cache = tempfile::tempdir().unwrap();
    let gw = s.gateway(&run, cache.path()).await;
    let log = gw.envoy.log();
    assert!(log.contains("Failed to create filter config from remote module"), "{}", gw.envoy.log_tail());
    assert!(log.contains("unknown field `audience`"), "{}", gw.envoy.log_tail());
    let r = s.send(&gw, Some(&s.pki.user_token("alice")), &[]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "filter_unavailable");
}

/// Envoy 1.40's other choice, `nack_on_cache_miss`, refuses the configuration while the module is
/// not cached; in a static bootstrap Envoy exits before its background download can finish, so
/// it never starts (the shipped file warms and guards instead).
#[tokio::test(flavor = "multi_thread")]
async fn nack_on_cache_miss_keeps_a_static_envoy_from_ever_starting() {
    let s = Setup::new().await;
    let module = module();
    let downloads = Downloads::start(s.run.path(), module.clone(), 0, Duration::ZERO).await;
    let run = Run {
        replace: vec![(
            "                do_not_close: true\n",
            "                do_not_close: true\n                nack_on_cache_miss: true\n",
        )],
        ..downloads.run(&module)
    };
    let cache = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let options =
            Options { env: vec![("TMPDIR".into(), cache.path().display().to_string())], ..Options::default() };
        match Envoy::start_with(&s.config(&run), options).await {
            Ok(_) => panic!("started with nack_on_cache_miss and an empty cache"),
            Err(e) => {
                assert!(format!("{e:#}").contains("Remote module not cached; background fetch in progress"), "{e:#}")
            }
        }
    }
    assert!(cached_module(cache.path()).is_none(), "the background download never completes");
}

/// Walks to every HTTP filter list of the listeners.
fn http_filters(doc: &mut Value) -> Vec<&mut Vec<Value>> {
    let mut out = Vec::new();
    for listener in doc["static_resources"]["listeners"].as_sequence_mut().into_iter().flatten() {
        for chain in listener["filter_chains"].as_sequence_mut().into_iter().flatten() {
            for filter in chain["filters"].as_sequence_mut().into_iter().flatten() {
                if let Some(list) = filter["typed_config"]["http_filters"].as_sequence_mut() {
                    out.push(list);
                }
            }
        }
    }
    out
}

/// The shipped file is envoy/native/mesh-gateway.yaml with the module by URL, the guard and the
/// download cluster, nothing else; it pins the current build of libedgewise.so (`make oci-pin`)
/// at a URL of the current version; and Envoy validates it.
#[test]
fn the_shipped_file_is_the_native_gateway_with_the_module_by_url_pinned_to_this_build() {
    let text = shipped();
    let mut remote: Value = serde_yaml::from_str(&text).unwrap();
    let native: Value =
        serde_yaml::from_str(&std::fs::read_to_string(edgewise::repo_root().join(NATIVE)).unwrap()).unwrap();

    let lists = http_filters(&mut remote);
    assert_eq!(lists.len(), 1);
    let list = lists.into_iter().next().unwrap();
    let names: Vec<&str> = list.iter().filter_map(|f| f["name"].as_str()).collect();
    assert_eq!(names, ["edgewise.pending", "edgewise.mesh_identity", "edgewise.guard", "envoy.filters.http.router"]);
    let pending = &list[0]["typed_config"]["mutations"]["request_mutations"][0]["append"];
    assert_eq!(pending["header"]["key"], PENDING);
    assert_eq!(pending["append_action"], "OVERWRITE_IF_EXISTS_OR_ADD", "a client's own marker is replaced");
    assert_eq!(PENDING, format!("x-edgewise-pending-{FILTER}"), "the header the module removes");
    let rules = &list[2]["typed_config"]["rules"];
    assert_eq!(rules["action"], "DENY");
    let policies = rules["policies"].as_mapping().unwrap();
    assert_eq!(policies.len(), 1);
    let policy = policies.values().next().unwrap();
    assert_eq!(policy["principals"][0]["header"]["name"], PENDING);
    assert_eq!(policy["principals"][0]["header"]["present_match"], true);

    // The module by URL, pinned to this build, with a retry policy.
    let filter = &mut list[1]["typed_config"];
    assert_eq!(filter["filter_name"], format!("{FILTER}.guarded"));
    let remote_source = &filter["dynamic_module_config"]["module"]["remote"];
    let uri = remote_source["http_uri"]["uri"].as_str().unwrap();
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        uri.starts_with("https://")
            && uri.ends_with(&format!("/edgewise/{version}/native/linux-x86_64/libedgewise.so")),
        "{FILE}: uri {uri} (the dist layout of version {version}; `make oci-pin` writes it)"
    );
    assert_eq!(remote_source["http_uri"]["cluster"], "edgewise_modules");
    assert!(remote_source["retry_policy"]["num_retries"].as_u64().unwrap() >= 3);
    let current = sha256_hex(&module());
    assert_eq!(remote_source["sha256"], current.as_str(), "{FILE}: stale sha256, run `make oci-pin`");

    // Back to the local file, without the guard and the download cluster: the native file.
    filter["filter_name"] = FILTER.into();
    filter["dynamic_module_config"]["module"] =
        serde_yaml::from_str("{ local: { filename: target/filters/libedgewise.so } }").unwrap();
    list.retain(|f| !matches!(f["name"].as_str(), Some("edgewise.pending" | "edgewise.guard")));
    let hcm = &mut remote["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let mappers = hcm["local_reply_config"]["mappers"].as_sequence_mut().unwrap();
    assert_eq!(mappers[0]["body_format_override"]["json_format"]["error"], "filter_unavailable");
    assert_eq!(mappers[0]["filter"]["and_filter"]["filters"][1]["header_filter"]["header"]["name"], PENDING);
    mappers.remove(0);
    let clusters = remote["static_resources"]["clusters"].as_sequence_mut().unwrap();
    assert_eq!(clusters[0]["name"], "edgewise_modules");
    clusters.remove(0);
    assert!(remote == native, "{FILE} differs from {NATIVE} beyond the module source, the guard and edgewise_modules");

    // Envoy takes it as shipped (validate mode: no fetch).
    let run = tempfile::tempdir().unwrap();
    edgewise::scenarios::install("mesh-gateway", run.path()).unwrap();
    let config = Config { name: "mesh-gateway-remote".into(), yaml: text }.run_dir(run.path());
    if let Err(e) = envoy::validate(&config, run.path()) {
        panic!("{FILE}: {e:#}");
    }
}
