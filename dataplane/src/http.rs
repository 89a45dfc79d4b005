//! The agent's small HTTP servers (health, metrics, healthCheckNodePorts): the shared server
//! of `kpx-telemetry`, also used by the controlplane's metrics and health endpoints.

pub use kpx_telemetry::http::{Reply, not_found, reply, serve};
