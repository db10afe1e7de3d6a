//! The fleet-wide rate limit for the Cloud Connector gateway, run for the tests and the demo: a
//! real `redis-server` (Debian's, installed by `make setup`) and the `edgewise-ratelimit` binary.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::service::Service;

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
pub struct RateLimitService(Service);

impl RateLimitService {
    /// Starts `binary` with the limits file `limits` against `redis_url` on the given ports (0:
    /// the OS picks).
    pub async fn start(
        binary: &Path,
        limits: &Path,
        redis_url: &str,
        grpc: u16,
        http: u16,
        log: &Path,
    ) -> Result<Self> {
        let args = vec!["--config".into(), limits.display().to_string(), "--redis".into(), redis_url.into()];
        Ok(RateLimitService(Service::start(binary, args, Vec::new(), grpc, http, log).await?))
    }
}

impl std::ops::Deref for RateLimitService {
    type Target = Service;
    fn deref(&self) -> &Service {
        &self.0
    }
}

impl std::ops::DerefMut for RateLimitService {
    fn deref_mut(&mut self) -> &mut Service {
        &mut self.0
    }
}
