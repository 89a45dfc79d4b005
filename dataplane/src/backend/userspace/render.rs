//! Pure rendering of the userspace mode's rules as iptables-restore input, in kube-proxy's
//! userspace layout (the seed's `KUBE-PORTALS-CONTAINER` / `KUBE-PORTALS-HOST` rules):
//!
//! - nat `KUBE-PORTALS-CONTAINER` (from PREROUTING): traffic from pods and from outside is
//!   REDIRECTed to the portal's port, which sends it to the primary address of the interface
//!   it came in on, where the proxy listens on every address;
//! - nat `KUBE-PORTALS-HOST` (from OUTPUT): the node's own traffic is DNATed to the portal on
//!   the loopback address (REDIRECT would do the same for OUTPUT; DNAT says where it goes);
//! - nat `KUBE-NODEPORT-CONTAINER` / `KUBE-NODEPORT-HOST`: node ports, reached through the last
//!   rule of the portal chains for local destinations (or `--node-ip` addresses);
//! - filter `KUBE-PORTALS-FILTER` (from INPUT, FORWARD and OUTPUT, new connections): what no
//!   portal takes is REJECTed or DROPped as the iptables backend does, and a portal's port is
//!   reachable only through the rules above (a direct connection would skip source ranges and
//!   Local policies).
//!
//! Each service's rules are plain lines in these shared chains, so a partial sync deletes the
//! changed services' old lines and adds their new ones (`-D`, then `-I` into the portal chains,
//! ahead of their final node-port jump, `-A` elsewhere).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::plan::{Class, PortPlan, PortalKey, Route, Verdict};
use crate::backend::iptables::jumps::Jump;
use crate::backend::iptables::render::IpFamily;
use crate::backend::iptables::render::check::{self, Cidr};

pub const PORTALS_CONTAINER: &str = "KUBE-PORTALS-CONTAINER";
pub const PORTALS_HOST: &str = "KUBE-PORTALS-HOST";
pub const NODEPORT_CONTAINER: &str = "KUBE-NODEPORT-CONTAINER";
pub const NODEPORT_HOST: &str = "KUBE-NODEPORT-HOST";
pub const PORTALS_FILTER: &str = "KUBE-PORTALS-FILTER";

/// The chains the userspace mode owns, per table (declaring one in a restore flushes it).
pub const NAT_CHAINS: [&str; 4] = [PORTALS_CONTAINER, PORTALS_HOST, NODEPORT_CONTAINER, NODEPORT_HOST];
pub const FILTER_CHAINS: [&str; 1] = [PORTALS_FILTER];

const PORTALS: &str = "kubernetes service portals";

/// The jumps from the built-in chains, in the order they end up in each (first = top).
pub const JUMPS: [Jump; 5] = [
    Jump { table: "filter", chain: "INPUT", new_only: true, comment: PORTALS, target: PORTALS_FILTER },
    Jump { table: "filter", chain: "FORWARD", new_only: true, comment: PORTALS, target: PORTALS_FILTER },
    Jump { table: "filter", chain: "OUTPUT", new_only: true, comment: PORTALS, target: PORTALS_FILTER },
    Jump { table: "nat", chain: "PREROUTING", new_only: false, comment: PORTALS, target: PORTALS_CONTAINER },
    Jump { table: "nat", chain: "OUTPUT", new_only: false, comment: PORTALS, target: PORTALS_HOST },
];

/// The rules of one service in one family; every line is a complete "-A CHAIN ...".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceLines {
    pub nat: Vec<String>,
    pub filter: Vec<String>,
}

/// Where the node's own traffic reaches a portal: DNAT needs an address, and the loopback one
/// always exists.
pub fn loopback(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpFamily::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

fn socket_text(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}:{port}"),
        IpAddr::V6(_) => format!("[{ip}]:{port}"),
    }
}

/// Renders the rules of `ports` (one service, one family); `listening` gives each portal's
/// port. A portal without a port (it could not be opened) gets no rule, and its traffic meets
/// no kpx rule rather than a wrong one.
pub fn render_service(ports: &[PortPlan], listening: &BTreeMap<PortalKey, u16>) -> ServiceLines {
    let mut out = ServiceLines::default();
    for p in ports {
        let port_of = |class: Class| listening.get(&p.portal(class)).copied();
        render_port(p, &port_of, &mut out);
    }
    out
}

