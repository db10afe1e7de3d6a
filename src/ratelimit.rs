//! The fleet-wide rate limit for the Cloud Connector gateway, run for the tests and the demo: a
//! real `redis-server` (Debian's, installed by `make setup`) and the `edgewise-ratelimit` binary.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The shipped limits file (also the one deploy/ratelimit mounts).
pub fn shipped_limits() -> PathBuf {
    crate::repo_root().join("deploy/ratelimit/limits.json")
}

/// A `redis-server` on 127.0.0.1, without persistence, in its own directory.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl Redis {
    pub async fn start(dir: &Path, port: u16) -> Result<Redis> {
        std::fs::create_dir_all(dir)?;
        let mut redis = Redis { child: None, port, dir: dir.to_path_buf() };
        redis.spawn().await?;
        Ok(redis)
    }

    /// On a port the OS picks.
    pub async fn start_any(dir: &Path) -> Result<Redis> {
        Redis::start(dir, crate::free_port()?).await
    }

    async fn spawn(&mut self) -> Result<()> {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server (make setup installs Debian's redis-server)")?;
        self.child = Some(child);
        let start = Instant::now();
        while self.command("PING").await.ok().as_deref() != Some("+PONG") {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("redis-server on port {} did not answer PING", self.port);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (its counts are gone: no persistence).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.spawn().await
    }

    /// One inline command; the first line of the answer.
    pub async fn command(&self, command: &str) -> Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await?;
        stream.write_all(format!("{command}\r\n").as_bytes()).await?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await?;
        Ok(line.trim_end().to_string())
    }
}

/// The `edgewise-ratelimit` binary, running.
pub struct RateLimitService {
    binary: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    pub grpc: u16,
    pub http: u16,
    /// What the service printed on stderr, for failing tests.
    log: PathBuf,
}

impl RateLimitService {
    /// Starts `binary` with the limits file `limits` against `redis_url` on the given ports (0:
    /// the OS picks; the ports it bound are read from its first line).
    pub async fn start(
        binary: &Path,
        limits: &Path,
        redis_url: &str,
        grpc: u16,
        http: u16,
        log: &Path,
    ) -> Result<Self> {
        let args = vec![
            "--config".into(),
            limits.display().to_string(),
            "--redis".into(),
            redis_url.into(),
            "--grpc".into(),
            format!("127.0.0.1:{grpc}"),
            "--http".into(),
            format!("127.0.0.1:{http}"),
        ];
        let mut s = RateLimitService { binary: binary.into(), args, child: None, grpc, http, log: log.into() };
        s.spawn().await?;
        Ok(s)
    }

    async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut child = Command::new(&self.binary)
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(10), BufReader::new(stdout).read_line(&mut line))
            .await
            .context("edgewise-ratelimit did not print its ports")??;
        // listening grpc=127.0.0.1:P http=127.0.0.1:Q
        let port = |key: &str| -> Result<u16> {
            let field = line.split_whitespace().find_map(|f| f.strip_prefix(key)).context("ports line")?;
            Ok(field.rsplit(':').next().unwrap_or_default().parse()?)
        };
        self.grpc = port("grpc=").with_context(|| format!("{line:?}; log: {}", self.log()))?;
        self.http = port("http=")?;
        // Keep the ports on restart.
        self.args[5] = format!("127.0.0.1:{}", self.grpc);
        self.args[7] = format!("127.0.0.1:{}", self.http);
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Waits until `/readyz` says Redis answers.
    pub async fn ready(&self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        while self.get("/readyz").await.ok().map(|(status, _)| status) != Some(200) {
            if start.elapsed() > limit {
                bail!("edgewise-ratelimit not ready after {limit:?}; log: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// SIGTERM, then waits for the exit; its status.
    pub async fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        let pid = child.id().context("no pid")?;
        let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
        anyhow::ensure!(status.success(), "kill -TERM {pid}");
        Ok(tokio::time::timeout(Duration::from_secs(10), child.wait()).await.context("no exit after SIGTERM")??)
    }

    /// Starts it again (after `stop`), on the same ports.
    pub async fn start_again(&mut self) -> Result<()> {
        self.spawn().await
    }

    /// GET on the HTTP port: (status, body).
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.http)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: ratelimit\r\nconnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let status = response.split_whitespace().nth(1).context("status line")?.parse()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((status, body))
    }

    /// One sample of `/metrics`: the value of the line that starts with `series` (name and
    /// labels as written), 0 when absent.
    pub async fn metric(&self, series: &str) -> Result<f64> {
        let (_, body) = self.get("/metrics").await?;
        Ok(body
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .map_or(Ok(0.0), str::parse)?)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
