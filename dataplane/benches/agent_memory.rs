//! The agent's memory and cold start at full size: a real `kpx-dataplane` process (iptables
//! backend, in a throwaway network namespace) subscribes to an in-process controlplane serving
//! a synthetic cluster. Prints the agent's resident memory (VmRSS, and VmHWM: the peak) after the
//! snapshot is applied and after N endpoint changes, and the cold start (process start to the
//! snapshot's ACK) next to a bare `iptables-restore` of the same ruleset into an empty namespace,
//! timed in the same run: `--rounds` times each, in turn (a restore of this size varies by 30%
//! from one run to the next on a shared machine), medians compared. Prints figures and
//! PASS/MISS against the targets; asserts nothing.
//!
//! `cargo bench -p kpx-dataplane --bench agent_memory -- [--services 10000] [--endpoints 100000]
//! [--changes 1000] [--variant nft|legacy] [--rounds 3] [--allocator-default]`
//!
//! Without `--bench` (under `cargo test --all-targets`) it only checks its arguments. Needs root
//! and `ip netns`; touches only the namespaces it creates (`kpxmem-PID-*`).

use kpx_controlplane::cache::CacheConfig;
use kpx_controlplane::model::*;
use kpx_controlplane::server::SyncConfig;
use kpx_controlplane::source::ChannelSource;
use kpx_proto::v1 as pb;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const TARGET_RSS_MIB: f64 = 64.0;
const TARGET_COLD_START_RATIO: f64 = 1.2;
struct Args {
    services: usize,
    endpoints: usize,
    changes: usize,
    variant: String,
    rounds: usize,
    purge_at_once: bool,
    smoke: bool,
}

fn parse_args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut a = Args {
        services: 10_000,
        endpoints: 100_000,
        changes: 1_000,
        variant: "nft".into(),
        rounds: 3,
        purge_at_once: true,
        smoke: !argv.iter().any(|x| x == "--bench"),
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value")).clone();
        match flag.as_str() {
            "--services" => a.services = value().parse().expect("--services N"),
            "--endpoints" => a.endpoints = value().parse().expect("--endpoints N"),
            "--changes" => a.changes = value().parse().expect("--changes N"),
            "--variant" => a.variant = value(),
            "--rounds" => a.rounds = value().parse::<usize>().expect("--rounds N").max(1),
            "--allocator-default" => a.purge_at_once = false,
            _ => {}
        }
    }
    assert!(matches!(a.variant.as_str(), "nft" | "legacy"), "--variant nft|legacy");
    a
}

fn node_name(round: usize) -> String {
    format!("node-{round}")
}

fn pod_ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a80_0000 + n))
}

fn endpoint(n: u32) -> SliceEndpoint {
    SliceEndpoint {
        ip: pod_ip(n),
        ready: true,
        serving: true,
        terminating: false,
        node_name: Some(format!("node-{}", n % 50)),
        zone: None,
        zone_hints: None,
        node_hints: None,
    }
}

/// One ClusterIP service per slice, endpoints spread evenly; every 20th a NodePort.
fn cluster(a: &Args) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut next = 0u32;
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..a.services {
        let key = ServiceKey::new(format!("ns-{}", i % 50), format!("svc-{i}"));
        let node_port = i % 20 == 0;
        services.push(Service {
            key: key.clone(),
            service_type: if node_port { ServiceType::NodePort } else { ServiceType::ClusterIp },
            cluster_ips: vec![IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i as u32))],
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: if node_port { 30000 + (i % 2000) as u16 } else { 0 },
            }],
            session_affinity_timeout: None,
            external_policy_local: false,
            internal_policy_local: false,
            health_check_node_port: 0,
            topology_aware: false,
        });
        let count = a.endpoints / a.services + usize::from(i < a.endpoints % a.services);
        let endpoints = (0..count)
            .map(|_| {
                next += 1;
                endpoint(next)
            })
            .collect();
        slices.push(EndpointSlice {
            key: ServiceKey::new(key.namespace.clone(), format!("{}-abcde", key.name)),
            service: key,
            family: IpFamily::V4,
            ports: vec![SlicePort { name: "http".into(), protocol: Protocol::Tcp, port: 8080 }],
            endpoints,
            trigger_time: None,
        });
    }
    (services, slices)
}

/// (VmRSS, VmHWM) of a process, in MiB.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        let ok = Command::new("ip").args(["netns", "add", &name]).status().is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name} (needs root)");
        Netns(name)
    }

    fn exec(&self, argv: &[&str], stdin: Option<&str>) -> Duration {
        let started = Instant::now();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(argv)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::null())
            .spawn()
            .expect("ip netns exec");
        if let Some(text) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        assert!(child.wait().unwrap().success(), "{argv:?} failed in {}", self.0);
        started.elapsed()
    }

    fn output(&self, argv: &[&str]) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.0]).args(argv).output().expect("ip netns exec");
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn node_status(url: &str, node: &str) -> Option<pb::NodeStatus> {
    let mut client = pb::inspect_client::InspectClient::connect(url.to_string()).await.ok()?;
    let nodes = client.list_nodes(pb::ListNodesRequest {}).await.ok()?.into_inner().nodes;
    nodes.into_iter().find(|n| n.name == node)
}

