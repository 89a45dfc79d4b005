//! Fan-out benchmark: one controlplane in this process on loopback, fed a synthetic cluster
//! from a channel, and N simulated nodes, each a real Sync stream driven by the dataplane's
//! `Session` with a backend that does nothing. Prints figures; asserts nothing.
//!
//! `cargo bench -p kpx-controlplane --bench fanout -- [--nodes N] [--services S]
//! [--endpoints E] [--changes C] [--nodes-per-channel K] [--max-rss-gib G] [--seed X] [--light]
//! [--controlplane-process] [--controlplane-memory]`
//!
//! With `--controlplane-process` the controlplane runs in a child process (this binary again,
//! `fanout/cp.rs`): its memory and CPU time are then measured on their own, throughout.
//!
//! Phases: the snapshot to every node, one-endpoint changes, memory, and a reconnect storm (the
//! controlplane restarted with nothing changed: `fanout/restart.rs`).
//!
//! Without `--bench` (that is, under `cargo test --all-targets`) it runs a tiny smoke
//! configuration so it stays a quick sanity check.
//!
//! Nodes and controlplane share the process, so the memory figures include the nodes' copies
//! of their state; the figure taken before any node connects is the cluster model alone.

use kpx_auth::client::AuthChannel;
use kpx_controlplane::model::*;
use kpx_dataplane::stream::{NoBackend, NodeIdentity, Session, SyncEvent};
use kpx_proto::v1 as pb;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

// The controlplane binary's allocator (controlplane/src/main.rs), here for both the child
// controlplane and the simulated nodes.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "fanout/cp.rs"]
mod cp;
#[path = "fanout/light.rs"]
mod light;
#[path = "fanout/restart.rs"]
mod restart;

/// Targets the design is held to (printed, never asserted).
const TARGET_P99: Duration = Duration::from_millis(250);
const TARGET_MEMORY: u64 = 1 << 30;
const TARGET_CHANGE_BYTES: f64 = 256.0;
const TARGET_STORM: Duration = Duration::from_secs(5);
/// Every node's snapshot delivered and verified, at 5,000 nodes on the full-size cluster.
const TARGET_SNAPSHOTS: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Args {
    nodes: usize,
    services: usize,
    endpoints: usize,
    changes: usize,
    nodes_per_channel: usize,
    max_rss_gib: f64,
    seed: u64,
    smoke: bool,
    /// Measure the controlplane alone: N Node objects, no streams.
    controlplane_memory: bool,
    /// Light simulated nodes (hashes only, shared views), one in 1,000 a full-state node.
    light: bool,
    /// The controlplane in a child process (`fanout/cp.rs`).
    controlplane_process: bool,
    /// Set in that child: the address to serve on, and the changes to replay first.
    serve: Option<std::net::SocketAddr>,
    replay_changes: usize,
}

impl Args {
    /// What the child controlplane needs to build the same cluster.
    fn child_args(&self) -> Vec<String> {
        let mut v = vec!["--bench".to_string()];
        for (flag, value) in [
            ("--nodes", self.nodes as u64),
            ("--services", self.services as u64),
            ("--endpoints", self.endpoints as u64),
            ("--seed", self.seed),
        ] {
            v.push(flag.into());
            v.push(value.to_string());
        }
        v
    }
}

