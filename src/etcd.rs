//! A real etcd cluster for the tests: `etcd` members (Debian's etcd-server, installed by `make
//! setup`) on 127.0.0.1, each in its own data directory, that can be killed and started again;
//! its client port plain, or TLS with client certificates checked (as a real deployment has it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

use crate::certs::{Ca, Leaf, LeafSpec};

/// The client port's TLS: etcd's CA, its server certificate, and a client certificate of the
/// same CA (files under `dir`).
pub struct EtcdTls {
    pub ca: Ca,
    pub client: Leaf,
    pub dir: PathBuf,
}

impl EtcdTls {
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn cert_file(&self) -> PathBuf {
        self.dir.join("client.crt")
    }
    pub fn key_file(&self) -> PathBuf {
        self.dir.join("client.key")
    }
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

pub struct EtcdCluster {
    members: Vec<Member>,
    dir: PathBuf,
    pub tls: Option<EtcdTls>,
}

impl EtcdCluster {
    /// `size` members under `dir`, started together; returns once every member answers.
    pub async fn start(dir: &Path, size: usize) -> Result<EtcdCluster> {
        EtcdCluster::start_with(dir, size, false).await
    }

    /// As `start`, the client port over TLS, a client certificate required
    /// (`--client-cert-auth`); the certificates are made here, in `tls`.
    pub async fn start_tls(dir: &Path, size: usize) -> Result<EtcdCluster> {
        EtcdCluster::start_with(dir, size, true).await
    }

