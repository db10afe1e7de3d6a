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

impl ConfigError {
    pub fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Field { field: field.into(), reason: reason.into() }
    }
}
