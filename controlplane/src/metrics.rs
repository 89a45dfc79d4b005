//! Prometheus metrics and health on `--metrics-bind-address`: `/metrics`, `/healthz`, `/livez`,
//! `/readyz`. Label sets are bounded (kinds, reasons, ack results): nothing is labelled per
//! node, so a scrape stays small at 5,000 nodes; per-node lag is a histogram across nodes.

use crate::cache::Cache;
use crate::model::{ClusterEvent, ObjectKind, SkipReason};
use kpx_telemetry::http::{self, Reply};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SkipLabels {
    kind: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

/// What is read from the cache at scrape time.
#[derive(Debug, Default)]
struct ScrapeView {
    connected: i64,
    versions_behind: Vec<u64>,
    encoded_cache_bytes: i64,
    skips: BTreeMap<(ObjectKind, SkipReason), u64>,
}

/// Encodes the scrape-time metrics from the view [`Metrics::render`] just took.
#[derive(Debug, Default)]
struct ScrapeCollector(Arc<Mutex<ScrapeView>>);

/// Buckets of `kpx_controlplane_node_versions_behind`.
const BEHIND_BUCKETS: [f64; 9] = [0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0];

impl Collector for ScrapeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let view = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let skipped = Family::<SkipLabels, Counter>::default();
        for ((kind, reason), n) in &view.skips {
            let labels = SkipLabels { kind: kind.as_str().into(), reason: reason.as_str().into() };
            skipped.get_or_create(&labels).inc_by(*n);
        }
        let connected = Gauge::<i64>::default();
        connected.set(view.connected);
        let behind = Histogram::new(BEHIND_BUCKETS);
        view.versions_behind.iter().for_each(|b| behind.observe(*b as f64));
        let cached = Gauge::<i64>::default();
        cached.set(view.encoded_cache_bytes);
        let metrics: [(&str, &str, &dyn EncodeMetric); 4] = [
            (
                "kpx_controlplane_skipped_objects",
                "Objects (or parts of them) skipped as invalid, by kind and reason",
                &skipped,
            ),
            ("kpx_controlplane_nodes_connected", "Nodes with a Sync stream open", &connected),
            (
                "kpx_controlplane_node_versions_behind",
                "Connected nodes by how many desired-state versions they are behind (0: in sync)",
                &behind,
            ),
            (
                "kpx_controlplane_encoded_cache_bytes",
                "Bytes of Service entries and endpoint views encoded once and kept for every node that gets them",
                &cached,
            ),
        ];
        for (name, help, metric) in metrics {
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    source_events: Family<KindLabel, Counter>,
    acks: Family<ResultLabel, Counter>,
    updates_sent: Family<KindLabel, Counter>,
    update_bytes_sent: Family<KindLabel, Counter>,
    change_to_ack: Histogram,
    view: Arc<Mutex<ScrapeView>>,
    auth: kpx_auth::AuthMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let source_events = Family::<KindLabel, Counter>::default();
        let acks = Family::<ResultLabel, Counter>::default();
        let updates_sent = Family::<KindLabel, Counter>::default();
        let update_bytes_sent = Family::<KindLabel, Counter>::default();
        // 1 ms doubling to ~65 s.
        let change_to_ack = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        let view = Arc::new(Mutex::new(ScrapeView::default()));
        // The encoder appends "_total" to counters.
        registry.register(
            "kpx_controlplane_source_events",
            "Events from the source of cluster state (apiserver watch or manifest directory), by kind",
            source_events.clone(),
        );
        registry.register(
            "kpx_controlplane_acks",
            "Answers from nodes to updates, by result (ack or nack)",
            acks.clone(),
        );
        registry.register(
            "kpx_controlplane_updates_sent",
            "Updates sent to nodes, by kind (snapshot, delta, digest_request)",
            updates_sent.clone(),
        );
        registry.register(
            "kpx_controlplane_update_bytes_sent",
            "Encoded bytes of the updates sent to nodes, by kind (snapshot, delta, digest_request)",
            update_bytes_sent.clone(),
        );
        registry.register(
            "kpx_controlplane_change_to_ack_seconds",
            "Per ACK of a delta: time from the publish of the oldest change it carries to the ACK",
            change_to_ack.clone(),
        );
        registry.register_collector(Box::new(ScrapeCollector(view.clone())));
        let auth = kpx_auth::AuthMetrics::default();
        auth.register(&mut registry);
        Metrics { registry, source_events, acks, updates_sent, update_bytes_sent, change_to_ack, view, auth }
    }

    /// The gRPC server's authentication, authorization and connection metrics.
    pub fn auth(&self) -> &kpx_auth::AuthMetrics {
        &self.auth
    }

    /// One event from the source (the initial listing included).
    pub fn source_event(&self, event: &ClusterEvent) {
        let kind = match event {
            ClusterEvent::Service(..) | ClusterEvent::NotProxied(_) => "Service",
            ClusterEvent::Slice(..) => "EndpointSlice",
            ClusterEvent::Node(..) => "Node",
            ClusterEvent::Synced => return,
        };
        self.source_events.get_or_create(&KindLabel { kind: kind.into() }).inc();
    }

    /// An update went to a node: `bytes` encoded, over all its chunks. `kind`: snapshot,
    /// delta or digest_request.
    pub fn sent(&self, kind: &str, bytes: usize) {
        let kind = KindLabel { kind: kind.into() };
        self.updates_sent.get_or_create(&kind).inc();
        self.update_bytes_sent.get_or_create(&kind).inc_by(bytes as u64);
    }

    /// Updates sent so far, (snapshots, deltas): for tests and benchmarks.
    pub fn sent_counts(&self) -> (u64, u64) {
        let get = |k: &str| self.updates_sent.get_or_create(&KindLabel { kind: k.into() }).get();
        (get("snapshot"), get("delta"))
    }

    /// A node answered an update; `oldest_change` is when the oldest change the update carried
    /// was published (None for snapshots).
    pub fn ack(&self, nack: bool, oldest_change: Option<Instant>) {
        let result = if nack { "nack" } else { "ack" };
        self.acks.get_or_create(&ResultLabel { result: result.into() }).inc();
        if let Some(t) = oldest_change.filter(|_| !nack) {
            self.change_to_ack.observe(t.elapsed().as_secs_f64());
        }
    }

    /// The scrape text (OpenMetrics), with the node and skip figures read from `cache` now.
    pub fn render(&self, cache: &Cache) -> String {
        let nodes = cache.list_nodes();
        let view = ScrapeView {
            connected: nodes.iter().filter(|n| n.connected).count() as i64,
            versions_behind: nodes.iter().filter(|n| n.connected).map(|n| n.versions_behind).collect(),
            skips: cache.skips().snapshot(),
            encoded_cache_bytes: kpx_proto::encoded::cached_bytes(),
        };
        let mut out = String::new();
        // Held while encoding so that concurrent scrapes each see their own view.
        let mut slot = self.view.lock().unwrap_or_else(|e| e.into_inner());
        *slot = view;
        drop(slot);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The controlplane's HTTP endpoints. `/livez` and `/healthz`: 200 while the process serves
/// (a controlplane that cannot reach the apiserver keeps serving the state it has). `/readyz`:
/// 200 once the cache has listed the cluster and published (nodes get a real state), 503
/// before.
pub fn reply(cache: &Cache, path: &str) -> Reply {
    let text = |status: u16, body: &str| {
        http::reply(status, &[("Content-Type", "text/plain; charset=utf-8".to_string())], body.to_string())
    };
    match path {
        "/metrics" => {
            let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8".to_string();
            http::reply(200, &[("Content-Type", ct)], cache.metrics().render(cache))
        }
        "/livez" | "/healthz" => text(200, "ok\n"),
        "/readyz" if cache.is_synced() => text(200, "ok\n"),
        "/readyz" => text(503, "not ready: the cluster state has not been listed yet\n"),
        _ => http::not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheConfig;
    use crate::model::Skips;
    use std::time::Duration;

    #[test]
    fn scrape_and_health() {
        let cache = Cache::new(Arc::new(Skips::default()), CacheConfig::default());
        assert_eq!(reply(&cache, "/readyz").status(), 503);
        assert_eq!(reply(&cache, "/livez").status(), 200);
        assert_eq!(reply(&cache, "/nope").status(), 404);
        let m = cache.metrics();
        m.source_event(&ClusterEvent::Node("n1".into(), None));
        m.ack(false, Some(Instant::now() - Duration::from_millis(30)));
        m.ack(true, Some(Instant::now()));
        cache.skips().record(ObjectKind::Service, &"ns/a", SkipReason::InvalidIp, &"bad");
        cache.apply(ClusterEvent::Synced, None);
        assert_eq!(reply(&cache, "/readyz").status(), 200);
        let text = m.render(&cache);
        for want in [
            "kpx_controlplane_source_events_total{kind=\"Node\"} 1",
            "kpx_controlplane_acks_total{result=\"ack\"} 1",
            "kpx_controlplane_acks_total{result=\"nack\"} 1",
            "kpx_controlplane_change_to_ack_seconds_count 1",
            "kpx_controlplane_skipped_objects_total{kind=\"Service\",reason=\"invalid_ip\"} 1",
            "kpx_controlplane_nodes_connected 0",
            "kpx_controlplane_node_versions_behind_count 0",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
