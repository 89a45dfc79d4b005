//! The reconnect storm: the controlplane stops, a new one starts on the same address with the
//! same cluster (nothing changed), and every node resubscribes with the version it applied.
//! Measured: time until every node is current again on the new controlplane, and what the new
//! controlplane sent (every update a node receives is an Applied or Rejected event here).

use super::Cluster;
use super::cp::Cp;
use kpx_auth::client::AuthChannel;
use kpx_dataplane::stream::SyncEvent;
use kpx_proto::v1 as pb;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub struct Storm {
    /// Old controlplane stopped -> every node current on the new one.
    pub since_stop: Duration,
    /// New controlplane's Synced -> every node current.
    pub since_synced: Duration,
    pub updates: usize,
    pub bytes: usize,
    pub reconnects: usize,
    pub controlplane: Cp,
}

/// Restarts the controlplane at its address with CLUSTER unchanged and waits for every node to
/// be current on the new one.
pub async fn storm(
    old: Cp,
    cluster: &Cluster,
    nodes: usize,
    node_rx: &mut mpsc::UnboundedReceiver<SyncEvent>,
    inspect: &mut pb::inspect_client::InspectClient<AuthChannel>,
) -> Result<Storm, String> {
    let stopped = Instant::now();
    // A restarted controlplane lists the cluster before it is Synced; the nodes that reconnect
    // meanwhile wait (it sends nothing before Synced).
    let mut cp = old.restart(cluster, nodes).await?;
    await_listed(inspect, nodes).await?;
    let synced = Instant::now();
    cp.synced().await?;
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
