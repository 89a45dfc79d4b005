//! Prometheus metrics on `/metrics`, with kube-proxy's names where they mean the same thing,
//! so existing dashboards and alerts keep working.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use crate::backend::iptables::BackendStats;
use crate::http::{self, Reply};
use crate::stream::ChangeCounts;

mod no_local;
pub use no_local::{NoLocal, NoLocalTracker};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    pub traffic_policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub full_duration: Histogram,
    pub partial_duration: Histogram,
    pub restore_failures: Counter,
    pub last_timestamp: Gauge<f64, AtomicU64>,
    pub rules: Family<TableLabel, Gauge>,
    pub updates: Family<ResultLabel, Counter>,
    pub connected: Gauge,
    pub network_programming: Histogram,
    pub endpoint_changes_pending: Gauge,
    pub endpoint_changes_total: Counter,
    pub service_changes_pending: Gauge,
    pub service_changes_total: Counter,
    pub no_local_endpoints: Family<PolicyLabel, Gauge>,
    pub last_queued: Gauge<f64, AtomicU64>,
    pub shadow_differences: Family<KindLabel, Gauge>,
    pub shadow_last_compare: Gauge<f64, AtomicU64>,
    /// The admin API's authentication, authorization and connection metrics.
    pub auth: kpx_auth::AuthMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// kube-proxy's buckets: 1 ms doubling to ~16 s.
