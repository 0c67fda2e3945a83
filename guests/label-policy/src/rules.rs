//! The rules, apart from the plugin around them: parsed from the configuration once, then
//! applied to each set of labels a snapshot is about to have.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use wasnap_sdk::{Config, Error, Labels, Result, validate_label};

/// The configuration as the host passes it; see the crate documentation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    require: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    max_labels: Option<usize>,
}

/// A label key, or with a trailing `*` every key that starts with what comes before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    prefix: bool,
}

impl Pattern {
    /// Parses the pattern `text` of rule `rule` (for the error message).
    fn parse(rule: &str, text: &str) -> Result<Pattern> {
        let (body, prefix) = match text.strip_suffix('*') {
            Some(body) => (body, true),
            None => (text, false),
        };
        if text.is_empty() {
            return Err(config_error(format!("{rule} rule {text:?}: a pattern must not be empty")));
        }
        if body.contains('*') {
            return Err(config_error(format!(
                "{rule} rule {text:?}: '*' may only end a pattern (prefix match)"
            )));
        }
        Ok(Pattern { text: body.to_owned(), prefix })
    }

    /// Whether the label key `key` matches.
    pub fn matches(&self, key: &str) -> bool {
        if self.prefix { key.starts_with(&self.text) } else { key == self.text }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let star = if self.prefix { "*" } else { "" };
        write!(f, "\"{}{star}\"", self.text.escape_debug())
    }
}

fn config_error(message: String) -> Error {
    Error::InvalidArgument(format!("label-policy configuration: {message}"))
}

fn patterns(rule: &str, texts: &[String]) -> Result<Vec<Pattern>> {
    texts.iter().map(|t| Pattern::parse(rule, t)).collect()
}

/// Every rule of one configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    deny: Vec<Pattern>,
    remove: Vec<Pattern>,
    set: Labels,
    require: Vec<Pattern>,
    max_labels: Option<usize>,
}

impl Rules {
    /// The rules in `config`; no configuration gives rules that change nothing. A rule
    /// set that could never let a snapshot through is refused here, at load time.
    pub fn from_config(config: &Config) -> Result<Rules> {
        let s: Settings = config.parse()?;
        let rules = Rules {
            deny: patterns("deny", &s.deny)?,
            remove: patterns("remove", &s.remove)?,
            set: s.set,
            require: patterns("require", &s.require)?,
            max_labels: s.max_labels,
        };
        rules.check()?;
        Ok(rules)
    }

    fn check(&self) -> Result<()> {
        for (k, v) in &self.set {
            validate_label(k, v)
                .map_err(|e| config_error(format!("set {k:?}: {}", e.message())))?;
            // A label the policy sets would make every later update of the snapshot
            // fail the deny rule (an update is checked on all the labels it leaves).
            if let Some(p) = self.deny.iter().find(|p| p.matches(k)) {
                return Err(config_error(format!("set {k:?} is refused by deny rule {p}")));
            }
        }
        for p in self.require.iter().filter(|p| !p.prefix) {
            if let Some(r) = self.remove.iter().find(|r| r.matches(&p.text))
                && !self.set.contains_key(&p.text)
            {
                return Err(config_error(format!(
                    "require rule {p} can never hold: remove rule {r} takes the label away"
                )));
            }
        }
        if let Some(max) = self.max_labels
            && self.set.len() > max
        {
            return Err(config_error(format!(
                "set has {} labels, more than max_labels {max}",
                self.set.len()
            )));
        }
        Ok(())
    }

