//! The JSON configuration `lifecycle.init` receives, which picks the misbehaviour.

use std::sync::{Mutex, PoisonError};

use serde_json::{Map, Value};

use crate::bindings::wasnap::snapshotter::types::Error;

/// What `list` does wrong in mode `huge-walk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    /// One page of this many infos, whatever the limit.
    Huge(u32),
    /// Always a full page of ever greater names, so the walk never ends.
    Endless,
    /// Full pages whose names are all smaller than `after`: the walk goes backwards.
    Unordered,
    /// Full pages whose names descend within the page.
    Descending,
}

/// How the plugin behaves on snapshotter calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Good,
    Spin,
    /// Waits on the clock for ever, in the host, where no epoch deadline reaches it.
    Sleep,
    Hog,
    Panic,
    /// prepare, view and mounts return a mount picked by the end of the key.
    BadMount,
    HugeWalk(Walk),
    SlowInit,
    /// `init` waits on the clock for ever.
    SleepInit,
    BadInit,
    /// Writes this many bytes to stdout and as many to stderr, then behaves well.
    Stdout(usize),
    /// `usage` reports `u64::MAX` bytes and inodes.
    HugeUsage,
    /// Fails with an error message this long, claiming to be another plugin's, with
    /// forged log lines in it.
    FloodError(usize),
    /// Opens files in its private directory, keeping them, until refused.
    FdBomb,
    /// Fills its private directory, one way at a time, until refused; then empties it
    /// and writes again.
    DiskBomb,
    /// Calls one host function on the victim layer this many times.
    Hammer(Op, u32),
    /// Tries every way it has to name, rename or replace a layer or its ancestors.
    Ancestors,
}

/// The host function mode `hammer` calls, on the path `victim` of the victim layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    ReadDir,
    ReadFile,
    WriteFile,
    MakeDir,
    Symlink,
    RemoveEntry,
    SetMode,
    SetOwner,
    SetXattr,
    GetXattr,
    MakeWhiteout,
    /// Clones the victim layer and removes the clone.
    Clone,
    /// Measures the victim layer.
    Usage,
    /// Swaps `victim` in the victim layer for a symlink leading out and back, as a second
    /// instance racing the first would.
    Swap,
    /// Clones the victim layer and keeps the clone.
    Hoard,
}

impl Op {
    pub fn parse(name: &str) -> Option<Op> {
        Some(match name {
            "read-dir" => Op::ReadDir,
            "read-file" => Op::ReadFile,
            "write-file" => Op::WriteFile,
            "make-dir" => Op::MakeDir,
            "symlink" => Op::Symlink,
            "remove-entry" => Op::RemoveEntry,
            "set-mode" => Op::SetMode,
            "set-owner" => Op::SetOwner,
            "set-xattr" => Op::SetXattr,
            "get-xattr" => Op::GetXattr,
            "make-whiteout" => Op::MakeWhiteout,
            "clone" => Op::Clone,
            "usage" => Op::Usage,
            "swap" => Op::Swap,
            "hoard" => Op::Hoard,
            _ => return None,
        })
    }
}

/// The parsed configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    /// When set, only calls with a key or name containing this string misbehave, so one
    /// instance can fail a call and then serve the next one.
    pub only: Option<String>,
    /// Where the symlinks mode `hammer` makes point (a path outside the layer).
    pub target: Option<String>,
}

const DEFAULT_WALK: u32 = 1_000_000;
const DEFAULT_NOISE: usize = 10 << 20;

static CONFIG: Mutex<Option<Config>> = Mutex::new(None);

/// The configuration `init` stored; `good` before `init` has run.
pub fn get() -> Config {
    let config = CONFIG.lock().unwrap_or_else(PoisonError::into_inner);
    config.clone().unwrap_or(Config { mode: Mode::Good, only: None, target: None })
}

pub fn set(config: Config) {
    *CONFIG.lock().unwrap_or_else(PoisonError::into_inner) = Some(config);
}

