//! Renderer tests on hand-built responses shaped like the example cluster (deploy/examples).

use super::*;
use crate::output::{self, Format};
use kpx_proto::v1::{
    EndpointPort, ListNodesResponse, NodeGroupView, NodeState, NodeStatus, ServiceAcrossNodes, ServiceState,
};

const V1: &str = "0123456789abcdef0123456789abcdef";
const V0: &str = "fedcba9876543210fedcba9876543210";
const NOW: i64 = 1_700_000_000_000;

fn svc(name: &str, ty: ServiceType, cluster_ip: &str, ports: Vec<ServicePort>) -> Service {
    Service {
        namespace: "demo".into(),
        name: name.into(),
        r#type: ty as i32,
        cluster_ips: vec![cluster_ip.into()],
        ports,
        ..Default::default()
    }
}

fn port(name: &str, proto: Protocol, port: u32, node_port: u32) -> ServicePort {
    ServicePort { name: name.into(), protocol: proto as i32, port, node_port }
}

fn ep(service: &str, ip: &str, ports: &[(&str, u32)], for_cluster: bool, for_local: bool) -> Endpoint {
    Endpoint {
        service: format!("demo/{service}"),
        ip: ip.into(),
        ports: ports.iter().map(|(n, p)| EndpointPort { name: n.to_string(), port: *p }).collect(),
        for_cluster,
        for_local,
        node_tag: 0,
    }
}

fn web_endpoints(service: &str, local: bool) -> Vec<Endpoint> {
    // As node-a sees them: two pods on node-a, one on node-b.
    vec![
        ep(service, "10.244.2.2", &[("http", 8080)], true, false),
        ep(service, "10.244.1.3", &[("http", 8080)], true, local),
        ep(service, "10.244.1.2", &[("http", 8080)], true, local),
    ]
}

fn node_a_state() -> NodeState {
    let mut local = svc("web-local", ServiceType::NodePort, "10.96.0.12", vec![port("http", Protocol::Tcp, 80, 30081)]);
    local.external_policy_local = true;
    NodeState {
        node_name: "node-a".into(),
        version: V1.into(),
        services: vec![
            ServiceState {
                service: Some(svc(
                    "web",
                    ServiceType::ClusterIp,
                    "10.96.0.10",
                    vec![port("http", Protocol::Tcp, 80, 0)],
                )),
                endpoints: web_endpoints("web", false),
            },
            ServiceState { service: Some(local), endpoints: web_endpoints("web-local", true) },
            ServiceState {
                service: Some(svc(
                    "empty",
                    ServiceType::ClusterIp,
                    "10.96.0.30",
                    vec![port("http", Protocol::Tcp, 80, 0)],
                )),
                endpoints: vec![],
            },
            ServiceState {
                service: Some(svc(
                    "echo-udp",
                    ServiceType::ClusterIp,
                    "10.96.0.20",
                    vec![port("dns", Protocol::Udp, 53, 0)],
                )),
                endpoints: vec![
                    ep("echo-udp", "10.244.1.4", &[("dns", 5353)], true, false),
                    ep("echo-udp", "10.244.2.3", &[("dns", 5353)], true, false),
                ],
            },
        ],
    }
}

fn nodes() -> ListNodesResponse {
    ListNodesResponse {
        nodes: vec![
            NodeStatus {
                name: "node-b".into(),
                connected: false,
                zone: "zone-b".into(),
                desired_version: V1.into(),
                known_node: true,
                ..Default::default()
            },
            NodeStatus {
                name: "node-a".into(),
                connected: true,
                connected_since_unix_ms: NOW - 5 * 60 * 1000,
                backend: "iptables".into(),
                ip_families: vec!["IPv4".into()],
                zone: "zone-a".into(),
                desired_version: V1.into(),
                acked_version: V0.into(),
                versions_behind: 1,
                last_nack_error: "iptables-restore: line 7 failed\nCOMMIT".into(),
                last_apply_micros: 12_345,
                last_ack_unix_ms: NOW - 1000,
                known_node: true,
                agent_version: "0.1.0".into(),
            },
        ],
    }
}

