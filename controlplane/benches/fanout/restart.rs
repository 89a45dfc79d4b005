//! The reconnect storm: the controlplane stops, a new one starts on the same address with the
//! same cluster (nothing changed), and every node resubscribes with the version it applied.
//! Measured: time until every node is current again on the new controlplane, and what the new
//! controlplane sent (every update a node receives is an Applied or Rejected event here).

use super::{Cluster, node_name};
use kpx_auth::client::AuthChannel;
use kpx_controlplane::cache::CacheConfig;
use kpx_controlplane::model::{ClusterEvent, Node, Skips};
use kpx_controlplane::server::SyncConfig;
use kpx_controlplane::source::ChannelSource;
use kpx_dataplane::stream::SyncEvent;
use kpx_proto::v1 as pb;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// A controlplane running in this process, on its own runtime (its threads' CPU time is the
/// controlplane's: see `cpu_of_threads`).
pub struct Controlplane {
    pub events: mpsc::UnboundedSender<ClusterEvent>,
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), String>>,
    runtime: tokio::runtime::Handle,
}

impl Controlplane {
    /// Serves on ADDR (bound on RUNTIME, with SO_REUSEADDR as tokio binds, so that a restart
    /// can take the address again, retrying for up to 10 s); returns once it listens.
    pub async fn start(runtime: &tokio::runtime::Handle, addr: SocketAddr) -> Result<Controlplane, String> {
        let (events, rx) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let (bound, listening) = oneshot::channel::<()>();
        let server = runtime.spawn(async move {
            let listener = rebind(addr).await?;
            let _ = bound.send(());
            kpx_controlplane::serve(
                listener,
                Box::new(ChannelSource(rx)),
                Arc::new(Skips::default()),
                CacheConfig::default(),
                SyncConfig::default(),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .map_err(|e| e.to_string())
        });
        let cp = Controlplane { events, stop, server, runtime: runtime.clone() };
        match listening.await {
            Ok(()) => Ok(cp),
            Err(_) => Err(match cp.server.await {
                Ok(Err(e)) => e,
                other => format!("controlplane task: {other:?}"),
            }),
        }
    }

    pub fn send(&self, e: ClusterEvent) -> Result<(), String> {
        self.events.send(e).map_err(|_| "controlplane gone".to_string())
    }

    /// Every service, slice and node of CLUSTER (not Synced).
    pub fn feed(&self, cluster: &Cluster, nodes: usize) -> Result<(), String> {
        for s in &cluster.services {
            self.send(ClusterEvent::Service(s.key.clone(), Some(s.clone())))?;
        }
        for s in &cluster.slices {
            self.send(ClusterEvent::Slice(s.key.clone(), Some(s.clone())))?;
        }
        for i in 0..nodes {
            let name = node_name(i);
            self.send(ClusterEvent::Node(name.clone(), Some(Node { name, zone: None, addresses: vec![] })))?;
        }
        Ok(())
    }

    /// Stops it (its node streams end) and waits until it has.
    pub async fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(10), self.server).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(format!("controlplane failed: {e}")),
            Ok(Err(e)) => Err(format!("controlplane task: {e}")),
            Err(_) => Err("controlplane did not stop within 10 s".into()),
        }
    }
}

pub struct Storm {
    /// Old controlplane stopped -> every node current on the new one.
    pub since_stop: Duration,
    /// New controlplane's Synced -> every node current.
    pub since_synced: Duration,
    pub updates: usize,
    pub bytes: usize,
    pub reconnects: usize,
    pub controlplane: Controlplane,
}

/// Restarts the controlplane at ADDR with CLUSTER unchanged and waits for every node to be
/// current on the new one.
pub async fn storm(
    old: Controlplane,
    addr: SocketAddr,
    cluster: &Cluster,
    nodes: usize,
    node_rx: &mut mpsc::UnboundedReceiver<SyncEvent>,
    inspect: &mut pb::inspect_client::InspectClient<AuthChannel>,
) -> Result<Storm, String> {
    let stopped = Instant::now();
    let runtime = old.runtime.clone();
    old.stop().await?;
    let cp = Controlplane::start(&runtime, addr).await?;
    // A restarted controlplane lists the cluster before it is Synced; the nodes that reconnect
    // meanwhile wait (it sends nothing before Synced).
    cp.feed(cluster, nodes)?;
    await_listed(inspect, nodes).await?;
    let synced = Instant::now();
    cp.send(ClusterEvent::Synced)?;
    let (mut updates, mut bytes, mut reconnects) = (0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        while let Ok(e) = node_rx.try_recv() {
            match e {
                SyncEvent::Connected => reconnects += 1,
                SyncEvent::Applied { wire_bytes, .. } => (updates, bytes) = (updates + 1, bytes + wire_bytes),
                SyncEvent::Rejected { .. } => updates += 1,
                _ => {}
            }
        }
        let current = match inspect.list_nodes(pb::ListNodesRequest {}).await {
            Ok(r) => r
                .into_inner()
                .nodes
                .iter()
                .filter(|s| s.connected && !s.desired_version.is_empty() && s.acked_version == s.desired_version)
                .count(),
            Err(_) => 0,
        };
        if current >= nodes {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("after the restart only {current}/{nodes} nodes are current within 300 s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (since_stop, since_synced) = (stopped.elapsed(), synced.elapsed());
    Ok(Storm { since_stop, since_synced, updates, bytes, reconnects, controlplane: cp })
}

/// The old listener's address again (its socket may take a moment to be released).
async fn rebind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() > deadline => return Err(format!("rebinding {addr}: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// CPU time (user + system) used so far by this process's threads whose name starts with PREFIX
/// (tokio names its worker threads), from /proc/self/task/*/stat.
pub fn cpu_of_threads(prefix: &str) -> Duration {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the command (which may hold spaces) in parentheses: utime and stime are
        // the 12th and 13th of them.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        for i in [11, 12] {
            ticks += fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    // USER_HZ: 100 on Linux for every architecture kpx runs on.
    Duration::from_millis(ticks * 10)
}

/// Waits until the new controlplane lists every node (it took in the whole feed).
async fn await_listed(
    inspect: &mut pb::inspect_client::InspectClient<AuthChannel>,
    nodes: usize,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = inspect.list_nodes(pb::ListNodesRequest {}).await
            && r.into_inner().nodes.len() >= nodes
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the new controlplane did not take in the cluster within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
