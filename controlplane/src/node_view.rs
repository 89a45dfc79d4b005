//! Pure: one Service and its EndpointSlices -> the endpoint entries each node should program.
//!
//! This mirrors kube-proxy's endpoint categorisation (pkg/proxy/topology.go): per node, the
//! *cluster* set (ready endpoints, narrowed by topology hints; serving-terminating ones when no
//! endpoint is ready) and the *local* set (this node's ready endpoints, or its
//! serving-terminating ones when it has no ready one).
//!
//! Most nodes see the same thing, so a [`PreparedService`] also says which nodes can share a
//! view ([`ViewClass`]): every node when nothing depends on the node, one view per zone when
//! zone hints are in use, and a view of its own only for the few nodes that host a local
//! endpoint or are named by node hints. The cache computes one view per class, not per node.
//!
//! Hints are honoured only when the Service asks for topology (`topology_aware`); kube-proxy
//! today honours them whenever every ready endpoint has them, which in practice is the same
//! thing because the EndpointSlice controller only writes hints for such services. Node hints
//! (forNodes, PreferSameNode) take precedence over zone hints, as with kube-proxy's
//! PreferSameTrafficDistribution gate enabled.
//!
//! `for_cluster` means "member of the cluster set". The dataplane uses it for ClusterIP traffic
//! when internalTrafficPolicy is Cluster, for external traffic when externalTrafficPolicy is
//! Cluster, and for traffic from pods and the node itself to a node port, external or
//! load-balancer IP under externalTrafficPolicy Local; under internalTrafficPolicy Local,
//! internal traffic uses the `for_local` endpoints. The cluster set exists whenever one of
//! those applies (kube-proxy's UsesClusterEndpoints), so a service with both policies Local
//! that is reachable from outside still sends every node the cluster set.
//!
//! A node only receives the endpoints it may use, so for a service with a Local policy the
//! Service entry also says in which IP families the service has usable endpoints anywhere
//! (`families_with_endpoints`): a node without local endpoints then drops that traffic, as
//! kube-proxy does, instead of rejecting it as if the service had no endpoints at all.

use crate::model::{self, ServiceKey};
use kpx_proto::v1;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

/// A Service entry as every node gets it, encoded for the wire once (server/chunk.rs).
pub type SharedService = kpx_proto::encoded::Shared<v1::Service>;

/// What the view of a node depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// topology.kubernetes.io/zone of the Node.
    pub zone: Option<String>,
}

/// Nodes with equal classes get identical views of a service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ViewClass {
    /// Every node that is not special sees this view.
    All,
    /// Zone hints are in use: every non-special node of this zone sees this view.
    Zone(Option<String>),
    /// A node whose view is its own (it hosts a local endpoint, or node hints name it).
    Node(String),
}

/// One endpoint of the service, merged from its slices.
#[derive(Clone, Debug)]
struct Merged {
    ip: IpAddr,
    /// Sorted by name.
    ports: Vec<v1::EndpointPort>,
    ready: bool,
    serving_terminating: bool,
    node_name: Option<String>,
    /// `kpx_proto::node_tag` of `node_name` (0 without one), computed once.
    node_tag: u32,
    zone: Option<String>,
    /// Empty when the endpoint has no zone hints (kube-proxy treats an empty list the same).
    zone_hints: BTreeSet<String>,
    node_hints: BTreeSet<String>,
}

impl Merged {
    /// Usable at all: ready, or the serving-terminating fallback.
    fn usable(&self) -> bool {
        self.ready || self.serving_terminating
    }
}

