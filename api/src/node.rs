//! What Sigil reads on Node objects, written by administrators (`sigil agent ban`).

/// The Node label that bans the Node's agent (any value; `sigil agent ban` writes
/// `"true"`). Its prefix is reserved for administrators: a kubelet can't remove it.
pub const BAN_LABEL: &str = "node-restriction.kubernetes.io/sigil-agent-banned";

/// The Node annotation that bans the Node's agent too, and says why (any value; by
/// convention the reason, who and when, as `sigil agent ban` writes it).
pub const BAN_ANNOTATION: &str = "sigil.dev/agent-banned";
