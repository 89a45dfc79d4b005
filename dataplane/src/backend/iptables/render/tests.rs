//! Golden tests: exact iptables-restore text for the classic scenarios.

use std::fmt::Write;

use kpx_proto::v1 as pb;

use super::*;
use crate::state::ServiceEntry;

// Address conventions (as in kube-proxy's proxier_test.go):
// Pod IPs (cluster CIDR)    10.0.0.0/8, endpoints 10.180.0.0/16
// Cluster IPs               172.30.0.0/16
// External IPs              192.168.99.0/24
// Load-balancer IPs         1.2.3.4, 5.6.7.8
// Node IP                   192.168.0.2
// LB source ranges          203.0.113.0/25
// IPv6: pods fd00:10::/64, cluster IPs fd00:172:30::/108
const CLUSTER_CIDR: &str = "10.0.0.0/8";
const NODE_IP: &str = "192.168.0.2";

fn cfg() -> RenderConfig {
    RenderConfig {
        family: IpFamily::V4,
        cluster_cidr: Some(CLUSTER_CIDR.into()),
        masquerade_all: false,
        node_ips: vec![],
        node_name: "node1".into(),
        localhost_node_ports: true,
    }
}

fn svc(ns: &str, name: &str, cluster_ip: &str, ports: &[(&str, pb::Protocol, u32, u32)]) -> pb::Service {
    pb::Service {
        namespace: ns.into(),
        name: name.into(),
        r#type: pb::ServiceType::ClusterIp as i32,
        cluster_ips: vec![cluster_ip.into()],
        ports: ports
            .iter()
            .map(|(n, proto, port, node_port)| pb::ServicePort {
                name: (*n).into(),
                protocol: *proto as i32,
                port: *port,
                node_port: *node_port,
            })
            .collect(),
        ..Default::default()
    }
}

fn ep(service: &str, ip: &str, port_name: &str, port: u32, local: bool) -> pb::Endpoint {
    pb::Endpoint {
        service: service.into(),
        ip: ip.into(),
        ports: vec![pb::EndpointPort { name: port_name.into(), port }],
        for_cluster: true,
        for_local: local,
        node_tag: 0,
    }
}

fn entry(service: pb::Service, eps: Vec<pb::Endpoint>) -> ServiceEntry {
    ServiceEntry { service, endpoints: eps.into_iter().map(|e| (e.ip.clone(), e)).collect() }
}

fn state(services: Vec<pb::Service>, endpoints: Vec<pb::Endpoint>) -> AppliedState {
    AppliedState::with(services, endpoints).expect("test state applies")
}

/// One service's rules as text: top-level lines, then filter lines, then its chains.
fn text(r: &ServiceRules) -> String {
    let mut out = String::new();
    for l in r.services_lines.iter().chain(&r.nodeports_lines) {
        writeln!(out, "{l}").unwrap();
    }
    for l in &r.filter_lines {
        writeln!(out, "filter {l}").unwrap();
    }
    for (c, lines) in &r.chains {
        writeln!(out, ":{c}").unwrap();
        lines.iter().for_each(|l| writeln!(out, "{l}").unwrap());
    }
    out
}

fn render(cfg: &RenderConfig, e: &ServiceEntry) -> String {
    let r = render_service(cfg, e);
    assert!(r.skipped.is_empty(), "{:?}", r.skipped);
    text(&r)
}

fn hostnames() -> (pb::Service, Vec<pb::Endpoint>) {
    let s = svc("default", "hostnames", "10.0.1.175", &[("", pb::Protocol::Tcp, 80, 0)]);
    let eps = ["10.244.1.7", "10.244.2.3", "10.244.3.6"].map(|ip| ep("default/hostnames", ip, "", 9376, false));
    (s, eps.to_vec())
}

fn with_eps(s: pb::Service, eps: Vec<pb::Endpoint>) -> String {
    render(&cfg(), &entry(s, eps))
}

fn svc1_eps(local: [bool; 2]) -> Vec<pb::Endpoint> {
    vec![ep("ns1/svc1", "10.180.0.1", "p80", 80, local[0]), ep("ns1/svc1", "10.180.0.2", "p80", 80, local[1])]
}

fn svc1(node_port: u32) -> pb::Service {
    svc("ns1", "svc1", "172.30.0.41", &[("p80", pb::Protocol::Tcp, 80, node_port)])
}

