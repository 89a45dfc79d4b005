//! The iptables rules and ipsets that go with the IPVS table, as in kube-proxy's ipvs mode:
//! IPVS alone cannot masquerade, so traffic to a ClusterIP from outside the cluster CIDR, to
//! external addresses and to NodePorts (Cluster policy) is marked in nat PREROUTING/OUTPUT and
//! masqueraded in POSTROUTING (with `net.ipv4.vs.conntrack=1` so that IPVS connections pass
//! netfilter), and so is hairpin traffic (a pod reaching itself through a service, KUBE-LOOP-BACK).
//! The rules are a constant handful; what varies lives in ipsets, replaced atomically with
//! `ipset restore` (fill a temporary set, swap, destroy). Pure text here; apply.rs runs it.

use std::collections::BTreeMap;
use std::fmt::Write;

use kpx_ipvs_netlink::{Family, Protocol};

use super::plan::{Desired, DesiredService, Key, VipKind};

pub const MARK_MASQ: &str = "0x4000/0x4000";

const MAX_ELEM: u32 = 1 << 22;

const LB_FIREWALL: &str = "kubernetes load balancer firewall";

/// The jumps from the built-in chains: (table, chain, comment, target).
pub const JUMPS: [(&str, &str, &str, &str); 4] = [
    ("nat", "PREROUTING", "kubernetes service portals", "KUBE-SERVICES"),
    ("nat", "OUTPUT", "kubernetes service portals", "KUBE-SERVICES"),
    ("nat", "POSTROUTING", "kubernetes postrouting rules", "KUBE-POSTROUTING"),
    ("filter", "INPUT", LB_FIREWALL, "KUBE-PROXY-FIREWALL"),
];

/// The ipsets, by role; names follow kube-proxy (IPv6 ones get a `KUBE-6-` prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Set {
    ClusterIp,
    ExternalIp,
    LoopBack,
    NodePort(Protocol),
    NodePortLocal(Protocol),
    /// LoadBalancer IP,proto:port with source ranges.
    LoadBalancerFw,
    /// LoadBalancer IP,proto:port,allowed source CIDR.
    LoadBalancerSourceCidr,
}

const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

impl Set {
    fn base(self) -> String {
        let p = |p: Protocol| p.to_string();
        match self {
            Set::ClusterIp => "CLUSTER-IP".into(),
            Set::ExternalIp => "EXTERNAL-IP".into(),
            Set::LoopBack => "LOOP-BACK".into(),
            Set::NodePort(proto) => format!("NODE-PORT-{}", p(proto)),
            Set::NodePortLocal(proto) => format!("NODE-PORT-LOCAL-{}", p(proto)),
            Set::LoadBalancerFw => "LOAD-BALANCER-FW".into(),
            // kube-proxy's "LOAD-BALANCER-SOURCE-CIDR" is too long for an IPv6 set name.
            Set::LoadBalancerSourceCidr => "LOAD-BALANCER-SRC-CIDR".into(),
        }
    }

    fn name(self, family: Family) -> String {
        match family {
            Family::Inet => format!("KUBE-{}", self.base()),
            Family::Inet6 => format!("KUBE-6-{}", self.base()),
        }
    }

    /// The temporary set a replacement is built in (ipset names have at most 31 characters).
    fn temp(self, family: Family) -> String {
        let v = if family == Family::Inet { "" } else { "6-" };
        format!("KPX-T{v}{}", self.base())
    }

    /// Hash sets get a `maxelem` far above ipset's default of 65536, which LOOP-BACK (one member
    /// per real server) passes at 100,000 endpoints; a hash set only allocates what it holds.
    fn kind(self, family: Family) -> String {
        let f = if family == Family::Inet { "inet" } else { "inet6" };
        match self {
            Set::ClusterIp | Set::ExternalIp | Set::LoadBalancerFw => {
                format!("hash:ip,port family {f} maxelem {MAX_ELEM}")
            }
            Set::LoadBalancerSourceCidr => format!("hash:ip,port,net family {f} maxelem {MAX_ELEM}"),
            Set::LoopBack => format!("hash:ip,port,ip family {f} maxelem {MAX_ELEM}"),
            Set::NodePort(_) | Set::NodePortLocal(_) => "bitmap:port range 0-65535".into(),
        }
    }

    fn all() -> Vec<Set> {
        let mut v =
            vec![Set::ClusterIp, Set::ExternalIp, Set::LoopBack, Set::LoadBalancerFw, Set::LoadBalancerSourceCidr];
        v.extend(PROTOCOLS.map(Set::NodePort));
        v.extend(PROTOCOLS.map(Set::NodePortLocal));
        v
    }
}

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

