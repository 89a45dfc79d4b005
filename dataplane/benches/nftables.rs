//! nftables backend benchmark, side by side with the iptables backend in the same run: for each
//! cluster size, in throwaway network namespaces, the full sync from empty, the cost of one
//! change end to end on the node (`Apply::apply`: render, plan, transaction, generation check)
//! for one-endpoint changes (p50/p99), service add/remove, netlink bytes per change, and a
//! resync of an unchanged table (dump + compare); then the same for the iptables backend
//! (iptables-nft and iptables-legacy) with fewer rounds. Prints figures; asserts nothing.
//!
//! `cargo bench -p kpx-dataplane --bench nftables -- [--sizes 1000,10000] [--endpoints-per-service 10]
//! [--changes 60] [--iptables-rounds 5] [--no-iptables] [--settle-ms 0]`
//!
//! Without `--bench` (under `cargo test --all-targets`) it only renders a tiny cluster.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use kpx_dataplane::backend::iptables::render::{IpFamily, RenderConfig};
use kpx_dataplane::backend::iptables::{IptablesBackend, IptablesConfig};
use kpx_dataplane::backend::nftables::desired::desired_objects;
use kpx_dataplane::backend::nftables::endpoints::Slots;
use kpx_dataplane::backend::nftables::{NftBackend, NftConfig};
use kpx_dataplane::state::{AppliedState, ChangeSet};
use kpx_dataplane::stream::Apply;
use kpx_proto::v1 as pb;
use kpx_proto::version::{self, ContentHash};

/// Nodes the endpoints run on, round robin (a cluster of 44,000 services has thousands): the
/// node under test hosts one endpoint in NODES.
const NODES: usize = 5000;

// The agent binary's allocator (dataplane/src/main.rs): render and plan allocate heavily, and
// glibc's allocator made them about twice as slow as in the agent.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    sizes: Vec<usize>,
    per_service: usize,
    changes: usize,
    iptables_rounds: usize,
    iptables: bool,
    smoke: bool,
    /// Pause after the full sync before timing changes (what the kernel still does after a big
    /// transaction shows as the first changes' latency without it).
    settle: Duration,
}

fn parse_args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !argv.iter().any(|a| a == "--bench");
    let mut a = Args {
        sizes: vec![1000, 10_000],
        per_service: 10,
        changes: 60,
        iptables_rounds: 5,
        iptables: true,
        smoke,
        settle: Duration::ZERO,
    };
    let mut it = argv.iter();
    while let Some(f) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{f} needs a value")).clone();
        match f.as_str() {
            "--sizes" => a.sizes = v().split(',').map(|s| s.parse().expect("--sizes N,M")).collect(),
            "--endpoints-per-service" => a.per_service = v().parse().expect("--endpoints-per-service E"),
            "--changes" => a.changes = v().parse().expect("--changes N"),
            "--iptables-rounds" => a.iptables_rounds = v().parse().expect("--iptables-rounds N"),
            "--no-iptables" => a.iptables = false,
            "--settle-ms" => a.settle = Duration::from_millis(v().parse().expect("--settle-ms MS")),
            _ => {}
        }
    }
    a
}

/// The node's state and the content hash deltas need.
struct Model {
    state: AppliedState,
    hash: ContentHash,
    next_ip: u32,
}

fn service(i: usize) -> pb::Service {
    let node_port = i.is_multiple_of(20);
    pb::Service {
        namespace: format!("ns-{}", i % 50),
        name: format!("svc-{i}"),
        r#type: if node_port { pb::ServiceType::NodePort } else { pb::ServiceType::ClusterIp } as i32,
        cluster_ips: vec![Ipv4Addr::from(0xac10_0000 + i as u32).to_string()],
        ports: vec![pb::ServicePort {
            name: "http".into(),
            protocol: pb::Protocol::Tcp as i32,
            port: 80,
            node_port: if node_port { 30000 + (i / 20 % 2700) as u32 } else { 0 },
        }],
        ..Default::default()
    }
}

