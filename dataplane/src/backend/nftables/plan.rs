//! The transaction that turns one [`Lowered`] into another (pure): for a delta, one service's
//! objects before and after; for a full sync or a drift check, the kernel's table (a dump) and
//! everything kpx wants. Only what differs is written; a chain whose rules differ is flushed and
//! refilled whole (kpx's chains are a few rules each). Operations are ordered so that nothing is
//! deleted while something still refers to it and nothing is referred to before it exists.

use kpx_nft_netlink::consts::NFT_SET_EVAL;
use kpx_nft_netlink::{Batch, Element, Expr, Rule, SetRef, TableDump};

use std::collections::BTreeSet;

use super::endpoints;
use super::layout::{LChain, LElems, Lowered};

/// What a plan does, for logs, metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanStats {
    pub chains_added: usize,
    pub chains_rewritten: usize,
    pub chains_deleted: usize,
    pub rules_written: usize,
    pub sets_added: usize,
    pub sets_deleted: usize,
    pub elements_added: usize,
    pub elements_deleted: usize,
}

impl PlanStats {
    pub fn is_empty(&self) -> bool {
        *self == PlanStats::default()
    }

    /// "2 chains added, 1 element deleted" (only what is not zero).
    pub fn describe(&self) -> String {
        let parts = [
            (self.chains_added, "chains added"),
            (self.chains_rewritten, "chains rewritten"),
            (self.chains_deleted, "chains deleted"),
            (self.sets_added, "sets added"),
            (self.sets_deleted, "sets deleted"),
            (self.elements_added, "elements added"),
            (self.elements_deleted, "elements deleted"),
        ];
        let v: Vec<String> = parts.iter().filter(|(n, _)| *n > 0).map(|(n, w)| format!("{n} {w}")).collect();
        if v.is_empty() { "nothing".into() } else { v.join(", ") }
    }
}

/// The elements of `set` that `other` does not hold the same. In an endpoint map, all of a
/// policy chain's elements when any differs: the kernel refuses a range end inside a range
/// that is still there, so a chain's ranges are replaced whole (deleted, then added, in one
/// transaction).
fn missing_from(name: &str, set: &LElems, other: &LElems) -> Vec<Element> {
    fn differs<'a>(a: &'a LElems, b: &LElems) -> Vec<&'a Element> {
        a.iter().filter(|(k, v)| b.get(k) != Some(v)).map(|(_, v)| v).collect()
    }
    if !endpoints::is_map(name) {
        return differs(set, other).into_iter().cloned().collect();
    }
    let touched: BTreeSet<&[u8]> =
        differs(set, other).into_iter().chain(differs(other, set)).map(|e| endpoints::range_group(&e.key)).collect();
    let mut out: Vec<Element> =
        set.values().filter(|e| touched.contains(endpoints::range_group(&e.key))).cloned().collect();
    // In key order, a range's end before the next range's start at the same key (as nft
    // writes them; the kernel refuses a start inside a range not yet ended).
    out.sort_by(|a, b| a.key.cmp(&b.key).then(b.interval_end.cmp(&a.interval_end)));
    out
}

/// Sets both states have, defined differently (an affinity timeout changed): they are deleted
/// and created again, and the kernel refuses to delete a set a rule still reads, so the chains
/// reading them are flushed and written again in the same transaction.
fn redefined<'a>(old: &'a Lowered, new: &Lowered) -> BTreeSet<&'a str> {
    old.sets.iter().filter(|(n, s)| new.sets.get(*n).is_some_and(|t| t != *s)).map(|(n, _)| n.as_str()).collect()
}

fn reads(c: &LChain, sets: &BTreeSet<&str>) -> bool {
    !sets.is_empty()
        && c.rules.iter().flat_map(|(exprs, _)| exprs).any(|e| match e {
            Expr::Lookup { set: SetRef::Named(s), .. } => sets.contains(s.as_str()),
            Expr::Dynset { set, .. } => sets.contains(set.as_str()),
            _ => false,
        })
}

/// Appends to `b` the operations that turn `old` into `new`.
pub fn plan(old: &Lowered, new: &Lowered, b: &mut Batch) -> PlanStats {
    let mut st = PlanStats::default();
    removals(old, new, b, &mut st);
    additions(old, new, b, &mut st);
    st
}

