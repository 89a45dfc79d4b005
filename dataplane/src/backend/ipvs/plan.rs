//! The pure half of the ipvs backend: the virtual servers the node's state calls for
//! ([`desired`]) and the netlink operations that turn the kernel's table into them ([`plan`]).
//!
//! Like kube-proxy's ipvs mode: one virtual server per service port on each ClusterIP,
//! ExternalIP and LoadBalancer IP, and one per NodePort on each node address; real servers in
//! masquerade mode with weight 1, chosen by the traffic policy that applies to that address.
//! A planned list is minimal: an unchanged virtual server costs nothing, one new endpoint is one
//! operation. A TCP real server that goes away drains first (weight 0) and is deleted once the
//! kernel counts no connections to it; UDP and SCTP ones are deleted at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use kpx_ipvs_netlink::{Destination, DestinationInfo, Family, Protocol, Service, ServiceInfo};
use kpx_proto::v1 as pb;

use crate::state::{AppliedState, ServiceEntry};

/// The kube-proxy default NodePort range: virtual servers on node addresses with a port in it
/// are kpx's, the others are left alone.
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

/// The schedulers IPVS offers that kpx accepts.
pub const SCHEDULERS: [&str; 8] = ["rr", "lc", "dh", "sh", "sed", "nq", "wrr", "mh"];

/// A virtual server's identity in the kernel (firewall-mark services are never kpx's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub protocol: Protocol,
    pub addr: SocketAddr,
}

impl Key {
    pub fn of(s: &Service) -> Key {
        Key { protocol: s.protocol, addr: s.socket_addr() }
    }
}

/// What an address of a service is, for the companion iptables rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VipKind {
    Cluster,
    /// ExternalIP.
    External,
    /// LoadBalancer ingress IP.
    LoadBalancer,
    NodePort,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DesiredService {
    pub service: Service,
    pub dests: BTreeMap<SocketAddr, Destination>,
    pub kind: VipKind,
    /// The traffic policy that chose the real servers is Local.
    pub local: bool,
    /// LoadBalancer IPs with loadBalancerSourceRanges: the CIDRs (of this family) that may
    /// connect; `Some(empty)` when every range was invalid (fail closed). `None`: any source.
    pub source_ranges: Option<Vec<String>>,
    /// A load-balancer IP whose source ranges admit a node address: the node may reach it from
    /// that address (kube-proxy's allowFromNode, KUBE-LOAD-BALANCER-SOURCE-IP).
    pub allow_from_node: bool,
    /// ClusterIP virtual servers: the endpoints of the service port that run on this node, for
    /// the hairpin masquerade (KUBE-LOOP-BACK), as kube-proxy lists them: under a Local policy
    /// the `for_local` ones, otherwise those tagged with this node, and those whose node is not
    /// known (an entry of another node's endpoint never matches here: its source would have to
    /// be that endpoint).
    pub loop_back: Vec<SocketAddr>,
    /// ClusterIP virtual servers of a service with a healthCheckNodePort.
    pub health_check_port: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    pub services: BTreeMap<Key, DesiredService>,
    /// The addresses the dummy interface holds: ClusterIPs, ExternalIPs, LoadBalancer IPs.
    pub vips: BTreeSet<IpAddr>,
    /// What could not be programmed, and why.
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct PlanConfig {
    pub scheduler: String,
    /// Addresses that accept NodePorts.
    pub node_ips: Vec<IpAddr>,
    pub families: Vec<Family>,
    /// `kpx_proto::node_tag` of this node: which endpoints run here (KUBE-LOOP-BACK).
    pub node_tag: u32,
}

/// A virtual server as the kernel has it.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelService {
    pub service: Service,
    pub dests: BTreeMap<SocketAddr, DestinationInfo>,
}

/// The kernel's table (kpx's model of it between dumps).
pub type Table = BTreeMap<Key, KernelService>;

/// One netlink request.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    AddService(Service),
    UpdateService(Service),
    DeleteService(Service),
    AddDest(Service, Destination),
    UpdateDest(Service, Destination),
    DeleteDest(Service, Destination),
}

/// A table from a dump: each service with its destinations. Firewall-mark services are left out.
pub fn table_from(dump: Vec<(ServiceInfo, Vec<DestinationInfo>)>) -> Table {
    dump.into_iter()
        .filter(|(s, _)| s.service.fwmark.is_none())
        .map(|(s, dests)| {
            let dests = dests.into_iter().map(|d| (d.dest.socket_addr(), d)).collect();
            (Key::of(&s.service), KernelService { service: s.service, dests })
        })
        .collect()
}

