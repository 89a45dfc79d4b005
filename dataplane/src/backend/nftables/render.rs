//! One service's objects in kube-proxy's nftables layout (pure). The decisions (which chain
//! internal and external traffic enter, drop vs reject, masquerading, short-circuits) are the
//! iptables render's (iptables/render/service.rs), written as nftables objects:
//!
//! services --@service-ips / @service-nodeports--> service-* (or local-*) / external-*
//! external-* --> service-* or local-*;  service-*/local-* --dnat numgen map--> @endpoints-K
//! (with ClientIP affinity, as kube-proxy: --numgen vmap--> endpoint-* --> dnat)
//! filter hooks --@no-endpoint-services / @no-endpoint-nodeports--> drop or reject-chain
//! filter prerouting/output --@firewall-ips--> firewall-* (loadBalancerSourceRanges)

use std::collections::HashSet;
use std::net::IpAddr;

use kpx_nft_netlink::Verdict;
use kpx_proto::v1 as pb;

use super::endpoints::{self, HAIRPIN, Slots};
use super::layout::{self, Key, MARK_FOR_MASQUERADE, Objects, REJECT_CHAIN, Val};
use super::names::PortNames;
use super::stmt::{RuleSpec, Stmt};
use crate::backend::iptables::render::check::{self, Cidr};
use crate::backend::iptables::render::{IpFamily, RenderConfig};
use crate::backend::policy;
use crate::state::ServiceEntry;

/// Kubernetes' longest ClientIP affinity (the iptables render caps it the same way).
const MAX_AFFINITY_SECONDS: u32 = 86400;
/// nf_tables names are at most 255 bytes (NFT_NAME_MAXLEN with its NUL): a longer one makes
/// the kernel refuse the whole transaction.
const MAX_NAME: usize = 255;
/// The namespace/name part of them; kpx's longest prefix plus hash is 18.
const MAX_BASE: usize = 200;

fn of_family(f: IpFamily, list: &[String], skipped: &mut Vec<String>, name: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for a in list {
        match check::ip(a) {
            Ok(ip) if f.matches(ip) && !out.contains(&ip) => out.push(ip),
            Ok(_) => {}
            Err(e) => skipped.push(format!("{name}: {e}")),
        }
    }
    out
}

fn goto(c: &str) -> Verdict {
    Verdict::Goto(c.to_string())
}

fn jump(c: &str) -> Stmt {
    Stmt::Verdict(Verdict::Jump(c.to_string()))
}

/// A name part that cannot forge another object's name or break the netlink string.
fn valid_part(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && !s.chars().any(|c| c.is_control() || c == '"')
}

/// Whether an endpoint needs its hairpin pair on this node: a connection from the endpoint to
/// itself through a service is DNATed here only when the endpoint runs here (the connection
/// starts on this node), or when it arrives from another node unmasqueraded: pod traffic to a
/// node port, external or load-balancer IP under externalTrafficPolicy Local (the short-circuit
/// to the service chain). Under the Cluster policy such traffic is masqueraded anyway. An
/// endpoint whose node is not known (tag 0: no nodeName, or a controlplane older than the tag)
/// gets its pair, as every endpoint does in kube-proxy's layout.
fn hairpin_here(node_tag: u32, my_tag: u32, external_local: bool) -> bool {
    node_tag == 0 || node_tag == my_tag || external_local
}

struct Ep {
    ip: IpAddr,
    port: u16,
    chain: String,
    affinity: String,
    cluster: bool,
    local: bool,
    /// May be reached by its own traffic here (hairpin): see `hairpin_here`.
    hairpin: bool,
}

