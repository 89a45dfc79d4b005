//! One test per verdict, on states shaped like the example cluster (deploy/examples).

use super::*;
use kpx_proto::v1::{EndpointPort, ServiceState, ServiceType};

fn svc(name: &str, cluster_ip: &str, ports: Vec<ServicePort>) -> Service {
    Service {
        namespace: "demo".into(),
        name: name.into(),
        r#type: ServiceType::ClusterIp as i32,
        cluster_ips: vec![cluster_ip.into()],
        ports,
        ..Default::default()
    }
}

fn port(name: &str, port: u32, node_port: u32) -> ServicePort {
    ServicePort { name: name.into(), protocol: Protocol::Tcp as i32, port, node_port }
}

fn ep(service: &str, ip: &str, for_cluster: bool, for_local: bool) -> Endpoint {
    Endpoint {
        service: format!("demo/{service}"),
        ip: ip.into(),
        ports: vec![EndpointPort { name: "http".into(), port: 8080 }],
        for_cluster,
        for_local,
        node_tag: 0,
    }
}

/// node-a's view when `local_pods`, node-c's (no local pod) otherwise.
fn state(local_pods: bool) -> NodeState {
    let web = svc("web", "10.96.0.10", vec![port("http", 80, 0)]);
    let mut web_local = svc("web-local", "10.96.0.12", vec![port("http", 80, 30081)]);
    web_local.r#type = ServiceType::NodePort as i32;
    web_local.external_policy_local = true;
    let empty = svc("empty", "10.96.0.30", vec![port("http", 80, 0)]);
    let mut lb = svc("lb", "10.96.0.40", vec![port("http", 80, 30082)]);
    lb.r#type = ServiceType::LoadBalancer as i32;
    lb.load_balancer_ips = vec!["192.0.2.10".into()];
    lb.external_ips = vec!["192.0.2.20".into()];
    lb.load_balancer_source_ranges = vec!["203.0.113.0/24".into()];
    lb.session_affinity_timeout_seconds = 10800;
    let mut itl = svc("itl", "10.96.0.50", vec![port("http", 80, 0)]);
    itl.internal_policy_local = true;
    let headless = Service {
        cluster_ips: vec!["None".into()],
        external_ips: vec!["192.0.2.99".into()],
        ..svc("h", "", vec![port("http", 80, 0)])
    };
    let pods = |s: &str| {
        vec![
            ep(s, "10.244.1.2", true, local_pods),
            ep(s, "10.244.1.3", true, local_pods),
            ep(s, "10.244.2.2", true, false),
        ]
    };
    let ss = |service: Service, endpoints: Vec<Endpoint>| ServiceState { service: Some(service), endpoints };
    NodeState {
        node_name: if local_pods { "node-a" } else { "node-c" }.into(),
        version: "0123456789abcdef0123456789abcdef".into(),
        services: vec![
            ss(web, pods("web")),
            ss(web_local, pods("web-local")),
            ss(empty, vec![]),
            ss(lb, pods("lb")),
            ss(itl, pods("itl")),
            ss(headless, vec![]),
        ],
    }
}

fn q(dst: &str) -> Query {
    Query { dst: dst.parse().unwrap(), src: None, node_ips: vec![], cluster_cidrs: vec![], masquerade_all: false }
}

fn from(dst: &str, src: &str) -> Query {
    Query { src: Some(src.parse().unwrap()), ..q(dst) }
}

fn ips(ex: &Explanation) -> Vec<String> {
    ex.endpoints.iter().map(endpoint_addr).collect()
}

