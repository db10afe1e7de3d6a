//! `make bench`, the second instrument: Envoy's instructions per request under valgrind's
//! callgrind, for every configuration that runs natively (libedgewise.so, the module whose hooks
//! do nothing, Lua, jwt_authn, the stock chain) and the reference. Instruction counts do not move
//! with the machine, so these verdicts hold on a noisy VM; the paired CPU time of edgewise-bench
//! stays for the wasm build (V8's JIT under valgrind is not what runs) and for wall-clock figures.
//!
//! Each configuration runs in its own front Envoy (`--concurrency 1`) under callgrind, with the
//! same services as edgewise-bench. After a warm-up, one keep-alive connection sends N requests,
//! then 3N; callgrind's counters are dumped (and zeroed) between the phases, and the difference
//! of the two phases over 2N is the figure: what a phase costs whatever its length cancels out.
//! The pair of phases is measured three times and the median kept (a phase may catch a timer).
//! The reference runs first and last, to show how reproducible a figure is.
//!
//! Environment: BENCH_INSTR_REQUESTS (N, default 300), BENCH_ONLY (comma-separated substrings of
//! configuration names), BENCH_OUT_INSTRUCTIONS (default bench/results-instructions.md).

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Context, Result};
use edgewise::bench::*;
use edgewise::callgrind::{self, PerUnit};

/// Envoy's ABI callbacks: what libedgewise.so asks of Envoy.
const CALLBACKS: &str = "envoy_dynamic_module_callback_";

/// The targets of the issue on instructions: (configuration, compared with, the most it may add
/// as a ratio of what the other adds, what it means).
const TARGETS: &[(&str, &str, f64, &str)] = &[
    ("serverless-10-native", "lua-serverless", 0.5, "native serverless ≤ 0.5 × Lua doing the same"),
    ("egress-native", "lua-egress", 0.5, "native egress ≤ 0.5 × Lua doing the same"),
    ("cc-hit-native", "stock-chain", 1.0, "native cloud-connector, cached token ≤ 1.0 × the stock chain"),
    (
        "cc-hit-lean-native",
        "jwt_authn-cache",
        1.0,
        "native cloud-connector without rate limit and signature ≤ 1.0 × jwt_authn with its cache",
    ),
    ("cc-miss-native", "jwt_authn", 1.0, "native cloud-connector, a new token ≤ 1.0 × jwt_authn without its cache"),
    ("cc-miss-lean-native", "jwt_authn", 1.0, "the same without rate limit and signature, as jwt_authn does neither"),
];
/// The native floor: a filter passing a request through, over a module whose hooks do nothing.
const FLOOR: (&str, &str, f64) = ("native-floor", "noop-module", 3000.0);

/// The lean cached-token target split at the floor of its edits: what bench/noop-module adds
/// over carrying the token when it makes cc-hit-lean-native's edits and nothing else, step by
/// step, and what the filter adds beyond them (reading, the token cache, deciding), each against
/// jwt_authn with its cache over the same. Empty when one of them was not measured.
fn lean_against_its_edits(added: &dyn Fn(&str) -> Option<f64>) -> String {
    let names = ["baseline-token", "identity-edits", "cc-lean-edits", "cc-lean-edits-reroute", "cc-hit-lean-native"];
    let [Some(token), Some(identity), Some(edits), Some(reroute), Some(lean)] = names.map(added) else {
        return String::new();
    };
    let Some(jwt) = added("jwt_authn-cache").map(|j| j - token).filter(|j| *j > 0.0) else {
        return String::new();
    };
    let rows = [
        ("the module's hooks and the four identity headers set (identity-edits)", identity - token),
        ("the cluster header set, the signature header removed, the access log's three fields (cc-lean-edits over identity-edits)", edits - identity),
        ("the route matched again for the cluster it chose (cc-lean-edits-reroute over cc-lean-edits)", reroute - edits),
        ("the rest: reading five headers, the token cache, the scopes, the decision (cc-hit-lean-native over cc-lean-edits-reroute)", lean - reroute),
    ];
    let mut out = format!(
        "### The lean target against the floor of its edits\n\n\
         Over the same request carrying its token (baseline-token), jwt_authn with its cache adds {jwt:+.0}. \
         bench/noop-module making cc-hit-lean-native's edits and nothing else adds {:+.0} ({:.2} of it), \
         and the four identity headers alone {:+.0} ({:.2}): before any reading or deciding, more than \
         jwt_authn's whole cached path. No native filter making these edits can meet the target.\n\n\
         | part of cc-hit-lean-native over baseline-token | instructions per request | of jwt_authn-cache's {jwt:+.0} |\n|---|---:|---:|\n",
        reroute - token,
        (reroute - token) / jwt,
        identity - token,
        (identity - token) / jwt,
    );
    for (what, x) in rows {
        let _ = writeln!(out, "| {what} | {x:+.0} | {:.2} |", x / jwt);
    }
    out.push('\n');
    out
}

