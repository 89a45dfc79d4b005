//! `kpxctl state NODE`: a header line, then one row per service port.

use super::{
    LEGEND, MAX_ENDPOINTS_SHOWN, external_addresses, list_or_dash, mark_endpoint, needs_legend, plural, policy,
    protocol_name, service_key, short_version, sorted_endpoints, type_name,
};
use crate::table::Table;
use kpx_proto::v1::{Endpoint, NodeState, ServiceState};

pub fn state_table(state: &NodeState) -> String {
    let endpoints: usize = state.services.iter().map(|s| s.endpoints.len()).sum();
    let mut out = format!(
        "node {}, version {}, {}, {}\n",
        state.node_name,
        short_version(&state.version),
        plural(state.services.len(), "service"),
        plural(endpoints, "endpoint"),
    );
    if state.services.is_empty() {
        out.push_str("No services.\n");
        return out;
    }
    let mut services: Vec<&ServiceState> = state.services.iter().collect();
    services.sort_by_key(|s| s.service.as_ref().map(|svc| (svc.namespace.clone(), svc.name.clone())));

    let mut table =
        Table::new(&["SERVICE", "TYPE", "CLUSTER-IP(S)", "PORT/PROTO", "NODEPORT", "EXTERNAL", "POLICY", "ENDPOINTS"]);
    for ss in &services {
        let Some(svc) = &ss.service else { continue };
        let name = service_key(svc);
        if svc.ports.is_empty() {
            let ips = ss.endpoints.iter().map(|e| e.ip.clone());
            table.push(vec![
                name,
                type_name(svc).to_string(),
                list_or_dash(&svc.cluster_ips),
                "-".to_string(),
                "-".to_string(),
                external_addresses(svc),
                policy(svc),
                endpoints_cell(ips.collect()),
            ]);
            continue;
        }
        for port in &svc.ports {
            let label = if port.name.is_empty() { name.clone() } else { format!("{name}:{}", port.name) };
            table.push(vec![
                label,
                type_name(svc).to_string(),
                list_or_dash(&svc.cluster_ips),
                format!("{}/{}", port.port, protocol_name(port)),
                if port.node_port > 0 { port.node_port.to_string() } else { "-".to_string() },
                external_addresses(svc),
                policy(svc),
                endpoints_cell(port_targets(&ss.endpoints, &port.name)),
            ]);
        }
    }
    out.push('\n');
    out.push_str(&table.render());
    if needs_legend(services.iter().flat_map(|s| &s.endpoints)) {
        out.push('\n');
        out.push_str(LEGEND);
    }
    out
}

/// "ip:targetport" (marked) for the endpoints that serve the service port `port_name`.
fn port_targets(endpoints: &[Endpoint], port_name: &str) -> Vec<String> {
    sorted_endpoints(endpoints)
        .into_iter()
        .filter_map(|ep| {
            let target = ep.ports.iter().find(|p| p.name == port_name)?;
            Some(mark_endpoint(ep, format!("{}:{}", host(&ep.ip), target.port)))
        })
        .collect()
}

/// IPv6 addresses in brackets so that ":port" stays readable.
fn host(ip: &str) -> String {
    if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() }
}

/// At most [`MAX_ENDPOINTS_SHOWN`] entries, then "+N more"; "<none>" when empty.
pub(super) fn endpoints_cell(items: Vec<String>) -> String {
    if items.is_empty() {
        return "<none>".to_string();
    }
    let shown = items.len().min(MAX_ENDPOINTS_SHOWN);
    let mut out = items[..shown].join(",");
    if items.len() > shown {
        out.push_str(&format!(" +{} more", items.len() - shown));
    }
    out
}
