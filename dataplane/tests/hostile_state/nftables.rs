//! Part 3 of the test: the hostile states through the nftables backend, in namespaces that also
//! hold nftables tables kpx does not own. Every transaction kpx sends must be accepted whole and
//! read back by the real `nft`; a delta must leave what a restarted agent adopts without
//! writing anything; a transaction the kernel refuses changes nothing (the generation moves
//! only for the retry that is accepted; with no retry accepted the update is refused and the
//! table is as it was); and nothing outside `ip kube-proxy` / `ip6 kube-proxy` changes.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kpx_dataplane::backend::iptables::render::{IpFamily, RenderConfig};
use kpx_dataplane::backend::nftables::desired::desired_objects;
use kpx_dataplane::backend::nftables::endpoints::Slots;
use kpx_dataplane::backend::nftables::names::PortNames;
use kpx_dataplane::backend::nftables::{NftBackend, NftConfig};
use kpx_dataplane::state::{AppliedState, ChangeSet};
use kpx_dataplane::stream::Apply;
use kpx_nft_netlink::NftClient;
use serde_json::Value;

use crate::netns::{self, NetNs};
use crate::random::{Case, FAMS, random_cfg};

/// Root, namespaces and the nft tool; a loud skip without them, a failure under CI=true.
pub(crate) fn ready(test: &str) -> bool {
    if !netns::require_root_and_netns() {
        return false;
    }
    if Command::new("nft").arg("--version").stdin(Stdio::null()).output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: CI=true and the nft tool (Debian package nftables) is missing");
    }
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test}: nft missing ***\n");
    false
}

/// Tables that are not kpx's: one with kpx's name in another family, one with a name kpx's
/// starts, one hooked where kpx's nat chains hook.
const FOREIGN: &str = "\
table inet kube-proxy {
    chain c {
    }
}
table ip kube-proxy-old {
    set s {
        type ipv4_addr
        elements = { 192.0.2.1 }
    }
    chain c {
        ip saddr @s counter
    }
}
table ip6 foreign6 {
    chain out {
        type nat hook output priority -100; policy accept;
        counter
    }
}
";

/// A namespace holding the foreign tables.
pub(crate) fn namespace(role: &str) -> NetNs {
    let ns = NetNs::new(role);
    let mut nft = ns.command(&["nft", "-f", "-"]);
    nft.stdin(Stdio::piped());
    let mut child = nft.spawn().expect("nft -f -");
    child.stdin.take().expect("stdin").write_all(FOREIGN.as_bytes()).expect("write the foreign tables");
    assert!(child.wait().expect("nft -f").success(), "loading the foreign tables");
    ns
}

fn is_kpx_table(family: &str, table: &str) -> bool {
    table == "kube-proxy" && (family == "ip" || family == "ip6")
}

/// Everything in the ruleset outside kpx's two tables, as `nft -j list ruleset` lists it.
pub(crate) fn foreign(ns: &NetNs) -> Vec<Value> {
    let v: Value = serde_json::from_str(&ns.run(&["nft", "-j", "list", "ruleset"])).expect("nft -j is JSON");
    let objects = v["nftables"].as_array().cloned().unwrap_or_default();
    objects
        .into_iter()
        .filter(|o| {
            let Some((kind, body)) = o.as_object().and_then(|m| m.iter().next()) else { return false };
            let (family, table) = (body["family"].as_str().unwrap_or(""), body["table"].as_str());
            kind != "metainfo" && !is_kpx_table(family, table.or(body["name"].as_str()).unwrap_or(""))
        })
        .collect()
}

fn family_word(f: IpFamily) -> &'static str {
    match f {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

/// `nft -j list table FAMILY kube-proxy`: the real nft reads back everything kpx wrote.
fn nft_json(ns: &NetNs, family: IpFamily) -> Result<Value, String> {
    let out = ns.exec(&["nft", "-j", "list", "table", family_word(family), "kube-proxy"]);
    if !out.status.success() {
        return Err(format!("nft list table: {}", String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("nft -j output: {e}"))
}

pub(crate) fn backend(ns: &NetNs, r: &RenderConfig) -> NftBackend {
    let mut cfg = NftConfig::new(r.family, &r.node_name);
    cfg.cluster_cidr = r.cluster_cidr.clone();
    cfg.masquerade_all = r.masquerade_all;
    cfg.node_ips = r.node_ips.clone();
    cfg.netns = Some(ns.name().to_string());
    NftBackend::new(cfg).expect("nf_tables in the namespace")
}

pub(crate) fn full() -> ChangeSet {
    ChangeSet { full: true, services: BTreeSet::new() }
}

/// The first value found under `key` anywhere in `v`.
fn find<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) => m.get(key).or_else(|| m.values().find_map(|x| find(x, key))),
        Value::Array(a) => a.iter().find_map(|x| find(x, key)),
        _ => None,
    }
}

