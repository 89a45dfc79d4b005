//! Endpoint maps: where kpx keeps a service's endpoints instead of kube-proxy's per-endpoint
//! chains (docs/nftables.md says why: on nf_tables every transaction walks every chain, and one
//! that adds a rule or a goto walks every chain reachable from the hooks, so 100,000 endpoint
//! chains cost ~100 ms per change; elements of a data map cost neither).
//!
//! A policy chain (`service-…`, `local-…`) picks an endpoint with one rule,
//! `meta l4proto tcp dnat ip to numgen random mod 65535 offset O map @endpoints-K`, and map
//! `endpoints-K` maps ranges of O + [0, 65535) to `address . port`: N endpoints get N equal
//! ranges (to within one value in 65535). An endpoint change replaces the chain's ranges, element
//! operations only: no rule, no chain, nothing the kernel validates. Each map holds
//! [`PER_MAP`] policy chains (the kernel checks every element added against every rule that
//! reads the map, and walks a map's elements when a new rule reads it: both stay small), each
//! chain its own key range; [`Slots`] hands them out and reads them back from a dump, so a
//! restarted agent keeps them. Hairpin traffic (a pod reaching itself through a service), which
//! kube-proxy marks in the endpoint chain, is masqueraded by one rule matching the address pairs
//! in set `hairpin-endpoints`.

use std::collections::{BTreeMap, BTreeSet};

use kpx_nft_netlink::consts::{NFT_SET_INTERVAL, NFT_SET_MAP};
use kpx_nft_netlink::{Expr, Set, SetRef, TableDump};

use crate::backend::iptables::render::IpFamily;

/// numgen's modulus: each policy chain owns `offset + [0, SLOTS)`.
pub const SLOTS: u32 = 65535;
/// Policy chains per endpoint map.
pub const PER_MAP: u32 = 64;
pub const MAP_PREFIX: &str = "endpoints-";
pub const HAIRPIN: &str = "hairpin-endpoints";

pub fn map_name(id: u32) -> String {
    format!("{MAP_PREFIX}{}", id / PER_MAP)
}

pub fn is_map(set: &str) -> bool {
    set.starts_with(MAP_PREFIX)
}

/// Which policy chain's range an endpoint map element is in (its key's high 16 bits; the
/// range's end element too, at offset + 65535).
pub fn range_group(key: &[u8]) -> &[u8] {
    &key[..key.len().min(2)]
}

/// The start of policy chain `id`'s key range in its map.
pub fn offset(id: u32) -> u32 {
    (id % PER_MAP) << 16
}

/// More endpoint maps than any cluster needs (4 million policy chains): a bound on what a
/// hand-edited rule can make kpx allocate.
const MAX_MAPS: u32 = 1 << 16;

/// The inverse of (map_name, offset), for a rule read from the kernel.
fn id_of(map: &str, offset: u32) -> Option<u32> {
    let k: u32 = map.strip_prefix(MAP_PREFIX)?.parse().ok()?;
    let slot = offset >> 16;
    (offset & 0xffff == 0 && slot < PER_MAP && k < MAX_MAPS).then_some(k * PER_MAP + slot)
}

/// `n` endpoints' shares of [0, SLOTS): (first, last) values, inclusive, in order.
pub fn ranges(n: usize) -> Vec<(u32, u32)> {
    let n = n as u64;
    let at = |j: u64| (j * u64::from(SLOTS) / n) as u32;
    (0..n).map(|j| (at(j), at(j + 1) - 1)).collect()
}

/// nft's set user data (libnftnl's TLVs: type, length, value): what makes `nft list` print an
/// endpoint map as `typeof numgen random mod 65535 : ip daddr . tcp dport` with its ranges and
/// addresses, and the hairpin set's keys as address pairs. Without it nft prints raw integers.
/// The values are nft 1.0's (expression types numgen 0x17, concat 0x0d, payload 7; protocol
/// and field numbers of its header templates).
mod udata {
    fn tlv(out: &mut Vec<u8>, t: u8, v: &[u8]) {
        out.push(t);
        out.push(v.len() as u8);
        out.extend_from_slice(v);
    }

    fn u32v(out: &mut Vec<u8>, t: u8, v: u32) {
        tlv(out, t, &v.to_ne_bytes());
    }

    fn nested(out: &mut Vec<u8>, t: u8, f: impl FnOnce(&mut Vec<u8>)) {
        let mut inner = Vec::new();
        f(&mut inner);
        tlv(out, t, &inner);
    }

    /// `typeof` of a concatenation of two payload fields.
    fn concat(out: &mut Vec<u8>, t: u8, fields: [(u32, u32); 2]) {
        nested(out, t, |o| {
            u32v(o, 0, 0x0d);
            nested(o, 1, |o| {
                for (i, (proto, field)) in fields.into_iter().enumerate() {
                    nested(o, i as u8, |o| {
                        u32v(o, 0, 7);
                        nested(o, 1, |o| {
                            u32v(o, 0, proto);
                            u32v(o, 1, field);
                        });
                    });
                }
            });
        });
    }

