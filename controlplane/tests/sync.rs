//! The Sync protocol over real gRPC on loopback, with simulated nodes running the real
//! dataplane session code (which checks every version against the hash of what it applied).

mod common;

use common::*;
use kpx_controlplane::model::ClusterEvent;
use kpx_controlplane::server::SyncConfig;
use kpx_dataplane::state::{AppliedState, ChangeSet};
use kpx_dataplane::stream::{Apply, SyncEvent};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn fast() -> SyncConfig {
    SyncConfig { nack_retry: Duration::from_millis(200), ..SyncConfig::default() }
}

/// One service with endpoints 10.244.0.1..=n.
fn web(n: u8) -> Vec<ClusterEvent> {
    let eps = (1..=n).map(|i| endpoint(&format!("10.244.0.{i}"), "node-a")).collect();
    vec![
        service_event(cluster_ip_service("default", "web", "10.96.0.10", 80)),
        slice_event(slice("default", "web", "web-1", 8080, eps)),
    ]
}

async fn cluster(sync: SyncConfig, nodes: &[&str]) -> Controlplane {
    let cp = Controlplane::start(sync).await;
    for n in nodes {
        cp.send(node_event(n, None));
    }
    for e in web(2) {
        cp.send(e);
    }
    cp.send(ClusterEvent::Synced);
    cp
}

fn applied(e: SyncEvent) -> (bool, usize, usize, String) {
    match e {
        SyncEvent::Applied { full, entries, wire_bytes, version, .. } => (full, entries, wire_bytes, version),
        other => panic!("expected an applied update, got {other:?}"),
    }
}

#[tokio::test]
async fn snapshot_then_delta_then_ack() {
    let cp = cluster(fast(), &["node-a"]).await;
    let mut node = SimNode::new("node-a", Box::new(Accept));
    node.connect(&cp.url()).await;
    let (full, entries, _, v1) = applied(node.next().await);
    assert!(full, "first update is a snapshot");
    assert_eq!(entries, 3, "one service and two endpoints");
    cp.wait_node("node-a", "ack of the snapshot", |n| n.acked_version == v1 && n.connected).await;

    // One endpoint added: a delta with exactly that endpoint.
    for e in web(3) {
        cp.send(e);
    }
    let (full, entries, bytes, v2) = applied(node.next().await);
    assert!(!full);
    assert_eq!(entries, 1);
    assert!(bytes < 256, "a one-endpoint delta took {bytes} bytes");
    assert_ne!(v1, v2);
    let status = cp.wait_node("node-a", "ack of the delta", |n| n.acked_version == v2).await;
    assert_eq!(status.desired_version, v2);
    assert_eq!(status.versions_behind, 0);
    assert!(status.last_nack_error.is_empty());
    node.disconnect().await;
    let state = node.session.as_ref().unwrap().state.services()["default/web"].endpoints.len();
    assert_eq!(state, 3);
    cp.stop().await;
}

/// Rejects the first `n` updates it is given.
struct RejectFirst(Arc<AtomicUsize>);

impl Apply for RejectFirst {
    fn apply(&mut self, _: &AppliedState, _: &ChangeSet) -> Result<(), String> {
        if self.0.fetch_sub(1, Ordering::SeqCst) > 0 { Err("iptables-restore: line 7 failed".into()) } else { Ok(()) }
    }
}

#[tokio::test]
async fn nack_keeps_last_good_version_then_retries() {
    let cp = cluster(fast(), &["node-a"]).await;
    let budget = Arc::new(AtomicUsize::new(0));
    let mut node = SimNode::new("node-a", Box::new(RejectFirst(budget.clone())));
    node.connect(&cp.url()).await;
    let (_, _, _, good) = applied(node.next().await);
    cp.wait_node("node-a", "first ack", |n| n.acked_version == good).await;

    budget.store(1, Ordering::SeqCst);
    for e in web(3) {
        cp.send(e);
    }
    match node.next().await {
        SyncEvent::Rejected { error, .. } => assert!(error.contains("line 7")),
        other => panic!("expected a rejection, got {other:?}"),
    }
    let status = cp.wait_node("node-a", "the NACK on record", |n| !n.last_nack_error.is_empty()).await;
    assert_eq!(status.acked_version, good, "the last good version stays on record");
    assert!(status.versions_behind >= 1);
    assert!(status.last_nack_error.contains("line 7"));

    // After the retry interval the controlplane offers the state again and the node takes it.
    let (_, _, _, retried) = applied(node.next().await);
    let status = cp.wait_node("node-a", "ack after retry", |n| n.acked_version == retried).await;
    assert_eq!(status.versions_behind, 0);
    assert!(status.last_nack_error.is_empty(), "an ACK clears the NACK error");
    node.disconnect().await;
    cp.stop().await;
}