fn scenario(name: &str) -> String {
    match name {
        "cluster_ip_three_endpoints" => {
            let (s, eps) = hostnames();
            with_eps(s, eps)
        }
        "session_affinity" => {
            let mut s = svc1(0);
            s.session_affinity_timeout_seconds = 10800;
            with_eps(s, svc1_eps([false, false]))
        }
        "external_ip_udp" => {
            let mut s = svc("ns2", "dns", "172.30.0.10", &[("dns", pb::Protocol::Udp, 53, 0)]);
            s.external_ips = vec!["192.168.99.11".into(), "fd00::99".into()];
            with_eps(s, vec![ep("ns2/dns", "10.180.0.5", "dns", 5353, false)])
        }
        "no_endpoints_reject" => {
            let mut s = svc1(30080);
            s.external_ips = vec!["192.168.99.11".into()];
            with_eps(s, vec![])
        }
        "nodeport_cluster" => with_eps(svc1(30080), svc1_eps([false, false])),
        "nodeport_local_with_local_endpoint" => {
            let mut s = svc1(30080);
            s.external_policy_local = true;
            s.health_check_node_port = 30000;
            with_eps(s, svc1_eps([true, false]))
        }
        "nodeport_local_without_local_endpoint" => {
            let mut s = svc1(30080);
            s.external_policy_local = true;
            with_eps(s, svc1_eps([false, false]))
        }
        "loadbalancer_source_ranges" => {
            let mut s = svc("ns5", "svc5", "172.30.0.45", &[("p80", pb::Protocol::Tcp, 80, 30085)]);
            s.r#type = pb::ServiceType::LoadBalancer as i32;
            s.load_balancer_ips = vec!["5.6.7.8".into()];
            s.load_balancer_source_ranges = vec!["203.0.113.0/25".into(), "192.168.0.0/24".into()];
            let cfg = RenderConfig { node_ips: vec![NODE_IP.parse().unwrap()], ..cfg() };
            render(&cfg, &entry(s, vec![ep("ns5/svc5", "10.180.0.3", "p80", 80, false)]))
        }
        "ipv6_cluster_ip" => {
            let s = svc("ns6", "svc6", "fd00:172:30::41", &[("p80", pb::Protocol::Tcp, 80, 0)]);
            let eps =
                vec![ep("ns6/svc6", "fd00:10::1", "p80", 80, false), ep("ns6/svc6", "10.180.0.1", "p80", 80, false)];
            let cfg = RenderConfig { family: IpFamily::V6, cluster_cidr: Some("fd00:10::/64".into()), ..cfg() };
            render(&cfg, &entry(s, eps))
        }
        "internal_local_endpoints_elsewhere" => {
            let mut s = svc1(0);
            s.internal_policy_local = true;
            s.families_with_endpoints = vec!["IPv4".into()];
            with_eps(s, vec![])
        }
        "both_local_endpoints_elsewhere" => {
            let mut s = svc1(30080);
            s.external_ips = vec!["192.168.99.11".into()];
            s.internal_policy_local = true;
            s.external_policy_local = true;
            s.families_with_endpoints = vec!["IPv4".into(), "IPv6".into()];
            with_eps(s, vec![])
        }
        "both_local_no_endpoints_anywhere" => {
            let mut s = svc1(30080);
            s.external_ips = vec!["192.168.99.11".into()];
            s.internal_policy_local = true;
            s.external_policy_local = true;
            // Endpoints in the other family only: none for this family's proxier.
            s.families_with_endpoints = vec!["IPv6".into()];
            with_eps(s, vec![])
        }
        _ => unreachable!(),
    }
}

#[test]
fn cluster_ip_three_endpoints() {
    assert_eq!(
        scenario("cluster_ip_three_endpoints"),
        r#"-A KUBE-SERVICES -d 10.0.1.175/32 -p tcp -m comment --comment "default/hostnames cluster IP" -m tcp --dport 80 -j KUBE-SVC-YN5D6RYVEVZOH44Q
:KUBE-SVC-YN5D6RYVEVZOH44Q
-A KUBE-SVC-YN5D6RYVEVZOH44Q ! -s 10.0.0.0/8 -d 10.0.1.175/32 -p tcp -m comment --comment "default/hostnames cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-YN5D6RYVEVZOH44Q -m comment --comment "default/hostnames -> 10.244.1.7:9376" -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-IQV2T7WZFFJMSXMA
-A KUBE-SVC-YN5D6RYVEVZOH44Q -m comment --comment "default/hostnames -> 10.244.2.3:9376" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-VVQPNQCRNAQTZLWG
-A KUBE-SVC-YN5D6RYVEVZOH44Q -m comment --comment "default/hostnames -> 10.244.3.6:9376" -j KUBE-SEP-PR3FG6SU5SIGDY7O
:KUBE-SEP-IQV2T7WZFFJMSXMA
-A KUBE-SEP-IQV2T7WZFFJMSXMA -s 10.244.1.7/32 -m comment --comment "default/hostnames" -j KUBE-MARK-MASQ
-A KUBE-SEP-IQV2T7WZFFJMSXMA -p tcp -m comment --comment "default/hostnames" -m tcp -j DNAT --to-destination 10.244.1.7:9376
:KUBE-SEP-VVQPNQCRNAQTZLWG
-A KUBE-SEP-VVQPNQCRNAQTZLWG -s 10.244.2.3/32 -m comment --comment "default/hostnames" -j KUBE-MARK-MASQ
-A KUBE-SEP-VVQPNQCRNAQTZLWG -p tcp -m comment --comment "default/hostnames" -m tcp -j DNAT --to-destination 10.244.2.3:9376
:KUBE-SEP-PR3FG6SU5SIGDY7O
-A KUBE-SEP-PR3FG6SU5SIGDY7O -s 10.244.3.6/32 -m comment --comment "default/hostnames" -j KUBE-MARK-MASQ
-A KUBE-SEP-PR3FG6SU5SIGDY7O -p tcp -m comment --comment "default/hostnames" -m tcp -j DNAT --to-destination 10.244.3.6:9376
"#
    );
}

#[test]
fn session_affinity() {
    assert_eq!(
        scenario("session_affinity"),
        r#"-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
:KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SVC-XPGD46QRK7WJZT7O ! -s 10.0.0.0/8 -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m recent --name KUBE-SEP-SXIVWICOYRO3J4NJ --rcheck --seconds 10800 --reap -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -m recent --name KUBE-SEP-LXVODXWDISEETFEF --rcheck --seconds 10800 --reap -j KUBE-SEP-LXVODXWDISEETFEF
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-LXVODXWDISEETFEF
:KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "ns1/svc1:p80" -m recent --name KUBE-SEP-SXIVWICOYRO3J4NJ --set -m tcp -j DNAT --to-destination 10.180.0.1:80
:KUBE-SEP-LXVODXWDISEETFEF
-A KUBE-SEP-LXVODXWDISEETFEF -s 10.180.0.2/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-LXVODXWDISEETFEF -p tcp -m comment --comment "ns1/svc1:p80" -m recent --name KUBE-SEP-LXVODXWDISEETFEF --set -m tcp -j DNAT --to-destination 10.180.0.2:80
"#
    );
}

