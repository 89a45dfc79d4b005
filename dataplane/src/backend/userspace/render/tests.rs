//! Golden restore text. Address conventions used throughout:
//!
//! ```text
//! cluster IPs      10.96.0.0/16, fd00:96::/64     pod CIDR        10.244.0.0/16
//! external IPs     198.51.100.0/24                 node IP         10.77.0.10
//! LB IPs           203.0.113.0/24                  endpoints       10.244.x.y:8080
//! portal ports     41000 + n (what the kernel would have picked)
//! ```

use std::collections::BTreeMap;

use kpx_proto::v1 as pb;

use super::*;
use crate::backend::userspace::plan::tests::{endpoint, entry, service};
use crate::backend::userspace::plan::{PlanConfig, plan_service};

/// Plans `e` and gives its portals ports 41000, 41001, ... in key order.
fn render(
    cfg: &PlanConfig,
    family: IpFamily,
    e: &crate::state::ServiceEntry,
) -> (ServiceLines, BTreeMap<PortalKey, u16>) {
    let plan = plan_service(cfg, family, e);
    let ports: BTreeMap<PortalKey, u16> = plan.portals.keys().cloned().zip(41000..).collect();
    (render_service(&plan.ports, &ports), ports)
}

fn cfg() -> PlanConfig {
    PlanConfig { cluster_cidrs: vec!["10.244.0.0/16".into()], node_ips: vec!["10.77.0.10".parse().unwrap()] }
}

fn text(lines: &ServiceLines) -> String {
    lines.nat.iter().chain(&lines.filter).map(|l| format!("{l}\n")).collect()
}

#[test]
fn cluster_ip_redirects_pods_and_dnats_the_node_to_the_loopback() {
    let e = entry(service("web", "10.96.0.10", pb::Protocol::Tcp), vec![endpoint("10.244.1.2", true, false)]);
    let (lines, _) = render(&cfg(), IpFamily::V4, &e);
    assert_eq!(
        text(&lines),
        r#"-A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j REDIRECT --to-ports 41000
-A KUBE-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:41000
-A KUBE-PORTALS-FILTER -p tcp -m comment --comment "ns/web:p proxy port" -m addrtype --dst-type LOCAL -m tcp --dport 41000 -m conntrack ! --ctstate DNAT -j DROP
"#
    );
}

#[test]
fn no_endpoints_rejects_and_ipv6_dnats_to_the_ipv6_loopback() {
    let e = entry(service("dns", "fd00:96::20", pb::Protocol::Udp), vec![]);
    let (lines, _) = render(&cfg(), IpFamily::V6, &e);
    assert_eq!(
        text(&lines),
        r#"-A KUBE-PORTALS-FILTER -d fd00:96::20/128 -p udp -m comment --comment "ns/dns:p has no endpoints" -m udp --dport 80 -j REJECT
-A KUBE-PORTALS-FILTER -p udp -m comment --comment "ns/dns:p proxy port" -m addrtype --dst-type LOCAL -m udp --dport 41000 -m conntrack ! --ctstate DNAT -j DROP
"#
    );
    let e = entry(service("dns", "fd00:96::20", pb::Protocol::Udp), vec![endpoint("fd00:244:1::2", true, false)]);
    let (lines, _) = render(&cfg(), IpFamily::V6, &e);
    assert!(
        lines.nat.contains(&"-A KUBE-PORTALS-HOST -d fd00:96::20/128 -p udp -m comment --comment \"ns/dns:p\" -m udp --dport 80 -j DNAT --to-destination [::1]:41000".to_string()),
        "{lines:?}"
    );
}

#[test]
fn node_port_and_external_ip_with_cluster_policy() {
    let mut s = service("web", "10.96.0.11", pb::Protocol::Tcp);
    s.ports[0].node_port = 30080;
    s.external_ips = vec!["198.51.100.10".into()];
    let e = entry(s, vec![endpoint("10.244.1.2", true, false), endpoint("10.244.2.2", true, false)]);
    let (lines, _) = render(&cfg(), IpFamily::V4, &e);
    assert_eq!(
        text(&lines),
        r#"-A KUBE-PORTALS-CONTAINER -d 10.96.0.11/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j REDIRECT --to-ports 41000
-A KUBE-PORTALS-HOST -d 10.96.0.11/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:41000
-A KUBE-PORTALS-CONTAINER -d 198.51.100.10/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j REDIRECT --to-ports 41000
-A KUBE-PORTALS-HOST -d 198.51.100.10/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:41000
-A KUBE-NODEPORT-CONTAINER -p tcp -m comment --comment "ns/web:p" -m tcp --dport 30080 -j REDIRECT --to-ports 41000
-A KUBE-NODEPORT-HOST -p tcp -m comment --comment "ns/web:p" -m tcp --dport 30080 -j DNAT --to-destination 127.0.0.1:41000
-A KUBE-PORTALS-FILTER -p tcp -m comment --comment "ns/web:p proxy port" -m addrtype --dst-type LOCAL -m tcp --dport 41000 -m conntrack ! --ctstate DNAT -j DROP
"#
    );
}

