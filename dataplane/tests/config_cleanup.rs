//! The real `kpx-dataplane` binary with kube-proxy's configuration file (`--config`) and
//! `--cleanup`. The file tests run a cluster in network namespaces (root); the cleanup tests
//! load what the real kube-proxy wrote (tests/testdata/kube-proxy-1.28.7, iptables and ipvs
//! modes, with its ipsets) and what kpx writes into a namespace, next to another component's
//! rules, and check that only kube-proxy's and kpx's are gone.

// The traffic tests' cluster harness (each file allows the parts this test does not use).
#[path = "traffic/cluster.rs"]
mod cluster;
mod conformance;
#[path = "traffic/manifest.rs"]
mod manifest;
mod netns;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use cluster::{Cluster, Options};
use kpx_dataplane::backend::iptables::{IptablesBackend, IptablesConfig};
use kpx_dataplane::state::ChangeSet;
use kpx_dataplane::stream::Apply;
use manifest::{Svc, TARGET_PORT};
use netns::{NetNs, Topology};

const BIN: &str = env!("CARGO_BIN_EXE_kpx-dataplane");
const WAIT: Duration = Duration::from_secs(2);

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

#[test]
fn a_bad_config_file_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for (body, field) in [
        ("iptables:\n  syncPeriod: 30x\n", "iptables.syncPeriod"),
        ("ipvs:\n  shceduler: rr\n", "ipvs.shceduler"),
        ("mode: userspace\n", "mode"),
    ] {
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            format!("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{body}"),
        )
        .unwrap();
        let out = Command::new(BIN)
            .args(["--config", path.to_str().unwrap(), "--node", "n", "--controlplane", "http://127.0.0.1:1"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{body}: started anyway");
        assert!(stderr.contains(&format!("{field}:")), "{body}: {stderr}");
    }
}

#[test]
fn the_config_file_drives_the_agent_and_flags_override_it() {
    if !netns::require_root_and_netns() {
        return;
    }
    let topo = Topology::builder().second_node().pod("a-1", 0).pod("b-1", 1).serve(&[TARGET_PORT]).build();
    let mut web = Svc::new("web", "10.96.0.11").node_port(30080, false);
    web = web.endpoint(topo.pod("a-1").ip4.into(), "node-a").endpoint(topo.pod("b-1").ip4.into(), "node-b");
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("config.conf");
    // As in a kube-proxy ConfigMap. hostnameOverride loses to the harness's --node, and
    // localhostNodePorts: false to --iptables-localhost-nodeports=true given on the command line.
    std::fs::write(
        &path,
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
hostnameOverride: not-this-node
clusterCIDR: 10.244.0.0/16
nodePortAddresses: [10.77.0.0/24, 127.0.0.0/8]
iptables:
  masqueradeAll: true
  localhostNodePorts: false
  syncPeriod: 1m0s
conntrack:
  tcpEstablishedTimeout: 2h0m0s
  tcpCloseWaitTimeout: 0s
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
"#,
    )
    .unwrap();
    let extra_args = vec!["--config".into(), path.display().to_string(), "--iptables-localhost-nodeports=true".into()];
    let c = Cluster::start_with(topo, &[web], Options { node_ip: false, extra_args, ..Options::default() });
    let node_a = &c.topo.nodes[0];
    let nat = c.save(0, false, "nat");
    // masqueradeAll: every cluster IP connection is marked, not only those from outside the pods.
    assert!(nat.contains("-A KUBE-SVC-") && nat.contains("-d 10.96.0.11/32 -p tcp -m comment --comment \"demo/web:p cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ"), "{nat}");
    assert!(!nat.contains("! -s 10.244.0.0/16 -d 10.96.0.11/32"), "{nat}");
    // nodePortAddresses: node ports on node-a's address in 10.77.0.0/24 and on 127.0.0.1.
    for ip in ["10.77.0.10", "127.0.0.1"] {
        let jump = format!("-A KUBE-SERVICES -d {ip}/32 -m comment --comment \"kubernetes service nodeports;");
        assert!(nat.contains(&jump), "{ip}: {nat}");
    }
    assert!(!nat.contains("--dst-type LOCAL -j KUBE-NODEPORTS"), "{nat}");
    // The flag won over the file: localhost node ports answer.
    let reply = node_a.ns.tcp_request(at("127.0.0.1", 30080), WAIT).expect_answer("127.0.0.1:30080");
    assert!(["a-1", "b-1"].contains(&reply.pod.as_str()));
    // conntrack: the file's timeout, and 0s left the kernel's close-wait value alone.
    let sysctl = |k: &str| node_a.ns.run(&["sysctl", "-n", k]).trim().to_string();
    assert_eq!(sysctl("net.netfilter.nf_conntrack_tcp_timeout_established"), "7200");
    assert_eq!(sysctl("net.netfilter.nf_conntrack_tcp_timeout_close_wait"), "60", "the kernel's default");
    let log = std::fs::read_to_string(c.log_path(0)).unwrap();
    assert!(log.contains("not applicable to kpx: clientConnection"), "{log}");
}