/// The column each header starts at, from the header line.
fn column_starts(header: &str, names: &[&str]) -> Vec<usize> {
    names.iter().map(|n| header.find(n).unwrap_or_else(|| panic!("no column {n} in {header:?}"))).collect()
}

#[test]
fn nodes_table_sorted_aligned_and_short() {
    let out = nodes_table(&nodes(), NOW);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let names = ["NAME", "CONNECTED", "ZONE", "BACKEND", "VERSION", "ACKED", "BEHIND", "LAST-APPLY", "ERROR"];
    let starts = column_starts(lines[0], &names);
    let cell = |line: &str, col: usize| -> String {
        let end = starts.get(col + 1).copied().unwrap_or(line.len()).min(line.len());
        line[starts[col]..end].trim().to_string()
    };
    assert!(lines[1].starts_with("node-a"), "sorted by name:\n{out}");
    let a: Vec<String> = (0..names.len()).map(|c| cell(lines[1], c)).collect();
    assert_eq!(
        a,
        [
            "node-a",
            "yes (5m)",
            "zone-a",
            "iptables",
            "0123456789ab",
            "fedcba987654",
            "1",
            "12ms",
            "iptables-restore: line 7 failed..."
        ]
    );
    let b: Vec<String> = (0..names.len()).map(|c| cell(lines[2], c)).collect();
    assert_eq!(b, ["node-b", "no", "zone-b", "-", "0123456789ab", "-", "-", "-", "-"]);
    assert!(out.lines().all(|l| l == l.trim_end()));
}

#[test]
fn nodes_table_empty() {
    assert_eq!(nodes_table(&ListNodesResponse::default(), NOW), "No nodes.\n");
}

#[test]
fn state_table_rows_per_port() {
    let out = state_table(&node_a_state());
    let expected = "\
node node-a, version 0123456789ab, 4 services, 8 endpoints

SERVICE               TYPE        CLUSTER-IP(S)   PORT/PROTO   NODEPORT   EXTERNAL   POLICY                    ENDPOINTS
demo/echo-udp:dns     ClusterIP   10.96.0.20      53/UDP       -          -          ext=Cluster int=Cluster   10.244.1.4:5353,10.244.2.3:5353
demo/empty:http       ClusterIP   10.96.0.30      80/TCP       -          -          ext=Cluster int=Cluster   <none>
demo/web:http         ClusterIP   10.96.0.10      80/TCP       -          -          ext=Cluster int=Cluster   10.244.1.2:8080,10.244.1.3:8080,10.244.2.2:8080
demo/web-local:http   NodePort    10.96.0.12      80/TCP       30081      -          ext=Local int=Cluster     10.244.1.2:8080*,10.244.1.3:8080*,10.244.2.2:8080

* = local endpoint, used for Local traffic policies; (...) = not used for cluster traffic on this node
";
    assert_eq!(out, expected);
}

#[test]
fn state_table_truncates_endpoints_and_sorts_numerically() {
    let eps: Vec<Endpoint> =
        [9, 10, 2, 3, 4, 5].iter().map(|i| ep("big", &format!("10.244.1.{i}"), &[("", 80)], true, false)).collect();
    let state = NodeState {
        node_name: "node-a".into(),
        version: V1.into(),
        services: vec![ServiceState {
            service: Some(svc("big", ServiceType::ClusterIp, "10.96.0.99", vec![port("", Protocol::Tcp, 80, 0)])),
            endpoints: eps,
        }],
    };
    let out = state_table(&state);
    let row = out.lines().find(|l| l.starts_with("demo/big ")).expect(&out);
    assert!(row.ends_with("10.244.1.2:80,10.244.1.3:80,10.244.1.4:80,10.244.1.5:80 +2 more"), "{row}");
    assert!(!out.contains("* ="), "no legend without marks:\n{out}");
}

