//! iptables backend benchmark: render time for a large cluster, then, with that ruleset loaded
//! into a throwaway network namespace, what one change costs end to end on the node
//! (`IptablesBackend::apply`) next to a bare `iptables-restore --noflush` of exactly the input
//! kpx produced for that change, timed in the same run. Prints figures and PASS/MISS against
//! the targets; asserts nothing.
//!
//! `cargo bench -p kpx-dataplane --bench iptables -- [--services 10000] [--endpoints-per-service 10]
//! [--variant nft|legacy] [--rounds 5] [--render-runs 7] [--no-kernel] [--dump FILE]`
//!
//! Without `--bench` (that is, under `cargo test --all-targets`) it runs a tiny smoke
//! configuration with no kernel part, so it stays a quick sanity check.
//!
//! The kernel part needs root and `ip netns`; it only ever touches the namespace it creates
//! (`kpxbench-PID-VARIANT`, deleted at the end), never the host's tables.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use kpx_dataplane::backend::iptables::exec::Runner;
use kpx_dataplane::backend::iptables::render::{self, IpFamily, PreviousRules, RenderConfig};
use kpx_dataplane::backend::iptables::{IptablesBackend, IptablesConfig};
use kpx_dataplane::state::{AppliedState, ChangeSet};
use kpx_dataplane::stream::Apply;
use kpx_proto::v1 as pb;
use kpx_proto::version::{self, ContentHash};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

/// Targets the design is held to (printed, never asserted).
const TARGET_RENDER: Duration = Duration::from_millis(150);
const TARGET_RATIO: f64 = 1.2;

const CLUSTER_CIDR: &str = "10.0.0.0/8";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);

#[derive(Debug)]
struct Args {
    services: usize,
    endpoints_per_service: usize,
    variant: String,
    rounds: usize,
    render_runs: usize,
    kernel: bool,
    /// Write the full restore input here (to reproduce a restore by hand).
    dump: Option<String>,
    seed: u64,
    smoke: bool,
}

fn parse_args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !argv.iter().any(|a| a == "--bench");
    let mut a = Args {
        services: if smoke { 20 } else { 10_000 },
        endpoints_per_service: if smoke { 3 } else { 10 },
        variant: "nft".into(),
        rounds: 5,
        render_runs: if smoke { 3 } else { 7 },
        kernel: !smoke,
        dump: None,
        seed: 1,
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
            "--variant" => a.variant = value(flag),
            "--rounds" => a.rounds = value(flag).parse().expect("--rounds R"),
            "--render-runs" => a.render_runs = value(flag).parse().expect("--render-runs N"),
            "--seed" => a.seed = value(flag).parse().expect("--seed X"),
            "--no-kernel" => a.kernel = false,
            "--dump" => a.dump = Some(value(flag)),
            // cargo passes --bench; libtest-style filters and flags are ignored.
            _ => {}
        }
    }
    assert!(a.variant == "nft" || a.variant == "legacy", "--variant nft|legacy");
    assert!(a.services > 0 && a.endpoints_per_service > 0, "need services and endpoints");
    a.rounds = a.rounds.max(1);
    a.render_runs = a.render_runs.max(1);
    a
}

/// The synthetic cluster as the node sees it: the `AppliedState` plus the content hash that
/// deltas need for their versions.
struct Model {
    state: AppliedState,
    hash: ContentHash,
    next_ip: u32,
}

fn svc_key(i: usize) -> (String, String) {
    (format!("ns-{}", i % 50), format!("svc-{i}"))
}

