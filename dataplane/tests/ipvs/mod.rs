//! Helpers of the ipvs UML tests (tests/ipvs_uml.rs). A test function runs twice: on the host
//! it boots UML with a job that runs this same test binary, filtered to that one test, with
//! `KPX_IPVS_UML_INSIDE=1`; inside UML (the host's filesystem is UML's root, so the binary is
//! there) that variable makes it run the scenario itself.
//!
//! Inside, UML's own network namespace is the node, where the backend runs; `client` and
//! `pod1..podN` are namespaces. Addresses: node 192.168.0.10 / fd00:1::10 towards the client
//! (192.168.0.2 / fd00:1::2), bridge cbr0 10.244.0.1 / fd00:244::1 towards pod i at
//! 10.244.0.1i / fd00:244::1i, each serving `kpx-testpod serve podI` on port 8080. ClusterIPs
//! are in 10.96.0.0/16 and fd00:96::/64, the cluster CIDR is 10.244.0.0/16 (+ fd00:244::/64).

#![allow(dead_code)] // each test uses a part

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kpx_dataplane::backend::ipvs::{IpvsBackend, IpvsConfig};
use kpx_dataplane::state::{AppliedState, ChangeSet};
use kpx_ipvs_netlink::Family;
use kpx_proto::v1 as pb;

use super::uml;

const INSIDE: &str = "KPX_IPVS_UML_INSIDE";
pub const TESTPOD: &str = env!("CARGO_BIN_EXE_kpx-testpod");
pub const NODE: &str = "192.168.0.10";
pub const NODE6: &str = "fd00:1::10";

/// Runs `scenario` inside UML (see the module docs); `name` is the test function's name.
pub fn in_uml(name: &str, scenario: impl FnOnce()) {
    in_uml_with(name, &[], scenario)
}

/// [`in_uml`] with extra environment for the scenario inside UML (whose environment is
/// otherwise minimal).
pub fn in_uml_with(name: &str, env: &[(&str, &str)], scenario: impl FnOnce()) {
    in_uml_limited(name, env, uml::DEFAULT_TIMEOUT, scenario)
}

