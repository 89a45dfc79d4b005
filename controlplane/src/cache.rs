//! Versioned per-node desired state, shared wherever nodes see the same thing.
//!
//! The cache holds the cluster model, a prepared form of every proxied service, and for each
//! node the content version of its desired state. A service's view is computed once per *view
//! class* (every node, one zone, or one node that hosts endpoints under a Local policy), so a
//! change costs one computation per class plus an O(1) version update per affected node. What
//! each change did to each class is kept in a bounded [`log::ChangeLog`]; a node that is behind
//! gets one merged delta from its last acknowledged point, which is how slow nodes coalesce and
//! how reconnecting nodes avoid snapshots.
//!
//! The gRPC server only talks to the cache through [`Cache`]'s methods.

mod inspect;
pub use inspect::InspectError;
pub mod log;
mod track;

use crate::model::{ClusterEvent, EndpointSlice, Node, ObjectKind, Service, ServiceKey, SkipReason, Skips, SliceKey};
use crate::node_view::{NodeInfo, PreparedService, ViewClass};
use kpx_proto::v1 as pb;
use kpx_proto::version::{self, ContentHash, EntryHash};
use log::{ChangeLog, ClassDiff, Classing, LogEntry, UpdateContent};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;
use track::NodeTrack;
pub use track::{ConnId, Planned, Subscription};

#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// How many changes the log keeps for catching nodes up with deltas.
    pub log_capacity: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { log_capacity: 50_000 }
    }
}

/// One update decided for a node, before it is split into wire chunks.
#[derive(Debug)]
pub struct PlannedUpdate {
    pub nonce: u64,
    pub version: ContentHash,
    pub base_version: Option<ContentHash>,
    pub full: bool,
    pub content: UpdateContent,
    /// Not an update but a request for the node's digest (no version, no entries).
    pub send_digest: bool,
}

/// What a node runs, service by service (from its Digest): the base of a delta when the node
/// reported a version this controlplane does not know.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeDigest {
    /// The version the node says it runs; equal to the sum of `services`.
    pub version: ContentHash,
    pub services: HashMap<ServiceKey, ContentHash>,
}

impl NodeDigest {
    /// Whether the sums add up to the version.
    pub fn is_consistent(&self) -> bool {
        let mut total = ContentHash::EMPTY;
        self.services.values().for_each(|s| total.apply(ContentHash::EMPTY, *s));
        total == self.version
    }
}

/// A service prepared for viewing, with its per-class views memoised.
struct ServiceEntry {
    prepared: PreparedService,
    service_hash: EntryHash,
    views: Mutex<HashMap<ViewClass, Arc<ClassView>>>,
}

/// The endpoint entries one view class of nodes gets for a service; shared by every node of
/// the class and by every snapshot that includes it.
#[derive(Debug)]
pub struct ClassView {
    pub endpoints: Vec<pb::Endpoint>,
    /// Service entry + endpoint entries: this class's contribution to a node's version.
    pub sum: ContentHash,
    /// The endpoints encoded for the wire, once for every node of the class (server/chunk.rs);
    /// dropped with the view when the service or its endpoints change.
    pub wire: std::sync::OnceLock<crate::server::ViewSegments>,
}

impl ClassView {
    pub fn new(endpoints: Vec<pb::Endpoint>, sum: ContentHash) -> Self {
        ClassView { endpoints, sum, wire: std::sync::OnceLock::new() }
    }
}

impl ServiceEntry {
    fn new(prepared: PreparedService) -> Self {
        let service_hash = version::service_hash(&prepared.wire);
        ServiceEntry { prepared, service_hash, views: Mutex::new(HashMap::new()) }
    }

    fn is_uniform(&self) -> bool {
        !self.prepared.zone_dependent && self.prepared.special_nodes.is_empty()
    }

    fn view(&self, class: &ViewClass) -> Arc<ClassView> {
        let mut views = self.views.lock().expect("view memo poisoned");
        if let Some(v) = views.get(class) {
            return v.clone();
        }
        let endpoints = self.prepared.view_for_class(class);
        let mut sum = ContentHash::from(self.service_hash);
        for e in &endpoints {
            sum.add(version::endpoint_hash(e));
        }
        let v = Arc::new(ClassView::new(endpoints, sum));
        views.insert(class.clone(), v.clone());
        v
    }
}

