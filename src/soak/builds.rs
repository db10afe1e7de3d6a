//! One build per child process (EDGEWISE_BUILD set for it), and the whole run's report,
//! bench/soak.md.

use std::fmt::Write as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::chaos::secs;
use super::load::{probe, run};
use super::report::{check, Row};
use super::rss::{cpu_ticks, machine_ticks};
use super::scenario::Scenario;
use crate::envoy::Build;
use crate::idp;

/// Time kept at the end of a build's budget for reading the results and stopping everything.
const TEARDOWN: Duration = Duration::from_secs(4);

/// What the soak does, for the report.
const ABOUT: &str = include_str!("about.md");

/// One build's results, handed from its process to the parent as JSON.
#[derive(Serialize, Deserialize, Default)]
struct Part {
    build: String,
    ok: bool,
    setup_seconds: f64,
    load_seconds: f64,
    rows: Vec<Row>,
    problems: Vec<String>,
    markdown: String,
}

/// SOAK_RPS and SOAK_TASKS: (requests per second, tasks), per scenario.
fn settings() -> (f64, usize) {
    let rps = std::env::var("SOAK_RPS").ok().and_then(|v| v.parse().ok()).unwrap_or(20.0f64);
    let tasks = std::env::var("SOAK_TASKS").ok().and_then(|v| v.parse().ok()).unwrap_or(8usize);
    (rps.max(0.1), tasks.max(1))
}

