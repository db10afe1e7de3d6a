//! libedgewise.so on real Envoy allocates nothing per request once warm: every request path that
//! decides most traffic (the pass-through floor, serverless routed, egress allowed, a cached
//! token allowed by cloud-connector and by tunnel-auth), counted under valgrind's callgrind as
//! calls of Rust's global allocator, the difference between 3N and N requests. The filters' own
//! logic is held to the same on the fake host (each filter crate's allocation tests); this is
//! the binding's share, and the two together.
//!
//! About two minutes (each configuration in its own Envoy under callgrind).

use edgewise::bench::{benches, instructions, sign_tokens, Services, ISSUER};
use edgewise::idp::Idp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_filters_allocate_nothing_per_request_once_warm() {
    let idp = Idp::rs256(ISSUER, "bench-1").unwrap();
    let jwks = serde_json::json!({ "keys": [idp.jwk()] }).to_string();
    let work = tempfile::tempdir().unwrap();
    let services = Services::start(work.path(), &jwks, std::path::Path::new(env!("CARGO_BIN_EXE_edgewise-ratelimit")))
        .await
        .unwrap();
    let n = 50;
    let tokens = sign_tokens(&idp, edgewise::bench::tokens_for(n));
    let all = benches(&jwks, &edgewise::noop_module());
    let mut failures = Vec::new();
    for name in ["native-floor", "serverless-10-native", "egress-native", "cc-hit-native", "tunnel-auth-native"] {
        let bench = all.iter().find(|b| b.name == name).expect("a bench configuration");
        let per = instructions(bench, services.ports, &tokens, n, work.path()).await.unwrap();
        let allocations = per.rust_allocations();
        // The module's hooks ran (the profile names them): a configuration that bypassed the
        // module would allocate nothing too.
        let hooks = per.inclusive_of("envoy_dynamic_module_on_http_filter_request_headers");
        assert!(hooks > 100.0, "{name}: the module's request hook ran {hooks} instructions per request");
        if allocations != 0.0 {
            let mut callers: Vec<_> = per.calls.iter().filter(|(f, v)| f.contains("alloc") && **v != 0.0).collect();
            callers.sort_by(|a, b| a.0.cmp(b.0));
            failures.push(format!("{name}: {allocations} allocations per request ({callers:?})"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
