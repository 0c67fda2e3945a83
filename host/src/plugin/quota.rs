//! A guest's private directory, bounded: what its WASI calls write to `state/` is
//! charged against the plugin's `state_mib`.
//!
//! A guest's only WASI preopen is `state/`, on the root's filesystem. Unbounded, one
//! plugin could fill that filesystem for every snapshotter and container on it. So the
//! host's `wasi:filesystem/types` is wrapped ([`Fs`]): each write is charged the
//! filesystem blocks it touches before it is done (`descriptor.write` by its offset, a
//! stream from `write-via-stream` by its own position, each of its blocks once; a write
//! through `append-via-stream`, whose end of file the guest can move, as if it started
//! at the last byte of a block), and each entry made (a file, a directory, a symlink)
//! [`ENTRY_BYTES`]. Hard links are refused: a name for an inode already counted takes
//! no blocks to count, and would let a guest make names without end. Past the budget
//! the call fails with `insufficient-space`, as a full disk would answer.
//!
//! Charges only add up (an overwrite or an unlink frees nothing in the count), so the
//! count is an upper bound. When a charge would pass the budget the directory is
//! measured instead, within the call's deadline, and the charge is judged against
//! that: allocated blocks plus [`ENTRY_BYTES`] an inode of the tree
//! ([`fsutil::disk_usage`]), and the blocks of every file or directory a guest holds
//! open that has no name any more (unlinked, removed, or renamed over), which no walk
//! can see. No call changes names in `state/` while a walk runs, so another instance
//! cannot move a tree out of its way. Renames are charged as new entries (a name
//! added can grow a directory for good).
//!
//! What the measurement cannot see: on a filesystem that shares extents (btrfs), a
//! file shrunk or partly overwritten can keep more of an old extent allocated than
//! its blocks (`st_blocks`) say.
//!
//! A walk costs the host time, so measurements are spaced: after one that took `t`,
//! the next waits [`WALK_SPACING`] times `t`, and a charge that does not fit the count
//! meanwhile is refused. Whatever a guest does, at most about a tenth of the host's
//! time goes to measuring its directory.
//!
//! Instances of a plugin share one directory and one count, kept under a mutex. A
//! charge is made before its write lands, so a measurement taken between the two does
//! not see it: the budget can be passed by what is in flight then (a write a running
//! instance is making, and what its open streams have not written out yet), never by
//! more, since the next measurement sees it.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, Weak};
use std::time::Instant;

use cap_std::fs::Dir;
use wasmtime::component::{HasData, Resource};
use wasmtime_wasi::async_trait;
use wasmtime_wasi::filesystem::{Descriptor as HostDescriptor, WasiFilesystemCtxView};
use wasmtime_wasi::p2::bindings::filesystem::types::ErrorCode as FsErrorCode;
use wasmtime_wasi::p2::bindings::sync::filesystem::types::{
    self, Advice, Descriptor, DescriptorFlags, DescriptorStat, DescriptorType, DirectoryEntry,
    DirectoryEntryStream, ErrorCode, Filesize, MetadataHashValue, NewTimestamp, OpenFlags,
    PathFlags,
};
use wasmtime_wasi::p2::bindings::sync::io::streams;
use wasmtime_wasi::p2::{FsError, FsResult, OutputStream, Pollable, StreamError, StreamResult};

use crate::error::Result;
use crate::fsutil::{self, deadline};

/// What each entry made in `state/` is charged, and what each inode counts when the
/// directory is measured: one block of the usual size.
pub(crate) const ENTRY_BYTES: u64 = 4096;

/// After a measurement that took `t`, the next waits this many times `t`.
const WALK_SPACING: u32 = 10;

/// The budget of one plugin's `state/`, shared by its instances.
pub(crate) struct StateQuota {
    dir: Dir,
    /// The filesystem's allocation unit: a write is charged the units it touches.
    block: u64,
    count: Mutex<Count>,
    /// The files and directories the guest's instances opened, while any of them
    /// holds one.
    open: Mutex<Vec<Weak<File>>>,
    /// Held shared by every call that changes names in `state/`, and exclusively by a
    /// measurement: an instance renaming a tree back and forth while another's
    /// measurement walks cannot hide it from the walk.
    names: RwLock<()>,
}

