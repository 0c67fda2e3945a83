//! `wasnap du` and `wasnap prune`: the snapshots as a build cache (buildkit's `du` and
//! `prune`), on [`Api`], with a progress bar on a terminal.

use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use wasnap::Context;
use wasnap::error::Result;
use wasnap::metadata::prune::parse_bytes;
use wasnap::metadata::{CachePruneReport, DiskUsage, PrunePolicy, PruneProgress, UsageRecord};

use crate::api::Api;
use crate::output::{Format, human_bytes, table};

/// Options of `wasnap du`.
#[derive(Debug, Args)]
pub struct DuArgs {
    /// Filter (containerd syntax over id, parent, kind, type, description, labels.<k>,
    /// and inuse, shared, private, mutable, immutable); several are alternatives (OR)
    #[arg(long = "filter", short = 'f')]
    pub filters: Vec<String>,
    /// Every field of every snapshot, with active snapshots and views measured
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// Options of `wasnap prune` (buildkit's).
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Keep what was used (or made, if never used) within this long (e.g. 24h, 7days)
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub keep_duration: Option<Duration>,
    /// Remove until the snapshots use at most this much (e.g. 10GB; K, M, G, T are
    /// powers of 1024, as docker reads them)
    #[arg(long, visible_alias = "max-used-space", value_parser = size, value_name = "SIZE")]
    pub keep_storage: Option<u64>,
    /// Never remove below this much
    #[arg(long, value_parser = size, value_name = "SIZE")]
    pub reserved_space: Option<u64>,
    /// Remove until the root's filesystem has this much free
    #[arg(long, value_parser = size, value_name = "SIZE")]
    pub min_free_space: Option<u64>,
    /// Only snapshots matching a filter (as `du --filter`); several are alternatives
    #[arg(long = "filter", short = 'f')]
    pub filters: Vec<String>,
    /// Also shared snapshots and records of type internal or frontend
    #[arg(long)]
    pub all: bool,
    /// List what would go and the bytes it would free; change nothing
    #[arg(long)]
    pub dry_run: bool,
}

fn size(text: &str) -> std::result::Result<u64, String> {
    parse_bytes(text).map_err(|e| e.to_string())
}

impl PruneArgs {
    fn policy(&self) -> PrunePolicy {
        PrunePolicy {
            all: self.all,
            filters: self.filters.clone(),
            keep_duration: self.keep_duration.unwrap_or_default(),
            keep_storage: self.keep_storage.unwrap_or_default(),
            reserved_space: self.reserved_space.unwrap_or_default(),
            min_free_space: self.min_free_space.unwrap_or_default(),
        }
    }
}

/// `wasnap du`.
pub fn du(api: &dyn Api, args: &DuArgs, fmt: Format, out: &mut dyn Write) -> Result<()> {
    let du = api.du(&args.filters, args.verbose)?;
    match fmt {
        Format::Json => json(out, &du),
        Format::Table | Format::Junit if args.verbose => verbose(out, &du),
        Format::Table | Format::Junit => {
            let now = SystemTime::now();
            let rows: Vec<Vec<String>> = du
                .records
                .iter()
                .map(|r| {
                    vec![
                        r.key.clone(),
                        r.kind.to_string(),
                        r.size.map_or("-".into(), human_bytes),
                        r.last_used.map_or("never".into(), |t| ago(now, t)),
                        r.use_count.to_string(),
                        flags(r),
                    ]
                })
                .collect();
            table(out, &["KEY", "KIND", "SIZE", "LAST USED", "USES", "FLAGS"], &rows)?;
            writeln!(out).context("write output")?;
            totals(out, &du)
        }
    }
}

/// What a record is, in a word each: in use, shared, reclaimable.
fn flags(r: &UsageRecord) -> String {
    let words: Vec<&str> =
        [(r.in_use, "in-use"), (r.shared, "shared"), (r.reclaimable, "reclaimable")]
            .into_iter()
            .filter_map(|(on, w)| on.then_some(w))
            .collect();
    if words.is_empty() { "-".into() } else { words.join(",") }
}

fn totals(out: &mut dyn Write, du: &DiskUsage) -> Result<()> {
    let rows = [
        ("Shared:", du.shared),
        ("Private:", du.private),
        ("Reclaimable:", du.reclaimable),
        ("Total:", du.total),
    ];
    for (what, n) in rows {
        writeln!(out, "{what:<13} {}", human_bytes(n)).context("write output")?;
    }
    Ok(())
}

