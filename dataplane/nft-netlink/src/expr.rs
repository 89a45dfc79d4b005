//! nf_tables expressions: the kernel's rule "bytecode", as kpx writes it and as a dump returns
//! it. Only the expressions kube-proxy's layout needs are modelled; anything else decodes to
//! [`Expr::Unknown`] (so a foreign or hand-edited rule never compares equal to one of kpx's).
//! Decoding keeps only what encoding sets and drops what the kernel adds on its own (a
//! lookup's zero flags, a nat expression's max registers equal to its min), so a rule read
//! back compares equal to the rule written.

use std::fmt;

use crate::consts::*;
use crate::wire::{Writer, attrs, be32, string};

/// A verdict: accept, drop, return, or a jump/goto to a chain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Accept,
    Drop,
    Continue,
    Return,
    Jump(String),
    Goto(String),
}

impl Verdict {
    fn code(&self) -> i32 {
        match self {
            Verdict::Accept => NF_ACCEPT,
            Verdict::Drop => NF_DROP,
            Verdict::Continue => NFT_CONTINUE,
            Verdict::Return => NFT_RETURN,
            Verdict::Jump(_) => NFT_JUMP,
            Verdict::Goto(_) => NFT_GOTO,
        }
    }

    /// NFTA_DATA_VERDICT { CODE, CHAIN } inside an open NFTA_*_DATA attribute.
    pub fn encode(&self, w: &mut Writer) {
        let v = w.nest(NFTA_DATA_VERDICT);
        w.u32(NFTA_VERDICT_CODE, self.code() as u32);
        if let Verdict::Jump(c) | Verdict::Goto(c) = self {
            w.str(NFTA_VERDICT_CHAIN, c);
        }
        w.nest_end(v);
    }

    /// From the payload of NFTA_DATA_VERDICT.
    pub fn decode(b: &[u8]) -> Option<Verdict> {
        let (mut code, mut chain) = (None, None);
        for (t, p) in attrs(b) {
            match t {
                NFTA_VERDICT_CODE => code = be32(p).map(|c| c as i32),
                NFTA_VERDICT_CHAIN => chain = Some(string(p)),
                _ => {}
            }
        }
        Some(match (code?, chain) {
            (NF_ACCEPT, _) => Verdict::Accept,
            (NF_DROP, _) => Verdict::Drop,
            (NFT_CONTINUE, _) => Verdict::Continue,
            (NFT_RETURN, _) => Verdict::Return,
            (NFT_JUMP, Some(c)) => Verdict::Jump(c),
            (NFT_GOTO, Some(c)) => Verdict::Goto(c),
            _ => return None,
        })
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Accept => f.write_str("accept"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Continue => f.write_str("continue"),
            Verdict::Return => f.write_str("return"),
            Verdict::Jump(c) => write!(f, "jump {c}"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
        }
    }
}

/// The set a lookup reads: a named set of the table, or an anonymous constant map that lives
/// and dies with its rule (`numgen random mod N vmap { 0 : goto a, 1 : goto b }`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SetRef {
    Named(String),
    /// Integer keys (4 bytes, host order as numgen writes them) to verdicts.
    AnonVmap(Vec<(u32, Verdict)>),
    /// A dumped rule's anonymous set the dump could not resolve.
    Unresolved(String),
}

/// One expression.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    Meta {
        key: u32,
        dreg: u32,
    },
    MetaSet {
        key: u32,
        sreg: u32,
    },
    Ct {
        key: u32,
        dreg: u32,
    },
    Cmp {
        sreg: u32,
        op: u32,
        data: Vec<u8>,
    },
    Bitwise {
        sreg: u32,
        dreg: u32,
        len: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    Immediate {
        dreg: u32,
        data: Vec<u8>,
    },
    Verdict(Verdict),
    Lookup {
        sreg: u32,
        set: SetRef,
        dreg: Option<u32>,
        invert: bool,
    },
    /// Converts `len` bytes of `sreg` in `size`-byte words to network order (`hton`, op 1) or
    /// back (op 0): nft puts one before an interval lookup of a host-order value.
    Byteorder {
        sreg: u32,
        dreg: u32,
        op: u32,
        len: u32,
        size: u32,
    },
    /// `numgen random mod MODULUS offset OFFSET` (no offset attribute when 0).
    Numgen {
        dreg: u32,
        modulus: u32,
        offset: u32,
    },
    Fib {
        flags: u32,
        result: u32,
        dreg: u32,
    },
    Dnat {
        family: u32,
        reg_addr: u32,
        reg_proto: u32,
        flags: u32,
    },
    Masq {
        flags: u32,
    },
    Reject {
        kind: u32,
        code: u8,
    },
    Dynset {
        op: u32,
        sreg_key: u32,
        set: String,
    },
    Unknown(String),
}

