//! Envoy under valgrind's callgrind, for `make bench`'s instruction counts: [`Profile`] reads one
//! callgrind dump (the format of valgrind 3.x: compressed names, relative positions), and
//! [`dump`] asks a running callgrind for one (`callgrind_control --dump`), which also zeroes its
//! counters, so that consecutive dumps count consecutive phases.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// valgrind's arguments for a process whose phases are dumped on demand: no dump at exit worth
/// reading, costs per function (not per instruction), one file per dump in `dir`; the address
/// space not randomized (`setarch -R`), since where things land moves Envoy's hash tables and
/// copies, and with them the count, by about 0.5 % from one process to the next.
pub fn wrapper(dir: &Path) -> Vec<String> {
    vec![
        "setarch".into(),
        std::env::consts::ARCH.into(),
        "-R".into(),
        "valgrind".into(),
        "--tool=callgrind".into(),
        "--dump-instr=no".into(),
        "--dump-line=no".into(),
        format!("--callgrind-out-file={}/callgrind.%p", dir.display()),
    ]
}

/// Dumps the counters of the callgrind process `pid` (writing `<dir>/callgrind.<pid>.<k>`, the
/// k-th dump) and zeroes them; returns the dump's profile.
pub fn dump(dir: &Path, pid: u32, k: usize) -> Result<Profile> {
    let out = Command::new("callgrind_control")
        .args(["--dump", &pid.to_string()])
        .output()
        .context("running callgrind_control (Debian's valgrind)")?;
    if !out.status.success() {
        bail!("callgrind_control --dump {pid}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let file: PathBuf = dir.join(format!("callgrind.{pid}.{k}"));
    // The command is taken at the process's next basic block, the file written after it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            if text.contains("\ntotals: ") || text.contains("\nsummary: ") {
                return Profile::parse(&text).with_context(|| format!("reading {}", file.display()));
            }
        }
        if Instant::now() > deadline {
            bail!("callgrind wrote no {} within a minute", file.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One function: the object it is in and its name (`0x...` where the object is stripped).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Function {
    pub object: String,
    pub name: String,
}

/// Instructions (Ir) of one dump: the total, and per function what it ran itself (`self_`) and
/// with what it called (`inclusive`); and how often each function was called, by name.
#[derive(Default, Debug)]
pub struct Profile {
    pub total: u64,
    pub self_: HashMap<Function, u64>,
    pub inclusive: HashMap<Function, u64>,
    pub calls: HashMap<String, u64>,
}

impl Profile {
    pub fn parse(text: &str) -> Result<Profile> {
        let mut names: HashMap<(char, String), String> = HashMap::new();
        // `ob=(3) /lib/x.so` defines id 3; a later `ob=(3)` refers to it. fn and cfn share ids,
        // as do ob and cob.
        let mut name = |kind: char, value: &str| -> String {
            let value = value.trim();
            if let Some(rest) = value.strip_prefix('(') {
                if let Some((id, tail)) = rest.split_once(')') {
                    let tail = tail.trim();
                    if tail.is_empty() {
                        return names.get(&(kind, id.to_string())).cloned().unwrap_or_default();
                    }
                    names.insert((kind, id.to_string()), tail.to_string());
                    return tail.to_string();
                }
            }
            value.to_string()
        };
        let mut profile = Profile::default();
        let (mut object, mut function, mut callee) = (String::new(), None::<Function>, String::new());
        // The cost line right after `calls=` is what the call cost (inclusive), not the caller's.
        let mut after_calls = false;
        for line in text.lines() {
            let (key, value) = line.split_once('=').unwrap_or(("", line));
            match key {
                "ob" => object = name('o', value),
                "cob" => _ = name('o', value),
                "fn" => function = Some(Function { object: object.clone(), name: name('f', value) }),
                "cfn" => callee = name('f', value),
                "fl" | "fi" | "fe" | "cfi" | "cfl" => _ = name('l', value),
                "calls" => {
                    let count: u64 = value.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
                    *profile.calls.entry(callee.clone()).or_default() += count;
                    after_calls = true;
                    continue;
                }
                _ if line.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-' || c == '*') => {
                    // `[position] Ir`: with one event, the cost is the last field.
                    let cost: u64 = line.split_whitespace().last().and_then(|n| n.parse().ok()).unwrap_or(0);
                    let Some(f) = &function else { bail!("a cost line before any fn= line: {line:?}") };
                    *profile.inclusive.entry(f.clone()).or_default() += cost;
                    if !after_calls {
                        *profile.self_.entry(f.clone()).or_default() += cost;
                    }
                }
                _ => {
                    if let Some(v) = line.strip_prefix("totals:").or_else(|| line.strip_prefix("summary:")) {
                        profile.total = v.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
                    }
                }
            }
            after_calls = false;
        }
        if profile.total == 0 {
            bail!("no totals line");
        }
        Ok(profile)
    }

    /// Instructions per unit between two dumps of the same process: `(later - earlier) / units`,
    /// for the total and per function (self and inclusive).
    pub fn per_unit(earlier: &Profile, later: &Profile, units: f64) -> PerUnit {
        PerUnit {
            total: (later.total as f64 - earlier.total as f64) / units,
            self_: difference(&earlier.self_, &later.self_, units),
            inclusive: difference(&earlier.inclusive, &later.inclusive, units),
            calls: difference(&earlier.calls, &later.calls, units),
        }
    }
}

/// `(later - earlier) / units`, key by key.
fn difference<K: Clone + Eq + std::hash::Hash>(
    earlier: &HashMap<K, u64>,
    later: &HashMap<K, u64>,
    units: f64,
) -> HashMap<K, f64> {
    let mut out: HashMap<K, f64> = HashMap::new();
    for (k, v) in later {
        *out.entry(k.clone()).or_default() += *v as f64 / units;
    }
    for (k, v) in earlier {
        *out.entry(k.clone()).or_default() -= *v as f64 / units;
    }
    out
}

/// Instructions per request: the total and per function.
#[derive(Default, Debug, Clone)]
pub struct PerUnit {
    pub total: f64,
    pub self_: HashMap<Function, f64>,
    pub inclusive: HashMap<Function, f64>,
    pub calls: HashMap<String, f64>,
}

impl PerUnit {
    /// What `self` runs per request over `reference`, per function by self cost, largest first.
    pub fn added_over(&self, reference: &PerUnit) -> Vec<(Function, f64)> {
        let mut added: HashMap<Function, f64> = self.self_.clone();
        for (f, v) in &reference.self_ {
            *added.entry(f.clone()).or_default() -= v;
        }
        let mut added: Vec<_> = added.into_iter().collect();
        added.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        added
    }

    /// Self instructions per request in objects whose file name contains `part`.
    pub fn in_object(&self, part: &str) -> f64 {
        self.self_.iter().filter(|(f, _)| short_object(&f.object).contains(part)).map(|(_, v)| v).sum()
    }

    /// Heap allocations per request by Rust code (calls of its global allocator's entry points).
    pub fn rust_allocations(&self) -> f64 {
        ["__rust_alloc", "__rust_alloc_zeroed", "__rust_realloc"].iter().filter_map(|f| self.calls.get(*f)).sum()
    }

    /// Inclusive instructions per request in the functions whose name starts with `prefix`
    /// (e.g. Envoy's ABI callbacks, `envoy_dynamic_module_callback_`).
    pub fn inclusive_of(&self, prefix: &str) -> f64 {
        self.inclusive.iter().filter(|(f, _)| f.name.starts_with(prefix)).map(|(_, v)| v).sum()
    }
}

/// The file name of an object path.
pub fn short_object(object: &str) -> &str {
    object.rsplit('/').next().unwrap_or(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 42
cmd:  envoy
part: 2

desc: I1 cache: 
positions: line
events: Ir
summary: 900

ob=(1) /usr/bin/envoy
fl=(1) ???
fn=(1) 0x0000000000abc
0 300
cob=(2) /lib/libedgewise.so
cfi=(2) ???
cfn=(2) envoy_dynamic_module_on_http_filter_request_headers
calls=2 0
0 600
fn=(3) envoy_dynamic_module_callback_http_get_header
0 40
ob=(2)
fl=(2)
fn=(2)
0 500
cfn=(3)
calls=1 0
0 40
fn=(4) memcpy
+2 60
cfn=(5) __rust_alloc
calls=3 0
0 0
totals: 900
";

    #[test]
    fn a_dump_gives_self_and_inclusive_costs_per_function() {
        let p = Profile::parse(DUMP).unwrap();
        assert_eq!(p.total, 900);
        let f = |o: &str, n: &str| Function { object: o.into(), name: n.into() };
        let envoy = "/usr/bin/envoy";
        let module = "/lib/libedgewise.so";
        assert_eq!(p.self_[&f(envoy, "0x0000000000abc")], 300);
        assert_eq!(p.inclusive[&f(envoy, "0x0000000000abc")], 900);
        assert_eq!(p.self_[&f(module, "envoy_dynamic_module_on_http_filter_request_headers")], 500);
        assert_eq!(p.inclusive[&f(module, "envoy_dynamic_module_on_http_filter_request_headers")], 540);
        assert_eq!(p.self_[&f(envoy, "envoy_dynamic_module_callback_http_get_header")], 40);
        assert_eq!(p.self_[&f(module, "memcpy")], 60);
        assert_eq!(p.self_.values().sum::<u64>(), p.total, "self costs add up to the total");
        assert_eq!(p.calls["envoy_dynamic_module_on_http_filter_request_headers"], 2);
        assert_eq!(p.calls["__rust_alloc"], 3);
    }

    #[test]
    fn per_request_figures_are_the_difference_of_two_dumps() {
        let a = Profile::parse(DUMP).unwrap();
        let b = Profile::parse(&DUMP.replace("0 500", "0 2500").replace(": 900", ": 2900")).unwrap();
        let per = Profile::per_unit(&a, &b, 100.0);
        assert_eq!(per.total, 20.0);
        let module = |n: &str| Function { object: "/lib/libedgewise.so".into(), name: n.into() };
        assert_eq!(per.self_[&module("envoy_dynamic_module_on_http_filter_request_headers")], 20.0);
        assert_eq!(per.in_object("libedgewise"), 20.0);
        assert_eq!(per.inclusive_of("envoy_dynamic_module_callback_"), 0.0);
        assert_eq!(per.rust_allocations(), 0.0, "as many in both dumps");
        let added = per.added_over(&PerUnit::default());
        assert_eq!(added[0].0, module("envoy_dynamic_module_on_http_filter_request_headers"));
    }

    #[test]
    fn a_dump_without_totals_is_an_error() {
        assert!(Profile::parse("fn=(1) x\n0 5\n").is_err());
        assert!(Profile::parse("0 5\ntotals: 5\n").is_err());
    }
}