/// The endpoints (`address . port`) the service chain of ns/web (port http) DNATs to, read
/// from nft's listing: the chain's numgen offset and map, the map's ranges from that offset.
pub(crate) fn web_endpoints(v: &Value) -> Result<BTreeSet<String>, String> {
    let chain = PortNames::new("ns", "web", "tcp", "http").service;
    let objects = v["nftables"].as_array().ok_or("no objects")?;
    let rule = objects
        .iter()
        .filter_map(|o| o.get("rule"))
        .find(|r| r["chain"] == chain.as_str() && find(r, "numgen").is_some())
        .ok_or_else(|| format!("{chain} has no numgen rule"))?;
    let offset = find(rule, "numgen").and_then(|n| n["offset"].as_u64()).unwrap_or(0);
    let map = find(rule, "data").and_then(Value::as_str).and_then(|d| d.strip_prefix('@')).ok_or("no map")?;
    let elems = objects
        .iter()
        .filter_map(|o| o.get("map"))
        .find(|m| m["name"] == map)
        .and_then(|m| m["elem"].as_array())
        .ok_or_else(|| format!("map {map} has no elements"))?;
    let mut out = BTreeSet::new();
    for e in elems {
        let lo = e[0]["range"][0].as_u64().ok_or("an element that is not a range")?;
        if (offset..offset + 65535).contains(&lo) {
            let parts = e[1]["concat"].as_array().ok_or("a value that is not address . port")?;
            out.insert(format!("{} . {}", parts[0].as_str().unwrap_or("?"), parts[1]));
        }
    }
    Ok(out)
}

fn want(family: IpFamily, v4: &[&str], v6: &[&str]) -> BTreeSet<String> {
    let ips = if family == IpFamily::V4 { v4 } else { v6 };
    ips.iter().map(|ip| format!("{ip} . 8080")).collect()
}

/// Part 1 through nftables: the deterministic hostile state, resynced, then the hostile delta.
pub(crate) fn hostile_state_through_nftables(
    state: &AppliedState,
    after: &AppliedState,
    changes: &ChangeSet,
    unrenderable: &[String],
    render_cfg: fn(IpFamily) -> RenderConfig,
) {
    let ns = namespace("hostilenft");
    let before = foreign(&ns);
    for family in FAMS {
        let ctx = format!("nftables {family:?}");
        let r = render_cfg(family);
        let (objects, skipped) = desired_objects(&r, state, &mut Slots::default());
        let text = objects.text(family);
        for k in unrenderable {
            let name: String = k.chars().filter(|c| !c.is_control() && !"\"\\'".contains(*c)).collect();
            assert!(skipped.iter().any(|s| s.starts_with(&name)), "{ctx}: {k:?} renders nothing and no skip says why");
            assert!(!text.contains(&format!("/{}", k.split('/').nth(1).unwrap_or(k))), "{ctx}: {k:?} was rendered");
        }
        let mut b = backend(&ns, &r);
        let started = Instant::now();
        b.apply(state, &full()).unwrap_or_else(|e| panic!("{ctx}: full sync of the hostile state: {e}"));
        assert_eq!(b.stats().failures, 0, "{ctx}: {:?}", b.stats().last_error);
        let v = nft_json(&ns, family).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let web = web_endpoints(&v).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(web, want(family, &["10.180.0.1", "10.180.0.2"], &["fd00:10::1", "fd00:10::2"]), "{ctx}");
        eprintln!("{ctx}: full sync of {} services in {:?}", state.services().len(), started.elapsed());

        // A resync finds the table exactly as it would write it.
        b.apply(state, &full()).unwrap();
        assert_eq!(
            (b.stats().failures, b.stats().last_ops),
            (0, 0),
            "{ctx}: the resync wrote {:?}",
            b.stats().last_plan
        );

        // The hostile delta, as one partial transaction.
        b.apply(after, changes).unwrap_or_else(|e| panic!("{ctx}: partial sync: {e}"));
        assert_eq!(b.stats().failures, 0, "{ctx}: partial sync refused: {:?}", b.stats().last_error);
        assert!(!b.stats().last_sync_full, "{ctx}: the delta was not a partial sync");
        let v = nft_json(&ns, family).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let web = web_endpoints(&v).unwrap_or_else(|e| panic!("{ctx}: after the delta: {e}"));
        assert_eq!(web, want(family, &["10.180.0.2", "10.180.0.3"], &["fd00:10::2", "fd00:10::3"]), "{ctx}");

        // ... leaving what a restarted agent, syncing the same state in full, adopts as is.
        let mut fresh = backend(&ns, &r);
        fresh.apply(after, &full()).unwrap();
        assert_eq!(fresh.stats().last_ops, 0, "{ctx}: a restarted agent rewrote {:?}", fresh.stats().last_plan);
    }
    assert_eq!(foreign(&ns), before, "tables that are not kpx's changed");
}

