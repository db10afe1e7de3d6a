//! Builds the filters, so that `cargo test` always runs Envoy with fresh ones: every filter crate
//! under filters/ for wasm32-wasip1 with the `filters` profile, trimmed (see `trim`) into
//! target/filters/<name>.wasm, and the dynamic module holding all of them (`filters/native`, the
//! `native` profile) into target/filters/libedgewise.so; beside it, bench/noop-module (a module
//! whose hooks do nothing, the floor `make bench` measures against).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip1";

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let target_dir = env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let target_dir = if target_dir.is_absolute() { target_dir } else { root.join(target_dir) };
    let out = target_dir.join("filters");

    println!("cargo:rerun-if-changed=filters");
    println!("cargo:rerun-if-changed=bench/noop-module");
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rerun-if-changed=Cargo.toml");
    println!("cargo:rerun-if-env-changed=EDGEWISE_SKIP_FILTERS");
    println!("cargo:rustc-env=EDGEWISE_FILTERS_DIR={}", out.display());
    let native_dir = target_dir.join("native");
    println!("cargo:rustc-env=EDGEWISE_NOOP_MODULE={}", native_dir.join("native").join(NOOP).display());
    if env::var_os("EDGEWISE_SKIP_FILTERS").is_some() {
        return;
    }
    fs::create_dir_all(&out).expect("creating target/filters");

    // The .wasm modules.
    let filters = filter_crates(&root.join("filters"));
    let mut cmd = cargo(&root, &target_dir.join("wasm"));
    cmd.args(["--profile", "filters", "--target", TARGET]);
    for f in &filters {
        cmd.args(["-p", f]);
    }
    let status = cmd.status().expect("running cargo for the wasm filters");
    if !status.success() {
        panic!(
            "building the wasm filters failed (see above). If the target is missing: \
             `rustup target add {TARGET}` (or `make setup`)"
        );
    }
    for f in &filters {
        let file = format!("{}.wasm", f.replace('-', "_"));
        let built = target_dir.join("wasm").join(TARGET).join("filters").join(&file);
        let dest = out.join(format!("{f}.wasm"));
        let module = fs::read(&built).unwrap_or_else(|e| panic!("reading {}: {e}", built.display()));
        let trimmed = trim(&module).unwrap_or_else(|e| panic!("post-processing {}: {e}", built.display()));
        fs::write(&dest, trimmed).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
    }

    // The dynamic module, every filter in one library.
    let status = cargo(&root, &native_dir)
        .args(["--profile", "native", "-p", "edgewise-native", "-p", "edgewise-noop-module"])
        .status()
        .expect("running cargo for the native module");
    if !status.success() {
        panic!("building libedgewise.so failed (see above)");
    }
    let built = native_dir.join("native").join(NATIVE);
    // A new file, renamed into place: a running Envoy has the old one mapped, and writing into
    // it would change code under its feet.
    let staged = out.join(format!("{NATIVE}.new"));
    fs::copy(&built, &staged).unwrap_or_else(|e| panic!("copying {}: {e}", built.display()));
    fs::rename(&staged, out.join(NATIVE)).unwrap_or_else(|e| panic!("installing {NATIVE}: {e}"));
}

const NATIVE: &str = "libedgewise.so";
const NOOP: &str = "libedgewise_noop.so";

/// A nested `cargo build` into its own target dir (so that it does not wait on the lock of the
/// build running this script), free of the outer build's settings, which are for the harness.
fn cargo(root: &Path, target_dir: &Path) -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).arg("build").arg("--target-dir").arg(target_dir);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    // Paths of this machine (the cargo registry, the checkout) must not end up in the modules:
    // they are published as OCI images, and the same source must give the same bytes anywhere.
    let home = env::var("HOME").unwrap_or_default();
    let cargo_home = env::var("CARGO_HOME").unwrap_or_else(|_| format!("{home}/.cargo"));
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("--remap-path-prefix={cargo_home}=/cargo\x1f--remap-path-prefix={}=/edgewise", root.display()),
    );
    cmd
}

