//! The objects of one table (chains, sets and maps, their elements, rules) and their messages:
//! [`Batch`] writes a transaction, the `decode_*` functions read dump replies.

use netlink_packet_core::{NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST};

use crate::consts::*;
use crate::expr::{ANON_MAP_NAME, Expr, SetRef, Verdict};
use crate::wire::{Writer, attrs, be32, be64, nft_payload, string};

/// A base chain's hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// "filter" or "nat".
    pub kind: String,
    /// NF_INET_PRE_ROUTING (0), LOCAL_IN (1), FORWARD (2), LOCAL_OUT (3), POST_ROUTING (4).
    pub hooknum: u32,
    pub priority: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub hook: Option<Hook>,
}

/// A named set or map.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Set {
    pub name: String,
    pub flags: u32,
    /// nft's datatype id (concatenations: 6 bits per part), for `nft list` to print elements.
    pub key_type: u32,
    pub key_len: u32,
    /// Verdict maps: NFT_DATA_VERDICT; data maps: nft's datatype id of the values.
    pub data_type: Option<u32>,
    /// Bytes of a data map's values (0 for verdict maps and sets).
    pub data_len: u32,
    /// Lengths of a concatenated key's parts, for sets of ranges of concatenations
    /// (NFT_SET_CONCAT | NFT_SET_INTERVAL); empty otherwise.
    pub fields: Vec<u32>,
    /// nft's user data (how `nft list` types keys and values: `typeof ...`); empty: none.
    pub udata: Vec<u8>,
    pub timeout_ms: Option<u64>,
}

/// A set element: its key bytes and, in a map, its verdict or its value. In an interval set an
/// element starts a range that runs up to the next element; `interval_end` marks an element
/// that only ends one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Element {
    pub key: Vec<u8>,
    pub verdict: Option<Verdict>,
    pub value: Option<Vec<u8>>,
    pub interval_end: bool,
    /// The end of a range of concatenations (the key is its start).
    pub key_end: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: String,
    pub exprs: Vec<Expr>,
    pub comment: Option<String>,
    /// Kernel handle (dumps only; 0 when written).
    pub handle: u64,
}

/// NLA payloads are at most 64 KiB; element lists are split well below.
const MAX_ELEMENTS_BYTES: usize = 32 * 1024;

/// One transaction: BATCH_BEGIN, the operations, BATCH_END, all in one buffer that is sent as
/// one datagram (the kernel applies all of it or none of it).
#[derive(Debug)]
pub struct Batch {
    w: Writer,
    family: u8,
    table: String,
    seq: u32,
    anon: u32,
    /// Operations (messages other than begin/end) so far.
    pub ops: usize,
    /// The sequence number of the first operation (errors name operations by theirs).
    pub first_seq: u32,
}

