//! `make memcheck`: libedgewise.so on real traffic under valgrind's memcheck, with no invalid
//! read, write or free in the module. Envoy runs envoy/native/cloud-connector.yaml (the filter
//! that pauses requests) at two workers, its listener from a file so that its configuration can
//! be reloaded, and the requests take every path of the binding: paused at start with bodies and
//! resumed (forwarded, or answered from the wake-up), a stream reset while paused, a local reply
//! from a wake-up after an unknown kid, a panic, a configuration reload (the old configuration
//! and its thread released), and a shutdown. `make memcheck` writes the report to
//! bench/memcheck.md (`EDGEWISE_MEMCHECK_REPORT`).
//!
//! A second run takes the serverless filter's streamed route watch through the same checks:
//! envoy/native/serverless-xds.yaml and a real edgewise-control, the watch streamed through
//! Envoy's config-level streamed callouts, its lines applied, the stream reset by a restart of
//! the service and streamed again, and a shutdown with a stream open.
//!
//! About a minute each; not built by a plain `cargo test` (`cargo test --test memcheck`).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use edgewise::client::Request;
use edgewise::control::{self, ControlService};
use edgewise::envoy::{Build, Config, Envoy, Options};
use edgewise::hostile;
use edgewise::idp::Idp;
use edgewise::scenarios::cloud_connector::{self as cc, Pki, GITLAB};
use edgewise::scenarios::serverless as sl;
use edgewise::server::{Listen, Server};

const SECRET: &str = "a-memcheck-secret-of-more-than-32-bytes";
const PANIC_HEADER: &str = "x-edgewise-test-panic";
const PATH: &str = "/ai/v2/code/completions";
const JWKS_TIMING: &str = r#""refresh_seconds": 3600, "min_refresh_seconds": 60, "max_refresh_seconds": 86400,
                        "retry_seconds": 10, "kid_miss_cooldown_seconds": 60, "wait_ms": 3000"#;
/// Slow under valgrind: a paused request waits up to a minute.
const SLOW_TIMING: &str = r#""refresh_seconds": 3600, "min_refresh_seconds": 1, "max_refresh_seconds": 3600, "retry_seconds": 1, "kid_miss_cooldown_seconds": 1, "wait_ms": 60000"#;

/// The listeners of the static YAML moved into a file Envoy watches (LDS from a path): writing
/// it again reloads the listener and its filter configuration.
fn with_lds(config: Config, lds: &Path) -> (Config, String) {
    let yaml = &config.yaml;
    let start = yaml.find("static_resources:\n  listeners:\n").expect("static listeners");
    let listeners_at = start + "static_resources:\n".len();
    let end = yaml[listeners_at..].find("\n  clusters:\n").expect("static clusters") + listeners_at + 1;
    let listeners = &yaml[listeners_at + "  listeners:\n".len()..end];
    // Each listener (`  - name: ...`, at the start of a line) becomes a typed resource.
    let resources = format!("resources:\n{listeners}")
        .replace("\n  - name: ", "\n  - \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n    name: ");
    let main = format!(
        "{}dynamic_resources:\n  lds_config:\n    path_config_source: {{ path: {} }}\n    resource_api_version: V3\n\nstatic_resources:\n{}",
        &yaml[..start],
        lds.display(),
        &yaml[end..]
    );
    (Config { name: config.name, yaml: main }, resources)
}

