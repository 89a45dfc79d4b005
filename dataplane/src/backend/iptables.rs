//! The iptables backend, modelled on kube-proxy's iptables mode: the same chain layout and
//! hashed chain names, so that operators' knowledge and tooling (iptables-save | grep KUBE-SVC)
//! carry over. `render` produces iptables-restore input and does no I/O.

pub mod chains;
pub mod render;
