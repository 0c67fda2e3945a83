//! `labels`: label validation (`wasnap::snapshot`) and field paths
//! (`wasnap::backend::FieldPath`), each against a model written from containerd's rules.
//!
//! The input (JSON, see [`Input`]) is a snapshot name, its current labels, new labels
//! and the field paths of an update. Properties: `validate_label` accepts exactly a
//! non-empty key whose key and value take at most 4096 bytes, and refuses with
//! invalid-argument in one bounded line; `validate_labels` refuses with the first bad
//! label's error; `inherited_labels` keeps exactly the inherited prefix and the target
//! reference; `FieldPath::parse_all` reads `labels` and `labels.<key>` only (and no
//! paths as `labels`); `FieldPath::apply` does what the model does.

use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use serde::{Deserialize, Serialize};
use wasnap::snapshot::{
    INHERITED_LABEL_PREFIX, LABEL_SNAPSHOT_REF, MAX_LABEL_SIZE, inherited_labels, validate_label,
    validate_labels,
};
use wasnap::{ErrorKind, FieldPath, Labels};

use crate::engine::{Mutator, Outcome, Target};
use crate::input::{below, decode, encode, one_in, pick, string};

/// The target.
pub const TARGET: Target = Target {
    name: "labels",
    about: "label validation and field paths against a model of containerd's rules",
    run,
    generate,
    mutate,
    seeds,
    dictionary: &["labels", "labels.", ".", "containerd.io/", "snapshot/", "\"", "\0", "é"],
    contained_panics: &[],
    known: &[],
    timeout: Duration::from_secs(10),
};

/// One input.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Arbitrary)]
pub struct Input {
    /// The snapshot the update is for (it appears in error messages).
    #[serde(default)]
    pub name: String,
    /// Its labels now.
    #[serde(default)]
    pub current: Vec<(String, String)>,
    /// The labels of the update's info (also the set validated).
    #[serde(default)]
    pub new: Vec<(String, String)>,
    /// The update's field paths.
    #[serde(default)]
    pub paths: Vec<String>,
}

/// containerd's rule, as the model.
fn valid(key: &str, value: &str) -> bool {
    !key.is_empty() && key.len() + value.len() <= MAX_LABEL_SIZE
}

/// An error message must be one line and not grow with the input: keys are cut to 64
/// characters, each at most 10 bytes once escaped.
fn check_message(e: &wasnap::Error, limit: usize) -> Result<(), String> {
    if e.kind() != ErrorKind::InvalidArgument {
        return Err(format!("typed error: {:?}, not invalid-argument: {e}", e.kind()));
    }
    let msg = e.message();
    if msg.contains('\n') {
        return Err(format!("one line: {msg:?}"));
    }
    if msg.len() > limit {
        return Err(format!("bounded message: {} bytes (at most {limit}): {msg:?}", msg.len()));
    }
    Ok(())
}

