//! The kpx controlplane. It watches the cluster once (apiserver or a manifest directory),
//! reduces Services, EndpointSlices and Nodes to the proxy's model, computes each node's
//! desired proxy state (sharing every part that is the same on many nodes), and streams it to
//! the node agents over gRPC as a snapshot followed by content-versioned deltas.
//!
//! Data flow: `source`/`k8s` -> [`model::ClusterEvent`] -> `cache` (per-node views from
//! `node_view`, versions, coalescing) -> `server` (Sync and Inspect gRPC services).

pub mod k8s;
pub mod model;
pub mod node_view;
pub mod source;
pub mod wire;
