//! The kpx dataplane: the per-node agent. It subscribes to the controlplane as its node,
//! applies each snapshot or delta to its copy of the desired state (checking the content
//! version), hands the changed services to a backend that programs the kernel, and answers
//! every version with an ACK or a NACK. It keeps its last state when the controlplane is gone.
//! Around the session, [`agent`] serves health, metrics and healthCheckNodePorts.

pub mod admin;
pub mod agent;
pub mod backend;
pub mod cleanup;
pub mod config;
pub mod hcnp;
pub mod health;
mod http;
pub mod metrics;
pub mod state;
pub mod stream;
pub mod sysctl;