/// Waits until the node ACKed its desired version and is not behind.
async fn wait_current(url: &str, node: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if let Some(n) = node_status(url, node).await
            && n.connected
            && !n.desired_version.is_empty()
            && n.acked_version == n.desired_version
        {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "the agent did not catch up within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return String::new() };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn main() {
    let a = parse_args();
    if a.smoke {
        println!("agent_memory: smoke run (arguments only); pass --bench for the measurement");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run(a));
}

async fn run(a: Args) {
    let (services, mut slices) = cluster(&a);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(kpx_controlplane::serve(
        listener,
        Box::new(ChannelSource(rx)),
        Arc::new(Skips::default()),
        CacheConfig::default(),
        SyncConfig::default(),
        std::future::pending(),
    ));
    // One node per round: each round's agent starts cold, as a node the controlplane has never
    // seen ACK (the same cluster, so the same rules).
    for node in (0..a.rounds).map(node_name) {
        tx.send(ClusterEvent::Node(node.clone(), Some(Node { name: node, zone: None, addresses: vec![] }))).unwrap();
    }
    for s in &services {
        tx.send(ClusterEvent::Service(s.key.clone(), Some(s.clone()))).unwrap();
    }
    for s in &slices {
        tx.send(ClusterEvent::Slice(s.key.clone(), Some(s.clone()))).unwrap();
    }
    tx.send(ClusterEvent::Synced).unwrap();
    println!(
        "agent_memory: {} services, {} endpoints, iptables-{} backend, {} changes",
        a.services, a.endpoints, a.variant, a.changes
    );

    // The controlplane has the cluster before the agent starts: the cold start is the agent's.
    let started = Instant::now();
    while node_status(&url, &node_name(0)).await.is_none_or(|n| n.desired_version.is_empty()) {
        assert!(started.elapsed() < Duration::from_secs(300), "the controlplane did not sync");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tool = |t: &str| format!("iptables-{}{}", a.variant, t);
    // The agent runs iptables inside its namespace through its --netns option; iptables-nft or
    // -legacy is chosen by putting the variant's tools first on its PATH.
    let bin_dir = tempfile::tempdir().unwrap();
    for t in ["", "-save", "-restore"] {
        std::os::unix::fs::symlink(format!("/usr/sbin/{}", tool(t)), bin_dir.path().join(format!("iptables{t}")))
            .unwrap();
        std::os::unix::fs::symlink(
            format!("/usr/sbin/ip6tables-{}{t}", a.variant),
            bin_dir.path().join(format!("ip6tables{t}")),
        )
        .unwrap();
    }
    let path = format!("{}:{}", bin_dir.path().display(), std::env::var("PATH").unwrap_or_default());
    // A bare restore of the same ruleset into an empty namespace: the floor of a cold start. On
    // legacy with --noflush, as kpx and kube-proxy restore (other components' chains in the
    // table must survive); on nft without it, since one --noflush restore of a ruleset this size
    // is superlinear there (minutes; kpx splits it, see docs/performance.md).
    let noflush = a.variant == "legacy";
    let restore = tool("-restore");
    let argv: Vec<&str> = if noflush { vec![&restore, "--noflush"] } else { vec![&restore] };

    // Round by round: an agent starts cold in a namespace of its own, then the ruleset it wrote
    // is restored bare into another. The last round's agent stays for the changes below.
    let (mut colds, mut bares, mut full_syncs) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    for round in 0..a.rounds {
        drop(last.take()); // the previous agent stopped, its namespace deleted
        let node = node_name(round);
        let ns = Netns::new(format!("kpxmem-{}-{}-{round}", std::process::id(), a.variant));
        let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let started = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_kpx-dataplane"))
            .args(["--node", &node, "--controlplane", &url, "--backend", "iptables", "--netns", &ns.0])
            .args(["--cluster-cidr", "10.128.0.0/9", "--node-ip", "192.168.0.2", "--admin-listen", ""])
            .args(["--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", &metrics_addr.to_string()])
            .env("PATH", &path)
            .env("RUST_LOG", "warn")
            // As the DaemonSet runs it (deploy/kustomize/base/dataplane.yaml); --allocator-default
            // leaves it out, to see mimalloc's default.
            .envs(a.purge_at_once.then_some(("MIMALLOC_PURGE_DELAY", "0")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn kpx-dataplane");
        let agent = Agent(child);
        wait_current(&url, &node, Duration::from_secs(600)).await;
        colds.push(started.elapsed());
        let metrics = scrape(metrics_addr).await;
        full_syncs.push(
            metrics
                .lines()
                .find_map(|l| l.strip_prefix("kubeproxy_sync_full_proxy_rules_duration_seconds_sum "))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0),
        );
        let (rss, hwm) = memory(agent.0.id());
        println!(
            "round {}: after the snapshot: RSS {rss:.1} MiB, peak {hwm:.1} MiB   [target RSS <= {TARGET_RSS_MIB} MiB: {}]",
            round + 1,
            verdict(rss <= TARGET_RSS_MIB)
        );
        let nat = ns.output(&[&tool("-save"), "-t", "nat"]);
        let filter = ns.output(&[&tool("-save"), "-t", "filter"]);
        let fresh = Netns::new(format!("kpxmem-{}-{}-bare{round}", std::process::id(), a.variant));
        bares.push(fresh.exec(&argv, Some(&format!("{filter}{nat}"))));
        println!(
            "   cold start to the snapshot's ACK {:.2} s (of which the first full sync, render and restore, {:.2} s); bare {} of the same ruleset {:.2} s",
            colds[round].as_secs_f64(),
            full_syncs[round],
            argv.join(" "),
            bares[round].as_secs_f64()
        );
        last = Some((agent, ns, metrics_addr, node));
    }
    let (agent, ns, metrics_addr, node) = last.expect("one round at least");
    let pid = agent.0.id();
    let median = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2]
    };
    let (cold, bare) = (median(&colds), median(&bares));
    let ratio = cold.as_secs_f64() / bare.as_secs_f64();
    println!(
        "cold start to the snapshot's ACK: median {:.2} s vs a bare {} of the same ruleset: median {:.2} s ({} rounds) -> {ratio:.2}x   [target <= {TARGET_COLD_START_RATIO}x: {}]",
        cold.as_secs_f64(),
        argv.join(" "),
        bare.as_secs_f64(),
        a.rounds,
        verdict(ratio <= TARGET_COLD_START_RATIO)
    );

    // N endpoint changes, one at a time (each ACKed before the next, as a busy cluster's).
    let mut next = a.endpoints as u32 + 1;
    let change_started = Instant::now();
    let mut trend = Vec::new();
    for i in 0..a.changes {
        let n = slices.len();
        let slice = &mut slices[(i * 7919) % n];
        if i % 2 == 0 {
            next += 1;
            slice.endpoints.push(endpoint(next));
        } else {
            slice.endpoints.remove(0);
        }
        tx.send(ClusterEvent::Slice(slice.key.clone(), Some(slice.clone()))).unwrap();
        wait_current(&url, &node, Duration::from_secs(60)).await;
        // The trend, to tell growth that levels off from a leak.
        if (i + 1) % 100 == 0 && i + 1 < a.changes {
            trend.push(format!("{}: {:.1}", i + 1, memory(pid).0));
        }
    }
    if !trend.is_empty() {
        println!("RSS (MiB) after so many changes: {}", trend.join(", "));
    }
    let per_change = change_started.elapsed() / a.changes.max(1) as u32;
    let (rss, hwm) = memory(pid);
    println!(
        "after {} changes ({:.1} ms each end to end): RSS {rss:.1} MiB, peak {hwm:.1} MiB   [target RSS <= {TARGET_RSS_MIB} MiB: {}]",
        a.changes,
        per_change.as_secs_f64() * 1000.0,
        verdict(rss <= TARGET_RSS_MIB)
    );
    // The agent's own figure for a change (its partial syncs), next to the smallest change a
    // restore can make to the same loaded table (flush and fill one chain of its own): on legacy
    // every restore that changes anything rewrites the whole table, so that is the floor.
    let text = scrape(metrics_addr).await;
    let value = |series: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let sum = value("kubeproxy_sync_partial_proxy_rules_duration_seconds_sum").unwrap_or(0.0);
    let count = value("kubeproxy_sync_partial_proxy_rules_duration_seconds_count").unwrap_or(0.0);
    let one = "*nat\n:KPX-BENCH-FLOOR - [0:0]\n-A KPX-BENCH-FLOOR -j RETURN\nCOMMIT\n";
    let floors: Vec<Duration> = (0..3).map(|_| ns.exec(&[&tool("-restore"), "--noflush"], Some(one))).collect();
    let floor = floors.iter().min().copied().unwrap_or_default();
    println!(
        "partial sync in the agent: mean {:.1} ms over {count} syncs; a one-rule iptables-{}-restore --noflush into the loaded table: {:.1} ms -> {:.2}x",
        sum / count.max(1.0) * 1000.0,
        a.variant,
        floor.as_secs_f64() * 1000.0,
        sum / count.max(1.0) / floor.as_secs_f64()
    );
    drop(agent);
}
