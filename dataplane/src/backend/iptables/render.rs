//! Pure rendering of iptables-restore input (no I/O), in kube-proxy's chain layout.
//!
//! A full sync rewrites every kpx chain. A partial sync rewrites only the chains of the
//! changed services and edits the shared top-level chains (KUBE-SERVICES, KUBE-NODEPORTS and
//! the filter chains) with targeted `-I`/`-A`/`-D` lines, because on legacy iptables the cost
//! of a restore follows the size of the input: with 10k services, rewriting KUBE-SERVICES
//! for a one-endpoint change is what makes kube-proxy's syncs slow.
//! Endpoint-only changes therefore never touch the top-level chains.

pub mod check;
mod service;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::chains::{self, MASQ_MARK};
use crate::state::{AppliedState, ChangeSet, Services};
pub use service::render_service;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { IpFamily::V4 } else { IpFamily::V6 }
    }

    pub fn matches(self, ip: IpAddr) -> bool {
        IpFamily::of(ip) == self
    }

    fn bits(self) -> u8 {
        match self {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        }
    }

    pub(crate) fn host_suffix(self) -> &'static str {
        match self {
            IpFamily::V4 => "/32",
            IpFamily::V6 => "/128",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RenderConfig {
    pub family: IpFamily,
    /// The pod CIDR: traffic from outside it to a cluster IP is masqueraded.
    pub cluster_cidr: Option<String>,
    pub masquerade_all: bool,
    /// Addresses that accept NodePorts; empty means every local address.
    pub node_ips: Vec<IpAddr>,
    pub node_name: String,
    /// Node ports also answer on 127.0.0.1 (kube-proxy's `localhostNodePorts`, IPv4 only):
    /// with `route_localnet` set, KUBE-FIREWALL drops outside traffic to 127.0.0.0/8 that no
    /// rule DNATed.
    pub localhost_node_ports: bool,
}

impl RenderConfig {
    /// Whether the KUBE-FIREWALL chain and its jumps are kpx's to keep: localhost node ports
    /// on, IPv4, and node ports on every local address or on a loopback one (as kube-proxy
    /// decides it from nodePortAddresses).
    pub fn localnet_firewall(&self) -> bool {
        self.localhost_node_ports
            && self.family == IpFamily::V4
            && (self.node_ips.is_empty() || self.node_ips.iter().any(|ip| ip.is_ipv4() && ip.is_loopback()))
    }
}

/// The rules of one service (all its ports). Every line is a complete "-A CHAIN ..." rule.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceRules {
    /// nat: its KUBE-SVC/SVL/EXT/FW/SEP chains with their rules, in order.
    pub chains: Vec<(String, Vec<String>)>,
    /// nat KUBE-SERVICES.
    pub services_lines: Vec<String>,
    /// nat KUBE-NODEPORTS.
    pub nodeports_lines: Vec<String>,
    /// filter KUBE-SERVICES / KUBE-EXTERNAL-SERVICES / KUBE-PROXY-FIREWALL / KUBE-NODEPORTS.
    pub filter_lines: Vec<String>,
    /// Why parts of the service were left out (malformed addresses, ports, ...).
    pub skipped: Vec<String>,
}

/// What the last successful sync installed: the service entries it rendered (shared with the
/// applied state, copy on write), from which a partial sync renders a changed service's old
/// rules again to delete exactly those. Entries rather than rendered text, which is about ten
/// times larger (45 MiB at 10k services / 100k endpoints), so the agent stays small; rendering
/// one service again costs tens of microseconds, once per change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PreviousRules {
    services: Services,
}

impl PreviousRules {
    /// What `render_full` installs for `state`.
    pub fn from_state(state: &AppliedState) -> Self {
        PreviousRules { services: state.services().clone() }
    }

    /// Records a successful sync of `changes` (call after the restore succeeded).
    pub fn update(&mut self, state: &AppliedState, changes: &ChangeSet) {
        if changes.full {
            *self = PreviousRules::from_state(state);
            return;
        }
        for k in &changes.services {
            match state.services().get(k) {
                Some(e) => self.services.insert(k.clone(), e.clone()),
                None => self.services.remove(k),
            };
        }
    }

    /// The rules installed for the service `key` (none if it was not installed).
    pub fn rules_of(&self, cfg: &RenderConfig, key: &str) -> ServiceRules {
        self.services.get(key).map(|e| render_service(cfg, e)).unwrap_or_default()
    }