impl Batch {
    /// A batch for `table` of `family` (NFPROTO_IPV4 / NFPROTO_IPV6); `seq` numbers its messages.
    pub fn new(family: u8, table: &str, seq: u32) -> Batch {
        let first_seq = seq.wrapping_add(2);
        let mut b = Batch { w: Writer::new(), family, table: table.to_string(), seq, anon: 0, ops: 0, first_seq };
        let s = b.next_seq();
        b.w.begin(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, s, 0, NFNL_SUBSYS_NFTABLES);
        b.w.end();
        b
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn begin(&mut self, msg: u16, flags: u16) {
        let seq = self.next_seq();
        self.w.begin_nft(msg, NLM_F_REQUEST | flags, seq, self.family);
        self.ops += 1;
    }

    /// Closes the batch; returns (bytes, the sequence number of the last operation, which asks
    /// for an ack so the sender knows when the kernel is done).
    pub fn finish(mut self) -> (Vec<u8>, u32) {
        let last = self.seq;
        // The last operation asks for an ack: its reply (ack or error) comes after every error
        // of the batch, so the reader knows it has them all.
        if self.ops > 0 {
            let start = last_message_start(&self.w.buf);
            let flags = u16::from_ne_bytes([self.w.buf[start + 6], self.w.buf[start + 7]]) | NLM_F_ACK;
            self.w.buf[start + 6..start + 8].copy_from_slice(&flags.to_ne_bytes());
        }
        let seq = self.next_seq();
        self.w.begin(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES);
        self.w.end();
        (self.w.buf, last)
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.w.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }

    /// Creates the table (no error if it exists), with a comment as nft writes it.
    pub fn add_table(&mut self, comment: &str) {
        self.begin(NFT_MSG_NEWTABLE, NLM_F_CREATE);
        self.w.str(NFTA_TABLE_NAME, &self.table.clone());
        self.w.u32(NFTA_TABLE_FLAGS, 0);
        self.w.attr(NFTA_TABLE_USERDATA, &udata_comment(comment));
        self.w.end();
    }

    pub fn del_table(&mut self) {
        self.begin(NFT_MSG_DELTABLE, 0);
        self.w.str(NFTA_TABLE_NAME, &self.table.clone());
        self.w.end();
    }

    pub fn add_chain(&mut self, c: &Chain) {
        self.begin(NFT_MSG_NEWCHAIN, NLM_F_CREATE);
        let table = self.table.clone();
        self.w.str(NFTA_CHAIN_TABLE, &table);
        self.w.str(NFTA_CHAIN_NAME, &c.name);
        if let Some(h) = &c.hook {
            let n = self.w.nest(NFTA_CHAIN_HOOK);
            self.w.u32(NFTA_HOOK_HOOKNUM, h.hooknum);
            self.w.u32(NFTA_HOOK_PRIORITY, h.priority as u32);
            self.w.nest_end(n);
            self.w.u32(NFTA_CHAIN_POLICY, NF_ACCEPT as u32);
            self.w.str(NFTA_CHAIN_TYPE, &h.kind);
        }
        self.w.end();
    }

    /// Deletes every rule of `chain` (nft's `flush chain`).
    pub fn flush_chain(&mut self, chain: &str) {
        self.begin(NFT_MSG_DELRULE, 0);
        let table = self.table.clone();
        self.w.str(NFTA_RULE_TABLE, &table);
        self.w.str(NFTA_RULE_CHAIN, chain);
        self.w.end();
    }

    /// Deletes an empty chain nothing refers to.
    pub fn del_chain(&mut self, chain: &str) {
        self.begin(NFT_MSG_DELCHAIN, 0);
        let table = self.table.clone();
        self.w.str(NFTA_CHAIN_TABLE, &table);
        self.w.str(NFTA_CHAIN_NAME, chain);
        self.w.end();
    }

    pub fn add_set(&mut self, s: &Set) {
        self.begin(NFT_MSG_NEWSET, NLM_F_CREATE);
        let table = self.table.clone();
        self.w.str(NFTA_SET_TABLE, &table);
        self.w.str(NFTA_SET_NAME, &s.name);
        self.w.u32(NFTA_SET_FLAGS, s.flags);
        self.w.u32(NFTA_SET_KEY_TYPE, s.key_type);
        self.w.u32(NFTA_SET_KEY_LEN, s.key_len);
        if let Some(d) = s.data_type {
            self.w.u32(NFTA_SET_DATA_TYPE, d);
            self.w.u32(NFTA_SET_DATA_LEN, s.data_len);
        }
        if let Some(t) = s.timeout_ms {
            self.w.u64(NFTA_SET_TIMEOUT, t);
        }
        if !s.udata.is_empty() {
            self.w.attr(NFTA_SET_USERDATA, &s.udata);
        }
        if !s.fields.is_empty() {
            let d = self.w.nest(NFTA_SET_DESC);
            let c = self.w.nest(NFTA_SET_DESC_CONCAT);
            for f in &s.fields {
                let e = self.w.nest(NFTA_LIST_ELEM);
                self.w.u32(NFTA_SET_FIELD_LEN, *f);
                self.w.nest_end(e);
            }
            self.w.nest_end(c);
            self.w.nest_end(d);
        }
        // The kernel requires a transaction id on every new set.
        self.anon += 1;
        self.w.u32(NFTA_SET_ID, self.anon);
        self.w.end();
    }

    pub fn del_set(&mut self, name: &str) {
        self.begin(NFT_MSG_DELSET, 0);
        let table = self.table.clone();
        self.w.str(NFTA_SET_TABLE, &table);
        self.w.str(NFTA_SET_NAME, name);
        self.w.end();
    }

    pub fn add_elements<'a>(&mut self, set: &str, elems: impl IntoIterator<Item = &'a Element>) {
        self.elements(NFT_MSG_NEWSETELEM, NLM_F_CREATE, set, None, elems);
    }

