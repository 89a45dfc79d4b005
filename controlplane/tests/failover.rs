//! Failover without churn, with real processes: two `kpx-controlplane` replicas watch the same
//! manifest directory behind one address (a small TCP balancer in the test), two nodes run the
//! real dataplane session and reconnect loop, and a steady stream of changes is written. One
//! replica is killed in the middle of it. Every node converges on the surviving replica's
//! desired state, takes no snapshot after its first, and applies no version twice.

mod common;
mod process;

use common::Accept;
use kpx_auth::client::ClientCredentials;
use kpx_dataplane::stream::{Backoff, NodeIdentity, Session, SyncEvent};
use kpx_proto::v1 as pb;
use process::{ControlplaneProcess, examples_dir};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The (version, full) of every update a node applied, in order.
type AppliedLog = Arc<Mutex<Vec<(String, bool)>>>;

const CHANGES: usize = 16;
const KILL_AFTER: usize = 6;

/// One address in front of the replicas: each connection goes to the next replica in turn, or
/// to the following one when that one does not answer, like a load balancer's health check.
async fn balancer(upstreams: Vec<SocketAddr>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let turn = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else { return };
            let start = turn.fetch_add(1, Ordering::Relaxed);
            let upstreams = upstreams.clone();
            tokio::spawn(async move {
                for i in 0..upstreams.len() {
                    if let Ok(mut server) = TcpStream::connect(upstreams[(start + i) % upstreams.len()]).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The web slice with `n` extra ready endpoints 10.244.9.1..=n (each state differs from all
/// earlier ones, so every version is new).
fn write_web(manifests: &Path, n: usize) {
    let base = std::fs::read_to_string(examples_dir().join("web.yaml")).unwrap();
    let mut extra = String::new();
    for i in 1..=n {
        extra.push_str(&format!(
            "- addresses:\n  - 10.244.9.{i}\n  conditions:\n    ready: true\n    serving: true\n    terminating: false\n  nodeName: node-b\n"
        ));
    }
    let text = base.replacen("endpoints:\n", &format!("endpoints:\n{extra}"), 1);
    std::fs::write(manifests.join("web.yaml.new"), text).unwrap();
    std::fs::rename(manifests.join("web.yaml.new"), manifests.join("web.yaml")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_under_a_change_stream_costs_no_snapshot_and_no_reapply() {
    let manifests = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, manifests.path().join(path.file_name().unwrap())).unwrap();
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_kpx-controlplane"));
    let dir = manifests.path().to_path_buf();
    let (a, b) = tokio::task::spawn_blocking(move || {
        (ControlplaneProcess::start(bin, &dir), ControlplaneProcess::start(bin, &dir))
    })
    .await
    .unwrap();
    let survivor_url = b.url();
    let front = format!("http://{}", balancer(vec![a.addr, b.addr]).await);

    // Two nodes, each with the real reconnect loop; every applied update is recorded.
    let mut applied: Vec<AppliedLog> = Vec::new();
    for name in ["node-a", "node-b"] {
        let identity = NodeIdentity {
            node_name: name.into(),
            backend: "sim".into(),
            ip_families: vec!["IPv4".into()],
            zone: String::new(),
        };
        let mut session = Session::new(identity, Box::new(Accept) as Box<dyn kpx_dataplane::stream::Apply>);
        let (tx, mut rx) = mpsc::unbounded_channel();
        session.events = Some(tx);
        let log = Arc::new(Mutex::new(Vec::new()));
        applied.push(log.clone());
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                if let SyncEvent::Applied { version, full, .. } = e {
                    log.lock().unwrap().push((version, full));
                }
            }
        });
        let front = front.clone();
        tokio::spawn(async move {
            let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
            kpx_dataplane::stream::run_forever(
                &mut session,
                &front,
                &ClientCredentials::default(),
                backoff,
                std::future::pending(),
            )
            .await;
        });
    }

    // The change stream, with one replica killed part way.
    let mut a = Some(a);
    for i in 1..=CHANGES {
        write_web(manifests.path(), i);
        tokio::time::sleep(Duration::from_millis(250)).await;
        if i == KILL_AFTER {
            drop(a.take());
        }
    }

    // Converged: both nodes ACKed the survivor's desired version, and it is what they applied last.
    let channel = kpx_auth::client::connect(&survivor_url, &ClientCredentials::default(), |e| e).await.unwrap();
    let mut inspect = pb::inspect_client::InspectClient::new(channel);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let nodes = loop {
        let nodes = inspect.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
        if nodes.len() == 2 && nodes.iter().all(|n| n.connected && n.acked_version == n.desired_version) {
            break nodes;
        }
        assert!(tokio::time::Instant::now() < deadline, "nodes did not converge on the survivor: {nodes:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (node, log) in nodes.iter().zip(&applied) {
        let log = log.lock().unwrap().clone();
        assert_eq!(log.last().map(|(v, _)| v.as_str()), Some(node.desired_version.as_str()), "{}: {log:?}", node.name);
        assert!(log[0].1, "{}: the first update is its snapshot", node.name);
        assert!(log[1..].iter().all(|(_, full)| !full), "{}: a snapshot after the failover: {log:?}", node.name);
        let mut versions: Vec<&String> = log.iter().map(|(v, _)| v).collect();
        versions.sort();
        versions.dedup();
        assert_eq!(versions.len(), log.len(), "{}: a version was applied twice: {log:?}", node.name);
        assert!(log.len() >= 2, "{}: the changes reached it: {log:?}", node.name);
        eprintln!("{}: {} updates applied, the last {}", node.name, log.len(), node.desired_version);
    }
}
