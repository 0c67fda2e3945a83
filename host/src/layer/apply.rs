//! Applying a layer tar stream into a directory: containerd's `archive.Apply` under the
//! OCI image-spec's layer rules, confined beneath the directory it is given.
//!
//! [`apply`] reads a tar stream (plain, gzip or zstd, detected from its first bytes unless
//! told), writes every entry beneath the `root` descriptor and returns the stream's
//! diffID: the sha256 of every uncompressed byte, read to the very end (the end-of-archive
//! blocks and any padding after them included).
//!
//! # Confinement
//!
//! The stream, the tree it lands in and whoever runs in that tree are all untrusted, and
//! the tree may change while the layer is applied. So:
//!
//! - a name is normalised (a leading `./`, `.` components and repeated slashes dropped)
//!   and refused (`InvalidArgument`, naming the entry) if it is empty, absolute or has a
//!   `..` component; a hard link's target the same way;
//! - an entry's parent is resolved one component at a time from `root` with `openat2`
//!   (`RESOLVE_BENEATH | NO_SYMLINKS | NO_MAGICLINKS | NO_XDEV`; `openat` with
//!   `O_NOFOLLOW` on kernels without it): a symlink anywhere on the way is refused
//!   ("would be written through symlink ..."), never followed, and a mount is never
//!   crossed. The same holds for a hard link's target, and in overlay mode for a missing
//!   parent that a lower layer has as a symlink. (containerd follows such symlinks within
//!   the root; layers written from a diff of real trees never need that);
//! - the entry itself is acted on by name in that directory with `*at` calls that never
//!   follow (`O_CREAT|O_EXCL|O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, `linkat` without
//!   `AT_SYMLINK_FOLLOW`, xattrs through the pinned parent), so nothing outside `root`
//!   is ever named. Parents are kept open in a small most-recently-used cache (entries
//!   come grouped by directory), dropped as soon as this layer removes them.
//!
//! # What is written
//!
//! Regular files, directories, symlinks, hard links, character and block devices (left
//! out, with a warning, in a user namespace, where none can be made, as containerd does)
//! and fifos, with the full mode (setuid, setgid, sticky; set after the owner, as `chown`
//! clears them), the owner (when running as root; skipped otherwise), modification and
//! access times to the nanosecond (PAX `mtime`/`atime` records with fractions honoured)
//! and extended attributes from PAX `SCHILY.xattr.*` records, parsed from the raw
//! extension header so that binary values survive. Attributes named `trusted.overlay.*`
//! or `user.overlay.*` are never taken from a tar (a layer could forge overlayfs
//! redirects and opaque markers with them): they are skipped with a warning. Directory
//! times (and, without root, modes that deny the owner access) are set at the very end,
//! deepest first, as writing children changes them. A missing parent directory is made
//! with mode 0755, owned by root; in overlay mode with lower layers it copies the mode,
//! owner, times and xattrs (not `trusted.*`, nor overlayfs's own) of the topmost lower
//! that has it, as containerd's copy up does.
//!
//! An existing entry is replaced (a whole tree if it is a directory, removed beneath its
//! parent without following anything), except that a directory over a directory keeps
//! the directory and its contents and takes the entry's metadata (its xattrs replace the
//! directory's, overlayfs's own excepted). A hard link's target is resolved beneath
//! `root`: in delete mode it may be anything in the tree, in overlay mode it must be in
//! the upper directory (a link to a lower layer's file cannot be made). An entry for the
//! root itself (`./`) is ignored, as containerd does.
//!
//! # Whiteouts
//!
//! `.wh.<name>` is never written itself (its directory is made if missing, as for any
//! entry). With [`Whiteouts::Delete`] it removes `<name>`; with [`Whiteouts::Overlay`]
//! it becomes a 0:0 character device. `.wh..wh..opq` makes its directory opaque: in
//! overlay mode the directory gets the opaque xattr set to `y`; in delete mode everything
//! below the directory that this layer did not write (nor needs as a parent of what it
//! wrote) is removed, so the marker may come before or after the directory's other
//! entries. Other `.wh..wh.` names (aufs metadata) are ignored.
//!
//! # Linked files
//!
//! A merge on a backend that cannot stack layers pipes each layer's change from the diff
//! into the applier. There regular files need not travel: [`apply_linked`] takes a
//! stream that [`diff_with`](super::diff::diff_with) wrote without file contents, whose
//! regular files have size 0 and the private PAX records `WASNAP.linksource=1` and
//! `WASNAP.linksize=<size>`, together with `link_from`, the tree that diff read. For such
//! an entry the file at the same path beneath `link_from` is resolved as a target's
//! parent is (one component at a time with `openat2`, no symlink followed, no mount
//! crossed), pinned `O_PATH | O_NOFOLLOW`, and taken only if the pin shows a regular file
//! with the size, mode, owner and time the entry announces. Whatever is at the target
//! path is replaced as for a regular file, and the pinned inode is hard-linked there
//! (`linkat` with `AT_EMPTY_PATH` given `CAP_DAC_READ_SEARCH`, otherwise through its
//! `/proc/self/fd` link): nothing is set on it, as the inode is the layer's too and
//! already carries exactly the entry's metadata. Where no link can be made (`EXDEV`:
//! another filesystem or a btrfs subvolume, after which the stream's other files are
//! copied at once; `EMLINK`; `EPERM`), or the file carries overlayfs's own xattrs where
//! overlayfs reads them (the source is an overlayfs layer, [`LinkFrom::overlay_layer`],
//! or the target an upper directory), its bytes are copied from the pin into a new file
//! that gets the entry's owner, mode and times and the source file's own xattrs, the
//! ones a link would have shared (the entry carries none: the diff reads none for a file
//! it does not open). overlayfs's xattrs are left out of a copy, and a file of an
//! overlayfs layer that overlayfs marks as a metacopy or redirect is refused, as its data
//! is in another layer. Between two plain trees a file is linked whatever its xattrs:
//! overlayfs's are inert there, as in the source tree that holds the same inode.
//! [`apply`] refuses every `WASNAP.*` record as invalid: a layer from outside cannot make
//! the applier link or read anything.
//! [`apply_linked_bytes`] applies such a stream held in memory on the calling thread,
//! which is how a merge applies the layers whose headers fit in a few megabytes.
//!
//! # Streaming
//!
//! A thread decompresses and hashes, handing 1 MiB chunks through a bounded channel to
//! the calling thread, which parses (the `tar` crate's `entries()`, for PAX and GNU long
//! names) and writes; file data is written straight from the chunks. Either side failing
//! stops the other. A corrupt or truncated stream is an error, as is a tar entry type
//! this does not know (PAX sparse files among them). Nothing is synced: the snapshot's
//! commit does that.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};

use cap_std::fs::Dir;
use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid};
use rustix::io::Errno;

use super::diff::{LINK_SIZE, LINK_SOURCE, PRIVATE_PREFIX};
use super::{Compression, WHITEOUT_OPAQUE, WHITEOUT_PREFIX, Whiteouts};
use crate::digest::{Digest, Hashing};
use crate::error::{Error, ErrorKind, Result};
use crate::fsutil::xattr::Node;
use crate::fsutil::{self, Meta};

/// How a layer is applied.
#[derive(Debug, Clone)]
pub struct ApplyOptions<'a> {
    /// How deletions are written.
    pub whiteouts: Whiteouts,
    /// The stream's compression; None = detect from its first bytes.
    pub compression: Option<Compression>,
    /// Overlay only: the lower directories under the upper dir being written, top first
    /// (may be empty). Used to find a missing parent directory's metadata and to refuse
    /// an entry whose parent is a symlink in a lower layer.
    pub lowers: Vec<BorrowedFd<'a>>,
}

impl Default for ApplyOptions<'_> {
    fn default() -> Self {
        ApplyOptions { whiteouts: Whiteouts::Delete, compression: None, lowers: Vec::new() }
    }
}

/// What [`apply`] read and wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// sha256 of the whole uncompressed tar stream (its diffID), read to its very end.
    pub diff_id: Digest,
    /// The stream's compression (as detected, or as given).
    pub compression: Compression,
    /// Bytes of the uncompressed stream.
    pub size: u64,
    /// Tar entries processed (whiteouts included; PAX global headers not).
    pub entries: u64,
}

/// Applies the layer tar stream `layer` into the directory `root` (see the module's
/// documentation for the rules). On error the tree is left partly written, but nothing
/// outside `root` has been touched. A stream carrying wasnap's private PAX records
/// (`WASNAP.*`) is refused: only [`apply_linked`] takes them.
pub fn apply(
    root: BorrowedFd<'_>,
    layer: impl Read + Send,
    opts: &ApplyOptions<'_>,
) -> Result<Applied> {
    apply_inner(root, layer, opts, None)
}

/// The tree a merge's stream links its regular files from: the one its diff read.
#[derive(Debug, Clone, Copy)]
pub struct LinkFrom<'a> {
    /// The tree.
    pub tree: BorrowedFd<'a>,
    /// It is an overlayfs layer directory, read as the change itself
    /// ([`Source::Overlay`](super::diff::Source::Overlay)): a file there may keep its
    /// data in a lower layer (overlayfs's metacopy and redirect), so each file's
    /// xattrs are looked at before it is linked. False: a plain tree, where nothing
    /// reads overlayfs's xattrs.
    pub overlay_layer: bool,
}

/// Applies a stream that [`diff_with`](super::diff::diff_with) wrote without file
/// contents from the tree `link_from` (a merge's own pipe, never a stream from outside):
/// each regular file is that tree's file at the same path, hard-linked into `root`, or
/// copied from it where a link cannot be made (another filesystem, a btrfs subvolume,
/// too many links). See the module's documentation, "Linked files".
pub fn apply_linked(
    root: BorrowedFd<'_>,
    layer: impl Read + Send,
    opts: &ApplyOptions<'_>,
    link_from: LinkFrom<'_>,
) -> Result<Applied> {
    apply_inner(root, layer, opts, Some(link_from))
}

/// [`apply_linked`] of a stream already in memory (a merge's small layer, written
/// without file contents and without digests by the diff): applied on this thread, with
/// no decoder thread or pipe, which cost more than the entries of a layer of a few
/// files, and not hashed, as nothing keeps the stream. Returns the entries applied.
pub fn apply_linked_bytes(
    root: BorrowedFd<'_>,
    stream: Vec<u8>,
    opts: &ApplyOptions<'_>,
    link_from: LinkFrom<'_>,
) -> Result<u64> {
    if opts.compression != Some(Compression::None) {
        return Err(Error::internal("a merge's stream in memory is never compressed"));
    }
    let (tx, rx) = mpsc::sync_channel::<Chunk>(1);
    if !stream.is_empty() {
        // The receiver is alive: the send cannot fail.
        let _ = tx.send(Ok(stream));
    }
    drop(tx);
    // Used chunks go back to no decoder; the sends fail and are ignored.
    let (spare_tx, _) = mpsc::channel::<Vec<u8>>();
    write_side(root, rx, spare_tx, opts, Some(link_from))
}

fn apply_inner(
    root: BorrowedFd<'_>,
    layer: impl Read + Send,
    opts: &ApplyOptions<'_>,
    link_from: Option<LinkFrom<'_>>,
) -> Result<Applied> {
    let (tx, rx) = mpsc::sync_channel::<Chunk>(QUEUE);
    let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
    let compression = opts.compression;
    std::thread::scope(|s| {
        let decoder = std::thread::Builder::new()
            .name("layer-decode".into())
            .spawn_scoped(s, move || decode(layer, compression, tx, spare_rx))
            .map_err(|e| Error::internal("start the layer decoder thread").caused_by(e))?;
        // The receiving end is dropped when this returns (or unwinds), which stops the
        // decoder at its next chunk: it never waits on a writer that is gone.
        let written = write_side(root, rx, spare_tx, opts, link_from);
        let decoded = decoder.join();
        let entries = written?;
        let decoded = decoded
            .map_err(|_| Error::internal("layer stream: the decoder thread panicked"))?
            .ok_or_else(|| Error::internal("layer stream: the decoder stopped without a result"))?;
        Ok(Applied {
            diff_id: decoded.diff_id,
            compression: decoded.compression,
            size: decoded.size,
            entries,
        })
    })
}

/// Uncompressed bytes per chunk handed from the decoder to the writer.
const CHUNK: usize = 1 << 20;
/// The first chunk's size; each next one is four times larger, up to [`CHUNK`].
const FIRST_CHUNK: usize = 64 << 10;
/// Chunks in flight between the two threads.
const QUEUE: usize = 4;
/// The buffer for the data of GNU sparse files (which the parser fills in).
const COPY_BUF: usize = 1 << 20;
/// The most bytes of extension headers (PAX, GNU long names) one entry may have.
const MAX_EXTENSIONS: usize = 16 << 20;
/// Parent directories kept open.
const OPEN_DIRS: usize = 32;

// ---------------------------------------------------------------------------------------
// The decoder thread.

/// A chunk of the uncompressed stream, or why there are no more.
type Chunk = std::result::Result<Vec<u8>, Error>;

/// The decoder's result once it read the stream to its end.
#[derive(Debug)]
struct Decoded {
    compression: Compression,
    diff_id: Digest,
    size: u64,
}

/// Reads `layer` to its end, decompressing and hashing, and sends the uncompressed bytes
/// in chunks. `None` when it failed (the error went down the channel) or the writer hung
/// up.
fn decode(
    layer: impl Read + Send,
    compression: Option<Compression>,
    tx: SyncSender<Chunk>,
    spare: Receiver<Vec<u8>>,
) -> Option<Decoded> {
    let source_failed = Arc::new(AtomicBool::new(false));
    let source = BufReader::with_capacity(
        256 << 10,
        Source { inner: layer, failed: Arc::clone(&source_failed) },
    );
    let started = match compression {
        Some(c) => c.decoder(source).map(|d| (c, d)),
        None => Compression::detect_decoder(source),
    };
    let (compression, reader) = match started {
        Ok(started) => started,
        Err(e) => {
            let _ = tx.send(Err(e.context("layer stream")));
            return None;
        }
    };
    let mut reader = Hashing::new(reader);
    // Small first: most layers of a merge are small, and a chunk is zeroed before use.
    let mut chunk = FIRST_CHUNK;
    loop {
        let mut buf = spare.try_recv().unwrap_or_default();
        buf.resize(chunk, 0);
        let mut filled = 0;
        while filled < chunk {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let failed = source_failed.load(Ordering::Relaxed);
                    let _ = tx.send(Err(decode_error(e, compression, failed)));
                    return None;
                }
            }
        }
        buf.truncate(filled);
        let end = filled < chunk;
        chunk = (chunk * 4).min(CHUNK);
        if filled > 0 && tx.send(Ok(buf)).is_err() {
            return None;
        }
        if end {
            break;
        }
    }
    let (_, diff_id, size) = reader.finish();
    Some(Decoded { compression, diff_id, size })
}

/// A failure while decoding: the source's own read failing is the host's trouble, a
/// decompressor refusing the bytes is the stream's.
fn decode_error(e: io::Error, compression: Compression, source_failed: bool) -> Error {
    if source_failed || compression == Compression::None {
        Error::internal(format!("read the layer stream: {e}")).caused_by(e)
    } else {
        Error::invalid_argument(format!(
            "layer stream: the {compression} data is corrupt or truncated: {e}"
        ))
        .caused_by(e)
    }
}

/// The caller's reader, noting whether it failed (as opposed to the decompressor).
struct Source<R> {
    inner: R,
    failed: Arc<AtomicBool>,
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if e.kind() != io::ErrorKind::Interrupted {
                self.failed.store(true, Ordering::Relaxed);
            }
        })
    }
}

// ---------------------------------------------------------------------------------------
// The writer's side of the channel.

/// The uncompressed stream as the writer reads it: chunks from the decoder, with the
/// offset read so far and, while recording, a copy of what was read (the headers of the
/// next entry, so its PAX records can be parsed from their raw bytes).
struct Chunks {
    rx: Receiver<Chunk>,
    spare: Sender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    offset: u64,
    record: Option<Vec<u8>>,
    /// Bytes already consumed by [`Chunks::write_to`] that the tar parser has yet to read
    /// (as the rest of the entry's data): its reads of them copy nothing.
    owed: u64,
    /// Why the stream stopped: the decoder's error, or too many extension bytes.
    fault: Option<Error>,
    ended: bool,
}

impl Chunks {
    fn new(rx: Receiver<Chunk>, spare: Sender<Vec<u8>>) -> Chunks {
        Chunks {
            rx,
            spare,
            cur: Vec::new(),
            pos: 0,
            offset: 0,
            record: None,
            owed: 0,
            fault: None,
            ended: false,
        }
    }

    /// Makes sure unread bytes are at hand; false at the end of the stream.
    fn fill(&mut self) -> io::Result<bool> {
        while self.pos == self.cur.len() {
            if let Some(fault) = &self.fault {
                return Err(io::Error::other(fault.clone()));
            }
            if self.ended {
                return Ok(false);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    let used = std::mem::replace(&mut self.cur, chunk);
                    self.pos = 0;
                    if used.capacity() > 0 {
                        // The decoder may be gone already; then the buffer is just freed.
                        let _ = self.spare.send(used);
                    }
                }
                Ok(Err(e)) => self.fault = Some(e),
                Err(mpsc::RecvError) => self.ended = true,
            }
        }
        Ok(true)
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.owed > 0 {
            // Only the rest of an entry written by `write_to` is read here, to be dropped:
            // `buf` is left as it is.
            let n = usize::try_from(self.owed).unwrap_or(usize::MAX).min(buf.len());
            self.owed -= n as u64;
            return Ok(n);
        }
        if buf.is_empty() || !self.fill()? {
            return Ok(0);
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        let bytes = &self.cur[self.pos..self.pos + n];
        if let Some(record) = &mut self.record {
            if record.len() + n > MAX_EXTENSIONS {
                let e = Error::invalid_argument(format!(
                    "layer stream: an entry's extension headers exceed {} MiB",
                    MAX_EXTENSIONS >> 20
                ));
                self.fault = Some(e.clone());
                return Err(io::Error::other(e));
            }
            record.extend_from_slice(bytes);
        }
        buf[..n].copy_from_slice(bytes);
        self.pos += n;
        self.offset += n as u64;
        Ok(n)
    }

    /// Writes the next `len` bytes of the stream (an entry's data, which the parser has
    /// not read yet) to `out` straight from the chunks, and owes them to the parser.
    /// Returns how many were written: fewer only where the stream ends.
    fn write_to(&mut self, out: &mut File, len: u64) -> std::result::Result<u64, Direct> {
        debug_assert!(self.owed == 0 && self.record.is_none());
        let mut done = 0;
        while done < len && self.fill().map_err(Direct::Stream)? {
            let n =
                usize::try_from(len - done).unwrap_or(usize::MAX).min(self.cur.len() - self.pos);
            out.write_all(&self.cur[self.pos..self.pos + n]).map_err(Direct::Write)?;
            self.pos += n;
            self.offset += n as u64;
            self.owed += n as u64;
            done += n as u64;
        }
        Ok(done)
    }

