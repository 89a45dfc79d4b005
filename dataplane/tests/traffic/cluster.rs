//! One scenario's cluster: a [`Topology`], the controlplane (in process, file source on a
//! temporary manifest directory, on its own loopback port) and the real `kpx-dataplane`
//! binary per node, programming that node's namespace with the iptables backend (or the
//! backend arguments given to [`Cluster::start_with`]). Torn down in reverse: dataplanes,
//! controlplane, namespaces.

// Each test file uses a different part of it.
#![allow(dead_code)]

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kpx_controlplane::cache::CacheConfig;
use kpx_controlplane::model::Skips;
use kpx_controlplane::server::SyncConfig;
use kpx_controlplane::source::files::FileSource;
use kpx_proto::v1 as pb;

use super::manifest::{NODES, Svc};
use crate::netns::{NetNs, Topology, eventually};

/// How long a node may take to ack (a full sync of a few services takes well under a second).
const ACK_WAIT: Duration = Duration::from_secs(20);
/// The agent's canary check period: short, so that a flushed table comes back quickly.
const SYNC_PERIOD: &str = "300ms";

/// The real dataplane of one node, killed on drop; its log goes to a file.
struct Dataplane {
    child: Child,
    log: PathBuf,
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// Field order is drop order.
pub struct Cluster {
    /// By node index; None while killed. A mutex so that traffic can flow from other threads
    /// (borrowing the topology) while a test kills and restarts a dataplane.
    dataplanes: Mutex<Vec<Option<Dataplane>>>,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    url: String,
    /// Extra flags of every dataplane; `--node-ip` unless `node_ip` is off.
    options: Options,
    /// `--backend ...` and its options.
    backend: Vec<String>,
    pub topo: Topology,
    work: tempfile::TempDir,
}

/// How the dataplanes run.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--node-ip` with the node's address (node ports only there); off: every local address,
    /// 127.0.0.1 included (localhost node ports).
    pub node_ip: bool,
    pub extra_args: Vec<String>,
    /// `--sync-period`: short in tests, so that a flushed table is noticed quickly; benchmarks
    /// use the agent's default, since every tick runs canary checks (processes) beside the load.
    pub sync_period: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options { node_ip: true, extra_args: Vec::new(), sync_period: SYNC_PERIOD }
    }
}

impl Cluster {
    /// Writes SERVICES, starts the controlplane and a dataplane per node of TOPO, and waits
    /// until every node acked its desired state.
    pub fn start(topo: Topology, services: &[Svc]) -> Cluster {
        Cluster::start_full(topo, services, &["--backend", "iptables"], Options::default())
    }

    /// [`Cluster::start`] with dataplane OPTIONS.
    pub fn start_with(topo: Topology, services: &[Svc], options: Options) -> Cluster {
        Cluster::start_full(topo, services, &["--backend", "iptables"], options)
    }

    /// Like [`Cluster::start`], with BACKEND (`--backend NAME` and its flags) on every node.
    pub fn start_with_backend(topo: Topology, services: &[Svc], backend: &[&str]) -> Cluster {
        Cluster::start_full(topo, services, backend, Options::default())
    }

    /// [`Cluster::start_with_backend`] with dataplane OPTIONS.
    pub fn start_full(topo: Topology, services: &[Svc], backend: &[&str], options: Options) -> Cluster {
        for node in &topo.nodes {
            prepare_node(&node.ns);
        }
        let work = tempfile::tempdir().expect("temp dir");
        let manifests = work.path().join("manifests");
        std::fs::create_dir(&manifests).unwrap();
        std::fs::write(manifests.join("nodes.yaml"), NODES).unwrap();
        for s in services {
            std::fs::write(manifests.join(s.file_name()), s.yaml()).unwrap();
        }
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind the controlplane");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let skips = Arc::new(Skips::default());
        let source = Box::new(FileSource::new(manifests, skips.clone()).with_poll_interval(Duration::from_millis(100)));
        rt.spawn(kpx_controlplane::serve(
            listener,
            source,
            skips,
            CacheConfig::default(),
            SyncConfig::default(),
            async {
                let _ = stopped.await;
            },
        ));
        let backend = backend.iter().map(|a| a.to_string()).collect();
        let cluster = Cluster { dataplanes: Mutex::default(), rt, stop: Some(stop), url, options, backend, topo, work };
        for node in 0..cluster.topo.nodes.len() {
            let dp = cluster.spawn_dataplane(node);
            cluster.dataplanes().push(Some(dp));
        }
        cluster.wait_acked(0);
        cluster
    }

    /// Replaces (or adds) SVC's manifest; the controlplane picks it up on its next poll.
    pub fn write(&self, svc: &Svc) {
        let dir = self.work.path().join("manifests");
        let staged = dir.join("staged.tmp");
        std::fs::write(&staged, svc.yaml()).unwrap();
        std::fs::rename(&staged, dir.join(svc.file_name())).unwrap();
    }

