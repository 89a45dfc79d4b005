//! The userspace backend, the seed documents' first proxy mode rebuilt: for every service port
//! the agent listens on a local port ("portal"), iptables rules send the service's traffic
//! there (REDIRECT from PREROUTING for pods and outside clients, DNAT from OUTPUT for the node
//! itself), and the proxy forwards each connection to an endpoint it picks.
//!
//! What it adds over the kernel modes: a connection an endpoint refuses is retried on the next
//! endpoint before the client notices, and every connection is visible (metrics per protocol,
//! dial errors per service). What it costs: the proxy is in the data path (it must run for
//! traffic to flow), and endpoints see the node's address instead of the client's.
//!
//! `plan` (which portal each kind of traffic goes to, and which endpoints each portal has),
//! `render` (iptables-restore text) and `balancer` are pure; `proxy` runs the portals on their
//! own tokio runtime (`tcp` with zero-copy `splice`, `udp` with per-client flows); `apply`
//! drives them and iptables-restore. docs/userspace.md has the design.

pub mod apply;
pub mod balancer;
pub mod endpoint;
pub mod metrics;
pub mod plan;
pub mod portal;
pub mod proxy;
pub mod render;
pub mod splice;
pub mod tcp;
pub mod udp;

pub use apply::{UserspaceBackend, UserspaceConfig, UserspaceError};
pub use portal::Settings;
