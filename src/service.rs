//! A service binary of the project (`edgewise-ratelimit`, `edgewise-control`), running: started
//! with its gRPC and HTTP ports (0: the OS picks; read back from its first line, `listening
//! grpc=<addr> http=<addr>`), stopped with SIGTERM, started again on the same ports.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

pub struct Service {
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    pub grpc: u16,
    pub http: u16,
    /// A third port, `--routes` (edgewise-control's route table), when the service has one.
    pub routes: Option<u16>,
    /// What the service printed on stderr, for failing tests.
    log: PathBuf,
}

impl Service {
    /// Starts `binary` with `args` (without the ports) and `env`, on the given ports.
    pub async fn start(
        binary: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
        grpc: u16,
        http: u16,
        log: &Path,
    ) -> Result<Service> {
        Service::start_with_routes(binary, args, env, (grpc, http, None), log).await
    }

    /// As `start`, with a route port too when `ports.2` is given.
    pub async fn start_with_routes(
        binary: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
        (grpc, http, routes): (u16, u16, Option<u16>),
        log: &Path,
    ) -> Result<Service> {
        let mut s = Service { binary: binary.into(), args, env, child: None, grpc, http, routes, log: log.into() };
        s.spawn().await?;
        Ok(s)
    }

    async fn spawn(&mut self) -> Result<()> {
        let name = self.binary.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut child = Command::new(&self.binary)
            .args(&self.args)
            .args(["--grpc", &format!("127.0.0.1:{}", self.grpc), "--http", &format!("127.0.0.1:{}", self.http)])
            .args(self.routes.iter().flat_map(|p| ["--routes".to_string(), format!("127.0.0.1:{p}")]))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(120), BufReader::new(stdout).read_line(&mut line))
            .await
            .with_context(|| format!("{name} did not print its ports"))??;
        let port = |key: &str| -> Result<u16> {
            let field = line.split_whitespace().find_map(|f| f.strip_prefix(key)).context("ports line")?;
            Ok(field.rsplit(':').next().unwrap_or_default().parse()?)
        };
        // Kept on restart.
        self.grpc = port("grpc=").with_context(|| format!("{name}: {line:?}; log: {}", self.log()))?;
        self.http = port("http=")?;
        if self.routes.is_some() {
            self.routes = Some(port("routes=")?);
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn ready(&self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        while self.get("/readyz").await.ok().map(|(status, _)| status) != Some(200) {
            if start.elapsed() > limit {
                bail!("{} not ready after {limit:?}; log: {}", self.binary.display(), self.log());
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

    /// SIGKILL (a crash: nothing is flushed or closed), then waits for the exit.
    pub async fn kill(&mut self) -> Result<()> {
        let mut child = self.child.take().context("not running")?;
        child.kill().await.context("kill -9")
    }

    /// Starts it again (after `stop` or `kill`), on the same ports.
    pub async fn start_again(&mut self) -> Result<()> {
        self.spawn().await
    }

    /// One request on the HTTP port: (status, body).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<(u16, String)> {
        let (status, _, body) = self.exchange(method, path, headers, body).await?;
        Ok((status, body))
    }

    /// One request on the HTTP port: (status, header lines lowercased up to their colon, body).
    pub async fn exchange(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<(u16, Vec<(String, String)>, String)> {
        Service::exchange_on(self.http, method, path, headers, body).await
    }

    /// The same on `port` of 127.0.0.1 (for a task that does not hold the service).
    pub async fn exchange_on(
        port: u16,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<(u16, Vec<(String, String)>, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: service\r\nconnection: close\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let status = response.split_whitespace().nth(1).context("status line")?.parse()?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let fields = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok((status, fields, body.to_string()))
    }

    /// GET on the HTTP port: (status, body).
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        self.request("GET", path, &[], "").await
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