    /// Starts copying what is read into `buf`; returns the stream offset it starts at.
    fn record_start(&mut self, mut buf: Vec<u8>) -> u64 {
        debug_assert_eq!(self.owed, 0);
        buf.clear();
        self.record = Some(buf);
        self.offset
    }

    fn record_stop(&mut self) -> Vec<u8> {
        self.record.take().unwrap_or_default()
    }

    /// Reads and drops the rest of the stream, so the decoder hashes all of it.
    fn drain(&mut self) -> io::Result<()> {
        self.pos = self.cur.len();
        while self.fill()? {
            self.offset += (self.cur.len() - self.pos) as u64;
            self.pos = self.cur.len();
        }
        Ok(())
    }
}

/// Why [`Chunks::write_to`] stopped.
enum Direct {
    /// Reading the stream failed.
    Stream(io::Error),
    /// Writing the file failed.
    Write(io::Error),
}

/// The reader the tar parser is given; the writer keeps access to the chunks through the
/// same cell (to record headers and to learn why a read failed).
struct Feed<'c>(&'c RefCell<Chunks>);

impl Read for Feed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

/// A failed read of the tar stream: the decoder's own error if that is what stopped it,
/// otherwise the tar parser's complaint about the bytes (bad input).
fn stream_error(chunks: &RefCell<Chunks>, e: io::Error, what: impl fmt::Display) -> Error {
    match &chunks.borrow().fault {
        Some(fault) => fault.clone().context(what),
        None => Error::invalid_argument(format!("{what}: {e}")).caused_by(e),
    }
}

fn write_side(
    root: BorrowedFd<'_>,
    rx: Receiver<Chunk>,
    spare: Sender<Vec<u8>>,
    opts: &ApplyOptions<'_>,
    link_from: Option<LinkFrom<'_>>,
) -> Result<u64> {
    let chunks = RefCell::new(Chunks::new(rx, spare));
    let mut applier = Applier::new(root, opts, link_from)?;
    let entries = applier.entries(&chunks)?;
    chunks
        .borrow_mut()
        .drain()
        .map_err(|e| stream_error(&chunks, e, "layer stream after the end of the archive"))?;
    applier.finish()?;
    if applier.skipped_devices > 0 {
        tracing::warn!(
            count = applier.skipped_devices,
            "layer applied without its device nodes: none can be made in a user namespace"
        );
    }
    Ok(entries)
}

// ---------------------------------------------------------------------------------------
// Names and errors.

/// A path from the stream, quoted for messages (and cut short if very long).
struct Name<'a>(&'a [u8]);

impl fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 512;
        if self.0.len() > SHOWN {
            let head = String::from_utf8_lossy(&self.0[..SHOWN]);
            write!(f, "{head:?}... ({} bytes)", self.0.len())
        } else {
            write!(f, "{:?}", String::from_utf8_lossy(self.0))
        }
    }
}

/// What an error concerns: the entry as the tar names it, and the hard link target being
/// resolved if that is what failed.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    raw: &'a [u8],
    target: Option<&'a [u8]>,
}

impl fmt::Display for Ctx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layer entry {}", Name(self.raw))
    }
}

impl Ctx<'_> {
    fn entry(raw: &[u8]) -> Ctx<'_> {
        Ctx { raw, target: None }
    }

    /// Bad input.
    fn bad(self, why: impl fmt::Display) -> Error {
        Error::invalid_argument(format!("{self}: {why}"))
    }

    /// A system call that failed: the host's trouble, unless the layer asked for a name
    /// or an xattr larger than the filesystem takes.
    fn sys(self, op: impl fmt::Display) -> impl FnOnce(Errno) -> Error {
        move |e| match e {
            Errno::NAMETOOLONG | Errno::TOOBIG | Errno::RANGE => {
                let cause = io::Error::from(e);
                Error::invalid_argument(format!("{self}: {op}: {cause}")).caused_by(cause)
            }
            e => Error::from(e).context(format!("{self}: {op}")),
        }
    }

    fn through_symlink(self, at: &[u8], lower: bool) -> Error {
        let lower = if lower { " in a lower layer" } else { "" };
        match self.target {
            Some(t) => self.bad(format!(
                "hard link target {} passes through symlink {}{lower}",
                Name(t),
                Name(at)
            )),
            None => self.bad(format!("would be written through symlink {}{lower}", Name(at))),
        }
    }

    fn not_dir(self, at: &[u8], lower: bool) -> Error {
        let lower = if lower { " in a lower layer" } else { "" };
        self.bad(format!("{} is not a directory{lower}", Name(at)))
    }

    fn mount(self, at: &[u8]) -> Error {
        Error::failed_precondition(format!(
            "{self}: {} is a mount point, which is never crossed",
            Name(at)
        ))
    }
}

/// A tar path as components joined by `/` (empty for the root itself); refuses empty,
/// absolute and `..` paths.
fn normalize(raw: &[u8]) -> std::result::Result<Vec<u8>, &'static str> {
    if raw.is_empty() {
        return Err("empty name");
    }
    if raw[0] == b'/' {
        return Err("absolute path");
    }
    if raw.contains(&0) {
        return Err("name contains a NUL byte");
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("path has a \"..\" component"),
            comp => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(comp);
            }
        }
    }
    Ok(out)
}

/// The parent's path and the last component of a normalized, non-empty path.
fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parent.len() + 1 + name.len());
    if !parent.is_empty() {
        out.extend_from_slice(parent);
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

fn os(name: &[u8]) -> &OsStr {
    OsStr::from_bytes(name)
}

fn dir_of(fd: OwnedFd) -> Dir {
    Dir::from_std_file(File::from(fd))
}

// ---------------------------------------------------------------------------------------
// Headers.

/// The PAX records of one entry, parsed from the raw extension header (the `tar` crate's
/// own parser splits records at newlines, which binary xattr values may contain).
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    mtime: Option<Timespec>,
    atime: Option<Timespec>,
    uid: Option<u64>,
    gid: Option<u64>,
    size: Option<u64>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    sparse: bool,
    /// Private records (`WASNAP.*`): the entry is a file to link ([`LINK_SOURCE`]) of
    /// the real size [`LINK_SIZE`]; `private` is set by any of them, known or not.
    private: Option<Private>,
}

/// What an entry's private PAX records say.
#[derive(Default)]
struct Private {
    link_source: bool,
    link_size: Option<u64>,
    /// A private record this version does not know.
    unknown: Option<Vec<u8>>,
}

impl Pax {
    fn parse(mut data: &[u8]) -> std::result::Result<Pax, String> {
        let mut pax = Pax::default();
        while !data.is_empty() {
            if data.iter().all(|&b| b == 0) {
                break;
            }
            let malformed = || "malformed PAX extended header".to_owned();
            let space = data.iter().position(|&b| b == b' ').ok_or_else(malformed)?;
            let len: usize = std::str::from_utf8(&data[..space])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(malformed)?;
            if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
                return Err(malformed());
            }
            let record = &data[space + 1..len - 1];
            data = &data[len..];
            let eq = record.iter().position(|&b| b == b'=').ok_or_else(malformed)?;
            let (key, value) = (&record[..eq], &record[eq + 1..]);
            let number = |what: &str| {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| format!("PAX {what} {} is not a number", Name(value)))
            };
            let time = |what: &str| {
                parse_time(value).ok_or_else(|| format!("PAX {what} {} is not a time", Name(value)))
            };
            // An empty value deletes the record (POSIX): the header's field applies.
            let text = || (!value.is_empty()).then(|| value.to_vec());
            match key {
                b"path" => pax.path = text(),
                b"linkpath" => pax.linkpath = text(),
                b"mtime" if !value.is_empty() => pax.mtime = Some(time("mtime")?),
                b"atime" if !value.is_empty() => pax.atime = Some(time("atime")?),
                b"uid" if !value.is_empty() => pax.uid = Some(number("uid")?),
                b"gid" if !value.is_empty() => pax.gid = Some(number("gid")?),
                b"size" if !value.is_empty() => pax.size = Some(number("size")?),
                _ if key.starts_with(b"SCHILY.xattr.") => {
                    let name = &key[b"SCHILY.xattr.".len()..];
                    if name.is_empty() || name.contains(&0) {
                        return Err(format!("PAX xattr name {} is not valid", Name(key)));
                    }
                    pax.xattrs.push((name.to_vec(), value.to_vec()));
                }
                _ if key.starts_with(b"GNU.sparse.") => pax.sparse = true,
                _ if key.starts_with(PRIVATE_PREFIX.as_bytes()) => {
                    let private = pax.private.get_or_insert_with(Private::default);
                    if key == LINK_SOURCE.as_bytes() {
                        if value != b"1" {
                            return Err(format!("PAX {} {} is not 1", Name(key), Name(value)));
                        }
                        private.link_source = true;
                    } else if key == LINK_SIZE.as_bytes() {
                        private.link_size = Some(number("link size")?);
                    } else if private.unknown.is_none() {
                        private.unknown = Some(key.to_vec());
                    }
                }
                _ => {}
            }
        }
        Ok(pax)
    }
}

/// A PAX time: decimal seconds since the epoch with an optional fraction, possibly
/// negative (`-1.5` is half a second before `-1`).
fn parse_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    // Digits past nanoseconds are dropped; fewer are padded.
    let nanos = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(9)
        .fold(0i64, |n, digit| n * 10 + i64::from(digit - b'0'));
    Some(if !negative {
        Timespec { tv_sec: secs, tv_nsec: nanos as _ }
    } else if nanos == 0 {
        Timespec { tv_sec: -secs, tv_nsec: 0 }
    } else {
        Timespec { tv_sec: -secs - 1, tv_nsec: (1_000_000_000 - nanos) as _ }
    })
}

/// The raw data of the extension headers before one entry (the last of each kind).
#[derive(Default)]
struct Extensions<'a> {
    /// The PAX extended header's records.
    pax: Option<&'a [u8]>,
    /// A GNU long name (`L`).
    long_name: Option<&'a [u8]>,
    /// A GNU long link target (`K`).
    long_link: Option<&'a [u8]>,
}

/// The extension headers that apply to the entry whose header is at `header_pos`, from
/// the bytes recorded since `start` (the previous entry's padding, its extension
/// headers, its header).
fn extension_data(recorded: &[u8], start: u64, header_pos: u64) -> Result<Extensions<'_>> {
    let mut ext = Extensions::default();
    let first = start.next_multiple_of(512);
    if header_pos <= first {
        return Ok(ext);
    }
    let lost = || Error::internal("layer stream: the tar extension headers could not be located");
    let mut pos = first;
    while pos < header_pos {
        let off = usize::try_from(pos - start).map_err(|_| lost())?;
        let block = recorded.get(off..off + 512).ok_or_else(lost)?;
        let header = tar::Header::from_byte_slice(block);
        let size = header.entry_size().map_err(|_| lost())?;
        let len = usize::try_from(size).map_err(|_| lost())?;
        let data = || recorded.get(off + 512..off + 512 + len).ok_or_else(lost);
        let kind = header.entry_type();
        if kind.is_pax_local_extensions() {
            ext.pax = Some(data()?);
        } else if kind.is_gnu_longname() {
            ext.long_name = Some(data()?);
        } else if kind.is_gnu_longlink() {
            ext.long_link = Some(data()?);
        }
        pos = pos.checked_add(512 + size.next_multiple_of(512)).ok_or_else(lost)?;
    }
    if pos != header_pos {
        return Err(lost());
    }
    Ok(ext)
}

/// A GNU long name's text: up to its first NUL, as Go's `archive/tar` reads it; None if
/// that is empty, which Go takes for no long name at all.
fn c_string(data: Option<&[u8]>) -> Option<Vec<u8>> {
    let text = data?.split(|&b| b == 0).next().unwrap_or_default();
    (!text.is_empty()).then(|| text.to_vec())
}

/// A numeric header field as parsed, except that an empty one (all NULs or spaces, as
/// some writers leave fields they do not use) is zero, as Go's `archive/tar` reads it.
fn numeric<T: Default>(field: &[u8], parsed: io::Result<T>) -> io::Result<T> {
    if field.iter().all(|&b| b == 0 || b == b' ') { Ok(T::default()) } else { parsed }
}

/// A header's time field, in seconds since the epoch: as [`numeric`], or, with the
/// top bit of its first byte set, a base-256 number (the rest of the field, big-endian
/// two's complement), which is how GNU tar and Go write times before 1970 and Go's
/// `archive/tar` reads them. The tar crate reads base-256 as unsigned only.
fn time_field(field: &[u8], parsed: io::Result<u64>) -> io::Result<i64> {
    let out_of_range = || io::Error::new(io::ErrorKind::InvalidData, "out of range");
    match field.first() {
        Some(&first) if first & 0x80 != 0 && field.len() <= 12 => {
            // At most 95 bits after the marker bit: an i128 holds them.
            let bits = field.len() * 8 - 1;
            let raw =
                field[1..].iter().fold(i128::from(first & 0x7f), |v, &b| (v << 8) | i128::from(b));
            let value = if raw >> (bits - 1) & 1 == 1 { raw - (1i128 << bits) } else { raw };
            i64::try_from(value).map_err(|_| out_of_range())
        }
        _ => i64::try_from(numeric(field, parsed)?).map_err(|_| out_of_range()),
    }
}

/// Makes `name` in `dir` an overlayfs whiteout: a 0:0 character device.
fn make_whiteout(dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<()> {
    rustix::fs::mknodat(
        dir,
        name,
        FileType::CharacterDevice,
        Mode::empty(),
        rustix::fs::makedev(0, 0),
    )
}

/// What a tar entry is, as far as the tree is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    /// A regular file; a GNU sparse one has its holes filled in by the parser.
    File {
        sparse: bool,
    },
    Symlink,
    Link,
    Node(FileType),
}

/// An entry's metadata.
struct Attrs {
    mode: u32,
    uid: u32,
    gid: u32,
    times: Timestamps,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Attrs {
    /// Whether the entry carries a POSIX access ACL, which sets the group bits.
    fn has_access_acl(&self) -> bool {
        self.xattrs.iter().any(|(name, _)| name == b"system.posix_acl_access")
    }

    fn read(header: &tar::Header, pax: &mut Pax, ctx: Ctx<'_>) -> Result<Attrs> {
        let field = |what: &str, e: io::Error| ctx.bad(format!("header field {what}: {e}"));
        let old = header.as_old();
        let mode = numeric(&old.mode, header.mode()).map_err(|e| field("mode", e))? & 0o7777;
        let id = |pax: Option<u64>, header: io::Result<u64>, what: &str| -> Result<u32> {
            let id = match pax {
                Some(id) => id,
                None => header.map_err(|e| field(what, e))?,
            };
            u32::try_from(id).map_err(|_| ctx.bad(format!("{what} {id} is out of range")))
        };
        let uid = id(pax.uid, numeric(&old.uid, header.uid()), "uid")?;
        let gid = id(pax.gid, numeric(&old.gid, header.gid()), "gid")?;
        let mtime = match pax.mtime {
            Some(t) => t,
            None => {
                let secs = time_field(&old.mtime, header.mtime()).map_err(|e| field("mtime", e))?;
                Timespec { tv_sec: secs, tv_nsec: 0 }
            }
        };
        let gnu_atime = header
            .as_gnu()
            .and_then(|g| time_field(&g.atime, g.atime()).ok())
            .filter(|&t| t != 0)
            .map(|t| Timespec { tv_sec: t, tv_nsec: 0 });
        let atime = pax.atime.or(gnu_atime).unwrap_or(mtime);
        Ok(Attrs {
            mode,
            uid,
            gid,
            times: Timestamps { last_access: atime, last_modification: mtime },
            xattrs: std::mem::take(&mut pax.xattrs),
        })
    }

    fn perms(&self) -> Mode {
        Mode::from_raw_mode(self.mode)
    }
}

/// A directory whose times (and, without root, mode) are set at the end.
struct Deferred {
    path: Vec<u8>,
    id: (u64, u64),
    times: Option<Timestamps>,
    mode: Option<Mode>,
}

/// What the topmost lower layer that has a path has there.
enum Lower {
    Missing,
    /// A directory: its metadata, and an `O_PATH` pin of it.
    Dir(Meta, OwnedFd),
    Symlink(Vec<u8>),
    NotDir(Vec<u8>),
}

// ---------------------------------------------------------------------------------------
// The writer.

struct Applier<'o> {
    root: Rc<Dir>,
    /// The tree a linked file is taken from (see [`apply_linked`]), if any.
    link_from: Option<BorrowedFd<'o>>,
    /// The last directory of `link_from` a linked file was found in, and its path.
    source_dir: Option<(Vec<u8>, OwnedFd)>,
    /// Hard links from `link_from` can be made (false once one failed with `EXDEV`: the
    /// two trees are on different filesystems or subvolumes, and every file is copied).
    links: bool,
    /// `link_from` is an overlayfs layer ([`LinkFrom::overlay_layer`]).
    source_overlay: bool,
    /// A file is linked only if it carries none of overlayfs's xattrs: `link_from` is an
    /// overlayfs layer, or the target an overlayfs upper directory, where overlayfs
    /// reads them (see [`Applier::linked`]).
    check_overlay: bool,
    /// Whether `linkat(AT_EMPTY_PATH)` works here (it needs `CAP_DAC_READ_SEARCH`);
    /// unknown until tried.
    empty_path: Option<bool>,
    /// Open parent directories by path, least recently used first.
    cache: Vec<(Vec<u8>, Rc<Dir>)>,
    whiteouts: Whiteouts,
    lowers: &'o [BorrowedFd<'o>],
    root_user: bool,
    /// Device nodes left out: a user namespace can make none.
    skipped_devices: u64,
    /// Delete mode: every path this layer wrote or needs as a parent of what it wrote;
    /// what an opaque directory keeps.
    kept: HashSet<Vec<u8>>,
    dirs: Vec<Deferred>,
    buf: Vec<u8>,
}