/// [`in_uml_with`] for a scenario that may take longer than the default time limit.
pub fn in_uml_limited(name: &str, env: &[(&str, &str)], limit: Duration, scenario: impl FnOnce()) {
    if std::env::var(INSIDE).is_ok_and(|v| v == "1") {
        // The backend's warnings (a failed conntrack cleanup, say) reach the job's output, which
        // a failed test prints.
        let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).with_max_level(tracing::Level::WARN).try_init();
        scenario();
        return;
    }
    if !uml::require_uml() {
        return;
    }
    let exe = std::env::current_exe().expect("test binary path").display().to_string();
    let job = uml::UmlJob::new(&[exe.as_str(), "--exact", name, "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .env("RUST_BACKTRACE", "1")
        .timeout(limit);
    let job = env.iter().fold(job, |job, (k, v)| job.env(k, v));
    let result = uml::run_in_uml(&job).unwrap_or_else(|e| panic!("{e}"));
    result.assert_success();
    assert!(result.stdout.contains("test result: ok. 1 passed"), "the scenario did not run:\n{result}");
    eprintln!("{name} in UML: {}", result.timings());
}

const SETUP: &str = r#"set -e
ip netns add client
ip link add c0 type veth peer name eth0 netns client
ip addr add 192.168.0.10/24 dev c0
ip addr add fd00:1::10/64 dev c0 nodad
ip link set c0 up
ip -n client addr add 192.168.0.2/24 dev eth0
ip -n client addr add fd00:1::2/64 dev eth0 nodad
ip -n client link set eth0 up
ip -n client link set lo up
ip -n client route add default via 192.168.0.10
ip -n client -6 route add default via fd00:1::10
ip link add cbr0 type bridge
ip addr add 10.244.0.1/24 dev cbr0
ip addr add fd00:244::1/64 dev cbr0 nodad
ip link set cbr0 up
for i in $(seq "$PODS"); do
  ip netns add "pod$i"
  ip link add "vp$i" type veth peer name eth0 netns "pod$i"
  ip link set "vp$i" master cbr0 up
  ip -n "pod$i" addr add "10.244.0.1$i/24" dev eth0
  ip -n "pod$i" addr add "fd00:244::1$i/64" dev eth0 nodad
  ip -n "pod$i" link set eth0 up
  ip -n "pod$i" link set lo up
  ip -n "pod$i" route add default via 10.244.0.1
  ip -n "pod$i" -6 route add default via fd00:244::1
done
echo 1 >/proc/sys/net/ipv4/ip_forward
echo 1 >/proc/sys/net/ipv6/conf/all/forwarding
"#;

/// The namespaces, and a server in each pod; the servers are stopped on drop.
pub struct Topology {
    servers: Vec<Child>,
}

impl Topology {
    pub fn new(pods: usize) -> Topology {
        let out = Command::new("bash").args(["-c", SETUP]).env("PODS", pods.to_string()).output().unwrap();
        assert!(out.status.success(), "setup failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut servers = Vec::new();
        for i in 1..=pods {
            let ns = format!("pod{i}");
            let mut child = Command::new("ip")
                .args(["netns", "exec", &ns, TESTPOD, "serve", &ns])
                .args([format!("10.244.0.1{i}:8080"), format!("[fd00:244::1{i}]:8080")])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready", "{ns} did not start");
            servers.push(child);
        }
        Topology { servers }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

/// One request from the client namespace: `kpx-testpod get`'s line.
pub fn get(proto: &str, addr: &str) -> String {
    get_from("client", proto, addr)
}

/// One request from namespace `ns`.
pub fn get_from(ns: &str, proto: &str, addr: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, TESTPOD, "get", proto, addr, "--timeout-ms", "3000"])
        .output()
        .unwrap();
    assert!(out.status.success(), "get failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// (pod name, the source address it saw) of an answered request; panics otherwise.
pub fn answer(line: &str) -> (String, String) {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words[..] {
        ["answered", name, peer, _local] => {
            let ip = peer.rsplit_once(':').unwrap().0.trim_matches(['[', ']']);
            (name.to_string(), ip.to_string())
        }
        _ => panic!("not answered: {line:?}"),
    }
}

/// `n` TCP requests to `addr`: the pods that answered, in order.
pub fn pods_answering(addr: &str, n: usize) -> Vec<String> {
    (0..n).map(|_| answer(&get("tcp", addr)).0).collect()
}

pub fn ipvsadm() -> String {
    let out = Command::new("ipvsadm").args(["-Ln"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn svc(name: &str, cluster_ip: &str, port: u32, node_port: u32) -> pb::Service {
    pb::Service {
        namespace: "ns".into(),
        name: name.into(),
        cluster_ips: vec![cluster_ip.into()],
        ports: vec![pb::ServicePort { name: "http".into(), protocol: pb::Protocol::Tcp as i32, port, node_port }],
        ..Default::default()
    }
}

/// Pod `i`'s endpoint (IPv4, or IPv6 with `v6`) for service `name`.
pub fn ep(name: &str, i: usize, v6: bool) -> pb::Endpoint {
    pb::Endpoint {
        service: format!("ns/{name}"),
        ip: if v6 { format!("fd00:244::1{i}") } else { format!("10.244.0.1{i}") },
        ports: vec![pb::EndpointPort { name: "http".into(), port: 8080 }],
        for_cluster: true,
        for_local: false,
        node_tag: 0,
    }
}

pub fn state(services: Vec<pb::Service>, endpoints: Vec<pb::Endpoint>) -> AppliedState {
    AppliedState::with(services, endpoints).expect("test state applies")
}

/// A snapshot's change set: the backend compares the whole table.
pub fn full() -> ChangeSet {
    ChangeSet { full: true, services: Default::default() }
}

/// A delta's change set: the backend plans only these services ("ns/name").
pub fn changed(services: &[&str]) -> ChangeSet {
    ChangeSet { full: false, services: services.iter().map(|s| s.to_string()).collect() }
}

pub fn config() -> IpvsConfig {
    let mut cfg = IpvsConfig::new("node-1");
    cfg.node_ips = vec![NODE.parse().unwrap(), NODE6.parse().unwrap()];
    cfg.families = vec![Family::Inet, Family::Inet6];
    cfg.cluster_cidrs = vec!["10.244.0.0/16".into(), "fd00:244::/64".into()];
    cfg.restore_cmd = "iptables-legacy-restore".into();
    cfg
}

pub fn backend() -> IpvsBackend {
    IpvsBackend::new(config()).expect("IPVS in UML")
}

/// Calls `f` every 200 ms until it returns true; panics with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
