//! Kernel tests of `--backend nftables` with real traffic: the scenarios of tests/traffic.rs
//! (same harness, controlplane and manifests) against the real `kpx-dataplane` binary
//! programming each node through netlink, with the real `nft -j list table` as the independent
//! check of what was programmed, and drift repair (an element, an endpoint map's elements, a
//! rule, a chain, the whole table deleted by hand). Needs root, network namespaces and nft: skips loudly without them,
//! fails under CI=true.

#[path = "traffic/cluster.rs"]
mod cluster;
#[path = "traffic/manifest.rs"]
mod manifest;
mod netns;

use cluster::{Cluster, Options};
use kpx_dataplane::backend::nftables::names::PortNames;
use manifest::{Svc, TARGET_PORT};
use netns::{Outcome, Proto, Topology, eventually};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(2);
const CONVERGE: Duration = Duration::from_secs(15);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Root, namespaces, and the nft tool (the independent check).
fn ready() -> bool {
    if !netns::require_root_and_netns() {
        return false;
    }
    let nft = std::process::Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success());
    if !nft {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true and the nft tool (Debian package nftables) is missing");
        }
        eprintln!("\n**********\nSKIPPED (needs nft, Debian package nftables)\n**********");
    }
    nft
}

fn svc(name: &str, cluster_ip: &str, topo: &Topology, pods: &[&str]) -> Svc {
    let mut svc = Svc::new(name, cluster_ip);
    for name in pods {
        let pod = topo.pod(name);
        let addr = if cluster_ip.contains(':') { IpAddr::from(pod.ip6) } else { IpAddr::from(pod.ip4) };
        svc = svc.endpoint(addr, topo.nodes[pod.node].name);
    }
    svc
}

fn start(topo: Topology, services: &[Svc]) -> Cluster {
    Cluster::start_with_backend(topo, services, &["--backend", "nftables"])
}

/// `nft -j list table FAMILY kube-proxy` on node NODE, parsed.
fn nft_json(c: &Cluster, node: usize, family: &str) -> Value {
    let out = c.topo.nodes[node].ns.run(&["nft", "-j", "list", "table", family, "kube-proxy"]);
    serde_json::from_str(&out).expect("nft -j output is JSON")
}

/// Objects of one kind ("chain", "rule", "map", "set") in nft's JSON.
fn objects<'a>(v: &'a Value, kind: &str) -> Vec<&'a Value> {
    v["nftables"].as_array().unwrap().iter().filter_map(|o| o.get(kind)).collect()
}

fn chain_names(v: &Value) -> BTreeSet<String> {
    objects(v, "chain").iter().map(|c| c["name"].as_str().unwrap().to_string()).collect()
}

/// A key or value as nft writes it: "10.96.0.10 . tcp . 80", "0-21844".
fn nft_text(v: &Value) -> String {
    let plain = |p: &Value| p.to_string().trim_matches('"').to_string();
    if let Some(parts) = v.get("concat") {
        parts.as_array().unwrap().iter().map(plain).collect::<Vec<_>>().join(" . ")
    } else if let Some(r) = v.get("range") {
        format!("{}-{}", r[0], r[1])
    } else {
        plain(v)
    }
}

/// Elements of map NAME as (key text, verdict or value text), e.g. ("10.96.0.10 . tcp . 80",
/// "goto X") or ("0-21844", "10.244.1.2 . 8080").
fn map_elements(v: &Value, name: &str) -> BTreeMap<String, String> {
    let map = objects(v, "map").into_iter().find(|m| m["name"] == name).expect("the map");
    let mut out = BTreeMap::new();
    for e in map["elem"].as_array().into_iter().flatten() {
        let (k, d) = (&e[0], &e[1]);
        let data = if let Some(g) = d.get("goto") {
            format!("goto {}", g["target"].as_str().unwrap())
        } else if let Some(j) = d.get("jump") {
            format!("jump {}", j["target"].as_str().unwrap())
        } else if d.is_object() && d.get("concat").is_none() {
            d.as_object().and_then(|o| o.keys().next().cloned()).unwrap_or_default()
        } else {
            nft_text(d)
        };
        out.insert(nft_text(k), data);
    }
    out
}

