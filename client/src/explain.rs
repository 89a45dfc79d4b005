//! `kpxctl explain`: where a packet to DST:PORT/PROTO goes on a node, and why.
//!
//! A pure function of the node's desired state (GetNodeState) and what the user knows about the
//! packet and the node. It follows what the iptables backend programs
//! (dataplane/src/backend/iptables/render/service.rs; the nftables backend, dataplane/src/backend/
//! nftables/render.rs, makes the same decisions with verdict maps and kube-proxy's nftables chain
//! names): which chain a destination enters, which
//! endpoints that chain picks (`for_cluster` or `for_local`), when the packet is marked for
//! masquerade, and what the filter table does with traffic no chain DNATs.

use kpx_proto::v1::{Endpoint, NodeState, Protocol, Service, ServicePort};
use serde::Serialize;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// `DST:PORT/PROTO`: `10.96.0.10:80/tcp`, `[fd00::10]:80/udp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, proto) = s
            .rsplit_once('/')
            .ok_or_else(|| format!("expected DST:PORT/PROTO (IPv6 as [ADDR]:PORT/PROTO), got {s:?}"))?;
        let protocol = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            _ => return Err(format!("unknown protocol {proto:?} (tcp, udp or sctp)")),
        };
        let sa: SocketAddr =
            addr.parse().map_err(|_| format!("expected ADDR:PORT or [IPV6]:PORT before /{proto}, got {addr:?}"))?;
        if sa.port() == 0 {
            return Err("port 0 is not a service port".to_string());
        }
        Ok(Target { ip: sa.ip(), port: sa.port(), protocol })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", SocketAddr::new(self.ip, self.port), proto_name(self.protocol))
    }
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
        Protocol::Unspecified => "-",
    }
}

/// An IP prefix such as 10.244.0.0/16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("expected a CIDR such as 10.244.0.0/16, got {s:?}");
        let (a, l) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let len: u8 = l.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(bad());
        }
        Ok(Cidr { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let prefix = |bits: u128, width: u32| if self.len == 0 { 0 } else { bits >> (width - u32::from(self.len)) };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                prefix(u128::from(u32::from(a)), 32) == prefix(u128::from(u32::from(b)), 32)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => prefix(u128::from(a), 128) == prefix(u128::from(b), 128),
            _ => false,
        }
    }
}

/// What the user knows about the packet and the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub dst: Target,
    pub src: Option<IpAddr>,
    /// The node's addresses that accept NodePorts; empty when unknown (every local address).
    pub node_ips: Vec<IpAddr>,
    /// The pod CIDR(s) the dataplane masquerades around; empty when unknown.
    pub cluster_cidrs: Vec<Cidr>,
    /// The dataplane runs with --masquerade-all.
    pub masquerade_all: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    /// DNAT to one of the candidate endpoints.
    Dnat,
    /// The service has no endpoints (for this traffic, and none elsewhere under a Local
    /// policy): REJECT.
    Reject,
    /// Local policy with no local endpoints while the service has some on other nodes, or a
    /// source outside loadBalancerSourceRanges.
    Drop,
    /// Not a service address: kpx has no rule, the packet is routed normally.
    NoRule,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AddressKind {
    ClusterIp,
    ExternalIp,
    LoadBalancerIp,
    NodePort,
}

impl AddressKind {
    fn describe(self) -> &'static str {
        match self {
            AddressKind::ClusterIp => "cluster IP",
            AddressKind::ExternalIp => "external IP",
            AddressKind::LoadBalancerIp => "load-balancer IP",
            AddressKind::NodePort => "node port",
        }
    }
}

