//! Userspace backend benchmark, against the iptables backend's kernel DNAT in the same run and
//! the same topology: two copies of the kernel tests' cluster (a client pod and an endpoint
//! pod on node-a), one programmed by the real `kpx-dataplane --backend iptables`, the other by
//! `--backend userspace`, measured round by round in turn. Load generators and servers run in
//! this process, on threads inside the client's and the pod's namespaces.
//!
//! `cargo bench -p kpx-dataplane --bench userspace -- [--seconds 3] [--rounds 3] [--streams 1,2]
//! [--rate 1000] [--requests 3000] [--concurrency 32] [--idle 2000] [--flows 2000] [--threads N]
//! [--only memory,throughput,latency,rate]`
//!
//! Prints figures and PASS/MISS against the targets; asserts nothing. Without `--bench`
//! (under `cargo test --all-targets`) it runs a tiny smoke configuration, when it can run at
//! all. Needs root and network namespaces; it only touches the namespaces it creates.

#[path = "../tests/traffic/cluster.rs"]
mod cluster;
#[path = "userspace/load.rs"]
mod load;
#[path = "../tests/traffic/manifest.rs"]
mod manifest;
#[path = "../tests/netns/mod.rs"]
mod netns;

use cluster::Cluster;
use manifest::{Svc, TARGET_PORT};
use netns::Topology;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

const TARGET_THROUGHPUT_RATIO: f64 = 0.5;
const TARGET_ADDED_P99: Duration = Duration::from_micros(200);
const TARGET_CONN_RATE: f64 = 10_000.0;

#[derive(Debug)]
struct Args {
    seconds: f64,
    rounds: usize,
    /// Bulk TCP is measured with each of these numbers of parallel streams.
    streams: Vec<usize>,
    rate: u32,
    requests: usize,
    concurrency: usize,
    idle: usize,
    flows: usize,
    /// The userspace proxy's threads (`--userspace-threads`; 0: one per CPU).
    threads: usize,
    /// Run only these parts (memory, throughput, latency, rate); all when empty.
    only: Vec<String>,
    smoke: bool,
}

fn parse_args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !argv.iter().any(|a| a == "--bench");
    let mut a = Args {
        seconds: if smoke { 0.3 } else { 3.0 },
        rounds: if smoke { 1 } else { 3 },
        streams: if smoke { vec![1] } else { vec![1, 2] },
        rate: 1000,
        requests: if smoke { 200 } else { 3000 },
        concurrency: 32,
        idle: if smoke { 100 } else { 2000 },
        flows: if smoke { 100 } else { 2000 },
        threads: 0,
        only: Vec::new(),
        smoke,
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> String { it.next().unwrap_or_else(|| panic!("{name} needs a value")).clone() };
        match flag.as_str() {
            "--seconds" => a.seconds = value(flag).parse().expect("--seconds S"),
            "--rounds" => a.rounds = value(flag).parse().expect("--rounds N"),
            "--streams" => a.streams = value(flag).split(',').map(|n| n.parse().expect("--streams N[,N...]")).collect(),
            "--rate" => a.rate = value(flag).parse().expect("--rate N"),
            "--requests" => a.requests = value(flag).parse().expect("--requests N"),
            "--concurrency" => a.concurrency = value(flag).parse().expect("--concurrency N"),
            "--idle" => a.idle = value(flag).parse().expect("--idle N"),
            "--flows" => a.flows = value(flag).parse().expect("--flows N"),
            "--threads" => a.threads = value(flag).parse().expect("--threads N"),
            "--only" => a.only = value(flag).split(',').map(str::to_string).collect(),
            // cargo passes --bench; libtest-style filters and flags are ignored.
            _ => {}
        }
    }
    a.rounds = a.rounds.max(1);
    a
}

/// One side of the comparison: its cluster, and the runtimes of its pod's servers and its
/// client's connection generator.
struct Side {
    name: &'static str,
    cluster: Cluster,
    servers: load::Servers,
    _server_rt: tokio::runtime::Runtime,
    client_rt: tokio::runtime::Runtime,
}

const WEB: &str = "10.96.0.10";
const DNS: &str = "10.96.0.20";

