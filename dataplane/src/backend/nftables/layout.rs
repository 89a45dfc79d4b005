//! kube-proxy's nftables layout: the table's fixed objects (base chains, helper chains, the
//! shared sets and verdict maps) and the [`Objects`] type every service adds to. [`Objects`]
//! is what kpx wants; [`Lowered`] is the same in the kernel's terms (expressions, element
//! bytes), the form that is diffed and compared with a dump. The endpoint maps that replace
//! kube-proxy's endpoint chains are in `endpoints`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kpx_nft_netlink::consts::{NFT_DATA_VERDICT, NFT_SET_EVAL, NFT_SET_INTERVAL, NFT_SET_MAP, NFT_SET_TIMEOUT};
use kpx_nft_netlink::{Element, Expr, Hook, Set, Verdict};

use super::endpoints::HAIRPIN;
use super::stmt::{RuleSpec, Stmt, proto_name};
use crate::backend::iptables::render::check::Cidr;
use crate::backend::iptables::render::{IpFamily, RenderConfig};

pub const TABLE: &str = "kube-proxy";
pub const TABLE_COMMENT: &str = "rules for kube-proxy";

pub const CLUSTER_IPS: &str = "cluster-ips";
pub const NODEPORT_IPS: &str = "nodeport-ips";
pub const SERVICE_IPS: &str = "service-ips";
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
pub const FIREWALL_IPS: &str = "firewall-ips";

pub const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
pub const REJECT_CHAIN: &str = "reject-chain";

/// A set key: an address, an address . protocol . port, a protocol . port, a range of an
/// endpoint map's numgen values, or a pair of addresses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Addr(IpAddr),
    AddrProtoPort(IpAddr, u8, u16),
    ProtoPort(u8, u16),
    /// `lo-hi` (inclusive).
    Range(u32, u32),
    Pair(IpAddr, IpAddr),
}

/// What a map element maps its key to: a verdict, or (endpoint maps) an address . port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Val {
    Verdict(Verdict),
    Endpoint(IpAddr, u16),
}

impl Val {
    pub fn text(&self) -> String {
        match self {
            Val::Verdict(v) => v.to_string(),
            Val::Endpoint(ip, port) => format!("{ip} . {port}"),
        }
    }
}

/// An element of a [`Lowered`] set, keyed by its key bytes and whether it ends a range (a
/// range's end and the next range's start share their bytes).
pub type LElems = BTreeMap<(Vec<u8>, bool), Element>;

fn push_addr(out: &mut Vec<u8>, ip: &IpAddr) {
    match ip {
        IpAddr::V4(v) => out.extend_from_slice(&v.octets()),
        IpAddr::V6(v) => out.extend_from_slice(&v.octets()),
    }
}

impl Key {
    /// The key as the kernel stores it: each part of a concatenation in its own 4-byte words.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        match self {
            Key::Addr(ip) => push_addr(&mut out, ip),
            Key::AddrProtoPort(ip, proto, port) => {
                push_addr(&mut out, ip);
                out.extend_from_slice(&[*proto, 0, 0, 0]);
                out.extend_from_slice(&port.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
            }
            Key::ProtoPort(proto, port) => {
                out.extend_from_slice(&[*proto, 0, 0, 0]);
                out.extend_from_slice(&port.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
            }
            // numgen's value after `byteorder hton`: interval sets compare keys as bytes.
            Key::Range(lo, _) => out.extend_from_slice(&lo.to_be_bytes()),
            Key::Pair(a, b) => {
                push_addr(&mut out, a);
                push_addr(&mut out, b);
            }
        }
        out
    }

    /// The kernel's elements for this key: one, or for a range its start (with the value) and
    /// its end, as nft writes intervals.
    pub fn lower(&self, val: Option<&Val>) -> Vec<Element> {
        let mut start = Element { key: self.bytes(), ..Default::default() };
        match val {
            Some(Val::Verdict(v)) => start.verdict = Some(v.clone()),
            Some(Val::Endpoint(ip, port)) => {
                let mut value = Vec::with_capacity(20);
                push_addr(&mut value, ip);
                value.extend_from_slice(&port.to_be_bytes());
                value.extend_from_slice(&[0, 0]);
                start.value = Some(value);
            }
            None => {}
        }
        match self {
            Key::Range(_, hi) => {
                let end = hi.wrapping_add(1).to_be_bytes().to_vec();
                vec![start, Element { key: end, interval_end: true, ..Default::default() }]
            }
            _ => vec![start],
        }
    }

