//! Kernel tests with real traffic: the controlplane (file source) and the real `kpx-dataplane`
//! binary with the iptables backend on every node of a [`netns::Topology`], and TCP/UDP
//! requests from the client outside the cluster or from pods. One test per scenario of the
//! seed documents; each builds its own namespaces and controlplane, so they run in parallel.
//! Needs root and network namespaces: skips loudly without them, fails under CI=true.

#[path = "traffic/cluster.rs"]
mod cluster;
#[path = "traffic/manifest.rs"]
mod manifest;
mod netns;

use cluster::{Cluster, Options};
use manifest::{Svc, TARGET_PORT};
use netns::{Outcome, Proto, Reply, Topology, eventually};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// For requests that must be answered.
const WAIT: Duration = Duration::from_secs(2);
/// How long rules may take to change after a manifest edit or a flush.
const CONVERGE: Duration = Duration::from_secs(15);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Service NAME on CLUSTER_IP:80/TCP whose endpoints are PODS (their addresses of the
/// service's family, on their nodes).
fn svc(name: &str, cluster_ip: &str, topo: &Topology, pods: &[&str]) -> Svc {
    let mut svc = Svc::new(name, cluster_ip);
    for name in pods {
        let pod = topo.pod(name);
        let addr = if cluster_ip.contains(':') { IpAddr::from(pod.ip6) } else { IpAddr::from(pod.ip4) };
        svc = svc.endpoint(addr, topo.nodes[pod.node].name);
    }
    svc
}

/// The `web` service of the example cluster on PODS.
fn web(cluster_ip: &str, topo: &Topology, pods: &[&str]) -> Svc {
    svc("web", cluster_ip, topo, pods)
}

fn keys(tally: &BTreeMap<String, usize>) -> Vec<&str> {
    tally.keys().map(String::as_str).collect()
}

#[test]
fn cluster_ip_balances_across_every_endpoint() {
    if !netns::require_root_and_netns() {
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
    let service = web("10.96.0.10", &topo, &["web-1", "web-2", "web-3"]);
    let c = Cluster::start(topo, &[service]);
    let tally = c.topo.pod("sender").ns.tally(Proto::Tcp, at(ip("10.96.0.10"), 80), 60, WAIT);
    assert_eq!(keys(&tally), ["web-1", "web-2", "web-3"], "{tally:?}");
}

/// Three web pods on node-a and a pod that sends.
fn three_webs() -> Topology {
    Topology::builder().pod("web-1", 0).pod("web-2", 0).pod("web-3", 0).pod("sender", 0).serve(&[TARGET_PORT]).build()
}

#[test]
fn session_affinity_client_ip_sticks_to_one_pod() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let service = web("10.96.0.10", &topo, &["web-1", "web-2", "web-3"])
        .spec("sessionAffinity: ClientIP")
        .spec("sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}");
    let c = Cluster::start(topo, &[service]);
    let addr = at(ip("10.96.0.10"), 80);
    for (who, ns) in [("pod", &c.topo.pod("sender").ns), ("client", &c.topo.client.ns)] {
        let tally = ns.tally(Proto::Tcp, addr, 30, WAIT);
        assert_eq!(tally.len(), 1, "{who}: every answer from one pod: {tally:?}");
        assert!(tally.keys().all(|k| k.starts_with("web-")), "{who}: {tally:?}");
    }
}

#[test]
fn external_ip_is_answered() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let external = "externalIPs: [\"198.51.100.10\"]";
    let service = web("10.96.0.10", &topo, &["web-1", "web-2"]).spec(external);
    let dns = svc("dns", "10.96.0.20", &topo, &["web-2", "web-3"]).udp(53).spec(external);
    let c = Cluster::start(topo, &[service, dns]);
    let cases = [(Proto::Tcp, 80, ["web-1", "web-2"]), (Proto::Udp, 53, ["web-2", "web-3"])];
    for (proto, port, pods) in cases {
        let tally = c.topo.client.ns.tally(proto, at(ip("198.51.100.10"), port), 20, WAIT);
        assert_eq!(keys(&tally), pods, "{proto:?}: {tally:?}");
    }
}

