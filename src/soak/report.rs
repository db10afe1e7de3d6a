//! Checking a scenario's results after its load, and its section of bench/soak.md.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::class::Class;
use super::load::{deltas, short, tracked, Load, Snapshot, Tally};
use super::rss::RssSeries;
use super::scenario::{Scenario, Sel};
use crate::envoy::Build;

/// A scenario's line in the summary.
#[derive(Serialize, Deserialize, Clone, Default)]
pub struct Row {
    pub scenario: String,
    pub requests: u64,
    pub unexpected: u64,
    pub vm_failures: u64,
    pub rss: String,
    pub metrics: String,
    pub ok: bool,
}

pub struct Outcome {
    pub row: Row,
    pub markdown: String,
    pub problems: Vec<String>,
}

/// The section being written and the problems found so far.
struct Section<'a> {
    sc: &'a Scenario,
    md: String,
    problems: Vec<String>,
}

impl Section<'_> {
    fn line(&mut self, text: impl AsRef<str>) {
        let _ = writeln!(self.md, "{}", text.as_ref());
    }

    /// What the chaos did, and whether Envoy saw it.
    fn chaos(&mut self, baseline: &Snapshot, last: &Snapshot) {
        let sc = self.sc;
        let counts = sc.chaos.counts.lock().map(|c| c.clone()).unwrap_or_default();
        let counts_text: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let done = if counts_text.is_empty() { "nothing".into() } else { counts_text.join(", ") };
        self.line(format!("**Chaos**: {}. Done: {done}.", sc.chaos_about));
        let mut effect_lines = Vec::new();
        for e in &sc.effects {
            let Some(i) = sc.watched.iter().position(|w| w.role == e.role) else { continue };
            let read = |stats: &BTreeMap<String, u64>| -> u64 {
                match &e.stat {
                    Sel::Exact(name) => stats.get(name).copied().unwrap_or(0),
                    Sel::Suffix(s) => stats.iter().filter(|(k, _)| k.ends_with(s)).map(|(_, v)| v).sum(),
                }
            };
            let (before, after) = (read(&baseline.stats[i]), read(&last.stats[i]));
            let delta = after as i64 - before as i64;
            effect_lines.push(format!("{} {delta:+} (now {after})", e.what));
            let happened = sc.chaos.count(e.requires);
            if happened > 0 && delta == 0 {
                self.problems.push(format!(
                    "the chaos had no visible effect: {} did not move after {happened} {}",
                    e.what, e.requires
                ));
            }
        }
        if !effect_lines.is_empty() {
            self.line(format!("Seen by Envoy: {}.", effect_lines.join("; ")));
        }
        let events = sc.chaos.events.lock().map(|e| e.clone()).unwrap_or_default();
        if !events.is_empty() {
            self.line(format!(
                "\n<details><summary>{} chaos events</summary>\n\n{}\n\n</details>",
                events.len(),
                events.iter().map(|e| format!("- {e}")).collect::<Vec<_>>().join("\n")
            ));
        }
    }

    /// A row per class: what it got and what it allows.
    fn classes(&mut self, tallies: &[Tally], unexpected: u64) {
        self.line(
            "\n| kind | class | requests | answers | allowed answers (-> counters they add) | unexpected | latency p50 / max |\n|---|---|---:|---|---|---:|---:|",
        );
        for (c, t) in self.sc.classes.iter().zip(tallies) {
            let answers: Vec<String> = t.labels.iter().map(|(l, n)| format!("`{l}` {n}")).collect();
            let mut lat = t.latencies_ms.clone();
            lat.sort_by(|a, b| a.total_cmp(b));
            let (p50, max) = (lat.get(lat.len() / 2).copied().unwrap_or(0.0), lat.last().copied().unwrap_or(0.0));
            self.line(format!(
                "| {} | {} | {} | {} | {} | {} | {p50:.0} / {max:.0} ms |",
                c.kind.name(),
                c.name,
                t.sent,
                answers.join(", "),
                allowed(c).join("<br>"),
                if t.unexpected == 0 { "0".into() } else { format!("**{}**", t.unexpected) }
            ));
        }
        let examples: Vec<String> = self
            .sc
            .classes
            .iter()
            .zip(tallies)
            .flat_map(|(c, t)| t.examples.iter().map(move |e| format!("- {}: {e}", c.name)))
            .collect();
        self.line(format!(
            "\n**Unexpected answers**: {}",
            if examples.is_empty() {
                "none.".to_string()
            } else {
                format!("{unexpected}; examples:\n\n{}", examples.join("\n"))
            }
        ));
    }

    /// Classes that run into a rate limit: the allowed answers stay within its bucket.
    fn bounds(&mut self, tallies: &[Tally]) {
        for (c, t) in self.sc.classes.iter().zip(tallies) {
            let Some(b) = &c.bound else { continue };
            let allowed = t.labels.get(b.allowed).copied().unwrap_or(0);
            let limited = t.labels.get(b.limited).copied().unwrap_or(0);
            let span = t.last - t.first.unwrap_or(t.last);
            let most = b.burst + b.per_second * span + 1.0;
            let held = (allowed as f64) <= most;
            let engaged = limited > 0 || (t.sent as f64) <= most;
            self.line(format!(
                "\n**Rate limit** ({}): {allowed} allowed and {limited} limited over {span:.0} s; at most {most:.0} may be allowed (burst {} + {}/s): {}.",
                c.name,
                b.burst,
                b.per_second,
                if held && engaged { "held" } else { "NOT held" }
            ));
            if !held || !engaged {
                self.problems.push(format!(
                    "the rate limit of {} did not hold: {allowed} allowed (at most {most:.0}), {limited} limited",
                    c.name
                ));
            }
        }
    }

    /// The RSS table; the summary's cells.
    fn rss(&mut self, rss: &[RssSeries]) -> Vec<String> {
        self.line("\n| Envoy | RSS at the start | at the end | slope | slope, second half | samples |\n|---|---:|---:|---:|---:|---:|");
        let mut cells = Vec::new();
        for s in rss {
            let (first, end, whole, second) = s.summary();
            self.line(format!(
                "| {} | {first:.1} MiB | {end:.1} MiB | {whole:+.2} MiB/min | {second:+.2} MiB/min | {} |",
                s.role,
                s.samples.len()
            ));
            cells.push(format!("{}: {first:.0} -> {end:.0} MiB, {whole:+.2} MiB/min ({second:+.2})", s.role));
            if let Some(at) = s.gone_at {
                self.problems.push(format!("Envoy {} exited or became a zombie at t={at:.0} s", s.role));
            }
            if s.leaking() {
                self.problems.push(format!(
                    "Envoy {}'s RSS grows: {second:+.2} MiB/min over the second half of the load",
                    s.role
                ));
            }
        }
        cells
    }

    /// VM reloads (wasm) or panics (native), and traps or panics in Envoy's log.
    fn vm_failures(&mut self, last: &Snapshot, build: Build) -> u64 {
        let mut vm_failures = 0u64;
        let mut vm_lines = Vec::new();
        for (w, stats) in self.sc.watched.iter().zip(&last.stats) {
            let Some((plugin, filter)) = w.plugin else { continue };
            let names: Vec<String> = match build {
                Build::Wasm => ["vm_reload_success", "vm_reload_failure", "vm_reload_backoff"]
                    .iter()
                    .map(|s| format!("wasm.{plugin}.{s}"))
                    .collect(),
                Build::Native => vec![format!("edgewise.{filter}.panics")],
            };
            for name in names {
                let v = stats.get(&name).copied().unwrap_or(0);
                vm_failures += v;
                vm_lines.push(format!("{}: `{name}` {v}", w.role));
            }
            let log = w.envoy.log();
            let bad: Vec<&str> = log
                .lines()
                .filter(|l| {
                    ["panicked", "Function: proxy_on", "Wasm VM failed", "failed: Uncaught", "wasm trap"]
                        .iter()
                        .any(|p| l.contains(p))
                })
                .collect();
            vm_failures += bad.len() as u64;
            vm_lines.push(format!("{}: {} log lines of a trap or panic", w.role, bad.len()));
            for l in bad.iter().take(3) {
                vm_lines.push(format!("{}: `{}`", w.role, l.chars().take(200).collect::<String>()));
            }
            if let Some(mem) = stats.get(&format!("wasm.{plugin}.vm_memory_size")) {
                vm_lines.push(format!("{}: wasm linear memory {} KiB at the end", w.role, mem / 1024));
            }
        }
        if vm_failures > 0 {
            self.problems.push(format!("{vm_failures} VM failures or panics"));
        }
        self.line(format!("\n**VM failures**: {vm_failures} ({}).", vm_lines.join("; ")));
        vm_failures
    }

    /// Each counter's delta against the sum over the answers; (equal, total).
    fn counters(&mut self, load: &Load, actual: &BTreeMap<String, u64>, unknown: u64) -> (usize, usize) {
        let sc = self.sc;
        let expected = load.expected.lock().map(|e| e.clone()).unwrap_or_default();
        let keys: BTreeSet<&String> =
            expected.keys().chain(actual.iter().filter(|(_, v)| **v > 0).map(|(k, _)| k)).collect();
        self.line("\n| counter | expected (from the answers) | counted | |\n|---|---:|---:|---|");
        let (mut equal, mut total) = (0, 0);
        for k in keys {
            if sc.relational.contains(k) {
                continue;
            }
            let (e, a) = (expected.get(k).copied().unwrap_or(0), actual.get(k).copied().unwrap_or(0));
            total += 1;
            let verdict = if e == a {
                equal += 1;
                "equal".to_string()
            } else if a.abs_diff(e) <= 2 * unknown {
                equal += 1;
                format!("within the {unknown} answers whose counters are not known")
            } else {
                self.problems.push(format!("counter {k}: expected {e}, counted {a}"));
                "**differs**".to_string()
            };
            self.line(format!("| {k} | {e} | {a} | {verdict} |"));
        }
        for (what, f) in &sc.relations {
            let (left, right) = f(actual, &expected);
            total += 1;
            let verdict = if left == right {
                equal += 1;
                "equal".to_string()
            } else {
                self.problems.push(format!("{what}: {left} against {right}"));
                "**differs**".to_string()
            };
            self.line(format!("| {what} | {right} | {left} | {verdict} |"));
        }
        (equal, total)
    }
}

