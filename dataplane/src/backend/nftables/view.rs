//! The kernel's table for the admin API (pure): listed in nft syntax where it holds what kpx
//! wrote (a rule read back equal to a rule kpx wants prints as that rule; anything else in
//! expression form, so a hand-edited rule stands out), and the per-service-port chains kpx
//! wants with whether the kernel has them.

use std::collections::HashMap;

use kpx_nft_netlink::{Expr, TableDump};

use super::layout::{Objects, TABLE, family_word, hook_name};
use super::plan::from_dump;
use crate::backend::iptables::render::IpFamily;

/// An element's key bytes and whether it ends a range.
type ElemId = (Vec<u8>, bool);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `table ip kube-proxy` as the kernel has it, one line per chain header, rule and element.
pub fn kernel_lines(f: IpFamily, desired: &Objects, dump: &TableDump) -> Vec<String> {
    let mut rules: HashMap<(&str, Vec<Expr>), String> = HashMap::new();
    for (name, c) in &desired.chains {
        for r in &c.rules {
            rules.insert((name.as_str(), r.lower(f)), r.text(f));
        }
    }
    // Elements kpx wants, by what the kernel stores: a range's start prints as the range, its
    // end (kpx's, as the start's twin) prints nothing.
    let mut known: HashMap<(&str, ElemId), Option<String>> = HashMap::new();
    for (set, elems) in &desired.elements {
        for (k, v) in elems {
            for e in k.lower(v.as_ref()) {
                let text = (!e.interval_end).then(|| match v {
                    Some(v) => format!("{} : {}", k.text(), v.text()),
                    None => k.text(),
                });
                known.insert((set.as_str(), (e.key, e.interval_end)), text);
            }
        }
    }
    let l = from_dump(dump);
    let mut out = vec![format!("table {} {TABLE}", family_word(f))];
    for (name, c) in &l.chains {
        match &c.hook {
            Some(h) => out.push(format!(
                "chain {name} {{ type {} hook {} priority {} ; }}",
                h.kind,
                hook_name(h.hooknum),
                h.priority
            )),
            None => out.push(format!("chain {name}")),
        }
        for (exprs, comment) in &c.rules {
            let text = rules.get(&(name.as_str(), exprs.clone())).cloned().unwrap_or_else(|| {
                let mut t: Vec<String> = exprs.iter().map(|e| e.to_string()).collect();
                if let Some(c) = comment {
                    t.push(format!("comment \"{c}\""));
                }
                t.join(" ")
            });
            out.push(format!("  {text}"));
        }
    }
    for (set, elems) in &l.elements {
        out.push(format!("set {set} ({} elements)", elems.len()));
        for (k, e) in elems {
            match known.get(&(set.as_str(), k.clone())) {
                Some(Some(text)) => out.push(format!("  {text}")),
                Some(None) => {}
                None => {
                    let mut text = format!("  {}0x{}", if e.interval_end { "end " } else { "" }, hex(&e.key));
                    if let Some(v) = &e.verdict {
                        text.push_str(&format!(" : {v}"));
                    }
                    if let Some(v) = &e.value {
                        text.push_str(&format!(" : 0x{}", hex(v)));
                    }
                    out.push(text);
                }
            }
        }
    }
    out
}

/// (service port "ns/name/proto/port", chain, present) for every service-* and local-* chain
/// kpx wants.
pub fn expected_chains(desired: &Objects, dump: Option<&TableDump>) -> Vec<(String, String, bool)> {
    let have: std::collections::HashSet<&str> =
        dump.map(|d| d.chains.iter().map(|c| c.name.as_str()).collect()).unwrap_or_default();
    desired
        .chains
        .keys()
        .filter(|n| n.starts_with("service-") || n.starts_with("local-"))
        .map(|n| {
            let port = n.splitn(3, '-').nth(2).unwrap_or(n).to_string();
            (port, n.clone(), have.contains(n.as_str()))
        })
        .collect()
}
