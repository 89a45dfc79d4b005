//! The ipsets and iptables rules that go with the IPVS table, as kube-proxy's ipvs mode (v1.28)
//! has them, set for set and rule for rule (checked against its output in UML:
//! tests/ipvs_conformance_uml.rs). IPVS alone cannot masquerade nor filter: traffic to a
//! ClusterIP from outside the cluster CIDR, to external and load-balancer addresses (Cluster
//! policy) and to NodePorts (Cluster policy) is marked in nat and masqueraded in POSTROUTING
//! (with `net.ipv4.vs.conntrack=1`), hairpin traffic is masqueraded (KUBE-LOOP-BACK), filter
//! KUBE-IPVS-FILTER rejects new connections to a service address on a port that is no service
//! port (so a host process listening on 0.0.0.0 is not reachable through a service IP),
//! KUBE-FORWARD accepts service traffic when FORWARD's policy is DROP, health check node ports
//! are accepted, and load-balancer source ranges are enforced (KUBE-SOURCE-RANGES-FIREWALL).
//! The rules are a handful, each present while its set has members, as kube-proxy writes them;
//! what varies lives in ipsets, replaced atomically with `ipset restore` (fill a temporary
//! set, swap, destroy) or changed member by member. Pure text here; apply.rs runs it.

mod rules;
mod sets;

use std::collections::BTreeMap;
use std::fmt::Write;

use kpx_ipvs_netlink::{Family, Protocol};

use super::plan::{Desired, DesiredService, Key, VipKind};
pub use rules::{JUMPS, render_rules};
pub use sets::Set;

pub const MARK_MASQ: &str = "0x4000/0x4000";

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
        _ => "tcp",
    }
}

/// The members of every set of `family`: (set name, entry as `ipset` writes it) -> how many
/// virtual servers call for it (a real server behind two services is one LOOP-BACK member).
pub type Members = BTreeMap<(String, String), u32>;

/// What the sets of `family` should hold.
pub fn members(family: Family, desired: &Desired) -> Members {
    let mut out = Members::new();
    for (key, s) in &desired.services {
        for_members(family, key, s, |m| *out.entry(m).or_default() += 1);
    }
    out
}

/// Whether `set` (of `family`) has a member in `members`.
pub fn has_members(members: &Members, family: Family, set: Set) -> bool {
    let name = set.name(family);
    members.range((name.clone(), String::new())..).next().is_some_and(|((s, _), _)| *s == name)
}

/// Calls `f` with each set member that the virtual server `key` calls for (if of `family`),
/// as kube-proxy fills its sets per service port.
fn for_members(family: Family, key: &Key, s: &DesiredService, mut f: impl FnMut((String, String))) {
    if Family::of(key.addr.ip()) != family {
        return;
    }
    let (ip, port, p) = (key.addr.ip(), key.addr.port(), proto(key.protocol));
    let mut add = |set: Set, member: String| f((set.name(family), member));
    let ip_port = format!("{ip},{p}:{port}");
    match s.kind {
        VipKind::Cluster => {
            add(Set::ClusterIp, ip_port);
            add(Set::IpvsIps, ip.to_string());
            // Hairpin: an endpoint reaching itself through the service (its own address is
            // the source), once per service port.
            for d in &s.loop_back {
                add(Set::LoopBack, format!("{},{p}:{},{}", d.ip(), d.port(), d.ip()));
            }
            if let Some(hc) = s.health_check_port {
                add(Set::HealthCheckNodePort, hc.to_string());
            }
        }
        VipKind::External => {
            add(if s.local { Set::ExternalIpLocal } else { Set::ExternalIp }, ip_port);
            add(Set::IpvsIps, ip.to_string());
        }
        VipKind::LoadBalancer => {
            add(Set::LoadBalancer, ip_port.clone());
            if s.local {
                add(Set::LoadBalancerLocal, ip_port.clone());
            }
            if let Some(ranges) = &s.source_ranges {
                add(Set::LoadBalancerFw, ip_port.clone());
                for r in ranges {
                    add(Set::LoadBalancerSourceCidr, format!("{ip_port},{r}"));
                }
                if s.allow_from_node {
                    add(Set::LoadBalancerSourceIp, format!("{ip_port},{ip}"));
                }
            }
            add(Set::IpvsIps, ip.to_string());
        }
        VipKind::NodePort => {
            // Every node port is in the masquerade set; Local ones also in the set whose
            // RETURN comes first. SCTP sets hold node address and port, the others the port.
            let member = if key.protocol == Protocol::Sctp { ip_port } else { port.to_string() };
            add(Set::NodePort(key.protocol), member.clone());
            if s.local {
                add(Set::NodePortLocal(key.protocol), member);
            }
        }
    }
}

/// Updates `members` (of `family`) for virtual servers that went away or changed (`old`, as they
/// were) and that are there now (`new`), and returns the `ipset restore` input for the members
/// that appeared or disappeared: work in proportion to the virtual servers that changed.
pub fn update_members<'a>(
    family: Family,
    members: &mut Members,
    old: impl IntoIterator<Item = (&'a Key, &'a DesiredService)>,
    new: impl IntoIterator<Item = (&'a Key, &'a DesiredService)>,
) -> String {
    // Net change per member, then what crossed zero.
    let mut net: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (k, s) in old {
        for_members(family, k, s, |m| *net.entry(m).or_default() -= 1);
    }
    for (k, s) in new {
        for_members(family, k, s, |m| *net.entry(m).or_default() += 1);
    }
    let (mut del, mut add) = (String::new(), String::new());
    for (m, n) in net.into_iter().filter(|(_, n)| *n != 0) {
        let before = members.get(&m).copied().unwrap_or(0);
        let after = (i64::from(before) + n).max(0) as u32;
        match (before, after) {
            (0, 0) => {}
            (_, 0) => {
                let _ = writeln!(del, "del {} {} -exist", m.0, m.1);
                members.remove(&m);
            }
            (0, _) => {
                let _ = writeln!(add, "add {} {} -exist", m.0, m.1);
                members.insert(m, after);
            }
            _ => {
                members.insert(m, after);
            }
        }
    }
    del + &add
}

/// Input for `ipset restore` that replaces every set of `family` by `members`, atomically per
/// set (built in a temporary set, then swapped in).
pub fn render_ipsets(family: Family, members: &Members) -> String {
    let mut out = String::new();
    for (i, set) in Set::ALL.iter().enumerate() {
        let (name, kind) = (set.name(family), set.kind(family));
        let temp = Set::temp(family, i);
        let _ = writeln!(out, "create {name} {kind} -exist");
        let _ = writeln!(out, "create {temp} {kind} -exist");
        let _ = writeln!(out, "flush {temp}");
        for ((_, m), _) in members.range((name.clone(), String::new())..).take_while(|((s, _), _)| *s == name) {
            let _ = writeln!(out, "add {temp} {m} -exist");
        }
        let _ = writeln!(out, "swap {temp} {name}");
        let _ = writeln!(out, "destroy {temp}");
    }
    out
}

/// Input for `ipset restore` that turns sets holding `old` into sets holding `new`: one line
/// per changed member (an endpoint change is a line or two, not the whole set again).
pub fn render_ipset_delta(old: &Members, new: &Members) -> String {
    let mut out = String::new();
    for (set, m) in old.keys().filter(|m| !new.contains_key(*m)) {
        let _ = writeln!(out, "del {set} {m} -exist");
    }
    for (set, m) in new.keys().filter(|m| !old.contains_key(*m)) {
        let _ = writeln!(out, "add {set} {m} -exist");
    }
    out
}

#[cfg(test)]
mod tests;
