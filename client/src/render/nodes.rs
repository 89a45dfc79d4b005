//! `kpxctl nodes`: one row per node.

use super::{human_age, human_micros, or_dash, short_version};
use crate::table::Table;
use kpx_proto::v1::{ListNodesResponse, NodeStatus};

/// NACK errors can be whole iptables-restore outputs; the table shows the start of the first
/// line and -o json shows the rest.
const MAX_ERROR_CHARS: usize = 80;

pub fn nodes_table(resp: &ListNodesResponse, now_unix_ms: i64) -> String {
    if resp.nodes.is_empty() {
        return "No nodes.\n".to_string();
    }
    let mut nodes: Vec<&NodeStatus> = resp.nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut table =
        Table::new(&["NAME", "CONNECTED", "ZONE", "BACKEND", "VERSION", "ACKED", "BEHIND", "LAST-APPLY", "ERROR"]);
    for n in nodes {
        let acked = !n.acked_version.is_empty();
        table.push(vec![
            n.name.clone(),
            connected(n, now_unix_ms),
            or_dash(&n.zone),
            or_dash(&n.backend),
            short_version(&n.desired_version),
            short_version(&n.acked_version),
            if acked { n.versions_behind.to_string() } else { "-".to_string() },
            if n.last_apply_micros > 0 { human_micros(n.last_apply_micros) } else { "-".to_string() },
            short_error(&n.last_nack_error),
        ]);
    }
    table.render()
}

fn connected(n: &NodeStatus, now_unix_ms: i64) -> String {
    match (n.connected, n.connected_since_unix_ms) {
        (false, _) => "no".to_string(),
        (true, 0) => "yes".to_string(),
        (true, since) => format!("yes ({})", human_age(now_unix_ms - since)),
    }
}

fn short_error(err: &str) -> String {
    let first = err.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
    if first.is_empty() {
        return "-".to_string();
    }
    let more = first.chars().count() > MAX_ERROR_CHARS || err.trim().lines().count() > 1;
    let mut out: String = first.chars().take(MAX_ERROR_CHARS).collect();
    if more {
        out.push_str("...");
    }
    out
}
