//! The btrfs ioctls the driver needs, and nothing more: create a subvolume, snapshot one,
//! delete one, flip its read-only flag and ask its id.
//!
//! Each is one `ioctl(2)` on a directory descriptor, issued through rustix. The argument
//! structs are the kernel's (`include/uapi/linux/btrfs.h`), written out here with their
//! sizes checked at compile time, so building wasnap needs no kernel headers, no bindgen
//! and no libclang.
//!
//! This is the one module in the driver that may use `unsafe`: an ioctl's argument is a
//! raw pointer the kernel reads or writes, and only its opcode and struct layout (fixed
//! by the kernel's ABI and asserted below) make that sound.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::fd::AsFd;

use rustix::io::{Errno, Result};
use rustix::ioctl::{Getter, Opcode, Setter, Updater, ioctl, opcode};

/// The btrfs ioctl group (`BTRFS_IOCTL_MAGIC`).
const MAGIC: u8 = 0x94;
/// Longest subvolume name in `btrfs_ioctl_vol_args` (`BTRFS_PATH_NAME_MAX`).
const PATH_NAME_MAX: usize = 4087;
/// Longest subvolume name in `btrfs_ioctl_vol_args_v2` (`BTRFS_SUBVOL_NAME_MAX`).
const SUBVOL_NAME_MAX: usize = 4039;
/// Inode number of every subvolume's root directory (`BTRFS_FIRST_FREE_OBJECTID`).
pub const SUBVOL_ROOT_INO: u64 = 256;
/// `BTRFS_SUBVOL_RDONLY`: the subvolume (or the snapshot being made) is read-only.
const SUBVOL_RDONLY: u64 = 1 << 1;

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; PATH_NAME_MAX + 1],
}

/// `struct btrfs_ioctl_vol_args_v2` with the unions flattened to the members used here
/// (`size`/`qgroup_inherit` are left zero; `name` is the first member of its union).
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; SUBVOL_NAME_MAX + 1],
}

/// `struct btrfs_ioctl_ino_lookup_args`.
#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

// The kernel's sizes: a wrong layout must not compile.
const _: () = assert!(size_of::<VolArgs>() == 4096);
const _: () = assert!(size_of::<VolArgsV2>() == 4096);
const _: () = assert!(size_of::<InoLookupArgs>() == 4096);

const SNAP_CREATE_V2: Opcode = opcode::write::<VolArgsV2>(MAGIC, 23);
const SUBVOL_CREATE: Opcode = opcode::write::<VolArgs>(MAGIC, 14);
const SNAP_DESTROY: Opcode = opcode::write::<VolArgs>(MAGIC, 15);
const INO_LOOKUP: Opcode = opcode::read_write::<InoLookupArgs>(MAGIC, 18);
const SUBVOL_GETFLAGS: Opcode = opcode::read::<u64>(MAGIC, 25);
const SUBVOL_SETFLAGS: Opcode = opcode::write::<u64>(MAGIC, 26);

/// Copies `name` into a NUL-terminated buffer of `N` bytes, refusing names the kernel
/// would refuse (empty, too long, with a `/`) before any call.
fn name_buf<const N: usize>(name: &CStr) -> Result<[u8; N]> {
    let bytes = name.to_bytes();
    if bytes.is_empty() || bytes.len() >= N || bytes.contains(&b'/') {
        return Err(Errno::INVAL);
    }
    let mut buf = [0u8; N];
    buf[..bytes.len()].copy_from_slice(bytes);
    Ok(buf)
}

/// Creates the empty subvolume `name` in the directory `dir`.
pub fn subvolume_create(dir: impl AsFd, name: &CStr) -> Result<()> {
    let args = VolArgs { fd: 0, name: name_buf(name)? };
    // SAFETY: SUBVOL_CREATE takes a `btrfs_ioctl_vol_args`, which `VolArgs` is (its size
    // is asserted above); the kernel only reads it.
    unsafe { ioctl(dir, Setter::<SUBVOL_CREATE, VolArgs>::new(args)) }
}

