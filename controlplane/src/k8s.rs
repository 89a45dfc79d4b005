//! Kubernetes API objects -> model (placeholder, being written).
pub mod watch;