/// Instructions per request in SHA-256's portable code: under valgrind there is no SHA-NI.
fn portable_sha256(per: &PerUnit) -> f64 {
    zero(per.self_.iter().filter(|(f, _)| f.name.starts_with("sha2::sha256::")).map(|(_, v)| v).sum())
}

/// A difference of two equal counts, shown as 0 (not -0).
fn zero(x: f64) -> f64 {
    if x.abs() < 0.005 {
        0.0
    } else {
        x
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = std::env::var("BENCH_INSTR_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let work = edgewise::repo_root().join("target/bench-instructions");
    std::fs::create_dir_all(&work)?;
    let idp = edgewise::idp::Idp::rs256(ISSUER, "bench-1")?;
    let jwks = serde_json::json!({ "keys": [idp.jwk()] }).to_string();
    // Fresh tokens: the probe's, the warm-up's, and every N and 3N, never one twice.
    let tokens = sign_tokens(&idp, tokens_for(n));
    let services =
        Services::start(&work, &jwks, &std::env::current_exe()?.with_file_name("edgewise-ratelimit")).await?;
    let benches: Vec<Bench> = benches(&jwks, &edgewise::noop_module())
        .into_iter()
        .filter(|b| !b.filters.contains("wasm.v3.Wasm"))
        .filter(|b| b.name == "baseline" || only.is_empty() || only.split(',').any(|o| b.name.contains(o)))
        .collect();
    let mut measured: Vec<(&Bench, PerUnit)> = Vec::new();
    for bench in &benches {
        let started = Instant::now();
        let per = instructions(bench, services.ports, &tokens, n, &work).await.with_context(|| bench.name)?;
        eprintln!(
            "{:<24} {:>10.0} instructions per request ({:.0} s)",
            bench.name,
            per.total,
            started.elapsed().as_secs_f64()
        );
        measured.push((bench, per));
    }
    // The reference again, last: how far one figure moves between runs.
    let again = instructions(&benches[0], services.ports, &tokens, n, &work).await.context("baseline again")?;
    drop(services);

    let reference = &measured[0].1;
    let added = |name: &str| measured.iter().find(|(b, _)| b.name == name).map(|(_, p)| p.total - reference.total);
    let mut table = String::new();
    for (bench, per) in &measured {
        let module = zero(per.in_object("libedgewise.so"));
        let hooks = zero(per.inclusive_of("envoy_dynamic_module_on_http_filter_"));
        let callbacks = zero(per.inclusive_of(CALLBACKS));
        let sha256 = portable_sha256(per);
        let native = bench.filters.contains("DynamicModuleFilter");
        let _ = writeln!(
            table,
            "| {} ({}) | {:.0} | {:+.0} | {} | {} |",
            bench.name,
            if bench.what.is_empty() { "the reference" } else { bench.what },
            per.total,
            per.total - reference.total,
            if native {
                format!(
                    "{:.0} in the hooks: {:.0} in libedgewise.so's code ({:.0} of it portable SHA-256), {:.0} in Envoy's ABI callbacks",
                    hooks, module, sha256, callbacks
                )
            } else {
                "–".into()
            },
            if native { format!("{:.2}", zero(per.rust_allocations())) } else { "–".into() },
        );
    }
    let mut targets = String::new();
    // SHA-256 runs its portable code under valgrind; natively it uses SHA-NI where the CPU has it.
    let sha256 = |name: &str| measured.iter().find(|(b, _)| b.name == name).map_or(0.0, |(_, p)| portable_sha256(p));
    for (a, b, limit, what) in TARGETS {
        let _ = match (added(a), added(b)) {
            (Some(x), Some(y)) if y > 0.0 => writeln!(
                targets,
                "| {what} | {a} {x:+.0}, {b} {y:+.0}: ratio {:.2}{} | {} |",
                x / y,
                match sha256(a) {
                    s if s >= 1.0 => format!(
                        " (without its {s:.0} of portable SHA-256, which natively runs on SHA-NI: {:.2})",
                        (x - s) / y
                    ),
                    _ => String::new(),
                },
                if x / y <= *limit { "met" } else { "**not met**" }
            ),
            _ => writeln!(targets, "| {what} | not measured in this run | – |"),
        };
    }
    let (floor, noop, limit) = FLOOR;
    let _ = match (added(floor), added(noop)) {
        (Some(x), Some(y)) => writeln!(
            targets,
            "| the native floor ≤ {limit:.0} instructions over a module whose hooks do nothing | {floor} {x:+.0}, {noop} {y:+.0}: {:+.0} | {} |",
            x - y,
            if x - y <= limit { "met" } else { "**not met**" }
        ),
        _ => writeln!(targets, "| the native floor | not measured in this run | – |"),
    };
    let lean = lean_against_its_edits(&added);
    // A configuration is profiled over what it differs from least: one whose requests carry a
    // bearer token over the reference carrying the same token (what parsing and forwarding it
    // costs Envoy is not the filter's), another native one over the module whose hooks do nothing
    // (what the filter makes Envoy and itself do beyond the ABI's dispatch), the rest over the
    // reference.
    let find = |name: &str| measured.iter().find(|(b, _)| b.name == name).map(|(b, p)| (b.name, p));
    let (noop, token) = (find(FLOOR.1), find("baseline-token"));
    let mut profiles = String::new();
    for (bench, per) in measured.iter().skip(1) {
        let native = bench.filters.contains("DynamicModuleFilter");
        let (base_name, base) = match (noop, token) {
            (_, Some((name, p))) if !matches!(bench.tokens, Tokens::None) && bench.name != name => (name, p),
            (Some((name, p)), _) if native && bench.name != name => (name, p),
            _ => ("the reference", reference),
        };
        let _ = writeln!(
            profiles,
            "### {}\n\n{:+.0} instructions per request over {base_name}. Per function, the self instructions this configuration runs per request more than {base_name} (Envoy's binary is stripped, so its own functions are addresses, but its exported ABI callbacks are named):\n\n| function | object | added per request |\n|---|---|---:|",
            bench.name,
            per.total - base.total
        );
        for (f, v) in per.added_over(base).into_iter().take(12).filter(|(_, v)| *v >= 50.0) {
            let _ = writeln!(profiles, "| `{}` | {} | {v:.0} |", f.name, callgrind::short_object(&f.object));
        }
        profiles.push('\n');
    }
    let report = format!(
        "# Instructions per request (callgrind)\n\n\
         Produced by `make bench` (edgewise-instructions, N = {n}). Each configuration runs in its own front Envoy (`--concurrency 1`, the same bench/front.yaml and services as edgewise-bench) under `valgrind --tool=callgrind`; after a warm-up, one keep-alive connection sends N and then 3N requests, callgrind's counters dumped between the phases, and the figure is the difference over 2N, the median of three such pairs. Every request must be answered 200. The reference ran first and last: {first:.0} and {last:.0} instructions per request ({spread:+.2} %), which is how far a figure moves between runs.\n\n\
         Valgrind's virtual CPU has no SHA-NI and no AVX-512, so code that picks its path by CPU feature (SHA-256 in the HMAC signature and in RS256, ring, BoringSSL) runs its portable path here: those configurations are judged by the paired CPU time of bench/results.md as well. Envoy's own configurations (Lua, jwt_authn, the stock chain) are measured the same way; the wasm build is not (V8's JIT under valgrind is not what runs).\n\n\
         | configuration | instructions per request | added over the reference | of which (native) | Rust heap allocations per request |\n|---|---:|---:|---|---:|\n{table}\n\
         ## Targets\n\n| target | measured (instructions per request added over the reference) | |\n|---|---|---|\n{targets}\n{lean}\
         ## Where the instructions go\n\n{profiles}",
        first = reference.total,
        last = again.total,
        spread = (again.total - reference.total) / reference.total * 100.0,
    );
    let out = std::env::var("BENCH_OUT_INSTRUCTIONS").unwrap_or_else(|_| "bench/results-instructions.md".into());
    std::fs::write(edgewise::repo_root().join(out), &report)?;
    println!("{report}");
    Ok(())
}
