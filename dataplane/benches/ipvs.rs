//! ipvs backend benchmark. On the host: the pure part (desired table, whole-table plan, the
//! incremental update of one service, ipset members) for a large cluster. Then, inside
//! user-mode Linux (a real IPVS): a full apply through `IpvsBackend`, a one-endpoint change, a
//! one-service add and remove and a reconcile (time and netlink messages), the same table sent
//! by a bare `IpvsClient`, and `ipvsadm -C` + `ipvsadm-restore` of that table in the same run,
//! with ratios. Prints figures and PASS/MISS against the targets; asserts nothing.
//!
//! `cargo bench -p kpx-dataplane --bench ipvs -- [--services 10000] [--endpoints-per-service 10]
//! [--rounds 5] [--no-kernel]`
//!
//! Without `--bench` (that is, under `cargo test --all-targets`) it runs a tiny smoke
//! configuration of the pure part only, with no UML.
//!
//! The bench binary re-runs itself inside UML (the host's filesystem is UML's root) with
//! `KPX_IPVS_BENCH_INSIDE=1`; inside, it changes only UML's own kernel.

#[path = "../tests/uml/mod.rs"]
mod uml;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kpx_dataplane::backend::ipvs::companion;
use kpx_dataplane::backend::ipvs::plan::{self, Op, PlanConfig, Table};
use kpx_dataplane::backend::ipvs::{IpvsBackend, IpvsConfig};
use kpx_dataplane::state::{AppliedState, ChangeSet};
use kpx_dataplane::stream::Apply;
use kpx_ipvs_netlink::{Family, IpvsClient};
use kpx_proto::v1 as pb;
use kpx_proto::version::{self, ContentHash};

const INSIDE: &str = "KPX_IPVS_BENCH_INSIDE";
const NODE_IP: &str = "192.168.0.10";
/// Targets (printed, never asserted): a one-endpoint change is one netlink message and costs
/// well under a millisecond of planning on a 10k-service node; a full apply through the backend
/// is no slower than `ipvsadm-restore` of the bare table.
const TARGET_ONE_ENDPOINT_PLAN: Duration = Duration::from_millis(1);
const TARGET_FULL_RATIO: f64 = 1.0;

#[derive(Debug, Clone)]
struct Args {
    services: usize,
    endpoints_per_service: usize,
    rounds: usize,
    kernel: bool,
    /// Only this kernel part (backend, bare or restore).
    only: Option<String>,
    smoke: bool,
}

fn parse_args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !argv.iter().any(|a| a == "--bench");
    let mut a = Args {
        services: if smoke { 20 } else { 10_000 },
        endpoints_per_service: if smoke { 3 } else { 10 },
        rounds: if smoke { 2 } else { 5 },
        kernel: !smoke,
        only: None,
        smoke,
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> String { it.next().unwrap_or_else(|| panic!("{name} needs a value")).clone() };
        match flag.as_str() {
            "--services" => a.services = value(flag).parse().expect("--services S"),
            "--endpoints-per-service" => {
                a.endpoints_per_service = value(flag).parse().expect("--endpoints-per-service E")
            }
            "--rounds" => a.rounds = value(flag).parse().expect("--rounds R"),
            "--no-kernel" => a.kernel = false,
            "--only" => a.only = Some(value(flag)),
            // cargo's own flags (--bench, filters) are ignored.
            _ => {}
        }
    }
    a
}

/// Service `i`: one TCP port on a ClusterIP from 172.16.0.0/12.
fn service(i: usize) -> pb::Service {
    pb::Service {
        namespace: format!("ns-{}", i % 50),
        name: format!("svc-{i}"),
        cluster_ips: vec![Ipv4Addr::from(0xac10_0000 + i as u32).to_string()],
        ports: vec![pb::ServicePort {
            name: "http".into(),
            protocol: pb::Protocol::Tcp as i32,
            port: 80,
            node_port: 0,
        }],
        ..Default::default()
    }
}

fn service_key(i: usize) -> String {
    format!("ns-{}/svc-{i}", i % 50)
}