/// A class's allowed answers, as the table lists them.
fn allowed(c: &Class) -> Vec<String> {
    c.allowed
        .iter()
        .map(|a| {
            let counters = match &a.counters {
                None => " -> counters not known".to_string(),
                Some(v) if v.is_empty() => String::new(),
                Some(v) => format!(
                    " -> {}",
                    v.iter()
                        .map(|(k, n)| if *n == 1 { short(k) } else { format!("{} x{n}", short(k)) })
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            let checks = if a.checks.is_empty() { String::new() } else { format!("; checked: {}", a.checks) };
            format!("{}{counters}{checks}", a.want.describe())
        })
        .collect()
}

/// Checks everything the load of `sc` left: answers, chaos effects, rate limits, RSS, VM
/// failures and counters; its section of the report.
pub fn check(
    sc: &Scenario,
    load: &Load,
    baseline: &Snapshot,
    last: &Snapshot,
    rss: &[RssSeries],
    build: Build,
    start: Instant,
) -> Outcome {
    let problems: Vec<String> = sc.chaos.problems.lock().map(|p| p.clone()).unwrap_or_default();
    let mut s = Section { sc, md: String::new(), problems };
    let tallies: Vec<Tally> =
        load.tallies.iter().map(|t| t.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default()).collect();
    let requests: u64 = tallies.iter().map(|t| t.sent).sum();
    let unexpected: u64 = tallies.iter().map(|t| t.unexpected).sum();
    let unknown: u64 = tallies.iter().map(|t| t.unknown_counters).sum();
    if unexpected > 0 {
        s.problems.push(format!("{unexpected} unexpected answers"));
    }
    s.line(format!("### {}\n\n{}.\n", sc.name, sc.about));
    s.chaos(baseline, last);
    s.classes(&tallies, unexpected);
    s.bounds(&tallies);
    let rss_cells = s.rss(rss);
    let vm_failures = s.vm_failures(last, build);
    let actual = deltas(&tracked(sc, baseline), &tracked(sc, last));
    let (equal, total) = s.counters(load, &actual, unknown);
    let (lat, lag) = {
        let mut l = load.latencies_ms.lock().map(|l| l.clone()).unwrap_or_default();
        l.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| l.get(((l.len() as f64 - 1.0) * p).round().max(0.0) as usize).copied().unwrap_or(0.0);
        ((q(0.5), q(0.99), l.last().copied().unwrap_or(0.0)), load.max_lag.lock().map(|m| *m).unwrap_or(0.0))
    };
    s.line(format!(
        "\nLatency: p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms; the latest a request started after its slot: {lag:.2} s; load from t=0 to t={:.0} s.",
        lat.0,
        lat.1,
        lat.2,
        start.elapsed().as_secs_f64()
    ));
    if s.problems.is_empty() {
        s.line("\n**Problems**: none.\n");
    } else {
        let list = s.problems.iter().map(|p| format!("- {p}")).collect::<Vec<_>>().join("\n");
        s.line(format!("\n**Problems**:\n\n{list}\n"));
    }
    Outcome {
        row: Row {
            scenario: sc.name.into(),
            requests,
            unexpected,
            vm_failures,
            rss: rss_cells.join("<br>"),
            metrics: format!("{equal}/{total} equal"),
            ok: s.problems.is_empty(),
        },
        problems: s.problems.iter().map(|p| format!("{}: {p}", sc.name)).collect(),
        markdown: s.md,
    }
}