#[test]
fn external_ip_udp() {
    assert_eq!(
        scenario("external_ip_udp"),
        r#"-A KUBE-SERVICES -d 172.30.0.10/32 -p udp -m comment --comment "ns2/dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-P2PEPPDBVJT3HIZY
-A KUBE-SERVICES -d 192.168.99.11/32 -p udp -m comment --comment "ns2/dns:dns external IP" -m udp --dport 53 -j KUBE-EXT-P2PEPPDBVJT3HIZY
:KUBE-SVC-P2PEPPDBVJT3HIZY
-A KUBE-SVC-P2PEPPDBVJT3HIZY ! -s 10.0.0.0/8 -d 172.30.0.10/32 -p udp -m comment --comment "ns2/dns:dns cluster IP" -m udp --dport 53 -j KUBE-MARK-MASQ
-A KUBE-SVC-P2PEPPDBVJT3HIZY -m comment --comment "ns2/dns:dns -> 10.180.0.5:5353" -j KUBE-SEP-7BHIX4JHFGVKUC2O
:KUBE-EXT-P2PEPPDBVJT3HIZY
-A KUBE-EXT-P2PEPPDBVJT3HIZY -m comment --comment "masquerade traffic for ns2/dns:dns external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-P2PEPPDBVJT3HIZY -j KUBE-SVC-P2PEPPDBVJT3HIZY
:KUBE-SEP-7BHIX4JHFGVKUC2O
-A KUBE-SEP-7BHIX4JHFGVKUC2O -s 10.180.0.5/32 -m comment --comment "ns2/dns:dns" -j KUBE-MARK-MASQ
-A KUBE-SEP-7BHIX4JHFGVKUC2O -p udp -m comment --comment "ns2/dns:dns" -m udp -j DNAT --to-destination 10.180.0.5:5353
"#
    );
}

#[test]
fn no_endpoints_reject() {
    assert_eq!(
        scenario("no_endpoints_reject"),
        r#"filter -A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 has no endpoints" -m tcp --dport 80 -j REJECT
filter -A KUBE-EXTERNAL-SERVICES -d 192.168.99.11/32 -p tcp -m comment --comment "ns1/svc1:p80 has no endpoints" -m tcp --dport 80 -j REJECT
filter -A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "ns1/svc1:p80 has no endpoints" -m addrtype --dst-type LOCAL -m tcp --dport 30080 -j REJECT
"#
    );
}

#[test]
fn nodeport_cluster() {
    assert_eq!(
        scenario("nodeport_cluster"),
        r#"-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-NODEPORTS -p tcp -m comment --comment "ns1/svc1:p80" -m tcp --dport 30080 -j KUBE-EXT-XPGD46QRK7WJZT7O
:KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SVC-XPGD46QRK7WJZT7O ! -s 10.0.0.0/8 -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-LXVODXWDISEETFEF
:KUBE-EXT-XPGD46QRK7WJZT7O
-A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "masquerade traffic for ns1/svc1:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVC-XPGD46QRK7WJZT7O
:KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.180.0.1:80
:KUBE-SEP-LXVODXWDISEETFEF
-A KUBE-SEP-LXVODXWDISEETFEF -s 10.180.0.2/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-LXVODXWDISEETFEF -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.180.0.2:80
"#
    );
}

#[test]
fn nodeport_local_with_local_endpoint() {
    assert_eq!(
        scenario("nodeport_local_with_local_endpoint"),
        r#"-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-NODEPORTS -p tcp -m comment --comment "ns1/svc1:p80" -m tcp --dport 30080 -j KUBE-EXT-XPGD46QRK7WJZT7O
filter -A KUBE-NODEPORTS -p tcp -m comment --comment "ns1/svc1:p80 health check node port" -m tcp --dport 30000 -j ACCEPT
:KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SVC-XPGD46QRK7WJZT7O ! -s 10.0.0.0/8 -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-LXVODXWDISEETFEF
:KUBE-SVL-XPGD46QRK7WJZT7O
-A KUBE-SVL-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
:KUBE-EXT-XPGD46QRK7WJZT7O
-A KUBE-EXT-XPGD46QRK7WJZT7O -s 10.0.0.0/8 -m comment --comment "pod traffic for ns1/svc1:p80 external destinations" -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "masquerade LOCAL traffic for ns1/svc1:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "route LOCAL traffic for ns1/svc1:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVL-XPGD46QRK7WJZT7O
:KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.180.0.1:80
:KUBE-SEP-LXVODXWDISEETFEF
-A KUBE-SEP-LXVODXWDISEETFEF -s 10.180.0.2/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-LXVODXWDISEETFEF -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.180.0.2:80
"#
    );
}

#[test]
fn nodeport_local_without_local_endpoint() {
    assert_eq!(
        scenario("nodeport_local_without_local_endpoint"),
        r#"-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-NODEPORTS -p tcp -m comment --comment "ns1/svc1:p80" -m tcp --dport 30080 -j KUBE-EXT-XPGD46QRK7WJZT7O
filter -A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "ns1/svc1:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp --dport 30080 -j DROP
:KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SVC-XPGD46QRK7WJZT7O ! -s 10.0.0.0/8 -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-LXVODXWDISEETFEF
:KUBE-EXT-XPGD46QRK7WJZT7O
-A KUBE-EXT-XPGD46QRK7WJZT7O -s 10.0.0.0/8 -m comment --comment "pod traffic for ns1/svc1:p80 external destinations" -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "masquerade LOCAL traffic for ns1/svc1:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "route LOCAL traffic for ns1/svc1:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-XPGD46QRK7WJZT7O
:KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.180.0.1:80
:KUBE-SEP-LXVODXWDISEETFEF
-A KUBE-SEP-LXVODXWDISEETFEF -s 10.180.0.2/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-LXVODXWDISEETFEF -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.180.0.2:80
"#
    );
}

