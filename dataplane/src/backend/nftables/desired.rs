//! Everything kpx wants in its table for a state (pure, given the endpoint map ranges): the
//! base objects, the endpoint maps in use and every service, both as one [`Objects`] and per
//! service as a full sync installs them. Two services claiming one element (the same cluster
//! IP and port, say): the first keeps it. Hairpin pairs are the exception: services share
//! them, so they are counted ([`Pairs`]), not owned.

use std::collections::BTreeMap;

use super::endpoints::{self, HAIRPIN, MAP_PREFIX, Slots};
use super::layout::{self, LElems, Lowered, Objects};
use super::render::render_service;
use super::stmt::Stmt;
use crate::backend::iptables::render::RenderConfig;
use crate::state::{AppliedState, ServiceEntry};

/// Which service each element of each shared map belongs to. BTreeMaps: growing never rehashes
/// a whole table in the middle of a delta.
pub type Owners = BTreeMap<String, BTreeMap<(Vec<u8>, bool), String>>;

/// How many services want each hairpin pair.
pub type Pairs = BTreeMap<Vec<u8>, usize>;

/// What a full sync installs.
#[derive(Debug, Default)]
pub struct Rendered {
    /// Everything, for the plan against the kernel's table.
    pub objects: Objects,
    pub skipped: Vec<String>,
    /// Each service's part, without its hairpin pairs (those are in `pairs`).
    pub services: BTreeMap<String, Lowered>,
    pub service_pairs: BTreeMap<String, LElems>,
    pub owners: Owners,
    pub pairs: Pairs,
}

/// Everything kpx wants for `state`; chains of `slots` no service uses any more give their
/// range up.
pub fn render_all(cfg: &RenderConfig, state: &AppliedState, slots: &mut Slots) -> Rendered {
    let mut r = Rendered { objects: layout::base(cfg), ..Default::default() };
    for (key, e) in state.services() {
        let (o, skipped) = render_service(cfg, e, slots);
        r.skipped.extend(skipped);
        let (l, pairs) = installed(cfg, key, &o, &mut r.owners);
        r.objects.merge(o, &mut r.skipped);
        count(&mut r.pairs, &pairs, true);
        r.services.insert(key.clone(), l);
        r.service_pairs.insert(key.clone(), pairs);
    }
    let chains = &r.objects.chains;
    slots.retain(|c| chains.get(c).is_some_and(|c| c.rules.iter().any(|r| r.stmts.iter().any(is_dnat_map))));
    for map in slots.maps() {
        r.objects.sets.insert(map.clone(), endpoints::endpoint_map(cfg.family, &map));
    }
    r
}

fn is_dnat_map(s: &Stmt) -> bool {
    matches!(s, Stmt::DnatMap { .. })
}

/// Everything kpx wants for `state`, as objects (the admin API, benchmarks, tests).
pub fn desired_objects(cfg: &RenderConfig, state: &AppliedState, slots: &mut Slots) -> (Objects, Vec<String>) {
    let r = render_all(cfg, state, slots);
    (r.objects, r.skipped)
}

/// One service's objects as installed: lowered, elements other services own left out, its
/// hairpin pairs apart.
pub fn installed(cfg: &RenderConfig, key: &str, o: &Objects, owners: &mut Owners) -> (Lowered, LElems) {
    let mut l = o.lower(cfg.family);
    let pairs = l.elements.remove(HAIRPIN).unwrap_or_default();
    claim(key, &mut l, owners);
    (l, pairs)
}

/// Renders one service for a delta.
pub fn render_one(
    cfg: &RenderConfig,
    key: &str,
    e: &ServiceEntry,
    slots: &mut Slots,
    owners: &mut Owners,
) -> (Lowered, LElems, Vec<String>) {
    let (o, skipped) = render_service(cfg, e, slots);
    let (l, pairs) = installed(cfg, key, &o, owners);
    (l, pairs, skipped)
}

/// Records `key` as the owner of its elements; drops those another service owns. Endpoint map
/// ranges need no owner: each policy chain has a range of its own.
fn claim(key: &str, l: &mut Lowered, owners: &mut Owners) {
    for (set, elems) in l.elements.iter_mut().filter(|(s, _)| !endpoints::is_map(s)) {
        let of_set = owners.entry(set.clone()).or_default();
        elems.retain(|k, _| of_set.entry(k.clone()).or_insert_with(|| key.to_string()) == key);
    }
}

/// Frees the elements `key` owned in `l`.
pub fn unclaim(key: &str, l: &Lowered, owners: &mut Owners) {
    for (set, elems) in l.elements.iter().filter(|(s, _)| !endpoints::is_map(s)) {
        let Some(of_set) = owners.get_mut(set) else { continue };
        for k in elems.keys() {
            if of_set.get(k).is_some_and(|o| o == key) {
                of_set.remove(k);
            }
        }
    }
}

/// Adds (or removes) one service's pairs to the counts.
pub fn count(pairs: &mut Pairs, of: &LElems, add: bool) {
    for (k, _) in of.keys() {
        let n = pairs.entry(k.clone()).or_default();
        *n = if add { *n + 1 } else { n.saturating_sub(1) };
        if *n == 0 {
            pairs.remove(k);
        }
    }
}

/// The endpoint maps `l`'s elements are in.
pub fn maps_of(l: &Lowered) -> impl Iterator<Item = &String> {
    l.elements.keys().filter(|s| s.starts_with(MAP_PREFIX))
}

/// (chains, rules, elements) of one service's objects.
pub fn counts(l: &Lowered) -> (usize, usize, usize) {
    (l.chains.len(), l.chains.values().map(|c| c.rules.len()).sum(), l.elements.values().map(|e| e.len()).sum())
}
