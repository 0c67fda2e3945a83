//! containerd's filter language (`pkg/filters`), parsed and matched the way containerd does.
//!
//! A filter string is a comma-separated conjunction of selectors:
//!
//! ```text
//! filter    := selector ( ',' selector )*
//! selector  := fieldpath [ operator value ]
//! fieldpath := field ( '.' field )*
//! field     := [A-Za-z0-9_]+ | "double quoted"
//! operator  := '==' | '!=' | '~='
//! value     := unquoted run | "double quoted" | /slashed/ or |piped| (only after '~=')
//! ```
//!
//! There is no OR inside one string: `|` is a quote character (for regular expressions),
//! and inside an unquoted value it is just part of the value. Alternatives come from
//! several strings, which [`Filter::parse_all`] ORs together, exactly as containerd's
//! `ParseAll` does for the repeated `filters` field of its List requests.
//!
//! Matching follows containerd to the letter, quirks included, because clients written
//! against containerd rely on them: `!=` and `~=` compare against the empty string when
//! the field is absent (so `labels.x!=y` matches objects without label `x`), while `==`
//! requires the field to be present.
//!
//! Whitespace is allowed where containerd allows it: before a field, an operator or a
//! value, and after `,` or `.`, but not after a selector (`name==a ` and `a ,b` are
//! errors) nor before a `.`. A string of only whitespace is an error; only the empty
//! string means "everything".
//!
//! Quoted strings take Go's escapes (`\n`, `\x41`, `\101`, `\u00e9`, ...) plus the quote
//! character itself, so a regex backslash is doubled inside quotes: `name~=/\\d+/`.
//!
//! `~=` values are compiled with the `regex` crate, whose syntax is RE2's as in Go, with
//! a few differences: `\d`, `\w`, `\s` and `\b` are Unicode-aware rather than ASCII; Go's
//! `\Q…\E` and a bare `{` as a literal are not accepted; `\1`…`\7` are octal rather than
//! errors. Unlike containerd, which accepts an invalid expression and then matches
//! nothing, an invalid one is rejected when the filter is parsed.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::LazyLock;

use regex::{Regex, RegexBuilder};

use crate::error::{Error, Result};
use crate::snapshot::Info;

/// Gives a filter access to an object's fields by path, like containerd's `filters.Adaptor`.
pub trait Adaptor {
    /// The value at `path`, or `None` if the field is not present.
    fn field(&self, path: &[&str]) -> Option<String>;
}

/// Any closure over a field path is an adaptor, like containerd's `AdapterFunc`.
impl<F> Adaptor for F
where
    F: Fn(&[&str]) -> Option<String>,
{
    fn field(&self, path: &[&str]) -> Option<String> {
        self(path)
    }
}

/// Looks `rest` up in a label-like map, the way containerd's adaptors treat `labels.…`:
/// the remaining path is joined with `.`, so `labels.a.b` and `labels."a.b"` name the
/// same key.
pub fn map_field(map: &BTreeMap<String, String>, rest: &[&str]) -> Option<String> {
    map.get(&rest.join(".")).cloned()
}

/// Fields of a snapshot as containerd's `adaptSnapshot` exposes them: `kind`, `name`,
/// `parent` and `labels.<key>`.
///
/// `name`, `kind` and `parent` are always present; a snapshot without a parent has the
/// empty string as parent, so `parent==""` selects the roots.
impl Adaptor for Info {
    fn field(&self, path: &[&str]) -> Option<String> {
        let (first, rest) = path.split_first()?;
        match *first {
            "kind" => Some(self.kind.as_str().to_owned()),
            "name" => Some(self.name.clone()),
            "parent" => Some(self.parent.clone().unwrap_or_default()),
            "labels" => map_field(&self.labels, rest),
            _ => None,
        }
    }
}

/// A parsed filter; `Filter::default()` matches everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// OR of AND-ed selectors. Empty means "match everything": a match-all alternative
    /// absorbs the others, so it is normalised to this form at parse time.
    alternatives: Vec<Vec<Selector>>,
}

/// Most selectors a filter (all its alternatives together) may have.
pub const MAX_SELECTORS: usize = 64;
/// Most bytes of filter text one call may give.
pub const MAX_FILTER_BYTES: usize = 16 * 1024;
/// Most memory one `~=` regular expression may compile to (the `regex` crate's size
/// limit). Real filters need a few KiB; a hostile one (`\w{40}\w{40}` repeated) would
/// otherwise take megabytes and seconds each.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;

impl Filter {
    /// Parses one filter string. The empty string matches everything; anything else,
    /// including a string of only whitespace, must be a valid selector list.
    pub fn parse(expr: &str) -> Result<Filter> {
        if expr.is_empty() {
            return Ok(Filter::default());
        }
        if expr.len() > MAX_FILTER_BYTES {
            return Err(Error::invalid_argument(format!(
                "filter of {} bytes: at most {MAX_FILTER_BYTES}",
                expr.len()
            )));
        }
        let selectors = Parser::new(expr).selectors()?;
        if selectors.len() > MAX_SELECTORS {
            return Err(Error::invalid_argument(format!(
                "filter with {} selectors: at most {MAX_SELECTORS}",
                selectors.len()
            )));
        }
        Ok(Filter { alternatives: vec![selectors] })
    }

