//! The limits file: per feature, how many requests each organization may make per period,
//! counted across every gateway of the fleet. The vocabulary is the cloud-connector filter's
//! (`requests` per `second`/`minute`/`hour`), read by the same JSON reader, so a bad file is
//! refused with the field named.

use std::collections::BTreeMap;

use edgewise_core::cloud_connector::config::Period;
use edgewise_core::generic::json::{self, FromJson};

/// The RLS domain of the shipped gateway (`domain` of Envoy's ratelimit filter).
pub const DEFAULT_DOMAIN: &str = "cloud-connector";

#[derive(Debug, FromJson)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The domain Envoy's ratelimit filter sends; requests for another domain are not limited.
    #[serde(default = "default_domain")]
    pub domain: String,
    /// Feature (the descriptor's `feature`) -> the limit of each organization (its
    /// `organization`). A feature not listed is not limited here.
    pub limits: BTreeMap<String, Limit>,
}

#[derive(Debug, Clone, Copy, FromJson)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Requests per window of `per`; a window starts with an organization's first request.
    pub requests: u64,
    pub per: Period,
}

fn default_domain() -> String {
    DEFAULT_DOMAIN.into()
}

impl Limit {
    pub fn seconds(&self) -> u64 {
        match self.per {
            Period::Second => 1,
            Period::Minute => 60,
            Period::Hour => 3600,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid limits file: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Reads and checks the file's contents.
    pub fn parse(doc: &[u8]) -> Result<Config, ConfigError> {
        let config: Config = json::parse(doc).map_err(|e| ConfigError(e.to_string()))?;
        if config.domain.is_empty() {
            return Err(ConfigError("`domain` must not be empty".into()));
        }
        for (feature, limit) in &config.limits {
            // Features are metric labels and CEL string literals: keep them to a plain alphabet.
            if feature.is_empty() || !feature.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                return Err(ConfigError(format!("`limits.{feature}`: a feature is letters, digits, `_` and `-`")));
            }
            // The RLS response carries the limit as a u32.
            if limit.requests == 0 || limit.requests > u64::from(u32::MAX) {
                return Err(ConfigError(format!("`limits.{feature}.requests` must be between 1 and {}", u32::MAX)));
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_shipped_vocabulary_and_names_the_bad_field() {
        let c = Config::parse(br#"{"limits":{"duo_chat":{"requests":60,"per":"minute"}}}"#).unwrap();
        assert_eq!(c.domain, DEFAULT_DOMAIN);
        assert_eq!((c.limits["duo_chat"].requests, c.limits["duo_chat"].seconds()), (60, 60));
        for (doc, message) in [
            (r#"{}"#, "invalid limits file: `limits` is required"),
            (
                r#"{"limits":{"a":{"requests":1,"per":"day"}}}"#,
                "invalid limits file: `limits.a.per` must be second, minute or hour",
            ),
            (
                r#"{"limits":{"a":{"requests":1,"per":"hour","burst":2}}}"#,
                "invalid limits file: unknown field `burst` in `limits.a`, expected one of `requests`, `per`",
            ),
            (
                r#"{"limits":{"a":{"requests":0,"per":"hour"}}}"#,
                "invalid limits file: `limits.a.requests` must be between 1 and 4294967295",
            ),
            (
                r#"{"limits":{"a b":{"requests":1,"per":"hour"}}}"#,
                "invalid limits file: `limits.a b`: a feature is letters, digits, `_` and `-`",
            ),
            (r#"{"domain":"","limits":{}}"#, "invalid limits file: `domain` must not be empty"),
        ] {
            assert_eq!(Config::parse(doc.as_bytes()).unwrap_err().to_string(), message, "{doc}");
        }
    }
}
