//! The cluster manifests (deploy/kustomize/base) render and validate offline against the
//! Kubernetes schemas, with least-privilege RBAC: deploy/validate.sh, run as CI runs it.
//!
//! The validator comes from outside Cargo (`python3 -m pip install kubernetes-validate`, which
//! `.ci/run` installs). Without it these tests skip with a loud message, except under CI=true,
//! where a missing validator fails them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// validate.sh's exit status when a tool it needs is missing.
const MISSING_TOOL: i32 = 3;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Runs deploy/validate.sh on DIR; None (after a loud skip) when the validator is missing and
/// we are not in CI.
fn validate(dir: &Path) -> Option<Output> {
    let script = repo_root().join("deploy/validate.sh");
    let out = Command::new(&script).arg(dir).stdin(Stdio::null()).output().expect("run deploy/validate.sh");
    if out.status.code() == Some(MISSING_TOOL) {
        let hint = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true and {hint}");
        }
        // Straight to stderr: the test harness captures eprintln!, and a skip must be seen.
        let _ = writeln!(std::io::stderr(), "\n**********\nSKIPPED: {hint}\n**********");
        return None;
    }
    Some(out)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn base_manifests_are_valid_with_least_privilege() {
    let Some(out) = validate(&repo_root().join("deploy/kustomize/base")) else { return };
    let text = text(&out);
    assert!(out.status.success(), "deploy/validate.sh failed:\n{text}");
    for object in [
        "Namespace/kpx-system",
        "ServiceAccount/kpx-controlplane",
        "ServiceAccount/kpx-dataplane",
        "ClusterRole/kpx-controlplane",
        "ClusterRoleBinding/kpx-controlplane",
        "Role/kpx-controlplane-pods",
        "RoleBinding/kpx-controlplane-pods",
        "ClusterRole/kpx-inspector",
        "Service/kpx-controlplane",
        "Deployment/kpx-controlplane",
        "DaemonSet/kpx-dataplane",
    ] {
        assert!(text.contains(&format!("ok  {object}\n")), "{object} not validated:\n{text}");
    }
}

/// The checks can fail: a copy of the base with one extra verb, one extra resource, an unknown
/// field and a dataplane token is rejected for each of them.
#[test]
fn privilege_creep_and_schema_errors_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let base = repo_root().join("deploy/kustomize/base");
    for entry in std::fs::read_dir(&base).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let edit = |file: &str, from: &str, to: &str| {
        let path = dir.path().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} no longer contains {from:?}: update this test");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    };
    edit("rbac.yaml", r#"resources: ["services", "nodes"]"#, r#"resources: ["services", "nodes", "secrets"]"#);
    edit("rbac.yaml", r#"verbs: ["get", "list", "watch"]"#, r#"verbs: ["get", "list", "watch", "patch"]"#);
    edit("dataplane.yaml", "automountServiceAccountToken: false", "automountServiceAccountToken: true");
    edit("controlplane.yaml", "replicas: 2", "replicas: 2\n  replica: 2");
    edit("dataplane.yaml", "audience: kpx", "audience: https://kubernetes.default.svc");
    edit("controlplane.yaml", "- json\n", "- json\n        - --insecure\n");

    let Some(out) = validate(dir.path()) else { return };
    let text = text(&out);
    assert_eq!(out.status.code(), Some(1), "expected a rejection:\n{text}");
    for complaint in [
        "ClusterRole/kpx-controlplane: core/secrets verbs ['get', 'list', 'patch', 'watch'], expected []",
        "ClusterRole/kpx-controlplane: core/nodes verbs ['get', 'list', 'patch', 'watch'], expected ['get', 'list', 'watch']",
        "DaemonSet/kpx-dataplane: automountServiceAccountToken must be false",
        "DaemonSet/kpx-dataplane: volume kpx-token projects a token the apiserver accepts",
        "Deployment/kpx-controlplane: container controlplane runs with --insecure",
        "'replica' was unexpected",
    ] {
        assert!(text.contains(complaint), "missing complaint {complaint:?}:\n{text}");
    }
}

/// Every YAML document of the files in `dir` (the kustomization file itself left out).
fn documents(dir: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() == "kustomization.yaml" {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for doc in serde_saphyr::read::<_, serde_json::Value>(&mut bytes.as_slice()) {
            out.push(doc.unwrap_or_else(|e| panic!("{}: {e}", path.display())));
        }
    }
    out
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

/// The cert-manager example fits the base: the Secret and names the base mounts and connects
/// to are the ones its Certificates issue, and the TLS flags point into those mounts.
#[test]
fn cert_manager_example_matches_the_base() {
    let base = documents(&repo_root().join("deploy/kustomize/base"));
    let certs = documents(&repo_root().join("deploy/kustomize/cert-manager"));
    let serving = find(&certs, "Certificate", "kpx-controlplane");
    let deployment = find(&base, "Deployment", "kpx-controlplane");
    let pod = &deployment["spec"]["template"]["spec"];
    let secret = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "tls").unwrap();
    assert_eq!(secret["secret"]["secretName"], serving["spec"]["secretName"]);
    let args: Vec<&str> =
        pod["containers"][0]["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let flag = |f: &str| args[args.iter().position(|a| *a == f).unwrap_or_else(|| panic!("no {f}")) + 1];
    assert_eq!(flag("--tls-cert-file"), "/etc/kpx/tls/tls.crt");
    assert_eq!(flag("--tls-private-key-file"), "/etc/kpx/tls/tls.key");
    assert_eq!(flag("--client-ca-file"), "/etc/kpx/tls/ca.crt");
    let audience = flag("--token-audience");

    // The dataplanes connect with https to a host the serving certificate names, with a token
    // for the audience the controlplane expects.
    let endpoint = find(&base, "ConfigMap", "kpx-bootstrap")["data"]["controlplane-endpoint"].as_str().unwrap();
    let host = endpoint.strip_prefix("https://").expect("https").split(':').next().unwrap();
    let names: Vec<&str> =
        serving["spec"]["dnsNames"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert!(names.contains(&host), "{host} not in {names:?}");
    let daemonset = find(&base, "DaemonSet", "kpx-dataplane");
    let volumes = daemonset["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    let token = volumes.iter().find(|v| v["name"] == "kpx-token").unwrap();
    assert_eq!(token["projected"]["sources"][0]["serviceAccountToken"]["audience"], audience);
    let admin = find(&certs, "Certificate", "kpx-admin");
    assert_eq!(admin["spec"]["subject"]["organizations"][0], "system:masters");
    for c in [serving, admin] {
        assert_eq!(c["spec"]["issuerRef"]["name"], "kpx-ca");
    }
}
