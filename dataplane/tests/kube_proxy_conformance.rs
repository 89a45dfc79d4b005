//! Conformance with the real kube-proxy v1.28.7, iptables mode: for every case of
//! tests/testdata/kube-proxy-1.28.7, node-1's state as the controlplane computes it, rendered by
//! kpx, against the `iptables-save` kube-proxy left (nat and filter).
//!
//! The normalisation (docs/kube-proxy-differences.md, and `ruleset::compare` for the details):
//! counters and the order of chain declarations are ignored; each rule is compared in its
//! canonical form (every spelling iptables accepts for one kernel rule is one form: kpx's
//! `--or-mark 0x4000` is kube-proxy's `--set-xmark 0x4000/0x4000`); only kube-proxy's own
//! chains are compared, and in the built-in chains only the jumps into them; both proxies'
//! canaries are left out; in the four chains that hold one rule per service port in Go map
//! order (KUBE-SERVICES, KUBE-NODEPORTS, KUBE-EXTERNAL-SERVICES, KUBE-PROXY-FIREWALL) the
//! order of rules is ignored, except that the jump to KUBE-NODEPORTS must stay last. Every
//! other chain, each KUBE-SVC's probabilities included, is compared rule by rule in order.
//!
//! Three tiers: the pure comparison (always), a check that the comparison notices the loss of
//! any single kube-proxy rule (always), and the same comparison with kpx's rules as the kernel
//! holds them after the real backend restored them in a network namespace (root; it takes
//! the canonical form out of the picture, since both sides are then iptables-save output).

mod conformance;
mod netns;

use kpx_dataplane::backend::iptables::ruleset::{self, Difference, Ruleset};
use kpx_dataplane::backend::iptables::{IptablesBackend, IptablesConfig};
use kpx_dataplane::state::ChangeSet;
use kpx_dataplane::stream::Apply;

/// Differences kpx keeps on purpose in these cases, as (case, difference text); each one is
/// explained in docs/kube-proxy-differences.md. None today.
const EXPECTED: &[(&str, &str)] = &[];

fn unexpected(case: &str, found: Vec<Difference>) -> Vec<String> {
    found
        .iter()
        .map(ToString::to_string)
        .filter(|d| !EXPECTED.iter().any(|(c, e)| *c == case && e == d))
        .map(|d| format!("{case}: {d}"))
        .collect()
}

/// The rules in scope of the comparison, per table (what the test proves something about).
fn rules_in_scope(r: &Ruleset) -> usize {
    ["filter", "nat"]
        .iter()
        .filter_map(|t| r.tables.get(*t))
        .flat_map(|t| &t.chains)
        .filter(|(c, _)| ruleset::is_owned(c))
        .map(|(_, rules)| rules.len())
        .sum()
}

#[test]
fn iptables_rules_match_kube_proxy() {
    let mut problems = Vec::new();
    let mut compared = 0;
    for case in conformance::cases() {
        let (kpx, skipped) = ruleset::of_kpx(&case.render_config(), &case.state());
        assert!(skipped.is_empty(), "{}: {skipped:?}", case.name);
        let kube_proxy = Ruleset::parse(&case.read("iptables-save.txt"));
        let n = rules_in_scope(&kube_proxy);
        assert!(n > 30, "{}: only {n} kube-proxy rules in scope", case.name);
        compared += n;
        problems.extend(unexpected(&case.name, ruleset::compare(&kpx, &kube_proxy)));
    }
    assert!(problems.is_empty(), "{} differences from kube-proxy:\n{}", problems.len(), problems.join("\n"));
    println!("{} cases, {compared} kube-proxy rules, no difference", conformance::CASE_COUNT);
}

#[test]
fn the_comparison_notices_any_single_lost_rule() {
    for case in conformance::cases() {
        let (kpx, _) = ruleset::of_kpx(&case.render_config(), &case.state());
        let kube_proxy = Ruleset::parse(&case.read("iptables-save.txt"));
        for (table, t) in &kube_proxy.tables {
            for (chain, rules) in &t.chains {
                for (i, rule) in rules.iter().enumerate() {
                    // kube-proxy's chains, and its jumps into them from the built-in chains.
                    let jump = rule.canon.windows(2).any(|w| w[0] == "-j" && ruleset::is_owned(&w[1]));
                    if !ruleset::is_owned(chain) && !jump {
                        continue;
                    }
                    let mut altered = kube_proxy.clone();
                    altered.tables.get_mut(table).unwrap().chains.get_mut(chain).unwrap().remove(i);
                    let found = ruleset::compare(&kpx, &altered);
                    assert_eq!(
                        found.len(),
                        1,
                        "{}: without {table} -A {chain} {} the comparison says {found:#?}",
                        case.name,
                        rule
                    );
                }
            }
        }
    }
}

#[test]
fn kpx_rules_in_the_kernel_match_kube_proxy() {
    if !netns::require_root_and_netns() {
        return;
    }
    let mut problems = Vec::new();
    for case in conformance::cases() {
        let ns = netns::NetNs::new("conform");
        let render = case.render_config();
        let mut cfg = IptablesConfig::new(render.family, &render.node_name);
        cfg.cluster_cidr = render.cluster_cidr.clone();
        cfg.netns = Some(ns.name().to_string());
        let mut backend = IptablesBackend::new(cfg);
        let state = case.state();
        let all = ChangeSet { full: true, services: state.services().keys().cloned().collect() };
        backend.apply(&state, &all).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let kernel = Ruleset::parse(&ns.run(&["iptables-save"]));
        let kube_proxy = Ruleset::parse(&case.read("iptables-save.txt"));
        problems.extend(unexpected(&case.name, ruleset::compare(&kernel, &kube_proxy)));
    }
    assert!(problems.is_empty(), "{} differences from kube-proxy:\n{}", problems.len(), problems.join("\n"));
}
