//! The table shapes kernel_cost compares: kube-proxy's layout, its variants, and layouts without
//! endpoint chains. Each function appends one service's (or one change's) operations to a batch.

use kpx_nft_netlink::consts::*;
use kpx_nft_netlink::{Batch, Chain, Element, Expr, Hook, Rule, Set, SetRef, Verdict};

pub const TABLE: &str = "kube-proxy";

/// How a service chain picks its endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape {
    /// kube-proxy's: `numgen random mod E vmap { 0 : goto ep0, ... }` (an anonymous map per rule).
    Anon,
    /// A named map per service: `numgen random mod E vmap @svc-map-I`.
    Named,
    /// One shared named map, each service its own key range: `numgen random mod E offset B vmap @eps`.
    Shared,
    /// No endpoint chains: `dnat to numgen random mod 65535 offset B map @service-endpoints`, one
    /// shared interval map of `B + range : address . port`.
    Ranges,
    /// No endpoint chains, no per-service map: service chains `goto endpoints`, whose one rule is
    /// `dnat to ip daddr . meta l4proto . th dport . numgen random mod 65535 map @service-endpoints`
    /// (ranges of concatenations: the kernel's pipapo set).
    Pipapo,
    /// No set: iptables' probabilities, `numgen random mod (E-j) 0 goto ep_j` for each j.
    Cascade,
    /// No map at all: `goto ep0` (isolates chains and jumps).
    Flat,
    /// No per-service chain: `service-ips` sends a service to the chain shared by every service
    /// with as many endpoints (`goto lb-N`), whose one rule is `dnat to ip daddr . meta l4proto .
    /// th dport . numgen random mod N map @backends` (one hash map of every endpoint, exact keys).
    /// A new service is elements only; an endpoint change also moves its `goto`.
    Compact,
}

impl Shape {
    pub fn parse(s: &str) -> Shape {
        match s {
            "anon" => Shape::Anon,
            "named" => Shape::Named,
            "shared" => Shape::Shared,
            "cascade" => Shape::Cascade,
            "ranges" => Shape::Ranges,
            "pipapo" => Shape::Pipapo,
            "flat" => Shape::Flat,
            "compact" => Shape::Compact,
            _ => panic!("shape: anon, named, shared, ranges, pipapo, cascade, flat or compact"),
        }
    }
}

/// Key ranges of the shared map: service `i` owns keys `i * STRIDE ..`.
pub const STRIDE: u32 = 64;

pub fn svc_chain(i: usize) -> String {
    format!("service-{i:08}-ns/svc-{i}/tcp/http")
}

pub fn ep_chain(i: usize, j: usize) -> String {
    format!("endpoint-{i:08}-ns/svc-{i}/tcp/http__10.{}.{}.{j}/8080", i / 256 % 256, i % 256)
}

pub fn svc_map(i: usize) -> String {
    format!("svcmap-{i:08}")
}

pub fn int_map(name: &str) -> Set {
    Set {
        name: name.into(),
        flags: NFT_SET_MAP,
        key_type: 4,
        key_len: 4,
        data_type: Some(NFT_DATA_VERDICT),
        data_len: 0,
        fields: Vec::new(),
        udata: Vec::new(),
        timeout_ms: None,
    }
}

pub fn rule(chain: &str, exprs: Vec<Expr>) -> Rule {
    Rule { chain: chain.into(), exprs, comment: None, handle: 0 }
}

/// `meta l4proto tcp`, then `ip daddr . meta l4proto . th dport . numgen random mod MODULUS`
/// in registers 1, 9, 10 and 11 (a lookup key of 16 bytes from register 1).
fn tcp_service_and_pick(modulus: u32) -> Vec<Expr> {
    vec![
        Expr::Meta { key: 16, dreg: 1 },
        Expr::Cmp { sreg: 1, op: 0, data: vec![6] },
        Expr::Payload { base: 1, offset: 16, len: 4, dreg: 1 },
        Expr::Meta { key: 16, dreg: 9 },
        Expr::Payload { base: 2, offset: 2, len: 2, dreg: 10 },
        Expr::Numgen { dreg: 11, modulus, offset: 0 },
    ]
}