/// How cluster endpoints are narrowed by topology for a node (kube-proxy's topology mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology<'a> {
    None,
    SameZone(&'a str),
    SameNode(&'a str),
}

/// A Service with its endpoints merged from all its slices, ready to be viewed from any node.
#[derive(Clone, Debug)]
pub struct PreparedService {
    pub key: ServiceKey,
    /// The Service entry, the same for every node.
    pub wire: Arc<SharedService>,
    /// Some node's view depends on its zone (the zone hints are usable).
    pub zone_dependent: bool,
    /// Nodes whose view may differ from the other nodes of their zone.
    pub special_nodes: BTreeSet<String>,
    /// "namespace/name", the `service` field of every endpoint entry.
    service_ref: String,
    /// Sorted by IP, one per IP.
    endpoints: Vec<Merged>,
    uses_cluster: bool,
    uses_local: bool,
    /// Every ready endpoint has zone hints (and the service asks for topology).
    zone_hints_usable: bool,
    /// Every ready endpoint has node hints (and the service asks for topology).
    node_hints_usable: bool,
}

impl PreparedService {
    /// Merges the service's slices (any order; both IP families) and works out which nodes
    /// can share a view. An endpoint IP in two slices is kept once (the ready copy preferred).
    pub fn prepare(service: &model::Service, slices: &[&model::EndpointSlice]) -> PreparedService {
        let endpoints = merge(service, slices);
        // kube-proxy's ExternallyAccessible: a node port, an external IP or a load-balancer IP.
        let externally_reachable = service.ports.iter().any(|p| p.node_port != 0)
            || !service.external_ips.is_empty()
            || !service.load_balancer_ips.is_empty();
        // kube-proxy's UsesClusterEndpoints: internal traffic is routed cluster-wide, or the
        // service accepts external traffic at all. Even with both policies Local, pods and the
        // node itself reach a node port or external address through the cluster set (kube-proxy's
        // "short circuit": traffic that starts inside the cluster needs no client-IP keeping),
        // so a node without local endpoints must still know the others.
        let uses_cluster = !service.internal_policy_local || externally_reachable;
        let uses_local = service.internal_policy_local || service.external_policy_local;

        let ready: Vec<&Merged> = endpoints.iter().filter(|e| e.ready).collect();
        let topology = uses_cluster && service.topology_aware && !ready.is_empty();
        let zone_hints_usable = topology && ready.iter().all(|e| !e.zone_hints.is_empty());
        let node_hints_usable = topology && ready.iter().all(|e| !e.node_hints.is_empty());

        let mut special_nodes = BTreeSet::new();
        if uses_local {
            special_nodes.extend(endpoints.iter().filter(|e| e.usable()).filter_map(|e| e.node_name.clone()));
        }
        if node_hints_usable {
            special_nodes.extend(ready.iter().flat_map(|e| e.node_hints.iter().cloned()));
        }

        let mut wire = crate::wire::service(service);
        if uses_local {
            wire.families_with_endpoints = families_with_endpoints(&endpoints);
        }

        PreparedService {
            key: service.key.clone(),
            wire: Arc::new(SharedService::new(wire)),
            zone_dependent: zone_hints_usable,
            special_nodes,
            service_ref: service.key.to_string(),
            endpoints,
            uses_cluster,
            uses_local,
            zone_hints_usable,
            node_hints_usable,
        }
    }

    /// Which nodes share a view: nodes with equal classes get identical views.
    pub fn class_of(&self, node: &NodeInfo) -> ViewClass {
        if self.special_nodes.contains(&node.name) {
            ViewClass::Node(node.name.clone())
        } else if self.zone_dependent {
            ViewClass::Zone(node.zone.clone())
        } else {
            ViewClass::All
        }
    }

    /// The endpoint entries of this service for a node of the given class, sorted by IP; only
    /// endpoints with `for_cluster || for_local`.
    ///
    /// A `Node` class carries no zone, so when the view of a special node depends on its zone,
    /// the zone is the one its own endpoints report (the EndpointSlice controller copies it from
    /// the Node, and it is what the zone hints were computed from).
    pub fn view_for_class(&self, class: &ViewClass) -> Vec<v1::Endpoint> {
        match class {
            ViewClass::All => self.view_of(None, None),
            ViewClass::Zone(zone) => self.view_of(None, zone.as_deref()),
            ViewClass::Node(name) => {
                let zone = self.endpoints.iter().find(|e| e.node_name.as_ref() == Some(name) && e.zone.is_some());
                self.view_of(Some(name), zone.and_then(|e| e.zone.as_deref()))
            }
        }
    }

    pub fn view(&self, node: &NodeInfo) -> Vec<v1::Endpoint> {
        self.view_for_class(&self.class_of(node))
    }

    /// The view of a node with this name (None: a node that hosts nothing and is named by no
    /// hint) and zone.
    fn view_of(&self, node: Option<&str>, zone: Option<&str>) -> Vec<v1::Endpoint> {
        let cluster = if self.uses_cluster { self.cluster_set(node, zone) } else { Vec::new() };
        let local = match node {
            Some(node) if self.uses_local => self.local_set(node),
            _ => Vec::new(),
        };
        self.endpoints
            .iter()
            .zip(cluster.iter().copied().chain(std::iter::repeat(false)))
            .zip(local.iter().copied().chain(std::iter::repeat(false)))
            .filter(|((_, c), l)| *c || *l)
            .map(|((e, for_cluster), for_local)| v1::Endpoint {
                service: self.service_ref.clone(),
                ip: e.ip.to_string(),
                ports: e.ports.clone(),
                for_cluster,
                for_local,
                node_tag: e.node_tag,
            })
            .collect()
    }

    fn topology<'a>(&self, node: Option<&'a str>, zone: Option<&'a str>) -> Topology<'a> {
        let ready = || self.endpoints.iter().filter(|e| e.ready);
        if self.node_hints_usable
            && let Some(node) = node
            && ready().any(|e| e.node_hints.contains(node))
        {
            return Topology::SameNode(node);
        }
        if self.zone_hints_usable
            && let Some(zone) = zone
            && ready().any(|e| e.zone_hints.contains(zone))
        {
            return Topology::SameZone(zone);
        }
        Topology::None
    }

    /// Membership in the cluster set, per endpoint.
    fn cluster_set(&self, node: Option<&str>, zone: Option<&str>) -> Vec<bool> {
        let topology = self.topology(node, zone);
        let in_topology = |e: &Merged| match topology {
            Topology::None => true,
            Topology::SameZone(zone) => e.zone_hints.contains(zone),
            Topology::SameNode(node) => e.node_hints.contains(node),
        };
        let set: Vec<bool> = self.endpoints.iter().map(|e| e.ready && in_topology(e)).collect();
        if set.contains(&true) {
            return set;
        }
        // A topology mode is only chosen when it keeps a ready endpoint, so this fallback
        // happens when no endpoint is ready anywhere.
        self.endpoints.iter().map(|e| e.serving_terminating).collect()
    }

    /// Membership in the local set of `node`, per endpoint.
    fn local_set(&self, node: &str) -> Vec<bool> {
        let here = |e: &Merged| e.node_name.as_deref() == Some(node);
        if self.endpoints.iter().any(|e| here(e) && e.ready) {
            self.endpoints.iter().map(|e| here(e) && e.ready).collect()
        } else {
            self.endpoints.iter().map(|e| here(e) && e.serving_terminating).collect()
        }
    }
}

/// The IP families ("IPv4", "IPv6"; sorted, once each) in which some endpoint is usable,
/// wherever it runs: what lets a node without local endpoints of a Local service tell "none
/// here" (drop, like kube-proxy) from "none anywhere" (reject).
fn families_with_endpoints(endpoints: &[Merged]) -> Vec<String> {
    let families: BTreeSet<&str> =
        endpoints.iter().filter(|e| e.usable()).map(|e| if e.ip.is_ipv4() { "IPv4" } else { "IPv6" }).collect();
    families.into_iter().map(str::to_string).collect()
}

/// The service's endpoints from all its slices, one per IP, sorted by IP. The first occurrence
/// (slices in key order) wins unless a later one is ready and it is not.
fn merge(service: &model::Service, slices: &[&model::EndpointSlice]) -> Vec<Merged> {
    let mut slices: Vec<&model::EndpointSlice> = slices.to_vec();
    slices.sort_by(|a, b| a.key.cmp(&b.key));
    let mut by_ip: BTreeMap<IpAddr, Merged> = BTreeMap::new();
    for slice in slices {
        // The target port of each service port, as this slice resolves it (named targetPorts
        // can resolve differently for different pods, hence per slice).
        let mut ports: Vec<v1::EndpointPort> = service
            .ports
            .iter()
            .filter_map(|sp| {
                let p = slice.ports.iter().find(|p| p.name == sp.name && p.protocol == sp.protocol)?;
                Some(v1::EndpointPort { name: sp.name.clone(), port: p.port.into() })
            })
            .collect();
        ports.sort_by(|a, b| a.name.cmp(&b.name));
        for ep in &slice.endpoints {
            let merged = Merged {
                ip: ep.ip,
                ports: ports.clone(),
                ready: ep.ready,
                serving_terminating: ep.serving && ep.terminating,
                node_tag: ep.node_name.as_deref().map_or(0, kpx_proto::node_tag),
                node_name: ep.node_name.clone(),
                zone: ep.zone.clone(),
                zone_hints: ep.zone_hints.iter().flatten().cloned().collect(),
                node_hints: ep.node_hints.iter().flatten().cloned().collect(),
            };
            match by_ip.get_mut(&ep.ip) {
                None => {
                    by_ip.insert(ep.ip, merged);
                }
                Some(kept) => {
                    // Normal while the EndpointSlice controller moves an endpoint between
                    // slices (and merged this way by kube-proxy too): not a skip, not a warning.
                    tracing::debug!(ip = %ep.ip, service = %service.key, slice = %slice.key, "endpoint in two slices");
                    if merged.ready && !kept.ready {
                        *kept = merged;
                    }
                }
            }
        }
    }
    by_ip.into_values().collect()
}

#[cfg(test)]
mod tests;
