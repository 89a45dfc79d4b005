//! One change, one trace: a real OTLP receiver (tests/otlp/receiver.py, on the official
//! opentelemetry-proto service definitions) collects the spans that the real `kpx-controlplane`
//! (file source) and two real `kpx-dataplane --backend dry-run` processes export, and the test
//! follows an EndpointSlice edit from the controlplane's change span through each node's send,
//! apply and ack, all in one trace.
//!
//! The receiver needs `python3 -m pip install opentelemetry-proto grpcio` (`.ci/run` installs
//! them). Without them this test skips with a loud message, except under CI=true, where it fails.

mod otlp;
mod process;

use kpx_proto::v1::ListNodesRequest;
use kpx_proto::v1::inspect_client::InspectClient;
use otlp::{Receiver, attr};
use process::{ControlplaneProcess, examples_dir};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

/// Spans are exported in batches every 100 ms here; a change's whole trace arrives well within.
const TRACE_WAIT: Duration = Duration::from_secs(30);

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `target/<profile>/kpx-dataplane`, next to this test: Cargo names only this crate's binaries
/// (CARGO_BIN_EXE_*), but `cargo test --workspace` builds every member's. Built here when
/// missing (`cargo test -p kpx-controlplane`).
fn dataplane_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().and_then(Path::parent).expect("test executable in target/<profile>/deps");
        let bin = profile_dir.join("kpx-dataplane");
        if !bin.is_file() {
            let mut cargo = Command::new(env!("CARGO"));
            cargo.args(["build", "--quiet", "-p", "kpx-dataplane", "--bin", "kpx-dataplane"]);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cargo.arg("--release");
            }
            let status = cargo
                .env("CARGO_TARGET_DIR", profile_dir.parent().expect("target/<profile>"))
                .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
                .status()
                .expect("run cargo build -p kpx-dataplane");
            assert!(status.success(), "cargo build -p kpx-dataplane: {status}");
        }
        bin
    })
}

