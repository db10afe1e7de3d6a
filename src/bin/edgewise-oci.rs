//! `make oci`: an OCI image layout per filter under target/oci/<filter>/, and the manifest digest
//! to pin in a WasmPlugin (`sha256:`).

use anyhow::Result;

fn main() -> Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let out = edgewise::filters_dir().with_file_name("oci");
    for (name, wasm) in edgewise::oci::modules()? {
        let image = edgewise::oci::build(&wasm, &name, version, &out.join(&name))?;
        println!("{name:<16} {}  (oci:{}:{})", image.digest, image.dir.display(), image.tag);
    }
    println!("\nPush one with: skopeo copy oci:target/oci/<filter>:{version} docker://<registry>/edgewise/<filter>:{version}");
    Ok(())
}
