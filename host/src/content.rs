//! The content store: blobs by digest, in the root, as containerd's content store keeps
//! them.
//!
//! **Files.** A blob lives at `content/blobs/sha256/<hex>`, read-only. It is written to
//! a private file under `content/ingest/` first, hashed as it is written, synced, checked
//! against the digest and size the caller expects, and only then renamed into place (and
//! the directory synced): a half-written or wrong blob is never visible under a digest.
//! Two ingests of the same digest each write their own file and each renames it into
//! place (the same verified bytes; a damaged file of that name is so replaced), then syncs
//! the directory before writing its record. What `ingest/` holds when the root is opened
//! is what a crash cut short, and is removed; a file whose record could not be written is
//! removed at once unless a namespace records it.
//!
//! **Records.** Which blobs each namespace holds, with their labels, is kept in the
//! metadata database ([`crate::metadata`]), beside the snapshots; an ingest of a blob the
//! namespace already holds sets the labels it gives on the record. One garbage
//! collection marks both. A blob ingested under a lease is held by it; snapshots mapped
//! to a blob, and `containerd.io/gc.ref.content.*` labels, hold it too; a blob nothing
//! holds is collected (containerd's rules). After a collection swept its last record,
//! the file is deleted.
//!
//! **Races.** An ingest holds the store's lock shared from its rename until its record is
//! committed; deleting files no record names holds it exclusively. So a file is never
//! deleted between an ingest's rename and its record.

use std::collections::HashSet;
use std::io::{self, BufWriter, Read, Write};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use cap_std::fs::OpenOptionsExt;
use cap_std::fs::{Dir, File, OpenOptions};
use serde::{Deserialize, Serialize};

use crate::digest::{Digest, Hashing};
use crate::error::{Context, Error, Result};
use crate::fault::Faults;
use crate::filter::{Adaptor, Filter, map_field};
use crate::kv::{Durability, from_nanos, now_nanos};
use crate::metadata::content::{self as records, Stored, Tables as _};
use crate::metadata::{Ctx, MetaDb};
use crate::snapshot::{Labels, validate_labels};

/// The store's directory inside the root.
pub const CONTENT_DIR: &str = "content";
const BLOBS: &str = "blobs/sha256";
const INGEST: &str = "ingest";
/// How much an ingest buffers before writing.
const WRITE_BUFFER: usize = 1 << 20;

/// What is known about a blob in one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// When this namespace first recorded it.
    #[serde(with = "crate::snapshot::rfc3339")]
    pub created: SystemTime,
    /// When its record last changed.
    #[serde(with = "crate::snapshot::rfc3339")]
    pub updated: SystemTime,
    /// Its labels.
    #[serde(default)]
    pub labels: Labels,
}

impl BlobInfo {
    fn from_stored(digest: Digest, s: Stored) -> Self {
        BlobInfo {
            digest,
            size: s.size,
            created: from_nanos(s.created),
            updated: from_nanos(s.updated),
            labels: s.labels,
        }
    }
}

impl Adaptor for BlobInfo {
    fn field(&self, path: &[&str]) -> Option<String> {
        match path {
            ["digest"] => Some(self.digest.to_string()),
            ["size"] => Some(self.size.to_string()),
            ["labels", rest @ ..] => map_field(&self.labels, rest),
            _ => None,
        }
    }
}

/// What a blob must be: its digest, and its size when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// The digest the bytes must have.
    pub digest: Digest,
    /// The size they must have, if known.
    pub size: Option<u64>,
}

/// The content store of a root.
#[derive(Debug)]
pub struct ContentStore {
    db: Arc<MetaDb>,
    /// `content/blobs/sha256`, opened for reading (so it can be synced).
    blobs: Dir,
    ingest: Dir,
    /// Shared by ingests from rename to record; exclusive while deleting files.
    files: RwLock<()>,
    faults: Arc<Faults>,
}

impl ContentStore {
    /// Opens (creating if needed) the store in `root`, with its records in `db`, and
    /// removes what interrupted ingests left.
    pub fn open(root: &Dir, db: Arc<MetaDb>, faults: Arc<Faults>) -> Result<Self> {
        // Their names synced: a blob synced into them must not lose them.
        let open = |rel: &str| {
            let rel = format!("{CONTENT_DIR}/{rel}");
            crate::fsutil::make_dir_synced(root, &rel, 0o700).with_context(|| format!("open {rel}"))
        };
        let (blobs, ingest) = (open(BLOBS)?, open(INGEST)?);
        for entry in ingest.entries().context("list content/ingest")? {
            let name = entry.context("list content/ingest")?.file_name();
            ingest.remove_file(&name).with_context(|| {
                format!("remove interrupted ingest content/ingest/{}", name.to_string_lossy())
            })?;
        }
        Ok(ContentStore { db, blobs, ingest, files: RwLock::new(()), faults })
    }

