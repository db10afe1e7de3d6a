//! Builds every filter crate under filters/ (those whose crate-type is cdylib) for wasm32-wasip1 with the `filters`
//! profile and copies the modules to target/filters/<name>.wasm, so that `cargo test` always runs
//! Envoy with fresh .wasm files. The nested cargo uses its own target dir (target/wasm) to avoid
//! waiting on the lock of the build that runs this script.

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
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rerun-if-changed=Cargo.toml");
    println!("cargo:rerun-if-env-changed=EDGEWISE_SKIP_WASM");
    println!("cargo:rustc-env=EDGEWISE_FILTERS_DIR={}", out.display());
    if env::var_os("EDGEWISE_SKIP_WASM").is_some() {
        return;
    }

    let filters = filter_crates(&root.join("filters"));
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root)
        .args(["build", "--profile", "filters", "--target", TARGET, "--target-dir"])
        .arg(target_dir.join("wasm"));
    for f in &filters {
        cmd.args(["-p", f]);
    }
    // The outer build's settings are for the host (and clippy's wrapper must not leak in).
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
    let status = cmd.status().expect("running cargo for the wasm filters");
    if !status.success() {
        panic!(
            "building the wasm filters failed (see above). If the target is missing: \
             `rustup target add {TARGET}` (or `make setup`)"
        );
    }
    fs::create_dir_all(&out).expect("creating target/filters");
    for f in &filters {
        let file = format!("{}.wasm", f.replace('-', "_"));
        let built = target_dir.join("wasm").join(TARGET).join("filters").join(&file);
        let dest = out.join(format!("{f}.wasm"));
        fs::copy(&built, &dest).unwrap_or_else(|e| panic!("copying {} -> {}: {e}", built.display(), dest.display()));
    }
}

/// The filter crates: directories under filters/ whose Cargo.toml builds a cdylib (the libraries
/// `core` and `host` do not). The directory name is the package name.
fn filter_crates(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("reading filters/")
        .filter_map(|e| e.ok())
        .filter(|e| fs::read_to_string(e.path().join("Cargo.toml")).is_ok_and(|t| t.contains("\"cdylib\"")))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}