fn parse_args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !argv.iter().any(|a| a == "--bench");
    let mut a = if smoke {
        Args {
            nodes: 3,
            services: 20,
            endpoints: 200,
            changes: 5,
            nodes_per_channel: 50,
            max_rss_gib: 12.0,
            seed: 1,
            smoke,
            controlplane_memory: false,
            light: false,
            controlplane_process: false,
            serve: None,
            replay_changes: 0,
        }
    } else {
        Args {
            nodes: 1000,
            services: 10_000,
            endpoints: 100_000,
            changes: 50,
            nodes_per_channel: 50,
            max_rss_gib: 12.0,
            seed: 1,
            smoke,
            controlplane_memory: false,
            light: false,
            controlplane_process: false,
            serve: None,
            replay_changes: 0,
        }
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> String { it.next().unwrap_or_else(|| panic!("{name} needs a value")).clone() };
        match flag.as_str() {
            "--nodes" => a.nodes = value(flag).parse().expect("--nodes N"),
            "--services" => a.services = value(flag).parse().expect("--services S"),
            "--endpoints" => a.endpoints = value(flag).parse().expect("--endpoints E"),
            "--changes" => a.changes = value(flag).parse().expect("--changes C"),
            "--nodes-per-channel" => a.nodes_per_channel = value(flag).parse().expect("--nodes-per-channel K"),
            "--max-rss-gib" => a.max_rss_gib = value(flag).parse().expect("--max-rss-gib G"),
            "--seed" => a.seed = value(flag).parse().expect("--seed X"),
            "--controlplane-memory" => a.controlplane_memory = true,
            "--light" => a.light = true,
            "--controlplane-process" => a.controlplane_process = true,
            cp::SERVE_FLAG => a.serve = Some(value(flag).parse().expect("--serve-controlplane ADDR")),
            "--replay-changes" => a.replay_changes = value(flag).parse().expect("--replay-changes N"),
            // cargo passes --bench; libtest-style filters and flags are ignored.
            _ => {}
        }
    }
    assert!(a.nodes > 0 && a.services > 0 && a.endpoints >= a.services, "need nodes, services and endpoints");
    a.nodes_per_channel = a.nodes_per_channel.max(1);
    a
}

/// The synthetic cluster: one slice per service, endpoints round-robin over the nodes.
struct Cluster {
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    next_ip: u32,
}

fn node_name(i: usize) -> String {
    format!("node-{i}")
}

fn pod_ip(n: u32) -> IpAddr {
    // 10.128.0.0/9 and up: room for 8M endpoints.
    IpAddr::V4(Ipv4Addr::from(0x0a80_0000 + n))
}

fn endpoint(n: u32, nodes: usize) -> SliceEndpoint {
    SliceEndpoint {
        ip: pod_ip(n),
        ready: true,
        serving: true,
        terminating: false,
        node_name: Some(node_name(n as usize % nodes)),
        zone: None,
        zone_hints: None,
        node_hints: None,
    }
}

