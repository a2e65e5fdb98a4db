//! What one workload may cost the agent, so that no workload can starve the others on its
//! node.
//!
//! - [`WorkloadKey`]: who is charged: the pod a caller runs in (its UID, from the
//!   kernel's cgroups), or its UID for a process in no pod.
//! - [`MintBudget`]: JWT-SVIDs minted at the operator per workload (a token bucket). The
//!   operator's minting budget is per node; without this, one workload asking for a fresh
//!   audience on every call would spend it for all its neighbours. Only mints are charged:
//!   a JWT-SVID served from the cache costs nothing.
//! - [`Caps`]: connections, and streams, open at once, per workload and in total. A
//!   connection over a cap is closed at accept, counted
//!   (`sigil_workload_api_denials_total{rpc="connection"}`) and logged at most once a second
//!   per reason with the number left unlogged; a stream over a cap is refused with
//!   ResourceExhausted, counted under its RPC. Each open stream and connection costs the
//!   agent memory (tens of KiB), so these caps are what keeps the agent inside its memory
//!   limit whatever its workloads do.
//!
//! The caps and budgets are the agent's flags (`--max-connections`,
//! `--max-connections-per-workload`, `--max-streams`, `--max-streams-per-workload`,
//! `--jwt-mint-rate-per-workload`, `--jwt-mint-burst-per-workload`).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::attest::cgroup;
use crate::attest::peer::PeerProcess;
use crate::transport::ApiMetrics;

/// Default sustained JWT-SVID mints per second per workload.
pub const DEFAULT_MINT_RATE: f64 = 2.0;
/// Default burst of JWT-SVID mints per workload.
pub const DEFAULT_MINT_BURST: f64 = 20.0;
/// Default cap on Workload API connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default cap on Workload API connections open at once from one workload.
pub const DEFAULT_MAX_CONNECTIONS_PER_WORKLOAD: usize = 128;
/// Default cap on Workload API streams open at once.
pub const DEFAULT_MAX_STREAMS: usize = 4096;
/// Default cap on Workload API streams open at once for one workload.
pub const DEFAULT_MAX_STREAMS_PER_WORKLOAD: usize = 256;

/// Who a caller is charged as.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKey {
    /// A process in a pod: the pod's UID.
    Pod(String),
    /// A process in no pod: its UID.
    Uid(u32),
}

impl fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkloadKey::Pod(uid) => write!(f, "pod {uid}"),
            WorkloadKey::Uid(uid) => write!(f, "uid {uid}"),
        }
    }
}

impl WorkloadKey {
    /// The key of a connected peer, from its cgroups (a short read of
    /// `/proc/<pid>/cgroup`); a process whose cgroups cannot be read is charged by UID.
    pub fn of(peer: &PeerProcess) -> WorkloadKey {
        match cgroup::pod_container_of(&peer.proc_dir(), peer.pid) {
            Ok(Some(pc)) => WorkloadKey::Pod(pc.pod_uid),
            _ => WorkloadKey::Uid(peer.uid),
        }
    }
}

/// A token bucket per workload for JWT-SVID mints.
#[derive(Debug)]
pub struct MintBudget {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<WorkloadKey, (f64, Instant)>>,
}

impl Default for MintBudget {
    fn default() -> Self {
        Self::new(DEFAULT_MINT_RATE, DEFAULT_MINT_BURST)
    }
}

