//! The proxy's own view of a cluster: Services, EndpointSlices and Nodes reduced to what a
//! service proxy needs. Every source of cluster state (the apiserver, a manifest directory)
//! converts into these types; nothing past this point sees Kubernetes API types.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Mutex;

/// "namespace/name" of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceKey { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for ServiceKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ServiceKey::new(ns, name))
            }
            _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
        }
    }
}

/// "namespace/name" of an EndpointSlice.
pub type SliceKey = ServiceKey;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> IpFamily {
        if ip.is_ipv4() { IpFamily::V4 } else { IpFamily::V6 }
    }
}

/// An address prefix such as 10.0.0.0/8 (loadBalancerSourceRanges).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?} is not a CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} has an invalid prefix length"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServicePort {
    /// "" for a Service's single unnamed port.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// 0 when the port has no NodePort.
    pub node_port: u16,
}

/// A Service that kpx proxies (headless, ExternalName and services handled by another proxy
/// never become one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub key: ServiceKey,
    pub service_type: ServiceType,
    /// One per IP family; never empty.
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<Cidr>,
    pub ports: Vec<ServicePort>,
    /// sessionAffinity ClientIP timeout in seconds (default 10800); None without affinity.
    pub session_affinity_timeout: Option<u32>,
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    /// 0 when unset.
    pub health_check_node_port: u16,
    /// Topology-aware routing is asked for (spec.trafficDistribution, or the
    /// service.kubernetes.io/topology-mode / topology-aware-hints annotation set to Auto): hints
    /// in the EndpointSlices are honoured when every endpoint has them.
    pub topology_aware: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// Matches a ServicePort's name.
    pub name: String,
    pub protocol: Protocol,
    /// The resolved target port for the endpoints of this slice.
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// addresses[0]: every address of one endpoint is fungible, kube-proxy uses the first.
    pub ip: IpAddr,
    /// conditions.ready (nil means true).
    pub ready: bool,
    /// conditions.serving (nil means the same as ready).
    pub serving: bool,
    /// conditions.terminating (nil means false).
    pub terminating: bool,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// hints.forZones; None when the endpoint has no zone hints.
    pub zone_hints: Option<Vec<String>>,
    /// hints.forNodes; None when the endpoint has no node hints.
    pub node_hints: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    pub key: SliceKey,
    /// From the kubernetes.io/service-name label, in the slice's namespace.
    pub service: ServiceKey,
    pub family: IpFamily,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
    /// endpoints.kubernetes.io/last-change-trigger-time, RFC 3339, when present.
    pub trigger_time: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// topology.kubernetes.io/zone
    pub zone: Option<String>,
    /// InternalIP addresses.
    pub addresses: Vec<IpAddr>,
}

/// One change from a source of cluster state. `None` deletes the object (or says it is no
/// longer proxied, e.g. a Service that became headless).
#[derive(Clone, Debug, PartialEq)]
pub enum ClusterEvent {
    Service(ServiceKey, Option<Service>),
    /// The Service exists but kpx does not proxy it (headless, ExternalName, another proxy's, or
    /// invalid): no proxy state, like a delete, but its EndpointSlices are expected and ignored
    /// without a warning (every StatefulSet has a headless Service with slices).
    NotProxied(ServiceKey),
    Slice(SliceKey, Option<EndpointSlice>),
    Node(String, Option<Node>),
    /// Every kind has been listed at least once: the state is complete and may be published.
    Synced,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    Node,
    Manifest,
}

impl ObjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
            ObjectKind::Manifest => "Manifest",
        }
    }
}

/// Why (part of) an object was skipped. A bounded set, so it can be a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    InvalidIp,
    InvalidCidr,
    PortOutOfRange,
    UnknownProtocol,
    DuplicatePort,
    UnknownService,
    MissingServiceLabel,
    UnsupportedAddressType,
    Malformed,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::InvalidIp => "invalid_ip",
            SkipReason::InvalidCidr => "invalid_cidr",
            SkipReason::PortOutOfRange => "port_out_of_range",
            SkipReason::UnknownProtocol => "unknown_protocol",
            SkipReason::DuplicatePort => "duplicate_port",
            SkipReason::UnknownService => "unknown_service",
            SkipReason::MissingServiceLabel => "missing_service_label",
            SkipReason::UnsupportedAddressType => "unsupported_address_type",
            SkipReason::Malformed => "malformed",
        }
    }
}

/// Counts what was skipped from bad input, and logs each skip naming the object.
#[derive(Debug, Default)]
pub struct Skips {
    counts: Mutex<BTreeMap<(ObjectKind, SkipReason), u64>>,
}

impl Skips {
    pub fn record(&self, kind: ObjectKind, object: &dyn fmt::Display, reason: SkipReason, detail: &dyn fmt::Display) {
        tracing::warn!(kind = kind.as_str(), object = %object, reason = reason.as_str(), "skipped: {detail}");
        *self.counts.lock().expect("skip counter poisoned").entry((kind, reason)).or_default() += 1;
    }

    pub fn count(&self, kind: ObjectKind, reason: SkipReason) -> u64 {
        self.counts.lock().expect("skip counter poisoned").get(&(kind, reason)).copied().unwrap_or(0)
    }

    pub fn snapshot(&self) -> BTreeMap<(ObjectKind, SkipReason), u64> {
        self.counts.lock().expect("skip counter poisoned").clone()
    }

    pub fn total(&self) -> u64 {
        self.counts.lock().expect("skip counter poisoned").values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_key_parses_and_prints() {
        let k: ServiceKey = "default/web".parse().unwrap();
        assert_eq!(k, ServiceKey::new("default", "web"));
        assert_eq!(k.to_string(), "default/web");
        assert!("web".parse::<ServiceKey>().is_err());
        assert!("a/b/c".parse::<ServiceKey>().is_err());
        assert!("/b".parse::<ServiceKey>().is_err());
    }

    #[test]
    fn cidr_parses_and_checks_prefix() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8");
        assert_eq!("fd00::1".parse::<Cidr>().unwrap().prefix, 128);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn skips_are_counted_by_kind_and_reason() {
        let s = Skips::default();
        s.record(ObjectKind::Service, &"ns/a", SkipReason::InvalidIp, &"bad");
        s.record(ObjectKind::Service, &"ns/b", SkipReason::InvalidIp, &"bad");
        assert_eq!(s.count(ObjectKind::Service, SkipReason::InvalidIp), 2);
        assert_eq!(s.count(ObjectKind::Node, SkipReason::InvalidIp), 0);
        assert_eq!(s.total(), 2);
    }
}