    pub fn text(&self) -> String {
        match self {
            Key::Addr(ip) => ip.to_string(),
            Key::AddrProtoPort(ip, proto, port) => format!("{ip} . {} . {port}", proto_name(*proto)),
            Key::ProtoPort(proto, port) => format!("{} . {port}", proto_name(*proto)),
            Key::Range(lo, hi) => format!("{lo}-{hi}"),
            Key::Pair(a, b) => format!("{a} . {b}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChainSpec {
    pub hook: Option<Hook>,
    pub rules: Vec<RuleSpec>,
}

/// What kpx wants in its table (all of it, or one service's part).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Objects {
    pub chains: BTreeMap<String, ChainSpec>,
    pub sets: BTreeMap<String, Set>,
    pub elements: BTreeMap<String, BTreeMap<Key, Option<Val>>>,
}

/// [`Objects`] in the kernel's terms.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lowered {
    pub chains: BTreeMap<String, LChain>,
    pub sets: BTreeMap<String, Set>,
    pub elements: BTreeMap<String, LElems>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LChain {
    pub hook: Option<Hook>,
    pub rules: Vec<(Vec<Expr>, Option<String>)>,
}

impl Objects {
    pub fn chain(&mut self, name: &str, rules: Vec<RuleSpec>) {
        self.chains.insert(name.to_string(), ChainSpec { hook: None, rules });
    }

    pub fn element(&mut self, set: &str, key: Key, verdict: Option<Verdict>) {
        self.elements.entry(set.to_string()).or_default().insert(key, verdict.map(Val::Verdict));
    }

    pub fn value(&mut self, set: &str, key: Key, val: Val) {
        self.elements.entry(set.to_string()).or_default().insert(key, Some(val));
    }

    /// Adds `other`'s objects; on a name or key both have, the one already here wins (and the
    /// clash is reported), except in the hairpin set, which services share.
    pub fn merge(&mut self, other: Objects, clashes: &mut Vec<String>) {
        for (name, c) in other.chains {
            match self.chains.entry(name) {
                std::collections::btree_map::Entry::Occupied(e) => {
                    clashes.push(format!("chain {} already exists", e.key()))
                }
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(c);
                }
            }
        }
        for (name, s) in other.sets {
            self.sets.entry(name).or_insert(s);
        }
        for (set, elems) in other.elements {
            let mine = self.elements.entry(set.clone()).or_default();
            for (k, v) in elems {
                match mine.entry(k) {
                    std::collections::btree_map::Entry::Occupied(_) if set == HAIRPIN => {}
                    std::collections::btree_map::Entry::Occupied(e) => {
                        clashes.push(format!("{set} element {} already belongs to another service", e.key().text()))
                    }
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(v);
                    }
                }
            }
        }
    }

    pub fn lower(&self, f: IpFamily) -> Lowered {
        Lowered {
            chains: self
                .chains
                .iter()
                .map(|(n, c)| {
                    let rules = c.rules.iter().map(|r| (r.lower(f), r.comment.clone())).collect();
                    (n.clone(), LChain { hook: c.hook.clone(), rules })
                })
                .collect(),
            sets: self.sets.clone(),
            elements: self
                .elements
                .iter()
                .map(|(s, e)| {
                    let l =
                        e.iter().flat_map(|(k, v)| k.lower(v.as_ref())).map(|e| ((e.key.clone(), e.interval_end), e));
                    (s.clone(), l.collect())
                })
                .collect(),
        }
    }

    /// The objects as `nft -f` input (`add chain ip kube-proxy ...`), in a stable order: for
    /// golden tests, dry runs and `kpxctl`.
    pub fn text(&self, f: IpFamily) -> String {
        let fam = family_word(f);
        let mut out = String::new();
        for (name, s) in &self.sets {
            let kind = if s.flags & NFT_SET_MAP != 0 { "map" } else { "set" };
            out.push_str(&format!("add {kind} {fam} {TABLE} {name} {{ {} }}\n", set_body(f, s)));
        }
        for (name, c) in &self.chains {
            match &c.hook {
                Some(h) => out.push_str(&format!(
                    "add chain {fam} {TABLE} {name} {{ type {} hook {} priority {} ; }}\n",
                    h.kind,
                    hook_name(h.hooknum),
                    h.priority
                )),
                None => out.push_str(&format!("add chain {fam} {TABLE} {name}\n")),
            }
            for r in &c.rules {
                out.push_str(&format!("add rule {fam} {TABLE} {name} {}\n", r.text(f)));
            }
        }
        for (set, elems) in &self.elements {
            for (k, v) in elems {
                let v = v.as_ref().map(|v| format!(" : {}", v.text())).unwrap_or_default();
                out.push_str(&format!("add element {fam} {TABLE} {set} {{ {}{v} }}\n", k.text()));
            }
        }
        out
    }
}