/// The set name an anonymous set gets in the transaction that creates it (the kernel fills in
/// the number; the rule refers to it by its transaction id).
pub const ANON_MAP_NAME: &str = "__map%d";

fn data_value(w: &mut Writer, ty: u16, data: &[u8]) {
    let n = w.nest(ty);
    w.attr(NFTA_DATA_VALUE, data);
    w.nest_end(n);
}

/// The payload of the NFTA_DATA_VALUE inside `b` (an NFTA_*_DATA attribute's payload).
fn value_of(b: &[u8]) -> Option<Vec<u8>> {
    attrs(b).find(|(t, _)| *t == NFTA_DATA_VALUE).map(|(_, p)| p.to_vec())
}

impl Expr {
    pub fn name(&self) -> &str {
        match self {
            Expr::Payload { .. } => "payload",
            Expr::Meta { .. } | Expr::MetaSet { .. } => "meta",
            Expr::Ct { .. } => "ct",
            Expr::Cmp { .. } => "cmp",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Immediate { .. } | Expr::Verdict(_) => "immediate",
            Expr::Lookup { .. } => "lookup",
            Expr::Numgen { .. } => "numgen",
            Expr::Byteorder { .. } => "byteorder",
            Expr::Fib { .. } => "fib",
            Expr::Dnat { .. } => "nat",
            Expr::Masq { .. } => "masq",
            Expr::Reject { .. } => "reject",
            Expr::Dynset { .. } => "dynset",
            Expr::Unknown(n) => n,
        }
    }

    /// Writes NFTA_LIST_ELEM { NAME, DATA { ... } }. `anon_id` is the transaction id of the
    /// anonymous set an [`SetRef::AnonVmap`] lookup refers to (created just before the rule).
    pub fn encode(&self, w: &mut Writer, anon_id: u32) {
        let elem = w.nest(NFTA_LIST_ELEM);
        w.str(NFTA_EXPR_NAME, self.name());
        let d = w.nest(NFTA_EXPR_DATA);
        match self {
            Expr::Payload { base, offset, len, dreg } => {
                w.u32(1, *dreg);
                w.u32(2, *base);
                w.u32(3, *offset);
                w.u32(4, *len);
            }
            Expr::Meta { key, dreg } => {
                w.u32(1, *dreg);
                w.u32(2, *key);
            }
            Expr::MetaSet { key, sreg } => {
                w.u32(2, *key);
                w.u32(3, *sreg);
            }
            Expr::Ct { key, dreg } => {
                w.u32(1, *dreg);
                w.u32(2, *key);
            }
            Expr::Cmp { sreg, op, data } => {
                w.u32(1, *sreg);
                w.u32(2, *op);
                data_value(w, 3, data);
            }
            Expr::Bitwise { sreg, dreg, len, mask, xor } => {
                w.u32(1, *sreg);
                w.u32(2, *dreg);
                w.u32(3, *len);
                data_value(w, 4, mask);
                data_value(w, 5, xor);
            }
            Expr::Immediate { dreg, data } => {
                w.u32(1, *dreg);
                data_value(w, 2, data);
            }
            Expr::Verdict(v) => {
                w.u32(1, 0);
                let n = w.nest(2);
                v.encode(w);
                w.nest_end(n);
            }
            Expr::Lookup { sreg, set, dreg, invert } => {
                match set {
                    SetRef::Named(name) | SetRef::Unresolved(name) => w.str(1, name),
                    SetRef::AnonVmap(_) => {
                        w.str(1, ANON_MAP_NAME);
                        w.u32(4, anon_id);
                    }
                }
                w.u32(2, *sreg);
                if let Some(d) = dreg {
                    w.u32(3, *d);
                }
                if *invert {
                    w.u32(5, 1);
                }
            }
            Expr::Numgen { dreg, modulus, offset } => {
                w.u32(1, *dreg);
                w.u32(2, *modulus);
                w.u32(3, 1); // NFT_NG_RANDOM
                if *offset != 0 {
                    w.u32(4, *offset);
                }
            }
            Expr::Byteorder { sreg, dreg, op, len, size } => {
                w.u32(1, *sreg);
                w.u32(2, *dreg);
                w.u32(3, *op);
                w.u32(4, *len);
                w.u32(5, *size);
            }
            Expr::Fib { flags, result, dreg } => {
                w.u32(1, *dreg);
                w.u32(2, *result);
                w.u32(3, *flags);
            }
            Expr::Dnat { family, reg_addr, reg_proto, flags } => {
                w.u32(1, 1); // NFT_NAT_DNAT
                w.u32(2, *family);
                w.u32(3, *reg_addr);
                w.u32(5, *reg_proto);
                w.u32(7, *flags);
            }
            Expr::Masq { flags } => {
                if *flags != 0 {
                    w.u32(1, *flags);
                }
            }
            Expr::Reject { kind, code } => {
                w.u32(1, *kind);
                w.attr(2, &[*code]);
            }
            Expr::Dynset { op, sreg_key, set } => {
                w.str(1, set);
                w.u32(3, *op);
                w.u32(4, *sreg_key);
            }
            Expr::Unknown(_) => {}
        }
        w.nest_end(d);
        w.nest_end(elem);
    }