#[test]
fn no_endpoints_is_refused_at_once() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let empty = Svc::new("empty", "10.96.0.30");
    let udp_empty = Svc::new("empty-udp", "10.96.0.31").udp(53);
    let c = Cluster::start(topo, &[empty, udp_empty]);
    let cases = [(Proto::Tcp, "10.96.0.30", 80), (Proto::Udp, "10.96.0.31", 53)];
    for (proto, addr, port) in cases {
        for (who, ns) in [("client", &c.topo.client.ns), ("pod", &c.topo.pod("sender").ns)] {
            let started = Instant::now();
            let got = ns.request(proto, at(ip(addr), port), None, Duration::from_secs(5));
            let took = started.elapsed();
            assert_eq!(got, Outcome::Refused, "{who} {proto:?} -> {addr}");
            assert!(took < Duration::from_secs(1), "{who} {proto:?}: refused only after {took:?}");
        }
    }
}

#[test]
fn headless_service_gets_no_rules() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let headless = svc("headless", "None", &topo, &["web-1"]);
    let service = web("10.96.0.10", &topo, &["web-2"]);
    let c = Cluster::start(topo, &[service, headless]);
    for v6 in [false, true] {
        for table in ["nat", "filter"] {
            let rules = c.save(0, v6, table);
            assert!(!rules.contains("demo/headless"), "v6={v6} {table}:\n{rules}");
        }
    }
    let nat = c.save(0, false, "nat");
    assert!(nat.lines().any(|l| l.starts_with("-A KUBE-SERVICES") && l.contains("demo/web:p")), "{nat}");
    // Its pods are reached at their own addresses, untouched by the proxy.
    let web1 = c.topo.pod("web-1").ip4;
    let reply = c.topo.client.ns.tcp_request(at(web1, TARGET_PORT), WAIT).expect_answer("web-1 directly");
    assert_eq!((reply.pod.as_str(), reply.peer.ip()), ("web-1", IpAddr::from(c.topo.client.ip4)));
    let reply = c.topo.client.ns.tcp_request(at(ip("10.96.0.10"), 80), WAIT).expect_answer("web");
    assert_eq!(reply.pod, "web-2");
}

#[test]
fn udp_cluster_ip_is_answered_by_every_endpoint() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let service = svc("dns", "10.96.0.20", &topo, &["web-1", "web-2"]).udp(53);
    let c = Cluster::start(topo, &[service]);
    let addr = at(ip("10.96.0.20"), 53);
    for (who, ns) in [("pod", &c.topo.pod("sender").ns), ("client", &c.topo.client.ns)] {
        let tally = ns.tally(Proto::Udp, addr, 30, WAIT);
        assert_eq!(keys(&tally), ["web-1", "web-2"], "{who}: {tally:?}");
    }
}

#[test]
fn ipv6_cluster_ip_is_answered() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let service = web("fd00:96::10", &topo, &["web-1", "web-2"]);
    let dns = svc("dns", "fd00:96::20", &topo, &["web-3"]).udp(53);
    let c = Cluster::start(topo, &[service, dns]);
    let addr = at(ip("fd00:96::10"), 80);
    for (who, ns) in [("pod", &c.topo.pod("sender").ns), ("client", &c.topo.client.ns)] {
        let tally = ns.tally(Proto::Tcp, addr, 30, WAIT);
        assert_eq!(keys(&tally), ["web-1", "web-2"], "{who}: {tally:?}");
        let reply = ns.udp_request(at(ip("fd00:96::20"), 53), WAIT).expect_answer("UDP over IPv6");
        assert_eq!(reply.pod, "web-3");
    }
    let nat6 = c.save(0, true, "nat");
    assert!(nat6.contains("-A KUBE-SERVICES -d fd00:96::10/128 -p tcp"), "{nat6}");
}