/// The virtual servers of every service in `state`.
pub fn desired(cfg: &PlanConfig, state: &AppliedState) -> Desired {
    let mut d = Desired::default();
    for entry in state.services().values() {
        add_service(cfg, entry, &mut d);
    }
    d
}

/// Which service asked for which virtual servers and VIPs, so that an update can replace the
/// part of a [`Desired`] that a few services make up without recomputing the rest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Index {
    /// "namespace/name" -> the virtual servers and VIPs it produced.
    by_service: HashMap<String, (Vec<Key>, Vec<IpAddr>)>,
    /// How many services produced each virtual server (more than one is a conflict that only the
    /// whole-table path resolves, as the last service in name order wins there).
    claims: HashMap<Key, u32>,
    /// How many services hold each VIP.
    vips: HashMap<IpAddr, u32>,
}

impl Index {
    fn claim(&mut self, name: &str, part: &Desired) {
        let keys: Vec<Key> = part.services.keys().copied().collect();
        let vips: Vec<IpAddr> = part.vips.iter().copied().collect();
        keys.iter().for_each(|k| *self.claims.entry(*k).or_default() += 1);
        vips.iter().for_each(|ip| *self.vips.entry(*ip).or_default() += 1);
        if !keys.is_empty() || !vips.is_empty() {
            self.by_service.insert(name.to_string(), (keys, vips));
        }
    }
}

/// [`desired`] with the [`Index`] that [`update_desired`] needs.
pub fn desired_indexed(cfg: &PlanConfig, state: &AppliedState) -> (Desired, Index) {
    let mut d = Desired::default();
    let mut index = Index::default();
    for (name, entry) in state.services() {
        let mut part = Desired::default();
        add_service(cfg, entry, &mut part);
        index.claim(name, &part);
        // extend, not append: BTreeMap::append rebuilds the whole map.
        d.services.extend(part.services);
        d.vips.extend(part.vips);
        d.skipped.append(&mut part.skipped);
    }
    (d, index)
}

/// What [`update_desired`] changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Update {
    /// Every virtual server the changed services had or have now: the only ones to plan.
    pub touched: BTreeSet<Key>,
    /// The entries that were replaced or removed, as they were (for the ipset delta).
    pub old: Vec<(Key, DesiredService)>,
    pub vips_added: Vec<IpAddr>,
    pub vips_removed: Vec<IpAddr>,
    /// What could not be programmed in the changed services.
    pub skipped: Vec<String>,
}

/// Replaces, in `d`, the virtual servers and VIPs of the `changed` services by what `state`
/// says of them now (removed services lose theirs), in time proportional to those services.
/// The result equals [`desired`] of `state` (but for `skipped`) when `d` and `index` came from
/// the previous state. `None` when a virtual server is, or would be, claimed by more than one
/// service: then only the whole-table computation knows the winner (and `index` is stale).
pub fn update_desired(
    cfg: &PlanConfig,
    state: &AppliedState,
    changed: &BTreeSet<String>,
    d: &mut Desired,
    index: &mut Index,
) -> Option<Update> {
    let mut parts = Vec::with_capacity(changed.len());
    let mut seen = BTreeSet::new();
    for name in changed {
        let mut part = Desired::default();
        if let Some(entry) = state.services().get(name) {
            add_service(cfg, entry, &mut part);
        }
        let (old_keys, _) = index.by_service.get(name).map(|(k, v)| (k.as_slice(), v.as_slice())).unwrap_or_default();
        let own = |k: &Key| old_keys.contains(k) as u32;
        // Every virtual server this service had or gets must be its alone.
        let shared = old_keys.iter().any(|k| index.claims.get(k).copied().unwrap_or(0) > 1)
            || part.services.keys().any(|k| index.claims.get(k).copied().unwrap_or(0) > own(k) || !seen.insert(*k));
        if shared {
            return None;
        }
        parts.push((name, part));
    }
    // (A virtual server that moves from one changed service to another counts as shared above.)
    let mut up = Update::default();
    for (name, mut part) in parts {
        if let Some((keys, vips)) = index.by_service.remove(name.as_str()) {
            for k in keys {
                index.claims.remove(&k);
                up.touched.insert(k);
                if let Some(old) = d.services.remove(&k) {
                    up.old.push((k, old));
                }
            }
            for ip in vips {
                let n = index.vips.entry(ip).or_default();
                *n = n.saturating_sub(1);
                if *n == 0 {
                    index.vips.remove(&ip);
                    d.vips.remove(&ip);
                    up.vips_removed.push(ip);
                }
            }
        }
        index.claim(name, &part);
        up.touched.extend(part.services.keys().copied());
        for ip in &part.vips {
            if d.vips.insert(*ip) {
                up.vips_added.push(*ip);
            }
        }
        d.services.extend(part.services);
        up.skipped.append(&mut part.skipped);
    }
    // A VIP that left one service and came back with another was there all along.
    let removed = std::mem::take(&mut up.vips_removed);
    up.vips_added.retain(|ip| !removed.contains(ip));
    up.vips_removed = removed.into_iter().filter(|ip| !d.vips.contains(ip)).collect();
    Some(up)
}

