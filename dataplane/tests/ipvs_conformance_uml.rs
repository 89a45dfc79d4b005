//! Conformance with the real kube-proxy v1.28.7 in ipvs mode: inside user-mode Linux (IPVS,
//! ipset, iptables-legacy, as where the reference was captured), kpx's ipvs backend programs
//! node-1's state of each case of tests/testdata/kube-proxy-1.28.7, and what the kernel then
//! holds is compared with what kube-proxy left (each case's `ipvs/` folder):
//!
//! - `ipvsadm -Ln`: every virtual server with its flags and real servers (connection counters
//!   are zero on both sides), in any order. kube-proxy's node ports on 169.254.10.2 (the veth
//!   it reached its apiserver through) are left out: kpx's node has only 10.0.0.1.
//! - `ipset list`: every set of both families by name, type and family, with its members in any
//!   order; the hash sizing (hashsize, maxelem, bucketsize, initval) and counters are left out,
//!   and so are members on 169.254.10.2.
//! - `iptables-save` (IPv4): every KUBE-* chain but kubelet's, rule by rule in order, and the
//!   jumps into them from the built-in chains (`ruleset::compare_ipvs`).
//!
//! KUBE-LOOP-BACK keeps one difference, checked to be only that and to change no packet
//! (docs/kube-proxy-differences.md): kube-proxy lists every endpoint of the node, ready or not,
//! where kpx lists those traffic may reach (the others are no real server anywhere). Other
//! nodes' endpoints are not listed: the controlplane tags each endpoint with its node.
//! Between cases, `kpx-dataplane --cleanup`'s code empties the kernel again.

mod conformance;
mod ipvs;
mod uml;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use ipvs::in_uml_limited;
use kpx_dataplane::backend::iptables::ruleset::{self, Ruleset};
use kpx_dataplane::backend::ipvs::{IpvsBackend, IpvsConfig};
use kpx_dataplane::state::ChangeSet;
use kpx_dataplane::stream::Apply;
use kpx_ipvs_netlink::Family;

/// kube-proxy's second address in the reference captures.
const APISERVER_VETH: &str = "169.254.10.2";