#[test]
fn hairpin_pod_reaches_itself_through_its_service() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let service = web("10.96.0.10", &topo, &["web-1"]);
    let dns = svc("dns", "10.96.0.20", &topo, &["web-1"]).udp(53);
    let c = Cluster::start(topo, &[service, dns]);
    let pod = c.topo.pod("web-1");
    for (proto, addr) in [(Proto::Tcp, at(ip("10.96.0.10"), 80)), (Proto::Udp, at(ip("10.96.0.20"), 53))] {
        let reply = pod.ns.request(proto, addr, None, WAIT).expect_answer("hairpin");
        assert_eq!(reply.pod, "web-1");
        // Masqueraded to the node's address on the pod network, or the reply would never
        // leave the pod.
        assert_eq!(reply.peer.ip(), IpAddr::from(c.topo.nodes[0].gateway4), "{proto:?}: {reply:?}");
    }
}

/// One pod on each node, and a pod on node-a that sends.
fn two_nodes() -> Topology {
    Topology::builder().second_node().pod("a-1", 0).pod("b-1", 1).pod("sender", 0).serve(&[TARGET_PORT]).build()
}

/// Requests from the client (from FROM, or its primary address) until every pod of WANT
/// answered; the replies by pod.
fn answers_from(c: &Cluster, addr: SocketAddr, from: Option<IpAddr>, want: &[&str]) -> BTreeMap<String, Reply> {
    let mut seen = BTreeMap::new();
    for _ in 0..60 {
        let reply = c.topo.client.ns.request(Proto::Tcp, addr, from, WAIT).expect_answer(&format!("{addr}"));
        seen.insert(reply.pod.clone(), reply);
        if want.iter().all(|p| seen.contains_key(*p)) {
            return seen;
        }
    }
    panic!("{addr}: only {:?} answered in 60 requests, want {want:?}", seen.keys());
}

#[test]
fn node_port_with_cluster_policy_snats_to_the_node() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = two_nodes();
    let service = web("10.96.0.11", &topo, &["a-1", "b-1"]).node_port(30080, false);
    let c = Cluster::start(topo, &[service]);
    let (node_a, client) = (&c.topo.nodes[0], c.topo.client.ip4);
    let seen = answers_from(&c, at(node_a.ip4, 30080), None, &["a-1", "b-1"]);
    // Leaving node-a towards node-b, the source is node-a's address there; towards its own
    // pod, its address on the pod network. Never the client's.
    assert_eq!(seen["b-1"].peer.ip(), IpAddr::from(node_a.ip4), "{seen:?}");
    assert_eq!(seen["a-1"].peer.ip(), IpAddr::from(node_a.gateway4), "{seen:?}");
    assert!(seen.values().all(|r| r.peer.ip() != IpAddr::from(client)));
}

#[test]
fn node_port_with_local_policy_keeps_the_client_ip_and_drops_without_local_endpoints() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = two_nodes();
    let service = web("10.96.0.12", &topo, &["a-1"]).node_port(30081, true);
    let c = Cluster::start(topo, &[service]);
    let (node_a, node_b, client) = (&c.topo.nodes[0], &c.topo.nodes[1], c.topo.client.ip4);
    for _ in 0..5 {
        let reply = c.topo.client.ns.tcp_request(at(node_a.ip4, 30081), WAIT).expect_answer("node-a");
        assert_eq!((reply.pod.as_str(), reply.peer.ip()), ("a-1", IpAddr::from(client)));
    }
    // node-b has no endpoint of its own: dropped, not forwarded to node-a and not refused.
    let got = c.topo.client.ns.tcp_request(at(node_b.ip4, 30081), Duration::from_millis(700));
    assert_eq!(got, Outcome::TimedOut);
    let filter = c.save(1, false, "filter");
    assert!(filter.contains("demo/web:p has no local endpoints") && filter.contains("-j DROP"), "{filter}");
}

