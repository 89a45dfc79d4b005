//! KubeSource against a fake apiserver speaking the real list/watch protocol.
//!
//! "Nothing else was emitted" is proven without sleeping: a watcher's events are handled in
//! order, so after the change under test a marker object of the same kind is applied, and the
//! next event must be that marker.

mod fake_apiserver;

use fake_apiserver::{FakeApiServer, Kind, objects, wait_until};
use kpx_controlplane::k8s::watch::KubeSource;
use kpx_controlplane::model::{ClusterEvent, ObjectKind, ServiceKey, SkipReason, Skips};
use kpx_controlplane::source::{ClusterSource, SourceError};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Generous: a relist waits for kube-runtime's backoff (0.8 s and up, jittered) first.
const WAIT: Duration = Duration::from_secs(20);

struct Harness {
    api: FakeApiServer,
    skips: Arc<Skips>,
    rx: mpsc::Receiver<ClusterEvent>,
    task: JoinHandle<Result<(), SourceError>>,
}

/// A fake cluster: two services with their slices, two nodes.
fn populate(api: &FakeApiServer) {
    api.apply(Kind::Service, objects::service("shop", "web", "10.96.0.10"));
    api.apply(Kind::Service, objects::service("shop", "db", "10.96.0.11"));
    api.apply(Kind::EndpointSlice, objects::endpoint_slice("shop", "web-abc12", "web", &["10.244.1.5", "10.244.2.6"]));
    api.apply(Kind::EndpointSlice, objects::endpoint_slice("shop", "db-xyz34", "db", &["10.244.1.9"]));
    api.apply(Kind::Node, objects::node("node-a", "192.0.2.1", "2026-11-22T10:00:00Z"));
    api.apply(Kind::Node, objects::node("node-b", "192.0.2.2", "2026-11-22T10:00:00Z"));
}

fn start(api: FakeApiServer, page_size: Option<u32>) -> Harness {
    let skips = Arc::new(Skips::default());
    let mut source = KubeSource::new(api.client(), skips.clone());
    if let Some(n) = page_size {
        source = source.with_page_size(n);
    }
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(Box::new(source).run(tx));
    Harness { api, skips, rx, task }
}

impl Harness {
    async fn next(&mut self) -> ClusterEvent {
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("source ended: {:?}", (&mut self.task).await),
            Err(_) => panic!("timed out waiting for an event"),
        }
    }

    async fn until_synced(&mut self) -> Vec<ClusterEvent> {
        let mut events = Vec::new();
        loop {
            match self.next().await {
                ClusterEvent::Synced => return events,
                e => events.push(e),
            }
        }
    }

    /// Applies a marker object of `kind` and asserts that it is the next event.
    async fn assert_next_is_marker(&mut self, kind: Kind, name: &str) {
        self.api.apply(kind, marker(kind, name));
        let event = self.next().await;
        assert!(is_marker(&event, name), "expected only the {kind:?} marker {name}, got {event:?} first");
    }

    /// Expires the watches of `kinds` and waits until each has relisted and is watching again.
    async fn force_relist(&self, kinds: &[Kind]) {
        let before: Vec<(usize, usize)> =
            kinds.iter().map(|k| (self.api.list_starts(*k), self.api.watches_accepted(*k))).collect();
        for kind in kinds {
            self.api.expire_watches(*kind);
        }
        wait_until("relisted and watching again", WAIT, || {
            kinds.iter().zip(&before).all(|(k, (lists, watches))| {
                self.api.watches_expired(*k) >= 1
                    && self.api.list_starts(*k) > *lists
                    && self.api.watches_accepted(*k) > *watches
            })
        })
        .await;
    }
}

fn marker(kind: Kind, name: &str) -> serde_json::Value {
    match kind {
        Kind::Service => objects::service("markers", name, "10.96.9.9"),
        Kind::EndpointSlice => objects::endpoint_slice("markers", name, name, &["10.244.9.9"]),
        Kind::Node => objects::node(name, "192.0.2.99", "2026-11-22T10:00:00Z"),
    }
}

fn is_marker(event: &ClusterEvent, name: &str) -> bool {
    match event {
        ClusterEvent::Service(k, Some(_)) | ClusterEvent::Slice(k, Some(_)) => k.name == name,
        ClusterEvent::Node(n, Some(_)) => n == name,
        _ => false,
    }
}