/// Creates the sets of `ipset list` output (what kube-proxy's ipvs mode made) in `ns`.
fn create_sets(ns: &NetNs, list: &str) -> usize {
    let mut n = 0;
    for block in list.split("\n\n") {
        let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
        let (Some(name), Some(kind), Some(header)) = (field("Name:"), field("Type:"), field("Header:")) else {
            continue;
        };
        // The header's hash internals are not options of `ipset create`.
        let words: Vec<&str> = header.split_whitespace().collect();
        let mut argv = vec!["ipset", "create", name, kind];
        let mut i = 0;
        while i + 1 < words.len() {
            if !["bucketsize", "initval"].contains(&words[i]) {
                argv.extend([words[i], words[i + 1]]);
            }
            i += 2;
        }
        ns.run(&argv);
        n += 1;
    }
    n
}

/// Another component's chain and rules, which cleanup must leave.
const FOREIGN: &str =
    "*filter\n:CNI-FORWARD - [0:0]\n-A FORWARD -j CNI-FORWARD\n-A CNI-FORWARD -s 10.244.0.0/16 -j ACCEPT\nCOMMIT\n";

/// kube-proxy's rules as it left them, then the other component's next to them.
fn load(ns: &NetNs, saved: &str) {
    netns::feed(&mut ns.command(&["iptables-restore"]), saved);
    netns::feed(&mut ns.command(&["iptables-restore", "--noflush"]), FOREIGN);
    let loaded = ns.run(&["iptables-save"]);
    assert!(loaded.contains("-j KUBE-SERVICES") && loaded.contains("-j CNI-FORWARD"), "{loaded}");
}

fn cleanup(ns: &NetNs) -> String {
    let out = Command::new(BIN).args(["--cleanup", "--netns", ns.name()]).env("RUST_LOG", "info").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "--cleanup failed: {stderr}");
    stderr
}

fn assert_only_foreign_left(ns: &NetNs, what: &str) {
    let save = ns.run(&["iptables-save"]);
    let kube: Vec<&str> = save.lines().filter(|l| l.contains("KUBE-") && !l.contains("KUBE-FIREWALL")).collect();
    assert!(kube.is_empty(), "{what}: left {kube:#?}");
    assert!(
        save.contains("-A FORWARD -j CNI-FORWARD") && save.contains("-A CNI-FORWARD -s 10.244.0.0/16 -j ACCEPT"),
        "{what}: {save}"
    );
}

#[test]
fn cleanup_removes_what_kube_proxy_wrote_in_both_modes() {
    if !netns::require_root_and_netns() {
        return;
    }
    let case = &conformance::cases()[3];
    // iptables mode, as kube-proxy left it (KUBE-FIREWALL is kubelet's too: it stays).
    let ns = NetNs::new("cleanup");
    // kube-proxy's is a dummy interface; this kernel has no dummy driver, so a veth by that name
    // stands in (cleanup deletes it by name).
    ns.run(&["ip", "link", "add", "kube-ipvs0", "type", "veth", "peer", "name", "kipvs-peer"]);
    load(&ns, &case.read("iptables-save.txt"));
    let log = cleanup(&ns);
    assert_only_foreign_left(&ns, "iptables mode");
    assert!(ns.run(&["iptables-save"]).contains(":KUBE-FIREWALL"), "kubelet's chain stays");
    assert!(log.contains("removed interface kube-ipvs0"), "{log}");
    assert!(!ns.run(&["ip", "link", "show"]).contains("kube-ipvs0"));

    // ipvs mode: its rules need its sets; both go.
    let ns = NetNs::new("cleanup");
    let sets = create_sets(&ns, &case.read("ipvs/ipset-list.txt"));
    assert!(sets > 10, "{sets} sets");
    load(&ns, &case.read("ipvs/iptables-save.txt"));
    cleanup(&ns);
    assert_only_foreign_left(&ns, "ipvs mode");
    assert_eq!(ns.run(&["ipset", "list", "-n"]).trim(), "", "every kube-proxy set destroyed");
}

#[test]
fn cleanup_removes_what_kpx_wrote() {
    if !netns::require_root_and_netns() {
        return;
    }
    let case = &conformance::cases()[0];
    let ns = NetNs::new("cleanup");
    let mut restore = ns.command(&["iptables-restore", "--noflush"]);
    netns::feed(&mut restore, FOREIGN);
    let render = case.render_config();
    let mut cfg = IptablesConfig::new(render.family, &render.node_name);
    cfg.cluster_cidr = render.cluster_cidr.clone();
    cfg.netns = Some(ns.name().to_string());
    let state = case.state();
    let all = ChangeSet { full: true, services: state.services().keys().cloned().collect() };
    IptablesBackend::new(cfg).apply(&state, &all).unwrap();
    assert!(ns.run(&["iptables-save"]).contains("KUBE-SVC-"));
    cleanup(&ns);
    assert_only_foreign_left(&ns, "kpx");
    // Nothing left to do: a second cleanup succeeds and changes nothing.
    let before = ns.run(&["iptables-save", "-c"]);
    cleanup(&ns);
    assert_eq!(
        ns.run(&["iptables-save", "-c"]).lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>(),
        before.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>()
    );
}