/// The first half of [`plan`]: what goes or changes is deleted. A delta of several services
/// writes every service's removals before any service's additions (an element one service lets
/// go and another takes over is deleted before it is added again).
pub fn removals(old: &Lowered, new: &Lowered, b: &mut Batch, st: &mut PlanStats) {
    let empty = Default::default();
    // 1. Elements that go or change (they may point at chains about to go).
    for (set, elems) in &old.elements {
        let want = new.elements.get(set).unwrap_or(&empty);
        if !new.sets.contains_key(set) && old.sets.contains_key(set) {
            continue; // the whole set goes
        }
        let gone = missing_from(set, elems, want);
        if !gone.is_empty() {
            st.elements_deleted += gone.len();
            b.del_elements(set, &gone);
        }
    }
    let redefined = redefined(old, new);
    let changed = |name: &String, c: &LChain| {
        new.chains.get(name).is_some_and(|n| n.hook == c.hook && (n.rules != c.rules || reads(c, &redefined)))
    };
    let removed = |name: &String, c: &LChain| new.chains.get(name).is_none_or(|n| n.hook != c.hook);
    // 2. Flush chains that change or go, 3. delete the ones that go.
    for (name, c) in &old.chains {
        if (changed(name, c) || removed(name, c)) && !c.rules.is_empty() {
            b.flush_chain(name);
        }
    }
    for (name, c) in &old.chains {
        if removed(name, c) {
            st.chains_deleted += 1;
            b.del_chain(name);
        }
    }
    // 4. Sets that go or change.
    for (name, s) in &old.sets {
        if new.sets.get(name) != Some(s) {
            st.sets_deleted += 1;
            b.del_set(name);
        }
    }
}

/// The second half of [`plan`]: what comes or changes is added.
pub fn additions(old: &Lowered, new: &Lowered, b: &mut Batch, st: &mut PlanStats) {
    let empty = Default::default();
    let redefined = redefined(old, new);
    // 5. Sets that come or change.
    for (name, s) in &new.sets {
        if old.sets.get(name) != Some(s) {
            st.sets_added += 1;
            b.add_set(s);
        }
    }
    // 6. New chains, 7. the rules of new and changed chains.
    let is_new = |name: &String, c: &LChain| old.chains.get(name).is_none_or(|o| o.hook != c.hook);
    for (name, c) in &new.chains {
        if is_new(name, c) {
            st.chains_added += 1;
            b.add_chain(&kpx_nft_netlink::Chain { name: name.clone(), hook: c.hook.clone() });
        }
    }
    for (name, c) in &new.chains {
        let rewrite = match old.chains.get(name) {
            Some(o) if o.hook == c.hook => o.rules != c.rules || reads(o, &redefined),
            _ => true,
        };
        if !rewrite {
            continue;
        }
        if old.chains.contains_key(name) && !is_new(name, c) {
            st.chains_rewritten += 1;
        }
        for (exprs, comment) in &c.rules {
            st.rules_written += 1;
            b.add_rule(&Rule { chain: name.clone(), exprs: exprs.clone(), comment: comment.clone(), handle: 0 });
        }
    }
    // 8. Elements that come or change.
    for (set, elems) in &new.elements {
        let had = if old.sets.get(set) == new.sets.get(set) { old.elements.get(set).unwrap_or(&empty) } else { &empty };
        let added = missing_from(set, elems, had);
        if !added.is_empty() {
            st.elements_added += added.len();
            b.add_elements(set, &added);
        }
    }
}

/// A dump in the form plans compare. Elements of dynamic sets (session affinity) are traffic's,
/// not kpx's, and left out.
pub fn from_dump(d: &TableDump) -> Lowered {
    let mut l = Lowered::default();
    for c in &d.chains {
        l.chains.insert(c.name.clone(), LChain { hook: c.hook.clone(), rules: Vec::new() });
    }
    for r in &d.rules {
        if let Some(c) = l.chains.get_mut(&r.chain) {
            c.rules.push((r.exprs.clone(), r.comment.clone()));
        }
    }
    for s in &d.sets {
        l.sets.insert(s.name.clone(), s.clone());
        if s.flags & NFT_SET_EVAL == 0 {
            let elems = d
                .elements
                .get(&s.name)
                .map(|e| e.iter().map(|e| ((e.key.clone(), e.interval_end), e.clone())).collect());
            l.elements.insert(s.name.clone(), elems.unwrap_or_default());
        }
    }
    l
}

/// Adds `part`'s objects to `into` (a service's objects to the whole table).
pub fn extend(into: &mut Lowered, part: &Lowered) {
    into.chains.extend(part.chains.iter().map(|(k, v)| (k.clone(), v.clone())));
    into.sets.extend(part.sets.iter().map(|(k, v)| (k.clone(), v.clone())));
    for (set, elems) in &part.elements {
        let e = into.elements.entry(set.clone()).or_default();
        e.extend(elems.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
}