struct Count {
    /// The budget, in bytes.
    max: u64,
    /// An upper bound on what `state/` holds; none until first needed.
    charged: Option<u64>,
    /// No measurement before then.
    next_walk: Option<Instant>,
}

impl std::fmt::Debug for StateQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateQuota").field("block", &self.block).finish_non_exhaustive()
    }
}

/// The budget is spent: `charge` more bytes would make `state/` hold more than `max`.
#[derive(Debug)]
pub(crate) struct Full;

impl StateQuota {
    /// A budget of `max` bytes for the directory `dir`.
    pub(crate) fn new(dir: Dir, max: u64) -> StateQuota {
        // Pinned: statfs of the directory's own descriptor.
        let block = rustix::fs::fstatvfs(&dir).map_or(ENTRY_BYTES, |st| st.f_frsize);
        let block = block.clamp(512, 1 << 20);
        let count = Count { max, charged: None, next_walk: None };
        StateQuota {
            dir,
            block,
            count: Mutex::new(count),
            open: Mutex::new(Vec::new()),
            names: RwLock::new(()),
        }
    }

    /// Sets the budget (a reload's new `state_mib`); what is held already stays.
    pub(crate) fn set_max(&self, max: u64) {
        let mut count = self.lock();
        count.max = max;
        count.next_walk = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Count> {
        self.count.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Held while a call changes names in `state/` (never while charging).
    pub(crate) fn naming(&self) -> RwLockReadGuard<'_, ()> {
        self.names.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn open_files(&self) -> std::sync::MutexGuard<'_, Vec<Weak<File>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers a file or directory a guest opened, for as long as it holds it:
    /// once it has no name, only this shows what it holds.
    pub(crate) fn opened(&self, file: &Arc<File>) {
        let mut open = self.open_files();
        // Forgets the closed ones now and then, so the list stays about as long as
        // what is open.
        if open.len() >= 64 && open.len().is_power_of_two() {
            open.retain(|f| f.strong_count() > 0);
        }
        open.push(Arc::downgrade(file));
    }

    /// What a write of `len` bytes at `offset` is charged: the blocks it touches.
    pub(crate) fn blocks(&self, offset: u64, len: u64) -> u64 {
        if len == 0 {
            return 0;
        }
        let (first, end) = (offset / self.block, offset.saturating_add(len).div_ceil(self.block));
        (end - first).saturating_mul(self.block)
    }

    /// What `state/` holds now, by the measure the budget uses.
    pub(crate) fn measure(&self) -> Result<u64> {
        let usage = {
            let _names = self.names.write().unwrap_or_else(PoisonError::into_inner);
            fsutil::disk_usage(&self.dir)?
        };
        let named = usage.size.saturating_add(usage.inodes.saturating_mul(ENTRY_BYTES));
        let open: Vec<Arc<File>> = {
            let mut open = self.open_files();
            open.retain(|f| f.strong_count() > 0);
            open.iter().filter_map(Weak::upgrade).collect()
        };
        let mut seen = std::collections::HashSet::new();
        let nameless = open
            .iter()
            .filter_map(|f| f.metadata().ok())
            .filter(|m| m.nlink() == 0 && seen.insert((m.dev(), m.ino())))
            .map(|m| m.blocks().saturating_mul(512).saturating_add(ENTRY_BYTES))
            .fold(0u64, u64::saturating_add);
        Ok(named.saturating_add(nameless))
    }

    /// Charges `bytes` about to be written, measuring the directory (stopping at
    /// `deadline`) if the count says they would not fit and the last measurement is
    /// far enough behind. A measurement that fails or is cut short refuses the charge:
    /// room that cannot be shown is not given.
    pub(crate) fn charge(&self, bytes: u64, deadline: Instant) -> std::result::Result<(), Full> {
        let mut count = self.lock();
        if let Some(charged) = count.charged
            && charged.saturating_add(bytes) <= count.max
        {
            count.charged = Some(charged + bytes);
            return Ok(());
        }
        let started = Instant::now();
        if count.next_walk.is_some_and(|next| started < next) {
            return Err(Full);
        }
        let measured = deadline::within(Some(deadline), || self.measure());
        count.next_walk = Some(Instant::now() + started.elapsed() * WALK_SPACING);
        let measured = match measured {
            Ok(measured) => measured,
            Err(e) => {
                tracing::debug!("measuring a plugin's state directory: {e}");
                return Err(Full);
            }
        };
        count.charged = Some(measured);
        if measured.saturating_add(bytes) > count.max {
            return Err(Full);
        }
        count.charged = Some(measured + bytes);
        Ok(())
    }
}

/// WASI's filesystem with every write to `state/` charged first.
pub(crate) struct Fs<'a> {
    pub(crate) inner: WasiFilesystemCtxView<'a>,
    pub(crate) quota: &'a std::sync::Arc<StateQuota>,
    /// When the call in progress must end: a measurement stops there.
    pub(crate) deadline: Instant,
}

/// The [`HasData`] of [`Fs`], for the linker.
pub(crate) struct Quota;

impl HasData for Quota {
    type Data<'a> = Fs<'a>;
}

impl Fs<'_> {
    fn charge(&self, bytes: u64) -> FsResult<()> {
        let full = |Full| FsError::from(FsErrorCode::InsufficientSpace);
        self.quota.charge(bytes, self.deadline).map_err(full)
    }