/// Whether the packet's source is rewritten to the node's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Masquerade {
    Yes,
    No,
    /// Depends on what the client does not know (the source, the cluster CIDR, which endpoint).
    Maybe,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Matched {
    /// "namespace/name"
    pub service: String,
    /// The ServicePort's name ("" when unnamed).
    pub port_name: String,
    pub port: u32,
    pub node_port: u32,
    pub address_kind: AddressKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    pub ip: String,
    pub target_port: u32,
    pub for_cluster: bool,
    pub for_local: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub node: String,
    pub version: String,
    pub destination: String,
    pub source: Option<String>,
    pub matched: Option<Matched>,
    /// "internal" (cluster IP) or "external" (external IP, load-balancer IP, node port).
    pub traffic_policy: Option<String>,
    /// "Cluster" or "Local".
    pub policy_value: Option<String>,
    /// The endpoints the DNAT picks from (empty unless the verdict is DNAT).
    pub endpoints: Vec<Candidate>,
    /// ClientIP session affinity timeout; 0 when none.
    pub session_affinity_seconds: u32,
    pub masquerade: Masquerade,
    pub masquerade_reason: String,
    pub verdict: Verdict,
    /// One line: "DNAT to one of 3 endpoints", "REJECT: demo/empty has no endpoints", ...
    pub summary: String,
    /// Why, step by step.
    pub reasons: Vec<String>,
}

/// The service's real cluster IP in `ip`'s family; the backend renders nothing (not even the
/// external addresses) for a service without one: headless, or of the other family only.
fn cluster_ip_of_family(svc: &Service, ip: IpAddr) -> Option<IpAddr> {
    svc.cluster_ips.iter().filter_map(|c| c.parse::<IpAddr>().ok()).find(|c| c.is_ipv4() == ip.is_ipv4())
}

fn has_ip(list: &[String], ip: IpAddr) -> bool {
    list.iter().any(|a| a.parse::<IpAddr>().ok() == Some(ip))
}

fn port_matches(p: &ServicePort, t: &Target) -> bool {
    p.protocol() == t.protocol && p.port == u32::from(t.port)
}

fn service_key(svc: &Service) -> String {
    format!("{}/{}", svc.namespace, svc.name)
}

/// Finds the service and port the destination enters: service addresses first (KUBE-SERVICES),
/// node ports last (KUBE-NODEPORTS). Notes near misses in `reasons`.
fn find<'a>(
    state: &'a NodeState,
    q: &Query,
    reasons: &mut Vec<String>,
) -> Option<(&'a Service, &'a [Endpoint], &'a ServicePort, AddressKind)> {
    let t = &q.dst;
    let services = || state.services.iter().filter_map(|s| s.service.as_ref().map(|svc| (svc, &s.endpoints[..])));
    for (svc, eps) in services() {
        let kind = if has_ip(&svc.cluster_ips, t.ip) {
            AddressKind::ClusterIp
        } else if has_ip(&svc.external_ips, t.ip) {
            AddressKind::ExternalIp
        } else if has_ip(&svc.load_balancer_ips, t.ip) {
            AddressKind::LoadBalancerIp
        } else {
            continue;
        };
        if cluster_ip_of_family(svc, t.ip).is_none() {
            reasons.push(format!(
                "{} is a {} of {}, which has no cluster IP of that family (headless?): kpx proxies nothing for it",
                t.ip,
                kind.describe(),
                service_key(svc)
            ));
            continue;
        }
        match svc.ports.iter().find(|p| port_matches(p, t)) {
            Some(p) => return Some((svc, eps, p, kind)),
            None => reasons.push(format!(
                "{} is the {} of {}, but it has no port {}/{}",
                t.ip,
                kind.describe(),
                service_key(svc),
                t.port,
                proto_name(t.protocol)
            )),
        }
    }
    if !q.node_ips.is_empty() && !q.node_ips.contains(&t.ip) {
        return None;
    }
    for (svc, eps) in services() {
        let Some(p) = svc.ports.iter().find(|p| p.node_port == u32::from(t.port) && p.protocol() == t.protocol) else {
            continue;
        };
        if cluster_ip_of_family(svc, t.ip).is_none() {
            continue;
        }
        if q.node_ips.is_empty() {
            reasons.push(format!(
                "{}/{} is a node port; assuming {} is an address of node {} (pass --node-ip to check)",
                t.port,
                proto_name(t.protocol),
                t.ip,
                state.node_name
            ));
        }
        return Some((svc, eps, p, AddressKind::NodePort));
    }
    None
}

