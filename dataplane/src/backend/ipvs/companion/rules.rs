//! kube-proxy's ipvs-mode iptables rules, in its order: fixed rules, and one rule per set while
//! that set has members (kube-proxy leaves a rule out when its set is empty, so the rules follow
//! the sets: [`render_rules`] takes the members).

use std::fmt::Write;

use kpx_ipvs_netlink::{Family, Protocol};

use super::{MARK_MASQ, Members, Set, has_members};

/// The jumps from the built-in chains, in their order in each chain: (table, chain, comment,
/// target).
pub const JUMPS: [(&str, &str, &str, &str); 8] = [
    ("nat", "PREROUTING", "kubernetes service portals", "KUBE-SERVICES"),
    ("nat", "OUTPUT", "kubernetes service portals", "KUBE-SERVICES"),
    ("nat", "POSTROUTING", "kubernetes postrouting rules", "KUBE-POSTROUTING"),
    ("filter", "INPUT", "kubernetes ipvs access filter", "KUBE-IPVS-FILTER"),
    ("filter", "INPUT", "kube-proxy firewall rules", "KUBE-PROXY-FIREWALL"),
    ("filter", "INPUT", "kubernetes health check rules", "KUBE-NODE-PORT"),
    ("filter", "FORWARD", "kube-proxy firewall rules", "KUBE-PROXY-FIREWALL"),
    ("filter", "FORWARD", "kubernetes forwarding rules", "KUBE-FORWARD"),
];

/// The sets whose rule is written only while they have members: (set, table, chain, target).
const PER_SET: [(Set, &str, &str, &str); 12] = [
    (Set::LoopBack, "nat", "KUBE-POSTROUTING", "MASQUERADE"),
    (Set::LoadBalancer, "nat", "KUBE-SERVICES", "KUBE-LOAD-BALANCER"),
    (Set::LoadBalancerLocal, "nat", "KUBE-LOAD-BALANCER", "RETURN"),
    (Set::NodePortLocal(Protocol::Tcp), "nat", "KUBE-NODE-PORT", "RETURN"),
    (Set::NodePort(Protocol::Tcp), "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ"),
    (Set::NodePortLocal(Protocol::Udp), "nat", "KUBE-NODE-PORT", "RETURN"),
    (Set::NodePort(Protocol::Udp), "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ"),
    (Set::NodePortLocal(Protocol::Sctp), "nat", "KUBE-NODE-PORT", "RETURN"),
    (Set::NodePort(Protocol::Sctp), "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ"),
    (Set::LoadBalancerFw, "filter", "KUBE-PROXY-FIREWALL", "KUBE-SOURCE-RANGES-FIREWALL"),
    (Set::LoadBalancerSourceCidr, "filter", "KUBE-SOURCE-RANGES-FIREWALL", "RETURN"),
    (Set::LoadBalancerSourceIp, "filter", "KUBE-SOURCE-RANGES-FIREWALL", "RETURN"),
];

/// The protocol match of a per-set rule: node port sets are per protocol.
fn protocol_match(set: Set) -> &'static str {
    match set {
        Set::NodePort(Protocol::Udp) | Set::NodePortLocal(Protocol::Udp) => "-p udp ",
        Set::NodePort(Protocol::Sctp) | Set::NodePortLocal(Protocol::Sctp) => "-p sctp ",
        Set::NodePort(_) | Set::NodePortLocal(_) => "-p tcp ",
        _ => "",
    }
}