/// Service `i`: one TCP port; every 20th (5%) is a NodePort (Cluster policy), like the fan-out
/// benchmark's cluster. Cluster IPs from 172.16.0.0/12.
fn service(i: usize) -> pb::Service {
    let (namespace, name) = svc_key(i);
    let node_port = i.is_multiple_of(20);
    pb::Service {
        namespace,
        name,
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

fn endpoint(service: &str, ip: u32) -> pb::Endpoint {
    pb::Endpoint {
        service: service.into(),
        // 10.0.0.0/8 and up: pod IPs inside the cluster CIDR.
        ip: Ipv4Addr::from(0x0a00_0000 + ip).to_string(),
        ports: vec![pb::EndpointPort { name: "http".into(), port: 8080 }],
        for_cluster: true,
        for_local: false,
        node_tag: 0,
    }
}

fn key_of(s: &pb::Service) -> String {
    format!("{}/{}", s.namespace, s.name)
}

impl Model {
    fn new(services: usize, per_service: usize) -> (Model, ChangeSet) {
        let mut m = Model { state: AppliedState::default(), hash: ContentHash::EMPTY, next_ip: 0 };
        let mut u = pb::Update { full: true, ..Default::default() };
        for i in 0..services {
            let (s, eps) = m.new_service(i, per_service);
            u.services_upserted.push(s);
            u.endpoints_upserted.extend(eps);
        }
        u.services_upserted.iter().for_each(|s| m.hash.add(version::service_hash(s)));
        u.endpoints_upserted.iter().for_each(|e| m.hash.add(version::endpoint_hash(e)));
        u.version = m.hash.to_version();
        let changes = m.state.apply(&u).expect("the synthetic snapshot applies");
        (m, changes)
    }

    fn new_service(&mut self, i: usize, per_service: usize) -> (pb::Service, Vec<pb::Endpoint>) {
        let s = service(i);
        let key = key_of(&s);
        let eps = (0..per_service)
            .map(|_| {
                self.next_ip += 1;
                endpoint(&key, self.next_ip)
            })
            .collect();
        (s, eps)
    }

    /// Applies a delta built by `build` (which also updates `self.hash`) and returns its changes.
    fn delta(&mut self, build: impl FnOnce(&mut ContentHash, &mut pb::Update)) -> ChangeSet {
        let base = self.state.version().expect("the state has a version").to_version();
        let mut u = pb::Update { base_version: base, ..Default::default() };
        build(&mut self.hash, &mut u);
        u.version = self.hash.to_version();
        self.state.apply(&u).expect("the synthetic delta applies")
    }

    fn remove_endpoint(&mut self, e: &pb::Endpoint) -> ChangeSet {
        self.delta(|h, u| {
            h.remove(version::endpoint_hash(e));
            u.endpoints_removed.push(pb::EndpointRef { service: e.service.clone(), ip: e.ip.clone() });
        })
    }

    fn add_endpoint(&mut self, e: &pb::Endpoint) -> ChangeSet {
        self.delta(|h, u| {
            h.add(version::endpoint_hash(e));
            u.endpoints_upserted.push(e.clone());
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

    /// A random existing service's key and one of its endpoints.
    fn pick_endpoint(&self, rng: &mut StdRng) -> pb::Endpoint {
        let services = self.state.services();
        let i = rng.random_range(0..services.len());
        let entry = services.values().nth(i).expect("index in range");
        let j = rng.random_range(0..entry.endpoints.len());
        entry.endpoints.values().nth(j).expect("index in range").clone()
    }
}

fn render_config() -> RenderConfig {
    RenderConfig {
        family: IpFamily::V4,
        cluster_cidr: Some(CLUSTER_CIDR.into()),
        masquerade_all: false,
        node_ips: vec![IpAddr::V4(NODE_IP)],
        node_name: "node-0".into(),
        localhost_node_ports: true,
    }
}

/// This thread's time on a CPU (first field of /proc/thread-self/schedstat, in ns): unlike the
/// wall clock, it does not grow when other processes take the cores away.
fn cpu_time() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    Duration::from_nanos(s.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0))
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    if s.is_empty() { Duration::ZERO } else { s[s.len() / 2] }
}

fn median_f(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() { 0.0 } else { s[s.len() / 2] }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

/// Rule-editing lines (`-A`/`-I`/`-D`/`-X`) of a restore input.
fn rule_lines(input: &str) -> usize {
    input.lines().filter(|l| ["-A ", "-I ", "-D ", "-X "].iter().any(|p| l.starts_with(p))).count()
}

/// 1. Rendering, no I/O. Returns the full restore input of the last run.
fn bench_render(a: &Args, m: &Model) -> String {
    let cfg = render_config();
    let mut buf = String::new();
    let (mut times, mut cpu) = (Vec::with_capacity(a.render_runs), Vec::with_capacity(a.render_runs));
    // One warm-up run sizes the reused buffer, as the agent's buffer is after its first sync.
    let skipped = render::render_full(&cfg, &m.state, &mut buf);
    assert!(skipped.is_empty(), "the synthetic cluster renders cleanly: {skipped:?}");
    for _ in 0..a.render_runs {
        let (t, c) = (Instant::now(), cpu_time());
        render::render_full(&cfg, &m.state, &mut buf);
        times.push(t.elapsed());
        cpu.push(cpu_time().saturating_sub(c));
    }
    let (lines, rules) = (buf.lines().count(), rule_lines(&buf));
    let med = median(&times);
    println!(
        "1. render_full, {} services / {} endpoints into a reused buffer: median {} (min {}, max {}, {} runs)   [target <= {}: {}]",
        m.state.services().len(),
        m.state.endpoint_count(),
        ms(med),
        ms(*times.iter().min().expect("runs")),
        ms(*times.iter().max().expect("runs")),
        a.render_runs,
        ms(TARGET_RENDER),
        verdict(med <= TARGET_RENDER),
    );
    println!(
        "   on-CPU time of the rendering thread: median {} (min {}); a wall median far above it means other processes had the cores",
        ms(median(&cpu)),
        ms(*cpu.iter().min().expect("runs")),
    );
    let digest: String = Sha256::digest(buf.as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect();
    println!(
        "   {lines} lines ({rules} rules), {:.1} MiB, sha256 {digest}… (equal digests = identical output across render changes)",
        buf.len() as f64 / (1024.0 * 1024.0)
    );

    // What else a full sync and a partial sync compute in process (no kernel).
    let t = Instant::now();
    let previous = PreviousRules::from_state(&m.state);
    let from_state = t.elapsed();
    let mut probe = Model { state: m.state.clone(), hash: m.hash, next_ip: m.next_ip };
    let mut rng = StdRng::seed_from_u64(a.seed);
    let e = probe.pick_endpoint(&mut rng);
    let changes = probe.remove_endpoint(&e);
    let mut out = String::new();
    let mut partial = Vec::new();
    for _ in 0..a.render_runs {
        let t = Instant::now();
        render::render_partial(&cfg, &probe.state, &changes, &previous, &mut out);
        partial.push(t.elapsed());
    }
    let mut prev = previous.clone();
    let t = Instant::now();
    prev.update(&probe.state, &changes);
    let update = t.elapsed();
    println!("   full sync also runs PreviousRules::from_state (shares the state's entries): {}", ms(from_state));
    println!(
        "   one-endpoint change in process: render_partial {:.1} µs ({} lines, {} bytes), PreviousRules::update {:.1} µs",
        median(&partial).as_secs_f64() * 1e6,
        rule_lines(&out),
        out.len(),
        update.as_secs_f64() * 1e6,
    );
    assert!(!out.contains(":KUBE-SERVICES"), "an endpoint change must not rewrite KUBE-SERVICES");
    buf
}

/// A network namespace deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new(variant: &str) -> Result<NetNs, String> {
        let name = format!("kpxbench-{}-{variant}", std::process::id());
        let out = Command::new("ip").args(["netns", "add", &name]).output().map_err(|e| format!("ip: {e}"))?;
        if !out.status.success() {
            return Err(format!("ip netns add failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(NetNs(name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn kernel_ready(tools: &[&str]) -> Result<(), String> {
    let uid = Command::new("id").arg("-u").output().map_err(|e| format!("id -u: {e}"))?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    for t in tools {
        if !Command::new(t).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return Err(format!("{t} is not installed"));
        }
    }
    Ok(())
}

/// One kind of change, measured `rounds` times: kpx's apply and a bare restore of its input.
#[derive(Default)]
struct Series {
    apply: Vec<Duration>,
    sync: Vec<Duration>,
    bare: Vec<Duration>,
    lines: usize,
    bytes: usize,
    rewrites_services: bool,
}

impl Series {
    fn ratios(&self) -> Vec<f64> {
        self.apply.iter().zip(&self.bare).map(|(k, b)| k.as_secs_f64() / b.as_secs_f64()).collect()
    }

    fn print(&self, label: &str) -> bool {
        let ratio = median_f(&self.ratios());
        let ok = ratio <= TARGET_RATIO;
        println!(
            "   {label}: kpx apply {} (sync {}) vs bare restore {} -> {ratio:.2}x   [target <= {TARGET_RATIO}x: {}]",
            ms(median(&self.apply)),
            ms(median(&self.sync)),
            ms(median(&self.bare)),
            verdict(ok),
        );
        println!(
            "      restore input {} rule lines, {} bytes{}; per round kpx/bare: {}",
            self.lines,
            self.bytes,
            if self.rewrites_services {
                ", REWRITES KUBE-SERVICES"
            } else {
                ", KUBE-SERVICES untouched or edited by -I/-D"
            },
            self.ratios().iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" "),
        );
        ok
    }
}

struct Kernel<'a> {
    backend: IptablesBackend,
    runner: Runner,
    argv: Vec<String>,
    model: &'a mut Model,
}

impl Kernel<'_> {
    /// kpx's whole apply for `changes`; returns (apply time, backend sync time, restore input).
    fn apply(&mut self, changes: &ChangeSet) -> Result<(Duration, Duration, String), String> {
        let t = Instant::now();
        self.backend.apply(&self.model.state, changes)?;
        let took = t.elapsed();
        let stats = self.backend.stats();
        if stats.last_sync_full {
            return Err(format!("expected a partial sync, got a full one ({:?})", stats.last_full_reason));
        }
        Ok((took, stats.last_sync_duration.unwrap_or_default(), self.backend.last_restore_input()))
    }

    /// The bare restore: the same argv, the same namespace, the given input.
    fn bare(&self, input: &str) -> Result<Duration, String> {
        let argv: Vec<&str> = self.argv.iter().map(String::as_str).collect();
        let t = Instant::now();
        self.runner.run_ok(&argv, &[input]).map_err(|e| e.to_string())?;
        Ok(t.elapsed())
    }

    /// Two changes that undo each other, each timed through kpx, then their inputs replayed bare
    /// in the same order (so the kernel is back where kpx left it).
    fn pair(
        &mut self,
        first: ChangeSet,
        second: impl FnOnce(&mut Model) -> ChangeSet,
        s1: &mut Series,
        s2: &mut Series,
    ) -> Result<(), String> {
        let (a1, y1, in1) = self.apply(&first)?;
        let changes = second(self.model);
        let (a2, y2, in2) = self.apply(&changes)?;
        let b1 = self.bare(&in1)?;
        let b2 = self.bare(&in2)?;
        for (s, a, y, b, input) in [(s1, a1, y1, b1, &in1), (s2, a2, y2, b2, &in2)] {
            s.apply.push(a);
            s.sync.push(y);
            s.bare.push(b);
            s.lines = rule_lines(input);
            s.bytes = input.len();
            s.rewrites_services = input.lines().any(|l| l == ":KUBE-SERVICES - [0:0]");
        }
        Ok(())
    }
}

/// 2. The kernel part, in a namespace of its own.
fn bench_kernel(a: &Args, model: &mut Model, snapshot: &ChangeSet, full_input: &str) -> Result<(), String> {
    let (restore, save) = match a.variant.as_str() {
        "legacy" => ("iptables-legacy-restore", "iptables-legacy-save"),
        _ => ("iptables-nft-restore", "iptables-nft-save"),
    };
    kernel_ready(&[restore, save])?;
    let ns = NetNs::new(&a.variant)?;
    let mut cfg = IptablesConfig::new(IpFamily::V4, "node-0");
    let rc = render_config();
    cfg.cluster_cidr = rc.cluster_cidr.clone();
    cfg.node_ips = rc.node_ips.clone();
    cfg.restore_cmd = restore.into();
    cfg.save_cmd = save.into();
    cfg.netns = Some(ns.0.clone());
    let runner = Runner { netns: Some(ns.0.clone()) };
    let version = runner.run_ok(&[restore, "--version"], &[]).map_err(|e| e.to_string())?.stdout;
    println!("2. kernel: {} in namespace {} ({} rounds per change)", version.trim(), ns.0, a.rounds);
    // Always due: the periodic resync timed below is the agent's (updates are never turned
    // into it).
    cfg.full_resync_period = Duration::ZERO;
    let backend = IptablesBackend::new(cfg);
    let argv = backend.restore_argv().iter().map(|s| s.to_string()).collect();
    let mut k = Kernel { backend, runner, argv, model };

    let t = Instant::now();
    k.backend.apply(&k.model.state, snapshot)?;
    let stats = k.backend.stats();
    println!(
        "   initial full sync (iptables-save of the empty tables + restore of {} rule lines, {:.1} MiB): {}",
        stats.last_rules_written,
        stats.last_bytes_written as f64 / (1024.0 * 1024.0),
        ms(t.elapsed())
    );
    println!("   rules kpx keeps: filter {}, nat {}", stats.rules.filter, stats.rules.nat);

    let mut rng = StdRng::seed_from_u64(a.seed);
    let (mut ep_rm, mut ep_add, mut svc_add, mut svc_rm) =
        (Series::default(), Series::default(), Series::default(), Series::default());
    let per_service = a.endpoints_per_service;
    for next_service in a.services..a.services + a.rounds {
        // (a) One endpoint goes away, then comes back.
        let e = k.model.pick_endpoint(&mut rng);
        let first = k.model.remove_endpoint(&e);
        k.pair(first, |m| m.add_endpoint(&e), &mut ep_rm, &mut ep_add)?;
        // (b)/(c) A new service with its endpoints, then its removal.
        let (s, eps) = k.model.new_service(next_service, per_service);
        let first = k.model.add_service(&s, &eps);
        k.pair(first, |m| m.remove_service(&s, &eps), &mut svc_add, &mut svc_rm)?;
    }
    println!(
        "   end to end on the node (IptablesBackend::apply with the ChangeSet), medians; bare = the same input alone:"
    );
    let mut ok = true;
    ok &= ep_rm.print("(a) one endpoint removed");
    ok &= ep_add.print("(a) one endpoint added  ");
    ok &= svc_add.print("(b) one service added   ");
    ok &= svc_rm.print("(c) one service removed ");

    // Context: what kube-proxy restores on every sync: KUBE-SERVICES rewritten in full, plus
    // the changed service's chain. Declaring a chain flushes it, so this replays cleanly.
    let mut kp = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let nat = &full_input[full_input.find("*nat\n").ok_or("no nat section")?..];
    for l in nat.lines().filter(|l| l.starts_with("-A KUBE-SERVICES ")) {
        kp.push_str(l);
        kp.push('\n');
    }
    let entry = k.model.state.services().values().next().ok_or("no services")?;
    let one = render::render_service(&rc, entry);
    let (chain, lines) = one.chains.first().ok_or("the first service has no chain")?;
    kp.push_str(&format!(":{chain} - [0:0]\n"));
    lines.iter().for_each(|l| {
        kp.push_str(l);
        kp.push('\n');
    });
    kp.push_str("COMMIT\n");
    let mut kp_times = Vec::new();
    for _ in 0..a.rounds.min(3) {
        kp_times.push(k.bare(&kp)?);
    }
    let endpoint_bare = median(&ep_rm.bare.iter().chain(&ep_add.bare).copied().collect::<Vec<_>>());
    println!(
        "   context: kube-proxy-style restore of the same one-endpoint change (KUBE-SERVICES rewritten, {} rule lines, {} bytes, plus one service chain): {} = {:.1}x kpx's bare endpoint restore",
        rule_lines(&kp),
        kp.len(),
        ms(median(&kp_times)),
        median(&kp_times).as_secs_f64() / endpoint_bare.as_secs_f64(),
    );

    // Context: the periodic canary check and the table read of a full sync.
    let t = Instant::now();
    let alive = k.backend.check_canary();
    let canary = t.elapsed();
    let t = Instant::now();
    let saved = k.runner.run_ok(&[save, "-t", "nat"], &[]).map_err(|e| e.to_string())?;
    let save_time = t.elapsed();
    println!(
        "   context: check_canary (housekeeping, 2 x iptables -C, outside the agent's lock) {} (alive: {alive}); {save} -t nat ({:.1} MiB, read by every full sync) {}",
        ms(canary),
        saved.stdout.len() as f64 / (1024.0 * 1024.0),
        ms(save_time),
    );

    // Context: a periodic full resync of the loaded ruleset, first as before (every chain
    // rewritten, by a backend with `skip_unchanged_chains` off), then as kpx does it (only the
    // top-level chains and the per-service chains that differ from the kernel's).
    let full = ChangeSet { full: true, services: BTreeSet::new() };
    let mut off = k.backend.config().clone();
    off.skip_unchanged_chains = false;
    let mut rewrite = IptablesBackend::new(off);
    let t = Instant::now();
    rewrite.apply(&k.model.state, &full)?;
    let before = t.elapsed();
    let s = rewrite.stats();
    println!(
        "   context: full resync of the loaded ruleset, rewriting every chain (skip_unchanged_chains off): {} ({} rule lines, {} restores)",
        ms(before),
        s.last_rules_written,
        s.last_restores
    );
    let t = Instant::now();
    k.backend.apply(&k.model.state, &full)?;
    let after = t.elapsed();
    let s = k.backend.stats();
    println!(
        "   context: full resync of the loaded ruleset (iptables-save -t nat, the built-in filter chains listed, render, compare, restore of the top-level chains and of what differs): {} ({} rule lines, {} restores, {} per-service chains unchanged) = {:.2}x the full rewrite",
        ms(after),
        s.last_rules_written,
        s.last_restores,
        s.last_unchanged_chains,
        after.as_secs_f64() / before.as_secs_f64()
    );
    // The agent's periodic resync: the tables read outside its lock, then render, compare and
    // restore under it. The second figure is what updates wait for.
    let job = k.backend.resync_job().ok_or("no periodic resync due")?;
    let t = Instant::now();
    let prepared = job.prepare().map_err(|e| e.to_string())?;
    let read = t.elapsed();
    let t = Instant::now();
    let committed = k.backend.finish_resync(&k.model.state, prepared)?;
    let locked = t.elapsed();
    println!(
        "   context: periodic resync as the agent runs it: tables read outside its lock {}, then render, compare and restore under it {} (committed: {committed}) = {:.2}x the resync above",
        ms(read),
        ms(locked),
        locked.as_secs_f64() / after.as_secs_f64()
    );
    println!("   every change <= {TARGET_RATIO}x its bare restore: {}", verdict(ok));
    Ok(())
}

fn main() {
    let a = parse_args();
    let started = Instant::now();
    println!(
        "iptables{}: {} services x {} endpoints, variant {}, {} cores",
        if a.smoke { " (smoke run; pass --bench for the real one)" } else { "" },
        a.services,
        a.endpoints_per_service,
        a.variant,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    );
    let t = Instant::now();
    let (mut model, snapshot) = Model::new(a.services, a.endpoints_per_service);
    println!("   synthetic state built in {}", ms(t.elapsed()));
    let full = bench_render(&a, &model);
    if let Some(path) = &a.dump {
        std::fs::write(path, &full).unwrap_or_else(|e| panic!("--dump {path}: {e}"));
        println!("   full restore input written to {path}");
    }
    if a.kernel {
        if let Err(e) = bench_kernel(&a, &mut model, &snapshot, &full) {
            eprintln!("iptables: kernel part failed: {e}");
            std::process::exit(1);
        }
    } else {
        println!("2. kernel part skipped ({})", if a.smoke { "smoke run" } else { "--no-kernel" });
    }
    println!("total run time {}", ms(started.elapsed()));
}
