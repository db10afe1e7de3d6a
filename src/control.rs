//! The serverless management service, run for the tests, the demo and the benchmark: the
//! `edgewise-control` binary on a SQLite file (or replicas on etcd), serving the platform's client certificate of the
//! scenario's PKI, and a client for its REST API.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::certs::Ca;
use crate::service::Service;

/// The admin token the tests and the demo give it.
pub const DEMO_TOKEN: &str = "edgewise-demo-admin-token";
/// The ports of envoy/serverless-xds.yaml.
pub const GRPC_PORT: u16 = 18000;
pub const HTTP_PORT: u16 = 19100;
pub const ROUTES_PORT: u16 = 19200;

pub struct ControlService(Service);

impl ControlService {
    /// Starts `binary` on `db` with the platform client certificate the serverless PKI wrote
    /// under `run_dir` (its Secret-volume paths, so that a rotation is seen), on the given ports
    /// (gRPC, HTTP, routes; 0: the OS picks), with `extra` arguments. The xDS and route ports
    /// take the Envoys' client certificates (mutual TLS).
    pub async fn start(
        binary: &Path,
        run_dir: &Path,
        db: &Path,
        ports: (u16, u16, u16),
        extra: &[&str],
    ) -> Result<Self> {
        let mut args = xds_tls(run_dir);
        args.extend(extra.iter().map(|a| a.to_string()));
        ControlService::start_plain(binary, run_dir, db, ports, &args.iter().map(String::as_str).collect::<Vec<_>>())
            .await
    }

    /// As `start_plain`, a replica on the etcd cluster at `endpoints` (`--etcd`), logging to
    /// `control-<name>.log` (`xds_tls` gives the arguments of `start`'s mutual TLS).
    pub async fn start_replica(
        binary: &Path,
        run_dir: &Path,
        endpoints: &str,
        name: &str,
        ports: (u16, u16, u16),
        extra: &[&str],
    ) -> Result<Self> {
        let mut args = vec!["--etcd".to_string(), endpoints.to_string()];
        args.extend(extra.iter().map(|a| a.to_string()));
        ControlService::launch(binary, run_dir, args, ports, &format!("control-{name}.log")).await
    }

    /// As `start`, without TLS on the xDS and route ports (a protocol test with plain clients).
    pub async fn start_plain(
        binary: &Path,
        run_dir: &Path,
        db: &Path,
        ports: (u16, u16, u16),
        extra: &[&str],
    ) -> Result<Self> {
        let mut args = vec!["--db".to_string(), db.display().to_string()];
        args.extend(extra.iter().map(|a| a.to_string()));
        ControlService::launch(binary, run_dir, args, ports, "control.log").await
    }

    async fn launch(
        binary: &Path,
        run_dir: &Path,
        mut args: Vec<String>,
        ports: (u16, u16, u16),
        log: &str,
    ) -> Result<Self> {
        let certs = run_dir.join("serverless/certs/platform-client");
        for (flag, file) in [("--client-cert", "tls.crt"), ("--client-key", "tls.key")] {
            args.push(flag.into());
            args.push(certs.join(file).display().to_string());
        }
        let env = vec![(edgewise_control::TOKEN_ENV.to_string(), DEMO_TOKEN.to_string())];
        let log = run_dir.join(log);
        let service = Service::start_with_routes(binary, args, env, (ports.0, ports.1, Some(ports.2)), &log).await?;
        service.ready(Duration::from_secs(120)).await?;
        Ok(ControlService(service))
    }

    /// The route port.
    pub fn routes_port(&self) -> u16 {
        self.0.routes.unwrap_or_default()
    }