pub fn base(b: &mut Batch, shape: Shape) {
    b.add_table("rules for kube-proxy");
    let hook = |n, p| Some(Hook { kind: "nat".into(), hooknum: n, priority: p });
    for (name, h) in [
        ("nat-prerouting", hook(0, -100)),
        ("nat-output", hook(3, -100)),
        ("services", None),
        ("mark-for-masquerade", None),
    ] {
        b.add_chain(&Chain { name: name.into(), hook: h });
    }
    b.add_set(&Set {
        name: "service-ips".into(),
        flags: NFT_SET_MAP,
        key_type: (7 << 12) | (12 << 6) | 13,
        key_len: 12,
        data_type: Some(NFT_DATA_VERDICT),
        data_len: 0,
        fields: Vec::new(),
        udata: Vec::new(),
        timeout_ms: None,
    });
    b.add_set(&Set {
        name: "cluster-ips".into(),
        flags: 0,
        key_type: 7,
        key_len: 4,
        data_type: None,
        data_len: 0,
        fields: Vec::new(),
        udata: Vec::new(),
        timeout_ms: None,
    });
    if shape == Shape::Shared {
        b.add_set(&int_map("service-endpoints"));
    }
    if shape == Shape::Pipapo {
        b.add_set(&Set {
            name: "service-endpoints".into(),
            flags: NFT_SET_MAP | NFT_SET_INTERVAL | NFT_SET_CONCAT,
            key_type: (((7 << 6 | 12) << 6 | 13) << 6) | 4,
            key_len: 16,
            data_type: Some((7 << 6) | 13),
            data_len: 8,
            fields: vec![4, 1, 2, 4],
            udata: Vec::new(),
            timeout_ms: None,
        });
        b.add_chain(&Chain { name: "endpoints".into(), hook: None });
        b.add_rule(&rule(
            "endpoints",
            [
                tcp_service_and_pick(SLOTS),
                vec![
                    Expr::Byteorder { sreg: 11, dreg: 11, op: 1, len: 4, size: 4 },
                    Expr::Lookup {
                        sreg: 1,
                        set: SetRef::Named("service-endpoints".into()),
                        dreg: Some(1),
                        invert: false,
                    },
                    Expr::Dnat { family: 2, reg_addr: 1, reg_proto: 9, flags: 3 },
                ],
            ]
            .concat(),
        ));
    }
    for k in 0..if shape == Shape::Ranges { buckets() } else { 0 } {
        b.add_set(&Set {
            name: format!("service-endpoints-{k}"),
            flags: NFT_SET_MAP | NFT_SET_INTERVAL,
            key_type: 4,
            key_len: 4,
            data_type: Some((7 << 6) | 13),
            data_len: 8,
            fields: Vec::new(),
            udata: Vec::new(),
            timeout_ms: None,
        });
    }
    if shape == Shape::Compact {
        compact_base(b);
    }
    for c in ["nat-prerouting", "nat-output"] {
        b.add_rule(&rule(c, vec![Expr::Verdict(Verdict::Jump("services".into()))]));
    }
    b.add_rule(&rule(
        "services",
        vec![
            Expr::Payload { base: 1, offset: 16, len: 4, dreg: 1 },
            Expr::Meta { key: 16, dreg: 9 },
            Expr::Payload { base: 2, offset: 2, len: 2, dreg: 10 },
            Expr::Lookup { sreg: 1, set: SetRef::Named("service-ips".into()), dreg: Some(0), invert: false },
        ],
    ));
    b.add_rule(&rule("mark-for-masquerade", vec![Expr::Meta { key: 3, dreg: 1 }]));
}

/// The most endpoints a `Compact` service has in the probe (its `lb-N` chains exist up to it).
pub const COMPACT_MAX: usize = 64;

fn compact_base(b: &mut Batch) {
    // `address . proto . port . index : address . port`, typed so that nft can print it.
    b.add_set(&Set {
        name: "backends".into(),
        flags: NFT_SET_MAP,
        key_type: (((7 << 6 | 12) << 6 | 13) << 6) | 19,
        key_len: 16,
        data_type: Some((7 << 6) | 13),
        data_len: 8,
        fields: Vec::new(),
        udata: Vec::new(),
        timeout_ms: None,
    });
    for n in 1..=COMPACT_MAX {
        let c = lb_chain(n);
        b.add_chain(&Chain { name: c.clone(), hook: None });
        b.add_rule(&rule(
            &c,
            [
                tcp_service_and_pick(n as u32),
                vec![
                    Expr::Lookup { sreg: 1, set: SetRef::Named("backends".into()), dreg: Some(12), invert: false },
                    Expr::Dnat { family: 2, reg_addr: 12, reg_proto: 13, flags: 3 },
                ],
            ]
            .concat(),
        ));
    }
}

