//! Customers and functions as the REST API takes them, and the checks they pass before anything
//! is stored: a customer that would make Envoy refuse a cluster, or a function the filter would
//! refuse in its route table, never gets in.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use edgewise_core::generic::json::Field;
use edgewise_core::serverless::{record_of, HostDecoder, RouteSpec};
pub use edgewise_core::serverless::{DEFAULT_DOMAIN, DEFAULT_PATTERN};
use serde::{Deserialize, Serialize};

/// A customer's Kubernetes cluster: its ingress gateway, reached over mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Customer {
    /// `host:port` of the cluster's ingress gateway (an IP address or a DNS name).
    pub address: String,
    /// PEM: the CA certificate(s) the gateway's certificate must chain to (old and new while
    /// rotating).
    pub ca: String,
    /// The DNS SAN the gateway's certificate must carry.
    pub san: String,
}

/// A function: the values of the host pattern's named groups, and where it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Function {
    #[serde(rename = "match")]
    pub matches: BTreeMap<String, String>,
    /// The customer whose cluster runs it.
    pub customer: String,
    /// The Host its Knative service answers to.
    pub host: String,
}

/// Why an API call failed.
#[derive(Debug)]
pub enum ApiError {
    Invalid(Invalid),
    NotFound(String),
    Conflict(String),
    Internal(String),
    /// The shared store cannot be reached: nothing was changed.
    Unavailable(String),
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::Invalid(e)
    }
}

/// A rejected input: the field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` {}", self.field, self.reason)
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> Invalid {
    Invalid { field: field.into(), reason: reason.into() }
}

/// Largest CA bundle accepted.
const MAX_CA_BYTES: usize = 64 * 1024;

/// A name in a URL path (customer or function): a DNS label, so that it is also a valid Envoy
/// cluster name and secret name.
pub fn check_name(field: &str, name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(field, format!("{name:?} must be 1-63 of a-z, 0-9 and '-', not starting or ending with '-'")))
    }
}

/// Where a gateway is: an IP address (a static endpoint) or a DNS name (resolved by Envoy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub host: String,
    pub port: u16,
    pub ip: bool,
}

pub fn parse_address(address: &str) -> Result<Address, Invalid> {
    let bad = |why: &str| invalid("address", format!("{address:?} {why}"));
    let (host, port) = address.rsplit_once(':').ok_or_else(|| bad("must be host:port"))?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(|| bad("has no valid port"))?;
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let ip: IpAddr = v6.parse().map_err(|_| bad("has an invalid IPv6 address"))?;
        return Ok(Address { host: ip.to_string(), port, ip: true });
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Address { host: ip.to_string(), port, ip: true });
    }
    if !is_dns_name(host, false) {
        return Err(bad("has neither an IP address nor a DNS name"));
    }
    Ok(Address { host: host.to_ascii_lowercase(), port, ip: false })
}

fn is_dns_name(name: &str, wildcard: bool) -> bool {
    let name = if wildcard { name.strip_prefix("*.").unwrap_or(name) } else { name };
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The X.509 certificates of a PEM bundle; anything else in it (a private key above all) is
/// refused.
pub fn check_ca(pem: &str) -> Result<usize, Invalid> {
    if pem.len() > MAX_CA_BYTES {
        return Err(invalid("ca", format!("is larger than {MAX_CA_BYTES} bytes")));
    }
    let mut count = 0;
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| invalid("ca", format!("is not PEM: {e}")))?;
        if block.label != "CERTIFICATE" {
            return Err(invalid("ca", format!("may hold only CERTIFICATE blocks, not {:?}", block.label)));
        }
        block.parse_x509().map_err(|e| invalid("ca", format!("certificate {} does not parse: {e}", count + 1)))?;
        count += 1;
    }
    if count == 0 {
        return Err(invalid("ca", "holds no PEM certificate"));
    }
    Ok(count)
}

impl Customer {
    pub fn check(&self) -> Result<Address, Invalid> {
        let address = parse_address(&self.address)?;
        check_ca(&self.ca)?;
        if !is_dns_name(&self.san, true) {
            return Err(invalid("san", format!("{:?} is not a DNS name", self.san)));
        }
        Ok(address)
    }
}

/// Checks functions the way the filter compiles its route table: the same host pattern, the
/// same key, the same Host check.
pub struct FunctionRules {
    decoder: Arc<HostDecoder>,
    domain: String,
}

impl FunctionRules {
    pub fn new(domain: &str, pattern: &str) -> Result<Self, String> {
        let decoder = HostDecoder::new(domain, pattern).map_err(|e| e.to_string())?;
        Ok(FunctionRules { decoder: Arc::new(decoder), domain: domain.to_ascii_lowercase() })
    }

    /// The filter's host decoder, whose route keys order the table's pages.
    pub fn decoder(&self) -> Arc<HostDecoder> {
        self.decoder.clone()
    }