    async fn start_with(dir: &Path, size: usize, tls: bool) -> Result<EtcdCluster> {
        std::fs::create_dir_all(dir)?;
        let tls = if tls {
            let ca = Ca::new("etcd test CA")?;
            let mut spec = LeafSpec::server(&["localhost"]);
            spec.ips.push(std::net::Ipv4Addr::LOCALHOST.into());
            let server = ca.issue(&spec)?;
            let client = ca.issue(&LeafSpec::client("edgewise-control", &[]))?;
            let dir = dir.join("tls");
            std::fs::create_dir_all(&dir)?;
            for (file, pem) in [
                ("ca.crt", &ca.pem),
                ("server.crt", &server.cert_pem),
                ("server.key", &server.key_pem),
                ("client.crt", &client.cert_pem),
                ("client.key", &client.key_pem),
            ] {
                std::fs::write(dir.join(file), pem)?;
            }
            Some(EtcdTls { ca, client, dir })
        } else {
            None
        };
        let mut members = Vec::new();
        for i in 0..size {
            members.push(Member {
                name: format!("m{i}"),
                client: crate::free_port()?,
                peer: crate::free_port()?,
                child: None,
            });
        }
        let mut cluster = EtcdCluster { members, dir: dir.to_path_buf(), tls };
        for i in 0..size {
            cluster.spawn(i, "new")?;
        }
        for i in 0..size {
            cluster.healthy(i, Duration::from_secs(30)).await?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<()> {
        let initial: Vec<String> =
            self.members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer)).collect();
        let log = std::fs::File::create(self.dir.join(format!("{}.log", self.members[i].name)))?;
        let scheme = self.scheme();
        let mut command = Command::new("etcd");
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(tls.dir.join("server.crt"))
                .arg("--key-file")
                .arg(tls.dir.join("server.key"))
                .arg("--trusted-ca-file")
                .arg(tls.ca_file())
                .arg("--client-cert-auth");
        }
        let m = &mut self.members[i];
        let child = command
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.dir.join(&m.name))
            .arg("--listen-client-urls")
            .arg(format!("{scheme}://127.0.0.1:{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("{scheme}://127.0.0.1:{}", m.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-state")
            .arg(state)
            .arg("--initial-cluster-token")
            .arg("edgewise-test")
            // Room for a benchmark's million functions (the default quota is 2 GiB).
            .args(["--quota-backend-bytes", "8589934592"])
            // Elections in a loaded 2-core VM: patient enough not to flap.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting etcd (make setup installs Debian's etcd-server)")?;
        m.child = Some(child);
        Ok(())
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Waits until member `i` answers its health check.
    async fn healthy(&self, i: usize, limit: Duration) -> Result<()> {
        let start = Instant::now();
        let port = self.members[i].client;
        loop {
            if let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                let healthy = match &self.tls {
                    None => health(stream).await,
                    Some(tls) => {
                        let config = crate::tls::client(&[&tls.ca.pem], Some(&tls.client), &["http/1.1"])?;
                        let name = rustls::pki_types::ServerName::try_from("localhost")?;
                        match tokio_rustls::TlsConnector::from(config).connect(name, stream).await {
                            Ok(stream) => health(stream).await,
                            Err(e) => Err(e.into()),
                        }
                    }
                };
                if healthy.unwrap_or(false) {
                    return Ok(());
                }
            }
            if start.elapsed() > limit {
                bail!("etcd member {i} (port {port}) not healthy after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The client URLs, comma-separated (edgewise-control's `--etcd`).
    pub fn endpoints(&self) -> String {
        let scheme = self.scheme();
        self.members.iter().map(|m| format!("{scheme}://127.0.0.1:{}", m.client)).collect::<Vec<_>>().join(",")
    }

    /// The running members' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().filter_map(|m| m.child.as_ref().and_then(tokio::process::Child::id)).collect()
    }

    /// A request to etcd's JSON gateway (`/v3/...`, plain clusters only) on the first member
    /// that answers: the answer.
    async fn gateway(&self, path: &str, body: serde_json::Value) -> Result<serde_json::Value> {
        let mut last = None;
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            match crate::service::Service::exchange_on(m.client, "POST", path, &[], &body.to_string()).await {
                Ok((200, _, text)) => return Ok(serde_json::from_str(&text)?),
                Ok((status, _, text)) => last = Some(anyhow::anyhow!("{path}: {status} {text}")),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no etcd member runs")))
    }

    /// The member that leads (plain clusters only): its index.
    pub async fn leader(&self) -> Result<usize> {
        for (i, m) in self.members.iter().enumerate().filter(|(_, m)| m.child.is_some()) {
            let (status, _, text) =
                crate::service::Service::exchange_on(m.client, "POST", "/v3/maintenance/status", &[], "{}").await?;
            let answer: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{status}: {text}"))?;
            if answer["leader"].as_str().is_some() && answer["leader"] == answer["header"]["member_id"] {
                return Ok(i);
            }
        }
        bail!("no etcd member leads")
    }

    /// Puts `value` under `key`, whatever bytes they are (a hostile or broken writer).
    pub async fn put_raw(&self, key: &[u8], value: &[u8]) -> Result<()> {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        self.gateway("/v3/kv/put", serde_json::json!({ "key": b64(key), "value": b64(value) })).await.map(drop)
    }

    /// Compacts the history up to the current revision: the revision.
    pub async fn compact(&self) -> Result<i64> {
        let status = self.gateway("/v3/kv/range", serde_json::json!({ "key": "AA==" })).await?;
        let revision: i64 = status["header"]["revision"].as_str().context("a revision")?.parse()?;
        self.gateway("/v3/kv/compaction", serde_json::json!({ "revision": revision.to_string(), "physical": true }))
            .await?;
        Ok(revision)
    }

    /// The size of member `i`'s database file.
    pub fn db_bytes(&self, i: usize) -> u64 {
        let path = self.dir.join(&self.members[i].name).join("member/snap/db");
        std::fs::metadata(path).map_or(0, |m| m.len())
    }

    /// Kills member `i` (SIGKILL).
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts member `i` again on its data directory.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i).await;
        self.spawn(i, "existing")?;
        self.healthy(i, Duration::from_secs(30)).await
    }

    /// Kills every member.
    pub async fn stop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i).await;
        }
    }
}

async fn health(mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin) -> Result<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"GET /health HTTP/1.1\r\nhost: etcd\r\nconnection: close\r\n\r\n").await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await??;
    let text = String::from_utf8_lossy(&answer);
    Ok(text.starts_with("HTTP/1.1 200") && text.contains("\"health\":\"true\""))
}