/// Elements of set NAME as nft writes them ("10.244.1.2 . 10.244.1.2").
fn set_elements(v: &Value, name: &str) -> BTreeSet<String> {
    let set = objects(v, "set").into_iter().find(|m| m["name"] == name).expect("the set");
    set["elem"].as_array().into_iter().flatten().map(nft_text).collect()
}

/// The rule handles of every chain (unchanged handles: the rule was not rewritten).
fn handles(c: &Cluster, node: usize) -> BTreeMap<String, Vec<u64>> {
    let v = nft_json(c, node, "ip");
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in objects(&v, "rule") {
        out.entry(r["chain"].as_str().unwrap().into()).or_default().push(r["handle"].as_u64().unwrap());
    }
    out
}

const BASE_CHAINS: [&str; 16] = [
    "cluster-ips-check",
    "filter-forward",
    "filter-input",
    "filter-output",
    "filter-output-pre-dnat",
    "filter-prerouting-pre-dnat",
    "firewall-check",
    "mark-for-masquerade",
    "masquerading",
    "nat-output",
    "nat-postrouting",
    "nat-prerouting",
    "nodeport-endpoints-check",
    "reject-chain",
    "service-endpoints-check",
    "services",
];

#[test]
fn cluster_ip_balances_and_nft_lists_kube_proxys_layout() {
    if !ready() {
        return;
    }
    let topo = Topology::builder()
        .second_node()
        .pod("web-1", 0)
        .pod("web-2", 0)
        .pod("web-3", 1)
        .pod("sender", 0)
        .serve(&[TARGET_PORT])
        .build();
    let service = svc("web", "10.96.0.10", &topo, &["web-1", "web-2", "web-3"]);
    let c = start(topo, &[service]);
    let tally = c.topo.pod("sender").ns.tally(Proto::Tcp, at(ip("10.96.0.10"), 80), 60, WAIT);
    assert_eq!(tally.keys().map(String::as_str).collect::<Vec<_>>(), ["web-1", "web-2", "web-3"], "{tally:?}");
    // A pod keeps its address; a client outside the cluster CIDR is masqueraded (the rule in
    // `services`, kube-proxy's service-chain rule).
    let sender = IpAddr::from(c.topo.pod("sender").ip4);
    let from_pod = c.topo.pod("sender").ns.tcp_request(at(ip("10.96.0.10"), 80), WAIT).expect_answer("from a pod");
    assert_eq!(from_pod.peer.ip(), sender);
    let client = IpAddr::from(c.topo.client.ip4);
    for _ in 0..6 {
        let r = c.topo.client.ns.tcp_request(at(ip("10.96.0.10"), 80), WAIT).expect_answer("from outside");
        assert_ne!(r.peer.ip(), client, "off-cluster traffic to a cluster IP is masqueraded: {r:?}");
    }

    // The real nft, parsed: exactly the base chains and the service chain, whose endpoints are
    // three equal ranges of an endpoint map (kpx's difference from kube-proxy: no endpoint
    // chains).
    let v = nft_json(&c, 0, "ip");
    let names = PortNames::new("demo", "web", "tcp", "p");
    let mut want: BTreeSet<String> = BASE_CHAINS.iter().map(|s| s.to_string()).collect();
    want.insert(names.service.clone());
    assert_eq!(chain_names(&v), want);
    let ips = map_elements(&v, "service-ips");
    assert_eq!(ips, BTreeMap::from([("10.96.0.10 . tcp . 80".to_string(), format!("goto {}", names.service))]));
    let pods: Vec<String> =
        ["web-1", "web-2", "web-3"].iter().map(|p| format!("{} . {TARGET_PORT}", c.topo.pod(p).ip4)).collect();
    let mut ranges: Vec<String> = map_elements(&v, "endpoints-0").into_values().collect();
    ranges.sort();
    assert_eq!(ranges, pods, "{v}");
    assert_eq!(map_elements(&v, "endpoints-0").keys().collect::<Vec<_>>(), ["0-21844", "21845-43689", "43690-65534"]);
    let numgen = objects(&v, "rule")
        .into_iter()
        .find(|r| r["chain"] == names.service.as_str() && r.to_string().contains("numgen"));
    assert!(
        numgen.is_some_and(|r| r.to_string().contains("@endpoints-0")),
        "the service chain balances with numgen: {v}"
    );
    // The IPv6 table exists and holds no IPv4 service.
    let v6 = nft_json(&c, 0, "ip6");
    assert!(map_elements(&v6, "service-ips").is_empty());
}

