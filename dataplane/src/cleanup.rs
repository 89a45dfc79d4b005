//! `kpx-dataplane --cleanup`: removes what kpx or kube-proxy (iptables and ipvs modes) installed,
//! for rolling back: their iptables chains and every rule that jumps into them (IPv4 and IPv6,
//! iptables-nft and iptables-legacy, whichever has rules), their ipsets, the IPVS table and the
//! kube-ipvs0 dummy interface. Like kube-proxy's `--cleanup`, it leaves kubelet's chains
//! (KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-MARK-DROP), clears the whole IPVS table (IPVS has
//! no owner field) and does not reset sysctls.
//!
//! The iptables part is one `iptables-restore --noflush` per table set: pure text from
//! `iptables-save` ([`restore_input`]), so that the chains go in one transaction.

use crate::backend::iptables::exec::Runner;
use crate::backend::iptables::ruleset::Ruleset;

/// kubelet's chains, which kube-proxy creates too but never deletes.
const KUBELET_CHAINS: [&str; 3] = ["KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-MARK-DROP"];

/// Whether `chain` is kube-proxy's (either mode) or kpx's.
pub fn is_proxy_chain(chain: &str) -> bool {
    chain.starts_with("KUBE-") && !KUBELET_CHAINS.contains(&chain)
}

/// Whether an ipset is kube-proxy's (KUBE-*, KUBE-6-*) or one of kpx's temporary sets.
pub fn is_proxy_set(name: &str) -> bool {
    name.starts_with("KUBE-") || name.starts_with("KPX-T")
}

/// What was removed, and what could not be.
#[derive(Debug, Default)]
pub struct Report {
    pub removed: Vec<String>,
    pub errors: Vec<String>,
}

impl Report {
    pub fn into_result(self) -> Result<(), String> {
        if self.errors.is_empty() {
            tracing::info!(removed = self.removed.len(), "cleanup done");
            Ok(())
        } else {
            Err(format!("cleanup incomplete: {}", self.errors.join("; ")))
        }
    }
}

/// `iptables-restore --noflush` input that removes the proxy chains of `saved` (iptables-save
/// output, all tables) and every rule elsewhere that jumps into them; None when there are none.
/// Per table: the proxy chains are flushed (declared), the rules pointing at them deleted, then
/// the chains deleted, so that no deletion meets a chain still referenced.
pub fn restore_input(saved: &str) -> Option<String> {
    let rules = Ruleset::parse(saved);
    let mut out = String::new();
    for (table, t) in &rules.tables {
        let proxy: Vec<&String> = t.chains.keys().filter(|c| is_proxy_chain(c)).collect();
        let mut lines = Vec::new();
        for (chain, list) in t.chains.iter().filter(|(c, _)| !is_proxy_chain(c)) {
            for r in list {
                let jumps = r.canon.windows(2).any(|w| (w[0] == "-j" || w[0] == "-g") && is_proxy_chain(&w[1]));
                if jumps {
                    lines.push(format!("-D {chain} {}", r.text));
                }
            }
        }
        if proxy.is_empty() && lines.is_empty() {
            continue;
        }
        out.push_str(&format!("*{table}\n"));
        for c in &proxy {
            out.push_str(&format!(":{c} - [0:0]\n"));
        }
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
        for c in &proxy {
            out.push_str(&format!("-X {c}\n"));
        }
        out.push_str("COMMIT\n");
    }
    (!out.is_empty()).then_some(out)
}

/// Removes everything (see the module comment), in `netns` for tests.
pub fn run(netns: Option<&str>) -> Report {
    let runner = Runner { netns: netns.map(str::to_string) };
    let mut report = Report::default();
    for tool in ["iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy"] {
        iptables(&runner, tool, &mut report);
    }
    ipsets(&runner, &mut report);
    ipvs(&runner, netns, &mut report);
    for r in &report.removed {
        tracing::info!("removed {r}");
    }
    report
}

fn iptables(runner: &Runner, tool: &str, report: &mut Report) {
    let save = format!("{tool}-save");
    // A variant that is not installed (or has no kernel support) has nothing to clean.
    let saved = match runner.run(&[&save], &[]) {
        Ok(r) if r.success => r.stdout,
        _ => return,
    };
    let Some(input) = restore_input(&saved) else { return };
    let restore = format!("{tool}-restore");
    match runner.run_ok(&[&restore, "--noflush", "--wait=5"], &[&input]) {
        Ok(_) => {
            let chains = input.lines().filter(|l| l.starts_with("-X ")).count();
            let jumps = input.lines().filter(|l| l.starts_with("-D ")).count();
            report.removed.push(format!("{tool}: {chains} chains, {jumps} rules jumping to them"));
        }
        Err(e) => report.errors.push(format!("{tool}: {e}")),
    }
}

fn ipsets(runner: &Runner, report: &mut Report) {
    let names = match runner.run(&["ipset", "list", "-n"], &[]) {
        Ok(r) if r.success => r.stdout,
        // No ipset tool or no kernel support: no sets to destroy.
        _ => return,
    };
    for name in names.lines().map(str::trim).filter(|n| is_proxy_set(n)) {
        match runner.run_ok(&["ipset", "destroy", name], &[]) {
            Ok(_) => report.removed.push(format!("ipset {name}")),
            Err(e) => report.errors.push(format!("ipset {name}: {e}")),
        }
    }
}

fn ipvs(runner: &Runner, netns: Option<&str>, report: &mut Report) {
    if runner.run(&["ip", "link", "show", "dev", "kube-ipvs0"], &[]).is_ok_and(|r| r.success) {
        match runner.run_ok(&["ip", "link", "del", "dev", "kube-ipvs0"], &[]) {
            Ok(_) => report.removed.push("interface kube-ipvs0".into()),
            Err(e) => report.errors.push(format!("kube-ipvs0: {e}")),
        }
    }
    if netns.is_some() {
        // The IPVS socket is this process's namespace's, not the test namespace's.
        return;
    }
    let Ok(mut client) = kpx_ipvs_netlink::IpvsClient::new() else { return };
    match client.services() {
        Ok(services) if services.is_empty() => {}
        Ok(services) => match client.flush() {
            Ok(()) => report.removed.push(format!("{} IPVS virtual servers", services.len())),
            Err(e) => report.errors.push(format!("IPVS flush: {e}")),
        },
        Err(e) => report.errors.push(format!("IPVS: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_proxy_chains_and_every_jump_into_them_only() {
        let saved = r#"*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-NODEPORTS - [0:0]
:CNI-FW - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -j CNI-FW
-A CNI-FW -g KUBE-NODEPORTS
-A CNI-FW -j ACCEPT
-A KUBE-NODEPORTS -p tcp -m tcp --dport 30000 -j ACCEPT
COMMIT
"#;
        let input = restore_input(saved).unwrap();
        assert_eq!(
            input,
            "*filter\n:KUBE-NODEPORTS - [0:0]\n-D CNI-FW -g KUBE-NODEPORTS\n\
             -D INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
             -X KUBE-NODEPORTS\nCOMMIT\n*mangle\n:KUBE-PROXY-CANARY - [0:0]\n-X KUBE-PROXY-CANARY\nCOMMIT\n"
        );
        let kept = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n";
        assert_eq!(restore_input(kept), None, "kubelet's chain stays");
        assert!(is_proxy_set("KUBE-6-CLUSTER-IP") && is_proxy_set("KPX-TLOOP-BACK") && !is_proxy_set("cali40-x"));
    }
}
