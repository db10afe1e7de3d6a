//! The ABI libedgewise.so is built for is stated in the module (`EDGEWISE_MODULE`: the edgewise
//! version, the Envoy release and the dynamic-module ABI version that `program_init` returns) and
//! checked against the Envoy under test (`ENVOY=...` picks another): Envoy loads the module and
//! logs that the ABI version matched, never its mismatch warning; and every Envoy callback the
//! module calls is one that Envoy exports (they are resolved lazily, so a missing one would only
//! show when a request first needs it). `make dist` writes RELEASE.md from the same statement.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use edgewise::envoy;

const MISMATCH: &str = "is deprecated. Please recompile the module";

/// `key=value` pairs of the statement the module carries.
fn statement(module: &[u8]) -> Vec<(String, String)> {
    const PREFIX: &[u8] = b"edgewise-module: ";
    let at =
        module.windows(PREFIX.len()).position(|w| w == PREFIX).expect("no edgewise-module statement in the module");
    let rest = &module[at + PREFIX.len()..];
    let end = rest.iter().position(|&b| b == 0).expect("the statement ends with NUL");
    let text = std::str::from_utf8(&rest[..end]).unwrap();
    text.split(' ').map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).unwrap()).collect()
}

fn get<'a>(statement: &'a [(String, String)], key: &str) -> &'a str {
    statement
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {statement:?}"))
}

/// What Envoy logs when it loads `module` (validate mode: it loads the module and configures a
/// filter, as at start).
fn load(module: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"
static_resources:
  listeners:
  - name: abi
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: abi
          route_config: {{ virtual_hosts: [{{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: "/" }}, direct_response: {{ status: 200 }} }}] }}] }}
          http_filters:
          - name: edgewise.egress
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config:
                module: {{ local: {{ filename: {} }} }}
                do_not_close: true
              filter_name: egress
              filter_config:
                "@type": type.googleapis.com/google.protobuf.StringValue
                value: '{{"allow": ["api.github.com"]}}'
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#,
        module.display()
    );
    let path = dir.path().join("abi.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(envoy::binary())
        .args(["--mode", "validate", "--disable-hot-restart", "-l", "info", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "envoy --mode validate with {}:\n{log}", module.display());
    log
}

/// The check: Envoy says the module's ABI version matched, and never warns of a mismatch.
fn abi_check(log: &str, abi: &str) -> Result<(), String> {
    if let Some(line) = log.lines().find(|l| l.contains(MISMATCH)) {
        return Err(format!("Envoy warns of an ABI mismatch: {line}"));
    }
    let matched = format!("Dynamic module ABI version {abi} matched.");
    if !log.contains(&matched) {
        return Err(format!("Envoy did not log {matched:?}"));
    }
    Ok(())
}

/// `major.minor` of the Envoy under test (`envoy --version`: `.../1.40.0/Clean/RELEASE/...`).
fn envoy_release() -> String {
    let out = Command::new(envoy::binary()).arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = text
        .split('/')
        .find(|part| part.split('.').count() == 3 && part.split('.').all(|n| n.parse::<u32>().is_ok()))
        .unwrap_or_else(|| panic!("no version in {text:?}"));
    version.rsplit_once('.').unwrap().0.to_string()
}

#[test]
fn the_module_states_its_abi_and_the_envoy_under_test_loads_it_without_a_mismatch() {
    let path = edgewise::filters_dir().join("libedgewise.so");
    let module = std::fs::read(&path).unwrap();
    let said = statement(&module);
    assert_eq!(get(&said, "edgewise"), env!("CARGO_PKG_VERSION"), "the workspace version");
    let abi = get(&said, "abi");
    assert!(abi.starts_with('v') && abi.split('.').count() == 3, "{abi}");
    assert_eq!(
        get(&said, "envoy"),
        envoy_release(),
        "libedgewise.so is built for Envoy {}; the Envoy under test is another release (docs/deploying.md)",
        get(&said, "envoy")
    );
    // The exported symbol holds the same statement.
    let nm = Command::new("nm").args(["-D", "--defined-only"]).arg(&path).output().expect("nm (binutils)");
    assert!(String::from_utf8_lossy(&nm.stdout).lines().any(|l| l.ends_with(" EDGEWISE_MODULE")));

    if let Err(e) = abi_check(&load(&path), abi) {
        panic!("{e}");
    }
}

/// The check fails on Envoy's mismatch warning: a copy of the module that reports another ABI
/// version still loads, with the warning, and the check refuses it.
#[test]
fn the_check_fails_on_envoys_abi_mismatch_warning() {
    let module = std::fs::read(edgewise::filters_dir().join("libedgewise.so")).unwrap();
    let abi = get(&statement(&module), "abi").to_string();
    let other = "v0.1.9";
    assert_eq!(other.len(), abi.len());
    let mut patched = module.clone();
    let mut replaced = 0;
    let mut at = 0;
    while let Some(found) = patched[at..].windows(abi.len()).position(|w| w == abi.as_bytes()) {
        let start = at + found;
        patched[start..start + abi.len()].copy_from_slice(other.as_bytes());
        replaced += 1;
        at = start + abi.len();
    }
    assert!(replaced >= 1, "the ABI version is in the module");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("libedgewise.so");
    std::fs::write(&copy, patched).unwrap();

    let log = load(&copy);
    let err = abi_check(&log, other).unwrap_err();
    assert!(err.contains(&format!("Dynamic module ABI version {other} {MISMATCH}")), "{err}");
    assert!(abi_check(&log, &abi).is_err());
}

/// Names of dynamic symbols `nm` lists for `file` with `flag`, starting with `prefix`.
fn symbols(file: &Path, flag: &str, prefix: &str) -> BTreeSet<String> {
    let out = Command::new("nm").args(["-D", flag]).arg(file).output().expect("nm (binutils)");
    assert!(out.status.success(), "nm {flag} {}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .filter(|name| name.starts_with(prefix))
        .collect()
}

#[test]
fn every_envoy_callback_the_module_calls_is_exported_by_the_envoy_under_test() {
    let module = edgewise::filters_dir().join("libedgewise.so");
    let calls = symbols(&module, "--undefined-only", "envoy_dynamic_module_callback_");
    let exported = symbols(&envoy::executable(), "--defined-only", "envoy_dynamic_module_callback_");
    assert!(calls.len() >= 20, "{calls:?}");
    assert!(exported.len() >= calls.len(), "{} callbacks exported", exported.len());
    let missing: Vec<_> = calls.difference(&exported).collect();
    assert!(missing.is_empty(), "the Envoy under test does not export {missing:?}");
    // And the hooks Envoy looks up are there.
    let hooks = symbols(&module, "--defined-only", "envoy_dynamic_module_on_");
    for hook in ["envoy_dynamic_module_on_program_init", "envoy_dynamic_module_on_http_filter_config_new"] {
        assert!(hooks.contains(hook), "{hook}");
    }
}