/// The endpoints serving `port` in the destination's family, with their target ports.
fn port_endpoints(eps: &[Endpoint], port: &ServicePort, family_of: IpAddr) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = eps
        .iter()
        .filter_map(|e| {
            let ip: IpAddr = e.ip.parse().ok()?;
            if ip.is_ipv4() != family_of.is_ipv4() {
                return None;
            }
            let target = e.ports.iter().find(|p| p.name == port.name)?;
            if target.port == 0 || target.port > 65535 {
                return None;
            }
            Some(Candidate {
                ip: e.ip.clone(),
                target_port: target.port,
                for_cluster: e.for_cluster,
                for_local: e.for_local,
            })
        })
        .collect();
    out.sort_by_key(|c| c.ip.parse::<IpAddr>().ok());
    out
}

fn word(local: bool) -> &'static str {
    if local { "Local" } else { "Cluster" }
}

/// Explains what node `state.node_name` does with a packet `q` describes.
pub fn explain(state: &NodeState, q: &Query) -> Explanation {
    let mut reasons = Vec::new();
    let mut ex = Explanation {
        node: state.node_name.clone(),
        version: state.version.clone(),
        destination: q.dst.to_string(),
        source: q.src.map(|s| s.to_string()),
        matched: None,
        traffic_policy: None,
        policy_value: None,
        endpoints: Vec::new(),
        session_affinity_seconds: 0,
        masquerade: Masquerade::No,
        masquerade_reason: String::new(),
        verdict: Verdict::NoRule,
        summary: String::new(),
        reasons: Vec::new(),
    };
    if let Some(src) = q.src
        && src.is_ipv4() != q.dst.ip.is_ipv4()
    {
        reasons.push(format!("source {src} and destination {} are of different IP families", q.dst.ip));
    }
    let Some((svc, eps, port, kind)) = find(state, q, &mut reasons) else {
        reasons.push(format!(
            "{} is not a service address (cluster, external or load-balancer IP) or node port on {}",
            q.dst, state.node_name
        ));
        ex.summary = "no kpx rule: not a service address, the packet is routed normally".to_string();
        ex.masquerade_reason = "kpx does not touch it".to_string();
        ex.reasons = reasons;
        return ex;
    };
    let name = service_key(svc);
    let label = if port.name.is_empty() { name.clone() } else { format!("{name}:{}", port.name) };
    ex.matched = Some(Matched {
        service: name.clone(),
        port_name: port.name.clone(),
        port: port.port,
        node_port: port.node_port,
        address_kind: kind,
    });
    reasons.push(match kind {
        AddressKind::NodePort => format!("{} is node port {} of {label} (port {})", q.dst, port.node_port, port.port),
        _ => format!("{} is the {} of {label}", q.dst, kind.describe()),
    });
    ex.session_affinity_seconds = svc.session_affinity_timeout_seconds;

    let all = port_endpoints(eps, port, q.dst.ip);
    let cluster: Vec<Candidate> = all.iter().filter(|c| c.for_cluster).cloned().collect();
    let local: Vec<Candidate> = all.iter().filter(|c| c.for_local).cloned().collect();
    let in_cluster = |ip: IpAddr| q.cluster_cidrs.iter().any(|c| c.contains(ip));
    let cidrs = q.cluster_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",");
    // Under a Local policy a node only receives its own endpoints (and the cluster ones when
    // some traffic is routed cluster-wide); the controlplane's per-family hint says whether
    // the service has endpoints elsewhere, which turns a REJECT into a DROP.
    let family = if q.dst.ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let hinted = svc.families_with_endpoints.iter().any(|f| f == family);
    let elsewhere = !all.is_empty() || hinted;
    let no_endpoints = |what: &str| {
        if all.is_empty() {
            format!("{label} has no endpoints")
        } else {
            format!("{label} has {} endpoint(s), none {what}", all.len())
        }
    };

    // (verdict, candidates, reason) and masquerade, per kind of destination.
    let (verdict, chosen, why): (Verdict, Vec<Candidate>, String);
    let (mut masq, mut masq_why): (Masquerade, String);
    if kind == AddressKind::ClusterIp {
        let itp = svc.internal_policy_local;
        ex.traffic_policy = Some("internal".into());
        ex.policy_value = Some(word(itp).into());
        reasons.push(format!("traffic to a cluster IP follows internalTrafficPolicy: {}", word(itp)));
        let pool = if itp { &local } else { &cluster };
        if pool.is_empty() && itp && elsewhere {
            verdict = Verdict::Drop;
            chosen = Vec::new();
            why = format!(
                "{label} has no local endpoints on {} (internalTrafficPolicy Local; the service has endpoints on other nodes): traffic to the cluster IP is dropped",
                state.node_name
            );
        } else if pool.is_empty() {
            verdict = Verdict::Reject;
            chosen = Vec::new();
            why = if itp {
                no_endpoints(&format!("local to {} (internalTrafficPolicy Local)", state.node_name))
            } else {
                no_endpoints("usable for cluster traffic on this node")
            };
        } else {
            verdict = Verdict::Dnat;
            chosen = pool.clone();
            why = if itp {
                format!("internalTrafficPolicy Local: only endpoints on {} are used", state.node_name)
            } else {
                "every endpoint usable for cluster traffic on this node is a candidate".to_string()
            };
        }
        (masq, masq_why) = if q.masquerade_all {
            (Masquerade::Yes, "the dataplane masquerades all service traffic (--masquerade-all)".into())
        } else {
            match (q.src, q.cluster_cidrs.is_empty()) {
                (Some(src), false) if in_cluster(src) => {
                    (Masquerade::No, format!("{src} is inside the cluster CIDR {cidrs}: the source is kept"))
                }
                (Some(src), false) => {
                    (Masquerade::Yes, format!("{src} is outside the cluster CIDR {cidrs}: masqueraded to the node"))
                }
                (Some(src), true) => (
                    Masquerade::Maybe,
                    format!(
                        "masqueraded if {src} is outside the cluster CIDR (unknown to kpxctl: pass --cluster-cidr)"
                    ),
                ),
                (None, false) => {
                    (Masquerade::Maybe, format!("masqueraded if the source is outside the cluster CIDR {cidrs}"))
                }
                (None, true) => (
                    Masquerade::Maybe,
                    "masqueraded if the source is outside the cluster CIDR (pass --from and --cluster-cidr)".into(),
                ),
            }
        };
    } else {
        let etp = svc.external_policy_local;
        ex.traffic_policy = Some("external".into());
        ex.policy_value = Some(word(etp).into());
        reasons.push(format!("traffic to a {} follows externalTrafficPolicy: {}", kind.describe(), word(etp)));
        let ranges: Vec<Cidr> = svc
            .load_balancer_source_ranges
            .iter()
            .filter_map(|r| r.parse::<Cidr>().ok())
            .filter(|c| c.addr.is_ipv4() == q.dst.ip.is_ipv4())
            .collect();
        let ranges_text = ranges.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",");
        let src_in_ranges = q.src.map(|s| ranges.iter().any(|c| c.contains(s)));
        if kind == AddressKind::LoadBalancerIp && !ranges.is_empty() {
            match q.src {
                Some(src) if src_in_ranges == Some(false) => {
                    ex.verdict = Verdict::Drop;
                    ex.summary = format!("DROP: source {src} is not in loadBalancerSourceRanges {ranges_text}");
                    reasons.push(format!(
                        "{label} accepts load-balancer traffic only from {ranges_text}; {src} is not in them"
                    ));
                    ex.masquerade_reason = "dropped before any NAT".into();
                    ex.reasons = reasons;
                    return ex;
                }
                Some(src) => reasons.push(format!("{src} is in loadBalancerSourceRanges {ranges_text}")),
                None => reasons.push(format!(
                    "only sources in loadBalancerSourceRanges {ranges_text} are accepted, others are dropped"
                )),
            }
        }
        // With Local, pods and the node itself still reach every cluster endpoint (the
        // backend's "pod traffic" and "LOCAL traffic" shortcuts in the EXT chain).
        let from_pod = q.src.is_some_and(in_cluster);
        let from_node =
            q.src.is_some_and(|s| q.node_ips.contains(&s) || (kind == AddressKind::NodePort && s == q.dst.ip));
        if !etp {
            (masq, masq_why) =
                (Masquerade::Yes, "externalTrafficPolicy Cluster: external traffic is always masqueraded".into());
            if cluster.is_empty() {
                verdict = Verdict::Reject;
                chosen = Vec::new();
                why = no_endpoints("usable for cluster traffic on this node");
            } else {
                verdict = Verdict::Dnat;
                chosen = cluster.clone();
                why = "externalTrafficPolicy Cluster: every endpoint usable for cluster traffic is a candidate".into();
            }
        } else if (from_pod || from_node) && !cluster.is_empty() {
            verdict = Verdict::Dnat;
            chosen = cluster.clone();
            if from_pod {
                why = format!(
                    "the source is a pod (in the cluster CIDR {cidrs}): it is sent to every cluster endpoint, not only local ones"
                );
                (masq, masq_why) = (Masquerade::No, "pod traffic to an external destination keeps its source".into());
            } else {
                why = format!("the source is node {} itself: it is sent to every cluster endpoint", state.node_name);
                (masq, masq_why) =
                    (Masquerade::Yes, "traffic from the node to its own external destination is masqueraded".into());
            }
        } else {
            (masq, masq_why) =
                (Masquerade::No, "externalTrafficPolicy Local: the client's source address is preserved".into());
            if local.is_empty() {
                chosen = Vec::new();
                if !elsewhere {
                    verdict = Verdict::Reject;
                    why = no_endpoints("usable on this node");
                } else {
                    verdict = Verdict::Drop;
                    why = format!(
                        "externalTrafficPolicy Local and no endpoint of {label} runs on {} (it has no local endpoints; the service has endpoints on other nodes): external traffic is dropped",
                        state.node_name
                    );
                }
            } else {
                verdict = Verdict::Dnat;
                chosen = local.clone();
                why = format!("externalTrafficPolicy Local: only endpoints on {} are used", state.node_name);
            }
            if q.src.is_none() {
                let note = if q.cluster_cidrs.is_empty() {
                    "(unless the source is a pod or this node: those go to every cluster endpoint)".to_string()
                } else {
                    format!(
                        "(for a source outside {cidrs} and not this node; pods and the node use every cluster endpoint)"
                    )
                };
                reasons.push(note);
            }
        }
    }
    reasons.push(why.clone());

    // Hairpin: an endpoint reaching itself through the service is always masqueraded.
    if let Some(src) = q.src
        && verdict == Verdict::Dnat
        && chosen.iter().any(|c| c.ip.parse::<IpAddr>().ok() == Some(src))
        && masq != Masquerade::Yes
    {
        if chosen.len() == 1 {
            (masq, masq_why) = (Masquerade::Yes, format!("hairpin: {src} is the only endpoint, it reaches itself"));
        } else {
            masq = Masquerade::Maybe;
            masq_why = format!("{masq_why}; but masqueraded (hairpin) when the DNAT picks {src} itself");
        }
    }
    if verdict == Verdict::Dnat && ex.session_affinity_seconds > 0 {
        reasons.push(format!(
            "session affinity ClientIP: a client keeps its endpoint for {}s after its last packet",
            ex.session_affinity_seconds
        ));
    }
    ex.summary = match verdict {
        Verdict::Dnat if chosen.len() == 1 => format!("DNAT to {}", endpoint_addr(&chosen[0])),
        Verdict::Dnat => format!("DNAT to one of {} endpoints, at random", chosen.len()),
        Verdict::Reject => format!("REJECT: {why}"),
        Verdict::Drop => format!("DROP: {why}"),
        Verdict::NoRule => unreachable!("a matched service has a rule"),
    };
    if verdict != Verdict::Dnat {
        (masq, masq_why) = (Masquerade::No, "the packet is not forwarded".into());
    }
    ex.verdict = verdict;
    ex.endpoints = chosen;
    ex.masquerade = masq;
    ex.masquerade_reason = masq_why;
    ex.reasons = reasons;
    ex
}

/// "10.244.1.2:8080", "[fd00::2]:8080".
pub fn endpoint_addr(c: &Candidate) -> String {
    if c.ip.contains(':') { format!("[{}]:{}", c.ip, c.target_port) } else { format!("{}:{}", c.ip, c.target_port) }
}

#[cfg(test)]
mod tests;