pub fn family_word(f: IpFamily) -> &'static str {
    match f {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

pub fn hook_name(n: u32) -> &'static str {
    ["prerouting", "input", "forward", "output", "postrouting"].get(n as usize).copied().unwrap_or("?")
}

fn set_body(f: IpFamily, s: &Set) -> String {
    let (addr, ip) = match f {
        IpFamily::V4 => ("ipv4_addr", "ip"),
        IpFamily::V6 => ("ipv6_addr", "ip6"),
    };
    // The endpoint maps and the hairpin set, as nft lists them (their user data says so).
    if s.flags & NFT_SET_INTERVAL != 0 {
        return format!(
            "typeof numgen random mod {} : {ip} daddr . tcp dport ; flags interval ;",
            super::endpoints::SLOTS
        );
    }
    if s.name == HAIRPIN {
        return format!("typeof {ip} saddr . {ip} daddr ;");
    }
    let key = match s.key_type & 0x3f {
        13 if s.key_type >> 12 != 0 => format!("{addr} . inet_proto . inet_service"),
        13 => "inet_proto . inet_service".into(),
        _ => addr.into(),
    };
    let data = if s.data_type.is_some() { " : verdict" } else { "" };
    let mut body = format!("type {key}{data} ;");
    if s.flags & NFT_SET_TIMEOUT != 0 {
        body.push_str(" flags dynamic,timeout ;");
    }
    if let Some(t) = s.timeout_ms {
        body.push_str(&format!(" timeout {}s ;", t / 1000));
    }
    body
}

const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;

fn addr_type(f: IpFamily) -> (u32, u32) {
    match f {
        IpFamily::V4 => (TYPE_IPADDR, 4),
        IpFamily::V6 => (TYPE_IP6ADDR, 16),
    }
}

/// A set of addresses.
pub fn addr_set(f: IpFamily, name: &str) -> Set {
    let (t, len) = addr_type(f);
    Set { name: name.into(), key_type: t, key_len: len, ..Default::default() }
}

/// A verdict map keyed by address . protocol . port (or protocol . port without `addr`).
pub fn vmap(f: IpFamily, name: &str, addr: bool) -> Set {
    let (t, len) = addr_type(f);
    let proto_port = (TYPE_INET_PROTOCOL << 6) | TYPE_INET_SERVICE;
    let (key_type, key_len) = if addr { ((t << 12) | proto_port, len + 8) } else { (proto_port, 8) };
    Set {
        name: name.into(),
        flags: NFT_SET_MAP,
        key_type,
        key_len,
        data_type: Some(NFT_DATA_VERDICT),
        ..Default::default()
    }
}

/// A session-affinity set: source addresses, each forgotten `seconds` after it was last seen.
pub fn affinity_set(f: IpFamily, name: &str, seconds: u32) -> Set {
    let (t, len) = addr_type(f);
    Set {
        name: name.into(),
        flags: NFT_SET_TIMEOUT | NFT_SET_EVAL,
        key_type: t,
        key_len: len,
        timeout_ms: Some(u64::from(seconds) * 1000),
        ..Default::default()
    }
}

fn base_chain(o: &mut Objects, name: &str, kind: &str, hooknum: u32, priority: i32, rules: Vec<RuleSpec>) {
    let hook = Some(Hook { kind: kind.into(), hooknum, priority });
    o.chains.insert(name.into(), ChainSpec { hook, rules });
}

fn jump(c: &str) -> Stmt {
    Stmt::Verdict(Verdict::Jump(c.into()))
}

/// Traffic to a cluster IP from outside the cluster CIDR (every source with
/// `--masquerade-all`) is marked for masquerade. kube-proxy puts this rule, with the one cluster
/// IP, at the top of each service chain; kpx puts it once in `services`, before the dispatch,
/// because every rule in a service chain is one more object the kernel walks when it validates
/// the table on a service add (a quarter of that walk: docs/nftables.md, "Where kpx differs").
/// The same packets are marked: a service chain's rule matched only its own cluster IP, and
/// traffic to a cluster IP that no service port takes is rejected (`cluster-ips-check`).
fn masquerade_to_cluster_ips(cfg: &RenderConfig) -> Option<RuleSpec> {
    let to_cluster_ip = Stmt::DaddrInSet(CLUSTER_IPS);
    let stmts = if cfg.masquerade_all {
        vec![to_cluster_ip, jump(MARK_FOR_MASQUERADE)]
    } else {
        let cidr =
            cfg.cluster_cidr.as_deref().and_then(|c| Cidr::parse(c).ok()).filter(|c| c.family() == cfg.family)?;
        vec![to_cluster_ip, Stmt::SaddrCidr { cidr, negate: true }, jump(MARK_FOR_MASQUERADE)]
    };
    Some(RuleSpec::new(stmts).comment("masquerade traffic to cluster IPs from outside the cluster"))
}

