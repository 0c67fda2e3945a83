//! The deep-chain section of `wasnap bench`: a chain twice as deep as one overlay mount
//! stacks (1,000 layers), built on the overlay driver, and a container start on it (a
//! view of the top, mounted and unmounted). The first start makes the flattened trees
//! its mount needs; later ones find them. The trees the chain's own prepares made are
//! dropped before the first start, so it pays for all of them, as a chain none of whose
//! tips was mounted yet would.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use wasnap::Context;
use wasnap::error::{Error, Result};
use wasnap::fault::Faults;
use wasnap::metadata::Ctx;
use wasnap::root::Host;
use wasnap::snapshot::Labels;

use crate::output::table;
use crate::stats::{Stats, fmt_d, timed};

/// Layers in the chain: twice what the kernel stacks.
const DEPTH: usize = 1000;
/// Layers in smoke mode: enough to prove the section runs, too few to flatten.
const SMOKE_DEPTH: usize = 20;

/// Runs the section on a fresh root under `base`.
pub fn run(base: &Path, smoke: bool, out: &mut dyn Write) -> Result<()> {
    let io = |e: std::io::Error| Error::from(e).context("bench");
    let fs_name = wasnap::probe::filesystem_name(base);
    let skip = if !rustix::process::geteuid().is_root() {
        Some("mounting needs root")
    } else if !wasnap::probe::Support::overlay_available() {
        Some("no overlayfs in this kernel")
    } else {
        None
    };
    if let Some(why) = skip {
        writeln!(out, "deep chain section skipped: {why}").map_err(io)?;
        return Ok(());
    }
    let depth = if smoke { SMOKE_DEPTH } else { DEPTH };
    let tmp = tempfile::Builder::new().prefix("wasnap-bench-deep-").tempdir_in(base).map_err(io)?;
    let host = Host::open_with(&tmp.path().join("root"), Arc::new(Faults::new()))?;
    let r = measure(&host, depth);
    let _ = host.close();
    let m = r?;
    let rows = vec![
        vec!["layers".into(), depth.to_string()],
        vec![
            "build: prepare, write, commit each".into(),
            format!("{} ({} flattened trees made by its prepares)", fmt_s(m.build), m.built_flats),
        ],
        vec![
            "view+mount, first (no flattened tree yet)".into(),
            format!("{} ({} flattened trees made)", fmt_d(m.first), m.first_flats),
        ],
        vec!["view+mount, later (p50 of 5)".into(), fmt_d(m.later)],
        vec!["lower directories stacked".into(), m.stacked.clone()],
    ];
    let title = format!("DEEP CHAIN (overlay, {fs_name} at {})", base.display());
    table(out, &[&title, "VALUE"], &rows)
}

fn fmt_s(d: Duration) -> String {
    if d >= Duration::from_secs(1) { format!("{:.2} s", d.as_secs_f64()) } else { fmt_d(d) }
}

/// What the section measured.
struct Measured {
    build: Duration,
    built_flats: usize,
    first: Duration,
    first_flats: usize,
    later: Duration,
    stacked: String,
}

/// The overlay driver's flattened trees (`snapshots/<id>/flat`) under the host's root.
fn flats(host: &Host) -> Vec<std::path::PathBuf> {
    let snapshots = host.root().join("snapshotters/overlay/snapshots");
    std::fs::read_dir(snapshots)
        .map(|r| {
            r.filter_map(|e| Some(e.ok()?.path().join("flat"))).filter(|p| p.is_dir()).collect()
        })
        .unwrap_or_default()
}

fn measure(host: &Host, depth: usize) -> Result<Measured> {
    let sn = host.snapshotter("overlay")?;
    let ctx = Ctx::new("bench")?;
    let none = Labels::new();
    let target = host.root().join("bench-deep-mnt");
    std::fs::create_dir_all(&target).with_context(|| "bench")?;

    // The chain: each layer adds a file and changes one, written straight into the
    // layer's directory (no mount per layer).
    let mut top: Option<String> = None;
    let build = timed(|| {
        for i in 0..depth {
            let key = format!("deep-{i}-active");
            let mounts = sn.prepare(&ctx, &key, top.as_deref(), &none)?;
            let m = &mounts[0];
            let layer = m
                .options
                .iter()
                .find_map(|o| o.strip_prefix("upperdir="))
                .unwrap_or(m.source.as_str());
            let layer = Path::new(layer);
            std::fs::write(layer.join(format!("file-{i}")), i.to_string())
                .and_then(|()| std::fs::write(layer.join("top"), i.to_string()))
                .with_context(|| "bench: write layer")?;
            let name = format!("deep-{i}");
            sn.commit(&ctx, &name, &key, &none)?;
            top = Some(name);
        }
        Ok(())
    })?;
    let built_flats = flats(host).len();
    for flat in flats(host) {
        std::fs::remove_dir_all(&flat).with_context(|| format!("remove {}", flat.display()))?;
    }
    let top = top.ok_or_else(|| Error::internal("an empty chain"))?;
    let start = |key: &str| -> Result<Vec<wasnap::Mount>> {
        let mounts = sn.view(&ctx, key, Some(&top), &none)?;
        wasnap::mount::mount_all(&mounts, &target)?;
        wasnap::mount::unmount(&target)?;
        Ok(mounts)
    };
    let mut mounts = Vec::new();
    let first = timed(|| start("deep-view-0").map(|m| mounts = m))?;
    let first_flats = flats(host).len();
    let mut samples = Vec::new();
    for rep in 1..=5 {
        samples.push(timed(|| start(&format!("deep-view-{rep}")).map(drop))?);
    }
    let lowers = match mounts.first() {
        Some(m) if m.kind == "overlay" => wasnap::mount::overlay_lowerdirs(&m.options),
        Some(m) => vec![m.source.as_str()],
        None => Vec::new(),
    };
    let flattened = lowers.iter().filter(|l| l.ends_with("/flat")).count();
    let stacked = format!("{} layers + {flattened} flattened", lowers.len() - flattened);
    Ok(Measured {
        build,
        built_flats,
        first,
        first_flats,
        later: Stats::new(samples).pct(0.5),
        stacked,
    })
}
