//! envoy/tunnel-hub.yaml and envoy/tunnel-agent.yaml: the hub and agent CAs and certificates
//! (an agent's only DNS SAN is its cluster id), the users' token issuer, and a stand-in for
//! `kubectl proxy` that echoes what it saw and streams like a watch.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::certs::{self, Ca, Leaf, LeafSpec};
use crate::envoy::Config;

pub mod ports {
    pub const USERS: u16 = 10444;
    pub const HANDSHAKE: u16 = 10445;
    pub const HUB_ADMIN: u16 = 9905;
    pub const AGENT_ADMIN: u16 = 9906;
    pub const KUBECTL_PROXY: u16 = 19301;
}

pub const HUB_NAME: &str = "hub.tunnel.edgewise.internal";
pub const AUDIENCE: &str = "edgewise-tunnel-hub";

pub struct Pki {
    pub dir: PathBuf,
    pub hub_ca: Ca,
    pub agent_ca: Ca,
    pub issuer_ca: Ca,
}

impl Pki {
    /// Certificates for the hub and for the agent of cluster-a, and the SDS files.
    pub fn install(run_dir: &Path) -> Result<Pki> {
        let dir = run_dir.join("tunnel");
        let pki = Pki {
            dir: dir.clone(),
            hub_ca: Ca::new("edgewise tunnel hub CA")?,
            agent_ca: Ca::new("edgewise tunnel agent CA")?,
            issuer_ca: Ca::new("issuer CA")?,
        };
        certs::write_leaf(&dir.join("certs/hub"), &pki.hub_ca.issue(&LeafSpec::server(&[HUB_NAME]))?)?;
        certs::write_bundle(&dir.join("certs/hub-ca"), &[&pki.hub_ca])?;
        certs::write_bundle(&dir.join("certs/agent-ca"), &[&pki.agent_ca])?;
        certs::write_pem(&dir, "issuer-ca.pem", &pki.issuer_ca.pem)?;
        pki.install_agent(&dir.join("certs/agent"), &pki.agent_leaf("cluster-a")?)?;
        super::install_sds("tunnel", run_dir)?;
        Ok(pki)
    }

    /// An agent certificate whose only DNS SAN is `cluster`.
    pub fn agent_leaf(&self, cluster: &str) -> Result<Leaf> {
        self.agent_ca.issue(&LeafSpec::server(&[cluster]))
    }

    pub fn install_agent(&self, dir: &Path, leaf: &Leaf) -> Result<()> {
        certs::write_leaf(dir, leaf)
    }

    /// The hub config for this run: user and handshake listeners on free ports (read back),
    /// the token issuer at `issuer_port` trusting the issuer CA.
    pub fn hub_config(&self, run_dir: &Path, issuer_port: u16) -> Config {
        let issuer_ca = self.dir.join("issuer-ca.pem");
        Config::shipped("tunnel-hub")
            .run_dir(run_dir)
            .replace("/etc/ssl/certs/ca-certificates.crt", &issuer_ca.display().to_string())
            .replace(
                "{ address: gitlab.com, port_value: 443 }",
                &format!("{{ address: 127.0.0.1, port_value: {issuer_port} }}"),
            )
    }

    /// Another agent's run dir: its own certificate `leaf` (from whatever CA) and this hub's CA,
    /// with the shipped SDS files; start it with `agent_config(dir, ...)`.
    pub fn other_agent(&self, dir: &Path, leaf: &Leaf) -> Result<()> {
        certs::write_leaf(&dir.join("tunnel/certs/agent"), leaf)?;
        certs::write_bundle(&dir.join("tunnel/certs/hub-ca"), &[&self.hub_ca])?;
        super::install_sds("tunnel", dir)
    }

    /// The agent config for a run dir (this one, or one made by `other_agent`), dialling the
    /// hub's handshake listener and forwarding to the kubectl-proxy stand-in.
    pub fn agent_config(&self, run_dir: &Path, handshake: u16, kubectl_proxy: u16) -> Config {
        Config::shipped("tunnel-agent")
            .run_dir(run_dir)
            .port(ports::HANDSHAKE, handshake)
            .port(ports::KUBECTL_PROXY, kubectl_proxy)
    }
}

/// A `kubectl proxy` stand-in on 127.0.0.1: answers every request with a JSON line of what it saw
/// (method, path, Host and headers); a request with `watch=true` in its query instead streams
/// one chunk per second for `stream_seconds`, like a Kubernetes watch.
pub struct KubectlProxy {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<serde_json::Value>>>,
    task: JoinHandle<()>,
}

impl Drop for KubectlProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubectlProxy {
    pub async fn start(stream_seconds: u64) -> Result<KubectlProxy> {
        Self::start_on(0, stream_seconds).await
    }

    pub async fn start_on(port: u16, stream_seconds: u64) -> Result<KubectlProxy> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { continue };
                let log = log.clone();
                tokio::spawn(async move {
                    let _ = serve(socket, log, stream_seconds).await;
                });
            }
        });
        Ok(KubectlProxy { port, seen, task })
    }

    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

async fn serve(
    socket: tokio::net::TcpStream,
    log: Arc<Mutex<Vec<serde_json::Value>>>,
    stream_seconds: u64,
) -> Result<()> {
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read).lines();
    // One request per connection is enough for the tests (responses say `Connection: close`).
    let Some(request_line) = lines.next_line().await? else { return Ok(()) };
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or_default().to_string());
    let mut headers = serde_json::Map::new();
    while let Some(line) = lines.next_line().await? {
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().into());
        }
    }
    let seen = serde_json::json!({ "method": method, "path": path, "headers": headers });
    if let Ok(mut all) = log.lock() {
        all.push(seen.clone());
    }
    if path.contains("watch=true") {
        write
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
            .await?;
        for i in 0..stream_seconds {
            let line = format!("{{\"type\":\"MODIFIED\",\"n\":{i}}}\n");
            write.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes()).await?;
            write.flush().await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        write.write_all(b"0\r\n\r\n").await?;
    } else {
        let body = seen.to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        write.write_all(head.as_bytes()).await?;
        write.write_all(body.as_bytes()).await?;
    }
    write.shutdown().await?;
    Ok(())
}
