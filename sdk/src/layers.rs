//! Layers: the directories mounts name, which the host owns.
//!
//! A backend keeps each snapshot's files in a layer. The host makes, clones and removes
//! layers outside the plugin's own directory and names them by number; the plugin
//! records which snapshot uses which layer, and returns mounts that name layers
//! ([`Mount::bind`](crate::Mount::bind), [`Mount::overlay`](crate::Mount::overlay)). It
//! can reach a layer's contents through the methods below, each path resolved by the
//! host beneath the layer (no `..` past its root, no symlink followed), but it can never
//! name, rename or replace a layer itself.
//!
//! ```no_run
//! use wasnap_sdk::layers::Layer;
//! # fn main() -> wasnap_sdk::Result<()> {
//! let base = Layer::create()?;
//! base.make_dir("etc", 0o755)?;
//! base.write_file("etc/motd", b"hello\n", 0o644)?;
//! let copy = Layer::clone_of(base)?; // everything, owners and xattrs included
//! assert_eq!(copy.read_file("etc/motd")?, b"hello\n");
//! # Ok(()) }
//! ```
//!
//! A layer made during a call belongs to that call until it returns: another instance
//! listing layers meanwhile does not see it, so [`Store::reclaim_layers`] running
//! elsewhere never takes a layer whose record is about to be written.
//!
//! [`Store::reclaim_layers`]: crate::store::Store::reclaim_layers

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::types::Usage;

/// A layer, named by the number the host gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Layer(pub u64);

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "layer {}", self.0)
    }
}

impl Layer {
    /// A new empty layer: a directory of mode 0755 owned by the host's user.
    pub fn create() -> Result<Layer> {
        imp::create(None).map(Layer)
    }

    /// A new empty layer owned like the root of `like` (an overlay's upper layer takes
    /// the owner of the layer below it, or a chowned image root is lost).
    pub fn create_owned_like(like: Layer) -> Result<Layer> {
        imp::create(Some(like.0)).map(Layer)
    }

    /// A new layer holding a copy of `source`: types, modes, owners, times, xattrs,
    /// symlinks, hard links within the layer and device nodes.
    pub fn clone_of(source: Layer) -> Result<Layer> {
        imp::clone(source.0).map(Layer)
    }

    /// Removes the layer and everything in it.
    pub fn remove(self) -> Result<()> {
        imp::remove(self.0)
    }

    /// Disk space the layer uses.
    pub fn usage(self) -> Result<Usage> {
        imp::usage(self.0)
    }

    /// Every layer of this plugin, ascending, except those another call is making.
    pub fn list() -> Result<Vec<Layer>> {
        Ok(imp::list()?.into_iter().map(Layer).collect())
    }

    /// The names in the directory `path` (`.` for the layer's root), sorted.
    pub fn read_dir(self, path: &str) -> Result<Vec<String>> {
        imp::read_dir(self.0, path)
    }

    /// The contents of the regular file `path` (at most 1 MiB).
    pub fn read_file(self, path: &str) -> Result<Vec<u8>> {
        imp::read_file(self.0, path)
    }

    /// Writes the regular file `path` (replacing one that exists) with `contents` (at
    /// most 1 MiB) and the permission bits `mode`.
    pub fn write_file(self, path: &str, contents: &[u8], mode: u32) -> Result<()> {
        imp::write_file(self.0, path, contents, mode)
    }

    /// Makes the directory `path` with the permission bits `mode`.
    pub fn make_dir(self, path: &str, mode: u32) -> Result<()> {
        imp::make_dir(self.0, path, mode)
    }

    /// Makes `path` a symlink to `target`.
    pub fn symlink(self, path: &str, target: &str) -> Result<()> {
        imp::symlink(self.0, path, target)
    }

    /// Removes `path` (and everything below it); succeeds if it does not exist.
    pub fn remove_entry(self, path: &str) -> Result<()> {
        imp::remove_entry(self.0, path)
    }

    /// Sets the permission bits of `path` (`.` for the layer's root).
    pub fn set_mode(self, path: &str, mode: u32) -> Result<()> {
        imp::set_mode(self.0, path, mode)
    }

    /// Changes the owner of `path` itself (`.` for the layer's root).
    pub fn set_owner(self, path: &str, uid: u32, gid: u32) -> Result<()> {
        imp::set_owner(self.0, path, uid, gid)
    }

    /// Sets the extended attribute `name` of `path`.
    pub fn set_xattr(self, path: &str, name: &str, value: &[u8]) -> Result<()> {
        imp::set_xattr(self.0, path, name, value)
    }

    /// The extended attribute `name` of `path`, if set.
    pub fn get_xattr(self, path: &str, name: &str) -> Result<Option<Vec<u8>>> {
        imp::get_xattr(self.0, path, name)
    }

    /// Makes `path` an overlayfs whiteout (a character device 0:0).
    pub fn make_whiteout(self, path: &str) -> Result<()> {
        imp::make_whiteout(self.0, path)
    }
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use crate::error::Result;
    use crate::types::Usage;
    use crate::wit::wasnap::snapshotter::layers as w;

    pub fn create(owner_of: Option<u64>) -> Result<u64> {
        Ok(w::create(owner_of)?)
    }
    pub fn clone(source: u64) -> Result<u64> {
        Ok(w::clone(source)?)
    }
    pub fn remove(layer: u64) -> Result<()> {
        Ok(w::remove(layer)?)
    }
    pub fn usage(layer: u64) -> Result<Usage> {
        Ok(w::usage(layer)?.into())
    }
    pub fn list() -> Result<Vec<u64>> {
        Ok(w::list()?)
    }
    pub fn read_dir(layer: u64, path: &str) -> Result<Vec<String>> {
        Ok(w::read_dir(layer, path)?)
    }
    pub fn read_file(layer: u64, path: &str) -> Result<Vec<u8>> {
        Ok(w::read_file(layer, path)?)
    }
    pub fn write_file(layer: u64, path: &str, contents: &[u8], mode: u32) -> Result<()> {
        Ok(w::write_file(layer, path, contents, mode)?)
    }
    pub fn make_dir(layer: u64, path: &str, mode: u32) -> Result<()> {
        Ok(w::make_dir(layer, path, mode)?)
    }
    pub fn symlink(layer: u64, path: &str, target: &str) -> Result<()> {
        Ok(w::symlink(layer, path, target)?)
    }
    pub fn remove_entry(layer: u64, path: &str) -> Result<()> {
        Ok(w::remove_entry(layer, path)?)
    }
    pub fn set_mode(layer: u64, path: &str, mode: u32) -> Result<()> {
        Ok(w::set_mode(layer, path, mode)?)
    }
    pub fn set_owner(layer: u64, path: &str, uid: u32, gid: u32) -> Result<()> {
        Ok(w::set_owner(layer, path, uid, gid)?)
    }
    pub fn set_xattr(layer: u64, path: &str, name: &str, value: &[u8]) -> Result<()> {
        Ok(w::set_xattr(layer, path, name, value)?)
    }
    pub fn get_xattr(layer: u64, path: &str, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(w::get_xattr(layer, path, name)?)
    }
    pub fn make_whiteout(layer: u64, path: &str) -> Result<()> {
        Ok(w::make_whiteout(layer, path)?)
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use crate::testing::layers as imp;
