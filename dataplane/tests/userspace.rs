//! Kernel tests of `--backend userspace` with real traffic: the controlplane (file source) and
//! the real `kpx-dataplane` binary on every node of a [`netns::Topology`], its proxy's sockets
//! in the node's namespace. The seed scenarios (ClusterIP, NodePort, ExternalIP, no endpoints,
//! affinity, Local policy) over TCP and UDP, from a pod, from outside and from the node itself;
//! then what only a proxy does: a refused endpoint retried within the client's connection,
//! gigabyte transfers with checksums and half-close, endpoints removed mid-transfer.
//!
//! The address a pod sees is the node's, never the client's: the proxy opens its own
//! connection to the endpoint (from the node's address on the pod bridge for a local pod,
//! its address on the node network for a pod on another node), for every policy. Tests assert
//! it. Needs root and network namespaces: skips loudly without them, fails under CI=true.

#[path = "traffic/cluster.rs"]
mod cluster;
#[path = "traffic/manifest.rs"]
mod manifest;
mod netns;
#[path = "userspace/transfer.rs"]
mod transfer;

use cluster::Cluster;
use manifest::{Svc, TARGET_PORT};
use netns::{Outcome, Proto, Topology, eventually};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// For requests that must be answered.
const WAIT: Duration = Duration::from_secs(2);

const USERSPACE: [&str; 2] = ["--backend", "userspace"];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
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

fn keys(tally: &BTreeMap<String, usize>) -> Vec<&str> {
    tally.keys().map(String::as_str).collect()
}

/// Three web pods on node-a and a pod that sends.
fn three_webs() -> Topology {
    Topology::builder().pod("web-1", 0).pod("web-2", 0).pod("web-3", 0).pod("sender", 0).serve(&[TARGET_PORT]).build()
}

#[test]
fn cluster_ip_balances_from_pods_outside_and_the_node_which_pods_see_as_the_node() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let web = svc("web", "10.96.0.10", &topo, &["web-1", "web-2", "web-3"]);
    let dns = svc("dns", "10.96.0.20", &topo, &["web-1", "web-2"]).udp(53);
    let c = Cluster::start_with_backend(topo, &[web, dns], &USERSPACE);
    let node = &c.topo.nodes[0];
    let from = [("pod", &c.topo.pod("sender").ns), ("client", &c.topo.client.ns), ("node", &node.ns)];
    for (who, ns) in from {
        let tally = ns.tally(Proto::Tcp, at(ip("10.96.0.10"), 80), 30, WAIT);
        assert_eq!(keys(&tally), ["web-1", "web-2", "web-3"], "{who} TCP: {tally:?}");
        // Round robin: every pod gets its turn, evenly.
        assert!(tally.values().all(|n| *n == 10), "{who} TCP: {tally:?}");
        let tally = ns.tally(Proto::Udp, at(ip("10.96.0.20"), 53), 20, WAIT);
        assert_eq!(keys(&tally), ["web-1", "web-2"], "{who} UDP: {tally:?}");
        for proto in [Proto::Tcp, Proto::Udp] {
            let addr = if proto == Proto::Tcp { at(ip("10.96.0.10"), 80) } else { at(ip("10.96.0.20"), 53) };
            let reply = ns.request(proto, addr, None, WAIT).expect_answer(who);
            // The proxy's own connection, from node-a's address on the pod bridge.
            assert_eq!(reply.peer.ip(), IpAddr::from(node.gateway4), "{who} {proto:?}: {reply:?}");
        }
    }
}

