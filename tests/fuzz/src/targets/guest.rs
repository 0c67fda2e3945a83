//! `guest`: what a guest returns, at the WIT boundary, as the adapter converts it
//! (`wasnap::plugin::fuzzing`, the crate's own functions): mounts naming layers, a
//! walk page's infos (matched against a filter, as `walk` does), errors, usage, and
//! its output and log lines.
//!
//! Why in process rather than through a guest: every byte a guest returns reaches the
//! host through these functions, and calling them directly runs tens of thousands of
//! inputs a second where a guest call costs a store and an instance; the adversary
//! guest's fixed attacks (`host/tests/all/plugin/sandbox.rs`) cover the path in
//! between (lifting, traps, deadlines). The page-level checks of a walk (length and
//! order, inline in `WasmSnapshotter::walk`) are covered there, not here.
//!
//! Properties: mounts resolve exactly when a model of the rules says they may (only
//! layers this call may use, each once, 1..=500 lowers, at most 64 mounts, `passed`
//! within range), into mounts naming only the host's own paths for those layers and
//! only the host's options, and are refused with invalid-argument otherwise; errors
//! keep their class, name the plugin (another plugin only when the error is one its
//! next snapshotter returned in the call), are bounded and carry no control character;
//! infos keep every field (labels: the last of a repeated key) and nonsense times do
//! not panic; output and log lines are bounded, escaped, and within the call's budget.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbitrary::{Arbitrary, Unstructured};
use serde::{Deserialize, Serialize};
use wasnap::plugin::Space;
use wasnap::plugin::fuzzing::{self as fz, wit};
use wasnap::{ErrorKind, Filter, Mount};

use crate::engine::{Mutator, Outcome, Target};
use crate::input::{below, decode, encode, one_in, pick, string};

/// The target.
pub const TARGET: Target = Target {
    name: "guest",
    about: "a guest's mounts, walk pages, errors, usage and output at the WIT boundary",
    run,
    generate,
    mutate,
    seeds,
    dictionary: &["plugin \"", "\n", "\r", "\u{1b}[2J", "\t", "é", "\0", "\u{85}"],
    contained_panics: &[],
    known: &[],
    timeout: Duration::from_secs(10),
};

/// One input: what a guest returned during one call.
#[derive(Debug, Clone, Default, Serialize, Deserialize, Arbitrary)]
pub struct Input {
    /// The plugin's name, as the host knows it.
    #[serde(default)]
    pub plugin: String,
    /// Errors it returned.
    #[serde(default)]
    pub errors: Vec<GuestError>,
    /// A page of a walk.
    #[serde(default)]
    pub page: Vec<GuestInfo>,
    /// The walk's filter.
    #[serde(default)]
    pub filter: String,
    /// Mounts it returned.
    #[serde(default)]
    pub mounts: Vec<GuestMount>,
    /// How many mounts the next snapshotter returned during the call (a policy's).
    #[serde(default)]
    pub passed: u8,
    /// What it wrote and logged.
    #[serde(default)]
    pub output: Vec<Chunk>,
    /// A usage it returned.
    #[serde(default)]
    pub usage: (u64, u64),
}

/// A guest's error: its class (0..=6, in WIT order) and message.
#[derive(Debug, Clone, Default, Serialize, Deserialize, Arbitrary)]
pub struct GuestError {
    /// The class.
    pub class: u8,
    /// The message.
    pub message: String,
}

/// A guest's info.
#[derive(Debug, Clone, Default, Serialize, Deserialize, Arbitrary)]
pub struct GuestInfo {
    /// Name.
    pub name: String,
    /// Parent.
    pub parent: Option<String>,
    /// Kind (0 view, 1 active, 2 committed; others wrap).
    pub kind: u8,
    /// Labels, repeated keys allowed.
    pub labels: Vec<(String, String)>,
    /// Created: seconds and nanoseconds.
    pub created: (u64, u32),
    /// Updated.
    pub updated: (u64, u32),
}

