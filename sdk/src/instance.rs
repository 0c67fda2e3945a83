//! The one plugin value of this instance, made by `init` and used by every later call.
//!
//! A component instance runs one call at a time on one thread, and holds one plugin (the
//! type its export macro names), so a thread-local cell suffices and the plugin type need
//! not be `Sync`. It is type-erased here because a generic function cannot own a static.

use std::any::Any;
use std::cell::OnceCell;

use crate::error::{Error, Result};

thread_local! {
    static INSTANCE: OnceCell<Box<dyn Any>> = const { OnceCell::new() };
}

/// Makes and keeps the plugin value; a second `init` on one instance is refused, since
/// the host promises exactly one and a second would mean two hosts' views disagree.
pub(crate) fn init<T: 'static>(make: impl FnOnce() -> Result<T>) -> Result<()> {
    INSTANCE.with(|cell| {
        if cell.get().is_some() {
            return Err(Error::FailedPrecondition(
                "lifecycle.init called twice on one plugin instance".into(),
            ));
        }
        let plugin = make()?;
        // Cannot fail: the cell was empty above, and nothing in `make` can reach it.
        let _ = cell.set(Box::new(plugin));
        Ok(())
    })
}

/// Runs `f` on the plugin value; `op` names the call for the error when `init` has not
/// (successfully) run yet.
pub(crate) fn with<T: 'static, R>(op: &str, f: impl FnOnce(&T) -> Result<R>) -> Result<R> {
    INSTANCE.with(|cell| match cell.get().and_then(|b| b.downcast_ref::<T>()) {
        Some(plugin) => f(plugin),
        None => Err(Error::FailedPrecondition(format!(
            "{op} called before lifecycle.init succeeded on this plugin instance"
        ))),
    })
}
