//! Scenario set-up shared by the tests and the demo: certificates, SDS files and stand-ins for
//! each shipped YAML.

pub mod cloud_connector;
pub mod egress;
pub mod mesh;
pub mod serverless;
pub mod tunnel;

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

/// Copies the shipped SDS files of a scenario (`envoy/sds/<scenario>/*.yaml`) to
/// `<run_dir>/<scenario>/sds/`, pointing their `target/run/` paths at `run_dir`.
pub fn install_sds(scenario: &str, run_dir: &Path) -> Result<()> {
    let from = crate::repo_root().join("envoy/sds").join(scenario);
    let to = run_dir.join(scenario).join("sds");
    fs::create_dir_all(&to)?;
    let prefix = format!("{}/", run_dir.display());
    for entry in fs::read_dir(&from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = fs::read_to_string(&path)?.replace("target/run/", &prefix);
            let file = path.file_name().context("file name")?;
            // Write then rename: Envoy must never read a half-written SDS file.
            let tmp = to.join(".tmp");
            fs::write(&tmp, text)?;
            fs::rename(&tmp, to.join(file))?;
        }
    }
    Ok(())
}

/// Writes everything a shipped YAML reads from `target/run/` (certificates, SDS files) into
/// `run_dir`, so that it can start or be validated.
pub fn install(scenario: &str, run_dir: &Path) -> Result<()> {
    match scenario {
        "serverless" | "serverless-xds" | "serverless-odcds" => serverless::Pki::install(run_dir).map(drop),
        "cloud-connector" => cloud_connector::Pki::install(run_dir).map(drop),
        "tunnel-hub" | "tunnel-agent" => tunnel::Pki::install(run_dir).map(drop),
        "egress" => egress::install(run_dir).map(drop),
        "mesh-gateway" | "mesh-sidecar" => mesh::Pki::install(run_dir).map(drop),
        other => anyhow::bail!("no set-up for envoy/{other}.yaml: add one to edgewise::scenarios::install"),
    }
}

/// The names of the shipped YAML files (`envoy/<name>.yaml`).
pub fn shipped() -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(crate::repo_root().join("envoy"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                names.push(stem.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}
