//! Certificates made at run time: CAs, server certificates with DNS SANs (wildcards too) and
//! client certificates with SPIFFE URI SANs. Nothing here is ever committed.
//!
//! Secrets are written the way a Kubernetes Secret volume lays them out (`tls.crt ->
//! ..data/tls.crt`, `..data -> ..<generation>`), so that rotating one is a single atomic rename
//! that Envoy's SDS `watched_directory` picks up.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A certificate authority that can issue leaves.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pub pem: String,
}

/// An issued leaf: PEM certificate and key.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Leaf {
    /// SHA-256 of the certificate's DER, hex: what Envoy puts in XFCC's `Hash=`.
    pub fn sha256_hex(&self) -> String {
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        ring::digest::digest(&ring::digest::SHA256, &der).as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What a leaf is for and who it names.
#[derive(Default, Clone)]
pub struct LeafSpec {
    pub common_name: String,
    pub dns: Vec<String>,
    pub uris: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
}

impl LeafSpec {
    pub fn server(dns: &[&str]) -> Self {
        LeafSpec {
            common_name: dns.first().copied().unwrap_or("server").into(),
            dns: dns.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    pub fn client(common_name: &str, uris: &[&str]) -> Self {
        LeafSpec {
            common_name: common_name.into(),
            uris: uris.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    pub fn dns(mut self, name: &str) -> Self {
        self.dns.push(name.into());
        self
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "edgewise test");
    dn
}

impl Ca {
    pub fn new(common_name: &str) -> Result<Ca> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let pem = cert.pem();
        Ok(Ca { cert, key, pem })
    }

    /// Issues a leaf usable both as a server and as a client certificate.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Leaf> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&spec.common_name);
        for d in &spec.dns {
            params.subject_alt_names.push(SanType::DnsName(d.as_str().try_into().context("DNS SAN")?));
        }
        for u in &spec.uris {
            params.subject_alt_names.push(SanType::URI(u.as_str().try_into().context("URI SAN")?));
        }
        for ip in &spec.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        // Distinct serials, so that a rotated certificate is told apart from the old one.
        static SERIAL: AtomicU64 = AtomicU64::new(1);
        params.serial_number = Some(rcgen::SerialNumber::from(
            SERIAL.fetch_add(1, Ordering::Relaxed) + std::process::id() as u64 * 1_000_000,
        ));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Writes a secret directory (Kubernetes layout), or atomically replaces its contents.
/// `files` are (file name, contents), e.g. ("tls.crt", pem).
pub fn write_secret_dir(dir: &Path, files: &[(&str, &str)]) -> Result<()> {
    static GENERATION: AtomicU64 = AtomicU64::new(1);
    fs::create_dir_all(dir)?;
    let generation = format!("..{}-{}", std::process::id(), GENERATION.fetch_add(1, Ordering::Relaxed));
    let data = dir.join(&generation);
    fs::create_dir_all(&data)?;
    for (file, contents) in files {
        fs::write(data.join(file), contents)?;
        let link = dir.join(file);
        if fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(file), &link)?;
        }
    }
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&generation, &tmp)?;
    let old = fs::read_link(dir.join("..data")).ok();
    fs::rename(&tmp, dir.join("..data")).context("swapping ..data")?;
    if let Some(old) = old {
        let _ = fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

/// Writes a leaf as `tls.crt` / `tls.key` into a secret directory.
pub fn write_leaf(dir: &Path, leaf: &Leaf) -> Result<()> {
    write_secret_dir(dir, &[("tls.crt", &leaf.cert_pem), ("tls.key", &leaf.key_pem)])
}

/// Writes a trust bundle (one or more CA PEMs) as `ca.crt` into a secret directory.
pub fn write_bundle(dir: &Path, cas: &[&Ca]) -> Result<()> {
    let bundle: String = cas.iter().map(|c| c.pem.as_str()).collect();
    write_secret_dir(dir, &[("ca.crt", &bundle)])
}

/// Writes a PEM file, returning its path.
pub fn write_pem(dir: &Path, file: &str, pem: &str) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let path = dir.join(file);
    fs::write(&path, pem)?;
    Ok(path)
}