/// Kubernetes' longest ClientIP affinity (`timeoutSeconds` is at most 86400).
const MAX_AFFINITY_SECONDS: u32 = 86400;

/// The IPVS protocol of a service port; None when unspecified (or unknown on the wire).
pub(super) fn protocol(p: i32) -> Option<Protocol> {
    match pb::Protocol::try_from(p).ok()? {
        pb::Protocol::Tcp => Some(Protocol::Tcp),
        pb::Protocol::Udp => Some(Protocol::Udp),
        pb::Protocol::Sctp => Some(Protocol::Sctp),
        pb::Protocol::Unspecified => None,
    }
}

fn port16(p: u32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

fn add_service(cfg: &PlanConfig, entry: &ServiceEntry, d: &mut Desired) {
    let s = &entry.service;
    let name = format!("{}/{}", s.namespace, s.name);
    let mut parse = |list: &[String]| -> Vec<IpAddr> {
        let mut out = Vec::new();
        for a in list.iter().filter(|a| !a.is_empty() && *a != "None") {
            match a.parse::<IpAddr>() {
                Ok(ip) if cfg.families.contains(&Family::of(ip)) => out.push(ip),
                Ok(_) => {}
                Err(_) => d.skipped.push(format!("{name}: invalid address {a:?}")),
            }
        }
        out
    };
    let cluster = parse(&s.cluster_ips);
    let external = parse(&s.external_ips);
    let lb = parse(&s.load_balancer_ips);
    for r in s.load_balancer_source_ranges.iter().filter(|r| cidr_family(r).is_none()) {
        d.skipped.push(format!("{name}: invalid loadBalancerSourceRange {r:?}"));
    }
    // Kubernetes' longest ClientIP affinity; the kernel multiplies the timeout by HZ in 32
    // bits, so a longer one would wrap to a short one. Capped and reported, as in iptables.
    let affinity = s.session_affinity_timeout_seconds.min(MAX_AFFINITY_SECONDS);
    if s.session_affinity_timeout_seconds > MAX_AFFINITY_SECONDS {
        d.skipped.push(format!(
            "{name}: session affinity timeout {} capped at {MAX_AFFINITY_SECONDS} seconds",
            s.session_affinity_timeout_seconds
        ));
    }
    for family in cfg.families.iter().copied() {
        // Like the iptables backend: a family without a ClusterIP is not served in that family.
        let Some(cluster_ip) = cluster.iter().copied().find(|ip| Family::of(*ip) == family) else { continue };
        let node_ips: Vec<IpAddr> = cfg.node_ips.iter().copied().filter(|ip| Family::of(*ip) == family).collect();
        for port in &s.ports {
            let (Some(proto), Some(number)) = (protocol(port.protocol), port16(port.port)) else {
                d.skipped.push(format!("{name}: port {:?} has no usable protocol or number", port.name));
                continue;
            };
            let ranges = (!s.load_balancer_source_ranges.is_empty()).then(|| {
                let ok = s.load_balancer_source_ranges.iter().filter(|r| cidr_family(r) == Some(family));
                ok.cloned().collect::<Vec<String>>()
            });
            let local_known = s.internal_policy_local || s.external_policy_local;
            let mut vip = |ip: IpAddr, number: u16, kind: VipKind, local: bool, source_ranges: Option<Vec<String>>| {
                let mut service = Service::new(proto, SocketAddr::new(ip, number), &cfg.scheduler);
                if affinity > 0 {
                    service = service.with_persistence(affinity);
                }
                let dests = real_servers(entry, &port.name, family, local);
                let allow_from_node =
                    source_ranges.as_ref().is_some_and(|r| node_ips.iter().any(|n| super::host::in_cidrs(*n, r)));
                let (loop_back, health_check_port) = if kind == VipKind::Cluster {
                    let here = |e: &pb::Endpoint| e.node_tag == 0 || e.node_tag == cfg.node_tag;
                    let eps = match local_known {
                        true => real_servers_of(entry, &port.name, family, |e| e.for_local),
                        false => real_servers_of(entry, &port.name, family, |e| e.for_cluster && here(e)),
                    };
                    let hc = port16(s.health_check_node_port).filter(|_| s.external_policy_local);
                    (eps.into_keys().collect(), hc)
                } else {
                    (Vec::new(), None)
                };
                let want = DesiredService {
                    service,
                    dests,
                    kind,
                    local,
                    source_ranges,
                    allow_from_node,
                    loop_back,
                    health_check_port,
                };
                d.services.insert(Key::of(&want.service), want);
                if kind != VipKind::NodePort {
                    d.vips.insert(ip);
                }
            };
            vip(cluster_ip, number, VipKind::Cluster, s.internal_policy_local, None);
            for ip in external.iter().copied().filter(|ip| Family::of(*ip) == family) {
                vip(ip, number, VipKind::External, s.external_policy_local, None);
            }
            for ip in lb.iter().copied().filter(|ip| Family::of(*ip) == family) {
                vip(ip, number, VipKind::LoadBalancer, s.external_policy_local, ranges.clone());
            }
            if let Some(node_port) = port16(port.node_port) {
                for ip in &node_ips {
                    vip(*ip, node_port, VipKind::NodePort, s.external_policy_local, None);
                }
            }
        }
    }
}

/// The family of a valid CIDR ("10.0.0.0/8", "fd00::/64").
fn cidr_family(cidr: &str) -> Option<Family> {
    let (ip, len) = cidr.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some(Family::of(ip))
}

/// The endpoints for traffic under a Cluster (`for_cluster`) or Local (`for_local`) policy, on
/// the target port of the service port named `port_name`. Like kube-proxy's ipvs mode (not its
/// iptables mode), a Local policy without a local endpoint falls back to the cluster endpoints
/// (kubernetes#97081): pods on this node still reach the service; external clients are not
/// masqueraded, so their replies come back from a pod address and are discarded.
fn real_servers(
    entry: &ServiceEntry,
    port_name: &str,
    family: Family,
    local: bool,
) -> BTreeMap<SocketAddr, Destination> {
    let out = real_servers_of(entry, port_name, family, |e| if local { e.for_local } else { e.for_cluster });
    if local && out.is_empty() { real_servers_of(entry, port_name, family, |e| e.for_cluster) } else { out }
}

fn real_servers_of(
    entry: &ServiceEntry,
    port_name: &str,
    family: Family,
    pick: impl Fn(&pb::Endpoint) -> bool,
) -> BTreeMap<SocketAddr, Destination> {
    let mut out = BTreeMap::new();
    for e in entry.endpoints.values().filter(|e| pick(e)) {
        let Ok(ip) = e.ip.parse::<IpAddr>() else { continue };
        if Family::of(ip) != family {
            continue;
        }
        let Some(port) = e.ports.iter().find(|p| p.name == port_name).and_then(|p| port16(p.port)) else { continue };
        let addr = SocketAddr::new(ip, port);
        out.insert(addr, Destination::new(addr, 1));
    }
    out
}

/// The service attributes that an update can change.
fn same_service(a: &Service, b: &Service) -> bool {
    a.scheduler == b.scheduler && a.flags == b.flags && a.timeout == b.timeout && a.netmask == b.netmask
}

fn same_dest(a: &Destination, b: &Destination) -> bool {
    a.weight == b.weight && a.forward == b.forward
}

/// The operations that make `kernel` what `desired` says, touching only virtual servers that
/// `owns` (which kpx manages) or that `desired` names. Deletions come first, so that an address
/// that moves from one service to another is free when it is added again.
pub fn plan(desired: &Desired, kernel: &Table, owns: impl Fn(&Key) -> bool) -> Vec<Op> {
    let mut ops = Vec::new();
    for (key, k) in kernel {
        if !desired.services.contains_key(key) && owns(key) {
            ops.push(Op::DeleteService(k.service.clone()));
        }
    }
    for (key, want) in &desired.services {
        match kernel.get(key) {
            None => {
                ops.push(Op::AddService(want.service.clone()));
                ops.extend(want.dests.values().map(|dest| Op::AddDest(want.service.clone(), dest.clone())));
            }
            Some(have) => {
                if !same_service(&want.service, &have.service) {
                    ops.push(Op::UpdateService(want.service.clone()));
                }
                plan_dests(want, have, &mut ops);
            }
        }
    }
    ops
}

/// [`plan`] for the virtual servers in `keys` only (in the same order as `plan` would emit
/// them): when the rest of the table already matches `desired`, the same operations.
pub fn plan_keys(desired: &Desired, kernel: &Table, keys: &BTreeSet<Key>, owns: impl Fn(&Key) -> bool) -> Vec<Op> {
    let mut ops = Vec::new();
    for key in keys {
        if let Some(k) = kernel.get(key)
            && !desired.services.contains_key(key)
            && owns(key)
        {
            ops.push(Op::DeleteService(k.service.clone()));
        }
    }
    for key in keys {
        let Some(want) = desired.services.get(key) else { continue };
        match kernel.get(key) {
            None => {
                ops.push(Op::AddService(want.service.clone()));
                ops.extend(want.dests.values().map(|dest| Op::AddDest(want.service.clone(), dest.clone())));
            }
            Some(have) => {
                if !same_service(&want.service, &have.service) {
                    ops.push(Op::UpdateService(want.service.clone()));
                }
                plan_dests(want, have, &mut ops);
            }
        }
    }
    ops
}

fn plan_dests(want: &DesiredService, have: &KernelService, ops: &mut Vec<Op>) {
    let svc = &want.service;
    for (addr, dest) in &want.dests {
        match have.dests.get(addr) {
            None => ops.push(Op::AddDest(svc.clone(), dest.clone())),
            Some(h) if !same_dest(dest, &h.dest) => ops.push(Op::UpdateDest(svc.clone(), dest.clone())),
            Some(_) => {}
        }
    }
    for (addr, h) in &have.dests {
        if want.dests.contains_key(addr) {
            continue;
        }
        if svc.protocol != Protocol::Tcp {
            ops.push(Op::DeleteDest(svc.clone(), h.dest.clone()));
        } else if h.dest.weight != 0 {
            ops.push(Op::UpdateDest(svc.clone(), Destination { weight: 0, ..h.dest.clone() }));
        } else if h.active_conns + h.inactive_conns == 0 {
            ops.push(Op::DeleteDest(svc.clone(), h.dest.clone()));
        }
    }
}

/// The virtual servers holding real servers that drain (removed, weight 0, connections left):
/// their counters must be read again until they are gone.
pub fn draining(desired: &Desired, kernel: &Table) -> Vec<Key> {
    kernel
        .iter()
        .filter(|(key, k)| {
            desired.services.get(key).is_some_and(|want| k.dests.keys().any(|a| !want.dests.contains_key(a)))
        })
        .map(|(key, _)| *key)
        .collect()
}

/// [`draining`] among `keys`.
pub fn draining_among(desired: &Desired, kernel: &Table, keys: &BTreeSet<Key>) -> Vec<Key> {
    keys.iter()
        .filter(|key| {
            let (Some(want), Some(k)) = (desired.services.get(key), kernel.get(key)) else { return false };
            k.dests.keys().any(|a| !want.dests.contains_key(a))
        })
        .copied()
        .collect()
}

/// Applies a successful operation to the model of the table.
pub fn record(table: &mut Table, op: &Op) {
    match op {
        Op::AddService(s) | Op::UpdateService(s) => {
            table
                .entry(Key::of(s))
                .or_insert_with(|| KernelService { service: s.clone(), dests: BTreeMap::new() })
                .service = s.clone();
        }
        Op::DeleteService(s) => {
            table.remove(&Key::of(s));
        }
        Op::AddDest(s, d) | Op::UpdateDest(s, d) => {
            if let Some(k) = table.get_mut(&Key::of(s)) {
                let info = k.dests.entry(d.socket_addr()).or_insert_with(|| DestinationInfo {
                    dest: d.clone(),
                    active_conns: 0,
                    inactive_conns: 0,
                    persist_conns: 0,
                    stats: Default::default(),
                });
                info.dest = d.clone();
            }
        }
        Op::DeleteDest(s, d) => {
            if let Some(k) = table.get_mut(&Key::of(s)) {
                k.dests.remove(&d.socket_addr());
            }
        }
    }
}

/// `conntrack` argv (after the command) that delete the entries of UDP real servers that `ops`
/// delete: UDP has no connection end, so a client that keeps sending would otherwise keep its
/// conntrack entry (and the NAT to a server that is gone) alive.
pub fn udp_conntrack_cleanups(ops: &[Op]) -> Vec<Vec<String>> {
    ops.iter()
        .filter_map(|op| match op {
            Op::DeleteDest(s, d) if s.protocol == Protocol::Udp => Some((s, d)),
            _ => None,
        })
        .map(|(s, d)| {
            let family = if s.family == Family::Inet { "ipv4" } else { "ipv6" };
            let (vip, port, ep) = (s.addr.to_string(), s.port.to_string(), d.addr.to_string());
            ["-D", "-f", family, "-p", "udp", "--orig-dst", &vip, "--orig-port-dst", &port, "--reply-src", &ep]
                .map(String::from)
                .to_vec()
        })
        .collect()
}

#[cfg(test)]
mod tests;