#[test]
fn loadbalancer_source_ranges() {
    assert_eq!(
        scenario("loadbalancer_source_ranges"),
        r#"-A KUBE-SERVICES -d 172.30.0.45/32 -p tcp -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -d 5.6.7.8/32 -p tcp -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
-A KUBE-NODEPORTS -p tcp -m comment --comment "ns5/svc5:p80" -m tcp --dport 30085 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
filter -A KUBE-PROXY-FIREWALL -d 5.6.7.8/32 -p tcp -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp --dport 80 -j DROP
:KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-SVC-NUKIZ6OKUXPJNT4C ! -s 10.0.0.0/8 -d 172.30.0.45/32 -p tcp -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
:KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
:KUBE-FW-NUKIZ6OKUXPJNT4C
-A KUBE-FW-NUKIZ6OKUXPJNT4C -s 203.0.113.0/25 -m comment --comment "ns5/svc5:p80 loadbalancer IP" -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-FW-NUKIZ6OKUXPJNT4C -s 192.168.0.0/24 -m comment --comment "ns5/svc5:p80 loadbalancer IP" -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-FW-NUKIZ6OKUXPJNT4C -s 5.6.7.8/32 -m comment --comment "ns5/svc5:p80 loadbalancer IP" -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
:KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SEP-I77PXRDZVX7PMWMN -s 10.180.0.3/32 -m comment --comment "ns5/svc5:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-I77PXRDZVX7PMWMN -p tcp -m comment --comment "ns5/svc5:p80" -m tcp -j DNAT --to-destination 10.180.0.3:80
"#
    );
}

#[test]
fn ipv6_cluster_ip() {
    assert_eq!(
        scenario("ipv6_cluster_ip"),
        r#"-A KUBE-SERVICES -d fd00:172:30::41/128 -p tcp -m comment --comment "ns6/svc6:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-NDY5GL2HU4YWCI7Q
:KUBE-SVC-NDY5GL2HU4YWCI7Q
-A KUBE-SVC-NDY5GL2HU4YWCI7Q ! -s fd00:10::/64 -d fd00:172:30::41/128 -p tcp -m comment --comment "ns6/svc6:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-NDY5GL2HU4YWCI7Q -m comment --comment "ns6/svc6:p80 -> [fd00:10::1]:80" -j KUBE-SEP-65AREFIH75SDM3RX
:KUBE-SEP-65AREFIH75SDM3RX
-A KUBE-SEP-65AREFIH75SDM3RX -s fd00:10::1/128 -m comment --comment "ns6/svc6:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-65AREFIH75SDM3RX -p tcp -m comment --comment "ns6/svc6:p80" -m tcp -j DNAT --to-destination [fd00:10::1]:80
"#
    );
}

/// Services (svc1 with two endpoints, hostnames) as a synced state and what it installed.
fn synced(extra: Vec<pb::Service>) -> (AppliedState, PreviousRules) {
    let (h, h_eps) = hostnames();
    let mut services = vec![svc1(0), h];
    services.extend(extra);
    let st = state(services, [svc1_eps([false, false]), h_eps].concat());
    let prev = PreviousRules::from_state(&st);
    (st, prev)
}

fn partial(st: &AppliedState, changed: &[&str], prev: &PreviousRules) -> String {
    let changes = ChangeSet { full: false, services: changed.iter().map(|s| s.to_string()).collect() };
    let mut out = String::new();
    let skipped = render_partial(&cfg(), st, &changes, prev, &mut out);
    assert!(skipped.is_empty(), "{skipped:?}");
    out
}

#[test]
fn partial_endpoint_change_touches_only_that_service() {
    let (_, prev) = synced(vec![]);
    let (h, _) = hostnames();
    let st = state(vec![svc1(0), h], vec![ep("ns1/svc1", "10.180.0.1", "p80", 80, false)]);
    let out = partial(&st, &["ns1/svc1"], &prev);
    assert!(!out.contains("KUBE-SERVICES"), "{out}");
    assert_eq!(
        out,
        r#"*nat
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-LXVODXWDISEETFEF - [0:0]
-A KUBE-SVC-XPGD46QRK7WJZT7O ! -s 10.0.0.0/8 -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.180.0.1:80
-X KUBE-SEP-LXVODXWDISEETFEF
COMMIT
"#
    );
}

#[test]
fn partial_service_add_inserts_one_services_line() {
    let (_, prev) = synced(vec![]);
    let (h, h_eps) = hostnames();
    let svc3 = svc("ns3", "svc3", "172.30.0.43", &[("p80", pb::Protocol::Tcp, 80, 0)]);
    let ep3 = ep("ns3/svc3", "10.180.0.3", "p80", 80, false);
    let st = state(vec![svc1(0), h, svc3], [svc1_eps([false, false]), h_eps, vec![ep3]].concat());
    let out = partial(&st, &["ns3/svc3"], &prev);
    let top: Vec<&str> = out.lines().filter(|l| l.contains(" KUBE-SERVICES ")).collect();
    assert_eq!(
        top,
        [
            r#"-I KUBE-SERVICES -d 172.30.0.43/32 -p tcp -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK"#
        ]
    );
    assert!(!out.contains("*filter") && !out.contains("-D ") && !out.contains("-X "), "{out}");
}

