//! kpx's security, shared by both planes and kpxctl: TLS on every gRPC server (with serving
//! certificates re-read when their files rotate), who a caller is (a client certificate, or a
//! Kubernetes bearer token checked with TokenReview), what it may do (a node only itself, admins
//! everything, other users what a SubjectAccessReview allows), and the limits that keep callers
//! who never authenticate from hurting the ones that do.
//!
//! Data flow on a server: [`listener`] (accept, TLS handshake, client certificate) ->
//! [`layer`] (per request: [`policy`] authenticates, a [`Caller`] goes into the request) -> the
//! service calls [`Caller::authorize`] with what it was asked for ([`authz`]). On a client:
//! [`client::connect`] with [`client::ClientCredentials`].

pub mod apiserver;
pub mod authz;
#[cfg(any(test, feature = "certs"))]
pub mod certs;
pub mod client;
pub mod flags;
pub mod identity;
mod io;
pub mod layer;
pub mod listener;
pub mod metrics;
pub mod pem;
pub mod policy;
pub mod server;
pub mod server_tls;
pub mod token;
mod ttl_cache;

pub use authz::{Access, Caller, Verb};
pub use identity::Identity;
pub use metrics::AuthMetrics;
pub use server::{ServerSecurity, server_builder};