impl MintBudget {
    /// `rate` mints per second per workload, `burst` at once.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            buckets: Mutex::default(),
        }
    }

    /// Takes one mint from `key`'s bucket; false when it is empty.
    pub fn try_take(&self, key: &WorkloadKey) -> bool {
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 10_000 {
            let burst = self.burst;
            map.retain(|_, (t, at)| {
                *t < burst || now.duration_since(*at) < Duration::from_secs(60)
            });
        }
        let (tokens, at) = map.entry(key.clone()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Why a workload was refused, for its status message.
    pub fn refusal(&self, key: &WorkloadKey) -> String {
        format!(
            "workload {key} is over its JWT-SVID minting budget on this node ({} per second, bursts of {}); reuse audiences or retry with backoff",
            self.rate, self.burst
        )
    }
}

/// Caps on what workloads hold open at once (connections, or streams), per workload and
/// in total.
#[derive(Debug)]
pub struct Caps {
    what: &'static str,
    flags: (&'static str, &'static str),
    reasons: (&'static str, &'static str),
    max_total: usize,
    max_per_workload: usize,
    total: Arc<Semaphore>,
    per_workload: Mutex<HashMap<WorkloadKey, usize>>,
    open: Option<Gauge>,
    metrics: ApiMetrics,
    logged: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

/// Why [`Caps::admit`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The metric label.
    pub reason: &'static str,
    /// For the log and the status message.
    pub detail: String,
}

/// One connection's (or stream's) place under its caps, given back when it is dropped.
#[derive(Debug)]
pub struct Slot {
    caps: Arc<Caps>,
    key: WorkloadKey,
    _total: OwnedSemaphorePermit,
}

impl Slot {
    /// Counts and logs (throttled) that this connection is being ended for `reason`.
    pub fn refuse(&self, reason: &'static str, pid: i32, detail: String) {
        self.caps.refuse(reason, &self.key, pid, detail);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(g) = &self.caps.open {
            g.dec();
        }
        let mut map = self
            .caps
            .per_workload
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl Caps {
    /// Connections: at most `max_total`, `max_per_workload` from one workload; counted in
    /// `metrics` (`open_connections`, and refusals as `rpc="connection"`).
    pub fn connections(
        max_total: usize,
        max_per_workload: usize,
        metrics: ApiMetrics,
    ) -> Arc<Self> {
        Self::new(
            "connections",
            ("--max-connections", "--max-connections-per-workload"),
            ("too_many_connections", "too_many_connections_from_workload"),
            max_total,
            max_per_workload,
            Some(metrics.open_connections.clone()),
            metrics,
        )
    }

    /// Streams (FetchX509SVID, FetchX509Bundles, FetchJWTBundles, SDS StreamSecrets): at most `max_total`,
    /// `max_per_workload` for one workload.
    pub fn streams(max_total: usize, max_per_workload: usize, metrics: ApiMetrics) -> Arc<Self> {
        Self::new(
            "streams",
            ("--max-streams", "--max-streams-per-workload"),
            ("too_many_streams", "too_many_streams_from_workload"),
            max_total,
            max_per_workload,
            None,
            metrics,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        what: &'static str,
        flags: (&'static str, &'static str),
        reasons: (&'static str, &'static str),
        max_total: usize,
        max_per_workload: usize,
        open: Option<Gauge>,
        metrics: ApiMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            what,
            flags,
            reasons,
            max_total,
            max_per_workload,
            total: Arc::new(Semaphore::new(max_total)),
            per_workload: Mutex::default(),
            open,
            metrics,
            logged: Mutex::default(),
        })
    }

    /// A place for `key`, or why not.
    pub fn admit(self: &Arc<Self>, key: WorkloadKey) -> Result<Slot, Refusal> {
        let what = self.what;
        let Ok(total) = self.total.clone().try_acquire_owned() else {
            return Err(Refusal {
                reason: self.reasons.0,
                detail: format!(
                    "{} {what} are open on this node's agent already ({})",
                    self.max_total, self.flags.0
                ),
            });
        };
        {
            let mut map = self.per_workload.lock().unwrap_or_else(|p| p.into_inner());
            let n = map.entry(key.clone()).or_insert(0);
            if *n >= self.max_per_workload {
                return Err(Refusal {
                    reason: self.reasons.1,
                    detail: format!(
                        "workload {key} has {} {what} open already ({})",
                        self.max_per_workload, self.flags.1
                    ),
                });
            }
            *n += 1;
        }
        if let Some(g) = &self.open {
            g.inc();
        }
        Ok(Slot {
            caps: self.clone(),
            key,
            _total: total,
        })
    }

    /// Counts a connection ended for `reason` (`rpc="connection"`), and logs it unless
    /// one was logged less than a second ago for the same reason (a flood of refused
    /// connections must not flood the log as well).
    pub fn refuse(&self, reason: &'static str, key: &WorkloadKey, pid: i32, detail: String) {
        self.metrics.deny("connection", reason);
        let now = Instant::now();
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        let (last, unlogged) = logged
            .entry(reason)
            .or_insert((now - Duration::from_secs(2), 0));
        if now.duration_since(*last) >= Duration::from_secs(1) {
            tracing::warn!(reason, workload = %key, pid, unlogged = *unlogged, "{detail}; connection closed");
            *last = now;
            *unlogged = 0;
        } else {
            *unlogged += 1;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_over_its_mint_budget_does_not_touch_its_neighbours() {
        let b = MintBudget::new(0.001, 3.0);
        let greedy = WorkloadKey::Pod("greedy".into());
        let web = WorkloadKey::Pod("web".into());
        for _ in 0..3 {
            assert!(b.try_take(&greedy));
        }
        assert!(!b.try_take(&greedy));
        assert!(b.try_take(&web));
        assert!(b.refusal(&greedy).contains("pod greedy"));
    }

    #[test]
    fn connections_are_capped_per_workload_and_in_total() {
        let metrics = ApiMetrics::default();
        let caps = Caps::connections(3, 2, metrics.clone());
        let a = WorkloadKey::Uid(1);
        let b = WorkloadKey::Pod("b".into());
        let a1 = caps.admit(a.clone()).unwrap();
        let _a2 = caps.admit(a.clone()).unwrap();
        let r = caps.admit(a.clone()).unwrap_err();
        assert_eq!(r.reason, "too_many_connections_from_workload");
        assert!(r.detail.contains("uid 1"), "{r:?}");
        let _b1 = caps.admit(b.clone()).unwrap();
        assert_eq!(
            caps.admit(b.clone()).unwrap_err().reason,
            "too_many_connections"
        );
        assert_eq!(metrics.open_connections.get(), 3);
        drop(a1);
        assert_eq!(metrics.open_connections.get(), 2);
        assert!(
            caps.admit(a).is_ok(),
            "a closed connection gives its place back"
        );
    }

    #[test]
    fn streams_are_capped_per_workload() {
        let caps = Caps::streams(10, 1, ApiMetrics::default());
        let a = WorkloadKey::Pod("a".into());
        let held = caps.admit(a.clone()).unwrap();
        let r = caps.admit(a.clone()).unwrap_err();
        assert_eq!(r.reason, "too_many_streams_from_workload");
        assert!(r.detail.contains("--max-streams-per-workload"), "{r:?}");
        drop(held);
        assert!(caps.admit(a).is_ok());
    }
}
