//! The real `kpx-dataplane --backend ipvs` inside user-mode Linux, fed by a real controlplane
//! serving deploy/examples: the node ACKs as an ipvs node, the example services appear as
//! virtual servers, and a virtual server deleted by hand is back after the housekeeping
//! task's reconcile (`--sync-period 1s`), with nothing but the agent running.

mod ipvs;
mod uml;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kpx_controlplane::cache::CacheConfig;
use kpx_controlplane::model::Skips;
use kpx_controlplane::server::SyncConfig;
use kpx_controlplane::source::files::FileSource;
use kpx_proto::v1 as pb;

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", ipvs::ipvsadm());
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn scenario() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp_addr = listener.local_addr().unwrap();
    let skips = Arc::new(Skips::default());
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let source = Box::new(FileSource::new(examples, skips.clone()));
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(kpx_controlplane::serve(
        listener,
        source,
        skips,
        CacheConfig::default(),
        SyncConfig::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let mut dp = Command::new(env!("CARGO_BIN_EXE_kpx-dataplane"))
        .args(["--node", "node-a", "--controlplane", &format!("http://{cp_addr}"), "--backend", "ipvs"])
        .args(["--ipvs-scheduler", "lc", "--cluster-cidr", "10.244.0.0/16", "--sync-period", "1s"])
        .args(["--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0"])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .spawn()
        .expect("start kpx-dataplane");

    let url = format!("http://{cp_addr}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let node = loop {
        if let Ok(mut c) = pb::inspect_client::InspectClient::connect(url.clone()).await {
            let nodes = c.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
            if let Some(n) = nodes.into_iter().find(|n| n.name == "node-a" && !n.acked_version.is_empty()) {
                break n;
            }
        }
        assert!(Instant::now() < deadline, "node-a never acked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(node.backend, "ipvs");
    assert!(node.last_nack_error.is_empty(), "{}", node.last_nack_error);

    let result = tokio::task::spawn_blocking(|| {
        let has = |words: &[&str]| {
            ipvs::ipvsadm().lines().any(|l| l.split_whitespace().collect::<Vec<_>>().starts_with(words))
        };
        wait("web's virtual server", || has(&["TCP", "10.96.0.10:80", "lc"]) && has(&["UDP", "10.96.0.20:53", "lc"]));
        let status = Command::new("ipvsadm").args(["-D", "-t", "10.96.0.10:80"]).status().unwrap();
        // Not asserted gone: the agent's reconcile may already have put it back.
        assert!(status.success());
        wait("the deleted virtual server to come back", || has(&["TCP", "10.96.0.10:80", "lc"]));
        let out = Command::new("ip").args(["-o", "addr", "show", "dev", "kube-ipvs0"]).output().unwrap();
        let addrs = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(addrs.contains("10.96.0.10/32") && addrs.contains("10.96.0.20/32"), "{addrs}");
    })
    .await;
    let _ = dp.kill();
    let _ = dp.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[test]
fn the_agent_programs_ipvs_from_the_controlplane_and_repairs_drift() {
    ipvs::in_uml("the_agent_programs_ipvs_from_the_controlplane_and_repairs_drift", || {
        tokio::runtime::Runtime::new().unwrap().block_on(scenario());
    });
}