pub fn lb_chain(n: usize) -> String {
    format!("lb-{n}")
}

fn service_key(i: usize) -> Vec<u8> {
    [vec![172, 16, (i / 256 % 256) as u8, (i % 256) as u8], vec![6, 0, 0, 0, 0, 80, 0, 0]].concat()
}

/// Service `i`'s `service-ips` element when it has `e` endpoints: `goto lb-E`.
pub fn compact_dispatch(i: usize, e: usize) -> Element {
    Element { key: service_key(i), verdict: Some(Verdict::Goto(lb_chain(e))), ..Default::default() }
}

/// Service `i`'s `backends` elements `from..to`.
pub fn compact_backends(i: usize, from: usize, to: usize) -> Vec<Element> {
    (from..to)
        .map(|j| Element {
            key: [service_key(i), (j as u32).to_ne_bytes().to_vec()].concat(),
            value: Some([ep_ip(i, j), vec![0x1f, 0x90, 0, 0]].concat()),
            ..Default::default()
        })
        .collect()
}

/// Slots of a service in the shared interval map: `[i * 65536, i * 65536 + 65535)`.
pub const SLOTS: u32 = 65535;

/// How many maps the `Ranges` shape spreads its services over (`--buckets`).
pub static BUCKETS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

pub fn buckets() -> usize {
    BUCKETS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Service `i`'s map and the base of its key range in it.
pub fn bucket(i: usize) -> (String, u32) {
    (format!("service-endpoints-{}", i % buckets()), (i / buckets()) as u32 * (SLOTS + 1))
}

pub fn ep_ip(i: usize, j: usize) -> Vec<u8> {
    vec![10, (i / 256 % 256) as u8, (i % 256) as u8, j as u8]
}

/// The interval elements of service `i` with `e` endpoints, as nft writes adjacent ranges: each
/// range's start (with its value) and its end (which the next range's start shares); `inner`
/// leaves out the base start and the final end, which no endpoint change moves.
pub fn ranges(i: usize, e: usize, inner: bool) -> Vec<Element> {
    let base = bucket(i).1;
    let at = |j: usize| (base + (j as u64 * SLOTS as u64 / e as u64) as u32).to_be_bytes().to_vec();
    let mut out = Vec::new();
    for j in 0..e {
        if !(inner && j == 0) {
            out.push(Element {
                key: at(j),
                value: Some([ep_ip(i, j), vec![0x1f, 0x90, 0, 0]].concat()),
                ..Default::default()
            });
        }
        if !(inner && j + 1 == e) {
            out.push(Element { key: at(j + 1), interval_end: true, ..Default::default() });
        }
    }
    out
}

/// The elements of service `i` in the shared map of concatenation ranges.
pub fn concat_ranges(i: usize, e: usize) -> Vec<Element> {
    let svc = [vec![172, 16, (i / 256 % 256) as u8, (i % 256) as u8], vec![6, 0, 0, 0, 0, 80, 0, 0]].concat();
    let at = |j: usize| (j as u64 * SLOTS as u64 / e as u64) as u32;
    (0..e)
        .map(|j| Element {
            key: [svc.clone(), at(j).to_be_bytes().to_vec()].concat(),
            key_end: Some([svc.clone(), (at(j + 1) - 1).to_be_bytes().to_vec()].concat()),
            value: Some([ep_ip(i, j), vec![0x1f, 0x90, 0, 0]].concat()),
            ..Default::default()
        })
        .collect()
}

pub fn endpoint(b: &mut Batch, i: usize, j: usize, jump: bool) {
    let c = ep_chain(i, j);
    b.add_chain(&Chain { name: c.clone(), hook: None });
    let ip = vec![10, (i / 256 % 256) as u8, (i % 256) as u8, j as u8];
    if jump {
        b.add_rule(&rule(
            &c,
            vec![
                Expr::Payload { base: 1, offset: 12, len: 4, dreg: 1 },
                Expr::Cmp { sreg: 1, op: 0, data: ip.clone() },
                Expr::Verdict(Verdict::Jump("mark-for-masquerade".into())),
            ],
        ));
    }
    b.add_rule(&rule(
        &c,
        vec![
            Expr::Meta { key: 16, dreg: 1 },
            Expr::Cmp { sreg: 1, op: 0, data: vec![6] },
            Expr::Immediate { dreg: 1, data: ip },
            Expr::Immediate { dreg: 2, data: vec![0x1f, 0x90] },
            Expr::Dnat { family: 2, reg_addr: 1, reg_proto: 2, flags: 3 },
        ],
    ));
}

/// The service chain's rules.
pub fn picks(shape: Shape, i: usize, e: usize) -> Vec<Vec<Expr>> {
    if shape == Shape::Ranges {
        // As kpx's service chains: masquerade off-cluster sources first.
        let masq = vec![
            Expr::Payload { base: 1, offset: 16, len: 4, dreg: 1 },
            Expr::Cmp { sreg: 1, op: 0, data: vec![172, 16, (i / 256 % 256) as u8, (i % 256) as u8] },
            Expr::Payload { base: 1, offset: 12, len: 4, dreg: 1 },
            Expr::Bitwise { sreg: 1, dreg: 1, len: 4, mask: vec![255, 0, 0, 0], xor: vec![0; 4] },
            Expr::Cmp { sreg: 1, op: 1, data: vec![10, 0, 0, 0] },
            Expr::Verdict(Verdict::Jump("mark-for-masquerade".into())),
        ];
        return vec![masq, pick(shape, i, e)];
    }
    if shape != Shape::Cascade {
        return vec![pick(shape, i, e)];
    }
    (0..e)
        .map(|j| {
            let goto = Expr::Verdict(Verdict::Goto(ep_chain(i, j)));
            if j + 1 == e {
                return vec![goto];
            }
            let cmp = Expr::Cmp { sreg: 1, op: 0, data: 0u32.to_ne_bytes().to_vec() };
            vec![Expr::Numgen { dreg: 1, modulus: (e - j) as u32, offset: 0 }, cmp, goto]
        })
        .collect()
}

pub fn pick(shape: Shape, i: usize, e: usize) -> Vec<Expr> {
    let gotos = (0..e).map(|j| (j as u32, Verdict::Goto(ep_chain(i, j)))).collect::<Vec<_>>();
    match shape {
        Shape::Anon => vec![
            Expr::Numgen { dreg: 1, modulus: e as u32, offset: 0 },
            Expr::Lookup { sreg: 1, set: SetRef::AnonVmap(gotos), dreg: Some(0), invert: false },
        ],
        Shape::Named => vec![
            Expr::Numgen { dreg: 1, modulus: e as u32, offset: 0 },
            Expr::Lookup { sreg: 1, set: SetRef::Named(svc_map(i)), dreg: Some(0), invert: false },
        ],
        Shape::Shared => vec![
            Expr::Numgen { dreg: 1, modulus: e as u32, offset: i as u32 * STRIDE },
            Expr::Lookup { sreg: 1, set: SetRef::Named("service-endpoints".into()), dreg: Some(0), invert: false },
        ],
        Shape::Flat | Shape::Cascade => vec![Expr::Verdict(Verdict::Goto(ep_chain(i, 0)))],
        Shape::Pipapo => vec![Expr::Verdict(Verdict::Goto("endpoints".into()))],
        // No service chain: `lb-N` picks for every service (`compact_base`).
        Shape::Compact => Vec::new(),
        Shape::Ranges => vec![
            Expr::Meta { key: 16, dreg: 1 },
            Expr::Cmp { sreg: 1, op: 0, data: vec![6] },
            Expr::Numgen { dreg: 1, modulus: SLOTS, offset: bucket(i).1 },
            Expr::Byteorder { sreg: 1, dreg: 1, op: 1, len: 4, size: 4 },
            Expr::Lookup { sreg: 1, set: SetRef::Named(bucket(i).0), dreg: Some(1), invert: false },
            Expr::Dnat { family: 2, reg_addr: 1, reg_proto: 9, flags: 3 },
        ],
    }
}

pub fn gotos(i: usize, e: usize, offset: u32) -> Vec<Element> {
    (0..e)
        .map(|j| Element {
            key: (offset + j as u32).to_ne_bytes().to_vec(),
            verdict: Some(Verdict::Goto(ep_chain(i, j))),
            ..Default::default()
        })
        .collect()
}

/// Everything of service `i`; for `Ranges`, its elements of the shared map only when `elements`
/// (a full sync adds them after every rule: each rule that binds a map from a new chain makes
/// the kernel walk the map's elements).
pub fn service(b: &mut Batch, shape: Shape, i: usize, e: usize, elements: bool) {
    if shape == Shape::Compact {
        b.add_elements("backends", &compact_backends(i, 0, e));
        b.add_elements("service-ips", &[compact_dispatch(i, e)]);
        return;
    }
    if !matches!(shape, Shape::Ranges | Shape::Pipapo) {
        for j in 0..e {
            endpoint(b, i, j, true);
        }
    }
    let c = svc_chain(i);
    b.add_chain(&Chain { name: c.clone(), hook: None });
    match shape {
        Shape::Named => {
            b.add_set(&int_map(&svc_map(i)));
            b.add_elements(&svc_map(i), &gotos(i, e, 0));
        }
        Shape::Shared => b.add_elements("service-endpoints", &gotos(i, e, i as u32 * STRIDE)),
        Shape::Ranges if elements => b.add_elements(&bucket(i).0, &ranges(i, e, false)),
        Shape::Pipapo => b.add_elements("service-endpoints", &concat_ranges(i, e)),
        _ => {}
    }
    for r in picks(shape, i, e) {
        b.add_rule(&rule(&c, r));
    }
    let key = [vec![172, 16, (i / 256 % 256) as u8, (i % 256) as u8], vec![6, 0, 0, 0, 0, 80, 0, 0]].concat();
    b.add_elements("service-ips", &[Element { key, verdict: Some(Verdict::Goto(c)), ..Default::default() }]);
}

/// Service `i` goes from `from` to `to` endpoints (one more or one less), the way each shape
/// has to write it.
pub fn endpoint_change(b: &mut Batch, shape: Shape, i: usize, from: usize, to: usize) {
    if shape == Shape::Compact {
        if to > from {
            b.add_elements("backends", &compact_backends(i, from, to));
        } else {
            b.del_elements("backends", &compact_backends(i, to, from));
        }
        b.del_elements("service-ips", &[compact_dispatch(i, from)]);
        b.add_elements("service-ips", &[compact_dispatch(i, to)]);
        return;
    }
    if shape == Shape::Pipapo {
        b.del_elements("service-endpoints", &concat_ranges(i, from));
        b.add_elements("service-endpoints", &concat_ranges(i, to));
        return;
    }
    if shape == Shape::Ranges {
        // The first range starts at the service's base either way; the others move.
        b.del_elements(&bucket(i).0, &ranges(i, from, false));
        b.add_elements(&bucket(i).0, &ranges(i, to, false));
        return;
    }
    if to > from {
        endpoint(b, i, from, true);
    }
    if shape == Shape::Named {
        let g = gotos(i, from.max(to), 0);
        if to > from {
            b.add_elements(&svc_map(i), &g[from..]);
        } else {
            b.del_elements(&svc_map(i), &g[to..]);
        }
    }
    b.flush_chain(&svc_chain(i));
    for r in picks(shape, i, to) {
        b.add_rule(&rule(&svc_chain(i), r));
    }
    if to < from {
        b.flush_chain(&ep_chain(i, to));
        b.del_chain(&ep_chain(i, to));
    }
}

pub fn remove_service(b: &mut Batch, shape: Shape, i: usize, e: usize) {
    if shape == Shape::Compact {
        b.del_elements("service-ips", &[compact_dispatch(i, e)]);
        b.del_elements("backends", &compact_backends(i, 0, e));
        return;
    }
    let key = [vec![172, 16, (i / 256 % 256) as u8, (i % 256) as u8], vec![6, 0, 0, 0, 0, 80, 0, 0]].concat();
    b.del_elements("service-ips", &[Element { key, verdict: Some(Verdict::Goto(svc_chain(i))), ..Default::default() }]);
    match shape {
        Shape::Shared => b.del_elements("service-endpoints", &gotos(i, e, i as u32 * STRIDE)),
        Shape::Ranges => b.del_elements(&bucket(i).0, &ranges(i, e, false)),
        Shape::Pipapo => b.del_elements("service-endpoints", &concat_ranges(i, e)),
        _ => {}
    }
    b.flush_chain(&svc_chain(i));
    b.del_chain(&svc_chain(i));
    if shape == Shape::Named {
        b.del_set(&svc_map(i));
    }
    if !matches!(shape, Shape::Ranges | Shape::Pipapo) {
        for j in 0..e {
            b.flush_chain(&ep_chain(i, j));
            b.del_chain(&ep_chain(i, j));
        }
    }
}