fn key(namespace: &str, name: &str) -> ServiceKey {
    ServiceKey::new(namespace, name)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A summary that ignores event order, for comparing whole initial states.
fn summary(events: &[ClusterEvent]) -> Vec<String> {
    let mut out: Vec<String> = events
        .iter()
        .map(|e| match e {
            ClusterEvent::Service(k, Some(s)) => format!("svc {k} {:?}", s.cluster_ips),
            ClusterEvent::Slice(k, Some(s)) => {
                format!("slice {k} -> {} {:?}", s.service, s.endpoints.iter().map(|e| e.ip).collect::<Vec<_>>())
            }
            ClusterEvent::Node(n, Some(node)) => format!("node {n} {:?}", node.addresses),
            other => format!("{other:?}"),
        })
        .collect();
    out.sort();
    out
}

fn initial_summary() -> Vec<String> {
    let mut expected = vec![
        "node node-a [192.0.2.1]".to_owned(),
        "node node-b [192.0.2.2]".to_owned(),
        "slice shop/db-xyz34 -> shop/db [10.244.1.9]".to_owned(),
        "slice shop/web-abc12 -> shop/web [10.244.1.5, 10.244.2.6]".to_owned(),
        "svc shop/db [10.96.0.11]".to_owned(),
        "svc shop/web [10.96.0.10]".to_owned(),
    ];
    expected.sort();
    expected
}

#[tokio::test]
async fn nothing_is_published_until_every_kind_has_listed() {
    let api = FakeApiServer::start().await;
    populate(&api);
    api.hold_lists(Kind::Node);
    let mut h = start(api, None);

    // Services and slices are listed and watched; the node list is being held.
    wait_until("services and slices watched, nodes listing", WAIT, || {
        h.api.watches_accepted(Kind::Service) == 1
            && h.api.watches_accepted(Kind::EndpointSlice) == 1
            && h.api.list_starts(Kind::Node) == 1
    })
    .await;
    // A change while waiting is folded into the initial state, not published on its own.
    h.api.apply(Kind::Service, objects::service("shop", "cache", "10.96.0.12"));
    assert!(matches!(h.rx.try_recv(), Err(mpsc::error::TryRecvError::Empty)), "published before nodes were listed");

    h.api.release_lists(Kind::Node);
    let events = h.until_synced().await;
    let mut expected = initial_summary();
    expected.push("svc shop/cache [10.96.0.12]".to_owned());
    expected.sort();
    // "cache" came through the watch; whether the source had read it before the node list was
    // released is a race, so it is either in the initial state or the very next event.
    let mut got = summary(&events);
    if !got.iter().any(|s| s.contains("shop/cache")) {
        got.extend(summary(&[h.next().await]));
        got.sort();
    }
    assert_eq!(got, expected);
}

#[tokio::test]
async fn lists_are_paged() {
    let api = FakeApiServer::start().await;
    populate(&api);
    for i in 0..5 {
        api.apply(
            Kind::Node,
            objects::node(&format!("node-{i}"), &format!("192.0.2.{}", 10 + i), "2026-11-22T10:00:00Z"),
        );
    }
    let mut h = start(api, Some(2));
    let events = h.until_synced().await;
    assert_eq!(events.iter().filter(|e| matches!(e, ClusterEvent::Node(..))).count(), 7);
    assert_eq!(h.api.list_pages(Kind::Node), 4, "7 nodes in pages of 2");
    assert_eq!(h.api.list_starts(Kind::Node), 1);
}

#[tokio::test]
async fn endpoint_slice_changes_flow_through() {
    let api = FakeApiServer::start().await;
    populate(&api);
    let mut h = start(api, None);
    assert_eq!(summary(&h.until_synced().await), initial_summary());

    // ADDED
    h.api.apply(Kind::EndpointSlice, objects::endpoint_slice("shop", "web-def56", "web", &["10.244.3.7"]));
    match h.next().await {
        ClusterEvent::Slice(k, Some(s)) => {
            assert_eq!(k, key("shop", "web-def56"));
            assert_eq!(s.service, key("shop", "web"));
            assert_eq!(s.endpoints.iter().map(|e| e.ip).collect::<Vec<_>>(), vec![ip("10.244.3.7")]);
        }
        other => panic!("expected the added slice, got {other:?}"),
    }
    // MODIFIED
    h.api.apply(Kind::EndpointSlice, objects::endpoint_slice("shop", "web-abc12", "web", &["10.244.1.5"]));
    match h.next().await {
        ClusterEvent::Slice(k, Some(s)) => {
            assert_eq!(k, key("shop", "web-abc12"));
            assert_eq!(s.endpoints.iter().map(|e| e.ip).collect::<Vec<_>>(), vec![ip("10.244.1.5")]);
        }
        other => panic!("expected the modified slice, got {other:?}"),
    }
    // DELETED
    h.api.delete(Kind::EndpointSlice, "shop", "db-xyz34");
    assert_eq!(h.next().await, ClusterEvent::Slice(key("shop", "db-xyz34"), None));
    h.assert_next_is_marker(Kind::EndpointSlice, "m1").await;

    // The watch was never restarted: one list, one watch.
    assert_eq!(h.api.list_starts(Kind::EndpointSlice), 1);
    assert_eq!(h.api.watches_accepted(Kind::EndpointSlice), 1);
}

#[tokio::test]
async fn bookmarks_and_no_op_updates_publish_nothing() {
    let api = FakeApiServer::start().await;
    populate(&api);
    let mut h = start(api, None);
    h.until_synced().await;
    wait_until("nodes watched", WAIT, || h.api.watches_accepted(Kind::Node) == 1).await;
    assert!(
        h.api.requests(Kind::Node).iter().any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true")),
        "bookmarks requested: {:?}",
        h.api.requests(Kind::Node)
    );

    h.api.bookmark(Kind::Node);
    h.api.bookmark(Kind::Service);
    // A Node status heartbeat: new resourceVersion, nothing kpx keeps has changed.
    h.api.apply(Kind::Node, objects::node("node-a", "192.0.2.1", "2026-11-22T10:00:40Z"));
    h.assert_next_is_marker(Kind::Node, "m1").await;
    h.assert_next_is_marker(Kind::Service, "m2").await;

    // A real Node change still flows.
    h.api.apply(Kind::Node, objects::node("node-a", "192.0.2.7", "2026-11-22T10:00:50Z"));
    match h.next().await {
        ClusterEvent::Node(n, Some(node)) => {
            assert_eq!(n, "node-a");
            assert_eq!(node.addresses, vec![ip("192.0.2.7")]);
        }
        other => panic!("expected node-a's new address, got {other:?}"),
    }
    // A bookmark moves the resume point, it does not restart anything.
    assert_eq!(h.api.list_starts(Kind::Node), 1);
    assert_eq!(h.api.watches_accepted(Kind::Node), 1);
}

#[tokio::test]
async fn a_relist_with_identical_content_publishes_nothing() {
    let api = FakeApiServer::start().await;
    populate(&api);
    let mut h = start(api, None);
    h.until_synced().await;

    h.force_relist(&Kind::ALL).await;
    // One marker per kind; churn from any relist would come before its kind's marker, pushing
    // at least one marker out of the next three events.
    for kind in Kind::ALL {
        h.api.apply(kind, marker(kind, &format!("m-{kind:?}").to_lowercase()));
    }
    let mut next_three = vec![h.next().await, h.next().await, h.next().await];
    next_three.retain(|e| !["m-service", "m-endpointslice", "m-node"].iter().any(|m| is_marker(e, m)));
    assert!(next_three.is_empty(), "a relist published churn: {next_three:?}");
}

#[tokio::test]
async fn a_relist_publishes_exactly_what_was_missed() {
    let api = FakeApiServer::start().await;
    populate(&api);
    let mut h = start(api, None);
    h.until_synced().await;

    // Changes the watch never delivered: one service changed, one deleted; one slice deleted.
    h.api.apply_unseen(Kind::Service, objects::service("shop", "web", "10.96.0.20"));
    h.api.delete_unseen(Kind::Service, "shop", "db");
    h.api.delete_unseen(Kind::EndpointSlice, "shop", "db-xyz34");
    h.force_relist(&[Kind::Service, Kind::EndpointSlice]).await;

    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(h.next().await);
    }
    let mut got = summary(&events);
    got.sort();
    let mut expected = vec![
        "svc shop/web [10.96.0.20]".to_owned(),
        format!("{:?}", ClusterEvent::Service(key("shop", "db"), None)),
        format!("{:?}", ClusterEvent::Slice(key("shop", "db-xyz34"), None)),
    ];
    expected.sort();
    assert_eq!(got, expected);
    h.assert_next_is_marker(Kind::Service, "m1").await;
    h.assert_next_is_marker(Kind::EndpointSlice, "m2").await;
}

