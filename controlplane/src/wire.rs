//! Model -> protobuf. The one place that knows how the proxy's model looks on the wire
//! (addresses and CIDRs as text so grpcurl output stays readable, enums mapped one to one).

use crate::model;
use kpx_proto::v1;

pub fn protocol(p: model::Protocol) -> v1::Protocol {
    match p {
        model::Protocol::Tcp => v1::Protocol::Tcp,
        model::Protocol::Udp => v1::Protocol::Udp,
        model::Protocol::Sctp => v1::Protocol::Sctp,
    }
}

pub fn service_type(t: model::ServiceType) -> v1::ServiceType {
    match t {
        model::ServiceType::ClusterIp => v1::ServiceType::ClusterIp,
        model::ServiceType::NodePort => v1::ServiceType::NodePort,
        model::ServiceType::LoadBalancer => v1::ServiceType::LoadBalancer,
    }
}

/// The Service entry of a node's state; the same for every node.
pub fn service(s: &model::Service) -> v1::Service {
    let text = |ips: &[std::net::IpAddr]| ips.iter().map(ToString::to_string).collect();
    v1::Service {
        namespace: s.key.namespace.clone(),
        name: s.key.name.clone(),
        r#type: service_type(s.service_type).into(),
        cluster_ips: text(&s.cluster_ips),
        external_ips: text(&s.external_ips),
        load_balancer_ips: text(&s.load_balancer_ips),
        load_balancer_source_ranges: s.load_balancer_source_ranges.iter().map(ToString::to_string).collect(),
        ports: s
            .ports
            .iter()
            .map(|p| v1::ServicePort {
                name: p.name.clone(),
                protocol: protocol(p.protocol).into(),
                port: p.port.into(),
                node_port: p.node_port.into(),
            })
            .collect(),
        session_affinity_timeout_seconds: s.session_affinity_timeout.unwrap_or(0),
        external_policy_local: s.external_policy_local,
        internal_policy_local: s.internal_policy_local,
        health_check_node_port: s.health_check_node_port.into(),
        // Depends on the endpoints, not on the Service: node_view fills it for Local services.
        families_with_endpoints: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Cidr, Protocol, ServiceKey, ServicePort, ServiceType};

    fn sample() -> model::Service {
        model::Service {
            key: ServiceKey::new("prod", "web"),
            service_type: ServiceType::LoadBalancer,
            cluster_ips: vec!["10.96.0.10".parse().unwrap(), "fd00:10:96::a".parse().unwrap()],
            external_ips: vec!["192.0.2.7".parse().unwrap()],
            load_balancer_ips: vec!["203.0.113.9".parse().unwrap()],
            load_balancer_source_ranges: vec!["198.51.100.0/24".parse::<Cidr>().unwrap()],
            ports: vec![
                ServicePort { name: "http".into(), protocol: Protocol::Tcp, port: 80, node_port: 30080 },
                ServicePort { name: "dns".into(), protocol: Protocol::Udp, port: 53, node_port: 0 },
                ServicePort { name: "sig".into(), protocol: Protocol::Sctp, port: 9899, node_port: 0 },
            ],
            session_affinity_timeout: Some(600),
            external_policy_local: true,
            internal_policy_local: false,
            health_check_node_port: 31999,
            topology_aware: true,
        }
    }

    #[test]
    fn service_maps_every_field() {
        let w = service(&sample());
        assert_eq!((w.namespace.as_str(), w.name.as_str()), ("prod", "web"));
        assert_eq!(w.r#type(), v1::ServiceType::LoadBalancer);
        assert_eq!(w.cluster_ips, ["10.96.0.10", "fd00:10:96::a"]);
        assert_eq!(w.external_ips, ["192.0.2.7"]);
        assert_eq!(w.load_balancer_ips, ["203.0.113.9"]);
        assert_eq!(w.load_balancer_source_ranges, ["198.51.100.0/24"]);
        let ports: Vec<_> = w.ports.iter().map(|p| (p.name.as_str(), p.protocol(), p.port, p.node_port)).collect();
        assert_eq!(
            ports,
            [
                ("http", v1::Protocol::Tcp, 80, 30080),
                ("dns", v1::Protocol::Udp, 53, 0),
                ("sig", v1::Protocol::Sctp, 9899, 0)
            ]
        );
        assert_eq!(w.session_affinity_timeout_seconds, 600);
        assert!(w.external_policy_local);
        assert!(!w.internal_policy_local);
        assert_eq!(w.health_check_node_port, 31999);
        assert!(w.families_with_endpoints.is_empty(), "filled from the endpoints by node_view");
    }

    #[test]
    fn defaults_map_to_proto_zero_values() {
        let mut s = sample();
        s.service_type = ServiceType::ClusterIp;
        s.session_affinity_timeout = None;
        s.health_check_node_port = 0;
        s.external_ips.clear();
        let w = service(&s);
        assert_eq!(w.r#type(), v1::ServiceType::ClusterIp);
        assert_eq!(w.session_affinity_timeout_seconds, 0);
        assert_eq!(w.health_check_node_port, 0);
        assert!(w.external_ips.is_empty());
        assert_eq!(service_type(ServiceType::NodePort), v1::ServiceType::NodePort);
    }

    #[test]
    fn protocol_never_maps_to_unspecified() {
        for p in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            assert_ne!(protocol(p), v1::Protocol::Unspecified, "{p:?}");
        }
        assert_eq!(protocol(Protocol::Udp), v1::Protocol::Udp);
    }
}