    /// From one NFTA_LIST_ELEM's payload. Never fails: what cannot be read is `Unknown`.
    pub fn decode(b: &[u8]) -> Expr {
        let (mut name, mut data) = (String::new(), &[][..]);
        for (t, p) in attrs(b) {
            match t {
                NFTA_EXPR_NAME => name = string(p),
                NFTA_EXPR_DATA => data = p,
                _ => {}
            }
        }
        decode_data(&name, data).unwrap_or(Expr::Unknown(name))
    }
}

fn decode_data(name: &str, data: &[u8]) -> Option<Expr> {
    let mut u = [None::<u32>; 12];
    let mut raw: [&[u8]; 12] = [&[]; 12];
    for (t, p) in attrs(data) {
        if let Some(slot) = u.get_mut(t as usize) {
            *slot = be32(p);
            raw[t as usize] = p;
        }
    }
    Some(match name {
        "payload" if u[5].is_none() => Expr::Payload { dreg: u[1]?, base: u[2]?, offset: u[3]?, len: u[4]? },
        "meta" => match (u[1], u[3]) {
            (Some(dreg), None) => Expr::Meta { key: u[2]?, dreg },
            (None, Some(sreg)) => Expr::MetaSet { key: u[2]?, sreg },
            _ => return None,
        },
        "ct" if u[3].is_none() => Expr::Ct { dreg: u[1]?, key: u[2]? },
        "cmp" => Expr::Cmp { sreg: u[1]?, op: u[2]?, data: value_of(raw[3])? },
        "bitwise" if u[6].unwrap_or(0) == 0 => {
            Expr::Bitwise { sreg: u[1]?, dreg: u[2]?, len: u[3]?, mask: value_of(raw[4])?, xor: value_of(raw[5])? }
        }
        "immediate" => {
            let dreg = u[1]?;
            match attrs(raw[2]).next()? {
                (NFTA_DATA_VALUE, p) => Expr::Immediate { dreg, data: p.to_vec() },
                (NFTA_DATA_VERDICT, p) if dreg == 0 => Expr::Verdict(Verdict::decode(p)?),
                _ => return None,
            }
        }
        "lookup" => Expr::Lookup {
            set: SetRef::Named(string(raw[1])),
            sreg: u[2]?,
            dreg: u[3],
            invert: u[5].unwrap_or(0) & 1 == 1,
        },
        "numgen" if u[3] == Some(1) => Expr::Numgen { dreg: u[1]?, modulus: u[2]?, offset: u[4].unwrap_or(0) },
        "byteorder" => Expr::Byteorder { sreg: u[1]?, dreg: u[2]?, op: u[3]?, len: u[4]?, size: u[5]? },
        "fib" => Expr::Fib { dreg: u[1]?, result: u[2]?, flags: u[3]? },
        // The kernel reports the address range's max register (= min) and sets MAP_IPS itself.
        "nat" if u[1] == Some(1) => {
            Expr::Dnat { family: u[2]?, reg_addr: u[3]?, reg_proto: u[5]?, flags: u[7].unwrap_or(0) | 1 }
        }
        "masq" => Expr::Masq { flags: u[1].unwrap_or(0) },
        "reject" => Expr::Reject { kind: u[1]?, code: *raw[2].first()? },
        "dynset" if u[5].is_none() => Expr::Dynset { set: string(raw[1]), op: u[3]?, sreg_key: u[4]? },
        _ => return None,
    })
}