    /// Puts `stream`, which writes from `offset` on (none: it appends), back in the
    /// table wrapped so that each write through it is charged.
    fn counted(
        &mut self,
        stream: Resource<streams::OutputStream>,
        offset: Option<u64>,
    ) -> FsResult<Resource<streams::OutputStream>> {
        let inner = self.inner.table.delete(stream)?;
        let counted: Box<dyn OutputStream> = Box::new(Counted {
            inner,
            quota: self.quota.clone(),
            deadline: self.deadline,
            position: offset,
            charged_to: 0,
        });
        Ok(self.inner.table.push(counted)?)
    }
}

/// An output stream to a file in `state/` whose writes are charged.
struct Counted {
    inner: Box<dyn OutputStream>,
    quota: std::sync::Arc<StateQuota>,
    /// The deadline of the call that opened the stream. A stream kept for a later call
    /// keeps it, so a write then that needs a measurement is refused: the guest opens
    /// the stream again.
    deadline: Instant,
    /// Where its next write lands in the file; none for an append stream, whose end
    /// of file the guest can move (`set-size`).
    position: Option<u64>,
    /// The blocks below this one have been charged (as block numbers).
    charged_to: u64,
}

impl Counted {
    /// Charges a write of `len` bytes for the blocks it touches: at the stream's
    /// position, those no earlier write through it touched; appended, as if from the
    /// last byte of a block (the most blocks it could touch).
    fn charge(&mut self, len: u64) -> std::result::Result<(), Full> {
        let block = self.quota.block;
        let Some(position) = self.position else {
            return self.quota.charge(self.quota.blocks(block - 1, len), self.deadline);
        };
        if len > 0 {
            let first = (position / block).max(self.charged_to);
            let end = position.saturating_add(len).div_ceil(block);
            if end > first {
                self.quota.charge((end - first).saturating_mul(block), self.deadline)?;
                self.charged_to = end;
            }
        }
        self.position = Some(position.saturating_add(len));
        Ok(())
    }
}

#[async_trait]
impl Pollable for Counted {
    async fn ready(&mut self) {
        self.inner.ready().await
    }
}

#[async_trait]
impl OutputStream for Counted {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        if self.charge(bytes.len() as u64).is_err() {
            let full = std::io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error());
            return Err(StreamError::LastOperationFailed(full.into()));
        }
        self.inner.write(bytes)
    }
    fn flush(&mut self) -> StreamResult<()> {
        self.inner.flush()
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        self.inner.check_write()
    }
    async fn cancel(&mut self) {
        self.inner.cancel().await
    }
}