/// Endpoint number `n` (pod IPs from 10.0.0.0/8) of service `i`.
fn endpoint(i: usize, n: u32) -> pb::Endpoint {
    pb::Endpoint {
        service: service_key(i),
        ip: Ipv4Addr::from(0x0a00_0000 + n).to_string(),
        ports: vec![pb::EndpointPort { name: "http".into(), port: 8080 }],
        for_cluster: true,
        for_local: false,
        node_tag: 0,
    }
}

fn endpoints_of(i: usize, per: usize) -> Vec<pb::Endpoint> {
    (0..per).map(|e| endpoint(i, (i * per + e) as u32 + 1)).collect()
}

fn cluster(a: &Args) -> AppliedState {
    let services: Vec<pb::Service> = (0..a.services).map(service).collect();
    let endpoints: Vec<pb::Endpoint> = (0..a.services).flat_map(|i| endpoints_of(i, a.endpoints_per_service)).collect();
    let mut h = ContentHash::EMPTY;
    services.iter().for_each(|s| h.add(version::service_hash(s)));
    endpoints.iter().for_each(|e| h.add(version::endpoint_hash(e)));
    let u = pb::Update {
        version: h.to_version(),
        full: true,
        services_upserted: services,
        endpoints_upserted: endpoints,
        ..Default::default()
    };
    let mut st = AppliedState::default();
    st.apply(&u).expect("snapshot");
    st
}

/// A delta on `st` as the controlplane sends it (versions and all); returns its change set.
fn delta(st: &mut AppliedState, upsert: Vec<pb::Service>, eps: Vec<pb::Endpoint>, remove: &[usize]) -> ChangeSet {
    let base = st.version().expect("a confirmed state");
    let mut h = base;
    let mut services_removed = Vec::new();
    for i in remove {
        let entry = &st.services()[&service_key(*i)];
        h.remove(version::service_hash(&entry.service));
        entry.endpoints.values().for_each(|e| h.remove(version::endpoint_hash(e)));
        let s = service(*i);
        services_removed.push(pb::ServiceRef { namespace: s.namespace, name: s.name });
    }
    for s in &upsert {
        if let Some(old) = st.services().get(&format!("{}/{}", s.namespace, s.name)) {
            h.remove(version::service_hash(&old.service));
        }
        h.add(version::service_hash(s));
    }
    for e in &eps {
        if let Some(old) = st.services().get(&e.service).and_then(|s| s.endpoints.get(&e.ip)) {
            h.remove(version::endpoint_hash(old));
        }
        h.add(version::endpoint_hash(e));
    }
    let u = pb::Update {
        version: h.to_version(),
        base_version: base.to_version(),
        services_upserted: upsert,
        services_removed,
        endpoints_upserted: eps,
        ..Default::default()
    };
    st.apply(&u).expect("delta")
}

fn plan_config() -> PlanConfig {
    PlanConfig {
        scheduler: "rr".into(),
        node_ips: vec![NODE_IP.parse().unwrap()],
        families: vec![Family::Inet],
        node_tag: 0,
    }
}

