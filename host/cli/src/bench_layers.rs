//! The layers section of `wasnap bench`: applying a large layer against `tar -x` of the
//! same stream on the same filesystem, gzip against `tar -xzf`, diffing the result, and
//! registering a chain that exists already.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use wasnap::Context;
use wasnap::error::{Error, Result};
use wasnap::fault::Faults;
use wasnap::layer::apply::{ApplyOptions, apply};
use wasnap::layer::diff::{Source, diff};
use wasnap::layer::{Compression, Whiteouts};
use wasnap::metadata::Ctx;
use wasnap::root::{DEFAULT_SNAPSHOTTER, Host};
use wasnap::snapshot::Labels;

use crate::output::table;
use crate::stats::{Stats, fmt_d, timed};

/// The layer: `files` files of sizes cycling through a spread around `mean` bytes, in
/// directories of 100, with compressible but not trivial content.
fn write_layer(path: &Path, files: usize, mean: usize) -> Result<u64> {
    let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut b = tar::Builder::new(BufWriter::with_capacity(1 << 20, f));
    let mut total = 0u64;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = vec![0u8; mean * 2];
    for i in 0..files {
        if i % 100 == 0 {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            h.set_size(0);
            b.append_data(&mut h, format!("d{}", i / 100), &[][..]).context("write layer")?;
        }
        let size = mean / 2 + (i * 7919) % mean;
        for chunk in data[..size].chunks_mut(8) {
            // xorshift: text-like entropy, so gzip has work to do.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            for (j, c) in chunk.iter_mut().enumerate() {
                *c = b'a' + ((seed >> (j * 3)) % 16) as u8;
            }
        }
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(size as u64);
        b.append_data(&mut h, format!("d{}/f{i}", i / 100), &data[..size])
            .context("write layer")?;
        total += size as u64;
    }
    b.into_inner().context("write layer")?.flush().context("write layer")?;
    Ok(total)
}

fn gzip(from: &Path, to: &Path) -> Result<()> {
    let mut enc = Compression::Gzip.encoder(BufWriter::new(File::create(to).context("create")?))?;
    std::io::copy(&mut File::open(from).context("open")?, &mut enc).context("compress")?;
    enc.finish().context("compress")?.flush().context("compress")
}

fn fresh_dir(base: &Path, name: &str) -> Result<std::path::PathBuf> {
    let p = base.join(name);
    if p.exists() {
        std::fs::remove_dir_all(&p).with_context(|| format!("remove {}", p.display()))?;
    }
    std::fs::create_dir(&p).with_context(|| format!("create {}", p.display()))?;
    Ok(p)
}

fn tar_x(args: &[&str], layer: &Path, into: &Path) -> Result<Duration> {
    let t = Instant::now();
    let status = Command::new("tar")
        .args(args)
        .arg(layer)
        .arg("-C")
        .arg(into)
        .status()
        .map_err(|e| Error::unavailable(format!("run tar: {e}")))?;
    if !status.success() {
        return Err(Error::internal(format!("tar {args:?} failed: {status}")));
    }
    Ok(t.elapsed())
}

fn wasnap_apply(layer: &Path, into: &Path) -> Result<Duration> {
    let dir = File::open(into).with_context(|| format!("open {}", into.display()))?;
    let t = Instant::now();
    let r = BufReader::with_capacity(1 << 20, File::open(layer).context("open layer")?);
    let opts = ApplyOptions { whiteouts: Whiteouts::Delete, compression: None, lowers: Vec::new() };
    apply(dir.as_fd(), r, &opts)?;
    Ok(t.elapsed())
}