    /// The labels `op` on snapshot `key` may leave it with, given the ones it would have
    /// without the policy: refused (invalid-argument, naming the rule and the label) if
    /// a deny rule matches one of them, else with `remove` and `set` applied, and then
    /// refused if a `require` rule or `max_labels` does not hold.
    pub fn apply(&self, op: &str, key: &str, labels: &Labels) -> Result<Labels> {
        let refuse =
            |why: String| Err(Error::InvalidArgument(format!("label-policy: {op} {key:?}: {why}")));
        for k in labels.keys() {
            if let Some(p) = self.deny.iter().find(|p| p.matches(k)) {
                return refuse(format!("label {k:?} is refused by rule deny {p}"));
            }
        }
        let mut out: Labels = labels
            .iter()
            .filter(|(k, _)| !self.remove.iter().any(|p| p.matches(k)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.extend(self.set.iter().map(|(k, v)| (k.clone(), v.clone())));
        for p in &self.require {
            if !out.keys().any(|k| p.matches(k)) {
                return refuse(if p.prefix {
                    format!("no label matches rule require {p}")
                } else {
                    format!("label {:?} is missing (rule require {p})", p.text)
                });
            }
        }
        if let Some(max) = self.max_labels
            && out.len() > max
        {
            return refuse(format!(
                "{} labels (after rewriting) are more than rule max_labels {max}",
                out.len()
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use wasnap_sdk::ErrorKind;

    use super::*;

    const P: &str = "containerd.io/snapshot/";

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (format!("{P}{k}"), (*v).to_owned())).collect()
    }

    fn rules(json: &str) -> Result<Rules> {
        Rules::from_config(&Config::new(json))
    }

    #[test]
    fn no_configuration_changes_nothing() {
        let r = rules("null").unwrap();
        let l = labels(&[("a", "1"), ("b", "2")]);
        assert_eq!(r.apply("prepare", "k", &l).unwrap(), l);
    }

    #[test]
    fn deny_matches_exact_keys_and_prefixes() {
        let r = rules(&format!(r#"{{"deny": ["{P}secret", "{P}tmp.*"]}}"#)).unwrap();
        let e = r.apply("prepare", "ns/1/k", &labels(&[("secret", "x")])).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            e.message(),
            format!(
                r#"label-policy: prepare "ns/1/k": label "{P}secret" is refused by rule deny "{P}secret""#
            )
        );
        let e = r.apply("commit", "c", &labels(&[("tmp.build", "1")])).unwrap_err();
        assert!(e.message().contains(&format!(r#"rule deny "{P}tmp.*""#)), "{e}");
        // Exact rules do not match longer keys.
        assert!(r.apply("view", "v", &labels(&[("secret2", "x"), ("tmp", "y")])).is_ok());
    }

    #[test]
    fn remove_then_set_then_require_then_max() {
        let r = rules(&format!(
            r#"{{"remove": ["{P}debug.*"], "set": {{"{P}managed-by": "wasnap"}},
                "require": ["{P}owner"], "max_labels": 3}}"#
        ))
        .unwrap();
        let got = r.apply("prepare", "k", &labels(&[("owner", "me"), ("debug.x", "1")])).unwrap();
        assert_eq!(got, labels(&[("owner", "me"), ("managed-by", "wasnap")]));
        let e = r.apply("prepare", "k", &labels(&[("debug.x", "1")])).unwrap_err();
        assert!(e.message().contains(&format!(r#"label "{P}owner" is missing"#)), "{e}");
        let e = r
            .apply("prepare", "k", &labels(&[("owner", "me"), ("a", "1"), ("b", "2")]))
            .unwrap_err();
        assert!(e.message().contains("4 labels (after rewriting)"), "{e}");
        // `set` overrides what the caller gave.
        let got =
            r.apply("prepare", "k", &labels(&[("owner", "me"), ("managed-by", "x")])).unwrap();
        assert_eq!(got[&format!("{P}managed-by")], "wasnap");
    }

    #[test]
    fn prefix_require_wants_any_matching_label() {
        let r = rules(&format!(r#"{{"require": ["{P}team.*"]}}"#)).unwrap();
        assert!(r.apply("prepare", "k", &labels(&[("team.a", "x")])).is_ok());
        let e = r.apply("prepare", "k", &labels(&[("team", "x")])).unwrap_err();
        assert!(e.message().contains(&format!(r#"no label matches rule require "{P}team.*""#)));
    }

    #[test]
    fn configurations_that_cannot_work_are_refused() {
        for bad in [
            r#"{"deny": ["a*b"]}"#,
            r#"{"deny": [""]}"#,
            r#"{"remove": ["**"]}"#,
            r#"{"deny": ["x*"], "set": {"x1": "v"}}"#,
            r#"{"require": ["a"], "remove": ["a*"]}"#,
            r#"{"set": {"a": "1", "b": "2"}, "max_labels": 1}"#,
            r#"{"set": {"": "1"}}"#,
            r#"{"denied": ["a"]}"#,
            r#"{"max_labels": -1}"#,
        ] {
            let e = rules(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}: {e}");
        }
        // Required and removed, but set again: fine.
        rules(r#"{"require": ["a"], "remove": ["*"], "set": {"a": "1"}}"#).unwrap();
    }
}