/// A layer a mount names, as this call sees it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Arbitrary)]
#[serde(rename_all = "kebab-case")]
pub enum LayerRef {
    /// One of the layers the plugin holds.
    Held(u8),
    /// One of the layers this call made.
    Made(u8),
    /// A layer another call is making.
    Pending,
    /// A layer the plugin removed.
    Removed,
    /// Any number.
    Raw(u64),
}

/// A guest's mount.
#[derive(Debug, Clone, Serialize, Deserialize, Arbitrary)]
#[serde(rename_all = "kebab-case")]
pub enum GuestMount {
    /// `bind(layer, readonly)`.
    Bind {
        /// The layer.
        layer: LayerRef,
        /// Read-only.
        readonly: bool,
    },
    /// `overlay(lowers, upper, flags)`.
    Overlay {
        /// Lower layers, top first.
        lowers: Vec<LayerRef>,
        /// Upper layer.
        upper: Option<LayerRef>,
        /// Flags: bit 0 index-off, bit 1 userxattr, bit 2 volatile.
        flags: u8,
        /// This many more lowers, all held layers in turn (deep stacks).
        #[serde(default)]
        repeat: u16,
    },
    /// `passed(n)`.
    Passed(u32),
}

/// Part of a guest's output.
#[derive(Debug, Clone, Serialize, Deserialize, Arbitrary)]
#[serde(rename_all = "kebab-case")]
pub enum Chunk {
    /// Bytes written to stderr (as text; `repeat` times).
    Write {
        /// The text.
        text: String,
        /// How many times.
        #[serde(default)]
        repeat: u16,
    },
    /// A `log` call.
    Log(String),
    /// The call ends.
    End,
}

/// The layers of the space every input runs against.
#[derive(Debug)]
struct Layers {
    space: Arc<Space>,
    dir: PathBuf,
    /// The call the inputs' mounts are returned in.
    call: u64,
    held: Vec<u64>,
    made: Vec<u64>,
    pending: u64,
    removed: u64,
}

