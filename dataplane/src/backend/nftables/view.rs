//! The kernel's table for the admin API (pure): listed in nft syntax where it holds what kpx
//! wrote (a rule read back equal to a rule kpx wants prints as that rule; anything else in
//! expression form, so a hand-edited rule stands out), and the per-service-port chains kpx
//! wants with whether the kernel has them.

use std::collections::HashMap;

use kpx_nft_netlink::{Expr, TableDump};

use super::layout::{Objects, TABLE, family_word, hook_name};
use super::plan::from_dump;
use crate::backend::iptables::render::IpFamily;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `table ip kube-proxy` as the kernel has it, one line per chain header, rule and element.
pub fn kernel_lines(f: IpFamily, desired: &Objects, dump: &TableDump) -> Vec<String> {
    let mut known: HashMap<(&str, Vec<Expr>), String> = HashMap::new();
    for (name, c) in &desired.chains {
        for r in &c.rules {
            known.insert((name.as_str(), r.lower(f)), r.text(f));
        }
    }
    let keys: HashMap<Vec<u8>, String> =
        desired.elements.values().flat_map(|e| e.keys().map(|k| (k.bytes(), k.text()))).collect();
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
            let text = known.get(&(name.as_str(), exprs.clone())).cloned().unwrap_or_else(|| {
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
        for (k, v) in elems {
            let key = keys.get(k).cloned().unwrap_or_else(|| format!("0x{}", hex(k)));
            let v = v.as_ref().map(|v| format!(" : {v}")).unwrap_or_default();
            out.push(format!("  {key}{v}"));
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