#[test]
fn ipv6_cluster_ip_from_a_pod_and_the_node() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let web = svc("web", "fd00:96::10", &topo, &["web-1", "web-2"]);
    let dns = svc("dns", "fd00:96::20", &topo, &["web-3"]).udp(53);
    let c = Cluster::start_with_backend(topo, &[web, dns], &[&USERSPACE[..], &["--ip-families", "IPv4,IPv6"]].concat());
    let node = &c.topo.nodes[0];
    for (who, ns) in [("pod", &c.topo.pod("sender").ns), ("node", &node.ns)] {
        let tally = ns.tally(Proto::Tcp, at(ip("fd00:96::10"), 80), 20, WAIT);
        assert_eq!(keys(&tally), ["web-1", "web-2"], "{who}: {tally:?}");
        let reply = ns.udp_request(at(ip("fd00:96::20"), 53), WAIT).expect_answer(who);
        assert_eq!((reply.pod.as_str(), reply.peer.ip()), ("web-3", IpAddr::from(node.gateway6)), "{who}");
    }
}

/// One pod on each node, and a pod on each node that sends.
fn two_nodes() -> Topology {
    Topology::builder()
        .second_node()
        .pod("a-1", 0)
        .pod("b-1", 1)
        .pod("sender", 0)
        .pod("b-sender", 1)
        .serve(&[TARGET_PORT])
        .build()
}

#[test]
fn node_port_with_cluster_policy_from_outside_and_from_the_node() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = two_nodes();
    let web = svc("web", "10.96.0.11", &topo, &["a-1", "b-1"]).node_port(30080, false);
    let dns = svc("dns", "10.96.0.21", &topo, &["a-1", "b-1"]).udp(53).node_port(30053, false);
    let c = Cluster::start_with_backend(topo, &[web, dns], &USERSPACE);
    let node_a = &c.topo.nodes[0];
    for (who, ns) in [("client", &c.topo.client.ns), ("node-a itself", &node_a.ns)] {
        for (proto, port) in [(Proto::Tcp, 30080), (Proto::Udp, 30053)] {
            let tally = ns.tally(proto, at(node_a.ip4, port), 20, WAIT);
            assert_eq!(keys(&tally), ["a-1", "b-1"], "{who} {proto:?}: {tally:?}");
        }
    }
    // Never the client's address: node-a's on the pod bridge, or on the node network.
    for _ in 0..4 {
        let r = c.topo.client.ns.tcp_request(at(node_a.ip4, 30080), WAIT).expect_answer("node port");
        let want = if r.pod == "a-1" { IpAddr::from(node_a.gateway4) } else { IpAddr::from(node_a.ip4) };
        assert_eq!(r.peer.ip(), want, "{r:?}");
    }
}

#[test]
fn node_port_with_local_policy_drops_outside_traffic_where_no_local_endpoint() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = two_nodes();
    let web = svc("web", "10.96.0.12", &topo, &["a-1"]).node_port(30081, true);
    let c = Cluster::start_with_backend(topo, &[web], &USERSPACE);
    let (node_a, node_b) = (&c.topo.nodes[0], &c.topo.nodes[1]);
    let tally = c.topo.client.ns.tally(Proto::Tcp, at(node_a.ip4, 30081), 5, WAIT);
    assert_eq!(keys(&tally), ["a-1"], "{tally:?}");
    // node-b has no endpoint of its own: outside traffic is dropped, not forwarded or refused.
    let got = c.topo.client.ns.tcp_request(at(node_b.ip4, 30081), Duration::from_millis(700));
    assert_eq!(got, Outcome::TimedOut);
    // Its pods and node-b itself still reach the service cluster-wide, as with kube-proxy.
    for (who, ns) in [("pod on node-b", &c.topo.pod("b-sender").ns), ("node-b itself", &node_b.ns)] {
        let r = ns.tcp_request(at(node_b.ip4, 30081), WAIT).expect_answer(who);
        assert_eq!(r.pod, "a-1", "{who}");
    }
}

