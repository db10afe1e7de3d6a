//! `tools/apt-install`, which `make setup`/`make test`/`make bench` use for Debian packages: as
//! root it runs apt-get, as another user it goes through password-less sudo, and where neither
//! works it fails with the exact command to run. `apt-get` and `sudo` are stand-ins on PATH that
//! record how they were called; the other users are `nobody` (through setpriv).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Bin {
    dir: tempfile::TempDir,
}

impl Bin {
    fn new() -> Bin {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        Bin { dir }
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("calls")
    }

    /// A stand-in that appends `name args` to the log and exits with `status`.
    fn stand_in(&self, name: &str, script: &str) {
        let path = self.dir.path().join(name);
        let log = self.log();
        fs::write(&path, format!("#!/bin/sh\necho \"{name} $*\" >> {}\n{script}\n", log.display())).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn calls(&self) -> Vec<String> {
        fs::read_to_string(self.log()).unwrap_or_default().lines().map(String::from).collect()
    }

    /// Runs the script with only the stand-ins and the system's basic commands on PATH, as root
    /// or, with `as_nobody`, as uid/gid 65534.
    fn run(&self, as_nobody: bool, packages: &[&str]) -> Output {
        // A copy beside the stand-ins: nobody may not be able to enter the checkout (a clone
        // under a folder only its owner can enter).
        let script = self.dir.path().join("apt-install");
        fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/apt-install"), &script).unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("{}:/usr/bin:/bin", self.dir.path().display());
        let mut cmd = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh"]);
            c
        } else {
            Command::new("sh")
        };
        // The log must be writable by nobody.
        fs::write(self.log(), "").unwrap();
        fs::set_permissions(self.log(), fs::Permissions::from_mode(0o666)).unwrap();
        cmd.arg(script).args(packages).env_clear().env("PATH", path).output().unwrap()
    }
}

fn is_root() -> bool {
    String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap().trim() == "0"
}

#[test]
fn as_root_it_runs_apt_get_and_updates_the_index_only_when_install_fails() {
    assert!(is_root(), "these tests switch to nobody with setpriv, which needs root");
    let bin = Bin::new();
    bin.stand_in("apt-get", "exit 0");
    let out = bin.run(false, &["skopeo", "docker-registry"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(bin.calls(), ["apt-get install -y skopeo docker-registry"]);

    // The first install fails (a stale index): update, then install again.
    let bin = Bin::new();
    bin.stand_in("apt-get", r#"[ "$1" = update ] || [ -e "$0.updated" ] && { touch "$0.updated"; exit 0; }; exit 100"#);
    let out = bin.run(false, &["wrk"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(bin.calls(), ["apt-get install -y wrk", "apt-get update", "apt-get install -y wrk"]);
}

#[test]
fn another_user_goes_through_password_less_sudo() {
    let bin = Bin::new();
    bin.stand_in("apt-get", "exit 0");
    // sudo -n: runs the command (as this user: the stand-in apt-get only records it).
    bin.stand_in("sudo", r#"[ "$1" = -n ] || exit 1; shift; exec "$@""#);
    let out = bin.run(true, &["nodejs"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        bin.calls(),
        [
            "sudo -n true",
            "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs",
            "apt-get install -y nodejs"
        ]
    );
}

#[test]
fn without_root_or_sudo_it_fails_with_the_command_to_run() {
    for sudo_asks_for_a_password in [false, true] {
        let bin = Bin::new();
        bin.stand_in("apt-get", "exit 0");
        if sudo_asks_for_a_password {
            bin.stand_in("sudo", "echo 'sudo: a password is required' >&2; exit 1");
        }
        let out = bin.run(true, &["skopeo", "docker-registry"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains("\n  apt-get update && apt-get install -y skopeo docker-registry\n"), "{stderr}");
        let expected: &[&str] = if sudo_asks_for_a_password { &["sudo -n true"] } else { &[] };
        assert_eq!(bin.calls(), expected, "apt-get must not run");
    }
}