    pub fn del_elements<'a>(&mut self, set: &str, elems: impl IntoIterator<Item = &'a Element>) {
        self.elements(NFT_MSG_DELSETELEM, 0, set, None, elems);
    }

    fn elements<'a>(
        &mut self,
        msg: u16,
        flags: u16,
        set: &str,
        set_id: Option<u32>,
        elems: impl IntoIterator<Item = &'a Element>,
    ) {
        let mut open: Option<(usize, usize)> = None; // (list nest, message start)
        for e in elems {
            if let Some((list, start)) = open
                && self.w.buf.len() - start > MAX_ELEMENTS_BYTES
            {
                self.w.nest_end(list);
                self.w.end();
                open = None;
            }
            if open.is_none() {
                let start = self.w.buf.len();
                self.begin(msg, flags);
                let table = self.table.clone();
                self.w.str(NFTA_SET_ELEM_LIST_TABLE, &table);
                self.w.str(NFTA_SET_ELEM_LIST_SET, set);
                if let Some(id) = set_id {
                    self.w.u32(NFTA_SET_ELEM_LIST_SET_ID, id);
                }
                open = Some((self.w.nest(NFTA_SET_ELEM_LIST_ELEMENTS), start));
            }
            let n = self.w.nest(NFTA_LIST_ELEM);
            let k = self.w.nest(NFTA_SET_ELEM_KEY);
            self.w.attr(NFTA_DATA_VALUE, &e.key);
            self.w.nest_end(k);
            if let Some(end) = &e.key_end {
                let k = self.w.nest(NFTA_SET_ELEM_KEY_END);
                self.w.attr(NFTA_DATA_VALUE, end);
                self.w.nest_end(k);
            }
            if let Some(v) = &e.verdict {
                let d = self.w.nest(NFTA_SET_ELEM_DATA);
                v.encode(&mut self.w);
                self.w.nest_end(d);
            }
            if let Some(v) = &e.value {
                let d = self.w.nest(NFTA_SET_ELEM_DATA);
                self.w.attr(NFTA_DATA_VALUE, v);
                self.w.nest_end(d);
            }
            if e.interval_end {
                self.w.u32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
            }
            self.w.nest_end(n);
        }
        if let Some((list, _)) = open {
            self.w.nest_end(list);
            self.w.end();
        }
    }

    /// Appends a rule to its chain; an anonymous map it looks up is created just before it.
    pub fn add_rule(&mut self, r: &Rule) {
        let mut anon_id = 0;
        for e in &r.exprs {
            if let Expr::Lookup { set: SetRef::AnonVmap(entries), .. } = e {
                self.anon += 1;
                anon_id = self.anon;
                self.begin(NFT_MSG_NEWSET, NLM_F_CREATE);
                let table = self.table.clone();
                self.w.str(NFTA_SET_TABLE, &table);
                self.w.str(NFTA_SET_NAME, ANON_MAP_NAME);
                self.w.u32(NFTA_SET_FLAGS, NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | NFT_SET_MAP);
                self.w.u32(NFTA_SET_KEY_TYPE, 4); // nft's "integer"
                self.w.u32(NFTA_SET_KEY_LEN, 4);
                self.w.u32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
                self.w.u32(NFTA_SET_DATA_LEN, 0);
                self.w.u32(NFTA_SET_ID, anon_id);
                // nft's set user data: the key is in host byte order (numgen's register), so
                // `nft list` prints 1 rather than 16777216.
                let mut udata = vec![0u8, 4];
                udata.extend_from_slice(&1u32.to_ne_bytes());
                self.w.attr(NFTA_SET_USERDATA, &udata);
                self.w.end();
                let elems: Vec<Element> = entries
                    .iter()
                    .map(|(k, v)| Element {
                        key: k.to_ne_bytes().to_vec(),
                        verdict: Some(v.clone()),
                        ..Default::default()
                    })
                    .collect();
                self.elements(NFT_MSG_NEWSETELEM, NLM_F_CREATE, ANON_MAP_NAME, Some(anon_id), &elems);
            }
        }
        self.begin(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND);
        let table = self.table.clone();
        self.w.str(NFTA_RULE_TABLE, &table);
        self.w.str(NFTA_RULE_CHAIN, &r.chain);
        let list = self.w.nest(NFTA_RULE_EXPRESSIONS);
        for e in &r.exprs {
            e.encode(&mut self.w, anon_id);
        }
        self.w.nest_end(list);
        if let Some(c) = &r.comment {
            self.w.attr(NFTA_RULE_USERDATA, &udata_comment(c));
        }
        self.w.end();
    }
}