impl<'o> Applier<'o> {
    fn new(
        root: BorrowedFd<'_>,
        opts: &'o ApplyOptions<'o>,
        link_from: Option<LinkFrom<'o>>,
    ) -> Result<Applier<'o>> {
        // Pinned: `.` is the directory given; a readable descriptor (the one given may be
        // O_PATH) so that the root itself can carry an opaque xattr.
        let fd = rustix::fs::openat(
            root,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::from(e).context("apply layer: open the target directory"))?;
        Ok(Applier {
            root: Rc::new(dir_of(fd)),
            link_from: link_from.map(|l| l.tree),
            source_dir: None,
            links: true,
            source_overlay: link_from.is_some_and(|l| l.overlay_layer),
            check_overlay: link_from.is_some_and(|l| l.overlay_layer)
                || opts.whiteouts != Whiteouts::Delete,
            empty_path: None,
            cache: Vec::with_capacity(OPEN_DIRS),
            whiteouts: opts.whiteouts,
            lowers: &opts.lowers,
            root_user: rustix::process::geteuid().is_root(),
            skipped_devices: 0,
            kept: HashSet::new(),
            dirs: Vec::new(),
            buf: Vec::new(),
        })
    }

    fn delete_mode(&self) -> bool {
        self.whiteouts == Whiteouts::Delete
    }

    /// Reads and applies every entry; returns how many.
    fn entries(&mut self, chunks: &RefCell<Chunks>) -> Result<u64> {
        let mut archive = tar::Archive::new(Feed(chunks));
        let mut iter =
            archive.entries().map_err(|e| stream_error(chunks, e, "layer stream: read"))?;
        let mut recorded = Vec::new();
        let mut scratch = vec![0; 64 << 10];
        let mut count = 0u64;
        let mut last: Vec<u8> = Vec::new();
        loop {
            let start = chunks.borrow_mut().record_start(recorded);
            let next = iter.next();
            recorded = chunks.borrow_mut().record_stop();
            let mut entry = match next {
                None => return Ok(count),
                Some(Ok(entry)) => entry,
                Some(Err(e)) => {
                    let what = if count == 0 {
                        "layer stream: the first tar header".to_owned()
                    } else {
                        format!("layer stream: the tar header after entry {}", Name(&last))
                    };
                    return Err(stream_error(chunks, e, what));
                }
            };
            fsutil::deadline::check("apply layer")?;
            if !entry.header().entry_type().is_pax_global_extensions() {
                count += 1;
                let ext = extension_data(&recorded, start, entry.raw_header_position())?;
                last = self.entry(&mut entry, ext, chunks)?;
            }
            // Whatever data the entry has left is read here, not while recording the next
            // entry's headers (data written straight from the chunks is only counted).
            loop {
                match entry.read(&mut scratch) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let what = format!("layer entry {}: read data", Name(&last));
                        return Err(stream_error(chunks, e, what));
                    }
                }
            }
        }
    }

    /// Applies one entry; returns its name as the tar gave it.
    ///
    /// Its name and link target are read as Go's `archive/tar` (containerd's) reads them,
    /// never through the tar crate's own PAX lookup, which skips malformed records and so
    /// could find a `path` record inside an xattr's value: a GNU long name (or link) wins,
    /// then the PAX record, then the header's field. The same layer then unpacks to the
    /// same tree here as in containerd and in the scanners that vetted it.
    fn entry(
        &mut self,
        entry: &mut tar::Entry<'_, Feed<'_>>,
        ext: Extensions<'_>,
        chunks: &RefCell<Chunks>,
    ) -> Result<Vec<u8>> {
        let mut pax = match ext.pax {
            Some(data) => {
                Pax::parse(data).map_err(|why| Ctx::entry(&entry.path_bytes()).bad(why))?
            }
            None => Pax::default(),
        };
        let raw = match (c_string(ext.long_name), pax.path.take()) {
            (Some(long), _) => long,
            (None, Some(path)) => path,
            (None, None) => entry.header().path_bytes().into_owned(),
        };
        let ctx = Ctx::entry(&raw);
        let linked = self.linked_size(pax.private.take(), ctx)?;
        let not_linkable = || ctx.bad("a linked file's entry is not a regular file without data");
        let path = normalize(&raw).map_err(|why| ctx.bad(why))?;
        if linked.is_some()
            && (path.is_empty() || split_last(&path).1.starts_with(WHITEOUT_PREFIX.as_bytes()))
        {
            return Err(not_linkable());
        }
        if path.is_empty() {
            tracing::debug!(entry = %Name(&raw), "layer entry for the root directory ignored");
            return Ok(raw);
        }
        let (parent, name) = split_last(&path);
        if name.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            self.whiteout(parent, name, ctx)?;
            return Ok(raw);
        }
        if pax.sparse {
            return Err(ctx.bad("PAX sparse files are not supported"));
        }
        if let Some(size) = pax.size
            && size != entry.size()
        {
            return Err(
                ctx.bad(format!("PAX size {size} differs from the size read ({})", entry.size()))
            );
        }
        let header = entry.header();
        let kind = header.entry_type();
        let kind = if kind.is_dir() {
            Kind::Dir
        } else if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
            // Old tars mark directories with a trailing slash only.
            if raw.ends_with(b"/") {
                Kind::Dir
            } else {
                Kind::File { sparse: kind.is_gnu_sparse() }
            }
        } else if kind.is_symlink() {
            Kind::Symlink
        } else if kind.is_hard_link() {
            Kind::Link
        } else if kind.is_character_special() {
            Kind::Node(FileType::CharacterDevice)
        } else if kind.is_block_special() {
            Kind::Node(FileType::BlockDevice)
        } else if kind.is_fifo() {
            Kind::Node(FileType::Fifo)
        } else {
            let byte = kind.as_byte();
            return Err(
                ctx.bad(format!("unsupported tar entry type {:?} ({byte})", char::from(byte)))
            );
        };
        if linked.is_some() && (kind != Kind::File { sparse: false } || entry.size() != 0) {
            return Err(not_linkable());
        }
        let attrs = Attrs::read(header, &mut pax, ctx)?;
        let link = match kind {
            Kind::Symlink | Kind::Link => {
                Some(match (c_string(ext.long_link), pax.linkpath.take()) {
                    (Some(long), _) => long,
                    (None, Some(link)) => link,
                    (None, None) => header
                        .link_name_bytes()
                        .map(|l| l.into_owned())
                        .ok_or_else(|| ctx.bad("no link target"))?,
                })
            }
            _ => None,
        };
        let device = match kind {
            Kind::Node(FileType::CharacterDevice | FileType::BlockDevice) => {
                // Where ustar and GNU headers keep the device numbers.
                let raw_header = header.as_bytes();
                let num = |field: &[u8], n: io::Result<Option<u32>>| {
                    numeric(field, n)
                        .map(Option::unwrap_or_default)
                        .map_err(|e| ctx.bad(format!("device number: {e}")))
                };
                rustix::fs::makedev(
                    num(&raw_header[329..337], header.device_major())?,
                    num(&raw_header[337..345], header.device_minor())?,
                )
            }
            _ => 0,
        };
        let dir = self.parent_dir(parent, ctx)?;
        match (kind, link) {
            (Kind::Dir, _) => self.directory(&dir, name, &path, &attrs, ctx)?,
            (Kind::File { sparse }, _) => match linked {
                Some(size) => self.linked(&dir, name, &path, &attrs, size, ctx)?,
                None => self.file(&dir, name, &path, &attrs, (entry, sparse), chunks, ctx)?,
            },
            (Kind::Symlink, Some(target)) => {
                self.symlink(&dir, name, &path, &target, &attrs, ctx)?;
            }
            (Kind::Link, Some(target)) => self.hardlink(&dir, name, &path, &target, ctx)?,
            (Kind::Node(kind), _) => self.node(&dir, name, &path, kind, device, &attrs, ctx)?,
            (Kind::Symlink | Kind::Link, None) => return Err(ctx.bad("no link target")),
        }
        if self.delete_mode() {
            self.keep(&path, true);
        }
        Ok(raw)
    }

    /// Notes `path` (if `itself`) and its ancestors as this layer's.
    fn keep(&mut self, path: &[u8], itself: bool) {
        if itself {
            // Nearly always new: one lookup.
            self.kept.insert(path.to_vec());
        }
        let mut p = path;
        while let Some(slash) = p.iter().rposition(|&b| b == b'/') {
            p = &p[..slash];
            if self.kept.contains(p) {
                break;
            }
            self.kept.insert(p.to_vec());
        }
    }

    // -- Resolving directories.

    /// The directory at `path`, made (with its missing ancestors) if it is missing.
    fn parent_dir(&mut self, path: &[u8], ctx: Ctx<'_>) -> Result<Rc<Dir>> {
        self.resolve(path, true, ctx)?
            .ok_or_else(|| Error::internal(format!("{ctx}: parent directory was not made")))
    }

    /// The directory at `path` beneath the root, component by component, never following
    /// a symlink nor crossing a mount; `None` if missing (and not to be made).
    fn resolve(&mut self, path: &[u8], create: bool, ctx: Ctx<'_>) -> Result<Option<Rc<Dir>>> {
        if path.is_empty() {
            return Ok(Some(Rc::clone(&self.root)));
        }
        if let Some(dir) = self.cached(path) {
            return Ok(Some(dir));
        }
        // Start from the deepest ancestor already open.
        let (mut cur, mut start) = (Rc::clone(&self.root), 0);
        let mut end = path.len();
        while let Some(slash) = path[..end].iter().rposition(|&b| b == b'/') {
            if let Some(dir) = self.cached(&path[..slash]) {
                (cur, start) = (dir, slash + 1);
                break;
            }
            end = slash;
        }
        loop {
            let stop =
                path[start..].iter().position(|&b| b == b'/').map_or(path.len(), |i| start + i);
            let here = &path[..stop];
            let Some(next) = self.step(&cur, &path[start..stop], here, create, ctx)? else {
                return Ok(None);
            };
            let next = Rc::new(next);
            self.remember(here, Rc::clone(&next));
            cur = next;
            if stop == path.len() {
                return Ok(Some(cur));
            }
            start = stop + 1;
        }
    }

    /// Opens the directory `comp` of `cur` (which is at `here`).
    fn step(
        &mut self,
        cur: &Dir,
        comp: &[u8],
        here: &[u8],
        create: bool,
        ctx: Ctx<'_>,
    ) -> Result<Option<Dir>> {
        let name = Path::new(os(comp));
        // A few rounds, in case the entry changes between a failed open and its lstat.
        for _ in 0..4 {
            // In tree: beneath `cur`, no symlink followed, no mount crossed.
            match fsutil::open_in_tree(cur, name, OFlags::RDONLY | OFlags::DIRECTORY) {
                Ok(fd) => return Ok(Some(dir_of(fd))),
                Err(Errno::NOENT) if !create => return Ok(None),
                Err(Errno::NOENT) => {
                    if let Some(fd) = self.make_dir(cur, comp, here, ctx)? {
                        return Ok(Some(dir_of(fd)));
                    }
                }
                Err(Errno::LOOP | Errno::NOTDIR) => match fsutil::lstat_at(cur, name) {
                    Ok(m) if m.file_type() == FileType::Symlink => {
                        return Err(ctx.through_symlink(here, false));
                    }
                    Ok(m) if m.file_type() != FileType::Directory => {
                        return Err(ctx.not_dir(here, false));
                    }
                    Ok(_) | Err(Errno::NOENT) => {}
                    Err(e) => return Err(ctx.sys(format!("lstat {}", Name(here)))(e)),
                },
                Err(Errno::XDEV) => return Err(ctx.mount(here)),
                Err(e) => return Err(ctx.sys(format!("open directory {}", Name(here)))(e)),
            }
        }
        Err(Error::internal(format!("{ctx}: directory {} keeps changing", Name(here))))
    }

    /// Makes the missing directory `comp` of `cur` (at `here`): mode 0755 and owned by
    /// root, or as the topmost lower layer has it. `None` if something appeared there.
    fn make_dir(
        &mut self,
        cur: &Dir,
        comp: &[u8],
        here: &[u8],
        ctx: Ctx<'_>,
    ) -> Result<Option<OwnedFd>> {
        let lower = match self.whiteouts {
            Whiteouts::Overlay { .. } if !self.lowers.is_empty() => self.lower_dir(here, ctx)?,
            _ => None,
        };
        let name = Path::new(os(comp));
        // No-follow: mkdirat makes a new entry and never follows one.
        match rustix::fs::mkdirat(cur, name, Mode::from_raw_mode(0o700)) {
            Ok(()) => {}
            Err(Errno::EXIST) => return Ok(None),
            Err(e) => return Err(ctx.sys(format!("mkdir {}", Name(here)))(e)),
        }
        let fd = match fsutil::open_in_tree(cur, name, OFlags::RDONLY | OFlags::DIRECTORY) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::LOOP | Errno::NOTDIR) => return Ok(None),
            Err(Errno::XDEV) => return Err(ctx.mount(here)),
            Err(e) => return Err(ctx.sys(format!("open directory {}", Name(here)))(e)),
        };
        let (uid, gid, perms) = match &lower {
            Some((m, _)) => (m.uid, m.gid, m.mode & 0o7777),
            None => (0, 0, 0o755),
        };
        if self.root_user {
            rustix::fs::fchown(&fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                .map_err(ctx.sys(format!("chown {}", Name(here))))?;
        }
        if let Some((_, pin)) = &lower {
            copy_up_xattrs(pin.as_fd(), fd.as_fd(), here, ctx)?;
        }
        let (now, later) = self.dir_mode(Mode::from_raw_mode(perms));
        rustix::fs::fchmod(&fd, now).map_err(ctx.sys(format!("chmod {}", Name(here))))?;
        if lower.is_some() || later.is_some() {
            let id = fsutil::fstat(&fd).map_err(ctx.sys(format!("stat {}", Name(here))))?.id();
            self.dirs.push(Deferred {
                path: here.to_vec(),
                id,
                times: lower
                    .map(|(m, _)| Timestamps { last_access: m.atime, last_modification: m.mtime }),
                mode: later,
            });
        }
        Ok(Some(fd))
    }

    /// The metadata of `path` in the topmost lower layer that has it; refuses a symlink
    /// or a non-directory there.
    fn lower_dir(&self, path: &[u8], ctx: Ctx<'_>) -> Result<Option<(Meta, OwnedFd)>> {
        for lower in self.lowers {
            match lower_entry(*lower, path) {
                Ok(Lower::Missing) => {}
                Ok(Lower::Dir(meta, fd)) => return Ok(Some((meta, fd))),
                Ok(Lower::Symlink(at)) => return Err(ctx.through_symlink(&at, true)),
                Ok(Lower::NotDir(at)) => return Err(ctx.not_dir(&at, true)),
                Err(Errno::XDEV) => return Err(ctx.mount(path)),
                Err(e) => {
                    return Err(ctx.sys(format!("look up {} in a lower layer", Name(path)))(e));
                }
            }
        }
        Ok(None)
    }

    /// The mode to give a directory now, and the one to give it at the end: without root,
    /// the owner keeps full access until the directory's children are written.
    fn dir_mode(&self, mode: Mode) -> (Mode, Option<Mode>) {
        if self.root_user || mode.contains(Mode::RWXU) {
            (mode, None)
        } else {
            (mode | Mode::RWXU, Some(mode))
        }
    }

    fn cached(&mut self, path: &[u8]) -> Option<Rc<Dir>> {
        let i = self.cache.iter().rposition(|(k, _)| k.as_slice() == path)?;
        if i + 1 != self.cache.len() {
            let hit = self.cache.remove(i);
            self.cache.push(hit);
        }
        self.cache.last().map(|(_, dir)| Rc::clone(dir))
    }

    fn remember(&mut self, path: &[u8], dir: Rc<Dir>) {
        self.cache.retain(|(k, _)| k.as_slice() != path);
        if self.cache.len() >= OPEN_DIRS {
            self.cache.remove(0);
        }
        self.cache.push((path.to_vec(), dir));
    }

    /// Drops the open directories at and below `path`, which is being removed.
    fn forget(&mut self, path: &[u8]) {
        self.cache.retain(|(k, _)| {
            !(k.starts_with(path) && (k.len() == path.len() || k[path.len()] == b'/'))
        });
    }

    // -- Writing entries.

    /// Removes whatever is at `name` in `dir` (a whole tree if it is a directory).
    fn clear(&mut self, dir: &Dir, name: &[u8], path: &[u8], ctx: Ctx<'_>) -> Result<()> {
        // No-follow: unlinkat removes the name itself (EISDIR for a directory).
        match rustix::fs::unlinkat(dir, os(name), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(Errno::ISDIR) => {
                self.forget(path);
                match fsutil::remove_tree(dir, Path::new(os(name))) {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_not_found() => Ok(()),
                    Err(e) => Err(e.context(format!("{ctx}: remove {}", Name(path)))),
                }
            }
            Err(e) => Err(ctx.sys(format!("remove {}", Name(path)))(e)),
        }
    }

    /// Runs `op` to make `name` in `dir`; if something is there, removes it and runs `op`
    /// once more.
    fn create<T>(
        &mut self,
        dir: &Dir,
        name: &[u8],
        path: &[u8],
        ctx: Ctx<'_>,
        op: impl Fn(BorrowedFd<'_>, &OsStr) -> rustix::io::Result<T>,
    ) -> Result<rustix::io::Result<T>> {
        match op(dir.as_fd(), os(name)) {
            Err(Errno::EXIST) => {}
            other => return Ok(other),
        }
        self.clear(dir, name, path, ctx)?;
        Ok(op(dir.as_fd(), os(name)))
    }

    /// A new, empty regular file at `name` of `dir` (whatever was there replaced),
    /// owner-only until its metadata are set.
    fn new_file(&mut self, dir: &Dir, name: &[u8], path: &[u8], ctx: Ctx<'_>) -> Result<File> {
        // No-follow: O_CREAT|O_EXCL makes a new file and never follows a symlink there.
        let flags = OFlags::WRONLY
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::NOCTTY
            | OFlags::CLOEXEC;
        let fd = self
            .create(dir, name, path, ctx, |d, n| {
                rustix::fs::openat(d, n, flags, Mode::from_raw_mode(0o600))
            })?
            .map_err(ctx.sys("create"))?;
        Ok(File::from(fd))
    }

    fn directory(
        &mut self,
        dir: &Dir,
        name: &[u8],
        path: &[u8],
        attrs: &Attrs,
        ctx: Ctx<'_>,
    ) -> Result<()> {
        let entry = Path::new(os(name));
        let mut existed = false;
        // No-follow: mkdirat never follows; an existing directory is kept.
        match rustix::fs::mkdirat(dir, entry, Mode::from_raw_mode(0o700)) {
            Ok(()) => {}
            Err(Errno::EXIST) => match fsutil::lstat_at(dir, entry) {
                Ok(m) if m.file_type() == FileType::Directory => existed = true,
                Ok(_) | Err(Errno::NOENT) => {
                    self.clear(dir, name, path, ctx)?;
                    rustix::fs::mkdirat(dir, entry, Mode::from_raw_mode(0o700))
                        .map_err(ctx.sys("mkdir"))?;
                }
                Err(e) => return Err(ctx.sys("lstat")(e)),
            },
            Err(e) => return Err(ctx.sys("mkdir")(e)),
        }
        // In tree: the directory itself, never a symlink or mount swapped in.
        let fd =
            fsutil::open_in_tree(dir, entry, OFlags::RDONLY | OFlags::DIRECTORY).map_err(|e| {
                match e {
                    Errno::XDEV => ctx.mount(path),
                    e => ctx.sys("open the directory")(e),
                }
            })?;
        if self.root_user {
            rustix::fs::fchown(&fd, Some(Uid::from_raw(attrs.uid)), Some(Gid::from_raw(attrs.gid)))
                .map_err(ctx.sys("chown"))?;
        }
        let (now, later) = self.dir_mode(attrs.perms());
        rustix::fs::fchmod(&fd, now).map_err(ctx.sys("chmod"))?;
        if existed {
            drop_other_xattrs(fd.as_fd(), attrs, ctx)?;
        }
        self.xattrs(Node::Open(fd.as_fd()), attrs, true, ctx)?;
        if later.is_none() && attrs.has_access_acl() {
            // The mode comes after the ACL, as in containerd: setting the ACL set the
            // group bits to its mask.
            rustix::fs::fchmod(&fd, now).map_err(ctx.sys("chmod"))?;
        }
        let id = fsutil::fstat(&fd).map_err(ctx.sys("stat"))?.id();
        self.dirs.push(Deferred {
            path: path.to_vec(),
            id,
            times: Some(attrs.times.clone()),
            mode: later,
        });
        // Its children most likely come next.
        self.remember(path, Rc::new(dir_of(fd)));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn file(
        &mut self,
        dir: &Dir,
        name: &[u8],
        path: &[u8],
        attrs: &Attrs,
        (entry, sparse): (&mut tar::Entry<'_, Feed<'_>>, bool),
        chunks: &RefCell<Chunks>,
        ctx: Ctx<'_>,
    ) -> Result<()> {
        let mut file = self.new_file(dir, name, path, ctx)?;
        let size = entry.size();
        let short = |read: u64| {
            ctx.bad(format!("the stream ends inside the file's data ({read} of {size} bytes)"))
        };
        if !sparse {
            // The data is the next `size` bytes of the stream: written from where the
            // decoder put them, without a copy through the parser.
            let written = chunks.borrow_mut().write_to(&mut file, size);
            match written {
                Ok(n) if n == size => {}
                Ok(n) => return Err(short(n)),
                Err(Direct::Stream(e)) => {
                    return Err(stream_error(chunks, e, format!("{ctx}: read data")));
                }
                Err(Direct::Write(e)) => {
                    return Err(Error::from(e).context(format!("{ctx}: write")));
                }
            }
        }
        let mut left = if sparse { size } else { 0 };
        if left > 0 && self.buf.is_empty() {
            self.buf = vec![0; COPY_BUF];
        }
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(self.buf.len());
            let mut got = 0;
            while got < want {
                match entry.read(&mut self.buf[got..want]) {
                    Ok(0) => return Err(short(size - left + got as u64)),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(stream_error(chunks, e, format!("{ctx}: read data"))),
                }
            }
            file.write_all(&self.buf[..want])
                .map_err(|e| Error::from(e).context(format!("{ctx}: write")))?;
            left -= want as u64;
        }
        self.file_meta(&file, attrs, ctx)
    }

    /// Owner, mode, xattrs and times of a regular file just written.
    fn file_meta(&self, file: &File, attrs: &Attrs, ctx: Ctx<'_>) -> Result<()> {
        // Owner before mode (chown clears setuid and setgid), all after the data (a write
        // clears file capabilities), xattrs after the owner (chown clears capabilities
        // too) and before the mode (an access ACL sets the group bits to its mask; the
        // entry's mode wins, as in containerd), times last.
        if self.root_user {
            rustix::fs::fchown(
                file,
                Some(Uid::from_raw(attrs.uid)),
                Some(Gid::from_raw(attrs.gid)),
            )
            .map_err(ctx.sys("chown"))?;
        }
        self.xattrs(Node::Open(file.as_fd()), attrs, true, ctx)?;
        rustix::fs::fchmod(file, attrs.perms()).map_err(ctx.sys("chmod"))?;
        rustix::fs::futimens(file, &attrs.times).map_err(ctx.sys("set times"))?;
        Ok(())
    }

    // -- Linked files (`apply_linked`).

    /// The size of the file an entry's private records say is to be linked, if they say
    /// so; refuses them in a stream from outside (no `link_from`), and any this version
    /// does not know.
    fn linked_size(&self, private: Option<Private>, ctx: Ctx<'_>) -> Result<Option<u64>> {
        let Some(private) = private else { return Ok(None) };
        if self.link_from.is_none() {
            return Err(ctx.bad(format!(
                "carries wasnap's private PAX records ({PRIVATE_PREFIX}*), which only a \
                 merge's own stream may; a layer from outside never does"
            )));
        }
        if let Some(key) = &private.unknown {
            return Err(ctx.bad(format!("unknown private PAX record {}", Name(key))));
        }
        match (private.link_source, private.link_size) {
            (true, Some(size)) => Ok(Some(size)),
            _ => Err(ctx.bad(format!("needs both {LINK_SOURCE} and {LINK_SIZE}"))),
        }
    }

    /// Makes `name` in `dir` (at `path`) the file at the same path in `link_from`: a hard
    /// link to it, which keeps its owner, mode, xattrs and times, as the entry gives them
    /// (nothing is set on it: the inode is the source tree's too); or, where no link can
    /// be made, a copy of its `size` bytes with the entry's metadata, as [`Self::file`].
    ///
    /// Where overlayfs reads the xattrs (`check_overlay`: an overlay layer as the source,
    /// an upper directory as the target), a file carrying overlayfs's own is copied
    /// instead, without them. Between two plain trees they are looked for no more: there
    /// they are inert data that no mount interprets, the file's bytes are its own, and
    /// the link shares them with the source tree, which holds the very same inode with
    /// them already (the native driver's copy of a parent keeps them too). Listing them
    /// took a `/proc/self/fd` lookup per file, a sixth of a merge by links.
    fn linked(
        &mut self,
        dir: &Dir,
        name: &[u8],
        path: &[u8],
        attrs: &Attrs,
        size: u64,
        ctx: Ctx<'_>,
    ) -> Result<()> {
        if self.links
            && !self.check_overlay
            && self.link_named(dir, name, path, attrs, size, ctx)?
        {
            return Ok(());
        }
        let source = self.source_file(path, size, attrs, ctx)?;
        if self.links && !(self.check_overlay && self.has_overlay_xattrs(source.as_fd(), ctx)?) {
            let empty_path = std::cell::Cell::new(self.empty_path);
            let linked = self.create(dir, name, path, ctx, |d, n| {
                fsutil::link_pinned(source.as_fd(), d, n, &empty_path)
            })?;
            self.empty_path = empty_path.get();
            match linked {
                Ok(()) => return Ok(()),
                // Another filesystem or btrfs subvolume: no file of this stream links.
                Err(Errno::XDEV) => self.links = false,
                // Too many links to this inode, or a filesystem (or protected_hardlinks)
                // refusing this one: copied.
                Err(Errno::MLINK | Errno::PERM) => {}
                Err(e) => return Err(ctx.sys("link the file from the layer's tree")(e)),
            }
        }
        self.copy_from(dir, name, path, attrs, source.as_fd(), size, ctx)
    }

    /// Between plain trees, links the entry at `path` in `link_from` by its name (no pin:
    /// that took three more calls per file), then checks that what was linked is the
    /// regular file the entry announces, as [`Self::source_file`] checks a pin; anything
    /// else is unlinked again and refused. True if linked; false if no link could be
    /// made (another filesystem: `self.links` is cleared; too many links; a name no
    /// longer there), for the pinned path to copy or to say why.
    ///
    /// What is linked can only be the inode at that one listed name of the source
    /// directory (resolved beneath `link_from` as a pin's is), never what a symlink
    /// there names, nor anything across a mount: it is never opened, and it is checked
    /// where it now is, in the tree being written. Whoever could swap it there again
    /// before the check writes that tree already.
    fn link_named(
        &mut self,
        dir: &Dir,
        name: &[u8],
        path: &[u8],
        attrs: &Attrs,
        size: u64,
        ctx: Ctx<'_>,
    ) -> Result<bool> {
        let parent = split_last(path).0;
        let mut linked = Err(Errno::EXIST);
        for round in 0..2 {
            if round == 1 {
                self.clear(dir, name, path, ctx)?;
            }
            let from = self.source_parent(parent, ctx)?;
            // No-follow: linkat without AT_SYMLINK_FOLLOW links `name` itself, a single
            // component of the pinned source directory. In tree: a mount point there
            // is EXDEV, as no link crosses mounts. `name` is made new in `dir` (EEXIST if
            // anything is there, which is replaced once).
            linked = rustix::fs::linkat(from, os(name), dir, os(name), AtFlags::empty());
            if linked != Err(Errno::EXIST) {
                break;
            }
        }
        match linked {
            Ok(()) => {}
            // Another filesystem or btrfs subvolume: no file of this stream links.
            Err(Errno::XDEV) => {
                self.links = false;
                return Ok(false);
            }
            // Too many links, links refused (protected_hardlinks), a directory (EPERM)
            // or nothing there: the pin says which.
            Err(Errno::MLINK | Errno::PERM | Errno::NOENT) => return Ok(false),
            Err(e) => return Err(ctx.sys("link the file from the layer's tree")(e)),
        }
        // No-follow: the entry just made, itself.
        let checked = fsutil::lstat_at(dir, Path::new(os(name)))
            .map_err(ctx.sys("stat the file linked from the layer's tree"))
            .and_then(|m| Self::announced(&m, size, attrs, ctx));
        if let Err(e) = checked {
            // No-follow: unlinkat removes the name itself.
            match rustix::fs::unlinkat(dir, os(name), AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(u) => return Err(e.context(format!("and removing it failed: {u}"))),
            }
            return Err(e);
        }
        Ok(true)
    }

    /// Whether `m` is the regular file of the entry's size, mode, owner and time.
    fn announced(m: &Meta, size: u64, attrs: &Attrs, ctx: Ctx<'_>) -> Result<()> {
        if m.file_type() != FileType::RegularFile {
            return Err(Error::failed_precondition(format!(
                "{ctx}: in the layer's tree it is no longer a regular file (mode {:o}); \
                 it is neither followed nor opened",
                m.mode
            )));
        }
        let t = attrs.times.last_modification;
        if m.size != size
            || m.mode & 0o7777 != attrs.mode
            || (m.uid, m.gid) != (attrs.uid, attrs.gid)
            || (m.mtime.tv_sec, m.mtime.tv_nsec) != (t.tv_sec, t.tv_nsec)
        {
            return Err(Error::internal(format!(
                "{ctx}: the file in the layer's tree changed since the diff read it"
            )));
        }
        Ok(())
    }

    /// The copy a link could not be: `size` bytes of the pinned `source`, read through
    /// the pin, into a new file with the entry's metadata.
    #[allow(clippy::too_many_arguments)]
    fn copy_from(
        &mut self,
        dir: &Dir,
        name: &[u8],
        path: &[u8],
        attrs: &Attrs,
        source: BorrowedFd<'_>,
        size: u64,
        ctx: Ctx<'_>,
    ) -> Result<()> {
        // Pinned: opened through the pin only if it is a regular file (checked again).
        let from = File::from(
            fsutil::open_pinned(source).map_err(ctx.sys("open the file in the layer's tree"))?,
        );
        let attrs = &self.source_attrs(from.as_fd(), attrs, ctx)?;
        let mut file = self.new_file(dir, name, path, ctx)?;
        let copied = io::copy(&mut (&from).take(size), &mut file)
            .map_err(|e| Error::from(e).context(format!("{ctx}: copy from the layer's tree")))?;
        if copied != size {
            return Err(Error::internal(format!(
                "{ctx}: the file in the layer's tree shrank since the diff read it \
                 ({copied} of {size} bytes)"
            )));
        }
        self.file_meta(&file, attrs, ctx)
    }

    /// The entry's metadata with the xattrs of the open source file instead of its own
    /// (a merge's stream carries none for a linked file): the ones a link would have
    /// shared, overlayfs's own left out. In an overlayfs layer, a file overlayfs marks as
    /// a metacopy or redirect is refused: its data is in another layer, not in this tree
    /// (in a plain tree nothing reads the marks, and the bytes are the file's own).
    fn source_attrs(&self, from: BorrowedFd<'_>, attrs: &Attrs, ctx: Ctx<'_>) -> Result<Attrs> {
        // Pinned: the file is open.
        let names = match Node::Open(from).list() {
            Ok(names) => names,
            Err(Errno::NOTSUP) => Vec::new(),
            Err(e) => return Err(ctx.sys("list xattrs in the layer's tree")(e)),
        };
        let mut xattrs = Vec::new();
        for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if is_overlay_xattr(name) {
                if self.source_overlay
                    && (name.ends_with(b".metacopy") || name.ends_with(b".redirect"))
                {
                    return Err(Error::failed_precondition(format!(
                        "{ctx}: in the layer's tree it has {}: overlayfs keeps its data in \
                         another layer, so it cannot be copied from this one",
                        Name(name)
                    )));
                }
                continue;
            }
            match Node::Open(from).get(os(name)) {
                Ok(value) => xattrs.push((name.to_vec(), value)),
                Err(Errno::NODATA | Errno::NOTSUP) => {}
                Err(e) => {
                    return Err(ctx.sys(format!("read xattr {} in the layer's tree", Name(name)))(
                        e,
                    ));
                }
            }
        }
        Ok(Attrs {
            mode: attrs.mode,
            uid: attrs.uid,
            gid: attrs.gid,
            times: attrs.times.clone(),
            xattrs,
        })
    }

    /// Pins the file at `path` in `link_from`: its parent resolved beneath `link_from`
    /// one component at a time as the target's parents are (no symlink followed, no
    /// mount crossed), the file itself with an `O_PATH | O_NOFOLLOW` pin that opens
    /// nothing. Only a regular file with the size, mode, owner and time the entry
    /// announces is taken: a symlink, device or fifo there is never followed or opened.
    fn source_file(
        &mut self,
        path: &[u8],
        size: u64,
        attrs: &Attrs,
        ctx: Ctx<'_>,
    ) -> Result<OwnedFd> {
        let (parent, name) = split_last(path);
        let dir = self.source_parent(parent, ctx)?;
        // In tree: an O_PATH pin beneath the source directory; a symlink is pinned as
        // itself, a mount point refused.
        let pinned = match fsutil::pin_in_tree(dir, Path::new(os(name))) {
            Ok(fd) => fd,
            Err(Errno::XDEV) => return Err(ctx.mount(path)),
            Err(e) => return Err(ctx.sys("find the file in the layer's tree")(e)),
        };
        let m = fsutil::fstat(&pinned).map_err(ctx.sys("stat the file in the layer's tree"))?;
        Self::announced(&m, size, attrs, ctx)?;
        Ok(pinned)
    }

    /// The directory `parent` of `link_from`, resolved beneath it one component at a
    /// time (from the last one resolved when it is an ancestor).
    fn source_parent(&mut self, parent: &[u8], ctx: Ctx<'_>) -> Result<BorrowedFd<'_>> {
        let from = self
            .link_from
            .ok_or_else(|| Error::internal(format!("{ctx}: a linked file without a source")))?;
        if parent.is_empty() {
            return Ok(from);
        }
        let hit = matches!(&self.source_dir, Some((p, _)) if p.as_slice() == parent);
        if !hit {
            let (mut cur, mut start) = (None::<OwnedFd>, 0);
            if let Some((p, fd)) = self.source_dir.take()
                && parent.starts_with(&p)
                && parent.get(p.len()) == Some(&b'/')
            {
                (cur, start) = (Some(fd), p.len() + 1);
            }
            let mut end = start;
            for comp in parent[start..].split(|&b| b == b'/') {
                end += comp.len();
                let here = &parent[..end];
                end += 1;
                let at = cur.as_ref().map_or(from, AsFd::as_fd);
                // In tree: beneath `at`, no symlink followed, no mount crossed; O_PATH
                // opens nothing.
                let flags = OFlags::PATH | OFlags::DIRECTORY;
                let fd =
                    fsutil::open_in_tree(at, Path::new(os(comp)), flags).map_err(|e| match e {
                        Errno::XDEV => ctx.mount(here),
                        Errno::NOENT | Errno::NOTDIR | Errno::LOOP => {
                            Error::failed_precondition(format!(
                                "{ctx}: {} in the layer's tree is no longer a directory \
                                 (changed since the diff read it); nothing is followed",
                                Name(here)
                            ))
                        }
                        e => ctx.sys(format!("open {} in the layer's tree", Name(here)))(e),
                    })?;
                cur = Some(fd);
            }
            let fd = cur.ok_or_else(|| Error::internal(format!("{ctx}: no source directory")))?;
            self.source_dir = Some((parent.to_vec(), fd));
        }
        match &self.source_dir {
            Some((_, fd)) => Ok(fd.as_fd()),
            None => Err(Error::internal(format!("{ctx}: no source directory"))),
        }
    }

    /// Whether the pinned file carries overlayfs's own xattrs, which a tar never sets
    /// (see [`is_overlay_xattr`]): such a file is copied, not linked.
    fn has_overlay_xattrs(&self, pinned: BorrowedFd<'_>, ctx: Ctx<'_>) -> Result<bool> {
        let path = proc_link(pinned);
        // Pinned: the magic link names the inode the pin checked.
        let len = match rustix::fs::listxattr_query(path.as_str()) {
            Ok(0) | Err(Errno::NOTSUP) => return Ok(false),
            Ok(len) => len,
            Err(e) => return Err(ctx.sys("list xattrs in the layer's tree")(e)),
        };
        // The names can grow between the two calls: then the file is copied.
        let mut names = vec![0; len];
        match rustix::fs::listxattr(path.as_str(), &mut names) {
            Ok(n) => {
                names.truncate(n);
                Ok(names.split(|&b| b == 0).any(is_overlay_xattr))
            }
            Err(Errno::RANGE) => Ok(true),
            Err(e) => Err(ctx.sys("list xattrs in the layer's tree")(e)),
        }
    }

    fn symlink(
        &mut self,
        dir: &Dir,
        name: &[u8],
        path: &[u8],
        target: &[u8],
        attrs: &Attrs,
        ctx: Ctx<'_>,
    ) -> Result<()> {
        if target.is_empty() || target.contains(&0) {
            return Err(ctx.bad(format!("symlink target {} is not valid", Name(target))));
        }
        // The target is stored, never resolved.
        self.create(dir, name, path, ctx, |d, n| rustix::fs::symlinkat(target, d, n))?
            .map_err(ctx.sys("symlink"))?;
        self.entry_meta(dir, name, attrs, false, ctx)
    }

    fn hardlink(
        &mut self,
        dir: &Dir,
        name: &[u8],
        path: &[u8],
        link: &[u8],
        ctx: Ctx<'_>,
    ) -> Result<()> {
        let target = normalize(link)
            .map_err(|why| ctx.bad(format!("hard link target {}: {why}", Name(link))))?;
        if target.is_empty() {
            return Err(ctx.bad("hard link to the root directory"));
        }
        if target == path {
            // Replacing the entry would remove the target.
            return Err(ctx.bad("hard link to itself"));
        }
        let lctx = Ctx { raw: ctx.raw, target: Some(link) };
        let whiteouts = self.whiteouts;
        let missing = || match whiteouts {
            Whiteouts::Delete => ctx.bad(format!("hard link target {} does not exist", Name(link))),
            Whiteouts::Overlay { .. } => ctx.bad(format!(
                "hard link target {} is not in this layer (an overlay upper directory cannot \
                 link to a lower layer's file)",
                Name(link)
            )),
        };
        let (tparent, tname) = split_last(&target);
        let Some(tdir) = self.resolve(tparent, false, lctx)? else {
            return Err(missing());
        };
        // No-follow: without AT_SYMLINK_FOLLOW, linkat links a symlink itself.
        let linked = self.create(dir, name, path, ctx, |d, n| {
            rustix::fs::linkat(&*tdir, os(tname), d, n, AtFlags::empty())
        })?;
        match linked {
            Ok(()) => Ok(()),
            Err(Errno::NOENT) => Err(missing()),
            Err(Errno::PERM)
                if fsutil::lstat_at(&*tdir, Path::new(os(tname)))
                    .is_ok_and(|m| m.file_type() == FileType::Directory) =>
            {
                Err(ctx.bad(format!("hard link target {} is a directory", Name(link))))
            }
            Err(Errno::XDEV) => Err(ctx.mount(link)),
            Err(e) => Err(ctx.sys(format!("link to {}", Name(link)))(e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn node(
        &mut self,
        dir: &Dir,
        name: &[u8],
        path: &[u8],
        kind: FileType,
        device: rustix::fs::Dev,
        attrs: &Attrs,
        ctx: Ctx<'_>,
    ) -> Result<()> {
        if kind != FileType::Fifo && !self.root_user && !fsutil::in_user_namespace() {
            return Err(Error::failed_precondition(format!(
                "{ctx}: a device node can only be made by root"
            )));
        }
        let perms = Mode::from_raw_mode(attrs.mode & 0o777);
        let made = self
            .create(dir, name, path, ctx, |d, n| rustix::fs::mknodat(d, n, kind, perms, device))?;
        match made {
            // In a user namespace (rootless) no device node can be made: the layer is
            // applied without it, as containerd does. Whatever had the name is gone, as
            // for any entry that replaces another; over lower layers the name is whited
            // out (a 0:0 device, which a user namespace can make), so none of theirs
            // shows through, as where containerd writes through the overlay mount.
            Err(Errno::PERM) if kind != FileType::Fifo && fsutil::in_user_namespace() => {
                tracing::debug!(entry = %Name(ctx.raw), "device node skipped in a user namespace");
                self.skipped_devices += 1;
                if !self.delete_mode() && !self.lowers.is_empty() {
                    // No-follow: mknodat makes a new entry and follows nothing.
                    make_whiteout(dir.as_fd(), os(name))
                        .map_err(ctx.sys("make a whiteout for a device node"))?;
                }
                return Ok(());
            }
            made => made.map_err(ctx.sys("mknod"))?,
        }
        self.entry_meta(dir, name, attrs, true, ctx)
    }

    /// Owner, mode (`chmod` is true), xattrs and times of an entry that is not opened (a
    /// symlink, device or fifo), by name in its directory, never following it.
    fn entry_meta(
        &mut self,
        dir: &Dir,
        name: &[u8],
        attrs: &Attrs,
        chmod: bool,
        ctx: Ctx<'_>,
    ) -> Result<()> {
        if self.root_user {
            let (uid, gid) = (Uid::from_raw(attrs.uid), Gid::from_raw(attrs.gid));
            // No-follow: the entry itself.
            rustix::fs::chownat(dir, os(name), Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(ctx.sys("chown"))?;
        }
        // xattrs before the mode (an access ACL sets the group bits), as in containerd.
        self.xattrs(Node::Entry(dir.as_fd(), os(name)), attrs, false, ctx)?;
        if chmod {
            // Pinned: changed through an O_PATH pin of the entry, never followed.
            fsutil::chmod_nofollow(dir, os(name), attrs.perms()).map_err(ctx.sys("chmod"))?;
        }
        // No-follow: the times of the entry itself.
        rustix::fs::utimensat(dir, os(name), &attrs.times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(ctx.sys("set times"))
    }

    /// Sets the entry's xattrs, except overlayfs's own. `plain` is true for regular files
    /// and directories; other entries cannot carry `user.*` attributes.
    fn xattrs(&self, node: Node<'_>, attrs: &Attrs, plain: bool, ctx: Ctx<'_>) -> Result<()> {
        for (name, value) in &attrs.xattrs {
            if is_overlay_xattr(name) {
                tracing::warn!(
                    entry = %Name(ctx.raw),
                    xattr = %Name(name),
                    "overlayfs xattr in a layer tar skipped"
                );
                continue;
            }
            let refused = |e: Errno| match e {
                // The filesystem has no such attributes.
                Errno::NOTSUP => true,
                // Without root, trusted.* and others; user.* on a symlink, device or fifo.
                Errno::PERM => !self.root_user || !plain,
                _ => false,
            };
            match node.set(os(name), value) {
                Ok(()) => {}
                Err(e) if refused(e) => {
                    tracing::warn!(
                        entry = %Name(ctx.raw),
                        xattr = %Name(name),
                        error = %e,
                        "xattr in a layer tar not applied"
                    );
                }
                Err(e) => return Err(ctx.sys(format!("set xattr {}", Name(name)))(e)),
            }
        }
        Ok(())
    }

    // -- Whiteouts.

    fn whiteout(&mut self, parent: &[u8], name: &[u8], ctx: Ctx<'_>) -> Result<()> {
        if self.delete_mode() && !parent.is_empty() {
            // The directory holding a whiteout is part of this layer.
            self.keep(parent, true);
        }
        if name == WHITEOUT_OPAQUE.as_bytes() {
            return self.opaque(parent, ctx);
        }
        if name.starts_with(b".wh..wh.") {
            tracing::debug!(entry = %Name(ctx.raw), "aufs metadata in a layer tar ignored");
            return Ok(());
        }
        let target = &name[WHITEOUT_PREFIX.len()..];
        if target.is_empty() || target == b"." || target == b".." {
            return Err(ctx.bad("whiteout names no entry"));
        }
        let path = join(parent, target);
        // The directory is made if missing, as for any entry (containerd does the same):
        // it is part of this layer.
        let dir = self.parent_dir(parent, ctx)?;
        match self.whiteouts {
            Whiteouts::Delete => self.clear(&dir, target, &path, ctx),
            Whiteouts::Overlay { .. } => self
                .create(&dir, target, &path, ctx, make_whiteout)?
                .map_err(ctx.sys("make the whiteout device")),
        }
    }

    fn opaque(&mut self, path: &[u8], ctx: Ctx<'_>) -> Result<()> {
        let dir = self.parent_dir(path, ctx)?;
        if let Some(attr) = self.whiteouts.opaque_xattr() {
            return Node::Open(dir.as_fd())
                .set(OsStr::new(attr), b"y")
                .map_err(ctx.sys(format!("set {attr}")));
        }
        // Delete mode: empty the directory of everything this layer did not write.
        let mut todo = vec![path.to_vec()];
        while let Some(here) = todo.pop() {
            let Some(dir) = self.resolve(&here, false, ctx)? else { continue };
            let names = fsutil::list_names(dir.as_fd())
                .map_err(ctx.sys(format!("list {}", Name(&here))))?;
            for child in names {
                let child = child.as_bytes();
                let child_path = join(&here, child);
                if !self.kept.contains(&child_path) {
                    self.clear(&dir, child, &child_path, ctx)?;
                    continue;
                }
                match fsutil::lstat_at(&*dir, Path::new(os(child))) {
                    Ok(m) if m.file_type() == FileType::Directory => todo.push(child_path),
                    Ok(_) | Err(Errno::NOENT) => {}
                    Err(e) => return Err(ctx.sys(format!("lstat {}", Name(&child_path)))(e)),
                }
            }
        }
        Ok(())
    }

    // -- The end.

    /// Sets the deferred directory times and modes, deepest first.
    fn finish(&mut self) -> Result<()> {
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.path.iter().filter(|&&b| b == b'/').count()));
        for d in &dirs {
            let ctx = Ctx::entry(&d.path);
            let (parent, name) = split_last(&d.path);
            let dir = match self.resolve(parent, false, ctx) {
                Ok(Some(dir)) => dir,
                // Removed or replaced later in the layer.
                Ok(None) => continue,
                Err(e) if e.kind() == ErrorKind::InvalidArgument => continue,
                Err(e) => return Err(e),
            };
            let entry = Path::new(os(name));
            match fsutil::lstat_at(&*dir, entry) {
                Ok(m) if m.id() == d.id => {}
                Ok(_) | Err(Errno::NOENT) => continue,
                Err(e) => return Err(ctx.sys("lstat")(e)),
            }
            if let Some(mode) = d.mode {
                fsutil::chmod_nofollow(&*dir, os(name), mode).map_err(ctx.sys("chmod"))?;
            }
            if let Some(times) = &d.times {
                // No-follow: the directory entry itself.
                rustix::fs::utimensat(&*dir, entry, times, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(ctx.sys("set times"))?;
            }
        }
        Ok(())
    }
}

/// Removes the xattrs of the existing directory `fd` that the entry over it does not
/// have (the entry describes the directory as the layer has it), except overlayfs's own,
/// which a tar never sets nor clears. Attributes the caller may not remove stay.
fn drop_other_xattrs(fd: BorrowedFd<'_>, attrs: &Attrs, ctx: Ctx<'_>) -> Result<()> {
    let names = match Node::Open(fd).list() {
        Ok(names) => names,
        Err(Errno::NOTSUP) => return Ok(()),
        Err(e) => return Err(ctx.sys("list xattrs")(e)),
    };
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if is_overlay_xattr(name) || attrs.xattrs.iter().any(|(n, _)| n.as_slice() == name) {
            continue;
        }
        match rustix::fs::fremovexattr(fd, os(name)) {
            Ok(()) | Err(Errno::NODATA) => {}
            Err(e @ (Errno::PERM | Errno::NOTSUP)) => {
                tracing::debug!(entry = %Name(ctx.raw), xattr = %Name(name), error = %e,
                    "xattr of the directory replaced kept");
            }
            Err(e) => return Err(ctx.sys(format!("remove xattr {}", Name(name)))(e)),
        }
    }
    Ok(())
}

/// The `/proc/self/fd` link of `fd`: resolving it lands on exactly the inode `fd` holds.
fn proc_link(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// An overlayfs xattr (redirects, opaque markers, metacopy, ...), which only overlayfs and
/// this module's whiteout handling may set.
fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// Gives `dir`, a directory just made in an overlay layer for the lower directory pinned
/// by `lower`, the lower one's xattrs (its ACLs, labels, `user.*`), as containerd's copy
/// up does: the merged view shows the upper directory's, so without them they would
/// vanish there. Not `trusted.*` (nor overlayfs's own). One the filesystem or the caller
/// cannot set (no support, no room, no privilege) is left out with a warning, where
/// containerd would fail the layer: an unprivileged apply still works.
fn copy_up_xattrs(
    lower: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    here: &[u8],
    ctx: Ctx<'_>,
) -> Result<()> {
    // Pinned: the lower directory's inode, opened through its pin, never by path.
    let open = fsutil::open_pinned(lower)
        .map_err(ctx.sys(format!("open {} in a lower layer", Name(here))))?;
    let at = fsutil::At { verb: "copy up the xattrs of lower directory", rel: Path::new(os(here)) };
    for x in fsutil::xattr::read(Node::Open(open.as_fd()), at)? {
        if x.name.starts_with(b"trusted.") || is_overlay_xattr(&x.name) {
            continue;
        }
        match Node::Open(dir).set(OsStr::from_bytes(&x.name), &x.value) {
            Ok(()) => {}
            Err(
                e @ (Errno::NOTSUP | Errno::NOSPC | Errno::TOOBIG | Errno::PERM | Errno::ACCESS),
            ) => {
                tracing::warn!(dir = %Name(here), xattr = %Name(&x.name), error = %e,
                    "a lower directory's xattr not copied up to the directory made for it");
            }
            Err(e) => {
                return Err(ctx.sys(format!("copy xattr {} up to {}", Name(&x.name), Name(here)))(
                    e,
                ));
            }
        }
    }
    Ok(())
}

/// What `lower` has at `path`, walking it component by component without following
/// anything.
fn lower_entry(lower: BorrowedFd<'_>, path: &[u8]) -> rustix::io::Result<Lower> {
    let mut cur: Option<OwnedFd> = None;
    let mut meta = None;
    let mut end = 0;
    // An empty path is the lower root itself, which make_dir never asks for.
    for comp in path.split(|&b| b == b'/') {
        end += comp.len();
        let here = &path[..end];
        end += 1;
        let at = cur.as_ref().map_or(lower, |fd| fd.as_fd());
        // In tree: an O_PATH pin, a final symlink pinned as itself, no mount crossed.
        let fd = match fsutil::pin_in_tree(at, Path::new(os(comp))) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(Lower::Missing),
            Err(Errno::LOOP) => return Ok(Lower::Symlink(here.to_vec())),
            Err(Errno::NOTDIR) => return Ok(Lower::NotDir(here.to_vec())),
            Err(e) => return Err(e),
        };
        let m = fsutil::fstat(&fd)?;
        match m.file_type() {
            FileType::Directory => {}
            FileType::Symlink => return Ok(Lower::Symlink(here.to_vec())),
            _ => return Ok(Lower::NotDir(here.to_vec())),
        }
        cur = Some(fd);
        meta = Some(m);
    }
    Ok(match (meta, cur) {
        (Some(meta), Some(fd)) => Lower::Dir(meta, fd),
        _ => Lower::Missing,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::path::PathBuf;
    use std::time::Instant;

    use tar::EntryType;

    use super::*;

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    /// A temporary directory holding the tree a layer is applied into (`root`) and, beside
    /// it, `outside/secret`, which no layer may reach.
    struct Env {
        tmp: tempfile::TempDir,
    }

    impl Env {
        fn new() -> Env {
            let tmp = tempfile::tempdir_in("/dev/shm").expect("tempdir");
            std::fs::create_dir(tmp.path().join("root")).expect("mkdir root");
            std::fs::create_dir(tmp.path().join("outside")).expect("mkdir outside");
            std::fs::write(tmp.path().join("outside/secret"), b"secret").expect("write secret");
            Env { tmp }
        }

        fn root(&self) -> PathBuf {
            self.tmp.path().join("root")
        }

        fn at(&self, rel: &str) -> PathBuf {
            self.root().join(rel)
        }

        fn outside(&self) -> PathBuf {
            self.tmp.path().join("outside")
        }

        /// A directory beside the root (a lower layer).
        fn lower(&self, name: &str) -> PathBuf {
            let p = self.tmp.path().join(name);
            std::fs::create_dir_all(&p).expect("mkdir lower");
            p
        }

        fn apply(&self, tar: &[u8], opts: &ApplyOptions<'_>) -> Result<Applied> {
            let dir = File::open(self.root()).expect("open root");
            apply(dir.as_fd(), tar, opts)
        }

        fn apply_delete(&self, tar: &[u8]) -> Result<Applied> {
            self.apply(tar, &ApplyOptions::default())
        }

        /// Nothing beside the root changed: the only names are the root, the outside
        /// directory and lower layers, and `outside` holds just `secret`, unlinked.
        fn assert_outside_untouched(&self) {
            for name in names(self.tmp.path()) {
                assert!(
                    name == "root" || name == "outside" || name.starts_with("lower"),
                    "{name:?} appeared beside the root"
                );
            }
            assert_eq!(names(&self.outside()), set(&["secret"]));
            let secret = self.outside().join("secret");
            assert_eq!(std::fs::read(&secret).expect("read secret"), b"secret");
            assert_eq!(std::fs::metadata(&secret).expect("stat secret").nlink(), 1);
        }

        /// Applying `tar` is refused as invalid, naming `needle`, and reaches nothing
        /// outside the root.
        fn refused(&self, tar: &[u8], opts: &ApplyOptions<'_>, needle: &str) -> Error {
            let err = self.apply(tar, opts).expect_err("a refused layer");
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
            assert!(err.to_string().contains(needle), "{needle:?} not in: {err}");
            self.assert_outside_untouched();
            err
        }
    }

    fn names(dir: &Path) -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        let n = rustix::fs::lgetxattr(path, name, &mut buf[..]).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    fn lmeta(path: &Path) -> std::fs::Metadata {
        std::fs::symlink_metadata(path).expect("lstat")
    }

    /// Builds test tars.
    struct Tar(tar::Builder<Vec<u8>>);

    impl Tar {
        fn new() -> Tar {
            Tar(tar::Builder::new(Vec::new()))
        }

        fn header(kind: EntryType, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_mtime(1_600_000_000);
            h.set_uid(0);
            h.set_gid(0);
            h.set_size(0);
            h
        }

        fn entry(mut self, mut h: tar::Header, path: &str, data: &[u8]) -> Tar {
            h.set_size(data.len() as u64);
            self.0.append_data(&mut h, path, data).expect("append");
            self
        }

        fn dir(self, path: &str, mode: u32) -> Tar {
            self.entry(Tar::header(EntryType::Directory, mode), path, b"")
        }

        fn file(self, path: &str, data: &[u8]) -> Tar {
            self.entry(Tar::header(EntryType::Regular, 0o644), path, data)
        }

        fn link(mut self, kind: EntryType, path: &str, target: &str) -> Tar {
            let mut h = Tar::header(kind, 0o777);
            self.0.append_link(&mut h, path, target).expect("append link");
            self
        }

        fn symlink(self, path: &str, target: &str) -> Tar {
            self.link(EntryType::Symlink, path, target)
        }

        fn hardlink(self, path: &str, target: &str) -> Tar {
            self.link(EntryType::Link, path, target)
        }

        /// An entry whose name and link name are written as given (names the builder
        /// itself refuses).
        fn raw(mut self, name: &[u8], kind: EntryType, link: &[u8], data: &[u8]) -> Tar {
            let mut h = Tar::header(kind, 0o644);
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
            h.set_size(data.len() as u64);
            h.set_cksum();
            self.0.append(&h, data).expect("append raw");
            self
        }

        fn pax(mut self, records: &[(&str, &[u8])]) -> Tar {
            self.0.append_pax_extensions(records.iter().copied()).expect("pax");
            self
        }

        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().expect("finish tar")
        }
    }

    /// Numeric fields as Go's `archive/tar` reads them: empty ones are zero, and a time
    /// in base-256 may be before 1970.
    #[test]
    fn numeric_fields_read_as_go_reads_them() {
        let env = Env::new();
        let mut tar = Tar::new();
        let mut with_mtime = |path: &str, mtime: [u8; 12]| {
            let mut h = Tar::header(EntryType::Regular, 0o644);
            h.set_path(path).expect("path");
            h.as_old_mut().mtime = mtime;
            h.set_cksum();
            tar.0.append(&h, &b""[..]).expect("append");
        };
        let before_1970 = ((-86_400i128).rem_euclid(1 << 96) as u128).to_be_bytes();
        with_mtime("before-1970", before_1970[4..].try_into().expect("12 bytes"));
        let mut base_256 = (2_000_000_000u128).to_be_bytes()[4..].to_vec();
        base_256[0] |= 0x80;
        with_mtime("base-256", base_256.try_into().expect("12 bytes"));
        with_mtime("spaces", [b' '; 12]);
        let mut h = Tar::header(EntryType::Regular, 0o644);
        h.set_path("atime-before-1970").expect("path");
        h.as_gnu_mut().expect("gnu").atime = before_1970[4..].try_into().expect("12 bytes");
        h.set_cksum();
        tar.0.append(&h, &b""[..]).expect("append");
        let mut empty = Tar::header(EntryType::Regular, 0o644);
        empty.set_path("empty").expect("path");
        let old = empty.as_old_mut();
        (old.mode, old.uid, old.gid, old.mtime) = ([0; 8], [0; 8], [0; 8], [0; 12]);
        empty.set_cksum();
        tar.0.append(&empty, &b""[..]).expect("append");
        env.apply_delete(&tar.bytes()).expect("apply");
        assert_eq!(lmeta(&env.at("before-1970")).mtime(), -86_400);
        assert_eq!(lmeta(&env.at("base-256")).mtime(), 2_000_000_000);
        assert_eq!(lmeta(&env.at("spaces")).mtime(), 0);
        assert_eq!(lmeta(&env.at("atime-before-1970")).atime(), -86_400);
        let m = lmeta(&env.at("empty"));
        assert_eq!((m.mode() & 0o7777, m.mtime()), (0, 0));
        if is_root() {
            assert_eq!((m.uid(), m.gid()), (0, 0));
        }
    }

    #[test]
    fn time_fields_out_of_range_are_refused() {
        let huge = [0x80, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(time_field(&huge, Ok(0)).is_err());
        let tiny = [0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(time_field(&tiny, Ok(0)).is_err());
        let min = [0xff, 0xff, 0xff, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(time_field(&min, Ok(0)).expect("i64::MIN"), i64::MIN);
        assert_eq!(time_field(&[0xff; 12], Ok(0)).expect("-1"), -1);
        assert_eq!(time_field(b"00000000017\0", Ok(15)).expect("octal"), 15);
    }

    /// Set for [`in_a_user_namespace`] by the test that runs it in one.
    const USERNS_ENV: &str = "WASNAP_TEST_IN_USER_NAMESPACE";

    /// In a user namespace (rootless) no device node can be made: a layer with some is
    /// applied without them, as containerd does. The test below runs in a child process
    /// that `unshare(1)` puts in a new user namespace, as its root.
    #[test]
    fn device_nodes_are_left_out_in_a_user_namespace() {
        let exe = std::env::current_exe().expect("the test binary");
        let test = "layer::apply::tests::in_a_user_namespace";
        let out = std::process::Command::new("unshare")
            .args(["--user", "--map-root-user", "--"])
            .arg(exe)
            .args(["--exact", test, "--include-ignored", "--nocapture"])
            .env(USERNS_ENV, "1")
            .output();
        let out = match out {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                eprintln!("skipped: no unshare(1) to make a user namespace");
                return;
            }
            out => out.expect("run unshare"),
        };
        let (stdout, stderr) =
            (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() && stderr.starts_with("unshare: ") {
            eprintln!("skipped: no user namespace here: {stderr}");
            return;
        }
        assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
        assert!(stdout.contains("1 passed"), "the test did not run:\n{stdout}\n{stderr}");
    }

    #[test]
    #[ignore = "run inside a user namespace by device_nodes_are_left_out_in_a_user_namespace"]
    fn in_a_user_namespace() {
        if std::env::var_os(USERNS_ENV).is_none() {
            eprintln!("not in a user namespace of the test's making: nothing to check");
            return;
        }
        assert!(fsutil::in_user_namespace());
        let env = Env::new();
        std::fs::write(env.at("old"), b"replaced by a device").expect("write");
        let mut null = Tar::header(EntryType::Char, 0o666);
        null.set_device_major(1).expect("major");
        null.set_device_minor(3).expect("minor");
        let mut loop0 = Tar::header(EntryType::Block, 0o660);
        loop0.set_device_major(7).expect("major");
        loop0.set_device_minor(0).expect("minor");
        let tar = Tar::new()
            .dir("dev", 0o755)
            .entry(null.clone(), "dev/null", b"")
            .entry(loop0, "dev/loop0", b"")
            .entry(null, "old", b"")
            .entry(Tar::header(EntryType::Fifo, 0o600), "dev/fifo", b"")
            .file("dev/after", b"still applied")
            .bytes();
        env.apply_delete(&tar).expect("applied without the devices");
        assert_eq!(names(&env.at("dev")), BTreeSet::from(["after".into(), "fifo".into()]));
        assert!(lmeta(&env.at("dev/fifo")).file_type().is_fifo());
        assert!(!env.at("old").exists(), "the entry the device replaced is gone");

        // In an overlay upper directory over lower layers, the name is whited out, so
        // a lower layer's entry does not show through.
        let env = Env::new();
        let lower = env.lower("lower");
        std::fs::create_dir(lower.join("dev")).expect("mkdir");
        std::fs::write(lower.join("dev/null"), b"a lower file").expect("write");
        let lower = File::open(&lower).expect("open lower");
        let opts = ApplyOptions { lowers: vec![lower.as_fd()], ..overlay() };
        let mut null = Tar::header(EntryType::Char, 0o666);
        null.set_device_major(1).expect("major");
        null.set_device_minor(3).expect("minor");
        let tar = Tar::new().entry(null, "dev/null", b"").bytes();
        env.apply(&tar, &opts).expect("applied without the device");
        let m = lmeta(&env.at("dev/null"));
        assert!(m.file_type().is_char_device() && m.rdev() == 0, "a whiteout: {m:?}");
    }

    fn overlay() -> ApplyOptions<'static> {
        ApplyOptions { whiteouts: Whiteouts::Overlay { userxattr: false }, ..Default::default() }
    }

    // -- Confinement: every refusal is InvalidArgument and reaches nothing outside.

    #[test]
    fn slip_dot_dot_is_refused() {
        let env = Env::new();
        let tar = Tar::new().raw(b"../x", EntryType::Regular, b"", b"escaped").bytes();
        env.refused(&tar, &ApplyOptions::default(), "\"../x\"");
        assert!(names(&env.root()).is_empty());
    }

    #[test]
    fn slip_nested_dot_dot_is_refused() {
        let env = Env::new();
        let tar = Tar::new()
            .dir("a", 0o755)
            .raw(b"a/../../x", EntryType::Regular, b"", b"escaped")
            .bytes();
        env.refused(&tar, &ApplyOptions::default(), "a/../../x");
    }

    #[test]
    fn slip_absolute_path_is_refused() {
        let env = Env::new();
        let abs = format!("{}/abs", env.outside().display());
        let tar = Tar::new().raw(abs.as_bytes(), EntryType::Regular, b"", b"escaped").bytes();
        env.refused(&tar, &ApplyOptions::default(), "absolute path");
        let tar = Tar::new().raw(b"", EntryType::Regular, b"", b"").bytes();
        env.refused(&tar, &ApplyOptions::default(), "empty name");
    }

    #[test]
    fn slip_through_a_symlink_to_outside_is_refused() {
        let env = Env::new();
        let outside = env.outside().display().to_string();
        let tar = Tar::new().symlink("evil", &outside).file("evil/file", b"escaped").bytes();
        let err = env.refused(&tar, &ApplyOptions::default(), "would be written through symlink");
        assert!(err.to_string().contains("evil/file"), "{err}");
        assert!(lmeta(&env.at("evil")).file_type().is_symlink());
    }

    #[test]
    fn slip_through_a_symlink_to_dot_dot_is_refused() {
        let env = Env::new();
        let tar = Tar::new().symlink("up", "..").file("up/outside/x", b"escaped").bytes();
        env.refused(&tar, &ApplyOptions::default(), "would be written through symlink \"up\"");
        // Deeper: the symlink is a middle component, and a directory entry through it.
        let tar = Tar::new().dir("d", 0o755).symlink("d/up", "../..").dir("d/up/x", 0o755).bytes();
        env.refused(&tar, &ApplyOptions::default(), "symlink \"d/up\"");
    }

    #[test]
    fn slip_through_a_symlink_already_in_the_tree_is_refused() {
        let env = Env::new();
        std::os::unix::fs::symlink(env.outside(), env.at("pre")).expect("symlink");
        let tar = Tar::new().file("pre/secret", b"overwritten").bytes();
        env.refused(&tar, &ApplyOptions::default(), "through symlink \"pre\"");
        // A whiteout through it deletes nothing outside either, in both modes.
        let tar = Tar::new().file("pre/.wh.secret", b"").bytes();
        env.refused(&tar, &ApplyOptions::default(), "through symlink \"pre\"");
        env.refused(&tar, &overlay(), "through symlink \"pre\"");
        let tar = Tar::new().file("pre/.wh..wh..opq", b"").bytes();
        env.refused(&tar, &ApplyOptions::default(), "through symlink \"pre\"");
    }

    #[test]
    fn slip_through_a_symlink_chain_is_refused() {
        let env = Env::new();
        let outside = env.outside().display().to_string();
        let tar = Tar::new()
            .symlink("b", &outside)
            .symlink("a", "b")
            .file("a/secret", b"overwritten")
            .bytes();
        env.refused(&tar, &ApplyOptions::default(), "through symlink \"a\"");
    }

    #[test]
    fn slip_hard_link_to_dot_dot_is_refused() {
        let env = Env::new();
        let tar = Tar::new().hardlink("x", "../outside/secret").bytes();
        env.refused(&tar, &ApplyOptions::default(), "hard link target \"../outside/secret\"");
        assert!(!env.at("x").exists());
    }

    #[test]
    fn slip_hard_link_to_an_absolute_path_is_refused() {
        let env = Env::new();
        let abs = format!("{}/secret", env.outside().display());
        let tar = Tar::new().hardlink("x", &abs).bytes();
        env.refused(&tar, &ApplyOptions::default(), "absolute path");
        assert!(!env.at("x").exists());
    }

    #[test]
    fn slip_hard_link_through_a_symlinked_directory_is_refused() {
        let env = Env::new();
        let outside = env.outside().display().to_string();
        let tar = Tar::new().symlink("d", &outside).hardlink("x", "d/secret").bytes();
        env.refused(&tar, &ApplyOptions::default(), "passes through symlink \"d\"");
        assert!(!env.at("x").exists());
    }

    #[test]
    fn slip_through_a_symlink_in_a_lower_layer_is_refused() {
        let env = Env::new();
        let lower = env.lower("lower1");
        std::os::unix::fs::symlink(env.outside(), lower.join("evil")).expect("symlink");
        std::fs::create_dir_all(lower.join("ok/sub")).expect("mkdir");
        std::os::unix::fs::symlink("/", lower.join("ok/sub/deep")).expect("symlink");
        let lower_dir = File::open(&lower).expect("open lower");
        let opts = ApplyOptions {
            whiteouts: Whiteouts::Overlay { userxattr: false },
            compression: None,
            lowers: vec![lower_dir.as_fd()],
        };
        let tar = Tar::new().file("evil/secret", b"overwritten").bytes();
        env.refused(&tar, &opts, "through symlink \"evil\" in a lower layer");
        let tar = Tar::new().file("ok/sub/deep/x", b"escaped").bytes();
        env.refused(&tar, &opts, "through symlink \"ok/sub/deep\" in a lower layer");
        assert!(!env.at("evil").exists());
        // A directory this layer makes in the upper hides the lower's symlink.
        let tar = Tar::new().dir("evil", 0o755).file("evil/file", b"fine").bytes();
        env.apply(&tar, &opts).expect("a directory over a lower symlink");
        assert_eq!(std::fs::read(env.at("evil/file")).expect("read"), b"fine");
        env.assert_outside_untouched();
    }

    #[test]
    fn replacing_a_symlink_never_writes_through_it() {
        let env = Env::new();
        let secret = env.outside().join("secret");
        std::os::unix::fs::symlink(&secret, env.at("l")).expect("symlink");
        std::os::unix::fs::symlink(env.outside(), env.at("d")).expect("symlink");
        let tar = Tar::new().file("l", b"file now").dir("d", 0o755).bytes();
        env.apply_delete(&tar).expect("apply");
        assert_eq!(std::fs::read(env.at("l")).expect("read"), b"file now");
        assert!(lmeta(&env.at("d")).is_dir());
        env.assert_outside_untouched();
    }

    // -- Whiteouts and opaque directories.

    #[test]
    fn overlay_whiteouts_are_devices_and_opaque_is_an_xattr() {
        let env = Env::new();
        std::fs::write(env.at("gone"), b"old").expect("write");
        let tar = Tar::new()
            .file(".wh.gone", b"")
            .dir("d", 0o755)
            .file("d/.wh..wh..opq", b"")
            .file("d/keep", b"kept")
            .file("e/.wh.x", b"")
            .file(".wh..wh.plnk", b"")
            .bytes();
        let applied = env.apply(&tar, &overlay()).expect("apply");
        assert_eq!(applied.entries, 6);
        for whiteout in ["gone", "e/x"] {
            let m = lmeta(&env.at(whiteout));
            assert!(m.file_type().is_char_device(), "{whiteout}");
            assert_eq!(m.rdev(), 0, "{whiteout}");
        }
        assert_eq!(xattr(&env.at("d"), "trusted.overlay.opaque").as_deref(), Some(&b"y"[..]));
        assert_eq!(std::fs::read(env.at("d/keep")).expect("read"), b"kept");
        assert!(xattr(&env.at("e"), "trusted.overlay.opaque").is_none());
        assert_eq!(names(&env.root()), set(&["d", "e", "gone"]));
    }

    #[test]
    fn overlay_with_userxattr_marks_opaque_with_user_overlay_opaque() {
        let env = Env::new();
        let tar = Tar::new().file("made/.wh..wh..opq", b"").file("made/new", b"n").bytes();
        let opts = ApplyOptions {
            whiteouts: Whiteouts::Overlay { userxattr: true },
            ..Default::default()
        };
        env.apply(&tar, &opts).expect("apply");
        assert_eq!(xattr(&env.at("made"), "user.overlay.opaque").as_deref(), Some(&b"y"[..]));
        assert!(xattr(&env.at("made"), "trusted.overlay.opaque").is_none());
        assert_eq!(lmeta(&env.at("made")).mode() & 0o7777, 0o755);
        assert_eq!(names(&env.at("made")), set(&["new"]));
    }

    #[test]
    fn delete_mode_whiteouts_remove() {
        let env = Env::new();
        std::fs::create_dir_all(env.at("a")).expect("mkdir");
        std::fs::write(env.at("a/x"), b"x").expect("write");
        std::fs::write(env.at("a/y"), b"y").expect("write");
        std::fs::create_dir_all(env.at("b/deep")).expect("mkdir");
        std::fs::write(env.at("b/deep/z"), b"z").expect("write");
        std::os::unix::fs::symlink(env.outside(), env.at("b/out")).expect("symlink");
        let tar = Tar::new()
            .file(".wh.b", b"")
            .file("a/.wh.x", b"")
            .file("nope/.wh.q", b"")
            .file(".wh.absent", b"")
            .bytes();
        env.apply_delete(&tar).expect("apply");
        // The whiteout's directory is part of the layer, as with overlayfs.
        assert_eq!(names(&env.root()), set(&["a", "nope"]));
        assert!(names(&env.at("nope")).is_empty());
        assert_eq!(names(&env.at("a")), set(&["y"]));
        env.assert_outside_untouched();
    }

    #[test]
    fn delete_mode_opaque_keeps_only_this_layers_entries_in_any_order() {
        let env = Env::new();
        for (dir, file) in [("o", "old1"), ("o/sub", "old2"), ("o/sub2", "old3"), ("p", "old")] {
            std::fs::create_dir_all(env.at(dir)).expect("mkdir");
            std::fs::write(env.at(&format!("{dir}/{file}")), b"old").expect("write");
        }
        std::os::unix::fs::symlink(env.outside(), env.at("o/out")).expect("symlink");
        let tar = Tar::new()
            // The marker after this layer's entries of the directory...
            .file("o/new", b"new")
            .file("o/sub/new2", b"new")
            .file("o/w/.wh.nothing", b"")
            .file("o/.wh..wh..opq", b"")
            // ... and before them.
            .file("p/.wh..wh..opq", b"")
            .file("p/new", b"new")
            .bytes();
        env.apply_delete(&tar).expect("apply");
        assert_eq!(names(&env.at("o")), set(&["new", "sub", "w"]));
        assert_eq!(names(&env.at("o/sub")), set(&["new2"]));
        assert!(names(&env.at("o/w")).is_empty());
        assert_eq!(names(&env.at("p")), set(&["new"]));
        env.assert_outside_untouched();
    }

    // -- Metadata.

    #[test]
    fn metadata_modes_owners_times_xattrs_devices_and_links_are_kept() {
        let env = Env::new();
        let mut owned = Tar::header(EntryType::Regular, 0o4755);
        owned.set_uid(1234);
        owned.set_gid(5678);
        let mut sgid = Tar::header(EntryType::Regular, 0o2750);
        sgid.set_gid(5678);
        let mut link = Tar::header(EntryType::Symlink, 0o777);
        link.set_mtime(1_500_000_000);
        let mut chr = Tar::header(EntryType::Char, 0o620);
        chr.set_device_major(1).expect("major");
        chr.set_device_minor(3).expect("minor");
        let binary: &[u8] = b"\x01\n\x00\x02 = \n";
        let mut tar = Tar::new()
            .entry(owned, "suid", b"#!/bin/sh\n")
            .entry(sgid, "sgid", b"g")
            .dir("sticky", 0o1777)
            .file("sticky/f", b"after the directory")
            .pax(&[
                ("mtime", b"1700000000.123456789"),
                ("atime", b"1600000000.5"),
                ("SCHILY.xattr.user.foo", b"bar"),
                ("SCHILY.xattr.security.test", binary),
                ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
                ("SCHILY.xattr.user.overlay.redirect", b"/etc"),
            ])
            .file("ns", b"nanoseconds");
        tar.0.append_link(&mut link, "link", "ns").expect("symlink");
        tar = tar.entry(Tar::header(EntryType::Fifo, 0o640), "fifo", b"").hardlink("hl", "suid");
        if is_root() {
            tar = tar.entry(chr, "null", b"");
        }
        let tar = tar.bytes();
        env.apply_delete(&tar).expect("apply");

        let m = lmeta(&env.at("suid"));
        assert_eq!(m.mode() & 0o7777, 0o4755);
        assert_eq!(lmeta(&env.at("sgid")).mode() & 0o7777, 0o2750);
        let sticky = lmeta(&env.at("sticky"));
        assert_eq!(sticky.mode() & 0o7777, 0o1777);
        assert_eq!(sticky.mtime(), 1_600_000_000, "directory times are set at the end");
        if is_root() {
            assert_eq!((m.uid(), m.gid()), (1234, 5678));
            assert_eq!(lmeta(&env.at("sgid")).gid(), 5678);
            let null = lmeta(&env.at("null"));
            assert!(null.file_type().is_char_device());
            assert_eq!((rustix::fs::major(null.rdev()), rustix::fs::minor(null.rdev())), (1, 3));
            assert_eq!(null.mode() & 0o7777, 0o620);
        } else {
            eprintln!("not root: owners and device nodes not checked");
        }
        let ns = lmeta(&env.at("ns"));
        assert_eq!((ns.mtime(), ns.mtime_nsec()), (1_700_000_000, 123_456_789));
        assert_eq!((ns.atime(), ns.atime_nsec()), (1_600_000_000, 500_000_000));
        assert_eq!(xattr(&env.at("ns"), "user.foo").as_deref(), Some(&b"bar"[..]));
        assert_eq!(xattr(&env.at("ns"), "security.test").as_deref(), Some(binary));
        assert!(xattr(&env.at("ns"), "trusted.overlay.opaque").is_none());
        assert!(xattr(&env.at("ns"), "user.overlay.redirect").is_none());
        let l = lmeta(&env.at("link"));
        assert!(l.file_type().is_symlink());
        assert_eq!(l.mtime(), 1_500_000_000);
        assert_eq!(std::fs::read_link(env.at("link")).expect("readlink"), Path::new("ns"));
        let fifo = lmeta(&env.at("fifo"));
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o7777, 0o640);
        let hl = lmeta(&env.at("hl"));
        assert_eq!((hl.ino(), hl.nlink()), (m.ino(), 2));
    }

    #[test]
    fn long_names_pax_paths_and_missing_parents() {
        let env = Env::new();
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(120));
        let tar = Tar::new()
            .file(&long, b"gnu long name")
            .pax(&[("path", b"./pax/named/file")])
            .file("short", b"pax path")
            .file("./dot/slash//file", b"normalised")
            .file(".", b"")
            .bytes();
        env.apply_delete(&tar).expect("apply");
        assert_eq!(std::fs::read(env.at(&long)).expect("read"), b"gnu long name");
        assert_eq!(std::fs::read(env.at("pax/named/file")).expect("read"), b"pax path");
        assert!(!env.at("short").exists());
        assert_eq!(std::fs::read(env.at("dot/slash/file")).expect("read"), b"normalised");
        assert_eq!(lmeta(&env.at("pax/named")).mode() & 0o7777, 0o755);
        if is_root() {
            assert_eq!(lmeta(&env.at("pax")).uid(), 0);
        }
    }

    /// The name and link target Go's `archive/tar` reads, whatever the tar crate's own
    /// PAX lookup would find: a `path` or `linkpath` record hidden in an xattr's value
    /// renames nothing, and a GNU long name or link beats a PAX record.
    #[test]
    fn names_are_read_as_containerd_reads_them() {
        let env = Env::new();
        let long = "d".repeat(200);
        let tar = Tar::new()
            .pax(&[("SCHILY.xattr.user.x", b"a\n15 path=bin/sh\nz")])
            .file("doc/readme", b"not a shell")
            .pax(&[("SCHILY.xattr.user.y", b"a\n19 linkpath=bin/sh\nz")])
            .symlink("doc/link", "readme")
            .pax(&[("path", b"pax-name")])
            .file(&long, b"gnu long name")
            .pax(&[("linkpath", b"pax-target")])
            .symlink("long-link", &"t".repeat(200))
            // An empty GNU long name is none: the PAX path stands.
            .pax(&[("path", b"from-pax")])
            .raw(b"././@LongLink", EntryType::GNULongName, b"", b"\0")
            .file("header-name", b"empty long name")
            .bytes();
        env.apply_delete(&tar).expect("apply");
        assert_eq!(std::fs::read(env.at("doc/readme")).expect("read"), b"not a shell");
        assert_eq!(
            xattr(&env.at("doc/readme"), "user.x").as_deref(),
            Some(&b"a\n15 path=bin/sh\nz"[..])
        );
        assert!(!env.at("bin").exists(), "nothing written at a hidden path");
        assert_eq!(std::fs::read_link(env.at("doc/link")).expect("link"), Path::new("readme"));
        assert_eq!(std::fs::read(env.at(&long)).expect("read"), b"gnu long name");
        assert!(!env.at("pax-name").exists());
        assert_eq!(std::fs::read(env.at("from-pax")).expect("read"), b"empty long name");
        assert!(!env.at("header-name").exists());
        assert_eq!(
            std::fs::read_link(env.at("long-link")).expect("link"),
            Path::new(&"t".repeat(200))
        );
    }

    /// An entry's mode wins over the group bits its access ACL would set (the ACL's mask),
    /// as containerd sets xattrs before the mode.
    #[test]
    fn an_access_acl_leaves_the_entrys_mode() {
        let env = Env::new();
        // user::rwx, user:1000:r--, group::r-x, mask::r--, other::r-x
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (0x01u16, 7u16, u32::MAX),
            (0x02, 4, 1000),
            (0x04, 5, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 5, u32::MAX),
        ] {
            acl.extend(tag.to_le_bytes());
            acl.extend(perm.to_le_bytes());
            acl.extend(id.to_le_bytes());
        }
        let tar = Tar::new()
            .pax(&[("SCHILY.xattr.system.posix_acl_access", &acl)])
            .entry(Tar::header(EntryType::Regular, 0o755), "f", b"x")
            .pax(&[("SCHILY.xattr.system.posix_acl_access", &acl)])
            .dir("d", 0o755)
            .bytes();
        env.apply_delete(&tar).expect("apply");
        for name in ["f", "d"] {
            assert!(xattr(&env.at(name), "system.posix_acl_access").is_some(), "{name}: its ACL");
            assert_eq!(lmeta(&env.at(name)).mode() & 0o7777, 0o755, "{name}");
        }
    }

    #[test]
    fn missing_parents_in_overlay_copy_the_lower_directory() {
        let env = Env::new();
        let upper_lower = env.lower("lower-top");
        let lower = env.lower("lower-bottom");
        std::fs::create_dir_all(lower.join("a")).expect("mkdir");
        let a = lower.join("a");
        rustix::fs::chmod(&a, Mode::from_raw_mode(0o750)).expect("chmod");
        if is_root() {
            rustix::fs::chown(&a, Some(Uid::from_raw(42)), Some(Gid::from_raw(43))).expect("chown");
        }
        let t = Timespec { tv_sec: 1_234_567_890, tv_nsec: 5 };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            &a,
            &Timestamps { last_access: t, last_modification: t },
            AtFlags::empty(),
        )
        .expect("utimes");
        // Its xattrs come up too, as containerd's copy up has them: not trusted.* nor
        // overlayfs's own (an opaque marker would hide the lower directory's contents).
        let set = |name: &str, value: &[u8]| {
            rustix::fs::lsetxattr(&a, name, value, rustix::fs::XattrFlags::empty()).expect(name)
        };
        set("user.k", b"v");
        set("user.overlay.opaque", b"y");
        if is_root() {
            set("trusted.t", b"x");
        }
        let (top, bottom) =
            (File::open(&upper_lower).expect("open"), File::open(&lower).expect("open"));
        let opts = ApplyOptions {
            whiteouts: Whiteouts::Overlay { userxattr: false },
            compression: None,
            lowers: vec![top.as_fd(), bottom.as_fd()],
        };
        let tar = Tar::new().file("a/b/file", b"x").bytes();
        env.apply(&tar, &opts).expect("apply");
        let m = lmeta(&env.at("a"));
        assert_eq!(m.mode() & 0o7777, 0o750);
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_234_567_890, 5));
        if is_root() {
            assert_eq!((m.uid(), m.gid()), (42, 43));
        }
        assert_eq!(lmeta(&env.at("a/b")).mode() & 0o7777, 0o755);
        assert_eq!(xattr(&env.at("a"), "user.k").as_deref(), Some(&b"v"[..]));
        assert_eq!(xattr(&env.at("a"), "user.overlay.opaque"), None);
        assert_eq!(xattr(&env.at("a"), "trusted.t"), None);
        assert_eq!(xattr(&env.at("a/b"), "user.k"), None, "a/b has no lower directory");
    }

    #[test]
    fn hard_links_in_overlay_stay_in_the_layer() {
        let env = Env::new();
        let lower = env.lower("lower1");
        std::fs::write(lower.join("f"), b"lower").expect("write");
        let lower_dir = File::open(&lower).expect("open");
        let opts = ApplyOptions {
            whiteouts: Whiteouts::Overlay { userxattr: false },
            compression: None,
            lowers: vec![lower_dir.as_fd()],
        };
        let tar = Tar::new().hardlink("l", "f").bytes();
        env.refused(&tar, &opts, "not in this layer");
        let tar = Tar::new().file("g", b"mine").hardlink("sub/m", "./g").bytes();
        env.apply(&tar, &opts).expect("apply");
        assert_eq!(lmeta(&env.at("sub/m")).ino(), lmeta(&env.at("g")).ino());
        // Delete mode links to what the tree already has.
        std::fs::write(env.at("pre"), b"pre").expect("write");
        env.apply_delete(&Tar::new().hardlink("pre2", "pre").bytes()).expect("apply");
        assert_eq!(lmeta(&env.at("pre2")).ino(), lmeta(&env.at("pre")).ino());
        let err =
            env.apply_delete(&Tar::new().hardlink("x", "missing").bytes()).expect_err("missing");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        let err = env.apply_delete(&Tar::new().hardlink("pre", "./pre").bytes()).expect_err("self");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert_eq!(std::fs::read(env.at("pre")).expect("read"), b"pre");
    }

    // -- Replacing what is there.

    #[test]
    fn entries_replace_what_is_there_but_directories_merge() {
        let env = Env::new();
        std::fs::create_dir_all(env.at("f_was_dir/inner/deep")).expect("mkdir");
        std::fs::write(env.at("f_was_dir/inner/deep/x"), b"x").expect("write");
        std::fs::write(env.at("d_was_file"), b"file").expect("write");
        std::fs::write(env.at("s_was_file"), b"file").expect("write");
        std::fs::create_dir_all(env.at("keep")).expect("mkdir");
        std::fs::write(env.at("keep/old"), b"old").expect("write");
        let setx = |name: &str| {
            rustix::fs::setxattr(env.at("keep"), name, b"1", rustix::fs::XattrFlags::empty())
                .expect("setxattr");
        };
        setx("user.old");
        setx("user.same");
        if is_root() {
            setx("trusted.overlay.opaque");
        }
        let tar = Tar::new()
            .file("f_was_dir", b"a file now")
            .dir("d_was_file", 0o750)
            .file("d_was_file/child", b"c")
            .symlink("s_was_file", "target")
            .pax(&[("SCHILY.xattr.user.same", b"2"), ("SCHILY.xattr.user.new", b"3")])
            .dir("keep", 0o700)
            .file("keep/new", b"new")
            .bytes();
        env.apply_delete(&tar).expect("apply");
        assert_eq!(std::fs::read(env.at("f_was_dir")).expect("read"), b"a file now");
        assert!(lmeta(&env.at("d_was_file")).is_dir());
        assert_eq!(lmeta(&env.at("d_was_file")).mode() & 0o7777, 0o750);
        assert_eq!(std::fs::read_link(env.at("s_was_file")).expect("link"), Path::new("target"));
        assert_eq!(names(&env.at("keep")), set(&["new", "old"]));
        assert_eq!(lmeta(&env.at("keep")).mode() & 0o7777, 0o700);
        // The entry's xattrs replace the directory's, but overlayfs's own stay.
        assert_eq!(xattr(&env.at("keep"), "user.old"), None);
        assert_eq!(xattr(&env.at("keep"), "user.same").as_deref(), Some(&b"2"[..]));
        assert_eq!(xattr(&env.at("keep"), "user.new").as_deref(), Some(&b"3"[..]));
        if is_root() {
            assert!(xattr(&env.at("keep"), "trusted.overlay.opaque").is_some());
        }
        // A directory turned into a file and back in one layer.
        let tar = Tar::new().dir("flip", 0o755).file("flip/a", b"a").file("flip", b"f").bytes();
        env.apply_delete(&tar).expect("apply");
        assert!(lmeta(&env.at("flip")).is_file());
    }

    // -- Streams.

    /// A tar with some files, padded as GNU tar pads to its 10 KiB records.
    fn sample_tar() -> Vec<u8> {
        let big: Vec<u8> =
            (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let mut tar = Tar::new()
            .dir("etc", 0o755)
            .file("etc/hostname", b"wasnap\n")
            .file("big", &big)
            .pax(&[("mtime", b"1700000000.5")])
            .file("etc/timed", b"t")
            .bytes();
        tar.resize(tar.len().next_multiple_of(10240), 0);
        tar
    }

    fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
        let mut enc = c.encoder(Vec::new()).expect("encoder");
        enc.write_all(data).expect("compress");
        enc.finish().expect("finish")
    }

    #[test]
    fn compressed_streams_are_detected_and_the_diff_id_covers_every_byte() {
        let tar = sample_tar();
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let blob = compress(c, &tar);
            for given in [None, Some(c)] {
                let env = Env::new();
                let opts = ApplyOptions { compression: given, ..Default::default() };
                let applied = env.apply(&blob, &opts).expect("apply");
                assert_eq!(applied.compression, c);
                assert_eq!(applied.diff_id, Digest::of(&tar), "{c}");
                assert_eq!(applied.size, tar.len() as u64);
                assert_eq!(applied.entries, 4);
                assert_eq!(std::fs::read(env.at("etc/hostname")).expect("read"), b"wasnap\n");
                assert_eq!(std::fs::metadata(env.at("big")).expect("stat").len(), 3_000_000);
            }
        }
        // Bytes after the end of the archive are hashed too.
        let mut trailing = tar.clone();
        trailing.extend_from_slice(b"trailing bytes after the end of the archive");
        let env = Env::new();
        let applied = env.apply_delete(&compress(Compression::Gzip, &trailing)).expect("apply");
        assert_eq!((applied.diff_id, applied.size), (Digest::of(&trailing), trailing.len() as u64));
        // And an empty stream is an empty layer.
        let applied = env.apply_delete(b"").expect("empty");
        assert_eq!((applied.diff_id, applied.entries), (Digest::of(b""), 0));
    }

    #[test]
    fn truncated_and_corrupt_streams_are_errors() {
        let tar = sample_tar();
        let bad = |blob: &[u8], what: &str| {
            let env = Env::new();
            let err = env.apply_delete(blob).expect_err(what);
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{what}: {err}");
            err
        };
        // Cut inside the big file's data: the error names it.
        let err = bad(&tar[..1_000_000], "truncated data");
        assert!(err.to_string().contains("\"big\""), "{err}");
        bad(&tar[..1024 + 200], "truncated header");
        let mut cksum = tar.clone();
        cksum[0] ^= 0x20;
        let err = bad(&cksum, "bad checksum");
        assert!(err.to_string().contains("checksum"), "{err}");
        for c in [Compression::Gzip, Compression::Zstd] {
            let blob = compress(c, &tar);
            bad(&blob[..blob.len() / 2], "truncated compressed stream");
            bad(&blob[..blob.len() - 3], "compressed stream missing its end");
            let mut corrupt = blob.clone();
            let mid = corrupt.len() / 2;
            corrupt[mid] ^= 0xff;
            corrupt[mid + 1] ^= 0x55;
            bad(&corrupt, "corrupt compressed stream");
        }
        // An entry type nobody writes.
        bad(&Tar::new().raw(b"vol", EntryType::new(b'V'), b"", b"").bytes(), "volume header");
    }

    #[test]
    fn a_refused_entry_stops_the_decoder_early() {
        let mut tar = Tar::new().raw(b"../x", EntryType::Regular, b"", b"x");
        let blob: Vec<u8> = (0..40u8).flat_map(|i| vec![i; 1 << 20]).collect();
        tar = tar.file("big", &blob);
        let gz = compress(Compression::Gzip, &tar.bytes());
        let env = Env::new();
        let started = Instant::now();
        let err = env.apply_delete(&gz).expect_err("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(started.elapsed().as_secs() < 20);
        env.assert_outside_untouched();
    }

    #[test]
    fn many_small_files_apply_quickly() {
        let mut tar = Tar::new();
        for d in 0..50 {
            tar = tar.dir(&format!("d{d}"), 0o755);
            for f in 0..100 {
                tar = tar.file(&format!("d{d}/f{f}"), format!("file {d}/{f}").as_bytes());
            }
        }
        let tar = tar.bytes();
        let env = Env::new();
        let started = Instant::now();
        let applied = env.apply_delete(&tar).expect("apply");
        let took = started.elapsed();
        eprintln!("5,050 entries ({} KiB) applied in {took:?}", tar.len() >> 10);
        assert_eq!(applied.entries, 5050);
        assert!(took.as_secs() < 20, "{took:?}");
    }

    #[test]
    fn extension_headers_of_every_kind_are_read() {
        let env = Env::new();
        // A sparse file: the builder writes a GNU sparse entry for a file with holes.
        let src = env.lower("lower-src");
        let sparse = File::create(src.join("sparse")).expect("create");
        sparse.set_len(4 << 20).expect("set_len");
        rustix::io::pwrite(&sparse, b"middle", 2 << 20).expect("pwrite");
        drop(sparse);
        let long = format!("{}/file", "l".repeat(150));
        let mut tar = Tar::new()
            .raw(b"pax_global_header", EntryType::XGlobalHeader, b"", b"18 comment=global\n")
            // PAX records and a GNU long name for the same entry.
            .pax(&[("mtime", b"1600000000.25"), ("SCHILY.xattr.user.k", b"v\nw")])
            .file(&long, b"both");
        tar.0.append_path_with_name(src.join("sparse"), "sparse").expect("append sparse");
        let tar = tar.file("after", b"after").bytes();
        let mut archive = tar::Archive::new(tar.as_slice());
        let kinds: Vec<_> = archive
            .entries()
            .expect("entries")
            .map(|e| e.expect("entry").header().entry_type())
            .collect();
        assert!(kinds.contains(&EntryType::GNUSparse), "{kinds:?}");
        let applied = env.apply_delete(&tar).expect("apply");
        assert_eq!(applied.entries, 3, "the global header is not an entry");
        let m = lmeta(&env.at(&long));
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_600_000_000, 250_000_000));
        assert_eq!(xattr(&env.at(&long), "user.k").as_deref(), Some(&b"v\nw"[..]));
        let data = std::fs::read(env.at("sparse")).expect("read sparse");
        assert_eq!(data.len(), 4 << 20);
        assert_eq!(&data[2 << 20..(2 << 20) + 6], b"middle");
        assert!(data[..2 << 20].iter().all(|&b| b == 0));
        assert_eq!(std::fs::read(env.at("after")).expect("read"), b"after");
        // A name longer than the filesystem takes is the layer's fault.
        let err = env
            .apply_delete(&Tar::new().file(&"n".repeat(300), b"").bytes())
            .expect_err("long name");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    }

    #[test]
    fn pax_times_parse() {
        let t = |s: &str| parse_time(s.as_bytes()).map(|t| (t.tv_sec, t.tv_nsec));
        assert_eq!(t("1700000000.123456789"), Some((1_700_000_000, 123_456_789)));
        assert_eq!(t("1.5"), Some((1, 500_000_000)));
        assert_eq!(t("1.1234567891"), Some((1, 123_456_789)));
        assert_eq!(t("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(t("-3"), Some((-3, 0)));
        assert_eq!(t("12"), Some((12, 0)));
        for bad in ["", ".5", "1.x", "x", "1e9", "--1"] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    // -- Linked files (`apply_linked`).

    /// The stream a merge pipes: `upper` compared with `lower` (none: from nothing),
    /// with (`contents`) or without the files' bytes.
    fn diff_of(lower: Option<&Path>, upper: &Path, contents: bool) -> Vec<u8> {
        use crate::layer::diff::{DiffOptions, Source, diff_with};
        let upper = File::open(upper).expect("open upper");
        let lower = lower.map(|l| File::open(l).expect("open lower"));
        let source = Source::Trees { lower: lower.as_ref().map(AsFd::as_fd), upper: upper.as_fd() };
        let mut buf = Vec::new();
        diff_with(source, Compression::None, &mut buf, &DiffOptions { contents }).expect("diff");
        buf
    }

    fn apply_linked_from(root: &Path, tar: &[u8], from: &Path) -> Result<Applied> {
        apply_linked_as(root, tar, from, &ApplyOptions::default(), false)
    }

    /// [`apply_linked_from`] with `opts`, from an overlay layer if `overlay_layer`.
    fn apply_linked_as(
        root: &Path,
        tar: &[u8],
        from: &Path,
        opts: &ApplyOptions<'_>,
        overlay_layer: bool,
    ) -> Result<Applied> {
        let dir = File::open(root).expect("open root");
        let from = File::open(from).expect("open source");
        apply_linked(dir.as_fd(), tar, opts, LinkFrom { tree: from.as_fd(), overlay_layer })
    }

    fn ino(path: &Path) -> u64 {
        lmeta(path).ino()
    }

    /// Every entry below `root` as a comparable line: type, mode, owner, mtime, user
    /// xattrs, and the contents or the link's target.
    fn describe(root: &Path) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut todo = vec![root.to_path_buf()];
        while let Some(dir) = todo.pop() {
            for entry in std::fs::read_dir(&dir).expect("read dir") {
                let path = entry.expect("entry").path();
                let m = lmeta(&path);
                let rel = path.strip_prefix(root).expect("below").display().to_string();
                let what = if m.is_dir() {
                    todo.push(path.clone());
                    "dir".to_owned()
                } else if m.file_type().is_symlink() {
                    format!("-> {}", std::fs::read_link(&path).expect("readlink").display())
                } else {
                    format!("{:?}", std::fs::read(&path).expect("read"))
                };
                let mut names = vec![0u8; 4096];
                let n = rustix::fs::llistxattr(&path, &mut names[..]).unwrap_or(0);
                let mut attrs: Vec<String> = names[..n]
                    .split(|&b| b == 0)
                    .filter(|n| n.starts_with(b"user."))
                    .map(|n| {
                        let n = String::from_utf8_lossy(n).into_owned();
                        format!("{n}={:?}", xattr(&path, &n))
                    })
                    .collect();
                attrs.sort();
                out.insert(format!(
                    "{rel} {what} {:o} {}:{} {}.{} {attrs:?}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.mtime(),
                    m.mtime_nsec()
                ));
            }
        }
        out
    }

    /// A tree with what a layer holds: files (one with a mode, an xattr and a time),
    /// a group of hard links, a symlink, an empty file, a directory.
    fn sample_source(src: &Path) {
        std::fs::create_dir(src.join("d")).expect("mkdir");
        std::fs::write(src.join("a"), b"alpha").expect("write");
        std::fs::write(src.join("d/b"), vec![b'b'; 100_000]).expect("write");
        std::fs::hard_link(src.join("d/b"), src.join("d/c")).expect("link");
        std::fs::write(src.join("e"), b"").expect("write");
        std::os::unix::fs::symlink("a", src.join("s")).expect("symlink");
        std::fs::set_permissions(
            src.join("a"),
            std::os::unix::fs::PermissionsExt::from_mode(0o4750),
        )
        .expect("chmod");
        rustix::fs::lsetxattr(src.join("a"), "user.k", b"v", rustix::fs::XattrFlags::empty())
            .expect("setxattr");
        let t = Timespec { tv_sec: 1_234_567_890, tv_nsec: 123_456_789 };
        let times = Timestamps { last_access: t, last_modification: t };
        rustix::fs::utimensat(rustix::fs::CWD, src.join("a"), &times, AtFlags::empty())
            .expect("utimensat");
    }

    #[test]
    fn linked_files_share_the_source_inode_and_replace_what_was_there() {
        let env = Env::new();
        let src = env.lower("lower-src");
        sample_source(&src);
        // What was there: a directory where `a` goes, a symlink to the outside where
        // `d/b` goes (replaced, never written through).
        std::fs::create_dir_all(env.at("a/old")).expect("mkdir");
        std::fs::create_dir(env.at("d")).expect("mkdir");
        std::os::unix::fs::symlink(env.outside().join("secret"), env.at("d/b")).expect("symlink");
        let tar = diff_of(None, &src, false);
        apply_linked_from(&env.root(), &tar, &src).expect("apply linked");
        for rel in ["a", "d/b", "e"] {
            assert_eq!(ino(&env.at(rel)), ino(&src.join(rel)), "{rel}");
        }
        assert_eq!(ino(&env.at("d/c")), ino(&src.join("d/b")), "the group stays a group");
        assert_eq!(lmeta(&src.join("a")).nlink(), 2);
        assert_eq!(lmeta(&src.join("d/b")).nlink(), 4);
        assert_eq!(std::fs::read_link(env.at("s")).expect("readlink"), Path::new("a"));
        env.assert_outside_untouched();

        // The same tree as a copy makes, to the xattr and the nanosecond.
        let copied = Env::new();
        copied.apply_delete(&diff_of(None, &src, true)).expect("apply copies");
        assert_eq!(describe(&env.root()), describe(&copied.root()));
        assert_eq!(describe(&env.root()), describe(&src));
        assert_ne!(ino(&copied.at("a")), ino(&src.join("a")));
    }

    #[test]
    fn linked_changes_of_two_trees_apply_as_copied_ones() {
        let env = Env::new();
        let (lower, upper) = (env.lower("lower-l"), env.lower("lower-u"));
        sample_source(&lower);
        std::fs::create_dir(lower.join("gone")).expect("mkdir");
        std::fs::write(lower.join("gone/x"), b"x").expect("write");
        let copy = |from: &Path, to: &Path| {
            let ambient = cap_std::ambient_authority();
            let from = Dir::open_ambient_dir(from, ambient).expect("from");
            let to = Dir::open_ambient_dir(to, ambient).expect("to");
            fsutil::copy_tree(&from, &to).expect("copy");
        };
        copy(&lower, &upper);
        copy(&lower, &env.root());
        std::fs::remove_dir_all(upper.join("gone")).expect("rm");
        std::fs::write(upper.join("d/new"), b"new").expect("write");
        std::fs::remove_file(upper.join("a")).expect("rm");
        std::fs::write(upper.join("a"), b"changed").expect("write");
        let copied = Env::new();
        copy(&lower, &copied.root());
        copied.apply_delete(&diff_of(Some(&lower), &upper, true)).expect("copies");
        apply_linked_from(&env.root(), &diff_of(Some(&lower), &upper, false), &upper)
            .expect("links");
        assert_eq!(describe(&env.root()), describe(&upper));
        assert_eq!(describe(&env.root()), describe(&copied.root()));
        assert_eq!(ino(&env.at("a")), ino(&upper.join("a")));
        assert_eq!(ino(&env.at("d/new")), ino(&upper.join("d/new")));
        // Unchanged files were not in the change: the target's own stay.
        assert_ne!(ino(&env.at("e")), ino(&upper.join("e")));
    }

    #[test]
    fn linked_files_across_filesystems_are_copied() {
        let env = Env::new();
        // /tmp is another filesystem than /dev/shm where it is not a tmpfs too.
        let other = tempfile::tempdir_in(std::env::temp_dir()).expect("tempdir");
        let src = other.path();
        if lmeta(src).dev() == lmeta(&env.root()).dev() {
            eprintln!("skipped: {} is on the same filesystem as /dev/shm", src.display());
            return;
        }
        sample_source(src);
        let tar = diff_of(None, src, false);
        apply_linked_from(&env.root(), &tar, src).expect("apply");
        for rel in ["a", "d/b", "d/c", "e"] {
            assert_ne!(ino(&env.at(rel)), ino(&src.join(rel)), "{rel}");
        }
        assert_eq!(ino(&env.at("d/c")), ino(&env.at("d/b")), "the group is kept");
        assert_eq!(lmeta(&src.join("a")).nlink(), 1);
        assert_eq!(describe(&env.root()), describe(src));
        env.assert_outside_untouched();
    }

    #[test]
    fn linked_files_with_overlay_xattrs_are_copied_without_them_where_overlayfs_reads_them() {
        // From an overlay layer, and into an upper directory: copied without them.
        for (opts, overlay_layer) in [(ApplyOptions::default(), true), (overlay(), false)] {
            let env = Env::new();
            let src = env.lower("lower-src");
            std::fs::write(src.join("f"), b"f").expect("write");
            let set = |name: &str, value: &[u8]| {
                rustix::fs::lsetxattr(src.join("f"), name, value, rustix::fs::XattrFlags::empty())
            };
            if set("user.k", b"v") == Err(Errno::NOTSUP) {
                eprintln!("skipped: no user xattrs here");
                return;
            }
            set("user.overlay.origin", b"x").expect("setxattr");
            let tar = diff_of(None, &src, false);
            apply_linked_as(&env.root(), &tar, &src, &opts, overlay_layer).expect("apply");
            assert_ne!(ino(&env.at("f")), ino(&src.join("f")));
            assert_eq!(std::fs::read(env.at("f")).expect("read"), b"f");
            assert_eq!(xattr(&env.at("f"), "user.overlay.origin"), None);
            // The stream carries no xattrs for a linked file: the copy takes the source's.
            assert_eq!(xattr(&env.at("f"), "user.k").as_deref(), Some(&b"v"[..]));
        }
    }

    #[test]
    fn linked_files_overlayfs_keeps_elsewhere_are_refused_from_an_overlay_layer() {
        for mark in ["user.overlay.metacopy", "user.overlay.redirect"] {
            for opts in [ApplyOptions::default(), overlay()] {
                let env = Env::new();
                let src = env.lower("lower-src");
                std::fs::write(src.join("f"), b"").expect("write");
                let set = rustix::fs::lsetxattr(
                    src.join("f"),
                    mark,
                    b"/elsewhere",
                    rustix::fs::XattrFlags::empty(),
                );
                if set == Err(Errno::NOTSUP) {
                    eprintln!("skipped: no user xattrs here");
                    return;
                }
                set.expect("setxattr");
                let tar = diff_of(None, &src, false);
                let err = apply_linked_as(&env.root(), &tar, &src, &opts, true)
                    .expect_err("its data is elsewhere");
                assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{mark}: {err}");
                assert!(err.to_string().contains(mark), "{err}");
                assert!(!env.at("f").exists(), "{mark}");
            }
        }
    }

    #[test]
    fn between_plain_trees_files_with_overlay_xattrs_are_linked() {
        // Inert in a plain tree: the merge shares the inode, marks and all, as the
        // source tree holds it; a copy (another filesystem) takes the bytes without them.
        for mark in ["user.overlay.origin", "user.overlay.metacopy", "user.overlay.redirect"] {
            let env = Env::new();
            let src = env.lower("lower-src");
            std::fs::write(src.join("f"), b"f").expect("write");
            let set =
                rustix::fs::lsetxattr(src.join("f"), mark, b"x", rustix::fs::XattrFlags::empty());
            if set == Err(Errno::NOTSUP) {
                eprintln!("skipped: no user xattrs here");
                return;
            }
            set.expect("setxattr");
            apply_linked_from(&env.root(), &diff_of(None, &src, false), &src).expect(mark);
            assert_eq!(ino(&env.at("f")), ino(&src.join("f")), "{mark}");
            assert_eq!(std::fs::read(env.at("f")).expect("read"), b"f");
        }
    }

    #[test]
    fn links_through_the_proc_link_without_cap_dac_read_search() {
        let env = Env::new();
        let src = env.lower("lower-src");
        std::fs::write(src.join("f"), b"f").expect("write");
        let dir = File::open(env.root()).expect("open root");
        let pinned =
            fsutil::pin_in_tree(File::open(&src).expect("open"), Path::new("f")).expect("pin");
        let known = std::cell::Cell::new(Some(false));
        fsutil::link_pinned(pinned.as_fd(), dir.as_fd(), OsStr::new("g"), &known).expect("link");
        assert_eq!(ino(&env.at("g")), ino(&src.join("f")));
        assert_eq!(known.get(), Some(false));
        let unknown = std::cell::Cell::new(None);
        fsutil::link_pinned(pinned.as_fd(), dir.as_fd(), OsStr::new("h"), &unknown).expect("link");
        assert_eq!(ino(&env.at("h")), ino(&src.join("f")));
        assert!(unknown.get().is_some());
        let err = fsutil::link_pinned(pinned.as_fd(), dir.as_fd(), OsStr::new("h"), &unknown);
        assert_eq!(err, Err(Errno::EXIST), "never replaces");
    }

    /// A hand-made stream saying `path` is a linked file of `size` bytes (as `Tar`
    /// writes it: mode 0644, owner 0:0, mtime 1600000000).
    fn linked_entry(path: &str, size: &str) -> Vec<u8> {
        use crate::layer::diff::{LINK_SIZE, LINK_SOURCE};
        Tar::new().pax(&[(LINK_SOURCE, b"1"), (LINK_SIZE, size.as_bytes())]).file(path, b"").bytes()
    }

    #[test]
    fn private_records_from_outside_are_refused() {
        use crate::layer::diff::{LINK_SIZE, LINK_SOURCE};
        let env = Env::new();
        // As a merge would send it, but to `apply`: refused, nothing read or linked.
        env.refused(&linked_entry("f", "6"), &ApplyOptions::default(), "private PAX records");
        let other = Tar::new().pax(&[("WASNAP.anything", b"x")]).dir("d", 0o755).bytes();
        env.refused(&other, &ApplyOptions::default(), "private PAX records");
        assert!(names(&env.root()).is_empty());

        // Given a tree to link from, only well-formed records on a file without data.
        let src = env.lower("lower-src");
        std::fs::write(src.join("f"), b"secret").expect("write");
        let bad = [
            (Tar::new().pax(&[("WASNAP.other", b"1")]).file("f", b"").bytes(), "unknown private"),
            (Tar::new().pax(&[(LINK_SOURCE, b"1")]).file("f", b"").bytes(), "needs both"),
            (
                Tar::new().pax(&[(LINK_SOURCE, b"2"), (LINK_SIZE, b"6")]).file("f", b"").bytes(),
                "is not 1",
            ),
            (
                Tar::new().pax(&[(LINK_SOURCE, b"1"), (LINK_SIZE, b"6")]).symlink("f", "x").bytes(),
                "not a regular file without data",
            ),
            (
                Tar::new()
                    .pax(&[(LINK_SOURCE, b"1"), (LINK_SIZE, b"6")])
                    .file("f", b"data")
                    .bytes(),
                "not a regular file without data",
            ),
            (
                Tar::new()
                    .pax(&[(LINK_SOURCE, b"1"), (LINK_SIZE, b"0")])
                    .file(".wh.f", b"")
                    .bytes(),
                "not a regular file without data",
            ),
            (
                Tar::new().pax(&[(LINK_SOURCE, b"1"), (LINK_SIZE, b"0")]).dir("d", 0o755).bytes(),
                "not a regular file without data",
            ),
        ];
        for (tar, needle) in bad {
            let err = apply_linked_from(&env.root(), &tar, &src).expect_err(needle);
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
            assert!(err.to_string().contains(needle), "{needle:?} not in: {err}");
        }
        assert!(names(&env.root()).is_empty());
        assert_eq!(lmeta(&src.join("f")).nlink(), 1);
    }

    #[test]
    fn linked_sources_are_never_followed_nor_opened() {
        let env = Env::new();
        let src = env.lower("lower-src");
        let secret = env.outside().join("secret");
        let t = Timespec { tv_sec: 1_600_000_000, tv_nsec: 0 };
        let times = Timestamps { last_access: t, last_modification: t };
        // A symlink at the file's place, and as a directory on its way.
        std::os::unix::fs::symlink(&secret, src.join("f")).expect("symlink");
        std::os::unix::fs::symlink(env.outside(), src.join("d")).expect("symlink");
        // A fifo (opening it would block) and, as root, a device.
        rustix::fs::mknodat(
            File::open(&src).expect("open"),
            "p",
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .expect("mkfifo");
        if is_root() {
            let null = rustix::fs::makedev(1, 3);
            rustix::fs::mknodat(
                File::open(&src).expect("open"),
                "c",
                FileType::CharacterDevice,
                Mode::from_raw_mode(0o644),
                null,
            )
            .expect("mknod");
        }
        // A file other than announced.
        std::fs::write(src.join("m"), b"12345").expect("write");
        rustix::fs::utimensat(rustix::fs::CWD, src.join("m"), &times, AtFlags::empty())
            .expect("utimensat");
        std::fs::set_permissions(
            src.join("m"),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .expect("chmod");
        let cases = [
            ("f", "6", ErrorKind::FailedPrecondition),
            ("d/secret", "6", ErrorKind::FailedPrecondition),
            ("p", "0", ErrorKind::FailedPrecondition),
            ("c", "0", if is_root() { ErrorKind::FailedPrecondition } else { ErrorKind::NotFound }),
            ("m", "3", ErrorKind::Internal),
        ];
        for (path, size, kind) in cases {
            let err =
                apply_linked_from(&env.root(), &linked_entry(path, size), &src).expect_err(path);
            assert_eq!(err.kind(), kind, "{path}: {err}");
            assert!(std::fs::symlink_metadata(env.at(path)).is_err(), "{path} was made");
        }
        env.assert_outside_untouched();
        if !is_root() {
            return; // the hand-made entry says owner 0:0
        }
        // Announced as it is: linked.
        apply_linked_from(&env.root(), &linked_entry("m", "5"), &src).expect("linked");
        assert_eq!(ino(&env.at("m")), ino(&src.join("m")));
    }
}
