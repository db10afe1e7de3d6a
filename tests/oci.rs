//! The OCI images Istio pulls: every filter's image is reproducible, survives a push to a real
//! registry (Debian's docker-registry, the CNCF distribution server) and a pull back by digest,
//! and carries the very module the build produced.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgewise::oci;

fn tool(name: &str) -> String {
    let path = format!("/usr/bin/{name}");
    assert!(
        Path::new(&path).exists(),
        "{name} not found: `make setup` installs skopeo and docker-registry (Debian packages)"
    );
    path
}

/// A registry on 127.0.0.1, storing in a temp dir; killed on drop.
struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{ level: warn }}\nstorage: {{ filesystem: {{ rootdirectory: {} }} }}\nhttp: {{ addr: 127.0.0.1:{port} }}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(tool("docker-registry"))
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let registry = Registry { child, port, _dir: dir };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "the registry did not come up on port {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn skopeo(args: &[&str]) {
    let out = Command::new(tool("skopeo")).arg("--insecure-policy").args(args).output().unwrap();
    assert!(out.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn images_are_reproducible_and_round_trip_through_a_registry_by_digest() {
    let modules = oci::modules().unwrap();
    let names: Vec<&str> = modules.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"serverless") && names.contains(&"egress"), "{names:?}");
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    for (name, wasm) in &modules {
        let image = oci::build(wasm, name, "test", &work.path().join(name)).unwrap();
        let again = oci::build(wasm, name, "test", &work.path().join(format!("{name}-again"))).unwrap();
        assert_eq!(image.digest, again.digest, "{name}: the same module must give the same digest");

        let remote = format!("docker://127.0.0.1:{}/edgewise/{name}", registry.port);
        skopeo(&[
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &format!("oci:{}:test", image.dir.display()),
            &format!("{remote}:test"),
        ]);
        let pulled = work.path().join(format!("{name}-pulled"));
        skopeo(&[
            "copy",
            "--src-tls-verify=false",
            &format!("{remote}@{}", image.digest),
            &format!("oci:{}:pulled", pulled.display()),
        ]);

        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(pulled.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], image.digest.as_str(), "{name}: the digest survives the registry");
        assert_eq!(
            oci::extract_wasm(&pulled).unwrap(),
            std::fs::read(wasm).unwrap(),
            "{name}: plugin.wasm must be byte-identical"
        );
    }
}