#[test]
fn state_table_marks_and_edge_cases() {
    let mut affinity =
        svc("sticky", ServiceType::LoadBalancer, "10.96.0.40", vec![port("https", Protocol::Tcp, 443, 30443)]);
    affinity.cluster_ips.push("fd00:96::40".into());
    affinity.external_ips = vec!["192.0.2.10".into()];
    affinity.load_balancer_ips = vec!["198.51.100.7".into()];
    affinity.session_affinity_timeout_seconds = 10800;
    affinity.internal_policy_local = true;
    let state = NodeState {
        node_name: "node-a".into(),
        version: V1.into(),
        services: vec![ServiceState {
            service: Some(affinity),
            endpoints: vec![
                ep("sticky", "fd00:244::5", &[("https", 8443)], true, false),
                ep("sticky", "10.244.2.9", &[("https", 8443)], false, false),
                ep("sticky", "10.244.1.9", &[("other", 1)], true, false),
            ],
        }],
    };
    let out = state_table(&state);
    let row = out.lines().find(|l| l.starts_with("demo/sticky:https")).expect(&out);
    for want in [
        "LoadBalancer",
        "10.96.0.40,fd00:96::40",
        "443/TCP",
        "30443",
        "192.0.2.10,198.51.100.7",
        "ext=Cluster int=Local affinity=ClientIP/10800s",
        "(10.244.2.9:8443),[fd00:244::5]:8443",
    ] {
        assert!(row.contains(want), "{want:?} missing in {row:?}");
    }
    assert!(!row.contains("10.244.1.9"), "an endpoint without this port is not listed: {row}");
    assert!(out.ends_with(LEGEND));
}

#[test]
fn state_table_empty_node() {
    let state = NodeState { node_name: "node-c".into(), version: String::new(), services: vec![] };
    assert_eq!(state_table(&state), "node node-c, version -, 0 services, 0 endpoints\nNo services.\n");
    let one = NodeState {
        node_name: "n".into(),
        version: V1.into(),
        services: vec![ServiceState {
            service: Some(svc("s", ServiceType::ClusterIp, "10.96.0.1", vec![])),
            endpoints: vec![ep("s", "10.244.1.1", &[], true, false)],
        }],
    };
    let out = state_table(&one);
    assert!(out.starts_with("node n, version 0123456789ab, 1 service, 1 endpoint\n"), "{out}");
    assert!(out.contains("demo/s    ClusterIP"), "{out}");
}

fn web_local_across_nodes() -> ServiceAcrossNodes {
    let mut local = svc("web-local", ServiceType::NodePort, "10.96.0.12", vec![port("http", Protocol::Tcp, 80, 30081)]);
    local.external_policy_local = true;
    let node_b = vec![
        ep("web-local", "10.244.1.2", &[("http", 8080)], true, false),
        ep("web-local", "10.244.1.3", &[("http", 8080)], true, false),
        ep("web-local", "10.244.2.2", &[("http", 8080)], true, true),
    ];
    ServiceAcrossNodes {
        service: Some(local),
        views: vec![
            NodeGroupView { nodes: vec!["node-a".into()], endpoints: web_endpoints("web-local", true) },
            NodeGroupView { nodes: vec!["node-b".into()], endpoints: node_b },
            NodeGroupView { nodes: vec!["*".into()], endpoints: vec![] },
        ],
    }
}

