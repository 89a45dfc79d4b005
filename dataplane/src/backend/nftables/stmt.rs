//! The statements kpx's rules are made of, at the level `nft list` shows them. Each one lowers
//! to the kernel's expressions exactly as nft 1.0 linearizes it (so `nft list` prints kpx's
//! rules back in this syntax) and prints itself in nft syntax for the admin API, dry runs and
//! golden tests. Rules read from the kernel are compared in their lowered form.

use std::net::IpAddr;

use kpx_nft_netlink::{Expr, SetRef, Verdict};

use super::endpoints::{HAIRPIN, SLOTS};
use crate::backend::iptables::render::IpFamily;
use crate::backend::iptables::render::check::Cidr;

pub const MASQ_MARK: u32 = 0x4000;

const NETWORK: u32 = 1;
const TRANSPORT: u32 = 2;
const META_MARK: u32 = 3;
const META_L4PROTO: u32 = 16;
const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;
const RTN_LOCAL: u32 = 2;
const CT_STATUS: u32 = 2;
const IPS_DST_NAT: u32 = 0x20;
const BYTEORDER_HTON: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    /// `ct state new`
    CtStateNew,
    /// `ip daddr X` / `ip saddr X` (`ip6` in IPv6 tables).
    Daddr(IpAddr),
    Saddr(IpAddr),
    /// `ip saddr 10.0.0.0/8`, `ip saddr != 10.0.0.0/8`
    SaddrCidr {
        cidr: Cidr,
        negate: bool,
    },
    /// `ip daddr @set`
    DaddrInSet(&'static str),
    /// `ip saddr @set`
    SaddrInSet(String),
    /// `fib daddr type local` / `fib saddr type local`
    FibDaddrLocal,
    FibSaddrLocal,
    /// `meta l4proto tcp`
    L4proto(u8),
    /// `mark and 0x4000 == 0`
    MarkUnset,
    /// `mark set mark or 0x4000` / `mark set mark xor 0x4000`
    MarkOr,
    MarkXor,
    /// `ip daddr . meta l4proto . th dport vmap @map`
    VmapAddrProtoPort(&'static str),
    /// `meta l4proto . th dport vmap @map`
    VmapProtoPort(&'static str),
    /// `numgen random mod N vmap { 0 : goto c0, ... }`
    NumgenVmap(Vec<String>),
    /// `update @set { ip saddr }`
    UpdateSaddr(String),
    /// `meta l4proto tcp dnat ip to numgen random mod 65535 offset OFFSET map @MAP` (an
    /// endpoint map, see `endpoints`).
    DnatMap {
        proto: u8,
        offset: u32,
        map: String,
    },
    /// `ct status dnat ip saddr . ip daddr @hairpin-endpoints masquerade fully-random`
    HairpinMasquerade,
    /// `dnat to ADDR:PORT` (after an `L4proto`)
    Dnat(IpAddr, u16),
    /// `masquerade fully-random`
    Masquerade,
    /// `reject`
    Reject,
    Verdict(Verdict),
}

pub fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// Offsets of the address fields in the network header, and the register after a daddr
/// that fills registers from 1 on (32-bit register numbers as nft allocates them).
struct Layout {
    saddr: u32,
    daddr: u32,
    len: u32,
    after_addr: u32,
    nfproto: u32,
    unreach_code: u8,
    /// Where an endpoint map's `address . port` value puts the port (after the address from
    /// register 1 on).
    map_port: u32,
}

fn layout(f: IpFamily) -> Layout {
    match f {
        IpFamily::V4 => {
            Layout { saddr: 12, daddr: 16, len: 4, after_addr: 9, nfproto: 2, unreach_code: 3, map_port: 9 }
        }
        IpFamily::V6 => {
            Layout { saddr: 8, daddr: 24, len: 16, after_addr: 12, nfproto: 10, unreach_code: 4, map_port: 2 }
        }
    }
}

/// A 32-bit register number as the kernel reports it: one that starts a 128-bit register
/// (8, 12, 16, 20) is reported as that register (1 to 4), so a rule written with it reads back
/// equal (IPv6's `ip6 daddr . meta l4proto . th dport` puts l4proto at 12).
fn as_dumped(reg32: u32) -> u32 {
    if reg32 >= 8 && (reg32 - 8).is_multiple_of(4) { (reg32 - 8) / 4 + 1 } else { reg32 }
}

fn u32h(v: u32) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

impl Stmt {
    pub fn lower(&self, f: IpFamily, out: &mut Vec<Expr>) {
        let l = layout(f);
        let load = |offset: u32, base: u32, len: u32, dreg: u32| Expr::Payload { base, offset, len, dreg };
        match self {
            Stmt::CtStateNew => {
                out.push(Expr::Ct { key: 0, dreg: 1 });
                out.push(Expr::Bitwise { sreg: 1, dreg: 1, len: 4, mask: u32h(8), xor: u32h(0) });
                out.push(Expr::Cmp { sreg: 1, op: CMP_NEQ, data: u32h(0) });
            }
            Stmt::Daddr(ip) => {
                out.push(load(l.daddr, NETWORK, l.len, 1));
                out.push(Expr::Cmp { sreg: 1, op: CMP_EQ, data: ip_bytes(*ip) });
            }
            Stmt::Saddr(ip) => {
                out.push(load(l.saddr, NETWORK, l.len, 1));
                out.push(Expr::Cmp { sreg: 1, op: CMP_EQ, data: ip_bytes(*ip) });
            }
            Stmt::SaddrCidr { cidr, negate } => {
                out.push(load(l.saddr, NETWORK, l.len, 1));
                let bits = u32::from(cidr.prefix);
                let mask: Vec<u8> = (0..l.len)
                    .map(|i| {
                        let on = bits.saturating_sub(i * 8).min(8);
                        if on == 0 { 0 } else { 0xffu8 << (8 - on) }
                    })
                    .collect();
                let zero = vec![0; l.len as usize];
                out.push(Expr::Bitwise { sreg: 1, dreg: 1, len: l.len, mask, xor: zero });
                let op = if *negate { CMP_NEQ } else { CMP_EQ };
                out.push(Expr::Cmp { sreg: 1, op, data: ip_bytes(cidr.addr) });
            }
            Stmt::DaddrInSet(set) => {
                out.push(load(l.daddr, NETWORK, l.len, 1));
                out.push(Expr::Lookup { sreg: 1, set: SetRef::Named(set.to_string()), dreg: None, invert: false });
            }
            Stmt::SaddrInSet(set) => {
                out.push(load(l.saddr, NETWORK, l.len, 1));
                out.push(Expr::Lookup { sreg: 1, set: SetRef::Named(set.clone()), dreg: None, invert: false });
            }
            Stmt::FibDaddrLocal | Stmt::FibSaddrLocal => {
                let flags = if *self == Stmt::FibDaddrLocal { 2 } else { 1 };
                out.push(Expr::Fib { flags, result: 3, dreg: 1 });
                out.push(Expr::Cmp { sreg: 1, op: CMP_EQ, data: u32h(RTN_LOCAL) });
            }
            Stmt::L4proto(p) => {
                out.push(Expr::Meta { key: META_L4PROTO, dreg: 1 });
                out.push(Expr::Cmp { sreg: 1, op: CMP_EQ, data: vec![*p] });
            }
            Stmt::MarkUnset => {
                out.push(Expr::Meta { key: META_MARK, dreg: 1 });
                out.push(Expr::Bitwise { sreg: 1, dreg: 1, len: 4, mask: u32h(MASQ_MARK), xor: u32h(0) });
                out.push(Expr::Cmp { sreg: 1, op: CMP_EQ, data: u32h(0) });
            }
            Stmt::MarkOr | Stmt::MarkXor => {
                let mask = if *self == Stmt::MarkOr { !MASQ_MARK } else { u32::MAX };
                out.push(Expr::Meta { key: META_MARK, dreg: 1 });
                out.push(Expr::Bitwise { sreg: 1, dreg: 1, len: 4, mask: u32h(mask), xor: u32h(MASQ_MARK) });
                out.push(Expr::MetaSet { key: META_MARK, sreg: 1 });
            }
            Stmt::VmapAddrProtoPort(map) => {
                out.push(load(l.daddr, NETWORK, l.len, 1));
                out.push(Expr::Meta { key: META_L4PROTO, dreg: as_dumped(l.after_addr) });
                out.push(load(2, TRANSPORT, 2, l.after_addr + 1));
                out.push(Expr::Lookup { sreg: 1, set: SetRef::Named(map.to_string()), dreg: Some(0), invert: false });
            }
            Stmt::VmapProtoPort(map) => {
                out.push(Expr::Meta { key: META_L4PROTO, dreg: 1 });
                out.push(load(2, TRANSPORT, 2, 9));
                out.push(Expr::Lookup { sreg: 1, set: SetRef::Named(map.to_string()), dreg: Some(0), invert: false });
            }
            Stmt::NumgenVmap(chains) => {
                out.push(Expr::Numgen { dreg: 1, modulus: chains.len() as u32, offset: 0 });
                let entries = chains.iter().enumerate().map(|(i, c)| (i as u32, Verdict::Goto(c.clone()))).collect();
                out.push(Expr::Lookup { sreg: 1, set: SetRef::AnonVmap(entries), dreg: Some(0), invert: false });
            }
            Stmt::UpdateSaddr(set) => {
                out.push(load(l.saddr, NETWORK, l.len, 1));
                out.push(Expr::Dynset { op: 1, sreg_key: 1, set: set.clone() });
            }
            Stmt::Dnat(ip, port) => {
                out.push(Expr::Immediate { dreg: 1, data: ip_bytes(*ip) });
                out.push(Expr::Immediate { dreg: 2, data: port.to_be_bytes().to_vec() });
                // NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED, as the kernel reports it.
                out.push(Expr::Dnat { family: l.nfproto, reg_addr: 1, reg_proto: 2, flags: 3 });
            }
            Stmt::DnatMap { proto, offset, map } => {
                out.push(Expr::Meta { key: META_L4PROTO, dreg: 1 });
                out.push(Expr::Cmp { sreg: 1, op: CMP_EQ, data: vec![*proto] });
                out.push(Expr::Numgen { dreg: 1, modulus: SLOTS, offset: *offset });
                out.push(Expr::Byteorder { sreg: 1, dreg: 1, op: BYTEORDER_HTON, len: 4, size: 4 });
                out.push(Expr::Lookup { sreg: 1, set: SetRef::Named(map.clone()), dreg: Some(1), invert: false });
                out.push(Expr::Dnat { family: l.nfproto, reg_addr: 1, reg_proto: l.map_port, flags: 3 });
            }
            Stmt::HairpinMasquerade => {
                out.push(Expr::Ct { key: CT_STATUS, dreg: 1 });
                out.push(Expr::Bitwise { sreg: 1, dreg: 1, len: 4, mask: u32h(IPS_DST_NAT), xor: u32h(0) });
                out.push(Expr::Cmp { sreg: 1, op: CMP_NEQ, data: u32h(0) });
                // Each part of a concatenation starts in a register of its own.
                let second = if l.len == 4 { 9 } else { 2 };
                out.push(load(l.saddr, NETWORK, l.len, 1));
                out.push(load(l.daddr, NETWORK, l.len, second));
                out.push(Expr::Lookup { sreg: 1, set: SetRef::Named(HAIRPIN.into()), dreg: None, invert: false });
                out.push(Expr::Masq { flags: 0x10 });
            }
            Stmt::Masquerade => out.push(Expr::Masq { flags: 0x10 }),
            Stmt::Reject => out.push(Expr::Reject { kind: 0, code: l.unreach_code }),
            Stmt::Verdict(v) => out.push(Expr::Verdict(v.clone())),
        }
    }

    /// nft syntax.
    pub fn text(&self, f: IpFamily) -> String {
        let ip = match f {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        };
        match self {
            Stmt::CtStateNew => "ct state new".into(),
            Stmt::Daddr(a) => format!("{ip} daddr {a}"),
            Stmt::Saddr(a) => format!("{ip} saddr {a}"),
            Stmt::SaddrCidr { cidr, negate } => format!("{ip} saddr {}{cidr}", if *negate { "!= " } else { "" }),
            Stmt::DaddrInSet(s) => format!("{ip} daddr @{s}"),
            Stmt::SaddrInSet(s) => format!("{ip} saddr @{s}"),
            Stmt::FibDaddrLocal => "fib daddr type local".into(),
            Stmt::FibSaddrLocal => "fib saddr type local".into(),
            Stmt::L4proto(p) => format!("meta l4proto {}", proto_name(*p)),
            Stmt::MarkUnset => format!("mark and {MASQ_MARK:#x} == 0"),
            Stmt::MarkOr => format!("mark set mark or {MASQ_MARK:#x}"),
            Stmt::MarkXor => format!("mark set mark xor {MASQ_MARK:#x}"),
            Stmt::VmapAddrProtoPort(m) => format!("{ip} daddr . meta l4proto . th dport vmap @{m}"),
            Stmt::VmapProtoPort(m) => format!("meta l4proto . th dport vmap @{m}"),
            Stmt::NumgenVmap(chains) => {
                let entries: Vec<String> = chains.iter().enumerate().map(|(i, c)| format!("{i} : goto {c}")).collect();
                format!("numgen random mod {} vmap {{ {} }}", chains.len(), entries.join(", "))
            }
            Stmt::UpdateSaddr(s) => format!("update @{s} {{ {ip} saddr }}"),
            Stmt::DnatMap { proto, offset, map } => {
                // As nft lists it: no offset when it is 0.
                let offset = if *offset == 0 { String::new() } else { format!(" offset {offset}") };
                format!("meta l4proto {} dnat {ip} to numgen random mod {SLOTS}{offset} map @{map}", proto_name(*proto))
            }
            Stmt::HairpinMasquerade => {
                format!("ct status dnat {ip} saddr . {ip} daddr @{HAIRPIN} masquerade fully-random")
            }
            Stmt::Dnat(IpAddr::V4(a), p) => format!("dnat to {a}:{p}"),
            Stmt::Dnat(IpAddr::V6(a), p) => format!("dnat to [{a}]:{p}"),
            Stmt::Masquerade => "masquerade fully-random".into(),
            Stmt::Reject => "reject".into(),
            Stmt::Verdict(v) => v.to_string(),
        }
    }
}

/// One rule: statements and an optional comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub stmts: Vec<Stmt>,
    pub comment: Option<String>,
}

impl RuleSpec {
    pub fn new(stmts: Vec<Stmt>) -> RuleSpec {
        RuleSpec { stmts, comment: None }
    }

    pub fn comment(mut self, c: &str) -> RuleSpec {
        self.comment = Some(c.to_string());
        self
    }

    pub fn lower(&self, f: IpFamily) -> Vec<Expr> {
        let mut out = Vec::with_capacity(self.stmts.len() * 3);
        self.stmts.iter().for_each(|s| s.lower(f, &mut out));
        out
    }

    pub fn text(&self, f: IpFamily) -> String {
        let mut t: Vec<String> = self.stmts.iter().map(|s| s.text(f)).collect();
        if let Some(c) = &self.comment {
            t.push(format!("comment \"{c}\""));
        }
        t.join(" ")
    }
}
