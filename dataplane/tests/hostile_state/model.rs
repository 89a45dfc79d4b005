//! A model of the node's state, to build snapshots and deltas with the right versions, and
//! small constructors of protobuf values and render configs.

use std::collections::BTreeMap;

use kpx_dataplane::backend::iptables::render::{IpFamily, RenderConfig};
use kpx_proto::v1 as pb;
use kpx_proto::version::{self, ContentHash};

pub(crate) fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// What the controlplane believes the node holds: services by key, their endpoints by IP (each
/// naming its service, as the node stores and hashes them).
#[derive(Debug, Clone, Default)]
pub(crate) struct Model {
    pub(crate) services: BTreeMap<String, (pb::Service, BTreeMap<String, pb::Endpoint>)>,
}

impl Model {
    pub(crate) fn upsert(&mut self, s: pb::Service) {
        let k = key(&s.namespace, &s.name);
        self.services.entry(k).or_insert_with(|| (pb::Service::default(), BTreeMap::new())).0 = s;
    }

    pub(crate) fn add_endpoint(&mut self, service: &str, mut e: pb::Endpoint) {
        e.service = service.to_string();
        let (_, eps) = self.services.get_mut(service).expect("endpoints only for known services");
        eps.insert(e.ip.clone(), e);
    }

    pub(crate) fn version(&self) -> String {
        let mut h = ContentHash::EMPTY;
        for (s, eps) in self.services.values() {
            h.add(version::service_hash(s));
            eps.values().for_each(|e| h.add(version::endpoint_hash(e)));
        }
        h.to_version()
    }

    /// A snapshot sending the endpoints in groups (their own `service` left empty), as the
    /// controlplane does.
    pub(crate) fn snapshot(&self) -> pb::Update {
        pb::Update {
            nonce: 1,
            full: true,
            version: self.version(),
            services_upserted: self.services.values().map(|(s, _)| s.clone()).collect(),
            endpoint_groups: self
                .services
                .iter()
                .filter(|(_, (_, eps))| !eps.is_empty())
                .map(|(k, (_, eps))| pb::ServiceEndpoints {
                    service: k.clone(),
                    endpoints: eps.values().map(|e| pb::Endpoint { service: String::new(), ..e.clone() }).collect(),
                })
                .collect(),
            ..Default::default()
        }
    }

    /// The model after `u` (the protocol's order: service removals, endpoint removals, service
    /// upserts, endpoint upserts), and `u` with its versions filled in.
    pub(crate) fn after(&self, mut u: pb::Update) -> (Model, pb::Update) {
        let mut m = self.clone();
        for r in &u.services_removed {
            m.services.remove(&key(&r.namespace, &r.name));
        }
        for r in &u.endpoints_removed {
            if let Some((_, eps)) = m.services.get_mut(&r.service) {
                eps.remove(&r.ip);
            }
        }
        for s in &u.services_upserted {
            m.upsert(s.clone());
        }
        let upserted: Vec<(String, pb::Endpoint)> =
            u.upserted_endpoints().map(|(s, e)| (s.to_string(), e.clone())).collect();
        for (s, e) in upserted {
            m.add_endpoint(&s, e);
        }
        u.base_version = self.version();
        u.version = m.version();
        (m, u)
    }
}

pub(crate) fn ep(ip: &str, port_name: &str, port: u32, for_cluster: bool, for_local: bool) -> pb::Endpoint {
    pb::Endpoint {
        service: String::new(),
        ip: ip.into(),
        ports: vec![pb::EndpointPort { name: port_name.into(), port }],
        for_cluster,
        for_local,
        node_tag: 0,
    }
}

pub(crate) fn port(name: &str, protocol: i32, number: u32, node_port: u32) -> pb::ServicePort {
    pb::ServicePort { name: name.into(), protocol, port: number, node_port }
}

pub(crate) const TCP: i32 = pb::Protocol::Tcp as i32;
pub(crate) const UDP: i32 = pb::Protocol::Udp as i32;
pub(crate) const SCTP: i32 = pb::Protocol::Sctp as i32;

pub(crate) fn render_cfg(family: IpFamily) -> RenderConfig {
    RenderConfig {
        family,
        cluster_cidr: Some(match family {
            IpFamily::V4 => "10.0.0.0/8".into(),
            IpFamily::V6 => "fd00:10::/64".into(),
        }),
        masquerade_all: false,
        node_ips: Vec::new(),
        node_name: "node1".into(),
        localhost_node_ports: true,
    }
}
