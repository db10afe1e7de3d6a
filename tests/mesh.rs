//! End-to-end: the out-of-cluster gateway (envoy/mesh-gateway.yaml) in front of a sidecar
//! (envoy/mesh-sidecar.yaml) and a non-meshed workload, each shipped YAML on real Envoy with the
//! freshly built mesh-identity.wasm; a gateway CA and a mesh CA; SPIFFE identities.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgewise::certs::{Ca, Leaf};
use edgewise::client::{raw_get, raw_statuses, Client, Request};
use edgewise::envoy::{Config, Envoy};
use edgewise::scenarios::mesh::{self as mesh, ports, Pki};
use edgewise::server::{Listen, Server};
use edgewise::tls;

struct Setup {
    _run: tempfile::TempDir,
    pki: Pki,
    workload: Server,
    non_meshed: Server,
    sidecar: Envoy,
    gateway: Envoy,
    sidecar_addr: SocketAddr,
    gateway_addr: SocketAddr,
}

async fn setup() -> Setup {
    setup_with(|c| c).await
}

async fn setup_with(tweak_gateway: fn(Config) -> Config) -> Setup {
    let run = tempfile::tempdir().unwrap();
    let pki = Pki::install(run.path()).unwrap();
    let workload = Server::echo("catalog", Listen::default()).await.unwrap();
    let non_meshed = Server::echo("legacy", Listen::default()).await.unwrap();
    let sidecar_config = Config::shipped("mesh-sidecar")
        .run_dir(run.path())
        .port(ports::SIDECAR, 0)
        .port(ports::WORKLOAD, workload.port());
    let sidecar = Envoy::start(&sidecar_config).await.unwrap();
    let sidecar_addr = sidecar.listener("sidecar_inbound").await.unwrap();
    let gateway_config = Config::shipped("mesh-gateway")
        .run_dir(run.path())
        .port(ports::GATEWAY, 0)
        .port(ports::SIDECAR, sidecar_addr.port())
        .port(ports::NON_MESHED, non_meshed.port());
    let gateway = Envoy::start(&tweak_gateway(pki.gateway_config(gateway_config))).await.unwrap();
    let gateway_addr = gateway.listener("gateway_http").await.unwrap();
    Setup { _run: run, pki, workload, non_meshed, sidecar, gateway, sidecar_addr, gateway_addr }
}

impl Setup {
    async fn via_gateway(&self, path: &str, token: Option<&str>, extra: &[(&str, &str)]) -> edgewise::client::Response {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut req = Request::get("shop.example", path);
        if let Some(b) = &bearer {
            req = req.header("authorization", b);
        }
        for (k, v) in extra {
            req = req.header(k, v);
        }
        Client::plain().send(self.gateway_addr, req).await.unwrap()
    }

    /// A client calling the sidecar directly with `leaf`, offering `alpn`.
    fn peer(&self, leaf: Option<&Leaf>, alpn: &str) -> Client {
        Client::tls(tls::client(&[&self.pki.mesh_ca.pem], leaf, &[alpn]).unwrap()).sni(mesh::SIDECAR_DNS)
    }

    async fn sidecar_get(&self, client: &Client, path: &str, user: &str) -> anyhow::Result<edgewise::client::Response> {
        client.send(self.sidecar_addr, Request::get("catalog", path).header("x-edgewise-user", user)).await
    }
}