#[test]
fn local_policies_drop_where_no_local_endpoint_but_reject_without_any_endpoint() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = Topology::builder()
        .second_node()
        .pod("a-1", 0)
        .pod("b-1", 1)
        .pod("sender", 0)
        .pod("b-sender", 1)
        .serve(&[TARGET_PORT])
        .build();
    // Every endpoint is on node-b: node-a receives none of them, only the hint that they exist.
    let itl = svc("itl", "10.96.0.14", &topo, &["b-1"]).spec("internalTrafficPolicy: Local");
    let both =
        svc("both-local", "10.96.0.15", &topo, &["b-1"]).node_port(30083, true).spec("internalTrafficPolicy: Local");
    let empty = Svc::new("empty", "10.96.0.30");
    let empty_local = Svc::new("empty-local", "10.96.0.31").spec("internalTrafficPolicy: Local");
    let c = Cluster::start(topo, &[itl, both, empty, empty_local]);
    let (node_a, node_b) = (&c.topo.nodes[0], &c.topo.nodes[1]);
    let (sender, b_sender) = (&c.topo.pod("sender").ns, &c.topo.pod("b-sender").ns);
    let short = Duration::from_secs(1);

    // node-b hosts the endpoint: answered there.
    for addr in [at(ip("10.96.0.14"), 80), at(ip("10.96.0.15"), 80)] {
        assert_eq!(b_sender.tcp_request(addr, WAIT).expect_answer(&format!("{addr} on node-b")).pod, "b-1");
    }
    let reply = c.topo.client.ns.tcp_request(at(node_b.ip4, 30083), WAIT).expect_answer("node-b:30083");
    assert_eq!(reply.pod, "b-1");

    // node-a: dropped (the connect times out), neither forwarded to node-b nor refused.
    for addr in [at(ip("10.96.0.14"), 80), at(ip("10.96.0.15"), 80)] {
        assert_eq!(sender.tcp_request(addr, short), Outcome::TimedOut, "pod on node-a -> {addr}");
    }
    let got = c.topo.client.ns.tcp_request(at(node_a.ip4, 30083), short);
    assert_eq!(got, Outcome::TimedOut, "client -> node-a:30083");
    // Pods and the node itself reach node-a's node port all the same: kube-proxy sends traffic
    // that starts inside the cluster to every endpoint (its "short circuit"), so node-a keeps
    // the cluster endpoints of a service with both policies Local.
    let node_port = at(node_a.ip4, 30083);
    assert_eq!(sender.tcp_request(node_port, WAIT).expect_answer("pod on node-a -> node-a:30083").pod, "b-1");
    let from_node = node_a.ns.tcp_request(node_port, WAIT).expect_answer("node-a -> node-a:30083");
    assert_eq!(from_node.pod, "b-1");
    let filter = c.save(0, false, "filter");
    for line in [
        "-A KUBE-SERVICES -d 10.96.0.14/32 -p tcp -m comment --comment \"demo/itl:p has no local endpoints\" -m tcp --dport 80 -j DROP",
        "-A KUBE-SERVICES -d 10.96.0.15/32 -p tcp -m comment --comment \"demo/both-local:p has no local endpoints\" -m tcp --dport 80 -j DROP",
    ] {
        assert!(filter.lines().any(|l| l == line), "{line}\n{filter}");
    }
    assert!(filter.contains("demo/both-local:p has no local endpoints\" -m addrtype --dst-type LOCAL"), "{filter}");

    // No endpoint anywhere, with or without a Local policy: still refused at once.
    for addr in [at(ip("10.96.0.30"), 80), at(ip("10.96.0.31"), 80)] {
        let started = Instant::now();
        assert_eq!(sender.tcp_request(addr, Duration::from_secs(5)), Outcome::Refused, "{addr}");
        assert!(started.elapsed() < short, "{addr}: refused only after {:?}", started.elapsed());
    }
}

#[test]
fn load_balancer_source_ranges_admit_only_listed_clients() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = two_nodes();
    let lb_ip = ip("203.0.113.10");
    let service = web("10.96.0.13", &topo, &["a-1", "b-1"]).load_balancer(lb_ip, 30082, &["10.77.0.100/32"]);
    let c = Cluster::start(topo, &[service]);
    let addr = at(lb_ip, 80);
    answers_from(&c, addr, None, &["a-1", "b-1"]);
    let alt = Some(IpAddr::from(c.topo.client.alt_ip4));
    for _ in 0..3 {
        let got = c.topo.client.ns.request(Proto::Tcp, addr, alt, Duration::from_millis(500));
        assert_eq!(got, Outcome::TimedOut, "from {alt:?}");
    }
    let filter = c.topo.nodes[0].ns.run(&["iptables-save", "-c", "-t", "filter"]);
    let drop = filter.lines().find(|l| l.contains("traffic not accepted by KUBE-FW-")).expect("the firewall's DROP");
    assert!(!drop.starts_with("[0:"), "the firewall dropped them: {drop}");
    // The allowed client still gets through afterwards.
    c.topo.client.ns.tcp_request(addr, WAIT).expect_answer("allowed client");
}

