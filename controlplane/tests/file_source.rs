//! FileSource against a real temporary directory: initial load, then only differences.
//!
//! "Nothing else was emitted" is proven without sleeping: after the change under test, a marker
//! object is written to another file, and the next event must be the marker.

use kpx_controlplane::model::{ClusterEvent, ServiceKey, Skips};
use kpx_controlplane::source::files::FileSource;
use kpx_controlplane::source::{ClusterSource, SourceError};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);

const SERVICE_AND_SLICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: ["10.96.0.10"]
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: ["10.244.1.5"]
  conditions: {ready: true}
  nodeName: node-a
"#;

fn node_manifest(name: &str, ip: &str) -> String {
    format!(
        r#"{{"apiVersion": "v1", "kind": "Node", "metadata": {{"name": "{name}",
  "labels": {{"topology.kubernetes.io/zone": "z1"}}}},
  "status": {{"addresses": [{{"type": "InternalIP", "address": "{ip}"}}, {{"type": "Hostname", "address": "{name}"}}]}}}}"#
    )
}

/// Writes through a hidden temporary file and a rename, so the poller never reads half a file.
fn write(dir: &Path, name: &str, content: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn start(dir: &Path) -> (mpsc::Receiver<ClusterEvent>, JoinHandle<Result<(), SourceError>>) {
    let (tx, rx) = mpsc::channel(64);
    let source =
        FileSource::new(dir.to_path_buf(), Arc::new(Skips::default())).with_poll_interval(Duration::from_millis(20));
    (rx, tokio::spawn(Box::new(source).run(tx)))
}

async fn next(rx: &mut mpsc::Receiver<ClusterEvent>) -> ClusterEvent {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("timed out waiting for an event").expect("source ended")
}

async fn until_synced(rx: &mut mpsc::Receiver<ClusterEvent>) -> Vec<ClusterEvent> {
    let mut events = Vec::new();
    loop {
        match next(rx).await {
            ClusterEvent::Synced => return events,
            e => events.push(e),
        }
    }
}

/// Writes a marker Node in its own file and asserts it is the very next event.
async fn assert_next_is_marker(dir: &Path, rx: &mut mpsc::Receiver<ClusterEvent>, marker: &str) {
    write(dir, &format!("zz-{marker}.json"), &node_manifest(marker, "192.0.2.99"));
    match next(rx).await {
        ClusterEvent::Node(name, Some(_)) if name == marker => {}
        other => panic!("expected only the marker {marker}, got {other:?} first"),
    }
}

fn endpoint_ips(event: &ClusterEvent) -> Vec<IpAddr> {
    match event {
        ClusterEvent::Slice(_, Some(slice)) => slice.endpoints.iter().map(|e| e.ip).collect(),
        other => panic!("not an upserted slice: {other:?}"),
    }
}

fn web() -> ServiceKey {
    ServiceKey::new("shop", "web")
}

fn slice_key() -> ServiceKey {
    ServiceKey::new("shop", "web-abc12")
}

#[tokio::test]
async fn initial_load_emits_every_object_then_synced() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-web.yaml", SERVICE_AND_SLICE);
    write(dir.path(), "20-node.json", &node_manifest("node-a", "192.0.2.1"));
    write(dir.path(), "README.txt", &node_manifest("not-a-manifest-file", "192.0.2.2"));
    std::fs::create_dir(dir.path().join("nested")).unwrap();
    write(&dir.path().join("nested"), "n.json", &node_manifest("not-recursive", "192.0.2.3"));

    let (mut rx, _task) = start(dir.path());
    let events = until_synced(&mut rx).await;
    assert_eq!(events.len(), 3, "{events:#?}");
    let service = events.iter().find_map(|e| match e {
        ClusterEvent::Service(k, Some(s)) if *k == web() => Some(s),
        _ => None,
    });
    assert_eq!(service.expect("service web").cluster_ips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
    let slice = events.iter().find(|e| matches!(e, ClusterEvent::Slice(k, Some(_)) if *k == slice_key()));
    assert_eq!(endpoint_ips(slice.expect("slice")), vec!["10.244.1.5".parse::<IpAddr>().unwrap()]);
    let node = events.iter().find_map(|e| match e {
        ClusterEvent::Node(n, Some(node)) if n == "node-a" => Some(node),
        _ => None,
    });
    assert_eq!(node.expect("node-a").addresses, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
}

#[tokio::test]
async fn a_modified_slice_emits_one_event() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-web.yaml", SERVICE_AND_SLICE);
    let (mut rx, _task) = start(dir.path());
    until_synced(&mut rx).await;

    write(dir.path(), "10-web.yaml", &SERVICE_AND_SLICE.replace("10.244.1.5", "10.244.2.7"));
    let event = next(&mut rx).await;
    assert!(matches!(&event, ClusterEvent::Slice(k, _) if *k == slice_key()), "{event:?}");
    assert_eq!(endpoint_ips(&event), vec!["10.244.2.7".parse::<IpAddr>().unwrap()]);
    assert_next_is_marker(dir.path(), &mut rx, "marker-1").await;

    // Same content again (a touch or a rewrite): nothing.
    write(dir.path(), "10-web.yaml", &SERVICE_AND_SLICE.replace("10.244.1.5", "10.244.2.7"));
    assert_next_is_marker(dir.path(), &mut rx, "marker-2").await;
}

#[tokio::test]
async fn a_deleted_file_deletes_its_objects() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-web.yaml", SERVICE_AND_SLICE);
    write(dir.path(), "20-node.json", &node_manifest("node-a", "192.0.2.1"));
    let (mut rx, _task) = start(dir.path());
    until_synced(&mut rx).await;

    std::fs::remove_file(dir.path().join("10-web.yaml")).unwrap();
    let mut deleted = vec![next(&mut rx).await, next(&mut rx).await];
    deleted.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(deleted, vec![ClusterEvent::Service(web(), None), ClusterEvent::Slice(slice_key(), None)]);
    assert_next_is_marker(dir.path(), &mut rx, "marker").await;
}

