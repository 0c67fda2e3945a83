//! Threads that run backend calls their caller waits for under a deadline, kept
//! between calls.
//!
//! A backend call under a deadline runs on a thread of its own, so that a backend that
//! hangs costs that thread and never the caller. Making that thread for each call cost
//! a `clone3`, a stack `mmap` and `mprotect`, and about ten more system calls to start
//! and stop it, for a call that usually takes microseconds: containerd's collector
//! calls `Cleanup` after each collection, and each one walked the backend and reclaimed
//! on a thread made for it.
//!
//! So a thread that finishes a call waits [`KEEP`] for the next before it exits. A call
//! takes an idle thread if there is one and makes one otherwise; a thread stuck in a
//! hung backend is never idle, so calls after it get another. A call that panics costs
//! that call only: its caller is told, and the thread goes back to waiting.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

/// How long an idle thread waits for another call before it exits.
const KEEP: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

/// The idle threads, each by its number and the sender its next call goes to.
pub(crate) struct Helpers {
    name: &'static str,
    keep: Duration,
    idle: Mutex<Vec<(u64, Sender<Job>)>>,
    next: std::sync::atomic::AtomicU64,
}

/// The process's helpers for backend calls.
pub(crate) static BACKEND: LazyLock<Arc<Helpers>> =
    LazyLock::new(|| Helpers::new("wasnap-backend-call", KEEP));

impl Helpers {
    pub(crate) fn new(name: &'static str, keep: Duration) -> Arc<Helpers> {
        Arc::new(Helpers {
            name,
            keep,
            idle: Mutex::new(Vec::new()),
            next: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Runs `job` on an idle thread, or on a new one if none is idle. Fails only if no
    /// thread could be made.
    pub(crate) fn run(
        self: &Arc<Self>,
        job: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let mut job: Job = Box::new(job);
        // A thread taken from the list stays alive for its call: it leaves the list
        // itself, under the lock, before it exits (see `serve`).
        while let Some((_, tx)) = self.lock().pop() {
            match tx.send(job) {
                Ok(()) => return Ok(()),
                // Gone (it panicked outside a call, which cannot happen, or the list
                // outlived it): the next one.
                Err(back) => job = back.0,
            }
        }
        let (tx, rx) = channel::<Job>();
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let me = Arc::downgrade(self);
        let keep = self.keep;
        let back = tx.clone();
        std::thread::Builder::new()
            .name(self.name.into())
            .spawn(move || serve(me, id, back, rx, keep))?;
        tx.send(job).map_err(|_| std::io::Error::other("a helper thread exited at start"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Sender<Job>)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many threads are idle now.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.lock().len()
    }
}

/// A helper thread's life: run the call it was made for, then each call it is given
/// while listed idle, until it has waited `keep` for one.
fn serve(helpers: Weak<Helpers>, id: u64, me: Sender<Job>, calls: Receiver<Job>, keep: Duration) {
    loop {
        match calls.recv_timeout(keep) {
            Ok(job) => {
                // A panic is the call's: its result sender is dropped, so its caller
                // hears of it, and this thread is as good as before.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                let Some(h) = helpers.upgrade() else { return };
                h.lock().push((id, me.clone()));
            }
            Err(RecvTimeoutError::Timeout) => {
                let Some(h) = helpers.upgrade() else { return };
                let mut idle = h.lock();
                match idle.iter().position(|(i, _)| *i == id) {
                    Some(at) => {
                        idle.swap_remove(at);
                        return;
                    }
                    // Taken for a call just now: it is on its way.
                    None => continue,
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;
    use std::thread::ThreadId;

    use super::*;

    fn on(h: &Arc<Helpers>) -> ThreadId {
        let (tx, rx) = channel();
        h.run(move || tx.send(std::thread::current().id()).unwrap()).unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    /// Waits until a thread is idle again: a thread is back in the list once its call
    /// is done, which may be a moment after its caller heard the answer.
    fn back(h: &Helpers) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while h.idle() == 0 {
            assert!(std::time::Instant::now() < deadline, "the thread never came back");
            std::thread::yield_now();
        }
    }

    #[test]
    fn calls_one_after_another_share_one_thread() {
        let h = Helpers::new("test-helper", Duration::from_secs(60));
        let first = on(&h);
        for _ in 0..20 {
            back(&h);
            assert_eq!(on(&h), first);
        }
        assert_ne!(first, std::thread::current().id());
    }

    #[test]
    fn a_call_that_hangs_holds_up_no_other() {
        let h = Helpers::new("test-helper", Duration::from_secs(60));
        let (release, hold) = channel::<()>();
        let (started, running) = channel();
        h.run(move || {
            started.send(std::thread::current().id()).unwrap();
            let _ = hold.recv();
        })
        .unwrap();
        let stuck = running.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_ne!(on(&h), stuck);
        release.send(()).unwrap();
    }

    #[test]
    fn a_call_that_panics_tells_its_caller_and_the_thread_serves_on() {
        let h = Helpers::new("test-helper", Duration::from_secs(60));
        let (tx, rx) = channel::<()>();
        let (ran, on_thread) = channel();
        h.run(move || {
            let _keep = tx;
            ran.send(std::thread::current().id()).unwrap();
            panic!("a backend bug");
        })
        .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Err(RecvTimeoutError::Disconnected));
        let panicked = on_thread.recv().unwrap();
        back(&h);
        assert_eq!(on(&h), panicked, "the next call runs on the thread that served the panic");
    }

    #[test]
    fn no_call_is_lost_to_a_thread_exiting_as_it_is_taken() {
        // Threads that wait about as long as the gaps between calls: some calls take a
        // thread in the moment it gives up waiting.
        let h = Helpers::new("test-helper", Duration::from_micros(200));
        for i in 0..2000u32 {
            let (tx, rx) = channel();
            h.run(move || tx.send(i).unwrap()).unwrap();
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(i), "call {i} was lost");
            if i % 3 == 0 {
                std::thread::sleep(Duration::from_micros(150 + u64::from(i % 7) * 20));
            }
        }
    }

    #[test]
    fn idle_threads_exit_after_their_wait() {
        let h = Helpers::new("test-helper", Duration::from_millis(20));
        on(&h);
        back(&h);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            std::thread::sleep(Duration::from_millis(5));
            if h.idle() == 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "an idle thread never left");
        }
    }
}
