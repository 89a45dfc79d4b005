//! The secure setup end to end, as the README describes it, with real binaries only:
//! `kpxctl certs` makes a CA and certificates; `kpx-controlplane` serves TLS and knows callers by
//! their client certificates; `kpx-dataplane` subscribes as node-a with node-a's certificate and
//! serves its admin API with TLS; grpcurl and kpxctl inspect both planes with an admin
//! certificate and are refused without one; a dataplane holding node-b's certificate cannot
//! subscribe as node-a.
//!
//! grpcurl comes from outside Cargo; without it the test skips loudly, except under CI=true.

mod common;
#[path = "../../controlplane/tests/process/mod.rs"]
mod process;

use base64::Engine;
use common::{Dataplane, controlplane_bin, dataplane_bin};
use kpx_auth::client::ClientCredentials;
use process::{ControlplaneProcess, Secure, examples_dir, grpcurl};
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The standard gRPC health service (grpc/grpc doc/health-checking.md), for a grpcurl call
/// that must not depend on reflection.
const HEALTH_PROTO: &str = r#"syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health {
  rpc Check(HealthCheckRequest) returns (HealthCheckResponse);
  rpc Watch(HealthCheckRequest) returns (stream HealthCheckResponse);
}
"#;

struct Pki(PathBuf);