fn run(argv: &[&str]) -> String {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ipvsadm -Ln` as a set of virtual servers, each with its sorted real servers, words joined
/// by one space.
fn ipvs_table(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in text.lines().skip(3) {
        let words = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if line.starts_with("  ->") {
            if let Some(dests) = current.as_ref().and_then(|vs| out.get_mut(vs)) {
                dests.push(words);
            }
        } else if !words.is_empty() {
            current = (!words.contains(APISERVER_VETH)).then(|| words.clone());
            if let Some(vs) = &current {
                out.insert(vs.clone(), Vec::new());
            }
        }
    }
    out.values_mut().for_each(|d| d.sort());
    out
}

/// `ipset list` as name -> (type and family/range, sorted members).
fn ipsets(text: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut out = BTreeMap::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("");
        let header: Vec<&str> = field("Header:").split_whitespace().collect();
        let kept: Vec<&str> = header
            .chunks(2)
            .filter(|kv| kv[0] == "family" || kv[0] == "range")
            .flat_map(|kv| kv.iter().copied())
            .collect();
        let members: BTreeSet<String> = block
            .lines()
            .skip_while(|l| !l.starts_with("Members:"))
            .skip(1)
            .map(str::trim)
            .filter(|m| !m.is_empty() && !m.contains(APISERVER_VETH))
            .map(String::from)
            .collect();
        out.insert(field("Name:").to_string(), (format!("{} {}", field("Type:"), kept.join(" ")), members));
    }
    out
}

/// A KUBE-LOOP-BACK member of an endpoint that is no real server anywhere in kube-proxy's table
/// (not ready, or not chosen): kube-proxy lists every endpoint of the node, kpx only those
/// traffic may reach (the controlplane sends no other); no packet to it can match.
fn loop_back_without_traffic(set: &str, member: &str, table: &BTreeMap<String, Vec<String>>) -> bool {
    // "10.244.1.197,tcp:8051,10.244.1.197" -> "10.244.1.197:8051"
    let Some((ip, rest)) = member.split_once(',') else { return false };
    let port = rest.split(',').next().and_then(|p| p.split(':').nth(1)).unwrap_or("");
    let dest = format!("-> {ip}:{port} ");
    set.ends_with("LOOP-BACK") && !table.values().flatten().any(|d| d.starts_with(&dest))
}

#[test]
fn ipvs_mode_matches_kube_proxy() {
    // Sixteen clusters programmed and read back in one UML kernel.
    in_uml_limited("ipvs_mode_matches_kube_proxy", &[], std::time::Duration::from_secs(600), || {
        let started = std::time::Instant::now();
        // kube-proxy's node: eth0 with 10.0.0.1/24.
        run(&["ip", "link", "add", "eth0", "type", "dummy"]);
        run(&["ip", "addr", "add", "10.0.0.1/24", "dev", "eth0"]);
        run(&["ip", "link", "set", "eth0", "up"]);
        let mut problems = Vec::new();
        let (mut servers, mut members, mut rules) = (0, 0, 0);
        for case in conformance::cases() {
            let mut cfg = IpvsConfig::new(&case.node());
            cfg.node_ips = vec!["10.0.0.1".parse().unwrap()];
            cfg.families = vec![Family::Inet, Family::Inet6];
            cfg.cluster_cidrs = vec![case.flag("cluster-cidr").unwrap()];
            cfg.restore_cmd = "iptables-legacy-restore".into();
            let mut b = IpvsBackend::new(cfg).expect("IPVS in UML");
            let state = case.state();
            b.apply(&state, &ChangeSet { full: true, services: state.services().keys().cloned().collect() })
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));

            let want = ipvs_table(&case.read("ipvs/ipvsadm-Ln.txt"));
            let have = ipvs_table(&run(&["ipvsadm", "-Ln"]));
            let kube_proxy_table = want.clone();
            servers += want.len();
            for (vs, dests) in &want {
                match have.get(vs) {
                    None => problems.push(format!("{}: ipvs: missing {vs}", case.name)),
                    Some(d) if d != dests => problems.push(format!("{}: ipvs {vs}: {d:?} != {dests:?}", case.name)),
                    Some(_) => {}
                }
            }
            problems.extend(
                have.keys().filter(|vs| !want.contains_key(*vs)).map(|vs| format!("{}: ipvs: extra {vs}", case.name)),
            );

            let want = ipsets(&case.read("ipvs/ipset-list.txt"));
            let have = ipsets(&run(&["ipset", "list"]));
            for (name, (kind, m)) in &want {
                members += m.len();
                let Some((have_kind, have_m)) = have.get(name) else {
                    problems.push(format!("{}: ipset {name} missing", case.name));
                    continue;
                };
                if have_kind != kind {
                    problems.push(format!("{}: ipset {name}: {have_kind} != {kind}", case.name));
                }
                for missing in m.difference(have_m).filter(|e| !loop_back_without_traffic(name, e, &kube_proxy_table)) {
                    problems.push(format!("{}: ipset {name}: missing {missing}", case.name));
                }
                for extra in have_m.difference(m) {
                    problems.push(format!("{}: ipset {name}: extra {extra}", case.name));
                }
            }
            problems.extend(
                have.keys().filter(|n| !want.contains_key(*n)).map(|n| format!("{}: extra ipset {n}", case.name)),
            );

            let want = Ruleset::parse(&case.read("ipvs/iptables-save.txt"));
            rules += ["filter", "nat"]
                .iter()
                .filter_map(|t| want.tables.get(*t))
                .flat_map(|t| t.chains.values())
                .map(Vec::len)
                .sum::<usize>();
            let have = Ruleset::parse(&run(&["iptables-legacy-save"]));
            problems.extend(ruleset::compare_ipvs(&have, &want).iter().map(|d| format!("{}: {d}", case.name)));

            drop(b);
            let report = kpx_dataplane::cleanup::run(None);
            assert!(report.errors.is_empty(), "{}: cleanup: {:?}", case.name, report.errors);
            assert_eq!(run(&["ipvsadm", "-Sn"]).trim(), "", "cleanup left virtual servers");
            eprintln!("{}: compared at {:?}", case.name, started.elapsed());
        }
        assert!(servers > 200 && members > 100 && rules > 500, "{servers} servers, {members} members, {rules} rules");
        assert!(
            problems.is_empty(),
            "{} differences from kube-proxy's ipvs mode:\n{}",
            problems.len(),
            problems.join("\n")
        );
        eprintln!("16 cases: {servers} virtual servers, {members} set members, {rules} rules, no difference");
    });
}
