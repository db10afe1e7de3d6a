//! rustls configurations for the stand-ins (servers, optionally requiring client certificates)
//! and for the test client.

use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::certs::Leaf;

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().context("parsing certificate PEM")
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).context("parsing key PEM")
}

fn roots(ca_pems: &[&str]) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for pem in ca_pems {
        for cert in certs(pem)? {
            roots.add(cert)?;
        }
    }
    Ok(roots)
}

/// A server presenting `leaf`. With `client_cas`, a client certificate from one of them is required.
pub fn server(leaf: &Leaf, client_cas: &[&str], alpn: &[&str]) -> Result<Arc<ServerConfig>> {
    crate::init_crypto();
    let builder = ServerConfig::builder();
    let builder = if client_cas.is_empty() {
        builder.with_no_client_auth()
    } else {
        let verifier =
            WebPkiClientVerifier::builder(Arc::new(roots(client_cas)?)).build().map_err(|e| anyhow!("{e}"))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut config = builder.with_single_cert(certs(&leaf.cert_pem)?, key(&leaf.key_pem)?)?;
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client trusting `ca_pems`, optionally presenting a client certificate.
pub fn client(ca_pems: &[&str], client_leaf: Option<&Leaf>, alpn: &[&str]) -> Result<Arc<ClientConfig>> {
    crate::init_crypto();
    let builder = ClientConfig::builder().with_root_certificates(roots(ca_pems)?);
    let mut config = match client_leaf {
        Some(leaf) => builder.with_client_auth_cert(certs(&leaf.cert_pem)?, key(&leaf.key_pem)?)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// The subject alternative names of a DER certificate, as `DNS:name`, `URI:uri`, `IP:addr`.
pub fn sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return vec!["<unparsable certificate>".into()];
    };
    let Ok(Some(ext)) = cert.subject_alternative_name() else {
        return vec![];
    };
    ext.value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => format!("DNS:{d}"),
            x509_parser::extensions::GeneralName::URI(u) => format!("URI:{u}"),
            x509_parser::extensions::GeneralName::IPAddress(ip) => format!("IP:{ip:?}"),
            other => format!("{other:?}"),
        })
        .collect()
}
