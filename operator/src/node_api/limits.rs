//! What one caller may cost the Node API: the bounds an attacker inside the cluster meets.
//!
//! - [`NodeApiLimits`]: every bound, with the defaults the operator's flags document.
//! - [`RateLimiter`]: token buckets keyed by node (or, for callers without a client
//!   certificate, by source address), charged by units of work.
//!
//! How the budgets are used ([`super::service`]):
//! - each authenticated RPC is charged to its own per-node budget (agent upkeep, X509
//!   signing, JWT minting), so one kind of work cannot starve the others; a workload that
//!   makes its agent mint JWT-SVIDs without end can exhaust only the node's minting
//!   budget, never its X509 rotations;
//! - a request is charged only after it validated (a refused request costs nothing but
//!   its denial), and by what it asks for: one token per CSR signed, one per JWT minted;
//! - a caller without a client certificate is charged per source address and in total
//!   before the operator sends its token to TokenReview.
//!
//! Connection caps are enforced by [`crate::tls_listener`], request bytes in transit and
//! message bounds for callers without a certificate by [`super::request_bounds`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// A token bucket's shape: `rate` tokens per second, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Sustained tokens per second.
    pub rate: f64,
    /// Most tokens at once (and what a new key starts with).
    pub burst: f64,
}

impl Budget {
    /// `rate` per second, `burst` at once.
    pub const fn new(rate: f64, burst: f64) -> Self {
        Self { rate, burst }
    }
}

/// Every bound of the Node API.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeApiLimits {
    /// Per node: AttestNode/AttestNodeTpm once attested, RenewAgent, SyncEntries (one
    /// token per call).
    pub agent: Budget,
    /// Per node: X509-SVIDs signed (one token per CSR).
    pub sign: Budget,
    /// Per node: JWT-SVIDs minted (one token per call).
    pub mint: Budget,
    /// Per source address: attestations by callers without a client certificate, charged
    /// before TokenReview.
    pub attest_per_address: Budget,
    /// All source addresses together: attestations charged before TokenReview (bounds
    /// what the operator asks of the API server).
    pub attest_total: Budget,
    /// Most connections open at once (handshakes included).
    pub max_connections: usize,
    /// Most connections open at once from one source address.
    pub max_connections_per_address: usize,
    /// Most connections without a client certificate open at once.
    pub max_unauthenticated_connections: usize,
    /// Most requests from callers without a client certificate in flight at once.
    pub max_unauthenticated_requests: usize,
    /// Largest message a caller without a client certificate may send (checked against
    /// the gRPC length prefix, before the message is buffered).
    pub max_unauthenticated_message: usize,
    /// Request bytes in transit (received, not yet decoded) at once from one source
    /// address.
    pub max_request_bytes_per_address: usize,
    /// Request bytes in transit at once from everyone.
    pub max_request_bytes: usize,
}

/// Largest token accepted in AttestNode (and in AttestNodeTpm's identity message).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

impl Default for NodeApiLimits {
    fn default() -> Self {
        Self {
            agent: Budget::new(20.0, 200.0),
            // A restarted agent re-signs every entry of its node at once.
            sign: Budget::new(50.0, 1000.0),
            mint: Budget::new(20.0, 200.0),
            attest_per_address: Budget::new(1.0, 10.0),
            attest_total: Budget::new(50.0, 500.0),
            max_connections: 2048,
            max_connections_per_address: 64,
            max_unauthenticated_connections: 256,
            max_unauthenticated_requests: 128,
            // A token, a CSR and a TPM's EK certificate and keys, with room to spare.
            max_unauthenticated_message: 2 * MAX_TOKEN_LEN,
            // An agent's largest batch (1000 CSRs) is well under 1 MiB.
            max_request_bytes_per_address: 8 << 20,
            // Kept well inside the chart's 256 MiB memory limit.
            max_request_bytes: 32 << 20,
        }
    }
}

impl NodeApiLimits {
    /// Limits no test workload reaches (for tests that are not about limits).
    pub fn unlimited() -> Self {
        let lots = Budget::new(1e6, 1e7);
        Self {
            agent: lots,
            sign: lots,
            mint: lots,
            attest_per_address: lots,
            attest_total: lots,
            max_connections: 1 << 20,
            max_connections_per_address: 1 << 20,
            max_unauthenticated_connections: 1 << 20,
            max_unauthenticated_requests: 1 << 20,
            max_request_bytes_per_address: 1 << 40,
            max_request_bytes: 1 << 40,
            ..Self::default()
        }
    }
}

/// Token buckets keyed by node name or source address.
#[derive(Debug)]
pub struct RateLimiter {
    budget: Budget,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

/// Buckets kept before idle, full ones are forgotten.
const MAX_KEYS: usize = 100_000;

impl RateLimiter {
    /// Buckets of shape `budget`.
    pub fn new(budget: Budget) -> Self {
        Self {
            budget,
            buckets: Mutex::default(),
        }
    }

    /// The bucket's shape.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// Runs `f` on `key`'s bucket (tokens refilled to now).
    fn with_bucket<T>(&self, key: &str, f: impl FnOnce(&mut f64) -> T) -> T {
        let now = Instant::now();
        let Budget { rate, burst } = self.budget;
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > MAX_KEYS {
            map.retain(|_, (tokens, at)| *tokens < burst || now.duration_since(*at).as_secs() < 60);
        }
        let (tokens, at) = map.entry(key.to_owned()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        f(tokens)
    }

    /// Takes `cost` tokens from `key`'s bucket, or none when it holds fewer.
    pub fn try_take(&self, key: &str, cost: f64) -> bool {
        self.with_bucket(key, |tokens| {
            if *tokens >= cost {
                *tokens -= cost;
                true
            } else {
                false
            }
        })
    }

    /// Takes as many whole tokens as `key`'s bucket holds, up to `want`; returns how many.
    pub fn take_up_to(&self, key: &str, want: usize) -> usize {
        self.with_bucket(key, |tokens| {
            let granted = (tokens.max(0.0).floor() as usize).min(want);
            *tokens -= granted as f64;
            granted
        })
    }

    /// Gives back `n` tokens taken from `key` (work that was not done after all).
    pub fn give_back(&self, key: &str, n: f64) {
        let burst = self.budget.burst;
        self.with_bucket(key, |tokens| *tokens = (*tokens + n).min(burst));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_limits_per_key() {
        let l = RateLimiter::new(Budget::new(0.001, 3.0));
        assert!(l.try_take("a", 1.0));
        assert!(l.try_take("a", 1.0));
        assert!(l.try_take("a", 1.0));
        assert!(!l.try_take("a", 1.0));
        assert!(l.try_take("b", 1.0), "other keys are unaffected");
    }

    #[test]
    fn a_batch_gets_what_the_bucket_holds_and_no_more() {
        let l = RateLimiter::new(Budget::new(0.001, 10.0));
        assert_eq!(l.take_up_to("n", 4), 4);
        assert_eq!(
            l.take_up_to("n", 1000),
            6,
            "a batch larger than the burst is cut"
        );
        assert_eq!(l.take_up_to("n", 1000), 0);
        l.give_back("n", 2.0);
        assert_eq!(l.take_up_to("n", 1000), 2);
        assert!(!l.try_take("n", 1.0));
    }

    #[test]
    fn refills_at_its_rate() {
        let l = RateLimiter::new(Budget::new(1000.0, 1.0));
        assert!(l.try_take("n", 1.0));
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(l.try_take("n", 1.0));
    }
}
