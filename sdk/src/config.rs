//! The configuration the host passes to `lifecycle.init`.

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// A plugin's configuration: the JSON value the host built from the plugin's entry in its
/// config file, `null` when there is none.
///
/// ```
/// # use wasnap_sdk::Config;
/// #[derive(serde::Deserialize, Default)]
/// #[serde(deny_unknown_fields)]
/// struct Settings {
///     max_snapshots: Option<u32>,
/// }
/// let s: Settings = Config::new(r#"{"max_snapshots": 10}"#).parse()?;
/// assert_eq!(s.max_snapshots, Some(10));
/// let s: Settings = Config::new("null").parse()?;
/// assert_eq!(s.max_snapshots, None);
/// # Ok::<(), wasnap_sdk::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    json: String,
}

impl Config {
    /// Wraps the JSON text the host passed (also handy in tests).
    pub fn new(json: impl Into<String>) -> Self {
        Config { json: json.into() }
    }

    /// The JSON text as the host passed it.
    pub fn as_str(&self) -> &str {
        &self.json
    }

    /// Whether there is no configuration (`null`, or nothing at all).
    pub fn is_null(&self) -> bool {
        let t = self.json.trim();
        t.is_empty() || t == "null"
    }

    /// Decodes the configuration into `T`; no configuration gives `T::default()`. A value
    /// that does not fit `T` is invalid-argument, with serde's reason.
    pub fn parse<T: DeserializeOwned + Default>(&self) -> Result<T> {
        if self.is_null() {
            return Ok(T::default());
        }
        self.parse_value()
    }

    /// Decodes the configuration into `T` as it is, `null` included (use `Option<T>` or a
    /// type that accepts `null` when the configuration is optional).
    pub fn parse_value<T: DeserializeOwned>(&self) -> Result<T> {
        let text = if self.json.trim().is_empty() { "null" } else { self.json.as_str() };
        serde_json::from_str(text)
            .map_err(|e| Error::InvalidArgument(format!("plugin configuration: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[derive(Debug, Default, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct S {
        limit: u32,
    }

    #[test]
    fn null_or_nothing_is_the_default() {
        for text in ["null", "", "  null\n"] {
            assert!(Config::new(text).is_null());
            assert_eq!(Config::new(text).parse::<S>().unwrap(), S::default());
        }
        assert_eq!(Config::new("null").parse_value::<Option<S>>().unwrap(), None);
    }

    #[test]
    fn a_value_is_decoded_and_a_bad_one_is_invalid_argument() {
        assert_eq!(Config::new(r#"{"limit": 3}"#).parse::<S>().unwrap(), S { limit: 3 });
        let e = Config::new(r#"{"limmit": 3}"#).parse::<S>().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().contains("limmit"), "{e}");
        assert!(Config::new("null").parse_value::<S>().is_err());
    }
}
