//! Part 1 of the test: the deterministic hostile state, applied by the real backend.

use std::collections::BTreeSet;
use std::time::Instant;

use kpx_dataplane::backend::iptables::IptablesBackend;
use kpx_dataplane::backend::iptables::chains::PortChains;
use kpx_dataplane::backend::iptables::render::{self, IpFamily};
use kpx_dataplane::state::{AppliedState, ChangeSet};
use kpx_dataplane::stream::Apply;

use crate::checks::{check_kernel, check_text, is_kpx_chain, is_service_chain, same_ruleset};
use crate::hostile::{WEB_V4, WEB_V6, hostile_delta, hostile_model};
use crate::iptables::{Tables, Tools, arg, backend_cfg, comments, save, tokens, variants};
use crate::model::render_cfg;
use crate::netns::NetNs;

/// Web's rules in the kernel: its cluster IP and node port lead to exactly `endpoints`.
fn check_web(tables: &Tables, family: IpFamily, endpoints: &[&str]) -> Result<(), String> {
    let ch = PortChains::new("ns/web:http", "tcp");
    let nat = tables.get("nat").ok_or("no nat table")?;
    let (vip, want): (String, BTreeSet<String>) = match family {
        IpFamily::V4 => (
            format!("{WEB_V4}/32"),
            endpoints.iter().filter(|e| !e.contains(':')).map(|e| format!("{e}:8080")).collect(),
        ),
        IpFamily::V6 => (
            format!("{WEB_V6}/128"),
            endpoints.iter().filter(|e| e.contains(':')).map(|e| format!("[{e}]:8080")).collect(),
        ),
    };
    let rules = |c: &str| nat.get(c).cloned().unwrap_or_default();
    let entry = rules("KUBE-SERVICES").into_iter().filter_map(|r| tokens(&r)).any(|t| {
        arg(&t, "-d") == Some(vip.as_str())
            && arg(&t, "--dport") == Some("80")
            && arg(&t, "-j") == Some(ch.svc.as_str())
    });
    if !entry {
        return Err(format!(
            "nat KUBE-SERVICES lacks web's cluster IP rule to {}: {:#?}",
            ch.svc,
            rules("KUBE-SERVICES")
        ));
    }
    let node_port = rules("KUBE-NODEPORTS")
        .into_iter()
        .filter_map(|r| tokens(&r))
        .any(|t| arg(&t, "--dport") == Some("30080") && arg(&t, "-j") == Some(ch.ext.as_str()));
    if !node_port || !rules(&ch.ext).iter().any(|r| r.ends_with(&format!("-j {}", ch.svc))) {
        return Err(format!("web's node port does not lead to {}", ch.svc));
    }
    let mut got = BTreeSet::new();
    for r in rules(&ch.svc) {
        let t = tokens(&r).ok_or("unbalanced quote")?;
        let target = arg(&t, "-j").unwrap_or_default();
        if target == "KUBE-MARK-MASQ" {
            continue;
        }
        if !target.starts_with("KUBE-SEP-") {
            return Err(format!("{} jumps to {target}", ch.svc));
        }
        for sep in rules(target) {
            if let Some(d) = tokens(&sep).and_then(|t| arg(&t, "--to-destination").map(String::from)) {
                got.insert(d);
            }
        }
    }
    if got != want {
        return Err(format!("web ({}) DNATs to {got:?}, want {want:?}", ch.svc));
    }
    let filter = tables.get("filter").ok_or("no filter table")?;
    if filter.values().flatten().any(|r| r.contains(&vip)) {
        return Err(format!("a filter rule names web's cluster IP {vip}"));
    }
    Ok(())
}

