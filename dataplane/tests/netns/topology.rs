//! A small cluster on one machine, with the example cluster's addresses (deploy/examples):
//!
//! ```text
//!   client ns: bridge kpxlan = the node network 10.77.0.0/24, fd00:77::/64
//!     client 10.77.0.100 (+ 10.77.0.200), fd00:77::100 (+ ::200); default route via node-a,
//!     a route to each node's pod CIDR via that node
//!       |                                   |
//!   node-a ns: eth0 10.77.0.10            node-b ns (optional): eth0 10.77.0.11
//!     bridge kpxbr0 10.244.1.1/24,          bridge kpxbr0 10.244.2.1/24, fd00:244:2::1/64
//!       fd00:244:1::1/64                    ...
//!     ip_forward on; default via client;    routes to the other node's pod CIDR via that node
//!       |            |
//!   pod ns       pod ns ...   eth0 10.244.1.2/24, fd00:244:1::2/64; default via the bridge
//! ```
//!
//! The node namespaces are where a proxy's rules live: every packet between the client and a
//! pod, and between pods of different nodes, is routed by them. IPv6 addresses are `nodad`, so
//! they are usable at once. Pods get host numbers .2, .3, ... in the order they are added, per
//! node, as in deploy/examples (web: 10.244.1.2, 10.244.1.3, 10.244.2.2).

use super::{Backend, NetNs};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Where the names and addresses come from; index = node number.
const NODE_NAMES: [&str; 2] = ["node-a", "node-b"];

pub struct Node {
    pub name: &'static str,
    pub ns: NetNs,
    /// On the node network (the InternalIP).
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The pods' gateway, on the node's bridge.
    pub gateway4: Ipv4Addr,
    pub gateway6: Ipv6Addr,
    pub pod_cidr4: String,
    pub pod_cidr6: String,
}

pub struct Pod {
    pub name: String,
    /// Index into [`Topology::nodes`].
    pub node: usize,
    pub ns: NetNs,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

impl Pod {
    pub fn ips(&self) -> [IpAddr; 2] {
        [self.ip4.into(), self.ip6.into()]
    }
}

/// Outside the node: a machine on the node network.
pub struct Client {
    pub ns: NetNs,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// A second address, as a second client (for source-range tests: `request(.., Some(alt), ..)`).
    pub alt_ip4: Ipv4Addr,
    pub alt_ip6: Ipv6Addr,
}

// Field order is drop order: processes, then pods, then nodes (veths die with them), then the
// client that holds the node network.
pub struct Topology {
    pub backends: Vec<Backend>,
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
    pub client: Client,
}

#[derive(Debug, Default)]
pub struct TopologyBuilder {
    two_nodes: bool,
    pods: Vec<(String, usize)>,
    serve: Vec<u16>,
}

impl TopologyBuilder {
    /// Adds node-b (node-a always exists).
    pub fn second_node(mut self) -> Self {
        self.two_nodes = true;
        self
    }

    /// A pod NAME on node 0 (node-a) or 1 (node-b); NAME is what it answers with.
    pub fn pod(mut self, name: &str, node: usize) -> Self {
        assert!(node < 2, "nodes are 0 (node-a) and 1 (node-b)");
        assert!(!self.pods.iter().any(|(n, _)| n == name), "duplicate pod {name}");
        self.pods.push((name.to_string(), node));
        self
    }

    /// Starts a backend on every pod, TCP and UDP on these ports, IPv4 and IPv6, and waits
    /// until each answers.
    pub fn serve(mut self, ports: &[u16]) -> Self {
        self.serve.extend_from_slice(ports);
        self
    }

    pub fn build(self) -> Topology {
        if self.pods.iter().any(|&(_, node)| node == 1) {
            assert!(self.two_nodes, "a pod on node-b needs .second_node()");
        }
        let node_count = if self.two_nodes { 2 } else { 1 };
        let client = build_client(node_count);
        let nodes: Vec<Node> = (0..node_count).map(|i| build_node(i, node_count, &client)).collect();
        let mut per_node = [0u8; 2];
        let pods = self
            .pods
            .into_iter()
            .enumerate()
            .map(|(index, (name, node))| {
                let host = 2 + per_node[node];
                per_node[node] += 1;
                build_pod(name, index, &nodes[node], node, host)
            })
            .collect();
        let mut topology = Topology { backends: Vec::new(), pods, nodes, client };
        if !self.serve.is_empty() {
            topology.backends = topology.pods.iter().map(|p| Backend::start(p, &self.serve)).collect();
        }
        topology
    }
}

impl Topology {
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Stops the backend process of pod NAME (the pod and its addresses stay).
    pub fn stop_backend(&mut self, name: &str) {
        let before = self.backends.len();
        self.backends.retain(|b| b.pod != name);
        assert!(self.backends.len() < before, "pod {name} has no backend running");
    }

    /// Every namespace of this topology (for cleanup checks).
    pub fn namespace_names(&self) -> Vec<String> {
        let mut names = vec![self.client.ns.name().to_string()];
        names.extend(self.nodes.iter().map(|n| n.ns.name().to_string()));
        names.extend(self.pods.iter().map(|p| p.ns.name().to_string()));
        names
    }
}

fn node_ip4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 10 + i as u8)
}

