//! OCI images of the filters in the layout Istio's WasmPlugin fetcher accepts as "compat": a
//! regular image with one `application/vnd.oci.image.layer.v1.tar+gzip` layer holding
//! `plugin.wasm`. Built reproducibly (fixed tar metadata, no gzip timestamp, no creation date),
//! so the same module always gives the same manifest digest, the `sha256` a WasmPlugin pins.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A built image layout.
pub struct Image {
    pub dir: PathBuf,
    pub tag: String,
    /// `sha256:<hex>` of the manifest.
    pub digest: String,
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a blob under `blobs/sha256/` and returns its descriptor fields (digest, size).
fn blob(dir: &Path, bytes: &[u8]) -> Result<(String, usize)> {
    let hex = sha256(bytes);
    let path = dir.join("blobs/sha256").join(&hex);
    fs::create_dir_all(path.parent().context("blob dir")?)?;
    fs::write(&path, bytes)?;
    Ok((format!("sha256:{hex}"), bytes.len()))
}

/// `plugin.wasm` in a tar (fixed metadata) and the same gzipped (no timestamp, no name).
fn layer(wasm: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_path("plugin.wasm")?;
    header.set_size(wasm.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    tar.append(&header, wasm)?;
    let tar = tar.into_inner()?;
    let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar)?;
    Ok((tar, gz.finish()?))
}

/// Builds the image of one filter module into `dir` (replacing what was there).
pub fn build(wasm_path: &Path, filter: &str, version: &str, dir: &Path) -> Result<Image> {
    let wasm = fs::read(wasm_path).with_context(|| format!("reading {}", wasm_path.display()))?;
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    let (tar, gz) = layer(&wasm)?;
    let (layer_digest, layer_size) = blob(dir, &gz)?;
    // The image config of a `FROM scratch` + `ADD plugin.wasm` image, without dates.
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{}", sha256(&tar))] },
    });
    let (config_digest, config_size) = blob(dir, &serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": { "mediaType": CONFIG_TYPE, "digest": config_digest, "size": config_size },
        "layers": [{
            "mediaType": LAYER_TYPE, "digest": layer_digest, "size": layer_size,
            "annotations": { "org.opencontainers.image.title": "plugin.wasm" },
        }],
        "annotations": {
            "org.opencontainers.image.title": format!("edgewise {filter}"),
            "org.opencontainers.image.description": format!("edgewise proxy-wasm filter `{filter}` (Istio WasmPlugin compat image: plugin.wasm)"),
            "org.opencontainers.image.version": version,
            "org.opencontainers.image.licenses": "Apache-2.0",
            "io.edgewise.filter": filter,
            "io.edgewise.wasm.sha256": sha256(&wasm),
        },
    });
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let (digest, size) = blob(dir, &manifest_bytes)?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MANIFEST_TYPE, "digest": digest, "size": size,
            "annotations": { "org.opencontainers.image.ref.name": version },
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(Image { dir: dir.to_path_buf(), tag: version.to_string(), digest })
}

/// Reads `plugin.wasm` back out of an image layout (for the round-trip test).
pub fn extract_wasm(dir: &Path) -> Result<Vec<u8>> {
    let index: Value = serde_json::from_slice(&fs::read(dir.join("index.json"))?)?;
    let blob_path = |digest: &str| dir.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let manifest_digest = index["manifests"][0]["digest"].as_str().context("index has no manifest")?;
    let manifest: Value = serde_json::from_slice(&fs::read(blob_path(manifest_digest))?)?;
    let layers = manifest["layers"].as_array().context("manifest has no layers")?;
    anyhow::ensure!(layers.len() == 1, "compat images have exactly one layer, found {}", layers.len());
    anyhow::ensure!(layers[0]["mediaType"] == LAYER_TYPE, "layer media type {}", layers[0]["mediaType"]);
    let gz = fs::read(blob_path(layers[0]["digest"].as_str().context("layer digest")?))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gz.as_slice()));
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.path()?.as_os_str() == "plugin.wasm" {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut out)?;
            return Ok(out);
        }
    }
    anyhow::bail!("no plugin.wasm in the layer")
}

