//! Injectable time. Everything that decides by the clock (SVID and CA lifetimes, rotation,
//! expiry checks) takes its time from a [`Clock`], so tests can drive a full rotation cycle
//! in milliseconds instead of hours.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// A source of the current time.
pub trait Clock: Send + Sync + Debug + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The real wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to; cheap to clone, clones share the time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self(Arc::new(Mutex::new(start)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t += by;
    }

    /// Sets the clock to `to`.
    pub fn set(&self, to: SystemTime) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Shared handle to a clock.
pub type SharedClock = Arc<dyn Clock>;

/// Whole seconds since the Unix epoch (0 before it): how JWT claims, the protos, CA Secrets
/// and Kubernetes times carry an instant.
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The instant `secs` seconds after the Unix epoch (the epoch itself for a negative value).
pub fn from_unix_seconds(secs: i64) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}
