//! Comparing the rules kpx would write with the rules in the kernel (kube-proxy's, or kpx's
//! own). What is compared and what is left out on purpose:
//!
//! - Tables `filter` and `nat` only: kube-proxy's iptables mode keeps nothing else but an empty
//!   canary chain in `mangle`.
//! - The chains kube-proxy's iptables mode owns ([`is_owned`]): its top-level chains and the
//!   per-service chains (KUBE-SVC/SVL/EXT/FW/SEP-*). Other chains (a CNI's, kubelet's
//!   KUBE-KUBELET-CANARY, the IPVS mode's) are not looked at, nor are the canaries
//!   (kube-proxy's empty KUBE-PROXY-CANARY, kpx's with its one rule): they only tell their own
//!   proxy that a table was flushed.
//! - In the built-in chains (INPUT, PREROUTING, ...), only the rules that jump to an owned
//!   chain, in their order; everything else there belongs to someone else.
//! - Counters and the order of chain declarations.
//! - The order of rules in KUBE-SERVICES, KUBE-NODEPORTS, KUBE-EXTERNAL-SERVICES and
//!   KUBE-PROXY-FIREWALL: one or two rules per service port, written in Go map order by
//!   kube-proxy (it differs from sync to sync), each matching its own destination. The one
//!   rule whose place matters, nat KUBE-SERVICES' jump to KUBE-NODEPORTS, must be last on
//!   both sides. Every other chain is compared rule by rule, in order (the probabilities of a
//!   KUBE-SVC chain depend on it).

use std::collections::BTreeMap;
use std::fmt;

use super::{Rule, Ruleset};

/// Top-level chains of kube-proxy's iptables mode.
const TOP_LEVEL: [&str; 8] = [
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-FIREWALL",
];

const PER_SERVICE: [&str; 5] = ["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-"];

/// Chains whose rules are one per service port, in no meaningful order.
const UNORDERED: [&str; 4] = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES", "KUBE-PROXY-FIREWALL"];

const BUILT_IN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// The comment of nat KUBE-SERVICES' last rule.
const NODEPORTS_LAST: &str = "kubernetes service nodeports; NOTE: this must be the last rule in this chain";

/// Whether kube-proxy's iptables mode owns `chain` (and kpx's iptables backend writes it).
pub fn is_owned(chain: &str) -> bool {
    TOP_LEVEL.contains(&chain) || PER_SERVICE.iter().any(|p| chain.starts_with(p))
}

/// What kind of difference, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DifferenceKind {
    /// kpx would create a chain the kernel does not have.
    ChainOnlyInKpx,
    /// The kernel has an owned chain kpx would not create.
    ChainOnlyInKernel,
    /// kpx would write a rule the kernel's chain lacks.
    RuleOnlyInKpx,
    /// The kernel's chain has a rule kpx would not write.
    RuleOnlyInKernel,
    /// The same rules in another order (where order matters).
    RuleOrder,
}

impl DifferenceKind {
    pub const ALL: [DifferenceKind; 5] = [
        DifferenceKind::ChainOnlyInKpx,
        DifferenceKind::ChainOnlyInKernel,
        DifferenceKind::RuleOnlyInKpx,
        DifferenceKind::RuleOnlyInKernel,
        DifferenceKind::RuleOrder,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DifferenceKind::ChainOnlyInKpx => "chain_only_in_kpx",
            DifferenceKind::ChainOnlyInKernel => "chain_only_in_kernel",
            DifferenceKind::RuleOnlyInKpx => "rule_only_in_kpx",
            DifferenceKind::RuleOnlyInKernel => "rule_only_in_kernel",
            DifferenceKind::RuleOrder => "rule_order",
        }
    }
}

/// One difference between kpx's rules and the kernel's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Difference {
    pub kind: DifferenceKind,
    pub table: String,
    pub chain: String,
    /// The rule (as its side wrote it, after `-A CHAIN `), for rule differences.
    pub rule: Option<String>,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (sign, what) = match self.kind {
            DifferenceKind::ChainOnlyInKpx => ("+", "chain only in kpx's rules"),
            DifferenceKind::ChainOnlyInKernel => ("-", "chain only in the kernel"),
            DifferenceKind::RuleOnlyInKpx => ("+", "only in kpx's rules"),
            DifferenceKind::RuleOnlyInKernel => ("-", "only in the kernel"),
            DifferenceKind::RuleOrder => ("~", "same rules, another order"),
        };
        match &self.rule {
            Some(rule) => write!(f, "{sign} {} -A {} {rule}   ({what})", self.table, self.chain),
            None => write!(f, "{sign} {} {}   ({what})", self.table, self.chain),
        }
    }
}

/// Which chains a comparison looks at, and where rule order does not matter.
struct Scope {
    owned: fn(&str) -> bool,
    unordered: &'static [&'static str],
}

/// kube-proxy's iptables mode (see the module comment).
const IPTABLES: Scope = Scope { owned: is_owned, unordered: &UNORDERED };

/// Whether kube-proxy's ipvs mode owns `chain`: every KUBE-* chain but kubelet's and the canaries.
pub fn is_owned_ipvs(chain: &str) -> bool {
    chain.starts_with("KUBE-")
        && !["KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-MARK-DROP", "KUBE-PROXY-CANARY"].contains(&chain)
}