/// Where the last complete message of `buf` starts.
fn last_message_start(buf: &[u8]) -> usize {
    let mut at = 0;
    let mut last = 0;
    while at + 4 <= buf.len() {
        let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        if len == 0 {
            break;
        }
        last = at;
        at += (len + 3) & !3;
    }
    last
}

/// nft's user data with one comment TLV (type 0, NUL-terminated, at most 127 bytes).
fn udata_comment(text: &str) -> Vec<u8> {
    let mut t: String = text.chars().filter(|c| !c.is_control()).collect();
    while t.len() > 127 {
        t.pop();
    }
    let mut out = vec![0, (t.len() + 1) as u8];
    out.extend_from_slice(t.as_bytes());
    out.push(0);
    out
}

fn comment_of(udata: &[u8]) -> Option<String> {
    let mut rest = udata;
    while rest.len() >= 2 {
        let (ty, len) = (rest[0], rest[1] as usize);
        let value = rest.get(2..2 + len)?;
        if ty == 0 {
            return Some(string(value));
        }
        rest = &rest[2 + len..];
    }
    None
}

/// A dumped object's table name and attributes, if it is of `table`.
fn of_table<'a>(payload: &'a [u8], table_attr: u16, table: &str) -> Option<&'a [u8]> {
    let (_, a) = nft_payload(payload)?;
    attrs(a).any(|(t, p)| t == table_attr && string(p) == table).then_some(a)
}

pub fn decode_table_comment(payload: &[u8], table: &str) -> Option<Option<String>> {
    let a = of_table(payload, NFTA_TABLE_NAME, table)?;
    Some(attrs(a).find(|(t, _)| *t == NFTA_TABLE_USERDATA).and_then(|(_, p)| comment_of(p)))
}

pub fn decode_chain(payload: &[u8], table: &str) -> Option<Chain> {
    let a = of_table(payload, NFTA_CHAIN_TABLE, table)?;
    let (mut name, mut hook, mut kind) = (None, None, None);
    for (t, p) in attrs(a) {
        match t {
            NFTA_CHAIN_NAME => name = Some(string(p)),
            NFTA_CHAIN_TYPE => kind = Some(string(p)),
            NFTA_CHAIN_HOOK => {
                let (mut num, mut prio) = (None, None);
                for (t, p) in attrs(p) {
                    match t {
                        NFTA_HOOK_HOOKNUM => num = be32(p),
                        NFTA_HOOK_PRIORITY => prio = be32(p).map(|v| v as i32),
                        _ => {}
                    }
                }
                hook = num.zip(prio);
            }
            _ => {}
        }
    }
    let hook = hook.map(|(hooknum, priority)| Hook { kind: kind.unwrap_or_default(), hooknum, priority });
    Some(Chain { name: name?, hook })
}