/// Snapshotter the subvolume open as `source` into the directory `dir` as `name`,
/// read-only if asked.
pub fn snapshot_create(
    dir: impl AsFd,
    source: impl AsFd,
    name: &CStr,
    readonly: bool,
) -> Result<()> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&source.as_fd());
    let args = VolArgsV2 {
        fd: i64::from(fd),
        transid: 0,
        flags: if readonly { SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: name_buf(name)?,
    };
    // SAFETY: SNAP_CREATE_V2 takes a `btrfs_ioctl_vol_args_v2`, laid out by `VolArgsV2`
    // (size asserted above; the qgroup pointer is zero, so the kernel follows none); the
    // kernel only reads it, and `source` stays open for the call.
    unsafe { ioctl(dir, Setter::<SNAP_CREATE_V2, VolArgsV2>::new(args)) }
}

/// Deletes the subvolume `name` in the directory `dir`; ENOENT if there is none.
pub fn subvolume_delete(dir: impl AsFd, name: &CStr) -> Result<()> {
    let args = VolArgs { fd: 0, name: name_buf(name)? };
    // SAFETY: SNAP_DESTROY takes a `btrfs_ioctl_vol_args`; the kernel only reads it.
    unsafe { ioctl(dir, Setter::<SNAP_DESTROY, VolArgs>::new(args)) }
}

/// The id of the subvolume holding the directory `dir` (what `subvolid=` names).
pub fn subvolume_id(dir: impl AsFd) -> Result<u64> {
    let mut args = InoLookupArgs { treeid: 0, objectid: SUBVOL_ROOT_INO, name: [0; 4080] };
    // SAFETY: INO_LOOKUP takes a `btrfs_ioctl_ino_lookup_args` that it reads and writes;
    // `args` is one (size asserted above) and lives across the call.
    unsafe { ioctl(dir, Updater::<INO_LOOKUP, InoLookupArgs>::new(&mut args))? };
    Ok(args.treeid)
}

/// Whether the subvolume open as `subvol` is read-only.
pub fn is_readonly(subvol: impl AsFd) -> Result<bool> {
    // SAFETY: SUBVOL_GETFLAGS writes one `u64` of flags, which `Getter` provides.
    let flags = unsafe { ioctl(subvol, Getter::<SUBVOL_GETFLAGS, u64>::new())? };
    Ok(flags & SUBVOL_RDONLY != 0)
}

/// Makes the subvolume open as `subvol` read-only, or writable again.
pub fn set_readonly(subvol: impl AsFd, readonly: bool) -> Result<()> {
    let fd = subvol.as_fd();
    // SAFETY: as in `is_readonly`.
    let flags = unsafe { ioctl(fd, Getter::<SUBVOL_GETFLAGS, u64>::new())? };
    let flags = if readonly { flags | SUBVOL_RDONLY } else { flags & !SUBVOL_RDONLY };
    // SAFETY: SUBVOL_SETFLAGS reads one `u64` of flags, which `Setter` passes by pointer.
    unsafe { ioctl(fd, Setter::<SUBVOL_SETFLAGS, u64>::new(flags)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_kernel_would_refuse_are_refused_before_the_call() {
        assert_eq!(name_buf::<8>(c"").unwrap_err(), Errno::INVAL);
        assert_eq!(name_buf::<8>(c"a/b").unwrap_err(), Errno::INVAL);
        assert_eq!(name_buf::<8>(c"12345678").unwrap_err(), Errno::INVAL);
        let buf = name_buf::<8>(c"1234567").unwrap();
        assert_eq!(&buf, b"1234567\0");
    }

    #[test]
    fn opcodes_match_the_kernel_headers() {
        // Values of the _IOW/_IOR/_IOWR macros on x86_64, from linux/btrfs.h.
        assert_eq!(SUBVOL_CREATE, 0x5000_940e);
        assert_eq!(SNAP_DESTROY, 0x5000_940f);
        assert_eq!(SNAP_CREATE_V2, 0x5000_9417);
        assert_eq!(INO_LOOKUP, 0xd000_9412);
        assert_eq!(SUBVOL_GETFLAGS, 0x8008_9419);
        assert_eq!(SUBVOL_SETFLAGS, 0x4008_941a);
    }
}