#[tokio::test]
async fn reconnect_with_known_version_gets_a_delta() {
    let cp = cluster(fast(), &["node-a"]).await;
    let mut node = SimNode::new("node-a", Box::new(Accept));
    node.connect(&cp.url()).await;
    let (_, _, _, v1) = applied(node.next().await);
    cp.wait_node("node-a", "ack", |n| n.acked_version == v1).await;
    node.disconnect().await;
    cp.wait_node("node-a", "disconnect", |n| !n.connected).await;

    for e in web(4) {
        cp.send(e);
    }
    node.connect(&cp.url()).await;
    let (full, entries, _, v2) = applied(node.next().await);
    assert!(!full, "a node reporting a known version gets a delta");
    assert_eq!(entries, 2, "the two new endpoints only");
    cp.wait_node("node-a", "ack", |n| n.acked_version == v2 && n.connected).await;

    // Reconnecting with nothing changed sends nothing at all.
    node.disconnect().await;
    node.connect(&cp.url()).await;
    node.expect_quiet(Duration::from_millis(500)).await;
    cp.wait_node("node-a", "recognised on reconnect", |n| {
        n.acked_version == v2 && n.connected && n.versions_behind == 0
    })
    .await;
    node.disconnect().await;
    cp.stop().await;
}

#[tokio::test]
async fn fresh_controlplane_with_same_cluster_sends_no_snapshot() {
    let cp1 = cluster(fast(), &["node-a"]).await;
    let mut node = SimNode::new("node-a", Box::new(Accept));
    node.connect(&cp1.url()).await;
    let (_, _, _, v1) = applied(node.next().await);
    cp1.wait_node("node-a", "ack", |n| n.acked_version == v1).await;
    cp1.stop().await;
    node.disconnect().await;

    // Another replica (or the restarted process) computes the same content version.
    let cp2 = cluster(fast(), &["node-a"]).await;
    node.connect(&cp2.url()).await;
    node.expect_quiet(Duration::from_millis(500)).await;
    let status = cp2.wait_node("node-a", "recognised", |n| n.connected && n.acked_version == v1).await;
    assert_eq!(status.desired_version, v1);
    // And it still gets later changes as deltas.
    for e in web(3) {
        cp2.send(e);
    }
    let (full, entries, _, _) = applied(node.next().await);
    assert!(!full);
    assert_eq!(entries, 1);
    node.disconnect().await;
    cp2.stop().await;
}

/// Records the services each apply was told changed.
struct Recorder(Arc<Mutex<Vec<ChangeSet>>>);

impl Apply for Recorder {
    fn apply(&mut self, _: &AppliedState, changes: &ChangeSet) -> Result<(), String> {
        self.0.lock().unwrap().push(changes.clone());
        Ok(())
    }
}