fn render_port(p: &PortPlan, port_of: &dyn Fn(Class) -> Option<u16>, out: &mut ServiceLines) {
    let proto = p.proto.as_str();
    let host = p.family.host_suffix();
    let c = |suffix: &str| {
        if suffix.is_empty() { check::comment(&p.name) } else { check::comment(&format!("{} {suffix}", p.name)) }
    };
    let lo = loopback(p.family);
    let redirect = |class: Class| port_of(class).map(|port| format!("-j REDIRECT --to-ports {port}"));
    let dnat = |class: Class| port_of(class).map(|port| format!("-j DNAT --to-destination {}", socket_text(lo, port)));
    let portal = |r: Route| match r {
        Route::Portal(class) => Some(class),
        Route::Filter(_) => None,
    };
    let verdict = |r: Route| match r {
        Route::Portal(_) => None,
        Route::Filter(v) => Some(v),
    };
    // `matches` sit between the comment and the port match, where iptables-save prints them.
    let filter_line = |dst: &str, v: Verdict, matches: &str, dport: u16| {
        let (why, target) = v.text();
        format!("-A {PORTALS_FILTER} {dst}-p {proto} {} {matches}-m {proto} --dport {dport} -j {target}", c(why))
    };

    // Cluster IP.
    let cip = format!("-d {}{host} ", p.cluster_ip);
    let svc = |chain: &str, src: &str, dst: &str, dport: u16, jump: String| {
        format!("-A {chain} {src}{dst}-p {proto} {} -m {proto} --dport {dport} {jump}", c(""))
    };
    if let Some(class) = portal(p.internal) {
        out.nat.extend(redirect(class).map(|j| svc(PORTALS_CONTAINER, "", &cip, p.port, j)));
        out.nat.extend(dnat(class).map(|j| svc(PORTALS_HOST, "", &cip, p.port, j)));
    }
    if let Some(v) = verdict(p.internal) {
        out.filter.push(filter_line(&cip, v, "", p.port));
    }

    // External destinations. Pods (by the pod CIDR) and the node itself go cluster-wide under
    // externalTrafficPolicy Local, as in kube-proxy; everyone else to the external portal.
    let from_cluster = p.external_from_cluster;
    let host_class = from_cluster.or(portal(p.external));
    let externals = p.external_ips.iter().map(|ip| (ip, false)).chain(p.lb_ips.iter().map(|ip| (ip, true)));
    for (ip, is_lb) in externals {
        let dst = format!("-d {ip}{host} ");
        match p.ranges.as_ref().filter(|_| is_lb) {
            None => {
                if let (Some(cl), Some(cidr)) = (from_cluster, &p.cluster_cidr) {
                    let src = format!("-s {cidr} ");
                    out.nat.extend(redirect(cl).map(|j| svc(PORTALS_CONTAINER, &src, &dst, p.port, j)));
                }
                if let Some(class) = portal(p.external) {
                    out.nat.extend(redirect(class).map(|j| svc(PORTALS_CONTAINER, "", &dst, p.port, j)));
                }
                if let Some(class) = host_class {
                    out.nat.extend(dnat(class).map(|j| svc(PORTALS_HOST, "", &dst, p.port, j)));
                }
            }
            Some(ranges) => {
                // Only the listed sources reach the portal; the rest meets the filter's DROP.
                for src in admitted(ranges, p.lb_from_node.then_some(ip), host) {
                    if let Some(class) = portal(p.external) {
                        out.nat.extend(redirect(class).map(|j| svc(PORTALS_CONTAINER, &src, &dst, p.port, j)));
                    }
                    if let Some(class) = host_class {
                        out.nat.extend(dnat(class).map(|j| svc(PORTALS_HOST, &src, &dst, p.port, j)));
                    }
                }
            }
        }
        if let Some(v) = verdict(p.external) {
            out.filter.push(filter_line(&dst, v, "", p.port));
        }
        if is_lb && p.ranges.is_some() {
            out.filter.push(format!(
                "-A {PORTALS_FILTER} {dst}-p {proto} {} -m {proto} --dport {} -j DROP",
                c("traffic not accepted by loadBalancerSourceRanges"),
                p.port
            ));
        }
    }

    // Node port.
    if let Some(np) = p.node_port {
        if let (Some(cl), Some(cidr)) = (from_cluster, &p.cluster_cidr) {
            let src = format!("-s {cidr} ");
            out.nat.extend(redirect(cl).map(|j| svc(NODEPORT_CONTAINER, &src, "", np, j)));
        }
        if let Some(class) = portal(p.external) {
            out.nat.extend(redirect(class).map(|j| svc(NODEPORT_CONTAINER, "", "", np, j)));
        }
        if let Some(class) = host_class {
            out.nat.extend(dnat(class).map(|j| svc(NODEPORT_HOST, "", "", np, j)));
        }
        if let Some(v) = verdict(p.external) {
            out.filter.push(filter_line("", v, "-m addrtype --dst-type LOCAL ", np));
        }
    }

    // The portals' own ports: only through the rules above (they DNAT or REDIRECT).
    // Only to this node's addresses: elsewhere the same port number is someone else's (a pod
    // may well listen on it).
    for port in [Class::Cluster, Class::Local].into_iter().filter_map(port_of) {
        out.filter.push(format!(
            "-A {PORTALS_FILTER} -p {proto} {} -m addrtype --dst-type LOCAL -m {proto} --dport {port} -m conntrack ! --ctstate DNAT -j DROP",
            c("proxy port")
        ));
    }
}

