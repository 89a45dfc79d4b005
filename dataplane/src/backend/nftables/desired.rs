//! Everything kpx wants in its table for a state (pure, given the endpoint map ranges): the
//! base objects, the endpoint maps in use and every service, both as one [`Objects`] and per
//! service as a full sync installs them. Two services claiming one element: the first keeps it
//! (`owners`). Hairpin pairs are the exception: services share them, so they are counted
//! ([`Pairs`]), not owned.

use std::collections::BTreeMap;

use kpx_nft_netlink::{Element, Expr, SetRef};

use super::endpoints::{self, HAIRPIN, Slots};
use super::layout::{self, LElems, Lowered, Objects};
use super::owners::Owners;
use super::render::render_service;
use super::stmt::Stmt;
use crate::backend::iptables::render::RenderConfig;
use crate::state::{AppliedState, ServiceEntry};

/// How many services want each hairpin pair.
pub type Pairs = BTreeMap<Vec<u8>, usize>;

/// What a full sync installs.
#[derive(Debug, Default)]
pub struct Rendered {
    /// Everything, in the kernel's terms, for the plan against the kernel's table.
    pub desired: Lowered,
    pub skipped: Vec<String>,
    /// Each service's part, without its hairpin pairs (those are in `pairs`).
    pub services: BTreeMap<String, Lowered>,
    pub service_pairs: BTreeMap<String, LElems>,
    pub owners: Owners,
    pub pairs: Pairs,
}

/// Everything kpx wants for `state`: the base objects, each service as installed (claimed
/// elements only), the hairpin pairs and the endpoint maps in use. Chains of `slots` no
/// service reads an endpoint map from any more give their range up.
pub fn render_all(cfg: &RenderConfig, state: &AppliedState, slots: &mut Slots) -> Rendered {
    let mut r = Rendered { desired: layout::base(cfg).lower(cfg.family), ..Default::default() };
    for (key, e) in state.services() {
        let (o, skipped) = render_service(cfg, e, slots);
        r.skipped.extend(skipped);
        let (mut l, pairs) = installed(cfg, key, &o, &mut r.owners);
        // Two services naming one chain: the first keeps it (as for elements).
        let desired = &r.desired;
        let skipped = &mut r.skipped;
        l.chains.retain(|name, _| {
            let clash = desired.chains.contains_key(name);
            if clash {
                skipped.push(format!("{key}: chain {name} already exists"));
            }
            !clash
        });
        super::plan::extend(&mut r.desired, &l);
        count(&mut r.pairs, &pairs, true);
        r.services.insert(key.clone(), l);
        r.service_pairs.insert(key.clone(), pairs);
    }
    let pairs = r.pairs.keys().map(|k| ((k.clone(), false), Element { key: k.clone(), ..Default::default() }));
    r.desired.elements.entry(HAIRPIN.into()).or_default().extend(pairs);
    let desired = &r.desired;
    slots.retain(|c| reads_endpoint_map(desired, c));
    for map in slots.maps() {
        r.desired.sets.insert(map.clone(), endpoints::endpoint_map(cfg.family, &map));
    }
    r
}

/// Everything kpx wants for `state`, as objects (the admin API, benchmarks, tests; the same
/// as [`render_all`], for reading).
pub fn desired_objects(cfg: &RenderConfig, state: &AppliedState, slots: &mut Slots) -> (Objects, Vec<String>) {
    let mut all = layout::base(cfg);
    let mut skipped = Vec::new();
    for e in state.services().values() {
        let (o, s) = render_service(cfg, e, slots);
        skipped.extend(s);
        all.merge(o, &mut skipped);
    }
    let chains = &all.chains;
    slots.retain(|c| chains.get(c).is_some_and(|c| c.rules.iter().any(|r| r.stmts.iter().any(is_dnat_map))));
    for map in slots.maps() {
        all.sets.insert(map.clone(), endpoints::endpoint_map(cfg.family, &map));
    }
    (all, skipped)
}

fn is_dnat_map(s: &Stmt) -> bool {
    matches!(s, Stmt::DnatMap { .. })
}

/// One service's objects as installed: lowered, elements other services own left out, its
/// hairpin pairs apart.
pub fn installed(cfg: &RenderConfig, key: &str, o: &Objects, owners: &mut Owners) -> (Lowered, LElems) {
    let mut l = o.lower(cfg.family);
    let pairs = l.elements.remove(HAIRPIN).unwrap_or_default();
    owners.claim(key, &mut l);
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

/// Whether `chain` of `l` picks its endpoint from an endpoint map.
pub fn reads_endpoint_map(l: &Lowered, chain: &str) -> bool {
    let reads = |e: &Expr| matches!(e, Expr::Lookup { set: SetRef::Named(s), .. } if endpoints::is_map(s));
    l.chains.get(chain).is_some_and(|c| c.rules.iter().any(|(exprs, _)| exprs.iter().any(reads)))
}

/// (chains, rules, elements) of one service's objects.
pub fn counts(l: &Lowered) -> (usize, usize, usize) {
    (l.chains.len(), l.chains.values().map(|c| c.rules.len()).sum(), l.elements.values().map(|e| e.len()).sum())
}