#[test]
fn cluster_ip_dnats_to_every_cluster_endpoint() {
    let ex = explain(&state(true), &q("10.96.0.10:80/tcp"));
    assert_eq!(ex.verdict, Verdict::Dnat);
    assert_eq!(ex.summary, "DNAT to one of 3 endpoints, at random");
    let m = ex.matched.as_ref().unwrap();
    assert_eq!(
        (m.service.as_str(), m.port_name.as_str(), m.address_kind),
        ("demo/web", "http", AddressKind::ClusterIp)
    );
    assert_eq!(ips(&ex), ["10.244.1.2:8080", "10.244.1.3:8080", "10.244.2.2:8080"]);
    assert_eq!(ex.traffic_policy.as_deref(), Some("internal"));
    assert_eq!(ex.policy_value.as_deref(), Some("Cluster"));
    assert_eq!(ex.masquerade, Masquerade::Maybe);
    assert!(ex.masquerade_reason.contains("outside the cluster CIDR"), "{}", ex.masquerade_reason);

    // With the cluster CIDR known, the source decides.
    let cidr = vec!["10.244.0.0/16".parse().unwrap()];
    let pod = Query { cluster_cidrs: cidr.clone(), ..from("10.96.0.10:80/tcp", "10.244.2.9") };
    assert_eq!(explain(&state(true), &pod).masquerade, Masquerade::No);
    let host = Query { cluster_cidrs: cidr, ..from("10.96.0.10:80/tcp", "10.77.0.10") };
    assert_eq!(explain(&state(true), &host).masquerade, Masquerade::Yes);
    let all = Query { masquerade_all: true, ..q("10.96.0.10:80/tcp") };
    assert_eq!(explain(&state(true), &all).masquerade, Masquerade::Yes);
}

#[test]
fn hairpin_is_masqueraded() {
    let mut st = state(true);
    st.services[0].endpoints.truncate(1);
    let ex = explain(
        &st,
        &Query { cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()], ..from("10.96.0.10:80/tcp", "10.244.1.2") },
    );
    assert_eq!(ex.verdict, Verdict::Dnat);
    assert_eq!(ex.summary, "DNAT to 10.244.1.2:8080");
    assert_eq!(ex.masquerade, Masquerade::Yes);
    assert!(ex.masquerade_reason.contains("hairpin"));
    // Among several endpoints, only if the DNAT picks itself.
    let ex = explain(
        &state(true),
        &Query { cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()], ..from("10.96.0.10:80/tcp", "10.244.1.2") },
    );
    assert_eq!(ex.masquerade, Masquerade::Maybe);
}

#[test]
fn no_endpoints_rejects() {
    let ex = explain(&state(true), &q("10.96.0.30:80/tcp"));
    assert_eq!(ex.verdict, Verdict::Reject);
    assert_eq!(ex.summary, "REJECT: demo/empty:http has no endpoints");
    assert!(ex.endpoints.is_empty());
    assert_eq!(ex.masquerade, Masquerade::No);
}

#[test]
fn internal_policy_local_without_local_endpoints_drops_when_they_exist_elsewhere() {
    // node-c as the controlplane sends it: no endpoint of itl, but the hint that it has some.
    let mut st = state(false);
    st.services[4].endpoints.clear();
    st.services[4].service.as_mut().unwrap().families_with_endpoints = vec!["IPv4".into()];
    let ex = explain(&st, &q("10.96.0.50:80/tcp"));
    assert_eq!(ex.verdict, Verdict::Drop);
    assert_eq!(
        ex.summary,
        "DROP: demo/itl:http has no local endpoints on node-c (internalTrafficPolicy Local; the service has \
         endpoints on other nodes): traffic to the cluster IP is dropped"
    );
    assert!(ex.endpoints.is_empty());
    assert_eq!(ex.masquerade, Masquerade::No);
    // Endpoints the node got for other traffic (the cluster set) say the same.
    assert_eq!(explain(&state(false), &q("10.96.0.50:80/tcp")).verdict, Verdict::Drop);

    // No endpoint anywhere in the destination's family: REJECT, as with no endpoints at all.
    st.services[4].service.as_mut().unwrap().families_with_endpoints = vec!["IPv6".into()];
    let ex = explain(&st, &q("10.96.0.50:80/tcp"));
    assert_eq!(ex.verdict, Verdict::Reject);
    assert_eq!(ex.summary, "REJECT: demo/itl:http has no endpoints");

    let ex = explain(&state(true), &q("10.96.0.50:80/tcp"));
    assert_eq!(ex.verdict, Verdict::Dnat);
    assert_eq!(ips(&ex), ["10.244.1.2:8080", "10.244.1.3:8080"]);
    assert_eq!(ex.policy_value.as_deref(), Some("Local"));
}

