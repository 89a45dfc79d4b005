//! Which service each element of a shared map belongs to. Two services wanting one element (the
//! same cluster IP and port, say): the first keeps it and the other waits for it; when the owner
//! lets it go, the waiting service is rendered again in the same transaction and takes it over,
//! so a delta leaves what a full sync of the same state would. Endpoint map ranges need no
//! owner: each policy chain has a range of its own; hairpin pairs are shared, not owned (see
//! `desired::Pairs`).

use std::collections::{BTreeMap, BTreeSet};

use super::endpoints;
use super::layout::Lowered;

/// An element: its set, its key bytes and whether it ends a range.
type ElemAt = (String, (Vec<u8>, bool));

/// BTreeMaps: growing never rehashes a whole table in the middle of a delta.
#[derive(Debug, Clone, Default)]
pub struct Owners {
    owner: BTreeMap<String, BTreeMap<(Vec<u8>, bool), String>>,
    waiting: BTreeMap<ElemAt, BTreeSet<String>>,
    waits: BTreeMap<String, Vec<ElemAt>>,
}

fn owned_sets(l: &Lowered) -> impl Iterator<Item = (&String, &super::layout::LElems)> {
    l.elements.iter().filter(|(s, _)| !endpoints::is_map(s))
}

impl Owners {
    /// Records `key` as the owner of its elements that nobody owns; drops from `l` those another
    /// service owns (and remembers that `key` waits for them).
    pub fn claim(&mut self, key: &str, l: &mut Lowered) {
        for (set, elems) in l.elements.iter_mut().filter(|(s, _)| !endpoints::is_map(s)) {
            let of_set = self.owner.entry(set.clone()).or_default();
            elems.retain(|k, _| {
                let owner = of_set.entry(k.clone()).or_insert_with(|| key.to_string());
                if owner == key {
                    return true;
                }
                let at = (set.clone(), k.clone());
                self.waiting.entry(at.clone()).or_default().insert(key.to_string());
                self.waits.entry(key.to_string()).or_default().push(at);
                false
            });
        }
    }

    /// Frees what `key` owned in `l` and forgets what it waited for (before `key` is rendered
    /// again or removed).
    pub fn release(&mut self, key: &str, l: &Lowered) {
        for at in self.waits.remove(key).unwrap_or_default() {
            if let Some(w) = self.waiting.get_mut(&at) {
                w.remove(key);
                if w.is_empty() {
                    self.waiting.remove(&at);
                }
            }
        }
        for (set, elems) in owned_sets(l) {
            let Some(of_set) = self.owner.get_mut(set) else { continue };
            for k in elems.keys() {
                if of_set.get(k).is_some_and(|o| o == key) {
                    of_set.remove(k);
                }
            }
        }
    }

    /// The services waiting for an element of `freed` that nobody owns now: they are to be
    /// rendered again to take it over.
    pub fn waiting_for(&self, freed: &Lowered) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (set, elems) in owned_sets(freed) {
            for k in elems.keys() {
                let free = self.owner.get(set).is_none_or(|o| !o.contains_key(k));
                if free && let Some(w) = self.waiting.get(&(set.clone(), k.clone())) {
                    out.extend(w.iter().cloned());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::nftables::layout::LElems;
    use kpx_nft_netlink::Element;

    fn with(keys: &[u8]) -> Lowered {
        let mut l = Lowered::default();
        let e: LElems =
            keys.iter().map(|k| ((vec![*k], false), Element { key: vec![*k], ..Default::default() })).collect();
        l.elements.insert("service-ips".into(), e);
        l
    }

    #[test]
    fn a_released_element_goes_to_the_service_waiting_for_it() {
        let mut o = Owners::default();
        let (mut a, mut b) = (with(&[1, 2]), with(&[2, 3]));
        o.claim("a", &mut a);
        o.claim("b", &mut b);
        assert_eq!(b.elements["service-ips"].len(), 1, "b waits for 2");
        o.release("a", &with(&[1, 2]));
        assert_eq!(o.waiting_for(&with(&[1, 2])), BTreeSet::from(["b".to_string()]));
        o.release("b", &b);
        let mut b = with(&[2, 3]);
        o.claim("b", &mut b);
        assert_eq!(b.elements["service-ips"].len(), 2, "b owns 2 now");
        assert!(o.waiting_for(&with(&[1, 2])).is_empty());
        // a comes back: 2 is b's, a waits.
        let mut a = with(&[1, 2]);
        o.claim("a", &mut a);
        assert_eq!(a.elements["service-ips"].len(), 1);
    }
}
