//! What is in the kernel, read from `iptables-save -t TABLE` output (pure parsing).
//!
//! A restarted agent (or one taking over from kube-proxy) adopts the chains it finds: its first
//! sync is a `--noflush` restore that rewrites every kpx chain in one transaction and deletes
//! the per-service chains that are no longer wanted, so traffic never meets an empty table.

use std::collections::BTreeSet;

/// One table as `iptables-save` printed it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SavedTable {
    /// Every chain, built-in or not.
    pub chains: BTreeSet<String>,
    /// Every rule as "CHAIN", "rest of the rule" (without "-A CHAIN ").
    pub rules: Vec<(String, String)>,
}

/// Prefixes of the per-service chains kube-proxy and kpx create (KUBE-XLB is kube-proxy's
/// name before 1.24 for what is now KUBE-SVL/KUBE-EXT), which a full sync deletes when unused.
pub const SERVICE_CHAIN_PREFIXES: [&str; 6] =
    ["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-", "KUBE-XLB-"];

impl SavedTable {
    /// Parses the output of `iptables-save -t TABLE` (one table; other tables' sections, if
    /// any, are merged, which callers avoid by asking for one table).
    pub fn parse(text: &str) -> SavedTable {
        let mut t = SavedTable::default();
        for line in text.lines() {
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    t.chains.insert(name.to_string());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, rest) = rule.split_once(' ').unwrap_or((rule, ""));
                t.rules.push((chain.to_string(), rest.to_string()));
            }
        }
        t
    }

    /// Whether `chain` has a rule that jumps to `target` carrying `comment`: how an ensured
    /// jump rule is recognised, whatever order the tool prints its matches in.
    /// An empty `comment` means a rule that is nothing but the jump (`-j TARGET`).
    pub fn has_jump(&self, chain: &str, comment: &str, target: &str) -> bool {
        if comment.is_empty() {
            return self.rules.iter().any(|(c, rest)| c == chain && rest.trim() == format!("-j {target}"));
        }
        let quoted = format!("--comment \"{comment}\"");
        let bare = format!("--comment {comment}");
        self.rules.iter().any(|(c, rest)| {
            c == chain
                && rest.split_whitespace().collect::<Vec<_>>().windows(2).any(|w| w == ["-j", target])
                && (rest.contains(&quoted) || (!comment.contains(' ') && rest.contains(&bare)))
        })
    }

    /// Per-service chains present in the kernel but not in `wanted`.
    pub fn stale_service_chains<'a>(&'a self, wanted: &BTreeSet<&str>) -> Vec<&'a str> {
        self.chains
            .iter()
            .map(String::as_str)
            .filter(|c| SERVICE_CHAIN_PREFIXES.iter().any(|p| c.starts_with(p)) && !wanted.contains(c))
            .collect()
    }
}

/// The chains a restore input declares in its `*nat` section.
pub fn declared_chains<'a>(restore: &'a str, table: &str) -> BTreeSet<&'a str> {
    let header = format!("*{table}");
    let mut inside = false;
    let mut out = BTreeSet::new();
    for line in restore.lines() {
        if line == header {
            inside = true;
        } else if line == "COMMIT" {
            inside = false;
        } else if inside && let Some(decl) = line.strip_prefix(':') {
            out.extend(decl.split_whitespace().next());
        }
    }
    out
}

/// Rule lines (`-A`) per table in a restore input: (filter, nat).
pub fn count_rules(restore: &str) -> (usize, usize) {
    let (mut filter, mut nat, mut table) = (0, 0, "");
    for line in restore.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = if t == "filter" {
                "filter"
            } else if t == "nat" {
                "nat"
            } else {
                ""
            };
        } else if line.starts_with("-A ") || line.starts_with("-I ") {
            match table {
                "filter" => filter += 1,
                "nat" => nat += 1,
                _ => {}
            }
        }
    }
    (filter, nat)
}
