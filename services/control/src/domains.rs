//! Custom domains: a customer's own name routed to one of its functions, with a certificate
//! obtained by ACME (`acme`). What the API takes, the checks it passes, and what is kept of each
//! domain: its function, its certificate and where obtaining one stands.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::model::Invalid;

/// `PUT /v1/domains/<domain>`'s body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainRequest {
    /// The function the domain routes to.
    pub function: String,
}

/// A certificate obtained for a domain: PEM chain and key, and its validity (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub chain: String,
    pub key: String,
    pub not_before: i64,
    pub not_after: i64,
}

/// A domain as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Domain {
    pub function: String,
    /// The certificate being served, if one was obtained; kept while a renewal fails, until
    /// it expires.
    #[serde(default)]
    pub certificate: Option<Certificate>,
    /// The last attempt's error (an ACME problem, or why the CA could not be reached), cleared
    /// by a success.
    #[serde(default)]
    pub error: Option<String>,
    /// Attempts failed in a row: the back-off doubles with each.
    #[serde(default)]
    pub failures: u32,
    /// No attempt before this (Unix milliseconds).
    #[serde(default)]
    pub next_attempt_ms: u64,
}

/// Where a domain stands, as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No certificate yet; validation and issuance under way (or waiting to retry).
    Pending,
    /// Served with a valid certificate.
    Issued,
    /// A certificate is served and its renewal is under way (or failed and waits to retry).
    Renewing,
    /// No valid certificate, and the last attempt failed: `error` says why.
    Failed,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Issued => "issued",
            Status::Renewing => "renewing",
            Status::Failed => "failed",
        }
    }
}

impl Domain {
    pub fn new(function: &str) -> Domain {
        Domain { function: function.into(), certificate: None, error: None, failures: 0, next_attempt_ms: 0 }
    }

    /// The certificate still valid at `now` (Unix seconds).
    pub fn valid_certificate(&self, now: i64) -> Option<&Certificate> {
        self.certificate.as_ref().filter(|c| c.not_before <= now + 300 && now < c.not_after)
    }

    /// When a new certificate is due: none yet, or the last third of its lifetime (30 days of
    /// 90 for Let's Encrypt) has begun.
    pub fn renewal_due(&self, now: i64) -> bool {
        match self.valid_certificate(now) {
            None => true,
            Some(c) => now >= c.not_after - (c.not_after - c.not_before) / 3,
        }
    }

    pub fn status(&self, now: i64) -> Status {
        match (self.valid_certificate(now), self.renewal_due(now), &self.error) {
            (Some(_), false, _) => Status::Issued,
            (Some(_), true, _) => Status::Renewing,
            (None, _, Some(_)) => Status::Failed,
            (None, _, None) => Status::Pending,
        }
    }

    /// The API's view (`routed`: whether its route is in the table): never the private key.
    pub fn view(&self, name: &str, now: i64, routed: bool) -> serde_json::Value {
        let certificate = self.valid_certificate(now).map(|c| {
            serde_json::json!({ "not_before": c.not_before, "not_after": c.not_after, "expires_in_s": c.not_after - now })
        });
        serde_json::json!({
            "domain": name,
            "function": self.function,
            "routed": routed,
            "status": self.status(now).name(),
            "certificate": certificate,
            "error": self.error,
            "failures": self.failures,
            "next_attempt_ms": (self.status(now) != Status::Issued).then_some(self.next_attempt_ms),
        })
    }
}

/// The custom domains by name, and the names of each function's: a change to a function finds
/// its domains without a scan of them all.
#[derive(Default)]
pub struct Domains {
    by_name: BTreeMap<String, Domain>,
    by_function: HashMap<String, BTreeSet<String>>,
}

impl Domains {
    pub fn insert(&mut self, name: String, domain: Domain) {
        self.unindex(&name);
        self.by_function.entry(domain.function.clone()).or_default().insert(name.clone());
        self.by_name.insert(name, domain);
    }

    pub fn remove(&mut self, name: &str) -> Option<Domain> {
        self.unindex(name);
        self.by_name.remove(name)
    }

