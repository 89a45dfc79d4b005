//! `kpxctl diff NODE`: the node's desired state at the controlplane vs the state its dataplane
//! applied (kpx.v1.Admin), per service and endpoint, plus whether the kernel has the chains
//! (iptables: KUBE-SVC/SVL; nftables: service-/local- chains of kube-proxy's nftables layout) or virtual
//! and real servers (ipvs) of the applied services. [`compare`] and [`render`] are pure; [`fetch`] does the RPCs.

use crate::connect::{self, ClientError};
use crate::table::Table;
use kpx_auth::client::{AuthChannel, ClientCredentials};
use kpx_proto::v1::admin_client::AdminClient;
use kpx_proto::v1::{
    DataplaneStatus, Endpoint, GetAppliedStateRequest, GetKernelRulesRequest, GetNodeStateRequest, GetStatusRequest,
    KernelRules, NodeState, ServiceState,
};
use serde::Serialize;
use std::collections::BTreeMap;

/// One difference between desired and applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// "+" desired, not applied; "-" applied, not desired; "~" both, but different.
    pub kind: &'static str,
    /// "namespace/name".
    pub service: String,
    /// The endpoint's IP; empty for a change of the service itself.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    pub detail: String,
}

/// What the kernel check found (iptables: the per-service chains of the applied services;
/// ipvs: their virtual servers and real servers).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KernelCheck {
    /// The node's backend ("iptables", "ipvs", "dry-run"): what the entries are.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub backend: String,
    pub checked: bool,
    pub present: usize,
    /// "namespace/name:port CHAIN (family)" of every missing chain; for ipvs CHAIN is the
    /// virtual server ("TCP  10.96.0.10:80") or a real server of it ("... -> 10.244.1.3:8080").
    pub missing: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diff {
    pub node: String,
    pub desired_version: String,
    pub applied_version: String,
    pub connected: bool,
    /// Desired and applied state are equal (the kernel check is separate).
    pub in_sync: bool,
    pub changes: Vec<Change>,
    pub kernel: KernelCheck,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub drift: String,
    /// `--backend shadow`: how kpx's rules compare with the kernel's (a live kube-proxy's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
}

/// The dataplane's last shadow comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Shadow {
    pub compared_unix_ms: i64,
    /// One line per difference; empty: the same rules.
    pub differences: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

fn by_key(st: &NodeState) -> BTreeMap<String, &ServiceState> {
    st.services
        .iter()
        .filter_map(|s| s.service.as_ref().map(|svc| (format!("{}/{}", svc.namespace, svc.name), s)))
        .collect()
}

fn endpoint_detail(d: &Endpoint, a: &Endpoint) -> String {
    let mut parts = Vec::new();
    if d.ports != a.ports {
        parts.push("ports");
    }
    if d.for_cluster != a.for_cluster {
        parts.push("forCluster");
    }
    if d.for_local != a.for_local {
        parts.push("forLocal");
    }
    format!("differs: {}", parts.join(", "))
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 { format!("1 {what}") } else { format!("{n} {what}s") }
}

/// Compares the desired state (controlplane) with the applied one (dataplane), and summarizes
/// the kernel check.
pub fn compare(desired: &NodeState, applied: &NodeState, status: &DataplaneStatus, kernel: &KernelRules) -> Diff {
    let (d, a) = (by_key(desired), by_key(applied));
    let mut changes = Vec::new();
    let change = |kind, service: &str, endpoint: &str, detail: String| Change {
        kind,
        service: service.to_string(),
        endpoint: endpoint.to_string(),
        detail,
    };
    let keys: std::collections::BTreeSet<&String> = d.keys().chain(a.keys()).collect();
    for key in keys {
        match (d.get(key), a.get(key)) {
            (Some(ds), None) => changes.push(change(
                "+",
                key,
                "",
                format!("desired, not applied; {}", plural(ds.endpoints.len(), "endpoint")),
            )),
            (None, Some(as_)) => changes.push(change(
                "-",
                key,
                "",
                format!("applied, not desired; {}", plural(as_.endpoints.len(), "endpoint")),
            )),
            (Some(ds), Some(as_)) => {
                if ds.service != as_.service {
                    changes.push(change("~", key, "", "differs: service".into()));
                }
                let de: BTreeMap<&str, &Endpoint> = ds.endpoints.iter().map(|e| (e.ip.as_str(), e)).collect();
                let ae: BTreeMap<&str, &Endpoint> = as_.endpoints.iter().map(|e| (e.ip.as_str(), e)).collect();
                let ips: std::collections::BTreeSet<&str> = de.keys().chain(ae.keys()).copied().collect();
                for ip in ips {
                    match (de.get(ip), ae.get(ip)) {
                        (Some(_), None) => changes.push(change("+", key, ip, "desired, not applied".into())),
                        (None, Some(_)) => changes.push(change("-", key, ip, "applied, not desired".into())),
                        (Some(x), Some(y)) if x != y => changes.push(change("~", key, ip, endpoint_detail(x, y))),
                        _ => {}
                    }
                }
            }
            (None, None) => {}
        }
    }
    let kernel = KernelCheck {
        backend: kernel.backend.clone(),
        checked: kernel.supported,
        present: kernel.chains.iter().filter(|c| c.present).count(),
        missing: kernel
            .chains
            .iter()
            .filter(|c| !c.present)
            .map(|c| format!("{} {} ({})", c.service_port, c.chain, c.family))
            .collect(),
        note: kernel.note.clone(),
    };
    Diff {
        node: desired.node_name.clone(),
        desired_version: desired.version.clone(),
        applied_version: applied.version.clone(),
        connected: status.connected,
        in_sync: changes.is_empty() && desired.version == applied.version,
        changes,
        kernel,
        last_error: status.last_error.clone(),
        drift: status.drift.clone(),
        shadow: (status.backend == "shadow").then(|| Shadow {
            compared_unix_ms: status.shadow_compared_unix_ms,
            differences: status.shadow_differences.clone(),
            error: status.shadow_error.clone(),
        }),
    }
}