impl Config {
    /// Parses the JSON `init` receives: `null`, or an object with `mode` and the
    /// options of that mode.
    pub fn parse(json: &str) -> Result<Self, Error> {
        let invalid =
            |why: String| Error::InvalidArgument(format!("adversary: config {json}: {why}"));
        let value: Value = serde_json::from_str(json).map_err(|e| invalid(e.to_string()))?;
        let object = match value {
            Value::Null => return Ok(Self { mode: Mode::Good, only: None, target: None }),
            Value::Object(object) => object,
            other => return Err(invalid(format!("expected null or an object, got {other}"))),
        };
        let mode = match string(&object, "mode").map_err(&invalid)? {
            None | Some("good") => Mode::Good,
            Some("spin") => Mode::Spin,
            Some("sleep") => Mode::Sleep,
            Some("hog") => Mode::Hog,
            Some("panic") => Mode::Panic,
            Some("bad-mount") => Mode::BadMount,
            Some("flood-error") => {
                let bytes = number(&object, "bytes").map_err(&invalid)?.unwrap_or(1 << 20);
                Mode::FloodError(
                    usize::try_from(bytes).map_err(|e| invalid(format!("bytes: {e}")))?,
                )
            }
            Some("fd-bomb") => Mode::FdBomb,
            Some("disk-bomb") => Mode::DiskBomb,
            Some("huge-usage") => Mode::HugeUsage,
            Some("ancestors") => Mode::Ancestors,
            Some("hammer") => {
                let op = string(&object, "op").map_err(&invalid)?.unwrap_or("");
                let op = Op::parse(op).ok_or_else(|| invalid(format!("unknown op {op:?}")))?;
                let n = number(&object, "iterations").map_err(&invalid)?.unwrap_or(1000);
                Mode::Hammer(op, u32::try_from(n).map_err(|e| invalid(format!("iterations: {e}")))?)
            }
            Some("huge-walk") => Mode::HugeWalk(walk(&object).map_err(&invalid)?),
            Some("slow-init") => Mode::SlowInit,
            Some("sleep-init") => Mode::SleepInit,
            Some("bad-init") => Mode::BadInit,
            Some("stdout") => {
                let bytes = number(&object, "bytes").map_err(&invalid)?;
                let bytes = bytes.map_or(Ok(DEFAULT_NOISE), usize::try_from);
                Mode::Stdout(bytes.map_err(|e| invalid(format!("bytes: {e}")))?)
            }
            Some(other) => return Err(invalid(format!("unknown mode {other:?}"))),
        };
        let only = string(&object, "only").map_err(&invalid)?.map(str::to_owned);
        let target = string(&object, "target").map_err(&invalid)?.map(str::to_owned);
        Ok(Self { mode, only, target })
    }
}

fn walk(object: &Map<String, Value>) -> Result<Walk, String> {
    Ok(match string(object, "pages")? {
        None | Some("huge") => {
            let count = number(object, "count")?.map_or(Ok(DEFAULT_WALK), u32::try_from);
            Walk::Huge(count.map_err(|e| format!("count: {e}"))?)
        }
        Some("endless") => Walk::Endless,
        Some("unordered") => Walk::Unordered,
        Some("descending") => Walk::Descending,
        Some(other) => return Err(format!("unknown pages {other:?}")),
    })
}

fn string<'a>(object: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, String> {
    match object.get(field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("{field} must be a string, got {other}")),
    }
}

fn number(object: &Map<String, Value>, field: &str) -> Result<Option<u64>, String> {
    match object.get(field) {
        None => Ok(None),
        Some(value) => value
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{field} must be a whole number, got {value}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_mode() {
        let mode = |json: &str| Config::parse(json).map(|c| c.mode).ok();
        assert_eq!(mode("null"), Some(Mode::Good));
        assert_eq!(mode(r#"{"mode":"good"}"#), Some(Mode::Good));
        assert_eq!(mode(r#"{"mode":"spin"}"#), Some(Mode::Spin));
        assert_eq!(mode(r#"{"mode":"huge-walk"}"#), Some(Mode::HugeWalk(Walk::Huge(1_000_000))));
        assert_eq!(
            mode(r#"{"mode":"huge-walk","pages":"endless"}"#),
            Some(Mode::HugeWalk(Walk::Endless))
        );
        assert_eq!(mode(r#"{"mode":"stdout","bytes":5}"#), Some(Mode::Stdout(5)));
        assert_eq!(mode(r#"{"mode":"stdout"}"#), Some(Mode::Stdout(10 << 20)));
    }

    #[test]
    fn refuses_nonsense() {
        for json in
            ["", "3", r#"{"mode":"nap"}"#, r#"{"mode":7}"#, r#"{"mode":"stdout","bytes":-1}"#]
        {
            assert!(matches!(Config::parse(json), Err(Error::InvalidArgument(_))), "{json}");
        }
    }

    #[test]
    fn keeps_only() {
        let config = Config::parse(r#"{"mode":"panic","only":"bad"}"#).unwrap();
        assert_eq!(config.only.as_deref(), Some("bad"));
    }
}
