//! Self-tests of the kernel-test harness (tests/netns/): before any proxy rule exists, the
//! little cluster must route like a real one, the pods must answer with their names and the
//! source address they saw, outcomes must be told apart, and nothing may be left behind.
//! Needs root and network namespaces: skips loudly without them, fails under CI=true.

mod netns;

use netns::{Outcome, Proto, Topology};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(2);

fn at(ip: impl Into<std::net::IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

#[test]
fn node_reaches_its_pods_directly() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = Topology::builder().pod("web-1", 0).pod("web-2", 0).serve(&[PORT]).build();
    let node = topo.node("node-a");
    for pod in &topo.pods {
        for proto in [Proto::Tcp, Proto::Udp] {
            let reply = node.ns.request(proto, at(pod.ip4, PORT), None, WAIT).expect_answer(&pod.name);
            assert_eq!(reply.pod, pod.name, "{proto:?} to {}", pod.ip4);
            // From the node, the source is its address on the pod bridge.
            assert_eq!(reply.peer.ip(), node.gateway4);
            assert_eq!(reply.local, at(pod.ip4, PORT));
        }
    }
    assert_eq!(
        [topo.pod("web-1").ip4, topo.pod("web-2").ip4],
        [Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 1, 3)]
    );
}

#[test]
fn client_reaches_pods_through_the_node_without_nat() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = Topology::builder().pod("web-1", 0).serve(&[PORT]).build();
    let (client, pod) = (&topo.client, topo.pod("web-1"));
    for proto in [Proto::Tcp, Proto::Udp] {
        let reply = client.ns.request(proto, at(pod.ip4, PORT), None, WAIT).expect_answer("client -> pod");
        assert_eq!((reply.pod.as_str(), reply.peer.ip()), ("web-1", client.ip4.into()), "{proto:?}");
        // The second client address is a distinct source the pod sees as such.
        let alt = Some(client.alt_ip4.into());
        let reply = client.ns.request(proto, at(pod.ip4, PORT), alt, WAIT).expect_answer("alt client -> pod");
        assert_eq!(reply.peer.ip(), client.alt_ip4, "{proto:?} from the alternative address");
    }
}

#[test]
fn ipv6_pods_are_reachable_from_the_client() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = Topology::builder().pod("web-1", 0).serve(&[PORT]).build();
    let (client, pod) = (&topo.client, topo.pod("web-1"));
    for proto in [Proto::Tcp, Proto::Udp] {
        let reply = client.ns.request(proto, at(pod.ip6, PORT), None, WAIT).expect_answer("client -> pod v6");
        assert_eq!((reply.pod.as_str(), reply.peer.ip()), ("web-1", client.ip6.into()), "{proto:?}");
        assert_eq!(reply.local, at(pod.ip6, PORT));
        let alt = Some(client.alt_ip6.into());
        let reply = client.ns.request(proto, at(pod.ip6, PORT), alt, WAIT).expect_answer("alt client -> pod v6");
        assert_eq!(reply.peer.ip(), client.alt_ip6, "{proto:?} from the alternative address");
    }
}

#[test]
fn two_nodes_route_each_others_pod_cidrs() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = Topology::builder().second_node().pod("a-1", 0).pod("b-1", 1).serve(&[PORT]).build();
    let (a, b) = (topo.pod("a-1"), topo.pod("b-1"));
    assert_eq!(b.ip4, Ipv4Addr::new(10, 244, 2, 2));
    for (from, to) in [(a, b), (b, a)] {
        for dst in to.ips() {
            let reply = from.ns.tcp_request(at(dst, PORT), WAIT).expect_answer("pod -> pod across nodes");
            assert_eq!(reply.pod, to.name);
            assert!(from.ips().contains(&reply.peer.ip()), "pod IP kept across nodes: {reply:?}");
        }
    }
    // The client reaches node-b's pods through node-b (its own route).
    let reply = topo.client.ns.udp_request(at(b.ip4, PORT), WAIT).expect_answer("client -> node-b pod");
    assert_eq!((reply.pod.as_str(), reply.peer.ip()), ("b-1", topo.client.ip4.into()));
}

#[test]
fn outcomes_are_told_apart() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = Topology::builder().pod("web-1", 0).serve(&[PORT]).build();
    let (client, pod) = (&topo.client, topo.pod("web-1"));
    // Nothing listens on PORT+1: TCP gets a RST, UDP an ICMP port unreachable.
    assert_eq!(client.ns.tcp_request(at(pod.ip4, PORT + 1), WAIT), Outcome::Refused);
    assert_eq!(client.ns.udp_request(at(pod.ip4, PORT + 1), WAIT), Outcome::Refused);
    assert_eq!(client.ns.tcp_request(at(pod.ip6, PORT + 1), WAIT), Outcome::Refused);
    // A pod address nobody holds: nothing answers within the timeout.
    let nobody = at(Ipv4Addr::new(10, 244, 1, 250), PORT);
    assert_eq!(client.ns.tcp_request(nobody, Duration::from_millis(300)), Outcome::TimedOut);
    // A load-balancing tally keys answers by pod and failures by outcome.
    let tally = client.ns.tally(Proto::Udp, at(pod.ip4, PORT), 3, WAIT);
    assert_eq!(tally.into_iter().collect::<Vec<_>>(), [("web-1".to_string(), 3)]);
}

#[test]
fn dropping_the_topology_removes_namespaces_and_processes() {
    if !netns::require_root_and_netns() {
        return;
    }
    let (names, pids) = {
        let mut topo = Topology::builder().second_node().pod("a-1", 0).pod("b-1", 1).serve(&[PORT]).build();
        let names = topo.namespace_names();
        let pids: Vec<u32> = topo.backends.iter().map(|b| b.pid()).collect();
        assert_eq!(names.len(), 5);
        let listed = netns::list_test_namespaces();
        assert!(names.iter().all(|n| listed.contains(n)), "{names:?} not all in {listed:?}");
        assert!(topo.backends.iter_mut().all(|b| b.is_running()));
        (names, pids)
    };
    let listed = netns::list_test_namespaces();
    assert!(names.iter().all(|n| !listed.contains(n)), "left behind: {listed:?}");
    for pid in pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "backend {pid} still running");
    }
}

#[test]
fn a_panicking_test_still_cleans_up() {
    if !netns::require_root_and_netns() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let topo = Topology::builder().pod("web-1", 0).serve(&[PORT]).build();
        tx.send(topo.namespace_names()).unwrap();
        panic!("test failure inside a topology");
    })
    .join();
    assert!(result.is_err());
    let names = rx.recv().unwrap();
    let listed = netns::list_test_namespaces();
    assert!(names.iter().all(|n| !listed.contains(n)), "left behind after a panic: {listed:?}");
}
