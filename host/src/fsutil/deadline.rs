//! A deadline for bulk tree work done on someone's behalf: a plugin's call may copy,
//! measure or remove a tree of any size, and must still end when its time is up.
//!
//! The deadline is set for the current thread around a call ([`within`]); the walks
//! check it between entries ([`check`]). Work not done for a plugin sets none and is
//! never cut short.

use std::cell::Cell;
use std::time::Instant;

use crate::error::{Error, Result};

thread_local! {
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `f` with `deadline` in force on this thread (or none), then restores the one
/// before.
pub fn within<T>(deadline: Option<Instant>, f: impl FnOnce() -> T) -> T {
    let before = DEADLINE.with(|d| d.replace(deadline));
    struct Restore(Option<Instant>);
    impl Drop for Restore {
        fn drop(&mut self) {
            DEADLINE.with(|d| d.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// Whether the deadline in force (if any) has passed.
pub fn passed() -> bool {
    DEADLINE.with(Cell::get).is_some_and(|d| Instant::now() >= d)
}

/// Unavailable once the deadline in force has passed.
pub fn check(what: impl std::fmt::Display) -> Result<()> {
    match DEADLINE.with(Cell::get) {
        Some(d) if Instant::now() >= d => {
            Err(Error::unavailable(format!("{what}: stopped, the call ran past its deadline")))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_passed_deadline_stops_the_work_and_is_undone_after() {
        check("x").unwrap();
        assert!(!passed(), "no deadline in force");
        let past = Instant::now().checked_sub(Duration::from_millis(1));
        assert!(within(past, passed));
        let e = within(past, || check("copy").unwrap_err());
        assert_eq!(e.kind(), crate::ErrorKind::Unavailable);
        within(Some(Instant::now() + Duration::from_secs(60)), || check("x").unwrap());
        check("x").unwrap();
    }
}
