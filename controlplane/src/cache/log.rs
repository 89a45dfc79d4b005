//! The change log: what each change did to each class of nodes, kept for a bounded window so
//! that a node that is behind (busy applying, or reconnecting) gets one merged delta from the
//! point it has reached instead of a snapshot or a queue of every intermediate version.

use crate::model::ServiceKey;
use crate::node_view::SharedService;
use crate::node_view::{NodeInfo, ViewClass};
use kpx_proto::v1 as pb;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// What one change did to the state of every node of one view class.
#[derive(Debug, Default)]
pub struct ClassDiff {
    /// The Service entry was added or changed.
    pub service: Option<Arc<SharedService>>,
    /// The service is gone (its endpoints go with it on the node).
    pub service_removed: bool,
    pub endpoints_upserted: Vec<pb::Endpoint>,
    /// IPs of endpoints that left this class's view.
    pub endpoints_removed: Vec<String>,
}

impl ClassDiff {
    pub fn is_empty(&self) -> bool {
        self.service.is_none()
            && !self.service_removed
            && self.endpoints_upserted.is_empty()
            && self.endpoints_removed.is_empty()
    }
}

/// How nodes were classed for one change: the union of the old and new service's classing,
/// so that every node of a class saw the same transition.
#[derive(Debug, Default, Clone)]
pub struct Classing {
    pub special_nodes: BTreeSet<String>,
    pub zone_dependent: bool,
}

impl Classing {
    pub fn class_of(&self, node: &NodeInfo) -> ViewClass {
        if self.special_nodes.contains(&node.name) {
            ViewClass::Node(node.name.clone())
        } else if self.zone_dependent {
            ViewClass::Zone(node.zone.clone())
        } else {
            ViewClass::All
        }
    }
}

#[derive(Debug)]
pub struct LogEntry {
    pub seq: u64,
    pub service: ServiceKey,
    pub classing: Classing,
    pub diffs: HashMap<ViewClass, Arc<ClassDiff>>,
    pub cause: Option<pb::TraceContext>,
    /// When the change was published (for the change-to-ack latency metric).
    pub at: Instant,
}

#[derive(Debug)]
pub struct ChangeLog {
    entries: VecDeque<LogEntry>,
    capacity: usize,
    /// Changes at or before this sequence number are no longer in the log.
    horizon: u64,
}

impl ChangeLog {
    pub fn new(capacity: usize) -> Self {
        ChangeLog { entries: VecDeque::new(), capacity: capacity.max(1), horizon: 0 }
    }

    pub fn push(&mut self, entry: LogEntry) {
        if self.entries.len() == self.capacity
            && let Some(old) = self.entries.pop_front()
        {
            self.horizon = old.seq;
        }
        self.entries.push_back(entry);
    }

    /// Forgets everything (after the node set or classing changed wholesale).
    pub fn truncate_all(&mut self, head: u64) {
        self.entries.clear();
        self.horizon = head;
    }

