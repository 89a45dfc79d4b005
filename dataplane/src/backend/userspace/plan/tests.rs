use super::*;
use crate::state::ServiceEntry;

pub(crate) fn service(name: &str, cluster_ip: &str, proto: pb::Protocol) -> pb::Service {
    pb::Service {
        namespace: "ns".into(),
        name: name.into(),
        cluster_ips: vec![cluster_ip.into()],
        ports: vec![pb::ServicePort { name: "p".into(), protocol: proto as i32, port: 80, node_port: 0 }],
        ..Default::default()
    }
}

pub(crate) fn endpoint(ip: &str, cluster: bool, local: bool) -> pb::Endpoint {
    pb::Endpoint {
        service: String::new(),
        ip: ip.into(),
        ports: vec![pb::EndpointPort { name: "p".into(), port: 8080 }],
        for_cluster: cluster,
        for_local: local,
        node_tag: 0,
    }
}

pub(crate) fn entry(s: pb::Service, eps: Vec<pb::Endpoint>) -> ServiceEntry {
    ServiceEntry { service: s, endpoints: eps.into_iter().map(|e| (e.ip.clone(), e)).collect() }
}

fn key(class: Class) -> PortalKey {
    PortalKey { service: "ns/web".into(), port: "p".into(), proto: Proto::Tcp, family: IpFamily::V4, class }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn cluster_ip_service_has_one_portal_over_the_cluster_endpoints() {
    let e = entry(
        service("web", "10.96.0.10", pb::Protocol::Tcp),
        vec![
            endpoint("10.244.1.3", true, false),
            endpoint("10.244.1.2", true, false),
            endpoint("fd00::1", true, false),
        ],
    );
    let plan = plan_service(&PlanConfig::default(), IpFamily::V4, &e);
    assert_eq!(plan.portals.keys().cloned().collect::<Vec<_>>(), [key(Class::Cluster)]);
    let spec = &plan.portals[&key(Class::Cluster)];
    // Sorted, IPv4 only, resolved to the port's target port.
    assert_eq!(spec.endpoints, [sa("10.244.1.2:8080"), sa("10.244.1.3:8080")]);
    assert_eq!((spec.name.as_str(), spec.affinity), ("ns/web:p", None));
    let p = &plan.ports[0];
    assert_eq!((p.internal, p.has_external()), (Route::Portal(Class::Cluster), false));
    // The IPv6 family plans nothing for an IPv4 service.
    assert!(plan_service(&PlanConfig::default(), IpFamily::V6, &e).portals.is_empty());
}

#[test]
fn no_endpoints_is_rejected_but_the_portal_stays() {
    let e = entry(service("web", "10.96.0.10", pb::Protocol::Tcp), vec![]);
    let plan = plan_service(&PlanConfig::default(), IpFamily::V4, &e);
    assert_eq!(plan.ports[0].internal, Route::Filter(Verdict::Reject));
    assert!(plan.portals[&key(Class::Cluster)].endpoints.is_empty());
}

#[test]
fn local_policies_pick_local_endpoints_and_drop_when_there_are_none_here() {
    let mut s = service("web", "10.96.0.10", pb::Protocol::Tcp);
    s.external_policy_local = true;
    s.ports[0].node_port = 30080;
    s.families_with_endpoints = vec!["IPv4".into()];
    let e = entry(s.clone(), vec![endpoint("10.244.1.2", true, true), endpoint("10.244.2.2", true, false)]);
    let cfg = PlanConfig { cluster_cidrs: vec!["10.244.0.0/16".into()], ..Default::default() };
    let plan = plan_service(&cfg, IpFamily::V4, &e);
    let p = &plan.ports[0];
    assert_eq!(p.internal, Route::Portal(Class::Cluster));
    assert_eq!(p.external, Route::Portal(Class::Local));
    assert_eq!(p.external_from_cluster, Some(Class::Cluster));
    assert_eq!(plan.portals[&key(Class::Local)].endpoints, [sa("10.244.1.2:8080")]);
    assert_eq!(plan.portals[&key(Class::Cluster)].endpoints.len(), 2);

    // A node with none of the endpoints: its external traffic is dropped, not rejected; the
    // Local portal is there, empty.
    let e = entry(s.clone(), vec![endpoint("10.244.2.2", true, false)]);
    let p = &plan_service(&cfg, IpFamily::V4, &e).ports[0];
    assert_eq!(p.external, Route::Filter(Verdict::Drop));
    // internalTrafficPolicy Local with no endpoint anywhere: rejected.
    s.internal_policy_local = true;
    s.families_with_endpoints.clear();
    let p = &plan_service(&cfg, IpFamily::V4, &entry(s, vec![])).ports[0];
    assert_eq!((p.internal, p.external), (Route::Filter(Verdict::Reject), Route::Filter(Verdict::Reject)));
}

#[test]
fn affinity_is_capped_and_bad_input_is_skipped_with_a_reason() {
    let mut s = service("web", "10.96.0.10", pb::Protocol::Tcp);
    s.session_affinity_timeout_seconds = 1_000_000;
    s.external_ips = vec!["bogus".into(), "198.51.100.1".into(), "198.51.100.1".into()];
    s.ports.push(pb::ServicePort { name: "p".into(), protocol: pb::Protocol::Tcp as i32, port: 81, node_port: 0 });
    s.ports.push(pb::ServicePort { name: "s".into(), protocol: pb::Protocol::Sctp as i32, port: 82, node_port: 0 });
    s.ports.push(pb::ServicePort { name: "big".into(), protocol: pb::Protocol::Udp as i32, port: 70000, node_port: 0 });
    let plan = plan_service(&PlanConfig::default(), IpFamily::V4, &entry(s, vec![endpoint("10.0.0.1", true, false)]));
    assert_eq!(plan.ports.len(), 1, "{:?}", plan.skipped);
    assert_eq!(plan.ports[0].external_ips, [ip("198.51.100.1")]);
    assert_eq!(plan.portals.values().next().unwrap().affinity, Some(Duration::from_secs(86400)));
    let skipped = plan.skipped.join("\n");
    for want in ["invalid IP \"bogus\"", "duplicate port name", "Sctp", "invalid port 70000"] {
        assert!(skipped.contains(want), "{want}: {skipped}");
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn source_ranges_admit_the_node_when_one_holds_its_address() {
    let mut s = service("web", "10.96.0.10", pb::Protocol::Tcp);
    s.load_balancer_ips = vec!["203.0.113.10".into()];
    s.load_balancer_source_ranges = vec!["10.77.0.0/24".into()];
    let e = entry(s.clone(), vec![endpoint("10.0.0.1", true, false)]);
    let cfg = PlanConfig { node_ips: vec![ip("10.77.0.10")], ..Default::default() };
    let p = &plan_service(&cfg, IpFamily::V4, &e).ports[0];
    assert!(p.lb_from_node);
    assert_eq!(p.ranges.as_ref().map(Vec::len), Some(1));
    // Every range invalid: nothing admitted (fail closed), not everything.
    s.load_balancer_source_ranges = vec!["nope".into()];
    let p = &plan_service(&cfg, IpFamily::V4, &entry(s, vec![])).ports[0];
    assert_eq!(p.ranges.as_ref().map(Vec::len), Some(0));
}