#[test]
fn internal_local_policy_drops_where_no_local_endpoint_and_rejects_without_any() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = two_nodes();
    let itl = svc("itl", "10.96.0.14", &topo, &["b-1"]).spec("internalTrafficPolicy: Local");
    let empty = Svc::new("empty-local", "10.96.0.31").spec("internalTrafficPolicy: Local");
    let c = Cluster::start_with_backend(topo, &[itl, empty], &USERSPACE);
    let addr = at(ip("10.96.0.14"), 80);
    assert_eq!(c.topo.pod("b-sender").ns.tcp_request(addr, WAIT).expect_answer("node-b").pod, "b-1");
    assert_eq!(c.topo.pod("sender").ns.tcp_request(addr, Duration::from_millis(700)), Outcome::TimedOut);
    let got = c.topo.pod("sender").ns.tcp_request(at(ip("10.96.0.31"), 80), Duration::from_secs(5));
    assert_eq!(got, Outcome::Refused);
}

#[test]
fn external_ip_and_load_balancer_source_ranges() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let external = "externalIPs: [\"198.51.100.10\"]";
    let web = svc("web", "10.96.0.10", &topo, &["web-1", "web-2"]).spec(external);
    let dns = svc("dns", "10.96.0.20", &topo, &["web-2", "web-3"]).udp(53).spec(external);
    let lb_ip = ip("203.0.113.10");
    let lb = svc("lb", "10.96.0.13", &topo, &["web-3"]).load_balancer(lb_ip, 30082, &["10.77.0.100/32"]);
    let c = Cluster::start_with_backend(topo, &[web, dns, lb], &USERSPACE);
    let client = &c.topo.client;
    for (proto, port, pods) in [(Proto::Tcp, 80, ["web-1", "web-2"]), (Proto::Udp, 53, ["web-2", "web-3"])] {
        let tally = client.ns.tally(proto, at(ip("198.51.100.10"), port), 20, WAIT);
        assert_eq!(keys(&tally), pods, "{proto:?}: {tally:?}");
    }
    assert_eq!(client.ns.tcp_request(at(lb_ip, 80), WAIT).expect_answer("allowed").pod, "web-3");
    let alt = Some(IpAddr::from(client.alt_ip4));
    assert_eq!(client.ns.request(Proto::Tcp, at(lb_ip, 80), alt, Duration::from_millis(700)), Outcome::TimedOut);
    // Nor can the refused client go around the ranges to the portal's own port on the node.
    let nat = c.save(0, false, "nat");
    let port: u16 = nat
        .lines()
        .find(|l| l.contains("-d 203.0.113.10/32") && l.contains("REDIRECT"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("the LB portal's REDIRECT in\n{nat}"));
    let direct = at(c.topo.nodes[0].ip4, port);
    assert_eq!(client.ns.request(Proto::Tcp, direct, alt, Duration::from_millis(700)), Outcome::TimedOut, "{direct}");
}

#[test]
fn no_endpoints_is_refused_from_everywhere() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let c = Cluster::start_with_backend(
        topo,
        &[Svc::new("empty", "10.96.0.30"), Svc::new("empty-udp", "10.96.0.31").udp(53)],
        &USERSPACE,
    );
    let from = [("client", &c.topo.client.ns), ("pod", &c.topo.pod("sender").ns), ("node", &c.topo.nodes[0].ns)];
    for (proto, addr) in [(Proto::Tcp, at(ip("10.96.0.30"), 80)), (Proto::Udp, at(ip("10.96.0.31"), 53))] {
        for (who, ns) in from {
            // The node's own UDP send fails with EPERM at the REJECT (as with the iptables
            // backend): nothing to observe as an answer.
            if who == "node" && proto == Proto::Udp {
                continue;
            }
            // Refused (a reset or port unreachable), not left to time out.
            assert_eq!(ns.request(proto, addr, None, Duration::from_secs(5)), Outcome::Refused, "{who} {proto:?}");
        }
    }
}

