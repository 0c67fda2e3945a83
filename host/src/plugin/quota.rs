//! A guest's private directory, bounded: what its WASI calls write to `state/` is
//! charged against the plugin's `state_mib`.
//!
//! A guest's only WASI preopen is `state/`, on the root's filesystem. Unbounded, one
//! plugin could fill that filesystem, and the root's database with it, which stops every
//! snapshotter. So the host's `wasi:filesystem/types` is wrapped ([`Fs`]): each write
//! (`descriptor.write`, and every stream `write-via-stream` or `append-via-stream`
//! returns) is charged its length, and each entry made (a file, a directory, a symlink,
//! a hard link) [`ENTRY_BYTES`], before it is done. Past the budget the call fails with
//! `insufficient-space`, as a full disk would answer.
//!
//! Charges only add up (an overwrite or an unlink frees nothing in the count), so the
//! count is an upper bound. When a charge would pass the budget the directory is
//! measured instead ([`fsutil::disk_usage`]: allocated blocks, plus [`ENTRY_BYTES`] an
//! inode, so empty files and directories count too), within the call's deadline, and
//! the charge is judged against that. A guest that rewrites one small file for ever
//! pays a walk of its directory once a budget's worth of writes, never more.
//!
//! Instances of a plugin share one directory and one count, kept under a mutex. A
//! charge is made before its write lands, so a measurement taken between the two does
//! not see it: the budget can be passed by at most the writes in flight, one a running
//! instance.

use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use cap_std::fs::Dir;
use wasmtime::component::{HasData, Resource};
use wasmtime_wasi::async_trait;
use wasmtime_wasi::filesystem::WasiFilesystemCtxView;
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

/// The budget of one plugin's `state/`, shared by its instances.
pub(crate) struct StateQuota {
    dir: Dir,
    count: Mutex<Count>,
}

struct Count {
    /// The budget, in bytes.
    max: u64,
    /// An upper bound on what `state/` holds; none until first needed.
    charged: Option<u64>,
}

impl std::fmt::Debug for StateQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("StateQuota")
            .field("max", &count.max)
            .field("charged", &count.charged)
            .finish()
    }
}

/// The budget is spent: `charge` more bytes would make `state/` hold more than `max`.
#[derive(Debug)]
pub(crate) struct Full;

impl StateQuota {
    /// A budget of `max` bytes for the directory `dir`.
    pub(crate) fn new(dir: Dir, max: u64) -> StateQuota {
        StateQuota { dir, count: Mutex::new(Count { max, charged: None }) }
    }

    /// Sets the budget (a reload's new `state_mib`); what is held already stays.
    pub(crate) fn set_max(&self, max: u64) {
        self.lock().max = max;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Count> {
        self.count.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What `state/` holds now, by the measure the budget uses.
    pub(crate) fn measure(&self) -> Result<u64> {
        let usage = fsutil::disk_usage(&self.dir)?;
        Ok(usage.size.saturating_add(usage.inodes.saturating_mul(ENTRY_BYTES)))
    }

    /// Charges `bytes` about to be written, measuring the directory (stopping at
    /// `deadline`) if the count says they would not fit. A measurement that fails or is
    /// cut short refuses the charge: room that cannot be shown is not given.
    pub(crate) fn charge(&self, bytes: u64, deadline: Instant) -> std::result::Result<(), Full> {
        let mut count = self.lock();
        if let Some(charged) = count.charged
            && charged.saturating_add(bytes) <= count.max
        {
            count.charged = Some(charged + bytes);
            return Ok(());
        }
        let measured = match deadline::within(Some(deadline), || self.measure()) {
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
        self.quota.charge(bytes, self.deadline).map_err(|Full| {
            FsError::from(
                wasmtime_wasi::p2::bindings::filesystem::types::ErrorCode::InsufficientSpace,
            )
        })
    }

    /// Puts `stream` back in the table wrapped so that each write through it is charged.
    fn counted(
        &mut self,
        stream: Resource<streams::OutputStream>,
    ) -> FsResult<Resource<streams::OutputStream>> {
        let inner = self.inner.table.delete(stream)?;
        let counted: Box<dyn OutputStream> =
            Box::new(Counted { inner, quota: self.quota.clone(), deadline: self.deadline });
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
        if self.quota.charge(bytes.len() as u64, self.deadline).is_err() {
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
        self.counted(stream)
    }
    fn append_via_stream(
        &mut self,
        fd: Resource<Descriptor>,
    ) -> FsResult<Resource<streams::OutputStream>> {
        let stream = self.inner.append_via_stream(fd)?;
        self.counted(stream)
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
        self.charge(buf.len() as u64)?;
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
        // A name in a directory, which can grow the directory.
        self.charge(ENTRY_BYTES)?;
        self.inner.link_at(fd, old_path_flags, old_path, new_descriptor, new_path)
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
        self.inner.open_at(fd, path_flags, path, oflags, flags)
    }
    fn drop(&mut self, fd: Resource<Descriptor>) -> wasmtime::Result<()> {
        types::HostDescriptor::drop(&mut self.inner, fd)
    }
    fn readlink_at(&mut self, fd: Resource<Descriptor>, path: String) -> FsResult<String> {
        self.inner.readlink_at(fd, path)
    }
    fn remove_directory_at(&mut self, fd: Resource<Descriptor>, path: String) -> FsResult<()> {
        self.inner.remove_directory_at(fd, path)
    }
    fn rename_at(
        &mut self,
        fd: Resource<Descriptor>,
        old_path: String,
        new_fd: Resource<Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
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
        self.inner.symlink_at(fd, src_path, dest_path)
    }
    fn unlink_file_at(&mut self, fd: Resource<Descriptor>, path: String) -> FsResult<()> {
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

    #[test]
    fn a_charge_past_the_count_is_judged_by_what_the_directory_holds() {
        let tmp = tempfile::tempdir_in("/dev/shm").expect("tempdir");
        let dir = Dir::open_ambient_dir(tmp.path(), cap_std::ambient_authority()).unwrap();
        let quota = StateQuota::new(dir, 64 << 10);
        // The empty directory is one inode.
        assert_eq!(quota.measure().unwrap(), ENTRY_BYTES);
        quota.charge(32 << 10, later()).unwrap();
        // Charged, never written: past the count, the measurement forgives it.
        quota.charge(32 << 10, later()).unwrap();
        // Written (here by the host, as a guest's write would be): now it counts.
        std::fs::write(tmp.path().join("f"), vec![1u8; 60 << 10]).unwrap();
        let held = quota.measure().unwrap();
        assert!(held >= (60 << 10) + 2 * ENTRY_BYTES, "{held}");
        // The count would let 8 KiB more in; the measurement does not let 32 KiB in.
        assert!(quota.charge(32 << 10, later()).is_err());
        // A reload's bigger budget takes effect at once; a smaller one too.
        quota.set_max(1 << 20);
        quota.charge(8 << 10, later()).unwrap();
        quota.set_max(held);
        assert!(quota.charge(1, later()).is_err());
        // Room that cannot be shown within the deadline is not given.
        quota.set_max(1 << 20);
        std::fs::remove_file(tmp.path().join("f")).unwrap();
        let past = Instant::now() - Duration::from_millis(1);
        assert!(quota.charge(1 << 30, past).is_err());
        assert!(quota.charge(2 << 20, later()).is_err());
        quota.charge(64 << 10, later()).unwrap();
    }
}
