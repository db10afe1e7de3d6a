//! A real ACME CA for the tests: Pebble (Let's Encrypt's test CA, Debian's `pebble`, installed
//! by `make setup`) and its DNS (`pebble-challtestsrv`), which answers every name with
//! 127.0.0.1, so that HTTP-01 validation connects to the ingress on loopback. Its HTTPS
//! certificate is made here; the roots it issues under are random per run and fetched from its
//! management port.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

use crate::certs::{Ca, LeafSpec};
use crate::client::Client;

pub struct Pebble {
    pebble: Option<Child>,
    dns: Child,
    dir: PathBuf,
    api: u16,
    management: u16,
    http_port: u16,
    validity: Duration,
    dns_port: u16,
    /// The CA of Pebble's own HTTPS certificate (`--acme-ca` of the ACME client).
    pub api_ca: Ca,
}

impl Pebble {
    /// Pebble validating HTTP-01 on 127.0.0.1:`http_port` and issuing certificates valid for
    /// `validity`; files and logs under `dir`.
    pub async fn start(dir: &Path, http_port: u16, validity: Duration) -> Result<Pebble> {
        std::fs::create_dir_all(dir)?;
        let api_ca = Ca::new("pebble API test CA")?;
        let mut spec = LeafSpec::server(&["localhost"]);
        spec.ips.push(std::net::Ipv4Addr::LOCALHOST.into());
        let leaf = api_ca.issue(&spec)?;
        std::fs::write(dir.join("api.crt"), &leaf.cert_pem)?;
        std::fs::write(dir.join("api.key"), &leaf.key_pem)?;
        std::fs::write(dir.join("api-ca.crt"), &api_ca.pem)?;
        let dns_port = crate::free_port()?;
        let dns_management = crate::free_port()?;
        let log = std::fs::File::create(dir.join("challtestsrv.log"))?;
        let dns = Command::new("pebble-challtestsrv")
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting pebble-challtestsrv (make setup installs Debian's pebble)")?;
        let mut pebble = Pebble {
            pebble: None,
            dns,
            dir: dir.to_path_buf(),
            api: crate::free_port()?,
            management: crate::free_port()?,
            http_port,
            validity,
            dns_port,
            api_ca,
        };
        pebble.start_again().await?;
        Ok(pebble)
    }

    /// Starts Pebble (again, after `kill`): a new CA, new roots, no account known.
    pub async fn start_again(&mut self) -> Result<()> {
        let config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{}", self.api),
            "managementListenAddress": format!("127.0.0.1:{}", self.management),
            "certificate": self.dir.join("api.crt"),
            "privateKey": self.dir.join("api.key"),
            "httpPort": self.http_port,
            "tlsPort": 1,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": self.validity.as_secs(),
        }});
        let path = self.dir.join("pebble.json");
        std::fs::write(&path, config.to_string())?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("pebble.log"))?;
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&path)
            .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns_port)])
            // No random validation delays; no nonces refused on purpose; every order validates
            // anew (as a renewal after an authorization expired does).
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting pebble (make setup installs Debian's pebble)")?;
        self.pebble = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.roots().await.is_err() {
            if Instant::now() > deadline {
                bail!("pebble did not answer within 20 s: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.pebble.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// The ACME directory URL.
    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.api)
    }

    pub fn api_ca_file(&self) -> PathBuf {
        self.dir.join("api-ca.crt")
    }

    /// The root certificate Pebble issues under (PEM): what a client of the ingress trusts.
    pub async fn roots(&self) -> Result<String> {
        let client = Client::tls(crate::tls::client(&[&self.api_ca.pem], None, &["http/1.1"])?);
        let address = format!("127.0.0.1:{}", self.management).parse()?;
        let r = client.get(address, "127.0.0.1", "/roots/0").await?;
        if r.status != 200 {
            bail!("pebble /roots/0: {}", r.status);
        }
        Ok(r.text())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        if let Some(child) = self.pebble.as_mut() {
            let _ = child.start_kill();
        }
        let _ = self.dns.start_kill();
    }
}