    /// A writer for a new blob; [`Writer::commit`] makes it visible.
    pub fn writer(&self) -> Result<Writer<'_>> {
        let name = format!("{}-{:08x}", now_nanos(), crate::kv::nonce());
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true).mode(0o600);
        let file = self
            .ingest
            .open_with(&name, &opts)
            .with_context(|| format!("create content/ingest/{name}"))?;
        Ok(Writer {
            store: self,
            out: Some(Hashing::new(BufWriter::with_capacity(WRITE_BUFFER, file))),
            name,
        })
    }

    /// Reads `r` to its end into a new blob, checked against `expected`, and records it
    /// in the caller's namespace (held by the caller's lease, if any).
    pub fn ingest(
        &self,
        ctx: &Ctx,
        r: &mut dyn Read,
        expected: Option<Expected>,
        labels: &Labels,
    ) -> Result<BlobInfo> {
        let mut w = self.writer()?;
        io::copy(r, &mut w).context("write blob")?;
        w.commit(ctx, expected, labels)
    }

    /// What the caller's namespace knows of `digest`.
    pub fn info(&self, ctx: &Ctx, digest: &Digest) -> Result<BlobInfo> {
        self.db.read_with(|txn| {
            let stored = records::get(txn, ctx.namespace(), digest)?
                .ok_or_else(|| records::not_found(digest))?;
            Ok(BlobInfo::from_stored(*digest, stored))
        })
    }

    /// The namespace's blobs matching any of `filters` (fields `digest`, `size`,
    /// `labels.<k>`), in digest order.
    pub fn list(&self, ctx: &Ctx, filters: &[String]) -> Result<Vec<BlobInfo>> {
        let filter = Filter::parse_all(filters)?;
        self.db.read_with(|txn| {
            let mut out = Vec::new();
            for (d, stored) in records::list(txn, ctx.namespace())? {
                let digest = Digest::parse(&d).context("corrupt content record")?;
                let info = BlobInfo::from_stored(digest, stored);
                if filter.matches(&info) {
                    out.push(info);
                }
            }
            Ok(out)
        })
    }

    /// Opens `digest` for reading, if the caller's namespace holds it.
    pub fn read(&self, ctx: &Ctx, digest: &Digest) -> Result<(BlobInfo, std::fs::File)> {
        let info = self.info(ctx, digest)?;
        let file = self.blobs.open(digest.hex()).with_context(|| format!("open blob {digest}"))?;
        Ok((info, file.into_std()))
    }

    /// Replaces the labels of `digest` in the caller's namespace.
    pub fn set_labels(&self, ctx: &Ctx, digest: &Digest, labels: &Labels) -> Result<BlobInfo> {
        validate_labels(labels)?;
        let labels = crate::snapshot::without_empty(labels).into_owned();
        let (ns, d) = (ctx.namespace().to_owned(), *digest);
        let stored = self.db.write(Durability::Immediate, move |txn| {
            records::set_labels(txn, &ns, &d, &labels, now_nanos())
        })?;
        Ok(BlobInfo::from_stored(*digest, stored))
    }

    /// Deletes the caller's namespace's record of `digest`, and the file once no
    /// namespace records it. A blob a snapshot is mapped to is refused
    /// (failed-precondition).
    pub fn delete(&self, ctx: &Ctx, digest: &Digest) -> Result<()> {
        let (ns, d) = (ctx.namespace().to_owned(), *digest);
        self.db.write(Durability::Immediate, move |txn| records::delete(txn, &ns, &d))?;
        self.remove_unrecorded(Some(&[*digest]))?;
        Ok(())
    }

    /// The snapshots of the caller's namespace mapped to `digest`: (snapshotter, key).
    pub fn mapped_snapshots(&self, ctx: &Ctx, digest: &Digest) -> Result<Vec<(String, String)>> {
        self.db.read_with(|txn| txn.mapped(ctx.namespace(), &digest.to_string()))
    }

    /// Deletes the files of blobs no namespace records: those of `candidates`, or all.
    /// Returns what it deleted.
    pub fn remove_unrecorded(&self, candidates: Option<&[Digest]>) -> Result<Vec<Digest>> {
        let _files = self.files.write().unwrap_or_else(|e| e.into_inner());
        let (recorded, on_disk): (HashSet<Digest>, Vec<Digest>) = match candidates {
            Some(c) => (self.db.read_with(|txn| records::recorded(txn, c))?, c.to_vec()),
            None => {
                let all = self.db.read_with(records::all)?;
                // A record whose key is no digest names no file of blobs/.
                let recorded = all.iter().filter_map(|(_, d, _)| Digest::parse(d).ok()).collect();
                let mut found = Vec::new();
                for entry in self.blobs.entries().context("list content/blobs")? {
                    let name = entry.context("list content/blobs")?.file_name();
                    // Anything not named by a digest is not the store's: left alone.
                    if let Some(d) = name.to_str().and_then(Digest::from_hex) {
                        found.push(d);
                    }
                }
                (recorded, found)
            }
        };
        let mut removed = Vec::new();
        for d in on_disk {
            if recorded.contains(&d) {
                continue;
            }
            match self.blobs.remove_file(d.hex()) {
                Ok(()) => removed.push(d),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::from(e).context(format!("delete blob {d}"))),
            }
        }
        Ok(removed)
    }

    /// Moves a verified ingest file into place and records it.
    fn publish(
        &self,
        ctx: &Ctx,
        name: &str,
        digest: Digest,
        size: u64,
        labels: &Labels,
    ) -> Result<BlobInfo> {
        // A missing lease fails the record's write below; checked first as well, so that
        // the usual case leaves no blob in blobs/ that no record names.
        if let Some(lease) = ctx.lease() {
            crate::metadata::Leases::new(self.db.clone()).require(ctx, lease)?;
        }
        let files = self.files.read().unwrap_or_else(|e| e.into_inner());
        let hex = digest.hex();
        // The verified bytes go into place even where a file of that name is: it may be
        // damaged (of the same size, even), and its name may not be on disk yet (the
        // ingest that renamed it may not have synced the directory, or failed to). So
        // the name is synced here, before any record of this call names it.
        if let Ok(m) = self.blobs.symlink_metadata(&hex)
            && !(m.is_file() && m.len() == size)
        {
            tracing::warn!(%digest, "replacing a damaged blob file");
        }
        self.ingest
            .rename(name, &self.blobs, &hex)
            .with_context(|| format!("move content/ingest/{name} to blob {digest}"))?;
        rustix::fs::fsync(&self.blobs).context("sync content/blobs")?;
        let (ns, labels2, lease) =
            (ctx.namespace().to_owned(), labels.clone(), ctx.lease().map(str::to_owned));
        let faults = self.faults.clone();
        let written = self.db.write(Durability::Immediate, move |txn| {
            faults.hit("content.publish.record")?;
            records::put(txn, &ns, &digest, size, &labels2, lease.as_deref(), now_nanos())
        });
        drop(files);
        match written {
            Ok((stored, _)) => Ok(BlobInfo::from_stored(digest, stored)),
            Err(e) => {
                // The file goes now unless a namespace records it (another ingest of the
                // same bytes), not at the next full scan of blobs/.
                if let Err(e2) = self.remove_unrecorded(Some(&[digest])) {
                    tracing::warn!(%digest, error = %e2,
                        "a blob whose record failed is left; the next start's collection removes it");
                }
                Err(e)
            }
        }
    }
}