#[test]
fn external_local_policy_sends_pods_and_the_node_cluster_wide_and_drops_without_local_endpoints() {
    let mut s = service("web", "10.96.0.12", pb::Protocol::Tcp);
    s.ports[0].node_port = 30081;
    s.external_policy_local = true;
    s.families_with_endpoints = vec!["IPv4".into()];
    // This node hosts 10.244.1.2; 10.244.2.2 is elsewhere.
    let e = entry(s.clone(), vec![endpoint("10.244.1.2", true, true), endpoint("10.244.2.2", true, false)]);
    let (lines, ports) = render(&cfg(), IpFamily::V4, &e);
    // 41000: the Cluster portal, 41001: the Local one.
    assert_eq!(ports.values().copied().collect::<Vec<_>>(), [41000, 41001]);
    assert_eq!(
        text(&lines),
        r#"-A KUBE-PORTALS-CONTAINER -d 10.96.0.12/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j REDIRECT --to-ports 41000
-A KUBE-PORTALS-HOST -d 10.96.0.12/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:41000
-A KUBE-NODEPORT-CONTAINER -s 10.244.0.0/16 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 30081 -j REDIRECT --to-ports 41000
-A KUBE-NODEPORT-CONTAINER -p tcp -m comment --comment "ns/web:p" -m tcp --dport 30081 -j REDIRECT --to-ports 41001
-A KUBE-NODEPORT-HOST -p tcp -m comment --comment "ns/web:p" -m tcp --dport 30081 -j DNAT --to-destination 127.0.0.1:41000
-A KUBE-PORTALS-FILTER -p tcp -m comment --comment "ns/web:p proxy port" -m addrtype --dst-type LOCAL -m tcp --dport 41000 -m conntrack ! --ctstate DNAT -j DROP
-A KUBE-PORTALS-FILTER -p tcp -m comment --comment "ns/web:p proxy port" -m addrtype --dst-type LOCAL -m tcp --dport 41001 -m conntrack ! --ctstate DNAT -j DROP
"#
    );
    // Another node, without a local endpoint: outside clients are dropped, pods and the node
    // itself still reach the service cluster-wide.
    let e = entry(s, vec![endpoint("10.244.2.2", true, false)]);
    let (lines, _) = render(&cfg(), IpFamily::V4, &e);
    let t = text(&lines);
    assert!(t.contains("-A KUBE-NODEPORT-CONTAINER -s 10.244.0.0/16 -p tcp -m comment --comment \"ns/web:p\" -m tcp --dport 30081 -j REDIRECT --to-ports 41000\n"), "{t}");
    assert!(!t.contains("--to-ports 41001"), "{t}");
    assert!(t.contains("-A KUBE-PORTALS-FILTER -p tcp -m comment --comment \"ns/web:p has no local endpoints\" -m addrtype --dst-type LOCAL -m tcp --dport 30081 -j DROP\n"), "{t}");
}

#[test]
fn load_balancer_source_ranges_admit_listed_sources_and_the_node() {
    let mut s = service("web", "10.96.0.13", pb::Protocol::Tcp);
    s.load_balancer_ips = vec!["203.0.113.10".into()];
    s.load_balancer_source_ranges = vec!["10.77.0.0/24".into(), "0.0.0.0/0".into()];
    let e = entry(s, vec![endpoint("10.244.1.2", true, false)]);
    let (lines, _) = render(&cfg(), IpFamily::V4, &e);
    let t = text(&lines);
    assert_eq!(
        t.lines().filter(|l| l.contains("203.0.113.10")).collect::<Vec<_>>(),
        [
            r#"-A KUBE-PORTALS-CONTAINER -s 10.77.0.0/24 -d 203.0.113.10/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j REDIRECT --to-ports 41000"#,
            r#"-A KUBE-PORTALS-HOST -s 10.77.0.0/24 -d 203.0.113.10/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:41000"#,
            r#"-A KUBE-PORTALS-CONTAINER -d 203.0.113.10/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j REDIRECT --to-ports 41000"#,
            r#"-A KUBE-PORTALS-HOST -d 203.0.113.10/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:41000"#,
            r#"-A KUBE-PORTALS-CONTAINER -s 203.0.113.10/32 -d 203.0.113.10/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j REDIRECT --to-ports 41000"#,
            r#"-A KUBE-PORTALS-HOST -s 203.0.113.10/32 -d 203.0.113.10/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:41000"#,
            r#"-A KUBE-PORTALS-FILTER -d 203.0.113.10/32 -p tcp -m comment --comment "ns/web:p traffic not accepted by loadBalancerSourceRanges" -m tcp --dport 80 -j DROP"#,
        ]
    );
}