/// The table output.
pub fn render(diff: &Diff) -> String {
    let mut t = Table::new(&["", "VERSION"]);
    t.push(vec!["desired (controlplane)".into(), diff.desired_version.clone()]);
    let applied = if diff.applied_version.is_empty() { "<none>".to_string() } else { diff.applied_version.clone() };
    let conn = if diff.connected { "" } else { " (not connected to the controlplane)" };
    t.push(vec!["applied (node)".into(), format!("{applied}{conn}")]);
    let mut out = format!("node {}\n{}", diff.node, t.render_indented(""));
    if diff.in_sync {
        out.push_str("in sync\n");
    } else if diff.changes.is_empty() {
        out.push_str("same services and endpoints, different versions (an update is in flight?)\n");
    }
    for c in &diff.changes {
        let what = if c.endpoint.is_empty() { c.service.clone() } else { format!("{} {}", c.service, c.endpoint) };
        out.push_str(&format!("{} {what} ({})\n", c.kind, c.detail));
    }
    if !diff.last_error.is_empty() {
        out.push_str(&format!("last error: {}\n", diff.last_error));
    }
    if !diff.drift.is_empty() {
        out.push_str(&format!("drift at the last check: {}\n", diff.drift));
    }
    if let Some(sh) = &diff.shadow {
        if sh.compared_unix_ms == 0 {
            out.push_str("shadow: not compared yet\n");
        } else if sh.differences.is_empty() && sh.error.is_empty() {
            out.push_str("shadow: kpx's rules and the kernel's are the same\n");
        } else {
            out.push_str(&format!(
                "shadow: {} between kpx's rules and the kernel's\n",
                plural(sh.differences.len(), "difference")
            ));
        }
        for d in &sh.differences {
            out.push_str(&format!("  {d}\n"));
        }
        if !sh.error.is_empty() {
            out.push_str(&format!("  (cannot read the kernel: {})\n", sh.error));
        }
        return out;
    }
    let k = &diff.kernel;
    if k.checked {
        // ipvs entries are virtual servers and their real servers, not chains.
        let what = if k.backend == "ipvs" { "virtual/real server" } else { "chain" };
        out.push_str(&format!("kernel: {} present, {} missing\n", plural(k.present, what), k.missing.len()));
        for m in &k.missing {
            out.push_str(&format!("  missing {m}\n"));
        }
        if !k.note.is_empty() {
            out.push_str(&format!("  ({})\n", k.note));
        }
    } else {
        out.push_str(&format!("kernel: not checked ({})\n", k.note));
    }
    out
}

/// Connects to a dataplane's admin API.
async fn connect_dataplane(url: &str, creds: &ClientCredentials) -> Result<AdminClient<AuthChannel>, ClientError> {
    let unreachable = |reason: String| ClientError::DataplaneUnreachable { addr: url.to_string(), reason };
    connect::open(url, creds, connect::CONNECT_TIMEOUT, unreachable).await.map(AdminClient::new)
}