#[test]
fn removed_endpoint_gets_no_more_traffic() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let all = web("10.96.0.10", &topo, &["web-1", "web-2", "web-3"]);
    let fewer = web("10.96.0.10", &topo, &["web-1", "web-2"]);
    let c = Cluster::start(topo, &[all]);
    let (sender, addr) = (&c.topo.pod("sender").ns, at(ip("10.96.0.10"), 80));
    let tally = sender.tally(Proto::Tcp, addr, 30, WAIT);
    assert_eq!(keys(&tally), ["web-1", "web-2", "web-3"], "{tally:?}");
    c.write(&fewer);
    let tally = eventually("web-3 gone from the answers", CONVERGE, || {
        Some(sender.tally(Proto::Tcp, addr, 30, WAIT)).filter(|t| !t.contains_key("web-3"))
    });
    assert_eq!(keys(&tally), ["web-1", "web-2"], "only the remaining pods answer: {tally:?}");
}

#[test]
fn dataplane_restart_loses_no_request() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let service = web("10.96.0.10", &topo, &["web-1", "web-2", "web-3"]);
    let c = Cluster::start(topo, &[service]);
    let (sender, addr) = (&c.topo.pod("sender").ns, at(ip("10.96.0.10"), 80));
    let done = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let failures = std::thread::scope(|s| {
        let looper = s.spawn(|| {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let got = sender.tcp_request(addr, Duration::from_secs(1));
                if got.pod().is_none() {
                    failures.push(got);
                }
                done.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50).saturating_sub(started.elapsed()));
            }
            failures
        });
        // Some requests before, while the node has no dataplane, and after the new one acked.
        let at_least = |n: usize, what: &str| {
            let target = done.load(Ordering::Relaxed) + n;
            eventually(what, CONVERGE, || (done.load(Ordering::Relaxed) >= target).then_some(()));
        };
        at_least(10, "requests before the restart");
        c.kill_dataplane(0);
        at_least(10, "requests without a dataplane");
        c.restart_dataplane(0);
        at_least(10, "requests after the restart");
        stop.store(true, Ordering::Relaxed);
        looper.join().unwrap()
    });
    let total = done.load(Ordering::Relaxed);
    assert!(failures.is_empty(), "{} of {total} requests failed: {failures:?}", failures.len());
}

#[test]
fn flushed_nat_table_comes_back() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let service = web("10.96.0.10", &topo, &["web-1", "web-2"]);
    let c = Cluster::start(topo, &[service]);
    let (sender, addr) = (&c.topo.pod("sender").ns, at(ip("10.96.0.10"), 80));
    sender.tcp_request(addr, WAIT).expect_answer("before the flush");
    // Frozen, the agent cannot repair the table before we have seen it broken.
    c.signal_dataplane(0, "-STOP");
    c.topo.nodes[0].ns.run(&["iptables", "-t", "nat", "-F"]);
    let broken = sender.tcp_request(addr, Duration::from_millis(500));
    assert!(broken.pod().is_none(), "answered without nat rules: {broken:?}");
    c.signal_dataplane(0, "-CONT");
    eventually("answers after the flush", CONVERGE, || sender.tcp_request(addr, WAIT).pod().map(str::to_string));
    let nat = c.save(0, false, "nat");
    assert!(
        nat.contains("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
        "{nat}"
    );
    assert!(nat.contains("-A KUBE-PROXY-CANARY"), "{nat}");
}

