//! kube-proxy's `kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy}`: service
//! ports whose Local traffic policy leaves this node without an endpoint to use while the
//! service has endpoints elsewhere, so that their traffic is dropped here. A Local service
//! scheduled away from a node shows up in it; a rising value after a rollout is worth a look.
//!
//! Kept per service and updated for the services an update changed, so a delta costs O(its
//! services), not O(state).

use std::collections::HashMap;

use kpx_proto::v1 as pb;

use crate::state::{AppliedState, ChangeSet, ServiceEntry};

/// Ports without a local endpoint, by traffic policy.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NoLocal {
    /// internalTrafficPolicy Local: traffic to the cluster IP is dropped.
    pub internal: u64,
    /// externalTrafficPolicy Local: node port, external and load-balancer traffic is dropped.
    pub external: u64,
}

/// What one service contributes (pure).
pub fn count(entry: &ServiceEntry) -> NoLocal {
    let s = &entry.service;
    let mut out = NoLocal::default();
    if !s.internal_policy_local && !s.external_policy_local {
        return out;
    }
    let has_ext =
        |p: &pb::ServicePort| p.node_port != 0 || !s.external_ips.is_empty() || !s.load_balancer_ips.is_empty();
    for port in &s.ports {
        let serves = |e: &pb::Endpoint| e.ports.iter().any(|ep| ep.name == port.name && ep.port != 0);
        let eps = || entry.endpoints.values().filter(|e| serves(e));
        if eps().any(|e| e.for_local) {
            continue;
        }
        // Endpoints exist somewhere: the controlplane says so for Local services, and cluster
        // endpoints sent to this node prove it.
        let elsewhere = !s.families_with_endpoints.is_empty() || eps().any(|e| e.for_cluster);
        if !elsewhere {
            continue;
        }
        out.internal += u64::from(s.internal_policy_local);
        out.external += u64::from(s.external_policy_local && has_ext(port));
    }
    out
}

/// The per-service counts and their sum.
#[derive(Debug, Default)]
pub struct NoLocalTracker {
    by_service: HashMap<String, NoLocal>,
    total: NoLocal,
}

impl NoLocalTracker {
    /// Takes in an applied update; returns the new totals.
    pub fn update(&mut self, state: &AppliedState, changes: &ChangeSet) -> NoLocal {
        if changes.full {
            self.by_service.clear();
            self.total = NoLocal::default();
        }
        let keys: Box<dyn Iterator<Item = &String>> =
            if changes.full { Box::new(state.services().keys()) } else { Box::new(changes.services.iter()) };
        for key in keys {
            if let Some(old) = self.by_service.remove(key) {
                self.total.internal -= old.internal;
                self.total.external -= old.external;
            }
            let new = state.services().get(key).map(|e| count(e)).unwrap_or_default();
            if new != NoLocal::default() {
                self.total.internal += new.internal;
                self.total.external += new.external;
                self.by_service.insert(key.clone(), new);
            }
        }
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn entry(itp: bool, etp: bool, node_port: u32, families: &[&str], eps: &[(bool, bool)]) -> ServiceEntry {
        ServiceEntry {
            service: pb::Service {
                namespace: "demo".into(),
                name: "web".into(),
                internal_policy_local: itp,
                external_policy_local: etp,
                families_with_endpoints: families.iter().map(|f| f.to_string()).collect(),
                ports: vec![pb::ServicePort { name: "http".into(), port: 80, node_port, ..Default::default() }],
                ..Default::default()
            },
            endpoints: eps
                .iter()
                .enumerate()
                .map(|(i, (cluster, local))| {
                    let ip = format!("10.244.0.{i}");
                    let ep = pb::Endpoint {
                        service: "demo/web".into(),
                        ip: ip.clone(),
                        ports: vec![pb::EndpointPort { name: "http".into(), port: 8080 }],
                        for_cluster: *cluster,
                        for_local: *local,
                        node_tag: 0,
                    };
                    (ip, ep)
                })
                .collect(),
        }
    }

    #[test]
    fn counts_local_policies_without_a_local_endpoint() {
        // Internal Local, endpoints only elsewhere: dropped here.
        assert_eq!(count(&entry(true, false, 0, &["IPv4"], &[])), NoLocal { internal: 1, external: 0 });
        // A local endpoint: nothing to count.
        assert_eq!(count(&entry(true, true, 30080, &["IPv4"], &[(false, true)])), NoLocal::default());
        // No endpoint anywhere: rejected, not dropped, and not counted (as kube-proxy).
        assert_eq!(count(&entry(true, true, 30080, &[], &[])), NoLocal::default());
        // External Local with a node port, cluster endpoints only.
        assert_eq!(
            count(&entry(false, true, 30080, &["IPv4"], &[(true, false)])),
            NoLocal { internal: 0, external: 1 }
        );
        // External Local without anything external (a ClusterIP service): no external traffic.
        assert_eq!(count(&entry(false, true, 0, &["IPv4"], &[(true, false)])), NoLocal::default());
        // Cluster policies never count.
        assert_eq!(count(&entry(false, false, 30080, &["IPv4"], &[])), NoLocal::default());
    }

    #[test]
    fn tracker_follows_snapshots_and_deltas() {
        let snap = |services: Vec<ServiceEntry>| {
            let map = services.into_iter().map(|e| (format!("demo/{}", e.service.name), Arc::new(e))).collect();
            AppliedState::from_services(&map)
        };
        let named =
            |name: &str, e: ServiceEntry| ServiceEntry { service: pb::Service { name: name.into(), ..e.service }, ..e };
        let mut t = NoLocalTracker::default();
        let st = snap(vec![
            named("a", entry(true, false, 0, &["IPv4"], &[])),
            named("b", entry(true, true, 30080, &["IPv4"], &[])),
        ]);
        let full = ChangeSet { full: true, services: st.services().keys().cloned().collect() };
        assert_eq!(t.update(&st, &full), NoLocal { internal: 2, external: 1 });
        // b gets a local endpoint; a is removed.
        let st = snap(vec![named("b", entry(true, true, 30080, &["IPv4"], &[(false, true)]))]);
        let delta = ChangeSet { full: false, services: ["demo/a".to_string(), "demo/b".to_string()].into() };
        assert_eq!(t.update(&st, &delta), NoLocal::default());
    }
}