impl Model {
    fn new(services: usize, per: usize) -> (Model, ChangeSet) {
        let mut m = Model { state: AppliedState::default(), hash: ContentHash::EMPTY, next_ip: 0 };
        let mut u = pb::Update { full: true, ..Default::default() };
        for i in 0..services {
            let s = service(i);
            u.endpoints_upserted.extend((0..per).map(|_| m.endpoint(&s)));
            u.services_upserted.push(s);
        }
        u.services_upserted.iter().for_each(|s| m.hash.add(version::service_hash(s)));
        u.endpoints_upserted.iter().for_each(|e| m.hash.add(version::endpoint_hash(e)));
        u.version = m.hash.to_version();
        let c = m.state.apply(&u).expect("snapshot");
        (m, c)
    }

    fn endpoint(&mut self, s: &pb::Service) -> pb::Endpoint {
        self.next_ip += 1;
        pb::Endpoint {
            service: format!("{}/{}", s.namespace, s.name),
            ip: Ipv4Addr::from(0x0a00_0000 + self.next_ip).to_string(),
            ports: vec![pb::EndpointPort { name: "http".into(), port: 8080 }],
            for_cluster: true,
            for_local: false,
            // Pods spread over the cluster's nodes; the benchmark's node is node-0.
            node_tag: kpx_proto::node_tag(&format!("node-{}", self.next_ip as usize % NODES)),
        }
    }

    fn delta(&mut self, build: impl FnOnce(&mut ContentHash, &mut pb::Update)) -> ChangeSet {
        let base = self.state.version().expect("version").to_version();
        let mut u = pb::Update { base_version: base, ..Default::default() };
        build(&mut self.hash, &mut u);
        u.version = self.hash.to_version();
        self.state.apply(&u).expect("delta")
    }

    /// Removes endpoint E, or adds it back: alternating one-endpoint changes.
    fn flip_endpoint(&mut self, e: &pb::Endpoint, add: bool) -> ChangeSet {
        self.delta(|h, u| {
            if add {
                h.add(version::endpoint_hash(e));
                u.endpoints_upserted.push(e.clone());
            } else {
                h.remove(version::endpoint_hash(e));
                u.endpoints_removed.push(pb::EndpointRef { service: e.service.clone(), ip: e.ip.clone() });
            }
        })
    }

    fn add_service(&mut self, s: &pb::Service, eps: &[pb::Endpoint]) -> ChangeSet {
        self.delta(|h, u| {
            h.add(version::service_hash(s));
            eps.iter().for_each(|e| h.add(version::endpoint_hash(e)));
            u.services_upserted.push(s.clone());
            u.endpoints_upserted.extend(eps.iter().cloned());
        })
    }

    fn remove_service(&mut self, s: &pb::Service, eps: &[pb::Endpoint]) -> ChangeSet {
        self.delta(|h, u| {
            h.remove(version::service_hash(s));
            eps.iter().for_each(|e| h.remove(version::endpoint_hash(e)));
            u.services_removed.push(pb::ServiceRef { namespace: s.namespace.clone(), name: s.name.clone() });
        })
    }
}

struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> NetNs {
        let name = format!("kpxbench-{}-{tag}", std::process::id());
        let ok = Command::new("ip").args(["netns", "add", &name]).status().is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name} (root needed)");
        NetNs(name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s.get(((s.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default()
}

/// The N slowest of V with their position: a tail made of the first changes after a full sync
/// reads differently from one spread over the run.
fn slowest(v: &[Duration], n: usize) -> String {
    let mut s: Vec<(usize, Duration)> = v.iter().copied().enumerate().collect();
    s.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
    s.iter().take(n).map(|(i, d)| format!("#{i}: {:.1}", d.as_secs_f64() * 1000.0)).collect::<Vec<_>>().join(", ")
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// Times one backend: full sync, `changes` one-endpoint changes, service add/remove, a resync.
/// Returns the figures as (label, value) rows, and the state the backend was left with (None
/// when the full sync failed).
fn run(
    backend: &mut dyn Apply,
    a: &Args,
    services: usize,
    changes: usize,
    bytes: &dyn Fn() -> usize,
) -> (Vec<(String, String)>, Option<AppliedState>) {
    let (mut m, snap) = Model::new(services, a.per_service);
    let mut rows = Vec::new();
    let started = Instant::now();
    if let Err(e) = backend.apply(&m.state, &snap) {
        // (iptables-legacy cannot load 44,000 services: a row that says so, not a lost run.)
        let tail: Vec<char> = e.chars().rev().take(60).collect();
        let e: String = tail.into_iter().rev().collect();
        rows.push(("full sync from empty".into(), format!("failed: {e}")));
        return (rows, None);
    }
    let full = started.elapsed();
    rows.push(("full sync from empty".into(), format!("{:.2} s", full.as_secs_f64())));
    std::thread::sleep(a.settle);
    let mut ep = Vec::new();
    let mut sizes = Vec::new();
    for n in 0..changes {
        let i = (n * 7919) % services;
        let key = format!("ns-{}/svc-{i}", i % 50);
        let e = m.state.services()[&key].endpoints.values().next().expect("endpoint").clone();
        for add in [false, true] {
            let c = m.flip_endpoint(&e, add);
            ep.push(timed(|| backend.apply(&m.state, &c).expect("endpoint change")));
            sizes.push(bytes());
        }
    }
    rows.push(("one-endpoint changes timed".into(), ep.len().to_string()));
    rows.push(("one-endpoint change p50".into(), ms(pct(&ep, 0.5))));
    rows.push(("one-endpoint change p99".into(), ms(pct(&ep, 0.99))));
    rows.push(("slowest one-endpoint changes (#: ms)".into(), slowest(&ep, 4)));
    let max = sizes.iter().max().copied().unwrap_or(0);
    rows.push((
        "netlink bytes per one-endpoint change (max)".into(),
        if max > 0 { format!("{max} B") } else { "-".into() },
    ));
    let (mut add, mut del) = (Vec::new(), Vec::new());
    for k in 0..changes {
        let s = service(services + 100 + k);
        let eps: Vec<pb::Endpoint> = (0..a.per_service).map(|_| m.endpoint(&s)).collect();
        let c = m.add_service(&s, &eps);
        add.push(timed(|| backend.apply(&m.state, &c).expect("service add")));
        let c = m.remove_service(&s, &eps);
        del.push(timed(|| backend.apply(&m.state, &c).expect("service remove")));
    }
    rows.push(("service add p50 / p99".into(), format!("{} / {}", ms(pct(&add, 0.5)), ms(pct(&add, 0.99)))));
    rows.push(("slowest service adds (#: ms)".into(), slowest(&add, 4)));
    rows.push(("service remove p50 / p99".into(), format!("{} / {}", ms(pct(&del, 0.5)), ms(pct(&del, 0.99)))));
    let resync =
        timed(|| backend.apply(&m.state, &ChangeSet { full: true, services: Default::default() }).expect("resync"));
    rows.push(("resync of an unchanged table (snapshot)".into(), format!("{:.2} s", resync.as_secs_f64())));
    (rows, Some(m.state))
}

fn main() {
    let a = parse_args();
    let cfg = RenderConfig {
        family: IpFamily::V4,
        cluster_cidr: Some("10.0.0.0/8".into()),
        masquerade_all: false,
        node_ips: vec![IpAddr::V4(Ipv4Addr::new(192, 168, 0, 2))],
        node_name: "node-0".into(),
        localhost_node_ports: false,
    };
    if a.smoke {
        let (m, _) = Model::new(20, 3);
        let (o, skipped) = desired_objects(&cfg, &m.state, &mut Slots::default());
        assert!(skipped.is_empty());
        println!("smoke: 20 services render to {} chains (run with --bench for figures)", o.chains.len());
        return;
    }
    for &services in &a.sizes {
        let (m, _) = Model::new(services, a.per_service);
        let t = Instant::now();
        let (o, _) = desired_objects(&cfg, &m.state, &mut Slots::default());
        let render = t.elapsed();
        println!(
            "\n== {services} services / {} endpoints: render of the whole table {} ({} chains)",
            m.state.endpoint_count(),
            ms(render),
            o.chains.len()
        );
        drop(m);
        let ns = NetNs::new("nft");
        let mut nc = NftConfig::new(IpFamily::V4, "node-0");
        nc.cluster_cidr = cfg.cluster_cidr.clone();
        nc.node_ips = cfg.node_ips.clone();
        nc.netns = Some(ns.0.clone());
        // Always due: the periodic resync below is the agent's, prepared outside its lock
        // (updates are never turned into it).
        nc.full_resync_period = Duration::ZERO;
        let mut nft = NftBackend::new(nc).expect("nf_tables in the namespace");
        let mut results: Vec<(String, Vec<(String, String)>)> = Vec::new();
        let rows = run_nft(&mut nft, &a, services);
        // Each backend's figures as soon as it is done (a later failure loses nothing), then
        // side by side.
        eprintln!("nftables (netlink): {rows:?}");
        results.push(("nftables (netlink)".into(), rows));
        drop(nft);
        drop(ns);
        if a.iptables {
            for variant in ["nft", "legacy"] {
                let ns = NetNs::new(variant);
                let mut ic = IptablesConfig::new(IpFamily::V4, "node-0");
                ic.cluster_cidr = cfg.cluster_cidr.clone();
                ic.node_ips = cfg.node_ips.clone();
                ic.netns = Some(ns.0.clone());
                ic.restore_cmd = format!("iptables-{variant}-restore");
                ic.save_cmd = format!("iptables-{variant}-save");
                let mut ipt = IptablesBackend::new(ic);
                let (rows, _) = run(&mut ipt, &a, services, a.iptables_rounds, &|| 0);
                eprintln!("iptables-{variant}: {rows:?}");
                results.push((format!("iptables-{variant}"), rows));
            }
        }
        let width = results[0].1.iter().map(|r| r.0.len()).max().unwrap_or(10);
        let labels: Vec<String> = results[0].1.iter().map(|r| r.0.clone()).collect();
        print!("{:width$}", "");
        results.iter().for_each(|(name, _)| print!(" | {name:>22}"));
        println!();
        for (i, label) in labels.iter().enumerate() {
            print!("{label:width$}");
            for (_, rows) in &results {
                let v = rows.get(i).map(|r| r.1.as_str()).unwrap_or("-");
                print!(" | {v:>22}");
            }
            println!();
        }
    }
}

/// [`run`] for the nftables backend, with the netlink bytes of each change.
fn run_nft(b: &mut NftBackend, a: &Args, services: usize) -> Vec<(String, String)> {
    struct Probe<'a>(&'a mut NftBackend, std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl Apply for Probe<'_> {
        fn apply(&mut self, s: &AppliedState, c: &ChangeSet) -> Result<(), String> {
            let r = self.0.apply(s, c);
            self.1.store(self.0.stats().last_bytes, std::sync::atomic::Ordering::Relaxed);
            r
        }
    }
    let bytes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut p = Probe(b, bytes.clone());
    let (mut rows, state) = run(&mut p, a, services, a.changes, &|| bytes.load(std::sync::atomic::Ordering::Relaxed));
    let Some(state) = state else { return rows };
    // The agent's periodic resync: dump, render and plan outside its lock, then the check and
    // the (empty) transaction under it. The second figure is what updates wait for.
    let job = b.resync_job().expect("a periodic resync is due");
    let mut prepared = None;
    let outside = timed(|| prepared = Some(job.prepare(&state).expect("resync prepared")));
    let mut finished = None;
    let inside = timed(|| finished = Some(b.finish_resync(&state, prepared.take().unwrap()).expect("resync")));
    assert!(finished.as_ref().is_some_and(|f| f.committed()), "the resync went stale");
    let freed = timed(|| drop(finished));
    rows.push((
        "periodic resync: prepared / under the lock / freed".into(),
        format!("{:.2} s / {} / {}", outside.as_secs_f64(), ms(inside), ms(freed)),
    ));
    rows
}