#[test]
fn session_affinity_sticks_each_client_to_one_pod() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let affinity = ["sessionAffinity: ClientIP", "sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}"];
    let web = svc("web", "10.96.0.10", &topo, &["web-1", "web-2", "web-3"]).spec(affinity[0]).spec(affinity[1]);
    let dns = svc("dns", "10.96.0.20", &topo, &["web-1", "web-2", "web-3"]).udp(53).spec(affinity[0]).spec(affinity[1]);
    let c = Cluster::start_with_backend(topo, &[web, dns], &USERSPACE);
    for (who, ns) in [("pod", &c.topo.pod("sender").ns), ("client", &c.topo.client.ns)] {
        for (proto, addr) in [(Proto::Tcp, at(ip("10.96.0.10"), 80)), (Proto::Udp, at(ip("10.96.0.20"), 53))] {
            let tally = ns.tally(proto, addr, 20, WAIT);
            assert_eq!(tally.len(), 1, "{who} {proto:?}: every answer from one pod: {tally:?}");
            assert!(tally.keys().all(|k| k.starts_with("web-")), "{who} {proto:?}: {tally:?}");
        }
    }
}

#[test]
fn a_refused_endpoint_is_retried_on_the_next_within_the_connection() {
    if !netns::require_root_and_netns() {
        return;
    }
    let mut topo = three_webs();
    // web-2's pod is there, nothing listens in it: TCP gets a reset, UDP a port unreachable.
    topo.stop_backend("web-2");
    let web = svc("web", "10.96.0.10", &topo, &["web-1", "web-2", "web-3"]);
    let dns = svc("dns", "10.96.0.20", &topo, &["web-1", "web-2", "web-3"]).udp(53);
    let c = Cluster::start_with_backend(topo, &[web, dns], &USERSPACE);
    for (who, ns) in [("pod", &c.topo.pod("sender").ns), ("client", &c.topo.client.ns)] {
        for (proto, addr) in [(Proto::Tcp, at(ip("10.96.0.10"), 80)), (Proto::Udp, at(ip("10.96.0.20"), 53))] {
            let tally = ns.tally(proto, addr, 20, WAIT);
            assert_eq!(keys(&tally), ["web-1", "web-3"], "{who} {proto:?}: every request answered: {tally:?}");
        }
    }
}

/// Pods e-1, e-2 on node-a with echo servers on TARGET_PORT, and a pod that sends.
fn echo_pods() -> (Topology, Vec<netns::NsChild>) {
    let topo = Topology::builder().pod("e-1", 0).pod("e-2", 0).pod("sender", 0).build();
    let servers = ["e-1", "e-2"].iter().map(|p| transfer::echo_serve(topo.pod(p), TARGET_PORT)).collect();
    (topo, servers)
}

#[test]
fn a_gigabyte_each_way_arrives_intact_with_half_close() {
    if !netns::require_root_and_netns() {
        return;
    }
    let (topo, _servers) = echo_pods();
    let web = svc("web", "10.96.0.10", &topo, &["e-1", "e-2"]);
    let c = Cluster::start_with_backend(topo, &[web], &USERSPACE);
    const GIB: u64 = 1 << 30;
    // The pod's trailer comes after the client's half-close, on the direction still open.
    let done = transfer::transfer(&c.topo.pod("sender").ns, at(ip("10.96.0.10"), 80), GIB);
    let pod = done.verified(GIB);
    assert!(pod == "e-1" || pod == "e-2", "{done:?}");
}