/// The model of an update: each path in order, `labels` replacing all, `labels.<k>`
/// setting one or (absent from the new labels) deleting it; a label set to an empty
/// value is none (containerd's `WriteLabels` stores no empty value).
fn model_apply(paths: &[FieldPath], current: &Labels, new: &Labels) -> Labels {
    let mut out = current.clone();
    for p in paths {
        match p {
            FieldPath::Labels => {
                out = new.clone();
                out.retain(|_, v| !v.is_empty());
            }
            FieldPath::Label(k) => {
                out.remove(k);
                if let Some(v) = new.get(k).filter(|v| !v.is_empty()) {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
    }
    out
}

fn run(bytes: &[u8]) -> Result<Outcome, String> {
    let input: Input = decode(bytes);
    let mut outcome = Vec::new();

    // One label at a time.
    for (k, v) in input.current.iter().chain(&input.new) {
        match (validate_label(k, v), valid(k, v)) {
            (Ok(()), true) => {}
            (Err(e), false) => check_message(&e, 1024)?,
            (Ok(()), false) => {
                return Err(format!(
                    "model: accepted a label of {}+{} bytes (key {:?})",
                    k.len(),
                    v.len(),
                    cut(k)
                ));
            }
            (Err(e), true) => return Err(format!("model: refused a valid label: {e}")),
        }
    }

    // A set: the first bad label (in key order) is the one reported.
    let new: Labels = input.new.iter().cloned().collect();
    let current: Labels = input.current.iter().cloned().collect();
    match validate_labels(&new) {
        Ok(()) => {
            if let Some((k, v)) = new.iter().find(|(k, v)| !valid(k, v)) {
                return Err(format!(
                    "model: set accepted with a bad label ({} bytes)",
                    k.len() + v.len()
                ));
            }
            outcome.push("labels:ok");
        }
        Err(e) => {
            check_message(&e, 1024)?;
            let Some((k, v)) = new.iter().find(|(k, v)| !valid(k, v)) else {
                return Err(format!("model: set refused with every label valid: {e}"));
            };
            let first = validate_label(k, v).err().map(|e| e.message().to_owned());
            if first.as_deref() != Some(e.message()) {
                return Err(format!(
                    "first: set refused with {:?}, first bad label says {first:?}",
                    e.message()
                ));
            }
            outcome.push(if k.is_empty() { "labels:empty-key" } else { "labels:too-big" });
        }
    }

    // Inherited labels.
    let inherited = inherited_labels(&new);
    let want: Labels = new
        .iter()
        .filter(|(k, _)| k.starts_with(INHERITED_LABEL_PREFIX) || k.as_str() == LABEL_SNAPSHOT_REF)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if inherited != want {
        return Err(format!(
            "inherited: {:?}, the model keeps {:?}",
            inherited.keys(),
            want.keys()
        ));
    }
    if !inherited.is_empty() {
        outcome.push("inherited");
    }

    // Field paths.
    let parsed = FieldPath::parse_all(&input.paths, &input.name);
    let model: Result<Vec<FieldPath>, usize> = if input.paths.is_empty() {
        Ok(vec![FieldPath::Labels])
    } else {
        input
            .paths
            .iter()
            .enumerate()
            .map(|(i, p)| match p.strip_prefix("labels.") {
                _ if p == "labels" => Ok(FieldPath::Labels),
                Some(k) => Ok(FieldPath::Label(k.to_owned())),
                None => Err(i),
            })
            .collect()
    };
    match (parsed, model) {
        (Ok(paths), Ok(want)) => {
            if paths != want {
                return Err(format!(
                    "model: paths {:?} parsed as {paths:?}, the model says {want:?}",
                    input.paths
                ));
            }
            let applied = {
                let mut labels = current.clone();
                FieldPath::apply(&paths, &mut labels, &new);
                labels
            };
            let want = model_apply(&paths, &current, &new);
            if applied != want {
                return Err(format!(
                    "apply: got {:?}, the model says {:?}",
                    applied.keys(),
                    want.keys()
                ));
            }
            outcome.push(if paths.iter().any(|p| matches!(p, FieldPath::Label(_))) {
                "paths:label"
            } else {
                "paths:all"
            });
        }
        (Err(e), Err(i)) => {
            let limit = 256 + 10 * (input.paths[i].len() + input.name.len());
            check_message(&e, limit)?;
            let want = FieldPath::parse(&input.paths[i], &input.name)
                .err()
                .map(|e| e.message().to_owned());
            if want.as_deref() != Some(e.message()) {
                return Err(format!(
                    "first: parse_all says {:?}, the first bad path says {want:?}",
                    e.message()
                ));
            }
            outcome.push("paths:err");
        }
        (Ok(paths), Err(i)) => {
            return Err(format!(
                "model: {:?} accepted as {paths:?}, but {:?} is not a label path",
                input.paths, input.paths[i]
            ));
        }
        (Err(e), Ok(_)) => return Err(format!("model: refused paths {:?}: {e}", input.paths)),
    }
    Ok(outcome.join(" "))
}

fn cut(s: &str) -> String {
    s.chars().take(64).collect()
}

const KEYS: &[&str] = &[
    "",
    "a",
    "containerd.io/gc.root",
    "containerd.io/snapshot/remote",
    "containerd.io/snapshot.ref",
    "containerd.io/snapshot/",
    "containerd.io/snapshot",
    "labels",
    "a.b",
    "é",
    "牛",
    "\0",
    "\n",
    "k",
];

fn pair(u: &mut Unstructured<'_>) -> (String, String) {
    // Sizes at the limit's edge, in one-, two- and three-byte characters.
    if one_in(u, 4) {
        let unit = pick(u, &["x", "é", "牛", "\u{1F600}"]);
        let key_len = below(u, MAX_LABEL_SIZE + 2);
        let total = MAX_LABEL_SIZE - 2 + below(u, 5);
        let key = unit.repeat(key_len / unit.len());
        let rest = total.saturating_sub(key.len());
        let value: String = "v".repeat(rest);
        return (key, value);
    }
    (string(u, KEYS, 0), string(u, &["", "x", "true", "é"], MAX_LABEL_SIZE / 2))
}

fn path(u: &mut Unstructured<'_>, keys: &[(String, String)]) -> String {
    match below(u, 6) {
        0 => "labels".to_owned(),
        1 | 2 if !keys.is_empty() => format!("labels.{}", keys[below(u, keys.len())].0),
        3 => string(
            u,
            &[
                "labels", "labels.", "Labels", "labels..", "name", "kind", ".labels", " labels",
                "labels.x",
            ],
            0,
        ),
        _ => format!("labels.{}", string(u, KEYS, 0)),
    }
}

fn generate(u: &mut Unstructured<'_>) -> Vec<u8> {
    let current: Vec<_> = (0..below(u, 5)).map(|_| pair(u)).collect();
    let mut new: Vec<_> = (0..below(u, 5)).map(|_| pair(u)).collect();
    if one_in(u, 2) && !current.is_empty() {
        let i = below(u, current.len());
        new.push((current[i].0.clone(), "changed".to_owned()));
    }
    let all: Vec<_> = current.iter().chain(&new).cloned().collect();
    let paths = (0..below(u, 5)).map(|_| path(u, &all)).collect();
    let name = string(u, &["snap", "default/1/x", "", "\"", "é"], 0);
    encode(&Input { name, current, new, paths })
}

fn mutate(bytes: &[u8], m: &mut Mutator<'_>) -> Vec<u8> {
    let mut input: Input = decode(bytes);
    match m.rng.below(6) {
        0 if !input.new.is_empty() => {
            let i = m.rng.below(input.new.len());
            m.string(&mut input.new[i].0);
        }
        1 if !input.new.is_empty() => {
            let i = m.rng.below(input.new.len());
            m.string(&mut input.new[i].1);
        }
        2 if !input.paths.is_empty() => {
            let i = m.rng.below(input.paths.len());
            m.string(&mut input.paths[i]);
        }
        3 => m.string(&mut input.name),
        4 => {
            let fresh = m.fresh(512);
            let other: Input = decode(&generate(&mut Unstructured::new(&fresh)));
            input.paths.extend(other.paths);
            input.new.extend(other.new);
        }
        _ => {
            let mut raw = bytes.to_vec();
            m.bytes(&mut raw);
            return raw;
        }
    }
    encode(&input)
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let s = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
    };
    let edge_key = "k".repeat(100);
    let edge_value = "v".repeat(MAX_LABEL_SIZE - 100);
    let over_value = "v".repeat(MAX_LABEL_SIZE - 99);
    let wide_key = "é".repeat(2048);
    let inputs: Vec<(&'static str, Input)> = vec![
        ("empty", Input::default()),
        (
            "replace-all",
            Input {
                name: "snap".into(),
                current: s(&[("a", "1"), ("b", "2")]),
                new: s(&[("c", "3")]),
                paths: vec![],
            },
        ),
        (
            "set-and-delete-one",
            Input {
                name: "snap".into(),
                current: s(&[("a", "1"), ("b", "2")]),
                new: s(&[("a", "changed")]),
                paths: vec!["labels.a".into(), "labels.b".into()],
            },
        ),
        (
            "dotted-key",
            Input {
                name: "snap".into(),
                current: vec![],
                new: s(&[("a.b.c", "x")]),
                paths: vec!["labels.a.b.c".into()],
            },
        ),
        (
            "empty-key",
            Input { new: s(&[("", "x")]), paths: vec!["labels.".into()], ..Input::default() },
        ),
        ("at-the-limit", Input { new: vec![(edge_key.clone(), edge_value)], ..Input::default() }),
        ("one-over-the-limit", Input { new: vec![(edge_key, over_value)], ..Input::default() }),
        (
            "two-byte-key-at-the-limit",
            Input { new: vec![(wide_key, String::new())], ..Input::default() },
        ),
        (
            "bad-path",
            Input {
                name: "default/1/x\n".into(),
                paths: vec!["labels.a".into(), "name".into(), "kind".into()],
                ..Input::default()
            },
        ),
        (
            "inherited",
            Input {
                new: s(&[
                    ("containerd.io/snapshot/remote", "1"),
                    ("containerd.io/snapshot.ref", "x"),
                    ("containerd.io/snapshotx", "no"),
                    ("containerd.io/gc.root", "no"),
                ]),
                ..Input::default()
            },
        ),
        (
            "labels-then-one",
            Input {
                current: s(&[("a", "1")]),
                new: s(&[("b", "2")]),
                paths: vec!["labels".into(), "labels.a".into()],
                ..Input::default()
            },
        ),
    ];
    inputs.into_iter().map(|(n, i)| (n, encode(&i))).collect()
}
