//! How results are printed: aligned tables for people, JSON for programs. [`table`] is
//! public for the workspace's dev benchmark (`wasnap-bench`), which prints as `wasnap
//! bench` does.

use std::collections::BTreeMap;
use std::io::Write;

use clap::ValueEnum;
use serde::Serialize;

use wasnap::Context;
use wasnap::error::{Error, Result};
use wasnap::gc::GcReport;
use wasnap::metadata::{Lease, PruneReport, Resource};
use wasnap::root::{CheckReport, DEFAULT_SNAPSHOTTER, HostInfo};
use wasnap::snapshot::{Info, Labels, Mount, Usage};

/// Output format of the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// One JSON document.
    Json,
    /// JUnit XML (`wasnap conformance` only).
    Junit,
}

fn io(e: std::io::Error) -> Error {
    Error::from(e).context("write output")
}

fn json<T: Serialize + ?Sized>(out: &mut dyn Write, v: &T) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, v).with_context(|| "encode JSON")?;
    writeln!(out).map_err(io)
}

/// Writes rows as columns separated by at least two spaces, under `header` (left out
/// when every title is empty); the last column is not padded.
pub fn table(out: &mut dyn Write, header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: &mut dyn Iterator<Item = &str>| -> Result<()> {
        let mut s = String::new();
        for (i, c) in cells.enumerate() {
            if i + 1 < widths.len() {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            } else {
                s.push_str(c);
            }
        }
        writeln!(out, "{}", s.trim_end()).map_err(io)
    };
    if header.iter().any(|h| !h.is_empty()) {
        line(out, &mut header.iter().copied())?;
    }
    for r in rows {
        line(out, &mut r.iter().map(String::as_str))?;
    }
    Ok(())
}

/// Bytes as a short human figure (`4.0 KiB`), like `ctr snapshots usage`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

pub(crate) fn mounts(out: &mut dyn Write, f: Format, mounts: &[Mount]) -> Result<()> {
    match f {
        Format::Json => json(out, mounts),
        Format::Table | Format::Junit => {
            let rows: Vec<Vec<String>> = mounts
                .iter()
                .map(|m| {
                    let target = if m.target.is_empty() { "-".into() } else { m.target.clone() };
                    vec![m.kind.clone(), m.source.clone(), target, m.options.join(",")]
                })
                .collect();
            table(out, &["TYPE", "SOURCE", "TARGET", "OPTIONS"], &rows)
        }
    }
}

pub(crate) fn info(out: &mut dyn Write, f: Format, i: &Info) -> Result<()> {
    match f {
        Format::Json => json(out, i),
        Format::Table | Format::Junit => {
            let mut rows = vec![
                vec!["Name".into(), i.name.clone()],
                vec!["Parent".into(), i.parent.clone().unwrap_or_default()],
                vec!["Kind".into(), i.kind.to_string()],
                vec!["Created".into(), humantime::format_rfc3339_nanos(i.created).to_string()],
                vec!["Updated".into(), humantime::format_rfc3339_nanos(i.updated).to_string()],
            ];
            for (k, v) in &i.labels {
                rows.push(vec![format!("Label {k}"), v.clone()]);
            }
            for r in rows {
                writeln!(out, "{:<10} {}", format!("{}:", r[0]), r[1]).map_err(io)?;
            }
            Ok(())
        }
    }
}

pub(crate) fn list(out: &mut dyn Write, f: Format, infos: &[Info]) -> Result<()> {
    match f {
        Format::Json => json(out, infos),
        Format::Table | Format::Junit => {
            let rows: Vec<Vec<String>> = infos
                .iter()
                .map(|i| {
                    vec![i.name.clone(), i.parent.clone().unwrap_or_default(), i.kind.to_string()]
                })
                .collect();
            table(out, &["KEY", "PARENT", "KIND"], &rows)
        }
    }
}

#[derive(Serialize)]
struct Node<'a> {
    name: &'a str,
    kind: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    children: Vec<Node<'a>>,
}

