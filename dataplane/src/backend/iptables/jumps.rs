//! The rules kpx keeps in the built-in chains (the jumps into its own chains, as kube-proxy
//! installs them) and the canary chain that tells when someone flushed the tables.
//!
//! Jumps are ensured on every full sync: the sync reads the nat table anyway (to adopt and
//! delete stale chains) and lists the built-in filter chains, so a missing jump is added as an
//! `-I` line to the same restore, in the same transaction as the chains it points to.

use super::chains;
use super::saved::SavedTable;

/// One jump from a built-in chain into a kpx chain.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Jump {
    pub table: &'static str,
    pub chain: &'static str,
    /// Only new connections (`-m conntrack --ctstate NEW`).
    pub new_only: bool,
    pub comment: &'static str,
    pub target: &'static str,
}

impl Jump {
    /// The rule as iptables-save prints it, after `-A CHAIN `.
    pub fn rule(&self) -> String {
        let ct = if self.new_only { "-m conntrack --ctstate NEW " } else { "" };
        if self.comment.is_empty() {
            return format!("{ct}-j {}", self.target);
        }
        format!("{ct}-m comment --comment \"{}\" -j {}", self.comment, self.target)
    }
}

const SERVICE_PORTALS: &str = "kubernetes service portals";
const EXTERNAL_PORTALS: &str = "kubernetes externally-visible service portals";
const LB_FIREWALL: &str = "kubernetes load balancer firewall";

const fn jump(
    table: &'static str,
    chain: &'static str,
    new_only: bool,
    comment: &'static str,
    target: &'static str,
) -> Jump {
    Jump { table, chain, new_only, comment, target }
}

/// kube-proxy's jumps, in the order they end up in each built-in chain (first = top).
pub const JUMPS: [Jump; 12] = [
    jump("filter", "INPUT", true, LB_FIREWALL, chains::PROXY_FIREWALL),
    jump("filter", "INPUT", false, "kubernetes health check service ports", chains::NODEPORTS),
    jump("filter", "INPUT", true, EXTERNAL_PORTALS, chains::EXTERNAL_SERVICES),
    jump("filter", "FORWARD", true, LB_FIREWALL, chains::PROXY_FIREWALL),
    jump("filter", "FORWARD", false, "kubernetes forwarding rules", chains::FORWARD),
    jump("filter", "FORWARD", true, SERVICE_PORTALS, chains::SERVICES),
    jump("filter", "FORWARD", true, EXTERNAL_PORTALS, chains::EXTERNAL_SERVICES),
    jump("filter", "OUTPUT", true, LB_FIREWALL, chains::PROXY_FIREWALL),
    jump("filter", "OUTPUT", true, SERVICE_PORTALS, chains::SERVICES),
    jump("nat", "PREROUTING", false, SERVICE_PORTALS, chains::SERVICES),
    jump("nat", "OUTPUT", false, SERVICE_PORTALS, chains::SERVICES),
    jump("nat", "POSTROUTING", false, "kubernetes postrouting rules", chains::POSTROUTING),
];

/// The jumps to KUBE-FIREWALL (kube-proxy's copy of kubelet's, without a comment) that go
/// with localhost node ports, first in INPUT and OUTPUT (see [`jumps`]).
pub const FIREWALL_JUMPS: [Jump; 2] =
    [jump("filter", "INPUT", false, "", chains::FIREWALL), jump("filter", "OUTPUT", false, "", chains::FIREWALL)];

/// Every jump kpx keeps, in the order they end up in each built-in chain: [`JUMPS`], after the
/// KUBE-FIREWALL jumps when `firewall` (localhost node ports, IPv4: see
/// `RenderConfig::localnet_firewall`).
pub fn jumps(firewall: bool) -> impl Iterator<Item = &'static Jump> {
    FIREWALL_JUMPS.iter().filter(move |_| firewall).chain(JUMPS.iter())
}

/// The canary's only rule. A flushed table loses it even when the (empty) chain survives,
/// which is what `iptables -t nat -F` does.
pub const CANARY_COMMENT: &str = "kpx canary: a full resync restores the rules when this is gone";

/// The tables kpx programs, each holding a canary.
pub const TABLES: [&str; 2] = ["filter", "nat"];

/// Restore lines that (re)create the canary in a table: the declaration flushes it, then its
/// rule goes back.
pub fn canary_lines(out: &mut String) {
    out.push(':');
    out.push_str(chains::PROXY_CANARY);
    out.push_str(" - [0:0]\n");
    out.push_str(&format!("-A {} -m comment --comment \"{CANARY_COMMENT}\" -j RETURN\n", chains::PROXY_CANARY));
}

/// argv (after the iptables command) that checks the canary rule of `table`.
pub fn canary_check_args(table: &str) -> Vec<String> {
    ["-w", "5", "-t", table, "-C", chains::PROXY_CANARY, "-m", "comment", "--comment", CANARY_COMMENT, "-j", "RETURN"]
        .map(String::from)
        .to_vec()
}

/// `-I` lines for the jumps of `table` (see [`jumps`]) that `saved` lacks, ordered so that
/// prepending them one by one leaves them in [`jumps`] order.
pub fn missing_jumps(table: &str, firewall: bool, saved: &SavedTable, out: &mut String) -> usize {
    let mut n = 0;
    let all: Vec<&Jump> = jumps(firewall).collect();
    for j in all.into_iter().rev().filter(|j| j.table == table) {
        if !saved.has_jump(j.chain, j.comment, j.target) {
            out.push_str(&format!("-I {} {}\n", j.chain, j.rule()));
            n += 1;
        }
    }
    n
}