/// The `-s` prefixes of admitted sources: each range (a /0 range written without `-s`, as the
/// kernel keeps it) and, when the node may reach its own LB IP, that IP.
fn admitted(ranges: &[Cidr], lb_self: Option<&IpAddr>, host: &str) -> Vec<String> {
    let mut out: Vec<String> =
        ranges.iter().map(|c| if c.prefix == 0 { String::new() } else { format!("-s {c} ") }).collect();
    out.extend(lb_self.map(|ip| format!("-s {ip}{host} ")));
    out
}

/// The last rules of the portal chains: local destinations (or the `--node-ip` addresses) go
/// on to the node-port chains.
pub fn nodeport_jumps(family: IpFamily, node_ips: &[IpAddr], out: &mut String) {
    let comment =
        "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    let ips: Vec<&IpAddr> = node_ips.iter().filter(|ip| family.matches(**ip)).collect();
    for (from, to) in [(PORTALS_CONTAINER, NODEPORT_CONTAINER), (PORTALS_HOST, NODEPORT_HOST)] {
        if ips.is_empty() {
            let _ = writeln!(out, "-A {from} {comment} -m addrtype --dst-type LOCAL -j {to}");
        }
        for ip in &ips {
            let _ = writeln!(out, "-A {from} -d {ip}{} {comment} -j {to}", family.host_suffix());
        }
    }
}

fn declare(out: &mut String, chain: &str) {
    let _ = writeln!(out, ":{chain} - [0:0]");
}

/// Full restore input: every userspace chain declared (flushed) and refilled, in one
/// transaction per table. `filter_extra` and `nat_extra` go right after the declarations (the
/// canary and the missing jumps from the built-in chains).
pub fn render_full<'a>(
    family: IpFamily,
    node_ips: &[IpAddr],
    services: impl Iterator<Item = &'a ServiceLines> + Clone,
    filter_extra: &str,
    nat_extra: &str,
) -> String {
    let mut out = String::from("*filter\n");
    FILTER_CHAINS.iter().for_each(|c| declare(&mut out, c));
    out.push_str(filter_extra);
    for s in services.clone() {
        s.filter.iter().for_each(|l| {
            out.push_str(l);
            out.push('\n');
        });
    }
    out.push_str("COMMIT\n*nat\n");
    NAT_CHAINS.iter().for_each(|c| declare(&mut out, c));
    out.push_str(nat_extra);
    for s in services {
        s.nat.iter().for_each(|l| {
            out.push_str(l);
            out.push('\n');
        });
    }
    nodeport_jumps(family, node_ips, &mut out);
    out.push_str("COMMIT\n");
    out
}

/// Incremental input for `--noflush`: for each (old, new) pair that differs, every old line is
/// deleted and every new one added. A service's lines keep their order: in the portal chains
/// they are inserted at the top (ahead of the node-port jump) one by one, so in reverse.
/// Empty when nothing changed.
pub fn render_partial<'a>(changed: impl Iterator<Item = (&'a ServiceLines, &'a ServiceLines)>) -> String {
    let (mut filter, mut nat_del, mut nat_add) = (String::new(), String::new(), String::new());
    for (old, new) in changed.filter(|(o, n)| o != n) {
        old.filter.iter().for_each(|l| op(&mut filter, "-D", l));
        new.filter.iter().for_each(|l| op(&mut filter, "-A", l));
        old.nat.iter().for_each(|l| op(&mut nat_del, "-D", l));
        new.nat.iter().filter(|l| !in_portal_chain(l)).for_each(|l| op(&mut nat_add, "-A", l));
        new.nat.iter().rev().filter(|l| in_portal_chain(l)).for_each(|l| op(&mut nat_add, "-I", l));
    }
    let mut out = String::new();
    if !filter.is_empty() {
        let _ = write!(out, "*filter\n{filter}COMMIT\n");
    }
    if !(nat_del.is_empty() && nat_add.is_empty()) {
        let _ = write!(out, "*nat\n{nat_del}{nat_add}COMMIT\n");
    }
    out
}

fn in_portal_chain(line: &str) -> bool {
    [PORTALS_CONTAINER, PORTALS_HOST]
        .iter()
        .any(|c| line.strip_prefix("-A ").is_some_and(|r| r.starts_with(&format!("{c} "))))
}

/// "-A CHAIN rest" as "<op> CHAIN rest".
fn op(out: &mut String, op: &str, line: &str) {
    out.push_str(op);
    out.push_str(line.strip_prefix("-A").unwrap_or(line));
    out.push('\n');
}

#[cfg(test)]
mod tests;