#[test]
fn both_policies_local_without_local_endpoints() {
    // web-local with both policies Local, seen from node-c: like kube-proxy, the controlplane
    // still sends it the cluster endpoints (the service is externally reachable), none local.
    let mut st = state(false);
    let svc = st.services[1].service.as_mut().unwrap();
    svc.internal_policy_local = true;
    svc.families_with_endpoints = vec!["IPv4".into()];
    let node_port = explain(&st, &q("10.77.0.12:30081/tcp"));
    assert_eq!(node_port.verdict, Verdict::Drop);
    assert!(
        node_port.summary.contains("no local endpoints; the service has endpoints on other nodes"),
        "{}",
        node_port.summary
    );
    let cluster_ip = explain(&st, &q("10.96.0.12:80/tcp"));
    assert_eq!(cluster_ip.verdict, Verdict::Drop);
    assert!(cluster_ip.summary.contains("has no local endpoints on node-c"), "{}", cluster_ip.summary);
    // A pod reaching the node port is short-circuited to every cluster endpoint.
    let from_pod = explain(
        &st,
        &Query { cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()], ..from("10.77.0.12:30081/tcp", "10.244.3.9") },
    );
    assert_eq!(from_pod.verdict, Verdict::Dnat, "{}", from_pod.summary);
    assert_eq!(ips(&from_pod), ["10.244.1.2:8080", "10.244.1.3:8080", "10.244.2.2:8080"]);

    // Without endpoints anywhere, both are rejected.
    st.services[1].endpoints.clear();
    st.services[1].service.as_mut().unwrap().families_with_endpoints.clear();
    for dst in ["10.77.0.12:30081/tcp", "10.96.0.12:80/tcp"] {
        let ex = explain(&st, &q(dst));
        assert_eq!(ex.verdict, Verdict::Reject, "{dst}");
        assert_eq!(ex.summary, "REJECT: demo/web-local:http has no endpoints", "{dst}");
    }
}

#[test]
fn node_port_with_local_policy() {
    // node-a has two local pods: only those, the source kept.
    let ex = explain(&state(true), &q("10.77.0.10:30081/tcp"));
    assert_eq!(ex.verdict, Verdict::Dnat);
    assert_eq!(ex.matched.as_ref().unwrap().address_kind, AddressKind::NodePort);
    assert_eq!(ex.traffic_policy.as_deref(), Some("external"));
    assert_eq!(ips(&ex), ["10.244.1.2:8080", "10.244.1.3:8080"]);
    assert_eq!(ex.masquerade, Masquerade::No);
    assert!(ex.reasons.iter().any(|r| r.contains("pass --node-ip")), "{:#?}", ex.reasons);

    // node-c has none: DROP.
    let ex = explain(&state(false), &q("10.77.0.12:30081/tcp"));
    assert_eq!(ex.verdict, Verdict::Drop);
    assert!(ex.summary.starts_with("DROP: externalTrafficPolicy Local and no endpoint"), "{}", ex.summary);
    // ... except for pods and the node itself, which use every cluster endpoint.
    let pod =
        Query { cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()], ..from("10.77.0.12:30081/tcp", "10.244.2.2") };
    let ex = explain(&state(false), &pod);
    assert_eq!((ex.verdict, ex.endpoints.len(), ex.masquerade), (Verdict::Dnat, 3, Masquerade::Maybe));
    let node = Query { node_ips: vec!["10.77.0.12".parse().unwrap()], ..from("10.77.0.12:30081/tcp", "10.77.0.12") };
    let ex = explain(&state(false), &node);
    assert_eq!((ex.verdict, ex.endpoints.len(), ex.masquerade), (Verdict::Dnat, 3, Masquerade::Yes));

    // With --node-ip, another destination is no node port.
    let other = Query { node_ips: vec!["10.77.0.10".parse().unwrap()], ..q("10.77.0.11:30081/tcp") };
    assert_eq!(explain(&state(true), &other).verdict, Verdict::NoRule);
}