impl types::Host for Fs<'_> {
    fn convert_error_code(&mut self, err: FsError) -> wasmtime::Result<ErrorCode> {
        types::Host::convert_error_code(&mut self.inner, err)
    }
    fn filesystem_error_code(
        &mut self,
        err: Resource<streams::Error>,
    ) -> wasmtime::Result<Option<ErrorCode>> {
        types::Host::filesystem_error_code(&mut self.inner, err)
    }
}

impl types::HostDescriptor for Fs<'_> {
    fn read_via_stream(
        &mut self,
        fd: Resource<Descriptor>,
        offset: Filesize,
    ) -> FsResult<Resource<streams::InputStream>> {
        self.inner.read_via_stream(fd, offset)
    }
    fn write_via_stream(
        &mut self,
        fd: Resource<Descriptor>,
        offset: Filesize,
    ) -> FsResult<Resource<streams::OutputStream>> {
        let stream = self.inner.write_via_stream(fd, offset)?;
        self.counted(stream, Some(offset))
    }
    fn append_via_stream(
        &mut self,
        fd: Resource<Descriptor>,
    ) -> FsResult<Resource<streams::OutputStream>> {
        let stream = self.inner.append_via_stream(fd)?;
        self.counted(stream, None)
    }
    fn advise(
        &mut self,
        fd: Resource<Descriptor>,
        offset: Filesize,
        len: Filesize,
        advice: Advice,
    ) -> FsResult<()> {
        self.inner.advise(fd, offset, len, advice)
    }
    fn sync_data(&mut self, fd: Resource<Descriptor>) -> FsResult<()> {
        self.inner.sync_data(fd)
    }
    fn get_flags(&mut self, fd: Resource<Descriptor>) -> FsResult<DescriptorFlags> {
        self.inner.get_flags(fd)
    }
    fn get_type(&mut self, fd: Resource<Descriptor>) -> FsResult<DescriptorType> {
        self.inner.get_type(fd)
    }
    fn set_size(&mut self, fd: Resource<Descriptor>, size: Filesize) -> FsResult<()> {
        // Growing a file this way allocates nothing (its new bytes are a hole); writes
        // into it are charged.
        self.inner.set_size(fd, size)
    }
    fn set_times(
        &mut self,
        fd: Resource<Descriptor>,
        atim: NewTimestamp,
        mtim: NewTimestamp,
    ) -> FsResult<()> {
        self.inner.set_times(fd, atim, mtim)
    }
    fn read(
        &mut self,
        fd: Resource<Descriptor>,
        len: Filesize,
        offset: Filesize,
    ) -> FsResult<(Vec<u8>, bool)> {
        self.inner.read(fd, len, offset)
    }
    fn write(
        &mut self,
        fd: Resource<Descriptor>,
        buf: Vec<u8>,
        offset: Filesize,
    ) -> FsResult<Filesize> {
        self.charge(self.quota.blocks(offset, buf.len() as u64))?;
        self.inner.write(fd, buf, offset)
    }
    fn read_directory(
        &mut self,
        fd: Resource<Descriptor>,
    ) -> FsResult<Resource<DirectoryEntryStream>> {
        self.inner.read_directory(fd)
    }
    fn sync(&mut self, fd: Resource<Descriptor>) -> FsResult<()> {
        self.inner.sync(fd)
    }
    fn create_directory_at(&mut self, fd: Resource<Descriptor>, path: String) -> FsResult<()> {
        self.charge(ENTRY_BYTES)?;
        let _naming = self.quota.naming();
        self.inner.create_directory_at(fd, path)
    }
    fn stat(&mut self, fd: Resource<Descriptor>) -> FsResult<DescriptorStat> {
        self.inner.stat(fd)
    }
    fn stat_at(
        &mut self,
        fd: Resource<Descriptor>,
        path_flags: PathFlags,
        path: String,
    ) -> FsResult<DescriptorStat> {
        self.inner.stat_at(fd, path_flags, path)
    }
    fn set_times_at(
        &mut self,
        fd: Resource<Descriptor>,
        path_flags: PathFlags,
        path: String,
        atim: NewTimestamp,
        mtim: NewTimestamp,
    ) -> FsResult<()> {
        self.inner.set_times_at(fd, path_flags, path, atim, mtim)
    }
    fn link_at(
        &mut self,
        fd: Resource<Descriptor>,
        old_path_flags: PathFlags,
        old_path: String,
        new_descriptor: Resource<Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        // Refused: see the module documentation.
        let _ = (fd, old_path_flags, old_path, new_descriptor, new_path);
        Err(FsErrorCode::NotPermitted.into())
    }
    fn open_at(
        &mut self,
        fd: Resource<Descriptor>,
        path_flags: PathFlags,
        path: String,
        oflags: OpenFlags,
        flags: DescriptorFlags,
    ) -> FsResult<Resource<Descriptor>> {
        // Charged whether or not the file exists already; a measurement sets it right.
        if oflags.contains(OpenFlags::CREATE) {
            self.charge(ENTRY_BYTES)?;
        }
        let opened = {
            let _naming = self.quota.naming();
            self.inner.open_at(fd, path_flags, path, oflags, flags)?
        };
        match self.inner.table.get(&opened)? {
            HostDescriptor::File(f) => self.quota.opened(&f.file),
            HostDescriptor::Dir(d) => self.quota.opened(&d.dir),
        }
        Ok(opened)
    }
    fn drop(&mut self, fd: Resource<Descriptor>) -> wasmtime::Result<()> {
        types::HostDescriptor::drop(&mut self.inner, fd)
    }
    fn readlink_at(&mut self, fd: Resource<Descriptor>, path: String) -> FsResult<String> {
        self.inner.readlink_at(fd, path)
    }
    fn remove_directory_at(&mut self, fd: Resource<Descriptor>, path: String) -> FsResult<()> {
        let _naming = self.quota.naming();
        self.inner.remove_directory_at(fd, path)
    }
    fn rename_at(
        &mut self,
        fd: Resource<Descriptor>,
        old_path: String,
        new_fd: Resource<Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        // A name added to a directory, which can grow it for good.
        self.charge(ENTRY_BYTES)?;
        let _naming = self.quota.naming();
        self.inner.rename_at(fd, old_path, new_fd, new_path)
    }
    fn symlink_at(
        &mut self,
        fd: Resource<Descriptor>,
        src_path: String,
        dest_path: String,
    ) -> FsResult<()> {
        // The target is stored too, in the inode or in a block of its own.
        self.charge(ENTRY_BYTES.saturating_add(src_path.len() as u64))?;
        let _naming = self.quota.naming();
        self.inner.symlink_at(fd, src_path, dest_path)
    }
    fn unlink_file_at(&mut self, fd: Resource<Descriptor>, path: String) -> FsResult<()> {
        let _naming = self.quota.naming();
        self.inner.unlink_file_at(fd, path)
    }
    fn is_same_object(
        &mut self,
        a: Resource<Descriptor>,
        b: Resource<Descriptor>,
    ) -> wasmtime::Result<bool> {
        self.inner.is_same_object(a, b)
    }
    fn metadata_hash(&mut self, fd: Resource<Descriptor>) -> FsResult<MetadataHashValue> {
        self.inner.metadata_hash(fd)
    }
    fn metadata_hash_at(
        &mut self,
        fd: Resource<Descriptor>,
        path_flags: PathFlags,
        path: String,
    ) -> FsResult<MetadataHashValue> {
        self.inner.metadata_hash_at(fd, path_flags, path)
    }
}