#[test]
fn a_removed_endpoint_drains_while_new_connections_avoid_it() {
    if !netns::require_root_and_netns() {
        return;
    }
    for (drain, completes) in [(None, true), (Some("0s"), false)] {
        let (topo, _servers) = echo_pods();
        let before = svc("web", "10.96.0.10", &topo, &["e-1"]);
        let after = svc("web", "10.96.0.10", &topo, &["e-2"]);
        let mut args = USERSPACE.to_vec();
        args.extend(drain.iter().flat_map(|d| ["--userspace-drain-timeout", *d]));
        let c = Cluster::start_with_backend(topo, &[before], &args);
        let (sender, addr) = (&c.topo.pod("sender").ns, at(ip("10.96.0.10"), 80));
        const BYTES: u64 = 64 << 20;
        let paused = transfer::Paused::start(sender, addr, BYTES, 8 << 20);
        let old = c.desired_version(0);
        c.write(&after);
        c.wait_changed(0, &old);
        // New connections go to the endpoint that is left.
        for _ in 0..5 {
            assert_eq!(transfer::transfer(sender, addr, 1).verified(1), "e-2");
        }
        let done = paused.resume();
        if completes {
            assert_eq!(done.verified(BYTES), "e-1", "drained to its end on the removed endpoint");
        } else {
            assert!(matches!(done, transfer::Done::Error(_)), "cut at the drain timeout: {done:?}");
        }
    }
}

#[test]
fn a_removed_service_closes_its_listeners() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let web = svc("web", "10.96.0.10", &topo, &["web-1"]);
    let dns = svc("dns", "10.96.0.20", &topo, &["web-1"]).udp(53);
    let c = Cluster::start_with_backend(topo, &[web.clone(), dns], &USERSPACE);
    let node = &c.topo.nodes[0];
    let listeners = || node.ns.run(&["ss", "-Hlntup"]).lines().filter(|l| l.contains("kpx-dataplane")).count();
    assert_eq!(listeners(), 2, "one TCP and one UDP portal");
    let old = c.desired_version(0);
    c.remove(&web);
    c.wait_changed(0, &old);
    assert_eq!(listeners(), 1, "the TCP portal is closed");
    let nat = c.save(0, false, "nat");
    assert!(!nat.contains("demo/web:p") && nat.contains("demo/dns:p"), "{nat}");
}

#[test]
fn a_restarted_proxy_serves_udp_clients_that_keep_their_port() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let dns = svc("dns", "10.96.0.20", &topo, &["web-1"]).udp(53);
    let c = Cluster::start_with_backend(topo, &[dns], &USERSPACE);
    let sender = c.topo.pod("sender");
    let (addr, from) = (at(ip("10.96.0.20"), 53), SocketAddr::new(IpAddr::from(sender.ip4), 40053));
    assert_eq!(sender.ns.request_from_port(Proto::Udp, addr, from, WAIT).expect_answer("before").pod, "web-1");
    // The new process listens on another port; the client's conntrack entry still redirects
    // to the old one until the agent deletes it.
    c.kill_dataplane(0);
    c.restart_dataplane(0);
    assert_eq!(sender.ns.request_from_port(Proto::Udp, addr, from, WAIT).expect_answer("after").pod, "web-1");
}

#[test]
fn flushed_nat_table_comes_back() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = three_webs();
    let web = svc("web", "10.96.0.10", &topo, &["web-1", "web-2"]);
    let c = Cluster::start_with_backend(topo, &[web], &USERSPACE);
    let (sender, addr) = (&c.topo.pod("sender").ns, at(ip("10.96.0.10"), 80));
    sender.tcp_request(addr, WAIT).expect_answer("before the flush");
    // Frozen while the table is flushed, so that the agent sees it only afterwards.
    c.signal_dataplane(0, "-STOP");
    c.topo.nodes[0].ns.run(&["iptables", "-t", "nat", "-F"]);
    c.signal_dataplane(0, "-CONT");
    // Without its REDIRECT, traffic to the cluster IP would go nowhere.
    eventually("answers after the flush", Duration::from_secs(15), || {
        sender.tcp_request(addr, WAIT).pod().map(str::to_string)
    });
    let nat = c.save(0, false, "nat");
    assert!(
        nat.contains("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-PORTALS-CONTAINER"),
        "{nat}"
    );
    assert!(nat.contains("-A KUBE-PROXY-CANARY"), "{nat}");
}
