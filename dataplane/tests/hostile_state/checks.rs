//! Checks of restore text (pure) and of the kernel's tables.

use std::collections::{BTreeMap, BTreeSet};

use kpx_dataplane::backend::iptables::jumps;
use kpx_dataplane::backend::iptables::render::{FORWARD_RULES, LOCALNET_RULE};

use crate::iptables::{BUILTIN, Tables, arg, tokens};

pub(crate) fn is_kpx_chain(c: &str) -> bool {
    c.starts_with("KUBE-")
        && c.len() <= 28
        && c.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-')
}

/// A verdict that stops traffic must be scoped to one destination and port, so that a hostile
/// service can never block anything but its own addresses.
fn check_verdict(chain: &str, toks: &[String]) -> Result<(), String> {
    // kpx's two constant DROPs (no cluster data in them): kube-proxy's INVALID drop in
    // KUBE-FORWARD and the localnet guard of localhost node ports.
    let fixed = FORWARD_RULES.iter().chain([&LOCALNET_RULE]).filter_map(|l| l.strip_prefix(&format!("-A {chain} ")));
    // `toks` is a whole restore line ("-A CHAIN ...") or a saved rule without that prefix.
    let rule = if toks.first().is_some_and(|t| t == "-A") { toks.get(2..).unwrap_or_default() } else { toks };
    if fixed.filter_map(tokens).any(|t| t.as_slice() == rule) {
        return Ok(());
    }
    let target = arg(toks, "-j").unwrap_or_default();
    if ["DROP", "REJECT"].contains(&target) {
        let scoped = toks.iter().any(|t| t == "-d") || arg(toks, "--dst-type") == Some("LOCAL");
        if !scoped || !toks.iter().any(|t| t == "--dport") {
            return Err(format!("{target} in {chain} is not scoped to a destination and port"));
        }
        if !["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-PROXY-FIREWALL"].contains(&chain) {
            return Err(format!("{target} in {chain}"));
        }
    }
    Ok(())
}

/// Restore input as kpx renders it: only kpx chains, one complete rule per line, comments
/// quoted and clean, at most one target per rule, blocking verdicts scoped.
pub(crate) fn check_text(text: &str) -> Result<(), String> {
    let mut sections = 0;
    let mut declared = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |why: &str| Err(format!("restore line {}: {why}: {line:?}", i + 1));
        if line.chars().any(|c| c.is_control()) || line.contains('\\') || line.contains('\'') {
            return bad("control character, backslash or single quote");
        }
        if line == "*filter" || line == "*nat" {
            sections += 1;
            declared.clear();
            continue;
        }
        if line == "COMMIT" {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            match decl.strip_suffix(" - [0:0]") {
                // Two sources of rules for one chain: they would be merged (or, on legacy
                // without --noflush, refused).
                Some(c) if !declared.insert(c) => return bad("chain declared twice"),
                Some(c) if is_kpx_chain(c) => continue,
                _ => return bad("declaration of a chain that is not kpx's"),
            }
        }
        if let Some(c) = line.strip_prefix("-X ") {
            if is_kpx_chain(c) {
                continue;
            }
            return bad("deletes a chain that is not kpx's");
        }
        let Some(rest) = ["-A ", "-I ", "-D "].iter().find_map(|op| line.strip_prefix(op)) else {
            return bad("not a restore line");
        };
        let chain = rest.split(' ').next().unwrap_or_default();
        if !is_kpx_chain(chain) {
            return bad("rule in a chain that is not kpx's");
        }
        let Some(toks) = tokens(line) else { return bad("unbalanced quote") };
        if toks.iter().filter(|t| *t == "-j").count() > 1 {
            return bad("more than one target");
        }
        if toks.iter().filter(|t| *t == "--comment").count() > 1 {
            return bad("two comments");
        }
        if let Some(c) = arg(&toks, "--comment")
            && (c.len() > 255 || c.is_empty())
        {
            return bad("comment empty or longer than 255 bytes");
        }
        if let Err(e) = check_verdict(chain, &toks) {
            return bad(&e);
        }
    }
    if sections == 0 && !text.is_empty() {
        return Err("restore input without a table".into());
    }
    Ok(())
}