    /// (nft's protocol number, saddr field, daddr field) of the network header.
    fn ip(v6: bool) -> (u32, u32, u32) {
        if v6 { (13, 8, 9) } else { (12, 11, 12) }
    }

    pub fn endpoint_map(v6: bool, slots: u32) -> Vec<u8> {
        let mut out = Vec::new();
        u32v(&mut out, 0, 1); // key byte order: host (numgen's)
        u32v(&mut out, 1, 0);
        nested(&mut out, 3, |o| {
            u32v(o, 0, 0x17);
            nested(o, 1, |o| {
                u32v(o, 0, 1); // random
                u32v(o, 1, slots);
                u32v(o, 2, 0);
            });
        });
        let (proto, _, daddr) = ip(v6);
        concat(&mut out, 4, [(proto, daddr), (8, 2)]); // . tcp dport
        u32v(&mut out, 6, 0);
        out
    }

    pub fn hairpin(v6: bool) -> Vec<u8> {
        let mut out = Vec::new();
        u32v(&mut out, 0, 0);
        let (proto, saddr, daddr) = ip(v6);
        concat(&mut out, 3, [(proto, saddr), (proto, daddr)]);
        out
    }
}

const TYPE_INTEGER: u32 = 4;
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_SERVICE: u32 = 13;

fn addr(f: IpFamily) -> (u32, u32) {
    match f {
        IpFamily::V4 => (TYPE_IPADDR, 4),
        IpFamily::V6 => (TYPE_IP6ADDR, 16),
    }
}

/// Endpoint map `name`: ranges of numgen values to address . port.
pub fn endpoint_map(f: IpFamily, name: &str) -> Set {
    let (t, len) = addr(f);
    Set {
        name: name.into(),
        flags: NFT_SET_MAP | NFT_SET_INTERVAL,
        key_type: TYPE_INTEGER,
        key_len: 4,
        data_type: Some((t << 6) | TYPE_INET_SERVICE),
        data_len: len + 4,
        udata: udata::endpoint_map(f == IpFamily::V6, SLOTS),
        ..Default::default()
    }
}

/// The set of `endpoint . endpoint` address pairs (hairpin traffic after DNAT).
pub fn hairpin_set(f: IpFamily) -> Set {
    let (t, len) = addr(f);
    Set {
        name: HAIRPIN.into(),
        key_type: (t << 6) | t,
        key_len: 2 * len,
        udata: udata::hairpin(f == IpFamily::V6),
        ..Default::default()
    }
}

/// Which policy chain owns which key range of which endpoint map. Ids are handed out lowest
/// first (so a small cluster uses one map); an id given up stays taken until the transaction
/// that stops using it has committed ([`Slots::settle`]), so no transaction deletes and adds the
/// same range for two different chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slots {
    by_chain: BTreeMap<String, u32>,
    taken: BTreeSet<u32>,
    /// Given up, not free before [`Slots::settle`].
    held: BTreeSet<u32>,
    /// Free ids below `next`.
    free: BTreeSet<u32>,
    next: u32,
    /// Taken ids per endpoint map.
    per_map: BTreeMap<u32, usize>,
}

