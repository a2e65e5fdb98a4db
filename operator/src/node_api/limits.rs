//! Per-node rate limiting for the Node API: a token bucket per calling node, so one noisy or
//! compromised agent cannot starve the others or the signer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Token buckets keyed by node.
#[derive(Debug)]
pub struct NodeRateLimiter {
    rate_per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl NodeRateLimiter {
    /// `rate_per_sec` sustained, up to `burst` at once.
    pub fn new(rate_per_sec: f64, burst: f64) -> Self {
        Self {
            rate_per_sec,
            burst,
            buckets: Mutex::default(),
        }
    }

    /// Takes `cost` tokens for `node`; false when the node is over its rate.
    pub fn try_take(&self, node: &str, cost: f64) -> bool {
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            map.retain(|_, (tokens, at)| {
                *tokens < self.burst || now.duration_since(*at).as_secs() < 60
            });
        }
        let (tokens, at) = map.entry(node.to_owned()).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.rate_per_sec).min(self.burst);
        *at = now;
        if *tokens >= cost {
            *tokens -= cost;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_limits_per_node() {
        let l = NodeRateLimiter::new(0.001, 3.0);
        assert!(l.try_take("a", 1.0));
        assert!(l.try_take("a", 1.0));
        assert!(l.try_take("a", 1.0));
        assert!(!l.try_take("a", 1.0));
        assert!(l.try_take("b", 1.0), "other nodes are unaffected");
    }
}
