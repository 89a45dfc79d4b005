use super::*;
use crate::backend::ipvs::plan::{DesiredService, Key};
use kpx_ipvs_netlink::{Destination, Service};

fn vs(addr: &str, kind: VipKind, local: bool) -> DesiredService {
    let service = Service::new(Protocol::Tcp, addr.parse().unwrap(), "rr");
    let ep = Destination::new("10.244.0.11:8080".parse().unwrap(), 1);
    DesiredService {
        service,
        dests: [(ep.socket_addr(), ep)].into(),
        kind,
        local,
        source_ranges: None,
        allow_from_node: false,
        loop_back: Vec::new(),
        health_check_port: None,
    }
}

fn desired(list: Vec<DesiredService>) -> Desired {
    let mut d = Desired::default();
    for want in list {
        d.services.insert(Key::of(&want.service), want);
    }
    d
}

fn members_of(m: &Members, set: &str) -> Vec<String> {
    m.keys().filter(|(s, _)| s == set).map(|(_, v)| v.clone()).collect()
}

#[test]
fn sets_hold_the_addresses_by_role_as_kube_proxy_fills_them() {
    let mut cluster = vs("10.96.0.10:80", VipKind::Cluster, false);
    cluster.loop_back = vec!["10.244.0.11:8080".parse().unwrap()];
    cluster.health_check_port = Some(31000);
    let mut lb = vs("203.0.113.7:80", VipKind::LoadBalancer, true);
    lb.source_ranges = Some(vec!["198.51.100.0/24".into(), "192.168.0.0/16".into()]);
    lb.allow_from_node = true;
    let d = desired(vec![
        cluster,
        vs("192.0.2.5:80", VipKind::External, false),
        vs("192.0.2.6:80", VipKind::External, true),
        lb,
        vs("192.168.0.10:30080", VipKind::NodePort, false),
        vs("192.168.0.10:30081", VipKind::NodePort, true),
    ]);
    let m = members(Family::Inet, &d);
    assert_eq!(members_of(&m, "KUBE-CLUSTER-IP"), ["10.96.0.10,tcp:80"]);
    assert_eq!(members_of(&m, "KUBE-IPVS-IPS"), ["10.96.0.10", "192.0.2.5", "192.0.2.6", "203.0.113.7"]);
    assert_eq!(members_of(&m, "KUBE-LOOP-BACK"), ["10.244.0.11,tcp:8080,10.244.0.11"]);
    assert_eq!(members_of(&m, "KUBE-HEALTH-CHECK-NODE-PORT"), ["31000"]);
    assert_eq!(members_of(&m, "KUBE-EXTERNAL-IP"), ["192.0.2.5,tcp:80"]);
    assert_eq!(members_of(&m, "KUBE-EXTERNAL-IP-LOCAL"), ["192.0.2.6,tcp:80"]);
    assert_eq!(members_of(&m, "KUBE-LOAD-BALANCER"), ["203.0.113.7,tcp:80"]);
    assert_eq!(members_of(&m, "KUBE-LOAD-BALANCER-LOCAL"), ["203.0.113.7,tcp:80"]);
    assert_eq!(members_of(&m, "KUBE-LOAD-BALANCER-FW"), ["203.0.113.7,tcp:80"]);
    assert_eq!(
        members_of(&m, "KUBE-LOAD-BALANCER-SOURCE-CIDR"),
        ["203.0.113.7,tcp:80,192.168.0.0/16", "203.0.113.7,tcp:80,198.51.100.0/24"]
    );
    assert_eq!(members_of(&m, "KUBE-LOAD-BALANCER-SOURCE-IP"), ["203.0.113.7,tcp:80,203.0.113.7"]);
    // Every node port in the masquerade set; the Local one also in the set that RETURNs first.
    assert_eq!(members_of(&m, "KUBE-NODE-PORT-TCP"), ["30080", "30081"]);
    assert_eq!(members_of(&m, "KUBE-NODE-PORT-LOCAL-TCP"), ["30081"]);
    assert!(members(Family::Inet6, &d).is_empty(), "an IPv4 entry in the IPv6 sets");

    let text = render_ipsets(Family::Inet, &m);
    assert!(text.contains("create KUBE-LOOP-BACK hash:ip,port,ip family inet maxelem 4194304 -exist\n"), "{text}");
    assert!(text.contains("create KUBE-NODE-PORT-TCP bitmap:port range 0-65535 -exist\n"), "{text}");
    assert!(text.contains("swap KPX-T4-1 KUBE-CLUSTER-IP\n"), "{text}");
    let old = m.clone();
    let d2 = desired(d.services.into_values().filter(|s| s.service.socket_addr().port() != 30081).collect());
    let delta = render_ipset_delta(&old, &members(Family::Inet, &d2));
    assert_eq!(delta, "del KUBE-NODE-PORT-LOCAL-TCP 30081 -exist\ndel KUBE-NODE-PORT-TCP 30081 -exist\n");
}

