//! Pure renderers: an Inspect response in, the text of a table out. No I/O, no clock (the
//! current time is a parameter), so every output is tested on hand-built responses.

mod explain;
mod nodes;
mod service;
mod state;
#[cfg(test)]
mod tests;

pub use explain::explain_view;
pub use nodes::nodes_table;
pub use service::service_view;
pub use state::state_table;

use kpx_proto::v1::{Endpoint, Protocol, Service, ServicePort, ServiceType};
use std::net::IpAddr;

/// How many endpoints a table cell lists before "+N more".
pub const MAX_ENDPOINTS_SHOWN: usize = 4;

/// Hex digits of a content version shown in tables (the full version is 32).
const SHORT_VERSION: usize = 12;

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".to_string() } else { s.to_string() }
}

fn short_version(v: &str) -> String {
    if v.is_empty() { "-".to_string() } else { v.chars().take(SHORT_VERSION).collect() }
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() { "-".to_string() } else { items.join(",") }
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 { format!("1 {word}") } else { format!("{n} {word}s") }
}

/// A kubectl-style age: 45s, 5m, 3h, 2d.
fn human_age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// An apply duration: 850us, 4.2ms, 12ms, 1.5s.
fn human_micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}us"),
        1_000..10_000 => format!("{:.1}ms", us as f64 / 1e3),
        10_000..1_000_000 => format!("{}ms", us / 1_000),
        _ => format!("{:.1}s", us as f64 / 1e6),
    }
}

fn service_key(svc: &Service) -> String {
    format!("{}/{}", svc.namespace, svc.name)
}

fn type_name(svc: &Service) -> &'static str {
    match svc.r#type() {
        ServiceType::ClusterIp => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
        ServiceType::Unspecified => "-",
    }
}

fn protocol_name(port: &ServicePort) -> &'static str {
    match port.protocol() {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
        Protocol::Unspecified => "-",
    }
}

/// "ext=Local int=Cluster", then session affinity when set.
fn policy(svc: &Service) -> String {
    let word = |local: bool| if local { "Local" } else { "Cluster" };
    let mut out = format!("ext={} int={}", word(svc.external_policy_local), word(svc.internal_policy_local));
    if svc.session_affinity_timeout_seconds > 0 {
        out.push_str(&format!(" affinity=ClientIP/{}s", svc.session_affinity_timeout_seconds));
    }
    out
}

/// External IPs and load-balancer IPs together: every address outside traffic arrives on.
fn external_addresses(svc: &Service) -> String {
    let all: Vec<String> = svc.external_ips.iter().chain(&svc.load_balancer_ips).cloned().collect();
    list_or_dash(&all)
}

/// Endpoints sorted by address, numerically when they parse.
fn sorted_endpoints<'a>(eps: impl IntoIterator<Item = &'a Endpoint>) -> Vec<&'a Endpoint> {
    let mut eps: Vec<&Endpoint> = eps.into_iter().collect();
    eps.sort_by(|a, b| {
        let key = |e: &Endpoint| (e.ip.parse::<IpAddr>().ok(), e.ip.clone());
        key(a).cmp(&key(b))
    });
    eps
}

/// The marks on an endpoint: `*` for node-local traffic (a Local policy picked it), and
/// parentheses when it does not take cluster traffic.
fn mark_endpoint(ep: &Endpoint, text: String) -> String {
    let text = if ep.for_local { format!("{text}*") } else { text };
    if ep.for_cluster { text } else { format!("({text})") }
}

const LEGEND: &str =
    "* = local endpoint, used for Local traffic policies; (...) = not used for cluster traffic on this node\n";

fn needs_legend<'a>(eps: impl IntoIterator<Item = &'a Endpoint>) -> bool {
    eps.into_iter().any(|e| e.for_local || !e.for_cluster)
}
