//! `make oci`: an OCI image layout per filter under target/oci/<filter>/, and the manifest digest
//! to pin in a WasmPlugin (`sha256:`). With `--pin`, writes those digests into the WasmPlugins
//! under deploy/istio/ (tests/istio.rs fails when they are not current).

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
    if std::env::args().any(|a| a == "--pin") {
        for dir in ["deploy/istio", "deploy/envoy-gateway"] {
            for file in edgewise::oci::pin(&edgewise::repo_root().join(dir), &digests)? {
                println!("pinned digests in {}", file.display());
            }
        }
    } else {
        println!("\nPush one with: skopeo copy oci:target/oci/<filter>:{version} docker://<registry>/edgewise/<filter>:{version}");
    }
    Ok(())
}
