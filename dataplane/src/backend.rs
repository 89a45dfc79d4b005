//! Backends turn the node's desired state into kernel configuration. Each one is split into a
//! pure part (rendering or diffing, tested with golden data) and a thin part that talks to the
//! kernel; iptables is the first one. The userspace backend also proxies the connections itself.

pub mod iptables;
pub mod ipvs;
pub mod nftables;
pub mod policy;
pub mod shadow;
pub mod userspace;

/// Periodic resyncs prepared outside the agent's lock that may go stale in a row (an update
/// came meanwhile) before the agent runs the next one under the lock: a steady stream of
/// updates cannot put the resync off forever (iptables and nftables `apply/resync.rs`).
pub const MAX_STALE_RESYNCS: u32 = 3;