    /// Merges every change after `since` as seen by `node` into one delta, or None when the
    /// log no longer reaches back that far (the node then needs a snapshot).
    pub fn delta_since(&self, since: u64, node: &NodeInfo) -> Option<MergedDelta> {
        if since < self.horizon {
            return None;
        }
        let start = self.entries.partition_point(|e| e.seq <= since);
        let mut merged = MergedDelta::default();
        for entry in self.entries.range(start..) {
            let class = entry.classing.class_of(node);
            let diff = entry.diffs.get(&class)?;
            merged.add(&entry.service, diff);
            if !diff.is_empty() {
                merged.oldest_change.get_or_insert(entry.at);
            }
            if let Some(cause) = &entry.cause
                && merged.causes.len() < MAX_CAUSES
            {
                merged.causes.push(cause.clone());
            }
        }
        Some(merged)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Coalesced updates carry at most this many trace contexts.
pub const MAX_CAUSES: usize = 32;

#[derive(Debug, Default)]
struct ServiceOps {
    removed: bool,
    upsert: Option<Arc<SharedService>>,
}

/// Several changes folded into one delta. Applied on the node in the order the protocol sets
/// (service removals, endpoint removals, service upserts, endpoint upserts), it has the same
/// effect as applying each change in turn.
#[derive(Debug, Default)]
pub struct MergedDelta {
    services: BTreeMap<String, ServiceOps>,
    /// (service, ip) -> Some(upsert) or None (remove).
    endpoints: BTreeMap<(String, String), Option<pb::Endpoint>>,
    pub causes: Vec<pb::TraceContext>,
    /// When the oldest change that affects the node was published.
    pub oldest_change: Option<Instant>,
}

impl MergedDelta {
    pub fn add(&mut self, service: &ServiceKey, diff: &ClassDiff) {
        let name = service.to_string();
        if diff.service_removed {
            // The removal drops every endpoint of the service on the node, so earlier endpoint
            // operations no longer matter.
            let stale: Vec<_> = self
                .endpoints
                .range((name.clone(), String::new())..)
                .take_while(|((s, _), _)| *s == name)
                .map(|(k, _)| k.clone())
                .collect();
            for k in stale {
                self.endpoints.remove(&k);
            }
            self.services.insert(name.clone(), ServiceOps { removed: true, upsert: None });
        }
        if let Some(s) = &diff.service {
            self.services.entry(name.clone()).or_default().upsert = Some(s.clone());
        }
        for ip in &diff.endpoints_removed {
            self.endpoints.insert((name.clone(), ip.clone()), None);
        }
        for e in &diff.endpoints_upserted {
            self.endpoints.insert((name.clone(), e.ip.clone()), Some(e.clone()));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.endpoints.is_empty()
    }

    pub fn into_content(self) -> UpdateContent {
        let mut c = UpdateContent { causes: self.causes, oldest_change: self.oldest_change, ..Default::default() };
        for (name, ops) in self.services {
            if ops.removed {
                c.services_removed.push(service_ref(&name));
            }
            if let Some(s) = ops.upsert {
                c.services_upserted.push(s);
            }
        }
        for ((service, ip), op) in self.endpoints {
            match op {
                Some(e) => c.endpoints_upserted.push(e),
                None => c.endpoints_removed.push(pb::EndpointRef { service, ip }),
            }
        }
        c
    }
}

fn service_ref(name: &str) -> pb::ServiceRef {
    let (namespace, name) = name.split_once('/').unwrap_or(("", name));
    pb::ServiceRef { namespace: namespace.to_string(), name: name.to_string() }
}

/// The entries of one update before it is split into wire chunks.
#[derive(Debug, Default)]
pub struct UpdateContent {
    pub services_upserted: Vec<Arc<SharedService>>,
    pub services_removed: Vec<pb::ServiceRef>,
    pub endpoints_upserted: Vec<pb::Endpoint>,
    /// Whole shared views upserted as they are (snapshots): referenced, not copied, so that
    /// planning a snapshot under the cache lock costs O(services), not O(endpoints).
    pub endpoint_views: Vec<Arc<super::ClassView>>,
    pub endpoints_removed: Vec<pb::EndpointRef>,
    pub causes: Vec<pb::TraceContext>,
    /// When the oldest change this update carries was published (deltas only).
    pub oldest_change: Option<Instant>,
}

impl UpdateContent {
    pub fn entry_count(&self) -> usize {
        self.services_upserted.len()
            + self.services_removed.len()
            + self.endpoints_upserted.len()
            + self.endpoint_views.iter().map(|v| v.endpoints.len()).sum::<usize>()
            + self.endpoints_removed.len()
    }

    /// Every upserted endpoint, whether listed or in a shared view.
    pub fn upserted_endpoints(&self) -> impl Iterator<Item = &pb::Endpoint> {
        self.endpoints_upserted.iter().chain(self.endpoint_views.iter().flat_map(|v| v.endpoints.iter()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ServiceKey {
        ServiceKey::new("ns", "web")
    }

    fn ep(ip: &str) -> pb::Endpoint {
        pb::Endpoint { service: "ns/web".into(), ip: ip.into(), for_cluster: true, ..Default::default() }
    }

    fn svc() -> Arc<SharedService> {
        Arc::new(SharedService::new(pb::Service { namespace: "ns".into(), name: "web".into(), ..Default::default() }))
    }

    fn entry(seq: u64, diff: ClassDiff) -> LogEntry {
        LogEntry {
            seq,
            service: key(),
            classing: Classing::default(),
            diffs: HashMap::from([(ViewClass::All, Arc::new(diff))]),
            cause: None,
            at: Instant::now(),
        }
    }

    fn node() -> NodeInfo {
        NodeInfo { name: "n1".into(), zone: None }
    }

    #[test]
    fn removal_then_readd_keeps_only_new_endpoints() {
        let mut log = ChangeLog::new(10);
        log.push(entry(1, ClassDiff { endpoints_upserted: vec![ep("10.0.0.9")], ..Default::default() }));
        log.push(entry(2, ClassDiff { service_removed: true, ..Default::default() }));
        log.push(entry(
            3,
            ClassDiff { service: Some(svc()), endpoints_upserted: vec![ep("10.0.0.1")], ..Default::default() },
        ));
        let c = log.delta_since(0, &node()).unwrap().into_content();
        assert_eq!(c.services_removed.len(), 1, "the node must drop the old endpoints");
        assert_eq!(c.services_upserted.len(), 1);
        assert_eq!(c.endpoints_upserted.iter().map(|e| e.ip.as_str()).collect::<Vec<_>>(), ["10.0.0.1"]);
        assert!(c.endpoints_removed.is_empty());
    }

    #[test]
    fn later_change_to_same_endpoint_wins() {
        let mut log = ChangeLog::new(10);
        log.push(entry(1, ClassDiff { endpoints_upserted: vec![ep("10.0.0.1")], ..Default::default() }));
        log.push(entry(2, ClassDiff { endpoints_removed: vec!["10.0.0.1".into()], ..Default::default() }));
        let c = log.delta_since(0, &node()).unwrap().into_content();
        assert!(c.endpoints_upserted.is_empty());
        assert_eq!(c.endpoints_removed.len(), 1);
        // From after the first change only the removal is left too.
        let c = log.delta_since(1, &node()).unwrap().into_content();
        assert_eq!(c.endpoints_removed.len(), 1);
        assert!(log.delta_since(2, &node()).unwrap().is_empty());
    }

    #[test]
    fn horizon_forces_snapshot() {
        let mut log = ChangeLog::new(2);
        for seq in 1..=3 {
            log.push(entry(seq, ClassDiff { endpoints_upserted: vec![ep("10.0.0.1")], ..Default::default() }));
        }
        assert!(log.delta_since(0, &node()).is_none(), "seq 1 fell out of the log");
        assert!(log.delta_since(1, &node()).is_some());
    }

    #[test]
    fn missing_class_forces_snapshot() {
        let mut log = ChangeLog::new(4);
        let mut e = entry(1, ClassDiff::default());
        e.classing.zone_dependent = true;
        log.push(e);
        assert!(log.delta_since(0, &node()).is_none());
    }
}
