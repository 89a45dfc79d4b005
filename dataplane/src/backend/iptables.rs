//! The iptables backend, modelled on kube-proxy's iptables mode: the same chain layout and
//! hashed chain names, so that operators' knowledge and tooling (iptables-save | grep KUBE-SVC)
//! carry over. `render` produces iptables-restore input and does no I/O; `apply` runs
//! iptables-restore (argv and stdin, never a shell) and decides between full and partial syncs.

pub mod apply;
pub mod chains;
pub mod conntrack;
pub mod exec;
pub mod jumps;
pub mod render;
pub mod ruleset;
pub mod saved;

pub use apply::{BackendStats, IptablesBackend, IptablesConfig};
