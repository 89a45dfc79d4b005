//! iptables rules as data to compare (pure): what kube-proxy or kpx left in the kernel
//! (`iptables-save` output) against what kpx would write (its restore input), for the
//! kube-proxy conformance test and for shadow mode.
//!
//! The same rule reads differently depending on who wrote it: kpx writes `-j MARK --or-mark
//! 0x4000`, iptables-save prints `-j MARK --set-xmark 0x4000/0x4000`. Each rule is therefore
//! compared in a canonical form (see [`canonical`]) that maps every spelling the tools accept
//! for the same kernel rule to one token list, and keeps every other difference. What the
//! comparison then ignores, on purpose, is listed in [`compare`].

use std::collections::BTreeMap;
use std::fmt;

mod canon;
mod diff;
#[cfg(test)]
mod tests;

pub use canon::{canonical, stored_probability, tokenize};
pub use diff::{Difference, DifferenceKind, compare, compare_ipvs, is_owned, is_owned_ipvs};

/// One rule: its text after `-A CHAIN ` and its canonical form.
#[derive(Debug, Clone)]
pub struct Rule {
    pub text: String,
    pub canon: Vec<String>,
}

impl PartialEq for Rule {
    fn eq(&self, other: &Self) -> bool {
        self.canon == other.canon
    }
}

impl Rule {
    pub fn new(text: &str) -> Rule {
        Rule { text: text.to_string(), canon: canonical(text) }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One table: every chain declared, with its rules in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub chains: BTreeMap<String, Vec<Rule>>,
}

/// Tables by name ("filter", "nat", ...).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ruleset {
    pub tables: BTreeMap<String, Table>,
}

impl Ruleset {
    /// Parses `iptables-save` output or a full `iptables-restore` input (several tables may
    /// follow each other; texts can be added one after the other). Declarations (`:CHAIN
    /// POLICY [counters]`) declare, `-A` appends, `-I CHAIN [N]` inserts (first by default),
    /// `-X` deletes; comments, COMMIT and anything else are ignored.
    pub fn parse(text: &str) -> Ruleset {
        let mut r = Ruleset::default();
        r.add(text);
        r
    }

    /// Adds the lines of `text` (see [`Ruleset::parse`]).
    pub fn add(&mut self, text: &str) {
        let mut table = String::new();
        for line in text.lines() {
            let line = line.trim_end();
            if let Some(t) = line.strip_prefix('*') {
                table = t.trim().to_string();
                self.tables.entry(table.clone()).or_default();
            } else if let Some(decl) = line.strip_prefix(':') {
                if let Some(chain) = decl.split_whitespace().next() {
                    self.chain_mut(&table, chain);
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, rest) = rule.split_once(' ').unwrap_or((rule, ""));
                self.append(&table, chain, rest);
            } else if let Some(rule) = line.strip_prefix("-I ") {
                let (chain, rest) = rule.split_once(' ').unwrap_or((rule, ""));
                let (pos, rest) = match rest.split_once(' ') {
                    Some((n, tail)) if n.bytes().all(|b| b.is_ascii_digit()) => (n.parse().unwrap_or(1), tail),
                    _ => (1, rest),
                };
                let rules = self.chain_mut(&table, chain);
                let at = (pos as usize).saturating_sub(1).min(rules.len());
                rules.insert(at, Rule::new(rest));
            } else if let Some(chain) = line.strip_prefix("-X ")
                && let Some(t) = self.tables.get_mut(&table)
            {
                t.chains.remove(chain.trim());
            }
        }
    }

    /// Appends a rule (`rest`: the text after `-A CHAIN `), declaring the chain if needed.
    pub fn append(&mut self, table: &str, chain: &str, rest: &str) {
        self.chain_mut(table, chain).push(Rule::new(rest));
    }

    fn chain_mut(&mut self, table: &str, chain: &str) -> &mut Vec<Rule> {
        self.tables.entry(table.to_string()).or_default().chains.entry(chain.to_string()).or_default()
    }

    /// The rules of `table`/`chain`, if declared.
    pub fn chain(&self, table: &str, chain: &str) -> Option<&[Rule]> {
        self.tables.get(table)?.chains.get(chain).map(Vec::as_slice)
    }
}

/// The rules kpx's iptables backend keeps in the kernel for `state`: the full render plus the
/// jumps from the built-in chains, as a full sync leaves them (canaries aside). Also returns
/// the render's skip reasons.
pub fn of_kpx(cfg: &super::render::RenderConfig, state: &crate::state::AppliedState) -> (Ruleset, Vec<String>) {
    let mut text = String::new();
    let skipped = super::render::render_full(cfg, state, &mut text);
    let mut rules = Ruleset::parse(&text);
    for j in super::jumps::jumps(cfg.localnet_firewall()) {
        rules.append(j.table, j.chain, &j.rule());
    }
    (rules, skipped)
}