#[test]
fn partial_service_remove_deletes_its_lines_and_chains() {
    let (_, prev) = synced(vec![]);
    let (h, h_eps) = hostnames();
    let st = state(vec![h], h_eps);
    assert_eq!(
        partial(&st, &["ns1/svc1"], &prev),
        r#"*nat
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-LXVODXWDISEETFEF - [0:0]
-D KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-X KUBE-SVC-XPGD46QRK7WJZT7O
-X KUBE-SEP-SXIVWICOYRO3J4NJ
-X KUBE-SEP-LXVODXWDISEETFEF
COMMIT
"#
    );
}

#[test]
fn partial_last_endpoint_gone_moves_service_to_reject() {
    let (_, prev) = synced(vec![]);
    let (h, h_eps) = hostnames();
    let st = state(vec![svc1(0), h], h_eps);
    let out = partial(&st, &["ns1/svc1"], &prev);
    assert!(out.starts_with("*filter\n-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment \"ns1/svc1:p80 has no endpoints\" -m tcp --dport 80 -j REJECT\nCOMMIT\n"), "{out}");
    assert!(out.contains("\n-D KUBE-SERVICES -d 172.30.0.41/32 "), "{out}");
}

#[test]
fn full_sync_of_hostnames() {
    let (h, h_eps) = hostnames();
    let st = state(vec![h], h_eps);
    let mut out = String::from("stale");
    assert!(render_full(&cfg(), &st, &mut out).is_empty());
    assert_eq!(
        out,
        r#"*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-FIREWALL - [0:0]
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SEP-IQV2T7WZFFJMSXMA - [0:0]
:KUBE-SEP-PR3FG6SU5SIGDY7O - [0:0]
:KUBE-SEP-VVQPNQCRNAQTZLWG - [0:0]
:KUBE-SVC-YN5D6RYVEVZOH44Q - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -d 10.0.1.175/32 -p tcp -m comment --comment "default/hostnames cluster IP" -m tcp --dport 80 -j KUBE-SVC-YN5D6RYVEVZOH44Q
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-YN5D6RYVEVZOH44Q ! -s 10.0.0.0/8 -d 10.0.1.175/32 -p tcp -m comment --comment "default/hostnames cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-YN5D6RYVEVZOH44Q -m comment --comment "default/hostnames -> 10.244.1.7:9376" -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-IQV2T7WZFFJMSXMA
-A KUBE-SVC-YN5D6RYVEVZOH44Q -m comment --comment "default/hostnames -> 10.244.2.3:9376" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-VVQPNQCRNAQTZLWG
-A KUBE-SVC-YN5D6RYVEVZOH44Q -m comment --comment "default/hostnames -> 10.244.3.6:9376" -j KUBE-SEP-PR3FG6SU5SIGDY7O
-A KUBE-SEP-IQV2T7WZFFJMSXMA -s 10.244.1.7/32 -m comment --comment "default/hostnames" -j KUBE-MARK-MASQ
-A KUBE-SEP-IQV2T7WZFFJMSXMA -p tcp -m comment --comment "default/hostnames" -m tcp -j DNAT --to-destination 10.244.1.7:9376
-A KUBE-SEP-VVQPNQCRNAQTZLWG -s 10.244.2.3/32 -m comment --comment "default/hostnames" -j KUBE-MARK-MASQ
-A KUBE-SEP-VVQPNQCRNAQTZLWG -p tcp -m comment --comment "default/hostnames" -m tcp -j DNAT --to-destination 10.244.2.3:9376
-A KUBE-SEP-PR3FG6SU5SIGDY7O -s 10.244.3.6/32 -m comment --comment "default/hostnames" -j KUBE-MARK-MASQ
-A KUBE-SEP-PR3FG6SU5SIGDY7O -p tcp -m comment --comment "default/hostnames" -m tcp -j DNAT --to-destination 10.244.3.6:9376
COMMIT
"#
    );
}

/// libiptc inserts a chain that sorts last at the tail of its sorted list and walks the list
/// for any other, so the per-service chains of every service are declared in one name order.
#[test]
fn full_sync_declares_every_service_chain_in_name_order() {
    let (st, _) = synced(vec![svc("ns2", "other", "172.30.0.99", &[("p", pb::Protocol::Udp, 53, 5353)])]);
    let mut out = String::new();
    render_full(&cfg(), &st, &mut out);
    let nat = &out[out.find("*nat\n").expect("nat table")..];
    let declared: Vec<&str> = nat
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter(|l| l.contains("-SEP-") || l.contains("-SVC-"))
        .collect();
    assert!(declared.len() >= 4, "{out}");
    assert!(declared.windows(2).all(|w| w[0] < w[1]), "not in name order: {declared:#?}");
    // Every chain a rule appends to is declared, once.
    for chain in nat.lines().filter_map(|l| l.strip_prefix("-A ")).filter_map(|l| l.split(' ').next()) {
        assert_eq!(nat.matches(&format!("\n:{chain} ")).count(), 1, "{chain} in {out}");
    }
}

