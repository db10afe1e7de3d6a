//! The fuzz corpora as regression tests, on stable: every file of `fuzz/corpus/<target>/`, and of
//! `fuzz/artifacts/<target>/` (inputs that failed, kept until fixed or as regression inputs), goes
//! through the check its fuzz target runs (`edgewise_core::fuzzing`). A target whose corpus is
//! missing or empty fails.

// Not as wasm (`make test-wasm`): Node's WASI runner gives the tests no file system.
#![cfg(not(target_os = "wasi"))]
// A test: its helpers fail it by panicking.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use edgewise_core::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of a directory, sorted; `None` if it does not exist.
fn files(dir: &Path) -> Option<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut files: Vec<PathBuf> =
        entries.map(|e| e.unwrap().path()).filter(|p| p.is_file() && !p.ends_with(".gitkeep")).collect();
    files.sort();
    Some(files)
}

fn replay(target: &str) {
    let check = TARGETS.iter().find(|(name, _)| *name == target).map(|(_, check)| *check).unwrap();
    let corpus = fuzz_dir().join("corpus").join(target);
    let inputs = files(&corpus).unwrap_or_else(|| panic!("no corpus {}: run make fuzz", corpus.display()));
    assert!(!inputs.is_empty(), "the corpus {} is empty: run make fuzz", corpus.display());
    let artifacts = files(&fuzz_dir().join("artifacts").join(target)).unwrap_or_default();
    let failed: Vec<&PathBuf> = inputs
        .iter()
        .chain(&artifacts)
        .filter(|file| {
            let data = std::fs::read(file).unwrap();
            catch_unwind(AssertUnwindSafe(|| check(&data))).is_err()
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs fail: {failed:#?}",
        failed.len(),
        inputs.len() + artifacts.len()
    );
}

macro_rules! targets {
    ($($target:ident)*) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target));
            }
        )*

        /// The tests here, the checks and the fuzz targets name the same targets.
        #[test]
        fn every_target_is_replayed() {
            let mut tested = vec![$(stringify!($target)),*];
            let mut checked: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
            tested.sort();
            checked.sort();
            assert_eq!(tested, checked);
            let fuzz_targets = files(&fuzz_dir().join("fuzz_targets")).unwrap();
            let mut fuzzed: Vec<String> =
                fuzz_targets.iter().map(|p| p.file_stem().unwrap().to_string_lossy().into_owned()).collect();
            fuzzed.sort();
            assert_eq!(fuzzed, checked);
            let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
            for name in checked {
                assert!(manifest.contains(&format!("name = \"{name}\"")), "fuzz/Cargo.toml has no [[bin]] {name}");
            }
        }
    };
}

targets!(json_differential jwt jwks discovery pattern authority route_table route_query configs rs256_differential);
