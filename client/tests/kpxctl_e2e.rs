//! The real `kpxctl` binary against the real `kpx-controlplane` binary serving the example
//! cluster (deploy/examples): what a person sees, exit codes included.
//!
//! Cargo only builds (and names, via CARGO_BIN_EXE_*) this crate's binaries for its tests, so the
//! controlplane is found next to this test in the target directory (see `controlplane_bin`).

mod common;
#[path = "../../controlplane/tests/process/mod.rs"]
mod process;

use process::{ControlplaneProcess, examples_dir};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// `target/<profile>/kpx-controlplane`, next to this test. `cargo test --workspace` has just
/// built it; otherwise (`cargo test -p kpx-client`) it is built here when missing or older than
/// its sources. Not unconditionally: a `cargo build` here and the `cargo test` around it build
/// the binary under different profiles and would rebuild it in turn on every run.
fn cached_controlplane_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(common::controlplane_bin)
}

fn start() -> ControlplaneProcess {
    ControlplaneProcess::start(cached_controlplane_bin(), &examples_dir())
}

fn kpxctl(cp: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kpxctl"))
        .args(["--controlplane", cp])
        .args(args)
        .env_remove("KPX_CONTROLPLANE")
        .stdin(Stdio::null())
        .output()
        .expect("run kpxctl")
}

/// Runs kpxctl, which must succeed; its stdout.
fn ok(cp: &ControlplaneProcess, args: &[&str]) -> String {
    let out = kpxctl(&cp.url(), args);
    assert!(out.status.success(), "kpxctl {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "kpxctl {args:?} wrote to stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The table row whose first column is `key`.
fn row<'a>(table: &'a str, key: &str) -> Vec<&'a str> {
    let line = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(key))
        .unwrap_or_else(|| panic!("no row {key:?} in:\n{table}"));
    line.split_whitespace().collect()
}

fn ips(endpoints: &Value, flag: &str) -> Vec<String> {
    let mut ips: Vec<String> = endpoints
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e[flag] == true)
        .map(|e| e["ip"].as_str().unwrap().to_string())
        .collect();
    ips.sort();
    ips
}

