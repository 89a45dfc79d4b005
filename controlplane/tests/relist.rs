//! Relist without churn, end to end: a controlplane watching a fake apiserver with 10,000
//! Services (and their EndpointSlices) serves two nodes; every watch expires (410 Gone) and the
//! controlplane relists everything. Nothing changed, so no node receives anything: the count of
//! updates sent stays at the two snapshots. Then one real change is sent as exactly one delta
//! per node, which shows the count can move.

mod common;
mod fake_apiserver;

use common::secure::SecureControlplane;
use common::{Accept, SimNode};
use fake_apiserver::{FakeApiServer, Kind, objects, wait_until};
use kpx_controlplane::Security;
use kpx_controlplane::k8s::watch::KubeSource;
use kpx_controlplane::model::Skips;
use kpx_dataplane::stream::SyncEvent;
use std::sync::Arc;
use std::time::Duration;

const SERVICES: usize = 10_000;

fn cluster_ip(i: usize) -> String {
    format!("10.96.{}.{}", i / 250, i % 250 + 1)
}

async fn updates_sent(cp: &SecureControlplane) -> (f64, f64) {
    let snapshots = cp.metric("kpx_controlplane_updates_sent_total{kind=\"snapshot\"}").await;
    let deltas = cp.metric("kpx_controlplane_updates_sent_total{kind=\"delta\"}").await;
    (snapshots, deltas)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_of_an_unchanged_cluster_sends_nothing() {
    let api = FakeApiServer::start().await;
    for i in 0..SERVICES {
        let name = format!("svc-{i}");
        api.apply(Kind::Service, objects::service("bulk", &name, &cluster_ip(i)));
        let ips = [format!("10.244.{}.{}", i / 250, i % 250 + 1), format!("10.245.{}.{}", i / 250, i % 250 + 1)];
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        api.apply(Kind::EndpointSlice, objects::endpoint_slice("bulk", &format!("{name}-x"), &name, &ips));
    }
    api.apply(Kind::Node, objects::node("node-a", "192.0.2.1", "2026-11-22T10:00:00Z"));
    api.apply(Kind::Node, objects::node("node-b", "192.0.2.2", "2026-11-22T10:00:00Z"));
    let source = Box::new(KubeSource::new(api.client(), Arc::new(Skips::default())));
    let cp = SecureControlplane::start(Security::Open, Some(source)).await;

    let mut nodes = Vec::new();
    for name in ["node-a", "node-b"] {
        let mut node = SimNode::new(name, Box::new(Accept));
        node.connect(&cp.http()).await;
        match node.next().await {
            SyncEvent::Applied { full: true, entries, .. } => assert_eq!(entries, 3 * SERVICES, "{name}"),
            e => panic!("{name}: expected the snapshot, got {e:?}"),
        }
        nodes.push(node);
    }
    assert_eq!(updates_sent(&cp).await, (2.0, 0.0));

    // Every watch expires; the controlplane relists all 20,002 objects.
    let before: Vec<(usize, usize)> =
        Kind::ALL.iter().map(|k| (api.list_starts(*k), api.watches_accepted(*k))).collect();
    for kind in Kind::ALL {
        api.expire_watches(kind);
    }
    wait_until("every kind relisted and watching again", Duration::from_secs(60), || {
        Kind::ALL
            .iter()
            .zip(&before)
            .all(|(k, (lists, watches))| api.list_starts(*k) > *lists && api.watches_accepted(*k) > *watches)
    })
    .await;
    for node in &mut nodes {
        node.expect_quiet(Duration::from_secs(1)).await;
    }
    assert_eq!(updates_sent(&cp).await, (2.0, 0.0), "a relist of an unchanged cluster sent updates");

    // A real change after the relist: one delta per node, carrying only that change.
    let ips = ["10.244.0.1", "10.245.0.1", "10.246.0.1"];
    api.apply(Kind::EndpointSlice, objects::endpoint_slice("bulk", "svc-0-x", "svc-0", &ips));
    for node in &mut nodes {
        match node.next().await {
            SyncEvent::Applied { full: false, changes, .. } => {
                assert_eq!((changes.services, changes.endpoints), (0, 1))
            }
            e => panic!("expected one delta, got {e:?}"),
        }
        node.expect_quiet(Duration::from_millis(500)).await;
    }
    assert_eq!(updates_sent(&cp).await, (2.0, 2.0));
}
