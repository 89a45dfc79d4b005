//! Pure: what one service asks of the userspace proxy in one IP family. For every service port,
//! which listener ("portal") each kind of traffic goes to, or what the filter table does with it
//! when no endpoint can take it; and for every portal, the endpoints it balances over.
//!
//! The semantics are those of the iptables backend (`iptables/render/service.rs`), with a
//! listener where that backend has a KUBE-SVC or KUBE-SVL chain:
//!
//! - a portal balances over one *class* of endpoints: `Cluster` (`for_cluster`) or `Local`
//!   (`for_local`, this node's own under a Local policy);
//! - cluster IP traffic goes to the internal class (Local under internalTrafficPolicy Local);
//!   external IPs, load-balancer IPs and the node port go to the external class (Local under
//!   externalTrafficPolicy Local), except that under externalTrafficPolicy Local, traffic from
//!   pods and from the node itself goes cluster-wide, as kube-proxy routes it;
//! - without endpoints in the class, the traffic is REJECTed when the service has no endpoint
//!   anywhere and DROPped when a Local policy leaves this node without one.
//!
//! A portal exists for every class a service port may use, whether or not it has endpoints
//! now, so that endpoints coming and going never move a listener to another port.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kpx_proto::v1 as pb;

use crate::backend::iptables::render::IpFamily;
use crate::backend::iptables::render::check::{self, Cidr};
use crate::state::ServiceEntry;

/// Which endpoints a portal balances over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    Cluster,
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One listener of the proxy: a service port's traffic of one class, in one family.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortalKey {
    /// "namespace/name".
    pub service: String,
    /// The service port's name ("" for an unnamed port).
    pub port: String,
    pub proto: Proto,
    pub family: IpFamily,
    pub class: Class,
}

/// What a portal does with a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalSpec {
    /// kube-proxy's ServicePortName ("ns/name:port", or "ns/name"): logs and metrics.
    pub name: String,
    /// Sorted, without duplicates.
    pub endpoints: Vec<SocketAddr>,
    /// ClientIP session affinity and its timeout.
    pub affinity: Option<Duration>,
}

/// What the filter table does with traffic no portal takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The service has no endpoint anywhere (in this family): refused at once.
    Reject,
    /// A Local policy leaves this node without an endpoint while others have some.
    Drop,
}

impl Verdict {
    /// (comment suffix, iptables target), as the iptables backend writes them.
    pub fn text(self) -> (&'static str, &'static str) {
        match self {
            Verdict::Reject => ("has no endpoints", "REJECT"),
            Verdict::Drop => ("has no local endpoints", "DROP"),
        }
    }
}

/// Where one kind of traffic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Portal(Class),
    Filter(Verdict),
}

/// The rules of one service port in one family, portals named by class.
#[derive(Debug, Clone)]
pub struct PortPlan {
    /// "namespace/name" of the service.
    pub service: String,
    /// The service port's name.
    pub port_name: String,
    /// kube-proxy's ServicePortName, for comments.
    pub name: String,
    pub proto: Proto,
    pub family: IpFamily,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub external_ips: Vec<IpAddr>,
    pub lb_ips: Vec<IpAddr>,
    pub node_port: Option<u16>,
    /// `loadBalancerSourceRanges` of this family; `Some(empty)` when every range was invalid
    /// (fail closed: nothing is admitted).
    pub ranges: Option<Vec<Cidr>>,
    /// The pod CIDR of this family (pod traffic under externalTrafficPolicy Local).
    pub cluster_cidr: Option<Cidr>,
    /// Cluster IP traffic.
    pub internal: Route,
    /// Traffic to external/LB IPs and the node port (unused without any).
    pub external: Route,
    /// Under externalTrafficPolicy Local: the portal that pod and node traffic to external
    /// destinations goes to instead (the cluster-wide one), when it has endpoints.
    pub external_from_cluster: Option<Class>,
    /// The load-balancer IPs the node itself may reach through the source ranges (kube-proxy's
    /// "allowFromNode": a range admits one of the node's addresses).
    pub lb_from_node: bool,
}