/// Calls `f` with each set member that the virtual server `key` calls for (if of `family`).
fn for_members(family: Family, key: &Key, s: &DesiredService, mut f: impl FnMut((String, String))) {
    if Family::of(key.addr.ip()) != family {
        return;
    }
    let (ip, port, p) = (key.addr.ip(), key.addr.port(), proto(key.protocol));
    let set = match s.kind {
        VipKind::Cluster => Some((Set::ClusterIp, format!("{ip},{p}:{port}"))),
        VipKind::External if !s.local => Some((Set::ExternalIp, format!("{ip},{p}:{port}"))),
        VipKind::External => None,
        VipKind::NodePort if s.local => Some((Set::NodePortLocal(key.protocol), port.to_string())),
        VipKind::NodePort => Some((Set::NodePort(key.protocol), port.to_string())),
    };
    if let Some((set, m)) = set {
        f((set.name(family), m));
    }
    if let Some(ranges) = &s.source_ranges {
        f((Set::LoadBalancerFw.name(family), format!("{ip},{p}:{port}")));
        for r in ranges {
            f((Set::LoadBalancerSourceCidr.name(family), format!("{ip},{p}:{port},{r}")));
        }
    }
    for d in s.dests.values() {
        f((Set::LoopBack.name(family), format!("{},{p}:{},{}", d.addr, d.port, d.addr)));
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
    for set in Set::all() {
        let (name, temp, kind) = (set.name(family), set.temp(family), set.kind(family));
        let _ = writeln!(out, "create {name} {kind} -exist");
        let _ = writeln!(out, "create {temp} {kind} -exist");
        let _ = writeln!(out, "flush {temp}");
        for ((_, m), _) in members.iter().filter(|((s, _), _)| *s == name) {
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

/// Input for `iptables-restore --noflush`: kpx's filter and nat chains, whole (a declaration
/// flushes a chain). The filter part drops connections to a LoadBalancer IP with source ranges
/// from any other source (filter INPUT runs before IPVS takes the packet). `cluster_cidr` (of `family`) limits ClusterIP masquerading to off-cluster sources;
/// without it only `masquerade_all` masquerades ClusterIP traffic.
pub fn render_rules(family: Family, cluster_cidr: Option<&str>, masquerade_all: bool) -> String {
    let set = |s: Set| s.name(family);
    let mut out = String::from("*filter\n:KUBE-PROXY-FIREWALL - [0:0]\n");
    let _ = writeln!(
        out,
        "-A KUBE-PROXY-FIREWALL -m comment --comment \"{LB_FIREWALL}\" -m set --match-set {} dst,dst -m set ! --match-set {} dst,dst,src -j DROP",
        set(Set::LoadBalancerFw),
        set(Set::LoadBalancerSourceCidr)
    );
    out.push_str("COMMIT\n*nat\n");
    for chain in ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-NODE-PORT"] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    let cluster = set(Set::ClusterIp);
    let comment = "-m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\"";
    if masquerade_all {
        let _ = writeln!(out, "-A KUBE-SERVICES {comment} -m set --match-set {cluster} dst,dst -j KUBE-MARK-MASQ");
    } else if let Some(cidr) = cluster_cidr {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES {comment} -m set --match-set {cluster} dst,dst ! -s {cidr} -j KUBE-MARK-MASQ"
        );
    }
    let _ = writeln!(out, "-A KUBE-SERVICES -m set --match-set {} dst,dst -j KUBE-MARK-MASQ", set(Set::ExternalIp));
    let _ = writeln!(out, "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT");
    for p in PROTOCOLS {
        let _ = writeln!(
            out,
            "-A KUBE-NODE-PORT -p {pr} -m set --match-set {} dst -j RETURN",
            set(Set::NodePortLocal(p)),
            pr = proto(p)
        );
        let _ = writeln!(
            out,
            "-A KUBE-NODE-PORT -p {pr} -m set --match-set {} dst -j KUBE-MARK-MASQ",
            set(Set::NodePort(p)),
            pr = proto(p)
        );
    }
    let _ = writeln!(out, "-A KUBE-MARK-MASQ -j MARK --set-xmark {MARK_MASQ}");
    let _ = writeln!(
        out,
        "-A KUBE-POSTROUTING -m comment --comment \"Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose\" -m set --match-set {} dst,dst,src -j MASQUERADE",
        set(Set::LoopBack)
    );
    let _ = writeln!(out, "-A KUBE-POSTROUTING -m mark ! --mark {MARK_MASQ} -j RETURN");
    let _ = writeln!(out, "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000");
    let _ = writeln!(
        out,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE"
    );
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ipvs::plan::{DesiredService, Key};
    use kpx_ipvs_netlink::{Destination, Service};

    #[test]
    fn sets_hold_the_addresses_by_role() {
        let mut d = Desired::default();
        let mut add = |addr: &str, kind, local| {
            let service = Service::new(Protocol::Tcp, addr.parse().unwrap(), "rr");
            let ep = Destination::new("10.244.0.11:8080".parse().unwrap(), 1);
            let dests = [(ep.socket_addr(), ep)].into();
            let want = DesiredService { service, dests, kind, local, source_ranges: None };
            d.services.insert(Key::of(&want.service), want);
        };
        add("10.96.0.10:80", VipKind::Cluster, false);
        add("192.168.0.10:30080", VipKind::NodePort, false);
        add("192.168.0.10:30081", VipKind::NodePort, true);
        let text = render_ipsets(Family::Inet, &members(Family::Inet, &d));
        assert!(text.contains("add KPX-TCLUSTER-IP 10.96.0.10,tcp:80 -exist\n"), "{text}");
        assert!(text.contains("add KPX-TNODE-PORT-TCP 30080 -exist\n"), "{text}");
        assert!(text.contains("add KPX-TNODE-PORT-LOCAL-TCP 30081 -exist\n"), "{text}");
        assert_eq!(text.matches("add KPX-TLOOP-BACK 10.244.0.11,tcp:8080,10.244.0.11").count(), 1, "{text}");
        assert!(text.contains("swap KPX-TCLUSTER-IP KUBE-CLUSTER-IP\n"), "{text}");
        assert!(members(Family::Inet6, &d).is_empty(), "an IPv4 entry in the IPv6 sets");
        let old = members(Family::Inet, &d);
        d.services.retain(|k, _| k.addr.port() != 30081);
        let delta = render_ipset_delta(&old, &members(Family::Inet, &d));
        assert_eq!(delta, "del KUBE-NODE-PORT-LOCAL-TCP 30081 -exist\n");
        let nat = render_rules(Family::Inet, Some("10.244.0.0/16"), false);
        assert!(nat.contains("--match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"), "{nat}");
        assert!(render_rules(Family::Inet6, None, true).contains("--match-set KUBE-6-CLUSTER-IP dst,dst -j KUBE-MARK"));
    }
}
