//! The release bundle (tools/dist, which `make dist` runs with the aarch64 build, the second build
//! and the checks): assembled here from the fresh build, twice, into temp dirs: the same bytes
//! both times; every artifact built a second time from a copy of the sources: the same bytes; every artifact, schema and shipped file in it; SHA256SUMS right; RELEASE.md stating
//! the version of Cargo.toml and the Envoy release and ABI the module itself states; the
//! configurations that fetch the module by URL pinning the bundled one; no path of this machine in
//! any file, and a bundle that would hold one refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs tools/dist into `out` with the build in `target` (the directory holding `filters/`).
fn dist(out: &Path, target: &Path) -> Result<String, String> {
    let root = edgewise::repo_root();
    let run = Command::new(root.join("tools/dist"))
        .arg(out)
        .env("CARGO_TARGET_DIR", target)
        .current_dir(&root)
        .output()
        .expect("running tools/dist");
    let text = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    if run.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Every file under `dir`, by path relative to it.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                let rel = path.strip_prefix(base).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn git_files(dirs: &[&str]) -> Vec<String> {
    let out = Command::new("git").arg("ls-files").args(dirs).current_dir(edgewise::repo_root()).output().unwrap();
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
}

fn target() -> PathBuf {
    edgewise::filters_dir().parent().unwrap().to_path_buf()
}

/// The `sha256:` after the URL of the module in a shipped YAML.
fn pinned(yaml: &str) -> String {
    let from = yaml.find("/native/linux-x86_64/libedgewise.so").expect("the module's URL");
    let line = yaml[from..].lines().find_map(|l| l.trim().strip_prefix("sha256: ")).expect("its sha256");
    line.to_string()
}

#[test]
fn the_bundle_holds_every_artifact_and_shipped_file_with_checksums_and_is_the_same_twice() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    dist(a.path(), &target()).unwrap_or_else(|e| panic!("tools/dist: {e}"));
    dist(b.path(), &target()).unwrap_or_else(|e| panic!("tools/dist: {e}"));
    let name = format!("edgewise-{VERSION}");
    let tarball = format!("{name}.tar.gz");
    let (ta, tb) = (std::fs::read(a.path().join(&tarball)).unwrap(), std::fs::read(b.path().join(&tarball)).unwrap());
    assert!(ta == tb, "two runs gave different {tarball}");
    let sums = std::fs::read_to_string(a.path().join(format!("{tarball}.sha256"))).unwrap();
    assert_eq!(sums, format!("{}  {tarball}\n", sha256_hex(&ta)));

    let bundle = files(&a.path().join(&name));
    // The artifacts, byte for byte as built.
    let filters = edgewise::filters_dir();
    let module = std::fs::read(filters.join("libedgewise.so")).unwrap();
    assert!(bundle["native/linux-x86_64/libedgewise.so"] == module);
    let wasm: Vec<_> = std::fs::read_dir(&filters)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
        .collect();
    assert_eq!(wasm.len(), 5, "{wasm:?}");
    for path in &wasm {
        let rel = format!("wasm/{}", path.file_name().unwrap().to_string_lossy());
        assert!(bundle.get(&rel) == Some(&std::fs::read(path).unwrap()), "{rel}");
    }
    // The schemas and every shipped file of envoy/ and deploy/, as committed.
    let root = edgewise::repo_root();
    let mut shipped = git_files(&["envoy", "deploy"]);
    shipped.extend(
        std::fs::read_dir(root.join("schemas"))
            .unwrap()
            .map(|e| format!("schemas/{}", e.unwrap().file_name().to_string_lossy())),
    );
    shipped.push("CHANGELOG.md".into());
    assert!(shipped.iter().any(|f| f == "envoy/native/mesh-gateway-remote.yaml"));
    for file in &shipped {
        assert!(bundle.get(file) == Some(&std::fs::read(root.join(file)).unwrap()), "{file} in the bundle");
    }
    let expected = shipped.len() + wasm.len() + 3; // + the module, RELEASE.md, SHA256SUMS
    assert_eq!(bundle.len(), expected, "{:?}", bundle.keys().collect::<Vec<_>>());

    // SHA256SUMS: every other file, right.
    let sums = String::from_utf8(bundle["SHA256SUMS"].clone()).unwrap();
    let listed: BTreeMap<&str, &str> = sums.lines().map(|l| l.split_once("  ").map(|(h, f)| (f, h)).unwrap()).collect();
    assert_eq!(listed.len(), bundle.len() - 1);
    for (file, bytes) in &bundle {
        if file != "SHA256SUMS" {
            assert_eq!(listed.get(file.as_str()).copied(), Some(sha256_hex(bytes).as_str()), "SHA256SUMS: {file}");
        }
    }

    // RELEASE.md: the version, and what the module states it is built for.
    let release = String::from_utf8(bundle["RELEASE.md"].clone()).unwrap();
    assert!(release.starts_with(&format!("# edgewise {VERSION}\n")), "{release}");
    assert!(release.contains("| `native/linux-x86_64/libedgewise.so` | Envoy 1.40 (dynamic modules)"), "{release}");
    assert!(release.contains("dynamic-module ABI `v0.2.0`"), "{release}");
    assert!(release.contains("| `wasm/serverless.wasm` |") && release.contains("proxy-wasm ABI 0.2.1"), "{release}");
    assert!(release.contains("not checked by this run"), "only `make dist` (--checked) may say it checked");

    // The configurations that fetch the module by URL pin this one.
    let module_sha = sha256_hex(&module);
    for file in ["envoy/native/mesh-gateway-remote.yaml", "deploy/envoy-gateway/envoyproxy-remote.yaml"] {
        assert_eq!(pinned(std::str::from_utf8(&bundle[file]).unwrap()), module_sha, "{file} (run `make oci-pin`)");
    }

    // The changelog has a section for this version.
    let changelog = String::from_utf8(bundle["CHANGELOG.md"].clone()).unwrap();
    assert!(changelog.lines().any(|l| l.starts_with(&format!("## {VERSION} "))), "CHANGELOG.md: no ## {VERSION}");

    // No path of this machine anywhere.
    let home = std::env::var("HOME").unwrap_or_default();
    for needle in [root.display().to_string(), home.clone(), format!("{home}/.cargo")] {
        assert!(!needle.is_empty());
        for (file, bytes) in &bundle {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{file} holds the machine path {needle}"
            );
        }
    }
}

