//! The nftables backend's deltas: the changed services rendered again and diffed against what
//! the last sync installed for them, in one transaction.

use std::collections::{BTreeMap, BTreeSet};

use kpx_nft_netlink::NftError;

use super::super::desired;
use super::super::endpoints::{self, HAIRPIN};
use super::super::layout::{LElems, Lowered, TABLE};
use super::super::plan::{self, PlanStats};
use super::{NftBackend, log_skipped};
use crate::state::{AppliedState, ChangeSet};

impl NftBackend {
    /// A delta: the changed services rendered again and diffed against what the last sync
    /// installed for them, in one transaction. A refused one makes the next sync full, which
    /// rebuilds owners and ranges from the kernel.
    pub(super) fn partial_sync(&mut self, state: &AppliedState, changes: &ChangeSet) -> Result<PlanStats, NftError> {
        let before = self.known_gen();
        // The changed services rendered again; one that lets go of an element another service
        // waits for (the same cluster IP and port, say) has that service rendered too.
        let mut next: BTreeMap<String, Option<(Lowered, LElems)>> = BTreeMap::new();
        let mut todo: BTreeSet<String> = changes.services.clone();
        while let Some(key) = todo.pop_first() {
            let current = match next.get(&key) {
                Some(n) => n.as_ref().map(|(l, _)| l),
                None => self.services.get(&key),
            };
            if let Some(c) = current {
                self.owners.release(&key, c);
            }
            let new = state.services().get(&key).map(|e| {
                let (l, pairs, skipped) = desired::render_one(&self.render, &key, e, &mut self.slots, &mut self.owners);
                log_skipped(&skipped);
                (l, pairs)
            });
            if let Some(c) = current {
                todo.extend(self.owners.waiting_for(c));
                // A chain gone, or no longer balancing through an endpoint map (session
                // affinity turned on), gives its range up.
                for chain in c.chains.keys() {
                    if new.as_ref().is_none_or(|(n, _)| !desired::reads_endpoint_map(n, chain)) {
                        self.slots.release(chain);
                    }
                }
            }
            next.insert(key, new);
        }
        let mut batch = self.client.batch(self.cfg.nfproto(), TABLE);
        let mut st = PlanStats::default();
        let empty = (Lowered::default(), LElems::new());
        let old = |key: &String| self.services.get(key).unwrap_or(&empty.0);
        for (key, new) in &next {
            plan::removals(old(key), &new.as_ref().unwrap_or(&empty).0, &mut batch, &mut st);
        }
        // Endpoint maps no chain reads any more go (after the rules reading them); new ones
        // come before the rules that read them.
        let maps = self.slots.maps();
        for m in self.maps.difference(&maps) {
            batch.del_set(m);
            st.sets_deleted += 1;
        }
        for m in maps.difference(&self.maps) {
            batch.add_set(&endpoints::endpoint_map(self.cfg.family, m));
            st.sets_added += 1;
        }
        for (key, new) in &next {
            plan::additions(old(key), &new.as_ref().unwrap_or(&empty).0, &mut batch, &mut st);
        }
        let mut adj: BTreeMap<&Vec<u8>, i64> = BTreeMap::new();
        for (key, new) in &next {
            for (k, _) in self.service_pairs.get(key).unwrap_or(&empty.1).keys() {
                *adj.entry(k).or_default() -= 1;
            }
            for (k, _) in new.as_ref().unwrap_or(&empty).1.keys() {
                *adj.entry(k).or_default() += 1;
            }
        }
        // Hairpin pairs come and go with the last service that wants them.
        let had = |k: &Vec<u8>| self.pairs.get(k).copied().unwrap_or(0) as i64;
        let pair = |k: &Vec<u8>| kpx_nft_netlink::Element { key: k.clone(), ..Default::default() };
        let gone: Vec<_> = adj.iter().filter(|(k, d)| had(k) > 0 && had(k) + **d <= 0).map(|(k, _)| pair(k)).collect();
        let come: Vec<_> = adj.iter().filter(|(k, d)| had(k) <= 0 && had(k) + **d > 0).map(|(k, _)| pair(k)).collect();
        if !gone.is_empty() {
            batch.del_elements(HAIRPIN, &gone);
        }
        if !come.is_empty() {
            batch.add_elements(HAIRPIN, &come);
        }
        (st.elements_deleted, st.elements_added) = (st.elements_deleted + gone.len(), st.elements_added + come.len());
        let committed = !batch.is_empty();
        self.commit(batch)?;
        self.slots.settle();
        self.maps = maps;
        for (key, new) in next {
            if let Some(old) = self.service_pairs.remove(&key) {
                desired::count(&mut self.pairs, &old, false);
            }
            let (old, new_counts) = (
                self.services.get(&key).map(desired::counts).unwrap_or_default(),
                new.as_ref().map(|(l, _)| desired::counts(l)).unwrap_or_default(),
            );
            self.stats.chains = (self.stats.chains + new_counts.0).saturating_sub(old.0);
            self.stats.rules = (self.stats.rules + new_counts.1).saturating_sub(old.1);
            self.stats.elements = (self.stats.elements + new_counts.2).saturating_sub(old.2);
            match new {
                Some((l, pairs)) => {
                    desired::count(&mut self.pairs, &pairs, true);
                    self.services.insert(key.clone(), l);
                    self.service_pairs.insert(key, pairs);
                }
                None => {
                    self.services.remove(&key);
                }
            };
        }
        self.record_gen(before, committed);
        Ok(st)
    }
}