#[tokio::test]
async fn a_broken_file_keeps_its_previous_objects() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-web.yaml", SERVICE_AND_SLICE);
    let (mut rx, _task) = start(dir.path());
    until_synced(&mut rx).await;

    // Half a save: not YAML any more.
    write(dir.path(), "10-web.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: [shop\n");
    assert_next_is_marker(dir.path(), &mut rx, "marker").await;

    // Fixed (with a change): only the change is published.
    write(dir.path(), "10-web.yaml", &SERVICE_AND_SLICE.replace("10.244.1.5", "10.244.3.3"));
    let event = next(&mut rx).await;
    assert_eq!(endpoint_ips(&event), vec!["10.244.3.3".parse::<IpAddr>().unwrap()]);
}

#[tokio::test]
async fn a_broken_file_at_start_loads_the_others() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-broken.yaml", "kind: Service\nmetadata: {name: [\n");
    write(dir.path(), "20-node.json", &node_manifest("node-a", "192.0.2.1"));
    let (mut rx, _task) = start(dir.path());
    let events = until_synced(&mut rx).await;
    assert!(matches!(&events[..], [ClusterEvent::Node(n, Some(_))] if n == "node-a"), "{events:?}");
}

#[tokio::test]
async fn the_last_file_wins_for_an_object_defined_twice() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-a.json", &node_manifest("node-a", "192.0.2.1"));
    write(dir.path(), "20-b.json", &node_manifest("node-a", "192.0.2.2"));
    let (mut rx, _task) = start(dir.path());
    let events = until_synced(&mut rx).await;
    match &events[..] {
        [ClusterEvent::Node(_, Some(node))] => {
            assert_eq!(node.addresses, vec!["192.0.2.2".parse::<IpAddr>().unwrap()])
        }
        other => panic!("expected node-a once, got {other:?}"),
    }

    // The winning definition goes away: the earlier one is published, not a deletion.
    std::fs::remove_file(dir.path().join("20-b.json")).unwrap();
    match next(&mut rx).await {
        ClusterEvent::Node(_, Some(node)) => assert_eq!(node.addresses, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]),
        other => panic!("expected node-a from 10-a.json, got {other:?}"),
    }
}

#[tokio::test]
async fn a_missing_directory_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, _rx) = mpsc::channel(4);
    let source = FileSource::new(dir.path().join("absent"), Arc::new(Skips::default()));
    let result = Box::new(source).run(tx).await;
    assert!(matches!(result, Err(SourceError::Io { .. })), "{result:?}");
}

#[tokio::test]
async fn stops_when_the_receiver_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rx, task) = start(dir.path());
    until_synced(&mut rx).await;
    drop(rx);
    let result = tokio::time::timeout(WAIT, task).await.expect("source did not stop").unwrap();
    assert!(matches!(result, Err(SourceError::Closed)), "{result:?}");
}