/// Part 2 through nftables, one family: every case's snapshot, then its delta as a partial
/// transaction, accepted whole; what the delta leaves, a restarted agent adopts without writing.
pub(crate) fn nft_cases(family: IpFamily, cases: &[Case]) -> Vec<String> {
    let ns = namespace("randomnft");
    let before = foreign(&ns);
    let mut failures = Vec::new();
    for c in cases {
        let _ = ns.exec(&["nft", "delete", "table", family_word(family), "kube-proxy"]);
        let r = random_cfg(family, c.index);
        let steps = || -> Result<(), String> {
            let mut b = backend(&ns, &r);
            b.apply(&c.before, &full()).map_err(|e| format!("the snapshot: {e}"))?;
            if c.index % 10 == 0 {
                nft_json(&ns, family)?;
            }
            b.apply(&c.after, &c.changes).map_err(|e| format!("the delta: {e}"))?;
            if b.stats().failures > 0 {
                return Err(format!("a transaction was refused: {:?}", b.stats().last_error));
            }
            let mut fresh = backend(&ns, &r);
            fresh.apply(&c.after, &full()).map_err(|e| format!("a restarted agent: {e}"))?;
            match fresh.stats().last_ops {
                0 => Ok(()),
                _ => Err(format!("a restarted agent rewrote {}", fresh.stats().last_plan.describe())),
            }
        };
        if let Err(e) = steps() {
            failures.push(format!("{}: nftables {family:?}: {e}", c.id));
        }
    }
    if foreign(&ns) != before {
        failures.push(format!("nftables {family:?}: tables that are not kpx's changed"));
    }
    failures
}

/// The generation of the namespace's ruleset (every committed transaction moves it by one).
fn generation(ns: &NetNs) -> u32 {
    NftClient::in_netns(ns.name()).and_then(|mut c| c.gen_id()).expect("the generation")
}

/// A delta the kernel refuses in the middle of its transaction (its last operations delete a
/// hairpin pair someone else already deleted): nothing of it is applied (the generation moves
/// once, for the full sync the backend retries with), and the retry leaves the table whole.
pub(crate) fn refused_delta_is_retried_whole(
    state: &AppliedState,
    after: &AppliedState,
    changes: &ChangeSet,
    gone: &str,
) {
    let ns = namespace("refusednft");
    let before = foreign(&ns);
    let r = crate::model::render_cfg(IpFamily::V4);
    let mut b = backend(&ns, &r);
    b.apply(state, &full()).expect("the snapshot");
    ns.run(&["nft", "delete", "element", "ip", "kube-proxy", "hairpin-endpoints", &format!("{{ {gone} . {gone} }}")]);
    let g = generation(&ns);
    b.apply(after, changes).expect("the delta, retried as a full sync");
    assert_eq!(b.stats().failures, 1, "the partial transaction was not refused: {:?}", b.stats().last_plan);
    assert!(b.stats().last_sync_full, "the retry was not a full sync");
    assert_eq!(
        generation(&ns),
        g.wrapping_add(1),
        "more than the retry was committed: the refused transaction left something"
    );
    let web = web_endpoints(&nft_json(&ns, IpFamily::V4).unwrap()).unwrap();
    assert_eq!(web, want(IpFamily::V4, &["10.180.0.2", "10.180.0.3"], &[]));
    let mut fresh = backend(&ns, &r);
    fresh.apply(after, &full()).unwrap();
    assert_eq!(fresh.stats().last_ops, 0, "the retry left {:?} to do", fresh.stats().last_plan);
    assert_eq!(foreign(&ns), before, "tables that are not kpx's changed");
}