pub fn decode_set(payload: &[u8], table: &str) -> Option<Set> {
    let a = of_table(payload, NFTA_SET_TABLE, table)?;
    let mut s = Set::default();
    for (t, p) in attrs(a) {
        match t {
            NFTA_SET_NAME => s.name = string(p),
            NFTA_SET_FLAGS => s.flags = be32(p)?,
            NFTA_SET_KEY_TYPE => s.key_type = be32(p)?,
            NFTA_SET_KEY_LEN => s.key_len = be32(p)?,
            NFTA_SET_DATA_TYPE => s.data_type = be32(p),
            NFTA_SET_DATA_LEN => s.data_len = be32(p)?,
            NFTA_SET_TIMEOUT => s.timeout_ms = be64(p),
            NFTA_SET_USERDATA => s.udata = p.to_vec(),
            NFTA_SET_DESC => {
                let concat = attrs(p).find(|(t, _)| *t == NFTA_SET_DESC_CONCAT);
                for (_, f) in concat.map(|(_, c)| attrs(c).collect::<Vec<_>>()).unwrap_or_default() {
                    s.fields.extend(attrs(f).filter(|(t, _)| *t == NFTA_SET_FIELD_LEN).filter_map(|(_, v)| be32(v)));
                }
            }
            _ => {}
        }
    }
    // The kernel reports a verdict's size; kpx writes 0 for verdict maps.
    if s.data_type.is_none_or(|d| d == NFT_DATA_VERDICT) {
        s.data_len = 0;
    }
    Some(s)
}

/// The elements of one NEWSETELEM dump message: (set name, elements).
pub fn decode_elements(payload: &[u8], table: &str) -> Option<(String, Vec<Element>)> {
    let a = of_table(payload, NFTA_SET_ELEM_LIST_TABLE, table)?;
    let (mut set, mut out) = (String::new(), Vec::new());
    for (t, p) in attrs(a) {
        match t {
            NFTA_SET_ELEM_LIST_SET => set = string(p),
            NFTA_SET_ELEM_LIST_ELEMENTS => {
                for (_, e) in attrs(p) {
                    let mut el = Element::default();
                    for (t, p) in attrs(e) {
                        match t {
                            NFTA_SET_ELEM_KEY => {
                                el.key = attrs(p).find(|(t, _)| *t == NFTA_DATA_VALUE)?.1.to_vec();
                            }
                            NFTA_SET_ELEM_DATA => match attrs(p).next()? {
                                (NFTA_DATA_VERDICT, v) => el.verdict = Verdict::decode(v),
                                (NFTA_DATA_VALUE, v) => el.value = Some(v.to_vec()),
                                _ => {}
                            },
                            NFTA_SET_ELEM_KEY_END => {
                                el.key_end = Some(attrs(p).find(|(t, _)| *t == NFTA_DATA_VALUE)?.1.to_vec());
                            }
                            NFTA_SET_ELEM_FLAGS => el.interval_end = be32(p)? & NFT_SET_ELEM_INTERVAL_END != 0,
                            _ => {}
                        }
                    }
                    out.push(el);
                }
            }
            _ => {}
        }
    }
    Some((set, out))
}

pub fn decode_rule(payload: &[u8], table: &str) -> Option<Rule> {
    let a = of_table(payload, NFTA_RULE_TABLE, table)?;
    let mut r = Rule { chain: String::new(), exprs: Vec::new(), comment: None, handle: 0 };
    for (t, p) in attrs(a) {
        match t {
            NFTA_RULE_CHAIN => r.chain = string(p),
            NFTA_RULE_HANDLE => r.handle = be64(p)?,
            NFTA_RULE_EXPRESSIONS => r.exprs = attrs(p).map(|(_, e)| Expr::decode(e)).collect(),
            NFTA_RULE_USERDATA => r.comment = comment_of(p),
            _ => {}
        }
    }
    Some(r)
}

pub fn decode_gen_id(payload: &[u8]) -> Option<u32> {
    let (_, a) = nft_payload(payload)?;
    attrs(a).find(|(t, _)| *t == NFTA_GEN_ID).and_then(|(_, p)| be32(p))
}