    /// The platform's serverless domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn groups(&self) -> &[String] {
        self.decoder.groups()
    }

    /// The function's route key (unique among functions): its group values, lowercased.
    pub fn key(&self, function: &Function) -> Result<String, Invalid> {
        check_name("customer", &function.customer)?;
        for (group, value) in &function.matches {
            let label_chars = value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if value.is_empty() || value.len() > 63 || !label_chars {
                return Err(invalid(&format!("match.{group}"), format!("{value:?} is not part of a DNS label")));
            }
        }
        let spec = RouteSpec {
            domain: None,
            matches: function.matches.clone(),
            cluster: function.customer.clone(),
            host: function.host.clone(),
        };
        let at = Field::Root.key("function");
        record_of(&self.decoder, &spec, &at.index(0)).map_err(|e| {
            // "`function[0].match` must name ..." -> field `match`, the reason.
            let text = e.to_string();
            let field = ["match", "host", "cluster"].into_iter().find(|f| text.contains(&format!("[0].{f}")));
            let reason = text.split_once("` ").map_or(text.as_str(), |(_, r)| r).to_string();
            invalid(field.unwrap_or("function"), reason)
        })?;
        let groups = self.decoder.groups().iter();
        let values: Vec<String> =
            groups.map(|g| function.matches.get(g).map(|v| v.to_ascii_lowercase()).unwrap_or_default()).collect();
        Ok(values.join("/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBPzCB5qADAgECAhQ2\n-----END CERTIFICATE-----\n";

    #[test]
    fn names_are_dns_labels() {
        for good in ["a", "customer-a", "0", &"x".repeat(63)] {
            assert!(check_name("name", good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a/b", "ä", &"x".repeat(64)] {
            assert_eq!(check_name("name", bad).unwrap_err().field, "name", "{bad}");
        }
    }

    #[test]
    fn addresses_are_ip_or_dns_with_a_port() {
        assert_eq!(
            parse_address("127.0.0.1:19001").unwrap(),
            Address { host: "127.0.0.1".into(), port: 19001, ip: true }
        );
        assert_eq!(parse_address("[::1]:443").unwrap(), Address { host: "::1".into(), port: 443, ip: true });
        assert_eq!(
            parse_address("Ingress.Customer-A.example:443").unwrap(),
            Address { host: "ingress.customer-a.example".into(), port: 443, ip: false }
        );
        for bad in ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "a b:1", ":443", "[zz]:1", "a..b:1", "-a:1"] {
            assert_eq!(parse_address(bad).unwrap_err().field, "address", "{bad}");
        }
    }

    #[test]
    fn a_ca_bundle_holds_certificates_only() {
        assert!(check_ca("").unwrap_err().reason.contains("no PEM certificate"));
        let key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(check_ca(key).unwrap_err().reason.contains("only CERTIFICATE"));
        assert!(check_ca(CA).unwrap_err().reason.contains("does not parse"));
        assert!(check_ca(&"x".repeat(MAX_CA_BYTES + 1)).unwrap_err().reason.contains("larger"));
    }

    /// Hostile input: random bytes (as lossy strings, as the API would read them after JSON) and
    /// mutations of valid values never panic, and whatever is accepted is what a check promises.
    #[test]
    fn random_and_mutated_input_is_refused_or_accepted_within_the_rules() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let seeds = ["127.0.0.1:19001", "[::1]:443", "ingress.customer-a.example:443", "customer-a", CA];
        for _ in 0..20_000 {
            let base = seeds[(next() % seeds.len() as u64) as usize].as_bytes().to_vec();
            let mut bytes = base.clone();
            for _ in 0..(next() % 4) {
                let at = (next() as usize) % (bytes.len() + 1);
                let byte = (next() % 256) as u8;
                match next() % 3 {
                    0 => bytes.insert(at, byte),
                    1 if at < bytes.len() => bytes[at] = byte,
                    _ if at < bytes.len() => drop(bytes.remove(at)),
                    _ => {}
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(a) = parse_address(&text) {
                assert!(a.port > 0 && !a.host.is_empty() && a.host.is_ascii(), "{text:?} -> {a:?}");
                let again = if a.host.contains(':') {
                    format!("[{}]:{}", a.host, a.port)
                } else {
                    format!("{}:{}", a.host, a.port)
                };
                assert_eq!(parse_address(&again).as_ref(), Ok(&a), "{text:?}");
            }
            if check_name("name", &text).is_ok() {
                assert!(
                    text.len() <= 63 && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                );
            }
            let _ = check_ca(&text).map(|n| assert!(n >= 1));
        }
    }

    #[test]
    fn functions_are_checked_as_the_filter_compiles_them() {
        let rules = FunctionRules::new("serverless.gitlab.io", edgewise_core::serverless::DEFAULT_PATTERN).unwrap();
        let matches = |p: &str, e: &str, f: &str| {
            BTreeMap::from([
                ("project".into(), p.into()),
                ("environment".into(), e.into()),
                ("function".into(), f.into()),
            ])
        };
        let f = Function {
            matches: matches("0000000A", "0000000b", "000000000c"),
            customer: "customer-a".into(),
            host: "hello.ns.knative.example".into(),
        };
        assert_eq!(rules.key(&f).unwrap(), "0000000a/0000000b/000000000c");
        let missing = Function { matches: BTreeMap::from([("project".into(), "1".into())]), ..f.clone() };
        assert_eq!(rules.key(&missing).unwrap_err().field, "match");
        let host = Function { host: "a/b".into(), ..f.clone() };
        assert_eq!(rules.key(&host).unwrap_err().field, "host");
        let value = Function { matches: matches("a.b", "0000000b", "000000000c"), ..f.clone() };
        assert_eq!(rules.key(&value).unwrap_err().field, "match.project");
        let customer = Function { customer: "Customer A".into(), ..f };
        assert_eq!(rules.key(&customer).unwrap_err().field, "customer");
    }
}