impl Pki {
    fn file(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

fn kpxctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kpxctl")).args(args).stdin(Stdio::null()).output().expect("run kpxctl")
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn grpcurl_run(grpcurl: &Path, args: &[&str]) -> Output {
    Command::new(grpcurl).args(["-max-time", "20"]).args(args).stdin(Stdio::null()).output().expect("run grpcurl")
}

/// Polls `f` for up to 30 s.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => panic!("{what}: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn secure_planes_with_grpcurl_kpxctl_and_a_refused_impersonation() {
    let Some(grpcurl) = grpcurl() else { return };
    let cp_bin = controlplane_bin();
    let dp_bin = dataplane_bin();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki(dir.path().to_path_buf());
    let d = pki.0.display().to_string();
    let made = kpxctl(&["certs", "--dir", &d, "--server-name", "127.0.0.1", "--node", "node-a=127.0.0.1"]);
    assert!(made.status.success(), "{:?}", text(&made));
    let made = kpxctl(&["certs", "--dir", &d, "--node", "node-b", "--admin", "alice"]);
    assert!(made.status.success(), "{:?}", text(&made));
    assert!(text(&made).0.starts_with("reusing the CA"), "{:?}", text(&made));
    let (ca, admin, admin_key) = (pki.file("ca.pem"), pki.file("admin.pem"), pki.file("admin-key.pem"));
    std::fs::write(pki.0.join("health.proto"), HEALTH_PROTO).unwrap();

    let admin_creds =
        ClientCredentials::from_files(Some(Path::new(&ca)), Some(Path::new(&admin)), Some(Path::new(&admin_key)), None);
    let tls_args = ["--tls-cert-file", &pki.file("server.pem"), "--tls-private-key-file", &pki.file("server-key.pem")];
    let args = tls_args.iter().chain(&["--client-ca-file", &ca]).map(|s| s.to_string()).collect();
    let cp = ControlplaneProcess::start_secure(&cp_bin, &examples_dir(), Secure { args, creds: admin_creds });
    let cp_addr = cp.addr.to_string();
    let admin_addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (node_a, node_a_key) = (pki.file("node-node-a.pem"), pki.file("node-node-a-key.pem"));
    let _dp = Dataplane::start(
        &dp_bin,
        &[
            "--node",
            "node-a",
            "--controlplane",
            &cp.url(),
            "--cacert",
            &ca,
            "--cert",
            &node_a,
            "--key",
            &node_a_key,
            "--admin-listen",
            &admin_addr,
            "--tls-cert-file",
            &node_a,
            "--tls-private-key-file",
            &node_a_key,
            "--client-ca-file",
            &ca,
        ],
    );
    let as_admin = ["-cacert", &ca, "-cert", &admin, "-key", &admin_key];

    // grpcurl with the admin certificate, on both planes.
    let status: Value = eventually("node-a applies its state", || {
        let out = grpcurl_run(&grpcurl, &[&as_admin[..], &[&admin_addr, "kpx.v1.Admin/GetStatus"]].concat());
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {:?}", text(&out)))?;
        match v["appliedVersion"].as_str() {
            Some(s) if !s.is_empty() => Ok(v),
            _ => Err(format!("{v}")),
        }
    });
    assert_eq!(status["connected"], true);
    for addr in [&cp_addr, &admin_addr] {
        let listed = grpcurl_run(&grpcurl, &[&as_admin[..], &[addr.as_str(), "list"]].concat());
        assert!(listed.status.success(), "{addr}: {:?}", text(&listed));
        // Without a client certificate: TLS works, reflection is refused, health answers.
        let refused = grpcurl_run(&grpcurl, &["-cacert", &ca, addr, "list"]);
        assert!(!refused.status.success(), "{addr}: reflection without a certificate: {:?}", text(&refused));
        assert!(text(&refused).1.contains("Unauthenticated"), "{addr}: {:?}", text(&refused));
        // Health needs no reflection: grpcurl reads the standard health.proto.
        let health = grpcurl_run(
            &grpcurl,
            &["-cacert", &ca, "-import-path", &d, "-proto", "health.proto", addr, "grpc.health.v1.Health/Check"],
        );
        assert!(text(&health).0.contains("SERVING"), "{addr}: {:?}", text(&health));
        // grpc-go retries a connection the server closes until the deadline: keep it short.
        let plaintext = grpcurl_run(&grpcurl, &["-connect-timeout", "2", "-max-time", "3", "-plaintext", addr, "list"]);
        assert!(!plaintext.status.success(), "{addr}: plaintext against TLS: {:?}", text(&plaintext));
    }
    let inspect = grpcurl_run(
        &grpcurl,
        &[&as_admin[..], &["-d", r#"{"nodeName":"node-a"}"#, &cp_addr, "kpx.v1.Inspect/GetNodeState"]].concat(),
    );
    let desired: Value =
        serde_json::from_slice(&inspect.stdout).unwrap_or_else(|e| panic!("{e}: {:?}", text(&inspect)));
    assert_eq!(desired["version"], status["appliedVersion"]);

    // kpxctl: nodes and diff with the admin certificate; a node's certificate reads only itself.
    let cp_url = format!("https://{cp_addr}");
    let admin_flags = ["--controlplane", &cp_url, "--cacert", &ca, "--cert", &admin, "--key", &admin_key];
    let nodes = kpxctl(&[&admin_flags[..], &["nodes"]].concat());
    assert!(nodes.status.success(), "{:?}", text(&nodes));
    assert!(text(&nodes).0.lines().any(|l| l.starts_with("node-a ") && l.contains(" yes ")), "{:?}", text(&nodes));
    let dp_url = format!("https://{admin_addr}");
    let diff = kpxctl(&[&admin_flags[..], &["diff", "node-a", "--dataplane", &dp_url]].concat());
    assert!(text(&diff).0.lines().any(|l| l == "in sync"), "{:?}", text(&diff));
    let node_b = [
        "--controlplane",
        &cp_url,
        "--cacert",
        &ca,
        "--cert",
        &pki.file("node-node-b.pem"),
        "--key",
        &pki.file("node-node-b-key.pem"),
    ];
    let denied = kpxctl(&[&node_b[..], &["state", "node-a"]].concat());
    assert!(!denied.status.success());
    assert!(text(&denied).1.contains("denied GetNodeState"), "{:?}", text(&denied));
    let own = kpxctl(&[&node_b[..], &["state", "node-b"]].concat());
    assert!(own.status.success(), "{:?}", text(&own));
    // The same admin through a kubeconfig (client-certificate-data, as kubeadm writes it).
    let b64 = |path: &str| base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap());
    let kubeconfig = pki.0.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: admin\nclusters:\n- name: c\n  cluster: {{server: https://apiserver.invalid:6443}}\ncontexts:\n- name: admin\n  context: {{cluster: c, user: alice}}\nusers:\n- name: alice\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(&admin),
            b64(&admin_key)
        ),
    )
    .unwrap();
    let via_kubeconfig = kpxctl(&[
        "--controlplane",
        &cp_url,
        "--cacert",
        &ca,
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "nodes",
    ]);
    assert!(via_kubeconfig.status.success(), "{:?}", text(&via_kubeconfig));
    let anonymous = kpxctl(&["--controlplane", &cp_url, "--cacert", &ca, "nodes"]);
    assert!(text(&anonymous).1.contains("refused the credentials"), "{:?}", text(&anonymous));

    // A dataplane with node-b's certificate claiming to be node-a is refused, and says so.
    let impostor = Dataplane::start(
        &dp_bin,
        &[
            "--node",
            "node-a",
            "--controlplane",
            &cp.url(),
            "--cacert",
            &ca,
            "--cert",
            &pki.file("node-node-b.pem"),
            "--key",
            &pki.file("node-node-b-key.pem"),
            "--admin-listen",
            "",
        ],
    );
    eventually("the impostor is refused", || {
        let log = impostor.log();
        match log.contains("refused this node's credentials") && log.contains("may subscribe only as itself") {
            true => Ok(()),
            false => Err(log),
        }
    });
    let cp_log = cp.log();
    assert!(cp_log.contains("access denied") && cp_log.contains("node \"node-b\" (client certificate)"), "{cp_log}");
    assert!(!cp_log.contains("PRIVATE KEY") && !cp_log.contains("BEGIN"), "no credential material in logs");
    drop(impostor);
    let diff = kpxctl(&[&admin_flags[..], &["diff", "node-a", "--dataplane", &dp_url]].concat());
    assert!(text(&diff).0.lines().any(|l| l == "in sync"), "node-a is unaffected: {:?}", text(&diff));
}

#[test]
fn bad_security_input_gives_one_line_errors() {
    let cp_bin = controlplane_bin();
    let dp_bin = dataplane_bin();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki(dir.path().to_path_buf());
    let d = pki.0.display().to_string();
    assert!(kpxctl(&["certs", "--dir", &d, "--server-name", "127.0.0.1", "--admin", "alice"]).status.success());
    std::fs::write(pki.0.join("empty.pem"), "no certificates here\n").unwrap();
    let unreadable = pki.0.join("unreadable-key.pem");
    std::fs::write(&unreadable, "x").unwrap();
    let examples = examples_dir().display().to_string();
    let run = |bin: &Path, args: &[&str]| {
        let out = Command::new(bin).args(args).env("RUST_LOG", "off").stdin(Stdio::null()).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        stderr
    };
    let cp = |extra: &[&str]| {
        let base = ["--manifests", &examples, "--listen", "127.0.0.1:0", "--metrics-bind-address", ""];
        run(&cp_bin, &[&base[..], extra].concat())
    };
    let (cert, key) = (pki.file("server.pem"), pki.file("server-key.pem"));
    let missing = pki.file("missing-key.pem");
    assert_eq!(
        cp(&["--tls-cert-file", &cert, "--tls-private-key-file", &missing]),
        format!("kpx-controlplane: cannot read private key file {missing}: No such file or directory (os error 2)")
    );
    assert_eq!(
        cp(&["--tls-cert-file", &cert, "--tls-private-key-file", &pki.file("admin-key.pem")]),
        format!(
            "kpx-controlplane: certificate {cert} and private key {} do not belong together: the private key does not match the certificate's public key",
            pki.file("admin-key.pem")
        )
    );
    assert_eq!(
        cp(&["--tls-cert-file", &cert, "--tls-private-key-file", &key, "--client-ca-file", &pki.file("empty.pem")]),
        format!("kpx-controlplane: CA file {} holds no PEM certificate", pki.file("empty.pem"))
    );
    assert!(
        cp(&["--tls-cert-file", &cert, "--tls-private-key-file", &unreadable.display().to_string()])
            .contains("holds no PEM private key")
    );
    let refused = run(&cp_bin, &["--manifests", &examples, "--listen", "0.0.0.0:0", "--metrics-bind-address", ""]);
    assert!(refused.starts_with("kpx-controlplane: refusing to serve plaintext on 0.0.0.0:0"), "{refused}");

    let token = pki.file("no-such-token");
    let dp = run(
        &dp_bin,
        &[
            "--node",
            "n",
            "--controlplane",
            "https://127.0.0.1:1",
            "--cacert",
            &pki.file("ca.pem"),
            "--token-file",
            &token,
            "--backend",
            "dry-run",
        ],
    );
    assert_eq!(
        dp,
        format!(
            "kpx-dataplane: controlplane credentials: cannot read token file {token}: No such file or directory (os error 2)"
        )
    );
    let dp = run(&dp_bin, &["--node", "n", "--controlplane", "https://127.0.0.1:1", "--backend", "dry-run"]);
    assert_eq!(
        dp,
        "kpx-dataplane: controlplane credentials: https:// needs --cacert: the CA that signed the server's certificate"
    );
    let dp = run(
        &dp_bin,
        &["--node", "n", "--controlplane", "http://127.0.0.1:1", "--backend", "dry-run", "--admin-listen", "0.0.0.0:0"],
    );
    assert!(dp.starts_with("kpx-dataplane: admin API: refusing to serve plaintext on 0.0.0.0:0"), "{dp}");
}