fn verbose(out: &mut dyn Write, du: &DiskUsage) -> Result<()> {
    let time = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    for r in &du.records {
        let mut rows = vec![
            ("Key", r.key.clone()),
            ("Kind", r.kind.to_string()),
            ("Parent", r.parent.clone().unwrap_or_default()),
        ];
        if !r.layers.is_empty() {
            rows.push(("Layers", r.layers.join(", ")));
        }
        rows.extend([
            ("Created", time(r.created)),
            ("Last used", r.last_used.map_or("never".into(), time)),
            ("Use count", r.use_count.to_string()),
            (
                "Size",
                r.size.map_or("unknown".into(), |n| format!("{} ({n} bytes)", human_bytes(n))),
            ),
            ("Type", r.record_type.clone()),
            ("Description", r.description.clone().unwrap_or_default()),
            ("In use", r.in_use.to_string()),
            ("Shared", r.shared.to_string()),
            ("Reclaimable", r.reclaimable.to_string()),
        ]);
        for (k, v) in rows {
            writeln!(out, "{:<13} {v}", format!("{k}:")).context("write output")?;
        }
        writeln!(out).context("write output")?;
    }
    totals(out, du)
}

/// `wasnap prune`.
pub fn prune(api: &dyn Api, args: &PruneArgs, fmt: Format, out: &mut dyn Write) -> Result<()> {
    let mut shown = Shown::new(fmt == Format::Table && std::io::stderr().is_terminal());
    let report = api.prune(&args.policy(), args.dry_run, &mut |p| shown.event(p));
    shown.done();
    let report = report?;
    match fmt {
        Format::Json => json(out, &report),
        Format::Table | Format::Junit => pruned(out, &report),
    }
}

fn pruned(out: &mut dyn Write, r: &CachePruneReport) -> Result<()> {
    let now = SystemTime::now();
    let rows: Vec<Vec<String>> = r
        .removed
        .iter()
        .map(|s| {
            vec![
                s.key.clone(),
                s.size.map_or("-".into(), human_bytes),
                s.last_used.map_or_else(
                    || format!("never (made {})", ago(now, s.created)),
                    |t| ago(now, t),
                ),
            ]
        })
        .collect();
    table(out, &["KEY", "SIZE", "LAST USED"], &rows)?;
    for (key, why) in &r.failed {
        writeln!(out, "{key}: record removed, data not yet: {why}").context("write output")?;
    }
    for (_, key) in &r.skipped {
        writeln!(out, "{key}: left (used or held since the plan)").context("write output")?;
    }
    let (verb, freed) =
        if r.dry_run { ("Would remove", "would be freed") } else { ("Removed", "freed") };
    let n = r.removed.len();
    let noun = if n == 1 { "snapshot" } else { "snapshots" };
    writeln!(out, "{verb} {n} {noun}, {} {freed}", human_bytes(r.freed)).context("write output")
}

/// The progress bar, for a person at a terminal only.
struct Shown {
    bar: Option<ProgressBar>,
    terminal: bool,
}

impl Shown {
    fn new(terminal: bool) -> Self {
        Shown { bar: None, terminal }
    }

    fn event(&mut self, p: PruneProgress<'_>) {
        match p {
            PruneProgress::Planned { snapshots, .. } if self.terminal && snapshots > 0 => {
                let bar = ProgressBar::new(snapshots as u64).with_style(
                    ProgressStyle::with_template("pruning [{bar:30}] {pos}/{len} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                self.bar = Some(bar);
            }
            PruneProgress::Removed { key, .. } => {
                if let Some(bar) = &self.bar {
                    bar.set_message(key.to_owned());
                    bar.inc(1);
                }
            }
            PruneProgress::Planned { .. } => {}
        }
    }

    fn done(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn json<T: serde::Serialize>(out: &mut dyn Write, v: &T) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, v).context("encode JSON")?;
    writeln!(out).context("write output")
}

/// How long ago `t` was, in its largest unit (`12s ago`, `3h ago`, `2d ago`).
fn ago(now: SystemTime, t: SystemTime) -> String {
    let s = now.duration_since(t).unwrap_or_default().as_secs();
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_in_their_largest_unit() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |s: u64| now - Duration::from_secs(s);
        assert_eq!(ago(now, at(5)), "5s ago");
        assert_eq!(ago(now, at(120)), "2m ago");
        assert_eq!(ago(now, at(7200)), "2h ago");
        assert_eq!(ago(now, at(3 * 86_400)), "3d ago");
        assert_eq!(ago(now, now + Duration::from_secs(9)), "0s ago", "a clock step back");
    }
}