/// Reproducible: every artifact built a second time (the same build script and nested builds, from
/// a copy of the sources at another path, into another target directory) has the same bytes as
/// the build under test (tools/dist --rebuild fails otherwise; about 40 s here). `make dist` does
/// the same with the aarch64 module too.
#[test]
fn a_second_build_from_a_copy_at_another_path_gives_the_same_bytes() {
    let root = edgewise::repo_root();
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(root.join("tools/dist"))
        .args(["--rebuild"])
        .arg(out.path())
        .env("CARGO_TARGET_DIR", target())
        .current_dir(&root)
        .output()
        .expect("running tools/dist --rebuild");
    let text = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "tools/dist --rebuild:\n{text}");
    assert!(text.contains("reproducible: the second build"), "{text}");
    let release = std::fs::read_to_string(out.path().join(format!("edgewise-{VERSION}/RELEASE.md"))).unwrap();
    assert!(release.contains("the same bytes"), "{release}");
}

/// tools/dist refuses a module that carries a path of this machine (as a build without the
/// remapping of build.rs would).
#[test]
fn a_bundle_with_a_machine_path_is_refused() {
    let fake = tempfile::tempdir().unwrap();
    let filters = fake.path().join("filters");
    std::fs::create_dir(&filters).unwrap();
    for entry in std::fs::read_dir(edgewise::filters_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "wasm") {
            std::fs::copy(&path, filters.join(path.file_name().unwrap())).unwrap();
        }
    }
    let mut module = std::fs::read(edgewise::filters_dir().join("libedgewise.so")).unwrap();
    module.extend_from_slice(format!("{}/filters/native/src/lib.rs\0", edgewise::repo_root().display()).as_bytes());
    std::fs::write(filters.join("libedgewise.so"), module).unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = dist(out.path(), fake.path()).unwrap_err();
    assert!(err.contains("contain the machine path"), "{err}");
}