    /// `GET <path>` on the route port over mutual TLS, as an Envoy of the serverless PKI's control
    /// plane CA (`ca`, which issues the client certificate): (status, body).
    pub async fn routes_get(&self, ca: &Ca, path: &str) -> Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let leaf = ca.issue(&crate::certs::LeafSpec::client("envoy", &[]))?;
        let config = crate::tls::client(&[&ca.pem], Some(&leaf), &["http/1.1"])?;
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.routes_port())).await?;
        let name = rustls::pki_types::ServerName::try_from(crate::scenarios::serverless::CONTROL_NAME)?;
        let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: control\r\nconnection: close\r\n\r\n");
        tls.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await?;
        let answer = String::from_utf8_lossy(&answer);
        let (head, body) = answer.split_once("\r\n\r\n").context("an HTTP answer")?;
        let status = head.split_whitespace().nth(1).context("a status")?.parse()?;
        Ok((status, body.to_string()))
    }

    /// `GET <ROUTES_PATH><query>` on a plain route port (a service started without TLS):
    /// (status, cursor header, body).
    pub async fn routes_plain(&self, query: &str) -> Result<(u16, String, String)> {
        let path = format!("{}{query}", edgewise_control::ROUTES_PATH);
        let (status, fields, body) = Service::exchange_on(self.routes_port(), "GET", &path, &[], "").await?;
        let cursor = fields.iter().find(|(k, _)| k == edgewise_control::CURSOR).map(|(_, v)| v.clone());
        Ok((status, cursor.unwrap_or_default(), body))
    }

    /// A REST call with the admin token: (status, JSON body).
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let auth = format!("Bearer {DEMO_TOKEN}");
        let body = body.map(Value::to_string).unwrap_or_default();
        let (status, text) = self.request(method, path, &[("authorization", &auth)], &body).await?;
        let json = serde_json::from_str(&text).with_context(|| format!("{method} {path}: {status} {text:?}"))?;
        Ok((status, json))
    }

    async fn expect(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let (status, json) = self.call(method, path, body).await?;
        if !(200..300).contains(&status) {
            bail!("{method} {path}: {status} {json}");
        }
        Ok(json)
    }

    /// Adds or replaces a customer whose gateway listens on 127.0.0.1:`port`.
    pub async fn put_customer(&self, name: &str, port: u16, cas: &[&Ca], san: &str) -> Result<()> {
        let ca: String = cas.iter().map(|c| c.pem.as_str()).collect();
        let body = json!({ "address": format!("127.0.0.1:{port}"), "ca": ca, "san": san });
        self.expect("PUT", &format!("/v1/customers/{name}"), Some(&body)).await.map(drop)
    }

    /// Adds or replaces a function of the default host layout (`label`: `<8hex>-<8hex>-<10hex>`).
    pub async fn put_function(&self, name: &str, label: &str, customer: &str, host: &str) -> Result<()> {
        let body = json!({ "match": function_match(label)?, "customer": customer, "host": host });
        self.expect("PUT", &format!("/v1/functions/{name}"), Some(&body)).await.map(drop)
    }

    pub async fn delete_customer(&self, name: &str) -> Result<Value> {
        self.expect("DELETE", &format!("/v1/customers/{name}"), None).await
    }
}

/// The xDS and route ports' mutual TLS: the serverless PKI's control-plane certificates.
pub fn xds_tls(run_dir: &Path) -> Vec<String> {
    let xds = run_dir.join("serverless/certs");
    let mut args = Vec::new();
    for (flag, file) in [
        ("--tls-cert", "control-server/tls.crt"),
        ("--tls-key", "control-server/tls.key"),
        ("--tls-client-ca", "control-ca/ca.crt"),
    ] {
        args.push(flag.to_string());
        args.push(xds.join(file).display().to_string());
    }
    args
}

/// The `match` of a default-layout label.
pub fn function_match(label: &str) -> Result<Value> {
    let parts: Vec<&str> = label.split('-').collect();
    let [project, environment, function] = parts.as_slice() else { bail!("{label:?} is not <8hex>-<8hex>-<10hex>") };
    Ok(json!({ "project": project, "environment": environment, "function": function }))
}

impl std::ops::Deref for ControlService {
    type Target = Service;
    fn deref(&self) -> &Service {
        &self.0
    }
}

impl std::ops::DerefMut for ControlService {
    fn deref_mut(&mut self) -> &mut Service {
        &mut self.0
    }
}