#[tokio::test]
async fn a_malformed_object_is_skipped_and_counted() {
    let api = FakeApiServer::start().await;
    populate(&api);
    api.apply(Kind::Service, objects::service("shop", "broken", "999.1.1.1"));
    let mut h = start(api, None);

    let events = h.until_synced().await;
    // The others are published; the broken one only as a Service kpx does not proxy (so that
    // its slices, if any, are ignored without a second warning).
    let mut want = initial_summary();
    want.push(format!("{:?}", ClusterEvent::NotProxied(key("shop", "broken"))));
    want.sort();
    assert_eq!(summary(&events), want);
    assert_eq!(h.skips.count(ObjectKind::Service, SkipReason::InvalidIp), 1);

    // Fixed: it appears. Then broken again: it disappears.
    h.api.apply(Kind::Service, objects::service("shop", "broken", "10.96.0.30"));
    assert!(matches!(h.next().await, ClusterEvent::Service(k, Some(_)) if k == key("shop", "broken")));
    h.api.apply(Kind::Service, objects::service("shop", "broken", "999.1.1.1"));
    assert_eq!(h.next().await, ClusterEvent::NotProxied(key("shop", "broken")));
    assert_eq!(h.skips.count(ObjectKind::Service, SkipReason::InvalidIp), 2);

    // A relist does not convert unchanged objects again, so the skip is not counted twice.
    h.force_relist(&[Kind::Service]).await;
    h.assert_next_is_marker(Kind::Service, "m1").await;
    assert_eq!(h.skips.count(ObjectKind::Service, SkipReason::InvalidIp), 2);
}

#[tokio::test]
async fn stops_when_the_receiver_is_dropped() {
    let api = FakeApiServer::start().await;
    populate(&api);
    let mut h = start(api, None);
    h.until_synced().await;
    // Even with no cluster change to send, the source notices and stops.
    drop(h.rx);
    let result = tokio::time::timeout(WAIT, h.task).await.expect("source did not stop").unwrap();
    assert!(matches!(result, Err(SourceError::Closed)), "{result:?}");
}