/// Another process owns `ip kube-proxy` (nft's `flags owner`: only its socket may change the
/// table): the IPv4 update is refused as a whole, twice (partial, then the full retry), and
/// NACKed; the table stays as its owner made it, the IPv6 table is programmed, nothing else
/// changes. Once the owner is gone, the next update goes in.
pub(crate) fn foreign_owner_refuses_everything(state: &AppliedState) {
    let ns = namespace("ownednft");
    let before = foreign(&ns);
    let mut owner = ns.command(&["nft", "-i"]);
    owner.stdin(Stdio::piped()).stdout(Stdio::null());
    let mut owner = ns.spawn_command(owner);
    let mut stdin = owner.child_mut().stdin.take().expect("nft -i stdin");
    writeln!(stdin, "add table ip kube-proxy {{ flags owner ; }}").expect("to nft -i");
    let listed = || ns.run(&["nft", "list", "table", "ip", "kube-proxy"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ns.exec(&["nft", "list", "table", "ip", "kube-proxy"]).stdout.is_empty() {
        assert!(Instant::now() < deadline, "nft -i did not create the owned table");
        std::thread::sleep(Duration::from_millis(20));
    }
    let owned = listed();
    let (mut v4, mut v6) =
        (backend(&ns, &crate::model::render_cfg(IpFamily::V4)), backend(&ns, &crate::model::render_cfg(IpFamily::V6)));
    let err = v4.apply(state, &full()).expect_err("an update into a table another process owns");
    assert!(err.contains("not permitted"), "{err}");
    assert_eq!(v4.stats().failures, 2, "the full retry was not tried");
    assert_eq!(listed(), owned, "the owned table changed");
    v6.apply(state, &full()).expect("the IPv6 table is kpx's");
    assert_eq!(
        web_endpoints(&nft_json(&ns, IpFamily::V6).unwrap()).unwrap(),
        want(IpFamily::V6, &[], &["fd00:10::1", "fd00:10::2"])
    );
    assert_eq!(foreign(&ns), before, "tables that are not kpx's changed");
    drop(stdin);
    owner.terminate(Duration::from_secs(2));
    v4.apply(state, &full()).expect("the owner is gone");
    assert_eq!(
        web_endpoints(&nft_json(&ns, IpFamily::V4).unwrap()).unwrap(),
        want(IpFamily::V4, &["10.180.0.1", "10.180.0.2"], &[])
    );
}

/// The periodic resync prepared outside the agent's lock (`apply/resync.rs`): committed when
/// nothing changed the table meanwhile; dropped, leaving the table as the update or the other
/// process made it, when something did; after three stale tries left to the locked path. And
/// an update due at the same time is not turned into the resync.
pub(crate) fn resync_prepared_outside_the_lock(state: &AppliedState, after: &AppliedState, changes: &ChangeSet) {
    let ns = namespace("resyncnft");
    let r = crate::model::render_cfg(IpFamily::V4);
    let mut cfg = NftConfig::new(r.family, &r.node_name);
    (cfg.cluster_cidr, cfg.masquerade_all, cfg.node_ips) =
        (r.cluster_cidr.clone(), r.masquerade_all, r.node_ips.clone());
    cfg.netns = Some(ns.name().to_string());
    let period = Duration::from_millis(800);
    cfg.full_resync_period = period;
    let mut b = NftBackend::new(cfg).expect("nf_tables in the namespace");
    b.apply(state, &full()).expect("the snapshot");
    assert!(b.resync_job().is_none(), "a resync before its period");
    let listed = || ns.run(&["nft", "list", "table", "ip", "kube-proxy"]);
    let table = listed();

    // Due, nothing happens meanwhile: committed (an empty transaction: the table is right).
    std::thread::sleep(period);
    let g = generation(&ns);
    let (fulls, repairs) = (b.stats().full_syncs, b.stats().repairs);
    let job = b.resync_job().expect("a resync job once due");
    let prepared = job.prepare(state).expect("prepared");
    assert!(
        b.finish_resync(state, prepared).expect("finished").committed(),
        "a resync over an unchanged table was dropped"
    );
    assert_eq!(b.stats().full_syncs, fulls + 1, "the resync was not counted");
    assert_eq!((b.stats().repairs, b.stats().last_ops), (repairs, 0), "{:?}", b.stats().last_plan);
    assert_eq!((generation(&ns), listed()), (g, table.clone()), "a resync of a right table changed it");
    assert!(b.resync_job().is_none(), "the resync did not restart the period");

    // Due again, and an update comes while the resync is prepared: the update is a delta, not
    // the resync, and the prepared resync is dropped.
    std::thread::sleep(period);
    let job = b.resync_job().expect("due again");
    let prepared = job.prepare(state).expect("prepared");
    b.apply(after, changes).expect("the update");
    assert!(!b.stats().last_sync_full, "the update was turned into the periodic resync");
    assert!(!b.finish_resync(after, prepared).unwrap().committed(), "a resync prepared before an update was committed");
    assert_eq!(b.stale_resyncs(), 1);
    let web = web_endpoints(&nft_json(&ns, IpFamily::V4).unwrap()).unwrap();
    assert_eq!(web, want(IpFamily::V4, &["10.180.0.2", "10.180.0.3"], &[]), "the stale resync undid the update");

    // Someone else commits while it is prepared: dropped too.
    let job = b.resync_job().expect("still due");
    let prepared = job.prepare(after).expect("prepared");
    ns.run(&["nft", "add", "table", "ip", "resync-other"]);
    assert!(
        !b.finish_resync(after, prepared).unwrap().committed(),
        "a resync prepared before a foreign commit was committed"
    );
    let job = b.resync_job().expect("still due");
    let prepared = job.prepare(after).expect("prepared");
    b.apply(after, &ChangeSet::default()).expect("an empty update");
    assert!(!b.finish_resync(after, prepared).unwrap().committed(), "a resync prepared before an update was committed");
    assert_eq!(b.stale_resyncs(), 3);
    // Three stale tries: the housekeeping does it under its lock.
    assert!(b.resync_job().is_none(), "a fourth try outside the lock");
    assert!(b.wants_full_sync());
    b.sync_due(after).expect("the locked resync");
    assert!(b.stats().last_sync_full);
    assert_eq!(b.stale_resyncs(), 0, "a full sync did not give the next resync its try outside the lock");
    assert!(b.resync_job().is_none(), "the locked resync did not restart the period");
    assert_eq!(web_endpoints(&nft_json(&ns, IpFamily::V4).unwrap()).unwrap(), web);

    // A table that differs from what kpx wants while the generation is the one kpx knows (here
    // a second backend sharing it writes the old state; in life, a bookkeeping slip): the
    // prepared transaction is not empty, and the backend's socket commits what the job's
    // socket numbered.
    let mut other = backend(&ns, &r);
    other.share_generation(&b);
    other.apply(state, &full()).expect("the old state written by another backend");
    assert_ne!(web_endpoints(&nft_json(&ns, IpFamily::V4).unwrap()).unwrap(), web);
    std::thread::sleep(period);
    let repairs = b.stats().repairs;
    let prepared = b.resync_job().expect("due").prepare(after).expect("prepared");
    assert!(b.finish_resync(after, prepared).unwrap().committed(), "the repairing resync was dropped");
    assert!(b.stats().last_ops > 0, "nothing to repair: {:?}", b.stats().last_plan);
    assert_eq!(b.stats().repairs, repairs + 1);
    assert_eq!(web_endpoints(&nft_json(&ns, IpFamily::V4).unwrap()).unwrap(), web, "the resync did not repair");
    let mut fresh = backend(&ns, &r);
    fresh.apply(after, &full()).unwrap();
    assert_eq!(fresh.stats().last_ops, 0, "the repair left {:?} to do", fresh.stats().last_plan);
}
