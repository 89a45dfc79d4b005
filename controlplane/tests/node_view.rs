//! Table tests: real Kubernetes objects (as `kubectl get -o json` prints them, or YAML) go
//! through the manifest loader and the conversions, and each node's view is asserted exactly.
//! Nodes come from testdata/nodes.json: node-a1, node-a2 (zone-a), node-b1 (zone-b), node-c1
//! (zone-c); "node-z" is a node without a zone and hosting nothing.

use kpx_controlplane::k8s::{self, ManifestError};
use kpx_controlplane::model::{ClusterEvent, EndpointSlice, ObjectKind, Service, ServiceKey, SkipReason, Skips};
use kpx_controlplane::node_view::{NodeInfo, PreparedService, ViewClass};
use kpx_proto::v1;
use std::collections::{BTreeMap, BTreeSet};

fn read(file: &str) -> String {
    let path = format!("{}/tests/testdata/{file}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A manifest file loaded the way the files source loads it.
struct Cluster {
    services: BTreeMap<ServiceKey, Option<Service>>,
    slices: Vec<EndpointSlice>,
    /// Slices that exist but were not usable.
    dropped_slices: Vec<String>,
    skips: Skips,
}

fn load(file: &str) -> Cluster {
    let skips = Skips::default();
    let events = k8s::events_from_manifest(&read(file), &skips).unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut cluster = Cluster { services: BTreeMap::new(), slices: Vec::new(), dropped_slices: Vec::new(), skips };
    for event in events {
        match event {
            ClusterEvent::Service(key, s) => {
                cluster.services.insert(key, s);
            }
            ClusterEvent::NotProxied(key) => {
                cluster.services.insert(key, None);
            }
            ClusterEvent::Slice(_, Some(slice)) => cluster.slices.push(slice),
            ClusterEvent::Slice(key, None) => cluster.dropped_slices.push(key.to_string()),
            other => panic!("{file}: unexpected {other:?}"),
        }
    }
    cluster
}

impl Cluster {
    fn service(&self, key: &str) -> &Service {
        let key: ServiceKey = key.parse().unwrap();
        self.services.get(&key).unwrap_or_else(|| panic!("{key} not loaded")).as_ref().expect("proxied")
    }

    fn prepare(&self, key: &str) -> PreparedService {
        let service = self.service(key);
        let slices: Vec<&EndpointSlice> = self.slices.iter().filter(|s| s.service == service.key).collect();
        PreparedService::prepare(service, &slices)
    }
}

fn nodes() -> BTreeMap<String, NodeInfo> {
    let events = k8s::events_from_manifest(&read("nodes.json"), &Skips::default()).unwrap();
    let mut nodes: BTreeMap<String, NodeInfo> = events
        .into_iter()
        .map(|e| match e {
            ClusterEvent::Node(name, Some(n)) => (name, NodeInfo { name: n.name, zone: n.zone }),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    nodes.insert("node-z".into(), NodeInfo { name: "node-z".into(), zone: None });
    nodes
}

fn node(name: &str) -> NodeInfo {
    nodes().remove(name).unwrap_or_else(|| panic!("no node {name}"))
}

/// (ip, ports as "name=port", for_cluster, for_local)
type Row = (&'static str, &'static str, bool, bool);

fn rows(view: &[v1::Endpoint], service: &str) -> Vec<(String, String, bool, bool)> {
    view.iter()
        .map(|e| {
            assert_eq!(e.service, service);
            let ports: Vec<String> = e.ports.iter().map(|p| format!("{}={}", p.name, p.port)).collect();
            (e.ip.clone(), ports.join(","), e.for_cluster, e.for_local)
        })
        .collect()
}

/// Asserts the view of `node` and that every node of the same class sees the same.
fn assert_view(p: &PreparedService, node_name: &str, want: &[Row]) {
    let n = node(node_name);
    let got = rows(&p.view(&n), &p.key.to_string());
    let want: Vec<_> = want.iter().map(|(ip, ports, c, l)| (ip.to_string(), ports.to_string(), *c, *l)).collect();
    assert_eq!(got, want, "{} seen from {node_name}", p.key);
    for other in nodes().values().filter(|o| p.class_of(o) == p.class_of(&n)) {
        assert_eq!(p.view(other), p.view(&n), "{}: {} and {node_name} share a class", p.key, other.name);
    }
}

fn assert_same_view_everywhere(p: &PreparedService, want: &[Row]) {
    for name in nodes().keys() {
        assert_eq!(p.class_of(&node(name)), ViewClass::All, "{}: {name}", p.key);
        assert_view(p, name, want);
    }
}

#[test]
fn hostnames_cluster_ip_with_three_endpoints() {
    let c = load("hostnames.json");
    let s = c.service("default/hostnames");
    assert_eq!(s.cluster_ips, ["10.0.1.175".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!((s.ports[0].name.as_str(), s.ports[0].port, s.ports[0].node_port), ("", 80, 0));
    assert_eq!(c.slices[0].trigger_time.as_deref(), Some("2025-06-03T09:14:30Z"));
    let p = c.prepare("default/hostnames");
    assert_eq!(p.wire.cluster_ips, ["10.0.1.175"]);
    assert_eq!(p.wire.r#type(), v1::ServiceType::ClusterIp);
    assert_eq!(p.wire.ports[0].port, 80);
    assert!(!p.zone_dependent && p.special_nodes.is_empty());
    assert_same_view_everywhere(
        &p,
        &[
            ("10.244.0.5", "=9376", true, false),
            ("10.244.0.6", "=9376", true, false),
            ("10.244.0.7", "=9376", true, false),
        ],
    );
    assert_eq!(c.skips.total(), 0);
    assert!(c.dropped_slices.is_empty());
}

#[test]
fn session_affinity_client_ip_timeout() {
    let c = load("session-affinity.json");
    assert_eq!(c.service("default/sticky").session_affinity_timeout, Some(600));
    assert_eq!(c.service("default/sticky-default").session_affinity_timeout, Some(10800));
    let p = c.prepare("default/sticky");
    assert_eq!(p.wire.session_affinity_timeout_seconds, 600);
    assert_same_view_everywhere(&p, &[("10.244.1.10", "http=8080", true, false)]);
    assert_eq!(c.prepare("default/sticky-default").wire.session_affinity_timeout_seconds, 10800);
}

#[test]
fn external_ips_with_local_policy_on_a_cluster_ip_service() {
    let c = load("external-ip.json");
    let s = c.service("default/ext");
    assert_eq!(s.external_ips.len(), 2);
    assert!(s.external_policy_local, "externalIPs make the external policy count");
    let p = c.prepare("default/ext");
    assert_eq!(p.wire.external_ips, ["192.0.2.10", "192.0.2.11"]);
    assert!(p.wire.external_policy_local);
    assert!(p.wire.families_with_endpoints.is_empty(), "no endpoints anywhere: nodes reject");
    assert_same_view_everywhere(&p, &[]);
}

#[test]
fn service_without_endpoints_has_an_empty_view() {
    let c = load("no-endpoints.json");
    assert_eq!(c.slices.len(), 1);
    assert!(c.slices[0].endpoints.is_empty() && c.slices[0].ports.is_empty());
    let p = c.prepare("default/lonely");
    assert_same_view_everywhere(&p, &[]);
    assert!(p.wire.families_with_endpoints.is_empty());
}

#[test]
fn headless_external_name_and_other_proxies_are_not_proxied() {
    let c = load("not-proxied.json");
    for key in ["default/headless", "default/db-alias", "default/mesh-owned"] {
        let key: ServiceKey = key.parse().unwrap();
        assert_eq!(c.services.get(&key), Some(&None), "{key}: an event saying it is not proxied");
    }
    assert_eq!(c.skips.total(), 0, "not being proxied is not an error");
}

#[test]
fn node_port_cluster_policy() {
    let c = load("nodeport-cluster.json");
    let p = c.prepare("default/np");
    assert_eq!(p.wire.r#type(), v1::ServiceType::NodePort);
    assert_eq!(p.wire.ports[0].node_port, 30080);
    assert!(!p.wire.external_policy_local);
    assert!(p.wire.families_with_endpoints.is_empty(), "only Local services carry the hint");
    assert_same_view_everywhere(
        &p,
        &[("10.244.1.20", "http=8080", true, false), ("10.244.2.20", "http=8080", true, false)],
    );
}

#[test]
fn node_port_local_policy_differs_on_hosting_nodes() {
    let c = load("nodeport-local.json");
    let p = c.prepare("default/np-local");
    assert!(p.wire.external_policy_local);
    assert_eq!(p.wire.families_with_endpoints, ["IPv4"]);
    assert_eq!(p.special_nodes, BTreeSet::from(["node-a1".to_string(), "node-b1".to_string()]));
    assert_eq!(p.class_of(&node("node-a1")), ViewClass::Node("node-a1".into()));
    assert_eq!(p.class_of(&node("node-a2")), ViewClass::All);
    let all = [
        ("10.244.1.30", "http=8080", true, false),
        ("10.244.1.31", "http=8080", true, false),
        ("10.244.2.30", "http=8080", true, false),
    ];
    assert_view(&p, "node-a2", &all);
    assert_view(&p, "node-c1", &all);
    assert_view(
        &p,
        "node-a1",
        &[
            ("10.244.1.30", "http=8080", true, true),
            ("10.244.1.31", "http=8080", true, true),
            ("10.244.2.30", "http=8080", true, false),
        ],
    );
    assert_view(
        &p,
        "node-b1",
        &[
            ("10.244.1.30", "http=8080", true, false),
            ("10.244.1.31", "http=8080", true, false),
            ("10.244.2.30", "http=8080", true, true),
        ],
    );
}

#[test]
fn load_balancer_with_ingress_and_source_ranges() {
    let c = load("loadbalancer.json");
    let p = c.prepare("default/lb");
    let w = &p.wire;
    assert_eq!(w.r#type(), v1::ServiceType::LoadBalancer);
    assert_eq!(w.load_balancer_ips, ["203.0.113.10"], "hostname-only and ipMode Proxy ingress are not VIPs");
    assert_eq!(w.load_balancer_source_ranges, ["198.51.100.0/24", "203.0.113.128/25"]);
    assert_eq!((w.ports[0].port, w.ports[0].node_port, w.health_check_node_port), (443, 30443, 32000));
    assert!(w.external_policy_local);
    assert_view(&p, "node-a1", &[("10.244.1.40", "https=8443", true, true)]);
    assert_view(&p, "node-b1", &[("10.244.1.40", "https=8443", true, false)]);
}

#[test]
fn terminating_endpoints_are_a_fallback_only() {
    let c = load("terminating.json");
    // No ready endpoint anywhere: the serving-terminating one is used, the others are not.
    assert_same_view_everywhere(&c.prepare("default/draining"), &[("10.244.1.50", "http=8080", true, false)]);
    // A ready endpoint exists: the terminating one is not used.
    assert_same_view_everywhere(&c.prepare("default/rolling"), &[("10.244.1.60", "http=8080", true, false)]);
}

#[test]
fn topology_hints_give_each_zone_its_view() {
    let c = load("topology.json");
    assert!(c.service("default/zonal").topology_aware, "trafficDistribution");
    assert!(c.service("default/zonal-partial").topology_aware, "topology-mode annotation");
    let p = c.prepare("default/zonal");
    assert!(p.zone_dependent && p.special_nodes.is_empty());
    assert_eq!(p.class_of(&node("node-a1")), ViewClass::Zone(Some("zone-a".into())));
    let zone_a = [("10.244.1.70", "http=8080", true, false), ("10.244.1.71", "http=8080", true, false)];
    assert_view(&p, "node-a1", &zone_a);
    assert_view(&p, "node-a2", &zone_a);
    assert_view(&p, "node-b1", &[("10.244.2.70", "http=8080", true, false)]);
    assert_view(&p, "node-c1", &[("10.244.2.70", "http=8080", true, false)]);
    // A node without a zone label ignores the hints.
    let all = [
        ("10.244.1.70", "http=8080", true, false),
        ("10.244.1.71", "http=8080", true, false),
        ("10.244.2.70", "http=8080", true, false),
    ];
    assert_view(&p, "node-z", &all);

    // One endpoint lacks hints: hints are ignored everywhere.
    let p = c.prepare("default/zonal-partial");
    assert!(!p.zone_dependent);
    assert_same_view_everywhere(
        &p,
        &[("10.244.1.80", "http=8080", true, false), ("10.244.2.80", "http=8080", true, false)],
    );
}

#[test]
fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() {
    let c = load("internal-local.json");
    let p = c.prepare("kube-system/node-local-dns");
    assert!(p.wire.internal_policy_local && !p.wire.external_policy_local);
    assert_eq!(p.wire.ports.iter().map(|p| p.protocol()).collect::<Vec<_>>(), [v1::Protocol::Udp, v1::Protocol::Tcp]);
    // Internal-only service: no cluster set at all, each node gets its own endpoints.
    assert_view(&p, "node-a1", &[("10.244.1.90", "dns=53,dns-tcp=53", false, true)]);
    assert_view(&p, "node-b1", &[("10.244.2.90", "dns=53,dns-tcp=53", false, true)]);
    assert_view(&p, "node-a2", &[]);
    assert_eq!(p.class_of(&node("node-a2")), ViewClass::All);
    // node-a2 gets no endpoint, but learns that the service has some elsewhere: it drops
    // cluster-IP traffic ("no local endpoints") rather than rejecting it ("no endpoints").
    assert_eq!(p.wire.families_with_endpoints, ["IPv4"]);
}

#[test]
fn dual_stack_merges_both_families() {
    let c = load("dual-stack.json");
    let p = c.prepare("default/dual");
    assert_eq!(p.wire.cluster_ips, ["10.96.110.1", "fd00:10:96::6e01"]);
    assert!(p.wire.families_with_endpoints.is_empty(), "Cluster policies: no hint");
    assert_same_view_everywhere(
        &p,
        &[
            ("10.244.1.100", "http=8080", true, false),
            ("10.244.2.100", "http=8080", true, false),
            ("fd00:10:244:1::64", "http=8080", true, false),
            ("fd00:10:244:2::64", "http=8080", true, false),
        ],
    );
}

#[test]
fn named_target_port_resolves_per_slice() {
    let c = load("named-targetport.json");
    assert_same_view_everywhere(
        &c.prepare("default/web"),
        &[("10.244.1.110", "http=8080", true, false), ("10.244.2.110", "http=9090", true, false)],
    );
}

#[test]
fn bad_input_drops_the_least_and_counts_it() {
    let c = load("bad-input.yaml");
    let count = |kind, reason| c.skips.count(kind, reason);
    // Invalid cluster IP: the whole service is skipped, as an event saying it is not proxied.
    assert_eq!(c.services.get(&"default/bad-cluster-ip".parse().unwrap()), Some(&None));
    // 10.96.0.300 and the external IP "not-an-ip".
    assert_eq!(count(ObjectKind::Service, SkipReason::InvalidIp), 2);
    let s = c.service("default/ports-mixed");
    assert_eq!(s.external_ips, ["192.0.2.1".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(s.ports.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["http"]);
    assert_eq!(count(ObjectKind::Service, SkipReason::PortOutOfRange), 2, "port 70000 and nodePort 70000");
    assert_eq!(count(ObjectKind::Service, SkipReason::UnknownProtocol), 1);
    // Slices: the invalid address and the port without a number are dropped.
    assert_eq!(count(ObjectKind::EndpointSlice, SkipReason::InvalidIp), 1);
    assert_eq!(count(ObjectKind::EndpointSlice, SkipReason::PortOutOfRange), 1);
    assert_eq!(count(ObjectKind::EndpointSlice, SkipReason::MissingServiceLabel), 1);
    assert_eq!(count(ObjectKind::EndpointSlice, SkipReason::UnsupportedAddressType), 1);
    assert_eq!(c.dropped_slices, ["default/orphan-xxxxx", "default/fqdn-yyyyy"]);
    // The malformed document is counted; the one after it still loads.
    assert_eq!(count(ObjectKind::Manifest, SkipReason::Malformed), 1);
    assert!(!c.services.contains_key(&"default/malformed".parse().unwrap()));
    assert_eq!(c.service("default/after-malformed").ports[0].port, 53);

    // 10.244.9.2 is in both slices: merged (not a skip), and the ready copy (second slice) wins.
    let before = c.skips.total();
    let p = c.prepare("default/ports-mixed");
    assert_eq!(c.skips.total(), before);
    assert_same_view_everywhere(
        &p,
        &[
            ("10.244.9.1", "http=8080", true, false),
            ("10.244.9.2", "http=8081", true, false),
            ("10.244.9.3", "http=8081", true, false),
        ],
    );
}

#[test]
fn unparsable_text_is_an_error_naming_the_document() {
    let skips = Skips::default();
    let yaml = "kind: Service\nmetadata: {name: a}\n---\nkind: Service\nmetadata: [unclosed\n";
    match k8s::events_from_manifest(yaml, &skips) {
        Err(ManifestError::Yaml { document, .. }) => assert_eq!(document, 1),
        other => panic!("{other:?}"),
    }
    match k8s::events_from_manifest("{\"kind\": \"Service\"}\n{\"kind\": ", &skips) {
        Err(ManifestError::Json { document, .. }) => assert_eq!(document, 1),
        other => panic!("{other:?}"),
    }
    // Empty text and comments-only YAML are valid and hold nothing.
    assert_eq!(k8s::events_from_manifest("", &skips).unwrap(), []);
    assert_eq!(k8s::events_from_manifest("# nothing\n---\n", &skips).unwrap(), []);
}

#[test]
fn single_json_object_and_yaml_list_load() {
    let skips = Skips::default();
    let events = k8s::events_from_manifest(&read("external-ip.json"), &skips).unwrap();
    assert!(matches!(&events[..], [ClusterEvent::Service(k, Some(_))] if k.name == "ext"));
    let yaml = "apiVersion: v1\nkind: ServiceList\nitems:\n- kind: Service\n  metadata: {name: a}\n  spec:\n    \
                clusterIP: 10.96.0.1\n    ports: [{port: 80}]\n";
    let events = k8s::events_from_manifest(yaml, &skips).unwrap();
    match &events[..] {
        [ClusterEvent::Service(k, Some(s))] => {
            assert_eq!(k, &ServiceKey::new("default", "a"), "namespace defaults to default");
            assert_eq!(s.ports[0].protocol, kpx_controlplane::model::Protocol::Tcp, "protocol defaults to TCP");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(skips.total(), 0);
}

#[test]
fn nodes_load_with_zone_and_internal_ips() {
    let events = k8s::events_from_manifest(&read("nodes.json"), &Skips::default()).unwrap();
    match &events[0] {
        ClusterEvent::Node(name, Some(n)) => {
            assert_eq!(name, "node-a1");
            assert_eq!(n.zone.as_deref(), Some("zone-a"));
            assert_eq!(n.addresses, ["172.18.0.2".parse::<std::net::IpAddr>().unwrap()], "Hostname is not an IP");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(events.len(), 4);
}

#[test]
fn slices_of_services_kpx_does_not_proxy_are_no_skip_but_orphans_are() {
    use kpx_controlplane::cache::{Cache, CacheConfig};
    use std::sync::Arc;
    // A headless Service and one of another proxy, with slices that lack the controller's
    // labels (hand-made), and a slice whose Service does not exist.
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: ns}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: mesh, namespace: ns, labels: {service.kubernetes.io/service-proxy-name: other}}
spec: {clusterIP: 10.96.0.9, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: ns, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.5]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: mesh-1, namespace: ns, labels: {kubernetes.io/service-name: mesh}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.6]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: gone-1, namespace: ns, labels: {kubernetes.io/service-name: gone}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.7]}]
"#;
    let skips = Arc::new(Skips::default());
    let cache = Cache::new(skips.clone(), CacheConfig::default());
    for e in k8s::events_from_manifest(yaml, &skips).unwrap() {
        cache.apply(e, None);
    }
    cache.apply(ClusterEvent::Synced, None);
    assert_eq!(skips.count(ObjectKind::EndpointSlice, SkipReason::UnknownService), 1, "{:?}", skips.snapshot());
    assert_eq!(skips.total(), 1);
    // A slice arriving later for the headless Service is quiet too.
    let late = yaml.replace("name: db-1", "name: db-2").replace("10.244.1.5", "10.244.1.8");
    for e in k8s::events_from_manifest(&late, &skips).unwrap() {
        cache.apply(e, None);
    }
    assert_eq!(skips.count(ObjectKind::EndpointSlice, SkipReason::UnknownService), 2, "gone-1 again, db-2 quiet");
}