#[test]
fn affinity_external_ips_udp_ipv6_hairpin_and_no_endpoints() {
    if !ready() {
        return;
    }
    let topo = Topology::builder()
        .pod("web-1", 0)
        .pod("web-2", 0)
        .pod("web-3", 0)
        .pod("sender", 0)
        .serve(&[TARGET_PORT])
        .build();
    let sticky = svc("sticky", "10.96.0.10", &topo, &["web-1", "web-2", "web-3"])
        .spec("sessionAffinity: ClientIP")
        .spec("sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}");
    let dns = svc("dns", "10.96.0.20", &topo, &["web-2", "web-3"]).udp(53).spec("externalIPs: [\"198.51.100.10\"]");
    let v6 = svc("web6", "fd00:96::10", &topo, &["web-1", "web-2"]);
    let hairpin = svc("self", "10.96.0.11", &topo, &["web-1"]);
    let empty = Svc::new("empty", "10.96.0.30");
    let c = start(topo, &[sticky, dns, v6, hairpin, empty]);
    let sender = &c.topo.pod("sender").ns;
    let tally = sender.tally(Proto::Tcp, at(ip("10.96.0.10"), 80), 30, WAIT);
    assert_eq!(tally.len(), 1, "affinity: every answer from one pod: {tally:?}");
    let tally = c.topo.client.ns.tally(Proto::Udp, at(ip("198.51.100.10"), 53), 30, WAIT);
    assert_eq!(tally.keys().map(String::as_str).collect::<Vec<_>>(), ["web-2", "web-3"], "UDP external IP: {tally:?}");
    let tally = sender.tally(Proto::Tcp, at(ip("fd00:96::10"), 80), 30, WAIT);
    assert_eq!(tally.keys().map(String::as_str).collect::<Vec<_>>(), ["web-1", "web-2"], "IPv6: {tally:?}");
    let reply = c.topo.pod("web-1").ns.tcp_request(at(ip("10.96.0.11"), 80), WAIT).expect_answer("hairpin");
    assert_eq!(reply.pod, "web-1");
    assert_eq!(reply.peer.ip(), IpAddr::from(c.topo.nodes[0].gateway4), "hairpin traffic is masqueraded");
    let started = Instant::now();
    assert_eq!(sender.tcp_request(at(ip("10.96.0.30"), 80), Duration::from_secs(5)), Outcome::Refused);
    assert!(started.elapsed() < Duration::from_secs(1));
    // A port the cluster IP does not serve is rejected too (kube-proxy's cluster-ips-check).
    assert_eq!(sender.tcp_request(at(ip("10.96.0.11"), 81), Duration::from_secs(5)), Outcome::Refused);

    let v = nft_json(&c, 0, "ip");
    let sets: Vec<&Value> = objects(&v, "set");
    let affinity: Vec<&&Value> = sets.iter().filter(|s| s["name"].as_str().unwrap().starts_with("affinity-")).collect();
    assert_eq!(affinity.len(), 3, "one timed set per endpoint of the sticky service");
    assert!(affinity.iter().all(|s| s["timeout"] == 600), "{affinity:?}");
    let noep = map_elements(&v, "no-endpoint-services");
    assert_eq!(noep.get("10.96.0.30 . tcp . 80").map(String::as_str), Some("goto reject-chain"), "{noep:?}");
    let v6 = nft_json(&c, 0, "ip6");
    assert!(map_elements(&v6, "service-ips").contains_key("fd00:96::10 . tcp . 80"), "{v6}");
}

fn two_nodes() -> Topology {
    Topology::builder().second_node().pod("a-1", 0).pod("b-1", 1).pod("sender", 0).serve(&[TARGET_PORT]).build()
}