    /// The keys of the services installed.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.services.keys()
    }

    /// Every per-service chain installed (renders every service: for tests and tools).
    pub fn chains(&self, cfg: &RenderConfig) -> BTreeSet<String> {
        self.services.values().flat_map(|e| render_service(cfg, e).chains.into_iter().map(|(c, _)| c)).collect()
    }
}

fn push(out: &mut String, line: &str) {
    out.push_str(line);
    out.push('\n');
}

fn declare(out: &mut String, chain: &str) {
    out.push(':');
    out.push_str(chain);
    out.push_str(" - [0:0]\n");
}

/// Turns "-A CHAIN rest" into "<op> CHAIN rest".
fn with_op(out: &mut String, op: &str, line: &str) {
    out.push_str(op);
    out.push_str(line.strip_prefix("-A").unwrap_or(line));
    out.push('\n');
}

/// KUBE-FORWARD as kube-proxy 1.28 writes it. The INVALID drop is its unconditional 1.28
/// form (later versions leave it out when nf_conntrack_tcp_be_liberal is set, where the
/// kernel no longer marks out-of-window TCP packets INVALID and the rule drops nothing).
pub const FORWARD_RULES: [&str; 3] = [
    "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
    "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT",
    "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
];

/// With `route_localnet` on, the kernel accepts packets for 127.0.0.0/8 from any interface;
/// only those DNATed by a node port rule (or replies) may pass (kubernetes#90259).
pub const LOCALNET_RULE: &str = "-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP";

/// Full iptables-restore input for the filter and nat tables, written into `out` (cleared
/// first). Returns the skip reasons of malformed entries.
///
/// Services are rendered one at a time and dropped as soon as their lines are copied out:
/// holding every `ServiceRules` (over 300k small strings for 10k services) and freeing them
/// all at the end cost almost as much as rendering them. The per-service chains, most of
/// the text, go straight into `out`; the smaller sections that precede them are built on the
/// side and inserted in front at the end.
pub fn render_full(cfg: &RenderConfig, state: &AppliedState, out: &mut String) -> Vec<String> {
    out.clear();
    let (mut filter, mut decl, mut services, mut nodeports) =
        (String::new(), String::new(), String::new(), String::new());
    let mut skipped = Vec::new();
    for entry in state.services().values() {
        let r = render_service(cfg, entry);
        r.filter_lines.iter().for_each(|l| push(&mut filter, l));
        r.services_lines.iter().for_each(|l| push(&mut services, l));
        r.nodeports_lines.iter().for_each(|l| push(&mut nodeports, l));
        for (chain, lines) in &r.chains {
            declare(&mut decl, chain);
            lines.iter().for_each(|l| push(out, l));
        }
        skipped.extend(r.skipped);
    }

    let mut head = String::with_capacity(filter.len() + decl.len() + services.len() + nodeports.len() + 4096);
    let h = &mut head;
    push(h, "*filter");
    for c in [chains::SERVICES, chains::EXTERNAL_SERVICES, chains::FORWARD, chains::NODEPORTS, chains::PROXY_FIREWALL] {
        declare(h, c);
    }
    let firewall = cfg.localnet_firewall();
    if firewall {
        declare(h, chains::FIREWALL);
    }
    FORWARD_RULES.iter().for_each(|l| push(h, l));
    if firewall {
        push(h, LOCALNET_RULE);
    }
    h.push_str(&filter);
    push(h, "COMMIT");

    push(h, "*nat");
    for c in [chains::SERVICES, chains::NODEPORTS, chains::POSTROUTING, chains::MARK_MASQ] {
        declare(h, c);
    }
    // Declared in name order, as iptables-save prints them: libiptc keeps its chains in a
    // sorted list and inserts a chain that sorts last at the tail, but walks the list for any
    // other. In hash order (services come in key order, their chain names are hashes) a
    // legacy restore of 10k services / 100k endpoints took 30-40% more user time in a fresh
    // namespace, the same rules otherwise (docs/performance.md, "Agent memory and cold start").
    let mut declared: Vec<&str> = decl.lines().collect();
    declared.sort_unstable();
    declared.iter().for_each(|l| push(h, l));
    push(h, &format!("-A {} -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN", chains::POSTROUTING));
    push(h, &format!("-A {} -j MARK --xor-mark {MASQ_MARK}", chains::POSTROUTING));
    push(
        h,
        &format!(
            "-A {} -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
            chains::POSTROUTING
        ),
    );
    push(h, &format!("-A {} -j MARK --or-mark {MASQ_MARK}", chains::MARK_MASQ));
    h.push_str(&services);
    nodeports_jumps(cfg, h);
    h.push_str(&nodeports);
    out.insert_str(0, &head);
    push(out, "COMMIT");
    skipped
}