    fn unindex(&mut self, name: &str) {
        let Some(old) = self.by_name.get(name) else {
            return;
        };
        if let Some(names) = self.by_function.get_mut(&old.function) {
            names.remove(name);
            if names.is_empty() {
                self.by_function.remove(&old.function);
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&Domain> {
        self.by_name.get(name)
    }

    pub fn get_key_value(&self, name: &str) -> Option<(&String, &Domain)> {
        self.by_name.get_key_value(name)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Domain)> {
        self.by_name.iter()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.by_name.keys()
    }

    /// The domains of `function`.
    pub fn of_function(&self, function: &str) -> impl Iterator<Item = &String> {
        self.by_function.get(function).into_iter().flatten()
    }
}

impl FromIterator<(String, Domain)> for Domains {
    fn from_iter<I: IntoIterator<Item = (String, Domain)>>(iter: I) -> Domains {
        let mut domains = Domains::default();
        for (name, domain) in iter {
            domains.insert(name, domain);
        }
        domains
    }
}

fn invalid(reason: impl Into<String>) -> Invalid {
    Invalid { field: "domain".into(), reason: reason.into() }
}

/// A custom domain, lowercased: a DNS name of at least two labels, ASCII (an internationalized
/// name in its `xn--` form), not an IP address, not a wildcard, not the platform's own domain or
/// a name under it.
pub fn check_domain(domain: &str, platform: &str) -> Result<String, Invalid> {
    let name = domain.strip_suffix('.').unwrap_or(domain).to_ascii_lowercase();
    if name.starts_with("*.") || name.contains('*') {
        return Err(invalid(format!("{domain:?} is a wildcard: a custom domain is one name")));
    }
    if !name.is_ascii() {
        return Err(invalid(format!("{domain:?} is not ASCII: give an internationalized name in its xn-- form")));
    }
    if name.parse::<std::net::IpAddr>().is_ok() || name.trim_matches(['[', ']']).parse::<std::net::Ipv6Addr>().is_ok() {
        return Err(invalid(format!("{domain:?} is an IP address: certificates are issued to DNS names")));
    }
    let labels: Vec<&str> = name.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.len() > 253 || labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err(invalid(format!("{domain:?} is not a DNS name of two labels or more (such as app.example.com)")));
    }
    if labels.last().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
        return Err(invalid(format!("{domain:?} has a numeric top-level label")));
    }
    let platform = platform.strip_suffix('.').unwrap_or(platform).to_ascii_lowercase();
    if name == platform || name.ends_with(&format!(".{platform}")) {
        return Err(invalid(format!(
            "{domain:?} is under the platform's domain {platform}: its names are the platform's"
        )));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_functions_domains_follow_moves_and_removals() {
        let domain = |function: &str| Domain {
            function: function.into(),
            certificate: None,
            error: None,
            failures: 0,
            next_attempt_ms: 0,
        };
        let of = |d: &Domains, f: &str| d.of_function(f).cloned().collect::<Vec<_>>();
        let mut d: Domains = [("a.example".to_string(), domain("hello")), ("b.example".to_string(), domain("hello"))]
            .into_iter()
            .collect();
        assert_eq!(of(&d, "hello"), ["a.example", "b.example"]);
        d.insert("a.example".into(), domain("other"));
        assert_eq!((of(&d, "hello"), of(&d, "other")), (vec!["b.example".to_string()], vec!["a.example".to_string()]));
        assert!(d.remove("b.example").is_some());
        assert!(of(&d, "hello").is_empty() && d.by_function.len() == 1 && d.len() == 1);
        assert!(d.remove("b.example").is_none());
    }

    #[test]
    fn domains_are_one_dns_name_outside_the_platform() {
        assert_eq!(check_domain("App.Example.COM.", "serverless.gitlab.io").unwrap(), "app.example.com");
        assert_eq!(check_domain("xn--bcher-kva.example", "serverless.gitlab.io").unwrap(), "xn--bcher-kva.example");
        for (bad, why) in [
            ("*.example.com", "wildcard"),
            ("a.*.example.com", "wildcard"),
            ("127.0.0.1", "IP address"),
            ("::1", "IP address"),
            ("[::1]", "IP address"),
            ("10.0.0.300", "numeric"),
            ("bücher.example", "xn--"),
            ("localhost", "two labels"),
            ("a..b", "two labels"),
            ("-a.example", "two labels"),
            ("a_b.example", "two labels"),
            ("a b.example", "two labels"),
            ("", "two labels"),
            ("0000000a-0000000b-000000000c.serverless.gitlab.io", "platform's domain"),
            ("serverless.gitlab.io", "platform's domain"),
        ] {
            let e = check_domain(bad, "serverless.gitlab.io").unwrap_err();
            assert_eq!(e.field, "domain");
            assert!(e.reason.contains(why), "{bad}: {}", e.reason);
        }
        assert!(check_domain(&format!("{}.example", "a".repeat(250)), "x.io").is_err());
    }

    #[test]
    fn status_follows_the_certificate_and_the_last_error() {
        let mut d = Domain::new("hello");
        assert_eq!(d.status(1000), Status::Pending);
        d.error = Some("urn:ietf:params:acme:error:connection".into());
        assert_eq!(d.status(1000), Status::Failed);
        d.certificate = Some(Certificate { chain: "c".into(), key: "k".into(), not_before: 900, not_after: 1200 });
        assert_eq!((d.status(1000), d.renewal_due(1000)), (Status::Issued, false));
        assert_eq!(d.status(1100), Status::Renewing, "the last third of its lifetime");
        assert_eq!(d.status(1200), Status::Failed, "expired, with the last error");
        let view = d.view("a.example", 1000, true).to_string();
        assert!(!view.contains("\"k\"") && view.contains("\"issued\""), "{view}");
    }
}