    /// Parses several filter strings and ORs them. No strings, or any empty string among
    /// them, matches everything. Every string is checked, so a malformed one is an error
    /// even when another already matches everything.
    pub fn parse_all<S: AsRef<str>>(exprs: &[S]) -> Result<Filter> {
        let bytes: usize = exprs.iter().map(|e| e.as_ref().len()).sum();
        if bytes > MAX_FILTER_BYTES {
            return Err(Error::invalid_argument(format!(
                "filters of {bytes} bytes: at most {MAX_FILTER_BYTES}"
            )));
        }
        let mut alternatives: Vec<Vec<Selector>> = Vec::with_capacity(exprs.len());
        let mut match_all = exprs.is_empty();
        for expr in exprs {
            let filter = Filter::parse(expr.as_ref())?;
            match_all |= filter.is_match_all();
            alternatives.extend(filter.alternatives);
            let selectors: usize = alternatives.iter().map(Vec::len).sum();
            if selectors > MAX_SELECTORS {
                return Err(Error::invalid_argument(format!(
                    "filters with more than {MAX_SELECTORS} selectors in all"
                )));
            }
        }
        if match_all {
            alternatives.clear();
        }
        Ok(Filter { alternatives })
    }

    /// Whether `item` passes the filter.
    pub fn matches(&self, item: &dyn Adaptor) -> bool {
        self.is_match_all()
            || self.alternatives.iter().any(|all| all.iter().all(|s| s.matches(item)))
    }

    /// True if the filter accepts everything by its form (no selectors at all), so a
    /// caller may skip matching. A filter that happens to accept everything only because
    /// of the data (such as `name` on snapshots) is not detected.
    pub fn is_match_all(&self) -> bool {
        self.alternatives.is_empty()
    }
}

impl FromStr for Filter {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Filter::parse(s)
    }
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

impl Selector {
    fn matches(&self, item: &dyn Adaptor) -> bool {
        let path: Vec<&str> = self.path.iter().map(String::as_str).collect();
        let value = item.field(&path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(want) => value.as_deref() == Some(want.as_str()),
            // containerd compares the (empty) value even when the field is absent.
            Op::NotEqual(want) => value.as_deref().unwrap_or("") != want,
            Op::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
        }
    }
}

/// One lexical token. Positions travel alongside as byte offsets into the input.
#[derive(Debug)]
enum Token<'a> {
    Eof,
    Field(&'a str),
    Quoted(&'a str),
    Value(&'a str),
    Separator,
    Operator(&'a str),
    Illegal(&'static str),
    Other(char),
}

impl Token<'_> {
    /// How an unexpected token reads in an error message.
    fn describe(&self) -> String {
        match self {
            Token::Eof => "end of input".to_owned(),
            Token::Field(f) => format!("field {f:?}"),
            // Its control characters escaped, as the other tokens' are (`{:?}`): an
            // error message stays one line, whatever the filter held.
            Token::Quoted(q) => format!("quoted string {}", escape_controls(q)),
            Token::Value(v) => format!("value {v:?}"),
            Token::Separator => "separator".to_owned(),
            Token::Operator(o) => format!("operator {o:?}"),
            Token::Illegal(msg) => (*msg).to_owned(),
            Token::Other(c) => format!("{c:?}"),
        }
    }
}

/// `text` with its control characters written as escapes (`\r`, `\u{b}`).
fn escape_controls(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
        .collect()
}

/// containerd's value characters: Unicode letters, marks, numbers, punctuation and
/// symbols, except the selector separator. Spelled with Unicode classes because the
/// set (it excludes format and private-use characters, for instance) has no `char`
/// method in std.
static VALUE_RUN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[\p{L}\p{M}\p{N}\p{P}\p{S}--,]*").expect("constant pattern is valid")
});

fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn is_operator_char(c: char) -> bool {
    matches!(c, '=' | '!' | '~')
}

/// A tokenizer with containerd's one piece of context: right after an operator, any
/// run of value characters is a value (so `a==b.c-d` keeps `b.c-d` whole), while
/// elsewhere only field characters form a word.
struct Scanner<'a> {
    input: &'a str,
    pos: usize,
    after_operator: bool,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<char> {
        self.input.get(self.pos..).and_then(|rest| rest.chars().next())
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn bump_while(&mut self, keep: impl Fn(char) -> bool) {
        while self.peek().is_some_and(&keep) {
            self.bump();
        }
    }

    fn text(&self, start: usize) -> &'a str {
        self.input.get(start..self.pos).unwrap_or("")
    }

    /// The next token and where it starts. Whitespace before a token is skipped; the
    /// parser's raw `peek` deliberately does not skip it, which is why containerd
    /// rejects whitespace before `,`, `.` and the end of input.
    fn scan(&mut self) -> (usize, Token<'a>) {
        loop {
            let start = self.pos;
            let Some(c) = self.bump() else {
                return (start, Token::Eof);
            };
            let token = match c {
                '\0' => Token::Illegal("unexpected null"),
                '"' | '/' | '|' => match self.scan_quoted(c) {
                    Ok(()) => Token::Quoted(self.text(start)),
                    Err(msg) => Token::Illegal(msg),
                },
                ',' | '.' => {
                    self.after_operator = false;
                    Token::Separator
                }
                c if is_operator_char(c) => {
                    self.bump_while(is_operator_char);
                    self.after_operator = true;
                    Token::Operator(self.text(start))
                }
                c if c.is_whitespace() => continue,
                _ if self.after_operator => {
                    let rest = self.input.get(self.pos..).unwrap_or("");
                    self.pos += VALUE_RUN.find(rest).map_or(0, |m| m.end());
                    self.after_operator = false;
                    Token::Value(self.text(start))
                }
                c if is_field_char(c) => {
                    self.bump_while(is_field_char);
                    Token::Field(self.text(start))
                }
                c => Token::Other(c),
            };
            return (start, token);
        }
    }

    /// Consumes a quoted literal after its opening `quote`, validating escapes as
    /// containerd's scanner does. On failure, reports the first problem seen; the rest
    /// of the literal is still consumed up to its end, as containerd does.
    fn scan_quoted(&mut self, quote: char) -> std::result::Result<(), &'static str> {
        let mut problem: Option<&'static str> = None;
        let mut ch = self.bump();
        loop {
            match ch {
                Some(c) if c == quote => break,
                Some('\0') => return Err(problem.unwrap_or("unexpected null")),
                None | Some('\n') => return Err(problem.unwrap_or("quoted literal not terminated")),
                Some('\\') => ch = self.scan_escape(quote, &mut problem),
                Some(_) => ch = self.bump(),
            }
        }
        problem.map_or(Ok(()), Err)
    }

    /// Consumes an escape after its backslash and returns the character after it.
    fn scan_escape(&mut self, quote: char, problem: &mut Option<&'static str>) -> Option<char> {
        let c = self.bump();
        let digits = match c {
            Some('a' | 'b' | 'f' | 'n' | 'r' | 't' | 'v' | '\\') => return self.bump(),
            Some(c) if c == quote => return self.bump(),
            Some('0'..='7') => (c, 8, 3),
            Some('x') => (self.bump(), 16, 2),
            Some('u') => (self.bump(), 16, 4),
            Some('U') => (self.bump(), 16, 8),
            _ => {
                problem.get_or_insert("illegal escape sequence");
                return c;
            }
        };
        let (mut ch, base, mut left) = digits;
        while left > 0 && ch.and_then(|c| c.to_digit(16)).is_some_and(|d| d < base) {
            ch = self.bump();
            left -= 1;
        }
        if left > 0 {
            problem.get_or_insert("illegal numeric escape sequence");
        }
        ch
    }
}

