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
        crate::generic::json::quote(self.error, &mut body);
        body.push_str(",\"detail\":");
        crate::generic::json::quote(&self.detail, &mut body);
        body.push('}');
        body.into_bytes()
    }
}

/// A header the filter must interpret, as text. A value that is not UTF-8 (obs-text is legal in
/// HTTP/1.1) is refused with a 400 rather than guessed at; headers a filter only passes on are
/// never read this way, so their bytes go through untouched.
pub fn header_text<'a>(name: &str, value: Option<&'a [u8]>) -> Result<Option<&'a str>, Reply> {
    match value.map(std::str::from_utf8) {
        None => Ok(None),
        Some(Ok(text)) => Ok(Some(text)),
        Some(Err(_)) => Err(Reply::new(400, "invalid_header", format!("the {name} header is not valid UTF-8"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_text_refuses_bytes_that_are_not_utf8() {
        assert_eq!(header_text("authorization", None), Ok(None));
        assert_eq!(header_text("authorization", Some(b"Bearer x")), Ok(Some("Bearer x")));
        let refused = header_text("authorization", Some(b"Bearer caf\xe9")).unwrap_err();
        assert_eq!((refused.status, refused.error), (400, "invalid_header"));
        assert_eq!(refused.detail, "the authorization header is not valid UTF-8");
    }

    #[test]
    fn body_is_escaped_json() {
        let r = Reply::new(404, "unknown_function", "no function for host \"x\\y\"\n");
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["error"], "unknown_function");
        assert_eq!(v["detail"], "no function for host \"x\\y\"\n");
        assert!(v.get("status").is_none());
    }
}