/// The fixed part of the table: everything but the services' own chains and elements.
pub fn base(cfg: &RenderConfig) -> Objects {
    let f = cfg.family;
    let mut o = Objects::default();
    o.sets.insert(CLUSTER_IPS.into(), addr_set(f, CLUSTER_IPS));
    o.sets.insert(NODEPORT_IPS.into(), addr_set(f, NODEPORT_IPS));
    for (name, addr) in [
        (FIREWALL_IPS, true),
        (NO_ENDPOINT_NODEPORTS, false),
        (NO_ENDPOINT_SERVICES, true),
        (SERVICE_IPS, true),
        (SERVICE_NODEPORTS, false),
    ] {
        o.sets.insert(name.into(), vmap(f, name, addr));
    }
    let new = |chain: &str| RuleSpec::new(vec![Stmt::CtStateNew, jump(chain)]);
    base_chain(&mut o, "filter-prerouting-pre-dnat", "filter", 0, -110, vec![new("firewall-check")]);
    base_chain(&mut o, "filter-output-pre-dnat", "filter", 3, -110, vec![new("firewall-check")]);
    base_chain(
        &mut o,
        "filter-forward",
        "filter",
        2,
        0,
        vec![new("service-endpoints-check"), new("cluster-ips-check")],
    );
    base_chain(
        &mut o,
        "filter-input",
        "filter",
        1,
        0,
        vec![new("nodeport-endpoints-check"), new("service-endpoints-check")],
    );
    base_chain(&mut o, "filter-output", "filter", 3, 0, vec![new("service-endpoints-check"), new("cluster-ips-check")]);
    base_chain(&mut o, "nat-prerouting", "nat", 0, -100, vec![RuleSpec::new(vec![jump("services")])]);
    base_chain(&mut o, "nat-output", "nat", 3, -100, vec![RuleSpec::new(vec![jump("services")])]);
    base_chain(&mut o, "nat-postrouting", "nat", 4, 100, vec![RuleSpec::new(vec![jump("masquerading")])]);
    let reject = RuleSpec::new(vec![Stmt::DaddrInSet(CLUSTER_IPS), Stmt::Reject])
        .comment("Reject traffic to invalid ports of ClusterIPs");
    o.chain("cluster-ips-check", vec![reject]);
    o.chain("firewall-check", vec![RuleSpec::new(vec![Stmt::VmapAddrProtoPort(FIREWALL_IPS)])]);
    o.chain(MARK_FOR_MASQUERADE, vec![RuleSpec::new(vec![Stmt::MarkOr])]);
    // Hairpin: a pod reaching itself through a service (no endpoint chain marks it; see
    // `endpoints`).
    o.sets.insert(HAIRPIN.into(), super::endpoints::hairpin_set(f));
    o.chain(
        "masquerading",
        vec![
            RuleSpec::new(vec![Stmt::HairpinMasquerade]).comment("hairpin traffic"),
            RuleSpec::new(vec![Stmt::MarkUnset, Stmt::Verdict(Verdict::Return)]),
            RuleSpec::new(vec![Stmt::MarkXor]),
            RuleSpec::new(vec![Stmt::Masquerade]),
        ],
    );
    // NodePorts on the configured node addresses, else on every local address.
    let node_ips: Vec<IpAddr> = cfg.node_ips.iter().copied().filter(|ip| f.matches(*ip)).collect();
    let local = if node_ips.is_empty() { Stmt::FibDaddrLocal } else { Stmt::DaddrInSet(NODEPORT_IPS) };
    for ip in node_ips {
        o.element(NODEPORT_IPS, Key::Addr(ip), None);
    }
    o.chain(
        "nodeport-endpoints-check",
        vec![RuleSpec::new(vec![local.clone(), Stmt::VmapProtoPort(NO_ENDPOINT_NODEPORTS)])],
    );
    o.chain(REJECT_CHAIN, vec![RuleSpec::new(vec![Stmt::Reject])]);
    let mut services: Vec<RuleSpec> = masquerade_to_cluster_ips(cfg).into_iter().collect();
    services.push(RuleSpec::new(vec![Stmt::VmapAddrProtoPort(SERVICE_IPS)]));
    services.push(RuleSpec::new(vec![local, Stmt::VmapProtoPort(SERVICE_NODEPORTS)]));
    o.chain("services", services);
    o.chain("service-endpoints-check", vec![RuleSpec::new(vec![Stmt::VmapAddrProtoPort(NO_ENDPOINT_SERVICES)])]);
    o
}