/// Decodes a quoted literal (quotes included) with containerd's rules: Go escapes, plus
/// `\/` and `\|` inside their own quotes. `\x` and octal escapes produce raw bytes, which
/// must add up to valid UTF-8 here (containerd would accept a string that can never
/// equal a real label; refusing it is clearer).
fn unquote(token: &str) -> std::result::Result<String, &'static str> {
    const SYNTAX: &str = "quote syntax error";
    let quote = token.chars().next().ok_or(SYNTAX)?;
    let body = token
        .strip_prefix(quote)
        .and_then(|t| t.strip_suffix(quote))
        .filter(|_| token.len() >= 2)
        .ok_or(SYNTAX)?;
    if body.contains('\n') {
        return Err(SYNTAX);
    }
    if !body.contains('\\') && !body.contains(quote) {
        return Ok(body.to_owned());
    }
    let mut out = Vec::with_capacity(body.len());
    let mut chars = body.chars();
    let mut utf8 = [0u8; 4];
    while let Some(c) = chars.next() {
        if c == quote {
            return Err(SYNTAX);
        }
        if c != '\\' {
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            continue;
        }
        let escaped = chars.next().ok_or(SYNTAX)?;
        match escaped {
            'a' => out.push(0x07),
            'b' => out.push(0x08),
            'f' => out.push(0x0c),
            'n' => out.push(b'\n'),
            'r' => out.push(b'\r'),
            't' => out.push(b'\t'),
            'v' => out.push(0x0b),
            '\\' => out.push(b'\\'),
            '"' | '/' | '|' if escaped == quote => out.push(escaped as u8),
            'x' => out.push(byte(take_digits(&mut chars, 2, 16)?)?),
            'u' | 'U' => {
                let n = if escaped == 'u' { 4 } else { 8 };
                let v = take_digits(&mut chars, n, 16)?;
                if v > u32::from(char::MAX) {
                    return Err(SYNTAX);
                }
                // Go encodes a surrogate code point as the replacement character.
                let c = char::from_u32(v).unwrap_or(char::REPLACEMENT_CHARACTER);
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
            '0'..='7' => {
                let high = escaped.to_digit(8).ok_or(SYNTAX)?;
                let low = take_digits(&mut chars, 2, 8)?;
                out.push(byte(high * 64 + low)?);
            }
            _ => return Err(SYNTAX),
        }
    }
    String::from_utf8(out).map_err(|_| "quoted string is not valid UTF-8")
}

