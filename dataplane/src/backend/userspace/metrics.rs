//! The proxy's own metrics. Label sets are bounded: protocol and direction are fixed sets, and
//! the per-service dial errors have one series per service port that exists (removed with it)
//! up to [`MAX_SERVICE_SERIES`], beyond which errors count under `service="_other"`.

use std::collections::BTreeSet;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::plan::Proto;

/// Dial-error series kept by service at most.
pub const MAX_SERVICE_SERIES: usize = 1000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtoLabel {
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabel {
    pub protocol: String,
    /// "to_endpoint" or "to_client".
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

#[derive(Debug, Default)]
pub struct ProxyMetrics {
    /// TCP connections and UDP flows being proxied.
    pub active: Family<ProtoLabel, Gauge>,
    /// TCP connections accepted and UDP flows opened.
    pub opened: Family<ProtoLabel, Counter>,
    pub bytes: Family<BytesLabel, Counter>,
    /// Failed dials (refused, unreachable, timed out) by service port.
    pub dial_errors: Family<ServiceLabel, Counter>,
    /// Connections closed without an endpoint (none left after retries).
    pub no_endpoint: Family<ProtoLabel, Counter>,
    /// Datagrams dropped: a flow's queue full, or the portal's flow table full.
    pub udp_dropped: Counter,
    services: Mutex<BTreeSet<String>>,
}

fn proto(p: Proto) -> ProtoLabel {
    ProtoLabel { protocol: p.as_str().into() }
}

impl ProxyMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kpx_userspace_active_connections",
            "TCP connections and UDP flows the userspace proxy is forwarding",
            self.active.clone(),
        );
        registry.register(
            "kpx_userspace_connections",
            "TCP connections accepted and UDP flows opened by the userspace proxy",
            self.opened.clone(),
        );
        registry.register("kpx_userspace_bytes", "Bytes forwarded by the userspace proxy", self.bytes.clone());
        registry.register(
            "kpx_userspace_dial_errors",
            "Connections to endpoints that failed (refused, unreachable, timed out), by service port",
            self.dial_errors.clone(),
        );
        registry.register(
            "kpx_userspace_no_endpoint",
            "Client connections closed because no endpoint answered",
            self.no_endpoint.clone(),
        );
        registry.register(
            "kpx_userspace_udp_dropped",
            "Datagrams dropped by the userspace proxy (flow queue or flow table full)",
            self.udp_dropped.clone(),
        );
    }

    pub fn active(&self, p: Proto) -> Gauge {
        self.active.get_or_create(&proto(p)).clone()
    }

    pub fn opened(&self, p: Proto) -> Counter {
        self.opened.get_or_create(&proto(p)).clone()
    }

    pub fn no_endpoint(&self, p: Proto) -> Counter {
        self.no_endpoint.get_or_create(&proto(p)).clone()
    }

    /// (to the endpoint, to the client)
    pub fn bytes(&self, p: Proto) -> (Counter, Counter) {
        let label = |direction: &str| BytesLabel { protocol: p.as_str().into(), direction: direction.into() };
        // One at a time: get_or_create holds the family's read lock until its guard drops, and
        // creating the second series needs the write lock.
        let to_endpoint = self.bytes.get_or_create(&label("to_endpoint")).clone();
        let to_client = self.bytes.get_or_create(&label("to_client")).clone();
        (to_endpoint, to_client)
    }

    /// The dial-error counter of service port `name` (created on first use, within the bound).
    pub fn dial_errors(&self, name: &str) -> Counter {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        let service = if services.contains(name) || services.len() < MAX_SERVICE_SERIES {
            services.insert(name.to_string());
            name.to_string()
        } else {
            "_other".to_string()
        };
        self.dial_errors.get_or_create(&ServiceLabel { service }).clone()
    }

    /// Service port `name` is gone: its series goes too.
    pub fn forget(&self, name: &str) {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        if services.remove(name) {
            self.dial_errors.remove(&ServiceLabel { service: name.to_string() });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_error_series_are_bounded_and_removed_with_their_service() {
        let m = ProxyMetrics::default();
        for i in 0..MAX_SERVICE_SERIES + 5 {
            m.dial_errors(&format!("ns/s{i}:p")).inc();
        }
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let series = text.lines().filter(|l| l.starts_with("kpx_userspace_dial_errors_total{")).count();
        assert_eq!(series, MAX_SERVICE_SERIES + 1, "the bound plus _other");
        assert!(text.contains("kpx_userspace_dial_errors_total{service=\"_other\"} 5"), "{text}");
        m.forget("ns/s0:p");
        m.dial_errors("ns/new:p").inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(!text.contains("service=\"ns/s0:p\""));
        assert!(text.contains("kpx_userspace_dial_errors_total{service=\"ns/new:p\"} 1"), "a freed slot is reused");
    }
}
