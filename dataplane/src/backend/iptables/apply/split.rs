//! Full syncs in several restores, for iptables-nft.
//!
//! iptables-nft-restore 1.8.9 with `--noflush` gets super-linearly slower with the number of
//! rules in ONE restore (1k services: 3.7 s, 2k: 54 s, 10k: over 23 minutes), while the same
//! rules in restores of a few thousand each go in at a roughly constant rate. So on nft a full
//! sync becomes:
//!
//! 1. a small restore that rewrites KUBE-MARK-MASQ (the only top-level chain the per-service
//!    chains jump to) and creates the other top-level nat chains if they are missing, without
//!    touching the existing ones (declaring one would flush it);
//! 2. chunks of whole services: each declares (flushing) and refills the chains of a slice of
//!    the services, in one transaction per chunk. The chain names are hashes of the service,
//!    port and endpoint, so KUBE-SERVICES still jumps to the same names while they are
//!    rewritten in place, and a service is never seen half-written. Chains the kernel already
//!    holds as rendered (see `unchanged`) are left out, so a resync of a loaded ruleset
//!    often needs no chunk at all;
//! 3. the main restore: the filter table, KUBE-SERVICES, KUBE-NODEPORTS, KUBE-POSTROUTING,
//!    KUBE-MARK-MASQ, the canaries and missing jumps, then the stale chains flushed and deleted.
//!    Only here does traffic start to reach new services' chains, all of them complete by then.
//!
//! A failing restore fails the sync as a single restore would (the backend retries once with a
//! full sync). iptables-legacy rewrites the whole table on every restore, so it keeps one.

use std::collections::HashSet;

use crate::backend::iptables::chains;
use crate::backend::iptables::render::{self, RenderConfig};
use crate::backend::iptables::saved::{SERVICE_CHAIN_PREFIXES, SavedTable};
use crate::state::AppliedState;

/// Whether `--version` output names the nf_tables variant.
pub fn version_is_nft(version: &str) -> bool {
    version.contains("nf_tables")
}

/// What the command name says about the variant, when it says anything
/// ("iptables-nft-restore" yes, "iptables-legacy-restore" no, "iptables-restore" unknown).
pub fn nft_by_name(restore_cmd: &str) -> Option<bool> {
    let name = restore_cmd.rsplit('/').next().unwrap_or(restore_cmd);
    if name.contains("-nft") {
        Some(true)
    } else if name.contains("-legacy") {
        Some(false)
    } else {
        None
    }
}

fn is_service_chain(chain: &str) -> bool {
    SERVICE_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p))
}

/// The chain a restore line declares or appends to.
fn chain_of(line: &str) -> Option<&str> {
    let rest = line.strip_prefix(':').or_else(|| line.strip_prefix("-A "))?;
    rest.split_whitespace().next()
}

/// The restore that goes first: KUBE-MARK-MASQ rewritten with its rules from `full` (the
/// output of `render_full`), and the top-level nat chains `saved_nat` lacks, created empty.
pub fn first_restore(full: &str, saved_nat: &SavedTable, out: &mut String) {
    out.clear();
    out.push_str("*nat\n");
    for c in [chains::SERVICES, chains::NODEPORTS, chains::POSTROUTING] {
        if !saved_nat.chains.contains(c) {
            out.push_str(&format!(":{c} - [0:0]\n"));
        }
    }
    out.push_str(&format!(":{} - [0:0]\n", chains::MARK_MASQ));
    let nat = full.find("\n*nat\n").map_or("", |i| &full[i..]);
    let prefix = format!("-A {} ", chains::MARK_MASQ);
    for l in nat.lines().filter(|l| l.starts_with(&prefix)) {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
}

/// The per-service chains of `state`, as `*nat` restores of whole services holding at most
/// `max_rules` rules each (a larger service goes alone), appended to `out`. The chains in
/// `unchanged` (already in the kernel as rendered) are left out; the rest of a service still
/// goes in one restore. Every service is rendered once.
pub fn service_chunks(
    cfg: &RenderConfig,
    state: &AppliedState,
    max_rules: usize,
    unchanged: &HashSet<String>,
    out: &mut Vec<String>,
) {
    let (mut decl, mut rules, mut n) = (String::new(), String::new(), 0);
    let flush = |decl: &mut String, rules: &mut String, out: &mut Vec<String>| {
        let mut chunk = String::with_capacity(decl.len() + rules.len() + 16);
        chunk.push_str("*nat\n");
        chunk.push_str(decl);
        chunk.push_str(rules);
        chunk.push_str("COMMIT\n");
        out.push(chunk);
        decl.clear();
        rules.clear();
    };
    for entry in state.services().values() {
        let r = render::render_service(cfg, entry);
        let written = || r.chains.iter().filter(|(c, _)| !unchanged.contains(c));
        let count: usize = written().map(|(_, l)| l.len()).sum();
        if n > 0 && n + count > max_rules {
            flush(&mut decl, &mut rules, out);
            n = 0;
        }
        for (chain, lines) in written() {
            decl.push(':');
            decl.push_str(chain);
            decl.push_str(" - [0:0]\n");
            for l in lines {
                rules.push_str(l);
                rules.push('\n');
            }
        }
        n += count;
    }
    if !decl.is_empty() {
        flush(&mut decl, &mut rules, out);
    }
}

/// Drops the per-service chains (declarations and rules) from the `*nat` section of `full`,
/// leaving the filter table and the top-level nat chains: the main restore of a split sync.
pub fn keep_top_level(full: &str) -> String {
    let at = full.find("\n*nat\n").map_or(full.len(), |i| i + 1);
    let (filter, nat) = full.split_at(at);
    let mut out = String::with_capacity(filter.len() + nat.len() / 8);
    out.push_str(filter);
    for l in nat.lines().filter(|l| !chain_of(l).is_some_and(is_service_chain)) {
        out.push_str(l);
        out.push('\n');
    }
    out
}