fn take_digits(
    chars: &mut std::str::Chars<'_>,
    n: usize,
    radix: u32,
) -> std::result::Result<u32, &'static str> {
    (0..n).try_fold(0u32, |v, _| {
        let d = chars.next().and_then(|c| c.to_digit(radix)).ok_or("quote syntax error")?;
        Ok(v * radix + d)
    })
}

fn byte(v: u32) -> std::result::Result<u8, &'static str> {
    u8::try_from(v).map_err(|_| "quote syntax error")
}

/// A recursive-descent parser over [`Scanner`], one filter string at a time.
struct Parser<'a> {
    input: &'a str,
    scanner: Scanner<'a>,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser { input, scanner: Scanner { input, pos: 0, after_operator: false } }
    }

    fn error(&self, pos: usize, msg: impl std::fmt::Display) -> Error {
        Error::invalid_argument(format!("filter {:?}: {msg} at position {pos}", self.input))
    }

    fn selectors(&mut self) -> Result<Vec<Selector>> {
        let mut all = vec![self.selector()?];
        loop {
            match self.scanner.peek() {
                None => return Ok(all),
                Some(',') => {
                    self.scanner.scan();
                    all.push(self.selector()?);
                }
                Some(c) => return Err(self.error(self.scanner.pos, format!("unexpected {c:?}"))),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector> {
        let path = self.fieldpath()?;
        if matches!(self.scanner.peek(), None | Some(',')) {
            return Ok(Selector { path, op: Op::Present });
        }
        let (pos, token) = self.scanner.scan();
        let operator = match token {
            Token::Operator(op @ ("==" | "!=" | "~=")) => op,
            Token::Operator(other) => {
                return Err(self.error(pos, format!("unsupported operator {other:?}")));
            }
            Token::Illegal(msg) => return Err(self.error(pos, msg)),
            other => {
                let found = other.describe();
                return Err(self.error(
                    pos,
                    format!(r#"expected an operator ("==", "!=" or "~="), found {found}"#),
                ));
            }
        };
        let (pos, token) = self.scanner.scan();
        let value = match token {
            Token::Value(v) | Token::Field(v) => v.to_owned(),
            Token::Quoted(q) => self.unquote(pos, q, operator == "~=")?,
            Token::Illegal(msg) => return Err(self.error(pos, msg)),
            other => {
                let found = other.describe();
                return Err(
                    self.error(pos, format!("expected value or quoted string, found {found}"))
                );
            }
        };
        let op = match operator {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            // Octal escapes are on because Go's RE2 syntax has them (`\0`, `\123`).
            _ => match RegexBuilder::new(&value)
                .octal(true)
                .size_limit(REGEX_SIZE_LIMIT)
                .dfa_size_limit(REGEX_SIZE_LIMIT)
                .build()
            {
                Ok(re) => Op::Matches(re),
                Err(e) => {
                    let problem = regex_problem(&e);
                    return Err(
                        self.error(pos, format!("invalid regular expression {value:?}: {problem}"))
                    );
                }
            },
        };
        Ok(Selector { path, op })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>> {
        let mut path = vec![self.field()?];
        while self.scanner.peek() == Some('.') {
            self.scanner.scan();
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String> {
        let (pos, token) = self.scanner.scan();
        match token {
            Token::Field(f) => Ok(f.to_owned()),
            Token::Quoted(q) => self.unquote(pos, q, false),
            Token::Illegal(msg) => Err(self.error(pos, msg)),
            other => {
                let found = other.describe();
                Err(self.error(pos, format!("expected field or quoted string, found {found}")))
            }
        }
    }

    /// Decodes a quoted token; `/…/` and `|…|` are reserved for regular expressions.
    fn unquote(&self, pos: usize, quoted: &str, alternative_quotes: bool) -> Result<String> {
        if !alternative_quotes && !quoted.starts_with('"') {
            return Err(self.error(pos, "invalid quote encountered"));
        }
        unquote(quoted).map_err(|msg| self.error(pos, format!("unquoting failed: {msg}")))
    }
}

/// The regex crate's syntax errors span several lines (pattern, caret, message); an
/// error message travelling over gRPC wants just the message.
fn regex_problem(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .find_map(|l| l.strip_prefix("error: "))
        .map_or_else(|| text.replace('\n', " "), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::snapshot::Kind;

    /// An object like the one containerd's own filter tests use: `name` and `other` are
    /// present when non-empty, labels by joined key.
    #[derive(Debug, Default)]
    struct Entry {
        name: &'static str,
        other: &'static str,
        labels: &'static [(&'static str, &'static str)],
    }

    impl Adaptor for Entry {
        fn field(&self, path: &[&str]) -> Option<String> {
            let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
            match path.split_first()? {
                (&"name", _) => non_empty(self.name),
                (&"other", _) => non_empty(self.other),
                (&"labels", rest) => {
                    let key = rest.join(".");
                    self.labels.iter().find(|(k, _)| *k == key).map(|(_, v)| (*v).to_owned())
                }
                _ => None,
            }
        }
    }

    fn corpus() -> Vec<Entry> {
        vec![
            Entry { name: "foo", labels: &[("foo", "true")], ..Default::default() },
            Entry { name: "bar", ..Default::default() },
            Entry {
                name: "foo",
                labels: &[("foo", "present"), ("more complex label", "present")],
                ..Default::default()
            },
            Entry { name: "bar", labels: &[("bar", "true")], ..Default::default() },
            Entry {
                name: "fooer",
                labels: &[("more complex label with \\ and \"", "present")],
                ..Default::default()
            },
            Entry {
                name: "fooer",
                labels: &[("more complex label with \\ and \".post", "present")],
                ..Default::default()
            },
            Entry { name: "baz", other: "too complex, yo", ..Default::default() },
            Entry { name: "bazo", other: "abc", ..Default::default() },
            Entry {
                name: "compound",
                labels: &[("foo", "omg_asdf.asdf-qwer")],
                ..Default::default()
            },
            Entry {
                name: "a|b",
                labels: &[("containerd.io/gc.root", "2024")],
                ..Default::default()
            },
        ]
    }

    /// Indices of the corpus entries `filter` selects.
    fn select(filter: &Filter) -> Vec<usize> {
        corpus().iter().enumerate().filter(|(_, e)| filter.matches(*e)).map(|(i, _)| i).collect()
    }

    fn hits(expr: &str) -> Vec<usize> {
        match Filter::parse(expr) {
            Ok(f) => select(&f),
            Err(e) => panic!("{expr:?} should parse: {e}"),
        }
    }

    /// The error message for a filter that must not parse.
    fn invalid(expr: &str) -> String {
        match Filter::parse(expr) {
            Ok(f) => panic!("{expr:?} should not parse, got {f:?}"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{expr:?}: {e}");
                e.message().to_owned()
            }
        }
    }

    fn paths(expr: &str) -> Vec<Vec<String>> {
        let f = Filter::parse(expr).expect("parses");
        f.alternatives.iter().flatten().map(|s| s.path.clone()).collect()
    }

    const ALL: [usize; 10] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];

    #[test]
    fn empty_and_default_match_everything() {
        assert!(Filter::default().is_match_all());
        assert_eq!(select(&Filter::default()), ALL);
        let f = Filter::parse("").expect("empty parses");
        assert!(f.is_match_all());
        assert_eq!(select(&f), ALL);
        assert!(!Filter::parse("name").expect("parses").is_match_all());
    }

    #[test]
    fn presence() {
        assert_eq!(hits("name"), ALL);
        assert_eq!(hits("labels.foo"), [0, 2, 8]);
        assert_eq!(hits("labels.foo,name"), [0, 2, 8]);
        assert_eq!(hits("other"), [6, 7]);
        assert_eq!(hits("nosuchfield"), [] as [usize; 0]);
    }

    #[test]
    fn equal() {
        assert_eq!(hits("name==bar"), [1, 3]);
        assert_eq!(hits("labels.foo==true"), [0]);
        assert_eq!(hits("labels.foo==omg_asdf.asdf-qwer"), [8]);
        assert_eq!(hits("name==bar,labels.bar==true"), [3]);
        assert_eq!(hits("name==bar,labels.bar==wrong"), [] as [usize; 0]);
        // == needs the field present, even against the empty string.
        assert_eq!(hits(r#"other=="""#), [] as [usize; 0]);
    }

    #[test]
    fn not_equal_treats_absent_as_empty() {
        assert_eq!(hits("name!=bar"), [0, 2, 4, 5, 6, 7, 8, 9]);
        // Entries without label foo pass, as in containerd.
        assert_eq!(hits("labels.foo!=true"), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(hits(r#"other!="""#), [6, 7]);
    }

    #[test]
    fn regex() {
        assert_eq!(hits("other~=[abc]+,name!=foo"), [6, 7]);
        assert_eq!(hits("other~=/[abc]+/,name!=foo"), [6, 7]);
        assert_eq!(hits("other~=/[abc]{1,2}/,name!=foo"), [6, 7]);
        assert_eq!(hits("other~=|[abc]{1,2}|"), [6, 7]);
        assert_eq!(hits(r#"other~="^too""#), [6]);
        assert_eq!(hits("name~=^ba"), [1, 3, 6, 7]);
        assert_eq!(hits("name~=^foo$"), [0, 2]);
        assert_eq!(hits(r"name~=^foo\w+"), [4, 5]);
        // Valid syntax that matches nothing; `\/` is an escaped slash inside slashes.
        assert_eq!(hits(r#"other~=/[abc]{0,1}"\//,name!=foo"#), [] as [usize; 0]);
        // An absent field is matched as the empty string.
        assert_eq!(hits("other~=^$"), [0, 1, 2, 3, 4, 5, 8, 9]);
    }

    #[test]
    fn regex_quote_forms_and_escapes() {
        let f = Filter::parse(r"name~=/a\/b/").expect("parses");
        assert!(f.matches(&|_: &[&str]| Some("xa/by".to_owned())));
        let f = Filter::parse(r"name~=|a\|b|").expect("parses");
        // The unescaped pipe is the regex's alternation.
        assert!(f.matches(&|_: &[&str]| Some("b".to_owned())));
        assert!(!f.matches(&|_: &[&str]| Some("c".to_owned())));
        let f = Filter::parse(r"name~=/a\\|b/").expect("parses");
        assert!(f.matches(&|_: &[&str]| Some("a|b".to_owned())));
        assert!(!f.matches(&|_: &[&str]| Some("b".to_owned())));
        assert_eq!(hits("name~=|牛|"), [] as [usize; 0]);
    }

    #[test]
    fn invalid_regex_is_rejected_at_parse_time() {
        let msg = invalid("name~=[abc");
        assert!(
            msg.starts_with(r#"filter "name~=[abc": invalid regular expression "[abc""#),
            "{msg}"
        );
        assert!(msg.ends_with("at position 6"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        invalid("name~=/(/");
        invalid("name~=a{2,1}");
    }

    #[test]
    fn quoted_values() {
        assert_eq!(hits(r#"other=="too complex, yo""#), [6]);
        assert_eq!(hits(r#"name=="a|b""#), [9]);
        let value = |expr: &str| match &Filter::parse(expr).expect("parses").alternatives[0][0].op {
            Op::Equal(v) | Op::NotEqual(v) => v.clone(),
            Op::Matches(re) => re.as_str().to_owned(),
            Op::Present => panic!("no value"),
        };
        assert_eq!(value(r#"a=="x\ny""#), "x\ny");
        assert_eq!(value(r#"a=="\a\b\f\n\r\t\v\\\"""#), "\x07\x08\x0c\n\r\t\x0b\\\"");
        assert_eq!(value(r#"a=="\x41\102\u00e9\U0001F600""#), "AB\u{e9}\u{1F600}");
        // Byte escapes combine into UTF-8.
        assert_eq!(value(r#"a=="\xc3\xa9""#), "\u{e9}");
        assert_eq!(value(r#"a=="\x00""#), "\0");
        // Go turns a surrogate into the replacement character.
        assert_eq!(value(r#"a=="\ud800""#), "\u{fffd}");
        assert_eq!(value(r#"a=="牛""#), "牛");
        assert_eq!(value(r#"a=="""#), "");
        assert_eq!(value(r#"a=="/|'""#), "/|'");
        // Only Go escapes are allowed in quotes, so a regex backslash is doubled there.
        assert_eq!(value(r"a~=/\\d+/"), r"\d+");
        assert!(invalid(r"a~=/\d+/").contains("illegal escape sequence"));
    }

    #[test]
    fn unquoted_values() {
        let value = |expr: &str| match &Filter::parse(expr).expect("parses").alternatives[0][0].op {
            Op::Equal(v) => v.clone(),
            _ => panic!("not =="),
        };
        assert_eq!(value("a==b.c-d_e"), "b.c-d_e");
        // `|`, `=`, `"` and `/` inside an unquoted value are just characters.
        assert_eq!(value("a==b|c==d"), "b|c==d");
        assert_eq!(value(r#"a==x"y"#), r#"x"y"#);
        assert_eq!(value("a==x/y"), "x/y");
        assert_eq!(value("a==牛"), "牛");
        assert_eq!(value(r"a==\n"), r"\n");
        assert_eq!(value("a==1.0"), "1.0");
        assert_eq!(hits("name==a|b"), [9]);
    }

    #[test]
    fn quoted_field_paths() {
        assert_eq!(hits(r#"name==foo,labels."more complex label""#), [2]);
        assert_eq!(hits(r#"labels."more complex label with \\ and \""==present"#), [4]);
        assert_eq!(hits(r#"labels."more complex label with \\ and \"".post==present"#), [5]);
        assert_eq!(hits(r#"labels."containerd.io/gc.root"==2024"#), [9]);
        assert_eq!(paths(r#"labels."a.b""#), [["labels", "a.b"]]);
        assert_eq!(paths(r#""leading quote".postquote==value"#), [["leading quote", "postquote"]]);
        assert_eq!(paths("a.b.c,_x.9"), [vec!["a", "b", "c"], vec!["_x", "9"]]);
    }

    #[test]
    fn whitespace_like_containerd() {
        assert_eq!(hits("name == bar"), [1, 3]);
        assert_eq!(hits(" \tname==bar"), [1, 3]);
        assert_eq!(hits("name==bar,  labels.bar"), [3]);
        assert_eq!(hits("name==\u{3000}bar"), [1, 3]);
        assert_eq!(paths("labels. foo"), [["labels", "foo"]]);
        // Whitespace right after a selector, or before a `.`, is not allowed.
        for expr in ["name==bar ", "name ", "name==bar ,name", "name ,x", "labels .foo", " ", "\n"]
        {
            invalid(expr);
        }
    }

    #[test]
    fn hostile_filters_fail_fast_as_invalid_arguments() {
        let started = std::time::Instant::now();
        let one = r"a~=\w{40}\w{40}";
        let e = Filter::parse(one).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument, "{e}");
        let many = vec![one; 400];
        assert_eq!(Filter::parse_all(&many).unwrap_err().kind(), crate::ErrorKind::InvalidArgument);
        let joined = many.join(",");
        assert_eq!(Filter::parse(&joined).unwrap_err().kind(), crate::ErrorKind::InvalidArgument);
        let selectors = vec!["a==b"; MAX_SELECTORS + 1].join(",");
        assert!(Filter::parse(&selectors).unwrap_err().to_string().contains("selectors"));
        assert!(
            started.elapsed() < std::time::Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
        // Real filters still parse.
        Filter::parse(r#"name~=^extract-[0-9a-f]{12}$,labels."a.b"==c"#).unwrap();
    }

    #[test]
    fn parse_all_ors() {
        let f = Filter::parse_all(&["name==foo", "name==bar"]).expect("parses");
        assert_eq!(select(&f), [0, 1, 2, 3]);
        let f = Filter::parse_all(&["name==foo,labels.foo==true", "labels.bar"]).expect("parses");
        assert_eq!(select(&f), [0, 3]);
        let none: [&str; 0] = [];
        assert!(Filter::parse_all(&none).expect("parses").is_match_all());
        let f = Filter::parse_all(&[String::new(), "name==x".to_owned()]).expect("parses");
        assert!(f.is_match_all());
        assert_eq!(select(&f), ALL);
        // Every string is checked, even after a match-all one.
        assert!(Filter::parse_all(&["", "name=="]).is_err());
        let msg = Filter::parse_all(&["name==x", "kind=="]).expect_err("bad").to_string();
        assert_eq!(
            msg,
            r#"filter "kind==": expected value or quoted string, found end of input at position 6: invalid argument"#
        );
    }

    #[test]
    fn error_messages_name_input_and_position() {
        let cases = [
            ("name==foo,", "expected field or quoted string, found end of input at position 10"),
            ("labels.", "expected field or quoted string, found end of input at position 7"),
            ("labels.|foo|==x", "invalid quote encountered at position 7"),
            (
                r#"labels.?"x".post==present"#,
                "expected field or quoted string, found '?' at position 7",
            ),
            ("image~=,id?=?fbaq", "expected value or quoted string, found separator at position 7"),
            ("labels.ns/key==value", "quoted literal not terminated at position 9"),
            ("labels.key==/value", "quoted literal not terminated at position 12"),
            ("labels.key==/value/", "invalid quote encountered at position 12"),
            ("labels.key!=|value|", "invalid quote encountered at position 12"),
            ("labels.key~=/value", "quoted literal not terminated at position 12"),
            ("name=foo", r#"unsupported operator "=" at position 4"#),
            ("name===foo", r#"unsupported operator "===" at position 4"#),
            ("name!~foo", r#"unsupported operator "!~" at position 4"#),
            (
                "name foo",
                r#"expected an operator ("==", "!=" or "~="), found field "foo" at position 5"#,
            ),
            ("name==a b", "unexpected ' ' at position 7"),
            ("name==", "expected value or quoted string, found end of input at position 6"),
            ("name==.x", "expected value or quoted string, found separator at position 6"),
            ("name==!x", r#"unsupported operator "==!" at position 4"#),
            ("foo\0bar", "unexpected null at position 3"),
            ("foo==bar\0", "unexpected '\\0' at position 8"),
            (r#"labels."\g""#, "illegal escape sequence at position 7"),
            (r#"labels."\xaz""#, "illegal numeric escape sequence at position 7"),
            (r#"labels."\'""#, "illegal escape sequence at position 7"),
            (r#"a=="\/""#, "illegal escape sequence at position 3"),
            (r#"a=="\777""#, "unquoting failed: quote syntax error at position 3"),
            (r#"a=="\UFFFFFFFF""#, "unquoting failed: quote syntax error at position 3"),
            (r#"a=="\xff""#, "unquoting failed: quoted string is not valid UTF-8 at position 3"),
            ("labels.\"a\nb\"==c", "quoted literal not terminated at position 7"),
            ("a==\"x\0\"", "unexpected null at position 3"),
            ("-", "expected field or quoted string, found '-' at position 0"),
            ("==x", r#"expected field or quoted string, found operator "==" at position 0"#),
            (",", "expected field or quoted string, found separator at position 0"),
            ("a,,b", "expected field or quoted string, found separator at position 2"),
            ("a..b", "expected field or quoted string, found separator at position 2"),
            ("牛==x", "expected field or quoted string, found '牛' at position 0"),
        ];
        for (expr, want) in cases {
            let msg = invalid(expr);
            assert_eq!(msg, format!("filter {expr:?}: {want}"), "{expr:?}");
        }
    }

    #[test]
    fn errors_about_a_quoted_string_stay_one_line() {
        // Found by fuzzing: a quoted token was repeated raw, carriage returns and all.
        let msg = invalid("na|x\ry|");
        assert!(msg.ends_with(r"found quoted string |x\ry| at position 2"), "{msg}");
        assert!(!msg.chars().any(char::is_control), "{msg}");
    }

    #[test]
    fn more_malformed_inputs() {
        for expr in [
            "\"",
            "\"\\",
            "a==\"",
            "a==\"\\",
            "a==\"\\x",
            "a==\"\\u12\"",
            "a==\"\\U0001F60\"",
            "a==\"\\12\"",
            "a~=|x",
            "a~=/x\\",
            "a==\"x\"y",
            "a==\"x\" ",
            "a==\"x\",",
            "a\"b\"==c",
            "a.\"\"\"",
            "a.",
            ".a",
            "a==b,",
            "a==b,\0",
            "~",
            "a~",
            "a!",
            "a==b\u{200b}",
            "a==\u{2028}",
            "a\u{00a0}",
        ] {
            invalid(expr);
        }
    }

    #[test]
    fn value_characters_follow_unicode_classes() {
        // Format characters end an unquoted value, so what follows is unexpected.
        assert!(invalid("a==b\u{200b}c").contains("at position 4"));
        // Symbols, marks and other scripts are value characters.
        let f = Filter::parse("a==€e\u{301}ש✓").expect("parses");
        assert!(f.matches(&|_: &[&str]| Some("€e\u{301}ש✓".to_owned())));
        // A value may start with a character that cannot continue it, as in containerd.
        assert!(Filter::parse("a==\u{1}").is_ok());
    }

    #[test]
    fn quoted_value_before_separator_resets_value_mode() {
        assert_eq!(hits(r#"name=="bar",labels.bar"#), [3]);
        assert_eq!(hits(r#"name~=/^ba/,other==abc"#), [7]);
    }

    fn info(name: &str, parent: Option<&str>, kind: Kind, labels: &[(&str, &str)]) -> Info {
        let mut i = Info::new(name, parent.map(str::to_owned), kind);
        i.labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        i
    }

    #[test]
    fn snapshot_info_fields() {
        let snaps = [
            info("base", None, Kind::Committed, &[("containerd.io/gc.root", "x")]),
            info("work", Some("base"), Kind::Active, &[("a.b", "c"), ("team", "blue")]),
            info("peek", Some("base"), Kind::View, &[]),
        ];
        let pick = |expr: &str| -> Vec<&str> {
            let f = Filter::parse(expr).expect("parses");
            snaps.iter().filter(|s| f.matches(*s)).map(|s| s.name.as_str()).collect()
        };
        assert_eq!(pick("kind==committed"), ["base"]);
        assert_eq!(pick("kind==active"), ["work"]);
        assert_eq!(pick("kind==view"), ["peek"]);
        assert_eq!(pick("kind!=view"), ["base", "work"]);
        assert_eq!(pick("name==work"), ["work"]);
        assert_eq!(pick("parent==base"), ["work", "peek"]);
        // Parent is always present, empty for roots, as in containerd.
        assert_eq!(pick("parent"), ["base", "work", "peek"]);
        assert_eq!(pick(r#"parent=="""#), ["base"]);
        assert_eq!(pick(r#"parent!="""#), ["work", "peek"]);
        assert_eq!(pick(r#"labels."a.b"==c"#), ["work"]);
        assert_eq!(pick("labels.a.b==c"), ["work"]);
        assert_eq!(pick(r#"labels."containerd.io/gc.root""#), ["base"]);
        assert_eq!(pick("labels.team~=^bl,kind==active"), ["work"]);
        assert_eq!(pick("labels"), [] as [&str; 0]);
        assert_eq!(pick("created"), [] as [&str; 0]);
        assert_eq!(pick("kind.extra"), ["base", "work", "peek"]);
        let f = Filter::parse_all(&["kind==view", "labels.team==blue"]).expect("parses");
        assert_eq!(snaps.iter().filter(|s| f.matches(*s)).count(), 2);
        assert_eq!(snaps[0].field(&[]), None);
        assert_eq!(snaps[1].field(&["parent"]).as_deref(), Some("base"));
    }

    #[test]
    fn from_str_and_closure_adaptor() {
        let f: Filter = "name==x".parse().expect("parses");
        assert!(f.matches(&|p: &[&str]| (p == ["name"]).then(|| "x".to_owned())));
        assert!("name==".parse::<Filter>().is_err());
    }

    /// A tiny deterministic generator, so the no-panic sweep needs no extra crates.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n as u64).unwrap_or(0)
        }
    }

    #[test]
    fn never_panics_on_odd_input() {
        const PIECES: &[&str] = &[
            "a", "name", "labels", "_", "9", ".", ",", "=", "==", "!=", "~=", "!", "~", "\"", "/",
            "|", "\\", "\\x", "\\u", "\\U", "\\0", "7", "f", "F", "z", " ", "\t", "\n", "\0", "牛",
            "é", "\u{200b}", "\u{3000}", "[", "]", "(", ")", "*", "+", "{", "}", "?", "'", "`",
            "\\\"", "\\/", "\\|", "\\\\", "\\n",
        ];
        let item = info("n", Some("p"), Kind::Active, &[("a", "b"), ("a.b", "c")]);
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut parsed = 0;
        for _ in 0..30_000 {
            let len = rng.below(16);
            let expr: String = (0..len).map(|_| PIECES[rng.below(PIECES.len())]).collect();
            if let Ok(f) = Filter::parse(&expr) {
                parsed += 1;
                let _ = f.matches(&item);
            }
        }
        assert!(parsed > 100, "the sweep should reach the matcher too ({parsed})");
        for _ in 0..5_000 {
            let bytes: Vec<u8> = (0..rng.below(24)).map(|_| rng.next().to_le_bytes()[0]).collect();
            let expr = String::from_utf8_lossy(&bytes);
            if let Ok(f) = Filter::parse_all(&[expr.as_ref(), "name"]) {
                let _ = f.matches(&item);
            }
        }
    }
}