#[test]
fn nodes_lists_the_example_nodes() {
    let cp = start();
    let table = ok(&cp, &["nodes"]);
    let header = table.lines().next().unwrap();
    assert!(header.starts_with("NAME") && header.contains("CONNECTED") && header.contains("VERSION"), "{table}");
    assert_eq!(table.lines().count(), 3, "a header and two nodes:\n{table}");
    let a = row(&table, "node-a");
    assert_eq!(a[1..3], ["no", "zone-a"], "{table}");
    assert_eq!(row(&table, "node-b")[1..3], ["no", "zone-b"], "{table}");
    // The version column is the desired version, shortened.
    assert!(a[4].len() == 12 && a[4].bytes().all(|b| b.is_ascii_hexdigit()), "{table}");

    // host:port (no scheme) from the environment works as well.
    let out = Command::new(env!("CARGO_BIN_EXE_kpxctl"))
        .args(["nodes", "-o", "json"])
        .env("KPX_CONTROLPLANE", cp.addr.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = json["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["node-a", "node-b"]);
}

#[test]
fn state_shows_a_nodes_services_and_endpoints() {
    let cp = start();
    let table = ok(&cp, &["state", "node-a"]);
    assert!(table.starts_with("node node-a, version "), "{table}");
    let web = row(&table, "demo/web:http");
    assert_eq!(web[1..5], ["ClusterIP", "10.96.0.10", "80/TCP", "-"], "{table}");
    assert_eq!(web.last().copied(), Some("10.244.1.2:8080,10.244.1.3:8080,10.244.2.2:8080"), "{table}");
    // web-local has externalTrafficPolicy Local: node-a's two pods are local (*) there.
    assert_eq!(
        row(&table, "demo/web-local:http").last().copied(),
        Some("10.244.1.2:8080*,10.244.1.3:8080*,10.244.2.2:8080")
    );
    assert_eq!(row(&table, "demo/empty:http").last().copied(), Some("<none>"));
    assert!(!table.contains("demo/headless"), "headless services are not proxied:\n{table}");

    let json: Value = serde_json::from_str(&ok(&cp, &["state", "node-b", "-o", "json"])).unwrap();
    assert_eq!(json["node_name"], "node-b");
    assert_eq!(json["version"].as_str().map(str::len), Some(32), "{json:#}");
    let web_local = json["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"]["name"] == "web-local")
        .unwrap_or_else(|| panic!("no web-local in {json:#}"));
    assert_eq!(web_local["service"]["external_policy_local"], true);
    assert_eq!(ips(&web_local["endpoints"], "for_cluster"), ["10.244.1.2", "10.244.1.3", "10.244.2.2"]);
    assert_eq!(ips(&web_local["endpoints"], "for_local"), ["10.244.2.2"], "only node-b's own pod is local on node-b");
}

#[test]
fn service_shows_each_group_of_nodes() {
    let cp = start();
    let yaml = ok(&cp, &["service", "demo/web", "-o", "yaml"]);
    let service: Value = serde_saphyr::from_str(&yaml).unwrap_or_else(|e| panic!("not YAML ({e}):\n{yaml}"));
    assert_eq!(service["service"]["namespace"], "demo");
    assert_eq!(service["service"]["name"], "web");
    assert_eq!(service["service"]["cluster_ips"], serde_json::json!(["10.96.0.10"]));
    // demo/web has Cluster policies: every node sees the same endpoints, one group.
    let views = service["views"].as_array().unwrap();
    assert_eq!(views.len(), 1, "{yaml}");
    assert_eq!(views[0]["nodes"], serde_json::json!(["*"]));
    assert_eq!(ips(&views[0]["endpoints"], "for_cluster"), ["10.244.1.2", "10.244.1.3", "10.244.2.2"]);

    // web-local has a view per node, and the table shows them.
    let table = ok(&cp, &["service", "demo/web-local"]);
    for node in ["node-a", "node-b"] {
        assert!(table.contains(node), "{table}");
    }
    // Its Local policy: the families in which it has endpoints somewhere (nodes without a
    // local one drop its external traffic rather than reject it).
    assert!(table.contains("Endpoints in:   IPv4\n"), "{table}");
}

#[test]
fn errors_exit_1_with_a_message_a_person_can_act_on() {
    let cp = start();
    let out = kpxctl(&cp.url(), &["state", "nope"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    assert_eq!(stderr.trim(), r#"error: node "nope" not found"#);

    let out = kpxctl(&cp.url(), &["service", "demo/nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

    // Nothing listens on a port we just bound and released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = kpxctl(&format!("http://{closed}"), &["nodes"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot reach the controlplane") && stderr.contains("connection refused"), "{stderr}");
}

#[test]
fn explain_says_where_a_packet_goes() {
    let cp = start();
    let table = ok(&cp, &["explain", "node-a", "10.96.0.10:80/tcp"]);
    assert!(table.starts_with("DNAT to one of 3 endpoints, at random\n"), "{table}");
    assert!(table.contains("demo/web:http (cluster IP, port 80)"), "{table}");
    for ep in ["10.244.1.2:8080", "10.244.1.3:8080", "10.244.2.2:8080"] {
        assert!(table.contains(ep), "{table}");
    }

    // web-local: NodePort 30081 with externalTrafficPolicy Local; node-b runs one of its pods.
    let json: Value = serde_json::from_str(&ok(
        &cp,
        &["explain", "node-b", "10.77.0.11:30081/tcp", "--node-ip", "10.77.0.11", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(json["verdict"], "DNAT", "{json:#}");
    assert_eq!(json["matched"]["service"], "demo/web-local");
    assert_eq!(json["matched"]["address_kind"], "NODE_PORT");
    assert_eq!(json["policy_value"], "Local");
    assert_eq!(json["masquerade"], "NO");
    let eps: Vec<&str> = json["endpoints"].as_array().unwrap().iter().map(|e| e["ip"].as_str().unwrap()).collect();
    assert_eq!(eps, ["10.244.2.2"], "only node-b's own pod");

    let table = ok(&cp, &["explain", "node-a", "10.96.0.30:80/tcp"]);
    assert!(table.starts_with("REJECT: demo/empty"), "{table}");
    let yaml = ok(&cp, &["explain", "node-a", "10.96.0.99:80/tcp", "-o", "yaml"]);
    let v: Value = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(v["verdict"], "NO_RULE", "{yaml}");

    let out = kpxctl(&cp.url(), &["explain", "nope", "10.96.0.10:80/tcp"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), r#"error: node "nope" not found"#);
    let out = kpxctl(&cp.url(), &["explain", "node-a", "10.96.0.10:80"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
}

#[test]
fn watch_streams_the_snapshot_and_ends_with_the_controlplane() {
    use std::io::{BufRead, BufReader};
    let cp = start();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kpxctl"))
        .args(["--controlplane", &cp.url(), "watch", "node-a", "-o", "json"])
        .env_remove("KPX_CONTROLPLANE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["full"], true, "{first:#}");
    assert!(first["services_upserted"].as_array().unwrap().iter().any(|s| s["name"] == "web"), "{first:#}");
    // The controlplane going away breaks the stream: an error, exit 1.
    drop(cp);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{status}: {stderr}");
    assert!(stderr.contains("error:"), "{stderr}");

    // Table output: the snapshot summary.
    let cp = start();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kpxctl"))
        .args(["--controlplane", &cp.url(), "watch", "node-a"])
        .env_remove("KPX_CONTROLPLANE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("snapshot  node node-a, version "), "{first}");
    let next = lines.next().unwrap().unwrap();
    assert!(next.starts_with("  demo/"), "{next}");
    child.kill().unwrap();
    child.wait().unwrap();
}
