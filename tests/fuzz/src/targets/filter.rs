//! `filter`: containerd's filter language (`wasnap::filter`).
//!
//! The input is the filter text itself (lossy UTF-8). It is parsed whole with
//! `Filter::parse` and, split at newlines, as the alternatives of `Filter::parse_all`,
//! and every filter that parses is matched against snapshots: fixed ones and ones made
//! from the filter's own words (so that `==` finds something to be equal to).
//!
//! Properties: parsing fails only with invalid-argument, in one line that names the
//! input; text past the byte budget is refused; no parse takes more than
//! [`PARSE_BUDGET`]; `parse(s)` and `parse_all([s])` agree; `parse_all` of several
//! strings matches exactly what one of them matches; only the empty string is
//! match-all; matching never panics.

use std::time::{Duration, Instant, UNIX_EPOCH};

use arbitrary::Unstructured;
use wasnap::filter::{MAX_FILTER_BYTES, MAX_SELECTORS};
use wasnap::{ErrorKind, Filter, Info, Kind, Labels};

use crate::engine::{Outcome, Target, mutate_bytes};
use crate::input::{below, one_in, pick};

/// The target.
pub const TARGET: Target = Target {
    name: "filter",
    about: "filter parser and matcher: typed errors, budgets, parse/parse_all agreement",
    run,
    generate,
    mutate: mutate_bytes,
    seeds,
    dictionary: DICTIONARY,
    contained_panics: &[],
    known: &[],
    timeout: Duration::from_secs(10),
};

/// Longest one parse may take: the budgets (selectors, bytes, regex size) must keep a
/// hostile filter cheap. Generous, for unoptimised builds on a busy machine.
pub const PARSE_BUDGET: Duration = Duration::from_millis(1500);

const DICTIONARY: &[&str] = &[
    "name",
    "kind",
    "parent",
    "labels",
    "labels.",
    "==",
    "!=",
    "~=",
    ",",
    ".",
    "\"",
    "/",
    "|",
    "\\",
    "\\x41",
    "\\u00e9",
    "\\U0001F600",
    "\\101",
    "\\\"",
    "\\/",
    "\\|",
    "\\\\",
    "\\n",
    " ",
    "\t",
    "\u{3000}",
    "\u{200b}",
    "\0",
    "牛",
    "committed",
    "active",
    "view",
    "^",
    "$",
    ".*",
    "\\\\d+",
    "\\\\w{40}",
    "[a-z]",
    "(a|b)",
    "{2,3}",
    "*",
    "+",
    "?",
    "\\\\p{L}",
    "(?i)",
    "containerd.io/gc.root",
    "\"a.b\"",
    "/^x/",
    "|y|",
    "\n",
];

const FIELDS: &[&str] = &[
    "name",
    "kind",
    "parent",
    "labels",
    "a",
    "b",
    "_",
    "9",
    "x_1",
    "created",
    "\"a.b\"",
    "\"containerd.io/gc.root\"",
    "\"\"",
    "\"\\x41\"",
    "\"\\u00e9\\n\"",
    "\"sp ace\"",
    "牛",
    "",
];
const OPS: &[&str] = &["==", "!=", "~=", "==", "!=", "~=", "=", "===", "!~", "~", "==!", ""];
const VALUES: &[&str] = &[
    "a",
    "b",
    "c",
    "x",
    "committed",
    "active",
    "view",
    "base",
    "work",
    "1.0",
    "b.c-d_e",
    "x/y",
    "a|b",
    "牛",
    "€e\u{301}",
    "\u{1}",
    "\"quoted, value\"",
    "\"\\x41\\102\"",
    "\"\\xff\"",
    "\"\\777\"",
    "\"\"",
    "/^ba/",
    "/a\\/b/",
    "|a\\|b|",
    "/\\\\d+/",
    "/[abc/",
    "/(/",
    "a{2,1}",
    "/\\\\w{40}\\\\w{40}/",
    "/\\\\p{L}{64}/",
    "/(?i)X/",
    "/.*/",
    "/^$/",
    "/a{0,1000}/",
    "\"unterminated",
    "/x\\",
    "\"\\g\"",
];
const SPACES: &[&str] = &["", "", "", "", " ", "\t", "\u{3000}", "\n", "  "];

/// Snapshots every filter is matched against.
fn fixed_infos() -> Vec<Info> {
    let info = |name: &str, parent: Option<&str>, kind: Kind, labels: &[(&str, &str)]| {
        let labels: Labels =
            labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Info {
            name: name.to_owned(),
            parent: parent.map(str::to_owned),
            kind,
            labels,
            created: UNIX_EPOCH,
            updated: UNIX_EPOCH,
        }
    };
    vec![
        info("base", None, Kind::Committed, &[("containerd.io/gc.root", "x")]),
        info("work", Some("base"), Kind::Active, &[("a.b", "c"), ("a", "b"), ("team", "blue")]),
        info("peek", Some("base"), Kind::View, &[]),
        info("", Some(""), Kind::Active, &[("", "")]),
        info("牛", None, Kind::Committed, &[("牛", "€e\u{301}"), ("x", "\u{1}")]),
    ]
}

