//! The controlplane's `/metrics`, `/healthz`, `/livez` and `/readyz` over real HTTP, with
//! simulated nodes running the real dataplane session code; and the change time a cause
//! carries to the nodes (their network programming latency starts there).

mod common;

use common::*;
use kpx_controlplane::cache::CacheConfig;
use kpx_controlplane::model::{ClusterEvent, Skips};
use kpx_controlplane::server::SyncConfig;
use kpx_dataplane::stream::SyncEvent;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, out)
}

fn value(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(line_prefix)).and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn scrape_after_a_change_and_readiness() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (url, maddr) = (format!("http://{}", listener.local_addr().unwrap()), metrics.local_addr().unwrap());
    let (events, rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(kpx_controlplane::serve_with_metrics(
        listener,
        Some(metrics),
        kpx_controlplane::Security::Open,
        Box::new(ChannelSource(rx)),
        Arc::new(Skips::default()),
        CacheConfig::default(),
        SyncConfig::default(),
        async {
            let _ = stopped.await;
        },
    ));

    // Not listed yet: alive, not ready.
    assert_eq!(get(maddr, "/livez").await.0, 200);
    assert_eq!(get(maddr, "/healthz").await.0, 200);
    let (status, body) = get(maddr, "/readyz").await;
    assert_eq!(status, 503, "{body}");

    events.send(node_event("node-a", None)).unwrap();
    events.send(service_event(cluster_ip_service("default", "web", "10.96.0.10", 80))).unwrap();
    events.send(slice_event(slice("default", "web", "web-1", 8080, vec![endpoint("10.244.0.1", "node-a")]))).unwrap();
    events.send(ClusterEvent::Synced).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while get(maddr, "/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut node = SimNode::new("node-a", Box::new(Accept));
    node.connect(&url).await;
    assert!(matches!(node.next().await, SyncEvent::Applied { full: true, .. }));
    // The snapshot's Service entry and endpoint view were encoded once and are kept.
    let text = get(maddr, "/metrics").await.1;
    let cached = value(&text, "kpx_controlplane_encoded_cache_bytes ").expect("encoded cache gauge");
    assert!(cached > 0.0, "{text}");

    // A change with a trigger time 2 s ago: the node learns when the change really started.
    let trigger = SystemTime::now() - Duration::from_secs(2);
    let trigger_ms = trigger.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64;
    let trigger_text = jiff::Timestamp::from_millisecond(trigger_ms).unwrap().to_string();
    let mut s = slice(
        "default",
        "web",
        "web-1",
        8080,
        vec![endpoint("10.244.0.1", "node-a"), endpoint("10.244.0.2", "node-a")],
    );
    s.trigger_time = Some(trigger_text);
    events.send(slice_event(s)).unwrap();
    match node.next().await {
        SyncEvent::Applied { full: false, change_times_unix_ms, programmed_at, .. } => {
            assert_eq!(change_times_unix_ms, vec![trigger_ms]);
            let latency = kpx_dataplane::metrics::programming_latencies(&change_times_unix_ms, programmed_at);
            assert!(latency[0] >= 2.0 && latency[0] < 30.0, "{latency:?}");
        }
        other => panic!("expected the delta applied, got {other:?}"),
    }

    // The delta's ACK is counted once it arrives.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (status, text) = get(maddr, "/metrics").await;
        assert_eq!(status, 200);
        if value(&text, "kpx_controlplane_change_to_ack_seconds_count ") == Some(1.0) {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "no change-to-ack observed:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(value(&text, "kpx_controlplane_source_events_total{kind=\"EndpointSlice\"} "), Some(2.0), "{text}");
    assert_eq!(value(&text, "kpx_controlplane_source_events_total{kind=\"Service\"} "), Some(1.0), "{text}");
    assert_eq!(value(&text, "kpx_controlplane_source_events_total{kind=\"Node\"} "), Some(1.0), "{text}");
    assert_eq!(value(&text, "kpx_controlplane_acks_total{result=\"ack\"} "), Some(2.0), "{text}");
    assert_eq!(value(&text, "kpx_controlplane_nodes_connected "), Some(1.0), "{text}");
    assert_eq!(value(&text, "kpx_controlplane_node_versions_behind_count "), Some(1.0), "{text}");
    assert_eq!(value(&text, "kpx_controlplane_node_versions_behind_bucket{le=\"0.0\"} "), Some(1.0), "{text}");
    let secs = value(&text, "kpx_controlplane_change_to_ack_seconds_sum ").unwrap();
    assert!(secs > 0.0 && secs < 10.0, "{text}");
    assert!(text.contains("# TYPE kpx_controlplane_skipped_objects counter"), "{text}");

    node.disconnect().await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap().unwrap();
}
