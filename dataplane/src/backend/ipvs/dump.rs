//! The kernel's IPVS table as the admin API shows it (`GetKernelRules`): every virtual server
//! with its real servers in `ipvsadm -Ln`'s shape, and, for each virtual server and real server
//! kpx wants, whether the kernel has it. [`read`] does the netlink I/O; the rest is pure.
//!
//! The listing is the whole table (what is in the kernel, kpx's or not); the expected entries
//! are only kpx's desired ones, so that another user of IPVS never shows up as kpx's drift.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use kpx_ipvs_netlink::consts::IP_VS_SVC_F_PERSISTENT;
use kpx_ipvs_netlink::{DestinationInfo, Family, Forward, IpvsClient, IpvsError, Protocol, Service, ServiceInfo};

use super::plan::{Desired, Key, Table, VipKind, protocol};
use crate::state::Services;

/// Every virtual server with its real servers, as the kernel reported them.
pub type Dump = Vec<(ServiceInfo, Vec<DestinationInfo>)>;

/// Reads the whole table (blocking). A virtual server deleted between the service dump and its
/// destination dump is left out: it is no longer in the kernel.
pub fn read(client: &mut IpvsClient) -> Result<Dump, IpvsError> {
    let mut out = Vec::new();
    for s in client.services()? {
        match client.destinations(&s.service) {
            Ok(dests) => out.push((s, dests)),
            Err(IpvsError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// A virtual server as `ipvsadm -Ln` names it: "TCP  10.96.0.10:80", "UDP  [fd00::10]:53",
/// "FWM  5" (an IPv6 firewall-mark service: "FWM  5 IPv6").
pub fn virtual_server(s: &Service) -> String {
    match s.fwmark {
        Some(mark) if s.family == Family::Inet6 => format!("FWM  {mark} IPv6"),
        Some(mark) => format!("FWM  {mark}"),
        None => key_name(&Key::of(s)),
    }
}

/// [`virtual_server`] of a key (keys are never firewall-mark services).
pub fn key_name(k: &Key) -> String {
    format!("{}  {}", k.protocol, k.addr)
}

/// A real server of the virtual server `k`, as one expected entry names it:
/// "TCP  10.96.0.10:80 -> 10.244.1.3:8080".
pub fn real_server_name(k: &Key, dest: SocketAddr) -> String {
    format!("{} -> {dest}", key_name(k))
}

fn forward_name(f: Forward) -> &'static str {
    match f {
        Forward::Masq => "Masq",
        Forward::Local => "Local",
        Forward::Tunnel => "Tunnel",
        Forward::Route => "Route",
        Forward::Bypass => "Bypass",
    }
}

/// The service line: name, scheduler, and persistence (sessionAffinity) when set.
fn service_line(s: &Service) -> String {
    let mut line = format!("{} {}", virtual_server(s), s.scheduler);
    if s.flags & IP_VS_SVC_F_PERSISTENT != 0 {
        line.push_str(&format!(" persistent {}", s.timeout));
    }
    line
}

/// A real server line: address, forwarding method, weight, active and inactive connections.
fn dest_line(d: &DestinationInfo) -> String {
    let dest = &d.dest;
    let (fwd, weight) = (forward_name(dest.forward), dest.weight);
    format!("  -> {}  {fwd}  {weight}  {}  {}", dest.socket_addr(), d.active_conns, d.inactive_conns)
}

/// Orders firewall-mark services after address ones, like ipvsadm's sorted listing.
fn sort_key(s: &Service) -> (bool, u32, Protocol, SocketAddr) {
    (s.fwmark.is_some(), s.fwmark.unwrap_or(0), s.protocol, s.socket_addr())
}

/// The table as `ipvsadm -Ln` lists it, without its headers, sorted so that two reads of the
/// same table compare equal (the kernel dumps in hash order).
pub fn lines(dump: &Dump) -> Vec<String> {
    let mut services: Vec<&(ServiceInfo, Vec<DestinationInfo>)> = dump.iter().collect();
    services.sort_by_key(|(s, _)| sort_key(&s.service));
    let mut out = Vec::new();
    for (s, dests) in services {
        out.push(service_line(&s.service));
        let mut dests: Vec<&DestinationInfo> = dests.iter().collect();
        dests.sort_by_key(|d| d.dest.socket_addr());
        out.extend(dests.into_iter().map(dest_line));
    }
    out
}

/// One entry kpx wants in the kernel: a virtual server, or one of its real servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// "namespace/name:port" ("namespace/name" for an unnamed port).
    pub service_port: String,
    /// [`key_name`] or [`real_server_name`].
    pub entry: String,
    pub family: Family,
    pub present: bool,
}

/// Which service port asked for a virtual server: (protocol, address, port) -> service port
/// name. The address is `None` for NodePorts, which are on every node address.
#[derive(Debug, Default)]
pub struct PortNames(HashMap<(Protocol, Option<IpAddr>, u16), String>);

impl PortNames {
    /// Indexes every service port of `services` (keyed "namespace/name") on each of its
    /// addresses. Where two services claim one address the later in name order wins, as in
    /// the plan.
    pub fn new(services: &Services) -> PortNames {
        let mut names = HashMap::new();
        for (key, entry) in services {
            let s = &entry.service;
            let addrs: Vec<IpAddr> = [&s.cluster_ips, &s.external_ips, &s.load_balancer_ips]
                .into_iter()
                .flatten()
                .filter_map(|a| a.parse().ok())
                .collect();
            for port in &s.ports {
                let Some(proto) = protocol(port.protocol) else { continue };
                let name = if port.name.is_empty() { key.clone() } else { format!("{key}:{}", port.name) };
                if let Ok(number) = u16::try_from(port.port) {
                    for ip in &addrs {
                        names.insert((proto, Some(*ip), number), name.clone());
                    }
                }
                if let Ok(node_port) = u16::try_from(port.node_port)
                    && node_port != 0
                {
                    names.insert((proto, None, node_port), name);
                }
            }
        }
        PortNames(names)
    }

    /// The service port of a desired virtual server; its own name when no port claims it (the
    /// plan computed it from the same services, so that does not happen).
    fn name(&self, k: &Key, kind: VipKind) -> String {
        let ip = (kind != VipKind::NodePort).then_some(k.addr.ip());
        self.0.get(&(k.protocol, ip, k.addr.port())).cloned().unwrap_or_else(|| key_name(k))
    }
}

/// For every virtual server in `desired` and each of its real servers, whether `kernel` has it.
/// Presence only: a real server at another weight (draining) still counts as there.
pub fn expected(desired: &Desired, names: &PortNames, kernel: &Table) -> Vec<Expected> {
    let mut out = Vec::new();
    for (key, want) in &desired.services {
        let service_port = names.name(key, want.kind);
        let family = Family::of(key.addr.ip());
        let have = kernel.get(key);
        out.push(Expected {
            service_port: service_port.clone(),
            entry: key_name(key),
            family,
            present: have.is_some(),
        });
        for addr in want.dests.keys() {
            let present = have.is_some_and(|h| h.dests.contains_key(addr));
            let entry = real_server_name(key, *addr);
            out.push(Expected { service_port: service_port.clone(), entry, family, present });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ipvs::plan::{self, PlanConfig};
    use crate::state::{AppliedState, ServiceEntry};
    use kpx_ipvs_netlink::{Destination, Stats};
    use kpx_proto::v1 as pb;
    use std::collections::BTreeMap;

    fn info(s: Service) -> ServiceInfo {
        ServiceInfo { service: s, stats: Stats::default() }
    }

    fn dest(addr: &str, weight: i32, active: u32, inactive: u32) -> DestinationInfo {
        DestinationInfo {
            dest: Destination::new(addr.parse().unwrap(), weight),
            active_conns: active,
            inactive_conns: inactive,
            persist_conns: 0,
            stats: Stats::default(),
        }
    }

    fn tcp(addr: &str, scheduler: &str) -> Service {
        Service::new(Protocol::Tcp, addr.parse().unwrap(), scheduler)
    }

    #[test]
    fn lines_look_like_ipvsadm() {
        let dump: Dump = vec![
            (info(Service::fwmark(Family::Inet, 5, "rr")), vec![dest("10.244.1.7:80", 1, 0, 0)]),
            (info(Service::new(Protocol::Udp, "[fd00:96::20]:53".parse().unwrap(), "rr")), vec![]),
            (info(tcp("10.96.0.10:80", "lc").with_persistence(10800)), vec![dest("10.244.1.3:8080", 1, 2, 5)]),
            (
                info(tcp("10.96.0.9:443", "rr")),
                vec![dest("10.244.1.3:8443", 0, 1, 0), dest("10.244.1.2:8443", 1, 0, 0)],
            ),
            (info(Service::fwmark(Family::Inet6, 6, "sh")), vec![]),
        ];
        assert_eq!(
            lines(&dump),
            [
                "TCP  10.96.0.9:443 rr",
                "  -> 10.244.1.2:8443  Masq  1  0  0",
                "  -> 10.244.1.3:8443  Masq  0  1  0",
                "TCP  10.96.0.10:80 lc persistent 10800",
                "  -> 10.244.1.3:8080  Masq  1  2  5",
                "UDP  [fd00:96::20]:53 rr",
                "FWM  5 rr",
                "  -> 10.244.1.7:80  Masq  1  0  0",
                "FWM  6 IPv6 sh",
            ]
        );
    }

    fn services() -> Services {
        let web = pb::Service {
            namespace: "demo".into(),
            name: "web".into(),
            cluster_ips: vec!["10.96.0.10".into(), "fd00:96::10".into()],
            ports: vec![pb::ServicePort {
                name: "http".into(),
                protocol: pb::Protocol::Tcp as i32,
                port: 80,
                node_port: 30080,
            }],
            ..Default::default()
        };
        let dns = pb::Service {
            namespace: "kube-system".into(),
            name: "dns".into(),
            cluster_ips: vec!["10.96.0.20".into()],
            ports: vec![pb::ServicePort {
                name: String::new(),
                protocol: pb::Protocol::Udp as i32,
                port: 53,
                node_port: 0,
            }],
            ..Default::default()
        };
        let ep = |service: &str, ip: &str, port: u32, name: &str| pb::Endpoint {
            service: service.into(),
            ip: ip.into(),
            ports: vec![pb::EndpointPort { name: name.into(), port }],
            for_cluster: true,
            for_local: false,
            node_tag: 0,
        };
        let entry = |service: pb::Service, eps: Vec<pb::Endpoint>| {
            std::sync::Arc::new(ServiceEntry {
                service,
                endpoints: eps.into_iter().map(|e| (e.ip.clone(), e)).collect(),
            })
        };
        BTreeMap::from([
            (
                "demo/web".to_string(),
                entry(
                    web,
                    vec![
                        ep("demo/web", "10.244.1.2", 8080, "http"),
                        ep("demo/web", "10.244.1.3", 8080, "http"),
                        ep("demo/web", "fd00:244::2", 8080, "http"),
                    ],
                ),
            ),
            ("kube-system/dns".to_string(), entry(dns, vec![ep("kube-system/dns", "10.244.1.9", 53, "")])),
        ])
    }

    fn desired(services: &Services) -> Desired {
        let cfg = PlanConfig {
            scheduler: "rr".into(),
            node_ips: vec!["192.168.0.10".parse().unwrap()],
            families: vec![Family::Inet, Family::Inet6],
            node_tag: 0,
        };
        plan::desired(&cfg, &AppliedState::from_services(services))
    }

    /// The kernel after kpx programmed all of `d`, as a dump.
    fn programmed(d: &Desired) -> Dump {
        d.services
            .values()
            .map(|s| {
                let dests = s.dests.keys().map(|a| dest(&a.to_string(), 1, 0, 0)).collect();
                (info(s.service.clone()), dests)
            })
            .collect()
    }

    fn summary(e: &[Expected]) -> Vec<String> {
        e.iter().map(|e| format!("{} | {} | {:?} | {}", e.service_port, e.entry, e.family, e.present)).collect()
    }

    #[test]
    fn every_desired_virtual_and_real_server_is_expected_with_its_port_name() {
        let services = services();
        let d = desired(&services);
        let got = expected(&d, &PortNames::new(&services), &plan::table_from(programmed(&d)));
        assert_eq!(
            summary(&got),
            [
                "demo/web:http | TCP  10.96.0.10:80 | Inet | true",
                "demo/web:http | TCP  10.96.0.10:80 -> 10.244.1.2:8080 | Inet | true",
                "demo/web:http | TCP  10.96.0.10:80 -> 10.244.1.3:8080 | Inet | true",
                "demo/web:http | TCP  192.168.0.10:30080 | Inet | true",
                "demo/web:http | TCP  192.168.0.10:30080 -> 10.244.1.2:8080 | Inet | true",
                "demo/web:http | TCP  192.168.0.10:30080 -> 10.244.1.3:8080 | Inet | true",
                "demo/web:http | TCP  [fd00:96::10]:80 | Inet6 | true",
                "demo/web:http | TCP  [fd00:96::10]:80 -> [fd00:244::2]:8080 | Inet6 | true",
                "kube-system/dns | UDP  10.96.0.20:53 | Inet | true",
                "kube-system/dns | UDP  10.96.0.20:53 -> 10.244.1.9:53 | Inet | true",
            ]
        );
    }

    #[test]
    fn missing_virtual_and_real_servers_are_not_present_and_strangers_are_ignored() {
        let services = services();
        let d = desired(&services);
        let mut dump = programmed(&d);
        // Deleted by hand: the DNS virtual server and one real server of web's ClusterIP.
        dump.retain(|(s, _)| s.service.port != 53);
        let web = dump.iter_mut().find(|(s, _)| s.service.socket_addr().to_string() == "10.96.0.10:80").unwrap();
        web.1.retain(|dest| dest.dest.addr.to_string() != "10.244.1.3");
        // Someone else's virtual servers: listed by `lines`, never expected.
        dump.push((info(tcp("10.0.0.1:22", "rr")), vec![]));
        dump.push((info(Service::fwmark(Family::Inet, 5, "rr")), vec![]));
        let got = expected(&d, &PortNames::new(&services), &plan::table_from(dump.clone()));
        let missing: Vec<&str> = got.iter().filter(|e| !e.present).map(|e| e.entry.as_str()).collect();
        assert_eq!(
            missing,
            ["TCP  10.96.0.10:80 -> 10.244.1.3:8080", "UDP  10.96.0.20:53", "UDP  10.96.0.20:53 -> 10.244.1.9:53"]
        );
        assert_eq!(got.len(), 10);
        assert!(lines(&dump).contains(&"TCP  10.0.0.1:22 rr".to_string()));
    }

    #[test]
    fn an_unclaimed_virtual_server_is_named_after_itself() {
        let names = PortNames::default();
        let k = Key { protocol: Protocol::Sctp, addr: "[fd00::1]:9".parse().unwrap() };
        assert_eq!(names.name(&k, VipKind::Cluster), "SCTP  [fd00::1]:9");
        assert_eq!(real_server_name(&k, "[fd00::2]:10".parse().unwrap()), "SCTP  [fd00::1]:9 -> [fd00::2]:10");
    }
}