impl PortPlan {
    /// The portal of `class` for this port.
    pub fn portal(&self, class: Class) -> PortalKey {
        PortalKey {
            service: self.service.clone(),
            port: self.port_name.clone(),
            proto: self.proto,
            family: self.family,
            class,
        }
    }

    pub fn has_external(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty() || !self.lb_ips.is_empty()
    }
}

/// Everything one service asks for in one family.
#[derive(Debug, Clone, Default)]
pub struct ServicePlan {
    pub ports: Vec<PortPlan>,
    pub portals: BTreeMap<PortalKey, PortalSpec>,
    /// Why parts of the service were left out.
    pub skipped: Vec<String>,
}

/// What planning needs to know of the node.
#[derive(Debug, Clone, Default)]
pub struct PlanConfig {
    /// Pod CIDRs (any family; the one of the family planned is used).
    pub cluster_cidrs: Vec<String>,
    /// The node's addresses, for the load-balancer source ranges' allowFromNode.
    pub node_ips: Vec<IpAddr>,
}

/// Kubernetes' longest ClientIP affinity (as in the iptables backend).
const MAX_AFFINITY_SECONDS: u32 = 86400;

/// The addresses of `family` in `list`, validated, each kept once.
fn of_family(family: IpFamily, list: &[String], name: &str, skipped: &mut Vec<String>) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for a in list {
        match check::ip(a) {
            Ok(ip) if family.matches(ip) && !out.contains(&ip) => out.push(ip),
            Ok(_) => {}
            Err(e) => skipped.push(format!("{name}: {e}")),
        }
    }
    out
}

