//! `kpxctl service NS/NAME`: the service's fields, then what each group of nodes sees.

use super::{
    LEGEND, external_addresses, list_or_dash, mark_endpoint, needs_legend, policy, protocol_name, service_key,
    sorted_endpoints, type_name,
};
use crate::table::Table;
use kpx_proto::v1::{NodeGroupView, Service, ServiceAcrossNodes};

pub fn service_view(resp: &ServiceAcrossNodes) -> String {
    let mut out = match &resp.service {
        Some(svc) => fields(svc),
        None => "Service:        <unknown>\n".to_string(),
    };
    out.push('\n');
    if resp.views.is_empty() {
        out.push_str("No node views.\n");
        return out;
    }
    for view in &resp.views {
        out.push_str(&format!("Nodes: {}\n", node_list(view)));
        if view.endpoints.is_empty() {
            out.push_str("  <none>\n");
        } else {
            let mut table = Table::new(&["ENDPOINT", "PORTS", "CLUSTER", "LOCAL"]);
            for ep in sorted_endpoints(&view.endpoints) {
                let ports: Vec<String> = ep
                    .ports
                    .iter()
                    .map(|p| if p.name.is_empty() { p.port.to_string() } else { format!("{}={}", p.name, p.port) })
                    .collect();
                table.push(vec![
                    mark_endpoint(ep, ep.ip.clone()),
                    list_or_dash(&ports),
                    yes_no(ep.for_cluster),
                    yes_no(ep.for_local),
                ]);
            }
            out.push_str(&table.render_indented("  "));
        }
        out.push('\n');
    }
    if needs_legend(resp.views.iter().flat_map(|v| &v.endpoints)) {
        out.push_str(LEGEND);
    }
    out
}

fn fields(svc: &Service) -> String {
    let ports: Vec<String> = svc
        .ports
        .iter()
        .map(|p| {
            let name = if p.name.is_empty() { String::new() } else { format!("{} ", p.name) };
            let node_port = if p.node_port > 0 { format!(" nodePort={}", p.node_port) } else { String::new() };
            format!("{name}{}/{}{node_port}", p.port, protocol_name(p))
        })
        .collect();
    let hc = if svc.health_check_node_port > 0 { svc.health_check_node_port.to_string() } else { "-".to_string() };
    let mut rows = vec![
        ("Service", service_key(svc)),
        ("Type", type_name(svc).to_string()),
        ("Cluster IPs", list_or_dash(&svc.cluster_ips)),
        ("External", external_addresses(svc)),
        ("Source ranges", list_or_dash(&svc.load_balancer_source_ranges)),
        ("Ports", if ports.is_empty() { "-".to_string() } else { ports.join(", ") }),
        ("Policy", policy(svc)),
        ("Health check", hc),
    ];
    // For a Local policy: where the service has endpoints at all, which decides whether a node
    // without local endpoints drops its traffic (endpoints elsewhere) or rejects it (none).
    if svc.external_policy_local || svc.internal_policy_local {
        let families = &svc.families_with_endpoints;
        rows.insert(7, ("Endpoints in", if families.is_empty() { "-".to_string() } else { families.join(",") }));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 3;
    rows.iter().map(|(k, v)| format!("{:width$}{v}\n", format!("{k}:"))).collect()
}

fn node_list(view: &NodeGroupView) -> String {
    if view.nodes.is_empty() {
        return "<none>".to_string();
    }
    let names: Vec<&str> =
        view.nodes.iter().map(|n| if n == "*" { "* (every other node)" } else { n.as_str() }).collect();
    names.join(", ")
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}
