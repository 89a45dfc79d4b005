//! Kernel tests of the iptables backend: real iptables-restore (nft and legacy) in a fresh
//! network namespace. They need root and `ip netns`; without them they print a loud SKIPPED
//! line, except under CI=true, where they fail.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kpx_dataplane::backend::iptables::render::IpFamily;
use kpx_dataplane::backend::iptables::{IptablesBackend, IptablesConfig};
use kpx_dataplane::state::{AppliedState, ChangeSet};
use kpx_dataplane::stream::Apply;
use kpx_proto::v1 as pb;

/// A network namespace deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> Result<NetNs, String> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("kpxdev-apply-{}-{tag}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let out = Command::new("ip").args(["netns", "add", &name]).output().map_err(|e| format!("ip: {e}"))?;
        if !out.status.success() {
            return Err(format!("ip netns add failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(NetNs(name))
    }

    fn run(&self, argv: &[&str]) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.0]).args(argv).output().expect("ip netns exec runs");
        assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Root, the tools and a fresh namespace; Err says what is missing.
fn kernel_ready(tag: &str, tools: &[&str]) -> Result<NetNs, String> {
    let uid = Command::new("id").arg("-u").output().map_err(|e| format!("id -u: {e}"))?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    for t in tools {
        if !Command::new(t).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return Err(format!("{t} is not installed"));
        }
    }
    NetNs::new(tag)
}

/// The test's namespace, or None (after a loud SKIPPED line) when the test cannot run; under
/// CI=true it panics instead.
fn netns_or_skip(test: &str, tag: &str, tools: &[&str]) -> Option<NetNs> {
    match kernel_ready(tag, tools) {
        Ok(ns) => Some(ns),
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: kernel test cannot run under CI=true: {why}")
        }
        Err(why) => {
            eprintln!(
                "\n*** SKIPPED {test}: {why} (needs root, ip netns, iptables; CI=true makes this a failure) ***\n"
            );
            None
        }
    }
}

fn svc(name: &str, ip: &str, proto: pb::Protocol, port: u32) -> pb::Service {
    pb::Service {
        namespace: "ns".into(),
        name: name.into(),
        r#type: pb::ServiceType::ClusterIp as i32,
        cluster_ips: vec![ip.into()],
        ports: vec![pb::ServicePort { name: "p".into(), protocol: proto as i32, port, node_port: 0 }],
        ..Default::default()
    }
}

fn ep(service: &str, ip: &str, port: u32) -> pb::Endpoint {
    pb::Endpoint {
        service: format!("ns/{service}"),
        ip: ip.into(),
        ports: vec![pb::EndpointPort { name: "p".into(), port }],
        for_cluster: true,
        for_local: false,
        node_tag: 0,
    }
}

fn state(services: &[pb::Service], endpoints: &[pb::Endpoint]) -> AppliedState {
    AppliedState::with(services.to_vec(), endpoints.to_vec()).expect("test state applies")
}

fn changes(full: bool, keys: &[&str]) -> ChangeSet {
    ChangeSet { full, services: keys.iter().map(|k| k.to_string()).collect() }
}

fn lines_of<'a>(save: &'a str, chain: &str) -> Vec<&'a str> {
    let prefix = format!("-A {chain} ");
    save.lines().filter(|l| l.starts_with(&prefix)).collect()
}

fn chains_like<'a>(save: &'a str, prefix: &str) -> BTreeSet<&'a str> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with(prefix))
        .collect()
}

const WEB: &str = "172.30.0.41";
const DNS: &str = "172.30.0.10";

fn backend(ns: &NetNs, variant: &str) -> IptablesBackend {
    let mut cfg = IptablesConfig::new(IpFamily::V4, "node1");
    cfg.restore_cmd = format!("iptables-{variant}-restore");
    cfg.save_cmd = format!("iptables-{variant}-save");
    cfg.cluster_cidr = Some("10.0.0.0/8".into());
    cfg.netns = Some(ns.0.clone());
    IptablesBackend::new(cfg)
}