#[tokio::test]
async fn another_replica_with_a_changed_cluster_sends_one_delta_from_the_nodes_digest() {
    let cp1 = cluster(fast(), &["node-a"]).await;
    cp1.send(service_event(cluster_ip_service("default", "db", "10.96.0.11", 5432)));
    cp1.send(service_event(cluster_ip_service("default", "old", "10.96.0.12", 80)));
    let applies = Arc::new(Mutex::new(Vec::new()));
    let mut node = SimNode::new("node-a", Box::new(Recorder(applies.clone())));
    node.connect(&cp1.url()).await;
    let (full, _, _, v1) = applied(node.next().await);
    assert!(full);
    cp1.wait_node("node-a", "ack", |n| n.acked_version == v1).await;
    cp1.stop().await;
    node.disconnect().await;

    // The replica the node moves to has seen changes the node has not: web has a third
    // endpoint, old is gone, new appeared; db is unchanged.
    let cp2 = cluster(fast(), &["node-a"]).await;
    for e in web(3) {
        cp2.send(e);
    }
    cp2.send(service_event(cluster_ip_service("default", "db", "10.96.0.11", 5432)));
    cp2.send(service_event(cluster_ip_service("default", "new", "10.96.0.13", 80)));
    let desired =
        cp2.wait_node("node-a", "published", |n| !n.desired_version.is_empty() && n.desired_version != v1).await;
    node.connect(&cp2.url()).await;
    match node.next().await {
        SyncEvent::Applied { full, version, changes, .. } => {
            assert!(!full, "a delta, not a snapshot");
            assert_eq!(version, desired.desired_version, "the node verified the delta against cp2's version");
            assert_eq!(changes.services, 3, "web replaced, old removed, new added");
        }
        e => panic!("expected one delta, got {e:?}"),
    }
    let last = applies.lock().unwrap().last().cloned().unwrap();
    let changed: Vec<&str> = last.services.iter().map(String::as_str).collect();
    assert_eq!(changed, ["default/new", "default/old", "default/web"], "db was not touched");
    node.expect_quiet(Duration::from_millis(300)).await;
    cp2.wait_node("node-a", "ack", |n| n.acked_version == desired.desired_version).await;
    node.disconnect().await;

    // A third replica whose cluster is what the node now runs: nothing at all is sent.
    let cp3 = cluster(fast(), &["node-a"]).await;
    for e in web(3) {
        cp3.send(e);
    }
    cp3.send(service_event(cluster_ip_service("default", "db", "10.96.0.11", 5432)));
    cp3.send(service_event(cluster_ip_service("default", "new", "10.96.0.13", 80)));
    cp3.wait_node("node-a", "published", |n| n.desired_version == desired.desired_version).await;
    node.connect(&cp3.url()).await;
    node.expect_quiet(Duration::from_millis(500)).await;
    cp3.wait_node("node-a", "recognised", |n| n.connected && n.acked_version == desired.desired_version).await;
    node.disconnect().await;
    cp2.stop().await;
    cp3.stop().await;
}