/// Snapshots made of the filter's own words: each selector's path and value.
fn echo_infos(text: &str) -> Vec<Info> {
    text.split([',', '\n'])
        .take(16)
        .map(|selector| {
            let (path, value) = match selector.find(['=', '!', '~']) {
                Some(i) => {
                    let rest = selector[i..].trim_start_matches(['=', '!', '~']);
                    (&selector[..i], rest)
                }
                None => (selector, ""),
            };
            let value = value.trim().trim_matches(['"', '/', '|']);
            let path = path.trim();
            let mut labels = Labels::new();
            if let Some(key) = path.strip_prefix("labels.") {
                labels.insert(key.trim_matches('"').to_owned(), value.to_owned());
            }
            Info {
                name: value.to_owned(),
                parent: Some(value.to_owned()),
                kind: value.parse().unwrap_or(Kind::Active),
                labels,
                created: UNIX_EPOCH,
                updated: UNIX_EPOCH,
            }
        })
        .collect()
}

/// Parses with the time taken checked against the budget.
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    let started = Instant::now();
    let v = f();
    let took = started.elapsed();
    if took > PARSE_BUDGET {
        return Err(format!("budget: {what} took {took:?} (budget {PARSE_BUDGET:?})"));
    }
    Ok(v)
}

/// Checks a parse error: invalid-argument, one line, naming the input it was about
/// (unless that input was over the byte budget, which is not repeated back).
fn check_error(e: &wasnap::Error, text: &str, whole: usize) -> Result<String, String> {
    if e.kind() != ErrorKind::InvalidArgument {
        return Err(format!("typed error: {:?} for {text:?}, not invalid-argument: {e}", e.kind()));
    }
    let msg = e.message();
    if msg.chars().any(char::is_control) {
        return Err(format!("one line: control characters in the error message: {msg:?}"));
    }
    if whole > MAX_FILTER_BYTES {
        if msg.len() > 256 {
            return Err(format!(
                "budget: refusing {whole} bytes took a {} byte message",
                msg.len()
            ));
        }
        return Ok("too-long".to_owned());
    }
    let prefix = format!("filter {text:?}: ");
    let class = match msg.strip_prefix(&prefix) {
        Some(rest) => rest.split(" at position").next().unwrap_or(rest),
        None if msg.starts_with("filter with") || msg.starts_with("filters with") => "selectors",
        None => return Err(format!("error names its input: {msg:?} (for {text:?})")),
    };
    // The class without the quoted details (regex errors, values).
    Ok(class.split(['"', '\'']).next().unwrap_or(class).trim().to_owned())
}

fn run(input: &[u8]) -> Result<Outcome, String> {
    let text = String::from_utf8_lossy(input);
    let text = text.as_ref();
    let mut outcome = Vec::new();
    let mut infos = fixed_infos();
    infos.extend(echo_infos(text));

    // The whole text as one filter.
    let one = timed("parse", || Filter::parse(text))?;
    let single = timed("parse_all of one", || Filter::parse_all(&[text]))?;
    match (&one, &single) {
        (Ok(f), Ok(g)) => {
            if text.len() > MAX_FILTER_BYTES {
                return Err(format!(
                    "budget: {} bytes parsed (budget {MAX_FILTER_BYTES})",
                    text.len()
                ));
            }
            if f.is_match_all() != text.is_empty() {
                return Err(format!(
                    "match-all: parse({text:?}).is_match_all() = {}",
                    f.is_match_all()
                ));
            }
            for info in &infos {
                if f.matches(info) != g.matches(info) {
                    return Err(format!(
                        "agreement: parse and parse_all([s]) match {info:?} differently for {text:?}"
                    ));
                }
            }
            outcome.push(format!("one:ok:{}", infos.iter().filter(|i| f.matches(*i)).count()));
        }
        (Err(e), Err(e2)) => {
            let class = check_error(e, text, text.len())?;
            check_error(e2, text, text.len())?;
            if text.len() <= MAX_FILTER_BYTES && e.message() != e2.message() {
                return Err(format!(
                    "agreement: parse says {:?}, parse_all([s]) says {:?}",
                    e.message(),
                    e2.message()
                ));
            }
            outcome.push(format!("one:err:{class}"));
        }
        _ => {
            return Err(format!(
                "agreement: parse is {} and parse_all([s]) is {} for {text:?}",
                if one.is_ok() { "ok" } else { "an error" },
                if single.is_ok() { "ok" } else { "an error" }
            ));
        }
    }

    // The lines as alternatives.
    let lines: Vec<&str> = text.split('\n').collect();
    if lines.len() > 1 {
        let all = timed("parse_all", || Filter::parse_all(&lines))?;
        let parts: Vec<_> = lines
            .iter()
            .map(|l| timed("parse of a line", || Filter::parse(l)))
            .collect::<Result<_, _>>()?;
        match all {
            Ok(f) => {
                if parts.iter().any(Result::is_err) {
                    return Err(format!(
                        "agreement: parse_all accepted {lines:?}, a line of which parse refuses"
                    ));
                }
                let parts: Vec<Filter> = parts.into_iter().filter_map(Result::ok).collect();
                for info in &infos {
                    let any = parts.iter().any(|p| p.matches(info));
                    if f.matches(info) != any {
                        return Err(format!(
                            "or: parse_all({lines:?}) matches {info:?}: {}, its lines: {any}",
                            f.matches(info)
                        ));
                    }
                }
                if f.is_match_all() != lines.iter().any(|l| l.is_empty()) {
                    return Err(format!(
                        "match-all: parse_all({lines:?}).is_match_all() = {}",
                        f.is_match_all()
                    ));
                }
                outcome.push("all:ok".to_owned());
            }
            Err(e) => {
                let total: usize = lines.iter().map(|l| l.len()).sum();
                let failing = parts.iter().position(Result::is_err);
                let line = failing.map_or("", |i| lines[i]);
                let whole = if total > MAX_FILTER_BYTES { total } else { line.len() };
                let class = check_error(&e, line, whole)?;
                if failing.is_none() && total <= MAX_FILTER_BYTES {
                    let selectors = e.message().contains("selectors");
                    if !selectors {
                        return Err(format!(
                            "agreement: parse_all refused {lines:?} ({}) though every line parses",
                            e.message()
                        ));
                    }
                }
                outcome.push(format!("all:err:{class}"));
            }
        }
    }
    Ok(outcome.join(" "))
}