fn histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// kube-proxy's network programming latency buckets: 0.25 s, 0.5 s, 1..59 s by 1 s,
/// 60..115 s by 5 s, 120..300 s by 30 s.
fn programming_histogram() -> Histogram {
    let b = [0.25, 0.5]
        .into_iter()
        .chain((1..60).map(f64::from))
        .chain((0..12).map(|i| 60.0 + 5.0 * f64::from(i)))
        .chain((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    Histogram::new(b)
}

/// Network programming latency of each change, in seconds: from its start (ms since the epoch)
/// to when the rules were programmed. A start in the future (clock skew between the apiserver,
/// the controlplane and this node) counts as 0.
pub fn programming_latencies(change_times_unix_ms: &[i64], programmed_at: SystemTime) -> Vec<f64> {
    let now_ms = programmed_at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as i64;
    change_times_unix_ms.iter().filter(|t| **t > 0).map(|t| (now_ms - t).max(0) as f64 / 1000.0).collect()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            sync_duration: histogram(),
            full_duration: histogram(),
            partial_duration: histogram(),
            restore_failures: Counter::default(),
            last_timestamp: Gauge::default(),
            rules: Family::default(),
            updates: Family::default(),
            connected: Gauge::default(),
            network_programming: programming_histogram(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            no_local_endpoints: Family::default(),
            last_queued: Gauge::default(),
            shadow_differences: Family::default(),
            shadow_last_compare: Gauge::default(),
            auth: kpx_auth::AuthMetrics::default(),
            registry: Registry::default(),
        };
        m.auth.register(&mut registry);
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.full_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.partial_duration.clone(),
        );
        // The encoder appends "_total" to counters.
        registry.register(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            m.restore_failures.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kpx",
            m.rules.clone(),
        );
        registry.register(
            "kpx_dataplane_updates",
            "Updates from the controlplane, by answer (ack or nack)",
            m.updates.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.network_programming.clone(),
        );
        registry.register("kpx_dataplane_connected", "1 while the Sync stream is up", m.connected.clone());
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            m.endpoint_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes_total.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            m.service_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes_total.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            m.last_queued.clone(),
        );
        registry.register(
            "kpx_shadow_differences",
            "--backend shadow: differences between kpx's rules and the kernel's at the last comparison, by kind",
            m.shadow_differences.clone(),
        );
        registry.register(
            "kpx_shadow_last_compare_timestamp_seconds",
            "--backend shadow: when kpx's rules were last compared with the kernel's",
            m.shadow_last_compare.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Adds the userspace proxy's metrics (`--backend userspace`) to the scrape.
    pub fn register_userspace(&mut self, proxy: &crate::backend::userspace::metrics::ProxyMetrics) {
        proxy.register(&mut self.registry);
    }

    /// Records the backends' last syncs: `before` is what the stats said before them.
    pub fn record_sync(&self, before: &[BackendStats], after: &[BackendStats]) {
        for (b, a) in before.iter().zip(after) {
            let syncs = |s: &BackendStats| s.full_syncs + s.partial_syncs;
            if let Some(d) =
                a.last_sync_duration.filter(|_| syncs(a) > syncs(b) || a.restore_failures > b.restore_failures)
            {
                let secs = d.as_secs_f64();
                self.sync_duration.observe(secs);
                if a.last_sync_full { &self.full_duration } else { &self.partial_duration }.observe(secs);
            }
            self.restore_failures.inc_by(a.restore_failures.saturating_sub(b.restore_failures));
        }
        let (filter, nat) = after.iter().fold((0, 0), |(f, n), s| (f + s.rules.filter, n + s.rules.nat));
        self.rules.get_or_create(&TableLabel { table: "filter".into() }).set(filter as i64);
        self.rules.get_or_create(&TableLabel { table: "nat".into() }).set(nat as i64);
        if let Some(t) = after.iter().filter_map(|s| s.last_success).max() {
            let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
            self.last_timestamp.set(secs);
        }
    }

    /// An update was programmed: observes the latency of every change it carried.
    pub fn programmed(&self, change_times_unix_ms: &[i64], programmed_at: SystemTime) {
        for secs in programming_latencies(change_times_unix_ms, programmed_at) {
            self.network_programming.observe(secs);
        }
    }

    /// An update's changes were received and applied (`programmed`) or not: every change counts
    /// once in the totals; pending counts the changes received but not in the kernel, which a
    /// NACK leaves pending until an update is applied again (the state is cumulative, so an
    /// applied update programs everything received before it).
    pub fn changes(&self, changes: ChangeCounts, programmed: bool) {
        self.endpoint_changes_total.inc_by(changes.endpoints as u64);
        self.service_changes_total.inc_by(changes.services as u64);
        if programmed {
            self.endpoint_changes_pending.set(0);
            self.service_changes_pending.set(0);
        } else {
            self.endpoint_changes_pending.inc_by(changes.endpoints as i64);
            self.service_changes_pending.inc_by(changes.services as i64);
        }
    }

    /// Service ports whose Local policy drops their traffic on this node (see `no_local`).
    pub fn no_local(&self, n: NoLocal) {
        let set = |policy: &str, v: u64| {
            let g = self.no_local_endpoints.get_or_create(&PolicyLabel { traffic_policy: policy.into() });
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set("internal", n.internal);
        set("external", n.external);
    }

    /// A shadow comparison: the differences per kind (every kind, zeros included).
    pub fn shadow(&self, r: &crate::backend::shadow::ShadowResult) {
        for (kind, n) in &r.by_kind {
            let g = self.shadow_differences.get_or_create(&KindLabel { kind: kind.as_str().into() });
            g.set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        self.shadow_last_compare.set(r.compared_unix_ms as f64 / 1000.0);
    }

    /// An update arrived (kpx applies it at once: kube-proxy's "queued" is "received").
    pub fn queued(&self, at: SystemTime) {
        self.last_queued.set(at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64());
    }

    pub fn update(&self, acked: bool) {
        let result = if acked { "ack" } else { "nack" };
        self.updates.get_or_create(&ResultLabel { result: result.into() }).inc();
    }

    /// The scrape text (OpenMetrics text format).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn reply(&self, path: &str) -> Reply {
        if path != "/metrics" {
            return http::not_found();
        }
        let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8".to_string();
        http::reply(200, &[("Content-Type", ct)], self.render())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn scrape_has_kube_proxy_names() {
        let m = Metrics::new();
        let before = BackendStats::default();
        let after = BackendStats {
            last_sync_duration: Some(Duration::from_millis(12)),
            last_sync_full: true,
            full_syncs: 1,
            restore_failures: 1,
            last_success: Some(SystemTime::now()),
            rules: crate::backend::iptables::apply::RuleCounts { filter: 3, nat: 20 },
            ..Default::default()
        };
        m.record_sync(&[before], std::slice::from_ref(&after));
        m.update(true);
        m.connected.set(1);
        let text = m.render();
        for want in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count 0",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 1",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds ",
            "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\"} 20",
            "kpx_dataplane_updates_total{result=\"ack\"} 1",
            "kpx_dataplane_connected 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(text.contains("kubeproxy_network_programming_duration_seconds_count 0"), "{text}");
        // No sync since: nothing more observed.
        m.record_sync(std::slice::from_ref(&after), std::slice::from_ref(&after));
        assert!(m.render().contains("kubeproxy_sync_proxy_rules_duration_seconds_count 1"));
    }

    #[test]
    fn no_local_and_queued_gauges() {
        let m = Metrics::new();
        m.no_local(NoLocal { internal: 2, external: 1 });
        m.queued(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250));
        let text = m.render();
        for want in [
            "# TYPE kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"} 2",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"} 1",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds 1700000000.25",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn change_counters_and_pending() {
        let m = Metrics::new();
        let line = |name: &str| {
            let text = m.render();
            let value = text.lines().find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_string));
            value.unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        };
        m.changes(ChangeCounts { services: 1, endpoints: 3 }, false);
        m.changes(ChangeCounts { services: 0, endpoints: 2 }, false);
        assert_eq!(line("kubeproxy_sync_proxy_rules_endpoint_changes_pending"), "5");
        assert_eq!(line("kubeproxy_sync_proxy_rules_service_changes_pending"), "1");
        m.changes(ChangeCounts { services: 2, endpoints: 1 }, true);
        assert_eq!(line("kubeproxy_sync_proxy_rules_endpoint_changes_pending"), "0");
        assert_eq!(line("kubeproxy_sync_proxy_rules_service_changes_pending"), "0");
        assert_eq!(line("kubeproxy_sync_proxy_rules_endpoint_changes_total"), "6");
        assert_eq!(line("kubeproxy_sync_proxy_rules_service_changes_total"), "3");
    }

    #[test]
    fn network_programming_latency() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_000_000);
        // 1.5 s and 250 ms ago; unknown (0) left out; a start in the future counts as 0.
        assert_eq!(programming_latencies(&[998_500, 999_750, 0, 1_000_400], at), vec![1.5, 0.25, 0.0]);
        let m = Metrics::new();
        m.programmed(&[998_500, 999_750], at);
        let text = m.render();
        for want in [
            "kubeproxy_network_programming_duration_seconds_count 2",
            "kubeproxy_network_programming_duration_seconds_sum 1.75",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"} 1",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"2.0\"} 2",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"300.0\"} 2",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
