//! End-to-end: envoy/tunnel-hub.yaml (two workers, tunnel-auth.wasm) and envoy/tunnel-agent.yaml
//! on real Envoy, a token issuer stand-in and a kubectl-proxy stand-in behind the agent. The agent
//! only dials out; users reach the stand-in through the hub, as far as their token allows.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use edgewise::client::{raw_get, raw_statuses, Client, Request, Response};
use edgewise::envoy::{Config, Envoy, Options};
use edgewise::idp::Idp;
use edgewise::scenarios::cloud_connector::{Issuers, GITLAB};
use edgewise::scenarios::tunnel::{self as tn, KubectlProxy, Pki};
use serde_json::json;

struct Hub {
    envoy: Envoy,
    users: SocketAddr,
    handshake: u16,
}

async fn start_hub(config: &Config, work: &Path, users: u16, handshake: u16) -> Hub {
    let config = config.clone().port(tn::ports::USERS, users).port(tn::ports::HANDSHAKE, handshake);
    std::fs::create_dir_all(work).unwrap();
    let envoy = Envoy::start_in(&config.any_admin_port(), work, Options::default()).await.unwrap();
    let users = envoy.listener("tunnel_users").await.unwrap();
    let handshake = envoy.listener("tunnel_handshake").await.unwrap().port();
    Hub { envoy, users, handshake }
}

async fn start_agent(config: &Config) -> Envoy {
    Envoy::start_with(config, Options { concurrency: 1, ..Options::default() }).await.unwrap()
}