#[test]
fn node_ports_snat_under_cluster_policy_and_drop_without_local_endpoints() {
    if !ready() {
        return;
    }
    let topo = two_nodes();
    let cluster = svc("web", "10.96.0.11", &topo, &["a-1", "b-1"]).node_port(30080, false);
    let local = svc("web-local", "10.96.0.12", &topo, &["a-1"]).node_port(30081, true);
    let c = start(topo, &[cluster, local]);
    let (node_a, node_b, client) = (&c.topo.nodes[0], &c.topo.nodes[1], c.topo.client.ip4);
    let mut seen = BTreeMap::new();
    for _ in 0..60 {
        let r = c.topo.client.ns.tcp_request(at(node_a.ip4, 30080), WAIT).expect_answer("node-a:30080");
        seen.insert(r.pod.clone(), r);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen["b-1"].peer.ip(), IpAddr::from(node_a.ip4), "SNAT towards node-b: {seen:?}");
    assert!(seen.values().all(|r| r.peer.ip() != IpAddr::from(client)));
    let r = c.topo.client.ns.tcp_request(at(node_a.ip4, 30081), WAIT).expect_answer("node-a:30081");
    assert_eq!((r.pod.as_str(), r.peer.ip()), ("a-1", IpAddr::from(client)), "Local policy keeps the client IP");
    let got = c.topo.client.ns.tcp_request(at(node_b.ip4, 30081), Duration::from_millis(700));
    assert_eq!(got, Outcome::TimedOut, "node-b has no local endpoint: dropped");
    let v = nft_json(&c, 1, "ip");
    assert_eq!(map_elements(&v, "no-endpoint-nodeports").get("tcp . 30081").map(String::as_str), Some("drop"));
    // Hairpin pairs (the controlplane tags each endpoint with its node): node-a has its own
    // pod's, not b-1's (under web's Cluster policy traffic from elsewhere is masqueraded);
    // node-b has its own and a-1's too: web-local's Local policy lets pods on other nodes
    // reach a-1 through node-b's node port unmasqueraded.
    let pair = |pod: &str| format!("{0} . {0}", c.topo.pod(pod).ip4);
    let pairs = |node| set_elements(&nft_json(&c, node, "ip"), "hairpin-endpoints");
    assert_eq!(pairs(0), BTreeSet::from([pair("a-1")]));
    assert_eq!(pairs(1), BTreeSet::from([pair("a-1"), pair("b-1")]));
}

#[test]
fn load_balancer_source_ranges_admit_only_listed_clients() {
    if !ready() {
        return;
    }
    let topo = two_nodes();
    let lb_ip = ip("203.0.113.10");
    let service = svc("web", "10.96.0.13", &topo, &["a-1", "b-1"]).load_balancer(lb_ip, 30082, &["10.77.0.100/32"]);
    let c = start(topo, &[service]);
    c.topo.client.ns.tcp_request(at(lb_ip, 80), WAIT).expect_answer("allowed client");
    let alt = Some(IpAddr::from(c.topo.client.alt_ip4));
    let got = c.topo.client.ns.request(Proto::Tcp, at(lb_ip, 80), alt, Duration::from_millis(500));
    assert_eq!(got, Outcome::TimedOut, "a client outside the ranges is dropped");
    let v = nft_json(&c, 0, "ip");
    let names = PortNames::new("demo", "web", "tcp", "p");
    assert_eq!(
        map_elements(&v, "firewall-ips").get("203.0.113.10 . tcp . 80"),
        Some(&format!("goto {}", names.firewall))
    );
}

/// Stops node-a's dataplane, runs BREAK on its table, checks that the service fails, resumes
/// the dataplane and waits until it answers again.
fn break_and_repair(c: &Cluster, what: &str, breaks: &[&[&str]]) {
    let (sender, addr) = (&c.topo.pod("sender").ns, at(ip("10.96.0.10"), 80));
    c.signal_dataplane(0, "-STOP");
    for args in breaks {
        c.topo.nodes[0].ns.run(&[&["nft"][..], args].concat());
    }
    let broken = sender.tcp_request(addr, Duration::from_millis(500));
    assert!(broken.pod().is_none(), "{what}: answered although broken: {broken:?}");
    c.signal_dataplane(0, "-CONT");
    eventually(&format!("answers after {what}"), CONVERGE, || sender.tcp_request(addr, WAIT).pod().map(str::to_string));
}