/// The kernel holds kpx's chains and (`with_jumps`, after a sync by the backend) its
/// documented jumps from the built-in chains, nothing else: no other chain, no other rule in a
/// built-in chain, no unscoped DROP/REJECT.
pub(crate) fn check_kernel(tables: &Tables, with_jumps: bool, firewall: bool) -> Result<(), String> {
    for (table, chains) in tables {
        for (chain, rules) in chains {
            if BUILTIN.contains(&chain.as_str()) {
                let want: Vec<String> = jumps::jumps(firewall)
                    .filter(|j| with_jumps && j.table == table && j.chain == chain)
                    .map(|j| j.rule())
                    .collect();
                if *rules != want {
                    return Err(format!("{table} {chain} holds {rules:#?}, kpx documents only {want:#?}"));
                }
                continue;
            }
            if !is_kpx_chain(chain) {
                return Err(format!("{table}: chain {chain:?} is not kpx's"));
            }
            for r in rules {
                let toks = tokens(r).ok_or_else(|| format!("{table} {chain}: unbalanced quote in {r:?}"))?;
                check_verdict(chain, &toks).map_err(|e| format!("{table}: {e}: {r}"))?;
            }
        }
    }
    Ok(())
}

/// Two rulesets are the same: every chain with the same rules, in the same order except in the
/// top-level chains (a partial sync inserts and appends there, a full sync writes them in key
/// order). KUBE-SERVICES of nat must end with the jump to KUBE-NODEPORTS in both.
pub(crate) fn same_ruleset(a: &Tables, b: &Tables) -> Result<(), String> {
    let top = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES", "KUBE-PROXY-FIREWALL"];
    let norm = |t: &Tables| -> Tables {
        let mut t = t.clone();
        for chains in t.values_mut() {
            for (c, rules) in chains.iter_mut() {
                if top.contains(&c.as_str()) {
                    rules.sort();
                }
            }
        }
        t
    };
    for (what, t) in [("partial", a), ("full", b)] {
        let last = t.get("nat").and_then(|c| c.get("KUBE-SERVICES")).and_then(|r| r.last());
        if !last.is_some_and(|l| l.ends_with("-j KUBE-NODEPORTS")) {
            return Err(format!("after the {what} sync nat KUBE-SERVICES does not end with the nodeports jump"));
        }
    }
    let (na, nb) = (norm(a), norm(b));
    if na == nb {
        return Ok(());
    }
    let mut diff = String::new();
    for table in ["filter", "nat"] {
        let empty = BTreeMap::new();
        let (ca, cb) = (na.get(table).unwrap_or(&empty), nb.get(table).unwrap_or(&empty));
        for chain in ca.keys().chain(cb.keys()).collect::<BTreeSet<_>>() {
            if ca.get(chain) != cb.get(chain) {
                diff.push_str(&format!(
                    "{table} {chain}:\n  partial: {:#?}\n  full:    {:#?}\n",
                    ca.get(chain),
                    cb.get(chain)
                ));
            }
        }
    }
    Err(format!("the partial sync left a ruleset that differs from a full sync of the same state:\n{diff}"))
}

/// A restore line of a per-service chain (declaration or rule).
pub(crate) fn is_service_line(line: &str) -> bool {
    line.strip_prefix(':')
        .or_else(|| line.strip_prefix("-A "))
        .and_then(|l| l.split(' ').next())
        .is_some_and(is_service_chain)
}

/// A per-service chain (the others are kpx's fixed top-level chains).
pub(crate) fn is_service_chain(chain: &str) -> bool {
    ["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-"].iter().any(|p| chain.starts_with(p))
}
