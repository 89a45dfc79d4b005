//! `kpxctl explain`: the verdict first, then what matched, the endpoints and the reasoning.

use crate::explain::{Explanation, Masquerade, endpoint_addr};
use crate::table::Table;

pub fn explain_view(ex: &Explanation) -> String {
    let mut out = format!("{}\n", ex.summary);
    let mut facts = Table::new(&["", ""]);
    let mut fact = |k: &str, v: String| facts.push(vec![format!("{k}:"), v]);
    fact("Node", format!("{} (version {})", ex.node, super::short_version(&ex.version)));
    fact("Packet", format!("{} -> {}", ex.source.as_deref().unwrap_or("any source"), ex.destination));
    if let Some(m) = &ex.matched {
        let port = if m.port_name.is_empty() { m.service.clone() } else { format!("{}:{}", m.service, m.port_name) };
        fact("Service", format!("{port} ({})", kind_text(m)));
    }
    if let (Some(which), Some(value)) = (&ex.traffic_policy, &ex.policy_value) {
        fact("Policy", format!("{which}TrafficPolicy: {value}"));
    }
    if ex.session_affinity_seconds > 0 {
        fact("Affinity", format!("ClientIP, {}s", ex.session_affinity_seconds));
    }
    let masq = match ex.masquerade {
        Masquerade::Yes => "yes",
        Masquerade::No => "no",
        Masquerade::Maybe => "maybe",
    };
    fact("Masquerade", format!("{masq}: {}", ex.masquerade_reason));
    // The table's header row is empty: drop it.
    let rendered = facts.render();
    out.extend(rendered.lines().skip(1).map(|l| format!("{l}\n")));
    if !ex.endpoints.is_empty() {
        out.push('\n');
        let mut t = Table::new(&["ENDPOINT", "CLUSTER", "LOCAL"]);
        for c in &ex.endpoints {
            let yn = |b: bool| if b { "yes" } else { "no" }.to_string();
            t.push(vec![endpoint_addr(c), yn(c.for_cluster), yn(c.for_local)]);
        }
        out.push_str(&t.render());
    }
    out.push_str("\nWhy:\n");
    for r in &ex.reasons {
        out.push_str(&format!("  - {r}\n"));
    }
    out
}

fn kind_text(m: &crate::explain::Matched) -> String {
    use crate::explain::AddressKind::*;
    match m.address_kind {
        ClusterIp => format!("cluster IP, port {}", m.port),
        ExternalIp => format!("external IP, port {}", m.port),
        LoadBalancerIp => format!("load-balancer IP, port {}", m.port),
        NodePort => format!("node port {} -> port {}", m.node_port, m.port),
    }
}
