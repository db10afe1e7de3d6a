//! envoy/mesh-gateway.yaml and envoy/mesh-sidecar.yaml: two CAs (gateway and mesh), SPIFFE
//! identities, the SDS secret directories both Envoys watch, and the identity provider whose
//! keys replace the placeholder JWKS in the gateway's plugin configuration.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::certs::{self, Ca, Leaf, LeafSpec};
use crate::envoy::Config;
use crate::idp::Idp;

pub const GATEWAY_ID: &str = "spiffe://gateway.example/ns/edge/sa/gateway";
pub const WORKLOAD_ID: &str = "spiffe://cluster.local/ns/shop/sa/catalog";
pub const ISSUER: &str = "https://idp.example";
pub const SIDECAR_DNS: &str = "catalog.shop.svc.cluster.local";
pub const AUDIENCE: &str = "shop";

/// The JWK in the shipped gateway YAML that deployments (and the demo and tests) replace.
pub const PLACEHOLDER_JWK: &str = r#"{"kty": "EC", "crv": "P-256", "kid": "placeholder", "x": "Dn6N7Ab9tu-Y6os971IBE1e3cBj-uWvNmryK_aRSCOk", "y": "QCU2r5yCAaYqu_C6aY4KxMOSXrc1IM29SBXka4L29bI"}"#;

/// Fixed ports of the shipped YAML.
pub mod ports {
    pub const GATEWAY: u16 = 18080;
    pub const SIDECAR: u16 = 15006;
    pub const WORKLOAD: u16 = 19201;
    pub const NON_MESHED: u16 = 19202;
}

pub struct Pki {
    pub dir: PathBuf,
    pub gateway_ca: Ca,
    pub mesh_ca: Ca,
    pub idp: Idp,
}

impl Pki {
    pub fn install(run_dir: &Path) -> Result<Pki> {
        let dir = run_dir.join("mesh");
        let pki = Pki {
            dir: dir.clone(),
            gateway_ca: Ca::new("gateway.example CA")?,
            mesh_ca: Ca::new("cluster.local mesh CA")?,
            idp: Idp::new(ISSUER, "idp-key-1")?,
        };
        pki.set_gateway_cert(&pki.gateway_leaf(&pki.gateway_ca, GATEWAY_ID)?)?;
        certs::write_leaf(&dir.join("certs/sidecar-cert"), &pki.mesh_leaf(WORKLOAD_ID)?)?;
        pki.set_gateway_trust(&[&pki.mesh_ca])?;
        pki.set_sidecar_trust(&[&pki.gateway_ca], &[&pki.mesh_ca])?;
        super::install_sds("mesh", run_dir)?;
        Ok(pki)
    }

    pub fn gateway_leaf(&self, ca: &Ca, spiffe_id: &str) -> Result<Leaf> {
        ca.issue(&LeafSpec::client("gateway", &[spiffe_id]))
    }

    /// A mesh workload certificate (with a DNS name too, for test clients that check one).
    pub fn mesh_leaf(&self, spiffe_id: &str) -> Result<Leaf> {
        self.mesh_ca.issue(&LeafSpec::client("workload", &[spiffe_id]).dns(SIDECAR_DNS))
    }

    pub fn set_gateway_cert(&self, leaf: &Leaf) -> Result<()> {
        certs::write_leaf(&self.dir.join("certs/gateway-cert"), leaf)
    }

    /// Replaces the sidecar's own certificate (e.g. a fresh `mesh_leaf(WORKLOAD_ID)`).
    pub fn set_sidecar_cert(&self, leaf: &Leaf) -> Result<()> {
        certs::write_leaf(&self.dir.join("certs/sidecar-cert"), leaf)
    }

    /// What the gateway trusts for the mesh trust domain.
    pub fn set_gateway_trust(&self, mesh: &[&Ca]) -> Result<()> {
        let bundle: String = mesh.iter().map(|c| c.pem.as_str()).collect();
        certs::write_secret_dir(&self.dir.join("certs/gateway-trust"), &[("mesh-ca.crt", &bundle)])
    }

    /// What the sidecar trusts: the gateway's trust domain and its own.
    pub fn set_sidecar_trust(&self, gateway: &[&Ca], mesh: &[&Ca]) -> Result<()> {
        let g: String = gateway.iter().map(|c| c.pem.as_str()).collect();
        let m: String = mesh.iter().map(|c| c.pem.as_str()).collect();
        let all = format!("{g}{m}");
        certs::write_secret_dir(
            &self.dir.join("certs/sidecar-trust"),
            &[("gateway-ca.crt", &g), ("mesh-ca.crt", &m), ("all-cas.crt", &all)],
        )
    }

    /// Puts this scenario's identity provider key into the gateway's configuration.
    pub fn gateway_config(&self, config: Config) -> Config {
        config.replace(PLACEHOLDER_JWK, &self.idp.jwk().to_string())
    }

    /// A user token the gateway accepts.
    pub fn user_token(&self, user: &str) -> String {
        let now = crate::idp::now();
        self.idp.token(
            serde_json::json!({ "sub": user, "aud": AUDIENCE, "groups": ["shoppers"], "iat": now, "exp": now + 600 }),
        )
    }
}
