//! The rules of one service, port by port, in kube-proxy's layout:
//!
//! KUBE-SERVICES --cluster IP--> KUBE-SVC (or KUBE-SVL for internalTrafficPolicy Local)
//! KUBE-SERVICES --external/LB IP--> [KUBE-FW -->] KUBE-EXT --> KUBE-SVC or KUBE-SVL
//! KUBE-NODEPORTS --node port--> KUBE-EXT
//! KUBE-SVC/SVL --random--> KUBE-SEP --> DNAT
//!
//! Traffic that no chain DNATs meets the filter table: REJECT when the service has no
//! endpoints anywhere (in the family rendered), DROP when a Local policy (internal for the
//! cluster IP, external for the rest) leaves this node without endpoints while the service has
//! some elsewhere (the node's endpoints, or the Service's `families_with_endpoints`, say so).

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt::Write;
use std::net::IpAddr;
use std::sync::OnceLock;

use kpx_proto::v1 as pb;

use super::check::{self, Cidr};
use super::{IpFamily, RenderConfig, ServiceRules};
use crate::backend::iptables::chains::{self, MARK_MASQ, PortChains};
use crate::backend::policy;
use crate::state::ServiceEntry;

/// The addresses of one service in the family being rendered, validated.
struct Addrs {
    cluster: IpAddr,
    external: Vec<IpAddr>,
    lb: Vec<IpAddr>,
    /// `Some` when source ranges apply (fail closed: ranges that were all invalid allow nothing).
    ranges: Option<Vec<Cidr>>,
    cluster_cidr: Option<Cidr>,
}

struct Ep {
    /// "ip:port" or "[ip]:port", the address printed canonically.
    addr: String,
    chain: String,
    /// Its comment in the policy chains (`-m comment --comment "NAME -> ADDR"`).
    comment: String,
    cluster: bool,
    local: bool,
}