/// Blocks on its first delta until released, to play a slow node.
struct Slow {
    calls: Arc<AtomicUsize>,
    gate: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Apply for Slow {
    fn apply(&mut self, _: &AppliedState, _: &ChangeSet) -> Result<(), String> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 1 {
            let _ = self.gate.lock().unwrap().recv();
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_node_gets_changes_coalesced() {
    let cp = cluster(fast(), &["node-a"]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let (release, gate) = std::sync::mpsc::channel();
    let mut node = SimNode::new("node-a", Box::new(Slow { calls: calls.clone(), gate: Mutex::new(gate) }));
    node.connect(&cp.url()).await;
    applied(node.next().await);
    // First change: the node starts applying it and blocks.
    for e in web(3) {
        cp.send(e);
    }
    while calls.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Twenty more changes while it is stuck.
    for n in 4..24 {
        for e in web(n) {
            cp.send(e);
        }
    }
    let desired = cp.wait_node("node-a", "desired version settles", |_| true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    release.send(()).unwrap();
    let mut updates = 0;
    let final_version = cp.wait_node("node-a", "final desired", |_| true).await.desired_version;
    loop {
        let (_, _, _, v) = applied(node.next().await);
        updates += 1;
        if v == final_version {
            break;
        }
    }
    assert!(updates <= 2, "20 changes while busy must coalesce into one delta, got {updates} updates");
    let status = cp.wait_node("node-a", "in sync", |n| n.acked_version == final_version).await;
    assert_eq!(status.versions_behind, 0);
    assert_ne!(desired.desired_version, String::new());
    node.disconnect().await;
    assert_eq!(node.session.as_ref().unwrap().state.services()["default/web"].endpoints.len(), 23);
    cp.stop().await;
}

#[tokio::test]
async fn two_nodes_with_different_local_views() {
    let cp = Controlplane::start(fast()).await;
    cp.send(node_event("node-a", None));
    cp.send(node_event("node-b", None));
    let mut svc = cluster_ip_service("default", "local", "10.96.0.20", 80);
    svc.service_type = kpx_controlplane::model::ServiceType::NodePort;
    svc.ports[0].node_port = 30080;
    svc.external_policy_local = true;
    cp.send(service_event(svc));
    cp.send(slice_event(slice(
        "default",
        "local",
        "local-1",
        8080,
        vec![endpoint("10.244.1.5", "node-a"), endpoint("10.244.2.5", "node-b")],
    )));
    cp.send(ClusterEvent::Synced);

    let mut a = SimNode::new("node-a", Box::new(Accept));
    let mut b = SimNode::new("node-b", Box::new(Accept));
    a.connect(&cp.url()).await;
    b.connect(&cp.url()).await;
    let (_, _, _, va) = applied(a.next().await);
    let (_, _, _, vb) = applied(b.next().await);
    assert_ne!(va, vb, "different local endpoints, different versions");
    a.disconnect().await;
    b.disconnect().await;
    let local_of = |n: &SimNode| -> Vec<String> {
        n.session.as_ref().unwrap().state.services()["default/local"]
            .endpoints
            .values()
            .filter(|e| e.for_local)
            .map(|e| e.ip.clone())
            .collect()
    };
    assert_eq!(local_of(&a), ["10.244.1.5"]);
    assert_eq!(local_of(&b), ["10.244.2.5"]);

    // The inspection API groups nodes by view.
    let svc = cp
        .inspect()
        .await
        .get_service(kpx_proto::v1::GetServiceRequest { namespace: "default".into(), name: "local".into() })
        .await
        .unwrap()
        .into_inner();
    let groups: Vec<Vec<String>> = svc.views.iter().map(|v| v.nodes.clone()).collect();
    assert!(groups.contains(&vec!["node-a".to_string()]) && groups.contains(&vec!["node-b".to_string()]), "{groups:?}");
    cp.stop().await;
}

#[tokio::test]
async fn node_state_is_available_before_the_node_connects() {
    let cp = cluster(fast(), &["node-z"]).await;
    let mut client = cp.inspect().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let state = loop {
        match client.get_node_state(kpx_proto::v1::GetNodeStateRequest { node_name: "node-z".into() }).await {
            Ok(s) => break s.into_inner(),
            Err(e) if e.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(state.services.len(), 1);
    assert_eq!(
        state.services[0].endpoints.iter().map(|e| e.ip.as_str()).collect::<Vec<_>>(),
        ["10.244.0.1", "10.244.0.2"]
    );
    let err = client.get_node_state(kpx_proto::v1::GetNodeStateRequest { node_name: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    cp.stop().await;
}

#[tokio::test]
async fn a_stream_must_start_with_subscribe() {
    let cp = cluster(fast(), &[]).await;
    let channel = kpx_dataplane::stream::connect(&cp.url(), Duration::from_secs(5)).await.unwrap();
    let mut client = kpx_proto::v1::sync_client::SyncClient::new(channel);
    let ack = kpx_proto::v1::NodeMessage { msg: Some(kpx_proto::v1::node_message::Msg::Ack(Default::default())) };
    let err = client.sync(tokio_stream::iter(vec![ack])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    cp.stop().await;
}

#[tokio::test]
async fn a_change_only_local_to_one_node_leaves_other_nodes_alone() {
    let cp = Controlplane::start(fast()).await;
    for n in ["node-a", "node-b", "node-c"] {
        cp.send(node_event(n, None));
    }
    // internalTrafficPolicy Local and no way in from outside: only the hosting node has
    // endpoints to program for this service. (Reachable from outside, every node would get
    // the cluster endpoints too, as kube-proxy keeps them for pod and host traffic.)
    let mut svc = cluster_ip_service("default", "both-local", "10.96.0.30", 80);
    svc.internal_policy_local = true;
    cp.send(service_event(svc));
    cp.send(slice_event(slice("default", "both-local", "bl-1", 8080, vec![endpoint("10.244.1.5", "node-a")])));
    cp.send(ClusterEvent::Synced);
    let before: Vec<_> = {
        cp.wait_node("node-c", "published", |n| !n.desired_version.is_empty()).await;
        cp.nodes().await
    };

    cp.send(slice_event(slice(
        "default",
        "both-local",
        "bl-1",
        8080,
        vec![endpoint("10.244.1.5", "node-a"), endpoint("10.244.1.6", "node-a")],
    )));
    let a_before = before.iter().find(|n| n.name == "node-a").unwrap().desired_version.clone();
    cp.wait_node("node-a", "its local view to change", |n| n.desired_version != a_before).await;
    let after = cp.nodes().await;
    for name in ["node-b", "node-c"] {
        let v = |l: &[kpx_proto::v1::NodeStatus]| l.iter().find(|n| n.name == name).unwrap().desired_version.clone();
        assert_eq!(v(&before), v(&after), "{name} hosts nothing of the service; its state must not change");
    }
    cp.stop().await;
}

#[tokio::test]
async fn snapshots_beyond_the_concurrency_limit_wait_their_turn() {
    let cp = cluster(SyncConfig { max_concurrent_snapshots: 1, ..fast() }, &[]).await;
    let mut nodes: Vec<SimNode> = (0..4).map(|i| SimNode::new(&format!("node-{i}"), Box::new(Accept))).collect();
    for n in &mut nodes {
        n.connect(&cp.url()).await;
    }
    for n in &mut nodes {
        let (full, entries, _, _) = applied(n.next().await);
        assert!(full && entries == 3);
    }
    for n in &mut nodes {
        n.disconnect().await;
    }
    cp.stop().await;
}

/// A snapshot keeps its turn until the node answers it: a node that reads its snapshot and
/// never acknowledges it holds the only turn for `snapshot_hold`, then the next node gets its
/// snapshot (and an answered one gives its turn back at once: the test above).
#[tokio::test]
async fn an_unanswered_snapshot_keeps_its_turn_only_for_the_hold_time() {
    use kpx_proto::v1 as pb;
    let hold = Duration::from_millis(700);
    let cp = cluster(SyncConfig { max_concurrent_snapshots: 1, snapshot_hold: hold, ..fast() }, &[]).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let subscribe = pb::Subscribe { node_name: "mute".into(), backend: "test".into(), ..Default::default() };
    tx.send(pb::NodeMessage { msg: Some(pb::node_message::Msg::Subscribe(subscribe)) }).await.unwrap();
    let channel = kpx_dataplane::stream::connect(&cp.url(), Duration::from_secs(5)).await.unwrap();
    let mut client = pb::sync_client::SyncClient::new(channel);
    let mut mute = client.sync(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let got_snapshot = std::time::Instant::now();
    loop {
        let chunk = mute.message().await.unwrap().expect("the snapshot");
        assert!(chunk.full);
        if !chunk.more {
            break;
        }
    }
    let mut node = SimNode::new("node-1", Box::new(Accept));
    node.connect(&cp.url()).await;
    let (full, entries, _, _) = applied(node.next().await);
    let waited = got_snapshot.elapsed();
    assert!(full && entries == 3);
    assert!(waited >= hold - Duration::from_millis(100), "node-1 got its snapshot after {waited:?}, within the hold");
    assert!(waited < hold * 4, "node-1 waited {waited:?}: the turn was not given back");
    drop(tx);
    node.disconnect().await;
    cp.stop().await;
}

/// The Local-policy hint (`families_with_endpoints`) reaches nodes that host nothing: when the
/// service loses its last endpoint they must switch from DROP to REJECT, and back.
#[tokio::test]
async fn nodes_without_local_endpoints_learn_whether_endpoints_exist_elsewhere() {
    let cp = Controlplane::start(fast()).await;
    for n in ["node-a", "node-b"] {
        cp.send(node_event(n, None));
    }
    let mut svc = cluster_ip_service("default", "itl", "10.96.0.31", 80);
    svc.internal_policy_local = true;
    cp.send(service_event(svc));
    cp.send(slice_event(slice("default", "itl", "itl-1", 8080, vec![endpoint("10.244.1.5", "node-a")])));
    cp.send(ClusterEvent::Synced);
    cp.wait_node("node-b", "published", |n| !n.desired_version.is_empty()).await;

    let families_on_b = || async {
        let req = kpx_proto::v1::GetNodeStateRequest { node_name: "node-b".into() };
        let state = cp.inspect().await.get_node_state(req).await.unwrap().into_inner();
        let entry = state.services.iter().find(|s| s.service.as_ref().unwrap().name == "itl").unwrap();
        assert!(entry.endpoints.is_empty(), "node-b hosts no endpoint of itl: {entry:?}");
        (state.version, entry.service.as_ref().unwrap().families_with_endpoints.clone())
    };
    let (v1, families) = families_on_b().await;
    assert_eq!(families, ["IPv4"]);

    cp.send(slice_event(slice("default", "itl", "itl-1", 8080, vec![])));
    cp.wait_node("node-b", "the hint to go", |n| n.desired_version != v1).await;
    let (v2, families) = families_on_b().await;
    assert!(families.is_empty(), "{families:?}");

    cp.send(slice_event(slice("default", "itl", "itl-1", 8080, vec![endpoint("10.244.1.6", "node-a")])));
    cp.wait_node("node-b", "the hint to come back", |n| n.desired_version != v2).await;
    assert_eq!(families_on_b().await.1, ["IPv4"]);
    cp.stop().await;
}