#[test]
fn load_balancer_source_ranges_drop_other_sources() {
    let ex = explain(&state(true), &from("192.0.2.10:80/tcp", "198.51.100.7"));
    assert_eq!(ex.verdict, Verdict::Drop);
    assert_eq!(ex.summary, "DROP: source 198.51.100.7 is not in loadBalancerSourceRanges 203.0.113.0/24");

    let ex = explain(&state(true), &from("192.0.2.10:80/tcp", "203.0.113.5"));
    assert_eq!(ex.verdict, Verdict::Dnat);
    assert_eq!(ex.matched.as_ref().unwrap().address_kind, AddressKind::LoadBalancerIp);
    assert_eq!(ex.masquerade, Masquerade::Yes, "externalTrafficPolicy Cluster masquerades");
    assert_eq!(ex.session_affinity_seconds, 10800);
    assert!(ex.reasons.iter().any(|r| r.contains("session affinity")));

    // Ranges only guard load-balancer IPs, not external IPs.
    let ex = explain(&state(true), &from("192.0.2.20:80/tcp", "198.51.100.7"));
    assert_eq!((ex.verdict, ex.matched.as_ref().unwrap().address_kind), (Verdict::Dnat, AddressKind::ExternalIp));
}

#[test]
fn not_a_service_address() {
    for dst in ["10.96.0.99:80/tcp", "10.96.0.10:81/tcp", "10.96.0.10:80/udp", "192.0.2.99:80/tcp"] {
        let ex = explain(&state(true), &q(dst));
        assert_eq!(ex.verdict, Verdict::NoRule, "{dst}");
        assert!(ex.matched.is_none());
        assert!(ex.summary.starts_with("no kpx rule"), "{}", ex.summary);
    }
    let ex = explain(&state(true), &q("10.96.0.10:81/tcp"));
    assert!(ex.reasons[0].contains("has no port 81/TCP"), "{:#?}", ex.reasons);
    let ex = explain(&state(true), &q("192.0.2.99:80/tcp"));
    assert!(ex.reasons[0].contains("headless"), "{:#?}", ex.reasons);
}

#[test]
fn ipv6_targets_and_cidrs() {
    let t: Target = "[fd00::10]:80/tcp".parse().unwrap();
    assert_eq!(t.to_string(), "[fd00::10]:80/TCP");
    let c: Cidr = "fd00:10:244::/48".parse().unwrap();
    assert!(c.contains("fd00:10:244:1::2".parse().unwrap()));
    assert!(!c.contains("fd00:10:245::2".parse().unwrap()));
    assert!(!c.contains("10.0.0.1".parse().unwrap()));
    let any: Cidr = "0.0.0.0/0".parse().unwrap();
    assert!(any.contains("1.2.3.4".parse().unwrap()));

    let mut st = state(true);
    st.services[0].service.as_mut().unwrap().cluster_ips.push("fd00::10".into());
    st.services[0].endpoints.push(Endpoint { ip: "fd00:10:244:1::2".into(), ..ep("web", "", true, false) });
    let ex = explain(&st, &q("[fd00::10]:80/tcp"));
    assert_eq!(ips(&ex), ["[fd00:10:244:1::2]:8080"], "only endpoints of the destination's family");
}

#[test]
fn table_and_json() {
    let ex = explain(&state(true), &from("10.77.0.10:30081/tcp", "198.51.100.7"));
    let table = crate::render::explain_view(&ex);
    assert!(table.starts_with("DNAT to one of 2 endpoints, at random\nNode:"), "{table}");
    assert!(table.contains("Service:      demo/web-local:http (node port 30081 -> port 80)"), "{table}");
    assert!(table.contains("Policy:       externalTrafficPolicy: Local"), "{table}");
    assert!(table.contains("ENDPOINT          CLUSTER   LOCAL\n10.244.1.2:8080   yes       yes"), "{table}");
    assert!(table.contains("\nWhy:\n  - "), "{table}");
    assert!(table.lines().all(|l| l == l.trim_end()), "{table}");

    let json: serde_json::Value =
        serde_json::from_str(&crate::output::explain(&ex, crate::output::Format::Json).unwrap()).unwrap();
    assert_eq!(json["verdict"], "DNAT");
    assert_eq!(json["matched"]["address_kind"], "NODE_PORT");
    assert_eq!(json["masquerade"], "NO");
    assert_eq!(json["endpoints"][0]["target_port"], 8080);
}