#[test]
fn service_view_fields_and_groups() {
    let out = service_view(&web_local_across_nodes());
    let expected = "\
Service:        demo/web-local
Type:           NodePort
Cluster IPs:    10.96.0.12
External:       -
Source ranges:  -
Ports:          http 80/TCP nodePort=30081
Policy:         ext=Local int=Cluster
Endpoints in:   -
Health check:   -

Nodes: node-a
  ENDPOINT      PORTS       CLUSTER   LOCAL
  10.244.1.2*   http=8080   yes       yes
  10.244.1.3*   http=8080   yes       yes
  10.244.2.2    http=8080   yes       no

Nodes: node-b
  ENDPOINT      PORTS       CLUSTER   LOCAL
  10.244.1.2    http=8080   yes       no
  10.244.1.3    http=8080   yes       no
  10.244.2.2*   http=8080   yes       yes

Nodes: * (every other node)
  <none>

";
    assert_eq!(out, format!("{expected}{LEGEND}"));
}

#[test]
fn service_view_without_views() {
    let resp = ServiceAcrossNodes {
        service: Some(svc("empty", ServiceType::ClusterIp, "10.96.0.30", vec![port("http", Protocol::Tcp, 80, 0)])),
        views: vec![],
    };
    let out = service_view(&resp);
    assert!(out.starts_with("Service:        demo/empty\n"), "{out}");
    assert!(out.ends_with("\nNo node views.\n"), "{out}");
    assert!(service_view(&ServiceAcrossNodes::default()).contains("<unknown>"));
}

#[test]
fn human_units() {
    assert_eq!(human_age(45_000), "45s");
    assert_eq!(human_age(5 * 60_000 + 10_000), "5m");
    assert_eq!(human_age(3 * 3_600_000), "3h");
    assert_eq!(human_age(3 * 86_400_000), "3d");
    assert_eq!(human_age(-5), "0s");
    assert_eq!(human_micros(850), "850us");
    assert_eq!(human_micros(4_200), "4.2ms");
    assert_eq!(human_micros(12_345), "12ms");
    assert_eq!(human_micros(1_500_000), "1.5s");
}

#[test]
fn json_parses_back_with_enum_names() {
    let out = output::state(&node_a_state(), Format::Json).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["node_name"], "node-a");
    assert_eq!(v["version"], V1);
    let web = v["services"].as_array().unwrap().iter().find(|s| s["service"]["name"] == "web").unwrap();
    assert_eq!(web["service"]["type"], "CLUSTER_IP");
    assert_eq!(web["service"]["ports"][0]["protocol"], "TCP");
    assert_eq!(web["service"]["cluster_ips"][0], "10.96.0.10");
    assert_eq!(web["endpoints"].as_array().unwrap().len(), 3);
    assert_eq!(web["endpoints"][0]["ports"][0]["port"], 8080);

    let nodes: serde_json::Value = serde_json::from_str(&output::nodes(&nodes(), Format::Json, NOW).unwrap()).unwrap();
    assert_eq!(nodes["nodes"][1]["versions_behind"], 1);
    assert_eq!(nodes["nodes"][1]["last_nack_error"], "iptables-restore: line 7 failed\nCOMMIT");
}

#[test]
fn yaml_parses_back_to_the_same_document() {
    let resp = web_local_across_nodes();
    let json: serde_json::Value = serde_json::from_str(&output::service(&resp, Format::Json).unwrap()).unwrap();
    let yaml = output::service(&resp, Format::Yaml).unwrap();
    let from_yaml: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(from_yaml, json, "yaml:\n{yaml}");
    assert_eq!(from_yaml["service"]["type"], "NODE_PORT");
    assert_eq!(from_yaml["views"][2]["nodes"][0], "*");
    assert!(yaml.ends_with('\n'));

    let empty = output::state(&NodeState::default(), Format::Yaml).unwrap();
    let v: serde_json::Value = serde_saphyr::from_str(&empty).unwrap();
    assert_eq!(v["services"], serde_json::json!([]), "{empty}");
}

#[test]
fn table_format_is_the_renderer() {
    assert_eq!(output::nodes(&nodes(), Format::Table, NOW).unwrap(), nodes_table(&nodes(), NOW));
    assert_eq!(output::state(&node_a_state(), Format::Table).unwrap(), state_table(&node_a_state()));
}
