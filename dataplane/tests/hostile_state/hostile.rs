//! The deterministic hostile state: one valid dual-stack service (web) among many hostile
//! ones, and a hostile delta over it.

use kpx_proto::v1 as pb;

use crate::model::{Model, SCTP, TCP, UDP, ep, key, port};

const WEB: &str = "ns/web";
pub(crate) const WEB_V4: &str = "172.30.0.41";
pub(crate) const WEB_V6: &str = "fd00:172:30::41";

pub(crate) fn web() -> pb::Service {
    pb::Service {
        namespace: "ns".into(),
        name: "web".into(),
        r#type: pb::ServiceType::NodePort as i32,
        cluster_ips: vec![WEB_V4.into(), WEB_V6.into()],
        ports: vec![port("http", TCP, 80, 30080)],
        ..Default::default()
    }
}

/// Builds hostile services: each gets valid cluster IPs of both families and a valid port
/// unless the case says otherwise, so that each case tests one thing.
struct Hostile {
    m: Model,
    n: u32,
    /// Services that must not be rendered in any family and must be reported as skipped.
    unrenderable: Vec<String>,
}

impl Hostile {
    fn svc(&mut self, namespace: &str, name: &str) -> pb::Service {
        self.n += 1;
        let n = self.n;
        pb::Service {
            namespace: namespace.into(),
            name: name.into(),
            r#type: pb::ServiceType::ClusterIp as i32,
            cluster_ips: vec![format!("172.30.{}.{}", 1 + n / 250, n % 250 + 1), format!("fd00:172:30::1:{n:x}")],
            ports: vec![port("p", TCP, 80, 0)],
            ..Default::default()
        }
    }

    /// Adds `s` with one valid endpoint per family on port "p".
    fn add(&mut self, s: pb::Service) -> String {
        let n = self.n;
        let k = key(&s.namespace, &s.name);
        self.m.upsert(s);
        self.m.add_endpoint(&k, ep(&format!("10.181.{}.{}", n / 250, n % 250 + 1), "p", 8080, true, false));
        self.m.add_endpoint(&k, ep(&format!("fd00:181::{n:x}"), "p", 8080, true, false));
        k
    }

    fn add_eps(&mut self, k: &str, eps: Vec<pb::Endpoint>) {
        eps.into_iter().for_each(|e| self.m.add_endpoint(k, e));
    }
}

pub(crate) const INJECT: &str = "\n-A INPUT -j DROP\n";

