//! envoy/serverless.yaml: the public front certificate, the platform's client certificate, one CA
//! per customer cluster and that cluster's gateway stand-in (mTLS, reporting the client SAN).

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::certs::{self, Ca, Leaf, LeafSpec};
use crate::server::{Listen, Server};
use crate::tls;

pub const DOMAIN: &str = "serverless.gitlab.io";
/// The function routed by the inline table of the shipped YAML.
pub const INLINE_HOST: &str = "0000000a-0000000b-000000000c.serverless.gitlab.io";
pub const INLINE_KNATIVE_HOST: &str = "hello.ns-42.knative.customer-a.example";
pub const PLATFORM_CLIENT_ID: &str = "spiffe://platform.example/serverless-proxy";
/// The name edgewise-control's xDS certificate carries, and Envoy expects (serverless-xds.yaml).
pub const CONTROL_NAME: &str = "control.platform.example";

/// Fixed ports of the shipped YAML.
pub mod ports {
    pub const FRONT: u16 = 10443;
    pub const CUSTOMER_A: u16 = 19001;
    pub const CUSTOMER_B: u16 = 19002;
    pub const WWW: u16 = 19003;
    pub const MANAGEMENT: u16 = 19100;
}

pub struct Pki {
    pub dir: PathBuf,
    pub front_ca: Ca,
    pub platform_ca: Ca,
    pub customer_a_ca: Ca,
    pub customer_b_ca: Ca,
    /// The control plane's CA: edgewise-control's xDS certificate, and Envoy's client
    /// certificate for it.
    pub control_ca: Ca,
}

impl Pki {
    /// Generates every certificate and writes certificates and SDS files under `run_dir`.
    pub fn install(run_dir: &Path) -> Result<Pki> {
        let dir = run_dir.join("serverless");
        let pki = Pki {
            dir: dir.clone(),
            front_ca: Ca::new("edgewise front CA")?,
            platform_ca: Ca::new("platform client CA")?,
            customer_a_ca: Ca::new("customer-a cluster CA")?,
            customer_b_ca: Ca::new("customer-b cluster CA")?,
            control_ca: Ca::new("platform control plane CA")?,
        };
        pki.rotate_front(&pki.front_ca.issue(&LeafSpec::server(&[&format!("*.{DOMAIN}"), "www.example.com"]))?)?;
        pki.rotate_platform_client(&pki.platform_client(PLATFORM_CLIENT_ID)?)?;
        certs::write_pem(&dir, "front-ca.pem", &pki.front_ca.pem)?;
        certs::write_bundle(&dir.join("certs/customer-a-ca"), &[&pki.customer_a_ca])?;
        certs::write_bundle(&dir.join("certs/customer-b-ca"), &[&pki.customer_b_ca])?;
        certs::write_bundle(&dir.join("certs/control-ca"), &[&pki.control_ca])?;
        certs::write_leaf(
            &dir.join("certs/control-server"),
            &pki.control_ca.issue(&LeafSpec::server(&[CONTROL_NAME]))?,
        )?;
        let envoy_id = "spiffe://platform.example/serverless-ingress";
        certs::write_leaf(
            &dir.join("certs/control-client"),
            &pki.control_ca.issue(&LeafSpec::client("serverless-ingress", &[envoy_id]))?,
        )?;
        super::install_sds("serverless", run_dir)?;
        Ok(pki)
    }

    pub fn platform_client(&self, spiffe_id: &str) -> Result<Leaf> {
        self.platform_ca.issue(&LeafSpec::client("serverless-proxy", &[spiffe_id]))
    }

    pub fn rotate_front(&self, leaf: &Leaf) -> Result<()> {
        certs::write_leaf(&self.dir.join("certs/front"), leaf)
    }

    pub fn rotate_platform_client(&self, leaf: &Leaf) -> Result<()> {
        certs::write_leaf(&self.dir.join("certs/platform-client"), leaf)
    }

    /// Replaces a customer's CA bundle (e.g. old + new CA while rotating).
    pub fn set_customer_bundle(&self, customer: &str, cas: &[&Ca]) -> Result<()> {
        certs::write_bundle(&self.dir.join(format!("certs/{customer}-ca")), cas)
    }

    /// A client trusting the front CA; `h2` offers HTTP/2 by ALPN.
    pub fn front_client(&self, h2: bool) -> Result<crate::client::Client> {
        let alpn: &[&str] = if h2 { &["h2"] } else { &["http/1.1"] };
        Ok(crate::client::Client::tls(tls::client(&[&self.front_ca.pem], None, alpn)?))
    }
}

/// A customer cluster's ingress gateway: TLS with `leaf`, requiring a client certificate from the
/// platform CA, answering as an echo server. Connections close after each response, so every
/// request shows the client certificate Envoy presents at that moment.
pub async fn gateway(name: &str, port: u16, leaf: &Leaf, platform_ca: &Ca) -> Result<Server> {
    let config = tls::server(leaf, &[&platform_ca.pem], &["http/1.1"])?;
    Server::echo(name, Listen { port, tls: Some(config), close_each: true, ..Listen::default() }).await
}

/// The gateway certificate a customer cluster's CA issues.
pub fn gateway_leaf(ca: &Ca, customer: &str) -> Result<Leaf> {
    ca.issue(&LeafSpec::server(&[&format!("ingress.{customer}.example")]).dns(&format!("*.knative.{customer}.example")))
}

/// A management-service route document.
pub fn table(version: u64, routes: &[(&str, &str, &str)]) -> String {
    let routes: Vec<serde_json::Value> = routes
        .iter()
        .map(|(label, cluster, host)| {
            let parts: Vec<&str> = label.split('-').collect();
            serde_json::json!({
                "match": { "project": parts[0], "environment": parts[1], "function": parts[2] },
                "cluster": cluster, "host": host,
            })
        })
        .collect();
    serde_json::json!({ "version": version, "routes": routes }).to_string()
}
