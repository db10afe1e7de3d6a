//! `make bench`: each configuration in a fresh front Envoy (--concurrency 1, pinned to CPU 0);
//! wrk and an upstream Envoy answering with direct_response on CPU 1. Configurations run in
//! rounds with a rotating order and the medians are reported, because this machine is shared
//! and noisy. The key figure is the front Envoy's CPU time per request (from /proc), as a ratio
//! to the no-filter baseline and as microseconds added per request.
//!
//! Environment: BENCH_ROUNDS (default 5), BENCH_SECONDS (default 3: 1-second bursts, each paired with one on the reference), BENCH_ONLY (comma-separated
//! substrings of configuration names to run), BENCH_TOKENS (distinct tokens signed).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use edgewise::bench::*;
use edgewise::envoy::{Envoy, Options};
use edgewise::scale::median;

#[derive(Default, Clone)]
struct Sample {
    /// CPU per request of the reference (no-filter) Envoy, measured in the bursts alternating
    /// with this configuration's.
    /// Per pair of bursts (this configuration, then the reference right before it): the CPU per
    /// request this one added, and the ratio.
    pair_added_us: Vec<f64>,
    pair_ratios: Vec<f64>,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_req: f64,
    rps_c1: f64,
    p50_c1_us: f64,
    rss_mib: f64,
    /// RSS with `--concurrency 2` (measured in the first round only).
    rss2_mib: Option<f64>,
    ready_s: f64,
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).context("parsing /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

struct Wrk {
    requests: f64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

fn parse_duration_us(s: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1_000.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

/// The wrk Lua script that sends each token of the file in `BENCH_TOKENS` in turn.
/// Where in the token list the next wrk run starts (the script wraps around).
static TOKEN_OFFSET: AtomicUsize = AtomicUsize::new(0);

const TOKENS_LUA: &str = r#"
local tokens = {}
for line in io.lines(os.getenv("BENCH_TOKENS")) do tokens[#tokens + 1] = "Bearer " .. line end
local i = tonumber(os.getenv("BENCH_TOKEN_OFFSET") or "0")
request = function()
  i = i % #tokens + 1
  wrk.headers["Authorization"] = tokens[i]
  return wrk.format()
end
"#;

fn wrk(
    addr: std::net::SocketAddr,
    bench: &Bench,
    connections: u32,
    seconds: u64,
    tokens: Option<&Path>,
) -> Result<Wrk> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1", "wrk", "-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency"])
        .args(["-H", &format!("Host: {}", bench.host)]);
    if let Some(tokens) = tokens {
        // Each run goes on where the last one stopped: a fresh-token configuration must never
        // see a token twice (its cache would answer), and one Envoy serves several runs.
        cmd.env("BENCH_TOKENS", tokens)
            .env("BENCH_TOKEN_OFFSET", TOKEN_OFFSET.load(Ordering::Relaxed).to_string())
            .args(["-s", &tokens.with_extension("lua").display().to_string()]);
    }
    let out = cmd.arg(format!("http://{addr}{}", bench.path)).output().context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut w = Wrk { requests: 0.0, rps: 0.0, p50_us: 0.0, p99_us: 0.0 };
    for line in text.lines() {
        let t = line.trim();
        let parts: Vec<&str> = t.split_whitespace().collect();
        match parts.as_slice() {
            ["Requests/sec:", v] => w.rps = v.parse().unwrap_or(0.0),
            ["50%", v] => w.p50_us = parse_duration_us(v).unwrap_or(0.0),
            ["99%", v] => w.p99_us = parse_duration_us(v).unwrap_or(0.0),
            [n, "requests", "in", ..] => w.requests = n.parse().unwrap_or(0.0),
            _ => {}
        }
        if t.starts_with("Non-2xx") {
            bail!("wrk saw errors: {text}");
        }
    }
    if w.requests == 0.0 {
        bail!("wrk made no requests: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    }
    TOKEN_OFFSET.fetch_add(w.requests as usize, Ordering::Relaxed);
    Ok(w)
}

/// Waits until the configuration answers 200 (a polled table or fetched keys may take a moment).
async fn until_ok(addr: std::net::SocketAddr, bench: &Bench, token: &str) -> Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let bearer = format!("Bearer {token}");
    loop {
        let mut req = edgewise::client::Request::get(bench.host, bench.path);
        if bench.tokens != Tokens::None {
            req = req.header("authorization", &bearer);
        }
        let r = edgewise::client::Client::plain().send(addr, req).await?;
        if r.status == 200 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{}: warm-up request answered {}: {}", bench.name, r.status, r.text());
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Accumulated 1-second wrk bursts (32 connections) on one Envoy.
#[derive(Default)]
struct Bursts {
    ticks: u64,
    requests: f64,
    seconds: f64,
    p50s: Vec<f64>,
    p99s: Vec<f64>,
    /// CPU per request of each burst.
    per_burst: Vec<f64>,
}

/// One 1-second burst at 32 connections: wrk's figures and the Envoy's CPU ticks (10 ms) it took.
fn burst(addr: std::net::SocketAddr, pid: u32, bench: &Bench, tokens: Option<&Path>) -> Result<(Wrk, u64)> {
    let before = cpu_ticks(pid)?;
    let w = wrk(addr, bench, 32, 1, tokens)?;
    Ok((w, cpu_ticks(pid)? - before))
}

fn us_per_request(ticks: u64, requests: f64) -> f64 {
    ticks as f64 * 10_000.0 / requests.max(1.0)
}

impl Bursts {
    fn run(&mut self, addr: std::net::SocketAddr, pid: u32, bench: &Bench, tokens: Option<&Path>) -> Result<()> {
        let (w, ticks) = burst(addr, pid, bench, tokens)?;
        self.per_burst.push(us_per_request(ticks, w.requests));
        self.ticks += ticks;
        self.requests += w.requests;
        self.seconds += 1.0;
        self.p50s.push(w.p50_us);
        self.p99s.push(w.p99_us);
        Ok(())
    }

    /// CPU time per request (summed over the bursts).
    fn cpu_us_per_req(&self) -> f64 {
        us_per_request(self.ticks, self.requests)
    }
}

/// The comparisons of the targets, measured head to head after the rounds: both
/// configurations run at once and 1-second bursts rotate between them and the reference, so
/// each difference comes from bursts seconds apart, not minutes.
const HEAD_TO_HEAD: &[(&str, &str)] = &[
    ("serverless-10", "lua-serverless"),
    ("serverless-100k", "serverless-10"),
    ("egress", "lua-egress"),
    ("cc-hit", "jwt_authn-cache"),
    ("cc-miss", "jwt_authn"),
    ("serverless-10-native", "lua-serverless"),
    ("egress-native", "lua-egress"),
    ("cc-hit-native", "jwt_authn-cache"),
    ("cc-miss-native", "jwt_authn"),
    ("cc-hit-native", "stock-chain"),
    ("cc-hit-lean-native", "jwt_authn-cache"),
    ("native-floor", "noop-module"),
    ("cc-many-global", "cc-many"),
    ("cc-many-global-native", "cc-many-native"),
    ("cc-hit-global", "cc-hit"),
];

/// The targets judged head to head: (what, a configuration, the one it is compared with, the most
/// its added CPU may be as a ratio of the other's).
const CPU_TARGETS: &[(&str, &str, &str, f64)] = &[
    ("serverless adds no more than Lua doing the same (ratio ≤ 1.0)", "serverless-10", "lua-serverless", 1.0),
    ("egress adds no more than Lua doing the same (ratio ≤ 1.0)", "egress", "lua-egress", 1.0),
    ("serverless costs the same with 100,000 routes as with 10 (ratio ≤ 1.15: run-to-run noise here is ±10 µs)", "serverless-100k", "serverless-10", 1.15),
    ("cloud-connector, cached token, adds no more than jwt_authn with its cache (ratio ≤ 1.0)", "cc-hit", "jwt_authn-cache", 1.0),
    ("cloud-connector, new token per request, adds at most 3x jwt_authn without cache (ratio ≤ 3.0)", "cc-miss", "jwt_authn", 3.0),
    ("native serverless adds no more than Lua doing the same (ratio ≤ 1.0)", "serverless-10-native", "lua-serverless", 1.0),
    ("native egress adds no more than Lua doing the same (ratio ≤ 1.0)", "egress-native", "lua-egress", 1.0),
    ("native cloud-connector, cached token, adds no more than jwt_authn with its cache (ratio ≤ 1.0)", "cc-hit-native", "jwt_authn-cache", 1.0),
    ("native cloud-connector, new token per request, adds at most 3x jwt_authn without cache (ratio ≤ 3.0)", "cc-miss-native", "jwt_authn", 3.0),
    ("native cloud-connector, cached token, adds no more than the stock chain (ratio ≤ 1.0)", "cc-hit-native", "stock-chain", 1.0),
    ("native cloud-connector without rate limit and signature adds no more than jwt_authn with its cache (ratio ≤ 1.0)", "cc-hit-lean-native", "jwt_authn-cache", 1.0),
];

/// The pairs that measure the fleet-wide check against the filter's own buckets: many
/// organizations (the usual case), then one organization whose every request is checked on one
/// counter (the service takes the checks of a counter in turn).
const GLOBAL_CHECK: &[(&str, &str)] =
    &[("cc-many-global", "cc-many"), ("cc-many-global-native", "cc-many-native"), ("cc-hit-global", "cc-hit")];

/// Per rotation (reference, a, b in turn): the CPU per request a and b added over the reference.
#[derive(Default)]
struct Duel {
    a_added: Vec<f64>,
    b_added: Vec<f64>,
    /// For a fleet-wide check: the CPU per request of edgewise-ratelimit and Redis in a's bursts.
    a_services: Vec<f64>,
}

impl Duel {
    /// (a's added µs, b's added µs, a - b) medians, and the middle half of a - b.
    fn summary(&self) -> (f64, f64, f64, (f64, f64)) {
        let diff: Vec<f64> = self.a_added.iter().zip(&self.b_added).map(|(a, b)| a - b).collect();
        (median(self.a_added.clone()), median(self.b_added.clone()), median(diff.clone()), middle_half(diff))
    }
}

async fn head_to_head(a: &Bench, b: &Bench, env: &Env, rotations: usize) -> Result<Duel> {
    let tokens = env.tokens(a.tokens);
    let first_token = env.first_token(a.tokens)?;
    let options = || Options { concurrency: 1, log_level: "warning", cpu: Some(0), ..Options::default() };
    let front = |bench: &Bench| front_config(bench, env.ports);
    let (ea, eb) = (Envoy::start_with(&front(a), options()).await?, Envoy::start_with(&front(b), options()).await?);
    let (aa, ab) = (ea.listener("bench").await?, eb.listener("bench").await?);
    until_ok(aa, a, &first_token).await?;
    until_ok(ab, b, &first_token).await?;
    // (address, process, requests as that configuration sends them): the reference gets a's.
    let sides = [(env.reference, env.reference_pid, a), (aa, ea.pid(), a), (ab, eb.pid(), b)];
    for (addr, _, bench) in sides {
        wrk(addr, bench, 32, 1, tokens)?;
    }
    let services = if GLOBAL_CHECK.iter().any(|(g, _)| *g == a.name) { env.ratelimit_pids.as_slice() } else { &[] };
    let services_ticks = || services.iter().map(|p| cpu_ticks(*p)).sum::<Result<u64>>();
    let mut duel = Duel::default();
    for r in 0..rotations {
        let mut cpu = [0.0; 3];
        for k in 0..3 {
            let j = (k + r) % 3;
            let (addr, pid, bench) = sides[j];
            let before = services_ticks()?;
            let (w, ticks) = burst(addr, pid, bench, tokens)?;
            cpu[j] = us_per_request(ticks, w.requests);
            if j == 1 && !services.is_empty() {
                duel.a_services.push(us_per_request(services_ticks()? - before, w.requests));
            }
        }
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            eprintln!(
                "  rotation {r}: reference {:.1}  {} {:.1}  {} {:.1} us/req",
                cpu[0], a.name, cpu[1], b.name, cpu[2]
            );
        }
        duel.a_added.push(cpu[1] - cpu[0]);
        duel.b_added.push(cpu[2] - cpu[0]);
    }
    Ok(duel)
}

impl Env {
    fn tokens(&self, tokens: Tokens) -> Option<&Path> {
        match tokens {
            Tokens::None => None,
            Tokens::One => Some(self.one_token.as_path()),
            Tokens::Fresh => Some(self.fresh_tokens.as_path()),
            Tokens::Many => Some(self.many_tokens.as_path()),
        }
    }

    fn first_token(&self, tokens: Tokens) -> Result<String> {
        Ok(match self.tokens(tokens) {
            Some(path) => std::fs::read_to_string(path)?.lines().next().unwrap_or_default().to_string(),
            None => String::new(),
        })
    }
}

struct Env {
    /// The reference front Envoy (no filter) the bursts alternate with, and its process.
    reference: std::net::SocketAddr,
    reference_pid: u32,
    ports: Ports,
    /// edgewise-ratelimit and its Redis: their CPU is the global check's too.
    ratelimit_pids: Vec<u32>,
    one_token: PathBuf,
    fresh_tokens: PathBuf,
    many_tokens: PathBuf,
}

async fn run_one(bench: &Bench, env: &Env, seconds: u64, rss2: bool) -> Result<Sample> {
    let config = front_config(bench, env.ports);
    let tokens = env.tokens(bench.tokens);
    let first_token = env.first_token(bench.tokens)?;
    let started = Instant::now();
    let envoy = Envoy::start_with(
        &config,
        Options { concurrency: 1, log_level: "warning", cpu: Some(0), ..Options::default() },
    )
    .await?;
    let ready_s = started.elapsed().as_secs_f64();
    let addr = envoy.listener("bench").await?;
    until_ok(addr, bench, &first_token).await?;
    // Paired measurement: 1-second bursts alternate between this configuration and the reference
    // Envoy (no filter, same requests), so both see the same machine, however noisy it is.
    let pid = envoy.pid();
    wrk(addr, bench, 32, 1, tokens)?;
    wrk(env.reference, bench, 32, 1, tokens)?;
    let (mut mine, mut base) = (Bursts::default(), Bursts::default());
    for _ in 0..seconds.max(1) {
        base.run(env.reference, env.reference_pid, bench, tokens)?;
        mine.run(addr, pid, bench, tokens)?;
    }
    let c1 = wrk(addr, bench, 1, (seconds / 2).max(1), tokens)?;
    let rss1_mib = rss_mib(pid);
    drop(envoy);
    // RSS with two workers (two more VMs per module), after a short load on both.
    let rss2_mib = if rss2 {
        let envoy =
            Envoy::start_with(&config, Options { concurrency: 2, log_level: "warning", ..Options::default() }).await?;
        let addr = envoy.listener("bench").await?;
        until_ok(addr, bench, &first_token).await?;
        wrk(addr, bench, 8, 1, tokens)?;
        Some(rss_mib(envoy.pid()))
    } else {
        None
    };
    Ok(Sample {
        pair_added_us: mine.per_burst.iter().zip(&base.per_burst).map(|(m, b)| m - b).collect(),
        pair_ratios: mine.per_burst.iter().zip(&base.per_burst).map(|(m, b)| m / b).collect(),
        rps: mine.requests / mine.seconds,
        p50_us: median(mine.p50s.clone()),
        p99_us: median(mine.p99s.clone()),
        cpu_us_per_req: mine.cpu_us_per_req(),
        rps_c1: c1.rps,
        p50_c1_us: c1.p50_us,
        rss_mib: rss1_mib,
        rss2_mib,
        ready_s,
    })
}

/// The first and third quartiles: the middle half of the values lies between them.
fn middle_half(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: usize| v.get(v.len() * q / 4).copied().unwrap_or(0.0);
    (at(1), at(3))
}

#[tokio::main]
async fn main() -> Result<()> {
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let rotations: usize = std::env::var("BENCH_ROTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(8);

    // One RS256 key for cloud-connector and jwt_authn, and the tokens wrk sends: one repeated, and
    // enough distinct ones that a run never sends one twice (each run is a fresh Envoy).
    let idp = edgewise::idp::Idp::rs256(ISSUER, "bench-1")?;
    let jwks = serde_json::json!({ "keys": [idp.jwk()] }).to_string();
    let work = edgewise::repo_root().join("target/bench");
    std::fs::create_dir_all(&work)?;
    let fresh: usize =
        std::env::var("BENCH_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000 * (seconds as usize + 1));
    let started = Instant::now();
    let tokens = sign_tokens(&idp, fresh);
    eprintln!("signed {} tokens in {:.1} s", tokens.len(), started.elapsed().as_secs_f64());
    let one_token = work.join("one-token.txt");
    let fresh_tokens = work.join("fresh-tokens.txt");
    let many_tokens = work.join("many-tokens.txt");
    std::fs::write(&one_token, format!("{}\n", tokens.first().map_or("", String::as_str)))?;
    std::fs::write(&fresh_tokens, tokens.join("\n") + "\n")?;
    std::fs::write(&many_tokens, tokens.iter().take(1000).cloned().collect::<Vec<_>>().join("\n") + "\n")?;
    for path in [&one_token, &fresh_tokens, &many_tokens] {
        std::fs::write(path.with_extension("lua"), TOKENS_LUA)?;
    }
    let benches: Vec<Bench> = benches(&jwks, &edgewise::noop_module())
        .into_iter()
        // The floors of the lean path's edits are instruments of the instruction counts only.
        .filter(|b| !b.name.contains("-edits"))
        .filter(|b| b.name == "baseline" || only.split(',').any(|o| b.name.contains(o)))
        .collect();

    let services =
        Services::start(&work, &jwks, &std::env::current_exe()?.with_file_name("edgewise-ratelimit")).await?;
    let ports = services.ports;
    let reference_bench = Bench {
        name: "reference",
        what: "",
        host: SERVERLESS_HOST,
        path: "/",
        filters: String::new(),
        tokens: Tokens::None,
    };
    let reference = Envoy::start_with(
        &front_config(&reference_bench, ports),
        Options { concurrency: 1, log_level: "warning", cpu: Some(0), ..Options::default() },
    )
    .await?;
    let env = Env {
        reference: reference.listener("bench").await?,
        reference_pid: reference.pid(),
        ports,
        ratelimit_pids: services.ratelimit_pids(),
        one_token,
        fresh_tokens,
        many_tokens,
    };

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); benches.len()];
    for round in 0..rounds {
        for k in 0..benches.len() {
            let i = (k + round) % benches.len();
            let s = run_one(&benches[i], &env, seconds, round == 0).await.with_context(|| benches[i].name)?;
            eprintln!(
                "round {}/{rounds} {:<16} {:>8.0} req/s  cpu {:>6.1} us/req  p50 {:>6.0} us  p99 {:>6.0} us",
                round + 1,
                benches[i].name,
                s.rps,
                s.cpu_us_per_req,
                s.p50_us,
                s.p99_us
            );
            samples[i].push(s);
        }
    }

    let find = |name: &str| benches.iter().find(|b| b.name == name);
    let mut duels = Vec::new();
    for (a, b) in HEAD_TO_HEAD {
        if let (Some(a), Some(b)) = (find(a), find(b)) {
            let duel =
                head_to_head(a, b, &env, rotations).await.with_context(|| format!("{} vs {}", a.name, b.name))?;
            let (a_us, b_us, diff, _) = duel.summary();
            eprintln!(
                "head to head {:<16} {a_us:+6.1} us  {:<16} {b_us:+6.1} us  difference {diff:+6.1} us",
                a.name, b.name
            );
            duels.push((a.name, b.name, duel));
        }
    }

    let med = |i: usize, f: fn(&Sample) -> f64| median(samples[i].iter().map(f).collect());
    // Added CPU per request: the median over every pair of bursts of all rounds (a round the
    // machine was busy in moves it less than a per-round median would).
    let pairs = |i: usize, f: fn(&Sample) -> &Vec<f64>| median(samples[i].iter().flat_map(f).copied().collect());
    let added = |i: usize| pairs(i, |s| &s.pair_added_us);
    let ratio = |i: usize| pairs(i, |s| &s.pair_ratios);
    // The spread of those pairs: the middle half lies between these.
    let quartiles = |i: usize| middle_half(samples[i].iter().flat_map(|s| s.pair_added_us.iter().copied()).collect());
    let base_ready = med(0, |s| s.ready_s);
    let base_rss = med(0, |s| s.rss_mib);
    let base_rss2 = samples[0].iter().find_map(|s| s.rss2_mib).unwrap_or(0.0);
    let rss2 = |i: usize| samples[i].iter().find_map(|s| s.rss2_mib).unwrap_or(0.0);
    let mut table = String::new();
    table.push_str("| configuration | req/s (32 conns) | p50 | p99 | front CPU per request | vs baseline | added per request | req/s (1 conn) | p50 (1 conn) | RSS conc. 1 | RSS conc. 2 | start-up (module load) |\n");
    table.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (i, b) in benches.iter().enumerate() {
        let cpu = med(i, |s| s.cpu_us_per_req);
        let _ = writeln!(
            table,
            "| {} ({}) | {:.0} | {:.0} µs | {:.0} µs | {:.1} µs | {:.2}x | {:+.1} µs ({:+.0}…{:+.0}) | {:.0} | {:.0} µs | {:.1} MiB ({:+.1}) | {:.1} MiB ({:+.1}) | {:.2} s ({:+.2}) |",
            b.name,
            b.what,
            med(i, |s| s.rps),
            med(i, |s| s.p50_us),
            med(i, |s| s.p99_us),
            cpu,
            ratio(i),
            added(i),
            quartiles(i).0,
            quartiles(i).1,
            med(i, |s| s.rps_c1),
            med(i, |s| s.p50_c1_us),
            med(i, |s| s.rss_mib),
            med(i, |s| s.rss_mib) - base_rss,
            rss2(i),
            rss2(i) - base_rss2,
            med(i, |s| s.ready_s),
            med(i, |s| s.ready_s) - base_ready,
        );
    }

    // The targets of the benchmark issue, each met or not, with the measured figures.
    let mut targets = String::new();
    let mut check = |what: &str, figures: Option<(String, bool)>| {
        let _ = match figures {
            Some((text, met)) => writeln!(targets, "| {what} | {text} | {} |", if met { "met" } else { "**not met**" }),
            None => writeln!(targets, "| {what} | not measured in this run | – |"),
        };
    };
    // Judged on the head-to-head run: the ratio of the added medians, and the difference with
    // the middle half of its rotations (the noise the verdict is made in).
    let ratio = |a: &str, b: &str, limit: f64| {
        let (_, _, duel) = duels.iter().find(|(x, y, _)| *x == a && *y == b)?;
        let (a_us, b_us, diff, (q1, q3)) = duel.summary();
        if b_us <= 0.0 {
            return Some((format!("{b} added {b_us:+.1} µs: no ratio (within noise of zero)"), false));
        }
        let r = a_us / b_us;
        Some((
            format!(
                "{a} {a_us:+.1} µs vs {b} {b_us:+.1} µs: ratio {r:.2}; {a} - {b} = {diff:+.1} µs (middle half {q1:+.0}…{q3:+.0})"
            ),
            r <= limit,
        ))
    };
    for (what, a, b, limit) in CPU_TARGETS {
        check(what, ratio(a, b, *limit));
    }
    for (i, b) in benches.iter().enumerate() {
        if b.filters.contains("wasm.v3.Wasm")
            && !b.name.ends_with("-miss")
            && !b.name.ends_with("-lean")
            && b.name != "serverless-100k"
        {
            let load = med(i, |s| s.ready_s) - base_ready;
            check(
                &format!("{} loads in under 0.5 s", b.name),
                Some((format!("{load:+.2} s over the baseline's start-up"), load < 0.5)),
            );
            let rss = rss2(i) - base_rss2;
            check(
                &format!("{} adds at most 30 MiB RSS at --concurrency 2", b.name),
                Some((format!("{rss:+.1} MiB"), rss <= 30.0)),
            );
        }
    }
    // The fleet-wide check against the filter's own buckets: what it adds to the front Envoy
    // (head to head), what edgewise-ratelimit and Redis spend per request, and the latency.
    let mut global = String::new();
    for (a, b) in GLOBAL_CHECK {
        let Some((_, _, duel)) = duels.iter().find(|(x, y, _)| x == a && y == b) else { continue };
        let (a_us, b_us, diff, (q1, q3)) = duel.summary();
        let p99 = |name: &str| benches.iter().position(|x| x.name == name).map_or(0.0, |i| med(i, |s| s.p99_us));
        let p50 = |name: &str| benches.iter().position(|x| x.name == name).map_or(0.0, |i| med(i, |s| s.p50_us));
        let _ = writeln!(
            global,
            "| {a} vs {b} | {a_us:+.1} µs | {b_us:+.1} µs | {diff:+.1} µs ({q1:+.1}…{q3:+.1}) | {:.1} µs | {:.0} / {:.0} µs | {:.0} / {:.0} µs |",
            median(duel.a_services.clone()),
            p50(a),
            p99(a),
            p50(b),
            p99(b),
        );
    }
    if !global.is_empty() {
        global = format!(
            "## The fleet-wide check\n\nThe same cached cloud-connector requests with and without Envoy's ratelimit filter asking edgewise-ratelimit (limitador on Redis), head to head: tokens of 1,000 organizations in turn (1,000 counters), and one organization (every check on one counter, which the service takes in turn). The front Envoy's CPU is what the check adds to a gateway; edgewise-ratelimit and Redis spend theirs on CPU 1, measured in the same bursts. Latency at 32 connections, medians of the rounds.\n\n| configurations | with the check: added | without: added | difference (middle half) | edgewise-ratelimit + Redis CPU per request | p50 / p99 with | p50 / p99 without |\n|---|---:|---:|---:|---:|---:|---:|\n{global}\n"
        );
    }
    let mut sizes = String::new();
    let mut wasm: Vec<_> =
        std::fs::read_dir(edgewise::filters_dir())?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    wasm.sort();
    for p in wasm {
        let _ = writeln!(
            sizes,
            "| {} | {} KiB |",
            p.file_name().unwrap_or_default().to_string_lossy(),
            std::fs::metadata(&p)?.len() / 1024
        );
    }
    let envoy_version = Command::new(edgewise::envoy::binary()).arg("--version").output().map(|o| {
        // `envoy --version` starts with the binary's path: keep what follows "version: ".
        let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
        text.split_once("version: ").map_or(text.clone(), |(_, v)| v.to_string())
    })?;
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find(|l| l.starts_with("model name"))
        .unwrap_or_default()
        .to_string();
    let report = format!(
        "# edgewise benchmark results\n\n\
         Produced by `make bench` ({rounds} rounds, {seconds} s per run, medians; configurations interleaved in rotating order).\n\n\
         - Machine: {cores} cores, {cpu}\n- Envoy: {envoy_version}\n\
         - Front Envoy: `--concurrency 1`, pinned to CPU 0; wrk (`-t1 -c32`, then `-c1`) and the upstream Envoy (direct_response) on CPU 1.\n\
         - \"front CPU per request\" is the front Envoy's user+system CPU time (from /proc) over the requests wrk completed at 32 connections, in 1-second bursts that alternate with bursts on a reference front Envoy without filters (same requests, same core). \"vs baseline\" and \"added per request\" compare each configuration with the reference in the burst just before (median over every such pair of all rounds; in brackets the middle half of the pairs), so both sides of every difference saw the same machine: this VM's speed swings by 2x within minutes.\n\n\
         {table}\nWhat limits the configurations that miss a target, and the one-off measurements behind that (a module with no logic, the SDK alone): docs/performance.md.\n\n## Targets\n\nThe comparisons are judged head to head, after the rounds: both configurations run at once and {rotations} rotations of 1-second bursts (the reference, one, the other, in turn) give each of them its added CPU per request; the difference comes with the middle half of its rotations, the noise the verdict is made in.\n\n| target | measured | |\n|---|---|---|\n{targets}\n{global}## Module sizes\n\n| module | size |\n|---|---:|\n{sizes}",
        cores = std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu = cpu_model.split(':').nth(1).unwrap_or("").trim(),
    );
    // BENCH_OUT: where a partial run (BENCH_ONLY) writes, so it does not replace the full results.
    let out = std::env::var("BENCH_OUT").unwrap_or_else(|_| "bench/results.md".into());
    std::fs::write(edgewise::repo_root().join(out), &report)?;
    println!("{report}");
    drop(services);
    Ok(())
}