    fn spawn_dataplane(&self, node: usize) -> Dataplane {
        let n = &self.topo.nodes[node];
        let log = self.log_path(node);
        let log_file = File::options().create(true).append(true).open(&log).unwrap();
        let node_ip = if self.options.node_ip { vec!["--node-ip".to_string(), n.ip4.to_string()] } else { vec![] };
        let child = Command::new(env!("CARGO_BIN_EXE_kpx-dataplane"))
            .args(["--node", n.name, "--controlplane", &self.url])
            .args(&self.backend)
            .args(["--netns", n.ns.name(), "--cluster-cidr", "10.244.0.0/16", "--ip-families", "IPv4,IPv6"])
            .args(node_ip)
            .args(&self.options.extra_args)
            .args(["--sync-period", self.options.sync_period])
            .args(["--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start kpx-dataplane");
        Dataplane { child, log }
    }

    /// The process id of node NODE's dataplane, if it runs.
    pub fn dataplane_pid(&self, node: usize) -> Option<u32> {
        self.dataplanes()[node].as_ref().map(|d| d.child.id())
    }

    /// Kills node NODE's dataplane (SIGKILL: no chance to clean up; the rules stay).
    pub fn kill_dataplane(&self, node: usize) {
        self.dataplanes()[node] = None;
    }

    /// Starts node NODE's dataplane again and waits until it acked.
    pub fn restart_dataplane(&self, node: usize) {
        let since = now_ms();
        let dp = self.spawn_dataplane(node);
        self.dataplanes()[node] = Some(dp);
        self.wait_acked(since);
    }

    /// SIGSTOP or SIGCONT to node NODE's dataplane (through procps' `kill`: no unsafe here).
    pub fn signal_dataplane(&self, node: usize, signal: &str) {
        let pid = self.dataplanes()[node].as_ref().expect("dataplane running").child.id();
        let status = Command::new("kill").args([signal, &pid.to_string()]).status().expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Removes SVC's manifest (the service goes away).
    pub fn remove(&self, svc: &Svc) {
        std::fs::remove_file(self.work.path().join("manifests").join(svc.file_name())).unwrap();
    }

    /// The controlplane's desired version for NODE now (waits until it has one).
    pub fn desired_version(&self, node: usize) -> String {
        let name = self.topo.nodes[node].name;
        eventually("a desired version", ACK_WAIT, || {
            self.list_nodes()?.into_iter().find(|n| n.name == name).map(|n| n.desired_version)
        })
    }

    /// Waits until NODE acked a version other than OLD_DESIRED, i.e. took in the change that
    /// replaced it (polls the controlplane).
    pub fn wait_changed(&self, node: usize, old_desired: &str) {
        let name = self.topo.nodes[node].name;
        eventually("the node acked the change", ACK_WAIT, || {
            let nodes = self.list_nodes()?;
            let n = nodes.into_iter().find(|n| n.name == name)?;
            (n.desired_version != old_desired && n.acked_version == n.desired_version).then_some(())
        });
    }

    /// Waits until every running dataplane's node is connected and has acked its desired
    /// version, with an ack at or after SINCE_MS (Unix ms).
    pub fn wait_acked(&self, since_ms: i64) {
        let names: Vec<&str> =
            self.dataplanes().iter().zip(&self.topo.nodes).filter(|(d, _)| d.is_some()).map(|(_, n)| n.name).collect();
        eventually("every node acked", ACK_WAIT, || {
            let nodes = self.list_nodes()?;
            let done = names.iter().all(|name| {
                nodes.iter().any(|n| {
                    n.name == *name
                        && n.connected
                        && !n.acked_version.is_empty()
                        && n.acked_version == n.desired_version
                        && n.last_ack_unix_ms >= since_ms
                })
            });
            done.then_some(())
        });
    }

    fn dataplanes(&self) -> MutexGuard<'_, Vec<Option<Dataplane>>> {
        self.dataplanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn list_nodes(&self) -> Option<Vec<pb::NodeStatus>> {
        let url = self.url.clone();
        self.rt.block_on(async move {
            let mut c = pb::inspect_client::InspectClient::connect(url).await.ok()?;
            Some(c.list_nodes(pb::ListNodesRequest {}).await.ok()?.into_inner().nodes)
        })
    }

    /// Where node NODE's dataplane logs.
    pub fn log_path(&self, node: usize) -> PathBuf {
        self.work.path().join(format!("{}.log", self.topo.nodes[node].name))
    }

    /// Waits until node NODE's agent logged LINE at least COUNT times; panics with the log
    /// after TIMEOUT.
    pub fn wait_logged(&self, node: usize, line: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = std::fs::read_to_string(self.log_path(node)).unwrap_or_default();
            if log.matches(line).count() >= count {
                return;
            }
            assert!(Instant::now() < deadline, "fewer than {count} '{line}' in {timeout:?}; the agent's log:\n{log}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `iptables-save -t TABLE` (or ip6tables-save) in node NODE's namespace.
    pub fn save(&self, node: usize, v6: bool, table: &str) -> String {
        let tool = if v6 { "ip6tables-save" } else { "iptables-save" };
        self.topo.nodes[node].ns.run(&[tool, "-t", table])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for dp in self.dataplanes().iter().flatten() {
                let text = std::fs::read_to_string(&dp.log).unwrap_or_default();
                eprintln!("--- {}:\n{text}", dp.log.display());
            }
        }
        self.dataplanes().clear();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// What a CNI plugin and a router would have set up on a node, beyond the harness's topology.
fn prepare_node(ns: &NetNs) {
    // The client's gateway is node-a, and node-a's default route is the client: service
    // traffic from the client leaves node-a by the interface it came in on, so node-a would
    // send ICMP redirects, which use up the per-host ICMP rate limit and swallow the
    // port-unreachable of a REJECT.
    ns.sysctl(&[("net.ipv4.conf.all.send_redirects", "0"), ("net.ipv4.conf.eth0.send_redirects", "0")]);
    // Hairpin mode on the pod ports (the CNI bridge plugin's `hairpinMode`, kubelet's
    // hairpin-veth): with bridge netfilter, a pod's packet DNATed back to that same pod is
    // bridged out of the port it came in on, which a bridge refuses otherwise.
    let ports = ns.ip(&["-o", "link", "show", "master", "kpxbr0"]);
    for port in ports.lines().filter_map(|l| l.split(':').nth(1)).map(|p| p.trim().split('@').next().unwrap_or(p)) {
        ns.ip(&["link", "set", "dev", port, "type", "bridge_slave", "hairpin", "on"]);
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}