#[tokio::test]
async fn meshed_endpoints_get_mtls_with_the_gateway_identity_and_others_plaintext() {
    let s = setup().await;
    let token = s.pki.user_token("alice");
    for _ in 0..10 {
        // A client trying to claim another user is overruled by the token.
        let r = s.via_gateway("/catalog/items", Some(&token), &[("x-edgewise-user", "mallory")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let (meshed, plain) = (s.workload.seen(), s.non_meshed.seen());
    // One logical service, balanced over both kinds of endpoint (round robin per Envoy worker).
    assert_eq!(meshed.len() + plain.len(), 10);
    assert!(meshed.len() >= 3 && plain.len() >= 3, "meshed {}, non-meshed {}", meshed.len(), plain.len());
    for seen in &meshed {
        // Behind the sidecar: the peer the sidecar authenticated, and the user the gateway vouched for.
        let xfcc = seen.header("x-forwarded-client-cert").unwrap_or_default();
        assert!(xfcc.contains(&format!("URI={}", mesh::GATEWAY_ID)), "XFCC: {xfcc}");
        assert_eq!(seen.header("x-edgewise-user"), Some("alice"));
        assert_eq!(seen.header("x-edgewise-user-groups"), Some("shoppers"));
        assert_eq!(seen.header("authorization"), None, "the user's token stays at the gateway");
    }
    for seen in &plain {
        assert!(seen.tls.is_none(), "the non-meshed endpoint is reached in plaintext");
        assert_eq!(seen.header("authorization"), None, "no token over a plaintext hop");
        assert_eq!(seen.header("x-edgewise-user"), Some("alice"));
    }
    let stats = s.sidecar.stats().await.unwrap();
    assert_eq!(
        stats.get(&edgewise::envoy::stat("edgewise.mesh_identity.sidecar.trusted_peer")),
        Some(&(meshed.len() as u64))
    );

    // No token, or a bad one: 401 at the gateway, nothing forwarded.
    let r = s.via_gateway("/catalog/items", None, &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = s.via_gateway("/catalog/items", Some("a.b.c"), &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer error=\"invalid_token\""));
    assert_eq!(r.json()["error"], "invalid_token");
    let other_issuer = edgewise::idp::Idp::new(mesh::ISSUER, "idp-key-1").unwrap();
    let forged = other_issuer
        .token(serde_json::json!({"sub": "alice", "aud": mesh::AUDIENCE, "exp": edgewise::idp::now() + 600}));
    assert_eq!(
        s.via_gateway("/catalog/items", Some(&forged), &[]).await.status,
        401,
        "signed by a key the gateway does not know"
    );
    assert_eq!(s.workload.count() + s.non_meshed.count(), 10);
}

#[tokio::test]
async fn the_sidecar_authorizes_by_spiffe_id_and_believes_identity_headers_only_from_the_gateway() {
    let s = setup().await;
    let alpn = "istio-http/1.1";

    // Another workload of the mesh may read the catalog, but its identity headers are dropped.
    let cart = s.pki.mesh_leaf("spiffe://cluster.local/ns/shop/sa/cart").unwrap();
    let r = s.sidecar_get(&s.peer(Some(&cart), alpn), "/catalog/items", "alice").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = s.workload.seen().pop().unwrap();
    assert_eq!(seen.header("x-edgewise-user"), None, "identity headers from a non-gateway peer must be stripped");
    assert!(seen.header("x-forwarded-client-cert").unwrap().contains("URI=spiffe://cluster.local/ns/shop/sa/cart"));

    // Per path: /admin only for the admin identity.
    assert_eq!(s.sidecar_get(&s.peer(Some(&cart), alpn), "/admin/reindex", "x").await.unwrap().status, 403);
    let admin = s.pki.mesh_leaf("spiffe://cluster.local/ns/shop/sa/catalog-admin").unwrap();
    assert_eq!(s.sidecar_get(&s.peer(Some(&admin), alpn), "/admin/reindex", "x").await.unwrap().status, 200);

    // The gateway's trust domain with another service account: trusted CA, refused identity.
    let intruder = s.pki.gateway_leaf(&s.pki.gateway_ca, "spiffe://gateway.example/ns/edge/sa/intruder").unwrap();
    assert_eq!(s.sidecar_get(&s.peer(Some(&intruder), alpn), "/catalog/items", "alice").await.unwrap().status, 403);

    // The gateway's own identity ...
    let gateway = s.pki.gateway_leaf(&s.pki.gateway_ca, mesh::GATEWAY_ID).unwrap();
    let r = s.sidecar_get(&s.peer(Some(&gateway), alpn), "/catalog/items", "alice").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(s.workload.seen().pop().unwrap().header("x-edgewise-user"), Some("alice"));
    // ... but issued by the wrong CA (the mesh's, not the gateway domain's), or by an unknown CA,
    // or no client certificate at all, or without the mesh ALPN: no connection.
    let wrong_ca = s.pki.gateway_leaf(&s.pki.mesh_ca, mesh::GATEWAY_ID).unwrap();
    let rogue = s.pki.gateway_leaf(&Ca::new("rogue").unwrap(), mesh::GATEWAY_ID).unwrap();
    let before = s.workload.count();
    for (what, client) in [
        ("gateway ID from the mesh CA", s.peer(Some(&wrong_ca), alpn)),
        ("gateway ID from an unknown CA", s.peer(Some(&rogue), alpn)),
        ("no client certificate", s.peer(None, alpn)),
        ("no mesh ALPN", s.peer(Some(&gateway), "http/1.1")),
    ] {
        let r = s.sidecar_get(&client, "/catalog/items", "alice").await;
        assert!(r.is_err(), "{what}: the sidecar must refuse the connection, got {:?}", r.map(|r| r.status));
    }
    assert_eq!(s.workload.count(), before, "refused peers never reach the workload");
}

#[tokio::test]
async fn leaf_and_ca_rotation_under_load_loses_no_request() {
    // Connections live 1 s instead of 60 s, so that the rotated certificate reaches them in the test.
    let s = Arc::new(setup_with(|c| c.replace("max_connection_duration: 60s", "max_connection_duration: 1s")).await);
    let token = s.pki.user_token("alice");
    let (ok, failed, stop) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (s, ok, failed, stop, token) = (s.clone(), ok.clone(), failed.clone(), stop.clone(), token.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = s.via_gateway("/catalog/items", Some(&token), &[]).await;
                if r.status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    eprintln!("failed during rotation: {} {}", r.status, r.text());
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();

    // 1. A new gateway leaf from the same CA.
    let n = tls_updates(&s.gateway).await;
    s.pki.set_gateway_cert(&s.pki.gateway_leaf(&s.pki.gateway_ca, mesh::GATEWAY_ID).unwrap()).unwrap();
    wait_tls_update(&s.gateway, n, "a new gateway leaf").await;

    // 2. CA rotation: the sidecar trusts old and new gateway CA, then the gateway moves to a leaf
    //    from the new CA, then the old CA is dropped.
    let new_ca = Ca::new("gateway.example CA 2").unwrap();
    let n = tls_updates(&s.sidecar).await;
    s.pki.set_sidecar_trust(&[&s.pki.gateway_ca, &new_ca], &[&s.pki.mesh_ca]).unwrap();
    wait_tls_update(&s.sidecar, n, "old + new CA in the sidecar's bundle").await;
    let n = tls_updates(&s.gateway).await;
    let new_leaf = s.pki.gateway_leaf(&new_ca, mesh::GATEWAY_ID).unwrap();
    s.pki.set_gateway_cert(&new_leaf).unwrap();
    wait_tls_update(&s.gateway, n, "a gateway leaf from the new CA").await;
    // Every pooled connection has been replaced once it presents the new leaf.
    let new_hash = format!("Hash={}", new_leaf.sha256_hex());
    let hash_of = |seen: &edgewise::server::Seen| {
        let xfcc = seen.header("x-forwarded-client-cert").unwrap_or_default();
        xfcc.split(';').find(|p| p.starts_with("Hash=")).unwrap_or_default().to_string()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = s.workload.seen();
        if seen.len() > 20 && seen.iter().rev().take(20).all(|r| hash_of(r) == new_hash) {
            break;
        }
        assert!(Instant::now() < deadline, "the gateway did not move to the new leaf: {:?}", seen.last().map(hash_of));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n = tls_updates(&s.sidecar).await;
    s.pki.set_sidecar_trust(&[&new_ca], &[&s.pki.mesh_ca]).unwrap();
    wait_tls_update(&s.sidecar, n, "only the new CA in the sidecar's bundle").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "rotation of leaf and CA under load took {:?}: {ok} requests succeeded, {failed} failed",
        started.elapsed()
    );
    assert!(ok > 50, "too little load to prove anything: {ok}");
    assert_eq!(failed, 0, "{failed} of {} requests failed during rotation", ok + failed);

    // The rotation really happened: the old CA is no longer accepted, the new one is.
    let alpn = "istio-http/1.1";
    let old = s.pki.gateway_leaf(&s.pki.gateway_ca, mesh::GATEWAY_ID).unwrap();
    assert!(s.sidecar_get(&s.peer(Some(&old), alpn), "/catalog/x", "u").await.is_err(), "old gateway CA still trusted");
    let new = s.pki.gateway_leaf(&new_ca, mesh::GATEWAY_ID).unwrap();
    assert_eq!(s.sidecar_get(&s.peer(Some(&new), alpn), "/catalog/x", "u").await.unwrap().status, 200);
}

/// How many times Envoy rebuilt a TLS context from SDS (a rotated file included).
async fn tls_updates(envoy: &Envoy) -> u64 {
    envoy.stats().await.unwrap().iter().filter(|(k, _)| k.ends_with(".ssl_context_update_by_sds")).map(|(_, v)| v).sum()
}

/// Waits until Envoy rebuilt a TLS context since `seen`.
async fn wait_tls_update(envoy: &Envoy, seen: u64, what: &str) {
    let start = Instant::now();
    while tls_updates(envoy).await <= seen {
        assert!(start.elapsed() < Duration::from_secs(15), "no TLS context update after {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Header values that are not UTF-8 at the gateway (obs-text, legal in HTTP/1.1): an
/// Authorization it cannot read gets a clear 400 and reaches no workload, any other header passes
/// byte for byte, and the valid requests after them are all served.
#[tokio::test]
async fn header_values_that_are_not_utf8_get_a_400_or_pass_untouched_and_break_nothing() {
    let s = setup().await;
    let bearer = format!("Bearer {}", s.pki.user_token("alice"));
    let raw = |headers: &[(&str, &[u8])]| {
        let bytes = raw_get(b"shop.example", "/catalog/items", headers);
        async move { Client::plain().raw(s.gateway_addr, "shop.example", &bytes).await.unwrap() }
    };
    for _ in 0..4 {
        let out = raw(&[("authorization", b"Bearer caf\xe9")]).await;
        assert_eq!(raw_statuses(&out), [400], "{}", String::from_utf8_lossy(&out));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("\"error\":\"invalid_header\""), "{text}");
        assert!(text.to_ascii_lowercase().contains("www-authenticate: bearer error=\"invalid_request\""), "{text}");
    }
    assert_eq!(s.workload.count() + s.non_meshed.count(), 0, "a refused request reached a workload");
    for _ in 0..4 {
        let out = raw(&[("authorization", bearer.as_bytes()), ("x-anything", b"caf\xe9\x80")]).await;
        assert_eq!(raw_statuses(&out), [200], "{}", String::from_utf8_lossy(&out));
    }
    let seen: Vec<_> = s.workload.seen().into_iter().chain(s.non_meshed.seen()).collect();
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().all(|r| r.header_bytes("x-anything") == Some(&b"caf\xe9\x80"[..])));
    for _ in 0..10 {
        assert_eq!(s.via_gateway("/catalog/items", Some(&s.pki.user_token("alice")), &[]).await.status, 200);
    }
    assert_eq!(s.gateway.stat(&edgewise::envoy::stat("edgewise.mesh_identity.gateway.bad_request")).await.unwrap(), 4);
}

/// The hostile class (edgewise::hostile) at the gateway, with a valid token: each gets a clear
/// status, and the valid requests after them are served.
#[tokio::test]
async fn hostile_requests_get_clear_statuses_and_break_nothing() {
    let s = setup().await;
    let bearer = format!("Bearer {}", s.pki.user_token("alice"));
    let valid = [("authorization", bearer.as_bytes())];
    let report =
        edgewise::hostile::run(&Client::plain(), s.gateway_addr, "shop.example", "/catalog/items", &valid).await;
    report.unwrap().check(&[
        ("obs-text in a header value", &[200]),
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
    assert_eq!(s.workload.count() + s.non_meshed.count(), 9, "only the accepted requests reached a workload");
    for _ in 0..10 {
        assert_eq!(s.via_gateway("/catalog/items", Some(&s.pki.user_token("alice")), &[]).await.status, 200);
    }
}