/// The objects of one service for `cfg.family`, and why parts of it were left out. A service
/// without a cluster IP of this family renders nothing (it is the other family's). `slots`
/// gives each policy chain its endpoint map range (see `endpoints`); the endpoint maps
/// themselves are the caller's (services share them).
pub fn render_service(cfg: &RenderConfig, entry: &ServiceEntry, slots: &mut Slots) -> (Objects, Vec<String>) {
    let f = cfg.family;
    let s = &entry.service;
    let mut o = Objects::default();
    let mut skipped = Vec::new();
    let name = check::printable(&format!("{}/{}", s.namespace, s.name));
    let cips: Vec<String> = s.cluster_ips.iter().filter(|c| !c.is_empty() && *c != "None").cloned().collect();
    let mut cip_errors = Vec::new();
    let Some(cluster) = of_family(f, &cips, &mut cip_errors, &name).first().copied() else {
        // The other family's service, unless none of its cluster IPs is an address: then no
        // family renders it, and each says why (as the iptables render).
        if cip_errors.len() == cips.len() {
            skipped.extend(cip_errors.iter().map(|e| e.replacen(": ", ": cluster IP: ", 1)));
        }
        return (o, skipped);
    };
    if !valid_part(&s.namespace) || !valid_part(&s.name) || name.len() > MAX_BASE {
        skipped.push(format!("{name}: invalid name for nftables objects"));
        return (o, skipped);
    }
    let external = of_family(f, &s.external_ips, &mut skipped, &name);
    let lb = of_family(f, &s.load_balancer_ips, &mut skipped, &name);
    let mut ranges = Vec::new();
    let mut invalid_range = false;
    for r in &s.load_balancer_source_ranges {
        match Cidr::parse(r) {
            Ok(c) if c.family() == f => ranges.push(c),
            Ok(_) => {}
            Err(e) => {
                invalid_range = true;
                skipped.push(format!("{name}: {e}"));
            }
        }
    }
    // Fail closed: ranges that were all invalid admit nobody.
    let ranges = (!ranges.is_empty() || invalid_range).then_some(ranges);
    let cidr = cfg.cluster_cidr.as_deref().and_then(|c| Cidr::parse(c).ok()).filter(|c| c.family() == f);
    let affinity =
        (s.session_affinity_timeout_seconds > 0).then(|| s.session_affinity_timeout_seconds.min(MAX_AFFINITY_SECONDS));
    o.element(layout::CLUSTER_IPS, Key::Addr(cluster), None);
    let mut rendered = HashSet::new();
    for port in &s.ports {
        let proto = match port.protocol() {
            pb::Protocol::Tcp => 6u8,
            pb::Protocol::Udp => 17,
            pb::Protocol::Sctp => 132,
            pb::Protocol::Unspecified => {
                skipped.push(format!("{name}: port {:?}: no protocol", check::printable(&port.name)));
                continue;
            }
        };
        if !rendered.insert((port.name.clone(), proto)) || (!port.name.is_empty() && !valid_part(&port.name)) {
            skipped.push(format!("{name}: port {:?}: duplicate or invalid port name", check::printable(&port.name)));
            continue;
        }
        let p =
            Port { cluster, external: &external, lb: &lb, ranges: ranges.as_deref(), cidr: cidr.as_ref(), affinity };
        if let Err(e) = render_port(cfg, entry, &p, port, proto, &mut o, slots) {
            skipped.push(format!("{name}: port {:?}: {e}", check::printable(&port.name)));
        }
    }
    if s.session_affinity_timeout_seconds > MAX_AFFINITY_SECONDS {
        skipped.push(format!("{name}: session affinity timeout capped at {MAX_AFFINITY_SECONDS} seconds"));
    }
    (o, skipped)
}

struct Port<'a> {
    cluster: IpAddr,
    external: &'a [IpAddr],
    lb: &'a [IpAddr],
    ranges: Option<&'a [Cidr]>,
    cidr: Option<&'a Cidr>,
    affinity: Option<u32>,
}

