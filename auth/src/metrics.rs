//! Security metrics, registered into each plane's registry. Every label set is bounded (a
//! fixed list of reasons), never per caller.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Result_ {
    result: String,
}

/// How the server is secured: one series with value 1, so that dashboards and alerts can find
/// servers running with `--insecure`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecurityLabels {
    pub tls: String,
    pub client_certificates: String,
    pub tokens: String,
    pub insecure: String,
}

#[derive(Clone, Debug, Default)]
pub struct AuthMetrics {
    authentication_failures: Family<Reason, Counter>,
    access_denied: Family<Reason, Counter>,
    connections_rejected: Family<Reason, Counter>,
    certificate_reloads: Family<Result_, Counter>,
    unauthenticated_connections: Gauge,
    info: Family<SecurityLabels, Gauge>,
}

impl AuthMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kpx_grpc_authentication_failures",
            "gRPC requests refused because the caller could not be authenticated, by reason",
            self.authentication_failures.clone(),
        );
        registry.register(
            "kpx_grpc_access_denied",
            "gRPC requests of authenticated callers refused, by reason (node_mismatch: a node asked for another node)",
            self.access_denied.clone(),
        );
        registry.register(
            "kpx_grpc_connections_rejected",
            "Connections closed before they authenticated, by reason",
            self.connections_rejected.clone(),
        );
        registry.register(
            "kpx_tls_certificate_reloads",
            "Reloads of the serving certificate after its files changed, by result",
            self.certificate_reloads.clone(),
        );
        registry.register(
            "kpx_grpc_unauthenticated_connections",
            "Open connections that have not authenticated yet (capped)",
            self.unauthenticated_connections.clone(),
        );
        registry.register("kpx_grpc_security_info", "How the gRPC server is secured (value 1)", self.info.clone());
    }

    pub fn authentication_failed(&self, reason: &str) {
        self.authentication_failures.get_or_create(&Reason { reason: reason.into() }).inc();
    }

    pub fn denied(&self, reason: &str) {
        self.access_denied.get_or_create(&Reason { reason: reason.into() }).inc();
    }

    pub fn connection_rejected(&self, reason: &str) {
        self.connections_rejected.get_or_create(&Reason { reason: reason.into() }).inc();
    }

    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.certificate_reloads.get_or_create(&Result_ { result: result.into() }).inc();
    }

    pub(crate) fn unauthenticated(&self) -> &Gauge {
        &self.unauthenticated_connections
    }

    pub fn set_info(&self, labels: SecurityLabels) {
        self.info.get_or_create(&labels).set(1);
    }

    /// For tests: the count of one denial reason.
    pub fn denied_count(&self, reason: &str) -> u64 {
        self.access_denied.get_or_create(&Reason { reason: reason.into() }).get()
    }

    /// For tests: the count of one rejection reason.
    pub fn rejected_count(&self, reason: &str) -> u64 {
        self.connections_rejected.get_or_create(&Reason { reason: reason.into() }).get()
    }
}