#[test]
fn ipv6_names_are_cut_to_ipsets_length_as_kube_proxy_cuts_them() {
    assert_eq!(Set::LoadBalancerSourceCidr.name(Family::Inet6), "KUBE-6-LOAD-BALANCER-SOURCE-CID");
    assert_eq!(Set::NodePortLocal(Protocol::Sctp).name(Family::Inet6), "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS");
    assert_eq!(Set::LoadBalancerSourceCidr.name(Family::Inet), "KUBE-LOAD-BALANCER-SOURCE-CIDR");
    for (i, set) in Set::ALL.iter().enumerate() {
        for f in [Family::Inet, Family::Inet6] {
            assert!(set.name(f).len() <= 31 && Set::temp(f, i).len() <= 31);
        }
    }
}

#[test]
fn a_sets_rule_is_there_while_the_set_has_members() {
    let empty = render_rules(Family::Inet, Some("10.244.0.0/16"), false, &Members::new());
    // Always there: the filter, forwarding, health check and firewall fallback rules.
    for line in [
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A KUBE-NODE-PORT -m comment --comment \"Kubernetes health check node port\" -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT",
        "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP",
        "-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN",
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
    ] {
        assert!(empty.lines().any(|l| l == line), "{line}\n{empty}");
    }
    assert!(
        !empty.contains("KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ") && !empty.contains("KUBE-LOOP-BACK"),
        "{empty}"
    );

    let mut m = Members::new();
    m.insert(("KUBE-CLUSTER-IP".into(), "10.96.0.10,tcp:80".into()), 1);
    m.insert(("KUBE-NODE-PORT-UDP".into(), "30053".into()), 1);
    let filled = render_rules(Family::Inet, Some("10.244.0.0/16"), false, &m);
    assert!(filled.contains("-A KUBE-SERVICES ! -s 10.244.0.0/16 -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ\n"), "{filled}");
    assert!(filled.contains("-A KUBE-NODE-PORT -p udp -m comment --comment \"Kubernetes nodeport UDP port for masquerade purpose\" -m set --match-set KUBE-NODE-PORT-UDP dst -j KUBE-MARK-MASQ\n"), "{filled}");
    assert!(filled.contains("-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT\n"), "{filled}");
    assert!(!filled.contains("KUBE-NODE-PORT-TCP"), "{filled}");
    // Without a pod CIDR, node-originated traffic from a VIP is masqueraded (src,dst).
    let no_cidr = render_rules(Family::Inet, None, false, &m);
    assert!(no_cidr.contains("--match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ"), "{no_cidr}");
    let all = render_rules(Family::Inet, None, true, &m);
    assert!(all.contains("--match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ") && !all.contains("! -s"), "{all}");
    let v6 = render_rules(Family::Inet6, Some("fd00:244::/64"), false, &Members::new());
    assert!(
        v6.contains("-A KUBE-SERVICES -s ::1/128 -j RETURN") && v6.contains("KUBE-6-IPVS-IPS dst -j REJECT"),
        "{v6}"
    );
}