/// Plans `entry` for `family`. A service without a cluster IP of that family plans nothing
/// (it is the other family's).
pub fn plan_service(cfg: &PlanConfig, family: IpFamily, entry: &ServiceEntry) -> ServicePlan {
    let mut plan = ServicePlan::default();
    let s = &entry.service;
    let svc_name = check::printable(&format!("{}/{}", s.namespace, s.name));
    let real: Vec<String> = s.cluster_ips.iter().filter(|ip| !ip.is_empty() && *ip != "None").cloned().collect();
    let mut skips = Vec::new();
    let Some(cluster_ip) = of_family(family, &real, &svc_name, &mut skips).first().copied() else {
        if skips.len() == real.len() {
            plan.skipped.extend(skips.into_iter().map(|e| format!("{e} (cluster IP)")));
        }
        return plan;
    };
    let external_ips = of_family(family, &s.external_ips, &svc_name, &mut plan.skipped);
    let lb_ips = of_family(family, &s.load_balancer_ips, &svc_name, &mut plan.skipped);
    let mut ranges = Vec::new();
    let mut invalid_range = false;
    for r in &s.load_balancer_source_ranges {
        match Cidr::parse(r) {
            Ok(c) if c.family() == family => ranges.push(c),
            Ok(_) => {}
            Err(e) => {
                invalid_range = true;
                plan.skipped.push(format!("{svc_name}: {e}"));
            }
        }
    }
    let ranges = (!ranges.is_empty() || invalid_range).then_some(ranges);
    let cluster_cidr =
        cfg.cluster_cidrs.iter().filter_map(|c| Cidr::parse(c.trim()).ok()).find(|c| c.family() == family);
    let lb_from_node = ranges.as_ref().is_some_and(|r| r.iter().any(|c| cfg.node_ips.iter().any(|ip| c.contains(*ip))));
    let affinity = (s.session_affinity_timeout_seconds > 0)
        .then(|| Duration::from_secs(u64::from(s.session_affinity_timeout_seconds.min(MAX_AFFINITY_SECONDS))));
    let mut seen = Vec::new();
    for port in &s.ports {
        let proto = match port.protocol() {
            pb::Protocol::Tcp => Proto::Tcp,
            pb::Protocol::Udp => Proto::Udp,
            other => {
                plan.skipped.push(format!("{svc_name}: port {:?}: {other:?} is not proxied in userspace", port.name));
                continue;
            }
        };
        if seen.contains(&(&port.name, proto)) {
            plan.skipped.push(format!("{svc_name}: port {:?}: duplicate port name", check::printable(&port.name)));
            continue;
        }
        let (p, node_port) = match (check::port(port.port, "port"), node_port(port.node_port)) {
            (Ok(p), Ok(np)) => (p, np),
            (Err(e), _) | (_, Err(e)) => {
                plan.skipped.push(format!("{svc_name}: port {:?}: {e}", check::printable(&port.name)));
                continue;
            }
        };
        seen.push((&port.name, proto));
        let name = if port.name.is_empty() { svc_name.clone() } else { format!("{svc_name}:{}", port.name) };
        let eps = endpoints(entry, family, &port.name, &name, &mut plan.skipped);
        let has = |class: Class| eps.iter().any(|(_, c, l)| if class == Class::Cluster { *c } else { *l });
        let (itp, etp) = (s.internal_policy_local, s.external_policy_local);
        let exists_elsewhere = has(Class::Cluster)
            || has(Class::Local)
            || crate::backend::policy::lists_family(&s.families_with_endpoints, family);
        let route = |local: bool| {
            let class = if local { Class::Local } else { Class::Cluster };
            match () {
                _ if has(class) => Route::Portal(class),
                _ if local && exists_elsewhere => Route::Filter(Verdict::Drop),
                _ => Route::Filter(Verdict::Reject),
            }
        };
        let mut pp = PortPlan {
            service: s_key(s),
            port_name: port.name.clone(),
            name: name.clone(),
            proto,
            family,
            cluster_ip,
            port: p,
            external_ips: external_ips.clone(),
            lb_ips: lb_ips.clone(),
            node_port,
            ranges: ranges.clone(),
            cluster_cidr: cluster_cidr.clone(),
            internal: route(itp),
            external: route(etp),
            external_from_cluster: None,
            lb_from_node,
        };
        let mut classes = vec![if itp { Class::Local } else { Class::Cluster }];
        if pp.has_external() {
            classes.push(if etp { Class::Local } else { Class::Cluster });
            if etp {
                classes.push(Class::Cluster);
                pp.external_from_cluster = has(Class::Cluster).then_some(Class::Cluster);
            }
        }
        for class in classes {
            let key = pp.portal(class);
            let mut list: Vec<SocketAddr> = eps
                .iter()
                .filter(|(_, c, l)| if class == Class::Cluster { *c } else { *l })
                .map(|(a, _, _)| *a)
                .collect();
            list.sort();
            list.dedup();
            plan.portals.insert(key, PortalSpec { name: name.clone(), endpoints: list, affinity });
        }
        plan.ports.push(pp);
    }
    plan
}

fn s_key(s: &pb::Service) -> String {
    format!("{}/{}", s.namespace, s.name)
}

fn node_port(n: u32) -> Result<Option<u16>, String> {
    if n == 0 { Ok(None) } else { check::port(n, "node port").map(Some) }
}

/// The endpoints of port `port_name` in `family`: (address, for_cluster, for_local). Invalid
/// ones are reported in `skipped`.
fn endpoints(
    entry: &ServiceEntry,
    family: IpFamily,
    port_name: &str,
    name: &str,
    skipped: &mut Vec<String>,
) -> Vec<(SocketAddr, bool, bool)> {
    let mut out = Vec::new();
    for e in entry.endpoints.values() {
        let ip = match check::ip(&e.ip) {
            Ok(ip) => ip,
            Err(err) => {
                skipped.push(format!("{name}: endpoint: {err}"));
                continue;
            }
        };
        let Some(p) = e.ports.iter().find(|p| p.name == port_name) else { continue };
        match check::port(p.port, "endpoint port") {
            Ok(p) if family.matches(ip) => out.push((SocketAddr::new(ip, p), e.for_cluster, e.for_local)),
            Ok(_) => {}
            Err(err) => skipped.push(format!("{name}: endpoint {}: {err}", check::printable(&e.ip))),
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests;