/// The hostile state, and the services in it that cannot be rendered in any family.
pub(crate) fn hostile_model() -> (Model, Vec<String>) {
    let mut m = Model::default();
    m.upsert(web());
    for ip in ["10.180.0.1", "10.180.0.2", "fd00:10::1", "fd00:10::2"] {
        m.add_endpoint(WEB, ep(ip, "http", 8080, true, false));
    }
    let mut h = Hostile { m, n: 0, unrenderable: Vec::new() };

    // Names and namespaces.
    let long_mixed = "\"\\\n-A INPUT -j DROP ".repeat(500);
    let long = "a".repeat(10_000);
    let names: [(&str, &str); 14] = [
        ("q\"uote", "back\\slash"),
        ("sp ace", "new\nline\n-A INPUT -j DROP"),
        ("*", "-A INPUT -j DROP"),
        ("ns", "x\" -j DROP \""),
        ("ns", "ünïcödé-名前-🚀"),
        ("\r\t\u{7f}\u{2028}\u{feff}", "nul\u{0}byte"),
        ("ns", &long),
        (&long_mixed, "long"),
        ("", ""),
        ("ns", "'single' $(reboot) `id`; | &&"),
        ("COMMIT", "*filter\n:INPUT DROP [0:0]\nCOMMIT"),
        ("#", "# --comment \"x\" -j ACCEPT"),
        ("ns", "%s%n%x"),
        ("ns", "web "),
    ];
    for (ns, name) in names {
        let s = h.svc(ns, name);
        h.add(s);
    }
    // Same name as ns/web port "http" to the chain hash ("ns/web:http", tcp): its endpoints
    // must not end up in web's chains.
    let mut hijack = h.svc("ns", "web:http");
    hijack.ports = vec![port("", TCP, 80, 0)];
    let k = key("ns", "web:http");
    h.m.upsert(hijack);
    h.add_eps(&k, vec![ep("10.66.6.6", "", 6666, true, false), ep("fd00:66::6", "", 6666, true, false)]);

    // Cluster IPs that are no address: the service cannot be rendered and must say so.
    let bad_cluster_ips = [
        "10.0.0.1\n-A INPUT -j DROP",
        "999.1.1.1",
        "fe80::1%eth0",
        "10.0.0.0/33",
        "1.2.3.4/-1",
        " 172.30.9.9",
        "172.30.9.9/32",
        "1.2.3",
        "0x7f000001",
        "172.030.1.1",
        "[fd00::1]",
        "1.2.3.4 -j ACCEPT",
    ];
    for (i, ip) in bad_cluster_ips.iter().enumerate() {
        let mut s = h.svc("badcip", &format!("c{i}"));
        s.cluster_ips = vec![ip.to_string()];
        let k = h.add(s);
        h.unrenderable.push(k);
    }
    // Headless ("None", ""), a garbage IP next to a valid one, an IPv4-mapped IPv6 address.
    for (name, ips) in [
        ("headless", vec!["None"]),
        ("empty", vec![""]),
        ("mixed", vec!["999.1.1.1", "172.30.2.1", "fe80::1%eth0", "fd00:172:30::2:1"]),
        ("mapped", vec!["::ffff:1.2.3.4"]),
    ] {
        let mut s = h.svc("cip", name);
        s.cluster_ips = ips.into_iter().map(String::from).collect();
        let k = h.add(s);
        if name == "mapped" {
            h.add_eps(&k, vec![ep("::ffff:10.1.2.3", "p", 80, true, false)]);
        }
    }

    // External IPs, load-balancer IPs and source ranges.
    let mut s = h.svc("addrs", "lb");
    s.r#type = pb::ServiceType::LoadBalancer as i32;
    s.ports = vec![port("p", TCP, 80, 30100)];
    s.external_ips = [INJECT, "999.1.1.1", "", "::ffff:1.2.3.4", "fe80::1%eth0", "1.2.3.4 -j ACCEPT", "192.168.99.1"]
        .into_iter()
        .chain(["fd00:99::1", "*", "0.0.0.0", "::"])
        .map(String::from)
        .collect();
    s.load_balancer_ips = ["5.6.7.8\n", "5.6.7.8", "fd00:56::8", "*", "", "5.6.7.8/32"].map(String::from).to_vec();
    s.load_balancer_source_ranges = [
        "10.0.0.0/33",
        "1.2.3.4/-1",
        "",
        "0.0.0.0/0\n-A INPUT -j DROP",
        "203.0.113.0/25",
        "10.1.2.3/24",
        "fd00::/64",
        "::/129",
        "1.2.3.4/08",
        "1.2.3.4/+8",
        "/8",
        "fd00::1/64",
    ]
    .map(String::from)
    .to_vec();
    h.add(s);
    let mut s = h.svc("addrs", "ranges-all-bad");
    s.r#type = pb::ServiceType::LoadBalancer as i32;
    s.load_balancer_ips = vec!["5.6.7.9".into(), "fd00:56::9".into()];
    s.load_balancer_source_ranges = vec!["garbage".into(), "1.2.3.4/33".into(), "::/200".into()];
    h.add(s);

    // Ports, node ports, health check node ports.
    let mut s = h.svc("ports", "numbers");
    s.r#type = pb::ServiceType::NodePort as i32;
    s.ports = vec![
        port("zero", TCP, 0, 0),
        port("big", TCP, 65536, 0),
        port("max", UDP, u32::MAX, 0),
        port("np-big", TCP, 81, 65536),
        port("np-max", TCP, 82, u32::MAX),
        port("np-one", TCP, 83, 1),
        port("p", TCP, 84, 30084),
    ];
    s.external_policy_local = true;
    s.health_check_node_port = u32::MAX;
    let k = h.add(s);
    let named = ["zero", "big", "max", "np-big", "np-max", "np-one"];
    h.add_eps(&k, named.iter().map(|n| ep("10.182.0.1", n, 80, true, true)).collect());
    for (name, hc) in [("hc-big", 65536), ("hc-ok", 30999), ("hc-zero", 0)] {
        let mut s = h.svc("ports", name);
        s.external_policy_local = true;
        s.ports = vec![port("p", TCP, 80, 30000 + hc % 1000)];
        s.health_check_node_port = hc;
        h.add(s);
    }

    // Protocols outside the enum (and SCTP, which is valid).
    let mut s = h.svc("protos", "all");
    s.ports = [0, 4, 99, -1, i32::MAX, i32::MIN]
        .iter()
        .enumerate()
        .map(|(i, p)| port(&format!("x{i}"), *p, 80 + i as u32, 0))
        .chain([port("p", SCTP, 90, 0)])
        .collect();
    h.add(s);

    // Endpoints: unknown port names, bad ports, bad addresses, the wrong family, the same
    // address written three ways, a port listed twice.
    let s = h.svc("eps", "odd");
    let k = h.add(s);
    h.add_eps(
        &k,
        vec![
            ep("10.183.0.1", "nope", 80, true, false),
            ep("10.183.0.2", "p", 0, true, false),
            ep("10.183.0.3", "p", 65536, true, false),
            ep("10.183.0.4", "p", u32::MAX, true, false),
            ep("10.0.0.1\n-A INPUT -j DROP", "p", 80, true, false),
            ep("999.1.1.1", "p", 80, true, false),
            ep("", "p", 80, true, false),
            ep("fe80::1%eth0", "p", 80, true, false),
            ep("::ffff:1.2.3.4", "p", 80, true, false),
            ep(" 10.183.0.5", "p", 80, true, false),
            ep("10.183.0.6/32", "p", 80, true, false),
            ep("fd00:10::5", "p", 80, true, false),
            ep("fd00:10:0::5", "p", 80, true, false),
            ep("fd00:10:0:0:0:0:0:5", "p", 80, true, false),
            ep("0.0.0.0", "p", 80, true, false),
            ep("255.255.255.255", "p", 80, true, false),
            ep("127.0.0.1", "p", 80, true, false),
            ep("10.183.0.7", "p", 80, false, false),
            pb::Endpoint {
                ports: vec![
                    pb::EndpointPort { name: "p".into(), port: 8080 },
                    pb::EndpointPort { name: "p".into(), port: 9090 },
                ],
                ..ep("10.183.0.8", "p", 0, true, false)
            },
        ],
    );
    let mut s = h.svc("eps", "v4only");
    s.cluster_ips.truncate(1);
    let k = h.add(s);
    h.add_eps(&k, vec![ep("fd00:184::1", "p", 80, true, false)]);
    let mut s = h.svc("eps", "v6only");
    s.cluster_ips.remove(0);
    let k = h.add(s);
    h.add_eps(&k, vec![ep("10.184.0.1", "p", 80, true, false)]);

    // Duplicate ports.
    let mut s = h.svc("dup", "ports");
    s.ports = vec![
        port("p", TCP, 80, 0),
        port("p", TCP, 81, 0),
        port("p", TCP, 80, 0),
        port("p", UDP, 80, 0),
        port("", TCP, 82, 0),
        port("", TCP, 83, 0),
    ];
    let k = h.add(s);
    h.add_eps(&k, vec![ep("10.185.0.1", "", 80, true, false)]);

    // Session affinity timeouts.
    for (name, t) in [("affinity-max", u32::MAX), ("affinity-century", 86400 * 365 * 100), ("affinity-one", 1)] {
        let mut s = h.svc("affinity", name);
        s.session_affinity_timeout_seconds = t;
        h.add(s);
    }

    // Local policies with odd family hints.
    let mut s = h.svc("local", "weird");
    s.r#type = pb::ServiceType::LoadBalancer as i32;
    s.external_policy_local = true;
    s.internal_policy_local = true;
    s.ports = vec![port("p", TCP, 80, 30200)];
    s.load_balancer_ips = vec!["5.6.7.10".into(), "fd00:56::10".into()];
    s.health_check_node_port = 30201;
    s.families_with_endpoints =
        ["IPv4\n-A INPUT -j DROP", "ipv4", "", "IPv6 ", "IPv4", "IPv4", "\"IPv6\""].map(String::from).to_vec();
    let k = h.add(s);
    h.add_eps(&k, vec![ep("10.186.0.1", "p", 80, false, true), ep("fd00:186::1", "p", 80, false, true)]);
    for (name, families) in [("none-here", vec!["IPv4", "IPv6"]), ("none-anywhere", vec!["IPv6\u{0}", "*"])] {
        let mut s = h.svc("local", name);
        s.internal_policy_local = true;
        s.external_policy_local = true;
        s.ports = vec![port("p", UDP, 53, 30053 + (name.len() as u32))];
        s.families_with_endpoints = families.into_iter().map(String::from).collect();
        h.m.upsert(s);
    }

    // Service types outside the enum; many endpoints; many ports.
    for t in [99, -1] {
        let mut s = h.svc("types", &format!("t{t}"));
        s.r#type = t;
        h.add(s);
    }
    let s = h.svc("big", "many-endpoints");
    let k = h.add(s);
    h.add_eps(&k, (0..300).map(|i| ep(&format!("10.187.{}.{}", i / 250, i % 250 + 1), "p", 80, true, false)).collect());
    let mut s = h.svc("big", "many-ports");
    s.ports = (0..60).map(|i| port(&format!("p{i}"), if i % 2 == 0 { TCP } else { UDP }, 1000 + i, 0)).collect();
    let k = h.add(s);
    h.add_eps(&k, (0..60).map(|i| ep("10.188.0.1", &format!("p{i}"), 2000 + i, true, false)).collect::<Vec<_>>());

    (h.m, h.unrenderable)
}