impl types::HostDirectoryEntryStream for Fs<'_> {
    fn read_directory_entry(
        &mut self,
        stream: Resource<DirectoryEntryStream>,
    ) -> FsResult<Option<DirectoryEntry>> {
        self.inner.read_directory_entry(stream)
    }
    fn drop(&mut self, stream: Resource<DirectoryEntryStream>) -> wasmtime::Result<()> {
        types::HostDirectoryEntryStream::drop(&mut self.inner, stream)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    fn quota(max: u64) -> (tempfile::TempDir, StateQuota) {
        let tmp = tempfile::tempdir_in("/dev/shm").expect("tempdir");
        let dir = Dir::open_ambient_dir(tmp.path(), cap_std::ambient_authority()).unwrap();
        (tmp, StateQuota::new(dir, max))
    }

    /// Lets the next charge that does not fit the count measure, however recent the
    /// last measurement (the spacing is tested on its own).
    fn walk_now(quota: &StateQuota) {
        quota.lock().next_walk = None;
    }

    #[test]
    fn a_charge_past_the_count_is_judged_by_what_the_directory_holds() {
        let (tmp, quota) = quota(64 << 10);
        // The empty directory is one inode.
        assert_eq!(quota.measure().unwrap(), ENTRY_BYTES);
        quota.charge(32 << 10, later()).unwrap();
        // Charged, never written: past the count, the measurement forgives it.
        walk_now(&quota);
        quota.charge(32 << 10, later()).unwrap();
        // Written (here by the host, as a guest's write would be): now it counts.
        std::fs::write(tmp.path().join("f"), vec![1u8; 60 << 10]).unwrap();
        let held = quota.measure().unwrap();
        assert!(held >= (60 << 10) + 2 * ENTRY_BYTES, "{held}");
        // The count would let 28 KiB more in; the measurement does not let 32 KiB in.
        walk_now(&quota);
        assert!(quota.charge(32 << 10, later()).is_err());
        std::fs::remove_file(tmp.path().join("f")).unwrap();
        walk_now(&quota);
        quota.charge(32 << 10, later()).unwrap();
        // A reload's budget takes effect at once, bigger or smaller.
        quota.set_max(1 << 20);
        quota.charge(512 << 10, later()).unwrap();
        quota.set_max(ENTRY_BYTES);
        assert!(quota.charge(1, later()).is_err());
    }

    #[test]
    fn measurements_are_spaced() {
        let (_tmp, quota) = quota(64 << 10);
        quota.charge(60 << 10, later()).unwrap();
        let next = quota.lock().next_walk.expect("the first charge measured");
        // Before the spacing has passed, a charge past the count is refused unmeasured,
        // though the directory has room.
        quota.lock().next_walk = Some(next + Duration::from_secs(3600));
        assert!(quota.charge(8 << 10, later()).is_err());
        // After it, the measurement shows the room.
        quota.lock().next_walk = Some(Instant::now() - Duration::from_millis(1));
        quota.charge(8 << 10, later()).unwrap();
    }

    #[test]
    fn room_that_cannot_be_shown_within_the_deadline_is_not_given() {
        let (_tmp, quota) = quota(64 << 10);
        quota.charge(60 << 10, later()).unwrap();
        // One byte past the count needs a measurement, which would find room.
        walk_now(&quota);
        let past = Instant::now() - Duration::from_millis(1);
        assert!(quota.charge(1, past).is_err());
        // A measurement cut short is no proof the budget is spent.
        walk_now(&quota);
        quota.charge(1, later()).unwrap();
    }

    #[test]
    fn a_file_held_open_without_a_name_still_counts() {
        let (tmp, quota) = quota(1 << 20);
        let path = tmp.path().join("f");
        let file = Arc::new(File::create(&path).unwrap());
        quota.opened(&file);
        std::io::Write::write_all(&mut &*file, &vec![1u8; 256 << 10]).unwrap();
        std::fs::remove_file(&path).unwrap();
        let held = quota.measure().unwrap();
        assert!(held >= (256 << 10) + 2 * ENTRY_BYTES, "{held}");
        drop(file);
        assert_eq!(quota.measure().unwrap(), ENTRY_BYTES);
    }

    #[test]
    fn a_write_is_charged_the_blocks_it_touches() {
        let (_tmp, quota) = quota(1 << 20);
        let b = quota.block;
        assert_eq!(quota.blocks(0, 0), 0);
        assert_eq!(quota.blocks(0, 1), b);
        assert_eq!(quota.blocks(b - 1, 2), 2 * b);
        assert_eq!(quota.blocks(10 * b, b), b);
        assert_eq!(quota.blocks(u64::MAX - 1, 10), b);
    }
}
