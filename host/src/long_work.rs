//! Work that may take long, announced to whoever runs the call.
//!
//! The daemon runs a call whose work is bounded (records only, an overlay snapshot made
//! without copying) on the async worker that received it, which serves nothing else
//! meanwhile. Some such calls meet long work they could not foresee: overlay's first
//! mount of a chain deeper than one mount stacks copies the bottom of the chain into a
//! flattened tree. That work runs through [`long`], and a runner that must hand its
//! share of the runtime over before long work ([`handing_over`]: the daemon, with
//! tokio's `block_in_place`) does so then, and only then. With no runner's hand-over in
//! effect (the CLI, the library, the blocking pool), the work just runs.

use std::cell::Cell;

/// What runs long work for the runner: calls the work it is given, once.
pub type HandOver = fn(&mut dyn FnMut());

thread_local! {
    static HAND_OVER: Cell<Option<HandOver>> = const { Cell::new(None) };
}

/// Runs `f` with `hand_over` in effect on this thread: long work `f` meets runs
/// through it. What was in effect before is again once `f` returns (or unwinds).
pub fn handing_over<R>(hand_over: HandOver, f: impl FnOnce() -> R) -> R {
    in_effect(Some(hand_over), f)
}

/// Runs `f`, work that may take long: through the hand-over in effect on this thread,
/// if there is one, which is then no longer in effect inside `f` (it has handed over).
pub fn long<R>(f: impl FnOnce() -> R) -> R {
    let Some(hand_over) = HAND_OVER.get() else {
        return f();
    };
    let mut f = Some(f);
    let mut out = None;
    in_effect(None, || {
        hand_over(&mut || {
            if let Some(f) = f.take() {
                out = Some(f());
            }
        })
    });
    match out {
        Some(out) => out,
        // A hand-over that did not run the work: run it here rather than lose it.
        None => f.take().map(|f| f()).expect("the work ran or is still here"),
    }
}

/// Runs `f` with `hand_over` (or none) in effect, putting back what was.
fn in_effect<R>(hand_over: Option<HandOver>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<HandOver>);
    impl Drop for Restore {
        fn drop(&mut self) {
            HAND_OVER.set(self.0);
        }
    }
    let _restore = Restore(HAND_OVER.replace(hand_over));
    f()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    static HANDED: AtomicUsize = AtomicUsize::new(0);

    fn counting(f: &mut dyn FnMut()) {
        HANDED.fetch_add(1, Ordering::SeqCst);
        f()
    }

    fn refusing(_: &mut dyn FnMut()) {}

    #[test]
    fn long_work_runs_through_the_hand_over_in_effect_once() {
        assert_eq!(long(|| 1), 1, "none in effect: it just runs");
        let before = HANDED.load(Ordering::SeqCst);
        let got = handing_over(counting, || {
            let outer = long(|| long(|| 2) + 1);
            outer + long(|| 10)
        });
        assert_eq!(got, 13);
        // Two long pieces at the top, the nested one inside a hand-over already.
        assert_eq!(HANDED.load(Ordering::SeqCst) - before, 2);
        assert!(HAND_OVER.get().is_none(), "put back");
        assert_eq!(handing_over(refusing, || long(|| 5)), 5, "work is never lost");
        let caught = std::panic::catch_unwind(|| handing_over(counting, || panic!("boom")));
        assert!(caught.is_err());
        assert!(HAND_OVER.get().is_none(), "put back after a panic");
    }
}