fn sync_flush_and_adopt(variant: &str) {
    let test = format!("iptables_apply_{variant}");
    let restore = format!("iptables-{variant}-restore");
    let Some(ns) = netns_or_skip(&test, variant, &[&restore, "conntrack"]) else { return };
    let save = |table: &str| ns.run(&[&format!("iptables-{variant}-save"), "-t", table]);
    let ipt = format!("iptables-{variant}");
    let services = [svc("web", WEB, pb::Protocol::Tcp, 80), svc("dns", DNS, pb::Protocol::Udp, 53)];
    let mut eps = vec![ep("web", "10.180.0.1", 8080), ep("web", "10.180.0.2", 8080), ep("dns", "10.180.0.5", 5353)];

    // 1. First sync: full, with the jumps from the built-in chains and the canary.
    let mut b = backend(&ns, variant);
    let started = std::time::Instant::now();
    b.apply(&state(&services, &eps), &changes(true, &["ns/web", "ns/dns"])).unwrap();
    eprintln!("{variant}: first full sync took {:?} (stats {:?})", started.elapsed(), b.stats().last_sync_duration);
    assert!(b.stats().last_sync_full);
    let nat = save("nat");
    assert_eq!(
        lines_of(&nat, "PREROUTING"),
        ["-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"]
    );
    assert_eq!(lines_of(&nat, "POSTROUTING").len(), 1);
    assert!(lines_of(&nat, "KUBE-POSTROUTING").iter().any(|l| l.contains("MASQUERADE")), "{nat}");
    assert_eq!(lines_of(&nat, "KUBE-SERVICES").len(), 3, "two cluster IPs and the nodeports jump: {nat}");
    assert_eq!(chains_like(&nat, "KUBE-SEP-").len(), 3);
    let filter = save("filter");
    assert_eq!(lines_of(&filter, "FORWARD").len(), 4, "{filter}");
    assert!(lines_of(&filter, "FORWARD")[0].ends_with("-j KUBE-PROXY-FIREWALL"));
    assert!(b.check_canary());

    // A second full sync adds no second copy of any jump.
    b.apply(&state(&services, &eps), &changes(true, &[])).unwrap();
    assert_eq!(lines_of(&save("nat"), "PREROUTING").len(), 1);
    // Three jumps of its own and, with localhost node ports (the default), the one to KUBE-FIREWALL.
    assert_eq!(lines_of(&save("filter"), "INPUT").len(), 4);

    // 2. An endpoint change: a partial sync; the new rule is there, KUBE-SERVICES untouched.
    let services_before: Vec<String> = lines_of(&nat, "KUBE-SERVICES").into_iter().map(String::from).collect();
    eps.push(ep("web", "10.180.0.3", 8080));
    let started = std::time::Instant::now();
    b.apply(&state(&services, &eps), &changes(false, &["ns/web"])).unwrap();
    eprintln!("{variant}: one-endpoint partial sync took {:?}", started.elapsed());
    assert!(!b.stats().last_sync_full);
    assert!(!b.last_restore_input().contains("KUBE-SERVICES"), "{}", b.last_restore_input());
    let nat = save("nat");
    assert!(nat.contains("-j DNAT --to-destination 10.180.0.3:8080"), "{nat}");
    assert_eq!(lines_of(&nat, "KUBE-SERVICES"), services_before);
    assert_eq!(chains_like(&nat, "KUBE-SEP-").len(), 4);

    // The UDP service loses its endpoint: rules change and conntrack is asked to clean up.
    let deletes = b.stats().conntrack_deletes;
    eps.retain(|e| e.ip != "10.180.0.5");
    b.apply(&state(&services, &eps), &changes(false, &["ns/dns"])).unwrap();
    assert!(b.stats().conntrack_deletes > deletes, "{:?}", b.stats());
    assert!(save("filter").contains("ns/dns:p has no endpoints"));

    // 3. Someone flushes nat: the canary notices and the next sync puts everything back.
    ns.run(&[&ipt, "-t", "nat", "-F"]);
    assert!(lines_of(&save("nat"), "KUBE-SERVICES").is_empty());
    assert!(!b.check_canary());
    b.apply(&state(&services, &eps), &changes(false, &[])).unwrap();
    assert!(b.stats().last_sync_full);
    let nat = save("nat");
    assert_eq!(lines_of(&nat, "PREROUTING").len(), 1, "{nat}");
    assert!(!lines_of(&nat, "KUBE-SERVICES").is_empty(), "{nat}");
    assert!(b.check_canary());

    // 3b. Someone deletes a jump from a built-in filter chain and flushes the filter canary:
    // the full sync finds the jump missing (it lists the built-in chains) and puts it back once.
    ns.run(&[
        &ipt,
        "-t",
        "filter",
        "-D",
        "FORWARD",
        "-m",
        "comment",
        "--comment",
        "kubernetes forwarding rules",
        "-j",
        "KUBE-FORWARD",
    ]);
    ns.run(&[&ipt, "-t", "filter", "-F", "KUBE-PROXY-CANARY"]);
    assert_eq!(lines_of(&save("filter"), "FORWARD").len(), 3);
    assert!(!b.check_canary());
    b.apply(&state(&services, &eps), &changes(false, &[])).unwrap();
    assert!(b.stats().last_sync_full);
    let filter = save("filter");
    assert_eq!(lines_of(&filter, "FORWARD").len(), 4, "{filter}");
    assert!(
        filter.contains("-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD"),
        "{filter}"
    );

    // 4. A restarted agent adopts: meanwhile the UDP service went away, and a chain of some
    // earlier agent is lying around. Its first sync deletes both without a moment in which
    // the web service's rule is missing.
    ns.run(&[&ipt, "-t", "nat", "-N", "KUBE-SVC-STALESTALESTALE"]);
    ns.run(&[&ipt, "-t", "nat", "-A", "KUBE-SVC-STALESTALESTALE", "-j", "RETURN"]);
    let web_rule = lines_of(&save("nat"), "KUBE-SERVICES").into_iter().find(|l| l.contains(WEB)).unwrap().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let gaps = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let (stop, gaps, name, variant, web_rule) =
            (stop.clone(), gaps.clone(), ns.0.clone(), variant.to_string(), web_rule.clone());
        std::thread::spawn(move || {
            let mut polls = 0;
            while !stop.load(Ordering::Relaxed) || polls < 3 {
                let out = Command::new("ip")
                    .args(["netns", "exec", &name, &format!("iptables-{variant}-save"), "-t", "nat"])
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                let jump =
                    text.contains("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES");
                if !(jump && text.contains(&web_rule)) {
                    gaps.lock().unwrap().push(text.into_owned());
                }
                polls += 1;
            }
            polls
        })
    };
    let mut restarted = backend(&ns, variant);
    let web_only = [services[0].clone()];
    let web_eps: Vec<pb::Endpoint> = eps.iter().filter(|e| e.service == "ns/web").cloned().collect();
    std::thread::sleep(std::time::Duration::from_millis(50));
    restarted.apply(&state(&web_only, &web_eps), &changes(true, &["ns/web"])).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let polls = watcher.join().unwrap();
    eprintln!("{variant}: watched {polls} iptables-save snapshots during the adopting sync");
    let gaps = gaps.lock().unwrap();
    assert!(gaps.is_empty(), "{} of {polls} snapshots lacked the web rule, e.g.:\n{}", gaps.len(), gaps[0]);
    let input = restarted.last_restore_input();
    assert_eq!(restarted.restore_argv()[1], "--noflush");
    assert!(!input.lines().any(|l| l.starts_with("-F") || l.starts_with("-X KUBE-SERVICES")), "{input}");
    assert!(input.contains("-X KUBE-SVC-STALESTALESTALE"), "{input}");
    let nat = save("nat");
    assert!(!nat.contains("STALE") && !nat.contains(DNS), "{nat}");
    assert_eq!(chains_like(&nat, "KUBE-SEP-").len(), 3, "{nat}");
    assert_eq!(lines_of(&nat, "PREROUTING").len(), 1);
    assert!(nat.contains(&web_rule));
}