/// The filter modules build.rs produced, by name.
pub fn modules() -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(crate::filters_dir())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm") {
            if let Some(name) = path.file_stem().and_then(|s| s.to_str()) {
                out.push((name.to_string(), path.clone()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The filter a WasmPlugin `url: oci://.../edgewise/<filter>:<tag>` names.
pub fn filter_of_url(url: &str) -> Option<&str> {
    let rest = url.split("/edgewise/").nth(1)?;
    Some(rest.split([':', '@']).next().unwrap_or(rest))
}

/// Rewrites the `sha256:` of every WasmPlugin under `dir` to its filter's digest; returns the
/// files it changed.
pub fn pin(dir: &Path, digests: &std::collections::BTreeMap<String, String>) -> Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = fs::read_to_string(&path)?;
        let mut filter: Option<String> = None;
        let mut out = String::with_capacity(text.len());
        for line in text.lines() {
            let trimmed = line.trim_start();
            if let Some(url) = trimmed.strip_prefix("url: ") {
                filter = filter_of_url(url).map(str::to_owned);
            }
            match (trimmed.strip_prefix("sha256: "), filter.as_ref().and_then(|f| digests.get(f))) {
                (Some(_), Some(digest)) => {
                    let indent = &line[..line.len() - trimmed.len()];
                    out.push_str(&format!("{indent}sha256: {}", digest.trim_start_matches("sha256:")));
                }
                _ => out.push_str(line),
            }
            out.push('\n');
        }
        if out != text {
            fs::write(&path, out)?;
            changed.push(path);
        }
    }
    Ok(changed)
}

/// The dynamic module the configurations that fetch it by URL pin (`module.remote` in
/// envoy/native/*-remote.yaml, `source.remote` in deploy/envoy-gateway/envoyproxy-remote.yaml).
pub const MODULE: &str = "libedgewise.so";

/// Files that fetch [`MODULE`] by URL, from the repository root: `make oci-pin` keeps their
/// `sha256` and the version in their URL current.
pub const MODULE_PINS: &[&str] =
    &["envoy/native/mesh-gateway-remote.yaml", "deploy/envoy-gateway/envoyproxy-remote.yaml"];

/// The sha256 (hex) of a file.
pub fn file_sha256(path: &Path) -> Result<String> {
    Ok(sha256(&fs::read(path).with_context(|| format!("reading {}", path.display()))?))
}

/// In `path` (a YAML file, or every YAML file of a directory): each URL of the form
/// `…/edgewise/<version>/native/<platform>/libedgewise.so` (a `uri:` or `url:` line) gets
/// `version`, and the `sha256:` line after it `sha256_hex`. Returns the files it changed.
pub fn pin_module(path: &Path, sha256_hex: &str, version: &str) -> Result<Vec<PathBuf>> {
    let files = if path.is_dir() {
        let mut files: Vec<PathBuf> =
            fs::read_dir(path)?.map(|e| e.map(|e| e.path())).collect::<std::io::Result<_>>()?;
        files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut changed = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let mut out = String::with_capacity(text.len());
        let mut pending = false;
        for line in text.lines() {
            let trimmed = line.trim_start();
            let indent = &line[..line.len() - trimmed.len()];
            let url = trimmed.strip_prefix("uri: ").or_else(|| trimmed.strip_prefix("url: "));
            match url.and_then(|url| versioned_module_url(url, version)) {
                Some(url) => {
                    let key = &trimmed[..5];
                    out.push_str(&format!("{indent}{key}{url}"));
                    pending = true;
                }
                None if pending && trimmed.starts_with("sha256: ") => {
                    out.push_str(&format!("{indent}sha256: {sha256_hex}"));
                    pending = false;
                }
                None => out.push_str(line),
            }
            out.push('\n');
        }
        if out != text {
            fs::write(&file, out)?;
            changed.push(file);
        }
    }
    Ok(changed)
}

/// `url` with its version segment set to `version`, if it is a URL of the module in the dist
/// layout (`…/edgewise/<version>/native/<platform>/libedgewise.so`).
fn versioned_module_url(url: &str, version: &str) -> Option<String> {
    if !url.ends_with(&format!("/{MODULE}")) {
        return None;
    }
    let at = url.find("/edgewise/")? + "/edgewise/".len();
    let rest = &url[at..];
    let end = rest.find('/')?;
    rest[end..].starts_with("/native/").then(|| format!("{}{version}{}", &url[..at], &rest[end..]))
}
