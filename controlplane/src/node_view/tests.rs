use super::*;
use crate::model::{EndpointSlice, IpFamily, Protocol, ServicePort, ServiceType, SliceEndpoint, SlicePort};

fn svc() -> model::Service {
    model::Service {
        key: ServiceKey::new("ns", "web"),
        service_type: ServiceType::ClusterIp,
        cluster_ips: vec!["10.96.0.1".parse().unwrap()],
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        ports: vec![ServicePort { name: "http".into(), protocol: Protocol::Tcp, port: 80, node_port: 0 }],
        session_affinity_timeout: None,
        external_policy_local: false,
        internal_policy_local: false,
        health_check_node_port: 0,
        topology_aware: false,
    }
}

/// A ready endpoint on `node` in `zone`, hinted for its own zone and node.
fn ep(ip: &str, node: &str, zone: &str) -> SliceEndpoint {
    SliceEndpoint {
        ip: ip.parse().unwrap(),
        ready: true,
        serving: true,
        terminating: false,
        node_name: Some(node.into()),
        zone: Some(zone.into()),
        zone_hints: Some(vec![zone.into()]),
        node_hints: None,
    }
}

fn slice(name: &str, endpoints: Vec<SliceEndpoint>) -> EndpointSlice {
    EndpointSlice {
        key: ServiceKey::new("ns", name),
        service: ServiceKey::new("ns", "web"),
        family: IpFamily::V4,
        ports: vec![SlicePort { name: "http".into(), protocol: Protocol::Tcp, port: 8080 }],
        endpoints,
        trigger_time: None,
    }
}

fn node(name: &str, zone: Option<&str>) -> NodeInfo {
    NodeInfo { name: name.into(), zone: zone.map(Into::into) }
}

/// (ip, for_cluster, for_local) of a view.
fn summary(view: &[v1::Endpoint]) -> Vec<(String, bool, bool)> {
    view.iter().map(|e| (e.ip.clone(), e.for_cluster, e.for_local)).collect()
}

fn nodes() -> Vec<NodeInfo> {
    vec![
        node("a1", Some("zone-a")),
        node("a2", Some("zone-a")),
        node("b1", Some("zone-b")),
        node("b2", Some("zone-b")),
        node("c1", Some("zone-c")),
        node("x", None),
    ]
}

/// Every service shape the view depends on, each with a mix of endpoint states.
fn scenarios() -> Vec<(&'static str, model::Service, Vec<EndpointSlice>)> {
    let mut terminating = ep("10.0.0.4", "b1", "zone-b");
    terminating.ready = false;
    terminating.terminating = true;
    let mut not_serving = ep("10.0.0.5", "b2", "zone-b");
    not_serving.ready = false;
    not_serving.serving = false;
    let mixed = vec![ep("10.0.0.1", "a1", "zone-a"), ep("10.0.0.2", "a2", "zone-a"), ep("10.0.0.3", "b1", "zone-b")];
    let mut with_states = mixed.clone();
    with_states.extend([terminating.clone(), not_serving]);
    let node_hinted: Vec<SliceEndpoint> = mixed
        .iter()
        .cloned()
        .map(|mut e| {
            e.node_hints = Some(vec![e.node_name.clone().unwrap()]);
            e
        })
        .collect();
    let topo = model::Service { topology_aware: true, ..svc() };
    let etp_local = model::Service {
        service_type: ServiceType::NodePort,
        external_policy_local: true,
        topology_aware: true,
        ..svc()
    };
    let itp_local = model::Service { internal_policy_local: true, ..svc() };
    let both_local = model::Service { internal_policy_local: true, ..etp_local.clone() };
    let mut only_terminating = terminating.clone();
    only_terminating.node_name = Some("a1".into());
    vec![
        ("plain", svc(), vec![slice("s1", with_states.clone())]),
        ("zone hints", topo.clone(), vec![slice("s1", with_states.clone())]),
        ("node hints", topo.clone(), vec![slice("s1", node_hinted)]),
        ("etp local + zone hints", etp_local, vec![slice("s1", with_states.clone())]),
        ("itp local", itp_local.clone(), vec![slice("s1", with_states.clone())]),
        ("both local", both_local, vec![slice("s1", with_states)]),
        ("itp local, terminating only", itp_local, vec![slice("s1", vec![only_terminating])]),
        ("no endpoints", topo, vec![]),
    ]
}