/// kube-proxy's ipvs mode: a fixed set of rules in a fixed order, every chain compared in order.
const IPVS: Scope = Scope { owned: is_owned_ipvs, unordered: &[] };

/// The chains of `table` in scope, with the rules in scope (see the module comment).
fn in_scope<'a>(rules: &'a Ruleset, table: &str, scope: &Scope) -> BTreeMap<&'a str, Vec<&'a Rule>> {
    let mut out = BTreeMap::new();
    let Some(t) = rules.tables.get(table) else { return out };
    for (chain, list) in &t.chains {
        if BUILT_IN.contains(&chain.as_str()) {
            let jumps: Vec<&Rule> = list.iter().filter(|r| jumps_to(r, scope.owned)).collect();
            out.insert(chain.as_str(), jumps);
        } else if (scope.owned)(chain) {
            out.insert(chain.as_str(), list.iter().collect());
        }
    }
    out
}

fn jumps_to(r: &Rule, owned: fn(&str) -> bool) -> bool {
    r.canon.windows(2).any(|w| (w[0] == "-j" || w[0] == "-g") && owned(&w[1]))
}

/// The differences between the rules kpx would write (`kpx`) and the kernel's (`kernel`),
/// sorted; empty when they do the same (see the module comment for what is left out).
pub fn compare(kpx: &Ruleset, kernel: &Ruleset) -> Vec<Difference> {
    compare_in(kpx, kernel, &IPTABLES)
}

/// [`compare`] for kube-proxy's ipvs mode: every KUBE-* chain (kubelet's aside), all in order.
pub fn compare_ipvs(kpx: &Ruleset, kernel: &Ruleset) -> Vec<Difference> {
    compare_in(kpx, kernel, &IPVS)
}

fn compare_in(kpx: &Ruleset, kernel: &Ruleset, scope: &Scope) -> Vec<Difference> {
    let mut out = Vec::new();
    for table in ["filter", "nat"] {
        let (want, have) = (in_scope(kpx, table, scope), in_scope(kernel, table, scope));
        let diff = |kind, chain: &str, rule: Option<&Rule>| Difference {
            kind,
            table: table.to_string(),
            chain: chain.to_string(),
            rule: rule.map(|r| r.text.clone()),
        };
        for (chain, w) in &want {
            let Some(h) = have.get(chain) else {
                // A built-in chain always exists; its missing jumps are rule differences.
                if BUILT_IN.contains(chain) {
                    out.extend(w.iter().map(|r| diff(DifferenceKind::RuleOnlyInKpx, chain, Some(r))));
                } else {
                    out.push(diff(DifferenceKind::ChainOnlyInKpx, chain, None));
                }
                continue;
            };
            let (only_w, only_h) = multiset_difference(w, h);
            if !only_w.is_empty() || !only_h.is_empty() {
                out.extend(only_w.into_iter().map(|r| diff(DifferenceKind::RuleOnlyInKpx, chain, Some(r))));
                out.extend(only_h.into_iter().map(|r| diff(DifferenceKind::RuleOnlyInKernel, chain, Some(r))));
                continue;
            }
            let ordered = !scope.unordered.contains(chain);
            let same_order = w.iter().zip(h.iter()).all(|(a, b)| a == b);
            let last_ok = table != "nat" || *chain != "KUBE-SERVICES" || (last_is_nodeports(w) == last_is_nodeports(h));
            if (ordered && !same_order) || !last_ok {
                out.push(diff(DifferenceKind::RuleOrder, chain, None));
            }
        }
        for chain in have.keys().filter(|c| !want.contains_key(*c)) {
            if BUILT_IN.contains(chain) {
                out.extend(have[chain].iter().map(|r| diff(DifferenceKind::RuleOnlyInKernel, chain, Some(r))));
            } else {
                out.push(diff(DifferenceKind::ChainOnlyInKernel, chain, None));
            }
        }
    }
    out.sort();
    out
}

fn last_is_nodeports(rules: &[&Rule]) -> bool {
    let has = |r: &Rule| r.canon.iter().any(|t| t == NODEPORTS_LAST);
    rules.last().is_some_and(|r| has(r)) || !rules.iter().any(|r| has(r))
}

/// The rules only in `a` and only in `b`, as multisets (a rule twice in `a` and once in `b`
/// is once only in `a`), each in its side's order.
fn multiset_difference<'a>(a: &[&'a Rule], b: &[&'a Rule]) -> (Vec<&'a Rule>, Vec<&'a Rule>) {
    let mut counts: BTreeMap<&[String], i64> = BTreeMap::new();
    for r in a {
        *counts.entry(r.canon.as_slice()).or_default() += 1;
    }
    for r in b {
        *counts.entry(r.canon.as_slice()).or_default() -= 1;
    }
    let mut take = |rules: &[&'a Rule], sign: i64| {
        let mut out = Vec::new();
        for r in rules {
            let n = counts.get_mut(r.canon.as_slice()).expect("counted above");
            if *n * sign > 0 {
                *n -= sign;
                out.push(*r);
            }
        }
        out
    };
    let only_a = take(a, 1);
    let only_b = take(b, -1);
    (only_a, only_b)
}
