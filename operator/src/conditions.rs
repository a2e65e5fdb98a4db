//! Status conditions and times, written the same way by every controller.

use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Longest condition message kept (the apiserver allows 32 KiB; readers want less).
const MAX_MESSAGE: usize = 4096;

pub use sigil_identity::clock::unix_seconds as unix;

/// A Kubernetes `Time` (second precision).
pub fn k8s_time(t: SystemTime) -> Time {
    Time(Timestamp::from_second(unix(t)).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// The `SystemTime` of a Kubernetes `Time`.
pub fn system_time(t: &Time) -> SystemTime {
    let secs = t.0.as_second();
    if secs <= 0 {
        UNIX_EPOCH
    } else {
        UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
    }
}

/// Condition `type_` with `(ok, reason, message)`. Its `lastTransitionTime` moves only
/// when the status flips from what `old` holds.
pub fn condition(
    old: &[Condition],
    type_: &str,
    (ok, reason, message): (bool, String, String),
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_owned();
    let previous = old.iter().find(|c| c.type_ == type_);
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => now.clone(),
    };
    let mut message = message;
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    Condition {
        type_: type_.to_owned(),
        status,
        reason,
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The `(status, reason, message)` of condition `type_`.
pub fn find(conditions: &[Condition], type_: &str) -> Option<(String, String, String)> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}