impl Slots {
    /// The id of `chain`'s range, given one if it has none.
    pub fn id(&mut self, chain: &str) -> u32 {
        if let Some(id) = self.by_chain.get(chain) {
            return *id;
        }
        let id = self.free.pop_first().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        });
        self.take(chain, id);
        id
    }

    fn take(&mut self, chain: &str, id: u32) {
        self.by_chain.insert(chain.to_string(), id);
        self.taken.insert(id);
        *self.per_map.entry(id / PER_MAP).or_default() += 1;
    }

    /// `chain` no longer has a range (from the next [`Slots::settle`] on, its id can be reused).
    pub fn release(&mut self, chain: &str) {
        if let Some(id) = self.by_chain.remove(chain) {
            self.taken.remove(&id);
            self.held.insert(id);
            if let Some(n) = self.per_map.get_mut(&(id / PER_MAP)) {
                *n -= 1;
                if *n == 0 {
                    self.per_map.remove(&(id / PER_MAP));
                }
            }
        }
    }

    /// Releases every chain not in `keep`.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self.by_chain.keys().filter(|c| !keep(c)).cloned().collect();
        gone.iter().for_each(|c| self.release(c));
    }

    /// The transaction committed: released ids are free.
    pub fn settle(&mut self) {
        self.free.append(&mut self.held);
    }

    /// The endpoint maps the chains' ranges are in.
    pub fn maps(&self) -> BTreeSet<String> {
        self.per_map.keys().map(|k| map_name(k * PER_MAP)).collect()
    }

    /// The ranges a table holds, read from its policy chains' rules (a rule whose numgen offset
    /// or map is not one kpx writes, or that another chain already has, is ignored: that chain
    /// gets a new range and its rule is rewritten).
    pub fn from_dump(d: &TableDump) -> Slots {
        let mut s = Slots::default();
        for r in &d.rules {
            let mut offset = None;
            for e in &r.exprs {
                match e {
                    Expr::Numgen { modulus: SLOTS, offset: o, .. } => offset = Some(*o),
                    Expr::Lookup { set: SetRef::Named(map), .. } if map.starts_with(MAP_PREFIX) => {
                        if let Some(id) = offset.and_then(|o| id_of(map, o))
                            && !s.by_chain.contains_key(&r.chain)
                            && !s.taken.contains(&id)
                        {
                            s.take(&r.chain, id);
                        }
                    }
                    _ => {}
                }
            }
        }
        s.next = s.taken.last().map_or(0, |m| m + 1);
        s.free = (0..s.next).filter(|i| !s.taken.contains(i)).collect();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_the_values_evenly_and_cover_them() {
        for n in [1, 2, 3, 7, 10, 1000, 65535] {
            let r = ranges(n);
            assert_eq!(r.len(), n);
            assert_eq!((r[0].0, r[n - 1].1), (0, SLOTS - 1));
            assert!(r.windows(2).all(|w| w[1].0 == w[0].1 + 1));
            let sizes: Vec<u32> = r.iter().map(|(a, b)| b - a + 1).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "n={n}");
        }
    }

    #[test]
    fn ids_are_reused_only_after_the_transaction_settles() {
        let mut s = Slots::default();
        assert_eq!((s.id("a"), s.id("b"), s.id("a")), (0, 1, 0));
        s.release("a");
        assert_eq!(s.id("c"), 2, "a's range is still in the kernel until the commit");
        assert_eq!(s.maps(), BTreeSet::from(["endpoints-0".to_string()]));
        s.release("b");
        s.release("c");
        assert!(s.maps().is_empty(), "no chain has a range in endpoints-0");
        s.settle();
        assert_eq!(s.id("d"), 0);
        assert_eq!((offset(65), map_name(65)), (1 << 16, "endpoints-1".to_string()));
        assert_eq!(id_of("endpoints-1", 1 << 16), Some(65));
        assert_eq!(id_of("endpoints-1", (1 << 16) + 1), None);
        assert_eq!(id_of("endpoints-x", 0), None);
        assert_eq!(id_of("endpoints-4000000", 0), None);
    }

    #[test]
    fn user_data_is_what_nft_writes() {
        // Captured from nft 1.0.6: `map m { typeof numgen random mod 65535 : ip daddr . tcp dport ; flags interval ; }`.
        let nft = [
            0x00, 0x04, 0x01, 0x00, 0x00, 0x00, 0x01, 0x04, 0x00, 0x00, 0x00, 0x00, 0x03, 0x1a, 0x00, 0x04, 0x17, 0x00,
            0x00, 0x00, 0x01, 0x12, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00, 0x01, 0x04, 0xff, 0xff, 0x00, 0x00, 0x02, 0x04,
            0x00, 0x00, 0x00, 0x00, 0x04, 0x34, 0x00, 0x04, 0x0d, 0x00, 0x00, 0x00, 0x01, 0x2c, 0x00, 0x14, 0x00, 0x04,
            0x07, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x04, 0x0c, 0x00, 0x00, 0x00, 0x01, 0x04, 0x0c, 0x00, 0x00, 0x00,
            0x01, 0x14, 0x00, 0x04, 0x07, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x04, 0x08, 0x00, 0x00, 0x00, 0x01, 0x04,
            0x02, 0x00, 0x00, 0x00, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00,
        ];
        if cfg!(target_endian = "little") {
            assert_eq!(udata::endpoint_map(false, SLOTS), nft);
        }
        // `set s { typeof ip6 saddr . ip6 daddr ; }`
        let nft6 = [
            0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x03, 0x34, 0x00, 0x04, 0x0d, 0x00, 0x00, 0x00, 0x01, 0x2c, 0x00, 0x14,
            0x00, 0x04, 0x07, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x04, 0x0d, 0x00, 0x00, 0x00, 0x01, 0x04, 0x08, 0x00,
            0x00, 0x00, 0x01, 0x14, 0x00, 0x04, 0x07, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x04, 0x0d, 0x00, 0x00, 0x00,
            0x01, 0x04, 0x09, 0x00, 0x00, 0x00,
        ];
        if cfg!(target_endian = "little") {
            assert_eq!(udata::hairpin(true), nft6);
        }
    }
}