fn layers() -> Result<&'static Layers, String> {
    static LAYERS: OnceLock<Result<Layers, String>> = OnceLock::new();
    LAYERS
        .get_or_init(|| {
            let setup = || -> wasnap::Result<Layers> {
                let dir = crate::scratch::dir().join("guest-space");
                std::fs::create_dir_all(&dir)?;
                let cap = cap_std::fs::Dir::open_ambient_dir(&dir, cap_std::ambient_authority())?;
                let small =
                    wasnap::plugin::Limits { kv_mib: 1, state_mib: 1, ..Default::default() };
                let space = Space::open("fuzz", &cap, &dir, None, true, &small)?;
                let old = fz::begin_call();
                let held =
                    (0..4).map(|_| fz::create_layer(&space, old)).collect::<Result<_, _>>()?;
                let removed = fz::create_layer(&space, old)?;
                fz::settle(&space, old)?;
                fz::remove_layer(&space, fz::begin_call(), removed)?;
                let call = fz::begin_call();
                let made =
                    (0..2).map(|_| fz::create_layer(&space, call)).collect::<Result<_, _>>()?;
                let pending = fz::create_layer(&space, fz::begin_call())?;
                Ok(Layers { space, dir, call, held, made, pending, removed })
            };
            setup().map_err(|e| format!("setup: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

impl Layers {
    fn id(&self, r: LayerRef) -> u64 {
        match r {
            LayerRef::Held(i) => self.held[usize::from(i) % self.held.len()],
            LayerRef::Made(i) => self.made[usize::from(i) % self.made.len()],
            LayerRef::Pending => self.pending,
            LayerRef::Removed => self.removed,
            LayerRef::Raw(n) => n,
        }
    }

    fn usable(&self, id: u64) -> bool {
        self.held.contains(&id) || self.made.contains(&id)
    }

    fn layer_path(&self, id: u64) -> String {
        self.dir.join("layers").join(id.to_string()).to_string_lossy().into_owned()
    }

    fn work_path(&self, id: u64) -> String {
        self.dir.join("work").join(id.to_string()).to_string_lossy().into_owned()
    }
}

const MAX_MOUNTS: usize = 64;
const MAX_LOWERS: usize = wasnap::mount::OVERLAY_MAX_LAYERS;

/// A mount as the guest returned it, and as the model expects the host to write it.
fn lower(l: &Layers, m: &GuestMount) -> (wit::Mount, Vec<u64>) {
    match m {
        GuestMount::Bind { layer, readonly } => {
            let id = l.id(*layer);
            (wit::Mount::Bind(wit::BindMount { layer: id, readonly: *readonly }), vec![id])
        }
        GuestMount::Overlay { lowers, upper, flags, repeat } => {
            let mut ids: Vec<u64> = lowers.iter().map(|r| l.id(*r)).collect();
            for i in 0..usize::from(*repeat).min(2 * MAX_LOWERS) {
                ids.push(l.held[i % l.held.len()]);
            }
            let upper = upper.map(|r| l.id(r));
            let mut f = wit::OverlayFlags::empty();
            if flags & 1 != 0 {
                f |= wit::OverlayFlags::INDEX_OFF;
            }
            if flags & 2 != 0 {
                f |= wit::OverlayFlags::USERXATTR;
            }
            if flags & 4 != 0 {
                f |= wit::OverlayFlags::VOLATILE;
            }
            let mut named = ids.clone();
            named.extend(upper);
            (wit::Mount::Overlay(wit::OverlayMount { lowers: ids, upper, flags: f }), named)
        }
        GuestMount::Passed(n) => (wit::Mount::Passed(*n), Vec::new()),
    }
}

fn passed_mounts(n: u8) -> Vec<Mount> {
    (0..n % 4)
        .map(|i| Mount {
            kind: "bind".into(),
            source: format!("/next/{i}"),
            target: String::new(),
            options: vec!["rbind".into(), "ro".into()],
        })
        .collect()
}

fn check_mounts(input: &Input, outcome: &mut Vec<String>) -> Result<(), String> {
    let l = layers()?;
    let passed = passed_mounts(input.passed);
    let lowered: Vec<(wit::Mount, Vec<u64>)> = input.mounts.iter().map(|m| lower(l, m)).collect();
    // The model.
    let mut seen = HashSet::new();
    let mut ok = lowered.len() <= MAX_MOUNTS;
    for (m, named) in &lowered {
        match m {
            wit::Mount::Overlay(o) if o.lowers.is_empty() || o.lowers.len() > MAX_LOWERS => {
                ok = false
            }
            wit::Mount::Passed(n) if *n as usize >= passed.len() => ok = false,
            _ => {}
        }
        for id in named {
            ok &= l.usable(*id) && seen.insert(*id);
        }
    }
    let wit_mounts: Vec<wit::Mount> = lowered.iter().map(|(m, _)| m.clone()).collect();
    match fz::resolve_mounts(&l.space, l.call, wit_mounts, &passed) {
        Ok(mounts) => {
            if !ok {
                return Err(format!(
                    "model: mounts {:?} accepted, the rules refuse them",
                    input.mounts
                ));
            }
            if mounts.len() != lowered.len() {
                return Err(format!(
                    "count: {} mounts resolved from {}",
                    mounts.len(),
                    lowered.len()
                ));
            }
            for (got, (m, _)) in mounts.iter().zip(&lowered) {
                check_mount(l, got, m, &passed)?;
            }
            outcome.push(format!("mounts:ok:{}", mounts.len().min(3)));
        }
        Err(e) => {
            // A layer another call is making is refused as a race (failed-precondition);
            // anything else the guest names wrongly is its mistake (invalid-argument).
            let pending = lowered.iter().any(|(_, named)| named.contains(&l.pending));
            let typed = e.kind() == ErrorKind::InvalidArgument
                || pending && e.kind() == ErrorKind::FailedPrecondition;
            if !typed {
                return Err(format!("typed error: mounts refused with {:?}: {e}", e.kind()));
            }
            if ok {
                return Err(format!("model: mounts {:?} refused: {e}", input.mounts));
            }
            let class = e.message().split(": ").last().unwrap_or("");
            let class: String = class.chars().filter(|c| !c.is_ascii_digit()).collect();
            outcome.push(format!("mounts:err:{class}"));
        }
    }
    Ok(())
}

fn check_mount(l: &Layers, got: &Mount, m: &wit::Mount, passed: &[Mount]) -> Result<(), String> {
    let want = match m {
        wit::Mount::Bind(b) => Mount {
            kind: "bind".into(),
            source: l.layer_path(b.layer),
            target: String::new(),
            options: vec!["rbind".into(), if b.readonly { "ro" } else { "rw" }.into()],
        },
        wit::Mount::Overlay(o) => {
            let mut options = Vec::new();
            if o.flags.contains(wit::OverlayFlags::INDEX_OFF) {
                options.push("index=off".to_owned());
            }
            if o.flags.contains(wit::OverlayFlags::USERXATTR) {
                options.push("userxattr".to_owned());
            }
            match o.upper {
                Some(u) => {
                    if o.flags.contains(wit::OverlayFlags::VOLATILE) {
                        options.push("volatile".to_owned());
                    }
                    options.push(format!("workdir={}", l.work_path(u)));
                    options.push(format!("upperdir={}", l.layer_path(u)));
                }
                None => options.push("ro".to_owned()),
            }
            let lowers: Vec<String> = o.lowers.iter().map(|id| l.layer_path(*id)).collect();
            options.push(format!("lowerdir={}", lowers.join(":")));
            Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options,
            }
        }
        wit::Mount::Passed(n) => passed[*n as usize].clone(),
    };
    if *got != want {
        return Err(format!("mount: resolved as {got:?}, the host's paths say {want:?}"));
    }
    Ok(())
}

fn class_of(e: &GuestError) -> (wit::Error, ErrorKind) {
    let m = e.message.clone();
    match e.class % 7 {
        0 => (wit::Error::NotFound(m), ErrorKind::NotFound),
        1 => (wit::Error::AlreadyExists(m), ErrorKind::AlreadyExists),
        2 => (wit::Error::FailedPrecondition(m), ErrorKind::FailedPrecondition),
        3 => (wit::Error::InvalidArgument(m), ErrorKind::InvalidArgument),
        4 => (wit::Error::NotImplemented(m), ErrorKind::NotImplemented),
        5 => (wit::Error::Unavailable(m), ErrorKind::Unavailable),
        _ => (wit::Error::Internal(m), ErrorKind::Internal),
    }
}

fn no_controls(s: &str) -> bool {
    !s.chars().any(|c| c.is_control() && c != '\t')
}

fn check_errors(input: &Input, outcome: &mut Vec<String>) -> Result<(), String> {
    for ge in &input.errors {
        let (we, kind) = class_of(ge);
        // Half the errors are modelled as the next snapshotter's, which a policy passes
        // on: only those may keep another plugin's name.
        let from_next = (ge.class / 7) % 2 == 1;
        let passed = if from_next { vec![ge.message.clone()] } else { Vec::new() };
        let e = fz::error_from_guest(&input.plugin, we, &passed);
        if e.kind() != kind {
            return Err(format!("class: {kind:?} came back as {:?}", e.kind()));
        }
        let msg = e.message();
        if !no_controls(msg) {
            return Err(format!("escaped: control characters in {msg:?}"));
        }
        let prefix = format!("plugin {:?}: ", input.plugin);
        let limit = prefix.len() + MAX_ERROR_SLACK + fz::MAX_ERROR;
        if msg.len() > limit {
            return Err(format!("bounded: {} bytes (at most {limit})", msg.len()));
        }
        let text = fz::guest_text(&ge.message);
        // Passed on by a policy, an error already names its plugin; text that only
        // claims to is named as the guest's own.
        let kept = from_next && ge.message.starts_with("plugin \"");
        let want = if kept { text.clone() } else { format!("{prefix}{text}") };
        if msg != want {
            return Err(format!("named: {msg:?}, expected {want:?}"));
        }
        if ge.message.len() <= fz::MAX_ERROR && no_controls(&ge.message) && text != ge.message {
            return Err(format!(
                "kept: a short plain message changed: {:?} -> {text:?}",
                ge.message
            ));
        }
        if kept {
            outcome.push("error:passed-on".to_owned());
        } else if text.starts_with("plugin \"") {
            outcome.push("error:claimed-by-guest".to_owned());
        }
        outcome.push(format!(
            "error:{}",
            if ge.message.len() > fz::MAX_ERROR { "cut" } else { "kept" }
        ));
    }
    Ok(())
}

/// What `[N more bytes cut]` adds past the kept text.
const MAX_ERROR_SLACK: usize = 40;

fn time_model(t: (u64, u32)) -> SystemTime {
    UNIX_EPOCH.checked_add(Duration::new(t.0, t.1.min(999_999_999))).unwrap_or(UNIX_EPOCH)
}

fn check_page(input: &Input, outcome: &mut Vec<String>) -> Result<(), String> {
    let filter = Filter::parse(&input.filter).ok();
    let mut matched = 0;
    for gi in &input.page {
        let kind = match gi.kind % 3 {
            0 => wit::Kind::View,
            1 => wit::Kind::Active,
            _ => wit::Kind::Committed,
        };
        let wi = wit::Info {
            name: gi.name.clone(),
            parent: gi.parent.clone(),
            kind,
            labels: gi.labels.clone(),
            created: wit::Timestamp { seconds: gi.created.0, nanoseconds: gi.created.1 },
            updated: wit::Timestamp { seconds: gi.updated.0, nanoseconds: gi.updated.1 },
        };
        let info = fz::info_from_wit(wi);
        let mut labels = BTreeMap::new();
        for (k, v) in &gi.labels {
            labels.insert(k.clone(), v.clone());
        }
        if info.name != gi.name || info.parent != gi.parent || info.labels != labels {
            return Err(format!("info: {gi:?} converted to {info:?}"));
        }
        if info.kind.as_str() != ["view", "active", "committed"][usize::from(gi.kind % 3)] {
            return Err(format!("info: kind {} converted to {}", gi.kind % 3, info.kind));
        }
        if info.created != time_model(gi.created) || info.updated != time_model(gi.updated) {
            return Err(format!("time: {:?} converted to {:?}", gi.created, info.created));
        }
        let back = fz::info_to_wit(&info);
        let labels_back: BTreeMap<String, String> = back.labels.into_iter().collect();
        if back.name != info.name || back.parent != info.parent || labels_back != info.labels {
            return Err(format!("round trip: {info:?} and back differ"));
        }
        if let Some(f) = &filter {
            matched += usize::from(f.matches(&info));
        }
    }
    let u = fz::usage_from_wit(wit::UsageInfo { size: input.usage.0, inodes: input.usage.1 });
    if (u.size, u.inodes) != input.usage {
        return Err(format!("usage: {:?} converted to {u:?}", input.usage));
    }
    if !input.page.is_empty() {
        outcome.push(format!("page:{}", matched.min(2)));
    }
    Ok(())
}

/// Longest line the host logs (before escaping) and how much escaping can grow it.
const MAX_LINE: usize = 4096;
const ESCAPE_GROWTH: usize = 6;

fn check_output(input: &Input, outcome: &mut Vec<String>) -> Result<(), String> {
    if input.output.is_empty() {
        return Ok(());
    }
    let mut out = fz::Output::new(&input.plugin);
    let mut budget = fz::BUDGET_PER_CALL;
    // Lines are budgeted too: past them, log calls are refused and written lines
    // dropped. Written text's newlines count, so the model knows the lines left only
    // until the first write with a newline; from then on a refusal is allowed.
    let mut lines = Some(fz::LINES_PER_CALL);
    let mut logged = 0;
    let check_lines = |lines: Vec<String>| -> Result<(), String> {
        if lines.len() > 6 {
            return Err(format!("kept lines: {} (at most 6)", lines.len()));
        }
        for l in lines {
            if !no_controls(&l) || l.len() > MAX_LINE * ESCAPE_GROWTH {
                return Err(format!("line: {} bytes, escaped: {}", l.len(), no_controls(&l)));
            }
        }
        Ok(())
    };
    for chunk in &input.output {
        match chunk {
            Chunk::Write { text, repeat } => {
                for _ in 0..=usize::from(*repeat).min(64) {
                    out.write(text.as_bytes());
                    budget -= text.len().min(budget);
                }
                if text.contains('\n') {
                    lines = None;
                }
            }
            Chunk::Log(message) => {
                let len = message.len().min(MAX_LINE);
                let lines_left = lines.is_none_or(|l| l > 0);
                let want = budget >= len && lines_left;
                let may_refuse = lines.is_none();
                match out.log(message) {
                    Some(line) => {
                        if !want {
                            return Err(format!(
                                "budget: a log line past the call's budget ({budget} left, {len} asked)"
                            ));
                        }
                        budget -= len;
                        lines = lines.map(|l| l - 1);
                        logged += 1;
                        if !no_controls(&line) || line.len() > MAX_LINE * ESCAPE_GROWTH {
                            return Err(format!(
                                "log line: {} bytes, escaped: {}",
                                line.len(),
                                no_controls(&line)
                            ));
                        }
                    }
                    None if want && !may_refuse => {
                        return Err(format!(
                            "budget: a log line refused with {budget} bytes left ({len} asked)"
                        ));
                    }
                    None => {}
                }
            }
            Chunk::End => {
                check_lines(out.end_call())?;
                budget = fz::BUDGET_PER_CALL;
                lines = Some(fz::LINES_PER_CALL);
            }
        }
    }
    check_lines(out.end_call())?;
    outcome.push(format!("output:{}", logged.min(2)));
    Ok(())
}

fn run(bytes: &[u8]) -> Result<Outcome, String> {
    let input: Input = decode(bytes);
    let mut outcome = Vec::new();
    check_errors(&input, &mut outcome)?;
    check_page(&input, &mut outcome)?;
    check_mounts(&input, &mut outcome)?;
    check_output(&input, &mut outcome)?;
    outcome.sort();
    outcome.dedup();
    Ok(outcome.join(" "))
}

const TEXT: &[&str] = &[
    "",
    "x",
    "fine",
    "\n",
    "\r",
    "\u{1b}[2J",
    "\t",
    "é",
    "牛",
    "\0",
    "\u{85}",
    "\u{7f}",
    "plugin \"other\": ",
    "2026-12-04T00:00:00Z ERROR wasnap: forged",
];

fn layer_ref(u: &mut Unstructured<'_>) -> LayerRef {
    match below(u, 10) {
        0 => LayerRef::Pending,
        1 => LayerRef::Removed,
        2 => LayerRef::Raw(if one_in(u, 2) { u64::MAX } else { below(u, 2000) as u64 }),
        3 | 4 => LayerRef::Made(below(u, 2) as u8),
        _ => LayerRef::Held(below(u, 4) as u8),
    }
}

fn mount(u: &mut Unstructured<'_>) -> GuestMount {
    match below(u, 8) {
        0 => GuestMount::Passed(below(u, 5) as u32),
        1..=3 => GuestMount::Bind { layer: layer_ref(u), readonly: one_in(u, 2) },
        _ => GuestMount::Overlay {
            lowers: (0..below(u, 4)).map(|_| layer_ref(u)).collect(),
            upper: if one_in(u, 2) { Some(layer_ref(u)) } else { None },
            flags: below(u, 8) as u8,
            repeat: if one_in(u, 8) { (MAX_LOWERS - 2 + below(u, 4)) as u16 } else { 0 },
        },
    }
}

fn info(u: &mut Unstructured<'_>) -> GuestInfo {
    let time = |u: &mut Unstructured<'_>| match below(u, 4) {
        0 => (u64::MAX, u32::MAX),
        1 => (below(u, 1 << 20) as u64, below(u, 2_000_000_000) as u32),
        _ => (1_700_000_000 + below(u, 1000) as u64, below(u, 1_000_000_000) as u32),
    };
    GuestInfo {
        name: string(u, &["a", "b", "base", "default/1/x", "牛", ""], 0),
        parent: if one_in(u, 2) { Some(string(u, &["a", "base", ""], 0)) } else { None },
        kind: below(u, 4) as u8,
        labels: (0..below(u, 3))
            .map(|_| {
                (
                    pick(u, &["a", "a", "team", "", "a.b"]).to_owned(),
                    pick(u, &["1", "2", "blue"]).to_owned(),
                )
            })
            .collect(),
        created: time(u),
        updated: time(u),
    }
}

fn generate(u: &mut Unstructured<'_>) -> Vec<u8> {
    let input = Input {
        plugin: pick(u, &["copy", "quota", "", "p\"q", "plugin \"x\"", "é\n"]).to_owned(),
        errors: (0..below(u, 3))
            .map(|_| GuestError {
                class: below(u, 8) as u8,
                message: string(u, TEXT, fz::MAX_ERROR),
            })
            .collect(),
        page: (0..below(u, 4)).map(|_| info(u)).collect(),
        filter: pick(
            u,
            &[
                "",
                "name==a",
                "labels.a",
                "kind==committed,labels.team==blue",
                "parent==base",
                "name~=^b",
            ],
        )
        .to_owned(),
        mounts: if one_in(u, 16) {
            (0..MAX_MOUNTS + below(u, 3)).map(|_| GuestMount::Passed(0)).collect()
        } else {
            (0..below(u, 4)).map(|_| mount(u)).collect()
        },
        passed: below(u, 5) as u8,
        output: (0..below(u, 4))
            .map(|_| match below(u, 5) {
                0 => Chunk::End,
                1 | 2 => Chunk::Log(string(u, TEXT, MAX_LINE)),
                _ => Chunk::Write {
                    text: string(u, TEXT, MAX_LINE),
                    repeat: if one_in(u, 4) { below(u, 64) as u16 } else { 0 },
                },
            })
            .collect(),
        usage: (u64::arbitrary(u).unwrap_or(0), u64::arbitrary(u).unwrap_or(0)),
    };
    encode(&input)
}

fn mutate(bytes: &[u8], m: &mut Mutator<'_>) -> Vec<u8> {
    let mut input: Input = decode(bytes);
    let fresh = m.fresh(256);
    let mut u = Unstructured::new(&fresh);
    match m.rng.below(7) {
        0 => input.mounts.push(mount(&mut u)),
        1 if !input.mounts.is_empty() => {
            let i = m.rng.below(input.mounts.len());
            input.mounts[i] = mount(&mut u);
        }
        2 if !input.errors.is_empty() => {
            let i = m.rng.below(input.errors.len());
            m.string(&mut input.errors[i].message);
        }
        3 => input.page.push(info(&mut u)),
        4 => m.string(&mut input.plugin),
        5 if !input.mounts.is_empty() => {
            let i = m.rng.below(input.mounts.len());
            input.mounts.remove(i);
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
    let bind = |layer, readonly| GuestMount::Bind { layer, readonly };
    let overlay = |lowers: Vec<LayerRef>, upper, flags, repeat| GuestMount::Overlay {
        lowers,
        upper,
        flags,
        repeat,
    };
    let mounts = |m: Vec<GuestMount>| Input { mounts: m, ..Input::default() };
    let inputs: Vec<(&'static str, Input)> = vec![
        ("bind-held-ro", mounts(vec![bind(LayerRef::Held(0), true)])),
        ("bind-made-rw", mounts(vec![bind(LayerRef::Made(0), false)])),
        ("bind-foreign", mounts(vec![bind(LayerRef::Raw(999_999), true)])),
        ("bind-pending-of-another-call", mounts(vec![bind(LayerRef::Pending, true)])),
        ("bind-removed", mounts(vec![bind(LayerRef::Removed, true)])),
        (
            "overlay-all-flags",
            mounts(vec![overlay(
                vec![LayerRef::Held(0), LayerRef::Held(1)],
                Some(LayerRef::Made(0)),
                7,
                0,
            )]),
        ),
        ("overlay-ro", mounts(vec![overlay(vec![LayerRef::Held(2)], None, 0, 0)])),
        ("overlay-no-lowers", mounts(vec![overlay(vec![], Some(LayerRef::Made(1)), 0, 0)])),
        (
            "overlay-upper-is-lower",
            mounts(vec![overlay(vec![LayerRef::Held(0)], Some(LayerRef::Held(0)), 0, 0)]),
        ),
        ("overlay-501-lowers", mounts(vec![overlay(vec![LayerRef::Made(0)], None, 0, 500)])),
        (
            "twice-across-mounts",
            mounts(vec![bind(LayerRef::Held(3), true), bind(LayerRef::Held(3), true)]),
        ),
        ("passed-none", mounts(vec![GuestMount::Passed(0)])),
        (
            "passed-in-range",
            Input { mounts: vec![GuestMount::Passed(2)], passed: 3, ..Input::default() },
        ),
        (
            "too-many-mounts",
            Input { mounts: vec![GuestMount::Passed(0); 65], passed: 1, ..Input::default() },
        ),
        (
            "errors",
            Input {
                plugin: "copy".into(),
                errors: vec![
                    GuestError { class: 0, message: "snapshot \"k\"".into() },
                    GuestError {
                        class: 6,
                        message:
                            "fine\n2026-12-04T00:00:00Z ERROR wasnap: root compromised\u{1b}[2J"
                                .into(),
                    },
                    GuestError { class: 3, message: "x".repeat(1 << 16) },
                    GuestError { class: 5, message: "é".repeat(3000) },
                    GuestError { class: 2, message: "plugin \"other\": blame someone else".into() },
                ],
                ..Input::default()
            },
        ),
        (
            "page",
            Input {
                filter: "labels.a==2".into(),
                page: vec![
                    GuestInfo {
                        name: "a".into(),
                        parent: None,
                        kind: 2,
                        labels: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
                        created: (1_700_000_000, 5),
                        updated: (u64::MAX, u32::MAX),
                    },
                    GuestInfo {
                        name: "b".into(),
                        parent: Some("a".into()),
                        kind: 9,
                        ..GuestInfo::default()
                    },
                ],
                usage: (u64::MAX, 0),
                ..Input::default()
            },
        ),
        (
            "output",
            Input {
                plugin: "noisy".into(),
                output: vec![
                    Chunk::Write { text: "one\ntwo\n\u{1b}[2J".into(), repeat: 0 },
                    Chunk::Log("a\nFAKE line\u{1b}[2J".into()),
                    Chunk::Write { text: "x".repeat(4096), repeat: 40 },
                    Chunk::Log("late".into()),
                    Chunk::End,
                    Chunk::Log("é".repeat(4096)),
                ],
                ..Input::default()
            },
        ),
    ];
    inputs.into_iter().map(|(n, i)| (n, encode(&i))).collect()
}