impl Ep {
    /// The address part of `addr` (printing an address is costly enough to do it once).
    fn ip_text(&self) -> &str {
        let host = self.addr.rsplit_once(':').map_or(self.addr.as_str(), |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// ` -m statistic --mode random --probability P` for the first of `left` endpoints, P = 1/left.
/// Formatting a float with a precision is slow and the values repeat from service to
/// service, so the common ones are formatted once.
fn probability(left: usize) -> Cow<'static, str> {
    static COMMON: OnceLock<Vec<String>> = OnceLock::new();
    let format = |n: usize| format!(" -m statistic --mode random --probability {:.10}", 1.0 / n as f64);
    match COMMON.get_or_init(|| (0..=256).map(format).collect()).get(left) {
        Some(p) => Cow::Borrowed(p.as_str()),
        None => Cow::Owned(format(left)),
    }
}

/// Renders the rules of one service (all its ports) for `cfg.family`. A service without a
/// cluster IP of that family renders nothing: it belongs to the other family's renderer.
pub fn render_service(cfg: &RenderConfig, entry: &ServiceEntry) -> ServiceRules {
    let mut r = ServiceRules::default();
    let s = &entry.service;
    let Some(addrs) = addrs(cfg, s, &mut r.skipped) else { return r };
    let svc_name = format!("{}/{}", s.namespace, s.name);
    if s.name.contains(':') {
        // The chain names hash "NAMESPACE/NAME:PORT": with a ':' in its name, a service could
        // write into the chains of another service's port (Kubernetes names never hold one).
        r.skipped.push(format!("{}: invalid name (':' in a service name)", check::printable(&svc_name)));
        return r;
    }
    // Ports already rendered: a second port of the same name and protocol would share their
    // chains (Kubernetes port names are unique).
    let mut rendered = HashSet::new();
    let mut ok_ports = Vec::new();
    for port in &s.ports {
        let result = if rendered.contains(&(port.name.as_str(), port.protocol())) {
            Err("duplicate port name".to_string())
        } else {
            render_port(cfg, entry, &addrs, &svc_name, port, &mut r)
        };
        match result {
            Ok(()) => {
                rendered.insert((port.name.as_str(), port.protocol()));
                ok_ports.push(port);
            }
            Err(e) => {
                r.skipped.push(format!("{}: port {:?}: {e}", check::printable(&svc_name), check::printable(&port.name)))
            }
        }
    }
    if s.session_affinity_timeout_seconds > MAX_AFFINITY_SECONDS {
        r.skipped.push(format!(
            "{}: session affinity timeout {} capped at {MAX_AFFINITY_SECONDS} seconds",
            check::printable(&svc_name),
            s.session_affinity_timeout_seconds
        ));
    }
    if s.external_policy_local && s.health_check_node_port != 0 {
        // One ACCEPT per rendered port, as kube-proxy writes it (same port, one comment each).
        match check::port(s.health_check_node_port, "health check node port") {
            Ok(hc) => {
                for port in ok_ports {
                    let name =
                        if port.name.is_empty() { svc_name.clone() } else { format!("{svc_name}:{}", port.name) };
                    r.filter_lines.push(format!(
                        "-A {} -p tcp {} -m tcp --dport {hc} -j ACCEPT",
                        chains::NODEPORTS,
                        check::comment(&format!("{name} health check node port"))
                    ));
                }
            }
            Err(e) => r.skipped.push(format!("{}: {e}", check::printable(&svc_name))),
        }
    }
    r
}

/// Kubernetes' longest ClientIP affinity. Longer ones are capped: xt_recent keeps `--seconds`
/// as a u32 that the kernel multiplies by HZ (it wraps past about 49 days at HZ=1000), and
/// iptables-save prints values past i32::MAX as negative numbers.
const MAX_AFFINITY_SECONDS: u32 = 86400;

/// The session affinity timeout of `s`, if it has affinity.
fn affinity_seconds(s: &pb::Service) -> Option<u32> {
    (s.session_affinity_timeout_seconds > 0).then(|| s.session_affinity_timeout_seconds.min(MAX_AFFINITY_SECONDS))
}

/// Parses the addresses of `family`; invalid ones are reported, the other family's ignored,
/// repeated ones (however written) kept once.
fn of_family(family: IpFamily, list: &[String], skipped: &mut Vec<String>) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for a in list {
        match check::ip(a) {
            Ok(ip) if family.matches(ip) && !out.contains(&ip) => out.push(ip),
            Ok(_) => {}
            Err(e) => skipped.push(e),
        }
    }
    out
}

fn addrs(cfg: &RenderConfig, s: &pb::Service, skipped: &mut Vec<String>) -> Option<Addrs> {
    let mut local_skips = Vec::new();
    let real_ips: Vec<String> = s.cluster_ips.iter().filter(|ip| !ip.is_empty() && *ip != "None").cloned().collect();
    let Some(cluster) = of_family(cfg.family, &real_ips, &mut local_skips).first().copied() else {
        // Without a cluster IP of this family the service is the other family's, unless none
        // of its cluster IPs is an address: then no family renders it, and each says why.
        if local_skips.len() == real_ips.len() {
            let name = check::printable(&format!("{}/{}", s.namespace, s.name));
            skipped.extend(local_skips.into_iter().map(|e| format!("{name}: cluster IP: {e}")));
        }
        return None;
    };
    let external = of_family(cfg.family, &s.external_ips, &mut local_skips);
    let lb = of_family(cfg.family, &s.load_balancer_ips, &mut local_skips);
    let mut ranges = Vec::new();
    let mut invalid_range = false;
    for r in &s.load_balancer_source_ranges {
        match Cidr::parse(r) {
            Ok(c) if c.family() == cfg.family => ranges.push(c),
            Ok(_) => {}
            Err(e) => {
                invalid_range = true;
                local_skips.push(e);
            }
        }
    }
    let cluster_cidr =
        cfg.cluster_cidr.as_deref().and_then(|c| Cidr::parse(c).ok()).filter(|c| c.family() == cfg.family);
    let name = check::printable(&format!("{}/{}", s.namespace, s.name));
    skipped.extend(local_skips.into_iter().map(|e| format!("{name}: {e}")));
    let ranges = (!ranges.is_empty() || invalid_range).then_some(ranges);
    Some(Addrs { cluster, external, lb, ranges, cluster_cidr })
}

/// The endpoints of `port` in `family`. Invalid ones (of either family) are dropped and
/// reported in `skipped`; validating and collecting in one pass parses every address once.
fn endpoints(
    entry: &ServiceEntry,
    family: IpFamily,
    port: &pb::ServicePort,
    name: &str,
    proto: &str,
    skipped: &mut Vec<String>,
) -> Vec<Ep> {
    let mut out = Vec::new();
    // Some address is not written as printed ("fd00:0::1"): it may be another entry's.
    let mut rewritten = false;
    for e in entry.endpoints.values() {
        let ip = match check::ip(&e.ip) {
            Ok(ip) => ip,
            Err(err) => {
                skipped.push(format!("{}: endpoint: {err}", check::printable(name)));
                continue;
            }
        };
        let Some(p) = e.ports.iter().find(|p| p.name == port.name) else { continue };
        let p = match check::port(p.port, "endpoint port") {
            Ok(p) => p,
            Err(err) => {
                skipped.push(format!("{}: endpoint {}: {err}", check::printable(name), check::printable(&e.ip)));
                continue;
            }
        };
        if !family.matches(ip) {
            continue;
        }
        let addr = match ip {
            IpAddr::V4(_) => format!("{ip}:{p}"),
            IpAddr::V6(_) => format!("[{ip}]:{p}"),
        };
        let chain = chains::endpoint_chain(name, proto, &addr);
        let comment = check::comment(&format!("{name} -> {addr}"));
        let ep = Ep { addr, chain, comment, cluster: e.for_cluster, local: e.for_local };
        rewritten |= ep.ip_text() != e.ip;
        out.push(ep);
    }
    // kube-proxy orders a port's endpoints by "ip:port" text, which differs from the state's
    // order by IP text when one address is a prefix of another ("10.0.0.1:80" sorts after
    // "10.0.0.10:80"): the same order gives the same probabilities to the same endpoints.
    if !out.is_sorted_by(|a, b| a.addr <= b.addr) {
        out.sort_by(|a, b| a.addr.cmp(&b.addr));
    }
    if rewritten {
        // The same address written two ways ("fd00::1", "fd00:0::1") is two entries of the
        // state but one KUBE-SEP chain: the first is kept.
        let mut seen = HashSet::new();
        out.retain(|ep| {
            let first = seen.insert(ep.addr.clone());
            if !first {
                skipped.push(format!("{}: endpoint {}: duplicate address", check::printable(name), ep.addr));
            }
            first
        });
    }
    out
}

fn render_port(
    cfg: &RenderConfig,
    entry: &ServiceEntry,
    a: &Addrs,
    svc_name: &str,
    port: &pb::ServicePort,
    r: &mut ServiceRules,
) -> Result<(), String> {
    let s = &entry.service;
    let proto = match port.protocol() {
        pb::Protocol::Tcp => "tcp",
        pb::Protocol::Udp => "udp",
        pb::Protocol::Sctp => "sctp",
        pb::Protocol::Unspecified => return Err("no protocol".into()),
    };
    let p = check::port(port.port, "port")?;
    let node_port = if port.node_port == 0 { None } else { Some(check::port(port.node_port, "node port")?) };
    let name = if port.name.is_empty() { svc_name.to_string() } else { format!("{svc_name}:{}", port.name) };
    let eps = endpoints(entry, cfg.family, port, &name, proto, &mut r.skipped);
    let ch = PortChains::new(&name, proto);
    let host = cfg.family.host_suffix();
    let (itp, etp) = (s.internal_policy_local, s.external_policy_local);
    let has_ext = node_port.is_some() || !a.external.is_empty() || !a.lb.is_empty();
    let d = policy::decide(s, cfg.family, eps.iter().any(|e| e.cluster), eps.iter().any(|e| e.local), has_ext);
    let (svc_used, svl_used, ext_used) = (d.cluster_used, d.local_used, d.external_used);
    let chain = |set: policy::Set| match set {
        policy::Set::Cluster => &ch.svc,
        policy::Set::Local => &ch.svl,
    };
    let (internal, external) = (d.internal.map(chain), d.external.map(chain));
    let fw_used = ext_used && a.ranges.is_some() && !a.lb.is_empty();
    // Under a Local policy this node only receives its own endpoints (and cluster ones when
    // some traffic is routed cluster-wide), so "none here" is told from "none anywhere" by the
    // controlplane's per-family hint, as kube-proxy drops the former and rejects the latter.
    let exists_elsewhere = d.exists_elsewhere;
    // What filter does with traffic no chain DNATs: (comment suffix, verdict).
    let no_local = ("has no local endpoints", "DROP");
    let no_endpoints = ("has no endpoints", "REJECT");
    let int_verdict = if itp && exists_elsewhere { no_local } else { no_endpoints };
    let ext_verdict = match external {
        Some(_) => None,
        None if etp && exists_elsewhere => Some(no_local),
        None => Some(no_endpoints),
    };
    let c = check::comment;
    let dport = |n: u16| format!("-m {proto} --dport {n}");
    let mut masq_rule = None;

    // Cluster IP.
    let cip = format!("-d {}{host} -p {proto}", a.cluster);
    match internal {
        Some(t) => {
            r.services_lines.push(format!(
                "-A {} {cip} {} {} -j {t}",
                chains::SERVICES,
                c(&format!("{name} cluster IP")),
                dport(p)
            ));
            let src = if cfg.masquerade_all {
                Some(String::new())
            } else {
                a.cluster_cidr.as_ref().map(|c| format!("! -s {c} "))
            };
            masq_rule = src.map(|src| {
                format!("-A {t} {src}{cip} {} {} -j {MARK_MASQ}", c(&format!("{name} cluster IP")), dport(p))
            });
        }
        None => {
            let (why, verdict) = int_verdict;
            r.filter_lines.push(format!(
                "-A {} {cip} {} {} -j {verdict}",
                chains::SERVICES,
                c(&format!("{name} {why}")),
                dport(p)
            ))
        }
    }

    // External IPs, load-balancer IPs, node port.
    let externals = a
        .external
        .iter()
        .map(|ip| (ip, "external IP", &ch.ext))
        .chain(a.lb.iter().map(|ip| (ip, "loadbalancer IP", if fw_used { &ch.fw } else { &ch.ext })));
    for (ip, what, target) in externals {
        let d = format!("-d {ip}{host} -p {proto}");
        if ext_used {
            r.services_lines.push(format!(
                "-A {} {d} {} {} -j {target}",
                chains::SERVICES,
                c(&format!("{name} {what}")),
                dport(p)
            ));
        }
        if let Some((why, verdict)) = ext_verdict {
            r.filter_lines.push(format!(
                "-A {} {d} {} {} -j {verdict}",
                chains::EXTERNAL_SERVICES,
                c(&format!("{name} {why}")),
                dport(p)
            ));
        }
        // Like kube-proxy, only while the KUBE-FW chain is in use: without endpoints the
        // filter rules above reject the traffic anyway.
        if fw_used && what == "loadbalancer IP" {
            r.filter_lines.push(format!(
                "-A {} {d} {} {} -j DROP",
                chains::PROXY_FIREWALL,
                c(&format!("{name} traffic not accepted by {}", ch.fw)),
                dport(p)
            ));
        }
    }
    if let Some(np) = node_port {
        if ext_used {
            r.nodeports_lines.push(format!(
                "-A {} -p {proto} {} {} -j {}",
                chains::NODEPORTS,
                c(&name),
                dport(np),
                ch.ext
            ));
        }
        if let Some((why, verdict)) = ext_verdict {
            r.filter_lines.push(format!(
                "-A {} -p {proto} {} -m addrtype --dst-type LOCAL {} -j {verdict}",
                chains::EXTERNAL_SERVICES,
                c(&format!("{name} {why}")),
                dport(np)
            ));
        }
    }

    // Per-port chains.
    let policy_chain = |chain: &String, pick: fn(&Ep) -> bool, masq: Option<String>| {
        let mut rules: Vec<String> = masq.into_iter().collect();
        let chosen: Vec<&Ep> = eps.iter().filter(|e| pick(e)).collect();
        if let Some(seconds) = affinity_seconds(s) {
            for e in &chosen {
                rules.push(format!(
                    "-A {chain} {} -m recent --name {} --rcheck --seconds {seconds} --reap -j {}",
                    e.comment, e.chain, e.chain
                ));
            }
        }
        for (i, e) in chosen.iter().enumerate() {
            let left = chosen.len() - i;
            // One buffer per rule (writing to a String cannot fail).
            let mut rule = format!("-A {chain} {}", e.comment);
            if left > 1 {
                rule.push_str(&probability(left));
            }
            let _ = write!(rule, " -j {}", e.chain);
            rules.push(rule);
        }
        (chain.clone(), rules)
    };
    if svc_used {
        let masq = if internal == Some(&ch.svc) { masq_rule.take() } else { None };
        r.chains.push(policy_chain(&ch.svc, |e| e.cluster, masq));
    }
    if svl_used {
        let masq = if internal == Some(&ch.svl) { masq_rule.take() } else { None };
        r.chains.push(policy_chain(&ch.svl, |e| e.local, masq));
    }
    if ext_used {
        let mut rules = Vec::new();
        if !etp {
            rules.push(format!(
                "-A {} {} -j {MARK_MASQ}",
                ch.ext,
                c(&format!("masquerade traffic for {name} external destinations"))
            ));
        } else if svc_used {
            if let Some(cidr) = &a.cluster_cidr {
                rules.push(format!(
                    "-A {} -s {cidr} {} -j {}",
                    ch.ext,
                    c(&format!("pod traffic for {name} external destinations")),
                    ch.svc
                ));
            }
            rules.push(format!(
                "-A {} {} -m addrtype --src-type LOCAL -j {MARK_MASQ}",
                ch.ext,
                c(&format!("masquerade LOCAL traffic for {name} external destinations"))
            ));
            rules.push(format!(
                "-A {} {} -m addrtype --src-type LOCAL -j {}",
                ch.ext,
                c(&format!("route LOCAL traffic for {name} external destinations")),
                ch.svc
            ));
        }
        if let Some(t) = external {
            rules.push(format!("-A {} -j {t}", ch.ext));
        }
        r.chains.push((ch.ext.clone(), rules));
    }
    if fw_used {
        let ranges = a.ranges.as_deref().unwrap_or_default();
        let lb_comment = c(&format!("{name} loadbalancer IP"));
        // A /0 range matches any source: written without `-s`, as the kernel keeps it.
        let src = |cidr: &Cidr| if cidr.prefix == 0 { String::new() } else { format!("-s {cidr} ") };
        let mut rules: Vec<String> =
            ranges.iter().map(|cidr| format!("-A {} {}{lb_comment} -j {}", ch.fw, src(cidr), ch.ext)).collect();
        // A node reaching its own LB IP loops back with that IP as source (kube-proxy's
        // "allowFromNode"): let it through when the ranges admit this node.
        if ranges.iter().any(|cidr| cfg.node_ips.iter().any(|ip| cidr.contains(*ip))) {
            rules.extend(a.lb.iter().map(|ip| format!("-A {} -s {ip}{host} {lb_comment} -j {}", ch.fw, ch.ext)));
        }
        rules.push(format!(
            "-A {} {}",
            ch.fw,
            c(&format!("other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL"))
        ));
        r.chains.push((ch.fw.clone(), rules));
    }
    let affinity = affinity_seconds(s).is_some();
    let sep_comment = c(&name);
    for e in eps.iter().filter(|e| (e.cluster && svc_used) || (e.local && svl_used)) {
        let recent = if affinity { format!(" -m recent --name {} --set", e.chain) } else { String::new() };
        let rules = vec![
            format!("-A {} -s {}{host} {sep_comment} -j {MARK_MASQ}", e.chain, e.ip_text()),
            format!("-A {} -p {proto} {sep_comment}{recent} -m {proto} -j DNAT --to-destination {}", e.chain, e.addr),
        ];
        r.chains.push((e.chain.clone(), rules));
    }
    Ok(())
}