/// Runs the section in a directory under `base`.
pub fn run(base: &Path, smoke: bool, out: &mut dyn Write) -> Result<()> {
    let io = |e: std::io::Error| Error::from(e).context("bench");
    let (files, mean) = if smoke { (500, 4096) } else { (20_000, 10_240) };
    let tmp =
        tempfile::Builder::new().prefix("wasnap-bench-layers-").tempdir_in(base).map_err(io)?;
    let plain = tmp.path().join("layer.tar");
    let gz = tmp.path().join("layer.tar.gz");
    let bytes = write_layer(&plain, files, mean)?;
    gzip(&plain, &gz)?;
    let tar_bytes = std::fs::metadata(&plain).map_err(io)?.len();
    writeln!(
        out,
        "layers: {files} files, {:.0} MB of data ({:.0} MB tar, {:.0} MB gzip), in {} ({})",
        bytes as f64 / 1e6,
        tar_bytes as f64 / 1e6,
        std::fs::metadata(&gz).map_err(io)?.len() as f64 / 1e6,
        base.display(),
        wasnap::probe::filesystem_name(base)
    )
    .map_err(io)?;
    let have_tar = Command::new("tar").arg("--version").output().is_ok_and(|o| o.status.success());
    let runs = if smoke { 1 } else { 3 };
    let best = |f: &mut dyn FnMut(usize) -> Result<Duration>| -> Result<Duration> {
        let mut best = Duration::MAX;
        for i in 0..runs {
            best = best.min(f(i)?);
        }
        Ok(best)
    };
    let row = |what: &str, d: Duration, vs: Option<Duration>| {
        vec![
            what.to_owned(),
            fmt_d(d),
            format!("{:.0}", bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)),
            format!("{:.0}", files as f64 / d.as_secs_f64().max(1e-9)),
            vs.map_or_else(
                || "-".to_owned(),
                |t| format!("{:.2}x", t.as_secs_f64() / d.as_secs_f64().max(1e-9)),
            ),
        ]
    };
    let mut rows = Vec::new();
    for (label, layer, tar_args) in
        [("tar", &plain, &["-x", "-p", "-f"][..]), ("tar+gzip", &gz, &["-x", "-z", "-p", "-f"][..])]
    {
        let ours = best(&mut |i| wasnap_apply(layer, &fresh_dir(tmp.path(), &format!("w{i}"))?))?;
        let theirs = if have_tar {
            Some(best(&mut |i| tar_x(tar_args, layer, &fresh_dir(tmp.path(), &format!("t{i}"))?))?)
        } else {
            None
        };
        if let Some(t) = theirs {
            rows.push(row(
                &format!("tar -x{} (peer)", if label == "tar" { "" } else { "z" }),
                t,
                None,
            ));
        }
        rows.push(row(&format!("wasnap apply ({label})"), ours, theirs));
    }
    // Diff of the applied tree against nothing, into a sink.
    let applied = tmp.path().join("w0");
    for c in [Compression::None, Compression::Gzip] {
        let d = best(&mut |_| {
            let dir = File::open(&applied).context("open")?;
            let t = Instant::now();
            diff(Source::Trees { lower: None, upper: dir.as_fd() }, c, std::io::sink())?;
            Ok(t.elapsed())
        })?;
        rows.push(row(&format!("wasnap diff ({c})"), d, None));
    }
    table(out, &["OPERATION", "TIME", "MB/S", "FILES/S", "VS TAR"], &rows)?;
    if !have_tar {
        writeln!(out, "(tar not found: the peer rows are skipped)").map_err(io)?;
    }

    // Registering a chain that exists already.
    let host = Host::open_with(&tmp.path().join("root"), std::sync::Arc::new(Faults::new()))?;
    let sn = host.snapshotter(DEFAULT_SNAPSHOTTER)?;
    let ctx = Ctx::new("bench")?;
    let small = tmp.path().join("small.tar");
    write_layer(&small, 10, 100)?;
    let blob = host
        .content()
        .ingest(&ctx, &mut File::open(&small).context("open")?, None, &Labels::new())?
        .digest;
    let layers = host.layers(&sn);
    layers.register(&ctx, &blob, None, None, &Labels::new())?;
    let n = if smoke { 20 } else { 1000 };
    let samples = (0..n)
        .map(|_| timed(|| layers.register(&ctx, &blob, None, None, &Labels::new()).map(drop)))
        .collect::<Result<Vec<_>>>()?;
    let s = Stats::new(samples);
    writeln!(out).map_err(io)?;
    table(
        out,
        &["REGISTER AN EXISTING CHAIN", "N", "P50", "P99"],
        &[vec![
            "by the blob's diffID label".into(),
            s.n.to_string(),
            fmt_d(s.pct(0.5)),
            fmt_d(s.pct(0.99)),
        ]],
    )?;
    host.close()
}