fn start_dataplane(node: &str, controlplane: &str, env: &[(&str, &str)], log: &Path) -> Proc {
    let child = Command::new(dataplane_bin())
        .args(["--node", node, "--controlplane", controlplane, "--backend", "dry-run"])
        .args(["--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn kpx-dataplane");
    Proc(child)
}

/// Waits until both nodes run the controlplane's desired version.
fn wait_in_sync(url: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let deadline = Instant::now() + TRACE_WAIT;
    loop {
        let nodes = rt.block_on(async {
            let mut c = InspectClient::connect(url.to_string()).await.ok()?;
            Some(c.list_nodes(ListNodesRequest {}).await.ok()?.into_inner().nodes)
        });
        let synced = |n: &kpx_proto::v1::NodeStatus| n.connected && n.acked_version == n.desired_version;
        if nodes.as_ref().is_some_and(|ns| ns.len() == 2 && ns.iter().all(synced)) {
            return;
        }
        assert!(Instant::now() < deadline, "nodes not in sync: {nodes:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn one_trace_covers_a_change_from_the_controlplane_to_both_nodes_and_back() {
    if !otlp::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path());
    let env = receiver.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, manifests.join(path.file_name().unwrap())).unwrap();
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_kpx-controlplane"));
    let cp = ControlplaneProcess::start_with_env(bin, &manifests, &env);
    let logs: Vec<PathBuf> = ["node-a", "node-b"].iter().map(|n| dir.path().join(format!("{n}.log"))).collect();
    let _dps: Vec<Proc> =
        ["node-a", "node-b"].iter().zip(&logs).map(|(n, log)| start_dataplane(n, &cp.url(), &env, log)).collect();
    wait_in_sync(&cp.url());

    // The EndpointSlice controller's trigger time, 2 s before the edit: the trace starts there.
    let trigger = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(2);
    let trigger = trigger.round(jiff::Unit::Second).unwrap();
    let path = manifests.join("web.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.matches("  generateName: web-\n").count(), 1);
    let edited = text.replacen(
        "  generateName: web-\n",
        &format!("  generateName: web-\n  annotations:\n    endpoints.kubernetes.io/last-change-trigger-time: \"{trigger}\"\n"),
        1,
    );
    let edited = edited.replacen(
        "- addresses:\n  - 10.244.1.3\n  conditions:\n    ready: true",
        "- addresses:\n  - 10.244.1.3\n  conditions:\n    ready: false",
        1,
    );
    assert_ne!(edited, text);
    std::fs::write(dir.path().join("web.yaml"), edited).unwrap();
    std::fs::rename(dir.path().join("web.yaml"), &path).unwrap();

    // Everything the trace must hold: the change, a send, an apply and an ack per node.
    let deadline = Instant::now() + TRACE_WAIT;
    let (change, trace) = loop {
        let all = receiver.spans();
        let change = all.iter().find(|s| s["name"] == "cp.change" && attr(s, "object") == "demo/web-x7k2p").cloned();
        // Only changes after the first publish are traced: the initial listing is not one.
        if let Some(change) = change {
            let id = change["trace_id"].as_str().unwrap().to_string();
            let trace: Vec<Value> = all.into_iter().filter(|s| s["trace_id"] == id.as_str()).collect();
            let per_node = |name: &str| {
                ["node-a", "node-b"].iter().all(|n| trace.iter().any(|s| s["name"] == name && attr(s, "node") == *n))
            };
            if per_node("cp.send") && per_node("dp.apply") && per_node("cp.ack") {
                break (change, trace);
            }
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = logs.iter().map(|l| std::fs::read_to_string(l).unwrap_or_default()).collect();
            panic!(
                "no complete trace after {TRACE_WAIT:?}; spans received:\n{}\ndataplane logs:\n{}",
                receiver.raw(),
                logs.join("\n---\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };

    assert_eq!(change["service"], "kpx-controlplane");
    assert_eq!(attr(&change, "kind"), "EndpointSlice");
    let trigger_ns = SystemTime::from(trigger).duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos();
    assert_eq!(change["start_ns"].as_u64().unwrap() as u128, trigger_ns, "cp.change starts at the trigger time");
    let span_id = |s: &Value| s["span_id"].as_str().unwrap().to_string();
    for node in ["node-a", "node-b"] {
        let find = |name: &str| {
            let found: Vec<&Value> = trace.iter().filter(|s| s["name"] == name && attr(s, "node") == node).collect();
            assert_eq!(found.len(), 1, "one {name} for {node} in the trace: {found:?}");
            found[0].clone()
        };
        let (send, apply, ack) = (find("cp.send"), find("dp.apply"), find("cp.ack"));
        assert_eq!(send["parent_span_id"].as_str().unwrap(), span_id(&change), "{node}: send is a child of the change");
        assert_eq!(apply["parent_span_id"].as_str().unwrap(), span_id(&send), "{node}: apply is a child of the send");
        assert_eq!(ack["parent_span_id"].as_str().unwrap(), span_id(&apply), "{node}: ack is a child of the apply");
        assert_eq!(
            (send["service"].as_str(), apply["service"].as_str()),
            (Some("kpx-controlplane"), Some("kpx-dataplane"))
        );
        assert_eq!(attr(&send, "full"), false);
        assert!(attr(&send, "bytes").as_i64().unwrap() > 0);
        assert_eq!(attr(&apply, "version"), attr(&send, "version"));
        assert_eq!(
            (attr(&send, "services"), attr(&apply, "services")),
            (&Value::from("demo/web"), &Value::from("demo/web"))
        );
        assert_eq!(attr(&ack, "version"), attr(&send, "version"));
        assert_eq!(attr(&ack, "nack"), false);

        // Inside the apply: the backend's sync (dry-run is the iptables backend printing its
        // restore input), its render and its restore, with their counts.
        let child = |parent: &Value, name: &str| {
            let found: Vec<&Value> =
                trace.iter().filter(|s| s["name"] == name && s["parent_span_id"] == parent["span_id"]).collect();
            assert_eq!(found.len(), 1, "{node}: one {name} under {}: {found:?}", parent["name"]);
            found[0].clone()
        };
        let sync = child(&apply, "dp.iptables.sync");
        let (render, restore) = (child(&sync, "dp.iptables.render"), child(&sync, "dp.iptables.restore"));
        assert_eq!((attr(&sync, "full"), attr(&render, "full")), (&Value::Bool(false), &Value::Bool(false)));
        assert_eq!(attr(&render, "services"), 1, "{node}: only web's rules are rendered");
        assert!(attr(&restore, "rules").as_i64().unwrap() > 0, "{restore}");
        assert!(attr(&restore, "bytes").as_i64().unwrap() > 0, "{restore}");
    }
    // No library internals (h2, hyper, tower, tonic) in the export.
    let names: std::collections::BTreeSet<String> =
        receiver.spans().iter().map(|s| s["name"].as_str().unwrap().to_string()).collect();
    assert!(names.iter().all(|n| !n.contains("h2") && !n.contains("hyper") && !n.starts_with("tower")), "{names:?}");
}