impl Side {
    fn start(name: &'static str, backend: &[&str]) -> Side {
        // The client is a pod on the same node, as most service traffic is: outside clients
        // are masqueraded on the kernel path, and the endpoint's TIME_WAIT entries then meet
        // reused NAT ports, which slows the kernel path's connection rate down for reasons
        // that have nothing to do with the proxy.
        let topo = Topology::builder().pod("srv", 0).pod("cli", 0).build();
        let srv = IpAddr::from(topo.pod("srv").ip4);
        let services =
            [Svc::new("web", WEB).endpoint(srv, "node-a"), Svc::new("dns", DNS).udp(53).endpoint(srv, "node-a")];
        let server_rt = load::runtime_in(topo.pod("srv").ns.name(), 1);
        let servers = load::Servers::start(&server_rt, TARGET_PORT);
        let client_rt = load::runtime_in(topo.pod("cli").ns.name(), 2);
        // The agent's default sync period (30 s), as a node runs it: the tests' 300 ms would
        // run canary checks (iptables processes) several times a second beside the load.
        let options = cluster::Options { sync_period: "30s", ..cluster::Options::default() };
        let cluster = Cluster::start_full(topo, &services, backend, options);
        Side { name, cluster, servers, _server_rt: server_rt, client_rt }
    }

    fn client(&self) -> &str {
        self.cluster.topo.pod("cli").ns.name()
    }

    fn web(&self) -> SocketAddr {
        SocketAddr::new(WEB.parse().unwrap(), 80)
    }

    fn dns(&self) -> SocketAddr {
        SocketAddr::new(DNS.parse().unwrap(), 53)
    }

    fn dataplane_rss(&self) -> u64 {
        self.cluster.dataplane_pid(0).map_or(0, load::rss)
    }

