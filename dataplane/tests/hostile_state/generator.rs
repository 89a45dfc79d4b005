//! Part 2 of the test: random states and deltas, from a seeded generator mixing a nasty
//! alphabet with valid values.

use std::collections::BTreeMap;

use kpx_proto::v1 as pb;
use rand::Rng;
use rand::rngs::StdRng;

use crate::hostile::INJECT;
use crate::model::{Model, key};

/// Fragments of hostile text.
const NASTY: [&str; 38] = [
    "\"",
    "\\",
    "'",
    " ",
    "\n",
    "\r",
    "\t",
    "\0",
    "*",
    "-A INPUT -j DROP",
    INJECT,
    "#",
    "ü",
    "名前",
    "🚀",
    "\u{2028}",
    "\u{feff}",
    "\u{7f}",
    "$(reboot)",
    "`id`",
    ";",
    "|",
    "--comment",
    " -j ACCEPT ",
    "COMMIT",
    "*filter",
    ":",
    "/",
    "[",
    "]",
    "%",
    "-",
    "web",
    "ns",
    "p",
    "\"\"",
    "\\\"",
    "-m comment --comment \"x\"",
];
const NAMES: [&str; 8] = ["web", "dns", "a", "kube-dns", "x1", "p", "http", ""];
const PORT_NAMES: [&str; 5] = ["", "p", "http", "dns", "metrics"];
const GARBAGE_IPS: [&str; 28] = [
    "10.0.0.1\n-A INPUT -j DROP",
    "999.1.1.1",
    "",
    "::ffff:1.2.3.4",
    "fe80::1%eth0",
    "10.0.0.0/33",
    "1.2.3.4/-1",
    " 10.0.0.1",
    "10.0.0.1 ",
    "None",
    "1.2.3",
    "0.0.0.0",
    "255.255.255.255",
    "::",
    "::1",
    "224.0.0.1",
    "[fd00::1]",
    "10.0.0.1:80",
    "0x7f.1",
    "010.0.0.1",
    "1.2.3.4.5",
    "fd00::1/64",
    "ff02::1",
    "127.0.0.1",
    "169.254.0.1",
    "::ffff:0:0",
    "fd00:0:0:0:0:0:0:1",
    "FD00::1",
];
const CIDRS: [&str; 21] = [
    "10.0.0.0/8",
    "203.0.113.0/25",
    "0.0.0.0/0",
    "::/0",
    "fd00::/64",
    "10.0.0.1/24",
    "192.168.0.2/32",
    "10.0.0.0/33",
    "1.2.3.4/-1",
    "1.2.3.4/",
    "/8",
    "1.2.3.4/+8",
    "1.2.3.4/ 8",
    "1.2.3.4/08",
    "::/129",
    "1.2.3.4",
    "",
    "0.0.0.0/0\n-A INPUT -j DROP",
    "1.2.3.4/99999999999999999999",
    "::ffff:1.2.3.4/120",
    "fd00::1/64",
];
const FAMILIES: [&str; 7] = ["IPv4", "IPv6", "", "ipv4", "IPv4\n", "IPv6 -j DROP", "IPv4"];

pub(crate) struct Gen {
    pub(crate) rng: StdRng,
}