/// The median of `rounds` runs of `f` (each on fresh input from `setup`).
fn median<S, T>(rounds: usize, mut setup: impl FnMut() -> S, mut f: impl FnMut(S) -> T) -> (Duration, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..rounds.max(1) {
        let input = setup();
        let t = Instant::now();
        let out = f(input);
        times.push(t.elapsed());
        last = Some(out);
    }
    times.sort();
    (times[times.len() / 2], last.expect("a round"))
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

/// The planning cost on the host: whole table vs one changed service.
fn pure(a: &Args) {
    let cfg = plan_config();
    let t = Instant::now();
    let st = cluster(a);
    println!("state: {} services, {} endpoints (built in {})", a.services, st.endpoint_count(), ms(t.elapsed()));
    let (t_desired, (desired, index)) = median(a.rounds, || (), |_| plan::desired_indexed(&cfg, &st));
    let table: Table = {
        let mut t = Table::new();
        plan::plan(&desired, &t, |_| true).iter().for_each(|op| plan::record(&mut t, op));
        t
    };
    let (t_noop, ops) = median(a.rounds, || (), |_| plan::plan(&desired, &table, |_| true));
    assert!(ops.is_empty());
    let (t_members, members) = median(a.rounds, || (), |_| companion::members(Family::Inet, &desired));
    let (t_text, text) = median(a.rounds, || (), |_| companion::render_ipsets(Family::Inet, &members));
    println!(
        "whole table: desired {}, no-change plan {}, ipset members {}, ipset text {} ({} bytes)",
        ms(t_desired),
        ms(t_noop),
        ms(t_members),
        ms(t_text),
        text.len()
    );

    // One endpoint more in one service: the incremental path.
    let target = a.services / 2;
    let mut after = st.clone();
    let changes = delta(&mut after, vec![], vec![endpoint(target, 0x00ff_0000)], &[]);
    let (t_inc, (d, up, ops, delta_text, ..)) = median(
        a.rounds,
        || (desired.clone(), index.clone(), members.clone()),
        |(mut d, mut index, mut members)| {
            let up = plan::update_desired(&cfg, &after, &changes.services, &mut d, &mut index).expect("no conflict");
            let ops = plan::plan_keys(&d, &table, &up.touched, |_| true);
            let old = up.old.iter().map(|(k, s)| (k, s));
            let new = up.touched.iter().filter_map(|k| d.services.get_key_value(k));
            let text = companion::update_members(Family::Inet, &mut members, old, new);
            // Returned, so that dropping the big maps is not timed.
            (d, up, ops, text, index, members)
        },
    );
    let (t_full, full_ops) = median(
        a.rounds,
        || (),
        |_| {
            let d = plan::desired(&cfg, &after);
            plan::plan(&d, &table, |_| true)
        },
    );
    assert_eq!(ops, full_ops, "the incremental plan differs from the whole-table plan");
    assert_eq!(d.services.len(), desired.services.len());
    println!(
        "one endpoint added: incremental {} ({} op, {} virtual server touched, ipset delta {:?}) vs whole table {} ({}x)",
        ms(t_inc),
        ops.len(),
        up.touched.len(),
        delta_text.trim_end(),
        ms(t_full),
        (t_full.as_secs_f64() / t_inc.as_secs_f64().max(1e-9)).round()
    );
    println!(
        "  {} one-endpoint plan {} < {}: ops {} == 1",
        verdict(t_inc < TARGET_ONE_ENDPOINT_PLAN && ops.len() == 1),
        ms(t_inc),
        ms(TARGET_ONE_ENDPOINT_PLAN),
        ops.len()
    );
}

/// `ipvsadm-restore` input for the table `ops` build (services and real servers, masquerade).
fn ipvsadm_rules(ops: &[Op]) -> String {
    let mut out = String::new();
    for op in ops {
        match op {
            Op::AddService(s) => {
                let _ = writeln!(out, "-A -t {} -s {}", s.socket_addr(), s.scheduler);
            }
            Op::AddDest(s, d) => {
                let _ = writeln!(out, "-a -t {} -r {} -m -w {}", s.socket_addr(), d.socket_addr(), d.weight);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

fn run(argv: &[&str], stdin: Option<&str>) -> Duration {
    let t = Instant::now();
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{argv:?}: {status}");
    t.elapsed()
}

fn ipvsadm_count() -> (usize, usize) {
    let out = Command::new("ipvsadm").arg("-Sn").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    (text.lines().filter(|l| l.starts_with("-A")).count(), text.lines().filter(|l| l.starts_with("-a")).count())
}

/// A figure for the host to compute ratios with: `FIG name seconds`.
fn fig(name: &str, t: Duration) {
    println!("FIG {name} {}", t.as_secs_f64());
}

fn row(what: &str, t: Duration, msgs: u64, ops: usize) {
    println!("{what:<44} {:>11}  {msgs:>7} netlink messages  {ops:>7} ops", ms(t));
}

/// Inside UML, part `backend`: the table through `IpvsBackend`, then deltas and a reconcile.
fn kernel_backend(a: &Args) {
    let mut st = cluster(a);
    let mut cfg = IpvsConfig::new("bench");
    cfg.node_ips = vec![NODE_IP.parse().unwrap()];
    cfg.cluster_cidrs = vec!["10.0.0.0/8".into()];
    cfg.restore_cmd = "iptables-legacy-restore".into();
    let mut b = IpvsBackend::new(cfg).expect("IPVS in UML");

    let m0 = b.stats().messages;
    let t = Instant::now();
    b.apply(&st, &ChangeSet { full: true, services: BTreeSet::new() }).unwrap();
    let t_full = t.elapsed();
    let (vs, rs) = ipvsadm_count();
    row(&format!("full apply ({vs} virtual / {rs} real servers)"), t_full, b.stats().messages - m0, b.stats().last_ops);
    fig("full", t_full);

    let target = a.services / 2;
    let mut one = Vec::new();
    for r in 0..a.rounds {
        let changes = delta(&mut st, vec![], vec![endpoint(target, 0x00ff_0000 + r as u32)], &[]);
        let m = b.stats().messages;
        let t = Instant::now();
        b.apply(&st, &changes).unwrap();
        one.push((t.elapsed(), b.stats().messages - m, b.stats().last_ops));
    }
    one.sort();
    let (t_one, one_msgs, one_ops) = one[one.len() / 2];
    row("one endpoint added (median)", t_one, one_msgs, one_ops);
    fig("one", t_one);
    println!("FIG one_msgs {one_msgs}");

    let extra = a.services + 1;
    let changes = delta(&mut st, vec![service(extra)], endpoints_of(extra, a.endpoints_per_service), &[]);
    let m = b.stats().messages;
    let t = Instant::now();
    b.apply(&st, &changes).unwrap();
    row("one service added (with its endpoints)", t.elapsed(), b.stats().messages - m, b.stats().last_ops);
    let changes = delta(&mut st, vec![], vec![], &[extra]);
    let m = b.stats().messages;
    let t = Instant::now();
    b.apply(&st, &changes).unwrap();
    row("one service removed", t.elapsed(), b.stats().messages - m, b.stats().last_ops);
    let m = b.stats().messages;
    let t = Instant::now();
    b.reconcile().unwrap();
    row("reconcile (fresh dump, whole-table compare)", t.elapsed(), b.stats().messages - m, b.stats().last_ops);
    println!("(syncs {}, of which partial {})", b.stats().syncs, b.stats().partial_syncs);
}

/// The table of the benchmark cluster as IPVS operations on an empty kernel.
fn table_ops(a: &Args) -> Vec<Op> {
    plan::plan(&plan::desired(&plan_config(), &cluster(a)), &Table::new(), |_| true)
}

/// Inside UML, part `bare`: the same table sent by a bare `IpvsClient` (netlink alone).
fn kernel_bare(a: &Args) {
    let ops = table_ops(a);
    let mut client = IpvsClient::new().unwrap();
    let m = client.messages_sent();
    let t = Instant::now();
    for op in &ops {
        match op {
            Op::AddService(s) => client.add_service(s),
            Op::AddDest(s, d) => client.add_destination(s, d),
            other => panic!("unexpected {other:?}"),
        }
        .unwrap();
    }
    let t_bare = t.elapsed();
    row("bare IpvsClient, same table", t_bare, client.messages_sent() - m, ops.len());
    fig("bare", t_bare);

    // What the backend does besides netlink in a full apply, each alone on this kernel.
    let desired = plan::desired(&plan_config(), &cluster(a));
    run(&["ip", "link", "add", "kube-ipvs0", "type", "dummy"], None);
    let vips: String = desired.vips.iter().map(|ip| format!("addr add {ip}/32 dev kube-ipvs0\n")).collect();
    let t = run(&["ip", "-force", "-batch", "-"], Some(&vips));
    println!("{:<44} {:>11}  ({} addresses)", "  the VIPs on kube-ipvs0 (ip -batch)", ms(t), desired.vips.len());
    let sets = companion::render_ipsets(Family::Inet, &companion::members(Family::Inet, &desired));
    let t = run(&["ipset", "restore"], Some(&sets));
    println!("{:<44} {:>11}  ({} lines)", "  the ipsets, whole (ipset restore)", ms(t), sets.lines().count());
}

/// Inside UML, part `restore`: `ipvsadm -C` + `ipvsadm-restore` of the same table, then one
/// `ipvsadm -a`.
fn kernel_restore(a: &Args) {
    let ops = table_ops(a);
    let rules = ipvsadm_rules(&ops);
    let t_clear = run(&["ipvsadm", "-C"], None);
    let t_restore = run(&["ipvsadm-restore"], Some(&rules));
    let (vs, rs) = ipvsadm_count();
    let want = (ops.iter().filter(|op| matches!(op, Op::AddService(_))).count(), ops.len());
    assert_eq!((vs, vs + rs), want, "ipvsadm-restore built a different table");
    println!(
        "{:<44} {:>11}  ({} lines; of which ipvsadm -C {})",
        "ipvsadm -C + ipvsadm-restore, same table",
        ms(t_clear + t_restore),
        rules.lines().count(),
        ms(t_clear)
    );
    fig("restore", t_clear + t_restore);
    let Some(Op::AddService(s)) = ops.first() else { panic!("no service") };
    let vip = s.socket_addr().to_string();
    let t_one = run(&["ipvsadm", "-a", "-t", &vip, "-r", "10.255.0.1:8080", "-m"], None);
    println!("{:<44} {:>11}", "ipvsadm -a (one real server, one process)", ms(t_one));
    fig("ipvsadm_a", t_one);
}

fn main() {
    let a = parse_args();
    match std::env::var(INSIDE).as_deref() {
        Ok("backend") => return kernel_backend(&a),
        Ok("bare") => return kernel_bare(&a),
        Ok("restore") => return kernel_restore(&a),
        _ => {}
    }
    println!("ipvs bench: {a:?}");
    pure(&a);
    if !a.kernel {
        println!("(no kernel part{})", if a.smoke { ": smoke run, pass --bench for the full benchmark" } else { "" });
        return;
    }
    if !uml::require_uml() {
        return;
    }
    // Each part on a fresh kernel: IPVS keeps deleted real servers in a trash list for a minute
    // or more and searches it on every add, so a table flushed just before slows the next fill.
    let exe = std::env::current_exe().expect("bench binary path").display().to_string();
    let mut figs = std::collections::BTreeMap::new();
    for part in ["backend", "bare", "restore"].into_iter().filter(|p| a.only.as_deref().is_none_or(|o| o == *p)) {
        let argv = [
            exe.clone(),
            "--bench".into(),
            "--services".into(),
            a.services.to_string(),
            "--endpoints-per-service".into(),
            a.endpoints_per_service.to_string(),
            "--rounds".into(),
            a.rounds.to_string(),
        ];
        let job =
            uml::UmlJob::new(&argv).env(INSIDE, part).env("RUST_BACKTRACE", "1").timeout(Duration::from_secs(1800));
        let result = uml::run_in_uml(&job).unwrap_or_else(|e| panic!("{e}"));
        println!("--- {part}, inside user-mode Linux ({}) ---", result.timings());
        for line in result.stdout.lines() {
            match line.strip_prefix("FIG ").and_then(|l| l.split_once(' ')) {
                Some((name, v)) => {
                    figs.insert(name.to_string(), v.parse::<f64>().unwrap_or(f64::NAN));
                }
                None => println!("{line}"),
            }
        }
        if result.exit_code != 0 {
            println!("{result}");
            std::process::exit(1);
        }
    }
    let f = |k: &str| figs.get(k).copied().unwrap_or(f64::NAN);
    let ratio = f("full") / f("restore");
    println!("ratios: backend full apply / ipvsadm-restore = {ratio:.2}");
    println!("        bare IpvsClient / ipvsadm-restore = {:.2}", f("bare") / f("restore"));
    println!("        backend one endpoint / one `ipvsadm -a` = {:.2}", f("one") / f("ipvsadm_a"));
    println!("  {} full apply ratio {ratio:.2} <= {TARGET_FULL_RATIO}", verdict(ratio <= TARGET_FULL_RATIO));
    println!("  {} one endpoint = {} netlink message(s) (want 1)", verdict(f("one_msgs") == 1.0), f("one_msgs"));
}