/// Rule expressions as nft's `--debug=netlink` prints them (roughly): for rules that are not
/// kpx's, in the admin API's kernel view.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        match self {
            Expr::Payload { base, offset, len, dreg } => {
                write!(f, "[ payload load {len}b @ base {base} + {offset} => reg {dreg} ]")
            }
            Expr::Meta { key, dreg } => write!(f, "[ meta load {key} => reg {dreg} ]"),
            Expr::MetaSet { key, sreg } => write!(f, "[ meta set {key} with reg {sreg} ]"),
            Expr::Ct { key, dreg } => write!(f, "[ ct load {key} => reg {dreg} ]"),
            Expr::Cmp { sreg, op, data } => write!(f, "[ cmp op {op} reg {sreg} 0x{} ]", hex(data)),
            Expr::Bitwise { sreg, dreg, mask, xor, .. } => {
                write!(f, "[ bitwise reg {dreg} = ( reg {sreg} & 0x{} ) ^ 0x{} ]", hex(mask), hex(xor))
            }
            Expr::Immediate { dreg, data } => write!(f, "[ immediate reg {dreg} 0x{} ]", hex(data)),
            Expr::Verdict(v) => write!(f, "[ immediate reg 0 {v} ]"),
            Expr::Lookup { sreg, set, dreg, invert } => {
                let set = match set {
                    SetRef::Named(n) | SetRef::Unresolved(n) => n.clone(),
                    SetRef::AnonVmap(e) => format!("{{ {} elements }}", e.len()),
                };
                let inv = if *invert { " 0x1" } else { "" };
                let d = dreg.map(|d| format!(" dreg {d}")).unwrap_or_default();
                write!(f, "[ lookup reg {sreg} set {set}{d}{inv} ]")
            }
            Expr::Numgen { dreg, modulus, offset } => {
                write!(f, "[ numgen reg {dreg} = random mod {modulus} offset {offset} ]")
            }
            Expr::Byteorder { sreg, dreg, op, len, size } => {
                let op = if *op == 1 { "hton" } else { "ntoh" };
                write!(f, "[ byteorder reg {dreg} = {op}(reg {sreg}, {size}, {len}) ]")
            }
            Expr::Fib { flags, result, dreg } => write!(f, "[ fib flags {flags} result {result} => reg {dreg} ]"),
            Expr::Dnat { family, reg_addr, reg_proto, flags } => {
                write!(f, "[ nat dnat {family} addr_min reg {reg_addr} proto_min reg {reg_proto} flags {flags:#x} ]")
            }
            Expr::Masq { flags } => write!(f, "[ masq flags {flags:#x} ]"),
            Expr::Reject { kind, code } => write!(f, "[ reject type {kind} code {code} ]"),
            Expr::Dynset { op, sreg_key, set } => write!(f, "[ dynset op {op} reg_key {sreg_key} set {set} ]"),
            Expr::Unknown(n) => write!(f, "[ {n} ]"),
        }
    }
}