#[test]
fn iptables_nft_sync_flush_and_adopt() {
    sync_flush_and_adopt("nft");
}

#[test]
fn iptables_legacy_sync_flush_and_adopt() {
    sync_flush_and_adopt("legacy");
}

/// A full sync on iptables-nft larger than `full_sync_chunk_rules` goes in as several restores
/// (whole services per restore, KUBE-SERVICES last); the kernel ends up with every rule once,
/// and a second full sync over it changes nothing.
#[test]
fn iptables_nft_split_full_sync() {
    let Some(ns) = netns_or_skip("iptables_nft_split_full_sync", "split", &["iptables-nft-restore"]) else { return };
    let save = || {
        ["filter", "nat"]
            .map(|t| ns.run(&["iptables-nft-save", "-t", t]))
            .concat()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let n = 300;
    let services: Vec<pb::Service> = (0..n)
        .map(|i| svc(&format!("s{i}"), &format!("172.30.{}.{}", i / 200, i % 200 + 1), pb::Protocol::Tcp, 80))
        .collect();
    let eps: Vec<pb::Endpoint> = (0..n)
        .flat_map(|i| {
            (1..=2).map(move |j| ep(&format!("s{i}"), &format!("10.180.{}.{}", i / 100, (i % 100) * 2 + j), 8080))
        })
        .collect();
    let st = state(&services, &eps);
    let mut b = backend(&ns, "nft");
    let mut cfg = b.config().clone();
    cfg.full_sync_chunk_rules = 500;
    b = IptablesBackend::new(cfg);

    b.apply(&st, &changes(true, &[])).unwrap();
    let restores = b.stats().last_restores;
    eprintln!("nft: full sync of {n} services in {restores} restores took {:?}", b.stats().last_sync_duration);
    let rules = b.stats().rules;
    assert!(restores >= 2 + (rules.filter + rules.nat) / 500, "{restores} restores for {rules:?}");
    let first = save();
    let (mut uniq, mut table) = (BTreeSet::new(), "");
    for l in &first {
        if l.starts_with('*') {
            table = l;
        } else if l.starts_with("-A ") || l.starts_with(':') {
            assert!(uniq.insert((table, l.as_str())), "twice in {table}: {l}");
        }
    }
    let text = first.join("\n");
    let svc_lines = lines_of(&text, "KUBE-SERVICES");
    for i in 0..n {
        let want = format!("\"ns/s{i}:p cluster IP\"");
        assert_eq!(svc_lines.iter().filter(|l| l.contains(&want)).count(), 1, "s{i}: {text}");
    }
    assert_eq!(chains_like(&text, "KUBE-SVC-").len(), n);
    assert_eq!(chains_like(&text, "KUBE-SEP-").len(), 2 * n);
    assert_eq!(lines_of(&text, "KUBE-SERVICES").len(), n + 1);
    assert_eq!(lines_of(&text, "KUBE-MARK-MASQ").len(), 1);
    assert_eq!(lines_of(&text, "PREROUTING").len(), 1);
    // What the backend counts is what the kernel has (its own chains only).
    let builtin = ["INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"];
    let kpx = first
        .iter()
        .filter_map(|l| l.strip_prefix("-A "))
        .filter(|l| !builtin.contains(&l.split(' ').next().unwrap_or("")))
        .count();
    assert_eq!(kpx, rules.filter + rules.nat);
    assert!(b.check_canary());

    // A second full sync finds every per-service chain as rendered: one restore, of the
    // top-level chains only, and nothing changes.
    b.apply(&st, &changes(true, &[])).unwrap();
    assert!(b.stats().last_sync_full && b.stats().last_restores == 1);
    assert_eq!(b.stats().last_unchanged_chains, 3 * n);
    assert_eq!(save(), first);
    // With the comparison off, it rewrites everything in place, split as the first one.
    let mut cfg = b.config().clone();
    cfg.skip_unchanged_chains = false;
    let mut rewrite = IptablesBackend::new(cfg.clone());
    rewrite.apply(&st, &changes(true, &[])).unwrap();
    assert!(rewrite.stats().last_sync_full && rewrite.stats().last_restores == restores);
    assert_eq!(save(), first);

    // A restarted agent (comparison off), with one service gone meanwhile: still split, and
    // the gone service's chains are deleted.
    let mut restarted = IptablesBackend::new(cfg);
    let st2 = state(&services[1..], &eps[2..]);
    restarted.apply(&st2, &changes(true, &[])).unwrap();
    assert!(restarted.stats().last_restores > 2);
    let text = save().join("\n");
    assert!(!text.contains("\"ns/s0:p"), "{text}");
    assert_eq!(chains_like(&text, "KUBE-SVC-").len(), n - 1);
    assert_eq!(chains_like(&text, "KUBE-SEP-").len(), 2 * (n - 1));
}

/// The per-service chains a restore input declares or appends to.
fn service_chains_written(input: &str) -> BTreeSet<String> {
    let prefixes = ["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-"];
    input
        .lines()
        .filter_map(|l| l.strip_prefix(':').or_else(|| l.strip_prefix("-A ")))
        .filter_map(|l| l.split(' ').next())
        .filter(|c| prefixes.iter().any(|p| c.starts_with(p)))
        .map(String::from)
        .collect()
}

/// A full resync over the loaded ruleset rewrites only the per-service chains that differ
/// from what kpx would write: none when nothing drifted (iptables-save's canonical forms of
/// `--probability`, `-m recent` and comments included), else exactly the drifted ones; the
/// kernel ends up as after a full rewrite, and later partial syncs still work.
fn resync_rewrites_only_drifted_chains(variant: &str, chunk_rules: usize) {
    let test = format!("iptables_{variant}_resync_rewrites_only_drifted_chains_{chunk_rules}");
    let restore = format!("iptables-{variant}-restore");
    let Some(ns) = netns_or_skip(&test, variant, &[&restore]) else { return };
    let ipt = format!("iptables-{variant}");
    let save = || {
        ["filter", "nat"]
            .map(|t| ns.run(&[&format!("iptables-{variant}-save"), "-t", t]))
            .concat()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let mut web = svc("web", WEB, pb::Protocol::Tcp, 80);
    web.session_affinity_timeout_seconds = 10800;
    let mut np = svc("np", "172.30.0.42", pb::Protocol::Tcp, 8080);
    np.r#type = pb::ServiceType::NodePort as i32;
    np.ports[0].node_port = 30080;
    np.external_ips = vec!["192.168.99.11".into()];
    let mut services = vec![web, svc("dns", DNS, pb::Protocol::Udp, 53), np];
    services.extend((0..20).map(|i| svc(&format!("s{i}"), &format!("172.30.1.{}", i + 1), pb::Protocol::Tcp, 80)));
    let mut eps = vec![
        ep("web", "10.180.0.1", 8080),
        ep("web", "10.180.0.2", 8080),
        ep("web", "10.180.0.3", 8080),
        ep("dns", "10.180.0.5", 5353),
        ep("np", "10.180.0.6", 80),
        ep("np", "10.180.0.7", 80),
    ];
    for i in 0..20 {
        eps.extend((1..=7).map(|j| ep(&format!("s{i}"), &format!("10.181.{i}.{j}"), 8080)));
    }
    let st = state(&services, &eps);
    let mut b = backend(&ns, variant);
    let mut cfg = b.config().clone();
    cfg.full_sync_chunk_rules = chunk_rules;
    b = IptablesBackend::new(cfg.clone());
    b.apply(&st, &changes(true, &[])).unwrap();
    let loaded = save();
    let rules = b.stats().rules;
    let text = loaded.join("\n");
    let all_chains = ["KUBE-SVC-", "KUBE-EXT-", "KUBE-SEP-"].iter().map(|p| chains_like(&text, p).len()).sum::<usize>();
    assert_eq!(service_chains_written(&b.last_restore_input()).len(), all_chains);

    // Nothing drifted: every per-service chain is found as rendered and left alone.
    b.apply(&st, &changes(true, &[])).unwrap();
    assert!(b.stats().last_sync_full);
    assert_eq!(b.stats().last_unchanged_chains, all_chains, "{variant}: every chain matches");
    let input = b.last_restore_input();
    assert!(service_chains_written(&input).is_empty(), "{input}");
    assert_eq!(b.stats().last_restores, 1, "nothing to split");
    assert!(input.contains(":KUBE-SERVICES - [0:0]"), "the top-level chains are rewritten");
    assert_eq!(b.stats().rules, rules);
    assert_eq!(save(), loaded);

    // Drift by hand: the web service's SVC chain flushed, one rule of an s3 SEP chain
    // deleted, an s7 SEP chain's DNAT replaced, a stale chain left by someone.
    let target = |ip: &str| -> String {
        let l = lines_of(&text, "KUBE-SERVICES").into_iter().find(|l| l.contains(&format!("-d {ip}/32"))).unwrap();
        l.rsplit(' ').next().unwrap().to_string()
    };
    let first_sep = |svc_chain: &str| -> String {
        lines_of(&text, svc_chain)
            .iter()
            .find_map(|l| l.split(" -j ").nth(1).filter(|t| t.starts_with("KUBE-SEP-")))
            .unwrap()
            .to_string()
    };
    let web_svc = target(WEB);
    let (s3_sep, s7_sep) = (first_sep(&target("172.30.1.4")), first_sep(&target("172.30.1.8")));
    ns.run(&[&ipt, "-t", "nat", "-F", &web_svc]);
    ns.run(&[&ipt, "-t", "nat", "-D", &s3_sep, "1"]);
    ns.run(&[&ipt, "-t", "nat", "-R", &s7_sep, "2", "-p", "tcp", "-j", "DNAT", "--to-destination", "10.99.99.99:1"]);
    ns.run(&[&ipt, "-t", "nat", "-N", "KUBE-SEP-STALESTALESTALE"]);
    ns.run(&[&ipt, "-t", "nat", "-A", "KUBE-SEP-STALESTALESTALE", "-j", "RETURN"]);
    assert_ne!(save(), loaded);
    b.apply(&st, &changes(true, &[])).unwrap();
    let input = b.last_restore_input();
    assert_eq!(
        service_chains_written(&input),
        [web_svc.clone(), s3_sep.clone(), s7_sep.clone(), "KUBE-SEP-STALESTALESTALE".into()].into(),
        "{input}"
    );
    assert_eq!(b.stats().last_unchanged_chains, all_chains - 3);
    assert!(input.contains("-X KUBE-SEP-STALESTALESTALE"), "{input}");
    let written = b.stats().last_rules_written;
    eprintln!(
        "{variant}: resync after drift wrote {written} rule lines in {} restores, {} chains unchanged (of {all_chains}), took {:?}",
        b.stats().last_restores,
        b.stats().last_unchanged_chains,
        b.stats().last_sync_duration
    );
    assert_eq!(save(), loaded, "{variant}: the kernel is as after the first full sync");
    assert_eq!(b.stats().rules, rules);

    // The bookkeeping is that of a full rewrite: an endpoint change is a partial sync that
    // deletes the right SEP chain and leaves the kernel as a fresh agent would write it.
    eps.retain(|e| e.ip != "10.180.0.2");
    let st2 = state(&services, &eps);
    b.apply(&st2, &changes(false, &["ns/web"])).unwrap();
    assert!(!b.stats().last_sync_full);
    let after_partial = save();
    let mut fresh = IptablesBackend::new(cfg.clone());
    let mut off = cfg;
    off.skip_unchanged_chains = false;
    let mut rewrite = IptablesBackend::new(off);
    rewrite.apply(&st2, &changes(true, &[])).unwrap();
    assert_eq!(rewrite.stats().last_unchanged_chains, 0);
    assert_eq!(save(), after_partial, "{variant}: a full rewrite finds the partial sync's result");
    assert_eq!(rewrite.stats().rules, b.stats().rules);
    fresh.apply(&st2, &changes(true, &[])).unwrap();
    assert_eq!(fresh.stats().last_unchanged_chains, all_chains - 1, "one SEP chain fewer, all found");
    assert_eq!(fresh.stats().rules, b.stats().rules);
}

#[test]
fn iptables_nft_resync_rewrites_only_drifted_chains() {
    resync_rewrites_only_drifted_chains("nft", 5000);
}

#[test]
fn iptables_nft_split_resync_rewrites_only_drifted_chains() {
    resync_rewrites_only_drifted_chains("nft", 40);
}

#[test]
fn iptables_legacy_resync_rewrites_only_drifted_chains() {
    resync_rewrites_only_drifted_chains("legacy", 5000);
}

/// The periodic resync read outside the agent's lock (`apply/resync.rs`): over tables read
/// after someone's drift it repairs the drift; a read made before an update is dropped and the
/// update stays; after three stale reads the agent's locked path does it. And an update due
/// with a resync is not turned into it.
fn periodic_resync_read_outside_the_lock(variant: &str) {
    let test = format!("iptables_{variant}_periodic_resync_read_outside_the_lock");
    let restore = format!("iptables-{variant}-restore");
    let Some(ns) = netns_or_skip(&test, variant, &[&restore]) else { return };
    let ipt = format!("iptables-{variant}");
    let save = || ns.run(&[&format!("iptables-{variant}-save"), "-t", "nat"]);
    let rules = |text: &str| text.lines().filter(|l| l.starts_with("-A ")).map(String::from).collect::<Vec<_>>();
    let services = [svc("web", WEB, pb::Protocol::Tcp, 80), svc("dns", DNS, pb::Protocol::Udp, 53)];
    let mut eps = vec![ep("web", "10.180.0.1", 8080), ep("web", "10.180.0.2", 8080), ep("dns", "10.180.0.5", 5353)];
    let st = state(&services, &eps);
    let mut cfg = backend(&ns, variant).config().clone();
    // Always due, so that no test waits for a period.
    cfg.full_resync_period = std::time::Duration::ZERO;
    let mut b = IptablesBackend::new(cfg);
    b.apply(&st, &changes(true, &[])).unwrap();
    let loaded = rules(&save());

    // Drift, then a resync read after it: repaired, as a periodic full sync.
    let web_chain = lines_of(&save(), "KUBE-SERVICES")
        .into_iter()
        .find(|l| l.contains(&format!("-d {WEB}/32")))
        .and_then(|l| l.rsplit(' ').next().map(String::from))
        .unwrap();
    ns.run(&[&ipt, "-t", "nat", "-F", &web_chain]);
    assert_ne!(rules(&save()), loaded);
    let fulls = b.stats().full_syncs;
    let job = b.resync_job().expect("a resync is due");
    let prepared = job.prepare().expect("the tables read");
    assert_eq!(b.finish_resync(&st, prepared), Ok(true));
    assert_eq!(b.stats().full_syncs, fulls + 1);
    assert_eq!(b.stats().last_full_reason, Some(kpx_dataplane::backend::iptables::apply::FullReason::Periodic));
    assert_eq!(rules(&save()), loaded, "{variant}: the resync did not repair the flushed chain");

    // An update while the tables are read: it stays a partial sync, and the read is dropped.
    let job = b.resync_job().expect("due again");
    let prepared = job.prepare().expect("the tables read");
    eps.retain(|e| e.ip != "10.180.0.2");
    let st2 = state(&services, &eps);
    b.apply(&st2, &changes(false, &["ns/web"])).unwrap();
    assert!(!b.stats().last_sync_full, "{variant}: the update was turned into the periodic resync");
    let updated = rules(&save());
    assert_ne!(updated, loaded);
    assert_eq!(b.finish_resync(&st2, prepared), Ok(false), "a resync read before an update went in");
    assert_eq!(rules(&save()), updated, "{variant}: the stale resync undid the update");
    for _ in 0..2 {
        let prepared = b.resync_job().expect("still due").prepare().expect("the tables read");
        b.apply(&st2, &changes(false, &[])).unwrap();
        assert_eq!(b.finish_resync(&st2, prepared), Ok(false));
    }
    assert_eq!(b.stale_resyncs(), 3);
    assert!(b.resync_job().is_none(), "a fourth try outside the lock");
    b.sync_due(&st2).unwrap();
    assert!(b.stats().last_sync_full);
    assert_eq!(b.stale_resyncs(), 0, "a full sync did not give the next resync its try outside the lock");
    assert_eq!(rules(&save()), updated);
}

#[test]
fn iptables_nft_periodic_resync_read_outside_the_lock() {
    periodic_resync_read_outside_the_lock("nft");
}

#[test]
fn iptables_legacy_periodic_resync_read_outside_the_lock() {
    periodic_resync_read_outside_the_lock("legacy");
}
