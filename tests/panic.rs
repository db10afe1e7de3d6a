//! A panic inside a filter takes nothing down: on proxy-wasm the VM traps, `failure_policy:
//! FAIL_RELOAD` refuses that request and gives the next one a new VM; natively the hook catches
//! it, refuses the request with a 500 and counts it. Either way the requests after it are decided
//! by the filter again. The panic is a test-only switch (`EDGEWISE_TEST_PANIC_HEADER`).

use edgewise::client::{Client, Request};
use edgewise::envoy::{Build, Config, Envoy, Options};
use edgewise::scenarios::egress::{self as eg, ports};

const PANIC_HEADER: &str = "x-edgewise-test-panic";

async fn egress(build: Build, run: &std::path::Path) -> Envoy {
    eg::install(run).unwrap();
    let mut config = Config::shipped_as("egress", build).run_dir(run).port(ports::EGRESS, 0).port(ports::DNS, 1);
    if build == Build::Wasm {
        // A VM reads only the variables its configuration lets through.
        config = config.replace(
            "runtime: envoy.wasm.runtime.v8",
            "runtime: envoy.wasm.runtime.v8\n                  environment_variables: { host_env_keys: [EDGEWISE_TEST_PANIC_HEADER] }",
        );
    }
    let options =
        Options { env: vec![("EDGEWISE_TEST_PANIC_HEADER".into(), PANIC_HEADER.into())], ..Options::default() };
    Envoy::start_with(&config, options).await.unwrap()
}

#[tokio::test]
async fn a_panic_in_a_filter_refuses_that_request_and_the_next_ones_are_decided_again() {
    for build in Build::ALL {
        let run = tempfile::tempdir().unwrap();
        let envoy = egress(build, run.path()).await;
        let front = envoy.listener("egress_http").await.unwrap();
        // A destination the filter refuses: its JSON 403 shows the filter decided the request.
        let refused = || Request::get("10.1.2.3.egress.local", "/");
        let mut decided = 0;
        for round in 0..3 {
            let r = Client::plain().send(front, refused().header(PANIC_HEADER, "1")).await.unwrap();
            assert!(r.status >= 500, "{build:?} round {round}: the panicking request: {} {}", r.status, r.text());
            // Natively the next request is decided at once. On proxy-wasm the worker whose VM
            // trapped refuses its requests (503, never forwarded) until the VM is rebuilt after
            // the reload backoff; the other worker's VM is unaffected.
            let start = std::time::Instant::now();
            let (mut decided_in_a_row, mut refused_meanwhile) = (0, 0);
            while decided_in_a_row < 10 {
                let r = Client::plain().send(front, refused()).await.unwrap();
                if r.status == 403 {
                    assert_eq!(r.json()["error"], "destination_not_allowed", "{build:?}");
                    decided_in_a_row += 1;
                    decided += 1;
                } else {
                    assert_eq!(r.status, 503, "{build:?} round {round}: {}", r.text());
                    (decided_in_a_row, refused_meanwhile) = (0, refused_meanwhile + 1);
                }
                assert!(start.elapsed() < std::time::Duration::from_secs(5), "{build:?}: no recovery");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            if build == Build::Native {
                assert_eq!(refused_meanwhile, 0, "natively the next request is decided at once");
            }
            eprintln!("{build:?} round {round}: {refused_meanwhile} refused while recovering, {:?}", start.elapsed());
        }
        let stats = envoy.stats().await.unwrap();
        match build {
            Build::Native => assert_eq!(stats.get("edgewise.egress.panics"), Some(&3), "{build:?}"),
            // Each trapped VM was rebuilt once (Envoy's own stats, per plugin name).
            Build::Wasm => assert_eq!(stats.get("wasm.egress.vm_reload_success"), Some(&3), "{build:?}"),
        }
        // Every request the filter decided is counted (the metrics survive a VM's failure).
        assert_eq!(stats.get(&build.stat("edgewise.egress.denied.ip_literal")), Some(&decided), "{build:?}");
    }
}