pub(crate) fn hostile_state_applies(variant: &'static str) {
    let test = format!("hostile_state_iptables_{variant}");
    if !variants(&test).contains(&variant) {
        return;
    }
    let (model, unrenderable) = hostile_model();
    let mut state = AppliedState::default();
    let snap = model.snapshot();
    state.apply(&snap).expect("the hostile snapshot is a consistent state");
    let (_, delta) = model.after(hostile_delta());
    let mut after = state.clone();
    let changes = after.apply(&delta).expect("the hostile delta applies");
    assert!(!changes.full);

    for family in [IpFamily::V4, IpFamily::V6] {
        let tools = Tools { family, variant };
        let ctx = tools.name();
        // Every service the renderer leaves out entirely is reported.
        let mut out = String::new();
        let skipped = render::render_full(&render_cfg(family), &state, &mut out);
        check_text(&out).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        for k in &unrenderable {
            let name: String = k.chars().filter(|c| !c.is_control() && !"\"\\'".contains(*c)).collect();
            assert!(
                skipped.iter().any(|s| s.starts_with(&name)),
                "{ctx}: service {k:?} renders nothing and no skip says why: {skipped:#?}"
            );
            assert!(!out.contains(&format!("\"{name}")), "{ctx}: {k:?} was rendered");
        }
        for why in [
            "ns/web:http: invalid name",
            "dup/ports: port \"p\": duplicate port name",
            "eps/odd:p: endpoint [fd00:10::5]:80: duplicate address",
            "affinity/affinity-max: session affinity timeout 4294967295 capped at 86400 seconds",
            "ports/numbers: port \"np-big\": invalid node port 65536",
            "protos/all: port \"x0\": no protocol",
            "addrs/lb: invalid CIDR \"0.0.0.0/0-A INPUT -j DROP\"",
        ] {
            // (The endpoint is IPv6: only that family's renderer sees it.)
            if family == IpFamily::V4 && why.starts_with("eps/odd") {
                continue;
            }
            assert!(skipped.iter().any(|s| s.starts_with(why)), "{ctx}: no skip {why:?}: {skipped:#?}");
        }

        let ns = NetNs::new("hostile");
        let (_, before) = save(&ns, tools).unwrap();
        assert!(before.values().flatten().all(|(_, rules)| rules.is_empty()), "{ctx}: namespace not empty: {before:?}");
        let cfg = backend_cfg(&ns, tools, render_cfg(family));
        let mut b = IptablesBackend::new(cfg.clone());

        // Full sync.
        let started = Instant::now();
        b.apply(&state, &ChangeSet { full: true, services: BTreeSet::new() })
            .unwrap_or_else(|e| panic!("{ctx}: full sync of the hostile state: {e}"));
        assert_eq!(b.stats().restore_failures, 0, "{ctx}: {:?}", b.stats().last_error);
        let input = b.last_restore_input();
        let (text, tables) = save(&ns, tools).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        check_kernel(&tables, true, render_cfg(family).localnet_firewall()).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        check_web(&tables, family, &["10.180.0.1", "10.180.0.2", "fd00:10::1", "fd00:10::2"])
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(comments(&input), comments(&text), "{ctx}: the kernel's comments are not the ones written");
        let kpx_rules: usize =
            tables.values().flat_map(|c| c.iter()).filter(|(c, _)| is_kpx_chain(c)).map(|(_, r)| r.len()).sum();
        assert_eq!(kpx_rules, b.stats().rules.filter + b.stats().rules.nat, "{ctx}: rule count");
        eprintln!(
            "{ctx}: full sync of {} services, {kpx_rules} rules, in {:?}",
            state.services().len(),
            started.elapsed()
        );

        // A resync finds every per-service chain exactly as it would write it.
        let service_chains = tables["nat"].keys().filter(|c| is_service_chain(c)).count();
        b.apply(&state, &ChangeSet { full: true, services: BTreeSet::new() }).unwrap();
        assert_eq!(b.stats().restore_failures, 0, "{ctx}: {:?}", b.stats().last_error);
        let resync = b.last_restore_input();
        let rewritten: BTreeSet<&str> = resync
            .lines()
            .filter_map(|l| l.strip_prefix("-A ").or_else(|| l.strip_prefix(':')))
            .filter_map(|l| l.split(' ').next())
            .filter(|c| is_service_chain(c))
            .collect();
        let drift: Vec<_> = rewritten.iter().map(|c| (c, tables["nat"].get(*c))).collect();
        let written: Vec<&str> =
            resync.lines().filter(|l| rewritten.iter().any(|c| l.starts_with(&format!("-A {c} ")))).collect();
        assert_eq!(
            b.stats().last_unchanged_chains,
            service_chains,
            "{ctx}: the resync rewrote chains the kernel holds as written: {written:#?}\nkernel: {drift:#?}"
        );

        // The hostile delta goes in as a partial sync, without a failure.
        b.apply(&after, &changes).unwrap_or_else(|e| panic!("{ctx}: partial sync: {e}"));
        assert_eq!(b.stats().restore_failures, 0, "{ctx}: partial sync failed: {:?}", b.stats().last_error);
        assert!(!b.stats().last_sync_full, "{ctx}: the delta was not a partial sync");
        let (text, partial) = save(&ns, tools).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        check_kernel(&partial, true, render_cfg(family).localnet_firewall())
            .unwrap_or_else(|e| panic!("{ctx}: after the delta: {e}"));
        check_web(&partial, family, &["10.180.0.2", "10.180.0.3", "fd00:10::2", "fd00:10::3"])
            .unwrap_or_else(|e| panic!("{ctx}: after the delta: {e}"));
        assert!(!text.contains("10.189.0.2"), "{ctx}");

        // ... leaving what a fresh agent's full sync of the same state leaves.
        let mut fresh_cfg = cfg;
        fresh_cfg.skip_unchanged_chains = false;
        let mut fresh = IptablesBackend::new(fresh_cfg);
        fresh.apply(&after, &ChangeSet { full: true, services: BTreeSet::new() }).unwrap();
        let (_, full) = save(&ns, tools).unwrap();
        same_ruleset(&partial, &full).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(b.stats().rules, fresh.stats().rules, "{ctx}: the partial sync's rule count drifted");
    }
}
