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
use netns::{Outcome, Proto, Topology};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

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
    let c = Cluster::start_with(topo, &[web, dns], &USERSPACE);
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