#[test]
fn hostile_names_and_addresses_cannot_inject() {
    let mut s =
        svc("ns\"x", "evil\n-A KUBE-SERVICES -j ACCEPT \"", "172.30.0.66", &[("p\"\r\n", pb::Protocol::Tcp, 80, 0)]);
    s.external_ips = vec!["1.2.3.4\n-A X".into(), "1.2.3.4 -j ACCEPT".into()];
    s.load_balancer_source_ranges = vec!["0.0.0.0/0\n".into()];
    let key = format!("{}/{}", s.namespace, s.name);
    let mut bad_ep = ep(&key, "10.180.0.9\n-A X", "p\"\r\n", 80, false);
    bad_ep.ip = "10.180.0.9\n-A X".into();
    let bad_port = ep(&key, "10.180.0.8", "p\"\r\n", 70000, false);
    let good = ep(&key, "10.180.0.7", "p\"\r\n", 80, false);
    let r = render_service(&cfg(), &entry(s, vec![bad_ep, bad_port, good]));
    assert_eq!(r.skipped.len(), 5, "{:?}", r.skipped);
    let out = text(&r);
    for line in out.lines() {
        assert!(line.starts_with("-A ") || line.starts_with(':') || line.starts_with("filter -A "), "{line}");
        assert_eq!(line.matches('"').count() % 2, 0, "{line}");
        assert!(!line.contains('\r'), "{line}");
        // Outside the quoted comment, a rule still has at most one target.
        let unquoted: String = line.split('"').step_by(2).collect();
        assert!(unquoted.matches(" -j ").count() <= 1, "{line}");
    }
    assert!(out.contains("--comment \"nsx/evil-A KUBE-SERVICES -j ACCEPT :p cluster IP\""), "{out}");
    assert!(
        out.contains("--to-destination 10.180.0.7:80") && !out.contains("10.180.0.9") && !out.contains("10.180.0.8")
    );
}

#[test]
fn internal_local_without_local_endpoints_drops_when_they_exist_elsewhere() {
    assert_eq!(
        scenario("internal_local_endpoints_elsewhere"),
        r#"filter -A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 has no local endpoints" -m tcp --dport 80 -j DROP
"#
    );
}

#[test]
fn both_local_without_local_endpoints_drops_when_they_exist_elsewhere() {
    assert_eq!(
        scenario("both_local_endpoints_elsewhere"),
        r#"filter -A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 has no local endpoints" -m tcp --dport 80 -j DROP
filter -A KUBE-EXTERNAL-SERVICES -d 192.168.99.11/32 -p tcp -m comment --comment "ns1/svc1:p80 has no local endpoints" -m tcp --dport 80 -j DROP
filter -A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "ns1/svc1:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp --dport 30080 -j DROP
"#
    );
}

#[test]
fn both_local_without_endpoints_in_this_family_still_rejects() {
    assert_eq!(
        scenario("both_local_no_endpoints_anywhere"),
        r#"filter -A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 has no endpoints" -m tcp --dport 80 -j REJECT
filter -A KUBE-EXTERNAL-SERVICES -d 192.168.99.11/32 -p tcp -m comment --comment "ns1/svc1:p80 has no endpoints" -m tcp --dport 80 -j REJECT
filter -A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "ns1/svc1:p80 has no endpoints" -m addrtype --dst-type LOCAL -m tcp --dport 30080 -j REJECT
"#
    );
}

#[test]
fn internal_local_with_only_cluster_endpoints_drops_cluster_ip_traffic() {
    // itp Local, etp Cluster: the node gets the cluster set for its node port, none local.
    let mut s = svc1(30080);
    s.internal_policy_local = true;
    let out = with_eps(s, svc1_eps([false, false]));
    let filter: Vec<&str> = out.lines().filter(|l| l.starts_with("filter ")).collect();
    assert_eq!(
        filter,
        [
            r#"filter -A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 has no local endpoints" -m tcp --dport 80 -j DROP"#
        ]
    );
    assert!(out.contains("--dport 30080 -j KUBE-EXT-XPGD46QRK7WJZT7O"), "{out}");
}

#[test]
fn the_hint_is_read_per_family() {
    let mut s = svc("ns6", "svc6", "fd00:172:30::41", &[("p80", pb::Protocol::Tcp, 80, 0)]);
    s.cluster_ips.insert(0, "172.30.0.46".into());
    s.internal_policy_local = true;
    s.families_with_endpoints = vec!["IPv6".into()];
    let v6 = RenderConfig { family: IpFamily::V6, cluster_cidr: Some("fd00:10::/64".into()), ..cfg() };
    let e = entry(s, vec![]);
    assert_eq!(
        render(&v6, &e),
        "filter -A KUBE-SERVICES -d fd00:172:30::41/128 -p tcp -m comment --comment \"ns6/svc6:p80 has no local endpoints\" -m tcp --dport 80 -j DROP\n"
    );
    assert_eq!(
        render(&cfg(), &e),
        "filter -A KUBE-SERVICES -d 172.30.0.46/32 -p tcp -m comment --comment \"ns6/svc6:p80 has no endpoints\" -m tcp --dport 80 -j REJECT\n"
    );
}

// Found by tests/hostile_state.rs (hostile input against the real iptables-restore).

#[test]
fn a_service_without_a_valid_cluster_ip_is_reported_not_dropped_silently() {
    let v6 = RenderConfig { family: IpFamily::V6, cluster_cidr: None, ..cfg() };
    for garbage in ["10.0.0.1\n-A INPUT -j DROP", "999.1.1.1", "fe80::1%eth0", "172.30.9.9/32"] {
        let s = svc("ns", "bad", garbage, &[("p", pb::Protocol::Tcp, 80, 0)]);
        let e = entry(s, vec![ep("ns/bad", "10.180.0.1", "p", 80, false)]);
        for c in [cfg(), v6.clone()] {
            let r = render_service(&c, &e);
            assert!(text(&r).is_empty(), "{garbage:?}: {}", text(&r));
            assert_eq!(r.skipped.len(), 1, "{garbage:?} in {:?}: {:?}", c.family, r.skipped);
            assert!(r.skipped[0].starts_with("ns/bad: cluster IP: invalid IP"), "{:?}", r.skipped);
        }
    }
    // Headless services, and services of the other family only, are nobody's error.
    for ips in [vec!["None"], vec![""], vec!["fd00::1"], vec!["fd00::1", "999.1.1.1"]] {
        let mut s = svc("ns", "quiet", "", &[("p", pb::Protocol::Tcp, 80, 0)]);
        s.cluster_ips = ips.iter().map(|ip| ip.to_string()).collect();
        let r = render_service(&cfg(), &entry(s, vec![]));
        assert_eq!(r, ServiceRules::default(), "{ips:?}");
    }
}