/// Fetches both sides and compares them; the same credentials serve both planes.
pub async fn fetch(
    controlplane: &str,
    dataplane: &str,
    node: &str,
    creds: &ClientCredentials,
) -> Result<Diff, ClientError> {
    let dp = connect::normalize_address(dataplane)?;
    let mut cp_client = connect::connect(controlplane, creds, connect::CONNECT_TIMEOUT).await?;
    let mut dp_client = connect_dataplane(&dp, creds).await?;
    let desired = cp_client
        .get_node_state(GetNodeStateRequest { node_name: node.to_string() })
        .await
        .map_err(|s| connect::status_error(controlplane, "GetNodeState", Some(format!("node {node:?}")), s))?
        .into_inner();
    let dp_error = |rpc: &'static str| {
        let dp = dp.clone();
        move |s: tonic::Status| {
            let message = s.message().to_string();
            match s.code() {
                tonic::Code::Unauthenticated => ClientError::Unauthenticated { addr: dp, message },
                tonic::Code::PermissionDenied => ClientError::Denied { addr: dp, rpc, message },
                code => ClientError::Rpc { rpc, code, message: format!("{message} (at {dp})") },
            }
        }
    };
    let status = dp_client.get_status(GetStatusRequest {}).await.map_err(dp_error("Admin/GetStatus"))?.into_inner();
    if status.node_name != node {
        return Err(ClientError::WrongNode { addr: dp, expected: node.to_string(), actual: status.node_name });
    }
    let applied =
        dp_client.get_applied_state(GetAppliedStateRequest {}).await.map_err(dp_error("Admin/GetAppliedState"))?;
    let kernel =
        dp_client.get_kernel_rules(GetKernelRulesRequest {}).await.map_err(dp_error("Admin/GetKernelRules"))?;
    Ok(compare(&desired, &applied.into_inner(), &status, &kernel.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kpx_proto::v1::{EndpointPort, ExpectedChain, Service};

    fn ep(service: &str, ip: &str, port: u32) -> Endpoint {
        Endpoint {
            service: service.into(),
            ip: ip.into(),
            ports: vec![EndpointPort { name: "http".into(), port }],
            for_cluster: true,
            for_local: false,
            node_tag: 0,
        }
    }

    fn svc(ns: &str, name: &str, eps: Vec<Endpoint>) -> ServiceState {
        let service = Service {
            namespace: ns.into(),
            name: name.into(),
            cluster_ips: vec!["10.96.0.10".into()],
            ..Default::default()
        };
        ServiceState { service: Some(service), endpoints: eps }
    }

    fn state(version: &str, services: Vec<ServiceState>) -> NodeState {
        NodeState { node_name: "node-a".into(), version: version.into(), services }
    }

    fn connected() -> DataplaneStatus {
        DataplaneStatus { connected: true, ..Default::default() }
    }

    #[test]
    fn equal_states_are_in_sync() {
        let s = state("v1", vec![svc("demo", "web", vec![ep("demo/web", "10.244.1.2", 8080)])]);
        let kernel = KernelRules {
            supported: true,
            chains: vec![ExpectedChain {
                service_port: "demo/web:http".into(),
                chain: "KUBE-SVC-X".into(),
                present: true,
                family: "IPv4".into(),
            }],
            ..Default::default()
        };
        let d = compare(&s, &s, &connected(), &kernel);
        assert!(d.in_sync);
        assert!(d.changes.is_empty());
        let text = render(&d);
        assert!(text.contains("in sync\n"), "{text}");
        assert!(text.contains("kernel: 1 chain present, 0 missing"), "{text}");
    }

    #[test]
    fn differences_per_service_and_endpoint() {
        let desired = state(
            "v2",
            vec![
                svc("demo", "web", vec![ep("demo/web", "10.244.1.2", 8080), ep("demo/web", "10.244.1.9", 8080)]),
                svc("demo", "new", vec![ep("demo/new", "10.244.3.1", 80)]),
                svc("demo", "ports", vec![ep("demo/ports", "10.244.4.1", 81)]),
            ],
        );
        let applied = state(
            "v1",
            vec![
                svc("demo", "web", vec![ep("demo/web", "10.244.1.2", 8080), ep("demo/web", "10.244.1.3", 8080)]),
                svc("demo", "gone", vec![]),
                svc("demo", "ports", vec![ep("demo/ports", "10.244.4.1", 80)]),
            ],
        );
        let kernel =
            KernelRules { note: "dry-run: nothing is programmed into the kernel".into(), ..Default::default() };
        let d = compare(&desired, &applied, &DataplaneStatus::default(), &kernel);
        assert!(!d.in_sync);
        let lines: Vec<String> = render(&d).lines().map(str::to_string).collect();
        for want in [
            "- demo/gone (applied, not desired; 0 endpoints)",
            "+ demo/new (desired, not applied; 1 endpoint)",
            "~ demo/ports 10.244.4.1 (differs: ports)",
            "- demo/web 10.244.1.3 (applied, not desired)",
            "+ demo/web 10.244.1.9 (desired, not applied)",
            "kernel: not checked (dry-run: nothing is programmed into the kernel)",
        ] {
            assert!(lines.iter().any(|l| l == want), "missing {want:?} in {lines:#?}");
        }
        assert!(lines.iter().any(|l| l.contains("v1 (not connected to the controlplane)")), "{lines:#?}");
        assert_eq!(d.changes.len(), 5);
    }

    #[test]
    fn service_change_and_missing_chain() {
        let desired = state("v2", vec![svc("demo", "web", vec![])]);
        let mut changed = svc("demo", "web", vec![]);
        changed.service.as_mut().unwrap().cluster_ips = vec!["10.96.0.11".into()];
        let applied = state("v1", vec![changed]);
        let kernel = KernelRules {
            supported: true,
            chains: vec![ExpectedChain {
                service_port: "demo/web:http".into(),
                chain: "KUBE-SVC-X".into(),
                present: false,
                family: "IPv4".into(),
            }],
            ..Default::default()
        };
        let d = compare(&desired, &applied, &connected(), &kernel);
        assert_eq!(
            d.changes,
            [Change {
                kind: "~",
                service: "demo/web".into(),
                endpoint: String::new(),
                detail: "differs: service".into()
            }]
        );
        let text = render(&d);
        assert!(
            text.contains("kernel: 0 chains present, 1 missing\n  missing demo/web:http KUBE-SVC-X (IPv4)"),
            "{text}"
        );
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["in_sync"], false);
        assert_eq!(json["kernel"]["missing"][0], "demo/web:http KUBE-SVC-X (IPv4)");
    }

    #[test]
    fn ipvs_counts_virtual_and_real_servers() {
        let s = state("v1", vec![svc("demo", "web", vec![ep("demo/web", "10.244.1.2", 8080)])]);
        let entry = |chain: &str, present| ExpectedChain {
            service_port: "demo/web:http".into(),
            chain: chain.into(),
            present,
            family: "IPv4".into(),
        };
        let kernel = KernelRules {
            backend: "ipvs".into(),
            supported: true,
            chains: vec![entry("TCP  10.96.0.10:80", true), entry("TCP  10.96.0.10:80 -> 10.244.1.2:8080", false)],
            ..Default::default()
        };
        let text = render(&compare(&s, &s, &connected(), &kernel));
        let want = "kernel: 1 virtual/real server present, 1 missing\n  missing demo/web:http TCP  10.96.0.10:80 -> 10.244.1.2:8080 (IPv4)";
        assert!(text.contains(want), "{text}");
    }

    #[test]
    fn shadow_differences_are_listed_instead_of_the_kernel_check() {
        let s = state("v1", vec![svc("demo", "web", vec![ep("demo/web", "10.244.1.2", 8080)])]);
        let kernel = KernelRules { backend: "shadow".into(), ..Default::default() };
        let shadow = |differences: Vec<String>| DataplaneStatus {
            backend: "shadow".into(),
            shadow_compared_unix_ms: 1,
            shadow_differences: differences,
            ..connected()
        };
        let text = render(&compare(&s, &s, &shadow(vec![]), &kernel));
        assert!(text.contains("shadow: kpx's rules and the kernel's are the same\n"), "{text}");
        assert!(!text.contains("kernel:"), "{text}");
        let line = "- nat KUBE-SVC-OLD   (chain only in the kernel)".to_string();
        let text = render(&compare(&s, &s, &shadow(vec![line.clone()]), &kernel));
        assert!(
            text.contains(&format!("shadow: 1 difference between kpx's rules and the kernel's\n  {line}\n")),
            "{text}"
        );
        let not_yet = DataplaneStatus { shadow_compared_unix_ms: 0, ..shadow(vec![]) };
        assert!(render(&compare(&s, &s, &not_yet, &kernel)).contains("shadow: not compared yet"));
        // Other backends have no shadow section.
        assert_eq!(compare(&s, &s, &connected(), &kernel).shadow, None);
    }

    #[test]
    fn nftables_checks_its_service_chains() {
        let s = state("v1", vec![svc("demo", "web", vec![ep("demo/web", "10.244.1.2", 8080)])]);
        let chain = |name: &str, present| ExpectedChain {
            service_port: "demo/web/tcp/http".into(),
            chain: name.into(),
            present,
            family: "IPv4".into(),
        };
        let kernel = KernelRules {
            backend: "nftables".into(),
            supported: true,
            chains: vec![chain("service-ABCDEFGH-demo/web/tcp/http", false)],
            ..Default::default()
        };
        let text = render(&compare(&s, &s, &connected(), &kernel));
        let want = "kernel: 0 chains present, 1 missing\n  missing demo/web/tcp/http service-ABCDEFGH-demo/web/tcp/http (IPv4)";
        assert!(text.contains(want), "{text}");
    }
}
