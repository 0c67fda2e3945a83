//! The merge section of `wasnap bench`: merges of 10, 50 and 200 layers of a 1,000-file
//! image (the files spread over the layers, 16 KiB on average), made the way each
//! backend makes them against copying the same layers: overlay stacks the layers'
//! directories, native hard-links the layers' files, and both are timed beside a merge
//! that copies every byte.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasnap::config::Config;
use wasnap::error::{Error, Result};
use wasnap::fault::Faults;
use wasnap::layer::merge::MergeOptions;
use wasnap::metadata::Ctx;
use wasnap::root::Host;
use wasnap::snapshot::Labels;

use crate::output::table;
use crate::stats::fmt_d;

/// Files in the whole image.
const FILES: usize = 1000;
/// Average file size.
const MEAN: usize = 16 << 10;

fn io(e: std::io::Error) -> Error {
    Error::from(e).context("bench")
}

/// A layer tar of `files` files named after `layer`, sizes spread around [`MEAN`].
fn layer_tar(layer: usize, files: usize) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let data = vec![b'x'; MEAN * 2];
    let dir = format!("l{layer}");
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_mtime(1_700_000_000);
    h.set_size(0);
    b.append_data(&mut h, &dir, &[][..]).map_err(io)?;
    for i in 0..files {
        let size = MEAN / 2 + (i * 7919 + layer * 131) % MEAN;
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_size(size as u64);
        b.append_data(&mut h, format!("{dir}/f{i}"), &data[..size]).map_err(io)?;
    }
    b.into_inner().map_err(io)
}

/// Registers `n` single-layer chains holding [`FILES`] files between them; their keys.
fn layers(host: &Host, sn: &str, ctx: &Ctx, n: usize) -> Result<Vec<String>> {
    let s = host.snapshotter(sn)?;
    let layers = host.layers(&s);
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let files = FILES / n + usize::from(i < FILES % n);
        let tar = layer_tar(i, files)?;
        let blob = host.content().ingest(ctx, &mut &tar[..], None, &Labels::new())?.digest;
        keys.push(layers.register(ctx, &blob, None, None, &Labels::new())?.chain_id.to_string());
    }
    Ok(keys)
}

/// Times one merge of `inputs` on `sn` made as `opts` says, then removes it.
fn time_merge(
    host: &Host,
    sn: &str,
    ctx: &Ctx,
    inputs: &[String],
    opts: &MergeOptions,
    name: &str,
) -> Result<(Duration, String)> {
    let s = host.snapshotter(sn)?;
    let layers = host.layers(&s);
    let plan = s.plan_merge(ctx, inputs)?;
    let t = Instant::now();
    let made = layers.make_with(ctx, name, &plan, &Labels::new(), opts)?;
    let took = t.elapsed();
    s.remove(ctx, name)?;
    s.settle();
    // The driver deletes a removed tree in the background (native): deleted now, so
    // that the next merge timed does not share the machine with that deletion.
    s.cleanup()?;
    Ok((took, made.how))
}

/// Timed merges of each kind per row (the median is shown).
const ROUNDS: usize = 5;

/// The median of `v` (not empty).
fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs the section in `base`, printing one table.
pub fn run(base: &Path, smoke: bool, out: &mut dyn Write) -> Result<()> {
    let tmp =
        tempfile::Builder::new().prefix("wasnap-bench-merge-").tempdir_in(base).map_err(io)?;
    let fs = wasnap::probe::filesystem_name(tmp.path());
    let config = Config::parse(
        "default_snapshotter = \"native\"\n[snapshotters.native]\ndriver = \"native\"\n\
         sync_commits = false\n[snapshotters.overlay]\ndriver = \"overlay\"\nsync_commits = false\n",
        "bench",
    )?;
    let host = Host::open_config(&tmp.path().join("root"), Arc::new(Faults::new()), config)?;
    let ctx = Ctx::new("bench")?;
    let counts: &[usize] = if smoke { &[3, 10] } else { &[10, 50, 200] };
    let rounds = if smoke { 1 } else { ROUNDS };
    let overlay = wasnap::probe::Support::overlay_available();
    let mut rows = Vec::new();
    for &n in counts {
        for (sn, fast, fast_opts) in [
            ("overlay", "stacked", MergeOptions { stack: true, links: true }),
            ("native", "hard links", MergeOptions { stack: false, links: true }),
        ] {
            if sn == "overlay" && !overlay {
                continue;
            }
            let inputs = layers(&host, sn, &ctx, n)?;
            let copy_opts = MergeOptions { stack: false, links: false };
            // Each once before timing, so the page cache holds the layers for both; then
            // the two in turn, each figure the median of its rounds.
            time_merge(&host, sn, &ctx, &inputs, &copy_opts, "warm")?;
            time_merge(&host, sn, &ctx, &inputs, &fast_opts, "warm")?;
            let (mut quick, mut copied, mut how) = (Vec::new(), Vec::new(), String::new());
            for _ in 0..rounds {
                let (took, made) = time_merge(&host, sn, &ctx, &inputs, &fast_opts, "fast")?;
                quick.push(took);
                how = made;
                copied.push(time_merge(&host, sn, &ctx, &inputs, &copy_opts, "copied")?.0);
            }
            let (quick, copied) = (median(quick), median(copied));
            rows.push(vec![
                sn.to_owned(),
                n.to_string(),
                format!("{fast} ({how})"),
                fmt_d(quick),
                fmt_d(copied),
                format!("{:.1}x", copied.as_secs_f64() / quick.as_secs_f64().max(1e-9)),
            ]);
            let s = host.snapshotter(sn)?;
            for key in inputs.iter().rev() {
                s.remove(&ctx, key)?;
            }
            s.settle();
        }
    }
    writeln!(
        out,
        "merge: {FILES} files ({} KiB mean) spread over N single-layer chains, on {fs}; median of {rounds}",
        MEAN >> 10
    )
    .map_err(io)?;
    table(out, &["BACKEND", "LAYERS", "MADE BY", "TIME", "COPYING", "SPEEDUP"], &rows)?;
    host.close()
}