#[test]
fn localhost_node_ports_answer_on_127_0_0_1() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = two_nodes();
    let cluster_policy = web("10.96.0.11", &topo, &["a-1", "b-1"]).node_port(30080, false);
    let local_policy = svc("web-local", "10.96.0.12", &topo, &["a-1"]).node_port(30081, true);
    let dns = svc("dns", "10.96.0.20", &topo, &["b-1"]).udp(TARGET_PORT).node_port(30053, false);
    // No --node-ip: node ports on every local address, 127.0.0.1 included (kube-proxy's default).
    let services = [cluster_policy, local_policy, dns];
    let c = Cluster::start_with(topo, &services, Options { node_ip: false, ..Options::default() });
    let node_a = &c.topo.nodes[0];
    assert_eq!(node_a.ns.run(&["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).trim(), "1");
    let filter = c.save(0, false, "filter");
    assert!(
        filter.contains("-A INPUT -j KUBE-FIREWALL") && filter.contains("block incoming localnet connections"),
        "{filter}"
    );
    let mut seen = BTreeMap::new();
    for _ in 0..40 {
        let reply = node_a.ns.tcp_request(at(ip("127.0.0.1"), 30080), WAIT).expect_answer("node-a -> 127.0.0.1:30080");
        // 127.0.0.1 cannot leave the node: the reply must have been masqueraded.
        assert_ne!(reply.peer.ip(), ip("127.0.0.1"), "{reply:?}");
        seen.insert(reply.pod.clone(), reply);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.keys().map(String::as_str).collect::<Vec<_>>(), ["a-1", "b-1"]);
    let local = node_a.ns.tcp_request(at(ip("127.0.0.1"), 30081), WAIT).expect_answer("node-a -> 127.0.0.1:30081");
    assert_eq!(local.pod, "a-1");
    // UDP as well.
    let udp = node_a.ns.udp_request(at(ip("127.0.0.1"), 30053), WAIT).expect_answer("udp 127.0.0.1:30053");
    assert_eq!(udp.pod, "b-1");
}

#[test]
fn localhost_node_ports_can_be_turned_off() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = two_nodes();
    let service = web("10.96.0.11", &topo, &["a-1", "b-1"]).node_port(30080, false);
    let options = Options {
        node_ip: false,
        extra_args: vec!["--iptables-localhost-nodeports=false".into()],
        ..Options::default()
    };
    let c = Cluster::start_with(topo, &[service], options);
    let node_a = &c.topo.nodes[0];
    assert_eq!(node_a.ns.run(&["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).trim(), "0");
    assert!(!c.save(0, false, "filter").contains("KUBE-FIREWALL"));
    // The node port still answers on the node's address, but not on 127.0.0.1 (the DNATed
    // packet keeps a loopback source the kernel will not route).
    assert!(node_a.ns.tcp_request(at(node_a.ip4, 30080), WAIT).pod().is_some());
    let got = node_a.ns.tcp_request(at(ip("127.0.0.1"), 30080), Duration::from_millis(700));
    assert_eq!(got, Outcome::TimedOut);
}

/// The agent's periodic resync (tables read outside its lock) runs on schedule, leaves a right
/// ruleset as it is, and traffic goes on.
#[test]
fn periodic_iptables_resyncs_run_on_schedule_and_change_nothing() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = Topology::builder().pod("web-1", 0).pod("sender", 0).serve(&[TARGET_PORT]).build();
    let service = web("10.96.0.10", &topo, &["web-1"]);
    let options = Options { extra_args: vec!["--full-resync-period".into(), "1s".into()], ..Options::default() };
    let c = Cluster::start_with(topo, &[service], options);
    let rules =
        || c.save(0, false, "nat").lines().filter(|l| l.starts_with("-A ")).map(String::from).collect::<Vec<_>>();
    let before = rules();
    // Both families, at least twice each.
    c.wait_logged(0, "periodic iptables resync done", 4, Duration::from_secs(30));
    assert_eq!(rules(), before, "a periodic resync changed the rules");
    assert_eq!(c.topo.pod("sender").ns.tcp_request(at(ip("10.96.0.10"), 80), WAIT).pod(), Some("web-1"));
}