/// A hostile delta over [`hostile_model`]: hostile services go and come, one changes its
/// ports, web's endpoints change, an endpoint written another way goes away.
pub(crate) fn hostile_delta() -> pb::Update {
    let mut late = pb::Service {
        namespace: "late\n-A INPUT -j DROP".into(),
        name: "\"new\"".into(),
        cluster_ips: vec!["172.30.9.1".into(), INJECT.into(), "fd00:172:30::9:1".into()],
        external_ips: vec!["1.2.3.4\n-A INPUT -j DROP".into(), "192.168.99.9".into()],
        ports: vec![port("p", TCP, 80, 70000), port("p", TCP, 80, 30300), port("q", 42, 81, 0)],
        session_affinity_timeout_seconds: u32::MAX,
        ..Default::default()
    };
    late.r#type = pb::ServiceType::NodePort as i32;
    let late_key = key(&late.namespace, &late.name);
    let mut dup = pb::Service {
        namespace: "dup".into(),
        name: "ports".into(),
        cluster_ips: vec!["172.30.200.1".into(), "fd00:172:30::200:1".into()],
        ports: vec![port("p", TCP, 80, 0), port("p", TCP, 81, 0), port("", TCP, 82, 0)],
        ..Default::default()
    };
    dup.r#type = pb::ServiceType::ClusterIp as i32;
    let removed = [("addrs", "lb"), ("ports", "numbers"), ("q\"uote", "back\\slash"), ("ns", "web:http")];
    pb::Update {
        nonce: 2,
        services_removed: removed
            .iter()
            .map(|(n, s)| pb::ServiceRef { namespace: (*n).into(), name: (*s).into() })
            .collect(),
        endpoints_removed: [
            (WEB, "10.180.0.1"),
            (WEB, "fd00:10::1"),
            ("eps/odd", "fd00:10:0::5"),
            ("eps/odd", "999.1.1.1"),
        ]
        .iter()
        .map(|(s, ip)| pb::EndpointRef { service: (*s).into(), ip: (*ip).into() })
        .collect(),
        services_upserted: vec![late, dup],
        endpoints_upserted: [
            (WEB, ep("10.180.0.3", "http", 8080, true, false)),
            (WEB, ep("fd00:10::3", "http", 8080, true, false)),
            (late_key.as_str(), ep("10.189.0.1", "p", 80, true, false)),
            (late_key.as_str(), ep("10.189.0.2\n-A INPUT -j DROP", "p", 80, true, false)),
            ("eps/odd", ep("10.183.0.9", "p", 65535, true, false)),
        ]
        .into_iter()
        .map(|(s, e)| pb::Endpoint { service: s.into(), ..e })
        .collect(),
        ..Default::default()
    }
}
