//! A secret (API key, AWS secret key, session token, auth token) whose `Debug` and `Display`
//! never show the value, so a secret that ends up in a struct that is logged, formatted into an
//! error or written to a report stays hidden by construction. The value is read only through
//! [`Secret::expose`], at the places that put it on the wire.

use std::fmt;

#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(Box<str>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into().into_boxed_str())
    }

    /// The value, for a header or a signature; never for a message.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `None` for an empty value: an empty variable means "not set".
    pub fn non_empty(value: Option<String>) -> Option<Self> {
        value.filter(|v| !v.is_empty()).map(Self::new)
    }

    /// Replaces every occurrence of the value in `text` (a server's message, a library's error).
    pub fn redact(&self, text: &str) -> String {
        if self.0.is_empty() {
            return text.to_owned();
        }
        text.replace(&*self.0, "[redacted]")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

/// Read from configuration (the options Python hands over); there is deliberately no `Serialize`.
impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::new)
    }
}

/// A URL as it may be printed: no user info, no query, no fragment. Backend URLs can carry keys
/// in any of these (`?api_key=`, `user:pass@`), so every message that names a URL goes through here.
pub fn display_url(url: &str) -> String {
    let url = url.trim();
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    let (before, after) = rest.split_at(end);
    let mut shown = String::with_capacity(url.len());
    if let Some(scheme) = scheme {
        shown.push_str(scheme);
        shown.push_str("://");
    }
    // User info ends at the last '@' before the path.
    let authority_end = before.find('/').unwrap_or(before.len());
    match before[..authority_end].rfind('@') {
        Some(at) => {
            shown.push_str("[redacted]@");
            shown.push_str(&before[at + 1..]);
        }
        None => shown.push_str(before),
    }
    if !after.is_empty() {
        shown.push_str(if after.starts_with('?') { "?[redacted]" } else { "#[redacted]" });
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_shows_the_value() {
        let s = Secret::new("sk-live-123");
        assert!(!format!("{s:?} {s} {:?}", Some(&s)).contains("sk-live-123"));
        assert_eq!(s.expose(), "sk-live-123");
        assert_eq!(s.redact("bad key sk-live-123!"), "bad key [redacted]!");
        assert_eq!(Secret::non_empty(Some(String::new())), None);
    }

    #[test]
    fn urls_lose_query_and_user_info() {
        assert_eq!(display_url("vllm://h:8000?api_key=k3y"), "vllm://h:8000?[redacted]");
        assert_eq!(display_url("http://u:pw@h/v1?x=1#f"), "http://[redacted]@h/v1?[redacted]");
        assert_eq!(display_url("http://h/v1#frag"), "http://h/v1#[redacted]");
        assert_eq!(display_url("vllm://h/p@q"), "vllm://h/p@q");
        assert_eq!(display_url("localhost:8000"), "localhost:8000");
    }
}
