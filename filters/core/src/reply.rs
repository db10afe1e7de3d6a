//! Local replies: the JSON error bodies the filters send instead of forwarding a request.

/// A response a filter sends itself. `error` is a stable machine-readable code, `detail` says what
/// happened in words a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub error: &'static str,
    pub detail: String,
}

impl Reply {
    pub fn new(status: u32, error: &'static str, detail: impl Into<String>) -> Self {
        Reply { status, error, detail: detail.into() }
    }

    /// `{"error":"...","detail":"..."}`, escaped properly whatever the detail contains.
    pub fn body(&self) -> Vec<u8> {
        let mut body = String::with_capacity(24 + self.error.len() + self.detail.len());
        body.push_str("{\"error\":");
        crate::json::quote(self.error, &mut body);
        body.push_str(",\"detail\":");
        crate::json::quote(&self.detail, &mut body);
        body.push('}');
        body.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_escaped_json() {
        let r = Reply::new(404, "unknown_function", "no function for host \"x\\y\"\n");
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["error"], "unknown_function");
        assert_eq!(v["detail"], "no function for host \"x\\y\"\n");
        assert!(v.get("status").is_none());
    }
}