fn build_cluster(a: &Args) -> Cluster {
    let (mut services, mut slices) = (Vec::with_capacity(a.services), Vec::with_capacity(a.services));
    let mut next_ip = 0u32;
    for i in 0..a.services {
        let key = ServiceKey::new(format!("ns-{}", i % 50), format!("svc-{i}"));
        // Every 20th service (5%) is a NodePort with externalTrafficPolicy: Local.
        let local = i % 20 == 0;
        services.push(Service {
            key: key.clone(),
            service_type: if local { ServiceType::NodePort } else { ServiceType::ClusterIp },
            cluster_ips: vec![IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i as u32))],
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: if local { 30000 + (i % 2000) as u16 } else { 0 },
            }],
            session_affinity_timeout: None,
            external_policy_local: local,
            internal_policy_local: false,
            health_check_node_port: 0,
            topology_aware: false,
        });
        let count = a.endpoints / a.services + usize::from(i < a.endpoints % a.services);
        let endpoints = (0..count)
            .map(|_| {
                next_ip += 1;
                endpoint(next_ip, a.nodes)
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
    Cluster { services, slices, next_ip }
}

impl Cluster {
    /// One endpoint added, removed or its readiness flipped in a random slice. Returns the slice
    /// index and what was done.
    fn change(&mut self, rng: &mut StdRng, nodes: usize) -> (usize, &'static str) {
        let i = rng.random_range(0..self.slices.len());
        let slice = &mut self.slices[i];
        let what = match rng.random_range(0..3) {
            1 if slice.endpoints.len() > 1 => {
                let j = rng.random_range(0..slice.endpoints.len());
                slice.endpoints.remove(j);
                "remove"
            }
            2 if !slice.endpoints.is_empty() => {
                let j = rng.random_range(0..slice.endpoints.len());
                let e = &mut slice.endpoints[j];
                e.ready = !e.ready;
                e.serving = e.ready;
                "flip"
            }
            _ => {
                self.next_ip += 1;
                slice.endpoints.push(endpoint(self.next_ip, nodes));
                "add"
            }
        };
        (i, what)
    }
}

/// Resident and peak memory of this process (kB values of /proc/self/status, in bytes).
fn memory() -> (u64, u64) {
    memory_of("/proc/self/status")
}

/// (VmRSS, VmHWM) in bytes from a /proc/PID/status file.
fn memory_of(path: &str) -> (u64, u64) {
    let status = std::fs::read_to_string(path).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

/// Stops the process before it eats the machine (the nodes' copies of the state grow with
/// nodes x endpoints, and every connecting node gets its own snapshot).
fn watchdog(limit_gib: f64) {
    let limit = (limit_gib * (1u64 << 30) as f64) as u64;
    std::thread::spawn(move || {
        loop {
            let (rss, _) = memory();
            if rss > limit {
                eprintln!("fanout: RSS {} exceeds --max-rss-gib {limit_gib}; aborting", mib(rss));
                std::process::exit(2);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Waits for `n` Applied events of the given kind; returns their wire bytes and the total time
/// the nodes spent applying. Any other event is an error.
async fn await_applied(
    rx: &mut mpsc::UnboundedReceiver<SyncEvent>,
    n: usize,
    want_full: bool,
    timeout: Duration,
) -> Result<(Vec<usize>, Duration), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut bytes = Vec::with_capacity(n);
    let mut applying = Duration::ZERO;
    while bytes.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return Err(format!("timed out with {}/{n} nodes applied", bytes.len())),
            Ok(None) => return Err("every node session ended".into()),
            Ok(Some(SyncEvent::Connected)) => {}
            Ok(Some(SyncEvent::Applied { full, wire_bytes, apply, .. })) if full == want_full => {
                bytes.push(wire_bytes);
                applying += apply;
            }
            Ok(Some(other)) => return Err(format!("unexpected event {other:?}")),
        }
    }
    Ok((bytes, applying))
}

/// Polls ListNodes until every node acknowledged its desired version.
async fn await_acked(
    inspect: &mut pb::inspect_client::InspectClient<AuthChannel>,
    n: usize,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let nodes = inspect.list_nodes(pb::ListNodesRequest {}).await.map_err(|e| e.to_string())?.into_inner().nodes;
        let done = nodes
            .iter()
            .filter(|s| s.connected && !s.desired_version.is_empty() && s.acked_version == s.desired_version)
            .count();
        if done >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{done}/{n} nodes acked"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn run(a: Args, cp_runtime: tokio::runtime::Handle) -> Result<(), String> {
    println!(
        "fanout{}: {} nodes, {} services, {} endpoints, {} changes, {} nodes per HTTP/2 connection, {} cores, the controlplane {}",
        if a.smoke { " (smoke run; pass --bench for the real one)" } else { "" },
        a.nodes,
        a.services,
        a.endpoints,
        a.changes,
        a.nodes_per_channel,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        if a.controlplane_process { "in a process of its own" } else { "in this process" },
    );
    let (rss_start, _) = memory();
    let mut cluster = build_cluster(&a);

    // The controlplane, in process, on loopback.
    // (A free port: bound once here, then released for the controlplane's own runtime.)
    let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?;
    let url = format!("http://{addr}");
    let mut cp = cp::Cp::start(&a, &cp_runtime, addr, &cluster).await?;
    let mut inspect = {
        let channel = kpx_dataplane::stream::connect(&url, Duration::from_secs(5)).await.map_err(|e| e.to_string())?;
        pb::inspect_client::InspectClient::new(channel).max_decoding_message_size(256 << 20)
    };
    // Events are applied in order: once every Node is listed, so is everything before it.
    let deadline = Instant::now() + Duration::from_secs(120);
    while inspect.list_nodes(pb::ListNodesRequest {}).await.map_err(|e| e.to_string())?.into_inner().nodes.len()
        < a.nodes
    {
        if Instant::now() > deadline {
            return Err("the controlplane did not take in the cluster within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (rss_model, _) = memory();
    let cp_model = cp.memory();
    if a.controlplane_memory {
        return controlplane_memory(&a, &mut inspect, cp, rss_start, rss_model).await;
    }

    // The nodes subscribe before the cache publishes, so the snapshot phase starts at Synced.
    let channels = a.nodes.div_ceil(a.nodes_per_channel);
    let mut conns = Vec::with_capacity(channels);
    for _ in 0..channels {
        conns.push(kpx_dataplane::stream::connect(&url, Duration::from_secs(5)).await.map_err(|e| e.to_string())?);
    }
    let (node_tx, mut node_rx) = mpsc::unbounded_channel::<SyncEvent>();
    let mut sessions = Vec::with_capacity(a.nodes);
    let shared = Arc::new(light::Shared::default());
    for i in 0..a.nodes {
        if a.light && i % 1000 != 0 {
            let (channel, shared, events) = (conns[i / a.nodes_per_channel].clone(), shared.clone(), node_tx.clone());
            sessions.push(tokio::spawn(async move {
                if let Err(e) = light::run(node_name(i), channel, shared, events).await {
                    eprintln!("light node {i}: {e}");
                }
            }));
            continue;
        }
        let identity = NodeIdentity {
            node_name: node_name(i),
            backend: "bench".into(),
            ip_families: vec!["IPv4".into()],
            zone: String::new(),
        };
        let mut session = Session::new(identity, NoBackend);
        session.events = Some(node_tx.clone());
        let channel = conns[i / a.nodes_per_channel].clone();
        sessions.push(tokio::spawn(async move {
            // As the agent: resubscribe after the stream ends, with backoff and jitter.
            let mut backoff = kpx_dataplane::stream::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
            loop {
                session.run(channel.clone()).await;
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }));
    }
    drop(node_tx);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let nodes = inspect.list_nodes(pb::ListNodesRequest {}).await.map_err(|e| e.to_string())?.into_inner().nodes;
        if nodes.iter().filter(|n| n.connected).count() >= a.nodes {
            break;
        }
        if Instant::now() > deadline {
            return Err("nodes did not all subscribe within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (rss_subscribed, _) = memory();
    let cp_subscribed = cp.memory();

    // 1. The initial snapshot to every node.
    let started = Instant::now();
    let cp_cpu_before = cp.cpu();
    cp.synced().await?;
    let (snapshot_bytes, snapshot_applying) =
        await_applied(&mut node_rx, a.nodes, true, Duration::from_secs(1800)).await?;
    let snapshot_time = started.elapsed();
    let snapshot_cp_cpu = cp.cpu().saturating_sub(cp_cpu_before);
    let (rss_snapshots, hwm_snapshots) = memory();
    let cp_snapshots = cp.memory();

    // 5a. Baseline: one node's whole state, encoded once.
    let state = inspect
        .get_node_state(pb::GetNodeStateRequest { node_name: node_name(0) })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let mut whole = pb::Update { full: true, version: state.version.clone(), ..Default::default() };
    let mut naive_by_service: HashMap<String, usize> = HashMap::new();
    for s in state.services {
        let service = s.service.unwrap_or_default();
        let key = format!("{}/{}", service.namespace, service.name);
        let one = pb::Update {
            services_upserted: vec![service.clone()],
            endpoints_upserted: s.endpoints.clone(),
            ..Default::default()
        };
        naive_by_service.insert(key, one.encoded_len());
        whole.services_upserted.push(service);
        whole.endpoints_upserted.extend(s.endpoints);
    }
    let mut encode = Duration::MAX;
    let mut encoded_len = 0;
    for _ in 0..5 {
        let t = Instant::now();
        encoded_len = std::hint::black_box(whole.encode_to_vec()).len();
        encode = encode.min(t.elapsed());
    }
    drop(whole);

    // 2./3. Single-endpoint changes, one at a time.
    let mut rng = StdRng::seed_from_u64(a.seed);
    let (mut applied_lat, mut acked_lat) = (Vec::new(), Vec::new());
    let (mut change_bytes, mut naive_bytes) = (Vec::new(), Vec::new());
    let mut kinds: HashMap<&str, usize> = HashMap::new();
    for _ in 0..a.changes {
        let (i, what) = cluster.change(&mut rng, a.nodes);
        *kinds.entry(what).or_default() += 1;
        let slice = cluster.slices[i].clone();
        naive_bytes.push(naive_by_service.get(&slice.service.to_string()).copied().unwrap_or(0));
        let t = Instant::now();
        cp.changed(slice).await?;
        // Every change here alters the view every node shares, so every node is affected.
        let (bytes, _) = await_applied(&mut node_rx, a.nodes, false, Duration::from_secs(120)).await?;
        applied_lat.push(t.elapsed());
        await_acked(&mut inspect, a.nodes, Duration::from_secs(120)).await?;
        acked_lat.push(t.elapsed());
        change_bytes.extend(bytes);
    }
    let (rss_end, hwm_end) = memory();
    let cp_end = cp.memory();

    // Report.
    let n = a.nodes as f64;
    let snap_mean = snapshot_bytes.iter().sum::<usize>() as f64 / n;
    let snap_max = snapshot_bytes.iter().copied().max().unwrap_or(0);
    println!();
    println!(
        "1. initial snapshot, Synced -> every node applied it: {}   [target <= 60 s for 5,000 nodes at 10k/100k: {}{}]",
        ms(snapshot_time),
        verdict(snapshot_time <= TARGET_SNAPSHOTS),
        if a.nodes < 5000 || a.endpoints < 100_000 { ", measured smaller" } else { "" },
    );
    println!(
        "   snapshot bytes per node: mean {:.0}, max {snap_max} ({} total on loopback, {:.0} MB/s)",
        snap_mean,
        mib(snapshot_bytes.iter().sum::<usize>() as u64),
        snapshot_bytes.iter().sum::<usize>() as f64 / snapshot_time.as_secs_f64() / 1e6,
    );
    println!(
        "   vs every endpoint naming its service (the flat baseline below): {:.2} x its bytes",
        snap_mean / encoded_len as f64,
    );
    println!(
        "   baseline: one prost encode of node-0's whole state, flat ({} bytes), takes {}; fan-out = {:.1} x one encode ({:.2} x per node)",
        encoded_len,
        ms(encode),
        snapshot_time.as_secs_f64() / encode.as_secs_f64(),
        snapshot_time.as_secs_f64() / encode.as_secs_f64() / n,
    );
    println!(
        "   the controlplane's {} used {:.1} s of CPU in that time ({:.0}% of the phase's 2 x {:.1} s): its own cost of the {} snapshots",
        if a.controlplane_process { "process" } else { "threads" },
        snapshot_cp_cpu.as_secs_f64(),
        100.0 * snapshot_cp_cpu.as_secs_f64() / (2.0 * snapshot_time.as_secs_f64()),
        snapshot_time.as_secs_f64(),
        a.nodes,
    );
    println!(
        "   of which the nodes' Session::apply (state + hash check, no backend): {} in total, {} per node",
        ms(snapshot_applying),
        ms(snapshot_applying / a.nodes as u32),
    );
    applied_lat.sort();
    acked_lat.sort();
    println!(
        "2. {} one-endpoint changes ({}), send -> every node applied (SyncEvent::Applied; the ACK is sent right after):",
        a.changes,
        {
            let mut k: Vec<_> = kinds.iter().map(|(k, v)| format!("{v} {k}")).collect();
            k.sort();
            k.join(", ")
        }
    );
    if !applied_lat.is_empty() {
        let p99 = quantile(&applied_lat, 0.99);
        println!(
            "   p50 {}  p99 {}  max {}   [target p99 <= 250 ms at 5,000 nodes: {}{}]",
            ms(quantile(&applied_lat, 0.5)),
            ms(p99),
            ms(*applied_lat.last().expect("non-empty")),
            verdict(p99 <= TARGET_P99),
            if a.nodes < 5000 { ", measured at fewer nodes" } else { "" },
        );
        println!(
            "   send -> every ACK recorded (polling ListNodes every 2 ms after the above): p50 {}  p99 {}  max {}",
            ms(quantile(&acked_lat, 0.5)),
            ms(quantile(&acked_lat, 0.99)),
            ms(*acked_lat.last().expect("non-empty")),
        );
        let mean = change_bytes.iter().sum::<usize>() as f64 / change_bytes.len().max(1) as f64;
        let max = change_bytes.iter().copied().max().unwrap_or(0);
        let naive = naive_bytes.iter().sum::<usize>() as f64 / naive_bytes.len().max(1) as f64;
        println!(
            "3. bytes per node per one-endpoint change: mean {mean:.0}, max {max}   [target <= 256: {}]",
            verdict(max as f64 <= TARGET_CHANGE_BYTES)
        );
        println!(
            "   baseline: resending the whole changed service would be {naive:.0} bytes on average ({:.1} x the delta)",
            naive / mean.max(1.0)
        );
    }
    let hwm = hwm_end.max(hwm_snapshots);
    if let (Some(model), Some(subscribed), Some(snapshots), Some(end)) = (cp_model, cp_subscribed, cp_snapshots, cp_end)
    {
        println!("4. memory of the controlplane process alone:");
        println!(
            "   RSS with the cluster model taken in {}; every node subscribed {}; after the snapshots {}; after the changes {}",
            mib(model.0),
            mib(subscribed.0),
            mib(snapshots.0),
            mib(end.0)
        );
        println!(
            "   peak (VmHWM) throughout, the snapshots included: {}   [target <= 1 GiB: {}]",
            mib(end.1),
            verdict(end.1 <= TARGET_MEMORY)
        );
        println!("   this process (the {} simulated nodes): peak {}", a.nodes, mib(hwm));
    } else {
        print_shared_memory(&a, &shared, [rss_start, rss_model, rss_subscribed, rss_snapshots, rss_end], hwm);
    }
    // 5. Reconnect storm: the controlplane restarts with nothing changed.
    let storm = restart::storm(cp, &cluster, a.nodes, &mut node_rx, &mut inspect).await?;
    let (rss_storm, hwm_storm) = match storm.controlplane.memory() {
        Some(cp) => cp,
        None => memory(),
    };
    println!(
        "5. controlplane restarted on the same address, nothing changed; every node resubscribes with its applied version:"
    );
    println!(
        "   every node current again: {} after the old one stopped, {} after the new one's Synced   [target <= 5 s: {}]",
        ms(storm.since_stop),
        ms(storm.since_synced),
        verdict(storm.since_stop <= TARGET_STORM),
    );
    println!(
        "   sent to the nodes: {} updates, {} bytes in total ({:.1} B per node)   [target <= 1 KiB per node: {}]; {} reconnections",
        storm.updates,
        storm.bytes,
        storm.bytes as f64 / n,
        verdict(storm.bytes as f64 / n <= 1024.0),
        storm.reconnects,
    );
    match a.controlplane_process {
        true => println!(
            "   the new controlplane process: RSS after the storm {}, peak {} (the old one before the restart: {})",
            mib(rss_storm),
            mib(hwm_storm),
            mib(cp_end.map_or(rss_end, |m| m.0)),
        ),
        false => println!("   RSS after the storm: {} (before the restart: {})", mib(rss_storm), mib(rss_end)),
    }

    for s in sessions {
        s.abort();
    }
    storm.controlplane.stop().await
}

/// Memory when the controlplane and the simulated nodes share this process.
fn print_shared_memory(a: &Args, shared: &light::Shared, rss: [u64; 5], hwm: u64) {
    let [rss_start, rss_model, rss_subscribed, rss_snapshots, rss_end] = rss;
    println!("4. memory (controlplane and the {} simulated nodes share this process):", a.nodes);
    println!("   RSS at start {}", mib(rss_start));
    println!("   RSS with the cluster model taken in, before any node connects: {}", mib(rss_model));
    println!("   RSS with every node subscribed, before Synced: {}", mib(rss_subscribed));
    println!(
        "   RSS after the snapshots: {} ({}); after the changes: {}",
        mib(rss_snapshots),
        match a.light {
            true => format!(
                "light nodes hold hashes only, {} distinct service views shared; one node in 1,000 holds its full state",
                shared.views()
            ),
            false => "every node holds its own copy of its state".to_string(),
        },
        mib(rss_end)
    );
    println!(
        "   peak (VmHWM) {}   [target <= 1 GiB for the controlplane: {} for the whole process]",
        mib(hwm),
        verdict(hwm <= TARGET_MEMORY)
    );
    // Once per distinct view and Service entry, whatever the number of nodes.
    println!(
        "   of the controlplane's: encoded once and kept for every node (kpx_controlplane_encoded_cache_bytes) {}",
        mib(kpx_proto::encoded::cached_bytes().max(0) as u64)
    );
}

/// The controlplane alone, as it stands for a cluster of `a.nodes` nodes once published: the
/// model, the prepared services, the memoised views and a version per node. No node streams
/// (their buffers are bounded by the chunk size and the concurrent-snapshot limit).
async fn controlplane_memory(
    a: &Args,
    inspect: &mut pb::inspect_client::InspectClient<AuthChannel>,
    mut cp: cp::Cp,
    rss_start: u64,
    rss_model: u64,
) -> Result<(), String> {
    let started = Instant::now();
    cp.synced().await?;
    loop {
        let nodes = inspect.list_nodes(pb::ListNodesRequest {}).await.map_err(|e| e.to_string())?.into_inner().nodes;
        if nodes.len() >= a.nodes && nodes.iter().all(|n| !n.desired_version.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let publish = started.elapsed();
    // One node's full state computed on demand, as a snapshot would (memoises its views).
    let state = inspect
        .get_node_state(pb::GetNodeStateRequest { node_name: node_name(0) })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let endpoints: usize = state.services.iter().map(|s| s.endpoints.len()).sum();
    let (rss, hwm) = memory();
    println!("controlplane alone, {} nodes / {} services / {} endpoints:", a.nodes, a.services, endpoints);
    println!("   publish (Synced -> every node's version computed): {}", ms(publish));
    println!("   RSS at start {}, with the model {}, published {}", mib(rss_start), mib(rss_model), mib(rss));
    println!("   peak (VmHWM) {}   [target <= 1 GiB: {}]", mib(hwm), verdict(hwm <= 1 << 30));
    cp.stop().await
}

fn main() {
    let args = parse_args();
    if let Some(addr) = args.serve {
        let replay = args.replay_changes;
        if let Err(e) = cp::child_main(args, addr, replay) {
            eprintln!("fanout controlplane process: {e}");
            std::process::exit(1);
        }
        return;
    }
    watchdog(args.max_rss_gib);
    // The simulated nodes and the controlplane on runtimes of their own (2 threads each, as many
    // as there are cores), so that the controlplane's CPU time can be told from the nodes'.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sim-nodes")
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cp_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(cp::CP_THREADS)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // The smoke run tries both places for the controlplane.
    let places = if args.smoke { vec![false, true] } else { vec![args.controlplane_process] };
    for in_child in places {
        let started = Instant::now();
        let args = Args { controlplane_process: in_child, ..args.clone() };
        if let Err(e) = runtime.block_on(run(args, cp_runtime.handle().clone())) {
            eprintln!("fanout: {e}");
            std::process::exit(1);
        }
        println!("total run time {}", ms(started.elapsed()));
    }
}