fn render_port(
    cfg: &RenderConfig,
    entry: &ServiceEntry,
    a: &Port<'_>,
    port: &pb::ServicePort,
    proto: u8,
    o: &mut Objects,
    slots: &mut Slots,
) -> Result<(), String> {
    let f = cfg.family;
    let s = &entry.service;
    let pn = check::port(port.port, "port")?;
    let node_port = if port.node_port == 0 { None } else { Some(check::port(port.node_port, "node port")?) };
    let proto_word = super::stmt::proto_name(proto);
    let names = PortNames::new(&s.namespace, &s.name, &proto_word, &port.name);
    if names.firewall.len() > MAX_NAME {
        return Err("the port name makes nftables object names too long".into());
    }
    // The kernel takes a set name with '%' for an anonymous set's template ("__map%d") and
    // refuses the whole transaction: affinity sets are named after the service.
    if a.affinity.is_some() && [&s.namespace, &s.name, &port.name].iter().any(|p| p.contains('%')) {
        return Err("a name with '%' cannot name the nftables session affinity sets".into());
    }
    let label = if port.name.is_empty() {
        format!("{}/{}", s.namespace, s.name)
    } else {
        format!("{}/{}:{}", s.namespace, s.name, port.name)
    };

    let (itp, etp) = (s.internal_policy_local, s.external_policy_local);
    let has_ext = node_port.is_some() || !a.external.is_empty() || !a.lb.is_empty();
    let (my_tag, external_local) = (kpx_proto::node_tag(&cfg.node_name), etp && has_ext);
    let mut eps: Vec<Ep> = Vec::new();
    let mut seen = HashSet::new();
    for e in entry.endpoints.values() {
        let Ok(ip) = check::ip(&e.ip) else { continue };
        let Some(ep) = e.ports.iter().find(|p| p.name == port.name) else { continue };
        let Ok(ep_port) = check::port(ep.port, "endpoint port") else { continue };
        if !f.matches(ip) || !seen.insert(ip) {
            continue;
        }
        // Endpoint chains (and their names, two hashes each) only with ClientIP affinity.
        let (chain, affinity) =
            if a.affinity.is_some() { names.endpoint(&ip.to_string(), ep_port) } else { Default::default() };
        if chain.len() > MAX_NAME {
            return Err(format!("endpoint {ip}: the names of its chain and affinity set are too long for nftables"));
        }
        let hairpin = hairpin_here(e.node_tag, my_tag, external_local);
        eps.push(Ep { ip, port: ep_port, chain, affinity, cluster: e.for_cluster, local: e.for_local, hairpin });
    }

    let d = policy::decide(s, f, eps.iter().any(|e| e.cluster), eps.iter().any(|e| e.local), has_ext);
    let (svc_used, svl_used, ext_used, exists_elsewhere) =
        (d.cluster_used, d.local_used, d.external_used, d.exists_elsewhere);
    let chain = |set: policy::Set| match set {
        policy::Set::Cluster => &names.service,
        policy::Set::Local => &names.local,
    };
    let (internal, external) = (d.internal.map(chain), d.external.map(chain));
    let reject = goto(REJECT_CHAIN);
    let int_verdict = if itp && exists_elsewhere { Verdict::Drop } else { reject.clone() };
    let ext_verdict = match external {
        Some(_) => None,
        None if etp && exists_elsewhere => Some(Verdict::Drop),
        None => Some(reject),
    };

    // Shared maps.
    let cip_key = Key::AddrProtoPort(a.cluster, proto, pn);
    match internal {
        Some(chain) => o.element(layout::SERVICE_IPS, cip_key, Some(goto(chain))),
        None => o.element(layout::NO_ENDPOINT_SERVICES, cip_key, Some(int_verdict)),
    }
    for ip in a.external.iter().chain(a.lb) {
        let key = Key::AddrProtoPort(*ip, proto, pn);
        if ext_used {
            o.element(layout::SERVICE_IPS, key.clone(), Some(goto(&names.external)));
        }
        if let Some(v) = &ext_verdict {
            o.element(layout::NO_ENDPOINT_SERVICES, key, Some(v.clone()));
        }
    }
    if let Some(np) = node_port {
        let key = Key::ProtoPort(proto, np);
        if ext_used {
            o.element(layout::SERVICE_NODEPORTS, key.clone(), Some(goto(&names.external)));
        }
        if let Some(v) = &ext_verdict {
            o.element(layout::NO_ENDPOINT_NODEPORTS, key, Some(v.clone()));
        }
    }

    // Policy chains: affinity, then the random pick. (Off-cluster traffic to the cluster IP is
    // marked for masquerade in `services`: layout::masquerade_to_cluster_ips.)
    let mut policy = |chain: &String, pick: fn(&Ep) -> bool| {
        let mut rules = Vec::new();
        let mut chosen: Vec<&Ep> = eps.iter().filter(|e| pick(e)).collect();
        if a.affinity.is_some() {
            // kube-proxy's way: the timed set of each endpoint sends a client back to it.
            for e in &chosen {
                rules.push(RuleSpec::new(vec![Stmt::SaddrInSet(e.affinity.clone()), Stmt::Verdict(goto(&e.chain))]));
            }
            rules.push(RuleSpec::new(vec![Stmt::NumgenVmap(chosen.iter().map(|e| e.chain.clone()).collect())]));
        } else {
            // Each endpoint owns an equal share of the chain's range in an endpoint map.
            chosen.truncate(endpoints::SLOTS as usize);
            let id = slots.id(chain);
            let (map, base) = (endpoints::map_name(id), endpoints::offset(id));
            rules.push(RuleSpec::new(vec![Stmt::DnatMap { proto, offset: base, map: map.clone() }]));
            for (e, (lo, hi)) in chosen.iter().zip(endpoints::ranges(chosen.len())) {
                o.value(&map, Key::Range(base + lo, base + hi), Val::Endpoint(e.ip, e.port));
                if e.hairpin {
                    o.element(HAIRPIN, Key::Pair(e.ip, e.ip), None);
                }
            }
        }
        o.chain(chain, rules);
    };
    if svc_used {
        policy(&names.service, |e| e.cluster);
    }
    if svl_used {
        policy(&names.local, |e| e.local);
    }
    if ext_used {
        let mut rules = Vec::new();
        if !etp {
            rules.push(RuleSpec::new(vec![jump(MARK_FOR_MASQUERADE)]).comment("masquerade traffic from external"));
        } else if svc_used {
            if let Some(c) = a.cidr {
                rules.push(
                    RuleSpec::new(vec![
                        Stmt::SaddrCidr { cidr: c.clone(), negate: false },
                        Stmt::Verdict(goto(&names.service)),
                    ])
                    .comment("short-circuit pod traffic"),
                );
            }
            rules.push(
                RuleSpec::new(vec![Stmt::FibSaddrLocal, jump(MARK_FOR_MASQUERADE)]).comment("masquerade local traffic"),
            );
            rules.push(
                RuleSpec::new(vec![Stmt::FibSaddrLocal, Stmt::Verdict(goto(&names.service))])
                    .comment("short-circuit local traffic"),
            );
        }
        if let Some(t) = external {
            rules.push(RuleSpec::new(vec![Stmt::Verdict(goto(t))]));
        }
        o.chain(&names.external, rules);
    }
    if let Some(ranges) = a.ranges
        && !a.lb.is_empty()
    {
        let ret = Stmt::Verdict(Verdict::Return);
        let mut rules: Vec<RuleSpec> = ranges
            .iter()
            .map(|c| match c.prefix {
                0 => RuleSpec::new(vec![ret.clone()]),
                _ => RuleSpec::new(vec![Stmt::SaddrCidr { cidr: c.clone(), negate: false }, ret.clone()]),
            })
            .collect();
        // A node reaching its own LB IP loops back with that IP as source (kube-proxy's
        // "allowFromNode"): let it through when the ranges admit this node.
        if ranges.iter().any(|c| cfg.node_ips.iter().any(|ip| c.contains(*ip))) {
            rules.extend(a.lb.iter().map(|ip| RuleSpec::new(vec![Stmt::Saddr(*ip), ret.clone()])));
        }
        rules.push(
            RuleSpec::new(vec![Stmt::Verdict(Verdict::Drop)])
                .comment(&format!("{label} not in loadBalancerSourceRanges")),
        );
        o.chain(&names.firewall, rules);
        for ip in a.lb {
            o.element(layout::FIREWALL_IPS, Key::AddrProtoPort(*ip, proto, pn), Some(goto(&names.firewall)));
        }
    }
    let Some(seconds) = a.affinity else {
        if eps.len() > endpoints::SLOTS as usize {
            return Err(format!("only the first {} endpoints are used", endpoints::SLOTS));
        }
        return Ok(());
    };
    for e in eps.iter().filter(|e| (e.cluster && svc_used) || (e.local && svl_used)) {
        o.sets.insert(e.affinity.clone(), layout::affinity_set(f, &e.affinity, seconds));
        let rules = vec![
            RuleSpec::new(vec![Stmt::Saddr(e.ip), jump(MARK_FOR_MASQUERADE)]),
            RuleSpec::new(vec![Stmt::UpdateSaddr(e.affinity.clone())]),
            RuleSpec::new(vec![Stmt::L4proto(proto), Stmt::Dnat(e.ip, e.port)]),
        ];
        o.chain(&e.chain, rules);
    }
    Ok(())
}
