//! Plugin configuration errors shared by every filter.

/// Why a plugin configuration was refused. The message always names the offending field, so the
/// log line Envoy prints when it refuses to start says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not valid JSON, or not the expected document (an unknown field, say).
    #[error("invalid plugin configuration: {0}")]
    Json(String),
    #[error("invalid plugin configuration: `{field}` {reason}")]
    Field { field: String, reason: String },
    #[error("invalid plugin configuration: the filter needs a JSON configuration")]
    Missing,
}

// A message, not the error itself: a filter that does not read JSON with serde_json then links
// none of serde_json's error formatting.
impl From<serde_json::Error> for ConfigError {
    fn from(e: serde_json::Error) -> Self {
        ConfigError::Json(e.to_string())
    }
}

/// Reads a configuration type with serde_json, in a function of its own: V8 compiles every
/// function of a module with TurboFan when Envoy loads it, and one large function costs more
/// Envoy memory than the same code in several (measured: a 9 KB configuration reader inlined
/// into its caller cost 5 MiB RSS more than the same code split in three).
#[inline(never)]
pub fn from_json<T: serde::de::DeserializeOwned>(json: &[u8]) -> Result<T, ConfigError> {
    Ok(serde_json::from_slice(json)?)
}

impl ConfigError {
    pub fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Field { field: field.into(), reason: reason.into() }
    }
}