/// A child process: sets up every scenario, runs them all at once for the rest of the build's
/// budget and writes its part of the report to `out`; true if nothing was unexpected.
async fn one_build<F, Fut>(out: &Path, setup: F) -> Result<bool>
where
    F: FnOnce(PathBuf, u64) -> Fut,
    Fut: Future<Output = Result<Vec<Scenario>>>,
{
    crate::init_crypto();
    let build = Build::current();
    let budget = secs(std::env::var("SOAK_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(300));
    let (rps, workers) = settings();
    let t0 = Instant::now();
    let long_exp = idp::now() + budget.as_secs() + 3600;
    let dir = tempfile::Builder::new().prefix("edgewise-soak-").tempdir()?;
    let mut part = Part { build: format!("{build:?}").to_lowercase(), ..Part::default() };
    let scenarios: Vec<Arc<Scenario>> = match setup(dir.path().to_path_buf(), long_exp).await {
        Ok(s) => s.into_iter().map(Arc::new).collect(),
        Err(e) => {
            part.problems.push(format!("set-up failed: {e:#}"));
            part.markdown = format!("## {} build\n\n**Set-up failed**: {e:#}\n", part.build);
            std::fs::write(out, serde_json::to_string(&part)?)?;
            eprintln!("soak: set-up failed: {e:#}");
            return Ok(false);
        }
    };
    if std::env::var("SOAK_PROBE").is_ok_and(|v| v == "1") {
        probe(&scenarios).await;
        std::fs::write(out, serde_json::to_string(&Part { ok: true, ..part })?)?;
        return Ok(true);
    }
    part.setup_seconds = t0.elapsed().as_secs_f64();
    let load = budget.saturating_sub(t0.elapsed()).saturating_sub(TEARDOWN).max(secs(10));
    let start = Instant::now() + Duration::from_millis(500);
    let deadline = start + load;
    eprintln!(
        "soak: {} build: load for {:.0} s, {rps} requests/s per scenario from {workers} tasks",
        part.build,
        load.as_secs_f64()
    );
    let pids: Vec<String> =
        scenarios.iter().flat_map(|s| s.watched.iter().map(|w| w.envoy.pid().to_string())).collect();
    let ours = |pids: &[String]| cpu_ticks("self") + pids.iter().map(|p| cpu_ticks(p)).sum::<u64>();
    let (cpu0, m0) = (ours(&pids), machine_ticks());
    let handles: Vec<_> = scenarios
        .iter()
        .map(|sc| {
            let sc = sc.clone();
            tokio::spawn(async move {
                let ran = run(sc.clone(), workers, rps, start, deadline).await;
                check(&sc, &ran.load, &ran.baseline, &ran.last, &ran.rss, build, start)
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for h in handles {
        outcomes.push(h.await?);
    }
    let (cpu1, m1) = (ours(&pids), machine_ticks());
    part.load_seconds = load.as_secs_f64();
    let elapsed_ticks = (m1.1 - m0.1).max(1) as f64;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let busy = (m1.0 - m0.0) as f64 / elapsed_ticks * cores;
    let mine = (cpu1 - cpu0) as f64 / elapsed_ticks * cores;
    let others = (busy - mine).max(0.0);
    let requests: u64 = outcomes.iter().map(|o| o.row.requests).sum();
    part.problems = outcomes.iter().flat_map(|o| o.problems.clone()).collect();
    part.ok = part.problems.is_empty();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## {} build ({})\n\nSet-up {:.0} s, then {:.0} s of load: {rps} requests/s per scenario from {workers} tasks each, all five scenarios at once, {requests} requests in all. CPU over the load (of {cores:.0} cores): this soak (client, stand-ins and its {} Envoys) {mine:.2} cores on average, other processes {others:.2}.{}\n",
        part.build,
        if build == Build::Wasm { "`envoy/*.yaml`, the .wasm modules" } else { "`envoy/native/*.yaml`, libedgewise.so" },
        part.setup_seconds,
        part.load_seconds,
        pids.len(),
        if others > 0.3 { " **Other processes took a noticeable share of the machine during the load: latencies and start lags below are affected.**" } else { "" }
    );
    md.push('\n');
    for o in &outcomes {
        md.push_str(&o.markdown);
    }
    part.markdown = md;
    part.rows = outcomes.into_iter().map(|o| o.row).collect();
    std::fs::write(out, serde_json::to_string(&part)?)?;
    drop(scenarios);
    Ok(part.ok)
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The parent process: runs each build in a child of its own and writes bench/soak.md.
fn parent() -> Result<bool> {
    let total: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| v.parse())
        .transpose()
        .context("SOAK_SECONDS")?
        .unwrap_or(600);
    let builds: Vec<&str> = match std::env::var("EDGEWISE_BUILD").as_deref() {
        Err(_) | Ok("") => vec!["wasm", "native"],
        Ok("wasm") => vec!["wasm"],
        Ok("native") => vec!["native"],
        Ok(other) => bail!("EDGEWISE_BUILD={other}: use wasm or native"),
    };
    let per_build = total / builds.len() as u64;
    let (rps, workers) = settings();
    let exe = std::env::current_exe()?;
    let dir = crate::repo_root().join("target/soak");
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut parts = Vec::new();
    for build in &builds {
        let out = dir.join(format!("{build}.json"));
        let _ = std::fs::remove_file(&out);
        eprintln!("soak: the {build} build, {per_build} s");
        let status = Command::new(&exe)
            .env("EDGEWISE_BUILD", build)
            .env("SOAK_SECONDS", per_build.to_string())
            .env("SOAK_PART", &out)
            .status()
            .context("running the soak of one build")?;
        let part: Part = match std::fs::read_to_string(&out).ok().and_then(|t| serde_json::from_str(&t).ok()) {
            Some(p) => p,
            None => Part {
                build: build.to_string(),
                problems: vec![format!("the {build} build's soak ended ({status}) without results")],
                markdown: format!("## {build} build\n\n**No results**: the soak process ended with {status}.\n"),
                ..Part::default()
            },
        };
        parts.push(part);
    }
    if std::env::var("SOAK_PROBE").is_ok_and(|v| v == "1") {
        return Ok(parts.iter().all(|p| p.ok));
    }
    let ok = parts.iter().all(|p| p.ok && p.problems.is_empty());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let envoy_version = command_output(&crate::envoy::binary().display().to_string(), &["--version"]);
    let envoy_version = envoy_version.split_once("version: ").map_or(envoy_version.clone(), |(_, v)| v.to_string());
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let loadavg = |s: &str| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Soak: every scenario under mixed load while certificates rotate and services flap\n\n\
         `make soak` (`src/bin/edgewise-soak.rs`). Last run: {date}, {:.0} s in all.\n\n\
         - Machine: {cores} cores, {cpu}, {mem:.1} GiB; load average {} before, {} after\n\
         - Envoy: {envoy_version}\n\
         - Settings: SOAK_SECONDS={total} ({} build{}, {per_build} s each, set-up included), SOAK_RPS={rps} per scenario, SOAK_TASKS={workers}\n\
         - Verdict: **{}**\n",
        started.elapsed().as_secs_f64(),
        loadavg(&load_before),
        loadavg(&load_after),
        builds.len(),
        if builds.len() == 1 { "" } else { "s" },
        if ok { "pass: no unexpected answer, no VM failure, RSS flat, every counter as sent" } else { "FAIL (problems listed below)" }
    );
    md.push_str(ABOUT);
    let _ = writeln!(md, "\n## Summary\n\n| build | scenario | requests | unexpected | VM failures / panics | Envoy RSS start -> end, slope (second half) | metric checks |\n|---|---|---:|---:|---:|---|---|");
    for p in &parts {
        for r in &p.rows {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                p.build, r.scenario, r.requests, r.unexpected, r.vm_failures, r.rss, r.metrics
            );
        }
    }
    let problems: Vec<String> =
        parts.iter().flat_map(|p| p.problems.iter().map(move |x| format!("{}: {x}", p.build))).collect();
    let _ = writeln!(
        md,
        "\n{}\n",
        if problems.is_empty() {
            "No problems.".to_string()
        } else {
            format!("Problems:\n\n{}", problems.iter().map(|p| format!("- {p}")).collect::<Vec<_>>().join("\n"))
        }
    );
    for p in &parts {
        md.push_str(&p.markdown);
        md.push('\n');
    }
    let path = crate::repo_root().join("bench/soak.md");
    std::fs::write(&path, md)?;
    eprintln!("soak: wrote {}; {}", path.display(), if ok { "pass" } else { "FAIL" });
    for p in &problems {
        eprintln!("soak: {p}");
    }
    Ok(ok)
}

/// The soak's `main`: the parent runs each build in a child process of its own; a child
/// (SOAK_PART set) sets up the scenarios with `setup` (a run directory, an expiry for long-lived
/// tokens) and runs them.
pub fn main<F, Fut>(setup: F)
where
    F: FnOnce(PathBuf, u64) -> Fut,
    Fut: Future<Output = Result<Vec<Scenario>>>,
{
    let result = match std::env::var_os("SOAK_PART") {
        Some(out) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(one_build(&PathBuf::from(out), setup))),
        None => parent(),
    };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("soak: {e:#}");
            std::process::exit(2);
        }
    }
}