#[derive(Default)]
struct State {
    synced: bool,
    services: HashMap<ServiceKey, Service>,
    /// Services that exist but are not proxied.
    not_proxied: HashSet<ServiceKey>,
    slices: HashMap<SliceKey, EndpointSlice>,
    slices_by_service: HashMap<ServiceKey, BTreeSet<SliceKey>>,
    k8s_nodes: HashMap<String, Node>,
    entries: BTreeMap<ServiceKey, Arc<ServiceEntry>>,
    /// Services whose view differs between nodes; every other service adds the same to every
    /// node's version, summed in `uniform_sum`.
    non_uniform: BTreeSet<ServiceKey>,
    uniform_sum: ContentHash,
    log: Option<ChangeLog>,
    head: u64,
    nodes: BTreeMap<String, NodeTrack>,
}

pub struct Cache {
    state: Mutex<State>,
    skips: Arc<Skips>,
    synced: watch::Sender<bool>,
    /// Carries the log head; bumped whenever a change is published.
    changes: watch::Sender<u64>,
    nonce: AtomicU64,
    conn_ids: AtomicU64,
    metrics: crate::metrics::Metrics,
}

impl Cache {
    pub fn new(skips: Arc<Skips>, config: CacheConfig) -> Arc<Cache> {
        let state = State { log: Some(ChangeLog::new(config.log_capacity)), ..Default::default() };
        Arc::new(Cache {
            state: Mutex::new(state),
            skips,
            synced: watch::channel(false).0,
            changes: watch::channel(0).0,
            // Nonces only need to be unique per stream; starting from the clock keeps them from
            // repeating across restarts, which makes logs easier to read.
            nonce: AtomicU64::new(now_ms() as u64 * 1000),
            conn_ids: AtomicU64::new(1),
            metrics: crate::metrics::Metrics::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("cache state poisoned")
    }

    /// The controlplane's Prometheus metrics.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    pub fn skips(&self) -> &Arc<Skips> {
        &self.skips
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Resolves once the source has listed everything and the cache publishes.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// The sequence number of the newest change.
    pub fn head(&self) -> u64 {
        self.lock().head
    }

    /// Applies one event from the source of cluster state. `cause` is the trace context of the
    /// change, carried to every node it reaches.
    pub fn apply(&self, event: ClusterEvent, cause: Option<pb::TraceContext>) {
        let mut st = self.lock();
        let head = st.head;
        self.apply_locked(&mut st, event, cause);
        if st.head != head {
            self.changes.send_replace(st.head);
        }
    }

    fn apply_locked(&self, st: &mut State, event: ClusterEvent, cause: Option<pb::TraceContext>) {
        match event {
            ClusterEvent::Synced => {
                if !st.synced {
                    st.publish_all(&self.skips);
                    self.synced.send_replace(true);
                    self.changes.send_replace(st.head);
                }
            }
            ClusterEvent::NotProxied(key) => {
                st.not_proxied.insert(key.clone());
                st.services.remove(&key);
                st.recompute(&key, cause);
            }
            ClusterEvent::Service(key, svc) => {
                st.not_proxied.remove(&key);
                match svc {
                    Some(s) => st.services.insert(key.clone(), s),
                    None => st.services.remove(&key),
                };
                st.recompute(&key, cause);
            }
            ClusterEvent::Slice(key, slice) => {
                let old_service = st.slices.get(&key).map(|s| s.service.clone());
                if let Some(old) = &old_service
                    && let Some(set) = st.slices_by_service.get_mut(old)
                {
                    set.remove(&key);
                    if set.is_empty() {
                        st.slices_by_service.remove(old);
                    }
                }
                let new_service = slice.as_ref().map(|s| s.service.clone());
                match slice {
                    Some(s) => {
                        st.slices_by_service.entry(s.service.clone()).or_default().insert(key.clone());
                        if st.synced && !st.knows(&s.service) {
                            self.skips.record(
                                ObjectKind::EndpointSlice,
                                &key,
                                SkipReason::UnknownService,
                                &format_args!("service {} does not exist (yet)", s.service),
                            );
                        }
                        st.slices.insert(key, s);
                    }
                    None => {
                        st.slices.remove(&key);
                    }
                }
                if let Some(old) = &old_service {
                    st.recompute(old, cause.clone());
                }
                if let Some(new) = &new_service
                    && Some(new) != old_service.as_ref()
                {
                    st.recompute(new, cause);
                }
            }
            ClusterEvent::Node(name, node) => st.node_changed(name, node),
        }
    }

    fn next_nonce(&self) -> u64 {
        self.nonce.fetch_add(1, Ordering::Relaxed)
    }
}

impl State {
    fn prepare(&self, key: &ServiceKey) -> Option<Arc<ServiceEntry>> {
        let svc = self.services.get(key)?;
        let slices: Vec<&EndpointSlice> =
            self.slices_by_service.get(key).into_iter().flatten().filter_map(|k| self.slices.get(k)).collect();
        Some(Arc::new(ServiceEntry::new(PreparedService::prepare(svc, &slices))))
    }

    /// Whether the Service exists, proxied or not: slices of a Service kpx does not proxy are
    /// expected (headless ones, another proxy's) and ignored quietly.
    fn knows(&self, key: &ServiceKey) -> bool {
        self.services.contains_key(key) || self.not_proxied.contains(key)
    }

    fn publish_all(&mut self, skips: &Skips) {
        let keys: Vec<ServiceKey> = self.services.keys().cloned().collect();
        for key in keys {
            if let Some(entry) = self.prepare(&key) {
                self.set_entry(key, Some(entry));
            }
        }
        for (slice_key, slice) in &self.slices {
            if !self.knows(&slice.service) {
                skips.record(
                    ObjectKind::EndpointSlice,
                    slice_key,
                    SkipReason::UnknownService,
                    &format_args!("service {} does not exist", slice.service),
                );
            }
        }
        self.synced = true;
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            let version = self.full_version(&self.nodes[&name].info);
            let head = self.head;
            self.nodes.get_mut(&name).expect("listed").published(version, head);
        }
        tracing::info!(services = self.entries.len(), nodes = self.nodes.len(), "cluster state listed; publishing");
    }

    /// Records the new prepared form of a service, keeping the uniform sum in step.
    fn set_entry(&mut self, key: ServiceKey, entry: Option<Arc<ServiceEntry>>) {
        if let Some(old) = self.entries.remove(&key) {
            if old.is_uniform() {
                self.uniform_sum.remove(old.view(&ViewClass::All).sum.into_entry());
            } else {
                self.non_uniform.remove(&key);
            }
        }
        if let Some(new) = entry {
            if new.is_uniform() {
                self.uniform_sum.add(new.view(&ViewClass::All).sum.into_entry());
            } else {
                self.non_uniform.insert(key.clone());
            }
            self.entries.insert(key, new);
        }
    }

    /// A node's version from scratch: O(services that differ between nodes).
    fn full_version(&self, node: &NodeInfo) -> ContentHash {
        let mut v = self.uniform_sum;
        for key in &self.non_uniform {
            let entry = &self.entries[key];
            v.add(entry.view(&entry.prepared.class_of(node)).sum.into_entry());
        }
        v
    }

    fn recompute(&mut self, key: &ServiceKey, cause: Option<pb::TraceContext>) {
        if !self.synced {
            return;
        }
        let old = self.entries.get(key).cloned();
        let new = self.prepare(key);
        if old.is_none() && new.is_none() {
            return;
        }
        let mut classing = Classing::default();
        for e in old.iter().chain(new.iter()) {
            classing.zone_dependent |= e.prepared.zone_dependent;
            classing.special_nodes.extend(e.prepared.special_nodes.iter().cloned());
        }
        let mut diffs: HashMap<ViewClass, (Arc<ClassDiff>, ContentHash, ContentHash)> = HashMap::new();
        let mut class_diff = |class: &ViewClass| {
            diffs.entry(class.clone()).or_insert_with(|| diff_class(old.as_deref(), new.as_deref(), class)).clone()
        };

        // When the view shared by ordinary nodes did not change, only the special nodes are
        // affected: do not even visit the others.
        let only_special = !classing.zone_dependent && class_diff(&ViewClass::All).0.is_empty();
        let head = self.head + 1;
        let mut touched = 0usize;
        let mut visit = |track: &mut NodeTrack| {
            let (diff, old_sum, new_sum) = class_diff(&classing.class_of(&track.info));
            if !diff.is_empty() {
                track.version_changed(old_sum, new_sum);
                touched += 1;
            }
        };
        if only_special {
            for name in &classing.special_nodes {
                if let Some(t) = self.nodes.get_mut(name) {
                    visit(t);
                }
            }
        } else {
            self.nodes.values_mut().for_each(&mut visit);
        }
        let diffs: HashMap<ViewClass, Arc<ClassDiff>> = diffs.into_iter().map(|(c, (d, _, _))| (c, d)).collect();
        let changed = diffs.values().any(|d| !d.is_empty());
        self.set_entry(key.clone(), new);
        if changed {
            self.head = head;
            let at = std::time::Instant::now();
            let entry = LogEntry { seq: head, service: key.clone(), classing, diffs, cause, at };
            self.log.as_mut().expect("log").push(entry);
            tracing::debug!(service = %key, seq = head, nodes = touched, "service changed");
        }
    }

    fn node_changed(&mut self, name: String, node: Option<Node>) {
        match node {
            Some(n) => {
                let zone = n.zone.clone();
                self.k8s_nodes.insert(name.clone(), n);
                let synced = self.synced;
                if !self.nodes.contains_key(&name) {
                    self.nodes
                        .insert(name.clone(), NodeTrack::new(NodeInfo { name: name.clone(), zone: zone.clone() }));
                    if synced {
                        let v = self.full_version(&self.nodes[&name].info);
                        let head = self.head;
                        self.nodes.get_mut(&name).expect("inserted").published(v, head);
                    }
                }
                let track = self.nodes.get_mut(&name).expect("tracked");
                track.known_node = true;
                if track.info.zone != zone {
                    track.info.zone = zone;
                    if synced {
                        let v = self.full_version(&self.nodes[&name].info);
                        self.nodes.get_mut(&name).expect("tracked").zone_changed(v);
                    }
                }
            }
            None => {
                self.k8s_nodes.remove(&name);
                if let Some(track) = self.nodes.get_mut(&name) {
                    track.known_node = false;
                    if !track.is_connected() {
                        self.nodes.remove(&name);
                    }
                }
            }
        }
    }
}

/// What a change from `old` to `new` does to the view of one class, and the class's version
/// contribution before and after.
fn diff_class(
    old: Option<&ServiceEntry>,
    new: Option<&ServiceEntry>,
    class: &ViewClass,
) -> (Arc<ClassDiff>, ContentHash, ContentHash) {
    let old_view = old.map(|e| e.view(class));
    let new_view = new.map(|e| e.view(class));
    let sum = |v: &Option<Arc<ClassView>>| v.as_ref().map(|v| v.sum).unwrap_or_default();
    let (old_sum, new_sum) = (sum(&old_view), sum(&new_view));
    let mut diff = ClassDiff::default();
    match (old, new) {
        (Some(_), None) => diff.service_removed = true,
        (o, Some(n)) => {
            if o.map(|o| o.service_hash) != Some(n.service_hash) {
                diff.service = Some(n.prepared.wire.clone());
            }
            let empty = Vec::new();
            let before = old_view.as_ref().map(|v| &v.endpoints).unwrap_or(&empty);
            let after = &new_view.as_ref().expect("new view").endpoints;
            diff_endpoints(before, after, &mut diff);
        }
        (None, None) => {}
    }
    (Arc::new(diff), old_sum, new_sum)
}

/// Both lists are sorted by IP (node_view's contract).
fn diff_endpoints(before: &[pb::Endpoint], after: &[pb::Endpoint], diff: &mut ClassDiff) {
    let old: HashMap<&str, &pb::Endpoint> = before.iter().map(|e| (e.ip.as_str(), e)).collect();
    let new: HashMap<&str, &pb::Endpoint> = after.iter().map(|e| (e.ip.as_str(), e)).collect();
    for e in before {
        if !new.contains_key(e.ip.as_str()) {
            diff.endpoints_removed.push(e.ip.clone());
        }
    }
    for e in after {
        if old.get(e.ip.as_str()) != Some(&e) {
            diff.endpoints_upserted.push(e.clone());
        }
    }
}

trait IntoEntry {
    fn into_entry(self) -> EntryHash;
}

impl IntoEntry for ContentHash {
    fn into_entry(self) -> EntryHash {
        EntryHash(self.0)
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