/// The proxy-wasm callbacks Envoy calls only if the module exports them (proxy-wasm-cpp-host
/// checks each one). The SDK exports them all, so by default Envoy enters the VM for every one of
/// them on every request (docs/design.md has the cost) even when the filter does nothing there.
const OPTIONAL_CALLBACKS: &[&str] = &[
    "proxy_on_request_headers",
    "proxy_on_request_body",
    "proxy_on_request_trailers",
    "proxy_on_response_headers",
    "proxy_on_response_body",
    "proxy_on_response_trailers",
    "proxy_on_log",
    "proxy_on_done",
    "proxy_on_tick",
    "proxy_on_queue_ready",
    "proxy_on_foreign_function",
    "proxy_on_http_call_response",
    "proxy_on_grpc_receive_initial_metadata",
    "proxy_on_grpc_receive",
    "proxy_on_grpc_receive_trailing_metadata",
    "proxy_on_grpc_close",
    "proxy_on_new_connection",
    "proxy_on_downstream_data",
    "proxy_on_downstream_connection_close",
    "proxy_on_upstream_data",
    "proxy_on_upstream_connection_close",
];

/// The custom section in which `edgewise_proxy_wasm::export!` records the filter's hooks.
const HOOKS_SECTION: &str = "edgewise.hooks";

/// The callbacks a filter's declared hooks need: [response headers, background].
fn used_callbacks(hooks: &[u8]) -> Result<Vec<&'static str>, String> {
    let [response_headers, background] = hooks else {
        return Err(format!("section {HOOKS_SECTION} has {} bytes, not 2", hooks.len()));
    };
    let mut used = vec!["proxy_on_request_headers"];
    if *response_headers == 1 {
        used.push("proxy_on_response_headers");
    }
    if *background == 1 {
        used.extend(["proxy_on_tick", "proxy_on_http_call_response"]);
    }
    Ok(used)
}

/// Removes the exports of callbacks the filter does not declare (and the declaration itself),
/// then the code only they reached; re-encoding also drops the linker's padded LEB128
/// relocations (about 10% smaller). A declared callback the module does not export, or a module
/// without the declaration, is an error: a hook would silently never be called.
fn trim(module: &[u8]) -> Result<Vec<u8>, String> {
    let mut config = walrus::ModuleConfig::new();
    config.generate_producers_section(false);
    let mut module = config.parse(module).map_err(|e| e.to_string())?;
    let hooks = module
        .customs
        .remove_raw(HOOKS_SECTION)
        .ok_or_else(|| format!("no {HOOKS_SECTION} section: is the module made by edgewise_proxy_wasm::export!?"))?;
    let used = used_callbacks(&hooks.data)?;
    for callback in &used {
        if module.exports.iter().all(|e| e.name != *callback) {
            return Err(format!("the filter declares a hook whose callback {callback} the module does not export"));
        }
    }
    let unused: Vec<walrus::ExportId> = module
        .exports
        .iter()
        .filter(|e| OPTIONAL_CALLBACKS.contains(&e.name.as_str()) && !used.contains(&e.name.as_str()))
        .map(|e| e.id())
        .collect();
    for id in unused {
        module.exports.delete(id);
    }
    for required in ["proxy_on_context_create", "proxy_on_configure", "proxy_on_memory_allocate"] {
        if module.exports.iter().all(|e| e.name != required) {
            return Err(format!("the module does not export {required}"));
        }
    }
    walrus::passes::gc::run(&mut module);
    Ok(module.emit_wasm())
}

/// The filter crates: directories under filters/ whose Cargo.toml builds a cdylib on proxy-wasm.
/// The directory name is the package name.
fn filter_crates(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("reading filters/")
        .filter_map(|e| e.ok())
        .filter(|e| {
            fs::read_to_string(e.path().join("Cargo.toml"))
                .is_ok_and(|t| t.contains("\"cdylib\"") && t.contains("edgewise-proxy-wasm = "))
        })
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}
