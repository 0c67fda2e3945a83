//! What cases share: making layers through real mounts, checking views, asserting.

use std::path::{Path, PathBuf};

use wasnap::{Backend, ErrorKind, Labels};

use crate::fixture::{Op, apply, check_equal};
use crate::harness::{Env, Fail};

/// Fails the case with a message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::harness::Fail::Failed(format!($($fmt)+)));
        }
    };
}

/// Fails the case unless the two values are equal, showing both.
macro_rules! ensure_eq {
    ($a:expr, $b:expr, $($fmt:tt)+) => {{
        let (a, b) = (&$a, &$b);
        if a != b {
            return Err($crate::harness::Fail::Failed(format!(
                "{}: got {:?}, expected {:?}", format!($($fmt)+), a, b
            )));
        }
    }};
}

/// Fails unless `r` is an error of class `kind`.
pub(crate) fn expect_err<T: std::fmt::Debug>(
    r: wasnap::Result<T>,
    kind: ErrorKind,
    what: &str,
) -> Result<(), Fail> {
    match r {
        Err(e) if e.kind() == kind => Ok(()),
        Err(e) => Err(Fail::Failed(format!("{what}: expected a {kind} error, got: {e}"))),
        Ok(v) => Err(Fail::Failed(format!("{what}: expected a {kind} error, got success: {v:?}"))),
    }
}

/// Fails unless `r` is an error of any class (some backends say not-found where
/// others say failed-precondition, and containerd's suite accepts either).
pub(crate) fn expect_any_err<T: std::fmt::Debug>(
    r: wasnap::Result<T>,
    what: &str,
) -> Result<(), Fail> {
    match r {
        Err(_) => Ok(()),
        Ok(v) => Err(Fail::Failed(format!("{what}: expected an error, got success: {v:?}"))),
    }
}

pub(crate) fn no_labels() -> Labels {
    Labels::new()
}

/// Prepares `key` on `parent`, mounts it, applies `ops` and unmounts.
pub(crate) fn write_active(
    env: &Env<'_>,
    b: &dyn Backend,
    key: &str,
    parent: Option<&str>,
    ops: &[Op],
) -> Result<(), Fail> {
    let mounts = b.prepare(key, parent, &no_labels())?;
    let m = env.mount(&mounts)?;
    apply(m.path(), ops)?;
    m.unmount()
}

/// Makes the committed layer `name` on `parent` holding `ops` (through `<name>-active`).
pub(crate) fn layer(
    env: &Env<'_>,
    b: &dyn Backend,
    name: &str,
    parent: Option<&str>,
    ops: &[Op],
) -> Result<(), Fail> {
    let key = format!("{name}-active");
    write_active(env, b, &key, parent, ops)?;
    b.commit(name, &key, &no_labels())?;
    Ok(())
}

/// The tree that applying `layers` in order to an empty directory makes.
pub(crate) fn expected(env: &Env<'_>, layers: &[&[Op]]) -> Result<PathBuf, Fail> {
    let dir = env.scratch("expected")?;
    for ops in layers {
        apply(&dir, ops)?;
    }
    Ok(dir)
}

/// Checks, through a mounted view, that `parent` holds exactly the tree at `want`; the
/// view is removed again.
pub(crate) fn check_view(
    env: &Env<'_>,
    b: &dyn Backend,
    parent: &str,
    want: &Path,
) -> Result<(), Fail> {
    let key = format!("check-view-of-{parent}");
    let mounts = b.view(&key, Some(parent), &no_labels())?;
    let m = env.mount(&mounts)?;
    let checked =
        check_equal(m.path(), want).map_err(|e| Fail::Failed(format!("view of {parent}: {e}")));
    m.unmount()?;
    b.remove(&key)?;
    checked
}

/// Checks, through a mount, that active snapshot `key` holds the tree at `want`.
pub(crate) fn check_active(
    env: &Env<'_>,
    b: &dyn Backend,
    key: &str,
    want: &Path,
) -> Result<(), Fail> {
    let m = env.mount(&b.mounts(key)?)?;
    let checked = check_equal(m.path(), want).map_err(|e| Fail::Failed(format!("{key}: {e}")));
    m.unmount()?;
    checked
}

/// Every snapshot the backend holds, sorted by name.
pub(crate) fn walk_all(b: &dyn Backend, filter: &str) -> Result<Vec<wasnap::Info>, Fail> {
    let f = wasnap::Filter::parse_all(&[filter])?;
    let mut v = Vec::new();
    b.walk(&f, &mut |i| {
        v.push(i);
        Ok(())
    })?;
    v.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(v)
}