#[test]
fn a_portal_without_a_port_gets_no_rule() {
    let e = entry(service("web", "10.96.0.10", pb::Protocol::Tcp), vec![endpoint("10.244.1.2", true, false)]);
    let plan = plan_service(&cfg(), IpFamily::V4, &e);
    assert_eq!(render_service(&plan.ports, &BTreeMap::new()), ServiceLines::default());
}

#[test]
fn full_restore_declares_every_chain_and_ends_with_the_node_port_jumps() {
    let e = entry(service("web", "10.96.0.10", pb::Protocol::Tcp), vec![endpoint("10.244.1.2", true, false)]);
    let (lines, _) = render(&cfg(), IpFamily::V4, &e);
    let ips = ["10.77.0.10".parse().unwrap()];
    let full = render_full(IpFamily::V4, &ips, std::iter::once(&lines), "# filter extra\n", "# nat extra\n");
    assert_eq!(
        full,
        r#"*filter
:KUBE-PORTALS-FILTER - [0:0]
# filter extra
-A KUBE-PORTALS-FILTER -p tcp -m comment --comment "ns/web:p proxy port" -m addrtype --dst-type LOCAL -m tcp --dport 41000 -m conntrack ! --ctstate DNAT -j DROP
COMMIT
*nat
:KUBE-PORTALS-CONTAINER - [0:0]
:KUBE-PORTALS-HOST - [0:0]
:KUBE-NODEPORT-CONTAINER - [0:0]
:KUBE-NODEPORT-HOST - [0:0]
# nat extra
-A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j REDIRECT --to-ports 41000
-A KUBE-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:41000
-A KUBE-PORTALS-CONTAINER -d 10.77.0.10/32 -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -j KUBE-NODEPORT-CONTAINER
-A KUBE-PORTALS-HOST -d 10.77.0.10/32 -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -j KUBE-NODEPORT-HOST
COMMIT
"#
    );
    // Without --node-ip: every local address.
    let mut out = String::new();
    nodeport_jumps(IpFamily::V6, &ips, &mut out);
    assert!(out.lines().all(|l| l.contains("-m addrtype --dst-type LOCAL")) && out.lines().count() == 2, "{out}");
}

#[test]
fn partial_restore_replaces_only_changed_services_keeping_their_order() {
    let mut s = service("web", "10.96.0.12", pb::Protocol::Tcp);
    s.external_ips = vec!["198.51.100.12".into()];
    s.external_policy_local = true;
    let old = entry(s.clone(), vec![]);
    let new = entry(s, vec![endpoint("10.244.1.2", true, true)]);
    let (old, _) = render(&cfg(), IpFamily::V4, &old);
    let (new, _) = render(&cfg(), IpFamily::V4, &new);
    let unchanged = ServiceLines { nat: vec!["-A KUBE-PORTALS-HOST x".into()], filter: vec![] };
    let text = render_partial([(&unchanged, &unchanged), (&old, &new)].into_iter());
    assert_eq!(
        text,
        r#"*filter
-D KUBE-PORTALS-FILTER -d 10.96.0.12/32 -p tcp -m comment --comment "ns/web:p has no endpoints" -m tcp --dport 80 -j REJECT
-D KUBE-PORTALS-FILTER -d 198.51.100.12/32 -p tcp -m comment --comment "ns/web:p has no endpoints" -m tcp --dport 80 -j REJECT
-D KUBE-PORTALS-FILTER -p tcp -m comment --comment "ns/web:p proxy port" -m addrtype --dst-type LOCAL -m tcp --dport 41000 -m conntrack ! --ctstate DNAT -j DROP
-D KUBE-PORTALS-FILTER -p tcp -m comment --comment "ns/web:p proxy port" -m addrtype --dst-type LOCAL -m tcp --dport 41001 -m conntrack ! --ctstate DNAT -j DROP
-A KUBE-PORTALS-FILTER -p tcp -m comment --comment "ns/web:p proxy port" -m addrtype --dst-type LOCAL -m tcp --dport 41000 -m conntrack ! --ctstate DNAT -j DROP
-A KUBE-PORTALS-FILTER -p tcp -m comment --comment "ns/web:p proxy port" -m addrtype --dst-type LOCAL -m tcp --dport 41001 -m conntrack ! --ctstate DNAT -j DROP
COMMIT
*nat
-I KUBE-PORTALS-HOST -d 198.51.100.12/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:41000
-I KUBE-PORTALS-CONTAINER -d 198.51.100.12/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j REDIRECT --to-ports 41001
-I KUBE-PORTALS-CONTAINER -s 10.244.0.0/16 -d 198.51.100.12/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j REDIRECT --to-ports 41000
-I KUBE-PORTALS-HOST -d 10.96.0.12/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:41000
-I KUBE-PORTALS-CONTAINER -d 10.96.0.12/32 -p tcp -m comment --comment "ns/web:p" -m tcp --dport 80 -j REDIRECT --to-ports 41000
COMMIT
"#
    );
    assert_eq!(render_partial([(&new, &new)].into_iter()), "", "nothing changed, nothing to restore");
}
