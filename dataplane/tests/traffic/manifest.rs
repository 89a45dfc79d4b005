//! Service + EndpointSlice manifests for the controlplane's file source, written from the
//! topology's addresses so that the rules and the pods agree. Every service lives in namespace
//! `demo`, has one port named `p` and targets the pods' port [`TARGET_PORT`].

// Each test file uses a different part of it.
#![allow(dead_code)]

use std::fmt::Write;
use std::net::IpAddr;

/// The port every backend pod serves (TCP and UDP).
pub const TARGET_PORT: u16 = 8080;

/// The node objects: InternalIPs and pod CIDRs as the topology builds them.
pub const NODES: &str = r#"apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels: {topology.kubernetes.io/zone: zone-a}
spec:
  podCIDR: 10.244.1.0/24
  podCIDRs: [10.244.1.0/24, "fd00:244:1::/64"]
status:
  addresses:
  - {address: 10.77.0.10, type: InternalIP}
---
apiVersion: v1
kind: Node
metadata:
  name: node-b
  labels: {topology.kubernetes.io/zone: zone-b}
spec:
  podCIDR: 10.244.2.0/24
  podCIDRs: [10.244.2.0/24, "fd00:244:2::/64"]
status:
  addresses:
  - {address: 10.77.0.11, type: InternalIP}
"#;

/// One service and its EndpointSlice.
#[derive(Debug, Clone)]
pub struct Svc {
    name: String,
    kind: &'static str,
    cluster_ip: String,
    family: &'static str,
    proto: &'static str,
    port: u16,
    node_port: Option<u16>,
    /// Extra lines under `spec:`, unindented.
    spec: Vec<String>,
    lb_ingress: Option<IpAddr>,
    /// (address, node name)
    endpoints: Vec<(IpAddr, &'static str)>,
}

impl Svc {
    /// A TCP ClusterIP service NAME on CLUSTER_IP:80 ("None" for headless); the family follows
    /// the address.
    pub fn new(name: &str, cluster_ip: &str) -> Svc {
        let family = if cluster_ip.contains(':') { "IPv6" } else { "IPv4" };
        Svc {
            name: name.to_string(),
            kind: "ClusterIP",
            cluster_ip: cluster_ip.to_string(),
            family,
            proto: "TCP",
            port: 80,
            node_port: None,
            spec: Vec::new(),
            lb_ingress: None,
            endpoints: Vec::new(),
        }
    }

    pub fn udp(mut self, port: u16) -> Svc {
        self.proto = "UDP";
        self.port = port;
        self
    }

    /// type NodePort on NODE_PORT, externalTrafficPolicy Local or Cluster.
    pub fn node_port(mut self, node_port: u16, local: bool) -> Svc {
        self.kind = "NodePort";
        self.node_port = Some(node_port);
        self.spec.push(format!("externalTrafficPolicy: {}", if local { "Local" } else { "Cluster" }));
        self
    }

    /// type LoadBalancer with ingress IP and source ranges (and the node port it is given).
    pub fn load_balancer(mut self, ip: IpAddr, node_port: u16, source_ranges: &[&str]) -> Svc {
        self.kind = "LoadBalancer";
        self.node_port = Some(node_port);
        self.lb_ingress = Some(ip);
        self.spec.push(format!("loadBalancerSourceRanges: [{}]", quoted(source_ranges)));
        self
    }

    /// A raw `spec:` line such as `externalIPs: ["198.51.100.10"]`.
    pub fn spec(mut self, line: &str) -> Svc {
        self.spec.push(line.to_string());
        self
    }

    /// A ready endpoint at IP on NODE.
    pub fn endpoint(mut self, ip: IpAddr, node: &'static str) -> Svc {
        self.endpoints.push((ip, node));
        self
    }

    /// The file name the service is written to.
    pub fn file_name(&self) -> String {
        format!("{}.yaml", self.name)
    }

    pub fn yaml(&self) -> String {
        let (name, ip, proto) = (&self.name, &self.cluster_ip, self.proto);
        let mut y = String::new();
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  type: {}\n  \
             clusterIP: \"{ip}\"\n  clusterIPs: [\"{ip}\"]\n  ipFamilies: [{}]\n  ports:\n  - name: p\n    \
             port: {}\n    protocol: {proto}\n    targetPort: {TARGET_PORT}\n",
            self.kind, self.family, self.port
        );
        if let Some(np) = self.node_port {
            let _ = writeln!(y, "    nodePort: {np}");
        }
        self.spec.iter().for_each(|l| {
            let _ = writeln!(y, "  {l}");
        });
        if let Some(lb) = self.lb_ingress {
            let _ = writeln!(y, "status:\n  loadBalancer:\n    ingress:\n    - ip: \"{lb}\"");
        }
        let _ = write!(
            y,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  \
             namespace: demo\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: {}\nports:\n\
             - name: p\n  port: {TARGET_PORT}\n  protocol: {proto}\nendpoints:",
            self.family
        );
        if self.endpoints.is_empty() {
            y.push_str(" []\n");
        } else {
            y.push('\n');
        }
        for (addr, node) in &self.endpoints {
            let _ = writeln!(
                y,
                "- addresses: [\"{addr}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  \
                 nodeName: {node}"
            );
        }
        y
    }
}

fn quoted(items: &[&str]) -> String {
    items.iter().map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(", ")
}