    fn dataplane_cpu(&self) -> Duration {
        self.cluster.dataplane_pid(0).map_or(Duration::ZERO, load::cpu_time)
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn gbit(bytes_per_s: f64) -> String {
    format!("{:.2} Gbit/s", bytes_per_s * 8.0 / 1e9)
}

fn bench_throughput(a: &Args, sides: &[Side], streams: usize) -> Vec<f64> {
    let d = Duration::from_secs_f64(a.seconds);
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    for _ in 0..a.rounds {
        for (i, s) in sides.iter().enumerate() {
            per[i].push(load::throughput(s.client(), &s.servers.sunk, s.web(), streams, d));
        }
    }
    per.iter_mut().map(|v| median(v)).collect()
}

/// Sorted latencies of every round together.
fn bench_latency(a: &Args, sides: &[Side], fresh: bool) -> Vec<Vec<Duration>> {
    let mut per: Vec<Vec<Duration>> = vec![Vec::new(); sides.len()];
    for _ in 0..a.rounds {
        for (i, s) in sides.iter().enumerate() {
            per[i].extend(load::latencies(s.client(), s.web(), a.rate, a.requests, fresh));
        }
    }
    per.iter_mut().for_each(|v| v.sort());
    per
}

/// Per side: (connections/s, failures, connections per second of the dataplane's CPU time).
fn bench_conn_rate(a: &Args, sides: &[Side]) -> Vec<(f64, u64, f64)> {
    let d = Duration::from_secs_f64(a.seconds);
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    let mut per_cpu: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    let mut failed = vec![0u64; sides.len()];
    for _ in 0..a.rounds {
        for (i, s) in sides.iter().enumerate() {
            let cpu = s.dataplane_cpu();
            let (rate, f) = load::connection_rate(&s.client_rt, s.web(), a.concurrency, d);
            let used = s.dataplane_cpu().saturating_sub(cpu).as_secs_f64();
            per[i].push(rate);
            per_cpu[i].push(if used > 0.0 { rate * a.seconds / used } else { f64::INFINITY });
            failed[i] += f;
        }
    }
    per.iter_mut().zip(&mut per_cpu).zip(failed).map(|((r, c), f)| (median(r), f, median(c))).collect()
}

/// (dataplane RSS, kernel slab) added per idle TCP connection and per UDP flow.
fn bench_memory(a: &Args, s: &Side) -> [(f64, f64); 2] {
    let settle = || std::thread::sleep(Duration::from_millis(300));
    settle();
    let (rss0, slab0) = (s.dataplane_rss(), load::slab());
    let conns = load::idle_connections(&s.client_rt, s.web(), a.idle);
    settle();
    let (rss1, slab1) = (s.dataplane_rss(), load::slab());
    drop(conns);
    settle();
    let (rss2, slab2) = (s.dataplane_rss(), load::slab());
    let flows = load::udp_flows(s.client(), s.dns(), a.flows);
    settle();
    let (rss3, slab3) = (s.dataplane_rss(), load::slab());
    drop(flows);
    let per = |after: u64, before: u64, n: usize| (after as f64 - before as f64) / n as f64;
    [(per(rss1, rss0, a.idle), per(slab1, slab0, a.idle)), (per(rss3, rss2, a.flows), per(slab3, slab2, a.flows))]
}

fn main() {
    let a = parse_args();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "userspace{}: {a:?}, {cores} cores",
        if a.smoke { " (smoke run; pass --bench for the real one)" } else { "" }
    );
    if !netns::require_root_and_netns() {
        return;
    }
    load::raise_fd_limit();
    let threads = a.threads.to_string();
    let sides = [
        Side::start("kernel DNAT", &["--backend", "iptables"]),
        Side::start("userspace", &["--backend", "userspace", "--userspace-threads", &threads]),
    ];
    println!(
        "topology: client pod 10.244.1.3 -> node-a (the dataplane) -> pod 10.244.1.2, service {WEB}:80 / {DNS}:53"
    );

    let part = |name: &str| a.only.is_empty() || a.only.iter().any(|o| o == name);
    // First, while no earlier connection lingers in TIME_WAIT on either side.
    if part("memory") {
        memory(&a, &sides);
    }
    if part("throughput") {
        throughput(&a, &sides);
    }
    if part("latency") {
        latency(&a, &sides);
    }
    if part("rate") {
        rate(&a, &sides);
    }
}

fn memory(a: &Args, sides: &[Side]) {
    println!("\n0. memory ({} idle TCP connections, {} UDP flows)", a.idle, a.flows);
    let kernel = bench_memory(a, &sides[0]);
    let user = bench_memory(a, &sides[1]);
    println!(
        "   per idle TCP connection: dataplane RSS +{:.0} B; kernel slab +{:.0} B (kernel DNAT path: +{:.0} B)",
        user[0].0, user[0].1, kernel[0].1
    );
    println!(
        "   per UDP flow:            dataplane RSS +{:.0} B; kernel slab +{:.0} B (kernel DNAT path: +{:.0} B)",
        user[1].0, user[1].1, kernel[1].1
    );
    println!(
        "   (slab is machine-wide: other processes add noise; the kernel DNAT figures are the same clients and servers without the proxy)"
    );
}

/// One stream shows what one connection gets: on the kernel path the client and the server
/// each have a core, through the proxy a third party does both connections' TCP work. As many
/// streams as cores show what the node's CPUs get, busy on both paths.
fn throughput(a: &Args, sides: &[Side]) {
    for &streams in &a.streams {
        let t = bench_throughput(a, sides, streams);
        let ratio = t[1] / t[0];
        println!("\n1. bulk TCP throughput, {streams} stream(s), {} s, median of {} rounds", a.seconds, a.rounds);
        for (s, v) in sides.iter().zip(&t) {
            println!("   {:<12} {}", s.name, gbit(*v));
        }
        println!(
            "   userspace / kernel = {:.2} (target >= {TARGET_THROUGHPUT_RATIO}) {}",
            ratio,
            verdict(ratio >= TARGET_THROUGHPUT_RATIO)
        );
    }
}

fn latency(a: &Args, sides: &[Side]) {
    for (fresh, what) in [(false, "on one connection"), (true, "one new connection per request")] {
        let l = bench_latency(a, sides, fresh);
        println!(
            "\n2. request/response latency (64 B each way) {what}, {} req/s, {} requests x {} rounds",
            a.rate, a.requests, a.rounds
        );
        for (s, v) in sides.iter().zip(&l) {
            println!(
                "   {:<12} p50 {}  p90 {}  p99 {}  p99.9 {}",
                s.name,
                us(percentile(v, 0.5)),
                us(percentile(v, 0.9)),
                us(percentile(v, 0.99)),
                us(percentile(v, 0.999))
            );
        }
        // Signed: in a noisy run the kernel path's tail can be the longer one.
        let added = |p: f64| percentile(&l[1], p).as_secs_f64() * 1e6 - percentile(&l[0], p).as_secs_f64() * 1e6;
        println!(
            "   added by userspace: p50 {:.0} µs  p99 {:.0} µs (target <= {}) {}",
            added(0.5),
            added(0.99),
            us(TARGET_ADDED_P99),
            verdict(added(0.99) <= TARGET_ADDED_P99.as_secs_f64() * 1e6)
        );
    }
}

fn rate(a: &Args, sides: &[Side]) {
    let r = bench_conn_rate(a, sides);
    println!(
        "\n3. connection rate, {} concurrent clients (connect, 1 byte, close), {} s, median of {} rounds",
        a.concurrency, a.seconds, a.rounds
    );
    for (s, (rate, failed, _)) in sides.iter().zip(&r) {
        println!("   {:<12} {:.0} connections/s ({failed} failed)", s.name, rate);
    }
    println!(
        "   userspace observed: {:.0}/s (target >= {TARGET_CONN_RATE}) {}",
        r[1].0,
        verdict(r[1].0 >= TARGET_CONN_RATE)
    );
    // The clients and servers share the cores with the proxy (the kernel path shows what they
    // alone allow); per second of its own CPU time, the proxy's capacity.
    println!(
        "   userspace capacity: {:.0} connections per second of proxy CPU time {}",
        r[1].2,
        verdict(r[1].2 >= TARGET_CONN_RATE)
    );
}