impl Gen {
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.rng.random_range(0..xs.len())]
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    fn text(&mut self) -> String {
        match self.rng.random_range(0..20) {
            0..=9 => self.pick(&NAMES).to_string(),
            10..=18 => (0..self.rng.random_range(1..6)).map(|_| self.pick(&NASTY)).collect(),
            _ => {
                let frag = self.pick(&NASTY);
                frag.repeat(self.rng.random_range(200..10_000) / frag.len() + 1)
            }
        }
    }

    fn valid_ip(&mut self, v6: bool) -> String {
        if v6 {
            format!("fd00:{:x}::{:x}", self.rng.random_range(0..4), self.rng.random_range(1..0xffff))
        } else {
            format!(
                "10.{}.{}.{}",
                self.rng.random_range(0..4),
                self.rng.random_range(0..256),
                self.rng.random_range(1..255)
            )
        }
    }

    fn ip(&mut self, v6: bool) -> String {
        match self.rng.random_range(0..10) {
            0..=6 => self.valid_ip(v6),
            7..=8 => self.pick(&GARBAGE_IPS).to_string(),
            _ => self.text(),
        }
    }

    fn any_ip(&mut self) -> String {
        let v6 = self.chance(0.4);
        self.ip(v6)
    }

    fn list(&mut self, max: usize, f: impl Fn(&mut Gen) -> String) -> Vec<String> {
        (0..self.rng.random_range(0..=max)).map(|_| f(self)).collect()
    }

    fn port(&mut self) -> u32 {
        match self.rng.random_range(0..10) {
            0..=6 => self.pick(&[80, 443, 53, 8080, 1, 65535, 0, 65536, u32::MAX]),
            7..=8 => self.rng.random_range(1..65536),
            _ => self.rng.random(),
        }
    }

    fn node_port(&mut self) -> u32 {
        match self.rng.random_range(0..10) {
            0..=5 => 0,
            6..=8 => self.rng.random_range(30000..32768),
            _ => self.pick(&[1, 65535, 65536, u32::MAX, 0x1_0050]),
        }
    }

    fn port_name(&mut self) -> String {
        if self.chance(0.8) { self.pick(&PORT_NAMES).to_string() } else { self.text() }
    }

    fn service(&mut self, namespace: String, name: String) -> pb::Service {
        if self.chance(0.03) {
            return pb::Service { namespace, name, ..Default::default() };
        }
        let (v4, v6) = (self.ip(false), self.ip(true));
        let cluster_ips = match self.rng.random_range(0..8) {
            0..=2 => vec![v4],
            3..=4 => vec![v4, v6],
            5 => vec![v6],
            6 => vec![v6, v4],
            _ => self.list(3, Gen::any_ip),
        };
        let ports = (0..self.rng.random_range(0..5))
            .map(|_| pb::ServicePort {
                name: self.port_name(),
                protocol: self.pick(&[1, 1, 1, 2, 2, 3, 0, 4, 99, -1, i32::MAX, i32::MIN]),
                port: self.port(),
                node_port: self.node_port(),
            })
            .collect();
        pb::Service {
            namespace,
            name,
            r#type: self.pick(&[0, 1, 1, 2, 3, 99, -1]),
            cluster_ips,
            external_ips: if self.chance(0.3) { self.list(3, Gen::any_ip) } else { Vec::new() },
            load_balancer_ips: if self.chance(0.3) { self.list(3, Gen::any_ip) } else { Vec::new() },
            load_balancer_source_ranges: if self.chance(0.3) {
                self.list(3, |g| if g.chance(0.9) { g.pick(&CIDRS).to_string() } else { g.text() })
            } else {
                Vec::new()
            },
            ports,
            session_affinity_timeout_seconds: if self.chance(0.7) {
                0
            } else {
                self.pick(&[1, 10800, 86400, u32::MAX, 1 << 31])
            },
            external_policy_local: self.chance(0.3),
            internal_policy_local: self.chance(0.3),
            health_check_node_port: if self.chance(0.7) { 0 } else { self.port() },
            families_with_endpoints: self
                .list(3, |g| if g.chance(0.9) { g.pick(&FAMILIES).to_string() } else { g.text() }),
        }
    }

    fn endpoint(&mut self, s: &pb::Service) -> pb::Endpoint {
        let names: Vec<String> = s.ports.iter().map(|p| p.name.clone()).collect();
        let v6 = s.cluster_ips.first().is_some_and(|ip| ip.contains(':')) != self.chance(0.15);
        pb::Endpoint {
            service: String::new(),
            ip: self.ip(v6),
            ports: (0..self.rng.random_range(0..4))
                .map(|_| pb::EndpointPort {
                    name: if !names.is_empty() && self.chance(0.8) {
                        names[self.rng.random_range(0..names.len())].clone()
                    } else {
                        self.port_name()
                    },
                    port: self.port(),
                })
                .collect(),
            for_cluster: self.chance(0.8),
            for_local: self.chance(0.4),
            node_tag: 0,
        }
    }

    fn endpoints(&mut self, s: &pb::Service) -> Vec<pb::Endpoint> {
        let n = if self.chance(0.03) { self.rng.random_range(100..300) } else { self.rng.random_range(0..6) };
        (0..n).map(|_| self.endpoint(s)).collect()
    }

    fn new_service(&mut self) -> pb::Service {
        let (ns, name) = (self.text(), self.text());
        self.service(ns, name)
    }

    pub(crate) fn snapshot(&mut self) -> Model {
        let mut m = Model::default();
        for _ in 0..self.rng.random_range(1..10) {
            let s = self.new_service();
            let eps = self.endpoints(&s);
            let k = key(&s.namespace, &s.name);
            m.upsert(s);
            eps.into_iter().for_each(|e| m.add_endpoint(&k, e));
        }
        m
    }

    /// A random delta over `m` (without versions; see [`Model::after`]).
    pub(crate) fn delta(&mut self, m: &Model) -> pb::Update {
        let mut u = pb::Update { nonce: 7, ..Default::default() };
        let mut alive: BTreeMap<String, pb::Service> = BTreeMap::new();
        for (k, (s, eps)) in &m.services {
            let removed = self.chance(0.2);
            if removed {
                u.services_removed.push(pb::ServiceRef { namespace: s.namespace.clone(), name: s.name.clone() });
            }
            for ip in eps.keys() {
                if self.chance(0.2) {
                    u.endpoints_removed.push(pb::EndpointRef { service: k.clone(), ip: ip.clone() });
                }
            }
            if self.chance(0.3) {
                let changed = if self.chance(0.5) {
                    self.service(s.namespace.clone(), s.name.clone())
                } else {
                    let mut c = s.clone();
                    match self.rng.random_range(0..5) {
                        0 => c.ports.reverse(),
                        1 => c.ports.truncate(1),
                        2 => c.session_affinity_timeout_seconds = self.pick(&[0, 10800, u32::MAX]),
                        3 => c.external_policy_local = !c.external_policy_local,
                        _ => c.cluster_ips.reverse(),
                    }
                    c
                };
                u.services_upserted.push(changed.clone());
                alive.insert(k.clone(), changed);
            } else if !removed {
                alive.insert(k.clone(), s.clone());
            }
        }
        for _ in 0..self.rng.random_range(0..3) {
            let s = self.new_service();
            alive.insert(key(&s.namespace, &s.name), s.clone());
            u.services_upserted.push(s);
        }
        for (k, s) in &alive {
            for _ in 0..self.rng.random_range(0..3) {
                let e = self.endpoint(s);
                u.endpoints_upserted.push(pb::Endpoint { service: k.clone(), ..e });
            }
        }
        u
    }

    /// A valid snapshot's encoding, damaged; or random bytes.
    pub(crate) fn garbage(&mut self, valid: &[u8]) -> Vec<u8> {
        if valid.is_empty() || self.chance(0.2) {
            return (0..self.rng.random_range(0..2000)).map(|_| self.rng.random()).collect();
        }
        let mut b = valid.to_vec();
        for _ in 0..self.rng.random_range(1..10) {
            let i = self.rng.random_range(0..b.len());
            match self.rng.random_range(0..3) {
                0 => b[i] = self.rng.random(),
                1 => b.truncate(i.max(1)),
                _ => b.insert(i, self.rng.random()),
            }
        }
        b
    }
}
