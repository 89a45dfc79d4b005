//! The real `kpx-dataplane` binary (`--backend dry-run`) against a controlplane serving the
//! example cluster: the node ACKs, /healthz turns 200, /metrics counts syncs, and the
//! healthCheckNodePort of an externalTrafficPolicy: Local LoadBalancer answers like
//! kube-proxy's.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kpx_controlplane::cache::CacheConfig;
use kpx_controlplane::model::Skips;
use kpx_controlplane::server::SyncConfig;
use kpx_controlplane::source::files::FileSource;
use kpx_proto::v1 as pb;

/// A LoadBalancer with externalTrafficPolicy Local and a healthCheckNodePort; written next to
/// a copy of deploy/examples so the shared example cluster stays as other tests expect it.
fn web_lb(hcnp: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: web-lb
  namespace: demo
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.13
  clusterIPs: [10.96.0.13]
  externalTrafficPolicy: Local
  healthCheckNodePort: {hcnp}
  ipFamilies: [IPv4]
  ports:
  - name: http
    nodePort: 30082
    port: 80
    protocol: TCP
    targetPort: 8080
  selector:
    app: web
status:
  loadBalancer:
    ingress:
    - ip: 203.0.113.10
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-lb-x7k2p
  namespace: demo
  labels:
    kubernetes.io/service-name: web-lb
addressType: IPv4
endpoints:
- addresses: [10.244.1.2]
  conditions: {{ready: true, serving: true, terminating: false}}
  nodeName: node-a
- addresses: [10.244.2.2]
  conditions: {{ready: true, serving: true, terminating: false}}
  nodeName: node-b
ports:
- name: http
  port: 8080
  protocol: TCP
"#
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The dataplane process, killed on drop; its stdout (the dry-run rules) is collected.
struct Dataplane {
    child: Child,
    stdout: Arc<Mutex<String>>,
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_dataplane(args: &[String]) -> Dataplane {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kpx-dataplane"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start kpx-dataplane");
    let stdout = Arc::new(Mutex::new(String::new()));
    let mut pipe = child.stdout.take().unwrap();
    let sink = stdout.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    Dataplane { child, stdout }
}

/// A plain HTTP/1.1 GET: (status, headers and body as text).
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text))
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of an unlabelled metric in a scrape.
fn metric(scrape: &str, name: &str) -> u64 {
    let value = scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64);
    value.unwrap_or_else(|| panic!("no {name} in:\n{scrape}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_agent_acks_and_serves_health_metrics_and_hcnp() {
    let dir = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let hcnp_port = free_port();
    std::fs::write(dir.path().join("web-lb.yaml"), web_lb(hcnp_port)).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp_addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let skips = Arc::new(Skips::default());
    let source = Box::new(
        FileSource::new(dir.path().to_path_buf(), skips.clone()).with_poll_interval(Duration::from_millis(200)),
    );
    let cp = tokio::spawn(kpx_controlplane::serve(
        listener,
        source,
        skips,
        CacheConfig::default(),
        SyncConfig::default(),
        async {
            let _ = stopped.await;
        },
    ));

    let (healthz, metrics) = (free_port(), free_port());
    let healthz: SocketAddr = format!("127.0.0.1:{healthz}").parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{metrics}").parse().unwrap();
    let args: Vec<String> = [
        "--node",
        "node-a",
        "--controlplane",
        &format!("http://{cp_addr}"),
        "--backend",
        "dry-run",
        "--cluster-cidr",
        "10.244.0.0/16",
        "--healthz-bind-address",
        &healthz.to_string(),
        "--metrics-bind-address",
        &metrics.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let dp = start_dataplane(&args);

    // The node ACKs what the controlplane wants it to run.
    let url = format!("http://{cp_addr}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let node = loop {
        if let Ok(mut c) = pb::inspect_client::InspectClient::connect(url.clone()).await {
            let nodes = c.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
            if let Some(n) =
                nodes.into_iter().find(|n| n.name == "node-a" && n.connected && !n.acked_version.is_empty())
            {
                break n;
            }
        }
        assert!(Instant::now() < deadline, "node-a never acked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(node.acked_version, node.desired_version);
    assert_eq!(node.backend, "dry-run");
    assert!(node.last_nack_error.is_empty(), "{}", node.last_nack_error);

    let (status, text) = wait_for("/healthz", || get(healthz, "/healthz")).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"nodeName\": \"node-a\"") && text.contains("\"lastUpdated\""), "{text}");
    assert_eq!(wait_for("/livez", || get(healthz, "/livez")).await.0, 200);
    assert_eq!(wait_for("/readyz", || get(healthz, "/readyz")).await.0, 200, "ready once an update is applied");

    let (status, text) = wait_for("/metrics", || get(metrics, "/metrics")).await;
    assert_eq!(status, 200);
    let count = text
        .lines()
        .find_map(|l| l.strip_prefix("kubeproxy_sync_proxy_rules_duration_seconds_count "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no sync histogram in:\n{text}"));
    assert!(count >= 1, "{text}");
    assert!(text.contains("kpx_dataplane_updates_total{result=\"ack\"} 1"), "{text}");
    assert!(text.contains("kpx_dataplane_connected 1"), "{text}");
    assert!(text.contains("kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\"}"), "{text}");
    // The snapshot's services and endpoints were all changes, and all are programmed now.
    let (services_total, endpoints_total) = (
        metric(&text, "kubeproxy_sync_proxy_rules_service_changes_total"),
        metric(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_total"),
    );
    assert!(services_total >= 3 && endpoints_total >= 3, "{text}");
    assert_eq!(metric(&text, "kubeproxy_sync_proxy_rules_service_changes_pending"), 0);
    assert_eq!(metric(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"), 0);
    assert!(metric(&text, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") > 1_700_000_000, "{text}");
    let external_no_local = "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"}";
    let no_local_before = metric(&text, external_no_local);

    // node-a hosts one web-lb endpoint: its healthCheckNodePort says so.
    let hcnp: SocketAddr = format!("127.0.0.1:{hcnp_port}").parse().unwrap();
    let (status, text) = wait_for("the healthCheckNodePort", || get(hcnp, "/")).await;
    assert_eq!(status, 200, "{text}");
    let lower = text.to_ascii_lowercase();
    assert!(lower.contains("content-type: application/json") && lower.contains("x-content-type-options: nosniff"));
    assert!(text.contains("\"namespace\": \"demo\"") && text.contains("\"name\": \"web-lb\""), "{text}");
    assert!(text.contains("\"localEndpoints\": 1") && text.contains("\"serviceProxyHealthy\": true"), "{text}");

    // The dry run printed kube-proxy-style rules for the example services.
    let rules = dp.stdout.lock().unwrap().clone();
    assert!(rules.contains("# kpx dry-run: V4 full sync for node-a"), "{rules}");
    assert!(rules.contains("-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp"), "{rules}");
    assert!(rules.contains("203.0.113.10"), "the LB IP is rendered: {rules}");

    // The endpoint on node-a goes away: the port now answers 503 (the node drains).
    let path = dir.path().join("web-lb.yaml");
    let staged = dir.path().join("web-lb.yaml.tmp");
    std::fs::write(&staged, web_lb(hcnp_port).replace("nodeName: node-a", "nodeName: node-b")).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    let text = wait_for("503 from the healthCheckNodePort", || get(hcnp, "/").filter(|(s, _)| *s == 503)).await.1;
    assert!(text.contains("\"localEndpoints\": 0"), "{text}");

    // That change was programmed: its network programming latency is counted.
    let text = wait_for("the programming-latency histogram counted", || {
        get(metrics, "/metrics").filter(|(_, t)| {
            t.lines()
                .find_map(|l| l.strip_prefix("kubeproxy_network_programming_duration_seconds_count "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .is_some_and(|n| n >= 1)
        })
    })
    .await
    .1;
    assert!(text.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"300.0\"}"), "{text}");
    assert!(metric(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_total") > endpoints_total, "{text}");
    // web-lb (externalTrafficPolicy Local) now has its endpoint on node-b only: node-a drops
    // its external traffic, and says so.
    assert_eq!(metric(&text, external_no_local), no_local_before + 1, "{text}");
    assert_eq!(metric(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"), 0);

    drop(dp);
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), cp).await;
}

#[test]
fn iptables_backend_without_iptables_fails_clearly() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kpx-dataplane"))
        .args(["--node", "n", "--controlplane", "http://127.0.0.1:1", "--backend", "iptables"])
        .args(["--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0"])
        .env("PATH", empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("backend iptables (IPv4) is not usable") && stderr.contains("iptables-restore"),
        "{stderr}"
    );
}