/// The last rules of KUBE-SERVICES: hand node-local destinations to KUBE-NODEPORTS.
fn nodeports_jumps(cfg: &RenderConfig, out: &mut String) {
    let comment =
        "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    let ips: Vec<&IpAddr> = cfg.node_ips.iter().filter(|ip| cfg.family.matches(**ip)).collect();
    if ips.is_empty() {
        push(out, &format!("-A {} {comment} -m addrtype --dst-type LOCAL -j {}", chains::SERVICES, chains::NODEPORTS));
    }
    for ip in ips {
        push(
            out,
            &format!("-A {} -d {ip}{} {comment} -j {}", chains::SERVICES, cfg.family.host_suffix(), chains::NODEPORTS),
        );
    }
}

/// Incremental input for `iptables-restore --noflush`, written into `out` (cleared first):
/// the chains of the services in `changes` are re-declared (which flushes them) and refilled,
/// chains that went away are flushed then deleted, and the top-level chains get only the
/// lines that appeared (`-I` into KUBE-SERVICES, ahead of the final KUBE-NODEPORTS jump;
/// `-A` elsewhere) or disappeared (`-D`). A full change set renders a full sync.
pub fn render_partial(
    cfg: &RenderConfig,
    state: &AppliedState,
    changes: &ChangeSet,
    previous: &PreviousRules,
    out: &mut String,
) -> Vec<String> {
    if changes.full {
        return render_full(cfg, state, out);
    }
    out.clear();
    let (mut filter, mut decl, mut dels, mut rules, mut adds, mut gone) =
        (String::new(), String::new(), String::new(), String::new(), String::new(), String::new());
    let mut skipped = Vec::new();
    for key in &changes.services {
        let new = state.services().get(key).map(|e| render_service(cfg, e)).unwrap_or_default();
        let old = &previous.rules_of(cfg, key);
        for (chain, lines) in &new.chains {
            declare(&mut decl, chain);
            lines.iter().for_each(|l| push(&mut rules, l));
        }
        let kept: BTreeSet<&str> = new.chains.iter().map(|(c, _)| c.as_str()).collect();
        for (chain, _) in old.chains.iter().filter(|(c, _)| !kept.contains(c.as_str())) {
            // Flushed first so that no chain being deleted still jumps to another one.
            declare(&mut decl, chain);
            push(&mut gone, &format!("-X {chain}"));
        }
        diff(&old.services_lines, &new.services_lines, "-I", &mut dels, &mut adds);
        diff(&old.nodeports_lines, &new.nodeports_lines, "-A", &mut dels, &mut adds);
        let mut filter_adds = String::new();
        diff(&old.filter_lines, &new.filter_lines, "-A", &mut filter, &mut filter_adds);
        filter.push_str(&filter_adds);
        skipped.extend(new.skipped);
    }
    if !filter.is_empty() {
        push(out, "*filter");
        out.push_str(&filter);
        push(out, "COMMIT");
    }
    if !(decl.is_empty() && dels.is_empty() && adds.is_empty()) {
        push(out, "*nat");
        for part in [&decl, &dels, &rules, &adds, &gone] {
            out.push_str(part);
        }
        push(out, "COMMIT");
    }
    skipped
}

/// Lines only in `old` become `-D` into `dels`; lines only in `new` become `add_op` into `adds`.
fn diff(old: &[String], new: &[String], add_op: &str, dels: &mut String, adds: &mut String) {
    let (o, n): (BTreeSet<&String>, BTreeSet<&String>) = (old.iter().collect(), new.iter().collect());
    old.iter().filter(|l| !n.contains(l)).for_each(|l| with_op(dels, "-D", l));
    new.iter().filter(|l| !o.contains(l)).for_each(|l| with_op(adds, add_op, l));
}