#[test]
fn a_colon_in_a_service_name_cannot_reach_another_services_chains() {
    // "ns1/svc1" port "p80" and "ns1/svc1:p80" unnamed hash to the same chain names.
    let mut evil = svc("ns1", "svc1:p80", "172.30.0.66", &[("", pb::Protocol::Tcp, 80, 0)]);
    evil.external_ips = vec!["192.168.99.66".into()];
    let st = state(
        vec![svc1(0), evil],
        [svc1_eps([false, false]), vec![ep("ns1/svc1:p80", "10.66.6.6", "", 80, false)]].concat(),
    );
    let mut out = String::new();
    let skipped = render_full(&cfg(), &st, &mut out);
    assert_eq!(skipped, ["ns1/svc1:p80: invalid name (':' in a service name)"]);
    assert!(!out.contains("10.66.6.6") && !out.contains("172.30.0.66"), "{out}");
    assert_eq!(out.matches(":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]").count(), 1, "{out}");
}

#[test]
fn a_repeated_port_is_skipped_not_merged_into_the_first_ones_chains() {
    let s = svc(
        "ns1",
        "svc1",
        "172.30.0.41",
        &[
            ("p80", pb::Protocol::Tcp, 80, 0),
            ("p80", pb::Protocol::Tcp, 81, 0),
            ("p80", pb::Protocol::Udp, 80, 0),
            ("bad", pb::Protocol::Tcp, 0, 0),
            ("bad", pb::Protocol::Tcp, 82, 0),
        ],
    );
    let r = render_service(&cfg(), &entry(s, svc1_eps([false, false])));
    assert_eq!(
        r.skipped,
        ["ns1/svc1: port \"p80\": duplicate port name", "ns1/svc1: port \"bad\": invalid port 0"].map(String::from)
    );
    let names: Vec<&str> = r.chains.iter().map(|(c, _)| c.as_str()).collect();
    let unique: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(names.len(), unique.len(), "{names:?}");
    assert!(!text(&r).contains("--dport 81"), "{}", text(&r));
    // The same name over TCP and UDP, and a name whose first port was invalid, are rendered.
    assert!(text(&r).contains("-p udp") && text(&r).contains("--dport 82"), "{}", text(&r));
}

#[test]
fn one_address_written_two_ways_is_one_endpoint() {
    let s = svc("ns6", "svc6", "fd00:172:30::41", &[("p80", pb::Protocol::Tcp, 80, 0)]);
    let eps = ["fd00:10::5", "fd00:10:0::5", "fd00:10:0:0:0:0:0:5"].map(|ip| ep("ns6/svc6", ip, "p80", 80, false));
    let v6 = RenderConfig { family: IpFamily::V6, cluster_cidr: Some("fd00:10::/64".into()), ..cfg() };
    let r = render_service(&v6, &entry(s, eps.to_vec()));
    assert_eq!(r.skipped.len(), 2, "{:?}", r.skipped);
    assert!(
        r.skipped.iter().all(|s| s == "ns6/svc6:p80: endpoint [fd00:10::5]:80: duplicate address"),
        "{:?}",
        r.skipped
    );
    let out = text(&r);
    assert_eq!(out.matches("-j DNAT --to-destination [fd00:10::5]:80").count(), 1, "{out}");
    assert!(!out.contains("--probability"), "one endpoint takes all the traffic: {out}");
}

#[test]
fn a_repeated_external_ip_is_one_rule() {
    let mut s = svc1(0);
    s.external_ips = vec!["192.168.99.11".into(), "192.168.99.11".into(), "fd00::99".into(), "fd00:0::99".into()];
    let out = with_eps(s.clone(), svc1_eps([false, false]));
    assert_eq!(out.matches("-d 192.168.99.11/32").count(), 1, "{out}");
    let v6 = RenderConfig { family: IpFamily::V6, cluster_cidr: None, ..cfg() };
    s.cluster_ips = vec!["fd00:172:30::41".into()];
    let out = render(&v6, &entry(s, vec![]));
    assert_eq!(out.matches("-d fd00::99/128").count(), 1, "{out}");
}