/// Writes the listeners file as Envoy wants it replaced: whole, by a rename.
fn write_lds(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// One error valgrind reported: its kind (first line) and whether the module is on its stack.
struct Reported {
    kind: String,
    in_module: bool,
    text: String,
}

fn errors(log: &str) -> Vec<Reported> {
    let mut out = Vec::new();
    let mut current: Option<Reported> = None;
    for line in log.lines() {
        let Some(body) = line.strip_prefix("==").and_then(|l| l.split_once("== ")).map(|(_, b)| b) else { continue };
        let body = body.trim_end();
        let starts = [
            "Invalid ",
            "Conditional jump",
            "Use of uninitialised",
            "Mismatched free",
            "Syscall param",
            "Source and destination overlap",
            "Argument ",
        ]
        .iter()
        .any(|k| body.starts_with(k));
        if starts {
            out.extend(current.take());
            current = Some(Reported { kind: body.to_string(), in_module: false, text: String::new() });
        } else if body.is_empty() {
            out.extend(current.take());
            continue;
        }
        if let Some(r) = current.as_mut() {
            r.in_module |= body.contains("libedgewise.so");
            r.text.push_str(body);
            r.text.push('\n');
        }
    }
    out.extend(current);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn libedgewise_has_no_invalid_memory_access_on_real_traffic() {
    edgewise::init_crypto();
    let began = Instant::now();
    let run = tempfile::tempdir().unwrap();
    let pki = Pki::install(run.path()).unwrap();
    let (issuers, issuer_server) = cc::Issuers::start(&pki.issuer_ca).await.unwrap();
    let k1 = Idp::rs256(GITLAB, "k1").unwrap();
    issuers.publish(GITLAB, vec![k1.jwk()]);
    issuers.set_down(GITLAB, true);
    let ai = Server::echo("ai-gateway", Listen::default()).await.unwrap();
    let obs = Server::echo("observability", Listen::default()).await.unwrap();
    let (front_port, admin) = (edgewise::free_port().unwrap(), edgewise::free_port().unwrap());
    let config = pki
        .config_on(Build::Native, run.path(), front_port, issuer_server.port(), ai.port(), obs.port(), admin)
        .replace(JWKS_TIMING, SLOW_TIMING);
    assert!(config.yaml.contains("libedgewise.so"));
    let lds = run.path().join("lds.yaml");
    let (config, listeners) = with_lds(config, &lds);
    write_lds(&lds, &listeners);

    let logs = run.path().join("valgrind");
    let env = vec![(cc::SECRET_ENV.into(), SECRET.into()), ("EDGEWISE_TEST_PANIC_HEADER".into(), PANIC_HEADER.into())];
    let mut envoy = under_memcheck(&config, run.path(), env).await;
    let started = began.elapsed();
    let front = envoy.listener("cloud_connector_https").await.unwrap();
    let client = pki.front_client(false).unwrap().timeout(Duration::from_secs(120));
    let mut report = String::new();

    // Paused at start (the issuer is down): valid requests with bodies, every way, are resumed
    // and forwarded with their bodies; forged ones are answered from the wake-up; one client
    // goes away while its request is paused (the wake-up then finds no stream).
    let instance = "6b1a2c3d-0000-4000-8000-00000000000c";
    let claims = cc::claims(instance, &["code_suggestions"]);
    let valid_token = format!("Bearer {}", k1.token(claims.clone()));
    let forged_token = format!("Bearer {}", Idp::rs256(GITLAB, "k1").unwrap().token(claims.clone()));
    let valid = [("authorization", valid_token.as_bytes())];
    let forged = [("authorization", forged_token.as_bytes())];
    let abandoned = {
        let mut head = edgewise::client::raw_get(b"cloud.gitlab.com", PATH, &[valid[0], ("content-length", b"100")]);
        head.splice(..3, b"POST".iter().copied());
        let (client, front) = (client.clone().timeout(Duration::from_secs(2)), front);
        // The client gives up (times out and closes) while its request is held.
        async move { client.raw(front, "cloud.gitlab.com", &head).await.is_err() }
    };
    let release = async {
        tokio::time::sleep(Duration::from_secs(8)).await;
        issuers.set_down(GITLAB, false);
    };
    let (resumed, refused, gave_up, ()) = tokio::join!(
        hostile::with_bodies(&client, front, "cloud.gitlab.com", PATH, &valid),
        hostile::with_bodies(&client, front, "cloud.gitlab.com", PATH, &forged),
        abandoned,
        release
    );
    for (case, answer) in &resumed {
        assert_eq!(answer, "200", "paused, then resumed: {case}");
    }
    for (case, answer) in &refused {
        assert_eq!(answer, "401", "paused, then refused from the wake-up: {case}");
    }
    assert!(gave_up, "the abandoned request was not answered");
    let bodies = ai.seen().iter().filter(|r| r.body.as_bytes() == hostile::BODY).count();
    assert_eq!(bodies, 4, "each resumed request reached the backend with its body");
    writeln!(report, "- {} paused requests with bodies resumed and forwarded whole, {} refused from the wake-up, 1 abandoned while paused", resumed.len(), refused.len()).unwrap();

    // An unknown kid: paused for a refetch, answered from the wake-up.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stranger = format!("Bearer {}", Idp::rs256(GITLAB, "k-unknown").unwrap().token(claims.clone()));
    let unknown = [("authorization", stranger.as_bytes())];
    let fetches = issuers.jwks_fetches(GITLAB);
    let cases = hostile::body_cases("cloud.gitlab.com", PATH, &unknown);
    assert_eq!(cases[0].send(&client, front, "cloud.gitlab.com").await, "401");
    assert!(issuers.jwks_fetches(GITLAB) > fetches, "the unknown kid paused the request for a refetch");
    writeln!(report, "- an unknown kid paused for a refetch and answered 401 from the wake-up").unwrap();

    // A panic in the filter: a 500, and the next request decided again.
    let req = Request::get("cloud.gitlab.com", PATH).header("authorization", &valid_token).header(PANIC_HEADER, "1");
    assert_eq!(client.send(front, req).await.unwrap().status, 500);
    let req = Request::get("cloud.gitlab.com", PATH).header("authorization", &valid_token);
    assert_eq!(client.send(front, req).await.unwrap().status, 200);
    writeln!(report, "- a panic answered 500, the next request served").unwrap();

    // A reload: the listener and the filter's configuration built anew, the old one released
    // (its ticking thread joined) once drained; the new one fetches its keys and serves.
    let modified = envoy.stat("listener_manager.listener_modified").await.unwrap();
    write_lds(&lds, &listeners.replace("\"wait_ms\": 60000", "\"wait_ms\": 59999"));
    envoy
        .wait_stat("the listener reloaded and the old one drained", Duration::from_secs(120), |s| {
            s.get("listener_manager.listener_modified").copied().unwrap_or(0) > modified
                && s.get("listener_manager.total_listeners_draining").copied() == Some(0)
                && s.get("listener_manager.total_filter_chains_draining").copied().unwrap_or(0) == 0
        })
        .await
        .unwrap();
    let start = Instant::now();
    while !envoy.log().contains("edgewise: cloud-connector: configuration released, its thread stopped") {
        assert!(start.elapsed() < Duration::from_secs(120), "the old configuration was never released");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let start = Instant::now();
    loop {
        let req = Request::get("cloud.gitlab.com", PATH).header("authorization", &valid_token);
        let status = client.send(front, req).await.unwrap().status;
        if status == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "the reloaded configuration never served: {status}");
    }
    writeln!(report, "- a reload: the new configuration served, the old one drained and released").unwrap();

    // Shutdown: every configuration and stream released.
    let status = envoy.terminate(Duration::from_secs(180)).unwrap();
    let ran = began.elapsed();

    let log = valgrind_log(&logs, status);
    let all = errors(&log);
    let ours: Vec<&Reported> = all.iter().filter(|r| r.in_module).collect();
    let invalid = all.iter().filter(|r| r.kind.starts_with("Invalid") || r.kind.starts_with("Mismatched")).count();
    let summary = log
        .lines()
        .filter(|l| l.contains("ERROR SUMMARY") || l.contains("total heap usage"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut md = String::new();
    writeln!(md, "# libedgewise.so under valgrind memcheck\n").unwrap();
    writeln!(md, "`make memcheck` (tests/memcheck.rs): envoy/native/cloud-connector.yaml, two workers, under").unwrap();
    writeln!(md, "`valgrind --tool=memcheck --soname-synonyms=somalloc=NONE` (Envoy's tcmalloc watched).\n").unwrap();
    writeln!(md, "What ran:\n\n{report}- a shutdown (SIGTERM): {status}\n").unwrap();
    writeln!(md, "| | |\n|---|---:|").unwrap();
    writeln!(md, "| Envoy start to ready under memcheck | {:.0} s |", started.as_secs_f64()).unwrap();
    writeln!(md, "| whole run | {:.0} s |", ran.as_secs_f64()).unwrap();
    writeln!(md, "| errors reported, all of Envoy | {} |", all.len()).unwrap();
    writeln!(md, "| of them invalid reads, writes or frees | {invalid} |").unwrap();
    writeln!(md, "| **errors with libedgewise.so on the stack** | **{}** |\n", ours.len()).unwrap();
    writeln!(md, "Valgrind's own summary:\n\n```\n{summary}\n```\n").unwrap();
    writeln!(
        md,
        "That it sees the module's memory was checked once by hand: a read of the stream object after\n\
         `filter_destroy` freed it, added on purpose, was reported (an invalid read with libedgewise.so on\n\
         the stack) and failed the run. A write to it after a reply sent from a wake-up, added on purpose,\n\
         was not: on these paths Envoy 1.40 destroys the filter later (deferred deletion), not inside the\n\
         reply. The binding does not rely on that (a reply is the last thing a hook does).\n"
    )
    .unwrap();
    let kinds: std::collections::BTreeMap<&str, usize> = all.iter().fold(Default::default(), |mut m, r| {
        *m.entry(r.kind.split(" at 0x").next().unwrap_or(&r.kind)).or_default() += 1;
        m
    });
    if !kinds.is_empty() {
        writeln!(md, "The kinds of error reported:\n").unwrap();
        for (kind, n) in &kinds {
            writeln!(md, "- {n} × {kind}").unwrap();
        }
    }
    if let Ok(path) = std::env::var("EDGEWISE_MEMCHECK_REPORT") {
        std::fs::write(edgewise::repo_root().join(path), &md).unwrap();
    }
    println!("{md}");
    for r in &ours {
        eprintln!("{}\n", r.text);
    }
    assert!(ours.is_empty(), "{} errors with libedgewise.so on the stack (above)", ours.len());
}

/// Envoy on `config` under valgrind's memcheck, logging under `<run>/valgrind`, with `env`.
async fn under_memcheck(config: &Config, run: &Path, env: Vec<(String, String)>) -> Envoy {
    let options = Options {
        env,
        wrapper: memcheck(&run.join("valgrind")),
        args: vec!["--drain-time-s".into(), "2".into(), "--parent-shutdown-time-s".into(), "3".into()],
        ready_within: Duration::from_secs(300),
        ..Options::default()
    };
    let work = run.join("envoy");
    std::fs::create_dir_all(&work).unwrap();
    Envoy::start_in(config, &work, options).await.unwrap()
}

/// Envoy's wrapper: valgrind's memcheck, logging under `logs`.
fn memcheck(logs: &Path) -> Vec<String> {
    std::fs::create_dir_all(logs).unwrap();
    [
        "valgrind",
        "--tool=memcheck",
        // Envoy links tcmalloc: its malloc is the one to watch.
        "--soname-synonyms=somalloc=NONE",
        "--num-callers=40",
        "--error-limit=no",
        "--trace-children=no",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--log-file={}/memcheck.%p.log", logs.display())])
    .collect()
}

/// What valgrind wrote under `logs`, which must end with its summary.
fn valgrind_log(logs: &Path, status: std::process::ExitStatus) -> String {
    let mut log = String::new();
    for entry in std::fs::read_dir(logs).unwrap() {
        log.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    assert!(log.contains("ERROR SUMMARY"), "valgrind wrote no summary (exit {status}):\n{log}");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_streamed_route_watch_has_no_invalid_memory_access() {
    edgewise::init_crypto();
    let run = tempfile::tempdir().unwrap();
    let pki = sl::Pki::install(run.path()).unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_edgewise-control"));
    let db = run.path().join("control.db");
    let mut control = ControlService::start(binary, run.path(), &db, (0, 0, 0), &[]).await.unwrap();
    let config = Config::shipped_as("serverless-xds", Build::Native)
        .run_dir(run.path())
        .port(sl::ports::FRONT, 0)
        .port(control::GRPC_PORT, control.grpc)
        .port(control::ROUTES_PORT, control.routes_port());
    assert!(config.yaml.contains("libedgewise.so"));
    let logs = run.path().join("valgrind");
    let mut envoy = under_memcheck(&config, run.path(), Vec::new()).await;
    let front = envoy.listener("serverless_https").await.unwrap();
    let client = pki.front_client(false).unwrap().sni(sl::INLINE_HOST).timeout(Duration::from_secs(60));
    let leaf = sl::gateway_leaf(&pki.customer_a_ca, "customer-a").unwrap();
    let gateway = sl::gateway("customer-a", 0, &leaf, &pki.platform_ca).await.unwrap();
    control
        .put_customer("customer-a", gateway.port(), &[&pki.customer_a_ca], "ingress.customer-a.example")
        .await
        .unwrap();
    async fn routed(
        client: &edgewise::client::Client,
        front: std::net::SocketAddr,
        control: &ControlService,
        label: &str,
    ) {
        control.put_function(&format!("f-{label}"), label, "customer-a", sl::INLINE_KNATIVE_HOST).await.unwrap();
        let (host, start) = (format!("{label}.serverless.gitlab.io"), Instant::now());
        while client.get(front, &host, "/").await.map(|r| r.status).unwrap_or(0) != 200 {
            assert!(start.elapsed() < Duration::from_secs(180), "{host} never routed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Functions put one after the other: each comes as a line of the one stream.
    for label in ["00000001-0000000b-000000000c", "00000002-0000000b-000000000c", "00000003-0000000b-000000000c"] {
        routed(&client, front, &control, label).await;
    }
    let streams = control.metric("edgewise_control_route_streams_total").await.unwrap();
    let lines = control.metric("edgewise_control_route_stream_lines_total").await.unwrap();
    assert_eq!(streams, 1.0, "one stream");
    assert!(lines >= 2.0, "the changes came as lines: {lines}");
    // The service restarts: the stream is reset, and streamed again from its cursor.
    assert!(control.stop().await.unwrap().success());
    control.start_again().await.unwrap();
    control.ready(Duration::from_secs(30)).await.unwrap();
    routed(&client, front, &control, "00000004-0000000b-000000000c").await;
    assert_eq!(control.metric("edgewise_control_route_streams_total").await.unwrap(), 1.0, "streamed again");
    // Shutdown with the stream open.
    let status = envoy.terminate(Duration::from_secs(180)).unwrap();
    let log = valgrind_log(&logs, status);
    let all = errors(&log);
    let ours: Vec<&Reported> = all.iter().filter(|r| r.in_module).collect();
    println!("{} errors reported in all of Envoy, {} with libedgewise.so on the stack", all.len(), ours.len());
    for r in &ours {
        eprintln!("{}\n", r.text);
    }
    assert!(ours.is_empty(), "{} errors with libedgewise.so on the stack (above)", ours.len());
}