#[test]
fn nodes_of_one_class_see_what_they_would_see_on_their_own() {
    for (name, service, slices) in scenarios() {
        let slices: Vec<&EndpointSlice> = slices.iter().collect();
        let p = PreparedService::prepare(&service, &slices);
        let mut by_class: BTreeMap<ViewClass, Vec<v1::Endpoint>> = BTreeMap::new();
        for n in nodes() {
            // The view computed from everything known about this very node.
            let own = p.view_of(Some(&n.name), n.zone.as_deref());
            assert_eq!(p.view(&n), own, "{name}: node {}", n.name);
            let class = p.class_of(&n);
            if let Some(seen) = by_class.get(&class) {
                assert_eq!(seen, &own, "{name}: class {class:?}");
            }
            by_class.insert(class, own);
        }
    }
}

#[test]
fn classes_are_as_coarse_as_the_service_allows() {
    let scenarios = scenarios();
    let class_names = |i: usize| {
        let (_, service, slices) = &scenarios[i];
        let slices: Vec<&EndpointSlice> = slices.iter().collect();
        let p = PreparedService::prepare(service, &slices);
        nodes().iter().map(|n| p.class_of(n)).collect::<BTreeSet<_>>()
    };
    // plain: one view for everyone.
    assert_eq!(class_names(0), BTreeSet::from([ViewClass::All]));
    // zone hints: one view per zone.
    let zones = class_names(1);
    assert!(zones.contains(&ViewClass::Zone(Some("zone-a".into()))), "{zones:?}");
    assert!(zones.iter().all(|c| matches!(c, ViewClass::Zone(_))), "{zones:?}");
    // node hints: the hinted nodes are special; the rest fall back to zones.
    let p = {
        let (_, service, slices) = &scenarios[2];
        PreparedService::prepare(service, &slices.iter().collect::<Vec<_>>())
    };
    assert_eq!(p.special_nodes, BTreeSet::from(["a1".into(), "a2".into(), "b1".into()]));
    assert_eq!(p.class_of(&node("b2", Some("zone-b"))), ViewClass::Zone(Some("zone-b".into())));
    // itp local: nodes hosting a usable endpoint (not the not-serving one on b2) are special.
    let (_, service, slices) = &scenarios[4];
    let p = PreparedService::prepare(service, &slices.iter().collect::<Vec<_>>());
    assert_eq!(p.special_nodes, BTreeSet::from(["a1".into(), "a2".into(), "b1".into()]));
    assert!(!p.zone_dependent);
    assert_eq!(p.class_of(&node("b2", Some("zone-b"))), ViewClass::All);
}