#[test]
fn endpoint_changes_restart_and_drift_are_repaired_exactly() {
    if !ready() {
        return;
    }
    let topo = Topology::builder()
        .pod("web-1", 0)
        .pod("web-2", 0)
        .pod("web-3", 0)
        .pod("sender", 0)
        .serve(&[TARGET_PORT])
        .build();
    let all = svc("web", "10.96.0.10", &topo, &["web-1", "web-2", "web-3"]);
    let fewer = svc("web", "10.96.0.10", &topo, &["web-1", "web-2"]);
    let other = svc("other", "10.96.0.40", &topo, &["web-3"]);
    let c = start(topo, &[all, other]);
    let (sender, addr) = (&c.topo.pod("sender").ns, at(ip("10.96.0.10"), 80));
    let names = PortNames::new("demo", "web", "tcp", "p");
    let before = handles(&c, 0);
    c.write(&fewer);
    let tally = eventually("web-3 gone from the answers", CONVERGE, || {
        Some(sender.tally(Proto::Tcp, addr, 30, WAIT)).filter(|t| !t.contains_key("web-3"))
    });
    assert_eq!(tally.keys().map(String::as_str).collect::<Vec<_>>(), ["web-1", "web-2"]);
    // No rule was rewritten (handles unchanged): only the service's ranges changed.
    let after = handles(&c, 0);
    assert_eq!(after, before, "an endpoint change rewrote rules");
    let ranges = map_elements(&nft_json(&c, 0, "ip"), "endpoints-0");
    assert_eq!(ranges.len(), 3, "web's two ranges and other's one: {ranges:?}");

    // A restarted agent adopts the table: nothing is rewritten.
    c.kill_dataplane(0);
    c.restart_dataplane(0);
    assert_eq!(handles(&c, 0), after, "the restarted agent rewrote rules");

    // Drift: an element, a rule, a chain, the whole table, each repaired.
    let key = "{ 10.96.0.10 . tcp . 80 }";
    break_and_repair(&c, "a deleted element", &[&["delete", "element", "ip", "kube-proxy", "service-ips", key]]);
    let repaired = handles(&c, 0);
    assert_eq!(repaired, after, "repairing an element rewrote rules");
    break_and_repair(&c, "a flushed endpoint map", &[&["flush", "map", "ip", "kube-proxy", "endpoints-0"]]);
    assert_eq!(handles(&c, 0), after, "repairing the endpoint map rewrote rules");
    assert_eq!(map_elements(&nft_json(&c, 0, "ip"), "endpoints-0").len(), 3);
    break_and_repair(&c, "a flushed chain (deleted rules)", &[&["flush", "chain", "ip", "kube-proxy", &names.service]]);
    let repaired = handles(&c, 0);
    for (chain, h) in &after {
        if chain != &names.service {
            assert_eq!(repaired.get(chain), Some(h), "repairing {} rewrote {chain}", names.service);
        }
    }
    break_and_repair(
        &c,
        "a deleted chain",
        &[
            &["delete", "element", "ip", "kube-proxy", "service-ips", key],
            &["flush", "chain", "ip", "kube-proxy", &names.service],
            &["delete", "chain", "ip", "kube-proxy", &names.service],
        ],
    );
    break_and_repair(&c, "a deleted table", &[&["delete", "table", "ip", "kube-proxy"]]);
    let other = at(ip("10.96.0.40"), 80);
    assert_eq!(sender.tcp_request(other, WAIT).expect_answer("the other service").pod, "web-3");
}

/// The agent's periodic resync (prepared outside its lock) runs on schedule, rewrites nothing
/// on a right table, and traffic goes on.
#[test]
fn periodic_resyncs_rewrite_nothing() {
    if !ready() {
        return;
    }
    let topo = Topology::builder().pod("web-1", 0).pod("sender", 0).serve(&[TARGET_PORT]).build();
    let web = svc("web", "10.96.0.10", &topo, &["web-1"]);
    let options = Options { extra_args: vec!["--full-resync-period".into(), "1s".into()], ..Options::default() };
    let c = Cluster::start_full(topo, &[web], &["--backend", "nftables"], options);
    let before = handles(&c, 0);
    // Both families, at least twice each.
    c.wait_logged(0, "periodic nftables resync done", 4, Duration::from_secs(20));
    assert_eq!(handles(&c, 0), before, "a periodic resync rewrote rules");
    let (sender, addr) = (&c.topo.pod("sender").ns, at(ip("10.96.0.10"), 80));
    assert_eq!(sender.tcp_request(addr, WAIT).pod(), Some("web-1"));
}
