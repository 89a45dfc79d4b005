//! healthCheckNodePort servers. A cloud load balancer in front of an
//! `externalTrafficPolicy: Local` service probes this port on every node and sends traffic
//! only to nodes that answer 200, that is, nodes with local endpoints. The answer is
//! kube-proxy's (pkg/proxy/healthcheck/service_health.go): the same JSON body and headers.
//!
//! Servers start and stop as such services come and go ([`HcnpServers::reconcile`] after each
//! apply); a count change only updates what a running server answers.
//!
//! The local endpoint count is the endpoints the controlplane marked `for_local` (ready ones,
//! or serving-terminating ones when the node has no ready endpoint).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use crate::health::{Health, json_str};
use crate::http::{self, Reply};
use crate::state::AppliedState;

/// What one healthCheckNodePort answers for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HcnpService {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// The healthCheckNodePorts this node should serve, by port.
pub fn desired(state: &AppliedState) -> BTreeMap<u16, HcnpService> {
    let mut out = BTreeMap::new();
    for e in state.services().values() {
        let s = &e.service;
        let Ok(port) = u16::try_from(s.health_check_node_port) else { continue };
        if !s.external_policy_local || port == 0 {
            continue;
        }
        let local: BTreeSet<&str> = e.endpoints.values().filter(|ep| ep.for_local).map(|ep| ep.ip.as_str()).collect();
        out.insert(
            port,
            HcnpService { namespace: s.namespace.clone(), name: s.name.clone(), local_endpoints: local.len() },
        );
    }
    out
}

/// kube-proxy's answer: 200 when the node has local endpoints and the proxy is healthy.
pub fn response(svc: &HcnpService, proxy_healthy: bool) -> Reply {
    let ok = svc.local_endpoints != 0 && proxy_healthy;
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        json_str(&svc.namespace),
        json_str(&svc.name),
        svc.local_endpoints,
        proxy_healthy
    );
    let headers = [
        ("Content-Type", "application/json".to_string()),
        ("X-Content-Type-Options", "nosniff".to_string()),
        ("X-Load-Balancing-Endpoint-Weight", svc.local_endpoints.to_string()),
    ];
    http::reply(if ok { 200 } else { 503 }, &headers, body)
}

struct Server {
    svc: Arc<Mutex<HcnpService>>,
    task: tokio::task::JoinHandle<()>,
}

/// The running healthCheckNodePort servers.
pub struct HcnpServers {
    health: Arc<Health>,
    servers: BTreeMap<u16, Server>,
}

impl HcnpServers {
    pub fn new(health: Arc<Health>) -> Self {
        HcnpServers { health, servers: BTreeMap::new() }
    }

    /// Ports being served.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }

    /// Starts, updates and stops servers to match `state`. Must run inside a Tokio runtime. A
    /// port that cannot be bound is logged and tried again on the next reconcile.
    pub fn reconcile(&mut self, state: &AppliedState) {
        let want = desired(state);
        self.servers.retain(|port, s| {
            let keep = want.contains_key(port);
            if !keep {
                tracing::info!(port, "stopping healthCheckNodePort server");
                s.task.abort();
            }
            keep
        });
        for (port, svc) in want {
            if let Some(s) = self.servers.get(&port) {
                *s.svc.lock().unwrap_or_else(|e| e.into_inner()) = svc;
                continue;
            }
            let listener = match bind(port) {
                Ok(l) => l,
                Err(error) => {
                    tracing::warn!(port, service = %format!("{}/{}", svc.namespace, svc.name), %error, "cannot serve healthCheckNodePort");
                    continue;
                }
            };
            tracing::info!(port, service = %format!("{}/{}", svc.namespace, svc.name), "serving healthCheckNodePort");
            let shared = Arc::new(Mutex::new(svc));
            let (s, health) = (shared.clone(), self.health.clone());
            let handler = Arc::new(move |_path: &str| {
                let svc = s.lock().unwrap_or_else(|e| e.into_inner()).clone();
                response(&svc, health.healthy())
            });
            let task = tokio::spawn(http::serve(listener, handler));
            self.servers.insert(port, Server { svc: shared, task });
        }
    }
}

impl Drop for HcnpServers {
    fn drop(&mut self) {
        self.servers.values().for_each(|s| s.task.abort());
    }
}

fn bind(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let l = std::net::TcpListener::bind(("0.0.0.0", port))?;
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(r: Reply) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn body_and_status_match_kube_proxy() {
        let svc = HcnpService { namespace: "demo".into(), name: "web-lb".into(), local_endpoints: 2 };
        let r = response(&svc, true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        assert_eq!(r.headers()["x-load-balancing-endpoint-weight"], "2");
        assert_eq!(
            body(r).await,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"demo\",\n\t\t\"name\": \"web-lb\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let none = HcnpService { local_endpoints: 0, ..svc.clone() };
        assert_eq!(response(&none, true).status(), 503);
        // An unhealthy proxy drains its node even with local endpoints.
        let r = response(&svc, false);
        assert_eq!(r.status(), 503);
        assert!(body(r).await.contains("\"serviceProxyHealthy\": false"));
    }
}
