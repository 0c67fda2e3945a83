//! Injected fault points, for tests that prove a failure or a crash between two steps
//! loses nothing.
//!
//! A [`Faults`] set is owned by whoever builds the stack (the host, or a test), so
//! tests running in parallel threads never see each other's faults. A process can also
//! arm points at start-up from `WASNAP_FAULTS` (`point=error,other=abort`), which is how
//! crash tests kill a child process at an exact step.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// What happens when an armed point is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The step fails with an internal error.
    Error,
    /// The process aborts on the spot, as if killed.
    Abort,
}

/// A set of armed fault points. Disarmed, a point costs one relaxed atomic load.
#[derive(Debug, Default)]
pub struct Faults {
    armed: AtomicBool,
    points: Mutex<HashMap<String, Action>>,
}

impl Faults {
    /// A set with nothing armed.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set armed from a spec like `metadata.create.after-backend=error,x=abort`.
    pub fn from_spec(spec: &str) -> Result<Self> {
        let faults = Faults::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (point, action) = item.split_once('=').unwrap_or((item, "error"));
            let action = match action {
                "error" => Action::Error,
                "abort" => Action::Abort,
                other => {
                    return Err(Error::invalid_argument(format!(
                        "fault action {other:?} for {point:?} (expected error or abort)"
                    )));
                }
            };
            faults.arm(point, action);
        }
        Ok(faults)
    }

    /// Arms the set from `WASNAP_FAULTS`, or returns an empty one.
    pub fn from_env() -> Result<Self> {
        match std::env::var("WASNAP_FAULTS") {
            Ok(spec) => Self::from_spec(&spec),
            Err(_) => Ok(Self::new()),
        }
    }

    /// Arms `point`.
    pub fn arm(&self, point: &str, action: Action) {
        self.lock().insert(point.to_owned(), action);
        self.armed.store(true, Ordering::Release);
    }

    /// Disarms `point`.
    pub fn disarm(&self, point: &str) {
        let mut points = self.lock();
        points.remove(point);
        self.armed.store(!points.is_empty(), Ordering::Release);
    }

    /// Called at a fault point: fails or aborts if the point is armed.
    pub fn hit(&self, point: &str) -> Result<()> {
        if !self.armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let action = self.lock().get(point).copied();
        match action {
            None => Ok(()),
            Some(Action::Error) => Err(Error::internal(format!("injected fault at {point}"))),
            Some(Action::Abort) => {
                tracing::error!(point, "injected fault: aborting the process");
                std::process::abort()
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Action>> {
        // A poisoned map is still a valid map: faults are test scaffolding.
        self.points.lock().unwrap_or_else(|e| e.into_inner())
    }
}