/// Waits until both hub workers hold a tunnel of `cluster`; returns how long that took.
async fn tunnels_up(hub: &Envoy, cluster: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let stats = hub.stats().await.unwrap_or_default();
        let up = (0..2).all(|w| stats.get(&format!("tunnel_hub.worker_{w}.node.{cluster}")).is_some_and(|n| *n >= 1));
        if up {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "no tunnels of {cluster} on both hub workers after {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Setup {
    run: tempfile::TempDir,
    pki: Pki,
    issuers: (Issuers, edgewise::server::Server),
    user_key: Idp,
    kubectl: KubectlProxy,
    hub_config: Config,
    hub: Hub,
    agent: Envoy,
}

async fn setup() -> Setup {
    edgewise::init_crypto();
    let run = tempfile::tempdir().unwrap();
    let pki = Pki::install(run.path()).unwrap();
    let issuers = Issuers::start(&pki.issuer_ca).await.unwrap();
    let user_key = Idp::new(GITLAB, "users-1").unwrap();
    issuers.0.publish(GITLAB, vec![user_key.jwk()]);
    let kubectl = KubectlProxy::start(12).await.unwrap();
    let hub_config = pki.hub_config(run.path(), issuers.1.port());
    let hub = start_hub(&hub_config, &run.path().join("hub"), 0, 0).await;
    let agent = start_agent(&pki.agent_config(run.path(), hub.handshake, kubectl.port)).await;
    tunnels_up(&hub.envoy, "cluster-a", Duration::from_secs(10)).await;
    let s = Setup { run, pki, issuers, user_key, kubectl, hub_config, hub, agent };
    s.until_keys(s.hub.users).await;
    s
}

impl Setup {
    /// tunnel-auth answers 503 until the issuer's keys are in (fetched within ~0.2 s of start):
    /// waits for that on the hub at `users`, with a token for a cluster that has no agent.
    async fn until_keys(&self, users: SocketAddr) {
        let bearer = format!("Bearer {}", self.token("probe", &["cluster-z"]));
        let start = Instant::now();
        loop {
            let req = Request::get("hub.example", "/clusters/cluster-a/version").header("authorization", &bearer);
            if Client::plain().send(users, req).await.is_ok_and(|r| r.status == 403) {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "the hub at {users} never got the issuer's keys");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until a request with `token` goes through the tunnel to cluster-a.
    async fn until_through(&self, token: &str) {
        let start = Instant::now();
        while self.get("/clusters/cluster-a/version", Some(token), &[]).await.status != 200 {
            assert!(start.elapsed() < Duration::from_secs(10), "the tunnel never carried a request");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A forged, an expired and an unknown-kid token for cluster-a.
    fn refused_tokens(&self) -> [(&'static str, String); 3] {
        let now = edgewise::idp::now();
        let claims =
            json!({"sub": "mallory", "aud": tn::AUDIENCE, "clusters": ["cluster-a"], "exp": now + 600, "iat": now});
        let mut expired = claims.clone();
        expired["exp"] = json!(now - 3600);
        [
            ("forged", Idp::new(GITLAB, "users-1").unwrap().token(claims.clone())),
            ("expired", self.user_key.token(expired)),
            ("unknown kid", Idp::new(GITLAB, "users-9").unwrap().token(claims)),
        ]
    }

    fn token(&self, user: &str, clusters: &[&str]) -> String {
        let now = edgewise::idp::now();
        self.user_key
            .token(json!({"sub": user, "aud": tn::AUDIENCE, "clusters": clusters, "exp": now + 600, "iat": now}))
    }

    async fn get(&self, path: &str, token: Option<&str>, extra: &[(&str, &str)]) -> Response {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut req = Request::get("hub.example", path);
        if let Some(b) = &bearer {
            req = req.header("authorization", b);
        }
        for (k, v) in extra {
            req = req.header(k, v);
        }
        Client::plain().timeout(Duration::from_secs(40)).send(self.hub.users, req).await.unwrap()
    }
}

fn assert_json_error(r: &Response, status: u16, error: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.json()["error"], error, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_reach_only_their_clusters_through_the_tunnel() {
    let s = setup().await;
    let alice = s.token("alice", &["cluster-a"]);
    // Through hub -> tunnel -> agent -> kubectl proxy, prefix stripped, Host rewritten; the
    // client's own selection header and token do not reach the cluster.
    let start = Instant::now();
    let r = loop {
        let r = s
            .get(
                "/clusters/cluster-a/api/v1/namespaces?limit=1",
                Some(&alice),
                &[("x-edgewise-tunnel-cluster", "cluster-b")],
            )
            .await;
        if r.status == 200 || start.elapsed() > Duration::from_secs(10) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert_eq!(seen["path"], "/api/v1/namespaces?limit=1");
    assert_eq!(seen["headers"]["host"], "kubernetes.default.svc");
    assert!(seen["headers"].get("x-edgewise-tunnel-cluster").is_none(), "{seen}");
    assert!(seen["headers"].get("authorization").is_none(), "the user's token stays at the hub: {seen}");
    // The traffic inside the tunnel is its own mutual TLS (the handshake's TLS ends with the
    // handshake): the hub's reverse cluster completed TLS handshakes with the agent.
    let handshakes = s.hub.envoy.stat("cluster.reverse_tunnels.ssl.handshake").await.unwrap_or(0);
    assert!(handshakes >= 1, "no TLS inside the tunnel");

    // 401 without or with a bad token, 403 for someone else's cluster, 404 for other paths.
    assert_json_error(&s.get("/clusters/cluster-a/api", None, &[]).await, 401, "unauthenticated");
    assert_json_error(&s.get("/clusters/cluster-a/api", Some("not.a.token"), &[]).await, 401, "invalid_token");
    let bob = s.token("bob", &["cluster-b"]);
    let r = s.get("/clusters/cluster-a/api", Some(&bob), &[]).await;
    assert_json_error(&r, 403, "forbidden");
    assert!(r.json()["detail"].as_str().unwrap().contains("bob may not reach cluster cluster-a"));
    assert_json_error(
        &s.get("/api/v1/namespaces", Some(&alice), &[("x-edgewise-tunnel-cluster", "cluster-a")]).await,
        404,
        "not_found",
    );
    let requests = s.kubectl.requests().len();
    assert_eq!(requests, 1, "only the allowed request reached the cluster");

    // A cluster the user may reach but whose agent is not connected: a clear 503.
    let carol = s.token("carol", &["cluster-c"]);
    let r = s.get("/clusters/cluster-c/api", Some(&carol), &[]).await;
    assert_json_error(&r, 503, "tunnel_unavailable");
    assert_eq!(r.json()["cluster"], "cluster-c");

    // The agent listens on nothing but its admin address.
    let out = std::process::Command::new("ss").args(["-Hltnp"]).output().unwrap();
    let pid = format!("pid={},", s.agent.pid());
    let listening: Vec<String> =
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(&pid)).map(str::to_owned).collect();
    assert_eq!(listening.len(), 1, "agent sockets: {listening:?}");
    assert!(listening[0].contains(&s.agent.admin.to_string()), "{listening:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_impostor_agent_is_refused_and_gets_no_traffic() {
    let mut s = setup().await;
    // Stop the real agent: only impostors claim cluster-a now.
    s.agent.kill();
    let alice = s.token("alice", &["cluster-a"]);
    let refused_before = s.hub.envoy.stat("reverse_tunnel.handshake.validation_failed").await.unwrap_or(0);
    let impostor_proxy = KubectlProxy::start(1).await.unwrap();
    let mut impostors = Vec::new();
    // A genuine agent certificate of cluster-b claiming cluster-a, and a cluster-a certificate
    // from a CA the hub does not trust.
    let rogue_ca = edgewise::certs::Ca::new("rogue CA").unwrap();
    for (name, leaf) in [
        ("cluster-b", s.pki.agent_leaf("cluster-b").unwrap()),
        ("rogue", rogue_ca.issue(&edgewise::certs::LeafSpec::server(&["cluster-a"])).unwrap()),
    ] {
        let dir = s.run.path().join(name);
        s.pki.other_agent(&dir, &leaf).unwrap();
        impostors.push(start_agent(&s.pki.agent_config(&dir, s.hub.handshake, impostor_proxy.port)).await);
    }
    let start = Instant::now();
    while s.hub.envoy.stat("reverse_tunnel.handshake.validation_failed").await.unwrap_or(0) < refused_before + 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "the cluster-b impostor was not refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = s.hub.envoy.stats().await.unwrap();
    let tls_refused: u64 = stats.iter().filter(|(k, _)| k.ends_with("ssl.fail_verify_error")).map(|(_, v)| *v).sum();
    assert!(tls_refused >= 1, "the rogue certificate passed TLS");
    for _ in 0..5 {
        let r = s.get("/clusters/cluster-a/api", Some(&alice), &[]).await;
        assert_json_error(&r, 503, "tunnel_unavailable");
    }
    assert!(impostor_proxy.requests().is_empty(), "an impostor got cluster-a's traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_and_hub_restarts_recover_and_a_frozen_agent_fails_fast() {
    let mut s = setup().await;
    let alice = s.token("alice", &["cluster-a"]);
    let until_ok = |users: SocketAddr| {
        let bearer = format!("Bearer {alice}");
        async move {
            let start = Instant::now();
            loop {
                let req = Request::get("hub.example", "/clusters/cluster-a/version").header("authorization", &bearer);
                if Client::plain().send(users, req).await.is_ok_and(|r| r.status == 200) {
                    return start.elapsed();
                }
                assert!(start.elapsed() < Duration::from_secs(15), "no 200 after {:?}", start.elapsed());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    until_ok(s.hub.users).await;

    // The agent is killed and started again: measured from the new agent's start.
    s.agent.kill();
    let agent_config = s.pki.agent_config(s.run.path(), s.hub.handshake, s.kubectl.port);
    let start = Instant::now();
    s.agent = start_agent(&agent_config).await;
    until_ok(s.hub.users).await;
    let after_agent = start.elapsed();
    println!("agent restart: first 200 {after_agent:?} after starting the new agent");
    assert!(after_agent < Duration::from_secs(4), "{after_agent:?}");

    // The hub is killed and started again on the same ports: the agent re-dials by itself.
    let (users, handshake) = (s.hub.users.port(), s.hub.handshake);
    s.hub.envoy.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    s.hub = start_hub(&s.hub_config, &s.run.path().join("hub"), users, handshake).await;
    let ready = start.elapsed();
    let reconnected = tunnels_up(&s.hub.envoy, "cluster-a", Duration::from_secs(10)).await;
    until_ok(s.hub.users).await;
    let after_hub = start.elapsed();
    println!("hub restart: ready after {ready:?}, tunnels on both workers {reconnected:?} later, first 200 {after_hub:?} after the start");
    assert!(reconnected < Duration::from_millis(2500), "agent re-dialled {reconnected:?} after the hub was ready");

    // A frozen agent (SIGSTOP): the hub's HTTP/2 keepalive fails requests fast, never hanging
    // until a route timeout (there is none: watches must not be cut).
    let pid = s.agent.pid().to_string();
    std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let r = s.get("/clusters/cluster-a/version", Some(&alice), &[]).await;
    let took = start.elapsed();
    std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    println!("frozen agent: {} after {took:?}", r.status);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(took < Duration::from_secs(6), "a frozen agent held the request {took:?}");
    let after_thaw = until_ok(s.hub.users).await;
    println!("thawed agent: first 200 after {after_thaw:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_streams_through_the_tunnel_without_being_cut() {
    let s = setup().await;
    let alice = s.token("alice", &["cluster-a"]);
    let start = Instant::now();
    let r = s.get("/clusters/cluster-a/api/v1/pods?watch=true", Some(&alice), &[]).await;
    let took = start.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    let events = r.text().lines().filter(|l| l.contains("MODIFIED")).count();
    println!("watch: {events} events over {took:?}");
    assert_eq!(events, 12, "{}", r.text());
    assert!(took >= Duration::from_secs(11), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_agent_serves_two_hub_replicas() {
    let mut s = setup().await;
    let hub2 = start_hub(&s.hub_config, &s.run.path().join("hub2"), 0, 0).await;
    // The agent's `hub` cluster with both replicas as endpoints (in Kubernetes: STRICT_DNS on a
    // headless Service, as deploy/tunnel-agent/envoy.yaml does).
    let endpoint = |port: u16| {
        format!("        - endpoint:\n            address:\n              socket_address: {{ address: 127.0.0.1, port_value: {port} }}\n")
    };
    let config = s
        .pki
        .agent_config(s.run.path(), s.hub.handshake, s.kubectl.port)
        .replace(&endpoint(s.hub.handshake), &(endpoint(s.hub.handshake) + &endpoint(hub2.handshake)));
    s.agent.kill();
    s.agent = start_agent(&config).await;
    tunnels_up(&s.hub.envoy, "cluster-a", Duration::from_secs(10)).await;
    tunnels_up(&hub2.envoy, "cluster-a", Duration::from_secs(10)).await;
    s.until_keys(hub2.users).await;
    let alice = s.token("alice", &["cluster-a"]);
    let bearer = format!("Bearer {alice}");
    for hub in [s.hub.users, hub2.users] {
        let req = Request::get("hub.example", "/clusters/cluster-a/version").header("authorization", &bearer);
        let r = Client::plain().send(hub, req).await.unwrap();
        assert_eq!(r.status, 200, "via {hub}: {}", r.text());
    }
    // One replica goes away: the other keeps serving.
    s.hub.envoy.kill();
    let req = Request::get("hub.example", "/clusters/cluster-a/version").header("authorization", &bearer);
    assert_eq!(Client::plain().send(hub2.users, req).await.unwrap().status, 200);
}

/// Bytes that are not UTF-8 (obs-text, legal in HTTP/1.1) on a raw socket: an Authorization the
/// hub cannot read gets a clear 400 and reaches no cluster; another header is forwarded; the valid
/// requests after them are all served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn header_values_that_are_not_utf8_get_a_400_or_pass_and_break_nothing() {
    let s = setup().await;
    let alice = s.token("alice", &["cluster-a"]);
    s.until_through(&alice).await;
    let before = s.kubectl.requests().len();
    let raw = |headers: &[(&str, &[u8])]| {
        let bytes = raw_get(b"hub.example", "/clusters/cluster-a/version", headers);
        async move { Client::plain().raw(s.hub.users, "hub.example", &bytes).await.unwrap() }
    };
    for _ in 0..4 {
        let out = raw(&[("authorization", b"Bearer caf\xe9")]).await;
        assert_eq!(raw_statuses(&out), [400], "{}", String::from_utf8_lossy(&out));
        assert!(String::from_utf8_lossy(&out).contains("\"error\":\"invalid_header\""));
    }
    assert_eq!(s.kubectl.requests().len(), before, "a refused request reached the cluster");
    // The filter forwards a header it only passes on, whatever its bytes. (Envoy's HTTP/2 hop
    // into the tunnel then resets the stream: that is Envoy's codec, not the filter.)
    let allowed = s.hub.envoy.stat(&edgewise::envoy::stat("edgewise.tunnel_auth.requests.allowed")).await.unwrap();
    let bearer = format!("Bearer {alice}");
    let out = raw(&[("authorization", bearer.as_bytes()), ("x-anything", b"caf\xe9\x80")]).await;
    assert_ne!(raw_statuses(&out), [400], "{}", String::from_utf8_lossy(&out));
    let now_allowed = s.hub.envoy.stat(&edgewise::envoy::stat("edgewise.tunnel_auth.requests.allowed")).await.unwrap();
    assert_eq!(now_allowed, allowed + 1);
    for _ in 0..10 {
        assert_eq!(s.get("/clusters/cluster-a/version", Some(&alice), &[]).await.status, 200);
    }
    assert_eq!(s.hub.envoy.stat(&edgewise::envoy::stat("edgewise.tunnel_auth.requests.bad_request")).await.unwrap(), 4);
}

/// The hostile class (edgewise::hostile) at the hub, with a valid token: each gets a clear
/// status, nothing reaches the cluster without it, and the valid requests after them are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_requests_get_clear_statuses_and_break_nothing() {
    let s = setup().await;
    let alice = s.token("alice", &["cluster-a"]);
    s.until_through(&alice).await;
    let before = s.kubectl.requests().len();
    let bearer = format!("Bearer {alice}");
    let valid = [("authorization", bearer.as_bytes())];
    let client = Client::plain();
    let report =
        edgewise::hostile::run(&client, s.hub.users, "hub.example", "/clusters/cluster-a/version", &valid).await;
    report.unwrap().check(&[
        // Through the tunnel (HTTP/2), Envoy resets a stream whose header value is obs-text.
        ("obs-text in a header value", &[503]),
        ("control bytes in a header value", &[400]),
        ("a non-ASCII authority", &[400]),
        ("a 60 KiB header value", &[431]),
        ("200 headers", &[431]),
        // Two Authorization values read as one ("a, b"): not a bearer token, refused.
        ("a second Authorization", &[401]),
        ("a second Host", &[200]),
        ("two pipelined requests", &[200, 200]),
        ("a body on GET", &[200]),
        ("a POST with Content-Length", &[200]),
        ("a chunked POST with trailers", &[200]),
        ("a POST with Expect: 100-continue, its body at once", &[100, 200]),
    ]);
    assert_eq!(s.kubectl.requests().len() - before, 8, "only the accepted requests reached the cluster");

    // A refused token refuses the whole request, however its body comes: the answer a GET gets,
    // and nothing of it reaches the cluster.
    let before = s.kubectl.requests().len();
    let tokens = s.refused_tokens();
    let path = "/clusters/cluster-a/version";
    for (what, token) in &tokens {
        assert_eq!(s.get(path, Some(token), &[]).await.status, 401, "{what}");
        let bearer = format!("Bearer {token}");
        let valid = [("authorization", bearer.as_bytes())];
        let answers = edgewise::hostile::with_bodies(&client, s.hub.users, "hub.example", path, &valid).await;
        assert_eq!(answers.len(), 5);
        for (case, answer) in answers {
            assert_eq!(answer, "401", "{what} token: {case}");
        }
    }
    assert_eq!(s.kubectl.requests().len(), before, "no refused request reached the cluster");
    for _ in 0..10 {
        assert_eq!(s.get("/clusters/cluster-a/version", Some(&alice), &[]).await.status, 200);
    }
}

/// tunnel-auth does not pause: while the hub has no keys (its issuer down at start) a request is
/// refused at once, and with a body, however it comes, the whole request is refused the same
/// way, nothing of it reaching the cluster through the tunnel that is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_the_keys_load_a_request_with_a_body_is_refused_whole() {
    let mut s = setup().await;
    let alice = s.token("alice", &["cluster-a"]);
    let (users, handshake) = (s.hub.users.port(), s.hub.handshake);
    s.hub.envoy.kill();
    s.issuers.0.set_down(GITLAB, true);
    s.hub = start_hub(&s.hub_config, &s.run.path().join("hub"), users, handshake).await;
    tunnels_up(&s.hub.envoy, "cluster-a", Duration::from_secs(10)).await;
    let before = s.kubectl.requests().len();
    let path = "/clusters/cluster-a/version";
    let tokens = [vec![("valid", alice.clone())], s.refused_tokens().to_vec()].concat();
    for (what, token) in &tokens {
        let get = s.get(path, Some(token), &[]).await;
        assert_eq!((get.status, get.json()["error"].as_str()), (503, Some("keys_unavailable")), "{what}");
        let bearer = format!("Bearer {token}");
        let headers = [("authorization", bearer.as_bytes())];
        let answers =
            edgewise::hostile::with_bodies(&Client::plain(), s.hub.users, "hub.example", path, &headers).await;
        assert_eq!(answers.len(), 5);
        for (case, answer) in answers {
            assert_eq!(answer, "503", "{what} token: {case}");
        }
    }
    assert_eq!(s.kubectl.requests().len(), before, "nothing reached the cluster before the keys");
    s.issuers.0.set_down(GITLAB, false);
    s.until_through(&alice).await;
}