fn node_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x10 + i as u16)
}

fn build_client(node_count: usize) -> Client {
    let ns = NetNs::new("client");
    let client = Client {
        ip4: Ipv4Addr::new(10, 77, 0, 100),
        ip6: "fd00:77::100".parse().unwrap(),
        alt_ip4: Ipv4Addr::new(10, 77, 0, 200),
        alt_ip6: "fd00:77::200".parse().unwrap(),
        ns,
    };
    let ns = &client.ns;
    ns.ip(&["link", "add", "kpxlan", "type", "bridge"]);
    for a in [client.ip4, client.alt_ip4] {
        ns.ip(&["addr", "add", &format!("{a}/24"), "dev", "kpxlan"]);
    }
    // The alternative addresses are only used when asked for: IPv4 picks the primary (first)
    // address, IPv6 never picks a deprecated one (preferred_lft 0) as a source by itself.
    ns.ip(&["addr", "add", &format!("{}/64", client.ip6), "dev", "kpxlan", "nodad"]);
    ns.ip(&["addr", "add", &format!("{}/64", client.alt_ip6), "dev", "kpxlan", "nodad", "preferred_lft", "0"]);
    ns.ip(&["link", "set", "kpxlan", "up"]);
    // The nodes' ends are attached by build_node; routes via them work once they are up, and
    // `ip route add` does not need the gateway to answer yet.
    for i in 0..node_count {
        ns.ip(&["route", "add", &format!("10.244.{}.0/24", i + 1), "via", &node_ip4(i).to_string()]);
        ns.ip(&["-6", "route", "add", &format!("fd00:244:{}::/64", i + 1), "via", &node_ip6(i).to_string()]);
    }
    // Service, external and load-balancer addresses go to node-a, as to a cluster's gateway.
    ns.ip(&["route", "add", "default", "via", &node_ip4(0).to_string()]);
    ns.ip(&["-6", "route", "add", "default", "via", &node_ip6(0).to_string()]);
    client
}

fn build_node(i: usize, node_count: usize, client: &Client) -> Node {
    let ns = NetNs::new(&NODE_NAMES[i].replace('-', ""));
    let node = Node {
        name: NODE_NAMES[i],
        ip4: node_ip4(i),
        ip6: node_ip6(i),
        gateway4: Ipv4Addr::new(10, 244, i as u8 + 1, 1),
        gateway6: Ipv6Addr::new(0xfd00, 0x244, i as u16 + 1, 0, 0, 0, 0, 1),
        pod_cidr4: format!("10.244.{}.0/24", i + 1),
        pod_cidr6: format!("fd00:244:{}::/64", i + 1),
        ns,
    };
    let ns = &node.ns;
    ns.sysctl(&[("net.ipv4.ip_forward", "1"), ("net.ipv6.conf.all.forwarding", "1")]);

    // Uplink: eth0 here, port nodeN of the client's bridge there.
    let port = format!("node{i}");
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", client.ns.name()]);
    client.ns.ip(&["link", "set", &port, "master", "kpxlan", "up"]);
    ns.ip(&["addr", "add", &format!("{}/24", node.ip4), "dev", "eth0"]);
    ns.ip(&["addr", "add", &format!("{}/64", node.ip6), "dev", "eth0", "nodad"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["route", "add", "default", "via", &client.ip4.to_string()]);
    ns.ip(&["-6", "route", "add", "default", "via", &client.ip6.to_string()]);

    // The pod network: a bridge holding the gateway addresses.
    ns.ip(&["link", "add", "kpxbr0", "type", "bridge"]);
    ns.ip(&["addr", "add", &format!("{}/24", node.gateway4), "dev", "kpxbr0"]);
    ns.ip(&["addr", "add", &format!("{}/64", node.gateway6), "dev", "kpxbr0", "nodad"]);
    ns.ip(&["link", "set", "kpxbr0", "up"]);

    for other in (0..node_count).filter(|&o| o != i) {
        ns.ip(&["route", "add", &format!("10.244.{}.0/24", other + 1), "via", &node_ip4(other).to_string()]);
        ns.ip(&["-6", "route", "add", &format!("fd00:244:{}::/64", other + 1), "via", &node_ip6(other).to_string()]);
    }
    node
}

fn build_pod(name: String, index: usize, node: &Node, node_index: usize, host: u8) -> Pod {
    let ns = NetNs::new("pod");
    let ip4 = Ipv4Addr::new(10, 244, node_index as u8 + 1, host);
    let ip6 = Ipv6Addr::new(0xfd00, 0x244, node_index as u16 + 1, 0, 0, 0, 0, host as u16);
    let port = format!("vp{index}");
    node.ns.ip(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns.name()]);
    node.ns.ip(&["link", "set", &port, "master", "kpxbr0", "up"]);
    ns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"]);
    ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["route", "add", "default", "via", &node.gateway4.to_string()]);
    ns.ip(&["-6", "route", "add", "default", "via", &node.gateway6.to_string()]);
    Pod { name, node: node_index, ns, ip4, ip6 }
}