fn field(u: &mut Unstructured<'_>) -> String {
    format!("{}{}", pick(u, SPACES), pick(u, FIELDS))
}

fn selector(u: &mut Unstructured<'_>) -> String {
    let mut s = field(u);
    for _ in 0..below(u, 3) {
        s.push('.');
        s.push_str(&field(u));
    }
    if !one_in(u, 4) {
        s.push_str(pick(u, SPACES));
        s.push_str(pick(u, OPS));
        s.push_str(pick(u, SPACES));
        s.push_str(pick(u, VALUES));
    }
    s
}

fn one_filter(u: &mut Unstructured<'_>) -> String {
    let n = match below(u, 16) {
        0 => MAX_SELECTORS - 1 + below(u, 4),
        _ => 1 + below(u, 4),
    };
    let sep = if one_in(u, 16) { ", " } else { "," };
    (0..n).map(|_| selector(u)).collect::<Vec<_>>().join(sep)
}

fn generate(u: &mut Unstructured<'_>) -> Vec<u8> {
    let text = match below(u, 12) {
        // Raw bytes.
        0 => {
            let n = below(u, 64);
            return u.bytes(n).map(<[u8]>::to_vec).unwrap_or_default();
        }
        // Past the byte budget, or just under it.
        1 => {
            let one = one_filter(u);
            let target = MAX_FILTER_BYTES - 64 + below(u, 128);
            let mut s = one.clone();
            while s.len() < target {
                s.push(',');
                s.push_str(&one);
            }
            s
        }
        // Several alternatives for parse_all.
        2 | 3 => (0..1 + below(u, 4)).map(|_| one_filter(u)).collect::<Vec<_>>().join("\n"),
        _ => one_filter(u),
    };
    text.into_bytes()
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let big_regex = vec![r"a~=\w{40}\w{40}"; 400].join(",");
    let many = vec!["a==b"; MAX_SELECTORS + 1].join(",");
    let long = format!("name=={}", "x".repeat(MAX_FILTER_BYTES));
    let seeds: Vec<(&'static str, String)> = vec![
        ("empty", String::new()),
        ("name", "name==foo".into()),
        ("and", "name==foo,labels.bar".into()),
        ("or-lines", "name==foo\nkind==view\nlabels.team==blue".into()),
        ("or-with-empty", "name==foo\n".into()),
        ("quoted-label", r#"labels."containerd.io/gc.root"==2024"#.into()),
        ("quoted-path", r#""leading quote".postquote==value"#.into()),
        ("regex", r"name~=/^ba\\d+$/,other==abc".into()),
        ("regex-pipes", r"name~=|a\|b|".into()),
        ("escapes", r#"a=="\x41\102\u00e9\U0001F600""#.into()),
        ("whitespace", "name == bar, \tlabels. foo".into()),
        ("bad-trailing-space", "name==bar ".into()),
        ("bad-operator", "name=foo".into()),
        ("bad-regex", "name~=[abc".into()),
        ("bad-utf8-escape", r#"a=="\xff""#.into()),
        ("bad-octal", r#"a=="\777""#.into()),
        ("bad-null", "foo\0bar".into()),
        ("bad-unterminated", "labels.key==/value".into()),
        ("only-space", " ".into()),
        ("hostile-regexes", big_regex),
        ("too-many-selectors", many),
        ("too-long", long),
        ("parent-empty", r#"parent=="""#.into()),
        ("unicode-value", "a==€e\u{301}ש✓".into()),
        ("format-char", "a==b\u{200b}c".into()),
    ];
    seeds.into_iter().map(|(n, s)| (n, s.into_bytes())).collect()
}
