//! `make oci`: an OCI image layout per filter under target/oci/<filter>/, and the manifest digest
//! to pin in a WasmPlugin (`sha256:`), and the sha256 of libedgewise.so. With `--pin`, writes those
//! digests into the WasmPlugins under deploy/istio/ and deploy/envoy-gateway/ (tests/istio.rs and
//! tests/envoy_gateway.rs fail when they are not current), and the module's sha256 (and the
//! version in its URL) into the files that fetch it by URL (`edgewise::oci::MODULE_PINS`).

use std::collections::BTreeMap;

use anyhow::Result;

fn main() -> Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let out = edgewise::filters_dir().with_file_name("oci");
    let mut digests = BTreeMap::new();
    for (name, wasm) in edgewise::oci::modules()? {
        let image = edgewise::oci::build(&wasm, &name, version, &out.join(&name))?;
        println!("{name:<16} {}  (oci:{}:{})", image.digest, image.dir.display(), image.tag);
        digests.insert(name, image.digest);
    }
    let module = edgewise::filters_dir().join(edgewise::oci::MODULE);
    let module_sha256 = edgewise::oci::file_sha256(&module)?;
    println!("{:<16} sha256:{module_sha256}  ({})", edgewise::oci::MODULE, module.display());
    if std::env::args().any(|a| a == "--pin") {
        for dir in ["deploy/istio", "deploy/envoy-gateway"] {
            for file in edgewise::oci::pin(&edgewise::repo_root().join(dir), &digests)? {
                println!("pinned digests in {}", file.display());
            }
        }
        // The configurations that fetch libedgewise.so by URL: its sha256, and the version in the URL.
        for file in edgewise::oci::MODULE_PINS {
            let path = edgewise::repo_root().join(file);
            for file in edgewise::oci::pin_module(&path, &module_sha256, version)? {
                println!("pinned {} in {}", edgewise::oci::MODULE, file.display());
            }
        }
    } else {
        println!("\nPush one with: skopeo copy oci:target/oci/<filter>:{version} docker://<registry>/edgewise/<filter>:{version}");
    }
    Ok(())
}
