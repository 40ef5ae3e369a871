//! Bearer-token auth for `--api-key`: the key is compared in constant time and never logged.

use axum::http::{header, HeaderMap};
use subtle::ConstantTimeEq;

/// The server's key. Debug output hides it, so it cannot reach a log by accident.
#[derive(Clone)]
pub struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<hidden>)")
    }
}

impl ApiKey {
    pub fn new(key: String) -> ApiKey {
        ApiKey(key)
    }

    /// True when `Authorization: Bearer <key>` carries this key. The comparison takes the same time
    /// wherever the first wrong byte is (only the key's length can be learnt from timing).
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers.get(header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer ")) else {
            return false;
        };
        given.ct_eq(self.0.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_key_passes() {
        let key = ApiKey::new("s3cret".into());
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            key.allows(&h)
        };
        assert!(with("Bearer s3cret"));
        for wrong in ["Bearer s3cre", "Bearer s3cretx", "Bearer S3cret", "s3cret", "Basic s3cret", "Bearer  s3cret"] {
            assert!(!with(wrong), "{wrong}");
        }
        assert!(!key.allows(&HeaderMap::new()));
        assert_eq!(format!("{key:?}"), "ApiKey(<hidden>)");
    }
}
