//! containerd's update field paths, so that no plugin has to rewrite them.
//!
//! An update names what it changes: no paths or `labels` replaces every label,
//! `labels.<key>` sets that one label (or deletes it when the new info does not have it).
//! Nothing else about a snapshot can change, so any other path is invalid-argument.

use std::fmt;

use crate::error::{Error, Result};
use crate::types::{Labels, validate_labels};

/// One parsed field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldPath {
    /// `labels`: replace all labels.
    Labels,
    /// `labels.<key>`: set or delete one label.
    Label(String),
}

impl FieldPath {
    /// Parses one path; `snapshot` names the snapshot for the error message.
    pub fn parse(path: &str, snapshot: &str) -> Result<Self> {
        if path == "labels" {
            Ok(FieldPath::Labels)
        } else if let Some(key) = path.strip_prefix("labels.") {
            Ok(FieldPath::Label(key.to_owned()))
        } else {
            Err(Error::InvalidArgument(format!(
                "cannot update {path:?} field on snapshot {snapshot:?}"
            )))
        }
    }

    /// Parses a list; an empty list means "replace all labels".
    pub fn parse_all(paths: &[String], snapshot: &str) -> Result<Vec<Self>> {
        if paths.is_empty() {
            return Ok(vec![FieldPath::Labels]);
        }
        paths.iter().map(|p| Self::parse(p, snapshot)).collect()
    }

    /// Applies `paths` in order, taking values from `new` and changing `current`.
    pub fn apply_all(paths: &[FieldPath], current: &mut Labels, new: &Labels) {
        for p in paths {
            match p {
                FieldPath::Labels => *current = new.clone(),
                FieldPath::Label(k) => match new.get(k) {
                    Some(v) => {
                        current.insert(k.clone(), v.clone());
                    }
                    None => {
                        current.remove(k);
                    }
                },
            }
        }
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldPath::Labels => f.write_str("labels"),
            FieldPath::Label(k) => write!(f, "labels.{k}"),
        }
    }
}

/// What `update` does to a snapshot's labels: parses `fieldpaths` (all of them, before
/// changing anything), applies them from `new` to `current`, and checks the result against
/// containerd's label limits. `snapshot` names the snapshot in errors.
///
/// ```
/// # use wasnap_sdk::{Labels, fieldpath};
/// let mut current = Labels::from([("a".into(), "1".into()), ("b".into(), "2".into())]);
/// let new = Labels::from([("a".into(), "9".into())]);
/// fieldpath::apply(&mut current, &new, &["labels.a".into(), "labels.b".into()], "k")?;
/// assert_eq!(current, Labels::from([("a".into(), "9".into())]));
/// # Ok::<(), wasnap_sdk::Error>(())
/// ```
pub fn apply(
    current: &mut Labels,
    new: &Labels,
    fieldpaths: &[String],
    snapshot: &str,
) -> Result<()> {
    let paths = FieldPath::parse_all(fieldpaths, snapshot)?;
    let mut next = current.clone();
    FieldPath::apply_all(&paths, &mut next, new);
    validate_labels(&next)?;
    *current = next;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn paths(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn containerd_semantics() {
        let mut cur = labels(&[("l1", "v1"), ("l2", "v2"), ("l3", "v3")]);
        apply(
            &mut cur,
            &labels(&[("l1", "updated"), ("l4", "v4")]),
            &paths(&["labels.l1", "labels.l2"]),
            "k",
        )
        .unwrap();
        assert_eq!(cur, labels(&[("l1", "updated"), ("l3", "v3")]));

        apply(&mut cur, &labels(&[("l4", "v4")]), &paths(&["labels"]), "k").unwrap();
        assert_eq!(cur, labels(&[("l4", "v4")]));

        apply(&mut cur, &labels(&[("x", "y")]), &[], "k").unwrap();
        assert_eq!(cur, labels(&[("x", "y")]));
    }

    #[test]
    fn other_paths_change_nothing_and_are_invalid() {
        let mut cur = labels(&[("a", "1")]);
        for bad in ["parent", "name", "kind", "", "label.a"] {
            let e = apply(&mut cur, &Labels::new(), &paths(&["labels", bad]), "k").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
        }
        assert_eq!(cur, labels(&[("a", "1")]));
        assert_eq!(FieldPath::parse("labels.a.b", "k").unwrap().to_string(), "labels.a.b");
    }

    #[test]
    fn a_label_over_the_limit_changes_nothing() {
        let mut cur = labels(&[("a", "1")]);
        let big = labels(&[("a", &"v".repeat(5000))]);
        assert!(apply(&mut cur, &big, &paths(&["labels.a"]), "k").is_err());
        assert_eq!(cur, labels(&[("a", "1")]));
    }
}