#[test]
fn node_hints_take_precedence_over_zone_hints() {
    let (_, service, slices) = &scenarios()[2];
    let p = PreparedService::prepare(service, &slices.iter().collect::<Vec<_>>());
    let only = |v: Vec<v1::Endpoint>| summary(&v).into_iter().filter(|e| e.1).map(|e| e.0).collect::<Vec<_>>();
    assert_eq!(only(p.view(&node("a1", Some("zone-a")))), ["10.0.0.1"]);
    // Not named by any hint: zone hints apply.
    assert_eq!(only(p.view(&node("a9", Some("zone-a")))), ["10.0.0.1", "10.0.0.2"]);
    // Zone nobody hinted: no filtering.
    assert_eq!(only(p.view(&node("c1", Some("zone-c")))), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
}

#[test]
fn both_policies_local_without_external_reach_never_sets_for_cluster() {
    // Scenario 5's ports have no node port: nothing reaches it from outside, so only the local
    // set exists (kube-proxy's UsesClusterEndpoints is false).
    let (_, service, slices) = &scenarios()[5];
    let p = PreparedService::prepare(service, &slices.iter().collect::<Vec<_>>());
    assert_eq!(summary(&p.view(&node("a1", Some("zone-a")))), [("10.0.0.1".into(), false, true)]);
    assert_eq!(summary(&p.view(&node("c1", Some("zone-c")))), []);
    // b1 has a ready and a terminating endpoint: only the ready one is local.
    assert_eq!(summary(&p.view(&node("b1", Some("zone-b")))), [("10.0.0.3".into(), false, true)]);
}

#[test]
fn both_policies_local_and_reachable_from_outside_keep_the_cluster_set() {
    // kube-proxy short-circuits pod and host traffic to a node port, external or LB IP to the
    // cluster chain, so every node keeps the cluster endpoints, also one without local ones.
    let (_, service, slices) = &scenarios()[5];
    let slices: Vec<&EndpointSlice> = slices.iter().collect();
    let with_node_port = |mut s: model::Service| {
        s.ports[0].node_port = 30080;
        s
    };
    let external_ip = |mut s: model::Service| {
        s.external_ips = vec!["192.0.2.1".parse().unwrap()];
        s
    };
    for reachable in [with_node_port(service.clone()), external_ip(service.clone())] {
        let p = PreparedService::prepare(&reachable, &slices);
        let c1 = summary(&p.view(&node("c1", Some("zone-c"))));
        assert_eq!(
            c1,
            [("10.0.0.1".into(), true, false), ("10.0.0.2".into(), true, false), ("10.0.0.3".into(), true, false)]
        );
        let a1 = summary(&p.view(&node("a1", Some("zone-a"))));
        // Zone hints narrow a1's cluster set to zone-a; its own endpoint is also local.
        assert_eq!(a1, [("10.0.0.1".into(), true, true), ("10.0.0.2".into(), true, false)]);
        assert_eq!(p.wire.families_with_endpoints, ["IPv4"]);
    }
}

#[test]
fn local_falls_back_to_serving_terminating_on_the_node() {
    let (_, service, slices) = &scenarios()[6];
    let p = PreparedService::prepare(service, &slices.iter().collect::<Vec<_>>());
    // ITP Local on a ClusterIP service: no cluster set at all (like kube-proxy).
    assert_eq!(summary(&p.view(&node("a1", None))), [("10.0.0.4".into(), false, true)]);
    assert_eq!(summary(&p.view(&node("b1", None))), []);
}

#[test]
fn duplicates_keep_one_entry_preferring_a_ready_one() {
    let mut unready = ep("10.0.0.1", "a1", "zone-a");
    unready.ready = false;
    unready.serving = false;
    let mut other = slice("s2", vec![ep("10.0.0.1", "a2", "zone-a"), ep("10.0.0.1", "a2", "zone-a")]);
    other.ports[0].port = 9090;
    let first = slice("s1", vec![unready]);
    // Given in reverse key order: the result must not depend on the order.
    let p = PreparedService::prepare(&svc(), &[&other, &first]);
    let v = p.view(&node("n", None));
    assert_eq!(summary(&v), [("10.0.0.1".into(), true, false)]);
    assert_eq!(v[0].ports, [v1::EndpointPort { name: "http".into(), port: 9090 }]);
    assert_eq!(v[0].service, "ns/web");
}

#[test]
fn ports_resolve_per_slice_by_name_and_protocol() {
    let mut service = svc();
    service.ports.push(ServicePort { name: "dns".into(), protocol: Protocol::Udp, port: 53, node_port: 0 });
    let mut s1 = slice("s1", vec![ep("10.0.0.1", "a1", "zone-a")]);
    s1.ports.push(SlicePort { name: "dns".into(), protocol: Protocol::Udp, port: 5353 });
    let mut s2 = slice("s2", vec![ep("10.0.0.2", "a1", "zone-a")]);
    // Same name, wrong protocol: not a match, so this endpoint has no "dns" port.
    s2.ports.push(SlicePort { name: "dns".into(), protocol: Protocol::Tcp, port: 5353 });
    let p = PreparedService::prepare(&service, &[&s1, &s2]);
    let v = p.view(&node("n", None));
    let ports = |i: usize| v[i].ports.iter().map(|p| (p.name.as_str(), p.port)).collect::<Vec<_>>();
    assert_eq!(ports(0), [("dns", 5353), ("http", 8080)]);
    assert_eq!(ports(1), [("http", 8080)]);
}

#[test]
fn endpoints_are_sorted_by_ip_across_families() {
    let mut v6 = slice("s0-v6", vec![ep("fd00::2", "a1", "zone-a"), ep("fd00::1", "a1", "zone-a")]);
    v6.family = IpFamily::V6;
    let v4 = slice("s1-v4", vec![ep("10.0.0.10", "a1", "zone-a"), ep("10.0.0.9", "a1", "zone-a")]);
    let p = PreparedService::prepare(&svc(), &[&v6, &v4]);
    let ips: Vec<_> = p.view(&node("n", None)).into_iter().map(|e| e.ip).collect();
    assert_eq!(ips, ["10.0.0.9", "10.0.0.10", "fd00::1", "fd00::2"]);
}

#[test]
fn local_services_say_in_which_families_they_have_endpoints_anywhere() {
    let families = |service: &model::Service, slices: &[EndpointSlice]| {
        let p = PreparedService::prepare(service, &slices.iter().collect::<Vec<_>>());
        p.wire.families_with_endpoints.clone()
    };
    let itp_local = model::Service { internal_policy_local: true, ..svc() };
    let on_a1 = vec![slice("s1", vec![ep("10.0.0.1", "a1", "zone-a")])];

    // Endpoints only on a1: c1 gets nothing to program, but learns they exist elsewhere.
    let p = PreparedService::prepare(&itp_local, &on_a1.iter().collect::<Vec<_>>());
    assert_eq!(p.view(&node("c1", Some("zone-c"))), []);
    assert_eq!(p.wire.families_with_endpoints, ["IPv4"]);
    // It is part of the entry's content version, so nodes get the change.
    let unhinted = v1::Service { families_with_endpoints: vec![], ..(*p.wire).clone() };
    assert_ne!(kpx_proto::version::service_hash(&p.wire), kpx_proto::version::service_hash(&unhinted));
    // externalTrafficPolicy Local alone counts too.
    let etp_local = model::Service { service_type: ServiceType::NodePort, external_policy_local: true, ..svc() };
    assert_eq!(families(&etp_local, &on_a1), ["IPv4"]);
    // Cluster policies need no hint: the entry stays as it was.
    assert_eq!(families(&svc(), &on_a1), Vec::<String>::new());

    // Dual-stack with only IPv4 endpoints (the IPv6 one is not serving).
    let dual = model::Service {
        cluster_ips: vec!["10.96.0.1".parse().unwrap(), "fd00:96::1".parse().unwrap()],
        ..itp_local.clone()
    };
    let mut not_serving = ep("fd00::1", "a1", "zone-a");
    (not_serving.ready, not_serving.serving) = (false, false);
    let mut v6 = slice("s0-v6", vec![not_serving]);
    v6.family = IpFamily::V6;
    let v4 = slice("s1-v4", vec![ep("10.0.0.1", "a1", "zone-a"), ep("10.0.0.2", "b1", "zone-b")]);
    assert_eq!(families(&dual, &[v6.clone(), v4.clone()]), ["IPv4"]);
    // Both families, sorted and once each whatever the slice order; serving-terminating counts.
    let mut terminating = ep("fd00::2", "b1", "zone-b");
    (terminating.ready, terminating.terminating) = (false, true);
    v6.endpoints.push(terminating);
    assert_eq!(families(&dual, &[v4, v6.clone()]), ["IPv4", "IPv6"]);

    // No usable endpoint anywhere: empty, so nodes still reject.
    v6.endpoints.remove(1);
    assert_eq!(families(&dual, &[v6]), Vec::<String>::new());
    assert_eq!(families(&dual, &[]), Vec::<String>::new());
}

#[test]
fn endpoints_carry_their_nodes_tag_and_views_stay_shared() {
    let mut nameless = ep("10.0.0.9", "c1", "zone-c");
    nameless.node_name = None;
    let s = slice("web-1", vec![ep("10.0.0.1", "a1", "zone-a"), nameless]);
    let p = PreparedService::prepare(&svc(), &[&s]);
    let tags = |n: &NodeInfo| p.view(n).iter().map(|e| (e.ip.clone(), e.node_tag)).collect::<Vec<_>>();
    let want = vec![("10.0.0.1".to_string(), kpx_proto::node_tag("a1")), ("10.0.0.9".to_string(), 0)];
    // The tag says where the endpoint runs, not who looks: a1 and b1 share the one view.
    assert_eq!(tags(&node("a1", Some("zone-a"))), want);
    assert_eq!(tags(&node("b1", Some("zone-b"))), want);
    assert_eq!(p.class_of(&node("a1", Some("zone-a"))), ViewClass::All);
}