/// Input for `iptables-restore --noflush`: kpx's filter and nat chains for `family`, whole (a
/// declaration flushes a chain). `cluster_cidr` (of `family`) limits ClusterIP masquerading to
/// off-cluster sources; `members` are the family's set members.
pub fn render_rules(family: Family, cluster_cidr: Option<&str>, masquerade_all: bool, members: &Members) -> String {
    let name = |s: Set| s.name(family);
    let filled = |s: Set| has_members(members, family, s);
    let rule = |set: Set| {
        format!("-m comment --comment \"{}\" -m set --match-set {} {}", set.comment(), name(set), set.match_type())
    };
    let (mut filter, mut nat) = (String::new(), String::new());
    for (set, table, chain, target) in PER_SET.iter().filter(|(s, ..)| filled(*s)) {
        let out = if *table == "nat" { &mut nat } else { &mut filter };
        let _ = writeln!(out, "-A {chain} {}{} -j {target}", protocol_match(*set), rule(*set));
    }
    // nat KUBE-SERVICES after its per-set rule, in kube-proxy's order.
    let mut services = String::new();
    let lo = if family == Family::Inet { "127.0.0.0/8" } else { "::1/128" };
    let _ = writeln!(services, "-A KUBE-SERVICES -s {lo} -j RETURN");
    let per_set_services: String =
        nat.lines().filter(|l| l.starts_with("-A KUBE-SERVICES ")).map(|l| format!("{l}\n")).collect();
    services.push_str(&per_set_services);
    if filled(Set::ClusterIp) {
        let cluster = rule(Set::ClusterIp);
        let cluster = cluster.trim_end_matches(" dst,dst");
        if masquerade_all {
            let _ = writeln!(services, "-A KUBE-SERVICES {cluster} dst,dst -j KUBE-MARK-MASQ");
        } else if let Some(cidr) = cluster_cidr {
            let _ = writeln!(services, "-A KUBE-SERVICES ! -s {cidr} {cluster} dst,dst -j KUBE-MARK-MASQ");
        } else {
            // Without a pod CIDR kube-proxy masquerades node-originated traffic from a VIP
            // (the node picks a VIP on kube-ipvs0 as the source to reach a VIP).
            let _ = writeln!(services, "-A KUBE-SERVICES {cluster} src,dst -j KUBE-MARK-MASQ");
        }
    }
    // Traffic to external IPs from off the machine (not from a bridge, not local) and to
    // external IPs the node holds is accepted; Cluster-policy ones are masqueraded first.
    let external = |out: &mut String, set: Set| {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES {} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT",
            rule(set)
        );
        let _ = writeln!(out, "-A KUBE-SERVICES {} -m addrtype --dst-type LOCAL -j ACCEPT", rule(set));
    };
    if filled(Set::ExternalIp) {
        let _ = writeln!(services, "-A KUBE-SERVICES {} -j KUBE-MARK-MASQ", rule(Set::ExternalIp));
        external(&mut services, Set::ExternalIp);
    }
    if filled(Set::ExternalIpLocal) {
        external(&mut services, Set::ExternalIpLocal);
    }
    let _ = writeln!(services, "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT");
    // Accept what IPVS serves, in case other rules would block it.
    for set in [Set::ClusterIp, Set::LoadBalancer].into_iter().filter(|s| filled(*s)) {
        let _ = writeln!(services, "-A KUBE-SERVICES -m set --match-set {} {} -j ACCEPT", name(set), set.match_type());
    }

    let mut out = String::from("*filter\n");
    for chain in
        ["KUBE-FORWARD", "KUBE-NODE-PORT", "KUBE-PROXY-FIREWALL", "KUBE-SOURCE-RANGES-FIREWALL", "KUBE-IPVS-FILTER"]
    {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out.push_str(&filter);
    out.push_str("-A KUBE-SOURCE-RANGES-FIREWALL -j DROP\n");
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MARK_MASQ} -j ACCEPT"
    );
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    let _ = writeln!(out, "-A KUBE-NODE-PORT {} -j ACCEPT", rule(Set::HealthCheckNodePort));
    // A service address answers only on its service ports (kubernetes#72236).
    for set in [Set::LoadBalancer, Set::ClusterIp, Set::ExternalIp, Set::ExternalIpLocal, Set::HealthCheckNodePort] {
        let _ = writeln!(out, "-A KUBE-IPVS-FILTER -m set --match-set {} {} -j RETURN", name(set), set.match_type());
    }
    let _ = writeln!(
        out,
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set {} dst -j REJECT",
        name(Set::IpvsIps)
    );
    out.push_str("COMMIT\n*nat\n");
    for chain in ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER"] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for l in nat.lines().filter(|l| !l.starts_with("-A KUBE-SERVICES ")) {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(&services);
    out.push_str("-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ\n");
    let _ = writeln!(out, "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000");
    let _ = writeln!(out, "-A KUBE-POSTROUTING -m mark ! --mark {MARK_MASQ} -j RETURN");
    out.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    out.push_str("COMMIT\n");
    out
}