/// A blob being written (see [`ContentStore::writer`]). Dropped uncommitted, its file
/// is removed.
#[derive(Debug)]
pub struct Writer<'a> {
    store: &'a ContentStore,
    out: Option<Hashing<BufWriter<File>>>,
    name: String,
}

impl Writer<'_> {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.out.as_ref().map_or(0, Hashing::count)
    }

    /// Syncs what was written, checks it against `expected` (a mismatch is
    /// failed-precondition and nothing is kept), and makes it the blob of its digest,
    /// recorded in the caller's namespace with `labels` (set on an existing record too) and
    /// held by the caller's lease.
    pub fn commit(
        mut self,
        ctx: &Ctx,
        expected: Option<Expected>,
        labels: &Labels,
    ) -> Result<BlobInfo> {
        validate_labels(labels)?;
        let labels = &*crate::snapshot::without_empty(labels);
        let out =
            self.out.take().ok_or_else(|| Error::internal("blob writer used after commit"))?;
        let (buf, digest, size) = out.finish();
        let file = buf.into_inner().map_err(|e| Error::from(e.into_error()))?;
        if let Some(exp) = expected {
            if exp.size.is_some_and(|s| s != size) {
                let _ = self.store.ingest.remove_file(&self.name);
                return Err(Error::failed_precondition(format!(
                    "blob {}: expected {} bytes, got {size}",
                    exp.digest,
                    exp.size.unwrap_or_default()
                )));
            }
            if exp.digest != digest {
                let _ = self.store.ingest.remove_file(&self.name);
                return Err(Error::failed_precondition(format!(
                    "blob: expected digest {}, got {digest}",
                    exp.digest
                )));
            }
        }
        let synced = file.sync_all().context("sync blob");
        // Blobs are never written again once in place.
        let _ = file.set_permissions(cap_std::fs::Permissions::from_std(
            std::os::unix::fs::PermissionsExt::from_mode(0o444),
        ));
        drop(file);
        let name = std::mem::take(&mut self.name);
        let done = synced.and_then(|()| self.store.publish(ctx, &name, digest, size, labels));
        if done.is_err() {
            let _ = self.store.ingest.remove_file(&name);
        }
        done
    }
}

impl Write for Writer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.out {
            Some(out) => out.write(buf),
            None => Err(io::Error::other("blob writer used after commit")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        if !self.name.is_empty() {
            self.out = None;
            let _ = self.store.ingest.remove_file(&self.name);
        }
    }
}