#[test]
fn source_ranges_are_written_as_the_kernel_keeps_them() {
    for (given, want) in [
        ("10.1.2.3/24", "10.1.2.0/24"),
        ("1.2.3.4/08", "1.0.0.0/8"),
        ("1.2.3.4/32", "1.2.3.4/32"),
        ("255.255.255.255/0", "0.0.0.0/0"),
        ("fd00::1/64", "fd00::/64"),
        ("::ffff:1.2.3.4/120", "::ffff:1.2.3.0/120"),
        ("fd00::1/128", "fd00::1/128"),
    ] {
        assert_eq!(check::Cidr::parse(given).unwrap().to_string(), want, "{given}");
    }
    let mut s = svc("ns5", "svc5", "172.30.0.45", &[("p80", pb::Protocol::Tcp, 80, 0)]);
    s.load_balancer_ips = vec!["5.6.7.8".into()];
    s.load_balancer_source_ranges = vec!["203.0.113.7/25".into(), "0.0.0.0/0".into()];
    let out = with_eps(s, vec![ep("ns5/svc5", "10.180.0.3", "p80", 80, false)]);
    let fw: Vec<&str> = out.lines().filter(|l| l.starts_with("-A KUBE-FW-")).collect();
    // iptables-save shows a /0 source as no source at all.
    assert_eq!(
        fw,
        [
            r#"-A KUBE-FW-NUKIZ6OKUXPJNT4C -s 203.0.113.0/25 -m comment --comment "ns5/svc5:p80 loadbalancer IP" -j KUBE-EXT-NUKIZ6OKUXPJNT4C"#,
            r#"-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 loadbalancer IP" -j KUBE-EXT-NUKIZ6OKUXPJNT4C"#,
            r#"-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL""#,
        ]
    );
}

#[test]
fn session_affinity_longer_than_kubernetes_allows_is_capped_and_reported() {
    for (timeout, want) in [(u32::MAX, 86400), (1 << 31, 86400), (86401, 86400), (86400, 86400), (1, 1)] {
        let mut s = svc1(0);
        s.session_affinity_timeout_seconds = timeout;
        let r = render_service(&cfg(), &entry(s, svc1_eps([false, false])));
        let out = text(&r);
        assert_eq!(out.matches(&format!("--seconds {want} --reap")).count(), 2, "{timeout}: {out}");
        let reported = r.skipped == [format!("ns1/svc1: session affinity timeout {timeout} capped at 86400 seconds")];
        assert_eq!(reported, timeout > 86400, "{timeout}: {:?}", r.skipped);
    }
}

#[test]
fn endpoints_in_kube_proxy_order() {
    // kube-proxy sorts by "ip:port" text: "10.0.0.10:80" before "10.0.0.1:80" (':' > '0').
    let s = svc1(0);
    let eps = ["10.0.0.1", "10.0.0.10", "10.0.0.2"].map(|ip| ep("ns1/svc1", ip, "p80", 80, false));
    let text = with_eps(s, eps.to_vec());
    let order: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SVC-") && l.contains(" -> "))
        .map(|l| l.split(" -> ").nth(1).unwrap().split('"').next().unwrap())
        .collect();
    assert_eq!(order, ["10.0.0.10:80", "10.0.0.1:80", "10.0.0.2:80"], "{text}");
}

#[test]
fn source_ranges_without_endpoints_are_rejected_not_firewalled() {
    // Like kube-proxy: no KUBE-FW chain without endpoints, hence no KUBE-PROXY-FIREWALL drop
    // either; the filter REJECT answers.
    let mut s = svc("ns5", "svc5", "172.30.0.45", &[("p80", pb::Protocol::Tcp, 80, 30085)]);
    s.r#type = pb::ServiceType::LoadBalancer as i32;
    s.load_balancer_ips = vec!["5.6.7.8".into()];
    s.load_balancer_source_ranges = vec!["203.0.113.0/25".into()];
    let text = with_eps(s, vec![]);
    assert!(!text.contains("KUBE-PROXY-FIREWALL") && !text.contains("KUBE-FW-"), "{text}");
    assert!(text.contains("filter -A KUBE-EXTERNAL-SERVICES -d 5.6.7.8/32 -p tcp -m comment --comment \"ns5/svc5:p80 has no endpoints\" -m tcp --dport 80 -j REJECT"), "{text}");
}

#[test]
fn health_check_node_port_is_accepted_once_per_port() {
    let mut s =
        svc("ns1", "svc1", "172.30.0.41", &[("a", pb::Protocol::Tcp, 80, 30080), ("b", pb::Protocol::Udp, 53, 30053)]);
    s.r#type = pb::ServiceType::LoadBalancer as i32;
    s.external_policy_local = true;
    s.health_check_node_port = 30000;
    let r = render_service(&cfg(), &entry(s, vec![]));
    let hc: Vec<&String> = r.filter_lines.iter().filter(|l| l.contains("health check node port")).collect();
    assert_eq!(hc.len(), 2, "{hc:?}");
    assert!(hc[0].contains("\"ns1/svc1:a health check node port\" -m tcp --dport 30000 -j ACCEPT"), "{hc:?}");
    assert!(hc[1].contains("\"ns1/svc1:b health check node port\" -m tcp --dport 30000 -j ACCEPT"), "{hc:?}");
}

#[test]
fn localnet_firewall_follows_localhost_node_ports() {
    let st = state(vec![svc1(30080)], svc1_eps([false, false]));
    let has_firewall = |cfg: &RenderConfig| {
        let mut out = String::new();
        render_full(cfg, &st, &mut out);
        out.contains(":KUBE-FIREWALL - [0:0]\n") && out.contains("\"block incoming localnet connections\"")
    };
    assert!(has_firewall(&cfg()), "on by default, node ports on every local address");
    assert!(!has_firewall(&RenderConfig { localhost_node_ports: false, ..cfg() }));
    // Node ports only on the node IP: 127.0.0.1 does not take them, as with kube-proxy's
    // nodePortAddresses without a loopback range.
    assert!(!has_firewall(&RenderConfig { node_ips: vec![NODE_IP.parse().unwrap()], ..cfg() }));
    assert!(has_firewall(&RenderConfig { node_ips: vec!["127.0.0.1".parse().unwrap()], ..cfg() }));
    // IPv6 has no route_localnet.
    let v6 = RenderConfig { family: IpFamily::V6, cluster_cidr: None, ..cfg() };
    assert!(!v6.localnet_firewall());
}