pub(crate) fn tree(out: &mut dyn Write, f: Format, infos: &[Info]) -> Result<()> {
    let mut children: BTreeMap<Option<&str>, Vec<&Info>> = BTreeMap::new();
    let names: std::collections::HashSet<&str> = infos.iter().map(|i| i.name.as_str()).collect();
    for i in infos {
        // A parent outside the listing (cannot happen within one namespace, but be safe)
        // shows its child as a root rather than hiding it.
        let p = i.parent.as_deref().filter(|p| names.contains(p));
        children.entry(p).or_default().push(i);
    }
    fn build<'a>(
        at: Option<&'a str>,
        ch: &BTreeMap<Option<&'a str>, Vec<&'a Info>>,
    ) -> Vec<Node<'a>> {
        ch.get(&at)
            .map(|v| {
                v.iter()
                    .map(|i| Node {
                        name: &i.name,
                        kind: i.kind.as_str(),
                        children: build(Some(i.name.as_str()), ch),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
    let roots = build(None, &children);
    match f {
        Format::Json => json(out, &roots),
        Format::Table | Format::Junit => {
            fn print(out: &mut dyn Write, nodes: &[Node<'_>], depth: usize) -> Result<()> {
                for n in nodes {
                    writeln!(out, "{:indent$}\\_ {} ({})", "", n.name, n.kind, indent = depth * 2)
                        .map_err(io)?;
                    print(out, &n.children, depth + 1)?;
                }
                Ok(())
            }
            print(out, &roots, 0)
        }
    }
}

#[derive(Serialize)]
struct UsageRow<'a> {
    name: &'a str,
    #[serde(flatten)]
    usage: Usage,
}

pub(crate) fn usage(out: &mut dyn Write, f: Format, rows: &[(String, Usage)]) -> Result<()> {
    match f {
        Format::Json => {
            let v: Vec<UsageRow<'_>> =
                rows.iter().map(|(n, u)| UsageRow { name: n, usage: *u }).collect();
            json(out, &v)
        }
        Format::Table | Format::Junit => {
            let rows: Vec<Vec<String>> = rows
                .iter()
                .map(|(n, u)| vec![n.clone(), human_bytes(u.size), u.inodes.to_string()])
                .collect();
            table(out, &["KEY", "SIZE", "INODES"], &rows)
        }
    }
}

pub(crate) fn labels(out: &mut dyn Write, f: Format, labels: &Labels) -> Result<()> {
    match f {
        Format::Json => json(out, labels),
        Format::Table | Format::Junit => {
            let rows: Vec<Vec<String>> =
                labels.iter().map(|(k, v)| vec![k.clone(), v.clone()]).collect();
            table(out, &["LABEL", "VALUE"], &rows)
        }
    }
}

pub(crate) fn prune(out: &mut dyn Write, f: Format, r: &PruneReport) -> Result<()> {
    match f {
        Format::Json => json(out, r),
        Format::Table | Format::Junit => {
            let mut rows: Vec<Vec<String>> =
                r.removed.iter().map(|k| vec![k.clone(), "removed".into()]).collect();
            rows.extend(r.failed.iter().map(|(k, e)| vec![k.clone(), format!("failed: {e}")]));
            table(out, &["BACKEND KEY", "RESULT"], &rows)
        }
    }
}

pub(crate) fn leases(out: &mut dyn Write, f: Format, leases: &[Lease]) -> Result<()> {
    match f {
        Format::Json => json(out, leases),
        Format::Table | Format::Junit => {
            let rows: Vec<Vec<String>> = leases
                .iter()
                .map(|l| {
                    let labels: Vec<String> =
                        l.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    vec![
                        l.id.clone(),
                        humantime::format_rfc3339_seconds(l.created).to_string(),
                        labels.join(","),
                    ]
                })
                .collect();
            table(out, &["ID", "CREATED", "LABELS"], &rows)
        }
    }
}

pub(crate) fn resources(out: &mut dyn Write, f: Format, resources: &[Resource]) -> Result<()> {
    match f {
        Format::Json => json(out, resources),
        Format::Table | Format::Junit => {
            let rows: Vec<Vec<String>> =
                resources.iter().map(|r| vec![r.kind.clone(), r.id.clone()]).collect();
            table(out, &["TYPE", "ID"], &rows)
        }
    }
}

pub(crate) fn gc(out: &mut dyn Write, f: Format, r: &GcReport) -> Result<()> {
    match f {
        Format::Json => json(out, r),
        Format::Table | Format::Junit => {
            let verb = if r.dry_run { "would remove" } else { "removed" };
            let mut rows: Vec<Vec<String>> = r
                .removed
                .iter()
                .map(|s| {
                    vec![
                        format!("snapshot {}/{}", s.snapshotter, s.namespace),
                        s.key.clone(),
                        verb.into(),
                    ]
                })
                .collect();
            rows.extend(
                r.expired_leases
                    .iter()
                    .map(|(ns, id)| vec![format!("lease {ns}"), id.clone(), verb.into()]),
            );
            let pverb = if r.dry_run { "would prune" } else { "pruned" };
            rows.extend(
                r.pruned
                    .iter()
                    .map(|(sn, k)| vec![format!("backend {sn}"), k.clone(), pverb.into()]),
            );
            rows.extend(
                r.failed
                    .iter()
                    .map(|(what, why)| vec![what.clone(), String::new(), format!("failed: {why}")]),
            );
            table(out, &["WHAT", "KEY", "RESULT"], &rows)?;
            writeln!(
                out,
                "{} snapshots, {} leases, {} backend snapshots; mark {}, sweep {}, prune {}",
                r.removed.len(),
                r.expired_leases.len(),
                r.pruned.len(),
                fmt_duration(r.mark),
                fmt_duration(r.sweep),
                fmt_duration(r.prune)
            )
            .map_err(io)
        }
    }
}

pub(crate) fn check(out: &mut dyn Write, f: Format, reports: &[CheckReport]) -> Result<()> {
    match f {
        Format::Json => json(out, reports),
        Format::Table | Format::Junit => {
            let mut rows = Vec::new();
            for r in reports {
                rows.extend(
                    r.orphans.iter().map(|k| {
                        vec![r.snapshotter.clone(), k.clone(), "no record names it".into()]
                    }),
                );
                rows.extend(r.missing.iter().map(|k| {
                    vec![r.snapshotter.clone(), k.clone(), "record without backend snapshot".into()]
                }));
                rows.extend(r.damaged.iter().map(|(k, why)| {
                    vec![r.snapshotter.clone(), k.clone(), format!("data damaged: {why}")]
                }));
            }
            table(out, &["SNAPSHOTTER", "BACKEND KEY", "PROBLEM"], &rows)?;
            let n: usize = reports.iter().map(CheckReport::problems).sum();
            writeln!(out, "{n} problems in {} snapshotters", reports.len()).map_err(io)
        }
    }
}

fn fmt_duration(d: std::time::Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 1.0 { format!("{:.0} µs", ms * 1e3) } else { format!("{ms:.1} ms") }
}

pub(crate) fn host_info(out: &mut dyn Write, f: Format, info: &HostInfo) -> Result<()> {
    match f {
        Format::Json => json(out, info),
        Format::Table | Format::Junit => {
            let yes = |b: bool| if b { "yes" } else { "no" };
            let support = &info.support;
            let mut rows = vec![
                vec![
                    "root".into(),
                    format!("{} ({})", info.root.display(), support.root_filesystem),
                ],
                vec!["kernel".into(), support.kernel.clone()],
                vec![
                    "privileged".into(),
                    format!("{} (mounting needs root)", yes(support.privileged)),
                ],
                vec![
                    "snapshotter".into(),
                    format!(
                        "{} (default {}{}; pick another with -s/--driver)",
                        info.selected_snapshotter,
                        info.default_snapshotter,
                        if info.default_snapshotter == DEFAULT_SNAPSHOTTER {
                            ": it works everywhere"
                        } else {
                            ""
                        }
                    ),
                ],
            ];
            for d in &info.snapshotters {
                rows.push(vec![format!("  {}", d.name), d.note.clone()]);
            }
            table(out, &["", ""], &rows)
        }
    }
}

fn uptime(ms: u64) -> String {
    let secs = ms / 1000;
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

fn mean_latency(busy_micros: u64, calls: u64) -> String {
    if calls == 0 {
        return "-".into();
    }
    fmt_duration(std::time::Duration::from_nanos(busy_micros.saturating_mul(1000) / calls))
}

/// A daemon's plugin as JSON, in the shape `plugin ls --format json` prints.
pub(crate) fn plugin_json(p: &wasnap_daemon::proto::admin::Plugin) -> serde_json::Value {
    serde_json::json!({
        "snapshotter": p.snapshotter,
        "role": p.role,
        "path": p.path,
        "size": p.size,
        "sha256": p.sha256,
        "id": p.id,
        "loaded_at": rfc3339_ms(p.loaded_at_unix_ms),
        "reloads": p.reloads,
        "reload_error": (!p.reload_error.is_empty()).then(|| serde_json::json!({
            "error": p.reload_error, "at": rfc3339_ms(p.reload_failed_at_unix_ms),
        })),
        "pool": { "busy": p.busy_instances, "limit": p.instance_limit },
        "counters": {
            "calls": p.calls, "errors": p.errors, "traps": p.traps,
            "timeouts": p.timeouts, "instances": p.instances, "busy_micros": p.busy_micros,
        },
    })
}

/// Milliseconds since the epoch as an RFC 3339 time (UTC, seconds).
fn rfc3339_ms(ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// A daemon's status (`wasnap status`).
pub(crate) fn status(
    out: &mut dyn Write,
    f: Format,
    s: &wasnap_daemon::proto::admin::StatusResponse,
) -> Result<()> {
    match f {
        Format::Json => json(
            out,
            &serde_json::json!({
                "version": s.version,
                "pid": s.pid,
                "uptime_ms": s.uptime_ms,
                "root": s.root,
                "socket": s.socket,
                "default_snapshotter": s.default_snapshotter,
                "requests": s.requests,
                "failed_requests": s.failed_requests,
                "busy_micros": s.busy_micros,
                "served_in_place": s.served_in_place,
                "served_handing_over": s.served_handing_over,
                "database": s.database.as_ref().map(|d| serde_json::json!({
                    "commits": d.commits, "durable_commits": d.durable_commits,
                    "operations": d.operations,
                })),
                "snapshotters": s.snapshotters.iter().map(|n| serde_json::json!({
                    "name": n.name, "driver": n.driver, "open": n.open, "policies": n.policies,
                    "state": n.state, "error": n.error, "retry_in_secs": n.retry_in_secs,
                })).collect::<Vec<_>>(),
                "plugins": s.plugins.iter().map(plugin_json).collect::<Vec<_>>(),
            }),
        ),
        Format::Table | Format::Junit => {
            let mut rows = vec![
                vec![
                    "daemon".into(),
                    format!("wasnap {}, pid {}, up {}", s.version, s.pid, uptime(s.uptime_ms)),
                ],
                vec!["root".into(), s.root.clone()],
                vec!["socket".into(), s.socket.clone()],
                vec![
                    "requests".into(),
                    format!(
                        "{} ({} failed, {} served in place, {} handing over), {} each on \
                         average",
                        s.requests,
                        s.failed_requests,
                        s.served_in_place,
                        s.served_handing_over,
                        mean_latency(s.busy_micros, s.requests)
                    ),
                ],
            ];
            // An older daemon does not say.
            if let Some(d) = &s.database {
                rows.push(vec![
                    "database".into(),
                    format!(
                        "{} commits ({} synced), {} operations",
                        d.commits, d.durable_commits, d.operations
                    ),
                ]);
            }
            table(out, &["", ""], &rows)?;
            writeln!(out).map_err(io)?;
            let rows: Vec<Vec<String>> = s
                .snapshotters
                .iter()
                .map(|n| {
                    vec![
                        if n.name == s.default_snapshotter {
                            format!("{} (default)", n.name)
                        } else {
                            n.name.clone()
                        },
                        n.driver.clone(),
                        match n.state.as_str() {
                            "failed" => {
                                format!("failed (retry in {}s): {}", n.retry_in_secs, n.error)
                            }
                            "" if n.open => "open".into(),
                            "" | "closed" => "not open".into(),
                            other => other.into(),
                        },
                        n.policies.to_string(),
                    ]
                })
                .collect();
            table(out, &["SNAPSHOTTER", "DRIVER", "STATE", "POLICIES"], &rows)?;
            if s.plugins.is_empty() {
                return Ok(());
            }
            writeln!(out).map_err(io)?;
            let rows: Vec<Vec<String>> = s
                .plugins
                .iter()
                .map(|p| {
                    vec![
                        if p.id.is_empty() { p.snapshotter.clone() } else { p.id.clone() },
                        p.role.clone(),
                        format!(
                            "sha256:{} loaded {}{}",
                            p.sha256.get(..12).unwrap_or(&p.sha256),
                            rfc3339_ms(p.loaded_at_unix_ms),
                            match p.reloads {
                                0 => String::new(),
                                n => format!(" ({n} reloads)"),
                            }
                        ),
                        p.calls.to_string(),
                        p.errors.to_string(),
                        format!("{} ({} timeouts)", p.traps, p.timeouts),
                        format!("{}/{} busy", p.busy_instances, p.instance_limit),
                        mean_latency(p.busy_micros, p.calls),
                        p.path.clone(),
                    ]
                })
                .collect();
            table(
                out,
                &["PLUGIN", "ROLE", "VERSION", "CALLS", "ERRORS", "TRAPS", "POOL", "MEAN", "PATH"],
                &rows,
            )?;
            for p in s.plugins.iter().filter(|p| !p.reload_error.is_empty()) {
                writeln!(
                    out,
                    "\n{}: the reload at {} failed, the version above keeps serving: {}",
                    if p.id.is_empty() { &p.snapshotter } else { &p.id },
                    rfc3339_ms(p.reload_failed_at_unix_ms),
                    p.reload_error
                )
                .map_err(io)?;
            }
            Ok(())
        }
    }
}

/// A merge or diff snapshot: its name, how it was made, and its layers.
pub(crate) fn merged(
    out: &mut dyn Write,
    f: Format,
    m: &wasnap::layer::merge::Merged,
) -> Result<()> {
    match f {
        Format::Json => json(out, m),
        _ => table(
            out,
            &["NAME", "MADE", "LAYERS", "APPLIED"],
            &[vec![
                m.info.name.clone(),
                m.how.clone(),
                m.layers.len().to_string(),
                m.applied.to_string(),
            ]],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
    }

    #[test]
    fn tables_align() {
        let mut out = Vec::new();
        table(&mut out, &["A", "B"], &[vec!["long-key".into(), "x".into()]]).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "A         B\nlong-key  x\n");
    }
}
